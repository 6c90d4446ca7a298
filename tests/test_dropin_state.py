"""A state ``init`` did not make is refused at the first update (issue 19, item 5).

The state of another optimizer (``optax.adamw(...).init(p)`` given to
``adamw_polar(...).update``) and a checkpoint restored without its structure
(Orbax's plain dicts) raise a TypeError naming the expected state and how to
restore (``jax.eval_shape(tx.init, params)`` as the target); restored with
that target, a state continues bit for bit.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import optax_lowbit as lowbit

CASES = {
    "adamw_polar": (lambda: lowbit.adamw_polar(1e-3), lambda: optax.adamw(1e-3)),
    "adam_polar": (lambda: lowbit.adam_polar(1e-3), lambda: optax.adam(1e-3)),
    "adamw_piquant": (lambda: lowbit.adamw_piquant(1e-3), lambda: optax.adamw(1e-3)),
    "adamw_8bit": (lambda: lowbit.adamw_8bit(1e-3), lambda: optax.adamw(1e-3)),
    "adamw_4bit": (lambda: lowbit.adamw_4bit(1e-3), lambda: optax.adamw(1e-3)),
    "lion_polar": (lambda: lowbit.lion_polar(1e-3), lambda: optax.lion(1e-3)),
    "sgd_polar": (
        lambda: lowbit.sgd_polar(1e-2, momentum=0.9),
        lambda: optax.sgd(1e-2, momentum=0.9),
    ),
    "adafactor_polar": (
        lambda: lowbit.adafactor_polar(1e-2, momentum=0.9),
        lambda: optax.adafactor(1e-2, momentum=0.9),
    ),
}


def _params():
    rng = np.random.default_rng()
    return {
        "w": jnp.asarray(rng.standard_normal((64, 128)), jnp.float32),
        "b": jnp.asarray(rng.standard_normal(128), jnp.float32),
    }


@pytest.mark.parametrize("name", list(CASES))
def test_the_state_of_the_optax_optimizer_is_refused(name):
    make, make_optax = CASES[name]
    tx, params = make(), _params()
    wrong = make_optax().init(params)
    with pytest.raises(TypeError, match=r"expects the \w+State that its init") as e:
        tx.update(params, wrong, params)
    msg = str(e.value)
    assert "another optimizer" in msg, msg
    assert "jax.eval_shape(tx.init, params)" in msg, msg
    if "adam" in name:
        assert "lowbit.convert(opt_state, tx, params)" in msg, msg


@pytest.mark.parametrize("name", list(CASES))
def test_a_checkpoint_restored_without_its_structure_is_refused(name, tmp_path):
    make, _ = CASES[name]
    tx, params = make(), _params()
    state = tx.init(params)
    _, state = tx.update(params, state, params)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", state)
    checkpointer.wait_until_finished()
    plain = checkpointer.restore(tmp_path / "ckpt")
    with pytest.raises(TypeError, match="restored without its structure") as e:
        jax.jit(tx.update)(params, plain, params)
    assert "jax.eval_shape(tx.init, params)" in str(e.value)
    # restored into tx.init's structure, the run continues bit for bit
    restored = checkpointer.restore(tmp_path / "ckpt", jax.eval_shape(tx.init, params))
    u1, s1 = tx.update(params, state, params)
    u2, s2 = tx.update(params, restored, params)
    for a, b in zip(jax.tree.leaves((u1, s1)), jax.tree.leaves((u2, s2)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_state_of_another_low_bit_optimizer_is_refused():
    params = _params()
    codec = lowbit.codecs.polar(2)
    lion = lowbit.scale_by_lion_quantized(mu_codec=codec).init(params)
    with pytest.raises(TypeError, match="expects the TraceQuantizedState"):
        lowbit.trace_quantized(0.9, codec=codec).update(params, lion)
