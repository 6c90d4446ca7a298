"""Fused Pallas Adam step over quantized moments (polar codecs).

Per block of ``block_groups`` groups the kernel loads the gradient, the packed
first and second moments (codes and scales); decodes them with the codec's own
jnp group functions (`optax_lowbit.codecs.polar.decode_groups_with`; there is
no second copy of the codec math); updates the moments in float32; computes
Adam's update ``u = m̂ / (sqrt(v̂ + eps_root) + eps)`` from the float32 new
moments (as `optax.scale_by_adam`); encodes the new moments
(`polar.encode_groups_with`) and stores codes, scales (aliased in place) and
``u``. One pass over the state: the floor is bytes moved (DESIGN §6).

Inputs the kernel cannot capture come in as arrays: the hyperparameters
(``hp``, traced under schedules / ``inject_hyperparams``) and the codebooks
(the rings). Leading axes are flattened to rows of one group each; the row
count is padded to a multiple of the block only where no power-of-two block
of at least 32 groups divides it.

`adam_update_reference` is the definition: the same step in pure jnp, the
path ``impl="jnp"`` takes.
"""

from __future__ import annotations

import functools
import importlib
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from optax_lowbit.codecs import base
from optax_lowbit.kernels import _backend

# the module (the package re-exports the factory function under this name)
polar = importlib.import_module("optax_lowbit.codecs.polar")

#: Slots of the hyperparameter vector ``hp`` (float32, length 16).
HP_FIELDS = (
    "b1",
    "one_minus_b1",
    "b2",
    "one_minus_b2",
    "eps",
    "eps_root",
    "bc1",
    "bc2",
    "bc1_next",
)
#: Groups per block and Triton warps. Time grows with elements per thread
#: (register spills): on an H100, 256M elements, 256 groups / 4 warps took 17.1
#: ms, 128 groups 5.66 ms, 64 groups 2.56 ms (benchmarks/NOTES_kernels.md).
DEFAULT_BLOCK_GROUPS = 64
DEFAULT_NUM_WARPS = 4
_HP_LEN = 16
_CB_LEN = 16  # codebook vector: mu rings at [0, 8), nu rings at [8, 16)
_CB_HALF = 8


def has_kernel(codec: base.Codec) -> bool:
    """Whether the fused kernel handles moments in ``codec``.

    Polar codecs whose code bytes per group are a power of two (2 bits: 16
    bytes per group of 64). At 1.5 bits a group has 12 code bytes, which the
    Triton lowering rejects (block sizes must be powers of two): those leaves
    take the jnp path. Stochastic rounding is not fused yet (jnp path).
    """
    nbytes = getattr(codec, "bytes_per_group", 0)
    return (
        isinstance(codec, polar.PolarCodec)
        and not codec.stochastic
        and nbytes > 0
        and nbytes & (nbytes - 1) == 0
        and len(codec.rings) <= _CB_HALF
        and codec.group_size in (16, 32, 64, 128, 256)
    )


def make_hp(b1, b2, eps, eps_root, bc1, bc2, bc1_next=None) -> jax.Array:
    """Packs the hyperparameters into the kernel's float32 ``(16,)`` input.

    ``1 - b1`` and ``1 - b2`` are formed here, as the jnp path forms them (in
    Python for numbers), so both paths use the same float32 constants.
    """
    vals = [
        b1,
        1 - b1,
        b2,
        1 - b2,
        eps,
        eps_root,
        bc1,
        bc2,
        bc1 if bc1_next is None else bc1_next,
    ]
    vals = [jnp.asarray(v, jnp.float32).reshape(()) for v in vals]
    vals += [jnp.zeros((), jnp.float32)] * (_HP_LEN - len(vals))
    return jnp.stack(vals)


def _moment_step(g, m, v, hp, *, nesterov: bool):
    """Adam's moment update and direction in float32 (shared by both paths).

    ``hp`` is indexable (an array or a ref); returns ``(u, m, v)``.
    """
    b1, omb1, b2, omb2 = hp[0], hp[1], hp[2], hp[3]
    eps, eps_root, bc1, bc2 = hp[4], hp[5], hp[6], hp[7]
    m = omb1 * g + b1 * m
    v = omb2 * (g * g) + b2 * v
    if nesterov:
        m_hat = b1 * (m / hp[8]) + omb1 * (g / bc1)
    else:
        m_hat = m / bc1
    u = m_hat / (jnp.sqrt(v / bc2 + eps_root) + eps)
    return u, m, v


def _group_fns(codec: base.Codec):
    """``(decode(codes, scales, rings), encode(x, rings))`` of a kernel codec."""

    def decode(codes, scales, rings):
        return polar.decode_groups_with(codes, scales, rings, signed=codec.signed)

    def encode(x, rings):
        return polar.encode_groups_with(
            x, rings, signed=codec.signed, scale_dtype=codec.scale_dtype
        )

    return decode, encode


def _adam_kernel(
    hp_ref,
    cb_ref,
    g_ref,
    mc_ref,
    ms_ref,
    vc_ref,
    vs_ref,
    u_ref,
    mc_out,
    ms_out,
    vc_out,
    vs_out,
    *,
    mu_codec,
    nu_codec,
    nesterov,
    last,
    groups_per_row,
    block,
):
    hp = [hp_ref[k] for k in range(len(HP_FIELDS))]  # scalars (traced hps)
    m_rings = [cb_ref[k] for k in range(len(mu_codec.rings))]
    v_rings = [cb_ref[_CB_HALF + k] for k in range(len(nu_codec.rings))]
    m_decode, m_encode = _group_fns(mu_codec)
    v_decode, v_encode = _group_fns(nu_codec)
    g = g_ref[...].astype(jnp.float32)
    m = m_decode(mc_ref[...], ms_ref[...], m_rings)
    v = v_decode(vc_ref[...], vs_ref[...], v_rings)
    gsize = g.shape[-1]
    if last % gsize:  # the padded tail of each row holds zeros (as in jnp)
        row = pl.program_id(0) * block + jnp.arange(block, dtype=jnp.int32)
        col = (row % groups_per_row) * gsize
        col = col[:, None] + jnp.arange(gsize, dtype=jnp.int32)[None, :]
        valid = col < last
        m = jnp.where(valid, m, 0.0)
        v = jnp.where(valid, v, 0.0)
    u, m, v = _moment_step(g, m, v, hp, nesterov=nesterov)
    u_ref[...] = u.astype(u_ref.dtype)
    mc_out[...], ms_out[...] = m_encode(m, m_rings)
    vc_out[...], vs_out[...] = v_encode(v, v_rings)


def _codebook(mu_codec: base.Codec, nu_codec: base.Codec) -> jax.Array:
    cb = [0.0] * _CB_LEN
    cb[: len(mu_codec.rings)] = mu_codec.rings
    cb[_CB_HALF : _CB_HALF + len(nu_codec.rings)] = nu_codec.rings
    return jnp.asarray(cb, jnp.float32)


def _pick_block(n: int, block_groups: int) -> tuple[int, int]:
    """``(block, padded_rows)``: a power-of-two block dividing ``n`` if >= 32."""
    if n <= block_groups:
        b = max(8, 1 << max(0, math.ceil(math.log2(max(n, 1)))))
        return b, b
    b = block_groups
    while b >= 32:
        if n % b == 0:
            return b, n
        b //= 2
    return block_groups, -(-n // block_groups) * block_groups


def _pad_rows(x: jax.Array, rows: int) -> jax.Array:
    if x.shape[0] == rows:
        return x
    return jnp.pad(x, [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def adam_update(
    g: jax.Array,
    mu: base.Packed,
    nu: base.Packed,
    hp: jax.Array,
    *,
    mu_codec: base.Codec,
    nu_codec: base.Codec,
    nesterov: bool = False,
    block_groups: int | None = None,
    num_warps: int | None = None,
    lowering: str | None = None,
) -> tuple[jax.Array, base.Packed, base.Packed]:
    """One fused Adam step of one leaf: ``(u, new_mu, new_nu)``.

    Args:
      g: the gradient (update) leaf, any float dtype and shape.
      mu: first moment, `Packed` by ``mu_codec`` for ``g.shape``.
      nu: second moment, `Packed` by ``nu_codec``.
      hp: float32 ``(16,)`` from `make_hp` (may be traced).
      mu_codec: codec of ``mu`` (`has_kernel` must hold).
      nu_codec: codec of ``nu``.
      nesterov: Nesterov momentum, as `optax.scale_by_adam`.
      block_groups: groups per kernel block (a power of two); ``None``:
        `DEFAULT_BLOCK_GROUPS`.
      num_warps: Triton warps per block; ``None``: `DEFAULT_NUM_WARPS`.
      lowering: force a GPU lowering (see `_backend.pick`).

    Returns:
      ``u`` in ``g``'s dtype and shape, and the new moments (same layout).
    """
    return _adam_update(
        g,
        mu,
        nu,
        hp,
        mu_codec=mu_codec,
        nu_codec=nu_codec,
        nesterov=nesterov,
        block_groups=block_groups or DEFAULT_BLOCK_GROUPS,
        num_warps=num_warps or DEFAULT_NUM_WARPS,
        lowering=lowering,
    )


@functools.partial(
    jax.jit,
    static_argnames=(
        "mu_codec",
        "nu_codec",
        "nesterov",
        "block_groups",
        "num_warps",
        "lowering",
    ),
)
def _adam_update(
    g: jax.Array,
    mu: base.Packed,
    nu: base.Packed,
    hp: jax.Array,
    *,
    mu_codec: base.Codec,
    nu_codec: base.Codec,
    nesterov: bool = False,
    block_groups: int,
    num_warps: int,
    lowering: str | None,
) -> tuple[jax.Array, base.Packed, base.Packed]:
    """The jitted body of `adam_update`, with block and warps resolved.

    Arguments and return values are those of `adam_update`.
    """
    if mu_codec.group_size != nu_codec.group_size:
        raise ValueError(
            "mu_codec and nu_codec must share group_size for the fused kernel, "
            f"got {mu_codec.group_size} and {nu_codec.group_size}."
        )
    backend = _backend.pick(lowering)
    gsize = mu_codec.group_size
    shape = tuple(g.shape)
    xg = base.to_groups(g, gsize)
    lead_groups = xg.shape[:-1]
    n = math.prod(lead_groups)
    bm, bv = mu.codes.shape[-1], nu.codes.shape[-1]
    block, rows = _pick_block(n, block_groups)
    rows_g = _pad_rows(xg.reshape(n, gsize), rows)
    mc = _pad_rows(mu.codes.reshape(n, bm), rows)
    ms = _pad_rows(mu.scales.reshape(n, 1), rows)
    vc = _pad_rows(nu.codes.reshape(n, bv), rows)
    vs = _pad_rows(nu.scales.reshape(n, 1), rows)
    u_dtype = g.dtype

    def row_spec(width):
        return pl.BlockSpec((block, width), lambda i: (i, 0))

    def full_spec(length):
        return pl.BlockSpec((length,), lambda i: (0,))

    kernel = functools.partial(
        _adam_kernel,
        mu_codec=mu_codec,
        nu_codec=nu_codec,
        nesterov=nesterov,
        last=base.lead_and_last(shape)[1],
        groups_per_row=lead_groups[-1],
        block=block,
    )
    state_bytes = rows * (bm + bv + ms.dtype.itemsize + vs.dtype.itemsize)
    g_bytes = rows * gsize * (rows_g.dtype.itemsize + jnp.dtype(u_dtype).itemsize)
    u, mc, ms, vc, vs = pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((rows, gsize), u_dtype),
            jax.ShapeDtypeStruct(mc.shape, mc.dtype),
            jax.ShapeDtypeStruct(ms.shape, ms.dtype),
            jax.ShapeDtypeStruct(vc.shape, vc.dtype),
            jax.ShapeDtypeStruct(vs.shape, vs.dtype),
        ),
        grid=(rows // block,),
        in_specs=[
            full_spec(_HP_LEN),
            full_spec(_CB_LEN),
            row_spec(gsize),
            row_spec(bm),
            row_spec(1),
            row_spec(bv),
            row_spec(1),
        ],
        out_specs=(
            row_spec(gsize),
            row_spec(bm),
            row_spec(1),
            row_spec(bv),
            row_spec(1),
        ),
        input_output_aliases={3: 1, 4: 2, 5: 3, 6: 4},
        interpret=backend.interpret,
        compiler_params=backend.compiler_params(num_warps=num_warps),
        cost_estimate=pl.CostEstimate(
            flops=60 * rows * gsize,
            transcendentals=3 * rows * gsize,
            bytes_accessed=2 * state_bytes + g_bytes,
        ),
        name=f"adam_{mu_codec.name}",
    )(hp.astype(jnp.float32), _codebook(mu_codec, nu_codec), rows_g, mc, ms, vc, vs)
    u = base.from_groups(u[:n].reshape((*lead_groups, gsize)), shape)
    new_mu = base.Packed(
        codes=mc[:n].reshape(mu.codes.shape),
        scales=ms[:n].reshape(mu.scales.shape),
        shape=mu.shape,
        codec=mu.codec,
    )
    new_nu = base.Packed(
        codes=vc[:n].reshape(nu.codes.shape),
        scales=vs[:n].reshape(nu.scales.shape),
        shape=nu.shape,
        codec=nu.codec,
    )
    return u, new_mu, new_nu


def adam_update_reference(
    g: jax.Array,
    mu: base.Packed,
    nu: base.Packed,
    hp: jax.Array,
    *,
    mu_codec: base.Codec,
    nu_codec: base.Codec,
    nesterov: bool = False,
) -> tuple[jax.Array, base.Packed, base.Packed]:
    """The same step in pure jnp (decode, `_moment_step`, encode): the definition."""
    m = mu_codec.decode(mu)
    v = nu_codec.decode(nu)
    u, m, v = _moment_step(g.astype(jnp.float32), m, v, hp, nesterov=nesterov)
    return u.astype(g.dtype), mu_codec.encode(m), nu_codec.encode(v)
