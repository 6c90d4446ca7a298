"""The Adam presets: one record per codec pair, each public Adam function built from it.

A preset (`AdamPreset`) says which codecs hold the two moments, which
structural options choose them (``bits``, ``rounding``, ``encoder``) and how
to describe them. `scale_by_adam_polar`, `_piquant`, `_8bit` and `_4bit` are
generated here from the presets and `COMMON_ARGS`; the ``adam_*`` and
``adamw_*`` aliases (`optax_lowbit.alias`) are generated from the same
records. Adding a codec pair is one `AdamPreset` in `PRESETS` (and its test).

Every preset keeps its first moment in its own codec and its second moment in
`stable_nu_codec` (8-bit: bitsandbytes' map rounded stochastically), format 2
of the state (`optax_lowbit.transforms.adam.STATE_FORMAT`).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any, NamedTuple

import optax

from optax_lowbit import _checks
from optax_lowbit import _generate as gen
from optax_lowbit.codecs import base
from optax_lowbit.transforms import _quantized
from optax_lowbit.transforms import adam as _adam

#: The polar presets' rounding rule (see `optax_lowbit.codecs.polar`).
DEFAULT_ROUNDING = "stochastic"

_ROUNDINGS = ("stochastic", "nearest")


def _codecs(module: str) -> Any:
    """Imports ``optax_lowbit.codecs.<module>`` (codecs load on first use)."""
    return importlib.import_module(f"optax_lowbit.codecs.{module}")


def stable_nu_codec(group_size: int = 128) -> base.Codec:
    """The second-moment codec of every Adam preset below 8 bits.

    4-bit codes on a geometric map (levels 1.4x apart, zero-free), rounded
    stochastically, one fp32 scale per ``group_size`` elements
    (`optax_lowbit.codecs.blockwise.log_map`). A second moment with
    ``b2 = 0.999`` moves by 0.1% per step; a re-encoded EMA keeps track of
    it only with unbiased rounding on levels fine enough everywhere below the
    group maximum: the 2-bit polar and π-Quant codebooks (too coarse, their
    re-encoded ``v`` settles at 0.7x and 0.02x of the truth after 3000 steps)
    and the linear 4-bit map (no resolution far below the maximum) do not
    (`benchmarks/state_drift.py`, the README's drift table). So the polar and
    π-Quant optimizers keep their codebook for the first moment and take this
    one for the second (a mixed layout); pass ``nu_codec`` to choose another.

    Args:
      group_size: elements per scale; the polar presets pass their first
        moment's group (64) so that the fused kernel takes both moments.

    Returns:
      A stochastic `optax_lowbit.codecs.blockwise.BlockwiseCodec`.

    Examples:
      >>> import optax_lowbit as lowbit
      >>> codec = lowbit.stable_nu_codec(64)
      >>> codec.name, codec.bits_per_element
      ('blockwise4-unsigned-b64-log-sr', 4.5)
    """
    return _codecs("blockwise").blockwise4(
        False, block_size=group_size, qmap="log", rounding="stochastic"
    )


#: The polar optimizers' code bits per element when ``bits`` is ``None``.
DEFAULT_POLAR_BITS = 2


def polar_codec(bits: Any, rounding: Any, signed: bool = True) -> base.Codec:
    """The polar codec of the structural ``bits`` and ``rounding``, checked.

    The one check of the polar options every optimizer shares (Adam, Lion,
    SGD, Adafactor): Python values (not ``inject_hyperparams`` arrays), ``bits``
    in (1.5, 2), ``rounding`` in ('stochastic', 'nearest').

    Args:
      bits: ``2`` or ``1.5``; ``None`` is `DEFAULT_POLAR_BITS`. The
        optimizers' default is ``None``, not ``2``: ``optax.inject_hyperparams``
        turns a numeric default into an array, so ``None`` lets it wrap them
        without ``static_args`` (``None`` stays a Python value).
      rounding: ``"stochastic"`` or ``"nearest"``.
      signed: the signed codebook (moments, momenta) or the unsigned one.

    Returns:
      `optax_lowbit.codecs.polar.polar` of these arguments.
    """
    bits = DEFAULT_POLAR_BITS if bits is None else bits
    _checks.static_arg("bits", bits, "1.5 or 2")
    _checks.one_of(
        "bits",
        bits,
        (1.5, 2),
        (
            "for 4 bits use scale_by_adam_4bit or adamw_4bit (8 bits: _8bit); "
            "Lion, SGD and Adafactor take polar codes or any codec as mu_codec."
        ),
    )
    _checks.static_arg("rounding", rounding, "'stochastic' or 'nearest'")
    _checks.one_of("rounding", rounding, _ROUNDINGS)
    return _codecs("polar").polar(bits=bits, signed=signed, rounding=rounding)


def polar_codecs(bits: float | None, rounding: str) -> tuple[base.Codec, base.Codec]:
    """``(mu_codec, nu_codec)`` of the polar preset."""
    mu_codec = polar_codec(bits, rounding)
    return mu_codec, stable_nu_codec(mu_codec.group_size)


def piquant_codecs(encoder: str) -> tuple[base.Codec, base.Codec]:
    """``(mu_codec, nu_codec)`` of the π-Quant preset."""
    _checks.one_of("encoder", encoder, ("nearest", "paper"))
    return _codecs("piquant").piquant(encoder=encoder, signed=True), stable_nu_codec()


def blockwise_codecs(bits: int) -> tuple[base.Codec, base.Codec]:
    """``(mu_codec, nu_codec)`` of the 8-bit (``bits=8``) or 4-bit preset."""
    blockwise = _codecs("blockwise")
    if bits == 8:
        return blockwise.blockwise8(True), blockwise.blockwise8(
            False, rounding="stochastic"
        )
    return blockwise.blockwise4(True), stable_nu_codec()


class AdamPreset(NamedTuple):
    """One Adam codec pair, the one definition its public functions are made of.

    Attributes:
      name: the suffix of its functions (``scale_by_adam_<name>``,
        ``adam_<name>``, ``adamw_<name>``).
      codecs: ``codecs(**options) -> (mu_codec, nu_codec)``, checking the
        options.
      options: its structural keyword arguments (`optax_lowbit._generate.Arg`).
      summary: what holds the moments, completing "Adam with ...".
      details: the docstring's paragraph on the codecs (measured numbers).
      references: the papers, one per line, indented as a docstring section.
      example: ``(bytes per parameter of the transform's state, (mu codec name,
        nu codec name))`` at the defaults on a 256 x 256 leaf, shown and checked
        by the docstrings' examples.
      nu_follows_mu: whether an overriding ``mu_codec`` also sets the default
        second-moment groups (so that the fused kernel takes both moments).
    """

    name: str
    codecs: Callable[..., tuple[base.Codec, base.Codec]]
    options: tuple[gen.Arg, ...]
    summary: str
    details: str
    references: str
    example: tuple[str, tuple[str, str]]
    nu_follows_mu: bool = False


def _blockwise_preset(bits: int, **text: str | tuple) -> AdamPreset:
    """The blockwise baseline at ``bits`` (`blockwise_codecs`, no options).

    ``text`` is the preset's prose: ``summary``, ``details``, ``references``
    and ``example`` (`AdamPreset`).
    """
    return AdamPreset(
        name=f"{bits}bit",
        codecs=functools.partial(blockwise_codecs, bits),
        options=(),
        **text,
    )


#: The polar codec's paper, for the References of every polar optimizer.
POLAR_REFERENCE = (
    "Yu et al, `Ultra-Low-Bit Optimizer States via 2D Polar Quantization`, 2025"
)

PRESETS: dict[str, AdamPreset] = {
    "polar": AdamPreset(
        name="polar",
        codecs=polar_codecs,
        options=gen.keyword_only(
            [
                gen.Arg(
                    "bits",
                    "``2`` or ``1.5`` code bits per element of the first moment; "
                    "``None`` (the default) is 2, and stays static under "
                    "``optax.inject_hyperparams`` (structural: a value you pass "
                    "there must be listed in ``static_args``).",
                    None,
                ),
                gen.Arg(
                    "rounding",
                    "``'stochastic'`` or ``'nearest'`` (structural, like "
                    "``bits``): the first moment's rounding rule "
                    "(`optax_lowbit.codecs.polar`).",
                    DEFAULT_ROUNDING,
                ),
            ]
        ),
        summary="the first moment in 2D polar codes (2 or 1.5 bits per element)",
        details=(
            "The first moment uses the signed polar codebook (8 angles x rings, "
            "groups of 64 elements with one scale each, "
            "`optax_lowbit.codecs.polar`); the second moment `stable_nu_codec` "
            "with the same groups (4-bit log map, stochastic rounding, 4.5 bits "
            "all-in). All in, 6.75 bits per element at 2 bits (0.84 B/param), "
            "6.25 at 1.5 (0.78 B/param). The unsigned polar codebook for ``v`` "
            "(``nu_codec=lowbit.codecs.polar(bits, signed=False, "
            "rounding='stochastic')``, 4.5 / 3.5 bits all-in) drifts over long "
            "runs: after 3000 steps its re-encoded ``v`` is 0.7x the truth with "
            "8% of the elements below a quarter (`benchmarks/state_drift.py`)."
        ),
        references="  " + POLAR_REFERENCE,
        example=("0.844", ("polar-2b-signed-sr", "blockwise4-unsigned-b64-log-sr")),
        nu_follows_mu=True,
    ),
    "piquant": AdamPreset(
        name="piquant",
        codecs=piquant_codecs,
        options=gen.keyword_only(
            [
                gen.Arg(
                    "encoder",
                    "``'nearest'`` (exact nearest codeword, our default) or "
                    "``'paper'`` (the closed-form encoder of the reference code).",
                    "nearest",
                )
            ]
        ),
        summary="the first moment in π-Quant codes (3.83 bits all-in per element)",
        details=(
            "Each pair of elements of the first moment is one of 100 codewords. "
            "The second moment takes `stable_nu_codec` (4.25 bits all-in): "
            "re-encoded in π-Quant codes it collapses to 2% of the true ``v`` "
            "within 3000 steps (`benchmarks/state_drift.py`), so π-Quant is no "
            "longer offered for ``v`` by default; "
            "``nu_codec=lowbit.codecs.piquant(signed=False)`` restores the "
            "paper's layout. The two moments are grouped differently (96 and "
            "128 elements): on a GPU the step runs through XLA, 3.5-4.6x "
            '``optax.adamw``\'s time (README, "The fused step"); the polar and '
            "blockwise presets are the fast ones. A fused kernel stepping both "
            "in joint rows of 384 elements was measured bit-equal on an H100 but "
            "slower than the XLA step (6.1x against 4.4x) and removed."
        ),
        references=(
            "  Tian et al, `Irrational Complex Rotations Empower Low-bit "
            "Optimizers\n  <https://arxiv.org/abs/2501.12896>`_, 2025"
        ),
        example=("1.07", ("piquant-signed-z-cs0.5", "blockwise4-unsigned-b128-log-sr")),
    ),
    "8bit": _blockwise_preset(
        8,
        summary="both moments in 8 bits (blockwise dynamic map, block 256)",
        details=(
            "As bitsandbytes' ``AdamW8bit``: the signed dynamic-tree map for the "
            "first moment, the unsigned one for the second, an fp32 absmax scale "
            "per 256 elements: 8.125 bits per element all-in. Where we differ: "
            "the second moment is rounded stochastically (unbiased), so that its "
            "re-encoded EMA does not stall or drift over long runs "
            "(`benchmarks/state_drift.py`)."
        ),
        references=(
            "  Dettmers et al, `8-bit Optimizers via Block-wise Quantization\n"
            "  <https://arxiv.org/abs/2110.02861>`_, 2022"
        ),
        example=("2.031", ("blockwise8-signed-b256", "blockwise8-unsigned-b256-sr")),
    ),
    "4bit": _blockwise_preset(
        4,
        summary="both moments in 4 bits (block 128)",
        details=(
            "As the 4-bit optimizer of Li et al for the first moment "
            "(dynamic-exponent map, nearest rounding, an fp32 scale per 128 "
            "elements); the second moment takes `stable_nu_codec` (a geometric "
            "map rounded stochastically) instead of the paper's zero-free linear "
            "map, whose elements far below their block's maximum are "
            "over-estimated up to 12x and never recover "
            "(`benchmarks/state_drift.py`). 4.25 bits per element all-in."
        ),
        references=(
            "  Li et al, `Memory Efficient Optimizers with 4-bit States\n"
            "  <https://arxiv.org/abs/2309.01507>`_, 2023"
        ),
        example=(
            "1.063",
            ("blockwise4-signed-b128", "blockwise4-unsigned-b128-log-sr"),
        ),
    ),
}

#: Adam's numeric hyperparameters, in `optax.scale_by_adam`'s order.
ADAM_ARGS = (
    gen.Arg("b1", "decay rate of the first moment, as in `optax.scale_by_adam`.", 0.9),
    gen.Arg("b2", "decay rate of the second moment.", 0.999),
    gen.Arg("eps", "term added to the denominator outside the square root.", 1e-8),
    gen.Arg("eps_root", "term added to the denominator inside the square root.", 0.0),
)

MU_DTYPE = gen.Arg(
    "mu_dtype",
    "dtype of the first moment on the leaves the policy keeps unquantized: "
    "``None`` (the parameters' dtype, as Optax), ``jnp.float32`` or "
    "``jnp.bfloat16``.",
    None,
)

#: The keyword arguments every Adam preset function takes after its options.
COMMON_ARGS = gen.keyword_only(
    [
        gen.Arg(
            "nesterov", "whether to use Nesterov momentum (NAdam), as in Optax.", False
        ),
        gen.Arg(
            "policy",
            "which leaves are quantized (`optax_lowbit.policy`); ``None`` is the "
            "default policy. Structural: under ``optax.inject_hyperparams`` list "
            "it in ``static_args``.",
            None,
        ),
        gen.Arg(
            "impl",
            "``'auto'`` (Pallas kernels on GPU/TPU, jnp on CPU), ``'jnp'`` or "
            "``'pallas'`` (see `scale_by_adam_quantized`).",
            "auto",
        ),
    ]
)

CODEC_ARGS = gen.keyword_only(
    [
        gen.Arg("mu_codec", "overrides the first moment's codec (signed).", None),
        gen.Arg("nu_codec", "overrides the second moment's codec.", None),
    ]
)


def codecs(
    preset: AdamPreset,
    mu_codec: base.Codec | None = None,
    nu_codec: base.Codec | None = None,
    **options: Any,
) -> tuple[base.Codec, base.Codec]:
    """``(mu_codec, nu_codec)`` of ``preset`` with ``options``, overrides applied.

    Args:
      preset: the preset.
      mu_codec: replaces the first moment's codec when given.
      nu_codec: replaces the second moment's codec when given.
      **options: the preset's structural options.

    Returns:
      The two codecs (checked by `scale_by_adam_quantized`).
    """
    mu, nu = preset.codecs(**options)
    if mu_codec is not None:
        mu = _quantized.check_codec("mu_codec", mu_codec, signed=True)
        if preset.nu_follows_mu and nu_codec is None:
            nu = stable_nu_codec(mu.group_size)
    return mu, nu if nu_codec is None else nu_codec


def build(
    preset: AdamPreset,
    b1: Any,
    b2: Any,
    eps: Any,
    eps_root: Any,
    *,
    nesterov: bool,
    policy: Any,
    impl: str,
    mu_dtype: Any,
    mu_codec: base.Codec | None,
    nu_codec: base.Codec | None,
    **options: Any,
) -> tuple[optax.GradientTransformation, tuple[base.Codec, base.Codec]]:
    """`scale_by_adam_quantized` with the preset's codecs, and the codecs.

    The body of ``scale_by_adam_<name>`` and the Adam link of the aliases.

    Args:
      preset: the preset.
      b1: decay rate of the first moment.
      b2: decay rate of the second moment.
      eps: term added to the denominator outside the square root.
      eps_root: term added to the denominator inside the square root.
      nesterov: Nesterov momentum.
      policy: which leaves are quantized.
      impl: ``"auto"``, ``"jnp"`` or ``"pallas"``.
      mu_dtype: first-moment dtype on unquantized leaves.
      mu_codec: overrides the first moment's codec.
      nu_codec: overrides the second moment's codec.
      **options: the preset's structural options.

    Returns:
      ``(transform, (mu_codec, nu_codec))``.
    """
    pair = codecs(preset, mu_codec, nu_codec, **options)
    tx = _adam.scale_by_adam_quantized(
        *pair,
        b1,
        b2,
        eps,
        eps_root,
        nesterov=nesterov,
        policy=policy,
        impl=impl,
        mu_dtype=mu_dtype,
    )
    return tx, pair


_TRANSFORM_DOC = """Adam with {summary}.

{details}

{{args}}

Returns:
  An `optax.GradientTransformation` with a `ScaleByAdamQuantizedState`.

Examples:
  >>> import jax.numpy as jnp
  >>> import optax_lowbit as lowbit
  >>> state = lowbit.scale_by_adam_{name}().init({{"w": jnp.zeros((256, 256))}})
  >>> round(lowbit.state_bytes(state) / 256**2, 3)  # B/param, both moments
  {bytes}

References:
  Kingma and Ba, `Adam: A Method for Stochastic Optimization
  <https://arxiv.org/abs/1412.6980>`_, 2014

{references}
"""


def preset_doc(template: str, preset: AdamPreset) -> str:
    """``template`` filled with the preset's fields (``{{args}}`` kept)."""
    import textwrap

    return template.format(
        name=preset.name,
        summary=preset.summary,
        details=textwrap.fill(preset.details, 80, break_on_hyphens=False),
        references=preset.references,
        bytes=preset.example[0],
        codec_names=preset.example[1],
        family=preset.example[1][0].split("-")[0],
    )


def make_scale_by_adam(
    preset: AdamPreset,
) -> Callable[..., optax.GradientTransformation]:
    """``scale_by_adam_<name>``: `scale_by_adam_quantized` with the preset's codecs."""
    return gen.function(
        f"scale_by_adam_{preset.name}",
        (
            *ADAM_ARGS,
            *preset.options,
            *COMMON_ARGS,
            MU_DTYPE._replace(keyword_only=True),
            *CODEC_ARGS,
        ),
        lambda **kwargs: build(preset, **kwargs)[0],
        preset_doc(_TRANSFORM_DOC, preset),
        __name__,
    )


scale_by_adam_polar = make_scale_by_adam(PRESETS["polar"])
scale_by_adam_piquant = make_scale_by_adam(PRESETS["piquant"])
scale_by_adam_8bit = make_scale_by_adam(PRESETS["8bit"])
scale_by_adam_4bit = make_scale_by_adam(PRESETS["4bit"])
