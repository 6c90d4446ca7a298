"""The bit-width game at the operating point: weighted Banzhaf values and pairs.

For a code-bit budget ``B`` strictly between two widths, the **operating
point** is the pair of widths around it, ``lo < B < hi`` (the nearest
choices below and above; a budget on a width ``w`` takes its two neighbours,
so 3.0 with widths 2, 3, 4 plays 2 against 4), and the fraction
``p = (B - lo) / (hi - lo)`` of blocks the budget can afford at ``hi``. A
coalition ``S`` is the set of blocks at ``hi``; the others are at ``lo``::

    v(S) = - mean_tokens KL(reference || model with S at hi, the rest at lo)

Coalitions are sampled where the budget puts the model: every block is in
``S`` independently with probability ``p`` (so ``S`` holds ``p L`` blocks on
average, as an allocation at ``B`` does). The expected marginal contribution
under this sampling is the **weighted Banzhaf value** of weight ``p`` (a
semivalue; ``p = 1/2`` is the Banzhaf value)::

    phi_l = E_{S ~ Bernoulli(p)^(L-1)} [v(S + l) - v(S)]

and, instead of a covariance, the **pairwise interactions** come from a
quadratic surrogate of the game fitted by least squares on the sampled
coalitions (``x`` the 0/1 indicator of ``S``)::

    v(x) ~ c + sum_l a_l x_l + sum_{l<k} b_lk x_l x_k

The least-squares quadratic under the product measure ``Bernoulli(p)^L`` is
the faithful second-order expansion whose coefficients are the weighted
Banzhaf interaction indices (Hammer and Holzman; Faith-Shap and KernelSHAP-IQ
fit the Shapley-weighted analogue). Of the surrogate, ``phi_l = a_l + p
sum_k b_lk`` and the interaction of ``l`` and ``k`` is ``b_lk``, real and of
either sign (no zero-sum constraint). `allocation_terms` turns it into the
MILP's ``J`` with ``e_l = 1`` at ``lo`` and 0 at ``hi``: ``J(e) = v(all hi) -
v(x)``, the surrogate exactly; `banzhaf_terms` keeps only the values (the
zero-interaction ablation).

Examples:
  >>> import numpy as np
  >>> op = operating_point(2.25, (2, 3, 4))
  >>> (op.lo, op.hi, op.p)
  (2, 3, 0.25)
  >>> rng = np.random.default_rng(0)
  >>> x = sample_coalitions(4, 400, 0.5, rng)
  >>> v = x @ [1.0, 2.0, 3.0, 4.0] + 0.5 * x[:, 0] * x[:, 1]
  >>> s = fit_quadratic(x, v)
  >>> np.round(s.pairs[0, 1], 6).item(), np.round(banzhaf(s, 0.5), 6).tolist()
  (0.5, [1.25, 2.25, 3.0, 4.0])

References:
  Hammer and Holzman, `Approximations of pseudo-Boolean functions;
  applications to game theory <https://doi.org/10.1007/BF01415958>`_, 1992.
  Tsai, Yeh and Ravikumar, `Faith-Shap: The Faithful Shapley Interaction
  Index <https://jmlr.org/papers/v24/22-0202.html>`_, 2023. Fumagalli et al,
  `KernelSHAP-IQ: Weighted Least-Square Optimization for Shapley Interactions
  <https://arxiv.org/abs/2405.10852>`_, 2024. Li and Yu, `Robust Data
  Valuation with Weighted Banzhaf Values <https://arxiv.org/abs/2310.00607>`_,
  2023. Wang and Jia, `Data Banzhaf <https://arxiv.org/abs/2205.15466>`_,
  2023 (the maximum-sample-reuse estimator of `msr_values`).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Sequence

import numpy as np
import scipy.stats

from optax_lowbit.impq import allocate

Callback = Callable[[int, int], None]

#: ridge penalties on the pair terms tried by `play` (chosen on held-out R^2).
RIDGES = (0.0, 1e-3, 1e-2, 1e-1, 1.0)


@dataclasses.dataclass(frozen=True)
class OperatingPoint:
    """The two widths around a budget and the share of blocks at the higher.

    Attributes:
      lo: the width below the budget.
      hi: the width above it.
      p: ``(budget - lo) / (hi - lo)``, in ``(0, 1)``.
    """

    lo: int
    hi: int
    p: float


def operating_point(avg_bits: float, bit_choices: Sequence[int]) -> OperatingPoint:
    """The widths ``lo < avg_bits < hi`` nearest to a code-bit budget, and ``p``.

    Args:
      avg_bits: code bits per weight, strictly between ``min(bit_choices)``
        and ``max(bit_choices)``.
      bit_choices: the allowed widths.

    Returns:
      The `OperatingPoint`.

    Raises:
      ValueError: for a budget at or outside the extreme widths (every block
        at that width: there is nothing to play), naming the range.
    """
    choices = allocate.check_bit_choices(bit_choices)
    avg_bits = allocate.check_budget(avg_bits, choices)
    if not choices[0] < avg_bits < choices[-1]:
        raise ValueError(
            f"avg_bits={avg_bits:g} leaves no choice (every block at "
            f"{round(avg_bits)} bits); a game needs {choices[0]} < avg_bits < "
            f"{choices[-1]}."
        )
    lo = max(b for b in choices if b < avg_bits)
    hi = min(b for b in choices if b > avg_bits)
    return OperatingPoint(lo, hi, (avg_bits - lo) / (hi - lo))


def _check_p(p: float) -> float:
    if isinstance(p, bool) or not 0.0 < float(p) < 1.0:
        raise ValueError(f"p must be a number in (0, 1), got {p!r}.")
    return float(p)


def sample_coalitions(
    n_players: int, n_samples: int, p: float, rng: np.random.Generator
) -> np.ndarray:
    """Coalitions with every player in independently with probability ``p``.

    Args:
      n_players: L.
      n_samples: coalitions to draw (>= 1).
      p: inclusion probability in ``(0, 1)``.
      rng: the generator.

    Returns:
      ``(n_samples, n_players)`` bool membership.
    """
    p = _check_p(p)
    if isinstance(n_samples, bool) or not isinstance(n_samples, int | np.integer):
        raise TypeError(f"n_samples must be an int >= 1, got {n_samples!r}.")
    if n_samples < 1:
        raise ValueError(f"n_samples must be an int >= 1, got {n_samples}.")
    return rng.random((n_samples, n_players)) < p


def quadratic_features(x: np.ndarray) -> np.ndarray:
    """``[1, x_l, x_l x_k (l < k)]`` of 0/1 coalitions ``(M, L)``.

    Returns:
      ``(M, 1 + L + L (L - 1) / 2)`` float64, pairs in `itertools.combinations`
      order.
    """
    x = np.asarray(x, np.float64)
    i, k = np.triu_indices(x.shape[1], 1)
    return np.concatenate([np.ones((len(x), 1)), x, x[:, i] * x[:, k]], 1)


@dataclasses.dataclass(frozen=True)
class Surrogate:
    """``v(x) ~ intercept + linear @ x + sum_{l<k} pairs[l, k] x_l x_k``.

    Attributes:
      intercept: ``c``, the value of the empty coalition.
      linear: ``(L,)`` ``a``.
      pairs: ``(L, L)`` symmetric ``b`` with a zero diagonal.
    """

    intercept: float
    linear: np.ndarray
    pairs: np.ndarray

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The surrogate's value of each row of 0/1 coalitions ``(M, L)``."""
        x = np.asarray(x, np.float64)
        return (
            self.intercept
            + x @ self.linear
            + 0.5 * np.einsum("ml,lk,mk->m", x, self.pairs, x)
        )


def fit_quadratic(x: np.ndarray, values: np.ndarray, ridge: float = 0.0) -> Surrogate:
    """The least-squares quadratic surrogate of sampled coalition values.

    Minimises ``sum_m (v_m - surrogate(x_m))**2 + ridge * M * sum_{l<k}
    b_lk**2``: the pair terms (``L (L - 1) / 2`` of them, 435 for 30 blocks)
    may be shrunk towards the additive game; intercept and linear terms are
    not.

    Args:
      x: ``(M, L)`` 0/1 coalitions, drawn from the measure the fit should be
        faithful under (`sample_coalitions`).
      values: ``(M,)`` their values.
      ridge: the pair terms' penalty (>= 0).

    Returns:
      The `Surrogate` (minimum-norm least squares when features are
      collinear, e.g. fewer samples than ``1 + L + L (L - 1) / 2``).
    """
    if not ridge >= 0.0:
        raise ValueError(f"ridge must be a number >= 0, got {ridge!r}.")
    x = np.asarray(x)
    m, n = x.shape
    feats = quadratic_features(x)
    target = np.asarray(values, np.float64)
    if ridge:
        n_pairs = feats.shape[1] - 1 - n
        penalty = np.zeros((n_pairs, feats.shape[1]))
        penalty[:, 1 + n :] = np.sqrt(ridge * m) * np.eye(n_pairs)
        feats = np.concatenate([feats, penalty])
        target = np.concatenate([target, np.zeros(n_pairs)])
    coef = np.linalg.lstsq(feats, target, rcond=None)[0]
    pairs = np.zeros((n, n))
    pairs[np.triu_indices(n, 1)] = coef[1 + n :]
    return Surrogate(float(coef[0]), coef[1 : 1 + n], pairs + pairs.T)


def banzhaf(surrogate: Surrogate, p: float) -> np.ndarray:
    """Weighted Banzhaf values of the surrogate: ``a_l + p sum_k b_lk``."""
    return surrogate.linear + _check_p(p) * surrogate.pairs.sum(1)


def msr_values(x: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Model-free weighted Banzhaf estimate (maximum sample reuse).

    ``mean v(S | l in S) - mean v(S | l not in S)`` over coalitions drawn with
    `sample_coalitions`: unbiased for the weighted Banzhaf value of the
    sampling ``p``, no surrogate involved (a check of `banzhaf`).

    Returns:
      ``(L,)`` estimates (NaN where a player was always in or always out).
    """
    x = np.asarray(x, bool)
    v = np.asarray(values, np.float64)[:, None]
    n_in, n_out = x.sum(0), (~x).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (v * x).sum(0) / n_in - (v * ~x).sum(0) / n_out


def allocation_terms(surrogate: Surrogate) -> tuple[np.ndarray, np.ndarray]:
    """The surrogate as `allocate.allocate`'s ``(phi, C)`` over ``e = 1 - x``.

    ``J(e) = sum_l phi_l e_l + sum_{l != k} C_lk e_l e_k = v(all hi) - v(1 - e)``
    with ``phi_l = a_l + sum_k b_lk`` (block ``l``'s gain with all others at
    ``hi``) and ``C = -b / 2``.

    Returns:
      ``(phi, C)``.
    """
    return surrogate.linear + surrogate.pairs.sum(1), -surrogate.pairs / 2


def banzhaf_terms(surrogate: Surrogate, p: float) -> tuple[np.ndarray, np.ndarray]:
    """The zero-interaction ablation: ``(banzhaf(surrogate, p), 0)``."""
    n = len(surrogate.linear)
    return banzhaf(surrogate, p), np.zeros((n, n))


def _r2(surrogate: Surrogate, x: np.ndarray, values: np.ndarray) -> float:
    """The coefficient of determination of ``surrogate`` on ``(x, values)``."""
    spread = max(float(np.sum((values - values.mean()) ** 2)), 1e-300)
    return 1.0 - float(np.sum((values - surrogate(x)) ** 2)) / spread


def middle_errors(
    kl_at_mid: float, kl_one_lo: np.ndarray, kl_one_hi: np.ndarray
) -> np.ndarray:
    """Where a width between ``lo`` and ``hi`` sits, measured at the budget.

    A budget on a width ``w`` plays ``w``'s neighbours against each other;
    ``w`` itself enters the MILP through ``e_l(w)``, the share of block
    ``l``'s ``lo -> hi`` gain still missing at ``w``. Measured with every
    block at ``w`` (the operating point of that budget) by moving block ``l``
    alone down to ``lo`` or up to ``hi``::

        e_l(w) = (KL(all w) - KL(l at hi)) / (KL(l at lo) - KL(l at hi))

    clipped to ``[0, 1]`` (0.5 where both moves change nothing), instead of
    the squared weight error, which misjudges how the KL grows at low width.

    Args:
      kl_at_mid: ``KL(all blocks at w)``.
      kl_one_lo: ``(L,)`` ``KL(block l at lo, the others at w)``.
      kl_one_hi: ``(L,)`` ``KL(block l at hi, the others at w)``.

    Returns:
      ``(L,)`` ``e_l(w)`` in ``[0, 1]``.

    Examples:
      >>> middle_errors(1.0, np.array([3.0, 1.0]), np.array([0.5, 1.0])).tolist()
      [0.2, 0.5]
    """
    span = np.asarray(kl_one_lo, np.float64) - np.asarray(kl_one_hi, np.float64)
    top = kl_at_mid - np.asarray(kl_one_hi, np.float64)
    ok = span > 0
    return np.where(ok, np.clip(top / np.where(ok, span, 1.0), 0.0, 1.0), 0.5)


@dataclasses.dataclass(frozen=True)
class GameResult:
    """A played game.

    Attributes:
      point: the `OperatingPoint` (``p`` the sampling probability).
      coalitions: ``(M, L)`` sampled coalitions (bool).
      values: ``(M,)`` their values ``-KL``.
      surrogate: the quadratic surrogate fitted on all samples.
      phi: ``(L,)`` weighted Banzhaf values of the surrogate.
      msr_phi: ``(L,)`` model-free weighted Banzhaf estimates.
      ridge: the pair penalty chosen (`RIDGES`, best held-out R^2).
      heldout_r2: R^2 on the last ``holdout`` share of the samples of a
        surrogate fitted on the others with ``ridge`` (NaN without a
        held-out share; the share also chose the ridge, so it flatters a
        little).
      n_evals: distinct coalitions evaluated.
      wall_s: seconds spent.
    """

    point: OperatingPoint
    coalitions: np.ndarray
    values: np.ndarray
    surrogate: Surrogate
    phi: np.ndarray
    msr_phi: np.ndarray
    ridge: float
    heldout_r2: float
    n_evals: int
    wall_s: float


def play(
    value_fn: Callable[[np.ndarray], np.ndarray],
    n_players: int,
    point: OperatingPoint,
    *,
    n_samples: int = 1000,
    seed: int = 0,
    holdout: float = 0.2,
    ridges: Sequence[float] = RIDGES,
    chunk_size: int = 64,
    callback: Callback | None = None,
) -> GameResult:
    """Samples coalitions at ``point.p``, evaluates them, fits the surrogate.

    Args:
      value_fn: ``value_fn(coalitions (n, L) bool) -> (n,)`` values.
      n_players: L.
      point: the operating point (its ``p`` is the inclusion probability).
      n_samples: coalitions to sample (the issue: >= 1000 per bracket; the
        surrogate has ``1 + L + L (L - 1) / 2`` coefficients).
      seed: sampler seed.
      holdout: share of samples held out to choose the ridge and report the
        surrogate's R^2 (then refitted on all); 0 for none (ridge 0).
      ridges: pair penalties to choose from (`fit_quadratic`).
      chunk_size: coalitions per ``value_fn`` call.
      callback: ``callback(done, total)`` over distinct coalitions.

    Returns:
      A `GameResult`.
    """
    start = time.perf_counter()
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {holdout!r}.")
    x = sample_coalitions(n_players, n_samples, point.p, np.random.default_rng(seed))
    unique, inverse = np.unique(x, axis=0, return_inverse=True)
    vals = np.zeros(len(unique))
    for lo in range(0, len(unique), chunk_size):
        chunk = unique[lo : lo + chunk_size]
        vals[lo : lo + len(chunk)] = np.asarray(value_fn(chunk), np.float64)
        if callback is not None:
            callback(lo + len(chunk), len(unique))
    values = vals[inverse.reshape(-1)]
    n_fit = round(len(x) * (1 - holdout))
    ridge, r2 = 0.0, float("nan")
    if holdout and 0 < n_fit < len(x):
        train, test = slice(0, n_fit), slice(n_fit, None)
        scores = [
            _r2(fit_quadratic(x[train], values[train], a), x[test], values[test])
            for a in ridges
        ]
        best = int(np.argmax(scores))
        ridge, r2 = float(ridges[best]), scores[best]
    surrogate = fit_quadratic(x, values, ridge)
    return GameResult(
        point=point,
        coalitions=x,
        values=values,
        surrogate=surrogate,
        phi=banzhaf(surrogate, point.p),
        msr_phi=msr_values(x, values),
        ridge=ridge,
        heldout_r2=r2,
        n_evals=len(unique),
        wall_s=time.perf_counter() - start,
    )


def rank_agreement(values: Sequence[np.ndarray]) -> float:
    """Mean Spearman rank correlation of block values over pairs of seeds.

    Args:
      values: ``>= 2`` arrays ``(L,)``, one per seed.

    Returns:
      The mean over seed pairs of Spearman's rho (NaN for fewer than 2).
    """
    rhos = [
        float(scipy.stats.spearmanr(a, b).statistic)
        for a, b in itertools.combinations(values, 2)
    ]
    return float(np.mean(rhos)) if rhos else float("nan")
