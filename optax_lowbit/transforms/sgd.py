"""SGD momentum over a quantized trace: `trace_quantized`.

Semantics are `optax.trace`'s, step for step: decode the trace to float32,
``t = g + decay * t``, compute the update from the float32 trace (``t``, or
``g + decay * t`` with Nesterov), then encode ``t``. With
``lowbit.codecs.identity()`` the result equals `optax.trace` to float
tolerance, and `optax_lowbit.sgd_polar` equals `optax.sgd`.

Structural arguments (``codec``, ``policy``, ``nesterov``) are fixed at
construction; ``decay`` may be an array or a tracer (``inject_hyperparams``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

from optax_lowbit import _checks
from optax_lowbit.codecs import base
from optax_lowbit.transforms import _quantized


class TraceQuantizedState(NamedTuple):
    """State of `trace_quantized` (`optax.TraceState` plus a step count).

    Attributes:
      trace: the momentum, the structure of the parameters; per leaf a `Packed`
        (the policy quantizes it) or a float array.
      count: int32 array of shape ``()``: the number of updates so far (it
        selects the rounding streams of stochastic codecs).
    """

    trace: optax.Params
    count: jax.Array


def _check_decay(decay: Any) -> None:
    """Checks 0 <= decay < 1 unless ``decay`` is traced (`_checks.numeric`).

    The message names ``momentum`` too: `optax_lowbit.sgd_polar` passes its
    ``momentum`` here, and a user of it never wrote ``decay``.
    """
    number = _checks.numeric("decay (sgd_polar's momentum)", decay)
    if number is not None and not 0.0 <= number < 1.0:
        raise ValueError(
            f"decay must be >= 0 and < 1 (the momentum of sgd_polar: momentum "
            f"must be in [0, 1)), got {decay!r}."
        )


def trace_quantized(
    decay: Any,
    nesterov: bool = False,
    accumulator_dtype: Any = None,
    *,
    codec: base.Codec,
    policy: Any = None,
) -> optax.GradientTransformation:
    r"""A trace of past updates (heavy-ball momentum) kept in a given codec.

    Per leaf, with :math:`g` the update and :math:`\mu` = ``decay``:

    .. math::

      t \leftarrow g + \mu t, \qquad
      u = t \ \text{or, with Nesterov,}\ u = g + \mu t

    computed in float32 from the decoded trace; then ``t`` is encoded again.

    Faults: the update is Optax's (non-finite where ``g`` is; ``±inf`` where the
    float32 trace overflows, near float32's max); a non-finite element keeps
    its old trace and its group is encoded as if it had not come; a trace
    overflowing float32 is stored saturated at ``±base.MAX_STORED``
    (`optax_lowbit.codecs.base.saturate_or_keep`).

    Args:
      decay: decay rate of the trace, as in `optax.trace` (may be traced), in
        [0, 1) (the ``momentum`` of `optax_lowbit.sgd_polar`).
      nesterov: whether to use Nesterov momentum.
      accumulator_dtype: dtype of the trace on the leaves the policy keeps
        unquantized: ``None`` (the parameter's dtype, as in `optax.trace`),
        ``jnp.float32`` or ``jnp.bfloat16``. A complex leaf's trace is complex.
      codec: codec of the trace on quantized leaves (must be signed).
      policy: ``policy(path, leaf) -> bool``, which leaves are quantized
        (`optax_lowbit.policy`); ``None`` is ``lowbit.policy.default()``.

    Returns:
      An `optax.GradientTransformation` whose state is a `TraceQuantizedState`.
      Updates have the dtype of the incoming updates.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax_lowbit as lowbit
      >>> tx = lowbit.trace_quantized(0.5, codec=lowbit.codecs.identity(),
      ...                             policy=lambda path, x: True)
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> u, state = tx.update({"w": jnp.array([1.0, -2.0])}, state)
      >>> u, state = tx.update({"w": jnp.array([1.0, -2.0])}, state)
      >>> print(u["w"])  # g + 0.5 * g
      [ 1.5 -3. ]

    References:
      Polyak, `Some methods of speeding up the convergence of iteration methods
      <https://doi.org/10.1016/0041-5553(64)90137-5>`_, 1964

      Sutskever et al, `On the importance of initialization and momentum in
      deep learning <http://proceedings.mlr.press/v28/sutskever13.pdf>`_, 2013
    """
    codec = _quantized.check_codec("codec", codec, signed=True)
    _check_decay(decay)
    _checks.is_bool("nesterov", nesterov)
    fallback = _quantized.moment_dtype("accumulator_dtype", accumulator_dtype)
    policy = _quantized.resolve_policy(policy)

    def step(g32: jax.Array, t: jax.Array, count: jax.Array) -> tuple[jax.Array, ...]:
        del count
        new_t = g32 + decay * t
        return (g32 + decay * new_t if nesterov else new_t), new_t

    return _quantized.one_moment(
        "trace_quantized", TraceQuantizedState, "trace", codec, policy, fallback, step
    )
