"""Group-wise asymmetric weight quantization with MSE clipping, packed in uint8.

Why over 500 lines: the one group quantizer (grid, clip search, encode, decode,
packing) that RTN and GPTQ share, with its schemes; splitting it would write the
group layout twice.

A 2-D linear kernel ``w`` of shape ``(in, out)`` (applied as ``x @ w``) is cut
into groups of ``group_size`` (default 64) consecutive **inputs of one output
row** of ``w.T``: groups never straddle rows (SmolLM2's rows have 576 = 9 * 64
inputs). A row whose length is not a multiple of ``group_size`` is padded at
its end by repeating its last weight (the codes of the padding are stored and
counted in the all-in size).

One group quantizer, used by RTN here and by GPTQ (`optax_lowbit.impq.gptq`):
per group, with ``lo = min`` and ``hi = max`` shrunk by a ratio ``r`` about
their midpoint (``lo_r = lo + (1 - r) (hi - lo) / 2``, ``hi_r`` alike)::

    scale = fp16((hi_r - lo_r) / (2**b - 1))      zero = fp16(lo_r)
    q = clip(round((w - zero) / scale), 0, 2**b - 1)   (uint, b bits)
    w_hat = q * scale + zero

``r`` is searched per group over ``clip`` (default 1.0, 0.95, ..., 0.7), and
the one with the least squared error of ``w_hat`` (with the stored fp16 scale
and zero) wins; ``r = 1`` (no clipping) wins ties, so clipping never
increases a group's error. ``clip=None`` is plain min/max RTN.

`SCHEMES` names the variants: ``"rtn_mse"`` (the default: g64 rows, MSE
clipping), ``"rtn"`` (g64 rows, min/max) and ``"rtn_g128"`` (the former
quantizer: groups of 128 of the row-major flattening of ``w.T``, which run on
into the next row when 128 does not divide ``in``; no clipping).

Codes are packed planar by `optax_lowbit.codecs.base.pack_codes` (3 bits =
a 2-bit plane and a 1-bit plane), so a group of ``g`` holds ``g * b / 8`` code
bytes plus 2 + 2 bytes of fp16 scale and zero: all-in ``b + 32 / g`` bits per
weight (``b + 0.5`` at g64), the figure `QuantizedWeight.bits_per_element`
measures from the real arrays; `QuantizedWeight.code_bits_per_element` counts
the codes alone.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from optax_lowbit.impq import quantizer
  >>> w = jax.random.normal(jax.random.key(0), (256, 64))
  >>> qw = quantizer.quantize(w, bits=3)
  >>> qw.bits_per_element, qw.code_bits_per_element
  (3.5, 3.0)
  >>> quantizer.qmatmul(jnp.ones((2, 256)), qw).shape
  (2, 64)

References:
  `IMPQ (later renamed CoopQ), arXiv 2509.15455
  <https://arxiv.org/abs/2509.15455>`_, 2025: group-wise RTN weights at 2-4
  bits. Frantar et al, `GPTQ: Accurate Post-Training Quantization for
  Generative Pre-trained Transformers <https://arxiv.org/abs/2210.17323>`_,
  2022: the grid search over shrink factors of each group's range (its
  ``mse`` option). The packing and the grouping are ours.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_lowbit.codecs import base

BIT_CHOICES = (2, 3, 4, 8)
GROUP_SIZE = 64
#: bits of fp16 scale + fp16 zero per group, divided over the group.
OVERHEAD_BITS = 32 / GROUP_SIZE  # 0.5
#: shrink factors of a group's range searched by MSE clipping.
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


class Scheme(NamedTuple):
    """A group quantizer's settings (the keyword arguments of `quantize`).

    Attributes:
      group_size: elements per group.
      clip: shrink factors searched per group (``None``: min/max, no search).
      rows: groups stay inside one row of ``w.T`` (else the flattening is
        grouped and a group may straddle rows).
    """

    group_size: int = GROUP_SIZE
    clip: tuple[float, ...] | None = CLIP_RATIOS
    rows: bool = True


#: named quantizers: the default, g64 min/max, and the former g128 RTN.
SCHEMES = {
    "rtn_mse": Scheme(GROUP_SIZE, CLIP_RATIOS, True),
    "rtn": Scheme(GROUP_SIZE, None, True),
    "rtn_g128": Scheme(128, None, False),
}


def all_in_bits(bits: int, group_size: int = GROUP_SIZE) -> float:
    """All-in bits per weight of ``bits``-bit codes with an fp16 scale and zero.

    Args:
      bits: code width.
      group_size: elements per group.

    Returns:
      ``bits + 32 / group_size`` (``bits + 0.5`` for groups of 64).

    Examples:
      >>> all_in_bits(2), all_in_bits(2, 128)
      (2.5, 2.25)
    """
    return bits + 32.0 / group_size


def check_bits(bits: Any, name: str = "bits") -> int:
    """Returns ``bits`` as an int, or raises naming the accepted widths."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise TypeError(f"{name} must be an int in {BIT_CHOICES}, got {bits!r}.")
    if int(bits) not in BIT_CHOICES:
        raise ValueError(f"{name} must be one of {BIT_CHOICES}, got {bits!r}.")
    return int(bits)


def check_group_size(group_size: Any) -> int:
    """Returns ``group_size``, or raises unless it is a positive multiple of 8."""
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int, got {group_size!r}.")
    if group_size <= 0 or group_size % 8:
        raise ValueError(
            f"group_size must be a positive multiple of 8, got {group_size}."
        )
    return group_size


def check_clip(clip: Sequence[float] | None) -> tuple[float, ...]:
    """Shrink factors to search, with 1.0 first (so ties keep no clipping).

    Args:
      clip: ratios in ``(0, 1]``, or ``None`` for no clipping.

    Returns:
      ``(1.0, *others)``.
    """
    if clip is None:
        return (1.0,)
    try:
        ratios = [float(r) for r in clip]
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"clip must be a sequence of ratios in (0, 1] or None, got {clip!r}."
        ) from err
    for r in ratios:
        if not 0.0 < r <= 1.0:
            raise ValueError(f"clip ratios must be in (0, 1], got {r!r}.")
    return (1.0, *dict.fromkeys(r for r in ratios if r != 1.0))


# --------------------------------------------------------------------------
# The group quantizer (written once: RTN and GPTQ use these three).
# --------------------------------------------------------------------------


def encode(x: jax.Array, scale: jax.Array, zero: jax.Array, bits: int) -> jax.Array:
    """Codes of ``x`` on the grid ``zero + scale * {0, ..., 2**bits - 1}``.

    Args:
      x: values, broadcastable against ``scale`` and ``zero``.
      scale: float16 step (0 maps everything to code ``round(x - zero)``).
      zero: float16 value of code 0.
      bits: code width.

    Returns:
      ``uint8`` codes ``clip(round((x - zero) / scale), 0, 2**bits - 1)``.
    """
    levels = (1 << bits) - 1
    s32 = scale.astype(jnp.float32)
    div = jnp.where(s32 > 0, s32, 1.0)
    q = jnp.round((jnp.asarray(x, jnp.float32) - zero.astype(jnp.float32)) / div)
    return jnp.clip(q, 0, levels).astype(jnp.uint8)


def decode(q: jax.Array, scale: jax.Array, zero: jax.Array) -> jax.Array:
    """Values of codes: ``q * scale + zero`` in float32."""
    return q.astype(jnp.float32) * scale.astype(jnp.float32) + zero.astype(jnp.float32)


def group_grid(
    g: jax.Array, bits: int, clip: Sequence[float] | None = CLIP_RATIOS
) -> tuple[jax.Array, jax.Array]:
    """Per-group float16 ``(scale, zero)``, the range shrunk for least error.

    Args:
      g: ``(..., group_size)`` values, one group per row.
      bits: code width.
      clip: shrink factors to search (`check_clip`; ``None``: min/max).

    Returns:
      ``(scale, zero)``, float16 of shape ``g.shape[:-1]``: of the ratio
      whose `decode`d grid gives the least squared error over the group
      (ties: the earliest ratio, 1.0 first).
    """
    ratios = check_clip(clip)
    g = jnp.asarray(g, jnp.float32)
    lo, hi = jnp.min(g, axis=-1), jnp.max(g, axis=-1)
    half = (hi - lo) / 2
    levels = (1 << bits) - 1

    def candidate(r):
        cut = (1.0 - r) * half
        return ((hi - lo - 2 * cut) / levels).astype(jnp.float16), (lo + cut).astype(
            jnp.float16
        )

    if len(ratios) == 1:
        return candidate(1.0)
    scales, zeros = zip(*(candidate(r) for r in ratios), strict=True)
    scales, zeros = jnp.stack(scales), jnp.stack(zeros)  # (R, ...)
    deq = decode(
        encode(g, scales[..., None], zeros[..., None], bits),
        scales[..., None],
        zeros[..., None],
    )
    err = jnp.sum((deq - g) ** 2, axis=-1)  # (R, ...)
    best = jnp.argmin(err, axis=0)
    pick = lambda a: jnp.take_along_axis(a, best[None], axis=0)[0]  # noqa: E731
    return pick(scales), pick(zeros)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A ``(in, out)`` kernel quantized group-wise to ``bits`` bits.

    Attributes:
      codes: ``uint8`` ``(n_groups, group_size * bits / 8)``: planar-packed
        codes, groups in row-major order of ``w.T``.
      scale: ``float16`` ``(n_groups,)``.
      zero: ``float16`` ``(n_groups,)``: the value of code 0.
      shape: the kernel's shape ``(in, out)`` (static).
      bits: code width, one of 2, 3, 4, 8 (static).
      group_size: elements per group (static).
      rows: groups stay inside a row of ``w.T`` (static; ``False``: the
        former layout, groups of the flattening).
    """

    codes: jax.Array
    scale: jax.Array
    zero: jax.Array
    shape: tuple[int, ...] = dataclasses.field(metadata={"static": True})
    bits: int = dataclasses.field(metadata={"static": True})
    group_size: int = dataclasses.field(default=GROUP_SIZE, metadata={"static": True})
    rows: bool = dataclasses.field(default=True, metadata={"static": True})

    @property
    def nbytes(self) -> int:
        """Bytes actually held: codes, scales and zeros."""
        return int(self.codes.nbytes + self.scale.nbytes + self.zero.nbytes)

    @property
    def bits_per_element(self) -> float:
        """All-in bits per weight (codes, scales, zeros), from the arrays."""
        return 8.0 * self.nbytes / max(1, math.prod(self.shape))

    @property
    def code_bits_per_element(self) -> float:
        """Bits of codes alone per weight (the "3-bit" of papers)."""
        return 8.0 * int(self.codes.nbytes) / max(1, math.prod(self.shape))


def _check_kernel(w: Any) -> tuple[int, int]:
    if getattr(w, "ndim", None) != 2:
        raise ValueError(
            f"quantize takes a 2-D (in, out) kernel, got shape "
            f"{getattr(w, 'shape', None)}."
        )
    return int(w.shape[0]), int(w.shape[1])


def to_groups(w: jax.Array, group_size: int, rows: bool = True) -> jax.Array:
    """``(in, out)`` kernel -> ``(n_groups, group_size)`` float32 groups.

    Args:
      w: the kernel.
      group_size: elements per group.
      rows: groups inside each row of ``w.T`` (a ragged row end is padded by
        repeating its last weight); ``False``: groups of the row-major
        flattening of ``w.T`` (the last group zero-padded).

    Returns:
      The groups, in row-major order of ``w.T``.
    """
    wt = jnp.asarray(w, jnp.float32).T
    if not rows:
        return base.to_groups(wt.reshape(-1), group_size)
    n_in = wt.shape[1]
    pad = (-n_in) % group_size
    if pad:
        wt = jnp.pad(wt, ((0, 0), (0, pad)), mode="edge")
    return wt.reshape(-1, group_size)


def from_groups(
    g: jax.Array, shape: tuple[int, int], group_size: int, rows: bool = True
) -> jax.Array:
    """Inverse of `to_groups`: ``(n_groups, group_size)`` -> ``(in, out)``."""
    n_in, n_out = shape
    if rows:
        padded = n_in + (-n_in) % group_size
        return g.reshape(n_out, padded)[:, :n_in].T
    return g.reshape(-1)[: n_in * n_out].reshape(n_out, n_in).T


def pack(
    q: jax.Array,
    scale: jax.Array,
    zero: jax.Array,
    shape: tuple[int, int],
    bits: int,
    *,
    group_size: int = GROUP_SIZE,
    rows: bool = True,
) -> QuantizedWeight:
    """Packs ``(n_groups, group_size)`` codes with their scales and zeros.

    Args:
      q: integer codes below ``2**bits``, groups as `to_groups` orders them.
      scale: ``(n_groups,)`` float16 steps.
      zero: ``(n_groups,)`` float16 values of code 0.
      shape: the kernel's ``(in, out)``.
      bits: code width.
      group_size: elements per group.
      rows: the grouping of `to_groups`.

    Returns:
      The `QuantizedWeight`.
    """
    shape = (int(shape[0]), int(shape[1]))
    codes = base.pack_codes(jnp.asarray(q, jnp.uint8), bits)
    return QuantizedWeight(
        codes,
        jnp.asarray(scale, jnp.float16),
        jnp.asarray(zero, jnp.float16),
        shape,
        bits,
        group_size,
        rows,
    )


def quantize(
    w: jax.Array,
    bits: int,
    *,
    group_size: int = GROUP_SIZE,
    clip: Sequence[float] | None = CLIP_RATIOS,
    rows: bool = True,
) -> QuantizedWeight:
    """Quantizes a 2-D kernel ``(in, out)`` to packed ``bits``-bit codes (RTN).

    Args:
      w: float kernel of shape ``(in, out)``.
      bits: code width, one of 2, 3, 4, 8.
      group_size: elements per group, a positive multiple of 8 (default 64).
      clip: shrink factors searched per group for the least squared error
        (default `CLIP_RATIOS`); ``None``: the group's min/max.
      rows: groups stay inside a row of ``w.T`` (default); ``False`` groups
        the flattening (the ``"rtn_g128"`` scheme of `SCHEMES`).

    Returns:
      A `QuantizedWeight`. Without clipping, ``dequantize`` gives back ``w``
      to within half a quantization step per group (plus float16 rounding of
      scale and zero).

    Raises:
      ValueError: for a bad width, group size, ratio, or a kernel that is not
        2-D.
    """
    bits = check_bits(bits)
    group_size = check_group_size(group_size)
    ratios = check_clip(clip)
    shape = _check_kernel(w)
    g = to_groups(w, group_size, rows)
    scale, zero = group_grid(g, bits, ratios)
    q = encode(g, scale[:, None], zero[:, None], bits)
    return pack(q, scale, zero, shape, bits, group_size=group_size, rows=rows)


def quantize_scheme(w: jax.Array, bits: int, scheme: str | Scheme) -> QuantizedWeight:
    """`quantize` with the settings of a `Scheme` or of a name in `SCHEMES`."""
    if isinstance(scheme, str):
        if scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {tuple(SCHEMES)}, got {scheme!r}.")
        scheme = SCHEMES[scheme]
    return quantize(w, bits, **scheme._asdict())


def dequantize(qw: QuantizedWeight, dtype: Any = jnp.float32) -> jax.Array:
    """Rebuilds the ``(in, out)`` kernel from a `QuantizedWeight`.

    Args:
      qw: the quantized kernel.
      dtype: the result dtype.

    Returns:
      ``q * scale + zero`` per group, of shape ``qw.shape``.
    """
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"qw must be a QuantizedWeight, got {type(qw).__name__}.")
    q = base.unpack_codes(qw.codes, qw.bits, qw.group_size)
    g = decode(q, qw.scale[:, None], qw.zero[:, None])
    return from_groups(g, qw.shape, qw.group_size, qw.rows).astype(dtype)


def qmatmul(x: jax.Array, w: Any) -> jax.Array:
    """``x @ w`` where ``w`` is a `QuantizedWeight` (dequantized) or an array.

    Usable as the ``matmul`` hook of `optax_lowbit.impq.smollm2.forward`.

    Args:
      x: activations ``(..., in)``.
      w: a `QuantizedWeight` or a plain ``(in, out)`` array.

    Returns:
      ``(..., out)`` in the dtype of ``x``.
    """
    if isinstance(w, QuantizedWeight):
        w = dequantize(w, x.dtype)
    return x @ w.astype(x.dtype)


def path_str(path: tuple[Any, ...]) -> str:
    """``jax`` key path -> ``"blocks/3/attn/q"`` (the form of path-regex rules)."""
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


_SKIP = re.compile(
    r"(^|/)(ln[^/]*|[^/]*(embed|norm)[^/]*|pos_[^/]*)(/|$)", re.IGNORECASE
)


def is_linear_weight(path: str, leaf: Any) -> bool:
    """Default leaf filter: 2-D float leaves that are not embeddings or norms.

    Args:
      path: ``"/"``-joined key path of the leaf.
      leaf: the array.

    Returns:
      Whether `quantize_tree` quantizes the leaf by default.
    """
    dtype = getattr(leaf, "dtype", None)
    return (
        getattr(leaf, "ndim", 0) == 2
        and dtype is not None
        and jnp.issubdtype(dtype, jnp.floating)
        and not _SKIP.search(path)
    )


def quantize_tree(
    params: Any,
    bits: int | Callable[[str], int | None],
    *,
    group_size: int = GROUP_SIZE,
    clip: Sequence[float] | None = CLIP_RATIOS,
    rows: bool = True,
    include: Callable[[str, Any], bool] = is_linear_weight,
) -> Any:
    """Quantizes the linear weights of a param tree; other leaves are kept.

    Args:
      params: a pytree of arrays (e.g. `smollm2.load_params`'s params or an
        NNX state's pure dict).
      bits: one width for every selected leaf, or ``bits(path) -> int | None``
        (``None`` keeps that leaf in full precision).
      group_size: elements per group.
      clip: as in `quantize`.
      rows: as in `quantize`.
      include: ``include(path, leaf)`` selects the leaves to quantize; by
        default 2-D float leaves whose path names no embedding or norm.

    Returns:
      The same tree with selected leaves replaced by `QuantizedWeight`.

    Examples:
      >>> p = {"blocks": [{"w": jnp.ones((128, 8))}], "embed": jnp.ones((4, 8))}
      >>> q = quantize_tree(p, 2)
      >>> type(q["blocks"][0]["w"]).__name__, type(q["embed"]).__name__
      ('QuantizedWeight', 'ArrayImpl')
    """
    if callable(bits):
        width = bits
    else:
        fixed = check_bits(bits)

        def width(_):
            return fixed

    def one(path, leaf):
        name = path_str(path)
        if not include(name, leaf):
            return leaf
        b = width(name)
        if b is None:
            return leaf
        return quantize(
            leaf, check_bits(b), group_size=group_size, clip=clip, rows=rows
        )

    return jax.tree_util.tree_map_with_path(one, params)


def dequantize_tree(params: Any, dtype: Any = jnp.float32) -> Any:
    """Replaces every `QuantizedWeight` in ``params`` by its dequantized array."""
    return jax.tree.map(
        lambda x: dequantize(x, dtype) if isinstance(x, QuantizedWeight) else x,
        params,
        is_leaf=lambda x: isinstance(x, QuantizedWeight),
    )


def tree_bytes(params: Any) -> int:
    """Bytes held by a (partly) quantized param tree, every leaf counted."""
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QuantizedWeight))
    return int(sum(x.nbytes for x in leaves))
