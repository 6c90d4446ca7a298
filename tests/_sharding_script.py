"""Run by tests/test_sharding.py in its own process, with 8 fake CPU devices.

Exits non-zero (an AssertionError) on the first failed check; prints
``ALL OK`` at the end. Run by hand::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python -m tests._sharding_script auto|explicit [alias ...]

(from the repository's root: a module of the ``tests`` package, which pytest's
doctest collection also imports)
"""

import contextlib
import os
import re
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_lowbit as lowbit
from optax_lowbit.codecs import base
from tests import _xla_cpu

if os.environ.get(_xla_cpu.SUBPROCESS_ENV) == "1":
    # set by tests/test_sharding.py for the checks that compare with a
    # tolerance or compare no programs: XLA:CPU's elemental emitters, about
    # half the compile time
    _xla_cpu.add_options_when(lambda: _xla_cpu.UNOPTIMIZED)

ALIASES = {
    "adamw_polar-2": lambda: lowbit.adamw_polar(1e-3, bits=2),
    "adamw_polar-1.5": lambda: lowbit.adamw_polar(1e-3, bits=1.5),
    "adam_polar": lambda: lowbit.adam_polar(1e-3),
    "adamw_piquant": lambda: lowbit.adamw_piquant(1e-3),
    "adamw_8bit": lambda: lowbit.adamw_8bit(1e-3),
    "adamw_4bit": lambda: lowbit.adamw_4bit(1e-3),
    "adafactor_polar": lambda: lowbit.adafactor_polar(1e-2, momentum=0.9),
    "lion_polar": lambda: lowbit.lion_polar(1e-3),
    "sgd_polar": lambda: lowbit.sgd_polar(1e-2, momentum=0.9),
    # the Pallas kernels (interpret mode on CPU) inside shard_map, per shard
    "adamw_polar-2-pallas": lambda: lowbit.adamw_polar(1e-3, bits=2, impl="pallas"),
    "adamw_polar-1.5-pallas": lambda: lowbit.adamw_polar(1e-3, bits=1.5, impl="pallas"),
}


def check_kernel_equals_jnp(name, mesh, params, grads):
    """The sharded kernel's state is the jnp path's (the shard offsets reach
    the stochastic-rounding positions), and the fused step's too."""
    bits = 1.5 if "1.5" in name else 2
    chains = {
        impl: lowbit.adamw_polar(1e-3, bits=bits, impl=impl)
        for impl in ("pallas", "jnp")
    }
    fused = lowbit.fused_adamw_polar(1e-3, bits=bits, impl="pallas")
    with jax.set_mesh(mesh):
        out = {}
        for impl, tx in chains.items():
            state = jax.jit(tx.init)(params)
            p = params
            for _ in range(2):
                u, state = jax.jit(tx.update)(grads, state, p)
                p = optax.apply_updates(p, u)
            out[impl] = (p, state)
        state = jax.jit(fused.init)(params)
        p = params
        for _ in range(2):
            p, state = jax.jit(fused.step)(grads, state, p)
        out["fused"] = (p, state)
    for impl in ("pallas", "fused"):
        for a, b in zip(
            jax.tree.leaves(out[impl][1]), jax.tree.leaves(out["jnp"][1]), strict=True
        ):
            # identical but for float ties of XLA's fusion on the jnp side
            # (measured: 1 bf16 scale in 2048 one ulp apart at 1.5 bits)
            a, b = np.asarray(a), np.asarray(b)
            assert a.shape == b.shape and a.dtype == b.dtype, (name, impl)
            assert np.mean(a != b) <= 2e-3, (name, impl, np.mean(a != b))
        for a, b in zip(
            jax.tree.leaves(out[impl][0]), jax.tree.leaves(out["jnp"][0]), strict=True
        ):
            np.testing.assert_allclose(
                np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6
            )
    print(f"{name}: sharded kernel and fused step = jnp path", flush=True)


# global shapes and leading-axis specs over a ("data", "model") mesh
SHAPES = {
    "w3": ((8, 64, 256), P("data", "model")),  # rank 3, two leading axes sharded
    "w2": ((256, 512), P("model")),  # rank 2, leading axis sharded
    "wsq": ((128, 64), P(("data", "model"))),  # 8-way: 1024 elements per device
    "b": ((512,), P()),  # vector, replicated, never quantized
}


def is_packed(x):
    return isinstance(x, base.Packed)


def make_params(mesh):
    keys = jax.random.split(jax.random.key(0), len(SHAPES))
    out = {}
    for k, (name, (shape, spec)) in zip(keys, SHAPES.items(), strict=True):
        spec = P(*[a if _fits(a, mesh) else None for a in spec])
        out[name] = jax.device_put(
            jax.random.normal(k, shape) * 0.1, NamedSharding(mesh, spec)
        )
    return out


def _fits(axis, mesh):
    names = axis if isinstance(axis, tuple) else (axis,)
    return all(n in mesh.axis_names for n in names)


def lead_spec(param, ndim):
    spec = tuple(param.sharding.spec) + (None,) * (
        param.ndim - len(param.sharding.spec)
    )
    lead = spec[: param.ndim - 1]
    return P(*(lead + (None,) * (ndim - len(lead))))


def same_spec(a, b):
    pad = lambda s, n: tuple(s) + (None,) * (n - len(s))  # noqa: E731
    n = max(len(a), len(b))
    return pad(a, n) == pad(b, n)


def check_state_sharded_like_params(name, state, params):
    """Every Packed state of a param: codes and scales sharded on its leading axes."""
    n = 0
    for sub in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, dict)):
        if not isinstance(sub, dict) or set(sub) != set(params):
            continue
        for key, leaf in sub.items():
            if not is_packed(leaf):
                continue
            p = params[key]
            for arr in (leaf.codes, leaf.scales):
                want = lead_spec(p, arr.ndim)
                got = arr.sharding.spec
                assert same_spec(got, want), (name, key, got, want)
                n += 1
    assert n >= 4, (name, "too few packed states checked", n)
    return n


def state_tensor_shapes(state):
    shapes = set()
    for leaf in jax.tree.leaves(state, is_leaf=is_packed):
        if is_packed(leaf):
            shapes.add(tuple(leaf.codes.shape))
            shapes.add(tuple(leaf.scales.shape))
    return shapes


def make_mesh(mode):
    axis = getattr(jax.sharding.AxisType, mode.capitalize())
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis, axis))


def check_alias(mode, name, mesh, params, grads):
    """One alias under one mesh mode: state sharded like the params, no
    all-gather in the compiled step, typeof/sharding kept by an update."""
    explicit = mode == "explicit"
    ctx = (lambda: jax.set_mesh(mesh)) if explicit else contextlib.nullcontext
    tx = ALIASES[name]()
    # eager init of concrete sharded params: device_put on leading axes
    state = tx.init(params)
    n = check_state_sharded_like_params(name, state, params)
    if explicit:
        # jitted init (as Optax's sharding test), inside the mesh: the
        # explicit axes are part of the params' types
        with ctx():
            state = jax.jit(tx.init)(params)
        n = check_state_sharded_like_params(name, state, params)

    def step(p, s, g, tx=tx):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    jitted = jax.jit(step)
    with ctx():
        hlo = jitted.lower(params, state, grads).compile().as_text()
    gathers = [ln for ln in hlo.splitlines() if re.search(r"\ball-gather", ln)]
    # no state tensor is all-gathered (a gather's result would have the
    # state's global shape); report any all-gather at all.
    shapes = state_tensor_shapes(state)
    bad = [
        ln for ln in gathers if any(f"[{','.join(map(str, s))}]" in ln for s in shapes)
    ]
    assert not bad, (name, bad[:3])
    assert not gathers, (name, "all-gather in the step", gathers[:3])
    with ctx():
        new_params, new_state = jitted(params, state, grads)
    before = jax.tree.leaves(state)
    after = jax.tree.leaves(new_state)
    assert jax.tree.structure(state) == jax.tree.structure(new_state), name
    for a, b in zip(before, after, strict=True):
        if a.ndim == 0 and not explicit:
            # the eagerly made count is uncommitted on one device; the
            # step returns it replicated over the mesh
            continue
        ta, tb = jax.typeof(a), jax.typeof(b)
        assert ta == tb, (
            name,
            ta,
            tb,
            ta.weak_type,
            tb.weak_type,
            ta.sharding,
            tb.sharding,
        )
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (
            name,
            a.shape,
            a.sharding,
            b.sharding,
        )
    check_state_sharded_like_params(name, new_state, params)
    for k in params:
        assert new_params[k].sharding.is_equivalent_to(
            params[k].sharding, params[k].ndim
        ), (name, k)
    if explicit and name.endswith("-pallas"):
        check_kernel_equals_jnp(name, mesh, params, grads)
    print(
        f"{mode} {name}: {n} packed arrays sharded on leading axes; "
        "no all-gather; typeof/sharding kept",
        flush=True,
    )


def check_policy():
    """The policy decides from global shapes: the same leaves are quantized on
    1, 2 and 8 devices (wsq has 1024 elements per device on 8)."""
    decisions = []
    for shape in ((1, 1), (1, 2), (2, 4)):
        m = jax.make_mesh(
            shape, ("data", "model"), devices=jax.devices()[: np.prod(shape)]
        )
        p = make_params(m)
        for name in ("adamw_polar-2", "adafactor_polar", "sgd_polar"):
            st = jax.eval_shape(ALIASES[name]().init, p)
            flags = jax.tree.map(is_packed, st, is_leaf=is_packed)
            decisions.append((name, shape, jax.tree.structure(st), flags))
            real = ALIASES[name]().init(p)
            assert jax.tree.map(is_packed, real, is_leaf=is_packed) == flags
    for name in ("adamw_polar-2", "adafactor_polar", "sgd_polar"):
        mine = [d for d in decisions if d[0] == name]
        assert all(d[2] == mine[0][2] and d[3] == mine[0][3] for d in mine), name
        assert "wsq" in str(mine[0][3]) and jax.tree.leaves(mine[0][3]).count(True) >= 2
    print("policy: same decisions on 1, 2 and 8 devices", flush=True)


def check_pallas_sharded_float_leaves():
    """impl="pallas" under explicit axes: float-state leaves sharded on their
    leading axis (a bias, an embedding the policy keeps in float32) are
    stepped in place, chain and fused: no all-gather in the compiled step
    (they were once concatenated into one flat buffer, which all-gathered
    their gradients, moments and parameters), values as the jnp path's."""
    mesh = make_mesh("explicit")
    leaves = {
        "w": ((64, 64), P("model")),  # quantized: the kernel
        "bias": ((512,), P(("data", "model"))),  # float32 state
        "embed": ((64, 32), P("data")),  # float32 state (policy: embedding)
    }
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = {
        name: jax.device_put(
            jax.random.normal(key, shape) * 0.1, NamedSharding(mesh, spec)
        )
        for key, (name, (shape, spec)) in zip(keys, leaves.items(), strict=True)
    }
    grads = jax.tree.map(lambda p: jnp.sin(p * 7.0) + 0.01, params)
    kinds = {
        "chain": lowbit.adamw_polar(1e-3, impl="pallas"),
        "fused": lowbit.adamw_polar(1e-3, impl="pallas", fused=True),
        "jnp": lowbit.adamw_polar(1e-3, impl="jnp"),
    }
    out = {}
    with jax.set_mesh(mesh):
        for kind, opt in kinds.items():
            state = jax.jit(opt.init)(params)
            assert is_packed(state[0].mu["w"])
            assert not is_packed(state[0].mu["bias"]), "bias must stay float"
            assert not is_packed(state[0].mu["embed"]), "embedding must stay float"
            if kind == "fused":
                step = opt.step
            else:

                def step(g, s, p, tx=opt):
                    u, s = tx.update(g, s, p)
                    return optax.apply_updates(p, u), s

            jitted = jax.jit(step)
            hlo = jitted.lower(grads, state, params).compile().as_text()
            gathers = [ln for ln in hlo.splitlines() if re.search(r"\ball-gather", ln)]
            assert not gathers, (kind, "all-gather in the step", gathers[:3])
            out[kind] = jitted(grads, state, params)
    for kind in ("chain", "fused"):
        for name in ("bias", "embed"):
            p, s = out[kind]
            ref_p, ref_s = out["jnp"]
            assert p[name].sharding.is_equivalent_to(params[name].sharding, 1)
            for a, b in ((p, ref_p), (s[0].mu, ref_s[0].mu), (s[0].nu, ref_s[0].nu)):
                np.testing.assert_allclose(
                    np.asarray(a[name]), np.asarray(b[name]), rtol=1e-5, atol=1e-9
                )
    print("pallas: sharded float leaves stepped in place, no all-gather", flush=True)


def check_sharded_training():
    """`benchmarks.sharded_training`'s quick mode for one low-bit optimizer
    (8-bit chain: the quickest to compile): a 1-block GPT trained 4 steps on
    one device and on an 8-device FSDP mesh; its checks (state bytes per
    device = total / 8, no all-gather / all-to-all of state in the compiled
    step, same state on the same gradients, same loss curve, Orbax restore on
    one device and on a 2x4 mesh bit-exactly) all pass."""
    from benchmarks import sharded_training

    cfg = sharded_training.parse_args(
        "--quick --data repo --optimizers adamw_8bit --layouts 1,1d --steps 4 "
        "--n-layers 1 --no-sgd-baseline".split()
    )
    result = sharded_training.run_benchmark(cfg)
    assert not sharded_training.failed_checks(result), result["records"]
    (rec,) = [r for r in result["records"] if r["layout"] == "1d"]
    checks = ("state_bytes", "no_state_collective", "same_state", "same_loss")
    assert set(rec["checks"]) == {*checks, "checkpoint"}, rec["checks"]
    assert set(rec["checkpoint"]) == {"1_device", "2d_other_mesh"}, rec["checkpoint"]
    assert rec["state_bytes_total"] > 8 * 20_000, rec["state_bytes_total"]
    print(
        "training: FSDP adamw_8bit on 8 devices: state total/8 per device, no state "
        "collective, same state and loss as 1 device, checkpoint restored on 1 "
        "device and a 2x4 mesh",
        flush=True,
    )


# --- every codec's state keeps its exact type through ``update`` (issue 19,
# item 3; was tests/test_dropin_sharding.py's own subprocess) -----------------
# Under explicit mesh axes an array's sharding is part of its type: a state
# leaf whose type changes in ``update`` makes a jitted step compile twice and
# ``lax.scan`` over steps fail ("carry input and carry output must have equal
# types").
TYPE_CODECS = {
    "identity": "codecs.identity()",
    "identity-bf16": "codecs.identity(jnp.bfloat16)",
    "polar-2-signed": "codecs.polar(2, True)",
    "polar-1.5-signed-sr": "codecs.polar(1.5, True, rounding='stochastic')",
    "polar-2-signed-sr": "codecs.polar(2, True, rounding='stochastic')",
    "polar-2-unsigned": "codecs.polar(2, False)",
    "polar-1.5-unsigned-sr": "codecs.polar(1.5, False, rounding='stochastic')",
    "piquant-signed": "codecs.piquant('nearest', True)",
    "piquant-paper": "codecs.piquant('paper', True)",
    "piquant-unsigned": "codecs.piquant(signed=False)",
    "blockwise8-signed": "codecs.blockwise8(True)",
    "blockwise8-unsigned-sr": "codecs.blockwise8(False, rounding='stochastic')",
    "blockwise4-signed": "codecs.blockwise4(True)",
    "blockwise4-unsigned": "codecs.blockwise4(False)",
    "blockwise4-log-sr": "codecs.blockwise4(False, qmap='log', rounding='stochastic')",
}
_TYPE_INPUTS = {}


def _type_inputs():
    """A 1-D explicit mesh of 8 and two leaves sharded on leading axes: the
    issue's ``(2, 8, 4)`` leaf on ``P(None, 'x')`` and a padded last group."""
    if not _TYPE_INPUTS:
        mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
        specs = {"a": ((2, 8, 4), P(None, "x")), "b": ((16, 130), P("x"))}
        with jax.set_mesh(mesh):
            key = jax.random.key(0)
            params = {
                k: jax.device_put(jax.random.normal(key, shape), spec)
                for k, (shape, spec) in specs.items()
            }
            grads = jax.tree.map(lambda p: jnp.sin(7.0 * p) + 0.01, params)
        _TYPE_INPUTS.update(mesh=mesh, params=params, grads=grads)
    return _TYPE_INPUTS["mesh"], _TYPE_INPUTS["params"], _TYPE_INPUTS["grads"]


def check_codec_keeps_state_type(name):
    """One codec: `scale_by_adam_quantized` storing its moments in it (and
    `trace_quantized` for a signed codec), every leaf quantized; shape, dtype
    and sharding of every state leaf equal after ``init`` and after two jitted
    updates; codes and scales sharded on the param's leading axis; a
    ``lax.scan`` over steps compiles."""
    from optax_lowbit import codecs  # noqa: F401 (TYPE_CODECS's strings use it)

    mesh, params, grads = _type_inputs()
    everything = lowbit.policy.from_predicate(lambda path, x: True)
    codec = eval(TYPE_CODECS[name])
    txs = {
        "adam": lowbit.scale_by_adam_quantized(
            codec if codec.signed else lowbit.codecs.identity(),
            codec,
            policy=everything,
            impl="jnp",
        )
    }
    if codec.signed:
        txs["trace"] = lowbit.trace_quantized(0.9, codec=codec, policy=everything)
    for tx_name, tx in txs.items():
        with jax.set_mesh(mesh):
            state = jax.jit(tx.init)(params)
            step = jax.jit(lambda g, s, tx=tx: tx.update(g, s)[1])
            new = step(grads, step(grads, state))
            before = jax.tree.leaves(state)
            after = jax.tree.leaves(new)
            assert len(before) == len(after), (name, tx_name)
            for a, b in zip(before, after, strict=True):
                assert jax.typeof(a) == jax.typeof(b), (
                    name,
                    tx_name,
                    str(jax.typeof(a)),
                    str(jax.typeof(b)),
                )
            # sharded like the parameter on its leading axes
            packed = jax.tree.leaves(state, is_leaf=is_packed)
            for leaf in packed:
                if not is_packed(leaf):
                    continue
                for arr in (leaf.codes, leaf.scales):
                    assert jax.typeof(arr).sharding.spec[0] in ("x", None)

            def body(s, _, tx=tx):
                return tx.update(grads, s)[1], None

            scan = jax.jit(lambda s, body=body: jax.lax.scan(body, s, None, 3))
            scanned, _ = scan(state)
            assert jax.tree.structure(scanned) == jax.tree.structure(state)
        print(f"{name} {tx_name}: type kept", flush=True)


def main(mode, names):
    """One mode: stops at the first failed check (an AssertionError)."""
    assert jax.device_count() == 8, jax.device_count()
    mesh = make_mesh(mode)
    params = make_params(mesh)
    grads = jax.tree.map(lambda p: jnp.sin(p * 7.0) + 0.01, params)
    for name in names:
        check_alias(mode, name, mesh, params, grads)
    if mode == "auto":
        check_policy()
    print("ALL OK")
    return 0


def run_checks(checks):
    """Runs every ``(mode, name)`` check in this one process (``name`` "policy":
    `check_policy`), each on its own: a failure is reported and the next check
    runs; ``name`` "training": `check_sharded_training`, "pallas-float-leaves":
    `check_pallas_sharded_float_leaves`; ``mode`` "types":
    `check_codec_keeps_state_type` for codec ``name``. Prints ``CHECK
    <mode>:<name> PASS``, or ``FAIL`` and the traceback between
    ``BEGIN``/``END`` lines; returns 1 if any check failed."""
    assert jax.device_count() == 8, jax.device_count()
    inputs = {}
    failed = 0
    for mode, name in checks:
        label = f"{mode}:{name}"
        print(f"CHECK {label} START", flush=True)
        try:
            if name == "policy":
                check_policy()
            elif name == "training":
                check_sharded_training()
            elif name == "pallas-float-leaves":
                check_pallas_sharded_float_leaves()
            elif mode == "types":
                check_codec_keeps_state_type(name)
            else:
                if mode not in inputs:
                    mesh = make_mesh(mode)
                    params = make_params(mesh)
                    grads = jax.tree.map(lambda p: jnp.sin(p * 7.0) + 0.01, params)
                    inputs[mode] = mesh, params, grads
                check_alias(mode, name, *inputs[mode])
        except Exception:  # reported; the next check runs
            failed += 1
            print(f"CHECK {label} FAIL BEGIN", flush=True)
            traceback.print_exc(file=sys.stdout)
            print(f"CHECK {label} FAIL END", flush=True)
        else:
            print(f"CHECK {label} PASS", flush=True)
    print("ALL OK" if not failed else f"{failed} FAILED", flush=True)
    return int(bool(failed))


if __name__ == "__main__":
    mode, *names = sys.argv[1:] or ["auto"]
    if mode == "checks":  # MODE:NAME ...: every check, each reported
        sys.exit(run_checks([tuple(c.split(":", 1)) for c in names]))
    sys.exit(main(mode, names or list(ALIASES)))
