"""The suite's own settings (tests/conftest.py): XLA's optimizations per test."""

import os

import jax
import jax.numpy as jnp
import pytest

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
