"""Optimizer state kept in host memory between steps: `offload`.

When even low-bit states do not fit, the state can live in pinned host memory
and visit the accelerator only inside the step: `offload(tx)` wraps any
`optax.GradientTransformation` so that ``init`` places the chosen state leaves
in host memory (``jax.memory.Space.Host``, pinned host memory on GPU) and
``update`` moves them to the device, runs ``tx.update`` there and moves the
new state back, all inside the caller's ``jax.jit`` (XLA schedules the
copies; on GPU they may overlap with compute). Low-bit states make the copies
small: a 2-bit polar moment pair moves 0.84 B/param each way, fp32 Adam's 8.

Donate the params, not an offloaded state: a jitted step with the state in
``donate_argnums`` fails (the runtime cannot alias a pinned-host input buffer
to the step's output; on the CPU backend the process aborts).

The state keeps its structure, shapes and dtypes (only the memory kind of the
offloaded leaves differs), so checkpoints, `optax_lowbit.summary` and
`optax_lowbit.convert` work as with the wrapped optimizer, and the updates
are bit-identical to ``tx``'s.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from optax_lowbit import _checks

__all__ = ["offload"]


def _default_where(path: Any, leaf: Any) -> bool:
    """Arrays with at least one axis (moments, codes, scales); not counters."""
    del path
    return getattr(leaf, "ndim", 0) >= 1


def _move(tree: Any, space: Any, where: Callable[[Any, Any], Any]) -> Any:
    """``tree`` with the leaves ``where`` selects put in memory ``space``."""

    def move(path: Any, leaf: Any) -> Any:
        if not where(path, leaf):
            return leaf
        return jax.device_put(leaf, space)

    return jax.tree_util.tree_map_with_path(move, tree)


def offload(
    tx: optax.GradientTransformation,
    *,
    where: Callable[[Any, Any], bool] | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Keeps ``tx``'s state in host memory between steps.

    Args:
      tx: any `optax.GradientTransformation` (a low-bit alias, an Optax one).
      where: ``where(path, leaf) -> bool`` over the state's leaves: which ones
        live in host memory (``path`` as in ``jax.tree_util``). ``None``:
        every leaf with at least one axis (the moments; step counters stay on
        the device).

    Returns:
      An `optax.GradientTransformationExtraArgs` with ``tx``'s state and
      updates; jit its ``update`` (or the whole train step) as usual.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import optax_lowbit as lowbit
      >>> params = {"w": jnp.ones((64, 128))}
      >>> tx = lowbit.offload(lowbit.adamw_polar(1e-2))
      >>> state = tx.init(params)
      >>> state[0].mu["w"].codes.sharding.memory_kind
      'pinned_host'
      >>> updates, state = jax.jit(tx.update)(
      ...     {"w": jnp.full((64, 128), 0.5)}, state, params)
      >>> state[0].mu["w"].codes.sharding.memory_kind, int(state[0].count)
      ('pinned_host', 1)

    References:
      Ren et al, `ZeRO-Offload: Democratizing Billion-Scale Model Training
      <https://arxiv.org/abs/2101.06840>`_, 2021
    """
    _checks.transformation(
        "tx", tx, hint="a FusedOptimizer's transformation is its .tx."
    )
    if where is not None:
        _checks.is_callable("where", where)
    selected = _default_where if where is None else where
    host, device = jax.memory.Space.Host, jax.memory.Space.Device
    inner = optax.with_extra_args_support(tx)

    def init_fn(params: optax.Params) -> optax.OptState:
        return _move(tx.init(params), host, selected)

    def update_fn(
        updates: optax.Updates,
        state: optax.OptState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, optax.OptState]:
        on_device = _move(state, device, selected)
        updates, new_state = inner.update(updates, on_device, params, **extra_args)
        return updates, _move(new_state, host, selected)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
