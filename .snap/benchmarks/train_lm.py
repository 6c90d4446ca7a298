"""Byte-level GPT trained from scratch on Jane Austen with every optimizer.

Same seeds, data order, schedule and token budget for every optimizer; the
held-out split is one whole novel (*Persuasion*, DATA.md). The seeds train side
by side in one program (``jax.vmap`` over the seed axis) and ``--chunk`` steps
run per jitted call (``lax.scan``), so the accelerator is not left waiting on
Python. Each optimizer is compiled ahead of time; wall-time curves and step
times exclude compilation (reported apart as ``compile_s``).

Writes ``train_lm.json`` (records: optimizer, metric, mean, std, seeds,
state_bytes_per_param, step_ms, device; plus curves and meta) and
``train_lm.png`` (held-out loss against steps and against wall time), and
prints a table.

Usage::

    python -m benchmarks.train_lm --smoke                 # CPU, tiny, seconds
    python -m benchmarks.train_lm --data-dir .devdata     # the device run
    python -m benchmarks.train_lm --plot-only benchmarks/results/train_lm.json

``--data-dir`` reads ``austen_train.npy`` / ``austen_heldout.npy`` (uint8
bytes written from `benchmarks.data.austen_bytes`); without it the data come
from `benchmarks.data` (Debian package, cached).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
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
from benchmarks import models

RESULTS = pathlib.Path(__file__).resolve().parent / "results"

# Priority order: if the deadline comes, the tail is skipped (and said so).
ALL_OPTIMIZERS = (
    "adamw_fp32",
    "polar2",
    "polar1.5",
    "polar2_nearest",
    "polar1.5_nearest",
    "adamw_bf16_mu",
    "adamw_8bit",
    "adamw_4bit",
    "piquant_nearest",
    "adafactor",
    "adafactor_polar2",
    "polar2_m_only",
    "polar2_v_only",
    "piquant_paper",
    "polar2_vgeo",
    "polar2_r1",
    "polar2_cal",
    "polar1.5_cal",
)

#: Ablation codebooks: geometric rings for v (a lower floor for small v in a
#: group), and signed rings whose top ring is 1 (unbiased for every pair).
V_RINGS_GEOMETRIC = (0.04, 0.08, 0.14, 0.22, 0.33, 0.48, 0.7, 1.0)
M_RINGS_TOP_ONE = (0.3, 1.0)


def calibrated_rings(bits: float, moment: str) -> tuple[float, ...]:
    """Rings fitted by `optax_lowbit.codecs.calibrate` to real Adam moments.

    Read from ``results/codec_error.json`` (``python -m benchmarks.codec_error``:
    a byte-level TinyGPT on Austen, out-of-sample capture); the fit minimises
    the nearest-rounding error, so the ``*_cal`` optimizers round to nearest.
    """
    tag = "2b" if bits == 2 else "1.5b"
    records = json.loads((RESULTS / "codec_error.json").read_text())["records"]
    for r in records:
        if r.get("data") == f"real_{moment}" and r.get("variant") == "calibrated":
            if r.get("codec") == f"polar {tag} (calibrated)":
                return tuple(r["rings"])
    raise ValueError(f"no calibrated {tag} rings for {moment} in codec_error.json")


# --------------------------------------------------------------------------
# Optimizers: the same schedule, betas, weight decay and clipping for all.
# --------------------------------------------------------------------------


def _decay_mask(params: Any) -> Any:
    """Weight decay on matrices only (not biases, LayerNorm scales)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def _adam_codecs(tx_scale: optax.GradientTransformation, lr, wd):
    return optax.chain(
        tx_scale,
        optax.add_decayed_weights(wd, _decay_mask),
        optax.scale_by_learning_rate(lr),
    )


def make_optimizer(
    name: str,
    lr: Any,
    *,
    b1: float,
    b2: float,
    wd: float,
    peak_lr: float = 1e-3,
    clip_norm: float | None = 1.0,
):
    """Returns the `optax.GradientTransformation` called ``name``.

    Every optimizer is chained after ``clip_by_global_norm(clip_norm)`` (none
    where ``clip_norm`` is None). ``peak_lr`` is the schedule's peak
    (Adafactor's weight decay is not scaled by it).
    """
    adam = dict(b1=b1, b2=b2, weight_decay=wd, mask=_decay_mask)
    muon = dict(weight_decay=wd, consistent_rms=0.2, adam_b1=b1, adam_b2=b2)
    rounding = lowbit.transforms.adam.DEFAULT_ROUNDING

    def polar_codec(signed: bool, rings: Any = None) -> Any:  # 2-bit preset codec
        return lowbit.codecs.polar(
            bits=2, signed=signed, rings=rings, rounding=rounding
        )

    def calibrated(bits: float) -> Any:
        codec = functools.partial(lowbit.codecs.polar, bits=bits, rounding="nearest")
        m = codec(signed=True, rings=calibrated_rings(bits, "m"))
        v = codec(signed=False, rings=calibrated_rings(bits, "v"))
        return _adam_codecs(lowbit.scale_by_adam_quantized(m, v, b1, b2), lr, wd)

    def polar_pair(m_rings: Any = None, v_rings: Any = None) -> Any:
        return _adam_codecs(
            lowbit.scale_by_adam_quantized(
                polar_codec(True, m_rings), polar_codec(False, v_rings), b1, b2
            ),
            lr,
            wd,
        )

    ident = lowbit.codecs.identity()
    factories: dict[str, Callable[[], optax.GradientTransformation]] = {
        "adamw_fp32": lambda: optax.adamw(lr, **adam),
        "adamw_bf16_mu": lambda: optax.adamw(lr, mu_dtype=jnp.bfloat16, **adam),
        "adamw_8bit": lambda: lowbit.adamw_8bit(lr, **adam),
        "adamw_4bit": lambda: lowbit.adamw_4bit(lr, **adam),
        "piquant_nearest": lambda: lowbit.adamw_piquant(lr, encoder="nearest", **adam),
        "piquant_paper": lambda: lowbit.adamw_piquant(lr, encoder="paper", **adam),
        "polar2": lambda: lowbit.adamw_polar(lr, bits=2, **adam),
        "polar1.5": lambda: lowbit.adamw_polar(lr, bits=1.5, **adam),
        # The deterministic rules (nearest signed codeword, radial ceiling for v).
        "polar2_nearest": lambda: lowbit.adamw_polar(
            lr, bits=2, rounding="nearest", **adam
        ),
        "polar1.5_nearest": lambda: lowbit.adamw_polar(
            lr, bits=1.5, rounding="nearest", **adam
        ),
        # Ablations: one moment polar (2 bits), the other float32.
        "polar2_m_only": lambda: _adam_codecs(
            lowbit.scale_by_adam_quantized(polar_codec(True), ident, b1, b2),
            lr,
            wd,
        ),
        "polar2_v_only": lambda: _adam_codecs(
            lowbit.scale_by_adam_quantized(ident, polar_codec(False), b1, b2),
            lr,
            wd,
        ),
        "polar2_vgeo": lambda: polar_pair(v_rings=V_RINGS_GEOMETRIC),
        "polar2_cal": lambda: calibrated(2),
        "polar1.5_cal": lambda: calibrated(1.5),
        "polar2_r1": lambda: polar_pair(m_rings=M_RINGS_TOP_ONE),
        # Adafactor with fp32 momentum vs polar 2-bit momentum; absolute step
        # sizes (no parameter scaling) so the learning rate means the same.
        # optax.adafactor adds weight_decay_rate * p AFTER the learning rate
        # (it is not multiplied by it), so the AdamW-equivalent rate is
        # peak_lr * wd (with wd itself the params shrank 10% a step).
        "adafactor": lambda: optax.adafactor(
            lr,
            multiply_by_parameter_scale=False,
            momentum=b1,
            weight_decay_rate=peak_lr * wd,
            weight_decay_mask=_decay_mask,
        ),
        "adafactor_polar2": lambda: lowbit.adafactor_polar(
            lr,
            multiply_by_parameter_scale=False,
            momentum=b1,
            weight_decay_rate=peak_lr * wd,
            weight_decay_mask=_decay_mask,
            bits=2,
        ),
        # Muon (optax.contrib.muon) with fp32 momentum vs polar 2-bit momentum
        # (issue 21). consistent_rms=0.2 scales each orthogonalized update to
        # AdamW's typical rms, so the same learning rate and schedule apply;
        # decoupled weight decay on the Muon (matrix) leaves, the AdamW
        # fallback (non-matrix leaves) with the same betas.
        "muon_fp32": lambda: optax.contrib.muon(lr, **muon),
        "muon_polar2": lambda: lowbit.muon_polar(lr, bits=2, **muon),
        "muon_polar2_sr": lambda: lowbit.muon_polar(
            lr, bits=2, rounding="stochastic", **muon
        ),
        "muon_4bit": lambda: lowbit.muon_4bit(lr, **muon),
        "muon_8bit": lambda: lowbit.muon_8bit(lr, **muon),
        # Issue 21's screen of the low-bit momentum: no momentum at all (fp32
        # Muon with beta 0, the stateless reference), the 4-bit codec rounded
        # stochastically or with blocks of 32, the 2-bit polar codec with
        # groups of 16, and 2-bit polar with a shorter momentum (beta 0.8).
        "muon_nomom": lambda: optax.contrib.muon(lr, beta=0.0, **muon),
        "muon_4bit_sr": lambda: lowbit.muon_4bit(
            lr, mu_codec=lowbit.codecs.blockwise4(rounding="stochastic"), **muon
        ),
        "muon_4bit_b32": lambda: lowbit.muon_4bit(
            lr, mu_codec=lowbit.codecs.blockwise4(block_size=32), **muon
        ),
        "muon_polar2_g16": lambda: lowbit.muon_polar(
            lr, mu_codec=lowbit.codecs.polar(2, group_size=16), **muon
        ),
        "muon_polar2_beta08": lambda: lowbit.muon_polar(lr, beta=0.8, **muon),
    }
    if name not in factories:
        raise ValueError(f"optimizer must be one of {sorted(factories)}, got {name!r}.")
    if clip_norm is None:
        return factories[name]()
    return optax.chain(optax.clip_by_global_norm(clip_norm), factories[name]())


# --------------------------------------------------------------------------
# Data.
# --------------------------------------------------------------------------


def load_austen(data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Train (five novels) and held-out (*Persuasion*) uint8 byte arrays."""
    if data_dir:
        root = pathlib.Path(data_dir)
        return (
            np.load(root / "austen_train.npy"),
            np.load(root / "austen_heldout.npy"),
        )
    from benchmarks import data

    return data.austen_bytes("train"), data.austen_bytes("heldout")


def train_offsets(n_tokens: int, steps: int, batch: int, window: int, seed: int):
    """Window starts ``(steps, batch)``: a function of the seed alone."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_tokens - window + 1, size=(steps, batch), dtype=np.int64)


def heldout_windows(tokens: np.ndarray, window: int, limit: int | None) -> np.ndarray:
    """Non-overlapping held-out windows ``(n, window)``, evenly spread, int32."""
    n = (tokens.size - 1) // (window - 1)
    starts = np.arange(n) * (window - 1)
    if limit is not None and n > limit:
        starts = starts[np.linspace(0, n - 1, limit).round().astype(int)]
    return tokens[starts[:, None] + np.arange(window)].astype(np.int32)


# --------------------------------------------------------------------------
# Training.
# --------------------------------------------------------------------------


def _stack(trees: list[Any]) -> Any:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def build(cfg: argparse.Namespace, seeds: list[int]):
    """Model graph and the seeds' initial parameters, stacked on axis 0."""
    states = []
    graphdef = None
    for seed in seeds:
        model = models.TinyGPT(
            256,
            cfg.d_model,
            cfg.n_layers,
            cfg.n_heads,
            cfg.seq_len,
            rngs=nnx.Rngs(seed),
        )
        graphdef, state = nnx.split(model)
        states.append(nnx.to_pure_dict(state))  # plain dicts of arrays
    return graphdef, _stack(states)


def make_evaluate(graphdef: Any, cfg: argparse.Namespace):
    """Jitted mean held-out loss per seed of stacked params on ``windows``."""

    @jax.jit
    def evaluate(params, windows):
        def per_seed(p):
            def one_batch(w):
                return models.loss_fn(nnx.merge(graphdef, p), w)

            batches = windows.reshape(-1, cfg.eval_batch, windows.shape[-1])
            return jax.lax.map(one_batch, batches).mean()

        return jax.vmap(per_seed)(params)

    return evaluate


def schedule(cfg: argparse.Namespace) -> optax.Schedule:
    """Linear warm-up then cosine decay to 10%."""
    return optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, cfg.warmup, cfg.steps, end_value=0.1 * cfg.lr
    )


def run_optimizer(
    name: str,
    cfg: argparse.Namespace,
    loss_of: Callable[[Any, jax.Array], jax.Array],
    params0: Any,
    train_tok: jax.Array,
    offsets: np.ndarray,
    eval_small: jax.Array,
    eval_full: jax.Array,
    evaluate: Callable[[Any, jax.Array], jax.Array],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Trains every seed with optimizer ``name``; returns curves and metrics.

    ``loss_of(params, tokens)`` is the mean next-token loss of one seed's
    parameters on a ``(batch, seq_len + 1)`` token window batch.
    """
    tx = make_optimizer(
        name, schedule(cfg), b1=cfg.b1, b2=cfg.b2, wd=cfg.wd, peak_lr=cfg.lr
    )
    window = cfg.seq_len + 1
    one = jax.tree.map(lambda x: x[0], params0)
    n_params = sum(x.size for x in jax.tree.leaves(one))
    state_shapes = jax.eval_shape(tx.init, one)
    state_bpp = lowbit.state_bytes(state_shapes) / n_params

    def step(params, opt_state, starts):
        tokens = train_tok[starts[:, None] + jnp.arange(window)].astype(jnp.int32)
        loss, grads = jax.value_and_grad(loss_of)(params, tokens)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    vstep = jax.vmap(step)  # over seeds

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_chunk(params, opt_state, starts):  # starts: (chunk, seeds, batch)
        def body(carry, s):
            p, o, loss = vstep(*carry, s)
            return (p, o), loss

        (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), starts)
        return params, opt_state, losses.mean(axis=0)

    # Eager (not jitted) init: XLA would constant-fold codebook searches.
    opt_state = jax.vmap(tx.init)(params0)
    params = jax.tree.map(jnp.copy, params0)
    n_chunks = cfg.steps // cfg.chunk
    starts = jnp.asarray(offsets.reshape(n_chunks, cfg.chunk, *offsets.shape[1:]))

    t0 = time.perf_counter()
    compiled = train_chunk.lower(params, opt_state, starts[0]).compile()
    compile_s = time.perf_counter() - t0

    steps_at, wall_at, train_curve, eval_curve = [0], [0.0], [], []
    eval_curve.append(np.asarray(evaluate(params, eval_small)).tolist())
    chunk_s, wall = [], 0.0
    for c in range(n_chunks):
        t = time.perf_counter()
        params, opt_state, losses = compiled(params, opt_state, starts[c])
        jax.block_until_ready((params, opt_state))
        losses = np.asarray(losses)
        dt = time.perf_counter() - t
        chunk_s.append(dt)
        wall += dt
        train_curve.append(losses.tolist())
        done = (c + 1) * cfg.chunk
        if done % cfg.eval_every == 0 or c == n_chunks - 1:
            ev = np.asarray(evaluate(params, eval_small))
            steps_at.append(done)
            wall_at.append(wall)
            eval_curve.append(ev.tolist())
            filled = round(20 * done / cfg.steps)
            log(
                f"  {name:18s} [{'#' * filled}{'.' * (20 - filled)}] "
                f"step {done:5d}/{cfg.steps}  train {losses.mean():.4f}"
                f"  heldout {ev.mean():.4f}  ({wall:.1f}s)"
            )
    final = np.asarray(evaluate(params, eval_full))
    finite = bool(np.all(np.isfinite(final)))
    # Step time: median chunk, after the first (which may warm caches).
    timed = chunk_s[1:] if len(chunk_s) > 1 else chunk_s
    step_ms_all = 1e3 * float(np.median(timed)) / cfg.chunk
    return dict(
        params=params,  # popped by the caller: not part of the JSON
        optimizer=name,
        final_heldout=final.tolist(),
        finite=finite,
        state_bytes_per_param=state_bpp,
        n_params=int(n_params),
        step_ms_all_seeds=step_ms_all,
        compile_s=compile_s,
        train_s=wall,
        curve=dict(
            eval_steps=steps_at,
            eval_wall_s=wall_at,
            heldout=eval_curve,  # [point][seed], the small held-out subset
            train=train_curve,  # [chunk][seed], mean over the chunk
        ),
    )


# --------------------------------------------------------------------------
# Output.
# --------------------------------------------------------------------------


def records_of(runs: list[dict[str, Any]], seeds: list[int], device: str):
    """The evidence records (one per optimizer) from the raw runs."""
    out = []
    for r in runs:
        x = np.asarray(r["final_heldout"], dtype=np.float64)
        out.append(
            dict(
                optimizer=r["optimizer"],
                metric="heldout_loss_nats_per_byte",
                **seed_stats(x),
                seeds=seeds,
                finite=r["finite"],
                state_bytes_per_param=r["state_bytes_per_param"],
                step_ms=r["step_ms_all_seeds"],
                step_ms_note=f"one step of all {len(seeds)} seeds (vmapped)",
                compile_s=r["compile_s"],
                device=device,
            )
        )
    base = next((o for o in out if o["optimizer"] == "adamw_fp32"), None)
    for o in out:
        o["rel_to_fp32"] = (o["mean"] / base["mean"] - 1.0) if base else None
    return out


def goals(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Goal checks of issue 5: polar 2 bit <= fp32 + 1%, 1.5 bit <= + 2%."""
    by = {r["optimizer"]: r for r in records}
    out = {}
    for name, tol in (("polar2", 0.01), ("polar1.5", 0.02)):
        if name in by and "adamw_fp32" in by:
            rel = by[name]["rel_to_fp32"]
            out[name] = dict(rel_to_fp32=rel, tolerance=tol, met=bool(rel <= tol))
    return out


def plot(result: dict[str, Any], path: pathlib.Path) -> None:
    """Held-out loss (mean over seeds) against steps and against wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    for i, r in enumerate(result["runs"]):
        c = r["curve"]
        ev = np.asarray(c["heldout"]).mean(axis=1)
        tr = np.asarray(c["train"]).mean(axis=1)
        style = dict(label=r["optimizer"], color=f"C{i % 10}")
        style["ls"] = "--" if i >= 10 else "-"
        chunk = result["meta"]["chunk"]
        axes[0].plot(chunk * (np.arange(tr.size) + 1), tr, **style)
        axes[1].plot(c["eval_steps"], ev, marker=".", **style)
        axes[2].plot(c["eval_wall_s"], ev, marker=".", **style)
    best = min(
        np.asarray(r["curve"]["heldout"]).mean(axis=1).min() for r in result["runs"]
    )
    top = max(
        float(np.asarray(r["curve"]["train"]).mean(axis=1).max())
        for r in result["runs"]
    )
    m = result["meta"]
    unit = m.get("loss_unit", "nats/byte")
    labels = (
        ("step", f"train loss ({unit}), full range"),
        ("step", "held-out loss, Persuasion (zoom)"),
        ("wall time (s), compile excluded", "held-out loss, Persuasion (zoom)"),
    )
    for k, (ax, (xl, yl)) in enumerate(zip(axes, labels, strict=True)):
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.set_ylim(best - 0.05, min(top, 5.6) + 0.05 if k == 0 else best + 0.5)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"{m.get('model', 'Byte-level GPT')} {m['n_params'] / 1e6:.1f}M params, "
        f"{m['steps']} steps x "
        f"{m['batch']}x{m['seq_len']} tokens, {len(m['seeds'])} seeds (mean), "
        f"{m['device']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(records: list[dict[str, Any]]) -> str:
    """A plain-text table of the records."""
    lines = [
        f"{'optimizer':18s} {'held-out loss':>17s} {'vs fp32':>8s} "
        f"{'B/param':>8s} {'step ms':>8s}"
    ]
    for r in records:
        rel = r["rel_to_fp32"]
        lines.append(
            f"{r['optimizer']:18s} {r['mean']:8.4f} ± {r['std']:6.4f} "
            f"{'' if rel is None else f'{100 * rel:+7.2f}%':>8s} "
            f"{r['state_bytes_per_param']:8.3f} {r['step_ms']:8.2f}"
        )
    return "\n".join(lines)


_SAME_SETTINGS = (
    "n_params",
    "seeds",
    "steps",
    "batch",
    "seq_len",
    "lr",
    "warmup",
    "b1",
    "b2",
    "weight_decay",
    "matmul_precision",
    "eval_windows_final",
    "device",
)


def resume(path: str, meta: dict, runs: list, names: list[str]) -> list[str]:
    """Adds the runs of an earlier result of the same settings; returns the rest.

    A benchmark that does not fit one device call runs in parts: the second
    part resumes the first's JSON. Every setting that shapes the numbers must
    match (``_SAME_SETTINGS``), else ValueError naming the first that differs.
    """
    prior = json.loads(pathlib.Path(path).read_text())
    for key in _SAME_SETTINGS:
        if prior["meta"].get(key) != meta.get(key):
            raise ValueError(
                f"--resume {path}: its {key} is {prior['meta'].get(key)!r}, this "
                f"run's is {meta.get(key)!r}; resume only a run of the same settings."
            )
    kept = [r for r in prior["runs"] if r["optimizer"] in names]
    runs.extend(kept)
    meta.setdefault("resumed_from", []).append(
        dict(
            file=pathlib.Path(path).name,
            date=prior["meta"]["date"],
            commit=prior["meta"].get("optax_lowbit_commit"),
            optimizers=[r["optimizer"] for r in kept],
        )
    )
    done = {r["optimizer"] for r in kept}
    return [n for n in names if n not in done]


def write(result, out_json: pathlib.Path, out_png: pathlib.Path | None) -> None:
    """Writes the JSON (and the PNG where matplotlib is there)."""
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=1))
    if out_png is not None and result["runs"]:
        try:
            plot(result, out_png)
        except ImportError:
            print("matplotlib missing: no plot", file=sys.stderr)


# --------------------------------------------------------------------------
# Main.
# --------------------------------------------------------------------------


def add_training_args(p: argparse.ArgumentParser, **defaults: Any) -> None:
    """The options `run_optimizer` reads, with per-benchmark ``defaults``."""
    d = defaults
    p.add_argument("--optimizers", default=",".join(d["optimizers"]))
    p.add_argument("--seeds", default=d["seeds"])
    p.add_argument("--steps", type=int, default=d["steps"])
    p.add_argument("--chunk", type=int, default=25)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--batch", type=int, default=d["batch"])
    p.add_argument("--seq-len", type=int, default=d["seq_len"])
    p.add_argument("--lr", type=float, default=d["lr"])
    p.add_argument("--warmup", type=int, default=d["warmup"])
    p.add_argument("--b1", type=float, default=0.9)
    p.add_argument("--b2", type=float, default=0.95)
    p.add_argument("--wd", type=float, default=d["wd"])
    p.add_argument("--eval-windows", type=int, default=d["eval_windows"])
    p.add_argument("--eval-full", type=int, default=d["eval_full"], help="None = all")
    p.add_argument("--eval-batch", type=int, default=d["eval_batch"])
    p.add_argument(
        "--matmul-precision",
        default="auto",
        help="jax_default_matmul_precision; auto = bfloat16 on GPU, else default",
    )
    p.add_argument("--deadline-s", type=float, default=None, help="skip the rest")


def setup(cfg: argparse.Namespace) -> tuple[str | None, str, list[int], list[str]]:
    """The run set-up shared by the training benchmarks.

    Sets ``jax_default_matmul_precision`` (``auto``: bfloat16 on GPU) and
    checks every optimizer name before any work (fail fast on typos).

    Returns:
      ``(precision or None, device description, seeds, optimizer names)``.
    """
    backend = jax.default_backend()
    precision = cfg.matmul_precision
    if precision == "auto":
        precision = "bfloat16" if backend == "gpu" else None
    if precision:
        jax.config.update("jax_default_matmul_precision", precision)
    device = f"{jax.devices()[0].device_kind} ({backend})"
    seeds = [int(s) for s in cfg.seeds.split(",")]
    names = [n for n in cfg.optimizers.split(",") if n]
    for n in names:
        make_optimizer(n, 1e-3, b1=0.9, b2=0.95, wd=0.1)
    return precision, device, seeds, names


def save_first_model(cfg: argparse.Namespace, params: Any, what: str) -> None:
    """``--save-params``: the first seed of seed-stacked ``params`` to ``.npz``.

    `models.load_tinygpt` reads it back (IMPQ's fp32-trained second model).

    Args:
      cfg: the parsed options (``save_params`` and the model's sizes).
      params: the run's final parameters, stacked over seeds.
      what: which run, for the log line.
    """
    models.save_tinygpt(
        cfg.save_params,
        jax.tree.map(lambda x: np.asarray(x[0]), params),
        vocab=256,
        d_model=cfg.d_model,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        seq_len=cfg.seq_len,
    )
    print(f"saved {what} to {cfg.save_params}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--smoke`` shrinks everything for CPU tests."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny model, 20 steps")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=str(RESULTS / "train_lm.json"))
    p.add_argument("--png", default=None, help="default: --out with .png")
    add_training_args(
        p,
        optimizers=ALL_OPTIMIZERS,
        seeds="0,1,2",
        steps=400,
        batch=32,
        seq_len=256,
        lr=1e-3,
        warmup=40,
        wd=0.1,
        eval_windows=256,
        eval_full=None,
        eval_batch=64,
    )
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--n-layers", type=int, default=5)
    p.add_argument("--n-heads", type=int, default=12)
    p.add_argument(
        "--resume",
        default=None,
        help="result JSONs (comma-separated) of the same settings: keep their runs "
        "of the listed optimizers, run only the rest",
    )
    p.add_argument(
        "--fresh",
        default=None,
        help="optimizers to run anew even where a --resume file has them",
    )
    p.add_argument("--plot-only", default=None, help="re-plot a result JSON")
    p.add_argument(
        "--save-params",
        default=None,
        help="write the first optimizer's first-seed model here (.npz, "
        "models.load_tinygpt reads it; IMPQ's second model)",
    )
    cfg = p.parse_args(argv)
    if cfg.smoke:
        cfg.steps, cfg.chunk, cfg.eval_every, cfg.warmup = 20, 5, 10, 4
        cfg.batch, cfg.seq_len, cfg.d_model, cfg.n_layers, cfg.n_heads = 8, 64, 64, 2, 2
        cfg.eval_windows, cfg.eval_full, cfg.eval_batch = 16, 32, 16
        cfg.lr = 3e-3
    if cfg.steps % cfg.chunk or cfg.eval_every % cfg.chunk:
        p.error("--steps and --eval-every must be multiples of --chunk.")
    return cfg


def seed_stats(values: Any) -> dict:
    """``mean``, ``std`` (ddof 1; 0 for one seed) and ``per_seed`` of a metric."""
    x = np.asarray(values, dtype=np.float64)
    return dict(
        mean=float(x.mean()),
        std=float(x.std(ddof=1)) if x.size > 1 else 0.0,
        per_seed=x.tolist(),
    )


def run_meta(cfg: Any, device: str, n_params: int, seeds: Any, precision: Any) -> dict:
    """The run's record shared by the LM benchmarks: versions, date, model, schedule."""
    return dict(
        device=device,
        jax=jax.__version__,
        optax=optax.__version__,
        flax=flax.__version__,
        python=platform.python_version(),
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        n_params=int(n_params),
        seeds=seeds,
        steps=cfg.steps,
        batch=cfg.batch,
        seq_len=cfg.seq_len,
        tokens_per_seed=cfg.steps * cfg.batch * cfg.seq_len,
        d_model=cfg.d_model,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        lr=cfg.lr,
        warmup=cfg.warmup,
        schedule="linear warm-up, cosine decay to 10%",
        b1=cfg.b1,
        b2=cfg.b2,
        weight_decay=cfg.wd,
        clip_global_norm=1.0,
        matmul_precision=precision or "default",
        chunk=cfg.chunk,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark; returns the result dict written to ``--out``."""
    cfg = parse_args(argv)
    out_json = pathlib.Path(cfg.out)
    out_png = pathlib.Path(cfg.png) if cfg.png else out_json.with_suffix(".png")
    if cfg.plot_only:
        result = json.loads(pathlib.Path(cfg.plot_only).read_text())
        plot(result, out_png)
        print(table(result["records"]))
        return result
    t_start = time.perf_counter()
    precision, device, seeds, names = setup(cfg)

    train_np, heldout_np = load_austen(cfg.data_dir)
    window = cfg.seq_len + 1
    train_tok = jnp.asarray(train_np)
    eval_small = heldout_windows(heldout_np, window, cfg.eval_windows)
    eval_full = heldout_windows(heldout_np, window, cfg.eval_full)
    cut = lambda w: w[: len(w) // cfg.eval_batch * cfg.eval_batch]  # noqa: E731
    eval_small, eval_full = jnp.asarray(cut(eval_small)), jnp.asarray(cut(eval_full))
    offsets = np.stack(
        [train_offsets(train_np.size, cfg.steps, cfg.batch, window, s) for s in seeds],
        axis=1,
    )  # (steps, seeds, batch)
    graphdef, params0 = build(cfg, seeds)
    n_params = sum(x[0].size for x in jax.tree.leaves(params0))
    evaluate = make_evaluate(graphdef, cfg)
    t = time.perf_counter()
    jax.block_until_ready(evaluate(params0, eval_small))
    jax.block_until_ready(evaluate(params0, eval_full))
    print(f"eval compiled in {time.perf_counter() - t:.1f}s", flush=True)

    meta = dict(
        **run_meta(cfg, device, n_params, seeds, precision),
        optax_lowbit_commit=os.environ.get("OPTAX_LOWBIT_COMMIT", "working tree"),
        eval_windows_curve=int(eval_small.shape[0]),
        eval_windows_final=int(eval_full.shape[0]),
        heldout="persuasion (whole novel, never trained on)",
        smoke=cfg.smoke,
        skipped=[],
    )
    print(
        f"{device}, JAX {jax.__version__}; {n_params / 1e6:.2f}M params; "
        f"seeds {seeds}; {cfg.steps} steps x {cfg.batch}x{cfg.seq_len}",
        flush=True,
    )
    runs: list[dict[str, Any]] = []
    result: dict[str, Any] = dict(meta=meta, records=[], goals={}, runs=runs)
    fresh = [n for n in (cfg.fresh or "").split(",") if n]
    for path in (cfg.resume or "").split(","):
        if path:
            rest = resume(path, meta, runs, [n for n in names if n not in fresh])
            names = [n for n in names if n in rest or n in fresh]
    longest = 0.0
    for name in names:
        elapsed = time.perf_counter() - t_start
        if cfg.deadline_s and elapsed + 1.1 * longest > cfg.deadline_s:
            print(f"skip {name}: deadline ({elapsed:.0f}s elapsed)", flush=True)
            meta["skipped"].append(name)
            continue
        t = time.perf_counter()
        run = run_optimizer(
            name,
            cfg,
            lambda p, tokens: models.loss_fn(nnx.merge(graphdef, p), tokens),
            params0,
            train_tok,
            offsets,
            eval_small,
            eval_full,
            evaluate,
            lambda s: print(s, flush=True),
        )
        longest = max(longest, time.perf_counter() - t)
        final_params = run.pop("params")
        if cfg.save_params and not runs:  # the first optimizer's first seed
            save_first_model(cfg, final_params, f"{name} seed {seeds[0]}")
        runs.append(run)
        print(
            f"{name}: held-out {np.mean(run['final_heldout']):.4f} "
            f"{run['final_heldout']}  compile {run['compile_s']:.1f}s  "
            f"train {run['train_s']:.1f}s  {run['step_ms_all_seeds']:.1f} ms/step",
            flush=True,
        )
        result["records"] = records_of(runs, seeds, device)
        result["goals"] = goals(result["records"])
        write(result, out_json, None)
    meta["total_s"] = time.perf_counter() - t_start
    write(result, out_json, out_png)
    print(table(result["records"]))
    print(json.dumps(result["goals"]))
    return result


if __name__ == "__main__":
    main()
