"""Tests of scale_by_factored_rms_quantized, ema_quantized and adafactor_polar."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_lowbit as lowbit
from optax_lowbit.codecs import base
from tests.transforms import _testing_codecs

FP32 = lowbit.codecs.identity()
ALL = lowbit.policy.from_predicate(lambda path, leaf: True)


def _params(seed=0):
    k = jax.random.split(jax.random.key(seed), 5)
    return {
        "big": jax.random.normal(k[0], (160, 136)),  # factored (both >= 128)
        "dense": jax.random.normal(k[1], (64, 96)),  # not factored at 128
        "conv": jax.random.normal(k[2], (3, 8, 40)),  # not factored
        "bias": jax.random.normal(k[3], (96,)),
        "scale": jax.random.normal(k[4], ()),
    }


def _grads(params, step):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1000 + step), len(leaves))
    out = [
        jax.random.normal(k, x.shape) * (1.0 + i) + 0.01
        for i, (k, x) in enumerate(zip(keys, leaves, strict=True))
    ]
    return jax.tree.unflatten(treedef, out)


def _run(tx, params, steps):
    state = tx.init(params)

    @jax.jit
    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, u

    us = []
    for i in range(steps):
        params, state, u = step(params, state, _grads(params, i))
        us.append(u)
    return params, state, us


@pytest.mark.parametrize(
    "kw",
    [
        {"learning_rate": 1e-2, "momentum": 0.9},
        {
            "learning_rate": optax.linear_schedule(1e-2, 1e-3, 100),
            "momentum": 0.8,
            "min_dim_size_to_factor": 32,
            "weight_decay_rate": 1e-3,
            "decay_offset": 3,
        },
        {"learning_rate": 1e-2, "momentum": None, "clipping_threshold": None},
        {
            "learning_rate": None,
            "momentum": 0.9,
            "multiply_by_parameter_scale": False,
            "factored": False,
        },
    ],
    ids=["momentum", "schedule-min32-wd", "no-momentum", "unfactored-no-lr"],
)
@pytest.mark.parametrize("policy", [ALL, None], ids=["all-packed", "default"])
# two programs held to 1e-6 after 100 steps: compiled as a user's program is
# (tests/conftest.py); XLA's unoptimized elemental emitters round the
# unfactored, unscaled steps' sums apart by ~2e-6
@pytest.mark.optimized
def test_identity_codecs_equal_optax_adafactor_100_steps(kw, policy):
    params = _params()
    ours = lowbit.adafactor_polar(mu_codec=FP32, nu_codec=FP32, policy=policy, **kw)
    ref = optax.adafactor(**kw)
    p1, s1, u1 = _run(ours, params, 100)
    p2, _, u2 = _run(ref, params, 100)
    chex.assert_trees_all_close(u1, u2, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(p1, p2, rtol=1e-6, atol=1e-6)
    v = s1[0].v
    min_dim = kw.get("min_dim_size_to_factor", 128)
    if kw.get("factored", True):
        assert s1[0].v_row["big"].shape == (136,)  # largest axis reduced
        assert s1[0].v_col["big"].shape == (160,)
        assert v["big"].shape == (1,)  # factored: no full second moment
    if policy is ALL:
        assert isinstance(v["conv"], base.Packed)
        assert isinstance(v["dense"], base.Packed) == (min_dim > 64)
    if kw["momentum"] is not None:
        (ema,) = [x.ema for x in s1 if isinstance(x, lowbit.EmaQuantizedState)]
        assert isinstance(ema["big"], base.Packed)
        assert isinstance(ema["bias"], base.Packed) == (policy is ALL)


def test_polar_adafactor_state_layout_and_bytes():
    params = {"w": jnp.zeros((256, 512)), "u": jnp.zeros((16, 1024))}
    tx = lowbit.adafactor_polar(1e-2, momentum=0.9, bits=2)
    state = jax.eval_shape(tx.init, params)
    assert state[0].v_row["w"].dtype == jnp.float32
    # (16, 1024) is not factored: its v is coded
    assert state[0].v["u"].codec_name == "polar-2b-unsigned-sr"
    assert state[0].v["w"].shape == (1,)
    assert state[-2].ema["w"].codec_name == "polar-2b-signed-sr"
    # momentum of w in 2-bit polar plus fp32 row/col stats: far below 4 B/param
    w_bytes = lowbit.state_bytes(state[-2].ema["w"]) + 4 * (256 + 512)
    assert w_bytes / (256 * 512) < 0.31  # 2.25 bits all-in + fp32 row/col: 0.305


def test_quantized_adafactor_trains():
    params = {"w": jax.random.normal(jax.random.key(0), (128, 64)) / 8}
    x = jax.random.normal(jax.random.key(1), (512, 128))
    y = x @ jax.random.normal(jax.random.key(2), (128, 64)) / 8

    def loss(p):
        return jnp.mean((x @ p["w"] - y) ** 2)

    # min_dim_size_to_factor=256: w is not factored, so both its momentum and
    # its full second moment are in 1.5-bit polar codes.
    tx = lowbit.adafactor_polar(0.1, momentum=0.9, min_dim_size_to_factor=256, bits=1.5)
    state = tx.init(params)
    assert isinstance(state[0].v["w"], base.Packed)

    @jax.jit
    def step(p, s):
        value, g = jax.value_and_grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, value

    first = None
    for _ in range(100):
        params, state, value = step(params, state)
        first = value if first is None else first
    # measured, loss ratio: stochastic rounding (default) 0.016; nearest
    # rounding 0.23 (its momentum stalls); fp32 optax.adafactor 1e-5
    assert float(loss(params)) < 0.1 * float(first)


def test_int8_codecs_stay_close_to_optax():
    params = _params()
    ours = lowbit.adafactor_polar(
        1e-2,
        momentum=0.9,
        mu_codec=_testing_codecs.Int8Absmax(),
        nu_codec=_testing_codecs.Int8Sqrt(),
        policy=ALL,
    )
    p1, _, _ = _run(ours, params, 20)
    p2, _, _ = _run(optax.adafactor(1e-2, momentum=0.9), params, 20)
    chex.assert_trees_all_close(p1, p2, rtol=0, atol=2e-2)
    assert not all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True)
    )


def test_min_dim_size_to_factor_needs_static_args():
    params = {"w": jnp.ones((64, 64)), "b": jnp.zeros(64)}
    # inject_hyperparams turns every numeric argument it is given into an
    # array: a structural value passed there must be static (its default, None,
    # is: tests/test_common.py::test_inject_hyperparams_as_is).
    factory = optax.inject_hyperparams(lowbit.adafactor_polar, static_args=("bits",))
    with pytest.raises(TypeError, match=r"static_args=\('min_dim_size_to_factor',\)"):
        factory(learning_rate=1e-2, min_dim_size_to_factor=32).init(params)
    factory = optax.inject_hyperparams(
        lowbit.adafactor_polar, static_args=("min_dim_size_to_factor", "bits")
    )
    tx = factory(learning_rate=1e-2, min_dim_size_to_factor=32, momentum=0.9, bits=2)
    state = tx.init(params)
    u, state = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), state, params)
    assert state.inner_state[0].v_row["w"].shape == (64,)
    chex.assert_tree_all_finite(u)


def test_bad_arguments():
    with pytest.raises(ValueError, match="bits must be one of"):
        lowbit.adafactor_polar(1e-2, bits=3)
    with pytest.raises(TypeError, match="min_dim_size_to_factor must be a positive"):
        lowbit.scale_by_factored_rms_quantized(
            min_dim_size_to_factor=2.5, nu_codec=FP32
        )
    with pytest.raises(TypeError, match="nu_codec must be a codec"):
        lowbit.scale_by_factored_rms_quantized(nu_codec="polar")
    with pytest.raises(ValueError, match="codec must be a signed codec"):
        lowbit.ema_quantized(0.9, codec=_testing_codecs.Int8Sqrt())
    with pytest.raises(TypeError, match="policy must be callable"):
        lowbit.adafactor_polar(1e-2, policy=3)
    with pytest.raises(TypeError, match=r"params\['n'\] has dtype int32"):
        lowbit.adafactor_polar(1e-2).init({"n": jnp.zeros((3, 3), jnp.int32)})


def test_ema_quantized_debias_equals_optax_ema():
    params = _params()
    ours = lowbit.ema_quantized(0.9, codec=FP32, policy=ALL)
    _, _, u1 = _run(ours, params, 10)
    _, _, u2 = _run(optax.ema(0.9), params, 10)
    chex.assert_trees_all_close(u1, u2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "dtype, expected",
    [(None, jnp.float32), (jnp.bfloat16, jnp.bfloat16), ("float32", jnp.float32)],
)
def test_ema_accumulator_dtype_on_unquantized_leaves(dtype, expected):
    tx = lowbit.ema_quantized(
        0.9,
        codec=lowbit.codecs.identity(),
        accumulator_dtype=dtype,
        policy=lambda path, x: False,
    )
    params = {"w": jnp.ones((4, 8), jnp.bfloat16)}
    state = tx.init(params)
    assert state.ema["w"].dtype == expected
    _, state = jax.jit(tx.update)(params, state)
    assert state.ema["w"].dtype == expected
