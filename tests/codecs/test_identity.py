"""The identity codec (optax_lowbit/codecs/identity.py): fp32 and bf16 states."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import optax_lowbit as lowbit
from optax_lowbit.codecs import base

SHAPES = [(), (0,), (7,), (3, 5, 300)]


@pytest.mark.parametrize("shape", SHAPES)
@given(seed=st.integers(0, 2**32 - 1))
def test_float32_round_trip_is_exact(shape, seed):
    codec = lowbit.codecs.identity(jnp.float32)
    rng = np.random.default_rng(seed)
    x = (rng.standard_t(3, shape) * 10.0 ** rng.uniform(-20, 20)).astype(np.float32)
    packed = codec.encode(jnp.asarray(x))
    assert packed.codes.dtype == jnp.float32 and packed.shape == shape
    y = codec.decode(packed)
    assert y.dtype == jnp.float32 and y.shape == shape
    np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize("shape", SHAPES)
@given(seed=st.integers(0, 2**32 - 1))
def test_bfloat16_round_trip_to_bf16_precision(shape, seed):
    codec = lowbit.codecs.identity(jnp.bfloat16)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 10.0 ** rng.uniform(-20, 20)).astype(np.float32)
    packed = codec.encode(jnp.asarray(x))
    assert packed.codes.dtype == jnp.bfloat16
    y = np.asarray(codec.decode(packed))
    assert y.dtype == np.float32 and y.shape == shape
    # exactly the bf16 rounding of x, so within half a bf16 ulp (2**-8 relative)
    np.testing.assert_array_equal(
        y, np.asarray(jnp.asarray(x).astype(jnp.bfloat16), np.float32)
    )
    np.testing.assert_allclose(y, x, rtol=2.0**-8, atol=0)


def test_bits_names_and_packed_bytes():
    f32, bf16 = lowbit.codecs.identity(), lowbit.codecs.identity(jnp.bfloat16)
    assert f32.bits_per_element == 32.0 and bf16.bits_per_element == 16.0
    assert f32.name == "identity-float32" and bf16.name == "identity-bfloat16"
    assert lowbit.codecs.identity("bfloat16") == bf16
    x = jnp.ones((4, 10))
    assert bf16.encode(x).bits_per_element == 16.0
    assert f32.encode(x).scales.shape == (4, 0)


def test_zeros_and_jit():
    codec = lowbit.codecs.identity(jnp.bfloat16)
    z = jax.jit(codec.zeros, static_argnums=0)((2, 3))
    assert isinstance(z, base.Packed)
    np.testing.assert_array_equal(codec.decode(z), np.zeros((2, 3)))
    x = jnp.array([1.0, -2.5, 3.0])
    y = jax.jit(lambda x: codec.decode(codec.encode(x)))(x)
    np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.float16, jnp.float64, "int32", "fp8"])
def test_bad_dtype_raises(dtype):
    with pytest.raises(
        ValueError, match=r"dtype must be one of \('float32', 'bfloat16'\)"
    ):
        lowbit.codecs.identity(dtype)


def test_bad_inputs_raise():
    codec = lowbit.codecs.identity()
    with pytest.raises(TypeError, match="floating-point"):
        codec.encode(jnp.array([1, 2]))
    packed = lowbit.codecs.identity(jnp.bfloat16).encode(jnp.ones((3,)))
    with pytest.raises(ValueError, match="identity-float32"):
        codec.decode(packed)
