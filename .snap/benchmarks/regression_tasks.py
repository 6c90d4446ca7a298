"""Two small regression tasks with every optimizer (issue 16, part 3).

Long-run drift of re-encoded moments, away from language modelling, on
problems small enough for a 2-core CPU (a few minutes in all):

* ``mlp``: teacher-student regression. A fixed random ReLU teacher (64 -> 128
  -> 8, outputs scaled to unit variance) labels fresh Gaussian inputs every
  step (batch 64, so the training loss is also the test loss); the student is
  a `models.MLP` 64 -> 128 -> 128 -> 8 whose 64x128 and 128x128 weights
  (>= 4096 elements, rank 2) the default policy quantizes (the 128x8 head,
  1024 elements, stays fp32). Loss: mean squared error.
* ``lsq_snr1`` and ``lsq_snr0.1``: least squares ``0.5 mean((X W - Y)^2)``
  with ``W`` of 64x128 (quantized), ``Y = X W*`` (the minimum is 0), columns
  of ``X`` and of ``W*`` scaled over a decade (ill-conditioned, so Adam's
  per-element scaling matters). The exact gradient gets Gaussian noise of a
  fixed variance, set so that the signal-to-noise ratio
  ``|g0|^2 / E|noise|^2`` at the initial point is 1 or 0.1; as the loss falls,
  noise dominates, so the final loss is the noise floor each optimizer
  settles at. The loss reported is the exact full-batch loss.

Every optimizer of `benchmarks.train_lm_long` (fp32 AdamW, polar 2 and 1.5
bit, pi-Quant, 4-bit, 8-bit) with lr 3e-3 (constant), b1 0.9, **b2 0.999**,
no weight decay, no clipping; 3000 steps; 3 seeds, vmapped (the least-squares
tasks vmap both noise levels as well), each optimizer's steps in one
``lax.scan``. Final loss: mean over the last 100 steps; mean ± std over seeds;
ratio to fp32; goal (printed, not tuned for): within 2x of fp32.

Writes ``results/regression_tasks.json`` and ``.png`` (loss curves); prints a
table.

Usage::

    python -m benchmarks.regression_tasks            # 3000 steps, 3 seeds
    python -m benchmarks.regression_tasks --quick    # CI smoke: seconds
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optax_lowbit as lowbit
from benchmarks import models, train_lm, train_lm_long

RESULTS = train_lm_long.RESULTS
TASKS = ("mlp", "lsq_snr1", "lsq_snr0.1")
LSQ_SNRS = {"lsq_snr1": 1.0, "lsq_snr0.1": 0.1}
#: Goal: final loss at most this multiple of fp32 AdamW's.
GOAL_RATIO = 2.0

# Problem sizes (fixed: the quantized leaves must have >= 4096 elements).
# Small enough for a 2-core CPU. The codecs group the last axis (128 here)
# in groups of 64 to 256, so 8-bit states pad to 256: their bytes per
# parameter (in the JSON) count that padding.
MLP_IN, MLP_OUT, MLP_BATCH = 64, 8, 64
MLP_TEACHER, MLP_STUDENT = (128,), (128, 128)
LSQ_N, LSQ_D, LSQ_K = 512, 64, 128
_PROBLEM_SEED = 1234  # the teacher and the least-squares problem


# --------------------------------------------------------------------------
# Tasks: ``init(seed) -> params`` and ``loss_and_grad(params, key, noise)``.
# --------------------------------------------------------------------------


def mlp_task() -> tuple[Callable, Callable]:
    """Teacher-student MLP regression: ``(init, loss_and_grad)``."""
    teacher = models.MLP(MLP_IN, MLP_TEACHER, MLP_OUT, rngs=nnx.Rngs(_PROBLEM_SEED))
    probe = jax.random.normal(jax.random.key(_PROBLEM_SEED), (4096, MLP_IN))
    scale = jnp.std(teacher(probe), axis=0)  # unit-variance targets
    graphdef, _ = nnx.split(models.MLP(MLP_IN, MLP_STUDENT, MLP_OUT, rngs=nnx.Rngs(0)))

    def init(seed: int) -> Any:
        model = models.MLP(MLP_IN, MLP_STUDENT, MLP_OUT, rngs=nnx.Rngs(seed))
        return nnx.to_pure_dict(nnx.state(model))

    def loss_and_grad(params: Any, key: jax.Array, noise: jax.Array):
        del noise  # the batch is the noise
        x = jax.random.normal(key, (MLP_BATCH, MLP_IN))
        y = teacher(x) / scale

        def loss(p):
            return jnp.mean((nnx.merge(graphdef, p)(x) - y) ** 2)

        return jax.value_and_grad(loss)(params)

    return init, loss_and_grad


def lsq_problem() -> tuple[np.ndarray, np.ndarray]:
    """``(H, W*)``: ``H = X^T X / n`` of an ill-conditioned ``X``, the optimum."""
    rng = np.random.default_rng(_PROBLEM_SEED)
    x = rng.normal(size=(LSQ_N, LSQ_D)) * 10 ** rng.uniform(-1, 0, size=LSQ_D)
    w_star = rng.normal(size=(LSQ_D, LSQ_K)) * 10 ** rng.uniform(-1, 0, size=LSQ_K)
    return (x.T @ x / LSQ_N).astype(np.float32), w_star.astype(np.float32)


def lsq_task() -> tuple[Callable, Callable, Callable]:
    """Least squares with gradient noise: ``(init, loss_and_grad, grad0_sq)``.

    With ``Y = X W*``, ``0.5 mean((X W - Y)^2) = 0.5 tr(D^T H D) / k`` for
    ``D = W - W*``: exact, with no cancellation near the optimum.
    ``grad0_sq(params)`` is the mean squared gradient element at ``params``,
    which sets the noise variance of a given SNR.
    """
    h, w_star = map(jnp.asarray, lsq_problem())

    def init(seed: int) -> Any:
        w = 0.01 * jax.random.normal(jax.random.key(seed), (LSQ_D, LSQ_K))
        return {"w": w}

    def exact(params: Any) -> tuple[jax.Array, Any]:
        d = params["w"] - w_star
        hd = h @ d
        return 0.5 * jnp.sum(d * hd) / LSQ_K, {"w": hd / LSQ_K}

    def loss_and_grad(params: Any, key: jax.Array, noise: jax.Array):
        loss, grad = exact(params)
        z = jax.random.normal(key, grad["w"].shape)
        return loss, {"w": grad["w"] + noise * z}

    def grad0_sq(params: Any) -> jax.Array:
        return jnp.mean(exact(params)[1]["w"] ** 2)

    return init, loss_and_grad, grad0_sq


# --------------------------------------------------------------------------
# Training.
# --------------------------------------------------------------------------


def train(
    name: str,
    init: Callable,
    loss_and_grad: Callable,
    seeds: list[int],
    noise: np.ndarray,
    cfg: argparse.Namespace,
) -> dict[str, Any]:
    """Runs optimizer ``name`` on one task for every (noise, seed) pair.

    Returns per-run loss curves ``[window][run]`` (means over ``--log-every``
    steps), final losses (mean over the last ``--final-window`` steps), state
    bytes per parameter and timings.
    """
    tx = train_lm_long.make_optimizer(
        name, cfg.lr, b1=cfg.b1, b2=cfg.b2, wd=0.0, peak_lr=cfg.lr, clip_norm=None
    )
    runs = [(float(s), seed) for s in noise for seed in seeds]  # (noise, seed)
    params0 = jax.tree.map(lambda *x: jnp.stack(x), *[init(seed) for _, seed in runs])
    keys = jnp.stack([jax.random.key(seed + 7919) for _, seed in runs])
    sigma = jnp.asarray([s for s, _ in runs], jnp.float32)
    one = jax.tree.map(lambda x: x[0], params0)
    n_params = sum(x.size for x in jax.tree.leaves(one))
    state_bpp = lowbit.state_bytes(jax.eval_shape(tx.init, one)) / n_params

    def step(carry, t):
        params, opt_state, key, s = carry
        loss, grads = loss_and_grad(params, jax.random.fold_in(key, t), s)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, key, s), loss

    @jax.jit
    def run(params, opt_state, keys, sigma):
        def one_run(p, o, k, s):
            _, losses = jax.lax.scan(step, (p, o, k, s), jnp.arange(cfg.steps))
            return losses

        return jax.vmap(one_run)(params, opt_state, keys, sigma).T  # (steps, runs)

    opt_state = jax.vmap(tx.init)(params0)  # eager: see train_lm
    t = time.perf_counter()
    compiled = run.lower(params0, opt_state, keys, sigma).compile()
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    losses = np.asarray(compiled(params0, opt_state, keys, sigma), np.float64)
    train_s = time.perf_counter() - t
    n_log = cfg.steps // cfg.log_every
    curve = losses[: n_log * cfg.log_every].reshape(n_log, cfg.log_every, -1).mean(1)
    final = losses[-cfg.final_window :].mean(axis=0)
    return dict(
        optimizer=name,
        runs=[dict(noise=s, seed=seed) for s, seed in runs],
        final=final.tolist(),
        curve=curve.tolist(),
        finite=bool(np.all(np.isfinite(losses))),
        state_bytes_per_param=state_bpp,
        n_params=int(n_params),
        compile_s=compile_s,
        train_s=train_s,
    )


# --------------------------------------------------------------------------
# Output.
# --------------------------------------------------------------------------


def records_of(results: dict[str, list[dict]], seeds: list[int]) -> list[dict]:
    """One record per (task, optimizer): final loss mean ± std, ratio, goal."""
    out = []
    for task, runs in results.items():
        base = None
        for r in runs:
            x = np.asarray(r["final"])
            rec = dict(
                task=task,
                optimizer=r["optimizer"],
                metric="final_loss_mean_last_steps",
                **train_lm.seed_stats(x),
                seeds=seeds,
                finite=r["finite"],
                state_bytes_per_param=r["state_bytes_per_param"],
                compile_s=r["compile_s"],
                train_s=r["train_s"],
            )
            if r["optimizer"] == "adamw_fp32":
                base = rec
            out.append(rec)
        for rec in out:
            if rec["task"] != task:
                continue
            ratio = rec["mean"] / base["mean"] if base else None
            rec["ratio_to_fp32"] = ratio
            ok = ratio is not None and rec["finite"] and ratio <= GOAL_RATIO
            rec["within_2x"] = None if ratio is None else bool(ok)
    return out


def split_runs(run: dict[str, Any], noise: float) -> dict[str, Any]:
    """The part of a `train` result whose runs have noise scale ``noise``."""
    sel = [i for i, r in enumerate(run["runs"]) if r["noise"] == noise]
    out = dict(run)
    out["runs"] = [run["runs"][i] for i in sel]
    out["final"] = [run["final"][i] for i in sel]
    out["curve"] = [[row[i] for i in sel] for row in run["curve"]]
    return out


def table(records: list[dict]) -> str:
    """Plain-text table: task, optimizer, final loss, ratio, goal."""
    lines = [
        f"{'task':11s} {'optimizer':11s} {'final loss':>22s} {'x fp32':>7s}  "
        f"goal (<= {GOAL_RATIO:g}x fp32)"
    ]
    for r in records:
        ratio = r.get("ratio_to_fp32")
        goal = {True: "ok", False: "NO", None: "n/a"}[r.get("within_2x")]
        lines.append(
            f"{r['task']:11s} {r['optimizer']:11s} {r['mean']:10.4g} ± {r['std']:9.3g} "
            f"{'n/a' if ratio is None else f'{ratio:7.3f}':>7s}  {goal}"
        )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: pathlib.Path) -> None:
    """Loss (mean over seeds, log scale) against steps, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(result["results"])
    fig, axes = plt.subplots(
        1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False
    )
    every = result["meta"]["log_every"]
    for ax, task in zip(axes[0], tasks, strict=True):
        for i, r in enumerate(result["results"][task]):
            curve = np.asarray(r["curve"])
            steps = every * (np.arange(len(curve)) + 1)
            ax.plot(steps, curve.mean(axis=1), label=r["optimizer"], color=f"C{i}")
        ax.set_yscale("log")
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.set_ylabel(f"loss ({every}-step means, mean over seeds)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    m = result["meta"]
    fig.suptitle(
        f"Regression tasks: lr {m['lr']}, b2 {m['b2']}, {m['steps']} steps, "
        f"{len(m['seeds'])} seeds, {m['device']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------
# Main.
# --------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--quick`` shrinks the run for CI."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="200 steps, 2 seeds (unless given)"
    )
    p.add_argument("--optimizers", default=",".join(train_lm_long.LONG_OPTIMIZERS))
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--seeds", default=None, help="default 0,1,2")
    p.add_argument("--steps", type=int, default=None, help="default 3000")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--b1", type=float, default=0.9)
    p.add_argument("--b2", type=float, default=0.999)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--final-window", type=int, default=None, help="default 100")
    p.add_argument("--out", default=str(RESULTS / "regression_tasks.json"))
    p.add_argument("--png", default=None, help="default: --out with .png")
    cfg = p.parse_args(argv)
    defaults = dict(steps=200, seeds="0,1", final_window=20) if cfg.quick else {}
    defaults = {**dict(steps=3000, seeds="0,1,2", final_window=100), **defaults}
    for key, value in defaults.items():
        if getattr(cfg, key) is None:  # not given on the command line
            setattr(cfg, key, value)
    if cfg.steps % cfg.log_every or cfg.final_window > cfg.steps:
        p.error("--steps must be a multiple of --log-every and >= --final-window.")
    return cfg


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs every task with every optimizer; returns the result dict."""
    cfg = parse_args(argv)
    t_start = time.perf_counter()
    seeds = [int(s) for s in cfg.seeds.split(",")]
    names = [n for n in cfg.optimizers.split(",") if n]
    tasks = [t for t in cfg.tasks.split(",") if t]
    for n in names:  # fail fast on a typo
        train_lm_long.make_optimizer(n, 1e-3, b1=0.9, b2=0.999, wd=0.0)
    bad = sorted(set(tasks) - set(TASKS))
    if bad:
        raise ValueError(f"tasks must be among {TASKS}, got {bad}.")
    device = f"{jax.devices()[0].device_kind} ({jax.default_backend()})"

    # One program per optimizer and problem: the least-squares noise levels
    # share it (vmapped beside the seeds).
    # noise scale of each task: the least-squares tasks share one program
    problems: list[tuple[str, Callable, Callable, dict[str, float]]] = []
    if "mlp" in tasks:
        problems.append(("mlp", *mlp_task(), {"mlp": 0.0}))
    noise_of = {}
    if any(t in LSQ_SNRS for t in tasks):
        init, fn, grad0_sq = lsq_task()
        g2 = float(np.mean([grad0_sq(init(s)) for s in seeds]))
        noise_of = {
            t: float(np.sqrt(g2 / s)) for t, s in LSQ_SNRS.items() if t in tasks
        }
        problems.append(("lsq", init, fn, noise_of))

    results: dict[str, list[dict]] = {t: [] for t in tasks}
    for problem, init, fn, noise in problems:
        for name in names:
            r = train(name, init, fn, seeds, np.asarray(list(noise.values())), cfg)
            for task, sigma in noise.items():
                results[task].append(split_runs(r, sigma))
            print(
                f"{problem:4s} {name:11s} final "
                f"{np.round(r['final'], 5).tolist()}  compile {r['compile_s']:.1f}s  "
                f"train {r['train_s']:.1f}s",
                flush=True,
            )
    records = records_of(results, seeds)
    result = dict(
        meta=dict(
            benchmark="regression_tasks",
            device=device,
            jax=jax.__version__,
            optax=optax.__version__,
            flax=flax.__version__,
            optax_lowbit_commit=train_lm_long.git_commit(),
            python=platform.python_version(),
            date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            seeds=seeds,
            steps=cfg.steps,
            lr=cfg.lr,
            schedule="constant",
            b1=cfg.b1,
            b2=cfg.b2,
            weight_decay=0.0,
            clip_global_norm=None,
            log_every=cfg.log_every,
            final_window=cfg.final_window,
            mlp=dict(
                teacher=[MLP_IN, *MLP_TEACHER, MLP_OUT],
                student=[MLP_IN, *MLP_STUDENT, MLP_OUT],
                batch=MLP_BATCH,
            ),
            lsq=dict(
                n=LSQ_N,
                d=LSQ_D,
                k=LSQ_K,
                snr=LSQ_SNRS,
                noise_std=noise_of,
                snr_note="SNR = |grad|^2 / E|noise|^2 at the initial point; the "
                "noise variance stays fixed, so the final loss is a noise floor",
            ),
            goal=f"final loss <= {GOAL_RATIO:g}x fp32 AdamW's",
            quick=cfg.quick,
            total_s=time.perf_counter() - t_start,
        ),
        records=records,
        results=results,
    )
    out_json = pathlib.Path(cfg.out)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=1))
    try:
        plot(result, pathlib.Path(cfg.png) if cfg.png else out_json.with_suffix(".png"))
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
    print(table(records))
    return result


if __name__ == "__main__":
    main()
