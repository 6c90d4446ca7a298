"""Small codecs written for the transform tests (independent of the real ones).

``Int8Absmax``: signed, linear int8 over the group's absmax (32 elements, fp32
scale). ``Int8Sqrt``: unsigned, codes ceil(255 * sqrt(x) / max sqrt(x)) so a
decoded second moment is never below the true one.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from optax_lowbit.codecs import base


@dataclasses.dataclass(frozen=True)
class Int8Absmax(base.Codec):
    group_size: int = 32

    @property
    def name(self) -> str:
        return "test-int8-absmax"

    @property
    def bytes_per_group(self) -> int:
        return self.group_size

    @property
    def scale_dtype(self) -> Any:
        return jnp.float32

    def encode_groups(self, xg: jax.Array) -> tuple[jax.Array, jax.Array]:
        absmax = jnp.max(jnp.abs(xg), axis=-1, keepdims=True)
        stored, div = base.safe_scale(absmax, jnp.float32)
        q = jnp.clip(jnp.round(xg / div * 127.0), -127, 127) + 128
        return q.astype(jnp.uint8), stored

    def decode_groups(self, codes: jax.Array, scales: jax.Array) -> jax.Array:
        return (codes.astype(jnp.float32) - 128.0) / 127.0 * scales


@dataclasses.dataclass(frozen=True)
class Int8Sqrt(base.Codec):
    group_size: int = 32

    @property
    def name(self) -> str:
        return "test-int8-sqrt"

    @property
    def signed(self) -> bool:
        return False

    @property
    def bytes_per_group(self) -> int:
        return self.group_size

    @property
    def scale_dtype(self) -> Any:
        return jnp.float32

    def encode_groups(self, xg: jax.Array) -> tuple[jax.Array, jax.Array]:
        r = jnp.sqrt(jnp.maximum(xg, 0.0))
        rmax = jnp.max(r, axis=-1, keepdims=True)
        stored, div = base.safe_scale(rmax, jnp.float32)
        q = jnp.clip(jnp.ceil(r / div * 255.0), 0, 255)
        return q.astype(jnp.uint8), stored

    def decode_groups(self, codes: jax.Array, scales: jax.Array) -> jax.Array:
        return jnp.square(codes.astype(jnp.float32) / 255.0 * scales)
