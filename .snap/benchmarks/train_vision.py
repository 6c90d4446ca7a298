"""A small ResNet on Fashion-MNIST with every optimizer: test accuracy, side by side.

The same seeds, data order (a permutation per seed and epoch), schedule and
step budget for every optimizer; seeds train side by side (``jax.vmap``) and
``--chunk`` steps run per jitted call (``lax.scan``). The optimizers,
hyperparameters and record format are those of `benchmarks.train_lm`.

Writes ``train_vision.json`` (records: optimizer, metric, mean, std, seeds,
state_bytes_per_param, step_ms, device) and prints a table.

Usage::

    python -m benchmarks.train_vision --smoke
    python -m benchmarks.train_vision                       # 4 epochs, 3 seeds
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import pathlib
import platform
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optax_lowbit as lowbit
from benchmarks import models, train_lm

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
OPTIMIZERS = tuple(n for n in train_lm.ALL_OPTIMIZERS if n != "piquant_paper")


def load(data_dir: str | None):
    """Fashion-MNIST as float32 in [0, 1] (flattened) and int32 labels."""
    if data_dir:
        z = np.load(pathlib.Path(data_dir) / "fashion_mnist.npz")
        x, y, xt, yt = z["x_train"], z["y_train"], z["x_test"], z["y_test"]
    else:
        from benchmarks import data

        x, y, xt, yt = data.fashion_mnist()
    f = lambda a: (a.reshape(a.shape[0], -1) / 255.0).astype(np.float32)  # noqa: E731
    return f(x), y.astype(np.int32), f(xt), yt.astype(np.int32)


def run(name, cfg, graphdef, params0, x, y, xt, yt, order):
    """Trains every seed with ``name``; returns accuracy and timings."""
    steps = order.shape[0]
    tx = train_lm.make_optimizer(
        name,
        optax.cosine_decay_schedule(cfg.lr, steps, alpha=0.1),
        b1=0.9,
        b2=0.999,
        wd=cfg.wd,
        peak_lr=cfg.lr,
    )
    one = jax.tree.map(lambda a: a[0], params0)
    n_params = sum(a.size for a in jax.tree.leaves(one))
    bpp = lowbit.state_bytes(jax.eval_shape(tx.init, one)) / n_params

    def step(params, opt_state, idx):
        def loss(p):
            return models.classifier_loss(nnx.merge(graphdef, p), x[idx], y[idx])

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def chunk(params, opt_state, idx):
        def body(carry, i):
            p, o, v = jax.vmap(step)(*carry, i)
            return (p, o), v

        (params, opt_state), v = jax.lax.scan(body, (params, opt_state), idx)
        return params, opt_state, v.mean(0)

    @jax.jit
    def accuracy(params):
        return jax.vmap(lambda p: models.accuracy(nnx.merge(graphdef, p), xt, yt))(
            params
        )

    opt_state = jax.vmap(tx.init)(params0)
    params = jax.tree.map(jnp.copy, params0)
    idx = jnp.asarray(order.reshape(-1, cfg.chunk, *order.shape[1:]))
    t = time.perf_counter()
    compiled = chunk.lower(params, opt_state, idx[0]).compile()
    compile_s = time.perf_counter() - t
    times, losses = [], []
    for c in range(idx.shape[0]):
        t = time.perf_counter()
        params, opt_state, v = compiled(params, opt_state, idx[c])
        jax.block_until_ready((params, opt_state))
        times.append(time.perf_counter() - t)
        losses.append(np.asarray(v).tolist())
    acc = np.asarray(accuracy(params))
    timed = times[1:] or times
    return dict(
        optimizer=name,
        final_heldout=acc.tolist(),
        finite=bool(np.all(np.isfinite(losses[-1]))),
        state_bytes_per_param=bpp,
        step_ms_all_seeds=1e3 * float(np.median(timed)) / cfg.chunk,
        compile_s=compile_s,
        train_loss=losses,
    )


def plot(result: dict[str, Any], path: pathlib.Path) -> None:
    """Test accuracy per optimizer (mean, seed std) and the train-loss curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = result["records"]
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(14, 5))
    names = [r["optimizer"] for r in records]
    means = [100 * r["mean"] for r in records]
    stds = [100 * r["std"] for r in records]
    ax0.barh(names, means, xerr=stds, color=[f"C{i % 10}" for i in range(len(names))])
    ax0.set_xlim(min(means) - 2, max(means) + 1)
    ax0.invert_yaxis()
    ax0.set_xlabel("test accuracy (%), mean ± std over seeds")
    ax0.grid(alpha=0.3, axis="x")
    for i, r in enumerate(result["runs"]):
        loss = np.asarray(r["train_loss"]).mean(axis=1)
        ax1.plot(np.arange(1, loss.size + 1), loss, label=r["optimizer"], color=f"C{i}")
    ax1.set_xlabel("chunk of steps")
    ax1.set_ylabel("train loss (mean over seeds)")
    ax1.set_yscale("log")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    m = result["meta"]
    fig.suptitle(
        f"Fashion-MNIST, {m['model']}, {m['epochs']} epochs, "
        f"{len(m['seeds'])} seeds, {m['device']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark; returns the result written to ``--out``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=str(RESULTS / "train_vision.json"))
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--chunk", type=int, default=78)
    p.add_argument("--model", default="resnet", choices=("resnet", "mlp"))
    p.add_argument("--hidden", default="256,256", help="MLP hidden sizes")
    p.add_argument("--widths", default="64,128", help="ResNet stage widths")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--wd", type=float, default=1e-4)
    p.add_argument("--plot-only", default=None, help="re-plot a result JSON")
    cfg = p.parse_args(argv)
    if cfg.plot_only:
        result = json.loads(pathlib.Path(cfg.plot_only).read_text())
        plot(result, pathlib.Path(cfg.plot_only).with_suffix(".png"))
        return result
    x, y, xt, yt = load(cfg.data_dir)
    if cfg.smoke:
        cfg.epochs, cfg.chunk, cfg.hidden, cfg.widths = 1, 10, "64", "64"
        x, y, xt, yt = x[:1280], y[:1280], xt[:500], yt[:500]
    seeds = [int(s) for s in cfg.seeds.split(",")]
    per_epoch = x.shape[0] // cfg.batch // cfg.chunk * cfg.chunk
    order = np.stack(
        [
            np.concatenate(
                [
                    np.random.default_rng([s, e]).permutation(x.shape[0])[
                        : per_epoch * cfg.batch
                    ]
                    for e in range(cfg.epochs)
                ]
            ).reshape(-1, cfg.batch)
            for s in seeds
        ],
        axis=1,
    )  # (steps, seeds, batch)
    hidden = tuple(int(h) for h in cfg.hidden.split(","))
    widths = tuple(int(w) for w in cfg.widths.split(","))

    def make_model(seed: int) -> nnx.Module:
        if cfg.model == "mlp":
            return models.MLP(784, hidden, rngs=nnx.Rngs(seed))
        return models.ResNet(widths, rngs=nnx.Rngs(seed))

    model_name = (
        f"MLP 784-{'-'.join(map(str, hidden))}-10"
        if cfg.model == "mlp"
        else f"ResNet widths {widths}, GroupNorm, one block per stage"
    )
    states = []
    for s in seeds:
        graphdef, state = nnx.split(make_model(s))
        states.append(nnx.to_pure_dict(state))
    params0 = jax.tree.map(lambda *a: jnp.stack(a), *states)
    xs, ys, xts, yts = map(jnp.asarray, (x, y, xt, yt))
    device = f"{jax.devices()[0].device_kind} ({jax.default_backend()})"
    runs = []
    for name in cfg.optimizers.split(","):
        r = run(name, cfg, graphdef, params0, xs, ys, xts, yts, order)
        runs.append(r)
        print(f"{name}: test acc {r['final_heldout']}", flush=True)
        partial = dict(partial=True, records=train_lm.records_of(runs, seeds, device))
        pathlib.Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(cfg.out).write_text(json.dumps(partial, indent=1))  # so far
    records = train_lm.records_of(runs, seeds, device)
    for r in records:
        r["metric"] = "test_accuracy"
    by = {r["optimizer"]: r for r in records}
    goals = {}
    if "polar2" in by and "adamw_fp32" in by:
        gap = 100 * (by["polar2"]["mean"] - by["adamw_fp32"]["mean"])
        goals["polar2"] = dict(points_vs_fp32=gap, tolerance=-0.3, met=gap >= -0.3)
    result = dict(
        meta=dict(
            device=device,
            jax=jax.__version__,
            python=platform.python_version(),
            date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            model=model_name,
            n_params=int(sum(a[0].size for a in jax.tree.leaves(params0))),
            epochs=cfg.epochs,
            steps=int(order.shape[0]),
            batch=cfg.batch,
            lr=cfg.lr,
            schedule="cosine decay to 10%",
            seeds=seeds,
            smoke=cfg.smoke,
        ),
        records=records,
        goals=goals,
        runs=runs,
    )
    out = pathlib.Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    try:
        plot(result, out.with_suffix(".png"))
    except ImportError:
        print("matplotlib missing: no plot")
    print(train_lm.table(records).replace("held-out loss", "test accuracy"))
    print(json.dumps(goals))
    return result


if __name__ == "__main__":
    main()
