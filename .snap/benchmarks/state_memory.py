"""Optimizer state memory per optimizer on a GPT-2-small-shaped Flax model.

Builds the model and every optimizer state with ``nnx.eval_shape`` /
``jax.eval_shape`` (shapes only: nothing is allocated, so it runs anywhere in
seconds), prints `optax_lowbit.summary` for each optimizer and one comparison
table, and writes ``benchmarks/results/state_memory.json``.

    python -m benchmarks.state_memory
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
from pathlib import Path

import jax
import optax
from flax import nnx

import optax_lowbit as lowbit
from benchmarks import models

RESULTS = Path(__file__).resolve().parent / "results"


def optimizers() -> dict[str, optax.GradientTransformation]:
    """Every optimizer of the comparison, with Optax's defaults otherwise."""
    lr = 3e-4
    return {
        "optax.adamw": optax.adamw(lr),
        "optax.adamw(mu_dtype=bf16)": optax.adamw(lr, mu_dtype="bfloat16"),
        "lowbit.adamw_8bit": lowbit.adamw_8bit(lr),
        "lowbit.adamw_4bit": lowbit.adamw_4bit(lr),
        "lowbit.adamw_piquant": lowbit.adamw_piquant(lr),
        "lowbit.adamw_polar(bits=2)": lowbit.adamw_polar(lr, bits=2),
        "lowbit.adamw_polar(bits=1.5)": lowbit.adamw_polar(lr, bits=1.5),
        "optax.adafactor(momentum=0.9)": optax.adafactor(lr, momentum=0.9),
        "lowbit.adafactor_polar(momentum=0.9)": lowbit.adafactor_polar(
            lr, momentum=0.9
        ),
        "optax.lion": optax.lion(lr),
        "lowbit.lion_polar": lowbit.lion_polar(lr),
        "optax.sgd(momentum=0.9)": optax.sgd(lr, momentum=0.9),
        "lowbit.sgd_polar": lowbit.sgd_polar(lr, momentum=0.9),
    }


def gpt2_small_params(vocab: int, seq_len: int):
    """Abstract parameters of a GPT-2-small-shaped TinyGPT (12 x 768)."""
    abstract = nnx.eval_shape(
        lambda: models.TinyGPT(
            vocab=vocab,
            d_model=768,
            n_layers=12,
            n_heads=12,
            seq_len=seq_len,
            tie_embeddings=True,
            rngs=nnx.Rngs(0),
        )
    )
    return nnx.state(abstract, nnx.Param)


def main(argv: list[str] | None = None) -> list[dict]:
    """Prints the summaries and the table; writes the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=RESULTS / "state_memory.json")
    parser.add_argument("--quiet", action="store_true", help="table only")
    args = parser.parse_args(argv)

    params = gpt2_small_params(args.vocab, args.seq_len)
    n_params = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
    records = []
    for name, tx in optimizers().items():
        state = jax.eval_shape(tx.init, params)
        nbytes = lowbit.state_bytes(state)
        if not args.quiet:
            print(f"\n== {name}\n{lowbit.summary(state, params)}")
        records.append(
            {
                "optimizer": name,
                "state_bytes": nbytes,
                "state_bytes_per_param": nbytes / n_params,
            }
        )
    base = records[0]["state_bytes"]
    print(f"\nGPT-2-small-shaped TinyGPT: {n_params:,} params (tied embedding)")
    print(f"{'optimizer':40s} {'state MB':>10s} {'B/param':>8s} {'vs adamw':>9s}")
    for r in records:
        r["ratio_vs_optax_adamw"] = r["state_bytes"] / base
        print(
            f"{r['optimizer']:40s} {r['state_bytes'] / 1e6:10.1f} "
            f"{r['state_bytes_per_param']:8.3f} {r['ratio_vs_optax_adamw']:9.3f}"
        )
    meta = {
        "model": "TinyGPT d_model=768 n_layers=12 n_heads=12 (GPT-2-small shapes)",
        "vocab": args.vocab,
        "seq_len": args.seq_len,
        "n_params": n_params,
        "jax": jax.__version__,
        "optax": optax.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "note": "shapes only (jax.eval_shape); bytes are exact for these shapes",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "records": records}, indent=2))
    return records


if __name__ == "__main__":
    main()
