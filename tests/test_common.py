"""The shared checklist, run over every alias (STYLE.md "Tests").

Each check is one test function parametrized over `ALIASES` (the wrapped-step
compositions over `LAYOUTS`, one alias per transform). The jitted train
step of an alias is built once (`_setup`) and shared by the checks that use it,
so this file stays within a few minutes on a CPU.

inject_hyperparams: ``optax.inject_hyperparams`` turns every int/float argument
of the factory into an array, *defaults included*. The structural arguments'
defaults are ``None`` (``bits``, Adafactor's ``min_dim_size_to_factor``), so every
alias wraps as it is (``test_inject_hyperparams_as_is``). A structural value
passed as a number must be listed in ``static_args`` (`STATIC_ARGS`: the values
each check passes); omitting it raises a TypeError at construction that names the
argument and says ``static_args=('<name>',)``
(``test_inject_hyperparams_without_static_args``).
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import optax_lowbit as lowbit
from optax_lowbit.codecs import base

ALIASES = {
    "adamw_polar-2": lambda lr=3e-3: lowbit.adamw_polar(lr, bits=2),
    "adamw_polar-1.5": lambda lr=3e-3: lowbit.adamw_polar(lr, bits=1.5),
    "adam_polar": lambda lr=3e-3: lowbit.adam_polar(lr),
    "adamw_piquant": lambda lr=3e-3: lowbit.adamw_piquant(lr),
    "adamw_8bit": lambda lr=3e-3: lowbit.adamw_8bit(lr),
    "adamw_4bit": lambda lr=3e-3: lowbit.adamw_4bit(lr),
    "adafactor_polar": lambda lr=3e-2: lowbit.adafactor_polar(lr, momentum=0.9),
    "lion_polar": lambda lr=1e-3: lowbit.lion_polar(lr),
    "sgd_polar": lambda lr=0.05: lowbit.sgd_polar(lr, momentum=0.9),
}
FACTORIES = {
    "adamw_polar-2": (lowbit.adamw_polar, {"bits": 2}),
    "adamw_polar-1.5": (lowbit.adamw_polar, {"bits": 1.5}),
    "adam_polar": (lowbit.adam_polar, {}),
    "adamw_piquant": (lowbit.adamw_piquant, {}),
    "adamw_8bit": (lowbit.adamw_8bit, {}),
    "adamw_4bit": (lowbit.adamw_4bit, {}),
    "adafactor_polar": (lowbit.adafactor_polar, {"momentum": 0.9}),
    "lion_polar": (lowbit.lion_polar, {}),
    "sgd_polar": (lowbit.sgd_polar, {"momentum": 0.9}),
}
# Structural values passed explicitly (they need ``static_args``).
STATIC_ARGS = {
    "adamw_polar-2": {"bits": 2},
    "adamw_polar-1.5": {"bits": 1.5},
    "adam_polar": {"bits": 1.5},
    "adafactor_polar": {"bits": 2, "min_dim_size_to_factor": 64},
    "lion_polar": {"bits": 1.5},
    "sgd_polar": {"bits": 2},
}
NAMES = list(ALIASES)
# One alias per transform and state layout (Adam with polar, with π-Quant; Adafactor;
# Lion; SGD): the composition checks that compile a wrapped step of their own
# (lax.cond, MultiSteps, apply_if_finite, a clip chain, nnx) run on these to keep CI
# in its budget; the other aliases share their transform with one of them and
# differ only by codec. What those wrappers need of a codec (a state whose every
# leaf keeps its exact type through a jitted update) is checked for every codec by
# tests/test_sharding.py (``types:<codec>``: jit, then a lax.scan carrying the
# state) and for every alias by test_trains_and_does_not_recompile (40 steps, one
# trace, state shapes and dtypes = init's).
LAYOUTS = [
    "adamw_polar-2",
    "adamw_piquant",
    "adafactor_polar",
    "lion_polar",
    "sgd_polar",
]


# The checks that run `_setup`'s jitted step: one xdist worker per alias
# (``--dist loadgroup``), so each alias's step is compiled once.
SHARED_STEP = [
    pytest.param(n, marks=pytest.mark.xdist_group(f"common_step_{n}")) for n in NAMES
]


def _is_packed(x):
    return isinstance(x, base.Packed)


def _packed(tree):
    return [x for x in jax.tree.leaves(tree, is_leaf=_is_packed) if _is_packed(x)]


# --- a small regression problem ------------------------------------------------

_X = jax.random.normal(jax.random.key(0), (256, 32))
_Y = jnp.tanh(_X @ jax.random.normal(jax.random.key(1), (32, 4)))


def _params():
    k = jax.random.split(jax.random.key(2), 3)
    return {
        "l1": {"w": jax.random.normal(k[0], (32, 128)) / 6, "b": jnp.zeros(128)},
        "l2": {"w": jax.random.normal(k[1], (128, 128)) / 11, "b": jnp.zeros(128)},
        "out": {"w": jax.random.normal(k[2], (128, 4)) / 11},
    }


def _loss(p):
    h = jnp.tanh(_X @ p["l1"]["w"] + p["l1"]["b"])
    h = jnp.tanh(h @ p["l2"]["w"] + p["l2"]["b"])
    return jnp.mean((h @ p["out"]["w"] - _Y) ** 2)


@functools.cache
def _setup(name):
    """(tx, jitted step, trace counter) for an alias, built once per session."""
    tx = ALIASES[name]()
    traces = []

    @jax.jit
    def step(p, s):
        traces.append(1)  # runs only while tracing
        value, g = jax.value_and_grad(_loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, value

    return tx, step, traces


def _run(name, params, state, steps):
    _, step, _ = _setup(name)
    values = []
    for _ in range(steps):
        params, state, value = step(params, state)
        values.append(float(value))
    return params, state, values


# --- the checklist -----------------------------------------------------------


@pytest.mark.parametrize("name", SHARED_STEP)
def test_trains_and_does_not_recompile(name):
    tx, _, traces = _setup(name)
    params = _params()
    state = tx.init(params)
    assert len(_packed(state)) >= 2, "the policy should quantize l1.w and l2.w"
    _, state, values = _run(name, params, state, 40)
    assert np.all(np.isfinite(values))
    assert values[-1] < 0.6 * values[0], values[::8]
    assert len(traces) == 1  # one trace for 40 steps: no recompile on step 2
    chex.assert_trees_all_equal_shapes_and_dtypes(state, tx.init(params))


@pytest.mark.parametrize("name", LAYOUTS)
def test_update_inside_lax_cond(name):
    tx = ALIASES[name]()
    params = _params()
    state = tx.init(params)
    grads = jax.grad(_loss)(params)

    @jax.jit
    def f(pred, state):
        return jax.lax.cond(
            pred, lambda s: tx.update(grads, s, params)[1], lambda s: s, state
        )

    new, same = f(True, state), f(False, state)
    assert jax.tree.structure(new) == jax.tree.structure(state)
    chex.assert_trees_all_equal_shapes_and_dtypes(new, state)
    chex.assert_trees_all_equal(same, state)
    assert not all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(state), strict=True)
    )


@pytest.mark.parametrize("name", NAMES)
def test_init_under_eval_shape(name):
    tx = ALIASES[name]()
    params = _params()
    abstract = jax.eval_shape(tx.init, params)
    real = tx.init(params)
    assert jax.tree.structure(abstract) == jax.tree.structure(real)
    chex.assert_trees_all_equal_shapes_and_dtypes(abstract, real)
    codecs = [x.codec for x in _packed(abstract)]
    assert codecs == [x.codec for x in _packed(real)] and codecs


@pytest.mark.parametrize("name", NAMES)
def test_inject_hyperparams_traced_learning_rate(name):
    factory, kw = FACTORIES[name]
    static = STATIC_ARGS.get(name, {})
    sched = optax.linear_schedule(1e-2, 1e-3, 10)
    tx = optax.inject_hyperparams(factory, static_args=tuple(static))(
        learning_rate=sched, **{**kw, **static}
    )
    params = _params()
    state = tx.init(params)
    step = jax.jit(tx.update)
    grads = jax.grad(_loss)(params)
    for _ in range(3):
        u, state = step(grads, state, params)
    chex.assert_tree_all_finite(u)
    np.testing.assert_allclose(state.hyperparams["learning_rate"], sched(2), rtol=1e-6)
    assert len(_packed(state.inner_state)) >= 2


@pytest.mark.parametrize("name", NAMES)
def test_inject_hyperparams_as_is(name):
    # No static_args: the structural defaults are None, which inject_hyperparams
    # leaves static; the state is the plain alias's, the updates its own up to
    # the hyperparameters' float32 rounding (arrays, not Python floats).
    factory, kw = FACTORIES[name]
    kw = {k: v for k, v in kw.items() if k not in STATIC_ARGS.get(name, {})}
    wrapped = optax.inject_hyperparams(factory)(learning_rate=1e-3, **kw)
    plain = factory(1e-3, **kw)
    params = _params()
    state, plain_state = wrapped.init(params), plain.init(params)
    assert not set(state.hyperparams) & {"bits", "min_dim_size_to_factor"}
    chex.assert_trees_all_equal_shapes_and_dtypes(state.inner_state, plain_state)
    assert [x.codec for x in _packed(state.inner_state)] == [
        x.codec for x in _packed(plain_state)
    ]
    grads = jax.grad(_loss)(params)
    for _ in range(2):
        u, state = jax.jit(wrapped.update)(grads, state, params)
        v, plain_state = jax.jit(plain.update)(grads, plain_state, params)
    for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(v), strict=True):
        scale = float(jnp.max(jnp.abs(b)))
        assert scale > 0
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * scale)


@pytest.mark.parametrize("name", list(STATIC_ARGS))
def test_inject_hyperparams_without_static_args(name):
    factory, kw = FACTORIES[name]
    static = STATIC_ARGS[name]
    params = _params()
    for arg in static:
        others = tuple(a for a in static if a != arg)
        tx = optax.inject_hyperparams(factory, static_args=others)(
            1e-3, **{**kw, **static}
        )
        with pytest.raises(TypeError, match=rf"static_args=\('{arg}',\)"):
            tx.init(params)


@pytest.mark.parametrize("name", LAYOUTS)
def test_multisteps(name):
    tx = optax.MultiSteps(ALIASES[name](), every_k_schedule=2)
    params = _params()
    state = tx.init(params)
    step = jax.jit(tx.update)
    for i in range(4):
        grads = jax.grad(_loss)(params)
        u, new = step(grads, state, params)
        chex.assert_trees_all_equal_shapes_and_dtypes(new, state)
        state = new
        params = optax.apply_updates(params, u)
        is_zero = all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(u))
        assert is_zero == (i % 2 == 0)
    assert int(state.gradient_step) == 2


@pytest.mark.parametrize("name", LAYOUTS)
def test_apply_if_finite_keeps_state_bitwise(name):
    tx = optax.apply_if_finite(ALIASES[name](), max_consecutive_errors=3)
    params = _params()
    step = jax.jit(tx.update)
    grads = jax.grad(_loss)(params)
    _, state = step(grads, tx.init(params), params)
    bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads)
    u, new = step(bad, state, params)
    chex.assert_trees_all_equal(new.inner_state, state.inner_state)
    assert not bool(new.last_finite) and int(new.notfinite_count) == 1
    assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(u))


@pytest.mark.parametrize("name", LAYOUTS)
# two programs held to the same bits: XLA:CPU's elemental emitters round
# Adafactor's step 1 ulp apart in one of them (tests/conftest.py)
@pytest.mark.fusion_emitters
def test_chain_with_clip_by_global_norm(name):
    params = _params()
    grads = jax.grad(_loss)(params)
    plain = ALIASES[name]()

    # The loose (1e9) and tight (1e-4) clips: one compiled chain, the clip's
    # ``max_norm`` an argument (the same ops as a constant; one compile less).
    def chain(max_norm):
        return optax.chain(optax.clip_by_global_norm(max_norm), ALIASES[name]())

    @jax.jit
    def clipped(max_norm, grads, state, params):
        return chain(max_norm).update(grads, state, params)

    u0, s0 = jax.jit(plain.update)(grads, plain.init(params), params)
    u1, s1 = clipped(jnp.float32(1e9), grads, chain(1e9).init(params), params)
    u2, s2 = clipped(jnp.float32(1e-4), grads, chain(1e-4).init(params), params)
    chex.assert_trees_all_equal(u1, u0)  # a clip that does not trigger is a no-op
    chex.assert_trees_all_equal(s1[1], s0)
    chex.assert_tree_all_finite(u2)
    chex.assert_trees_all_equal_shapes_and_dtypes(s2[1], s0)


class _Mlp(nnx.Module):
    def __init__(self, rngs):
        init = nnx.initializers.lecun_normal()
        self.l1 = nnx.Linear(
            32, 128, kernel_init=nnx.with_partitioning(init, ("a", "b")), rngs=rngs
        )
        self.l2 = nnx.Linear(
            128, 128, kernel_init=nnx.with_partitioning(init, ("b", None)), rngs=rngs
        )
        self.out = nnx.Linear(128, 4, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.l2(jnp.tanh(self.l1(x)))))


def _sharding_names(var):
    return var.get_metadata().get("out_sharding")


@pytest.mark.parametrize("name", LAYOUTS)
def test_nnx_optimizer_trains_and_keeps_sharding_metadata(name):
    mesh = jax.make_mesh(
        (1, 1), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2
    )
    with jax.set_mesh(mesh):
        model = _Mlp(nnx.Rngs(0))
        opt = nnx.Optimizer(model, ALIASES[name](), wrt=nnx.Param)

        @nnx.jit
        def train_step(model, opt):
            def loss_fn(model):
                return jnp.mean((model(_X) - _Y) ** 2)

            loss, grads = nnx.value_and_grad(loss_fn)(model)
            opt.update(model, grads)
            return loss

        losses = [float(train_step(model, opt)) for _ in range(30)]
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0], losses[::6]
    # The param's sharding names are kept wherever a state has the param's
    # rank; a Packed keeps them on its leading axes (codes and scales).
    checked = 0
    for path, var in jax.tree_util.tree_flatten_with_path(
        nnx.state(opt, nnx.optimizer.OptState),
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )[0]:
        key = jax.tree_util.keystr(path)
        if "kernel" not in key or "out" in key:
            continue
        names = ("a", "b") if "l1" in key else ("b", None)
        shape = (32, 128) if "l1" in key else (128, 128)
        value = var.get_value()
        if value.shape == shape:
            assert _sharding_names(var) == names, key
            checked += 1
        elif "codes" in key or "scales" in key:
            lead = names[:1] + (None,) * (value.ndim - 1)
            assert _sharding_names(var) == lead, key
            checked += 1
    assert checked >= 2


@pytest.mark.parametrize("name", SHARED_STEP)
def test_orbax_restore_then_3_steps_bitwise(name, tmp_path):
    tx, _, _ = _setup(name)
    params = _params()
    p, s, _ = _run(name, params, tx.init(params), 3)
    unbroken_p, unbroken_s, _ = _run(name, p, s, 3)

    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "ckpt", {"params": p, "opt_state": s})
    ckpt.wait_until_finished()
    target = {
        "params": jax.eval_shape(lambda: params),
        "opt_state": jax.eval_shape(tx.init, params),
    }
    restored = ckpt.restore(tmp_path / "ckpt", target)
    ckpt.close()
    assert jax.tree.structure(restored["opt_state"]) == jax.tree.structure(s)
    p2, s2, _ = _run(name, restored["params"], restored["opt_state"], 3)
    assert jax.tree.structure(s2) == jax.tree.structure(unbroken_s)
    for a, b in zip(
        jax.tree.leaves((p2, s2)),
        jax.tree.leaves((unbroken_p, unbroken_s)),
        strict=True,
    ):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert _packed(s2)
