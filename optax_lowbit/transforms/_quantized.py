"""Per-leaf machinery shared by the transforms over quantized states.

Why over 500 lines: the one home of the per-leaf machinery every transform
shares (policy at init, state checks, complex and empty leaves, flatten with
moments, decode -> step -> encode) and of the generic transform built of it
(`one_moment`); each part is used by all the others.

A *moment tree* has the structure of the parameters; each of its leaves is
either a `Packed` (the policy quantizes that leaf) or a plain float array (the
policy keeps it in full precision, float32 by default). A transform:

1. at construction: ``policy = resolve_policy(policy)`` and
   ``check_codec(...)`` for each codec (a `Packed` carries its codec, so any
   state decodes itself: no registry, no global state);
2. in ``init``: ``init_moment(params, codec, policy)`` per moment (it raises,
   naming the leaf path and dtype, on integer or complex parameters; it uses
   shapes and dtypes only, so it runs under ``jax.eval_shape``);
3. in ``update``: ``map_leaves(step, updates, (mu, nu), (mu_codec, nu_codec))``
   where ``step(g, m, v) -> (u, m_new, v_new)`` works on one leaf in float32:
   each moment is decoded, stepped and re-encoded leaf by leaf, so a leaf's
   decoded float32 moments are temporaries of that leaf only;
4. ``transformation(init_fn, update_fn, state_type, name)`` makes the
   `optax.GradientTransformation`, its ``update`` checking the state first.
   A transform of one moment and a step count (Lion, SGD's trace, the EMA) is
   all of this in one call: ``one_moment(...)`` with its rule of one leaf.

`decode_moment` and `encode_like` do the two halves on whole trees, for code
that needs all decoded moments at once (e.g. a global norm).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_lowbit import _checks
from optax_lowbit import policy as _policy
from optax_lowbit.codecs import base
from optax_lowbit.kernels.rules import compute_dtype, is_complex

__all__ = [
    "check_codec",
    "check_float_params",
    "check_param_shapes",
    "check_state",
    "complex_adam_step",
    "compute_dtype",
    "decode_moment",
    "encode_like",
    "init_moment",
    "is_packed",
    "map_leaves",
    "moment_dtype",
    "one_moment",
    "plain_dtype",
    "resolve_policy",
    "transformation",
]


def is_packed(x: Any) -> bool:
    """Whether ``x`` is a `Packed` (use as ``is_leaf`` in tree maps)."""
    return isinstance(x, base.Packed)


def resolve_policy(policy: Any) -> Callable[[Any, Any], bool]:
    """``None`` -> the default policy; TypeError naming ``policy`` if not callable."""
    return _policy.resolve(policy)


def check_codec(name: str, codec: Any, *, signed: bool = False) -> base.Codec:
    """Checks that ``codec`` is a `Codec` (and signed, if ``signed``).

    Args:
      name: the argument's name, for the message (e.g. ``"mu_codec"``).
      codec: the value received.
      signed: require a codec that accepts negative values (first moments,
        momenta).

    Returns:
      ``codec``.
    """
    if not isinstance(codec, base.Codec):
        raise TypeError(
            f"{name} must be a codec (an optax_lowbit.codecs.Codec such as "
            f"lowbit.codecs.identity()), got {codec!r} of type {type(codec).__name__}."
        )
    if signed and not codec.signed:
        raise ValueError(
            f"{name} must be a signed codec (this state takes negative values), "
            f"got the unsigned codec {codec.name!r}; use its signed=True variant."
        )
    return codec


def _describe_state(state: Any) -> str:
    """What a state of the wrong type looks like, for `check_state`'s message."""
    name = type(state).__name__
    module = type(state).__module__ or ""
    if isinstance(state, dict):
        keys = ", ".join(repr(k) for k in list(state)[:6])
        return (
            f"a plain dict (keys {keys}): a checkpoint restored without its "
            "structure, e.g. Orbax's restore(path) without a target, which "
            "gives dicts and lists for NamedTuples and Packed states"
        )
    if isinstance(state, (list, tuple)) and not hasattr(state, "_fields"):
        return (
            f"a plain {name}: a checkpoint restored without its structure, or "
            "the state of a whole chain passed to one of its links"
        )
    if module.startswith("optax"):
        hint = ""
        if isinstance(state, optax.ScaleByAdamState):
            hint = (
                "; a running optax.adam/adamw state continues in a low-bit "
                "Adam through lowbit.convert(opt_state, tx, params)"
            )
        return f"optax.{name}, the state of another optimizer{hint}"
    return f"{module}.{name}" if module else name


def check_state(state: Any, expected: type, transform: str) -> None:
    """Raises TypeError, at the first ``update``, on a state ``init`` did not make.

    ``update`` would otherwise run on the state of another optimizer (e.g.
    ``optax.adamw(...).init(p)``, whose fp32 moments would silently stay) or
    fail later, with an unrelated message, on a checkpoint restored without
    its structure (Orbax's plain dicts).

    Args:
      state: the state given to ``update``.
      expected: the state class that the transform's ``init`` makes.
      transform: the transform's name, for the message.
    """
    if isinstance(state, expected):
        return
    raise TypeError(
        f"{transform}.update expects the {expected.__name__} that its init "
        f"makes, got {_describe_state(state)}. Make the state with tx.init(params) "
        "of this optimizer, or restore a checkpoint into its structure: pass "
        "jax.eval_shape(tx.init, params) as the target (e.g. "
        "ocp.StandardCheckpointer().restore(path, jax.eval_shape(tx.init, params)))."
    )


def check_float_params(params: Any, what: str = "params") -> None:
    """Raises TypeError naming the leaf path and dtype of a non-inexact leaf.

    Floating-point and complex leaves are accepted (complex ones keep
    full-precision, complex moments, as in Optax).
    """
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        dtype = getattr(_policy.unwrap(leaf), "dtype", None)
        try:
            ok = bool(jnp.issubdtype(dtype, jnp.inexact))
        except TypeError:
            ok = False
        if not ok:
            raise TypeError(
                f"{what}{jax.tree_util.keystr(path)} has dtype {dtype}; quantized "
                "optimizers accept floating-point (float16, bfloat16, float32, "
                "float64) and complex parameters only. Leave integer leaves out of "
                "the optimizer, e.g. with optax.masked or nnx.Optimizer(wrt=nnx.Param)."
            )


def plain_dtype(leaf_dtype: Any, fallback_dtype: Any) -> Any:
    """The dtype of an unquantized moment of a leaf of ``leaf_dtype``.

    ``fallback_dtype`` ``None`` is the leaf's own dtype (Optax's ``mu_dtype=None``);
    a complex leaf's moment is complex (a real ``fallback_dtype`` gives its
    complex counterpart, at least complex64), as Optax's moments are.
    """
    if fallback_dtype is None:
        return jnp.dtype(leaf_dtype)
    if is_complex(leaf_dtype) and not is_complex(fallback_dtype):
        return jnp.promote_types(fallback_dtype, jnp.complex64)
    return jnp.dtype(fallback_dtype)


def moment_dtype(name: str, dtype: Any, none: str = "the params' dtype") -> Any:
    """Checks a moment-dtype argument (``mu_dtype``, ``accumulator_dtype``).

    Args:
      name: the argument's name, for the message.
      dtype: the value received.
      none: what ``None`` means for this argument, for the message (Optax's
        moments: each takes its parameter's dtype).

    Returns:
      ``None`` for ``None``, else the dtype; ValueError naming ``name`` unless
      it is float32 or bfloat16.
    """
    if dtype is None:
        return None
    try:
        dtype_name = jnp.dtype(dtype).name
    except TypeError:
        # not a dtype: a string as it is (its repr in the message), any
        # other value by its repr (an array never meets ``==``)
        dtype_name = dtype if isinstance(dtype, str) else repr(dtype)
    _checks.one_of(name, dtype_name, ("float32", "bfloat16"), f"or None for {none}.")
    return jnp.dtype(dtype)


def _leading_sharding(leaf: Any, ndim_out: int) -> Any:
    """The NamedSharding of ``leaf`` on its leading axes, for a state array."""
    sharding = getattr(leaf, "sharding", None)
    if isinstance(leaf, jax.core.Tracer) or sharding is None:
        return None
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return None
    spec = tuple(sharding.spec) + (None,) * (len(leaf.shape) - len(sharding.spec))
    lead = spec[: max(len(leaf.shape) - 1, 0)]
    out = lead + (None,) * (ndim_out - len(lead))
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*out))


def _traced_leading_spec(leaf: Any) -> tuple[Any, ...] | None:
    """The leading-axis spec of a traced ``leaf`` under explicit mesh axes.

    Under ``jax.jit(tx.init)`` inside ``jax.set_mesh`` with Explicit axes the
    parameter's sharding is part of its type; ``codec.zeros`` would make
    unsharded (single-device) states, so they are resharded to it. ``None``
    where there is nothing to do (Auto axes carry no sharding in the type:
    there use an eager init or ``out_shardings``).
    """
    sharding = getattr(jax.typeof(leaf), "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding) or sharding.mesh.empty:
        return None
    if jax.sharding.get_abstract_mesh().empty:
        return None
    spec = tuple(sharding.spec) + (None,) * (len(leaf.shape) - len(sharding.spec))
    lead = spec[: max(len(leaf.shape) - 1, 0)]
    return lead if any(a is not None for a in lead) else None


def _place_like(packed: base.Packed, leaf: Any) -> base.Packed:
    """A leaf's zero state (`base.Codec.zeros_many`), sharded like ``leaf``."""
    if isinstance(leaf, jax.core.Tracer):
        lead = _traced_leading_spec(leaf)
        if lead is None:
            return packed

        def reshard(x: jax.Array) -> jax.Array:
            spec = jax.sharding.PartitionSpec(*lead, *(None,) * (x.ndim - len(lead)))
            return jax.sharding.reshard(x, spec)

        return base.Packed(
            codes=reshard(packed.codes),
            scales=reshard(packed.scales),
            shape=packed.shape,
            codec=packed.codec,
        )
    if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
        # Concrete sharded parameter: shard the state like it on leading axes.
        codes_sh = _leading_sharding(leaf, packed.codes.ndim)
        scales_sh = _leading_sharding(leaf, packed.scales.ndim)
        if codes_sh is not None and scales_sh is not None:
            packed = base.Packed(
                codes=jax.device_put(packed.codes, codes_sh),
                scales=jax.device_put(packed.scales, scales_sh),
                shape=packed.shape,
                codec=packed.codec,
            )
    return packed


def _zeros_plain(leaf: Any, dtype: Any) -> jax.Array:
    dtype = plain_dtype(leaf.dtype, dtype)
    if isinstance(leaf, jax.Array):
        return jnp.zeros_like(leaf, dtype=dtype)  # keeps the leaf's sharding
    return jnp.zeros(tuple(leaf.shape), dtype)


def init_moment(
    params: Any,
    codec: base.Codec,
    policy: Callable[[Any, Any], bool],
    *,
    fallback_dtype: Any = jnp.float32,
) -> Any:
    """A zero moment tree: ``codec.zeros`` where ``policy`` says so, else zeros.

    Args:
      params: the parameter tree (arrays, ``ShapeDtypeStruct`` or values under
        ``flax.nnx.Variable`` nodes; only shapes and dtypes are used).
      codec: the codec of quantized leaves.
      policy: ``policy(path, leaf) -> bool`` (see `optax_lowbit.policy`).
      fallback_dtype: dtype of the leaves the policy keeps unquantized;
        ``None`` is each leaf's own dtype (see `plain_dtype`: complex leaves
        get complex moments).

    Returns:
      A tree of the structure of ``params`` whose leaves are `Packed` or
      zeros of `plain_dtype`; a concrete sharded parameter's state is sharded
      like it on leading axes.
    """
    check_float_params(params)
    decisions, shapes = [], []

    def decide(path: Any, leaf: Any) -> None:  # the policy, once a leaf
        value = leaf.get_value() if _is_variable(leaf) else leaf
        decisions.append(quantized(policy, path, value))
        if decisions[-1]:
            shapes.append(tuple(value.shape))

    jax.tree_util.tree_map_with_path(decide, params, is_leaf=_is_variable)
    made = iter(codec.zeros_many(shapes))  # one program for every leaf
    decided = iter(decisions)

    def leaf_init(leaf: Any) -> Any:
        packed = next(made) if next(decided) else None
        if _is_variable(leaf):
            return _init_variable(leaf, packed, fallback_dtype)
        if packed is not None:
            return _place_like(packed, leaf)
        return _zeros_plain(leaf, fallback_dtype)

    return jax.tree_util.tree_map(leaf_init, params, is_leaf=_is_variable)


def quantized(policy: Callable[[Any, Any], Any], path: Any, leaf: Any) -> bool:
    """Whether a leaf's state is stored by the codec: the policy's decision.

    An empty leaf (a zero in its shape) never is: it has nothing to store,
    and its state is an empty float array (no bytes, an empty update). The
    policy must return a bool (TypeError naming the leaf otherwise), and
    False for a complex leaf (codecs store real values: TypeError naming it).
    """
    value = _policy.unwrap(leaf)
    if numel(getattr(value, "shape", ())) == 0:
        return False
    decision = _policy.check_decision(path, policy(path, leaf))
    dtype = getattr(value, "dtype", None)
    if decision and dtype is not None and is_complex(dtype):
        raise _policy.complex_refused(path, dtype)
    return decision


_SHARDING_KEYS = ("out_sharding", "sharding_names", "sharding")


def _is_variable(x: Any) -> bool:
    """Whether ``x`` is a ``flax.nnx.Variable`` (without importing flax)."""
    return type(x).__module__.startswith("flax.") and hasattr(x, "get_metadata")


def _init_variable(var, packed, fallback_dtype) -> Any:
    """`init_moment` of one ``nnx.Variable`` leaf (``nnx.Optimizer`` passes them).

    An unquantized leaf stays a Variable of the parameter's type and metadata
    (as `optax.tree.zeros_like` makes it). A quantized leaf becomes a `Packed`
    whose ``codes`` and ``scales`` are each such a Variable, with the
    parameter's sharding annotation kept on the leading axes: a Variable never
    holds a `Packed`, which ``nnx.update`` would split into a dict.
    ``packed`` is the leaf's zero state (`init_moment`'s `zeros_many`), or
    ``None`` where the policy keeps the leaf unquantized.
    """
    value = var.get_value()
    if packed is None:
        return jax.tree.map(lambda x: _zeros_plain(x, fallback_dtype), var)
    packed = _place_like(packed, value)
    meta = dict(var.get_metadata())

    def wrap(array: jax.Array) -> Any:
        m = dict(meta)
        for key in _SHARDING_KEYS:
            names = m.get(key)
            if isinstance(names, (tuple, list)):
                lead = tuple(names)[: max(len(value.shape) - 1, 0)]
                m[key] = lead + (None,) * (array.ndim - len(lead))
        return type(var)(array, **m)

    return base.Packed(
        codes=wrap(packed.codes),
        scales=wrap(packed.scales),
        shape=packed.shape,
        codec=packed.codec,
    )


def _decode_leaf(x: Any, codec: base.Codec) -> jax.Array:
    if is_packed(x):
        return codec.decode(x)
    x = jnp.asarray(x)
    return x.astype(compute_dtype(x.dtype))


def _encode_leaf(value: jax.Array, like: Any, codec: base.Codec, stream: Any) -> Any:
    """``value`` in the layout of ``like`` (a `Packed` or a float array).

    A stochastic codec rounds with ``stream`` (`leaf_streams`).
    """
    if is_packed(like):
        if codec.stochastic:
            return codec.encode(value, seed=stream)
        return codec.encode(value)
    return value.astype(like.dtype)


def leaf_seed(seed: Any, leaf: Any, moment: Any) -> Any:
    """The random stream of a leaf and moment at step ``seed`` (or ``None``).

    Stochastic codecs draw their rounding bits from it: a pure function of the
    transform's step count and the leaf's and moment's ordinals, so no PRNG key
    is kept and a restored state continues bit for bit. ``leaf`` and
    ``moment`` may be NumPy integer arrays: many leaves' streams at once, in
    a few vector operations (`base.stream_seed`), each the bits it would be
    alone.
    """
    return None if seed is None else base.stream_seed(seed, leaf, moment)


def leaf_seed_rows(seed: Any, leaves: Sequence[int], moments: int) -> Any:
    """`leaf_seed` of each of ``leaves`` and each of ``moments`` moments.

    The kernels' ``seeds`` for many leaves (`kernels.rules.seed_rows`): an
    array ``(len(leaves), moments)``, or ``None`` without a ``seed``.
    """
    rows = np.asarray(leaves, np.int64).reshape(-1, 1)
    return leaf_seed(seed, rows, np.arange(moments))


def leaf_streams(
    seed: Any,
    per_moment: Sequence[Sequence[Any]],
    codecs: Sequence[base.Codec],
    first_leaf: int = 0,
) -> dict[tuple[int, int], Any]:
    """The streams of every packed leaf ``i`` and stochastic moment ``j``.

    Formed together (`leaf_seed` over arrays) and only where a stochastic
    codec draws from them; ``{(i, j): stream}``, leaf ``i`` being the tree's
    leaf ``first_leaf + i``. Empty without a ``seed``: ``None`` is stream 0.
    """
    rows = [
        (i, j)
        for j, (leaves, codec) in enumerate(zip(per_moment, codecs, strict=True))
        if codec.stochastic
        for i, x in enumerate(leaves)
        if is_packed(x)
    ]
    if seed is None or not rows:
        return {}
    i, j = np.asarray(rows, np.int64).T
    table = leaf_seed(seed, first_leaf + i, j)
    return {row: table[k] for k, row in enumerate(rows)}


def decode_moment(moment: Any, codec: base.Codec) -> Any:
    """Decodes a moment tree to float32 arrays (plain leaves are cast)."""
    return jax.tree.map(lambda x: _decode_leaf(x, codec), moment, is_leaf=is_packed)


def encode_like(
    values: Any, like: Any, codec: base.Codec, *, seed: Any = None, moment: int = 0
) -> Any:
    """Encodes float ``values`` in the layout of the moment tree ``like``.

    A leaf is encoded by ``codec`` where ``like`` holds a `Packed`, and cast to
    ``like``'s dtype elsewhere. ``seed`` (the step count) and ``moment`` select
    the random streams of a stochastic codec, as in `map_leaves`.
    """
    leaves, treedef = jax.tree_util.tree_flatten(like, is_leaf=is_packed)
    vals = treedef.flatten_up_to(values)
    # the streams of moment ``moment``: the other moments' slots stay empty
    streams = leaf_streams(seed, [[]] * moment + [leaves], [codec] * (moment + 1))
    out = [
        _encode_leaf(v, old, codec, streams.get((i, moment)))
        for i, (old, v) in enumerate(zip(leaves, vals, strict=True))
    ]
    return jax.tree_util.tree_unflatten(treedef, out)


def flatten_with_moments(updates: Any, moments: Sequence[Any]) -> tuple[Any, ...]:
    """Flat leaves of ``updates`` and of each moment tree, as plain arrays.

    ``flax.nnx.Variable`` nodes (a raw ``nnx.split`` state) are unwrapped: an
    update leaf to its value, a moment to its value or to a `Packed` of
    values. ``rewrap(new_updates, new_moments)`` puts flat results back into
    the trees, wrapped as the inputs were (``new_moments`` may be empty).

    Returns:
      ``(flat_updates, treedef, flat_moments, rewrap)``.
    """
    flat, treedef = jax.tree_util.tree_flatten(updates, is_leaf=_is_variable)
    per_moment = []
    for moment in moments:
        try:
            per_moment.append(treedef.flatten_up_to(moment))
        except (ValueError, TypeError) as e:
            raise ValueError(
                "the optimizer state does not match the updates' tree structure; "
                "was the state made by tx.init on these parameters? "
                f"updates: {treedef}"
            ) from e

    def unwrap(x: Any) -> Any:
        if _is_variable(x):
            return x.get_value()
        if is_packed(x) and _is_variable(x.codes):
            return base.Packed(
                codes=x.codes.get_value(),
                scales=x.scales.get_value(),
                shape=x.shape,
                codec=x.codec,
            )
        return x

    def wrap(old: Any, new: Any) -> Any:
        if _is_variable(old):
            return type(old)(new, **old.get_metadata())
        if is_packed(old) and _is_variable(old.codes):
            return base.Packed(
                codes=wrap(old.codes, new.codes),
                scales=wrap(old.scales, new.scales),
                shape=new.shape,
                codec=new.codec,
            )
        return new

    def rewrap(new_updates: list[Any], new_moments: Sequence[Any] = ()) -> Any:
        unflat = functools.partial(jax.tree_util.tree_unflatten, treedef)
        u = unflat([wrap(o, n) for o, n in zip(flat, new_updates, strict=True)])
        ms = tuple(
            unflat([wrap(o, n) for o, n in zip(olds, news, strict=True)])
            for olds, news in zip(per_moment, new_moments, strict=False)
        )
        return u, ms

    plain = [unwrap(x) for x in flat]
    _check_packed_shapes(updates, plain, per_moment)
    return plain, treedef, [[unwrap(x) for x in m] for m in per_moment], rewrap


def _check_packed_shapes(
    updates: Any, plain: list[Any], per_moment: Sequence[list[Any]]
) -> None:
    """Raises where an update leaf's shape is not its quantized moment's.

    A `Packed` moment holds the codes of its parameter's whole leaf
    (``Packed.shape``); a gradient of another shape would otherwise fail
    deep inside the decode, in an arithmetic operation's words. Plain
    moments are left to the step (Adafactor's factored rows differ by
    design).
    """
    for leaves in per_moment:
        for k, (g, x) in enumerate(zip(plain, leaves, strict=True)):
            if is_packed(x) and tuple(np.shape(g)) != tuple(x.shape):
                raise ValueError(
                    f"updates{_leaf_path(updates, k)} has shape "
                    f"{tuple(np.shape(g))}, but the optimizer state holds that "
                    f"leaf's moment for shape {tuple(x.shape)}; was the state made "
                    "by tx.init on these parameters?"
                )


def check_param_shapes(updates: Any, plain: list[Any], params: list[Any]) -> None:
    """Raises where a parameter leaf cannot take its update (the fused apply).

    ``plain``: `flatten_with_moments`' update leaves, ``params`` the parameter
    leaves in their order. An update that broadcasts to its parameter's shape
    passes, as `optax.apply_updates` takes it; called after the state's check
    (`_check_packed_shapes`), which names a gradient that does not fit its
    quantized moment.
    """
    for k, (g, p) in enumerate(zip(plain, params, strict=True)):
        try:
            fits = np.broadcast_shapes(np.shape(g), np.shape(p)) == np.shape(p)
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(
                f"params{_leaf_path(updates, k)} has shape {np.shape(p)}, "
                f"which its update of shape {np.shape(g)} does not fit."
            )


def _leaf_path(updates: Any, k: int) -> str:
    """The key path of ``updates``' ``k``-th leaf (`flatten_with_moments`' order)."""
    flat = jax.tree_util.tree_flatten_with_path(updates, is_leaf=_is_variable)[0]
    return jax.tree_util.keystr(flat[k][0])


def map_leaves(
    step: Callable[..., tuple[Any, ...]],
    updates: Any,
    moments: Sequence[Any],
    codecs: Sequence[base.Codec],
    *,
    seed: Any = None,
    first_leaf: int = 0,
) -> tuple[Any, tuple[Any, ...]]:
    """Runs ``step`` leaf by leaf: decode the moments, step, encode them again.

    Args:
      step: ``step(g, *moments_f32) -> (u, *new_moments_f32)`` for one leaf;
        ``g`` is the incoming update leaf in its own dtype, the moments are
        float32 arrays of its shape (complex64 for a complex leaf's plain
        moments: `compute_dtype`). It may close over traced
        hyperparameters.
      updates: the incoming updates (the structure of the parameters).
      moments: the moment trees of the state, each made by `init_moment`.
      codecs: one codec per moment tree.
      seed: the transform's new step count (may be traced): stochastic codecs
        round leaf ``i``'s moment ``j`` with the stream `leaf_seed` ``(seed,
        i, j)``; ``None`` is stream 0 for all.
      first_leaf: the ordinal of ``updates``' first leaf in the whole tree
        (for a caller that maps a part of the tree).

    Returns:
      ``(new_updates, new_moments)``: ``new_updates`` has the structure of
      ``updates``; each new moment tree has the structure, shapes and dtypes of
      the old one (quantized leaves stay `Packed` of the same codec).
    """
    if len(moments) != len(codecs):
        raise ValueError(f"got {len(moments)} moment trees but {len(codecs)} codecs.")
    flat, _, per_moment, rewrap = flatten_with_moments(updates, moments)
    streams = leaf_streams(seed, per_moment, codecs, first_leaf)
    new_updates, new_moments = [], [[] for _ in moments]
    for i, g in enumerate(flat):
        olds = [leaves[i] for leaves in per_moment]
        decoded = [_decode_leaf(x, c) for x, c in zip(olds, codecs, strict=True)]
        u, *news = step(g, *decoded)
        new_updates.append(u)
        for j, (new, old, c) in enumerate(zip(news, olds, codecs, strict=True)):
            new_moments[j].append(_encode_leaf(new, old, c, streams.get((i, j))))
    return rewrap(new_updates, new_moments)


def transformation(
    init_fn: Callable[[Any], Any],
    update_fn: Callable[[Any, Any], tuple[Any, Any]],
    state_type: type,
    name: str,
) -> optax.GradientTransformation:
    """An `optax.GradientTransformation` whose ``update`` checks its state first.

    The transforms here do not read ``params``; ``update(updates, state,
    params=None)`` raises `check_state`'s TypeError on a state that ``init``
    did not make, then calls ``update_fn(updates, state)``.

    Args:
      init_fn: ``init_fn(params) -> state``.
      update_fn: ``update_fn(updates, state) -> (updates, state)``.
      state_type: the class of the state ``init_fn`` makes.
      name: the transform's name, for the message.

    Returns:
      The transformation.
    """

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        check_state(state, state_type, name)
        return update_fn(updates, state)

    return optax.GradientTransformation(init_fn, update)


def one_moment(
    name: str,
    state_type: type,
    field: str,
    codec: base.Codec,
    policy: Callable[[Any, Any], bool],
    fallback_dtype: Any,
    step: Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]],
) -> optax.GradientTransformation:
    """A transform over one quantized moment and a step count (Lion, trace, EMA).

    Its state is ``state_type(count=..., <field>=...)``; ``update`` increments
    the count and, leaf by leaf, decodes the moment, calls ``step(g32, m,
    count) -> (u, new_m)`` in the compute dtype (`compute_dtype`), casts ``u``
    to the update's dtype, applies the fault rule (a non-finite element keeps
    its old moment, an overflowing one saturates:
    `optax_lowbit.codecs.base.saturate_or_keep`) and encodes the moment with
    the stream of the new count.

    Args:
      name: the transform's name, for messages.
      state_type: a NamedTuple with fields ``count`` and ``field``.
      field: the name of the moment's field.
      codec: the moment's codec on quantized leaves.
      policy: the resolved policy (`resolve_policy`).
      fallback_dtype: the moment's dtype on unquantized leaves (`init_moment`).
      step: the rule of one leaf.

    Returns:
      The transformation.
    """

    def init_fn(params: Any) -> Any:
        moment = init_moment(params, codec, policy, fallback_dtype=fallback_dtype)
        return state_type(count=jnp.zeros([], jnp.int32), **{field: moment})

    def update_fn(updates: Any, state: Any) -> tuple[Any, Any]:
        count = optax.safe_increment(state.count)

        def leaf_step(g: jax.Array, m: jax.Array) -> tuple[jax.Array, jax.Array]:
            g32 = g.astype(compute_dtype(g.dtype))
            u, new_m = step(g32, m, count)
            return u.astype(g.dtype), base.saturate_or_keep(
                new_m, m, base.is_finite(g32)
            )

        updates, (moment,) = map_leaves(
            leaf_step, updates, (getattr(state, field),), (codec,), seed=count
        )
        return updates, state_type(count=count, **{field: moment})

    return transformation(init_fn, update_fn, state_type, name)


def numel(shape: Sequence[int]) -> int:
    """Number of elements of ``shape``."""
    return math.prod(int(s) for s in shape)


def complex_adam_step(
    g: jax.Array,
    m: jax.Array,
    v: jax.Array,
    b1: Any,
    b2: Any,
    eps: Any,
    eps_root: Any,
    nesterov: bool,
    count: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One Adam step of a complex leaf, as `optax.scale_by_adam` takes it.

    ``m <- b1 m + (1 - b1) g``, ``v <- b2 v + (1 - b2) |g|^2`` (``v`` is kept
    in the complex dtype of Optax's state, with a zero imaginary part), the
    update ``m_hat / (sqrt(v_hat + eps_root) + eps)``. As the real step: a
    non-finite element of ``g`` keeps its old moments, overflowing moments
    saturate (`optax_lowbit.codecs.base.saturate_or_keep`).

    Args:
      g: the complex update leaf.
      m: its first moment (complex, `compute_dtype`).
      v: its second moment (complex, real-valued).
      b1: decay rate of the first moment.
      b2: decay rate of the second moment.
      eps: term added to the denominator outside the square root.
      eps_root: term added to the denominator inside the square root.
      nesterov: Nesterov momentum, as in Optax.
      count: the new step count (``>= 1``).

    Returns:
      ``(u, m, v)``: ``u`` of ``g``'s dtype, the new moments.
    """
    gc = g.astype(compute_dtype(g.dtype))
    new_m = (1 - b1) * gc + b1 * m
    new_v = (1 - b2) * (gc.real**2 + gc.imag**2) + b2 * v
    bc1 = 1 - b1**count
    if nesterov:
        bc1_next = 1 - b1 ** optax.safe_increment(count)
        m_hat = b1 * new_m / bc1_next + (1 - b1) * gc / bc1
    else:
        m_hat = new_m / bc1
    v_hat = new_v / (1 - b2**count)
    u = m_hat / (jnp.sqrt(v_hat + eps_root) + eps)
    ok = base.is_finite(gc)
    return (
        u.astype(g.dtype),
        base.saturate_or_keep(new_m, m, ok),
        base.saturate_or_keep(new_v, v, ok),
    )
