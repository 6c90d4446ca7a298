"""Operations per element of the fused Adam kernels, counted offline (no GPU).

Run on any machine: ``python -m benchmarks.kernel_ops`` (``--json PATH`` to
write elsewhere than ``benchmarks/results/kernel_ops_cpu.json``).

For each preset's codec pair (``polar2``, ``polar1.5``, ``4bit``, ``8bit``;
π-Quant's preset pairs groups of 96 with a 128-group ``nu`` and takes no
kernel) and path (``chain``: the kernel writes ``u``; ``fused``: it
applies AdamW) it lowers one kernel launch for CUDA with the Pallas Triton
lowering forced (``jax.jit(...).trace(...).lower(lowering_platforms=("cuda",))``
works on a CPU-only jaxlib), catches the Triton module (TTIR) that Pallas
builds before serialising it, runs MLIR's ``canonicalize`` and ``cse`` on it
(what Triton itself runs first, `ir_counts`), and counts every operation
weighted by the elements of its result tensor (a ``16x64`` add counts 1024,
a scalar 1), divided by the elements one program handles. So the numbers are
*TTIR operations per element*, a proxy for instructions: Triton's later
passes and ptxas change them (a ``divf`` or ``sqrt`` becomes several SASS
instructions, loads may vectorise, constants become immediates), but a cut
here is a cut of work per element.

Columns (`CATEGORIES`): ``compute`` (arithmetic, compares, selects, casts,
math calls), ``memory`` (loads and stores, gathered table reads included),
``layout`` (reshape, transpose, join, split: register shuffles or shared
memory in Triton), ``free`` (constants, splats, broadcasts, iotas: not
counted in ``total``); ``divf`` and ``math`` (``tt.extern_elementwise``:
libdevice calls such as sqrt) are listed too, as they are the expensive
ones. This relies on JAX's private Pallas Triton lowering
(``jax._src.pallas.triton``): a JAX upgrade may move it.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import math
import os
import pathlib
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import jax
import jax.numpy as jnp

from optax_lowbit.kernels import _backend
from optax_lowbit.kernels import adam as kadam
from optax_lowbit.transforms import adam_presets

#: Per preset: ``(mu_codec, nu_codec)`` as the optimizers build them.
CASES: dict[str, Callable[[], tuple[Any, Any]]] = {
    "polar2": lambda: adam_presets.polar_codecs(2, "stochastic"),
    "polar1.5": lambda: adam_presets.polar_codecs(1.5, "stochastic"),
    "4bit": lambda: adam_presets.blockwise_codecs(4),
    "8bit": lambda: adam_presets.blockwise_codecs(8),
}
PATHS = ("chain", "fused")
#: A leaf whose last axis is a multiple of every group size (64, 128, 256)
#: and whose group count a 16-group block divides (no masked tail).
SHAPE = (16, 6144)
FREE = frozenset(
    {
        "arith.constant",
        "tt.splat",
        "tt.broadcast",
        "tt.expand_dims",
        "tt.make_range",
        "tt.get_program_id",
        "tt.func",
        "tt.return",
        "tt.reduce.return",
    }
)
LAYOUT = frozenset({"tt.reshape", "tt.trans", "tt.join", "tt.split"})
MEMORY = frozenset({"tt.load", "tt.store", "tt.addptr"})
CATEGORIES = ("total", "compute", "memory", "layout", "divf", "math")


def _elements(type_text: str) -> int:
    """Elements of a ``tensor<AxBx...>`` type (1 for a scalar)."""
    m = re.match(r"tensor<((?:\d+x)+)", type_text)
    if not m:
        return 1
    return math.prod(int(d) for d in m.group(1).rstrip("x").split("x"))


def _walk(op: Any) -> Iterator[Any]:
    for region in op.regions:
        for block in region.blocks:
            for inner in block.operations:
                yield inner.operation
                yield from _walk(inner.operation)


def ir_counts(module_op: Any) -> collections.Counter:
    """Operations of a Triton module, each weighted by its result's elements.

    The module is re-parsed in its context and simplified by MLIR's
    ``canonicalize`` and ``cse`` first (the Pallas lowering emits many
    duplicate index computations that Triton's own first passes remove).
    A store is weighted by the value it stores.

    Args:
      module_op: the ``builtin.module`` operation Pallas built.

    Returns:
      ``Counter`` of op name -> weighted count.
    """
    from jax._src.lib.mlir import ir, passmanager

    op = ir.Module.parse(module_op.get_asm(), context=module_op.context).operation
    passmanager.PassManager.parse(
        "builtin.module(canonicalize,cse)", context=op.context
    ).run(op)
    out: collections.Counter = collections.Counter()
    for o in _walk(op):
        types = [str(r.type) for r in o.results]
        if o.name == "tt.store":
            types = [str(o.operands[1].type)]
        out[o.name] += max([_elements(t) for t in types], default=1)
    return out


def per_element(counts: collections.Counter, elements: int) -> dict[str, float]:
    """`CATEGORIES` per element from `ir_counts` of a program of ``elements``."""
    cat: dict[str, float] = dict.fromkeys(CATEGORIES, 0.0)
    for name, n in counts.items():
        if name in FREE:
            continue
        kind = "layout" if name in LAYOUT else "memory" if name in MEMORY else "compute"
        cat[kind] += n
        cat["total"] += n
        if name == "arith.divf":
            cat["divf"] += n
        if name == "tt.extern_elementwise":
            cat["math"] += n
    return {k: round(v / elements, 2) for k, v in cat.items()}


@contextlib.contextmanager
def _capture_triton() -> Iterator[list[tuple[Any, int]]]:
    """Forces the Triton lowering and records ``(module, grid size)`` per kernel."""
    from jax._src.pallas.triton import pallas_call_registration as reg

    seen: list[tuple[Any, int]] = []
    lower = reg.lowering.lower_jaxpr_to_triton_module

    def spy(*args, **kwargs):
        result = lower(*args, **kwargs)
        seen.append((ir_counts(result.module.operation), math.prod(result.grid)))
        return result

    triton = _backend.Backend(interpret=False, lowering="triton")
    with (
        mock.patch.object(reg.lowering, "lower_jaxpr_to_triton_module", spy),
        mock.patch.object(_backend, "pick", lambda lowering=None: triton),
    ):
        yield seen


def count_case(name: str, path: str, shape: tuple[int, ...] = SHAPE) -> dict:
    """One record: the kernel of preset ``name`` on ``path``, per element.

    Args:
      name: a key of `CASES`.
      path: ``"chain"`` or ``"fused"``.
      shape: the leaf's shape (its groups must fill whole blocks).

    Returns:
      ``{"case", "path", "codecs", "elements_per_program", "ops", <CATEGORIES>}``
      with ``ops`` the per-element count of each TTIR operation.
    """
    mu_codec, nu_codec = CASES[name]()
    spec = jax.ShapeDtypeStruct(shape, jnp.float32)

    def step(g, p):
        hp = kadam.make_hp(0.9, 0.999, 1e-8, 0.0, 0.1, 0.01, 0.1, 1e-3, 0.01)
        return kadam.adam_update(
            g,
            mu_codec.zeros(shape),
            nu_codec.zeros(shape),
            hp,
            mu_codec=mu_codec,
            nu_codec=nu_codec,
            seeds=(1, 2),
            params=p if path == "fused" else None,
            impl="pallas",
        )

    with _capture_triton() as seen:
        jax.jit(step).trace(spec, spec).lower(lowering_platforms=("cuda",))
    if len(seen) != 1:
        raise RuntimeError(
            f"{name}/{path}: expected one Triton kernel, got {len(seen)}."
        )
    counts, programs = seen[0]
    elements = math.prod(shape) // programs
    return {
        "case": name,
        "path": path,
        "codecs": [mu_codec.name, nu_codec.name],
        "elements_per_program": elements,
        **per_element(counts, elements),
        "ops": {
            k: round(v / elements, 3) for k, v in counts.most_common() if k not in FREE
        },
    }


def _table(records: list[dict]) -> str:
    head = f"{'case':<10}{'path':<7}" + "".join(f"{c:>9}" for c in CATEGORIES)
    rows = [
        f"{r['case']:<10}{r['path']:<7}" + "".join(f"{r[c]:>9.1f}" for c in CATEGORIES)
        for r in records
    ]
    return "\n".join([head, *rows])


def _commit() -> str | None:
    head = pathlib.Path(__file__).resolve().parents[1] / ".git" / "HEAD"
    with contextlib.suppress(OSError, IndexError):
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            return (head.parent / ref[5:]).read_text().strip()
        return ref
    return None


def main(argv: list[str] | None = None) -> list[dict]:
    """Counts every case and path, prints the table and writes the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES), help="comma list of presets")
    ap.add_argument("--paths", default=",".join(PATHS), help="comma list of paths")
    ap.add_argument(
        "--json",
        default=str(pathlib.Path(__file__).parent / "results" / "kernel_ops_cpu.json"),
        help="where to write the records ('' for nowhere)",
    )
    args = ap.parse_args(argv)
    for name in args.cases.split(","):
        if name not in CASES:
            ap.error(f"--cases: {name!r} is not one of {tuple(CASES)}")
    records = [
        count_case(name, path)
        for name in args.cases.split(",")
        for path in args.paths.split(",")
    ]
    print(_table(records))
    if args.json:
        meta = {
            "what": "TTIR ops per element (canonicalize+cse), Triton lowering",
            "shape": list(SHAPE),
            "block_groups": kadam.DEFAULT_BLOCK_GROUPS,
            "jax_version": jax.__version__,
            "commit": _commit(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        out = pathlib.Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
        print(f"wrote {out}", file=sys.stderr)
    return records


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
