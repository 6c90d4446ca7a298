"""Adam over quantized moments: `scale_by_adam_quantized`, its state and its step.

Semantics are `optax.scale_by_adam`'s, step for step: decode the moments to
float32, update them, bias-correct, compute the update from the float32 moments
(never from their quantized images), then encode the new moments. With
``lowbit.codecs.identity()`` for both moments the result equals
`optax.scale_by_adam` to float tolerance.

Structural arguments (codecs, ``bits``, ``policy``, ``impl``, ``nesterov``) are
fixed at construction. Numeric hyperparameters (``b1``, ``b2``, ``eps``,
``eps_root``) may be arrays or tracers (``optax.inject_hyperparams``); they are
checked only when they are Python numbers. ``optax.inject_hyperparams``
wraps the aliases as they are (the structural defaults are ``None``); the
structural values you pass as numbers or callables go in ``static_args``::

    optax.inject_hyperparams(lowbit.adamw_polar, static_args=("bits", "policy"))(
        learning_rate=1e-3, bits=1.5, policy=my_policy
    )
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_lowbit import _checks, _generate
from optax_lowbit.codecs import base
from optax_lowbit.kernels import _backend
from optax_lowbit.kernels import adam as kadam
from optax_lowbit.transforms import _quantized

_IMPLS = ("auto", "jnp", "pallas")


#: Version of the Adam state's format. 2: the presets' second moments moved to
#: stochastic 4/8-bit codecs (issue 16); 1 (no ``format`` field): before.
STATE_FORMAT = 2


class ScaleByAdamQuantizedState(NamedTuple):
    """State of `scale_by_adam_quantized`.

    Attributes:
      count: int32 array of shape ``()``: the number of updates so far.
      mu: first moment, the structure of the parameters; per leaf a `Packed`
        (the policy quantizes it) or a float32 array.
      nu: second moment, the same layout as ``mu``.
      format: int32 array of shape ``()``, `STATE_FORMAT` when the state was
        made. ``None`` in a state of format 1 (written before it existed,
        e.g. unpickled from an older release): `update` then raises rather
        than read its bytes with today's codecs.
    """

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates
    format: Any = None


def check_state_format(state: ScaleByAdamQuantizedState) -> None:
    """Raises ValueError, naming the versions, on a state of another format.

    A traced ``format`` cannot be read: only a missing one (format 1) and a
    concrete value are checked; Orbax refuses a format-1 checkpoint restored
    into a format-2 target itself (its ``format`` leaf is missing).
    """
    fmt = state.format
    if fmt is not None and isinstance(fmt, jax.core.Tracer):
        return
    found = 1 if fmt is None else int(np.asarray(fmt))
    if found != STATE_FORMAT:
        raise ValueError(
            f"this Adam state has format {found}; optax_lowbit writes and reads "
            f"format {STATE_FORMAT} (the second moments' codecs changed). A state "
            "of format 1 still decodes itself (each Packed keeps its codec): "
            "re-encode it with lowbit.convert(old_state, tx, params); an Orbax "
            "checkpoint of format 1 restores with the target of the release that "
            "wrote it."
        )


def _check_impl(impl: Any) -> None:
    _checks.one_of(
        "impl",
        impl,
        _IMPLS,
        "'auto' uses the Pallas kernels on GPU/TPU and jnp on CPU.",
    )


def scale_by_adam_quantized(
    mu_codec: base.Codec,
    nu_codec: base.Codec,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    eps_root: Any = 0.0,
    *,
    nesterov: bool = False,
    policy: Any = None,
    impl: str = "auto",
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""Rescales updates by Adam's rule, keeping both moments in given codecs.

    Per leaf, with :math:`g` the update, :math:`t` the new count:

    .. math::

      m &\leftarrow \beta_1 m + (1 - \beta_1) g, \quad
      v \leftarrow \beta_2 v + (1 - \beta_2) g^2 \\
      u &= \frac{m / (1 - \beta_1^t)}
               {\sqrt{v / (1 - \beta_2^t) + \bar\varepsilon} + \varepsilon}

    computed in float32 from the decoded moments; then ``m`` and ``v`` are
    encoded again. ``nesterov=True`` uses
    :math:`\beta_1 m / (1 - \beta_1^{t+1}) + (1 - \beta_1) g / (1 - \beta_1^t)`
    in place of the corrected :math:`m`, as `optax.scale_by_adam` does.

    Faults, every codec and both paths (`optax_lowbit.kernels.adam.moment_step`):
    a NaN or inf element of ``g`` gives a NaN update there, as Optax's, and
    keeps its old (decoded) moments; the rest of its group (the codec's
    ``group_size``) is encoded as if it had not come
    (`optax_lowbit.codecs.base.saturate_or_keep`). A finite ``g`` never gives
    NaN: where ``v`` overflows (``|g|`` above about 1e19) the update is 0, as
    Optax's, and the stored moments saturate at ``±base.MAX_STORED`` (2**125),
    where Optax stores inf.

    Args:
      mu_codec: codec of the first moment on quantized leaves (must be signed).
      nu_codec: codec of the second moment on quantized leaves.
      b1: decay rate of the first moment, as in `optax.scale_by_adam`.
      b2: decay rate of the second moment.
      eps: term added to the denominator outside the square root.
      eps_root: term added to the denominator inside the square root.
      nesterov: whether to use Nesterov momentum (NAdam), as in Optax.
      policy: ``policy(path, leaf) -> bool``, which leaves are quantized
        (`optax_lowbit.policy`); ``None`` is ``lowbit.policy.default()``.
        Other leaves keep float32 moments.
      impl: ``"auto"`` (Pallas kernels on GPU/TPU, jnp on CPU), ``"jnp"``
        (the pure ``jnp`` path) or ``"pallas"`` (the fused kernel of
        `optax_lowbit.kernels.adam` for leaves whose codecs have one, jnp for
        the others; on a CPU backend it runs through the Pallas interpreter).
      mu_dtype: dtype of the first moment on the leaves the policy keeps
        unquantized: ``None`` (the parameter's dtype, as in
        `optax.scale_by_adam`), ``jnp.float32`` or ``jnp.bfloat16``.

    Returns:
      An `optax.GradientTransformation` whose state is a
      `ScaleByAdamQuantizedState`. Updates have the dtype of the incoming
      updates.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax, optax_lowbit as lowbit
      >>> fp32 = lowbit.codecs.identity()
      >>> tx = lowbit.scale_by_adam_quantized(fp32, fp32, policy=lambda p, x: True)
      >>> params = {"w": jnp.array([1.0, -2.0, 3.0])}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.array([0.5, -1.0, 0.0])}, state)
      >>> print(updates["w"].round(4))  # step 1: m_hat / sqrt(v_hat) = sign(g)
      [ 1. -1.  0.]
      >>> state.mu["w"].codec_name, int(state.count)
      ('identity-float32', 1)

    References:
      Kingma and Ba, `Adam: A Method for Stochastic Optimization
      <https://arxiv.org/abs/1412.6980>`_, 2014

      Dozat, `Incorporating Nesterov Momentum into Adam
      <https://openreview.net/pdf?id=OM0jvwB8jIp57ZJjtNEZ>`_, 2016
    """
    mu_codec = _quantized.check_codec("mu_codec", mu_codec, signed=True)
    nu_codec = _quantized.check_codec("nu_codec", nu_codec)
    _checks.in_unit_interval("b1", b1)
    _checks.in_unit_interval("b2", b2)
    _checks.non_negative("eps", eps)
    _checks.non_negative("eps_root", eps_root)
    _checks.is_bool("nesterov", nesterov)
    _check_impl(impl)
    fallback_mu_dtype = _quantized.moment_dtype("mu_dtype", mu_dtype)
    policy = _quantized.resolve_policy(policy)

    def init_fn(params: optax.Params) -> ScaleByAdamQuantizedState:
        mu = _quantized.init_moment(
            params, mu_codec, policy, fallback_dtype=fallback_mu_dtype
        )
        nu = _quantized.init_moment(params, nu_codec, policy)
        return ScaleByAdamQuantizedState(
            jnp.zeros([], jnp.int32), mu, nu, jnp.asarray(STATE_FORMAT, jnp.int32)
        )

    def update_fn(
        updates: optax.Updates, state: ScaleByAdamQuantizedState
    ) -> tuple[optax.Updates, ScaleByAdamQuantizedState]:
        check_state_format(state)
        count = optax.safe_increment(state.count)
        hp, step = adam_step(b1, b2, eps, eps_root, nesterov, count)
        if _backend.use_pallas(impl):
            outs, new_state, unflatten = fused_leaves(
                updates, state, count, hp, mu_codec, nu_codec, nesterov, step
            )
            return unflatten(outs), new_state

        updates, (mu, nu) = _quantized.map_leaves(
            step, updates, (state.mu, state.nu), (mu_codec, nu_codec), seed=count
        )
        return updates, ScaleByAdamQuantizedState(count, mu, nu, state.format)

    return _quantized.transformation(
        init_fn, update_fn, ScaleByAdamQuantizedState, "scale_by_adam_quantized"
    )


def adam_step(
    b1: Any, b2: Any, eps: Any, eps_root: Any, nesterov: bool, count: jax.Array
) -> tuple[jax.Array, Callable[..., tuple[jax.Array, jax.Array, jax.Array]]]:
    """Adam at step ``count`` (the new count): ``(hp, step)``.

    ``hp`` is the fused kernel's hyperparameter vector (`make_hp`); ``step(g,
    m, v) -> (u, m, v)`` is the same step of one leaf in jnp, float32 moments:
    the kernels' own `moment_step` on the same ``hp`` (fault rule included),
    ``u`` cast to ``g``'s dtype.
    """
    bc1 = 1 - b1**count
    bc2 = 1 - b2**count
    bc1_next = 1 - b1 ** optax.safe_increment(count) if nesterov else None
    hp = kadam.make_hp(b1, b2, eps, eps_root, bc1, bc2, bc1_next)

    def step(g, m, v):
        if jnp.iscomplexobj(g):  # a complex leaf's full-precision moments
            return _quantized.complex_adam_step(
                g, m, v, b1, b2, eps, eps_root, nesterov, count
            )
        return _leaf_step(g, m, v, hp, nesterov=nesterov)

    return hp, step


@functools.partial(jax.jit, static_argnames=("nesterov",))
def _leaf_step(g, m, v, hp, *, nesterov):
    """`kadam.moment_step` of one real leaf, ``u`` in ``g``'s dtype, jitted.

    Jitted so that a step over many leaves traces it once per leaf shape and
    dtype (a call with the same abstract arguments reuses the traced program;
    XLA inlines the calls): GPT-2 small's 98 float-moment leaves have a few
    shapes (NOTES_kernels.md, v25). The same operations as unjitted.
    """
    u, m, v = kadam.moment_step(g.astype(jnp.float32), m, v, hp, nesterov=nesterov)
    return u.astype(g.dtype), m, v


def fused_leaves(
    updates: Any,
    state: ScaleByAdamQuantizedState,
    count: jax.Array,
    hp: jax.Array,
    mu_codec: base.Codec,
    nu_codec: base.Codec,
    nesterov: bool,
    step: Any,
    *,
    use_pallas: bool = True,
    params: Sequence[Any] | None = None,
    leaf_hps: Sequence[jax.Array] | None = None,
) -> tuple[list[Any], ScaleByAdamQuantizedState, Any]:
    """Adam over a tree: the fused kernel on the leaves it handles, ``step`` elsewhere.

    Leaves whose moments are both `Packed` by codecs with a kernel
    (`optax_lowbit.kernels.adam.has_kernel`) take one fused step
    (`adam_update_many`: one kernel launch per leaf signature, leaves of one
    group grid and dtypes together; or its jnp definition
    `adam_update_reference` leaf by leaf when ``use_pallas`` is false);
    with ``use_pallas``, leaves whose moments are plain float32 arrays
    (`kadam.float_leaf_fits`) take the kernel too, as float moments
    (`kadam.adam_update_float_many`: a few launches for all of them, bit for
    bit the jnp step; stepped in jnp, their many small graphs were most of
    the first step's XLA compile: NOTES_kernels.md, v37); the others (codecs
    without a kernel, complex leaves, other float leaves, every float leaf
    without ``use_pallas``) take ``step`` through `_quantized.map_leaves`,
    leaf by leaf in their own shapes, and with ``params`` the same AdamW
    apply as the kernel's (`kadam.apply_leaf`); on a GPU XLA fuses these
    small elementwise steps into a few multi-output loops (NOTES_kernels.md
    v9, v11). Kernel and jnp leaves draw leaf
    ``i``'s stochastic rounding from the streams ``leaf_seed(count, i, 0 | 1)``.

    Args:
      updates: the incoming updates.
      state: the Adam state.
      count: the new step count.
      hp: the kernel hyperparameters (`make_hp`).
      mu_codec: first-moment codec.
      nu_codec: second-moment codec.
      nesterov: Nesterov momentum.
      step: the jnp step of one leaf (see `_quantized.map_leaves`).
      use_pallas: the Pallas kernel, or its jnp definition.
      params: parameter leaves (flat, in the order of ``updates``): fused
        leaves then also apply the step and return the new parameter.
      leaf_hps: per-leaf ``hp`` for the fused apply (weight decay masked).

    Returns:
      ``(outs, new_state, unflatten)``: flat per-leaf outputs (``u``, or the
      new parameters when ``params`` is given), the new state, and
      ``unflatten(flat)``, which builds the updates' tree from flat leaves
      (``nnx.Variable`` nodes rewrapped).
    """
    # a pair of unequal groups (π-Quant's m beside its 128-element v) has no
    # kernel: its leaves step through XLA
    fusable = kadam.kernel_codecs(mu_codec, nu_codec) is not None
    flat, _, (mus, nus), rewrap = _quantized.flatten_with_moments(
        updates, (state.mu, state.nu)
    )
    if params is not None:
        _quantized.check_param_shapes(updates, flat, params)
    n = len(flat)
    hps = [hp] * n if leaf_hps is None else list(leaf_hps)
    outs = [None] * n
    new_m, new_v = [None] * n, [None] * n
    kernel_leaves = []  # stepped below, one launch per leaf signature
    float_leaves = []  # the float kernel's, below
    for i, (g, m, v) in enumerate(zip(flat, mus, nus, strict=True)):
        packed = _quantized.is_packed(m) and _quantized.is_packed(v)
        if fusable and packed:
            kernel_leaves.append(i)
            continue
        p = None if params is None else params[i]
        if use_pallas and kadam.float_leaf_fits(g, m, v, p):
            float_leaves.append(i)
            continue
        sub_u, (sub_m, sub_v) = _quantized.map_leaves(
            step, [g], ([m], [v]), (mu_codec, nu_codec), seed=count, first_leaf=i
        )
        outs[i], new_m[i], new_v[i] = sub_u[0], sub_m[0], sub_v[0]
        if params is not None:
            outs[i] = _apply_leaf(params[i], outs[i], hps[i])
    if float_leaves:
        idx = float_leaves
        results = kadam.adam_update_float_many(
            [flat[i] for i in idx],
            [mus[i] for i in idx],
            [nus[i] for i in idx],
            [hps[i] for i in idx],
            nesterov=nesterov,
            params=None if params is None else [params[i] for i in idx],
        )
        for i, (out, m, v) in zip(idx, results, strict=True):
            outs[i], new_m[i], new_v[i] = out, m, v
    # All kernel leaves in one call: the kernel runs the leaves that share a
    # signature (group grid and dtypes) in one launch (adam_update_many).
    idx = kernel_leaves
    seeds = _quantized.leaf_seed_rows(count, idx, 2)  # (leaves, 2), vectorised
    pars = [None] * len(idx) if params is None else [params[i] for i in idx]
    args = ([flat[i] for i in idx], [mus[i] for i in idx], [nus[i] for i in idx])
    kernel_hps = [hps[i] for i in idx]
    codecs = dict(mu_codec=mu_codec, nu_codec=nu_codec, nesterov=nesterov)
    if use_pallas:
        results = kadam.adam_update_many(
            *args, kernel_hps, seeds=seeds, params=pars, **codecs
        )
    else:
        results = [
            kadam.adam_update_reference(g, m, v, h, seeds=sd, params=p, **codecs)
            for g, m, v, h, sd, p in zip(*args, kernel_hps, seeds, pars, strict=True)
        ]
    for i, (out, m, v) in zip(idx, results, strict=True):
        outs[i], new_m[i], new_v[i] = out, m, v
    _, (mu_tree, nu_tree) = rewrap(outs, [new_m, new_v])
    new_state = ScaleByAdamQuantizedState(count, mu_tree, nu_tree, state.format)
    return outs, new_state, lambda xs: rewrap(xs)[0]


#: `kadam.apply_leaf`, jitted for the same reason as `_leaf_step`.
_apply_leaf = jax.jit(kadam.apply_leaf)


# The presets, at their old address.
__getattr__ = _generate.forward(
    __name__,
    (
        "DEFAULT_ROUNDING",
        "stable_nu_codec",
        "polar_codecs",
        "piquant_codecs",
        "blockwise_codecs",
        "scale_by_adam_polar",
        "scale_by_adam_piquant",
        "scale_by_adam_8bit",
        "scale_by_adam_4bit",
    ),
    "optax_lowbit.transforms.adam_presets",
)
