"""`calibrate`: fitting polar rings to captured states by minimum MSE."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_lowbit.codecs import identity
from optax_lowbit.codecs.calibrate import calibrate, projected_radii
from optax_lowbit.codecs.polar import PolarCodec, polar


@functools.cache
def _jitted(codec):
    return jax.jit(lambda x: codec.decode(codec.encode(x)))


def _mse(codec, xs):
    return sum(float(np.sum((np.asarray(_jitted(codec)(x)) - x) ** 2)) for x in xs)


def _t3(seed, shape=(64, 1024)):
    return np.random.default_rng(seed).standard_t(3, shape).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize("bits", [2, 1.5])
def test_signed_calibration_reduces_mse_on_student_t(seed, bits):
    # Measured: fitted on one t3 array, lower MSE on a fresh one for 10/10 seeds.
    train, test = [_t3(seed)], [_t3(seed + 1)]
    published = polar(bits)
    fitted = calibrate(published, train)
    assert isinstance(fitted, PolarCodec)
    assert (fitted.bits, fitted.signed, fitted.group_size) == (bits, True, 64)
    assert fitted.scale_dtype == published.scale_dtype
    assert len(fitted.rings) == len(published.rings)
    assert all(0 < r <= 1 for r in fitted.rings)
    assert list(fitted.rings) == sorted(set(fitted.rings))
    # Lower error than the published rings, on the fitted and on fresh data.
    assert _mse(fitted, train) < _mse(published, train)
    assert _mse(fitted, test) < _mse(published, test)
    assert fitted.name != published.name  # packed states remember their rings


def test_signed_rings_are_a_lloyd_fixed_point():
    x = _t3(0)
    fitted = calibrate(polar(2), [x], iters=500, tol=1e-9)
    p, scale = projected_radii(fitted, x, with_scales=True)
    w = scale**2  # minimum MSE in the data's units: groups weigh by scale**2
    r = np.asarray(fitted.rings)
    idx = np.searchsorted(0.5 * (r[1:] + r[:-1]), p)
    for k in range(len(r)):
        mean = np.sum(w[idx == k] * p[idx == k]) / np.sum(w[idx == k])
        np.testing.assert_allclose(r[k], mean, rtol=1e-5)


def test_calibrated_signed_on_gaussian_beats_published_modestly():
    x = np.random.default_rng(3).standard_normal((64, 1024)).astype(np.float32)
    for bits in (2, 1.5):
        fitted = calibrate(polar(bits), x)  # a single array is accepted
        assert _mse(fitted, [x]) <= _mse(polar(bits), [x])


@pytest.mark.parametrize("bits", [2, 1.5])
def test_unsigned_calibration_is_safe_and_optimal(bits):
    rng = np.random.default_rng(0)
    v = (rng.standard_normal((64, 1024)) ** 2).astype(np.float32)
    default = polar(bits, signed=False)
    fitted = calibrate(default, [v])
    rings = fitted.rings
    assert not fitted.signed and rings[-1] == 1.0 and rings[0] > 0
    assert len(rings) == len(default.rings)
    v_hat = np.asarray(_jitted(fitted)(v))
    assert (v_hat > 0).all()
    assert (v_hat / v).min() >= 0.5 - 1e-5  # the ceiling rule is kept
    # The exact ceiling fit is at least as good as the shipped rings (which were
    # fitted on other data), up to its histogram resolution.
    assert _mse(fitted, [v]) <= 1.01 * _mse(default, [v])
    # A clearly worse codebook is improved.
    bad = polar(bits, signed=False, rings=tuple(np.linspace(0.7, 1.0, len(rings))))
    assert _mse(calibrate(bad, [v]), [v]) < 0.9 * _mse(bad, [v])


def test_unsigned_ceiling_fit_on_known_distribution():
    # Projected radii uniform on (0, 1]: the optimal 4-level ceiling quantizer
    # has equally spaced rings 0.25, 0.5, 0.75, 1.0.
    module = importlib.import_module("optax_lowbit.codecs.calibrate")
    p = np.random.default_rng(0).uniform(0, 1, 200_000)
    rings = module._ceiling_dp(p, np.ones_like(p), 4, 1024)
    np.testing.assert_allclose(rings, [0.25, 0.5, 0.75, 1.0], atol=0.01)


def test_zero_and_empty_samples_are_skipped():
    x = _t3(1, (8, 128))
    fitted = calibrate(polar(2), [x, np.zeros((4, 64), np.float32), jnp.zeros((0,))])
    assert fitted.rings == calibrate(polar(2), [x]).rings


@pytest.mark.parametrize(
    ("codec", "samples", "kwargs", "exc", "match"),
    [
        (identity(), [np.ones(64, np.float32)], {}, TypeError, "codec must be a"),
        (polar(2), [], {}, ValueError, "samples must hold at least one array"),
        (polar(2), [np.ones(64, np.int32)], {}, TypeError, r"samples\[0\] must be a"),
        (polar(2), 3.0, {}, TypeError, "samples must be a float array"),
        (polar(2), [np.zeros(64, np.float32)], {}, ValueError, "non-zero values"),
        (polar(2), [np.ones(64, np.float32)], {"iters": 0}, ValueError, "iters"),
        (polar(2), [np.ones(64, np.float32)], {"bins": -1}, ValueError, "bins"),
    ],
)
def test_bad_inputs(codec, samples, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        calibrate(codec, samples, **kwargs)
