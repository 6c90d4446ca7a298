"""Fits the rings of a polar codec to captured optimizer states.

Both polar rules choose the sector without looking at the rings (the nearest
sector angle), and the squared error of a pair splits as
``|z − ρe^{iφ}|² = (ρ − p)² + r² − p²`` with ``p`` the radius projected on the
sector direction. So fitting the rings is a 1D problem on the projected radii
``p`` of the real data (normalised by the codec's own group scales), each
weighted by its group's squared scale ``s²`` so that the objective is the MSE
of the decoded values in their own units:

* signed codecs (nearest ring): Lloyd's algorithm, assign each ``p`` to the
  nearest ring, move each ring to the mean ``p`` of its members, repeat until
  no ring moves more than ``tol``. This is minimum MSE (a local optimum that,
  in 1D with a log-concave density, is the global one).
* unsigned codecs (smallest ring ``>= p``, over-estimate-safe): a Lloyd mean
  would put a ring below some of its members and break the ceiling. Instead,
  the exact minimum-MSE *ceiling* quantizer is found by dynamic programming
  over a histogram of ``p`` (``bins`` bins on [0, 1]); rings sit on bin upper
  edges (so they round up, never down), the top ring stays 1.0 and every
  ring is > 0.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from optax_lowbit import _checks
from optax_lowbit.codecs import base
from optax_lowbit.codecs.polar import PolarCodec, assign, polar, safe_hypot


@functools.partial(jax.jit, static_argnames=("group_size", "signed", "scale_dtype"))
def _projected(x, *, group_size, signed, scale_dtype):
    xg = base.to_groups(x, group_size)
    if not signed:
        xg = jnp.maximum(xg, 0.0)
    half = group_size // 2
    a, b = xg[..., :half], xg[..., half:]
    stored, divisor = base.safe_scale(
        jnp.max(safe_hypot(a, b), axis=-1, keepdims=True), scale_dtype
    )
    # The sector, hence p, does not depend on the rings: any rings will do.
    rings = jnp.ones((1,), jnp.float32)
    _, _, p = assign(a / divisor, b / divisor, rings, signed=signed)
    return p, jnp.broadcast_to(stored.astype(jnp.float32), p.shape)


def projected_radii(
    codec: PolarCodec, x: jnp.ndarray, *, with_scales: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Normalised projected radii ``p`` of every pair of ``x`` under ``codec``.

    Groups whose scale is 0 (all zero) are left out.

    Args:
      codec: a `PolarCodec`.
      x: float array of any shape.
      with_scales: also return each pair's group scale.

    Returns:
      float64 numpy vector of the projected radii, in [0, 1] (and, with
      ``with_scales``, the matching group scales).
    """
    p, scale = _projected(
        jnp.asarray(x, jnp.float32),
        group_size=codec.group_size,
        signed=codec.signed,
        scale_dtype=codec.scale_dtype,
    )
    p, scale = np.asarray(p, np.float64).ravel(), np.asarray(scale, np.float64).ravel()
    keep = scale > 0
    return (p[keep], scale[keep]) if with_scales else p[keep]


def _lloyd(
    p: np.ndarray, weight: np.ndarray, rings: np.ndarray, iters: int, tol: float
) -> np.ndarray:
    """Weighted 1D Lloyd iterations with nearest-ring assignment."""
    rings = rings.astype(np.float64).copy()
    for _ in range(iters):
        mids = 0.5 * (rings[1:] + rings[:-1])
        idx = np.searchsorted(mids, p, side="left")
        count = np.bincount(idx, weights=weight, minlength=len(rings))
        total = np.bincount(idx, weights=weight * p, minlength=len(rings))
        new = np.where(count > 0, total / np.where(count > 0, count, 1.0), rings)
        new = np.sort(new)
        moved = float(np.max(np.abs(new - rings)))
        rings = new
        if moved < tol:
            break
    return rings


def _ceiling_dp(
    p: np.ndarray, weight: np.ndarray, n_rings: int, bins: int
) -> np.ndarray:
    """Exact minimum-MSE ceiling quantizer on a histogram, top ring at 1.0."""
    edges = np.linspace(0.0, 1.0, bins + 1)[1:]  # ring candidates: upper edges
    p = np.clip(p, 0.0, 1.0)
    idx = np.minimum(np.ceil(p * bins).astype(np.int64) - 1, bins - 1)
    idx = np.maximum(idx, 0)  # bin j holds p in (j/bins, (j+1)/bins]

    def cum(w):
        return np.concatenate([[0.0], np.cumsum(np.bincount(idx, w, minlength=bins))])

    n, s1, s2 = cum(weight), cum(weight * p), cum(weight * p * p)
    i = np.arange(bins + 1)[:, None]
    j = np.arange(bins + 1)[None, :]
    c = np.concatenate([[0.0], edges])[None, :]  # bins [i, j) map to edges[j-1]
    with np.errstate(invalid="ignore"):
        cost = (n[j] - n[i]) * c * c - 2 * c * (s1[j] - s1[i]) + (s2[j] - s2[i])
    cost = np.where(i < j, cost, np.inf)
    best = np.full(bins + 1, np.inf)
    best[0] = 0.0
    back = []
    for _ in range(n_rings):
        total = best[:, None] + cost
        arg = np.argmin(total, axis=0)
        back.append(arg)
        best = total[arg, np.arange(bins + 1)]
    out, end = [], bins
    for arg in reversed(back):
        out.append(edges[end - 1])
        end = int(arg[end])
    return np.array(sorted(out))


def calibrate(
    codec: PolarCodec,
    samples: jnp.ndarray | Sequence[jnp.ndarray],
    *,
    iters: int = 100,
    tol: float = 1e-7,
    bins: int = 1024,
) -> PolarCodec:
    """Fits a polar codec's rings to captured real states, by minimum MSE.

    Args:
      codec: the `PolarCodec` to fit (its bits, signedness, group size and
        scale dtype are kept).
      samples: one float array or a sequence of float arrays (e.g. the
        ``mu`` or ``nu`` leaves of an ``optax.adam`` state); encoded group by
        group exactly as the codec would.
      iters: most Lloyd iterations (signed codecs).
      tol: Lloyd stops once no ring moves more than this.
      bins: histogram resolution of the exact ceiling fit (unsigned codecs).

    Returns:
      A new `PolarCodec` with the fitted ``rings``.

    Raises:
      TypeError: ``codec`` is not a `PolarCodec`, or a sample is not a float
        array.
      ValueError: no samples, or every sample is empty or all zeros.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import optax_lowbit as lowbit
      >>> x = jax.random.t(jax.random.key(0), 3.0, (64, 1024))
      >>> fitted = lowbit.codecs.calibrate(lowbit.codecs.polar(bits=1.5), [x])
      >>> round(fitted.rings[0], 2)  # the published ring is 0.40
      0.19
    """
    if not isinstance(codec, PolarCodec):
        raise TypeError(
            "codec must be a PolarCodec (from lowbit.codecs.polar), got "
            f"{type(codec).__name__}."
        )
    _checks.positive_int("iters", iters)
    _checks.positive_int("bins", bins)
    _checks.non_negative("tol", tol)
    if hasattr(samples, "dtype") and hasattr(samples, "shape"):
        samples = [samples]
    try:
        samples = list(samples)
    except TypeError as e:
        raise TypeError(
            f"samples must be a float array or a sequence of them, got {samples!r}."
        ) from e
    if not samples:
        raise ValueError("samples must hold at least one array, got an empty list.")
    radii, weights = [], []
    for k, x in enumerate(samples):
        _checks.float_array(f"samples[{k}]", x)
        if np.size(x):
            p_k, scale_k = projected_radii(codec, x, with_scales=True)
            radii.append(p_k)
            weights.append(scale_k * scale_k)
    p = np.concatenate(radii) if radii else np.zeros(0)
    weight = np.concatenate(weights) if weights else np.zeros(0)
    weight = weight / weight.max() if weight.size else weight
    if p.size == 0:
        raise ValueError(
            "samples must hold non-zero values to fit rings to; every sample was "
            "empty or all zeros."
        )
    if codec.signed:
        rings = _lloyd(p, weight, np.asarray(codec.rings), iters, tol)
        rings = np.clip(rings, 1e-4, 1.0)
        for k in range(1, len(rings)):  # keep strictly increasing
            rings[k] = max(rings[k], np.nextafter(rings[k - 1], 2.0))
    else:
        rings = _ceiling_dp(p, weight, len(codec.rings), bins)
    return polar(
        bits=codec.bits,
        signed=codec.signed,
        rings=tuple(float(r) for r in rings),
        group_size=codec.group_size,
        scale_dtype=codec.scale_dtype,
    )
