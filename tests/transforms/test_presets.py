"""The generated Adam family: one record per codec pair, every function from it."""

import inspect
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_lowbit as lowbit
from optax_lowbit.transforms import adam_presets

NAMES = sorted(adam_presets.PRESETS)
ALL = lambda path, leaf: True  # noqa: E731


def _params_and_grads(seed):
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.standard_normal((32, 256)), jnp.float32)}
    grads = [
        {"w": jnp.asarray(rng.standard_normal((32, 256)), jnp.float32)}
        for _ in range(5)
    ]
    return params, grads


@pytest.mark.parametrize("name", NAMES)
def test_signatures_follow_optax_order(name):
    adamw = inspect.signature(getattr(lowbit, f"adamw_{name}"))
    optax_adamw = list(inspect.signature(optax.adamw).parameters)
    ours = list(adamw.parameters)
    assert ours[:8] == optax_adamw[:8]  # learning_rate ... mask, in Optax's order
    adam = list(inspect.signature(getattr(lowbit, f"adam_{name}")).parameters)
    assert adam[:6] == list(inspect.signature(optax.adam).parameters)[:6]
    for sig in (adamw, inspect.signature(getattr(lowbit, f"adam_{name}"))):
        for p in list(sig.parameters.values())[8:]:
            assert p.kind is inspect.Parameter.KEYWORD_ONLY or p.name in (
                "weight_decay",
                "mask",
            )


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("decay", [True, False])
def test_identity_overrides_equal_optax(name, decay):
    """The codec overrides reach the transform: identity codecs give Optax."""
    fp32 = lowbit.codecs.identity()
    make = getattr(lowbit, f"adam{'w' if decay else ''}_{name}")
    ours = make(1e-2, mu_codec=fp32, nu_codec=fp32, policy=ALL, impl="jnp")
    ref = (optax.adamw if decay else optax.adam)(1e-2)
    params, grads = _params_and_grads(7)
    s, r = ours.init(params), ref.init(params)
    for g in grads:
        u, s = ours.update(g, s, params)
        v, r = ref.update(g, r, params)
        np.testing.assert_allclose(u["w"], v["w"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("decay", [True, False])
def test_fused_equals_chain_then_apply(name, decay):
    make = getattr(lowbit, f"adam{'w' if decay else ''}_{name}")
    tx = make(3e-3, impl="jnp")
    opt = make(3e-3, impl="jnp", fused=True)
    assert isinstance(opt, lowbit.FusedOptimizer)
    params, grads = _params_and_grads(11)
    p_chain, s_chain = params, tx.init(params)
    p_fused, s_fused = params, opt.init(params)
    update, step = jax.jit(tx.update), jax.jit(opt.step)
    for g in grads:
        u, s_chain = update(g, s_chain, p_chain)
        p_chain = optax.apply_updates(p_chain, u)
        p_fused, s_fused = step(g, s_fused, p_fused)
    assert jax.tree.structure(s_chain) == jax.tree.structure(s_fused)
    for a, b in zip(jax.tree.leaves(s_chain), jax.tree.leaves(s_fused), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(p_fused["w"], p_chain["w"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_deprecated_fused_names_warn_and_match(name):
    with pytest.warns(DeprecationWarning, match=f"adamw_{name}"):
        old = getattr(lowbit, f"fused_adamw_{name}")(1e-3, impl="jnp")
    new = getattr(lowbit, f"adamw_{name}")(1e-3, impl="jnp", fused=True)
    params, _ = _params_and_grads(3)
    assert jax.tree.structure(old.init(params)) == jax.tree.structure(new.init(params))
    from optax_lowbit import fused

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert fused.fused_adamw_polar(1e-3) is not None  # the old address


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="fused must be a bool"):
        lowbit.adamw_4bit(1e-3, fused="yes")
    with pytest.raises(TypeError, match="unexpected keyword argument 'bitz'"):
        lowbit.adamw_polar(1e-3, bitz=2)
    with pytest.raises(TypeError, match="positional"):
        lowbit.adamw_polar(1e-3, 0.9, 0.999, 1e-8, 0.0, None, 1e-4, None, 2)
    with pytest.raises(ValueError, match="rounding must be one of"):
        lowbit.adam_polar(1e-3, rounding="up")
    with pytest.raises(ValueError, match="encoder must be one of"):
        lowbit.scale_by_adam_piquant(encoder="fast")


def test_mu_codec_override_sets_polar_nu_groups():
    """A polar first moment of another group keeps both moments in the kernel."""
    mu = lowbit.codecs.polar(2, signed=True, group_size=128, rounding="stochastic")
    mu_codec, nu_codec = adam_presets.codecs(
        adam_presets.PRESETS["polar"], mu, None, bits=2, rounding="stochastic"
    )
    assert mu_codec is mu and nu_codec.group_size == 128
