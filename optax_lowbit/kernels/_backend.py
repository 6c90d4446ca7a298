"""The one place that picks how a Pallas kernel runs: interpreter or lowering.

``impl="auto"`` is Pallas on GPU/TPU and jnp on CPU; ``impl="pallas"`` on a CPU
backend runs the same kernel through the Pallas interpreter (how CI tests it).
On GPU the lowering is Triton by default; ``OPTAX_LOWBIT_GPU_LOWERING=mosaic``
selects Mosaic GPU (measured in ``benchmarks/step_speed.py``; Triton is the
faster one that lowers, see ``benchmarks/NOTES_kernels.md``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax

#: GPU lowerings we know how to ask for.
GPU_LOWERINGS = ("triton", "mosaic")


@dataclasses.dataclass(frozen=True)
class Backend:
    """How to run a ``pallas_call``.

    Attributes:
      interpret: run through the Pallas interpreter (CPU).
      lowering: ``"interpret"``, ``"triton"``, ``"mosaic"`` (Mosaic GPU) or
        ``"tpu"``.
    """

    interpret: bool
    lowering: str

    def compiler_params(self, num_warps: int = 4, num_stages: int = 2) -> Any:
        """The ``compiler_params`` that select this lowering (``None``: default)."""
        if self.lowering == "triton":
            from jax.experimental.pallas import triton as plt

            find_triton_dialect()
            find_triton_lowering()
            return plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)
        if self.lowering == "mosaic":
            from jax.experimental.pallas import mosaic_gpu as plgpu

            return plgpu.CompilerParams()
        return None


#: Where `find_triton_dialect` points MLIR for the ``tt`` dialect's module.
DIALECT_PREFIX = "optax_lowbit.kernels._mlir"


@functools.cache
def find_triton_dialect() -> bool:
    """Lets MLIR's Python bindings find the Triton dialect's module once.

    MLIR imports ``<prefix>.tt`` for every Triton operation the Pallas
    lowering wraps until one import succeeds, and caches only a success; no
    prefix JAX registers holds ``tt``, so each operation cost three failed
    imports: ~40% of a fused GPT-2 step's lowering (benchmarks/NOTES_kernels.md,
    v26). This appends `DIALECT_PREFIX` (a module re-exporting JAX's Triton
    dialect) to MLIR's search prefixes, once per process; the lowered module
    is the same. A no-op where JAX's Triton dialect or the prefix API is
    missing.

    Returns:
      Whether the prefix was added.
    """
    try:
        import jaxlib.triton.dialect  # noqa: F401  (what `_mlir.tt` re-exports)
        from jaxlib.mlir._mlir_libs import _mlir
    except ImportError:
        return False
    add = getattr(_mlir.globals, "append_dialect_search_prefix", None)
    if add is None:
        return False
    add(DIALECT_PREFIX)
    return True


@functools.cache
def find_triton_lowering() -> bool:
    """Imports Pallas' Triton lowering up front, once, so its rule is found first.

    Pallas looks a GPU lowering rule up by the type of a call's
    ``compiler_params``. Triton's module registers its rule when imported,
    but Pallas imports it only after importing all of Mosaic GPU to rule
    that out, so a process's first Triton lowering paid Mosaic GPU's import:
    ~0.1-0.15 s of a user's first step that `optax.adamw` never pays
    (benchmarks/NOTES_kernels.md, v30). Importing Triton's registration here
    lets the lookup find its rule; the lowering and the module are the same.
    A no-op where JAX lays Pallas out otherwise.

    Returns:
      Whether Triton's rule is registered for its ``CompilerParams``.
    """
    try:
        from jax._src.pallas import core as pallas_core
        from jax._src.pallas.triton import core as triton_core
        from jax._src.pallas.triton import pallas_call_registration  # noqa: F401
    except ImportError:
        return False
    lookup = getattr(pallas_core, "get_lowering_rule", None)
    params = getattr(triton_core, "CompilerParams", None)
    return (
        lookup is not None
        and params is not None
        and (lookup(params, "gpu") is not None)
    )


def use_pallas(impl: str) -> bool:
    """Whether ``impl`` ("auto", "jnp", "pallas") means the Pallas kernels here."""
    if impl == "pallas":
        return True
    if impl == "jnp":
        return False
    return jax.default_backend() in ("gpu", "cuda", "rocm", "tpu")


def pick(lowering: str | None = None) -> Backend:
    """The backend for the default device: the single backend decision.

    Args:
      lowering: force a GPU lowering (``"triton"`` or ``"mosaic"``); ``None``
        reads ``OPTAX_LOWBIT_GPU_LOWERING`` and defaults to Triton.

    Returns:
      A `Backend`.
    """
    platform = jax.default_backend()
    if platform == "cpu":
        return Backend(interpret=True, lowering="interpret")
    if platform == "tpu":
        return Backend(interpret=False, lowering="tpu")
    if lowering is None:
        lowering = os.environ.get("OPTAX_LOWBIT_GPU_LOWERING", "triton")
    if lowering not in GPU_LOWERINGS:
        raise ValueError(f"lowering must be one of {GPU_LOWERINGS}, got {lowering!r}.")
    return Backend(interpret=False, lowering=lowering)
