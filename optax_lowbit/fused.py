"""The fused update-and-apply AdamW step: parameters updated inside the kernel.

`adamw_polar` is an `optax.chain`: the Adam kernel writes the update ``u``,
then XLA adds the weight decay, scales by the learning rate and adds it to
the parameters, reading and writing every parameter once more. The fused step
does all of it in the kernel's single pass (``p ← p − lr·(u + wd·p)``), so
``u`` never exists: fewer bytes moved and no float32 temporary the size of
the parameters. It is for training loops that want the last factor of speed;
the chain stays the default and composes with every Optax wrapper.

Its state is exactly the state of the equivalent `adamw_polar` chain
(``opt.tx``), so checkpoints, `optax_lowbit.summary` and
`optax_lowbit.convert` work unchanged, and a run can switch between the chain
and the fused step at any step. The new parameters and state equal the
chain's followed by `optax.apply_updates` (the same codes; parameters equal up
to float rounding of the fused multiply-adds).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_lowbit import alias
from optax_lowbit.kernels import _backend
from optax_lowbit.kernels import adam as kadam
from optax_lowbit.transforms import adam as tadam


class FusedOptimizer(NamedTuple):
    """An optimizer whose step returns new parameters, not updates.

    Attributes:
      init: ``init(params) -> state``, the state of ``tx``.
      step: ``step(grads, state, params) -> (new_params, new_state)``. Jit it
        with ``donate_argnums=(1, 2)`` so parameters and state are updated in
        place.
      tx: the equivalent `optax.GradientTransformation` (same state): use it
        where an Optax transform is needed (``optax.MultiSteps``,
        ``inject_hyperparams``, restoring a checkpoint).
    """

    init: Callable[[optax.Params], optax.OptState]
    step: Callable[
        [optax.Updates, optax.OptState, optax.Params],
        tuple[optax.Params, optax.OptState],
    ]
    tx: optax.GradientTransformation


def _scheduled(value: Any, sub_state: Any) -> Any:
    """``value`` at this step: schedules read the count in their chain state."""
    if not callable(value):
        return value
    while hasattr(sub_state, "inner_state"):  # optax.masked wraps the state
        sub_state = sub_state.inner_state
    return value(sub_state.count)


def _mask_leaves(mask: Any, params: Any) -> list[bool]:
    """Where weight decay applies, one bool per parameter leaf."""
    if mask is None:
        return [True] * len(jax.tree.leaves(params))
    tree = mask(params) if callable(mask) else mask
    full = jax.tree.map(lambda m, p: jax.tree.map(lambda _: bool(m), p), tree, params)
    return [bool(x) for x in jax.tree.leaves(full)]


def fused_adamw_polar(
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
    rounding: str = tadam.DEFAULT_ROUNDING,
    nesterov: bool = False,
    policy: Any = None,
    impl: str = "auto",
) -> FusedOptimizer:
    """`adamw_polar` as one fused update-and-apply step per quantized leaf.

    Arguments are those of `optax_lowbit.adamw_polar` (the same defaults,
    checks and state). Leaves whose moments are polar-coded take the fused
    Pallas kernel (`optax_lowbit.kernels.adam.adam_update` with ``params``);
    the other leaves (small ones, the policy's float32 leaves) take the chain.
    ``impl="jnp"`` (the default on CPU) runs the kernel's jnp definition.

    Args:
      learning_rate: a float or an `optax.Schedule`.
      b1: decay rate of the first moment.
      b2: decay rate of the second moment.
      eps: term added to the denominator outside the square root.
      eps_root: term added to the denominator inside the square root.
      mu_dtype: first-moment dtype on unquantized leaves.
      weight_decay: decoupled weight decay, a float or a schedule.
      mask: where weight decay applies (a tree of bools or a callable).
      bits: ``2`` or ``1.5``.
      rounding: ``"stochastic"`` or ``"nearest"``.
      nesterov: Nesterov momentum.
      policy: which leaves are quantized (`optax_lowbit.policy`).
      impl: ``"auto"``, ``"jnp"`` or ``"pallas"``.

    Returns:
      A `FusedOptimizer`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import optax_lowbit as lowbit
      >>> params = {"w": jnp.ones((64, 128))}
      >>> opt = lowbit.fused_adamw_polar(learning_rate=1e-2)
      >>> state = opt.init(params)
      >>> step = jax.jit(opt.step, donate_argnums=(1, 2))
      >>> params, state = step({"w": jnp.full((64, 128), 0.5)}, state, params)
      >>> print(f"{float(params['w'][0, 0]):.4f}")
      0.9900

    References:
      Loshchilov et al, `Decoupled Weight Decay Regularization
      <https://arxiv.org/abs/1711.05101>`_, 2019
    """
    tx = alias.adamw_polar(
        learning_rate,
        b1,
        b2,
        eps,
        eps_root,
        mu_dtype,
        weight_decay,
        mask,
        bits=bits,
        rounding=rounding,
        nesterov=nesterov,
        policy=policy,
        impl=impl,
    )
    return _fused(
        tx,
        *tadam.polar_codecs(bits, rounding),
        learning_rate,
        (b1, b2, eps, eps_root, nesterov),
        weight_decay,
        mask,
        impl,
    )


def _fused(tx, mu_codec, nu_codec, learning_rate, adam, weight_decay, mask, impl):
    """The `FusedOptimizer` of an AdamW chain ``tx`` whose moments use the codecs.

    ``adam`` is ``(b1, b2, eps, eps_root, nesterov)``.
    """
    b1, b2, eps, eps_root, nesterov = adam
    # The rest of the chain, for its own state and the leaves the kernel skips.
    rest = optax.chain(
        alias._decay(weight_decay, mask), optax.scale_by_learning_rate(learning_rate)
    )
    use_pallas = _backend.use_pallas(impl)

    def step(grads, state, params):
        adam_state, decay_state, lr_state = state
        tadam.check_state_format(adam_state)
        count = optax.safe_increment(adam_state.count)
        hp, leaf_step = tadam.adam_step(b1, b2, eps, eps_root, nesterov, count)
        lr = _scheduled(learning_rate, lr_state)
        wd = _scheduled(weight_decay, decay_state)
        hp_plain = hp.at[kadam.HP_FIELDS.index("learning_rate")].set(lr)
        hp_decay = hp_plain.at[kadam.HP_FIELDS.index("weight_decay")].set(wd)
        p_flat, p_def = jax.tree_util.tree_flatten(params)
        outs, applied, new_adam, unflatten = tadam.fused_leaves(
            grads,
            adam_state,
            count,
            hp,
            mu_codec,
            nu_codec,
            nesterov,
            leaf_step,
            use_pallas=use_pallas,
            params=p_flat,
            leaf_hps=[hp_decay if d else hp_plain for d in _mask_leaves(mask, params)],
        )
        # Applied leaves are done; the chain's updates of the others (XLA
        # drops the zeros standing in for the applied ones; the chain also
        # advances its own state, the schedules' counts).
        u_flat = [
            jnp.zeros_like(o) if f else o for o, f in zip(outs, applied, strict=True)
        ]
        updates, (new_decay, new_lr) = rest.update(
            unflatten(u_flat), (decay_state, lr_state), params
        )
        new_p = [
            out if f else optax.apply_updates(p, u)
            for out, f, p, u in zip(
                outs, applied, p_flat, jax.tree.leaves(updates), strict=True
            )
        ]
        return jax.tree_util.tree_unflatten(p_def, new_p), (new_adam, new_decay, new_lr)

    return FusedOptimizer(tx.init, step, tx)


def fused_adamw_piquant(
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
) -> FusedOptimizer:
    """`adamw_piquant` (3.83 bits all-in) as one fused step per quantized leaf.

    Arguments, defaults, checks and state are those of
    `optax_lowbit.adamw_piquant`; see `fused_adamw_polar` for the step.

    Args:
      learning_rate: a float or an `optax.Schedule`.
      b1: decay rate of the first moment.
      b2: decay rate of the second moment.
      eps: term added to the denominator outside the square root.
      eps_root: term added to the denominator inside the square root.
      mu_dtype: first-moment dtype on unquantized leaves.
      weight_decay: decoupled weight decay, a float or a schedule.
      mask: where weight decay applies.
      encoder: ``"nearest"`` or ``"paper"``.
      nesterov: Nesterov momentum.
      policy: which leaves are quantized.
      impl: ``"auto"``, ``"jnp"`` or ``"pallas"``.

    Returns:
      A `FusedOptimizer`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import optax_lowbit as lowbit
      >>> params = {"w": jnp.ones((64, 192))}
      >>> opt = lowbit.fused_adamw_piquant(learning_rate=1e-2)
      >>> new, _ = jax.jit(opt.step)(params, opt.init(params), params)
      >>> print(f"{float(new['w'][0, 0]):.2f}")
      0.99

    References:
      Tian et al, `Irrational Complex Rotations Empower Low-bit Optimizers
      <https://arxiv.org/abs/2501.12896>`_, 2025
    """
    tx = alias.adamw_piquant(
        learning_rate,
        b1,
        b2,
        eps,
        eps_root,
        mu_dtype,
        weight_decay,
        mask,
        encoder=encoder,
        nesterov=nesterov,
        policy=policy,
        impl=impl,
    )
    return _fused(
        tx,
        *tadam.piquant_codecs(encoder),
        learning_rate,
        (b1, b2, eps, eps_root, nesterov),
        weight_decay,
        mask,
        impl,
    )


def _fused_blockwise(
    bits,
    learning_rate,
    b1,
    b2,
    eps,
    eps_root,
    mu_dtype,
    weight_decay,
    mask,
    nesterov,
    policy,
    impl,
):
    make = alias.adamw_8bit if bits == 8 else alias.adamw_4bit
    tx = make(
        learning_rate,
        b1,
        b2,
        eps,
        eps_root,
        mu_dtype,
        weight_decay,
        mask,
        nesterov=nesterov,
        policy=policy,
        impl=impl,
    )
    return _fused(
        tx,
        *tadam.blockwise_codecs(bits),
        learning_rate,
        (b1, b2, eps, eps_root, nesterov),
        weight_decay,
        mask,
        impl,
    )


def fused_adamw_8bit(
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
) -> FusedOptimizer:
    """`adamw_8bit` (8.125 bits all-in) as one fused step per quantized leaf.

    Arguments, defaults, checks and state are those of
    `optax_lowbit.adamw_8bit`; see `fused_adamw_polar` for the step.

    Args:
      learning_rate: a float or an `optax.Schedule`.
      b1: decay rate of the first moment.
      b2: decay rate of the second moment.
      eps: term added to the denominator outside the square root.
      eps_root: term added to the denominator inside the square root.
      mu_dtype: first-moment dtype on unquantized leaves.
      weight_decay: decoupled weight decay, a float or a schedule.
      mask: where weight decay applies.
      nesterov: Nesterov momentum.
      policy: which leaves are quantized.
      impl: ``"auto"``, ``"jnp"`` or ``"pallas"``.

    Returns:
      A `FusedOptimizer`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import optax_lowbit as lowbit
      >>> params = {"w": jnp.ones((64, 256))}
      >>> opt = lowbit.fused_adamw_8bit(learning_rate=1e-2)
      >>> new, _ = jax.jit(opt.step)(params, opt.init(params), params)
      >>> print(f"{float(new['w'][0, 0]):.2f}")
      0.99

    References:
      Dettmers et al, `8-bit Optimizers via Block-wise Quantization
      <https://arxiv.org/abs/2110.02861>`_, 2022
    """
    return _fused_blockwise(
        8,
        learning_rate,
        b1,
        b2,
        eps,
        eps_root,
        mu_dtype,
        weight_decay,
        mask,
        nesterov,
        policy,
        impl,
    )


def fused_adamw_4bit(
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
) -> FusedOptimizer:
    """`adamw_4bit` (4.25 bits all-in) as one fused step per quantized leaf.

    Arguments, defaults, checks and state are those of
    `optax_lowbit.adamw_4bit`; see `fused_adamw_polar` for the step.

    Args:
      learning_rate: a float or an `optax.Schedule`.
      b1: decay rate of the first moment.
      b2: decay rate of the second moment.
      eps: term added to the denominator outside the square root.
      eps_root: term added to the denominator inside the square root.
      mu_dtype: first-moment dtype on unquantized leaves.
      weight_decay: decoupled weight decay, a float or a schedule.
      mask: where weight decay applies.
      nesterov: Nesterov momentum.
      policy: which leaves are quantized.
      impl: ``"auto"``, ``"jnp"`` or ``"pallas"``.

    Returns:
      A `FusedOptimizer`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import optax_lowbit as lowbit
      >>> params = {"w": jnp.ones((64, 256))}
      >>> opt = lowbit.fused_adamw_4bit(learning_rate=1e-2)
      >>> new, _ = jax.jit(opt.step)(params, opt.init(params), params)
      >>> print(f"{float(new['w'][0, 0]):.2f}")
      0.99

    References:
      Li et al, `Memory Efficient Optimizers with 4-bit States
      <https://arxiv.org/abs/2309.01507>`_, 2023
    """
    return _fused_blockwise(
        4,
        learning_rate,
        b1,
        b2,
        eps,
        eps_root,
        mu_dtype,
        weight_decay,
        mask,
        nesterov,
        policy,
        impl,
    )


__all__ = [
    "FusedOptimizer",
    "fused_adamw_4bit",
    "fused_adamw_8bit",
    "fused_adamw_piquant",
    "fused_adamw_polar",
]
