"""benchmarks/kernel_counters.py: parsing Nsight Compute's CSV pages (the
profiling itself needs a GPU and ``ncu``; its results are committed)."""

import json
import pathlib

import pytest

from benchmarks import kernel_counters as kc

HEAD = (
    '"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream",'
    '"Block Size","Grid Size","Device","CC","Section Name","Metric Name",'
    '"Metric Unit","Metric Value"'
)


def _detail(kid, kernel, section, metric, unit, value):
    return (
        f'"{kid}","1","python3","h","{kernel}","1","14","(128, 1, 1)","(64, 1, 1)",'
        f'"0","9.0","{section}","{metric}","{unit}","{value}"'
    )


def test_parse_details_keeps_named_metrics_per_kernel():
    text = "\n".join(
        [
            "==PROF== a line before the table",
            HEAD,
            _detail(
                0, "adam_x", "GPU Speed Of Light Throughput", "Duration", "us", "457.18"
            ),
            _detail(0, "adam_x", "Launch Statistics", "Registers Per Thread", "", "64"),
            _detail(
                0,
                "adam_x",
                "Instruction Statistics",
                "Executed Instructions",
                "inst",
                "348,454,912",
            ),
            _detail(
                1, "fusion", "GPU Speed Of Light Throughput", "Duration", "us", "2.4"
            ),
        ]
    )
    got = kc.parse_details(text)
    assert set(got) == {"0", "1"}
    k = got["0"]
    assert k["kernel"] == "adam_x" and k["duration"] == 457.18
    assert k["duration_unit"] == "us" and k["registers_per_thread"] == 64.0
    assert k["executed_instructions"] == 348454912.0  # thousands separators
    assert got["1"]["registers_per_thread"] is None  # not measured: None, not 0


def test_parse_sass_sums_executed_instructions_by_opcode():
    rows = [
        ("LDG.E.128 R4, desc[UR4][R2.64]", 8, 256),
        ("FMUL R5, R4, R4", 16, 512),
        ("FMUL.FTZ R6, R5, 0.5", 16, 500),
        ("@!P0 BRA 0x100", 2, 64),
        ("", 0, 0),  # a blank source line is skipped
    ]
    lines = [
        '"Kernel Name","adam_x",',
        '"Address","Source","Instructions Executed","Thread Instructions Executed"',
    ]
    lines += [f'"0x{i:x}","      {s}","{w}","{t}"' for i, (s, w, t) in enumerate(rows)]
    got = kc.parse_sass("\n".join(lines))
    assert got["sass_static_instructions"] == 4
    assert got["sass_warp_by_opcode"] == {"FMUL": 32, "LDG": 8, "BRA": 2}
    assert got["sass_thread_executed"] == 256 + 512 + 500 + 64
    assert kc.parse_sass("")["sass_error"]


def test_sections_listed_keeps_what_ncu_ships():
    listing = "\n".join(
        [
            "---------------------------- ------- -----------------------",
            "Identifier                   Enabled Display Name",
            "---------------------------- ------- -----------------------",
            "ComputeWorkloadAnalysis      no      Compute Workload Analysis",
            "SpeedOfLight                 yes     GPU Speed Of Light Throughput",
            "",
        ]
    )
    assert kc.sections_listed(listing) == ("SpeedOfLight", "ComputeWorkloadAnalysis")
    assert "MemoryWorkloadAnalysis_Tables" in kc.SECTIONS
    assert kc.sections_listed("") == kc.SECTIONS  # unreadable: ask for all


def test_committed_h200_counts_are_consistent():
    path = pathlib.Path("benchmarks/results/kernel_counters_h200_v20b.json")
    doc = json.loads(path.read_text())
    kernels = {r["optimizer"]: r for r in doc["records"] if r["duration"] > 100}
    assert set(kernels) == {"polar2", "polar1.5", "4bit", "8bit", "optax.adamw"}
    for r in kernels.values():
        per_elem = r["executed_instructions"] * 32 / r["elements"]
        # warp instructions x 32 ~ thread instructions (a few lanes predicated off)
        assert r["thread_instructions_per_element"] == pytest.approx(per_elem, rel=0.02)
    assert (
        kernels["polar2"]["thread_instructions_per_element"]
        > 3 * kernels["optax.adamw"]["thread_instructions_per_element"]
    )


def test_main_rejects_a_bad_row_count():
    with pytest.raises(SystemExit):
        kc.main(["--rows", "0"])


def test_table_formats_numbers_and_marks_missing_values():
    rows = [
        {
            "optimizer": "polar2",
            "kernel": "adam_polar",
            "duration": 457.18,
            "registers_per_thread": 64.0,
            "thread_instructions_per_element": 166.06,
        },
        {"optimizer": "4bit", "error": "ncu rc 1"},
    ]
    lines = kc.table(rows).splitlines()
    assert lines[2].startswith("| polar2 | adam_polar | 457.2 | - |")
    assert "| 64 |" in lines[2] and lines[2].endswith("| 166.1 |")
    assert lines[3].startswith("| 4bit | error | - |")  # the error, then dashes
