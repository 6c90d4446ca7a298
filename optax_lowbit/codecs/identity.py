"""The identity codec: states kept as plain float32 or bfloat16 arrays.

It is the reference point of every comparison (fp32 states are what
`optax.adam` keeps) and the codec with which the low-bit transforms must equal
`optax.scale_by_adam` to float tolerance.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from optax_lowbit import _checks
from optax_lowbit.codecs import base

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _empty_scales(x: jax.Array) -> jax.Array:
    """float32 zeros of shape ``(*x.shape[:-1], 0)``, sharded like ``x``.

    A slice of ``x`` (not ``jnp.zeros``), so that under explicit mesh axes the
    empty scales carry the leading axes' sharding in their type, as the ones
    `init` makes do: the state's type is the same after every update.
    """
    return jnp.zeros_like(x[..., :0], dtype=jnp.float32)


@dataclasses.dataclass(frozen=True)
class IdentityCodec(base.Codec):
    """Stores the array itself in ``dtype``; no scales.

    Layout (the one exception to the uint8 contract): ``codes`` is the array
    in ``dtype`` with its own shape, ``scales`` is an empty float32 array of
    shape ``(*lead, 0)``.
    """

    dtype_name: str = "float32"
    group_size: int = 1

    @property
    def name(self) -> str:
        """``identity-float32`` or ``identity-bfloat16``."""
        return f"identity-{self.dtype_name}"

    @property
    def bytes_per_group(self) -> int:
        """Bytes per element (a group is one element)."""
        return jnp.dtype(_DTYPES[self.dtype_name]).itemsize

    @property
    def scale_dtype(self) -> Any:
        """float32 (the scales array is empty)."""
        return jnp.float32

    @property
    def bits_per_element(self) -> float:
        """32 or 16: the array itself, no scales."""
        return 8.0 * self.bytes_per_group

    def encode_groups(self, xg: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Casts groups to the storage dtype; empty scales."""
        codes = xg.astype(_DTYPES[self.dtype_name])
        return codes, _empty_scales(xg)

    def decode_groups(self, codes: jax.Array, scales: jax.Array) -> jax.Array:
        """Casts back to float32."""
        del scales
        return codes.astype(jnp.float32)

    def encode(self, x: jax.Array) -> base.Packed:
        """Stores ``x`` in the storage dtype, keeping its shape."""
        _checks.float_array("x", x)
        x = jnp.asarray(x)
        lead, last = base.lead_and_last(tuple(x.shape))
        return base.Packed(
            codes=x.astype(_DTYPES[self.dtype_name]),
            scales=_empty_scales(x.reshape((*lead, last))),
            shape=tuple(x.shape),
            codec=self,
        )

    def packed_shapes(self, shape: tuple[int, ...]) -> base.Packed:
        """`encode`'s layout: ``shape`` in ``dtype``, scales ``(*lead, 0)``."""
        shape = tuple(shape)
        lead, _ = base.lead_and_last(shape)
        return base.Packed(
            codes=jax.ShapeDtypeStruct(shape, _DTYPES[self.dtype_name]),
            scales=jax.ShapeDtypeStruct((*lead, 0), jnp.float32),
            shape=shape,
            codec=self,
        )

    def zeros_many(self, shapes: Sequence[tuple[int, ...]]) -> list[base.Packed]:
        """Zeros of each shape in ``dtype`` (nothing to repeat)."""
        shapes = [_checks.shape_of("shapes[...]", s) for s in shapes]
        return [self.encode(jnp.zeros(s, jnp.float32)) for s in shapes]

    def decode(self, packed: base.Packed) -> jax.Array:
        """Returns the stored array as float32."""
        if not isinstance(packed, base.Packed) or packed.codec_name != self.name:
            got = getattr(packed, "codec_name", type(packed).__name__)
            raise ValueError(f"packed must come from codec {self.name!r}, got {got!r}.")
        return packed.codes.astype(jnp.float32).reshape(packed.shape)


def identity(dtype: Any = jnp.float32) -> IdentityCodec:
    """States stored unquantized, in float32 or bfloat16.

    Args:
      dtype: ``jnp.float32`` (32 bits per element, what `optax.adam` keeps)
        or ``jnp.bfloat16`` (16 bits, as ``optax.adam(mu_dtype=jnp.bfloat16)``).

    Returns:
      An `IdentityCodec`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax_lowbit as lowbit
      >>> codec = lowbit.codecs.identity(jnp.bfloat16)
      >>> codec.bits_per_element
      16.0
      >>> codec.decode(codec.encode(jnp.array([1.0, -2.5]))).tolist()
      [1.0, -2.5]
    """
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = repr(dtype)
    _checks.one_of("dtype", name, tuple(_DTYPES))
    return IdentityCodec(dtype_name=name)
