"""`_backend.find_triton_dialect`: MLIR finds the Triton dialect's module once;
`_backend.find_triton_lowering`: Pallas lowers to Triton without importing
Mosaic GPU; and the lowered program is the same with them as without."""

import json
import subprocess
import sys
import textwrap

import pytest

from optax_lowbit.kernels import _backend

# Lowers a small fused step for CUDA with Triton forced (it lowers on a CPU
# host, as `benchmarks.compile_host` does), counting the imports MLIR tries
# for the Triton dialect's module; mode "off" keeps `find_triton_dialect` and
# `find_triton_lowering` from running. Prints the lowered text's hash, the
# count and whether Pallas' Mosaic GPU backend was imported, as JSON.
_LOWER = textwrap.dedent(
    """
    import contextlib, hashlib, json, sys
    from unittest import mock

    tries = []

    class Count:
        def find_spec(self, name, path=None, target=None):
            if name.endswith(".tt"):
                tries.append(name)
            return None

    sys.meta_path.insert(0, Count())
    import jax, jax.numpy as jnp
    import optax_lowbit as lowbit
    from optax_lowbit.kernels import _backend

    triton = _backend.Backend(interpret=False, lowering="triton")
    opt = lowbit.adamw_polar(1e-3, bits=2, fused=True, impl="pallas")
    params = {"w": jnp.ones((64, 128)), "u": jnp.ones((32, 256))}
    state = opt.init(params)
    with contextlib.ExitStack() as stack:
        stack.enter_context(
            mock.patch.object(_backend, "pick", lambda lowering=None: triton))
        if sys.argv[1] == "off":
            for name in ("find_triton_dialect", "find_triton_lowering"):
                stack.enter_context(mock.patch.object(_backend, name, bool))
        step = jax.jit(opt.step)
        text = step.trace(params, state, params).lower(
            lowering_platforms=("cuda",)
        ).as_text()
    print(json.dumps({"sha": hashlib.sha256(text.encode()).hexdigest(),
                      "tries": len(tries), "size": len(text),
                      "mosaic": "jax._src.pallas.mosaic_gpu.core" in sys.modules}))
    """
)


def _lower(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _LOWER, mode],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_dialect_found_once_and_same_program():
    on, off = _lower("on"), _lower("off")
    assert on["sha"] == off["sha"] and on["size"] > 10_000
    # without the prefix every Triton operation retries the three prefixes
    # JAX registers; with it the first lookup imports `_mlir.tt`, once
    assert off["tries"] > 100
    assert on["tries"] <= 4
    # without Triton's rule Pallas imports Mosaic GPU to rule it out (JAX
    # 0.10-0.11); with it, the first step imports none of Mosaic GPU
    assert not on["mosaic"]


def test_prefix_registered_and_module_reexports_dialect():
    pytest.importorskip("jaxlib.triton.dialect")
    from jaxlib.mlir._mlir_libs import _mlir

    assert _backend.find_triton_dialect()
    assert _backend.DIALECT_PREFIX in _mlir.globals.dialect_search_modules
    assert _mlir.globals._check_dialect_module_loaded("tt")
    import jaxlib.triton.dialect as jax_tt

    from optax_lowbit.kernels._mlir import tt

    public = [n for n in dir(jax_tt) if not n.startswith("_")]
    assert public and all(getattr(tt, n) is getattr(jax_tt, n) for n in public)


def test_triton_rule_found_by_its_params():
    pytest.importorskip("jax._src.pallas.triton.pallas_call_registration")
    from jax._src.pallas import core as pallas_core
    from jax._src.pallas.triton import core as triton_core
    from jax._src.pallas.triton import pallas_call_registration as triton_call

    assert _backend.find_triton_lowering()
    rule = pallas_core.get_lowering_rule(triton_core.CompilerParams, "gpu")
    assert rule is triton_call.pallas_call_lowering
