"""optax_lowbit: Optax optimizers with 1.5- to 8-bit states.

Import it as ``import optax_lowbit as lowbit``. Everything public is
re-exported here; modules whose names start with ``_`` are private.

``lowbit.convert`` is the function `optax_lowbit.convert.convert` (the module
stays importable as ``importlib.import_module("optax_lowbit.convert")``);
``lowbit.policy`` is the module (``lowbit.policy.default()``,
``lowbit.policy.from_predicate(fn)``).
"""

from optax_lowbit import codecs, policy, transforms
from optax_lowbit.alias import (
    adafactor_polar,
    adam_4bit,
    adam_8bit,
    adam_piquant,
    adam_polar,
    adamw_4bit,
    adamw_8bit,
    adamw_piquant,
    adamw_polar,
    fused_adamw_4bit,
    fused_adamw_8bit,
    fused_adamw_piquant,
    fused_adamw_polar,
    lion_polar,
    muon_4bit,
    muon_8bit,
    muon_piquant,
    muon_polar,
    sgd_polar,
)
from optax_lowbit.convert import convert
from optax_lowbit.fused import FusedOptimizer
from optax_lowbit.memory import state_bytes, summarize, summary
from optax_lowbit.offload import offload
from optax_lowbit.transforms import *  # noqa: F403 (its __all__, listed once)

__version__ = "0.1.0"

__all__ = [
    "FusedOptimizer",
    "adafactor_polar",
    "adam_4bit",
    "adam_8bit",
    "adam_piquant",
    "adam_polar",
    "adamw_4bit",
    "adamw_8bit",
    "adamw_piquant",
    "adamw_polar",
    "codecs",
    "convert",
    "fused_adamw_4bit",
    "fused_adamw_8bit",
    "fused_adamw_piquant",
    "fused_adamw_polar",
    "lion_polar",
    "muon_4bit",
    "muon_8bit",
    "muon_piquant",
    "muon_polar",
    "offload",
    "policy",
    "sgd_polar",
    "state_bytes",
    "summarize",
    "summary",
    "transforms",
    *transforms.__all__,
]
