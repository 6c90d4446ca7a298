"""Tests of optax_lowbit.impq.baselines, pipeline and the command line (tiny model)."""

import itertools
import json

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from optax_lowbit.impq import baselines, cli, model, pipeline, spqe

# The tests of the module-scoped `tiny` model share one xdist worker
# (``--dist loadgroup``): built once per run (~11-15 s), not once per worker.
# They run in CI's slow step, beside the command line's end-to-end test.
TINY = pytest.mark.xdist_group("baselines_tiny")
SLOW = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny():
    m = model.tiny_llama(n_layers=3, seed=2)
    fwd = spqe.SelectorForward(m, (2, 3, 4, 8, spqe.FULL), batch_size=4)
    tokens = (np.arange(2 * 33).reshape(2, 33) * 5) % 256
    return m, fwd, tokens, fwd.reference(tokens)


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(2, 9),
    choices=st.sampled_from([(2, 3, 4), (2, 3, 4, 8), (2, 4), (3, 4)]),
    data=st.data(),
)
def test_uniform_is_the_best_mix_that_fits(seed, n, choices, data):
    rng = np.random.default_rng(seed)
    budget = data.draw(st.floats(choices[0], choices[-1]))
    cost = np.sort(rng.uniform(size=(n, len(choices))), axis=1)[:, ::-1]
    bits = baselines.uniform(n, budget, choices, cost=cost)
    if budget in choices:
        assert set(bits.tolist()) == {int(budget)}
        return
    lo = max(b for b in choices if b < budget)
    hi = min(b for b in choices if b > budget)
    assert set(bits.tolist()) <= {lo, hi}
    # as many blocks at hi as the code-bit budget allows
    assert np.sum(bits == hi) == int(np.floor(n * (budget - lo) / (hi - lo) + 1e-9))
    # and the ones whose cost falls most from lo to hi
    gain = cost[:, choices.index(lo)] - cost[:, choices.index(hi)]
    k = int(np.sum(bits == hi))
    if 0 < k < n:
        assert gain[bits == hi].min() >= np.sort(gain)[::-1][k - 1] - 1e-12


def test_uniform_examples():
    assert baselines.uniform(3, 3.0, (2, 3, 4)).tolist() == [3, 3, 3]
    assert sorted(baselines.uniform(4, 2.5, (2, 3, 4)).tolist()) == [2, 2, 3, 3]
    assert baselines.uniform(2, 8.0).tolist() == [8, 8]
    with pytest.raises(ValueError, match="accepted: 2 <= avg_bits <= 8"):
        baselines.uniform(3, 1.5)


def test_random_bits_fit_and_are_maximal():
    for seed in range(20):
        b = baselines.random_bits(6, 3.0, np.random.default_rng(seed))
        assert np.mean(b) <= 3.0 + 1e-12
        for i in range(6):
            if b[i] != 8:
                wider = b.copy()
                wider[i] = {2: 3, 3: 4, 4: 8}[b[i]]
                assert np.mean(wider) > 3.0


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 6))
def test_greedy_descent_on_a_toy_cost(seed, n):
    # additive toy cost: greedy by cost per saved bit is the known path
    rng = np.random.default_rng(seed)
    choices = (2, 3, 4)
    step = rng.uniform(0.1, 1.0, (n, 2))  # cost of 4->3 and 3->2 per block
    step[:, 1] += step[:, 0]  # convex: the second step always costs more
    sizes = rng.integers(1, 4, n).astype(float)
    calls = []

    def cost(bits):
        calls.append(len(bits))
        bits = np.asarray(bits)
        return ((bits <= 3) * step[:, 0] + (bits <= 2) * step[:, 1]).sum(1)

    budgets = [2.0, 2.5, 3.0, 3.5, 4.0]
    path = baselines.greedy_descent(cost, n, budgets, choices, sizes)
    assert set(path) == set(budgets)
    for b, bits in path.items():
        assert sizes @ bits / sizes.sum() <= b + 1e-9
    np.testing.assert_array_equal(path[4.0], [4] * n)
    np.testing.assert_array_equal(path[2.0], [2] * n)
    # the order blocks are lowered in: by step cost per saved bit (size)
    ratio = np.concatenate([step[:, 0] / sizes, step[:, 1] / sizes])
    order = np.argsort(ratio, kind="stable")
    bits, want = np.full(n, 4), {}
    for j in [*order, None]:
        for b in budgets:
            if b not in want and sizes @ bits / sizes.sum() <= b + 1e-9:
                want[b] = bits.copy()
        if j is not None:
            bits[j % n] -= 1
    for b in budgets:
        np.testing.assert_array_equal(path[b], want[b])
    assert sum(calls) <= 1 + n * (2 * n)


@TINY
@SLOW
def test_isolated_two_ways_match_direct_evaluation(tiny):
    _, fwd, _, ref = tiny
    table = baselines.isolated_table(fwd, ref)
    direct = fwd.kls(fwd.selector([spqe.FULL, 2, spqe.FULL])[None], ref)[0]
    assert table.shape == (3, 4)
    np.testing.assert_allclose(table[1, 0], direct, rtol=1e-6)
    assert np.all(table[:, 0] > table[:, -1])  # 2 bits hurt more than 8
    gains = baselines.isolated_gains(fwd, ref, 2, 3)
    kl = fwd.kls(np.stack([fwd.selector(b) for b in ([2, 2, 2], [2, 2, 3])]), ref)
    np.testing.assert_allclose(gains[2], kl[0] - kl[1], rtol=1e-6)
    alloc = baselines.additive(table, 3.0, sizes=fwd.sizes)
    assert alloc.avg_bits <= 3.0 + 1e-9


@TINY
@SLOW
def test_fisher_and_lim(tiny):
    m, fwd, tokens, _ = tiny
    tr = baselines.fisher_traces(m, tokens)
    assert tr.shape == (3,) and np.all(tr > 0)
    lim = baselines.lim_scores(m, tokens)
    assert lim.shape == (3,) and np.all((lim > 0) & (lim < 2))
    hawq = baselines.scaled_errors(tr, fwd, relative=False)
    np.testing.assert_allclose(hawq, tr[:, None] * fwd.sse[:, :4])
    rel = baselines.scaled_errors(lim, fwd, relative=True)
    np.testing.assert_allclose(rel[:, 0], lim)
    np.testing.assert_allclose(rel[:, -1], 0.0)
    no_hidden = model.BlockModel("x", m.params, m.loss)
    with pytest.raises(ValueError, match="no `hidden`"):
        baselines.lim_scores(no_hidden, tokens)


@TINY
@SLOW
def test_pipeline_records_and_rules(tiny):
    m, _, tokens, _ = tiny
    report = pipeline.run(
        m,
        tokens,
        tokens,
        budgets=[2.0, 2.5, 3.0],
        methods=pipeline.METHODS,
        n_samples=40,
        n_random=2,
        batch_size=4,
    )
    recs = report["records"]
    per_budget = len(pipeline.METHODS) + 1  # random: two draws
    assert len(recs) == 3 * per_budget
    for r in recs:
        assert r["code_bits"] <= r["budget_bits"] + 1e-9
        assert r["all_in_bits"] == pytest.approx(r["code_bits"] + 0.5)
        assert [rule[1]["bits"] for rule in r["rules"]] == r["bits_per_block"]
        assert np.isfinite(r["ppl"]) and r["calib_kl"] >= 0
    uni = [r for r in recs if r["method"] == "uniform"]
    assert [r["bits_per_block"] for r in uni][2] == [3, 3, 3]
    games = report["games"]
    assert [(g["lo"], g["hi"], g["p"]) for g in games] == [(2, 3, 0.5), (2, 4, 0.5)]
    assert all(len(g["pairs"]) == 3 and g["n_samples"] == 40 for g in games)
    # 3.0 bits plays 2 against 4 and places 3 bits by the KL measured there
    mid = np.asarray(games[1]["middle_errors"])
    assert "middle_errors" not in games[0] and mid.shape == (3,)
    assert np.all((mid >= 0) & (mid <= 1))
    with pytest.raises(ValueError, match="methods must be"):
        pipeline.run(m, tokens, tokens, budgets=[3.0], methods=["gptq"])


@pytest.mark.slow  # the command line end to end
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
            "--samples",
            "30",
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
            "--quantizer",  # GPTQ (the default) is tested in test_gptq.py
            "rtn_mse",
        ]
    )
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["settings"]["quantizer"] == "rtn_mse"
    assert cli.parser().parse_args([]).quantizer == "gptq_act"
    assert {r["method"] for r in report["records"]} == {"impq", "uniform"}
    assert len(report["games"][0]["phi"]) == 4
    assert report["records"][0]["rules"][0][0] == "blocks/0/.*"


@SLOW
def test_lim_of_an_nnx_model_with_its_residual_stream():
    """`from_nnx` with ``hidden_fn`` (our GPT's `hidden_states`): LIM runs on
    it, ``1 - cos`` of each block's input and output, by hand here."""
    from flax import nnx

    from benchmarks.models import TinyGPT, loss_fn

    net = TinyGPT(d_model=32, n_layers=3, n_heads=2, seq_len=8, rngs=nnx.Rngs(1))
    tokens = np.random.default_rng(3).integers(0, 256, (2, 9))

    def hidden_fn(module, t):
        return module.hidden_states(t[:, :-1])

    m = model.from_nnx(net, loss_fn, hidden_fn=hidden_fn)
    hs = net.hidden_states(tokens[:, :-1])
    assert len(hs) == 4
    np.testing.assert_allclose(m.hidden(m.params, tokens)[-1], hs[-1], rtol=1e-6)
    np.testing.assert_allclose(
        net(tokens[:, :-1]), net.head(net.ln_f(hs[-1])), rtol=1e-6
    )
    want = []
    for a, b in itertools.pairwise(hs):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        cos = (a * b).sum(-1) / (
            np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
        )
        want.append((1 - cos).mean())
    np.testing.assert_allclose(baselines.lim_scores(m, tokens), want, rtol=1e-4)
    assert model.from_nnx(net, loss_fn).hidden is None
