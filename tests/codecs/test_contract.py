"""The codec contract (DESIGN §3), checked on every codec the package ships.

Codec-specific behaviour (codebooks, error bounds, encoders) is tested in the
codec's own file; this file checks what every codec promises.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import optax_lowbit as lowbit
from optax_lowbit.codecs import base


def _all_codecs():
    c = lowbit.codecs
    return {
        "identity-f32": c.identity(jnp.float32),
        "identity-bf16": c.identity(jnp.bfloat16),
        "polar2-signed": c.polar(bits=2, signed=True),
        "polar2-unsigned": c.polar(bits=2, signed=False),
        "polar1.5-signed": c.polar(bits=1.5, signed=True),
        "polar1.5-unsigned": c.polar(bits=1.5, signed=False),
        "polar2-signed-sr": c.polar(bits=2, signed=True, rounding="stochastic"),
        "polar1.5-unsigned-sr": c.polar(bits=1.5, signed=False, rounding="stochastic"),
        "piquant-nearest-signed": c.piquant(encoder="nearest", signed=True),
        "piquant-nearest-unsigned": c.piquant(encoder="nearest", signed=False),
        "piquant-paper-signed": c.piquant(encoder="paper", signed=True),
        "blockwise8-signed": c.blockwise8(signed=True),
        "blockwise8-unsigned": c.blockwise8(signed=False),
        "blockwise4-signed": c.blockwise4(signed=True),
        "blockwise4-unsigned": c.blockwise4(signed=False),
    }


CODECS = _all_codecs()
QUANTIZED = {k: v for k, v in CODECS.items() if not k.startswith("identity")}
UNSIGNED = {k: v for k, v in CODECS.items() if k.endswith("unsigned")}
SHAPES = [(), (7,), (3, 5, 100), (2, 256), (4, 1, 96)]

# The all-in bits each codec is specified to store (issue 3), with bf16 scales
# for polar and π-Quant and fp32 scales for the 8- and 4-bit baselines.
EXPECTED_BITS = {
    "identity-f32": 32.0,
    "identity-bf16": 16.0,
    "polar2": 2.25,
    "polar1.5": 1.75,
    "piquant": 8 * (40 + 3 * 2) / 96,
    "blockwise8": 8.125,
    "blockwise4": 4.25,
}


def _data(key, shape, signed):
    x = jax.random.normal(key, shape, jnp.float32)
    return x if signed else x * x


def _signed(name):
    return not name.endswith("unsigned")


@pytest.mark.parametrize("name", CODECS)
def test_bits_per_element_is_the_all_in_figure(name):
    codec = CODECS[name]
    prefix = next(p for p in EXPECTED_BITS if name.startswith(p))
    assert codec.bits_per_element == pytest.approx(EXPECTED_BITS[prefix], abs=1e-9)
    # On a real aligned array the figure equals what is stored.
    shape = (3, 4 * max(codec.group_size, 1) * 2)
    packed = codec.encode(_data(jax.random.key(0), shape, _signed(name)))
    stored = 8 * (packed.codes.nbytes + packed.scales.nbytes) / math.prod(shape)
    assert stored == pytest.approx(codec.bits_per_element)
    assert packed.bits_per_element == pytest.approx(stored)


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("shape", SHAPES)
def test_zero_decodes_to_exact_zero(name, shape):
    codec = CODECS[name]
    out = codec.decode(codec.encode(jnp.zeros(shape, jnp.float32)))
    assert out.shape == shape and out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), 0.0)
    np.testing.assert_array_equal(np.asarray(codec.decode(codec.zeros(shape))), 0.0)


@pytest.mark.parametrize("name", QUANTIZED)
def test_zeros_repeat_one_encoded_zero_group(name):
    """`Codec.zeros` (an init's state): every group holds the codes and scales
    of one encoded zero group, in `packed_shapes`' layout; eager, under jit and
    under `jax.eval_shape` alike; `packed_shapes` (cached) equals a fresh
    trace of the encode."""
    codec = CODECS[name]
    shape = (3, 2 * codec.group_size + 5)  # a partial last group
    z = codec.zeros(shape)
    like = jax.eval_shape(lambda: codec.encode(jnp.zeros(shape, jnp.float32)))
    assert codec.packed_shapes(shape) == like
    assert z.codes.shape == like.codes.shape and z.codes.dtype == like.codes.dtype
    assert z.scales.shape == like.scales.shape
    assert z.scales.dtype == like.scales.dtype and z.shape == shape
    zero = jnp.zeros((1, codec.group_size), jnp.float32)
    kw = {"seed": base.stream_seed(0)} if codec.stochastic else {}
    zero_codes, zero_scales = codec.encode_groups(zero, **kw)
    codes = np.asarray(z.codes).reshape(-1, zero_codes.shape[-1])
    np.testing.assert_array_equal(
        codes, np.broadcast_to(np.asarray(zero_codes[0]), codes.shape)
    )
    scales = np.asarray(z.scales, np.float32).reshape(-1, zero_scales.shape[-1])
    want = np.asarray(zero_scales[0].astype(z.scales.dtype), np.float32)
    np.testing.assert_array_equal(scales, np.broadcast_to(want, scales.shape))
    jitted = jax.jit(lambda: codec.zeros(shape))()
    np.testing.assert_array_equal(np.asarray(jitted.codes), np.asarray(z.codes))
    np.testing.assert_array_equal(np.asarray(jitted.scales), np.asarray(z.scales))
    assert jax.eval_shape(lambda: codec.zeros(shape)) == like


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("shape", SHAPES)
def test_packed_shapes_are_the_encodes_layout(name, shape):
    """`packed_shapes` (traced nothing) is what `encode` makes, every codec."""
    codec = CODECS[name]
    like = jax.eval_shape(lambda: codec.encode(jnp.zeros(shape, jnp.float32)))
    assert codec.packed_shapes(shape) == like
    assert jax.eval_shape(lambda: codec.zeros(shape)) == like


@pytest.mark.parametrize("name", CODECS)
def test_zeros_many_is_zeros_of_each_shape_in_its_own_buffers(name):
    """`zeros_many` (an init's one program) equals `zeros` shape by shape, in
    order, and never hands two leaves one buffer (a state may be donated)."""
    codec = CODECS[name]
    shapes = [(3, 40), (7,), (3, 40), (), (2, 5, 33)]
    many = codec.zeros_many(shapes)
    assert [p.shape for p in many] == shapes
    for shape, got in zip(shapes, many, strict=True):
        want = codec.zeros(shape)
        for a, b in ((got.codes, want.codes), (got.scales, want.scales)):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    pointers = [
        x.unsafe_buffer_pointer() for p in many for x in (p.codes, p.scales) if x.size
    ]
    assert len(set(pointers)) == len(pointers)
    assert codec.zeros_many([]) == []
    with pytest.raises(ValueError, match="non-negative"):
        codec.zeros_many([(2, -1)])


@pytest.mark.parametrize("name", QUANTIZED)
@pytest.mark.parametrize("shape", SHAPES)
def test_layout_keeps_leading_axes(name, shape):
    codec = CODECS[name]
    packed = codec.encode(_data(jax.random.key(1), shape, _signed(name)))
    lead, _ = base.lead_and_last(shape)
    n = base.num_groups(shape, codec.group_size)
    assert packed.codes.dtype == jnp.uint8
    assert packed.codes.shape == (*lead, n, codec.bytes_per_group)
    assert packed.scales.shape == (*lead, n * codec.scales_per_group)
    assert packed.scales.dtype == jnp.dtype(codec.scale_dtype)
    assert packed.shape == shape and packed.codec == codec
    assert packed.codec_name == codec.name and packed.decode().shape == shape
    assert codec.decode(packed).shape == shape


@pytest.mark.parametrize("name", QUANTIZED)
@given(seed=st.integers(0, 2**31 - 1))
def test_any_code_bytes_decode_finite(name, seed):
    codec = CODECS[name]
    shapes = codec.packed_shapes((2, 3 * codec.group_size))
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, shapes.codes.shape, dtype=np.uint8)
    scales = np.abs(rng.standard_normal(shapes.scales.shape)) * 10.0 ** rng.integers(
        -30, 30
    )
    packed = base.Packed(
        codes=jnp.asarray(codes),
        scales=jnp.asarray(scales, shapes.scales.dtype),
        shape=shapes.shape,
        codec=shapes.codec,
    )
    out = np.asarray(codec.decode(packed))
    assert np.isfinite(out).all()
    if name in UNSIGNED:
        positive = np.repeat(
            np.asarray(packed.scales, np.float32) > 0,
            codec.group_size // codec.scales_per_group,
            axis=-1,
        )[..., : out.shape[-1]]
        assert (out[positive] > 0).all(), "unsigned codecs never decode to <= 0"


@pytest.mark.parametrize("name", QUANTIZED)
@pytest.mark.parametrize("exponent", [-30, -12, 0, 12, 30])
def test_extreme_magnitudes_are_finite_and_scale_equivariant(name, exponent):
    codec = CODECS[name]
    x = _data(jax.random.key(2), (4, 2 * codec.group_size), _signed(name))
    big = codec.decode(codec.encode(x * 10.0**exponent))
    assert np.isfinite(np.asarray(big)).all()
    # Scaling by a power of two scales the decoded values exactly the same way:
    # the codes only see x / scale.
    k = round(exponent * math.log2(10))
    ref = codec.decode(codec.encode(x)) * 2.0**k
    got = codec.decode(codec.encode(x * 2.0**k))
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", QUANTIZED)
def test_subnormal_input_gives_tiny_finite_output(name):
    codec = CODECS[name]
    x = _data(jax.random.key(3), (2, codec.group_size), _signed(name)) * 1e-39
    out = np.asarray(codec.decode(codec.encode(x)))
    assert np.isfinite(out).all()
    assert np.abs(out).max() <= 1e-37


@pytest.mark.parametrize("name", CODECS)
def test_jit_vmap_tree_map_and_eval_shape(name):
    codec = CODECS[name]
    shape = (3, 2 * max(codec.group_size, 8) + 5)
    x = _data(jax.random.key(4), shape, _signed(name))
    direct = codec.decode(codec.encode(x))

    jitted = jax.jit(lambda a: codec.decode(codec.encode(a)))(x)
    np.testing.assert_array_equal(np.asarray(jitted), np.asarray(direct))

    packed_rows = jax.vmap(codec.encode)(x)
    rows = jax.vmap(codec.decode)(packed_rows)
    if codec.stochastic:
        # Random bits are drawn by position in the encoded array: under vmap
        # each row is its own array, as if encoded alone.
        each = np.stack([np.asarray(codec.decode(codec.encode(r))) for r in x])
        np.testing.assert_array_equal(np.asarray(rows), each)
    else:
        np.testing.assert_array_equal(np.asarray(rows), np.asarray(direct))

    tree = {"a": x, "b": [x[:1], x[1:]]}
    packed_tree = jax.tree.map(codec.encode, tree)
    assert jax.tree.structure(packed_tree).num_leaves == 6
    back = jax.tree.map(
        codec.decode, packed_tree, is_leaf=lambda n: isinstance(n, base.Packed)
    )
    np.testing.assert_array_equal(np.asarray(back["a"]), np.asarray(direct))

    abstract = jax.eval_shape(codec.encode, jax.ShapeDtypeStruct(shape, jnp.float32))
    concrete = codec.encode(x)
    assert jax.tree.structure(abstract) == jax.tree.structure(concrete)
    for a, c in zip(jax.tree.leaves(abstract), jax.tree.leaves(concrete), strict=True):
        assert a.shape == c.shape and a.dtype == c.dtype


@pytest.mark.parametrize("name", ["identity-f32", "polar2-signed", "blockwise4-signed"])
@pytest.mark.parametrize(
    "bad", [np.arange(8, dtype=np.int32), np.ones(8, dtype=bool), [1.0, 2.0]]
)
def test_non_float_input_is_rejected(name, bad):
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        CODECS[name].encode(bad)


@pytest.mark.parametrize("name", QUANTIZED)
def test_decode_rejects_another_codecs_packed(name):
    codec = CODECS[name]
    other = CODECS["identity-f32"].encode(jnp.ones((4,)))
    with pytest.raises(ValueError, match="made by codec"):
        codec.decode(other)


@pytest.mark.parametrize("name", CODECS)
def test_codecs_are_hashable_static_config(name):
    codec = CODECS[name]
    assert hash(codec) == hash(_all_codecs()[name])
    assert codec == _all_codecs()[name]
