"""The kernels on several GPUs: per-shard Pallas steps vs the jnp path.

Run on a machine with two or more GPUs (``python -m benchmarks.sharded_kernels``).
Under explicit mesh axes over every device, a tree of leaves sharded on their
leading axis is stepped twice by ``adamw_polar`` (``impl="pallas"``: the
kernel inside ``jax.shard_map``, per shard), by the same with ``impl="jnp"``
and by ``fused_adamw_polar``, at 2 and 1.5 bits. It records the fraction of
state entries that differ from the jnp path (the shard offsets feed the
stochastic-rounding positions, so it should be 0 up to float ties), whether
the compiled step has an all-gather, and the step time of each against
``optax.adamw`` in the same run. Writes ``$OUT/sharded_kernels.json`` (or
``benchmarks/results/``) and prints a table.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_lowbit as lowbit
from benchmarks import step_speed


def main() -> None:
    n_dev = jax.device_count()
    mesh = jax.make_mesh(
        (n_dev,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,)
    )
    meta = {
        "device": str(jax.devices()[0].device_kind),
        "n_devices": n_dev,
        "jax_version": jax.__version__,
        "date": datetime.date.today().isoformat(),
        "commit": os.environ.get("OPTAX_LOWBIT_COMMIT", ""),
    }
    print(json.dumps(meta), flush=True)
    shapes = {"w": (8192, 8192), "x": (16, 1024, 4096), "b": (4096,)}
    keys = jax.random.split(jax.random.key(0), len(shapes))
    with jax.set_mesh(mesh):
        params = {
            k: jax.device_put(
                0.02 * jax.random.normal(key, s),
                NamedSharding(mesh, P("data") if len(s) > 1 else P()),
            )
            for key, (k, s) in zip(keys, shapes.items(), strict=True)
        }
        grads = jax.tree.map(lambda p: jnp.sin(p * 50.0), params)
    records = []
    for bits in (2, 1.5):
        rows = {
            "optax.adamw": ("chain", optax.adamw(1e-3)),
            f"adamw_polar({bits})/jnp": (
                "chain",
                lowbit.adamw_polar(1e-3, bits=bits, impl="jnp"),
            ),
            f"adamw_polar({bits})/pallas": (
                "chain",
                lowbit.adamw_polar(1e-3, bits=bits, impl="pallas"),
            ),
            f"fused_adamw_polar({bits})/pallas": (
                "fused",
                lowbit.adamw_polar(1e-3, bits=bits, impl="pallas", fused=True),
            ),
        }
        states = {}
        for name, (kind, opt) in rows.items():
            with jax.set_mesh(mesh):
                state = jax.jit(opt.init)(params)
                jstep = jax.jit(step_speed.train_step(kind, opt))
                args = step_speed.step_args(grads, state, params)
                hlo = jstep.lower(*args).compile().as_text()
                p, s = params, state
                for _ in range(2):
                    p, s = jstep(*step_speed.step_args(grads, s, p))
                jax.block_until_ready((p, s))
                states[name] = s
                times = []
                for _ in range(20):
                    t0 = time.perf_counter()
                    out = jstep(*args)
                    jax.block_until_ready(out)
                    times.append((time.perf_counter() - t0) * 1e3)
            rec = dict(meta, optimizer=name, path=kind, ms=statistics.median(times))
            rec["all_gather"] = bool(re.search(r"\ball-gather", hlo))
            records.append(rec)
        ref = jax.tree.leaves(states[f"adamw_polar({bits})/jnp"])
        base_ms = records[-4]["ms"]  # this precision's optax.adamw row
        for rec in records[-4:]:
            rec["ratio_vs_optax_adamw"] = rec["ms"] / base_ms
            if rec["optimizer"] != "optax.adamw":
                leaves = jax.tree.leaves(states[rec["optimizer"]])
                diff = [
                    float(np.mean(np.asarray(a) != np.asarray(b)))
                    for a, b in zip(leaves, ref, strict=True)
                ]
                rec["max_state_mismatch_vs_jnp"] = max(diff)
            print(
                json.dumps(
                    {
                        k: rec.get(k)
                        for k in (
                            "optimizer",
                            "ms",
                            "ratio_vs_optax_adamw",
                            "all_gather",
                            "max_state_mismatch_vs_jnp",
                        )
                    }
                ),
                flush=True,
            )
    out_dir = os.environ.get("OUT") or os.path.join(
        os.path.dirname(__file__), "results"
    )
    with open(os.path.join(out_dir, "sharded_kernels.json"), "w") as fh:
        json.dump({"meta": meta, "records": records}, fh, indent=1)


if __name__ == "__main__":
    main()
