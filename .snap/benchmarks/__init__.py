"""Benchmark scripts and their shared data and model helpers.

Importable from the repository root (``import benchmarks.data``); not part of
the installed ``optax_lowbit`` package.
"""
