"""The codec-specific part of the fused kernels: layouts, tables, eligibility.

Everything the kernels need to know about one codec, and nothing about the
update rule (Adam, momentum):

* `has_kernel` / `check_codecs`: which codecs (and codec pairs) the fused
  kernel takes;
* `tables`: the codec's constant tables (``codec.kernel_tables()``), padded
  to power-of-two lengths for the kernel's whole-array inputs;
* `Codes`, `Scales`, `Values`: how a block reads and writes one moment's code
  planes, its scales, and a leaf's values (gradient, parameters, update):
  gathered offsets of flat buffers, so nothing in a kernel depends on the
  leaf's shape (`optax_lowbit.kernels.launch`);
* `load` / `store`: a block's masked loads and stores;
* `FloatMoment`: a moment kept as a plain float32 array (the float-moment
  leaves), as a codec the kernels step like the quantized ones.

The group math itself (decode, encode, the codebooks) is not here: the kernel
calls the codec's own jnp group functions (``codec.kernel_decode`` and
``codec.kernel_encode`` in `optax_lowbit.codecs`), which are the jnp
reference of this part.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import triton as plgpu

from optax_lowbit.codecs import base

#: Group sizes the kernel blocks: powers of two, 16 to 256 (π-Quant's 96 too).
KERNEL_GROUP_SIZES = (16, 32, 64, 128, 256)
#: The longest kernel row of a codec held in parts (`columns`): a joint row of
#: two codecs whose groups differ, π-Quant's four superblocks beside three
#: 128-element groups (`optax_lowbit.kernels.joint`).
MAX_KERNEL_ROW = 384
#: Sizes of the parts a kernel holds a group as (`columns`): powers of two.
KERNEL_PART_SIZES = (8, 16, 32, 64, 128)


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def planes(codec: base.Codec) -> list[int]:
    """Bytes of each code plane of one group of ``codec``."""
    return list(codec.code_planes())


def row_groups(codec: Any) -> tuple[Any, int]:
    """``(codec of each group, groups per kernel row)`` of a moment's codec.

    ``(codec, 1)``: a kernel row is one group; a joint row
    (`optax_lowbit.kernels.joint.Rows`) holds ``k`` consecutive groups of
    its codec (its ``row_groups``).
    """
    return getattr(codec, "row_groups", (codec, 1))


def plane_parts(codec: base.Codec) -> tuple[tuple[int, int, int], ...]:
    """``(start, stride, size)`` of each piece of a group's codes a kernel loads.

    The code planes one after the other (`planes`: ``(start, 1, bytes)``),
    unless the codec says where it holds them (``kernel_plane_parts``: a
    4-bit plane read as strided byte parts beside π-Quant, whose nibbles
    then pair part by part; `optax_lowbit.kernels.joint.Blocks32`). The
    pieces cover the group's code bytes once each. For a joint row, those
    of one of its groups (`row_groups`).

    Args:
      codec: the moment's codec.

    Returns:
      One ``(start, stride, size)`` per piece, in the order the codec's
      ``kernel_decode`` takes them and its ``kernel_encode`` returns them.
    """
    codec = row_groups(codec)[0]
    if hasattr(codec, "kernel_plane_parts"):
        return tuple(codec.kernel_plane_parts())
    out, start = [], 0
    for n in planes(codec):
        out.append((start, 1, n))
        start += n
    return tuple(out)


def group_rows(
    codec: Any, row: jax.Array, groups_per_row: Any = None, last: Any = None
) -> tuple[list[jax.Array], list[jax.Array] | None]:
    """Each group of the kernel rows ``row``: its row in the codec's group grid.

    One group a row: ``row`` itself. A joint row of ``k`` groups of ``G``
    (`row_groups`) over a leaf whose rows are whole joint rows (``last`` is
    ``None``): groups ``k row + i``. Otherwise (the leaf's last axis
    ``last`` not a multiple of the joint row, its rows padded to
    ``groups_per_row`` joint rows): kernel row ``r`` is joint row ``c = r
    mod groups_per_row`` of leaf row ``R``; its group ``i`` is the codec's
    group ``R ceil(last / G) + k c + i``, which exists where ``k c + i <
    ceil(last / G)`` (the codec pads its own rows to ``G`` only).

    Args:
      codec: the moment's codec.
      row: integer ``(block,)`` (or ``(block, 1)``) kernel rows (int32, or
        uint32 global rows).
      groups_per_row: joint rows along the leaf's last axis (traced).
      last: the leaf's last axis (traced), or ``None`` for whole rows.

    Returns:
      ``(rows, valid)``: one array of ``row``'s shape and dtype per group,
      and per group a bool array where it exists (``None``: everywhere).
    """
    inner, k = row_groups(codec)
    if k == 1:
        return [row], None
    dtype = row.dtype
    if last is None:
        first = row * jnp.asarray(k, dtype)
        return [first + jnp.asarray(i, dtype) for i in range(k)], None
    size = jnp.asarray(inner.group_size, dtype)
    per = jnp.asarray(groups_per_row, dtype)
    # rows >= 0: truncating division and remainder (v35)
    own = jax.lax.div(jnp.asarray(last, dtype) + size - 1, size)
    lead = jax.lax.div(row, per)
    first = (row - lead * per) * jnp.asarray(k, dtype)
    at = [first + jnp.asarray(i, dtype) for i in range(k)]
    return [lead * own + j for j in at], [j < own for j in at]


def noise(
    codec: base.Codec, group: jax.Array, seed: Any, groups_per_row=None, last=None
) -> Any:
    """The random words a kernel gives a stochastic codec's ``kernel_encode``.

    `base.dither_bits` of the group's ``G / 2`` pairs, unless the codec draws
    its own (``kernel_noise``: the words of strided parts,
    `optax_lowbit.kernels.joint.Blocks32`); a joint row's groups each their
    own, from their rows in the codec's grid (`group_rows`). The same words
    as the jnp path's (`base.group_noise`) where the codec holds them.

    Args:
      codec: a stochastic codec with a kernel.
      group: uint32 ``(block, 1)`` global kernel rows of the block.
      seed: the moment's final stream seed (traced uint32).
      groups_per_row: as `group_rows` (a padded leaf).
      last: as `group_rows` (a padded leaf).

    Returns:
      What the codec's ``kernel_encode`` takes as ``noise``.
    """
    inner, k = row_groups(codec)
    if k > 1:
        rows, _ = group_rows(codec, group, groups_per_row, last)
        return [noise(inner, r, seed) for r in rows]
    if hasattr(codec, "kernel_noise"):
        return codec.kernel_noise(group, seed)
    return base.dither_bits(group, codec.group_size // 2, seed)


def columns(codec: base.Codec) -> tuple[tuple[int, int, int], ...] | None:
    """``(start, stride, size)`` of each part a kernel splits a group into.

    Polar and blockwise groups are held as their two halves
    (`base.halves`: a pair's coordinates, the two nibbles of a 4-bit byte,
    the two uniforms of a random word), so decoding and encoding need no
    tensor splits or joins (Triton layout conversions); π-Quant's 96 is six
    parts of 16 (`PiQuantCodec.kernel_columns`). Each part is an arithmetic
    progression of columns, rebuilt in the kernel from an iota (it cannot
    capture arrays), read and written by gathered loads at
    ``row * group_size + column``.

    Args:
      codec: the moment's codec.

    Returns:
      The parts, or ``None`` where the group is held whole.
    """
    parts = codec.kernel_columns() if hasattr(codec, "kernel_columns") else None
    if parts is None:
        return None
    out = []
    for part in parts:
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
    (polar 2 bits: one 16-byte plane; 1.5 bits: 4 + 8; blockwise 8 bits:
    its two halves' bytes, 128 + 128; 4 bits: 64; π-Quant: 16 + 16 + 8) and
    whose group is a power of two from 16 to 256 elements (π-Quant: 96),
    held as parts (`columns`: halves, or π-Quant's six parts of 16) of a
    power of two from 8 to 128 elements.

    Args:
      codec: a codec.

    Returns:
      ``True`` where the kernels (`optax_lowbit.kernels.adam.adam_update`,
      `optax_lowbit.kernels.adam.rule_update`, any rule) accept it.
    """
    if not all(
        hasattr(codec, name)
        for name in ("kernel_tables", "kernel_decode", "kernel_encode")
    ):
        return False
    cols = columns(codec)
    if cols is None:
        sizes_ok = codec.group_size in KERNEL_GROUP_SIZES
    else:
        sizes_ok = codec.group_size <= MAX_KERNEL_ROW and all(
            c[2] in KERNEL_PART_SIZES for c in cols
        )
    return sizes_ok and all(_power_of_two(p[2]) for p in plane_parts(codec))


def check_codecs(mu_codec: base.Codec, nu_codec: base.Codec | None = None) -> None:
    """Clear errors, before tracing, for codecs the kernel cannot take.

    Args:
      mu_codec: the first moment's codec (Adam's ``m``, or the momentum).
      nu_codec: the second moment's codec; ``None`` for a rule of one moment.

    Raises:
      ValueError: a codec without a kernel, or a pair whose groups differ.
    """
    for name, codec in (("mu_codec", mu_codec), ("nu_codec", nu_codec)):
        if codec is not None and not has_kernel(codec):
            raise ValueError(
                f"{name}={codec!r} has no fused kernel; accepted: polar codecs "
                "(2 or 1.5 bits) and blockwise 8/4-bit codecs with a power-of-two "
                "group size from 16 to 256 (see has_kernel)."
            )
    if nu_codec is None:
        return
    if mu_codec.group_size != nu_codec.group_size or columns(mu_codec) != columns(
        nu_codec
    ):
        raise ValueError(
            "mu_codec and nu_codec must share group_size (and its kernel parts) "
            f"for the fused kernel, got {mu_codec!r} (group_size "
            f"{mu_codec.group_size}) and {nu_codec!r} ({nu_codec.group_size}); "
            "π-Quant's m beside a 4-bit v steps in joint rows with "
            "optax_lowbit.kernels.adam.JOINT_ROWS = 1 (kernels/joint.py)."
        )


def tables(codec: base.Codec) -> list[jax.Array]:
    """The codec's kernel tables, each padded to a power-of-two length.

    Args:
      codec: a codec with a kernel (`has_kernel`).

    Returns:
      1-D arrays (float32, or uint8 where the codec gives bytes), each padded
      with its last entry (``mode="edge"``).
    """
    out = []
    for t in codec.kernel_tables():
        t = np.asarray(t).reshape(-1)
        t = t if t.dtype == np.uint8 else t.astype(np.float32)
        n = 1 << max(0, math.ceil(math.log2(max(t.size, 1))))
        out.append(jnp.asarray(np.pad(t, (0, n - t.size), mode="edge")))
    return out


def _per_piece(valid: Any, n: int) -> list[Any]:
    """``n`` pieces' masks: ``valid`` for each.

    Given one mask per group of a joint row (`group_rows`), each group's for
    its pieces in turn.
    """
    if not isinstance(valid, list):
        return [valid] * n
    return [v for v in valid for _ in range(n // len(valid))]


def load(ref: Any, valid: jax.Array | None, idx: jax.Array) -> jax.Array:
    """``ref[idx]``, a block's gathered offsets; rows past the end read 0.

    Args:
      ref: a kernel ref of a flat buffer.
      valid: bool ``(block,)`` rows inside the leaf, or ``None`` for all.
      idx: int32 ``(block, n)`` offsets into ``ref``.

    Returns:
      The loaded values.
    """
    if valid is None:
        return ref[idx]
    return plgpu.load(ref.at[idx], mask=valid[:, None], other=0)


def store(ref: Any, value: jax.Array, valid: jax.Array | None, idx: jax.Array) -> None:
    """Stores ``value`` at ``idx`` of ``ref``, skipping rows past the end.

    Args:
      ref: a kernel ref of a flat buffer.
      value: ``(block, n)`` values.
      valid: bool ``(block,)`` rows inside the leaf, or ``None`` for all.
      idx: int32 ``(block, n)`` offsets into ``ref``.
    """
    if valid is None:
        ref[idx] = value
        return
    plgpu.store(ref.at[idx], value, mask=valid[:, None])


class Codes:
    """How the kernel reads and writes one moment's codes.

    A leaf's codes are one flat buffer; each code plane of a block (or
    each piece the codec loads, `plane_parts`) is gathered and scattered at
    computed offsets ``row * bytes + start + stride * j`` (every block shape
    a power of two). The offsets of a row-contiguous plane are contiguous,
    so Triton vectorises their loads as it would a blocked row.

    A joint row's groups (`row_groups`) are read at their own rows of the
    codec's grid (`group_rows`), piece by piece.

    Attributes:
      parts: ``(start, stride, size)`` of each piece of a group
        (`plane_parts`).
      nbytes: bytes of a group's codes.
    """

    def __init__(self, codec: base.Codec):
        self.parts = plane_parts(codec)
        self.nbytes = sum(size for _, _, size in self.parts)

    def operand(self, codes: jax.Array) -> jax.Array:
        """The ``pallas_call`` operand of a leaf's codes: flat."""
        return codes.reshape(-1)

    def offsets(self, rows: list[jax.Array]) -> list[jax.Array]:
        """Each piece's int32 ``(block, bytes)`` offsets, group by group.

        Args:
          rows: each group's int32 ``(block,)`` rows in the codec's grid
            (`group_rows`).
        """
        out = []
        for row in rows:
            for start, stride, size in self.parts:
                col = jnp.arange(size, dtype=jnp.int32)[None, :]
                col = col * stride + start if stride != 1 else col + start
                out.append(row[:, None] * self.nbytes + col)
        return out

    def load(self, ref, offsets, valid) -> list[jax.Array]:
        """The block's code pieces at `offsets`, one ``(block, bytes)`` each.

        ``valid``: bool ``(block,)`` rows to load (``None``: all), or one
        such mask per group (a joint row's, `group_rows`).
        """
        masks = _per_piece(valid, len(offsets))
        return [load(ref, m, idx) for idx, m in zip(offsets, masks, strict=True)]

    def store(self, ref, offsets, planes: list[jax.Array], valid) -> None:
        """Stores the block's code pieces at `offsets` (`load`'s layout)."""
        masks = _per_piece(valid, len(offsets))
        for idx, plane, m in zip(offsets, planes, masks, strict=True):
            store(ref, plane, m, idx)


class Values:
    """How the kernel reads and writes a leaf's values (gradient, parameters, u).

    A leaf's values are one flat buffer of ``(groups, size)`` rows; a block
    reads them at ``row * size + column``, part by part (`columns`; one part
    of every column for a codec held whole). Values are always a list of
    parts.

    Attributes:
      columns: the codec's parts (`columns`), ``None`` for whole groups.
      size: the group size.
    """

    def __init__(self, codec: base.Codec):
        self.columns = columns(codec)
        self.size = codec.group_size

    def operand(self, rows: jax.Array) -> jax.Array:
        """The ``pallas_call`` operand of a leaf's ``(groups, size)`` rows: flat."""
        return rows.reshape(-1)

    def _cols(self):
        if self.columns is None:
            return [jnp.arange(self.size, dtype=jnp.int32)[None, :]]
        return [
            start + stride * jnp.arange(size, dtype=jnp.int32)[None, :]
            for start, stride, size in self.columns
        ]

    def offsets(self, row: jax.Array) -> list[jax.Array]:
        """Each part's int32 ``(block, part)`` offsets of the rows ``row``."""
        return [row[:, None] * self.size + c for c in self._cols()]

    def col(self, row: jax.Array, groups_per_row: Any) -> list[jax.Array]:
        """Each part's column within the leaf's last axis.

        Args:
          row: int32 ``(block,)`` group rows.
          groups_per_row: groups along the leaf's last axis (may be traced).
        """
        first = (row % groups_per_row) * self.size
        return [first[:, None] + c for c in self._cols()]

    def load(self, ref, offsets, valid) -> list[jax.Array]:
        """The block's values at `offsets`, one array per part."""
        return [load(ref, valid, idx) for idx in offsets]

    def store(self, ref, offsets, parts, valid) -> None:
        """Stores the block's values at `offsets` (`load`'s layout)."""
        for idx, part in zip(offsets, parts, strict=True):
            store(ref, part, valid, idx)


class Scales:
    """How the kernel reads and writes a moment's scales.

    A leaf's scales are one flat buffer, ``per_group`` per group; a block
    reads them as a list of ``(block, 1)`` columns, one per scale of a
    kernel row (a joint row's groups each at their own rows, `Codes`).

    Attributes:
      per_group: scales per group.
      per_row: scales per kernel row.
    """

    def __init__(self, codec: base.Codec):
        self.per_group = row_groups(codec)[0].scales_per_group
        self.per_row = codec.scales_per_group

    @property
    def has_operand(self) -> bool:
        """Whether a launch passes the scales (not for `FloatMoment`: none)."""
        return self.per_group > 0

    def operand(self, scales: jax.Array) -> jax.Array:
        """The ``pallas_call`` operand of a leaf's scales: flat."""
        return scales.reshape(-1)

    def offsets(self, rows: list[jax.Array]) -> list[jax.Array]:
        """Each scale's int32 ``(block, 1)`` offsets, group by group (`Codes`)."""
        return [
            row[:, None] * self.per_group + k
            for row in rows
            for k in range(self.per_group)
        ]

    def load(self, ref, offsets, valid):
        """The block's scales at `offsets`: a ``(block, 1)`` column, or a list."""
        masks = _per_piece(valid, len(offsets))
        out = [load(ref, m, idx) for idx, m in zip(offsets, masks, strict=True)]
        return out[0] if self.per_row == 1 else out

    def store(self, ref, offsets, scales, valid) -> None:
        """Stores the block's scales at `offsets` (`load`'s layout)."""
        scales = [scales] if self.per_row == 1 else scales
        masks = _per_piece(valid, len(offsets))
        for idx, s, m in zip(offsets, scales, masks, strict=True):
            store(ref, s, m, idx)


@dataclasses.dataclass(frozen=True)
class FloatMoment:
    """A moment kept as a plain float32 array, as the kernels read it.

    The transforms keep some leaves' moments unquantized (the policy's
    float32 leaves: plain arrays of the leaf's shape, not `base.Packed`).
    To the kernels such a moment is a codec without scales or tables: groups
    of `group_size` values along the last axis, one code plane per group
    holding the values themselves (`Codes`' offsets count elements of the
    codes' dtype: bytes for the quantized codecs' uint8 codes, float32
    values here), decoded and encoded as they are. A launch passes no scales
    operand for it (`Scales.has_operand`), and the arrays are updated in
    place as the codes are. Only leaves whose last axis is a multiple of
    `group_size` can take it (a padded copy could not be updated in place;
    `optax_lowbit.kernels.adam.float_leaf_fits`).

    Attributes:
      group_size: values per group (a kernel group size, `KERNEL_GROUP_SIZES`).
    """

    group_size: int = 16
    name: ClassVar[str] = "float32"
    stochastic: ClassVar[bool] = False
    scales_per_group: ClassVar[int] = 0

    def code_planes(self) -> tuple[int, ...]:
        """One plane of `group_size` float32 values a group."""
        return (self.group_size,)

    def kernel_tables(self) -> tuple[np.ndarray, ...]:
        """No tables."""
        return ()

    def kernel_decode(self, planes: list[Any], scales: Any, tables: Any) -> Any:
        """The stored values (float32)."""
        del scales, tables
        return planes[0]

    def kernel_encode(
        self, x: Any, tables: Any, noise: Any
    ) -> tuple[list[Any], list[Any]]:
        """The values to store, as they are, and no scales."""
        del tables, noise
        return [x], []
