"""Sharded states on 8 fake CPU devices, in their own process.

The device count must be set before jax initialises, so each test runs
``tests/_sharding_script.py`` in a subprocess with
``--xla_force_host_platform_device_count=8`` and asserts on its exit code and
output. The script checks, per alias, on a 2x4 mesh: quantized states sharded
like their parameters on leading axes (``.sharding.spec`` of ``Packed`` codes
and scales), no all-gather in the compiled step's HLO, identical
``jax.typeof`` and sharding of the state before and after an update; and that
the policy makes the same decisions on 1, 2 and 8 devices.

Two mesh modes: ``auto`` (Auto axes, GSPMD propagation; eager init of sharded
params) and ``explicit`` (Explicit axes, sharding in types; ``jax.jit(tx.init)``
inside ``jax.set_mesh``).
"""

import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).with_name("_sharding_script.py")
ROOT = SCRIPT.parent.parent
ALL = [
    "adamw_polar-2",
    "adamw_polar-1.5",
    "adam_polar",
    "adamw_piquant",
    "adamw_8bit",
    "adamw_4bit",
    "adafactor_polar",
    "lion_polar",
    "sgd_polar",
]
POLAR = [n for n in ALL if "polar" in n]
TABLE_CODECS = ["adamw_piquant", "adamw_8bit", "adamw_4bit"]


def _run(mode, names):
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), mode, *names],
        capture_output=True,
        text=True,
        timeout=540,
        cwd=ROOT,
        env=env,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "ALL OK" in proc.stdout, out[-4000:]
    return proc.stdout


def test_auto_axes_every_alias_and_policy_under_any_mesh():
    out = _run("auto", ALL)
    for name in ALL:
        assert f"auto {name}: " in out
    assert "policy: same decisions on 1, 2 and 8 devices" in out


def test_explicit_axes_jitted_init_polar_aliases():
    out = _run("explicit", POLAR)
    for name in POLAR:
        assert f"explicit {name}: " in out


@pytest.mark.parametrize("name", TABLE_CODECS)
def test_explicit_axes_table_codecs(name):
    _run("explicit", [name])


def test_explicit_axes_kernels_run_per_shard():
    """impl="pallas" (interpret mode) inside shard_map: no all-gather, state
    sharded like the params, codes equal the jnp path's (shard offsets)."""
    out = _run("explicit", ["adamw_polar-2-pallas", "adamw_polar-1.5-pallas"])
    assert "adamw_polar-1.5-pallas: sharded kernel and fused step = jnp path" in out
