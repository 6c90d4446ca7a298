"""Tests of optax_lowbit.impq.quantizer: grouping, clipping, packing, hooks."""

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_lowbit.codecs import base
from optax_lowbit.impq import quantizer, smollm2

LEGACY = quantizer.SCHEMES["rtn_g128"]._asdict()
MINMAX = quantizer.SCHEMES["rtn"]._asdict()


def _f16(x):
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def _reference_groups(g, bits, ratio=1.0):
    """Plain numpy grid of one shrink ratio, independent of the module."""
    lo, hi = g.min(1), g.max(1)
    cut = (1.0 - ratio) * (hi - lo) / 2
    scale = _f16((hi - lo - 2 * cut) / (2**bits - 1))
    zero = _f16(lo + cut)
    div = np.where(scale > 0, scale, 1.0)
    q = np.clip(np.round((g - zero[:, None]) / div[:, None]), 0, 2**bits - 1)
    return q * scale[:, None] + zero[:, None], scale


def _reference_rtn(w, bits, group=128, rows=False):
    wt = np.asarray(w, np.float32).T
    if rows:
        g = wt.reshape(-1, group)
    else:
        flat = wt.reshape(-1)
        g = np.pad(flat, (0, (-len(flat)) % group)).reshape(-1, group)
    deq, scale = _reference_groups(g, bits)
    return deq.reshape(-1)[: w.size].reshape(w.shape[1], w.shape[0]).T, scale


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(256, 64), (576, 96), (1536, 128)])
@pytest.mark.parametrize("legacy", [True, False])
def test_round_trip_bound_and_exact_size(bits, shape, legacy):
    group = 128 if legacy else 64
    w = jax.random.normal(jax.random.key(bits), shape) * 0.05 + 0.01
    qw = quantizer.quantize(w, bits, **(LEGACY if legacy else MINMAX))
    deq = np.asarray(quantizer.dequantize(qw))
    ref, scale = _reference_rtn(np.asarray(w), bits, group, rows=not legacy)
    n_groups = w.size // group
    # Equal to the reference up to one fp16 ulp of the scale (XLA may divide
    # by 2**b - 1 as a multiply by its reciprocal) and a code tie, i.e. one
    # step plus (2**b - 1) * ulp; nearly every weight is bit-identical.
    tol = 1e-6 + scale + (2**bits - 1) * scale * 2.0**-10
    diff = np.abs(deq - ref).T.reshape(n_groups, group).max(1)
    assert np.all(diff <= tol)
    assert np.mean(np.abs(deq - ref) < 1e-6) > 0.99
    assert qw.codes.shape == (n_groups, group * bits // 8)
    assert qw.codes.dtype == jnp.uint8
    assert qw.scale.dtype == jnp.float16 and qw.zero.dtype == jnp.float16
    # Bound: half a step of the group's fp16 scale plus fp16 rounding of zero.
    err = np.abs(deq - np.asarray(w)).T.reshape(n_groups, group).max(1)
    wmax = np.abs(np.asarray(w)).T.reshape(n_groups, group).max(1)
    assert np.all(err <= 0.5 * scale + 2**-10 * wmax + 1e-7)
    # Exact all-in size: g*b/8 code bytes + 2 + 2 per group; codes alone: b.
    assert qw.nbytes == n_groups * (group * bits // 8 + 4)
    assert qw.bits_per_element == bits + 32 / group
    assert qw.code_bits_per_element == bits
    assert quantizer.all_in_bits(bits, group) == bits + 32 / group


def test_default_is_g64_rows_with_mse_clip():
    assert quantizer.GROUP_SIZE == 64 and quantizer.OVERHEAD_BITS == 0.5
    w = jax.random.normal(jax.random.key(0), (576, 8))
    qw = quantizer.quantize(w, 3)
    assert (qw.group_size, qw.rows, qw.bits_per_element) == (64, True, 3.5)
    same = quantizer.quantize_scheme(w, 3, "rtn_mse")
    np.testing.assert_array_equal(qw.codes, same.codes)
    with pytest.raises(ValueError, match="scheme must be one of"):
        quantizer.quantize_scheme(w, 3, "gptq")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_are_base_pack_codes(bits):
    w = jax.random.normal(jax.random.key(0), (128, 8))
    qw = quantizer.quantize(w, bits, clip=None)
    codes = base.unpack_codes(qw.codes, bits, 64)
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


# `quantize` and `dequantize` jitted once per shape and width (the same
# functions traced; eager, every op compiled anew for each of the 10 shapes and
# 3 widths: 26-38 s of the first CI step): whether a group mixes two rows is a
# matter of layout, the same under jit.
_quantize = jax.jit(quantizer.quantize, static_argnums=1)
_round_trip = jax.jit(
    lambda w, bits: quantizer.dequantize(quantizer.quantize(w, bits)),
    static_argnums=1,
)


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(
    # Few distinct shapes (each compiles): below one group, exactly one, a
    # ragged second group, several with a tail, SmolLM2's 576 (9 groups).
    n_in=st.sampled_from([8, 64, 72, 200, 576]),
    n_out=st.sampled_from([2, 5]),
    row=st.integers(0, 4),
    seed=st.integers(0, 2**16),
)
def test_groups_never_straddle_rows(n_in, n_out, row, seed):
    # Changing output row `row` of w.T changes no other row's weights.
    row = row % n_out
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(n_in, n_out)).astype(np.float32)
    w2 = w.copy()
    w2[:, row] = 50.0 * rng.normal(size=n_in)
    for bits in (2, 4):
        a = np.asarray(_round_trip(w, bits))
        b = np.asarray(_round_trip(w2, bits))
        others = np.arange(n_out) != row
        np.testing.assert_array_equal(a[:, others], b[:, others])
    qw = _quantize(w, 3)
    assert qw.codes.shape[0] == n_out * -(-n_in // 64)


def test_legacy_groups_do_straddle_rows():
    # The check above can fail: the former g128 layout mixes rows of 576.
    rng = np.random.default_rng(0)
    w = rng.normal(size=(576, 3)).astype(np.float32)
    w2 = w.copy()
    w2[:, 0] *= 50.0
    a = quantizer.dequantize(quantizer.quantize(w, 3, **LEGACY))
    b = quantizer.dequantize(quantizer.quantize(w2, 3, **LEGACY))
    assert not np.array_equal(a[:, 1], b[:, 1])
    assert quantizer.quantize(w, 4, **LEGACY).codes.shape[0] == 14  # 13.5 groups


def test_ragged_rows_are_padded_inside_the_row():
    w = jax.random.normal(jax.random.key(2), (100, 3))  # 100 = 64 + 36
    qw = quantizer.quantize(w, 4)
    assert qw.codes.shape[0] == 3 * 2
    deq = quantizer.dequantize(qw)
    assert deq.shape == (100, 3)
    assert float(jnp.max(jnp.abs(deq - w))) < 0.6


def _group_sse(w, qw, group):
    d = np.asarray(quantizer.dequantize(qw)) - np.asarray(w)
    return (d.T.reshape(-1, group) ** 2).sum(1)


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(
    g=hnp.arrays(
        np.float32,
        (6, 64),
        elements=st.floats(-1e3, 1e3, width=32, allow_subnormal=False),
    ),
    bits=st.sampled_from([2, 3, 4]),
)
def test_mse_clip_never_increases_group_error(g, bits):
    w = g.reshape(-1, 64).T  # (64, 6): one group per output row
    clipped = _group_sse(w, quantizer.quantize(w, bits), 64)
    plain = _group_sse(w, quantizer.quantize(w, bits, clip=None), 64)
    assert np.all(clipped <= plain)


def test_mse_clip_helps_heavy_tails_and_matches_numpy():
    rng = np.random.default_rng(3)
    w = rng.standard_t(3, size=(512, 16)).astype(np.float32)
    qw = quantizer.quantize(w, 3)
    clipped = _group_sse(w, qw, 64)
    plain = _group_sse(w, quantizer.quantize(w, 3, clip=None), 64)
    assert clipped.sum() < 0.9 * plain.sum()
    # Per group, the chosen grid is the numpy search's argmin.
    g = w.T.reshape(-1, 64)
    cands = [_reference_groups(g, 3, r)[0] for r in quantizer.CLIP_RATIOS]
    sse = np.stack([((c - g) ** 2).sum(1) for c in cands])
    want = np.take_along_axis(np.stack(cands), sse.argmin(0)[None, :, None], 0)[0]
    got = np.asarray(quantizer.dequantize(qw)).T.reshape(-1, 64)
    assert np.mean(np.all(np.abs(got - want) < 1e-6, axis=1)) > 0.95


def test_pack_round_trip():
    rng = np.random.default_rng(4)
    q = rng.integers(0, 8, size=(12, 64))
    scale = _f16(rng.uniform(0.1, 1, 12))
    zero = _f16(rng.normal(size=12))
    qw = quantizer.pack(q, scale, zero, (128, 6), 3)
    want = (q * scale[:, None] + zero[:, None]).reshape(6, 128).T
    np.testing.assert_allclose(quantizer.dequantize(qw), want, rtol=0, atol=1e-6)


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
    assert quantizer.tree_bytes(q) == 16 * 128 * 4 + 128 * 4 + 256 * 2 * (24 + 4)


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


def test_bad_shapes_and_settings():
    with pytest.raises(ValueError, match="2-D"):
        quantizer.quantize(jnp.ones((128,)), 4)
    with pytest.raises(ValueError, match="multiple of 8"):
        quantizer.quantize(jnp.ones((128, 2)), 4, group_size=100)
    for bad in ((0.0,), (1.5,), (0.9, -1)):
        with pytest.raises(ValueError, match=r"clip ratios must be in \(0, 1\]"):
            quantizer.quantize(jnp.ones((128, 2)), 4, clip=bad)
    with pytest.raises(TypeError, match="clip must be"):
        quantizer.quantize(jnp.ones((128, 2)), 4, clip="x")
