"""Muon over a quantized momentum: `scale_by_muon_quantized`.

Semantics are `optax.contrib.scale_by_muon`'s, step for step: the momentum is
decoded to float32, updated (``m ← β m + (1 − β) g``), bias-corrected (with
Nesterov's look-ahead by default), orthogonalized by Optax's own Newton-Schulz
iteration (`optax.contrib._muon.orthogonalize_via_newton_schulz`, unchanged),
and the new momentum is encoded again. Muon keeps one buffer per matrix, so a
2-bit polar momentum makes its state 14x smaller (2.25 bits all-in instead of
32). With ``lowbit.codecs.identity()`` the result equals Optax's.

The state has the fields of `optax.contrib.MuonState` (``count``, ``mu``,
``ns_coeffs``), with ``mu`` a moment tree (`Packed` or plain leaves).

The momentum step (decode, step, encode) runs leaf by leaf in jnp, or, with
``impl`` resolving to Pallas, in the fused kernel of `optax_lowbit.kernels`
(the Adam kernel's loop with `kernels.rules.MomentumRule`) for the leaves
whose codec has one; both take the one step `kernels.rules.momentum_step`
and the same stochastic-rounding streams, so the state and ``m_hat`` are
the same. Newton-Schulz is matmuls: XLA's, on either path.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax.contrib import _muon

from optax_lowbit import _checks
from optax_lowbit.codecs import base
from optax_lowbit.kernels import _backend, rules
from optax_lowbit.kernels import adam as kadam
from optax_lowbit.transforms import _quantized

#: What ``impl`` accepts (as `scale_by_adam_quantized`'s).
_IMPLS = ("auto", "jnp", "pallas")
#: Optax's default Newton-Schulz coefficients and its named presets.
DEFAULT_NS_COEFFS = _muon._DEFAULT_NS_COEFFS
NS_COEFFS_PRESETS = _muon._NS_COEFFS_PRESET_DICT
#: Optax's per-shape update scaling of the Muon leaves (used unchanged).
scale_by_shape = _muon.scale_by_shape


class ScaleByMuonQuantizedState(NamedTuple):
    """State of `scale_by_muon_quantized` (the fields of ``optax.contrib.MuonState``).

    Attributes:
      count: int32 array of shape ``()``: the number of updates so far.
      mu: the momentum, the structure of the parameters; per leaf a `Packed`
        (the policy quantizes it) or a plain array.
      ns_coeffs: the Newton-Schulz coefficients, ``(3,)`` or ``(n, 3)``.
    """

    count: jax.Array
    mu: optax.Updates
    ns_coeffs: jax.Array


def _ns_coeffs(ns_coeffs: Any, ns_steps: Any) -> jax.Array:
    """Optax's checked coefficients (its own ``init`` on an empty tree)."""
    return _muon.scale_by_muon(ns_coeffs, ns_steps).init({}).ns_coeffs


def is_dimension_numbers(x: Any) -> bool:
    """Whether ``x`` is one `optax.contrib.MuonDimensionNumbers` (a tree leaf)."""
    return isinstance(x, _muon.MuonDimensionNumbers)


def _dimension_numbers(weight_dimension_numbers: Any, tree: Any) -> Any:
    """The dimension numbers of ``tree`` (a tree of them, or a callable)."""
    if callable(weight_dimension_numbers):
        return weight_dimension_numbers(tree)
    return weight_dimension_numbers


def partition(weight_dimension_numbers: Any) -> tuple[Any, Any]:
    """How `optax.contrib.muon` splits the parameters, as two callables.

    ``labels(params)`` is ``"muon"`` for the leaves Muon orthogonalizes (the
    matrices, or the leaves that ``weight_dimension_numbers`` gives dimension
    numbers) and ``"adam"`` for the others (its Adam fallback).
    ``dims(params)`` gives each Muon leaf its `MuonDimensionNumbers` (the
    default ``MuonDimensionNumbers()`` when ``weight_dimension_numbers`` is
    ``None``) and an ``optax.MaskedNode`` elsewhere: the structure the Muon
    branch of ``optax.partition`` sees.

    Args:
      weight_dimension_numbers: ``None``, a tree of dimension numbers (``None``
        for the Adam leaves, a prefix of the params) or a callable returning
        one.

    Returns:
      ``(labels, dims)``.
    """

    def labels(params: Any) -> Any:
        if weight_dimension_numbers is None:
            return jax.tree.map(lambda p: "muon" if p.ndim == 2 else "adam", params)
        return jax.tree.map(
            lambda d, sub: jax.tree.map(lambda _: "adam" if d is None else "muon", sub),
            _dimension_numbers(weight_dimension_numbers, params),
            params,
            is_leaf=lambda x: x is None or is_dimension_numbers(x),
        )

    def dims(params: Any) -> Any:
        muon = jax.tree.map(lambda label: label == "muon", labels(params))
        given = _dimension_numbers(weight_dimension_numbers, params)
        if given is None:
            given = _muon.MuonDimensionNumbers()  # a prefix of every leaf

        def fill(d: Any, sub: Any) -> Any:
            return jax.tree.map(lambda m: d if m else optax.MaskedNode(), sub)

        return jax.tree.map(
            fill,
            given,
            muon,
            is_leaf=lambda x: x is None or is_dimension_numbers(x),
        )

    return labels, dims


def scale_by_muon_quantized(
    mu_codec: base.Codec,
    ns_coeffs: Any = DEFAULT_NS_COEFFS,
    ns_steps: Any = 5,
    beta: Any = 0.95,
    eps: Any = 1e-8,
    mu_dtype: Any = None,
    *,
    nesterov: bool = True,
    adaptive: bool = False,
    preconditioning: str = "frobenius",
    weight_dimension_numbers: Any = None,
    policy: Any = None,
    impl: str = "auto",
) -> optax.GradientTransformation:
    r"""Rescales updates by Muon's rule, keeping the momentum in ``mu_codec``.

    Per leaf, with :math:`t` the new count:

    .. math::

      m \leftarrow (1 - \beta) g + \beta m, \quad
      \hat m = \beta \frac{m}{1 - \beta^{t+1}} + (1 - \beta)\frac{g}{1 - \beta^t}
      \ (\text{Nesterov; else } m / (1 - \beta^t)), \quad
      u = \mathrm{NS}(\hat m)

    computed in float32 from the decoded momentum, ``NS`` the Newton-Schulz
    orthogonalization of `optax.contrib.scale_by_muon`; then ``m`` is encoded
    again. Faults as every optimizer here: a non-finite element of ``g`` keeps
    its old momentum (`optax_lowbit.codecs.base.saturate_or_keep`). The step
    is `optax_lowbit.kernels.rules.momentum_step` (Optax's to an ulp or two:
    its sums are arranged so that FMA contraction cannot round the kernel and
    the jnp path differently).

    Args:
      mu_codec: codec of the momentum on quantized leaves (must be signed).
      ns_coeffs: Newton-Schulz coefficients, as in `optax.contrib.scale_by_muon`.
      ns_steps: Newton-Schulz iterations.
      beta: decay rate of the momentum.
      eps: term added to denominators for stability.
      mu_dtype: dtype of the momentum on the leaves the policy keeps
        unquantized: ``None`` (the parameters' dtype, as Optax),
        ``jnp.float32`` or ``jnp.bfloat16``.
      nesterov: whether to use Nesterov momentum (Optax's default, True).
      adaptive: scale the orthogonalized update by the dual norm of ``m̂``.
      preconditioning: ``'frobenius'``, ``'spectral'``, ``'aol'`` or
        ``'schatten'``, as in Optax.
      weight_dimension_numbers: `optax.contrib.MuonDimensionNumbers` per leaf
        (a tree or a callable), as in Optax; ``None``: every leaf a matrix.
      policy: ``policy(path, leaf) -> bool``, which leaves are quantized
        (`optax_lowbit.policy`); ``None`` is ``lowbit.policy.default()``.
      impl: ``"auto"`` (the fused Pallas kernel on GPU/TPU, jnp on CPU),
        ``"jnp"`` (the momentum step leaf by leaf in ``jnp``) or
        ``"pallas"`` (the kernel for the quantized leaves whose codec has one,
        `optax_lowbit.kernels.adam.has_kernel`, jnp for the others; on a CPU
        backend through the Pallas interpreter). The results are the same.

    Returns:
      An `optax.GradientTransformation` whose state is a
      `ScaleByMuonQuantizedState`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import optax_lowbit as lowbit
      >>> tx = lowbit.scale_by_muon_quantized(lowbit.codecs.polar(2))
      >>> params = {"w": jnp.ones((128, 256))}
      >>> state = tx.init(params)
      >>> g = {"w": jax.random.normal(jax.random.key(0), (128, 256))}
      >>> u, state = tx.update(g, state)
      >>> state.mu["w"].codec_name, u["w"].shape
      ('polar-2b-signed', (128, 256))

    References:
      Jordan, `modded-nanogpt: Speedrunning the NanoGPT baseline
      <https://github.com/KellerJordan/modded-nanogpt>`_, 2024

      Yu et al, `Ultra-Low-Bit Optimizer States via 2D Polar Quantization`, 2025
    """
    mu_codec = _quantized.check_codec("mu_codec", mu_codec, signed=True)
    _checks.in_unit_interval("beta", beta)
    _checks.non_negative("eps", eps)
    _checks.is_bool("nesterov", nesterov)
    _checks.is_bool("adaptive", adaptive)
    _checks.one_of("preconditioning", preconditioning, _muon._PRECONDITIONINGS)
    hint = "'auto' uses the Pallas kernel on GPU/TPU and jnp on CPU."
    _checks.one_of("impl", impl, _IMPLS, hint)
    fallback = _quantized.moment_dtype("mu_dtype", mu_dtype)
    policy = _quantized.resolve_policy(policy)
    _checks.positive_int_hyperparameter("ns_steps", ns_steps)
    coeffs = _ns_coeffs(ns_coeffs, ns_steps)  # checked at construction, as Optax

    def init_fn(params: optax.Params) -> ScaleByMuonQuantizedState:
        mu = _quantized.init_moment(params, mu_codec, policy, fallback_dtype=fallback)
        return ScaleByMuonQuantizedState(jnp.zeros([], jnp.int32), mu, coeffs)

    def update_fn(
        updates: optax.Updates, state: ScaleByMuonQuantizedState
    ) -> tuple[optax.Updates, ScaleByMuonQuantizedState]:
        count = optax.safe_increment(state.count)
        bc = 1 - beta**count
        bc_next = 1 - beta ** optax.safe_increment(count)
        hp = rules.momentum_hp(beta, bc, bc_next)

        def step(g: jax.Array, m: jax.Array) -> tuple[jax.Array, jax.Array]:
            g = g.astype(m.dtype)
            return rules.momentum_step(g, m, hp, nesterov=nesterov)

        if _backend.use_pallas(impl):
            m_hat, mu = fused_momentum(
                updates, state.mu, count, hp, mu_codec, nesterov, step
            )
        else:
            m_hat, (mu,) = _quantized.map_leaves(
                step, updates, (state.mu,), (mu_codec,), seed=count
            )

        def orthogonalize(x: jax.Array, dims: Any = None) -> jax.Array:
            return _muon.orthogonalize_via_newton_schulz(
                x, state.ns_coeffs, ns_steps, preconditioning, eps, dims
            )

        if weight_dimension_numbers is None:  # every leaf a matrix
            new_updates = jax.tree.map(orthogonalize, m_hat)
        else:
            new_updates = jax.tree.map(
                orthogonalize,
                m_hat,
                _dimension_numbers(weight_dimension_numbers, updates),
                is_leaf=is_dimension_numbers,
            )
        if adaptive:
            new_updates = jax.tree.map(
                lambda x, y: jnp.sum(x.conj() * y) * y, m_hat, new_updates
            )
        new_updates = jax.tree.map(lambda u, g: u.astype(g.dtype), new_updates, updates)
        return new_updates, ScaleByMuonQuantizedState(count, mu, state.ns_coeffs)

    return _quantized.transformation(
        init_fn, update_fn, ScaleByMuonQuantizedState, "scale_by_muon"
    )


def fused_momentum(
    updates: Any,
    mu: Any,
    count: jax.Array,
    hp: jax.Array,
    mu_codec: base.Codec,
    nesterov: bool,
    step: Any,
) -> tuple[Any, Any]:
    """The momentum step over a tree: the kernel where the codec has one.

    `Packed` leaves of a codec with a kernel take the fused momentum kernel
    (`kernels.adam.rule_update_many` with `kernels.rules.MomentumRule`: one
    launch per leaf signature, same-shape leaves together) on their float32
    update; the others take ``step`` through `_quantized.map_leaves`. Leaf
    ``i`` rounds with the stream ``leaf_seed(count, i, 0)`` either way.

    Args:
      updates: the incoming updates.
      mu: the momentum tree of the state.
      count: the new step count.
      hp: `kernels.rules.momentum_hp`'s vector.
      mu_codec: the momentum's codec.
      nesterov: Nesterov momentum.
      step: the jnp step of one leaf, ``step(g, m) -> (m_hat, m)``.

    Returns:
      ``(m_hat, new_mu)``: float32 trees of the updates' structure and the
      new momentum tree.
    """
    fusable = kadam.has_kernel(mu_codec)
    flat, _, (mus,), rewrap = _quantized.flatten_with_moments(updates, (mu,))
    outs, new = [None] * len(flat), [None] * len(flat)
    idx = []  # the kernel's leaves, stepped together below
    for i, (g, m) in enumerate(zip(flat, mus, strict=True)):
        if fusable and _quantized.is_packed(m):
            idx.append(i)
            continue
        m_hat, (m,) = _quantized.map_leaves(
            step, [g], ([m],), (mu_codec,), seed=count, first_leaf=i
        )
        outs[i], new[i] = m_hat[0], m[0]
    config = kadam.launch_config(rules.MomentumRule(nesterov), [mu_codec])
    results = kadam.rule_update_many(
        config,
        [flat[i].astype(jnp.float32) for i in idx],
        [(mus[i],) for i in idx],
        [hp] * len(idx),
        _quantized.leaf_seed_rows(count, idx, 1),
    )
    for i, (m_hat, (m,)) in zip(idx, results, strict=True):
        outs[i], new[i] = m_hat, m
    m_hat, (mu,) = rewrap(outs, [new])
    return m_hat, mu
