"""Muon's momentum step in the fused kernel (interpret mode) against jnp.

The Adam kernel's loop with `rules.MomentumRule`: per codec with a kernel,
several steps on fresh random inputs, same-shape leaves grouped in one
launch beside a leaf of another shape, rows whose last group is partial and
a non-finite gradient element; the kernel's ``m_hat``, codes and scales must
equal the jnp path's (`rule_update` with ``impl="jnp"``, the step the
transform's jnp path takes) bit for bit.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_lowbit as lowbit
from optax_lowbit.codecs import polar
from optax_lowbit.kernels import adam as kadam
from optax_lowbit.kernels import rules

# the kernel and its reference held to the same bits (tests/conftest.py)
pytestmark = pytest.mark.optimized

#: Every momentum (signed) codec with a kernel.
CODECS = {
    "polar2": polar(bits=2, signed=True, rounding="stochastic"),
    "polar1.5": polar(bits=1.5, signed=True, rounding="stochastic"),
    "blockwise8": lowbit.codecs.blockwise8(True),
    "blockwise4": lowbit.codecs.blockwise4(True),
    "piquant": lowbit.codecs.piquant(),
}
BETA = 0.95


def _config(codec, nesterov):
    rule = rules.MomentumRule(nesterov)
    return kadam.launch_config(rule, (codec,), block_groups=8)


@functools.partial(jax.jit, static_argnames=("codec", "nesterov"))
def _kernel_step(gs, mus, count, codec, nesterov):
    """One step of every leaf, the leaves of one shape in one launch."""
    hp = rules.momentum_hp(BETA, 1 - BETA**count, 1 - BETA ** (count + 1))
    seeds = [(lowbit.codecs.base.stream_seed(count, k, 0),) for k in range(len(gs))]
    config = _config(codec, nesterov)
    moments = [(m,) for m in mus]
    out = kadam.rule_update_many(config, gs, moments, [hp] * len(gs), seeds)
    return [(m_hat, m) for m_hat, (m,) in out]


@functools.partial(jax.jit, static_argnames=("codec", "nesterov"))
def _reference_step(gs, mus, count, codec, nesterov):
    """The same step in jnp, leaf by leaf."""
    hp = rules.momentum_hp(BETA, 1 - BETA**count, 1 - BETA ** (count + 1))
    config = _config(codec, nesterov)
    out = []
    for k, (g, m) in enumerate(zip(gs, mus, strict=True)):
        seed = lowbit.codecs.base.stream_seed(count, k, 0)
        m_hat, (m,) = kadam.rule_update(config, g, (m,), hp, (seed,), impl="jnp")
        out.append((m_hat, m))
    return out


def _shapes(codec):
    """Two leaves of one shape (grouped) and one of another.

    (5, 200): groups of 64 (the last of 8 per row), 20 groups, blocks of 8
    leave the last one partial; π-Quant (3, 500): superblocks of 96.
    """
    if codec.group_size == 96:
        return [(3, 500), (3, 500), (2, 96)]
    return [(5, 200), (5, 200), (3, 64)]


def _assert_equal(got, want):
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# π-Quant's case takes ~11 s in the interpreter on 2 cores: CI's slow step runs it.
@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n == "piquant" else n for n in CODECS],
)
def test_momentum_kernel_equals_jnp_bit_for_bit(name):
    codec = CODECS[name]
    nesterov = name != "blockwise8"  # one codec checks the plain momentum
    shapes = _shapes(codec)
    key = jax.random.key(len(name))
    mus = [
        codec.encode(0.1 * jax.random.normal(jax.random.fold_in(key, k), s))
        for k, s in enumerate(shapes)
    ]
    for step in range(3):
        keys = jax.random.split(jax.random.fold_in(key, 100 + step), len(shapes))
        gs = [jax.random.normal(k, s) for k, s in zip(keys, shapes, strict=True)]
        gs[0] = gs[0].at[1, 3].set(jnp.nan if step else jnp.inf)  # fault rule
        count = jnp.asarray(step + 1, jnp.int32)
        got = _kernel_step(gs, mus, count, codec, nesterov)
        want = _reference_step(gs, mus, count, codec, nesterov)
        _assert_equal(got, want)
        assert not np.isfinite(np.asarray(got[0][0])[1, 3])
        mus = [m for _, m in got]
    assert np.isfinite(np.asarray(mus[0].decode())).all()


def test_a_span_one_fma_from_a_bf16_step_gives_one_scale():
    """The group's largest ``α + β`` is 1.8671875 (a bf16 value) unfused and
    1 ulp above it fused: before `base.unfused`, the interpreter's kernel
    stored the scale 1.875 and the jnp path 1.8671875. CI met this failure
    on a random key; a scan of keys reproduced it, and this is that pair."""
    codec = CODECS["polar2"]
    g = 0.1 * jax.random.normal(jax.random.key(8), (8, 1000))
    g = g.at[0, 6].set(-29.766659).at[0, 38].set(-18.292717)  # one pair of group 0
    count = jnp.asarray(1, jnp.int32)
    mus = [codec.zeros(g.shape)]
    got = _kernel_step([g], mus, count, codec, True)
    want = _reference_step([g], mus, count, codec, True)
    _assert_equal(got, want)
    assert float(got[0][1].scales[0, 0]) == 1.8671875


def test_momentum_rule_has_no_fused_apply_and_needs_a_kernel_codec():
    g = jnp.ones((4, 64))
    codec = CODECS["polar2"]
    hp = rules.momentum_hp(BETA, 0.05)
    config = _config(codec, True)
    with pytest.raises(ValueError, match="MomentumRule has no fused apply"):
        kadam.rule_update(config, g, (codec.zeros(g.shape),), hp, params=g)
    identity = lowbit.codecs.identity()
    config = _config(identity, True)
    with pytest.raises(ValueError, match=r"mu_codec=.*has no fused kernel"):
        kadam.rule_update(config, g, (identity.zeros(g.shape),), hp)
    with pytest.raises(ValueError, match="keeps 1 moments, got 2 codecs"):
        config = kadam.launch_config(rules.MomentumRule(), (codec, codec))
        kadam.rule_update(config, g, (codec.zeros(g.shape),) * 2, hp)
