"""A state written before a refactor restores and steps bit-exactly after it."""

import numpy as np
import pytest

from tests import _compat_states as compat

DATA = np.load("tests/data/compat_states.npz")

# the saved bits come from optimized programs (what users run): XLA's CPU
# backend rounds some steps differently with its optimizations off
pytestmark = pytest.mark.optimized


@pytest.mark.parametrize("name", sorted(compat.optimizers()))
def test_saved_state_restores_and_steps_bit_exactly(name):
    tx = compat.optimizers()[name]
    params, grads = compat.inputs()
    state = compat.restore(tx, params, DATA, name)
    _, u, new_state = compat.run(tx, params, grads, state=state)
    for part, tree in (("update", u), ("next", new_state)):
        leaves = compat.flat(tree)
        assert len(leaves) == sum(k.startswith(f"{name}/{part}/") for k in DATA)
        for i, x in enumerate(leaves):
            np.testing.assert_array_equal(
                x, DATA[f"{name}/{part}/{i}"], err_msg=f"{part}/{i}"
            )
