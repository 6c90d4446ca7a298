"""optax_lowbit: Optax optimizers with 1.5- to 8-bit states.

Import it as ``import optax_lowbit as lowbit``. Everything public is
re-exported here; modules whose names start with ``_`` are private.

``lowbit.convert`` is the function `optax_lowbit.convert.convert` (the module
stays importable as ``importlib.import_module("optax_lowbit.convert")``);
``lowbit.policy`` is the module (``lowbit.policy.default()``,
``lowbit.policy.from_predicate(fn)``).
"""

from optax_lowbit import codecs, policy
from optax_lowbit.alias import (
    adafactor_polar,
    adam_polar,
    adamw_4bit,
    adamw_8bit,
    adamw_piquant,
    adamw_polar,
    lion_polar,
    sgd_polar,
)
from optax_lowbit.convert import convert
from optax_lowbit.fused import (
    FusedOptimizer,
    fused_adamw_4bit,
    fused_adamw_8bit,
    fused_adamw_piquant,
    fused_adamw_polar,
)
from optax_lowbit.memory import state_bytes, summarize, summary
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

__version__ = "0.1.0"

__all__ = [
    "EmaQuantizedState",
    "FusedOptimizer",
    "ScaleByAdamQuantizedState",
    "ScaleByFactoredRmsQuantizedState",
    "ScaleByLionQuantizedState",
    "TraceQuantizedState",
    "adafactor_polar",
    "adam_polar",
    "adamw_4bit",
    "adamw_8bit",
    "adamw_piquant",
    "adamw_polar",
    "codecs",
    "convert",
    "ema_quantized",
    "fused_adamw_4bit",
    "fused_adamw_8bit",
    "fused_adamw_piquant",
    "fused_adamw_polar",
    "lion_polar",
    "policy",
    "scale_by_adam_4bit",
    "scale_by_adam_8bit",
    "scale_by_adam_piquant",
    "scale_by_adam_polar",
    "scale_by_adam_quantized",
    "scale_by_factored_rms_quantized",
    "scale_by_lion_quantized",
    "sgd_polar",
    "stable_nu_codec",
    "state_bytes",
    "summarize",
    "summary",
    "trace_quantized",
]
