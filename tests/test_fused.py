"""The fused update-and-apply step against the Optax chain + apply_updates."""

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_lowbit as lowbit

# the fused step and the chain held to the same bits (tests/conftest.py)
pytestmark = pytest.mark.optimized


def _params(key):
    k1, k2 = jax.random.split(key)
    return {
        "w": jax.random.normal(k1, (64, 200)),  # quantized, 13 groups per row
        "x": jax.random.normal(k2, (3, 7, 64)),  # quantized, 21 groups
        "b": jnp.ones((10,)),  # small: float moments, stepped in its own shape
        "c": jnp.full((3, 4), 0.5),  # small too
    }


def _grads(params, key):
    leaves, tdef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return tdef.unflatten(
        [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    )


@pytest.mark.parametrize(
    "impl,bits", [("jnp", 2), ("jnp", 1.5), ("pallas", 2), ("pallas", 1.5)]
)
def test_fused_step_equals_chain_then_apply(impl, bits):
    lr = optax.linear_schedule(1e-2, 1e-3, 10)
    wd = optax.linear_schedule(0.1, 0.0, 10)
    mask = lambda p: {"w": True, "x": False, "b": True, "c": False}  # noqa: E731
    # at 1.5 bits the small leaves' first moment is bf16 (mu_dtype)
    mu_dtype = jnp.bfloat16 if bits == 1.5 else None
    kw = dict(weight_decay=wd, mask=mask, bits=bits, impl=impl, mu_dtype=mu_dtype)
    opt = lowbit.fused_adamw_polar(lr, **kw)
    tx = lowbit.adamw_polar(lr, **kw)
    params = _params(jax.random.key(bits == 2))
    s_fused, s_chain = opt.init(params), tx.init(params)
    chex.assert_trees_all_equal(s_fused, s_chain)  # the same state
    p_fused = p_chain = params
    step = jax.jit(opt.step, donate_argnums=(1, 2))
    update = jax.jit(tx.update)
    for i in range(3):
        g = _grads(params, jax.random.key(100 + i))
        p_fused, s_fused = step(g, s_fused, jax.tree.map(jnp.copy, p_fused))
        u, s_chain = update(g, s_chain, p_chain)
        p_chain = optax.apply_updates(p_chain, u)
    chex.assert_trees_all_equal(s_fused, s_chain)  # codes, scales, counts
    chex.assert_trees_all_close(p_fused, p_chain, rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(p_fused["w"] - params["w"]).max()) > 1e-3  # it moved


@pytest.mark.parametrize("name", ["piquant", "8bit", "4bit"])
def test_fused_baselines_equal_chain_then_apply(name):
    """π-Quant, 8-bit and 4-bit: the fused kernel (interpret mode) steps like
    their chain then apply_updates."""
    fused = getattr(lowbit, f"fused_adamw_{name}")
    chain = getattr(lowbit, f"adamw_{name}")
    lr = optax.linear_schedule(1e-2, 1e-3, 10)
    kw = dict(weight_decay=0.1, impl="pallas")
    opt, tx = fused(lr, **kw), chain(lr, **{**kw, "impl": "jnp"})
    params = _params(jax.random.key(7))
    s_fused, s_chain = opt.init(params), tx.init(params)
    p_fused = p_chain = params
    for i in range(2):
        g = _grads(params, jax.random.key(200 + i))
        p_fused, s_fused = jax.jit(opt.step)(g, s_fused, p_fused)
        u, s_chain = jax.jit(tx.update)(g, s_chain, p_chain)
        p_chain = optax.apply_updates(p_chain, u)
    chex.assert_trees_all_equal(s_fused, s_chain)
    chex.assert_trees_all_close(p_fused, p_chain, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="impl"):
        fused(1e-3, impl="cuda")


def test_fused_state_restores_into_the_chain():
    """The chain can continue a fused run (and back): same state type."""
    params = _params(jax.random.key(3))
    opt = lowbit.fused_adamw_polar(1e-2, impl="jnp")
    state = opt.init(params)
    g = _grads(params, jax.random.key(4))
    params2, state = jax.jit(opt.step)(g, state, params)
    _, state2 = jax.jit(opt.tx.update)(g, state, params2)
    chex.assert_trees_all_equal_shapes_and_dtypes(state2, state)
    assert int(state2[0].count) == 2


def test_fused_bad_arguments_fail_at_construction():
    with pytest.raises(ValueError, match="bits"):
        lowbit.fused_adamw_polar(1e-3, bits=3)
    with pytest.raises(ValueError, match="impl"):
        lowbit.fused_adamw_polar(1e-3, impl="cuda")


@pytest.mark.parametrize(
    "make",
    [
        lambda: lowbit.adamw_polar(1e-2, impl="jnp"),
        lambda: lowbit.adamw_polar(1e-2, impl="pallas"),
        lambda: lowbit.sgd_polar(1e-2, momentum=0.9),
        lambda: lowbit.adafactor_polar(1e-2, momentum=0.9),
    ],
)
def test_raw_nnx_state_with_variables(make):
    """tx.update on a raw nnx.split state (Variable nodes), as optax allows:
    the same numbers as on pure dicts, Variables kept in updates and state."""
    from flax import nnx

    model = nnx.Linear(256, 128, rngs=nnx.Rngs(0))
    _, state = nnx.split(model, nnx.Param)
    grads = jax.tree.map(lambda x: jnp.sin(3.0 * x) + 0.1, state)
    tx = make()
    updates, new = jax.jit(tx.update)(grads, tx.init(state), state)
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    assert all(is_var(x) for x in jax.tree.leaves(updates, is_leaf=is_var))
    pure, gpure = nnx.to_pure_dict(state), nnx.to_pure_dict(grads)
    ref, _ = jax.jit(tx.update)(gpure, tx.init(pure), pure)
    chex.assert_trees_all_close(nnx.to_pure_dict(updates), ref)
    _, again = jax.jit(tx.update)(grads, new, state)  # the state round-trips
    chex.assert_trees_all_equal_structs(again, new)


@pytest.mark.parametrize("fused", [False, True])
def test_float_moment_leaves_step_as_optax_adamw(fused):
    """Leaves the policy keeps in float (each stepped in its own shape) move as
    under `optax.adamw`, weight decay masked per leaf, a bf16 leaf kept bf16."""
    key = jax.random.key(np.random.default_rng().integers(2**31))
    params = _params(key)
    params["h"] = jax.random.normal(jax.random.fold_in(key, 2), (5, 3), jnp.bfloat16)
    mask = lambda p: {"w": True, "x": False, "b": True, "c": False, "h": True}  # noqa: E731
    kw = dict(weight_decay=0.1, mask=mask)
    ref_tx = optax.adamw(1e-2, **kw)
    p_ref, s_ref = params, ref_tx.init(params)
    never = lambda path, x: False  # noqa: E731
    if fused:
        opt = lowbit.adamw_polar(1e-2, impl="jnp", policy=never, fused=True, **kw)
        step = jax.jit(opt.step)
    else:
        tx = lowbit.adamw_polar(1e-2, impl="jnp", policy=never, **kw)

        def step(g, s, p):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        step = jax.jit(step)
    p_got, s_got = params, (opt if fused else tx).init(params)
    for i in range(3):
        g = _grads(params, jax.random.fold_in(key, 10 + i))
        p_got, s_got = step(g, s_got, p_got)
        u, s_ref = ref_tx.update(g, s_ref, p_ref)
        p_ref = optax.apply_updates(p_ref, u)
    chex.assert_trees_all_equal_dtypes(p_got, params)
    # bf16 leaf: Optax keeps its moments in bf16, we step them in float32, so
    # the parameters may differ by a bf16 rounding (2**-8 relative)
    h_got, h_ref = p_got.pop("h"), p_ref.pop("h")
    np.testing.assert_allclose(
        np.asarray(h_got, np.float32),
        np.asarray(h_ref, np.float32),
        rtol=1e-2,
        atol=1e-2,
    )
    chex.assert_trees_all_close(p_got, p_ref, rtol=1e-5, atol=1e-5)


def _dead_equations(closed: jax.extend.core.ClosedJaxpr) -> int:
    """Top-level equations of ``closed`` whose results nothing uses."""
    literal = jax.extend.core.Literal
    jaxpr = closed.jaxpr
    used = {v for v in jaxpr.outvars if not isinstance(v, literal)}
    dead = 0
    for eqn in reversed(jaxpr.eqns):
        if eqn.effects or any(v in used for v in eqn.outvars):
            used.update(v for v in eqn.invars if not isinstance(v, literal))
        else:
            dead += 1
    return dead


@pytest.mark.parametrize("mask", [None, "callable", "tree"])
def test_fused_step_traces_no_per_leaf_work_it_drops(mask):
    """The step advances the tail's state (schedules' counts) without tracing
    the tail's per-leaf updates it would drop: the trace's unused equations do
    not grow with the leaves, and the tail's state steps as the chain's."""
    rng = np.random.default_rng()

    def params(n):
        shapes = {f"w{i}": (8, 16 * int(rng.integers(1, 4))) for i in range(n)}
        shapes |= {f"b{i}": (int(rng.integers(3, 20)),) for i in range(n)}
        return {
            k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()
        }

    def masks(p):
        return {k: k.startswith("w") for k in p}

    lr = optax.linear_schedule(1e-2, 1e-3, 10)
    wd = optax.linear_schedule(0.1, 0.0, 10)
    dead = []
    for n in (3, 9):
        p = params(n)
        m = {None: None, "callable": masks, "tree": masks(p)}[mask]
        kw = dict(weight_decay=wd, mask=m, impl="jnp")
        opt = lowbit.adamw_polar(lr, fused=True, **kw)
        s = opt.init(p)
        dead.append(_dead_equations(jax.make_jaxpr(opt.step)(p, s, p)))
        _, s_fused = jax.jit(opt.step)(p, s, p)
        _, s_chain = jax.jit(lowbit.adamw_polar(lr, **kw).update)(p, s, p)
        chex.assert_trees_all_equal(s_fused[1:], s_chain[1:])  # the tail's
        assert int(s_fused[-1].count) == 1
    assert dead[0] == dead[1], dead  # 3 -> 9 pairs of leaves: none added


def _wrong_params(kind, params):
    if kind == "none":
        return None, r"^the fused step applies the update to the parameters"
    if kind == "list":  # as many leaves, another order: it paired them silently
        return list(params.values()), r"^params must have the tree structure of grads"
    if kind == "missing":
        return {"w": params["w"]}, r"^params must have the tree structure of grads"
    if kind == "extra":
        extra = {**params, "c": jnp.ones(3)}
        return extra, r"^params must have the tree structure of grads"
    w = params["w"]
    message = r"^params\['w'\] has shape \(16, 127\), which its update of shape"
    return {**params, "w": w[:, :-1]}, message


@pytest.mark.parametrize("kind", ["none", "list", "missing", "extra", "shape"])
@pytest.mark.parametrize("jit", [False, True])
def test_fused_step_refuses_params_that_do_not_match_grads(kind, jit):
    # a gradient that does not fit its quantized moment is named by the state's
    # check first (tests/test_dropin_errors.py); here the parameters are wrong
    rng = np.random.default_rng()
    params = {
        "w": jnp.asarray(rng.standard_normal((16, 128)), jnp.float32),
        "b": jnp.asarray(rng.standard_normal(128), jnp.float32),
    }
    grads = jax.tree.map(lambda x: 0.1 * x, params)
    opt = lowbit.adamw_polar(1e-3, fused=True)
    state = opt.init(params)
    step = jax.jit(opt.step) if jit else opt.step
    wrong, message = _wrong_params(kind, params)
    with pytest.raises(ValueError, match=message):
        step(grads, state, wrong)


def test_fused_step_broadcasts_a_float_leaf_gradient_as_the_chain():
    # a plain (float) leaf's gradient that broadcasts to its parameter is taken,
    # as optax.apply_updates takes it on the chain path
    params = {"w": jnp.linspace(-1.0, 1.0, 16 * 128).reshape(16, 128), "b": jnp.ones(8)}
    grads = {"w": 0.1 * params["w"], "b": jnp.full((1,), 0.5)}
    opt = lowbit.adamw_polar(1e-2, fused=True)
    new, _ = jax.jit(opt.step)(grads, opt.init(params), params)
    u, _ = opt.tx.update(grads, opt.tx.init(params), params)
    chex.assert_trees_all_close(new, optax.apply_updates(params, u), atol=1e-6)
