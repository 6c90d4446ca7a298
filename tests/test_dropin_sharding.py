"""Every codec's state keeps its exact type through ``update`` (issue 19, item 3).

Under explicit mesh axes (``jax.set_mesh`` with ``AxisType.Explicit``) an
array's sharding is part of its type: a state leaf whose type changes in
``update`` makes a jitted step compile twice and ``lax.scan`` over steps fail
("carry input and carry output must have equal types"). For every codec, on
8 fake CPU devices in a subprocess (the device count is fixed when jax starts),
this runs a transform storing its moments in that codec on leaves sharded on
leading axes, and checks shape, dtype and sharding of every state leaf after
``init`` and after two jitted updates, and that a ``lax.scan`` over steps
compiles.
"""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

CODECS = {
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


def _check(names):
    """Run in the subprocess: asserts per codec, prints one line each."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    import optax_lowbit as lowbit
    from optax_lowbit import codecs

    assert jax.device_count() == 8, jax.device_count()
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
    specs = {
        "a": ((2, 8, 4), P(None, "x")),  # the leaf
        "b": ((16, 130), P("x")),  # a padded last group
    }
    everything = lowbit.policy.from_predicate(lambda path, x: True)
    with jax.set_mesh(mesh):
        key = jax.random.key(0)
        params = {
            k: jax.device_put(jax.random.normal(key, shape), spec)
            for k, (shape, spec) in specs.items()
        }
        grads = jax.tree.map(lambda p: jnp.sin(7.0 * p) + 0.01, params)
    for name in names:
        codec = eval(CODECS[name])
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
                packed = jax.tree.leaves(
                    state, is_leaf=lambda x: isinstance(x, codecs.Packed)
                )
                for leaf in packed:
                    if not isinstance(leaf, codecs.Packed):
                        continue
                    for arr in (leaf.codes, leaf.scales):
                        assert jax.typeof(arr).sharding.spec[0] in ("x", None)

                def body(s, _, tx=tx):
                    return tx.update(grads, s)[1], None

                scan = jax.jit(lambda s, body=body: jax.lax.scan(body, s, None, 3))
                scanned, _ = scan(state)
                assert jax.tree.structure(scanned) == jax.tree.structure(state)
            print(f"{name} {tx_name}: type kept", flush=True)
    print("ALL OK", flush=True)


def test_every_codec_keeps_its_state_type_under_an_explicit_mesh():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, __file__, *CODECS],
        capture_output=True,
        text=True,
        timeout=540,
        cwd=ROOT,
        env=env,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "ALL OK" in proc.stdout, out[-4000:]
    for name in CODECS:
        assert f"{name} adam: type kept" in proc.stdout, name


if __name__ == "__main__":
    _check(sys.argv[1:] or list(CODECS))
