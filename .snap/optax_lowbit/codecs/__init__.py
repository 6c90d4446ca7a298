"""Codecs: how a float array becomes a packed uint8 pytree and back.

Each factory returns a frozen, hashable codec with ``encode``, ``decode``,
``zeros`` and an all-in ``bits_per_element``. The pure ``jnp`` group functions
of each codec are the definition of its behaviour.
"""

from optax_lowbit.codecs.base import Codec, Packed
from optax_lowbit.codecs.blockwise import BlockwiseCodec, blockwise4, blockwise8
from optax_lowbit.codecs.calibrate import calibrate
from optax_lowbit.codecs.identity import IdentityCodec, identity
from optax_lowbit.codecs.piquant import PiQuantCodec, piquant
from optax_lowbit.codecs.polar import PolarCodec, polar

__all__ = [
    "BlockwiseCodec",
    "Codec",
    "IdentityCodec",
    "Packed",
    "PiQuantCodec",
    "PolarCodec",
    "blockwise4",
    "blockwise8",
    "calibrate",
    "identity",
    "piquant",
    "polar",
]
