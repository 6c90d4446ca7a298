"""Drift of re-encoded optimizer moments over long runs (issue 16).

Every step an optimizer decodes its moments, updates them in float32 and
re-encodes them: ``m ← Q(β1 m̂ + (1 − β1) g)``, ``v ← Q(β2 v̂ + (1 − β2) g²)``.
A bias of one encode compounds over 10^5 steps, so a codec is judged here by
where that process settles, not by one encode's error: gradient streams are
fed to the coded moments and to the fp32 EMAs of the same stream side by side,
and the decoded state is compared with the fp32 one at 1k, 10k and 100k steps.

Streams (one value per element and step; every stream has per-element scales
spread over a decade inside each group, as real gradients have):

* ``gaussian``: stationary N(0, σ_i²) (σ_i = 1 for all: the issue's case);
* ``hetero``: N(0, σ_i²) with log σ_i ~ N(0, 1) per element;
* ``student_t3``: σ_i·t(3), heavy tailed;
* ``sparse``: 90% zeros, the rest N(0, σ_i²);
* ``scale_jump``: σ_i·N(0,1), times 1000 from half way (and a 1e-3 variant
  is covered by ``decay``);
* ``decay``: σ_i·N(0,1)·(1 + t/τ)^-1, magnitudes falling 100x over the run
  (the end of training).

Metrics, decoded vs fp32 over all elements: median, p1, p99 of ``v̂ / v``;
share of elements with ``v̂ < v/4`` and ``v̂ > 4v``; ``rms(m̂)/rms(m)`` and the
bias ``Σ m̂ m / Σ m²`` (1 = unbiased); and ``rms(d̂)/rms(d)`` for the Adam
direction ``d = m / (√v + ε)`` (ε = 1e-8·σ scale; bias corrections cancel).

Goal for every default codec at 100k steps: median ``v̂/v`` in [0.8, 1.25],
under 1% below ``v/4``, ``rms m̂/m`` in [0.8, 1.25], direction rms ratio in
[0.8, 1.25].

Usage::

    python -m benchmarks.state_drift                  # every codec, 100k steps
    python -m benchmarks.state_drift --steps 3000 --codecs polar2 --streams gaussian
    python -m benchmarks.state_drift --quick          # 2k steps, small (CI smoke)
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import pathlib
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_lowbit.codecs import base
from optax_lowbit.kernels import rules

RESULTS = pathlib.Path(__file__).resolve().parent / "results"

STREAMS = ("gaussian", "hetero", "student_t3", "sparse", "scale_jump", "decay")
GOAL = {
    "v_median": (0.8, 1.25),
    "v_below_quarter": 0.01,
    "m_rms": (0.8, 1.25),
    "dir_rms": (0.8, 1.25),
}


def codec_pairs() -> dict[str, tuple[base.Codec, base.Codec]]:
    """The (mu_codec, nu_codec) of every default Adam optimizer, by name.

    Read from the optimizers themselves (`optax_lowbit.transforms.adam`), so
    the benchmark measures what a user gets.
    """
    import optax_lowbit as lowbit

    def pair(tx: Any) -> tuple[base.Codec, base.Codec]:
        state = tx.init({"w": jnp.zeros((64, 256), jnp.float32)})
        found = [
            s
            for s in jax.tree.leaves(
                state, is_leaf=lambda x: isinstance(x, base.Packed)
            )
            if isinstance(s, base.Packed)
        ]
        return found[0].codec, found[1].codec

    return {
        "polar2": pair(lowbit.scale_by_adam_polar(bits=2)),
        "polar1.5": pair(lowbit.scale_by_adam_polar(bits=1.5)),
        "piquant": pair(lowbit.scale_by_adam_piquant()),
        "4bit": pair(lowbit.scale_by_adam_4bit()),
        "8bit": pair(lowbit.scale_by_adam_8bit()),
    }


def element_scales(key: jax.Array, shape: tuple[int, int], stream: str) -> jax.Array:
    """Per-element standard deviations of a stream (fixed over time)."""
    if stream == "gaussian":
        return jnp.ones(shape, jnp.float32)
    spread = 1.0 if stream == "hetero" else 0.5
    return jnp.exp(spread * jax.random.normal(key, shape, jnp.float32))


def gradient(
    stream: str, key: jax.Array, sigma: jax.Array, t: jax.Array, steps: int
) -> jax.Array:
    """One step of ``stream``: a float32 array of ``sigma``'s shape."""
    z = jax.random.normal(key, sigma.shape, jnp.float32)
    if stream in ("gaussian", "hetero"):
        return sigma * z
    if stream == "student_t3":
        chi2 = jnp.sum(jnp.square(jax.random.normal(key, (3, *sigma.shape))), 0)
        return sigma * z / jnp.sqrt(chi2 / 3.0)  # t(3): a normal over sqrt(chi²₃/3)
    if stream == "sparse":
        k1, k2 = jax.random.split(key)
        keep = jax.random.uniform(k1, sigma.shape) < 0.1
        return jnp.where(keep, sigma * jax.random.normal(k2, sigma.shape), 0.0)
    if stream == "scale_jump":
        return sigma * z * jnp.where(t >= steps // 2, 1000.0, 1.0)
    if stream == "decay":
        tau = steps / 99.0
        return sigma * z / (1.0 + t.astype(jnp.float32) / tau)
    raise ValueError(f"stream must be one of {STREAMS}, got {stream!r}.")


def metrics(m_hat, v_hat, m, v) -> dict[str, float]:
    """Decoded-vs-fp32 statistics of one checkpoint (see the module doc)."""
    ok = v > 0
    ratio = jnp.where(ok, v_hat / jnp.where(ok, v, 1.0), 1.0)
    n = jnp.maximum(ok.sum(), 1)
    q = jnp.nanquantile(jnp.where(ok, ratio, jnp.nan), jnp.array([0.01, 0.5, 0.99]))
    eps = 1e-8 * jnp.sqrt(jnp.mean(v))
    d = m / (jnp.sqrt(v) + eps)
    d_hat = m_hat / (jnp.sqrt(v_hat) + eps)
    rms = lambda x: jnp.sqrt(jnp.mean(jnp.square(x)))  # noqa: E731
    return {
        "v_median": q[1],
        "v_p1": q[0],
        "v_p99": q[2],
        "v_below_quarter": jnp.sum(ok & (ratio < 0.25)) / n,
        "v_above_4x": jnp.sum(ok & (ratio > 4.0)) / n,
        "m_rms": rms(m_hat) / rms(m),
        "m_bias": jnp.sum(m_hat * m) / jnp.sum(m * m),
        "dir_rms": rms(d_hat) / rms(d),
        "finite": jnp.all(jnp.isfinite(m_hat) & jnp.isfinite(v_hat)).astype(
            jnp.float32
        ),
    }


def _coder(codec: base.Codec | None, salt: int) -> Callable[..., jax.Array]:
    """``f(x, t) -> decode(encode(x))`` on ``(rows, N)`` float32 (None: fp32)."""
    if codec is None:
        return lambda x, t: x

    def f(x: jax.Array, t: jax.Array) -> jax.Array:
        xg = base.to_groups(x, codec.group_size)
        if codec.stochastic:
            codes, scales = codec.encode_groups(xg, seed=base.stream_seed(t, 0, salt))
        else:
            codes, scales = codec.encode_groups(xg)
        return base.from_groups(codec.decode_groups(codes, scales), x.shape)

    return f


@functools.partial(
    jax.jit,
    static_argnames=("shape", "mu_codec", "nu_codec", "stream", "steps", "checkpoints"),
)
def simulate(
    key: jax.Array,
    shape: tuple[int, int],
    *,
    mu_codec: base.Codec | None,
    nu_codec: base.Codec | None,
    stream: str,
    steps: int,
    checkpoints: tuple[int, ...],
    b1: float = 0.9,
    b2: float = 0.999,
):
    """Coded and fp32 Adam moments on one stream; metrics at ``checkpoints``.

    The coded moments take the optimizer's step (`kernels.rules.moment_step`,
    the one both the kernels and the jnp path run) and are re-encoded; the
    fp32 ones are the true EMAs of the same stream.

    Args:
      key: PRNG key of the stream.
      shape: ``(rows, N)`` elements (groups along the last axis).
      mu_codec: the first moment's codec (``None``: fp32).
      nu_codec: the second moment's codec.
      stream: one of `STREAMS`.
      steps: steps to run.
      checkpoints: increasing step counts (<= ``steps``) to measure at.
      b1: first-moment decay.
      b2: second-moment decay.

    Returns:
      A dict of metric name -> float32 ``(len(checkpoints),)``.
    """
    k_sigma, k_stream = jax.random.split(key)
    sigma = element_scales(k_sigma, shape, stream)
    enc_m, enc_v = _coder(mu_codec, 0), _coder(nu_codec, 1)
    # the optimizer's own step (its rounding form, saturation); the stored
    # moments do not depend on the bias corrections, so any count does
    hp = rules.make_hp(b1, b2, eps=0.0, eps_root=0.0, bc1=1.0, bc2=1.0)

    def one(carry, t):
        mq, vq, m, v = carry
        g = gradient(stream, jax.random.fold_in(k_stream, t), sigma, t, steps)
        _, mq, vq = rules.moment_step(g, mq, vq, hp, nesterov=False)
        mq, vq = enc_m(mq, t), enc_v(vq, t)
        m = (1 - b1) * g + b1 * m  # the true EMAs, as Optax writes them
        v = (1 - b2) * g * g + b2 * v
        return (mq, vq, m, v), None

    zeros = jnp.zeros(shape, jnp.float32)
    carry = (zeros, zeros, zeros, zeros)
    out, start = [], 0
    for c in checkpoints:
        carry, _ = jax.lax.scan(one, carry, jnp.arange(start, c, dtype=jnp.int32))
        out.append(metrics(*carry))
        start = c
    return {k: jnp.stack([o[k] for o in out]) for k in out[0]}


def passes(row: dict[str, float]) -> dict[str, bool]:
    """Which goals one checkpoint meets."""
    lo, hi = GOAL["v_median"]
    return {
        "v_median": lo <= row["v_median"] <= hi,
        "v_below_quarter": row["v_below_quarter"] < GOAL["v_below_quarter"],
        "m_rms": GOAL["m_rms"][0] <= row["m_rms"] <= GOAL["m_rms"][1],
        "dir_rms": GOAL["dir_rms"][0] <= row["dir_rms"] <= GOAL["dir_rms"][1],
    }


def log_checkpoints(steps: int, per_decade: int = 4) -> tuple[int, ...]:
    """Roughly log-spaced steps from 100 to ``steps``, with 1k/10k/100k kept."""
    pts = {steps}
    for e in range(2, int(math.log10(max(steps, 100))) + 1):
        for k in range(per_decade):
            s = round(10 ** (e + k / per_decade))
            if s <= steps:
                pts.add(s)
    return tuple(sorted(pts))


def _meta() -> dict[str, Any]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "commit": commit,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "device": str(jax.devices()[0].device_kind),
        "platform": platform.platform(),
    }


def run(
    codecs: list[str],
    streams: list[str],
    steps: int,
    shape: tuple[int, int],
    seed: int = 0,
    deadline_s: float | None = None,
) -> dict[str, Any]:
    """Every codec on every stream; rows of metrics per checkpoint.

    With ``deadline_s``, the (codec, stream) runs that would start after it
    are skipped and listed under ``meta.skipped``.
    """
    pairs = codec_pairs()
    checkpoints = log_checkpoints(steps)
    records, skipped, start = [], [], time.perf_counter()
    for name in codecs:
        mu_codec, nu_codec = pairs[name]
        for stream in streams:
            if deadline_s is not None and time.perf_counter() - start > deadline_s:
                skipped.append(f"{name}/{stream}")
                continue
            t0 = time.perf_counter()
            res = simulate(
                jax.random.PRNGKey(seed),
                shape,
                mu_codec=mu_codec,
                nu_codec=nu_codec,
                stream=stream,
                steps=steps,
                checkpoints=checkpoints,
            )
            res = {k: np.asarray(v).tolist() for k, v in res.items()}
            records.append(
                {
                    "codec": name,
                    "mu_codec": mu_codec.name,
                    "nu_codec": nu_codec.name,
                    "stream": stream,
                    "steps": list(checkpoints),
                    **res,
                    "seconds": time.perf_counter() - t0,
                }
            )
            print(
                f"  {name:9s} {stream:11s} {time.perf_counter() - t0:6.1f} s",
                file=sys.stderr,
                flush=True,
            )
    return {
        "meta": {
            **_meta(),
            "shape": list(shape),
            "b1": 0.9,
            "b2": 0.999,
            "goal": GOAL,
            "skipped": skipped,
        },
        "records": records,
    }


def table(result: dict[str, Any], at: tuple[int, ...] = (1000, 10000, 100000)) -> str:
    """A markdown table: one row per codec, stream and checkpoint."""
    head = (
        "| codec | stream | step | v̂/v median (p1, p99) | <v/4 | >4v | "
        "rms m̂/m | m bias | dir rms | goals |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in result["records"]:
        for i, s in enumerate(r["steps"]):
            if s not in at and s != r["steps"][-1]:
                continue
            row = {
                k: r[k][i]
                for k in (
                    "v_median",
                    "v_p1",
                    "v_p99",
                    "v_below_quarter",
                    "v_above_4x",
                    "m_rms",
                    "m_bias",
                    "dir_rms",
                )
            }
            ok = passes(row)
            mark = (
                "pass"
                if all(ok.values())
                else "miss " + ",".join(k for k, good in ok.items() if not good)
            )
            lines.append(
                f"| {r['codec']} | {r['stream']} | {s} | {row['v_median']:.3g} "
                f"({row['v_p1']:.3g}, {row['v_p99']:.3g}) | "
                f"{100 * row['v_below_quarter']:.2f}% | "
                f"{100 * row['v_above_4x']:.2f}% | "
                f"{row['m_rms']:.3g} | {row['m_bias']:.3g} | {row['dir_rms']:.3g} | "
                f"{mark} |"
            )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: pathlib.Path) -> None:
    """Ratios over time: one panel per metric, one line per codec and stream."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("v_median", "v_below_quarter", "m_rms", "dir_rms")
    streams = sorted({r["stream"] for r in result["records"]})
    fig, axes = plt.subplots(
        len(keys),
        len(streams),
        figsize=(3.2 * len(streams), 2.6 * len(keys)),
        squeeze=False,
        sharex=True,
    )
    for r in result["records"]:
        j = streams.index(r["stream"])
        for i, k in enumerate(keys):
            axes[i][j].plot(r["steps"], r[k], label=r["codec"])
    for i, k in enumerate(keys):
        for j, s in enumerate(streams):
            ax = axes[i][j]
            ax.set_xscale("log")
            if k != "v_below_quarter":
                ax.set_yscale("log")
                ax.axhspan(*GOAL[k], color="g", alpha=0.1)
            else:
                ax.axhline(GOAL[k], color="g", lw=0.8)
            if i == 0:
                ax.set_title(s)
            if j == 0:
                ax.set_ylabel(k)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"state drift (b1 0.9, b2 0.999), {result['meta']['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--codecs", default="polar2,polar1.5,piquant,4bit,8bit")
    p.add_argument("--streams", default=",".join(STREAMS))
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--cols", type=int, default=768)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="2k steps, 8 x 768")
    p.add_argument("--deadline-s", type=float, default=None, help="skip the rest")
    p.add_argument("--out", default=None, help="default: $OUT or results/")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.rows = 2000, 8
    result = run(
        args.codecs.split(","),
        args.streams.split(","),
        args.steps,
        (args.rows, args.cols),
        args.seed,
        args.deadline_s,
    )
    default = pathlib.Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS
    out = pathlib.Path(args.out or default / "state_drift.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(table(result))
    try:
        plot(result, out.with_suffix(".png"))
    except ImportError:
        print("matplotlib missing: no PNG", file=sys.stderr)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
