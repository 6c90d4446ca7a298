"""benchmarks/step_profile.py: trace arithmetic on fresh events, CPU smoke run."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import step_profile
from tests._bench import run_module


def _events(rng, n, pid=1, t0=0.0):
    starts = t0 + np.sort(rng.uniform(0, 1000, n))
    return [
        {"ph": "X", "pid": pid, "ts": float(s), "dur": float(d), "name": f"k{k % 3}"}
        for k, (s, d) in enumerate(zip(starts, rng.uniform(0, 50, n), strict=True))
    ]


@settings(deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 40))
def test_busy_is_the_union_of_intervals(seed, n):
    evs = _events(np.random.default_rng(seed), n)
    grid = np.zeros(200_000, bool)  # 0.01 us cells over [0, 2000)
    for e in evs:
        grid[round(e["ts"] * 100) : round((e["ts"] + e["dur"]) * 100)] = True
    assert step_profile.busy_us(evs) == pytest.approx(grid.sum() / 100, abs=0.05 * n)


def test_span_splits_steps_at_the_longest_gaps():
    rng = np.random.default_rng(0)
    steps = [_events(rng, 20, t0=10_000.0 * k) for k in range(4)]
    spans = [
        max(e["ts"] + e["dur"] for e in s) - min(e["ts"] for e in s) for s in steps
    ]
    flat = [e for s in steps for e in s]
    rng.shuffle(flat)
    assert step_profile.span_us(flat, 4) == pytest.approx(np.mean(spans))
    assert step_profile.span_us([], 4) == 0.0


def test_device_events_keep_device_tracks_only():
    rng = np.random.default_rng(1)
    trace = {
        "traceEvents": [
            {
                "ph": "M",
                "name": "process_name",
                "pid": 1,
                "args": {"name": "/device:GPU:0"},
            },
            {
                "ph": "M",
                "name": "process_name",
                "pid": 2,
                "args": {"name": "/host:CPU"},
            },
            *_events(rng, 5, pid=1),
            *_events(rng, 7, pid=2),
        ]
    }
    got = step_profile.device_events(trace)
    assert len(got) == 5 and {e["pid"] for e in got} == {1}
    summary = step_profile.summarize(got, steps=1)
    assert summary["kernels_per_step"] == 5
    assert summary["kernel_ms"] == pytest.approx(sum(e["dur"] for e in got) / 1e3)
    assert sum(t["count"] for t in summary["top"]) == 5


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("adam_polar_2b_signed_sr_x12__2", "pallas"),
        ("memcpy32_post", "copy"),
        ("loop_add_fusion_3", "fusion"),
        ("something", "other"),
    ],
)
def test_kind_of(name, kind):
    assert step_profile.kind_of(name) == kind


@pytest.mark.parametrize(
    "argv", [["--steps", "0"], ["--rows", "polar2"], ["--cases", "nope"]]
)
def test_bad_arguments_name_the_argument(argv, capsys):
    with pytest.raises(SystemExit):
        step_profile.parse_args(argv)
    assert argv[0] in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_run_writes_records(tmp_path):
    out = tmp_path / "p.json"
    rows = "optax.adamw/xla,polar2/fused"
    run_module(
        "benchmarks.step_profile",
        "--tiny",
        "--impl",
        "jnp",
        "--rows",
        rows,
        "--undonated",
        "--out",
        str(out),
    )
    data = json.loads(out.read_text())
    assert data["meta"]["jax_version"] and data["meta"]["date"]
    rows = {(r["optimizer"], r["path"], r["donated"]) for r in data["records"]}
    # --undonated adds the kernel rows' undonated twins, not the baseline's
    assert rows == {
        ("optax.adamw", "xla", False),
        ("polar2", "fused", True),
        ("polar2", "fused", False),
    }
    assert "polar2 undonated/fused" in step_profile.table(data["records"])
    for r in data["records"]:
        assert r["wall_ms"] > 0 and r["pipelined_ms"] > 0 and r["dispatch_ms"] > 0
