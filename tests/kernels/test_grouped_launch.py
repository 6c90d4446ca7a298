"""Leaves grouped per launch (issue 18, item 2): one kernel per leaf signature.

`adam_update_many` runs the leaves that share a signature (group grid and
dtypes) in one ``pallas_call`` whose body is traced once (the loads and stores
switch on the leaf). In interpret mode its outputs must equal one launch per
leaf bit for bit (``u`` or the new parameters included), and the state the
jnp reference's; each leaf keeps its own hyperparameters and stochastic
rounding stream.
"""

from unittest import mock

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import optax_lowbit as lowbit
from optax_lowbit.kernels import adam as kadam
from optax_lowbit.kernels import launch
from tests.kernels.test_adam_kernel import VARIANTS, _random_state, _reference

# the kernel and its reference held to the same bits (tests/conftest.py)
pytestmark = pytest.mark.optimized

#: (variant, apply): every codec with a kernel, the chain path (``u`` out)
#: and the fused apply (parameters in place) both covered. π-Quant's two cases
#: take 15-19 s each in the interpreter on 2 cores: CI's second step runs them
#: (the group's switch is codec-independent; the other codecs cover it here).
# polar2 and 4-bit applied (the default fused steps) in the first CI step, the
# rest in the slow one (5-6 s each, interpreted).
_SLOW = pytest.mark.slow
CASES = [
    ("sr2", True),
    ("blockwise4", True),
    pytest.param("sr2", False, marks=_SLOW),
    pytest.param("sr1.5", True, marks=_SLOW),
    pytest.param("blockwise8", False, marks=_SLOW),
    pytest.param("piquant", False, marks=_SLOW),
    pytest.param("piquant-paper", True, marks=_SLOW),
]


def _update_many(gs, mus, nus, hps, seeds, params, mc, nc, per_launch=None):
    """`adam_update_many`, blocks of 8 groups (partial last blocks)."""
    kw = dict(mu_codec=mc, nu_codec=nc, seeds=seeds, params=params)
    kw.update(block_groups=8, leaves_per_launch=per_launch)
    return kadam.adam_update_many(gs, mus, nus, hps, **kw)


_many = jax.jit(_update_many, static_argnames=("mc", "nc", "per_launch"))


def _leaf(key, k, shape, dtype, mc, nc):
    """Leaf ``k``: ``(g, mu, nu, hp, seeds, params)``, its own hp and seeds."""
    k1, k2 = jax.random.split(jax.random.fold_in(key, k))
    g, mu, nu = _random_state(k1, shape, mc, nc)
    hp = kadam.make_hp(
        0.9,
        0.999,
        1e-8,
        0.0,
        0.2 + 0.05 * k,
        0.003 * (k + 1),
        learning_rate=1e-2 * (k + 1),
        weight_decay=0.1 * k,
    )
    seeds = (jnp.uint32(5 + 2 * k), jnp.uint32(6 + 3 * k))
    return g.astype(dtype), mu, nu, hp, seeds, jax.random.normal(k2, shape, dtype)


def _leaves(key, shapes, mc, nc, apply, dtypes=None):
    """Fresh random leaves: ``(gs, mus, nus, hps, seeds, params or None)``."""
    dtypes = dtypes or [jnp.float32] * len(shapes)
    leaves = [
        _leaf(key, k, shape, dtype, mc, nc)
        for k, (shape, dtype) in enumerate(zip(shapes, dtypes, strict=True))
    ]
    *lists, params = map(list, zip(*leaves, strict=True))
    return (*lists, params if apply else None)


def _shape(mc):
    """Rows whose last group is partial, group counts blocks of 8 leave short.

    (5, 200): 4 groups of 64 per row (the last of 8 elements), 20 groups, 3
    blocks; π-Quant (3, 500): 6 superblocks of 96 per row, 18, 3 blocks.
    """
    return (3, 500) if mc.group_size == 96 else (5, 200)


def _check_against_per_leaf(
    grouped, gs, mus, nus, hps, seeds, params, mc, nc, run=_update_many
):
    """Every output of a grouped step equals one launch per leaf's bit for
    bit, the state the jnp reference's (each leaf's own seeds and hp)."""
    per_leaf = run(gs, mus, nus, hps, seeds, params, mc, nc, per_launch=1)
    chex.assert_trees_all_equal(grouped, per_leaf)
    for k, (out, m, v) in enumerate(grouped):
        p = None if params is None else params[k]
        kw = dict(mc=mc, nc=nc, seeds=seeds[k], params=p)
        out_ref, m_ref, v_ref = _reference(gs[k], mus[k], nus[k], hps[k], **kw)
        chex.assert_trees_all_equal((m, v), (m_ref, v_ref))
        np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("variant", "apply"), CASES)
def test_grouped_launch_equals_per_leaf(variant, apply):
    """Three leaves of one shape in one launch: every output of the per-leaf
    launch bit for bit, the state the reference's, each leaf's own seeds."""
    mc, nc = VARIANTS[variant]
    key = jax.random.key(hash((variant, apply)) % 2**31)
    gs, mus, nus, hps, seeds, params = _leaves(key, [_shape(mc)] * 3, mc, nc, apply)
    grouped = _many(gs, mus, nus, hps, seeds, params, mc, nc, per_launch=0)
    _check_against_per_leaf(grouped, gs, mus, nus, hps, seeds, params, mc, nc, _many)


def _count_launches(jaxpr) -> int:
    """``pallas_call`` equations in a jaxpr and every jaxpr nested in it."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == "pallas_call"
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            n += _count_launches(sub)
    return n


def _launches(fn, *args) -> int:
    return _count_launches(jax.make_jaxpr(fn)(*args).jaxpr)


def test_launches_one_per_signature():
    """Leaves group by dtypes, partial groups and block count (traced only:
    no compile)."""
    mc, nc = VARIANTS["sr2"]
    shapes = [(5, 200), (64, 128), (5, 200), (64, 128), (5, 200), (128, 64)]
    dtypes = [jnp.float32] * 5 + [jnp.bfloat16]
    gs, mus, nus, hps, seeds, _ = _leaves(jax.random.key(0), shapes, mc, nc, False)
    gs[4] = gs[4].astype(jnp.bfloat16)  # another dtype: its own launch

    def run(per_launch):
        return lambda gs: _update_many(
            gs, mus, nus, hps, seeds, None, mc, nc, per_launch=per_launch
        )

    # (5, 200) x2 (a partial last group), (64, 128) x2 and (128, 64) (one
    # block count), (5, 200) bf16; blocks of 512 elements: grouped by default,
    # two a launch (the three of one block count in two launches)
    assert _launches(run(None), gs) == 4
    assert _launches(run(0), gs) == 3
    assert _launches(run(1), gs) == 6
    assert _launches(run(2), gs) == 4
    _, _, _, _, _, params = _leaves(jax.random.key(1), shapes, mc, nc, True, dtypes)
    fused = lambda gs, ps: _update_many(gs, mus, nus, hps, seeds, ps, mc, nc)  # noqa: E731
    # the last leaf's parameters in bf16 (updated in place in their dtype)
    assert _launches(fused, gs, params) == 4


@pytest.mark.parametrize("variant", ["sr2", "blockwise4"])
def test_pairs_of_two_shapes_equal_per_leaf(variant):
    """Two leaves of each of two block counts, two a launch (the default):
    `launch.by_grid` pairs the larger with the smaller (2 launches of one
    grid, not one launch per shape); every output equals one launch per
    leaf bit for bit, the state the jnp reference's."""
    mc, nc = VARIANTS[variant]
    shapes = [(48, 128), (8, 128), (48, 128), (8, 128)]  # 12 and 2 whole blocks
    key = jax.random.key(7 + len(variant))
    gs, mus, nus, hps, seeds, params = _leaves(key, shapes, mc, nc, True)
    runs = []

    def spy(*args):
        out = real(*args)
        runs.extend(out)
        return out

    real = launch.by_grid
    with mock.patch.object(launch, "by_grid", spy):
        grouped = _update_many(gs, mus, nus, hps, seeds, params, mc, nc, 2)
    assert runs == [[0, 3], [2, 1]]  # leaf indices: (48, 128) with (8, 128)
    _check_against_per_leaf(grouped, gs, mus, nus, hps, seeds, params, mc, nc)


def test_persistent_launches_group_any_shapes(monkeypatch):
    """Persistent launches (`kadam.DEFAULT_PROGRAMS` set) group leaves by
    dtypes and partial last group only, whatever their shapes (traced only)."""
    monkeypatch.setattr(kadam, "DEFAULT_PROGRAMS", 0)
    mc, nc = VARIANTS["sr2"]
    shapes = [(5, 200), (64, 128), (5, 200), (64, 128), (5, 200), (128, 64)]
    gs, mus, nus, hps, seeds, _ = _leaves(jax.random.key(0), shapes, mc, nc, False)
    gs[4] = gs[4].astype(jnp.bfloat16)

    def run(per_launch):
        return lambda gs: _update_many(
            gs, mus, nus, hps, seeds, None, mc, nc, per_launch=per_launch
        )

    # (5, 200) x2 (a partial last group), (64, 128) x2 and (128, 64) (whole
    # groups), (5, 200) bf16
    assert _launches(run(0), gs) == 3
    most = kadam.GROUPED_LEAVES_PER_LAUNCH
    assert _launches(run(None), gs) == _launches(run(most), gs)
    assert _launches(run(1), gs) == 6
    assert _launches(run(2), gs) == 4  # the three whole-group leaves: 2 + 1
    # leaves of three block counts (and shapes) in one launch, in order
    mixed = [(3, 256), (41, 128), (7, 384)]
    gs, mus, nus, hps, seeds, _ = _leaves(jax.random.key(2), mixed, mc, nc, False)
    assert _launches(run(0), gs) == 1


def test_transform_launches_one_per_shape():
    """A tree of quantized leaves of 3 shapes, at most
    `GROUPED_LEAVES_PER_LAUNCH` of each, steps in 3 kernel launches."""
    params = {
        f"h{i}": {"w": jnp.zeros((64, 128)), "o": jnp.zeros((128, 64))}
        for i in range(kadam.GROUPED_LEAVES_PER_LAUNCH)
    }
    params["emb"] = jnp.zeros((5, 200))
    params["b"] = jnp.zeros((7,))  # plain float moments: no kernel
    grads = jax.tree.map(jnp.ones_like, params)
    policy = lambda path, leaf: leaf.size >= 64  # noqa: E731
    tx = lowbit.adamw_polar(1e-2, impl="pallas", policy=policy)
    assert _launches(tx.update, grads, tx.init(params), params) == 3
    opt = lowbit.adamw_polar(1e-2, impl="pallas", policy=policy, fused=True)
    assert _launches(opt.step, grads, opt.init(params), params) == 3


def test_default_groups_leaves_only_in_small_blocks(monkeypatch):
    """`default_leaves_per_launch`: blocks of up to `MAX_GROUPED_BLOCK_ELEMENTS`
    (polar's 1024 and 4-bit's and 8-bit's 2048 elements) grouped, up to
    `GROUPED_LEAVES_PER_LAUNCH` leaves a launch (v27), larger blocks one launch
    per leaf, unless `LEAVES_PER_LAUNCH` is set (traced only: no compile)."""
    most = kadam.GROUPED_LEAVES_PER_LAUNCH
    assert most >= 2
    assert kadam.default_leaves_per_launch(kadam.MAX_GROUPED_BLOCK_ELEMENTS) == most
    assert kadam.default_leaves_per_launch(kadam.MAX_GROUPED_BLOCK_ELEMENTS * 2) == 1
    polar = lowbit.adamw_polar(1e-2, impl="pallas", fused=True)
    four = lowbit.adamw_4bit(1e-2, impl="pallas", fused=True)

    def launches(opt, cols, n=3):
        # a new shape per call: launches are traced under jit caches that
        # do not key on the module's tunables
        params = {f"w{i}": jnp.zeros((64, cols)) for i in range(n)}
        grads = jax.tree.map(jnp.ones_like, params)
        return _launches(opt.step, grads, opt.init(params), params)

    assert launches(polar, 256, n=most) == 1
    assert launches(four, 256, n=most + 1) == 2
    assert launches(polar, 320, n=most + 1) == 2
    monkeypatch.setattr(kadam, "MAX_GROUPED_BLOCK_ELEMENTS", 1024)
    assert launches(four, 384) == 3  # 2048-element blocks: one launch per leaf
    monkeypatch.setattr(kadam, "LEAVES_PER_LAUNCH", 0)
    assert launches(four, 512) == 1
    monkeypatch.setattr(kadam, "LEAVES_PER_LAUNCH", 1)
    assert launches(polar, 768) == 3


#: Leaves of three shapes, whole groups of 128 (and of 64): 6, 41 and 21
#: group rows of 128, so blocks of 8 groups give 1, 6 and 3 blocks, each
#: leaf's last one partial (one leaf smaller than a block); 2, 11 and 6
#: blocks of 64.
MIXED = [(3, 256), (41, 128), (7, 384)]


@pytest.mark.parametrize(
    ("variant", "programs", "prefetch"),
    [
        ("sr2", None, 0),
        ("sr2", 1, 0),
        ("sr2", 3, 0),
        ("sr2", 32, 0),
        ("blockwise4", 3, 0),
        # opt-in (v43, off by default): ~27 CPU-s, in CI's slow step
        pytest.param("sr2", 3, 1, marks=pytest.mark.slow),
        pytest.param("blockwise4", 32, 1, marks=pytest.mark.slow),
    ],
)
def test_mixed_shapes_and_programs(monkeypatch, variant, programs, prefetch):
    """Leaves of different shapes grouped with ``leaves_per_launch=0``: one
    program per block (each alone in its shape, the three share one launch
    with `kadam.SHARE_LONE_LEAVES`, v28), or one persistent launch run by
    1 program (a loop over all 19 blocks), 3 (loops of 6-7) or 32 (13
    idle); blockwise (groups of 128, 10 blocks) by 3. With `kadam.PREFETCH`
    (v43) each program loads its next block, across leaves, before stepping
    the current one; by 32 programs (22 idle) every program's look-ahead
    runs past the last block. Every output equals one launch per leaf bit
    for bit, the state the jnp reference's."""
    monkeypatch.setattr(kadam, "DEFAULT_PROGRAMS", programs)
    monkeypatch.setattr(kadam, "PREFETCH", prefetch)
    monkeypatch.setattr(kadam, "SHARE_LONE_LEAVES", 1)
    mc, nc = VARIANTS[variant]
    key = jax.random.key(len(variant) + (programs or 0) + 100 * prefetch)
    gs, mus, nus, hps, seeds, params = _leaves(key, MIXED, mc, nc, True)
    # not jitted: the launches' own jit caches key on the programs
    grouped = _update_many(gs, mus, nus, hps, seeds, params, mc, nc, per_launch=0)
    launches = _launches(
        lambda gs: _update_many(gs, mus, nus, hps, seeds, params, mc, nc, 0), gs
    )
    assert launches == 1
    _check_against_per_leaf(grouped, gs, mus, nus, hps, seeds, params, mc, nc)


@pytest.mark.parametrize("variant", ["sr2", "blockwise4"])
def test_lone_leaves_share_a_launch(monkeypatch, variant):
    """With `kadam.SHARE_LONE_LEAVES`, the leaves a signature leaves alone
    (one of a shape, a pair's odd one) share launches of at most
    `GROUPED_LEAVES_PER_LAUNCH` by dtypes, whatever their shapes and partial
    groups or blocks (v28); each output equals its launch alone bit for bit,
    the state the jnp reference's. Off (the default, v29) each is its own
    launch."""
    mc, nc = VARIANTS[variant]
    assert kadam.GROUPED_LEAVES_PER_LAUNCH == 2  # the counts below
    # a pair of (64, 128); lone: (5, 200) (a partial last group), the pair's
    # odd (64, 128), (3, 256), and a bf16 (128, 64) that shares with none
    shapes = [(64, 128), (5, 200), (64, 128), (3, 256), (64, 128), (128, 64)]
    dtypes = [jnp.float32] * 5 + [jnp.bfloat16]
    key = jax.random.key(len(variant))
    gs, mus, nus, hps, seeds, params = _leaves(key, shapes, mc, nc, True, dtypes)
    gs[5] = gs[5].astype(jnp.bfloat16)
    run = lambda gs: _update_many(gs, mus, nus, hps, seeds, params, mc, nc)  # noqa: E731
    assert kadam.SHARE_LONE_LEAVES == 0  # the default: the pair, four alone
    assert _launches(run, gs) == 5
    monkeypatch.setattr(kadam, "SHARE_LONE_LEAVES", 1)
    # the pair, two launches of the three lone float32 leaves (2 + 1), bf16
    # (a new function: tracing caches key on it)
    assert _launches(lambda gs: run(gs), gs) == 4
    grouped = run(gs)
    _check_against_per_leaf(grouped, gs, mus, nus, hps, seeds, params, mc, nc)


def _triton_configs(monkeypatch, fn, *args) -> list[str]:
    """`kernel_ops.triton_configs` of ``fn`` lowered for CUDA, Triton forced
    (it lowers on a CPU host): one distinct string, one kernel XLA compiles."""
    from benchmarks import kernel_ops
    from optax_lowbit.kernels import _backend

    triton = _backend.Backend(interpret=False, lowering="triton")
    monkeypatch.setattr(_backend, "pick", lambda lowering=None: triton)
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    configs = kernel_ops.triton_configs(text)
    assert configs, "no Triton custom call lowered"
    return configs


@pytest.mark.parametrize(("programs", "per_launch"), [(None, 1), (0, 1), (0, 3)])
def test_one_compiled_kernel_per_codec_pair(monkeypatch, programs, per_launch):
    """Persistent launches of one codec pair and number of leaves lower to
    one Triton module and grid whatever the leaves' shapes: one kernel for
    XLA to compile (v22). One program per block, each leaf shape has its
    own grid: one kernel per shape."""
    monkeypatch.setattr(kadam, "DEFAULT_PROGRAMS", programs)
    mc, nc = VARIANTS["sr2"]
    # groups of 64 filling whole blocks of 16 groups (a partial last block
    # is another kernel: masked loads and stores)
    shapes = [(64, 128), (96, 64), (8, 512), (208, 64), (64, 320), (128, 128)]
    specs = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    hp = kadam.make_hp(0.9, 0.999, 1e-8, 0.0, 0.1, 0.01, 0.1, 1e-3, 0.01)

    def step(gs, ps):
        return kadam.adam_update_many(
            gs,
            [mc.zeros(s) for s in shapes],
            [nc.zeros(s) for s in shapes],
            [hp] * len(shapes),
            mu_codec=mc,
            nu_codec=nc,
            seeds=[(1, 2 + k) for k in range(len(shapes))],
            params=ps,
            leaves_per_launch=per_launch,
        )

    configs = _triton_configs(monkeypatch, step, specs, specs)
    # 8192, 6144, 4096, 13312, 20480, 16384 elements: 6 block counts of 1024
    assert len(set(configs)) == (1 if programs is not None else len(shapes))


def test_codec_math_traced_once_for_launches_of_any_shapes(monkeypatch):
    """A step of launches over leaves of three shapes (one launch each, each
    its own grid and operands) traces the codecs' math once: the kernels call
    `loop.compute_block_traced_once`, whose arguments' types do not depend on
    a leaf's shape (v34)."""
    from optax_lowbit.kernels import loop

    mc, nc = VARIANTS["sr2"]
    traces = []

    def spy(*args, **kwargs):
        traces.append(kwargs["codecs"])
        return loop.compute_block(*args, **kwargs)

    once = jax.jit(spy, static_argnames=loop.COMPUTE_BLOCK_STATIC)
    monkeypatch.setattr(loop, "compute_block_traced_once", once)
    # shapes no other test traces: `_many_leaves`' jit cache would skip them
    shapes = [(9, 320), (23, 192), (5, 448)]
    gs, mus, nus, hps, seeds, _ = _leaves(jax.random.key(4), shapes, mc, nc, False)

    def step(gs, mus, nus, hps, seeds):
        return _update_many(gs, mus, nus, hps, seeds, None, mc, nc, per_launch=1)

    jaxpr = jax.make_jaxpr(step)(gs, mus, nus, hps, seeds)
    assert _launches(step, gs, mus, nus, hps, seeds) == len(shapes)
    assert traces == [(mc, nc)], len(traces)
    assert "pallas_call" in str(jaxpr)
