"""Hardware counters of one fused step's kernels (Nsight Compute, GPU only).

Run on a GPU machine with ``ncu``: ``python -m benchmarks.kernel_counters``
(``--optimizers polar2,4bit --rows 4096 --out PATH``). For each optimizer it
starts a child process under ``ncu --clock-control none`` (this workplace's
rule: leave the clocks alone) that jits the timed step of `step_speed` on one
``rows x 16384`` float32 leaf, runs it twice to warm up, and then the profiled
step between ``cudaProfilerStart`` / ``cudaProfilerStop`` (``ncu
--profile-from-start off``), so that only that step's kernels are measured.
The low-bit rows are the ``fused`` path (one Pallas kernel per leaf); the
baseline is ``optax.adamw`` jitted without donation, its XLA fusions.

What it reads per kernel (``ncu --page details`` and ``--page source
--print-source sass``): duration, the speed-of-light throughputs (memory and
SM, % of peak), DRAM bytes, L1/TEX sectors and wavefronts per request (in
each record's ``all_metrics``), executed instructions and issue-slot use,
registers per thread, achieved occupancy, the warp-state stall breakdown
(cycles per issued instruction by reason) and the executed SASS instructions
per opcode, summed over the kernel's source lines. ``thread instructions per
element`` = executed SASS thread instructions / elements of the leaf: the
instruction count issue 18 asks for, measured instead of estimated (the
offline proxy is `benchmarks.kernel_ops`' TTIR count).

Writes ``benchmarks/results/kernel_counters_<device>.json`` (a list of one
record per kernel, plus ``meta``) and the raw ``ncu`` CSVs as
``<out stem>_raw.tar.gz``. Prints a table. Where ``ncu`` cannot read the
counters (on gVisor machines it could not, KINDS.md), each record holds the
error and the script still exits 0: the reason is the result.
"""

from __future__ import annotations

import argparse
import collections
import csv
import ctypes
import glob
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile

from benchmarks import _kernel_args, _markdown

OPTIMIZERS = "polar2,polar1.5,4bit,8bit,optax.adamw"
COLS = 16384
#: ncu sections read (``ncu --list-sections`` names them).
SECTIONS = (
    "SpeedOfLight",
    "ComputeWorkloadAnalysis",
    "InstructionStats",
    "LaunchStats",
    "Occupancy",
    "SchedulerStats",
    "WarpStateStats",
    "MemoryWorkloadAnalysis",
    "MemoryWorkloadAnalysis_Tables",  # L1/TEX sectors and wavefronts per request
    "SourceCounters",
)
#: (section, metric) pairs kept in a record, under the short key.
KEEP = {
    "duration": ("GPU Speed Of Light Throughput", "Duration"),
    "memory_pct": ("GPU Speed Of Light Throughput", "Memory Throughput"),
    "dram_pct": ("GPU Speed Of Light Throughput", "DRAM Throughput"),
    "sm_pct": ("GPU Speed Of Light Throughput", "Compute (SM) Throughput"),
    "sm_clock": ("GPU Speed Of Light Throughput", "SM Frequency"),
    "executed_ipc": ("Compute Workload Analysis", "Executed Ipc Active"),
    "issue_slots_busy": ("Compute Workload Analysis", "Issue Slots Busy"),
    "executed_instructions": ("Instruction Statistics", "Executed Instructions"),
    "registers_per_thread": ("Launch Statistics", "Registers Per Thread"),
    "block_size": ("Launch Statistics", "Block Size"),
    "grid_size": ("Launch Statistics", "Grid Size"),
    "theoretical_occupancy": ("Occupancy", "Theoretical Occupancy"),
    "achieved_occupancy": ("Occupancy", "Achieved Occupancy"),
    "block_limit_registers": ("Occupancy", "Block Limit Registers"),
    "issued_warp_per_scheduler": ("Scheduler Statistics", "Issued Warp Per Scheduler"),
    "no_eligible_pct": ("Scheduler Statistics", "No Eligible"),
    "active_warps_per_scheduler": (
        "Scheduler Statistics",
        "Active Warps Per Scheduler",
    ),
    "eligible_warps_per_scheduler": (
        "Scheduler Statistics",
        "Eligible Warps Per Scheduler",
    ),
    "cycles_per_issued_instruction": (
        "Warp State Statistics",
        "Warp Cycles Per Issued Instruction",
    ),
    "memory_throughput": ("Memory Workload Analysis", "Memory Throughput"),
}


def sections_listed(listing: str) -> tuple[str, ...]:
    """`SECTIONS` that ``ncu --list-sections`` names (its first column).

    A section this ``ncu`` does not ship would fail the whole profile, so
    the ones it lacks are left out; an empty or unreadable listing keeps
    every section.
    """
    names = {line.split()[0] for line in listing.splitlines() if line.split()}
    kept = tuple(s for s in SECTIONS if s in names)
    return kept or SECTIONS


def ncu_binary() -> str | None:
    """``ncu`` on the PATH, else the newest under /opt/nvidia/nsight-compute."""
    found = shutil.which("ncu")
    if found:
        return found
    cands = sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu"))
    return cands[-1] if cands else None


def _cudart() -> ctypes.CDLL:
    """The CUDA runtime, for cudaProfilerStart/Stop (any loadable version)."""
    names = ["libcudart.so", "libcudart.so.13", "libcudart.so.12"]
    import site

    for root in site.getsitepackages():
        names += sorted(glob.glob(f"{root}/nvidia/**/libcudart.so*", recursive=True))
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise OSError(f"no CUDA runtime library among {names}")


def child(name: str, rows: int) -> None:
    """The profiled process: warm steps, then one step between profiler marks."""
    import jax

    from benchmarks import step_speed

    shapes = {"w": (rows, COLS)}
    params = step_speed.make_tree(shapes, jax.random.key(0))
    grads = step_speed.make_tree(shapes, jax.random.key(1))
    path = "xla" if name.startswith("optax.") else "fused"
    rows = step_speed.rows_for("leaf", optimizers=(name,), paths=(path,))
    row = next(r for r in rows if r.optimizer == name and r.path == path)
    c = step_speed.compile_row(row, params, grads)
    s, p = c.state, c.params
    for _ in range(2):
        s, p = c.run(s, p, grads)
    jax.block_until_ready((s, p))
    rt = _cudart()
    rt.cudaProfilerStart()
    s, p = c.run(s, p, grads)
    jax.block_until_ready((s, p))
    rt.cudaProfilerStop()


def _rows(text: str) -> list[dict[str, str]]:
    """CSV rows of an ``ncu --csv`` page (lines before the header skipped)."""
    lines = text.splitlines()
    start = next(
        (i for i, ln in enumerate(lines) if ln.startswith(('"ID"', '"Address"'))),
        None,
    )
    if start is None:
        start = next((i for i, ln in enumerate(lines) if ln.startswith('"')), 0)
    return list(csv.DictReader(io.StringIO("\n".join(lines[start:]))))


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except (AttributeError, ValueError):
        return None


def parse_details(text: str) -> dict[str, dict]:
    """Per kernel (by ID): its name, the `KEEP` metrics and the stall reasons."""
    out: dict[str, dict] = {}
    for r in _rows(text):
        k = out.setdefault(
            r.get("ID", "?"), {"kernel": r.get("Kernel Name"), "metrics": {}}
        )
        sec, met = r.get("Section Name", ""), r.get("Metric Name", "")
        k["metrics"][f"{sec} / {met}"] = (r.get("Metric Value"), r.get("Metric Unit"))
    for k in out.values():
        m = k.pop("metrics")
        for key, (sec, met) in KEEP.items():
            val, unit = m.get(f"{sec} / {met}", (None, None))
            k[key] = _number(val) if _number(val) is not None else val
            if unit:
                k[key + "_unit"] = unit
        k["all_metrics"] = {a: v[0] for a, v in m.items()}
    return out


def parse_sass(text: str) -> dict:
    """Executed SASS instructions per opcode from a ``--page source`` CSV."""
    rows = _rows(text)
    if not rows:
        return {"sass_error": "empty source page"}
    cols = [c for c in rows[0] if isinstance(c, str)]
    warp_col = next((c for c in cols if c == "Instructions Executed"), None)
    thread_col = next(
        (c for c in cols if c.startswith("Thread Instructions Executed")), None
    )
    src_col = next((c for c in cols if c == "Source"), None)
    if src_col is None or (warp_col is None and thread_col is None):
        return {"sass_error": f"columns {cols}"}
    warp, thread = collections.Counter(), collections.Counter()
    static = 0
    for r in rows:
        words = (r.get(src_col) or "").split()
        if not words:
            continue
        op = words[1] if words[0].startswith("@") and len(words) > 1 else words[0]
        op = op.rstrip(";").split(".")[0]  # the opcode without its modifiers
        static += 1
        if warp_col:
            warp[op] += _number(r[warp_col]) or 0
        if thread_col:
            thread[op] += _number(r[thread_col]) or 0
    return {
        "sass_static_instructions": static,
        "sass_warp_executed": sum(warp.values()),
        "sass_thread_executed": sum(thread.values()),
        "sass_warp_by_opcode": dict(warp.most_common(40)),
        "sass_thread_by_opcode": dict(thread.most_common(40)),
    }


def profile(
    ncu: str,
    name: str,
    rows: int,
    raw: pathlib.Path,
    sections: tuple[str, ...] = SECTIONS,
    log=print,
) -> list[dict]:
    """Runs `child` for ``name`` under ncu; one record per profiled kernel.

    ``sections``: the ncu sections asked for (`sections_listed`).
    """
    stem = raw / name.replace(".", "_")
    cmd = [
        ncu,
        "--clock-control",
        "none",
        "--profile-from-start",
        "off",
        "--target-processes",
        "all",
        *[a for s in sections for a in ("--section", s)],
        "--import-source",
        "no",
        "-f",
        "-o",
        str(stem),
        sys.executable,
        "-m",
        "benchmarks.kernel_counters",
        "--child",
        name,
        "--rows",
        str(rows),
        *_kernel_args.argv(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    (raw / f"{stem.name}_ncu.log").write_text(proc.stdout + proc.stderr)
    base = {"optimizer": name, "elements": rows * COLS}
    report = stem.with_suffix(".ncu-rep")
    if proc.returncode != 0 or not report.exists():
        tail = (proc.stdout + proc.stderr)[-1500:]
        log(f"{name}: ncu failed (rc {proc.returncode}): {tail}")
        return [{**base, "error": f"ncu rc {proc.returncode}: {tail}"}]
    details = subprocess.run(
        [
            ncu,
            "--import",
            str(report),
            "--page",
            "details",
            "--print-details",
            "all",  # the sections' bodies too: pipe utilization, stall reasons
            "--csv",
        ],
        capture_output=True,
        text=True,
    ).stdout
    (raw / f"{stem.name}_details.csv").write_text(details)
    kernels = parse_details(details)
    records = []
    for kid, k in kernels.items():
        src = subprocess.run(
            [
                ncu,
                "--import",
                str(report),
                "--page",
                "source",
                "--print-source",
                "sass",
                "--csv",
                "--launch-skip",
                kid,
                "--launch-count",
                "1",
            ],
            capture_output=True,
            text=True,
        )
        (raw / f"{stem.name}_sass_{kid}.csv").write_text(src.stdout + src.stderr)
        try:
            sass = parse_sass(src.stdout)
        except Exception as e:  # the raw CSV is kept: parse it again later
            sass = {"sass_error": f"{type(e).__name__}: {e}"}
        rec = {**base, "id": kid, **k, **sass}
        if rec.get("sass_thread_executed"):
            rec["thread_instructions_per_element"] = (
                rec["sass_thread_executed"] / base["elements"]
            )
        if isinstance(rec.get("executed_instructions"), float):
            rec["warp_instructions_per_element"] = (
                rec["executed_instructions"] / base["elements"]
            )
        records.append(rec)
    return records


COLUMNS: list[_markdown.Column] = [
    ("optimizer", "optimizer", ""),
    ("kernel", lambda r: r.get("kernel") and str(r["kernel"])[:40], ""),
    ("us", "duration", ".1f"),
    ("DRAM %", "dram_pct", ".1f"),
    ("SM %", "sm_pct", ".1f"),
    ("issue busy %", "issue_slots_busy", ".1f"),
    ("regs", "registers_per_thread", ".0f"),
    ("occ %", "achieved_occupancy", ".1f"),
    ("cyc/instr", "cycles_per_issued_instruction", ".2f"),
    ("thread instr/elem", "thread_instructions_per_element", ".1f"),
]


def table(records: list[dict]) -> str:
    return _markdown.table(records, COLUMNS)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--optimizers", default=OPTIMIZERS)
    ap.add_argument("--rows", type=int, default=4096, help="leaf rows (x 16384)")
    ap.add_argument("--out", default=None, help="JSON path")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--impl", default="pallas", help=argparse.SUPPRESS)
    _kernel_args.add(ap)
    args = ap.parse_args(argv)
    if args.rows <= 0:
        ap.error(f"--rows must be a positive integer, got {args.rows}")
    _kernel_args.apply(args)
    if args.child:
        child(args.child, args.rows)
        return []
    from benchmarks import step_speed

    meta = step_speed.run_meta(args)
    ncu = ncu_binary()
    meta["ncu"] = ncu
    out = pathlib.Path(args.out or "benchmarks/results/kernel_counters.json")
    records: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        raw = pathlib.Path(tmp)
        if ncu is None:
            records = [{"error": "no ncu binary on this machine"}]
        else:
            meta["ncu_version"] = subprocess.run(
                [ncu, "--version"], capture_output=True, text=True
            ).stdout.strip()
            listing = subprocess.run(
                [ncu, "--list-sections"], capture_output=True, text=True, timeout=60
            )
            sections = sections_listed(
                listing.stdout if listing.returncode == 0 else ""
            )
            meta["ncu_sections"] = list(sections)
            for name in args.optimizers.split(","):
                records += profile(ncu, name, args.rows, raw, sections)
                print(table([r for r in records if r.get("optimizer") == name]))
        out.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(out.with_name(out.stem + "_raw.tar.gz"), "w:gz") as tar:
            for f in sorted(raw.iterdir()):
                if f.suffix != ".ncu-rep":
                    tar.add(f, arcname=f.name)
    out.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    print(table(records))
    print(f"wrote {out}")
    return records


if __name__ == "__main__":
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    main()
