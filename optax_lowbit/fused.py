"""The fused update-and-apply AdamW step: parameters updated inside the kernel.

Every Adam(W) alias gives it with ``fused=True``
(``lowbit.adamw_polar(3e-4, fused=True)``, `fuse_adamw` builds it).
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

from optax_lowbit import _generate
from optax_lowbit.codecs import base
from optax_lowbit.kernels import _backend
from optax_lowbit.kernels import adam as kadam
from optax_lowbit.transforms import _quantized
from optax_lowbit.transforms import adam as tadam


class FusedOptimizer(NamedTuple):
    """An optimizer whose step returns new parameters, not updates.

    Attributes:
      init: ``init(params) -> state``, the state of ``tx``.
      step: ``step(grads, state, params) -> (new_params, new_state)``. Jit it
        with ``donate_argnums=(1, 2)`` so parameters and state are updated in
        place (undonated, XLA copies both before every step: on an H100 the
        fused step then took 1.05-1.12x ``optax.adamw``'s time instead of
        0.63-0.72x, README). In a train step of your own, donating both, put the
        parameters before the state in its arguments and its results alike:
        jit pairs each result with the first donated argument of the same
        shape and dtype, so a mismatched order sends new parameters into old
        moments' buffers and XLA adds copies (README, step speed).
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


def fuse_adamw(
    tx: optax.GradientTransformation,
    tail: optax.GradientTransformation,
    mu_codec: base.Codec,
    nu_codec: base.Codec,
    adam: tuple[Any, Any, Any, Any, bool],
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: optax.ScalarOrSchedule,
    mask: Any,
    impl: str,
) -> FusedOptimizer:
    """The `FusedOptimizer` of the Adam(W) chain ``tx`` (``adam(w)_*(fused=True)``).

    Args:
      tx: the chain, ``chain(scale_by_adam_quantized(...), *tail's links)``.
      tail: the chain of the links after Adam (weight decay, if any, and the
        learning rate) for a single scalar (a mask becomes ``True``): its
        state has the structure of the rest of ``tx``'s and steps as it
        does. The step applies every leaf itself (`kadam.apply_leaf`) and
        advances the tail's state on a scalar stand-in, so that a first
        trace does not run the tail's per-leaf arithmetic only to drop it
        (NOTES_kernels.md, v33).
      mu_codec: the first moment's codec.
      nu_codec: the second moment's codec.
      adam: ``(b1, b2, eps, eps_root, nesterov)``.
      learning_rate: the learning rate or its schedule (read at each step
        from the last link's count).
      weight_decay: the decay or its schedule (``0.0`` for Adam).
      mask: where weight decay applies (a tree of bools or a callable).
      impl: ``"auto"``, ``"jnp"`` or ``"pallas"``.

    Returns:
      A `FusedOptimizer` whose state is ``tx``'s.
    """
    b1, b2, eps, eps_root, nesterov = adam
    use_pallas = _backend.use_pallas(impl)

    def step(grads, state, params):
        _check_params(grads, params)
        adam_state, *tail_state = state
        decay_state, lr_state = tail_state[0], tail_state[-1]
        _quantized.check_state(
            adam_state, tadam.ScaleByAdamQuantizedState, "the fused AdamW step"
        )
        tadam.check_state_format(adam_state)
        count = optax.safe_increment(adam_state.count)
        hp, leaf_step = tadam.adam_step(b1, b2, eps, eps_root, nesterov, count)
        lr = _scheduled(learning_rate, lr_state)
        wd = _scheduled(weight_decay, decay_state)
        hp_plain = hp.at[kadam.HP_FIELDS.index("learning_rate")].set(lr)
        hp_decay = hp_plain.at[kadam.HP_FIELDS.index("weight_decay")].set(wd)
        p_flat, p_def = jax.tree_util.tree_flatten(params)
        new_p, new_adam, _ = tadam.fused_leaves(
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
        # Every leaf is applied above; the chain only advances its own state
        # (the schedules' counts), on a scalar: its update is dropped.
        stand_in = jnp.zeros((), jnp.float32)
        _, new_tail = tail.update(stand_in, tuple(tail_state), stand_in)
        return jax.tree_util.tree_unflatten(p_def, new_p), (new_adam, *new_tail)

    return FusedOptimizer(tx.init, step, tx)


def _check_params(grads: Any, params: Any) -> None:
    """Raises, while the step is traced, where ``params`` is not ``grads``' tree.

    The fused step writes each parameter leaf from its gradient's: without
    parameters, or with another tree (a list where the gradients are a dict,
    a missing or extra leaf), it failed inside the kernel's arguments with an
    unrelated message or, with the same number of leaves in another order,
    paired leaves with the wrong gradients. Leaf shapes are checked after the
    state's (`_quantized.check_param_shapes`).
    """
    if params is None:
        raise ValueError(
            "the fused step applies the update to the parameters: call "
            "opt.step(grads, state, params) (opt.tx.update(grads, state, params) "
            "returns updates instead)."
        )
    p_def, g_def = jax.tree.structure(params), jax.tree.structure(grads)
    if p_def != g_def:
        raise ValueError(
            f"params must have the tree structure of grads; got params {p_def} "
            f"and grads {g_def}."
        )


# The deprecated ``fused_adamw_*``, at their old address.
__getattr__ = _generate.forward(
    __name__,
    (
        "fused_adamw_4bit",
        "fused_adamw_8bit",
        "fused_adamw_piquant",
        "fused_adamw_polar",
    ),
    "optax_lowbit.alias",
)


__all__ = ["FusedOptimizer", "fuse_adamw"]
