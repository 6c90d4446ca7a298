"""End-to-end IMPQ: the game, the allocation, every baseline, export rules.

`run` does, on one `model.BlockModel` and one seed:

1. pre-quantize every block at every width once (`spqe.SelectorForward`,
   widths ``bit_choices`` plus the full-precision weights) and cache the
   full-precision next-token distribution on the calibration tokens;
2. per code-bit budget strictly between two widths, play the game at its
   operating point (`game.play`: coalitions sampled with ``p = (B - lo) /
   (hi - lo)``, value ``-KL``, a quadratic surrogate) and allocate exactly
   (`allocate.allocate`) with its pairwise terms (``impq``) and without them
   (``impq_noint``, the ablation);
3. the baselines asked for (`baselines`), all on the same candidates and the
   same budget: ``uniform`` (best mix), ``isolated`` (each block alone at
   every width, the others full), ``isolated_hi`` (each alone at ``hi``, the
   others at ``lo``), ``fisher`` (HAWQ-v2 trace), ``lim``, ``random``
   (``n_random`` draws, one record each) and ``greedy`` (KL descent);
4. held-out perplexity, calibration KL, code bits and all-in bits (from the
   packed arrays) of every allocation.

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

import jax
import numpy as np

from optax_lowbit.impq import allocate, baselines, game, gptq, quantizer, spqe
from optax_lowbit.impq import model as _model

METHODS = (
    "impq",
    "impq_noint",
    "uniform",
    "isolated",
    "isolated_hi",
    "fisher",
    "lim",
    "random",
    "greedy",
)
#: IMPQ with its pairwise terms and the zero-interaction ablation.
IMPQ_METHODS = ("impq", "impq_noint")
#: the default widths: the table's budgets (2.25 to 3.5 code bits) lie in them.
BIT_CHOICES = (2, 3, 4)
#: the block quantizers every method can share (`prequantize`).
QUANTIZERS = ("gptq_act", "gptq", "rtn_mse")

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


def uses_gptq(name: str) -> bool:
    """Whether quantizer ``name`` is GPTQ (calibration tokens, a Llama port)."""
    return name in ("gptq_act", "gptq")


def check_quantizer(name: str, model: _model.BlockModel | None = None) -> str:
    """Raises unless ``name`` is one of `QUANTIZERS` (usable on ``model``).

    Args:
      name: the quantizer's name.
      model: if given, GPTQ's need of a Llama-port model is checked too.

    Returns:
      ``name``.
    """
    if name not in QUANTIZERS:
        raise ValueError(f"quantizer={name!r} is not one of {QUANTIZERS}.")
    if uses_gptq(name) and model is not None and model.llama_config is None:
        raise ValueError(
            f"quantizer={name!r} runs the blocks of a Llama-port model "
            f"(`model.llama_model`); {model.name!r} is not one: use 'rtn_mse'."
        )
    return name


def prequantize(
    model: _model.BlockModel,
    tokens: np.ndarray,
    bit_choices: Sequence[int],
    name: str = "gptq_act",
    progress: Progress = _no_progress,
) -> dict[int, Any]:
    """Every block at every width with one quantizer, for `run`'s ``prequantized``.

    Args:
      model: the model.
      tokens: ``(n_seq, t)`` calibration tokens (GPTQ's Hessians; unused by
        ``rtn_mse``).
      bit_choices: the widths.
      name: ``"gptq_act"`` (GPTQ with act-order, `gptq.quantize_model`),
        ``"gptq"`` (without) or ``"rtn_mse"`` (MSE-clipped round to nearest,
        `quantizer.quantize_tree`).
      progress: ``progress(desc, total) -> callback(done, total)``.

    Returns:
      ``{width: {"blocks": [...]}}``: the quantized blocks of each width.

    Raises:
      ValueError: an unknown quantizer, or GPTQ on a model that is not a
        Llama port.
    """
    check_quantizer(name, model)
    blocks = model.params["blocks"]
    if name == "rtn_mse":
        return {
            b: {"blocks": [quantizer.quantize_tree(x, b) for x in blocks]}
            for b in bit_choices
        }
    out = {}
    for b in bit_choices:
        with jax.default_matmul_precision("highest"):
            out[b] = gptq.quantize_model(
                model.params,
                model.llama_config,
                tokens,
                b,
                act_order=name == "gptq_act",
                batch_size=8,
                callback=progress(f"{name} {b}-bit blocks", model.n_blocks),
            )
    return out


def check_methods(methods: Sequence[str]) -> tuple[str, ...]:
    """Returns ``methods`` as a tuple, or raises naming the accepted ones."""
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(
            f"methods must be a non-empty subset of {METHODS}, got {list(methods)}."
        )
    return tuple(methods)


def _game_record(budget: float, res: game.GameResult) -> dict[str, Any]:
    pairs = res.surrogate.pairs[np.triu_indices(len(res.phi), 1)]
    return {
        "budget_bits": budget,
        "lo": res.point.lo,
        "hi": res.point.hi,
        "p": res.point.p,
        "n_samples": len(res.values),
        "n_evals": res.n_evals,
        "heldout_r2": res.heldout_r2,
        "ridge": res.ridge,
        "phi": res.phi.tolist(),
        "msr_phi": res.msr_phi.tolist(),
        "intercept": res.surrogate.intercept,
        "linear": res.surrogate.linear.tolist(),
        "pairs": res.surrogate.pairs.tolist(),
        "n_pairs_positive": int(np.sum(pairs > 0)),
        "n_pairs_negative": int(np.sum(pairs < 0)),
        "mean_abs_pair": float(np.mean(np.abs(pairs))),
        "value_mean": float(res.values.mean()),
        "wall_s": res.wall_s,
    }


def run(
    model: _model.BlockModel,
    calib: np.ndarray,
    heldout: np.ndarray,
    *,
    budgets: Sequence[float],
    methods: Sequence[str] = ("impq", "uniform"),
    bit_choices: Sequence[int] = BIT_CHOICES,
    n_samples: int = 1000,
    n_random: int = 5,
    batch_size: int = 1,
    seed: int = 0,
    time_limit: float | None = 120.0,
    prequantized: dict[int, Any] | None = None,
    progress: Progress = _no_progress,
) -> dict[str, Any]:
    """Runs IMPQ and baselines on one model and one seed; a JSON-able report.

    Args:
      model: the model (``logits`` needed for the KL value).
      calib: ``(batch, t)`` calibration tokens (games, sensitivities, greedy).
      heldout: ``(batch, t)`` held-out tokens for perplexity.
      budgets: code bits per weight, e.g. ``(2.25, 2.5, 3.0)``.
      methods: any of `METHODS`.
      bit_choices: widths the allocations may use (IMPQ: the two around the
        budget and any between them).
      n_samples: coalitions sampled per game (>= 1000 for a real run).
      n_random: random allocations per budget (one record each).
      batch_size: coalitions per jitted call.
      seed: the game's and the random draws' seed.
      time_limit: MILP time limit (s).
      prequantized: ``{width: params}`` quantized elsewhere (GPTQ), as for
        `spqe.SelectorForward`.
      progress: ``progress(desc, total) -> callback(done, total)``.

    Returns:
      ``{"records": [...], "games": [...], "reference_ppl": ..., ...}``; one
      record per (method, budget) (per draw for ``random``) with ``ppl``,
      ``calib_kl``, ``code_bits``, ``all_in_bits``, ``bits_per_block`` and
      ``rules``.
    """
    methods = check_methods(methods)
    choices = allocate.check_bit_choices(bit_choices)
    budgets = [allocate.check_budget(b, choices) for b in budgets]
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    fwd = spqe.SelectorForward(
        model,
        (*choices, spqe.FULL),
        batch_size=batch_size,
        callback=progress("pre-quantize blocks", model.n_blocks),
        prequantized=prequantized,
    )
    n = model.n_blocks
    ref = fwd.reference(calib)
    timings["prequantize_s"] = time.perf_counter() - t0
    sse = fwd.sse[:, [fwd.index(b) for b in choices]]
    report: dict[str, Any] = {
        "model": model.name,
        "n_blocks": n,
        "seed": seed,
        "bit_choices": list(choices),
        "games": [],
        "records": [],
    }

    def kl_of_bits(bits: np.ndarray, desc: str = "") -> np.ndarray:
        sels = np.stack([fwd.selector(b) for b in bits])
        cb = progress(desc, len(sels)) if desc else None
        return fwd.kls(sels, ref, callback=cb)

    allocations: list[tuple[str, float, np.ndarray, dict[str, Any]]] = []

    def add(method, budget, alloc_or_bits, **extra):
        if isinstance(alloc_or_bits, allocate.Allocation):
            extra["solver_status"] = alloc_or_bits.status
            alloc_or_bits = alloc_or_bits.bits
        allocations.append((method, budget, np.asarray(alloc_or_bits), extra))

    t0 = time.perf_counter()
    inside = [b for b in budgets if choices[0] < b < choices[-1]]
    for budget in budgets:
        if budget not in inside and set(methods) & set(IMPQ_METHODS):
            for m in IMPQ_METHODS:  # no choice left: every block at the width
                if m in methods:
                    add(m, budget, baselines.uniform(n, budget, choices))
    for i, budget in enumerate(inside if set(methods) & set(IMPQ_METHODS) else []):
        pt = game.operating_point(budget, choices)
        codes = fwd.index(pt.lo), fwd.index(pt.hi)

        def value(coalitions, codes=codes):
            return -fwd.kls(np.where(coalitions, codes[1], codes[0]), ref)

        res = game.play(
            value,
            n,
            pt,
            n_samples=n_samples,
            seed=seed * 1000 + i,
            chunk_size=fwd.batch_size * 8,
            callback=progress(f"game at {budget:g} bits", n_samples),
        )
        report["games"].append(_game_record(budget, res))
        sub = tuple(b for b in choices if pt.lo <= b <= pt.hi)
        e = allocate.relative_errors(fwd.sse, fwd.widths, sub)
        if len(sub) == 3:  # a budget on a width: place it by measured KL
            sels = baselines.one_block_selectors(n, fwd.index(sub[1]), codes)
            kl = fwd.kls(sels, ref)
            e[:, 1] = game.middle_errors(kl[0], kl[1::2], kl[2::2])
            report["games"][-1]["middle_errors"] = e[:, 1].tolist()
        # spend at least what the uniform mix spends (a noisy surrogate may
        # call a block's extra bits harmful; the user asked for the budget)
        mix = baselines.uniform(n, budget, choices, sizes=fwd.sizes)
        spend = float(fwd.sizes @ mix / fwd.sizes.sum())
        terms = {
            "impq": game.allocation_terms(res.surrogate),
            "impq_noint": game.banzhaf_terms(res.surrogate, pt.p),
        }
        for m in IMPQ_METHODS:
            if m in methods:
                phi, c = terms[m]
                alloc = allocate.allocate(
                    phi,
                    c,
                    e,
                    avg_bits=budget,
                    bit_choices=sub,
                    sizes=fwd.sizes,
                    min_avg_bits=spend,
                    time_limit=time_limit,
                )
                add(m, budget, alloc)
    timings["games_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tables: dict[str, np.ndarray] = {}
    if "isolated" in methods:
        tables["isolated"] = baselines.isolated_table(
            fwd, ref, choices, callback=progress("isolated sensitivity", 0)
        )
    if "fisher" in methods:
        traces = baselines.fisher_traces(model, calib)
        tables["fisher"] = baselines.scaled_errors(traces, fwd, choices, relative=False)
    if "lim" in methods:
        lim = baselines.lim_scores(model, calib)
        tables["lim"] = baselines.scaled_errors(lim, fwd, choices, relative=True)
    gains: dict[tuple[int, int], np.ndarray] = {}
    for budget in budgets:
        if "uniform" in methods:
            add(
                "uniform",
                budget,
                baselines.uniform(n, budget, choices, sizes=fwd.sizes, cost=sse),
            )
        for m, table in tables.items():
            add(m, budget, baselines.additive(table, budget, choices, fwd.sizes))
        if "isolated_hi" in methods:
            if budget in inside:
                pt = game.operating_point(budget, choices)
                if (pt.lo, pt.hi) not in gains:
                    gains[pt.lo, pt.hi] = baselines.isolated_gains(
                        fwd, ref, pt.lo, pt.hi, callback=progress("isolated hi", 0)
                    )
                sub = tuple(b for b in choices if pt.lo <= b <= pt.hi)
                # a measured gain below 0 is noise (more bits, worse KL): held
                # at a tiny positive floor so that the budget is still spent
                g = gains[pt.lo, pt.hi]
                g = np.maximum(g, 1e-4 * max(float(np.abs(g).max()), 1e-30))
                table = g[:, None] * allocate.relative_errors(fwd.sse, fwd.widths, sub)
                add(
                    "isolated_hi",
                    budget,
                    baselines.additive(table, budget, sub, fwd.sizes),
                )
            else:
                add("isolated_hi", budget, baselines.uniform(n, budget, choices))
        if "random" in methods:
            rng = np.random.default_rng([seed, round(budget * 1000)])
            for d in range(n_random):
                bits = baselines.random_bits(n, budget, rng, choices, fwd.sizes)
                add("random", budget, bits, draw=d)
    if "greedy" in methods:
        path = baselines.greedy_descent(
            lambda bits: kl_of_bits(bits),
            n,
            budgets,
            choices,
            fwd.sizes,
            callback=progress("greedy KL descent", n * (len(choices) - 1)),
        )
        for budget in budgets:
            add("greedy", budget, path[budget])
    timings["baselines_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    bits_all = np.stack([b for _, _, b, _ in allocations])
    sels = np.stack([fwd.selector(b) for b in bits_all])
    full_sel = np.full((1, n), fwd.index(spqe.FULL), np.int32)
    nlls = fwd.losses(
        np.concatenate([full_sel, sels]),
        heldout,
        callback=progress("held-out eval", len(sels) + 1),
    )
    report["reference_nll"] = float(nlls[0])
    report["reference_ppl"] = math.exp(float(nlls[0]))
    calib_kls = kl_of_bits(bits_all, "calibration KL")
    timings["eval_s"] = time.perf_counter() - t0
    total = float(fwd.sizes.sum())
    for (m, budget, bits, extra), nll, kl in zip(
        allocations, nlls[1:], calib_kls, strict=True
    ):
        idx = [fwd.index(int(b)) for b in bits]
        packed = int(fwd.nbytes[np.arange(n), idx].sum())
        report["records"].append(
            {
                "model": model.name,
                "method": m,
                "budget_bits": budget,
                "code_bits": float(fwd.sizes @ bits / total),
                "all_in_bits": 8.0 * packed / total,
                "nll": float(nll),
                "ppl": math.exp(float(nll)),
                "calib_kl": float(kl),
                "bits_per_block": [int(b) for b in bits],
                "rules": export_rules(bits),
                **extra,
            }
        )
    report["timings"] = timings
    report["n_traces"] = fwd.n_traces
    return report


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
