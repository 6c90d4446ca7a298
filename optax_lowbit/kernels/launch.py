"""Launching the fused Adam kernel: one leaf, many leaves, sharded leaves.

`one_leaf` runs `loop.adam_kernel` over one leaf (under ``jax.shard_map``,
one launch per device, where the leaf is sharded on leading axes under
explicit mesh axes); `many_leaves` runs it over many unsharded leaves, one
launch per `signature` (leaves of one group grid and dtypes: a grid over
every leaf's blocks, the kernel body traced once). Both end in `launch`, the one
``pallas_call``: it flattens leading axes to rows of one group each, picks
the block (`pick_block`; where the block does not divide the rows, the last
block's loads and stores are masked, no padded copies), passes what the kernel
cannot capture as inputs (hyperparameters, codec tables, stream seeds, shard
offsets), and updates the state in place (aliased inputs).

The jnp reference of a launch is the step of `adam.adam_update_reference`
leaf by leaf (decode, `loop.reference_step`, encode): the launch adds no
arithmetic of its own.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec as P

from optax_lowbit.codecs import base
from optax_lowbit.kernels import _backend, codec_ops, loop

#: One leaf's arrays for `launch`: ``(g, mu_codes, mu_scales, nu_codes,
#: nu_scales, params, lead_global)``.
Leaf = tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """What a kernel launch is compiled for (the jitted wrappers' static input).

    Attributes:
      mu_codec: codec of the first moment (`codec_ops.has_kernel`).
      nu_codec: codec of the second moment.
      nesterov: Nesterov momentum, as `optax.scale_by_adam`.
      block_groups: groups per block (a power of two).
      num_warps: Triton warps per block.
      lowering: a forced GPU lowering (see `_backend.pick`), or ``None``.
    """

    mu_codec: base.Codec
    nu_codec: base.Codec
    nesterov: bool
    block_groups: int
    num_warps: int
    lowering: str | None = None


def pick_block(n: int, block_groups: int) -> int:
    """Groups per block: ``block_groups``, or the power of two >= ``n`` (>= 8).

    Args:
      n: groups of the largest leaf of the launch.
      block_groups: the configured groups per block.

    Returns:
      The groups per block.
    """
    if n <= block_groups:
        return max(8, 1 << max(0, math.ceil(math.log2(max(n, 1)))))
    return block_groups


def lead_sharding(x: jax.Array) -> tuple[Any, tuple[Any, ...]] | None:
    """``(mesh, spec)`` of a leaf sharded on leading axes, else ``None``.

    Reads the sharding in ``x``'s type (explicit mesh axes).

    Args:
      x: a leaf (may be traced).

    Returns:
      The mesh and the full-rank partition spec, or ``None`` if unsharded.

    Raises:
      ValueError: the last axis (the groups' axis) is sharded.
    """
    sharding = jax.typeof(x).sharding
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty or x.ndim == 0:
        return None
    spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
    if all(s is None for s in spec):
        return None
    if spec[-1] is not None:
        raise ValueError(
            f"the fused kernel needs the last axis unsharded (groups run along "
            f"it), got a leaf of shape {tuple(x.shape)} sharded as {spec}; "
            "shard leading axes, or use impl='jnp' for this optimizer."
        )
    return mesh, spec


def one_leaf(
    g: jax.Array,
    mu: base.Packed,
    nu: base.Packed,
    hp: jax.Array,
    seeds: Any,
    params: jax.Array | None,
    config: LaunchConfig,
) -> tuple[jax.Array, base.Packed, base.Packed]:
    """One fused Adam step of one leaf (checks, then the jitted launch).

    Args:
      g: the gradient leaf.
      mu: first moment, `Packed` by ``config.mu_codec``.
      nu: second moment, `Packed` by ``config.nu_codec``.
      hp: `loop.make_hp`'s vector.
      seeds: ``(mu_seed, nu_seed)`` as `Codec.encode` takes them, or ``None``.
      params: the parameter leaf to apply the step to (``None``: return ``u``).
      config: the launch configuration.

    Returns:
      ``(out, new_mu, new_nu)``.
    """
    _check(g, params, config)
    final = loop.stream_seeds(config.mu_codec, config.nu_codec, seeds)
    return _one_leaf(g, mu, nu, hp, final, params, config=config)


def _check(g: jax.Array, params: jax.Array | None, config: LaunchConfig) -> None:
    """Clear errors before tracing: the codecs, the parameters' shape."""
    codec_ops.check_codecs(config.mu_codec, config.nu_codec)
    if params is not None and tuple(params.shape) != tuple(g.shape):
        raise ValueError(
            f"params has shape {tuple(params.shape)}, the gradient {tuple(g.shape)}."
        )


@functools.partial(jax.jit, static_argnames=("config",))
def _one_leaf(g, mu, nu, hp, seeds, params, *, config):
    """The jitted body of `one_leaf`; ``seeds`` are the final stream seeds."""
    apply = params is not None
    sharded = lead_sharding(g)
    if sharded is None:
        offs = jnp.zeros((loop.OFFS_LEN,), jnp.int32)
        leaf = (g, mu.codes, mu.scales, nu.codes, nu.scales, params, None)
        out, *state = _launch_one(leaf, hp, seeds, offs, config)
    else:
        mesh, spec = sharded
        lead = spec[:-1]
        g_spec = P(*spec)
        c_spec, s_spec = P(*lead, None, None), P(*lead, None)
        lead_global = (*g.shape[:-1], mu.codes.shape[-2])

        def body(g, mc, ms, vc, vs, hp, seeds, *p):
            offs = [
                jnp.zeros((), jnp.int32)
                if axes is None
                else jax.lax.axis_index(axes).astype(jnp.int32) * size
                for axes, size in zip(lead, g.shape[:-1], strict=True)
            ]
            offs += [jnp.zeros((), jnp.int32)] * (loop.OFFS_LEN - len(offs))
            leaf = (g, mc, ms, vc, vs, p[0] if p else None, lead_global)
            return _launch_one(leaf, hp, seeds, jnp.stack(offs), config)

        out, *state = jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(g_spec, c_spec, s_spec, c_spec, s_spec, P(), P())
            + ((g_spec,) if apply else ()),
            out_specs=(g_spec, c_spec, s_spec, c_spec, s_spec),
            check_vma=False,  # pallas_call outputs carry no varying-axes type
        )(
            g,
            mu.codes,
            mu.scales,
            nu.codes,
            nu.scales,
            hp,
            seeds,
            *((params,) if apply else ()),
        )
    return _repack(out, *state, mu, nu)


def _launch_one(leaf: Leaf, hp, seeds, offs, config: LaunchConfig):
    """`launch` over one leaf (or one device's shard of it).

    ``leaf``'s ``lead_global`` is the whole leaf's group grid on a shard (the
    stochastic-rounding positions), ``None`` unsharded. Returns ``(out,
    mu_codes, mu_scales, nu_codes, nu_scales)`` shaped like the inputs.
    """
    hps, seeds = hp.reshape(1, -1), seeds.reshape(1, -1)[:, :2]
    (result,) = launch([leaf], hps, seeds, offs, config)
    return result


def _repack(out, mc, ms, vc, vs, mu, nu):
    """``(out, new_mu, new_nu)`` from a launch's arrays and the old moments."""
    new_mu = base.Packed(codes=mc, scales=ms, shape=mu.shape, codec=mu.codec)
    new_nu = base.Packed(codes=vc, scales=vs, shape=nu.shape, codec=nu.codec)
    return out, new_mu, new_nu


def leaf_statics(
    shape: tuple[int, ...], group_size: int, lead_global: Any = None
) -> dict[str, Any]:
    """The static keywords of `loop.adam_kernel` that a leaf's shape fixes.

    Args:
      shape: the leaf's shape (a shard's, on a shard).
      group_size: the codecs' group size.
      lead_global: the whole leaf's group grid on a shard, else ``None``.

    Returns:
      ``{"last", "groups_per_row", "n_rows", "lead_local", "lead_global"}``.
    """
    lead, last = base.lead_and_last(tuple(shape))
    lead_local = (*lead, base.num_groups(tuple(shape), group_size))
    return dict(
        last=last,
        groups_per_row=lead_local[-1],
        n_rows=math.prod(lead_local),
        lead_local=lead_local,
        lead_global=None if lead_global is None else tuple(lead_global),
    )


def signature(g: Any, params: Any, group_size: int) -> tuple[Any, ...]:
    """What leaves must share to run in one launch: statics and dtypes.

    Args:
      g: the gradient leaf (or its shape and dtype).
      params: the parameter leaf of the fused apply, or ``None``.
      group_size: the codecs' group size.

    Returns:
      A hashable key: `leaf_statics` of an unsharded leaf, ``g``'s dtype
      and ``params``' (``None`` without the apply).
    """
    statics = leaf_statics(tuple(g.shape), group_size)
    p_dtype = None if params is None else jnp.dtype(params.dtype)
    return (tuple(statics.items()), jnp.dtype(g.dtype), p_dtype)


def many_leaves(
    gs: Sequence[jax.Array],
    mus: Sequence[base.Packed],
    nus: Sequence[base.Packed],
    hps: Sequence[jax.Array],
    seeds: Sequence[Any] | None,
    params: Sequence[jax.Array] | None,
    config: LaunchConfig,
    leaves_per_launch: int | None = None,
) -> list[tuple[jax.Array, base.Packed, base.Packed]]:
    """`one_leaf` of many leaves: one kernel launch per leaf signature.

    Unsharded leaves that share a `signature` (their group grid, the
    gradient's and the parameters' dtypes) run in one launch, at most
    ``leaves_per_launch`` at a time, in order; a leaf alone in its signature
    and leaves sharded under explicit mesh axes take `one_leaf`.

    Args:
      gs: gradient leaves.
      mus: their first moments.
      nus: their second moments.
      hps: one `loop.make_hp` vector per leaf.
      seeds: one ``(mu_seed, nu_seed)`` per leaf, or ``None``.
      params: parameter leaves for the fused apply, or ``None``.
      config: the launch configuration.
      leaves_per_launch: the most leaves of one launch (``None``: no limit;
        1: one launch per leaf).

    Returns:
      One ``(out, new_mu, new_nu)`` per leaf.
    """
    n = len(gs)
    seeds = [None] * n if seeds is None else list(seeds)
    params = [None] * n if params is None else list(params)
    per_launch = max(1, leaves_per_launch or n)
    gsize = config.mu_codec.group_size
    results: list[Any] = [None] * n
    groups: dict[tuple[Any, ...], list[int]] = {}
    for k, g in enumerate(gs):
        if lead_sharding(g) is not None or per_launch == 1:
            results[k] = one_leaf(
                gs[k], mus[k], nus[k], hps[k], seeds[k], params[k], config
            )
        else:
            groups.setdefault(signature(g, params[k], gsize), []).append(k)
    chunks = [
        idx[c : c + per_launch]
        for idx in groups.values()
        for c in range(0, len(idx), per_launch)
    ]
    for idx in chunks:
        if len(idx) == 1:
            k = idx[0]
            results[k] = one_leaf(
                gs[k], mus[k], nus[k], hps[k], seeds[k], params[k], config
            )
            continue
        for k in idx:
            _check(gs[k], params[k], config)
        final = jnp.stack(
            [
                loop.stream_seeds(config.mu_codec, config.nu_codec, seeds[k])[:2]
                for k in idx
            ]
        )
        outs = _many_leaves(
            tuple(gs[k] for k in idx),
            tuple(mus[k] for k in idx),
            tuple(nus[k] for k in idx),
            jnp.stack([jnp.asarray(hps[k], jnp.float32) for k in idx]),
            final,
            None if params[idx[0]] is None else tuple(params[k] for k in idx),
            config=config,
        )
        for k, out in zip(idx, outs, strict=True):
            results[k] = out
    return results


@functools.partial(jax.jit, static_argnames=("config",))
def _many_leaves(gs, mus, nus, hps, seeds, params, *, config):
    """The jitted body of `many_leaves`: one launch of one signature."""
    leaves = [
        (
            g,
            m.codes,
            m.scales,
            v.codes,
            v.scales,
            None if params is None else params[k],
            None,
        )
        for k, (g, m, v) in enumerate(zip(gs, mus, nus, strict=True))
    ]
    offs = jnp.zeros((loop.OFFS_LEN,), jnp.int32)
    results = launch(leaves, hps, seeds, offs, config)
    return [
        _repack(*arrays, m, v) for arrays, m, v in zip(results, mus, nus, strict=True)
    ]


def launch(
    leaves: Sequence[Leaf],
    hps: jax.Array,
    seeds: jax.Array,
    offs: jax.Array,
    config: LaunchConfig,
) -> list[tuple[jax.Array, ...]]:
    """One ``pallas_call`` over ``leaves`` of one `signature`.

    The grid runs every leaf's blocks, leaf after leaf (``nb`` each); leaf
    ``k``'s block specs map program ``i`` to block ``i % nb`` (a program
    touches only its own leaf's refs: `loop.adam_kernel`).

    Args:
      leaves: each ``(g, mu_codes, mu_scales, nu_codes, nu_scales, params,
        lead_global)``; ``params`` is ``None`` unless applying (the same for
        every leaf), ``lead_global`` the whole leaf's group grid on a shard.
      hps: float32 ``(L, 16)``, one `loop.make_hp` vector per leaf.
      seeds: uint32 ``(L, 2)`` final stream seeds.
      offs: int32 ``(loop.OFFS_LEN,)`` the shard's offsets (zeros unsharded).
      config: the launch configuration.

    Returns:
      One ``(out, mu_codes, mu_scales, nu_codes, nu_scales)`` per leaf.

    Raises:
      ValueError: leaves of different signatures.
    """
    mu_codec, nu_codec = config.mu_codec, config.nu_codec
    backend = _backend.pick(config.lowering)
    gsize = mu_codec.group_size
    apply = leaves[0][5] is not None
    keys = {signature(x[0], x[5], gsize) for x in leaves}
    if len(keys) > 1 or len({x[6] for x in leaves}) > 1:
        raise ValueError(
            f"one launch takes leaves of one signature, got {len(keys)}: "
            f"{sorted(str(k) for k in keys)}."
        )
    m_io, v_io = codec_ops.Codes(mu_codec), codec_ops.Codes(nu_codec)
    ms_io, vs_io = codec_ops.Scales(mu_codec), codec_ops.Scales(nu_codec)
    vals = codec_ops.Values(mu_codec)
    statics = leaf_statics(leaves[0][0].shape, gsize, leaves[0][6])
    n = statics["n_rows"]
    block = pick_block(n, config.block_groups)
    nb = pl.cdiv(n, block)
    multi = len(leaves) > 1

    def index_map(i):
        return (jax.lax.rem(i, jnp.int32(nb)) if multi else i, 0)

    def row_spec(width):
        return pl.BlockSpec((block, width), index_map)

    def code_spec(io):
        return row_spec(io.nbytes) if io.blocked else io.spec(block)

    def full_spec(length):
        return pl.BlockSpec((length,), lambda i: (0,))

    specs = [
        code_spec(m_io),
        ms_io.spec(row_spec(1)),
        code_spec(v_io),
        vs_io.spec(row_spec(1)),
    ]
    value_spec = vals.spec(row_spec(gsize))
    tables = codec_ops.tables(mu_codec) + codec_ops.tables(nu_codec)
    ins, out_shapes, aliases, nbytes = [], [], {}, 0
    first = 3 + len(tables)  # after hp, seeds, offsets and the tables
    n_in = 5 + int(apply)
    for k, (g, mc, ms, vc, vs, p, _) in enumerate(leaves):
        rows_g = vals.operand(base.to_groups(g, gsize).reshape(n, gsize))
        state = [
            m_io.operand(mc),
            ms_io.operand(ms, n),
            v_io.operand(vc),
            vs_io.operand(vs, n),
        ]
        out_dtype = g.dtype if p is None else p.dtype
        leaf_in = [rows_g]
        if apply:
            # in its own dtype: the new parameters are written in place of it
            p_rows = base.to_groups(p, gsize).astype(p.dtype).reshape(n, gsize)
            leaf_in.append(vals.operand(p_rows))
        leaf_in += state
        base_in = first + k * n_in
        base_out = 5 * k
        for j in range(4):  # the state is updated in place
            aliases[base_in + 1 + int(apply) + j] = base_out + 1 + j
        if apply:
            aliases[base_in + 1] = base_out  # and the parameters
        ins += leaf_in
        out_shapes += [
            jax.ShapeDtypeStruct(rows_g.shape, out_dtype),
            *(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in state),
        ]
        nbytes += sum(int(x.size) * x.dtype.itemsize for x in leaf_in)
        nbytes += n * gsize * jnp.dtype(out_dtype).itemsize
    n_hp = 1 << max(0, math.ceil(math.log2(hps.size)))
    n_seed = max(loop.SEED_LEN, 1 << max(0, math.ceil(math.log2(seeds.size))))
    hp_flat = jnp.pad(hps.astype(jnp.float32).reshape(-1), (0, n_hp - hps.size))
    seed_flat = jnp.pad(seeds.reshape(-1), (0, n_seed - seeds.size))
    statics.update(mu_codec=mu_codec, nu_codec=nu_codec, nesterov=config.nesterov)
    statics.update(n_leaves=len(leaves), nblocks=nb, block=block, apply=apply)
    kernel = functools.partial(loop.adam_kernel, **statics)
    total = len(leaves) * n * gsize
    outs = pl.pallas_call(
        kernel,
        out_shape=tuple(out_shapes),
        grid=(len(leaves) * nb,),
        in_specs=[
            full_spec(n_hp),
            full_spec(n_seed),
            full_spec(loop.OFFS_LEN),
            *(full_spec(t.shape[0]) for t in tables),
            *([value_spec] * (1 + int(apply)) + specs) * len(leaves),
        ],
        out_specs=tuple([value_spec, *specs] * len(leaves)),
        input_output_aliases=aliases,
        interpret=backend.interpret,
        compiler_params=backend.compiler_params(num_warps=config.num_warps),
        cost_estimate=pl.CostEstimate(
            flops=60 * total, transcendentals=2 * total, bytes_accessed=2 * nbytes
        ),
        name=f"adam_{mu_codec.name}" + (f"_x{len(leaves)}" if multi else ""),
    )(hp_flat, seed_flat, offs, *tables, *ins)
    results = []
    for k, (g, mc, ms, vc, vs, _, _) in enumerate(leaves):
        out, mc2, ms2, vc2, vs2 = outs[5 * k : 5 * k + 5]
        lead_groups = base.to_groups(g, gsize).shape[:-1]
        out = base.from_groups(out.reshape((*lead_groups, gsize)), tuple(g.shape))
        results.append(
            (
                out,
                mc2.reshape(mc.shape),
                ms2.reshape(ms.shape),
                vc2.reshape(vc.shape),
                vs2.reshape(vs.shape),
            )
        )
    return results
