"""The shared element loop: Adam's step on one block, and its jnp reference.

Per block of groups `load_block` loads the gradient (and, with ``apply``,
the parameters) and the packed first and second moments (codes and scales);
`compute_block` decodes them with the codec's own jnp group functions
(``codec.kernel_decode``), updates the moments in float32 and computes Adam's
update with `moment_step` (the one definition of the step, fault rule
included, also run by the jnp path), with ``apply`` applies AdamW
(`apply_step`), and encodes the new moments (``codec.kernel_encode``);
`store_block` stores codes, scales and the output. `adam_kernel` runs them
over a group of leaves of one static signature: the loads and stores pick
the leaf's refs, the arithmetic between them is traced once.

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
    """The jnp reference of `compute_block` between decode and encode, on a leaf.

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


class _Io:
    """How a block reads and writes each operand of one leaf (`codec_ops`)."""

    def __init__(self, mu_codec: base.Codec, nu_codec: base.Codec):
        self.m, self.v = codec_ops.Codes(mu_codec), codec_ops.Codes(nu_codec)
        self.ms, self.vs = codec_ops.Scales(mu_codec), codec_ops.Scales(nu_codec)
        self.vals = codec_ops.Values(mu_codec)


def load_block(in_refs, row, valid, *, mu_codec, nu_codec, apply):
    """One block of one leaf's inputs, as loaded (no arithmetic).

    Args:
      in_refs: the leaf's ``g, [p], mu codes, mu scales, nu codes, nu
        scales`` refs.
      row: int32 ``(block,)`` the block's group rows within the leaf.
      valid: bool ``(block,)`` rows inside the leaf, or ``None`` for all.
      mu_codec: codec of the first moment.
      nu_codec: codec of the second moment.
      apply: whether ``p`` is among the refs (the fused apply).

    Returns:
      ``(g, p, mu_planes, mu_scales, nu_planes, nu_scales)``: ``g`` and ``p``
      (``None`` without ``apply``) as lists of value parts in their dtypes,
      the code planes and scales in `codec_ops`' layouts.
    """
    io = _Io(mu_codec, nu_codec)
    g_ref, refs = in_refs[0], in_refs[1:]
    p = io.vals.load(refs[0], row, valid) if apply else None
    mc_ref, ms_ref, vc_ref, vs_ref = refs[int(apply) :]
    return (
        io.vals.load(g_ref, row, valid),
        p,
        io.m.load(mc_ref, row, valid),
        io.ms.load(ms_ref, row, valid),
        io.v.load(vc_ref, row, valid),
        io.vs.load(vs_ref, row, valid),
    )


def compute_block(
    loaded,
    row,
    hp,
    seeds,
    offs_ref,
    m_tables,
    v_tables,
    *,
    mu_codec,
    nu_codec,
    nesterov,
    last,
    groups_per_row,
    lead_local,
    lead_global,
):
    """Decode, Adam step (and apply), encode: one block, from `load_block`'s arrays.

    Args:
      loaded: `load_block`'s ``(g, p, mu_planes, mu_scales, nu_planes,
        nu_scales)``.
      row: int32 ``(block,)`` the block's group rows within the leaf.
      hp: the leaf's `make_hp` slots (traced scalars).
      seeds: the leaf's two final stream seeds (traced uint32 scalars).
      offs_ref: the shard's offsets (`OFFS_LEN` slots).
      m_tables: the first moment's codec tables (refs).
      v_tables: the second moment's codec tables.
      mu_codec: codec of the first moment.
      nu_codec: codec of the second moment.
      nesterov: Nesterov momentum.
      last: the leaf's last axis.
      groups_per_row: groups along the leaf's last axis.
      lead_local: the leaf's (or shard's) group grid.
      lead_global: the whole leaf's group grid on a shard, else ``None``.

    Returns:
      ``(out, mu_planes, mu_scales, nu_planes, nu_scales)`` for `store_block`:
      ``out`` (``u``, or the new parameters) as a list of float32 value
      parts.
    """
    g_in, p_in, mc, ms, vc, vs = loaded
    vals = codec_ops.Values(mu_codec)

    def parts(x):  # a codec with parts decodes to (and encodes from) a list
        return [x] if vals.columns is None else list(x)

    def whole(xs):
        return xs[0] if vals.columns is None else xs

    g = [x.astype(jnp.float32) for x in g_in]
    m = parts(mu_codec.kernel_decode(mc, ms, m_tables))
    v = parts(nu_codec.kernel_decode(vc, vs, v_tables))
    if last % vals.size:  # the padded tail of each row holds zeros (as in jnp)
        inside = [c < last for c in vals.col(row, groups_per_row)]
        m = [jnp.where(i, x, 0.0) for i, x in zip(inside, m, strict=True)]
        v = [jnp.where(i, x, 0.0) for i, x in zip(inside, v, strict=True)]
    steps = [
        moment_step(*gmv, hp, nesterov=nesterov) for gmv in zip(g, m, v, strict=True)
    ]
    u, m, v = ([s[j] for s in steps] for j in range(3))
    if p_in is not None:
        p = [x.astype(jnp.float32) for x in p_in]
        u = [apply_step(pk, uk, hp) for pk, uk in zip(p, u, strict=True)]
    pair = None
    if mu_codec.stochastic or nu_codec.stochastic:
        grow = global_row(row, offs_ref, lead_local, lead_global)
        half = vals.size // 2
        pair = grow[:, None] * jnp.uint32(half) + jnp.arange(half, dtype=jnp.uint32)
    encoded = []
    for x, codec, tables, seed in (
        (m, mu_codec, m_tables, seeds[0]),
        (v, nu_codec, v_tables, seeds[1]),
    ):
        noise = base.dither_bits(pair, seed) if codec.stochastic else None
        encoded += codec.kernel_encode(whole(x), tables, noise)
    return (u, *encoded)


def store_block(out_refs, row, valid, result, *, mu_codec, nu_codec):
    """Stores `compute_block`'s ``result`` in one leaf's output refs.

    The output is cast to its ref's dtype (``g``'s, or the parameters').

    Args:
      out_refs: the leaf's ``out, mu codes, mu scales, nu codes, nu scales``
        refs.
      row: int32 ``(block,)`` the block's group rows within the leaf.
      valid: bool ``(block,)`` rows inside the leaf, or ``None`` for all.
      result: `compute_block`'s output.
      mu_codec: codec of the first moment.
      nu_codec: codec of the second moment.
    """
    io = _Io(mu_codec, nu_codec)
    out_ref, mc_out, ms_out, vc_out, vs_out = out_refs
    out, mc, ms, vc, vs = result
    io.vals.store(out_ref, row, [x.astype(out_ref.dtype) for x in out], valid)
    io.m.store(mc_out, row, mc, valid)
    io.ms.store(ms_out, row, ms, valid)
    io.v.store(vc_out, row, vc, valid)
    io.vs.store(vs_out, row, vs, valid)


def _split_refs(refs, mu_codec, nu_codec, n_leaves, apply):
    """``(m_tables, v_tables, per-leaf (inputs, outputs))`` from a kernel's refs."""
    n_mt, n_vt = len(mu_codec.kernel_tables()), len(nu_codec.kernel_tables())
    m_tables, refs = refs[:n_mt], refs[n_mt:]
    v_tables, refs = refs[:n_vt], refs[n_vt:]
    n_in = 5 + int(apply)
    ins, outs = refs[: n_in * n_leaves], refs[n_in * n_leaves :]
    leaves = [
        (ins[k * n_in : (k + 1) * n_in], outs[k * 5 : (k + 1) * 5])
        for k in range(n_leaves)
    ]
    return m_tables, v_tables, leaves


def _select(index, branches):
    """``branches[index]()``: a direct call for one branch, else ``lax.switch``.

    On the Triton lowering a switch is a chain of uniform scalar ``scf.if``
    (a program runs only its own branch's loads or stores).
    """
    if len(branches) == 1:
        return branches[0]()
    return jax.lax.switch(index, branches)


def adam_kernel(
    hp_ref,
    seed_ref,
    offs_ref,
    *refs,
    n_leaves,
    nblocks,
    block,
    n_rows,
    mu_codec,
    nu_codec,
    nesterov,
    apply,
    **statics,
):
    """The kernel over a group of leaves that share one static signature.

    The grid runs ``nblocks`` blocks of leaf 0, then of leaf 1, ...: program
    ``i`` takes block ``i % nblocks`` of leaf ``i // nblocks``. The body is
    traced once: only the loads (`load_block`) and the stores (`store_block`)
    choose the leaf's refs, by a ``lax.switch`` over the leaves (no switch
    for one leaf); decode, step and encode (`compute_block`) are shared, and
    the leaf's hyperparameters and seeds are read at its (traced) offsets.

    Args:
      hp_ref: every leaf's `make_hp` vector, flat (`HP_LEN` slots each).
      seed_ref: every leaf's two final stream seeds, flat.
      offs_ref: the shard's offsets (`OFFS_LEN` slots).
      *refs: the codecs' tables, each leaf's inputs, then each leaf's outputs.
      n_leaves: leaves in the group.
      nblocks: blocks per leaf.
      block: groups per block.
      n_rows: groups per leaf.
      mu_codec: codec of the first moment.
      nu_codec: codec of the second moment.
      nesterov: Nesterov momentum.
      apply: the fused apply (``p`` among each leaf's inputs).
      **statics: `compute_block`'s other static keywords (the leaves' shared
        ``last``, ``groups_per_row``, ``lead_local``, ``lead_global``).
    """
    codecs = dict(mu_codec=mu_codec, nu_codec=nu_codec)
    m_tables, v_tables, leaf_refs = _split_refs(
        refs, mu_codec, nu_codec, n_leaves, apply
    )
    i = pl.program_id(0)
    if n_leaves == 1:
        leaf, block_index = 0, i
    else:
        leaf = jax.lax.div(i, jnp.int32(nblocks))
        block_index = jax.lax.rem(i, jnp.int32(nblocks))  # as the block specs
    row = block_index * block + jnp.arange(block, dtype=jnp.int32)
    # the last block may run past the rows: masked loads and stores there
    valid = None if n_rows % block == 0 else row < n_rows
    loaded = _select(
        leaf,
        [
            functools.partial(load_block, ins, row, valid, apply=apply, **codecs)
            for ins, _ in leaf_refs
        ],
    )
    hp = [hp_ref[leaf * HP_LEN + k] for k in range(len(HP_FIELDS))]
    seeds = [seed_ref[leaf * 2 + k] for k in range(2)]
    kw = dict(nesterov=nesterov, **codecs, **statics)
    result = compute_block(loaded, row, hp, seeds, offs_ref, m_tables, v_tables, **kw)
    _select(
        leaf,
        [
            functools.partial(store_block, outs, row, valid, result, **codecs)
            for _, outs in leaf_refs
        ],
    )
