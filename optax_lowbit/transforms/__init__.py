"""Gradient transformations over quantized optimizer states."""

from optax_lowbit.transforms.adafactor import (
    EmaQuantizedState,
    ScaleByFactoredRmsQuantizedState,
    ema_quantized,
    scale_by_factored_rms_quantized,
)
from optax_lowbit.transforms.adam import (
    ScaleByAdamQuantizedState,
    scale_by_adam_4bit,
    scale_by_adam_8bit,
    scale_by_adam_piquant,
    scale_by_adam_polar,
    scale_by_adam_quantized,
    stable_nu_codec,
)
from optax_lowbit.transforms.lion import (
    ScaleByLionQuantizedState,
    scale_by_lion_quantized,
)
from optax_lowbit.transforms.sgd import TraceQuantizedState, trace_quantized

__all__ = [
    "EmaQuantizedState",
    "ScaleByAdamQuantizedState",
    "ScaleByFactoredRmsQuantizedState",
    "ScaleByLionQuantizedState",
    "TraceQuantizedState",
    "ema_quantized",
    "scale_by_adam_4bit",
    "scale_by_adam_8bit",
    "scale_by_adam_piquant",
    "scale_by_adam_polar",
    "scale_by_adam_quantized",
    "scale_by_factored_rms_quantized",
    "scale_by_lion_quantized",
    "stable_nu_codec",
    "trace_quantized",
]
