"""Lion over a quantized momentum: `scale_by_lion_quantized`.

Semantics are `optax.scale_by_lion`'s, step for step: decode the momentum to
float32, take the sign of the interpolation ``(1 - b1) g + b1 m`` (from the
float32 momentum), update ``m = (1 - b2) g + b2 m``, then encode ``m``. With
``lowbit.codecs.identity()`` the result equals `optax.scale_by_lion`, and
`optax_lowbit.lion_polar` equals `optax.lion`.

Lion keeps one state (the momentum) and its update is a sign, so a coarse
momentum code only matters where the interpolation is near zero.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_lowbit import _checks
from optax_lowbit.codecs import base
from optax_lowbit.transforms import _quantized

_MODES = ("hard", "smooth", "refined")


class ScaleByLionQuantizedState(NamedTuple):
    """State of `scale_by_lion_quantized` (the layout of `optax.ScaleByLionState`).

    Attributes:
      count: int32 array of shape ``()``: the number of updates so far.
      mu: the momentum, the structure of the parameters; per leaf a `Packed`
        (the policy quantizes it) or a float array.
    """

    count: jax.Array
    mu: optax.Updates


def scale_by_lion_quantized(
    b1: Any = 0.9,
    b2: Any = 0.99,
    mu_dtype: Any = None,
    *,
    mu_codec: base.Codec,
    policy: Any = None,
    mode: str = "hard",
    smooth_beta: Any = 1.0,
) -> optax.GradientTransformation:
    r"""Rescales updates by the Lion rule, keeping the momentum in a given codec.

    Per leaf, with :math:`g` the update:

    .. math::

      u = \operatorname{sign}\big((1 - \beta_1) g + \beta_1 m\big), \qquad
      m \leftarrow (1 - \beta_2) g + \beta_2 m

    computed in float32 from the decoded momentum; then ``m`` is encoded again.

    Faults: the update is Optax's (NaN for a NaN element, ``±1`` for ``±inf``);
    a non-finite element keeps its old momentum and its group is encoded as
    if it had not come; a momentum overflowing float32 saturates at
    ``±base.MAX_STORED`` (`optax_lowbit.codecs.base.saturate_or_keep`).

    Args:
      b1: rate combining the momentum and the current update, as in
        `optax.scale_by_lion`.
      b2: decay rate of the momentum.
      mu_dtype: dtype of the momentum on the leaves the policy keeps
        unquantized: ``None`` (the parameter's dtype, as in
        `optax.scale_by_lion`), ``jnp.float32`` or ``jnp.bfloat16``. A complex
        leaf's momentum is complex.
      mu_codec: codec of the momentum on quantized leaves (must be signed).
      policy: ``policy(path, leaf) -> bool``, which leaves are quantized
        (`optax_lowbit.policy`); ``None`` is ``lowbit.policy.default()``.
      mode: ``"hard"`` (sign), ``"smooth"`` (``tanh(smooth_beta * x)``) or
        ``"refined"`` (linear inside [-1, 1], sign outside), as in Optax.
      smooth_beta: slope of the ``"smooth"`` mode.

    Returns:
      An `optax.GradientTransformation` over a `ScaleByLionQuantizedState`
      whose updates are the signs (or the ``mode``'s smooth or refined
      version) of the interpolated momentum, in the incoming updates' dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax_lowbit as lowbit
      >>> tx = lowbit.scale_by_lion_quantized(
      ...     mu_codec=lowbit.codecs.identity(), policy=lambda path, x: True)
      >>> state = tx.init({"w": jnp.zeros(3)})
      >>> u, state = tx.update({"w": jnp.array([0.5, -2.0, 0.0])}, state)
      >>> print(u["w"], state.mu["w"].codes)
      [ 1. -1.  0.] [ 0.005 -0.02   0.   ]

    References:
      Chen et al, `Symbolic Discovery of Optimization Algorithms
      <https://arxiv.org/abs/2302.06675>`_, 2023
    """
    mu_codec = _quantized.check_codec("mu_codec", mu_codec, signed=True)
    _checks.in_unit_interval("b1", b1, closed_right=True)
    _checks.in_unit_interval("b2", b2, closed_right=True)
    _checks.one_of("mode", mode, _MODES)
    _checks.non_negative("smooth_beta", smooth_beta)
    fallback = _quantized.moment_dtype("mu_dtype", mu_dtype)
    policy = _quantized.resolve_policy(policy)

    def sign(x: jax.Array) -> jax.Array:
        if mode == "hard":
            return jnp.sign(x)
        if mode == "smooth":
            return jnp.tanh(smooth_beta * x)
        return jnp.where(jnp.abs(x) < 1.0, x, jnp.sign(x))

    def step(g32: jax.Array, m: jax.Array, count: jax.Array) -> tuple[jax.Array, ...]:
        del count
        return sign((1.0 - b1) * g32 + b1 * m), (1.0 - b2) * g32 + b2 * m

    return _quantized.one_moment(
        "scale_by_lion_quantized",
        ScaleByLionQuantizedState,
        "mu",
        mu_codec,
        policy,
        fallback,
        step,
    )
