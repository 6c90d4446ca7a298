"""Smoke test of the uniform-quantizer comparison (tiny model, CPU)."""

import json
import math

import numpy as np
import pytest

from optax_lowbit.impq import data, model, quant_eval, smollm2


@pytest.mark.slow  # the command line end to end
def test_tiny_end_to_end_through_a_token_file(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("It is a truth universally acknowledged, that a single man. " * 30)
    tokens = tmp_path / "tokens.npz"
    common = ["--model", "tiny", "--calib-tokens", "128", "--seq-len", "32"]
    assert (
        quant_eval.main(
            [
                *common,
                "--calib-text",
                str(text),
                "--eval-text",
                str(text),
                "--save-tokens",
                str(tokens),
            ]
        )
        == 0
    )
    with np.load(tokens) as z:
        assert z["calib"].ndim == 1 and z["heldout"].size > 64
    out = tmp_path / "qe.json"
    rc = quant_eval.main(
        [
            *common,
            "--eval-tokens",
            "64",
            "--tokens",
            str(tokens),
            "--bits",
            "3",
            "--methods",
            "rtn_g128,rtn_mse,gptq",
            "--batch",
            "2",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    report = json.loads(out.read_text())
    assert math.isfinite(report["reference_ppl"])
    recs = {r["method"]: r for r in report["records"]}
    assert set(recs) == {"rtn_g128", "rtn_mse", "gptq"}
    for name, r in recs.items():
        assert r["bits"] == 3 and r["code_bits_per_weight"] == 3.0
        assert r["all_in_bits_per_weight"] == (3.25 if name == "rtn_g128" else 3.5)
        assert math.isfinite(r["ppl"]) and r["ppl"] > 1
    assert report["meta"]["calib_shape"] == [4, 32]
    assert report["meta"]["eval_tokens"] == 64


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--methods", "awq"], "--methods"),
        (["--bits", "5"], "--bits"),
        (["--calib-tokens", "0"], "--calib-tokens"),
        (["--out", "/no/such/folder/x.json"], "--out"),
        (["--model", "tiny", "--source", "a.gguf"], "--source"),
        (["--damp", "0"], "--damp"),
    ],
)
def test_bad_arguments_fail_before_loading(argv, flag, monkeypatch, capsys):
    for obj, name in [
        (data, "austen_text"),
        (model, "tiny_llama"),
        (smollm2, "load_params"),
        (smollm2, "load_tokenizer"),
    ]:
        monkeypatch.setattr(obj, name, pytest.fail)
    with pytest.raises(SystemExit) as exit_info:
        quant_eval.main(argv)
    assert exit_info.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err
