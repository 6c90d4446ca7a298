import importlib

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import optax_lowbit as lowbit
from optax_lowbit.codecs import base
from tests.transforms import _testing_codecs

FP32 = lowbit.codecs.identity()
INT8 = _testing_codecs.Int8Absmax()
SQRT = _testing_codecs.Int8Sqrt()


def _params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"w": jax.random.normal(k1, (64, 96)), "b": jax.random.normal(k2, (96,))}


def _grads(params, i):
    return jax.tree.map(
        lambda x: jax.random.normal(jax.random.key(i), x.shape) + 0.1, params
    )


def _run(tx, params, state, steps, start=0):
    step = jax.jit(lambda p, s, g: tx.update(g, s, p))
    for i in range(start, start + steps):
        u, state = step(params, state, _grads(params, i))
        params = optax.apply_updates(params, u)
    return params, state


def _lowbit_adamw(mu_codec, nu_codec, lr=1e-2, **kw):
    return optax.chain(
        lowbit.scale_by_adam_quantized(mu_codec, nu_codec, **kw),
        optax.add_decayed_weights(1e-4),
        optax.scale_by_learning_rate(lr),
    )


def test_identity_conversion_is_exact_both_ways():
    params = _params()
    ref = optax.adamw(1e-2)
    p, s = _run(ref, params, ref.init(params), 5)
    ident = _lowbit_adamw(FP32, FP32, policy=lambda path, x: True)
    s_id = lowbit.convert(s, ident, params)
    assert isinstance(s_id[0], lowbit.ScaleByAdamQuantizedState)
    assert isinstance(s_id[0].mu["w"], base.Packed)
    assert int(s_id[0].count) == 5
    back = lowbit.convert(s_id, ref, params)
    chex.assert_trees_all_equal(back, s)
    # and continuing from either gives the same parameters
    p1, _ = _run(ref, p, s, 5, start=5)
    p2, _ = _run(ident, p, s_id, 5, start=5)
    chex.assert_trees_all_close(p1, p2, rtol=1e-6, atol=1e-6)


def test_optax_adamw_to_lowbit_and_continue_training():
    params = _params()
    ref = optax.adamw(1e-2)
    p, s = _run(ref, params, ref.init(params), 20)
    low = _lowbit_adamw(INT8, SQRT)
    s_low = lowbit.convert(s, low, params)
    assert isinstance(s_low[0].mu["w"], base.Packed)  # default policy: (64, 96)
    assert not isinstance(s_low[0].mu["b"], base.Packed)
    chex.assert_trees_all_equal(s_low[0].mu["b"], s[0].mu["b"])
    mu_w = INT8.decode(s_low[0].mu["w"])
    chex.assert_trees_all_close(
        mu_w, s[0].mu["w"], atol=float(jnp.abs(s[0].mu["w"]).max()) / 100
    )
    p_low, s_low = _run(low, p, s_low, 20, start=20)
    p_ref, _ = _run(ref, p, s, 20, start=20)
    assert int(s_low[0].count) == 40
    chex.assert_tree_all_finite(p_low)
    # quantized continuation stays close to the fp32 run
    diff = jnp.abs(p_low["w"] - p_ref["w"]).max()
    moved = jnp.abs(p_ref["w"] - p["w"]).max()
    assert diff < 0.2 * moved, (diff, moved)
    # back to optax: lossless decode of the packed moments
    back = lowbit.convert(s_low, ref, params)
    assert isinstance(back[0], optax.ScaleByAdamState)
    chex.assert_trees_all_equal(back[0].mu["w"], INT8.decode(s_low[0].mu["w"]))
    chex.assert_trees_all_equal(back[0].nu["w"], SQRT.decode(s_low[0].nu["w"]))


def test_preset_to_preset_and_wrappers_kept():
    params = _params()
    src = optax.MultiSteps(_lowbit_adamw(INT8, SQRT), 2)
    _, s = _run(src, params, src.init(params), 5)
    dst = optax.MultiSteps(_lowbit_adamw(FP32, FP32), 2)
    s2 = lowbit.convert(s, dst, params)
    chex.assert_trees_all_equal(s2.acc_grads, s.acc_grads)
    chex.assert_trees_all_equal(s2.mini_step, s.mini_step)
    inner = s2.inner_opt_state[0]
    assert inner.mu["w"].codec_name == "identity-float32"
    chex.assert_trees_all_close(
        FP32.decode(inner.mu["w"]), INT8.decode(s.inner_opt_state[0].mu["w"])
    )
    chex.assert_trees_all_equal_shapes_and_dtypes(s2, dst.init(params))


@pytest.mark.skipif(
    importlib.util.find_spec("optax_lowbit.codecs.polar") is None,
    reason="polar codec not landed",
)
def test_optax_adamw_to_adamw_polar_alias():
    params = _params()
    ref = optax.adamw(1e-2)
    p, s = _run(ref, params, ref.init(params), 3)
    tx = lowbit.adamw_polar(1e-2, bits=2)
    s2 = lowbit.convert(s, tx, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(s2, tx.init(params))
    p2, _ = _run(tx, p, s2, 3, start=3)
    chex.assert_tree_all_finite(p2)


def test_mismatched_chains_fail_clearly():
    params = _params()
    s = optax.adamw(1e-2).init(params)
    with pytest.raises(ValueError, match="differ outside their Adam states"):
        lowbit.convert(
            s, _lowbit_adamw(INT8, SQRT, lr=optax.constant_schedule(1e-2)), params
        )
    with pytest.raises(ValueError, match="Adam states"):
        lowbit.convert(
            optax.sgd(1e-2, momentum=0.9).init(params),
            _lowbit_adamw(INT8, SQRT),
            params,
        )
    with pytest.raises(ValueError, match="covers different parameters"):
        lowbit.convert(s, _lowbit_adamw(INT8, SQRT), {"w": params["w"]})
