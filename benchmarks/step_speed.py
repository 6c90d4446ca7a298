"""Optimizer step speed on the device: fp32/bf16 Optax AdamW vs low-bit Adam.

Run on a GPU (``python -m benchmarks.step_speed``). For every case and
optimizer it jits ``params, state = step(params, state, grads)`` with params
and state donated, times >= 30 steps after warm-up (median, each step
``block_until_ready``), and records ms, the ratio to ``optax.adamw`` fp32 of
the same run, state and temporary bytes per parameter
(``compiled.memory_analysis()``) and compile time. Rows: the Optax baselines;
for polar 2 and 1.5 bits (stochastic rounding, the default) the jnp chain,
the Pallas chain (``impl="pallas"``) and the fused update-and-apply step
(`optax_lowbit.adamw_polar(..., fused=True)`); the same three for 8-bit, 4-bit and
π-Quant (`adamw_8bit(..., fused=True)`, ...). It also checks every kernel variant
against the jnp reference on the device (code and scale mismatch
fractions, output error), measures the device copy ceiling and sweeps the
kernel's block size / warps on the big leaf. Writes
``benchmarks/results/step_speed.json`` (or ``$OUT/step_speed.json`` when
``OUT`` is set) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import optax

import optax_lowbit as lowbit
from optax_lowbit.kernels import adam as kadam

N_TIMED = 30
N_WARM = 3


def gpt2_small(stacked: bool = False, d: int = 768, n_layer: int = 12) -> dict:
    """Shapes of a GPT-2 parameter tree: small (124M) by default, medium with
    ``d=1024, n_layer=24`` (355M)."""
    f = 4 * d
    layer = {
        "ln1_g": (d,),
        "ln1_b": (d,),
        "qkv_w": (d, 3 * d),
        "qkv_b": (3 * d,),
        "proj_w": (d, d),
        "proj_b": (d,),
        "ln2_g": (d,),
        "ln2_b": (d,),
        "fc_w": (d, f),
        "fc_b": (f,),
        "out_w": (f, d),
        "out_b": (d,),
    }
    tree = {"wte": (50257, d), "wpe": (1024, d), "lnf_g": (d,), "lnf_b": (d,)}
    if stacked:
        tree["layers"] = {k: (n_layer, *s) for k, s in layer.items()}
    else:
        for i in range(n_layer):
            tree[f"h{i}"] = dict(layer)
    return tree


CASES = {
    "leaf_256M": {"w": (16384, 16384)},
    "gpt2_small_146": gpt2_small(False),
    "gpt2_small_stacked_14": gpt2_small(True),
    "gpt2_medium_292": gpt2_small(False, d=1024, n_layer=24),
    "gpt2_medium_stacked_16": gpt2_small(True, d=1024, n_layer=24),
    "tiny": {"w": (512, 1024), "b": (1024,), "x": (3, 200)},
}


def _split_tree(shapes: dict, big: bool) -> dict:
    """The leaves the default policy quantizes (``big``) or the others."""
    out = {}
    for k, v in shapes.items():
        if isinstance(v, dict):
            sub = _split_tree(v, big)
            if sub:
                out[k] = sub
        elif (len(v) >= 2 and v[-1] > 1 and v[0] * v[-1] >= 4096) == big:
            out[k] = v
    return out


# where the 148-leaf tree's time goes: its big (quantized) and small leaves alone
CASES["gpt2_small_146_big"] = _split_tree(CASES["gpt2_small_146"], True)
CASES["gpt2_small_146_small"] = _split_tree(CASES["gpt2_small_146"], False)


def stacked_policy(path, leaf) -> bool:
    """Default policy, with a stacked leaf's per-layer rank counted (rank >= 2)."""
    return leaf.size >= 4096 and len(leaf.shape) >= 2 and leaf.shape[-1] > 1


def optimizers(case: str) -> dict:
    """Name -> (kind, optimizer, impl) rows; kind "chain" (Optax) or "fused"."""
    lr = 1e-3
    policy = stacked_policy if "stacked" in case else None
    rows = {
        "optax.adamw": ("chain", optax.adamw(lr), "xla"),
        "optax.adamw(mu_dtype=bf16)": (
            "chain",
            optax.adamw(lr, mu_dtype=jnp.bfloat16),
            "xla",
        ),
    }
    for bits in (2, 1.5):
        name = f"adamw_polar(bits={bits})"
        rows[f"{name}/jnp"] = (
            "chain",
            lowbit.adamw_polar(lr, bits=bits, impl="jnp", policy=policy),
            "jnp",
        )
        rows[f"{name}/pallas"] = (
            "chain",
            lowbit.adamw_polar(lr, bits=bits, impl="pallas", policy=policy),
            "pallas-triton",
        )
        rows[f"fused_{name}/pallas"] = (
            "fused",
            lowbit.adamw_polar(lr, bits=bits, impl="pallas", policy=policy, fused=True),
            "pallas-triton",
        )
    for name, make in (
        ("adamw_8bit", lowbit.adamw_8bit),
        ("adamw_4bit", lowbit.adamw_4bit),
        ("adamw_piquant", lowbit.adamw_piquant),
    ):
        rows[f"{name}/jnp"] = ("chain", make(lr, policy=policy, impl="jnp"), "jnp")
        tx = make(lr, policy=policy, impl="pallas")
        rows[f"{name}/pallas"] = ("chain", tx, "pallas-triton")
        fused = make(lr, policy=policy, impl="pallas", fused=True)
        rows[f"fused_{name}/pallas"] = ("fused", fused, "pallas-triton")
    return rows


def train_step(kind: str, opt):
    """``step(params, state, grads) -> (params, state)`` of a chain or fused row."""
    if kind == "fused":
        return lambda p, s, g: opt.step(g, s, p)

    def step(p, s, g):
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    return step


def make_tree(shapes: dict, key) -> dict:
    leaves, tdef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(leaves))
    return tdef.unflatten(
        [
            0.02 * jax.random.normal(k, s, jnp.float32)
            for k, s in zip(keys, leaves, strict=True)
        ]
    )


def tree_bytes(tree) -> int:
    return sum(int(x.nbytes) for x in jax.tree.leaves(tree) if hasattr(x, "nbytes"))


def time_fn(fn, *args, n=N_TIMED, donate=True):
    """Median ms of ``args = fn(*args)`` steps (outputs fed back when donated)."""
    for _ in range(N_WARM):
        out = fn(*args)
        jax.block_until_ready(out)
        if donate:
            args = (*out, *args[len(out) :])
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) * 1e3)
        if donate:
            args = (*out, *args[len(out) :])
    return statistics.median(times), min(times), args


def bench_case(case: str, shapes: dict, meta: dict, log, only=()) -> list[dict]:
    params = make_tree(shapes, jax.random.key(0))
    grads = make_tree(shapes, jax.random.key(1))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    n_leaves = len(jax.tree.leaves(params))
    log(f"case {case}: {n_params / 1e6:.1f}M params, {n_leaves} leaves")
    rows = []
    for name, (kind, tx, impl) in optimizers(case).items():
        if only and not any(o in name for o in only):
            continue
        rec = {"case": case, "optimizer": name, "impl": impl, "n_params": n_params}
        rec["path"] = kind
        rec.update(meta)
        try:
            p = jax.tree.map(jnp.copy, params)
            state = jax.jit(tx.init)(p)

            jstep = jax.jit(train_step(kind, tx), donate_argnums=(0, 1))
            t0 = time.perf_counter()
            compiled = jstep.lower(p, state, grads).compile()
            rec["compile_s"] = time.perf_counter() - t0
            mem = compiled.memory_analysis()
            rec["temp_bytes_per_param"] = (
                mem.temp_size_in_bytes / n_params if mem is not None else None
            )
            rec["state_bytes_per_param"] = tree_bytes(state) / n_params
            ms, ms_min, (p, state, _) = time_fn(compiled, p, state, grads)
            rec["ms"], rec["ms_min"] = ms, ms_min
            jax.tree.map(lambda x: x.block_until_ready(), p)
            rec["finite"] = bool(
                all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(p))
            )
            del p, state, compiled
        except Exception as e:  # record, never fake
            rec["error"] = f"{type(e).__name__}: {str(e)[:400]}"
            log(traceback.format_exc(limit=3))
        rows.append(rec)
        log(json.dumps(rec))
    base = next(
        (r["ms"] for r in rows if r["optimizer"] == "optax.adamw" and "ms" in r), None
    )
    for r in rows:
        if base and "ms" in r:
            r["ratio_vs_optax_adamw"] = r["ms"] / base
    return rows


def _codecs(bits, rounding):
    if rounding == "preset":  # the (mu, nu) codecs of a preset, by name
        from benchmarks import state_drift

        return state_drift.codec_pairs()[bits]
    if rounding.startswith("piquant"):
        encoder = "paper" if rounding.endswith("paper") else "nearest"
        return lowbit.codecs.piquant(encoder), lowbit.codecs.piquant(encoder, False)
    if rounding == "blockwise":
        make = lowbit.codecs.blockwise8 if bits == 8 else lowbit.codecs.blockwise4
        return make(True), make(False)
    return (
        lowbit.codecs.polar(bits=bits, signed=True, rounding=rounding),
        lowbit.codecs.polar(bits=bits, signed=False, rounding=rounding),
    )


KERNEL_VARIANTS = {
    "polar2-sr": (2, "stochastic"),
    "polar1.5-sr": (1.5, "stochastic"),
    "polar2-nearest": (2, "nearest"),
    "blockwise8": (8, "blockwise"),
    "blockwise4": (4, "blockwise"),
    "piquant": (None, "piquant"),
    "piquant-paper": (None, "piquant-paper"),
    # what the presets store since issue 16 (stochastic 4/8-bit second moments)
    "preset-polar2": ("polar2", "preset"),
    "preset-polar1.5": ("polar1.5", "preset"),
    "preset-4bit": ("4bit", "preset"),
    "preset-8bit": ("8bit", "preset"),
}


def kernel_checks(meta: dict, log, configs=None, variants=None, checks=None):
    """On-device kernel vs jnp reference (every variant, with and without the
    fused apply), the copy ceiling, and a block / warps sweep on the 256M leaf."""
    out = {}
    key = jax.random.key(7)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    shape = (4096, 4096 + 64 * 3)
    c = jnp.asarray(3, jnp.int32)
    hp = kadam.make_hp(0.9, 0.999, 1e-8, 0.0, 1 - 0.9**c, 1 - 0.999**c, None, 1e-3, 0.1)
    seeds = (jnp.uint32(11), jnp.uint32(12))
    g = jax.random.normal(k3, shape)
    params = jax.random.normal(k4, shape)
    for vname in checks or KERNEL_VARIANTS:
        mc, nc = _codecs(*KERNEL_VARIANTS[vname])
        m = mc.encode(0.1 * jax.random.normal(k1, shape))
        v = nc.encode(0.01 * jnp.square(jax.random.normal(k2, shape)) + 1e-6)
        for apply in (False, True):
            name = f"check_{vname}" + ("_apply" if apply else "")
            try:
                kw = dict(mu_codec=mc, nu_codec=nc, seeds=seeds)
                pa = params if apply else None
                ref = jax.jit(
                    lambda g, m, v, hp, p, kw=kw: kadam.adam_update_reference(
                        g, m, v, hp, params=p, **kw
                    )
                )(g, m, v, hp, pa)
                res = jax.jit(
                    lambda g, m, v, hp, p, kw=kw: kadam.adam_update(
                        g, m, v, hp, params=p, **kw
                    )
                )(g, m, v, hp, pa)
                jax.block_until_ready(res)
                du = jnp.linalg.norm(res[0] - ref[0]) / jnp.linalg.norm(ref[0])
                out[name] = {
                    "out_rel_err": float(du),
                    "mu_code_mismatch": float(jnp.mean(res[1].codes != ref[1].codes)),
                    "nu_code_mismatch": float(jnp.mean(res[2].codes != ref[2].codes)),
                    "mu_scale_mismatch": float(
                        jnp.mean(res[1].scales != ref[1].scales)
                    ),
                    "nu_scale_mismatch": float(
                        jnp.mean(res[2].scales != ref[2].scales)
                    ),
                }
            except Exception as e:
                out[name] = {"error": f"{type(e).__name__}: {str(e)[:600]}"}
            log(f"{name}: {out[name]}")
    # copy ceiling: read + write of 1 GiB
    x = jax.random.normal(k1, (1 << 28,), jnp.float32)
    f = jax.jit(lambda x: x * 1.0001, donate_argnums=0)
    ms, _, _ = time_fn(lambda x: (f(x),), x)
    out["copy_ceiling_TBps"] = 2 * 4 * (1 << 28) / (ms * 1e-3) / 1e12
    log(f"copy ceiling {out['copy_ceiling_TBps']:.2f} TB/s")
    del x
    # kernel alone on the 256M leaf: block / warps sweep (state donated)
    shape = (16384, 16384)
    g = jax.random.normal(k3, shape)
    sweep = []
    configs = configs or ((32, 4), (16, 4), (8, 4), (16, 2), (8, 2), (16, 8))
    for vname in variants or ("polar2-sr", "polar1.5-sr", "blockwise8", "blockwise4"):
        mc, nc = _codecs(*KERNEL_VARIANTS[vname])
        m = mc.encode(0.1 * g)
        v = nc.encode(0.01 * g * g)
        state_b = (mc.bits_per_element + nc.bits_per_element) / 8  # B/elem
        for bg, nw in configs:
            rec = {"variant": vname, "block_groups": bg, "num_warps": nw}
            try:
                fn = jax.jit(
                    lambda m, v, g, hp, bg=bg, nw=nw, mc=mc, nc=nc: kadam.adam_update(
                        g,
                        m,
                        v,
                        hp,
                        mu_codec=mc,
                        nu_codec=nc,
                        seeds=seeds,
                        block_groups=bg,
                        num_warps=nw,
                    )[1:],
                    donate_argnums=(0, 1),
                )
                ms, ms_min, (m, v, *_) = time_fn(fn, m, v, g, hp)
                moved = g.size * (4 + 4 + 2 * state_b)  # g in, u out, state r+w
                rec.update(ms=ms, ms_min=ms_min, TBps=moved / (ms * 1e-3) / 1e12)
            except Exception as e:
                rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            sweep.append(rec)
            log(f"sweep {rec}")
    out["kernel_sweep_256M"] = sweep
    ok = [r for r in sweep if "ms" in r and r["variant"] == "polar2-sr"]
    if ok:  # the transform rows below use the fastest configuration
        best = min(ok, key=lambda r: r["ms"])
        kadam.DEFAULT_BLOCK_GROUPS = best["block_groups"]
        kadam.DEFAULT_NUM_WARPS = best["num_warps"]
    out["kernel_config_used"] = {
        "block_groups": kadam.DEFAULT_BLOCK_GROUPS,
        "num_warps": kadam.DEFAULT_NUM_WARPS,
    }
    log(f"kernel config used: {out['kernel_config_used']}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="leaf_256M,gpt2_small_146,gpt2_small_stacked_14")
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-kernel-checks", action="store_true")
    ap.add_argument("--quick-kernel", action="store_true")
    ap.add_argument("--variants", default="", help="kernel variants to check/sweep")
    ap.add_argument("--only", default="", help="comma list of row-name substrings")
    ap.add_argument("--block-groups", type=int, default=None)
    ap.add_argument("--num-warps", type=int, default=None)
    ap.add_argument("--leaves-per-launch", type=int, default=None)
    args = ap.parse_args()
    only = tuple(filter(None, args.only.split(",")))
    if args.block_groups:
        kadam.DEFAULT_BLOCK_GROUPS = args.block_groups
    if args.num_warps:
        kadam.DEFAULT_NUM_WARPS = args.num_warps
    if args.leaves_per_launch:
        kadam.LEAVES_PER_LAUNCH = args.leaves_per_launch
    meta_extra = {"leaves_per_launch": kadam.LEAVES_PER_LAUNCH}
    outdir = os.environ.get("OUT")
    path = args.out or (
        os.path.join(outdir, "step_speed.json")
        if outdir
        else os.path.join(os.path.dirname(__file__), "results", "step_speed.json")
    )
    meta = {
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
        "date": datetime.date.today().isoformat(),
    }

    def log(msg):
        print(msg, flush=True)

    meta.update(meta_extra)
    log(json.dumps(meta))
    result = {"meta": meta, "records": []}
    try:
        if not args.skip_kernel_checks:
            variants = tuple(filter(None, args.variants.split(",")))
            if args.quick_kernel:
                result["kernel"] = kernel_checks(
                    meta,
                    log,
                    ((16, 4), (8, 4)),
                    variants or ("polar2-sr", "blockwise8", "blockwise4"),
                    variants or None,
                )
            else:
                result["kernel"] = kernel_checks(meta, log)
    except Exception:
        log(traceback.format_exc())
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1)
    for case in filter(None, args.cases.split(",")):
        result["records"] += bench_case(case, CASES[case], meta, log, only)
        with open(path, "w") as fh:
            json.dump(result, fh, indent=1)
    print(f"\n{meta}")
    print(
        f"{'case':24s} {'optimizer':36s} {'ms':>8s} {'ratio':>6s} {'B/p st':>7s} "
        f"{'B/p tmp':>7s} {'comp_s':>6s}"
    )
    for r in result["records"]:
        if "ms" not in r:
            print(
                f"{r['case']:24s} {r['optimizer']:36s} ERROR {r.get('error', '')[:60]}"
            )
            continue
        print(
            f"{r['case']:24s} {r['optimizer']:36s} {r['ms']:8.3f} "
            f"{r.get('ratio_vs_optax_adamw', float('nan')):6.2f} "
            f"{r['state_bytes_per_param']:7.3f} {r['temp_bytes_per_param']:7.3f} "
            f"{r['compile_s']:6.1f}"
        )
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
