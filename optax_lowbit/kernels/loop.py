"""The shared element loop: Adam's step on one block, and its jnp reference.

Per block of groups `leaf_body` loads the gradient, the packed first and
second moments (codes and scales); decodes them with the codec's own jnp
group functions (``codec.kernel_decode``); updates the moments in float32 and
computes Adam's update with `moment_step` (the one definition of the step,
fault rule included, also run by the jnp path); with ``apply``, applies AdamW
(`apply_step`); encodes the new moments (``codec.kernel_encode``) and stores
codes, scales and the output. `adam_kernel` runs it for one or many leaves.

Stochastic rounding draws the same bits as the jnp path: the counter-based
hash of each pair's row-major position in the leaf's pair grid
(`base.dither_bits`) under the stream seed `Codec.encode` would use
(`stream_seeds`).

`reference_step` is the jnp reference of this loop between decode and
encode: the same step over a whole leaf (the codecs' ``decode`` and
``encode`` around it make the path ``impl="jnp"`` takes). The per-codec
layouts are in `codec_ops`, the ``pallas_call`` in `launch`.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from optax_lowbit.codecs import base
from optax_lowbit.kernels import codec_ops

#: Slots of the hyperparameter vector ``hp`` (float32, length `HP_LEN`).
HP_FIELDS = (
    "b1",
    "one_minus_b1",
    "b2",
    "one_minus_b2",
    "eps",
    "eps_root",
    "bc1",
    "bc2",
    "bc1_next",
    "learning_rate",
    "weight_decay",
)
#: Lengths of the kernel's small inputs: hyperparameters, stream seeds, and
#: the leading axes of a leaf's group grid a shard may offset.
HP_LEN = 16
SEED_LEN = 8
OFFS_LEN = 8


def make_hp(
    b1,
    b2,
    eps,
    eps_root,
    bc1,
    bc2,
    bc1_next=None,
    learning_rate=0.0,
    weight_decay=0.0,
) -> jax.Array:
    """Packs the hyperparameters into the kernel's float32 ``(16,)`` input.

    ``1 - b1`` and ``1 - b2`` are formed here, as the jnp path forms them (in
    Python for numbers), so both paths use the same float32 constants.
    ``learning_rate`` and ``weight_decay`` are read only by the fused
    update-and-apply step.
    """
    vals = [
        b1,
        1 - b1,
        b2,
        1 - b2,
        eps,
        eps_root,
        bc1,
        bc2,
        bc1 if bc1_next is None else bc1_next,
        learning_rate,
        weight_decay,
    ]
    vals = [jnp.asarray(v, jnp.float32).reshape(()) for v in vals]
    vals += [jnp.zeros((), jnp.float32)] * (HP_LEN - len(vals))
    return jnp.stack(vals)


def stream_seeds(
    mu_codec: base.Codec, nu_codec: base.Codec, seeds: Any = None
) -> jax.Array:
    """The kernel's uint32 ``(8,)`` seed input: each moment's final stream.

    ``seeds`` is ``(mu_seed, nu_seed)``, the ``seed`` arguments that
    `Codec.encode` would get (``None``: stream 0), mixed here exactly as
    `Codec.encode` mixes them.
    """
    seeds = (None, None) if seeds is None else tuple(seeds)
    if len(seeds) != 2:
        raise ValueError(f"seeds must be (mu_seed, nu_seed), got {seeds!r}.")
    out = [base.stream_seed(0 if s is None else s) for s in seeds]
    out += [jnp.zeros((), jnp.uint32)] * (SEED_LEN - 2)
    return jnp.stack(out)


def moment_step(g, m, v, hp, *, nesterov: bool):
    """Adam's step of one leaf in float32: the one definition, for both paths.

    The fused kernels call it on each block, `reference_step` and the ``jnp``
    path of `scale_by_adam_quantized` on whole leaves.

    ``u`` is `optax.scale_by_adam`'s, from the float32 moments before they
    are stored: NaN where ``g`` is NaN or inf, as Optax's, and where ``v``
    overflowed to inf from a finite ``g`` (``|g|`` above about 1e19) 0, as
    Optax's (also where Optax's would be ``inf / inf``: a finite ``g`` never
    gives NaN). The moments returned are the ones to store
    (`base.saturate_or_keep`): saturated at ``±base.MAX_STORED``, and the old
    ones where ``g`` is not finite.

    Args:
      g: the update, float32.
      m: the first moment before the step (decoded), float32.
      v: the second moment, float32.
      hp: `make_hp`'s vector (an array or a kernel's ref).
      nesterov: Nesterov momentum, as `optax.scale_by_adam`.

    Returns:
      ``(u, m, v)``, float32.
    """
    b1, omb1, b2, omb2 = hp[0], hp[1], hp[2], hp[3]
    eps, eps_root, bc1, bc2 = hp[4], hp[5], hp[6], hp[7]
    new_m = omb1 * g + b1 * m
    new_v = omb2 * (g * g) + b2 * v
    if nesterov:
        m_hat = b1 * (new_m / hp[8]) + omb1 * (g / bc1)
    else:
        m_hat = new_m / bc1
    u = m_hat / (jnp.sqrt(new_v / bc2 + eps_root) + eps)
    ok = base.is_finite(g)
    u = jnp.where(ok & jnp.isnan(u), 0.0, u)
    return u, base.saturate_or_keep(new_m, m, ok), base.saturate_or_keep(new_v, v, ok)


def apply_step(p, u, hp):
    """AdamW's parameter update in float32, in optax's order of operations.

    ``add_decayed_weights`` then ``scale_by_learning_rate`` then
    ``apply_updates``: ``p + (-lr) * (u + wd * p)``.

    Args:
      p: the parameters, float32.
      u: `moment_step`'s update.
      hp: `make_hp`'s vector (an array or the kernel's traced scalars).

    Returns:
      The new parameters, float32.
    """
    return p + (-hp[9]) * (u + hp[10] * p)


def reference_step(g, m, v, hp, params, *, nesterov: bool):
    """The jnp reference of `leaf_body` between decode and encode, on a leaf.

    Args:
      g: the gradient leaf, any float dtype.
      m: the decoded first moment, float32 of ``g``'s shape.
      v: the decoded second moment.
      hp: `make_hp`'s vector.
      params: the parameter leaf to apply the step to, or ``None``.
      nesterov: Nesterov momentum.

    Returns:
      ``(out, m, v)``: ``u`` in ``g``'s dtype (or the new parameters in
      ``params``' dtype) and the float32 moments to encode.
    """
    u, m, v = moment_step(g.astype(jnp.float32), m, v, hp, nesterov=nesterov)
    if params is None:
        return u.astype(g.dtype), m, v
    return apply_step(params.astype(jnp.float32), u, hp).astype(params.dtype), m, v


def global_row(row, offs_ref, lead_local, lead_global):
    """uint32 row-major index of each local group row in the whole leaf.

    Unsharded (``lead_global`` is None) it is the row itself; on a shard the
    local row's multi-index over ``lead_local`` is shifted by the shard's
    offsets (``offs_ref``) and flattened over ``lead_global``, wrapping mod
    2**32 as `base.flat_index` does.

    Args:
      row: int32 ``(block,)`` local group rows.
      offs_ref: the shard's offsets along ``lead_local`` (`OFFS_LEN` slots).
      lead_local: the shard's group grid (leading axes, then groups).
      lead_global: the whole leaf's group grid, or ``None`` unsharded.

    Returns:
      uint32 ``(block,)``.
    """
    if lead_global is None:
        return row.astype(jnp.uint32)
    out = jnp.zeros(row.shape, jnp.uint32)
    stride = math.prod(lead_local)
    for d, (size, total) in enumerate(zip(lead_local, lead_global, strict=True)):
        stride //= size
        idx = (row // stride) % size + offs_ref[d]
        out = out * jnp.uint32(total & 0xFFFFFFFF) + idx.astype(jnp.uint32)
    return out


def leaf_body(
    hp_ref,
    seed_ref,
    offs_ref,
    m_tables,
    v_tables,
    leaf_refs,
    block_index,
    *,
    hp_base,
    seed_base,
    mu_codec,
    nu_codec,
    nesterov,
    apply,
    last,
    groups_per_row,
    block,
    n_rows,
    lead_local,
    lead_global,
):
    """One block of one leaf: load, decode, Adam step (apply), encode, store.

    ``leaf_refs`` are the leaf's ``g, [p], mu codes, mu scales, nu codes, nu
    scales`` inputs then its ``out, mu codes, mu scales, nu codes, nu scales``
    outputs; ``block_index`` is the block's index within the leaf; its
    hyperparameters and seeds start at ``hp_base`` / ``seed_base``.
    """
    g_ref, refs = leaf_refs[0], leaf_refs[1:]
    p_ref = refs[0] if apply else None
    refs = refs[int(apply) :]
    mc_ref, ms_ref, vc_ref, vs_ref, out_ref, mc_out, ms_out, vc_out, vs_out = refs
    hp = [hp_ref[hp_base + k] for k in range(len(HP_FIELDS))]  # traced scalars
    m_io, v_io = codec_ops.Codes(mu_codec), codec_ops.Codes(nu_codec)
    ms_io, vs_io = codec_ops.Scales(mu_codec), codec_ops.Scales(nu_codec)
    vals = codec_ops.Values(mu_codec)
    row = block_index * block + jnp.arange(block, dtype=jnp.int32)
    # the last block may run past the rows: masked loads and stores there
    valid = None if n_rows % block == 0 else row < n_rows

    def parts(x):  # a codec with parts decodes to (and encodes from) a list
        return [x] if vals.columns is None else list(x)

    def whole(xs):
        return xs[0] if vals.columns is None else xs

    g = [x.astype(jnp.float32) for x in vals.load(g_ref, row, valid)]
    m = parts(
        mu_codec.kernel_decode(
            m_io.load(mc_ref, row, valid), ms_io.load(ms_ref, row, valid), m_tables
        )
    )
    v = parts(
        nu_codec.kernel_decode(
            v_io.load(vc_ref, row, valid), vs_io.load(vs_ref, row, valid), v_tables
        )
    )
    if last % vals.size:  # the padded tail of each row holds zeros (as in jnp)
        inside = [c < last for c in vals.col(row, groups_per_row)]
        m = [jnp.where(i, x, 0.0) for i, x in zip(inside, m, strict=True)]
        v = [jnp.where(i, x, 0.0) for i, x in zip(inside, v, strict=True)]
    steps = [
        moment_step(*gmv, hp, nesterov=nesterov) for gmv in zip(g, m, v, strict=True)
    ]
    u, m, v = ([s[j] for s in steps] for j in range(3))
    if apply:
        p = [x.astype(jnp.float32) for x in vals.load(p_ref, row, valid)]
        u = [apply_step(pk, uk, hp) for pk, uk in zip(p, u, strict=True)]
    vals.store(out_ref, row, [x.astype(out_ref.dtype) for x in u], valid)
    pair = None
    if mu_codec.stochastic or nu_codec.stochastic:
        grow = global_row(row, offs_ref, lead_local, lead_global)
        half = vals.size // 2
        pair = grow[:, None] * jnp.uint32(half) + jnp.arange(half, dtype=jnp.uint32)
    for x, codec, tables, io, s_io, c_out, s_out, k in (
        (m, mu_codec, m_tables, m_io, ms_io, mc_out, ms_out, 0),
        (v, nu_codec, v_tables, v_io, vs_io, vc_out, vs_out, 1),
    ):
        seed = seed_ref[seed_base + k]
        noise = base.dither_bits(pair, seed) if codec.stochastic else None
        planes, scales = codec.kernel_encode(whole(x), tables, noise)
        io.store(c_out, row, planes, valid)
        s_io.store(s_out, row, scales, valid)


def _split_refs(refs, mu_codec, nu_codec, n_leaves, apply):
    """``(m_tables, v_tables, per-leaf refs)`` from a kernel's ref list."""
    n_mt, n_vt = len(mu_codec.kernel_tables()), len(nu_codec.kernel_tables())
    m_tables, refs = refs[:n_mt], refs[n_mt:]
    v_tables, refs = refs[:n_vt], refs[n_vt:]
    n_in = 5 + int(apply)
    ins, outs = refs[: n_in * n_leaves], refs[n_in * n_leaves :]
    leaves = [
        (*ins[k * n_in : (k + 1) * n_in], *outs[k * 5 : (k + 1) * 5])
        for k in range(n_leaves)
    ]
    return m_tables, v_tables, leaves


def adam_kernel(hp_ref, seed_ref, offs_ref, *refs, leaves, starts, common):
    """The kernel over one or many leaves (a ``pl.when`` branch per leaf).

    Args:
      hp_ref: every leaf's `make_hp` vector, flat (`HP_LEN` slots each).
      seed_ref: every leaf's two final stream seeds, flat.
      offs_ref: the shard's offsets (`OFFS_LEN` slots).
      *refs: the codecs' tables, each leaf's inputs, then each leaf's outputs.
      leaves: each leaf's static keywords of `leaf_body`.
      starts: each leaf's first block in the grid, then the grid's size.
      common: the static keywords of `leaf_body` all leaves share.
    """
    m_tables, v_tables, leaf_refs = _split_refs(
        refs, common["mu_codec"], common["nu_codec"], len(leaves), common["apply"]
    )
    i = pl.program_id(0)
    for k, (statics, leaf) in enumerate(zip(leaves, leaf_refs, strict=True)):
        body = functools.partial(
            leaf_body,
            hp_ref,
            seed_ref,
            offs_ref,
            m_tables,
            v_tables,
            leaf,
            hp_base=k * HP_LEN,
            seed_base=2 * k,
            **statics,
            **common,
        )
        if len(leaves) == 1:
            body(i)
        else:
            start, stop = starts[k], starts[k + 1]
            pl.when((i >= start) & (i < stop))(lambda body=body, s=start: body(i - s))
