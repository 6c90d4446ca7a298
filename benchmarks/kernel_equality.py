"""The kernel paths of the Adam presets against their jnp definition, on a tree.

For each preset, three optimizers step the same parameters with the same
gradients: ``impl="jnp"`` (the codecs' definitions, the reference), ``impl=
"pallas"`` (the chain: the kernel returns updates, `optax.apply_updates`
applies them) and ``impl="pallas", fused=True`` (the kernel applies AdamW).
After every step the chain's and the fused step's state arrays are compared
with the reference's by a digest of their bytes (every code and scale bit for
bit), and their parameters by the largest difference relative to the leaf's
largest value. A GPU run is the check that a kernel change keeps the jnp
path's codes on the compiled kernel (CI checks the interpreted kernel);
``--tiny`` runs the same on a small tree in the Pallas interpreter (CPU).

    python -m benchmarks.kernel_equality --optimizers polar2,4bit

writes ``benchmarks/results/kernel_equality.json`` (``--out``) with each
record's ``optimizer``, ``path``, ``step``, ``state_arrays``,
``state_arrays_differ`` and ``params_max_rel``, the kernels' launch count in
the step's program (``pallas_calls``), device, versions, date and commit;
it exits with status 1 when any state array differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _kernel_args, step_speed

#: the small tree of ``--tiny``: a whole row of 384, padded rows, a float leaf
TINY_TREE = {"a": (8, 768), "b": (9, 1000), "bias": (200,)}


def digests(tree) -> list[str]:
    """A SHA-1 of each array's bytes, in leaf order."""
    return [
        hashlib.sha1(np.asarray(x).tobytes()).hexdigest() for x in jax.tree.leaves(tree)
    ]


def grads_at(params, step: int):
    """Fresh gradients for ``step``: a nonlinear function of the parameters."""
    return jax.tree.map(
        lambda p: jnp.sin(37.0 * p + step) * (1.0 + step) + 0.01 * p, params
    )


def check(name: str, params, steps: int) -> list[dict]:
    """``steps`` steps of preset ``name``'s chain and fused kernel paths
    against its jnp path (module docstring); one record per path and step."""
    alias, kw = step_speed.LOWBIT[name]
    kw = dict(kw, weight_decay=1e-2)
    ref = alias(1e-3, impl="jnp", **kw)
    opts = {
        "chain": alias(1e-3, impl="pallas", **kw),
        "fused": alias(1e-3, impl="pallas", fused=True, **kw),
    }
    # `step_speed.train_step`: ``(params, state)`` of a chain (the updates
    # applied) or a fused step, its arguments in `step_speed.step_args`' order
    args = step_speed.step_args
    g0 = grads_at(params, 0)
    fns = {path: step_speed.train_step(path, o) for path, o in opts.items()}
    states = {path: (o.init(params), params) for path, o in opts.items()}
    calls = {
        path: str(jax.make_jaxpr(fn)(*args(g0, states[path][0], params))).count(
            "pallas_call"
        )
        for path, fn in fns.items()
    }
    ref_step = jax.jit(step_speed.train_step("chain", ref))
    steps_of = {path: jax.jit(fn) for path, fn in fns.items()}
    s_ref, p_ref = ref.init(params), params
    out = []
    for step in range(steps):
        g = grads_at(params, step)
        p_ref, s_ref = ref_step(*args(g, s_ref, p_ref))
        want = digests(s_ref)
        for path, fn in steps_of.items():
            s, p = states[path]
            p, s = fn(*args(g, s, p))
            states[path] = (s, p)
            got = digests(s)
            rel = max(
                float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
                for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p_ref), strict=True)
            )
            out.append(
                {
                    "optimizer": name,
                    "path": path,
                    "step": step,
                    "pallas_calls": calls[path],
                    "state_arrays": len(want),
                    "state_arrays_differ": sum(
                        a != b for a, b in zip(got, want, strict=True)
                    ),
                    "params_max_rel": rel,
                }
            )
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizers", default="polar2", help="comma list of presets")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument(
        "--tiny", action="store_true", help="a small tree (CPU: the interpreter)"
    )
    parser.add_argument("--out", default="benchmarks/results/kernel_equality.json")
    _kernel_args.add(parser)
    args = parser.parse_args(argv)
    _kernel_args.apply(args)
    names = [n for n in args.optimizers.split(",") if n]
    for n in names:
        if n not in step_speed.LOWBIT:
            parser.error(
                f"--optimizers: {n!r} is not one of {sorted(step_speed.LOWBIT)}"
            )
    shapes = TINY_TREE if args.tiny else step_speed.CASES["gpt2s_148"]
    params = step_speed.make_tree(shapes, jax.random.key(0))
    meta = step_speed.run_meta(argparse.Namespace(impl="pallas"))
    meta["case"] = "tiny" if args.tiny else "gpt2s_148"
    t0 = time.perf_counter()
    records = [r for n in names for r in check(n, params, args.steps)]
    meta["seconds"] = time.perf_counter() - t0
    print(f"{'optimizer':10} {'path':6} step launches arrays differ params_max_rel")
    for r in records:
        print(
            f"{r['optimizer']:10} {r['path']:6} {r['step']:4} {r['pallas_calls']:8} "
            f"{r['state_arrays']:6} {r['state_arrays_differ']:6} "
            f"{r['params_max_rel']:.2e}"
        )
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    print(f"wrote {path}")
    return 1 if any(r["state_arrays_differ"] for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
