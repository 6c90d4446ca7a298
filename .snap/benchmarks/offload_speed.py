"""Host-offloaded optimizer state: device memory saved and step time paid.

`optax_lowbit.offload(tx)` keeps ``tx``'s state in pinned host memory between
steps and moves it to the device inside the jitted step (issue 21, item 3).
This benchmark times, for each optimizer, the same jitted train step
(``update`` + ``apply_updates``) with the state
resident on the device and offloaded, on a GPT-2-small parameter tree (124M
parameters, 14 stacked leaves) and on one 256M-element leaf:

* ``device_state_bytes`` / ``host_state_bytes``: where the state lives between
  steps (read from each leaf's ``memory_kind``); the device memory an offload
  saves is the state's device bytes;
* ``ms``: median step time (nothing donated: see `donation_probe`), and
  ``ratio`` to the same optimizer on the device;
  ``pcie_gbps``: state bytes moved both ways per step over the step time;
* ``with_compute``: the same step beside an independent matmul chain (bf16,
  about as long as the fp32 optimizer step), as a forward/backward would be:
  how much of the transfer XLA hides behind compute. ``hidden`` is the share of
  the offload's extra time (alone) that disappears beside the compute.

Baselines in the same run: ``optax.adamw`` fp32 on the device and offloaded.

Usage::

    python -m benchmarks.offload_speed                   # GPU, ~2 min
    python -m benchmarks.offload_speed --tiny            # CPU smoke, seconds

Writes ``results/offload_speed.json`` (``--out``), prints a table.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time
import traceback
from typing import Any

import jax
import jax.numpy as jnp
import optax

import optax_lowbit as lowbit
from benchmarks import step_speed

RESULTS = pathlib.Path(__file__).resolve().parent / "results"

OPTIMIZERS = {
    "optax.adamw": lambda: optax.adamw(1e-3),
    "adamw_polar": lambda: lowbit.adamw_polar(1e-3),
    "adamw_4bit": lambda: lowbit.adamw_4bit(1e-3),
    "adamw_8bit": lambda: lowbit.adamw_8bit(1e-3),
}
CASES = {
    "gpt2s_stacked": step_speed.CASES["gpt2s_stacked"],
    "leaf_256M": step_speed.CASES["leaf_256M"],
    "tiny_tree": step_speed.CASES["tiny_tree"],
}


def placed_bytes(state: Any) -> tuple[int, int]:
    """``(device, host)`` bytes of a state's array leaves, by memory kind."""
    device = host = 0
    for leaf in jax.tree.leaves(state):
        if not hasattr(leaf, "nbytes"):
            continue
        kind = getattr(getattr(leaf, "sharding", None), "memory_kind", None)
        if kind is not None and "host" in kind:
            host += int(leaf.nbytes)
        else:
            device += int(leaf.nbytes)
    return device, host


#: A train step that donates an offloaded state (run in a child process: where
#: the runtime cannot alias a host buffer, it aborts the process).
_DONATION_SNIPPET = """
import jax, jax.numpy as jnp, optax, optax_lowbit as lowbit
p = {"w": jnp.ones((64, 256)), "b": jnp.ones((256,))}
g = jax.tree.map(lambda x: 0.1 * x, p)
tx = lowbit.offload(lowbit.adamw_polar(1e-3))
def step(g, s, p):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s
f = jax.jit(step, donate_argnums=(1, 2))
s = tx.init(p)
for _ in range(3):
    p, s = f(g, s, p)
jax.block_until_ready(p)
print("donation ok")
"""


def donation_probe() -> dict:
    """Whether a jitted step may donate an offloaded state on this backend."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", _DONATION_SNIPPET],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = (proc.stdout + proc.stderr).strip().splitlines() or [""]
    errors = [ln for ln in lines if "Error" in ln or "RAW:" in ln]
    return {
        "returncode": proc.returncode,
        "last_line": lines[-1][:300],
        "error": errors[-1][:500] if errors else None,
    }


def compute_chain(x: jax.Array, n: int) -> jax.Array:
    """``n`` dependent bf16 matmuls of ``x`` (a stand-in for forward/backward)."""
    for _ in range(n):
        x = jnp.tanh(x @ x)
    return x


def time_step(tx, params, grads, matmuls: int, x, n: int, warm: int) -> float:
    """Median ms of the donated train step (with ``matmuls`` beside it)."""

    def step(g, s, p, x):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, compute_chain(x, matmuls)

    state = tx.init(jax.tree.map(jnp.copy, params))
    p = jax.tree.map(jnp.copy, params)
    compiled = jax.jit(step).lower(grads, state, p, x).compile()
    times = []
    for i in range(warm + n):
        t0 = time.perf_counter()
        p, state, y = compiled(grads, state, p, x)
        jax.block_until_ready((p, state, y))
        if i >= warm:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench(case: str, name: str, params, grads, args) -> dict:
    """One (case, optimizer): device-resident vs offloaded, alone and beside
    compute. Errors are recorded, never hidden."""
    rec: dict[str, Any] = {"case": case, "optimizer": name}
    x = jnp.full((args.matmul_dim, args.matmul_dim), 0.01, jnp.bfloat16)
    try:
        for placement in ("device", "host"):
            tx = OPTIMIZERS[name]()
            if placement == "host":
                tx = lowbit.offload(tx)
            dev, host = placed_bytes(tx.init(params))
            rec[f"{placement}.device_state_bytes"] = dev
            rec[f"{placement}.host_state_bytes"] = host
            for matmuls in (0, args.matmuls):
                key = f"{placement}.ms" + ("_with_compute" if matmuls else "")
                rec[key] = time_step(
                    tx, params, grads, matmuls, x, args.n_timed, args.n_warm
                )
        x_only = time_step(
            optax.identity(), params, grads, args.matmuls, x, args.n_timed, 1
        )
        rec["compute_only_ms"] = x_only
        rec["ratio"] = rec["host.ms"] / rec["device.ms"]
        rec["ratio_with_compute"] = (
            rec["host.ms_with_compute"] / rec["device.ms_with_compute"]
        )
        moved = 2 * rec["host.host_state_bytes"]
        rec["pcie_gbps"] = moved / (rec["host.ms"] * 1e-3) / 1e9
        extra = rec["host.ms"] - rec["device.ms"]
        extra_c = rec["host.ms_with_compute"] - rec["device.ms_with_compute"]
        rec["hidden"] = None if extra <= 0 else 1.0 - max(extra_c, 0.0) / extra
        rec["device_bytes_saved"] = (
            rec["device.device_state_bytes"] - rec["host.device_state_bytes"]
        )
    except Exception as e:  # record, never fake
        rec["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        traceback.print_exc(limit=3)
    return rec


def table(records: list[dict]) -> str:
    """The printed table: one line per (case, optimizer)."""
    head = (
        f"{'case':14} {'optimizer':12} {'state MB':>9} {'dev ms':>7} {'host ms':>8} "
        f"{'ratio':>6} {'GB/s':>6} {'+cmp dev':>9} {'+cmp host':>10} {'hidden':>7}"
    )
    lines = [head]
    for r in records:
        if "error" in r:
            lines.append(f"{r['case']:14} {r['optimizer']:12} ERROR {r['error'][:60]}")
            continue
        hidden = "-" if r["hidden"] is None else f"{r['hidden']:.0%}"
        lines.append(
            f"{r['case']:14} {r['optimizer']:12} "
            f"{r['host.host_state_bytes'] / 1e6:9.1f} {r['device.ms']:7.2f} "
            f"{r['host.ms']:8.2f} {r['ratio']:6.2f} {r['pcie_gbps']:6.1f} "
            f"{r['device.ms_with_compute']:9.2f} {r['host.ms_with_compute']:10.2f} "
            f"{hidden:>7}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="gpt2s_stacked,leaf_256M")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    p.add_argument("--n-timed", type=int, default=20)
    p.add_argument("--n-warm", type=int, default=3)
    p.add_argument("--matmuls", type=int, default=4)
    p.add_argument("--matmul-dim", type=int, default=4096)
    p.add_argument("--tiny", action="store_true", help="CPU smoke: tiny tree")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.tiny:
        args.cases, args.n_timed, args.n_warm, args.matmul_dim = "tiny_tree", 3, 1, 64
    cases = [c for c in args.cases.split(",") if c]
    names = [n for n in args.optimizers.split(",") if n]
    for flag, values, known in (
        ("--cases", cases, CASES),
        ("--optimizers", names, OPTIMIZERS),
    ):
        bad = [v for v in values if v not in known]
        if bad or not values:
            p.error(f"{flag} {bad or values!r}: accepted {sorted(known)}")
    for flag in ("n_timed", "matmuls", "matmul_dim"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    meta = step_speed.run_meta(argparse.Namespace(impl="auto"))
    meta.update(argv=argv, note=__doc__.split("\n\n")[1].replace("\n", " "))
    meta["donation_probe"] = (
        {"skipped": "--tiny (a child process: seconds)"}
        if args.tiny
        else donation_probe()
    )
    print("donating an offloaded state:", meta["donation_probe"], flush=True)
    records = []
    for case in cases:
        params = step_speed.make_tree(CASES[case], jax.random.key(0))
        grads = step_speed.make_tree(CASES[case], jax.random.key(1))
        for name in names:
            records.append(bench(case, name, params, grads, args))
            print(table(records[-1:]).splitlines()[-1], flush=True)
        del params, grads
    print(table(records))
    out = pathlib.Path(args.out) if args.out else RESULTS / "offload_speed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"meta": meta, "records": records}
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
