"""optax_lowbit: Optax optimizers with 1.5- to 8-bit states.

Import it as ``import optax_lowbit as lowbit``. Everything public is
re-exported here; modules whose names start with ``_`` are private.
"""

from optax_lowbit import codecs

__version__ = "0.1.0"

__all__ = [
    "codecs",
]
