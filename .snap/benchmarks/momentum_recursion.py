"""Why a low-bit Muon momentum lags fp32 Muon: the error of a re-encoded EMA.

Issue 21's long runs (`benchmarks.train_lm_long`, ``muon_*``) find 2-bit
momentum +10% and 4-bit +3.4-4.2% above fp32 Muon's held-out loss, 8-bit on
par. This benchmark isolates the cause on synthetic gradients, with the
library's own transforms: `optax_lowbit.scale_by_muon_quantized` with each
momentum codec beside `optax.contrib.scale_by_muon` (fp32), fed the same
gradients ``g = snr * s + n`` (a fixed signal ``s`` and fresh Gaussian noise
``n`` each step, both unit variance per element) on one ``--rows`` x
``--cols`` matrix. Over the last quarter of ``--steps`` steps it measures:

* ``recursive_rel_mse``: ``|m̂ - m|² / |m|²``, the decoded quantized momentum
  ``m̂`` (re-encoded every step, as the optimizer does) against fp32's ``m``;
* ``one_shot_rel_mse``: the same codec's error on fp32's ``m`` encoded once;
* ``amplification``: their ratio, what re-encoding every step costs;
* ``update_cosine``: the cosine of the two Muon updates (after Newton-Schulz).

A re-encoded EMA ``m ← Q(β m + (1 - β) g)`` keeps every step's rounding error
with weight ``β^k`` afterwards: unbiased errors add up to ``1 / (1 - β²)``
(10x at β = 0.95) of one step's variance, and nearest rounding stalls an
element whose increment ``(1 - β)(g - m)`` is below half a level. Either way
the stored momentum carries several times its one-shot error, and
Newton-Schulz, which sets every singular value to about one, gives the noise
directions the weight of the signal's.

Usage::

    python -m benchmarks.momentum_recursion            # CPU, about a minute
    python -m benchmarks.momentum_recursion --quick    # tests, seconds

Writes ``results/momentum_recursion.json`` (meta: device, versions, date,
commit, settings; records) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_lowbit as lowbit
from benchmarks import train_lm_long

RESULTS = pathlib.Path(__file__).resolve().parent / "results"

#: Momentum codecs compared: name -> codec factory (the defaults of the
#: ``muon_*`` aliases, and the screen's variants).
CODECS: dict[str, Callable[[], Any]] = {
    "polar2 (muon_polar)": lambda: lowbit.codecs.polar(2, rounding="nearest"),
    "polar2 stochastic": lambda: lowbit.codecs.polar(2, rounding="stochastic"),
    "4bit b128 (muon_4bit)": lambda: lowbit.codecs.blockwise4(),
    "4bit b128 stochastic": lambda: lowbit.codecs.blockwise4(rounding="stochastic"),
    "4bit b32": lambda: lowbit.codecs.blockwise4(block_size=32),
    "8bit b256 (muon_8bit)": lambda: lowbit.codecs.blockwise8(),
}


def _cosine(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.sum(a * b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b))


def measure(codec: Any, cfg: argparse.Namespace) -> dict[str, float]:
    """The four metrics of the module docstring for one momentum codec."""
    params = {"w": jnp.zeros((cfg.rows, cfg.cols), jnp.float32)}
    dims = {"w": optax.contrib.MuonDimensionNumbers()}  # Optax needs a tree here
    quantized = lowbit.scale_by_muon_quantized(
        codec, beta=cfg.beta, weight_dimension_numbers=dims
    )
    reference = optax.contrib.scale_by_muon(
        beta=cfg.beta, weight_dimension_numbers=dims
    )
    key = jax.random.key(cfg.seed)
    signal = jax.random.normal(jax.random.fold_in(key, 2**31 - 1), (cfg.rows, cfg.cols))

    def step(carry: Any, t: jax.Array) -> tuple[Any, jax.Array]:
        qs, rs = carry
        noise = jax.random.normal(jax.random.fold_in(key, t), signal.shape)
        g = {"w": cfg.snr * signal + noise}
        u, qs = quantized.update(g, qs, params)
        v, rs = reference.update(g, rs, params)
        m_hat = qs.mu["w"].decode()
        m = rs.mu["w"]
        once = codec.encode(m, seed=t).decode()
        out = jnp.stack(
            [
                jnp.sum(jnp.square(m_hat - m)),
                jnp.sum(jnp.square(once - m)),
                jnp.sum(jnp.square(m)),
                _cosine(u["w"], v["w"]),
            ]
        )
        return (qs, rs), out

    init = (quantized.init(params), reference.init(params))
    _, out = jax.jit(lambda c: jax.lax.scan(step, c, jnp.arange(cfg.steps)))(init)
    tail = np.asarray(out[-max(1, cfg.steps // 4) :], np.float64)
    recursive, one_shot, norm, cosine = tail.mean(axis=0)
    return dict(
        recursive_rel_mse=float(recursive / norm),
        one_shot_rel_mse=float(one_shot / norm),
        amplification=float(recursive / one_shot),
        update_cosine=float(cosine),
        bits_per_element=float(codec.bits_per_element),
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs every codec of `CODECS`, prints the table, writes the JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=128)
    p.add_argument("--cols", type=int, default=512)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--beta", type=float, default=0.95)
    p.add_argument("--snr", type=float, default=0.3, help="signal / noise rms")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="64 x 256, 80 steps")
    p.add_argument("--out", type=pathlib.Path, default=None)
    cfg = p.parse_args(argv)
    for name in ("rows", "cols", "steps"):
        if getattr(cfg, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(cfg, name)}.")
    if not 0.0 <= cfg.beta < 1.0:
        p.error(f"--beta must be in [0, 1), got {cfg.beta}.")
    if cfg.quick:
        cfg.rows, cfg.cols, cfg.steps = 64, 256, 80
    if cfg.out is None:
        quick = "_quick" if cfg.quick else ""
        cfg.out = RESULTS / f"momentum_recursion{quick}.json"
    records = [dict(codec=n, **measure(make(), cfg)) for n, make in CODECS.items()]
    device = jax.devices()[0]
    meta = dict(
        benchmark="momentum_recursion",
        device=f"{getattr(device, 'device_kind', device.platform)} ({device.platform})",
        jax=jax.__version__,
        optax=optax.__version__,
        python=platform.python_version(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        optax_lowbit_commit=train_lm_long.git_commit(),
        **{k: getattr(cfg, k) for k in ("rows", "cols", "steps", "beta", "snr")},
        seed=cfg.seed,
    )
    print(
        f"{'codec':24s} {'bits':>5s} {'recursive':>10s} {'one-shot':>9s} "
        f"{'amplif.':>8s} {'update cos':>10s}"
    )
    for r in records:
        print(
            f"{r['codec']:24s} {r['bits_per_element']:5.2f} "
            f"{r['recursive_rel_mse']:10.4f} {r['one_shot_rel_mse']:9.4f} "
            f"{r['amplification']:7.1f}x {r['update_cosine']:10.4f}"
        )
    result = dict(meta=meta, records=records)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {cfg.out}")
    return result


if __name__ == "__main__":
    main()
