"""benchmarks/dispatch_floor.py: its step, its summary on fresh records, a CPU run."""

import json

import jax
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks import dispatch_floor, step_speed
from tests._bench import run_module


def test_passthrough_step_updates_params_and_returns_the_state_unchanged():
    rng = np.random.default_rng()
    p = {"a": rng.normal(size=(3, 5)).astype(np.float32), "b": rng.normal(size=7)}
    g = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(x.dtype), p)
    state = [rng.integers(0, 256, size=9, dtype=np.uint8) for _ in range(3)]
    s_out, p_out = dispatch_floor.passthrough_step(0.25)(
        [x.copy() for x in state], jax.tree.map(np.copy, p), g
    )
    for got, want in zip(s_out, state, strict=True):
        np.testing.assert_array_equal(got, want)
    for k in p:
        np.testing.assert_allclose(p_out[k], p[k] - 0.25 * g[k], rtol=1e-6)


@given(st.integers(0, 3), st.integers(1, 5))
def test_time_dispatch_feeds_every_step_back(warm, n):
    x0 = np.random.default_rng().normal(size=4).astype(np.float32)
    step = jax.jit(lambda x, g: (x + g,))
    ms, dispatch_ms, (x, _) = step_speed.time_dispatch(
        step, jax.numpy.asarray(x0), jax.numpy.ones(4), n=n, warm=warm
    )
    np.testing.assert_allclose(x, x0 + warm + n, rtol=1e-6)
    assert ms >= dispatch_ms > 0


@given(
    st.floats(0.5, 5.0),  # us per state array
    st.floats(0.1, 3.0),  # ms at no state
    st.floats(1.1, 3.0),  # tree over stacked
)
def test_summary_recovers_the_slope_and_the_ratios(us, base, ratio):
    recs = []
    for k in dispatch_floor.PASSTHROUGH:
        row = "params_only" if k == 0 else f"passthrough_{k}"
        ms = base + us * k * 1e-3
        recs.append(
            {
                "case": "gpt2s_148",
                "row": row,
                "state_arrays": k,
                "ms": ms,
                "dispatch_ms": ms / 2,
                "pipelined_ms": ms,
            }
        )
    for row, ms in (("params_only", base / ratio), ("polar2 fused", 1.0)):
        recs.append(
            {
                "case": "gpt2s_stacked",
                "row": row,
                "state_arrays": 0,
                "ms": ms,
                "dispatch_ms": ms,
                "pipelined_ms": ms,
            }
        )
    recs.append({"case": "gpt2s_148", "row": "polar2 fused", "error": "boom"})
    summary = dispatch_floor.summarize(recs)
    assert summary["us_per_state_array"]["ms"] == pytest.approx(us, rel=1e-6)
    assert summary["us_per_state_array"]["dispatch_ms"] == pytest.approx(
        us / 2, rel=1e-6
    )
    # a row only the stacked case measured, or that failed on the tree, has no ratio
    assert set(summary["tree_over_stacked"]) == {"params_only"}
    assert summary["tree_over_stacked"]["params_only"]["ms"] == pytest.approx(ratio)


@pytest.mark.slow
def test_tiny_run_writes_every_row(tmp_path):
    out = tmp_path / "d.json"
    run_module(
        "benchmarks.dispatch_floor", "--tiny", "--impl", "jnp", "--out", str(out)
    )
    data = json.loads(out.read_text())
    assert data["meta"]["jax_version"] and data["meta"]["date"]
    rows = {(r["case"], r["row"]) for r in data["records"] if "error" not in r}
    assert len(rows) == len(data["records"])
    want = {("gpt2s_148", f"passthrough_{k}") for k in dispatch_floor.PASSTHROUGH[1:]}
    for case in dispatch_floor.CASES:
        want |= {(case, r) for r in ("params_only", "optax.adamw", "polar2 fused")}
    assert want <= rows
    thru = {r["row"]: r for r in data["records"] if r["case"] == "gpt2s_148"}
    for k in dispatch_floor.PASSTHROUGH[1:]:  # K more arrays in and out
        got = thru[f"passthrough_{k}"]
        assert got["buffers"] == thru["params_only"]["buffers"] + 2 * k
        assert got["state_arrays"] == k
    assert set(data["summary"]["tree_over_stacked"]) >= {"params_only", "polar2 fused"}
    assert (tmp_path / "d.png").stat().st_size > 0
    (tmp_path / "d.png").unlink()
    dispatch_floor.main(["--replot", "--out", str(out)])  # from the JSON alone
    assert (tmp_path / "d.png").stat().st_size > 0
