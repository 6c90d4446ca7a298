"""XLA:CPU compile options for the suite's tests: cheaper compiles.

Most of the suite's time is XLA compiling small programs on a CPU. Two kinds of
compile, chosen per test by tests/conftest.py:

- `UNOPTIMIZED` (tests not marked ``optimized``; with JAX's
  ``jax_disable_most_optimizations``, i.e. LLVM at -O0): XLA:CPU's elemental
  emitters (``xla_cpu_use_fusion_emitters=false``), which compile such
  programs in about half the time of its default fusion emitters.
- `OPTIMIZED` (tests marked ``optimized``: those holding two programs to the
  same bits, a kernel and its jnp reference, the fused step and the chain; and
  those bound by running many steps): the elemental emitters and LLVM at -O1
  without its expensive passes instead of XLA's -O2, about a quarter less
  compile time. -O1 is the lowest level at which every bit check holds: at -O0
  16 of the optimized kernel and fused checks differ by an ulp (a product
  contracted into a sum in one program and not in the other).

The emitters may round a float expression differently from XLA's defaults, so a
test that holds two programs to the same bits and needs the defaults is marked
``fusion_emitters``: it compiles with none of these options. Used by
tests/conftest.py (per test) and tests/_sharding_script.py (for its whole
process, where the test that starts it sets `SUBPROCESS_ENV`).
"""

import os
from collections.abc import Callable, Sequence

import jax

EMITTERS = "xla_cpu_use_fusion_emitters"

#: Options of the unoptimized tests' compiles (beside JAX's -O0).
UNOPTIMIZED: tuple[tuple[str, bool | int], ...] = ((EMITTERS, False),)

#: Options of the optimized tests' compiles.
OPTIMIZED: tuple[tuple[str, bool | int], ...] = (
    (EMITTERS, False),
    ("xla_backend_optimization_level", 1),
    ("xla_llvm_disable_expensive_passes", True),
)

#: ``OPTAX_LOWBIT_XLA_DEFAULTS=1`` keeps XLA's defaults everywhere.
ENV = "OPTAX_LOWBIT_XLA_DEFAULTS"
#: Set to 1 by a test for a subprocess whose compiles may all use `UNOPTIMIZED`
#: (its checks compare no two programs bit for bit).
SUBPROCESS_ENV = "OPTAX_LOWBIT_ELEMENTAL_EMITTERS"


def add_options_when(
    options: Callable[[], Sequence[tuple[str, bool | int]]],
) -> bool:
    """Wraps JAX's compile options so that every compile adds ``options()``.

    The options are part of the compile options, so JAX's persistent cache
    keeps executables built with different ones apart (its in-memory caches do
    not: callers clear them when ``options()`` changes). Returns False,
    wrapping nothing, where `ENV` is set, where this jax has no such hook, or
    where XLA refuses the options (a probe compile with `OPTIMIZED`, which
    holds every option either kind uses).

    Args:
      options: called at every compile; XLA debug options by name and value.

    Returns:
      Whether compiles now add ``options()``.
    """
    if os.environ.get(ENV, "0") == "1":
        return False
    try:
        from jax._src import compiler

        get_compile_options = compiler.get_compile_options
    except (ImportError, AttributeError):
        return False
    probing = [True]

    def compile_options(*args, **kwargs):
        compile_opts = get_compile_options(*args, **kwargs)
        extra = OPTIMIZED if probing[0] else tuple(options())
        if extra:
            compile_opts.env_option_overrides = [
                *compile_opts.env_option_overrides,
                *extra,
            ]
        return compile_opts

    compile_options.xla_cpu_options_wrapper = True
    compiler.get_compile_options = compile_options
    try:  # an XLA without an option refuses it at compile time
        jax.jit(lambda x: x + 1).lower(1.0).compile()
    except Exception:  # any refusal means: keep the defaults
        compiler.get_compile_options = get_compile_options
        return False
    finally:
        probing[0] = False
    return True


def wrapped() -> bool:
    """Whether `add_options_when` wrapped this process's compiles."""
    from jax._src import compiler

    return getattr(compiler.get_compile_options, "xla_cpu_options_wrapper", False)


def options_now() -> dict[str, bool | int]:
    """The options `add_options_when` adds to a compile now."""
    from jax._src import compiler

    return dict(compiler.get_compile_options(1, 1).env_option_overrides)
