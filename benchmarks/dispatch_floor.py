"""The wall time a whole-tree step pays per buffer: issue 18's item 2, bounded.

Item 2 asks the 148-leaf GPT-2-small tree's step to run within 1.2x of the same
parameters stacked into a few leaves. A jitted step's host dispatch grows with
the buffers it passes (inputs and donated outputs), whatever the device does.
This benchmark measures that floor in the same run as the real steps:

* ``params_only``: ``p - lr * g`` on every leaf, parameters donated: the least
  any optimizer's step does; its tree / stacked ratio bounds every optimizer's;
* ``passthrough_<K>``: the same plus ``K`` small donated ``uint8`` arrays
  passed through unchanged (aliased: no device work), on the tree: the cost of
  one more state buffer (``us_per_state_array``, a least-squares slope);
* ``optax.adamw``, ``optax.adamw_donated``, ``polar2 fused`` (the timed step
  of `benchmarks.step_speed`, ``--optimizers`` for others).

Per row: ``buffers`` (inputs plus outputs), ``ms`` (median of blocked single
steps: dispatch, device and the wait on every output), ``dispatch_ms`` (median
time for the call to return, the host's part), ``pipelined_ms`` (steps back to
back, blocked once), and for each row both cases have, ``tree_over_stacked``.

Usage::

    python -m benchmarks.dispatch_floor            # GPU, ~1 min
    python -m benchmarks.dispatch_floor --tiny     # CPU smoke, seconds

Writes ``results/dispatch_floor.json`` (``--out``) and a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import traceback
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _markdown, step_speed

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
#: state arrays passed through on the tree (the fused polar2 state holds ~400)
PASSTHROUGH = (0, 100, 200, 400, 800)
CASES = ("gpt2s_148", "gpt2s_stacked")
TINY = {"gpt2s_148": "tiny_tree", "gpt2s_stacked": "tiny_leaf"}


def passthrough_step(lr: float = 1e-3):
    """``(state, params, grads) -> (state, params)``: ``params - lr * grads``;
    the state (a list of arrays) comes back unchanged."""

    def step(s, p, g):
        return s, jax.tree.map(lambda a, b: a - lr * b, p, g)

    return jax.jit(step, donate_argnums=(0, 1))


def measure(row: str, case: str, fn, args: tuple, n: int, warm: int) -> dict:
    """One row's record (``args = (state, params, grads)``)."""
    n_in = sum(len(jax.tree.leaves(a)) for a in args)
    n_out = n_in - len(jax.tree.leaves(args[2]))
    ms, dispatch_ms, args = step_speed.time_dispatch(fn, *args, n=n, warm=warm)
    pipelined_ms, _ = step_speed.time_pipelined(fn, *args, n=n)
    return {
        "case": case,
        "row": row,
        "state_arrays": len(jax.tree.leaves(args[0])),
        "buffers": n_in + n_out,
        "ms": ms,
        "dispatch_ms": dispatch_ms,
        "pipelined_ms": pipelined_ms,
    }


def case_rows(case: str, shapes: dict, optimizers, impl: str, n: int, warm: int):
    """Every row of one case, errors recorded (never faked)."""
    params = step_speed.make_tree(shapes, jax.random.PRNGKey(0))
    grads = step_speed.make_tree(shapes, jax.random.PRNGKey(1))
    counts = PASSTHROUGH if case == "gpt2s_148" else (0,)
    rows: list[tuple[str, Any]] = [
        ("params_only" if k == 0 else f"passthrough_{k}", k) for k in counts
    ]
    for r in step_speed.rows_for(case, impl, optimizers, paths=("xla", "fused")):
        rows.append((r.optimizer if r.path == "xla" else f"{r.optimizer} {r.path}", r))
    out = []
    for name, spec in rows:
        try:
            if isinstance(spec, int):
                p = jax.tree.map(jnp.copy, params)
                state = [jnp.zeros((256,), jnp.uint8) for _ in range(spec)]
                rec = measure(
                    name, case, passthrough_step(), (state, p, grads), n, warm
                )
            else:
                c = step_speed.compile_row(spec, params, grads)
                rec = measure(name, case, c.run, (c.state, c.params, grads), n, warm)
        except Exception as e:  # record, never fake
            rec = {"case": case, "row": name, "error": f"{type(e).__name__}: {e}"[:400]}
            traceback.print_exc(limit=3)
        print(json.dumps(rec), flush=True)
        out.append(rec)
    return out


def summarize(records: list[dict]) -> dict:
    """``tree_over_stacked`` per row both cases have (``ms``, ``dispatch_ms``
    and ``pipelined_ms``), and the tree's cost of one more state array in
    microseconds (``us_per_state_array``: the slope over the pass-through
    rows)."""
    by = {(r["case"], r["row"]): r for r in records if "error" not in r}
    ratios = {}
    for (case, row), tree in by.items():
        stacked = by.get(("gpt2s_stacked", row))
        if case == "gpt2s_148" and stacked:
            ratios[row] = {
                k: tree[k] / stacked[k] for k in ("ms", "dispatch_ms", "pipelined_ms")
            }
    thru = [
        r
        for (case, row), r in by.items()
        if case == "gpt2s_148"
        and (row == "params_only" or row.startswith("passthrough"))
    ]
    slope = {}
    if len(thru) >= 2:
        x = np.array([r["state_arrays"] for r in thru], float)
        for k in ("ms", "dispatch_ms", "pipelined_ms"):
            slope[k] = float(np.polyfit(x, [r[k] for r in thru], 1)[0]) * 1e3
    return {"tree_over_stacked": ratios, "us_per_state_array": slope}


COLUMNS: list[_markdown.Column] = [
    ("case", "case", ""),
    ("row", "row", ""),
    ("state arrays", "state_arrays", "d"),
    ("buffers", "buffers", "d"),
    ("ms", "ms", ".3f"),
    ("dispatch ms", "dispatch_ms", ".3f"),
    ("pipelined ms", "pipelined_ms", ".3f"),
]


def plot(records: list[dict], path: pathlib.Path) -> None:
    """Blocked ms against buffers: the pass-through line and the real rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ok = [r for r in records if "error" not in r]
    for case, marker in (("gpt2s_148", "o"), ("gpt2s_stacked", "s")):
        tag = "stacked" if "stacked" in case else "tree"
        rs = [r for r in ok if r["case"] == case]
        ax.scatter([r["buffers"] for r in rs], [r["ms"] for r in rs], marker=marker)
        for r in rs:
            ax.annotate(f"{r['row']} ({tag})", (r["buffers"], r["ms"]), fontsize=7)
    ax.set_xlabel("buffers passed (inputs + outputs)")
    ax.set_ylabel("ms per blocked step")
    ax.set_title("A jitted step's wall time against its buffers")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    """Runs the benchmark; returns what it writes to the JSON file."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(RESULTS / "dispatch_floor.json"))
    ap.add_argument(
        "--optimizers", default="polar2", help="low-bit presets' fused rows"
    )
    ap.add_argument("--impl", default="pallas", help="the fused rows' impl")
    ap.add_argument("--n-timed", type=int, default=60)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run, tiny trees")
    ap.add_argument("--replot", action="store_true", help="redraw --out's PNG only")
    args = ap.parse_args(argv)
    if args.replot:
        replot(pathlib.Path(args.out))
        return {}
    n, warm = (3, 1) if args.tiny else (args.n_timed, 8)
    optimizers = tuple(filter(None, args.optimizers.split(",")))
    result: dict[str, Any] = {"meta": step_speed.run_meta(args), "records": []}
    result["meta"].update(n_timed=n, n_warm=warm, passthrough=PASSTHROUGH)
    for case in CASES:
        shapes = step_speed.CASES[TINY[case] if args.tiny else case]
        result["records"] += case_rows(case, shapes, optimizers, args.impl, n, warm)
    result["summary"] = summarize(result["records"])
    print(_markdown.table(result["records"], COLUMNS))
    print(json.dumps(result["summary"], indent=1))
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    plot(result["records"], path.with_suffix(".png"))
    return result


def replot(path: pathlib.Path) -> None:
    """The PNG of a written JSON file, again (``--replot``)."""
    plot(json.loads(path.read_text())["records"], path.with_suffix(".png"))


if __name__ == "__main__":
    main()
