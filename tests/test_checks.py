"""Numeric hyperparameters refused at construction unless they are numbers.

Mirrors `optax_lowbit._checks`: `numeric` and `scalar_or_schedule` on their
own, then every public alias's numeric arguments, where a string, ``None``, a
bool, a list or an array of several values used to pass construction and fail
inside the first traced step.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import optax_lowbit as lowbit
from optax_lowbit import _checks

#: Values no numeric hyperparameter takes.
NOT_NUMBERS = st.one_of(
    st.text(max_size=6),
    st.sampled_from(
        [None, True, False, np.bool_(True), [0.5], (0.5,), {"b1": 0.5}, 0.5j]
    ),
    st.integers(2, 5).map(lambda n: jnp.full((n,), 0.5)),
    st.integers(1, 3).map(lambda n: np.zeros((n, 2))),
    st.just(jnp.array(True)),
)

#: Each alias's numeric arguments (those that take a number or an array),
#: with the arguments the alias needs besides.
ALIAS_ARGS = {
    "adamw_polar": ("b1", "b2", "eps", "eps_root", "weight_decay", "learning_rate"),
    "adam_4bit": ("b1", "b2", "eps", "eps_root", "learning_rate"),
    "adamw_8bit": ("b1", "b2", "eps", "weight_decay"),
    "adamw_piquant": ("b2", "eps_root", "weight_decay"),
    "lion_polar": ("b1", "b2", "weight_decay", "learning_rate"),
    "sgd_polar": ("momentum", "learning_rate"),
    "adafactor_polar": ("decay_rate", "eps", "weight_decay_rate"),
    "muon_polar": (
        "beta",
        "eps",
        "weight_decay",
        "adam_b1",
        "adam_b2",
        "adam_eps_root",
        "adam_weight_decay",
        "adam_learning_rate",
        "learning_rate",
    ),
}
CASES = [(alias, arg) for alias, args in ALIAS_ARGS.items() for arg in args]


def _build(alias, **kwargs):
    if alias != "adafactor_polar":
        kwargs.setdefault("learning_rate", 1e-3)
    return getattr(lowbit, alias)(**kwargs)


# `numeric` and `scalar_or_schedule` ------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        (0.5, 0.5),
        (3, 3),
        (np.float32(0.25), 0.25),
        (np.int64(2), 2),
        (jnp.float32(0.75), 0.75),
        (jnp.asarray(0.5, jnp.bfloat16), 0.5),
        (np.array(0.125), 0.125),
        (jnp.int32(1), 1.0),
    ],
)
def test_numbers_and_scalar_arrays_give_their_value(value, expected):
    assert _checks.numeric("b1", value) == expected


def test_a_tracer_passes_unread():
    seen = []

    @jax.jit
    def f(x):
        seen.append(_checks.numeric("b1", x))
        return x

    f(jnp.float32(0.9))
    assert seen == [None]


@given(value=NOT_NUMBERS)
def test_not_a_number_is_named(value):
    with pytest.raises(TypeError, match=r"^b2 must be a number") as e:
        _checks.numeric("b2", value)
    assert repr(value) in str(e.value)


@given(value=NOT_NUMBERS.filter(lambda v: v is not None))
def test_scalar_or_schedule_refuses_what_is_neither(value):
    with pytest.raises(TypeError, match=r"^learning_rate must be a number") as e:
        _checks.scalar_or_schedule("learning_rate", value, none="no scaling")
    assert repr(value) in str(e.value)


def test_scalar_or_schedule_none_only_where_it_means_something():
    _checks.scalar_or_schedule("learning_rate", None, none="no scaling")
    with pytest.raises(TypeError, match="got None"):
        _checks.scalar_or_schedule("weight_decay", None)
    _checks.scalar_or_schedule("weight_decay", optax.constant_schedule(0.1))
    _checks.scalar_or_schedule("weight_decay", jnp.float32(0.1))


# the aliases -----------------------------------------------------------------


@pytest.mark.parametrize("alias, arg", CASES, ids=[f"{a}-{b}" for a, b in CASES])
@given(value=NOT_NUMBERS.filter(lambda v: v is not None))
def test_alias_refuses_a_non_number_at_construction(alias, arg, value):
    with pytest.raises(TypeError, match=rf"^{re.escape(arg)} must be a number") as e:
        _build(alias, **{arg: value})
    assert repr(value) in str(e.value)


@pytest.mark.parametrize("alias", ["adamw_polar", "lion_polar", "muon_polar"])
def test_weight_decay_none_refused(alias):
    with pytest.raises(TypeError, match=r"^weight_decay must be a number.*got None"):
        _build(alias, weight_decay=None)


def test_learning_rate_none_is_optax_no_scaling():
    params = {"w": jnp.linspace(-1.0, 1.0, 256).reshape(2, 128)}
    grads = jax.tree.map(lambda p: p * 0.5 + 0.1, params)
    unscaled = lowbit.adamw_polar(None, weight_decay=0.0)
    scaled = lowbit.adamw_polar(1.0, weight_decay=0.0)
    u, _ = unscaled.update(grads, unscaled.init(params), params)
    s, _ = scaled.update(grads, scaled.init(params), params)
    np.testing.assert_array_equal(u["w"], -s["w"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"b1": jnp.float32(1.5)}, r"^b1 must be in \[0, 1\)"),
        ({"eps": np.float32(-1.0)}, r"^eps must be >= 0"),
        ({"b2": np.array(1.0)}, r"^b2 must be in \[0, 1\)"),
    ],
)
def test_a_scalar_array_is_range_checked_as_its_number(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _build("adamw_4bit", **kwargs)


@pytest.mark.parametrize(
    "arg, value", [("adam_b1", 1.5), ("adam_b2", -0.1), ("adam_eps_root", -1.0)]
)
def test_muon_names_its_adam_arguments(arg, value):
    with pytest.raises(ValueError, match=rf"^{arg} must be"):
        _build("muon_polar", **{arg: value})


def test_scalar_arrays_train_as_numbers():
    params = {"w": jnp.linspace(-1.0, 1.0, 512).reshape(4, 128)}
    grads = jax.tree.map(lambda p: jnp.sin(3.0 * p), params)
    plain = lowbit.adamw_4bit(1e-2, b1=0.8, b2=0.95, eps=1e-6)
    arrays = lowbit.adamw_4bit(
        jnp.float32(1e-2), b1=np.float32(0.8), b2=jnp.float32(0.95), eps=1e-6
    )
    u, _ = plain.update(grads, plain.init(params), params)
    v, _ = arrays.update(grads, arrays.init(params), params)
    np.testing.assert_allclose(u["w"], v["w"], rtol=1e-6, atol=0)


# the arguments a wrapped link used to take unnamed or unchecked -----------------


@given(steps=st.integers(-5, 0))
def test_muon_ns_steps_below_one_refused(steps):
    # before: taken, and Newton-Schulz ran no iteration (no orthogonalisation)
    with pytest.raises(
        ValueError, match=rf"^ns_steps must be a positive int, got {steps}"
    ):
        _build("muon_polar", ns_steps=steps)


@given(value=st.one_of(NOT_NUMBERS, st.floats(0.5, 8.0), st.just(jnp.float32(3.0))))
def test_muon_ns_steps_not_an_int_refused(value):
    with pytest.raises(TypeError, match=r"^ns_steps must be a positive int"):
        _build("muon_polar", ns_steps=value)


@pytest.mark.parametrize("steps", [1, 3, np.int64(4), jnp.int32(2)])
def test_muon_ns_steps_ints_and_integer_arrays_taken(steps):
    params = {"w": jnp.linspace(-1.0, 1.0, 32 * 64).reshape(32, 64)}
    tx = _build("muon_polar", ns_steps=steps)
    u, _ = jax.jit(tx.update)(params, tx.init(params), params)
    assert bool(jnp.all(jnp.isfinite(u["w"])))


def test_muon_ns_steps_under_inject_hyperparams():
    params = {"w": jnp.linspace(-1.0, 1.0, 32 * 64).reshape(32, 64)}
    tx = optax.inject_hyperparams(lowbit.muon_polar)(learning_rate=1e-3, ns_steps=3)
    state = tx.init(params)
    _, state = jax.jit(tx.update)(params, state, params)
    assert int(state.hyperparams["ns_steps"]) == 3


@given(value=st.one_of(st.floats(-10.0, 0.0), st.integers(-3, 0)))
def test_adafactor_clipping_threshold_not_positive_refused(value):
    with pytest.raises(ValueError, match=r"^clipping_threshold must be > 0"):
        _build("adafactor_polar", learning_rate=1e-2, clipping_threshold=value)


@given(value=NOT_NUMBERS.filter(lambda v: v is not None))
def test_adafactor_clipping_threshold_not_a_number_refused(value):
    with pytest.raises(TypeError, match=r"^clipping_threshold must be a number"):
        _build("adafactor_polar", learning_rate=1e-2, clipping_threshold=value)


@given(value=st.one_of(st.text(max_size=4), st.sampled_from([0, 1, None, 1.0])))
def test_adafactor_multiply_by_parameter_scale_must_be_a_bool(value):
    # before: "no" was taken as True (Optax takes it too)
    with pytest.raises(TypeError, match=r"^multiply_by_parameter_scale must be a bool"):
        _build("adafactor_polar", learning_rate=1e-2, multiply_by_parameter_scale=value)


@pytest.mark.parametrize("momentum", [1.5, -0.1])
def test_adafactor_momentum_named_as_written(momentum):
    # before: named ``decay`` (the ema link's argument)
    with pytest.raises(ValueError, match=r"^momentum must be in \[0, 1\]"):
        _build("adafactor_polar", learning_rate=1e-2, momentum=momentum)


@pytest.mark.parametrize("momentum", [None, 0.9])
@pytest.mark.parametrize("dtype", [jnp.int8, jnp.float16, "bf16", "x"])
def test_adafactor_dtype_momentum_named_as_written(momentum, dtype):
    # before: unchecked without momentum; named accumulator_dtype with it
    with pytest.raises(ValueError, match=r"^dtype_momentum must be one of .*float32"):
        _build(
            "adafactor_polar",
            learning_rate=1e-2,
            momentum=momentum,
            dtype_momentum=dtype,
        )


def test_a_transformation_argument_is_checked():
    params = {"w": jnp.ones((8, 64))}
    state = optax.adamw(1e-3).init(params)
    with pytest.raises(TypeError, match=r"^tx must be an optax.GradientTransformation"):
        lowbit.convert(state, "adamw", params)
    fused = lowbit.adamw_polar(1e-3, fused=True)  # init alone is enough to convert
    converted = lowbit.convert(state, fused, params)
    assert jax.tree.structure(converted) == jax.tree.structure(fused.init(params))
    with pytest.raises(TypeError, match=r"FusedOptimizer's transformation is its .tx"):
        lowbit.offload(fused)
