"""SPQE: Shapley values of blocks under progressive quantization, by sampling.

Why over 500 lines: the estimator and `SelectorForward`, the batched
evaluator of coalitions whose selector layout (one width index per block) its
coalition cache is keyed by; the other allocators (`baselines`, `game`,
`allocate`) reach the same evaluator here, so the two stay together.

The players are the L transformer blocks. A **coalition** ``S`` is scored on
calibration tokens with every block in ``S`` at a high width and every other
block at a low width::

    v_(hi, lo)(S) = - mean NLL(calibration | blocks in S at hi bits,
                                            blocks not in S at lo bits)

A block "leaves" the coalition by being quantized one step further, not by
being pruned. Leaving is **progressive**: with the width chain ``(4, 3, 2)``
there are two stage games, ``v_(4,3)`` and ``v_(3,2)``, and a block's
contribution is the sum of its marginal contributions in both, measured on the
same permutation::

    delta_l(pi) = sum_stages [v(P_l(pi) + {l}) - v(P_l(pi))]

where ``P_l(pi)`` is the set of blocks before ``l`` in ``pi``. By linearity of
the Shapley value, ``phi_l = E_pi[delta_l]`` is the Shapley value of the game
``v_(4,3) + v_(3,2)``: how much keeping block ``l`` at 4 rather than 2 bits
(one step at a time, in the company of a random set of others) lowers the
loss. With a chain of two widths this is the plain two-level game.

Estimator (Monte Carlo permutation sampling): ``M`` permutations, drawn in
antithetic pairs ``(pi, reversed(pi))``; each needs the ``L + 1`` prefix
coalitions per stage. Every distinct (stage, coalition) is evaluated once:
coalitions are cached by their per-block width selector (the empty and full
coalitions, shared by every permutation, and the stage boundaries, e.g. "all
at 3 bits", shared by two stages, are evaluated once). Standard errors use the
antithetic pair means (independent across pairs).

Speed: `SelectorForward` quantizes every block at every width **once**,
keeps the dequantized candidates stacked ``(n_widths, *shape)``, and runs one
jitted, vmapped loss over a batch of per-block integer selectors: each block
picks its candidate with a dynamic index, so any coalition (and any final bit
allocation) is evaluated without retracing.

Examples:
  >>> import numpy as np
  >>> a = np.array([1.0, 2.0, 3.0])
  >>> loss = lambda sel: -(sel == 1).astype(float) @ a  # additive game
  >>> res = spqe(loss, 3, stages=[(1, 0)], n_permutations=4)
  >>> np.round(res.phi, 6).tolist()
  [1.0, 2.0, 3.0]

References:
  `IMPQ (later renamed CoopQ), arXiv 2509.15455
  <https://arxiv.org/abs/2509.15455>`_, 2025. Castro et al, `Polynomial
  calculation of the Shapley value based on sampling
  <https://doi.org/10.1016/j.cor.2008.04.004>`_, 2009.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_lowbit.impq import model as _model
from optax_lowbit.impq import quantizer

#: width code meaning "the unquantized (reference) weights".
FULL = 16

Callback = Callable[[int, int], None]


def _check_widths(widths: Sequence[int], name: str) -> tuple[int, ...]:
    widths = tuple(widths)
    if not widths:
        raise ValueError(f"{name} must be a non-empty sequence of bit widths.")
    for b in widths:
        if b != FULL:
            quantizer.check_bits(b, name=f"every entry of {name}")
    if len(set(widths)) != len(widths):
        raise ValueError(f"{name} must not repeat a width, got {widths}.")
    return widths


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Reference:
    """The full-precision next-token distribution on cached tokens.

    Attributes:
      tokens: ``(batch, t)`` token windows.
      probs: ``(batch, t - 1, vocab)`` float32 reference probabilities.
      neg_entropy: mean ``sum_v p log p`` over the positions (a scalar).
    """

    tokens: jax.Array
    probs: jax.Array
    neg_entropy: jax.Array


def _quantized_leaves(block: Any) -> list[tuple[str, quantizer.QuantizedWeight]]:
    """``(path, QuantizedWeight)`` of a block quantized elsewhere."""
    leaves = jax.tree_util.tree_leaves_with_path(
        block, is_leaf=lambda x: isinstance(x, quantizer.QuantizedWeight)
    )
    return [
        (quantizer.path_str(p), x)
        for p, x in leaves
        if isinstance(x, quantizer.QuantizedWeight)
    ]


class SelectorForward:
    """Every block pre-quantized at every width; one jitted loss over selectors.

    Args:
      model: a `model.BlockModel`.
      widths: candidate widths (bits in 2, 3, 4, 8, or `FULL` for the
        unquantized weights); a selector entry indexes this tuple.
      group_size: quantizer group size.
      batch_size: coalitions per jitted call (vmapped); a last partial batch
        is padded, so the shape and the trace never change.
      callback: ``callback(done, n_blocks)`` progress of the pre-quantization.
      prequantized: optional ``{width: params}`` whose blocks hold
        `quantizer.QuantizedWeight` leaves quantized elsewhere (e.g. by
        `gptq.quantize_model` at that width), used for that width instead of
        this module's RTN.

    Attributes:
      sizes: ``(L,)`` quantized weights per block.
      sse: ``(L, K)`` summed squared weight error of block ``l`` at width
        ``k`` (0 for `FULL`).
      nbytes: ``(L, K)`` real bytes of block ``l``'s quantized weights at
        width ``k`` (packed codes + fp16 scales and zeros; fp32 for `FULL`).
      n_traces: how many times the loss was traced (one per token shape).

    Examples:
      >>> from optax_lowbit.impq import model
      >>> fwd = SelectorForward(model.tiny_llama(n_layers=2), (2, 4))
      >>> tokens = np.arange(34).reshape(2, 17) % 256
      >>> fwd.losses(np.array([[0, 1], [1, 0]]), tokens).shape
      (2,)
    """

    def __init__(
        self,
        model: _model.BlockModel,
        widths: Sequence[int],
        *,
        group_size: int = quantizer.GROUP_SIZE,
        batch_size: int = 1,
        callback: Callback | None = None,
        prequantized: dict[int, Any] | None = None,
    ):
        if not isinstance(model, _model.BlockModel):
            raise TypeError(
                f"model must be an impq.model.BlockModel, got {type(model).__name__}"
                "; build one with model.smollm2_model, model.tiny_llama or "
                "model.from_nnx."
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int):
            raise TypeError(f"batch_size must be a positive int, got {batch_size!r}.")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size}.")
        self.model = model
        self.widths = _check_widths(widths, "widths")
        self.group_size = group_size
        self.batch_size = batch_size
        self.n_traces = 0
        n_blocks, k = model.n_blocks, len(self.widths)
        self.sizes = np.zeros(n_blocks, np.int64)
        self.sse = np.zeros((n_blocks, k))
        self.nbytes = np.zeros((n_blocks, k), np.int64)
        self._treedefs, self._stacked, cands = [], [], []
        prequantized = dict(prequantized or {})
        for i, block in enumerate(model.params["blocks"]):
            paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(block)
            given = {
                b: dict(_quantized_leaves(params["blocks"][i]))
                for b, params in prequantized.items()
            }
            flags, leaves = [], []
            for path, w in paths_leaves:
                if not model.include(quantizer.path_str(path), w):
                    flags.append(False)
                    leaves.append(w)
                    continue
                self.sizes[i] += w.size
                stack = []
                for j, b in enumerate(self.widths):
                    if b == FULL:
                        deq = jnp.asarray(w, jnp.float32)
                        self.nbytes[i, j] += 4 * w.size
                    else:
                        qw = (
                            given[b][quantizer.path_str(path)]
                            if b in given
                            else (quantizer.quantize(w, b, group_size=group_size))
                        )
                        deq = quantizer.dequantize(qw)
                        self.nbytes[i, j] += qw.nbytes
                        self.sse[i, j] += float(jnp.sum((deq - w) ** 2))
                    stack.append(deq.astype(w.dtype))
                flags.append(True)
                leaves.append(jnp.stack(stack))
            if callback is not None:
                callback(i + 1, n_blocks)
            self._treedefs.append(treedef)
            self._stacked.append(tuple(flags))
            cands.append(leaves)
        self._cands = cands
        self._rest = {k: v for k, v in model.params.items() if k != "blocks"}
        self._jitted = jax.jit(self._batch_loss)
        self._jitted_kl = jax.jit(self._batch_kl)

    def index(self, bits: int) -> int:
        """Selector code of width ``bits``."""
        if bits not in self.widths:
            raise ValueError(f"width {bits} is not a candidate; have {self.widths}.")
        return self.widths.index(bits)

    def selector(self, bits_per_block: Sequence[int]) -> np.ndarray:
        """Per-block bit widths -> selector codes ``(L,)`` int32."""
        bits = list(bits_per_block)
        if len(bits) != self.model.n_blocks:
            raise ValueError(
                f"bits_per_block has {len(bits)} entries; the model has "
                f"{self.model.n_blocks} blocks."
            )
        return np.asarray([self.index(int(b)) for b in bits], np.int32)

    def _params(self, cands, rest, sel):
        blocks = []
        for i, (treedef, flags) in enumerate(
            zip(self._treedefs, self._stacked, strict=True)
        ):
            leaves = [
                jax.lax.dynamic_index_in_dim(c, sel[i], axis=0, keepdims=False)
                if f
                else c
                for c, f in zip(cands[i], flags, strict=True)
            ]
            blocks.append(jax.tree_util.tree_unflatten(treedef, leaves))
        return {**rest, "blocks": blocks}

    def _batch_loss(self, cands, rest, sels, tokens):
        self.n_traces += 1  # Python side effect: runs once per trace.
        return jax.vmap(
            lambda s: self.model.loss(self._params(cands, rest, s), tokens)
        )(sels)

    def _batch_kl(self, cands, rest, sels, ref):
        self.n_traces += 1

        def kl(s):
            logits = self.model.logits(self._params(cands, rest, s), ref.tokens)
            logq = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
            return ref.neg_entropy - jnp.mean(jnp.sum(ref.probs * logq, -1))

        return jax.vmap(kl)(sels)

    def _check_selectors(self, selectors: np.ndarray) -> np.ndarray:
        sels = np.asarray(selectors, np.int32)
        if sels.ndim != 2 or sels.shape[1] != self.model.n_blocks:
            raise ValueError(
                f"selectors must be (n, {self.model.n_blocks}), got {sels.shape}."
            )
        if sels.size and (sels.min() < 0 or sels.max() >= len(self.widths)):
            raise ValueError(f"selector codes must be in [0, {len(self.widths)}).")
        return sels

    def _batched(self, fn, selectors, data, callback) -> np.ndarray:
        """``fn(cands, rest, chunk, data)`` over ``batch_size`` rows at a time."""
        sels = self._check_selectors(selectors)
        out = np.zeros(len(sels))
        bs = self.batch_size
        for start in range(0, len(sels), bs):
            chunk = sels[start : start + bs]
            pad = bs - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
            vals = fn(self._cands, self._rest, jnp.asarray(chunk), data)
            out[start : start + bs - pad] = np.asarray(vals, np.float64)[: bs - pad]
            if callback is not None:
                callback(min(start + bs, len(sels)), len(sels))
        return out

    def losses(
        self, selectors: np.ndarray, tokens: Any, callback: Callback | None = None
    ) -> np.ndarray:
        """Mean NLL of ``tokens`` for each row of per-block selector codes.

        Args:
          selectors: ``(n, L)`` ints indexing `widths`.
          tokens: ``(batch, t)`` token ids.
          callback: ``callback(done, total)`` after each jitted call.

        Returns:
          ``(n,)`` float64 losses (nats).
        """
        return self._batched(self._jitted, selectors, jnp.asarray(tokens), callback)

    def reference(self, tokens: Any) -> Reference:
        """The full-precision model's next-token distribution on ``tokens``.

        Args:
          tokens: ``(batch, t)`` token ids (windows, as for `losses`).

        Returns:
          A `Reference` (probabilities ``(batch, t - 1, vocab)`` in float32 and
          their mean negative entropy), the input of `kls`.

        Raises:
          ValueError: if the model has no ``logits`` function.
        """
        if self.model.logits is None:
            raise ValueError(
                f"the KL value needs the model's logits, but model "
                f"{self.model.name!r} has no `logits` function; pass one to "
                "BlockModel (model.from_nnx: logits_fn)."
            )
        tokens = jnp.asarray(tokens)
        logits = jax.jit(self.model.logits)(self.model.params, tokens)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        probs = jnp.exp(logp)
        neg_entropy = jnp.mean(jnp.sum(probs * logp, -1))
        return Reference(tokens, probs, neg_entropy)

    def kls(
        self,
        selectors: np.ndarray,
        reference: Reference,
        callback: Callback | None = None,
    ) -> np.ndarray:
        """Mean ``KL(reference || quantized)`` per token, per row of selectors.

        Unlike the NLL, the KL to the full-precision model's own
        distribution is 0 at full precision and does not saturate where the
        model is broken (NLL's ceiling is the unigram entropy).

        Args:
          selectors: ``(n, L)`` ints indexing `widths`.
          reference: from `reference` on the scoring tokens.
          callback: ``callback(done, total)`` after each jitted call.

        Returns:
          ``(n,)`` float64 KL divergences (nats per token).
        """
        return self._batched(self._jitted_kl, selectors, reference, callback)

    def loss_of_bits(self, bits_per_block: Sequence[int], tokens: Any) -> float:
        """Mean NLL with block ``l`` at ``bits_per_block[l]`` bits."""
        return float(self.losses(self.selector(bits_per_block)[None], tokens)[0])


@dataclasses.dataclass(frozen=True)
class SPQEResult:
    """Shapley estimates of every block.

    Attributes:
      phi: ``(L,)`` Shapley value estimates (nats of loss saved by keeping the
        block at the high width; summed over stages).
      se: ``(L,)`` standard errors of ``phi``.
      deltas: ``(M, L)`` marginal contributions per permutation (summed over
        stages).
      stage_phi: ``(n_stages, L)`` the estimate of each stage game.
      permutations: ``(M, L)`` the permutations used.
      n_evals: distinct coalitions evaluated.
      n_lookups: coalition values used (``n_lookups - n_evals`` came from the
        cache).
      wall_s: seconds spent.
    """

    phi: np.ndarray
    se: np.ndarray
    deltas: np.ndarray
    stage_phi: np.ndarray
    permutations: np.ndarray
    n_evals: int
    n_lookups: int
    wall_s: float


def _permutations(n_players, n_permutations, antithetic, rng):
    if antithetic:
        if n_permutations % 2:
            raise ValueError(
                f"n_permutations={n_permutations} must be even with antithetic "
                "sampling (pairs of a permutation and its reverse); accepted: "
                "2, 4, 6, ..."
            )
        half = [rng.permutation(n_players) for _ in range(n_permutations // 2)]
        return np.stack([p for h in half for p in (h, h[::-1])])
    return np.stack([rng.permutation(n_players) for _ in range(n_permutations)])


def spqe(
    loss_fn: Callable[[np.ndarray], np.ndarray],
    n_players: int,
    *,
    stages: Sequence[tuple[int, int]],
    n_permutations: int = 8,
    antithetic: bool = True,
    seed: int = 0,
    permutations: np.ndarray | None = None,
    chunk_size: int = 64,
    callback: Callback | None = None,
) -> SPQEResult:
    """Monte Carlo permutation estimate of Shapley values over stage games.

    Args:
      loss_fn: ``loss_fn(selectors (n, L) int32) -> (n,)`` losses; a selector
        entry is the code of a block's width. ``v(S) = -loss``.
      n_players: L.
      stages: ``[(hi, lo), ...]`` selector codes of each stage game: blocks in
        the coalition get ``hi``, the others ``lo``.
      n_permutations: M, the number of permutations (even when antithetic).
      antithetic: draw permutations as (pi, reversed(pi)) pairs.
      seed: seed of the permutation sampler.
      permutations: explicit ``(M, L)`` permutations (overrides sampling;
        standard errors then treat rows as independent).
      chunk_size: coalitions per ``loss_fn`` call.
      callback: ``callback(done, total)`` progress over distinct coalitions.

    Returns:
      An `SPQEResult`.
    """
    start = time.perf_counter()
    if isinstance(n_players, bool) or not isinstance(n_players, int | np.integer):
        raise TypeError(f"n_players must be an int, got {n_players!r}.")
    if n_players < 1:
        raise ValueError(f"n_players must be >= 1, got {n_players}.")
    stages = [(int(h), int(lo)) for h, lo in stages]
    if not stages:
        raise ValueError("stages must hold at least one (hi, lo) pair.")
    if permutations is None:
        if isinstance(n_permutations, bool) or not isinstance(n_permutations, int):
            raise TypeError(f"n_permutations must be an int, got {n_permutations!r}.")
        if n_permutations < 2:
            raise ValueError(
                f"n_permutations must be >= 2 (standard errors), got {n_permutations}."
            )
        perms = _permutations(
            n_players, n_permutations, antithetic, np.random.default_rng(seed)
        )
    else:
        perms = np.asarray(permutations, np.int64)
        if (
            perms.ndim != 2
            or perms.shape[1] != n_players
            or not all(sorted(p) == list(range(n_players)) for p in perms.tolist())
        ):
            raise ValueError(f"permutations must be (M, {n_players}) permutations.")
        antithetic = False
    n_perm = len(perms)

    # Every (stage, permutation, prefix length) -> a selector row.
    rows = np.empty((len(stages), n_perm, n_players + 1, n_players), np.int32)
    for s, (hi, lo) in enumerate(stages):
        member = np.zeros((n_perm, n_players + 1, n_players), bool)
        for j in range(1, n_players + 1):
            member[:, j] = member[:, j - 1]
            member[np.arange(n_perm), j, perms[:, j - 1]] = True
        rows[s] = np.where(member, hi, lo)
    flat = rows.reshape(-1, n_players)
    unique, inverse = np.unique(flat, axis=0, return_inverse=True)
    losses = np.zeros(len(unique))
    for lo_i in range(0, len(unique), chunk_size):
        chunk = unique[lo_i : lo_i + chunk_size]
        got = np.asarray(loss_fn(chunk), np.float64)
        if got.shape != (len(chunk),):
            raise ValueError(
                f"loss_fn returned shape {got.shape}, expected ({len(chunk)},)."
            )
        losses[lo_i : lo_i + len(chunk)] = got
        if callback is not None:
            callback(lo_i + len(chunk), len(unique))
    values = -losses[inverse.reshape(-1)].reshape(rows.shape[:3])
    # marginal[s, m, j]: value gained when perms[m, j] joins (stage s).
    marginal = np.diff(values, axis=2)
    stage_deltas = np.zeros((len(stages), n_perm, n_players))
    for s in range(len(stages)):
        np.put_along_axis(stage_deltas[s], perms, marginal[s], axis=1)
    deltas = stage_deltas.sum(0)
    phi = deltas.mean(0)
    if antithetic:
        pairs = deltas.reshape(n_perm // 2, 2, n_players).mean(1)
    else:
        pairs = deltas
    if len(pairs) > 1:
        se = pairs.std(0, ddof=1) / math.sqrt(len(pairs))
    else:
        se = np.full(n_players, np.nan)
    return SPQEResult(
        phi=phi,
        se=se,
        deltas=deltas,
        stage_phi=stage_deltas.mean(1),
        permutations=perms,
        n_evals=len(unique),
        n_lookups=flat.shape[0],
        wall_s=time.perf_counter() - start,
    )


def estimate(
    forward: SelectorForward,
    tokens: Any,
    *,
    chain: Sequence[int] = (4, 3, 2),
    n_permutations: int = 8,
    antithetic: bool = True,
    seed: int = 0,
    callback: Callback | None = None,
) -> SPQEResult:
    """SPQE on a model: progressive leaving along ``chain`` (high to low bits).

    Args:
      forward: the pre-quantized model; its widths must include ``chain``.
      tokens: calibration tokens ``(batch, t)``.
      chain: widths from high to low, e.g. ``(4, 3, 2)``: stage games
        ``(4, 3)`` and ``(3, 2)``.
      n_permutations: M (even when antithetic).
      antithetic: antithetic permutation pairs.
      seed: sampler seed.
      callback: progress ``callback(done, total)``.

    Returns:
      An `SPQEResult`.
    """
    chain = _check_widths(chain, "chain")
    if len(chain) < 2 or any(a <= b for a, b in itertools.pairwise(chain)):
        raise ValueError(
            f"chain must list at least two widths from high to low, got {chain}."
        )
    idx = [forward.index(b) for b in chain]
    stages = list(itertools.pairwise(idx))

    def loss_fn(sels):
        return forward.losses(sels, tokens)

    return spqe(
        loss_fn,
        forward.model.n_blocks,
        stages=stages,
        n_permutations=n_permutations,
        antithetic=antithetic,
        seed=seed,
        chunk_size=forward.batch_size,
        callback=callback,
    )
