"""benchmarks/momentum_recursion.py: a quick run, its records and their order."""

import json

import pytest

from benchmarks import momentum_recursion
from tests._bench import run_module


@pytest.mark.slow  # six scanned Muon runs to compile
def test_quick_run_measures_every_codec(tmp_path):
    out = tmp_path / "r.json"
    run_module("benchmarks.momentum_recursion", "--quick", "--out", str(out))
    result = json.loads(out.read_text())
    by = {r["codec"]: r for r in result["records"]}
    assert list(by) == list(momentum_recursion.CODECS)
    assert result["meta"]["steps"] == 80 and result["meta"]["rows"] == 64
    for r in by.values():
        # re-encoding every step keeps each step's error: worse than once
        assert r["recursive_rel_mse"] > r["one_shot_rel_mse"] > 0, r
        assert -1.0 <= r["update_cosine"] <= 1.0
    polar, four, eight = (
        by["polar2 (muon_polar)"],
        by["4bit b128 (muon_4bit)"],
        by["8bit b256 (muon_8bit)"],
    )
    assert eight["recursive_rel_mse"] < four["recursive_rel_mse"]
    assert four["recursive_rel_mse"] < polar["recursive_rel_mse"]
    assert eight["update_cosine"] > 0.99 > four["update_cosine"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "--steps must be >= 1, got 0."),
        (["--beta", "1.0"], "--beta must be in [0, 1), got 1.0."),
    ],
)
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        momentum_recursion.main(argv)
    assert message in capsys.readouterr().err
