"""XLA:CPU's elemental emitters for the suite's unoptimized compiles.

Most of the suite's time is XLA compiling small programs on a CPU, and XLA:CPU
compiles them in about half the time with its elemental emitters
(``xla_cpu_use_fusion_emitters=false``) than with its default fusion emitters.
The emitters may round a float expression differently (a product contracted
into a sum in one program and not in another), so tests that hold two programs
to the same bits keep XLA's defaults: those marked ``optimized`` or
``fusion_emitters`` (tests/conftest.py). Used by tests/conftest.py (per test)
and tests/_sharding_script.py (for its whole process, where the test that
starts it sets `SUBPROCESS_ENV`).
"""

import os
from collections.abc import Callable

import jax

OPTION = "xla_cpu_use_fusion_emitters"
#: ``OPTAX_LOWBIT_FUSION_EMITTERS=1`` keeps XLA's default emitters everywhere.
ENV = "OPTAX_LOWBIT_FUSION_EMITTERS"
#: Set to 1 by a test for a subprocess whose compiles may all use the elemental
#: emitters (its checks compare no two programs bit for bit).
SUBPROCESS_ENV = "OPTAX_LOWBIT_ELEMENTAL_EMITTERS"


def use_elemental_emitters_when(on: Callable[[], bool]) -> bool:
    """Wraps JAX's compile options so that compiles use XLA:CPU's elemental
    emitters while ``on()`` is true.

    The option is part of the compile options, so JAX's persistent cache keeps
    the two kinds of executable apart (its in-memory caches do not: callers
    clear them when ``on()`` changes). Returns False, wrapping nothing, where
    `ENV` is set, where this jax has no such hook, or where XLA refuses the
    option (a probe compile).

    Args:
      on: called at every compile.

    Returns:
      Whether compiles now follow ``on()``.
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
        options = get_compile_options(*args, **kwargs)
        if probing[0] or on():
            options.env_option_overrides = [
                *options.env_option_overrides,
                (OPTION, False),
            ]
        return options

    compile_options.elemental_emitters_wrapper = True
    compiler.get_compile_options = compile_options
    try:  # an XLA without the option refuses it at compile time
        jax.jit(lambda x: x + 1).lower(1.0).compile()
    except Exception:  # any refusal means: keep the defaults
        compiler.get_compile_options = get_compile_options
        return False
    finally:
        probing[0] = False
    return True


def wrapped() -> bool:
    """Whether `use_elemental_emitters_when` wrapped this process's compiles."""
    from jax._src import compiler

    return getattr(compiler.get_compile_options, "elemental_emitters_wrapper", False)


def elemental_emitters_on() -> bool:
    """Whether a compile now would use the elemental emitters."""
    from jax._src import compiler

    overrides = dict(compiler.get_compile_options(1, 1).env_option_overrides)
    return overrides.get(OPTION) is False
