"""Kernel (Pallas interpreter) against the jnp path over 300 re-encodes.

One step is checked bit for bit elsewhere; a codec is judged over many
re-encodes, so here whole optimizers run 300 steps under one jitted
``lax.scan`` (a tree with two leaves of one shape: the grouped launch) on
both paths, and their states and last updates must be equal bit for bit:
Adam's and Muon's steps are written so that the FMA contraction XLA applies
on the jnp side rounds them as the kernel does (`optax_lowbit.kernels.rules`,
its note on rounding alike). Slow: CI's second step runs it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_lowbit as lowbit
from optax_lowbit.transforms import _quantized

pytestmark = [pytest.mark.slow, pytest.mark.optimized]

STEPS = 300
PARAMS = {"a": jnp.zeros((6, 200)), "b": jnp.zeros((6, 200)), "c": jnp.zeros((4, 320))}


def _every(path, x):
    return True


def _run(tx):
    """``STEPS`` updates of fresh gradients (scales 1-11) under one scan."""

    def body(state, key):
        ks = dict(zip(PARAMS, jax.random.split(key, len(PARAMS)), strict=True))
        g = {
            k: jax.random.normal(ks[k], p.shape) * (1 + 10 * jax.random.uniform(ks[k]))
            for k, p in PARAMS.items()
        }
        u, state = tx.update(g, state, PARAMS)
        return state, u

    keys = jax.random.split(jax.random.key(0), STEPS)
    state, us = jax.jit(lambda: jax.lax.scan(body, tx.init(PARAMS), keys))()
    return state, jax.tree.map(lambda x: x[-1], us)


def _packed(state):
    return jax.tree.leaves(state, is_leaf=_quantized.is_packed)


ADAM = {
    "polar2": lambda impl: lowbit.adamw_polar(1e-3, policy=_every, impl=impl),
    "polar1.5": lambda impl: lowbit.adamw_polar(
        1e-3, bits=1.5, policy=_every, impl=impl
    ),
    "4bit": lambda impl: lowbit.adamw_4bit(1e-3, policy=_every, impl=impl),
    "8bit": lambda impl: lowbit.adamw_8bit(1e-3, policy=_every, impl=impl),
}


def _assert_paths_equal(make):
    """``make(impl)``'s runs on both paths: states and updates bit for bit."""
    (sj, uj), (sp, up) = _run(make("jnp")), _run(make("pallas"))
    for a, b in zip(jax.tree.leaves(sj), jax.tree.leaves(sp), strict=True):
        np.testing.assert_array_equal(a, b)
    for k in uj:
        np.testing.assert_array_equal(up[k], uj[k])


@pytest.mark.parametrize("name", list(ADAM))
def test_adam_kernel_equals_jnp_over_300_steps(name):
    assert any(_quantized.is_packed(x) for x in _packed(ADAM[name]("jnp").init(PARAMS)))
    _assert_paths_equal(ADAM[name])


@pytest.mark.parametrize(
    "codec",
    [lowbit.codecs.polar(2), lowbit.codecs.blockwise4(True)],
    ids=["polar2", "4bit"],
)
def test_muon_momentum_kernel_equals_jnp_over_300_steps(codec):
    _assert_paths_equal(
        lambda impl: lowbit.scale_by_muon_quantized(codec, policy=_every, impl=impl)
    )
