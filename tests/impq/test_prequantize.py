"""`pipeline.prequantize`: one home for the block quantizer of the CLI and the table."""

import numpy as np
import pytest

from optax_lowbit.impq import gptq, model, pipeline, quantizer


@pytest.fixture(scope="module")
def tiny():
    return model.tiny_llama(n_layers=2, d_model=64, d_ff=128)


def _tokens(seed):
    return np.random.default_rng(seed).integers(0, 256, (4, 32))


def test_rtn_mse_is_quantize_tree_of_each_block(tiny):
    out = pipeline.prequantize(tiny, None, (2, 4), "rtn_mse")
    assert sorted(out) == [2, 4]
    for b in (2, 4):
        for got, x in zip(out[b]["blocks"], tiny.params["blocks"], strict=True):
            want = quantizer.quantize_tree(x, b)
            assert got["attn"]["q"].bits == want["attn"]["q"].bits == b
            np.testing.assert_array_equal(
                np.asarray(got["mlp"]["up"].codes), np.asarray(want["mlp"]["up"].codes)
            )


@pytest.mark.parametrize("name, act_order", [("gptq", False), ("gptq_act", True)])
def test_gptq_runs_on_the_llama_config_with_act_order(
    tiny, name, act_order, monkeypatch
):
    seen = []

    def fake(params, config, tokens, bits, **kw):
        seen.append((config, bits, kw["act_order"], tokens.shape))
        return {"blocks": bits}

    monkeypatch.setattr(gptq, "quantize_model", fake)
    tokens = _tokens(1)
    out = pipeline.prequantize(tiny, tokens, (3,), name)
    assert out == {3: {"blocks": 3}}
    assert seen == [(tiny.llama_config, 3, act_order, tokens.shape)]


def test_bad_quantizer_and_gptq_without_a_llama_are_refused(tiny):
    with pytest.raises(ValueError, match="is not one of"):
        pipeline.prequantize(tiny, None, (2,), "awq")
    plain = model.BlockModel(name="plain", params=tiny.params, loss=tiny.loss)
    with pytest.raises(ValueError, match=r"Llama-port model.*'plain'.*rtn_mse"):
        pipeline.prequantize(plain, _tokens(2), (2,), "gptq_act")
