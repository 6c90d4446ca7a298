r"""2D polar codecs: pairs of elements coded as one point (r, θ) of a codebook.

Why over 500 lines: one codec family, its format defined once for the jnp path
and the kernels (deterministic and stochastic rules, measured codebooks), with
the measurements that chose them in the docstrings.

Optimizer states look quasi-Gaussian and roughly circularly symmetric when two
elements are viewed as one 2D point, so a pair is coded against a small polar
codebook (sectors x rings) instead of each element alone.

**Groups and pairing.** A group is ``G`` consecutive elements of the last axis
(``G = 64`` by default), padded with zeros. Pair ``j`` of a group is
``(x[j], x[j + G/2])`` for ``j < G/2``: the two halves of the group are the two
coordinates, so encoding and decoding are contiguous slices and one
concatenation, with no interleaving shuffle for the kernels. (The paper pairs
``(x[2i], x[2i+1])``; the statistics are the same.)

**Scale.** One scale per group: the largest pair radius ``max_j |(x_j,
x_{j+G/2})|``, stored in ``scale_dtype`` (bf16 by default) rounded **up**, so
every normalised radius is ``<= 1``. An all-zero group has scale 0 and decodes
to exact zeros.

**Byte layout** of one group (``G = 64``): 32 pair codes of ``b`` bits (``b = 4``
at 2 bits per element, ``b = 3`` at 1.5), packed planar by
`base.pack_codes`: 4-bit codes fill 16 bytes, code ``j`` in byte ``j % 16`` at
bit ``4 * (j // 16)``; 3-bit codes fill 12 bytes: the low bit of code ``j``
in byte ``j % 4`` at bit ``j // 4``, then its two high bits in byte ``4 + j %
8`` at bit ``2 * (j // 8)``. A code is ``ring * S + sector``. With the
2-byte bf16 scale: 18 bytes per 64 elements = **2.25 bits/element** all-in at
2 bits, 14 bytes = **1.75** at 1.5 bits.

**Signed codebook** (first moment): ``S = 8`` sectors at angles ``k·π/4`` times
the rings: one ring (0.40) at 1.5 bits, two (0.14, 0.53) at 2 bits, the
published values. Encoding is the exact nearest codeword, found without
search: the sector is the nearest of ``k·π/4``, decided by comparisons
(`fold_octant` reflects the pair onto the first octant; the diagonal wins
where ``y > tan(π/8)·x``), so no trigonometry is evaluated; then, with the
sector angle φ fixed, the ring nearest to the projected radius ``p = r·cos(θ −
φ)``. Proof:
``|z − ρe^{iφ}|² = (ρ − p)² + r² − p²``, so for every ring ρ > 0 the nearest
angle is best, and since every sector has the same rings the nearest codeword
is the nearest angle with the ring nearest to ``p`` (tested against brute
force).

**Unsigned codebook** (second moment ``v >= 0``). Chosen by measurement on real
Adam second moments (an MLP on sklearn digits and a byte-level MLP LM, 400
Adam steps, 1.4M elements of ``nu``, ``m`` from the same runs; rings fitted by
`calibrate` for each candidate). Metrics: mean ``|log sqrt(v̂/v)|``; the
fraction of elements with ``v̂ < v/2`` (under-estimation blows up
``m/sqrt(v)``); the relative error of the Adam direction ``m/(sqrt(v)+1e-8)``
and its largest value relative to fp32's (``umax``)::

    candidate (2 bits = 16 codes)      |log|  v̂<v/2  upd err  umax
    sqrt v, 8 sect x (.25,.75) nearest 0.313  0.162   0.427   2.13  (DESIGN's naive)
    sqrt v, 4x4 nearest                0.237  0.085   0.328   1.80
    sqrt v, 4x4 ceil                   0.303  0.020   0.272   1.47
    v^1/4,  4x4 ceil                   0.359  0.082   0.427   2.98
    v,      4x4 nearest                0.304  0.036   0.287   1.41
    v,      4x4 ceil                   0.385  0       0.314   0.90
    v,      4x4 dominate (v̂ >= v)      0.445  0       0.349   0.86
    v,      2x8 ceil    <- chosen      0.366  0       0.315   0.95
    candidate (1.5 bits = 8 codes)
    sqrt v, 4x2 ceil                   0.437  0.010   0.348   1.47
    v,      4x2 ceil                   0.515  0       0.386   0.89
    v,      2x4 dominate (v̂ >= v)      0.524  0       0.394   0.77
    v,      2x4 ceil    <- chosen      0.446  0       0.356   1.01

Every coded domain that compresses the range (``sqrt v``, ``v^1/4``) turns the
angular error of the smaller coordinate of a pair into a larger relative error
of ``v`` and under-estimates it; nearest rounding under-estimates too. So we
code **v itself** with ``S = 2`` sectors at 22.5° and 67.5° (strictly inside
(0, π/2)) and the **radial ceiling rule**: the nearest sector, then the
*smallest* ring ``>= p`` (the top ring is 1, so one always exists). The radius
is never rounded down; the angle can only shrink the smaller coordinate, by at
most ``cos δ·sin φ / sin(φ + δ) >= 1/2``, so ``v̂ >= v/2`` for every element by
construction (measured minimum 0.50), and the Adam direction is never more
than ``sqrt 2`` larger than fp32's (measured 1.01x at most). The "dominate"
rule (smallest codeword above the point in both coordinates) guarantees
``v̂ >= v`` but over-estimates more. Rings (fitted, rounded): 2 bits
``(0.086, 0.214, 0.321, 0.425, 0.533, 0.655, 0.805, 1.0)``; 1.5 bits ``(0.238,
0.449, 0.68, 1.0)``. Every ring is > 0 and every sector centre is off the axes,
so a decoded value is > 0 wherever the group scale is > 0 (values that would
fall below the smallest normal float32 are raised to it). Negative inputs to an
unsigned codec are treated as 0.

**Stochastic rounding** (``rounding="stochastic"``, the optimizers' default
at 2 and 1.5 bits). An optimizer re-encodes its moments every step, and each
is an exponential moving average ``m ← β m̂ + (1 − β) g``. Under the
deterministic rules that EMA fails: nearest rounding rounds the small
increment ``(1 − β) g`` away (the moment stalls, and the group maximum decays
onto the inner ring), and the radial ceiling of ``v`` turns every small
increase into a whole ring step that never decays (a ratchet; the bf16 scale,
rounded up, ratchets the same way). Simulated EMA of 256K elements, 200
steps, β1 = 0.9, β2 = 0.99 (mean projection of the coded Adam direction on
the true one, "gain", and mean ``log v̂/v``): nearest 2-bit gain 0.10, log
ratio 2.9 (v̂ 18x too large); stochastic gain 0.77, log ratio 0.88.
Stochastic rounding makes each coded value unbiased: the pair is split
between its two neighbouring sector directions and its radius between its
two neighbouring rings (or ``±ρ_1`` through the origin) with the
probabilities that keep the mean (`assign_stochastic`); for ``v`` only the
radius is rounded stochastically (never below the smallest ring, so never
0). The random bits are counter-based: a hash of the group's position and a
seed the transforms derive from their step count, leaf and moment, stepped
per pair by a Weyl sequence (`base.dither_bits`): no PRNG key in the state,
and a restored run continues bit for bit. The signed rings change with it: a
top ring at 1 lets the noisiest pairs set next step's group maximum, which
then inflates step after step (1.5 bits, one ring at 1.0: a least-squares
problem diverges); a top ring below 1 clips the largest pairs slightly and is
stable. Measured on a least-squares problem (final/initial loss after 100
steps; Adam, SGD momentum, Adafactor momentum) and digits (MLP test
accuracy)::

    rings                 Adam   SGD    Adafactor  digits
    2 bits nearest (.14,.53)  0.125  0.214  0.159   0.978
    2 bits (0.4, 1.0)     0.039  0.016  0.017      0.975
    2 bits (0.3, 1.0)     0.024  0.015  0.012      0.983
    2 bits (0.3, 0.9) *   0.010  0.022  0.002      0.981
    1.5 bits nearest (.4) 0.185  0.269  0.234      -
    1.5 bits (1.0,)       3.38   0.451  12.7       0.978
    1.5 bits (0.8,) *     0.037  0.054  0.016      0.983
    (fp32: Adam 1e-4, SGD 0.008, Adafactor 1e-5; digits 0.981)

**Long runs (issue 16).** Re-encoded 10^4-10^5 times, no 2-bit code of the
first moment tracks the fp32 EMA (``β1 = 0.9``). Stochastic rounding is
unbiased but adds, per step, a variance proportional to the codeword spacing
times ``|g − m|``; summed over the EMA's memory it is about ``0.4 σ_g Δ``,
several times ``m``'s own variance ``σ_g² (1 − β1) / 2`` when ``Δ`` is a
fraction of the group maximum. Nearest rounding stalls instead (an element
moves only when ``0.1 |g − m̂|`` exceeds half a spacing). Measured with
`benchmarks/state_drift.py` (m alone, fp32 v, 3000-10k steps; rms ``m̂/m``,
bias ``Σ m̂ m / Σ m²``, Adam-direction rms ratio; goal [0.8, 1.25])::

    m codec (bits/element)          gaussian            hetero (σ 1)
    polar 2, stochastic (default)   1.86  0.89  1.86    1.94  0.79  7.98
    polar 2, nearest                0.54  0.40  0.54    0.56  0.35  2.01
    per element {±1, ±1/3}, SR      3.01  1.07  3.02    3.65  1.12  21
    per element {±1, ±1/3}, nearest 1.80  0.22  1.80    2.87  0.74  17.4
    ternary {-1, 0, 1}, SR          4.40  1.12  4.41    4.61  1.01  13.7
    ternary, nearest                2.46  0.00  2.46    2.96  0.51  1.63
    5 levels (2.32 bits), nearest   1.39  0.68  1.39    1.22  0.84  1.11
    4-bit DE map, nearest           1.01  0.96  1.01    0.97  0.91  0.91
    π-Quant (3.83), nearest         0.94  0.88  1.03    0.94  0.87  0.87

Why no memoryless rule can pass at 2 bits: the re-encoded EMA's error obeys
``e_t = β1 e_{t-1} + r_t`` (``r_t`` the rounding error of step ``t``), so
with independent unbiased rounding its variance is ``Var r / (1 − β1²)`` =
5.3 ``Var r`` at ``β1 = 0.9``. Keeping rms ``m̂/m <= 1.25`` needs that below
0.56 ``Var m``, i.e. a per-step rounding rms under 0.33 ``rms m``: a grid
spacing under ~0.8 ``rms m``, while a group maximum near 3 ``rms m`` gives 4
levels per axis a spacing near 2 ``rms m``. A dither correlated in time
(per element ``u_t = frac(u_0 + t·φ)``, golden ratio, instead of a fresh
hash) was simulated too (numpy, 12,800 elements, per-element scales
log-normal σ 0.5, 3000 steps; rms ``m̂/m``)::

    levels                    iid dither   golden-ratio dither   nearest
    {±1, ±1/3}                3.15         2.70                  2.30
    {±1, ±0.3, 0}             2.09         1.67                  1.33

It helps by about a fifth, not enough to pass, so the stream stays the
counter-based hash (which the kernels and stored checkpoints share).

So the polar first moment misses the drift goal (a documented miss, kept as
the 2-bit optimizers' default because the long-horizon LM benchmark, not
this synthetic stream, decides: see the README's "Long runs"); the second
moment no longer uses the unsigned polar codebook by default
(`optax_lowbit.transforms.adam.stable_nu_codec`).

Lion keeps nearest rounding by default: its update is a sign, and rounding
noise in the momentum flips the signs of small coordinates (least squares:
nearest 0.002, stochastic 0.53).

**Numerics.** Radii use an overflow-safe hypot, so magnitudes from 1e-30 to
1e30 round-trip. XLA flushes subnormal float32 to zero on CPU: a group whose
values are all subnormal has scale 0 and decodes to 0.

The jnp group functions `encode_groups_with` / `decode_groups_with` are the
single definition of the format; the codebook (the rings, `PolarCodec.codebook`)
is an explicit array argument, because a Pallas kernel cannot capture array
constants. The sectors are fixed by static structure (``signed``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_lowbit import _checks
from optax_lowbit.codecs import base

#: Published rings of the signed codebook (normalised radii), per bits/element.
SIGNED_RINGS = {1.5: (0.40,), 2: (0.14, 0.53)}
#: Rings of the signed codebook under stochastic rounding (measured, see the
#: module docstring): a top ring below 1 clips the largest pairs a little but
#: stops the group maximum from inflating the scale step after step.
SIGNED_RINGS_STOCHASTIC = {1.5: (0.8,), 2: (0.3, 0.9)}
#: Rounding rules of `polar`.
ROUNDINGS = ("nearest", "stochastic")
#: Measured rings of the unsigned codebook (see the module docstring).
UNSIGNED_RINGS = {
    1.5: (0.238, 0.449, 0.68, 1.0),
    2: (0.086, 0.214, 0.321, 0.425, 0.533, 0.655, 0.805, 1.0),
}
#: Sectors of the signed (full circle) and unsigned (first quadrant) codebooks.
SIGNED_SECTORS = 8
UNSIGNED_SECTORS = 2
_SCALE_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
_TINY = float(jnp.finfo(jnp.float32).tiny)


def sector_angles(signed: bool) -> tuple[float, ...]:
    """Angles (radians) of the sector centres, as Python floats.

    Args:
      signed: full circle (8 sectors at ``k·π/4``) or first quadrant (2 sectors
        at π/8 and 3π/8).

    Returns:
      A tuple of ``S`` angles.
    """
    if signed:
        return tuple(k * 2.0 * math.pi / SIGNED_SECTORS for k in range(SIGNED_SECTORS))
    step = 0.5 * math.pi / UNSIGNED_SECTORS
    return tuple((k + 0.5) * step for k in range(UNSIGNED_SECTORS))


def _sector_cos_sin(signed: bool) -> tuple[list[float], list[float]]:
    """Exact-zero cos/sin of the sector angles (Python scalars, kernel safe)."""

    def clean(v: float) -> float:
        return 0.0 if abs(v) < 1e-12 else v

    angles = sector_angles(signed)
    return [clean(math.cos(a)) for a in angles], [clean(math.sin(a)) for a in angles]


def code_tables(rings: Any, signed: bool) -> tuple[Any, Any, Any]:
    """Per code (``ring * S + sector``): its ring radius and its sector's cos and sin.

    Decoding reads a code's three values from these tables (one read each,
    `decode_groups_with`) instead of building them from the code's bits by
    compares and selects: the kernels are bound by the ALU pipe that those
    take (``NOTES_kernels.md``, v21 and v24). The values are the rings and
    `_sector_cos_sin`'s (exact zeros), so the decoded products are the same.

    Args:
      rings: the ring radii: Python floats or a NumPy array (NumPy tables,
        a kernel's inputs), or a float32 array (jnp tables).
      signed: which codebook.

    Returns:
      float32 ``(S·R,)`` radii, cosines and sines.
    """
    cos_t, sin_t = _sector_cos_sin(signed)
    n_sectors = len(cos_t)
    xp = base.array_module(rings)
    rho = xp.repeat(xp.asarray(rings, xp.float32), n_sectors)
    n_rings = rho.shape[0] // n_sectors
    cos = xp.asarray(np.tile(np.float32(cos_t), n_rings))
    sin = xp.asarray(np.tile(np.float32(sin_t), n_rings))
    return rho, cos, sin


def _select(index: jax.Array, values: Sequence[Any]) -> jax.Array:
    """``values[index]`` as a chain of selects (no gather; values are few)."""
    out = jnp.zeros(index.shape, jnp.float32) + values[0]
    for k in range(1, len(values)):
        out = jnp.where(index == k, values[k], out)
    return out


def ring_values(rings: Any) -> list[Any]:
    """The ring radii as a list of float32 scalars.

    ``rings`` is a float ``(R,)`` array, a sequence of scalars, or (inside a
    Pallas kernel) a ``(R,)`` ref: each radius is read once as a scalar, so
    the group functions never index an array value (no gather or slice).
    """
    if isinstance(rings, (list, tuple)):
        return [jnp.asarray(r, jnp.float32) for r in rings]
    if not hasattr(rings, "shape") or not hasattr(rings, "__getitem__"):
        rings = jnp.asarray(rings, jnp.float32)
    return [rings[k].astype(jnp.float32) for k in range(rings.shape[-1])]


_SQRT2 = math.sqrt(2.0)
_SQRT_HALF = math.sqrt(0.5)
_TAN_PI_8 = math.tan(math.pi / 8.0)


def safe_hypot(a: jax.Array, b: jax.Array) -> jax.Array:
    """Overflow-safe ``sqrt(a² + b²)`` (fine at 1e30 and 1e-30)."""
    au, aw = jnp.abs(a), jnp.abs(b)
    return _folded_hypot(jnp.maximum(au, aw), jnp.minimum(au, aw))


def _folded_hypot(x: jax.Array, y: jax.Array) -> jax.Array:
    """`safe_hypot` of a pair already folded (``x >= y >= 0``)."""
    safe_x = jnp.where(x > 0, x, 1.0)
    return x * jnp.sqrt(1.0 + base.unfused(jnp.square(y / safe_x)))


def fold_octant(
    u: jax.Array, w: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Folds signed pairs into the first octant, without trigonometry.

    A pair lies between two neighbouring sector directions of the signed
    codebook (angles ``k·π/4``): the axis of its larger coordinate and the
    diagonal of its quadrant. Reflected onto the first octant it is ``(x, y)``
    with ``x >= y >= 0``, at angle ``atan(y / x)`` from the axis direction.

    Args:
      u: first coordinates, any shape.
      w: second coordinates, same shape.

    Returns:
      ``(x, y, axis, diag)``: ``x = max(|u|, |w|)``, ``y = min(|u|, |w|)``
      and the int32 sectors of the axis and the diagonal around the pair.
    """
    au, aw = jnp.abs(u), jnp.abs(w)
    x, y = jnp.maximum(au, aw), jnp.minimum(au, aw)
    u_neg, w_neg = u < 0, w < 0
    axis = jnp.where(au >= aw, jnp.where(u_neg, 4, 0), jnp.where(w_neg, 6, 2)).astype(
        jnp.int32
    )
    diag = jnp.where(u_neg, jnp.where(w_neg, 5, 3), jnp.where(w_neg, 7, 1))
    return x, y, axis, diag.astype(jnp.int32)


def signed_span(x: jax.Array, y: jax.Array) -> jax.Array:
    """``α + β`` of a folded pair ``(x, y) = α e_axis + β e_diag`` (>= its radius).

    The product is `base.unfused`: the group's largest span is its scale,
    which the kernel and the jnp path must round alike.
    """
    return x + base.unfused((_SQRT2 - 1.0) * y)


def _unsigned_projection(u: jax.Array, w: jax.Array, sector: jax.Array) -> jax.Array:
    """The radius of ``(u, w)`` projected on its unsigned sector's direction."""
    cos_t, sin_t = _sector_cos_sin(False)
    along = base.unfused(u * _select(sector, cos_t))
    return along + base.unfused(w * _select(sector, sin_t))


def _unsigned_sector(u: jax.Array, w: jax.Array) -> jax.Array:
    """The nearest of the two sectors (22.5°, 67.5°) of a pair ``u, w >= 0``."""
    return (w > u).astype(jnp.int32)


def _ring_of(p: jax.Array, rings: list[Any], *, signed: bool) -> jax.Array:
    """Signed: the ring nearest to ``p``; unsigned: the smallest ring ``>= p``."""
    ring = jnp.zeros(p.shape, jnp.int32)
    for k in range(len(rings) - 1):
        edge = 0.5 * (rings[k] + rings[k + 1]) if signed else rings[k]
        ring = ring + (p > edge).astype(jnp.int32)
    return ring


def assign(
    u: jax.Array, w: jax.Array, rings: jax.Array, *, signed: bool
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Codeword of normalised pairs ``(u, w)`` (radius <= 1) under the codec's rule.

    Signed: the exact nearest codeword (nearest sector angle, then the ring
    nearest to the projected radius). Unsigned: the nearest sector, then the
    smallest ring ``>=`` the projected radius (radial ceiling). No
    trigonometry: the nearest sector is decided by comparisons (`fold_octant`
    and ``tan(π/8)``), so a kernel spends a few selects per pair.

    Args:
      u: first coordinates, any shape.
      w: second coordinates, same shape.
      rings: float32 ``(R,)`` ring radii, increasing (or see `ring_values`).
      signed: which codebook.

    Returns:
      ``(ring, sector, projected)``: int32 ring and sector indices and the
      float32 projected radius ``p = r·cos(θ − φ)``.
    """
    if signed:
        return _assign_folded(fold_octant(u, w), rings)
    rings = ring_values(rings)
    sector = _unsigned_sector(u, w)
    p = _unsigned_projection(u, w, sector)
    return _ring_of(p, rings, signed=False), sector, p


def _assign_folded(
    folded: tuple[jax.Array, ...], rings: Any
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`assign`'s signed rule on pairs already folded (`fold_octant`)."""
    x, y, axis, diag = folded
    to_diag = y > _TAN_PI_8 * x
    sector = jnp.where(to_diag, diag, axis)
    p = jnp.where(to_diag, (x + y) * _SQRT_HALF, x)
    return _ring_of(p, ring_values(rings), signed=True), sector, p


def assign_stochastic(
    u: jax.Array, w: jax.Array, bits: jax.Array, rings: Any, *, signed: bool
) -> tuple[jax.Array, jax.Array]:
    """Stochastic codeword of normalised pairs, unbiased where the codebook allows.

    Signed: the pair ``z = (u, w)`` lies between sector directions ``e_k``
    and ``e_{k+1}``, ``z = α e_k + β e_{k+1}`` with ``α, β >= 0``; the sector
    is ``k+1`` with probability ``β / (α + β)`` and the radius to code is
    ``s = α + β`` (`signed_span`; ``(u, w)`` are normalised so that ``s <=
    1``). ``s`` is then rounded stochastically on the line ``-ρ_R < … < -ρ_1 <
    ρ_1 < … < ρ_R`` (``-ρ`` is the opposite sector), so ``E[decode] = z``
    exactly for pairs with ``s <= ρ_R``; larger ones are clipped to the top
    ring. Unsigned: the nearest sector (as `assign`) and ``s`` the projected
    radius, rounded stochastically between the rings around it (up to the
    smallest ring below it): unbiased along the sector direction, never 0.

    Args:
      u: first coordinates of the normalised pairs.
      w: second coordinates, same shape.
      bits: uint32 random bits, one word per pair (`base.dither_bits`).
      rings: float32 ``(R,)`` ring radii, increasing.
      signed: which codebook.

    Returns:
      ``(ring, sector)`` int32 indices.
    """
    if signed:
        return _assign_stochastic_folded(fold_octant(u, w), bits, rings)
    sector = _unsigned_sector(u, w)
    s = _unsigned_projection(u, w, sector)
    return _round_radius(s, sector, base.uniform_pair(bits)[1], rings, signed=False)


def _assign_stochastic_folded(
    folded: tuple[jax.Array, ...], bits: jax.Array, rings: Any
) -> tuple[jax.Array, jax.Array]:
    """`assign_stochastic`'s signed rule on pairs already folded (`fold_octant`)."""
    x, y, axis, diag = folded
    n_sector, n_ring = base.uniform_pair(bits)
    # the span of the scaled pair, not the group's span times 1/scale: the
    # two round differently, and the stored codes are defined by this one
    s = signed_span(x, y)
    to_diag = n_sector * s < _SQRT2 * y  # probability β / (α + β)
    sector = jnp.where(to_diag, diag, axis)
    return _round_radius(s, sector, n_ring, rings, signed=True)


def _round_radius(
    s: jax.Array, sector: jax.Array, n_ring: jax.Array, rings: Any, *, signed: bool
) -> tuple[jax.Array, jax.Array]:
    """Rounds the radius ``s`` stochastically onto the rings (`assign_stochastic`).

    ``n_ring`` are uniform [0, 1) numbers; signed, ``-ρ_1`` (the opposite
    sector) is below ``ρ_1``. Returns ``(ring, sector)``.
    """
    # Decided by one float compare per ring (``at[k]``: s >= ρ_k, monotone in
    # k as the rings increase) and selects of ring values, no integer index
    # arithmetic: the kernels are bound by the ALU pipe (NOTES_kernels.md,
    # v21). With ``b`` the number of rings <= s: ``lo`` is ρ_{b-1} (below
    # ρ_1: -ρ_1 signed, ρ_1 unsigned), ``hi`` is ρ_b (capped at the top ring).
    # Above the top ring (s >= ρ_R, also s > 1) the top ring, whatever the
    # noise; unsigned below ρ_1 the smallest ring (never 0).
    rings = ring_values(rings)
    at = [s >= r for r in rings]
    lo = jnp.zeros(s.shape, jnp.float32) + (-rings[0] if signed else rings[0])
    hi = jnp.zeros(s.shape, jnp.float32) + rings[0]
    for k, r in enumerate(rings):
        lo = jnp.where(at[k], r, lo)
        if k + 1 < len(rings):
            hi = jnp.where(at[k], rings[k + 1], hi)
    up = (n_ring * (hi - lo) < (s - lo)) | at[-1]
    if not signed:
        up = up | ~at[0]
    # the ring of lo (b - 1, or 0) plus one where hi is taken and is a ring above
    ring = sum(a.astype(jnp.int32) for a in at[1:]) + (up & at[0] & ~at[-1]).astype(
        jnp.int32
    )
    if signed:
        flip = ~(up | at[0])  # -ρ_1: the opposite sector
        sector = sector ^ jnp.where(flip, SIGNED_SECTORS // 2, 0)  # + 4 mod 8
    return ring, sector


def _num_sectors(signed: bool) -> int:
    return SIGNED_SECTORS if signed else UNSIGNED_SECTORS


def code_bits(n_rings: int, signed: bool) -> int:
    """Bits per pair code for ``n_rings`` rings (3 or 4 for the shipped codecs)."""
    return int(math.log2(n_rings * _num_sectors(signed)))


def encode_groups_with(
    xg: jax.Array,
    rings: jax.Array,
    *,
    signed: bool,
    scale_dtype: Any = jnp.bfloat16,
    noise: Any = None,
    planes: bool = False,
) -> tuple[Any, jax.Array]:
    """Encodes ``(..., G)`` groups with an explicit codebook (kernel entry point).

    Only the last axis is sliced; leading axes are untouched, so a kernel can
    call it on any block of groups.

    Args:
      xg: float ``(..., G)`` groups, ``G`` a multiple of 16, or their two
        halves ``[(..., G/2), (..., G/2)]`` (`base.halves`: a kernel's parts;
        the pairs' two coordinates, so nothing is split).
      rings: float32 ``(R,)`` ring radii (`PolarCodec.codebook`).
      signed: signed (8 sectors) or unsigned (2 sectors in the first quadrant;
        negatives are treated as 0).
      scale_dtype: dtype of the stored scales (rounded up to it).
      noise: ``None`` for the deterministic rules (signed: exact nearest;
        unsigned: radial ceiling), or uint32 random bits ``(..., G/2)``, one
        word per pair, for stochastic rounding (`assign_stochastic`).
        Signed stochastic groups are scaled by the largest
        ``α + β`` instead of the largest radius, so every pair is in reach.
      planes: return the codes as the list of `base.pack_planes` planes (a
        kernel stores them separately, and packs them as a kernel can)
        instead of their concatenation.

    Returns:
      ``(codes, scales)``: uint8 ``(..., packed_bytes)`` planar codes (or
      their planes) and ``(..., 1)`` scales in ``scale_dtype``.
    """
    parts = list(xg) if isinstance(xg, (list, tuple)) else [xg]
    parts = [jnp.asarray(x, jnp.float32) for x in parts]
    if not signed:  # whole groups: clipped before the split, as in format 2
        parts = [jnp.maximum(x, 0.0) for x in parts]
    a, b = base.parts_of(parts, 2)
    rings = ring_values(rings)
    code, stored = _encode_pairs(a, b, rings, signed, scale_dtype, noise)
    bits = code_bits(len(rings), signed)
    if planes:
        return base.pack_planes([code], bits, kernel=True), stored
    return base.pack_codes(code, bits), stored


def _encode_pairs(
    a: jax.Array,
    b: jax.Array,
    rings: Any,
    signed: bool,
    scale_dtype: Any,
    words: Any,
) -> tuple[jax.Array, jax.Array]:
    """Codes of a group's pairs ``(a, b)``, and the group's stored scale.

    ``rings``: `ring_values`' list; ``words``: the pairs' random words, or
    ``None`` (deterministic rounding).
    """
    stochastic = words is not None
    if signed:  # folded once: scaling by a positive number commutes with it
        x, y, axis, diag = fold_octant(a, b)
        # stochastic: every pair's α + β must reach <= 1
        extent = signed_span(x, y) if stochastic else _folded_hypot(x, y)
    else:
        extent = safe_hypot(a, b)
    absmax = jnp.max(extent, axis=-1, keepdims=True)
    stored, divisor = base.safe_scale(absmax, scale_dtype)
    inv = 1.0 / divisor  # one division per group
    if signed:
        scaled = (x * inv, y * inv, axis, diag)
        if stochastic:
            ring, sector = _assign_stochastic_folded(scaled, words, rings)
        else:
            ring, sector, _ = _assign_folded(scaled, rings)
    elif stochastic:
        ring, sector = assign_stochastic(a * inv, b * inv, words, rings, signed=False)
    else:
        ring, sector, _ = assign(a * inv, b * inv, rings, signed=False)
    return ring * _num_sectors(signed) + sector, stored


def decode_groups_with(
    codes: Any,
    scales: jax.Array,
    rings: jax.Array,
    *,
    signed: bool,
    halves: bool = False,
    tables: Any = None,
) -> Any:
    """Decodes ``(..., bytes)`` codes and ``(..., 1)`` scales to ``(..., G)``.

    Args:
      codes: uint8 planar codes from `encode_groups_with`, or the list of
        their planes (``planes=True``: a kernel's, unpacked as a kernel
        can); any bytes are valid.
      scales: ``(..., 1)`` group scales.
      rings: float32 ``(R,)`` ring radii, the same as at encoding.
      signed: which codebook.
      halves: return the group's two halves (the pairs' coordinates, a
        kernel's parts) instead of their concatenation.
      tables: `code_tables` of ``rings`` (a kernel passes its input refs);
        ``None``: built here.

    Returns:
      float32 ``(..., G)`` (or its two halves); zeros where
      the scale is 0; for unsigned codecs every value is > 0 where the scale
      is > 0.
    """
    rings = ring_values(rings)
    bits = code_bits(len(rings), signed)
    if tables is None:
        tables = code_tables(jnp.stack(rings), signed)
    if isinstance(codes, (list, tuple)):
        code = base.unpack_planes(codes, bits, kernel=True)
    else:
        code = base.unpack_codes(codes, bits, codes.shape[-1] * 8 // bits)
    code = code.astype(jnp.int32)  # < S·R: every table read is in range
    rho, cos_s, sin_s = (base.take(t, code, in_range=True) for t in tables)
    scale = scales.astype(jnp.float32)  # traced where format 2's graph has it
    radius = rho * scale  # one order of products, the same under jit and eager
    halves_out = [radius * cos_s, radius * sin_s]
    # Whole groups keep the jnp graph of format 2 (an equal but reordered
    # graph can change XLA's fusion, and so the low bits of the update).
    out = halves_out if halves else base.concat_last(halves_out)
    if not signed:  # never decode to 0 (nor flush to 0) where the scale is > 0
        floor = jnp.where(scale > 0, _TINY, 0.0)
        out = (
            [jnp.maximum(x, floor) for x in out] if halves else jnp.maximum(out, floor)
        )
    return out


@dataclasses.dataclass(frozen=True)
class PolarCodec(base.Codec):
    """2D polar codec (see the module docstring for the layout and the rules).

    Attributes:
      bits: bits per element of the codes, 2 or 1.5 (4 or 3 bits per pair).
      signed: signed (first moment) or unsigned (second moment) codebook.
      rings: normalised ring radii, strictly increasing in (0, 1].
      group_size: elements per group (one scale each), a multiple of 16.
      scale_dtype_name: ``"bfloat16"`` or ``"float32"``.
      rounding: ``"nearest"`` (deterministic rules) or ``"stochastic"``.
    """

    bits: float = 2
    signed: bool = True
    rings: tuple[float, ...] = SIGNED_RINGS[2]
    group_size: int = 64
    scale_dtype_name: str = "bfloat16"
    rounding: str = "nearest"

    @property
    def name(self) -> str:
        """E.g. ``"polar-2b-signed"``; non-default settings are appended."""
        bits = "1.5" if self.bits == 1.5 else "2"
        out = f"polar-{bits}b-{'signed' if self.signed else 'unsigned'}"
        if self.group_size != 64:
            out += f"-g{self.group_size}"
        if self.scale_dtype_name != "bfloat16":
            out += "-f32"
        if self.rings != _default_rings(self.bits, self.signed, self.rounding):
            out += "-r" + ",".join(f"{r:.6g}" for r in self.rings)
        if self.rounding == "stochastic":
            out += "-sr"
        return out

    @property
    def stochastic(self) -> bool:
        """Whether encoding rounds stochastically (``rounding="stochastic"``)."""
        return self.rounding == "stochastic"

    @property
    def bytes_per_group(self) -> int:
        """Code bytes per group: ``G/2`` pair codes of 3 or 4 bits."""
        return base.packed_bytes(self.group_size // 2, self.code_bits)

    @property
    def code_bits(self) -> int:
        """Bits per pair code: 4 at 2 bits/element, 3 at 1.5."""
        return code_bits(len(self.rings), self.signed)

    @property
    def scale_dtype(self) -> Any:
        """The dtype of the stored scales."""
        return _SCALE_DTYPES[self.scale_dtype_name]

    def codebook(self) -> jax.Array:
        """The ring radii as a float32 ``(R,)`` array, for the group functions."""
        return jnp.asarray(self.rings, jnp.float32)

    def codewords(self) -> jax.Array:
        """All ``S·R`` normalised codewords, float32 ``(S·R, 2)``, index = code."""
        cos_t, sin_t = _sector_cos_sin(self.signed)
        pts = [
            (r * c, r * s)
            for r in self.rings
            for c, s in zip(cos_t, sin_t, strict=True)
        ]
        return jnp.asarray(pts, jnp.float32)

    def encode_groups(
        self, xg: jax.Array, seed: Any = None
    ) -> tuple[jax.Array, jax.Array]:
        """Encodes ``(..., G)`` groups; see `encode_groups_with`.

        A stochastic codec draws one uint32 word per pair from the stream
        ``seed`` (`base.stream_seed`; ``None`` is stream 0) from its group's
        row-major position in the group grid (`base.group_noise`).
        """
        noise = base.group_noise(xg, seed) if self.stochastic else None
        return encode_groups_with(
            xg,
            self.codebook(),
            signed=self.signed,
            scale_dtype=self.scale_dtype,
            noise=noise,
        )

    def decode_groups(self, codes: jax.Array, scales: jax.Array) -> jax.Array:
        """Decodes groups; see `decode_groups_with`."""
        return decode_groups_with(codes, scales, self.codebook(), signed=self.signed)

    def code_planes(self) -> list[int]:
        """Bytes of each code plane of one group (`base.pack_planes`)."""
        bits = code_bits(len(self.rings), self.signed)
        return base.plane_bytes(self.group_size // 2, bits)

    def kernel_tables(self) -> tuple[np.ndarray, ...]:
        """The arrays a kernel takes as inputs: the rings, then `code_tables`."""
        return (
            np.asarray(self.rings, np.float32),
            *code_tables(self.rings, self.signed),
        )

    def kernel_columns(self) -> list[np.ndarray]:
        """The kernel's parts of a group: its two halves (`base.halves`)."""
        return base.halves(self.group_size)

    def kernel_decode(
        self, planes: list[Any], scales: Any, tables: Any
    ) -> list[jax.Array]:
        """`decode_groups_with` on code planes to the group's halves."""
        rings = [tables[0][k] for k in range(len(self.rings))]
        return decode_groups_with(
            planes,
            scales,
            rings,
            signed=self.signed,
            halves=True,
            tables=tables[1:],
        )

    def kernel_encode(
        self, x: list[jax.Array], tables: Any, noise: Any
    ) -> tuple[list[jax.Array], jax.Array]:
        """`encode_groups_with` of the halves to code planes (``noise``: SR bits)."""
        rings = [tables[0][k] for k in range(len(self.rings))]
        return encode_groups_with(
            x,
            rings,
            signed=self.signed,
            scale_dtype=self.scale_dtype,
            noise=noise if self.stochastic else None,
            planes=True,
        )


def _default_rings(
    bits: float, signed: bool, rounding: str = "nearest"
) -> tuple[float, ...]:
    if signed and rounding == "stochastic":
        return SIGNED_RINGS_STOCHASTIC[bits]
    return (SIGNED_RINGS if signed else UNSIGNED_RINGS)[bits]


def polar(
    bits: float = 2,
    signed: bool = True,
    rings: Sequence[float] | None = None,
    group_size: int = 64,
    *,
    scale_dtype: Any = jnp.bfloat16,
    rounding: str = "nearest",
) -> PolarCodec:
    r"""2D polar codec at 2 or 1.5 bits per element (2.25 / 1.75 all-in).

    Pairs ``(x[j], x[j + G/2])`` of each group of ``G`` elements are coded as
    one point of a polar codebook: 8 sectors times 1 or 2 rings for signed
    states (exact nearest codeword), 2 first-quadrant sectors times 4 or 8
    rings for unsigned states (radial ceiling rule: ``v̂ >= v/2`` always, never
    0). One scale per group: the largest pair radius, rounded up to
    ``scale_dtype``.

    Args:
      bits: code bits per element, ``2`` or ``1.5``.
      signed: ``True`` for signed states (Adam's first moment), ``False`` for
        non-negative ones (the second moment).
      rings: normalised ring radii, strictly increasing in (0, 1]; ``None``
        takes the defaults: signed 1.5 bits ``(0.40,)``, 2 bits ``(0.14,
        0.53)`` (the published values); unsigned, measured on real Adam
        states, ``(0.238, 0.449, 0.68, 1.0)`` and ``(0.086, 0.214, 0.321,
        0.425, 0.533, 0.655, 0.805, 1.0)``. A signed codec takes ``bits``
        times 1 ring (1 or 2), an unsigned one ``2**(2·bits) / 2`` rings (4 or
        8) ending at 1.0. Fit them to your states with `calibrate`.
      group_size: elements per group, a positive multiple of 16 (the ``G/2``
        pair codes must fill whole bytes of each bit plane).
      scale_dtype: ``jnp.bfloat16`` (default, 2 bytes per group) or
        ``jnp.float32``.
      rounding: ``"nearest"``: the deterministic rules above; or
        ``"stochastic"``: unbiased stochastic rounding (`assign_stochastic`)
        from a counter-based random stream selected by ``encode``'s ``seed``
        (the optimizers pass their step count, leaf and moment), so an
        exponential moving average of coded values neither stalls nor
        ratchets. Same format and decoder; signed default rings ``(0.3,
        0.9)`` at 2 bits and ``(0.8,)`` at 1.5.

    Returns:
      A frozen, hashable `PolarCodec`.

    Raises:
      ValueError: an argument out of its accepted range.
      TypeError: ``signed`` not a bool, ``group_size`` not an int.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax_lowbit as lowbit
      >>> codec = lowbit.codecs.polar(bits=2)
      >>> codec.name, codec.rings, codec.bits_per_element
      ('polar-2b-signed', (0.14, 0.53), 2.25)
      >>> lowbit.codecs.polar(bits=1.5).bits_per_element
      1.75
      >>> x = jnp.zeros(64).at[32].set(5.0)  # pair 0 is (0, 5): scale 5
      >>> y = codec.decode(codec.encode(x))  # (0, 5) -> 5 * 0.53 at 90 degrees
      >>> print(f"{float(y[0]):.2f} {float(y[32]):.2f} {float(y[1]):.2f}")
      0.00 2.65 0.70
      >>> v = lowbit.codecs.polar(bits=2, signed=False)
      >>> bool((v.decode(v.encode(jnp.full(64, 4.0))) >= 2.0).all())
      True

    References:
      `2D Quantization for Ultra-low-bit Optimizers
      <https://openreview.net/forum?id=kJLRccGu9K>`_, ICLR 2026 submission
      (withdrawn), 2025. Where we differ: pairs ``(x[j], x[j+G/2])``, bf16
      scales rounded up, and a measured unsigned codebook (module docstring).
    """
    _checks.one_of("bits", bits, (1.5, 2), hint="for 4 bits use blockwise4.")
    _checks.is_bool("signed", signed)
    signed = bool(signed)
    _checks.positive_int("group_size", group_size)
    _checks.divisible(
        "group_size", int(group_size), "16 (pair codes must fill whole bytes)", 16
    )
    try:
        dtype_name = jnp.dtype(scale_dtype).name
    except TypeError:
        dtype_name = repr(scale_dtype)
    _checks.one_of("scale_dtype", dtype_name, tuple(_SCALE_DTYPES))
    _checks.one_of("rounding", rounding, ROUNDINGS)
    bits = 1.5 if bits == 1.5 else 2
    rings = _default_rings(bits, signed, rounding) if rings is None else rings
    rings = check_rings(rings, bits, signed)
    return PolarCodec(
        bits=bits,
        signed=signed,
        rings=rings,
        group_size=int(group_size),
        scale_dtype_name=dtype_name,
        rounding=rounding,
    )


def check_rings(rings: Sequence[float], bits: float, signed: bool) -> tuple[float, ...]:
    """Validates ring radii for a codec and returns them as a tuple of floats.

    Args:
      rings: candidate radii.
      bits: 2 or 1.5.
      signed: which codebook.

    Returns:
      ``tuple(float(r) for r in rings)``.

    Raises:
      ValueError: not strictly increasing in (0, 1], wrong count, or (unsigned)
        not ending at 1.0.
    """
    try:
        rings = tuple(rings)
    except TypeError as e:
        raise TypeError(
            f"rings must be a sequence of radii in (0, 1], got {rings!r}."
        ) from e
    _checks.increasing_in_open_unit("rings", rings)
    rings = tuple(float(r) for r in rings)
    n_codes = 2 ** round(2 * bits)
    want = n_codes // _num_sectors(signed)
    kind = "signed" if signed else "unsigned"
    if len(rings) != want:
        raise ValueError(
            f"rings must hold {want} radii for a {kind} codec at {bits} bits "
            f"({n_codes} codes = {_num_sectors(signed)} sectors x {want} rings), "
            f"got {len(rings)}: {rings!r}."
        )
    if not signed and rings[-1] != 1.0:
        raise ValueError(
            f"rings of an unsigned codec must end at 1.0 (the ceiling rule needs a "
            f"ring at the group scale), got {rings!r}."
        )
    return rings
