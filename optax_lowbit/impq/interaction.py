"""The interaction matrix: covariance of blocks' marginal contributions.

``C = cov(delta)`` over the sampled permutations, where ``delta[m, l]`` is
block ``l``'s marginal contribution in permutation ``m`` (`spqe.SPQEResult`).
``C[l, k] > 0`` means blocks ``l`` and ``k`` tend to matter together, so
quantizing both hard costs more than the sum of their parts (the allocation's
pair term). With ``M`` permutations (~50) and ``L`` blocks (30) the raw
covariance is noisy and of rank ``<= M - 1``, so it is shrunk:

* ``shrinkage=alpha`` (default 0.5): diagonal shrinkage,
  ``C = (1 - alpha) * S + alpha * diag(S)``, i.e. off-diagonal entries are
  scaled by ``1 - alpha`` and variances kept (``S``: unbiased covariance).
* ``shrinkage="ledoit-wolf"``: Ledoit and Wolf's optimal shrinkage towards
  ``mu * I`` (``mu`` the mean variance), ``C = (1 - d) * S + d * mu * I``
  with ``S`` the maximum-likelihood covariance and ``d`` estimated from the
  data (the same estimator as ``sklearn.covariance.ledoit_wolf``).

Examples:
  >>> import numpy as np
  >>> d = np.random.default_rng(0).normal(size=(50, 4))
  >>> c = interaction_matrix(d, shrinkage=0.5)
  >>> bool(np.allclose(np.diag(c), np.var(d, axis=0, ddof=1)))
  True

References:
  `IMPQ (later renamed CoopQ), arXiv 2509.15455
  <https://arxiv.org/abs/2509.15455>`_, 2025. Ledoit and Wolf, `A well-conditioned
  estimator for large-dimensional covariance matrices
  <https://doi.org/10.1016/S0047-259X(03)00096-4>`_, 2004.
"""

from __future__ import annotations

import numpy as np


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Ledoit-Wolf shrunk covariance of the rows of ``x`` ``(n, p)``.

    Args:
      x: samples in rows.

    Returns:
      ``(covariance, shrinkage)``.
    """
    x = np.asarray(x, np.float64)
    n, p = x.shape
    xc = x - x.mean(0)
    s = xc.T @ xc / n
    mu = np.trace(s) / p
    delta2 = np.sum((s - mu * np.eye(p)) ** 2) / p
    beta2 = sum(np.sum((np.outer(r, r) - s) ** 2) for r in xc) / (n * n * p)
    beta2 = min(beta2, delta2)
    shrink = 0.0 if delta2 == 0 else beta2 / delta2
    return (1 - shrink) * s + shrink * mu * np.eye(p), float(shrink)


def interaction_matrix(
    deltas: np.ndarray, *, shrinkage: float | str = 0.5
) -> np.ndarray:
    """Shrunk covariance of marginal contributions.

    Args:
      deltas: ``(M, L)`` marginal contributions, one row per permutation.
      shrinkage: ``alpha`` in ``[0, 1]`` for diagonal shrinkage, or
        ``"ledoit-wolf"``.

    Returns:
      ``(L, L)`` symmetric matrix ``C``.
    """
    deltas = np.asarray(deltas, np.float64)
    if deltas.ndim != 2 or deltas.shape[0] < 2:
        raise ValueError(
            f"deltas must be (M, L) with M >= 2 permutations, got {deltas.shape}."
        )
    if isinstance(shrinkage, str):
        if shrinkage != "ledoit-wolf":
            raise ValueError(
                f"shrinkage must be a number in [0, 1] or 'ledoit-wolf', got "
                f"{shrinkage!r}."
            )
        return ledoit_wolf(deltas)[0]
    if isinstance(shrinkage, bool) or not 0.0 <= float(shrinkage) <= 1.0:
        raise ValueError(
            f"shrinkage must be a number in [0, 1] or 'ledoit-wolf', got {shrinkage!r}."
        )
    s = np.cov(deltas, rowvar=False, ddof=1)
    s = np.atleast_2d(s)
    alpha = float(shrinkage)
    return (1 - alpha) * s + alpha * np.diag(np.diag(s))
