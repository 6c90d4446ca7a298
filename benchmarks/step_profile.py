"""Where an optimizer step's time goes: the device kernels of a traced step.

Run on a GPU: ``python -m benchmarks.step_profile`` (``--tiny --impl jnp`` is
the CPU smoke run of the tests, where the trace holds no device kernels).

For each row (``optimizer/path`` of `benchmarks.step_speed`'s rows, on one
of its cases) it compiles the step, warms it up, times it as
`step_speed.time_fn` does (median ``wall_ms``), then records ``--steps``
steps under ``jax.profiler.trace`` and reads the Perfetto trace: every
complete event on a device track is one kernel (or copy). Per row:

* ``kernels_per_step``: device events per step;
* ``wall_ms``: one step, blocked on (`step_speed`'s timing); ``pipelined_ms``:
  per step of ``N_TIMED`` steps run back to back and blocked on once, as a
  training loop runs them (the host's dispatch of a step overlaps the device's
  work on the one before); ``dispatch_ms``: the host time of the call alone;
* ``span_ms``: per step, the first kernel's start to the last one's end
  (the ``--steps`` traced steps split at their longest gaps);
* ``busy_ms``: per step, the time at least one device event runs (the union
  of their intervals), and ``kernel_ms`` their summed durations;
* ``idle_ms`` = ``wall_ms - busy_ms``: launch gaps and host time the device
  waits for (what grouping launches or fewer ops can win);
* ``top``: the kernels that take the most time, by name, with their count
  and milliseconds per step; ``by_kind``: the same summed over kinds
  (``pallas`` for our kernels, ``fusion`` for XLA's loops, ``copy``...).

Writes ``step_profile_<device>.json`` to ``benchmarks/results/`` or ``$OUT``
(``--out`` overrides) and prints a table. A row that fails records its error.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import pathlib
import tempfile
import traceback
from typing import Any

import jax

from benchmarks import _kernel_args, step_speed

#: the rows profiled by default: fp32 AdamW and the polar 2-bit fused and
#: chain steps
DEFAULT_ROWS = "optax.adamw/xla,polar2/fused,polar2/chain"
#: kernel name fragments -> kind, first match wins
KINDS = (
    ("adam_", "pallas"),
    ("momentum_", "pallas"),
    ("triton", "pallas"),
    ("memcpy", "copy"),
    ("memset", "copy"),
    ("copy", "copy"),
    ("fusion", "fusion"),
    ("gemm", "matmul"),
    ("cublas", "matmul"),
    ("cutlass", "matmul"),
)


def kind_of(name: str) -> str:
    """The kind of a device event's name (`KINDS`; ``other`` when none)."""
    low = name.lower()
    return next((k for frag, k in KINDS if frag in low), "other")


def track_names(trace: dict) -> dict[int, str]:
    """``pid -> name`` of a Perfetto trace's processes (its tracks)."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return {
        e["pid"]: e.get("args", {}).get("name", "")
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }


def device_events(trace: dict) -> list[dict]:
    """The complete (``ph == "X"``) events of a Perfetto trace's device tracks.

    A device track is a process whose name names a GPU or TPU (XLA's
    profiler names them ``/device:GPU:0`` and the like).
    """
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    dev = {
        pid
        for pid, n in track_names(trace).items()
        if "/device:" in n and "CPU" not in n.upper()
    }
    return [e for e in events if e.get("ph") == "X" and e.get("pid") in dev]


def busy_us(events: list[dict]) -> float:
    """The length of the union of the events' ``[ts, ts + dur)`` intervals."""
    total, end = 0.0, float("-inf")
    for e in sorted(events, key=lambda e: e["ts"]):
        start, stop = float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0))
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def span_us(events: list[dict], steps: int) -> float:
    """Mean span per step (first kernel's start to last kernel's end) of a run of
    ``steps`` steps, split at the ``steps - 1`` longest idle gaps."""
    evs = sorted(events, key=lambda e: e["ts"])
    if not evs:
        return 0.0
    gaps, end = [], float(evs[0]["ts"])
    for k, e in enumerate(evs):
        if k:
            gaps.append((float(e["ts"]) - end, k))
        end = max(end, float(e["ts"]) + float(e.get("dur", 0.0)))
    cuts = sorted(k for _, k in sorted(gaps, reverse=True)[: steps - 1])
    spans = []
    for a, b in zip([0, *cuts], [*cuts, len(evs)], strict=True):
        seg = evs[a:b]
        stop = max(float(e["ts"]) + float(e.get("dur", 0.0)) for e in seg)
        spans.append(stop - float(seg[0]["ts"]))
    return sum(spans) / len(spans)


def summarize(events: list[dict], steps: int, top: int = 15) -> dict[str, Any]:
    """Per-step numbers of a traced run of ``steps`` steps (see the module)."""
    per_name: dict[str, list[float]] = collections.defaultdict(list)
    for e in events:
        per_name[e.get("name", "?")].append(float(e.get("dur", 0.0)))
    by_kind: dict[str, dict[str, float]] = collections.defaultdict(
        lambda: {"count": 0.0, "ms": 0.0}
    )
    for name, durs in per_name.items():
        k = by_kind[kind_of(name)]
        k["count"] += len(durs) / steps
        k["ms"] += sum(durs) / steps / 1e3
    ranked = sorted(per_name.items(), key=lambda kv: -sum(kv[1]))[:top]
    return {
        "kernels_per_step": len(events) / steps,
        "busy_ms": busy_us(events) / steps / 1e3,
        "span_ms": span_us(events, steps) / 1e3,
        "kernel_ms": sum(float(e.get("dur", 0.0)) for e in events) / steps / 1e3,
        "by_kind": dict(by_kind),
        "top": [
            {
                "name": name[:160],
                "kind": kind_of(name),
                "count": len(durs) / steps,
                "ms": sum(durs) / steps / 1e3,
            }
            for name, durs in ranked
        ],
    }


def read_trace(log_dir: str) -> dict:
    """The Perfetto trace ``jax.profiler.trace`` wrote under ``log_dir``."""
    found = sorted(pathlib.Path(log_dir).rglob("perfetto_trace.json.gz"))
    if not found:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {log_dir}")
    with gzip.open(found[-1], "rt") as f:
        return json.load(f)


def profile_row(row: step_speed.Row, params, grads, steps: int) -> dict[str, Any]:
    """Compiles, times and traces one row (see the module)."""
    rec: dict[str, Any] = {
        "optimizer": row.optimizer,
        "path": row.path,
        "donated": row.donate,
    }
    try:
        c = step_speed.compile_row(row, params, grads)
        rec["compile_s"], run = c.compile_s, c.run
        rec["wall_ms"], rec["dispatch_ms"], (state, p, _) = step_speed.time_dispatch(
            run, c.state, c.params, grads
        )
        del c
        rec["pipelined_ms"], (state, p, _) = step_speed.time_pipelined(
            run, state, p, grads
        )
        with tempfile.TemporaryDirectory() as d:
            with jax.profiler.trace(d, create_perfetto_trace=True):
                for _ in range(steps):
                    state, p = run(state, p, grads)
                    jax.block_until_ready(p)
            trace = read_trace(d)
            rec.update(summarize(device_events(trace), steps))
            rec["tracks"] = sorted(set(track_names(trace).values()))[:20]
        rec["idle_ms"] = rec["wall_ms"] - rec["busy_ms"]
    except Exception as e:  # record, never fake
        rec["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        traceback.print_exc(limit=3)
    return rec


def table(records: list[dict]) -> str:
    cols = ("case", "row", "wall ms", "pipelined ms", "dispatch ms", "span ms")
    cols += ("busy ms", "idle ms", "kernels/step")
    cols += ("pallas ms", "fusion ms")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in records:
        row = f"{step_speed.label(r)}/{r['path']}"
        if "error" in r:
            lines.append(f"| {r['case']} | {row} | {r['error'][:60]} |")
            continue
        kinds = r["by_kind"]
        lines.append(
            f"| {r['case']} | {row} | {r['wall_ms']:.3f} | "
            f"{r['pipelined_ms']:.3f} | {r['dispatch_ms']:.3f} | {r['span_ms']:.3f} | "
            f"{r['busy_ms']:.3f} | {r['idle_ms']:.3f} | {r['kernels_per_step']:.0f} | "
            f"{kinds.get('pallas', {}).get('ms', 0.0):.3f} | "
            f"{kinds.get('fusion', {}).get('ms', 0.0):.3f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="gpt2s_148,gpt2s_stacked")
    ap.add_argument("--rows", default=DEFAULT_ROWS, help="comma list of optimizer/path")
    ap.add_argument("--steps", type=int, default=5, help="traced steps per row")
    ap.add_argument("--impl", default="pallas", choices=("pallas", "jnp"))
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny case")
    ap.add_argument(
        "--state-first",
        action="store_true",
        help="time step(grads, state, params) (step_speed.PARAMS_FIRST)",
    )
    ap.add_argument(
        "--undonated",
        action="store_true",
        help="also profile each chain and fused row jitted with nothing donated "
        "(step_speed --undonated)",
    )
    ap.add_argument("--out", default=None, help="JSON path")
    _kernel_args.add(ap)
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error(f"--steps must be >= 1, got {args.steps}")
    rows = [r for r in args.rows.split(",") if r]
    bad = [r for r in rows if r.count("/") != 1]
    if not rows or bad:
        ap.error(f"--rows must be a comma list of optimizer/path, got {args.rows!r}")
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in step_speed.CASES]
    if unknown:
        ap.error(f"--cases {unknown} unknown; known: {sorted(step_speed.CASES)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Runs the profile; returns what it wrote."""
    args = parse_args(argv)
    _kernel_args.apply(args)
    if args.tiny:
        step_speed.N_TIMED, step_speed.N_WARM = 3, 1
    step_speed.PARAMS_FIRST = not args.state_first
    cases = ["tiny_tree"] if args.tiny else [c for c in args.cases.split(",") if c]
    wanted = [tuple(r.split("/")) for r in args.rows.split(",") if r]
    meta = step_speed.run_meta(args)
    out_dir = pathlib.Path(os.environ.get("OUT") or "benchmarks/results")
    device = "cpu" if jax.default_backend() == "cpu" else "h200"
    path = pathlib.Path(args.out or out_dir / f"step_profile_{device}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    records = []
    for case in cases:
        shapes = step_speed.CASES[case]
        params = step_speed.make_tree(shapes, jax.random.key(0))
        grads = step_speed.make_tree(shapes, jax.random.key(1))
        n_params = sum(x.size for x in jax.tree.leaves(params))
        names = {o for o, _ in wanted}
        rows = step_speed.rows_for(
            case,
            args.impl,
            optimizers=names,
            paths={p for _, p in wanted},
            undonated=args.undonated,
        )
        for row in rows:
            if (row.optimizer, row.path) not in wanted:
                continue
            rec = {"case": case, "n_params": n_params}
            rec.update(profile_row(row, params, grads, args.steps))
            records.append(rec)
            print(json.dumps(rec)[:600], flush=True)
            path.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    print(table(records))
    return {"meta": meta, "records": records}


if __name__ == "__main__":
    main()
