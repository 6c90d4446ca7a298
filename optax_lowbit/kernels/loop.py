"""The shared element loop: an update rule's step on one block of groups.

A kernel steps one *update rule* (`optax_lowbit.kernels.rules`: `Rule`,
`AdamRule`, `MomentumRule`) over the moments it keeps, each in its own
codec. Per block of groups `load_block` loads the gradient (and, with
``apply``, the parameters) and each packed moment (codes and scales);
`compute_block` decodes them with the codec's own jnp group functions
(``codec.kernel_decode``), takes the rule's ``step`` in float32 (the one
definition of each step, also run by the jnp paths), with ``apply`` applies
AdamW (`rules.apply_step`), and encodes the new moments
(``codec.kernel_encode``); `store_block` stores codes, scales and the
output. `kernel` runs them over a group of leaves of any shapes (their
sizes a table, `sizes`; one program per block, or a persistent loop of each
program over blocks): the loads and stores pick the leaf's refs, the
arithmetic between them is traced once.

Stochastic rounding draws the same bits as the jnp path: the counter-based
words of each group's row-major position in the leaf's group grid
(`base.dither_bits`, `codec_ops.noise`) under the stream seed `Codec.encode` would use
(`rules.stream_seeds`).

The jnp reference of this loop between decode and encode is
`rules.reference_step` (the same step over a whole leaf; the codecs'
``decode`` and ``encode`` around it make the path ``impl="jnp"`` takes). The
per-codec layouts are in `codec_ops`, the ``pallas_call`` in `launch`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from optax_lowbit.codecs import base
from optax_lowbit.kernels import codec_ops
from optax_lowbit.kernels.rules import HP_LEN, apply_step

#: The leading axes of a leaf's group grid a shard may offset (the kernel's
#: ``offs`` input).
OFFS_LEN = 8


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
        # rows >= 0: truncating division and remainder, without `//` and
        # `%`'s sign fix-ups (v35)
        idx = jax.lax.rem(jax.lax.div(row, jnp.int32(stride)), jnp.int32(size))
        idx = idx + offs_ref[d]
        out = out * jnp.uint32(total & 0xFFFFFFFF) + idx.astype(jnp.uint32)
    return out


def _ios(codecs):
    """Per moment, how a block reads and writes its codes and its scales."""
    return [(codec_ops.Codes(c), codec_ops.Scales(c)) for c in codecs]


def block_offsets(row, *, codecs):
    """Where one block's rows are in a leaf's flat buffers (`codec_ops` layouts).

    Computed once per block, outside the per-leaf branches of a grouped
    launch: the offsets do not depend on which leaf the block is in, so the
    loads and stores of every leaf read them (each branch of the loads and
    of the stores would otherwise carry its own copy of the index
    arithmetic, which no compiler pass merges across branches: a longer
    module, and Triton's compile grows faster than its length; v25 in
    ``NOTES_kernels.md``).

    Args:
      row: int32 ``(block,)`` the block's group rows within the leaf.
      codecs: each moment's codec.

    Returns:
      ``(values, [(codes, scales) per moment])``: the value parts' offsets
      (gradient, parameters and output share them), each moment's code
      pieces' and scales' offsets (lists of int32 arrays).
    """
    vals = codec_ops.Values(codecs[0])
    state = [
        (codes.offsets(row), scales.offsets(row)) for codes, scales in _ios(codecs)
    ]
    return vals.offsets(row), state


def load_block(in_refs, offsets, valid, *, codecs, apply):
    """One block of one leaf's inputs, as loaded (no arithmetic).

    Args:
      in_refs: the leaf's ``g, [p]`` refs, then each moment's codes and
        scales refs.
      offsets: the block's `block_offsets`.
      valid: bool ``(block,)`` rows inside the leaf, or ``None`` for all.
      codecs: each moment's codec.
      apply: whether ``p`` is among the refs (the fused apply).

    Returns:
      ``(g, p, planes_0, scales_0, planes_1, ...)``: ``g`` and ``p``
      (``None`` without ``apply``) as lists of value parts in their dtypes,
      each moment's code planes and scales in `codec_ops`' layouts.
    """
    vals = codec_ops.Values(codecs[0])
    at_values, at_state = offsets
    g_ref, refs = in_refs[0], in_refs[1:]
    p = vals.load(refs[0], at_values, valid) if apply else None
    loaded = [vals.load(g_ref, at_values, valid), p]
    for (codes, scales), (c_ref, s_ref), (at_codes, at_scales) in zip(
        _ios(codecs), moment_refs(refs[int(apply) :], codecs), at_state, strict=True
    ):
        loaded += [
            codes.load(c_ref, at_codes, valid),
            scales.load(s_ref, at_scales, valid),
        ]
    return tuple(loaded)


def compute_block(
    loaded,
    row,
    hp,
    seeds,
    offs_ref,
    tables,
    *,
    rule,
    codecs,
    padded,
    lead_local,
    lead_global,
    last=None,
    groups_per_row=None,
):
    """Decode, the rule's step (and apply), encode: one block, from `load_block`.

    Args:
      loaded: `load_block`'s ``(g, p, planes_0, scales_0, ...)``.
      row: int32 ``(block,)`` the block's group rows within the leaf.
      hp: the leaf's ``rule.hp_fields`` slots (traced scalars).
      seeds: the leaf's final stream seeds, one per moment (traced uint32).
      offs_ref: the shard's offsets (`OFFS_LEN` slots).
      tables: each moment's codec tables (lists of refs).
      rule: the update rule.
      codecs: each moment's codec.
      padded: whether the leaf's rows end in a partial group (its padded
        tail is zeroed after decoding, as in jnp).
      lead_local: the shard's group grid (on a shard, else ``None``).
      lead_global: the whole leaf's group grid on a shard, else ``None``.
      last: the leaf's last axis (traced int32; with ``padded``).
      groups_per_row: groups along the leaf's last axis (traced int32; with
        ``padded``).

    Returns:
      ``(out, planes_0, scales_0, ...)`` for `store_block`: ``out`` (the
      rule's output, or the new parameters) as a list of float32 value parts.
    """
    g_in, p_in, *state = loaded
    vals = codec_ops.Values(codecs[0])

    def parts(x):  # a codec with parts decodes to (and encodes from) a list
        return [x] if vals.columns is None else list(x)

    def whole(xs):
        return xs[0] if vals.columns is None else xs

    g = [x.astype(jnp.float32) for x in g_in]
    moments = [
        parts(codec.kernel_decode(state[2 * k], state[2 * k + 1], tables[k]))
        for k, codec in enumerate(codecs)
    ]
    if padded:  # the padded tail of each row holds zeros (as in jnp)
        inside = [c < last for c in vals.col(row, groups_per_row)]
        moments = [
            [jnp.where(i, x, 0.0) for i, x in zip(inside, xs, strict=True)]
            for xs in moments
        ]
    steps = [rule.step(gk, [xs[k] for xs in moments], hp) for k, gk in enumerate(g)]
    out = [s[0] for s in steps]
    moments = [[s[1][j] for s in steps] for j in range(len(codecs))]
    if p_in is not None:
        p = [x.astype(jnp.float32) for x in p_in]
        out = [apply_step(pk, uk, hp) for pk, uk in zip(p, out, strict=True)]
    grow = None
    if any(codec.stochastic for codec in codecs):
        grow = global_row(row, offs_ref, lead_local, lead_global)[:, None]
    encoded = []
    for x, codec, tabs, seed in zip(moments, codecs, tables, seeds, strict=True):
        noise = None
        if codec.stochastic:
            noise = codec_ops.noise(codec, grow, seed)
        encoded += codec.kernel_encode(whole(x), tabs, noise)
    return (out, *encoded)


#: `compute_block` as the kernels call it: under `jax.jit` so that its trace
#: (the codecs' math, most of a kernel's) is cached by its arguments' types,
#: which do not depend on a leaf's shape: the launches of one step trace it
#: once, not once each (NOTES_kernels.md, v34). Pallas' lowering inlines the
#: call, so the kernel's Triton module is the same op for op.
COMPUTE_BLOCK_STATIC = ("rule", "codecs", "padded", "lead_local", "lead_global")
compute_block_traced_once = jax.jit(compute_block, static_argnames=COMPUTE_BLOCK_STATIC)


def store_block(out_refs, offsets, valid, result, *, codecs):
    """Stores `compute_block`'s ``result`` in one leaf's output refs.

    The output is cast to its ref's dtype (``g``'s, or the parameters').

    Args:
      out_refs: the leaf's ``out`` ref, then each moment's codes and scales
        refs.
      offsets: the block's `block_offsets`.
      valid: bool ``(block,)`` rows inside the leaf, or ``None`` for all.
      result: `compute_block`'s output.
      codecs: each moment's codec.
    """
    vals = codec_ops.Values(codecs[0])
    at_values, at_state = offsets
    out_ref, *state_refs = out_refs
    out, *state = result
    vals.store(out_ref, at_values, [x.astype(out_ref.dtype) for x in out], valid)
    for k, ((codes, scales), (c_ref, s_ref), (at_codes, at_scales)) in enumerate(
        zip(_ios(codecs), moment_refs(state_refs, codecs), at_state, strict=True)
    ):
        codes.store(c_ref, at_codes, state[2 * k], valid)
        scales.store(s_ref, at_scales, state[2 * k + 1], valid)


def state_operands(codecs) -> int:
    """A leaf's state operands in a launch: codes, and scales where kept.

    Each moment's codes, and its scales where it has any
    (`codec_ops.Scales.has_operand`).
    """
    return sum(1 + scales.has_operand for _, scales in _ios(codecs))


def moment_refs(refs, codecs):
    """Each moment's ``(codes_ref, scales_ref)`` among a leaf's state refs.

    ``refs`` are the leaf's `state_operands` refs in order; a moment
    without scales (`codec_ops.FloatMoment`) has ``None`` for its scales'.
    """
    out, at = [], 0
    for _, scales in _ios(codecs):
        out.append((refs[at], refs[at + 1] if scales.has_operand else None))
        at += 1 + scales.has_operand
    return out


def _split_refs(refs, codecs, n_leaves, apply):
    """``(tables per moment, per-leaf (inputs, outputs))`` from a kernel's refs."""
    tables = []
    for codec in codecs:
        n = len(codec.kernel_tables())
        tables.append(refs[:n])
        refs = refs[n:]
    n_out = 1 + state_operands(codecs)
    n_in = n_out + int(apply)
    ins, outs = refs[: n_in * n_leaves], refs[n_in * n_leaves :]
    leaves = [
        (ins[k * n_in : (k + 1) * n_in], outs[k * n_out : (k + 1) * n_out])
        for k in range(n_leaves)
    ]
    return tables, leaves


def _select(index, branches):
    """``branches[index]()``: a direct call for one branch, else ``lax.switch``.

    On the Triton lowering a switch is a chain of uniform scalar ``scf.if``
    (a program runs only its own branch's loads or stores).
    """
    if len(branches) == 1:
        return branches[0]()
    return jax.lax.switch(index, branches)


#: int32 slots per leaf in a launch's size table (`sizes`): the leaf's first
#: block in the launch, its group rows, its last axis, its groups per row.
SIZE_SLOTS = 4
FIRST, ROWS, LAST, GROUPS_PER_ROW = range(SIZE_SLOTS)


def blocks(shape: tuple[int, ...], group_size: int, block: int) -> int:
    """A leaf's blocks: its group rows in blocks of ``block`` (the last partial).

    Args:
      shape: the leaf's shape.
      group_size: the codecs' group size.
      block: groups per block.

    Returns:
      The programs a leaf takes in a launch of one program per block.
    """
    return -(-math.prod(base.group_grid(tuple(shape), group_size)) // block)


def sizes(shapes: Sequence[tuple[int, ...]], group_size: int, block: int) -> np.ndarray:
    """The size table of a launch over leaves of ``shapes``.

    Leaf ``k`` takes the launch's blocks from its ``FIRST`` slot on, one per
    ``block`` of its group rows. After the last leaf's slots come the
    launch's block count and a 0 (read in every trip of a persistent loop:
    `kernel`). The table is padded with zeros to a power-of-two length (a
    whole-array input), so its length depends on the number of leaves
    only: this table is the one place a leaf's shape enters a kernel.

    Args:
      shapes: each leaf's shape (a shard's, on a shard).
      group_size: the codecs' group size.
      block: groups per block.

    Returns:
      int32 ``(2**k,)``.

    Raises:
      ValueError: more blocks than an int32 counts.
    """
    table, first = [], 0
    for shape in shapes:
        grid = base.group_grid(shape, group_size)
        table += [first, math.prod(grid), base.lead_and_last(tuple(shape))[1], grid[-1]]
        first += blocks(shape, group_size, block)
    if first >= 2**31:
        raise ValueError(f"a launch of {first} blocks overflows the int32 table.")
    table += [first, 0]
    length = 1 << math.ceil(math.log2(len(table)))
    return np.pad(np.asarray(table, np.int32), (0, length - len(table)))


def kernel(
    hp_ref,
    seed_ref,
    offs_ref,
    size_ref,
    *refs,
    rule,
    codecs,
    n_leaves,
    block,
    apply,
    padded,
    ragged,
    persistent,
    prefetch=False,
    lead_local=None,
    lead_global=None,
):
    """The kernel of ``rule`` over a group of leaves of any shapes.

    Nothing in the body depends on a leaf's shape: the leaves' sizes are
    read from ``size_ref`` (`sizes`). Program ``i`` runs block ``i`` of the
    launch (one program per block), or, ``persistent``, a loop over blocks
    ``i, i + P, i + 2P, ...`` for the launch's ``P`` programs (a program
    past the last block runs none). A persistent launch's grid does not
    depend on the leaves either, so every launch of one rule, codec pair,
    block and number of leaves is one Triton module and grid, which XLA
    compiles once per step (its kernel cache keys on both). Block ``b``
    belongs to the last leaf whose first block is at most ``b``. The body
    is traced once: only the loads (`load_block`) and the stores
    (`store_block`) choose the leaf's refs, by a ``lax.switch`` over the
    leaves (no switch for one leaf); decode, step and encode
    (`compute_block`) are shared, and the leaf's hyperparameters, seeds and
    sizes are read at its (traced) offsets. Their trace is shared with the
    step's other launches too (`compute_block_traced_once`).

    With ``prefetch`` a persistent program loads its next block before it
    steps the current one (the loads carried across the loop's trips), so
    each program keeps its own reads in flight while it computes; the last
    trip's look-ahead re-reads the launch's last block and drops it. Blocks
    are disjoint, so reading block ``b + P`` before storing block ``b`` reads
    the same values; the codes, scales and outputs are those without it.

    Args:
      hp_ref: every leaf's hyperparameter vector (`make_hp`,
        `momentum_hp`), flat (`HP_LEN` slots each).
      seed_ref: every leaf's final stream seeds, flat (one per moment each).
      offs_ref: the shard's offsets (`OFFS_LEN` slots).
      size_ref: the launch's size table (`sizes`).
      *refs: the codecs' tables, each leaf's inputs, then each leaf's outputs.
      rule: the update rule (`AdamRule`, `MomentumRule`).
      codecs: each moment's codec (``rule.n_moments`` of them).
      n_leaves: leaves in the launch.
      block: groups per block.
      apply: the fused apply (``p`` among each leaf's inputs).
      padded: whether the leaves' rows end in a partial group.
      ragged: whether a leaf's last block runs past its rows (masked loads
        and stores; without, none are masked).
      persistent: whether each program loops over blocks.
      prefetch: with ``persistent``, load each trip's next block before
        stepping the current one.
      lead_local: a shard's group grid (on a shard, else ``None``).
      lead_global: the whole leaf's group grid on a shard, else ``None``.
    """
    tables, leaf_refs = _split_refs(refs, codecs, n_leaves, apply)
    pid = pl.program_id(0)
    n = len(codecs)

    def locate(b, zero):
        """Block ``b``'s leaf, rows, mask, shape arguments and offsets."""
        leaf = 0
        for k in range(1, n_leaves):
            leaf = leaf + (b >= size_ref[k * SIZE_SLOTS + FIRST]).astype(jnp.int32)
        slot = leaf * SIZE_SLOTS
        first = size_ref[slot + FIRST]
        row = (b - first) * block + (jnp.arange(block, dtype=jnp.int32) + zero)
        # a leaf's last block may run past its rows: masked loads and stores
        valid = row < size_ref[slot + ROWS] if ragged else None
        shape = {}
        if padded:
            shape = dict(
                last=size_ref[slot + LAST],
                groups_per_row=size_ref[slot + GROUPS_PER_ROW],
            )
        return leaf, row, valid, shape, block_offsets(row, codecs=codecs)

    def fetch(where):
        leaf, _, valid, _, offsets = where
        return _select(
            leaf,
            [
                functools.partial(
                    load_block, ins, offsets, valid, codecs=codecs, apply=apply
                )
                for ins, _ in leaf_refs
            ],
        )

    def finish(where, loaded):
        leaf, row, valid, shape, offsets = where
        hp = [hp_ref[leaf * HP_LEN + k] for k in range(len(rule.hp_fields))]
        seeds = [seed_ref[leaf * n + k] for k in range(n)]
        kw = dict(rule=rule, codecs=codecs, padded=padded)
        kw.update(lead_local=lead_local, lead_global=lead_global, **shape)
        result = compute_block_traced_once(
            loaded, row, hp, seeds, offs_ref, tables, **kw
        )
        _select(
            leaf,
            [
                functools.partial(
                    store_block, outs, offsets, valid, result, codecs=codecs
                )
                for _, outs in leaf_refs
            ],
        )

    def run(b, zero):
        where = locate(b, zero)
        finish(where, fetch(where))

    if not persistent:
        run(pid, 0)
        return
    programs = pl.num_programs(0)
    at = n_leaves * SIZE_SLOTS
    total = size_ref[at]
    trips = jax.lax.div(total - pid + programs - 1, programs)

    # The table's 0, loaded in every trip, is added to the rows: the
    # compiler then recomputes each trip's per-thread offsets instead of
    # holding them in registers across the loop (polar 2-bit fused,
    # offline: 89 -> 80 registers a thread, the same instructions).
    if not prefetch:

        def trip(t, carry):
            run(pid + t * programs, size_ref[at + 1])
            return carry

        jax.lax.fori_loop(0, trips, trip, jnp.int32(0))
        return
    last = jnp.maximum(total - 1, 0)

    def ahead(b):  # the look-ahead past the last block re-reads the last
        return fetch(locate(jnp.minimum(b, last), size_ref[at + 1]))

    def prefetched_trip(t, loaded):
        b = pid + t * programs
        following = ahead(b + programs)
        finish(locate(b, size_ref[at + 1]), loaded)
        return following

    jax.lax.fori_loop(0, trips, prefetched_trip, ahead(pid))
