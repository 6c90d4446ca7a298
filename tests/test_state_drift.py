"""Re-encoded moments stay near the fp32 EMA of the same stream (issue 16).

A few thousand decode -> update -> encode steps on a few hundred groups,
vectorized (`benchmarks.state_drift.simulate`), for every Adam preset's codec
pair, against the drift goals of the benchmark: median ``v̂/v`` in [0.8,
1.25] with under 1% of elements below ``v/4``; ``rms m̂/m`` and the Adam
direction's rms ratio in [0.8, 1.25]. The polar first moment misses the m
goals (a documented miss, README "Long runs"): for it the test holds the
measured level so that it cannot get worse unnoticed.
"""

import jax
import pytest

from benchmarks import state_drift
from optax_lowbit.codecs import polar

# 2000 re-encoding steps per check, 11 checks: slow, CI's second step
# (OPTAX_LOWBIT_SLOW=1) runs them. Most of their time is the steps, not the
# compiles, so they compile optimized, as the benchmark does (tests/conftest.py;
# on 2 cores 13.7-15.2 s a check unoptimized, 3.6-3.8 s optimized).
pytestmark = [pytest.mark.slow, pytest.mark.optimized]

SHAPE = (8, 1536)  # 192 groups of 64, 96 of 128, 48 of 256
STEPS = 2000


def _final(mu_codec, nu_codec, stream="gaussian", steps=STEPS):
    res = state_drift.simulate(
        jax.random.PRNGKey(3),
        SHAPE,
        mu_codec=mu_codec,
        nu_codec=nu_codec,
        stream=stream,
        steps=steps,
        checkpoints=(steps,),
    )
    return {k: float(v[-1]) for k, v in res.items()}


@pytest.fixture(scope="module")
def pairs():
    return state_drift.codec_pairs()


@pytest.mark.parametrize("name", ["polar2", "polar1.5", "piquant", "4bit", "8bit"])
def test_second_moment_tracks_the_fp32_ema(pairs, name):
    r = _final(None, pairs[name][1], "student_t3")
    assert 0.8 <= r["v_median"] <= 1.25, r
    assert r["v_below_quarter"] < 0.01, r
    assert r["finite"] == 1.0


@pytest.mark.parametrize("name", ["piquant", "4bit", "8bit"])
def test_first_moment_and_direction_track(pairs, name):
    r = _final(*pairs[name])
    for key in ("m_rms", "dir_rms"):
        assert 0.8 <= r[key] <= 1.25, (key, r)
    assert 0.8 <= r["v_median"] <= 1.25, r


@pytest.mark.parametrize("name", ["polar2", "polar1.5"])
def test_polar_first_moment_miss_does_not_grow(pairs, name):
    """Measured at 2000 steps: rms m̂/m 1.9 (2 bits) and 2.2 (1.5 bits)."""
    r = _final(*pairs[name])
    assert 1.0 <= r["m_rms"] <= {"polar2": 2.1, "polar1.5": 2.5}[name], r
    assert r["m_bias"] >= 0.6, r
    assert 0.8 <= r["v_median"] <= 1.25, r


def test_the_old_polar_second_moment_drifts():
    """Why the unsigned polar codebook is no longer a default: re-encoded at
    2 bits its v settles well below the truth (0.70x, 7.9% below v/4)."""
    r = _final(None, polar(bits=2, signed=False, rounding="stochastic"))
    assert r["v_median"] < 0.8 or r["v_below_quarter"] > 0.01, r
