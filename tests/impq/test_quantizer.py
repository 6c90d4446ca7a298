"""Tests of optax_lowbit.impq.quantizer: packing sizes, round trip, matmul hook."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_lowbit.codecs import base
from optax_lowbit.impq import quantizer, smollm2


def _reference_rtn(w, bits, group=128):
    """Plain numpy RTN on (out, in)-flattened groups, independent of the module."""
    flat = np.asarray(w, np.float32).T.reshape(-1)
    pad = (-len(flat)) % group
    g = np.pad(flat, (0, pad)).reshape(-1, group)
    lo = g.min(1).astype(np.float16).astype(np.float32)
    scale = (
        ((g.max(1) - g.min(1)) / (2**bits - 1)).astype(np.float16).astype(np.float32)
    )
    div = np.where(scale > 0, scale, 1.0)
    q = np.clip(np.round((g - lo[:, None]) / div[:, None]), 0, 2**bits - 1)
    deq = q * scale[:, None] + lo[:, None]
    return deq.reshape(-1)[: w.size].reshape(w.shape[1], w.shape[0]).T, scale


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(256, 64), (576, 96), (1536, 128)])
def test_round_trip_bound_and_exact_size(bits, shape):
    w = jax.random.normal(jax.random.key(bits), shape) * 0.05 + 0.01
    qw = quantizer.quantize(w, bits)
    deq = np.asarray(quantizer.dequantize(qw))
    ref, scale = _reference_rtn(np.asarray(w), bits)
    n_groups = w.size // 128
    # Equal to the reference up to one fp16 ulp of the scale (XLA may divide
    # by 2**b - 1 as a multiply by its reciprocal) and a code tie, i.e. one
    # step plus (2**b - 1) * ulp; nearly every weight is bit-identical.
    tol = 1e-6 + scale + (2**bits - 1) * scale * 2.0**-10
    diff = np.abs(deq - ref).T.reshape(n_groups, 128).max(1)
    assert np.all(diff <= tol)
    assert np.mean(np.abs(deq - ref) < 1e-6) > 0.99
    # Bound: half a step of the group's fp16 scale plus fp16 rounding of zero.
    assert qw.codes.shape == (n_groups, 16 * bits)
    assert qw.codes.dtype == jnp.uint8
    assert qw.scale.dtype == jnp.float16 and qw.zero.dtype == jnp.float16
    err = np.abs(deq - np.asarray(w)).T.reshape(n_groups, 128).max(1)
    wmax = np.abs(np.asarray(w)).T.reshape(n_groups, 128).max(1)
    assert np.all(err <= 0.5 * scale + 2**-10 * wmax + 1e-7)
    # Exact all-in size: 16*b code bytes + 2 + 2 per 128 weights.
    assert qw.nbytes == n_groups * (16 * bits + 4)
    assert qw.bits_per_element == bits + 0.25
    assert quantizer.all_in_bits(bits) == bits + 0.25


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_are_base_pack_codes(bits):
    w = jax.random.normal(jax.random.key(0), (128, 8))
    qw = quantizer.quantize(w, bits)
    codes = base.unpack_codes(qw.codes, bits, 128)
    assert int(codes.max()) <= 2**bits - 1
    np.testing.assert_array_equal(base.pack_codes(codes, bits), qw.codes)
    assert int(codes.max()) == 2**bits - 1 and int(codes.min()) == 0


def test_error_shrinks_with_bits_and_constant_groups_exact():
    w = jax.random.normal(jax.random.key(1), (256, 32))
    errs = [
        float(jnp.mean((quantizer.dequantize(quantizer.quantize(w, b)) - w) ** 2))
        for b in (2, 3, 4, 8)
    ]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-3 * errs[0]
    c = jnp.full((128, 4), 0.5)
    np.testing.assert_array_equal(quantizer.dequantize(quantizer.quantize(c, 2)), c)


def test_ragged_input_dim_is_not_padded():
    w = jax.random.normal(jax.random.key(2), (576, 3))  # 1728 = 13.5 * 128
    qw = quantizer.quantize(w, 4)
    assert qw.codes.shape[0] == 14  # the last group padded once, not per column
    assert quantizer.dequantize(qw).shape == (576, 3)


def test_qmatmul_and_tree_pytree_jit():
    params = {
        "embed": jnp.ones((16, 128)),
        "blocks": [
            {
                "norm": jnp.ones(128),
                "w": jax.random.normal(jax.random.key(3), (128, 256)),
            }
        ],
    }
    q = quantizer.quantize_tree(params, lambda path: 3)
    assert isinstance(q["blocks"][0]["w"], quantizer.QuantizedWeight)
    assert (
        q["embed"] is params["embed"]
        and q["blocks"][0]["norm"] is params["blocks"][0]["norm"]
    )
    x = jax.random.normal(jax.random.key(4), (5, 128))
    y = jax.jit(quantizer.qmatmul)(x, q["blocks"][0]["w"])
    np.testing.assert_allclose(
        y, x @ quantizer.dequantize(q["blocks"][0]["w"]), rtol=1e-5, atol=1e-5
    )
    leaves, treedef = jax.tree.flatten(q["blocks"][0]["w"])
    assert len(leaves) == 3 and jax.tree.unflatten(treedef, leaves).bits == 3
    assert quantizer.tree_bytes(q) == 16 * 128 * 4 + 128 * 4 + 256 * (48 + 4)


def test_smollm2_forward_hook_with_tiny_config():
    from optax_lowbit.impq import model

    m = model.tiny_llama(n_layers=2)
    cfg = m.loss.keywords["config"]
    q = quantizer.quantize_tree(m.params, 4)
    tokens = jnp.arange(17) % 256
    got = smollm2.nll(q, tokens, cfg, matmul=quantizer.qmatmul)
    want = smollm2.nll(quantizer.dequantize_tree(q), tokens, cfg)
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("bits", [1, 5, 16, 2.0, True, "4"])
def test_bad_bits(bits):
    with pytest.raises((ValueError, TypeError), match="bits must"):
        quantizer.quantize(jnp.ones((128, 2)), bits)


def test_bad_shapes():
    with pytest.raises(ValueError, match="2-D"):
        quantizer.quantize(jnp.ones((128,)), 4)
    with pytest.raises(ValueError, match="multiple of 8"):
        quantizer.quantize(jnp.ones((128, 2)), 4, group_size=100)
