"""Tests of optax_lowbit.impq.allocate: the MILP against brute force."""

import functools
import re

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from optax_lowbit.impq import allocate

brute_force = functools.partial(allocate.allocate, solver="brute_force")


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
        budget = float(rng.uniform(2.0, 5.5))
        got = allocate.allocate(phi, c, e, avg_bits=budget, sizes=sizes)
        want = brute_force(phi, c, e, avg_bits=budget, sizes=sizes)
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
    want = brute_force(phi, c, e, avg_bits=3.0, bit_choices=(2, 3, 4))
    assert got.objective == pytest.approx(want.objective, abs=1e-7)
    assert set(got.bits.tolist()) <= {2, 3, 4}


def test_interaction_term_changes_the_answer():
    # Room for one 4-bit block: alone, block 2 matters least; but it interacts
    # with both others, so only widening it removes both pair terms.
    phi = np.array([1.0, 1.0, 0.9])
    e = np.array([[1.0, 0.0]] * 3)
    no_c = allocate.allocate(
        phi, np.zeros((3, 3)), e, avg_bits=3.0 - 1 / 3, bit_choices=(2, 4)
    )
    assert no_c.bits.tolist().count(4) == 1 and no_c.bits[2] == 2
    c = np.zeros((3, 3))
    c[2, 0] = c[0, 2] = c[2, 1] = c[1, 2] = 1.0  # block 2 hurts with 0 and 1
    with_c = allocate.allocate(phi, c, e, avg_bits=3.0 - 1 / 3, bit_choices=(2, 4))
    assert with_c.bits[2] == 4


def test_bad_budget_names_the_range():
    phi, c, e = _problem(np.random.default_rng(0), 3)
    msg = re.escape(
        "avg_bits=1.8 is below min(bit_choices)=2; "
        "accepted: 2 <= avg_bits <= 8 code bits per weight"
    )
    with pytest.raises(ValueError, match=msg):
        allocate.allocate(phi, c, e, avg_bits=1.8)
    with pytest.raises(ValueError, match=re.escape("accepted: 2 <= avg_bits <= 8")):
        allocate.allocate(phi, c, e, avg_bits=8.5)
    with pytest.raises(ValueError, match=re.escape("accepted: 3 <= avg_bits <= 4")):
        allocate.allocate(phi, c, e[:, 1:3], avg_bits=2.5, bit_choices=(3, 4))
    with pytest.raises(ValueError, match="below"):
        allocate.allocate(phi, c, e, avg_bits=float("nan"))
    with pytest.raises(TypeError, match="avg_bits must be a number"):
        allocate.check_budget("3", (2, 3))
    with pytest.raises(ValueError, match="solver must be one of"):
        allocate.allocate(phi, c, e, avg_bits=3.0, solver="greedy")
    with pytest.raises(ValueError, match=re.escape("must lie in [min(bit_choices)")):
        allocate.allocate(phi, c, e, avg_bits=3.0, min_avg_bits=3.5)


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(
    seed=st.integers(0, 2**31 - 1),
    choices=st.sampled_from([(2, 3), (2, 4), (3, 4), (2, 3, 4), (2, 3, 4, 8)]),
    data=st.data(),
)
def test_code_bit_budget_is_exact_and_binding(seed, choices, data):
    # a code-bit budget: sum n_l b_l <= B sum n_l, the all-in overhead never in it
    rng = np.random.default_rng(seed)
    n = data.draw(st.integers(2, 5))
    budget = data.draw(st.floats(choices[0], choices[-1]))
    e = np.tile(np.linspace(1.0, 0.0, len(choices)), (n, 1))
    sizes = rng.integers(1, 4, n).astype(float)
    got = allocate.allocate(
        rng.uniform(0.1, 1.0, n),
        np.zeros((n, n)),
        e,
        avg_bits=budget,
        bit_choices=choices,
        sizes=sizes,
    )
    assert got.avg_bits == pytest.approx(sizes @ got.bits / sizes.sum())
    assert got.avg_bits <= budget + 1e-9
    # every block gains from more bits: no single block can still be widened
    for i in range(n):
        if got.bits[i] != choices[-1]:
            wider = got.bits.copy()
            wider[i] = choices[choices.index(got.bits[i]) + 1]
            assert sizes @ wider / sizes.sum() > budget - 1e-9


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
    sse = np.array([[4.0, 1.0, 0.25, 0.0, 0.0], [5.0, 3.0, 1.0, 0.5, 0.0]])
    e = allocate.relative_errors(sse, (2, 3, 4, 8, 16), (2, 3, 4, 8))
    np.testing.assert_allclose(e, [[1.0, 0.25, 0.0625, 0.0], [1.0, 5 / 9, 1 / 9, 0]])
    # two widths: the indicator of the low one
    np.testing.assert_allclose(
        allocate.relative_errors(sse, (2, 3, 4, 8, 16), (3, 4)), [[1, 0], [1, 0]]
    )


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(2, 6),
    choices=st.sampled_from([(2, 3), (2, 4), (2, 3, 4), (3, 4, 8)]),
)
def test_milp_with_interactions_equals_brute_force(seed, n, choices):
    rng = np.random.default_rng(seed)
    phi, c, _ = _problem(rng, n)
    c = c * rng.uniform(0.5, 3.0)  # strong pair terms of both signs
    e = np.sort(rng.uniform(size=(n, len(choices))), axis=1)[:, ::-1]
    sizes = rng.integers(1, 5, n).astype(float)
    budget = float(rng.uniform(choices[0], choices[-1]))
    got = allocate.allocate(
        phi, c, e, avg_bits=budget, bit_choices=choices, sizes=sizes
    )
    want = brute_force(phi, c, e, avg_bits=budget, bit_choices=choices, sizes=sizes)
    assert got.optimal
    assert got.objective == pytest.approx(want.objective, abs=1e-7)
    assert got.avg_bits <= budget + 1e-9
    # with a floor on the bits spent
    least = float(choices[0] + (budget - choices[0]) * rng.uniform(0, 1))
    kw = dict(avg_bits=budget, bit_choices=choices, sizes=sizes, min_avg_bits=least)
    try:
        want = brute_force(phi, c, e, **kw)
    except RuntimeError:  # no allocation spends within [least, budget]
        with pytest.raises(RuntimeError):
            allocate.allocate(phi, c, e, **kw)
        return
    got = allocate.allocate(phi, c, e, **kw)
    assert got.objective == pytest.approx(want.objective, abs=1e-7)
    assert least - 1e-9 <= got.avg_bits <= budget + 1e-9


def test_tiny_terms_are_still_optimised():
    # HiGHS's default 1e-4 gap would leave the budget of near-free blocks unspent
    phi = 1e-3 * np.array([1.0, 3e-5, 2e-5, 1e-5, 4e-5, 5e-5])
    e = np.tile([1.0, 0.0], (6, 1))
    got = allocate.allocate(phi, np.zeros((6, 6)), e, avg_bits=2.5, bit_choices=(2, 3))
    assert got.bits.tolist() == [3, 2, 2, 2, 3, 3]
