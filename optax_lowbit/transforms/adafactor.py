"""Adafactor over quantized states: `scale_by_factored_rms_quantized`, `ema_quantized`.

`optax.adafactor` is a chain; ours is the same chain with two links swapped:

* `scale_by_factored_rms_quantized` for `optax.scale_by_factored_rms`: the
  factored row/column statistics of rank >= 2 leaves (both factored dims >=
  ``min_dim_size_to_factor``) stay float32, they are already small; the full
  second moment of the leaves Adafactor does *not* factor is stored by an
  (unsigned) codec where the policy says so;
* `ema_quantized` for `optax.ema`: the momentum (``momentum=b1``) is stored by
  a signed codec.

Semantics are Optax's, step for step: decode, update the statistics in
float32, compute the update from the float32 statistics, encode. With
``lowbit.codecs.identity()`` codecs the chain equals `optax.adafactor` to float
tolerance (a test). Two differences, both for low-precision parameters only:
statistics kept unquantized are float32 (Optax keeps the parameter's dtype),
and so are the factored row/column statistics.

``min_dim_size_to_factor`` and ``factored`` decide which leaves are factored,
so they fix the state's layout. Its default is ``None`` (Optax's 128,
`MIN_DIM_SIZE_TO_FACTOR`), which ``optax.inject_hyperparams`` leaves alone; a
value you pass there must be listed in ``static_args`` (``inject_hyperparams``
would turn it into an array; construction then raises a TypeError saying so)::

    optax.inject_hyperparams(
        lowbit.adafactor_polar, static_args=("min_dim_size_to_factor", "bits")
    )(learning_rate=1e-2, min_dim_size_to_factor=64, bits=1.5)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_lowbit import _checks
from optax_lowbit import policy as _policy
from optax_lowbit.codecs import base
from optax_lowbit.transforms import _quantized


class ScaleByFactoredRmsQuantizedState(NamedTuple):
    """State of `scale_by_factored_rms_quantized` (`optax.FactoredState`'s layout).

    Attributes:
      count: int32 array of shape ``()``: the number of updates so far.
      v_row: per factored leaf, the float32 row statistics (the leaf's shape
        without its largest axis); ``(1,)`` zeros elsewhere.
      v_col: per factored leaf, the float32 column statistics (the shape
        without the second largest axis); ``(1,)`` zeros elsewhere.
      v: per unfactored leaf, the second moment: a `Packed` (the policy
        quantizes it) or a float32 array; ``(1,)`` zeros on factored leaves.
    """

    count: jax.Array
    v_row: optax.Updates
    v_col: optax.Updates
    v: optax.Updates


class EmaQuantizedState(NamedTuple):
    """State of `ema_quantized` (the layout of `optax.EmaState`).

    Attributes:
      count: int32 array of shape ``()``: the number of updates so far.
      ema: the moving average, the structure of the parameters; per leaf a
        `Packed` (the policy quantizes it) or a float array.
    """

    count: jax.Array
    ema: optax.Updates


#: Optax's ``min_dim_size_to_factor``, taken where it is ``None``.
MIN_DIM_SIZE_TO_FACTOR = 128


def _factored_dims(
    shape: tuple[int, ...], factored: bool, min_dim_size_to_factor: int
) -> tuple[int, int] | None:
    """The two largest axes ``(d1, d0)`` to factor over, or ``None`` (as Optax)."""
    if not factored or len(shape) < 2:
        return None
    order = np.argsort(shape)
    if shape[order[-2]] < min_dim_size_to_factor:
        return None
    return int(order[-2]), int(order[-1])


_F32_MAX = float(jnp.finfo(jnp.float32).max)


def _mean(x: jax.Array, axis: int, keepdims: bool = False) -> jax.Array:
    """``jnp.mean`` of ``0 <= x <= float32 max`` that cannot overflow.

    The sum runs over ``x * 2**-k`` with ``2**k >= n`` (exact scalings by a
    power of two), so the result is ``jnp.mean(x)``'s, bit for bit, wherever
    that one is finite and no partial sum is subnormal.
    """
    k = max(x.shape[axis] - 1, 0).bit_length()
    return jnp.mean(x * 2.0**-k, axis=axis, keepdims=keepdims) * 2.0**k


def _clip_f32(u: jax.Array) -> jax.Array:
    """``u`` clipped to float32's finite range (real and imaginary parts)."""
    if jnp.iscomplexobj(u):
        return jax.lax.complex(_clip_f32(u.real), _clip_f32(u.imag)).astype(u.dtype)
    return jnp.clip(u, -_F32_MAX, _F32_MAX)


def _zeros_without_axis(leaf: Any, axis: int) -> jax.Array:
    """float32 zeros of ``leaf``'s shape without ``axis``.

    A concrete parameter with a `NamedSharding` gets statistics sharded like it
    on the remaining axes.
    """
    if isinstance(leaf, jax.core.Tracer):
        # under jit: the reduction's type carries the sharding (explicit axes)
        target = jax.eval_shape(lambda x: jnp.sum(x, axis=axis), leaf)
        return jnp.zeros_like(target, dtype=jnp.float32)
    shape = tuple(s for i, s in enumerate(leaf.shape) if i != axis)
    zeros = jnp.zeros(shape, jnp.float32)
    sharding = getattr(leaf, "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return zeros
    spec = list(sharding.spec) + [None] * (len(leaf.shape) - len(sharding.spec))
    del spec[axis]
    out = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
    return jax.device_put(zeros, out)


def _placeholder(leaf: Any) -> jax.Array:
    """The ``(1,)`` float32 zero Optax keeps where a statistic does not apply.

    Replicated over the mesh of a concrete sharded parameter, so that the state
    keeps one placement through updates.
    """
    zeros = jnp.zeros((1,), jnp.float32)
    sharding = getattr(leaf, "sharding", None)
    if isinstance(leaf, jax.core.Tracer) or not isinstance(
        sharding, jax.sharding.NamedSharding
    ):
        return zeros
    replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return jax.device_put(zeros, replicated)


def scale_by_factored_rms_quantized(
    factored: bool = True,
    decay_rate: Any = 0.8,
    step_offset: Any = 0,
    min_dim_size_to_factor: int | None = None,
    epsilon: Any = 1e-30,
    *,
    nu_codec: base.Codec,
    policy: Any = None,
) -> optax.GradientTransformation:
    r"""Scales updates by a factored RMS estimate (Adafactor), in given codecs.

    As `optax.scale_by_factored_rms`. With :math:`\hat\beta_t = 1 - (t+1)^{-c}`
    (``c = decay_rate``, ``t`` the count minus ``step_offset``) and
    :math:`G = g^2 + \epsilon`: a leaf of rank >= 2 whose two largest axes are
    both >= ``min_dim_size_to_factor`` keeps row and column means
    :math:`R \leftarrow \hat\beta_t R + (1-\hat\beta_t)\,\mathrm{mean}_{d_0} G`,
    :math:`C \leftarrow \hat\beta_t C + (1-\hat\beta_t)\,\mathrm{mean}_{d_1} G`
    (float32) and returns :math:`g / \sqrt{R C / \mathrm{mean}(R)}`; any other
    leaf keeps :math:`v \leftarrow \hat\beta_t v + (1-\hat\beta_t) G`, stored by
    ``nu_codec`` where the policy says so, and returns :math:`g / \sqrt{v}`
    computed from the float32 ``v`` before it is encoded.

    Faults: a NaN or inf element of ``g`` gives a non-finite update there, as
    Optax's (`optax.clip_by_block_rms` in `optax_lowbit.adafactor_polar`
    then spreads it over the leaf for that step, as in `optax.adafactor`). It
    keeps its old stored ``v`` (`optax_lowbit.codecs.base.saturate_or_keep`);
    in :math:`R` and :math:`C` its :math:`G` is the current estimate
    :math:`R_i C_j / \mathrm{mean}(R)`, so it poisons neither its row nor its
    column (Optax's turn NaN for good). Finite values never make NaN:
    :math:`G` and the statistics saturate at ``base.MAX_STORED``, the means
    cannot overflow, and a factored update overflowing float32 from a finite
    ``g`` saturates at float32's max.

    Args:
      factored: whether to factor the second moment of rank >= 2 leaves.
      decay_rate: exponent of the decay schedule :math:`1 - (t+1)^{-c}`.
      step_offset: subtracted from the count, for fine-tuning.
      min_dim_size_to_factor: factor a leaf only if its two largest axes are at
        least this size; ``None`` is Optax's 128 (`MIN_DIM_SIZE_TO_FACTOR`).
        Structural (it shapes the state): a Python int; one passed under
        ``optax.inject_hyperparams`` must be listed in ``static_args``
        (``None``, the default, stays static by itself).
      epsilon: added to the squared update.
      nu_codec: codec of the unfactored second moment on quantized leaves
        (unsigned codecs fit; it is always > 0).
      policy: ``policy(path, leaf) -> bool``, which unfactored leaves are
        quantized; ``None`` is ``lowbit.policy.default()``.

    Returns:
      An `optax.GradientTransformation` whose state is a
      `ScaleByFactoredRmsQuantizedState`. ``params`` are not needed.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax_lowbit as lowbit
      >>> tx = lowbit.scale_by_factored_rms_quantized(
      ...     min_dim_size_to_factor=32, nu_codec=lowbit.codecs.identity())
      >>> state = tx.init({"w": jnp.zeros((32, 64)), "v": jnp.zeros((16, 512))})
      >>> state.v_row["w"].shape, state.v_col["w"].shape, state.v["w"].shape
      ((32,), (64,), (1,))
      >>> state.v["v"].codec_name  # (16, 512) is not factored: v is stored
      'identity-float32'

    References:
      Shazeer and Stern, `Adafactor: Adaptive Learning Rates with Sublinear
      Memory Cost <https://arxiv.org/abs/1804.04235>`_, 2018
    """
    nu_codec = _quantized.check_codec("nu_codec", nu_codec)
    _checks.is_bool("factored", factored)
    if min_dim_size_to_factor is None:
        min_dim_size_to_factor = MIN_DIM_SIZE_TO_FACTOR
    _checks.static_arg("min_dim_size_to_factor", min_dim_size_to_factor, "an int > 0")
    _checks.positive_int("min_dim_size_to_factor", min_dim_size_to_factor)
    _checks.non_negative("decay_rate", decay_rate)
    _checks.non_negative("epsilon", epsilon)
    policy = _quantized.resolve_policy(policy)

    def dims(shape: tuple[int, ...]) -> tuple[int, int] | None:
        return _factored_dims(tuple(shape), factored, min_dim_size_to_factor)

    def init_fn(params: optax.Params) -> ScaleByFactoredRmsQuantizedState:
        _quantized.check_float_params(params)
        # flax.nnx.Variable nodes (nnx.Optimizer) are leaves here, as in
        # init_moment, so that paths agree with the ones it gives the policy.
        flat, treedef = jax.tree_util.tree_flatten_with_path(
            params, is_leaf=lambda x: _policy.unwrap(x) is not x
        )
        values = [_policy.unwrap(x) for _, x in flat]
        leaf_dims = [dims(x.shape) for x in values]
        factored_paths = {
            jax.tree_util.keystr(path)
            for (path, _), d in zip(flat, leaf_dims, strict=True)
            if d
        }
        # v exists only where the leaf is not factored: elsewhere a (1,) zero.
        v = _quantized.init_moment(
            treedef.unflatten(
                [
                    _placeholder(v) if d else x
                    for (_, x), v, d in zip(flat, values, leaf_dims, strict=True)
                ]
            ),
            nu_codec,
            lambda path, x: (
                jax.tree_util.keystr(path) not in factored_paths and policy(path, x)
            ),
        )
        # Row/column statistics are plain float32 arrays: they do not have the
        # parameter's rank, so its sharding annotation does not apply to them.
        rows, cols = [], []
        for x, d in zip(values, leaf_dims, strict=True):
            rows.append(_zeros_without_axis(x, d[1]) if d else _placeholder(x))
            cols.append(_zeros_without_axis(x, d[0]) if d else _placeholder(x))
        return ScaleByFactoredRmsQuantizedState(
            jnp.zeros([], jnp.int32),
            treedef.unflatten(rows),
            treedef.unflatten(cols),
            v,
        )

    def update_fn(
        updates: optax.Updates, state: ScaleByFactoredRmsQuantizedState
    ) -> tuple[optax.Updates, ScaleByFactoredRmsQuantizedState]:
        t = jnp.asarray(state.count - step_offset + 1, jnp.float32)
        beta = 1.0 - t ** (-decay_rate)

        def step(g, v_row, v_col, v):
            g32 = g.astype(_quantized.compute_dtype(g.dtype))
            ok = base.is_finite(g32)
            if jnp.iscomplexobj(g32):  # |g|^2, as optax.scale_by_factored_rms
                g_sq = g32.real * g32.real + g32.imag * g32.imag + epsilon
            else:
                g_sq = g32 * g32 + epsilon
            d = dims(g.shape)
            if d is None:
                new_v = beta * v + (1.0 - beta) * g_sq
                u = g32 * new_v**-0.5
                v = base.saturate_or_keep(new_v, v, ok)
                return u.astype(g.dtype), v_row, v_col, v
            d1, d0 = d
            reduced_d1 = d1 - 1 if d1 > d0 else d1
            # A non-finite element adds its current estimate R C / mean(R) to
            # its row and column (not inf or NaN); g^2 saturates, as stored
            # values do, and the means cannot overflow.
            old_mean = _mean(v_row, reduced_d1, keepdims=True)
            ratio = jnp.where(old_mean > 0, v_row / old_mean, 0.0)
            estimate = jnp.expand_dims(ratio, d0) * jnp.expand_dims(v_col, d1)
            g_sq = base.saturate(jnp.where(ok, g_sq, estimate))
            v_row = base.saturate(beta * v_row + (1.0 - beta) * _mean(g_sq, d0))
            v_col = base.saturate(beta * v_col + (1.0 - beta) * _mean(g_sq, d1))
            row_mean = _mean(v_row, reduced_d1, keepdims=True)
            row_factor = (v_row / row_mean) ** -0.5
            col_factor = v_col**-0.5
            u = (
                g32
                * jnp.expand_dims(row_factor, axis=d0)
                * jnp.expand_dims(col_factor, axis=d1)
            )
            # a product overflowing from a finite g saturates (Optax's inf
            # would make clip_by_block_rms's inf * 0 a NaN over the leaf)
            u = jnp.where(ok, _clip_f32(u), u)
            return u.astype(g.dtype), v_row, v_col, v

        codecs = (nu_codec, nu_codec, nu_codec)  # v_row, v_col are never Packed
        count = optax.safe_increment(state.count)
        updates, (v_row, v_col, v) = _quantized.map_leaves(
            step, updates, (state.v_row, state.v_col, state.v), codecs, seed=count
        )
        return updates, ScaleByFactoredRmsQuantizedState(count, v_row, v_col, v)

    return _quantized.transformation(
        init_fn,
        update_fn,
        ScaleByFactoredRmsQuantizedState,
        "scale_by_factored_rms_quantized",
    )


def ema_quantized(
    decay: Any,
    debias: bool = True,
    accumulator_dtype: Any = None,
    *,
    codec: base.Codec,
    policy: Any = None,
) -> optax.GradientTransformation:
    r"""An exponential moving average of updates, kept in a given codec.

    As `optax.ema`: :math:`m \leftarrow (1 - \mu) g + \mu m`, the update is
    :math:`m` (divided by :math:`1 - \mu^t` if ``debias``), computed in float32
    from the decoded average; then :math:`m` is encoded again. It is
    Adafactor's momentum (``debias=False``) in `optax_lowbit.adafactor_polar`.
    A non-finite element keeps its old average (its update is non-finite, as
    Optax's); an average overflowing float32 saturates at
    ``±base.MAX_STORED`` (`optax_lowbit.codecs.base.saturate_or_keep`).

    Args:
      decay: decay rate :math:`\mu` (may be traced).
      debias: whether to divide by :math:`1 - \mu^t`, as in `optax.ema`.
      accumulator_dtype: dtype of the average on the leaves the policy keeps
        unquantized: ``None`` (float32) or ``jnp.bfloat16``.
      codec: codec of the average on quantized leaves (must be signed).
      policy: ``policy(path, leaf) -> bool``, which leaves are quantized;
        ``None`` is ``lowbit.policy.default()``.

    Returns:
      An `optax.GradientTransformation` whose state is an `EmaQuantizedState`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax_lowbit as lowbit
      >>> tx = lowbit.ema_quantized(0.9, debias=False,
      ...                           codec=lowbit.codecs.identity())
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> u, state = tx.update({"w": jnp.array([1.0, -2.0])}, state)
      >>> print(u["w"])
      [ 0.1 -0.2]
    """
    codec = _quantized.check_codec("codec", codec, signed=True)
    _checks.in_unit_interval("decay", decay, closed_right=True)
    _checks.is_bool("debias", debias)
    checked = _quantized.moment_dtype("accumulator_dtype", accumulator_dtype, "float32")
    fallback = jnp.dtype(jnp.float32) if checked is None else checked
    policy = _quantized.resolve_policy(policy)

    def step(g32: jax.Array, m: jax.Array, count: jax.Array) -> tuple[jax.Array, ...]:
        new_m = (1.0 - decay) * g32 + decay * m
        return (new_m / (1.0 - decay**count) if debias else new_m), new_m

    return _quantized.one_moment(
        "ema_quantized", EmaQuantizedState, "ema", codec, policy, fallback, step
    )
