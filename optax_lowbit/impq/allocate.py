"""Per-block bit allocation: IMPQ's quadratic objective as an exact MILP.

Why over 500 lines: the objective, its monotone form, the MILP and its brute-force
test oracle are one concept (the allocation), half of it docstrings.

Choose ``b_l`` in ``bit_choices`` (default 2, 3, 4, 8) for every block to
minimise::

    J(b) = sum_l phi_l * e_l(b_l) + sum_{l != k} C_lk * e_l(b_l) * e_k(b_k)

subject to the average all-in bits budget (weighted by block size ``n_l``)::

    sum_l n_l * (b_l + 32 / group_size) <= avg_bits * sum_l n_l

``phi`` are the blocks' Shapley values (`spqe`), ``C`` the interaction matrix
(`interaction`; its diagonal is not used) and ``e_l(b)`` a block's
quantization error at ``b`` bits. Our ``e`` (`relative_errors`) is the
**relative weight error**: the summed squared error of block ``l``'s
quantized weights at ``b`` bits divided by that at the lowest choice, so
``e_l(min bits) = 1`` and ``e_l(b)`` shrinks roughly as ``4**-b``. Then
``phi_l * e_l(b)`` reads as "the share of block ``l``'s measured loss (at the
low width) still paid at ``b`` bits". Any ``(L, K)`` table can be passed.

Linearisation: binary ``x_la`` (block ``l`` takes choice ``a``, one per
block) and, for every pair ``l < k`` with a non-zero ``C_lk + C_kl``,
continuous ``y_lkab`` in ``[0, 1]`` standing for ``x_la * x_kb``, tied by the
reformulation-linearisation equalities ``sum_b y_lkab = x_la`` and
``sum_a y_lkab = x_kb`` plus McCormick's ``y_lkab >= x_la + x_kb - 1``. For
binary ``x`` these force ``y_lkab = x_la * x_kb`` exactly, so the program's
optimum is the exact optimum of ``J``.

Estimated ``phi`` and ``C`` can make ``J`` reward *fewer* bits (negative
values, substitute blocks); `monotone_terms` clips and caps them so that
widening a block never raises ``J`` (the pipeline applies it). It is solved by
``scipy.optimize.milp`` (HiGHS); `brute_force` is the oracle for small ``L``.

Examples:
  >>> import numpy as np
  >>> phi = np.array([1.0, 0.1]); c = np.zeros((2, 2))
  >>> e = np.array([[1.0, 0.2, 0.05, 0.0]] * 2)
  >>> allocate(phi, c, e, avg_bits=3.5).bits.tolist()
  [4, 2]

References:
  `IMPQ (later renamed CoopQ), arXiv 2509.15455
  <https://arxiv.org/abs/2509.15455>`_, 2025.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np
import scipy.optimize
import scipy.sparse

from optax_lowbit.impq import quantizer


@dataclasses.dataclass(frozen=True)
class Allocation:
    """A per-block bit allocation.

    Attributes:
      bits: ``(L,)`` bits per block.
      objective: ``J(bits)``.
      avg_bits: the achieved size-weighted average all-in bits.
      status: the solver's status message (``"brute force"`` for the oracle).
      optimal: whether the solver proved optimality.
    """

    bits: np.ndarray
    objective: float
    avg_bits: float
    status: str
    optimal: bool


def check_bit_choices(bit_choices: Sequence[int]) -> tuple[int, ...]:
    """Validates and sorts ``bit_choices`` (a subset of 2, 3, 4, 8)."""
    try:
        choices = tuple(bit_choices)
    except TypeError as err:
        raise TypeError(
            f"bit_choices must be a sequence of ints from "
            f"{quantizer.BIT_CHOICES}, got {bit_choices!r}."
        ) from err
    if not choices:
        raise ValueError(
            f"bit_choices must be a non-empty subset of {quantizer.BIT_CHOICES}."
        )
    for b in choices:
        quantizer.check_bits(b, name="every entry of bit_choices")
    if len(set(choices)) != len(choices):
        raise ValueError(f"bit_choices must not repeat a width, got {choices}.")
    return tuple(sorted(int(b) for b in choices))


def check_budget(
    avg_bits: float,
    bit_choices: Sequence[int],
    group_size: int = quantizer.GROUP_SIZE,
) -> float:
    """Raises ValueError unless an all-in budget is within the feasible range.

    Args:
      avg_bits: average all-in bits per weight.
      bit_choices: the allowed widths.
      group_size: quantizer group size (overhead ``32 / group_size``).

    Returns:
      ``avg_bits`` as a float.
    """
    choices = check_bit_choices(bit_choices)
    if isinstance(avg_bits, bool) or not isinstance(
        avg_bits, int | float | np.integer | np.floating
    ):
        raise TypeError(f"avg_bits must be a number, got {avg_bits!r}.")
    over = 32.0 / group_size
    lo, hi = choices[0] + over, choices[-1] + over
    accepted = f"accepted: {lo:g} <= avg_bits <= {hi:g}"
    if not avg_bits >= lo - 1e-12:  # also catches NaN
        raise ValueError(
            f"avg_bits={avg_bits:g} is below min(bit_choices)+{over:g}={lo:g}; "
            f"{accepted}."
        )
    if avg_bits > hi + 1e-12:
        raise ValueError(
            f"avg_bits={avg_bits:g} is above max(bit_choices)+{over:g}={hi:g} "
            f"(all blocks at {choices[-1]} bits already fit); {accepted}."
        )
    return float(avg_bits)


def relative_errors(
    sse: np.ndarray, widths: Sequence[int], bit_choices: Sequence[int]
) -> np.ndarray:
    """``e_l(b)``: block ``l``'s squared weight error at ``b`` over that at min bits.

    Args:
      sse: ``(L, K)`` summed squared quantization error per block and width
        (`spqe.SelectorForward.sse`).
      widths: the ``K`` widths of ``sse``'s columns.
      bit_choices: the widths to tabulate.

    Returns:
      ``(L, len(bit_choices))``, 1 in the column of ``min(bit_choices)``.
    """
    choices = check_bit_choices(bit_choices)
    cols = [list(widths).index(b) for b in choices]
    table = np.asarray(sse, np.float64)[:, cols]
    base = np.where(table[:, :1] > 0, table[:, :1], 1.0)
    return table / base


def _validate(phi, interactions, errors, bit_choices, sizes):
    choices = check_bit_choices(bit_choices)
    phi = np.asarray(phi, np.float64)
    n = phi.shape[0] if phi.ndim in (1, 2) else -1
    if n < 1 or (phi.ndim == 2 and phi.shape[1] != len(choices)):
        raise ValueError(
            f"phi must be (L,) Shapley values or an (L, len(bit_choices)) = "
            f"(L, {len(choices)}) cost table, got shape {phi.shape}."
        )
    c = np.asarray(interactions, np.float64)
    if c.shape != (n, n):
        raise ValueError(f"interactions must be ({n}, {n}), got {c.shape}.")
    e = np.asarray(errors, np.float64)
    if e.shape != (n, len(choices)):
        raise ValueError(
            f"errors must be (L, len(bit_choices)) = ({n}, {len(choices)}), "
            f"got {e.shape}."
        )
    for name, arr in (("phi", phi), ("interactions", c), ("errors", e)):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} must be finite.")
    w = np.ones(n) if sizes is None else np.asarray(sizes, np.float64)
    if w.shape != (n,) or np.any(w <= 0):
        raise ValueError(f"sizes must be ({n},) positive numbers, got {w}.")
    return choices, phi, c, e, w


def _linear(phi: np.ndarray, e: np.ndarray) -> np.ndarray:
    """The ``(L, K)`` linear cost: ``phi_l * e_l(b)``, or ``phi`` if a table."""
    return phi if phi.ndim == 2 else phi[:, None] * e


def objective(
    bits: Sequence[int],
    phi: np.ndarray,
    interactions: np.ndarray,
    errors: np.ndarray,
    bit_choices: Sequence[int] = quantizer.BIT_CHOICES,
) -> float:
    """``J(bits) = sum phi_l e_l + sum_{l != k} C_lk e_l e_k``.

    With an ``(L, K)`` ``phi`` (a cost table, `stage_costs`) the linear term
    is ``sum_l phi[l, b_l]``.
    """
    choices = check_bit_choices(bit_choices)
    idx = np.asarray([choices.index(int(b)) for b in bits])
    rows = np.arange(len(idx))
    e_all = np.asarray(errors, np.float64)
    e = e_all[rows, idx]
    c = np.asarray(interactions, np.float64)
    off = c - np.diag(np.diag(c))
    lin = _linear(np.asarray(phi, np.float64), e_all)[rows, idx]
    return float(lin.sum() + e @ off @ e)


def stage_costs(
    stage_phi: np.ndarray,
    chain: Sequence[int],
    errors: np.ndarray,
    bit_choices: Sequence[int] = quantizer.BIT_CHOICES,
) -> np.ndarray:
    """A per-width linear cost table from the Shapley values of each stage.

    SPQE's chain (say 4 -> 3 -> 2) has one game per step; ``stage_phi[i, l]``
    is block ``l``'s Shapley value for the step ``chain[i] -> chain[i+1]``,
    measured with the other blocks at those two widths. The cost of block
    ``l`` at a chain width ``b`` is the loss of stepping down to it from the
    top of the chain (stage values clipped at 0)::

        t_l(chain[0]) = 0,   t_l(chain[j]) = sum_{i < j} max(stage_phi[i, l], 0)

    and a width off the chain (8 bits above a 4 -> 3 -> 2 chain) is placed
    by its weight error, linearly in ``e_l`` along the nearest step. For a
    two-width chain ``(hi, lo)`` and choices ``(lo, hi)`` this is the
    paper's ``phi_l * e_l`` with ``e_l(lo) = 1, e_l(hi) = 0``; with more
    widths it uses what each step measured (the 4 -> 3 step is measured near
    the widths a 3.5-bit budget chooses between, the 3 -> 2 step near 2.5)
    instead of scaling one total by weight errors.

    Args:
      stage_phi: ``(len(chain) - 1, L)`` stage Shapley values.
      chain: the SPQE width chain, decreasing; every width in ``bit_choices``.
      errors: ``(L, K)`` relative weight errors (`relative_errors`).
      bit_choices: the ``K`` widths of ``errors``' columns.

    Returns:
      ``(L, K)`` costs, non-increasing in the width; pass as ``phi`` to
      `allocate`.

    Examples:
      >>> import numpy as np
      >>> e = np.array([[1.0, 0.25, 0.0625, 0.0]])
      >>> stage_costs(np.array([[0.2], [0.6]]), (4, 3, 2), e).round(3).tolist()
      [[0.8, 0.2, 0.0, -0.067]]
    """
    choices = check_bit_choices(bit_choices)
    chain = tuple(int(b) for b in chain)
    if len(chain) < 2 or list(chain) != sorted(chain, reverse=True):
        raise ValueError(f"chain must be >= 2 decreasing widths, got {chain}.")
    missing = [b for b in chain if b not in choices]
    if missing:
        raise ValueError(
            f"chain widths {missing} are not in bit_choices={choices}; the "
            "cost table needs every chain width's weight error."
        )
    stage = np.maximum(np.asarray(stage_phi, np.float64), 0.0)
    e = np.asarray(errors, np.float64)
    n = e.shape[0]
    if stage.shape != (len(chain) - 1, n):
        raise ValueError(
            f"stage_phi must be (len(chain) - 1, L) = ({len(chain) - 1}, {n}), "
            f"got {stage.shape}."
        )
    # chain points (e, t) per block, ordered by increasing error
    pe = np.stack([e[:, choices.index(b)] for b in chain], 1)  # (L, J)
    pt = np.concatenate([np.zeros((n, 1)), np.cumsum(stage.T, 1)], 1)
    out = np.empty_like(e)
    for col, b in enumerate(choices):
        if b in chain:
            out[:, col] = pt[:, chain.index(b)]
            continue
        # the step to extrapolate or interpolate along
        j = 0 if b > chain[0] else len(chain) - 2
        for i in range(len(chain) - 1):
            if chain[i] > b > chain[i + 1]:
                j = i
        de = pe[:, j + 1] - pe[:, j]
        slope = np.where(de > 0, (pt[:, j + 1] - pt[:, j]) / np.where(de > 0, de, 1), 0)
        out[:, col] = pt[:, j] + slope * (e[:, col] - pe[:, j])
    return out


def cost_slopes(costs: np.ndarray, errors: np.ndarray) -> np.ndarray:
    """Each block's least cost per unit of weight error over one width step.

    ``min_a (t_l(a) - t_l(a+1)) / (e_l(a) - e_l(a+1))`` over consecutive
    widths (steps with no error change skipped): the ``phi`` that
    `monotone_terms` guards for a cost table (``phi_l`` itself when
    ``t = phi * e``).

    Args:
      costs: ``(L, K)`` cost table, width ascending.
      errors: ``(L, K)`` relative weight errors.

    Returns:
      ``(L,)`` slopes (0 where no step changes the error).
    """
    dt = -np.diff(np.asarray(costs, np.float64), axis=1)
    de = -np.diff(np.asarray(errors, np.float64), axis=1)
    ratio = np.where(de > 0, dt / np.where(de > 0, de, 1.0), np.inf)
    low = ratio.min(1)
    return np.where(np.isfinite(low), low, 0.0)


def monotone_terms(
    phi: np.ndarray, interactions: np.ndarray
) -> tuple[np.ndarray, np.ndarray, int]:
    """Makes ``J`` monotone: more bits for any block never raise the objective.

    Estimated Shapley values can be negative (noise around a block that does
    not matter) and the covariance of marginal contributions has negative
    entries (blocks that substitute for each other). Taken as they are, both
    reward quantizing harder: with ``phi_l < 0``, or with ``C_lk + C_kl < 0``
    and block ``k`` at high error, lowering ``e_l`` *raises* ``J``, and the
    solver leaves budget unspent (measured on SmolLM2: 3.02 of 3.5 bits
    used). We therefore clip ``phi`` at 0 and cap every negative pair weight
    ``w_lk = C_lk + C_kl`` at ``-min(phi_l / d_l, phi_k / d_k)``, where ``d_l``
    counts block ``l``'s negative pairs. Then::

        dJ/de_l = phi_l + sum_k w_lk e_k >= phi_l - d_l * phi_l / d_l = 0

    everywhere on ``e in [0, 1]**L``, and since ``e_l(b)`` falls as ``b``
    grows, ``J`` never grows with the bits. Positive interactions (blocks that
    hurt together, the paper's case) are kept whole; the objective is the
    paper's unchanged when no negative pair outweighs its blocks' values.

    Args:
      phi: ``(L,)`` Shapley values.
      interactions: ``(L, L)`` interaction matrix ``C``.

    Returns:
      ``(phi_clipped, C_capped, n_capped)``: ``C_capped`` is symmetric with
      off-diagonal ``w_lk / 2`` after capping (``C``'s diagonal kept);
      ``n_capped`` counts the capped pairs.

    Examples:
      >>> import numpy as np
      >>> phi = np.array([1.0, 0.5]); c = np.array([[0.0, -1.0], [-1.0, 0.0]])
      >>> p, capped, n = monotone_terms(phi, c)
      >>> capped[0, 1].item(), n
      (-0.25, 1)
    """
    phi = np.maximum(np.asarray(phi, np.float64), 0.0)
    c = np.asarray(interactions, np.float64)
    w = c + c.T
    off = ~np.eye(len(phi), dtype=bool)
    neg = (w < 0) & off
    deg = np.maximum(neg.sum(1), 1)
    share = phi / deg
    floor = -np.minimum(share[:, None], share[None, :])
    capped = neg & (w < floor)
    w = np.where(capped, floor, w)
    out = np.where(off, w / 2, c)
    return phi, out, int(np.triu(capped).sum())


def _avg(bits, w, group_size):
    return float(w @ (np.asarray(bits) + 32.0 / group_size) / w.sum())


def allocate(
    phi: np.ndarray,
    interactions: np.ndarray,
    errors: np.ndarray,
    *,
    avg_bits: float,
    bit_choices: Sequence[int] = quantizer.BIT_CHOICES,
    sizes: np.ndarray | None = None,
    group_size: int = quantizer.GROUP_SIZE,
    time_limit: float | None = 120.0,
) -> Allocation:
    """Solves the allocation exactly with ``scipy.optimize.milp`` (HiGHS).

    Args:
      phi: ``(L,)`` linear weights (Shapley values).
      interactions: ``(L, L)`` pair weights ``C`` (diagonal ignored).
      errors: ``(L, K)`` ``e_l(b)`` for each of ``bit_choices`` (sorted).
      avg_bits: average all-in bits budget.
      bit_choices: allowed widths.
      sizes: ``(L,)`` weights per block for the budget (default equal).
      group_size: quantizer group size (overhead ``32 / group_size`` bits).
      time_limit: solver time limit in seconds (``None``: none).

    Returns:
      An `Allocation` with HiGHS's status message.

    Raises:
      ValueError: for a budget outside the feasible range, naming it.
      RuntimeError: if the solver finds no solution.
    """
    choices, phi, c, e, w = _validate(phi, interactions, errors, bit_choices, sizes)
    avg_bits = check_budget(avg_bits, choices, group_size)
    n, k = e.shape
    pair_w = c + c.T
    pairs = [(i, j) for i, j in itertools.combinations(range(n), 2) if pair_w[i, j]]
    nx, ny = n * k, len(pairs) * k * k
    cost = np.zeros(nx + ny)
    cost[:nx] = _linear(phi, e).ravel()
    rows, cols, vals, lo, hi = [], [], [], [], []
    r = 0

    def add(entries, lb, ub):
        nonlocal r
        for col, val in entries:
            rows.append(r)
            cols.append(col)
            vals.append(val)
        lo.append(lb)
        hi.append(ub)
        r += 1

    for lyr in range(n):  # one choice per block
        add([(lyr * k + a, 1.0) for a in range(k)], 1.0, 1.0)
    over = 32.0 / group_size
    add(
        [
            (lyr * k + a, w[lyr] * (choices[a] + over))
            for lyr in range(n)
            for a in range(k)
        ],
        -np.inf,
        avg_bits * w.sum() + 1e-9 * w.sum(),
    )
    for p, (l1, l2) in enumerate(pairs):
        base = nx + p * k * k
        cost[base : base + k * k] = pair_w[l1, l2] * np.outer(e[l1], e[l2]).ravel()
        for a in range(k):  # sum_b y_ab = x_l1,a
            add(
                [(base + a * k + b, 1.0) for b in range(k)] + [(l1 * k + a, -1.0)], 0, 0
            )
        for b in range(k):  # sum_a y_ab = x_l2,b
            add(
                [(base + a * k + b, 1.0) for a in range(k)] + [(l2 * k + b, -1.0)], 0, 0
            )
        for a in range(k):  # McCormick: y_ab >= x_l1,a + x_l2,b - 1
            for b in range(k):
                add(
                    [(base + a * k + b, 1.0), (l1 * k + a, -1.0), (l2 * k + b, -1.0)],
                    -1.0,
                    np.inf,
                )
    a_mat = scipy.sparse.csr_array((vals, (rows, cols)), shape=(r, nx + ny))
    integrality = np.concatenate([np.ones(nx), np.zeros(ny)])
    options = {} if time_limit is None else {"time_limit": float(time_limit)}
    res = scipy.optimize.milp(
        cost,
        constraints=scipy.optimize.LinearConstraint(a_mat, lo, hi),
        integrality=integrality,
        bounds=scipy.optimize.Bounds(0, 1),
        options=options,
    )
    if res.x is None:
        raise RuntimeError(f"the MILP found no allocation: {res.message}")
    x = np.round(res.x[:nx]).reshape(n, k)
    bits = np.asarray([choices[int(i)] for i in x.argmax(1)])
    return Allocation(
        bits=bits,
        objective=objective(bits, phi, c, e, choices),
        avg_bits=_avg(bits, w, group_size),
        status=str(res.message),
        optimal=res.status == 0,
    )


def brute_force(
    phi: np.ndarray,
    interactions: np.ndarray,
    errors: np.ndarray,
    *,
    avg_bits: float,
    bit_choices: Sequence[int] = quantizer.BIT_CHOICES,
    sizes: np.ndarray | None = None,
    group_size: int = quantizer.GROUP_SIZE,
) -> Allocation:
    """Exhaustive search over all ``K**L`` allocations (the test oracle).

    Args:
      phi: as in `allocate`.
      interactions: as in `allocate`.
      errors: as in `allocate`.
      avg_bits: as in `allocate`.
      bit_choices: as in `allocate`.
      sizes: as in `allocate`.
      group_size: as in `allocate`.

    Returns:
      The optimal `Allocation` (status ``"brute force"``).
    """
    choices, phi, c, e, w = _validate(phi, interactions, errors, bit_choices, sizes)
    avg_bits = check_budget(avg_bits, choices, group_size)
    n, k = e.shape
    if k**n > 5_000_000:
        raise ValueError(f"brute force over {k}**{n} allocations is too large.")
    grid = np.array(list(itertools.product(range(k), repeat=n)))  # (K**L, L)
    ev = e[np.arange(n), grid]
    off = c - np.diag(np.diag(c))
    lin = _linear(phi, e)[np.arange(n), grid].sum(1)
    vals = lin + np.einsum("il,lm,im->i", ev, off, ev)
    over = 32.0 / group_size
    cost_bits = (np.asarray(choices)[grid] + over) @ w
    vals = np.where(cost_bits <= avg_bits * w.sum() + 1e-9 * w.sum(), vals, np.inf)
    best = int(np.argmin(vals))
    bits = np.asarray(choices)[grid[best]]
    return Allocation(
        bits=bits,
        objective=objective(bits, phi, c, e, choices),
        avg_bits=_avg(bits, w, group_size),
        status="brute force",
        optimal=True,
    )
