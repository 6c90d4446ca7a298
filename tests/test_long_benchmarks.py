"""CPU smoke tests of the long-horizon benchmarks (issue 16, part 3).

* `benchmarks.data`'s documentation corpus helpers, on synthetic documents
  (no download);
* `benchmarks.train_lm_long`: a tiny GPT, 20 steps, fp32 and 4-bit AdamW
  (the quantized optimizer quickest to compile on CPU), two seeds, shadow
  diagnostics on, from a synthetic ``docs.npz``; then ``--merge`` of its runs
  split over two files;
* `benchmarks.regression_tasks`: 50 steps of every task, fp32 and 4-bit.

Not timed; the whole file takes well under a minute on a 2-core CPU (most of
it compilation).
"""

import json
import math

import jax
import numpy as np
import pytest
from flax import nnx

from benchmarks import data, models, regression_tasks, train_lm_long

# --------------------------------------------------------------------------
# Documentation corpus helpers (synthetic documents).
# --------------------------------------------------------------------------


# The tests of the module-scoped fixtures (`docs_dir`, `long_smoke`) share one
# xdist worker (``--dist loadgroup``): each fixture runs once.
LONG = pytest.mark.xdist_group("long_benchmarks")
# The benchmark runs (~20 s each on a 2-core CPU, most of it compilation) are
# slow: CI's second step (OPTAX_LOWBIT_SLOW=1) runs them.
SLOW = pytest.mark.slow


def _synthetic_docs(n=95, seed=0):
    rng = np.random.default_rng(seed)
    words = "the kernel module driver python perl returns value of a list".split()
    docs = []
    for i in range(n):
        package = data.DOCS_PACKAGES[i * len(data.DOCS_PACKAGES) // n]
        text = " ".join(rng.choice(words, size=rng.integers(50, 400))) + ".\n"
        docs.append((package, f"doc/{i:04d}.txt", text.encode()))
    return docs


def test_split_holds_out_every_30th():
    docs = list(range(95))
    train, heldout = data.split_documents(docs)
    assert heldout == [29, 59, 89]
    assert len(train) == 92 and not set(train) & set(heldout)


def test_spread_subset_fits_and_spreads():
    sizes = [100] * 50
    keep = data.spread_subset(sizes, 1000)
    assert sum(sizes[i] for i in keep) <= 1000 and len(keep) == 10
    assert keep[0] < 10 and keep[-1] > 40  # spread over the whole list
    assert data.spread_subset(sizes, 10**6) == list(range(50))


def test_html_to_text_drops_script_and_style():
    page = (
        "<html><head><style>p {color: red}</style><script>var x = 1;</script>"
        "</head><body><h1>Title</h1><p>Some <b>bold</b>   text.</p>"
        "<pre>  keep\n    indent</pre></body></html>"
    )
    text = data.html_to_text(page)
    assert "color" not in text and "var x" not in text
    assert "Title\n" in text and "Some bold text." in text
    assert "  keep\n    indent" in text


@pytest.fixture(scope="module")
def docs_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("devdata")
    data.write_docs_devdata(root, max_train_bytes=60_000, docs=_synthetic_docs())
    return root


@LONG
def test_devdata_round_trip(docs_dir):
    train, heldout, info = data.load_docs_devdata(docs_dir)
    assert train.dtype == np.uint8 and heldout.dtype == np.uint8
    assert train.size <= 60_000 and info["train_bytes"] == train.size
    assert info["heldout_documents"] == 3 and info["documents"] == 95
    assert info["train_documents"] < info["train_documents_all"] == 92
    text = heldout.tobytes().decode()
    assert text.count(".\n" + data.DOCS_SEPARATOR.decode()) == 2


# --------------------------------------------------------------------------
# train_lm_long.
# --------------------------------------------------------------------------

TINY = [
    "--smoke",
    "--optimizers",
    "adamw_fp32,adamw_4bit",
    "--d-model",
    "32",
    "--n-heads",
    "2",
    "--n-layers",
    "1",
    "--seq-len",
    "32",
    "--steps",
    "20",
    "--chunk",
    "10",
    "--eval-every",
    "10",
    "--shadow-every",
    "10",
    "--eval-windows",
    "16",
    "--eval-full",
    "16",
    "--shadow-leaves",
    "3",
]


@pytest.fixture(scope="module")
def long_smoke(docs_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("results") / "long.json"
    params = out.with_name("gpt.npz")
    argv = [*TINY, "--data-dir", str(docs_dir), "--out", str(out)]
    train_lm_long.main([*argv, "--save-params", str(params)])
    return out


@LONG
@SLOW
def test_long_saves_the_fp32_model_for_impq(long_smoke):
    """``--save-params``: the first optimizer's model, loadable, not random."""
    gpt = models.load_tinygpt(str(long_smoke.with_name("gpt.npz")))
    fresh = models.TinyGPT(
        vocab=256, d_model=32, n_layers=1, n_heads=2, seq_len=32, rngs=nnx.Rngs(0)
    )
    trained, init = nnx.state(gpt, nnx.Param), nnx.state(fresh, nnx.Param)
    assert jax.tree.structure(trained) == jax.tree.structure(init)
    moved = jax.tree.map(lambda a, b: not np.allclose(a, b), trained, init)
    assert any(jax.tree.leaves(moved))  # trained, not a fresh init
    tokens = np.random.default_rng(0).integers(0, 256, (2, 33))
    assert np.isfinite(float(models.loss_fn(gpt, jax.numpy.asarray(tokens))))


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


@LONG
@SLOW
def test_long_writes_json_and_plot(long_smoke):
    result = json.loads(long_smoke.read_text())
    meta = result["meta"]
    for key in ("device", "jax", "optax", "flax", "date", "optax_lowbit_commit"):
        assert meta[key]
    assert meta["b2"] == 0.999 and meta["seeds"] == [0, 1] and meta["smoke"]
    assert meta["eval_steps"] == [0, 10, 20]
    assert [r["optimizer"] for r in result["records"]] == ["adamw_fp32", "adamw_4bit"]
    for record in result["records"]:
        assert _finite(record["mean"]) and record["std"] >= 0
        assert record["step_ms"] > 0 and record["state_bytes_per_param"] > 0
    m = result["metrics"]["adamw_4bit"]
    for key in ("heldout_gap", "gap_growth_last_half", "train_gap"):
        assert _finite(m[key])
    assert set(m["heldout_gap_at"]) == {"25%", "50%", "75%", "100%"}
    assert not m["diverged"]
    assert set(result["goals"]["adamw_4bit"]) == {
        "not_diverged",
        "heldout",
        "no_growth",
        "train",
    }
    assert long_smoke.with_suffix(".png").stat().st_size > 0


@LONG
@SLOW
def test_long_learns(long_smoke):
    result = json.loads(long_smoke.read_text())
    for run in result["runs"]:
        heldout = np.asarray(run["curve"]["heldout"])  # [point][seed]
        assert np.all(np.isfinite(heldout))
        assert np.all(heldout[-1] < heldout[0] - 0.3)  # from ln(256) = 5.55


@LONG
@SLOW
def test_long_shadow_log(long_smoke):
    result = json.loads(long_smoke.read_text())
    fp32, q = result["runs"]
    log = q["shadow"]["log"]
    assert [e["step"] for e in log] == [10, 20]
    leaves = q["shadow"]["leaves"]
    assert len(leaves) == 3 and {v["kind"] for v in leaves.values()} <= {
        "attention",
        "mlp",
        "other",
    }
    assert all(v["m_codec"].startswith("blockwise4") for v in leaves.values())
    entry = log[-1]
    assert (
        set(entry["m_bins"])
        == set(entry["v_bins"])
        == {b[0] for b in train_lm_long.SIZE_BINS}
    )
    for key in ("m_rms", "m_bias", "v_median", "v_p1", "v_p99", "dir_rms"):
        assert _finite(entry["all"][key])
    # fp32 AdamW's own moments are the shadow's: every ratio is 1.
    exact = fp32["shadow"]["log"][-1]["all"]
    for key in ("m_rms", "m_bias", "v_median", "dir_rms"):
        assert exact[key] == pytest.approx(1.0, rel=1e-4)
    assert exact["v_below_quarter"] == 0.0


@LONG
@SLOW
def test_long_merge(long_smoke, tmp_path):
    result = json.loads(long_smoke.read_text())
    a, b = dict(result), dict(result)
    a["runs"], b["runs"] = result["runs"][:1], result["runs"][1:]
    b["meta"] = dict(b["meta"], optax_lowbit_commit="other")
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for part, path in zip((a, b), paths, strict=True):
        path.write_text(json.dumps(part))
    out = tmp_path / "merged.json"
    merged = train_lm_long.main(["--merge", *map(str, paths), "--out", str(out)])
    assert [r["optimizer"] for r in merged["records"]] == ["adamw_fp32", "adamw_4bit"]
    parts = json.loads(out.read_text())["meta"]["parts"]
    assert [p["optimizers"] for p in parts] == [["adamw_fp32"], ["adamw_4bit"]]
    assert parts[1]["optax_lowbit_commit"] == "other"
    assert merged["metrics"]["adamw_4bit"]["heldout_gap"] == pytest.approx(
        result["metrics"]["adamw_4bit"]["heldout_gap"]
    )
    # --reference takes the gaps against another optimizer (Muon's runs)
    swapped = train_lm_long.main(
        ["--merge", str(out), "--reference", "adamw_4bit", "--out", str(out)]
    )
    gap = merged["metrics"]["adamw_4bit"]["heldout_gap"]
    assert swapped["meta"]["reference"] == "adamw_4bit"
    assert "heldout_gap" not in swapped["metrics"]["adamw_4bit"]
    assert swapped["metrics"]["adamw_fp32"]["heldout_gap"] == pytest.approx(
        1 / (1 + gap) - 1
    )
    assert "vs adamw_4bit" in train_lm_long.table(swapped)
    b["meta"] = dict(b["meta"], steps=999)
    paths[1].write_text(json.dumps(b))
    with pytest.raises(ValueError, match="steps"):
        train_lm_long.merge(list(map(str, paths)))


def test_eval_schedule_has_quarters():
    points = train_lm_long.eval_schedule(10_000, 250, 1000)
    assert points == sorted({*range(1000, 10_001, 1000), 2500, 7500})


# --------------------------------------------------------------------------
# regression_tasks.
# --------------------------------------------------------------------------


@SLOW
def test_regression_quick(tmp_path):
    out = tmp_path / "regression.json"
    args = ["--quick", "--optimizers", "adamw_fp32,adamw_4bit", "--steps", "50"]
    result = regression_tasks.main([*args, "--final-window", "10", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["meta"]["b2"] == 0.999 and saved["meta"]["steps"] == 50
    assert {(r["task"], r["optimizer"]) for r in result["records"]} == {
        (t, o) for t in regression_tasks.TASKS for o in ("adamw_fp32", "adamw_4bit")
    }
    for r in result["records"]:
        assert _finite(r["mean"]) and r["mean"] > 0 and len(r["per_seed"]) == 2
        assert _finite(r["ratio_to_fp32"]) and isinstance(r["within_2x"], bool)
    for task in regression_tasks.TASKS:
        for r in result["results"][task]:
            curve = np.asarray(r["curve"])
            assert curve.shape == (5, 2) and np.all(np.isfinite(curve))
            assert np.all(curve[-1] < curve[0])  # the loss falls
    assert out.with_suffix(".png").stat().st_size > 0
