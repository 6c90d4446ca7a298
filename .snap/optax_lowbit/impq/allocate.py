"""Per-block bit allocation: IMPQ's quadratic objective as an exact MILP.

Choose ``b_l`` in ``bit_choices`` (default 2, 3, 4, 8) for every block to
minimise::

    J(b) = sum_l phi_l * e_l(b_l) + sum_{l != k} C_lk * e_l(b_l) * e_k(b_k)

subject to the average **code bits** per weight (weighted by block size
``n_l``; what papers and users call "3-bit")::

    sum_l n_l * b_l <= avg_bits * sum_l n_l

The all-in size adds the group scales and zeros (``32 / group_size`` bits, 0.5
at groups of 64) to every block alike, so it is reported beside the code bits
(measured from the packed arrays) and never enters the constraint.

``phi`` are linear weights (a block's value, `game`) or an ``(L, K)`` cost
table, ``C`` pair weights (the quadratic surrogate's interactions, `game`; its
diagonal is not used) and ``e_l(b)`` the block's relative quantization error
(`relative_errors`: 1 at the lowest choice, 0 at the highest). With two
choices ``e`` is the indicator "block at the low width" and ``J`` is any
quadratic pseudo-Boolean function: the surrogate of `game`, exactly.

Linearisation: binary ``x_la`` (block ``l`` takes choice ``a``, one per
block) and, for every pair ``l < k`` with a non-zero ``C_lk + C_kl``,
continuous ``y_lkab`` in ``[0, 1]`` standing for ``x_la * x_kb``, tied by the
reformulation-linearisation equalities ``sum_b y_lkab = x_la`` and
``sum_a y_lkab = x_kb`` plus McCormick's ``y_lkab >= x_la + x_kb - 1``. For
binary ``x`` these force ``y_lkab = x_la * x_kb`` exactly, so the program's
optimum is the exact optimum of ``J``. It is solved by
``scipy.optimize.milp`` (HiGHS); ``solver="brute_force"`` enumerates all
``K**L`` allocations instead (the test oracle for small ``L``).

Examples:
  >>> import numpy as np
  >>> phi = np.array([1.0, 0.1]); c = np.zeros((2, 2))
  >>> e = np.array([[1.0, 0.2, 0.05, 0.0]] * 2)
  >>> allocate(phi, c, e, avg_bits=3.0).bits.tolist()
  [4, 2]

References:
  `IMPQ (later renamed CoopQ), arXiv 2509.15455
  <https://arxiv.org/abs/2509.15455>`_, 2025. Adams and Sherali, `A tight
  linearization and an algorithm for zero-one quadratic programming problems
  <https://doi.org/10.1287/mnsc.32.10.1274>`_, 1986.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np
import scipy.optimize
import scipy.sparse

from optax_lowbit.impq import quantizer

#: the exact solvers of `allocate`.
SOLVERS = ("milp", "brute_force")


@dataclasses.dataclass(frozen=True)
class Allocation:
    """A per-block bit allocation.

    Attributes:
      bits: ``(L,)`` bits per block.
      objective: ``J(bits)``.
      avg_bits: the achieved size-weighted average code bits per weight.
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


def check_budget(avg_bits: float, bit_choices: Sequence[int]) -> float:
    """Raises unless a code-bit budget lies within ``bit_choices``' range.

    Args:
      avg_bits: average code bits per weight.
      bit_choices: the allowed widths.

    Returns:
      ``avg_bits`` as a float.

    Examples:
      >>> check_budget(2.5, (2, 3, 4))
      2.5
    """
    choices = check_bit_choices(bit_choices)
    if isinstance(avg_bits, bool) or not isinstance(
        avg_bits, int | float | np.integer | np.floating
    ):
        raise TypeError(f"avg_bits must be a number, got {avg_bits!r}.")
    lo, hi = choices[0], choices[-1]
    accepted = f"accepted: {lo} <= avg_bits <= {hi} code bits per weight"
    if not avg_bits >= lo - 1e-12:  # also catches NaN
        raise ValueError(
            f"avg_bits={avg_bits:g} is below min(bit_choices)={lo}; {accepted}."
        )
    if avg_bits > hi + 1e-12:
        raise ValueError(
            f"avg_bits={avg_bits:g} is above max(bit_choices)={hi} (all blocks "
            f"at {hi} bits already fit); {accepted}."
        )
    return float(avg_bits)


def relative_errors(
    sse: np.ndarray, widths: Sequence[int], bit_choices: Sequence[int]
) -> np.ndarray:
    """``e_l(b)``: block ``l``'s weight error at ``b``, 1 at min and 0 at max bits.

    ``e_l(b) = (sse_l(b) - sse_l(max)) / (sse_l(min) - sse_l(max))``, so with
    two choices ``e`` is the indicator of the low width.

    Args:
      sse: ``(L, K)`` summed squared quantization error per block and width
        (`spqe.SelectorForward.sse`).
      widths: the ``K`` widths of ``sse``'s columns.
      bit_choices: the widths to tabulate (at least two).

    Returns:
      ``(L, len(bit_choices))``, 1 in the column of ``min(bit_choices)`` and 0
      in that of ``max(bit_choices)``.
    """
    choices = check_bit_choices(bit_choices)
    if len(choices) < 2:
        raise ValueError(f"bit_choices must hold >= 2 widths, got {choices}.")
    cols = [list(widths).index(b) for b in choices]
    table = np.asarray(sse, np.float64)[:, cols]
    span = table[:, :1] - table[:, -1:]
    return (table - table[:, -1:]) / np.where(span > 0, span, 1.0)


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


def allocate(
    phi: np.ndarray,
    interactions: np.ndarray,
    errors: np.ndarray,
    *,
    avg_bits: float,
    bit_choices: Sequence[int] = quantizer.BIT_CHOICES,
    sizes: np.ndarray | None = None,
    min_avg_bits: float | None = None,
    solver: str = "milp",
    time_limit: float | None = 120.0,
) -> Allocation:
    """The exact minimiser of ``J`` under a code-bit budget.

    Args:
      phi: ``(L,)`` linear weights or an ``(L, K)`` cost table.
      interactions: ``(L, L)`` pair weights ``C`` (diagonal ignored).
      errors: ``(L, K)`` ``e_l(b)`` for each of ``bit_choices`` (sorted).
      avg_bits: average code bits per weight.
      bit_choices: allowed widths.
      sizes: ``(L,)`` weights per block for the budget (default equal).
      min_avg_bits: optional least average code bits to spend (``<=
        avg_bits``): an estimated ``J`` may call some bits harmful where
        they are noise, and a user asking for ``avg_bits`` means to spend
        them (the pipeline passes what the uniform mix spends).
      solver: ``"milp"`` (HiGHS) or ``"brute_force"`` (all ``K**L``
        allocations, at most 5e6).
      time_limit: MILP time limit in seconds (``None``: none).

    Returns:
      An `Allocation` with the solver's status message.

    Raises:
      ValueError: for a budget outside the feasible range or an unknown
        solver, naming it.
      RuntimeError: if the MILP finds no solution.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}.")
    choices, phi, c, e, w = _validate(phi, interactions, errors, bit_choices, sizes)
    avg_bits = check_budget(avg_bits, choices)
    cap = avg_bits * w.sum() * (1 + 1e-9)
    floor = -np.inf
    if min_avg_bits is not None:
        if not choices[0] <= min_avg_bits <= avg_bits + 1e-12:
            raise ValueError(
                f"min_avg_bits={min_avg_bits!r} must lie in [min(bit_choices), "
                f"avg_bits] = [{choices[0]}, {avg_bits:g}]."
            )
        floor = min_avg_bits * w.sum() * (1 - 1e-9)
    if solver == "brute_force":
        bits, status, optimal = _brute_force(phi, c, e, choices, w, (floor, cap))
    else:
        bits, status, optimal = _milp(phi, c, e, choices, w, (floor, cap), time_limit)
    return Allocation(
        bits=bits,
        objective=objective(bits, phi, c, e, choices),
        avg_bits=float(w @ bits / w.sum()),
        status=status,
        optimal=optimal,
    )


def _milp(phi, c, e, choices, w, bounds, time_limit):
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
    add(
        [(lyr * k + a, w[lyr] * choices[a]) for lyr in range(n) for a in range(k)],
        *bounds,
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
    # HiGHS stops within a relative gap of 1e-4 and an absolute one of 1e-6:
    # small blocks' terms would be left to chance (budget unspent). Costs are
    # scaled to a largest entry of 1 and the relative gap closed.
    cost /= max(float(np.abs(cost).max()), 1e-300)
    options = {"mip_rel_gap": 1e-9}
    if time_limit is not None:
        options["time_limit"] = float(time_limit)
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
    return bits, str(res.message), res.status == 0


def _brute_force(phi, c, e, choices, w, bounds):
    n, k = e.shape
    if k**n > 5_000_000:
        raise ValueError(f"brute force over {k}**{n} allocations is too large.")
    grid = np.array(list(itertools.product(range(k), repeat=n)))  # (K**L, L)
    ev = e[np.arange(n), grid]
    off = c - np.diag(np.diag(c))
    lin = _linear(phi, e)[np.arange(n), grid].sum(1)
    vals = lin + np.einsum("il,lm,im->i", ev, off, ev)
    spent = np.asarray(choices)[grid] @ w
    vals = np.where((spent >= bounds[0]) & (spent <= bounds[1]), vals, np.inf)
    if not np.isfinite(vals).any():
        raise RuntimeError("no allocation spends between min_avg_bits and avg_bits.")
    return np.asarray(choices)[grid[int(np.argmin(vals))]], "brute force", True
