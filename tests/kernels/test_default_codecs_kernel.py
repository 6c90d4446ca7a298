"""The fused kernel on every Adam preset's (mu, nu) codec pair (interpret mode).

The presets' second moments are stochastic blockwise codecs (a log map at 4
bits, the dynamic map at 8): the kernel must draw the same rounding bits as
the jnp path and give identical codes and scales.
"""

import chex
import jax
import numpy as np
import pytest

import optax_lowbit as lowbit
from optax_lowbit.codecs import base
from optax_lowbit.kernels import adam as kadam
from tests.kernels.test_adam_kernel import (
    _code_mismatch,
    _kernel,
    _random_state,
    _reference,
)

# the kernel and its reference held to the same bits (tests/conftest.py)
pytestmark = pytest.mark.optimized

PRESETS = {
    "polar2": lambda: lowbit.scale_by_adam_polar(bits=2),
    "polar1.5": lambda: lowbit.scale_by_adam_polar(bits=1.5),
    "4bit": lowbit.scale_by_adam_4bit,
    "8bit": lowbit.scale_by_adam_8bit,
}


def preset_codecs(name):
    """The (mu, nu) codecs a preset stores its quantized leaves in."""
    state = PRESETS[name]().init({"w": jax.numpy.zeros((64, 256))})
    packed = [
        x
        for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, base.Packed))
        if isinstance(x, base.Packed)
    ]
    return packed[0].codec, packed[1].codec


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("apply", [False, True])
def test_preset_kernel_equals_reference(name, apply):
    mc, nc = preset_codecs(name)
    assert nc.stochastic and kadam.has_kernel(mc) and kadam.has_kernel(nc)
    shape = (3, 5, 200)  # rows of 1000 elements: a partial group at the end
    key = jax.random.key(31 + apply + len(name))
    g, mu, nu = _random_state(key, shape, mc, nc)
    params = jax.random.normal(jax.random.fold_in(key, 1), shape) if apply else None
    hp = kadam.make_hp(
        0.9, 0.999, 1e-8, 0.0, 0.271, 0.003, learning_rate=1e-2, weight_decay=0.1
    )
    kw = dict(mc=mc, nc=nc, seeds=(np.uint32(5), np.uint32(6)), params=params)
    out_ref, m_ref, v_ref = _reference(g, mu, nu, hp, **kw)
    out, m, v = _kernel(g, mu, nu, hp, block_groups=8, **kw)
    np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_equal((m, v), (m_ref, v_ref))
    # another stream for v gives other codes: the seeds reach the kernel
    _, _, v2 = _kernel(g, mu, nu, hp, block_groups=8, **{**kw, "seeds": (5, 7)})
    assert _code_mismatch(v2, v) > 0.01


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_default_block_holds_at_most_max_block_elements(name, monkeypatch):
    """Without ``block_groups`` a block takes `DEFAULT_BLOCK_GROUPS` groups, fewer
    where that would exceed `MAX_BLOCK_ELEMENTS` (the 8-bit preset's 256-element
    groups: 8 per block); an explicit ``block_groups`` is kept as given."""
    codecs = preset_codecs(name)
    gsize = max(c.group_size for c in codecs)
    rule = kadam.rules.AdamRule()
    for default in (8, 16, 32):
        monkeypatch.setattr(kadam, "DEFAULT_BLOCK_GROUPS", default)
        groups = kadam.launch_config(rule, codecs).block_groups
        assert groups & (groups - 1) == 0 and 1 <= groups <= default
        assert groups * gsize <= max(kadam.MAX_BLOCK_ELEMENTS, gsize)
        assert groups == default or 2 * groups * gsize > kadam.MAX_BLOCK_ELEMENTS
    assert kadam.launch_config(rule, codecs, block_groups=32).block_groups == 32
    monkeypatch.setattr(kadam, "DEFAULT_BLOCK_GROUPS", 16)
    expected = {"polar2": 16, "polar1.5": 16, "4bit": 16, "8bit": 8}[name]
    assert kadam.launch_config(rule, codecs).block_groups == expected


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_default_warps_give_each_thread_elements_per_thread(name, monkeypatch):
    """Without ``num_warps`` a block of ``E`` elements takes ``E / (32 *
    ELEMENTS_PER_THREAD)`` warps (a power of two in [1, MAX_NUM_WARPS]): 4 for
    polar's 1024-element blocks, 8 for the 2048 of 4-bit and 8-bit; a set
    `DEFAULT_NUM_WARPS` or an explicit ``num_warps`` is kept as given."""
    codecs = preset_codecs(name)
    gsize = max(c.group_size for c in codecs)
    rule = kadam.rules.AdamRule()
    monkeypatch.setattr(kadam, "DEFAULT_BLOCK_GROUPS", 16)
    monkeypatch.setattr(kadam, "DEFAULT_NUM_WARPS", None)
    config = kadam.launch_config(rule, codecs)
    expected = {"polar2": 4, "polar1.5": 4, "4bit": 8, "8bit": 8}[name]
    assert config.num_warps == expected
    per_thread = config.block_groups * gsize / (32 * config.num_warps)
    assert per_thread == kadam.ELEMENTS_PER_THREAD
    for groups in (1, 2, 4, 8, 16, 32, 64):
        warps = kadam.launch_config(rule, codecs, block_groups=groups).num_warps
        assert warps & (warps - 1) == 0 and 1 <= warps <= kadam.MAX_NUM_WARPS
        elements = groups * gsize
        assert (
            warps == kadam.MAX_NUM_WARPS
            or warps == 1
            or (elements // (32 * warps) == kadam.ELEMENTS_PER_THREAD)
        )
    assert kadam.launch_config(rule, codecs, num_warps=2).num_warps == 2
    monkeypatch.setattr(kadam, "DEFAULT_NUM_WARPS", 4)
    assert kadam.launch_config(rule, codecs).num_warps == 4
