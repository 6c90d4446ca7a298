"""benchmarks.offload_speed's CPU smoke mode: every row measured, bytes moved."""

import json

import pytest

from benchmarks import offload_speed


@pytest.mark.slow  # a benchmark smoke run
@pytest.mark.xdist_group("offload_bench")
def test_offload_speed_tiny_rows(tmp_path):
    out = tmp_path / "offload.json"
    result = offload_speed.main(
        ["--tiny", "--optimizers", "optax.adamw,adamw_polar", "--out", str(out)]
    )
    assert json.loads(out.read_text())["records"] == json.loads(
        json.dumps(result["records"], default=str)
    )
    assert "donation_probe" in result["meta"]
    for rec in result["records"]:
        assert "error" not in rec, rec
        # offloaded: the state's arrays live on the host, the counters stay
        assert rec["host.host_state_bytes"] > 0
        assert rec["host.device_state_bytes"] < rec["device.device_state_bytes"]
        assert rec["device.host_state_bytes"] == 0
        assert rec["device_bytes_saved"] == rec["host.host_state_bytes"]
        for key in ("device.ms", "host.ms", "compute_only_ms"):
            assert rec[key] > 0
    polar, fp32 = (
        {r["optimizer"]: r for r in result["records"]}[k]
        for k in ("adamw_polar", "optax.adamw")
    )
    assert polar["host.host_state_bytes"] < fp32["host.host_state_bytes"]


def test_offload_speed_rejects_unknown_names():
    with pytest.raises(SystemExit):
        offload_speed.main(["--tiny", "--optimizers", "adamw_9bit"])
