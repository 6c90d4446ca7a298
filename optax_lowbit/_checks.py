"""Argument checks shared by every public constructor.

Each check raises at construction time with a message that names the argument,
the value received and what is accepted, e.g.
``ValueError: bits must be one of (1.5, 2), got 3``.

Checks on numeric hyperparameters run on concrete numbers and scalar arrays:
under ``optax.inject_hyperparams`` they may be tracers, and a tracer is never
branched on (only its type is checked: `numeric`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np


def is_concrete_number(value: Any) -> bool:
    """Whether ``value`` is a Python or NumPy number (not a bool, array or tracer)."""
    if isinstance(value, jax.core.Tracer):
        return False
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, bool
    )


def one_of(name: str, value: Any, accepted: Sequence[Any], hint: str = "") -> None:
    """Raises ValueError unless ``value`` is one of ``accepted`` (bools rejected)."""
    ok = any(
        type(value) is not bool and value == a and type(a) is not bool
        if not isinstance(a, bool)
        else value is a
        for a in accepted
    )
    if not ok:
        msg = f"{name} must be one of {tuple(accepted)}, got {value!r}"
        raise ValueError(msg + (f"; {hint}" if hint else "."))


def is_bool(name: str, value: Any) -> None:
    """Raises TypeError unless ``value`` is a Python bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool (True or False), got {value!r}.")


def positive_int(name: str, value: Any) -> None:
    """Raises TypeError/ValueError unless ``value`` is an int > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a positive int, got {value!r}.")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")


def positive_int_hyperparameter(name: str, value: Any) -> None:
    """`positive_int`, also taking integer scalar arrays and tracers.

    For an integer hyperparameter that is not structural (Muon's
    ``ns_steps``): ``optax.inject_hyperparams`` passes it as an int32 array,
    concrete at ``init`` and traced in ``update`` (never branched on).
    """
    if isinstance(value, jax.core.Tracer):
        return
    if isinstance(value, (jax.Array, np.ndarray, np.generic)) and np.ndim(value) == 0:
        if jax.numpy.issubdtype(value.dtype, np.integer):
            value = int(value)
    positive_int(name, value)


def positive(name: str, value: Any) -> None:
    """Checks value > 0 unless ``value`` is traced (`numeric`)."""
    number = numeric(name, value)
    if number is not None and not number > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}.")


def divisible(name: str, value: int, by_name: str, by: int) -> None:
    """Raises ValueError unless ``value`` is a multiple of ``by``."""
    if value % by:
        raise ValueError(
            f"{name}={value} must be a multiple of {by_name}={by}; "
            f"accepted: {by}, {2 * by}, {3 * by}, ..."
        )


def numeric(name: str, value: Any) -> float | None:
    """The value of a numeric hyperparameter, or ``None`` where it is traced.

    Accepted: a Python or NumPy number, a concrete JAX or NumPy scalar array
    of a numeric dtype (its value is returned and checked like a number),
    and a tracer (``optax.inject_hyperparams`` traces the values it
    injects; never branched on). A string, ``None``, a bool, a sequence or
    an array of several values would fail deep inside the first traced
    step instead.

    Raises:
      TypeError: naming ``name`` and the value.
    """
    if is_concrete_number(value):
        return value
    if isinstance(value, jax.core.Tracer):
        return None
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        real = any(
            jax.numpy.issubdtype(value.dtype, t) for t in (np.integer, np.floating)
        )
        if np.ndim(value) == 0 and real:  # bfloat16 too (numpy's kind "V")
            return float(value)
    raise TypeError(
        f"{name} must be a number (a Python or NumPy number, or a numeric scalar "
        f"array such as optax.inject_hyperparams passes), got {value!r}."
    )


def scalar_or_schedule(name: str, value: Any, *, none: str = "") -> None:
    """Raises TypeError unless ``value`` is a number (`numeric`) or a schedule.

    As Optax's ``ScalarOrSchedule``: a callable passes as a schedule (it is
    called on the step count when traced). ``none``: what ``None`` means
    where it is accepted (``optax.scale_by_learning_rate``: no scaling);
    empty where it is not.
    """
    if callable(value) or (value is None and none):
        return
    try:
        numeric(name, value)
    except TypeError:
        accepted = "a number, a scalar array or an optax.Schedule" + (
            f", or None ({none})" if none else ""
        )
        raise TypeError(f"{name} must be {accepted}, got {value!r}.") from None


def in_unit_interval(name: str, value: Any, *, closed_right: bool = False) -> None:
    """Checks 0 <= value < 1 (or <= 1) unless ``value`` is traced (`numeric`)."""
    number = numeric(name, value)
    if number is None:
        return
    ok = 0.0 <= number <= 1.0 if closed_right else 0.0 <= number < 1.0
    if not ok:
        right = "1]" if closed_right else "1)"
        raise ValueError(f"{name} must be in [0, {right}, got {value!r}.")


def non_negative(name: str, value: Any) -> None:
    """Checks value >= 0 unless ``value`` is traced (`numeric`)."""
    number = numeric(name, value)
    if number is not None and not number >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}.")


def increasing_in_open_unit(name: str, values: Sequence[float]) -> None:
    """Checks a non-empty, strictly increasing sequence of radii in (0, 1]."""
    vals = list(values)
    if not vals:
        raise ValueError(
            f"{name} must be a non-empty sequence of radii, got {values!r}."
        )
    for v in vals:
        if not is_concrete_number(v) or not 0.0 < float(v) <= 1.0:
            raise ValueError(
                f"{name} must hold numbers in (0, 1], got {values!r}; "
                "radii are normalised by the group scale."
            )
    if any(b <= a for a, b in itertools.pairwise(vals)):
        raise ValueError(f"{name} must be strictly increasing, got {values!r}.")


def float_array(name: str, x: Any) -> None:
    """Raises TypeError unless ``x`` has a floating-point dtype."""
    dtype = getattr(x, "dtype", None)
    if dtype is None or not np.issubdtype(np.dtype(dtype), np.floating):
        raise TypeError(
            f"{name} must be a floating-point array (float16, bfloat16, float32 or "
            f"float64), got dtype {dtype}."
        )


def is_callable(name: str, value: Any) -> None:
    """Raises TypeError unless ``value`` is callable."""
    if not callable(value):
        raise TypeError(f"{name} must be callable, got {value!r}.")


def transformation(
    name: str, tx: Any, needs: Sequence[str] = ("init", "update"), hint: str = ""
) -> None:
    """Raises TypeError unless ``tx`` has the callables ``needs`` (an Optax one)."""
    if not all(callable(getattr(tx, method, None)) for method in needs):
        methods = " and ".join(needs)
        raise TypeError(
            f"{name} must be an optax.GradientTransformation (with {methods}), "
            f"got {tx!r}" + (f"; {hint}" if hint else ".")
        )


def shape_of(name: str, shape: Any) -> tuple[int, ...]:
    """Returns ``shape`` as a tuple of non-negative ints, or raises TypeError."""
    try:
        out = tuple(int(s) for s in shape)
    except TypeError as e:
        raise TypeError(f"{name} must be a tuple of ints, got {shape!r}.") from e
    if any(s < 0 for s in out):
        raise ValueError(f"{name} must hold non-negative ints, got {shape!r}.")
    return out


def static_arg(name: str, value: Any, accepted: str) -> None:
    """Raises TypeError if ``value`` is an array or tracer (it shapes the state).

    ``optax.inject_hyperparams`` turns every int/float argument into an array
    unless it is listed in ``static_args``; a structural argument (one that
    fixes the state's layout) must stay a Python value.
    """
    if isinstance(value, (jax.Array, jax.core.Tracer, np.ndarray)):
        raise TypeError(
            f"{name} must be a Python value ({accepted}), got an array "
            f"({value!r}); {name} sets the state's layout. Under "
            f"optax.inject_hyperparams pass static_args=('{name}',)."
        )
