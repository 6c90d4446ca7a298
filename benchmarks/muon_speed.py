"""Muon with low-bit momentum on the device: kernel check and step time.

Run on a GPU: ``python -m benchmarks.muon_speed`` (``--tiny`` is the CPU
smoke run of the tests, with ``impl="jnp"`` rows only).

1. **Check.** For each preset (`optax_lowbit.muon_polar`, ``muon_4bit``,
   ``muon_8bit``, ``muon_piquant``) it runs ``--check-steps`` updates of a
   small tree (same-shape matrices that share one launch, a matrix of
   another shape whose rows end in a partial group, a bias that takes the
   Adam fallback) with ``impl="pallas"`` and with ``impl="jnp"`` from the
   same state, on fresh gradients, and records the fraction of differing
   state elements (codes, scales, counts) and the updates' relative error.
   The interpreter tests require them equal bit for bit; this is the same
   check compiled for the device.
2. **Speed.** On a case of `benchmarks.step_speed` (default the GPT-2-small
   tree, 148 leaves) it times ``step(grads, state, params)`` of
   ``optax.contrib.muon`` (fp32 momentum; jitted plain and with state and
   params donated: the faster is ``baseline_ms``) and of each preset with
   the kernel (``pallas``) and without (``jnp``), as `step_speed.bench_row`
   does (compile seconds, median ms, state bytes per parameter).

Writes ``muon_speed_<device>.json`` to ``benchmarks/results/`` or ``$OUT``
(``--out`` overrides) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_lowbit as lowbit
from benchmarks import _kernel_args, step_speed

#: preset name -> the alias
PRESETS = {
    "polar2": lowbit.muon_polar,
    "4bit": lowbit.muon_4bit,
    "8bit": lowbit.muon_8bit,
    "piquant": lowbit.muon_piquant,
}
LR = 0.02
#: the check's tree: two matrices of one shape (one launch), one of another
#: shape (1000 = 15 groups of 64 + a partial one), a bias (Adam fallback)
CHECK_SHAPES = {"a": (300, 1000), "b": (300, 1000), "c": (512, 1000), "bias": (1000,)}


def state_mismatch(a: Any, b: Any) -> float:
    """The fraction of differing elements over all leaves of two states."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    if len(la) != len(lb):
        raise ValueError(f"state trees differ: {len(la)} vs {len(lb)} leaves")
    diff = sum(
        int(np.sum(np.asarray(x) != np.asarray(y))) for x, y in zip(la, lb, strict=True)
    )
    return diff / max(1, sum(np.asarray(x).size for x in la))


def check(name: str, steps: int, key) -> dict[str, Any]:
    """``impl="pallas"`` against ``impl="jnp"`` over ``steps`` updates."""
    make = PRESETS[name]
    txs = {impl: make(LR, impl=impl) for impl in ("pallas", "jnp")}
    params = step_speed.make_tree(CHECK_SHAPES, key)
    states = {impl: tx.init(params) for impl, tx in txs.items()}
    updates = {impl: jax.jit(tx.update) for impl, tx in txs.items()}
    worst = {"state_mismatch": 0.0, "update_rel_err": 0.0}
    for t in range(steps):
        grads = step_speed.make_tree(CHECK_SHAPES, jax.random.fold_in(key, t + 1))
        outs = {}
        for impl in txs:
            outs[impl], states[impl] = updates[impl](grads, states[impl], params)
        worst["state_mismatch"] = max(
            worst["state_mismatch"], state_mismatch(states["pallas"], states["jnp"])
        )
        num = sum(
            float(jnp.sum(jnp.square(x - y)))
            for x, y in zip(
                jax.tree.leaves(outs["pallas"]),
                jax.tree.leaves(outs["jnp"]),
                strict=True,
            )
        )
        den = sum(float(jnp.sum(jnp.square(y))) for y in jax.tree.leaves(outs["jnp"]))
        worst["update_rel_err"] = max(worst["update_rel_err"], (num / den) ** 0.5)
    return worst


def rows(impls: tuple[str, ...]) -> list[step_speed.Row]:
    """The timed rows: Optax's Muon (plain and donated), then each preset with
    the first of ``impls``; polar2 with each of them (a jnp step of the tree
    compiles for tens of seconds: one preset shows the kernel's gain)."""
    out = [
        step_speed.Row(
            "optax.muon", "xla", "xla", "chain", optax.contrib.muon(LR), False
        ),
        step_speed.Row(
            "optax.muon_donated", "xla", "xla", "chain", optax.contrib.muon(LR)
        ),
    ]
    for name, make in PRESETS.items():
        for impl in impls if name == "polar2" else impls[:1]:
            out.append(step_speed.Row(name, impl, impl, "chain", make(LR, impl=impl)))
    return out


def table(result: dict) -> str:
    lines = ["| check | state mismatch | update rel err |", "|---|---|---|"]
    for name, c in result["checks"].items():
        if "error" in c:
            lines.append(f"| {name} | {c['error'][:60]} | |")
        else:
            lines.append(
                f"| {name} | {c['state_mismatch']:.3g} | {c['update_rel_err']:.3g} |"
            )
    lines += ["", "| optimizer | impl | ms | ratio | compile s | state B/param |"]
    lines.append("|---|---|---|---|---|---|")
    for r in result["records"]:
        if "error" in r:
            lines.append(f"| {r['optimizer']} | {r['impl']} | {r['error'][:60]} |")
            continue
        lines.append(
            f"| {r['optimizer']} | {r['impl']} | {r['ms']:.3f} | {r['ratio']:.2f} | "
            f"{r['compile_s']:.1f} | {r['state_bytes_per_param']:.3f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="gpt2s_148", choices=sorted(step_speed.CASES))
    ap.add_argument("--check-steps", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run")
    ap.add_argument("--out", default=None, help="JSON path")
    _kernel_args.add(ap)
    args = ap.parse_args(argv)
    if args.check_steps < 1:
        ap.error(f"--check-steps must be >= 1, got {args.check_steps}")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Runs the check and the timing; returns what it wrote."""
    args = parse_args(argv)
    _kernel_args.apply(args)
    impls = ("jnp",) if args.tiny else ("pallas", "jnp")
    if args.tiny:
        step_speed.N_TIMED, step_speed.N_WARM = 3, 1
    case = "tiny_tree" if args.tiny else args.case
    args.impl = impls[0]
    meta = step_speed.run_meta(args)
    meta["case"] = case
    out_dir = pathlib.Path(os.environ.get("OUT") or "benchmarks/results")
    device = "cpu" if jax.default_backend() == "cpu" else "h200"
    path = pathlib.Path(args.out or out_dir / f"muon_speed_{device}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"meta": meta, "checks": {}, "records": []}
    if not args.tiny:
        for name in PRESETS:
            try:
                result["checks"][name] = check(
                    name, args.check_steps, jax.random.key(3)
                )
            except Exception as e:  # record, never fake
                result["checks"][name] = {
                    "error": f"{type(e).__name__}: {str(e)[:400]}"
                }
            print(name, result["checks"][name], flush=True)
    shapes = step_speed.CASES[case]
    params = step_speed.make_tree(shapes, jax.random.key(0))
    grads = step_speed.make_tree(shapes, jax.random.key(1))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    for row in rows(impls):
        rec = step_speed.bench_row(row, params, grads, n_params)
        for k in ("bytes_per_param", "tbps"):  # AdamW's byte rule: not Muon's
            rec.pop(k, None)
        result["records"].append(rec)
        ok = [
            r["ms"]
            for r in result["records"]
            if r["optimizer"].startswith("optax.muon") and "ms" in r
        ]
        for r in result["records"]:
            if ok and "ms" in r:
                r["baseline_ms"] = min(ok)
                r["ratio"] = r["ms"] / min(ok)
        print(json.dumps(rec), flush=True)
        path.write_text(json.dumps(result, indent=1))
    print(table(result))
    return result


if __name__ == "__main__":
    main()
