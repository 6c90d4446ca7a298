"""The shared element loop: an update rule's step on one block, and its jnp reference.

A kernel steps one *update rule* (`Rule`) over the moments it keeps, each
in its own codec: `AdamRule` (two moments, ``m`` and ``v``, to Adam's
update ``u``) and `MomentumRule` (one, Muon's momentum ``m``, to its
bias-corrected ``m_hat``). Per block of groups `load_block` loads the
gradient (and, with ``apply``, the parameters) and each packed moment (codes
and scales); `compute_block` decodes them with the codec's own jnp group
functions (``codec.kernel_decode``), takes the rule's step in float32 (its
``step``: `moment_step` for Adam, `momentum_step` for momentum, the one
definition of each step, fault rule included, also run by the jnp paths),
with ``apply`` applies AdamW (`apply_step`), and encodes the new moments
(``codec.kernel_encode``); `store_block` stores codes, scales and the
output. `kernel` runs them over a group of leaves of one static signature:
the loads and stores pick the leaf's refs, the arithmetic between them is
traced once.

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

import dataclasses
import functools
import math
from typing import Any, ClassVar

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
#: Slots of `MomentumRule`'s ``hp`` (`momentum_hp`).
MOMENTUM_HP_FIELDS = ("one_minus_beta", "inv_bc", "g_scale", "m_ratio")
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


def momentum_hp(beta, bc, bc_next=None) -> jax.Array:
    """The hyperparameter vector of `MomentumRule` (`MOMENTUM_HP_FIELDS`).

    ``1 - beta`` is formed here (in Python for a number), and the bias
    corrections' coefficients once per step, in float32: the jnp path
    (`momentum_step` on this vector) and the kernel then use the same
    numbers. ``g_scale = (1 - beta) / bc`` and ``m_ratio = beta bc / ((1 -
    beta) bc_next)`` make Nesterov's ``m_hat = g_scale (g + m_ratio new_m)``
    (finite for ``beta`` in ``[0, 1)``).

    Args:
      beta: the momentum's decay rate.
      bc: the bias correction ``1 - beta**t`` at the new count ``t``.
      bc_next: ``1 - beta**(t + 1)`` (read by Nesterov); ``None``: ``bc``.

    Returns:
      float32 ``(16,)``.
    """
    omb = jnp.asarray(1 - beta, jnp.float32)
    beta32 = jnp.asarray(beta, jnp.float32)
    bc = jnp.asarray(bc, jnp.float32)
    bc_next = bc if bc_next is None else jnp.asarray(bc_next, jnp.float32)
    vals = [omb, 1 / bc, omb / bc, beta32 * bc / (omb * bc_next)]
    vals = [v.reshape(()) for v in vals]
    vals += [jnp.zeros((), jnp.float32)] * (HP_LEN - len(vals))
    return jnp.stack(vals)


def stream_seeds(seeds: Any = None, n: int = 2) -> jax.Array:
    """The kernel's uint32 ``(8,)`` seed input: each moment's final stream.

    Args:
      seeds: one per moment (``(mu_seed, nu_seed)`` for Adam), the ``seed``
        arguments that `Codec.encode` would get, mixed here exactly as
        `Codec.encode` mixes them; ``None`` (or a ``None`` entry): stream 0.
      n: the number of moments (`Rule.n_moments`).

    Returns:
      The ``n`` final streams, padded with zeros to `SEED_LEN`.
    """
    seeds = (None,) * n if seeds is None else tuple(seeds)
    if len(seeds) != n:
        raise ValueError(f"seeds must be one per moment ({n}), got {seeds!r}.")
    out = [base.stream_seed(0 if s is None else s) for s in seeds]
    out += [jnp.zeros((), jnp.uint32)] * (SEED_LEN - n)
    return jnp.stack(out)


def momentum_step(g, m, hp, *, nesterov: bool):
    """Momentum's step of one leaf (Muon's): the one definition, for both paths.

    ``new_m = (1 - beta) g + beta m``; ``m_hat = beta new_m / bc_next + (1 -
    beta) g / bc`` with Nesterov, else ``new_m / bc``, as
    `optax.contrib.scale_by_muon`, in forms where every sum has at most one
    product operand: ``new_m = m + (1 - beta) (g - m)``, ``m_hat = new_m *
    inv_bc`` and Nesterov's ``m_hat = g_scale * (g + m_ratio * new_m)``
    (`momentum_hp`'s coefficients). A compiler that contracts a product and
    a sum into an FMA (XLA on the jnp path, the kernel's lowering) then has
    one way to do it, so the kernel and the jnp path round alike; a sum of
    two products (Optax's ``(1 - beta) g + beta m``) is contracted either
    way, and XLA turns a division by a scalar into a product with its
    reciprocal on the jnp path but not in a kernel. Optax's results are
    matched to rounding (an ulp or two). The
    momentum returned is the one to store (`base.saturate_or_keep`):
    saturated, and the old one where ``g`` is not finite. The jnp path of
    `scale_by_muon_quantized` calls it on whole leaves, `MomentumRule` on
    each block of the kernel.

    Args:
      g: the update, float32 (complex64 for a complex leaf's plain momentum).
      m: the momentum before the step (decoded), of ``g``'s dtype.
      hp: `momentum_hp`'s vector (an array or a kernel's traced scalars).
      nesterov: Nesterov momentum.

    Returns:
      ``(m_hat, m)``.
    """
    one_minus_beta, inv_bc, g_scale, m_ratio = hp[0], hp[1], hp[2], hp[3]
    new_m = m + one_minus_beta * (g - m)
    if nesterov:
        m_hat = g_scale * (g + m_ratio * new_m)
    else:
        m_hat = new_m * inv_bc
    return m_hat, base.saturate_or_keep(new_m, m, base.is_finite(g))


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


@dataclasses.dataclass(frozen=True)
class Rule:
    """An update rule: what a kernel computes between decode and encode.

    A rule keeps `n_moments` moments, each in its own codec; per element its
    `step` maps the update ``g`` and the decoded float32 moments to the
    output and the moments to store. A rule is static (hashable): it is part
    of `launch.LaunchConfig`.

    Attributes:
      nesterov: Nesterov momentum.
    """

    nesterov: bool = False
    #: The kernel's name prefix (``<name>_<codec>``).
    name: ClassVar[str] = ""
    #: Moments the rule keeps.
    n_moments: ClassVar[int] = 0
    #: The slots of its hyperparameter vector the kernel reads.
    hp_fields: ClassVar[tuple[str, ...]] = ()
    #: Whether it takes the fused AdamW apply (`apply_step`, ``params``).
    applies: ClassVar[bool] = False
    #: Per element, for the launch's ``pl.CostEstimate``.
    flops: ClassVar[int] = 0
    transcendentals: ClassVar[int] = 0

    def step(self, g, moments, hp):
        """``(out, new_moments)`` of one leaf or block, float32.

        Args:
          g: the update, float32.
          moments: the `n_moments` decoded moments before the step.
          hp: the rule's hyperparameter vector (`make_hp`'s slots).

        Returns:
          The output and the list of moments to store.
        """
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class AdamRule(Rule):
    """Adam (`moment_step`): ``m``, ``v`` -> ``u``; hp from `make_hp`."""

    name: ClassVar[str] = "adam"
    n_moments: ClassVar[int] = 2
    hp_fields: ClassVar[tuple[str, ...]] = HP_FIELDS
    applies: ClassVar[bool] = True
    flops: ClassVar[int] = 60
    transcendentals: ClassVar[int] = 2

    def step(self, g, moments, hp):
        """``(u, [m, v])``: `moment_step`."""
        u, m, v = moment_step(g, *moments, hp, nesterov=self.nesterov)
        return u, [m, v]


@dataclasses.dataclass(frozen=True)
class MomentumRule(Rule):
    """Muon's momentum (`momentum_step`): ``m`` -> ``m_hat``; hp from `momentum_hp`."""

    nesterov: bool = True
    name: ClassVar[str] = "momentum"
    n_moments: ClassVar[int] = 1
    hp_fields: ClassVar[tuple[str, ...]] = MOMENTUM_HP_FIELDS
    flops: ClassVar[int] = 30
    transcendentals: ClassVar[int] = 0

    def step(self, g, moments, hp):
        """``(m_hat, [m])``: `momentum_step`."""
        m_hat, m = momentum_step(g, moments[0], hp, nesterov=self.nesterov)
        return m_hat, [m]


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


def reference_step(rule: Rule, g, moments, hp, params):
    """The jnp reference of `compute_block` between decode and encode, on a leaf.

    Args:
      rule: the update rule.
      g: the gradient leaf, any float dtype.
      moments: the decoded moments, float32 of ``g``'s shape.
      hp: the rule's hyperparameter vector.
      params: the parameter leaf to apply the step to, or ``None``.

    Returns:
      ``(out, moments)``: the rule's output in ``g``'s dtype (or the new
      parameters in ``params``' dtype) and the float32 moments to encode.
    """
    out, moments = rule.step(g.astype(jnp.float32), list(moments), hp)
    if params is None:
        return out.astype(g.dtype), moments
    p = params.astype(jnp.float32)
    return apply_step(p, out, hp).astype(params.dtype), moments


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


def _ios(codecs):
    """Per moment, how a block reads and writes its codes and its scales."""
    return [(codec_ops.Codes(c), codec_ops.Scales(c)) for c in codecs]


def load_block(in_refs, row, valid, *, codecs, apply):
    """One block of one leaf's inputs, as loaded (no arithmetic).

    Args:
      in_refs: the leaf's ``g, [p]`` refs, then each moment's codes and
        scales refs.
      row: int32 ``(block,)`` the block's group rows within the leaf.
      valid: bool ``(block,)`` rows inside the leaf, or ``None`` for all.
      codecs: each moment's codec.
      apply: whether ``p`` is among the refs (the fused apply).

    Returns:
      ``(g, p, planes_0, scales_0, planes_1, ...)``: ``g`` and ``p``
      (``None`` without ``apply``) as lists of value parts in their dtypes,
      each moment's code planes and scales in `codec_ops`' layouts.
    """
    vals = codec_ops.Values(codecs[0])
    g_ref, refs = in_refs[0], in_refs[1:]
    p = vals.load(refs[0], row, valid) if apply else None
    state = refs[int(apply) :]
    loaded = [vals.load(g_ref, row, valid), p]
    for k, (codes, scales) in enumerate(_ios(codecs)):
        loaded += [
            codes.load(state[2 * k], row, valid),
            scales.load(state[2 * k + 1], row, valid),
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
    last,
    groups_per_row,
    lead_local,
    lead_global,
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
      last: the leaf's last axis.
      groups_per_row: groups along the leaf's last axis.
      lead_local: the leaf's (or shard's) group grid.
      lead_global: the whole leaf's group grid on a shard, else ``None``.

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
    if last % vals.size:  # the padded tail of each row holds zeros (as in jnp)
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
    pair = None
    if any(codec.stochastic for codec in codecs):
        grow = global_row(row, offs_ref, lead_local, lead_global)
        half = vals.size // 2
        pair = grow[:, None] * jnp.uint32(half) + jnp.arange(half, dtype=jnp.uint32)
    encoded = []
    for x, codec, tabs, seed in zip(moments, codecs, tables, seeds, strict=True):
        noise = base.dither_bits(pair, seed) if codec.stochastic else None
        encoded += codec.kernel_encode(whole(x), tabs, noise)
    return (out, *encoded)


def store_block(out_refs, row, valid, result, *, codecs):
    """Stores `compute_block`'s ``result`` in one leaf's output refs.

    The output is cast to its ref's dtype (``g``'s, or the parameters').

    Args:
      out_refs: the leaf's ``out`` ref, then each moment's codes and scales
        refs.
      row: int32 ``(block,)`` the block's group rows within the leaf.
      valid: bool ``(block,)`` rows inside the leaf, or ``None`` for all.
      result: `compute_block`'s output.
      codecs: each moment's codec.
    """
    vals = codec_ops.Values(codecs[0])
    out_ref, *state_refs = out_refs
    out, *state = result
    vals.store(out_ref, row, [x.astype(out_ref.dtype) for x in out], valid)
    for k, (codes, scales) in enumerate(_ios(codecs)):
        codes.store(state_refs[2 * k], row, state[2 * k], valid)
        scales.store(state_refs[2 * k + 1], row, state[2 * k + 1], valid)


def _split_refs(refs, codecs, n_leaves, apply):
    """``(tables per moment, per-leaf (inputs, outputs))`` from a kernel's refs."""
    tables = []
    for codec in codecs:
        n = len(codec.kernel_tables())
        tables.append(refs[:n])
        refs = refs[n:]
    n_out = 1 + 2 * len(codecs)
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


def kernel(
    hp_ref,
    seed_ref,
    offs_ref,
    *refs,
    rule,
    codecs,
    n_leaves,
    nblocks,
    block,
    n_rows,
    apply,
    **statics,
):
    """The kernel of ``rule`` over a group of leaves that share one signature.

    The grid runs ``nblocks`` blocks of leaf 0, then of leaf 1, ...: program
    ``i`` takes block ``i % nblocks`` of leaf ``i // nblocks``. The body is
    traced once: only the loads (`load_block`) and the stores (`store_block`)
    choose the leaf's refs, by a ``lax.switch`` over the leaves (no switch
    for one leaf); decode, step and encode (`compute_block`) are shared, and
    the leaf's hyperparameters and seeds are read at its (traced) offsets.

    Args:
      hp_ref: every leaf's hyperparameter vector (`make_hp`,
        `momentum_hp`), flat (`HP_LEN` slots each).
      seed_ref: every leaf's final stream seeds, flat (one per moment each).
      offs_ref: the shard's offsets (`OFFS_LEN` slots).
      *refs: the codecs' tables, each leaf's inputs, then each leaf's outputs.
      rule: the update rule (`AdamRule`, `MomentumRule`).
      codecs: each moment's codec (``rule.n_moments`` of them).
      n_leaves: leaves in the group.
      nblocks: blocks per leaf.
      block: groups per block.
      n_rows: groups per leaf.
      apply: the fused apply (``p`` among each leaf's inputs).
      **statics: `compute_block`'s other static keywords (the leaves' shared
        ``last``, ``groups_per_row``, ``lead_local``, ``lead_global``).
    """
    tables, leaf_refs = _split_refs(refs, codecs, n_leaves, apply)
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
            functools.partial(load_block, ins, row, valid, codecs=codecs, apply=apply)
            for ins, _ in leaf_refs
        ],
    )
    n = len(codecs)
    hp = [hp_ref[leaf * HP_LEN + k] for k in range(len(rule.hp_fields))]
    seeds = [seed_ref[leaf * n + k] for k in range(n)]
    kw = dict(rule=rule, codecs=codecs, **statics)
    result = compute_block(loaded, row, hp, seeds, offs_ref, tables, **kw)
    _select(
        leaf,
        [
            functools.partial(store_block, outs, row, valid, result, codecs=codecs)
            for _, outs in leaf_refs
        ],
    )
