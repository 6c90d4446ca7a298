"""A dialect search prefix for MLIR's Python bindings.

`tt` is JAX's Triton dialect under this package's name; why it exists:
`optax_lowbit.kernels._backend.find_triton_dialect`.
"""
