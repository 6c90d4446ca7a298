"""Round-trip error of every codec, measured side by side on one set of data.

Run ``python -m benchmarks.codec_error`` (a few minutes on a CPU; the moment
capture is cached after the first run). It prints a table and writes, under
``--out`` (default ``benchmarks/results/``):

* ``codec_error.json``: ``meta`` (device, versions, date, command, capture
  settings), ``records`` (one per codec and data set) and ``symmetry`` (are
  moment pairs circularly symmetric?);
* ``codec_error.png``: relative error against all-in bits, one panel per data
  set, one point per codec;
* ``moment_pairs.png``: real Adam moment pairs normalised by their group scale,
  with the polar codebooks overlaid, and their angular histograms.

Data. Signed codecs run on (a) Gaussian, (b) Student-t(3) (fresh, fixed seed)
and (c) the first moment ``m`` of a real ``optax.adam`` run (TinyGPT on the
Austen novels, `benchmarks.capture_moments`, seed 0). Unsigned codecs run on
the real second moment ``v`` of the same run and on ``g**2`` of Gaussian ``g``
(a synthetic ``v``: Adam's first step, where ``m = g``). Codecs encode each
leaf in its own shape, grouped along its last axis, as an optimizer does.

Calibration is out of sample: the "calibrated" polar rings for real data are
fitted (`optax_lowbit.codecs.calibrate`) to the moments of a second capture
with another seed (``--cal-seed``, 1), and for synthetic data to a fresh
sample of the same distribution drawn with another seed.

Second-moment metrics (Adam's update ``u = m̂ / (sqrt(v̂) + eps)``, bias
corrected, ``eps = 1e-8``, fp32 ``m``): ``inv_sqrt_rel_error`` is
``|u(v_hat) - u(v)| / |u(v)|``; ``update_max_ratio`` is ``max |u(v_hat)| /
max |u(v)|``; ``underestimate_frac`` the fraction of elements with ``v_hat <
v/2``; ``overestimate_frac`` with ``v_hat > 2 v``; ``zero_decode_frac`` the
fraction with ``v > 0`` decoded to 0.

``--quick`` is a smoke mode for tests: small random data and the moments of
a short MLP-on-digits run (no cache), in well under a minute.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
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
import optax

from benchmarks import capture_moments
from optax_lowbit import codecs

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
EPS = 1e-8  # Adam's eps, for the update metrics
B1, B2 = 0.9, 0.999  # optax.adam defaults: the capture's bias corrections
GROUP = 64  # polar group size: the symmetry statistics use the same groups
SIGNED_DATA = ("gaussian", "student_t3", "real_m")
UNSIGNED_DATA = ("gaussian_sq", "real_v")
DATA_TITLES = {
    "gaussian": "Gaussian N(0,1)",
    "student_t3": "Student-t(3)",
    "real_m": "real Adam m (TinyGPT)",
    "gaussian_sq": "synthetic v = g², g ~ N(0,1)",
    "real_v": "real Adam v (TinyGPT)",
}


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


def _synthetic(kind: str, n: int, seed: int) -> np.ndarray:
    """``(n // 1024, 1024)`` float32 samples (groups along the last axis)."""
    rng = np.random.default_rng(seed)
    shape = (max(1, n // 1024), 1024)
    if kind == "gaussian":
        return rng.standard_normal(shape).astype(np.float32)
    if kind == "student_t3":
        return rng.standard_t(3.0, shape).astype(np.float32)
    raise ValueError(kind)


def _capture(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    if args.quick:
        return capture_moments.capture_adam_moments(
            steps=args.steps, seed=seed, model="mlp", use_cache=False
        )
    return capture_moments.capture_adam_moments(
        steps=args.steps, seed=seed, model=args.model
    )


def _bias_corrections(steps: int) -> tuple[float, float]:
    return 1.0 - B1**steps, 1.0 - B2**steps


# --------------------------------------------------------------------------
# Codecs and measurements
# --------------------------------------------------------------------------

_JITTED: dict[Any, Callable] = {}


def _roundtrip(codec: codecs.Codec, leaves: list[np.ndarray]) -> list[np.ndarray]:
    """``decode(encode(leaf))`` of every leaf, in one jitted call per codec."""
    fn = _JITTED.get(codec)
    if fn is None:
        fn = jax.jit(lambda xs: [codec.decode(codec.encode(x)) for x in xs])
        _JITTED[codec] = fn
    out = fn([jnp.asarray(x) for x in leaves])
    return [np.asarray(y, np.float32) for y in out]


def _stored_bits(codec: codecs.Codec, leaves: list[np.ndarray]) -> float:
    """All-in bits per element actually stored for these leaves (padding too)."""
    nbytes, numel = 0, 0
    for x in leaves:
        packed = jax.eval_shape(codec.encode, jax.ShapeDtypeStruct(x.shape, x.dtype))
        for leaf in jax.tree.leaves(packed):
            nbytes += math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
        numel += x.size
    return 8.0 * nbytes / numel


def _flat(leaves: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.ravel(x) for x in leaves]).astype(np.float64)


def _errors(x: np.ndarray, x_hat: np.ndarray) -> dict[str, float]:
    err = x_hat - x
    return {
        "rel_error": float(np.linalg.norm(err) / np.linalg.norm(x)),
        "max_abs_error_rel_to_max": float(np.max(np.abs(err)) / np.max(np.abs(x))),
    }


def _v_metrics(
    m: np.ndarray, v: np.ndarray, v_hat: np.ndarray, c1: float, c2: float
) -> dict[str, float]:
    """Second-moment metrics: what a quantized ``v`` does to Adam's update."""
    mc = m / c1
    u = mc / (np.sqrt(np.maximum(v, 0.0) / c2) + EPS)
    u_hat = mc / (np.sqrt(np.maximum(v_hat, 0.0) / c2) + EPS)
    pos = v > 0
    both = pos & (v_hat > 0)
    return {
        "inv_sqrt_rel_error": float(np.linalg.norm(u_hat - u) / np.linalg.norm(u)),
        "update_max_ratio": float(np.max(np.abs(u_hat)) / np.max(np.abs(u))),
        "underestimate_frac": float(np.mean(v_hat < 0.5 * v)),
        "overestimate_frac": float(np.mean(pos & (v_hat > 2.0 * v))),
        "zero_decode_frac": float(np.mean(pos & (v_hat <= 0))),
        "mean_abs_log_sqrt_ratio": float(
            np.mean(np.abs(0.5 * np.log(v_hat[both] / v[both])))
        ),
    }


def _codec_list(
    signed: bool, calibrated: dict[float, codecs.Codec], cal_note: str
) -> list[dict[str, Any]]:
    """The codecs compared on one kind of data, each with its variant label."""
    polar_default = "paper rings" if signed else "default rings"
    polar_note = (
        "published rings (DESIGN §4.1)"
        if signed
        else "the codec's shipped unsigned rings (optax_lowbit.codecs.polar)"
    )
    out = [
        ("bf16", "reference", codecs.identity(jnp.bfloat16), "bf16 states"),
        ("8-bit blockwise", "dynamic map", codecs.blockwise8(signed=signed), ""),
        ("4-bit blockwise", "", codecs.blockwise4(signed=signed), ""),
        ("π-Quant", "nearest", codecs.piquant("nearest", signed=signed), ""),
        ("π-Quant", "paper", codecs.piquant("paper", signed=signed), ""),
    ]
    for bits in (2, 1.5):
        out.append(
            (
                f"polar {bits}b",
                polar_default,
                codecs.polar(bits=bits, signed=signed),
                polar_note,
            )
        )
        out.append((f"polar {bits}b", "calibrated", calibrated[bits], cal_note))
    records = []
    for family, variant, codec, note in out:
        label = f"{family} ({variant})" if variant else family
        rec = {
            "codec": label,
            "family": family,
            "variant": variant,
            "codec_name": codec.name,
            "codec_obj": codec,
            "bits_per_element": float(codec.bits_per_element),
        }
        if isinstance(codec, codecs.PolarCodec):
            rec["rings"] = [round(r, 5) for r in codec.rings]
        if note:
            rec["note"] = note
        records.append(rec)
    return records


def _calibrate(signed: bool, samples: list[np.ndarray]) -> dict[float, codecs.Codec]:
    return {
        bits: codecs.calibrate(
            codecs.polar(bits=bits, signed=signed), [jnp.asarray(s) for s in samples]
        )
        for bits in (2, 1.5)
    }


def _measure(
    data: str,
    leaves: list[np.ndarray],
    specs: list[dict[str, Any]],
    *,
    m_leaves: list[np.ndarray] | None = None,
    corrections: tuple[float, float] = (1.0, 1.0),
) -> list[dict[str, Any]]:
    x = _flat(leaves)
    m = _flat(m_leaves) if m_leaves is not None else None
    records = []
    for spec in specs:
        codec = spec["codec_obj"]
        start = time.perf_counter()
        x_hat = _flat(_roundtrip(codec, leaves))
        seconds = time.perf_counter() - start
        rec = {k: v for k, v in spec.items() if k != "codec_obj"}
        rec["data"] = data
        rec["n_elements"] = int(x.size)
        rec["stored_bits_per_element"] = _stored_bits(codec, leaves)
        rec.update(_errors(x, x_hat))
        if m is not None:
            rec.update(_v_metrics(m, x, x_hat, *corrections))
        rec["seconds"] = round(seconds, 3)
        records.append(rec)
    return records


# --------------------------------------------------------------------------
# Symmetry of moment pairs
# --------------------------------------------------------------------------


def normalised_pairs(
    leaves: list[np.ndarray], pairing: str, group: int = GROUP
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of each group of ``group`` elements (last axis), over the group scale.

    Args:
      leaves: arrays of any shape; groups run along the last axis, zero padded.
      pairing: ``"adjacent"`` for ``(x[2i], x[2i+1])`` (the paper),
        ``"split"`` for ``(x[j], x[j + group/2])`` (our polar codec).
      group: elements per group.

    Returns:
      ``(a, b)`` float64 coordinates divided by the group's largest pair
      radius; all-zero pairs (padding included) are left out.
    """
    out_a, out_b = [], []
    for leaf in leaves:
        x = np.asarray(leaf, np.float64)
        x = x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
        pad = (-x.shape[-1]) % group
        x = np.pad(x, [(0, 0), (0, pad)]).reshape(-1, group)
        if pairing == "adjacent":
            a, b = x[:, 0::2], x[:, 1::2]
        elif pairing == "split":
            a, b = x[:, : group // 2], x[:, group // 2 :]
        else:
            raise ValueError(f"pairing must be 'adjacent' or 'split', got {pairing!r}")
        r = np.hypot(a, b)
        scale = r.max(axis=1, keepdims=True)
        scale = np.where(scale > 0, scale, 1.0)
        keep = r > 0
        out_a.append((a / scale)[keep])
        out_b.append((b / scale)[keep])
    return np.concatenate(out_a), np.concatenate(out_b)


def symmetry_stats(a: np.ndarray, b: np.ndarray, signed: bool) -> dict[str, Any]:
    """How far normalised pairs are from circular symmetry.

    For a circularly symmetric law the angle is uniform: total variation
    distance 0 from uniform, ``axis_frac`` (angle within 22.5° of an axis)
    0.5, ``mean_cos4`` 0 (> 0: mass on the axes, a "cross"; < 0: on the
    diagonals), quadrant masses 0.25 and coordinate correlation 0.
    Unsigned pairs live in the first quadrant: the same measures on [0, 90°].
    """
    theta = np.arctan2(b, a)
    r = np.hypot(a, b)
    if signed:
        bins = 32
        hist, _ = np.histogram(theta, bins=bins, range=(-np.pi, np.pi))
    else:
        bins = 16
        hist, _ = np.histogram(theta, bins=bins, range=(0.0, 0.5 * np.pi))
    p = hist / max(1, hist.sum())
    to_axis = np.abs((theta + np.pi / 4) % (np.pi / 2) - np.pi / 4)
    outer = r >= 0.25
    # Pairs with one coordinate exactly 0 (dead units, e.g. embedding rows of
    # bytes never seen) sit on an axis by construction: report them apart.
    nonzero = (a != 0) & (b != 0)
    out = {
        "n_pairs": int(a.size),
        "angle_hist_bins": bins,
        "angle_hist_tv_from_uniform": float(0.5 * np.abs(p - 1.0 / bins).sum()),
        "angle_hist_max_over_uniform": float(p.max() * bins),
        "axis_frac": float(np.mean(to_axis < np.pi / 8)),
        "axis_frac_r_ge_0.25": float(np.mean(to_axis[outer] < np.pi / 8))
        if outer.any()
        else None,
        "zero_coord_frac": float(np.mean(~nonzero)),
        "axis_frac_both_nonzero": float(np.mean(to_axis[nonzero] < np.pi / 8))
        if nonzero.any()
        else None,
        "mean_cos4": float(np.mean(np.cos(4 * theta))),
        "pearson_corr": float(np.corrcoef(a, b)[0, 1]),
        "radius_quantiles": {
            str(q): float(np.quantile(r, q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)
        },
        "angle_hist": [round(float(v), 5) for v in p],
    }
    if signed:
        quad = [
            np.mean((a > 0) & (b >= 0)),
            np.mean((a <= 0) & (b > 0)),
            np.mean((a < 0) & (b <= 0)),
            np.mean((a >= 0) & (b < 0)),
        ]
        out["quadrant_mass"] = [round(float(q), 5) for q in quad]
        out["mean_resultant_length"] = float(np.abs(np.mean(np.exp(1j * theta))))
    return out


def _symmetry(sets: dict[str, tuple[list[np.ndarray], bool]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, (leaves, signed) in sets.items():
        out[name] = {
            pairing: symmetry_stats(*normalised_pairs(leaves, pairing), signed)
            for pairing in ("adjacent", "split")
        }
    return out


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


def _table(records: list[dict[str, Any]]) -> str:
    head = (
        f"{'data':12s} {'codec':34s} {'bits':>6s} {'stored':>6s} {'rel_err':>8s} "
        f"{'max/amax':>8s} {'upd_err':>8s} {'v̂<v/2':>7s} {'v̂>2v':>7s} "
        f"{'v̂=0':>7s} {'umax':>7s}"
    )
    rows = [head, "-" * len(head)]
    last = None
    for r in records:
        if last is not None and r["data"] != last:
            rows.append("")
        last = r["data"]
        extra = ""
        if "inv_sqrt_rel_error" in r:
            extra = (
                f" {r['inv_sqrt_rel_error']:8.4f} {r['underestimate_frac']:7.4f} "
                f"{r['overestimate_frac']:7.4f} {r['zero_decode_frac']:7.4f} "
                f"{r['update_max_ratio']:7.3g}"
            )
        rows.append(
            f"{r['data']:12s} {r['codec']:34s} {r['bits_per_element']:6.3f} "
            f"{r['stored_bits_per_element']:6.3f} {r['rel_error']:8.4f} "
            f"{r['max_abs_error_rel_to_max']:8.4f}{extra}"
        )
    return "\n".join(rows)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _symmetry_table(sym: dict[str, Any]) -> str:
    head = (
        f"{'data':16s} {'pairing':9s} {'TV(angle)':>9s} {'axis':>6s} "
        f"{'axis r>.25':>10s} {'axis nz':>7s} {'zero':>6s} {'cos4θ':>7s} "
        f"{'corr':>7s} {'quadrants':>28s}"
    )
    rows = [head, "-" * len(head)]
    for name, by_pairing in sym.items():
        for pairing, s in by_pairing.items():
            quad = " ".join(f"{q:.3f}" for q in s.get("quadrant_mass", []))
            rows.append(
                f"{name:16s} {pairing:9s} {s['angle_hist_tv_from_uniform']:9.4f} "
                f"{s['axis_frac']:6.3f} {_fmt(s['axis_frac_r_ge_0.25']):>10s} "
                f"{_fmt(s['axis_frac_both_nonzero']):>7s} {s['zero_coord_frac']:6.3f} "
                f"{s['mean_cos4']:7.3f} {s['pearson_corr']:7.3f} {quad:>28s}"
            )
    return "\n".join(rows)


_STYLE = {
    # family -> (colour, marker); variants differ by fill
    "bf16": ("black", "D"),
    "8-bit blockwise": ("tab:green", "s"),
    "4-bit blockwise": ("tab:olive", "s"),
    "π-Quant": ("tab:purple", "^"),
    "polar 2b": ("tab:red", "o"),
    "polar 1.5b": ("tab:orange", "o"),
}
_HOLLOW = ("paper", "paper rings", "default rings")


def _short(rec: dict[str, Any]) -> str:
    variant = {
        "paper rings": "paper",
        "default rings": "default",
        "calibrated": "cal.",
        "nearest": "nearest",
        "paper": "paper",
    }.get(rec["variant"], "")
    family = rec["family"].replace(" blockwise", "")
    return f"{family} {variant}".strip()


def plot_errors(records: list[dict[str, Any]], path: pathlib.Path) -> None:
    """Relative error (log) against all-in bits, one panel per data set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = [
        d for d in (*SIGNED_DATA, *UNSIGNED_DATA) if d in {r["data"] for r in records}
    ]
    fig, axes = plt.subplots(2, 3, figsize=(17, 10.5), dpi=110)
    axes = axes.ravel()
    handles = {}
    for ax, data in zip(axes, datasets, strict=False):
        recs = [r for r in records if r["data"] == data]
        for r in recs:
            colour, marker = _STYLE[r["family"]]
            hollow = r["variant"] in _HOLLOW
            h = ax.scatter(
                r["bits_per_element"],
                r["rel_error"],
                s=70,
                marker=marker,
                edgecolors=colour,
                facecolors="white" if hollow else colour,
                linewidths=1.8,
                zorder=3,
            )
            handles.setdefault(r["codec"], h)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ticks = sorted({round(r["bits_per_element"], 3) for r in recs})
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:.4g}" for t in ticks], rotation=90, fontsize=8)
        ax.minorticks_off()
        ax.set_xlim(0.6, 40)
        lo = min(r["rel_error"] for r in recs)
        hi = max(r["rel_error"] for r in recs)
        ax.set_ylim(lo / 2.5, hi * 2.5)
        ax.grid(True, which="major", alpha=0.3)
        n = recs[0]["n_elements"]
        ax.set_title(f"{DATA_TITLES[data]}  ({n:,} elements)", fontsize=11)
        ax.set_xlabel("all-in bits per element (codes + scales)")
        ax.set_ylabel("relative error ‖x̂ − x‖ / ‖x‖")
    legend_ax = axes[len(datasets)] if len(datasets) < len(axes) else None
    for ax in axes[len(datasets) :]:
        ax.axis("off")
    if legend_ax is not None:
        legend_ax.legend(
            list(handles.values()),
            list(handles.keys()),
            loc="center",
            fontsize=10,
            title="codec (hollow: paper/default; filled: calibrated/ours)",
            title_fontsize=9,
            frameon=False,
        )
    fig.suptitle(
        "Codec round-trip error vs all-in bits (signed codecs: top row; unsigned: "
        "bottom). Calibrated polar rings are fitted out of sample.",
        fontsize=12,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.canvas.draw()  # fixes the layout: labels are placed in display space
    for ax, data in zip(axes, datasets, strict=False):
        _place_labels(fig, ax, [r for r in records if r["data"] == data])
    fig.savefig(path)
    plt.close(fig)


# Label positions tried in turn: (dx, dy) in points, horizontal/vertical align.
_LABEL_SPOTS = [
    (dx * sx, dy, "left" if sx > 0 else "right", va)
    for dy, va in (
        (0, "center"),
        (9, "bottom"),
        (-9, "top"),
        (18, "bottom"),
        (-18, "top"),
        (27, "bottom"),
        (-27, "top"),
    )
    for sx in (1, -1)
    for dx in (9, 24)
]


def _place_labels(fig: Any, ax: Any, recs: list[dict[str, Any]]) -> None:
    """Labels every point where it overlaps no other label, point or the frame."""
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    pad = 5.0 * fig.dpi / 72.0
    obstacles = []
    for r in recs:
        x, y = ax.transData.transform((r["bits_per_element"], r["rel_error"]))
        obstacles.append(Bbox.from_extents(x - pad, y - pad, x + pad, y + pad))
    for r in sorted(recs, key=lambda r: (r["bits_per_element"], r["rel_error"])):
        xy = (r["bits_per_element"], r["rel_error"])
        label = f"{_short(r)} {r['rel_error']:.3g}"
        spot = _LABEL_SPOTS[0]
        for dx, dy, ha, va in _LABEL_SPOTS:
            probe = ax.annotate(
                label,
                xy,
                xytext=(dx, dy),
                textcoords="offset points",
                ha=ha,
                va=va,
                fontsize=7.5,
            )
            box = probe.get_window_extent(renderer).expanded(1.03, 1.15)
            probe.remove()
            fits = (
                frame.x0 <= box.x0
                and box.x1 <= frame.x1
                and frame.y0 <= box.y0
                and box.y1 <= frame.y1
            )
            if fits and not any(box.overlaps(o) for o in obstacles):
                spot = (dx, dy, ha, va)
                break
        obstacles.append(box)
        dx, dy, ha, va = spot
        ax.annotate(
            label,
            xy,
            xytext=(dx, dy),
            textcoords="offset points",
            ha=ha,
            va=va,
            fontsize=7.5,
            arrowprops={
                "arrowstyle": "-",
                "color": "grey",
                "lw": 0.6,
                "shrinkA": 0,
                "shrinkB": 5,
            },
        )


def plot_pairs(
    pair_sets: dict[str, list[np.ndarray]],
    sym: dict[str, Any],
    codebooks: dict[str, list[tuple[str, np.ndarray, str]]],
    path: pathlib.Path,
    seed: int = 0,
) -> None:
    """Scatter of normalised moment pairs (both pairings) and angle histograms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(pair_sets)
    signed_of = {"m": True, "sqrt_v": False, "v": False}
    titles = {
        "m": "m (first moment)",
        "sqrt_v": "√v (no codebook: polar codes v)",
        "v": "v (second moment)",
    }
    pairings = {
        "adjacent": "pairs (x[2i], x[2i+1])",
        "split": "pairs (x[j], x[j+32]) (polar codec)",
    }
    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(3, len(names), figsize=(5.6 * len(names), 16.5))
    for col, name in enumerate(names):
        signed = signed_of[name]
        for row, pairing in enumerate(pairings):
            ax = axes[row, col]
            a, b = normalised_pairs(pair_sets[name], pairing)
            idx = rng.choice(a.size, size=min(a.size, 40000), replace=False)
            ax.scatter(a[idx], b[idx], s=1.5, alpha=0.2, color="tab:blue", lw=0)
            t = np.linspace(0, 2 * np.pi if signed else np.pi / 2, 200)
            ax.plot(np.cos(t), np.sin(t), color="grey", lw=0.8, ls="--")
            for label, pts, style in codebooks.get(name, []):
                marker, colour = style[0], style[1:]
                ax.scatter(
                    pts[:, 0],
                    pts[:, 1],
                    marker=marker,
                    s=60,
                    edgecolors=colour if marker == "o" else None,
                    facecolors="none" if marker == "o" else colour,
                    linewidths=1.6,
                    label=label,
                    zorder=4,
                )
            s = sym[name][pairing]
            text = (
                f"TV(angle, uniform) = {s['angle_hist_tv_from_uniform']:.3f}\n"
                f"axis frac = {s['axis_frac']:.3f} (uniform 0.5)\n"
                f"axis frac, no zero coord = {s['axis_frac_both_nonzero']:.3f}\n"
                f"pairs with a zero coord = {s['zero_coord_frac']:.3f}\n"
                f"mean cos4θ = {s['mean_cos4']:.3f}\n"
                f"corr = {s['pearson_corr']:.3f}"
            )
            if signed:
                ax.set_xlim(-1.05, 1.05)
                ax.set_ylim(-1.05, 1.05)
                loc = (0.02, 0.02)
                va = "bottom"
            else:
                ax.set_xlim(-0.02, 1.05)
                ax.set_ylim(-0.02, 1.05)
                loc = (0.97, 0.97)
                va = "top"
            ax.text(
                *loc,
                text,
                transform=ax.transAxes,
                fontsize=8,
                va=va,
                ha="left" if signed else "right",
                bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "grey"},
            )
            ax.set_aspect("equal")
            ax.set_title(f"{titles[name]}: {pairings[pairing]}", fontsize=10)
            ax.set_xlabel("first coordinate / group scale")
            ax.set_ylabel("second coordinate / group scale")
            if codebooks.get(name):
                ax.legend(
                    loc="upper right" if signed else "lower right",
                    fontsize=7.5,
                    framealpha=0.85,
                    markerscale=0.8,
                )
        ax = axes[2, col]
        for pairing, colour in (("adjacent", "tab:blue"), ("split", "tab:red")):
            s = sym[name][pairing]
            p = np.asarray(s["angle_hist"]) * s["angle_hist_bins"]
            span = 360 if signed else 90
            lo = -180 if signed else 0
            edges = np.linspace(lo, lo + span, s["angle_hist_bins"] + 1)
            ax.stairs(p, edges, color=colour, lw=1.6, label=pairings[pairing])
        ref = {"m": "gaussian", "sqrt_v": "gaussian_abs", "v": "gaussian_sq"}[name]
        if ref in sym:
            s = sym[ref]["split"]
            p = np.asarray(s["angle_hist"]) * s["angle_hist_bins"]
            edges = np.linspace(lo, lo + span, s["angle_hist_bins"] + 1)
            ax.stairs(
                p,
                edges,
                color="black",
                ls=":",
                lw=1.4,
                label=f"i.i.d. {ref} (reference)",
            )
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xlim(lo, lo + span)
        ax.set_xticks(np.linspace(lo, lo + span, 9 if signed else 7))
        ax.set_xlabel("pair angle θ (degrees)")
        ax.set_ylabel("density / uniform density")
        ax.set_title(f"{titles[name]}: angle histogram", fontsize=10)
        ax.legend(fontsize=7.5, loc="upper center")
        ax.set_ylim(0, ax.get_ylim()[1] * 1.3)
    fig.suptitle(
        "Real Adam moment pairs normalised by their group scale (group 64, scale = "
        "max pair radius): are they circularly symmetric?",
        fontsize=12,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measures everything and returns the JSON document."""
    started = time.perf_counter()
    n = args.n
    synth = {k: [_synthetic(k, n, args.seed)] for k in ("gaussian", "student_t3")}
    synth_cal = {
        k: [_synthetic(k, n, args.seed + 100)] for k in ("gaussian", "student_t3")
    }

    capture = _capture(args, args.capture_seed)
    cal_capture = _capture(args, args.cal_seed)
    names = sorted(capture["mu"])
    m_leaves = [capture["mu"][k] for k in names]
    v_leaves = [capture["nu"][k] for k in names]
    cal_m = list(cal_capture["mu"].values())
    cal_v = list(cal_capture["nu"].values())
    corrections = _bias_corrections(capture["meta"]["steps"])

    records: list[dict[str, Any]] = []
    # (a), (b): signed codecs on synthetic data, rings fitted on a fresh sample.
    for data in ("gaussian", "student_t3"):
        cal = _calibrate(True, synth_cal[data])
        note = f"rings fitted to a fresh {data} sample (seed {args.seed + 100})"
        records += _measure(data, synth[data], _codec_list(True, cal, note))
    # (c) real m.
    cal = _calibrate(True, cal_m)
    note = f"rings fitted to real m of the capture with seed {args.cal_seed}"
    records += _measure("real_m", m_leaves, _codec_list(True, cal, note))
    # Unsigned: synthetic v = g**2 (Adam's first step, m = g) and real v.
    g = synth["gaussian"]
    cal = _calibrate(False, [x * x for x in synth_cal["gaussian"]])
    note = f"rings fitted to g² of a fresh Gaussian sample (seed {args.seed + 100})"
    records += _measure(
        "gaussian_sq", [x * x for x in g], _codec_list(False, cal, note), m_leaves=g
    )
    cal_nu = _calibrate(False, cal_v)
    note = f"rings fitted to real v of the capture with seed {args.cal_seed}"
    records += _measure(
        "real_v",
        v_leaves,
        _codec_list(False, cal_nu, note),
        m_leaves=m_leaves,
        corrections=corrections,
    )

    sqrt_v = [np.sqrt(np.maximum(v, 0.0)) for v in v_leaves]
    symmetry = _symmetry(
        {
            "real_m": (m_leaves, True),
            "real_sqrt_v": (sqrt_v, False),
            "real_v": (v_leaves, False),
            "gaussian": (synth["gaussian"], True),
            "student_t3": (synth["student_t3"], True),
            "gaussian_abs": ([np.abs(x) for x in synth["gaussian"]], False),
            "gaussian_sq": ([x * x for x in synth["gaussian"]], False),
        }
    )
    symmetry["_note"] = (
        "Pairs of groups of 64 along each leaf's last axis, divided by the group's "
        "largest pair radius; all-zero pairs dropped. 'adjacent' = (x[2i], x[2i+1]) "
        "(the paper), 'split' = (x[j], x[j+32]) (optax_lowbit's polar codec). A "
        "circularly symmetric law gives angle_hist_tv_from_uniform 0, axis_frac 0.5 "
        "(angle within 22.5 deg of an axis), mean_cos4 0 (>0: mass on the axes), "
        "quadrant_mass 0.25 each, pearson_corr 0. zero_coord_frac = pairs with one "
        "coordinate exactly 0 (on an axis by construction); axis_frac_both_nonzero "
        "leaves them out. gaussian / student_t3 / gaussian_abs (|g|, reference for "
        "sqrt v) / gaussian_sq (g², reference for v) are i.i.d. references measured "
        "the same way (finite-group effects included)."
    )

    def capture_meta(c: dict[str, Any]) -> dict[str, Any]:
        meta = dict(c["meta"])
        meta["final_loss_mean_last10"] = float(np.mean(c["loss"][-10:]))
        return meta

    meta = {
        "device": str(jax.devices()[0]),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "command": " ".join(["python -m benchmarks.codec_error", *sys.argv[1:]]),
        "git_head": _git_head(),
        "quick": bool(args.quick),
        "synthetic": {
            "n_elements": int(synth["gaussian"][0].size),
            "shape": list(synth["gaussian"][0].shape),
            "seed": args.seed,
            "calibration_seed": args.seed + 100,
        },
        "capture": capture_meta(capture),
        "calibration_capture": capture_meta(cal_capture),
        "calibration": (
            "Out of sample: calibrated polar rings for real_m / real_v are fitted "
            f"with optax_lowbit.codecs.calibrate to the moments of a separate "
            f"capture (seed {args.cal_seed}); evaluation uses seed "
            f"{args.capture_seed}. Synthetic data: rings fitted to a fresh sample "
            f"of the same law (seed {args.seed + 100})."
        ),
        "leaves": {k: list(capture["mu"][k].shape) for k in names},
        "v_metrics": (
            f"u = m_hat / (sqrt(v_hat) + {EPS}), bias corrected with b1={B1}, "
            f"b2={B2} at step {capture['meta']['steps']} for real_v; for gaussian_sq "
            "m = g (Adam's first step). inv_sqrt_rel_error = |u(v_hat) - u(v)| / "
            "|u(v)|; underestimate_frac = mean(v_hat < v/2); overestimate_frac = "
            "mean(v_hat > 2v, v > 0); zero_decode_frac = mean(v > 0 and v_hat = 0); "
            "update_max_ratio = max|u(v_hat)| / max|u(v)|; mean_abs_log_sqrt_ratio "
            "over v > 0, v_hat > 0."
        ),
        "max_abs_error_rel_to_max": "max |x_hat - x| / max |x| over the data set",
        "stored_bits_per_element": "8 * (code + scale bytes) / numel for these "
        "leaves, padding of the last axis included; bits_per_element is the "
        "codec's figure for whole groups",
        "seconds": None,
    }
    doc = {"meta": meta, "records": records, "symmetry": symmetry}
    doc["_pairs"] = {"m": m_leaves, "sqrt_v": sqrt_v, "v": v_leaves}
    doc["_codebooks"] = {
        "m": [
            (
                "polar 2b paper rings",
                np.asarray(codecs.polar(2, True).codewords()),
                "o" + "red",
            ),
            (
                "polar 2b calibrated",
                np.asarray(cal_m_codec_2b(records)),
                "x" + "black",
            ),
            (
                "polar 1.5b paper ring",
                np.asarray(codecs.polar(1.5, True).codewords()),
                "+" + "darkorange",
            ),
        ],
        "v": [
            (
                "polar 2b unsigned, default rings",
                np.asarray(codecs.polar(2, False).codewords()),
                "o" + "red",
            ),
            (
                "polar 2b unsigned, calibrated",
                np.asarray(cal_nu[2].codewords()),
                "x" + "black",
            ),
        ],
    }
    meta["seconds"] = round(time.perf_counter() - started, 1)
    return doc


def _git_head() -> str | None:
    """The repository's HEAD commit (the codecs measured), or None."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=RESULTS.parent.parent,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def cal_m_codec_2b(records: list[dict[str, Any]]) -> np.ndarray:
    """Codewords of the calibrated 2-bit signed polar codec used on real m."""
    rec = next(
        r
        for r in records
        if r["data"] == "real_m"
        and r["family"] == "polar 2b"
        and r["variant"] == "calibrated"
    )
    return np.asarray(codecs.polar(2, True, rings=rec["rings"]).codewords())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line entry point; returns the JSON document written."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small, fast smoke run")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    parser.add_argument("--n", type=int, default=None, help="synthetic elements")
    parser.add_argument("--seed", type=int, default=0, help="synthetic data seed")
    parser.add_argument("--steps", type=int, default=None, help="capture steps")
    parser.add_argument("--model", default="tinygpt", choices=("tinygpt", "mlp"))
    parser.add_argument("--capture-seed", type=int, default=0)
    parser.add_argument("--cal-seed", type=int, default=1)
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    if args.n is None:
        args.n = 16 * 1024 if args.quick else 1024 * 1024
    if args.steps is None:
        args.steps = 10 if args.quick else 300
    if args.quick:  # smoke mode: compile time dominates, the numbers are the same
        jax.config.update("jax_disable_most_optimizations", True)
    if args.capture_seed == args.cal_seed:
        parser.error("--cal-seed must differ from --capture-seed (out-of-sample rings)")

    doc = run(args)
    pairs = doc.pop("_pairs")
    books = doc.pop("_codebooks")
    print(_table(doc["records"]))
    print()
    print("Symmetry of normalised pairs (circular: TV 0, axis 0.5, cos4θ 0, corr 0)")
    print(_symmetry_table({k: v for k, v in doc["symmetry"].items() if k != "_note"}))
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "codec_error.json"
    json_path.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    written = [json_path]
    if not args.no_plots:
        plot_errors(doc["records"], args.out / "codec_error.png")
        sym = {
            "m": doc["symmetry"]["real_m"],
            "sqrt_v": doc["symmetry"]["real_sqrt_v"],
            "v": doc["symmetry"]["real_v"],
            "gaussian": doc["symmetry"]["gaussian"],
            "gaussian_abs": doc["symmetry"]["gaussian_abs"],
            "gaussian_sq": doc["symmetry"]["gaussian_sq"],
        }
        plot_pairs(pairs, sym, books, args.out / "moment_pairs.png")
        written += [args.out / "codec_error.png", args.out / "moment_pairs.png"]
    print(f"\n{doc['meta']['seconds']} s; wrote " + ", ".join(map(str, written)))
    return doc


if __name__ == "__main__":
    main()
