"""The Adam state's format is versioned: an older format is refused, not misread."""

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_lowbit as lowbit
from optax_lowbit.codecs import polar
from optax_lowbit.transforms import adam as tadam

PARAMS = {"w": jax.random.normal(jax.random.key(0), (64, 256))}


@pytest.mark.parametrize(
    "make", [lowbit.adamw_polar, lowbit.adamw_4bit, lowbit.adamw_8bit]
)
def test_init_writes_the_current_format_and_update_keeps_it(make):
    tx = make(1e-3)
    state = tx.init(PARAMS)
    assert int(state[0].format) == tadam.STATE_FORMAT == 2
    _, state = jax.jit(tx.update)(PARAMS, state, PARAMS)
    assert int(state[0].format) == 2
    # a pickled state continues bit for bit
    again = pickle.loads(pickle.dumps(state))
    a = jax.jit(tx.update)(PARAMS, state, PARAMS)
    b = jax.jit(tx.update)(PARAMS, again, PARAMS)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def _format1_state(tx):
    """A state as the release before format 2 wrote it: polar v, no format."""
    old = lowbit.scale_by_adam_polar(
        nu_codec=polar(2, signed=False, rounding="stochastic")
    ).init(PARAMS)
    v = jax.random.uniform(jax.random.key(1), (64, 256))
    old = old._replace(nu={"w": old.nu["w"].codec.encode(v)}, format=None)
    return (old, *tx.init(PARAMS)[1:]), v


def test_an_older_format_is_refused_with_the_versions_named():
    tx = lowbit.adamw_polar(1e-3)
    state, _ = _format1_state(tx)
    with pytest.raises(ValueError, match=r"format 1.*format 2"):
        tx.update(PARAMS, state, PARAMS)
    with pytest.raises(ValueError, match="format 1"):
        jax.jit(tx.update)(PARAMS, state, PARAMS)
    fused = lowbit.fused_adamw_polar(1e-3)
    with pytest.raises(ValueError, match="format 1"):
        fused.step(PARAMS, state, PARAMS)


def test_convert_moves_an_older_format_to_the_current_one():
    tx = lowbit.adamw_polar(1e-3)
    state, _ = _format1_state(tx)
    new = lowbit.convert(state, tx, PARAMS)
    assert int(new[0].format) == 2
    assert new[0].nu["w"].codec == tadam.polar_codecs(2, "stochastic")[1]
    decoded_old = state[0].nu["w"].decode()
    decoded_new = new[0].nu["w"].decode()
    # the same v, re-encoded on the 4-bit log map (levels 1.4x apart)
    ratio = decoded_new / jnp.maximum(decoded_old, 1e-30)
    assert float(jnp.median(ratio)) == pytest.approx(1.0, abs=0.15)
    jax.jit(tx.update)(PARAMS, new, PARAMS)
