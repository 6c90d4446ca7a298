"""The float-moment leaves in the kernel (issue 18, item 4; v37).

Leaves whose moments the policy keeps as plain float32 arrays take the
kernel as `codec_ops.FloatMoment`s (`kadam.adam_update_float_many`): a few
launches for all of them instead of one small XLA graph each. The results
must be the jnp step's bits (`rules.moment_step`, then `u` in the gradient's
dtype or `rules.apply_leaf`), the moments updated in place, and the fused
optimizers' steps unchanged bit for bit against ``impl="jnp"``.
"""

import collections
import functools
import re
from unittest import mock

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from jax.sharding import PartitionSpec as P

import optax_lowbit as lowbit
from optax_lowbit.kernels import adam as kadam
from optax_lowbit.kernels import codec_ops, launch, rules

# the kernel and its reference held to the same bits (tests/conftest.py)
pytestmark = pytest.mark.optimized

GROUP = codec_ops.FloatMoment().group_size


def _leaf(key, k, shape, g_dtype, p_dtype, faults):
    """Leaf ``k``: fresh ``(g, m, v, hp, p)``, its own hyperparameters."""
    k1, k2, k3, k4 = jax.random.split(jax.random.fold_in(key, k), 4)
    g = jax.random.normal(k1, shape)
    if faults:  # the fault rule: non-finite gradients keep the old moments
        flat = g.reshape(-1)
        g = flat.at[0].set(jnp.nan).at[-1].set(jnp.inf).reshape(shape)
    m = 0.1 * jax.random.normal(k2, shape)
    v = 0.01 * jnp.square(jax.random.normal(k3, shape)) + 1e-6
    hp = kadam.make_hp(
        0.9,
        0.999,
        1e-8,
        1e-12 * k,
        0.2 + 0.05 * k,
        0.003 * (k + 1),
        0.3 + 0.05 * k,
        learning_rate=1e-2 * (k + 1),
        weight_decay=0.1 * k,
    )
    p = jax.random.normal(k4, shape, p_dtype)
    return g.astype(g_dtype), m, v, hp, p


@functools.partial(jax.jit, static_argnames=("nesterov",))
def _reference(g, m, v, hp, p, nesterov):
    """The jnp step of one float leaf: `rules.reference_step`, jitted."""
    out, (m, v) = rules.reference_step(rules.AdamRule(nesterov), g, [m, v], hp, p)
    return out, m, v


_float_many = jax.jit(kadam.adam_update_float_many, static_argnames=("nesterov",))

_shapes = st.lists(
    st.tuples(
        st.lists(st.integers(1, 3), max_size=2),
        st.integers(1, 20).map(lambda n: n * GROUP),
    ).map(lambda t: (*t[0], t[1])),
    min_size=1,
    max_size=4,
)


@settings(max_examples=4)
@given(
    shapes=_shapes,
    apply=st.booleans(),
    nesterov=st.booleans(),
    low_precision=st.booleans(),
    faults=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_float_kernel_equals_the_jnp_step(
    shapes, apply, nesterov, low_precision, faults, seed
):
    # bfloat16 parameters with the apply (float32 gradients: `float_leaf_fits`),
    # bfloat16 gradients without it
    g_dtype = jnp.bfloat16 if low_precision and not apply else jnp.float32
    p_dtype = jnp.bfloat16 if low_precision and apply else jnp.float32
    key = jax.random.key(seed)
    leaves = [_leaf(key, k, s, g_dtype, p_dtype, faults) for k, s in enumerate(shapes)]
    gs, ms, vs, hps, ps = (list(x) for x in zip(*leaves, strict=True))
    for g, m, v, p in zip(gs, ms, vs, ps, strict=True):
        assert kadam.float_leaf_fits(g, m, v, p if apply else None)
    ps = ps if apply else None
    got = _float_many(gs, ms, vs, hps, nesterov=nesterov, params=ps)
    for k, (out, m, v) in enumerate(got):
        want = _reference(
            gs[k], ms[k], vs[k], hps[k], None if ps is None else ps[k], nesterov
        )
        assert out.dtype == want[0].dtype and out.shape == shapes[k]
        assert m.dtype == v.dtype == jnp.float32
        for a, b in zip((out, m, v), want, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_persistent_float_launch_equals_the_jnp_step():
    key = jax.random.key(3)
    shapes = [(2, 48), (160,), (16,)]
    leaves = [
        _leaf(key, k, s, jnp.float32, jnp.float32, False) for k, s in enumerate(shapes)
    ]
    gs, ms, vs, hps, ps = (list(x) for x in zip(*leaves, strict=True))
    with mock.patch.object(kadam, "DEFAULT_PROGRAMS", 0):
        got = kadam.adam_update_float_many(gs, ms, vs, hps, params=ps)
    for k, (out, m, v) in enumerate(got):
        want = _reference(gs[k], ms[k], vs[k], hps[k], ps[k], False)
        for a, b in zip((out, m, v), want, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _fits(shape=(4, 32), g=jnp.float32, m=jnp.float32, p=jnp.float32, **kw):
    g_ = jnp.ones(shape, g)
    m_ = kw.get("mu", jnp.ones(shape, m))
    p_ = None if p is None else jnp.ones(kw.get("p_shape", shape), p)
    return kadam.float_leaf_fits(g_, m_, jnp.ones(shape, jnp.float32), p_)


@pytest.mark.parametrize(
    ("kwargs", "fits"),
    [
        ({}, True),
        ({"p": None}, True),
        ({"p": jnp.bfloat16}, True),
        ({"g": jnp.bfloat16, "p": None}, True),
        ({"shape": (3, 40)}, False),  # the last axis not a multiple of 16
        ({"shape": ()}, False),
        ({"m": jnp.bfloat16}, False),  # a bfloat16 moment
        ({"g": jnp.bfloat16}, False),  # rounded u then applied on the jnp path
        ({"g": jnp.complex64, "p": None}, False),
        ({"p": jnp.int32}, False),
        ({"p_shape": (4, 16)}, False),
        ({"mu": lowbit.codecs.identity().encode(jnp.ones((4, 32)))}, False),
    ],
)
def test_float_leaf_fits(kwargs, fits):
    assert _fits(**kwargs) is fits


def test_a_moment_without_scales_has_no_operand_and_keeps_its_scales():
    codec = codec_ops.FloatMoment()
    assert codec_ops.has_kernel(codec)
    assert not codec_ops.Scales(codec).has_operand
    config = kadam.launch_config(rules.AdamRule(), (codec, codec), 4)
    x = jax.random.normal(jax.random.key(0), (3, 64))
    none = jnp.zeros((0,), jnp.float32)
    packed = lowbit.codecs.Packed(codes=x, scales=none, shape=x.shape, codec=codec)
    hp = kadam.make_hp(0.9, 0.999, 1e-8, 0.0, 0.1, 0.001)
    out, (m, v) = launch.one_leaf(x, (packed, packed), hp, None, None, config)
    for moment in (m, v):  # the (empty) scales pass through
        assert moment.scales.shape == (0,) and moment.codec == codec
    want = _reference(x, x, x, hp, None, False)
    for a, b in zip((out, m.codes, v.codes), want, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _launches(step, *args):
    """The step's kernel launches by name (each distinct jitted body once)."""
    text = str(jax.make_jaxpr(step)(*args))
    return collections.Counter(re.findall(r"name=(adam_[\w.-]+)", text))


def _chain_step(tx):
    """``tx``'s update then `optax.apply_updates`: the step of the chain path."""

    def step(grads, state, params):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


@pytest.mark.parametrize("fused", [True, False])
def test_optimizers_step_float_leaves_in_the_kernel(fused):
    # float leaves of several shapes beside a quantized matrix: one too narrow
    # for the float kernel (17) and a complex one stay on the jnp step
    rng = np.random.default_rng(0)
    shapes = [(512, 256), (768,), (3, 64), (2304,), (17,), (768,)]
    params = {
        f"p{k}": jnp.asarray(rng.normal(size=s), jnp.float32)
        for k, s in enumerate(shapes)
    }
    params["c"] = jnp.asarray(rng.normal(size=(32,)) + 1j, jnp.complex64)
    results = {}
    for impl in ("jnp", "pallas"):
        opt = lowbit.adamw_polar(1e-2, weight_decay=0.1, fused=fused, impl=impl)
        step = jax.jit(opt.step if fused else _chain_step(opt))
        p, state = params, opt.init(params)
        r = np.random.default_rng(1)
        for t in range(3):
            g = {
                k: jnp.asarray(r.normal(size=x.shape) * (1 + t), x.dtype)
                for k, x in p.items()
            }
            p, state = step(g, state, p)
        results[impl] = (p, state)
        names = _launches(step, g, state, p)
        assert any(n.startswith("adam_float32") for n in names) is (impl == "pallas")
    want, got = (jax.tree.leaves(results[k]) for k in ("jnp", "pallas"))
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("spec", [("x",), (None, "x"), ("x", None)])
def test_a_sharded_float_leaf_stays_on_the_jnp_step(spec):
    # under explicit mesh axes, any sharded axis (the last too: no error)
    # leaves the leaf to XLA, which steps it in place where it lies
    mesh = jax.make_mesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
    shape = (32,) if len(spec) == 1 else (2, 32)
    with jax.set_mesh(mesh):
        x = jax.device_put(jnp.ones(shape), jax.sharding.NamedSharding(mesh, P(*spec)))
        m = jnp.zeros_like(x)
        assert launch.explicit_spec(x) is not None
        assert not kadam.float_leaf_fits(x, m, m, x)
        plain = jax.device_put(jnp.ones(shape), jax.sharding.NamedSharding(mesh, P()))
        assert launch.explicit_spec(plain) is None
        assert kadam.float_leaf_fits(plain, plain, plain, plain)
