"""Tests of scale_by_adam_quantized, its presets and the Adam aliases."""

import functools
import importlib

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
    k = jax.random.split(jax.random.key(seed), 4)
    return {
        "dense": {
            "kernel": jax.random.normal(k[0], (64, 96)),
            "bias": jax.random.normal(k[1], (96,)),
        },
        "conv": jax.random.normal(k[2], (3, 8, 40)),
        "scale": jax.random.normal(k[3], ()),
    }


def _grads(params, step):
    """Fresh random gradients, never zeros, of the params' structure."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1000 + step), len(leaves))
    out = [
        jax.random.normal(k, x.shape) * (1.0 + i) + 0.01
        for i, (k, x) in enumerate(zip(keys, leaves, strict=True))
    ]
    return jax.tree.unflatten(treedef, out)


def _int8_adam(**kw):
    return lowbit.scale_by_adam_quantized(
        _testing_codecs.Int8Absmax(), _testing_codecs.Int8Sqrt(), **kw
    )


def _has_codecs(*modules):
    for m in modules:
        try:
            importlib.import_module(f"optax_lowbit.codecs.{m}")
        except ImportError:
            return False
    return True


# --- identity codecs equal Optax -------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"nesterov": True},
        {"eps_root": 1e-8, "b1": 0.8, "b2": 0.99},
    ],
    ids=["plain", "nesterov", "eps_root"],
)
@pytest.mark.parametrize("policy", [ALL, None], ids=["all-packed", "default"])
def test_identity_codecs_equal_optax_scale_by_adam(kw, policy):
    params = _params()
    ours = lowbit.scale_by_adam_quantized(FP32, FP32, policy=policy, **kw)
    ref = optax.scale_by_adam(**kw)
    s_ours, s_ref = ours.init(params), ref.init(params)
    if policy is ALL:
        assert all(
            isinstance(x, base.Packed)
            for x in jax.tree.leaves(
                s_ours.mu, is_leaf=lambda x: isinstance(x, base.Packed)
            )
        )
    else:  # the default policy quantizes only the (64, 96) kernel
        assert isinstance(s_ours.mu["dense"]["kernel"], base.Packed)
        assert not isinstance(s_ours.mu["dense"]["bias"], base.Packed)
    up_ours, up_ref = jax.jit(ours.update), jax.jit(ref.update)
    for step in range(100):
        g = _grads(params, step)
        u1, s_ours = up_ours(g, s_ours)
        u2, s_ref = up_ref(g, s_ref)
        chex.assert_trees_all_close(u1, u2, rtol=1e-6, atol=1e-6)
    assert int(s_ours.count) == int(s_ref.count) == 100
    mu = lowbit.convert(s_ours, optax.scale_by_adam(**kw), params).mu
    # Ours is m + (1 - b1)(g - m), Optax's (1 - b1) g + b1 m (rules.py's note
    # on rounding alike): a few ulps of the gradients (|g| to about 10) apart.
    chex.assert_trees_all_close(mu, s_ref.mu, rtol=1e-6, atol=1e-6)


def test_identity_adamw_equals_optax_adamw_params():
    params = _params(1)
    sched = optax.linear_schedule(1e-2, 1e-3, 100)

    def tx_ours():
        return optax.chain(
            lowbit.scale_by_adam_quantized(FP32, FP32, policy=ALL),
            optax.add_decayed_weights(0.1),
            optax.scale_by_learning_rate(sched),
        )

    runs = {}
    for name, tx in [
        ("ours", tx_ours()),
        ("ref", optax.adamw(sched, weight_decay=0.1)),
    ]:
        p, s = params, tx.init(params)

        @jax.jit
        def step(p, s, g, tx=tx):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s, u

        for i in range(100):
            p, s, u = step(p, s, _grads(params, i))
        runs[name] = (p, u)
    chex.assert_trees_all_close(runs["ours"], runs["ref"], rtol=1e-6, atol=1e-6)


def test_bf16_updates_keep_their_dtype():
    params = {"w": jnp.ones((64, 64), jnp.bfloat16)}
    tx = _int8_adam()
    state = tx.init(params)
    u, state2 = jax.jit(tx.update)({"w": jnp.full((64, 64), 0.5, jnp.bfloat16)}, state)
    assert u["w"].dtype == jnp.bfloat16
    chex.assert_trees_all_equal_shapes_and_dtypes(state, state2)


# --- quantized training ------------------------------------------------------


def _mlp_problem():
    kx, k1, k2, kn = jax.random.split(jax.random.key(7), 4)
    x = jax.random.normal(kx, (4096, 64))
    teacher = jnp.tanh(x @ jax.random.normal(k1, (64, 64)) / 8.0)
    # label noise: the loss has a floor (~0.01), so "close to fp32" is relative
    # to a loss that stops falling, as on real data
    y = teacher @ jax.random.normal(k2, (64, 8)) / 8.0
    y = y + 0.1 * jax.random.normal(kn, y.shape)
    ki = jax.random.split(jax.random.key(3), 3)
    params = {
        "l1": {"w": jax.random.normal(ki[0], (64, 64)) / 8.0, "b": jnp.zeros(64)},
        "l2": {"w": jax.random.normal(ki[1], (64, 64)) / 8.0, "b": jnp.zeros(64)},
        "out": {"w": jax.random.normal(ki[2], (64, 8)) / 8.0},
    }

    def loss(p):
        h = jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"])
        h = jnp.tanh(h @ p["l2"]["w"] + p["l2"]["b"])
        return jnp.mean((h @ p["out"]["w"] - y) ** 2)

    return params, loss


def _train(tx, steps=150):
    params, loss = _mlp_problem()
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        value, g = jax.value_and_grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, value

    first = None
    for _ in range(steps):
        params, state, value = step(params, state)
        first = value if first is None else first
    return float(first), float(loss(params)), state


def _quantized_txs():
    txs = {
        "int8-test": optax.chain(_int8_adam(), optax.scale_by_learning_rate(3e-3)),
        "int8-test-nesterov": optax.chain(
            _int8_adam(nesterov=True), optax.scale_by_learning_rate(3e-3)
        ),
    }
    if _has_codecs("polar"):
        txs["polar2"] = lowbit.adamw_polar(3e-3, bits=2)
        txs["polar1.5"] = lowbit.adamw_polar(3e-3, bits=1.5)
    if _has_codecs("blockwise"):
        txs["8bit"] = lowbit.adamw_8bit(3e-3)
        txs["4bit"] = lowbit.adamw_4bit(3e-3)
    if _has_codecs("piquant"):
        txs["piquant"] = lowbit.adamw_piquant(3e-3)
    return txs


# final loss / fp32 AdamW's final loss allowed (measured on this problem, 150
# steps: int8 1.09, 8bit 0.99, 4bit 1.20, polar 2b 1.64, polar 1.5b 1.77)
_LOSS_RATIO = {
    "int8-test": 1.2,
    "int8-test-nesterov": 1.2,
    "8bit": 1.15,
    "4bit": 1.4,
    "polar2": 2.0,
    "polar1.5": 2.0,
    "piquant": 2.0,
}


@functools.cache
def _fp32_reference():
    first, last, _ = _train(optax.adamw(3e-3))
    return first, last


@pytest.mark.parametrize("name", list(_quantized_txs()))
def test_quantized_adam_trains_close_to_fp32(name):
    first, ref_last = _fp32_reference()
    assert ref_last < 0.1 * first
    _, last, state = _train(_quantized_txs()[name])
    packed = [
        x
        for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, base.Packed))
        if isinstance(x, base.Packed)
    ]
    assert len(packed) == 4  # mu and nu of the two 64x64 kernels
    assert np.isfinite(last)
    assert last < _LOSS_RATIO[name] * ref_last, (name, last, ref_last)


# --- works everywhere Optax works ---------------------------------------------


def test_no_recompile_on_step_2():
    params = _params()
    tx = optax.chain(_int8_adam(), optax.scale_by_learning_rate(1e-3))
    traces = []

    @jax.jit
    def step(p, s, g):
        traces.append(1)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    p, s = params, tx.init(params)
    for i in range(3):
        p, s = step(p, s, _grads(params, i))
    assert len(traces) == 1


def test_update_inside_lax_cond_and_structure_kept():
    params = _params()
    tx = _int8_adam()
    state = tx.init(params)
    g = _grads(params, 0)

    @jax.jit
    def f(pred, state):
        return jax.lax.cond(
            pred,
            lambda s: tx.update(g, s)[1],
            lambda s: s,
            state,
        )

    new = f(True, state)
    same = f(False, state)
    chex.assert_trees_all_equal_shapes_and_dtypes(new, state)
    assert jax.tree.structure(new) == jax.tree.structure(state)
    chex.assert_trees_all_equal(same, state)
    assert int(new.count) == 1


def test_init_under_eval_shape():
    params = _params()
    tx = _int8_adam()
    shapes = jax.eval_shape(
        tx.init, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    )
    real = tx.init(params)
    assert jax.tree.structure(shapes) == jax.tree.structure(real)
    chex.assert_trees_all_equal_shapes_and_dtypes(shapes, real)
    assert isinstance(shapes.mu["dense"]["kernel"], base.Packed)
    assert shapes.mu["dense"]["kernel"].codec_name == "test-int8-absmax"


def test_inject_hyperparams_traced_lr_and_b1():
    params = _params()
    sched = optax.cosine_decay_schedule(1e-2, 50)
    factory = optax.inject_hyperparams(
        lambda learning_rate, b1: optax.chain(
            _int8_adam(b1=b1), optax.scale_by_learning_rate(learning_rate)
        )
    )
    tx = factory(learning_rate=sched, b1=0.9)
    state = tx.init(params)
    step = jax.jit(tx.update)
    for i in range(3):
        _, state = step(_grads(params, i), state, params)
    np.testing.assert_allclose(state.hyperparams["learning_rate"], sched(2), rtol=1e-6)
    assert int(state.inner_state[0].count) == 3


def test_inject_hyperparams_needs_static_bits():
    # bits shapes the state: without static_args it arrives as an array.
    tx = optax.inject_hyperparams(lowbit.adamw_polar)(learning_rate=1e-3, bits=2)
    with pytest.raises(TypeError, match=r"static_args=\('bits',\)"):
        tx.init({"w": jnp.zeros((64, 64))})


@pytest.mark.skipif(not _has_codecs("polar"), reason="polar codec not landed")
def test_inject_hyperparams_with_static_bits():
    params = {"w": jnp.ones((64, 64)), "b": jnp.zeros(64)}
    tx = optax.inject_hyperparams(lowbit.adamw_polar, static_args=("bits",))(
        learning_rate=optax.linear_schedule(1e-2, 0.0, 10), bits=1.5
    )
    state = tx.init(params)
    u, state = jax.jit(tx.update)(
        {"w": jnp.ones((64, 64)), "b": jnp.ones(64)}, state, params
    )
    assert isinstance(state.inner_state[0].mu["w"], base.Packed)
    chex.assert_tree_all_finite(u)


def test_multisteps():
    params = _params()
    tx = optax.MultiSteps(
        optax.chain(_int8_adam(), optax.scale_by_learning_rate(1e-2)), 3
    )
    state = tx.init(params)
    step = jax.jit(tx.update)
    for i in range(6):
        u, state = step(_grads(params, i), state, params)
        zero = all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(u))
        assert zero == (i % 3 != 2)
    assert int(state.inner_opt_state[0].count) == 2


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_apply_if_finite_leaves_state_bitwise_unchanged(bad):
    params = _params()
    tx = optax.apply_if_finite(_int8_adam(), max_consecutive_errors=5)
    state = tx.init(params)
    step = jax.jit(tx.update)
    _, state = step(_grads(params, 0), state, params)
    g = _grads(params, 1)
    g["conv"] = g["conv"].at[0, 0, 0].set(bad)
    u, new = step(g, state, params)
    chex.assert_trees_all_equal(new.inner_state, state.inner_state)
    assert not bool(new.last_finite)
    assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(u))


def test_chain_with_clipping():
    params = _params()
    tx = optax.chain(
        optax.clip_by_global_norm(1e-3),
        lowbit.scale_by_adam_quantized(FP32, FP32, policy=ALL),
    )
    ref = optax.chain(optax.clip_by_global_norm(1e-3), optax.scale_by_adam())
    s1, s2 = tx.init(params), ref.init(params)
    up1, up2 = jax.jit(tx.update), jax.jit(ref.update)
    for i in range(5):
        g = _grads(params, i)
        u1, s1 = up1(g, s1)
        u2, s2 = up2(g, s2)
        chex.assert_trees_all_close(u1, u2, rtol=1e-5, atol=1e-6)


def test_masked_and_adamw_mask():
    params = _params()
    mask = {"dense": {"kernel": True, "bias": False}, "conv": True, "scale": False}
    tx = optax.masked(_int8_adam(), mask)
    state = tx.init(params)
    u, state = jax.jit(tx.update)(_grads(params, 0), state)
    assert isinstance(state.inner_state.mu["dense"]["kernel"], base.Packed)
    np.testing.assert_array_equal(u["scale"], _grads(params, 0)["scale"])
    # adamw's mask: weight decay only where True; identical to optax's masking
    ours = optax.chain(
        lowbit.scale_by_adam_quantized(FP32, FP32, policy=ALL),
        optax.add_decayed_weights(0.5, mask),
        optax.scale_by_learning_rate(1e-2),
    )
    ref = optax.adamw(1e-2, weight_decay=0.5, mask=mask)
    u1, _ = ours.update(_grads(params, 0), ours.init(params), params)
    u2, _ = ref.update(_grads(params, 0), ref.init(params), params)
    chex.assert_trees_all_close(u1, u2, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not _has_codecs("polar"), reason="polar codec not landed")
def test_alias_state_shape_matches_optax_adamw():
    params = _params()
    mask = {"dense": {"kernel": True, "bias": False}, "conv": True, "scale": False}
    ours = jax.eval_shape(lowbit.adamw_polar(1e-3, mask=mask).init, params)
    ref = jax.eval_shape(optax.adamw(1e-3, mask=mask).init, params)
    assert jax.tree.structure(ours[1:]) == jax.tree.structure(ref[1:])
    assert isinstance(ours[0], lowbit.ScaleByAdamQuantizedState)


# --- bad input ---------------------------------------------------------------


def test_bits_3_is_rejected_with_hint():
    with pytest.raises(
        ValueError,
        match=r"bits must be one of \(1\.5, 2\), got 3; "
        r"for 4 bits use scale_by_adam_4bit",
    ):
        lowbit.scale_by_adam_polar(bits=3)
    with pytest.raises(ValueError, match="bits must be one of"):
        lowbit.adamw_polar(1e-3, bits=3)


def test_non_callable_policy_is_rejected():
    with pytest.raises(TypeError, match="policy must be callable"):
        lowbit.scale_by_adam_quantized(FP32, FP32, policy="big")
    with pytest.raises(TypeError, match="policy must be callable"):
        lowbit.adamw_polar(1e-3, policy=4096)


@pytest.mark.skipif(not _has_codecs("blockwise"), reason="blockwise codec not landed")
@pytest.mark.parametrize(
    "mask",
    [
        {"dense": True, "other": False},
        [True, False],
        lambda p: {"dense": {"kernel": {"x": True}}},
    ],
    ids=["wrong-keys", "wrong-type", "callable-too-deep"],
)
def test_mismatched_mask_fails_clearly(mask):
    tx = lowbit.adamw_8bit(1e-3, mask=mask)
    with pytest.raises(ValueError, match="mask does not match the parameters"):
        tx.init(_params())


def test_integer_params_fail_at_init_naming_the_leaf():
    tx = _int8_adam()
    params = {"w": jnp.zeros((64, 64)), "step": {"n": jnp.zeros((3,), jnp.int32)}}
    with pytest.raises(TypeError, match=r"params\['step'\]\['n'\] has dtype int32"):
        tx.init(params)


def test_other_bad_arguments():
    with pytest.raises(ValueError, match="impl must be one of"):
        lowbit.scale_by_adam_quantized(FP32, FP32, impl="cuda")
    with pytest.raises(ValueError, match="b1 must be in"):
        lowbit.scale_by_adam_quantized(FP32, FP32, b1=1.5)
    with pytest.raises(TypeError, match="mu_codec must be a codec"):
        lowbit.scale_by_adam_quantized("polar", FP32)
    with pytest.raises(ValueError, match="mu_codec must be a signed codec"):
        lowbit.scale_by_adam_quantized(_testing_codecs.Int8Sqrt(), FP32)
    with pytest.raises(ValueError, match="encoder must be one of"):
        lowbit.scale_by_adam_piquant(encoder="fast")


def test_init_asks_the_policy_once_a_leaf_and_makes_each_leaf_its_shape():
    """`init` decides each leaf once a moment (its zero states are made in one
    `zeros_many` call per codec, then placed in tree order)."""
    asked = []

    def some(path, leaf):
        asked.append(jax.tree_util.keystr(path))
        return asked[-1] in ("['a']", "['c']", "['e']")

    shapes = [(4, 64), (3,), (2, 65), (5, 64), (7, 9)]
    params = {k: jnp.ones(s) for k, s in zip("abcde", shapes, strict=True)}
    tx = lowbit.scale_by_adam_quantized(
        lowbit.codecs.polar(bits=2),
        lowbit.codecs.blockwise4(signed=False),
        policy=lowbit.policy.from_predicate(some),
    )
    state = tx.init(params)
    assert sorted(asked) == sorted(2 * [f"['{k}']" for k in params])  # mu, nu
    for moment in (state.mu, state.nu):
        for k, p in params.items():
            leaf = moment[k]
            assert isinstance(leaf, base.Packed) == (k in "ace")
            assert leaf.shape == p.shape
            got = leaf.decode() if isinstance(leaf, base.Packed) else leaf
            np.testing.assert_array_equal(np.asarray(got), 0.0)
