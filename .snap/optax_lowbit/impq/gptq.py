r"""GPTQ: second-order weight quantization of each linear layer, in JAX.

A linear layer ``y = x @ w`` (``w`` of shape ``(in, out)``; GPTQ's weight is
``W = w.T``, one row per output) is quantized column by column of ``W``
(one input at a time) to minimise ``||X W^T - X \hat W^T||^2`` over
calibration inputs ``X``. With the Hessian ``H = 2 X^T X`` (`hessian`;
scaled here by ``1 / n_rows``, which changes nothing since the damping is
relative), damped by ``damp * mean(diag H)``, and ``U`` the upper Cholesky
factor of ``H^{-1}`` (``H^{-1} = U^T U``), quantizing column ``j`` to
``q_j`` moves the columns not yet quantized by::

    err = (W[:, j] - q_j) / U[j, j]
    W[:, k] -= err * U[j, k]        for k > j

Updates are lazy and batched as in the paper: inside a block of
``block_size`` (128) columns they are applied column by column, and to the
columns after the block once, as one ``(out, 128) @ (128, in)`` product (the
rows of ``U`` are zero before the block). Blocks run in one ``fori_loop``
(one compilation per layer shape), the last one padded with uncoupled
zero columns.
With ``act_order``, columns are visited by decreasing ``diag H`` and the codes
put back in input order at the end.

Columns are quantized with the group quantizer of
`optax_lowbit.impq.quantizer` (`quantizer.group_grid`, `quantizer.encode`,
the same code as RTN): groups of ``group_size`` (64) consecutive inputs of one
row, MSE-clipped grid. A group's scale and zero are fixed when the first of
its columns is reached, from its columns' values at that moment (the
reference implementation's behaviour without static groups); we read them
with every update so far applied, which is what a GPTQ without lazy batching
sees (the reference code reads the block-start copy for a group that begins
inside a block). Groups are defined in input order with or without
``act_order``, so the packed layout (`quantizer.pack`, ``rows=True``) is that
of RTN and every `quantizer.QuantizedWeight` reader works unchanged.

With ``H = I`` no column moves and GPTQ is exactly RTN on the same grid.

`quantize_model` runs GPTQ on a whole Llama-port model (SmolLM2) block by
block, sequentially: the Hessians of block ``l`` come from the outputs of
blocks ``0 .. l-1`` already quantized, as in the paper.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from optax_lowbit.impq import gptq, quantizer
  >>> x = jax.random.normal(jax.random.key(0), (256, 128))
  >>> w = jax.random.normal(jax.random.key(1), (128, 32))
  >>> res = gptq.gptq(w, gptq.hessian(x), 3)
  >>> res.weight.bits, res.weight.shape, res.weight.code_bits_per_element
  (3, (128, 32), 3.0)
  >>> bool(jnp.all(quantizer.dequantize(res.weight) == res.w_hat))
  True

References:
  Frantar, Ashkboos, Hoefler and Alistarh, `GPTQ: Accurate Post-Training
  Quantization for Generative Pre-trained Transformers
  <https://arxiv.org/abs/2210.17323>`_, 2022 (ICLR 2023).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_lowbit.impq import capture, quantizer, smollm2

BLOCK_SIZE = 128
DAMP = 0.01

_HIGHEST = jax.lax.Precision.HIGHEST


class GPTQResult(NamedTuple):
    """A layer quantized by `gptq`.

    Attributes:
      weight: the packed `quantizer.QuantizedWeight` (``rows=True``).
      w_hat: its dequantized ``(in, out)`` float32 kernel (equal to
        ``quantizer.dequantize(weight)``).
      loss: GPTQ's proxy loss ``sum_j ||W[:, j] - q_j||^2 / (2 U[j, j]^2)``.
    """

    weight: quantizer.QuantizedWeight
    w_hat: jax.Array
    loss: jax.Array


def hessian(x: jax.Array) -> jax.Array:
    """``H = 2 X^T X / n`` of calibration inputs ``x`` ``(..., in)``.

    Args:
      x: the layer's inputs; every axis but the last is a row of ``X``.

    Returns:
      ``(in, in)`` float32 (full float32 precision on every backend).
    """
    rows = jnp.asarray(x, jnp.float32).reshape(-1, x.shape[-1])
    gram = jnp.matmul(rows.T, rows, precision=_HIGHEST)
    return 2.0 * gram / rows.shape[0]


def _check(w, h, bits, group_size, block_size, damp) -> None:
    quantizer.check_bits(bits)
    quantizer.check_group_size(group_size)
    if getattr(w, "ndim", None) != 2:
        raise ValueError(
            f"gptq takes a 2-D (in, out) kernel, got shape {getattr(w, 'shape', None)}."
        )
    n_in = w.shape[0]
    if getattr(h, "shape", None) != (n_in, n_in):
        raise ValueError(
            f"h must be the ({n_in}, {n_in}) Hessian of the kernel's inputs, "
            f"got shape {getattr(h, 'shape', None)}."
        )
    if n_in % group_size:
        raise ValueError(
            f"gptq needs groups inside a row: the input dimension {n_in} must be "
            f"a multiple of group_size={group_size}."
        )
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be a positive int, got {block_size!r}.")
    if block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size}.")
    if not (isinstance(damp, int | float) and damp > 0):
        raise ValueError(f"damp must be a positive number, got {damp!r}.")


def gptq(
    w: jax.Array,
    h: jax.Array,
    bits: int,
    *,
    group_size: int = quantizer.GROUP_SIZE,
    clip: Sequence[float] | None = quantizer.CLIP_RATIOS,
    block_size: int = BLOCK_SIZE,
    damp: float = DAMP,
    act_order: bool = False,
) -> GPTQResult:
    """Quantizes one ``(in, out)`` kernel with GPTQ.

    Args:
      w: the kernel, applied as ``x @ w``.
      h: ``(in, in)`` Hessian of its inputs, e.g. `hessian` of calibration
        inputs (any positive multiple of ``X^T X``: the damping is relative).
      bits: code width, one of 2, 3, 4, 8.
      group_size: inputs per group (must divide ``in``).
      clip: shrink factors searched per group (`quantizer.group_grid`);
        ``None``: min/max.
      block_size: columns per lazy batch.
      damp: ``damp * mean(diag H)`` is added to the diagonal.
      act_order: visit columns by decreasing ``diag H``.

    Returns:
      A `GPTQResult`. Inputs whose ``diag H`` is 0 (never active) have their
      weights set to 0 before quantization, as in the reference code.

    Raises:
      ValueError: for a bad width, group size, block size, damping or shapes.
    """
    _check(w, h, bits, group_size, block_size, damp)
    ratios = quantizer.check_clip(clip)
    q, scale, zero, loss = _gptq(
        jnp.asarray(w, jnp.float32),
        jnp.asarray(h, jnp.float32),
        bits=int(bits),
        group_size=group_size,
        clip=ratios,
        block_size=block_size,
        damp=float(damp),
        act_order=bool(act_order),
    )
    n_in, n_out = w.shape
    groups = q.reshape(n_out * (n_in // group_size), group_size)
    weight = quantizer.pack(
        groups,
        scale.reshape(-1),
        zero.reshape(-1),
        (n_in, n_out),
        int(bits),
        group_size=group_size,
        rows=True,
    )
    w_hat = quantizer.from_groups(
        quantizer.decode(groups, weight.scale[:, None], weight.zero[:, None]),
        (n_in, n_out),
        group_size,
    )
    return GPTQResult(weight, w_hat, loss)


@functools.partial(
    jax.jit,
    static_argnames=("bits", "group_size", "clip", "block_size", "damp", "act_order"),
)
def _gptq(w, h, *, bits, group_size, clip, block_size, damp, act_order):
    """Returns codes ``(out, in)``, scales and zeros ``(out, in / g)``, loss."""
    W = w.T  # (rows, cols) = (out, in)
    n_rows, n_cols = W.shape
    n_groups = n_cols // group_size
    diag = jnp.diagonal(h)
    dead = diag == 0
    h = h + jnp.diag(jnp.where(dead, 1.0, 0.0))
    W = jnp.where(dead[None, :], 0.0, W)
    if act_order:
        perm = jnp.argsort(-jnp.diagonal(h), stable=True)
    else:
        perm = jnp.arange(n_cols)
    inv = jnp.argsort(perm)  # inv[c]: position of input c
    W = W[:, perm]
    h = h[perm][:, perm]
    h = h + damp * jnp.mean(jnp.diagonal(h)) * jnp.eye(n_cols, dtype=h.dtype)
    chol = jnp.linalg.cholesky(h)
    h_inv = jax.scipy.linalg.cho_solve((chol, True), jnp.eye(n_cols, dtype=h.dtype))
    U = jnp.linalg.cholesky(h_inv).T  # upper: h_inv = U^T U
    U = jnp.triu(U)

    # Pad to whole blocks: padding columns sit after every real one, with
    # U = I there (no coupling) and a dummy group (index n_groups) whose grid
    # is 0, so they quantize to 0 with no error and move nothing.
    block = min(block_size, n_cols)
    n_blocks = -(-n_cols // block)
    pad = n_blocks * block - n_cols
    pos_all = jnp.arange(n_cols)
    group_of = perm // group_size  # group of the column at each position
    first = jnp.full((n_groups,), n_cols).at[group_of].min(pos_all)
    is_first = first[group_of] == pos_all
    group_pos = inv.reshape(n_groups, group_size)  # positions of each group
    if pad:
        W = jnp.pad(W, ((0, 0), (0, pad)))
        U = jnp.pad(U, ((0, pad), (0, pad))) + jnp.diag(
            jnp.arange(n_cols + pad) >= n_cols
        ).astype(U.dtype)
        group_of = jnp.concatenate([group_of, jnp.full((pad,), n_groups)])
        is_first = jnp.concatenate([is_first, jnp.zeros((pad,), bool)])

    def block_body(b, carry):
        W, Q, scale, zero, loss = carry
        i1 = b * block
        U_rows = jax.lax.dynamic_slice_in_dim(U, i1, block, axis=0)
        U1 = jax.lax.dynamic_slice_in_dim(U_rows, i1, block, axis=1)
        W_start = W  # every update from earlier blocks applied

        def body(i, carry):
            W1, Err1, Q1, scale, zero, loss = carry
            j = i1 + i
            g = group_of[j]

            def refresh(sz):
                pos = group_pos[g]  # (group_size,) positions, all >= j
                pending = jnp.matmul(Err1, U_rows[:, pos], precision=_HIGHEST)
                vals = W_start[:, pos] - pending
                s, z = quantizer.group_grid(vals, bits, clip)
                return sz[0].at[:, g].set(s), sz[1].at[:, g].set(z)

            scale, zero = jax.lax.cond(
                is_first[j], refresh, lambda sz: sz, (scale, zero)
            )
            col = W1[:, i]
            d = U1[i, i]
            s, z = scale[:, g], zero[:, g]
            q = quantizer.encode(col, s, z, bits)
            diff = col - quantizer.decode(q, s, z)
            err = diff / d
            W1 = W1 - err[:, None] * U1[i][None, :]
            Err1 = Err1.at[:, i].set(err)
            Q1 = Q1.at[:, i].set(q)
            loss = loss + jnp.sum(diff * diff) / (2.0 * d * d)
            return W1, Err1, Q1, scale, zero, loss

        inner = (
            jax.lax.dynamic_slice_in_dim(W, i1, block, axis=1),
            jnp.zeros((n_rows, block), jnp.float32),
            jnp.zeros((n_rows, block), jnp.uint8),
            scale,
            zero,
            loss,
        )
        _, Err1, Q1, scale, zero, loss = jax.lax.fori_loop(0, block, body, inner)
        # The lazy batch update. U is upper triangular: columns before the
        # block do not move; the block's own columns are done and never read.
        W = W - jnp.matmul(Err1, U_rows, precision=_HIGHEST)
        Q = jax.lax.dynamic_update_slice_in_dim(Q, Q1, i1, axis=1)
        return W, Q, scale, zero, loss

    carry = (
        W,
        jnp.zeros((n_rows, n_cols + pad), jnp.uint8),
        jnp.zeros((n_rows, n_groups + 1), jnp.float16),  # + the dummy group
        jnp.zeros((n_rows, n_groups + 1), jnp.float16),
        jnp.zeros((), jnp.float32),
    )
    _, Q, scale, zero, loss = jax.lax.fori_loop(0, n_blocks, block_body, carry)
    q = Q[:, :n_cols][:, inv]  # back to input order
    return q, scale[:, :n_groups], zero[:, :n_groups], loss


def quantize_model(
    params: dict[str, Any],
    config: smollm2.Config,
    tokens: Any,
    bits: int | Sequence[int],
    *,
    group_size: int = quantizer.GROUP_SIZE,
    clip: Sequence[float] | None = quantizer.CLIP_RATIOS,
    block_size: int = BLOCK_SIZE,
    damp: float = DAMP,
    act_order: bool = False,
    batch_size: int = 8,
    include: Callable[[str, Any], bool] = quantizer.is_linear_weight,
    callback: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """GPTQ on every linear layer of a Llama-port model, block by block.

    Block ``l``'s Hessians come from calibration activations that went
    through blocks ``0 .. l-1`` already quantized (sequential, as in the
    paper); all the layers of a block see the block's full-precision
    weights, and the block's quantized output feeds the next block.

    Args:
      params: `smollm2` layout (``blocks`` a list or stacked).
      config: the model's `smollm2.Config`.
      tokens: ``(n_seq, t)`` int calibration tokens.
      bits: one width, or one per block.
      group_size: as in `gptq`.
      clip: as in `gptq`.
      block_size: as in `gptq`.
      damp: as in `gptq`.
      act_order: as in `gptq`.
      batch_size: sequences per forward call.
      include: ``include(path, leaf)`` picks the quantized leaves of a block.
      callback: ``callback(done, n_blocks)`` after each block.

    Returns:
      ``params`` with ``blocks`` a list whose selected kernels are
      `quantizer.QuantizedWeight`; other leaves are kept.

    Raises:
      ValueError: for bad bits, tokens or batch size.
    """
    params = smollm2.unstack_blocks(params)
    blocks = params["blocks"]
    n_blocks = len(blocks)
    widths = [bits] * n_blocks if isinstance(bits, int | np.integer) else list(bits)
    if len(widths) != n_blocks:
        raise ValueError(
            f"bits must be one width or one per block ({n_blocks}), got {bits!r}."
        )
    widths = [quantizer.check_bits(b, name="every entry of bits") for b in widths]
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 1:
        raise ValueError(f"tokens must be (n_seq, t) ints, got shape {tokens.shape}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise TypeError(f"batch_size must be a positive int, got {batch_size!r}.")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size}.")
    embed = params["embed"]
    xs = [
        jnp.take(embed, jnp.asarray(tokens[i : i + batch_size]), axis=0)
        for i in range(0, len(tokens), batch_size)
    ]
    n_rows = tokens.size
    out_blocks = []
    for layer, block in enumerate(blocks):
        grams: dict[str, jax.Array] = {}
        for x in xs:
            _, g = capture.block_grams(x, block, config, include)
            grams = g if not grams else jax.tree.map(jnp.add, grams, g)

        def one(path, leaf, grams=grams, width=widths[layer]):
            name = quantizer.path_str(path)
            if not include(name, leaf):
                return leaf
            res = gptq(
                leaf,
                2.0 * grams[name] / n_rows,
                width,
                group_size=group_size,
                clip=clip,
                block_size=block_size,
                damp=damp,
                act_order=act_order,
            )
            return res.weight

        qblock = jax.tree_util.tree_map_with_path(one, block)
        out_blocks.append(qblock)
        rope = smollm2.rope_tables(tokens.shape[1], config, xs[0].dtype)
        deq = quantizer.dequantize_tree(qblock, xs[0].dtype)
        xs = [_block_out(x, deq, rope, config) for x in xs]
        if callback is not None:
            callback(layer + 1, n_blocks)
    return {**params, "blocks": out_blocks}


@functools.partial(jax.jit, static_argnames=("config",))
def _block_out(x, block, rope, config):
    return smollm2.block(x, block, rope, config)
