"""Ready optimizers over low-bit states, with Optax's signatures.

Each alias is an `optax.chain`, exactly as `optax.adamw` is::

    chain(scale_by_adam_<codec>(...), add_decayed_weights(weight_decay, mask),
          scale_by_learning_rate(learning_rate))

so its state has the shape of `optax.adamw`'s with the Adam entry replaced by
a `ScaleByAdamQuantizedState` (which is what `optax_lowbit.convert` relies on).
Arguments keep Optax's names and order (``learning_rate, b1, b2, eps, eps_root,
mu_dtype, weight_decay, mask``); ours are keyword-only after ``*``.

``optax.inject_hyperparams`` wraps every alias as it is: the structural
arguments' defaults (``bits=None``, ``policy=None``, Adafactor's
``min_dim_size_to_factor=None``) are not numbers, so it leaves them static.
Structural values you pass as numbers or callables must be listed:
``static_args=("bits", "policy")`` (``mask`` too when it is a callable).

The Adam family (``adam_<name>``, ``adamw_<name>`` and the deprecated
``fused_adamw_<name>``) and the Muon family (``muon_<name>``) are generated
from the presets of `optax_lowbit.transforms.adam_presets`; Adafactor, Lion
and SGD (polar momentum only) are generated from their own argument records
with the polar preset's options (`_polar_tail`), so ``bits``, ``rounding``,
``policy`` and ``mu_codec`` are described once. Why one module of ~900 lines:
like Optax's
``alias.py`` it is the one place a user reads for the ready optimizers, most
of it their argument records and docstrings.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import jax
import optax

from optax_lowbit import _checks
from optax_lowbit import _generate as _gen
from optax_lowbit import fused as _fused
from optax_lowbit.codecs import base
from optax_lowbit.transforms import _quantized
from optax_lowbit.transforms import adafactor as _adafactor
from optax_lowbit.transforms import adam_presets as _presets
from optax_lowbit.transforms import lion as _lion
from optax_lowbit.transforms import muon as _muon_tx
from optax_lowbit.transforms import sgd as _sgd


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


def _scaled_by(
    learning_rate: Any, name: str = "learning_rate", *, flip_sign: bool = True
) -> optax.GradientTransformation:
    """`optax.scale_by_learning_rate`, ``learning_rate`` checked first."""
    _checks.scalar_or_schedule(name, learning_rate, none="no scaling, as in Optax")
    return optax.scale_by_learning_rate(learning_rate, flip_sign=flip_sign)


def _decay(
    weight_decay: Any, mask: Any, name: str = "weight_decay"
) -> optax.GradientTransformation:
    """`optax.add_decayed_weights`, ``weight_decay`` and ``mask`` checked."""
    _checks.scalar_or_schedule(name, weight_decay)
    inner = optax.add_decayed_weights(weight_decay, mask)
    check = _checked_mask(mask)
    if check is None:
        return inner

    def init_fn(params: optax.Params) -> optax.OptState:
        check(params)
        return inner.init(params)

    return optax.GradientTransformation(init_fn, inner.update)


def _adam_chain(
    preset: _presets.AdamPreset,
    decay: bool,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Any = None,
    *,
    fused: bool = False,
    **adam_args: Any,
) -> optax.GradientTransformation | _fused.FusedOptimizer:
    """The Adam (``decay=False``) or AdamW chain of ``preset``, or its fused step.

    ``adam_args`` are those of `adam_presets.build` (Adam's hyperparameters,
    the preset's options, ``nesterov``, ``policy``, ``impl``, ``mu_dtype``
    and the codec overrides).
    """
    _checks.is_bool("fused", fused)
    adam, (mu_codec, nu_codec) = _presets.build(preset, **adam_args)

    def tail(mask: Any) -> list[optax.GradientTransformation]:
        links = [_decay(weight_decay, mask)] if decay else []
        return [*links, _scaled_by(learning_rate)]

    tx = optax.chain(adam, *tail(mask))
    if not fused:
        return tx
    return _fused.fuse_adamw(
        tx,
        # the same links for one scalar (the fused step advances their state
        # on it): a mask of the parameters' tree becomes a mask of one leaf
        optax.chain(*tail(None if mask is None else True)),
        mu_codec,
        nu_codec,
        tuple(adam_args[k] for k in ("b1", "b2", "eps", "eps_root", "nesterov")),
        learning_rate,
        weight_decay,
        mask,
        adam_args["impl"],
    )


_LEARNING_RATE = _gen.Arg(
    "learning_rate", "a float or an `optax.Schedule`, as in `optax.adamw`."
)
_DECAY_ARGS = (
    _gen.Arg(
        "weight_decay",
        "decoupled weight decay (multiplied by the learning rate), a float or a "
        "schedule.",
        1e-4,
    ),
    _gen.Arg(
        "mask",
        "a tree of bools with the structure of the params (or a prefix), or a "
        "callable returning one: where weight decay applies.",
        None,
    ),
)
_FUSED = _gen.Arg(
    "fused",
    "``True`` returns a `FusedOptimizer` instead of the chain: the same state, "
    "its step applying the update to the parameters inside the kernel "
    "(`optax_lowbit.fused`).",
    False,
    keyword_only=True,
)


def _alias_args(
    preset: _presets.AdamPreset, decay: bool, fused: bool
) -> tuple[_gen.Arg, ...]:
    """Arguments of ``adam(w)_<name>``: Optax's order, then ours after ``*``."""
    return (
        _LEARNING_RATE,
        *_presets.ADAM_ARGS,
        _presets.MU_DTYPE,
        *(_DECAY_ARGS if decay else ()),
        *preset.options,
        *((_FUSED,) if fused else ()),
        *_presets.COMMON_ARGS,
        *_presets.CODEC_ARGS,
    )


_ADAMW_DOC = """AdamW with {summary}: a drop-in for `optax.adamw`.

The chain of `scale_by_adam_{name}`, `optax.add_decayed_weights` and
`optax.scale_by_learning_rate`, as `optax.adamw` is: its state is
`optax.adamw`'s with the Adam entry a `ScaleByAdamQuantizedState` (what
`optax_lowbit.convert` relies on). Leaves the policy does not quantize keep
float32 moments. ``fused=True`` gives the same optimizer as one
update-and-apply step per quantized leaf (`FusedOptimizer`).

{details}

{{args}}

Returns:
  An `optax.GradientTransformation` (``fused=True``: a `FusedOptimizer`).

Examples:
  >>> import jax, jax.numpy as jnp
  >>> import optax, optax_lowbit as lowbit
  >>> params = {{"w": jnp.ones((64, 256))}}
  >>> grads = {{"w": jnp.full((64, 256), 0.5)}}
  >>> tx = lowbit.adamw_{name}(learning_rate=1e-2)
  >>> updates, state = tx.update(grads, tx.init(params), params)
  >>> print(f"{{float(optax.apply_updates(params, updates)['w'][0, 0]):.4f}}")
  0.9900
  >>> opt = lowbit.adamw_{name}(learning_rate=1e-2, fused=True)
  >>> new_params, state = jax.jit(opt.step)(grads, opt.init(params), params)
  >>> print(f"{{float(new_params['w'][0, 0]):.4f}}")
  0.9900

References:
  Loshchilov et al, `Decoupled Weight Decay Regularization
  <https://arxiv.org/abs/1711.05101>`_, 2019

{references}
"""

_ADAM_DOC = """Adam with {summary}: a drop-in for `optax.adam`.

The chain of `scale_by_adam_{name}` and `optax.scale_by_learning_rate`, as
`optax.adam` is (no weight decay: see ``adamw_{name}``).

{details}

{{args}}

Returns:
  An `optax.GradientTransformation` (``fused=True``: a `FusedOptimizer`).

Examples:
  >>> import jax.numpy as jnp
  >>> import optax_lowbit as lowbit
  >>> state = lowbit.adam_{name}(1e-3).init({{"w": jnp.zeros((256, 256))}})
  >>> state[0].mu["w"].codec_name, state[0].nu["w"].codec_name
  {codec_names}

References:
  Kingma and Ba, `Adam: A Method for Stochastic Optimization
  <https://arxiv.org/abs/1412.6980>`_, 2014

{references}
"""

_DEPRECATED_DOC = """Deprecated: ``adamw_{name}(..., fused=True)``.

AdamW with {summary}, as one fused step per quantized leaf. Kept for one
release: it warns and returns ``adamw_{name}(*args, **kwargs, fused=True)``.

{{args}}

Returns:
  A `FusedOptimizer`.

Examples:
  >>> import warnings
  >>> import optax_lowbit as lowbit
  >>> with warnings.catch_warnings(record=True) as caught:
  ...     warnings.simplefilter("always")
  ...     opt = lowbit.fused_adamw_{name}(1e-3)
  >>> type(opt).__name__, caught[0].category.__name__
  ('FusedOptimizer', 'DeprecationWarning')

References:
{references}
"""


def _make_alias(
    preset: _presets.AdamPreset, decay: bool
) -> Callable[..., optax.GradientTransformation | _fused.FusedOptimizer]:
    """``adamw_<name>`` (``decay``) or ``adam_<name>``, generated from the preset."""
    return _gen.function(
        f"adam{'w' if decay else ''}_{preset.name}",
        _alias_args(preset, decay, fused=True),
        functools.partial(_adam_chain, preset, decay),
        _presets.preset_doc(_ADAMW_DOC if decay else _ADAM_DOC, preset),
        __name__,
    )


def _make_deprecated_fused(preset: _presets.AdamPreset) -> Callable[..., Any]:
    """``fused_adamw_<name>``: the old spelling of ``adamw_<name>(fused=True)``."""
    name = f"fused_adamw_{preset.name}"

    def body(**kwargs: Any) -> _fused.FusedOptimizer:
        warnings.warn(
            f"{name}(...) is deprecated: use adamw_{preset.name}(..., fused=True).",
            DeprecationWarning,
            stacklevel=3,
        )
        return _adam_chain(preset, True, fused=True, **kwargs)

    return _gen.function(
        name,
        _alias_args(preset, decay=True, fused=False),
        body,
        _presets.preset_doc(_DEPRECATED_DOC, preset),
        __name__,
    )


_POLAR, _PIQUANT = _presets.PRESETS["polar"], _presets.PRESETS["piquant"]
_8BIT, _4BIT = _presets.PRESETS["8bit"], _presets.PRESETS["4bit"]

adamw_polar = _make_alias(_POLAR, decay=True)
adamw_piquant = _make_alias(_PIQUANT, decay=True)
adamw_8bit = _make_alias(_8BIT, decay=True)
adamw_4bit = _make_alias(_4BIT, decay=True)
adam_polar = _make_alias(_POLAR, decay=False)
adam_piquant = _make_alias(_PIQUANT, decay=False)
adam_8bit = _make_alias(_8BIT, decay=False)
adam_4bit = _make_alias(_4BIT, decay=False)
fused_adamw_polar = _make_deprecated_fused(_POLAR)
fused_adamw_piquant = _make_deprecated_fused(_PIQUANT)
fused_adamw_8bit = _make_deprecated_fused(_8BIT)
fused_adamw_4bit = _make_deprecated_fused(_4BIT)


_MUON_ARGS = (
    _LEARNING_RATE._replace(
        doc="a float or an `optax.Schedule`, as in `optax.contrib.muon`."
    ),
    _gen.Arg(
        "ns_coeffs",
        "Newton-Schulz coefficients, a ``(3,)`` tuple, a tuple of them, or a "
        "preset name (``'muon'``, ``'dion'``), as in `optax.contrib.muon`.",
        _muon_tx.DEFAULT_NS_COEFFS,
    ),
    _gen.Arg("ns_steps", "Newton-Schulz iterations.", 5),
    _gen.Arg("beta", "decay rate of the momentum.", 0.95),
    _gen.Arg("eps", "term added to denominators (and Adam's eps).", 1e-8),
    _gen.Arg("weight_decay", "decoupled weight decay of the Muon leaves.", 0.0),
    _gen.Arg("weight_decay_mask", "where the Muon leaves' weight decay applies.", None),
    _presets.MU_DTYPE,
)
_MUON_OPTIONS = _gen.keyword_only(
    [
        _gen.Arg("nesterov", "Nesterov momentum (Optax's default here).", True),
        _gen.Arg("adaptive", "scale updates by the dual norm of the momentum.", False),
        _gen.Arg(
            "preconditioning",
            "``'frobenius'``, ``'spectral'``, ``'aol'`` or ``'schatten'``.",
            "frobenius",
        ),
        _gen.Arg("adam_b1", "b1 of the Adam fallback (non-matrix leaves).", 0.9),
        _gen.Arg("adam_b2", "b2 of the Adam fallback.", 0.999),
        _gen.Arg("adam_eps_root", "eps_root of the Adam fallback.", 0.0),
        _gen.Arg("adam_weight_decay", "weight decay of the Adam fallback.", 0.0),
        _gen.Arg(
            "adam_learning_rate",
            "learning rate of the Adam fallback (``None``: ``learning_rate``).",
            None,
        ),
        _gen.Arg(
            "muon_weight_dimension_numbers",
            "`optax.contrib.MuonDimensionNumbers` per leaf (a tree, ``None`` for "
            "Adam leaves, or a callable); ``None``: the 2D leaves take Muon.",
            None,
        ),
        _gen.Arg(
            "consistent_rms",
            "as `optax.contrib.muon`'s (``None``: Optax's width scaling).",
            None,
        ),
    ]
)


def _muon(
    preset: _presets.AdamPreset,
    learning_rate: Any,
    ns_coeffs: Any,
    ns_steps: Any,
    beta: Any,
    eps: Any,
    weight_decay: Any,
    weight_decay_mask: Any,
    mu_dtype: Any,
    *,
    nesterov: bool,
    adaptive: bool,
    preconditioning: str,
    adam_b1: Any,
    adam_b2: Any,
    adam_eps_root: Any,
    adam_weight_decay: Any,
    adam_learning_rate: Any,
    muon_weight_dimension_numbers: Any,
    consistent_rms: Any,
    policy: Any,
    impl: str,
    mu_codec: base.Codec | None,
    **options: Any,
) -> optax.GradientTransformation:
    """`optax.contrib.muon` with the momentum (and the Adam fallback) in ``preset``."""
    if isinstance(ns_coeffs, str):
        presets = _muon_tx.NS_COEFFS_PRESETS
        _checks.one_of("ns_coeffs", ns_coeffs, tuple(presets))
        ns_coeffs = presets[ns_coeffs]
    momentum_codec = _presets.codecs(preset, mu_codec, **options)[0]
    labels, dims = _muon_tx.partition(muon_weight_dimension_numbers)
    # What the Muon chain and its Adam fallback both take, as optax.contrib.muon.
    shared = dict(
        eps=eps, mu_dtype=mu_dtype, nesterov=nesterov, policy=policy, impl=impl
    )
    muon = optax.chain(
        _muon_tx.scale_by_muon_quantized(
            momentum_codec,
            ns_coeffs,
            ns_steps,
            beta,
            adaptive=adaptive,
            preconditioning=preconditioning,
            weight_dimension_numbers=dims,
            **shared,
        ),
        _muon_tx.scale_by_shape(dims, consistent_rms),
        _decay(weight_decay, weight_decay_mask),
        _scaled_by(learning_rate),
    )
    _checks.scalar_or_schedule(
        "adam_learning_rate", adam_learning_rate, none="then learning_rate"
    )
    _checks.scalar_or_schedule("adam_weight_decay", adam_weight_decay)
    # named as the user wrote them (the Adam chain would say b1, b2, eps_root)
    _checks.in_unit_interval("adam_b1", adam_b1)
    _checks.in_unit_interval("adam_b2", adam_b2)
    _checks.non_negative("adam_eps_root", adam_eps_root)
    adam = _adam_chain(
        preset,
        True,
        learning_rate if adam_learning_rate is None else adam_learning_rate,
        adam_weight_decay,
        b1=adam_b1,
        b2=adam_b2,
        eps_root=adam_eps_root,
        mu_codec=None,
        nu_codec=None,
        **shared,
        **options,
    )
    return optax.partition({"muon": muon, "adam": adam}, labels)


_MUON_DOC = """Muon with its momentum in {summary}: a drop-in for `optax.contrib.muon`.

The matrices' momentum is stored by the preset's first-moment codec and
orthogonalized by Optax's own Newton-Schulz iteration
(`scale_by_muon_quantized`); the other leaves take Optax's fallback, AdamW,
here ``adamw_{name}`` (low-bit moments where the policy quantizes). The same
arguments, defaults and state structure as `optax.contrib.muon` (an
``optax.partition`` of a Muon chain and an AdamW chain).

{{args}}

Returns:
  An `optax.GradientTransformation`.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> import optax_lowbit as lowbit
  >>> params = {{"w": jnp.ones((128, 256)), "b": jnp.zeros(256)}}
  >>> tx = lowbit.muon_{name}(learning_rate=0.02)
  >>> state = tx.init(params)
  >>> updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  >>> state.inner_states["muon"].inner_state[0].mu["w"].codec_name.split("-")[0]
  '{family}'

References:
  Jordan, `modded-nanogpt: Speedrunning the NanoGPT baseline
  <https://github.com/KellerJordan/modded-nanogpt>`_, 2024

{references}
"""


def _rounding_default(
    options: tuple[_gen.Arg, ...], default: str, why: str
) -> tuple[_gen.Arg, ...]:
    """``options`` with ``rounding`` (where present) defaulting to ``default``.

    ``why`` is appended to its description.
    """
    return tuple(
        a._replace(default=default, doc=a.doc + why) if a.name == "rounding" else a
        for a in options
    )


def _muon_options(preset: _presets.AdamPreset) -> tuple[_gen.Arg, ...]:
    """The preset's options, polar rounding ``'nearest'`` by default for Muon.

    Newton-Schulz discards the momentum's scale, so the shrinkage of nearest
    rounding costs little while stochastic rounding's noise is kept: on a
    256 x 512 matrix with SNR 1 the 2-bit update's cosine to fp32 Muon's is
    0.86 with nearest and 0.76 with stochastic rounding after 30 steps
    (``tests/transforms/test_muon.py``).
    """
    why = " Muon's default is ``'nearest'`` (see the README)."
    return _rounding_default(preset.options, "nearest", why)


def _muon_common_args() -> tuple[_gen.Arg, ...]:
    """``policy`` and ``impl``, ``impl`` documented for Muon's momentum too."""
    return tuple(
        a._replace(
            doc="``'auto'`` (Pallas kernels on GPU/TPU, jnp on CPU), ``'jnp'`` or "
            "``'pallas'``: the momentum step of the matrices "
            "(`scale_by_muon_quantized`) and the Adam fallback "
            "(`scale_by_adam_quantized`)."
        )
        if a.name == "impl"
        else a
        for a in _presets.COMMON_ARGS[1:]
    )


def _make_muon(preset: _presets.AdamPreset) -> Callable[..., Any]:
    """``muon_<name>``, generated from the preset like the Adam aliases."""
    return _gen.function(
        f"muon_{preset.name}",
        (
            *_MUON_ARGS,
            *_muon_options(preset),
            *_MUON_OPTIONS,
            *_muon_common_args(),  # policy, impl (nesterov is Muon's)
            _presets.CODEC_ARGS[0]._replace(
                doc="overrides the matrices' momentum codec (signed); the Adam "
                "fallback keeps the preset's codecs."
            ),
        ),
        functools.partial(_muon, preset),
        _presets.preset_doc(_MUON_DOC, preset),
        __name__,
    )


muon_polar = _make_muon(_POLAR)
muon_piquant = _make_muon(_PIQUANT)
muon_8bit = _make_muon(_8BIT)
muon_4bit = _make_muon(_4BIT)


def _polar(
    bits: Any, signed: bool, override: base.Codec | None, rounding: Any
) -> base.Codec:
    """The polar codec of ``bits`` and ``rounding`` (structural), unless overridden."""
    codec = _presets.polar_codec(bits, rounding, signed)
    return codec if override is None else override


def _polar_tail(
    moment: str,
    *,
    coded: str | None = None,
    rounding_default: tuple[str, str] | None = None,
) -> tuple[_gen.Arg, ...]:
    """The keyword options after ``*`` of the polar-momentum aliases.

    The polar preset's ``bits`` and ``rounding`` (`adam_presets`), ``policy``
    and ``mu_codec``, documented for the state the codecs keep.

    Args:
      moment: the state ``mu_codec`` stores (``"momentum"``, ``"trace"``).
      coded: every state in polar codes (``None``: ``"the <moment>"``).
      rounding_default: ``(default, why)``: this alias's own default rounding
        and the reason (`_rounding_default`); ``None``: the preset's.

    Returns:
      The `_generate.Arg` records.
    """
    coded = coded or f"the {moment}"
    options = tuple(
        a._replace(doc=a.doc.replace("the first moment", coded)) for a in _POLAR.options
    )
    if rounding_default is not None:
        options = _rounding_default(options, *rounding_default)
    policy = next(a for a in _presets.COMMON_ARGS if a.name == "policy")
    mu_codec = _presets.CODEC_ARGS[0]
    return (
        *options,
        policy,
        mu_codec._replace(doc=f"overrides the {moment}'s codec (signed)."),
    )


def _polar_of(args: dict[str, Any], signed: bool) -> base.Codec:
    """The signed or unsigned polar codec of a polar-momentum alias.

    From its arguments ``args``: ``bits`` and ``rounding``, overridden by
    ``mu_codec`` (signed) or ``nu_codec`` (unsigned).
    """
    name = "mu_codec" if signed else "nu_codec"
    override = args[name]
    if override is not None:  # checked here, named as the user wrote it
        _quantized.check_codec(name, override, signed=signed)
    return _polar(args["bits"], signed, override, args["rounding"])


def _adafactor_chain(**a: Any) -> optax.GradientTransformation:
    """`adafactor_polar`'s chain; ``a``: its arguments by name, defaults applied."""
    _checks.non_negative("eps", a["eps"])  # the transform's ``epsilon``
    # checked here, named as the user wrote them: the links they reach check
    # them as ``decay`` and ``accumulator_dtype``, or not at all (momentum off)
    _checks.is_bool("multiply_by_parameter_scale", a["multiply_by_parameter_scale"])
    if a["clipping_threshold"] is not None:
        _checks.positive("clipping_threshold", a["clipping_threshold"])
    if a["momentum"] is not None:
        _checks.in_unit_interval("momentum", a["momentum"], closed_right=True)
    _quantized.moment_dtype("dtype_momentum", a["dtype_momentum"], none="float32")
    mu_codec, nu_codec = _polar_of(a, True), _polar_of(a, False)
    txs = [
        _adafactor.scale_by_factored_rms_quantized(
            a["factored"],
            a["decay_rate"],
            a["decay_offset"],
            a["min_dim_size_to_factor"],
            a["eps"],
            nu_codec=nu_codec,
            policy=a["policy"],
        )
    ]
    if a["clipping_threshold"] is not None:
        txs.append(optax.clip_by_block_rms(a["clipping_threshold"]))
    if a["learning_rate"] is not None:
        txs.append(_scaled_by(a["learning_rate"], flip_sign=False))
    if a["multiply_by_parameter_scale"]:
        txs.append(optax.scale_by_param_block_rms())
    if a["momentum"] is not None:
        txs.append(
            _adafactor.ema_quantized(
                a["momentum"],
                debias=False,
                accumulator_dtype=a["dtype_momentum"],
                codec=mu_codec,
                policy=a["policy"],
            )
        )
    if a["weight_decay_rate"] is not None:
        txs.append(
            _decay(a["weight_decay_rate"], a["weight_decay_mask"], "weight_decay_rate")
        )
    txs.append(optax.scale(-1))
    return optax.chain(*txs)


adafactor_polar = _gen.function(
    "adafactor_polar",
    (
        _gen.Arg(
            "learning_rate",
            "a float, a schedule, or ``None`` (no scaling), as in `optax.adafactor`.",
            None,
        ),
        _gen.Arg(
            "min_dim_size_to_factor",
            "factor a leaf only if its two largest axes are at least this size; "
            "``None`` (the default) is Optax's 128. Structural: a value passed "
            "under ``optax.inject_hyperparams`` must be listed in ``static_args``.",
            None,
        ),
        _gen.Arg("decay_rate", "exponent of the second moment's decay schedule.", 0.8),
        _gen.Arg(
            "decay_offset", "step offset of the decay schedule, for fine-tuning.", 0
        ),
        _gen.Arg(
            "multiply_by_parameter_scale",
            "scale updates by the parameters' block RMS.",
            True,
        ),
        _gen.Arg(
            "clipping_threshold", "block-RMS clipping threshold, or ``None``.", 1.0
        ),
        _gen.Arg(
            "momentum", "decay of the momentum (quantized), or ``None`` for none.", None
        ),
        _gen.Arg(
            "dtype_momentum",
            "dtype of the momentum on leaves kept unquantized: ``None`` (float32) "
            "or ``jnp.bfloat16``. (Optax's default is ``jnp.float32``, a callable "
            "that ``optax.inject_hyperparams`` would take for a schedule; ``None`` "
            "avoids that.)",
            None,
        ),
        _gen.Arg(
            "weight_decay_rate", "decoupled weight decay rate, or ``None``.", None
        ),
        _gen.Arg("eps", "added to the squared gradient.", 1e-30),
        _gen.Arg(
            "factored", "whether to factor the second moment of rank >= 2 leaves.", True
        ),
        _gen.Arg(
            "weight_decay_mask",
            "where weight decay applies (a bool tree or a callable).",
            None,
        ),
        *_polar_tail("momentum", coded="the momentum and the unfactored second moment"),
        _presets.CODEC_ARGS[1]._replace(
            doc="overrides the unfactored second moment's codec."
        ),
    ),
    _adafactor_chain,
    """Adafactor with its momentum and unfactored second moments in polar codes.

The chain of `optax.adafactor` with two links replaced: the factored
row/column statistics stay float32 (they are already small); the second
moment of leaves Adafactor does not factor (rank < 2, or a second largest
axis < ``min_dim_size_to_factor``) is stored in the unsigned polar code, and
the momentum (``momentum=b1``, off by default as in Optax) in the signed
one, on the leaves the policy quantizes. With ``momentum=0.9`` on a large
factored matrix, the state costs about 0.3 B/param at ``bits=2`` instead of
4 (fp32 momentum).

{args}

Returns:
  An `optax.GradientTransformation`, the chain of
  `scale_by_factored_rms_quantized`, `optax.clip_by_block_rms`,
  `optax.scale_by_learning_rate`, `optax.scale_by_param_block_rms`,
  `ema_quantized`, `optax.add_decayed_weights` and ``optax.scale(-1)`` (each
  where its argument enables it, as in `optax.adafactor`).

Examples:
  >>> import jax.numpy as jnp
  >>> import optax, optax_lowbit as lowbit
  >>> params = {"w": jnp.ones((256, 256)), "b": jnp.zeros(256)}
  >>> tx = lowbit.adafactor_polar(1e-2, momentum=0.9, bits=2)
  >>> state = tx.init(params)
  >>> state[-2].ema["w"].codec_name, state[0].v_row["w"].shape
  ('polar-2b-signed-sr', (256,))
  >>> grads = {"w": jnp.full((256, 256), 0.5), "b": jnp.ones(256)}
  >>> updates, state = tx.update(grads, state, params)
  >>> print(f"{float(updates['w'][0, 0]):.4f}")
  -0.0010

References:
  Shazeer and Stern, `Adafactor: Adaptive Learning Rates with Sublinear
  Memory Cost <https://arxiv.org/abs/1804.04235>`_, 2018

"""
    + "  "
    + _presets.POLAR_REFERENCE,
    __name__,
)


def _lion_chain(**a: Any) -> optax.GradientTransformation:
    """`lion_polar`'s chain; ``a``: its arguments by name, defaults applied."""
    mu_codec = _polar_of(a, True)
    lion = _lion.scale_by_lion_quantized(
        a["b1"], a["b2"], a["mu_dtype"], mu_codec=mu_codec, policy=a["policy"]
    )
    return optax.chain(
        lion,
        _decay(a["weight_decay"], a["mask"]),
        _scaled_by(a["learning_rate"]),
    )


lion_polar = _gen.function(
    "lion_polar",
    (
        _gen.Arg("learning_rate", "a float or an `optax.Schedule`."),
        _gen.Arg("b1", "rate combining the momentum and the current gradient.", 0.9),
        _gen.Arg("b2", "decay rate of the momentum.", 0.99),
        _gen.Arg(
            "mu_dtype",
            "dtype of the momentum on unquantized leaves (``None``: the "
            "parameters' dtype, as Optax; or ``jnp.float32``, ``jnp.bfloat16``).",
            None,
        ),
        _gen.Arg(
            "weight_decay",
            "decoupled weight decay (multiplied by the learning rate).",
            1e-3,
        ),
        _gen.Arg(
            "mask", "where weight decay applies (a bool tree or a callable).", None
        ),
        *_polar_tail(
            "momentum",
            rounding_default=(
                "nearest",
                " Lion's default is ``'nearest'``: its update is a sign, and "
                "stochastic rounding noise flips small coordinates.",
            ),
        ),
    ),
    _lion_chain,
    """Lion with its momentum in the signed 2D polar code (2 or 1.5 bits).

A drop-in for `optax.lion`: Lion keeps one state, the momentum; on the
leaves the policy quantizes it takes about 0.28 B/param at ``bits=2`` (0.22
at 1.5) instead of 4.

{args}

Returns:
  An `optax.GradientTransformation`, the chain of
  `scale_by_lion_quantized`, `optax.add_decayed_weights` and
  `optax.scale_by_learning_rate`, as `optax.lion` is.

Examples:
  >>> import jax.numpy as jnp
  >>> import optax, optax_lowbit as lowbit
  >>> params = {"w": jnp.ones((64, 128))}
  >>> tx = lowbit.lion_polar(learning_rate=1e-3, bits=1.5)
  >>> state = tx.init(params)
  >>> updates, state = tx.update({"w": -jnp.ones((64, 128))}, state, params)
  >>> print(f"{float(updates['w'][0, 0]):.6f}")  # -lr * (sign(g) + wd * p)
  0.000999
  >>> state[0].mu["w"].codec_name
  'polar-1.5b-signed'

References:
  Chen et al, `Symbolic Discovery of Optimization Algorithms
  <https://arxiv.org/abs/2302.06675>`_, 2023

"""
    + "  "
    + _presets.POLAR_REFERENCE,
    __name__,
)


def _sgd_chain(**a: Any) -> optax.GradientTransformation:
    """`sgd_polar`'s chain; ``a``: its arguments by name, defaults applied."""
    if a["momentum"] is None:
        raise ValueError(
            "momentum must be a number in [0, 1) for sgd_polar, got None; SGD "
            "without momentum keeps no state to quantize: use optax.sgd."
        )
    _checks.numeric("momentum", a["momentum"])  # its range: `trace_quantized`
    trace = _sgd.trace_quantized(
        a["momentum"],
        a["nesterov"],
        a["accumulator_dtype"],
        codec=_polar_of(a, True),
        policy=a["policy"],
    )
    return optax.chain(trace, _scaled_by(a["learning_rate"]))


sgd_polar = _gen.function(
    "sgd_polar",
    (
        _gen.Arg("learning_rate", "a float or an `optax.Schedule`."),
        _gen.Arg("momentum", "decay rate of the trace (not ``None``: see above).", 0.9),
        _gen.Arg("nesterov", "whether to use Nesterov momentum.", False),
        _gen.Arg(
            "accumulator_dtype",
            "dtype of the trace on unquantized leaves (``None``: the parameters' "
            "dtype, as Optax; or ``jnp.float32``, ``jnp.bfloat16``).",
            None,
        ),
        *_polar_tail("trace"),
    ),
    _sgd_chain,
    """SGD with (Nesterov) momentum, the trace in the signed 2D polar code.

`optax.sgd` with ``momentum`` set: the trace takes about 0.28 B/param at
``bits=2`` on the leaves the policy quantizes, instead of 4. Without
momentum SGD keeps no state: use `optax.sgd`.

{args}

Returns:
  An `optax.GradientTransformation`, the chain of `trace_quantized` and
  `optax.scale_by_learning_rate`, as `optax.sgd` is.

Examples:
  >>> import jax.numpy as jnp
  >>> import optax_lowbit as lowbit
  >>> params = {"w": jnp.ones((64, 128))}
  >>> tx = lowbit.sgd_polar(learning_rate=0.1, momentum=0.9)
  >>> state = tx.init(params)
  >>> updates, state = tx.update({"w": jnp.ones((64, 128))}, state)
  >>> print(f"{float(updates['w'][0, 0]):.4f}")
  -0.1000
  >>> state[0].trace["w"].codec_name
  'polar-2b-signed-sr'

References:
  Sutskever et al, `On the importance of initialization and momentum in
  deep learning <http://proceedings.mlr.press/v28/sutskever13.pdf>`_, 2013

"""
    + "  "
    + _presets.POLAR_REFERENCE,
    __name__,
)
