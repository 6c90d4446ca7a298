"""Move an optimizer state between Optax's Adam and the low-bit Adams.

``convert(opt_state, tx, params)`` returns the state of ``tx`` that continues
``opt_state``: it walks both states, finds every Adam entry
(`optax.ScaleByAdamState` or `ScaleByAdamQuantizedState`) and re-encodes its
moments in the target's layout, keeping ``count``; every other entry of the
state (schedule counters, masks, ``MultiSteps`` accumulators, injected
hyperparameters) is kept as it is. The two states must have the same shape
outside the Adam entries, e.g. ``optax.adamw`` <-> ``lowbit.adamw_polar`` with
the same ``learning_rate`` kind (float or schedule) and ``mask``, or one low-bit
preset <-> another.

Precision of a round trip:

* fp32 -> low-bit is lossy: each moment gets the target codec's quantization
  error (about what one encode per step costs anyway);
* low-bit -> fp32 is exact: the moments are decoded to float32;
* with ``lowbit.codecs.identity()`` both ways are exact.

A low-bit source state is decoded with the codec each `Packed` leaf carries
(static metadata of the state, restored by Orbax from the target template);
the target leaves are encoded with the codecs of ``tx``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_lowbit import _checks
from optax_lowbit.codecs import base
from optax_lowbit.transforms import _quantized
from optax_lowbit.transforms import adam as _adam

__all__ = ["convert"]

_ADAM_STATES = (optax.ScaleByAdamState, _adam.ScaleByAdamQuantizedState)


def _is_adam(x: Any) -> bool:
    return isinstance(x, _ADAM_STATES)


def _decode(x: Any) -> jax.Array:
    if isinstance(x, base.Packed):
        return x.decode()  # a Packed carries the codec that made it
    x = jnp.asarray(x)
    return x.astype(_quantized.compute_dtype(x.dtype))  # complex stays complex


def _encode(value: jax.Array, like: Any) -> Any:
    if isinstance(like, base.Packed):
        return like.codec.encode(value)  # the target template's codec
    return value.astype(like.dtype)


def _moment(src: Any, dst_like: Any, name: str, where: str) -> Any:
    is_leaf = _quantized.is_packed
    src_def = jax.tree.structure(src, is_leaf=is_leaf)
    dst_def = jax.tree.structure(dst_like, is_leaf=is_leaf)
    if src_def != dst_def:
        raise ValueError(
            f"convert: {where}.{name} covers different parameters in the two "
            f"states: {src_def} vs {dst_def}. Pass the params the state was made "
            "for."
        )
    out = []
    for s, d in zip(
        jax.tree.leaves(src, is_leaf=is_leaf),
        jax.tree.leaves(dst_like, is_leaf=is_leaf),
        strict=True,
    ):
        if tuple(s.shape) != tuple(d.shape):
            raise ValueError(
                f"convert: {where}.{name} has a leaf of shape {tuple(s.shape)} "
                f"where the target has {tuple(d.shape)}."
            )
        out.append(_encode(_decode(s), d))
    return jax.tree.unflatten(dst_def, out)


def convert(
    opt_state: Any,
    tx: optax.GradientTransformation,
    params: Any,
) -> Any:
    """Converts an Adam-family state into the state of ``tx``, mid-training.

    Args:
      opt_state: the current state, e.g. of ``optax.adamw(...)`` or of a
        low-bit alias.
      tx: the target transformation, e.g. ``lowbit.adamw_polar(...)`` or
        ``optax.adamw(...)`` (or a fused optimizer); its state must have the
        shape of ``opt_state`` outside the Adam entries.
      params: the parameters (``tx.init`` is traced on them with
        ``jax.eval_shape``: nothing is allocated for the template).

    Returns:
      The state of ``tx``: Adam entries re-encoded (``count`` kept), everything
      else taken from ``opt_state``.

    Raises:
      ValueError: if the states differ outside their Adam entries, or have a
        different number of Adam entries.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> import optax_lowbit as lowbit
      >>> params = {"w": jnp.ones((64, 128))}
      >>> fp32 = optax.adamw(1e-3)
      >>> state = fp32.init(params)
      >>> _, state = fp32.update(params, state, params)
      >>> low = lowbit.convert(state, lowbit.adamw_polar(1e-3), params)
      >>> type(low[0]).__name__, int(low[0].count)
      ('ScaleByAdamQuantizedState', 1)
      >>> back = lowbit.convert(low, fp32, params)
      >>> type(back[0]).__name__, back[0].mu["w"].dtype
      ('ScaleByAdamState', dtype('float32'))
    """
    # only its init is traced: a FusedOptimizer passes too
    _checks.transformation("tx", tx, needs=("init",))
    target = jax.eval_shape(tx.init, params)
    src_flat, src_def = jax.tree.flatten(opt_state, is_leaf=_is_adam)
    dst_flat, dst_def = jax.tree.flatten(target, is_leaf=_is_adam)
    n_src = sum(map(_is_adam, src_flat))
    n_dst = sum(map(_is_adam, dst_flat))
    if n_src == 0 or n_src != n_dst:
        raise ValueError(
            f"convert: opt_state has {n_src} Adam states and the target's state "
            f"{n_dst}; convert moves Adam moments (optax.ScaleByAdamState <-> "
            "ScaleByAdamQuantizedState) between optimizers of the same chain, "
            "e.g. optax.adamw <-> lowbit.adamw_polar."
        )
    if src_def != dst_def:
        raise ValueError(
            "convert: opt_state and tx.init(params) differ outside their Adam "
            "states; build tx with the same chain as the one that made opt_state "
            "(same wrappers, a schedule where it had one, the same mask).\n"
            f"  opt_state: {src_def}\n  target:    {dst_def}"
        )
    out = []
    for i, (s, d) in enumerate(zip(src_flat, dst_flat, strict=True)):
        if not _is_adam(s):
            if _is_adam(d):
                raise ValueError(f"convert: Adam state #{i} has no counterpart.")
            out.append(s)
            continue
        where = f"{type(s).__name__}#{i}"
        mu = _moment(s.mu, d.mu, "mu", where)
        nu = _moment(s.nu, d.nu, "nu", where)
        count = jnp.asarray(s.count).astype(d.count.dtype)
        if isinstance(d, _adam.ScaleByAdamQuantizedState):
            fmt = jnp.asarray(_adam.STATE_FORMAT, jnp.int32)
            out.append(type(d)(count=count, mu=mu, nu=nu, format=fmt))
        else:
            out.append(type(d)(count=count, mu=mu, nu=nu))
    return jax.tree.unflatten(dst_def, out)
