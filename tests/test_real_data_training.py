"""Training works on real data with every alias: digits, same seed and data order.

Not timed. Each alias trains the demo's Flax NNX MLP on scikit-learn's bundled
handwritten digits (1797 real scans) and must land close to fp32 AdamW's test
accuracy and held-out cross-entropy. Measured (CPU, 300 steps, seed 0) when
this test was written: fp32 AdamW 0.9694 accuracy; the low-bit aliases within
1.5 points; the bounds below leave room for seed-level noise only.
"""

import numpy as np
import optax
import pytest

import optax_lowbit as lowbit
from optax_lowbit import demo

# 300 training steps a test: run-bound, so compiled optimized as a user's
# training is (tests/conftest.py; on 2 cores 79 -> 60 s for the module)
pytestmark = pytest.mark.optimized

STEPS = 300
LR = 3e-3


def _aliases():
    return {
        "adamw_polar-2": lowbit.adamw_polar(LR, bits=2),
        "adamw_polar-1.5": lowbit.adamw_polar(LR, bits=1.5),
        "adamw_piquant": lowbit.adamw_piquant(LR),
        "adamw_8bit": lowbit.adamw_8bit(LR),
        "adamw_4bit": lowbit.adamw_4bit(LR),
        "lion_polar": lowbit.lion_polar(LR / 10),
        "sgd_polar": lowbit.sgd_polar(0.1, momentum=0.9),
        "adafactor_polar": lowbit.adafactor_polar(LR, momentum=0.9),
    }


# Each alias's fp32 twin, by name: the five AdamW aliases share one (the same
# optimizer, data and seed: one deterministic run, trained once per process).
_TWINS = {
    "adamw": lambda: optax.adamw(LR, weight_decay=1e-4),
    "lion": lambda: optax.lion(LR / 10, weight_decay=1e-3),
    "sgd": lambda: optax.sgd(0.1, momentum=0.9),
    "adafactor": lambda: optax.adafactor(LR, momentum=0.9),
}
_REFERENCE = {
    "adamw_polar-2": "adamw",
    "adamw_polar-1.5": "adamw",
    "adamw_piquant": "adamw",
    "adamw_8bit": "adamw",
    "adamw_4bit": "adamw",
    "lion_polar": "lion",
    "sgd_polar": "sgd",
    "adafactor_polar": "adafactor",
}

_CACHE: dict[str, dict] = {}


def _run(name, tx):
    if name not in _CACHE:
        _CACHE[name] = demo.train(tx, steps=STEPS, seed=0)
    return _CACHE[name]


# Measured gaps (strict xfail); none at present. adafactor_polar was one under
# nearest rounding (0.886 vs 0.969: its momentum EMA stalled); stochastic
# rounding, now the default, reaches 0.969.
_KNOWN_GAPS: dict[str, str] = {}


# The first CI step trains the default alias; the slow step (OPTAX_LOWBIT_SLOW=1)
# trains every alias.
_FAST = ("adamw_polar-2",)


def _marks(name: str) -> list:
    marks = [] if name in _FAST else [pytest.mark.slow]
    if name in _KNOWN_GAPS:
        marks.append(pytest.mark.xfail(strict=True, reason=_KNOWN_GAPS[name]))
    return marks


# One xdist worker (``--dist loadgroup``) runs them all, so that each fp32
# twin is trained once (`_CACHE`), not once per worker.
@pytest.mark.xdist_group("real_data_training")
@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=_marks(n)) for n in _aliases()],
)
def test_alias_trains_like_its_fp32_twin_on_digits(name):
    ours = _run(name, _aliases()[name])
    twin = _REFERENCE[name]
    ref = _run(f"ref-{twin}", _TWINS[twin]())
    assert np.isfinite(ours["loss"])
    assert ref["accuracy"] > 0.9, ref  # the reference itself learned
    # Within 2.5 accuracy points of the fp32 optimizer it replaces.
    assert ours["accuracy"] >= ref["accuracy"] - 0.025, (name, ours, ref)
    # And its state is smaller.
    assert ours["state_bytes"] < ref["state_bytes"]
