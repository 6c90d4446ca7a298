"""Sharded states on 8 fake CPU devices, in their own process.

The device count must be set before jax initialises, so the checks run in
``tests/_sharding_script.py`` in a subprocess with
``--xla_force_host_platform_device_count=8``. One subprocess (a module-scoped
fixture per group below) runs the checks of its group, but for the Pallas and
training checks (`SLOW_CHECKS`: their tests are marked slow and use a third
subprocess, run by CI's second step), and reports each one (``CHECK <mode>:<name>
PASS`` or ``FAIL`` with its traceback); each test asserts on its checks'
reports. The script checks, per alias, on a 2x4 mesh: quantized states sharded
like their parameters on leading axes (``.sharding.spec`` of ``Packed`` codes
and scales), no all-gather in the compiled step's HLO, identical
``jax.typeof`` and sharding of the state before and after an update; and that
the policy makes the same decisions on 1, 2 and 8 devices; and
`benchmarks.sharded_training`'s quick checks for one low-bit optimizer
(FSDP training of a small GPT, ``check_sharded_training``); and, per codec
(issue 19 item 3, ``check_codec_keeps_state_type``; once its own subprocess,
tests/test_dropin_sharding.py), that a transform storing its moments in that
codec keeps every state leaf's exact type (shape, dtype, sharding) through
jitted updates under an explicit 1-D mesh, and that a ``lax.scan`` over steps
compiles.

Two mesh modes: ``auto`` (Auto axes, GSPMD propagation; eager init of sharded
params) and ``explicit`` (Explicit axes, sharding in types; ``jax.jit(tx.init)``
inside ``jax.set_mesh``).

The checks run in two subprocesses of about equal length (~60 s each alone
on a CPU; one of ~120 s held one xdist worker for 150-250 s under load):
`MESH_CHECKS` (every alias under auto and explicit axes, the policy) and
`TYPE_CHECKS` (every codec's state type). Each has its own ``xdist_group``
(``--dist loadgroup`` in pyproject.toml), so under pytest-xdist one worker
runs each subprocess once and the two run side by side on two workers.

Every test here is marked slow: the three subprocesses are ~85 s of XLA
compiles each for 8 devices and no property test, so they run in CI's second
step (``OPTAX_LOWBIT_SLOW=1 pytest -m slow``) with the other long checks, and
neither the first step nor the fuzz profile pays for them (issues 17, 19).
"""

import os
import pathlib
import subprocess
import sys

import pytest

from tests import _xla_cpu

ROOT = pathlib.Path(__file__).parent.parent  # runs tests/_sharding_script.py
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
# every codec, by its name in the script's TYPE_CODECS
TYPE_CODECS = [
    "identity",
    "identity-bf16",
    "polar-2-signed",
    "polar-1.5-signed-sr",
    "polar-2-signed-sr",
    "polar-2-unsigned",
    "polar-1.5-unsigned-sr",
    "piquant-signed",
    "piquant-paper",
    "piquant-unsigned",
    "blockwise8-signed",
    "blockwise8-unsigned-sr",
    "blockwise4-signed",
    "blockwise4-unsigned",
    "blockwise4-log-sr",
]


PALLAS = ["adamw_polar-2-pallas", "adamw_polar-1.5-pallas"]
MESH_CHECKS = (
    [("auto", n) for n in ALL]
    + [("auto", "policy")]
    + [("explicit", n) for n in POLAR + TABLE_CODECS]
)
TYPE_CHECKS = [("types", n) for n in TYPE_CODECS]
CHECKS = MESH_CHECKS + TYPE_CHECKS
# The Pallas kernels per shard (interpret mode) and the FSDP training run:
# ~60 s of the subprocess's ~190 s alone on a CPU. Their tests are marked slow,
# so CI's second step (OPTAX_LOWBIT_SLOW=1) runs these checks in a subprocess
# of their own (`slow_reports`).
SLOW_CHECKS = [("explicit", n) for n in PALLAS] + [
    ("explicit", "pallas-float-leaves"),
    ("explicit", "training"),
]

MESH = pytest.mark.xdist_group("sharding_mesh")
TYPES = pytest.mark.xdist_group("sharding_types")
SLOW = pytest.mark.xdist_group("sharding_slow")


@pytest.fixture(scope="module")
def reports():
    """``{"mode:name": (passed, its output)}`` of every check in `MESH_CHECKS`,
    run in one subprocess."""
    return _run_checks(MESH_CHECKS, elemental=True)


@pytest.fixture(scope="module")
def type_reports():
    """As `reports`, for `TYPE_CHECKS` (in a subprocess of their own)."""
    return _run_checks(TYPE_CHECKS, elemental=True)


@pytest.fixture(scope="module")
def slow_reports():
    """As `reports`, for `SLOW_CHECKS` (only the slow tests use it)."""
    return _run_checks(SLOW_CHECKS)


def _run_checks(checks, elemental=False):
    """Runs ``checks`` in a subprocess; ``elemental``: its compiles use XLA:CPU's
    elemental emitters where the suite's are unoptimized (tests/_xla_cpu.py).
    Only for checks that compare no two programs' floats bit for bit: with
    them the per-shard kernels' states differed from the jnp path's in 20% of
    their codes and the FSDP run's from one device's (`SLOW_CHECKS`)."""
    env = dict(os.environ)
    if elemental and env.get("JAX_DISABLE_MOST_OPTIMIZATIONS") == "1":
        env[_xla_cpu.SUBPROCESS_ENV] = "1"
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests._sharding_script",
            "checks",
            *(f"{m}:{n}" for m, n in checks),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
        env=env,
        check=False,
    )
    found = {}
    label, lines = None, []
    for line in proc.stdout.splitlines():
        parts = line.split(" ")
        if len(parts) >= 3 and parts[0] == "CHECK":
            if parts[2] == "START":
                label, lines = parts[1], []
                continue
            if parts[2] in ("PASS", "FAIL") and parts[1] == label:
                if parts[2] == "PASS" or parts[3:] == ["END"]:
                    found[label] = (parts[2] == "PASS", "\n".join(lines))
                if parts[3:] != ["BEGIN"]:
                    label = None
                continue
        if label is not None:
            lines.append(line)
    # a crash (or a check the script never reported) fails that check's test
    # with the process's output
    tail = (proc.stdout + proc.stderr)[-4000:]
    for mode, name in checks:
        found.setdefault(
            f"{mode}:{name}",
            (False, f"not reported (exit code {proc.returncode}):\n{tail}"),
        )
    if all(ok for ok, _ in found.values()):
        assert proc.returncode == 0 and "ALL OK" in proc.stdout, tail
    return found


def _passed(reports, mode, name):
    ok, out = reports[f"{mode}:{name}"]
    assert ok, f"{mode}:{name} failed:\n{out[-4000:]}"
    return out


@MESH
@pytest.mark.slow
def test_auto_axes_every_alias_and_policy_under_any_mesh(reports):
    for name in ALL:
        assert f"auto {name}: " in _passed(reports, "auto", name)
    out = _passed(reports, "auto", "policy")
    assert "policy: same decisions on 1, 2 and 8 devices" in out


@MESH
@pytest.mark.slow
def test_explicit_axes_jitted_init_polar_aliases(reports):
    for name in POLAR:
        assert f"explicit {name}: " in _passed(reports, "explicit", name)


@MESH
@pytest.mark.slow
@pytest.mark.parametrize("name", TABLE_CODECS)
def test_explicit_axes_table_codecs(reports, name):
    assert f"explicit {name}: " in _passed(reports, "explicit", name)


@SLOW
@pytest.mark.slow
def test_explicit_axes_kernels_run_per_shard(slow_reports):
    """impl="pallas" (interpret mode) inside shard_map: no all-gather, state
    sharded like the params, codes equal the jnp path's (shard offsets)."""
    for name in PALLAS:
        out = _passed(slow_reports, "explicit", name)
        assert f"explicit {name}: " in out
    assert "adamw_polar-1.5-pallas: sharded kernel and fused step = jnp path" in out


@SLOW
@pytest.mark.slow
def test_explicit_axes_kernels_sharded_float_leaves_not_gathered(slow_reports):
    """impl="pallas": float-state leaves sharded on their leading axis (bias,
    embedding) are stepped in place, chain and fused, as the jnp path."""
    out = _passed(slow_reports, "explicit", "pallas-float-leaves")
    assert "pallas: sharded float leaves stepped in place, no all-gather" in out


@SLOW
@pytest.mark.slow
def test_sharded_training_quick_checks(slow_reports):
    """benchmarks/sharded_training.py --quick for adamw_8bit: FSDP on 8 devices,
    state bytes total/8, no state all-gather, same state/loss as on 1 device,
    Orbax checkpoint restored on 1 device and on a 2x4 mesh bit-exactly."""
    out = _passed(slow_reports, "explicit", "training")
    assert "training: FSDP adamw_8bit on 8 devices" in out


@TYPES
@pytest.mark.slow
@pytest.mark.parametrize("name", TYPE_CODECS)
def test_every_codec_keeps_its_state_type_under_an_explicit_mesh(type_reports, name):
    """Issue 19 item 3: for every codec, Adam's moments (and a signed codec's
    trace) keep shape, dtype and sharding through ``update`` on leaves sharded
    on leading axes (the issue's ``(2, 8, 4)`` leaf on ``P(None, 'x')``), and a
    ``lax.scan`` over steps compiles. One test per codec (15 tests in the
    group: ``--dist loadgroup`` starts the groups with the most tests first,
    so this subprocess starts at the beginning of the run, not at its end)."""
    out = _passed(type_reports, "types", name)
    assert f"{name} adam: type kept" in out, name
