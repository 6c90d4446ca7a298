"""offload(tx): the state lives in host memory, the steps are tx's bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_lowbit as lowbit

HOST = "pinned_host"


def _params(rng):
    return {
        "w": jnp.asarray(rng.standard_normal((64, 256)), jnp.float32),
        "b": jnp.asarray(rng.standard_normal(256), jnp.float32),
    }


def _kinds(state):
    return [x.sharding.memory_kind for x in jax.tree.leaves(state)]


@pytest.mark.parametrize(
    "make",
    [
        lambda: lowbit.adamw_polar(1e-2, impl="jnp"),
        lambda: lowbit.adamw_4bit(1e-2, impl="jnp"),
        lambda: optax.adamw(1e-2),
    ],
    ids=["polar", "4bit", "optax.adamw"],
)
def test_offloaded_steps_equal_the_device_ones(make):
    rng = np.random.default_rng(0)
    params = _params(rng)
    tx, off = make(), lowbit.offload(make())
    s, so = tx.init(params), off.init(params)
    assert HOST in _kinds(so)
    update, update_off = jax.jit(tx.update), jax.jit(off.update)
    for _ in range(4):
        g = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape)), params)
        u, s = update(g, s, params)
        uo, so = update_off(g, so, params)
        for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(uo), strict=True):
            np.testing.assert_array_equal(a, b)
    assert jax.tree.structure(s) == jax.tree.structure(so)
    for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(so), strict=True):
        np.testing.assert_array_equal(a, b)
    for x in jax.tree.leaves(so):  # moments on the host, counters on the device
        assert x.sharding.memory_kind == (HOST if x.ndim else "device")


def test_where_selects_the_offloaded_leaves():
    params = _params(np.random.default_rng(1))
    only_mu = lambda path, leaf: "mu" in jax.tree_util.keystr(path)  # noqa: E731
    tx = lowbit.offload(lowbit.adamw_polar(1e-2), where=only_mu)
    state = tx.init(params)
    adam = state[0]
    assert {x.sharding.memory_kind for x in jax.tree.leaves(adam.mu)} == {HOST}
    assert {x.sharding.memory_kind for x in jax.tree.leaves(adam.nu)} == {"device"}


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match=r"tx must be an optax\.GradientTransformation"):
        lowbit.offload(lambda p: p)
    with pytest.raises(TypeError, match="where must be callable"):
        lowbit.offload(optax.adam(1e-3), where="mu")
