"""Ready optimizers over low-bit states, with Optax's signatures.

Each alias is an `optax.chain`, exactly as `optax.adamw` is::

    chain(scale_by_adam_<codec>(...), add_decayed_weights(weight_decay, mask),
          scale_by_learning_rate(learning_rate))

so its state has the shape of `optax.adamw`'s with the Adam entry replaced by
a `ScaleByAdamQuantizedState` (which is what `optax_lowbit.convert` relies on).
Arguments keep Optax's names and order (``learning_rate, b1, b2, eps, eps_root,
mu_dtype, weight_decay, mask``); ours are keyword-only after ``*``.

Under ``optax.inject_hyperparams`` pass the structural arguments that are
numbers or callables as static: ``static_args=("bits", "policy")`` (``mask``
too when it is a callable).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from optax_lowbit.transforms import adam as _adam


def _checked_mask(mask: Any) -> Any:
    """``mask`` as given, with a clear error if its tree does not fit the params."""
    if mask is None:
        return None

    def check(params: Any) -> None:
        tree = mask(params) if callable(mask) else mask
        try:
            jax.tree.map(lambda m, p: None, tree, params)
        except ValueError as e:
            raise ValueError(
                "mask does not match the parameters: it must be a tree with the "
                "structure of params (or a prefix of it) whose leaves are bools, "
                "or a callable params -> such a tree. Got mask structure "
                f"{jax.tree.structure(tree)} for params structure "
                f"{jax.tree.structure(params)}.\n{e}"
            ) from None

    return check


def _decay(weight_decay: Any, mask: Any) -> optax.GradientTransformation:
    inner = optax.add_decayed_weights(weight_decay, mask)
    check = _checked_mask(mask)
    if check is None:
        return inner

    def init_fn(params: optax.Params) -> optax.OptState:
        check(params)
        return inner.init(params)

    return optax.GradientTransformation(init_fn, inner.update)


def _adamw(scale_by_adam, learning_rate, weight_decay, mask):
    return optax.chain(
        scale_by_adam,
        _decay(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def adamw_polar(
    learning_rate: optax.ScalarOrSchedule,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    eps_root: Any = 0.0,
    mu_dtype: Any = None,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask: Any = None,
    *,
    bits: float = 2,
    nesterov: bool = False,
    policy: Any = None,
    impl: str = "auto",
) -> optax.GradientTransformation:
    """AdamW with both moments in 2D polar codes (2 or 1.5 bits per element).

    A drop-in for `optax.adamw`: on leaves the policy quantizes, the moments take
    about 0.56 B/param at ``bits=2`` (0.44 at 1.5) instead of 8; other leaves
    keep float32 moments.

    Args:
      learning_rate: a float or an `optax.Schedule`, as in `optax.adamw`.
      b1: decay rate of the first moment.
      b2: decay rate of the second moment.
      eps: term added to the denominator outside the square root.
      eps_root: term added to the denominator inside the square root.
      mu_dtype: dtype of the first moment on unquantized leaves (``None``:
        float32, or ``jnp.bfloat16``).
      weight_decay: decoupled weight decay (multiplied by the learning rate), a
        float or a schedule.
      mask: a tree of bools with the structure of the params (or a prefix), or
        a callable returning one: where weight decay applies.
      bits: ``2`` or ``1.5`` (structural: ``static_args=("bits",)`` under
        ``optax.inject_hyperparams``).
      nesterov: whether to use Nesterov momentum (NAdamW).
      policy: which leaves are quantized (`optax_lowbit.policy`); ``None`` is
        the default policy.
      impl: ``"auto"`` or ``"jnp"``.

    Returns:
      An `optax.GradientTransformation`, the chain of `scale_by_adam_polar`,
      `optax.add_decayed_weights` and `optax.scale_by_learning_rate`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import optax, optax_lowbit as lowbit
      >>> params = {"w": jnp.ones((64, 128))}
      >>> tx = lowbit.adamw_polar(learning_rate=1e-2, bits=2)
      >>> state = tx.init(params)
      >>> grads = {"w": jnp.full((64, 128), 0.5)}
      >>> updates, state = tx.update(grads, state, params)
      >>> params = optax.apply_updates(params, updates)
      >>> print(f"{float(params['w'][0, 0]):.4f}")
      0.9900

    References:
      Loshchilov et al, `Decoupled Weight Decay Regularization
      <https://arxiv.org/abs/1711.05101>`_, 2019
    """
    return _adamw(
        _adam.scale_by_adam_polar(
            b1,
            b2,
            eps,
            eps_root,
            bits=bits,
            nesterov=nesterov,
            policy=policy,
            impl=impl,
            mu_dtype=mu_dtype,
        ),
        learning_rate,
        weight_decay,
        mask,
    )


def adam_polar(
    learning_rate: optax.ScalarOrSchedule,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    eps_root: Any = 0.0,
    mu_dtype: Any = None,
    *,
    bits: float = 2,
    nesterov: bool = False,
    policy: Any = None,
    impl: str = "auto",
) -> optax.GradientTransformation:
    """Adam (no weight decay) with both moments in 2D polar codes.

    The chain of `scale_by_adam_polar` and `optax.scale_by_learning_rate`, as
    `optax.adam` is.

    Args:
      learning_rate: a float or an `optax.Schedule`.
      b1: decay rate of the first moment.
      b2: decay rate of the second moment.
      eps: term added to the denominator outside the square root.
      eps_root: term added to the denominator inside the square root.
      mu_dtype: dtype of the first moment on unquantized leaves.
      bits: ``2`` or ``1.5`` (structural).
      nesterov: whether to use Nesterov momentum (NAdam).
      policy: which leaves are quantized; ``None`` is the default policy.
      impl: ``"auto"`` or ``"jnp"``.

    Returns:
      An `optax.GradientTransformation`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax_lowbit as lowbit
      >>> tx = lowbit.adam_polar(1e-3, bits=1.5)
      >>> state = tx.init({"w": jnp.zeros((128, 128))})
      >>> state[0].mu["w"].codec == state[0].nu["w"].codec
      False

    References:
      Kingma and Ba, `Adam: A Method for Stochastic Optimization
      <https://arxiv.org/abs/1412.6980>`_, 2014
    """
    return optax.chain(
        _adam.scale_by_adam_polar(
            b1,
            b2,
            eps,
            eps_root,
            bits=bits,
            nesterov=nesterov,
            policy=policy,
            impl=impl,
            mu_dtype=mu_dtype,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )


def adamw_piquant(
    learning_rate: optax.ScalarOrSchedule,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    eps_root: Any = 0.0,
    mu_dtype: Any = None,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask: Any = None,
    *,
    encoder: str = "nearest",
    nesterov: bool = False,
    policy: Any = None,
    impl: str = "auto",
) -> optax.GradientTransformation:
    """AdamW with both moments in π-Quant codes.

    Args:
      learning_rate: a float or an `optax.Schedule`.
      b1: decay rate of the first moment.
      b2: decay rate of the second moment.
      eps: term added to the denominator outside the square root.
      eps_root: term added to the denominator inside the square root.
      mu_dtype: dtype of the first moment on unquantized leaves.
      weight_decay: decoupled weight decay, a float or a schedule.
      mask: where weight decay applies (a bool tree or a callable).
      encoder: ``"nearest"`` (default) or ``"paper"``.
      nesterov: whether to use Nesterov momentum.
      policy: which leaves are quantized; ``None`` is the default policy.
      impl: ``"auto"`` or ``"jnp"``.

    Returns:
      An `optax.GradientTransformation`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax_lowbit as lowbit
      >>> state = lowbit.adamw_piquant(1e-3).init({"w": jnp.zeros((64, 64))})
      >>> len(state)
      3

    References:
      Pi-Quant reference code: github.com/Ethan-TZ/Pi-Quant.
    """
    return _adamw(
        _adam.scale_by_adam_piquant(
            b1,
            b2,
            eps,
            eps_root,
            encoder=encoder,
            nesterov=nesterov,
            policy=policy,
            impl=impl,
            mu_dtype=mu_dtype,
        ),
        learning_rate,
        weight_decay,
        mask,
    )


def adamw_8bit(
    learning_rate: optax.ScalarOrSchedule,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    eps_root: Any = 0.0,
    mu_dtype: Any = None,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask: Any = None,
    *,
    nesterov: bool = False,
    policy: Any = None,
    impl: str = "auto",
) -> optax.GradientTransformation:
    """AdamW with both moments in 8 bits, as bitsandbytes' ``AdamW8bit``.

    Args:
      learning_rate: a float or an `optax.Schedule`.
      b1: decay rate of the first moment.
      b2: decay rate of the second moment.
      eps: term added to the denominator outside the square root.
      eps_root: term added to the denominator inside the square root.
      mu_dtype: dtype of the first moment on unquantized leaves.
      weight_decay: decoupled weight decay, a float or a schedule.
      mask: where weight decay applies (a bool tree or a callable).
      nesterov: whether to use Nesterov momentum.
      policy: which leaves are quantized; ``None`` is the default policy.
      impl: ``"auto"`` or ``"jnp"``.

    Returns:
      An `optax.GradientTransformation`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax_lowbit as lowbit
      >>> state = lowbit.adamw_8bit(1e-3).init({"w": jnp.zeros((64, 64))})
      >>> type(state[0]).__name__
      'ScaleByAdamQuantizedState'

    References:
      Dettmers et al, `8-bit Optimizers via Block-wise Quantization
      <https://arxiv.org/abs/2110.02861>`_, 2022
    """
    return _adamw(
        _adam.scale_by_adam_8bit(
            b1,
            b2,
            eps,
            eps_root,
            nesterov=nesterov,
            policy=policy,
            impl=impl,
            mu_dtype=mu_dtype,
        ),
        learning_rate,
        weight_decay,
        mask,
    )


def adamw_4bit(
    learning_rate: optax.ScalarOrSchedule,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    eps_root: Any = 0.0,
    mu_dtype: Any = None,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask: Any = None,
    *,
    nesterov: bool = False,
    policy: Any = None,
    impl: str = "auto",
) -> optax.GradientTransformation:
    """AdamW with both moments in 4 bits, as the 4-bit optimizer of Li et al.

    Args:
      learning_rate: a float or an `optax.Schedule`.
      b1: decay rate of the first moment.
      b2: decay rate of the second moment.
      eps: term added to the denominator outside the square root.
      eps_root: term added to the denominator inside the square root.
      mu_dtype: dtype of the first moment on unquantized leaves.
      weight_decay: decoupled weight decay, a float or a schedule.
      mask: where weight decay applies (a bool tree or a callable).
      nesterov: whether to use Nesterov momentum.
      policy: which leaves are quantized; ``None`` is the default policy.
      impl: ``"auto"`` or ``"jnp"``.

    Returns:
      An `optax.GradientTransformation`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax_lowbit as lowbit
      >>> state = lowbit.adamw_4bit(1e-3).init({"w": jnp.zeros((64, 64))})
      >>> type(state[0]).__name__
      'ScaleByAdamQuantizedState'

    References:
      Li et al, `Memory Efficient Optimizers with 4-bit States
      <https://arxiv.org/abs/2309.01507>`_, 2023
    """
    return _adamw(
        _adam.scale_by_adam_4bit(
            b1,
            b2,
            eps,
            eps_root,
            nesterov=nesterov,
            policy=policy,
            impl=impl,
            mu_dtype=mu_dtype,
        ),
        learning_rate,
        weight_decay,
        mask,
    )
