"""Runs a benchmark module in a subprocess, as the benchmark smoke tests do.

A subprocess because a benchmark run sets module globals (timing counts,
kernel configuration, jax config) that must not leak into the test process.
"""

from __future__ import annotations

import subprocess
import sys


def run_module(module: str, *args: str, timeout: float = 300) -> str:
    """``python -m module *args``; fails the test on a non-zero exit.

    Args:
      module: the module to run (``benchmarks.step_speed``).
      *args: its command-line arguments.
      timeout: seconds before the run is killed.

    Returns:
      The run's standard output.
    """
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout
