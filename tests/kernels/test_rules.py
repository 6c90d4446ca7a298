"""The kernels' stream seeds (optax_lowbit/kernels/rules.py): one leaf, many."""

import functools
from unittest import mock

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import optax_lowbit as lowbit
from optax_lowbit.codecs import base
from optax_lowbit.kernels import rules

# the kernel and its reference held to the same bits (tests/conftest.py)
pytestmark = pytest.mark.optimized


@given(
    seeds=st.lists(
        st.one_of(st.none(), st.integers(-(2**31), 2**32 - 1)), min_size=2, max_size=2
    )
)
def test_stream_seeds_of_one_leaf_are_the_codecs_streams(seeds):
    """Each moment's stream as `Codec.encode` mixes its seed, zero-padded."""
    got = rules.stream_seeds(tuple(seeds), 2)
    want = [int(base.stream_seed(0 if s is None else s)) for s in seeds]
    assert got.shape == (rules.SEED_LEN,) and got.dtype == jnp.uint32
    np.testing.assert_array_equal(np.asarray(got), want + [0] * (rules.SEED_LEN - 2))


@functools.cache
def _many_and_each(leaves: int, moments: int):
    """Jitted: the streams of ``leaves`` x ``moments`` as one array and row by row."""

    @jax.jit
    def both(c):
        traced = base.stream_seed(c, np.arange(leaves)[:, None], np.arange(moments))
        return rules.stream_seeds(traced, moments), [
            rules.stream_seeds(tuple(traced[k]), moments) for k in range(leaves)
        ]

    return both


@given(
    count=st.integers(0, 2**31 - 1),
    leaves=st.integers(1, 9),
    moments=st.integers(1, 2),
)
def test_stream_seeds_of_many_leaves_are_each_leafs(count, leaves, moments):
    """An array of seeds: row ``k`` is leaf ``k``'s `stream_seeds`, traced too."""
    rows = base.stream_seed(count, np.arange(leaves)[:, None], np.arange(moments))
    many, each = _many_and_each(leaves, moments)(jnp.int32(count))
    assert many.shape == (leaves, rules.SEED_LEN)
    np.testing.assert_array_equal(many, np.stack(each))
    np.testing.assert_array_equal(rules.stream_seeds(rows, moments), many)


def test_seed_rows_forms_and_errors():
    """Per-leaf tuples (``None`` entries are stream 0) as one array; static
    seeds stay NumPy; wrong counts are named."""
    got = rules.seed_rows([(1, None), None, (2**32 - 1, -1)], 3, 2)
    assert isinstance(got, np.ndarray) and got.dtype == np.uint32
    np.testing.assert_array_equal(got, [[1, 0], [0, 0], [2**32 - 1, 2**32 - 1]])
    traced = jax.jit(lambda c: rules.seed_rows([(c, 3)], 1, 2))(jnp.int32(5))
    np.testing.assert_array_equal(traced, [[5, 3]])
    with pytest.raises(ValueError, match=r"one entry per leaf \(2\), got 1"):
        rules.seed_rows([(1, 2)], 2, 2)
    with pytest.raises(ValueError, match=r"one per moment \(2\)"):
        rules.seed_rows([(1,)], 1, 2)
    with pytest.raises(ValueError, match=r"shape \(1, 2\), got \(2, 2\)"):
        rules.seed_rows(np.zeros((2, 2), np.uint32), 1, 2)
    with pytest.raises(ValueError, match=r"one column per moment \(2\)"):
        rules.stream_seeds(np.zeros((3, 1), np.uint32), 2)


def _hash_ops(n_leaves: int, impl: str) -> int:
    """Top-level xor operations of a fused polar2 step over ``n_leaves``."""
    params = {f"w{k}": jnp.ones((4, 64)) for k in range(n_leaves)}
    opt = lowbit.fused_adamw_polar(1e-3, impl=impl, policy=lambda p, x: True)
    state = opt.init(params)
    jaxpr = jax.make_jaxpr(opt.step)(params, state, params).jaxpr

    def count(j):
        n = 0
        for e in j.eqns:
            if e.primitive.name in ("pallas_call",):
                continue  # the kernel's own hashing is per element, inside
            n += e.primitive.name == "xor"
            for v in e.params.values():
                if isinstance(v, jex.core.ClosedJaxpr):
                    n += count(v.jaxpr)
                elif isinstance(v, jex.core.Jaxpr):
                    n += count(v)
        return n

    return count(jaxpr)


def test_a_steps_stream_hashing_does_not_grow_with_its_leaves():
    """The fused step forms every leaf's streams in vector operations: the
    same number of hashing operations for 3 leaves as for 9 (it was ~33 per
    leaf: NOTES_kernels.md, v25)."""
    assert _hash_ops(3, "pallas") == _hash_ops(9, "pallas")


@given(
    seed=st.integers(0, 2**32 - 1),
    b2=st.sampled_from([0.0, 0.5, 0.9, 0.999, 0.99999, float(np.nextafter(1, 0))]),
    log_g=st.floats(-45.0, 20.0),
)
def test_second_moment_is_never_negative_so_one_sided_saturation_is_exact(
    seed, b2, log_g
):
    """`moment_step`'s ``v`` from any ``v >= 0`` and finite ``g`` is ``>= 0``.

    So `base.saturate_or_keep(..., nonnegative=True)` (the upper bound alone,
    what the step and the kernels store) equals the two-sided saturation:
    the step is run as shipped and with the fault rule forced two-sided.
    Fresh ``v`` and ``g`` over many binades, and the edges: ``v`` and ``g``
    0, ``g²`` overflowing, ``g² - v`` tiny against ``v``.
    """
    rng = np.random.default_rng(seed)
    n = 4096
    scale = 10.0 ** rng.uniform(-30, 30, n)
    v = np.abs(rng.standard_normal(n) * scale).astype(np.float32)
    g = (rng.standard_normal(n) * 10.0**log_g).astype(np.float32)
    v[:8] = [0, 0, 1, 1e-30, 3e38, 1.0, 2.5e-8, 0]
    g[:8] = [0, 1, 1, 0, 0, 1e20, np.sqrt(np.float32(2.5e-8)), 1e-45]
    g[8:16] = np.sqrt(v[8:16]) * np.float32(1 + 1e-7)  # g² - v near 0
    hp = rules.make_hp(0.9, b2, 1e-8, 0.0, 0.1, 0.01, 0.1, 1e-3, 0.01)
    g, v = jnp.asarray(g), jnp.asarray(v)

    def stored_v():  # eager: no compile per example
        return np.asarray(rules.moment_step(g, 0 * g, v, hp, nesterov=False)[2])

    one_sided = stored_v()
    keep = base.saturate_or_keep

    def two_sided_rule(new, old, ok, nonnegative=False):
        return keep(new, old, ok)  # `nonnegative` ignored

    with mock.patch.object(base, "saturate_or_keep", two_sided_rule):
        two_sided = stored_v()
    assert np.all(one_sided >= 0)
    np.testing.assert_array_equal(one_sided, two_sided)
