"""CPU smoke test of benchmarks/train_lm.py: the loss falls, valid JSON comes out.

A tiny byte-level GPT, 20 steps, fp32 AdamW and polar 2-bit AdamW, two seeds.
Real Austen text (skips with the loader's message when the Debian mirror is
unreachable); not timed.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import data, train_lm

REQUIRED = (
    "optimizer",
    "metric",
    "mean",
    "std",
    "seeds",
    "state_bytes_per_param",
    "step_ms",
    "device",
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    try:
        train, heldout = data.austen_bytes("train"), data.austen_bytes("heldout")
    except RuntimeError as err:
        pytest.skip(f"Debian package unavailable: {err}")
    root = tmp_path_factory.mktemp("austen")
    np.save(root / "austen_train.npy", train)
    np.save(root / "austen_heldout.npy", heldout)
    return root


@pytest.fixture(scope="module")
def smoke(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("results") / "train_lm.json"
    train_lm.main(
        [
            "--smoke",
            "--data-dir",
            str(data_dir),
            "--optimizers",
            "adamw_fp32,polar2",
            "--seeds",
            "0,1",
            "--out",
            str(out),
            "--png",
            str(out.with_suffix(".png")),
        ]
    )
    return out


# The tests of the module-scoped `smoke` run share one xdist worker
# (``--dist loadgroup``): the run happens once. The benchmarks' smoke runs
# (20-40 s each on a 2-core CPU, most of it compilation) are slow: CI's second
# step (OPTAX_LOWBIT_SLOW=1) runs them.
SMOKE = pytest.mark.xdist_group("train_lm_smoke")


@SMOKE
@pytest.mark.slow
def test_writes_valid_json_and_plot(smoke):
    result = json.loads(smoke.read_text())
    assert [r["optimizer"] for r in result["records"]] == ["adamw_fp32", "polar2"]
    for record in result["records"]:
        assert set(REQUIRED) <= set(record)
        assert record["seeds"] == [0, 1]
        assert math.isfinite(record["mean"]) and record["std"] >= 0
        assert record["step_ms"] > 0
    bpp = {r["optimizer"]: r["state_bytes_per_param"] for r in result["records"]}
    assert bpp["polar2"] < bpp["adamw_fp32"]
    assert result["meta"]["smoke"] and result["meta"]["jax"]
    assert set(result["goals"]) == {"polar2"}
    assert smoke.with_suffix(".png").stat().st_size > 0


@SMOKE
@pytest.mark.slow
@pytest.mark.parametrize("name", ["adamw_fp32", "polar2"])
def test_loss_falls(smoke, name):
    result = json.loads(smoke.read_text())
    run = next(r for r in result["runs"] if r["optimizer"] == name)
    heldout = np.asarray(run["curve"]["heldout"])  # [point][seed]
    assert np.all(np.isfinite(heldout))
    # From ln(256) = 5.55 nats at init, down by a clear margin on every seed.
    assert np.all(heldout[-1] < heldout[0] - 0.5)
    assert np.all(np.asarray(run["final_heldout"]) < heldout[0] - 0.5)


@pytest.mark.parametrize(
    "name, codec_name",
    [
        ("muon_4bit", "blockwise4-signed-b128"),
        ("muon_4bit_b32", "blockwise4-signed-b32"),
        ("muon_4bit_sr", "blockwise4-signed-b128-sr"),
        ("muon_polar2", "polar-2b-signed"),
        ("muon_polar2_g16", "polar-2b-signed-g16"),
        ("muon_polar2_beta08", "polar-2b-signed"),
        ("muon_nomom", None),
    ],
)
def test_muon_screen_optimizers_are_what_their_names_say(name, codec_name):
    def run(name):
        """Matrix updates of two steps on fresh gradients, and the state."""
        tx = train_lm.make_optimizer(name, 1e-3, b1=0.9, b2=0.95, wd=0.1)
        params = {"w": jnp.zeros((64, 256)), "b": jnp.zeros(256)}
        state = tx.init(params)
        out = []
        for k in range(2):
            g = {
                n: jax.random.normal(jax.random.key(k), p.shape)
                for n, p in params.items()
            }
            u, state = tx.update(g, state, params)
            out.append(u["w"])
        return out, state

    updates, state = run(name)
    mu = state[1].inner_states["muon"].inner_state[0].mu["w"]  # after clipping
    assert getattr(mu, "codec_name", None) == codec_name
    if name == "muon_nomom":  # beta 0: the second update forgets the first step
        fresh, _ = run("muon_fp32")
        assert not jnp.allclose(updates[1], fresh[1], rtol=1e-3)
    if name == "muon_polar2_beta08":  # the same codec, a shorter momentum
        default, _ = run("muon_polar2")
        # the first step's bias correction cancels beta (to float rounding)
        np.testing.assert_allclose(updates[0], default[0], rtol=1e-4, atol=1e-8)
        assert not jnp.allclose(updates[1], default[1], rtol=1e-3)


def test_unknown_optimizer_is_rejected():
    with pytest.raises(ValueError, match="optimizer must be one of"):
        train_lm.make_optimizer("sgd9", 1e-3, b1=0.9, b2=0.95, wd=0.1)


@pytest.mark.slow  # builds and runs the ResNet
def test_resnet_shapes_and_policy():
    from flax import nnx

    import optax_lowbit as lowbit
    from benchmarks import models

    model = models.ResNet((16, 32), rngs=nnx.Rngs(0))
    x = jax.random.uniform(jax.random.key(1), (3, 784))
    assert model(x).shape == (3, 10)
    params = nnx.state(model, nnx.Param)
    state = lowbit.adamw_polar(1e-3).init(nnx.to_pure_dict(params))
    quantized = [
        leaf.shape
        for leaf in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "codec"))
        if hasattr(leaf, "codec")
    ]
    # 3x3x16x16 = 2304 < 4096 stays fp32; the 3x3x16x32 downsampling conv and
    # the two 3x3x32x32 convs are coded, two moments each.
    assert sorted(quantized) == sorted([(3, 3, 16, 32)] * 2 + [(3, 3, 32, 32)] * 4)


@pytest.mark.slow
def test_vision_smoke_writes_json_and_learns(tmp_path):
    from benchmarks import train_vision

    try:
        data.fashion_mnist()
    except RuntimeError as err:
        pytest.skip(f"Debian package unavailable: {err}")
    out = tmp_path / "train_vision.json"
    # The MLP: seeds are vmapped, and a vmapped conv is a grouped conv, which
    # XLA runs slowly on CPU (the ResNet default is for the device).
    args = ["--smoke", "--model", "mlp", "--optimizers", "adamw_fp32,polar2"]
    args += ["--seeds", "0,1"]
    train_vision.main([*args, "--out", str(out)])
    result = json.loads(out.read_text())
    for record in result["records"]:
        assert set(REQUIRED) <= set(record)
        assert record["metric"] == "test_accuracy"
        # 10 classes: chance is 0.1; 10 steps of 128 images reach far above it.
        assert record["mean"] > 0.3
    assert "polar2" in result["goals"]


@pytest.mark.slow
def test_finetune_smollm2_smoke_writes_json_and_learns(tmp_path):
    from benchmarks import finetune_smollm2

    out = tmp_path / "finetune_smollm2.json"
    finetune_smollm2.main(
        ["--smoke", "--optimizers", "adamw_fp32,polar2", "--out", str(out)]
    )
    result = json.loads(out.read_text())
    assert (tmp_path / "finetune_smollm2.png").is_file()
    for record in result["records"]:
        assert set(REQUIRED) <= set(record)
        assert record["metric"] == "heldout_perplexity"
        # 20 steps on Austen bytes: perplexity falls well below the start.
        assert record["mean"] < 0.5 * result["meta"]["perplexity_before"]
    assert "polar2" in result["goals"]
