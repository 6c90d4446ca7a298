"""Long-horizon byte-level LM quality: every optimizer for 10k+ steps (issue 16).

The GPT of `benchmarks.models` (bytes in, bytes out) trained from scratch on the
Debian documentation corpus (`benchmarks.data.docs_bytes`, about 63 MB of
technical English; every 30th document held out), with fp32 AdamW and every
low-bit AdamW, on the same seeds, data order and schedule: linear warm-up then
cosine decay to 10% of ``--lr`` (6e-4), β1 0.9, **β2 0.999** (the long-run drift
of a re-encoded second moment shows at 0.999, not 0.95), weight decay 0.1 on
matrices, global-norm clipping at 1.0. Model, evaluation, schedule and
optimizers are `benchmarks.train_lm`'s; seeds train side by side (``jax.vmap``)
and ``--chunk`` steps run per jitted call (``lax.scan``).

Curves, so the gap to fp32 is seen over time, not only at the end:

* held-out loss every ``--eval-every`` steps (and at 25/50/75/100% of the run)
  on a fixed sample of ``--eval-windows`` windows of ``--seq-len`` + 1 bytes
  (small preset: 1024 x 128 = 131k predicted bytes, medium 512 x 256; the
  same windows for every optimizer and seed, so gaps are paired); the final
  loss on ``--eval-full`` windows (small 4096 x 128, medium 2048 x 256: 524k
  bytes, a quarter of the held-out split);
* train loss, the mean of each chunk of ``--chunk`` steps;
* shadow diagnostics (``--shadow``): beside the quantized moments, an fp32 Adam
  on the same clipped gradients for a sample of quantized leaves (up to
  ``--shadow-leaves`` leaves, up to ``--shadow-elements`` elements each, whole
  rows so the codec's groups stay whole), compared with the decoded state
  every ``--shadow-every`` steps: m (rms ratio, bias), v (median, p1, p99 of
  v̂/v; share below v/4 and above 4v), the Adam direction m/√v (rms ratio,
  cosine); by leaf kind (attention / mlp / other) and by the element's size
  relative to its group maximum (|m| / max|m|, v / max v over the codec's group
  along the last axis: >0.5, 0.1-0.5, 0.01-0.1, <0.01).

Goals of issue 16 (printed beside each row, never tuned for): held-out loss
within +0.5% of fp32 at the end for polar2, 8-bit and 4-bit (+1.0% for
polar1.5); the gap not growing over the last half (by more than 0.1 point);
final train loss within +1.0% (+2.0% for polar1.5); pi-Quant not diverging
(NaN/inf, or a held-out loss above 2x fp32's, is divergence).

Writes ``results/train_lm_long_<preset>.json`` (meta: device, versions, date,
commit, config; records; goals; runs with curves and shadow logs), after every
optimizer too, and a PNG; prints a table.

Usage::

    python -m benchmarks.data docs --out .devdata          # once, here
    python -m benchmarks.train_lm_long --smoke             # CPU, seconds
    python -m benchmarks.train_lm_long --preset small --data-dir .devdata \\
        --deadline-s 570                                   # one device call
    python -m benchmarks.train_lm_long --preset small --data-dir .devdata \\
        --optimizers piquant,adamw_4bit,adamw_8bit --out b.json
    python -m benchmarks.train_lm_long --merge a.json b.json --out all.json

``--data-dir`` reads ``docs.npz`` (`benchmarks.data.write_docs_devdata`: all the
held-out bytes and an evenly spread 40 MB of the training documents); without
it the full corpus comes from `benchmarks.data` (Debian packages, cached).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optax_lowbit as lowbit
from benchmarks import models, train_lm
from optax_lowbit.codecs import base
from optax_lowbit.transforms.adam import ScaleByAdamQuantizedState

RESULTS = train_lm.RESULTS

#: Priority order: under a deadline the tail is skipped (and said so).
LONG_OPTIMIZERS = (
    "adamw_fp32",
    "polar2",
    "polar1.5",
    "piquant",
    "adamw_4bit",
    "adamw_8bit",
)
#: Muon (issue 21; every ``muon_*`` name): its matrix leaves keep one momentum
#: and no second moment, so the shadow-Adam diagnostics do not apply (run with
#: ``--optimizers muon_fp32,muon_polar2,adamw_fp32``).
NO_SHADOW_PREFIX = "muon_"
# Names of this benchmark that `train_lm.make_optimizer` spells otherwise.
_TRAIN_LM_NAMES = {"piquant": "piquant_nearest"}  # lowbit.adamw_piquant defaults

#: The optimizer every gap is taken against (``--reference``).
REFERENCE = "adamw_fp32"
#: Goals: (held-out tolerance, train-loss tolerance) relative to fp32.
GOAL_TOLERANCES = {
    "polar2": (0.005, 0.01),
    "adamw_8bit": (0.005, 0.01),
    "adamw_4bit": (0.005, 0.01),
    "polar1.5": (0.01, 0.02),
}
#: Largest growth of the held-out gap over the last half (0.1 point).
GROWTH_TOLERANCE = 0.001
#: A held-out loss above this multiple of fp32's (or not finite) is divergence.
DIVERGED_RATIO = 2.0
#: Run fractions at which the held-out gap is reported.
QUARTERS = (0.25, 0.5, 0.75, 1.0)

#: Defaults of every preset (a preset or the command line overrides them).
COMMON = dict(
    lr=6e-4, eval_every=1000, shadow_every=500, shadow_leaves=4, shadow_elements=65536
)
PRESETS: dict[str, dict[str, Any]] = {
    # 25.5M parameters; 3 seeds x 8 x 128 bytes a step, 10k steps (10M bytes
    # a seed: no byte of the 40 MB device copy is seen twice).
    "small": dict(
        d_model=512,
        n_layers=8,
        n_heads=8,
        seeds="0,1,2",
        steps=10_000,
        batch=8,
        seq_len=128,
        warmup=500,
        chunk=250,
        eval_windows=1024,
        eval_full=4096,
        eval_batch=128,
        shadow=True,
    ),
    # 85.6M parameters; 1 seed x 8 x 256 bytes a step, 5k steps.
    "medium": dict(
        d_model=768,
        n_layers=12,
        n_heads=12,
        seeds="0",
        steps=5_000,
        batch=8,
        seq_len=256,
        warmup=250,
        chunk=250,
        eval_windows=512,
        eval_full=2048,
        eval_batch=64,
        shadow=False,
    ),
    # CPU tests: seconds.
    "smoke": dict(
        d_model=64,
        n_layers=2,
        n_heads=2,
        seeds="0,1",
        steps=40,
        batch=4,
        seq_len=64,
        warmup=4,
        chunk=10,
        eval_every=20,
        eval_windows=16,
        eval_full=32,
        eval_batch=16,
        lr=3e-3,
        shadow=True,
        shadow_every=20,
        shadow_elements=4096,
    ),
}


def make_optimizer(name: str, lr: Any, **kwargs: Any) -> optax.GradientTransformation:
    """`train_lm.make_optimizer` under this benchmark's names (``piquant``)."""
    return train_lm.make_optimizer(_TRAIN_LM_NAMES.get(name, name), lr, **kwargs)


# --------------------------------------------------------------------------
# Data.
# --------------------------------------------------------------------------


def load_docs(data_dir: str | None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Train and held-out uint8 bytes of the documentation corpus, and a note."""
    from benchmarks import data

    if data_dir:
        return data.load_docs_devdata(data_dir)
    train, heldout = data.docs_bytes("train"), data.docs_bytes("heldout")
    info = dict(source="benchmarks.data.docs_bytes (full corpus)")
    info.update(train_bytes=int(train.size), heldout_bytes=int(heldout.size))
    return train, heldout, info


# --------------------------------------------------------------------------
# Shadow fp32 Adam beside the quantized moments.
# --------------------------------------------------------------------------

#: Bins of an element's size relative to its group maximum: (label, lo, hi].
SIZE_BINS = (
    (">0.5", 0.5, math.inf),
    ("0.1-0.5", 0.1, 0.5),
    ("0.01-0.1", 0.01, 0.1),
    ("<0.01", -math.inf, 0.01),
)
#: Group size for binning plain (unquantized) moments, e.g. fp32 AdamW's.
PLAIN_GROUP_SIZE = 64
_M_KEYS = ("share", "m_rms", "m_bias", "dir_rms", "dir_cos")
_V_KEYS = ("share", "v_median", "v_p1", "v_p99", "v_below_quarter", "v_above_4x")
_V_KEYS += ("dir_rms",)
_ALL_KEYS = (*_M_KEYS, "v_median", "v_p1", "v_p99", "v_below_quarter", "v_above_4x")


@dataclasses.dataclass(frozen=True)
class ShadowLeaf:
    """A sampled parameter leaf: its path, kind and the rows kept.

    Attributes:
      key: `jax.tree_util.keystr` of the leaf's path in the parameter dict.
      kind: ``"attention"``, ``"mlp"`` or ``"other"``.
      shape: the leaf's shape (one seed).
      stride: every ``stride``-th row of the leaf reshaped to
        ``(-1, shape[-1])`` is kept (a strided slice, not a gather).
      rows: the number of rows kept.
    """

    key: str
    kind: str
    shape: tuple[int, ...]
    stride: int
    rows: int


def leaf_kind(key: str) -> str:
    """``attention``, ``mlp`` or ``other``, from a `models.TinyGPT` path."""
    if "'attn'" in key:
        return "attention"
    if "'fc'" in key or "'out'" in key or "mlp" in key:
        return "mlp"
    return "other"


def choose_shadow_leaves(
    params: Any, n_leaves: int, max_elements: int
) -> list[ShadowLeaf]:
    """Up to ``n_leaves`` leaves the default policy quantizes, kinds in turn.

    Kinds are taken in turn (attention, mlp, other), each preferring the
    middle block; of each leaf, every k-th whole row, at most ``max_elements``
    elements in all (the codecs group along the last axis).
    """
    policy = lowbit.policy.default()
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    by_kind: dict[str, list[tuple[int, str, Any]]] = {}
    blocks = [
        re.search(r"\['blocks'\]\[(\d+)\]", jax.tree_util.keystr(p)) for p, _ in flat
    ]
    mid = max((int(b.group(1)) for b in blocks if b), default=0) / 2
    for (path, leaf), block in zip(flat, blocks, strict=True):
        if not policy(path, leaf):
            continue
        key = jax.tree_util.keystr(path)
        distance = abs(int(block.group(1)) - mid) if block else 0
        by_kind.setdefault(leaf_kind(key), []).append((distance, key, leaf))
    queues = [
        sorted(by_kind.get(k, []), key=lambda t: t[:2])
        for k in ("attention", "mlp", "other")
    ]
    chosen = []
    while len(chosen) < n_leaves and any(queues):
        for q in queues:
            if q and len(chosen) < n_leaves:
                _, key, leaf = q.pop(0)
                shape = tuple(leaf.shape)
                n_rows = math.prod(shape[:-1])
                stride = -(-n_rows // max(1, max_elements // shape[-1]))
                rows = -(-n_rows // stride)
                chosen.append(ShadowLeaf(key, leaf_kind(key), shape, stride, rows))
    return chosen


def _flat_by_key(tree: Any) -> dict[str, Any]:
    flat = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, base.Packed)
    )[0]
    return {jax.tree_util.keystr(p): x for p, x in flat}


def _sample(x: jax.Array, leaf: ShadowLeaf) -> jax.Array:
    return x.reshape(-1, leaf.shape[-1])[:: leaf.stride]


def shadow_init(leaves: list[ShadowLeaf]) -> dict[str, tuple[jax.Array, jax.Array]]:
    """Zero fp32 ``(m, v)`` of each sampled leaf (one seed)."""
    return {
        leaf.key: (jnp.zeros((leaf.rows, leaf.shape[-1]), jnp.float32),) * 2
        for leaf in leaves
    }


def shadow_update(
    shadow: dict[str, tuple[jax.Array, jax.Array]],
    grads: Any,
    leaves: list[ShadowLeaf],
    *,
    b1: float,
    b2: float,
    clip_norm: float,
) -> dict[str, tuple[jax.Array, jax.Array]]:
    """fp32 Adam's moment update on the sampled rows of the clipped gradients."""
    clip = optax.clip_by_global_norm(clip_norm)
    clipped, _ = clip.update(grads, clip.init(grads))
    flat = _flat_by_key(clipped)
    out = {}
    for leaf in leaves:
        g = _sample(flat[leaf.key], leaf).astype(jnp.float32)
        m, v = shadow[leaf.key]
        out[leaf.key] = (b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g)
    return out


def find_adam_state(opt_state: Any) -> Any:
    """The (first) Adam state in an optimizer state: quantized or Optax's."""
    kinds = (ScaleByAdamQuantizedState, optax.ScaleByAdamState)
    for node in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, kinds)):
        if isinstance(node, kinds):
            return node
    raise ValueError("no Adam state (mu, nu) in the optimizer state.")


def _codec_of(moment: Any) -> tuple[str, int]:
    """A moment's codec name and group size (plain arrays: `PLAIN_GROUP_SIZE`)."""
    if isinstance(moment, base.Packed):
        return moment.codec_name, moment.codec.group_size
    return str(jnp.dtype(moment.dtype)), PLAIN_GROUP_SIZE


def _decoded(moment: Any, leaf: ShadowLeaf) -> jax.Array:
    """Sampled rows of a moment, decoded to float32."""
    if isinstance(moment, base.Packed):
        return _sample(moment.decode(), leaf)
    return _sample(moment.astype(jnp.float32), leaf)


def _group_relative(x: jax.Array, group_size: int) -> jax.Array:
    """``x / max(x)`` over each group of ``group_size`` along the last axis."""
    groups = base.to_groups(x, group_size)
    top = jnp.max(groups, axis=-1, keepdims=True)
    rel = jnp.where(top > 0, groups / jnp.where(top > 0, top, 1.0), 0.0)
    return base.from_groups(rel, x.shape)


def _quantiles(
    sorted_values: jax.Array, sorted_mask: jax.Array, qs: tuple[float, ...]
) -> list[jax.Array]:
    """Nearest-rank quantiles of the masked part of an already sorted array.

    One sort serves every mask (a cumulative count finds the rank), so the
    statistics of many bins compile to a small program.
    """
    count = jnp.cumsum(sorted_mask.astype(jnp.int32))
    n = count[-1]
    out = []
    for q in qs:
        rank = jnp.maximum(1, jnp.ceil(q * n)).astype(jnp.int32)
        value = sorted_values[jnp.argmax(count >= rank)]
        out.append(jnp.where(n > 0, value, jnp.nan))
    return out


def _stats(
    a: dict[str, jax.Array], mask: jax.Array, keys: tuple[str, ...]
) -> dict[str, jax.Array]:
    """Decoded-vs-shadow statistics ``keys`` over the elements where ``mask``.

    ``a`` holds the decoded (``mh``, ``vh``, ``dh``) and shadow (``m``, ``v``,
    ``d``) values, ``order``: the argsort of ``ratio`` (v̂/v; +inf where v is 0).
    """
    w = mask.astype(jnp.float32)
    m2, d2, dh2 = (jnp.sum(w * x) for x in (a["m"] ** 2, a["d"] ** 2, a["dh"] ** 2))
    valid = mask & (a["v"] > 0)
    n_valid = jnp.sum(valid)
    out = dict(
        share=lambda: jnp.mean(w),
        m_rms=lambda: jnp.sqrt(jnp.sum(w * a["mh"] ** 2) / m2),
        m_bias=lambda: jnp.sum(w * a["mh"] * a["m"]) / m2,
        v_below_quarter=lambda: jnp.sum(valid & (a["vh"] < a["v"] / 4)) / n_valid,
        v_above_4x=lambda: jnp.sum(valid & (a["vh"] > 4 * a["v"])) / n_valid,
        dir_rms=lambda: jnp.sqrt(dh2 / d2),
        dir_cos=lambda: jnp.sum(w * a["dh"] * a["d"]) / jnp.sqrt(dh2 * d2),
    )
    stats = {k: out[k]() for k in keys if k in out}
    if any(k.startswith("v_p") or k == "v_median" for k in keys):
        p1, p50, p99 = _quantiles(
            a["ratio"][a["order"]], valid[a["order"]], (0.01, 0.5, 0.99)
        )
        stats.update(v_p1=p1, v_median=p50, v_p99=p99)
    return {k: stats[k] for k in keys}


def shadow_codecs(leaves: list[ShadowLeaf], opt_state: Any) -> dict[str, Any]:
    """Each sampled leaf's kind, shape, rows and (m, v) codec and group size."""
    adam = find_adam_state(opt_state)
    mu, nu = _flat_by_key(adam.mu), _flat_by_key(adam.nu)
    out = {}
    for leaf in leaves:
        (m_codec, m_group), (v_codec, v_group) = map(
            _codec_of, (mu[leaf.key], nu[leaf.key])
        )
        out[leaf.key] = dict(
            kind=leaf.kind,
            shape=list(leaf.shape),
            rows=leaf.rows,
            m_codec=m_codec,
            m_group=m_group,
            v_codec=v_codec,
            v_group=v_group,
        )
    return out


@functools.partial(jax.jit, static_argnames=("kinds", "b1", "b2", "eps"))
def shadow_summary(
    a: dict[str, jax.Array],
    count: jax.Array,
    *,
    kinds: tuple[tuple[str, int], ...],
    b1: float,
    b2: float,
    eps: float,
) -> dict[str, Any]:
    """The statistics of `make_shadow_stats` from flat per-element arrays.

    ``a`` holds ``mh``, ``vh`` (decoded), ``m``, ``v`` (shadow), ``rm``, ``rv``
    (shadow |m| and v over their group maxima), every sampled element of every
    seed; ``kinds`` the ``(kind, elements)`` runs of that flat layout. It does
    not depend on the codecs, so it compiles once for every optimizer.
    """
    a = dict(a)
    bc1, bc2 = 1 - b1**count, 1 - b2**count
    a["d"] = (a["m"] / bc1) / (jnp.sqrt(a["v"] / bc2) + eps)
    a["dh"] = (a["mh"] / bc1) / (jnp.sqrt(jnp.maximum(a["vh"], 0) / bc2) + eps)
    positive = a["v"] > 0
    a["ratio"] = jnp.where(positive, a["vh"] / jnp.where(positive, a["v"], 1), jnp.inf)
    a["order"] = jnp.argsort(a["ratio"])
    kind_of = np.concatenate([np.full(n, kind) for kind, n in kinds])
    return {
        "all": _stats(a, jnp.ones(kind_of.shape, bool), _ALL_KEYS),
        "by_kind": {
            kind: _stats(a, jnp.asarray(kind_of == kind), _ALL_KEYS)
            for kind in sorted(set(kind_of))
        },
        "m_bins": {
            label: _stats(a, (a["rm"] > lo) & (a["rm"] <= hi), _M_KEYS)
            for label, lo, hi in SIZE_BINS
        },
        "v_bins": {
            label: _stats(a, (a["rv"] > lo) & (a["rv"] <= hi), _V_KEYS)
            for label, lo, hi in SIZE_BINS
        },
    }


def make_shadow_stats(
    leaves: list[ShadowLeaf], *, b1: float, b2: float, eps: float = 1e-8
) -> Callable[[Any, Any, int], dict[str, Any]]:
    """``stats(opt_state, shadow, count)`` over stacked seeds, as plain floats.

    ``stats["all"]``: every statistic over all sampled elements of every
    seed; ``stats["by_kind"][kind]``: the same per leaf kind (`leaf_kind`);
    ``stats["m_bins"][bin]``: m and direction statistics by |shadow m| / its
    group max; ``stats["v_bins"][bin]``: v and direction statistics by shadow
    v / its group max (`SIZE_BINS`; the group is the codec's, along the last
    axis). The direction is Adam's
    ``(m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)`` for both.
    """

    def per_seed(opt_state: Any, shadow: Any) -> dict[str, dict[str, jax.Array]]:
        adam = find_adam_state(opt_state)
        mu, nu = _flat_by_key(adam.mu), _flat_by_key(adam.nu)
        out = {}
        for leaf in leaves:
            m, v = shadow[leaf.key]
            out[leaf.key] = dict(
                mh=_decoded(mu[leaf.key], leaf),
                vh=_decoded(nu[leaf.key], leaf),
                m=m,
                v=v,
                rm=_group_relative(jnp.abs(m), _codec_of(mu[leaf.key])[1]),
                rv=_group_relative(v, _codec_of(nu[leaf.key])[1]),
            )
        return out

    @jax.jit
    def flat(opt_state: Any, shadow: Any) -> dict[str, jax.Array]:
        per_leaf = jax.vmap(per_seed)(opt_state, shadow)  # decodes: per codec
        return {
            f: jnp.concatenate([per_leaf[lf.key][f].ravel() for lf in leaves])
            for f in ("mh", "vh", "m", "v", "rm", "rv")
        }

    def run(opt_state: Any, shadow: Any, count: int) -> dict[str, Any]:
        n_seeds = jax.tree.leaves(shadow)[0].shape[0]
        kinds = tuple((lf.kind, n_seeds * lf.rows * lf.shape[-1]) for lf in leaves)
        raw = shadow_summary(
            flat(opt_state, shadow),
            jnp.float32(count),
            kinds=kinds,
            b1=b1,
            b2=b2,
            eps=eps,
        )
        raw = jax.device_get(raw)
        return jax.tree.map(lambda x: float(x) if np.isfinite(x) else None, raw)

    return run


# --------------------------------------------------------------------------
# Training.
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Context:
    """What every optimizer's run shares: data, model, evaluation, clock."""

    cfg: argparse.Namespace
    graphdef: Any
    params0: Any
    train_tok: jax.Array
    starts: jax.Array  # (n_chunks, chunk, seeds, batch) window starts
    eval_small: jax.Array
    eval_full: jax.Array
    evaluate: Callable[[Any, jax.Array], jax.Array]
    eval_steps: list[int]
    shadow_leaves: list[ShadowLeaf]
    t_start: float
    log: Callable[[str], None] = print
    #: Called after the first chunk: ``(name, chunk_s, compile_s, eval_s)``.
    estimate: Callable[[str, float, float, float], None] | None = None

    def elapsed(self) -> float:
        """Seconds since the benchmark started."""
        return time.perf_counter() - self.t_start


def eval_schedule(steps: int, chunk: int, every: int) -> list[int]:
    """Held-out points: every ``every`` steps and at `QUARTERS` (on chunks)."""
    points = set(range(every, steps + 1, every))
    points |= {max(chunk, round(q * steps / chunk) * chunk) for q in QUARTERS}
    return sorted(p for p in points if p % chunk == 0 and p <= steps)


def run_optimizer(name: str, ctx: Context) -> dict[str, Any]:
    """Trains every seed with optimizer ``name``; returns curves and metrics.

    Stops early (and says so in ``stopped``) when every seed's loss is not
    finite, or when the deadline would pass before the next chunk and the
    final evaluation.
    """
    cfg = ctx.cfg
    tx = make_optimizer(
        name, train_lm.schedule(cfg), b1=cfg.b1, b2=cfg.b2, wd=cfg.wd, peak_lr=cfg.lr
    )
    window = cfg.seq_len + 1
    one = jax.tree.map(lambda x: x[0], ctx.params0)
    n_params = sum(x.size for x in jax.tree.leaves(one))
    state_bpp = lowbit.state_bytes(jax.eval_shape(tx.init, one)) / n_params
    leaves = [] if name.startswith(NO_SHADOW_PREFIX) else ctx.shadow_leaves
    train_tok = ctx.train_tok

    def loss_of(params: Any, tokens: jax.Array) -> jax.Array:
        return models.loss_fn(nnx.merge(ctx.graphdef, params), tokens)

    def step(params, opt_state, shadow, starts):
        tokens = train_tok[starts[:, None] + jnp.arange(window)].astype(jnp.int32)
        loss, grads = jax.value_and_grad(loss_of)(params, tokens)
        updates, opt_state = tx.update(grads, opt_state, params)
        if leaves:
            shadow = shadow_update(
                shadow, grads, leaves, b1=cfg.b1, b2=cfg.b2, clip_norm=1.0
            )
        return optax.apply_updates(params, updates), opt_state, shadow, loss

    vstep = jax.vmap(step)  # over seeds

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def train_chunk(params, opt_state, shadow, starts):  # starts: (chunk, seeds, b)
        def body(carry, s):
            p, o, sh, loss = vstep(*carry, s)
            return (p, o, sh), loss

        carry, losses = jax.lax.scan(body, (params, opt_state, shadow), starts)
        return (*carry, losses.mean(axis=0))

    # Eager (not jitted) init: XLA would constant-fold codebook searches.
    opt_state = jax.vmap(tx.init)(ctx.params0)
    params = jax.tree.map(jnp.copy, ctx.params0)
    shadow = jax.vmap(lambda _: shadow_init(leaves))(jnp.arange(len(cfg.seed_list)))
    shadow_stats = make_shadow_stats(leaves, b1=cfg.b1, b2=cfg.b2) if leaves else None

    t0 = time.perf_counter()
    compiled = train_chunk.lower(params, opt_state, shadow, ctx.starts[0]).compile()
    compile_s = time.perf_counter() - t0

    codecs = shadow_codecs(leaves, opt_state) if leaves else None
    eval_steps, eval_curve, train_curve, shadow_log = [0], [], [], []
    t = time.perf_counter()
    eval_curve.append(np.asarray(ctx.evaluate(params, ctx.eval_small)).tolist())
    eval_s = [time.perf_counter() - t]
    full_per_small = ctx.eval_full.shape[0] / ctx.eval_small.shape[0]
    chunk_s, wall, stopped = [], 0.0, None
    n_chunks = cfg.steps // cfg.chunk
    for c in range(n_chunks):
        if cfg.deadline_s and chunk_s:
            # The next chunk, an evaluation, the final one, writing: 10 s.
            need = max(chunk_s) + (1 + full_per_small) * max(eval_s) + 10.0
            if ctx.elapsed() + need > cfg.deadline_s:
                stopped = f"deadline: stopped after {c * cfg.chunk} steps"
                ctx.log(f"  {name}: {stopped}")
                break
        t = time.perf_counter()
        params, opt_state, shadow, losses = compiled(
            params, opt_state, shadow, ctx.starts[c]
        )
        losses = np.asarray(losses)  # waits for the chunk
        dt = time.perf_counter() - t
        chunk_s.append(dt)
        wall += dt
        train_curve.append(losses.tolist())
        done = (c + 1) * cfg.chunk
        if ctx.estimate is not None and c == 0:
            ctx.estimate(name, dt, compile_s, eval_s[0])
        if leaves and (done % cfg.shadow_every == 0 or c == n_chunks - 1):
            shadow_log.append(dict(step=done, **shadow_stats(opt_state, shadow, done)))
        if done in ctx.eval_steps:
            t = time.perf_counter()
            ev = np.asarray(ctx.evaluate(params, ctx.eval_small))
            eval_s.append(time.perf_counter() - t)
            eval_steps.append(done)
            eval_curve.append(ev.tolist())
            filled = round(20 * done / cfg.steps)
            shadow_note = ""
            if shadow_log and shadow_log[-1]["step"] == done:
                s = shadow_log[-1]["all"]
                shadow_note = f"  v̂/v med {s['v_median']}  dir rms {s['dir_rms']}"
                shadow_note = re.sub(r"(\d\.\d{3})\d+", r"\1", shadow_note)
            ctx.log(
                f"  {name:10s} [{'#' * filled}{'.' * (20 - filled)}] "
                f"step {done:6d}/{cfg.steps}  train {losses.mean():.4f}"
                f"  heldout {ev.mean():.4f}  ({wall:.0f}s){shadow_note}"
            )
        if not np.any(np.isfinite(losses)):
            stopped = f"diverged: every seed's loss is not finite at step {done}"
            ctx.log(f"  {name}: {stopped}")
            break
    t = time.perf_counter()
    final = np.asarray(ctx.evaluate(params, ctx.eval_full))
    eval_s.append(time.perf_counter() - t)
    timed = chunk_s[1:] if len(chunk_s) > 1 else chunk_s
    return dict(
        optimizer=name,
        final_heldout=final.tolist(),
        finite=bool(np.all(np.isfinite(final))),
        steps_done=len(chunk_s) * cfg.chunk,
        stopped=stopped,
        state_bytes_per_param=state_bpp,
        n_params=int(n_params),
        step_ms_all_seeds=1e3 * float(np.median(timed)) / cfg.chunk if timed else None,
        compile_s=compile_s,
        train_s=wall,
        eval_s=float(sum(eval_s)),
        curve=dict(
            eval_steps=eval_steps,
            heldout=eval_curve,  # [point][seed], the fixed held-out sample
            train_steps=[cfg.chunk * (i + 1) for i in range(len(train_curve))],
            train=train_curve,  # [chunk][seed], mean over the chunk
        ),
        shadow=dict(leaves=codecs, log=shadow_log) if leaves else None,
        params=params,  # popped by `main` (--save-params), never in the JSON
    )


# --------------------------------------------------------------------------
# Evaluation of the runs against fp32.
# --------------------------------------------------------------------------


def _at(steps: list[int], values: np.ndarray, target: float) -> np.ndarray:
    """``values`` ([point][seed]) at the point nearest ``target`` steps."""
    i = int(np.argmin(np.abs(np.asarray(steps) - target)))
    return values[i]


def _gap_curve(run: dict, base: dict) -> tuple[list[int], np.ndarray]:
    """Paired held-out gap ``loss / fp32 - 1`` [point][seed] on common steps."""
    a, b = run["curve"], base["curve"]
    common = [s for s in a["eval_steps"] if s in b["eval_steps"]]
    x = np.asarray([a["heldout"][a["eval_steps"].index(s)] for s in common], float)
    y = np.asarray([b["heldout"][b["eval_steps"].index(s)] for s in common], float)
    return common, x / y - 1.0


def _final_train(run: dict, steps: int) -> np.ndarray:
    """Per-seed train loss over the last 5% of the run (whole chunks)."""
    train = np.asarray(run["curve"]["train"], float)
    at = np.asarray(run["curve"]["train_steps"])
    last = at > 0.95 * steps
    return train[last].mean(axis=0) if last.any() else train[-1:].mean(axis=0)


def reference_of(meta: dict[str, Any]) -> str:
    """The optimizer a result's gaps are taken against (older files: fp32 AdamW)."""
    return meta.get("reference", REFERENCE)


def long_metrics(
    runs: list[dict], steps: int, reference: str = REFERENCE
) -> dict[str, dict[str, Any]]:
    """Per optimizer: gaps to ``reference`` over time, final train gap, divergence."""
    base = next((r for r in runs if r["optimizer"] == reference), None)
    out = {}
    for r in runs:
        heldout = np.asarray(r["curve"]["heldout"], float)
        final = np.asarray(r["final_heldout"], float)
        m: dict[str, Any] = dict(steps_done=r["steps_done"], stopped=r["stopped"])
        diverged = not (np.all(np.isfinite(heldout)) and np.all(np.isfinite(final)))
        if base is not None and r is not base:
            common, gap = _gap_curve(r, base)
            m["gap_steps"] = common
            m["gap_mean"] = np.mean(gap, axis=1).tolist()
            m["gap_std"] = np.std(gap, axis=1).tolist()
            at = {  # None where the run (or fp32's) stopped before q
                q: float(np.mean(_at(common, gap, q * steps)))
                if common and common[-1] >= q * steps
                else None
                for q in QUARTERS
            }
            m["heldout_gap_at"] = {f"{round(100 * q)}%": v for q, v in at.items()}
            half, end = at[0.5], at[1.0]
            m["gap_growth_last_half"] = None if None in (half, end) else end - half
            fb = np.asarray(base["final_heldout"], float)
            complete = r["steps_done"] == base["steps_done"] == steps
            m["heldout_gap"] = float(final.mean() / fb.mean() - 1) if complete else None
            m["heldout_gap_per_seed"] = (final / fb - 1).tolist() if complete else None
            tr, tb = _final_train(r, steps), _final_train(base, steps)
            m["train_gap"] = float(tr.mean() / tb.mean() - 1) if complete else None
            diverged |= bool(
                np.any(~np.isfinite(gap)) or np.any(gap + 1 > DIVERGED_RATIO)
            )
            diverged |= complete and bool(np.any(final > DIVERGED_RATIO * fb))
        m["final_train"] = _final_train(r, steps).tolist()
        m["diverged"] = bool(diverged)
        out[r["optimizer"]] = m
    return out


def goals(metrics: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Issue 16's goals per optimizer (values, tolerances, met)."""
    out = {}
    for name, m in metrics.items():
        if "heldout_gap" not in m:  # fp32 itself, or no fp32 run to compare
            continue
        g: dict[str, Any] = {"not_diverged": dict(met=not m["diverged"])}
        if name in GOAL_TOLERANCES:
            held, train = GOAL_TOLERANCES[name]
            for goal, key, tol in (
                ("heldout", "heldout_gap", held),
                ("no_growth", "gap_growth_last_half", GROWTH_TOLERANCE),
                ("train", "train_gap", train),
            ):
                value = m[key]  # None: the run did not finish (see "stopped")
                met = None if value is None else (not m["diverged"] and value <= tol)
                g[goal] = dict(value=value, tolerance=tol, met=met)
        out[name] = g
    return out


def summarize(result: dict[str, Any]) -> None:
    """Fills ``records``, ``metrics`` and ``goals`` from ``runs`` (in place)."""
    meta, runs = result["meta"], result["runs"]
    order = {n: i for i, n in enumerate(LONG_OPTIMIZERS)}
    runs.sort(key=lambda r: order.get(r["optimizer"], len(order)))
    result["records"] = train_lm.records_of(runs, meta["seeds"], meta["device"])
    result["metrics"] = long_metrics(runs, meta["steps"], reference_of(meta))
    result["goals"] = goals(result["metrics"])


def _pct(x: float | None, width: int = 7) -> str:
    return f"{'n/a':>{width}s}" if x is None else f"{100 * x:+{width}.2f}"


def table(result: dict[str, Any]) -> str:
    """The plain-text table: one row per optimizer, goals beside it."""
    head = (
        f"{'optimizer':18s} {'held-out':>16s} {'gap %':>7s} "
        + " ".join(f"{'@' + k:>6s}" for k in ("25%", "50%", "75%", "100%"))
        + f" {'Δ½ pp':>6s} {'train %':>7s} {'B/param':>7s} {'ms/step':>7s}  goals"
    )
    lines = [head]
    for rec in result["records"]:
        name = rec["optimizer"]
        m = result["metrics"][name]
        at = m.get("heldout_gap_at", {})
        quarters = " ".join(_pct(at.get(k), 6) for k in ("25%", "50%", "75%", "100%"))
        g = result["goals"].get(name, {})
        word = {True: "ok", False: "NO", None: "n/a"}
        marks = " ".join(f"{k}:{word[v['met']]}" for k, v in g.items())
        if m["diverged"]:
            marks = "DIVERGED " + marks
        if m["stopped"]:
            marks += f" [{m['stopped']}]"
        step_ms = rec["step_ms"]
        lines.append(
            f"{name:18s} {rec['mean']:7.4f} ± {rec['std']:6.4f} "
            f"{_pct(m.get('heldout_gap'))} {quarters} "
            f"{_pct(m.get('gap_growth_last_half'), 6)} {_pct(m.get('train_gap'))} "
            f"{rec['state_bytes_per_param']:7.3f} "
            f"{'n/a' if step_ms is None else f'{step_ms:7.2f}':>7s}  {marks}"
        )
    reference = reference_of(result["meta"])
    lines.append(
        f"gap %: final held-out vs {reference} (paired seeds); @q: curve sample; "
        "Δ½ pp: gap growth over the last half (points); goals: heldout <= +0.5% "
        "(+1.0% 1.5-bit), no_growth <= +0.1 pp, train <= +1.0% (+2.0% 1.5-bit)"
    )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: pathlib.Path) -> None:
    """Held-out and train gaps to fp32 over steps; shadow v̂/v and direction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    (ax_gap, ax_train), (ax_v, ax_d) = axes
    reference = reference_of(result["meta"])
    base = next((r for r in result["runs"] if r["optimizer"] == reference), None)
    has_shadow = False
    for i, r in enumerate(result["runs"]):
        style = dict(label=r["optimizer"], color=f"C{i % 10}")
        m = result["metrics"][r["optimizer"]]
        if "gap_steps" in m:
            x = np.asarray(m["gap_steps"])
            y, s = 100 * np.asarray(m["gap_mean"]), 100 * np.asarray(m["gap_std"])
            ax_gap.plot(x, y, marker=".", **style)
            ax_gap.fill_between(x, y - s, y + s, color=style["color"], alpha=0.15)
        if base is not None and r is not base:
            a, b = np.asarray(r["curve"]["train"]), np.asarray(base["curve"]["train"])
            n = min(len(a), len(b))
            if n:
                ratio = a[:n].mean(axis=1) / b[:n].mean(axis=1) - 1
                ax_train.plot(r["curve"]["train_steps"][:n], 100 * ratio, **style)
        if r.get("shadow") and r["shadow"]["log"]:
            steps = [e["step"] for e in r["shadow"]["log"]]
            has_shadow = True
            for ax, key in ((ax_v, "v_median"), (ax_d, "dir_rms")):
                ys = [e["all"][key] for e in r["shadow"]["log"]]
                ys = [np.nan if y is None else y for y in ys]
                ax.plot(steps, ys, marker=".", **style)
    for ax in (ax_gap, ax_train):
        ax.axhline(0, color="k", lw=0.8)
    ax_gap.axhline(0.5, color="grey", ls=":", lw=0.8)
    m = result["meta"]
    titles = (
        (ax_gap, f"held-out loss gap to {reference} (%), mean ± std of paired seeds"),
        (ax_train, f"train loss gap to {reference} (%), {m['chunk']}-step means"),
        (ax_v, "shadow: median v̂ / v (decoded vs fp32 Adam, sampled leaves)"),
        (ax_d, "shadow: rms ratio of the Adam direction m/√v"),
    )
    for ax, title in titles:
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in (ax_v, ax_d):
        ax.axhline(1, color="k", lw=0.8)
        if not has_shadow:
            ax.text(
                0.5,
                0.5,
                "no shadow log (--shadow off)",
                ha="center",
                transform=ax.transAxes,
            )
    if ax_gap.get_legend_handles_labels()[0]:
        ax_gap.legend(fontsize=8)
    fig.suptitle(
        f"Byte-level GPT {m['n_params'] / 1e6:.1f}M params on Debian docs, "
        f"{m['steps']} steps x {m['batch']}x{m['seq_len']} bytes, "
        f"{len(m['seeds'])} seed(s), b2 {m['b2']}, {m['device']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict[str, Any], out_json: pathlib.Path, out_png: pathlib.Path | None):
    """Summarizes, then writes the JSON (and the PNG where matplotlib is there)."""
    summarize(result)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=1))
    if out_png is not None and result["runs"]:
        try:
            plot(result, out_png)
        except ImportError:
            print("matplotlib missing: no plot", file=sys.stderr)


def merge(paths: list[str]) -> dict[str, Any]:
    """One result from the JSONs of runs of the same settings (`train_lm.resume`).

    Each file adds the optimizers not yet there, and replaces a run that
    stopped early (deadline) by a complete one. Settings that shape the
    numbers must match, else ValueError.
    """
    result = json.loads(pathlib.Path(paths[0]).read_text())
    meta, runs = result["meta"], result["runs"]
    steps = meta["steps"]

    def part(m: dict, rs: list[dict]) -> dict[str, Any]:  # provenance of a file
        keys = ("optax_lowbit_commit", "date", "device", "jax")
        return {
            **{k: m.get(k) for k in keys},
            "optimizers": [r["optimizer"] for r in rs],
        }

    parts = meta.get("parts") or [part(meta, runs)]
    for path in paths[1:]:
        other = json.loads(pathlib.Path(path).read_text())
        parts.append(part(other["meta"], other["runs"]))
        complete = {r["optimizer"] for r in other["runs"] if r["steps_done"] == steps}
        runs[:] = [
            r
            for r in runs
            if r["steps_done"] == steps or r["optimizer"] not in complete
        ]
        have = {r["optimizer"] for r in runs}
        names = [r["optimizer"] for r in other["runs"] if r["optimizer"] not in have]
        train_lm.resume(path, meta, runs, names)
        meta["total_s"] = (meta.get("total_s") or 0) + (
            other["meta"].get("total_s") or 0
        )
    meta["parts"] = parts  # each file's commit and optimizers, in merge order
    have = {r["optimizer"] for r in runs}
    meta["skipped"] = [n for n in meta.get("skipped", []) if n not in have]
    meta["skip_reasons"] = {
        k: v for k, v in meta.get("skip_reasons", {}).items() if k not in have
    }
    return result


# --------------------------------------------------------------------------
# Main.
# --------------------------------------------------------------------------


def git_commit() -> str:
    """``$OPTAX_LOWBIT_COMMIT``, else ``git rev-parse HEAD`` (+dirty), else unknown."""
    if os.environ.get("OPTAX_LOWBIT_COMMIT"):
        return os.environ["OPTAX_LOWBIT_COMMIT"]
    root = pathlib.Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "-uno"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git; set OPTAX_LOWBIT_COMMIT)"
    return head + ("+dirty" if dirty else "")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; presets fill what is not given."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=("small", "medium"), default="small")
    p.add_argument("--smoke", action="store_true", help="tiny model, CPU, seconds")
    p.add_argument("--data-dir", default=None, help="holds docs.npz (see the doc)")
    p.add_argument(
        "--out", default=None, help="default results/train_lm_long_<preset>.json"
    )
    p.add_argument("--png", default=None, help="default: --out with .png")
    train_lm.add_training_args(
        p,
        optimizers=LONG_OPTIMIZERS,
        seeds=None,
        steps=None,
        batch=None,
        seq_len=None,
        lr=None,
        warmup=None,
        wd=0.1,
        eval_windows=None,
        eval_full=None,
        eval_batch=None,
    )
    p.set_defaults(b2=0.999, chunk=None, eval_every=None)
    p.add_argument("--d-model", type=int, default=None)
    p.add_argument("--n-layers", type=int, default=None)
    p.add_argument("--n-heads", type=int, default=None)
    p.add_argument("--shadow", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--shadow-every", type=int, default=None, help="default 500")
    p.add_argument("--shadow-leaves", type=int, default=None, help="default 4")
    p.add_argument(
        "--shadow-elements", type=int, default=None, help="per leaf; default 65536"
    )
    p.add_argument("--merge", nargs="+", default=None, help="result JSONs to merge")
    p.add_argument(
        "--save-params",
        default=None,
        help="write the first optimizer's first-seed model here (.npz, "
        "models.load_tinygpt reads it: IMPQ's fp32-trained second model)",
    )
    p.add_argument(
        "--reference",
        default=None,
        help="the optimizer the gaps are taken against (default adamw_fp32, or "
        "with --merge the first file's; muon_fp32 for the Muon runs)",
    )
    p.add_argument("--plot-only", default=None, help="re-plot a result JSON")
    cfg = p.parse_args(argv)
    preset = "smoke" if cfg.smoke else cfg.preset
    cfg.preset = preset
    for key, value in {**COMMON, **PRESETS[preset]}.items():
        if getattr(cfg, key) is None:  # not given on the command line
            setattr(cfg, key, value)
    if cfg.out is None:
        cfg.out = str(RESULTS / f"train_lm_long_{preset}.json")
    if not (cfg.merge or cfg.plot_only):
        if cfg.steps % cfg.chunk or cfg.eval_every % cfg.chunk:
            p.error("--steps and --eval-every must be multiples of --chunk.")
        if cfg.shadow and cfg.shadow_every % cfg.chunk:
            p.error("--shadow-every must be a multiple of --chunk.")
    return cfg


def _finish(result: dict[str, Any], cfg: argparse.Namespace) -> dict[str, Any]:
    out_json = pathlib.Path(cfg.out)
    write(
        result,
        out_json,
        pathlib.Path(cfg.png) if cfg.png else out_json.with_suffix(".png"),
    )
    print(table(result))
    print(json.dumps(result["goals"]))
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs (or merges, or re-plots) the benchmark; returns the result dict."""
    cfg = parse_args(argv)
    if cfg.plot_only:
        return _finish(json.loads(pathlib.Path(cfg.plot_only).read_text()), cfg)
    if cfg.merge:
        merged = merge(cfg.merge)
        if cfg.reference is not None:
            merged["meta"]["reference"] = cfg.reference
        return _finish(merged, cfg)
    t_start = time.perf_counter()
    as_train_lm = argparse.Namespace(**vars(cfg))
    as_train_lm.optimizers = ",".join(
        _TRAIN_LM_NAMES.get(n, n) for n in cfg.optimizers.split(",") if n
    )
    precision, device, seeds, _ = train_lm.setup(as_train_lm)
    names = [n for n in cfg.optimizers.split(",") if n]
    cfg.seed_list = seeds

    train_np, heldout_np, data_info = load_docs(cfg.data_dir)
    window = cfg.seq_len + 1
    eval_small = train_lm.heldout_windows(heldout_np, window, cfg.eval_windows)
    eval_full = train_lm.heldout_windows(heldout_np, window, cfg.eval_full)
    cut = lambda w: w[: len(w) // cfg.eval_batch * cfg.eval_batch]  # noqa: E731
    eval_small, eval_full = jnp.asarray(cut(eval_small)), jnp.asarray(cut(eval_full))
    offsets = np.stack(
        [
            train_lm.train_offsets(train_np.size, cfg.steps, cfg.batch, window, s)
            for s in seeds
        ],
        axis=1,
    )  # (steps, seeds, batch)
    n_chunks = cfg.steps // cfg.chunk
    graphdef, params0 = train_lm.build(cfg, seeds)
    one = jax.tree.map(lambda x: x[0], params0)
    n_params = sum(x.size for x in jax.tree.leaves(one))
    leaves = (
        choose_shadow_leaves(one, cfg.shadow_leaves, cfg.shadow_elements)
        if cfg.shadow
        else []
    )
    evaluate = train_lm.make_evaluate(graphdef, cfg)
    t = time.perf_counter()
    jax.block_until_ready(evaluate(params0, eval_small))
    jax.block_until_ready(evaluate(params0, eval_full))
    print(f"eval compiled in {time.perf_counter() - t:.1f}s", flush=True)

    eval_steps = eval_schedule(cfg.steps, cfg.chunk, cfg.eval_every)
    meta = dict(
        benchmark="train_lm_long",
        preset=cfg.preset,
        **train_lm.run_meta(cfg, device, n_params, seeds, precision),
        optax_lowbit_commit=git_commit(),
        eval_steps=[0, *eval_steps],
        eval_windows_curve=int(eval_small.shape[0]),
        eval_tokens_curve=int(eval_small.shape[0] * cfg.seq_len),
        eval_windows_final=int(eval_full.shape[0]),
        eval_tokens_final=int(eval_full.shape[0] * cfg.seq_len),
        data=data_info,
        heldout="every 30th document of the sorted Debian documentation corpus",
        optimizer_names={n: _TRAIN_LM_NAMES.get(n, n) for n in names},
        reference=cfg.reference or REFERENCE,
        shadow=dict(
            every=cfg.shadow_every,
            leaves=[dataclasses.asdict(lf) for lf in leaves],
            size_bins=[b[0] for b in SIZE_BINS],
            plain_group_size=PLAIN_GROUP_SIZE,
        )
        if leaves
        else None,
        smoke=cfg.smoke,
        deadline_s=cfg.deadline_s,
        skipped=[],
        skip_reasons={},
    )
    print(
        f"{device}, JAX {jax.__version__}; {n_params / 1e6:.2f}M params; seeds "
        f"{seeds}; {cfg.steps} steps x {cfg.batch}x{cfg.seq_len} bytes; "
        f"train {train_np.size / 1e6:.1f} MB, held-out sample "
        f"{meta['eval_tokens_curve']} bytes (final {meta['eval_tokens_final']})",
        flush=True,
    )
    runs: list[dict[str, Any]] = []
    result: dict[str, Any] = dict(
        meta=meta, records=[], metrics={}, goals={}, runs=runs
    )
    n_evals = len(eval_steps)

    def estimate(name: str, chunk_s: float, compile_s: float, eval_s: float) -> None:
        # First chunk of the first optimizer: what the whole benchmark will take.
        if runs:
            return
        evals = (n_evals + 1 + eval_full.shape[0] / eval_small.shape[0]) * eval_s
        per_opt = compile_s + n_chunks * chunk_s + evals
        total = ctx.elapsed() - chunk_s - compile_s - eval_s + per_opt * len(names)
        meta["estimate"] = dict(
            step_ms_first_chunk=1e3 * chunk_s / cfg.chunk,
            per_optimizer_s=per_opt,
            total_s=total,
        )
        note = ""
        if cfg.deadline_s and total > cfg.deadline_s:
            fit = max(1, int((cfg.deadline_s - ctx.elapsed()) // per_opt) + 1)
            note = f"; over the deadline: expect to skip {names[fit:]}"
        print(
            f"  first chunk {1e3 * chunk_s / cfg.chunk:.2f} ms/step (all seeds, "
            f"compile {compile_s:.0f}s): about {per_opt:.0f}s per optimizer, "
            f"{total:.0f}s for all {len(names)}{note}",
            flush=True,
        )

    ctx = Context(
        cfg=cfg,
        graphdef=graphdef,
        params0=params0,
        train_tok=jnp.asarray(train_np),
        starts=jnp.asarray(offsets.reshape(n_chunks, cfg.chunk, *offsets.shape[1:])),
        eval_small=eval_small,
        eval_full=eval_full,
        evaluate=evaluate,
        eval_steps=eval_steps,
        shadow_leaves=leaves,
        t_start=t_start,
        log=lambda s: print(s, flush=True),
    )
    ctx.estimate = estimate
    longest = 0.0
    out_json = pathlib.Path(cfg.out)
    for name in names:
        if cfg.deadline_s and runs and ctx.elapsed() + 1.05 * longest > cfg.deadline_s:
            reason = (
                f"deadline: {ctx.elapsed():.0f}s elapsed, one optimizer took "
                f"{longest:.0f}s, deadline {cfg.deadline_s:.0f}s"
            )
            print(f"skip {name}: {reason}", flush=True)
            meta["skipped"].append(name)
            meta["skip_reasons"][name] = reason
            continue
        t = time.perf_counter()
        run = run_optimizer(name, ctx)
        longest = max(longest, time.perf_counter() - t)
        final_params = run.pop("params")
        if cfg.save_params and not runs:  # the first optimizer's first seed
            train_lm.save_first_model(cfg, final_params, f"{name} seed {seeds[0]}")
        runs.append(run)
        print(
            f"{name}: held-out {np.mean(run['final_heldout']):.4f} "
            f"{np.round(run['final_heldout'], 4).tolist()}  compile "
            f"{run['compile_s']:.1f}s  train {run['train_s']:.1f}s  "
            f"{run['step_ms_all_seeds'] or float('nan'):.2f} ms/step",
            flush=True,
        )
        meta["total_s"] = ctx.elapsed()
        write(result, out_json, None)  # partial results after each optimizer
    meta["total_s"] = ctx.elapsed()
    return _finish(result, cfg)


if __name__ == "__main__":
    main()
