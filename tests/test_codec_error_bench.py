"""Smoke test of benchmarks/codec_error.py: quick mode, JSON schema, sane order."""

import json
import math

import pytest

from tests._bench import run_module

pytest.importorskip("flax")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

# One worker runs the module-scoped benchmark run once (``--dist loadgroup``).
# The run (every codec compiled, two moment captures) takes ~40 s on a 2-core
# CPU: slow (CI's second step, OPTAX_LOWBIT_SLOW=1, runs it).
pytestmark = [pytest.mark.xdist_group("codec_error_bench"), pytest.mark.slow]

SIGNED = ("gaussian", "student_t3", "real_m")
UNSIGNED = ("gaussian_sq", "real_v")
V_KEYS = (
    "inv_sqrt_rel_error",
    "underestimate_frac",
    "overestimate_frac",
    "zero_decode_frac",
    "update_max_ratio",
)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("codec_error")
    stdout = run_module("benchmarks.codec_error", "--quick", "--out", str(out))
    doc = json.loads((out / "codec_error.json").read_text())
    return out, doc, stdout


def _find(records, data, family, variant=None):
    hits = [
        r
        for r in records
        if r["data"] == data
        and r["family"] == family
        and (variant is None or r["variant"] == variant)
    ]
    assert len(hits) == 1, (data, family, variant, hits)
    return hits[0]


def test_writes_json_and_plots(quick):
    out, doc, stdout = quick
    assert set(doc) == {"meta", "records", "symmetry"}
    for name in ("codec_error.png", "moment_pairs.png"):
        png = (out / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "rel_err" in stdout and "Symmetry" in stdout


def test_meta(quick):
    meta = quick[1]["meta"]
    for key in ("device", "platform", "jax", "optax", "date", "command"):
        assert isinstance(meta[key], str) and meta[key]
    assert meta["quick"] is True
    assert meta["capture"]["seed"] != meta["calibration_capture"]["seed"]
    assert "out of sample" in meta["calibration"].lower()


def test_record_schema_and_finite(quick):
    records = quick[1]["records"]
    assert {r["data"] for r in records} == set(SIGNED + UNSIGNED)
    for r in records:
        assert isinstance(r["codec"], str) and r["codec"]
        for key in (
            "bits_per_element",
            "stored_bits_per_element",
            "rel_error",
            "max_abs_error_rel_to_max",
        ):
            assert math.isfinite(r[key]) and r[key] >= 0, (r["codec"], key)
        assert r["stored_bits_per_element"] >= r["bits_per_element"] - 1e-9
        if r["data"] in UNSIGNED:
            for key in V_KEYS:
                assert math.isfinite(r[key]), (r["codec"], key)
            assert 0 <= r["underestimate_frac"] <= 1
        else:
            assert "inv_sqrt_rel_error" not in r
    # Every comparison the benchmark promises, on every data set.
    for data in SIGNED + UNSIGNED:
        default = "paper rings" if data in SIGNED else "default rings"
        for family in ("polar 2b", "polar 1.5b"):
            _find(records, data, family, default)
            _find(records, data, family, "calibrated")
        _find(records, data, "π-Quant", "paper")
        _find(records, data, "π-Quant", "nearest")
        for family in ("4-bit blockwise", "8-bit blockwise", "bf16"):
            _find(records, data, family)


def test_bits_are_the_codecs(quick):
    records = quick[1]["records"]
    want = {"polar 2b": 2.25, "polar 1.5b": 1.75, "4-bit blockwise": 4.25}
    want |= {"8-bit blockwise": 8.125, "bf16": 16.0}
    for r in records:
        if r["family"] in want:
            assert r["bits_per_element"] == pytest.approx(want[r["family"]])


def test_errors_ordered_on_gaussian(quick):
    records = quick[1]["records"]
    err = {
        name: _find(records, "gaussian", family, variant)["rel_error"]
        for name, family, variant in (
            ("bf16", "bf16", None),
            ("8", "8-bit blockwise", None),
            ("4", "4-bit blockwise", None),
            ("2", "polar 2b", "paper rings"),
            ("1.5", "polar 1.5b", "paper rings"),
        )
    }
    assert err["bf16"] < err["8"] < err["4"] < err["2"] < err["1.5"] < 1.0
    # Calibrated rings are fitted to the same law: never much worse than paper.
    cal = _find(records, "gaussian", "polar 2b", "calibrated")["rel_error"]
    assert cal <= err["2"] * 1.05
    # The exact nearest codeword beats the closed-form encoder.
    near = _find(records, "gaussian", "π-Quant", "nearest")["rel_error"]
    paper = _find(records, "gaussian", "π-Quant", "paper")["rel_error"]
    assert near < paper


def test_polar_unsigned_never_underestimates_by_half(quick):
    records = quick[1]["records"]
    for data in UNSIGNED:
        for family in ("polar 2b", "polar 1.5b"):
            r = _find(records, data, family, "default rings")
            assert r["underestimate_frac"] == 0.0
            assert r["zero_decode_frac"] == 0.0


def test_symmetry_section(quick):
    sym = quick[1]["symmetry"]
    for name in ("real_m", "real_sqrt_v", "real_v", "gaussian", "student_t3"):
        for pairing in ("adjacent", "split"):
            s = sym[name][pairing]
            assert s["n_pairs"] > 0
            assert 0 <= s["angle_hist_tv_from_uniform"] <= 1
            assert 0 <= s["axis_frac"] <= 1
            assert -1 <= s["pearson_corr"] <= 1
            assert sum(s["angle_hist"]) == pytest.approx(1.0, abs=1e-3)
    # i.i.d. Gaussian pairs are circular: a near-uniform angle, quadrants ~1/4.
    g = sym["gaussian"]["split"]
    assert g["angle_hist_tv_from_uniform"] < 0.1
    assert g["quadrant_mass"] == pytest.approx([0.25] * 4, abs=0.03)
