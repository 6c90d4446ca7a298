"""A dialect search prefix for MLIR's Python bindings (`_backend.find_triton_dialect`).

MLIR looks up an operation's Python class by importing ``<prefix>.<dialect>``
for each registered prefix, and caches only a successful import. JAX's Triton
dialect lives in ``jaxlib.triton.dialect``, under none of the prefixes
JAX registers, so every ``tt`` operation the Pallas Triton lowering builds
tried (and failed) three imports. `tt` here is that dialect under this
package's name, so the first lookup succeeds and is cached.
"""
