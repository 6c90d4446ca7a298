"""Pallas kernels: fused optimizer steps over quantized states.

`adam` (the public face) fuses decode -> Adam step -> encode (-> apply, for
``adamw_<preset>(..., fused=True)``) per block of groups, for the polar codecs,
π-Quant and the blockwise 8/4-bit baselines; the same kernel runs Muon's
momentum step (`adam.rule_update` with `rules.MomentumRule`). Its parts:
`codec_ops` (the codec-specific layouts and tables), `loop` (the shared
element loop over an update rule, and its jnp reference), `launch` (the
``pallas_call``: one leaf, many leaves, sharding); `_backend.pick` is the one
place that chooses interpreter or lowering.
"""

from optax_lowbit.kernels import adam

__all__ = ["adam"]
