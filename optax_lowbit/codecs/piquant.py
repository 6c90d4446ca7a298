"""π-Quant: a pair of elements coded as one "irrational rotation" (100 codes).

Why over 500 lines: one codec family (codebook, exact nearest search by cell
candidates, the paper's encoder, base-100 packing, kernel entry points).

Tian, Zhao and Wen (2025) write a normalised pair ``z = (x, y)`` as the sum of
two unit vectors, ``z = e^{iα} + e^{iβ}``, and tie the two angles to one
rotation ``t``: ``α = t``, ``β = κ t`` with ``κ`` irrational, so that one
integer code reaches points all over the disk of radius 2. This module is our
JAX version of their 3.32-"bit" optimizer state codec, with storage at the
real information rate.

What the public reference really does
-------------------------------------
Read at commit ``76753e81822b635c4265e3acb9b5c8a278731eb7`` of
github.com/Ethan-TZ/Pi-Quant, file ``torch_optim_AdamW_3.32bit.py`` (a patched
copy of ``torch.optim.AdamW``; the 6.64- and 13.28-bit files differ only in
the digit mapping and in ``κ``). Line numbers refer to that file.

* **κ** (line 16): ``0.0100384626433832795028841971693993751058209749445923...``
  ``0.0100`` followed by digits of π taken from its 17th decimal (``38462643...``).
  As a float64 it equals DESIGN's ``0.0100384626433832795``; we keep it as the
  scalar `KAPPA`.
* **Groups and scale** (lines 51-65): the tensor is viewed as rows of 32
  consecutive elements; ``s = max |x|`` of the row (fp32, 0 replaced by
  ``1e-40``, line 58); pairs are ``(x[2i], x[2i+1]) / s`` (lines 55-56).
  Only tensors whose last axis is a multiple of 32 are quantized
  (lines 193, 199, 490); the others keep fp32 moments.
* **Code -> rotation** (lines 12, 18-34): a code ``c`` in 0..99 is two
  decimal digits, ``a = c // 10`` and ``b = c % 10``, and decodes with
  ``t = 2π (10 a + 8 + b / 10)`` to ``s (cos t + cos κt, sin t + sin κt)``.
  So ``α = t`` takes 10 values, ``2π b / 10``, and ``β = κ t`` about 10 values,
  ``2π κ (10 a + 8 + b/10)`` in ``[0.080, 0.994]`` turns. DESIGN's
  "θ = 2π (integer part + fractional digits / 100)" is the 6.64-bit file's
  mapping (code ``100 N + F``, ``t = 2π (N + F/100)``, int16); the 3.32-bit file
  keeps only the tens digit of each, ``N = 10 a + 8`` (a fixed offset of 8,
  line 12) and ``F = 10 b``.
* **Closed-form encoder** (``get_theta``, lines 36-49): with
  ``c = arccos((2 - |z|^2) / 2)`` (``π`` minus the angle between the unit
  vectors), ``α = atan2(y, x) - (π - c) / 2`` wrapped into ``[0, 2π)``,
  ``β = π + α - c``; then ``a = floor(floor(100 frac((β - κα)/2π)) / 10)``
  and ``b = floor(round(100 α / 2π) / 10)``; the code is ``10 a + b``.
  Both digits are therefore *floored*, not rounded (``α`` is floored to a
  tenth of a turn, up to 36 degrees off), ``β``'s digit is decoded at
  ``10 a + 8`` rather than the centre of its cell, and ``frac(...) * 100``
  stands in for ``frac(...) / κ`` (99.6). When ``round(100 α / 2π) = 100`` the
  digit ``b = 10`` carries into ``a``: codes ``10 (a + 1)`` and, for
  ``a = 9``, the code 100 (stored fine in the reference's int8, decoded there
  as ``t = 2π·108``). Our ``"paper"`` encoder reproduces the formula with
  its carry. The code 100 needs a pair of radius above 1.998, which
  max-normalised pairs (radius <= √2) never reach; base-100 storage has no
  code 100, so we store ``code mod 100`` = 0, whose codeword lies 0.024
  (normalised) from the reference's decoding of 100. Every code equals the
  reference's up to float32 ties at the floors (200,000 random pairs: all
  equal to a float64 transcription). Decoding ``β``'s digit at the centre of
  its cell (offset 5) would cut this encoder's Gaussian error from 0.92 to
  0.67; we keep the reference's 8.
* **Second moment** (lines 496, 569): encoded as ``|v|`` with the same
  encoder, decoded as ``|decode(·)|`` coordinate-wise. Both moments use the
  codec; at step 1 the reference starts from fp32 zeros (lines 491-493).
* **Storage**: one int8 per pair (lines 15, 191-201) plus an fp32 scale per 32
  elements: 4 + 1 = 5 bits per element, not the quoted 3.32 (``log2(100)/2``);
  the scales live as Python attributes of the state tensors (lines 63, 76), so
  ``state_dict`` does not save them.
* The reference builds its codewords in float32 (``t`` up to ``2π·108``, so
  ``cos t`` is off by up to ~1e-4); ours are the float64 values rounded once
  to float32 (``cos t`` is evaluated on the reduced angle ``2π b / 10``).

Measured with this module (arrays (1000, 640), numpy seed 0, bf16 scales):
relative L2 error ``|x̂ - x| / |x|``

=======================  ========  ===========
data                     paper     nearest
=======================  ========  ===========
Gaussian (signed)        0.915     0.265
Student-t(3) (signed)    1.483     0.318
Gaussian², unsigned      1.016     0.271
t(3)², unsigned          2.115     0.339
=======================  ========  ===========

(A float64 numpy transcription with the reference's fp32 scales gives the
same within 0.005.) For the second moment the smallest ratio
``v̂ / v`` over those arrays is 0.053 with ``"nearest"`` (0.010 with
``"paper"``): some small entries of ``v`` are under-estimated up to ~19x
(~100x), which scales those entries of ``m / √v`` up by ~4.4x (~10x). That is
the codebook, not a bug; measure it in training before relying on it alone.

The reference's encoder loses most of the signal (the floors above), so the
exact nearest codeword, ``encoder="nearest"``, is the default; ``"paper"``
exists to reproduce the reference. Only 36 of the 100 codewords lie in the
square ``[-1, 1]^2`` where max-normalised pairs live (50 within radius
``√2``), which is why even the nearest codeword is coarse; we keep the
reference's ``s = max |x|``.

Storage layout
--------------
The packing group is a **superblock of 96 elements** = 3 scale blocks of 32
elements (each with its own scale, ``scales_per_group = 3``) = 48 pairs.
Pair ``j`` of block ``k`` (elements ``32 k + 2 j`` and ``32 k + 2 j + 1``) has
code ``c[k, j]`` in 0..99. The three pairs with the same ``j`` form one 20-bit
word ``w[j] = c[0, j] + 100 c[1, j] + 10000 c[2, j]`` (< 10^6 < 2^20), so 16
words per superblock, 320 bits = 40 bytes, planar:

* ``codes[..., 0:16]``  = ``w[0:16] & 0xFF``         (low bytes)
* ``codes[..., 16:32]`` = ``(w[0:16] >> 8) & 0xFF``  (middle bytes)
* ``codes[..., 32:40]`` = ``(w[0:8] >> 16) | ((w[8:16] >> 16) << 4)``
  (high nibbles: word ``j`` in the low nibble of byte ``32 + j``, word
  ``j + 8`` in its high nibble)

Decoding is three contiguous slices, shifts and ors, then two integer
divisions by 100. Scales are ``(*lead, n_super * 3)``, block ``k`` of
superblock ``g`` at index ``3 g + k``. All-in: ``8 (40 + 3·2) / 96 = 3.833``
bits per element with bf16 scales (4.333 with fp32). The last axis is padded
to a multiple of 96, so a leaf whose last axis is 32 pays a full superblock
(11.5 bits per element).

Arbitrary bytes decode to finite, defined values: the low two digits are
``w % 100`` and ``(w // 100) % 100``, always < 100; the high digit
``w // 10000`` is clamped to 99 (words 10^6 .. 2^20 - 1 are never written by
the encoder). Codewords never have a zero coordinate (smallest ``|coordinate|``
is 0.00248, codeword 95), so an unsigned decode with a nonzero scale is
positive; it is also floored at the smallest normal float32 so that a tiny
scale cannot flush it to 0 (an Adam update divides by ``√v``). A pair
``(0, 0)`` inside a nonzero block decodes to the smallest codeword
(radius 0.060, code 39) times the scale, not to 0; an all-zero block stores
scale 0 and decodes to exactly 0.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_lowbit import _checks
from optax_lowbit.codecs import base

#: κ, the irrational ratio of the two rotations (reference line 16).
KAPPA = 0.0100384626433832795028841971693993751058209749445923078164
#: codes per pair (two decimal digits).
NUM_CODES = 100
#: offset added to the integer part of the rotation (reference line 12).
OFFSET = 8
#: The code that ``zero_code=True`` codecs decode to exactly (0, 0). Its
#: reference codeword has radius 1.9994 and is never the nearest codeword of
#: any point of the unit square that max-normalised pairs live in (checked by
#: brute force in the tests), so reusing it loses nothing.
ZERO_CODE = 89
#: elements per scale block (the reference's group).
BLOCK = 32
#: scale blocks per superblock (one base-100 word holds one pair of each).
BLOCKS_PER_SUPER = 3
#: elements per superblock, the codec's ``group_size``.
SUPER = BLOCK * BLOCKS_PER_SUPER
#: 20-bit words per superblock (pairs per block).
WORDS = BLOCK // 2
#: code bytes per superblock.
SUPER_BYTES = WORDS * 20 // 8

_ENCODERS = ("nearest", "paper")
_SCALE_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
_TINY = float(np.finfo(np.float32).tiny)


def rotation(code: Any) -> Any:
    """The rotation ``t / 2π`` (in turns) of integer codes 0..99.

    Args:
      code: integer array of codes.

    Returns:
      ``10 (code // 10) + 8 + (code % 10) / 10`` as float32.

    Examples:
      >>> [round(v, 4) for v in rotation(jnp.array([0, 37, 99])).tolist()]
      [8.0, 38.7, 98.9]
    """
    code = jnp.asarray(code, jnp.int32)
    a, b = code // 10, code % 10
    return (10 * a + OFFSET).astype(jnp.float32) + b.astype(jnp.float32) / 10.0


def codeword(
    code: Any, signed: bool = True, zero_code: bool = False, scale: float = 1.0
) -> tuple[Any, Any]:
    """Normalised codeword ``(cos t + cos κt, sin t + sin κt)`` of codes.

    Uses only scalar constants, so a kernel may evaluate it in place of a
    codebook lookup. ``cos t`` and ``sin t`` are taken on the reduced angle
    ``2π (code % 10) / 10`` (exact in turns), ``κt`` is below one turn.

    Args:
      code: integer array of codes in 0..99.
      signed: if False, returns absolute values (the second moment's
        codebook).
      zero_code: if True, code `ZERO_CODE` decodes to exactly ``(0, 0)``.
      scale: factor applied to every codeword.

    Returns:
      ``(x, y)`` float32 arrays of ``code``'s shape.

    Examples:
      >>> x, y = codeword(jnp.array([0]))
      >>> print(f"{float(x[0]):.6f} {float(y[0]):.6f}")
      1.875374 0.483447
    """
    code = jnp.asarray(code, jnp.int32)
    alpha = (2.0 * math.pi / 10.0) * (code % 10).astype(jnp.float32)
    beta = (2.0 * math.pi * KAPPA) * rotation(code)
    x = jnp.cos(alpha) + jnp.cos(beta)
    y = jnp.sin(alpha) + jnp.sin(beta)
    if not signed:
        x, y = jnp.abs(x), jnp.abs(y)
    if zero_code:
        x = jnp.where(code == ZERO_CODE, 0.0, x)
        y = jnp.where(code == ZERO_CODE, 0.0, y)
    return x * scale, y * scale


def codebook(
    signed: bool = True, zero_code: bool = False, scale: float = 1.0
) -> jax.Array:
    """The 100 normalised codewords as a ``(100, 2)`` float32 array.

    Computed in float64 and rounded once. For ``signed=False`` the codewords
    are folded into the first quadrant (``|·|``), as the reference decodes the
    second moment.

    Args:
      signed: whether the codebook is for signed (first moment) states.
      zero_code: if True, code `ZERO_CODE` decodes to exactly ``(0, 0)``.
      scale: factor applied to every codeword (see `piquant`'s
        ``codebook_scale``).

    Returns:
      ``(100, 2)`` float32 array; row ``c`` is the codeword of code ``c``.

    Examples:
      >>> codebook().shape
      (100, 2)
      >>> print(np.round(np.asarray(codebook()[:2]), 4))
      [[1.8754 0.4834]
       [1.6813 1.0767]]
    """
    return jnp.asarray(_codebook_np(signed, zero_code, scale))


def _codebook_np(signed: bool, zero_code: bool, scale: float) -> np.ndarray:
    c = np.arange(NUM_CODES)
    turns = 10 * (c // 10) + OFFSET + (c % 10) / 10.0
    alpha = 2.0 * np.pi * (c % 10) / 10.0
    beta = 2.0 * np.pi * KAPPA * turns
    book = np.stack([np.cos(alpha) + np.cos(beta), np.sin(alpha) + np.sin(beta)], -1)
    if not signed:
        book = np.abs(book)
    if zero_code:
        book[ZERO_CODE] = 0.0
    return (book * scale).astype(np.float32)


def pack_block_words(codes: list[jax.Array]) -> list[jax.Array]:
    """Packs the pair codes of a superblock's three blocks into its byte planes.

    Args:
      codes: three integer arrays ``(..., 16)`` (0..99): pair ``j`` of block
        ``k`` is ``codes[k][..., j]``.

    Returns:
      ``[low, mid, nib]``: uint8 ``(..., 16)``, ``(..., 16)`` and ``(..., 8)``,
      the planes whose concatenation is the 40-byte superblock (module
      docstring). Each is a power-of-two row, so a kernel stores them as is.
    """
    c0, c1, c2 = (c.astype(jnp.uint32) for c in codes)
    w = c0 + 100 * c1 + 10000 * c2
    low = (w & 0xFF).astype(jnp.uint8)
    mid = ((w >> 8) & 0xFF).astype(jnp.uint8)
    first, second = base.split_last(w >> 16, 2)
    return [low, mid, (first | (second << 4)).astype(jnp.uint8)]


def unpack_block_words(planes: list[jax.Array]) -> list[jax.Array]:
    """Inverse of `pack_block_words`: three int32 ``(..., 16)`` code arrays.

    Any bytes give codes in 0..99: the top digit of a word >= 10^6 is
    clamped to 99.
    """
    low, mid, nib = (p.astype(jnp.uint32) for p in planes)
    w = low | (mid << 8) | (base.concat_last([nib & 0xF, nib >> 4]) << 16)
    digits = [w % 100, (w // 100) % 100, jnp.minimum(w // 10000, NUM_CODES - 1)]
    return [d.astype(jnp.int32) for d in digits]


def _split_planes(packed: jax.Array) -> list[jax.Array]:
    return [
        packed[..., :WORDS],
        packed[..., WORDS : 2 * WORDS],
        packed[..., 2 * WORDS :],
    ]


def pack_words(codes: jax.Array) -> jax.Array:
    """Packs pair codes ``(..., 48)`` (0..99) into ``(..., 40)`` uint8.

    Pair ``j`` of block ``k`` is ``codes[..., 16 k + j]``; see the module
    docstring for the byte layout.
    """
    blocks = [codes[..., k * WORDS : (k + 1) * WORDS] for k in range(BLOCKS_PER_SUPER)]
    return jnp.concatenate(pack_block_words(blocks), axis=-1)


def unpack_words(packed: jax.Array) -> jax.Array:
    """Inverse of `pack_words`: ``(..., 40)`` uint8 -> ``(..., 48)`` int32."""
    return jnp.concatenate(unpack_block_words(_split_planes(packed)), axis=-1)


def _round_half_even(x: jax.Array) -> jax.Array:
    """``jnp.round`` (half to even) from floor (Pallas Triton has no round)."""
    r = jnp.floor(x + 0.5)
    tie_to_odd = (r - x == 0.5) & (jnp.floor(r / 2.0) * 2.0 != r)
    return jnp.where(tie_to_odd, r - 1.0, r)


def _paper_codes(px: jax.Array, py: jax.Array) -> jax.Array:
    """The reference's closed-form encoder on normalised pairs (see above)."""
    two_pi = 2.0 * math.pi
    r2 = px * px + py * py
    c = jnp.arccos(jnp.clip((2.0 - r2) / 2.0, -1.0, 1.0))
    alpha = jnp.arctan2(py, px) - (math.pi - c) / 2.0
    alpha = jnp.where(alpha < 0, alpha + two_pi, alpha)
    beta = math.pi + alpha - c
    w = (beta - alpha * KAPPA) / two_pi
    hundredths = jnp.floor((w - jnp.floor(w)) * 100.0)
    b100 = _round_half_even(alpha / two_pi * 100.0)
    code = jnp.floor(hundredths / 10.0) * 10.0 + jnp.floor(b100 / 10.0)
    return code.astype(jnp.int32) % NUM_CODES


#: cells per axis of the nearest-codeword search grid (`candidate_table`).
GRID = 32


@functools.lru_cache(maxsize=32)
def _candidates(book_bytes: bytes, signed: bool) -> np.ndarray:
    book = np.frombuffer(book_bytes, np.float32).reshape(NUM_CODES, 2)
    book = book.astype(np.float64)
    lo = -1.0 if signed else 0.0
    edges = lo + (1.0 - lo) * np.arange(GRID + 1) / GRID
    cx, cy = np.meshgrid(edges, edges, indexing="ij")
    corners = np.stack([cx.ravel(), cy.ravel()], -1)  # (G+1)^2 grid corners
    q2 = (book**2).sum(-1)
    # f_kj(p) = |p - q_k|^2 - |p - q_j|^2 at every corner, (corners, k, j)
    f = -2.0 * np.einsum("cd,kjd->ckj", corners, book[:, None] - book[None])
    f += (q2[:, None] - q2[None])[None]
    f = f.reshape(GRID + 1, GRID + 1, NUM_CODES, NUM_CODES)
    # f is linear in p: its minimum over a cell is at one of the cell's corners
    cell_min = np.minimum(
        np.minimum(f[:-1, :-1], f[1:, :-1]), np.minimum(f[:-1, 1:], f[1:, 1:])
    )
    # code k may be nearest in a cell only if every half-plane "closer to k
    # than to j" meets the cell (a superset of the true set; the margin covers
    # float32 rounding of the scores)
    possible = (cell_min <= 1e-5).all(-1).reshape(GRID * GRID, NUM_CODES)
    lists = [np.nonzero(row)[0] for row in possible]
    width = max(len(x) for x in lists)
    # ascending codes, padded by repeating the last: a strict "<" running
    # minimum then returns the first index among ties, as argmin does
    table = np.stack([np.pad(x, (0, width - len(x)), mode="edge") for x in lists])
    return table.astype(np.float32)


def candidate_table(book: Any, signed: bool) -> np.ndarray:
    """For each cell of a `GRID` x `GRID` grid, the codes that can be nearest.

    The grid covers the square normalised pairs live in (``[-1, 1]^2``, or
    ``[0, 1]^2`` for unsigned states). A code is listed for a cell unless some
    other codeword is closer at every point of the cell (tested exactly: each
    "closer to k than to j" region is a half-plane, whose meeting with the
    cell is decided at the cell's corners). So the nearest codeword of any
    pair is in its cell's list, and the search costs ``width`` distance
    evaluations (7 or 8 for the shipped codebooks; 1.9 codes per cell on
    average) instead of 100.

    Args:
      book: the ``(100, 2)`` codebook (concrete).
      signed: which square the grid covers.

    Returns:
      float32 ``(GRID * GRID, width)`` codes (exact small integers, a
      float table so that a kernel reads it like the codebook), ascending
      within a row, padded by repeating the last code.
    """
    try:
        book = np.ascontiguousarray(np.asarray(book, np.float32))
    except jax.errors.TracerArrayConversionError:
        raise ValueError(
            "book must be a concrete (100, 2) array to build its candidate table, "
            "got a traced value; pass candidates= (PiQuantCodec.candidates())."
        ) from None
    return _candidates(book.tobytes(), bool(signed))


def _cell(px: jax.Array, py: jax.Array, signed: bool) -> jax.Array:
    """The `candidate_table` row of each normalised pair."""
    lo = -1.0 if signed else 0.0
    scale = GRID / (1.0 - lo)

    def index(v):
        i = jnp.floor((v - lo) * scale)
        return jnp.clip(jnp.where(i == i, i, 0.0), 0, GRID - 1).astype(jnp.int32)

    return index(px) * GRID + index(py)


def _score(px: Any, py: Any, qx: Any, qy: Any) -> Any:
    """``|q|^2 - 2 p.q``: the order of the squared distances ``|p - q|^2``."""
    return (qx * qx + qy * qy) - 2.0 * (px * qx + py * qy)


def _nearest_codes(
    px: jax.Array, py: jax.Array, tables: Any, width: int, signed: bool
) -> jax.Array:
    """Index of the nearest codeword (the first one on ties).

    The least `_score` over the candidates of the pair's grid cell
    (`candidate_table`), which always include every nearest codeword: the
    result is the exact argmin over all 100. ``tables`` are the codewords'
    x, y and the flattened candidate table of row width ``width``: arrays,
    or a kernel's table refs (then read by gathered loads).

    A kernel keeps a running minimum over a loop of ``width`` trips, its
    carries in registers. On arrays the candidates are one more axis and the
    first least score is taken by `jnp.argmin`: as a ``fori_loop`` each trip
    was a loop iteration of its own, which on a GPU read and wrote every
    pair's running minimum and code from memory (π-Quant's fused step on a
    256M leaf 16.6 -> 12.4 ms on an H100, the NaN guard below included; a
    Python-unrolled loop took 10.8 ms but doubled GPT-2 small's compile;
    ``NOTES_kernels.md``, v39). The same scores, and the first
    least one either way: the same codes for pairs of finite or NaN
    coordinates (code 0), which is all a normalised pair can be.
    """
    bx, by, cand = tables
    row = _cell(px, py, signed) * width
    if base.is_ref(cand):

        def trip(t, carry):
            best, code = carry
            k = base.take(cand, row + t).astype(jnp.int32)
            score = _score(px, py, base.take(bx, k), base.take(by, k))
            better = score < best
            return jnp.where(better, score, best), jnp.where(better, k, code)

        zero = px * 0.0  # shaped like the pairs
        init = (zero + jnp.inf, zero.astype(jnp.int32))
        return jax.lax.fori_loop(0, width, trip, init)[1]
    k = base.take(cand, row[..., None] + jnp.arange(width, dtype=jnp.int32))
    k = k.astype(jnp.int32)
    score = _score(px[..., None], py[..., None], base.take(bx, k), base.take(by, k))
    first = jnp.argmin(score, axis=-1)[..., None]
    code = jnp.take_along_axis(k, first, axis=-1)[..., 0]
    # A NaN coordinate makes every score NaN, where the running minimum keeps
    # code 0 (read from the pair, not the scores: a second reader of the
    # scores made XLA store them, 18.8 instead of 12.3 ms on the leaf).
    return jnp.where(jnp.isnan(px) | jnp.isnan(py), 0, code)


def encode_pairs(
    pairs: list[tuple[jax.Array, jax.Array]],
    tables: tuple[Any, Any, Any],
    *,
    width: int,
    encoder: str = "nearest",
    signed: bool = True,
    scale_dtype: Any = jnp.bfloat16,
) -> tuple[list[jax.Array], list[jax.Array]]:
    """Encodes a superblock given as its blocks' pairs: the codec's math.

    Args:
      pairs: three ``(even, odd)`` tuples, the elements ``32 k + 2 j`` and
        ``32 k + 2 j + 1`` of block ``k`` as float arrays ``(..., 16)``.
      tables: the codewords' x and y, each ``(100,)``, and the flattened
        `candidate_table` (arrays, or a kernel's table refs).
      width: the candidate table's row width.
      encoder: ``"nearest"`` or ``"paper"``.
      signed: if False the input is coded as ``|x|``.
      scale_dtype: dtype of the stored scales.

    Returns:
      ``(planes, scales)``: the `pack_block_words` planes and three
      ``(..., 1)`` scales (one per block) in ``scale_dtype``.
    """
    codes, scales = [], []
    for px, py in pairs:
        px, py = px.astype(jnp.float32), py.astype(jnp.float32)
        if not signed:
            px, py = jnp.abs(px), jnp.abs(py)
        absmax = jnp.maximum(
            jnp.max(jnp.abs(px), axis=-1, keepdims=True),
            jnp.max(jnp.abs(py), axis=-1, keepdims=True),
        )
        stored, divisor = base.safe_scale(absmax, scale_dtype)
        px, py = px / divisor, py / divisor
        if encoder == "paper":
            codes.append(_paper_codes(px, py))
        else:
            codes.append(_nearest_codes(px, py, tables, width, signed))
        scales.append(stored)
    return pack_block_words(codes), scales


def decode_pairs(
    planes: list[jax.Array],
    scales: list[jax.Array],
    book: tuple[Any, Any],
    *,
    signed: bool = True,
) -> list[tuple[jax.Array, jax.Array]]:
    """Inverse of `encode_pairs`: three ``(even, odd)`` float32 tuples.

    Args:
      planes: the `pack_block_words` planes of a superblock.
      scales: three ``(..., 1)`` scales.
      book: the codewords' ``(x, y)`` coordinates (arrays or table refs).
      signed: if False, a nonzero scale never decodes to 0 (floored at the
        smallest normal float32).
    """
    out = []
    for idx, s in zip(unpack_block_words(planes), scales, strict=True):
        s = s.astype(jnp.float32)
        x = base.take(book[0], idx) * s
        y = base.take(book[1], idx) * s
        if not signed:
            floor = jnp.where(s > 0, _TINY, 0.0)
            x, y = jnp.maximum(x, floor), jnp.maximum(y, floor)
        out.append((x, y))
    return out


def _to_pairs(xg: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
    """``(..., 96)`` -> three ``(even, odd)`` tuples of ``(..., 16)``."""
    lead = xg.shape[:-1]
    blocks = xg.reshape((*lead, BLOCKS_PER_SUPER, WORDS, 2))
    return [
        (blocks[..., k, :, 0], blocks[..., k, :, 1]) for k in range(BLOCKS_PER_SUPER)
    ]


def _book(book: jax.Array) -> tuple[jax.Array, jax.Array]:
    return book[:, 0], book[:, 1]


def _search_tables(
    book: jax.Array, signed: bool, cand: np.ndarray | None = None
) -> tuple[tuple[Any, ...], int]:
    if cand is None:
        cand = candidate_table(book, signed)
    return (*_book(book), jnp.asarray(cand.reshape(-1))), cand.shape[1]


def encode_groups_with(
    xg: jax.Array,
    book: jax.Array,
    *,
    encoder: str = "nearest",
    signed: bool = True,
    scale_dtype: Any = jnp.bfloat16,
    candidates: np.ndarray | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Encodes superblocks ``(..., 96)`` given the ``(100, 2)`` codebook.

    Args:
      xg: float array ``(..., 96)``.
      book: `codebook` of the same ``signed``.
      encoder: ``"nearest"`` or ``"paper"``.
      signed: if False the input is coded as ``|x|``.
      scale_dtype: dtype of the stored scales.
      candidates: ``book``'s `candidate_table`; ``None`` builds it (then
        ``book`` must be concrete).

    Returns:
      ``(codes, scales)``: ``(..., 40)`` uint8 and ``(..., 3)`` in
      ``scale_dtype``.
    """
    tables, width = _search_tables(book, signed, candidates)
    planes, scales = encode_pairs(
        _to_pairs(jnp.asarray(xg, jnp.float32)),
        tables,
        width=width,
        encoder=encoder,
        signed=signed,
        scale_dtype=scale_dtype,
    )
    return jnp.concatenate(planes, axis=-1), jnp.concatenate(scales, axis=-1)


def decode_groups_with(
    codes: jax.Array, scales: jax.Array, book: jax.Array, *, signed: bool = True
) -> jax.Array:
    """Decodes superblocks given the ``(100, 2)`` codebook.

    Args:
      codes: uint8 ``(..., 40)``.
      scales: ``(..., 3)`` float (bf16 or fp32).
      book: `codebook` of the same ``signed``.
      signed: if False, a nonzero scale never decodes to 0 (floored at the
        smallest normal float32).

    Returns:
      float32 ``(..., 96)``.
    """
    per_block = [scales[..., k : k + 1] for k in range(BLOCKS_PER_SUPER)]
    pairs = decode_pairs(_split_planes(codes), per_block, _book(book), signed=signed)
    lead = codes.shape[:-1]
    out = jnp.stack([jnp.stack([x, y], axis=-1) for x, y in pairs], axis=-3)
    return out.reshape((*lead, SUPER))


@dataclasses.dataclass(frozen=True)
class PiQuantCodec(base.Codec):
    """π-Quant codes: 100 codes per pair, base-100 packed, 3.833 bits all-in.

    Attributes:
      encoder: ``"nearest"`` (exact nearest codeword, default) or ``"paper"``
        (the reference's closed-form encoder).
      signed: True for signed states (first moment); False codes ``|x|`` and
        decodes through ``|·|`` (second moment).
      scale_dtype_name: ``"bfloat16"`` or ``"float32"``.
      zero_code: whether code `ZERO_CODE` decodes to exactly ``(0, 0)``
        (signed states with the nearest encoder; see `piquant`).
      codebook_scale: factor on the reference codewords (0.5 by default with
        the nearest encoder, 1.0 with the paper encoder; see `piquant`).

    The format does not depend on ``encoder``: both encoders write the same
    layout and share a `name`, so a state may change encoder freely.
    """

    encoder: str = "nearest"
    signed: bool = True
    scale_dtype_name: str = "bfloat16"
    zero_code: bool = False
    codebook_scale: float = 1.0
    group_size: int = dataclasses.field(default=SUPER, init=False)
    scales_per_group: int = dataclasses.field(default=BLOCKS_PER_SUPER, init=False)

    @property
    def name(self) -> str:
        """``piquant-signed[-z]`` / ``piquant-unsigned``, ``-fp32`` for fp32 scales.

        ``-z`` marks the zero codeword (a different format: code 89 decodes to 0).
        """
        kind = "signed" if self.signed else "unsigned"
        zero = "-z" if self.zero_code else ""
        span = f"-cs{self.codebook_scale:g}" if self.codebook_scale != 1.0 else ""
        suffix = "-fp32" if self.scale_dtype_name == "float32" else ""
        return f"piquant-{kind}{zero}{span}{suffix}"

    @property
    def bytes_per_group(self) -> int:
        """40 code bytes per 96-element superblock."""
        return SUPER_BYTES

    @property
    def scale_dtype(self) -> Any:
        """The dtype of the stored scales."""
        return _SCALE_DTYPES[self.scale_dtype_name]

    def codebook(self) -> jax.Array:
        """The ``(100, 2)`` float32 codebook this codec decodes with."""
        return codebook(self.signed, self.zero_code, self.codebook_scale)

    def encode_groups(self, xg: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Encodes ``(..., 96)`` superblocks; see `encode_groups_with`."""
        return encode_groups_with(
            xg,
            self.codebook(),
            encoder=self.encoder,
            signed=self.signed,
            scale_dtype=self.scale_dtype,
            candidates=self.candidates(),
        )

    def candidates(self) -> np.ndarray:
        """The `candidate_table` of this codec's codebook (built once, cached)."""
        book = _codebook_np(self.signed, self.zero_code, self.codebook_scale)
        return candidate_table(book, self.signed)

    def decode_groups(self, codes: jax.Array, scales: jax.Array) -> jax.Array:
        """Decodes ``(..., 40)`` codes and ``(..., 3)`` scales to ``(..., 96)``."""
        return decode_groups_with(codes, scales, self.codebook(), signed=self.signed)

    def code_planes(self) -> list[int]:
        """Bytes of each plane of a superblock (`pack_block_words`): 16, 16, 8."""
        return [WORDS, WORDS, WORDS // 2]

    def kernel_columns(self) -> list[np.ndarray]:
        """The kernel's parts of a superblock: columns of each block's evens and odds.

        A kernel holds a superblock as six ``(rows, 16)`` parts (96 is not a
        power of two; 16 is): part ``2 k + e`` is elements ``32 k + 2 j + e``.
        """
        return [
            np.arange(WORDS) * 2 + BLOCK * k + e
            for k in range(BLOCKS_PER_SUPER)
            for e in (0, 1)
        ]

    def kernel_tables(self) -> tuple[np.ndarray, ...]:
        """The kernel's inputs: the codewords' x and y, the candidate table."""
        book = _codebook_np(self.signed, self.zero_code, self.codebook_scale)
        return book[:, 0], book[:, 1], self.candidates().reshape(-1)

    def kernel_decode(
        self, planes: list[Any], scales: list[Any], tables: Any
    ) -> list[jax.Array]:
        """`decode_pairs` to the six parts of `kernel_columns`."""
        pairs = decode_pairs(planes, scales, tables[:2], signed=self.signed)
        return [part for pair in pairs for part in pair]

    def kernel_encode(
        self, parts: list[jax.Array], tables: Any, noise: jax.Array | None
    ) -> tuple[list[jax.Array], list[jax.Array]]:
        """`encode_pairs` of the six parts (deterministic: no noise)."""
        del noise
        pairs = list(zip(parts[0::2], parts[1::2], strict=True))
        return encode_pairs(
            pairs,
            tables,
            width=self.candidates().shape[1],
            encoder=self.encoder,
            signed=self.signed,
            scale_dtype=self.scale_dtype,
        )


def piquant(
    encoder: str = "nearest",
    signed: bool = True,
    *,
    zero_code: bool | None = None,
    codebook_scale: float | None = None,
    scale_dtype: Any = jnp.bfloat16,
) -> PiQuantCodec:
    r"""π-Quant codec: pairs coded as one irrational rotation, 100 codes each.

    A pair ``(x[2i], x[2i+1])`` of a 32-element block with scale
    ``s = max |x|`` decodes to ``s (cos t + cos κt, sin t + sin κt)`` with
    ``t = 2π (10 (c // 10) + 8 + (c % 10) / 10)`` for its code ``c`` in 0..99
    and ``κ = 0.01003846...`` (`KAPPA`). Codes are stored at their information
    rate, 3 pairs per 20 bits, with a bf16 scale per 32 elements: 3.833 bits
    per element all-in (the paper quotes 3.32 without scales; the reference
    stores 5). Layout and the comparison with the reference: module docstring.

    Where we differ from the reference, and why: ``encoder="nearest"`` (the
    default) picks the exact nearest codeword of the reference codebook halved
    (``codebook_scale=0.5``) with an exact zero codeword: relative L2 error
    0.17 on Gaussian data against 0.92 for the reference's closed-form encoder
    (``encoder="paper"``, reproduced bit for bit), 0.19 against 1.48 on
    Student-t(3) data, and it trains where the unhalved nearest encoder does
    not (see ``codebook_scale``). Scales are bf16 rounded up (fp32 in the
    reference), and an all-zero block decodes to exactly 0.

    Args:
      encoder: ``"nearest"`` or ``"paper"``.
      signed: True for signed states (Adam's first moment). False for
        non-negative ones (the second moment): ``|x|`` is coded, decoding goes
        through ``|·|`` as in the reference, and a nonzero scale never
        decodes to 0.
      zero_code: whether code `ZERO_CODE` (89) decodes to exactly ``(0, 0)``.
        ``None`` (default) means True for signed states with the nearest
        encoder, False otherwise. The reference codebook has no zero: its
        codeword nearest the origin is (0.037, 0.047), so every small pair of
        a first moment decodes to the same positive bias, and AdamW drifts
        and diverges (measured: the demo's MLP reached loss 1e12). Code 89 is
        never the nearest codeword of any normalised pair, so the zero costs
        nothing. Not allowed with the paper encoder (which may emit 89) nor
        for unsigned states (a second moment must never decode to 0).
      codebook_scale: factor on the reference codewords, in (0, 1]. ``None``
        (default) means 0.5 with the nearest encoder and 1.0 (the reference)
        with the paper encoder, which requires 1.0. The reference codewords
        fill the disk of radius 2, but max-normalised pairs live in the unit
        square, where only 36 of the 100 codewords lie; halving the codebook
        puts all 100 in the unit disk. Measured: Gaussian relative error
        0.266 -> 0.169, t(3) 0.318 -> 0.192; on the Adam MLP test problem
        the first moment alone went from not training (loss 0.42 against
        fp32's 0.037: a pair (1, 0) decodes to (1.06, 0.29), a phantom
        momentum on the partner element every step) to 0.046.
      scale_dtype: ``jnp.bfloat16`` (3.833 bits per element) or
        ``jnp.float32`` (4.333).

    Returns:
      A `PiQuantCodec`, hashable (usable as a static argument).

    Raises:
      ValueError: ``encoder`` or ``scale_dtype`` not accepted.
      TypeError: ``signed`` is not a bool.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import optax_lowbit as lowbit
      >>> codec = lowbit.codecs.piquant()
      >>> round(codec.bits_per_element, 4)
      3.8333
      >>> x = jax.random.normal(jax.random.key(0), (4, 192))
      >>> packed = codec.encode(x)
      >>> packed.codes.shape, packed.scales.shape
      ((4, 2, 40), (4, 6))
      >>> err = jnp.linalg.norm(codec.decode(packed) - x) / jnp.linalg.norm(x)
      >>> bool(err < 0.3)
      True
      >>> codec.decode(codec.encode(jnp.zeros(5))).tolist()
      [0.0, 0.0, 0.0, 0.0, 0.0]

    References:
      Tian et al, `Irrational Complex Rotations Empower Low-bit Optimizers
      <https://arxiv.org/abs/2501.12896>`_, 2025 (code:
      https://github.com/Ethan-TZ/Pi-Quant)
    """
    _checks.one_of("encoder", encoder, _ENCODERS)
    _checks.is_bool("signed", signed)
    try:
        dtype_name = jnp.dtype(scale_dtype).name
    except TypeError:
        dtype_name = repr(scale_dtype)
    _checks.one_of("scale_dtype", dtype_name, tuple(_SCALE_DTYPES))
    if zero_code is None:
        zero_code = bool(signed) and encoder == "nearest"
    _checks.is_bool("zero_code", zero_code)
    if zero_code and not (signed and encoder == "nearest"):
        raise ValueError(
            f"zero_code=True needs signed=True and encoder='nearest', got "
            f"signed={signed!r}, encoder={encoder!r}: the paper encoder may emit "
            "code 89, and an unsigned (second-moment) state must never decode to 0."
        )
    if codebook_scale is None:
        codebook_scale = 0.5 if encoder == "nearest" else 1.0
    if (
        isinstance(codebook_scale, bool)
        or not isinstance(codebook_scale, (int, float))
        or not 0.0 < codebook_scale <= 1.0
    ):
        raise ValueError(
            f"codebook_scale must be a number in (0, 1], got {codebook_scale!r}."
        )
    if encoder == "paper" and codebook_scale != 1.0:
        raise ValueError(
            f"codebook_scale must be 1.0 with encoder='paper' (the reference's "
            f"closed-form encoder assumes its own codewords), got {codebook_scale!r}."
        )
    return PiQuantCodec(
        encoder=encoder,
        signed=bool(signed),
        scale_dtype_name=dtype_name,
        zero_code=bool(zero_code),
        codebook_scale=float(codebook_scale),
    )
