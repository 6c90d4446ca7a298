"""Smoke test of benchmarks/step_speed.py: --tiny on CPU, JSON schema, PNG."""

import json
import math

import pytest

from tests._bench import run_module

pytest.importorskip("matplotlib")

# A benchmark smoke run: the slow CI step (OPTAX_LOWBIT_SLOW=1).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("step_speed_bench")]

FIELDS = (
    "case",
    "optimizer",
    "path",
    "ms",
    "baseline_ms",
    "ratio",
    "bytes_per_param",
    "tbps",
    "compile_s",
    "temp_bytes_per_param",
    "device",
    "jax_version",
    "date",
    "commit",
)
BASELINES = ("optax.adamw", "optax.adamw_donated")
META = (
    "device",
    "jax_version",
    "optax_version",
    "torch_version",
    "date",
    "commit",
    "copy_ceiling_tbps",
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("step_speed") / "step_speed_h200.json"
    args = ("--tiny", "--impl", "jnp", "--optimizers", "polar2", "--out", str(out))
    stdout = run_module("benchmarks.step_speed", *args)
    return out, json.loads(out.read_text()), stdout


def test_meta_and_png(tiny):
    out, doc, stdout = tiny
    assert set(META) <= set(doc["meta"])
    assert doc["meta"]["copy_ceiling_tbps"] > 0
    assert doc["meta"]["n_timed"] == 3
    assert "GPU only" in doc["meta"]["ptx_note"]  # CPU: no PTX, and it says why
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "compile_s" in stdout and "tiny_tree" in stdout


def test_records(tiny):
    _, doc, _ = tiny
    recs = doc["records"]
    assert {r["case"] for r in recs} == {"tiny_leaf", "tiny_tree"}
    for case in ("tiny_leaf", "tiny_tree"):
        rows = {(r["optimizer"], r["path"]): r for r in recs if r["case"] == case}
        assert set(rows) == {
            ("optax.adamw", "xla"),
            ("optax.adamw_donated", "xla"),
            ("polar2", "jnp"),
            ("polar2", "chain"),
            ("polar2", "fused"),
        }
        base = min(rows[o, "xla"]["ms"] for o in BASELINES)
        assert not rows["optax.adamw", "xla"]["donated"]
        assert rows["optax.adamw_donated", "xla"]["donated"]
        for r in rows.values():
            assert set(FIELDS) <= set(r), set(FIELDS) - set(r)
            assert "error" not in r and r["finite"]
            assert r["ms"] > 0 and r["compile_s"] > 0 and r["tbps"] > 0
            assert r["baseline_ms"] == base
            assert math.isclose(r["ratio"], r["ms"] / r["baseline_ms"])
            piped = min(rows[o, "xla"]["pipelined_ms"] for o in BASELINES)
            assert r["pipelined_ms"] > 0
            assert math.isclose(r["pipelined_ratio"], r["pipelined_ms"] / piped)
            assert r["bytes_per_param"] > 0
            n = r["n_params"]
            tbps = r["bytes_per_param"] * n / (r["ms"] * 1e-3) / 1e12
            assert math.isclose(r["tbps"], tbps)
        # fp32 AdamW moves 28 B/param; the low-bit state is read from the state
        assert rows["optax.adamw", "xla"]["bytes_per_param"] == pytest.approx(28, 1e-3)
        polar = rows["polar2", "fused"]
        assert 0 < polar["state_bytes_per_param"] < 8
        assert polar["bytes_per_param"] == pytest.approx(
            12 + 2 * polar["state_bytes_per_param"]
        )
        assert rows["polar2", "chain"]["bytes_per_param"] == pytest.approx(
            polar["bytes_per_param"] + 8
        )
        assert polar["goal"] == 0.60 and rows["polar2", "chain"]["goal"] == 0.90
        assert polar["ptx_instructions"] is None  # GPU only


def test_undonated_rows_follow_each_kernel_row():
    from benchmarks import step_speed

    rows = step_speed.rows_for(
        "tiny_leaf", "jnp", ("polar2",), paths=("chain", "fused"), undonated=True
    )
    got = [(r.optimizer, r.path, r.donate) for r in rows]
    assert got == [
        ("optax.adamw", "xla", False),
        ("optax.adamw_donated", "xla", True),
        ("polar2", "chain", True),
        ("polar2", "chain", False),
        ("polar2", "fused", True),
        ("polar2", "fused", False),
    ]
    # the undonated rows share the donated rows' optimizer object (same step)
    assert rows[2].opt is rows[3].opt and rows[4].opt is rows[5].opt
    plain = step_speed.rows_for("tiny_leaf", "jnp", ("polar2",), paths=("fused",))
    assert [r.donate for r in plain] == [False, True, True]


def test_undonated_records_are_named_and_have_no_goal():
    from benchmarks import step_speed

    recs = [
        {"case": "c", "optimizer": "optax.adamw", "path": "xla", "donated": False},
        {"case": "c", "optimizer": "optax.adamw_donated", "path": "xla"},
        {"case": "c", "optimizer": "polar2", "path": "fused", "donated": True},
        {"case": "c", "optimizer": "polar2", "path": "fused", "donated": False},
    ]
    for r, ms in zip(recs, (4.0, 2.0, 1.0, 3.0), strict=True):
        r.update(donated=r.get("donated", True), ms=ms, bytes_per_param=1, tbps=1)
    step_speed.add_baselines(recs)
    assert [step_speed.label(r) for r in recs] == [
        "optax.adamw",
        "optax.adamw_donated",
        "polar2",
        "polar2 undonated",
    ]
    assert recs[2]["goal"] == 0.60 and recs[3]["goal"] is None
    assert recs[3]["ratio"] == pytest.approx(1.5)
    assert "polar2 undonated" in step_speed.table(recs)
