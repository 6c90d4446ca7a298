"""Fused Pallas Adam step over quantized moments (polar and blockwise codecs).

Per block of ``block_groups`` groups the kernel loads the gradient, the packed
first and second moments (codes and scales); decodes them with the codec's own
jnp group functions (``codec.kernel_decode``: for polar
`optax_lowbit.codecs.polar.decode_groups_with`, for the 8/4-bit baselines
`optax_lowbit.codecs.blockwise.decode_groups_with`; there is no second copy
of the codec math); updates the moments in float32; computes Adam's update
``u = m̂ / (sqrt(v̂ + eps_root) + eps)`` from the float32 new moments (as
`optax.scale_by_adam`; `moment_step`, with the fault rule: a non-finite
gradient element keeps its old moments, overflowing moments saturate); encodes
the new moments (``codec.kernel_encode``) and stores codes, scales (aliased in
place) and ``u``. One pass over the state: the floor is bytes moved (DESIGN
§6).

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
import itertools
import math
from collections.abc import Sequence
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
#: Quantized leaves per kernel launch in the transforms (`adam_update_many`);
#: 1 launches one kernel per leaf (see benchmarks/NOTES_kernels.md, v3c).
LEAVES_PER_LAUNCH = 1
#: Static arguments of the jitted kernel wrappers.
_JIT_STATICS = (
    "mu_codec",
    "nu_codec",
    "nesterov",
    "block_groups",
    "num_warps",
    "lowering",
)
_HP_LEN = 16
_SEED_LEN = 8
_OFFS_LEN = 8  # leading axes of a leaf's group grid a shard may offset


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _planes(codec: base.Codec) -> list[int]:
    """Bytes of each code plane of one group of ``codec``."""
    return list(codec.code_planes())


def _columns(codec: base.Codec) -> tuple[tuple[int, int, int], ...] | None:
    """``(start, stride, size)`` of each part a kernel splits a group into.

    ``None``: the group is held whole. A group whose size is not a power of
    two (π-Quant's 96) is held as parts of power-of-two sizes
    (`PiQuantCodec.kernel_columns`: each an arithmetic progression of
    columns, rebuilt in the kernel from an iota: it cannot capture arrays),
    read and written by gathered loads at ``row * group_size + column``.
    """
    if not hasattr(codec, "kernel_columns"):
        return None
    out = []
    for part in codec.kernel_columns():
        part = np.asarray(part)
        stride = int(part[1] - part[0]) if part.size > 1 else 1
        if not np.array_equal(part, part[0] + stride * np.arange(part.size)):
            raise ValueError(f"{codec!r}: a kernel part is not evenly spaced: {part}.")
        out.append((int(part[0]), stride, int(part.size)))
    return tuple(out)


def has_kernel(codec: base.Codec) -> bool:
    """Whether the fused kernel handles moments in ``codec``.

    Codecs with kernel group functions (``kernel_tables``, ``kernel_decode``,
    ``kernel_encode``: polar at 2 and 1.5 bits, either rounding; blockwise 8
    and 4 bits; π-Quant) whose code planes per group are powers of two bytes
    (polar 2 bits: one 16-byte plane; 1.5 bits: 4 + 8; blockwise: 256 and 64;
    π-Quant: 16 + 16 + 8) and whose group (or each of its parts: π-Quant's
    96-element superblock is six parts of 16) is a power of two from 16 to
    256 elements.
    """
    if not all(
        hasattr(codec, name)
        for name in ("kernel_tables", "kernel_decode", "kernel_encode")
    ):
        return False
    cols = _columns(codec)
    sizes = [codec.group_size] if cols is None else [c[2] for c in cols]
    return all(n in (16, 32, 64, 128, 256) for n in sizes) and all(
        _power_of_two(n) for n in _planes(codec)
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


def moment_step(g, m, v, hp, *, nesterov: bool):
    """Adam's step of one leaf in float32: the one definition, for both paths.

    The fused kernels call it on each block, `adam_update_reference` and the
    ``jnp`` path of `scale_by_adam_quantized` on whole leaves.

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


class _Values:
    """How the kernel reads and writes a leaf's values (gradient, parameters, u).

    Whole groups are rows of a blocked ``(rows, group)`` array; a codec with
    parts (`_columns`) reads a flat buffer at ``row * group + column``, part
    by part. Values are always a list of parts (one for whole groups).
    """

    def __init__(self, codec: base.Codec):
        self.columns = _columns(codec)
        self.size = codec.group_size

    def operand(self, rows: jax.Array) -> jax.Array:
        return rows if self.columns is None else rows.reshape(-1)

    def spec(self, row_spec) -> pl.BlockSpec:
        return row_spec if self.columns is None else pl.BlockSpec()

    def _cols(self):
        if self.columns is None:
            return [jnp.arange(self.size, dtype=jnp.int32)[None, :]]
        return [
            start + stride * jnp.arange(size, dtype=jnp.int32)[None, :]
            for start, stride, size in self.columns
        ]

    def _offsets(self, row):
        return [row[:, None] * self.size + c for c in self._cols()]

    def col(self, row, groups_per_row):
        """Each part's column within the leaf's last axis."""
        first = (row % groups_per_row) * self.size
        return [first[:, None] + c for c in self._cols()]

    def load(self, ref, row, valid) -> list[jax.Array]:
        if self.columns is None:
            return [_load(ref, valid)]
        return [_load(ref, valid, idx) for idx in self._offsets(row)]

    def store(self, ref, row, parts, valid) -> None:
        if self.columns is None:
            _store(ref, parts[0], valid)
            return
        for idx, part in zip(self._offsets(row), parts, strict=True):
            _store(ref, part, valid, idx)


class _Scales:
    """How the kernel reads and writes a moment's scales.

    One per group is a blocked ``(rows, 1)`` column; several (π-Quant's 3)
    stay a flat buffer, read as a list of ``(block, 1)`` columns.
    """

    def __init__(self, codec: base.Codec):
        self.per_group = codec.scales_per_group

    def operand(self, scales: jax.Array, n: int) -> jax.Array:
        return scales.reshape((n, 1) if self.per_group == 1 else (-1,))

    def spec(self, row_spec) -> pl.BlockSpec:
        return row_spec if self.per_group == 1 else pl.BlockSpec()

    def _offsets(self, row):
        return [row[:, None] * self.per_group + k for k in range(self.per_group)]

    def load(self, ref, row, valid):
        if self.per_group == 1:
            return _load(ref, valid)
        return [_load(ref, valid, idx) for idx in self._offsets(row)]

    def store(self, ref, row, scales, valid) -> None:
        if self.per_group == 1:
            _store(ref, scales, valid)
            return
        for idx, s in zip(self._offsets(row), scales, strict=True):
            _store(ref, s, valid, idx)


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


def _leaf_body(
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
    m_io, v_io = _Codes(mu_codec), _Codes(nu_codec)
    ms_io, vs_io = _Scales(mu_codec), _Scales(nu_codec)
    vals = _Values(mu_codec)
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
        u = [_apply_step(pk, uk, hp) for pk, uk in zip(p, u, strict=True)]
    vals.store(out_ref, row, [x.astype(out_ref.dtype) for x in u], valid)
    pair = None
    if mu_codec.stochastic or nu_codec.stochastic:
        grow = _global_row(row, offs_ref, lead_local, lead_global)
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


def _adam_kernel(hp_ref, seed_ref, offs_ref, *refs, leaves, starts, common):
    """The kernel over one or many leaves (a ``pl.when`` branch per leaf)."""
    m_tables, v_tables, leaf_refs = _split_refs(
        refs, common["mu_codec"], common["nu_codec"], len(leaves), common["apply"]
    )
    i = pl.program_id(0)
    for k, (statics, leaf) in enumerate(zip(leaves, leaf_refs, strict=True)):
        body = functools.partial(
            _leaf_body,
            hp_ref,
            seed_ref,
            offs_ref,
            m_tables,
            v_tables,
            leaf,
            hp_base=k * _HP_LEN,
            seed_base=2 * k,
            **statics,
            **common,
        )
        if len(leaves) == 1:
            body(i)
        else:
            start, stop = starts[k], starts[k + 1]
            pl.when((i >= start) & (i < stop))(lambda body=body, s=start: body(i - s))


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


def _check_codecs(mu_codec: base.Codec, nu_codec: base.Codec) -> None:
    """Clear errors, before tracing, for codecs the kernel cannot take."""
    for name, codec in (("mu_codec", mu_codec), ("nu_codec", nu_codec)):
        if not has_kernel(codec):
            raise ValueError(
                f"{name}={codec!r} has no fused kernel; accepted: polar codecs "
                "(2 or 1.5 bits) and blockwise 8/4-bit codecs with a power-of-two "
                "group size from 16 to 256 (see has_kernel)."
            )
    if mu_codec.group_size != nu_codec.group_size or _columns(mu_codec) != _columns(
        nu_codec
    ):
        raise ValueError(
            "mu_codec and nu_codec must share group_size (and its kernel parts) "
            f"for the fused kernel, got {mu_codec!r} (group_size "
            f"{mu_codec.group_size}) and {nu_codec!r} ({nu_codec.group_size})."
        )


def _statics(mu_codec, nu_codec, nesterov, block_groups, num_warps, lowering):
    """The jitted wrappers' static arguments, defaults resolved."""
    return dict(
        mu_codec=mu_codec,
        nu_codec=nu_codec,
        nesterov=nesterov,
        block_groups=block_groups or DEFAULT_BLOCK_GROUPS,
        num_warps=num_warps or DEFAULT_NUM_WARPS,
        lowering=lowering,
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
    _check_codecs(mu_codec, nu_codec)
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
        **_statics(mu_codec, nu_codec, nesterov, block_groups, num_warps, lowering),
    )


@functools.partial(jax.jit, static_argnames=_JIT_STATICS)
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
    statics = _statics(mu_codec, nu_codec, nesterov, block_groups, num_warps, lowering)
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
    leaf = (g, mu_codes, mu_scales, nu_codes, nu_scales, params, lead_global)
    return _launch(
        [leaf],
        hp.reshape(1, -1),
        seeds.reshape(1, -1)[:, :2],
        offs,
        mu_codec=mu_codec,
        nu_codec=nu_codec,
        nesterov=nesterov,
        block_groups=block_groups,
        num_warps=num_warps,
        lowering=lowering,
    )[0]


def _launch(
    leaves,
    hps,
    seeds,
    offs,
    *,
    mu_codec,
    nu_codec,
    nesterov,
    block_groups,
    num_warps,
    lowering,
):
    """One ``pallas_call`` over ``leaves`` (a grid of every leaf's blocks).

    Each leaf is ``(g, mu_codes, mu_scales, nu_codes, nu_scales, params,
    lead_global)`` (``params`` None unless applying, the same for every
    leaf); ``hps`` is ``(L, 16)``, ``seeds`` ``(L, 2)`` final stream seeds.
    Returns one ``(out, mu_codes, mu_scales, nu_codes, nu_scales)`` per leaf.
    """
    backend = _backend.pick(lowering)
    gsize = mu_codec.group_size
    apply = leaves[0][5] is not None
    m_io, v_io = _Codes(mu_codec), _Codes(nu_codec)
    ms_io, vs_io = _Scales(mu_codec), _Scales(nu_codec)
    vals = _Values(mu_codec)
    ns = [math.prod(base.to_groups(x[0], gsize).shape[:-1]) for x in leaves]
    block = _pick_block(max(ns), block_groups)
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

    tables = _tables(mu_codec) + _tables(nu_codec)
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
    n_seed = max(_SEED_LEN, 1 << max(0, math.ceil(math.log2(seeds.size))))
    hp_flat = jnp.pad(hps.astype(jnp.float32).reshape(-1), (0, n_hp - hps.size))
    seed_flat = jnp.pad(seeds.reshape(-1), (0, n_seed - seeds.size))
    kernel = functools.partial(
        _adam_kernel,
        leaves=tuple(statics),
        starts=tuple(starts),
        common=dict(
            mu_codec=mu_codec, nu_codec=nu_codec, nesterov=nesterov, apply=apply
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
            full_spec(_OFFS_LEN),
            *(full_spec(t.shape[0]) for t in tables),
            *in_specs,
        ],
        out_specs=tuple(out_specs),
        input_output_aliases=aliases,
        interpret=backend.interpret,
        compiler_params=backend.compiler_params(num_warps=num_warps),
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
) -> list[tuple[jax.Array, base.Packed, base.Packed]]:
    """`adam_update` of many leaves in one kernel launch.

    The grid covers every leaf's blocks; a program runs the leaf its index
    falls in (one ``pl.when`` branch per leaf), so a tree of many small
    leaves costs one launch instead of one per leaf. The results equal
    `adam_update` leaf by leaf. Leaves sharded under explicit mesh axes are
    not batched: they take `adam_update` (per shard) one by one.

    Args:
      gs: gradient leaves.
      mus: their first moments.
      nus: their second moments.
      hps: one `make_hp` vector per leaf.
      mu_codec: codec of every ``mus`` entry.
      nu_codec: codec of every ``nus`` entry.
      nesterov: Nesterov momentum.
      seeds: one ``(mu_seed, nu_seed)`` per leaf (see `adam_update`).
      params: parameter leaves for the fused apply (or ``None``).
      block_groups: groups per block.
      num_warps: Triton warps.
      lowering: force a GPU lowering.

    Returns:
      One ``(out, new_mu, new_nu)`` per leaf.
    """
    n = len(gs)
    seeds = [None] * n if seeds is None else list(seeds)
    params = [None] * n if params is None else list(params)
    kw = dict(
        mu_codec=mu_codec,
        nu_codec=nu_codec,
        nesterov=nesterov,
        block_groups=block_groups,
        num_warps=num_warps,
        lowering=lowering,
    )
    if n == 1 or any(_lead_sharding(g) is not None for g in gs):
        return [
            adam_update(g, m, v, h, seeds=sd, params=p, **kw)
            for g, m, v, h, sd, p in zip(gs, mus, nus, hps, seeds, params, strict=True)
        ]
    _check_codecs(mu_codec, nu_codec)
    final = jnp.stack([stream_seeds(mu_codec, nu_codec, sd)[:2] for sd in seeds])
    return _adam_update_many(
        tuple(gs),
        tuple(mus),
        tuple(nus),
        jnp.stack([jnp.asarray(h, jnp.float32) for h in hps]),
        final,
        None if params[0] is None else tuple(params),
        **_statics(mu_codec, nu_codec, nesterov, block_groups, num_warps, lowering),
    )


@functools.partial(jax.jit, static_argnames=_JIT_STATICS)
def _adam_update_many(
    gs, mus, nus, hps, seeds, params, *, mu_codec, nu_codec, nesterov, **launch
):
    """The jitted body of `adam_update_many` (unsharded leaves)."""
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
    results = _launch(
        leaves,
        hps,
        seeds,
        jnp.zeros((_OFFS_LEN,), jnp.int32),
        mu_codec=mu_codec,
        nu_codec=nu_codec,
        nesterov=nesterov,
        **launch,
    )
    return [
        (
            out,
            base.Packed(codes=mc, scales=ms, shape=m.shape, codec=m.codec),
            base.Packed(codes=vc, scales=vs, shape=v.shape, codec=v.codec),
        )
        for (out, mc, ms, vc, vs), m, v in zip(results, mus, nus, strict=True)
    ]


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
    """The same step in pure jnp (decode, `moment_step`, encode): the definition.

    Arguments and return values are those of `adam_update`.
    """
    seeds = (None, None) if seeds is None else tuple(seeds)
    m = mu_codec.decode(mu)
    v = nu_codec.decode(nu)
    u, m, v = moment_step(g.astype(jnp.float32), m, v, hp, nesterov=nesterov)
    if params is None:
        out = u.astype(g.dtype)
    else:
        out = _apply_step(params.astype(jnp.float32), u, hp).astype(params.dtype)
    return out, mu_codec.encode(m, seed=seeds[0]), nu_codec.encode(v, seed=seeds[1])
