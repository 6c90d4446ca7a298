"""Captures real Adam moments (mu, nu) from a short training run, cached.

Codec work needs realistic optimizer states rather than Gaussian noise: this
trains a small model on real data with ``optax.adam`` and returns its first and
second moments per parameter leaf. Results are cached as ``.npz`` under
``<cache>/moments/`` (see ``benchmarks.data.cache_dir``), keyed by every
argument, so repeated calls are instant.

Run ``python -m benchmarks.capture_moments`` for a table of leaf shapes and
moment statistics.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks import data, models

_FORMAT = 1  # Bump when the training recipe changes: invalidates old caches.


def path_name(key_path: tuple[Any, ...]) -> str:
    """Joins a JAX key path into ``"blocks/0/attn/qkv/kernel"`` form."""
    parts = []
    for entry in key_path:
        if isinstance(entry, jax.tree_util.DictKey):
            parts.append(str(entry.key))
        elif isinstance(entry, jax.tree_util.SequenceKey):
            parts.append(str(entry.idx))
        elif isinstance(entry, jax.tree_util.GetAttrKey):
            if entry.name != "value":  # nnx.Variable's array slot.
                parts.append(entry.name)
        else:
            parts.append(str(entry))
    return "/".join(parts)


def _build(model: str, config: dict[str, Any]):
    """Returns ``(nnx model, loss(model, batch), batch iterator)``."""
    rngs = nnx.Rngs(config["seed"])
    if model == "tinygpt":
        net = models.TinyGPT(
            vocab=256,
            d_model=config["d_model"],
            n_layers=config["n_layers"],
            n_heads=config["n_heads"],
            seq_len=config["seq_len"],
            rngs=rngs,
        )
        tokens = data.austen_bytes("train")
        batches = data.random_windows(
            tokens, config["batch_size"], config["seq_len"] + 1, seed=config["seed"]
        )
        return net, models.loss_fn, batches
    if model == "mlp":
        x, y, _, _ = data.digits(seed=config["seed"])
        net = models.MLP(64, (256, 256), 10, rngs=rngs)
        rng = np.random.default_rng(config["seed"])

        def digit_batches():
            while True:
                idx = rng.integers(0, len(x), size=config["batch_size"])
                yield x[idx], y[idx]

        def loss(m, batch):
            return models.classifier_loss(m, *batch)

        return net, loss, digit_batches()
    raise ValueError(f"model must be one of ('tinygpt', 'mlp'), got {model!r}.")


def _train(model: str, config: dict[str, Any]) -> dict[str, Any]:
    net, loss_of, batches = _build(model, config)
    graphdef, params = nnx.split(net, nnx.Param)
    tx = optax.adam(config["learning_rate"])
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        def f(p):
            return loss_of(nnx.merge(graphdef, p), batch)

        loss, grads = jax.value_and_grad(f)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    start = time.perf_counter()
    for _ in range(config["steps"]):
        batch = jax.tree.map(jnp.asarray, next(batches))
        params, opt_state, loss = step(params, opt_state, batch)
        losses.append(loss)
    losses = [float(v) for v in jax.device_get(losses)]
    seconds = time.perf_counter() - start

    adam_state = opt_state[0]
    out: dict[str, Any] = {"mu": {}, "nu": {}, "loss": losses}
    for name in ("mu", "nu"):
        leaves = jax.tree_util.tree_flatten_with_path(getattr(adam_state, name))[0]
        for key_path, leaf in leaves:
            if leaf.size >= config["min_size"]:
                out[name][path_name(key_path)] = np.asarray(leaf, dtype=np.float32)
    out["meta"] = {
        **config,
        "model": model,
        "seconds": seconds,
        "jax": jax.__version__,
        "device": str(jax.devices()[0]),
    }
    return out


def _cache_path(model: str, config: dict[str, Any]) -> str:
    key = json.dumps({"model": model, "format": _FORMAT, **config}, sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    folder = data.cache_dir() / "moments"
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder / f"adam_{model}_{digest}.npz")


def _save(path: str, result: dict[str, Any]) -> None:
    arrays = {f"mu:{k}": v for k, v in result["mu"].items()}
    arrays |= {f"nu:{k}": v for k, v in result["nu"].items()}
    arrays["loss"] = np.asarray(result["loss"], np.float32)
    arrays["meta"] = np.asarray(json.dumps(result["meta"]))
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(path: str) -> dict[str, Any]:
    with np.load(path) as z:
        out: dict[str, Any] = {"mu": {}, "nu": {}}
        for key in z.files:
            kind, _, name = key.partition(":")
            if kind in ("mu", "nu"):
                out[kind][name] = z[key]
        out["loss"] = [float(v) for v in z["loss"]]
        out["meta"] = json.loads(str(z["meta"]))
    return out


def capture_adam_moments(
    steps: int = 300,
    seed: int = 0,
    model: str = "tinygpt",
    *,
    d_model: int = 128,
    n_layers: int = 2,
    n_heads: int = 4,
    seq_len: int = 128,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    min_size: int = 4096,
    use_cache: bool = True,
) -> dict[str, Any]:
    """Trains a small model with ``optax.adam`` and returns its moments.

    ``"tinygpt"`` is a byte-level ``TinyGPT`` on the five Austen training
    novels (random windows of ``seq_len + 1`` bytes, fixed by ``seed``);
    ``"mlp"`` is an ``MLP(64, (256, 256), 10)`` on sklearn digits (the width
    arguments are then unused).

    Args:
      steps: Adam steps to run.
      seed: seeds both the parameter init and the data order.
      model: ``"tinygpt"`` or ``"mlp"``.
      d_model: TinyGPT width.
      n_layers: TinyGPT blocks.
      n_heads: TinyGPT attention heads.
      seq_len: TinyGPT context length.
      batch_size: sequences (or images) per step.
      learning_rate: Adam learning rate.
      min_size: keep only leaves with at least this many elements.
      use_cache: read and write the ``.npz`` cache.

    Returns:
      ``{"mu": {path: array}, "nu": {path: array}, "loss": [float] * steps,
      "meta": {...}}``; arrays are float32 in the parameter's shape, paths
      like ``"blocks/0/attn/qkv/kernel"`` or ``"embed/embedding"``; ``meta``
      holds the arguments, the training seconds, the JAX version and device.
    """
    config = {
        "steps": steps,
        "seed": seed,
        "d_model": d_model,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "min_size": min_size,
    }
    path = _cache_path(model, config)
    if use_cache and os.path.exists(path):
        return _load(path)
    result = _train(model, config)
    if use_cache:
        _save(path, result)
    return result


def _table(result: dict[str, Any]) -> str:
    header = (
        f"{'leaf':32s} {'shape':>12s} {'|mu| mean':>10s} {'mu max':>10s} "
        f"{'nu mean':>10s} {'nu max':>10s} {'nu==0':>6s} {'snr':>6s}"
    )
    rows = [header, "-" * len(header)]
    for name, mu in result["mu"].items():
        nu = result["nu"][name]
        # Adam's per-element signal-to-noise, |mu| / sqrt(nu): what the update sees.
        snr = np.abs(mu) / np.sqrt(np.maximum(nu, 1e-30))
        rows.append(
            f"{name:32s} {'x'.join(map(str, mu.shape)):>12s} "
            f"{np.abs(mu).mean():10.2e} {np.abs(mu).max():10.2e} "
            f"{nu.mean():10.2e} {nu.max():10.2e} {np.mean(nu == 0):6.3f} "
            f"{np.median(snr):6.3f}"
        )
    return "\n".join(rows)


def main() -> None:
    """Command line: capture (or load) moments and print their statistics."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="tinygpt", choices=("tinygpt", "mlp"))
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--no-cache", action="store_true")
    args = parser.parse_args()
    start = time.perf_counter()
    result = capture_adam_moments(
        args.steps,
        args.seed,
        args.model,
        n_layers=args.n_layers,
        use_cache=not args.no_cache,
    )
    wall = time.perf_counter() - start
    meta = result["meta"]
    loss = result["loss"]
    print(
        f"{meta['model']}: {meta['steps']} Adam steps in {meta['seconds']:.1f} s "
        f"of training ({wall:.1f} s this call), loss {loss[0]:.3f} -> "
        f"{np.mean(loss[-10:]):.3f} (mean of last 10), {meta['device']}, "
        f"jax {meta['jax']}"
    )
    print(_table(result))


if __name__ == "__main__":
    main()
