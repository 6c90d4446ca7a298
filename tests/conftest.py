"""Shared pytest setup: hypothesis profiles and jax config.

Profiles (pick with ``OPTAX_LOWBIT_HYPOTHESIS=fuzz``):
  ci   (default) few examples per property, to keep CI fast;
  fuzz           >= 1000 examples per property, for long runs.
"""

import os

import jax
from hypothesis import HealthCheck, settings

jax.config.update("jax_numpy_rank_promotion", "allow")

settings.register_profile(
    "ci",
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "fuzz",
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("OPTAX_LOWBIT_HYPOTHESIS", "ci"))


# Tests marked ``@pytest.mark.slow`` (minutes on a CPU) run only with
# OPTAX_LOWBIT_SLOW=1.
def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: long test, skipped unless OPTAX_LOWBIT_SLOW=1"
    )


def pytest_collection_modifyitems(config, items):
    if os.environ.get("OPTAX_LOWBIT_SLOW") == "1":
        return
    import pytest

    skip = pytest.mark.skip(reason="slow test; set OPTAX_LOWBIT_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
