"""Launching the fused kernels: one leaf, many leaves, sharded leaves.

Every launch runs `loop.kernel` with one update rule (`rules.AdamRule`,
`rules.MomentumRule`) over the moments it keeps: nothing here depends on the
rule but the number of moments. `one_leaf` runs the kernel over one leaf
(under ``jax.shard_map``, one launch per device, where the leaf is sharded
on leading axes under explicit mesh axes); `many_leaves` runs it over many
unsharded leaves, a few at a time per `signature` (dtypes, partial groups
and blocks), paired by `by_grid` (the kernel body traced once per launch).
Both end in `launch`, the one ``pallas_call``: it flattens every operand
(rows of one group each, no padded copies), passes what the kernel cannot
capture as inputs (hyperparameters, codec tables, stream seeds, shard
offsets, the leaves' sizes), and updates the state in place (aliased
inputs). No kernel module depends on a leaf's shape (v22): the sizes are a
table. One program per block (the default) the grid still does, so each
distinct grid is one compiled kernel (`by_grid` pairs leaves so that
launches share few); a *persistent* launch (`LaunchConfig.programs` set)
runs a fixed number of programs that loop over the blocks
(`default_programs`), so a step compiles one kernel per codec pair and
leaves per launch, and leaves of any shapes share a launch.

The jnp reference of a launch is the rule's step leaf by leaf (decode,
`rules.reference_step`, encode: `adam.rule_update` with ``impl="jnp"``): the
launch adds no arithmetic of its own.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec as P

from optax_lowbit.codecs import base
from optax_lowbit.kernels import _backend, codec_ops, loop, rules

#: One leaf's arrays for `launch`: ``(g, state, params, lead_global)``, with
#: ``state`` each moment's codes and scales, ``(codes_0, scales_0, ...)``.
Leaf = tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """What a kernel launch is compiled for (the jitted wrappers' static input).

    Attributes:
      rule: the update rule (`rules.AdamRule`, `rules.MomentumRule`).
      codecs: each moment's codec (`codec_ops.has_kernel`), as many as the
        rule keeps.
      block_groups: groups per block (a power of two).
      num_warps: Triton warps per block.
      lowering: a forced GPU lowering (see `_backend.pick`), or ``None``.
      programs: ``None``: one program per block (the grid follows the
        leaves' sizes); ``0``: `default_programs`; ``n > 0``: ``n``
        programs, each looping over the launch's blocks (a *persistent*
        launch: one grid, hence one compiled kernel, for every launch of a
        codec pair and number of leaves, whatever the leaves' shapes).
      prefetch: a persistent launch's programs load each next block before
        stepping the current one (`loop.kernel`); needs ``programs`` set.
      masked: every launch masks its blocks' loads and stores (`signature`
        then calls every leaf ragged): leaves that end in a whole block and
        leaves that do not share launches (the float-moment leaves' launches,
        whose masking costs little: `optax_lowbit.kernels.adam.
        adam_update_float_many`).
    """

    rule: rules.Rule
    codecs: tuple[base.Codec, ...]
    block_groups: int
    num_warps: int
    lowering: str | None = None
    programs: int | None = None
    prefetch: bool = False
    masked: bool = False

    def __post_init__(self):
        if self.prefetch and self.programs is None:
            raise ValueError(
                "LaunchConfig: prefetch=True needs a persistent launch "
                "(programs 0 or n > 0), got programs=None."
            )

    @property
    def block_elements(self) -> int:
        """Elements of one configured block (`block_elements`)."""
        return block_elements(self.block_groups, self.codecs)


def block_elements(block_groups: int, codecs: Sequence[base.Codec]) -> int:
    """Elements of a block of ``block_groups`` groups of the codecs' largest group."""
    return block_groups * max(c.group_size for c in codecs)


#: Warps per SM of a persistent launch's programs (`default_programs`): four
#: times what an SM keeps resident at 128 registers a thread (65536 / (128 x
#: 32) = 16 warps), so the SMs run as many programs as the kernel's registers
#: allow (polar 2-bit: 64-80, offline 54-108 for every kernel) and the
#: hardware scheduler balances the rest.
PERSISTENT_WARPS_PER_SM = 64
#: SMs assumed where the device does not say (lowering for CUDA on a CPU
#: host): an H100/H200's 132.
DEFAULT_SMS = 132
#: Programs of an interpreted persistent launch (CPU): few, so that they loop.
INTERPRET_PROGRAMS = 2


def default_programs(num_warps: int, interpret: bool) -> int:
    """Programs of a persistent launch: a few waves, whatever the leaves.

    The count does not depend on the leaves, so a step compiles one kernel
    per codec pair. Program ``i`` runs blocks ``i, i + P, ...``, so the
    programs' work is equal up to one block. One wave only (as many
    programs as stay resident) would cap the occupancy at what the assumed
    registers allow and, where fewer stay resident, run a second wave after
    the first (twice the time); several waves let the SMs keep as many
    programs as fit, and cost a launch of fewer blocks than programs its
    idle programs (each exits after reading the block count). A leaf of
    fewer blocks than programs runs one block per program, as without a
    persistent launch.

    Args:
      num_warps: Triton warps per block.
      interpret: whether the launch runs in the Pallas interpreter.

    Returns:
      The device's SMs (`DEFAULT_SMS` where it does not say) times
      ``PERSISTENT_WARPS_PER_SM // num_warps`` (at least 1);
      `INTERPRET_PROGRAMS` when interpreting.
    """
    if interpret:
        return INTERPRET_PROGRAMS
    device = jax.devices()[0]
    sms = getattr(device, "core_count", None) if device.platform == "gpu" else None
    return (sms or DEFAULT_SMS) * max(1, PERSISTENT_WARPS_PER_SM // num_warps)


def explicit_spec(x: jax.Array) -> tuple[Any, ...] | None:
    """The full-rank partition spec of a leaf sharded under explicit mesh axes.

    Reads the sharding in ``x``'s type (explicit mesh axes).

    Args:
      x: a leaf (may be traced).

    Returns:
      The spec, one entry per axis, or ``None`` if no axis is sharded.
    """
    sharding = jax.typeof(x).sharding
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty or x.ndim == 0:
        return None
    spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
    return None if all(s is None for s in spec) else spec


def lead_sharding(x: jax.Array) -> tuple[Any, tuple[Any, ...]] | None:
    """``(mesh, spec)`` of a leaf sharded on leading axes, else ``None``.

    Args:
      x: a leaf (may be traced).

    Returns:
      The mesh and the full-rank partition spec (`explicit_spec`), or
      ``None`` if unsharded.

    Raises:
      ValueError: the last axis (the groups' axis) is sharded.
    """
    spec = explicit_spec(x)
    if spec is None:
        return None
    if spec[-1] is not None:
        raise ValueError(
            f"the fused kernel needs the last axis unsharded (groups run along "
            f"it), got a leaf of shape {tuple(x.shape)} sharded as {spec}; "
            "shard leading axes, or use impl='jnp' for this optimizer."
        )
    return jax.typeof(x).sharding.mesh, spec


def one_leaf(
    g: jax.Array,
    moments: Sequence[base.Packed],
    hp: jax.Array,
    seeds: Any,
    params: jax.Array | None,
    config: LaunchConfig,
) -> tuple[jax.Array, tuple[base.Packed, ...]]:
    """One fused step of one leaf (checks, then the jitted launch).

    Args:
      g: the gradient leaf.
      moments: each moment, `Packed` by its codec in ``config.codecs``.
      hp: the rule's hyperparameter vector (`rules.make_hp`).
      seeds: one ``seed`` per moment as `Codec.encode` takes it, or ``None``.
      params: the parameter leaf to apply the step to (``None``: return the
        rule's output).
      config: the launch configuration.

    Returns:
      ``(out, new_moments)``.
    """
    final = rules.stream_seeds(seeds, len(config.codecs))
    return _checked_one_leaf(g, moments, hp, final, params, config)


def _checked_one_leaf(g, moments, hp, final, params, config):
    """`_check`, then `_one_leaf` with the leaf's final streams ``final``."""
    _check(g, params, config)
    return _one_leaf(g, tuple(moments), hp, final, params, config=config)


def _check(g: jax.Array, params: jax.Array | None, config: LaunchConfig) -> None:
    """Clear errors before tracing: the codecs, the parameters' shape."""
    if len(config.codecs) != config.rule.n_moments:
        raise ValueError(
            f"{type(config.rule).__name__} keeps {config.rule.n_moments} "
            f"moments, got {len(config.codecs)} codecs."
        )
    codec_ops.check_codecs(*config.codecs)
    if params is not None and not config.rule.applies:
        raise ValueError(f"{type(config.rule).__name__} has no fused apply.")
    if params is not None and tuple(params.shape) != tuple(g.shape):
        raise ValueError(
            f"params has shape {tuple(params.shape)}, the gradient {tuple(g.shape)}."
        )


def _state(moments: Sequence[base.Packed]) -> tuple[jax.Array, ...]:
    """``(codes_0, scales_0, codes_1, ...)``: a leaf's state as launched."""
    return tuple(x for m in moments for x in (m.codes, m.scales))


@functools.partial(jax.jit, static_argnames=("config",))
def _one_leaf(g, moments, hp, seeds, params, *, config):
    """The jitted body of `one_leaf`; ``seeds`` are the final stream seeds."""
    apply = params is not None
    sharded = lead_sharding(g)
    if sharded is None:
        offs = jnp.zeros((loop.OFFS_LEN,), jnp.int32)
        leaf = (g, _state(moments), params, None)
        out, *state = _launch_one(leaf, hp, seeds, offs, config)
    else:
        mesh, spec = sharded
        lead = spec[:-1]
        g_spec = P(*spec)
        state_specs = (P(*lead, None, None), P(*lead, None)) * len(moments)
        lead_global = (*g.shape[:-1], moments[0].codes.shape[-2])
        n_state = 2 * len(moments)

        def body(g, *rest):
            state, (hp, seeds, *p) = rest[:n_state], rest[n_state:]
            offs = [
                jnp.zeros((), jnp.int32)
                if axes is None
                else jax.lax.axis_index(axes).astype(jnp.int32) * size
                for axes, size in zip(lead, g.shape[:-1], strict=True)
            ]
            offs += [jnp.zeros((), jnp.int32)] * (loop.OFFS_LEN - len(offs))
            leaf = (g, state, p[0] if p else None, lead_global)
            return _launch_one(leaf, hp, seeds, jnp.stack(offs), config)

        out, *state = jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(g_spec, *state_specs, P(), P()) + ((g_spec,) if apply else ()),
            out_specs=(g_spec, *state_specs),
            check_vma=False,  # pallas_call outputs carry no varying-axes type
        )(g, *_state(moments), hp, seeds, *((params,) if apply else ()))
    return _repack(out, state, moments)


def _launch_one(leaf: Leaf, hp, seeds, offs, config: LaunchConfig):
    """`launch` over one leaf (or one device's shard of it).

    ``leaf``'s ``lead_global`` is the whole leaf's group grid on a shard (the
    stochastic-rounding positions), ``None`` unsharded. Returns ``(out,
    codes_0, scales_0, ...)`` shaped like the inputs.
    """
    n = len(config.codecs)
    hps, seeds = hp.reshape(1, -1), seeds.reshape(1, -1)[:, :n]
    (result,) = launch([leaf], hps, seeds, offs, config)
    return result


def _repack(out, state, moments):
    """``(out, new_moments)`` from a launch's arrays and the old moments."""
    new = tuple(
        base.Packed(codes=c, scales=s, shape=m.shape, codec=m.codec)
        for c, s, m in zip(state[::2], state[1::2], moments, strict=True)
    )
    return out, new


class Signature(NamedTuple):
    """What leaves must share to run in one launch (`signature`).

    Attributes:
      padded: the rows end in a partial group (the kernel zeroes the padded
        tail).
      ragged: the last block is partial (the kernel masks loads and stores).
      g_dtype: the gradient's dtype.
      p_dtype: the parameters' dtype (``None`` without the apply).
    """

    padded: bool
    ragged: bool
    g_dtype: Any
    p_dtype: Any


def signature(g: Any, params: Any, config: LaunchConfig) -> Signature:
    """What leaves must share to run in one launch.

    The kernel reads the leaves' sizes from its size table (`loop.sizes`),
    so leaves of any shapes can share a launch; which leaves do is
    `by_grid`'s choice.

    Args:
      g: the gradient leaf (or its shape and dtype).
      params: the parameter leaf of the fused apply, or ``None``.
      config: the launch configuration.

    Returns:
      The leaf's `Signature`.
    """
    shape = tuple(g.shape)
    gsize = config.codecs[0].group_size
    rows = math.prod(base.group_grid(shape, gsize))
    return Signature(
        padded=padded(shape, gsize),
        ragged=config.masked or bool(rows % config.block_groups),
        g_dtype=jnp.dtype(g.dtype),
        p_dtype=None if params is None else jnp.dtype(params.dtype),
    )


def shared(keys: Sequence[Signature]) -> Signature:
    """The signature one launch of leaves with ``keys`` runs under.

    The leaves must share their dtypes; a partial last group or block in any
    of them makes the kernel handle one for all (`padded`, `ragged`: read per
    leaf from the size table, so a whole leaf is unaffected).

    Args:
      keys: the leaves' signatures (`signature`).

    Returns:
      The launch's `Signature`.

    Raises:
      ValueError: leaves of different dtypes.
    """
    dtypes = {(k.g_dtype, k.p_dtype) for k in keys}
    if len(dtypes) > 1:
        raise ValueError(
            "one launch takes leaves of one gradient and parameter dtype, got "
            f"{sorted(str(d) for d in dtypes)}."
        )
    return Signature(
        padded=any(k.padded for k in keys),
        ragged=any(k.ragged for k in keys),
        g_dtype=keys[0].g_dtype,
        p_dtype=keys[0].p_dtype,
    )


def padded(shape: tuple[int, ...], group_size: int) -> bool:
    """Whether a leaf of ``shape``'s rows end in a partial group.

    Args:
      shape: the leaf's shape.
      group_size: the codecs' group size.

    Returns:
      ``True`` where the last axis is not a multiple of ``group_size``.
    """
    return bool(base.lead_and_last(tuple(shape))[1] % group_size)


def many_leaves(
    gs: Sequence[jax.Array],
    moments: Sequence[Sequence[base.Packed]],
    hps: Sequence[jax.Array],
    seeds: Sequence[Any] | None,
    params: Sequence[jax.Array] | None,
    config: LaunchConfig,
    leaves_per_launch: int | None = None,
    share_lone: bool = False,
) -> list[tuple[jax.Array, tuple[base.Packed, ...]]]:
    """`one_leaf` of many leaves: a few kernel launches per leaf signature.

    Unsharded leaves that share a `signature` (the gradient's and the
    parameters' dtypes, whether rows end in a partial group or the last
    block in a partial one) run in launches of at most ``leaves_per_launch``
    leaves, chosen by `by_grid` so that the launches share few grids (one
    compiled kernel each; persistent launches, whose grid is fixed, in
    order by `chunks`). With ``share_lone``, the leaves such a split
    leaves alone (one of their signature or block count) then share
    launches with each other, of at most as many leaves, by dtypes only
    (`shared`: one compiled kernel for them instead of one each; GPT-2
    small's two embeddings; off by default, `kadam.SHARE_LONE_LEAVES`).
    A leaf still alone and leaves sharded under explicit mesh axes take
    `one_leaf`.

    Args:
      gs: gradient leaves.
      moments: per leaf, its moments (one `Packed` per codec of ``config``).
      hps: one hyperparameter vector per leaf.
      seeds: per leaf, one ``seed`` per moment (or ``None``), an integer
        array ``(leaves, moments)`` of them (`rules.seed_rows`), or ``None``.
      params: parameter leaves for the fused apply, or ``None``.
      config: the launch configuration.
      leaves_per_launch: the most leaves of one launch (``None`` or 0: no
        limit; 1: one launch per leaf).
      share_lone: lone leaves share launches (v28; see above).

    Returns:
      One ``(out, new_moments)`` per leaf.
    """
    n = len(gs)
    n_moments = len(config.codecs)
    # every leaf's final streams in one vector operation (NOTES_kernels.md, v25)
    finals = rules.stream_seeds(rules.seed_rows(seeds, n, n_moments), n_moments)
    params = [None] * n if params is None else list(params)
    per_launch = max(1, leaves_per_launch or n)
    results: list[Any] = [None] * n
    groups: dict[tuple[Any, ...], list[int]] = {}
    singles = []
    for k, g in enumerate(gs):
        if lead_sharding(g) is not None or per_launch == 1:
            singles.append(k)
        else:
            groups.setdefault(signature(g, params[k], config), []).append(k)
    # With share_lone, a leaf left alone by its signature shares a launch with
    # the other lone leaves of its dtypes (any shapes, `shared` flags): one
    # compiled kernel for them all instead of one each (v28).
    launches, lone = [], {}
    gsize, block = config.codecs[0].group_size, config.block_groups
    for key, same in groups.items():
        if config.programs is not None:  # one grid: any leaves, in order
            runs = chunks(same, per_launch)
        else:
            shapes = [tuple(gs[k].shape) for k in same]
            sizes = [loop.blocks(x, gsize, block) for x in shapes]
            runs = by_grid(same, shapes, sizes, per_launch)
        for idx in runs:
            if len(idx) > 1 or not share_lone:
                launches.append(idx)
            else:
                lone.setdefault((key.g_dtype, key.p_dtype), []).append(idx[0])
    launches += [c for same in lone.values() for c in chunks(same, per_launch)]
    singles += [idx[0] for idx in launches if len(idx) == 1]
    for k in singles:  # `one_leaf`, with the final streams formed above
        results[k] = _checked_one_leaf(
            gs[k], moments[k], hps[k], finals[k], params[k], config
        )
    stochastic = any(c.stochastic for c in config.codecs)
    for idx in [idx for idx in launches if len(idx) > 1]:
        for k in idx:
            _check(gs[k], params[k], config)
        if stochastic:
            rows = jnp.take(finals, np.asarray(idx), axis=0)[:, :n_moments]
        else:  # unread: a constant, not one more slice kernel a launch (v37)
            rows = np.zeros((len(idx), n_moments), np.uint32)
        outs = _many_leaves(
            tuple(gs[k] for k in idx),
            tuple(tuple(moments[k]) for k in idx),
            jnp.stack([jnp.asarray(hps[k], jnp.float32) for k in idx]),
            rows,
            None if params[idx[0]] is None else tuple(params[k] for k in idx),
            config=config,
        )
        for k, out in zip(idx, outs, strict=True):
            results[k] = out
    return results


def by_grid(
    items: Sequence[Any],
    shapes: Sequence[tuple[int, ...]],
    blocks: Sequence[int],
    most: int,
) -> list[list[Any]]:
    """``items`` in launches of at most ``most`` that share few grids.

    One program per block, a launch's grid is its leaves' blocks together,
    and XLA compiles a kernel once per distinct module and grid (its kernel
    cache keys on both; the module does not depend on the leaves' shapes),
    while JAX traces and lowers a launch once per distinct tuple of leaf
    shapes (the larger cost on the host: ~30 ms each).
    Items of one block count form a class; each class's last ``len % most``
    run together (`chunks`, as few launches as possible); the others, sorted
    by blocks (largest first), then by shape (in order of first appearance,
    so that one shape's items stay together), then in order, are dealt into
    launches of ``most`` in snake order: launch ``j`` takes the ``j``-th
    item of every stripe of the sorted list, every other stripe read
    backwards; for two, the largest with the smallest. A model of repeated
    layers then runs a few grids and shape tuples: GPT-2 small's 48 layer
    matrices two of each (2304 + 576 and 2304 + 1728 blocks of polar's 1024
    elements) where pairs of one shape made three grids and four shape
    tuples (v31 in ``benchmarks/NOTES_kernels.md``: with v30 the first step's host
    part -0.13 s on an H100; its compile unchanged). Persistent launches (one
    grid for all) take `chunks` instead.

    Args:
      items: what to launch (leaf indices), in order.
      shapes: each item's leaf shape.
      blocks: each item's blocks (`loop.blocks`).
      most: the most items a launch (>= 1).

    Returns:
      The launches: every item once, the dealt launches first.
    """
    rank: dict[tuple[int, ...], int] = {}
    classes: dict[int, list[Any]] = {}
    for k, n in enumerate(blocks):
        rank.setdefault(tuple(shapes[k]), len(rank))
        classes.setdefault(n, []).append(k)
    dealt, rest = [], []
    for same in classes.values():
        cut = len(same) - len(same) % most
        dealt += same[:cut]
        rest += chunks([items[k] for k in same[cut:]], most)
    dealt.sort(key=lambda k: (-blocks[k], rank[tuple(shapes[k])], k))
    order = [items[k] for k in dealt]
    launches = len(order) // most
    stripes = [order[s * launches : (s + 1) * launches] for s in range(most)]
    stripes = [s if k % 2 == 0 else s[::-1] for k, s in enumerate(stripes)]
    return [[s[j] for s in stripes] for j in range(launches)] + rest


def chunks(items: Sequence[Any], most: int) -> list[list[Any]]:
    """``items`` in order, in the fewest runs of at most ``most``, as even as possible.

    Args:
      items: what to split.
      most: the longest run (>= 1).

    Returns:
      ``ceil(len(items) / most)`` runs whose lengths differ by at most one.
    """
    n = -(-len(items) // most)
    size, extra = divmod(len(items), max(n, 1))
    out, start = [], 0
    for k in range(n):
        stop = start + size + (k < extra)
        out.append(list(items[start:stop]))
        start = stop
    return out


@functools.partial(jax.jit, static_argnames=("config",))
def _many_leaves(gs, moments, hps, seeds, params, *, config):
    """The jitted body of `many_leaves`: one launch of one signature."""
    leaves = [
        (g, _state(ms), None if params is None else params[k], None)
        for k, (g, ms) in enumerate(zip(gs, moments, strict=True))
    ]
    offs = jnp.zeros((loop.OFFS_LEN,), jnp.int32)
    results = launch(leaves, hps, seeds, offs, config)
    return [
        _repack(out, state, ms)
        for (out, *state), ms in zip(results, moments, strict=True)
    ]


def whole(length: int) -> pl.BlockSpec:
    """The block spec of a whole flat operand of ``length`` elements.

    Indexed by element (`pl.Element`), so that the Triton lowering takes the
    block's start as the index map's 0 instead of multiplying a block index
    by the operand's length: the module then holds no operand's length.

    Args:
      length: the operand's elements.

    Returns:
      A `pl.BlockSpec` of the whole operand for any program.
    """
    return pl.BlockSpec((pl.Element(length),), lambda i: (0,))


def launch(
    leaves: Sequence[Leaf],
    hps: jax.Array,
    seeds: jax.Array,
    offs: jax.Array,
    config: LaunchConfig,
) -> list[tuple[jax.Array, ...]]:
    """One ``pallas_call`` over ``leaves`` of one dtype pair (`shared`).

    Every operand is a whole flat buffer and the leaves' sizes are a table
    (`loop.sizes`): the kernel's Triton module depends on the rule, the
    codecs, the block, the dtypes and the number of leaves only. The grid
    is one program per block, or with ``config.programs`` set a fixed number
    of programs that loop (persistent: then XLA compiles one kernel for
    every launch of a codec pair and number of leaves).

    Args:
      leaves: each ``(g, state, params, lead_global)``: ``state`` each
        moment's ``codes, scales``; ``params`` is ``None`` unless applying
        (the same for every leaf), ``lead_global`` the whole leaf's group
        grid on a shard.
      hps: float32 ``(L, 16)``, one hyperparameter vector per leaf.
      seeds: uint32 ``(L, n)`` final stream seeds, one per moment.
      offs: int32 ``(loop.OFFS_LEN,)`` the shard's offsets (zeros unsharded).
      config: the launch configuration.

    Returns:
      One ``(out, codes_0, scales_0, ...)`` per leaf.

    Raises:
      ValueError: leaves of different dtypes or shard layouts.
    """
    rule, codecs = config.rule, config.codecs
    backend = _backend.pick(config.lowering)
    gsize = codecs[0].group_size
    apply = leaves[0][2] is not None
    persistent = config.programs is not None
    key = shared([signature(x[0], x[2], config) for x in leaves])
    lead_global = leaves[0][3]
    if len({x[3] for x in leaves}) > 1:
        raise ValueError("one launch takes leaves of one shard layout.")
    if lead_global is not None and len(leaves) > 1:
        raise ValueError("a shard's launch takes one leaf.")
    ios = [(codec_ops.Codes(c), codec_ops.Scales(c)) for c in codecs]
    vals = codec_ops.Values(codecs[0])
    block = config.block_groups
    size_table = loop.sizes([x[0].shape for x in leaves], gsize, block)
    tables = [t for c in codecs for t in codec_ops.tables(c)]
    ins, out_shapes, aliases, nbytes, total = [], [], {}, 0, 0
    first = 4 + len(tables)  # after hp, seeds, offsets, sizes and the tables
    n_state = loop.state_operands(codecs)
    n_in = 1 + n_state + int(apply)
    for k, (g, state_in, p, _) in enumerate(leaves):
        rows = base.to_groups(g, gsize).reshape(-1, gsize)
        state = []
        for (c_io, s_io), c, s in zip(ios, state_in[::2], state_in[1::2], strict=True):
            state.append(c_io.operand(c))
            if s_io.has_operand:  # no operand for a moment without scales
                state.append(s_io.operand(s))
        out_dtype = g.dtype if p is None else p.dtype
        leaf_in = [vals.operand(rows)]
        if apply:
            # in its own dtype: the new parameters are written in place of it
            p_rows = base.to_groups(p, gsize).astype(p.dtype).reshape(-1, gsize)
            leaf_in.append(vals.operand(p_rows))
        leaf_in += state
        base_in = first + k * n_in
        base_out = (1 + n_state) * k
        for j in range(n_state):  # the state is updated in place
            aliases[base_in + 1 + int(apply) + j] = base_out + 1 + j
        if apply:
            aliases[base_in + 1] = base_out  # and the parameters
        ins += leaf_in
        out_shapes += [
            jax.ShapeDtypeStruct(leaf_in[0].shape, out_dtype),
            *(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in state),
        ]
        nbytes += sum(int(x.size) * x.dtype.itemsize for x in leaf_in)
        nbytes += rows.size * jnp.dtype(out_dtype).itemsize
        total += rows.size
    n_hp = 1 << max(0, math.ceil(math.log2(hps.size)))
    n_seed = max(rules.SEED_LEN, 1 << max(0, math.ceil(math.log2(seeds.size))))
    hp_flat = jnp.pad(hps.astype(jnp.float32).reshape(-1), (0, n_hp - hps.size))
    seed_flat = jnp.pad(seeds.reshape(-1), (0, n_seed - seeds.size))
    lead_local = None
    if lead_global is not None:
        lead_local = base.group_grid(tuple(leaves[0][0].shape), gsize)
    kernel = functools.partial(
        loop.kernel,
        rule=rule,
        codecs=tuple(codecs),
        n_leaves=len(leaves),
        block=block,
        apply=apply,
        padded=key.padded,
        ragged=key.ragged,
        persistent=persistent,
        prefetch=config.prefetch,
        lead_local=lead_local,
        lead_global=None if lead_global is None else tuple(lead_global),
    )
    if not persistent:
        programs = int(size_table[len(leaves) * loop.SIZE_SLOTS])  # the blocks
    else:
        programs = config.programs or default_programs(
            config.num_warps, backend.interpret
        )
    multi = len(leaves) > 1
    operands = (hp_flat, seed_flat, offs, jnp.asarray(size_table), *tables, *ins)
    outs = pl.pallas_call(
        kernel,
        out_shape=tuple(out_shapes),
        grid=(programs,),
        in_specs=[whole(x.shape[0]) for x in operands],
        out_specs=tuple(whole(x.shape[0]) for x in out_shapes),
        input_output_aliases=aliases,
        interpret=backend.interpret,
        compiler_params=backend.compiler_params(num_warps=config.num_warps),
        cost_estimate=pl.CostEstimate(
            flops=rule.flops * total,
            transcendentals=rule.transcendentals * total,
            bytes_accessed=2 * nbytes,
        ),
        name=f"{rule.name}_{codecs[0].name}" + (f"_x{len(leaves)}" if multi else ""),
    )(*operands)
    results = []
    width = 1 + n_state
    for k, (g, state_in, _, _) in enumerate(leaves):
        out, *state = outs[width * k : width * (k + 1)]
        grid = base.group_grid(tuple(g.shape), gsize)
        out = base.from_groups(out.reshape((*grid, gsize)), tuple(g.shape))
        new, state = iter(state), []
        for (_, s_io), c, s in zip(ios, state_in[::2], state_in[1::2], strict=True):
            state.append(next(new).reshape(c.shape))
            # a moment without scales keeps its own (empty) ones
            state.append(next(new).reshape(s.shape) if s_io.has_operand else s)
        results.append((out, *state))
    return results
