"""The suite's own settings (tests/conftest.py): XLA's optimizations and
XLA:CPU's emitters per test."""

import os

import jax
import jax.numpy as jnp
import pytest

from tests import _emitters

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


def test_unoptimized_compiles_use_the_elemental_emitters():
    if not _unoptimized_by_default():
        pytest.skip("JAX_DISABLE_MOST_OPTIMIZATIONS set to run every test optimized")
    if os.environ.get(_emitters.ENV) == "1":
        pytest.skip(f"{_emitters.ENV}=1 keeps XLA's default emitters")
    if not _emitters.wrapped():
        pytest.skip("this jax or XLA has no xla_cpu_use_fusion_emitters option")
    assert _emitters.elemental_emitters_on()
    # and XLA takes it: a program compiles and runs with it
    assert float(jax.jit(lambda x: x * 2.0)(jnp.float32(1.5))) == 3.0


@pytest.mark.fusion_emitters
def test_a_test_marked_fusion_emitters_keeps_them_unoptimized():
    assert jax.config.read(FLAG) is _unoptimized_by_default()
    assert not _emitters.elemental_emitters_on()


@pytest.mark.optimized
def test_optimized_compiles_keep_xlas_default_emitters():
    assert not _emitters.elemental_emitters_on()
