"""benchmarks/muon_speed.py: its kernel check on CPU (interpret mode), smoke run."""

import json

import jax
import numpy as np
import pytest

from benchmarks import muon_speed
from tests._bench import run_module


def test_state_mismatch_counts_differing_elements():
    rng = np.random.default_rng(0)
    a = {"x": rng.integers(0, 255, (40, 50)).astype(np.uint8), "y": rng.normal(size=10)}
    b = {"x": a["x"].copy(), "y": a["y"].copy()}
    b["x"][3, :7] += 1
    b["y"][2] += 1.0
    assert muon_speed.state_mismatch(a, b) == pytest.approx(8 / 2010)
    assert muon_speed.state_mismatch(a, a) == 0.0
    with pytest.raises(ValueError, match="state trees differ"):
        muon_speed.state_mismatch(a, {"x": a["x"]})


@pytest.mark.slow  # the benchmark's own check, run as on the device
# the kernel held to the jnp path's bits, as users' programs compile
# (XLA:CPU's elemental emitters round them apart; tests/conftest.py)
@pytest.mark.fusion_emitters
def test_check_kernel_equals_jnp_on_cpu():
    got = muon_speed.check(
        "polar2", 1, jax.random.key(np.random.default_rng().integers(2**31))
    )
    assert got == {"state_mismatch": 0.0, "update_rel_err": 0.0}


@pytest.mark.slow
def test_tiny_run_writes_records(tmp_path):
    out = tmp_path / "m.json"
    flags = ("--tiny", "--leaves-per-launch", "1", "--out", str(out))
    run_module("benchmarks.muon_speed", *flags)
    data = json.loads(out.read_text())
    # the kernel tunables, as in every benchmark that runs kernels
    assert data["meta"]["leaves_per_launch"] == 1
    names = [r["optimizer"] for r in data["records"]]
    assert names[:2] == ["optax.muon", "optax.muon_donated"]
    assert set(muon_speed.PRESETS) <= set(names)
    for r in data["records"]:
        assert r["ms"] > 0 and r["ratio"] > 0 and r["state_bytes_per_param"] > 0
