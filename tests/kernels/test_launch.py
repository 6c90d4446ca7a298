"""`launch.chunks`, `launch.by_grid`, `loop.sizes` and `launch.default_programs`:
how a launch splits leaves, describes their sizes to the kernel, and picks its
grid."""

import math

import jax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from optax_lowbit.kernels import launch, loop

shapes = st.lists(
    st.tuples(st.integers(1, 9), st.integers(1, 700)), min_size=1, max_size=7
)


@settings(deadline=None, max_examples=60)
@given(n=st.integers(0, 60), most=st.integers(1, 9))
def test_chunks_in_order_and_even(n, most):
    items = list(range(n))
    runs = launch.chunks(items, most)
    assert [x for run in runs for x in run] == items
    assert len(runs) == math.ceil(n / most)
    lengths = {len(run) for run in runs}
    assert max(lengths, default=0) <= most
    assert max(lengths, default=0) - min(lengths, default=0) <= 1


@settings(deadline=None, max_examples=80)
@given(
    kinds=st.lists(st.integers(1, 6), min_size=1, max_size=12),
    most=st.integers(1, 5),
)
def test_by_grid_launches_every_item_once(kinds, most):
    """Every item once; each launch at most ``most``; as many launches as
    each block count's items need (`chunks` of each count would make)."""
    items = [f"leaf{k}" for k in range(len(kinds))]
    shapes = [(k, 7) for k in kinds]
    blocks = [k % 3 + 1 for k in kinds]  # shapes 1 and 4 share a block count
    runs = launch.by_grid(items, shapes, blocks, most)
    assert sorted(x for run in runs for x in run) == sorted(items)
    assert all(1 <= len(run) <= most for run in runs)
    counts = {}
    for n in blocks:
        counts[n] = counts.get(n, 0) + 1
    assert len(runs) == sum(math.ceil(c / most) for c in counts.values())


@settings(deadline=None, max_examples=40)
@given(
    layer=st.lists(st.integers(1, 5000), min_size=2, max_size=6, unique=True),
    layers=st.integers(1, 12),
    seed=st.randoms(use_true_random=False),
)
def test_by_grid_repeated_layers_share_grids(layer, layers, seed):
    """A model of ``layers`` repeats of one layer's leaves (each its own
    shape), in any order, paired (two a launch): at most one grid and one
    shape pair per pair of the layer's leaves, where pairs of one shape take
    one grid per shape; the pairs are the largest with the smallest."""
    layer = layer[: len(layer) // 2 * 2]  # an even layer: every class pairs
    items = [(i, k) for i in range(layers * 2) for k in range(len(layer))]
    seed.shuffle(items)
    shapes = [(layer[k], 1) for _, k in items]
    blocks = [layer[k] for _, k in items]
    runs = launch.by_grid(items, shapes, blocks, 2)
    assert all(len(run) == 2 for run in runs)
    grids = {sum(layer[k] for _, k in run) for run in runs}
    pairs = {tuple(sorted(layer[k] for _, k in run)) for run in runs}
    assert len(grids) <= len(pairs) <= len(layer) // 2
    ranked = sorted(layer)
    assert all(ranked.index(a) + ranked.index(b) == len(layer) - 1 for a, b in pairs)


@settings(deadline=None, max_examples=60)
@given(
    shapes=shapes,
    group_size=st.sampled_from([16, 64, 128]),
    block=st.sampled_from([1, 8, 16]),
)
def test_sizes_table(shapes, group_size, block):
    """Each leaf's first block, rows, last axis and groups per row; then the
    block count and a 0; zero padding to a power of two."""
    table = loop.sizes(shapes, group_size, block)
    n = len(shapes)
    assert table.dtype.name == "int32"
    assert len(table) == 1 << math.ceil(math.log2(n * loop.SIZE_SLOTS + 2))
    first = 0
    for k, (rows, last) in enumerate(shapes):
        groups = -(-last // group_size)
        at = k * loop.SIZE_SLOTS
        assert table[at + loop.FIRST] == first
        assert table[at + loop.ROWS] == rows * groups
        assert table[at + loop.LAST] == last
        assert table[at + loop.GROUPS_PER_ROW] == groups
        first += -(-rows * groups // block)
    assert table[n * loop.SIZE_SLOTS] == first
    assert not table[n * loop.SIZE_SLOTS + 1 :].any()


def test_sizes_rejects_int32_overflow():
    with pytest.raises(ValueError, match="overflows"):
        loop.sizes([(2**31, 16)], 16, 1)


def test_default_programs():
    """SMs x 64 warps of programs, whatever the leaves; few programs (that
    loop) in the interpreter."""
    assert launch.default_programs(4, interpret=True) == launch.INTERPRET_PROGRAMS
    if jax.default_backend() != "gpu":
        sms = launch.DEFAULT_SMS
        assert launch.default_programs(4, interpret=False) == sms * 16
        assert launch.default_programs(8, interpret=False) == sms * 8
        assert launch.default_programs(128, interpret=False) == sms


@pytest.mark.parametrize("bad", [-1, True, "0", 2.0])
def test_bad_programs_named(monkeypatch, bad):
    """A bad `kadam.DEFAULT_PROGRAMS` fails when the launch is configured,
    naming the setting and what it accepts."""
    from optax_lowbit.kernels import adam as kadam
    from optax_lowbit.kernels import rules
    from optax_lowbit.transforms import adam_presets

    codecs = adam_presets.polar_codecs(2, "stochastic")
    monkeypatch.setattr(kadam, "DEFAULT_PROGRAMS", bad)
    with pytest.raises((TypeError, ValueError), match="DEFAULT_PROGRAMS"):
        kadam.launch_config(rules.AdamRule(), codecs)
    for good in (None, 0, 3):
        monkeypatch.setattr(kadam, "DEFAULT_PROGRAMS", good)
        assert kadam.launch_config(rules.AdamRule(), codecs).programs == good


@pytest.mark.parametrize(("prefetch", "programs"), [(2, 0), (True, 0), (-1, None)])
def test_bad_prefetch_named(monkeypatch, prefetch, programs):
    """`kadam.PREFETCH` is 0 or 1, else the launch's configuration fails
    naming the setting; it applies to persistent launches only (v43)."""
    from optax_lowbit.kernels import adam as kadam
    from optax_lowbit.kernels import launch, rules
    from optax_lowbit.transforms import adam_presets

    codecs = adam_presets.polar_codecs(2, "stochastic")
    monkeypatch.setattr(kadam, "DEFAULT_PROGRAMS", programs)
    monkeypatch.setattr(kadam, "PREFETCH", prefetch)
    with pytest.raises(ValueError, match="PREFETCH"):
        kadam.launch_config(rules.AdamRule(), codecs)
    monkeypatch.setattr(kadam, "PREFETCH", 1)
    monkeypatch.setattr(kadam, "DEFAULT_PROGRAMS", 0)
    assert kadam.launch_config(rules.AdamRule(), codecs).prefetch
    monkeypatch.setattr(kadam, "DEFAULT_PROGRAMS", None)
    assert not kadam.launch_config(rules.AdamRule(), codecs).prefetch
    with pytest.raises(ValueError, match="prefetch=True needs a persistent"):
        launch.LaunchConfig(rules.AdamRule(), codecs, 16, 4, prefetch=True)
