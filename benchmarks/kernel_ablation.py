"""Where a fused kernel's instructions and time go: ablations of its parts.

Each *variant* replaces one part of the fused Adam kernel (the stream hash,
a codec's stochastic rounding, a codec's whole encode or decode, Adam's fault
rules) by a trivial stand-in and measures what is left. The variants compute
wrong results on purpose: this is a map of the kernel's cost, not a kernel.

Each variant runs in its own process (the kernel's trace is cached per
process, so a patch must be in place before the first trace) and always
counts TTIR operations per element (`kernel_ops.count_case`, any machine);
optionally:

* ``--sass`` (any machine, ``pip install triton``): `kernel_ops.count_case`
  with Hopper SASS counts (`kernel_ops.sass_counts`): TTIR, SASS and ALU-pipe
  instructions per element.
* ``--time`` (a GPU): the fused step of `step_speed`'s ``leaf_256M`` (or
  ``--case``), median and min ms of ``--n`` steps after 5 warm ones, with
  ``optax.adamw`` (plain jit) timed in the same process.

``python -m benchmarks.kernel_ablation --optimizer polar2 --sass --time``
writes ``benchmarks/results/kernel_ablation_<device>.json`` (``--out``) and
prints a table. Results: ``NOTES_kernels.md`` (v21).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import pathlib
import subprocess
import sys
from typing import Any
from unittest import mock

import jax.numpy as jnp

from benchmarks import _kernel_args, _markdown

base = importlib.import_module("optax_lowbit.codecs.base")
blockwise = importlib.import_module("optax_lowbit.codecs.blockwise")
polar = importlib.import_module("optax_lowbit.codecs.polar")
rules = importlib.import_module("optax_lowbit.kernels.rules")


def _never_up(x, lo, hi, uniform):
    """Blockwise stand-in: the search's index, no stochastic bracket."""
    del lo, hi, uniform
    return jnp.zeros(x.shape, bool)


def _no_ring_rounding(s, sector, n_ring, rings, *, signed):
    """Polar stand-in: ring 0, the sector as chosen."""
    del n_ring, rings, signed
    return jnp.zeros(s.shape, jnp.int32), sector


def _adam_without_faults(g, m, v, hp, *, nesterov):
    """Adam's step without the finite checks and the saturation."""
    del nesterov
    omb1, omb2, eps, eps_root, inv_bc1, inv_bc2 = (hp[k] for k in range(6))
    new_m = m + omb1 * (g - m)
    new_v = v + omb2 * (g * g - v)
    u = new_m * inv_bc1 / (jnp.sqrt(new_v * inv_bc2 + eps_root) + eps)
    return u, new_m, new_v


def _trivial_encode(self, x, tables, noise):
    """Any codec: zero codes, scale 1."""
    del tables, noise
    rows = (list(x) if isinstance(x, (list, tuple)) else [x])[0].shape[0]
    codes = [jnp.zeros((rows, n), jnp.uint8) for n in self.code_planes()]
    return codes, jnp.ones((rows, 1), self.scale_dtype)


def _trivial_decode(self, planes, scales, tables):
    """Any two-part codec: every element its group's scale."""
    del planes, tables
    s = scales.astype(jnp.float32)
    shape = (s.shape[0], self.group_size // 2)
    return [jnp.broadcast_to(s, shape), jnp.broadcast_to(s, shape)]


_POLAR, _BLOCK = polar.PolarCodec, blockwise.BlockwiseCodec
#: name -> the ``(object, attribute, stand-in)`` patches of the variant.
VARIANTS: dict[str, list[tuple[Any, str, Any]]] = {
    "kernel": [],
    "no hash": [
        (
            base,
            "dither_bits",
            lambda group, half, seed: (
                (group ^ jnp.asarray(seed, jnp.uint32))
                + jnp.arange(half, dtype=jnp.uint32)
            ),
        )
    ],
    "polar: no ring rounding": [(polar, "_round_radius", _no_ring_rounding)],
    "blockwise: no SR": [(blockwise, "_rounds_up", _never_up)],
    "adam: no fault rules": [(rules, "moment_step", _adam_without_faults)],
    "polar: trivial encode": [(_POLAR, "kernel_encode", _trivial_encode)],
    "blockwise: trivial encode": [(_BLOCK, "kernel_encode", _trivial_encode)],
    "polar: trivial decode": [(_POLAR, "kernel_decode", _trivial_decode)],
    "blockwise: trivial decode": [(_BLOCK, "kernel_decode", _trivial_decode)],
    "no codec work": [
        (cls, name, fn)
        for cls in (_POLAR, _BLOCK)
        for name, fn in (
            ("kernel_encode", _trivial_encode),
            ("kernel_decode", _trivial_decode),
        )
    ],
}


@contextlib.contextmanager
def patched(variant: str):
    """The variant's stand-ins in place (a `VARIANTS` key).

    JAX's caches are cleared on entry and on exit: the kernels' launches and
    their codec math are jitted (`launch._many_leaves`,
    `loop.compute_block_traced_once`), so a trace cached before (or under) the
    stand-ins would otherwise be reused with the wrong code.
    """
    import jax

    jax.clear_caches()
    try:
        with contextlib.ExitStack() as stack:
            for obj, name, value in VARIANTS[variant]:
                stack.enter_context(mock.patch.object(obj, name, value))
            yield
    finally:
        jax.clear_caches()


def measure(optimizer: str, variant: str, sass: bool, time: bool, case: str, n: int):
    """One variant's record, measured in this process."""
    rec: dict[str, Any] = {"optimizer": optimizer, "variant": variant}
    with patched(variant):
        from benchmarks import kernel_ops

        r = kernel_ops.count_case(optimizer, "fused", sass=sass)
        rec["ttir"] = r["total"]
        if sass:
            rec.update(
                sass=r["sass_per_element"],
                sass_alu=r["sass_alu_per_element"],
                registers=r["sass_registers"],
            )
        if time:
            import jax

            from benchmarks import step_speed as ss

            shapes = ss.CASES[case]
            params = ss.make_tree(shapes, jax.random.key(0))
            grads = ss.make_tree(shapes, jax.random.key(1))
            rec["case"] = case
            for row in ss.rows_for(
                case, optimizers=(optimizer,), paths=("xla", "fused")
            ):
                if row.optimizer not in (optimizer, "optax.adamw"):
                    continue
                c = ss.compile_row(row, params, grads)
                ms, low, _ = ss.time_fn(c.run, c.state, c.params, grads, n=n, warm=5)
                key = "baseline" if row.optimizer == "optax.adamw" else "fused"
                rec[f"{key}_ms"], rec[f"{key}_min_ms"] = ms, low
                del c
            rec["ratio_min"] = rec["fused_min_ms"] / rec["baseline_min_ms"]
    return rec


COLUMNS: list[_markdown.Column] = [
    ("optimizer", "optimizer", ""),
    ("variant", "variant", ""),
    ("TTIR", "ttir", ".1f"),
    ("SASS", "sass", ".1f"),
    ("SASS ALU", "sass_alu", ".1f"),
    ("ms", "fused_ms", ".3f"),
    ("min ms", "fused_min_ms", ".3f"),
    ("ratio (min)", "ratio_min", ".2f"),
]


def table(records: list[dict]) -> str:
    return _markdown.table(records, COLUMNS)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--optimizer", default="polar2", help="a kernel_ops.CASES preset")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list")
    ap.add_argument("--sass", action="store_true", help="offline SASS counts")
    ap.add_argument("--time", action="store_true", help="time the step (GPU)")
    ap.add_argument("--case", default="leaf_256M", help="step_speed case to time")
    ap.add_argument("--n", type=int, default=50, help="timed steps")
    ap.add_argument("--out", default=None, help="JSON path")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    _kernel_args.add(ap)
    args = ap.parse_args(argv)
    _kernel_args.apply(args)
    from benchmarks import kernel_ops

    if args.optimizer not in kernel_ops.CASES:
        ap.error(
            f"--optimizer {args.optimizer!r} is not one of {tuple(kernel_ops.CASES)}"
        )
    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"--variants: {v!r} is not one of {tuple(VARIANTS)}")
    if args.n < 1:
        ap.error(f"--n must be >= 1, got {args.n}")
    if args.child:  # one variant, in this process
        rec = measure(
            args.optimizer, variants[0], args.sass, args.time, args.case, args.n
        )
        print("RECORD " + json.dumps(rec), flush=True)
        return [rec]
    records = []
    for v in variants:
        cmd = [sys.executable, "-m", "benchmarks.kernel_ablation", "--child"]
        cmd += ["--optimizer", args.optimizer, "--variants", v, "--case", args.case]
        cmd += ["--n", str(args.n)] + ["--sass"] * args.sass + ["--time"] * args.time
        cmd += _kernel_args.argv()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = [ln[7:] for ln in proc.stdout.splitlines() if ln.startswith("RECORD ")]
        rec = (
            json.loads(found[0])
            if found
            else {
                "optimizer": args.optimizer,
                "variant": v,
                "error": proc.stderr[-1500:],
            }
        )
        records.append(rec)
        print(table([rec]).splitlines()[-1], flush=True)
    import jax

    from benchmarks.train_lm_long import git_commit

    meta = {
        "device": str(jax.devices()[0].device_kind),
        "jax_version": jax.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "argv": sys.argv[1:] if argv is None else argv,
        "what": "each variant replaces one part of the fused kernel by a trivial "
        "stand-in (wrong results on purpose): a cost map, not a kernel",
    }
    out = pathlib.Path(args.out or "benchmarks/results/kernel_ablation.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
    print(table(records))
    print(f"wrote {out}")
    return records


if __name__ == "__main__":
    main()
