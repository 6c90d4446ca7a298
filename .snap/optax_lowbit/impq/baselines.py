"""Baseline bit allocations, at the same code-bit budget as IMPQ.

Every method returns ``(L,)`` bits per block from ``bit_choices`` whose
size-weighted average code bits is within ``avg_bits``; all are measured with
the same quantized candidates (`spqe.SelectorForward`) and, where they
measure the model, the same value as IMPQ's game (mean KL to the
full-precision model on the calibration tokens, `spqe.SelectorForward.kls`).

* `uniform`: the best uniform mix that fits: every block at ``avg_bits`` when
  it is a width, else the two widths around it, the share at the higher as
  large as the budget allows, the blocks chosen by the same MILP with no
  interaction (cost: each block's squared weight error).
* isolated, two ways: `isolated_table` (``s_l(b)`` = KL with block ``l``
  alone at ``b`` bits, the others full precision; ``L * K`` evaluations) and
  `isolated_gains` (the KL saved by block ``l`` alone at ``hi`` with the
  others at ``lo``: the operating point's widths).
* Fisher / Hessian trace, HAWQ-v2 style: ``s_l(b) = mean-trace_l *
  ||W_l - Q_b(W_l)||^2`` with the trace approximated by the empirical Fisher
  (`fisher_traces`, `scaled_errors` with ``relative=False``).
* LIM: layer input modification ``I_l = 1 - cos(x_in, x_out)`` of the
  residual stream around block ``l`` (`lim_scores`) times the relative weight
  error (`scaled_errors` with ``relative=True``).
* `random_bits`: random feasible allocations that no block can widen (the
  benchmark reports the mean of 5).
* `greedy_descent`: from every block at the widest choice, repeatedly lower
  the block whose KL increase per saved bit is smallest.

The scored methods solve the **additive** allocation ``min sum_l s_l(b_l)``
exactly (`additive`: `allocate.allocate` with no pair term), so they differ
from IMPQ only in what they measure.

Examples:
  >>> uniform(4, 3.0, (2, 3, 4)).tolist()
  [3, 3, 3, 3]
  >>> sorted(uniform(4, 2.5, (2, 3, 4)).tolist())
  [2, 2, 3, 3]

References:
  Dong et al, `HAWQ-V2: Hessian Aware trace-Weighted Quantization of Neural
  Networks <https://arxiv.org/abs/1911.03852>`_, 2020.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_lowbit.impq import allocate, quantizer, spqe
from optax_lowbit.impq import model as _model


def additive(
    table: np.ndarray,
    avg_bits: float,
    bit_choices: Sequence[int] = quantizer.BIT_CHOICES,
    sizes: np.ndarray | None = None,
) -> allocate.Allocation:
    """Exact ``min sum_l table[l, b_l]`` under the code-bit budget (no pairs).

    Args:
      table: ``(L, K)`` cost of each block at each of ``bit_choices``.
      avg_bits: code bits per weight.
      bit_choices: the ``K`` widths.
      sizes: ``(L,)`` block sizes (default equal).

    Returns:
      The `allocate.Allocation`.
    """
    table = np.asarray(table, np.float64)
    n = table.shape[0]
    return allocate.allocate(
        np.ones(n),
        np.zeros((n, n)),
        table,
        avg_bits=avg_bits,
        bit_choices=bit_choices,
        sizes=sizes,
    )


def uniform(
    n_blocks: int,
    avg_bits: float,
    bit_choices: Sequence[int] = quantizer.BIT_CHOICES,
    *,
    sizes: np.ndarray | None = None,
    cost: np.ndarray | None = None,
) -> np.ndarray:
    """The best uniform mix that fits a code-bit budget.

    Args:
      n_blocks: L.
      avg_bits: code bits per weight.
      bit_choices: the allowed widths.
      sizes: ``(L,)`` block sizes (default equal).
      cost: ``(L, K)`` cost per block and width of ``bit_choices`` that picks
        which blocks take the higher width of the mix (the pipeline passes
        the squared weight errors); default: equal for every block.

    Returns:
      ``(L,)`` bits: all at ``avg_bits`` if it is a width, else a mix of the
      two widths around it that spends as much of the budget as fits.
    """
    choices = allocate.check_bit_choices(bit_choices)
    avg_bits = allocate.check_budget(avg_bits, choices)
    near = [b for b in choices if abs(b - avg_bits) < 1e-9]
    if near:
        return np.full(n_blocks, near[0], np.int64)
    lo = max(b for b in choices if b < avg_bits)
    hi = min(b for b in choices if b > avg_bits)
    cols = [choices.index(lo), choices.index(hi)]
    table = (
        np.tile([1.0, 0.0], (n_blocks, 1))
        if cost is None
        else np.asarray(cost, np.float64)[:, cols]
    )
    return additive(table, avg_bits, (lo, hi), sizes).bits


def one_block_selectors(n: int, base: int, codes: Sequence[int]) -> np.ndarray:
    """Selectors moving one block at a time away from a common width.

    Args:
      n: L.
      base: the selector code of every other block.
      codes: the codes each block takes in turn.

    Returns:
      ``(1 + n * len(codes), n)``: all at ``base``, then block ``l`` at each
      of ``codes`` (``l``-major).

    Examples:
      >>> one_block_selectors(2, 0, [1]).tolist()
      [[0, 0], [1, 0], [0, 1]]
    """
    sels = [np.full(n, base, np.int32)]
    for lyr, code in itertools.product(range(n), codes):
        s = np.full(n, base, np.int32)
        s[lyr] = code
        sels.append(s)
    return np.stack(sels)


def isolated_table(
    forward: spqe.SelectorForward,
    reference: spqe.Reference,
    bit_choices: Sequence[int] = quantizer.BIT_CHOICES,
    callback: spqe.Callback | None = None,
) -> np.ndarray:
    """KL of quantizing one block alone to each width, the others full.

    Args:
      forward: a `spqe.SelectorForward` whose widths include `spqe.FULL` and
        ``bit_choices``.
      reference: `spqe.SelectorForward.reference` of the calibration tokens.
      bit_choices: widths to measure.
      callback: progress ``callback(done, total)``.

    Returns:
      ``(L, K)`` ``KL(block l at b, others full)`` (nats per token).
    """
    choices = allocate.check_bit_choices(bit_choices)
    n = forward.model.n_blocks
    codes = [forward.index(b) for b in choices]
    sels = one_block_selectors(n, forward.index(spqe.FULL), codes)
    kls = forward.kls(sels, reference, callback=callback)
    return kls[1:].reshape(n, len(choices))


def isolated_gains(
    forward: spqe.SelectorForward,
    reference: spqe.Reference,
    lo: int,
    hi: int,
    callback: spqe.Callback | None = None,
) -> np.ndarray:
    """KL saved by raising one block alone to ``hi``, the others at ``lo``.

    Args:
      forward: a `spqe.SelectorForward` with widths ``lo`` and ``hi``.
      reference: `spqe.SelectorForward.reference` of the calibration tokens.
      lo: the others' width.
      hi: the raised block's width.
      callback: progress ``callback(done, total)``.

    Returns:
      ``(L,)`` ``KL(all at lo) - KL(block l at hi, others at lo)``.
    """
    n = forward.model.n_blocks
    sels = one_block_selectors(n, forward.index(lo), [forward.index(hi)])
    kls = forward.kls(sels, reference, callback=callback)
    return kls[0] - kls[1:]


def fisher_traces(model: _model.BlockModel, tokens: Any) -> np.ndarray:
    """Mean empirical-Fisher diagonal over each block's quantized weights.

    Args:
      model: the model.
      tokens: ``(batch, t)`` calibration tokens; one gradient per sequence.

    Returns:
      ``(L,)`` ``mean over weights of sum over sequences of grad**2``.
    """
    tokens = jnp.asarray(tokens)
    params = model.params

    @jax.jit
    def grad_sq(blocks, seq):
        g = jax.grad(lambda b: model.loss({**params, "blocks": b}, seq[None]))(blocks)
        return jax.tree.map(jnp.square, g)

    acc = None
    for seq in tokens:
        g2 = grad_sq(params["blocks"], seq)
        acc = g2 if acc is None else jax.tree.map(jnp.add, acc, g2)
    out = np.zeros(model.n_blocks)
    for i, (block, g2) in enumerate(zip(params["blocks"], acc, strict=True)):
        total, count = 0.0, 0
        for (path, w), g in zip(
            jax.tree_util.tree_leaves_with_path(block),
            jax.tree.leaves(g2),
            strict=True,
        ):
            if model.include(quantizer.path_str(path), w):
                total += float(jnp.sum(g))
                count += w.size
        out[i] = total / max(count, 1)
    return out


def scaled_errors(
    scores: np.ndarray,
    forward: spqe.SelectorForward,
    bit_choices: Sequence[int] = quantizer.BIT_CHOICES,
    *,
    relative: bool,
) -> np.ndarray:
    """A per-block score times each block's weight error at each width.

    HAWQ-v2 is ``scaled_errors(fisher_traces(...), ..., relative=False)``
    (the squared weight error ``||W_l - Q_b(W_l)||^2``), LIM is
    ``scaled_errors(lim_scores(...), ..., relative=True)``
    (`allocate.relative_errors`).

    Args:
      scores: ``(L,)`` per-block scores.
      forward: the pre-quantized model (its ``sse``).
      bit_choices: the widths.
      relative: relative errors (1 at min, 0 at max bits) instead of squared.

    Returns:
      ``(L, K)`` costs.
    """
    choices = allocate.check_bit_choices(bit_choices)
    if relative:
        errors = allocate.relative_errors(forward.sse, forward.widths, choices)
    else:
        errors = forward.sse[:, [forward.index(b) for b in choices]]
    return np.asarray(scores, np.float64)[:, None] * errors


def lim_scores(model: _model.BlockModel, tokens: Any) -> np.ndarray:
    """LIM ``1 - cos(x_in, x_out)`` per block, averaged over tokens.

    Raises:
      ValueError: if the model has no ``hidden`` function.
    """
    if model.hidden is None:
        raise ValueError(
            f"LIM needs the residual stream around each block, but model "
            f"{model.name!r} has no `hidden` function; pass one to BlockModel."
        )
    hs = jax.jit(model.hidden)(model.params, jnp.asarray(tokens))
    out = []
    for x_in, x_out in itertools.pairwise(hs):
        a = x_in.astype(jnp.float32)
        b = x_out.astype(jnp.float32)
        cos = jnp.sum(a * b, -1) / (
            jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1) + 1e-12
        )
        out.append(float(jnp.mean(1.0 - cos)))
    return np.asarray(out)


def random_bits(
    n_blocks: int,
    avg_bits: float,
    rng: np.random.Generator,
    bit_choices: Sequence[int] = quantizer.BIT_CHOICES,
    sizes: np.ndarray | None = None,
) -> np.ndarray:
    """A random allocation within the code-bit budget that no block can widen.

    Draws each block's width uniformly, then narrows random blocks until the
    budget holds and widens random blocks by one step while it still holds.

    Args:
      n_blocks: L.
      avg_bits: code bits per weight.
      rng: the generator.
      bit_choices: the allowed widths.
      sizes: ``(L,)`` block sizes (default equal).

    Returns:
      ``(L,)`` bits.
    """
    choices = allocate.check_bit_choices(bit_choices)
    avg_bits = allocate.check_budget(avg_bits, choices)
    w = np.ones(n_blocks) if sizes is None else np.asarray(sizes, np.float64)
    cap = avg_bits * w.sum() * (1 + 1e-9)
    idx = rng.integers(0, len(choices), n_blocks)

    def cost(ix):
        return float(w @ np.asarray(choices)[ix])

    while cost(idx) > cap:
        idx[rng.choice(np.flatnonzero(idx > 0))] -= 1
    for i in rng.permutation(n_blocks):
        while idx[i] + 1 < len(choices):
            idx[i] += 1
            if cost(idx) > cap:
                idx[i] -= 1
                break
    return np.asarray(choices)[idx]


def greedy_descent(
    cost_fn: Callable[[np.ndarray], np.ndarray],
    n_blocks: int,
    budgets: Sequence[float],
    bit_choices: Sequence[int] = quantizer.BIT_CHOICES,
    sizes: np.ndarray | None = None,
    callback: spqe.Callback | None = None,
) -> dict[float, np.ndarray]:
    """Greedy KL descent: lower the block with the least cost per saved bit.

    From every block at the widest choice, each step evaluates lowering each
    block by one width and takes the one with the smallest
    ``(cost(new) - cost(now)) / (bits saved * block size)``; the allocation
    at a budget is the first on this path within it. One path serves every
    budget (at most ``L * (K - 1)`` steps of ``<= L`` evaluations).

    Args:
      cost_fn: ``cost_fn(bits (n, L)) -> (n,)`` cost of each allocation (the
        pipeline: mean KL on calibration tokens).
      n_blocks: L.
      budgets: code-bit budgets.
      bit_choices: the allowed widths.
      sizes: ``(L,)`` block sizes (default equal).
      callback: ``callback(done, total)`` after each step (total: the most
        steps the path can take).

    Returns:
      ``{budget: (L,) bits}``.
    """
    choices = allocate.check_bit_choices(bit_choices)
    budgets = [allocate.check_budget(b, choices) for b in budgets]
    w = np.ones(n_blocks) if sizes is None else np.asarray(sizes, np.float64)
    widths = np.asarray(choices)
    idx = np.full(n_blocks, len(choices) - 1)
    now = float(cost_fn(widths[idx][None])[0])
    out: dict[float, np.ndarray] = {}
    total = n_blocks * (len(choices) - 1)
    for step in range(total + 1):
        avg = float(w @ widths[idx] / w.sum())
        for b in budgets:
            if b not in out and avg <= b * (1 + 1e-9):
                out[b] = widths[idx].copy()
        if len(out) == len(budgets):
            break
        movable = np.flatnonzero(idx > 0)
        cands = np.repeat(idx[None], len(movable), 0)
        cands[np.arange(len(movable)), movable] -= 1
        costs = np.asarray(cost_fn(widths[cands]), np.float64)
        saved = (widths[idx[movable]] - widths[idx[movable] - 1]) * w[movable]
        best = int(np.argmin((costs - now) / saved))
        idx, now = cands[best], float(costs[best])
        if callback is not None:
            callback(step + 1, total)
    return out
