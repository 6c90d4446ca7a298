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

#: Group sizes the kernel blocks: powers of two, 16 to 256 (π-Quant's 96 too,
#: held in parts: `columns`).
KERNEL_GROUP_SIZES = (16, 32, 64, 128, 256)
#: Sizes of the parts a kernel holds a group as (`columns`): powers of two.
KERNEL_PART_SIZES = (8, 16, 32, 64, 128)


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def planes(codec: base.Codec) -> list[int]:
    """Bytes of each code plane of one group of ``codec``."""
    return list(codec.code_planes())


def noise(codec: base.Codec, group: jax.Array, seed: Any) -> Any:
    """The random words a kernel gives a stochastic codec's ``kernel_encode``.

    `base.dither_bits` of the group's ``G / 2`` pairs: the same words as the
    jnp path's (`base.group_noise`).

    Args:
      codec: a stochastic codec with a kernel.
      group: uint32 ``(block, 1)`` global kernel rows of the block.
      seed: the moment's final stream seed (traced uint32).

    Returns:
      What the codec's ``kernel_encode`` takes as ``noise``.
    """
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
        sizes_ok = codec.group_size <= max(KERNEL_GROUP_SIZES) and all(
            c[2] in KERNEL_PART_SIZES for c in cols
        )
    return sizes_ok and all(_power_of_two(n) for n in planes(codec))


def check_codecs(mu_codec: base.Codec, nu_codec: base.Codec | None = None) -> None:
    """Clear errors, before tracing, for codecs the kernel cannot take.

    Args:
      mu_codec: the first moment's codec (Adam's ``m``, or the momentum).
      nu_codec: the second moment's codec; ``None`` for a rule of one moment.

    Raises:
      ValueError: a codec without a kernel, or a pair whose groups differ
        (π-Quant's ``m`` beside a 4-bit ``v``: no kernel takes it).
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
    if mu_codec.group_size != nu_codec.group_size:
        raise ValueError(
            f"mu_codec={mu_codec!r} and nu_codec={nu_codec!r}: their group sizes "
            f"differ ({mu_codec.group_size} and {nu_codec.group_size}) and no "
            "fused kernel takes such a pair (π-Quant's preset steps these leaves "
            "through XLA); step it with impl='jnp'."
        )
    if columns(mu_codec) != columns(nu_codec):
        raise ValueError(
            f"mu_codec={mu_codec!r} and nu_codec={nu_codec!r} share group_size "
            f"{mu_codec.group_size} but hold it in different kernel parts "
            "(`columns`): no fused kernel takes such a pair; step it with "
            "impl='jnp'."
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

    A leaf's codes are one flat buffer; each code plane of a block
    (`planes`, one after the other in a group's bytes, in the order the
    codec's ``kernel_decode`` takes them and its ``kernel_encode`` returns
    them) is gathered and scattered at computed offsets ``row * bytes +
    start + j`` (every block shape a power of two). The offsets of a
    row-contiguous plane are contiguous, so Triton vectorises their loads as
    it would a blocked row.

    Attributes:
      parts: ``(start, size)`` of each plane of a group.
      nbytes: bytes of a group's codes.
    """

    def __init__(self, codec: base.Codec):
        sizes = planes(codec)
        starts = np.cumsum([0, *sizes[:-1]]).tolist()
        self.parts = tuple(zip(starts, sizes, strict=True))
        self.nbytes = sum(sizes)

    def operand(self, codes: jax.Array) -> jax.Array:
        """The ``pallas_call`` operand of a leaf's codes: flat."""
        return codes.reshape(-1)

    def offsets(self, row: jax.Array) -> list[jax.Array]:
        """Each plane's int32 ``(block, bytes)`` offsets of the rows ``row``.

        Args:
          row: int32 ``(block,)`` group rows.
        """
        out = []
        for start, size in self.parts:
            col = jnp.arange(size, dtype=jnp.int32)[None, :] + start
            out.append(row[:, None] * self.nbytes + col)
        return out

    def load(self, ref, offsets, valid) -> list[jax.Array]:
        """The block's code planes at `offsets`, one ``(block, bytes)`` each.

        ``valid``: bool ``(block,)`` rows to load (``None``: all).
        """
        return [load(ref, valid, idx) for idx in offsets]

    def store(self, ref, offsets, planes: list[jax.Array], valid) -> None:
        """Stores the block's code planes at `offsets` (`load`'s layout)."""
        for idx, plane in zip(offsets, planes, strict=True):
            store(ref, plane, valid, idx)


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
    reads them as a ``(block, 1)`` column, or a list of them where a group
    has several scales.

    Attributes:
      per_group: scales per group.
    """

    def __init__(self, codec: base.Codec):
        self.per_group = codec.scales_per_group

    @property
    def has_operand(self) -> bool:
        """Whether a launch passes the scales (not for `FloatMoment`: none)."""
        return self.per_group > 0

    def operand(self, scales: jax.Array) -> jax.Array:
        """The ``pallas_call`` operand of a leaf's scales: flat."""
        return scales.reshape(-1)

    def offsets(self, row: jax.Array) -> list[jax.Array]:
        """Each scale's int32 ``(block, 1)`` offsets of the rows ``row``."""
        return [row[:, None] * self.per_group + k for k in range(self.per_group)]

    def load(self, ref, offsets, valid):
        """The block's scales at `offsets`: a ``(block, 1)`` column, or a list."""
        out = [load(ref, valid, idx) for idx in offsets]
        return out[0] if self.per_group == 1 else out

    def store(self, ref, offsets, scales, valid) -> None:
        """Stores the block's scales at `offsets` (`load`'s layout)."""
        scales = [scales] if self.per_group == 1 else scales
        for idx, s in zip(offsets, scales, strict=True):
            store(ref, s, valid, idx)


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
