"""Operations per element of the fused kernels, counted offline (no GPU).

Run on any machine: ``python -m benchmarks.kernel_ops`` (``--json PATH`` to
write elsewhere than ``benchmarks/results/kernel_ops_cpu.json``).

For each preset's codec pair (``polar2``, ``polar1.5``, ``4bit``, ``8bit``;
π-Quant's preset pairs groups of 96 with a 128-group ``nu`` and takes no
kernel) and path (``chain``: the Adam kernel writes ``u``; ``fused``: it
applies AdamW; ``momentum``: Muon's momentum kernel, the same loop with
`rules.MomentumRule` over the preset's first-moment codec, writes ``m_hat``)
it lowers one kernel launch for CUDA with the Pallas Triton
lowering forced (``jax.jit(...).trace(...).lower(lowering_platforms=("cuda",))``
works on a CPU-only jaxlib), catches the Triton module (TTIR) that Pallas
builds before serialising it, runs MLIR's ``canonicalize`` and ``cse`` on it
(what Triton itself runs first, `ir_counts`), and counts every operation
weighted by the elements of its result tensor (a ``16x64`` add counts 1024,
a scalar 1), divided by the elements of one block (since v22 a program
loops over blocks; the loop body, counted once, is one block's work, and
the few scalar operations around the loop count once too). So the numbers are
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

Grouped launches (v6, `group_case`, ``--group-leaves``): the same lowering
of one `adam_update_many` over one leaf of `GROUP_SHAPE`, over 12 such
leaves (one launch), and over GPT-2 small's 50 quantized leaves (6 shapes)
one launch per leaf and grouped; each row gives the kernels lowered, the
seconds to trace and lower, the operations of the Triton modules (what
Triton compiles: a proxy for its compile time) and the TTIR operations per
element on one program's path (only its leaf's branch of the load and store
switches).
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
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from unittest import mock

import jax
import jax.numpy as jnp

from benchmarks import _kernel_args
from optax_lowbit.kernels import _backend, launch, rules
from optax_lowbit.kernels import adam as kadam
from optax_lowbit.transforms import adam_presets

#: Per preset: ``(mu_codec, nu_codec)`` as the optimizers build them.
CASES: dict[str, Callable[[], tuple[Any, Any]]] = {
    "polar2": lambda: adam_presets.polar_codecs(2, "stochastic"),
    "polar1.5": lambda: adam_presets.polar_codecs(1.5, "stochastic"),
    "4bit": lambda: adam_presets.blockwise_codecs(4),
    "8bit": lambda: adam_presets.blockwise_codecs(8),
}
PATHS = ("chain", "fused", "momentum")
#: A leaf whose last axis is a multiple of every group size (64, 128, 256)
#: and whose group count every default block (8 or 16 groups) divides (no masked tail).
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


def _walk(op: Any, first_branch: bool = False) -> Iterator[Any]:
    regions = op.regions
    if first_branch and op.name == "scf.if":
        regions = regions[:1]  # the ``then`` branch: leaf 0 of a switch
    for region in regions:
        for block in region.blocks:
            for inner in block.operations:
                yield inner.operation
                yield from _walk(inner.operation, first_branch)


def _simplified(module_op: Any) -> Any:
    """A copy of a Triton module after MLIR's ``canonicalize`` and ``cse``."""
    from jax._src.lib.mlir import ir, passmanager

    op = ir.Module.parse(module_op.get_asm(), context=module_op.context).operation
    passmanager.PassManager.parse(
        "builtin.module(canonicalize,cse)", context=op.context
    ).run(op)
    return op


def ir_counts(module_op: Any, *, first_branch: bool = False) -> collections.Counter:
    """Operations of a Triton module, each weighted by its result's elements.

    The module is re-parsed in its context and simplified by MLIR's
    ``canonicalize`` and ``cse`` first (the Pallas lowering emits many
    duplicate index computations that Triton's own first passes remove).
    A store is weighted by the value it stores.

    Args:
      module_op: the ``builtin.module`` operation Pallas built.
      first_branch: count only the ``then`` region of each ``scf.if``: the
        path one program of a grouped launch runs (its leaf's loads and
        stores are one branch of a ``lax.switch`` chain), not every branch.

    Returns:
      ``Counter`` of op name -> weighted count.
    """
    out: collections.Counter = collections.Counter()
    for o in _walk(_simplified(module_op), first_branch):
        types = [str(r.type) for r in o.results]
        if o.name == "tt.store":
            types = [str(o.operands[1].type)]
        out[o.name] += max([_elements(t) for t in types], default=1)
    return out


def module_size(module_op: Any) -> int:
    """Operations in a Triton module after ``canonicalize`` and ``cse``.

    Unweighted and over every branch: what Triton compiles, so a proxy for
    its compile time (a v3c launch of 12 leaves held 12 copies of the body).

    Args:
      module_op: the ``builtin.module`` operation Pallas built.

    Returns:
      The number of operations.
    """
    return sum(1 for _ in _walk(_simplified(module_op)))


def config_module_size(config: str) -> int:
    """`module_size` of the Triton module a `triton_configs` entry carries.

    The entry's ``ir`` string is the module's MLIR bytecode, debug locations
    (file paths, line numbers) included, so its length moves with the
    checkout's path and with edits that change no operation; the operations
    do not.

    Args:
      config: one string of `triton_configs`.

    Returns:
      The number of operations after ``canonicalize`` and ``cse``.
    """
    from jax._src.lib.mlir import ir
    from jax._src.pallas.triton import lowering

    with lowering._new_ir_context():
        attrs = ir.DictAttr(ir.Attribute.parse(config))
        module = ir.Module.parse(ir.StringAttr(attrs["ir"]).value_bytes)
        return module_size(module.operation)


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
def _capture_triton(keep_ttir: bool = False) -> Iterator[list[dict[str, Any]]]:
    """Forces the Triton lowering and records each kernel it lowers.

    Args:
      keep_ttir: also keep each module's text under ``"ttir"`` (for `sass_counts`).

    Yields:
      A list that gets, per kernel, ``{"counts": ir_counts, "path_counts":
      ir_counts(first_branch=True), "module_ops": module_size, "programs":
      grid size, "lower_s": seconds of Pallas' jaxpr-to-TTIR lowering,
      "spy_s": seconds of the counting}``.
    """
    from jax._src.pallas.triton import pallas_call_registration as reg

    seen: list[dict[str, Any]] = []
    lower = reg.lowering.lower_jaxpr_to_triton_module

    def spy(*args, **kwargs):
        start = time.perf_counter()
        result = lower(*args, **kwargs)
        lower_s = time.perf_counter() - start
        module = result.module.operation
        seen.append(
            {
                "ttir": module.get_asm(enable_debug_info=False) if keep_ttir else None,
                "counts": ir_counts(module),
                "path_counts": ir_counts(module, first_branch=True),
                "module_ops": module_size(module),
                "programs": math.prod(result.grid),
                "lower_s": lower_s,
            }
        )
        seen[-1]["spy_s"] = time.perf_counter() - start - lower_s  # counting
        return result

    triton = _backend.Backend(interpret=False, lowering="triton")
    with (
        mock.patch.object(reg.lowering, "lower_jaxpr_to_triton_module", spy),
        mock.patch.object(_backend, "pick", lambda lowering=None: triton),
    ):
        yield seen


#: The SASS target of `sass_counts`: Hopper (H100/H200), 32 threads a warp.
SASS_ARCH = 90


def sass_counts(ttir: str, num_warps: int, elements: int) -> dict[str, Any]:
    """Hopper SASS instructions per element of one lowered kernel, offline.

    Compiles the module's TTIR with the ``triton`` package (``pip install
    triton``; its ``ptxas`` and ``nvdisasm`` need no GPU) for ``sm_90``, FMA
    contraction off as in JAX's own compile (the device's SASS had no FFMA:
    `benchmarks.kernel_counters`), and counts the static instructions of the
    disassembly. A kernel is one loop over blocks (v22; before, straight-line
    code for one block) whose body is straight-line code for one block, so
    static counts track executed ones per block: on an H200 the v20b polar2
    fused kernel executed 166 thread instructions per element where this
    counted ~185 (the leaf's shape changed the addressing code). Triton's
    version is not jaxlib's, so this is a proxy, closer than the TTIR count.

    Args:
      ttir: the module's text (`_capture_triton` with ``keep_ttir``).
      num_warps: the launch's warps (`kadam.default_num_warps`).
      elements: elements of one block.

    Returns:
      ``{"sass_per_element", "sass_alu_per_element",
      "sass_static_per_element", "sass_loop", "sass_registers",
      "sass_ops"}``: the instructions one block executes (a persistent
      kernel's loop body, else every instruction), those of them of the ALU
      pipe (compares, selects, min/max, logic, shifts: half rate on Hopper,
      16 lanes per scheduler), every static instruction, per element;
      whether the kernel loops; registers per thread; per-opcode counts of
      the block's instructions per element.
    """
    import subprocess
    import tempfile

    import triton

    bin_dir = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    kernel, _ = triton_compile(ttir, num_warps)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = pathlib.Path(tmp) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        dis = subprocess.run(
            [str(bin_dir / "nvdisasm"), "-c", str(cubin)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        res = subprocess.run(
            [str(bin_dir / "cuobjdump"), "--dump-resource-usage", str(cubin)],
            capture_output=True,
            text=True,
        ).stdout
    code = _disassembly(dis)
    loop = _loop(code)
    ops = collections.Counter(op for at, op, _ in code if loop is None or at in loop)
    per_thread = elements / (32 * num_warps)
    regs = re.search(r"REG:(\d+)", res)
    alu = sum(n for op, n in ops.items() if op in SASS_ALU)
    return {
        "sass_per_element": round(sum(ops.values()) / per_thread, 1),
        "sass_alu_per_element": round(alu / per_thread, 1),
        "sass_static_per_element": round(len(code) / per_thread, 1),
        "sass_loop": loop is not None,
        "sass_registers": int(regs.group(1)) if regs else None,
        "sass_ops": {k: round(v / per_thread, 2) for k, v in ops.most_common()},
    }


#: One instruction of ``nvdisasm -c``: address, predicate, opcode, operands.
_SASS_LINE = r"\s*/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(.*)"


def _disassembly(dis: str) -> list[tuple[int, str, str]]:
    """``(address, opcode, operands)`` per instruction of ``nvdisasm -c``;
    a branch's operands name its target's address (labels resolved)."""
    code, labels, pending = [], {}, []
    for line in dis.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            pending.append(label.group(1))
        m = re.match(_SASS_LINE, line)
        if m:
            addr = int(m.group(1), 16)
            labels.update(dict.fromkeys(pending, addr))
            pending = []
            code.append((addr, m.group(2), m.group(3)))
    return [
        (a, op, re.sub(r"\.L_x_\d+", lambda t: str(labels.get(t.group(0), -1)), rest))
        for a, op, rest in code
    ]


def _loop(code: list[tuple[int, str, str]]) -> range | None:
    """The addresses of the kernel's loop (a persistent launch's loop over
    blocks: the one backward branch), or ``None`` for straight-line code."""
    back = [
        range(int(t), a + 1)
        for a, op, rest in code
        if op == "BRA"
        for t in re.findall(r"\b(\d+)\b", rest)
        if 0 <= int(t) < a
    ]
    return max(back, key=len) if back else None


def triton_compile(ttir: str, num_warps: int) -> tuple[Any, float]:
    """Compiles a captured TTIR module for ``sm_90`` with the triton package.

    No GPU needed; Triton's own cache is bypassed (a fresh cache folder), so
    the seconds are a whole compile (TTIR to cubin) on this host. The
    module first goes through Triton's ``make_ttir`` passes (inlining,
    canonicalisation, CSE), as XLA's Triton pipeline runs them on a Pallas
    module: `triton.compile` skips a TTIR file's own stage, and Pallas'
    unsimplified modules (a constant and a splat per scalar literal) would
    reach the layout passes 2.5x larger than on the device (v29 in
    ``NOTES_kernels.md``).

    Args:
      ttir: the module's text (`_capture_triton` with ``keep_ttir``).
      num_warps: the launch's warps.

    Returns:
      ``(compiled kernel, seconds)``.
    """
    import tempfile

    import triton
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    # Triton's parser wants plain symbol names; Pallas names kernels with "-"
    text = re.sub(r'@"([^"]+)"', lambda m: "@" + re.sub(r"\W", "_", m.group(1)), ttir)
    target = GPUTarget("cuda", SASS_ARCH, 32)
    options = {"num_warps": num_warps, "enable_fp_fusion": False}
    with tempfile.TemporaryDirectory() as tmp:
        src = pathlib.Path(tmp) / "kernel.ttir"
        src.write_text(text)
        with mock.patch.dict(os.environ, {"TRITON_CACHE_DIR": tmp}):
            start = time.perf_counter()
            backend = make_backend(target)
            context = ir.context()
            ir.load_dialects(context)
            backend.load_dialects(context)
            module = ir.parse_mlir_module(str(src), context)
            module.context = context
            backend.make_ttir(module, {}, backend.parse_options(options), SASS_ARCH)
            simplified = pathlib.Path(tmp) / "simplified.ttir"
            simplified.write_text(str(module))
            kernel = triton.compile(str(simplified), target=target, options=options)
            return kernel, time.perf_counter() - start


def triton_configs(lowered_text: str) -> list[str]:
    """The backend configs of a lowered module's Triton custom calls.

    XLA's GPU compiler keys its kernel cache on this dictionary (the
    serialised Triton module, its name, grid and warps): each distinct one
    is one Triton compile of the step.

    Args:
      lowered_text: ``jax.jit(f).trace(...).lower(...).as_text()``.

    Returns:
      One string per custom call in the text (a function called many times
      counts once): the whole ``backend_config = {...}`` dictionary, its
      quoted strings (the module's bytes) included.
    """
    out = []
    for line in lowered_text.splitlines():
        if "@__gpu$xla.gpu.triton" not in line:
            continue
        start = line.index("backend_config = {") + len("backend_config = ")
        depth, quoted, escaped = 0, False, False
        for end in range(start, len(line)):
            c = line[end]
            if escaped:
                escaped = False
            elif quoted:
                escaped, quoted = c == "\\", c != '"'
            elif c == '"':
                quoted = True
            elif c in "{}":
                depth += 1 if c == "{" else -1
                if depth == 0:
                    break
        out.append(line[start : end + 1])
    return out


#: SASS opcodes issued to Hopper's ALU pipe (half the FMA pipe's rate).
SASS_ALU = frozenset(
    {
        "FSETP",
        "FSEL",
        "FMNMX",
        "SEL",
        "LOP3",
        "SHF",
        "ISETP",
        "PRMT",
        "VIMNMX",
        "IMNMX",
        "FCHK",
        "P2R",
        "R2P",
        "PLOP3",
        "SGXT",
        "LEA",
        "FLO",
        "POPC",
    }
)


def count_case(
    name: str,
    path: str,
    shape: tuple[int, ...] = SHAPE,
    *,
    sass: bool = False,
) -> dict:
    """One record: the kernel of preset ``name`` on ``path``, per element.

    Args:
      name: a key of `CASES`.
      path: ``"chain"``, ``"fused"`` or ``"momentum"`` (`PATHS`).
      shape: the leaf's shape (its groups must fill whole blocks).
      sass: also compile the module to Hopper SASS (`sass_counts`).

    The launch is configured as `optax_lowbit.kernels.adam`'s tunables are set
    (``--programs 0``: a persistent launch, v22); the record says how.

    Returns:
      ``{"case", "path", "codecs", "elements_per_block", "ops", <CATEGORIES>}``
      with ``ops`` the per-element count of each TTIR operation (and
      `sass_counts`' keys with ``sass``).
    """
    mu_codec, nu_codec = CASES[name]()
    spec = jax.ShapeDtypeStruct(shape, jnp.float32)
    muon = path == "momentum"
    # the launch's configuration: Muon's momentum is the first moment's codec
    # alone; Adam's pair as `adam_update` configures it
    if muon:
        config = kadam.launch_config(rules.MomentumRule(True), (mu_codec,))
    else:
        config = kadam.launch_config(rules.AdamRule(), (mu_codec, nu_codec))

    def step(g, p):
        if muon:
            hp = rules.momentum_hp(0.95, 0.05, 0.0975)
            mu = mu_codec.zeros(shape)
            return kadam.rule_update(config, g, (mu,), hp, (1,), impl="pallas")
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

    with _capture_triton(keep_ttir=sass) as seen:
        jax.jit(step).trace(spec, spec).lower(lowering_platforms=("cuda",))
    if len(seen) != 1:
        raise RuntimeError(
            f"{name}/{path}: expected one Triton kernel, got {len(seen)}."
        )
    counts = seen[0]["counts"]
    elements = config.block_elements  # per element of the block it launched
    extra = {}
    if sass:
        extra = sass_counts(seen[0]["ttir"], config.num_warps, elements)
    return {
        **extra,
        "case": name,
        "path": path,
        "codecs": [c.name for c in (mu_codec, nu_codec)[: 1 if muon else 2]],
        "elements_per_block": elements,
        "programs": kadam.DEFAULT_PROGRAMS,
        **per_element(counts, elements),
        "ops": {
            k: round(v / elements, 3) for k, v in counts.most_common() if k not in FREE
        },
    }


#: The leaf of the grouped-launch records: GPT-2 small's attention input
#: (12 such leaves in the tree).
GROUP_SHAPE = (768, 2304)
#: The quantized leaves of GPT-2 small (step_speed's ``gpt2s_148`` under the
#: default policy): 50 leaves of 6 shapes.
GPT2S_QUANTIZED = [(50257, 768), (1024, 768)] + [
    (768, 2304),
    (768, 768),
    (768, 3072),
    (3072, 768),
] * 12


def group_case(
    name: str,
    path: str,
    shapes: Sequence[tuple[int, ...]],
    leaves_per_launch: int | None = None,
    programs: int | None = None,
    compile_kernels: bool = False,
    xla_compile: bool = False,
) -> dict:
    """Lowers one `adam_update_many` over ``shapes`` for CUDA (Triton forced).

    With ``leaves_per_launch=0`` leaves of one shape share a launch (v6: the
    kernel body traced once, only the loads and stores switch on the leaf);
    ``1`` lowers one launch per leaf; ``None`` what a user gets
    (`kadam.default_leaves_per_launch`, v20). ``programs`` is
    `kadam.DEFAULT_PROGRAMS` for the lowering (``None``: one program per
    block; ``0``: persistent launches, v22).

    Args:
      name: a key of `CASES`.
      path: ``"chain"`` or ``"fused"``.
      shapes: the leaves' shapes.
      leaves_per_launch: as `adam_update_many`'s.
      programs: `kadam.DEFAULT_PROGRAMS` while lowering.
      compile_kernels: also compile each distinct kernel offline
        (`triton_compile`) and add the seconds.
      xla_compile: on a GPU, also time XLA's compile of the lowered program
        (``xla_compile_s``: its Triton kernels, each distinct config once, and
        the few XLA ops around them); ``None`` on a CPU host.

    Returns:
      ``{"case", "path", "leaves", "leaves_per_launch", "programs",
      "kernels", "compiled", "lower_s", "ttir_lower_s", "module_ops",
      "path_total"}`` (and ``"triton_compile_s"``): kernels lowered, Triton
      compiles XLA runs for the step (distinct `triton_configs`), seconds of
      the whole trace and lowering (the counting excluded) and of Pallas'
      TTIR lowering alone, operations of every kernel's module
      (`module_size`), the TTIR operations per element on one program's path
      of the first kernel (`ir_counts` with ``first_branch``), and the
      seconds of those compiles on this host.
    """
    mu_codec, nu_codec = CASES[name]()
    specs = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    n = len(shapes)

    def step(gs, ps):
        hp = kadam.make_hp(0.9, 0.999, 1e-8, 0.0, 0.1, 0.01, 0.1, 1e-3, 0.01)
        return kadam.adam_update_many(
            gs,
            [mu_codec.zeros(s) for s in shapes],
            [nu_codec.zeros(s) for s in shapes],
            [hp] * n,
            mu_codec=mu_codec,
            nu_codec=nu_codec,
            seeds=[(1, 2 + k) for k in range(n)],
            params=ps if path == "fused" else None,
            leaves_per_launch=leaves_per_launch,
        )

    start = time.perf_counter()
    with (
        mock.patch.object(kadam, "DEFAULT_PROGRAMS", programs),
        _capture_triton(keep_ttir=compile_kernels) as seen,
    ):
        lowered = jax.jit(step).trace(specs, specs).lower(lowering_platforms=("cuda",))
    lower_s = time.perf_counter() - start - sum(x["spy_s"] for x in seen)
    configs = set(triton_configs(lowered.as_text()))
    first = seen[0]  # the first launch's kernel: one program runs one block
    gsize = mu_codec.group_size
    elements = kadam.default_block_groups(gsize) * gsize
    rec = {
        "case": name,
        "path": path,
        "leaves": n,
        "leaves_per_launch": leaves_per_launch,
        "programs": programs,
        "kernels": len(seen),
        "compiled": len(configs),
        "lower_s": round(lower_s, 2),
        "ttir_lower_s": round(sum(x["lower_s"] for x in seen), 2),
        "module_ops": sum(x["module_ops"] for x in seen),
        "path_total": per_element(first["path_counts"], elements)["total"],
    }
    if compile_kernels:
        # one compile per distinct (module, grid): the grid is not in the TTIR
        runs = {(x["ttir"], x["programs"]) for x in seen}
        seconds = {}
        for ttir, _ in runs:
            if ttir not in seconds:
                seconds[ttir] = triton_compile(ttir, kadam.default_num_warps(elements))[
                    1
                ]
        rec["triton_compile_s"] = round(sum(seconds[t] for t, _ in runs), 2)
    if xla_compile:
        rec["shapes"] = [list(x) for x in dict.fromkeys(map(tuple, shapes))]
        rec["xla_compile_s"] = None
        if jax.default_backend() == "gpu":
            start = time.perf_counter()
            lowered.compile()
            rec["xla_compile_s"] = round(time.perf_counter() - start, 3)
    return rec


def launch_kinds(
    name: str, shapes: Sequence[tuple[int, ...]]
) -> list[list[tuple[int, ...]]]:
    """The distinct kernel launches of ``name``'s fused step over ``shapes``.

    Read from the step itself: its trace is watched (`launch.launch`, every
    jit cache cleared first) and each launch's leaf shapes kept once, so the
    grouping is `kadam.adam_update_many`'s own.

    Args:
      name: a key of `CASES`.
      shapes: the quantized leaves' shapes (e.g. `GPT2S_QUANTIZED`).

    Returns:
      One list of leaf shapes per distinct launch, in order of first use.
    """
    seen = []
    real = launch.launch

    def spy(leaves, *args, **kwargs):
        seen.append(tuple(tuple(x[0].shape) for x in leaves))
        return real(leaves, *args, **kwargs)

    jax.clear_caches()
    with mock.patch.object(launch, "launch", spy):
        group_case(name, "fused", shapes)
    return [list(k) for k in dict.fromkeys(seen)]


def launch_compiles(
    name: str, shapes: Sequence[tuple[int, ...]], compile_kernels: bool = False
) -> list[dict]:
    """`group_case` of each of a step's distinct launches alone, XLA compile timed.

    Where a step's first compile goes, launch by launch (issue 18, item 4):
    on a GPU each record's ``xla_compile_s`` is XLA's compile of one launch
    (one Triton config); a throwaway compile of a small one-leaf launch runs
    first so that no record pays XLA's and Triton's first-use setup.

    Args:
      name: a key of `CASES`.
      shapes: the quantized leaves' shapes.
      compile_kernels: also Triton's offline compile of each launch's kernel
        on this host (``triton_compile_s``, `group_case`).

    Returns:
      One `group_case` record (``path="fused"``) per `launch_kinds` entry.
    """
    kinds = launch_kinds(name, shapes)
    group_case(name, "fused", [(7, 300)], xla_compile=True)  # warm-up
    kw = dict(xla_compile=True, compile_kernels=compile_kernels)
    return [group_case(name, "fused", k, **kw) for k in kinds]


def _group_table(records: list[dict], extra: Sequence[str] = ()) -> str:
    cols = ("leaves", "leaves_per_launch", "programs", "kernels", "compiled")
    cols += ("lower_s", "ttir_lower_s", "module_ops", "path_total", "triton_compile_s")
    cols += tuple(extra)
    head = f"{'case':<10}{'path':<7}" + "".join(f"{c:>18}" for c in cols)
    rows = [
        f"{r['case']:<10}{r['path']:<7}"
        + "".join(f"{r.get(c, '')!s:>18}" for c in cols)
        for r in records
    ]
    return "\n".join([head, *rows])


def _table(records: list[dict]) -> str:
    sass = ("sass_per_element", "sass_alu_per_element", "sass_static_per_element")
    sass += ("sass_registers",)
    cols = [*CATEGORIES, *(c for c in sass if c in records[0])]
    names = [
        c.replace("_per_element", "")
        .replace("sass_registers", "regs")
        .replace("sass_static", "static")
        for c in cols
    ]
    head = f"{'case':<10}{'path':<9}" + "".join(f"{c:>9}" for c in names)
    rows = [
        f"{r['case']:<10}{r['path']:<9}" + "".join(f"{r[c]:>9.1f}" for c in cols)
        for r in records
    ]
    return "\n".join([head, *rows])


def _commit() -> str | None:
    if os.environ.get("OPTAX_LOWBIT_COMMIT"):  # a device copy's .git may be stale
        return os.environ["OPTAX_LOWBIT_COMMIT"]
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
    ap.add_argument(
        "--group-leaves",
        type=int,
        default=12,
        help="also lower grouped launches (v6) of this many leaves of "
        f"{GROUP_SHAPE} and of GPT-2 small's 50 quantized leaves, per case, "
        "fused (0: skip)",
    )
    ap.add_argument(
        "--sass",
        action="store_true",
        help="also compile each kernel to Hopper SASS and count its instructions "
        "(needs the triton package: pip install triton)",
    )
    ap.add_argument(
        "--launch-compiles",
        action="store_true",
        help="also lower each distinct launch of GPT-2 small's fused step alone "
        "and, on a GPU (JAX_PLATFORMS=cuda), time XLA's compile of it",
    )
    _kernel_args.add(ap)
    args = ap.parse_args(argv)
    _kernel_args.apply(args)
    for name in args.cases.split(","):
        if name not in CASES:
            ap.error(f"--cases: {name!r} is not one of {tuple(CASES)}")
    records = [
        count_case(name, path, sass=args.sass)
        for name in args.cases.split(",")
        for path in args.paths.split(",")
    ]
    print(_table(records))
    groups = []
    if args.group_leaves:
        for name in args.cases.split(","):
            groups += [
                group_case(name, "fused", [GROUP_SHAPE]),
                group_case(
                    name,
                    "fused",
                    [GROUP_SHAPE] * args.group_leaves,
                    leaves_per_launch=0,
                ),
                group_case(name, "fused", GPT2S_QUANTIZED, leaves_per_launch=0),
            ]
            # what the step compiles on GPT-2 small: per leaf and by default,
            # one program per block and persistent (v22)
            groups += [
                group_case(
                    name,
                    "fused",
                    GPT2S_QUANTIZED,
                    leaves_per_launch=per,
                    programs=programs,
                    compile_kernels=args.sass,
                )
                for per in (1, None)
                for programs in (None, 0)
            ]
        print(_group_table(groups))
    compiles = []
    if args.launch_compiles:
        for name in args.cases.split(","):
            compiles += launch_compiles(name, GPT2S_QUANTIZED, args.sass)
        print(_group_table(compiles, ("shapes", "xla_compile_s")))
    if args.json:
        meta = {
            "what": "TTIR ops per element (canonicalize+cse), Triton lowering",
            "shape": list(SHAPE),
            "block_groups": kadam.DEFAULT_BLOCK_GROUPS,
            "max_block_elements": kadam.MAX_BLOCK_ELEMENTS,
            "jax_version": jax.__version__,
            "commit": _commit(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        out = pathlib.Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        meta["device"] = jax.devices()[0].device_kind
        doc = {"meta": meta, "records": records, "groups": groups}
        if compiles:
            doc["launch_compiles"] = compiles
        out.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {out}", file=sys.stderr)
    return records


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
