"""The kernels' group layout: halves in, halves out, the same bits as whole groups.

The kernels hold polar and blockwise groups as their two halves
(`base.halves`) and call the codecs' kernel entry points on them; these must
give exactly the codes, scales and decoded values of the jnp group functions
on whole groups.
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_lowbit as lowbit
from optax_lowbit.codecs import base
from optax_lowbit.kernels import codec_ops
from optax_lowbit.transforms import adam_presets

# the kernel and its reference held to the same bits (tests/conftest.py)
pytestmark = pytest.mark.optimized

# the package re-exports the factory `polar` under the module's name
polar_lib = importlib.import_module("optax_lowbit.codecs.polar")

CODECS = {
    "polar2-sr": lambda: lowbit.codecs.polar(2, rounding="stochastic"),
    "polar1.5-sr": lambda: lowbit.codecs.polar(1.5, rounding="stochastic"),
    "polar2-nearest": lambda: lowbit.codecs.polar(2),
    "polar2-unsigned-sr": lambda: lowbit.codecs.polar(
        2, signed=False, rounding="stochastic"
    ),
    "polar2-g16": lambda: lowbit.codecs.polar(2, group_size=16),
    "blockwise4": lambda: lowbit.codecs.blockwise4(True),
    "stable_nu": lambda: adam_presets.stable_nu_codec(64),
    "blockwise8-sr": lambda: lowbit.codecs.blockwise8(False, rounding="stochastic"),
    "blockwise8": lambda: lowbit.codecs.blockwise8(True),
}


def _groups(key, codec, n=40):
    """Random groups with a zero group, negatives, and a range of magnitudes."""
    g = codec.group_size
    x = jax.random.normal(key, (n, g)) * jnp.exp(
        3.0 * jax.random.normal(jax.random.fold_in(key, 1), (n, 1))
    )
    return x.at[0].set(0.0).at[1, : g // 2].set(0.0)


# The default presets' codecs in the first CI step; the others in the slow one
# (each kernel is also checked against the jnp path end to end,
# tests/kernels/test_default_codecs_kernel.py).
_FIRST_STEP = ("polar2-sr", "stable_nu", "blockwise4")


@pytest.mark.parametrize(
    "name",
    [
        n if n in _FIRST_STEP else pytest.param(n, marks=pytest.mark.slow)
        for n in sorted(CODECS)
    ],
)
def test_kernel_parts_equal_whole_groups(name):
    codec = CODECS[name]()
    assert codec_ops.has_kernel(codec)
    xg = _groups(jax.random.key(len(name)), codec)
    tables = [jnp.asarray(t) for t in codec.kernel_tables()]
    noise = base.group_noise(xg, base.stream_seed(7)) if codec.stochastic else None
    parts = codec_ops.columns(codec)
    x_in = xg if parts is None else base.parts_of(xg, len(parts))
    planes, scales = codec.kernel_encode(x_in, tables, noise)
    kw = {"seed": base.stream_seed(7)} if codec.stochastic else {}
    if codec.stochastic:
        codes, want_scales = codec.encode_groups(xg, **kw)
    else:
        codes, want_scales = codec.encode_groups(xg)
    np.testing.assert_array_equal(
        np.concatenate([np.asarray(p) for p in planes], -1), np.asarray(codes)
    )
    np.testing.assert_array_equal(
        np.asarray(scales, np.float32), np.asarray(want_scales, np.float32)
    )
    got = codec.kernel_decode(planes, scales, tables)
    got = got if parts is None else jnp.concatenate(got, -1)
    want = codec.decode_groups(codes, want_scales)
    np.testing.assert_array_equal(
        np.asarray(got).view(np.uint32), np.asarray(want).view(np.uint32)
    )


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", [2, 1.5])
def test_code_tables_are_the_codebook(signed, bits):
    codec = polar_lib.polar(bits=bits, signed=signed)
    rho, cos, sin = polar_lib.code_tables(codec.rings, signed)
    cos_t, sin_t = polar_lib._sector_cos_sin(signed)
    s = len(cos_t)
    code = np.arange(rho.size)
    assert rho.size == len(codec.rings) * s == 2**codec.code_bits
    np.testing.assert_array_equal(rho, np.float32(codec.rings)[code // s])
    np.testing.assert_array_equal(
        cos.view(np.uint32), np.float32(cos_t)[code % s].view(np.uint32)
    )
    np.testing.assert_array_equal(
        sin.view(np.uint32), np.float32(sin_t)[code % s].view(np.uint32)
    )
    np.testing.assert_allclose(
        np.stack([rho * cos, rho * sin], -1), codec.codewords(), atol=1e-7
    )
    # the jnp path's tables (from a rings array) are the kernel's (NumPy) ones
    for a, b in zip(
        polar_lib.code_tables(codec.codebook(), signed), (rho, cos, sin), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("n_parts", [1, 2, 4])
def test_pack_planes_of_parts(bits, n_parts):
    rng = np.random.default_rng(bits * 10 + n_parts)
    codes = jnp.asarray(rng.integers(0, 2**bits, (5, 64)), jnp.uint8)
    parts = base.parts_of(codes, n_parts)
    planes = base.pack_planes(parts, bits)
    for a, b in zip(planes, base.pack_planes(codes, bits), strict=True):
        np.testing.assert_array_equal(a, b)
    back = base.unpack_planes(planes, bits, parts=n_parts)
    np.testing.assert_array_equal(jnp.concatenate(back, -1), codes)


def test_kernel_group_sizes():
    assert codec_ops.columns(lowbit.codecs.polar(2, group_size=16)) == (
        (0, 1, 8),
        (8, 1, 8),
    )
    assert codec_ops.columns(lowbit.codecs.blockwise8()) == ((0, 1, 128), (128, 1, 128))
    assert codec_ops.planes(lowbit.codecs.blockwise8()) == [128, 128]
    assert not codec_ops.has_kernel(lowbit.codecs.blockwise4(block_size=512))
    assert not codec_ops.has_kernel(lowbit.codecs.polar(2, group_size=48))
