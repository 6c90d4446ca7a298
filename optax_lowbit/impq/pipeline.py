"""End-to-end IMPQ: estimate, allocate, compare with baselines, export rules.

`run` does, on one `model.BlockModel`:

1. pre-quantize every block at every width once (`spqe.SelectorForward`,
   widths ``bit_choices`` plus the full-precision weights);
2. SPQE along the chain (default 4 -> 3 -> 2) on calibration tokens;
3. the interaction matrix and, per budget, the exact MILP allocation;
4. per budget, the baselines asked for, all at the same all-in budget;
5. held-out perplexity of every allocation with the same jitted forward.

`export_rules` writes an allocation as ordered path-regex rules, the form
qwix and MaxText take: ``[["blocks/3/.*", {"bits": 2, "group_size": 64}],
...]``; the first matching rule wins and leaves no rule matches (embeddings,
norms) stay in full precision.

Examples:
  >>> export_rules([2, 4])[1]
  ['blocks/1/.*', {'bits': 4, 'group_size': 64}]
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from optax_lowbit.impq import allocate, baselines, interaction, quantizer, spqe
from optax_lowbit.impq import model as _model

METHODS = ("impq", "impq_phi", "uniform", "isolated", "fisher", "lim", "random")
#: the two IMPQ linear terms: per-stage Shapley costs (`allocate.stage_costs`,
#: the default) and the paper's ``phi_l * e_l(b)`` with relative weight errors.
IMPQ_METHODS = ("impq", "impq_phi")

Progress = Callable[[str, int], Callable[[int, int], None]]


def export_rules(
    bits_per_block: Sequence[int],
    *,
    prefix: str = "blocks",
    group_size: int = quantizer.GROUP_SIZE,
) -> list[list[Any]]:
    """Per-block bits as ordered ``[path_regex, {"bits": b, ...}]`` rules.

    Args:
      bits_per_block: bits of each block.
      prefix: the key of the block list in the param tree.
      group_size: quantizer group size, stored in each rule.

    Returns:
      A JSON-able list of ``[regex, config]`` pairs, one per block.
    """
    return [
        [f"{prefix}/{i}/.*", {"bits": int(b), "group_size": group_size}]
        for i, b in enumerate(bits_per_block)
    ]


def _no_progress(desc: str, total: int) -> Callable[[int, int], None]:
    del desc, total
    return lambda done, total: None


def run(
    model: _model.BlockModel,
    calib: np.ndarray,
    heldout: np.ndarray,
    *,
    budgets: Sequence[float],
    methods: Sequence[str] = ("impq", "uniform"),
    bit_choices: Sequence[int] = quantizer.BIT_CHOICES,
    chain: Sequence[int] = (4, 3, 2),
    n_permutations: int = 8,
    shrinkage: float | str = 0.5,
    n_random: int = 8,
    batch_size: int = 1,
    seed: int = 0,
    time_limit: float | None = 120.0,
    progress: Progress = _no_progress,
) -> dict[str, Any]:
    """Runs IMPQ and baselines on one model and returns a JSON-able report.

    Args:
      model: the model.
      calib: ``(batch, t)`` calibration tokens (SPQE, sensitivities, random).
      heldout: ``(batch, t)`` held-out tokens for perplexity.
      budgets: average all-in bits budgets, e.g. ``(2.5, 3.0, 3.5)``.
      methods: any of `METHODS`.
      bit_choices: widths the allocations may use.
      chain: SPQE's progressive width chain, high to low.
      n_permutations: SPQE permutations (even: antithetic pairs).
      shrinkage: interaction shrinkage (alpha or ``"ledoit-wolf"``).
      n_random: seeds of the random baseline.
      batch_size: coalitions per jitted call.
      seed: SPQE and random seed.
      time_limit: MILP time limit (s).
      progress: ``progress(desc, total) -> callback(done, total)``.

    Returns:
      ``{"records": [...], "spqe": {...}, "reference_ppl": ..., "timings": ...}``;
      one record per (method, budget) with ``ppl``, ``bits_per_block``,
      ``avg_bits`` (all-in), ``packed_bytes`` and ``rules``.
    """
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"methods must be a subset of {METHODS}, got {m!r}.")
    choices = allocate.check_bit_choices(bit_choices)
    for b in budgets:
        allocate.check_budget(b, choices)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    widths = (*sorted(set(choices) | set(chain)), spqe.FULL)
    fwd = spqe.SelectorForward(
        model,
        widths,
        batch_size=batch_size,
        callback=progress("pre-quantize blocks", model.n_blocks),
    )
    timings["prequantize_s"] = time.perf_counter() - t0
    n = model.n_blocks
    full_sel = np.full((1, n), fwd.index(spqe.FULL), np.int32)
    ref_nll = float(fwd.losses(full_sel, heldout)[0])
    report: dict[str, Any] = {
        "model": model.name,
        "n_blocks": n,
        "reference_ppl": math.exp(ref_nll),
        "bit_choices": list(choices),
        "records": [],
    }
    result = None
    if any(m in IMPQ_METHODS for m in methods):
        t0 = time.perf_counter()
        n_perm = n_permutations
        cb = progress("SPQE coalitions", 0)
        result = spqe.estimate(
            fwd, calib, chain=chain, n_permutations=n_perm, seed=seed, callback=cb
        )
        c_raw = interaction.interaction_matrix(result.deltas, shrinkage=shrinkage)
        timings["spqe_s"] = time.perf_counter() - t0
        report["spqe"] = {
            "chain": list(chain),
            "n_permutations": n_perm,
            "antithetic": True,
            "shrinkage": shrinkage,
            "phi": result.phi.tolist(),
            "se": result.se.tolist(),
            "stage_phi": result.stage_phi.tolist(),
            "n_pairs_negative": int(np.sum(np.triu(c_raw + c_raw.T, 1) < 0)),
            "deltas": result.deltas.tolist(),
            "n_phi_clipped": int(np.sum(result.phi < 0)),
            "n_evals": result.n_evals,
            "n_lookups": result.n_lookups,
            "wall_s": result.wall_s,
            "n_traces": fwd.n_traces,
        }
        errors = allocate.relative_errors(fwd.sse, fwd.widths, choices)
        terms = {}
        for m in IMPQ_METHODS:
            if m not in methods:
                continue
            linear, c, n_capped = impq_terms(
                m, result.phi, result.stage_phi, c_raw, errors, chain, choices
            )
            terms[m] = linear, c
            report["spqe"][f"{m}_n_pairs_capped"] = n_capped
    tables: dict[str, np.ndarray] = {}
    t0 = time.perf_counter()
    if "isolated" in methods:
        tables["isolated"] = baselines.isolated_table(
            fwd, calib, choices, callback=progress("isolated sensitivity", 0)
        )
    if "fisher" in methods:
        tables["fisher"] = baselines.fisher_table(model, fwd, calib, choices)
    if "lim" in methods:
        tables["lim"] = baselines.lim_table(model, fwd, calib, choices)
    timings["baseline_scores_s"] = time.perf_counter() - t0
    allocations: list[tuple[str, float, np.ndarray, str]] = []
    for budget in budgets:
        for m in methods:
            status = ""
            if m in IMPQ_METHODS:
                linear, c = terms[m]
                alloc = allocate.allocate(
                    linear,
                    c,
                    errors,
                    avg_bits=budget,
                    bit_choices=choices,
                    sizes=fwd.sizes,
                    time_limit=time_limit,
                )
                bits, status = alloc.bits, alloc.status
            elif m == "uniform":
                bits = baselines.uniform(n, budget, choices)
            elif m == "random":
                bits, _ = baselines.best_random(
                    fwd, calib, budget, n_seeds=n_random, bit_choices=choices, seed=seed
                )
            else:
                alloc = baselines.additive(tables[m], budget, choices, fwd.sizes)
                bits, status = alloc.bits, alloc.status
            allocations.append((m, budget, np.asarray(bits), status))
    t0 = time.perf_counter()
    sels = np.stack([fwd.selector(b) for _, _, b, _ in allocations])
    nlls = fwd.losses(sels, heldout, callback=progress("held-out eval", len(sels)))
    timings["eval_s"] = time.perf_counter() - t0
    for (m, budget, bits, status), nll in zip(allocations, nlls, strict=True):
        idx = [fwd.index(int(b)) for b in bits]
        packed = int(fwd.nbytes[np.arange(n), idx].sum())
        report["records"].append(
            {
                "model": model.name,
                "method": m,
                "budget_bits": budget,
                "avg_bits": float(
                    fwd.sizes @ (bits + 32.0 / quantizer.GROUP_SIZE) / fwd.sizes.sum()
                ),
                "packed_bits_per_weight": 8.0 * packed / float(fwd.sizes.sum()),
                "nll": float(nll),
                "ppl": math.exp(float(nll)),
                "bits_per_block": [int(b) for b in bits],
                "solver_status": status,
                "rules": export_rules(bits),
            }
        )
    report["timings"] = timings
    report["n_traces"] = fwd.n_traces
    return report


def impq_terms(
    method: str,
    phi: np.ndarray,
    stage_phi: np.ndarray,
    interactions: np.ndarray,
    errors: np.ndarray,
    chain: Sequence[int],
    bit_choices: Sequence[int],
) -> tuple[np.ndarray, np.ndarray, int]:
    """IMPQ's linear term and guarded interaction matrix for `allocate.allocate`.

    Args:
      method: ``"impq"`` (per-stage costs, `allocate.stage_costs`; needs every
        chain width in ``bit_choices``) or ``"impq_phi"`` (the paper's
        ``phi_l * e_l(b)``).
      phi: ``(L,)`` Shapley values.
      stage_phi: ``(n_stages, L)`` per-stage Shapley values.
      interactions: ``(L, L)`` raw interaction matrix.
      errors: ``(L, K)`` relative weight errors.
      chain: SPQE's width chain.
      bit_choices: the widths.

    Returns:
      ``(linear, C, n_capped)``: ``linear`` as ``allocate``'s ``phi`` (a
      table, with a ``1e-6`` relative tie-break towards lower error so that
      budget the estimate calls free is still spent), ``C`` made monotone
      (`allocate.monotone_terms`).
    """
    if method == "impq":
        table = allocate.stage_costs(stage_phi, chain, errors, bit_choices)
        slopes = allocate.cost_slopes(table, errors)
        _, c, n_capped = allocate.monotone_terms(slopes, interactions)
    elif method == "impq_phi":
        phi_c, c, n_capped = allocate.monotone_terms(phi, interactions)
        table = phi_c[:, None] * errors
    else:
        raise ValueError(f"method must be one of {IMPQ_METHODS}, got {method!r}.")
    scale = max(float(np.abs(table).max()), 1e-12)
    return table + 1e-6 * scale * errors, c, n_capped


def windows(ids: np.ndarray, n_tokens: int, seq_len: int) -> np.ndarray:
    """``n_tokens`` predicted tokens as ``(batch, seq_len + 1)`` windows.

    Args:
      ids: a 1-D token stream.
      n_tokens: how many tokens to predict in all (rounded up to windows).
      seq_len: predicted tokens per window.

    Returns:
      int32 ``(ceil(n_tokens / seq_len), seq_len + 1)``, consecutive windows
      overlapping by one token.
    """
    n_win = max(1, -(-n_tokens // seq_len))
    need = n_win * seq_len + 1
    ids = np.asarray(ids)
    if len(ids) < need:
        raise ValueError(f"need {need} tokens of text, got {len(ids)}.")
    return np.stack(
        [ids[i * seq_len : i * seq_len + seq_len + 1] for i in range(n_win)]
    ).astype(np.int32)
