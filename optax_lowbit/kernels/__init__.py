"""Pallas kernels: fused optimizer steps over quantized states.

`adam` fuses decode -> Adam step -> encode per block of groups for the polar
codecs; `_backend.pick` is the one place that chooses interpreter or lowering.
"""

from optax_lowbit.kernels import adam

__all__ = ["adam"]
