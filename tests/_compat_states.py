"""States written by one tree and restored by another must decode bit-exactly.

``python -m tests._compat_states`` writes ``tests/data/compat_states.npz``:
for each optimizer below, the state after three updates and the update and
state of a fourth step. `tests/test_checkpoint_compat.py` restores the saved
state into today's ``tx.init`` structure (what Orbax does with a target) and
checks that today's code reads it and takes the same fourth step.

``python -m tests._compat_states --steps-only`` keeps the saved states (a
checkpoint written by the code of their day) and writes only the fourth
step again: for a change of the random stream, which keeps the format but
draws other rounding bits (``NOTES_kernels.md`` v23).
"""

from __future__ import annotations

import numpy as np


def optimizers():
    """``name -> tx``, every public optimizer family at its defaults."""
    import optax_lowbit as lowbit

    return {
        "adamw_polar2": lowbit.adamw_polar(1e-2, impl="jnp"),
        "adamw_polar15": lowbit.adamw_polar(1e-2, bits=1.5, impl="jnp"),
        "adamw_piquant": lowbit.adamw_piquant(1e-2, impl="jnp"),
        "adamw_8bit": lowbit.adamw_8bit(1e-2, impl="jnp"),
        "adamw_4bit": lowbit.adamw_4bit(1e-2, impl="jnp"),
        "lion_polar": lowbit.lion_polar(1e-3),
        "sgd_polar": lowbit.sgd_polar(1e-2),
        "adafactor_polar": lowbit.adafactor_polar(1e-2, momentum=0.9),
    }


def inputs():
    """Fixed params and four gradients (fresh-looking, seeded)."""
    rng = np.random.default_rng(20261203)
    params = {
        "w": rng.standard_normal((64, 256)).astype(np.float32),
        "b": rng.standard_normal(256).astype(np.float32),
    }
    grads = [
        {
            k: (rng.standard_normal(v.shape) * 0.1).astype(np.float32)
            for k, v in params.items()
        }
        for _ in range(4)
    ]
    return params, grads


def run(tx, params, grads, state=None):
    """Three updates from ``init`` (unless ``state``), then the fourth step."""
    import jax

    update = jax.jit(tx.update)
    if state is None:
        state = tx.init(params)
        for g in grads[:3]:
            _, state = update(g, state, params)
    u, new_state = update(grads[3], state, params)
    return state, u, new_state


def flat(tree):
    """The leaves' raw bytes (bfloat16 and all), as uint8 arrays of their shape."""
    import jax

    out = []
    for x in jax.tree.leaves(tree):
        x = np.atleast_1d(np.asarray(x))
        out.append(x.view(np.uint8).reshape(*x.shape, x.dtype.itemsize))
    return out


def restore(tx, params, data, name):
    """The saved state of ``name`` in ``data``, in today's ``tx.init`` structure."""
    import jax

    shapes = jax.eval_shape(tx.init, params)
    leaves, target = jax.tree.flatten(shapes)
    saved = [
        data[f"{name}/state/{i}"].reshape(-1).view(t.dtype).reshape(t.shape)
        for i, t in enumerate(leaves)
    ]
    return jax.tree.unflatten(target, [jax.numpy.asarray(x) for x in saved])


def write(path="tests/data/compat_states.npz", steps_only=False):
    params, grads = inputs()
    out = {}
    saved = np.load(path) if steps_only else None
    for name, tx in optimizers().items():
        start = None if saved is None else restore(tx, params, saved, name)
        state, u, new_state = run(tx, params, grads, state=start)
        for part, tree in (("state", state), ("update", u), ("next", new_state)):
            for i, x in enumerate(flat(tree)):
                out[f"{name}/{part}/{i}"] = x
    np.savez_compressed(path, **out)


if __name__ == "__main__":
    import sys

    write(steps_only="--steps-only" in sys.argv[1:])
