"""The inputs of every linear layer of a block, through the ``matmul`` hook.

GPTQ needs, for each linear layer ``y = x @ w``, the Gram matrix ``X^T X``
of the layer's inputs over calibration tokens. The SmolLM2 port
(`optax_lowbit.impq.smollm2`) sends every linear layer through one
``matmul(x, w)`` hook; `block_grams` runs a block with its quantizable
kernels wrapped in `Tagged` leaves (carrying their path, e.g. ``"attn/q"``)
and a hook that records each tagged layer's input, all inside one trace, and
returns the block's output with ``{path: X^T X}``. Layers that read the same
input (q, k, v; gate, up) share one product.

Examples:
  >>> import jax.numpy as jnp
  >>> from optax_lowbit.impq import capture, model
  >>> m = model.tiny_llama(n_layers=2, d_model=128, d_ff=256)
  >>> cfg = m.loss.keywords["config"]
  >>> x = jnp.ones((1, 8, 128))
  >>> out, grams = capture.block_grams(x, m.params["blocks"][0], cfg)
  >>> sorted(grams)
  ['attn/k', 'attn/o', 'attn/q', 'attn/v', 'mlp/down', 'mlp/gate', 'mlp/up']
  >>> grams["mlp/down"].shape
  (256, 256)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from optax_lowbit.impq import quantizer, smollm2


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Tagged:
    """A kernel leaf that carries its path, so that a ``matmul`` hook knows it.

    Attributes:
      value: the kernel (an array or a `quantizer.QuantizedWeight`).
      name: its path in the block, e.g. ``"mlp/down"`` (static).
    """

    value: Any
    name: str = dataclasses.field(metadata={"static": True})


def tag(
    block: Any,
    include: Callable[[str, Any], bool] = quantizer.is_linear_weight,
) -> Any:
    """Wraps the leaves of ``block`` that ``include`` selects in `Tagged`.

    Args:
      block: one block's params.
      include: ``include(path, leaf)``, as `quantizer.quantize_tree` takes.

    Returns:
      The block with selected leaves replaced by ``Tagged(leaf, path)``.
    """

    def one(path, leaf):
        name = quantizer.path_str(path)
        return Tagged(leaf, name) if include(name, leaf) else leaf

    return jax.tree_util.tree_map_with_path(one, block)


def recording_matmul(record: dict[str, jax.Array]) -> smollm2.Matmul:
    """A ``matmul`` hook that stores the input of each `Tagged` layer.

    Args:
      record: filled with ``{name: x}`` as the model calls the hook (use it
        inside the trace that calls the model, and return what you need).

    Returns:
      ``matmul(x, w)``: ``x @ w`` (dequantizing a `quantizer.QuantizedWeight`).
    """

    def matmul(x: jax.Array, w: Any) -> jax.Array:
        if isinstance(w, Tagged):
            record[w.name] = x
            w = w.value
        return quantizer.qmatmul(x, w)

    return matmul


@functools.partial(jax.jit, static_argnames=("config", "include"))
def block_grams(
    x: jax.Array,
    block: Any,
    config: smollm2.Config,
    include: Callable[[str, Any], bool] = quantizer.is_linear_weight,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Runs one Llama block and returns each linear layer's input Gram matrix.

    Args:
      x: ``(batch, t, d_model)`` residual stream entering the block.
      block: the block's params (arrays or `quantizer.QuantizedWeight`).
      config: hyperparameters (static).
      include: the quantized-leaf filter (static).

    Returns:
      ``(out, grams)``: the block's output and ``{path: X^T X}`` float32
      ``(in, in)``, ``X`` the layer's ``batch * t`` input rows (full float32
      precision on every backend).
    """
    record: dict[str, jax.Array] = {}
    out = smollm2.block(
        x,
        tag(block, include),
        smollm2.rope_tables(x.shape[1], config, x.dtype),
        config,
        recording_matmul(record),
    )
    grams, seen = {}, {}
    for name, inp in record.items():
        key = id(inp)  # q/k/v and gate/up read the same traced input.
        if key not in seen:
            rows = inp.reshape(-1, inp.shape[-1]).astype(jnp.float32)
            seen[key] = jnp.matmul(rows.T, rows, precision=jax.lax.Precision.HIGHEST)
        grams[name] = seen[key]
    return out, grams
