"""Joint kernel rows: π-Quant's m (96) and its 128-element v in one fused step.

`optax_lowbit.kernels.joint` holds a 4-bit blockwise group as π-Quant holds a
superblock (`Blocks32`) and ``k`` groups as one row (`Rows`); the kernel
then steps the π-Quant preset's pair on leaves whose last axis is a multiple
of 384. These tests hold the parts to the codecs' whole groups, the
interpreted kernel to the jnp path, and the preset's transform to its jnp
path with the kernel in its program.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import optax_lowbit as lowbit
from optax_lowbit.codecs import base
from optax_lowbit.kernels import adam as kadam
from optax_lowbit.kernels import codec_ops, joint
from optax_lowbit.transforms import adam_presets

MU, NU = adam_presets.piquant_codecs("nearest")


@pytest.fixture(autouse=True)
def _joint_rows(monkeypatch):
    """Joint rows on (`kadam.JOINT_ROWS`, off by default: slower than the XLA
    step on an H100, NOTES_kernels.md v42); `test_joint_rows_are_off_by_default`
    turns them off again."""
    monkeypatch.setattr(kadam, "JOINT_ROWS", 1)


def _rows(seed, n, size, spread=3.0):
    """Fresh groups over many magnitudes, a zero row and a half-zero row."""
    key = jax.random.key(seed)
    x = jax.random.normal(key, (n, size)) * jnp.exp(
        spread * jax.random.normal(jax.random.fold_in(key, 1), (n, 1))
    )
    return x.at[0].set(0.0).at[1, : size // 3].set(0.0)


def _parts(x, codec):
    """``x``'s columns as the kernel holds them (`codec_ops.columns`)."""
    return [x[:, s : s + d * n : d] for s, d, n in codec_ops.columns(codec)]


def _bytes(pieces, codec, nbytes):
    """Rows' code bytes from the pieces a kernel stores, at the kernel's own
    offsets (`codec_ops.Codes`, `codec_ops.group_rows`)."""
    n = pieces[0].shape[0]
    rows, _ = codec_ops.group_rows(codec, jnp.arange(n, dtype=jnp.int32))
    flat = np.zeros(n * nbytes, np.uint8)
    for at, piece in zip(codec_ops.Codes(codec).offsets(rows), pieces, strict=True):
        flat[np.asarray(at)] = np.asarray(piece)
    return flat.reshape(n, nbytes)


def test_the_piquant_pair_takes_joint_rows():
    mu, nu = joint.kernel_codecs(MU, NU)
    assert (mu.group_size, nu.group_size) == (384, 384)
    assert codec_ops.columns(mu) == codec_ops.columns(nu)
    assert len(codec_ops.columns(mu)) == 24
    codec_ops.check_codecs(mu, nu)  # the launch's own check
    # unsharded leaves of any shape (a padded last axis included)
    for shape in ((4, 768), (3072,), (4, 1000), (16384, 16384)):
        assert joint.leaf_fits(jax.ShapeDtypeStruct(shape, jnp.float32), MU, NU)
    # a pair of equal groups is stepped as it is
    polar = adam_presets.polar_codecs(2, "stochastic")
    assert joint.kernel_codecs(*polar) == tuple(polar)
    # the polar preset's v (4-bit, 64) beside π-Quant: rows of 192
    assert [c.group_size for c in joint.kernel_codecs(MU, polar[1])] == [192, 192]
    # halves of a polar group cannot share a row with 32-blocks (π-Quant's)
    assert joint.kernel_codecs(polar[0], NU) is None
    assert joint.kernel_codecs(MU, lowbit.codecs.blockwise8(False)) is None
    with pytest.raises(ValueError, match="Blocks32 takes a 4-bit"):
        joint.Blocks32(lowbit.codecs.blockwise8(False))


# Opt-in like the kernel checks below (~23 CPU-s in the first step): slow step.
@pytest.mark.slow
@given(seed=st.integers(0, 2**31 - 1), stream=st.integers(0, 2**32 - 1))
def test_rows_encode_and_decode_as_whole_groups(seed, stream):
    """Rows of 384 held in 24 strided parts: the same codes, scales, values and
    stochastic words as the codecs' own encode of 4 superblocks / 3 groups."""
    xs = _rows(seed, 6, 384)
    rows = joint.kernel_codecs(MU, NU)
    tables = {c: [jnp.asarray(t) for t in c.kernel_tables()] for c in rows}
    row_seed = base.stream_seed(stream)
    grow = jnp.arange(2, 8, dtype=jnp.uint32)[:, None]  # rows 2..7 of a leaf
    for codec, inner in zip(tables, (MU, NU), strict=True):
        x = xs if inner.signed else jnp.abs(xs)
        noise = codec_ops.noise(codec, grow, row_seed) if codec.stochastic else None
        pieces, scales = codec.kernel_encode(_parts(x, codec), tables[codec], noise)
        # the codec on the same groups, at their places in a leaf of 8 rows
        whole = jnp.zeros((8, 384)).at[2:].set(x).reshape(8 * codec.k, -1)
        if inner.stochastic:
            want, want_scales = inner.encode_groups(whole, seed=row_seed)
        else:
            want, want_scales = inner.encode_groups(whole)
        want = np.asarray(want).reshape(8, -1)[2:]
        want_scales = np.asarray(want_scales).reshape(8, -1)[2:]
        nbytes = codec.k * inner.bytes_per_group
        np.testing.assert_array_equal(_bytes(pieces, codec, nbytes), want)
        np.testing.assert_array_equal(np.concatenate(scales, -1), want_scales)
        decoded = codec.kernel_decode(pieces, scales, tables[codec])
        got = np.zeros((6, 384), np.float32)
        for (s, d, n), part in zip(codec_ops.columns(codec), decoded, strict=True):
            got[:, s : s + d * n : d] = np.asarray(part)
        codes = jnp.asarray(want).reshape(6 * codec.k, -1)
        scl = jnp.asarray(want_scales).reshape(6 * codec.k, -1)
        np.testing.assert_array_equal(
            got, np.asarray(inner.decode_groups(codes, scl)).reshape(6, 384)
        )


def _state(key, shape, mu_codec=MU, nu_codec=NU):
    k1, k2, k3 = jax.random.split(key, 3)
    m = 0.1 * jax.random.normal(k1, shape)
    v = 0.01 * jnp.square(jax.random.normal(k2, shape)) + 1e-6
    return jax.random.normal(k3, shape), mu_codec.encode(m), nu_codec.encode(v, seed=5)


def _assert_kernel_equals_jnp(shapes, mu_codec=MU, nu_codec=NU):
    """Fresh leaves of ``shapes`` (the first with NaN, inf and huge gradients)
    in one interpreted call (blocks of 2 groups), with and without the fused
    apply, against the jnp definition: codes and scales bit for bit."""
    hp = kadam.make_hp(
        0.9, 0.999, 1e-8, 0.0, 0.271, 0.003, learning_rate=1e-2, weight_decay=0.1
    )
    leaves = [
        _state(jax.random.key(i), s, mu_codec, nu_codec) for i, s in enumerate(shapes)
    ]
    gs, mus, nus = (list(x) for x in zip(*leaves, strict=True))
    flat = np.asarray(gs[0]).reshape(-1).copy()
    flat[[0, 7, 300, 301]] = [np.nan, np.inf, -1e30, 1e-30]
    gs[0] = jnp.asarray(flat.reshape(shapes[0]))
    seeds = np.arange(3, 3 + 2 * len(shapes), dtype=np.uint32).reshape(-1, 2)
    for params in (None, [jax.random.normal(jax.random.key(9), s) for s in shapes]):
        got = kadam.adam_update_many(
            gs,
            mus,
            nus,
            [hp] * len(shapes),
            mu_codec=mu_codec,
            nu_codec=nu_codec,
            seeds=seeds,
            params=params,
            block_groups=2,
        )
        for k in range(len(shapes)):
            want = kadam.adam_update_reference(
                gs[k],
                mus[k],
                nus[k],
                hp,
                mu_codec=mu_codec,
                nu_codec=nu_codec,
                seeds=tuple(seeds[k]),
                params=None if params is None else params[k],
            )
            chex.assert_trees_all_equal(got[k][1:], want[1:])
            out, ref = np.asarray(got[k][0]), np.asarray(want[0])
            np.testing.assert_array_equal(np.isfinite(out), np.isfinite(ref))
            ok = np.isfinite(ref)
            np.testing.assert_allclose(out[ok], ref[ok], rtol=1e-5, atol=1e-6)


# The joint rows are opt-in (`kadam.JOINT_ROWS`): their interpreted kernel
# checks (~100 CPU-s) run in CI's slow step, keeping the first under its limit.
@pytest.mark.slow
@pytest.mark.parametrize(
    "shapes",
    [
        pytest.param([(5, 768), (2, 3, 1152)], id="whole-rows"),
        # last axes that pad the kernel's rows: π-Quant pads 1000 to 1056 and
        # 4096 to 4128, v 1000 to 1024; a leaf shorter than one joint row
        pytest.param([(3, 1000), (2, 4096), (200,)], id="padded-rows"),
    ],
)
def test_joint_kernel_equals_the_jnp_step(shapes):
    """The interpreted kernel against the jnp definition: leaves in one call
    (blocks of 2 rows, a partial last block), with and without the fused
    apply, and faulty gradients. Compiled without XLA's optimizations: with
    them the CPU interpreter's kernel was seen to contract ``v + (1 - b2)(g g
    - v)`` into one fused multiply-add on one shape (a group maximum 1 ulp
    apart; `rules`' note)."""
    _assert_kernel_equals_jnp(shapes)


@pytest.mark.slow
# an fp32 second moment held to the jnp path's bits: XLA:CPU's elemental
# emitters round ``v + (1 - b2)(g g - v)`` 1 ulp apart in one program only
# (tests/conftest.py)
@pytest.mark.fusion_emitters
def test_piquant_preset_steps_its_quantized_leaves_in_the_kernel():
    """`adamw_piquant` with ``impl="pallas"``: the quantized leaves (768, 2304
    and a padded 1000) take the joint kernel (its launch is in the step's
    program), the float bias of 10 the jnp path; three steps equal
    ``impl="jnp"``'s. (The fused step's apply in the kernel is held to the jnp
    definition by `test_joint_kernel_equals_the_jnp_step`.)"""
    key = jax.random.key(3)
    shapes = {"a": (4, 768), "b": (2304,), "c": (3, 1000), "bias": (10,)}
    params = {
        k: jax.random.normal(jax.random.fold_in(key, i), s)
        for i, (k, s) in enumerate(shapes.items())
    }
    policy = dict(policy=lambda path, x: x.size >= 1000)
    row = joint.kernel_codecs(MU, NU)[0]
    assert row.name.endswith("-x4")
    grads = jax.tree.map(lambda p: jnp.sin(3.0 * p) + 0.1 * p, params)
    kernel = lowbit.adamw_piquant(1e-2, impl="pallas", **policy)
    ref = lowbit.adamw_piquant(1e-2, impl="jnp", **policy)
    jaxpr = str(jax.make_jaxpr(kernel.update)(grads, kernel.init(params), params))
    assert f"name=adam_{row.name}" in jaxpr  # the joint rows' launch
    s1, s2 = kernel.init(params), ref.init(params)
    for step in range(3):
        g = jax.tree.map(lambda x, s=step: x * (1.0 + s), grads)
        u1, s1 = jax.jit(kernel.update)(g, s1, params)
        u2, s2 = jax.jit(ref.update)(g, s2, params)
        chex.assert_trees_all_equal(s1, s2)
        chex.assert_trees_all_close(u1, u2, rtol=1e-5, atol=1e-6)


def test_joint_rows_are_off_by_default(monkeypatch):
    """Without `kadam.JOINT_ROWS` the preset's leaves step through the jnp path
    (no launch), and the kernel asked for the pair says how to turn them on."""
    monkeypatch.setattr(kadam, "JOINT_ROWS", 0)
    assert kadam.kernel_codecs(MU, NU) is None
    polar = adam_presets.polar_codecs(2, "stochastic")
    assert kadam.kernel_codecs(*polar) == tuple(polar)
    params = {"w": jax.random.normal(jax.random.key(0), (4, 768))}
    tx = lowbit.adamw_piquant(1e-2, impl="pallas", policy=lambda path, x: True)
    jaxpr = str(jax.make_jaxpr(tx.update)(params, tx.init(params), params))
    assert "pallas_call" not in jaxpr
    g, mu, nu = _state(jax.random.key(1), (4, 768))
    hp = kadam.make_hp(0.9, 0.999, 1e-8, 0.0, 0.1, 0.001)
    with pytest.raises(ValueError, match="JOINT_ROWS = 1"):
        kadam.adam_update(g, mu, nu, hp, mu_codec=MU, nu_codec=NU, impl="pallas")


POLAR2 = adam_presets.polar_codecs(2, "stochastic")


def test_quarters_only_where_asked_and_where_they_fit(monkeypatch):
    """`kadam.QUARTERS` (off by default) holds the polar 2-bit pair in quarters;
    other pairs keep theirs; a bad setting and a codec the hold cannot take
    are refused, naming them."""
    monkeypatch.setattr(kadam, "QUARTERS", 0)
    assert kadam.kernel_codecs(*POLAR2) == tuple(POLAR2)
    monkeypatch.setattr(kadam, "QUARTERS", 1)
    mu, nu = kadam.kernel_codecs(*POLAR2)
    assert isinstance(mu, joint.PolarQuarters) and mu.codec == POLAR2[0]
    assert isinstance(nu, joint.BlockwiseQuarters) and nu.codec == POLAR2[1]
    assert mu.name.endswith("-quarters") and codec_ops.has_kernel(mu)
    for pair in (
        adam_presets.polar_codecs(1.5, "stochastic"),  # 3-bit pair codes
        (lowbit.codecs.blockwise4(signed=True), lowbit.codecs.blockwise4()),
    ):
        assert kadam.kernel_codecs(*pair) == tuple(pair)
    with pytest.raises(ValueError, match="PolarQuarters takes a polar codec"):
        joint.PolarQuarters(adam_presets.polar_codecs(1.5, "stochastic")[0])
    monkeypatch.setattr(kadam, "QUARTERS", 2)
    with pytest.raises(ValueError, match="QUARTERS=2"):
        kadam.kernel_codecs(*POLAR2)


# Quarters are opt-in (`kadam.QUARTERS`, v44): their interpreted kernel check
# runs in CI's slow step, as the other opt-in kernel forms' do.
@pytest.mark.slow
def test_quarters_kernel_equals_the_jnp_step(monkeypatch):
    """The polar 2-bit pair held in quarters, interpreted, against the jnp
    definition: leaves in one call (a partial last block, a padded last
    axis), with and without the fused apply, and faulty gradients; codes and
    scales bit for bit. Unoptimized, as `test_joint_kernel_equals_the_jnp_step`."""
    monkeypatch.setattr(kadam, "QUARTERS", 1)
    _assert_kernel_equals_jnp([(5, 320), (3, 100)], *POLAR2)
