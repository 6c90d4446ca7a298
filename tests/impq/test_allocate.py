"""Tests of optax_lowbit.impq.allocate: the MILP against brute force."""

import re

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from optax_lowbit.impq import allocate


def _problem(rng, n, k=4):
    phi = rng.normal(size=n)
    c = rng.normal(size=(n, n)) * rng.uniform(0.1, 1.0)
    c = (c + c.T) / 2
    e = np.sort(rng.uniform(size=(n, k)), axis=1)[:, ::-1]
    return phi, c, e


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_milp_equals_brute_force(n):
    rng = np.random.default_rng(n)
    for trial in range(4 if n < 8 else 2):
        phi, c, e = _problem(rng, n)
        sizes = rng.integers(1, 5, n).astype(float) if trial % 2 else None
        budget = float(rng.uniform(2.5, 6.0))
        got = allocate.allocate(phi, c, e, avg_bits=budget, sizes=sizes)
        want = allocate.brute_force(phi, c, e, avg_bits=budget, sizes=sizes)
        assert got.optimal and "Optimal" in got.status
        assert got.objective == pytest.approx(want.objective, abs=1e-7)
        assert got.avg_bits <= budget + 1e-9
        assert got.objective == pytest.approx(
            allocate.objective(got.bits, phi, c, e), abs=1e-9
        )


def test_asymmetric_interactions_and_subset_of_choices():
    rng = np.random.default_rng(7)
    phi, _, e = _problem(rng, 5, k=3)
    c = rng.normal(size=(5, 5))  # not symmetric: only C_lk + C_kl matters
    got = allocate.allocate(phi, c, e, avg_bits=3.0, bit_choices=(2, 3, 4))
    want = allocate.brute_force(phi, c, e, avg_bits=3.0, bit_choices=(2, 3, 4))
    assert got.objective == pytest.approx(want.objective, abs=1e-7)
    assert set(got.bits.tolist()) <= {2, 3, 4}


def test_interaction_term_changes_the_answer():
    # Room for one 4-bit block: alone, block 2 matters least; but it interacts
    # with both others, so only widening it removes both pair terms.
    phi = np.array([1.0, 1.0, 0.9])
    e = np.array([[1.0, 0.0]] * 3)
    no_c = allocate.allocate(
        phi, np.zeros((3, 3)), e, avg_bits=3.5 - 1 / 3, bit_choices=(2, 4)
    )
    assert no_c.bits.tolist().count(4) == 1 and no_c.bits[2] == 2
    c = np.zeros((3, 3))
    c[2, 0] = c[0, 2] = c[2, 1] = c[1, 2] = 1.0  # block 2 hurts with 0 and 1
    with_c = allocate.allocate(phi, c, e, avg_bits=3.5 - 1 / 3, bit_choices=(2, 4))
    assert with_c.bits[2] == 4


def test_bad_budget_names_the_range():
    phi, c, e = _problem(np.random.default_rng(0), 3)
    msg = re.escape(
        "avg_bits=1.8 is below min(bit_choices)+0.5=2.5; "
        "accepted: 2.5 <= avg_bits <= 8.5"
    )
    with pytest.raises(ValueError, match=msg):
        allocate.allocate(phi, c, e, avg_bits=1.8)
    with pytest.raises(ValueError, match=re.escape("accepted: 2.5 <= avg_bits <= 8.5")):
        allocate.allocate(phi, c, e, avg_bits=9.0)
    with pytest.raises(ValueError, match=re.escape("accepted: 3.5 <= avg_bits <= 4.5")):
        allocate.allocate(phi, c, e[:, 1:3], avg_bits=3.0, bit_choices=(3, 4))
    with pytest.raises(ValueError, match="below"):
        allocate.allocate(phi, c, e, avg_bits=float("nan"))


@pytest.mark.parametrize("choices", [(1, 2), (2, 2, 4), (), (2, 16)])
def test_bad_bit_choices(choices):
    with pytest.raises(ValueError, match="bit_choices"):
        allocate.check_bit_choices(choices)


def test_bad_shapes():
    phi, c, e = _problem(np.random.default_rng(0), 3)
    with pytest.raises(ValueError, match="errors must be"):
        allocate.allocate(phi, c, e[:, :3], avg_bits=3.0)
    with pytest.raises(ValueError, match="interactions must be"):
        allocate.allocate(phi, c[:2], e, avg_bits=3.0)
    with pytest.raises(ValueError, match="finite"):
        allocate.allocate(phi * np.nan, c, e, avg_bits=3.0)


def test_relative_errors():
    sse = np.array([[4.0, 1.0, 0.25, 0.0, 0.0]])
    e = allocate.relative_errors(sse, (2, 3, 4, 8, 16), (2, 3, 4, 8))
    np.testing.assert_allclose(e, [[1.0, 0.25, 0.0625, 0.0]])


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 7))
def test_monotone_terms_make_more_bits_never_worse(seed, n):
    rng = np.random.default_rng(seed)
    phi, c, e = _problem(rng, n)  # phi and C with negative entries
    phi_m, c_m, n_capped = allocate.monotone_terms(phi, c)
    assert np.all(phi_m >= 0) and 0 <= n_capped <= n * (n - 1) // 2
    w, w_m = c + c.T, c_m + c_m.T
    off = ~np.eye(n, dtype=bool)
    np.testing.assert_allclose(w_m[off & (w >= 0)], w[off & (w >= 0)])  # kept
    assert np.all(w_m[off] >= w[off] - 1e-12)  # only raised, never lowered
    # raise one block's width by one choice from a random allocation: J never grows
    for _ in range(20):
        idx = rng.integers(0, e.shape[1], n)
        layer = rng.integers(n)
        if idx[layer] == e.shape[1] - 1:
            continue
        bits = np.asarray(allocate.quantizer.BIT_CHOICES)[idx]
        wider = bits.copy()
        wider[layer] = allocate.quantizer.BIT_CHOICES[idx[layer] + 1]
        before = allocate.objective(bits, phi_m, c_m, e)
        assert allocate.objective(wider, phi_m, c_m, e) <= before + 1e-12


def test_monotone_terms_keep_a_harmless_objective():
    phi = np.array([1.0, 2.0, 0.5])
    c = np.array([[0.3, 0.1, 0.0], [0.1, 0.2, -0.2], [0.0, -0.2, 0.1]])
    phi_m, c_m, n_capped = allocate.monotone_terms(phi, c)
    assert n_capped == 0  # -0.4 between blocks 1 and 2 outweighs neither
    np.testing.assert_allclose(c_m, c)
    np.testing.assert_array_equal(phi_m, phi)


def test_monotone_budget_is_spent():
    # negative pair terms made the raw objective prefer unspent budget
    rng = np.random.default_rng(3)
    n = 6
    phi = rng.uniform(0.1, 1.0, n)
    c = -np.abs(rng.normal(size=(n, n)))
    e = np.array([[1.0, 0.25, 0.06, 0.0]] * n)
    raw = allocate.brute_force(phi, c, e, avg_bits=5.0)
    phi_m, c_m, _ = allocate.monotone_terms(phi, c)
    fixed = allocate.allocate(phi_m, c_m, e, avg_bits=5.0)
    assert raw.avg_bits < 4.0  # the raw objective wastes the budget
    assert fixed.avg_bits > 5.0 - 4.0 / n  # no single block could still widen


def test_stage_costs_two_width_chain_is_the_papers_phi_times_e():
    rng = np.random.default_rng(5)
    phi = rng.uniform(0, 2, 6)
    e = np.array([[1.0, 0.0]] * 6)
    table = allocate.stage_costs(phi[None], (4, 2), e, bit_choices=(2, 4))
    np.testing.assert_allclose(table, phi[:, None] * e)


def test_stage_costs_on_the_chain_and_off_it():
    rng = np.random.default_rng(6)
    stage = rng.normal(size=(2, 5))  # some negative: clipped
    e = np.sort(rng.uniform(0.01, 1, (5, 4)), axis=1)[:, ::-1]
    e[:, 0] = 1.0
    t = allocate.stage_costs(stage, (4, 3, 2), e)
    s = np.maximum(stage, 0)
    np.testing.assert_allclose(t[:, 2], 0.0)  # 4 bits: the top of the chain
    np.testing.assert_allclose(t[:, 1], s[0])  # 3 bits
    np.testing.assert_allclose(t[:, 0], s[0] + s[1])  # 2 bits
    assert np.all(np.diff(t, axis=1) <= 1e-12)  # never costlier with more bits
    # 8 bits: the 4 -> 3 step's cost per unit error, extrapolated
    slope = s[0] / (e[:, 1] - e[:, 2])
    np.testing.assert_allclose(t[:, 3], -slope * (e[:, 2] - e[:, 3]))


@pytest.mark.parametrize(
    "chain, match",
    [((4,), "decreasing"), ((2, 4), "decreasing"), ((6, 2), "not in bit_choices")],
)
def test_stage_costs_bad_chain(chain, match):
    with pytest.raises(ValueError, match=match):
        allocate.stage_costs(np.zeros((1, 2)), chain, np.ones((2, 4)))


def test_milp_with_a_cost_table_equals_brute_force():
    rng = np.random.default_rng(11)
    for n in (3, 6):
        _, c, e = _problem(rng, n)
        table = np.sort(rng.uniform(0, 1, (n, 4)), axis=1)[:, ::-1]
        got = allocate.allocate(table, c, e, avg_bits=3.6)
        want = allocate.brute_force(table, c, e, avg_bits=3.6)
        assert got.objective == pytest.approx(want.objective, abs=1e-7)


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(
    seed=st.integers(0, 2**31 - 1), method=st.sampled_from(["impq", "impq_phi"])
)
def test_impq_terms_are_monotone(seed, method):
    from optax_lowbit.impq import pipeline

    rng = np.random.default_rng(seed)
    n = 5
    phi, c, e = _problem(rng, n)
    e[:, 0] = 1.0
    stage = rng.normal(size=(2, n))
    table, c_m, _ = pipeline.impq_terms(
        method, phi, stage, c, e, (4, 3, 2), (2, 3, 4, 8)
    )
    for _ in range(20):
        idx = rng.integers(0, 3, n)
        layer = rng.integers(n)
        bits = np.asarray((2, 3, 4, 8))[idx]
        wider = bits.copy()
        wider[layer] = (2, 3, 4, 8)[idx[layer] + 1]
        before = allocate.objective(bits, table, c_m, e)
        assert allocate.objective(wider, table, c_m, e) <= before + 1e-12
