"""What an optimizer state costs: `state_bytes`, `summarize` and `summary`.

Everything counts all-in: a `Packed` leaf is its ``codes`` plus its ``scales``,
padding included; counters and hyperparameters are counted too. Trees of
``jax.ShapeDtypeStruct`` (``jax.eval_shape(tx.init, params)``) work as well as
real states, so the cost can be read before anything is allocated.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from optax_lowbit import policy as _policy
from optax_lowbit.codecs import base

__all__ = ["Row", "state_bytes", "summarize", "summary"]

#: bytes per parameter of fp32 Adam's two moments
FP32_ADAM_BYTES_PER_PARAM = 8.0


def _leaf_bytes(x: Any) -> int:
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    if shape is None or dtype is None:
        return 0
    return math.prod(int(s) for s in shape) * np.dtype(dtype).itemsize


def state_bytes(opt_state: Any) -> int:
    """Bytes held by every array leaf of ``opt_state`` (``Packed`` included).

    Args:
      opt_state: an optimizer state, or its ``jax.eval_shape`` image.

    Returns:
      The total number of bytes, an int.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> import optax_lowbit as lowbit
      >>> params = {"w": jnp.zeros((64, 128))}
      >>> lowbit.state_bytes(optax.adam(1e-3).init(params))  # 2 x 4 B + count
      65540
      >>> shapes = jax.eval_shape(optax.adam(1e-3).init, params)
      >>> lowbit.state_bytes(shapes)
      65540
    """
    return sum(_leaf_bytes(x) for x in jax.tree.leaves(opt_state))


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of `summarize`.

    Attributes:
      kind: the codec's name (quantized leaves), a dtype name (plain state
        arrays) or ``"other"`` (counters, hyperparameters: 0-d arrays).
      reason: for plain arrays, why they are not quantized (``"rank < 2"``,
        ``"below min_size (4096)"``, ``"embedding"``, ...); ``""`` otherwise.
      leaves: number of state leaves (a `Packed` counts as one).
      elements: parameter elements those leaves stand for, each parameter
        once (its ``mu`` and ``nu`` in one row count once).
      bytes: bytes they hold.
    """

    kind: str
    reason: str
    leaves: int
    elements: int
    bytes: int

    @property
    def bytes_per_element(self) -> float:
        """Bytes per parameter element (``nan`` for ``"other"``)."""
        return self.bytes / self.elements if self.elements else float("nan")


def _param_index(params: Any) -> dict[tuple, tuple[Any, Any]]:
    """Maps a parameter's key path (as a tuple of str keys) to (path, leaf)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        out[_key_strs(path)] = (path, leaf)
    return out


def _key_strs(path: Any) -> tuple[str, ...]:
    keys = []
    for k in path:
        # nnx.Variable nodes add a trailing ".value" key: ignore it.
        s = jax.tree_util.keystr((k,))
        if s == ".value":
            continue
        keys.append(s)
    return tuple(keys)


def _match_param(path: Any, index: dict) -> tuple[Any, Any] | None:
    keys = _key_strs(path)
    for start in range(len(keys)):
        hit = index.get(keys[start:])
        if hit is not None:
            return hit
    return None


def _unwrap_nnx(opt_state: Any) -> Any:
    """An ``nnx.Optimizer``'s state; a clear error for an ``nnx.State``."""
    module = type(opt_state).__module__ or ""
    if module.startswith("flax"):
        name = type(opt_state).__name__
        if hasattr(opt_state, "opt_state") and name.endswith("Optimizer"):
            return opt_state.opt_state
        if name in ("State", "GraphState"):
            raise TypeError(
                "opt_state is an nnx.State: nnx.state() splits each packed leaf "
                "into bare codes and scales and drops its codec. Pass "
                "optimizer.opt_state (or the nnx.Optimizer itself) instead."
            )
    return opt_state


def summarize(opt_state: Any, params: Any = None, *, policy: Any = None) -> list[Row]:
    """The rows of `summary` as data: one `Row` per (kind, reason).

    Args:
      opt_state: an optimizer state or its ``jax.eval_shape`` image.
      params: the parameters (optional): with them, each plain state array is
        matched to its parameter by key path and the policy says why it was
        not quantized.
      policy: the policy the transform used (``None``: the default policy).

    Returns:
      A list of `Row`, quantized kinds first, then plain arrays, then
      ``"other"``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax_lowbit as lowbit
      >>> params = {"w": jnp.zeros((64, 128)), "b": jnp.zeros(128)}
      >>> rows = lowbit.summarize(lowbit.adamw_polar(1e-3).init(params), params)
      >>> [(r.kind, r.bytes) for r in rows[:2]]
      [('blockwise4-unsigned-b64-log-sr', 4608), ('polar-2b-signed-sr', 2304)]
    """
    opt_state = _unwrap_nnx(opt_state)
    policy = _policy.resolve(policy)
    index = _param_index(params) if params is not None else {}
    rows: dict[tuple[str, str], list[int]] = {}
    covered: dict[tuple[str, str], set[Any]] = {}

    def add(kind: str, reason: str, elements: int, nbytes: int, path: Any = ()) -> None:
        acc = rows.setdefault((kind, reason), [0, 0, 0])
        acc[0] += 1
        acc[2] += nbytes
        # A parameter counts once per row, though its mu and nu both land there:
        # the state path without attribute names (mu, nu, ...) is the parameter.
        key = tuple(k for k in path if not isinstance(k, jax.tree_util.GetAttrKey))
        if key not in covered.setdefault((kind, reason), set()):
            covered[(kind, reason)].add(key)
            acc[1] += elements

    flat = jax.tree_util.tree_flatten_with_path(
        opt_state, is_leaf=lambda x: isinstance(x, base.Packed)
    )[0]
    for path, leaf in flat:
        if isinstance(leaf, base.Packed):
            nbytes = _leaf_bytes(leaf.codes) + _leaf_bytes(leaf.scales)
            add(leaf.codec_name, "", math.prod(leaf.shape), nbytes, path)
            continue
        shape = getattr(leaf, "shape", None)
        if shape is None or getattr(leaf, "dtype", None) is None:
            continue
        if len(shape) == 0:
            add("other", "counters, hyperparameters", 0, _leaf_bytes(leaf))
            continue
        reason = "unquantized"
        if params is not None:
            hit = _match_param(path, index)
            if hit is None:
                reason = "not a parameter's state"
            else:
                reason = policy.reason(*hit) or "not quantized by this optimizer"
        add(
            np.dtype(leaf.dtype).name,
            reason,
            math.prod(shape),
            _leaf_bytes(leaf),
            path,
        )

    def order(item):
        (kind, reason), _ = item
        return (kind == "other", reason != "", kind, reason)

    return [
        Row(kind, reason, n, elements, nbytes)
        for (kind, reason), (n, elements, nbytes) in sorted(rows.items(), key=order)
    ]


def _num_params(opt_state: Any, params: Any) -> int | None:
    if params is not None:
        return sum(
            math.prod(getattr(_policy.unwrap(x), "shape", ()))
            for x in jax.tree.leaves(params)
        )

    # Without params: the elements of the first moment tree named ``mu``.
    def has_mu(x: Any) -> bool:
        return isinstance(x, tuple) and "mu" in getattr(x, "_fields", ())

    for node in jax.tree.leaves(opt_state, is_leaf=has_mu):
        if has_mu(node):
            leaves = jax.tree.leaves(
                node.mu, is_leaf=lambda x: isinstance(x, base.Packed)
            )
            return sum(math.prod(x.shape) for x in leaves if hasattr(x, "shape"))
    return None


def summary(opt_state: Any, params: Any = None, *, policy: Any = None) -> str:
    """A readable table of what the state holds, per codec and per reason.

    Columns: kind (codec name or dtype), leaves, params (elements covered),
    bytes, bytes/param, and, for plain arrays, why they were not quantized.
    The footer gives the total, the bytes per parameter of the whole state and
    the comparison with fp32 Adam's 8 B/param.

    Args:
      opt_state: an optimizer state or its ``jax.eval_shape`` image.
      params: the parameters (optional; needed for the "why" column).
      policy: the policy the transform used (``None``: the default policy).

    Returns:
      The table as a string.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> import optax_lowbit as lowbit
      >>> params = {"w": jnp.zeros((64, 128)), "b": jnp.zeros(128)}
      >>> state = lowbit.adamw_polar(1e-3).init(params)
      >>> print(lowbit.summary(state, params))
      kind                            leaves  params  bytes  B/param  note
      blockwise4-unsigned-b64-log-sr  1        8,192  4,608    0.562
      polar-2b-signed-sr              1        8,192  2,304    0.281
      float32                         2          128  1,024    8.000  rank < 2
      other                           2            -      8        -  counters, hyperparameters
      total                           6        8,320  7,944    0.955  0.12x fp32 Adam (8 B/param)
    """  # noqa: E501 (the doctest's table is the function's output)
    rows = summarize(opt_state, params, policy=policy)
    table = [("kind", "leaves", "params", "bytes", "B/param", "note")]
    for r in rows:
        table.append(
            (
                r.kind,
                str(r.leaves),
                f"{r.elements:,}" if r.kind != "other" else "-",
                f"{r.bytes:,}",
                f"{r.bytes_per_element:.3f}" if r.kind != "other" else "-",
                r.reason,
            )
        )
    total = sum(r.bytes for r in rows)
    n = _num_params(opt_state, params)
    if n:
        per = total / n
        note = f"{per / FP32_ADAM_BYTES_PER_PARAM:.2f}x fp32 Adam (8 B/param)"
        table.append(
            (
                "total",
                str(sum(r.leaves for r in rows)),
                f"{n:,}",
                f"{total:,}",
                f"{per:.3f}",
                note,
            )
        )
    else:
        table.append(
            ("total", str(sum(r.leaves for r in rows)), "-", f"{total:,}", "-", "")
        )
    widths = [max(len(row[i]) for row in table) for i in range(6)]
    lines = []
    for row in table:
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [row[i].rjust(widths[i]) for i in (2, 3, 4)]
        cells.append(row[5])
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
