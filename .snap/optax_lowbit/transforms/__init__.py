"""Gradient transformations over quantized optimizer states.

`_quantized` is the generic quantized-moment machinery every transform shares
(policy, init, decode -> step -> encode per leaf); `adam` is Adam over any
codec pair, `adam_presets` its codec pairs (the ``scale_by_adam_*`` presets,
from which `optax_lowbit.alias` also generates the ``adam(w)_*`` aliases);
`muon`, `lion`, `sgd` and `adafactor` are the other optimizers.
"""

from optax_lowbit.transforms.adafactor import (
    EmaQuantizedState,
    ScaleByFactoredRmsQuantizedState,
    ema_quantized,
    scale_by_factored_rms_quantized,
)
from optax_lowbit.transforms.adam import (
    ScaleByAdamQuantizedState,
    scale_by_adam_quantized,
)
from optax_lowbit.transforms.adam_presets import (
    scale_by_adam_4bit,
    scale_by_adam_8bit,
    scale_by_adam_piquant,
    scale_by_adam_polar,
    stable_nu_codec,
)
from optax_lowbit.transforms.lion import (
    ScaleByLionQuantizedState,
    scale_by_lion_quantized,
)
from optax_lowbit.transforms.muon import (
    ScaleByMuonQuantizedState,
    scale_by_muon_quantized,
)
from optax_lowbit.transforms.sgd import TraceQuantizedState, trace_quantized

__all__ = [
    "EmaQuantizedState",
    "ScaleByAdamQuantizedState",
    "ScaleByFactoredRmsQuantizedState",
    "ScaleByLionQuantizedState",
    "ScaleByMuonQuantizedState",
    "TraceQuantizedState",
    "ema_quantized",
    "scale_by_adam_4bit",
    "scale_by_adam_8bit",
    "scale_by_adam_piquant",
    "scale_by_adam_polar",
    "scale_by_adam_quantized",
    "scale_by_factored_rms_quantized",
    "scale_by_lion_quantized",
    "scale_by_muon_quantized",
    "stable_nu_codec",
    "trace_quantized",
]
