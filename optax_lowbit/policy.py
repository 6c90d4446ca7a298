"""Which leaves get quantized optimizer states.

A policy is a predicate ``policy(path, leaf) -> bool`` over the leaves of the
parameter tree: ``True`` means the leaf's moments are stored by the codec,
``False`` means they stay float32. ``path`` is the leaf's key path (the tuple
that `jax.tree_util.tree_map_with_path` passes; `jax.tree_util.keystr` turns it
into ``"['layer']['kernel']"``) and ``leaf`` anything with a ``shape`` and a
``dtype``: a `jax.Array`, a sharded array, a `jax.ShapeDtypeStruct` or a
``flax.nnx.Variable`` (whose value is used).

The decision is made from the leaf's **global** shape, so it is the same under
any device mesh: a sharded array reports its global shape, and so does a
``ShapeDtypeStruct`` given to ``jax.eval_shape(tx.init, params)``.

The default follows the paper (and bitsandbytes' ``min_8bit_size``): embeddings,
biases and normalisation scales keep full-precision states; they are a small
share of the parameters and the most sensitive to state error.

Policies are structural: under ``optax.inject_hyperparams`` list ``"policy"``
in ``static_args`` (``inject_hyperparams`` would take any callable for a
schedule).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_lowbit import _checks

Policy = Callable[[Any, Any], bool]

__all__ = ["DefaultPolicy", "Policy", "PredicatePolicy", "default", "from_predicate"]


def unwrap(leaf: Any) -> Any:
    """Returns the array inside a ``flax.nnx.Variable``; other leaves as they are."""
    if type(leaf).__module__.startswith("flax") and hasattr(leaf, "get_value"):
        return leaf.get_value()
    return leaf


def _path_str(path: Any) -> str:
    if isinstance(path, str):
        return path
    try:
        return jax.tree_util.keystr(tuple(path))
    except (TypeError, ValueError):
        return str(path)


_NO_LEAF = object()


def _called_as_schedule(path: Any) -> TypeError:
    """The error of a policy called with one argument, as a schedule is."""
    return TypeError(
        f"the policy was called with one argument ({path!r}), as "
        "optax.inject_hyperparams calls a schedule with the step count: "
        "inject_hyperparams takes every callable argument for a schedule. The "
        "policy is structural (it fixes the state's layout): pass "
        "static_args=('bits', 'policy'), e.g. optax.inject_hyperparams("
        "lowbit.adamw_polar, static_args=('bits', 'policy'))(1e-3, policy=...)."
    )


def check_decision(path: Any, value: Any) -> bool:
    """A policy's ``value`` for a leaf as a bool; TypeError naming path and value.

    Python and NumPy bools (and concrete 0-d bool arrays) are accepted; any
    other value (the string ``"False"`` is truthy) is refused.
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if (
        not isinstance(value, jax.core.Tracer)
        and getattr(value, "shape", None) == ()
        and getattr(value, "dtype", None) == np.bool_
    ):
        return bool(value)
    raise TypeError(
        f"the policy must return a bool (True: quantize the leaf's states, "
        f"False: keep them in full precision), got {value!r} of type "
        f"{type(value).__name__} for the leaf {_path_str(path)}."
    )


def _is_complex(dtype: Any) -> bool:
    try:
        return bool(jnp.issubdtype(dtype, jnp.complexfloating))
    except TypeError:
        return False


def complex_refused(path: Any, dtype: Any) -> TypeError:
    """The error of a policy that quantizes a complex leaf."""
    return TypeError(
        f"the policy quantizes the complex leaf {_path_str(path)} ({dtype}); "
        "codecs store real values only. Keep complex leaves in full precision "
        "(their moments are then complex, as Optax's): have the policy return "
        "False for them, e.g. lowbit.policy.from_predicate(lambda path, x: not "
        "jnp.iscomplexobj(x) and ...), as lowbit.policy.default() does."
    )


def _is_float(dtype: Any) -> bool:
    try:
        return bool(jnp.issubdtype(dtype, jnp.floating))
    except TypeError:
        return False


@dataclasses.dataclass(frozen=True)
class DefaultPolicy:
    """Quantize floating-point leaves that are large, of rank >= 2, not embeddings.

    Call it as ``policy(path, leaf) -> bool``; `reason` tells why a leaf is
    left in float32 (used by `optax_lowbit.summary`).

    Attributes:
      min_size: smallest number of elements (global shape) that is quantized.
      min_rank: smallest rank that is quantized (2 leaves biases and norm
        scales, which are vectors, in float32).
      exclude: case-insensitive substrings of the path
        (`jax.tree_util.keystr`) that keep a leaf in float32.
    """

    min_size: int = 4096
    min_rank: int = 2
    exclude: tuple[str, ...] = ("embed",)

    def reason(self, path: Any, leaf: Any) -> str | None:
        """Why the leaf stays float32, or ``None`` if it is quantized."""
        leaf = unwrap(leaf)
        if _is_complex(getattr(leaf, "dtype", None)):
            return "complex"
        if not _is_float(getattr(leaf, "dtype", None)):
            return "not floating point"
        shape = tuple(leaf.shape) if hasattr(leaf, "shape") else np.shape(leaf)
        if len(shape) < self.min_rank:
            return f"rank < {self.min_rank}"
        if math.prod(shape) < self.min_size:
            return f"below min_size ({self.min_size})"
        name = _path_str(path).lower()
        for word in self.exclude:
            if word.lower() in name:
                return "embedding" if "embed" in word.lower() else f"path has {word!r}"
        return None

    def __call__(self, path: Any, leaf: Any = _NO_LEAF) -> bool:
        """Whether the leaf's moments are quantized."""
        if leaf is _NO_LEAF:
            raise _called_as_schedule(path)
        return self.reason(path, leaf) is None


@dataclasses.dataclass(frozen=True)
class PredicatePolicy:
    """A user predicate ``fn(path, leaf) -> bool`` used as a policy.

    The leaf it receives is already unwrapped from a ``flax.nnx.Variable``.
    Integer leaves are never quantized, whatever ``fn`` says; a complex leaf
    for which ``fn`` returns True raises a TypeError naming it (codecs store
    real values; complex leaves keep full-precision, complex moments).
    ``fn`` must return a bool (or a NumPy bool): anything else (e.g. the
    string ``"False"``, which is truthy) raises a TypeError naming the leaf.
    """

    fn: Callable[[Any, Any], Any]

    def reason(self, path: Any, leaf: Any) -> str | None:
        """Why the leaf stays float32, or ``None`` if it is quantized."""
        leaf = unwrap(leaf)
        dtype = getattr(leaf, "dtype", None)
        if _is_complex(dtype):
            if check_decision(path, self.fn(path, leaf)):
                raise complex_refused(path, dtype)
            return "excluded by policy"
        if not _is_float(dtype):
            return "not floating point"
        decision = check_decision(path, self.fn(path, leaf))
        return None if decision else "excluded by policy"

    def __call__(self, path: Any, leaf: Any = _NO_LEAF) -> bool:
        """Whether the leaf's moments are quantized."""
        if leaf is _NO_LEAF:
            raise _called_as_schedule(path)
        return self.reason(path, leaf) is None


def default(
    min_size: int = 4096,
    min_rank: int = 2,
    exclude: Sequence[str] = ("embed",),
) -> DefaultPolicy:
    """The default policy (DESIGN §5): float, >= ``min_size`` elements, rank >= 2.

    Args:
      min_size: smallest number of elements of a quantized leaf.
      min_rank: smallest rank of a quantized leaf.
      exclude: case-insensitive substrings of the key path that keep a leaf in
        float32 (embeddings by default).

    Returns:
      A `DefaultPolicy`, a hashable callable ``(path, leaf) -> bool``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import optax_lowbit as lowbit
      >>> policy = lowbit.policy.default()
      >>> params = {"dense": jnp.zeros((64, 128)), "bias": jnp.zeros(128),
      ...           "embed": jnp.zeros((1000, 64))}
      >>> jax.tree_util.tree_map_with_path(policy, params)
      {'bias': False, 'dense': True, 'embed': False}
      >>> policy.reason(("bias",), params["bias"])
      'rank < 2'
    """
    for name, value in (("min_size", min_size), ("min_rank", min_rank)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int >= 0, got {value!r}.")
        if value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}.")
    if isinstance(exclude, str):
        exclude = (exclude,)
    exclude = tuple(exclude)
    if not all(isinstance(w, str) for w in exclude):
        raise TypeError(f"exclude must be a sequence of strings, got {exclude!r}.")
    return DefaultPolicy(
        min_size=int(min_size), min_rank=int(min_rank), exclude=exclude
    )


def from_predicate(fn: Callable[[Any, Any], Any]) -> PredicatePolicy:
    """Wraps a predicate ``fn(path, leaf) -> bool`` as a policy.

    Args:
      fn: called with the key path and the leaf (a Variable's value, not the
        Variable); decide from ``leaf.shape`` and ``leaf.dtype`` only, which are
        global shapes and dtypes, never from values.

    Returns:
      A `PredicatePolicy`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax_lowbit as lowbit
      >>> policy = lowbit.policy.from_predicate(lambda path, x: x.ndim == 2)
      >>> policy(("w",), jnp.zeros((4, 4))), policy(("b",), jnp.zeros(4))
      (True, False)
    """
    _checks.is_callable("fn", fn)
    if isinstance(fn, (DefaultPolicy, PredicatePolicy)):
        return fn
    return PredicatePolicy(fn)


def resolve(policy: Any) -> DefaultPolicy | PredicatePolicy:
    """``None`` -> `default()`; a policy object as is; any callable wrapped."""
    if policy is None:
        return default()
    if isinstance(policy, (DefaultPolicy, PredicatePolicy)):
        return policy
    if not callable(policy):
        raise TypeError(
            f"policy must be callable as policy(path, leaf) -> bool, or None for "
            f"lowbit.policy.default(), got {policy!r} of type "
            f"{type(policy).__name__}."
        )
    return PredicatePolicy(policy)


def reason(policy: Any, path: Any, leaf: Any) -> str | None:
    """Why ``policy`` keeps ``leaf`` in float32, or ``None`` if it quantizes it."""
    policy = resolve(policy)
    return policy.reason(path, leaf)
