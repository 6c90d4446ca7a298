"""Small Flax NNX models for benchmarks, tests and the demo.

* ``MLP``: a ReLU classifier for digits / Fashion-MNIST (flattened images).
* ``ResNet``: a small residual CNN for 28x28 grey images (Fashion-MNIST).
* ``TinyGPT``: a GPT-style byte-level decoder (pre-LayerNorm, causal
  self-attention, learned positions, tied or untied output head). The token
  embedding lives at param path ``("embed", "embedding")`` and the positions at
  ``("pos_embed",)``, so a state policy can recognise embeddings by "embed".

Losses are plain functions of ``(model, batch)``, ready for ``nnx.value_and_grad``.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

_INIT_STD = 0.02


class MLP(nnx.Module):
    """ReLU multilayer perceptron: ``(batch, in_features)`` to class logits."""

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int] = (256, 256),
        n_classes: int = 10,
        *,
        rngs: nnx.Rngs,
    ):
        sizes = [in_features, *hidden]
        self.layers = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(sizes)]
        )
        self.head = nnx.Linear(sizes[-1], n_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for layer in self.layers:
            x = jax.nn.relu(layer(x))
        return self.head(x)


class ResidualBlock(nnx.Module):
    """Pre-activation residual block: (GroupNorm, ReLU, 3x3 conv) x 2 + skip."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.norm1 = nnx.GroupNorm(channels, num_groups=8, rngs=rngs)
        self.conv1 = nnx.Conv(channels, channels, (3, 3), rngs=rngs)
        self.norm2 = nnx.GroupNorm(channels, num_groups=8, rngs=rngs)
        self.conv2 = nnx.Conv(
            channels, channels, (3, 3), kernel_init=nnx.initializers.zeros, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.relu(self.norm1(x)))
        return x + self.conv2(jax.nn.relu(self.norm2(h)))


class ResNet(nnx.Module):
    """A small ResNet for ``(batch, 784)`` or ``(batch, 28, 28)`` grey images.

    Stem 3x3 conv (stride 2, 28 -> 14), one residual block per stage, a
    stride-2 conv between stages (14 -> 7), global average pooling and a
    linear head. With ``widths=(64, 128)``: 0.48M parameters, every 3x3
    kernel of 36K-147K elements (the default policy quantizes them; their
    last axis is the output channels, one whole 64-element group or two).
    The last conv of each block starts at zero (the block starts as identity).
    """

    def __init__(
        self, widths: Sequence[int] = (64, 128), n_classes: int = 10, *, rngs: nnx.Rngs
    ):
        self.stem = nnx.Conv(1, widths[0], (3, 3), strides=2, rngs=rngs)
        blocks, downs = [], []
        for i, w in enumerate(widths):
            if i:
                downs.append(nnx.Conv(widths[i - 1], w, (3, 3), strides=2, rngs=rngs))
            blocks.append(ResidualBlock(w, rngs=rngs))
        self.blocks = nnx.List(blocks)
        self.downs = nnx.List(downs)
        self.norm = nnx.GroupNorm(widths[-1], num_groups=8, rngs=rngs)
        self.head = nnx.Linear(widths[-1], n_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], 28, 28, 1)
        x = self.stem(x)
        for i, block in enumerate(self.blocks):
            if i:
                x = self.downs[i - 1](x)
            x = block(x)
        x = jax.nn.relu(self.norm(x)).mean(axis=(1, 2))
        return self.head(x)


def classifier_loss(model: nnx.Module, x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of ``model(x)`` against integer labels ``y``."""
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def accuracy(model: nnx.Module, x: jax.Array, y: jax.Array) -> jax.Array:
    """Fraction of ``x`` whose arg-max logit equals ``y``."""
    return jnp.mean(jnp.argmax(model(x), axis=-1) == y)


class CausalSelfAttention(nnx.Module):
    """Multi-head causal self-attention with a fused QKV projection."""

    def __init__(self, d_model: int, n_heads: int, out_std: float, *, rngs):
        if d_model % n_heads:
            raise ValueError(
                f"d_model={d_model} must be a multiple of n_heads={n_heads}."
            )
        self.n_heads = n_heads
        init = nnx.initializers.normal(_INIT_STD)
        self.qkv = nnx.Linear(d_model, 3 * d_model, kernel_init=init, rngs=rngs)
        self.proj = nnx.Linear(
            d_model, d_model, kernel_init=nnx.initializers.normal(out_std), rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
        shape = (b, t, self.n_heads, d // self.n_heads)
        y = jax.nn.dot_product_attention(
            q.reshape(shape), k.reshape(shape), v.reshape(shape), is_causal=True
        )
        return self.proj(y.reshape(b, t, d))


class Block(nnx.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model: int, n_heads: int, n_layers: int, *, rngs):
        out_std = _INIT_STD / math.sqrt(2 * n_layers)  # GPT-2 residual scaling.
        self.ln1 = nnx.LayerNorm(d_model, rngs=rngs)
        self.attn = CausalSelfAttention(d_model, n_heads, out_std, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d_model, rngs=rngs)
        self.fc = nnx.Linear(
            d_model,
            4 * d_model,
            kernel_init=nnx.initializers.normal(_INIT_STD),
            rngs=rngs,
        )
        self.out = nnx.Linear(
            4 * d_model,
            d_model,
            kernel_init=nnx.initializers.normal(out_std),
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln1(x))
        return x + self.out(jax.nn.gelu(self.fc(self.ln2(x))))


class TinyGPT(nnx.Module):
    """GPT-style decoder over byte tokens.

    Args:
      vocab: vocabulary size (256 for bytes).
      d_model: width of the residual stream.
      n_layers: number of transformer blocks.
      n_heads: attention heads per block; must divide ``d_model``.
      seq_len: longest input; sizes the learned position table.
      tie_embeddings: if True, logits use the token embedding matrix;
        otherwise a separate ``head`` projection (no bias).
      rngs: ``nnx.Rngs`` for parameter initialisation.
    """

    def __init__(
        self,
        vocab: int = 256,
        d_model: int = 128,
        n_layers: int = 2,
        n_heads: int = 4,
        seq_len: int = 128,
        *,
        tie_embeddings: bool = False,
        rngs: nnx.Rngs,
    ):
        init = nnx.initializers.normal(_INIT_STD)
        self.seq_len = seq_len
        self.embed = nnx.Embed(vocab, d_model, embedding_init=init, rngs=rngs)
        self.pos_embed = nnx.Param(init(rngs.params(), (seq_len, d_model)))
        self.blocks = nnx.List(
            [Block(d_model, n_heads, n_layers, rngs=rngs) for _ in range(n_layers)]
        )
        self.ln_f = nnx.LayerNorm(d_model, rngs=rngs)
        self.head = (
            None
            if tie_embeddings
            else nnx.Linear(d_model, vocab, use_bias=False, kernel_init=init, rngs=rngs)
        )

    def hidden_states(self, tokens: jax.Array) -> list[jax.Array]:
        """The residual stream entering block 0 and leaving each block.

        Args:
          tokens: ``(batch, t)``, t <= seq_len.

        Returns:
          ``n_layers + 1`` arrays ``(batch, t, d_model)`` (IMPQ's LIM
          baseline compares consecutive ones).
        """
        t = tokens.shape[-1]
        if t > self.seq_len:
            raise ValueError(f"sequence length {t} exceeds seq_len={self.seq_len}.")
        out = [self.embed(tokens) + self.pos_embed[...][:t]]
        for block in self.blocks:
            out.append(block(out[-1]))
        return out

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Maps tokens ``(batch, t)``, t <= seq_len, to logits ``(batch, t, vocab)``."""
        x = self.ln_f(self.hidden_states(tokens)[-1])
        return self.embed.attend(x) if self.head is None else self.head(x)


def loss_fn(model: TinyGPT, tokens: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy (nats) on ``tokens`` of shape ``(batch, t + 1)``.

    Predicts ``tokens[:, 1:]`` from ``tokens[:, :-1]``.
    """
    logits = model(tokens[:, :-1])
    targets = tokens[:, 1:]
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def save_tinygpt(path: str, params: dict, **config: int) -> None:
    """Writes one `TinyGPT`'s parameters (an ``nnx.to_pure_dict``) to ``.npz``.

    Args:
      path: the file.
      params: the model's pure-dict state (unstacked: one model).
      **config: the `TinyGPT` constructor's sizes (``vocab``, ``d_model``,
        ``n_layers``, ``n_heads``, ``seq_len``), stored beside the arrays.
    """
    flat = {
        "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p): np.asarray(x)
        for p, x in jax.tree_util.tree_leaves_with_path(params)
    }
    np.savez(path, __config__=np.asarray(json.dumps(config)), **flat)


def load_tinygpt(path: str) -> TinyGPT:
    """The `TinyGPT` saved by `save_tinygpt`, its weights restored exactly."""
    with np.load(path) as z:
        config = json.loads(str(z["__config__"]))
        flat = {k: z[k] for k in z.files if k != "__config__"}
    model = TinyGPT(**config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    pure = nnx.to_pure_dict(state)

    def fill(p, x):
        key = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p)
        if key not in flat or flat[key].shape != x.shape:
            raise ValueError(f"{path}: no array of shape {x.shape} for {key!r}.")
        return jnp.asarray(flat[key], x.dtype)

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(fill, pure))
    return nnx.merge(graphdef, state)
