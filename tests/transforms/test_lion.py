"""Tests of scale_by_lion_quantized and lion_polar."""

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
        {},
        {"b1": 0.8, "b2": 0.95, "weight_decay": 0.1},
        {"learning_rate": optax.cosine_decay_schedule(1e-3, 100), "mask": "bias"},
    ],
    ids=["default", "betas-wd", "schedule-mask"],
)
@pytest.mark.parametrize("policy", [ALL, None], ids=["all-packed", "default"])
def test_identity_codec_equals_optax_lion_100_steps(kw, policy):
    params = _params()
    kw = {"learning_rate": 1e-3, **kw}
    if kw.get("mask") == "bias":
        kw["mask"] = jax.tree.map(lambda x: x.ndim >= 2, params)
    ours = lowbit.lion_polar(mu_codec=FP32, policy=policy, **kw)
    p1, s1, u1 = _run(ours, params, 100)
    p2, s2, u2 = _run(optax.lion(**kw), params, 100)
    chex.assert_trees_all_close(u1, u2, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(p1, p2, rtol=1e-6, atol=1e-6)
    assert int(s1[0].count) == int(s2[0].count) == 100
    assert isinstance(s1[0].mu["big"], base.Packed)
    assert isinstance(s1[0].mu["bias"], base.Packed) == (policy is ALL)


@pytest.mark.parametrize("mode", ["smooth", "refined"])
def test_modes_equal_optax(mode):
    params = _params()
    ours = lowbit.scale_by_lion_quantized(mu_codec=FP32, policy=ALL, mode=mode)
    _, _, u1 = _run(ours, params, 5)
    _, _, u2 = _run(optax.scale_by_lion(mode=mode), params, 5)
    chex.assert_trees_all_close(u1, u2, rtol=1e-6, atol=1e-6)


def test_polar_lion_trains():
    params = {"w": jax.random.normal(jax.random.key(0), (128, 64)) / 8}
    x = jax.random.normal(jax.random.key(1), (512, 128))
    y = x @ jax.random.normal(jax.random.key(2), (128, 64)) / 8

    def loss(p):
        return jnp.mean((x @ p["w"] - y) ** 2)

    for bits in (2, 1.5):
        tx = lowbit.lion_polar(3e-3, weight_decay=0.0, bits=bits)
        p, state = params, tx.init(params)
        assert state[0].mu["w"].codec_name == f"polar-{bits}b-signed"  # nearest

        @jax.jit
        def step(p, s, tx=tx):
            u, s = tx.update(jax.grad(loss)(p), s, p)
            return optax.apply_updates(p, u), s

        for _ in range(150):
            p, state = step(p, state)
        assert float(loss(p)) < 0.1 * float(loss(params)), bits


def test_bad_arguments():
    with pytest.raises(ValueError, match="bits must be one of"):
        lowbit.lion_polar(1e-3, bits=4)
    with pytest.raises(ValueError, match="mode must be one of"):
        lowbit.scale_by_lion_quantized(mu_codec=FP32, mode="soft")
    with pytest.raises(ValueError, match="mu_codec must be a signed codec"):
        lowbit.scale_by_lion_quantized(mu_codec=_testing_codecs.Int8Sqrt())
    with pytest.raises(ValueError, match="b2 must be in"):
        lowbit.lion_polar(1e-3, b2=1.5)
    with pytest.raises(ValueError, match="mask does not match"):
        lowbit.lion_polar(1e-3, mask={"nope": True}).init(_params())
