"""Joint kernel rows: one fused step for two moments whose groups differ.

A kernel holds one row of its block as one group of every moment
(`optax_lowbit.kernels.codec_ops`), so both codecs must share their group
and the parts they hold it in. π-Quant's preset does not: its first moment
is coded in superblocks of 96 elements (three 32-element blocks), its second
in 128-element groups of the 4-bit log map. Both are made of 32-element
blocks, which is enough to step them together without changing either
format:

* `Blocks32` holds a 4-bit blockwise group as π-Quant holds a superblock:
  each 32-element block's even and odd elements, parts of 16
  (`optax_lowbit.codecs.piquant.PiQuantCodec.kernel_columns`). Byte ``j`` of
  the 4-bit plane holds elements ``j`` and ``j + G/2``, which fall in parts
  ``i`` and ``i + n/2`` at the same positions, so each part's nibbles pack
  with the other's elementwise, the plane read and written as strided byte
  parts (`codec_ops.plane_parts`); the stochastic words are drawn where the
  parts hold their pairs (`base.dither_bits` of explicit pairs).
* `Rows` holds ``k`` consecutive groups of a codec as one kernel row: a row
  of 384 elements is four superblocks of ``m`` and three groups of ``v``,
  24 parts of 16 in which every element's ``m``, ``v``, gradient and
  parameter sit at the same position. A leaf's groups are consecutive in
  its codes, scales and values, so a row's bytes are ``k`` groups' bytes,
  read in place.

A leaf's groups are numbered along each of its rows, so a joint row's
groups are read where they lie: at ``k r + i`` of the codec's grid where the
leaf's last axis is a multiple of the joint row (GPT-2's 768, 2304, 3072),
else at their own row of each codec's grid, a joint row past either codec's
last group masked (`codec_ops.group_rows`; 4096 and 16384 pad the kernel's
rows to 4224 and 16512, and π-Quant's to 4128 and 16416, as the jnp path's
groups do). `kernel_codecs` picks the codecs a launch steps a pair with (the
pair itself where its groups agree), `leaf_fits` the leaves that take them
(every leaf not sharded under explicit mesh axes).
The arithmetic is the codecs' own kernel functions, group by group: the
kernel's result is the jnp path's (`tests/kernels/test_joint.py`).

The same holding, without joint rows, also serves the polar 2-bit preset
(`quarters`, opt-in: `optax_lowbit.kernels.adam.QUARTERS`): its 4-bit pair
codes put pairs ``j`` and ``j + G/4`` in one byte, so a group held in
quarters packs and unpacks its plane elementwise (`PolarQuarters`), where
halves need a reshape that Triton lowers as layout conversions; the 4-bit
``v`` beside it is held in the same quarters (`BlockwiseQuarters`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_lowbit.codecs import base
from optax_lowbit.codecs.blockwise import BlockwiseCodec
from optax_lowbit.codecs.polar import PolarCodec
from optax_lowbit.kernels import codec_ops, launch

#: Elements of the blocks every codec of a joint row is held in (π-Quant's).
BLOCK = 32
#: Elements of each part: a block's evens or its odds.
PART = BLOCK // 2


def block_columns(group_size: int) -> tuple[tuple[int, int, int], ...]:
    """``(start, stride, size)`` of a group held as its 32-blocks' evens and odds.

    Part ``2 k + e`` is elements ``32 k + e + 2 j`` (`codec_ops.columns`'
    form), as π-Quant's kernel holds a superblock.

    Args:
      group_size: a multiple of 32.

    Returns:
      ``2 * group_size / 32`` parts of 16.
    """
    return tuple(
        (BLOCK * k + e, 2, PART) for k in range(group_size // BLOCK) for e in (0, 1)
    )


def _progression(start: int, stride: int, size: int) -> np.ndarray:
    return start + stride * np.arange(size)


def _piece_words(
    group: jax.Array, seed: Any, pieces: list[tuple[int, int, int]]
) -> list[jax.Array]:
    """`base.dither_bits` of the pairs ``(start, stride, size)`` of each piece.

    The pairs from an iota: a kernel cannot capture an array constant.
    """
    return [
        base.dither_bits(group, start + stride * jnp.arange(size), seed)
        for start, stride, size in pieces
    ]


@dataclasses.dataclass(frozen=True)
class _Held:
    """A codec as a kernel holds it: its group, scales, tables and kernel math.

    The format is the codec's; `Blocks32` and `Rows` change only where a
    kernel holds its groups, and override what that changes.

    Attributes:
      codec: the codec held.
    """

    codec: Any

    @property
    def group_size(self) -> int:
        """The codec's group."""
        return self.codec.group_size

    @property
    def scales_per_group(self) -> int:
        """The codec's scales per group."""
        return self.codec.scales_per_group

    @property
    def stochastic(self) -> bool:
        """Whether the codec rounds stochastically."""
        return self.codec.stochastic

    @property
    def name(self) -> str:
        """The codec's format name."""
        return self.codec.name

    def kernel_tables(self) -> tuple[np.ndarray, ...]:
        """The codec's tables."""
        return self.codec.kernel_tables()

    def code_planes(self) -> list[int]:
        """The codec's code planes (bytes of each, per group)."""
        return self.codec.code_planes()

    @property
    def scale_dtype(self) -> Any:
        """The codec's scale dtype."""
        return self.codec.scale_dtype

    def kernel_decode(self, planes: list[Any], scales: Any, tables: Any) -> list[Any]:
        """The codec's decode (byte parts to parts, for `Blocks32`)."""
        return self.codec.kernel_decode(planes, scales, tables)

    def kernel_encode(
        self, parts: list[Any], tables: Any, noise: Any
    ) -> tuple[list[Any], Any]:
        """The codec's encode (for `Blocks32`: parts to byte parts, word parts)."""
        return self.codec.kernel_encode(parts, tables, noise)


@dataclasses.dataclass(frozen=True)
class Blocks32(_Held):
    """A 4-bit blockwise codec as a kernel holds it beside π-Quant.

    The same format, codes and bits as the codec (its tables, decode and
    encode); only where a kernel holds the group differs: the 32-element
    blocks' evens and odds (`block_columns`) instead of its two halves,
    the 4-bit plane as strided byte parts (byte ``j`` holds elements ``j``
    and ``j + G/2``: parts ``i`` and ``i + n/2``), the stochastic words
    drawn for the pairs the first half's parts hold.

    Attributes:
      codec: a 4-bit `BlockwiseCodec` whose group is a multiple of 64.
    """

    def __post_init__(self) -> None:
        if not fits_blocks32(self.codec):
            raise ValueError(
                f"codec={self.codec!r}: Blocks32 takes a 4-bit blockwise codec "
                "whose block_size is a multiple of 64."
            )

    def kernel_columns(self) -> list[np.ndarray]:
        """`block_columns` of the group."""
        return [_progression(*c) for c in block_columns(self.group_size)]

    def kernel_plane_parts(self) -> list[tuple[int, int, int]]:
        """The 4-bit plane's bytes as the first half's parts hold their elements."""
        half = block_columns(self.group_size)[: self.group_size // BLOCK]
        return list(half)

    def kernel_noise(self, group: jax.Array, seed: Any) -> list[jax.Array]:
        """Each first-half part's words: `base.dither_bits` of its pairs."""
        return _piece_words(group, seed, self.kernel_plane_parts())


@dataclasses.dataclass(frozen=True)
class Rows(_Held):
    """``k`` consecutive groups of a codec held as one kernel row.

    Parts, code pieces and scales are the groups' in order; each group is
    decoded and encoded by the codec's kernel functions, its stochastic
    words those of its own index in the leaf's group grid.

    Attributes:
      codec: a codec with a kernel held in parts (`codec_ops.columns`).
      k: groups per row.
    """

    k: int

    @property
    def group_size(self) -> int:
        """``k`` groups' elements."""
        return self.k * self.codec.group_size

    @property
    def scales_per_group(self) -> int:
        """``k`` groups' scales."""
        return self.k * self.codec.scales_per_group

    @property
    def name(self) -> str:
        """The codec's name and ``k`` (a kernel's name; the format is the codec's)."""
        return f"{self.codec.name}-x{self.k}"

    def kernel_columns(self) -> list[np.ndarray]:
        """Each group's parts, shifted to its place in the row."""
        g = self.codec.group_size
        cols = codec_ops.columns(self.codec)
        return [
            _progression(s + i * g, d, n) for i in range(self.k) for s, d, n in cols
        ]

    @property
    def row_groups(self) -> tuple[Any, int]:
        """``(codec, k)``: the codec of each group and the groups of a row.

        A kernel reads each group's codes and scales at its own row of the
        codec's grid (`codec_ops.group_rows`).
        """
        return self.codec, self.k

    def _split(self, items: list[Any]) -> list[list[Any]]:
        n = len(items) // self.k
        return [items[i * n : (i + 1) * n] for i in range(self.k)]

    def kernel_decode(self, planes: list[Any], scales: Any, tables: Any) -> list[Any]:
        """Each group's decode, its parts in row order."""
        one = self.codec.scales_per_group
        out = []
        for i, pieces in enumerate(self._split(list(planes))):
            own = scales[i * one : (i + 1) * one]
            own = own[0] if one == 1 else own
            out += list(self.codec.kernel_decode(pieces, own, tables))
        return out

    def kernel_encode(
        self, parts: list[Any], tables: Any, noise: Any
    ) -> tuple[list[Any], list[Any]]:
        """Each group's encode: code pieces and scales in row order."""
        planes, scales = [], []
        for i, group in enumerate(self._split(list(parts))):
            words = None if noise is None else noise[i]
            p, s = self.codec.kernel_encode(group, tables, words)
            planes += list(p)
            scales += list(s) if isinstance(s, (list, tuple)) else [s]
        return planes, scales


def quarter_columns(group_size: int) -> list[np.ndarray]:
    """A group's four contiguous quarters (`PolarQuarters`, `BlockwiseQuarters`)."""
    q = group_size // 4
    return [_progression(i * q, 1, q) for i in range(4)]


class _InQuarters:
    """What a codec held in quarters changes, for both codecs of the pair.

    Its columns, its name (a kernel's; the format is the codec's) and where
    its stochastic words are drawn: the pairs of quarters 0 and 2 (pairs
    ``0 .. G/4 - 1``), then those of quarters 1 and 3 (`pair_pieces`).
    """

    codec: Any
    group_size: int

    @property
    def name(self) -> str:
        """The codec's name, marked."""
        return f"{self.codec.name}-quarters"

    def kernel_columns(self) -> list[np.ndarray]:
        """`quarter_columns` of the group."""
        return quarter_columns(self.group_size)

    def pair_pieces(self) -> list[tuple[int, int, int]]:
        """``(start, stride, size)`` of the pairs of each piece."""
        q = self.group_size // 4
        return [(0, 1, q), (q, 1, q)]

    def kernel_noise(self, group: jax.Array, seed: Any) -> list[jax.Array]:
        """Each piece's words: `base.dither_bits` of the pairs it holds."""
        return _piece_words(group, seed, self.pair_pieces())


@dataclasses.dataclass(frozen=True)
class BlockwiseQuarters(_InQuarters, Blocks32):
    """A 4-bit blockwise codec held in quarters, beside `PolarQuarters`.

    `Blocks32` with other columns: byte ``j`` of the plane holds elements
    ``j`` and ``j + G/2``, quarters ``i`` and ``i + 2``, so the plane is
    read and written as two byte parts (the first half's quarters, whose
    elements are the pieces' pairs).
    """

    def kernel_plane_parts(self) -> list[tuple[int, int, int]]:
        """The plane's bytes as the first two quarters hold their elements."""
        return self.pair_pieces()


def fits_quarters(codec: Any) -> bool:
    """Whether `PolarQuarters` takes ``codec``: polar with 4-bit pair codes."""
    return (
        isinstance(codec, PolarCodec)
        and codec.code_bits == 4
        and codec.group_size % 16 == 0
    )


@dataclasses.dataclass(frozen=True)
class PolarQuarters(_InQuarters, _Held):
    """A polar codec of 4-bit pair codes (2 bits an element) held in quarters.

    Pair ``j`` is elements ``j`` and ``j + G/2``, and the plane's byte ``j``
    holds pairs ``j`` and ``j + G/4`` (`base.pack_planes`). In quarters, the
    pairs of quarters 0 and 2 are the plane's low nibbles and those of
    quarters 1 and 3 its high ones: decode and encode split and join the
    plane elementwise (`polar.encode_groups_with`'s ``pair_sets``), the
    group's scale is the maximum over both pieces, and the words are each
    piece's pairs'. The same codes, scales and bits as the codec.

    Attributes:
      codec: a `PolarCodec` with 4-bit pair codes.
    """

    def __post_init__(self) -> None:
        if not fits_quarters(self.codec):
            raise ValueError(
                f"codec={self.codec!r}: PolarQuarters takes a polar codec of "
                "4-bit pair codes (bits=2) whose group_size is a multiple of 16."
            )

    def kernel_decode(self, planes: list[Any], scales: Any, tables: Any) -> list[Any]:
        """The codec's decode of the plane's two nibbles, to quarters."""
        return self.codec.kernel_decode(planes, scales, tables, pair_sets=2)

    def kernel_encode(
        self, parts: list[Any], tables: Any, noise: Any
    ) -> tuple[list[Any], Any]:
        """The codec's encode of the quarters as two pieces of pairs."""
        return self.codec.kernel_encode(parts, tables, noise, pair_sets=2)


def quarters(mu_codec: Any, nu_codec: Any) -> tuple[Any, Any] | None:
    """The pair held in quarters, where it fits, else ``None``.

    A polar ``m`` of 4-bit pair codes beside a 4-bit blockwise ``v`` of the
    same group (the polar 2-bit preset).

    Args:
      mu_codec: the first moment's codec.
      nu_codec: the second moment's codec.

    Returns:
      ``(PolarQuarters, BlockwiseQuarters)`` or ``None``.
    """
    if not (
        fits_quarters(mu_codec)
        and fits_blocks32(nu_codec)
        and mu_codec.group_size == nu_codec.group_size
    ):
        return None
    pair = PolarQuarters(mu_codec), BlockwiseQuarters(nu_codec)
    # quarters the kernel cannot hold (not a power of two): the halves stay
    return pair if all(codec_ops.has_kernel(c) for c in pair) else None


def fits_blocks32(codec: Any) -> bool:
    """Whether `Blocks32` takes ``codec``: 4-bit blockwise, groups of 64k."""
    return (
        isinstance(codec, BlockwiseCodec)
        and codec.bits == 4
        and codec.group_size % (2 * BLOCK) == 0
    )


def _in_blocks(codec: Any) -> Any:
    """``codec`` held in `block_columns` (itself, or `Blocks32`), else ``None``."""
    if not codec_ops.has_kernel(codec):
        return None
    if codec.group_size % BLOCK == 0 and codec_ops.columns(codec) == block_columns(
        codec.group_size
    ):
        return codec
    return Blocks32(codec) if fits_blocks32(codec) else None


def row_size(mu_codec: Any, nu_codec: Any) -> int:
    """Elements of a joint row: the least common multiple of the two groups."""
    return math.lcm(mu_codec.group_size, nu_codec.group_size)


def kernel_codecs(mu_codec: Any, nu_codec: Any) -> tuple[Any, Any] | None:
    """The codecs a fused kernel steps moments of ``mu_codec`` and ``nu_codec`` as.

    The pair itself where the kernel takes it as it is (both with a kernel,
    the same group and parts); else, where both can be held in 32-blocks'
    evens and odds (π-Quant; a 4-bit blockwise codec as `Blocks32`) and
    their joint row (`row_size`) is at most `codec_ops.MAX_KERNEL_ROW`, the
    `Rows` of each; else ``None`` (no kernel: the jnp path).

    Args:
      mu_codec: the first moment's codec.
      nu_codec: the second moment's codec.

    Returns:
      ``(mu, nu)`` for `optax_lowbit.kernels.launch`, or ``None``.
    """
    if not (codec_ops.has_kernel(mu_codec) and codec_ops.has_kernel(nu_codec)):
        return None
    if mu_codec.group_size == nu_codec.group_size:
        same = codec_ops.columns(mu_codec) == codec_ops.columns(nu_codec)
        return (mu_codec, nu_codec) if same else None
    pair = [_in_blocks(c) for c in (mu_codec, nu_codec)]
    row = row_size(mu_codec, nu_codec)
    if None in pair or row > codec_ops.MAX_KERNEL_ROW:
        return None
    return tuple(Rows(c, row // c.group_size) for c in pair)


def leaf_fits(g: Any, mu_codec: Any, nu_codec: Any) -> bool:
    """Whether the leaf ``g`` takes the kernel of `kernel_codecs`.

    Every leaf where the pair's groups agree. For a joint row, any leaf
    that is not sharded under explicit mesh axes (a last axis that is not a
    multiple of the row pads the kernel's rows, and each group is read at
    its own row, `codec_ops.group_rows`); a sharded leaf takes the jnp path
    (the kernel per shard, `launch.one_leaf`, is not checked for joint
    rows).

    Args:
      g: the leaf (an array, traced or not; or anything with a ``shape``,
        taken as unsharded).
      mu_codec: the first moment's codec (as given, not `kernel_codecs`').
      nu_codec: the second moment's codec.

    Returns:
      ``True`` where the kernel takes the leaf.
    """
    if mu_codec.group_size == nu_codec.group_size:
        return True
    return not isinstance(g, jax.Array) or launch.explicit_spec(g) is None
