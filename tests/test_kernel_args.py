"""benchmarks/_kernel_args.py: the kernel tunables' flags, applied and
forwarded to a child process."""

import argparse

from benchmarks import _kernel_args
from optax_lowbit.kernels import adam as kadam


def _parser():
    ap = argparse.ArgumentParser()
    _kernel_args.add(ap)
    return ap


def test_flags_set_the_tunables_and_round_trip(monkeypatch):
    for _, attr, _ in _kernel_args.FLAGS:  # restored after the test
        monkeypatch.setattr(kadam, attr, getattr(kadam, attr))
    monkeypatch.setattr(kadam, "DEFAULT_NUM_WARPS", None)
    monkeypatch.setattr(kadam, "LEAVES_PER_LAUNCH", None)
    monkeypatch.setattr(kadam, "DEFAULT_PROGRAMS", None)
    _kernel_args.apply(_parser().parse_args(["--programs", "0", "--num-warps", "8"]))
    assert kadam.DEFAULT_PROGRAMS == 0 and kadam.DEFAULT_NUM_WARPS == 8
    assert kadam.LEAVES_PER_LAUNCH is None  # not given: left alone
    forwarded = _kernel_args.argv()
    assert "--leaves-per-launch" not in forwarded
    args = _parser().parse_args(forwarded)
    assert (args.programs, args.num_warps) == (0, 8)
    assert args.block_groups == kadam.DEFAULT_BLOCK_GROUPS
    assert _kernel_args.settings()["programs"] == 0
