"""Fused Pallas Adam step over quantized moments (polar, blockwise, π-Quant).

Per block of groups the kernel loads the gradient and the packed moments,
decodes them with the codec's own jnp group functions, takes Adam's step in
float32 (`moment_step`, fault rule included), encodes the new moments and
stores codes, scales (in place) and ``u``; with ``params`` given it applies
AdamW and writes the parameters in place instead of ``u``. One pass over the
state: the floor is bytes moved (`benchmarks/NOTES_kernels.md`). Stochastic
rounding draws the bits of the jnp path, so the codes equal
`adam_update_reference`'s.

This module is the public face of the kernels. The kernel is one loop
parameterised by an update rule over a list of moments: `rules.AdamRule` (two
moments to ``u``: `adam_update`, `adam_update_many`) or `rules.MomentumRule`
(Muon's momentum to ``m_hat``, `rules.momentum_step`, hyperparameters from
`rules.momentum_hp`); `rule_update` and `rule_update_many` run any rule under
a `launch_config`. The parts live beside it, each with its jnp reference:

* `optax_lowbit.kernels.codec_ops`: the codec-specific part: which codecs
  have a kernel (`has_kernel`), their tables, and how a block reads and
  writes codes, scales and values. Its reference is the codec's own group
  math in `optax_lowbit.codecs` (``kernel_decode`` / ``kernel_encode``).
  A pair whose groups differ (π-Quant's ``m`` beside a 4-bit ``v``) has no
  kernel (`kernel_codecs`): the optimizers step it through XLA.
* `optax_lowbit.kernels.rules`: the update rules: the kernel's inputs
  (`HP_FIELDS`, `make_hp`, `rules.momentum_hp`, `stream_seeds`), each
  rule's step (Adam's `moment_step`, `rules.momentum_step`) and
  `rules.reference_step`, the same step in jnp over a whole leaf (between
  the codecs' decode and encode it is what ``impl="jnp"`` and
  `adam_update_reference` run).
* `optax_lowbit.kernels.loop`: the shared element loop: the block body
  (load, compute, store) and the kernel over a group of leaves.
* `optax_lowbit.kernels.launch`: the ``pallas_call``: one leaf, many leaves
  in one launch, leaves sharded on leading axes (``shard_map``), the block
  choice.
* `optax_lowbit.kernels._backend`: interpreter or lowering.

The entry points are here, not in `launch`, because they resolve the tunables
below when called: `DEFAULT_BLOCK_GROUPS` (with `MAX_BLOCK_ELEMENTS`),
`DEFAULT_NUM_WARPS` (else `ELEMENTS_PER_THREAD`) and `LEAVES_PER_LAUNCH` are
attributes of this module that the step-speed benchmark sets at run time (for
every rule).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from optax_lowbit import _checks
from optax_lowbit.codecs import base
from optax_lowbit.kernels import _backend, codec_ops, launch, rules
from optax_lowbit.kernels.codec_ops import has_kernel
from optax_lowbit.kernels.rules import (
    HP_FIELDS,
    apply_leaf,
    apply_step,
    make_hp,
    moment_step,
    stream_seeds,
)

__all__ = [
    "DEFAULT_BLOCK_GROUPS",
    "DEFAULT_NUM_WARPS",
    "DEFAULT_PROGRAMS",
    "FLOAT_BLOCK_GROUPS",
    "FLOAT_LEAVES_PER_LAUNCH",
    "GROUPED_LEAVES_PER_LAUNCH",
    "HP_FIELDS",
    "IMPLS",
    "LEAVES_PER_LAUNCH",
    "MAX_BLOCK_ELEMENTS",
    "MAX_GROUPED_BLOCK_ELEMENTS",
    "PREFETCH",
    "SHARE_LONE_LEAVES",
    "adam_update",
    "adam_update_float_many",
    "adam_update_many",
    "adam_update_reference",
    "apply_leaf",
    "apply_step",
    "default_block_groups",
    "default_leaves_per_launch",
    "default_num_warps",
    "float_leaf_fits",
    "has_kernel",
    "kernel_codecs",
    "launch_config",
    "make_hp",
    "moment_step",
    "rule_update",
    "rule_update_many",
    "stream_seeds",
]

#: Groups per block and Triton warps. Time grows with elements per thread
#: (register spills): on an H100, 256M elements, stochastic 2-bit kernel: 64
#: groups / 4 warps 2.98 ms, 32 groups 2.42, 16 groups 2.13-2.24, 8 groups
#: 2.23-2.44 (benchmarks/NOTES_kernels.md, v3).
DEFAULT_BLOCK_GROUPS = 16
#: Triton warps per block for every launch when set; ``None`` (the default):
#: `default_num_warps` of the block's size.
DEFAULT_NUM_WARPS: int | None = None
#: Programs of every launch (`launch.LaunchConfig.programs`): ``None`` (the
#: default) one per block; ``0`` a persistent launch of
#: `launch.default_programs`; ``n > 0`` a persistent launch of ``n``.
#: Persistent launches compile one kernel per codec pair instead of one per
#: leaf shape, but step slower (on the H200 at v22, 256M leaf: polar2 1.23x
#: `optax.adamw` against 1.00x; benchmarks/NOTES_kernels.md, v22, v43).
DEFAULT_PROGRAMS: int | None = None
#: Whether persistent launches (`DEFAULT_PROGRAMS` set) load each program's
#: next block before stepping the current one (`launch.LaunchConfig.
#: prefetch`, `loop.kernel`): 0 (the default) or 1; launches of one program
#: per block have no next block and ignore it. Off: on an H200 (256M leaf,
#: fused, polar2) it made persistent launches ~11% faster (2.38 -> 2.12 ms)
#: but no faster than one program per block (1.81-2.05 ms), and polar1.5's
#: 8-22% slower than its default (benchmarks/NOTES_kernels.md, v43).
PREFETCH = 0
#: Elements of a default block each thread handles (`default_num_warps`). On
#: the H200 (256M leaf, fused step, 2026-12-04) each preset was fastest at 8:
#: 8-bit and 4-bit (2048-element blocks) with 8 warps (2.24 and 1.87 ms
#: against 2.76 and 2.05 with 4), polar 2-bit (1024) with 4 warps (2.09 ms
#: against 2.25 with 8); 2 warps were slower for all three
#: (benchmarks/NOTES_kernels.md, v17).
ELEMENTS_PER_THREAD = 8
#: The most warps `default_num_warps` picks.
MAX_NUM_WARPS = 8
#: The most elements a default block holds: codecs with larger groups get
#: fewer than `DEFAULT_BLOCK_GROUPS` groups per block (`default_block_groups`).
#: On the H200 the 8-bit kernel (groups of 256) ran 7-23% faster with 8 groups
#: (2048 elements) than with 16 in each of five sweeps, while polar (groups of
#: 64) is fastest at 16 (benchmarks/NOTES_kernels.md, v13).
MAX_BLOCK_ELEMENTS = 2048
#: The most leaves of one signature (group grid and dtypes) that
#: `adam_update_many` runs in one kernel launch, for every launch when set:
#: 1 launches one kernel per leaf (the pre-v6 path), 0 every leaf of a
#: signature in one launch; ``None`` (the default): `default_leaves_per_launch`
#: of the block's size. The kernel body is traced once per launch whatever
#: the count (benchmarks/NOTES_kernels.md, v6).
LEAVES_PER_LAUNCH: int | None = None
#: The largest block whose leaves `default_leaves_per_launch` groups. On the
#: H200 at v20 grouping 6 leaves slowed the 2048-element blocks (8 warps) of
#: 4-bit and 8-bit; with v25's kernels, 2 leaves a launch speed them up on an
#: H100 (GPT-2 small's fused step, device time 4-bit 0.996 -> 0.890 ms, 8-bit
#: 1.286 -> 1.118 ms; first-step compile 5.7 -> 5.3 s, 5.3 -> 4.9 s;
#: benchmarks/NOTES_kernels.md, v27).
MAX_GROUPED_BLOCK_ELEMENTS = 2048
#: The most leaves `default_leaves_per_launch` groups in one launch. On the
#: H200 with v25's kernels (GPT-2 small's fused step, polar2 / polar1.5,
#: device time, repeated to 0.002 ms): 1 leaf per launch 1.055 / 0.978 ms,
#: 2: 0.932 / 0.868, 3: 1.004 / 0.881, 6: 1.034 / 0.909; first-step compile
#: polar2 4.4 s at 2 against 7.4 s at 6 (benchmarks/NOTES_kernels.md, v27;
#: v20b had found 6 best with older, larger kernels).
GROUPED_LEAVES_PER_LAUNCH = 2
#: Whether the leaves a signature leaves alone (one of their shape, a pair's
#: odd one) share launches with each other, any shapes (v28:
#: `launch.many_leaves`). Off: on an H100 (JAX 0.11.2) it saved one Triton
#: compile of GPT-2 small's fused step but changed XLA's fusion of the step's
#: float-moment leaves, which no longer merged into a few multi-output loops:
#: 67 -> 152 kernels a step, device time 0.976 -> 1.047 ms (polar2; the same
#: call, benchmarks/NOTES_kernels.md, v29). 1 turns it on (benchmarks:
#: ``--share-lone-leaves 1``).
SHARE_LONE_LEAVES = 0
#: Groups of `codec_ops.FloatMoment` (16 values) per block of the
#: float-moment leaves' launches (`adam_update_float_many`): 1024 values, 4
#: warps, as the prototype measured on an H100 (benchmarks/NOTES_kernels.md,
#: v37).
FLOAT_BLOCK_GROUPS = 64
#: The most float-moment leaves of one launch (`adam_update_float_many`).
#: Triton's compile grows faster than the kernel's leaves (a branch of loads
#: and one of stores per leaf): on an H100 49 leaves a launch took a 23 s
#: first step, 14 a 1.5 s one (v37); 8 is a GPT-2 layer's float leaves,
#: so that a model of repeated layers launches few distinct leaf tuples.
FLOAT_LEAVES_PER_LAUNCH = 8
#: What ``impl`` of `adam_update` accepts (as the transforms' ``impl``).
IMPLS = ("pallas", "jnp", "auto")


def default_block_groups(group_size: int) -> int:
    """Groups per block for codecs of ``group_size`` when none is given.

    `DEFAULT_BLOCK_GROUPS` (read now), halved until a block holds at most
    `MAX_BLOCK_ELEMENTS` elements (at least one group).

    Args:
      group_size: the codecs' largest group size.

    Returns:
      A power of two.
    """
    groups = DEFAULT_BLOCK_GROUPS
    while groups > 1 and groups * group_size > MAX_BLOCK_ELEMENTS:
        groups //= 2
    return groups


def default_num_warps(block_elements: int) -> int:
    """Triton warps for a block of ``block_elements`` when none are given.

    `DEFAULT_NUM_WARPS` (read now) when set; else ``block_elements / (32 *
    ELEMENTS_PER_THREAD)`` rounded down to a power of two, between 1 and
    `MAX_NUM_WARPS`.

    Args:
      block_elements: elements of one block (groups per block times the
        group size).

    Returns:
      A power of two.
    """
    if DEFAULT_NUM_WARPS:
        return DEFAULT_NUM_WARPS
    warps = 1
    while warps < MAX_NUM_WARPS and 2 * warps * 32 * ELEMENTS_PER_THREAD <= (
        block_elements
    ):
        warps *= 2
    return warps


def default_leaves_per_launch(block_elements: int) -> int:
    """`LEAVES_PER_LAUNCH` (read now) when set; else by the block's size.

    Args:
      block_elements: elements of one block (groups per block times the
        group size).

    Returns:
      `GROUPED_LEAVES_PER_LAUNCH` for blocks of at most
      `MAX_GROUPED_BLOCK_ELEMENTS` elements, else 1 (one launch per leaf).
    """
    if LEAVES_PER_LAUNCH is not None:
        return LEAVES_PER_LAUNCH
    if block_elements <= MAX_GROUPED_BLOCK_ELEMENTS:
        return GROUPED_LEAVES_PER_LAUNCH
    return 1


def launch_config(
    rule: rules.Rule,
    codecs: Sequence[base.Codec],
    block_groups: int | None = None,
    num_warps: int | None = None,
    lowering: str | None = None,
) -> launch.LaunchConfig:
    """What a kernel of ``rule`` over ``codecs`` is launched with.

    Args:
      rule: the update rule (`rules.AdamRule`, `rules.MomentumRule`).
      codecs: each moment's codec (`has_kernel` must hold for the kernel).
      block_groups: groups per kernel block (a power of two); ``None``:
        `default_block_groups` of the codecs' largest group.
      num_warps: Triton warps per block; ``None``: `default_num_warps` of the
        block.
      lowering: force a GPU lowering (see `_backend.pick`).

    Returns:
      A `launch.LaunchConfig` (static: the jitted launches' cache key), with
      `DEFAULT_PROGRAMS` (read now) as its programs and, for a persistent
      launch, `PREFETCH` (read now) as its prefetch.

    Raises:
      TypeError, ValueError: `DEFAULT_PROGRAMS` is not ``None``, 0 or an
        int > 0; `PREFETCH` is not 0 or 1.
    """
    group_size = max(c.group_size for c in codecs)
    block_groups = block_groups or default_block_groups(group_size)
    programs = DEFAULT_PROGRAMS
    zero = type(programs) is int and programs == 0  # not False: a bool is no count
    if programs is not None and not zero:
        _checks.positive_int(
            "optax_lowbit.kernels.adam.DEFAULT_PROGRAMS (None, 0 or n > 0)", programs
        )
    if PREFETCH not in (0, 1) or type(PREFETCH) is not int:
        raise ValueError(
            f"optax_lowbit.kernels.adam.PREFETCH must be 0 or 1, got {PREFETCH!r}."
        )
    return launch.LaunchConfig(
        rule=rule,
        codecs=tuple(codecs),
        block_groups=block_groups,
        num_warps=num_warps
        or default_num_warps(launch.block_elements(block_groups, codecs)),
        lowering=lowering,
        programs=programs,
        # one program per block has no next block to load
        prefetch=bool(PREFETCH) and programs is not None,
    )


def rule_update(
    config: launch.LaunchConfig,
    g: jax.Array,
    moments: Sequence[base.Packed],
    hp: jax.Array,
    seeds: Any = None,
    params: jax.Array | None = None,
    impl: str = "pallas",
) -> tuple[jax.Array, tuple[base.Packed, ...]]:
    """One fused step of ``config.rule`` on one leaf: ``(out, new_moments)``.

    What `adam_update` runs, for any rule (Muon's momentum:
    ``launch_config(rules.MomentumRule(nesterov), (mu_codec,))`` and
    `rules.momentum_hp`; pass a float32 ``g`` for a float32 ``m_hat``).

    Args:
      config: `launch_config` of the rule and the moments' codecs.
      g: the gradient (update) leaf, any float dtype and shape.
      moments: each moment, `Packed` by its codec for ``g.shape``.
      hp: float32 ``(16,)``, the rule's hyperparameters (may be traced).
      seeds: one per moment, the ``seed`` argument `Codec.encode` would get
        for a stochastic codec (may be traced); ``None``: stream 0.
      params: the parameter leaf for the fused update-and-apply step (see
        `adam_update`), or ``None``.
      impl: ``"pallas"`` runs the kernel (the Pallas interpreter on CPU);
        ``"jnp"`` the same step in pure jnp (decode, `rules.reference_step`,
        encode; any codec; the launch options are then unused); ``"auto"``
        the kernel on GPU/TPU, jnp on CPU.

    Returns:
      The rule's output in ``g``'s dtype and shape (or the new ``params``),
      and the new moments (same layout).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}.")
    if _backend.use_pallas(impl):
        return launch.one_leaf(g, moments, hp, seeds, params, config)
    codecs = config.codecs
    seeds = (None,) * len(codecs) if seeds is None else tuple(seeds)
    decoded = [c.decode(m) for c, m in zip(codecs, moments, strict=True)]
    out, new = rules.reference_step(config.rule, g, decoded, hp, params)
    encoded = (c.encode(x, seed=s) for c, x, s in zip(codecs, new, seeds, strict=True))
    return out, tuple(encoded)


def rule_update_many(
    config: launch.LaunchConfig,
    gs: Sequence[jax.Array],
    moments: Sequence[Sequence[base.Packed]],
    hps: Sequence[jax.Array],
    seeds: Sequence[Any] | None = None,
    params: Sequence[jax.Array] | None = None,
    leaves_per_launch: int | None = None,
) -> list[tuple[jax.Array, tuple[base.Packed, ...]]]:
    """`rule_update` of many leaves, one kernel launch per leaf signature.

    See `adam_update_many`; ``moments`` and ``seeds`` hold, per leaf, one
    entry per moment of ``config.rule``.

    Args:
      config: `launch_config` of the rule and the moments' codecs.
      gs: gradient leaves.
      moments: per leaf, its moments.
      hps: one hyperparameter vector per leaf.
      seeds: per leaf, one seed per moment; an integer array ``(leaves,
        moments)`` of them (their streams then formed in one vector
        operation, `rules.seed_rows`); or ``None``.
      params: parameter leaves for the fused apply (or ``None``).
      leaves_per_launch: the most leaves of one launch (1: one launch per
        leaf, 0: no limit); ``None``: `default_leaves_per_launch`.

    Returns:
      One ``(out, new_moments)`` per leaf.
    """
    if leaves_per_launch is None:
        leaves_per_launch = default_leaves_per_launch(config.block_elements)
    return launch.many_leaves(
        gs,
        moments,
        hps,
        seeds,
        params,
        config,
        leaves_per_launch,
        share_lone=bool(SHARE_LONE_LEAVES),
    )


def adam_update(
    g: jax.Array,
    mu: base.Packed,
    nu: base.Packed,
    hp: jax.Array,
    *,
    mu_codec: base.Codec,
    nu_codec: base.Codec,
    nesterov: bool = False,
    seeds: Any = None,
    params: jax.Array | None = None,
    block_groups: int | None = None,
    num_warps: int | None = None,
    lowering: str | None = None,
    impl: str = "pallas",
) -> tuple[jax.Array, base.Packed, base.Packed]:
    """One fused Adam step of one leaf: ``(u, new_mu, new_nu)``.

    Args:
      g: the gradient (update) leaf, any float dtype and shape.
      mu: first moment, `Packed` by ``mu_codec`` for ``g.shape``.
      nu: second moment, `Packed` by ``nu_codec``.
      hp: float32 ``(16,)`` from `make_hp` (may be traced).
      mu_codec: codec of ``mu`` (`has_kernel` must hold for the kernel).
      nu_codec: codec of ``nu``.
      nesterov: Nesterov momentum, as `optax.scale_by_adam`.
      seeds: ``(mu_seed, nu_seed)``, the ``seed`` arguments `Codec.encode`
        would get for a stochastic codec (may be traced); ``None``: stream 0.
      params: the parameter leaf for the fused update-and-apply step: then
        the first output is the new parameter ``p − lr·(u + wd·p)`` (``lr``
        and ``wd`` from ``hp``) in ``params``' dtype, written in place of
        ``params`` (donate it), instead of ``u``.
      block_groups: groups per kernel block (a power of two); ``None``:
        `default_block_groups` of the codecs' group size.
      num_warps: Triton warps per block; ``None``: `default_num_warps`.
      lowering: force a GPU lowering (see `_backend.pick`).
      impl: ``"pallas"`` runs the kernel (the Pallas interpreter on CPU);
        ``"jnp"`` the same step in pure jnp (decode, `rules.reference_step`,
        encode; any codec; the launch options are then unused); ``"auto"`` the kernel on
        GPU/TPU, jnp on CPU.

    Returns:
      ``u`` in ``g``'s dtype and shape (or the new ``params``), and the new
      moments (same layout).
    """
    config = launch_config(
        rules.AdamRule(nesterov),
        (mu_codec, nu_codec),
        block_groups,
        num_warps,
        lowering,
    )
    out, (mu, nu) = rule_update(config, g, (mu, nu), hp, seeds, params, impl)
    return out, mu, nu


def kernel_codecs(mu_codec: base.Codec, nu_codec: base.Codec) -> tuple[Any, Any] | None:
    """The codecs the fused kernel steps Adam's pair as, or ``None`` (none).

    The pair itself where both codecs have a kernel (`has_kernel`) and share
    their group and the parts a kernel holds it in (`codec_ops.columns`);
    else ``None``: no kernel takes the pair (π-Quant's ``m`` in superblocks
    of 96 beside a 4-bit ``v`` in groups of 128), and the optimizers step
    its leaves through XLA.

    Args:
      mu_codec: the first moment's codec.
      nu_codec: the second moment's codec.

    Returns:
      ``(mu_codec, nu_codec)``, or ``None`` where the kernel takes no leaf
      of this pair.
    """
    if not (has_kernel(mu_codec) and has_kernel(nu_codec)):
        return None
    if mu_codec.group_size != nu_codec.group_size:
        return None
    if codec_ops.columns(mu_codec) != codec_ops.columns(nu_codec):
        return None
    return mu_codec, nu_codec


adam_update_reference = functools.partial(adam_update, impl="jnp")
adam_update_reference.__doc__ = """The same step in pure jnp: the definition.

`adam_update` with ``impl="jnp"`` (decode, `moment_step`, encode; any codec):
arguments and return values are those of `adam_update`.
"""


def adam_update_many(
    gs: Sequence[jax.Array],
    mus: Sequence[base.Packed],
    nus: Sequence[base.Packed],
    hps: Sequence[jax.Array],
    *,
    mu_codec: base.Codec,
    nu_codec: base.Codec,
    nesterov: bool = False,
    seeds: Sequence[Any] | None = None,
    params: Sequence[jax.Array] | None = None,
    block_groups: int | None = None,
    num_warps: int | None = None,
    lowering: str | None = None,
    leaves_per_launch: int | None = None,
) -> list[tuple[jax.Array, base.Packed, base.Packed]]:
    """`adam_update` of many leaves, one kernel launch per leaf signature.

    Leaves that share a signature (`launch.signature`: the group grid of
    their shape, the gradient's and the parameters' dtypes; GPT-2 small's 50
    quantized leaves have 6) run in one launch: the grid covers every such
    leaf's blocks and the kernel body is traced once, only its loads and
    stores choosing the leaf's buffers (`loop.kernel`); leaf ``k``'s
    hyperparameters and seeds are its own. The results equal `adam_update`
    leaf by leaf. Leaves sharded under explicit mesh axes are not batched:
    they take `adam_update` (per shard) one by one.

    Args:
      gs: gradient leaves.
      mus: their first moments.
      nus: their second moments.
      hps: one `make_hp` vector per leaf.
      mu_codec: codec of every ``mus`` entry.
      nu_codec: codec of every ``nus`` entry.
      nesterov: Nesterov momentum.
      seeds: one ``(mu_seed, nu_seed)`` per leaf (see `adam_update`), or an
        integer array ``(leaves, 2)`` of them.
      params: parameter leaves for the fused apply (or ``None``).
      block_groups: groups per block.
      num_warps: Triton warps.
      lowering: force a GPU lowering.
      leaves_per_launch: the most leaves of one launch (1: one launch per
        leaf, 0: no limit); ``None``: `default_leaves_per_launch`.

    Returns:
      One ``(out, new_mu, new_nu)`` per leaf.
    """
    config = launch_config(
        rules.AdamRule(nesterov),
        (mu_codec, nu_codec),
        block_groups,
        num_warps,
        lowering,
    )
    moments = list(zip(mus, nus, strict=True))
    results = rule_update_many(
        config, gs, moments, hps, seeds, params, leaves_per_launch
    )
    return [(out, mu, nu) for out, (mu, nu) in results]


def float_leaf_fits(g: Any, mu: Any, nu: Any, params: Any = None) -> bool:
    """Whether a leaf with plain float32 moments takes `adam_update_float_many`.

    The moments must be float32 arrays of the gradient's shape (not
    `base.Packed`), the gradient real floating (float32 with ``params``, so
    that the update applied is the float32 one the jnp path applies), the
    last axis a multiple of `codec_ops.FloatMoment`'s group (the moments are
    updated in place: a padded copy could not be), no axis of the leaf
    sharded under explicit mesh axes (XLA steps a sharded float leaf in
    place where it lies), and ``params`` (if given) a real floating
    array of the same shape.

    Args:
      g: the gradient leaf.
      mu: its first moment.
      nu: its second moment.
      params: its parameter leaf for the fused apply, or ``None``.

    Returns:
      ``True`` where the float kernel takes the leaf.
    """
    shape = tuple(jnp.shape(g))
    if not shape or shape[-1] % codec_ops.FloatMoment().group_size:
        return False
    if not all(
        isinstance(x, jax.Array) and x.dtype == jnp.float32 and tuple(x.shape) == shape
        for x in (mu, nu)
    ):
        return False
    real = jnp.issubdtype(g.dtype, jnp.floating)
    if params is not None:
        real = real and g.dtype == jnp.float32
        real = real and jnp.issubdtype(params.dtype, jnp.floating)
        real = real and tuple(params.shape) == shape
    return bool(real) and launch.explicit_spec(g) is None


def adam_update_float_many(
    gs: Sequence[jax.Array],
    mus: Sequence[jax.Array],
    nus: Sequence[jax.Array],
    hps: Sequence[jax.Array],
    *,
    nesterov: bool = False,
    params: Sequence[jax.Array] | None = None,
) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
    """`adam_update_many` of leaves whose moments are plain float32 arrays.

    The policy keeps small leaves' moments unquantized; stepped one by one
    in jnp, XLA fuses their many small graphs into a few loops, and that
    fusion is most of a fused step's first compile (GPT-2 small's 98 such
    leaves: ~1 s of an H100's; benchmarks/NOTES_kernels.md, v37). Here the
    kernel steps them as `codec_ops.FloatMoment`s, `FLOAT_LEAVES_PER_LAUNCH`
    leaves a launch (`launch.by_grid`), updating moments (and parameters)
    in place: the same `moment_step` and `apply_leaf` arithmetic as the jnp
    path, so the results are its bits. Every leaf must pass
    `float_leaf_fits`.

    Args:
      gs: gradient leaves.
      mus: their first moments, float32 arrays of the leaves' shapes.
      nus: their second moments.
      hps: one `make_hp` vector per leaf.
      nesterov: Nesterov momentum.
      params: parameter leaves for the fused apply (or ``None``).

    Returns:
      One ``(out, new_mu, new_nu)`` per leaf: ``u`` in the gradient's dtype
      (or the new parameters) and float32 moments.
    """
    codec = codec_ops.FloatMoment()
    config = launch_config(rules.AdamRule(nesterov), (codec, codec), FLOAT_BLOCK_GROUPS)
    # every block masked: leaves of any row counts share launches, so that a
    # model of repeated layers launches few distinct tuples of leaves (each
    # one traced and lowered on the host: GPT-2 small's 98 leaves in 12
    # launches of one tuple and one of two leaves)
    config = dataclasses.replace(config, masked=True)
    none = jnp.zeros((0,), jnp.float32)  # no scales (no operand either)

    def packed(x):
        return base.Packed(codes=x, scales=none, shape=tuple(x.shape), codec=codec)

    moments = [(packed(m), packed(v)) for m, v in zip(mus, nus, strict=True)]
    results = rule_update_many(
        config, gs, moments, hps, None, params, FLOAT_LEAVES_PER_LAUNCH
    )
    return [(out, mu.codes, nu.codes) for out, (mu, nu) in results]
