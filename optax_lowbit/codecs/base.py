"""The codec contract: `Packed` pytrees, the `Codec` base class, layout helpers.

Why over 500 lines: the contract every codec and kernel builds on (Packed, Codec,
bit packing, scales, hashing for stochastic rounding, the fault rule), each
written once here so that no codec repeats it.

A codec turns a float array into a `Packed` pytree and back:

* Groups run along the **last axis**, padded with zeros to a multiple of
  ``group_size``; leading axes are kept. A leaf of shape ``(A, B, N)`` packs to
  ``codes`` of shape ``(A, B, ceil(N / G), bytes_per_group)`` (``uint8``) and
  ``scales`` of shape ``(A, B, ceil(N / G) * scales_per_group)``. So a state
  shards like its parameter on every leading axis. A 0-d leaf is one group of
  one element.
* ``Packed.shape`` and ``Packed.codec`` (the codec itself: a frozen, hashable
  description of the format) are static pytree metadata: a `Packed` decodes
  itself (``packed.decode()``) and passes through ``jit``, ``vmap``,
  ``tree_map``, ``device_put``, sharding, ``jax.eval_shape`` and Orbax
  unchanged.
* ``bits_per_element`` is the all-in figure for whole groups:
  ``8 * (bytes_per_group + scales_per_group * scale_bytes) / group_size``.
  `Packed.bits_per_element` gives the figure for one real array, padding
  included.
* ``decode(encode(0)) == 0`` exactly, and an all-zero group never makes NaN.
* Finite inputs never make NaN or inf: `safe_scale` saturates a group's scale
  at `MAX_SCALE` (larger values encode as the codec's largest codeword) and
  flushes group maxima below the smallest normal float32 to 0. A NaN element
  makes its whole group NaN: the optimizers never encode one
  (`saturate_or_keep`).

Subclasses implement the group functions ``encode_groups`` and
``decode_groups``; they are pure ``jnp`` and are the definition of the codec's
behaviour: the Pallas kernels call the very same functions.

Bit layout: codes of ``b`` bits are packed **planar** (`pack_codes`). ``b`` is
split into power-of-two widths (3 = 2 + 1, 4 = 4); for each width ``w`` the
group's ``K`` values fill ``K * w / 8`` bytes where value ``j`` sits in byte
``j % nbytes`` at bit offset ``(j // nbytes) * w``. Unpacking is a few shifts
of contiguous byte slices and a concatenation: no interleaving shuffles.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_lowbit import _checks


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Packed:
    """A quantized array: uint8 codes, group scales and static metadata.

    Attributes:
      codes: ``uint8`` array ``(*lead, n_groups, bytes_per_group)``.
      scales: float array ``(*lead, n_groups * scales_per_group)``.
      shape: the shape of the array that was encoded (static).
      codec: the codec that made it (static; compared by its format name,
        e.g. ``"polar-2b-signed"``, see `codec_name`).
    """

    codes: jax.Array
    scales: jax.Array
    shape: tuple[int, ...] = dataclasses.field(metadata={"static": True})
    codec: Codec = dataclasses.field(metadata={"static": True})

    @property
    def codec_name(self) -> str:
        """The format name of the codec, e.g. ``"polar-2b-signed"``."""
        return getattr(self.codec, "name", str(self.codec))

    def decode(self) -> jax.Array:
        """Decodes with the codec that made it (float32, of `shape`)."""
        return self.codec.decode(self)

    @property
    def nbytes(self) -> int:
        """Bytes held by codes and scales together."""
        return int(self.codes.nbytes + self.scales.nbytes)

    @property
    def bits_per_element(self) -> float:
        """All-in bits per element of this array, padding included."""
        numel = max(1, math.prod(self.shape))
        return 8.0 * self.nbytes / numel


def lead_and_last(shape: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    """Splits a shape into its leading axes and the grouped last axis."""
    if len(shape) == 0:
        return (), 1
    return tuple(shape[:-1]), int(shape[-1])


def num_groups(shape: tuple[int, ...], group_size: int) -> int:
    """Number of groups along the last axis of ``shape``."""
    _, last = lead_and_last(shape)
    return -(-last // group_size) if last else 0


def group_grid(shape: tuple[int, ...], group_size: int) -> tuple[int, ...]:
    """The grid of groups of ``shape``: its leading axes, then its groups.

    Args:
      shape: an array's shape.
      group_size: elements per group along the last axis.

    Returns:
      `to_groups`' output shape without its last axis.
    """
    lead, _ = lead_and_last(tuple(shape))
    return (*lead, num_groups(tuple(shape), group_size))


def to_groups(x: jax.Array, group_size: int) -> jax.Array:
    """Reshapes ``x`` to ``(*lead, n_groups, group_size)`` float32, zero-padded."""
    x = jnp.asarray(x, jnp.float32)
    lead, last = lead_and_last(x.shape)
    x = x.reshape((*lead, last))
    n = num_groups(x.shape, group_size)
    pad = n * group_size - last
    if pad:
        x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, pad)])
    return x.reshape((*lead, n, group_size))


def from_groups(xg: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Inverse of `to_groups`: drops the padding and restores ``shape``."""
    lead, last = lead_and_last(shape)
    x = xg.reshape((*lead, -1))[..., :last]
    return x.reshape(shape)


def _widths(bits: int) -> list[int]:
    """Splits ``bits`` into power-of-two plane widths, widest first."""
    out, rest = [], bits
    for w in (8, 4, 2, 1):
        if rest >= w:
            out.append(w)
            rest -= w
    return out


def packed_bytes(num_values: int, bits: int) -> int:
    """Bytes that `pack_codes` uses for ``num_values`` codes of ``bits`` bits."""
    total = 0
    for w in _widths(bits):
        per_byte = 8 // w
        total += -(-num_values // per_byte)
    return total


def split_last(x: jax.Array, parts: int) -> list[jax.Array]:
    """Splits the last axis into ``parts`` equal contiguous pieces.

    Written with ``jnp.split`` (one ``lax.split``), which Pallas Triton lowers
    for power-of-two ``parts``; static slices of a value do not lower there.
    """
    if parts == 1:
        return [x]
    return list(jnp.split(x, parts, axis=-1))


def concat_last(parts: list[jax.Array]) -> jax.Array:
    """Concatenates equal-shaped pieces along the last axis.

    For a power-of-two number of pieces this is written as pairwise
    ``stack(axis=-1)``, a transpose and a reshape, which Pallas Triton lowers
    (its ``concatenate`` takes only ``[..., 1]`` operands); XLA fuses either
    form. Other counts or shapes use ``jnp.concatenate``.
    """
    if len(parts) == 1:
        return parts[0]
    n = len(parts)
    same = all(p.shape == parts[0].shape for p in parts)
    if not same or n & (n - 1):
        return jnp.concatenate(parts, axis=-1)
    while len(parts) > 1:
        merged = []
        for a, b in zip(parts[0::2], parts[1::2], strict=True):
            pair = jnp.swapaxes(jnp.stack([a, b], axis=-1), -1, -2)
            merged.append(pair.reshape((*a.shape[:-1], 2 * a.shape[-1])))
        parts = merged
    return parts[0]


def array_module(x: Any) -> Any:
    """``numpy`` for NumPy data (an array, or a list or tuple), else ``jax.numpy``.

    The codecs' constant tables are NumPy in, NumPy out: built without
    dispatching JAX operations (a kernel's inputs, a first step's trace),
    and with the same float32 operations as their jnp form, so the same bits.
    """
    return np if isinstance(x, (np.ndarray, list, tuple)) else jnp


def is_ref(x: Any) -> bool:
    """Whether ``x`` is a mutable ref (a Pallas kernel's input), not an array."""
    return not isinstance(x, (list, tuple)) and isinstance(
        jax.typeof(x), jax.ref.AbstractRef
    )


def take(table: Any, index: jax.Array, *, in_range: bool = False) -> jax.Array:
    """``table[index]`` for a small 1-D lookup table, sharded like ``index``.

    Under explicit mesh axes a gather needs its output sharding spelled out;
    the result is sharded like the codes it decodes (with no mesh this is a
    plain gather). Indices are clipped to the table. Inside a Pallas kernel
    ``table`` is a ref and this is a gathered load.

    Args:
      table: 1-D lookup table (a codebook or quantization map).
      index: integer codes of any shape.
      in_range: the caller guarantees ``0 <= index < len(table)``: a kernel
        then skips the clip (two instructions per element per lookup); the
        jnp gather clips either way, so the values are the same.

    Returns:
      ``table[index]``, of ``index``'s shape and sharding.
    """
    if is_ref(table):  # inside a kernel: a gathered load from the table's ref
        if in_range:
            return table[index]
        return table[jnp.clip(index, 0, table.shape[0] - 1)]
    sharding = jax.typeof(index).sharding
    return table.at[index].get(mode="clip", out_sharding=sharding)


def plane_bytes(num_values: int, bits: int) -> list[int]:
    """Bytes of each plane of `pack_codes` (in storage order) for ``bits``."""
    return [num_values * w // 8 for w in reversed(_widths(bits))]


def halves(group_size: int) -> list[np.ndarray]:
    """The columns of a group's two halves: how a kernel holds a group.

    Polar pairs element ``j`` with ``j + G/2``, and the blockwise codecs put
    element ``j`` and ``j + G/2`` in one byte (4 bits) and draw their two
    uniforms from one word: with the two halves held as separate parts, a
    kernel decodes and encodes without splitting or joining tensors
    (`parts_of`).

    Args:
      group_size: elements per group, even.

    Returns:
      Two int arrays: ``0 .. G/2 - 1`` and ``G/2 .. G - 1``.
    """
    half = group_size // 2
    return [np.arange(half), np.arange(half, 2 * half)]


def parts_of(x: Any, n: int) -> list[jax.Array]:
    """``x`` as ``n`` equal contiguous parts of its last axis.

    ``x`` is an array or a list of equal contiguous parts (a group held in
    halves, `halves`); parts are split (`split_last`) or joined
    (`concat_last`) only where their count is not already ``n``.

    Args:
      x: an array, or a list of arrays whose concatenation is the value.
      n: the number of parts wanted.

    Returns:
      A list of ``n`` arrays.
    """
    parts = list(x) if isinstance(x, (list, tuple)) else [x]
    if len(parts) == n:
        return parts
    if n % len(parts) == 0:
        return [q for part in parts for q in split_last(part, n // len(parts))]
    if len(parts) % n:
        raise ValueError(f"{len(parts)} parts cannot be regrouped into {n}.")
    k = len(parts) // n
    return [concat_last(parts[i * k : (i + 1) * k]) for i in range(n)]


def pack_planes(values: Any, bits: int, *, kernel: bool = False) -> list[jax.Array]:
    """Packs integer codes ``< 2**bits`` along the last axis into planes.

    `pack_codes` is these planes concatenated. A kernel stores the planes
    separately (each a power-of-two number of bytes for the shipped codecs),
    since a 12-byte row of 3-bit codes is not a shape Triton can hold.

    Args:
      values: integer array ``(..., K)``, every value in ``[0, 2**bits)``,
        or a list of its equal contiguous parts (`parts_of`: a kernel's
        halves pack into 4-bit bytes with no split). ``K * w`` must be a
        multiple of 8 for every plane width ``w`` of ``bits`` (true for
        ``K`` a multiple of 8).
      bits: code width, 1 to 8.
      kernel: pack as a Pallas Triton kernel can (`_pack_plane`): a part
        that holds several pieces of a byte is folded by a reshape and a sum
        instead of split into its pieces. The same bytes; whole arrays
        outside a kernel keep the splits (XLA slices them for free).

    Returns:
      A list of ``uint8`` arrays ``(..., K * w / 8)``, narrowest plane first.
    """
    given = values if isinstance(values, (list, tuple)) else [values]
    parts = [v.astype(jnp.uint8) for v in given]
    k = sum(v.shape[-1] for v in parts)
    planes, shift = [], 0
    # Planes are filled narrowest first: for 3 bits, bit 0 goes to the 1-bit
    # plane and bits 1-2 to the 2-bit plane; each plane is packed on its own.
    for w in reversed(_widths(bits)):
        field = [(v >> shift) & ((1 << w) - 1) for v in parts]
        shift += w
        per_byte = 8 // w
        if k % per_byte:
            raise ValueError(f"{k} codes of width {w} do not fill whole bytes.")
        planes.append(_pack_plane(field, w, kernel))
    return planes


def _plane_bits(size: int, nbytes: int, w: int) -> jax.Array:
    """Where values ``0 .. size - 1`` of a plane sit in their bytes.

    The planar layout (`pack_planes`): value ``j`` of a plane of ``nbytes``
    bytes and ``w``-bit fields sits in byte ``j % nbytes`` at bit
    ``(j // nbytes) * w``. Built from an iota, so a kernel can compute it.

    Returns:
      int32 ``(size,)`` bit offsets.
    """
    j = jnp.arange(size, dtype=jnp.int32)
    # j >= 0: truncating division is the floor, without `//`'s sign fix-ups
    # (which Pallas' Triton lowering traces anew in every kernel; v35)
    return jax.lax.div(j, jnp.int32(nbytes)) * w


def _pack_plane(field: list[jax.Array], w: int, kernel: bool) -> jax.Array:
    """One plane's bytes from its ``w``-bit values, given as contiguous parts.

    Where each byte's values are whole parts (a kernel's halves into 4-bit
    bytes), or outside a kernel, the values are split into each byte's
    pieces, shifted and joined by ORs. Otherwise (``kernel``: polar's codes,
    one part; several are joined first) the values are folded whole: shifted
    to their bits (`_plane_bits`), reshaped to ``(..., values per byte,
    nbytes)`` and summed over the first of those axes (the bits are
    disjoint: a sum is an OR). A Triton kernel then needs one reshape and
    one reduction, instead of a tree of splits (three layout operations
    each) and one OR per piece: a smaller module, which Triton compiles
    faster (``NOTES_kernels.md``, v29).
    """
    k = sum(v.shape[-1] for v in field)
    nbytes = k * w // 8
    per_byte = 8 // w
    if not kernel or len(field) % per_byte == 0:
        pieces = parts_of(field, per_byte)
        byte = pieces[0]
        for s in range(1, per_byte):
            byte = byte | (pieces[s] << (s * w)).astype(jnp.uint8)
        return byte
    v = concat_last(field)
    shifted = v.astype(jnp.int32) << _plane_bits(k, nbytes, w)
    rows = shifted.reshape((*v.shape[:-1], per_byte, nbytes))
    return jnp.sum(rows, axis=-2).astype(jnp.uint8)


def pack_codes(values: Any, bits: int) -> jax.Array:
    """Packs integer codes ``< 2**bits`` along the last axis, planar layout.

    Args:
      values: the codes, as in `pack_planes`.
      bits: code width, 1 to 8.

    Returns:
      ``uint8`` array ``(..., packed_bytes(K, bits))``: the `pack_planes`
      planes, concatenated.
    """
    planes = pack_planes(values, bits)
    return jnp.concatenate(planes, axis=-1) if len(planes) > 1 else planes[0]


def unpack_planes(
    planes: Sequence[jax.Array], bits: int, parts: int = 0, *, kernel: bool = False
) -> Any:
    """Inverse of `pack_planes`: the planes -> ``(..., K)`` uint8 codes.

    ``parts > 0`` returns the codes as that many equal contiguous parts
    (`parts_of`; a kernel's halves of a 4-bit plane are its two nibbles).
    ``kernel``: unpack as a Pallas Triton kernel can (`_unpack_plane`).
    """
    widths = list(reversed(_widths(bits)))
    if len(planes) != len(widths):
        raise ValueError(
            f"{bits}-bit codes have {len(widths)} planes, got {len(planes)}."
        )
    out, shift = None, 0
    for w, byte in zip(widths, planes, strict=True):
        byte = byte.astype(jnp.uint8)
        field = [p << shift for p in _unpack_plane(byte, w, parts, kernel)]
        out = field if out is None else [a | b for a, b in zip(out, field, strict=True)]
        shift += w
    return out if parts else out[0]


def _unpack_plane(byte: jax.Array, w: int, parts: int, kernel: bool) -> list[jax.Array]:
    """One plane's ``w``-bit values as ``max(parts, 1)`` contiguous parts.

    Where each part is made of whole bytes' pieces (a kernel's halves of a
    4-bit plane), or outside a kernel, each byte's pieces are shifted out
    and joined into the parts. Otherwise (``kernel``) every
    byte is repeated once per value it holds (a broadcast and a reshape:
    ``(..., nbytes) -> (..., K)``) and each value shifted down from its
    bit (`_plane_bits`): no tree of joins in a Triton kernel (`_pack_plane`).
    """
    mask = (1 << w) - 1
    per_byte = 8 // w
    n = max(parts, 1)
    if not kernel or n % per_byte == 0:
        pieces = [(byte >> (s * w)) & mask for s in range(per_byte)]
        return [p.astype(jnp.uint8) for p in parts_of(pieces, n)]
    *lead, nbytes = byte.shape
    k = nbytes * per_byte
    spread = jnp.broadcast_to(byte[..., None, :], (*lead, per_byte, nbytes))
    shift = _plane_bits(k, nbytes, w).astype(jnp.uint8)
    values = (spread.reshape((*lead, k)) >> shift) & mask
    return parts_of(values.astype(jnp.uint8), n)


def split_planes(packed: jax.Array, bits: int, num_values: int) -> list[jax.Array]:
    """The planes of `pack_codes` bytes ``(..., bytes)`` (slices of the last axis)."""
    sizes = plane_bytes(num_values, bits)
    if len(sizes) == 1:
        return [packed]  # one plane: no slice (kernel friendly)
    out, offset = [], 0
    for n in sizes:
        out.append(packed[..., offset : offset + n])
        offset += n
    return out


def unpack_codes(packed: jax.Array, bits: int, num_values: int) -> jax.Array:
    """Inverse of `pack_codes`: ``(..., bytes)`` uint8 -> ``(..., K)`` uint8."""
    return unpack_planes(split_planes(packed, bits, num_values), bits)


#: Largest group scale a codec stores (2**126): its reciprocal, which the
#: encoders multiply by (XLA turns ``x / scale`` into ``x * (1 / scale)``), is
#: then a normal float32, never flushed to 0.
MAX_SCALE = 2.0**126
#: Largest magnitude the optimizers store (2**125, about 4.25e37): moments are
#: saturated to it before encoding (`saturate_or_keep`), so no codec's group
#: extent (at most a pair's radius, sqrt(2) times it) exceeds `MAX_SCALE`.
MAX_STORED = MAX_SCALE / 2


def is_finite(x: jax.Array) -> jax.Array:
    """``jnp.isfinite(x)`` as ``|x| < inf``, which every Pallas backend lowers."""
    return jnp.abs(x) < jnp.inf


def saturate(x: jax.Array) -> jax.Array:
    """``x`` clipped to ``[-MAX_STORED, MAX_STORED]`` (NaN stays NaN).

    A complex ``x`` (a complex leaf's full-precision moment) has its real and
    imaginary parts clipped.
    """
    if jnp.iscomplexobj(x):
        return jax.lax.complex(saturate(x.real), saturate(x.imag)).astype(x.dtype)
    return jnp.clip(x, -MAX_STORED, MAX_STORED)


def saturate_or_keep(
    new: jax.Array, old: jax.Array, ok: jax.Array, *, nonnegative: bool = False
) -> jax.Array:
    """The value an optimizer stores for a moment: the fault rule.

    Where ``ok`` (the element's incoming update is finite) the new moment,
    saturated (`saturate`: an overflow to inf stores ``±MAX_STORED``); elsewhere
    the old one, so a NaN or inf update element leaves its moments as they
    were and the rest of its group is encoded as if it had not come. Every
    transform's step applies it, on the ``jnp`` path and in the fused kernels
    alike, before encoding.

    Args:
      new: the stepped moment, float32.
      old: the moment before the step (decoded), float32, same shape.
      ok: bool, same shape: where ``new`` is taken (`is_finite` of the
        update).
      nonnegative: the caller guarantees ``new >= 0`` (or NaN) wherever
        ``ok``: Adam's second moment ``v + (1 - b2) (g² - v)`` from ``v >=
        0`` with ``b2`` in ``[0, 1)``, which float32 rounding keeps ``>= 0``
        (``g² - v >= -v`` rounds to ``>= -v``, a product with ``1 - b2 <=
        1`` keeps that bound, and ``v`` plus it rounds to ``>= 0``). Only
        the upper bound is then applied: the same values, one instruction
        per element fewer in the fused kernels (``NOTES_kernels.md``, v38).

    Returns:
      float32 of ``new``'s shape, finite wherever ``old`` is.

    Examples:
      >>> import jax.numpy as jnp
      >>> from optax_lowbit.codecs import base
      >>> new, old = jnp.array([1.0, jnp.inf, 2.0]), jnp.full(3, 0.5)
      >>> ok = jnp.array([True, True, False])  # the third update was NaN
      >>> print(base.saturate_or_keep(new, old, ok))
      [1.0000000e+00 4.2535296e+37 5.0000000e-01]
    """
    stored = jnp.minimum(new, MAX_STORED) if nonnegative else saturate(new)
    return jnp.where(ok, stored, old)


def unfused(product: jax.Array) -> jax.Array:
    """A float32 product rounded on its own, so that no compiler fuses it (FMA).

    ``a + b * c`` is one rounding where a compiler contracts it into a fused
    multiply-add and two where it does not, and whether it does depends on
    how each program is fused: the CPU interpreter's kernel and the jnp path
    were seen to differ (a group maximum 1 ulp apart, a different bf16
    scale). Clearing the product's lowest bit (its magnitude down by at most
    1 ulp; 0, inf and the sign kept) needs the rounded product, so every
    backend then adds the same two floats. Use it where a sum of products
    decides a discrete result (a scale, a ring, a sector) that the kernel and
    the jnp path must agree on.

    Args:
      product: float32 products.

    Returns:
      float32, ``product`` with its lowest mantissa bit cleared.
    """
    bits = jax.lax.bitcast_convert_type(jnp.asarray(product, jnp.float32), jnp.uint32)
    return jax.lax.bitcast_convert_type(bits & jnp.uint32(0xFFFFFFFE), jnp.float32)


def _ceil_to_bf16(x: jax.Array) -> jax.Array:
    """Rounds float32 ``x >= 0`` **up** to bfloat16, by bit arithmetic.

    Any float32 whose low 16 bits are not zero moves to the next bfloat16 up
    (above the largest bfloat16, to inf: `safe_scale` saturates it);
    NaN and inf are kept. Exact for every non-negative float32, and the same
    on every backend: a round trip ``f32 -> bf16 -> f32`` compared with ``x``
    (the obvious form) is folded away by the Triton compiler, which then
    rounded half of the scales down.
    """
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    low = bits & jnp.uint32(0xFFFF)
    finite = (bits & jnp.uint32(0x7F800000)) != jnp.uint32(0x7F800000)
    up = (low != 0) & finite
    bits = jnp.where(up, bits + jnp.uint32(0x10000), bits)
    hi = (bits >> jnp.uint32(16)).astype(jnp.uint16)
    return jax.lax.bitcast_convert_type(hi, jnp.bfloat16)


def safe_scale(absmax: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """Rounds group maxima to the stored scale dtype and makes a safe divisor.

    Args:
      absmax: float32 group maxima (>= 0).
      dtype: storage dtype of the scales (float32 or bfloat16).

    Returns:
      ``(stored, divisor)``: ``stored`` is ``absmax`` rounded **up** to
      ``dtype`` (so normalised values stay within [-1, 1]), saturated at
      `MAX_SCALE` (or the dtype's largest finite value, if smaller: a finite
      ``absmax`` never stores inf; values beyond it normalise above 1 and
      round to the codec's largest codeword), and 0 where ``absmax`` is below
      the smallest normal float32 (flushed, as FTZ hardware does: a subnormal
      scale's reciprocal would overflow); ``divisor`` is its float32 value
      with zeros replaced by 1, so an all-zero group divides to zeros, never
      NaN.
    """
    absmax = jnp.asarray(absmax, jnp.float32)
    absmax = jnp.where(absmax < jnp.finfo(jnp.float32).tiny, 0.0, absmax)
    limit = min(MAX_SCALE, float(jnp.finfo(dtype).max))
    if jnp.dtype(dtype) == jnp.bfloat16:
        stored = _ceil_to_bf16(absmax)
    else:
        stored = absmax.astype(dtype)
        if jnp.dtype(dtype) != jnp.float32:
            too_small = stored.astype(jnp.float32) < absmax
            stored = jnp.where(
                too_small, jnp.nextafter(stored, jnp.asarray(jnp.inf, dtype)), stored
            )
    stored = jnp.minimum(stored, jnp.asarray(limit, stored.dtype))
    as_f32 = stored.astype(jnp.float32)
    divisor = jnp.where(as_f32 > 0, as_f32, 1.0)
    return stored, divisor


_U32 = jnp.uint32
#: `hash32`'s shifts and multipliers (``lowbias32``), as uint32 scalars that
#: NumPy, jnp and lax all take.
_SHIFT_16, _SHIFT_15 = np.uint32(16), np.uint32(15)
_MUL_1, _MUL_2 = np.uint32(0x7FEB352D), np.uint32(0x846CA68B)
#: `dither_bits`' step between a group's pairs: 2**32 / golden ratio (odd).
_WEYL = np.uint32(0x9E3779B9)


def hash32(x: Any) -> Any:
    """A bijective 32-bit integer mixer (``lowbias32``), elementwise.

    Shifts, xors and wrapping uint32 multiplies only, so it runs the same in
    XLA, in the Pallas interpreter and in a Triton kernel. A Python or NumPy
    integer is mixed in NumPy: the same bits, with no JAX operation, so the
    constant salts of `stream_seed` cost nothing when a step is traced.

    Args:
      x: integer array (cast to uint32), or a Python or NumPy integer.

    Returns:
      uint32 array of ``x``'s shape (NumPy for a NumPy or Python input).
    """
    if isinstance(x, (int, np.integer, np.ndarray)):
        x = np.asarray(x).astype(np.uint32)
        xor, shift, mul = np.bitwise_xor, np.right_shift, np.multiply
    else:  # lax, not jnp: a traced step hashes hundreds of seeds, and each jnp
        # operator costs several times its primitive to trace
        x = jnp.asarray(x).astype(_U32)
        xor, shift, mul = jax.lax.bitwise_xor, jax.lax.shift_right_logical, jax.lax.mul
    with np.errstate(over="ignore"):  # uint32 products wrap, as intended
        x = mul(xor(x, shift(x, _SHIFT_16)), _MUL_1)
        x = mul(xor(x, shift(x, _SHIFT_15)), _MUL_2)
        return xor(x, shift(x, _SHIFT_16))


def stream_seed(seed: Any, *salts: Any) -> jax.Array:
    """A uint32 seed for one random stream: ``seed`` mixed with static salts.

    The transforms call it with their step count and the leaf's and moment's
    ordinals, so every leaf, moment and step draws an independent stream from
    state the optimizer already keeps (no PRNG key in the state). Elementwise:
    with arrays of salts (or of seeds) it forms many streams at once, each
    the bits it would be alone, in a few vector operations (a step of many
    leaves then traces and compiles a few operations instead of a few dozen
    per leaf).

    Args:
      seed: integer scalar or array, may be traced (e.g. the step count).
      *salts: Python ints or NumPy integer arrays naming the streams
        (broadcast against each other and ``seed``; mixed in NumPy).

    Returns:
      uint32, the broadcast shape of ``seed`` and ``salts``.
    """
    s = hash32(seed)
    for salt in salts:
        s = hash32(s ^ hash32(np.asarray(salt, np.int64) & 0xFFFFFFFF))
    return jnp.asarray(s, _U32)


def dither_bits(group: jax.Array, half: int, seed: Any) -> jax.Array:
    """Random uint32 words of the ``half`` pairs of each group, stream ``seed``.

    A counter-based generator: one ``lowbias32`` key per group (two rounds of
    `hash32` over the group's index and the seed), and pair ``j`` of the group
    takes ``key + j * 0x9E3779B9`` (wrapping; a Weyl sequence with the golden
    ratio's increment). The words are a pure function of the group's position
    and the seed, so a kernel that knows a group's index draws the same bits
    as the jnp reference, and a resumed run draws the same bits as an
    unbroken one.

    Each word alone is uniform on 32 bits (the key is), so its two 16-bit
    halves are independent uniforms and stochastic rounding with them stays
    unbiased element by element; within a group the words are a lattice, not
    independent (stratified: of many elements with the same fraction to
    round, the share rounded up is closer to the fraction than with
    independent draws). Streams of different seeds (moments, leaves, steps)
    have independent keys. Hashing once per group instead of twice per pair
    takes ~9 instructions per element and moment out of the fused kernels
    (``NOTES_kernels.md``, v23).

    Args:
      group: uint32 group indices (row-major positions in the leaf's group
        grid) with a trailing axis of 1.
      half: pairs per group (the group's size / 2): words ``0 .. half - 1``.
      seed: uint32 stream seed (`stream_seed`).

    Returns:
      uint32 array of ``group``'s shape with the trailing axis ``half``.
    """
    seed = jnp.asarray(seed).astype(_U32)
    key = hash32(hash32(group.astype(_U32) ^ seed) + seed)
    return key + jnp.arange(half, dtype=_U32) * _WEYL


def flat_index(shape: tuple[int, ...], like: jax.Array | None = None) -> jax.Array:
    """Row-major flat positions of an array of ``shape`` as uint32 (wrapping).

    Args:
      shape: the array's shape.
      like: an array whose sharding (under explicit mesh axes) the indices
        take on their leading axes; ``None`` for none.

    Returns:
      uint32 array of ``shape``.
    """
    sharding = None if like is None else jax.typeof(like).sharding
    if sharding is not None and getattr(sharding, "mesh", None) is not None:
        if sharding.mesh.empty or len(sharding.spec) > len(shape):
            sharding = None
    out = jnp.zeros(shape, _U32)
    stride = 1
    for dim in reversed(range(len(shape))):
        iota = jax.lax.broadcasted_iota(_U32, shape, dim, out_sharding=sharding)
        out = out + iota * _U32(stride & 0xFFFFFFFF)
        stride *= shape[dim]
    return out


def group_noise(xg: jax.Array, seed: Any) -> jax.Array:
    """The stochastic-rounding bits of ``(..., G)`` groups: one uint32 per pair.

    Word ``j`` of a group serves elements ``j`` and ``j + G/2`` (`uniform_pair`
    splits it); the words of a group come from its row-major position in the
    leaf's group grid, as a kernel that knows its global group index draws
    them (`dither_bits`).

    Args:
      xg: float ``(..., G)`` groups (only the shape and sharding are read).
      seed: uint32 stream seed (`stream_seed`); ``None`` is stream 0.

    Returns:
      uint32 ``(..., G/2)``.
    """
    seed = stream_seed(0) if seed is None else seed
    groups = flat_index((*xg.shape[:-1], 1), like=xg)
    return dither_bits(groups, xg.shape[-1] // 2, seed)


def element_uniforms(bits: jax.Array) -> jax.Array:
    """One uniform in ``[0, 1)`` per element from `group_noise` words.

    ``(..., G/2)`` words -> ``(..., G)``: element ``j < G/2`` takes the high
    16 bits of word ``j``, element ``j + G/2`` its low 16 bits.
    """
    return concat_last(list(uniform_pair(bits)))


def uniform_pair(bits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Two float32 uniforms in ``[0, 1)`` (16-bit resolution) from uint32 bits."""
    hi = (bits >> _U32(16)).astype(jnp.int32).astype(jnp.float32)
    lo = (bits & _U32(0xFFFF)).astype(jnp.int32).astype(jnp.float32)
    return hi * (1.0 / 65536.0), lo * (1.0 / 65536.0)


class Codec(abc.ABC):
    """Base class of every codec: a frozen, hashable description of a format.

    Subclasses are frozen dataclasses that define `name`, `group_size`,
    `bytes_per_group`, `scale_dtype`, `encode_groups` and `decode_groups`.
    """

    #: elements per group (the unit of ``codes``' second-to-last axis)
    group_size: int
    #: scales stored per group (1 for every codec but π-Quant's superblocks)
    scales_per_group: int = 1

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """A short unique name, e.g. ``"polar-2b-signed"``."""

    @property
    @abc.abstractmethod
    def bytes_per_group(self) -> int:
        """Code bytes per group."""

    @property
    @abc.abstractmethod
    def scale_dtype(self) -> Any:
        """The dtype of the stored scales."""

    @property
    def signed(self) -> bool:
        """Whether the codec accepts negative values."""
        return True

    @property
    def stochastic(self) -> bool:
        """Whether encoding rounds stochastically (then it takes a ``seed``)."""
        return False

    @property
    def bits_per_element(self) -> float:
        """All-in bits per element for whole groups: codes plus scales."""
        scale_bytes = self.scales_per_group * jnp.dtype(self.scale_dtype).itemsize
        return 8.0 * (self.bytes_per_group + scale_bytes) / self.group_size

    @abc.abstractmethod
    def encode_groups(self, xg: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Encodes ``(..., group_size)`` float32 groups.

        Returns:
          ``(codes, scales)`` of shapes ``(..., bytes_per_group)`` uint8 and
          ``(..., scales_per_group)`` in `scale_dtype`.
        """

    @abc.abstractmethod
    def decode_groups(self, codes: jax.Array, scales: jax.Array) -> jax.Array:
        """Decodes groups back to ``(..., group_size)`` float32."""

    def encode(self, x: jax.Array, *, seed: Any = None) -> Packed:
        """Encodes a float array of any shape into a `Packed` pytree.

        Args:
          x: float array.
          seed: integer scalar (may be traced) selecting the random stream of a
            `stochastic` codec; ``None`` is stream 0. Deterministic codecs
            ignore it.

        Returns:
          The `Packed` encoding of ``x``.
        """
        _checks.float_array("x", x)
        shape = tuple(x.shape)
        xg = to_groups(x, self.group_size)
        seed = stream_seed(0 if seed is None else seed) if self.stochastic else None
        codes, scales = _encode_groups_jit(self, xg, seed)
        scales = scales.reshape(self.packed_shapes(shape).scales.shape)  # its layout
        return Packed(codes=codes, scales=scales, shape=shape, codec=self)

    def decode(self, packed: Packed) -> jax.Array:
        """Decodes a `Packed` made by this codec to float32 of its shape."""
        if not isinstance(packed, Packed):
            raise TypeError(f"packed must be a Packed, got {type(packed).__name__}.")
        if packed.codec_name != self.name:
            raise ValueError(
                f"packed was made by codec {packed.codec_name!r}; this codec is "
                f"{self.name!r}. Decode it with the codec that encoded it."
            )
        scales = packed.scales.reshape(
            (*packed.scales.shape[:-1], -1, self.scales_per_group)
        )
        xg = _decode_groups_jit(self, packed.codes, scales)
        return from_groups(xg, packed.shape)

    def zeros(self, shape: tuple[int, ...]) -> Packed:
        """An all-zero array of ``shape``, encoded (an optimizer's init).

        One zero group is encoded and repeated, so the codes are a broadcast
        (nothing for XLA to constant-fold at init, however large the leaf);
        it decodes to exact zeros. `zeros_many` makes many at once.
        """
        return self.zeros_many([_checks.shape_of("shape", shape)])[0]

    def zeros_many(self, shapes: Sequence[tuple[int, ...]]) -> list[Packed]:
        """`zeros` of each of ``shapes``, in one compiled program.

        An optimizer's ``init`` makes all of a codec's leaves at once: eager,
        that is one compile per codec and list of shapes (one a codec and
        shape had cost GPT-2 small's polar2 state 12 compiles). Each leaf
        gets its own arrays (a state may be donated).

        Args:
          shapes: the arrays' shapes.

        Returns:
          One `Packed` per shape, in order.
        """
        shapes = tuple(_checks.shape_of("shapes[...]", s) for s in shapes)
        return list(_zeros_jit(self, shapes)) if shapes else []

    def packed_shapes(self, shape: tuple[int, ...]) -> Packed:
        """`Packed` of ``jax.ShapeDtypeStruct`` leaves for an array of ``shape``.

        `encode`'s layout from the group contract (`encode_groups`), traced
        nothing: codes ``(*group_grid, bytes_per_group)`` uint8, scales
        ``(*lead, groups * scales_per_group)`` in `scale_dtype`. A codec that
        overrides `encode` overrides this too; the contract tests compare it
        with a trace of `encode` for every codec.
        """
        shape = tuple(shape)
        grid = group_grid(shape, self.group_size)
        return Packed(
            codes=jax.ShapeDtypeStruct((*grid, self.bytes_per_group), jnp.uint8),
            scales=jax.ShapeDtypeStruct(
                (*grid[:-1], grid[-1] * self.scales_per_group),
                jnp.dtype(self.scale_dtype),
            ),
            shape=shape,
            codec=self,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, {self.bits_per_element:.4g} bits)"


@functools.partial(jax.jit, static_argnums=(0, 1))
def _zeros_jit(codec: Codec, shapes: tuple[tuple[int, ...], ...]) -> list[Packed]:
    """`Codec.zeros_many`: one zero group encoded, broadcast to every shape.

    Eager, one program per codec and list of shapes; under an outer jit it is
    inlined.
    """
    zero = jnp.zeros((1, codec.group_size), jnp.float32)
    seed = stream_seed(0) if codec.stochastic else None
    codes, scales = _encode_groups_jit(codec, zero, seed)
    out = []
    for shape in shapes:
        like = codec.packed_shapes(shape)
        reps = like.scales.shape[-1] // scales.shape[-1]
        out.append(
            Packed(
                codes=jnp.broadcast_to(codes[0], like.codes.shape),
                scales=jnp.broadcast_to(
                    jnp.tile(scales[0], reps).astype(like.scales.dtype),
                    like.scales.shape,
                ),
                shape=shape,
                codec=codec,
            )
        )
    return out


# One compiled encode/decode per codec and shape: eager callers (tests,
# notebooks, `convert`) would otherwise dispatch the group math op by op;
# under an outer jit these inline as before.
@functools.partial(jax.jit, static_argnums=0)
def _encode_groups_jit(codec: Codec, xg: jax.Array, seed: Any):
    if codec.stochastic:
        return codec.encode_groups(xg, seed=seed)
    return codec.encode_groups(xg)


@functools.partial(jax.jit, static_argnums=0)
def _decode_groups_jit(codec: Codec, codes: jax.Array, scales: jax.Array):
    return codec.decode_groups(codes, scales)
