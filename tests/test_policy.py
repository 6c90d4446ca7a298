import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

import optax_lowbit as lowbit

FP32 = lowbit.codecs.identity()


def _decisions(policy, params):
    return jax.tree_util.tree_map_with_path(policy, params)


def test_default_rules_and_reasons():
    policy = lowbit.policy.default()
    params = {
        "dense": {"kernel": jnp.zeros((64, 64)), "bias": jnp.zeros((4096,))},
        "small": jnp.zeros((32, 64)),
        "token_embed": {"embedding": jnp.zeros((1000, 64))},
        "ints": jnp.zeros((64, 64), jnp.int32),
        "half": jnp.zeros((64, 64), jnp.bfloat16),
    }
    assert _decisions(policy, params) == {
        "dense": {"kernel": True, "bias": False},
        "small": False,
        "token_embed": {"embedding": False},
        "ints": False,
        "half": True,
    }

    def reason(*keys):
        leaf = params
        for k in keys:
            leaf = leaf[k]
        return policy.reason(tuple(jax.tree_util.DictKey(k) for k in keys), leaf)

    assert reason("dense", "bias") == "rank < 2"
    assert reason("small") == "below min_size (4096)"
    assert reason("token_embed", "embedding") == "embedding"
    assert reason("ints") == "not floating point"
    assert reason("dense", "kernel") is None


def test_default_arguments():
    policy = lowbit.policy.default(min_size=10, min_rank=1, exclude=("head",))
    assert policy(("w",), jnp.zeros(16))
    assert not policy(("lm_head",), jnp.zeros((64, 64)))
    assert policy(("embed",), jnp.zeros((64, 64)))
    with pytest.raises(TypeError, match="min_size must be an int"):
        lowbit.policy.default(min_size=4096.0)
    with pytest.raises(ValueError, match="min_rank must be an int >= 0"):
        lowbit.policy.default(min_rank=-1)


def test_global_shape_shapedtypestruct_and_sharded_leaf():
    policy = lowbit.policy.default()
    sds = jax.ShapeDtypeStruct((64, 64), jnp.float32)
    assert policy(("w",), sds)
    # a sharded array reports its global shape; the decision uses it
    mesh = jax.sharding.Mesh(jax.devices()[:1], ("d",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
    x = jax.device_put(jnp.zeros((64, 64)), sharding)
    assert policy(("w",), x)


def test_predicate_and_non_callable():
    policy = lowbit.policy.from_predicate(
        lambda path, x: "attn" in jax.tree_util.keystr(path)
    )
    params = {
        "attn": jnp.zeros((8, 8)),
        "mlp": jnp.zeros((8, 8)),
        "n": jnp.zeros(3, jnp.int32),
    }
    assert _decisions(policy, params) == {"attn": True, "mlp": False, "n": False}
    assert policy.reason(("mlp",), params["mlp"]) == "excluded by policy"
    with pytest.raises(TypeError, match="policy must be callable"):
        lowbit.scale_by_adam_quantized(FP32, FP32, policy=("embed",))


def test_nnx_state_variables():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(100, 64, rngs=rngs)
            self.lin = nnx.Linear(64, 128, rngs=rngs)

    state = nnx.state(Model(nnx.Rngs(0)), nnx.Param)
    policy = lowbit.policy.default()
    # what tx.init sees: nnx.State whose Variables are pytree nodes
    tx = lowbit.scale_by_adam_quantized(FP32, FP32)
    opt = tx.init(state)
    mu = opt.mu
    # a quantized leaf is a Packed of Variables (a Variable never holds a Packed)
    assert isinstance(mu["lin"]["kernel"], lowbit.codecs.Packed)
    assert isinstance(mu["lin"]["kernel"].codes, nnx.Param)
    assert not isinstance(mu["lin"]["bias"].get_value(), lowbit.codecs.Packed)
    assert not isinstance(mu["embed"]["embedding"].get_value(), lowbit.codecs.Packed)

    # and nnx.Optimizer trains with it
    model = Model(nnx.Rngs(0))
    opt = nnx.Optimizer(
        model, optax.chain(tx, optax.scale_by_learning_rate(1e-2)), wrt=nnx.Param
    )

    @nnx.jit
    def step(model, opt, x):
        loss, g = nnx.value_and_grad(lambda m: jnp.mean(m.lin(m.embed(x)) ** 2))(model)
        opt.update(model, g)
        return loss

    losses = [float(step(model, opt, jnp.arange(16))) for _ in range(5)]
    assert losses[-1] < losses[0]
    assert int(nnx.as_pure(opt.opt_state)[0].count) == 5
    # a Variable given as the leaf is unwrapped
    assert policy(("lin", "kernel"), state["lin"]["kernel"])
    assert policy.reason(("embed",), state["embed"]["embedding"]) == "embedding"


@given(value=st.one_of(st.integers(), st.text(max_size=5), st.just(None)))
def test_from_predicate_names_its_argument(value):
    with pytest.raises(TypeError, match=r"^fn must be callable"):
        lowbit.policy.from_predicate(value)
