"""Writes the notebooks of this folder from the cell texts below.

The ``.ipynb`` files are generated, without outputs: edit the cells here and
run ``python notebooks/make_notebooks.py`` (it formats the cells with ruff).
CI executes every notebook with
``pytest --nbmake notebooks`` (small settings on CPU). The first cell of each
installs the package where it is not importable: from the repository checkout
the notebook runs in (CI, a clone), else (Colab) with the pip line it
documents (``OPTAX_LOWBIT_PIP``).
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import nbformat

HERE = pathlib.Path(__file__).resolve().parent

INSTALL = """\
# Installs optax_lowbit where it is not importable yet:
# * in a checkout of its repository (CI, a local clone), from that checkout: the
#   first folder above this notebook whose pyproject.toml names optax_lowbit;
# * elsewhere (Colab), with the pip line below. From your own copy of the
#   repository, set it to e.g.
#   optax_lowbit[{EXTRAS}] @ git+https://github.com/<owner>/<repo>
#   or upload a source archive and give its path: /content/optax_lowbit.zip
import importlib.util
import os
import pathlib
import subprocess
import sys

COLAB_PIP = os.environ.get("OPTAX_LOWBIT_PIP", "optax_lowbit[{EXTRAS}]")


def find_checkout(start):
    for folder in (start, *start.parents):
        toml = folder / "pyproject.toml"
        if toml.is_file() and 'name = "optax_lowbit"' in toml.read_text():
            return folder
    return None


if importlib.util.find_spec("optax_lowbit") is None:
    checkout = find_checkout(pathlib.Path.cwd().resolve())
    target = COLAB_PIP if checkout is None else f"{checkout}[{EXTRAS}]"
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", target])"""


def install(extras: str) -> str:
    return INSTALL.replace("{EXTRAS}", extras)


# scikit-learn's digits and a one-hidden-layer MLP as a plain parameter dict
# (codecs.ipynb captures its Adam moments, migrate.ipynb checkpoints its run).
DIGITS_MLP = """\
digits = load_digits()
x = jnp.asarray(digits.data / 16.0, jnp.float32)
y = jnp.asarray(digits.target)
key = jax.random.PRNGKey(0)
k1, k2 = jax.random.split(key)
params = {
    "w1": jax.random.normal(k1, (64, 256)) * 0.1, "b1": jnp.zeros(256),
    "w2": jax.random.normal(k2, (256, 10)) * 0.1, "b2": jnp.zeros(10),
}


def loss_fn(p, x, y):
    h = jax.nn.relu(x @ p["w1"] + p["b1"])
    logits = h @ p["w2"] + p["b2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
"""

QUICKSTART = [
    (
        "md",
        """\
# optax_lowbit quickstart: the one-line swap

A Flax NNX training loop with `optax.adamw`, then the same loop with
`lowbit.adamw_polar`, whose Adam moments are stored at 2 bits per element (2.25
all-in, codes plus scales) instead of 32. Data: scikit-learn's handwritten digits
(real 8x8 images, shipped with scikit-learn, no download). Runs on a CPU in about a
minute.""",
    ),
    ("code", install("notebooks")),
    (
        "code",
        """\
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

import optax_lowbit as lowbit

digits = load_digits()
x = (digits.data / 16.0).astype(np.float32)
y = digits.target.astype(np.int32)
perm = np.random.default_rng(0).permutation(len(x))
x, y = x[perm], y[perm]
x_train, y_train, x_test, y_test = x[:1500], y[:1500], x[1500:], y[1500:]
print(x_train.shape, x_test.shape)""",
    ),
    (
        "code",
        """\
class MLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(64, 256, rngs=rngs)
        self.l2 = nnx.Linear(256, 256, rngs=rngs)
        self.l3 = nnx.Linear(256, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.l1(x))
        x = nnx.relu(self.l2(x))
        return self.l3(x)


def loss_fn(model, x, y):
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@nnx.jit
def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    return loss


def train(tx, steps=300, batch=128, seed=0):
    model = MLP(nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(steps):
        idx = rng.integers(0, len(x_train), batch)
        losses.append(float(train_step(model, optimizer, x_train[idx], y_train[idx])))
    accuracy = float((model(x_test).argmax(-1) == y_test).mean())
    return model, optimizer, np.array(losses), accuracy""",
    ),
    (
        "md",
        "Plain Optax first, then the one-line swap (everything else is unchanged):",
    ),
    (
        "code",
        """\
_, _, loss_fp32, acc_fp32 = train(optax.adamw(3e-3, weight_decay=1e-4))
model, optimizer, loss_polar, acc_polar = train(
    lowbit.adamw_polar(3e-3, weight_decay=1e-4)  # <- the swap
)
print(f"test accuracy: optax.adamw {acc_fp32:.3f}, adamw_polar {acc_polar:.3f}")""",
    ),
    (
        "md",
        """\
What the optimizer state holds: the two big weight matrices' moments are packed
polar codes (0.28 B per element and moment); the biases and the small output layer
stay in float32 (`lowbit.policy`: leaves of rank < 2 or under 4096 elements gain
little and are cheap).""",
    ),
    (
        "code",
        """\
print(lowbit.summary(optimizer.opt_state, nnx.state(model, nnx.Param)))""",
    ),
    (
        "code",
        """\
def smooth(a, k=20):
    return np.convolve(a, np.ones(k) / k, mode="valid")


plt.figure(figsize=(7, 3.5))
plt.plot(smooth(loss_fp32), label=f"optax.adamw fp32 (test acc {acc_fp32:.3f})")
plt.plot(smooth(loss_polar), label=f"adamw_polar 2-bit (test acc {acc_polar:.3f})")
plt.yscale("log")
plt.xlabel("step")
plt.ylabel("training loss (20-step mean)")
plt.legend()
plt.show()""",
    ),
    (
        "md",
        """\
Next: `codecs.ipynb` (what the codecs do), `migrate.ipynb` (resume an
`optax.adamw` checkpoint with low-bit states), `impq.ipynb` (mixed-precision weight
quantization of an LLM).""",
    ),
]

CODECS = [
    (
        "md",
        """\
# What the codecs do

Each codec packs a tensor in groups along its last axis: codes in `uint8` plus one or
a few scales per group. Polar codes **pairs** of elements `(x[j], x[j + 32])` of a
64-element group jointly, as a point on a small 2D codebook (rings times sectors), in
polar form; π-Quant codes a pair as one index into 100 codewords; the blockwise
baselines code each element alone (8-bit dynamic map, 4-bit).""",
    ),
    ("code", install("notebooks")),
    (
        "code",
        """\
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from sklearn.datasets import load_digits

from optax_lowbit import codecs""",
    ),
    ("md", "## The codebooks (scale 1)"),
    (
        "code",
        """\
books = {
    "polar 2-bit, signed (m)": codecs.polar(bits=2, signed=True),
    "polar 1.5-bit, signed (m)": codecs.polar(bits=1.5, signed=True),
    "polar 2-bit, first quadrant (v)": codecs.polar(bits=2, signed=False),
    "pi-Quant (nearest), signed": codecs.piquant(signed=True),
}
fig, axes = plt.subplots(1, len(books), figsize=(14, 3.6))
for ax, (name, codec) in zip(axes, books.items(), strict=True):
    book = codec.codewords if hasattr(codec, "codewords") else codec.codebook
    pts = np.asarray(book())
    ax.scatter(pts[:, 0], pts[:, 1], s=12)
    bits = codec.bits_per_element
    ax.set_title(f"{name}\\n{len(pts)} codewords, {bits:.2f} bits", fontsize=9)
    ax.set_aspect("equal")
    ax.axhline(0, color="0.8", lw=0.5)
    ax.axvline(0, color="0.8", lw=0.5)
plt.tight_layout()
plt.show()""",
    ),
    (
        "md",
        """\
## Real moment pairs

Train a small MLP on scikit-learn's digits with fp32 `optax.adamw`, take Adam's
first moment of the first layer and draw its pairs `(m[j], m[j + 32])`, each divided
by its group's largest magnitude, as the codec sees them. The first moment is close
to circularly symmetric, which is what the polar codebook assumes.""",
    ),
    (
        "code",
        DIGITS_MLP
        + """\


tx = optax.adam(1e-3)
state = tx.init(params)


@jax.jit
def step(params, state, i):
    idx = jax.random.randint(jax.random.fold_in(key, i), (128,), 0, x.shape[0])
    grads = jax.grad(loss_fn)(params, x[idx], y[idx])
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state


for i in range(200):
    params, state = step(params, state, i)
m = np.asarray(state[0].mu["w1"])  # (64, 256): groups of 64 along the last axis
v = np.asarray(state[0].nu["w1"])
groups = m.reshape(-1, 64)
scale = np.abs(groups).max(1, keepdims=True)
pairs = np.stack([groups[:, :32] / scale, groups[:, 32:] / scale], -1).reshape(-1, 2)
plt.figure(figsize=(4, 4))
plt.scatter(pairs[:, 0], pairs[:, 1], s=1, alpha=0.3)
plt.gca().set_aspect("equal")
plt.title("Adam m pairs, max-normalised per group")
plt.show()""",
    ),
    (
        "md",
        """\
## Error against all-in bits, for every codec

Relative L2 error of one encode/decode round trip of these real moments (first
moment with the signed codecs, second moment with the unsigned ones), against each
codec's honest all-in bits per element (codes plus scales).""",
    ),
    (
        "code",
        """\
def rel_err(codec, a):
    a = jnp.asarray(a)
    back = codec.decode(codec.encode(a))
    return float(jnp.linalg.norm(back - a) / jnp.linalg.norm(a))


rows = []
for name, make in [
    ("bf16", lambda s: codecs.identity("bfloat16")),
    ("blockwise8", lambda s: codecs.blockwise8(signed=s)),
    ("blockwise4", lambda s: codecs.blockwise4(signed=s)),
    ("pi-Quant", lambda s: codecs.piquant(signed=s)),
    ("polar 2-bit", lambda s: codecs.polar(bits=2, signed=s)),
    ("polar 1.5-bit", lambda s: codecs.polar(bits=1.5, signed=s)),
]:
    c_m, c_v = make(True), make(False)
    rows.append((name, c_m.bits_per_element, rel_err(c_m, m), rel_err(c_v, v)))
print(f"{'codec':14s} {'bits':>6s} {'err m':>7s} {'err v':>7s}")
for name, bits, em, ev in rows:
    print(f"{name:14s} {bits:6.3f} {em:7.3f} {ev:7.3f}")
plt.figure(figsize=(6, 3.5))
for name, bits, em, ev in rows:
    plt.scatter(bits, em, color="tab:blue")
    plt.scatter(bits, ev, color="tab:orange", marker="s")
    plt.annotate(name, (bits, em), fontsize=8)
plt.xscale("log", base=2)
plt.yscale("log")
plt.xlabel("all-in bits per element")
plt.ylabel("relative L2 error")
plt.legend(["first moment m", "second moment v"], loc="lower left")
plt.show()""",
    ),
    (
        "md",
        """\
Low error is not the whole story: what matters in training is the error of the Adam
direction `m / sqrt(v)`, and that an under-estimated `v` never blows it up. The
README's codec table and `benchmarks/codec_error.py` measure both on a language
model's moments.""",
    ),
]

IMPQ = [
    (
        "md",
        """\
# IMPQ: which transformer blocks get how many bits

IMPQ (arXiv 2509.15455) treats the blocks of an LLM as players of a cooperative game
and picks per-block widths under an average budget (code bits per weight) with an
exact integer program. Our version plays the game at the budget's operating point:
each block is at the higher of the two widths around the budget with the probability
the budget allows, a coalition's value is minus the KL divergence of the quantized
model's predictions from the full-precision ones, and a quadratic surrogate fitted on
sampled coalitions gives each block's value and the pairwise interactions. Here: a
small Llama trained for seconds on the CPU on real text (the source code of Optax,
which is installed with this package), then IMPQ and its baselines at three budgets.
For SmolLM2-135M on a GPU, see the README's IMPQ section and
`python -m optax_lowbit.impq --model smollm2`.""",
    ),
    ("code", install("notebooks")),
    (
        "code",
        """\
import dataclasses
import pathlib

import jax
import matplotlib.pyplot as plt
import numpy as np
import optax

from optax_lowbit.impq import model as impq_model
from optax_lowbit.impq import pipeline

sources = sorted(pathlib.Path(optax.__file__).parent.rglob("*.py"))
text = b"".join(p.read_bytes() for p in sources)
ids = np.frombuffer(text, np.uint8)
cut = int(0.9 * len(ids))
train_ids, held_ids = ids[:cut], ids[cut:]
print(f"{len(ids) / 1e6:.1f} MB of text")""",
    ),
    (
        "code",
        """\
m = impq_model.tiny_llama(n_layers=4, d_model=64, d_ff=128)
tx = optax.adam(3e-3)
params = m.params
opt_state = tx.init(params)


@jax.jit
def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(m.loss)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


rng = np.random.default_rng(0)
for _ in range(200):
    starts = rng.integers(0, len(train_ids) - 65, 16)
    batch = np.stack([train_ids[s : s + 65] for s in starts]).astype(np.int32)
    params, opt_state, loss = step(params, opt_state, batch)
print(f"final training loss {float(loss):.3f} nats/byte")
trained = dataclasses.replace(m, params=params)""",
    ),
    (
        "code",
        """\
calib = pipeline.windows(train_ids[:20_000], 256, 64)
held = pipeline.windows(held_ids, 1024, 64)
report = pipeline.run(
    trained,
    calib,
    held,
    budgets=(2.5, 3.0, 3.5),
    methods=(
        "impq", "impq_noint", "uniform", "isolated", "fisher", "lim", "random", "greedy"
    ),
    n_samples=200,
    n_random=2,
    batch_size=8,
)
print(f"full-precision perplexity {report['reference_ppl']:.3f}")""",
    ),
    (
        "code",
        """\
g = next(g for g in report["games"] if g["budget_bits"] == 2.5)
plt.figure(figsize=(6, 3))
plt.bar(range(len(g["phi"])), g["phi"])
plt.xlabel("block")
plt.ylabel("value (-KL gained at hi, nats)")
plt.title(
    f"game at 2.5 bits: {g['lo']} vs {g['hi']} bits, p = {g['p']:.2f}, "
    f"{g['n_samples']} coalitions, surrogate R² {g['heldout_r2']:.2f}"
)
plt.show()""",
    ),
    (
        "code",
        """\
methods = sorted({r["method"] for r in report["records"]})
budgets = sorted({r["budget_bits"] for r in report["records"]})
print("bits per block at 3.0 bits:")
for r in report["records"]:
    if r["budget_bits"] == 3.0:
        print(f"  {r['method']:9s} {r['bits_per_block']}  ppl {r['ppl']:.3f}")
plt.figure(figsize=(6, 3.5))
for meth in methods:  # random: the mean of its draws
    ppl = [np.mean([r["ppl"] for r in report["records"]
                    if r["method"] == meth and r["budget_bits"] == b])
           for b in budgets]
    plt.plot(budgets, ppl, marker="o", label=meth)
plt.axhline(report["reference_ppl"], color="k", ls=":", label="full precision")
plt.yscale("log")
plt.xlabel("budget (code bits per weight)")
plt.ylabel("held-out perplexity")
plt.legend(fontsize=8)
plt.show()""",
    ),
    (
        "md",
        """\
The allocation exports as ordered path-regex rules, the form qwix and MaxText take:""",
    ),
    (
        "code",
        """\
at_3 = [r for r in report["records"] if r["budget_bits"] == 3.0]
best = min(at_3, key=lambda r: r["ppl"])
print(best["method"], best["rules"][:3], "...")""",
    ),
]

MIGRATE = [
    (
        "md",
        """\
# Resume an `optax.adamw` checkpoint with low-bit states

A run trained with `optax.adamw` and saved with Orbax; we restore it, convert its
optimizer state to `lowbit.adamw_polar` (2-bit moments) with `lowbit.convert`, save
the smaller state, restore that, and keep training. The conversion re-encodes Adam's
`mu` and `nu` (lossy once) and keeps the step count, so the schedule and bias
correction continue where they were.""",
    ),
    ("code", install("notebooks")),
    (
        "code",
        """\
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from sklearn.datasets import load_digits

import optax_lowbit as lowbit

"""
        + DIGITS_MLP
        + """

def make_step(tx):
    @jax.jit
    def step(params, state, i):
        idx = jax.random.randint(jax.random.PRNGKey(i), (128,), 0, x.shape[0])
        loss, grads = jax.value_and_grad(loss_fn)(params, x[idx], y[idx])
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss
    return step


def train(tx, params, state, start, n):
    step, losses = make_step(tx), []
    for i in range(start, start + n):
        params, state, loss = step(params, state, i)
        losses.append(float(loss))
    return params, state, losses""",
    ),
    ("md", "## 1. The existing run: `optax.adamw`, saved with Orbax"),
    (
        "code",
        """\
schedule = optax.cosine_decay_schedule(3e-3, 400)
fp32_tx = optax.adamw(schedule, weight_decay=1e-4)
params, state, losses_a = train(fp32_tx, params, fp32_tx.init(params), 0, 200)
root = tempfile.mkdtemp()
ckpt = ocp.StandardCheckpointer()
ckpt.save(f"{root}/adamw_step200", {"params": params, "opt_state": state})
ckpt.wait_until_finished()
print(f"loss at step 200: {np.mean(losses_a[-20:]):.4f}")""",
    ),
    ("md", "## 2. Restore it and convert the optimizer state"),
    (
        "code",
        """\
target = {
    "params": jax.eval_shape(lambda: params),
    "opt_state": jax.eval_shape(fp32_tx.init, params),
}
restored = ckpt.restore(f"{root}/adamw_step200", target)
polar_tx = lowbit.adamw_polar(schedule, weight_decay=1e-4)
polar_state = lowbit.convert(restored["opt_state"], polar_tx, restored["params"])
print(lowbit.summary(restored["opt_state"], restored["params"]))
print()
print(lowbit.summary(polar_state, restored["params"]))""",
    ),
    (
        "md",
        """\
## 3. Save the low-bit state, restore it, continue

A packed state is an ordinary pytree of `uint8` codes and scales: Orbax saves and
restores it bit for bit against `jax.eval_shape(polar_tx.init, params)`.""",
    ),
    (
        "code",
        """\
ckpt.save(
    f"{root}/polar_step200", {"params": restored["params"], "opt_state": polar_state}
)
ckpt.wait_until_finished()
again = ckpt.restore(
    f"{root}/polar_step200",
    {"params": target["params"], "opt_state": jax.eval_shape(polar_tx.init, params)},
)
same = all(
    np.array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(
        jax.tree.leaves(again["opt_state"]), jax.tree.leaves(polar_state), strict=True
    )
)
print("restored bit for bit:", same)
_, _, losses_polar = train(polar_tx, again["params"], again["opt_state"], 200, 200)
_, _, losses_fp32 = train(fp32_tx, restored["params"], restored["opt_state"], 200, 200)
print(f"loss at step 400: adamw {np.mean(losses_fp32[-20:]):.4f}, "
      f"adamw_polar after the switch {np.mean(losses_polar[-20:]):.4f}")
ckpt.close()""",
    ),
    (
        "code",
        """\
import matplotlib.pyplot as plt

plt.figure(figsize=(6, 3.5))
plt.plot(range(200), losses_a, label="optax.adamw (steps 0-200)")
plt.plot(range(200, 400), losses_fp32, label="optax.adamw, continued")
plt.plot(range(200, 400), losses_polar, label="converted to adamw_polar")
plt.yscale("log")
plt.xlabel("step")
plt.ylabel("training loss")
plt.legend()
plt.show()""",
    ),
]


def write(name: str, cells: list[tuple[str, str]]) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.cells = [
        nbformat.v4.new_markdown_cell(src)
        if kind == "md"
        else nbformat.v4.new_code_cell(src)
        for kind, src in cells
    ]
    path = HERE / f"{name}.ipynb"
    nbformat.write(nb, path)
    # the cells as the project's formatter writes them (CI checks it)
    subprocess.run(
        [sys.executable, "-m", "ruff", "format", "-q", str(path)], check=True
    )


def main() -> None:
    for name, cells in (
        ("quickstart", QUICKSTART),
        ("codecs", CODECS),
        ("impq", IMPQ),
        ("migrate", MIGRATE),
    ):
        write(name, cells)
        print(f"wrote notebooks/{name}.ipynb")


if __name__ == "__main__":
    main()
