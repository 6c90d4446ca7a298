"""Gradient transformations over quantized optimizer states."""

from optax_lowbit.transforms.adam import (
    ScaleByAdamQuantizedState,
    scale_by_adam_4bit,
    scale_by_adam_8bit,
    scale_by_adam_piquant,
    scale_by_adam_polar,
    scale_by_adam_quantized,
)

__all__ = [
    "ScaleByAdamQuantizedState",
    "scale_by_adam_4bit",
    "scale_by_adam_8bit",
    "scale_by_adam_piquant",
    "scale_by_adam_polar",
    "scale_by_adam_quantized",
]
