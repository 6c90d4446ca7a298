import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_lowbit as lowbit
from tests.transforms import _testing_codecs

INT8 = _testing_codecs.Int8Absmax()
SQRT = _testing_codecs.Int8Sqrt()


def _params():
    return {
        "w": jnp.zeros((64, 100)),  # 64 x ceil(100/32)=4 groups of 32 -> padded
        "b": jnp.zeros((100,)),
        "tok_embed": jnp.zeros((200, 64)),
        "small": jnp.zeros((8, 8)),
    }


def test_state_bytes_exact_on_known_tree():
    params = _params()
    tx = lowbit.scale_by_adam_quantized(INT8, SQRT)
    state = tx.init(params)
    # w: codes 64 x 4 x 32 B + scales 64 x 4 x 4 B, for mu and nu each
    packed = 2 * (64 * 4 * 32 + 64 * 4 * 4)
    plain = 2 * 4 * (100 + 200 * 64 + 64)
    # + int32 count and int32 state format
    assert lowbit.state_bytes(state) == packed + plain + 4 + 4
    shapes = jax.eval_shape(tx.init, params)
    assert lowbit.state_bytes(shapes) == lowbit.state_bytes(state)
    ref = optax.adamw(1e-3).init(params)
    n = sum(x.size for x in jax.tree.leaves(params))
    assert lowbit.state_bytes(ref) == 8 * n + 4


def test_summarize_rows_and_reasons():
    params = _params()
    state = optax.chain(
        lowbit.scale_by_adam_quantized(INT8, SQRT), optax.scale_by_learning_rate(1.0)
    ).init(params)
    rows = {(r.kind, r.reason): r for r in lowbit.summarize(state, params)}
    assert rows[("test-int8-absmax", "")].elements == 6400
    assert rows[("test-int8-absmax", "")].bytes == 64 * 4 * 36
    assert rows[("test-int8-sqrt", "")].leaves == 1
    # b (100 elements) counts once though its mu and nu are both in the row
    assert rows[("float32", "rank < 2")].elements == 100
    assert rows[("float32", "embedding")].bytes == 2 * 4 * 200 * 64
    assert rows[("float32", "below min_size (4096)")].leaves == 2
    assert rows[("other", "counters, hyperparameters")].bytes == 8  # count, format
    assert sum(r.bytes for r in rows.values()) == lowbit.state_bytes(state)
    np.testing.assert_allclose(rows[("float32", "rank < 2")].bytes_per_element, 8.0)


def test_summary_text():
    params = _params()
    state = lowbit.scale_by_adam_quantized(INT8, SQRT).init(params)
    text = lowbit.summary(state, params)
    for word in (
        "test-int8-absmax",
        "test-int8-sqrt",
        "rank < 2",
        "embedding",
        "below min_size (4096)",
        "fp32 Adam",
        "total",
    ):
        assert word in text, (word, text)
    n = sum(x.size for x in jax.tree.leaves(params))
    per = lowbit.state_bytes(state) / n
    assert f"{per:.3f}" in text.splitlines()[-1]
    # without params: no reasons, but totals per moment tree's elements
    text = lowbit.summary(jax.eval_shape(lambda: state))
    assert "unquantized" in text and f"{n:,}" in text.splitlines()[-1]


def test_summary_of_optax_state_and_custom_policy():
    params = _params()
    text = lowbit.summary(optax.adam(1e-3).init(params), params)
    assert "1.00x fp32 Adam" in text
    policy = lowbit.policy.from_predicate(lambda p, x: False)
    state = lowbit.scale_by_adam_quantized(INT8, SQRT, policy=policy).init(params)
    text = lowbit.summary(state, params, policy=policy)
    assert "excluded by policy" in text and "int8" not in text


def test_summary_of_an_nnx_optimizer_and_a_clear_error_for_nnx_state():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(64, 128, rngs=rngs)

    model = Net(nnx.Rngs(0))
    opt = nnx.Optimizer(model, lowbit.adamw_polar(1e-3), wrt=nnx.Param)
    params = nnx.state(model, nnx.Param)
    want = lowbit.summary(opt.opt_state, params)
    assert "polar-2b-signed-sr" in want
    assert lowbit.summary(opt, params) == want
    with pytest.raises(TypeError, match=r"optimizer\.opt_state"):
        lowbit.summary(nnx.state(opt.opt_state), params)
