"""FSDP training of the byte-level GPT with low-bit states sharded (issue 22).

One script per device call. The GPT of `benchmarks.models` trains on the
Debian documentation bytes of `benchmarks.train_lm_long` with its parameters,
gradients and optimizer states sharded over every device (FSDP: each
parameter's leading axis split over all devices, explicit mesh axes; in the
loss the parameters are all-gathered, their gradients come back
reduce-scattered). Every optimizer runs on three meshes, one after the other:

* ``1``: one device (the reference run);
* ``1d``: a 1-D mesh ``("fsdp",)`` over all N devices;
* ``2d``: a 2-D ``("data", "model")`` mesh of ``2 x N/2`` (N >= 4): the
  leading axis of each parameter split over both axes (every device still
  holds 1/N of every matrix and of its state), the batch too.

Optimizers (``--optimizers``, priority order): fp32 ``optax.adamw``, 2-bit
``adamw_polar``, ``adamw_4bit``, ``adamw_8bit``; each low-bit one as the Optax
chain and as the fused step (``fused=True``). Same seed, data order, schedule,
clipping and weight decay for all.

Checked, per optimizer (each check recorded; the script exits 1 if any fails):

* ``state_bytes``: on every multi-device mesh, the optimizer-state bytes each
  device holds are total / N within 1% (``--bytes-rtol``);
* ``no_state_collective``: the compiled optimizer step alone (clip, update,
  apply, on given gradients) has no all-gather or all-to-all at all, and the
  compiled training step has none whose operand or result is an optimizer
  state tensor (uint8 codes; scales or moments recognised by rank, dtype and
  trailing dimensions that no parameter has). The training step's parameter
  all-gathers (FSDP needs them) are counted and reported beside those of a
  plain-SGD step of the same model;
* ``same_state``: three optimizer steps on the same gradients give the same
  quantized state on N devices as on one, bit for bit (codes and scales:
  rounding seeds come from global positions, so codes do not depend on the
  mesh); float32 moments and parameters within `FLOAT_RTOL` (bitwise on the
  jnp path; XLA may fuse the Pallas path's float step differently per mesh);
* ``same_loss``: the sharded run's loss curve follows the 1-device run's:
  the first `EARLY_LOSS_STEPS` steps within `EARLY_LOSS_RTOL`, the mean of
  the last tenth within ``--loss-rtol`` (the devices sum gradients in another
  order, see `same_loss`; the largest difference over all steps and the
  first differing step are reported);
* ``checkpoint``: parameters and state written with Orbax on the 1-D mesh
  restore on one device and on another mesh (2-D, or the devices reversed for
  N = 2) bit-exactly, with the target mesh's shardings.

Reported per mesh: state bytes per device, the compiled step's memory per
device (``memory_analysis``: arguments, outputs, temporaries), the backend's
peak memory (``memory_stats``; ``null`` with the reason on CPU), the median
step time and the speed-up from 1 to N devices beside fp32 AdamW's.

On CPU with emulated devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``) the result is
labelled as such: timings mean nothing there; equality, bytes and HLO checks do.

Usage::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python -m benchmarks.sharded_training --quick --data repo
    python -m benchmarks.sharded_training --data-dir .devdata --deadline-s 560
    python -m benchmarks.sharded_training --merge a.json b.json --out all.json

Writes ``benchmarks/results/sharded_training_<platform><N>.json`` (or
``$OUT/...`` where ``$OUT`` is set, or ``--out``) and prints a table.

Why one module of ~1000 lines: a benchmark that is one device call, its
checks and its report read together (as `benchmarks.train_lm_long`); the
model, data and schedule are `benchmarks.models`' and `benchmarks.train_lm`'s.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_lowbit as lowbit
from benchmarks import models, train_lm, train_lm_long
from optax_lowbit.codecs import base

RESULTS = train_lm.RESULTS
REPO = pathlib.Path(__file__).resolve().parent.parent

#: Priority order: under ``--deadline-s`` the tail is skipped (and said so).
OPTIMIZERS = (
    "adamw_fp32",
    "polar2",
    "polar2_fused",
    "adamw_4bit",
    "adamw_4bit_fused",
    "adamw_8bit",
    "adamw_8bit_fused",
)
LAYOUTS = ("1", "1d", "2d")
IMPLS = ("auto", "jnp", "pallas")
DATA_SOURCES = ("docs", "repo")

#: Model and run sizes. ``gpu``: 352.6M parameters (GPT-2-medium width, 28
#: blocks), so that per-device memory matters; ``quick``: CPU, seconds.
PRESETS: dict[str, dict[str, Any]] = {
    "gpu": dict(
        d_model=1024,
        n_layers=28,
        n_heads=16,
        seq_len=256,
        batch=16,
        steps=200,
        warmup=20,
        lr=3e-4,
    ),
    "quick": dict(
        d_model=64,
        n_layers=2,
        n_heads=2,
        seq_len=32,
        batch=16,
        steps=200,
        warmup=10,
        lr=3e-3,
    ),
}
B1, B2, WEIGHT_DECAY, CLIP_NORM = 0.9, 0.95, 0.1, 1.0
#: Steps of the same-gradient state comparison.
SAME_STATE_STEPS = 3
#: Float moments and parameters after them: relative tolerance (a few ulps).
FLOAT_RTOL = 1e-5
#: Steps at the start of a run whose losses must agree to `EARLY_LOSS_RTOL`.
EARLY_LOSS_STEPS = 10
EARLY_LOSS_RTOL = 1e-4
#: Steps left out of the median step time (compilation, warm-up).
WARMUP_STEPS = 2
EMULATED_NOTE = (
    "emulated CPU devices (--xla_force_host_platform_device_count): timings "
    "are meaningless; equality, bytes and HLO checks are meaningful"
)


# --------------------------------------------------------------------------
# Optimizers.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """An optimizer as the training step uses it.

    Attributes:
      name: one of `OPTIMIZERS`.
      path: ``"chain"`` (an Optax transform, then ``optax.apply_updates``) or
        ``"fused"`` (``fused=True``: the step returns new parameters).
      init: ``init(params) -> state``.
      apply: ``apply(grads, state, params) -> (params, state)``.
    """

    name: str
    path: str
    init: Callable[[Any], Any]
    apply: Callable[[Any, Any, Any], tuple[Any, Any]]


def _lowbit_factory(base_name: str) -> Callable[..., Any]:
    factories = {
        "polar2": lambda lr, **kw: lowbit.adamw_polar(lr, bits=2, **kw),
        "adamw_4bit": lowbit.adamw_4bit,
        "adamw_8bit": lowbit.adamw_8bit,
    }
    return factories[base_name]


def make_optimizer(name: str, lr: Any, *, impl: str) -> Optimizer:
    """The optimizer ``name`` (one of `OPTIMIZERS`) at schedule ``lr``."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}.")
    adam = dict(b1=B1, b2=B2, weight_decay=WEIGHT_DECAY, mask=train_lm._decay_mask)
    if name == "adamw_fp32":
        return _chain(name, optax.adamw(lr, **adam))
    fused = name.endswith("_fused")
    factory = _lowbit_factory(name.removesuffix("_fused"))
    opt = factory(lr, impl=impl, fused=fused, **adam)
    if fused:
        return Optimizer(name, "fused", opt.init, opt.step)
    return _chain(name, opt)


def _chain(name: str, tx: optax.GradientTransformation) -> Optimizer:
    def apply(grads, state, params):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return Optimizer(name, "chain", tx.init, apply)


def clip(grads: Any) -> Any:
    """Gradients clipped to global norm `CLIP_NORM` (stateless)."""
    return optax.clip_by_global_norm(CLIP_NORM).update(grads, optax.EmptyState())[0]


# --------------------------------------------------------------------------
# Meshes and shardings.
# --------------------------------------------------------------------------


def layout_shape(layout: str, n_devices: int) -> tuple[int, ...]:
    """The mesh shape of ``layout`` over ``n_devices`` devices."""
    if layout == "1":
        return (1,)
    if layout == "1d":
        return (n_devices,)
    if layout == "2d":
        if n_devices < 4 or n_devices % 2:
            raise ValueError(
                f"layout '2d' needs an even number of devices >= 4, got {n_devices}."
            )
        return (2, n_devices // 2)
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.")


def make_mesh(layout: str, devices: Sequence[Any]) -> jax.sharding.Mesh:
    """An explicit-axes mesh of ``layout`` over ``devices`` (in that order)."""
    shape = layout_shape(layout, len(devices))
    names = ("data", "model") if layout == "2d" else ("fsdp",)
    n = int(np.prod(shape))
    axis_types = (jax.sharding.AxisType.Explicit,) * len(shape)
    return jax.sharding.Mesh(
        np.asarray(devices[:n]).reshape(shape), names, axis_types=axis_types
    )


def all_axes(mesh: jax.sharding.Mesh) -> Any:
    """The mesh's axes as one PartitionSpec entry (a name, or a tuple)."""
    names = tuple(mesh.axis_names)
    return names[0] if len(names) == 1 else names


def leading_spec(shape: Sequence[int], mesh: jax.sharding.Mesh) -> P:
    """FSDP: the leading axis split over every device where it divides."""
    if mesh.size > 1 and len(shape) >= 1 and shape[0] % mesh.size == 0:
        return P(all_axes(mesh))
    return P()


def shard_tree(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """Host arrays of ``tree`` put on ``mesh`` by `leading_spec` (copies)."""
    return jax.tree.map(
        lambda x: jax.device_put(x, NamedSharding(mesh, leading_spec(x.shape, mesh))),
        tree,
    )


def is_packed(x: Any) -> bool:
    """Whether ``x`` is a quantized moment (`optax_lowbit.codecs.base.Packed`)."""
    return isinstance(x, base.Packed)


def to_host(tree: Any) -> Any:
    """Every array of ``tree`` as a NumPy array."""
    return jax.tree.map(np.asarray, tree)


# --------------------------------------------------------------------------
# Data and model.
# --------------------------------------------------------------------------


def load_train_bytes(source: str, data_dir: str | None) -> tuple[np.ndarray, dict]:
    """uint8 training bytes and a note of where they came from.

    ``docs``: `train_lm_long.load_docs` (``docs.npz`` in ``data_dir``, else
    the full corpus from `benchmarks.data`); ``repo``: this repository's
    Markdown files (real English, always present, no download: tests).
    """
    if source == "docs":
        train, _, info = train_lm_long.load_docs(data_dir)
        return train, dict(source="docs", **info)
    if source == "repo":
        files = sorted(REPO.glob("*.md")) + sorted(REPO.glob("benchmarks/*.md"))
        blob = b"\n\n".join(f.read_bytes() for f in files)
        names = [str(f.relative_to(REPO)) for f in files]
        return np.frombuffer(blob, np.uint8).copy(), dict(
            source="repo", files=names, train_bytes=len(blob)
        )
    raise ValueError(f"--data must be one of {DATA_SOURCES}, got {source!r}.")


def make_batches(
    train: np.ndarray, steps: int, batch: int, seq_len: int, seed: int
) -> np.ndarray:
    """int32 windows ``(steps, batch, seq_len + 1)``: `train_lm.train_offsets`."""
    window = seq_len + 1
    starts = train_lm.train_offsets(train.size, steps, batch, window, seed)
    return train[starts[..., None] + np.arange(window)].astype(np.int32)


def build_model(cfg: argparse.Namespace) -> tuple[Any, dict]:
    """The GPT's graph and its initial parameters (host arrays, seed ``cfg.seed``).

    Initialised in one jitted program (eagerly, each operation would compile).
    """

    def model() -> models.TinyGPT:
        sizes = (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.seq_len)
        return models.TinyGPT(256, *sizes, rngs=nnx.Rngs(cfg.seed))

    graphdef = nnx.graphdef(nnx.eval_shape(model))
    params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(model())))()
    return graphdef, to_host(params)


def same_gradients(params: Any, seed: int) -> Any:
    """Seeded random gradients like ``params`` (NumPy: no compilation), for
    the same-gradient state comparison; some elements large, most small."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: (1e-3 * rng.standard_t(3, x.shape)).astype(x.dtype), params
    )


def make_loss(graphdef: Any) -> Callable[[Any, jax.Array], jax.Array]:
    """``loss(params, tokens)``: parameters all-gathered (FSDP), then the GPT."""

    def forward(full, tokens):
        return models.loss_fn(nnx.merge(graphdef, full), tokens)

    def loss(params, tokens):
        full = jax.tree.map(lambda x: jax.sharding.reshard(x, P()), params)
        # the GPT itself under Auto axes (its embedding gather has no explicit
        # output sharding): replicated weights, batch-sharded tokens
        return jax.sharding.auto_axes(forward, out_sharding=P())(full, tokens)

    return loss


def make_train_step(loss: Callable, apply: Callable) -> Callable:
    """``step(params, state, tokens) -> (params, state, loss)``."""

    def step(params, state, tokens):
        value, grads = jax.value_and_grad(loss)(params, tokens)
        params, state = apply(clip(grads), state, params)
        return params, state, value

    return step


def make_update_step(apply: Callable) -> Callable:
    """``step(params, state, grads) -> (params, state)``: the optimizer alone."""

    def step(params, state, grads):
        return apply(clip(grads), state, params)

    return step


def sgd_apply(grads: Any, state: Any, params: Any) -> tuple[Any, Any]:
    """Plain SGD: the baseline whose training step's all-gathers FSDP needs."""
    return jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads), state


# --------------------------------------------------------------------------
# Bytes, memory and HLO.
# --------------------------------------------------------------------------


def bytes_per_device(tree: Any) -> dict[int, int]:
    """Bytes of ``tree``'s arrays held on each device (its shards)."""
    out: dict[int, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device.id] = out.get(shard.device.id, 0) + shard.data.nbytes
    return out


def peak_memory(devices: Sequence[Any]) -> dict[str, Any]:
    """The backend's peak bytes in use per device, or ``None`` and why."""
    stats = [d.memory_stats() for d in devices]
    if any(s is None or "peak_bytes_in_use" not in s for s in stats):
        return dict(
            peak_bytes_in_use=None,
            reason=f"the {jax.default_backend()} backend reports no memory_stats",
        )
    return dict(
        peak_bytes_in_use=[int(s["peak_bytes_in_use"]) for s in stats],
        note="the process's peak so far (runs are in the order of the records)",
    )


def compiled_memory(compiled: Any) -> dict[str, int] | None:
    """Per-device arguments, outputs, temporaries of a compiled program."""
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    keys = ("argument", "output", "temp", "alias", "generated_code")
    return {k: int(getattr(mem, f"{k}_size_in_bytes", 0)) for k in keys}


_HLO_TYPE = re.compile(r"\b(pred|[subf]\d+|bf16|f8\w*)\[([\d,]*)\]")
_COLLECTIVE = re.compile(r"\b(all-gather|all-to-all)(-start)?\(")
_DTYPE_NAMES = {
    "uint8": "u8",
    "int8": "s8",
    "int32": "s32",
    "float32": "f32",
    "bfloat16": "bf16",
    "float16": "f16",
}


def hlo_type(dtype: Any, shape: Sequence[int]) -> tuple[str, tuple[int, ...]]:
    """``(hlo dtype name, shape)`` of an array, as the HLO text spells them."""
    name = jnp.dtype(dtype).name
    return _DTYPE_NAMES.get(name, name), tuple(int(s) for s in shape)


def collectives(hlo: str) -> list[dict[str, Any]]:
    """Every all-gather / all-to-all in ``hlo``: op and operand/result types."""
    out = []
    for line in hlo.splitlines():
        m = _COLLECTIVE.search(line)
        if not m or "=" not in line[: m.start()]:
            continue
        types = [
            (t, tuple(int(s) for s in dims.split(",") if s))
            for t, dims in _HLO_TYPE.findall(line[: line.find("}", m.end()) + 1])
        ]
        out.append(dict(op=m.group(1), types=types, line=line.strip()[:300]))
    return out


def state_signatures(state: Any, params: Any) -> set[tuple[str, int, tuple[int, ...]]]:
    """``(dtype, rank, trailing dims)`` of state tensors that no parameter has.

    An all-gather over a leading axis (or over one axis of a 2-D mesh) keeps
    the dtype, the rank and the trailing dimensions, so a collective with one
    of these signatures moves optimizer state.
    """

    def sig(x: Any) -> tuple[str, int, tuple[int, ...]]:
        dtype, shape = hlo_type(x.dtype, x.shape)
        return dtype, len(shape), shape[1:]

    param_sigs = {sig(x) for x in jax.tree.leaves(params)}
    return {
        sig(x) for x in jax.tree.leaves(state) if x.ndim >= 1 and x.size > 1
    } - param_sigs


def state_collectives(
    found: list[dict[str, Any]], signatures: set[tuple[str, int, tuple[int, ...]]]
) -> list[dict[str, Any]]:
    """The collectives of ``found`` that move a tensor of ``signatures``."""
    bad = []
    for c in found:
        for dtype, shape in c["types"]:
            if dtype == "u8" or (dtype, len(shape), shape[1:]) in signatures:
                bad.append(c)
                break
    return bad


# --------------------------------------------------------------------------
# One optimizer on one mesh.
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Context:
    """What every run shares."""

    cfg: argparse.Namespace
    graphdef: Any
    params0: dict
    batches: np.ndarray
    grads0: Any  # `same_gradients` (same_state)
    devices: list[Any]
    sgd_gathers: dict[str, int] = dataclasses.field(default_factory=dict)


def _median_ms(times: list[float]) -> float | None:
    kept = times[WARMUP_STEPS:] or times
    return 1e3 * statistics.median(kept) if kept else None


def sgd_gather_count(ctx: Context, layout: str) -> int:
    """All-gathers in the plain-SGD training step's HLO on ``layout`` (cached)."""
    if layout not in ctx.sgd_gathers:
        mesh = make_mesh(layout, ctx.devices)
        with jax.set_mesh(mesh):
            params = shard_tree(ctx.params0, mesh)
            tokens = jax.device_put(
                ctx.batches[0],
                NamedSharding(mesh, leading_spec((ctx.cfg.batch,), mesh)),
            )
            step = jax.jit(make_train_step(make_loss(ctx.graphdef), sgd_apply))
            hlo = step.lower(params, (), tokens).compile().as_text()
        ctx.sgd_gathers[layout] = sum(c["op"] == "all-gather" for c in collectives(hlo))
    return ctx.sgd_gathers[layout]


def run_layout(
    name: str, layout: str, ctx: Context, *, impl: str
) -> tuple[dict[str, Any], Any]:
    """Trains with optimizer ``name`` on ``layout``; returns its record and the
    final ``(params, state)`` (device arrays)."""
    cfg = ctx.cfg
    mesh = make_mesh(layout, ctx.devices)
    n = mesh.size
    opt = make_optimizer(name, train_lm.schedule(cfg), impl=impl)
    rec: dict[str, Any] = dict(
        optimizer=name, path=opt.path, layout=layout, mesh=dict(mesh.shape)
    )
    batch_sharding = NamedSharding(mesh, leading_spec((cfg.batch,), mesh))
    with jax.set_mesh(mesh):
        params = shard_tree(ctx.params0, mesh)
        state = jax.jit(opt.init)(params)
        rec["replicated_params"] = [
            jax.tree_util.keystr(p)
            for p, x in jax.tree_util.tree_leaves_with_path(params)
            if n > 1 and x.sharding.spec == P()
        ]
        # the optimizer alone on given gradients: no collective but reductions
        grads = shard_tree(ctx.grads0, mesh)
        update = jax.jit(make_update_step(opt.apply))
        upd_hlo = update.lower(params, state, grads).compile().as_text()
        p_s, s_s = params, state
        for _ in range(SAME_STATE_STEPS):
            p_s, s_s = update(p_s, s_s, grads)
        same_state = to_host((p_s, s_s))
        del p_s, s_s, grads

        step = jax.jit(
            make_train_step(make_loss(ctx.graphdef), opt.apply), donate_argnums=(0, 1)
        )
        tokens0 = jax.device_put(ctx.batches[0], batch_sharding)
        t = time.perf_counter()
        compiled = step.lower(params, state, tokens0).compile()
        rec["compile_s"] = time.perf_counter() - t
        hlo = compiled.as_text()

        total = lowbit.state_bytes(state)
        per_dev = bytes_per_device(state)
        rec["state_bytes_total"] = int(total)
        rec["state_bytes_per_device"] = [per_dev[d.id] for d in mesh.devices.flat]
        rec["param_bytes_per_device"] = list(bytes_per_device(params).values())
        rec["compiled_memory_per_device"] = compiled_memory(compiled)

        losses, times = [], []
        for i in range(cfg.steps):
            tokens = jax.device_put(ctx.batches[i], batch_sharding)
            t = time.perf_counter()
            params, state, loss = compiled(params, state, tokens)
            losses.append(float(loss))  # waits for the step
            times.append(time.perf_counter() - t)
        rec["peak_memory"] = peak_memory(list(mesh.devices.flat))
    rec["losses"] = losses
    rec["step_ms"] = _median_ms(times)
    signatures = state_signatures(state, params)
    upd = collectives(upd_hlo)
    train = collectives(hlo)
    bad = state_collectives(train, signatures)
    rec["hlo"] = dict(
        update_step_collectives=[c["line"] for c in upd],
        train_step_state_collectives=[c["line"] for c in bad],
        train_step_all_gathers=sum(c["op"] == "all-gather" for c in train),
        train_step_all_to_alls=sum(c["op"] == "all-to-all" for c in train),
        sgd_train_step_all_gathers=(
            sgd_gather_count(ctx, layout) if n > 1 and cfg.sgd_baseline else None
        ),
    )
    rec["checks"] = {}
    if n > 1:
        rec["checks"]["no_state_collective"] = not upd and not bad
        share = max(rec["state_bytes_per_device"]) * n / total - 1
        rec["state_bytes_excess_over_total_per_n"] = share
        rec["checks"]["state_bytes"] = abs(share) <= cfg.bytes_rtol
    rec["_same_state"] = same_state
    return rec, (params, state)


# --------------------------------------------------------------------------
# Equivalence and checkpoints.
# --------------------------------------------------------------------------


def tree_mismatch(a: Any, b: Any) -> float:
    """Largest fraction of differing entries over the leaves of two trees."""
    fa, fb = jax.tree.leaves(a), jax.tree.leaves(b)
    if len(fa) != len(fb):
        return 1.0
    out = 0.0
    for x, y in zip(fa, fb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        if x.shape != y.shape or x.dtype != y.dtype:
            return 1.0
        out = max(out, float(np.mean(x != y)) if x.size else 0.0)
    return out


def _max_rel(a: Any, b: Any) -> float:
    """Largest ``max|a - b| / max|b|`` over the leaves of two float trees.

    Leaf-wise (normwise) relative: a rounding difference of an update is
    measured at its leaf's scale, not at an element that happens to be near 0.
    """
    out = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if x.shape != y.shape:
            return float("inf")
        if x.size:
            scale = max(float(np.max(np.abs(y))), np.finfo(np.float32).tiny)
            out = max(out, float(np.max(np.abs(x - y))) / scale)
    return out


def compare_same_state(a: Any, b: Any) -> dict[str, Any]:
    """``(params, state)`` after the same gradients on two meshes, compared.

    Packed moments (uint8 codes and their scales) must be bitwise equal (the
    rounding seeds come from global positions); float32 moments and
    parameters are compared relatively (`_max_rel`): XLA may fuse an
    elementwise float step differently in another program (a few ulps: the
    fused step, and the Pallas path's float leaves; the jnp chain is bitwise).
    """
    packed = lambda t: [  # noqa: E731
        x for x in jax.tree.leaves(t, is_leaf=is_packed) if is_packed(x)
    ]
    floats = lambda t: [  # noqa: E731
        x for x in jax.tree.leaves(t, is_leaf=is_packed) if not is_packed(x)
    ]
    (pa, sa), (pb, sb) = a, b
    return dict(
        packed_leaves=len(packed(sa)),
        packed_mismatch=tree_mismatch(packed(sa), packed(sb)),
        float_moments_bitwise=tree_mismatch(floats(sa), floats(sb)) == 0.0,
        params_bitwise=tree_mismatch(pa, pb) == 0.0,
        float_max_rel=max(_max_rel(floats(sa), floats(sb)), _max_rel(pa, pb)),
    )


def loss_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Two loss curves compared: all steps, the first `EARLY_LOSS_STEPS`, the
    mean of the last tenth of the steps."""
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    rel = np.abs(x - y) / np.abs(y)
    tail = max(1, len(y) // 10)
    return dict(
        max_abs=float(np.abs(x - y).max()),
        max_rel=float(rel.max()),
        early_max_rel=float(rel[:EARLY_LOSS_STEPS].max()),
        final_mean_rel=float(abs(x[-tail:].mean() / y[-tail:].mean() - 1)),
        final_steps=tail,
        bitwise_equal=bool(np.array_equal(x, y)),
        first_differing_step=int(np.argmax(x != y)) if (x != y).any() else None,
    )


def same_loss(diff: dict[str, Any], rtol: float) -> bool:
    """The `loss_difference` check: the first steps agree to `EARLY_LOSS_RTOL`
    (only float rounding apart), the last tenth's mean to ``rtol``.

    Not the whole curve step by step: the devices sum the gradients in
    another order than one device does (float rounding); once a rounding tie
    flips one stochastically rounded code, a low-bit run goes its own way, as
    a run with a nearby seed would (measured on 8 emulated CPU devices: fp32
    AdamW's curves stay within 2e-6 over 200 steps, polar 2-bit's drift apart
    from about step 10).
    """
    return diff["early_max_rel"] <= EARLY_LOSS_RTOL and diff["final_mean_rel"] <= rtol


def abstract_target(opt: Optimizer, params: Any, mesh: jax.sharding.Mesh) -> dict:
    """``{"params", "opt_state"}`` as `jax.ShapeDtypeStruct` with ``mesh``'s
    shardings (`leading_spec`; the state's by `jax.eval_shape` of its init)."""
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=NamedSharding(mesh, leading_spec(x.shape, mesh))
        ),
        params,
    )
    state = jax.eval_shape(opt.init, abstract)
    state = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(
            x.shape,
            x.dtype,
            # eval_shape's shardings are on the abstract mesh: put on `mesh`
            sharding=NamedSharding(mesh, x.sharding.spec if x.sharding else P()),
        ),
        state,
    )
    return {"params": abstract, "opt_state": state}


def checkpoint_roundtrip(
    name: str,
    final: Any,
    ctx: Context,
    targets: dict[str, tuple[str, list[Any]]],
    *,
    impl: str,
) -> dict[str, Any]:
    """Writes ``final`` (params, state) with Orbax; restores it on each target
    (a layout and its devices, see `make_mesh`) and compares bit for bit."""
    ocp = orbax_checkpoint()
    saved = to_host(final)
    opt = make_optimizer(name, train_lm.schedule(ctx.cfg), impl=impl)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "ckpt"
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(path, {"params": final[0], "opt_state": final[1]})
        ckpt.wait_until_finished()
        for label, (layout, devices) in targets.items():
            mesh = make_mesh(layout, devices)
            with jax.set_mesh(mesh):
                target = abstract_target(opt, ctx.params0, mesh)
                restored = ckpt.restore(path, target)
            same_tree = jax.tree.structure(restored["opt_state"]) == jax.tree.structure(
                final[1]
            )
            same_sharding = all(
                r.sharding.is_equivalent_to(t.sharding, r.ndim)
                for r, t in zip(
                    jax.tree.leaves(restored), jax.tree.leaves(target), strict=True
                )
            )
            mismatch = tree_mismatch((restored["params"], restored["opt_state"]), saved)
            out[label] = dict(
                mesh=dict(mesh.shape),
                same_tree=same_tree,
                target_sharding=same_sharding,
                mismatch=mismatch,
                ok=same_tree and same_sharding and mismatch == 0.0,
            )
        ckpt.close()
    return out


def orbax_checkpoint() -> Any:
    """``orbax.checkpoint``, or None where it is not installed (the checkpoint
    check is then left out and said so: ``pip install -e .[test]``)."""
    try:
        import orbax.checkpoint as ocp
    except ImportError:
        return None
    return ocp


def checkpoint_targets(devices: list[Any]) -> dict[str, tuple[str, list[Any]]]:
    """Where a checkpoint written on the 1-D mesh is restored: one device, and
    a different mesh (2-D for N >= 4, else the devices reversed)."""
    n = len(devices)
    if n == 1:
        return {}
    other = ("2d", devices) if n >= 4 and n % 2 == 0 else ("1d", devices[::-1])
    return {"1_device": ("1", devices[:1]), f"{other[0]}_other_mesh": other}


def run_optimizer(name: str, ctx: Context, layouts: Sequence[str]) -> list[dict]:
    """Every layout for one optimizer, then its equivalence and checkpoint checks."""
    cfg = ctx.cfg
    recs, finals = {}, {}
    for layout in layouts:
        rec, final = run_layout(name, layout, ctx, impl=cfg.impl)
        recs[layout], finals[layout] = rec, final
        print(
            f"  {name:18s} {layout:3s} step {rec['step_ms'] or float('nan'):8.2f} ms"
            f"  final loss {rec['losses'][-1]:.4f}  state/device "
            f"{max(rec['state_bytes_per_device']) / 1e6:.3f} MB",
            flush=True,
        )
    ref = recs.get("1")
    same = {layout: rec.pop("_same_state") for layout, rec in recs.items()}
    for layout, rec in recs.items():
        if ref is None or layout == "1":
            continue
        cmp = compare_same_state(same[layout], same["1"])
        rec["same_state_vs_1_device"] = cmp
        rec["checks"]["same_state"] = (
            cmp["packed_mismatch"] == 0.0 and cmp["float_max_rel"] <= FLOAT_RTOL
        )
        rec["loss_vs_1_device"] = loss_difference(rec["losses"], ref["losses"])
        rec["checks"]["same_loss"] = same_loss(rec["loss_vs_1_device"], cfg.loss_rtol)
        rec["speedup_vs_1_device"] = (
            ref["step_ms"] / rec["step_ms"] if rec["step_ms"] else None
        )
    if "1d" in finals and orbax_checkpoint() is None:
        recs["1d"]["checkpoint"] = "not run: orbax-checkpoint is not installed"
    elif "1d" in finals:
        rt = checkpoint_roundtrip(
            name, finals["1d"], ctx, checkpoint_targets(ctx.devices), impl=cfg.impl
        )
        recs["1d"]["checkpoint"] = rt
        if rt:
            recs["1d"]["checks"]["checkpoint"] = all(r["ok"] for r in rt.values())
    return list(recs.values())


def add_relative_scaling(records: list[dict]) -> None:
    """Each record's speed-up from 1 to N devices over fp32 AdamW's (same layout)."""
    base = {
        r["layout"]: r.get("speedup_vs_1_device")
        for r in records
        if r["optimizer"] == "adamw_fp32"
    }
    for r in records:
        s, b = r.get("speedup_vs_1_device"), base.get(r["layout"])
        r["speedup_over_adamw_fp32_speedup"] = s / b if s and b else None


# --------------------------------------------------------------------------
# Report.
# --------------------------------------------------------------------------


def _fmt(x: Any, spec: str) -> str:
    if x is None:
        return "-".rjust(int(re.match(r"\d*", spec).group() or 0))
    return format(x, spec)


def table(result: dict[str, Any]) -> str:
    """The records as a text table."""
    head = (
        f"{'optimizer':18s} {'mesh':6s} {'ms/step':>8s} {'xN':>6s} {'/adamw':>7s} "
        f"{'MB state/dev':>12s} {'total/N':>8s} {'dloss max':>9s} {'dloss end':>9s} "
        f"{'loss=':>5s} {'state=':>6s} {'ckpt':>5s} {'no-coll':>7s}"
    )
    lines = [head, "-" * len(head)]
    for r in result["records"]:
        n = int(np.prod(list(r["mesh"].values())))
        c = r.get("checks", {})
        diff = r.get("loss_vs_1_device") or {}
        mesh = "x".join(str(v) for v in r["mesh"].values())
        yes = {True: "ok", False: "FAIL", None: "-"}
        lines.append(
            f"{r['optimizer']:18s} {mesh:6s} {_fmt(r['step_ms'], '8.2f')} "
            f"{_fmt(r.get('speedup_vs_1_device'), '6.2f')} "
            f"{_fmt(r.get('speedup_over_adamw_fp32_speedup'), '7.2f')} "
            f"{max(r['state_bytes_per_device']) / 1e6:12.3f} "
            f"{r['state_bytes_total'] / n / 1e6:8.3f} "
            f"{_fmt(diff.get('max_rel'), '9.1e')} "
            f"{_fmt(diff.get('final_mean_rel'), '9.1e')} {yes[c.get('same_loss')]:>5s} "
            f"{yes[c.get('same_state')]:>6s} {yes[c.get('checkpoint')]:>5s} "
            f"{yes[c.get('no_state_collective')]:>7s}"
        )
    return "\n".join(lines)


def failed_checks(result: dict[str, Any]) -> list[str]:
    """``"<optimizer>/<layout>:<check>"`` of every failed check."""
    return [
        f"{r['optimizer']}/{r['layout']}:{k}"
        for r in result["records"]
        for k, ok in r.get("checks", {}).items()
        if not ok
    ]


def git_commit() -> str:
    """``$OPTAX_LOWBIT_COMMIT``, else git's HEAD (see `train_lm_long.git_commit`)."""
    return train_lm_long.git_commit()


def run_meta(cfg: argparse.Namespace, data_info: dict, n_params: int) -> dict:
    """Devices, versions, date, commit and the run's configuration."""
    ocp = orbax_checkpoint()
    backend = jax.default_backend()
    return dict(
        benchmark="sharded_training",
        device=str(jax.devices()[0].device_kind),
        platform=backend,
        n_devices=jax.device_count(),
        n_processes=jax.process_count(),
        emulated_devices=backend == "cpu" and jax.device_count() > 1,
        note=EMULATED_NOTE if backend == "cpu" and jax.device_count() > 1 else "",
        jax=jax.__version__,
        jaxlib=jaxlib.__version__,
        optax=optax.__version__,
        flax=flax.__version__,
        orbax_checkpoint=ocp.__version__ if ocp else None,
        python=platform.python_version(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        commit=git_commit(),
        preset="quick" if cfg.quick else "gpu",
        n_params=int(n_params),
        d_model=cfg.d_model,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        seq_len=cfg.seq_len,
        global_batch=cfg.batch,
        steps=cfg.steps,
        lr=cfg.lr,
        warmup=cfg.warmup,
        b1=B1,
        b2=B2,
        weight_decay=WEIGHT_DECAY,
        clip_global_norm=CLIP_NORM,
        impl=cfg.impl,
        matmul_precision=cfg.precision or "default",
        layouts=cfg.layouts,
        sharding=(
            "FSDP: every leaf's leading axis split over all mesh axes where it "
            "divides (else replicated); batch split likewise; parameters "
            "all-gathered in the loss (jax.sharding.reshard), explicit mesh axes"
        ),
        seed=cfg.seed,
        data=data_info,
        bytes_rtol=cfg.bytes_rtol,
        loss_rtol=cfg.loss_rtol,
        deadline_s=cfg.deadline_s,
        skipped=[],
    )


# --------------------------------------------------------------------------
# Main.
# --------------------------------------------------------------------------


def _csv_choice(p: argparse.ArgumentParser, flag: str, value: str, accepted) -> list:
    items = [s for s in value.split(",") if s]
    bad = [s for s in items if s not in accepted]
    if bad or not items:
        p.error(
            f"{flag}: got {value!r}; accepted: a comma-separated subset of "
            f"{', '.join(accepted)}."
        )
    return items


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; the preset (``--quick`` or gpu) fills the rest."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model: CPU, seconds")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    p.add_argument(
        "--layouts",
        default=None,
        help="comma-separated of 1,1d,2d; default 1,1d (and 2d on >= 4 devices)",
    )
    p.add_argument("--data", default="docs", help=f"one of {DATA_SOURCES}")
    p.add_argument("--data-dir", default=None, help="holds docs.npz (--data docs)")
    p.add_argument("--impl", default="auto", help=f"one of {IMPLS}")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=None, help="global batch")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--d-model", type=int, default=None)
    p.add_argument("--n-layers", type=int, default=None)
    p.add_argument("--n-heads", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--matmul-precision",
        default="auto",
        help="auto (bfloat16 on GPU), default, or a jax_default_matmul_precision",
    )
    p.add_argument(
        "--sgd-baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="count the all-gathers of a plain-SGD step of the model (one compile)",
    )
    p.add_argument("--bytes-rtol", type=float, default=0.01)
    p.add_argument(
        "--loss-rtol",
        type=float,
        default=0.01,
        help="the last tenth of the steps: mean loss vs 1 device (same_loss)",
    )
    p.add_argument("--deadline-s", type=float, default=None)
    p.add_argument("--out", default=None, help="the result JSON")
    p.add_argument("--merge", nargs="+", default=None, help="result JSONs to merge")
    cfg = p.parse_args(argv)
    if cfg.merge:
        return cfg
    if jax.process_count() > 1:
        p.error(
            f"runs in one process over its local devices, got "
            f"{jax.process_count()} processes (multi-host: README, Sharded training)."
        )
    cfg.optimizers = _csv_choice(p, "--optimizers", cfg.optimizers, OPTIMIZERS)
    if cfg.data not in DATA_SOURCES:
        p.error(f"--data: got {cfg.data!r}; accepted: {', '.join(DATA_SOURCES)}.")
    if cfg.impl not in IMPLS:
        p.error(f"--impl: got {cfg.impl!r}; accepted: {', '.join(IMPLS)}.")
    for key, value in PRESETS["quick" if cfg.quick else "gpu"].items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    n = jax.device_count()
    default_layouts = "1,1d,2d" if n >= 4 and n % 2 == 0 else "1,1d" if n > 1 else "1"
    cfg.layouts = _csv_choice(p, "--layouts", cfg.layouts or default_layouts, LAYOUTS)
    if "2d" in cfg.layouts and (n < 4 or n % 2):
        p.error(f"--layouts: '2d' needs an even number >= 4 of devices, have {n}.")
    for flag, value in (("--steps", cfg.steps), ("--batch", cfg.batch)):
        if value < 1:
            p.error(f"{flag}: got {value}; accepted: a positive integer.")
    if "--warmup" not in " ".join(argv if argv is not None else sys.argv):
        cfg.warmup = min(cfg.warmup, cfg.steps // 10)  # a preset's, for short runs
    if not 0 <= cfg.warmup < cfg.steps:
        p.error(f"--warmup: got {cfg.warmup}; accepted: 0 <= warmup < --steps.")
    if cfg.batch % n:
        p.error(f"--batch: got {cfg.batch}; accepted: a multiple of the {n} devices.")
    if cfg.deadline_s is not None and cfg.deadline_s <= 0:
        p.error(f"--deadline-s: got {cfg.deadline_s}; accepted: seconds > 0.")
    precision = cfg.matmul_precision
    if precision == "auto":
        precision = "bfloat16" if jax.default_backend() == "gpu" else None
    cfg.precision = None if precision == "default" else precision
    return cfg


def default_out(n_devices: int) -> pathlib.Path:
    """``$OUT`` (device machine) or ``benchmarks/results``, by platform and N."""
    name = f"sharded_training_{jax.default_backend()}{n_devices}.json"
    return pathlib.Path(os.environ.get("OUT") or RESULTS) / name


def run_benchmark(cfg: argparse.Namespace) -> dict[str, Any]:
    """Every optimizer on every layout; returns the result (meta, records)."""
    t_start = time.perf_counter()
    if cfg.precision:
        jax.config.update("jax_default_matmul_precision", cfg.precision)
    train, data_info = load_train_bytes(cfg.data, cfg.data_dir)
    batches = make_batches(train, cfg.steps, cfg.batch, cfg.seq_len, cfg.seed)
    graphdef, params0 = build_model(cfg)
    n_params = sum(x.size for x in jax.tree.leaves(params0))
    grads0 = same_gradients(params0, cfg.seed)
    devices = list(jax.devices())
    ctx = Context(cfg, graphdef, params0, batches, grads0, devices)
    meta = run_meta(cfg, data_info, n_params)
    print(
        f"{meta['device']} x{meta['n_devices']} ({meta['platform']}), JAX "
        f"{jax.__version__}; {n_params / 1e6:.2f}M params; {cfg.steps} steps x "
        f"{cfg.batch}x{cfg.seq_len} bytes; layouts {cfg.layouts}"
        + (f"\n  {EMULATED_NOTE}" if meta["emulated_devices"] else ""),
        flush=True,
    )
    records: list[dict] = []
    longest = 0.0
    for name in cfg.optimizers:
        elapsed = time.perf_counter() - t_start
        if cfg.deadline_s and records and elapsed + 1.1 * longest > cfg.deadline_s:
            print(f"skip {name}: deadline ({elapsed:.0f}s elapsed)", flush=True)
            meta["skipped"].append(name)
            continue
        t = time.perf_counter()
        records += run_optimizer(name, ctx, cfg.layouts)
        longest = max(longest, time.perf_counter() - t)
    add_relative_scaling(records)
    meta["total_s"] = time.perf_counter() - t_start
    return dict(meta=meta, records=records)


def merge(paths: Sequence[str]) -> dict[str, Any]:
    """Result JSONs of one configuration (optimizers split over calls) as one.

    An optimizer on a layout in several files (fp32 AdamW repeated in each
    call as the scaling reference) is kept from the first file.
    """
    parts = [json.loads(pathlib.Path(p).read_text()) for p in paths]
    keys = ("device", "n_devices", "n_params", "steps", "global_batch", "layouts")
    for part, path in zip(parts, paths, strict=True):
        for k in keys:
            if part["meta"].get(k) != parts[0]["meta"].get(k):
                raise ValueError(
                    f"{path}: meta {k}={part['meta'].get(k)!r} differs from "
                    f"{paths[0]}'s {parts[0]['meta'].get(k)!r}; merge only runs of "
                    "one configuration."
                )
    meta = dict(parts[0]["meta"], merged_from=list(paths))
    records, seen = [], set()
    for r in (r for part in parts for r in part["records"]):
        if (r["optimizer"], r["layout"]) not in seen:  # a repeated baseline: first
            seen.add((r["optimizer"], r["layout"]))
            records.append(r)
    done = {r["optimizer"] for r in records}
    meta["skipped"] = sorted(
        {s for part in parts for s in part["meta"]["skipped"]} - done
    )
    add_relative_scaling(records)
    return dict(meta=meta, records=records)


def main(argv: list[str] | None = None) -> int:
    """Runs (or merges), writes the JSON, prints the table; 1 if a check failed."""
    cfg = parse_args(argv)
    result = merge(cfg.merge) if cfg.merge else run_benchmark(cfg)
    out = pathlib.Path(cfg.out) if cfg.out else default_out(result["meta"]["n_devices"])
    result["failed_checks"] = failed_checks(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    print(f"wrote {out}")
    if result["failed_checks"]:
        print(f"FAILED: {result['failed_checks']}", flush=True)
        return 1
    print("all checks passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
