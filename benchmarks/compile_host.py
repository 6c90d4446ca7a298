"""First-step compile, part by part: trace, lowering (and on a GPU, compile).

Issue 18, item 4 asks a model's first-step compile to stay within 2x
`optax.adamw`'s. A first step is the host's trace and lowering of the step,
then XLA's compile (with Triton's compile of each distinct kernel). This
benchmark times the parts apart, each row in a fresh Python process so that
everything a user's first step pays counts (a codec's tables, the kernels'
traces, JAX's caches start empty):

* ``trace_s``: ``jax.jit(step).trace(grads, params, state)`` of the fused step
  (`step_speed.train_step`, its argument order and rows), on abstract arrays;
* ``lower_s``: ``.lower()`` for CUDA: on a CPU host the Pallas kernels are
  lowered to Triton (forced, as `benchmarks.kernel_ops` does), so the host's
  part of a GPU compile is measured here without a GPU;
* ``hlo_ops``: operations in the lowered module's text (one per ``=``);
* ``triton_configs``, ``triton_chars``, ``triton_ops``: the distinct Triton
  kernels in it (each module and grid, what XLA's kernel cache keys on), their
  serialised size (debug locations included) and their operations;
* ``compile_s``: ``.compile()`` (GPU only; ``null`` on a CPU host);
* ``gc_s``, ``gc_full``: the seconds Python's garbage collector took during
  the trace, lowering and compile (part of their times), and its full
  collections;
* ``init_s``: the row's first ``opt.init`` of the case's parameters (zeros,
  concrete, to ``block_until_ready``; timed before the rest): the state a
  user's first step needs, not part of the ratios (item 4 is the step's).

With ``--cache`` each row runs twice, both processes sharing a new JAX
persistent compilation cache (``JAX_COMPILATION_CACHE_DIR``, every entry
kept): the first pays the compile and writes the cache, the second is a
user's restart (a new notebook kernel, a resumed job), its parts recorded as
``cached_trace_s``, ``cached_lower_s`` and ``cached_compile_s`` (the trace and
the lowering are not cached; XLA's executable, Triton kernels included, is).

With ``--repeats N`` every row runs N times, round by round (each round one
fresh process per row, so a slow spell of the host falls on every row alike),
and each part is the median of its N runs (the runs kept under ``runs``): the
baseline's own first step varies by up to 1.5x between fresh processes on one
GPU machine (``NOTES_kernels.md``, v27), so one run's ratio is not a measure.

Writes ``benchmarks/results/compile_host_<platform>.json`` (``--out``
overrides) with the device, versions, date and commit, and prints a table with
each row's ratio to `optax.adamw`'s row of the same case.

Examples::

    python -m benchmarks.compile_host                       # GPT-2 small, CPU
    python -m benchmarks.compile_host --cases tiny_tree --optimizers polar2
    python -m benchmarks.compile_host --cache              # and a restart's
    python -m benchmarks.compile_host --cache --repeats 5  # medians of 5 runs
    python -m benchmarks.compile_host --optimizers polar2 --leaves-per-launch 3
    python -m benchmarks.compile_host --optimizers polar1.5 \
        --ablations "kernel,no codec work" --repeats 3

With ``--ablations`` every low-bit row runs once per `benchmarks.kernel_ablation`
variant, the variant's stand-ins in place in the row's process (wrong results
on purpose: the kernels' codec work replaced by a trivial one, the launches,
operands and aliasing kept), so that a GPU's compile stage can be split into
what the codecs' Triton modules cost and the rest (each record's
``ablation``; ``"kernel"`` is the real kernel).

With ``--xla-events N`` (GPU) each row's ``.compile()`` runs under
`jax.profiler` and the record's ``xla_events`` lists the host events (XLA's
passes, its Triton and LLVM compiles, ``ptxas``) that took longest in all or
in themselves: ``[name, total ms, self ms, count]`` (`compile_events`); the
profiler's overhead is in that row's ``compile_s``
(``xla_events_profiled: true``), so time item 4 without it.

By default no row donates anything, as a first ``jax.jit(train_step)`` does;
then XLA adds a copy of every input a kernel updates in place. With
``--donate`` every row (the baseline too) jits its step with the parameters
and the state donated, as the README asks of users (``donated``;
``donated_inputs`` counts the lowered module's inputs marked for reuse).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

from benchmarks import _kernel_args

RESULTS = pathlib.Path(__file__).parent / "results"
#: The fused presets timed by default, and the baseline.
OPTIMIZERS = ("optax.adamw", "polar2", "polar1.5", "4bit", "8bit")


def one_row(
    case: str,
    optimizer: str,
    ablation: str = "kernel",
    xla_events: int = 0,
    donate: bool = False,
) -> dict[str, Any]:
    """Times one row's first trace, lowering (and compile on a GPU) here.

    Args:
      case: a key of `benchmarks.step_speed.CASES`.
      optimizer: ``"optax.adamw"`` or a preset of `step_speed.LOWBIT` (its
        fused row).
      ablation: a `benchmarks.kernel_ablation.VARIANTS` key whose stand-ins
        are in place for the whole row (``"kernel"``: none).
      xla_events: with N > 0 (GPU), the compile runs under the profiler and
        the record lists its N longest host events (`compile_events`).
      donate: jit the step with the parameters and the state donated (what
        the README asks of a user); else nothing donated.

    Returns:
      The record (without the run's metadata).
    """
    from benchmarks import kernel_ablation

    with kernel_ablation.patched(ablation):
        record = _timed(case, optimizer, xla_events, donate)
    return {**record, "ablation": ablation}


def compile_events(
    compile_fn: Callable[[], Any], top: int
) -> list[tuple[str, float, float, int]]:
    """Runs ``compile_fn`` under `jax.profiler`; its longest host events.

    Args:
      compile_fn: what to profile (a lowered step's ``.compile``).
      top: how many events to keep by total and by self time.

    Returns:
      ``(name, total ms, self ms, count)`` per event name over every host
      thread: the ``top`` names of the largest total and the ``top`` of the
      largest self time (the total less the events nested directly in it, on
      the same thread), by total, longest first.
    """
    import collections

    import jax
    from jax.profiler import ProfileData

    total: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    count: collections.Counter[str] = collections.Counter()
    with tempfile.TemporaryDirectory(prefix="compile_host_trace_") as logdir:
        with jax.profiler.trace(logdir):
            compile_fn()
        (path,) = pathlib.Path(logdir).rglob("*.xplane.pb")
        data = ProfileData.from_file(str(path))
        for plane in data.planes:
            if not plane.name.startswith("/host:"):
                continue
            for line in plane.lines:
                spans = sorted(
                    (e.start_ns, -e.duration_ns, e.name) for e in line.events
                )
                stack: list[tuple[int, str]] = []  # (end, name) of open events
                for start, neg, name in spans:
                    while stack and stack[-1][0] <= start:
                        stack.pop()
                    if stack:  # nested directly in the innermost open one
                        own[stack[-1][1]] += neg
                    total[name] -= neg
                    own[name] -= neg
                    count[name] += 1
                    stack.append((start - neg, name))
    keep = {n for n, _ in total.most_common(top)}
    keep |= {n for n, _ in own.most_common(top)}
    ms = lambda ns: round(ns / 1e6, 2)  # noqa: E731
    rows = [(n, ms(total[n]), ms(own[n]), count[n]) for n in keep]
    return sorted(rows, key=lambda r: -r[1])


@contextlib.contextmanager
def _gc_timer() -> Iterator[dict[str, Any]]:
    """Times Python's garbage collections while the block runs.

    Yields:
      A dict whose ``seconds`` (all collections) and ``full`` (generation 2
      collections) are filled in as they happen.
    """
    import gc

    out: dict[str, Any] = {"seconds": 0.0, "full": 0}
    began = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            began[0] = time.perf_counter()
        else:
            out["seconds"] += time.perf_counter() - began[0]
            out["full"] += info["generation"] == 2

    gc.callbacks.append(callback)
    try:
        yield out
    finally:
        gc.callbacks.remove(callback)


def _timed(
    case: str, optimizer: str, xla_events: int = 0, donate: bool = False
) -> dict[str, Any]:
    """`one_row`'s measurements, whatever stand-ins are in place."""
    from unittest import mock

    import jax
    import jax.numpy as jnp

    from benchmarks import kernel_ops, step_speed
    from optax_lowbit.kernels import _backend

    on_gpu = jax.default_backend() == "gpu"
    path = "xla" if optimizer.startswith("optax.") else "fused"
    rows = [
        r
        for r in step_speed.rows_for(case, optimizers=(optimizer,), paths=(path,))
        if r.optimizer == optimizer
    ]
    if not rows:
        raise SystemExit(f"--optimizers: no {path} row for {optimizer!r}")
    row = rows[0]
    spec = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s, jnp.float32),
        step_speed.CASES[case],
        is_leaf=lambda x: isinstance(x, tuple),
    )
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), spec)
    start = time.perf_counter()
    jax.block_until_ready(row.opt.init(params))
    init_s = round(time.perf_counter() - start, 3)
    del params
    state = jax.eval_shape(row.opt.init, spec)
    args = step_speed.step_args(spec, state, spec)
    triton = _backend.Backend(interpret=False, lowering="triton")
    force = mock.patch.object(_backend, "pick", lambda lowering=None: triton)
    with _gc_timer() as gc_s, force if not on_gpu else contextlib.nullcontext():
        start = time.perf_counter()
        donated = step_speed.DONATED_ARGNUMS if donate else ()
        step = step_speed.train_step(row.kind, row.opt)
        traced = jax.jit(step, donate_argnums=donated).trace(*args)
        trace_s = time.perf_counter() - start
        start = time.perf_counter()
        lowered = traced.lower(lowering_platforms=("cuda",))
        lower_s = time.perf_counter() - start
        compile_s, events = None, None
        if on_gpu:
            start = time.perf_counter()
            if xla_events:
                events = compile_events(lowered.compile, xla_events)
            else:
                lowered.compile()
            compile_s = round(time.perf_counter() - start, 3)
    text = lowered.as_text()
    configs = set(kernel_ops.triton_configs(text))
    return {
        "case": case,
        "optimizer": optimizer,
        "path": path,
        "trace_s": round(trace_s, 3),
        "lower_s": round(lower_s, 3),
        "compile_s": compile_s,
        "init_s": init_s,
        "donated": donate,
        # the lowered module's inputs marked for reuse by an output
        "donated_inputs": text.count("tf.aliasing_output")
        + text.count("jax.buffer_donor"),
        "hlo_ops": text.count(" = "),
        # the distinct Triton kernels XLA compiles (module and grid) and their
        # serialised size (v31)
        "triton_configs": len(configs),
        "triton_chars": sum(map(len, configs)),
        # their operations (`kernel_ops.config_module_size`): unlike the
        # characters, the same wherever the checkout lies
        "triton_ops": sum(map(kernel_ops.config_module_size, configs)),
        # whether the first step imported Pallas' Mosaic GPU backend (v30)
        "mosaic_gpu_imported": "jax._src.pallas.mosaic_gpu.core" in sys.modules,
        # Python's garbage collections in the trace, lowering and compile:
        # seconds and full (generation 2) collections, part of the parts' time
        "gc_s": round(gc_s["seconds"], 3),
        "gc_full": gc_s["full"],
        **({"xla_events": events, "xla_events_profiled": True} if events else {}),
    }


#: The parts a row times; with ``--cache`` the restart's get a ``cached_`` prefix.
PARTS = ("trace_s", "lower_s", "compile_s", "init_s")


def _fresh(
    case: str,
    optimizer: str,
    ablation: str,
    timeout: float,
    env: dict[str, str] | None = None,
    xla_events: int = 0,
    donate: bool = False,
) -> dict[str, Any]:
    """`one_row` in a new Python process (its JSON on the last stdout line)."""
    one = ["-m", "benchmarks.compile_host", "--one", case, optimizer]
    one += ["--ablation", ablation, "--xla-events", str(xla_events)]
    one += ["--donate"] if donate else []
    proc = subprocess.run(
        [sys.executable, *one, *_kernel_args.argv()],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=pathlib.Path(__file__).parent.parent,
        env=env,
    )
    if proc.returncode:
        return {
            "case": case,
            "optimizer": optimizer,
            "ablation": ablation,
            "error": proc.stderr[-2000:],
        }
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _first_and_restart(
    case: str,
    optimizer: str,
    ablation: str,
    timeout: float,
    xla_events: int = 0,
    donate: bool = False,
) -> dict[str, Any]:
    """A row, then the same row again in a process reading its compile cache."""
    with tempfile.TemporaryDirectory(prefix="compile_host_cache_") as cache:
        env = dict(
            os.environ,
            JAX_COMPILATION_CACHE_DIR=cache,
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
        )
        record = _fresh(case, optimizer, ablation, timeout, env, xla_events, donate)
        restart = _fresh(case, optimizer, ablation, timeout, env, xla_events, donate)
    if "error" in restart:
        record.setdefault("error", restart["error"])
    for part in PARTS:
        record[f"cached_{part}"] = restart.get(part)
    return record


def median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One record from a row's repeated runs: each part's median.

    Args:
      runs: the row's records, one per fresh process (`_fresh` or
        `_first_and_restart`), in the order they ran.

    Returns:
      The first run's record with each timed part replaced by its median over
      ``runs``; with more than one run, also ``repeats`` and ``runs`` (every
      run's parts). A run that failed makes the record an error (its
      message), so that no failure is hidden behind the others' median.
    """
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    record = dict(runs[0])
    timed = [*PARTS, *(f"cached_{part}" for part in PARTS)]
    for key in timed:
        values = [r.get(key) for r in runs]
        if all(v is not None for v in values):
            record[key] = statistics.median(values)
    if len(runs) > 1:
        record["repeats"] = len(runs)
        record["runs"] = [{k: r.get(k) for k in timed if k in r} for r in runs]
    return record


def add_ratios(records: list[dict[str, Any]]) -> None:
    """Each part's ratio to `optax.adamw`'s row of the same case (in place)."""
    base = {r["case"]: r for r in records if r.get("optimizer") == "optax.adamw"}
    for r in records:
        b = base.get(r["case"])
        if b is None or "error" in r:
            continue
        host, b_host = r["trace_s"] + r["lower_s"], b["trace_s"] + b["lower_s"]
        r["host_ratio"] = round(host / b_host, 2) if b_host else None
        if r["compile_s"] is not None and b.get("compile_s"):
            total = host + r["compile_s"]
            r["total_ratio"] = round(total / (b_host + b["compile_s"]), 2)


def table(records: list[dict[str, Any]]) -> str:
    """A Markdown table of the records."""
    cols = ("case", "optimizer")
    if any(r.get("ablation", "kernel") != "kernel" for r in records):
        cols += ("ablation",)
    cols += ("trace_s", "lower_s", "compile_s", "init_s")
    cols += ("hlo_ops",)
    cols += ("host_ratio", "total_ratio")
    if any("cached_trace_s" in r for r in records):
        cols += tuple(f"cached_{part}" for part in PARTS)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['optimizer']} | error |")
            continue
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Runs every (case, optimizer) in its own process, prints, writes JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="gpt2s_148", help="comma list of cases")
    ap.add_argument(
        "--optimizers",
        default=",".join(OPTIMIZERS),
        help="comma list; optax.adamw is always added (the ratios' baseline)",
    )
    ap.add_argument("--out", help="the JSON path (default: results/compile_host_*)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds a row")
    ap.add_argument(
        "--cache",
        action="store_true",
        help="run each row again in a process reading the first's compile cache",
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="fresh-process runs of every row, round by round; parts are medians",
    )
    ap.add_argument(
        "--ablations",
        default="kernel",
        help="comma list of benchmarks.kernel_ablation variants, each a row of "
        "every low-bit optimizer (default: the kernel itself)",
    )
    ap.add_argument(
        "--xla-events",
        type=int,
        default=0,
        help="GPU: profile each row's compile and keep its N longest host events "
        "(the compile time then includes the profiler's overhead)",
    )
    ap.add_argument(
        "--donate",
        action="store_true",
        help="jit every row's step with the parameters and the state donated "
        "(as the README asks of users; default: nothing donated)",
    )
    ap.add_argument(
        "--one", nargs=2, metavar=("CASE", "OPTIMIZER"), help=argparse.SUPPRESS
    )
    ap.add_argument("--ablation", default="kernel", help=argparse.SUPPRESS)
    _kernel_args.add(ap)
    args = ap.parse_args(argv)
    _kernel_args.apply(args)  # here and, by `_fresh`'s flags, in every row
    if args.one:
        record = one_row(*args.one, args.ablation, args.xla_events, args.donate)
        print(json.dumps(record))
        return []
    from benchmarks import kernel_ablation, step_speed

    cases = args.cases.split(",")
    for c in cases:
        if c not in step_speed.CASES:
            ap.error(f"--cases: {c!r} is not one of {sorted(step_speed.CASES)}")
    names = args.optimizers.split(",")
    known = ("optax.adamw", *step_speed.LOWBIT)
    for n in names:
        if n not in known:
            ap.error(f"--optimizers: {n!r} is not one of {known}")
    if args.repeats < 1:
        ap.error(f"--repeats: {args.repeats} is not a positive number of runs")
    if args.xla_events < 0:
        ap.error(f"--xla-events: {args.xla_events} is not a number of events >= 0")
    ablations = args.ablations.split(",")
    for v in ablations:
        if v not in kernel_ablation.VARIANTS:
            known_variants = tuple(kernel_ablation.VARIANTS)
            ap.error(f"--ablations: {v!r} is not one of {known_variants}")
    if "optax.adamw" not in names:
        names.insert(0, "optax.adamw")
    row = _first_and_restart if args.cache else _fresh
    rows = [
        (c, n, v)
        for c in cases
        for n in names
        for v in (("kernel",) if n == "optax.adamw" else ablations)
    ]
    runs: dict[tuple[str, str, str], list[dict[str, Any]]] = {r: [] for r in rows}
    per_row = {"xla_events": args.xla_events, "donate": args.donate}
    for _ in range(args.repeats):  # round by round: drift falls on every row
        for c, n, v in rows:
            runs[c, n, v].append(row(c, n, v, args.timeout, **per_row))
    records = [median_row(runs[r]) for r in rows]
    add_ratios(records)
    print(table(records))
    import jax

    from benchmarks.train_lm_long import git_commit

    platform = jax.default_backend()
    meta = {
        "what": "first-step trace / lower (Triton forced on a CPU host) / compile",
        "cache": args.cache,
        "repeats": args.repeats,
        "ablations": ablations,
        "xla_events": args.xla_events,
        "donated": args.donate,
        "kernel_settings": _kernel_args.settings(),
        "device": str(jax.devices()[0].device_kind),
        "jax_version": jax.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
    }
    out = pathlib.Path(args.out or RESULTS / f"compile_host_{platform}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return records


if __name__ == "__main__":
    main()
