"""Fused Pallas Adam step over quantized moments (polar and blockwise codecs).

Per block of ``block_groups`` groups the kernel loads the gradient, the packed
first and second moments (codes and scales); decodes them with the codec's own
jnp group functions (``codec.kernel_decode``: for polar
`optax_lowbit.codecs.polar.decode_groups_with`, for the 8/4-bit baselines
`optax_lowbit.codecs.blockwise.decode_groups_with`; there is no second copy
of the codec math); updates the moments in float32; computes Adam's update
``u = m̂ / (sqrt(v̂ + eps_root) + eps)`` from the float32 new moments (as
`optax.scale_by_adam`); encodes the new moments (``codec.kernel_encode``) and
stores codes, scales (aliased in place) and ``u``. One pass over the state:
the floor is bytes moved (DESIGN §6).

With ``params`` given (`adam_update(..., params=p)`) the kernel also applies
the step, ``p ← p − lr·(u + wd·p)`` (AdamW), and writes the parameters in
place instead of ``u``: the fused update-and-apply path.

Stochastic rounding draws the same bits as the jnp path: the counter-based
hash of each pair's row-major position in the leaf's pair grid
(`base.dither_bits`) under the stream seed `Codec.encode` would use, passed in
as an input; the codes are those of `adam_update_reference`.

Inputs the kernel cannot capture come in as arrays: the hyperparameters
(``hp``, traced under schedules / ``inject_hyperparams``), the codebooks
(``codec.kernel_tables()``: the polar rings; the blockwise map and its search
table, read by gathered loads) and the stream seeds. Leading axes are
flattened to rows of one group each; where the block does not divide the
rows, the last block's loads and stores are masked (no padded copies).
Codes whose group is one power-of-two plane (polar 2 bits: 16 bytes;
blockwise: 256 or 64) are blocked rows; polar 1.5-bit groups
(12 bytes: a 4-byte and an 8-byte plane, `base.pack_planes`) are read and
written plane by plane at computed offsets of the flat code buffer.

`adam_update_reference` is the definition: the same step in pure jnp, the
path ``impl="jnp"`` takes.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec as P

from optax_lowbit.codecs import base
from optax_lowbit.kernels import _backend

#: Slots of the hyperparameter vector ``hp`` (float32, length 16).
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
#: Groups per block and Triton warps. Time grows with elements per thread
#: (register spills): on an H100, 256M elements, stochastic 2-bit kernel: 64
#: groups / 4 warps 2.98 ms, 32 groups 2.42, 16 groups 2.13-2.24, 8 groups
#: 2.23-2.44 (benchmarks/NOTES_kernels.md, v3).
DEFAULT_BLOCK_GROUPS = 16
DEFAULT_NUM_WARPS = 4
_HP_LEN = 16
_SEED_LEN = 8
_OFFS_LEN = 8  # leading axes of a leaf's group grid a shard may offset


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _planes(codec: base.Codec) -> list[int]:
    """Bytes of each code plane of one group of ``codec``."""
    return list(codec.code_planes())


def has_kernel(codec: base.Codec) -> bool:
    """Whether the fused kernel handles moments in ``codec``.

    Codecs with kernel group functions (``kernel_tables``, ``kernel_decode``,
    ``kernel_encode``: polar at 2 and 1.5 bits, either rounding; blockwise 8
    and 4 bits) whose code planes per group are powers of two bytes (polar 2
    bits: one 16-byte plane; 1.5 bits: 4 + 8; blockwise: 256 and 64) and
    whose group size is a power of two from 16 to 256. π-Quant (superblocks
    of 96) has none: its leaves take the jnp path.
    """
    return (
        all(
            hasattr(codec, name)
            for name in ("kernel_tables", "kernel_decode", "kernel_encode")
        )
        and codec.group_size in (16, 32, 64, 128, 256)
        and all(_power_of_two(n) for n in _planes(codec))
    )


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
    vals += [jnp.zeros((), jnp.float32)] * (_HP_LEN - len(vals))
    return jnp.stack(vals)


def _moment_step(g, m, v, hp, *, nesterov: bool):
    """Adam's moment update and direction in float32 (shared by both paths).

    ``hp`` is indexable (an array or a ref); returns ``(u, m, v)``.
    """
    b1, omb1, b2, omb2 = hp[0], hp[1], hp[2], hp[3]
    eps, eps_root, bc1, bc2 = hp[4], hp[5], hp[6], hp[7]
    m = omb1 * g + b1 * m
    v = omb2 * (g * g) + b2 * v
    if nesterov:
        m_hat = b1 * (m / hp[8]) + omb1 * (g / bc1)
    else:
        m_hat = m / bc1
    u = m_hat / (jnp.sqrt(v / bc2 + eps_root) + eps)
    return u, m, v


def _apply_step(p, u, hp):
    """AdamW's parameter update in float32, in optax's order of operations.

    ``add_decayed_weights`` then ``scale_by_learning_rate`` then
    ``apply_updates``: ``p + (-lr) * (u + wd * p)``.
    """
    return p + (-hp[9]) * (u + hp[10] * p)


class _Codes:
    """How the kernel reads and writes one moment's codes.

    A group whose codes are one power-of-two plane is a row of a blocked
    ``(rows, bytes)`` array. Otherwise (1.5 bits: 12 bytes) the codes stay one
    flat buffer and each plane is gathered and scattered at computed offsets
    ``row * bytes + offset + j`` (every block shape a power of two).
    """

    def __init__(self, codec: base.Codec):
        self.planes = _planes(codec)
        self.nbytes = sum(self.planes)
        self.blocked = len(self.planes) == 1

    def operand(self, codes: jax.Array) -> jax.Array:
        return codes.reshape((-1, self.nbytes) if self.blocked else (-1,))

    def spec(self, block: int) -> pl.BlockSpec:
        if self.blocked:
            return pl.BlockSpec((block, self.nbytes), lambda i: (i, 0))
        return pl.BlockSpec()  # the whole flat buffer; rows are offsets

    def _offsets(self, row):
        out, start = [], 0
        for n in self.planes:
            col = jnp.arange(n, dtype=jnp.int32)[None, :] + start
            out.append(row[:, None] * self.nbytes + col)
            start += n
        return out

    def load(self, ref, row, valid=None) -> list[jax.Array]:
        if self.blocked:
            return [_load(ref, valid)]
        return [_load(ref, valid, idx) for idx in self._offsets(row)]

    def store(self, ref, row, planes: list[jax.Array], valid=None) -> None:
        if self.blocked:
            _store(ref, planes[0], valid)
            return
        for idx, plane in zip(self._offsets(row), planes, strict=True):
            _store(ref, plane, valid, idx)


def _load(ref, valid, idx=None):
    """``ref``'s block (or ``ref[idx]``); rows past the end (``~valid``) read 0."""
    at = ... if idx is None else idx
    if valid is None:
        return ref[at]
    return plgpu.load(ref.at[at], mask=valid[:, None], other=0)


def _store(ref, value, valid, idx=None):
    """Stores ``value`` in ``ref``'s block (or at ``idx``), skipping ``~valid`` rows."""
    at = ... if idx is None else idx
    if valid is None:
        ref[at] = value
    else:
        plgpu.store(ref.at[at], value, mask=valid[:, None])


def _global_row(row, offs_ref, lead_local, lead_global):
    """uint32 row-major index of each local group row in the whole leaf.

    Unsharded (``lead_global`` is None) it is the row itself; on a shard the
    local row's multi-index over ``lead_local`` is shifted by the shard's
    offsets (``offs_ref``) and flattened over ``lead_global``, wrapping mod
    2**32 as `base.flat_index` does.
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


def _adam_kernel(
    hp_ref,
    seed_ref,
    offs_ref,
    *refs,
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
    n_mt, n_vt = len(mu_codec.kernel_tables()), len(nu_codec.kernel_tables())
    m_tables, refs = refs[:n_mt], refs[n_mt:]
    v_tables, refs = refs[:n_vt], refs[n_vt:]
    g_ref, refs = refs[0], refs[1:]
    p_ref = refs[0] if apply else None
    refs = refs[int(apply) :]
    mc_ref, ms_ref, vc_ref, vs_ref, out_ref, mc_out, ms_out, vc_out, vs_out = refs
    hp = [hp_ref[k] for k in range(len(HP_FIELDS))]  # scalars (traced hps)
    m_io, v_io = _Codes(mu_codec), _Codes(nu_codec)
    row = pl.program_id(0) * block + jnp.arange(block, dtype=jnp.int32)
    # the last block may run past the rows: masked loads and stores there
    valid = None if n_rows % block == 0 else row < n_rows
    g = _load(g_ref, valid).astype(jnp.float32)
    m = mu_codec.kernel_decode(
        m_io.load(mc_ref, row, valid), _load(ms_ref, valid), m_tables
    )
    v = nu_codec.kernel_decode(
        v_io.load(vc_ref, row, valid), _load(vs_ref, valid), v_tables
    )
    gsize = g.shape[-1]
    if last % gsize:  # the padded tail of each row holds zeros (as in jnp)
        col = (row % groups_per_row) * gsize
        col = col[:, None] + jnp.arange(gsize, dtype=jnp.int32)[None, :]
        inside = col < last
        m = jnp.where(inside, m, 0.0)
        v = jnp.where(inside, v, 0.0)
    u, m, v = _moment_step(g, m, v, hp, nesterov=nesterov)
    if apply:
        p = _load(p_ref, valid).astype(jnp.float32)
        _store(out_ref, _apply_step(p, u, hp).astype(out_ref.dtype), valid)
    else:
        _store(out_ref, u.astype(out_ref.dtype), valid)
    pair = None
    if mu_codec.stochastic or nu_codec.stochastic:
        grow = _global_row(row, offs_ref, lead_local, lead_global)
        half = gsize // 2
        pair = grow[:, None] * jnp.uint32(half) + jnp.arange(half, dtype=jnp.uint32)
    for x, codec, tables, io, c_out, s_out, k in (
        (m, mu_codec, m_tables, m_io, mc_out, ms_out, 0),
        (v, nu_codec, v_tables, v_io, vc_out, vs_out, 1),
    ):
        noise = base.dither_bits(pair, seed_ref[k]) if codec.stochastic else None
        planes, scales = codec.kernel_encode(x, tables, noise)
        io.store(c_out, row, planes, valid)
        _store(s_out, scales, valid)


def _tables(codec: base.Codec) -> list[jax.Array]:
    """The codec's kernel tables, each padded to a power-of-two length."""
    out = []
    for t in codec.kernel_tables():
        t = np.asarray(t, np.float32).reshape(-1)
        n = 1 << max(0, math.ceil(math.log2(max(t.size, 1))))
        out.append(jnp.asarray(np.pad(t, (0, n - t.size), mode="edge")))
    return out


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
    out += [jnp.zeros((), jnp.uint32)] * (_SEED_LEN - 2)
    return jnp.stack(out)


def _pick_block(n: int, block_groups: int) -> int:
    """Groups per block: ``block_groups``, or the power of two >= ``n`` (>= 8)."""
    if n <= block_groups:
        return max(8, 1 << max(0, math.ceil(math.log2(max(n, 1)))))
    return block_groups


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
) -> tuple[jax.Array, base.Packed, base.Packed]:
    """One fused Adam step of one leaf: ``(u, new_mu, new_nu)``.

    Args:
      g: the gradient (update) leaf, any float dtype and shape.
      mu: first moment, `Packed` by ``mu_codec`` for ``g.shape``.
      nu: second moment, `Packed` by ``nu_codec``.
      hp: float32 ``(16,)`` from `make_hp` (may be traced).
      mu_codec: codec of ``mu`` (`has_kernel` must hold).
      nu_codec: codec of ``nu``.
      nesterov: Nesterov momentum, as `optax.scale_by_adam`.
      seeds: ``(mu_seed, nu_seed)``, the ``seed`` arguments `Codec.encode`
        would get for a stochastic codec (may be traced); ``None``: stream 0.
      params: the parameter leaf for the fused update-and-apply step: then
        the first output is the new parameter ``p − lr·(u + wd·p)`` (``lr``
        and ``wd`` from ``hp``) in ``params``' dtype, written in place of
        ``params`` (donate it), instead of ``u``.
      block_groups: groups per kernel block (a power of two); ``None``:
        `DEFAULT_BLOCK_GROUPS`.
      num_warps: Triton warps per block; ``None``: `DEFAULT_NUM_WARPS`.
      lowering: force a GPU lowering (see `_backend.pick`).

    Returns:
      ``u`` in ``g``'s dtype and shape (or the new ``params``), and the new
      moments (same layout).
    """
    for name, codec in (("mu_codec", mu_codec), ("nu_codec", nu_codec)):
        if not has_kernel(codec):
            raise ValueError(
                f"{name}={codec!r} has no fused kernel; accepted: polar codecs "
                "(2 or 1.5 bits) and blockwise 8/4-bit codecs with a power-of-two "
                "group size from 16 to 256 (see has_kernel)."
            )
    if params is not None and tuple(params.shape) != tuple(g.shape):
        raise ValueError(
            f"params has shape {tuple(params.shape)}, the gradient {tuple(g.shape)}."
        )
    return _adam_update(
        g,
        mu,
        nu,
        hp,
        stream_seeds(mu_codec, nu_codec, seeds),
        params,
        mu_codec=mu_codec,
        nu_codec=nu_codec,
        nesterov=nesterov,
        block_groups=block_groups or DEFAULT_BLOCK_GROUPS,
        num_warps=num_warps or DEFAULT_NUM_WARPS,
        lowering=lowering,
    )


@functools.partial(
    jax.jit,
    static_argnames=(
        "mu_codec",
        "nu_codec",
        "nesterov",
        "block_groups",
        "num_warps",
        "lowering",
    ),
)
def _adam_update(
    g: jax.Array,
    mu: base.Packed,
    nu: base.Packed,
    hp: jax.Array,
    seeds: jax.Array,
    params: jax.Array | None,
    *,
    mu_codec: base.Codec,
    nu_codec: base.Codec,
    nesterov: bool = False,
    block_groups: int,
    num_warps: int,
    lowering: str | None,
) -> tuple[jax.Array, base.Packed, base.Packed]:
    """The jitted body of `adam_update`, with block, warps and seeds resolved.

    Arguments and return values are those of `adam_update`.
    """
    if mu_codec.group_size != nu_codec.group_size:
        raise ValueError(
            "mu_codec and nu_codec must share group_size for the fused kernel, "
            f"got {mu_codec.group_size} and {nu_codec.group_size}."
        )
    statics = dict(
        mu_codec=mu_codec,
        nu_codec=nu_codec,
        nesterov=nesterov,
        block_groups=block_groups,
        num_warps=num_warps,
        lowering=lowering,
    )
    apply = params is not None
    sharded = _lead_sharding(g)
    if sharded is None:
        offs = jnp.zeros((_OFFS_LEN,), jnp.int32)
        out, *state = _kernel_call(
            g,
            mu.codes,
            mu.scales,
            nu.codes,
            nu.scales,
            hp,
            seeds,
            offs,
            params,
            lead_global=None,
            **statics,
        )
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
            offs += [jnp.zeros((), jnp.int32)] * (_OFFS_LEN - len(offs))
            return _kernel_call(
                g,
                mc,
                ms,
                vc,
                vs,
                hp,
                seeds,
                jnp.stack(offs),
                p[0] if p else None,
                lead_global=lead_global,
                **statics,
            )

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
    mc, ms, vc, vs = state
    new_mu = base.Packed(codes=mc, scales=ms, shape=mu.shape, codec=mu.codec)
    new_nu = base.Packed(codes=vc, scales=vs, shape=nu.shape, codec=nu.codec)
    return out, new_mu, new_nu


def _lead_sharding(x: jax.Array) -> tuple[Any, tuple[Any, ...]] | None:
    """``(mesh, spec)`` of a leaf sharded on leading axes, else ``None``.

    Reads the sharding in ``x``'s type (explicit mesh axes).
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


def _kernel_call(
    g,
    mu_codes,
    mu_scales,
    nu_codes,
    nu_scales,
    hp,
    seeds,
    offs,
    params,
    *,
    mu_codec,
    nu_codec,
    nesterov,
    block_groups,
    num_warps,
    lowering,
    lead_global,
):
    """One ``pallas_call`` over a leaf (or one device's shard of it).

    Returns ``(out, mu_codes, mu_scales, nu_codes, nu_scales)`` shaped like the
    inputs; ``lead_global`` is the whole leaf's group grid on a shard (the
    stochastic-rounding positions), ``None`` unsharded.
    """
    backend = _backend.pick(lowering)
    gsize = mu_codec.group_size
    shape = tuple(g.shape)
    xg = base.to_groups(g, gsize)
    lead_groups = xg.shape[:-1]
    n = math.prod(lead_groups)
    block = _pick_block(n, block_groups)
    m_io, v_io = _Codes(mu_codec), _Codes(nu_codec)
    rows_g = xg.reshape(n, gsize)
    mc = m_io.operand(mu_codes)
    ms = mu_scales.reshape(n, 1)
    vc = v_io.operand(nu_codes)
    vs = nu_scales.reshape(n, 1)
    apply = params is not None
    if apply:
        rows_p = base.to_groups(params, gsize).reshape(n, gsize)
        out_dtype = params.dtype
    else:
        out_dtype = g.dtype

    def row_spec(width):
        return pl.BlockSpec((block, width), lambda i: (i, 0))

    def full_spec(length):
        return pl.BlockSpec((length,), lambda i: (0,))

    kernel = functools.partial(
        _adam_kernel,
        mu_codec=mu_codec,
        nu_codec=nu_codec,
        nesterov=nesterov,
        apply=apply,
        last=base.lead_and_last(shape)[1],
        groups_per_row=lead_groups[-1],
        block=block,
        n_rows=n,
        lead_local=tuple(lead_groups),
        lead_global=None if lead_global is None else tuple(lead_global),
    )
    state_bytes = n * (m_io.nbytes + v_io.nbytes + 2 * ms.dtype.itemsize)
    g_bytes = n * gsize * (rows_g.dtype.itemsize + jnp.dtype(out_dtype).itemsize)
    if apply:
        g_bytes += n * gsize * rows_p.dtype.itemsize
    state_in = [mc, ms, vc, vs]
    state_specs = [m_io.spec(block), row_spec(1), v_io.spec(block), row_spec(1)]
    tables = _tables(mu_codec) + _tables(nu_codec)
    first_g = 3 + len(tables)  # after hp, seeds, offsets and the tables
    first_state = first_g + 1 + int(apply)
    aliases = {first_state + k: 1 + k for k in range(4)}
    if apply:
        aliases[first_g + 1] = 0
    out, mc, ms, vc, vs = pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((n, gsize), out_dtype),
            *(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in state_in),
        ),
        grid=(pl.cdiv(n, block),),
        in_specs=[
            full_spec(_HP_LEN),
            full_spec(_SEED_LEN),
            full_spec(_OFFS_LEN),
            *(full_spec(t.shape[0]) for t in tables),
            row_spec(gsize),
            *([row_spec(gsize)] if apply else []),
            *state_specs,
        ],
        out_specs=(row_spec(gsize), *state_specs),
        input_output_aliases=aliases,
        interpret=backend.interpret,
        compiler_params=backend.compiler_params(num_warps=num_warps),
        cost_estimate=pl.CostEstimate(
            flops=60 * n * gsize,
            transcendentals=2 * n * gsize,
            bytes_accessed=2 * state_bytes + g_bytes,
        ),
        name=f"adam_{mu_codec.name}",
    )(
        hp.astype(jnp.float32),
        seeds,
        offs,
        *tables,
        rows_g,
        *([rows_p] if apply else []),
        *state_in,
    )
    out = base.from_groups(out.reshape((*lead_groups, gsize)), shape)
    return (
        out,
        mc.reshape(mu_codes.shape),
        ms.reshape(mu_scales.shape),
        vc.reshape(nu_codes.shape),
        vs.reshape(nu_scales.shape),
    )


def adam_update_reference(
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
) -> tuple[jax.Array, base.Packed, base.Packed]:
    """The same step in pure jnp (decode, `_moment_step`, encode): the definition.

    Arguments and return values are those of `adam_update`.
    """
    seeds = (None, None) if seeds is None else tuple(seeds)
    m = mu_codec.decode(mu)
    v = nu_codec.decode(nu)
    u, m, v = _moment_step(g.astype(jnp.float32), m, v, hp, nesterov=nesterov)
    if params is None:
        out = u.astype(g.dtype)
    else:
        out = _apply_step(params.astype(jnp.float32), u, hp).astype(params.dtype)
    return out, mu_codec.encode(m, seed=seeds[0]), nu_codec.encode(v, seed=seeds[1])
