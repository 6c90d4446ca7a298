"""Tests of optax_lowbit.impq.baselines, pipeline and the command line (tiny model)."""

import json

import numpy as np
import pytest

from optax_lowbit.impq import baselines, cli, model, pipeline, spqe


@pytest.fixture(scope="module")
def tiny():
    m = model.tiny_llama(n_layers=3, seed=2)
    fwd = spqe.SelectorForward(m, (2, 3, 4, 8, spqe.FULL), batch_size=4)
    tokens = (np.arange(2 * 33).reshape(2, 33) * 5) % 256
    return m, fwd, tokens


def test_uniform_and_random_fit_budget():
    assert baselines.uniform(3, 3.0).tolist() == [2, 2, 2]
    assert baselines.uniform(3, 3.5).tolist() == [3, 3, 3]
    assert baselines.uniform(2, 8.5).tolist() == [8, 8]
    for seed in range(20):
        b = baselines.random_bits(6, 3.0, np.random.default_rng(seed))
        assert np.mean(b + 0.5) <= 3.0 + 1e-12
        # maximal: no block can be widened one step without breaking the budget
        for i in range(6):
            if b[i] != 8:
                wider = b.copy()
                wider[i] = {2: 3, 3: 4, 4: 8}[b[i]]
                assert np.mean(wider + 0.5) > 3.0
    with pytest.raises(ValueError, match="accepted"):
        baselines.uniform(3, 2.0)


def test_isolated_table_matches_direct_evaluation(tiny):
    _, fwd, tokens = tiny
    table = baselines.isolated_table(fwd, tokens)
    full = fwd.loss_of_bits([spqe.FULL] * 3, tokens)
    direct = fwd.loss_of_bits([spqe.FULL, 2, spqe.FULL], tokens) - full
    assert table.shape == (3, 4)
    np.testing.assert_allclose(table[1, 0], direct, rtol=1e-6)
    alloc = baselines.additive(table, 3.0, sizes=fwd.sizes)
    assert alloc.avg_bits <= 3.0 + 1e-9


def test_fisher_and_lim(tiny):
    m, fwd, tokens = tiny
    tr = baselines.fisher_traces(m, tokens)
    assert tr.shape == (3,) and np.all(tr > 0)
    lim = baselines.lim_scores(m, tokens)
    assert lim.shape == (3,) and np.all((lim > 0) & (lim < 2))
    assert baselines.fisher_table(m, fwd, tokens).shape == (3, 4)
    no_hidden = model.BlockModel("x", m.params, m.loss)
    with pytest.raises(ValueError, match="no `hidden`"):
        baselines.lim_scores(no_hidden, tokens)


def test_pipeline_records_and_rules(tiny):
    m, _, tokens = tiny
    report = pipeline.run(
        m,
        tokens,
        tokens,
        budgets=[2.5, 3.5],
        methods=pipeline.METHODS,
        n_permutations=2,
        n_random=2,
    )
    recs = report["records"]
    assert len(recs) == 2 * len(pipeline.METHODS)
    for r in recs:
        assert r["avg_bits"] <= r["budget_bits"] + 1e-9
        assert abs(r["packed_bits_per_weight"] - r["avg_bits"]) < 1e-9
        assert [rule[1]["bits"] for rule in r["rules"]] == r["bits_per_block"]
        assert r["rules"][1][0] == "blocks/1/.*"
        assert np.isfinite(r["ppl"])
    assert report["n_traces"] == 1  # calibration and held-out share a shape
    with pytest.raises(ValueError, match="methods"):
        pipeline.run(m, tokens, tokens, budgets=[3.0], methods=["gptq"])


def test_cli_writes_json(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("It is a truth universally acknowledged. " * 40)
    out = tmp_path / "o.json"
    rc = cli.main(
        [
            "--model",
            "tiny",
            "--budget",
            "2.5",
            "--perms",
            "2",
            "--calib-tokens",
            "64",
            "--eval-tokens",
            "64",
            "--calib-text",
            str(text),
            "--eval-text",
            str(text),
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    report = json.loads(out.read_text())
    assert {r["method"] for r in report["records"]} == {"impq", "uniform"}
    assert len(report["spqe"]["phi"]) == 4
    assert report["records"][0]["rules"][0][0] == "blocks/0/.*"
