"""Tests of optax_lowbit.impq.spqe on known games and a tiny LM."""

import itertools
import math

import jax
import numpy as np
import pytest

from optax_lowbit.impq import model, quantizer, smollm2, spqe


def _game(n, seed, triples=0):
    """v(S) = sum_{i in S} a_i + sum_{i<j in S} b_ij (+ triple terms).

    Exact Shapley: a_i + half of each pair term + a third of each triple term.
    """
    rng = np.random.default_rng(seed)
    a = rng.normal(size=n)
    b = np.triu(rng.normal(size=(n, n)), 1)
    exact = a + (b.sum(0) + b.sum(1)) / 2
    tri = [tuple(rng.choice(n, 3, replace=False)) for _ in range(triples)]
    tri_w = rng.normal(size=triples)
    for t, c in zip(tri, tri_w, strict=True):
        exact[list(t)] += c / 3

    def loss(sels):
        s = (np.asarray(sels) == 1).astype(float)
        v = s @ a + np.einsum("ni,ij,nj->n", s, b, s)
        for t, c in zip(tri, tri_w, strict=True):
            v = v + c * s[:, t[0]] * s[:, t[1]] * s[:, t[2]]
        return -v

    return loss, exact


def _exact_by_enumeration(loss, n):
    phi = np.zeros(n)
    for perm in itertools.permutations(range(n)):
        member = np.zeros(n, int)
        for p in perm:
            before = -loss(member[None])[0]
            member[p] = 1
            phi[p] += -loss(member[None])[0] - before
    return phi / math.factorial(n)


def test_all_permutations_give_exact_shapley():
    loss, exact = _game(4, 0)
    np.testing.assert_allclose(_exact_by_enumeration(loss, 4), exact, atol=1e-12)
    perms = np.array(list(itertools.permutations(range(4))))
    res = spqe.spqe(loss, 4, stages=[(1, 0)], permutations=perms)
    np.testing.assert_allclose(res.phi, exact, atol=1e-12)
    # Efficiency: the values sum to v(all) - v(empty), in every permutation.
    total = -loss(np.ones((1, 4), int))[0] + loss(np.zeros((1, 4), int))[0]
    np.testing.assert_allclose(res.deltas.sum(1), total, atol=1e-12)


def test_antithetic_pairs_are_exact_for_pairwise_games():
    # Reversing a permutation swaps "j before i" and "j after i", so a pair's
    # mean holds exactly half of every pair term.
    loss, exact = _game(7, 1)
    res = spqe.spqe(loss, 7, stages=[(1, 0)], n_permutations=2, seed=5)
    np.testing.assert_allclose(res.phi, exact, atol=1e-12)
    plain = spqe.spqe(loss, 7, stages=[(1, 0)], n_permutations=2, antithetic=False)
    assert np.abs(plain.phi - exact).max() > 1e-3


@pytest.mark.parametrize("antithetic", [True, False])
def test_sampling_recovers_values_within_standard_errors(antithetic):
    loss, exact = _game(7, 1, triples=6)
    res = spqe.spqe(
        loss, 7, stages=[(1, 0)], n_permutations=400, antithetic=antithetic, seed=3
    )
    err = np.abs(res.phi - exact)
    assert np.all(err <= 4.5 * res.se + 1e-9), (err, res.se)
    assert res.se.max() > 0
    assert np.abs(res.phi - exact).max() < 0.15


def test_additive_game_is_exact_with_zero_error():
    rng = np.random.default_rng(2)
    a = rng.normal(size=5)
    res = spqe.spqe(
        lambda s: -((np.asarray(s) == 1) @ a), 5, stages=[(1, 0)], n_permutations=4
    )
    np.testing.assert_allclose(res.phi, a, atol=1e-12)
    np.testing.assert_allclose(res.se, 0, atol=1e-12)


def test_stages_add_and_cache_dedups():
    # Three widths (codes 2 > 1 > 0): stage values add up (linearity).
    rng = np.random.default_rng(4)
    w = rng.normal(size=(3, 5))
    calls = []

    def loss(sels):
        calls.append(len(sels))
        sels = np.asarray(sels)
        return -np.take_along_axis(w.T[None], sels[..., None], 2)[..., 0].sum(1)

    res = spqe.spqe(loss, 5, stages=[(2, 1), (1, 0)], n_permutations=6)
    np.testing.assert_allclose(res.phi, w[2] - w[0], atol=1e-12)
    np.testing.assert_allclose(res.stage_phi, [w[2] - w[1], w[1] - w[0]], atol=1e-12)
    # Each stage needs 6 * 6 lookups; "all at code 1" is shared by both stages,
    # the empty/full coalitions by every permutation.
    assert res.n_lookups == 2 * 6 * 6
    assert sum(calls) == res.n_evals <= 2 * (6 * 4 + 2) - 1


def test_bad_arguments():
    loss, _ = _game(3, 0)
    with pytest.raises(ValueError, match="must be even"):
        spqe.spqe(loss, 3, stages=[(1, 0)], n_permutations=5)
    with pytest.raises(ValueError, match="n_permutations must be >= 2"):
        spqe.spqe(loss, 3, stages=[(1, 0)], n_permutations=0)
    with pytest.raises(ValueError, match="stages"):
        spqe.spqe(loss, 3, stages=[], n_permutations=2)
    with pytest.raises(ValueError, match="permutations must be"):
        spqe.spqe(loss, 3, stages=[(1, 0)], permutations=np.array([[0, 0, 1]]))


@pytest.fixture(scope="module")
def tiny():
    m = model.tiny_llama(n_layers=4, seed=1)
    fwd = spqe.SelectorForward(m, (2, 3, 4, spqe.FULL), batch_size=4)
    tokens = (np.arange(2 * 33).reshape(2, 33) * 7) % 256
    return m, fwd, tokens


def test_one_trace_serves_every_coalition(tiny):
    _, fwd, tokens = tiny
    res = spqe.estimate(fwd, tokens, chain=(4, 3, 2), n_permutations=6, seed=0)
    assert fwd.n_traces == 1
    assert res.n_evals < res.n_lookups
    # Any allocation (not just stage coalitions) reuses the same trace.
    fwd.loss_of_bits([2, 4, 3, 2], tokens)
    fwd.losses(np.zeros((7, 4), int), tokens)
    assert fwd.n_traces == 1
    assert np.all(np.isfinite(res.phi)) and res.deltas.shape == (6, 4)
    # Efficiency per permutation: contributions sum to v(all 4) - v(all 2).
    v4 = -fwd.loss_of_bits([4] * 4, tokens)
    v2 = -fwd.loss_of_bits([2] * 4, tokens)
    np.testing.assert_allclose(res.deltas.sum(1), v4 - v2, rtol=1e-5, atol=1e-5)


def test_selector_matches_packed_qmatmul_path(tiny):
    m, fwd, tokens = tiny
    bits = [2, 4, 3, 2]
    q = dict(m.params)
    q["blocks"] = [
        quantizer.quantize_tree(b, bi)
        for b, bi in zip(m.params["blocks"], bits, strict=True)
    ]
    cfg = m.loss.keywords["config"]
    want = float(
        smollm2.nll(q, jax.numpy.asarray(tokens), cfg, matmul=quantizer.qmatmul)
    )
    np.testing.assert_allclose(fwd.loss_of_bits(bits, tokens), want, rtol=1e-5)
    full = fwd.loss_of_bits([spqe.FULL] * 4, tokens)
    np.testing.assert_allclose(full, float(m.loss(m.params, tokens)), rtol=1e-6)
    # Real packed bytes: 8*b + 4 bytes per 64 weights.
    np.testing.assert_array_equal(
        fwd.nbytes[:, fwd.index(3)], fwd.sizes // 64 * (8 * 3 + 4)
    )


def test_kl_to_the_reference(tiny):
    m, fwd, tokens = tiny
    ref = fwd.reference(tokens)
    bits = [2, 4, 3, 2]
    kls = fwd.kls(np.stack([fwd.selector(b) for b in ([spqe.FULL] * 4, bits)]), ref)
    assert kls[0] == pytest.approx(0.0, abs=1e-6)  # full precision: no divergence
    # the definition, written out: KL(p || q) per position, averaged
    sel = fwd.selector(bits)
    q = fwd._params(fwd._cands, fwd._rest, jax.numpy.asarray(sel))
    logp = jax.nn.log_softmax(m.logits(m.params, jax.numpy.asarray(tokens)), -1)
    logq = jax.nn.log_softmax(m.logits(q, jax.numpy.asarray(tokens)), -1)
    want = float(np.mean(np.sum(np.exp(logp) * (logp - logq), -1)))
    assert kls[1] == pytest.approx(want, rel=1e-4)
    assert kls[1] > 0
    no_logits = model.BlockModel("x", m.params, m.loss)
    with pytest.raises(ValueError, match="no `logits`"):
        spqe.SelectorForward(no_logits, (2, spqe.FULL)).reference(tokens)


def test_prequantized_candidates_replace_rtn(tiny):
    m, fwd, tokens = tiny
    # candidates quantized elsewhere (here: plain min/max RTN at 3 bits)
    given = dict(m.params)
    given["blocks"] = [
        quantizer.quantize_tree(b, 3, clip=None) for b in m.params["blocks"]
    ]
    other = spqe.SelectorForward(m, (2, 3, spqe.FULL), prequantized={3: given})
    assert np.all(other.sse[:, 1] >= fwd.sse[:, fwd.index(3)] - 1e-6)
    np.testing.assert_allclose(other.sse[:, 0], fwd.sse[:, fwd.index(2)], rtol=1e-6)
    q = dict(m.params)
    q["blocks"] = given["blocks"]
    cfg = m.loss.keywords["config"]
    want = float(
        smollm2.nll(q, jax.numpy.asarray(tokens), cfg, matmul=quantizer.qmatmul)
    )
    np.testing.assert_allclose(other.loss_of_bits([3] * 4, tokens), want, rtol=1e-5)


def test_bad_models_and_widths():
    with pytest.raises(TypeError, match="BlockModel"):
        spqe.SelectorForward({"blocks": []}, (2, 4))
    with pytest.raises(ValueError, match="'blocks' entry"):
        model.BlockModel("x", {"layers": [1]}, lambda p, t: 0.0)
    with pytest.raises(ValueError, match="at least 2 blocks"):
        model.BlockModel("x", {"blocks": [{"w": np.ones((128, 4))}]}, lambda p, t: 0.0)
    with pytest.raises(ValueError, match="no quantizable"):
        model.BlockModel("x", {"blocks": [{"n": np.ones(4)}] * 2}, lambda p, t: 0.0)
    m = model.tiny_llama(n_layers=2)
    with pytest.raises(ValueError, match="widths"):
        spqe.SelectorForward(m, (2, 5))
    fwd = spqe.SelectorForward(m, (2, 4))
    with pytest.raises(ValueError, match="chain"):
        spqe.estimate(fwd, np.zeros((1, 9), int), chain=(2, 4))
    with pytest.raises(ValueError, match="not a candidate"):
        spqe.estimate(fwd, np.zeros((1, 9), int), chain=(4, 3))


@pytest.mark.slow  # a whole NNX model through the game
def test_nnx_tinygpt_model():
    from flax import nnx

    from benchmarks.models import TinyGPT, loss_fn

    net = TinyGPT(d_model=128, n_layers=2, seq_len=32, rngs=nnx.Rngs(0))
    m = model.from_nnx(net, loss_fn)
    assert m.n_blocks == 2
    tokens = np.arange(2 * 17).reshape(2, 17) % 256
    np.testing.assert_allclose(
        m.loss(m.params, tokens), loss_fn(net, tokens), rtol=1e-6
    )
    fwd = spqe.SelectorForward(m, (2, 8, spqe.FULL))
    assert fwd.sizes.tolist() == [128 * 384 + 128 * 128 + 2 * 128 * 512] * 2
    np.testing.assert_allclose(
        fwd.loss_of_bits([spqe.FULL] * 2, tokens), loss_fn(net, tokens), rtol=1e-6
    )
    assert fwd.loss_of_bits([2, 2], tokens) != fwd.loss_of_bits([8, 8], tokens)
    with pytest.raises(ValueError, match="no `blocks`"):
        model.from_nnx(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), loss_fn)
