"""Public functions generated from one definition of their arguments.

The Adam presets (`optax_lowbit.transforms.adam_presets`) and the AdamW
aliases (`optax_lowbit.alias`) are families: the same arguments, checks and
documentation for every codec pair. Writing each by hand copies the argument
list and its docstring once per codec and per kind (transform, Adam, AdamW),
so each is built here from `Arg` records instead: a real signature
(``inspect.signature``, ``help``, ``optax.inject_hyperparams`` read it),
Python's own errors for unknown or missing arguments, and a Google-style
docstring whose ``Args`` section is written from the same records.
"""

from __future__ import annotations

import importlib
import inspect
import textwrap
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

_EMPTY = inspect.Parameter.empty


class Arg(NamedTuple):
    """One argument of a generated function.

    Attributes:
      name: the argument's name.
      doc: its description in the ``Args`` section (one paragraph).
      default: its default (``inspect.Parameter.empty``: required).
      keyword_only: whether it comes after ``*``.
    """

    name: str
    doc: str
    default: Any = _EMPTY
    keyword_only: bool = False


def keyword_only(args: Sequence[Arg]) -> tuple[Arg, ...]:
    """``args`` made keyword-only (the options after ``*``)."""
    return tuple(a._replace(keyword_only=True) for a in args)


def signature(args: Sequence[Arg]) -> inspect.Signature:
    """The `inspect.Signature` of ``args``, in their order."""
    kinds = {
        False: inspect.Parameter.POSITIONAL_OR_KEYWORD,
        True: inspect.Parameter.KEYWORD_ONLY,
    }
    return inspect.Signature(
        [
            inspect.Parameter(a.name, kinds[a.keyword_only], default=a.default)
            for a in args
        ]
    )


def args_section(args: Sequence[Arg]) -> str:
    """The ``Args:`` section of a Google-style docstring (4-space indent)."""
    lines = ["Args:"]
    for a in args:
        lines += textwrap.wrap(
            f"{a.name}: {a.doc}",
            width=80,
            initial_indent="  ",
            subsequent_indent="    ",
            break_on_hyphens=False,
        )
    return "\n".join(lines)


def function(
    name: str,
    args: Sequence[Arg],
    body: Callable[..., Any],
    doc: str,
    module: str,
) -> Callable[..., Any]:
    r"""A function ``name(*args)`` that calls ``body`` with every argument by name.

    Args:
      name: the function's ``__name__``.
      args: its arguments, in order (keyword-only ones after the others).
      body: called as ``body(**arguments)``, defaults applied.
      doc: its docstring (``{args}`` is replaced by `args_section`).
      module: its ``__module__`` (so doctest and the docs find it there).

    Returns:
      The function.

    Examples:
      >>> import inspect
      >>> from optax_lowbit import _generate as gen
      >>> f = gen.function("scaled", [gen.Arg("x", "a number."),
      ...     gen.Arg("by", "factor.", 2.0, keyword_only=True)],
      ...     lambda x, by: x * by, "Scales x.\n\n{args}", __name__)
      >>> f(3), f(3, by=0.5), str(inspect.signature(f))
      (6.0, 1.5, '(x, *, by=2.0)')
    """
    sig = signature(args)

    def generated(*a: Any, **k: Any) -> Any:
        bound = sig.bind(*a, **k)
        bound.apply_defaults()
        return body(**bound.arguments)

    generated.__name__ = generated.__qualname__ = name
    generated.__module__ = module
    generated.__signature__ = sig  # type: ignore[attr-defined]
    generated.__doc__ = doc.replace("{args}", args_section(args))
    return generated


def forward(module: str, names: Sequence[str], target: str) -> Callable[[str], Any]:
    """A module ``__getattr__`` serving ``names`` from ``target`` (moved names).

    Args:
      module: the module it is installed in (for the error message).
      names: the names that moved.
      target: the module they live in now (imported on first access).

    Returns:
      ``__getattr__(name)``, raising AttributeError for other names.
    """

    def __getattr__(name: str) -> Any:
        if name in names:
            return getattr(importlib.import_module(target), name)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
