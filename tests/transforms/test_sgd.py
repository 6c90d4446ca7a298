"""Tests of trace_quantized and sgd_polar."""

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import optax_lowbit as lowbit
from optax_lowbit.codecs import base
from tests.transforms import _testing_codecs
from tests.transforms.test_adafactor import _params, _run

FP32 = lowbit.codecs.identity()
ALL = lowbit.policy.from_predicate(lambda path, leaf: True)


@pytest.mark.parametrize(
    "kw",
    [
        {"momentum": 0.9},
        {"momentum": 0.5, "nesterov": True},
        {"momentum": 0.9, "learning_rate": optax.linear_schedule(1e-2, 0.0, 100)},
    ],
    ids=["heavy-ball", "nesterov", "schedule"],
)
@pytest.mark.parametrize("policy", [ALL, None], ids=["all-packed", "default"])
def test_identity_codec_equals_optax_sgd_100_steps(kw, policy):
    params = _params()
    kw = {"learning_rate": 1e-3, **kw}
    ours = lowbit.sgd_polar(mu_codec=FP32, policy=policy, **kw)
    p1, s1, u1 = _run(ours, params, 100)
    p2, _, u2 = _run(optax.sgd(**kw), params, 100)
    chex.assert_trees_all_close(u1, u2, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(p1, p2, rtol=1e-6, atol=1e-6)
    assert isinstance(s1[0].trace["big"], base.Packed)
    assert isinstance(s1[0].trace["scale"], base.Packed) == (policy is ALL)


def test_polar_sgd_trains():
    params = {"w": jax.random.normal(jax.random.key(0), (128, 64)) / 8}
    x = jax.random.normal(jax.random.key(1), (512, 128))
    y = x @ jax.random.normal(jax.random.key(2), (128, 64)) / 8

    def loss(p):
        return jnp.mean((x @ p["w"] - y) ** 2)

    for nesterov in (False, True):
        tx = lowbit.sgd_polar(0.1, momentum=0.9, nesterov=nesterov, bits=1.5)
        p, state = params, tx.init(params)
        assert isinstance(state[0].trace["w"], base.Packed)

        @jax.jit
        def step(p, s, tx=tx):
            u, s = tx.update(jax.grad(loss)(p), s, p)
            return optax.apply_updates(p, u), s

        for _ in range(100):
            p, state = step(p, state)
        # measured, loss ratio: stochastic rounding (default) 0.054; nearest
        # 0.27 (nesterov 0.17); fp32 optax.sgd 0.008
        assert float(loss(p)) < 0.15 * float(loss(params)), nesterov


def test_bad_arguments():
    with pytest.raises(ValueError, match="momentum must be a number"):
        lowbit.sgd_polar(1e-2, momentum=None)
    with pytest.raises(ValueError, match="bits must be one of"):
        lowbit.sgd_polar(1e-2, bits=1)
    with pytest.raises(TypeError, match="nesterov must be a bool"):
        lowbit.sgd_polar(1e-2, nesterov="yes")
    with pytest.raises(ValueError, match="codec must be a signed codec"):
        lowbit.trace_quantized(0.9, codec=_testing_codecs.Int8Sqrt())
    with pytest.raises(ValueError, match="decay must be >= 0"):
        lowbit.trace_quantized(-0.9, codec=FP32)
