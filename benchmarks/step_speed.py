"""Optimizer step speed on the device: fp32/bf16 Optax AdamW vs low-bit Adam.

Run on a GPU: ``python -m benchmarks.step_speed`` (add ``--quick`` for a
shorter run, ``--tiny --impl jnp`` for the CPU smoke run of the tests).

For every case (``leaf_256M``: one 16384x16384 leaf; ``gpt2s_148``: the
GPT-2-small tree, 148 leaves; ``gpt2s_stacked``: the same parameters stacked
into 16 leaves) and optimizer it jits ``step(grads, state, params) ->
(params, state)``, compiles it once (``compile_s``, lower + compile), times
>= 30 steps after warm-up (median ``ms``, each step ``block_until_ready``) and
records one JSON record per row:

* ``optimizer``: ``optax.adamw`` (jitted plain, nothing donated),
  ``optax.adamw_donated`` (state and params donated), ``optax.adamw_bf16mu``;
  the low-bit presets ``polar2``, ``polar1.5``, ``piquant``, ``4bit``,
  ``8bit``; ``torch.adamw_fused`` (``torch.optim.AdamW(fused=True)``, fp32,
  CUDA events) when torch is importable and sees a GPU.
* ``path``: ``xla`` (Optax), ``jnp`` (low-bit chain in pure jnp), ``chain``
  (the Pallas kernel writes the update, XLA applies it), ``fused`` (the kernel
  updates the parameters: ``adamw_*(..., fused=True)``), ``torch``.
* ``baseline_ms``: the faster of ``optax.adamw`` and ``optax.adamw_donated``
  of the same case and run (issue 18: dividing by a slow baseline flatters
  us); ``ratio`` = ``ms / baseline_ms``; ``goal``: the issue's target ratio.
* ``bytes_per_param``: the bytes per parameter the step must move at least
  (`min_bytes_per_param`), with the state's bytes read from the real state
  (`optax_lowbit.state_bytes`); ``tbps``: those bytes per second, in TB/s.
* ``temp_bytes_per_param``: ``compiled.memory_analysis()``'s temporaries.
* ``ptx_instructions`` / ``ptx_instructions_per_element`` on the kernel rows
  (``chain``, ``fused``): the static PTX size of the row's Triton kernel
  (`ptx_counts`: from an ``--xla_dump_to`` dump; GPU only). ``null`` where the
  dump holds no PTX, with the reason in the meta's ``ptx_note`` and the row's
  ``ptx_error``: on an H200 with JAX 0.11.2, XLA dumps the HLO, MLIR and thunk
  files but no PTX (nor LLVM IR with ``--xla_gpu_dump_llvmir``).
  ``ttir_ops_per_element``: the row's kernel's Triton IR operations per element
  (`kernel_counts`, `benchmarks.kernel_ops`), the proxy where there is no PTX;
  ``sass_per_element`` / ``sass_alu_per_element``: the same kernel compiled to
  Hopper SASS offline where the ``triton`` package is importable (its
  ``ptxas``; `benchmarks.kernel_ops.sass_counts`), ``null`` elsewhere.
  Executed counts on the device: `benchmarks.kernel_counters`.
* ``pipelined_ms``: ms per step of `N_TIMED` steps back to back, blocked on
  once (`time_pipelined`: how a training loop runs them; on trees of many
  leaves the blocked ``ms`` also holds the host's dispatch of every buffer);
  ``pipelined_ratio``: to the faster baseline's ``pipelined_ms`` (table column
  ``pipe``).

It also checks every kernel variant against the jnp reference on the device
(code and scale mismatch fractions, output error), measures the device copy
ceiling, and sweeps the kernel's block size / warps on the big leaf (the rows
keep the library's per-codec defaults, `kadam.default_block_groups` and
`kadam.default_num_warps`, unless ``--block-groups`` / ``--num-warps`` set
them). Writes ``step_speed_h200.json`` and
``step_speed_h200.png`` (ratio per optimizer and case) to
``benchmarks/results/`` or ``$OUT`` when set (``--out`` overrides the JSON
path) and prints a table. Rows that fail record their error; rows not started
before ``--deadline-s`` record ``skipped`` (the jnp rows run last, by default
on ``leaf_256M`` and ``gpt2s_stacked`` only: ``--jnp-cases all`` adds the
148-leaf tree, whose jnp rows compile for 25-40 s each).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from typing import Any

import jax
import jax.numpy as jnp
import optax

import optax_lowbit as lowbit
from benchmarks import _kernel_args
from optax_lowbit.codecs import base
from optax_lowbit.kernels import adam as kadam

N_TIMED = 30
N_WARM = 3
#: issue 18's goals: (optimizer, path) -> ratio to the fastest optax.adamw
GOALS = {
    ("polar2", "fused"): 0.60,
    ("polar1.5", "fused"): 0.55,
    ("4bit", "fused"): 0.60,
    ("8bit", "fused"): 0.75,
    ("polar2", "chain"): 0.90,
}
BASELINES = ("optax.adamw", "optax.adamw_donated")
PATHS = ("xla", "jnp", "chain", "fused", "torch")


def gpt2_small(stacked: bool = False, d: int = 768, n_layer: int = 12) -> dict:
    """Shapes of a GPT-2 parameter tree: small (124M) by default, medium with
    ``d=1024, n_layer=24`` (355M)."""
    f = 4 * d
    layer = {
        "ln1_g": (d,),
        "ln1_b": (d,),
        "qkv_w": (d, 3 * d),
        "qkv_b": (3 * d,),
        "proj_w": (d, d),
        "proj_b": (d,),
        "ln2_g": (d,),
        "ln2_b": (d,),
        "fc_w": (d, f),
        "fc_b": (f,),
        "out_w": (f, d),
        "out_b": (d,),
    }
    tree = {"wte": (50257, d), "wpe": (1024, d), "lnf_g": (d,), "lnf_b": (d,)}
    if stacked:
        tree["layers"] = {k: (n_layer, *s) for k, s in layer.items()}
    else:
        for i in range(n_layer):
            tree[f"h{i}"] = dict(layer)
    return tree


CASES = {
    "leaf_256M": {"w": (16384, 16384)},
    "gpt2s_148": gpt2_small(False),
    "gpt2s_stacked": gpt2_small(True),
    "gpt2m_292": gpt2_small(False, d=1024, n_layer=24),
    "gpt2m_stacked": gpt2_small(True, d=1024, n_layer=24),
    # --tiny (CPU smoke run): one quantized leaf; a 3-leaf tree, one quantized
    "tiny_leaf": {"w": (64, 256)},
    "tiny_tree": {"w": (64, 256), "b": (256,), "x": (3, 200)},
}
#: the case names of earlier versions of this script
CASE_ALIASES = {
    "gpt2_small_146": "gpt2s_148",
    "gpt2_small_stacked_14": "gpt2s_stacked",
    "gpt2_medium_292": "gpt2m_292",
    "gpt2_medium_stacked_16": "gpt2m_stacked",
    "gpt2_small_146_big": "gpt2s_148_big",
    "gpt2_small_146_small": "gpt2s_148_small",
    "tiny": "tiny_tree",
}
DEFAULT_CASES = "leaf_256M,gpt2s_148,gpt2s_stacked"
#: the cases whose jnp rows run by default: on the 148-leaf tree each jnp row
#: compiles for 25-40 s on an H200 (the default run must stay well under 9 min)
JNP_CASES = ("leaf_256M", "gpt2s_stacked")
TINY_CASES = "tiny_leaf,tiny_tree"


def _split_tree(shapes: dict, big: bool) -> dict:
    """The leaves the default policy quantizes (``big``) or the others."""
    out = {}
    for k, v in shapes.items():
        if isinstance(v, dict):
            sub = _split_tree(v, big)
            if sub:
                out[k] = sub
        elif (len(v) >= 2 and v[-1] > 1 and v[0] * v[-1] >= 4096) == big:
            out[k] = v
    return out


# where the 148-leaf tree's time goes: its big (quantized) and small leaves alone
CASES["gpt2s_148_big"] = _split_tree(CASES["gpt2s_148"], True)
CASES["gpt2s_148_small"] = _split_tree(CASES["gpt2s_148"], False)


def stacked_policy(path, leaf) -> bool:
    """Default policy, with a stacked leaf's per-layer rank counted (rank >= 2)."""
    return leaf.size >= 4096 and len(leaf.shape) >= 2 and leaf.shape[-1] > 1


#: the low-bit presets: name -> (alias, its keyword arguments)
LOWBIT = {
    "polar2": (lowbit.adamw_polar, {"bits": 2}),
    "polar1.5": (lowbit.adamw_polar, {"bits": 1.5}),
    "piquant": (lowbit.adamw_piquant, {}),
    "4bit": (lowbit.adamw_4bit, {}),
    "8bit": (lowbit.adamw_8bit, {}),
}


@dataclasses.dataclass
class Row:
    """One optimizer row of a case: ``opt`` is an Optax transform (``kind``
    "chain") or a `FusedOptimizer` (``kind`` "fused")."""

    optimizer: str
    path: str
    impl: str
    kind: str
    opt: Any
    donate: bool = True


def label(rec: dict) -> str:
    """A record's optimizer as the table and the plot name it: a low-bit row
    timed without donation (``--undonated``) says so."""
    name = rec["optimizer"]
    if rec.get("donated") is False and name not in BASELINES:
        return f"{name} undonated"
    return name


def rows_for(
    case: str,
    impl: str = "pallas",
    optimizers=(),
    paths=PATHS,
    lr: float = 1e-3,
    undonated: bool = False,
) -> list[Row]:
    """The rows of a case: the Optax baselines always (``baseline_ms`` needs
    both), then the low-bit presets' ``jnp``, ``chain`` and ``fused`` rows
    (``impl``: the kernel rows' implementation; ``"jnp"`` on CPU smoke runs).
    With ``undonated``, each ``chain`` and ``fused`` row also once jitted
    with nothing donated: the kernels update the state (and the fused
    parameters) in place, so XLA copies each such input first (what a user
    who does not donate pays)."""
    policy = stacked_policy if "stacked" in case else None
    rows = [
        Row("optax.adamw", "xla", "xla", "chain", optax.adamw(lr), donate=False),
        Row("optax.adamw_donated", "xla", "xla", "chain", optax.adamw(lr)),
    ]
    if "xla" in paths and (not optimizers or "optax.adamw_bf16mu" in optimizers):
        tx = optax.adamw(lr, mu_dtype=jnp.bfloat16)
        rows.append(Row("optax.adamw_bf16mu", "xla", "xla", "chain", tx))
    for name, (make, kw) in LOWBIT.items():
        if optimizers and name not in optimizers:
            continue
        if "jnp" in paths:
            tx = make(lr, policy=policy, impl="jnp", **kw)
            rows.append(Row(name, "jnp", "jnp", "chain", tx))
        for path, extra in (("chain", {}), ("fused", {"fused": True})):
            if path not in paths:
                continue
            opt = make(lr, policy=policy, impl=impl, **extra, **kw)
            rows.append(Row(name, path, impl, path, opt))  # the path is the kind
            if undonated:
                rows.append(Row(name, path, impl, path, opt, donate=False))
    return rows


#: The timed step's argument order. ``True``: ``step(grads, params, state) ->
#: (params, state)``, the order of a training loop's ``params, opt_state =
#: train_step(params, opt_state, batch)``. With params and state donated, jit
#: pairs each output with the first donated input of the same shape and dtype
#: (in order), so outputs in the donated inputs' order alias their own
#: buffers. ``False``: ``step(grads, state, params)``, the fused step's own
#: order, where a new parameter lands in a moment's old buffer whenever the
#: two share a shape and dtype (float moments: the small leaves, and every leaf
#: of ``optax.adamw``): XLA then adds copies or temporaries (NOTES_kernels.md,
#: v7). ``--state-first`` sets it for an A/B.
PARAMS_FIRST = True
#: `train_step`'s donated arguments as `step_args` orders them (the parameters
#: and the state, in either order): one definition for `compile_row` and
#: `benchmarks.compile_host`.
DONATED_ARGNUMS = (1, 2)


def train_step(kind: str, opt):
    """The timed step of a chain or fused row, in `PARAMS_FIRST`'s order
    (`step_args` orders its arguments); it returns ``(params, state)``."""
    if kind == "fused":
        inner = opt.step
    else:

        def inner(g, s, p):
            u, s = opt.update(g, s, p)
            return optax.apply_updates(p, u), s

    if PARAMS_FIRST:
        return lambda g, p, s: inner(g, s, p)
    return inner


def step_args(grads, state, params) -> tuple:
    """`train_step`'s arguments in `PARAMS_FIRST`'s order."""
    return (grads, params, state) if PARAMS_FIRST else (grads, state, params)


def min_bytes_per_param(path: str, state_bpp: float) -> float:
    """Bytes per parameter a step must move at least, ``state_bpp`` the state's
    bytes per parameter: one pass reads the gradient (4) and the parameter (4),
    writes the parameter (4), and reads and writes the state (2 x state) — fp32
    AdamW: 12 + 2 x 8 = 28. The chain path's kernel also writes the update
    ``u`` (4) that XLA's apply reads back (4): 20 + 2 x state. The ``xla`` and
    ``jnp`` rows are counted as one fused XLA pass, as for ``optax.adamw``."""
    one_pass = 4 + 4 + 4 + 2 * state_bpp
    return one_pass + 8 if path == "chain" else one_pass


def make_tree(shapes: dict, key) -> dict:
    leaves, tdef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(leaves))
    return tdef.unflatten(
        [
            0.02 * jax.random.normal(k, s, jnp.float32)
            for k, s in zip(keys, leaves, strict=True)
        ]
    )


def _fed(out: tuple, args: tuple) -> tuple:
    """``args`` with a step's outputs in the positions they came from."""
    return (*out, *args[len(out) :])


def time_fn(fn, *args, n=None, warm=None, feed=True):
    """Median and min ms of ``args = fn(*args)`` steps: each output replaces
    the argument in its position (``feed``), as a training loop does."""
    n = N_TIMED if n is None else n
    warm = N_WARM if warm is None else warm
    for _ in range(warm):
        out = fn(*args)
        jax.block_until_ready(out)
        if feed:
            args = _fed(out, args)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) * 1e3)
        if feed:
            args = _fed(out, args)
    return statistics.median(times), min(times), args


def time_dispatch(fn, *args, n=None, warm=None):
    """Like `time_fn`, blocked single steps fed back, but returns ``(ms,
    dispatch_ms, args)``: the medians of the whole step and of the call alone
    (it returns once the host has dispatched the step, before the device
    ends it)."""
    n = N_TIMED if n is None else n
    warm = N_WARM if warm is None else warm
    wall, host = [], []
    for i in range(warm + n):
        t0 = time.perf_counter()
        out = fn(*args)
        t1 = time.perf_counter()
        jax.block_until_ready(out)
        t2 = time.perf_counter()
        args = _fed(out, args)
        if i >= warm:
            wall.append((t2 - t0) * 1e3)
            host.append((t1 - t0) * 1e3)
    return statistics.median(wall), statistics.median(host), args


def time_pipelined(fn, *args, n=None, reps: int = 3):
    """Median ms per step of ``n`` steps run back to back, blocked on once at
    the end (``reps`` repetitions), as a training loop runs them: the host
    dispatches a step while the device works on the one before. Outputs are
    fed back as in `time_fn`; returns ``(ms, args)``."""
    n = N_TIMED if n is None else n
    per_step = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            out = fn(*args)
            args = _fed(out, args)
        jax.block_until_ready(out)
        per_step.append((time.perf_counter() - t0) * 1e3 / n)
    return statistics.median(per_step), args


@dataclasses.dataclass
class Compiled:
    """A row's step compiled for a case, with a fresh state and parameters.

    ``run(state, params, grads) -> (state, params)``: one step, its outputs
    in their arguments' order (`time_fn` feeds them back).
    """

    run: Any
    state: Any
    params: Any
    compile_s: float
    executable: Any


def compile_row(row: Row, params, grads) -> Compiled:
    """Copies ``params``, builds the state, jits and compiles ``row``'s step
    (`train_step`, donated unless ``row.donate`` is false) in `PARAMS_FIRST`'s
    order; the one place `bench_row` and `step_profile` prepare a step."""
    p = jax.tree.map(jnp.copy, params)
    state = jax.jit(row.opt.init)(p)
    jstep = jax.jit(
        train_step(row.kind, row.opt),
        donate_argnums=DONATED_ARGNUMS if row.donate else (),
    )
    t0 = time.perf_counter()
    executable = jstep.lower(*step_args(grads, state, p)).compile()
    compile_s = time.perf_counter() - t0

    def run(s, p, g):
        p, s = executable(*step_args(g, s, p))
        return s, p

    return Compiled(run, state, p, compile_s, executable)


def bench_row(row: Row, params, grads, n_params: int) -> dict:
    """Compiles and times one row; every number measured, errors recorded."""
    rec: dict[str, Any] = {
        "optimizer": row.optimizer,
        "path": row.path,
        "impl": row.impl,
        "donated": row.donate,
    }
    try:
        c = compile_row(row, params, grads)
        rec["compile_s"] = c.compile_s
        try:
            mem = c.executable.memory_analysis()
        except Exception:  # not every backend implements it
            mem = None
        rec["temp_bytes_per_param"] = (
            mem.temp_size_in_bytes / n_params if mem is not None else None
        )
        state_bpp = lowbit.state_bytes(c.state) / n_params
        rec["state_bytes_per_param"] = state_bpp
        rec["bytes_per_param"] = min_bytes_per_param(row.path, state_bpp)
        ms, ms_min, args = time_fn(c.run, c.state, c.params, grads)
        rec["ms"], rec["ms_min"] = ms, ms_min
        rec["pipelined_ms"], (_, p, _) = time_pipelined(c.run, *args)
        rec["tbps"] = rec["bytes_per_param"] * n_params / (ms * 1e-3) / 1e12
        rec["finite"] = all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(p))
        del p, c
    except Exception as e:  # record, never fake
        rec["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        traceback.print_exc(limit=3)
    return rec


def torch_row(shapes: dict, n_timed: int, n_warm: int) -> dict | None:
    """``torch.optim.AdamW(fused=True)`` fp32 on the same shapes, timed with
    CUDA events (median of ``n_timed`` after ``n_warm``); ``None`` without
    torch or CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    rec: dict[str, Any] = {
        "optimizer": "torch.adamw_fused",
        "path": "torch",
        "impl": "torch",
        "donated": None,
        "compile_s": None,
        "temp_bytes_per_param": None,
    }
    try:
        leaves = jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple))
        gen = torch.Generator(device="cuda").manual_seed(0)
        params = []
        for s in leaves:
            p = torch.nn.Parameter(
                0.02 * torch.randn(s, device="cuda", generator=gen, dtype=torch.float32)
            )
            p.grad = 0.02 * torch.randn(
                s, device="cuda", generator=gen, dtype=torch.float32
            )
            params.append(p)
        n_params = sum(p.numel() for p in params)
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4, fused=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.step()  # allocates the state
        torch.cuda.synchronize()
        rec["first_step_s"] = time.perf_counter() - t0
        for _ in range(n_warm):
            opt.step()
        times = []
        for _ in range(n_timed):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            opt.step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        state_b = sum(
            v.numel() * v.element_size()
            for st in opt.state.values()
            for v in st.values()
            if torch.is_tensor(v)
        )
        rec["state_bytes_per_param"] = state_b / n_params
        rec["bytes_per_param"] = min_bytes_per_param("torch", state_b / n_params)
        rec["ms"], rec["ms_min"] = statistics.median(times), min(times)
        rec["tbps"] = rec["bytes_per_param"] * n_params / (rec["ms"] * 1e-3) / 1e12
        rec["finite"] = all(bool(torch.isfinite(p).all()) for p in params)
        del opt, params
        torch.cuda.empty_cache()
    except Exception as e:
        rec["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        traceback.print_exc(limit=3)
    return rec


def add_baselines(records: list[dict]) -> None:
    """``baseline_ms`` (the faster optax.adamw of the case), ``ratio``, ``goal``."""
    for case in {r["case"] for r in records}:
        rows = [r for r in records if r["case"] == case]
        base = [r for r in rows if r["optimizer"] in BASELINES and "ms" in r]
        best = min(base, key=lambda r: r["ms"]) if base else None
        for r in rows:
            r["baseline_ms"] = best["ms"] if best else None
            r["baseline_optimizer"] = best["optimizer"] if best else None
            r["ratio"] = r["ms"] / best["ms"] if best and "ms" in r else None
            # the issue's goals are for the donated step
            undonated = r.get("donated") is False
            r["goal"] = None if undonated else GOALS.get((r["optimizer"], r["path"]))
        # the same for steps run back to back (the faster baseline there)
        piped = [r for r in base if r.get("pipelined_ms")]
        fast = min(piped, key=lambda r: r["pipelined_ms"]) if piped else None
        for r in rows:
            mine = r.get("pipelined_ms")
            ok = fast is not None and mine is not None
            r["pipelined_ratio"] = mine / fast["pipelined_ms"] if ok else None


def _codecs(bits, rounding):
    if rounding == "preset":  # the (mu, nu) codecs of a preset, by name
        from benchmarks import state_drift

        return state_drift.codec_pairs()[bits]
    if rounding.startswith("piquant"):
        encoder = "paper" if rounding.endswith("paper") else "nearest"
        return lowbit.codecs.piquant(encoder), lowbit.codecs.piquant(encoder, False)
    if rounding == "blockwise":
        make = lowbit.codecs.blockwise8 if bits == 8 else lowbit.codecs.blockwise4
        return make(True), make(False)
    return (
        lowbit.codecs.polar(bits=bits, signed=True, rounding=rounding),
        lowbit.codecs.polar(bits=bits, signed=False, rounding=rounding),
    )


KERNEL_VARIANTS = {
    "polar2-sr": (2, "stochastic"),
    "polar1.5-sr": (1.5, "stochastic"),
    "polar2-nearest": (2, "nearest"),
    "blockwise8": (8, "blockwise"),
    "blockwise4": (4, "blockwise"),
    "piquant": (None, "piquant"),
    "piquant-paper": (None, "piquant-paper"),
    # what the presets store since issue 16 (stochastic 4/8-bit second moments)
    "preset-polar2": ("polar2", "preset"),
    "preset-polar1.5": ("polar1.5", "preset"),
    "preset-4bit": ("4bit", "preset"),
    "preset-8bit": ("8bit", "preset"),
    # pi-Quant's preset: m in superblocks of 96, v 4-bit blockwise in 128s;
    # no kernel takes it (kadam.kernel_codecs; v42's joint rows removed, v45)
    "preset-piquant": ("piquant", "preset"),
}


def copy_ceiling(n: int = 1 << 28) -> float:
    """TB/s of ``x * 1.0001`` on ``n`` float32 elements (read + write, donated)."""
    x = jax.random.normal(jax.random.key(5), (n,), jnp.float32)
    f = jax.jit(lambda x: x * 1.0001, donate_argnums=0)
    ms, _, _ = time_fn(lambda x: (f(x),), x)
    return 2 * 4 * n / (ms * 1e-3) / 1e12


def compare(got, ref) -> dict[str, float]:
    """A kernel step's ``(out, mu, nu)`` against the jnp reference's: the
    output's relative error and the fraction of differing codes and scales."""
    out = {
        "out_rel_err": float(jnp.linalg.norm(got[0] - ref[0]) / jnp.linalg.norm(ref[0]))
    }
    for name, a, b in (("mu", got[1], ref[1]), ("nu", got[2], ref[2])):
        out[f"{name}_code_mismatch"] = float(jnp.mean(a.codes != b.codes))
        out[f"{name}_scale_mismatch"] = float(jnp.mean(a.scales != b.scales))
    return out


def grouped_check(mc, nc, apply: bool, key, n_leaves: int = 3) -> dict:
    """`adam_update_many` over ``n_leaves`` leaves of one shape (one launch:
    the ``lax.switch`` path of v6) against the jnp reference leaf by leaf:
    each of `compare`'s numbers, the largest over the leaves."""
    shape = (300, 1000)  # a partial last group per row, a masked last block
    ks = jax.random.split(key, 4 * n_leaves)
    gs = [jax.random.normal(ks[4 * i], shape) for i in range(n_leaves)]
    ms = [
        mc.encode(0.1 * jax.random.normal(ks[4 * i + 1], shape))
        for i in range(n_leaves)
    ]
    vs = [
        nc.encode(0.01 * jnp.square(jax.random.normal(ks[4 * i + 2], shape)) + 1e-6)
        for i in range(n_leaves)
    ]
    ps = (
        [jax.random.normal(ks[4 * i + 3], shape) for i in range(n_leaves)]
        if apply
        else None
    )
    hps = [
        kadam.make_hp(0.9, 0.999, 1e-8, 0.0, 0.1 * (i + 1), 0.001, None, 1e-3, 0.1)
        for i in range(n_leaves)
    ]
    seeds = [(jnp.uint32(20 + 2 * i), jnp.uint32(21 + 2 * i)) for i in range(n_leaves)]
    kw = dict(mu_codec=mc, nu_codec=nc)
    res = jax.jit(
        lambda gs, ms, vs, ps: kadam.adam_update_many(
            gs, ms, vs, hps, seeds=seeds, params=ps, leaves_per_launch=0, **kw
        )
    )(gs, ms, vs, ps)
    worst: dict[str, float] = {}
    for i, got in enumerate(res):
        ref = jax.jit(
            lambda g, m, v, p, i=i: kadam.adam_update_reference(
                g, m, v, hps[i], seeds=seeds[i], params=p, **kw
            )
        )(gs[i], ms[i], vs[i], None if ps is None else ps[i])
        for k, x in compare(got, ref).items():
            worst[k] = max(worst.get(k, 0.0), x)
    return worst


def kernel_checks(log, configs=None, variants=None, checks=None):
    """On-device kernel vs jnp reference (every variant, with and without the
    fused apply) and a block / warps sweep on the 256M leaf (recorded; the
    rows that follow keep the library's defaults)."""
    out = {}
    key = jax.random.key(7)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    shape = (4096, 4096 + 64 * 3)
    c = jnp.asarray(3, jnp.int32)
    hp = kadam.make_hp(0.9, 0.999, 1e-8, 0.0, 1 - 0.9**c, 1 - 0.999**c, None, 1e-3, 0.1)
    seeds = (jnp.uint32(11), jnp.uint32(12))
    g = jax.random.normal(k3, shape)
    params = jax.random.normal(k4, shape)
    for vname in checks or KERNEL_VARIANTS:
        mc, nc = _codecs(*KERNEL_VARIANTS[vname])
        m = mc.encode(0.1 * jax.random.normal(k1, shape))
        v = nc.encode(0.01 * jnp.square(jax.random.normal(k2, shape)) + 1e-6)
        for apply in (False, True):
            name = f"check_{vname}" + ("_apply" if apply else "")
            try:
                kw = dict(mu_codec=mc, nu_codec=nc, seeds=seeds)
                pa = params if apply else None
                ref = jax.jit(
                    lambda g, m, v, hp, p, kw=kw: kadam.adam_update_reference(
                        g, m, v, hp, params=p, **kw
                    )
                )(g, m, v, hp, pa)
                res = jax.jit(
                    lambda g, m, v, hp, p, kw=kw: kadam.adam_update(
                        g, m, v, hp, params=p, **kw
                    )
                )(g, m, v, hp, pa)
                jax.block_until_ready(res)
                out[name] = compare(res, ref)
            except Exception as e:
                out[name] = {"error": f"{type(e).__name__}: {str(e)[:600]}"}
            log(f"{name}: {out[name]}")
        for apply in (False, True):  # one launch over leaves of one shape (v6)
            name = f"check_grouped_{vname}" + ("_apply" if apply else "")
            try:
                out[name] = grouped_check(mc, nc, apply, k1)
            except Exception as e:
                out[name] = {"error": f"{type(e).__name__}: {str(e)[:600]}"}
            log(f"{name}: {out[name]}")
    # kernel alone on the 256M leaf: block / warps sweep (state donated)
    shape = (16384, 16384)
    g = jax.random.normal(k3, shape)
    sweep = []
    configs = configs or ((32, 4), (16, 4), (8, 4), (16, 2), (8, 2), (16, 8))
    for vname in variants or ("polar2-sr", "polar1.5-sr", "blockwise8", "blockwise4"):
        mc, nc = _codecs(*KERNEL_VARIANTS[vname])
        m = mc.encode(0.1 * g)
        v = nc.encode(0.01 * g * g)
        state_b = (mc.bits_per_element + nc.bits_per_element) / 8  # B/elem
        for bg, nw in configs:
            rec = {"variant": vname, "block_groups": bg, "num_warps": nw}
            try:
                fn = jax.jit(
                    lambda m, v, g, hp, bg=bg, nw=nw, mc=mc, nc=nc: kadam.adam_update(
                        g,
                        m,
                        v,
                        hp,
                        mu_codec=mc,
                        nu_codec=nc,
                        seeds=seeds,
                        block_groups=bg,
                        num_warps=nw,
                    )[1:],
                    donate_argnums=(0, 1),
                )
                ms, ms_min, (m, v, *_) = time_fn(fn, m, v, g, hp)
                moved = g.size * (4 + 4 + 2 * state_b)  # g in, u out, state r+w
                rec.update(ms=ms, ms_min=ms_min, TBps=moved / (ms * 1e-3) / 1e12)
            except Exception as e:
                rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            sweep.append(rec)
            log(f"sweep {rec}")
    # The transform rows below take the library's defaults (what a user gets:
    # `kadam.default_block_groups`, `kadam.default_num_warps`), not this
    # sweep's best, unless --block-groups / --num-warps set them.
    out["kernel_sweep_256M"] = sweep
    return out


# ---------------------------------------------------------------------------
# Static PTX size of each kernel (GPU only).
# ---------------------------------------------------------------------------

#: the leaf the PTX is compiled for (the kernel's code does not depend on the
#: leaf's size once it holds more than one block: only the grid does)
PTX_SHAPE = (1024, 4096)
_ENTRY = re.compile(r"(?:\.visible\s+|\.weak\s+)?\.entry\s+([\w$.]+)")
_LABEL = re.compile(r"^[\w$.]+:")
_TRITON_TARGET = "__gpu$xla.gpu.triton"
_TRITON_NAME = re.compile(r"\bname\\*\"?\s*[=:]\s*\\*\"([\w$.\-]+)\\*\"")


def ptx_entries(text: str) -> dict[str, list[str]]:
    """The instruction lines of each ``.entry`` function of a PTX file.

    An instruction is a statement ending in ``;`` inside the function's body
    that is not a directive (``.reg``, ``.param``, ``.loc``, ... start with a
    dot), a label (``$L__BB0_2:``) or a comment; predicated instructions
    (``@%p1 bra ...``) count once."""
    out: dict[str, list[str]] = {}
    cur, depth, started = None, 0, False
    for line in text.splitlines():
        s = line.split("//", 1)[0].strip()
        m = _ENTRY.match(s)
        if m:
            cur, depth, started = m.group(1), 0, False
            out[cur] = []
            continue
        if cur is None or not s:
            continue
        opens, closes = s.count("{"), s.count("}")
        started = started or opens > 0
        depth += opens - closes
        body = s.strip("{} ")
        if (
            started
            and body.endswith(";")
            and not body.startswith(".")
            and not _LABEL.match(body)
        ):
            out[cur].append(body)
        if started and depth <= 0:
            cur = None
    return out


def _opcode(instr: str) -> str:
    """``@%p1 st.global.v4.b32 [...]`` -> ``st``."""
    tok = instr.split()
    if tok and tok[0].startswith("@"):
        tok = tok[1:]
    return tok[0].rstrip(";").split(".")[0] if tok else ""


def _triton_names(hlo_files: list[pathlib.Path]) -> list[str]:
    """Names of the Triton custom calls in optimized HLO text files."""
    names = []
    for f in hlo_files:
        for line in f.read_text(errors="replace").splitlines():
            if _TRITON_TARGET in line:
                names += _TRITON_NAME.findall(line)
    return list(dict.fromkeys(names))


def ptx_of_module(dump: pathlib.Path, module: str, elements_per_thread: float) -> dict:
    """The Triton kernel of the jitted ``module`` in an XLA dump folder: its
    function in the module's PTX (found by the custom call's name in the
    optimized HLO) and its instruction count; else ``ptx_error`` says why."""
    own = re.compile(rf"\.{re.escape(module)}(\.|$)")
    files = [
        f
        for f in dump.rglob("*")
        if f.is_file() and any(own.search(x) for x in f.relative_to(dump).parts)
    ]
    names = _triton_names([f for f in files if f.name.endswith("optimizations.txt")])
    rec: dict[str, Any] = {"triton_kernels": names}
    if not names:
        rec["ptx_error"] = (
            f"no {_TRITON_TARGET} custom call in {module}'s optimized HLO "
            "(not the Triton lowering?)"
        )
        return rec
    ptx_files = [f for f in files if f.suffix == ".ptx"]
    if not ptx_files:
        kinds = sorted({f.name.rsplit(".", 1)[-1] for f in files})
        rec["ptx_error"] = (
            f"the XLA dump of {module} holds no PTX (its {len(files)} files are "
            f"of kinds {kinds}): this XLA does not dump the PTX it compiles"
        )
        return rec
    entries: dict[str, list[str]] = {}
    for f in ptx_files:
        entries.update(ptx_entries(f.read_text(errors="replace")))
    keys = [re.sub(r"[^\w$]", "_", n) for n in names]
    found = [e for e in entries if any(e == k or e.startswith(k) for k in keys)]
    if not found:
        rec["ptx_error"] = (
            f"Triton kernels {names} not among the PTX entries {sorted(entries)[:12]}"
        )
        return rec
    instrs = [i for e in found for i in entries[e]]
    ops = Counter(_opcode(i) for i in instrs)
    return {
        **rec,
        "ptx_kernels": found,
        "ptx_instructions": len(instrs),
        "ptx_instructions_per_element": len(instrs) / elements_per_thread,
        "ptx_branches": ops.get("bra", 0),
        "ptx_top_opcodes": dict(ops.most_common(12)),
    }


def ptx_child(dump: str, impl: str, optimizers=()) -> None:
    """In the subprocess started with ``--xla_dump_to=dump``: compiles the step
    of every kernel row on a `PTX_SHAPE` leaf, each jitted function named after
    its row (``jit_ptx_<optimizer>_<path>`` is its HLO module), and writes the
    rows with their block geometry to ``dump/ptx_rows.json``."""
    shapes = {"w": PTX_SHAPE}
    params = make_tree(shapes, jax.random.key(0))
    grads = make_tree(shapes, jax.random.key(1))
    out = []
    for row in rows_for("ptx", impl, optimizers, paths=("chain", "fused")):
        if row.path not in ("chain", "fused"):
            continue
        name = re.sub(r"\W", "_", f"ptx_{row.optimizer}_{row.path}")
        rec: dict[str, Any] = {"optimizer": row.optimizer, "path": row.path}
        try:
            state = row.opt.init(params)
            packed = [
                x
                for x in jax.tree.leaves(
                    state, is_leaf=lambda x: isinstance(x, base.Packed)
                )
                if isinstance(x, base.Packed)
            ]
            gsize = packed[0].codec.group_size
            bg = kadam.default_block_groups(gsize)
            nw = kadam.default_num_warps(bg * gsize)
            rec.update(
                module=f"jit_{name}",
                block_groups=bg,
                num_warps=nw,
                group_size=gsize,
                elements_per_block=bg * gsize,
                elements_per_thread=bg * gsize / (32 * nw),
            )
            step = train_step(row.kind, row.opt)

            def fn(*args, step=step):
                return step(*args)

            fn.__name__ = fn.__qualname__ = name
            jax.jit(fn).lower(*step_args(grads, state, params)).compile()
        except Exception as e:
            rec["ptx_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        out.append(rec)
    pathlib.Path(dump, "ptx_rows.json").write_text(json.dumps(out))


def ptx_counts(impl: str, optimizers=(), log=print) -> tuple[list[dict], str | None]:
    """Static PTX instruction counts of the kernel of every low-bit preset, on
    the chain path (kernel writes ``u``) and the fused path (kernel applies).

    A subprocess (``--ptx-child``, so that the flag holds for its backend only)
    runs with ``XLA_FLAGS=--xla_dump_to=<tmpdir>`` and compiles one step of
    each row on a `PTX_SHAPE` leaf; here each row's Triton kernel is found in
    its module's dumped PTX and its instruction lines counted (`ptx_entries`).

    Per element: Triton compiles one program (a block of ``block_groups``
    groups of the codec's ``group_size`` elements, the launch's block for a
    leaf of more than one block) into per-thread code run by ``32 * num_warps``
    threads; the block's elements are spread over the threads and the code
    over them is unrolled, so the static count of the per-thread code divided
    by the elements one thread handles, ``block_groups * group_size / (32 *
    num_warps)``, is the instructions per element (an estimate: every branch's
    code counts once; ``ptx_branches`` says how many branches there are). The
    block comes from `optax_lowbit.kernels.adam` (``default_block_groups``,
    ``default_num_warps``), the group size from the state's
    first `Packed` moment (the launch's groups are the first moment's).

    Returns the records and ``None``, or no records and why there are none.
    """
    if jax.default_backend() != "gpu":
        return [], f"backend {jax.default_backend()}: no PTX (GPU only)"
    if impl != "pallas":
        return [], f"impl {impl}: no kernel"
    with tempfile.TemporaryDirectory() as tmp:
        flags = os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={tmp}"
        env = dict(
            os.environ,
            XLA_FLAGS=flags.strip(),
            XLA_PYTHON_CLIENT_PREALLOCATE="false",  # this process holds the GPU
        )
        cmd = [sys.executable, "-m", "benchmarks.step_speed", "--ptx-child", tmp]
        cmd += ["--impl", impl, "--optimizers", ",".join(optimizers)]
        cmd += _kernel_args.argv()
        proc = subprocess.run(
            cmd,
            env=env,
            cwd=pathlib.Path(__file__).resolve().parent.parent,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        rows_file = pathlib.Path(tmp, "ptx_rows.json")
        if proc.returncode != 0 or not rows_file.exists():
            return [], f"PTX subprocess failed: {proc.stderr[-800:]}"
        out = json.loads(rows_file.read_text())
        for rec in out:
            module = rec.pop("module", None)
            if module and "ptx_error" not in rec:
                rec.update(
                    ptx_of_module(pathlib.Path(tmp), module, rec["elements_per_thread"])
                )
            log(f"ptx {rec}")
    return out, None


# ---------------------------------------------------------------------------
# Output: meta, table, plot.
# ---------------------------------------------------------------------------


def run_meta(args: argparse.Namespace) -> dict:
    """The run's record: device and versions, date, commit, timing settings."""
    from benchmarks.train_lm_long import git_commit  # env, else git, else unknown

    commit = git_commit()
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    return {
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
        "optax_version": optax.__version__,
        "torch_version": torch_version,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": None if commit.startswith("unknown") else commit,
        "n_timed": N_TIMED,
        "n_warm": N_WARM,
        "impl": args.impl,
        "lowering": os.environ.get("OPTAX_LOWBIT_GPU_LOWERING", "triton"),
        **_kernel_args.settings(),
        "step_signature": "step(grads, params, state)"
        if PARAMS_FIRST
        else "step(grads, state, params)",
        "argv": sys.argv[1:],
        "bytes_per_param_rule": min_bytes_per_param.__doc__.split("\n\n")[0],
        "baseline_rule": "baseline_ms: the faster of optax.adamw (plain jit) and "
        "optax.adamw_donated (state and params donated) of the same case and run",
    }


def _fmt(x, spec: str) -> str:
    """``x`` formatted by ``spec``, or ``-`` (as wide) when it is ``None``."""
    width = re.match(r"\d*", spec).group()
    return format(x, spec) if x is not None else "-".rjust(int(width or 0))


def kernel_counts(optimizers, log=print, sass: bool | None = None) -> dict:
    """Per-element counts of each preset's chain and fused kernel, offline.

    `benchmarks.kernel_ops.count_case`: the kernel Pallas hands to Triton,
    counted on any machine: ``"ttir"`` (TTIR operations) always and, where the
    ``triton`` package is importable (``sass=None``) or asked for, ``"sass"``
    and ``"sass_alu"`` (Hopper SASS instructions and those of the ALU pipe,
    `kernel_ops.sass_counts`). Keys ``(optimizer, path)``; ``optimizers``
    empty: every preset `kernel_ops` knows.
    """
    import importlib.util

    from benchmarks import kernel_ops

    if sass is None:
        sass = importlib.util.find_spec("triton") is not None
    out = {}
    for name in optimizers or kernel_ops.CASES:  # none named: every preset
        if name not in kernel_ops.CASES:
            continue
        for path in ("chain", "fused"):
            # one lowering per kernel; a Triton that cannot read this jaxlib's
            # TTIR leaves the TTIR count only, a moved private lowering nothing
            for with_sass in (True, False) if sass else (False,):
                try:
                    rec = kernel_ops.count_case(name, path, sass=with_sass)
                except Exception as e:
                    what = "sass" if with_sass else "ttir"
                    log(f"{what} {name}/{path}: {type(e).__name__}: {str(e)[:200]}")
                    continue
                out[(name, path)] = {"ttir": rec["total"]}
                if with_sass:
                    out[(name, path)].update(
                        sass=rec["sass_per_element"],
                        sass_alu=rec["sass_alu_per_element"],
                    )
                break
    return out


def ttir_counts(optimizers, log=print) -> dict[tuple[str, str], float]:
    """TTIR operations per element of each preset's kernels (`kernel_counts`)."""
    return {k: v["ttir"] for k, v in kernel_counts(optimizers, log, sass=False).items()}


def table(records: list[dict]) -> str:
    lines = [
        f"{'case':14s} {'optimizer':20s} {'path':6s} {'ms':>8s} {'ratio':>6s} "
        f"{'goal':>5s} {'B/param':>7s} {'TB/s':>5s} {'compile_s':>9s} {'ptx/el':>6s} "
        f"{'ops/el':>6s} {'pipe':>5s}"
    ]
    for r in records:
        head = f"{r['case']:14s} {label(r):20s} {r['path']:6s}"
        if "ms" not in r:
            why = r.get("error") or r.get("skipped") or "?"
            lines.append(f"{head} {'ERROR' if 'error' in r else 'SKIP'} {why[:70]}")
            continue
        lines.append(
            f"{head} {r['ms']:8.3f} {_fmt(r.get('ratio'), '6.2f')} "
            f"{_fmt(r.get('goal'), '5.2f')} {r['bytes_per_param']:7.2f} "
            f"{r['tbps']:5.2f} {_fmt(r.get('compile_s'), '9.2f')} "
            f"{_fmt(r.get('ptx_instructions_per_element'), '6.1f')} "
            f"{_fmt(r.get('ttir_ops_per_element'), '6.1f')} "
            f"{_fmt(r.get('pipelined_ratio'), '5.2f')}"
        )
    return "\n".join(lines)


PATH_COLORS = {
    "xla": "tab:gray",
    "jnp": "tab:olive",
    "chain": "tab:blue",
    "fused": "tab:green",
    "torch": "tab:orange",
}


def plot(records: list[dict], path: pathlib.Path) -> None:
    """Ratio to the fastest optax.adamw per optimizer and path (bars), one panel
    per case, with 1.0 and issue 18's goals (red marks)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    cases = list(dict.fromkeys(r["case"] for r in records))
    per_case = {
        c: [r for r in records if r["case"] == c and r.get("ratio") is not None]
        for c in cases
    }
    n_rows = max([len(v) for v in per_case.values()] + [1])
    fig, axes = plt.subplots(
        1,
        max(len(cases), 1),
        figsize=(5.2 * max(len(cases), 1), 0.3 * n_rows + 2.0),
        squeeze=False,
    )
    for ax, case in zip(axes[0], cases, strict=False):
        rows = per_case[case]
        y = list(range(len(rows)))
        ax.barh(
            y,
            [r["ratio"] for r in rows],
            color=[PATH_COLORS.get(r["path"], "tab:purple") for r in rows],
        )
        ax.axvline(1.0, color="black", lw=1)
        for i, r in enumerate(rows):
            if r.get("goal") is not None:
                ax.plot([r["goal"]] * 2, [i - 0.45, i + 0.45], color="red", lw=2.5)
        ax.set_yticks(y, [f"{label(r)} / {r['path']}" for r in rows], fontsize=7)
        ax.invert_yaxis()
        base = rows[0]["baseline_ms"] if rows else None
        ax.set_title(f"{case}: fastest optax.adamw {_fmt(base, '.2f')} ms", fontsize=9)
        ax.set_xlabel("step time / fastest optax.adamw (lower is faster)")
        ax.grid(axis="x", alpha=0.3)
    handles = [Patch(color=c, label=p) for p, c in PATH_COLORS.items()]
    handles += [
        Line2D([], [], color="black", lw=1, label="1.0 (fp32 AdamW)"),
        Line2D([], [], color="red", lw=2.5, label="goal (issue 18)"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7)
    meta_dev = records[0].get("device", "") if records else ""
    fig.suptitle(
        f"Optimizer step time vs fastest optax.adamw ({meta_dev})", fontsize=10
    )
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--cases",
        default=None,
        help=f"comma list (default {DEFAULT_CASES}; --tiny: {TINY_CASES}); "
        f"old names accepted: {', '.join(CASE_ALIASES)}",
    )
    ap.add_argument("--out", default=None, help="JSON path (the PNG goes beside it)")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="quick kernel checks and sweep, no jnp rows (~half the default run)",
    )
    ap.add_argument(
        "--tiny",
        action="store_true",
        help="CPU smoke run: tiny cases, 3 timed steps, no kernel checks",
    )
    ap.add_argument(
        "--impl", default="pallas", help="the chain / fused rows' impl (pallas, jnp)"
    )
    ap.add_argument("--optimizers", default="", help="comma list of low-bit presets")
    ap.add_argument("--paths", default=",".join(PATHS), help="comma list of paths")
    ap.add_argument("--only", default="", help="comma list of 'optimizer/path' parts")
    ap.add_argument("--n-timed", type=int, default=None)
    ap.add_argument(
        "--deadline-s",
        type=float,
        default=480.0,
        help="rows not started this many seconds after the start are skipped",
    )
    ap.add_argument(
        "--jnp-cases",
        default=None,
        help="cases with jnp rows: comma list or 'all' (default: "
        f"{','.join(JNP_CASES)}; --tiny: all)",
    )
    ap.add_argument("--skip-kernel-checks", action="store_true")
    ap.add_argument("--quick-kernel", action="store_true")
    ap.add_argument("--no-ptx", action="store_true")
    ap.add_argument(
        "--no-ttir",
        action="store_true",
        help="skip the kernels' TTIR op counts (device-independent; ~1 s a kernel)",
    )
    ap.add_argument("--variants", default="", help="kernel variants to check/sweep")
    _kernel_args.add(ap)
    ap.add_argument(
        "--state-first",
        action="store_true",
        help="time step(grads, state, params) instead of step(grads, params, "
        "state) (PARAMS_FIRST: the donated outputs' aliasing)",
    )
    ap.add_argument(
        "--undonated",
        action="store_true",
        help="also time each chain and fused row with nothing donated (XLA then "
        "copies the inputs the kernels update in place)",
    )
    ap.add_argument("--ptx-child", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def _out_path(arg: str | None) -> pathlib.Path:
    if arg:
        return pathlib.Path(arg)
    outdir = os.environ.get("OUT")
    if outdir:
        return pathlib.Path(outdir) / "step_speed_h200.json"
    return pathlib.Path(__file__).parent / "results" / "step_speed_h200.json"


def main(argv: list[str] | None = None) -> dict:
    """Runs the benchmark; returns the result written to the JSON file."""
    global N_TIMED, N_WARM
    t_start = time.perf_counter()
    args = parse_args(argv)
    if args.tiny:
        N_TIMED, N_WARM = 3, 1
    if args.n_timed:
        N_TIMED = args.n_timed
    _kernel_args.apply(args)
    global PARAMS_FIRST
    PARAMS_FIRST = not args.state_first
    if args.ptx_child:
        ptx_child(
            args.ptx_child, args.impl, tuple(filter(None, args.optimizers.split(",")))
        )
        return {}
    cases = [
        CASE_ALIASES.get(c, c)
        for c in (args.cases or (TINY_CASES if args.tiny else DEFAULT_CASES)).split(",")
        if c
    ]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; known: {sorted(CASES)}")
    optimizers = tuple(filter(None, args.optimizers.split(",")))
    paths = tuple(filter(None, args.paths.split(",")))
    if args.quick:
        paths = tuple(p for p in paths if p != "jnp")
    if args.jnp_cases == "all" or (args.jnp_cases is None and args.tiny):
        jnp_cases = set(cases)
    elif args.jnp_cases is None:
        jnp_cases = set(JNP_CASES)
    else:
        jnp_cases = {CASE_ALIASES.get(c, c) for c in args.jnp_cases.split(",")}
    only = tuple(filter(None, args.only.split(",")))
    path = _out_path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    png = path.with_suffix(".png")

    def log(msg):
        print(msg, flush=True)

    meta = run_meta(args)
    log(json.dumps(meta))
    phase_s = meta["phase_s"] = {"start": time.perf_counter() - t_start}
    t_phase = time.perf_counter()

    def phase(name):  # seconds since the last phase ended
        nonlocal t_phase
        phase_s[name] = phase_s.get(name, 0.0) + time.perf_counter() - t_phase
        t_phase = time.perf_counter()

    result: dict[str, Any] = {"meta": meta, "records": [], "kernel": {}}

    def save():  # after every row: a run cut short keeps what it measured
        add_baselines(result["records"])
        path.write_text(json.dumps(result, indent=1))

    meta["copy_ceiling_tbps"] = copy_ceiling(1 << 16 if args.tiny else 1 << 28)
    log(f"copy ceiling {meta['copy_ceiling_tbps']:.2f} TB/s")
    phase("copy_ceiling")
    kernel_run = not (args.skip_kernel_checks or args.tiny)
    if kernel_run:
        variants = tuple(filter(None, args.variants.split(",")))
        try:
            if args.quick_kernel or args.quick:
                presets = [
                    v
                    for v in KERNEL_VARIANTS
                    if v.startswith("preset-")  # those the kernel takes
                    and kadam.kernel_codecs(*_codecs(*KERNEL_VARIANTS[v]))
                ]
                result["kernel"] = kernel_checks(
                    log,
                    ((16, 4), (8, 4)),
                    variants or ("polar2-sr", "blockwise8", "blockwise4"),
                    variants or (presets if args.quick else None),
                )
            else:
                result["kernel"] = kernel_checks(log)
        except Exception:
            log(traceback.format_exc())
    else:
        result["kernel"]["skipped"] = "--tiny" if args.tiny else "--skip-kernel-checks"
    meta["kernel_config_used"] = {
        "block_groups": kadam.DEFAULT_BLOCK_GROUPS,
        "max_block_elements": kadam.MAX_BLOCK_ELEMENTS,
        "num_warps": kadam.DEFAULT_NUM_WARPS,  # None: per block, as below
        "elements_per_thread": kadam.ELEMENTS_PER_THREAD,
        "max_num_warps": kadam.MAX_NUM_WARPS,
    }
    log(f"kernel config used: {meta['kernel_config_used']}")
    phase("kernel_checks")
    ptx, why = [], "--no-ptx"
    if not args.no_ptx:
        try:
            ptx, why = ptx_counts(args.impl, optimizers, log)
        except Exception as e:
            ptx, why = [], f"{type(e).__name__}: {str(e)[:300]}"
    result["kernel"]["ptx"] = ptx
    ptx_by_row = {
        (p["optimizer"], p["path"]): {
            k: v for k, v in p.items() if k not in ("optimizer", "path")
        }
        for p in ptx
    }
    errors = [p["ptx_error"] for p in ptx if "ptx_error" in p]
    if not why and errors and not any("ptx_instructions" in p for p in ptx):
        why = f"no kernel's PTX found; first reason: {errors[0]}"
    meta["ptx_note"] = why or (
        "ptx_instructions: static count of the Triton kernel's PTX instructions "
        "(XLA dump of one step on a 1024x4096 leaf); per element: divided by "
        "block_groups * group_size / (32 * num_warps), the elements one thread "
        "handles; see ptx_error on a row for a kernel that was not found"
    )
    phase("ptx")
    counts = {} if args.tiny or args.no_ttir else kernel_counts(optimizers, log)
    meta["ttir_note"] = (
        "ttir_ops_per_element: TTIR operations per element of the row's kernel "
        "(python -m benchmarks.kernel_ops: canonicalized Triton IR, each op weighted "
        "by its elements), a proxy for instructions per element; "
        "sass_per_element / sass_alu_per_element: the same kernel compiled offline "
        "to Hopper SASS by the triton package's ptxas (kernel_ops --sass; null "
        "where triton is not importable or cannot read the TTIR), static "
        "instructions and those of the ALU pipe per element; executed counts on "
        "the device: python -m benchmarks.kernel_counters"
    )
    phase("ttir")
    save()

    for part in ("main", "jnp"):  # the jnp rows last: the deadline cuts them first
        for case in cases:
            rows = [
                r
                for r in rows_for(
                    case, args.impl, optimizers, paths, undonated=args.undonated
                )
                if (r.path == "jnp") == (part == "jnp")
                and (r.path != "jnp" or case in jnp_cases)
                and (
                    not only
                    or r.optimizer in BASELINES
                    or any(o in f"{r.optimizer}/{r.path}" for o in only)
                )
            ]
            want_torch = part == "main" and "torch" in paths
            if not rows and not want_torch:
                continue
            shapes = CASES[case]
            params = make_tree(shapes, jax.random.key(0))
            grads = make_tree(shapes, jax.random.key(1))
            n_params = sum(x.size for x in jax.tree.leaves(params))
            n_leaves = len(jax.tree.leaves(params))
            log(f"case {case}: {n_params / 1e6:.2f}M params, {n_leaves} leaves")
            common = {
                "case": case,
                "n_params": n_params,
                "n_leaves": n_leaves,
                "device": meta["device"],
                "jax_version": meta["jax_version"],
                "date": meta["date"],
                "commit": meta["commit"],
            }
            for row in rows:
                if time.perf_counter() - t_start > args.deadline_s:
                    rec = {"optimizer": row.optimizer, "path": row.path}
                    rec["skipped"] = f"deadline ({args.deadline_s:.0f} s) passed"
                else:
                    rec = bench_row(row, params, grads, n_params)
                rec = {**common, **rec}
                if row.path in ("chain", "fused"):
                    rec.update(ptx_instructions=None, ptx_instructions_per_element=None)
                    rec.update(ptx_by_row.get((row.optimizer, row.path), {}))
                    got = counts.get((row.optimizer, row.path), {})
                    rec["ttir_ops_per_element"] = got.get("ttir")
                    rec["sass_per_element"] = got.get("sass")
                    rec["sass_alu_per_element"] = got.get("sass_alu")
                result["records"].append(rec)
                log(json.dumps(rec))
                save()
            del params, grads
            if want_torch:
                rec = torch_row(shapes, N_TIMED, N_WARM)
                if rec is not None:
                    rec = {**common, **rec}
                    result["records"].append(rec)
                    log(json.dumps(rec))
            phase(f"{case}/{part}")
    order = {c: i for i, c in enumerate(cases)}
    result["records"].sort(
        key=lambda r: (order[r["case"]], PATHS.index(r["path"]), r["optimizer"])
    )
    meta["wall_s"] = time.perf_counter() - t_start
    save()
    plot(result["records"], png)
    print(f"\n{json.dumps({k: meta[k] for k in ('device', 'jax_version', 'commit')})}")
    print(f"copy ceiling {meta['copy_ceiling_tbps']:.2f} TB/s")
    print(table(result["records"]))
    print(f"wrote {path} and {png} in {meta['wall_s']:.0f} s")
    sys.stdout.flush()
    return result


if __name__ == "__main__":
    main()
