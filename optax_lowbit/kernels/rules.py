"""The update rules a kernel runs: their hyperparameter vectors and per-element steps.

A rule (`Rule`) is what a fused kernel computes between decoding the moments
and encoding them again, and what the jnp paths compute between the codecs'
``decode`` and ``encode``: one definition of each step, fault rule included,
for both. `AdamRule` keeps ``m`` and ``v`` and returns Adam's update ``u``
(`moment_step`, hyperparameters from `make_hp`); `MomentumRule` keeps Muon's
momentum and returns its bias-corrected ``m_hat`` (`momentum_step`,
`momentum_hp`). `apply_step` is AdamW's parameter update of the fused apply
(`apply_leaf` on a whole leaf),
`reference_step` a rule's step over a whole leaf, `stream_seeds` the
stochastic-rounding streams a kernel takes as input, `compute_dtype` the dtype
every step computes in (the jnp transforms' too).

The element loop that runs a rule over blocks is `optax_lowbit.kernels.loop`;
adding a rule means a `Rule` subclass here and its hyperparameter vector.

Rounding alike. A step is written so that the kernel and the jnp path round
it the same way, bit for bit, over any number of steps: every sum has at
most one product operand (``m + (1 - b) (g - m)``, not Optax's ``(1 - b) g
+ b m``), and nothing in the step divides by a hyperparameter (the
reciprocals and ratios are formed once per step into ``hp``, by `make_hp`
and `momentum_hp`, and multiplied). A compiler that contracts a product and
a sum into a fused multiply-add (XLA on the jnp path, the kernel's
lowering) then has one way to do it, whereas a sum of two products is
contracted on either product, differently in the two programs; and XLA
turns a division by a scalar into a product with its reciprocal on the jnp
path but not in a kernel. Optax's results are still matched to rounding (an
ulp or two per step). One way is not one choice: whether a compiler contracts
depends on how it fused the program, and the polar codec's group span was seen
contracted in the CPU interpreter's kernel and not on the jnp path. Where a
product-and-sum decides a discrete result that both paths must share (a
scale, a ring), the codec rounds the product on its own (`base.unfused`),
which no compiler can contract.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from optax_lowbit.codecs import base

#: Slots of `AdamRule`'s hyperparameter vector ``hp`` (`make_hp`; float32,
#: length `HP_LEN`).
HP_FIELDS = (
    "one_minus_b1",
    "one_minus_b2",
    "eps",
    "eps_root",
    "inv_bc1",
    "inv_bc2",
    "g_scale",
    "m_ratio",
    "learning_rate",
    "weight_decay",
)
_LEARNING_RATE = HP_FIELDS.index("learning_rate")
_WEIGHT_DECAY = HP_FIELDS.index("weight_decay")
#: Slots of `MomentumRule`'s ``hp`` (`momentum_hp`).
MOMENTUM_HP_FIELDS = ("one_minus_beta", "inv_bc", "g_scale", "m_ratio")
#: Lengths of the kernel's hyperparameter and stream-seed inputs.
HP_LEN = 16
SEED_LEN = 8


def is_complex(dtype: Any) -> bool:
    """Whether ``dtype`` is complex."""
    return bool(jnp.issubdtype(dtype, jnp.complexfloating))


def compute_dtype(dtype: Any) -> Any:
    """The dtype a leaf's step computes in: float32, or complex64 (or wider)."""
    if is_complex(dtype):
        return jnp.promote_types(dtype, jnp.complex64)
    return jnp.dtype(jnp.float32)


def make_hp(
    b1,
    b2,
    eps,
    eps_root,
    bc1,
    bc2,
    bc1_next=None,
    learning_rate=0.0,
    weight_decay=0.0,
) -> jax.Array:
    """Adam's hyperparameter vector (`HP_FIELDS`): the kernel's float32 ``(16,)``.

    ``1 - b1`` and ``1 - b2`` are formed here (in Python for numbers), and
    the bias corrections' coefficients once per step, in float32, so that
    `moment_step` multiplies where Optax divides (the module's note on
    rounding alike): ``inv_bc1 = 1 / bc1``, ``inv_bc2 = 1 / bc2``, and for
    Nesterov ``g_scale = (1 - b1) / bc1`` and ``m_ratio = b1 bc1 / ((1 - b1)
    bc1_next)``, so that ``g_scale (g + m_ratio new_m) = b1 new_m / bc1_next
    + (1 - b1) g / bc1`` (finite for ``b1`` in ``[0, 1)``). The jnp path and
    the kernel read the same vector. ``learning_rate`` and ``weight_decay``
    are read only by the fused update-and-apply step (`apply_step`).

    Args:
      b1: the first moment's decay rate.
      b2: the second moment's decay rate.
      eps: added to the denominator outside the square root.
      eps_root: added to the denominator inside the square root.
      bc1: the bias correction ``1 - b1**t`` at the new count ``t``.
      bc2: ``1 - b2**t``.
      bc1_next: ``1 - b1**(t + 1)`` (read by Nesterov); ``None``: ``bc1``.
      learning_rate: the fused apply's learning rate.
      weight_decay: the fused apply's weight decay.

    Returns:
      float32 ``(16,)``.
    """
    f32 = lambda x: jnp.asarray(x, jnp.float32).reshape(())  # noqa: E731
    omb1, omb2, b1 = f32(1 - b1), f32(1 - b2), f32(b1)
    bc1, bc2 = f32(bc1), f32(bc2)
    bc1_next = bc1 if bc1_next is None else f32(bc1_next)
    vals = [
        omb1,
        omb2,
        f32(eps),
        f32(eps_root),
        1 / bc1,
        1 / bc2,
        omb1 / bc1,
        b1 * bc1 / (omb1 * bc1_next),
        f32(learning_rate),
        f32(weight_decay),
    ]
    vals += [jnp.zeros((), jnp.float32)] * (HP_LEN - len(vals))
    return jnp.stack(vals)


def momentum_hp(beta, bc, bc_next=None) -> jax.Array:
    """The hyperparameter vector of `MomentumRule` (`MOMENTUM_HP_FIELDS`).

    ``1 - beta`` is formed here (in Python for a number), and the bias
    corrections' coefficients once per step, in float32: the jnp path
    (`momentum_step` on this vector) and the kernel then use the same
    numbers. ``g_scale = (1 - beta) / bc`` and ``m_ratio = beta bc / ((1 -
    beta) bc_next)`` make Nesterov's ``m_hat = g_scale (g + m_ratio new_m)``
    (finite for ``beta`` in ``[0, 1)``).

    Args:
      beta: the momentum's decay rate.
      bc: the bias correction ``1 - beta**t`` at the new count ``t``.
      bc_next: ``1 - beta**(t + 1)`` (read by Nesterov); ``None``: ``bc``.

    Returns:
      float32 ``(16,)``.
    """
    omb = jnp.asarray(1 - beta, jnp.float32)
    beta32 = jnp.asarray(beta, jnp.float32)
    bc = jnp.asarray(bc, jnp.float32)
    bc_next = bc if bc_next is None else jnp.asarray(bc_next, jnp.float32)
    vals = [omb, 1 / bc, omb / bc, beta32 * bc / (omb * bc_next)]
    vals = [v.reshape(()) for v in vals]
    vals += [jnp.zeros((), jnp.float32)] * (HP_LEN - len(vals))
    return jnp.stack(vals)


def stream_seeds(seeds: Any = None, n: int = 2) -> jax.Array:
    """The kernel's uint32 seed input: each moment's final stream.

    Args:
      seeds: one per moment (``(mu_seed, nu_seed)`` for Adam), the ``seed``
        arguments that `Codec.encode` would get, mixed here exactly as
        `Codec.encode` mixes them; ``None`` (or a ``None`` entry): stream 0.
        Or many leaves' at once: an integer array ``(..., n)`` (rows of
        seeds, mixed elementwise in one vector operation).
      n: the number of moments (`Rule.n_moments`).

    Returns:
      uint32 ``(SEED_LEN,)``, or ``(..., SEED_LEN)`` for an array: the ``n``
      final streams, padded with zeros.
    """
    if seeds is None or isinstance(seeds, (tuple, list)):  # one leaf's
        seeds = seed_rows([seeds], 1, n)[0]
    elif seeds.shape[-1:] != (n,):
        raise ValueError(
            f"seeds must have one column per moment ({n}), got shape {seeds.shape}."
        )
    final = base.stream_seed(seeds)
    return jnp.pad(final, [(0, 0)] * (final.ndim - 1) + [(0, SEED_LEN - n)])


def seed_rows(seeds: Any, leaves: int, n: int) -> Any:
    """Many leaves' seeds as one uint32 array ``(leaves, n)`` for `stream_seeds`.

    Args:
      seeds: ``None`` (stream 0 everywhere), an integer array ``(leaves,
        n)``, or one entry per leaf: ``None`` or one seed (or ``None``) per
        moment.
      leaves: the number of leaves.
      n: the number of moments.

    Returns:
      The seeds, NumPy where none is traced.
    """
    if seeds is not None and not isinstance(seeds, (tuple, list)):
        if tuple(seeds.shape) != (leaves, n):
            raise ValueError(
                f"seeds must have shape ({leaves}, {n}), got {tuple(seeds.shape)}."
            )
        return seeds
    seeds = [None] * leaves if seeds is None else list(seeds)
    if len(seeds) != leaves:
        raise ValueError(
            f"seeds must be one entry per leaf ({leaves}), got {len(seeds)}."
        )
    rows = []
    for row in seeds:
        row = (None,) * n if row is None else tuple(row)
        if len(row) != n:
            raise ValueError(f"seeds must be one per moment ({n}), got {row!r}.")
        rows.append([_as_uint32(s) for s in row])
    flat = [s for row in rows for s in row]
    if all(isinstance(s, np.ndarray) for s in flat):
        return np.asarray(flat, np.uint32).reshape(leaves, n)
    return jnp.stack([jnp.stack(row) for row in rows])


def _as_uint32(seed: Any) -> Any:
    """One ``seed`` as uint32 (``None``: 0), wrapping as `base.hash32` does."""
    if seed is None or isinstance(seed, (int, np.integer)):
        return np.asarray(0 if seed is None else seed).astype(np.uint32)
    return jnp.asarray(seed).astype(jnp.uint32)


def momentum_step(g, m, hp, *, nesterov: bool):
    """Momentum's step of one leaf (Muon's): the one definition, for both paths.

    ``new_m = (1 - beta) g + beta m``; ``m_hat = beta new_m / bc_next + (1 -
    beta) g / bc`` with Nesterov, else ``new_m / bc``, as
    `optax.contrib.scale_by_muon`, in the forms that round alike on both
    paths (the module's note): ``new_m = m + (1 - beta) (g - m)``, ``m_hat =
    new_m * inv_bc`` and Nesterov's ``m_hat = g_scale * (g + m_ratio *
    new_m)`` (`momentum_hp`'s coefficients). The momentum returned is the one
    to store (`base.saturate_or_keep`): saturated, and the old one where
    ``g`` is not finite. The jnp path of `scale_by_muon_quantized` calls it
    on whole leaves, `MomentumRule` on each block of the kernel.

    Args:
      g: the update, float32 (complex64 for a complex leaf's plain momentum).
      m: the momentum before the step (decoded), of ``g``'s dtype.
      hp: `momentum_hp`'s vector (an array or a kernel's traced scalars).
      nesterov: Nesterov momentum.

    Returns:
      ``(m_hat, m)``.
    """
    one_minus_beta, inv_bc, g_scale, m_ratio = hp[0], hp[1], hp[2], hp[3]
    new_m = m + one_minus_beta * (g - m)
    if nesterov:
        m_hat = g_scale * (g + m_ratio * new_m)
    else:
        m_hat = new_m * inv_bc
    return m_hat, base.saturate_or_keep(new_m, m, base.is_finite(g))


def moment_step(g, m, v, hp, *, nesterov: bool):
    """Adam's step of one leaf in float32: the one definition, for both paths.

    `optax.scale_by_adam`'s ``new_m = (1 - b1) g + b1 m``, ``new_v = (1 - b2)
    g² + b2 v``, ``m_hat = new_m / bc1`` (Nesterov: ``b1 new_m / bc1_next +
    (1 - b1) g / bc1``) and ``u = m_hat / (sqrt(new_v / bc2 + eps_root) +
    eps)``, in the forms that round alike on both paths (the module's note):
    ``new_m = m + (1 - b1) (g - m)``, ``new_v = v + (1 - b2) (g g - v)``,
    ``m_hat = new_m * inv_bc1`` (Nesterov: ``g_scale (g + m_ratio new_m)``)
    and ``new_v * inv_bc2`` (`make_hp`'s coefficients). The fused kernels
    call it on each block, `reference_step` and the ``jnp`` path of
    `scale_by_adam_quantized` on whole leaves.

    ``u`` is `optax.scale_by_adam`'s, from the float32 moments before they
    are stored: NaN where ``g`` is NaN or inf, as Optax's, and where ``v``
    overflowed to inf from a finite ``g`` (``|g|`` above about 1e19) 0, as
    Optax's (also where Optax's would be ``inf / inf``: a finite ``g`` never
    gives NaN). The moments returned are the ones to store
    (`base.saturate_or_keep`): saturated at ``±base.MAX_STORED`` (``v``,
    never negative, at the upper bound alone), and the old ones where ``g``
    is not finite.

    Args:
      g: the update, float32.
      m: the first moment before the step (decoded), float32.
      v: the second moment, float32.
      hp: `make_hp`'s vector (an array or a kernel's traced scalars).
      nesterov: Nesterov momentum, as `optax.scale_by_adam`.

    Returns:
      ``(u, m, v)``, float32.
    """
    omb1, omb2, eps, eps_root = hp[0], hp[1], hp[2], hp[3]
    inv_bc1, inv_bc2, g_scale, m_ratio = hp[4], hp[5], hp[6], hp[7]
    new_m = m + omb1 * (g - m)
    new_v = v + omb2 * (g * g - v)
    if nesterov:
        m_hat = g_scale * (g + m_ratio * new_m)
    else:
        m_hat = new_m * inv_bc1
    u = m_hat / (jnp.sqrt(new_v * inv_bc2 + eps_root) + eps)
    ok = base.is_finite(g)
    u = jnp.where(ok & jnp.isnan(u), 0.0, u)
    new_m = base.saturate_or_keep(new_m, m, ok)
    return u, new_m, base.saturate_or_keep(new_v, v, ok, nonnegative=True)


@dataclasses.dataclass(frozen=True)
class Rule:
    """An update rule: what a kernel computes between decode and encode.

    A rule keeps `n_moments` moments, each in its own codec; per element its
    `step` maps the update ``g`` and the decoded float32 moments to the
    output and the moments to store. A rule is static (hashable): it is part
    of `launch.LaunchConfig`.

    Attributes:
      nesterov: Nesterov momentum.
    """

    nesterov: bool = False
    #: The kernel's name prefix (``<name>_<codec>``).
    name: ClassVar[str] = ""
    #: Moments the rule keeps.
    n_moments: ClassVar[int] = 0
    #: The slots of its hyperparameter vector the kernel reads.
    hp_fields: ClassVar[tuple[str, ...]] = ()
    #: Whether it takes the fused AdamW apply (`apply_step`, ``params``).
    applies: ClassVar[bool] = False
    #: Per element, for the launch's ``pl.CostEstimate``.
    flops: ClassVar[int] = 0
    transcendentals: ClassVar[int] = 0

    def step(self, g, moments, hp):
        """``(out, new_moments)`` of one leaf or block, float32.

        Args:
          g: the update, float32.
          moments: the `n_moments` decoded moments before the step.
          hp: the rule's hyperparameter vector (`make_hp`'s slots).

        Returns:
          The output and the list of moments to store.
        """
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class AdamRule(Rule):
    """Adam (`moment_step`): ``m``, ``v`` -> ``u``; hp from `make_hp`."""

    name: ClassVar[str] = "adam"
    n_moments: ClassVar[int] = 2
    hp_fields: ClassVar[tuple[str, ...]] = HP_FIELDS
    applies: ClassVar[bool] = True
    flops: ClassVar[int] = 60
    transcendentals: ClassVar[int] = 2

    def step(self, g, moments, hp):
        """``(u, [m, v])``: `moment_step`."""
        u, m, v = moment_step(g, *moments, hp, nesterov=self.nesterov)
        return u, [m, v]


@dataclasses.dataclass(frozen=True)
class MomentumRule(Rule):
    """Muon's momentum (`momentum_step`): ``m`` -> ``m_hat``; hp from `momentum_hp`."""

    nesterov: bool = True
    name: ClassVar[str] = "momentum"
    n_moments: ClassVar[int] = 1
    hp_fields: ClassVar[tuple[str, ...]] = MOMENTUM_HP_FIELDS
    flops: ClassVar[int] = 30
    transcendentals: ClassVar[int] = 0

    def step(self, g, moments, hp):
        """``(m_hat, [m])``: `momentum_step`."""
        m_hat, m = momentum_step(g, moments[0], hp, nesterov=self.nesterov)
        return m_hat, [m]


def apply_step(p, u, hp):
    """AdamW's parameter update in float32, in optax's order of operations.

    ``add_decayed_weights`` then ``scale_by_learning_rate`` then
    ``apply_updates``: ``p + (-lr) * (u + wd * p)``.

    Args:
      p: the parameters, float32.
      u: `moment_step`'s update.
      hp: `make_hp`'s vector (an array or the kernel's traced scalars).

    Returns:
      The new parameters, float32.
    """
    lr, wd = hp[_LEARNING_RATE], hp[_WEIGHT_DECAY]
    return p + (-lr) * (u + wd * p)


def reference_step(rule: Rule, g, moments, hp, params):
    """The jnp reference of `compute_block` between decode and encode, on a leaf.

    Args:
      rule: the update rule.
      g: the gradient leaf, any float dtype.
      moments: the decoded moments, float32 of ``g``'s shape.
      hp: the rule's hyperparameter vector.
      params: the parameter leaf to apply the step to, or ``None``.

    Returns:
      ``(out, moments)``: the rule's output in ``g``'s dtype (or the new
      parameters in ``params``' dtype) and the float32 moments to encode.
    """
    out, moments = rule.step(g.astype(jnp.float32), list(moments), hp)
    if params is None:
        return out.astype(g.dtype), moments
    return apply_leaf(params, out, hp), moments


def apply_leaf(params, u, hp):
    """`apply_step` on a whole parameter leaf of any dtype, in its compute dtype.

    Parameters are updated in their `compute_dtype` (float32, or complex64
    and wider) and cast back to their dtype: what the kernel does per block.

    Args:
      params: the parameter leaf.
      u: the leaf's update ``u`` (any float or complex dtype).
      hp: `make_hp`'s vector with the learning rate and weight decay set.

    Returns:
      The new parameters, in ``params``' dtype.
    """
    dtype = compute_dtype(params.dtype)
    new = apply_step(params.astype(dtype), u.astype(dtype), hp)
    return new.astype(params.dtype)
