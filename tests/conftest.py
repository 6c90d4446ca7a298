"""Shared pytest setup: hypothesis profiles and jax config.

Profiles (pick with ``OPTAX_LOWBIT_HYPOTHESIS=fuzz``):
  ci   (default) few examples per property, to keep CI fast;
  fuzz           >= 1000 examples per property, for long runs; tests whose
                 examples are costly pin their own ``max_examples`` and keep it.
"""

import atexit
import os
import shutil
import tempfile

# One persistent XLA compilation cache per test run, shared by the xdist
# workers and every subprocess a test starts (the 8-device sharding checks,
# benchmark smoke runs): a function compiled to the same HLO (the same codec
# encode in both workers, an alias's update rebuilt by the next test or
# hypothesis example) is compiled once per run instead of once per process or
# per fresh jit. The cache only reuses the executable XLA built for that very
# HLO and options, so every check runs the same code on the same inputs. The
# directory is made by the first process that loads this file (the xdist
# controller), handed on through the environment, and removed when that
# process exits; nothing is kept between runs. OPTAX_LOWBIT_COMPILE_CACHE=0
# turns it off.
_CACHE_DIR = "OPTAX_LOWBIT_TEST_COMPILE_CACHE_DIR"
_CACHE_ON = os.environ.get("OPTAX_LOWBIT_COMPILE_CACHE", "1") != "0"
if _CACHE_ON:
    if not os.path.isdir(os.environ.get(_CACHE_DIR, "")):
        os.environ[_CACHE_DIR] = tempfile.mkdtemp(prefix="optax_lowbit_xla_cache_")
        atexit.register(shutil.rmtree, os.environ[_CACHE_DIR], ignore_errors=True)
    # read by jax at import, here and in every subprocess
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ[_CACHE_DIR]
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

# XLA's optimizations mostly off (``JAX_DISABLE_MOST_OPTIMIZATIONS``, read by
# jax at import, here and in every subprocess a test starts): the suite is
# bound by compiling many small programs on a CPU, and unoptimized compiles
# take ~35% less of it (README, "Tests"). Tests marked ``optimized`` compile
# with the optimizations on (`_xla_optimizations`; LLVM at -O1 rather than
# XLA's -O2 unless marked ``fusion_emitters``, tests/_xla_cpu.py):
# those that hold two programs to the same bits (a kernel and its jnp
# reference, the fused step and the chain, a state saved by an optimized
# program), which XLA's optimizations (its FMA contraction on the CPU) can
# tell apart, and those whose time is running many steps rather than
# compiling (the 2000-step state-drift checks, the real-data training runs:
# optimized code runs them ~1.3-4x faster). Setting
# JAX_DISABLE_MOST_OPTIMIZATIONS=0 runs every test optimized.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from tests import _xla_cpu  # noqa: E402

if _CACHE_ON:
    # in case jax was imported before this file (a plugin)
    jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_DIR])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

jax.config.update("jax_numpy_rank_promotion", "allow")


#: The XLA:CPU options the next compiles add: set per test by
#: `_xla_optimizations` (tests/_xla_cpu.py says which and why).
_XLA_CPU = {"options": ()}
_XLA_CPU_AVAILABLE = _xla_cpu.add_options_when(lambda: _XLA_CPU["options"])

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
    config.addinivalue_line(
        "markers",
        "optimized: compiled with XLA's optimizations on (bit-equality tests, "
        "run-bound tests)",
    )
    config.addinivalue_line(
        "markers",
        "fusion_emitters: compiled with XLA:CPU's defaults (its fusion "
        "emitters, its optimization level where optimized), not the "
        "suite's cheaper options (checks holding two programs to the same "
        "bits that the elemental emitters round apart)",
    )


_OPTIMIZATIONS_FLAG = "jax_disable_most_optimizations"
#: The suite's setting (the environment's, or conftest's default above).
_DISABLED_BY_DEFAULT = jax.config.read(_OPTIMIZATIONS_FLAG)


@pytest.fixture(autouse=True)
def _xla_optimizations(request):
    """Compiles the test with XLA's optimizations on where it needs them, and
    with the suite's cheaper XLA:CPU options (`_xla_cpu.OPTIMIZED` or
    `_xla_cpu.UNOPTIMIZED`) unless marked ``fusion_emitters``.

    The settings are switched only where the next test needs others; JAX's
    in-memory caches do not key on them, so they are cleared then: no program
    compiled one way runs in the other. With JAX_DISABLE_MOST_OPTIMIZATIONS=0
    every test compiles as a user's program does (XLA's defaults).
    """
    optimized = request.node.get_closest_marker("optimized") is not None
    disabled = _DISABLED_BY_DEFAULT and not optimized
    options = ()
    if (
        _XLA_CPU_AVAILABLE
        and _DISABLED_BY_DEFAULT
        and request.node.get_closest_marker("fusion_emitters") is None
    ):
        options = _xla_cpu.UNOPTIMIZED if disabled else _xla_cpu.OPTIMIZED
    if (jax.config.read(_OPTIMIZATIONS_FLAG), _XLA_CPU["options"]) != (
        disabled,
        options,
    ):
        jax.clear_caches()
        jax.config.update(_OPTIMIZATIONS_FLAG, disabled)
        _XLA_CPU["options"] = options
    yield


def pytest_collection_modifyitems(config, items):
    if os.environ.get("OPTAX_LOWBIT_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow test; set OPTAX_LOWBIT_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
