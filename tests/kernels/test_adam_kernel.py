"""The fused Pallas Adam kernel (interpret mode on CPU) against the jnp path."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_lowbit as lowbit
from optax_lowbit.codecs import polar as polar_factory
from optax_lowbit.kernels import adam as kadam
from optax_lowbit.transforms import adam_presets

# the kernel and its reference held to the same bits (tests/conftest.py)
pytestmark = pytest.mark.optimized

BITS = 2
MU = polar_factory(bits=BITS, signed=True)
NU = polar_factory(bits=BITS, signed=False)
#: (mu, nu) codec pairs with a kernel: the default (stochastic rounding) at
#: 2 and 1.5 bits, and nearest rounding at 2 bits.
VARIANTS = {
    "sr2": (
        polar_factory(bits=2, signed=True, rounding="stochastic"),
        polar_factory(bits=2, signed=False, rounding="stochastic"),
    ),
    "sr1.5": (
        polar_factory(bits=1.5, signed=True, rounding="stochastic"),
        polar_factory(bits=1.5, signed=False, rounding="stochastic"),
    ),
    "nearest2": (MU, NU),
    "blockwise8": (lowbit.codecs.blockwise8(True), lowbit.codecs.blockwise8(False)),
    "blockwise4": (lowbit.codecs.blockwise4(True), lowbit.codecs.blockwise4(False)),
    "piquant": (lowbit.codecs.piquant(), lowbit.codecs.piquant(signed=False)),
    "piquant-paper": (
        lowbit.codecs.piquant("paper"),
        lowbit.codecs.piquant("paper", signed=False),
    ),
}


def _random_state(key, shape, mc=MU, nc=NU):
    """Random, non-zero existing moments (encoded) and a fresh gradient."""
    k1, k2, k3 = jax.random.split(key, 3)
    m = 0.1 * jax.random.normal(k1, shape)
    v = 0.01 * jnp.square(jax.random.normal(k2, shape)) + 1e-6
    g = jax.random.normal(k3, shape)
    return g, mc.encode(m), nc.encode(v)


def _hp(count=3, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0):
    count = jnp.asarray(count, jnp.int32)
    return kadam.make_hp(b1, b2, eps, eps_root, 1 - b1**count, 1 - b2**count)


def _poison(packed):
    """A state of the same layout: every code byte 0xAB, every scale 7."""
    return lowbit.codecs.Packed(
        codes=jnp.full_like(packed.codes, 0xAB),
        scales=jnp.full_like(packed.scales, 7.0),
        shape=packed.shape,
        codec=packed.codec,
    )


def _code_mismatch(a, b):
    return float(np.mean(np.asarray(a.codes) != np.asarray(b.codes)))


def _assert_faults_match(kernel, reference, g):
    """Faulty gradients: the kernel's state equals the reference's bit for bit.

    ``kernel`` and ``reference`` map a gradient to ``(out, mu, nu)``; ``g``
    gets NaN, ±inf, huge (1e30, float32's max) and tiny (1e-30) elements, some
    sharing a group. Both paths run `kadam.moment_step` (the fault rule), so
    the state stays finite and the output is non-finite at the same places.
    """
    flat = np.asarray(g, np.float32).reshape(-1).copy()
    where = [0, 1, 7, 33, 64, 65, 300, 301, 302, flat.size - 1]
    big = float(np.finfo(np.float32).max)
    flat[where] = [np.nan, np.inf, -np.inf, 1e30, -big, 1e-30, np.nan, big, 3e19, -1e25]
    bad = jnp.asarray(flat.reshape(g.shape), g.dtype)
    out, m, v = kernel(bad)
    out_ref, m_ref, v_ref = reference(bad)
    chex.assert_trees_all_equal((m, v), (m_ref, v_ref))
    chex.assert_tree_all_finite((m.scales, v.scales))
    np.testing.assert_array_equal(np.isfinite(out), np.isfinite(out_ref))
    ok = np.isfinite(np.asarray(out_ref))
    assert not ok.reshape(-1)[[0, 1, 7, 300]].any()  # the NaN and inf elements
    np.testing.assert_allclose(
        np.asarray(out)[ok], np.asarray(out_ref)[ok], rtol=1e-5, atol=1e-6
    )


@functools.partial(jax.jit, static_argnames=("block_groups", "mc", "nc"))
def _kernel(g, mu, nu, hp, block_groups=256, mc=MU, nc=NU, seeds=None, params=None):
    return kadam.adam_update(
        g,
        mu,
        nu,
        hp,
        mu_codec=mc,
        nu_codec=nc,
        block_groups=block_groups,
        seeds=seeds,
        params=params,
    )


@functools.partial(jax.jit, static_argnames=("mc", "nc"))
def _reference(g, mu, nu, hp, mc=MU, nc=NU, seeds=None, params=None):
    return kadam.adam_update_reference(
        g, mu, nu, hp, mu_codec=mc, nu_codec=nc, seeds=seeds, params=params
    )


@pytest.mark.parametrize(
    "shape",
    [(256, 128), (3, 5, 200), (37,)],
)
def test_kernel_matches_reference(shape):
    g, mu, nu = _random_state(jax.random.key(sum(shape) + len(shape)), shape)
    hp = _hp()
    u_ref, m_ref, v_ref = _reference(g, mu, nu, hp)
    u, m, v = _kernel(g, mu, nu, hp)
    chex.assert_trees_all_equal_shapes_and_dtypes((u, m, v), (u_ref, m_ref, v_ref))
    chex.assert_tree_all_finite(u)
    np.testing.assert_allclose(u, u_ref, rtol=1e-5, atol=1e-6)
    # codes identical (one float tie may flip a code: allow 0.1%, measured 0)
    assert _code_mismatch(m, m_ref) <= 1e-3
    assert _code_mismatch(v, v_ref) <= 1e-3
    np.testing.assert_array_equal(m.scales, m_ref.scales)
    np.testing.assert_array_equal(v.scales, v_ref.scales)


@pytest.mark.parametrize("variant", ["sr2", "sr1.5"])
@pytest.mark.parametrize("apply", [False, True])
def test_stochastic_kernel_draws_the_reference_bits(variant, apply):
    """SR codes equal the jnp path's for the same seeds (1.5 bits: two planes);
    a partial last block (60 groups, blocks of 32) is masked, not padded."""
    mc, nc = VARIANTS[variant]
    shape = (3, 5, 200)
    key = jax.random.key(11 + apply)
    g, mu, nu = _random_state(key, shape, mc, nc)
    params = jax.random.normal(jax.random.fold_in(key, 1), shape) if apply else None
    hp = kadam.make_hp(
        0.9, 0.999, 1e-8, 0.0, 0.271, 0.003, learning_rate=1e-2, weight_decay=0.1
    )
    seeds = (jnp.uint32(5), jnp.uint32(6))
    kw = dict(mc=mc, nc=nc, seeds=seeds, params=params)
    out_ref, m_ref, v_ref = _reference(g, mu, nu, hp, **kw)
    out, m, v = _kernel(g, mu, nu, hp, block_groups=32, **kw)
    np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_equal((m, v), (m_ref, v_ref))
    # another stream gives other codes (the seeds reach the kernel)
    _, m2, _ = _kernel(g, mu, nu, hp, block_groups=32, **{**kw, "seeds": (7, 6)})
    assert _code_mismatch(m2, m) > 0.05
    _assert_faults_match(
        lambda x: _kernel(x, mu, nu, hp, block_groups=32, **kw),
        lambda x: _reference(x, mu, nu, hp, **kw),
        g,
    )


@pytest.mark.parametrize("variant", ["blockwise8", "blockwise4"])
@pytest.mark.parametrize("apply", [False, True])
def test_blockwise_kernel_equals_reference(variant, apply):
    """The 8/4-bit baselines' kernels: the map and its search table are inputs
    read by gathered loads; codes and scales equal the jnp path's."""
    mc, nc = VARIANTS[variant]
    shape = (3, 5, 200)  # 1000-element rows: a partial block at the end
    key = jax.random.key(21 + apply)
    g, mu, nu = _random_state(key, shape, mc, nc)
    params = jax.random.normal(jax.random.fold_in(key, 1), shape) if apply else None
    hp = kadam.make_hp(
        0.9, 0.999, 1e-8, 0.0, 0.271, 0.003, learning_rate=1e-2, weight_decay=0.1
    )
    kw = dict(mc=mc, nc=nc, params=params)
    out_ref, m_ref, v_ref = _reference(g, mu, nu, hp, **kw)
    out, m, v = _kernel(g, mu, nu, hp, block_groups=8, **kw)
    np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_equal((m, v), (m_ref, v_ref))
    _assert_faults_match(
        lambda x: _kernel(x, mu, nu, hp, block_groups=8, **kw),
        lambda x: _reference(x, mu, nu, hp, **kw),
        g,
    )


# Each encoder and each form (update or applied step) runs in the first CI step;
# the two other combinations in the slow one (interpreted π-Quant kernels take
# 5-12 s each on a CPU).
@pytest.mark.parametrize(
    "variant, apply",
    [
        ("piquant", False),
        ("piquant-paper", True),
        pytest.param("piquant", True, marks=pytest.mark.slow),
        pytest.param("piquant-paper", False, marks=pytest.mark.slow),
    ],
)
def test_piquant_kernel_equals_reference(variant, apply):
    """π-Quant: 96-element superblocks held as six 16-wide parts (gathered
    loads), three scales per superblock, the nearest-codeword search a loop
    over the codebook read from its table inputs; codes equal the jnp path's.
    Rows of 1000 elements (11 superblocks, the last one padded) and blocks of
    8 superblocks (a partial last block)."""
    mc, nc = VARIANTS[variant]
    shape = (3, 5, 1000)
    key = jax.random.key(31 + apply)
    g, mu, nu = _random_state(key, shape, mc, nc)
    params = jax.random.normal(jax.random.fold_in(key, 1), shape) if apply else None
    hp = kadam.make_hp(
        0.9, 0.999, 1e-8, 0.0, 0.271, 0.003, learning_rate=1e-2, weight_decay=0.1
    )
    kw = dict(mc=mc, nc=nc, params=params)
    out_ref, m_ref, v_ref = _reference(g, mu, nu, hp, **kw)
    out, m, v = _kernel(g, mu, nu, hp, block_groups=8, **kw)
    np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_equal((m, v), (m_ref, v_ref))
    _assert_faults_match(
        lambda x: _kernel(x, mu, nu, hp, block_groups=8, **kw),
        lambda x: _reference(x, mu, nu, hp, **kw),
        g,
    )
    # poisoned state: with b1 = b2 = 0 the new state is g's (to rounding:
    # m + (g - m)), far from the poison wherever an output was written
    hp0 = kadam.make_hp(0.0, 0.0, 1e-8, 0.0, 1.0, 1.0)
    mp, vp = _poison(mu), _poison(nu)
    _, m0, v0 = _kernel(g, mp, vp, hp0, block_groups=8, mc=mc, nc=nc)
    _, m1, v1 = _reference(g, mp, vp, hp0, mc=mc, nc=nc)
    chex.assert_trees_all_equal((m0, v0), (m1, v1))


def test_unsupported_codec_is_a_clear_error():
    g, mu, nu = _random_state(jax.random.key(0), (64,))
    wide = lowbit.codecs.blockwise8(True, block_size=512)
    with pytest.raises(ValueError, match=r"mu_codec=.*has no fused kernel"):
        kadam.adam_update(g, mu, nu, _hp(), mu_codec=wide, nu_codec=NU)
    pq = lowbit.codecs.piquant()
    with pytest.raises(ValueError, match="group sizes differ"):
        kadam.adam_update(g, mu, nu, _hp(), mu_codec=pq, nu_codec=NU)
    with pytest.raises(ValueError, match="params has shape"):
        kadam.adam_update(
            g, mu, nu, _hp(), mu_codec=MU, nu_codec=NU, params=jnp.zeros((3,))
        )


def test_a_pair_whose_groups_differ_has_no_kernel():
    """π-Quant's preset (``m`` in superblocks of 96 beside a 4-bit ``v`` in
    groups of 128) has no kernel: its leaves step through the jnp path (no
    launch), and the kernel asked for the pair says why, naming both codecs
    (v42's joint rows were removed in v45)."""
    mu_codec, nu_codec = adam_presets.piquant_codecs("nearest")
    assert kadam.kernel_codecs(mu_codec, nu_codec) is None
    polar = adam_presets.polar_codecs(2, "stochastic")
    assert kadam.kernel_codecs(*polar) == tuple(polar)
    params = {"w": jax.random.normal(jax.random.key(0), (4, 768))}
    tx = lowbit.adamw_piquant(1e-2, impl="pallas", policy=lambda path, x: True)
    jaxpr = str(jax.make_jaxpr(tx.update)(params, tx.init(params), params))
    assert "pallas_call" not in jaxpr
    g, mu, nu = _random_state(jax.random.key(1), (4, 768), mu_codec, nu_codec)
    with pytest.raises(ValueError, match="group sizes differ") as err:
        kadam.adam_update(
            g, mu, nu, _hp(), mu_codec=mu_codec, nu_codec=nu_codec, impl="pallas"
        )
    message = str(err.value)
    assert repr(mu_codec) in message and repr(nu_codec) in message
    assert "no fused kernel takes such a pair" in message


def test_every_output_written():
    """Poisoned outputs (aliased state buffers) are all overwritten."""
    shape = (256, 128)  # the shape of the first case: no new compile
    g, mu, nu = _random_state(jax.random.key(1), shape)
    # count=1 with b1 = b2 = 0 makes the new state g's (to rounding: m + (g -
    # m)), far from the poison, so an output left unwritten shows; the
    # reference steps the same poisoned state.
    hp0 = kadam.make_hp(0.0, 0.0, 1e-8, 0.0, 1.0, 1.0)
    u, m, v = _kernel(g, _poison(mu), _poison(nu), hp0)
    u0, m0, v0 = _reference(g, _poison(mu), _poison(nu), hp0)
    chex.assert_tree_all_finite((u, m.scales, v.scales))
    np.testing.assert_array_equal(m.codes, m0.codes)
    np.testing.assert_array_equal(v.codes, v0.codes)
    np.testing.assert_allclose(u, u0, rtol=1e-6)


def test_partial_last_block():
    """A group count the block does not divide: the last block is masked."""
    shape = (3, 65 * 64)  # 195 groups
    g, mu, nu = _random_state(jax.random.key(2), shape)
    hp = _hp()
    u_ref, m_ref, v_ref = _reference(g, mu, nu, hp)
    u, m, v = _kernel(g, mu, nu, hp, block_groups=32)
    np.testing.assert_allclose(u, u_ref, rtol=1e-5, atol=1e-6)
    assert _code_mismatch(m, m_ref) <= 1e-3
    assert _code_mismatch(v, v_ref) <= 1e-3


def test_traced_hyperparameters():
    """hp as jit arguments (schedules, inject_hyperparams): one compile."""
    shape = (256, 128)
    g, mu, nu = _random_state(jax.random.key(3), shape)
    for lr_like in (0.8, 0.95):
        hp = _hp(count=5, b1=lr_like)
        u_ref, m_ref, _ = _reference(g, mu, nu, hp)
        u, m, _ = _kernel(g, mu, nu, hp)
        np.testing.assert_allclose(u, u_ref, rtol=1e-5, atol=1e-6)
        assert _code_mismatch(m, m_ref) <= 1e-3


@pytest.mark.parametrize("bits", [2, 1.5])
def test_transform_pallas_equals_jnp_over_steps(bits):
    """The default (stochastic rounding) transform: the same state bit for bit."""
    params = {"b": jnp.zeros((192,)), "x": jnp.zeros((2, 3, 100))}
    policy = lambda path, leaf: leaf.size >= 64  # noqa: E731
    tx_p = lowbit.scale_by_adam_polar(bits=bits, impl="pallas", policy=policy)
    tx_j = lowbit.scale_by_adam_polar(bits=bits, impl="jnp", policy=policy)
    sp, sj = tx_p.init(params), tx_j.init(params)
    key = jax.random.key(4)
    up_p, up_j = jax.jit(tx_p.update), jax.jit(tx_j.update)
    for _ in range(5):
        key, sub = jax.random.split(key)
        leaves, tdef = jax.tree.flatten(params)
        keys = jax.random.split(sub, len(leaves))
        grads = tdef.unflatten(
            [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
        )
        up, sp = up_p(grads, sp)
        uj, sj = up_j(grads, sj)
        chex.assert_trees_all_close(up, uj, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_equal_shapes_and_dtypes(sp, sj)
    chex.assert_trees_all_equal(sp, sj)


def test_pallas_inject_hyperparams_and_fallback_codec():
    """inject_hyperparams passes traced b1; a codec without a kernel uses jnp."""
    params = {"w": jnp.zeros((64, 128))}
    grads = {"w": jax.random.normal(jax.random.key(5), (64, 128))}
    make = lambda b1, impl: lowbit.scale_by_adam_polar(b1=b1, impl=impl)  # noqa: E731
    tx_p = optax.inject_hyperparams(make, static_args=("impl",))(0.8, "pallas")
    tx_j = optax.inject_hyperparams(make, static_args=("impl",))(0.8, "jnp")
    up, _ = jax.jit(tx_p.update)(grads, tx_p.init(params))
    uj, _ = jax.jit(tx_j.update)(grads, tx_j.init(params))
    chex.assert_trees_all_close(up, uj, rtol=1e-5, atol=1e-6)
    # a leaf whose shape the kernel cannot shard (last axis sharded) or a
    # codec without a kernel keeps the jnp path; π-Quant has one
    tx8 = lowbit.scale_by_adam_piquant(impl="pallas")
    tx8j = lowbit.scale_by_adam_piquant(impl="jnp")
    a, sa = jax.jit(tx8.update)(grads, tx8.init(params))
    b, sb = jax.jit(tx8j.update)(grads, tx8j.init(params))
    chex.assert_trees_all_equal(sa, sb)
    chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-6)


# ~30 s on a 2-core CPU (several multi-leaf interpret-mode kernels compiled):
# slow, CI's second step (OPTAX_LOWBIT_SLOW=1) runs it.
@pytest.mark.slow
def test_many_leaves_in_one_launch_equal_one_by_one(monkeypatch):
    """Leaves of one shape share a launch (at most LEAVES_PER_LAUNCH = 2: the
    three (5, 200) leaves take two launches): the same state as the jnp path
    (and so as one launch per leaf), chain and fused."""
    monkeypatch.setattr(kadam, "LEAVES_PER_LAUNCH", 2)
    params = {
        "a": jnp.zeros((5, 200)),  # 20 groups: a partial block
        "a2": jnp.zeros((5, 200)),
        "a3": jnp.zeros((5, 200)),
        "b": jnp.zeros((64, 128)),
        "b2": jnp.zeros((64, 128)),
        "c": jnp.zeros((3, 4, 64)),
        "d": jnp.zeros((7,)),  # plain float moments
    }
    grads = jax.tree.map(
        lambda x: jax.random.normal(jax.random.key(x.size), x.shape), params
    )
    policy = lambda path, leaf: leaf.size >= 64  # noqa: E731
    for bits in (2, 1.5):
        tx_p = lowbit.adamw_polar(1e-2, bits=bits, impl="pallas", policy=policy)
        tx_j = lowbit.adamw_polar(1e-2, bits=bits, impl="jnp", policy=policy)
        up, sp = jax.jit(tx_p.update)(grads, tx_p.init(params), params)
        uj, sj = jax.jit(tx_j.update)(grads, tx_j.init(params), params)
        chex.assert_trees_all_equal(sp, sj)
        chex.assert_trees_all_close(up, uj, rtol=1e-5, atol=1e-6)
    opt = lowbit.fused_adamw_polar(1e-2, impl="pallas", policy=policy)
    p2, s2 = jax.jit(opt.step)(grads, opt.init(params), params)
    u, s3 = jax.jit(opt.tx.update)(grads, opt.tx.init(params), params)
    chex.assert_trees_all_equal(s2, s3)
    chex.assert_trees_all_close(p2, optax.apply_updates(params, u), atol=1e-6)
