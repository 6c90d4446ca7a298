"""Group-wise asymmetric round-to-nearest weight quantization, packed in uint8.

A 2-D linear kernel ``w`` of shape ``(in, out)`` (applied as ``x @ w``) is cut
into groups of ``group_size`` (128) consecutive elements **along the input
dimension**: we transpose to ``(out, in)`` and group the row-major flattening,
so for ``in`` a multiple of 128 every group is 128 inputs of one output
column. When ``in`` is not a multiple of 128 (SmolLM2's ``d_model`` is 576) a
group runs on into the next output column instead of being zero-padded, which
keeps the all-in cost at exactly ``b + 0.25`` bits; only a total size that is
not a multiple of 128 pads the very last group.

Per group, with ``lo = min``, ``hi = max``, both rounded to float16::

    scale = fp16((hi - lo) / (2**b - 1))      zero = fp16(lo)
    q = clip(round((w - zero) / scale), 0, 2**b - 1)   (uint, b bits)
    w_hat = q * scale + zero

Codes are packed planar by `optax_lowbit.codecs.base.pack_codes` (3 bits =
a 2-bit plane and a 1-bit plane), so a group of 128 holds ``16 * b`` code
bytes plus 2 + 2 bytes of fp16 scale and zero: all-in ``b + 32 / 128 = b +
0.25`` bits per weight, the figure `QuantizedWeight.bits_per_element`
measures from the real arrays.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from optax_lowbit.impq import quantizer
  >>> w = jax.random.normal(jax.random.key(0), (256, 64))
  >>> qw = quantizer.quantize(w, bits=3)
  >>> qw.bits_per_element
  3.25
  >>> quantizer.qmatmul(jnp.ones((2, 256)), qw).shape
  (2, 64)

References:
  `IMPQ (later renamed CoopQ), arXiv 2509.15455
  <https://arxiv.org/abs/2509.15455>`_, 2025: group-wise RTN weights at 2-4
  bits; the packing and the grouping of ragged inputs are ours.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_lowbit.codecs import base

BIT_CHOICES = (2, 3, 4, 8)
GROUP_SIZE = 128
#: bits of fp16 scale + fp16 zero per group, divided over the group.
OVERHEAD_BITS = 32 / GROUP_SIZE  # 0.25


def all_in_bits(bits: int, group_size: int = GROUP_SIZE) -> float:
    """All-in bits per weight of ``bits``-bit codes with an fp16 scale and zero.

    Args:
      bits: code width.
      group_size: elements per group.

    Returns:
      ``bits + 32 / group_size`` (``bits + 0.25`` for groups of 128).

    Examples:
      >>> all_in_bits(2)
      2.25
    """
    return bits + 32.0 / group_size


def check_bits(bits: Any, name: str = "bits") -> int:
    """Returns ``bits`` as an int, or raises naming the accepted widths."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise TypeError(f"{name} must be an int in {BIT_CHOICES}, got {bits!r}.")
    if int(bits) not in BIT_CHOICES:
        raise ValueError(f"{name} must be one of {BIT_CHOICES}, got {bits!r}.")
    return int(bits)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A ``(in, out)`` kernel quantized group-wise to ``bits`` bits.

    Attributes:
      codes: ``uint8`` ``(n_groups, 16 * bits)``: planar-packed codes.
      scale: ``float16`` ``(n_groups,)``.
      zero: ``float16`` ``(n_groups,)``: the value of code 0.
      shape: the kernel's shape ``(in, out)`` (static).
      bits: code width, one of 2, 3, 4, 8 (static).
      group_size: elements per group (static).
    """

    codes: jax.Array
    scale: jax.Array
    zero: jax.Array
    shape: tuple[int, ...] = dataclasses.field(metadata={"static": True})
    bits: int = dataclasses.field(metadata={"static": True})
    group_size: int = dataclasses.field(default=GROUP_SIZE, metadata={"static": True})

    @property
    def nbytes(self) -> int:
        """Bytes actually held: codes, scales and zeros."""
        return int(self.codes.nbytes + self.scale.nbytes + self.zero.nbytes)

    @property
    def bits_per_element(self) -> float:
        """All-in bits per weight, measured from the stored arrays."""
        return 8.0 * self.nbytes / max(1, math.prod(self.shape))


def _groups(w: jax.Array, group_size: int) -> jax.Array:
    """``(in, out)`` -> ``(n_groups, group_size)`` along the input dimension."""
    flat = jnp.asarray(w, jnp.float32).T.reshape(-1)
    return base.to_groups(flat, group_size)


def quantize(
    w: jax.Array, bits: int, *, group_size: int = GROUP_SIZE
) -> QuantizedWeight:
    """Quantizes a 2-D kernel ``(in, out)`` to packed ``bits``-bit codes.

    Args:
      w: float kernel of shape ``(in, out)``.
      bits: code width, one of 2, 3, 4, 8.
      group_size: elements per group, a positive multiple of 8 (default 128).

    Returns:
      A `QuantizedWeight`; ``dequantize`` gives back ``w`` to within half a
      quantization step per group (plus float16 rounding of scale and zero).

    Raises:
      ValueError: for a bad width, group size or a kernel that is not 2-D.
    """
    bits = check_bits(bits)
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int, got {group_size!r}.")
    if group_size <= 0 or group_size % 8:
        raise ValueError(
            f"group_size must be a positive multiple of 8, got {group_size}."
        )
    if getattr(w, "ndim", None) != 2:
        raise ValueError(
            f"quantize takes a 2-D (in, out) kernel, got shape "
            f"{getattr(w, 'shape', None)}."
        )
    shape = tuple(int(s) for s in w.shape)
    g = _groups(w, group_size)
    lo = jnp.min(g, axis=-1)
    hi = jnp.max(g, axis=-1)
    levels = (1 << bits) - 1
    zero = lo.astype(jnp.float16)
    scale = ((hi - lo) / levels).astype(jnp.float16)
    s32 = scale.astype(jnp.float32)
    div = jnp.where(s32 > 0, s32, 1.0)
    q = jnp.round((g - zero.astype(jnp.float32)[:, None]) / div[:, None])
    q = jnp.clip(q, 0, levels).astype(jnp.uint8)
    codes = base.pack_codes(q, bits)
    return QuantizedWeight(codes, scale, zero, shape, bits, group_size)


def dequantize(qw: QuantizedWeight, dtype: Any = jnp.float32) -> jax.Array:
    """Rebuilds the ``(in, out)`` kernel from a `QuantizedWeight`.

    Args:
      qw: the quantized kernel.
      dtype: the result dtype.

    Returns:
      ``q * scale + zero`` per group, of shape ``qw.shape``.
    """
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"qw must be a QuantizedWeight, got {type(qw).__name__}.")
    q = base.unpack_codes(qw.codes, qw.bits, qw.group_size).astype(jnp.float32)
    g = q * qw.scale.astype(jnp.float32)[:, None] + qw.zero.astype(jnp.float32)[:, None]
    n_in, n_out = qw.shape
    flat = g.reshape(-1)[: n_in * n_out]
    return flat.reshape(n_out, n_in).T.astype(dtype)


def qmatmul(x: jax.Array, w: Any) -> jax.Array:
    """``x @ w`` where ``w`` is a `QuantizedWeight` (dequantized) or an array.

    Usable as the ``matmul`` hook of `optax_lowbit.impq.smollm2.forward`.

    Args:
      x: activations ``(..., in)``.
      w: a `QuantizedWeight` or a plain ``(in, out)`` array.

    Returns:
      ``(..., out)`` in the dtype of ``x``.
    """
    if isinstance(w, QuantizedWeight):
        w = dequantize(w, x.dtype)
    return x @ w.astype(x.dtype)


def path_str(path: tuple[Any, ...]) -> str:
    """``jax`` key path -> ``"blocks/3/attn/q"`` (the form of path-regex rules)."""
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


_SKIP = re.compile(
    r"(^|/)(ln[^/]*|[^/]*(embed|norm)[^/]*|pos_[^/]*)(/|$)", re.IGNORECASE
)


def is_linear_weight(path: str, leaf: Any) -> bool:
    """Default leaf filter: 2-D float leaves that are not embeddings or norms.

    Args:
      path: ``"/"``-joined key path of the leaf.
      leaf: the array.

    Returns:
      Whether `quantize_tree` quantizes the leaf by default.
    """
    dtype = getattr(leaf, "dtype", None)
    return (
        getattr(leaf, "ndim", 0) == 2
        and dtype is not None
        and jnp.issubdtype(dtype, jnp.floating)
        and not _SKIP.search(path)
    )


def quantize_tree(
    params: Any,
    bits: int | Callable[[str], int | None],
    *,
    group_size: int = GROUP_SIZE,
    include: Callable[[str, Any], bool] = is_linear_weight,
) -> Any:
    """Quantizes the linear weights of a param tree; other leaves are kept.

    Args:
      params: a pytree of arrays (e.g. `smollm2.load_params`'s params or an
        NNX state's pure dict).
      bits: one width for every selected leaf, or ``bits(path) -> int | None``
        (``None`` keeps that leaf in full precision).
      group_size: elements per group.
      include: ``include(path, leaf)`` selects the leaves to quantize; by
        default 2-D float leaves whose path names no embedding or norm.

    Returns:
      The same tree with selected leaves replaced by `QuantizedWeight`.

    Examples:
      >>> p = {"blocks": [{"w": jnp.ones((128, 8))}], "embed": jnp.ones((4, 8))}
      >>> q = quantize_tree(p, 2)
      >>> type(q["blocks"][0]["w"]).__name__, type(q["embed"]).__name__
      ('QuantizedWeight', 'ArrayImpl')
    """
    if callable(bits):
        width = bits
    else:
        fixed = check_bits(bits)

        def width(_):
            return fixed

    def one(path, leaf):
        name = path_str(path)
        if not include(name, leaf):
            return leaf
        b = width(name)
        return (
            leaf if b is None else quantize(leaf, check_bits(b), group_size=group_size)
        )

    return jax.tree_util.tree_map_with_path(one, params)


def dequantize_tree(params: Any, dtype: Any = jnp.float32) -> Any:
    """Replaces every `QuantizedWeight` in ``params`` by its dequantized array."""
    return jax.tree.map(
        lambda x: dequantize(x, dtype) if isinstance(x, QuantizedWeight) else x,
        params,
        is_leaf=lambda x: isinstance(x, QuantizedWeight),
    )


def tree_bytes(params: Any) -> int:
    """Bytes held by a (partly) quantized param tree, every leaf counted."""
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QuantizedWeight))
    return int(sum(x.nbytes for x in leaves))
