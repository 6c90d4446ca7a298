"""Peak GPU memory of a real jitted training step: optax.adamw vs low-bit states.

Run on a GPU (``python -m benchmarks.peak_memory``). The model is a
GPT-2-medium-sized `benchmarks.models.TinyGPT` (d_model 1024, 16 heads,
vocabulary 50257, tied embeddings; 24 layers: 355M parameters) trained on
random tokens (memory does not depend on the data). Every optimizer runs in
its own process (without preallocation, two at a time; the limit is 95% of
the device's memory), so ``memory_stats()["peak_bytes_in_use"]`` is that
optimizer's peak alone: the jitted step (loss, gradients, optimizer update,
parameters and state donated) runs 3 times after ``jax.jit(init)``.

Each optimizer is measured at two depths (12 and 24 layers, same width and
batch). The peak grows linearly with the parameter count, so the two points
give bytes per parameter (weights, gradients and optimizer state: the slope)
and a fixed part (activations, workspace), and from them the largest model of
this family that fits in the device's memory (``bytes_limit``). Writes
``benchmarks/results/peak_memory.json`` (``$OUT`` when set) and prints a
table; the baseline ``optax.adamw`` is measured in the same run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import subprocess
import sys
import time

OPTIMIZERS = (
    "optax.adamw",
    "optax.adamw(mu_dtype=bf16)",
    "adamw_polar(bits=2)",
    "fused_adamw_polar(bits=2)",
    "fused_adamw_polar(bits=1.5)",
    "adamw_8bit",
    "adamw_4bit",
)
DEPTHS = (12, 24)


def _optimizer(name: str):
    import jax.numpy as jnp
    import optax

    import optax_lowbit as lowbit

    lr = 1e-4
    table = {
        "optax.adamw": lambda: optax.adamw(lr),
        "optax.adamw(mu_dtype=bf16)": lambda: optax.adamw(lr, mu_dtype=jnp.bfloat16),
        "adamw_polar(bits=2)": lambda: lowbit.adamw_polar(lr, bits=2),
        "fused_adamw_polar(bits=2)": lambda: lowbit.adamw_polar(lr, bits=2, fused=True),
        "fused_adamw_polar(bits=1.5)": lambda: lowbit.adamw_polar(
            lr, bits=1.5, fused=True
        ),
        "adamw_8bit": lambda: lowbit.adamw_8bit(lr),
        "adamw_4bit": lambda: lowbit.adamw_4bit(lr),
    }
    return table[name]()


def child(name: str, n_layers: int, batch: int, seq: int) -> dict:
    """One optimizer at one depth, in a fresh process: the measured peak."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from benchmarks import models

    def build():
        model = models.TinyGPT(
            vocab=50257,
            d_model=1024,
            n_layers=n_layers,
            n_heads=16,
            seq_len=seq,
            tie_embeddings=True,
            rngs=nnx.Rngs(0),
        )
        graphdef, state = nnx.split(model)
        return graphdef, nnx.to_pure_dict(state)  # plain dicts of arrays

    graphdef, params = build()
    n_params = sum(x.size for x in jax.tree.leaves(params))
    opt = _optimizer(name)
    fused = hasattr(opt, "step")
    state = jax.jit(opt.init)(params)

    def loss(p, tokens):
        return models.loss_fn(nnx.merge(graphdef, p), tokens)

    def step(p, s, tokens):
        grads = jax.grad(loss)(p, tokens)
        if fused:
            return opt.step(grads, s, p)
        u, s = opt.update(grads, s, p)
        return optax.apply_updates(p, u), s

    jstep = jax.jit(step, donate_argnums=(0, 1))
    tokens = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0, 50257)
    t0 = time.perf_counter()
    compiled = jstep.lower(params, state, tokens).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    for _ in range(3):
        params, state = compiled(params, state, tokens)
    jax.block_until_ready((params, state))
    stats = jax.devices()[0].memory_stats() or {}
    state_bytes = sum(int(x.nbytes) for x in jax.tree.leaves(state))
    return {
        "optimizer": name,
        "n_layers": n_layers,
        "n_params": int(n_params),
        "peak_bytes": int(stats.get("peak_bytes_in_use", -1)),
        "bytes_limit": int(stats.get("bytes_limit", -1)),
        "state_bytes": state_bytes,
        "state_bytes_per_param": state_bytes / n_params,
        "temp_bytes": int(mem.temp_size_in_bytes) if mem is not None else None,
        "compile_s": compile_s,
        "finite": bool(
            all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(params))
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", default=None)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--only", default="")
    ap.add_argument("--depths", default=",".join(map(str, DEPTHS)))
    ap.add_argument("--parallel", type=int, default=2)
    args = ap.parse_args()
    if args.child:
        print(
            "RESULT " + json.dumps(child(args.child, args.layers, args.batch, args.seq))
        )
        return
    import jax

    meta = {
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
        "date": datetime.date.today().isoformat(),
        "commit": os.environ.get("OPTAX_LOWBIT_COMMIT", ""),
        "model": "TinyGPT d_model=1024 heads=16 vocab=50257 tied, random tokens",
        "batch": args.batch,
        "seq": args.seq,
    }
    print(json.dumps(meta), flush=True)
    only = [
        o
        for o in OPTIMIZERS
        if not args.only or any(s in o for s in args.only.split(","))
    ]
    depths = [int(d) for d in args.depths.split(",")]
    out_dir = os.environ.get("OUT") or os.path.join(
        os.path.dirname(__file__), "results"
    )
    path = os.path.join(out_dir, "peak_memory.json")
    # Children in pairs (no preallocation, so each process's allocator peak is
    # its own; two fit on the device together); the limit is 95% of memory.
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = "0.95"
    keys = ("optimizer", "n_layers", "n_params", "peak_bytes", "error")

    def run_child(job):
        name, n_layers = job
        cmd = [sys.executable, "-m", "benchmarks.peak_memory", "--child", name]
        cmd += ["--layers", str(n_layers), "--batch", str(args.batch)]
        cmd += ["--seq", str(args.seq)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            err = (proc.stderr or proc.stdout)[-600:]
            return {"optimizer": name, "n_layers": n_layers, "error": err}
        return json.loads(lines[-1][len("RESULT ") :])

    records = []
    jobs = [(name, d) for name in only for d in depths]
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.parallel) as pool:
        for rec in pool.map(run_child, jobs):
            rec.update(meta)
            records.append(rec)
            print(json.dumps({k: rec.get(k) for k in keys}), flush=True)
            with open(path, "w") as fh:
                json.dump({"meta": meta, "records": records}, fh, indent=1)
    base = {
        r["n_layers"]: r["peak_bytes"]
        for r in records
        if r["optimizer"] == "optax.adamw" and "peak_bytes" in r
    }
    summary = []
    for name in only:
        pts = sorted(
            (r["n_params"], r["peak_bytes"], r["bytes_limit"])
            for r in records
            if r["optimizer"] == name and "peak_bytes" in r
        )
        row = {"optimizer": name}
        if pts:
            big = [r for r in records if r["optimizer"] == name and "peak_bytes" in r][
                -1
            ]
            row["peak_GiB_gpt2_medium"] = big["peak_bytes"] / 2**30
            if big["n_layers"] in base:
                row["ratio_vs_optax_adamw"] = big["peak_bytes"] / base[big["n_layers"]]
        if len(pts) >= 2:
            (p1, b1, lim), (p2, b2, _) = pts[0], pts[-1]
            slope = (b2 - b1) / (p2 - p1)
            fixed = b1 - slope * p1
            row["bytes_per_param"] = slope
            row["fixed_GiB"] = fixed / 2**30
            row["largest_params_B"] = (lim - fixed) / slope / 1e9
        summary.append(row)
    with open(path, "w") as fh:
        json.dump({"meta": meta, "records": records, "summary": summary}, fh, indent=1)
    print(f"\n{meta}")
    print(
        f"{'optimizer':30s} {'peak GiB':>9s} {'ratio':>6s} {'B/param':>8s} "
        f"{'fixed GiB':>9s} {'largest (B params)':>18s}"
    )
    for r in summary:
        print(
            f"{r['optimizer']:30s} {r.get('peak_GiB_gpt2_medium', float('nan')):9.2f} "
            f"{r.get('ratio_vs_optax_adamw', float('nan')):6.2f} "
            f"{r.get('bytes_per_param', float('nan')):8.2f} "
            f"{r.get('fixed_GiB', float('nan')):9.2f} "
            f"{r.get('largest_params_B', float('nan')):18.2f}"
        )


if __name__ == "__main__":
    main()
