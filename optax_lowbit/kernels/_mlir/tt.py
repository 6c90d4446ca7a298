"""JAX's Triton dialect (``tt``), importable under this package's prefix."""

from jaxlib.triton.dialect import *  # noqa: F403
