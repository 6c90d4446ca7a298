"""Baseline bit allocations, at the same all-in budget as IMPQ.

Every method returns ``(L,)`` bits per block from ``bit_choices`` whose
size-weighted average all-in bits (``b + 32 / group_size``, ``b + 0.5`` at
groups of 64) is within ``avg_bits``.
The scored methods build an ``(L, K)`` cost table ``s_l(b)`` and solve the
**additive** allocation ``min sum_l s_l(b_l)`` exactly (`allocate.allocate`
with ``phi = 1`` and no pair term), so they differ from IMPQ only in what
they measure:

* `uniform`: every block at the widest ``b`` with ``b + 0.5 <= avg_bits``.
* isolated sensitivity (`isolated_table`): ``s_l(b)`` = the measured NLL
  increase on calibration text when block ``l`` alone is quantized to ``b``
  bits and all other blocks are full precision (``L * K`` evaluations).
* Fisher / Hessian trace, HAWQ-v2 style (`fisher_table`): ``s_l(b) =
  mean-trace_l * ||W_l - Q_b(W_l)||^2`` where the trace of the Hessian is
  approximated by the empirical Fisher, the squared per-sequence gradients
  of the loss, averaged over the block's quantized weights.
* LIM (`lim_table`): layer input modification ``I_l = 1 - cos(x_in, x_out)``
  of the residual stream around block ``l`` (mean over tokens), and ``s_l(b)
  = I_l * e_l(b)`` with ``e`` the relative weight error of `allocate`.
* `best_random`: random feasible allocations (one per seed); the one with the
  lowest **calibration** NLL wins (never chosen on held-out text).

Examples:
  >>> uniform(4, 3.0).tolist()
  [2, 2, 2, 2]

References:
  Dong et al, `HAWQ-V2: Hessian Aware trace-Weighted Quantization of Neural
  Networks <https://arxiv.org/abs/1911.03852>`_, 2020.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_lowbit.impq import allocate, quantizer, spqe
from optax_lowbit.impq import model as _model


def uniform(
    n_blocks: int,
    avg_bits: float,
    bit_choices: Sequence[int] = quantizer.BIT_CHOICES,
    group_size: int = quantizer.GROUP_SIZE,
) -> np.ndarray:
    """Every block at the widest choice that fits the all-in budget."""
    choices = allocate.check_bit_choices(bit_choices)
    avg_bits = allocate.check_budget(avg_bits, choices, group_size)
    fit = [b for b in choices if b + 32.0 / group_size <= avg_bits + 1e-12]
    return np.full(n_blocks, fit[-1], np.int64)


def additive(
    table: np.ndarray,
    avg_bits: float,
    bit_choices: Sequence[int] = quantizer.BIT_CHOICES,
    sizes: np.ndarray | None = None,
    group_size: int = quantizer.GROUP_SIZE,
) -> allocate.Allocation:
    """Exact ``min sum_l table[l, b_l]`` under the budget (no pair terms)."""
    table = np.asarray(table, np.float64)
    n = table.shape[0]
    return allocate.allocate(
        np.ones(n),
        np.zeros((n, n)),
        table,
        avg_bits=avg_bits,
        bit_choices=bit_choices,
        sizes=sizes,
        group_size=group_size,
    )


def isolated_table(
    forward: spqe.SelectorForward,
    tokens: Any,
    bit_choices: Sequence[int] = quantizer.BIT_CHOICES,
    callback: spqe.Callback | None = None,
) -> np.ndarray:
    """NLL increase of quantizing one block alone to each width.

    Args:
      forward: a `spqe.SelectorForward` whose widths include `spqe.FULL` and
        ``bit_choices``.
      tokens: calibration tokens.
      bit_choices: widths to measure.
      callback: progress ``callback(done, total)``.

    Returns:
      ``(L, K)`` ``NLL(block l at b, others full) - NLL(all full)``.
    """
    choices = allocate.check_bit_choices(bit_choices)
    n = forward.model.n_blocks
    full = forward.index(spqe.FULL)
    sels = [np.full(n, full, np.int32)]
    for lyr in range(n):
        for b in choices:
            s = np.full(n, full, np.int32)
            s[lyr] = forward.index(b)
            sels.append(s)
    losses = forward.losses(np.stack(sels), tokens, callback=callback)
    return (losses[1:] - losses[0]).reshape(n, len(choices))


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


def fisher_table(
    model: _model.BlockModel,
    forward: spqe.SelectorForward,
    tokens: Any,
    bit_choices: Sequence[int] = quantizer.BIT_CHOICES,
) -> np.ndarray:
    """HAWQ-v2 cost ``mean-trace_l * ||W_l - Q_b(W_l)||^2``, ``(L, K)``."""
    choices = allocate.check_bit_choices(bit_choices)
    cols = [forward.index(b) for b in choices]
    return fisher_traces(model, tokens)[:, None] * forward.sse[:, cols]


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


def lim_table(
    model: _model.BlockModel,
    forward: spqe.SelectorForward,
    tokens: Any,
    bit_choices: Sequence[int] = quantizer.BIT_CHOICES,
) -> np.ndarray:
    """LIM cost ``I_l * e_l(b)`` (relative weight error), ``(L, K)``."""
    choices = allocate.check_bit_choices(bit_choices)
    e = allocate.relative_errors(forward.sse, forward.widths, choices)
    return lim_scores(model, tokens)[:, None] * e


def random_bits(
    n_blocks: int,
    avg_bits: float,
    rng: np.random.Generator,
    bit_choices: Sequence[int] = quantizer.BIT_CHOICES,
    sizes: np.ndarray | None = None,
    group_size: int = quantizer.GROUP_SIZE,
) -> np.ndarray:
    """A random allocation within budget that no single block can widen.

    Draws each block's width uniformly, then narrows random blocks until the
    budget holds and widens random blocks by one step while it still holds.
    """
    choices = allocate.check_bit_choices(bit_choices)
    avg_bits = allocate.check_budget(avg_bits, choices, group_size)
    w = np.ones(n_blocks) if sizes is None else np.asarray(sizes, np.float64)
    cap = avg_bits * w.sum() + 1e-9 * w.sum()
    over = 32.0 / group_size
    idx = rng.integers(0, len(choices), n_blocks)

    def cost(ix):
        return float(w @ (np.asarray(choices)[ix] + over))

    while cost(idx) > cap:
        idx[rng.choice(np.flatnonzero(idx > 0))] -= 1
    for i in rng.permutation(n_blocks):
        while idx[i] + 1 < len(choices):
            idx[i] += 1
            if cost(idx) > cap:
                idx[i] -= 1
                break
    return np.asarray(choices)[idx]


def best_random(
    forward: spqe.SelectorForward,
    tokens: Any,
    avg_bits: float,
    *,
    n_seeds: int = 8,
    bit_choices: Sequence[int] = quantizer.BIT_CHOICES,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Best of ``n_seeds`` random allocations by calibration NLL.

    Returns:
      ``(bits, calibration_losses)`` of the winner and of every draw.
    """
    n = forward.model.n_blocks
    draws = [
        random_bits(
            n,
            avg_bits,
            np.random.default_rng(seed + s),
            bit_choices,
            forward.sizes,
            forward.group_size,
        )
        for s in range(n_seeds)
    ]
    losses = forward.losses(np.stack([forward.selector(d) for d in draws]), tokens)
    return draws[int(np.argmin(losses))], losses
