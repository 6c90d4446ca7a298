"""Tests of optax_lowbit.impq.game: operating point, sampler, quadratic surrogate."""

import itertools
import re

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from optax_lowbit.impq import allocate, game


@pytest.mark.parametrize(
    ("budget", "want"),
    [
        (2.25, (2, 3, 0.25)),
        (2.5, (2, 3, 0.5)),
        (2.75, (2, 3, 0.75)),
        (3.0, (2, 4, 0.5)),  # on a width: its two neighbours
        (3.5, (3, 4, 0.5)),
    ],
)
def test_operating_point(budget, want):
    op = game.operating_point(budget, (2, 3, 4))
    assert (op.lo, op.hi) == want[:2] and op.p == pytest.approx(want[2])


def test_operating_point_needs_a_choice():
    with pytest.raises(ValueError, match=re.escape("a game needs 2 < avg_bits < 4")):
        game.operating_point(2.0, (2, 3, 4))
    with pytest.raises(ValueError, match="accepted: 2 <= avg_bits <= 4"):
        game.operating_point(4.5, (2, 3, 4))


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(seed=st.integers(0, 2**31 - 1), p=st.floats(0.05, 0.95))
def test_sampler_includes_each_player_with_probability_p(seed, p):
    rng = np.random.default_rng(seed)
    x = game.sample_coalitions(6, 4000, p, rng)
    assert x.shape == (4000, 6) and x.dtype == bool
    sd = np.sqrt(p * (1 - p) / 4000)
    assert np.all(np.abs(x.mean(0) - p) < 5 * sd)
    # independent players: a pair is in together with probability p**2
    both = (x[:, 0] & x[:, 1]).mean()
    assert abs(both - p * p) < 5 * np.sqrt(p * p * (1 - p * p) / 4000)


@pytest.mark.parametrize("p", [0.0, 1.0, -0.1, True])
def test_sampler_rejects_bad_p(p):
    with pytest.raises(ValueError, match=re.escape("p must be a number in (0, 1)")):
        game.sample_coalitions(3, 10, p, np.random.default_rng(0))


def _full_rank(x):
    n = x.shape[1]
    return np.linalg.matrix_rank(game.quadratic_features(x)) == 1 + n * (n + 1) // 2


def _planted(rng, n):
    a = rng.normal(size=n)
    b = np.triu(rng.normal(size=(n, n)), 1)
    b = b + b.T
    c = float(rng.normal())

    def v(x):
        x = np.asarray(x, float)
        return c + x @ a + 0.5 * np.einsum("ml,lk,mk->m", x, b, x)

    return c, a, b, v


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(
    seed=st.integers(0, 2**31 - 1), n=st.integers(2, 8), p=st.floats(0.2, 0.8)
)
def test_surrogate_recovers_planted_pairwise_terms(seed, n, p):
    rng = np.random.default_rng(seed)
    c, a, b, v = _planted(rng, n)
    x = game.sample_coalitions(n, 600, p, rng)
    hypothesis.assume(_full_rank(x))
    s = game.fit_quadratic(x, v(x))
    np.testing.assert_allclose(s.pairs, b, atol=1e-8)
    np.testing.assert_allclose(s.linear, a, atol=1e-8)
    assert s.intercept == pytest.approx(c, abs=1e-8)
    # with noise the pair terms are still found, within the noise's reach
    noisy = game.fit_quadratic(x, v(x) + 0.01 * rng.normal(size=len(x)))
    assert np.max(np.abs(noisy.pairs - b)) < 0.1


def _exact_weighted_banzhaf(v, n, p):
    phi = np.zeros(n)
    for i in range(n):
        others = [k for k in range(n) if k != i]
        for bits in itertools.product([0, 1], repeat=n - 1):
            x = np.zeros(n)
            x[others] = bits
            w = p ** sum(bits) * (1 - p) ** (n - 1 - sum(bits))
            hi, lo = x.copy(), x.copy()
            hi[i] = 1
            phi[i] += w * (v(hi[None])[0] - v(lo[None])[0])
    return phi


@hypothesis.settings(max_examples=15, deadline=None)
@hypothesis.given(seed=st.integers(0, 2**31 - 1), p=st.floats(0.1, 0.9))
def test_banzhaf_of_the_surrogate_is_the_weighted_banzhaf_value(seed, p):
    rng = np.random.default_rng(seed)
    n = 5
    _, _, _, v = _planted(rng, n)
    x = game.sample_coalitions(n, 400, p, rng)
    hypothesis.assume(_full_rank(x))
    s = game.fit_quadratic(x, v(x))
    exact = _exact_weighted_banzhaf(v, n, p)
    np.testing.assert_allclose(game.banzhaf(s, p), exact, atol=1e-8)
    # the model-free estimate agrees within sampling error
    big = game.sample_coalitions(n, 20000, p, rng)
    np.testing.assert_allclose(game.msr_values(big, v(big)), exact, atol=0.25)


@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 6))
def test_allocation_terms_are_the_surrogate_exactly(seed, n):
    rng = np.random.default_rng(seed)
    c, a, b, _ = _planted(rng, n)
    s = game.Surrogate(c, a, b)
    phi, cm = game.allocation_terms(s)
    all_hi = s(np.ones((1, n)))[0]
    for e in itertools.product([1.0, 0.0], repeat=n):
        bits = np.where(np.asarray(e) == 1.0, 2, 3)
        j = allocate.objective(bits, phi, cm, np.tile([1.0, 0.0], (n, 1)), (2, 3))
        assert j == pytest.approx(all_hi - s((1 - np.asarray(e))[None])[0], abs=1e-9)
    # and the MILP's optimum is the best coalition of the surrogate in budget
    budget = float(rng.uniform(2.0, 3.0))
    alloc = allocate.allocate(
        phi, cm, np.tile([1.0, 0.0], (n, 1)), avg_bits=budget, bit_choices=(2, 3)
    )
    best = max(
        s(np.asarray(x, float)[None])[0]
        for x in itertools.product([0, 1], repeat=n)
        if 2 + np.mean(x) <= budget + 1e-9
    )
    assert s((alloc.bits == 3).astype(float)[None])[0] == pytest.approx(best, abs=1e-9)
    ph0, c0 = game.banzhaf_terms(s, 0.3)
    np.testing.assert_allclose(ph0, a + 0.3 * b.sum(1))
    assert not c0.any()


def test_play_fits_a_planted_game_and_caches_coalitions():
    rng = np.random.default_rng(3)
    n = 6
    _, a, b, v = _planted(rng, n)
    calls = []

    def value(coalitions):
        calls.append(len(coalitions))
        return v(coalitions)

    pt = game.operating_point(2.25, (2, 3))
    res = game.play(value, n, pt, n_samples=300, seed=1, chunk_size=50)
    assert res.coalitions.shape == (300, n) and res.n_evals == sum(calls) <= 300
    assert res.heldout_r2 == pytest.approx(1.0) and res.ridge == 0.0
    np.testing.assert_allclose(res.surrogate.pairs, b, atol=1e-8)
    np.testing.assert_allclose(res.phi, a + 0.25 * b.sum(1), atol=1e-8)
    again = game.play(value, n, pt, n_samples=300, seed=1, chunk_size=50)
    np.testing.assert_array_equal(again.coalitions, res.coalitions)


def test_rank_agreement():
    rng = np.random.default_rng(0)
    base = rng.normal(size=10)
    assert game.rank_agreement([base, 2 * base + 1, base**3]) == pytest.approx(1.0)
    assert game.rank_agreement([base, -base]) == pytest.approx(-1.0)
    assert np.isnan(game.rank_agreement([base]))


def test_ridge_shrinks_only_the_pair_terms():
    rng = np.random.default_rng(4)
    n = 5
    _, _, _, v = _planted(rng, n)
    x = game.sample_coalitions(n, 300, 0.5, rng)
    norms = [
        np.abs(game.fit_quadratic(x, v(x), r).pairs).sum() for r in (0.0, 0.1, 10.0)
    ]
    assert norms[0] > norms[1] > norms[2] and norms[2] < 0.1 * norms[0]
    # a huge penalty leaves the best additive game: its linear terms are free
    additive = game.fit_quadratic(x, v(x), 1e9)
    feats = np.concatenate([np.ones((len(x), 1)), x], 1)
    coef = np.linalg.lstsq(feats, v(x), rcond=None)[0]
    np.testing.assert_allclose(additive.linear, coef[1:], atol=1e-5)
    with pytest.raises(ValueError, match="ridge must be a number >= 0"):
        game.fit_quadratic(x, v(x), -1.0)
    # too few samples for 16 coefficients: the held-out share picks a ridge
    res = game.play(
        lambda c: v(c) + rng.normal(size=len(c)),
        n,
        game.OperatingPoint(2, 3, 0.5),
        n_samples=12,
        seed=2,
    )
    assert res.ridge in game.RIDGES


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(seed=st.integers(0, 2**31 - 1))
def test_middle_errors_place_the_middle_width_between_its_neighbours(seed):
    rng = np.random.default_rng(seed)
    n = 6
    hi = rng.uniform(0.0, 1.0, n)  # KL with block l raised to hi
    lo = hi + rng.uniform(0.1, 2.0, n)  # and lowered to lo: always worse
    share = rng.uniform(0, 1, n)
    # KL(all at mid) shared by every row; each block's own share of its span
    mid = float(hi[0] + share[0] * (lo[0] - hi[0]))
    e = game.middle_errors(mid, lo, hi)
    assert e[0] == pytest.approx(share[0]) and np.all((e >= 0) & (e <= 1))
    # a block whose moves change nothing sits halfway
    assert game.middle_errors(1.0, np.ones(2), np.ones(2)).tolist() == [0.5, 0.5]
