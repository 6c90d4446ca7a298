"""The codec contract's building blocks (optax_lowbit/codecs/base.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from optax_lowbit.codecs import base

# --- planar bit packing -------------------------------------------------------


@functools.cache
def _pack_unpack(bits, k):
    """``(pack, unpack)`` jitted for one width and group length: eager, each
    example dispatched (and compiled per shape) op by op."""
    pack = jax.jit(lambda v: base.pack_codes(v, bits))
    unpack = jax.jit(lambda b: base.unpack_codes(b, bits, k))
    return pack, unpack


@given(
    bits=st.integers(1, 8),
    k=st.sampled_from([8, 16, 64]),
    lead=st.sampled_from([(), (3,), (2, 5)]),
    seed=st.integers(0, 2**32 - 1),
)
def test_pack_unpack_round_trip(bits, k, lead, seed):
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 2**bits, (*lead, k), dtype=np.uint8)
    pack, unpack = _pack_unpack(bits, k)
    packed = pack(jnp.asarray(values))
    assert packed.dtype == jnp.uint8
    assert packed.shape == (*lead, base.packed_bytes(k, bits))
    assert base.packed_bytes(k, bits) == k * bits // 8  # no wasted byte
    out = unpack(packed)
    assert out.dtype == jnp.uint8
    np.testing.assert_array_equal(out, values)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_every_width_all_values(bits):
    # every code value at every position of a 64-value group, twice over
    values = (np.arange(128) % 2**bits).astype(np.uint8).reshape(2, 64)
    out = base.unpack_codes(base.pack_codes(jnp.asarray(values), bits), bits, 64)
    np.testing.assert_array_equal(out, values)


def test_pack_codes_planar_layout_4_and_2_bits():
    # value j of K sits in byte j % nbytes at bit offset (j // nbytes) * w
    v = np.arange(8, dtype=np.uint8)
    four = np.asarray(base.pack_codes(jnp.asarray(v), 4))
    np.testing.assert_array_equal(
        four, [0 | 4 << 4, 1 | 5 << 4, 2 | 6 << 4, 3 | 7 << 4]
    )
    v2 = np.array([1, 2, 3, 0, 3, 3, 1, 2], np.uint8)
    two = np.asarray(base.pack_codes(jnp.asarray(v2), 2))
    np.testing.assert_array_equal(
        two, [1 | 3 << 2 | 3 << 4 | 1 << 6, 2 | 0 << 2 | 3 << 4 | 2 << 6]
    )
    eight = base.pack_codes(jnp.asarray(v), 8)
    np.testing.assert_array_equal(eight, v)


def _planar_reference(values, bits):
    """The planar layout written out in NumPy: value ``j`` of a ``w``-bit plane
    of ``n`` bytes in byte ``j % n`` at bit ``(j // n) * w``, narrowest first."""
    k = values.shape[-1]
    planes, shift = [], 0
    for w in (1, 2, 4, 8):
        if not bits & w:
            continue
        field = (values.astype(np.int64) >> shift) & ((1 << w) - 1)
        shift += w
        n = k * w // 8
        byte = np.zeros((*values.shape[:-1], n), np.int64)
        for j in range(k):
            byte[..., j % n] |= field[..., j] << ((j // n) * w)
        planes.append(byte.astype(np.uint8))
    return planes


@given(
    bits=st.integers(1, 8),
    k=st.sampled_from([16, 32, 64, 96]),
    parts=st.sampled_from([1, 2, 4, 6]),
    kernel=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_pack_planes_as_parts_is_the_planar_layout(bits, k, parts, kernel, seed):
    # Packed by splits and joins (XLA) or, in a kernel, by folds and spreads
    # where a part holds several pieces of a byte: the bytes are the layout's
    # either way, and unpacking to parts inverts it.
    assume(k % parts == 0 and (k // parts) % 8 == 0)
    per_byte = [8 // w for w in (1, 2, 4, 8) if bits & w]
    assume(kernel or all(n % parts == 0 or parts % n == 0 for n in per_byte))
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 2**bits, (3, k), dtype=np.uint8)
    pieces = list(np.split(values, parts, axis=-1))
    planes = base.pack_planes([jnp.asarray(p) for p in pieces], bits, kernel=kernel)
    expected = _planar_reference(values, bits)
    assert len(planes) == len(expected)
    for got, want in zip(planes, expected, strict=True):
        assert got.dtype == jnp.uint8
        np.testing.assert_array_equal(got, want)
    back = base.unpack_planes(planes, bits, parts=parts, kernel=kernel)
    assert len(back) == parts
    for got, want in zip(back, pieces, strict=True):
        assert got.dtype == jnp.uint8
        np.testing.assert_array_equal(got, want)
    whole = base.unpack_planes(planes, bits, kernel=kernel)
    np.testing.assert_array_equal(whole, values)


def test_packed_bytes_values():
    assert base.packed_bytes(64, 1) == 8
    assert base.packed_bytes(64, 3) == 24  # 2-bit plane + 1-bit plane
    assert base.packed_bytes(64, 4) == 32
    assert base.packed_bytes(64, 7) == 56
    assert base.packed_bytes(64, 8) == 64
    assert base.packed_bytes(3, 4) == 2  # partial bytes round up


def test_pack_codes_rejects_partial_bytes():
    with pytest.raises(ValueError, match="do not fill whole bytes"):
        base.pack_codes(jnp.zeros((6,), jnp.uint8), 2)  # 6 x 2 bits: 1.5 bytes
    with pytest.raises(ValueError, match="do not fill whole bytes"):
        base.pack_codes(jnp.zeros((3,), jnp.uint8), 4)


# --- groups along the last axis -----------------------------------------------


@pytest.mark.parametrize(
    ("shape", "grouped"),
    [
        ((), (1, 8)),
        ((0,), (0, 8)),
        ((7,), (1, 8)),
        ((8,), (1, 8)),
        ((17,), (3, 8)),
        ((3, 0), (3, 0, 8)),
        ((2, 3, 9), (2, 3, 2, 8)),
    ],
)
def test_to_groups_from_groups_round_trip(shape, grouped):
    x = np.arange(1, 1 + int(np.prod(shape)), dtype=np.float32).reshape(shape)
    xg = base.to_groups(jnp.asarray(x), 8)
    assert xg.shape == grouped and xg.dtype == jnp.float32
    assert base.num_groups(shape, 8) == grouped[-2]
    # padding is zeros, data kept in order along the last axis
    flat = np.asarray(xg).reshape((*grouped[:-2], -1))
    last = shape[-1] if shape else 1
    np.testing.assert_array_equal(flat[..., last:], 0.0)
    back = base.from_groups(xg, shape)
    assert back.shape == shape
    np.testing.assert_array_equal(back, x)


def test_to_groups_casts_to_float32():
    xg = base.to_groups(jnp.ones((5,), jnp.bfloat16), 4)
    assert xg.dtype == jnp.float32 and xg.shape == (2, 4)


def test_lead_and_last():
    assert base.lead_and_last(()) == ((), 1)
    assert base.lead_and_last((4,)) == ((), 4)
    assert base.lead_and_last((2, 3, 4)) == ((2, 3), 4)


# --- scales -------------------------------------------------------------------


def test_safe_scale_float32_is_exact_and_zero_safe():
    absmax = jnp.array([0.0, 1e-30, 3.3, 7.0], jnp.float32)
    stored, divisor = base.safe_scale(absmax, jnp.float32)
    assert stored.dtype == jnp.float32
    np.testing.assert_array_equal(stored, absmax)
    np.testing.assert_array_equal(divisor, np.float32([1.0, 1e-30, 3.3, 7.0]))


def test_safe_scale_bfloat16_rounds_up():
    rng = np.random.default_rng(0)
    absmax = np.concatenate(
        [[0.0, 1.0, 1.00390625, 1.0039, 3.3], 10.0 ** rng.uniform(-20, 20, 200)]
    ).astype(np.float32)
    stored, divisor = base.safe_scale(jnp.asarray(absmax), jnp.bfloat16)
    assert stored.dtype == jnp.bfloat16
    s = np.asarray(stored.astype(jnp.float32))
    assert np.all(s >= absmax)  # never below: x / scale stays in [-1, 1]
    # and the smallest bf16 that is: one step down is below absmax
    down = np.asarray(
        jnp.nextafter(stored, jnp.asarray(-jnp.inf, jnp.bfloat16)).astype(jnp.float32)
    )
    assert np.all(down[absmax > 0] < absmax[absmax > 0])
    assert s[0] == 0.0 and divisor[0] == 1.0
    assert s[1] == 1.0 and s[2] == 1.0078125 and s[4] == 3.3125
    np.testing.assert_array_equal(np.asarray(divisor)[1:], s[1:])
    assert divisor.dtype == jnp.float32


# --- the Packed pytree --------------------------------------------------------


def _packed():
    return base.Packed(
        codes=jnp.arange(12, dtype=jnp.uint8).reshape(3, 1, 4),
        scales=jnp.array([1.0, 2.0, 3.0], jnp.float32),
        shape=(3, 7),
        codec="test-codec",
    )


def test_packed_is_pytree_with_static_metadata():
    p = _packed()
    leaves, treedef = jax.tree_util.tree_flatten(p)
    assert len(leaves) == 2
    assert {leaf.dtype for leaf in leaves} == {
        jnp.dtype(jnp.uint8),
        jnp.dtype(jnp.float32),
    }
    q = jax.tree_util.tree_unflatten(treedef, leaves)
    assert q.shape == (3, 7) and q.codec == "test-codec"
    # metadata is part of the treedef: a different codec is a different tree
    other = base.Packed(p.codes, p.scales, shape=(3, 7), codec="other")
    assert jax.tree_util.tree_structure(other) != treedef


def test_packed_survives_jit_tree_map_and_device_put():
    p = _packed()
    q = jax.jit(lambda x: x)(p)
    assert isinstance(q, base.Packed)
    assert q.shape == p.shape and q.codec == p.codec
    np.testing.assert_array_equal(q.codes, p.codes)
    np.testing.assert_array_equal(q.scales, p.scales)
    r = jax.device_put(p, jax.devices()[0])
    assert isinstance(r, base.Packed) and r.shape == (3, 7) and r.codec == "test-codec"
    s = jax.tree.map(lambda a: a + 1, p)
    assert s.codec == p.codec
    np.testing.assert_array_equal(s.scales, [2.0, 3.0, 4.0])
    shapes = jax.eval_shape(lambda: p)
    assert shapes.codes.shape == (3, 1, 4) and shapes.codec == "test-codec"


def test_packed_nbytes_and_bits_per_element():
    p = _packed()
    assert p.nbytes == 12 + 3 * 4
    assert p.bits_per_element == 8 * 24 / 21


# --- the Codec base class, through a tiny concrete codec ----------------------


class _Sign1Bit(base.Codec):
    """1 bit per element (the sign), one fp32 scale (max |x|) per 8."""

    group_size = 8

    @property
    def name(self):
        return "sign1"

    @property
    def bytes_per_group(self):
        return 1

    @property
    def scale_dtype(self):
        return jnp.float32

    def encode_groups(self, xg):
        scale = jnp.max(jnp.abs(xg), axis=-1, keepdims=True)
        return base.pack_codes((xg > 0).astype(jnp.uint8), 1), scale

    def decode_groups(self, codes, scales):
        bit = base.unpack_codes(codes, 1, 8).astype(jnp.float32)
        return (2 * bit - 1) * scales


def test_codec_base_encode_decode_shapes_and_checks():
    c = _Sign1Bit()
    assert c.bits_per_element == 8 * (1 + 4) / 8
    x = jnp.array([[1.0, -1.0, 2.0], [-3.0, 3.0, -3.0]])
    p = c.encode(x)
    assert p.codes.shape == (2, 1, 1) and p.scales.shape == (2, 1)
    np.testing.assert_allclose(c.decode(p), [[2.0, -2.0, 2.0], [-3.0, 3.0, -3.0]])
    with pytest.raises(TypeError, match="floating-point"):
        c.encode(jnp.array([1, 2], jnp.int32))
    with pytest.raises(TypeError, match="must be a Packed"):
        c.decode(x)
    with pytest.raises(ValueError, match="made by codec 'test-codec'"):
        c.decode(_packed())
    z = c.packed_shapes((5, 9))
    assert z.codes.shape == (5, 2, 1) and z.scales.shape == (5, 2)
    with pytest.raises(ValueError, match="non-negative"):
        c.zeros((-1,))


# --- hashing for stochastic rounding ------------------------------------------


@functools.cache
def _jit_stream_seed(salts):
    return jax.jit(lambda s: base.stream_seed(s, *salts))


@given(
    words=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=64),
    seed=st.integers(0, 2**32 - 1),
    salts=st.lists(st.integers(0, 2**40), max_size=3),
)
def test_hash32_numpy_equals_jax_and_stream_seed_traced_equals_eager(
    words, seed, salts
):
    """Integers are mixed in NumPy (no JAX op while tracing a step), arrays in
    JAX: the same bits; a traced step count draws the same stream seed."""
    x = np.asarray(words, np.uint32)
    in_jax = np.asarray(base.hash32(jnp.asarray(x)))
    np.testing.assert_array_equal(base.hash32(x), in_jax)
    assert int(base.hash32(words[0])) == int(base.hash32(jnp.uint32(words[0])))
    eager = base.stream_seed(seed, *salts)
    traced = _jit_stream_seed(tuple(salts))(jnp.uint32(seed))
    assert eager.dtype == traced.dtype == jnp.uint32
    assert int(eager) == int(traced)


@given(
    seed=st.integers(0, 2**31 - 1),
    leaves=st.lists(st.integers(0, 2**40), min_size=1, max_size=12),
    moments=st.integers(1, 3),
)
def test_stream_seed_over_arrays_is_each_stream(seed, leaves, moments):
    """Salts as arrays: every element the bits of its own scalar stream, the
    seed traced or not (the transforms form a step's streams this way)."""
    rows, cols = np.asarray(leaves)[:, None], np.arange(moments)
    table = base.stream_seed(seed, rows, cols)
    traced = jax.jit(lambda s: base.stream_seed(s, rows, cols))(jnp.int32(seed))
    assert table.shape == traced.shape == (len(leaves), moments)
    for i, leaf in enumerate(leaves):
        for j in range(moments):
            one = int(base.stream_seed(seed, leaf, j))
            assert int(table[i, j]) == int(traced[i, j]) == one


@functools.cache
def _jit_group_noise(shape):
    return jax.jit(lambda seed: base.group_noise(jnp.zeros(shape), seed))


@given(
    lead=st.sampled_from([(7,), (3, 5), (2, 3, 4)]),
    group=st.sampled_from([8, 64, 256]),
    seed=st.integers(0, 2**32 - 1),
)
def test_group_noise_is_a_function_of_the_group_index_and_seed(lead, group, seed):
    """A kernel that knows a group's row-major index draws the same words."""
    words = np.asarray(_jit_group_noise((*lead, group))(jnp.uint32(seed)))
    assert words.shape == (*lead, group // 2) and words.dtype == np.uint32
    index = np.arange(np.prod(lead), dtype=np.uint32).reshape(*lead, 1)
    one_by_one = base.dither_bits(jnp.asarray(index), group // 2, jnp.uint32(seed))
    np.testing.assert_array_equal(words, np.asarray(one_by_one))
    other = np.asarray(_jit_group_noise((*lead, group))(jnp.uint32(seed ^ 1)))
    assert (words != other).mean() > 0.99  # another stream, other words


@given(seed=st.integers(0, 2**32 - 1))
def test_dither_halves_are_uniform_and_uncorrelated(seed):
    """Each pair's two 16-bit halves are uniform and independent, and two
    streams (m and v of one step) are uncorrelated, at every pair position
    of a group: what unbiased stochastic rounding of each element needs."""
    n, half = 4096, 32
    group = jnp.arange(n, dtype=jnp.uint32)[:, None]
    seeds = base.stream_seed(seed, 0), base.stream_seed(seed, 1)
    (hi, lo), (hi2, _) = (
        [np.asarray(u) for u in base.uniform_pair(base.dither_bits(group, half, s))]
        for s in seeds
    )
    for u in (hi, lo):  # 4096 draws per column: sd of the mean 0.0045
        assert np.abs(u.mean(0) - 0.5).max() < 0.03
        assert np.abs(u.var(0) - 1 / 12).max() < 0.01
    for a, b in ((hi, lo), (hi, hi2)):  # sd of a correlation ~0.016
        r = [np.corrcoef(a[:, j], b[:, j])[0, 1] for j in range(half)]
        assert np.abs(r).max() < 0.08


@given(st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=64))
def test_unfused_moves_a_product_by_at_most_one_ulp_toward_zero(values):
    p = np.asarray(values, np.float32)
    got = np.asarray(base.unfused(jnp.asarray(p)))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(np.signbit(got), np.signbit(p))
    assert np.all(np.abs(got) <= np.abs(p))
    fin = np.isfinite(p)
    assert np.all(np.abs(p[fin]) - np.abs(got[fin]) <= np.spacing(np.abs(got[fin])))
    assert np.all((got.view(np.uint32) & 1) == 0)
    keep = (p == 0) | np.isinf(p) | ((p.view(np.uint32) & 1) == 0)
    np.testing.assert_array_equal(got[keep], p[keep])
