"""The kernel tunables as command-line flags: one definition for every benchmark.

`add` puts ``--block-groups``, ``--num-warps``, ``--leaves-per-launch``,
``--programs``, ``--share-lone-leaves``, ``--prefetch`` and
``--float-leaves-per-launch`` on a parser, `apply` sets the module attributes
of `optax_lowbit.kernels.adam` they stand for, `argv` gives the flags that
reproduce the current settings (for a child process), and `settings` the
values a result records.
"""

from __future__ import annotations

import argparse
from typing import Any

from optax_lowbit.kernels import adam as kadam

#: ``(flag, kadam attribute, help)`` of each tunable.
FLAGS = (
    (
        "--block-groups",
        "DEFAULT_BLOCK_GROUPS",
        "groups per kernel block, kadam.DEFAULT_BLOCK_GROUPS (default: the "
        "library's, capped per codec by kadam.default_block_groups)",
    ),
    (
        "--num-warps",
        "DEFAULT_NUM_WARPS",
        "Triton warps per block for every launch, kadam.DEFAULT_NUM_WARPS "
        "(default: kadam.default_num_warps of each block)",
    ),
    (
        "--leaves-per-launch",
        "LEAVES_PER_LAUNCH",
        "most leaves per kernel launch, kadam.LEAVES_PER_LAUNCH (1: one launch "
        "per leaf; 0: no limit, NOTES_kernels.md v6; default: by the block's "
        "size, kadam.default_leaves_per_launch, v20)",
    ),
    (
        "--programs",
        "DEFAULT_PROGRAMS",
        "programs of every kernel launch, kadam.DEFAULT_PROGRAMS (0: a "
        "persistent launch of launch.default_programs, one kernel per codec "
        "pair, NOTES_kernels.md v22; default: one program per block)",
    ),
    (
        "--share-lone-leaves",
        "SHARE_LONE_LEAVES",
        "1: the leaves a signature leaves alone share launches, any shapes "
        "(kadam.SHARE_LONE_LEAVES, NOTES_kernels.md v28 / v29; default: off)",
    ),
    (
        "--prefetch",
        "PREFETCH",
        "1: persistent launches (--programs set) load each program's next "
        "block before stepping the current one (kadam.PREFETCH, "
        "NOTES_kernels.md v43; default: off)",
    ),
    (
        "--float-leaves-per-launch",
        "FLOAT_LEAVES_PER_LAUNCH",
        "most float-moment leaves per kernel launch, "
        "kadam.FLOAT_LEAVES_PER_LAUNCH (NOTES_kernels.md v37; default: the "
        "library's)",
    ),
)


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def add(ap: argparse.ArgumentParser) -> None:
    """Adds the tunables' flags to ``ap`` (each ``None`` unless given)."""
    for flag, _, help_text in FLAGS:
        ap.add_argument(flag, type=int, default=None, help=help_text)


def apply(args: argparse.Namespace) -> None:
    """Sets each given flag's `kadam` attribute (the rest keep theirs)."""
    for flag, attr, _ in FLAGS:
        value = getattr(args, _dest(flag))
        if value is not None:
            setattr(kadam, attr, value)


def argv() -> list[str]:
    """The flags that give a child process this process's settings."""
    out = []
    for flag, attr, _ in FLAGS:
        value = getattr(kadam, attr)
        if value is not None:
            out += [flag, str(value)]
    return out


def settings() -> dict[str, Any]:
    """``{flag name: current kadam value}``, for a result's metadata."""
    return {_dest(flag): getattr(kadam, attr) for flag, attr, _ in FLAGS}
