"""Smoke test of benchmarks/kernel_equality.py: --tiny on CPU (the Pallas
interpreter), its JSON, its exit status."""

import json

import pytest

from tests._bench import run_module

# A benchmark smoke run: the slow CI step (OPTAX_LOWBIT_SLOW=1).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("kernel_equality_bench")]


def test_tiny_run_finds_the_kernel_paths_equal_to_jnp(tmp_path):
    out = tmp_path / "eq.json"
    stdout = run_module(
        "benchmarks.kernel_equality",
        "--tiny",
        "--optimizers",
        "4bit",
        "--steps",
        "1",
        "--out",
        str(out),
    )
    assert "wrote" in stdout
    res = json.loads(out.read_text())
    assert res["meta"]["case"] == "tiny" and res["meta"]["jax_version"]
    recs = res["records"]
    assert {r["path"] for r in recs} == {"chain", "fused"}
    for r in recs:
        # the kernel ran (one launch for the quantized leaves, one for the
        # float bias) and kept every code and scale of the jnp path
        assert r["pallas_calls"] >= 2 and r["state_arrays"] > 6
        assert r["state_arrays_differ"] == 0 and r["params_max_rel"] < 1e-5


def test_unknown_preset_is_refused_by_name():
    from benchmarks import kernel_equality

    with pytest.raises(SystemExit):
        kernel_equality.main(["--optimizers", "polar3", "--tiny"])
