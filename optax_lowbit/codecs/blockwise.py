"""Baseline codecs: blockwise 8-bit dynamic map and 4-bit maps, as published.

Why over 500 lines: one codec family (the maps, nearest and stochastic rounding,
the kernel entry points) and the docstring table of the measured candidates.

These are the formats of the two low-bit optimizers that every comparison in
this package is made against, rebuilt in the same framework so that they run
side by side with ours:

* `blockwise8`: bitsandbytes' 8-bit optimizers (Dettmers et al. 2022). Each
  block of 256 elements is divided by its absolute maximum (an fp32 scale) and
  every element is coded by the nearest of 256 values of the *dynamic tree*
  map: signed for the first moment, unsigned for the second. 8 + 32/256 =
  8.125 bits per element, all in.
* `blockwise4`: the 4-bit optimizer of Li et al. 2023. Blocks of 128 with an
  fp32 absmax scale; the signed first moment uses the 16-value
  dynamic-exponent (DE) map, the unsigned second moment the zero-free linear
  map ``(k + 1) / 16``. 4 + 32/128 = 4.25 bits per element, all in.

The dynamic map (`dynamic_map`). A code is read as ``[sign][z zeros][1][f
fraction bits]``: the number ``z`` of leading zeros after the sign is a
decimal exponent (the value lies in ``10**-z * [0.1, 1]``) and the bits after
the indicator ``1`` split that decade linearly into ``2**f`` equal bins whose
centres are the code values. Each extra leading zero trades one fraction bit
for ten times more range. A ``b``-bit map has ``b - 1`` decades; the unsigned
map spends the sign bit as one more fraction bit in every decade. The all-zero
code is 0 and the one pattern left over is 1.0, so the largest magnitude of a
block is coded exactly (the negative side stops at the largest bin centre,
``-0.99296875`` for 8 bits, ``-0.8875`` for 4 bits, as in both references).
This is the construction of bitsandbytes' ``create_dynamic_map`` (8 bits, 7
exponent bits) and of low-bit-optimizers' ``create_dynamic_map(signed, 3, 4)``
(their "nonlinear" 4-bit first-moment map); the code here is our own.

Encoding is exact round-to-nearest over the sorted map: the float32 product
``x * (1 / scale)`` (one reciprocal a block, as the backend divides: a GPU's
division may differ from IEEE by an ulp; then one product an element, the
same on every backend) goes to the index of the nearest map entry, ties to
the lower entry. The decision bounds
are the exact midpoints between neighbouring entries, computed in float32
without rounding error (`decision_bounds`), and an element's index is the
number of bounds at or below it (``searchsorted``). bitsandbytes and
low-bit-optimizers also round to nearest (their deterministic modes), with a
binary search over the map on the GPU.

Layout. ``codes`` is ``(*lead, n_blocks, bytes_per_block)`` ``uint8``:
8-bit codes are the map indices, one per byte, in element order; 4-bit codes
are packed two per byte by `base.pack_codes`, planar: element ``j`` of a block
of ``K`` sits in byte ``j % (K / 2)``, low nibble for ``j < K / 2`` and high
nibble otherwise. ``scales`` is ``(*lead, n_blocks)`` fp32, the block absmax.

Unsigned codecs (second moments) clip negative inputs to 0 before encoding:
a second moment is never negative, and clipping keeps a stray negative value
from changing the block scale. The zero-free 4-bit map never decodes to 0
inside a block whose scale is > 0 (it over-estimates small values, the safe
side for an update that divides by sqrt(v)); the 8-bit unsigned map contains
0, as in bitsandbytes.

Kernels. ``encode_groups`` and ``decode_groups`` are the pure ``jnp``
definition; they call `encode_groups_with` and `decode_groups_with`, which
take the map as an explicit array argument, because a Pallas kernel cannot
capture array constants: a kernel receives ``codec.qmap()`` as an input and
calls the same functions.

Long runs: stochastic rounding and the log map (issue 16). An optimizer
re-encodes its second moment every step, ``v ← Q(β2 v̂ + (1 − β2) g²)``, and
with ``β2 = 0.999`` each step moves ``v`` by about 0.1%. Round-to-nearest then
stalls (an element moves only when ``g²`` is hundreds of times its ``v``),
and only the fp32 block scale keeps following the data: elements far below
their block's maximum freeze. Stochastic rounding between the two map
entries around each value (``rounding="stochastic"``; the random bits are a
counter-based hash of the position and the optimizer's step, as for polar)
keeps every re-encoded EMA unbiased; its variance grows with the spacing of
the levels where the element lives (about ``0.5 · v · Δ`` for a level gap
``Δ``), so the map must be fine *relative to each value*: a geometric map,
levels a constant ratio apart (`log_map`), not the linear one. Measured with
`benchmarks/state_drift.py` (the second moment alone, 10k steps, 6144
elements, ``b2 = 0.999``; median ``v̂/v`` and the share below ``v/4``; streams
with per-element scales spread log-normally, σ 0.5, "hetero" σ 1)::

    v codec                  gaussian     student-t3    scale jump    hetero
    linear 4b, nearest       1.20  0%     -             -             12.3 (70%>4v)
    linear 4b, stochastic    1.00  0.02%  1.56 (14%>4v) 1.44 (11%>4v) 13.4 (72%>4v)
    log 4b 1.3x, stochastic  0.96  0.03%  1.05  0.05%   1.03  0.03%   4.3  (51%>4v)
    log 4b 1.4x, stoch. *    0.90  0.21%  0.92  0.23%   0.92  0.18%   1.87 (33%>4v)
    log 4b 1.5x, stochastic  0.84  0.57%  0.87  1.07%   0.90  0.55%   1.29 (18%>4v)
    log 4b 2.0x, stochastic  0.79  3.5%   0.76  5.8%    0.82  3.7%    0.82
    log 4b 1.5x, nearest     1.09  0.05%  0.72  7.1%    0.96  0.03%   1.27
    log 2b 1.7x, stochastic  0.98  0%     4.37 (53%>4v) -             -
    dynamic 8b, stochastic * 1.00  0%     0.99  0%      0.99  0%      0.97
    (polar 2-bit unsigned, stochastic, 3000 steps: 0.70, 7.9% below v/4;
     π-Quant: 0.019, 97% below v/4)

A finer ratio has less noise but less range (1.4^15 = 155x below the block
maximum; smaller values take the smallest level, over-estimated: the safe
side); 1.4 is the smallest ratio that passes every stream of the benchmark
but the "hetero" stress stream, whose values spread over more than the
range. Two bits per element are too few at any ratio: 4 levels span too
little. So `scale_by_adam_4bit`, `scale_by_adam_polar` and
`scale_by_adam_piquant` store ``v`` with the 1.4x log map, stochastic
(`optax_lowbit.transforms.adam.stable_nu_codec`), and `scale_by_adam_8bit`
with the dynamic map, stochastic. The codec factories keep the papers'
deterministic formats by default.

Non-finite inputs make a non-finite block scale; the codes of such a block
are unspecified. Any code bytes decode to finite values under a finite scale.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_lowbit import _checks
from optax_lowbit.codecs import base

_ACCEPTED_BITS = (4, 8)
#: Maps a codec can use (`BlockwiseCodec.qmap`).
MAPS = ("dynamic", "linear", "log")
#: Rounding rules (`encode_groups_with`).
ROUNDINGS = ("nearest", "stochastic")
#: Level ratio of the 4-bit log map (measured: see the module docstring).
LOG_RATIO = 1.4
#: Level ratio of the 8-bit log map.
LOG_RATIO_8 = 1.04


def dynamic_map(signed: bool = True, *, bits: int = 8) -> np.ndarray:
    """The dynamic (tree) quantization map: ``2**bits`` sorted float32 values.

    Args:
      signed: ``True`` for values in [-1, 1] (a first moment), ``False`` for
        values in [0, 1] (a second moment).
      bits: code width: 8 (bitsandbytes' map) or 4 (the dynamic-exponent map
        of the 4-bit optimizer, signed use).

    Returns:
      A read-only ``np.float32`` array of ``2**bits`` strictly increasing
      values, ending in 1.0 and containing 0.

    Examples:
      >>> from optax_lowbit.codecs import blockwise
      >>> blockwise.dynamic_map(True, bits=4).tolist()  # doctest: +ELLIPSIS
      [-0.887..., -0.662..., -0.437..., -0.212..., -0.077..., -0.032..., -0.005...,
       0.0, 0.005..., 0.032..., 0.077..., 0.212..., 0.437..., 0.662..., 0.887..., 1.0]
      >>> m = blockwise.dynamic_map(False)
      >>> m.shape, float(m[1]), float(m[-2])
      ((256,), 3.25e-07, 0.99648...)

    References:
      Dettmers et al, `8-bit Optimizers via Block-wise Quantization
      <https://arxiv.org/abs/2110.02861>`_, 2022 (the map's design: Dettmers,
      `8-Bit Approximations for Parallelism in Deep Learning
      <https://arxiv.org/abs/1511.04561>`_, 2016).
    """
    _checks.is_bool("signed", signed)
    _checks.one_of("bits", bits, _ACCEPTED_BITS)
    return _dynamic_map(bool(signed), int(bits))


@functools.cache
def _dynamic_map(signed: bool, bits: int) -> np.ndarray:
    decades = bits - 1
    values = [0.0, 1.0]
    for zeros in range(decades):
        # [sign][zeros x 0][1][fraction]: what is left after the indicator bit.
        fraction_bits = bits - 2 - zeros + (0 if signed else 1)
        n = 2**fraction_bits
        centres = 0.1 + 0.9 * (np.arange(n, dtype=np.float64) + 0.5) / n
        magnitudes = centres * 10.0**-zeros
        values.extend(magnitudes.tolist())
        if signed:
            values.extend((-magnitudes).tolist())
    out = np.sort(np.asarray(values, np.float64)).astype(np.float32)
    assert out.shape == (2**bits,) and np.all(np.diff(out) > 0)
    out.flags.writeable = False
    return out


def linear_map(*, bits: int = 4) -> np.ndarray:
    """The zero-free unsigned linear map ``(k + 1) / 2**bits``, k < ``2**bits``.

    The second-moment map of Li et al. 2023 (their "power-1" map, excluding
    zero): 0 is not a code, so a decoded second moment is never 0 in a block
    whose scale is > 0.

    Args:
      bits: code width, 4 or 8.

    Returns:
      A read-only ``np.float32`` array of ``2**bits`` increasing values in
      ``(0, 1]``.

    Examples:
      >>> from optax_lowbit.codecs import blockwise
      >>> blockwise.linear_map()[:3].tolist(), float(blockwise.linear_map()[-1])
      ([0.0625, 0.125, 0.1875], 1.0)

    References:
      Li et al, `Memory Efficient Optimizers with 4-bit States
      <https://arxiv.org/abs/2309.01507>`_, 2023.
    """
    _checks.one_of("bits", bits, _ACCEPTED_BITS)
    return _linear_map(int(bits))


@functools.cache
def _linear_map(bits: int) -> np.ndarray:
    n = 2**bits
    out = (np.arange(1, n + 1, dtype=np.float64) / n).astype(np.float32)
    out.flags.writeable = False
    return out


def log_map(*, bits: int = 4, ratio: float = LOG_RATIO) -> np.ndarray:
    """The zero-free unsigned geometric map ``ratio**-(2**bits - 1 - k)``.

    Levels a constant ratio apart, ending at 1: every element of a block is
    coded with the same *relative* resolution, wherever it sits below the
    block maximum (down to ``ratio**-(2**bits - 1)``; smaller values take the
    smallest level, an over-estimate, the safe side for ``1/sqrt(v)``). With
    stochastic rounding the re-encoded second moment then stays close to the
    true EMA over 10^5 steps, which the linear map does not do for elements
    far below their block's maximum (see the module docstring).

    Args:
      bits: code width, 4 or 8.
      ratio: ratio of neighbouring levels, > 1.

    Returns:
      A read-only ``np.float32`` array of ``2**bits`` increasing values in
      ``(0, 1]``.

    Examples:
      >>> from optax_lowbit.codecs import blockwise
      >>> [round(float(x), 4) for x in blockwise.log_map(ratio=2.0)[-3:]]
      [0.25, 0.5, 1.0]
    """
    _checks.one_of("bits", bits, _ACCEPTED_BITS)
    if not isinstance(ratio, (int, float)) or not 1.0 < float(ratio) < 1e6:
        raise ValueError(f"ratio must be a number in (1, 1e6), got {ratio!r}.")
    return _log_map(int(bits), float(ratio))


@functools.cache
def _log_map(bits: int, ratio: float) -> np.ndarray:
    n = 2**bits
    out = (ratio ** -np.arange(n - 1, -1, -1, dtype=np.float64)).astype(np.float32)
    out[-1] = 1.0
    out.flags.writeable = False
    return out


def decision_bounds(qmap: jax.Array) -> jax.Array:
    """Float32 thresholds that make ``searchsorted`` an exact nearest rounding.

    For a sorted float32 map ``q``, bound ``j`` is the smallest float32 that is
    strictly above the exact midpoint ``(q[j] + q[j + 1]) / 2``. So for every
    float32 ``x``, the number of bounds ``<= x`` is the index of the map entry
    nearest to ``x``, ties going to the lower entry. The midpoint is formed
    as ``q[j] / 2 + q[j + 1] / 2`` with its rounding error recovered exactly
    (Knuth's TwoSum), so no float64 is needed: this runs inside kernels.

    NumPy in, NumPy out (the same float32 operations, so the same bits): a
    codec's constant tables are built without dispatching JAX operations,
    which at a first step's trace would each compile on the device.

    Args:
      qmap: ``(n,)`` float32, strictly increasing, entries of magnitude
        >= 2**-125 or 0 (halving is then exact).

    Returns:
      ``(n - 1,)`` float32 bounds.
    """
    xp = base.array_module(qmap)
    q = xp.asarray(qmap, xp.float32)
    half = xp.float32(0.5)
    a, b = q[:-1] * half, q[1:] * half
    s = a + b
    b_virtual = s - a
    a_virtual = s - b_virtual
    err = (a - a_virtual) + (b - b_virtual)  # a + b == s + err exactly
    # err < 0: s is above the midpoint and is the first float32 above it.
    return xp.where(err < 0, s, xp.nextafter(s, xp.float32(xp.inf)))


def _bits_of(qmap: jax.Array) -> int:
    n = int(qmap.shape[-1])
    bits = n.bit_length() - 1
    if qmap.ndim != 1 or n != 2**bits or not 1 <= bits <= 8:
        raise ValueError(
            f"qmap must be a 1-d map of 2**bits entries, bits in 1..8, "
            f"got shape {tuple(qmap.shape)}."
        )
    return bits


def search_table(qmap: jax.Array) -> jax.Array:
    """The ``2**bits`` float32 entries the encoder's binary search reads.

    The sorted `decision_bounds`, then a sentinel (``inf``) never ``<= x``.
    A kernel gets it as an input (it cannot build it from a ref). NumPy in,
    NumPy out.
    """
    xp = base.array_module(qmap)
    bounds = xp.asarray(decision_bounds(qmap), xp.float32)
    return xp.concatenate([bounds, xp.full((1,), xp.inf, xp.float32)])


def _count_bounds_at_or_below(table: Any, x: jax.Array, bits: int) -> jax.Array:
    """``searchsorted(bounds, x, side="right")`` as a branchless binary search.

    ``table`` is `search_table` (an array, or a ref inside a kernel). ``bits``
    steps of a compare and a select, each reading one bound through
    `base.take`, so the result is sharded like ``x`` (``jnp.searchsorted``
    fails under explicit mesh axes in jax 0.10).
    """
    # The first step reads one bound for every element: a scalar compare (a
    # gather at a constant index would be constant-folded by XLA, element by
    # element: 48 s of compile for a 135M-parameter model). The second step's
    # bound is one of two: a select of two scalar reads, not a gather.
    top = 1 << (bits - 1)
    upper = table[top - 1] <= x
    index = jnp.where(upper, top, 0).astype(jnp.int32)  # like x
    for step in (1 << k for k in reversed(range(bits - 1))):
        candidate = index + step
        if step == top // 2:
            bound = jnp.where(upper, table[top + step - 1], table[step - 1])
        else:  # the search never reads past the table: no clip
            bound = base.take(table, candidate - 1, in_range=True)
        index = jnp.where(bound <= x, candidate, index)
    return index


class BucketLut(NamedTuple):
    """Buckets of the float32 line for the kernels' search (`bucket_entries`).

    The float32 line is cut into buckets by an element's magnitude bits
    (exponent and the top mantissa bits); ``table[key]`` holds the number
    of search-table entries at or below the bucket's lowest value. Each
    bucket holds at most one entry, so one compare against the table entry
    after that count gives the exact search result (`_index_by_buckets`)
    instead of a binary search. Built by `bucket_lut`.

    Attributes:
      table: uint8 counts: ``half`` buckets of negative values (largest
        magnitude first) then ``half`` of non-negative ones; only the latter
        for an unsigned codec.
      origin: int32 bits such that a magnitude's bucket is ``(bits -
        origin) >> shift``, clipped to ``[0, half)``: bucket 0 holds every
        magnitude below ``origin + 2**shift`` (0 included).
      shift: ``23 - m`` for ``m`` mantissa bits per bucket.
      half: buckets per sign; the last holds every magnitude >= 2.
      signed: whether negative values have buckets of their own.
    """

    table: np.ndarray
    origin: int
    shift: int
    half: int
    signed: bool


def bucket_lut(table: Any, signed: bool) -> BucketLut | None:
    """The `BucketLut` of a sorted search table, or ``None`` if none fits.

    Uses the fewest mantissa bits (1-8) for which no bucket holds more than
    one entry of ``table``; ``None`` when even 8 bits do not separate them or
    the table has more than 256 entries (counts must fit a byte).

    Args:
      table: `search_table` or `stochastic_table` of a map (numpy float32,
        sorted, finite entries then ``inf``).
      signed: whether the encoder sees negative values.

    Returns:
      The lookup table and its parameters.
    """
    t = np.asarray(table, np.float32).reshape(-1)
    return _bucket_lut(t.tobytes(), bool(signed))


@functools.cache
def _bucket_lut(raw: bytes, signed: bool) -> BucketLut | None:
    t = np.frombuffer(raw, np.float32)
    finite = t[np.isfinite(t)]
    magnitudes = np.abs(finite[finite != 0])
    if t.size > 256 or magnitudes.size == 0 or magnitudes.max() >= 2.0:
        return None
    # bucket 1 starts one binade below the smallest nonzero entry magnitude
    low_f = np.float32(2.0 ** (np.floor(np.log2(magnitudes.min())) - 1))
    low = int(low_f.view(np.int32))
    two = int(np.float32(2.0).view(np.int32))
    for m in range(1, 9):
        shift = 23 - m
        origin = low - (1 << shift)  # bucket 1 starts at `low`
        half = ((two - origin) >> shift) + 1  # the last bucket starts at 2.0
        starts = origin + np.arange(half, dtype=np.int64) * (1 << shift)
        starts[0] = 0
        ends = np.empty_like(starts)
        ends[:-1] = starts[1:] - 1
        ends[-1] = int(np.float32(np.inf).view(np.int32))
        lo = starts.astype(np.int32).view(np.float32)
        hi = ends.astype(np.int32).view(np.float32)
        count_lo = np.searchsorted(t, lo, side="right")
        if np.any(np.searchsorted(t, hi, side="right") - count_lo > 1):
            continue
        counts = [count_lo]
        if signed:
            count_neg = np.searchsorted(t, -hi, side="right")
            if np.any(np.searchsorted(t, -lo, side="right") - count_neg > 1):
                continue
            counts = [count_neg[::-1], count_lo]
        out = np.concatenate(counts).astype(np.uint8)
        out.flags.writeable = False
        return BucketLut(out, origin, shift, int(half), signed)
    return None


#: Lanes of the kernel's search and rounding entries (`bucket_entries`) per
#: rounding rule; read by bucket, the last lane is the bucket's count.
NEAREST_LANES = ("bound", "count")
STOCHASTIC_LANES = ("below", "bound", "above_next", "count")
#: Bucket tables of more buckets than this read their entries by count
#: (`lanes_by_count`).
MAX_BUCKETS_BY_BUCKET = 256


def lanes_by_count(lut: BucketLut) -> bool:
    """Whether the kernel reads ``lut``'s entries by count instead of by bucket.

    By bucket, an element's entry is one read per lane at its bucket; by
    count, one read of the bucket's count (`BucketLut.table`, bytes) and then
    one per lane at that count. By bucket is shorter (no dependent read; 4-bit
    maps: 38-92 buckets, a lane in one to three cache lines); by count keeps
    the lanes as small as the map (8-bit maps: 3074 buckets would spread one
    warp's reads over many more cache lines than 256 map entries do).
    """
    return lut.table.size > MAX_BUCKETS_BY_BUCKET


def bucket_entries(
    qmap: Any,
    table: Any,
    lut: BucketLut,
    stochastic: bool,
    by_count: bool | None = None,
) -> np.ndarray:
    """Every value the kernel's search and rounding read, lane by lane.

    With ``c`` a bucket's count (``lut.table``), an element ``x`` of the
    bucket is at or above ``c`` table entries, and above ``c + 1`` exactly
    where ``table[c] <= x`` (a bucket holds at most one entry). So the
    search needs ``table[c]`` and ``c``, and stochastic rounding also the
    map entries on either side: ``qmap[c]`` (``lo`` when ``x < table[c]``,
    where ``hi`` is ``table[c] = qmap[c + 1]``) and ``qmap[c + 2]`` (``hi``
    otherwise, where ``lo`` is ``table[c]``); at the top ``qmap``'s last
    entry. Each lane is read with one address and a constant offset: one
    read per lane instead of a search's dependent reads and the bracket's
    two (``NOTES_kernels.md``, v24).

    Args:
      qmap: the codec's sorted map.
      table: its `search_table` (nearest) or `stochastic_table`.
      lut: ``table``'s `bucket_lut`.
      stochastic: which rounding rule.
      by_count: lanes per count (``c = 0 .. len(qmap) - 1``, read after the
        bucket's count) instead of per bucket (with the count as a last
        lane); ``None``: `lanes_by_count`.

    Returns:
      float32, lane-major (`NEAREST_LANES` or `STOCHASTIC_LANES`, the count
      lane holding the int32 bits of ``c`` and only by bucket).
    """
    by_count = lanes_by_count(lut) if by_count is None else by_count
    q = np.asarray(qmap, np.float32)
    t = np.asarray(table, np.float32)
    c = np.arange(q.size) if by_count else lut.table.astype(np.int64)
    if stochastic:
        lanes = [q[c], t[c], q[np.minimum(c + 2, q.size - 1)]]
    else:
        lanes = [t[c]]
    if not by_count:
        lanes.append(c.astype(np.int32).view(np.float32))
    out = np.concatenate(lanes).astype(np.float32)
    out.flags.writeable = False
    return out


def _bucket_lanes(
    entries: Any, counts: Any, params: BucketLut, x: jax.Array, lanes: int, bits: int
) -> tuple[list[jax.Array], jax.Array]:
    """``x``'s `bucket_entries`: the value lanes and the int32 count.

    The bucket is ``clip((|x|'s bits - origin) >> shift, 0, half - 1)``,
    formed as ``max(|x|'s bits, origin) >> shift``, capped, minus ``origin
    >> shift`` (``origin`` is a multiple of ``2**shift``): the lower clip
    moves before the shift, and the subtracted constant joins each read's
    constant offset. Unsigned, the floor is a float maximum that also stands
    for the sign mask (a negative ``x``, which the encoder no longer clips,
    takes the bucket of 0 and, below every entry, the index of 0). One
    (signed) or two (unsigned) instructions per element fewer in an
    ALU-bound kernel (``NOTES_kernels.md``, v38); the same buckets, so the
    same entries and index (tested against the search). A NaN gets some
    bucket in range (none is encoded: moments are saturated first).
    """
    first = params.origin >> params.shift  # origin's bucket, counted from 0
    if params.signed:
        magnitude = jax.lax.bitcast_convert_type(x, jnp.int32) & 0x7FFFFFFF
        magnitude = jnp.maximum(magnitude, params.origin)
    else:
        floor = np.int32(params.origin).view(np.float32)
        magnitude = jax.lax.bitcast_convert_type(jnp.maximum(x, floor), jnp.int32)
    b = jnp.minimum(magnitude >> params.shift, first + params.half - 1)
    if params.signed:  # negatives' buckets first, largest magnitude first
        shifted = jnp.where(x < 0, params.half - 1 + first - b, params.half - first + b)
        offset = 0
    else:
        shifted, offset = b, -first
    if counts is None:  # by bucket: the count is the last lane
        n = params.half * (2 if params.signed else 1)
        read = [
            base.take(entries, shifted + (k * n + offset), in_range=True)
            for k in range(lanes)
        ]
        return read[:-1], jax.lax.bitcast_convert_type(read[-1], jnp.int32)
    count = base.take(counts, shifted + offset, in_range=True).astype(jnp.int32)
    n = 1 << bits
    read = [base.take(entries, count + k * n, in_range=True) for k in range(lanes - 1)]
    return read, count


def _index_by_buckets(
    entries: Any,
    counts: Any,
    params: BucketLut,
    x: jax.Array,
    uniform: Any,
    bits: int,
) -> jax.Array:
    """The map index of ``x`` from its `bucket_entries`.

    ``counts`` is the bucket table (`BucketLut.table`) where the entries are
    read by count, else ``None``. The same index as the binary search
    (`_count_bounds_at_or_below`) and, with ``uniform``, as
    `_round_stochastic` after it, for every non-NaN ``x``.
    """
    top = (1 << bits) - 1
    if uniform is None:
        (bound,), index = _bucket_lanes(
            entries, counts, params, x, len(NEAREST_LANES), bits
        )
        # +inf alone counts the table's inf sentinel too
        return jnp.minimum(index + (bound <= x).astype(jnp.int32), top)
    (below, bound, above_next), index = _bucket_lanes(
        entries, counts, params, x, len(STOCHASTIC_LANES), bits
    )
    after = bound <= x
    lo = jnp.where(after, bound, below)
    hi = jnp.where(after, above_next, bound)
    up = _rounds_up(x, lo, hi, uniform)
    return jnp.minimum(index + after.astype(jnp.int32) + up.astype(jnp.int32), top)


def stochastic_table(qmap: jax.Array) -> jax.Array:
    """The search table of stochastic rounding: ``qmap[1:]`` then ``inf``.

    The number of its entries ``<= x`` is the index of the map entry just
    at or below ``x`` (0 below the smallest entry).
    """
    xp = base.array_module(qmap)  # numpy: a kernel's constant
    q = xp.asarray(qmap, xp.float32)
    return xp.concatenate([q[1:], xp.full((1,), xp.inf, xp.float32)])


def _rounds_up(
    x: jax.Array, lo: jax.Array, hi: jax.Array, uniform: jax.Array
) -> jax.Array:
    """Whether ``x`` in ``[lo, hi]`` rounds up: probability ``(x - lo) / (hi - lo)``."""
    return uniform * (hi - lo) < x - lo


def _round_stochastic(
    qmap: Any, table: Any, x: jax.Array, uniform: jax.Array, bits: int
) -> jax.Array:
    """Index of ``lo`` or ``hi``, the map entries around ``x``, unbiased.

    ``hi`` with probability ``(x - lo) / (hi - lo)``, so the decoded value's
    mean is ``x`` wherever ``x`` lies inside the map; below the smallest entry
    (a zero-free map) the smallest entry, above the largest the largest.
    ``hi == lo`` only at the top entry of a strictly increasing map (every
    shipped map is), where ``above == below``: no guard needed (v21).
    """
    below = _count_bounds_at_or_below(table, x, bits)  # entry <= x, or 0
    n = 1 << bits
    above = jnp.minimum(below + 1, n - 1)
    lo = base.take(qmap, below, in_range=True)
    hi = base.take(qmap, above, in_range=True)
    return jnp.where(_rounds_up(x, lo, hi, uniform), above, below)


def encode_groups_with(
    xg: jax.Array,
    qmap: Any,
    *,
    signed: bool,
    table: Any = None,
    noise: jax.Array | None = None,
    planes: bool = False,
    lut: Any = None,
) -> tuple[Any, jax.Array]:
    """Blockwise absmax encoding against an explicit map.

    Args:
      xg: ``(..., block_size)`` float blocks; ``block_size * bits`` must be a
        multiple of 8. Or their two halves (`base.halves`, a kernel's parts):
        4-bit codes of element ``j`` and ``j + block_size / 2`` share a byte
        and both uniforms of a pair come from one word, so halves need no
        split.
      qmap: ``(2**bits,)`` float32 sorted map with values in [-1, 1]
        (``codec.qmap()``); an argument, not a constant, so that a Pallas
        kernel can pass it in.
      signed: if ``False`` negative inputs encode as 0 (the map's entries
        are all >= 0).
      table: the binary search's table: `search_table` of ``qmap`` for
        nearest rounding, `stochastic_table` with ``noise`` (``None``:
        computed here); not read with ``lut`` (a kernel's search).
      noise: ``None`` for round-to-nearest, or uint32 ``(..., block_size /
        2)`` random words (`base.group_noise`) for unbiased stochastic
        rounding between the two map entries around each value (word ``j``
        serves elements ``j`` and ``j + block_size / 2``).
      planes: return the codes as the kernel's planes (`kernel_planes`)
        instead of one array.
      lut: ``(entries, counts, params)``: the `bucket_entries` of
        ``table``'s `bucket_lut` (a kernel's ref, or an array), the bucket
        table where the entries are read by count (else ``None``) and that
        `BucketLut`: the same indices from one read per lane instead of a
        binary search and the bracket's reads (on arrays a NaN value takes
        the search's code 0).

    Returns:
      ``(codes, scales)``: ``(..., block_size * bits // 8)`` uint8 packed map
      indices and ``(..., 1)`` float32 block absmax.
    """
    bits = _bits_of(qmap)
    given = xg if isinstance(xg, (list, tuple)) else [xg]
    parts = [jnp.asarray(x, jnp.float32) for x in given]
    if signed:
        extent = [jnp.max(jnp.abs(x), axis=-1, keepdims=True) for x in parts]
        absmax = functools.reduce(jnp.maximum, extent)
    else:
        # Negative values are not clipped one by one: below every entry of
        # an unsigned map (all >= 0) and every bound, they take the code of
        # 0 under either rounding; only the group's maximum is floored at 0
        # (v38: one instruction per element fewer in the kernels).
        extent = [jnp.max(x, axis=-1, keepdims=True) for x in parts]
        absmax = jnp.maximum(functools.reduce(jnp.maximum, extent), 0.0)
    scales, divisor = base.safe_scale(absmax, jnp.float32)
    inv = 1.0 / divisor  # one division a block, as polar's groups (v36)
    normalised = [x * inv for x in parts]
    uniform = [None] * len(parts)
    if noise is not None:  # word j: the uniforms of elements j and j + G/2
        uniform = base.parts_of(list(base.uniform_pair(noise)), len(parts))
    if lut is not None:
        index = [
            _index_by_buckets(*lut, x, u, bits)
            for x, u in zip(normalised, uniform, strict=True)
        ]
        if not base.is_ref(lut[0]):  # arrays: a NaN's code is the search's 0
            index = [
                jnp.where(jnp.isnan(x), 0, i)
                for x, i in zip(normalised, index, strict=True)
            ]
    elif noise is None:
        table = _as_table(search_table(qmap) if table is None else table)
        index = [_count_bounds_at_or_below(table, x, bits) for x in normalised]
    else:
        table = _as_table(stochastic_table(qmap) if table is None else table)
        qmap = _as_table(qmap)
        index = [
            _round_stochastic(qmap, table, x, u, bits)
            for x, u in zip(normalised, uniform, strict=True)
        ]
    index = [i.astype(jnp.uint8) for i in index]
    if planes:
        return kernel_planes(index, bits), scales
    return base.pack_codes(index, bits), scales


def _as_table(table: Any) -> Any:
    """A table the search reads: a kernel's ref as it is, else float32 jnp."""
    return table if base.is_ref(table) else jnp.asarray(table, jnp.float32)


def kernel_planes(index: list[jax.Array], bits: int) -> list[jax.Array]:
    """The code planes a kernel stores (`BlockwiseCodec.code_planes`).

    At 4 bits the packed plane (the halves are its two nibbles); at 8 bits,
    one byte per code, the codes of the block's two halves: the same bytes in
    memory as the one plane, stored without joining the halves.

    Args:
      index: uint8 map indices, the block or its two halves (`base.parts_of`).
      bits: 4 or 8.

    Returns:
      A list of uint8 planes.
    """
    if bits == 8:
        return base.parts_of(index, 2)
    return base.pack_planes(index, bits)


def decode_map(qmap: Any, floor: float) -> Any:
    """The values codes decode to before the scale: ``qmap`` raised to ``floor``.

    Formed once per map (NumPy in, NumPy out: a kernel's input) instead of a
    maximum per decoded element. ``floor`` 0 (signed codecs) keeps the map.
    """
    xp = base.array_module(qmap)
    qmap = xp.asarray(qmap, xp.float32)
    return xp.maximum(qmap, xp.float32(floor)) if floor else qmap


def decode_groups_with(
    codes: jax.Array,
    scales: jax.Array,
    qmap: jax.Array,
    *,
    floor: float = 0.0,
    halves: bool = False,
) -> Any:
    """Inverse of `encode_groups_with`: map entries times block scales.

    Args:
      codes: ``(..., bytes_per_block)`` uint8, or the kernel's planes
        (`kernel_planes`).
      scales: ``(..., 1)`` float block scales.
      qmap: the map that encoded them, or its `decode_map` (a kernel's ref
        holds the `decode_map`, read as it is).
      floor: smallest map value decoded (unsigned codecs pass the smallest
        positive entry, so a second moment never decodes to 0 in a block
        whose scale is > 0: an Adam update divides by its square root).
      halves: return the block as a kernel's parts (its two halves,
        `base.halves`) instead of the whole block.

    Returns:
      ``(..., block_size)`` float32, ``block_size = bytes * 8 // bits``, or
      its two halves.
    """
    bits = _bits_of(qmap)
    parts = 2 if halves else 1
    if isinstance(codes, (list, tuple)) and bits == 8:  # each half's bytes
        index = base.parts_of(codes, parts)
    else:  # at 4 bits one plane: the halves are its two nibbles
        planes = list(codes) if isinstance(codes, (list, tuple)) else [codes]
        index = base.unpack_planes(planes, bits, parts=parts)
    if not base.is_ref(qmap):
        qmap = jnp.asarray(decode_map(qmap, floor))
    scales = jnp.asarray(scales, jnp.float32)
    tiny = jnp.where(scales > 0, jnp.finfo(jnp.float32).tiny, 0.0) if floor else None
    out = []
    for i in index:  # codes < 2**bits: always inside the map
        values = base.take(qmap, i.astype(jnp.int32), in_range=True)
        if not floor:
            out.append(values * scales)
            continue
        # never 0 where the block is nonzero, even where the product is
        # subnormal (flushed to 0 on CPU): the smallest normal float instead
        out.append(jnp.maximum(values * scales, tiny))
    return out if halves else out[0]


@dataclasses.dataclass(frozen=True, repr=False)
class BlockwiseCodec(base.Codec):
    """Blockwise absmax quantization against a fixed map (a baseline format).

    Build it with `blockwise8` or `blockwise4`. Fields are static and
    hashable.

    Attributes:
      bits: code bits per element, 8 or 4.
      signed: whether negative values are representable (first moments).
      block_size: elements per block, each with one fp32 absmax scale.
    """

    bits: int = 8
    signed: bool = True
    block_size: int = 256
    map_name: str = ""
    rounding: str = "nearest"

    def __post_init__(self) -> None:
        _checks.one_of("bits", self.bits, _ACCEPTED_BITS)
        _checks.is_bool("signed", self.signed)
        _checks.positive_int("block_size", self.block_size)
        _checks.divisible("block_size", self.block_size, "bits_per_byte", 8)
        _checks.divisible("block_size", self.block_size, "2 (a word per pair)", 2)
        _checks.one_of("rounding", self.rounding, ROUNDINGS)
        if self.map_name:
            _checks.one_of("qmap", self.map_name, MAPS)
            if self.signed and self.map_name != "dynamic":
                raise ValueError(
                    f"qmap={self.map_name!r} is an unsigned map; a signed codec "
                    "takes qmap='dynamic'."
                )

    @property
    def kind(self) -> str:
        """The map's name: ``"dynamic"``, ``"linear"`` or ``"log"``."""
        if self.map_name:
            return self.map_name
        return "dynamic" if self.bits == 8 or self.signed else "linear"

    @property
    def stochastic(self) -> bool:
        """Whether encoding rounds stochastically (``rounding="stochastic"``)."""
        return self.rounding == "stochastic"

    @property
    def group_size(self) -> int:  # type: ignore[override]
        """Elements per block (the contract's group)."""
        return self.block_size

    @property
    def name(self) -> str:
        """E.g. ``"blockwise8-signed-b256"``."""
        kind = "signed" if self.signed else "unsigned"
        out = f"blockwise{self.bits}-{kind}-b{self.block_size}"
        default = "dynamic" if self.bits == 8 or self.signed else "linear"
        if self.kind != default:
            out += f"-{self.kind}"
        return out + ("-sr" if self.stochastic else "")

    @property
    def bytes_per_group(self) -> int:
        """Code bytes per block: ``block_size * bits / 8``."""
        return self.block_size * self.bits // 8

    @property
    def scale_dtype(self) -> Any:
        """Scales are float32, as in both references."""
        return jnp.float32

    def qmap(self) -> np.ndarray:
        """The sorted quantization map (read-only ``np.float32``).

        8 bits: the dynamic map (signed or unsigned). 4 bits: the
        dynamic-exponent map if signed, else the zero-free linear map.
        """
        if self.kind == "dynamic":
            return _dynamic_map(bool(self.signed), self.bits)
        if self.kind == "log":
            return _log_map(self.bits, LOG_RATIO if self.bits == 4 else LOG_RATIO_8)
        return _linear_map(self.bits)

    def encode_groups(
        self, xg: jax.Array, seed: Any = None
    ) -> tuple[jax.Array, jax.Array]:
        """See `encode_groups_with`; searches `qmap` by its `kernel_tables`.

        A stochastic codec draws its bits from the stream ``seed``
        (`base.group_noise`; ``None`` is stream 0).
        """
        noise = base.group_noise(xg, seed) if self.stochastic else None
        tables = [jnp.asarray(t) for t in self.kernel_tables()]
        return self._encode_by_buckets(xg, tables, noise)

    def decode_floor(self) -> float:
        """Smallest value decoded: 0 if signed, else the least positive entry.

        bitsandbytes' unsigned 8-bit map holds 0; we decode that code as its
        neighbour (3.25e-7 of the block scale) so that a second moment never
        decodes to 0 where its block is nonzero (measured on g^2 data: 0.1% of
        elements decoded to 0 and the Adam update error reached 2343x).
        """
        if self.signed:
            return 0.0
        qmap = self.qmap()
        return float(qmap[qmap > 0].min())

    def decode_groups(self, codes: jax.Array, scales: jax.Array) -> jax.Array:
        """See `decode_groups_with`; uses `qmap` and `decode_floor`."""
        return decode_groups_with(codes, scales, self.qmap(), floor=self.decode_floor())

    def code_planes(self) -> list[int]:
        """Bytes of each code plane a kernel stores per block (`kernel_planes`).

        4 bits: one plane. 8 bits: the two halves' bytes (the one plane of
        the format, in two pieces).
        """
        if self.bits == 8:
            return [self.block_size // 2] * 2
        return base.plane_bytes(self.block_size, self.bits)

    def kernel_tables(self) -> tuple[np.ndarray, ...]:
        """The arrays a kernel takes as inputs.

        The `decode_map` (to decode), the `bucket_entries` of the search
        table's `bucket_lut` (to encode) and, where those are read by count
        (`lanes_by_count`: the 8-bit maps), the bucket table.
        """
        qmap, (table, lut) = self.qmap(), _kernel_search(self)
        out = (
            decode_map(qmap, self.decode_floor()),
            bucket_entries(qmap, table, lut, self.stochastic),
        )
        return out + ((lut.table,) if lanes_by_count(lut) else ())

    def kernel_columns(self) -> list[np.ndarray]:
        """The kernel's parts of a block: its two halves (`base.halves`).

        At 4 bits they are the two nibbles of the block's bytes, at 8 bits its
        two half-planes (`kernel_planes`); both draw their uniforms from one
        word per pair.
        """
        return base.halves(self.block_size)

    def kernel_decode(
        self, planes: list[Any], scales: Any, tables: Any
    ) -> list[jax.Array]:
        """`decode_groups_with` of the kernel's planes to the block's halves."""
        return decode_groups_with(
            planes, scales, tables[0], floor=self.decode_floor(), halves=True
        )

    def kernel_encode(
        self, x: Any, tables: Any, noise: jax.Array | None
    ) -> tuple[list[jax.Array], jax.Array]:
        """`encode_groups_with` of the halves to the kernel's planes (``noise``: SR)."""
        return self._encode_by_buckets(
            x, tables, noise if self.stochastic else None, planes=True
        )

    def _encode_by_buckets(
        self, x: Any, tables: Any, noise: Any, planes: bool = False
    ) -> tuple[Any, jax.Array]:
        """`encode_groups_with` by the `bucket_entries` search (`kernel_tables`).

        The kernels' search, and on arrays the codec's too: the same indices
        as the binary search for every non-NaN value, from one read per lane
        instead of the search's dependent reads (the 4-bit log map's
        stochastic encode of 6.3M values on a 2-core CPU 98-114 -> 26-42 ms;
        ``NOTES_kernels.md``, v41). On arrays a NaN value keeps the binary
        search's code 0 (a kernel never sees one: moments are saturated first).
        """
        lut = _kernel_search(self)[1]
        return encode_groups_with(
            x,
            tables[0],  # the decode map: read for the map's length only
            signed=self.signed,
            noise=noise,
            planes=planes,
            lut=(tables[1], tables[2] if lanes_by_count(lut) else None, lut),
        )


@functools.cache
def _kernel_search(codec: BlockwiseCodec) -> tuple[np.ndarray, BucketLut]:
    """The codec's search table and its `bucket_lut`.

    Built once per codec (the kernel's tables and each trace of its encoder,
    on arrays too since v41, read them). Every map a codec can take has one
    (`MAPS`; tested).
    """
    qmap = np.asarray(codec.qmap(), np.float32)
    # numpy in, numpy out: no JAX operation, no trace (nor shard_map) seen
    table = stochastic_table(qmap) if codec.stochastic else search_table(qmap)
    table.flags.writeable = False
    lut = bucket_lut(table, codec.signed)
    if lut is None:  # no map in MAPS: a new map would need the binary search
        raise ValueError(f"{codec!r}: no bucket table separates its map's bounds.")
    return table, lut


def blockwise8(
    signed: bool = True, *, block_size: int = 256, rounding: str = "nearest"
) -> BlockwiseCodec:
    """8-bit blockwise dynamic quantization, as bitsandbytes' 8-bit optimizers.

    Each block of ``block_size`` elements along the last axis is divided by its
    absmax (stored fp32) and every element becomes the index of the nearest
    value of the 256-entry dynamic map (`dynamic_map`): signed for a first
    moment, unsigned for a second moment (negative inputs are clipped to 0).
    All in: ``8 + 32 / block_size`` bits per element (8.125 for 256).

    Args:
      signed: ``True`` for first moments (signed map), ``False`` for second
        moments (unsigned map, negative inputs clipped to 0).
      block_size: elements per block, a positive multiple of 8; 256 as in
        bitsandbytes' ``Adam8bit``.
      rounding: ``"nearest"`` (as bitsandbytes) or ``"stochastic"``
        (unbiased between the two map entries around each value; what
        `scale_by_adam_8bit` uses for the second moment, see the module
        docstring).

    Returns:
      A `BlockwiseCodec`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax_lowbit as lowbit
      >>> codec = lowbit.codecs.blockwise8()
      >>> codec.bits_per_element
      8.125
      >>> x = jnp.array([1.0, -0.5, 0.02, 0.0])
      >>> codec.decode(codec.encode(x)).tolist()
      [1.0, -0.50078..., 0.019843..., 0.0]

    References:
      Dettmers et al, `8-bit Optimizers via Block-wise Quantization
      <https://arxiv.org/abs/2110.02861>`_, 2022.
    """
    return BlockwiseCodec(
        bits=8, signed=signed, block_size=block_size, rounding=rounding
    )


def blockwise4(
    signed: bool = True,
    *,
    block_size: int = 128,
    rounding: str = "nearest",
    qmap: str | None = None,
) -> BlockwiseCodec:
    """4-bit blockwise quantization, as the 4-bit optimizer of Li et al. 2023.

    Blocks of ``block_size`` along the last axis with an fp32 absmax scale.
    Signed (first moment): nearest of the 16-value dynamic-exponent map
    ``±{0.0055, 0.0325, 0.0775, 0.2125, 0.4375, 0.6625, 0.8875}, 0, 1``.
    Unsigned (second moment): nearest of the zero-free linear map
    ``(k + 1) / 16``; negative inputs are clipped to 0 and a block with a
    scale > 0 never decodes to 0. Two codes per byte (planar, see the module
    docstring). All in: ``4 + 32 / block_size`` bits (4.25 for 128).

    Where we differ: the paper normalises the second moment with a rank-1
    (row and column max) scale; here both moments use blocks of 128, so that
    the format is one `Packed` layout sharded like the parameter. That is
    the paper's "B128/Linear" second-moment variant.

    Args:
      signed: ``True`` for first moments (DE map), ``False`` for second
        moments (zero-free linear map).
      block_size: elements per block, a positive multiple of 8; 128 as in the
        paper.
      rounding: ``"nearest"`` (as the paper) or ``"stochastic"`` (unbiased
        between the two map entries around each value).
      qmap: ``None`` (the paper's maps), or for an unsigned codec
        ``"linear"`` (the paper's) or ``"log"`` (`log_map`: levels 1.4x
        apart, what `scale_by_adam_4bit` uses for the second moment with
        stochastic rounding; see the module docstring).

    Returns:
      A `BlockwiseCodec`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax_lowbit as lowbit
      >>> codec = lowbit.codecs.blockwise4(signed=False)
      >>> codec.bits_per_element
      4.25
      >>> codec.decode(codec.encode(jnp.array([2.0, 0.3, 0.0, -1.0]))).tolist()
      [2.0, 0.25, 0.125, 0.125]
      >>> lowbit.codecs.blockwise4().decode(
      ...     lowbit.codecs.blockwise4().encode(jnp.array([2.0, -1.0, 0.0]))
      ... ).tolist()
      [2.0, -0.875, 0.0]

    References:
      Li et al, `Memory Efficient Optimizers with 4-bit States
      <https://arxiv.org/abs/2309.01507>`_, 2023.
    """
    return BlockwiseCodec(
        bits=4,
        signed=signed,
        block_size=block_size,
        map_name="" if qmap is None else qmap,
        rounding=rounding,
    )
