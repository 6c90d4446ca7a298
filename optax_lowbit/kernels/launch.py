"""Launching the fused Adam kernel: one leaf, many leaves, sharded leaves.

`one_leaf` runs `loop.adam_kernel` over one leaf (under ``jax.shard_map``,
one launch per device, where the leaf is sharded on leading axes under
explicit mesh axes); `many_leaves` runs it over many unsharded leaves in one
launch (a grid over every leaf's blocks). Both end in `launch`, the one
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
import itertools
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
    codec_ops.check_codecs(config.mu_codec, config.nu_codec)
    if params is not None and tuple(params.shape) != tuple(g.shape):
        raise ValueError(
            f"params has shape {tuple(params.shape)}, the gradient {tuple(g.shape)}."
        )
    final = loop.stream_seeds(config.mu_codec, config.nu_codec, seeds)
    return _one_leaf(g, mu, nu, hp, final, params, config=config)


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


def many_leaves(
    gs: Sequence[jax.Array],
    mus: Sequence[base.Packed],
    nus: Sequence[base.Packed],
    hps: Sequence[jax.Array],
    seeds: Sequence[Any] | None,
    params: Sequence[jax.Array] | None,
    config: LaunchConfig,
) -> list[tuple[jax.Array, base.Packed, base.Packed]]:
    """`one_leaf` of many leaves in one kernel launch.

    Leaves sharded under explicit mesh axes (and a single leaf) take
    `one_leaf` one by one.

    Args:
      gs: gradient leaves.
      mus: their first moments.
      nus: their second moments.
      hps: one `loop.make_hp` vector per leaf.
      seeds: one ``(mu_seed, nu_seed)`` per leaf, or ``None``.
      params: parameter leaves for the fused apply, or ``None``.
      config: the launch configuration.

    Returns:
      One ``(out, new_mu, new_nu)`` per leaf.
    """
    n = len(gs)
    seeds = [None] * n if seeds is None else list(seeds)
    params = [None] * n if params is None else list(params)
    if n == 1 or any(lead_sharding(g) is not None for g in gs):
        return [
            one_leaf(*leaf, config)
            for leaf in zip(gs, mus, nus, hps, seeds, params, strict=True)
        ]
    codec_ops.check_codecs(config.mu_codec, config.nu_codec)
    final = jnp.stack(
        [loop.stream_seeds(config.mu_codec, config.nu_codec, sd)[:2] for sd in seeds]
    )
    return _many_leaves(
        tuple(gs),
        tuple(mus),
        tuple(nus),
        jnp.stack([jnp.asarray(h, jnp.float32) for h in hps]),
        final,
        None if params[0] is None else tuple(params),
        config=config,
    )


@functools.partial(jax.jit, static_argnames=("config",))
def _many_leaves(gs, mus, nus, hps, seeds, params, *, config):
    """The jitted body of `many_leaves` (unsharded leaves)."""
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
    """One ``pallas_call`` over ``leaves`` (a grid of every leaf's blocks).

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
    """
    mu_codec, nu_codec = config.mu_codec, config.nu_codec
    backend = _backend.pick(config.lowering)
    gsize = mu_codec.group_size
    apply = leaves[0][5] is not None
    m_io, v_io = codec_ops.Codes(mu_codec), codec_ops.Codes(nu_codec)
    ms_io, vs_io = codec_ops.Scales(mu_codec), codec_ops.Scales(nu_codec)
    vals = codec_ops.Values(mu_codec)
    ns = [math.prod(base.to_groups(x[0], gsize).shape[:-1]) for x in leaves]
    block = pick_block(max(ns), config.block_groups)
    nblocks = [pl.cdiv(n, block) for n in ns]
    starts = [0, *itertools.accumulate(nblocks)]
    multi = len(leaves) > 1

    def row_spec(width, start, nb):
        if not multi:
            return pl.BlockSpec((block, width), lambda i: (i, 0))
        return pl.BlockSpec(
            (block, width), lambda i: (jnp.clip(i - start, 0, nb - 1), 0)
        )

    def code_spec(io, start, nb):
        if not io.blocked:
            return io.spec(block)
        return row_spec(io.nbytes, start, nb)

    def full_spec(length):
        return pl.BlockSpec((length,), lambda i: (0,))

    tables = codec_ops.tables(mu_codec) + codec_ops.tables(nu_codec)
    ins, in_specs, out_shapes, out_specs, statics = [], [], [], [], []
    aliases, nbytes = {}, 0
    first = 3 + len(tables)  # after hp, seeds, offsets and the tables
    n_in = 5 + int(apply)
    for k, (g, mc, ms, vc, vs, p, lead_global) in enumerate(leaves):
        n, start, nb = ns[k], starts[k], nblocks[k]
        shape = tuple(g.shape)
        lead_groups = base.to_groups(g, gsize).shape[:-1]
        rows_g = vals.operand(base.to_groups(g, gsize).reshape(n, gsize))
        state = [
            m_io.operand(mc),
            ms_io.operand(ms, n),
            v_io.operand(vc),
            vs_io.operand(vs, n),
        ]
        specs = [
            code_spec(m_io, start, nb),
            ms_io.spec(row_spec(1, start, nb)),
            code_spec(v_io, start, nb),
            vs_io.spec(row_spec(1, start, nb)),
        ]
        out_dtype = g.dtype if p is None else p.dtype
        leaf_in = [rows_g]
        if apply:
            leaf_in.append(vals.operand(base.to_groups(p, gsize).reshape(n, gsize)))
        leaf_in += state
        base_in = first + k * n_in
        base_out = 5 * k
        for j in range(4):  # the state is updated in place
            aliases[base_in + 1 + int(apply) + j] = base_out + 1 + j
        if apply:
            aliases[base_in + 1] = base_out  # and the parameters
        ins += leaf_in
        in_specs += [vals.spec(row_spec(gsize, start, nb))] * (1 + int(apply)) + specs
        out_shapes += [
            jax.ShapeDtypeStruct(rows_g.shape, out_dtype),
            *(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in state),
        ]
        out_specs += [vals.spec(row_spec(gsize, start, nb)), *specs]
        statics.append(
            dict(
                last=base.lead_and_last(shape)[1],
                groups_per_row=lead_groups[-1],
                block=block,
                n_rows=n,
                lead_local=tuple(lead_groups),
                lead_global=None if lead_global is None else tuple(lead_global),
            )
        )
        nbytes += sum(int(x.size) * x.dtype.itemsize for x in leaf_in)
        nbytes += n * gsize * jnp.dtype(out_dtype).itemsize
    n_hp = 1 << max(0, math.ceil(math.log2(hps.size)))
    n_seed = max(loop.SEED_LEN, 1 << max(0, math.ceil(math.log2(seeds.size))))
    hp_flat = jnp.pad(hps.astype(jnp.float32).reshape(-1), (0, n_hp - hps.size))
    seed_flat = jnp.pad(seeds.reshape(-1), (0, n_seed - seeds.size))
    kernel = functools.partial(
        loop.adam_kernel,
        leaves=tuple(statics),
        starts=tuple(starts),
        common=dict(
            mu_codec=mu_codec, nu_codec=nu_codec, nesterov=config.nesterov, apply=apply
        ),
    )
    total = sum(ns) * gsize
    outs = pl.pallas_call(
        kernel,
        out_shape=tuple(out_shapes),
        grid=(starts[-1],),
        in_specs=[
            full_spec(n_hp),
            full_spec(n_seed),
            full_spec(loop.OFFS_LEN),
            *(full_spec(t.shape[0]) for t in tables),
            *in_specs,
        ],
        out_specs=tuple(out_specs),
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
