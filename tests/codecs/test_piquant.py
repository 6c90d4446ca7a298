"""Tests of the π-Quant codec against float64 numpy oracles written here.

The reference is github.com/Ethan-TZ/Pi-Quant, torch_optim_AdamW_3.32bit.py
(commit 76753e8): κ on line 16, the offset 8 on line 12, the code -> rotation
map on lines 18-34, the closed-form encoder on lines 36-49, groups of 32 with
scale max|x| on lines 51-65, the second moment through |.| on lines 496/569.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import optax_lowbit as lowbit
from optax_lowbit.codecs.piquant import (
    KAPPA,
    NUM_CODES,
    codebook,
    codeword,
    decode_groups_with,
    encode_groups_with,
    pack_words,
    unpack_words,
)

# The reference's κ, digit for digit (line 16), and as DESIGN quotes it.
REF_KAPPA = 0.0100384626433832795028841971693993751058209749445923078164


def ref_codebook_f64(signed=True):
    """Codewords as the reference's tx/ty define them, in float64, unreduced."""
    c = np.arange(100)
    pq = c % 10 * 10
    dd = c // 10 * 10 + 8
    t = (dd * 100 + pq) * 1e-2 * 2 * np.pi
    book = np.stack(
        [np.cos(t) + np.cos(REF_KAPPA * t), np.sin(t) + np.sin(REF_KAPPA * t)], -1
    )
    return np.abs(book) if not signed else book


def default_book_f64(signed=True):
    """The default nearest codec's codebook: the reference's halved, with the
    zero codeword (code 89) for signed states."""
    book = ref_codebook_f64(signed) * 0.5
    if signed:
        book[89] = 0.0
    return book


def ref_paper_codes_f64(p):
    """The reference's get_theta, transcribed to numpy float64 (codes 0..100)."""
    x, y = p[..., 0], p[..., 1]
    c = np.arccos(np.clip((2 - (x * x + y * y)) / 2, -1, 1))
    alpha = np.arctan2(y, x) - (np.pi - c) / 2
    alpha = np.where(alpha < 0, alpha + 2 * np.pi, alpha)
    beta = np.pi + alpha - c
    w = (-alpha * REF_KAPPA + beta) / (2 * np.pi)
    tens = np.floor((w - np.floor(w)) * 100) // 10
    units = np.round(alpha / (2 * np.pi) * 100) // 10
    return (tens * 10 + units).astype(np.int64)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@functools.cache
def roundtrip_fn(encoder, signed, scale_dtype=jnp.bfloat16):
    codec = lowbit.codecs.piquant(encoder, signed, scale_dtype=scale_dtype)
    return codec, jax.jit(lambda x: codec.decode(codec.encode(x)))


@functools.cache
def jitted_codec(signed):
    codec = lowbit.codecs.piquant(signed=signed)
    return jax.jit(codec.encode), jax.jit(codec.decode)


@functools.cache
def group_fns(encoder, signed):
    book = lowbit.codecs.piquant(encoder, signed).codebook()
    enc = jax.jit(lambda x: encode_groups_with(x, book, encoder=encoder, signed=signed))
    return book, enc


def data(kind, shape, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "gauss":
        return rng.standard_normal(shape).astype(np.float32)
    return rng.standard_t(3, shape).astype(np.float32)


def normalised_pairs(x, scales):
    """(n, 96) data and (n, 3) stored scales -> (n, 3, 16, 2) float64 pairs."""
    s = np.asarray(scales, np.float64)
    s = np.where(s > 0, s, 1.0)
    blocks = np.asarray(x, np.float64).reshape(-1, 3, 32) / s[..., None]
    return blocks.reshape(-1, 3, 16, 2)


# ---------------------------------------------------------------- constants


def test_golden_constants_match_reference():
    assert KAPPA == REF_KAPPA == 0.0100384626433832795
    assert NUM_CODES == 100
    book = np.asarray(codebook())
    assert book.shape == (100, 2) and book.dtype == np.float32
    # Independent float64 evaluation of the reference's formula; the only
    # difference is our reduced angle, so they agree to float32 rounding.
    np.testing.assert_allclose(book, ref_codebook_f64(), atol=2e-6)
    # A few codewords written out (float64 reference formula, 6 decimals).
    golden = {
        0: (1.875374, 0.483447),
        1: (1.681324, 1.076744),
        39: (0.036520, 0.047233),  # the smallest, radius 0.0597
        99: (1.807995, -0.632984),
    }
    for c, xy in golden.items():
        np.testing.assert_allclose(book[c], xy, atol=2e-6)
    # No codeword has a zero coordinate: unsigned decodes stay positive.
    assert np.abs(book).min() > 2e-3
    np.testing.assert_array_equal(np.asarray(codebook(False)), np.abs(book))


def test_closed_form_codeword_equals_codebook():
    for signed in (True, False):
        x, y = codeword(jnp.arange(100), signed)
        np.testing.assert_allclose(
            np.stack([x, y], -1), np.asarray(codebook(signed)), atol=2e-6
        )


# ------------------------------------------------------------------ packing


def test_base100_packing_every_triple():
    words = np.arange(10**6, dtype=np.int64).reshape(-1, 16)
    codes = np.concatenate([words % 100, words // 100 % 100, words // 10000], -1)
    packed = jax.jit(pack_words)(jnp.asarray(codes, jnp.int32))
    assert packed.shape == (10**6 // 16, 40) and packed.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(jax.jit(unpack_words)(packed)), codes)


def test_packing_byte_layout():
    codes = np.zeros((1, 48), np.int32)
    codes[0, [0, 16, 32]] = 99  # word 0 = 999999 = 0xF423F
    codes[0, [9, 25, 41]] = (7, 3, 12)  # word 9 = 120307 = 0x1D5F3
    b = np.asarray(pack_words(jnp.asarray(codes)))[0]
    assert (b[0], b[16], b[32] & 0xF) == (0x3F, 0x42, 0xF)
    assert (b[9], b[25], b[33] >> 4) == (0xF3, 0xD5, 0x1)
    assert b.sum() == 0x3F + 0x42 + 0xF + 0xF3 + 0xD5 + 0x10


@given(
    st.sampled_from([(1,), (5,), (2, 3)]),
    st.integers(0, 2**31 - 1),
    st.sampled_from([None, 0, 99]),
)
def test_packing_roundtrip_random(lead, seed, edge):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 100, (*lead, 48))
    if edge is not None:
        codes[..., rng.integers(0, 48, 10)] = edge
    packed = jax.jit(pack_words)(jnp.asarray(codes))
    assert packed.shape == (*lead, 40)
    np.testing.assert_array_equal(np.asarray(jax.jit(unpack_words)(packed)), codes)


def test_any_bytes_decode_to_defined_codes():
    ones = jnp.full((1, 40), 0xFF, jnp.uint8)  # every word 2^20 - 1
    c = np.asarray(unpack_words(ones))[0]
    assert set(c[:16]) == {75} and set(c[16:32]) == {85} and set(c[32:]) == {99}


@functools.cache
def _unpack_and_decode(signed):
    """``(unpack_words, decode_groups_with)`` jitted once (eager, each example
    was dispatched op by op)."""
    decode = functools.partial(decode_groups_with, signed=signed)
    return jax.jit(unpack_words), jax.jit(decode)


@given(st.integers(0, 2**31 - 1), st.booleans())
def test_random_bytes_decode_finite(seed, signed):
    unpack, decode = _unpack_and_decode(signed)
    rng = np.random.default_rng(seed)
    codes = jnp.asarray(rng.integers(0, 256, (7, 40)), jnp.uint8)
    assert int(unpack(codes).max()) <= 99
    scales = jnp.asarray(rng.uniform(0, 3, (7, 3)), jnp.bfloat16)
    out = decode(codes, scales, codebook(signed))
    assert out.shape == (7, 96) and bool(jnp.all(jnp.isfinite(out)))


# ----------------------------------------------------------------- encoders


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("kind", ["gauss", "t3"])
def test_nearest_is_brute_force_nearest(signed, kind):
    x = data(kind, (300, 96), seed=1)
    _, enc = group_fns("nearest", signed)
    codes, scales = enc(jnp.asarray(x))
    idx = np.asarray(unpack_words(codes)).reshape(-1, 3, 16)
    p = normalised_pairs(np.abs(x) if not signed else x, scales.astype(jnp.float32))
    book64 = default_book_f64(signed)
    d = np.linalg.norm(p[..., None, :] - book64, axis=-1)  # (n, 3, 16, 100)
    chosen = np.take_along_axis(d, idx[..., None], -1)[..., 0]
    assert np.all(chosen <= d.min(-1) + 1e-5)
    assert np.mean(idx == d.argmin(-1)) > 0.999


@pytest.mark.parametrize("kind", ["gauss", "t3", "uniform"])
def test_paper_encoder_reproduces_reference(kind):
    if kind == "uniform":
        x = np.random.default_rng(2).uniform(-1, 1, (500, 96)).astype(np.float32)
    else:
        x = data(kind, (500, 96), seed=2)
    _, enc = group_fns("paper", True)
    codes, scales = enc(jnp.asarray(x))
    ours = np.asarray(unpack_words(codes)).reshape(-1, 3, 16)
    ref = ref_paper_codes_f64(normalised_pairs(x, scales.astype(jnp.float32)))
    # float32 vs float64 may differ right at a floor; otherwise identical.
    assert np.mean(ours == ref % 100) > 0.999


def test_paper_carry_is_reproduced():
    # alpha just below one turn: round(100 alpha / 2pi) = 100 -> carry.
    pts = []
    # gamma >= pi/2 is every max-normalised pair (radius <= sqrt 2); a tiny
    # gamma (radius ~2) makes the reference emit code 100, stored as 0 here.
    for gamma in [0.01, *np.linspace(np.pi / 2 + 0.05, np.pi - 0.05, 7)]:
        alpha = 2 * np.pi * 0.997
        beta = alpha + gamma
        pts.append([np.cos(alpha) + np.cos(beta), np.sin(alpha) + np.sin(beta)])
    p = np.asarray(pts)
    ref = ref_paper_codes_f64(p)
    assert np.all(ref % 10 == 0)  # units digit 0 after the carry
    assert ref[0] == 100 and len(set(ref[1:] // 10)) > 1
    from optax_lowbit.codecs.piquant import _paper_codes

    ours = np.asarray(_paper_codes(jnp.asarray(p[:, 0]), jnp.asarray(p[:, 1])))
    np.testing.assert_array_equal(ours, ref % 100)


# ------------------------------------------------------------------- errors

# Measured with seed 0 on (2000, 96) arrays, bf16 scales:
#   signed   gauss: nearest 0.264 paper 0.915    t3: nearest 0.318 paper 1.48
#   unsigned gauss^2: nearest 0.271 paper 1.02   t3^2: nearest 0.339 paper 2.11
ERROR_BOUNDS = {
    ("nearest", True, "gauss"): 0.18,
    ("nearest", True, "t3"): 0.21,
    ("nearest", False, "gauss"): 0.17,
    ("nearest", False, "t3"): 0.14,
    ("paper", True, "gauss"): 0.95,
    ("paper", True, "t3"): 1.6,
}


@pytest.mark.parametrize("key", sorted(ERROR_BOUNDS))
def test_roundtrip_error_bound(key):
    encoder, signed, kind = key
    x = data(kind, (2000, 96))
    if not signed:
        x = x * x
    _, fn = roundtrip_fn(encoder, signed)
    err = rel_err(fn(jnp.asarray(x)), x)
    assert err <= ERROR_BOUNDS[key]
    assert err > 0.5 * ERROR_BOUNDS[key]  # a broken codec that is "too good"


@pytest.mark.parametrize("kind", ["gauss", "t3"])
def test_nearest_beats_paper(kind):
    x = jnp.asarray(data(kind, (2000, 96), seed=3))
    errs = {e: rel_err(roundtrip_fn(e, True)[1](x), x) for e in ("nearest", "paper")}
    assert errs["nearest"] <= errs["paper"]
    assert lowbit.codecs.piquant().encoder == "nearest"


def test_paper_error_matches_reference_pipeline():
    # The reference end to end in float64 (fp32 max scale, codes up to 100).
    x = data("gauss", (2000, 96), seed=4)
    blocks = x.astype(np.float64).reshape(-1, 32)
    s = np.abs(blocks).max(-1, keepdims=True)
    codes = ref_paper_codes_f64((blocks / s).reshape(-1, 16, 2))
    t = (10 * (codes // 10) + 8 + codes % 10 / 10) * 2 * np.pi
    xy = np.stack([np.cos(t) + np.cos(KAPPA * t), np.sin(t) + np.sin(KAPPA * t)], -1)
    ref_err = rel_err((xy * s[..., None]).reshape(x.shape), x)
    ours = rel_err(roundtrip_fn("paper", True)[1](jnp.asarray(x)), x)
    assert abs(ours - ref_err) < 0.01


@functools.cache
def covering_radius(signed):
    """Largest distance from a point of the unit square (quadrant) to the book."""
    g = np.linspace(-1 if signed else 0, 1, 301)
    pts = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    d = np.linalg.norm(pts[:, None] - default_book_f64(signed), axis=-1).min(-1)
    return d.max() + (g[1] - g[0])  # grid slack: half a diagonal < one step


@pytest.mark.parametrize("signed", [True, False])
@given(
    shape=st.sampled_from([(96,), (3, 200), (2, 2, 33)]),
    seed=st.integers(0, 2**31 - 1),
    log_mag=st.sampled_from([-30.0, -3.0, 0.0, 4.0, 30.0]),
)
def test_pairwise_error_within_covering_radius(signed, shape, seed, log_mag):
    encode, decode = jitted_codec(signed)
    x = data("t3", shape, seed) * np.float32(10.0**log_mag)
    if not signed:
        x = np.abs(x)
    packed = encode(jnp.asarray(x))
    out = np.asarray(decode(packed))
    assert out.shape == x.shape and np.all(np.isfinite(out))
    s = np.asarray(packed.scales.astype(jnp.float32), np.float64)
    assert np.all(s >= np.abs(base_groups(x)).max(-1))  # rounded up
    err = np.linalg.norm(
        (base_groups(out) - base_groups(x)).reshape(*s.shape, 16, 2), axis=-1
    )
    bound = (covering_radius(signed) + 1e-4) * s[..., None]
    assert np.all(err <= bound)
    if not signed:  # positive wherever the block's scale is (padding aside)
        real = base_groups(np.ones_like(x)) > 0
        pos = real & (s[..., None] > 0)
        assert pos.any() and np.all(base_groups(out)[pos] > 0)


def base_groups(x):
    """(..., N) -> (..., n_blocks_of_32) x 32, zero-padded to a superblock."""
    lead, n = x.shape[:-1], x.shape[-1]
    pad = -n % 96
    x = np.pad(np.asarray(x, np.float64), [(0, 0)] * len(lead) + [(0, pad)])
    return x.reshape(*lead, -1, 32)


# --------------------------------------------------------- codec contract


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("encoder", ["nearest", "paper"])
@pytest.mark.parametrize("shape", [(), (32,), (3, 5, 100), (2, 0)])
def test_zero_decodes_to_exact_zero(encoder, signed, shape):
    codec = lowbit.codecs.piquant(encoder, signed)
    out = codec.decode(codec.zeros(shape))
    assert out.shape == shape and out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), np.zeros(shape))


@pytest.mark.parametrize("encoder", ["nearest", "paper"])
def test_zero_blocks_beside_nonzero_blocks(encoder):
    x = np.zeros((4, 192), np.float32)
    x[:, 32:64] = data("gauss", (4, 32))
    x[1, 100] = -1e-30
    _, fn = roundtrip_fn(encoder, True)
    out = np.asarray(fn(jnp.asarray(x)))
    assert np.all(np.isfinite(out))
    zero_blocks = np.abs(x).reshape(4, 6, 32).max(-1) == 0
    assert np.all(out.reshape(4, 6, 32)[zero_blocks] == 0)


def test_unsigned_tiny_scale_never_decodes_to_zero():
    codec = lowbit.codecs.piquant(signed=False)
    x = jnp.full((96,), 1e-37, jnp.float32)  # codeword * scale underflows
    out = np.asarray(codec.decode(codec.encode(x)))
    assert np.all(out > 0) and np.all(np.isfinite(out))


@pytest.mark.parametrize(
    ("scale_dtype", "bits"), [(jnp.bfloat16, 3.8333), (jnp.float32, 4.3333)]
)
def test_bits_per_element_all_in(scale_dtype, bits):
    codec = lowbit.codecs.piquant(scale_dtype=scale_dtype)
    assert round(codec.bits_per_element, 4) == bits
    packed = codec.encode(jnp.ones((4, 192)))
    all_in = 8 * (packed.codes.nbytes + packed.scales.nbytes) / (4 * 192)
    assert all_in == codec.bits_per_element == packed.bits_per_element
    assert packed.scales.dtype == scale_dtype
    # A 32-element tail pays a full superblock.
    tail = 8 * (40 + 3 * jnp.dtype(scale_dtype).itemsize) / 32
    assert codec.encode(jnp.ones((32,))).bits_per_element == tail


def test_leading_axes_kept():
    encode, decode = jitted_codec(True)
    x = jnp.asarray(data("gauss", (3, 5, 100)))
    packed = encode(x)
    assert packed.codes.shape == (3, 5, 2, 40) and packed.codes.dtype == jnp.uint8
    assert packed.scales.shape == (3, 5, 6)
    out = decode(packed)
    assert out.shape == (3, 5, 100)
    # Each row is coded on its own: same result as encoding it alone.
    row = decode(encode(x[1, 2]))
    np.testing.assert_array_equal(np.asarray(out[1, 2]), np.asarray(row))


def test_packed_is_a_pytree_through_jit():
    codec = lowbit.codecs.piquant()
    x = jnp.asarray(data("gauss", (2, 96)))
    packed = jax.jit(codec.encode)(x)
    out = jax.jit(codec.decode)(packed)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(codec.decode(packed)))
    assert hash(codec) == hash(lowbit.codecs.piquant())
    shapes = codec.packed_shapes((2, 96))
    assert shapes.codes.shape == (2, 1, 40) and shapes.scales.shape == (2, 3)


def test_names_and_cross_codec_decode():
    signed, unsigned = lowbit.codecs.piquant(), lowbit.codecs.piquant(signed=False)
    assert signed.name == "piquant-signed-z-cs0.5"
    assert unsigned.name == "piquant-unsigned-cs0.5"
    paper = lowbit.codecs.piquant("paper")
    same_format = lowbit.codecs.piquant(zero_code=False, codebook_scale=1.0)
    assert paper.name == same_format.name
    assert paper.name == "piquant-signed"
    fp32 = lowbit.codecs.piquant(
        scale_dtype=jnp.float32, zero_code=False, codebook_scale=1.0
    )
    assert fp32.name == "piquant-signed-fp32"
    with pytest.raises(ValueError, match="piquant-unsigned"):
        signed.decode(unsigned.encode(jnp.ones(8)))


def test_bad_arguments():
    with pytest.raises(
        ValueError, match=r"encoder must be one of \('nearest', 'paper'\), got 'fast'"
    ):
        lowbit.codecs.piquant("fast")
    with pytest.raises(TypeError, match=r"signed must be a bool.*got 1"):
        lowbit.codecs.piquant(signed=1)
    with pytest.raises(ValueError, match=r"scale_dtype must be one of.*float16"):
        lowbit.codecs.piquant(scale_dtype=jnp.float16)
    with pytest.raises(TypeError, match="floating-point"):
        lowbit.codecs.piquant().encode(jnp.ones(4, jnp.int32))


def test_zero_code_is_never_nearest_in_the_unit_square():
    from optax_lowbit.codecs.piquant import ZERO_CODE, codebook

    book = np.asarray(codebook(True), np.float64)
    g = np.linspace(-1.0, 1.0, 401)
    px, py = np.meshgrid(g, g)
    pts = np.stack([px.ravel(), py.ravel()], 1)
    d = ((pts[:, None, :] - book[None]) ** 2).sum(-1)
    assert ZERO_CODE not in set(d.argmin(1).tolist())


def test_zero_code_decodes_small_pairs_to_zero_and_is_the_signed_default():
    import optax_lowbit as lowbit

    codec = lowbit.codecs.piquant()
    assert codec.zero_code and codec.name == "piquant-signed-z-cs0.5"
    x = jnp.zeros((96,)).at[0].set(1.0).at[5].set(1e-3).at[6].set(-2e-3)
    out = np.asarray(codec.decode(codec.encode(x)))
    np.testing.assert_array_equal(out[2:], 0.0)
    ref = lowbit.codecs.piquant(zero_code=False)
    assert np.asarray(ref.decode(ref.encode(x)))[2:32].min() > 0  # the bias
    assert not lowbit.codecs.piquant(signed=False).zero_code
    assert not lowbit.codecs.piquant(encoder="paper").zero_code
    with pytest.raises(ValueError, match="zero_code=True needs signed=True"):
        lowbit.codecs.piquant(signed=False, zero_code=True)
    with pytest.raises(ValueError, match="zero_code=True needs"):
        lowbit.codecs.piquant(encoder="paper", zero_code=True)


@pytest.mark.parametrize(
    "signed,scale", [(True, 0.5), (False, 0.5), (True, 1.0), (False, 1.0)]
)
def test_grid_search_is_the_exact_nearest(signed, scale):
    """The candidate-table search returns the argmin over all 100 codewords
    (up to exact float ties of the score) on random pairs, the grid's cell
    edges and the corners of the square."""
    from optax_lowbit.codecs.piquant import _nearest_codes, _search_tables

    codec = lowbit.codecs.piquant(signed=signed, codebook_scale=scale)
    book = np.asarray(codec.codebook())
    tables, width = _search_tables(codec.codebook(), signed, codec.candidates())
    assert width <= 8  # the cost of the search: width evaluations, not 100
    lo = -1.0 if signed else 0.0
    rng = np.random.default_rng(int(signed) + int(10 * scale))
    edges = np.linspace(lo, 1.0, 33, dtype=np.float32)
    pts = np.concatenate(
        [
            rng.uniform(lo, 1.0, (50_000, 2)).astype(np.float32),
            np.stack(np.meshgrid(edges, edges), -1).reshape(-1, 2),
        ]
    )
    got = np.asarray(
        jax.jit(lambda a, b: _nearest_codes(a, b, tables, width, signed))(
            pts[:, 0], pts[:, 1]
        )
    )
    bx, by = book[:, 0], book[:, 1]
    score = (bx * bx + by * by)[None] - 2.0 * (
        pts[:, :1] * bx[None] + pts[:, 1:] * by[None]
    )
    best = score.min(-1)
    picked = score[np.arange(len(pts)), got]
    np.testing.assert_allclose(picked, best, atol=1e-6)
    assert np.mean(got != score.argmin(-1)) < 1e-4  # only float ties differ


@given(
    seed=st.integers(0, 2**31 - 1),
    signed=st.booleans(),
    n_bad=st.integers(0, 8),
)
def test_array_search_equals_the_kernels_running_minimum(seed, signed, n_bad):
    """On arrays the candidates are scored as one axis (`jnp.argmin`); a kernel
    keeps a running minimum (strict ``<``, code 0 until a finite score). Both
    must give the same code for every pair: ties (the table's rows repeat their
    last code), the square's edges, and pairs with a NaN coordinate (code
    0; a normalised pair is finite or NaN). The reference is that loop, in
    NumPy over the same candidates and the same float32 scores."""
    from optax_lowbit.codecs.piquant import (
        _cell,
        _nearest_codes,
        _score,
        _search_tables,
    )

    codec = lowbit.codecs.piquant(signed=signed)
    (bx, by, cand), width = _search_tables(codec.codebook(), signed, codec.candidates())
    lo = -1.0 if signed else 0.0
    rng = np.random.default_rng(seed)
    pts = rng.uniform(lo, 1.0, (4096, 2)).astype(np.float32)
    pts[:64] = rng.choice(np.linspace(lo, 1.0, 33, dtype=np.float32), (64, 2))
    bad = rng.choice(len(pts), n_bad, replace=False)
    pts[bad, rng.integers(0, 2, n_bad)] = np.nan  # a normalised pair: finite or NaN
    px, py = jnp.asarray(pts[:, 0]), jnp.asarray(pts[:, 1])
    got = np.asarray(_nearest_codes(px, py, (bx, by, cand), width, signed))

    rows = np.asarray(_cell(px, py, signed)) * width
    bx, by, cand = (np.asarray(t) for t in (bx, by, cand))
    best = np.full(len(pts), np.inf, np.float32)
    want = np.zeros(len(pts), np.int32)
    with np.errstate(invalid="ignore"):
        for t in range(width):
            k = cand[rows + t].astype(np.int32)
            score = _score(pts[:, 0], pts[:, 1], bx[k], by[k])  # NumPy float32
            better = score < best
            best, want = np.where(better, score, best), np.where(better, k, want)
    np.testing.assert_array_equal(got, want)
    assert (got[np.isnan(pts).any(-1)] == 0).all()  # no finite score: code 0
