"""The suite's own settings (tests/conftest.py): XLA's optimizations and
XLA:CPU's options per test."""

import os

import jax
import jax.numpy as jnp
import pytest

from tests import _xla_cpu

FLAG = "jax_disable_most_optimizations"


def _unoptimized_by_default() -> bool:
    return os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS") == "1"


def test_the_suite_compiles_with_most_optimizations_off():
    if not _unoptimized_by_default():
        pytest.skip("JAX_DISABLE_MOST_OPTIMIZATIONS set to run every test optimized")
    assert jax.config.read(FLAG) is True


@pytest.mark.optimized
def test_a_test_marked_optimized_compiles_optimized():
    assert jax.config.read(FLAG) is False
    # a program compiled here is an optimized one: the flag is read at compile
    assert float(jax.jit(lambda x: x * 2.0)(jnp.float32(1.5))) == 3.0


def test_an_unmarked_test_after_an_optimized_one_runs_unoptimized_again():
    assert jax.config.read(FLAG) is _unoptimized_by_default()


def _skip_without_options():
    if not _unoptimized_by_default():
        pytest.skip("JAX_DISABLE_MOST_OPTIMIZATIONS set to run every test optimized")
    if os.environ.get(_xla_cpu.ENV) == "1":
        pytest.skip(f"{_xla_cpu.ENV}=1 keeps XLA's defaults")
    if not _xla_cpu.wrapped():
        pytest.skip("this jax or XLA refuses the suite's XLA:CPU options")


def _compiles_and_runs():
    # XLA takes the options: a program compiles and runs with them
    assert float(jax.jit(lambda x: x * 2.0 + 1.0)(jnp.float32(1.5))) == 4.0


def test_unoptimized_compiles_use_the_elemental_emitters():
    _skip_without_options()
    options = _xla_cpu.options_now()
    assert options[_xla_cpu.EMITTERS] is False
    assert "xla_backend_optimization_level" not in options  # JAX's -O0
    _compiles_and_runs()


@pytest.mark.optimized
def test_optimized_compiles_use_o1_and_the_elemental_emitters():
    _skip_without_options()
    assert jax.config.read(FLAG) is False
    options = _xla_cpu.options_now()
    assert options[_xla_cpu.EMITTERS] is False
    assert options["xla_backend_optimization_level"] == 1
    assert options["xla_llvm_disable_expensive_passes"] is True
    _compiles_and_runs()


@pytest.mark.fusion_emitters
def test_a_test_marked_fusion_emitters_keeps_xlas_defaults_unoptimized():
    assert jax.config.read(FLAG) is _unoptimized_by_default()
    assert not set(dict(_xla_cpu.OPTIMIZED)) & set(_xla_cpu.options_now())


@pytest.mark.optimized
@pytest.mark.fusion_emitters
def test_a_test_marked_fusion_emitters_keeps_xlas_defaults_optimized():
    assert jax.config.read(FLAG) is False
    assert not set(dict(_xla_cpu.OPTIMIZED)) & set(_xla_cpu.options_now())
