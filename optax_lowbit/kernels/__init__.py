"""Pallas kernels: fused optimizer steps over quantized states.

`adam` fuses decode -> Adam step -> encode (-> apply, for
`optax_lowbit.fused_adamw_polar`) per block of groups, for the polar codecs
and the blockwise 8/4-bit baselines; `_backend.pick` is the one place that
chooses interpreter or lowering.
"""

from optax_lowbit.kernels import adam

__all__ = ["adam"]
