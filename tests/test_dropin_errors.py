"""Bad input refused clearly, empty leaves accepted (issue 19, items 4, 6, 7, 8)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import optax_lowbit as lowbit

EVERYTHING = lowbit.policy.from_predicate(lambda path, x: True)


# item 4 --------------------------------------------------------------------


@pytest.mark.parametrize(
    "policy",
    [lowbit.policy.default(), EVERYTHING],
    ids=["default", "from_predicate"],
)
@pytest.mark.parametrize(
    "make", [lowbit.adamw_polar, lowbit.lion_polar, lowbit.sgd_polar]
)
def test_inject_hyperparams_with_a_policy_and_no_static_args(make, policy):
    tx = optax.inject_hyperparams(make)(1e-3, policy=policy)
    with pytest.raises(TypeError, match=r"static_args=\('bits', 'policy'\)") as e:
        tx.init({"w": jnp.zeros((64, 128))})
    assert "inject_hyperparams" in str(e.value)


def test_inject_hyperparams_with_static_args_works():
    tx = optax.inject_hyperparams(lowbit.adamw_polar, static_args=("bits", "policy"))(
        1e-3, policy=EVERYTHING
    )
    params = {"w": jnp.ones((8, 64))}
    state = tx.init(params)
    updates, _ = tx.update(params, state, params)
    assert updates["w"].shape == (8, 64)


# item 6 --------------------------------------------------------------------


@given(value=st.sampled_from(["False", "True", "", 0, 1, None, 2.0, [True]]))
def test_policy_returning_a_non_bool_is_refused(value):
    tx = lowbit.adamw_polar(1e-3, policy=lambda path, x: value)
    with pytest.raises(TypeError, match=r"\['dense'\]\['w'\]") as e:
        tx.init({"dense": {"w": jnp.zeros((64, 128))}})
    assert repr(value) in str(e.value)
    assert "bool" in str(e.value)


@pytest.mark.parametrize("value", [True, False, np.bool_(True), np.bool_(False)])
def test_policy_returning_a_bool_is_accepted(value):
    state = lowbit.sgd_polar(0.1, policy=lambda path, x: value).init(
        {"w": jnp.zeros((64, 128))}
    )
    assert isinstance(state[0].trace["w"], lowbit.codecs.Packed) == bool(value)


# item 7 --------------------------------------------------------------------

ALIASES = {
    "adamw_polar": lambda: lowbit.adamw_polar(1e-3, policy=EVERYTHING),
    "adamw_polar-1.5": lambda: lowbit.adamw_polar(1e-3, bits=1.5, policy=EVERYTHING),
    "adamw_piquant": lambda: lowbit.adamw_piquant(1e-3, policy=EVERYTHING),
    "adamw_8bit": lambda: lowbit.adamw_8bit(1e-3, policy=EVERYTHING),
    "adamw_4bit": lambda: lowbit.adamw_4bit(1e-3, policy=EVERYTHING),
    "lion_polar": lambda: lowbit.lion_polar(1e-3, policy=EVERYTHING),
    "sgd_polar": lambda: lowbit.sgd_polar(1e-3, policy=EVERYTHING),
    "adafactor_polar": lambda: lowbit.adafactor_polar(
        1e-3, momentum=0.9, factored=False, policy=EVERYTHING
    ),
}


EMPTY_SHAPES = [(0, 128), (128, 0), (0,), (3, 0, 5)]


# Every empty shape in one tree next to a non-empty leaf: one compiled update
# per alias (each shape was its own test and compile).
@pytest.mark.parametrize("name", list(ALIASES))
def test_empty_leaves_under_a_quantizing_policy(name):
    tx = ALIASES[name]()
    rng = np.random.default_rng()
    empty = {f"empty{i}": jnp.zeros(shape) for i, shape in enumerate(EMPTY_SHAPES)}
    params = {**empty, "w": jnp.asarray(rng.standard_normal((8, 128)), jnp.float32)}
    state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.1, params)
    for _ in range(2):
        updates, state = jax.jit(tx.update)(grads, state, params)
        params = optax.apply_updates(params, updates)
    for i, shape in enumerate(EMPTY_SHAPES):
        assert updates[f"empty{i}"].shape == shape, shape
        assert updates[f"empty{i}"].dtype == jnp.float32, shape
        assert lowbit.state_bytes(tx.init({"empty": jnp.zeros(shape)})) < 64, shape
    assert bool(jnp.all(jnp.isfinite(updates["w"])))


# item 8 --------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [1.5, 1.0, -0.1, float("nan")])
def test_sgd_polar_momentum_out_of_range(momentum):
    with pytest.raises(ValueError, match=r"momentum.*\[0, 1\)") as e:
        lowbit.sgd_polar(0.1, momentum=momentum)
    assert repr(momentum) in str(e.value)


@given(momentum=st.floats(0.0, 0.999))
def test_sgd_polar_momentum_in_range(momentum):
    lowbit.sgd_polar(0.1, momentum=momentum)


# a gradient whose shape is not its parameter's ------------------------------


@pytest.mark.parametrize("name", [*ALIASES, "adamw_polar-fused"])
@given(
    shape=st.sampled_from([(8, 127), (8, 129), (7, 128), (1024,), (8, 128, 1)]),
    nested=st.booleans(),
)
def test_a_gradient_of_another_shape_is_named(name, shape, nested):
    if name == "adamw_polar-fused":
        opt = lowbit.adamw_polar(1e-3, policy=EVERYTHING, fused=True)
        init, step = opt.init, opt.step
    else:
        tx = ALIASES[name]()
        init, step = tx.init, tx.update
    rng = np.random.default_rng()
    w = jnp.asarray(rng.standard_normal((8, 128)), jnp.float32)
    params = {"layer": {"w": w}, "b": jnp.ones((16,))} if nested else {"w": w}
    grads = jax.tree.map(jnp.ones_like, params)
    if nested:
        grads["layer"]["w"] = jnp.ones(shape)
    else:
        grads["w"] = jnp.ones(shape)
    where = "['layer']['w']" if nested else "['w']"
    with pytest.raises(ValueError, match=r"was the state made by tx\.init") as e:
        step(grads, init(params), params)
    assert f"updates{where} has shape {shape}" in str(e.value)
    assert "for shape (8, 128)" in str(e.value)


# codec overrides -----------------------------------------------------------

# Every public optimizer taking ``mu_codec``, and those taking ``nu_codec``
# (positional learning rate where the factory has one).
MU_CODEC_TAKERS = {
    "adamw_polar": lowbit.adamw_polar,
    "adamw_polar-fused": lambda **kw: lowbit.adamw_polar(1e-3, fused=True, **kw),
    "adamw_4bit": lowbit.adamw_4bit,
    "adamw_piquant": lowbit.adamw_piquant,
    "lion_polar": lowbit.lion_polar,
    "sgd_polar": lowbit.sgd_polar,
    "adafactor_polar": lowbit.adafactor_polar,  # momentum off: still checked
    "muon_polar": lowbit.muon_polar,
    "muon_8bit": lowbit.muon_8bit,
    "scale_by_adam_polar": lambda *a, **kw: lowbit.scale_by_adam_polar(**kw),
}
NU_CODEC_TAKERS = [
    "adamw_polar",
    "adamw_8bit",
    "adafactor_polar",
    "scale_by_adam_polar",
]


def _make(name, **kw):
    make = MU_CODEC_TAKERS.get(name) or getattr(lowbit, name)
    return make(**kw) if name.endswith("-fused") else make(1e-3, **kw)


NOT_CODECS = st.one_of(
    st.text(max_size=12),
    st.integers(),
    st.floats(allow_nan=False),
    st.sampled_from([lowbit.codecs.polar, lowbit.codecs, (), {"bits": 2}]),
)


@pytest.mark.parametrize("name", list(MU_CODEC_TAKERS))
@given(value=NOT_CODECS)
def test_mu_codec_that_is_not_a_codec_is_named(name, value):
    # before: adamw_polar / muon_polar raised AttributeError ('str' object has
    # no attribute 'group_size'), sgd_polar named it "codec", adafactor_polar
    # without momentum took it
    with pytest.raises(TypeError, match=r"^mu_codec must be a codec") as e:
        _make(name, mu_codec=value)
    assert repr(value) in str(e.value)


@pytest.mark.parametrize("name", list(MU_CODEC_TAKERS))
def test_unsigned_mu_codec_is_named(name):
    codec = lowbit.codecs.polar(bits=1.5, signed=False)
    with pytest.raises(ValueError, match=r"^mu_codec must be a signed codec"):
        _make(name, mu_codec=codec)


@pytest.mark.parametrize("name", NU_CODEC_TAKERS)
@given(value=NOT_CODECS)
def test_nu_codec_that_is_not_a_codec_is_named(name, value):
    with pytest.raises(TypeError, match=r"^nu_codec must be a codec"):
        _make(name, nu_codec=value)


@pytest.mark.parametrize("name", list(MU_CODEC_TAKERS))
def test_a_signed_mu_codec_override_is_taken(name):
    codec = lowbit.codecs.blockwise8(True)
    kw = {"momentum": 0.9} if name == "adafactor_polar" else {}
    tx = _make(name, mu_codec=codec, **kw)
    tx = getattr(tx, "tx", tx)  # the fused optimizer's chain
    params = {"w": jnp.ones((16, 256))}
    codecs = {
        x.codec
        for x in jax.tree.leaves(
            tx.init(params), is_leaf=lambda x: isinstance(x, lowbit.codecs.Packed)
        )
        if isinstance(x, lowbit.codecs.Packed)
    }
    assert codec in codecs
