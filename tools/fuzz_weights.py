"""Fuzz refldm's safetensors loader against the safetensors library, for longer than the tests do.

    python tools/fuzz_weights.py --count 200000 --seed 1

Each mutant (tests/weights_fuzz.py: header edits such as a dtype changed with or without its byte range,
shifted offsets, extra zero-size tensors with extreme shapes, repeated fields, NaN, deep nesting, lone
surrogates, a shifted header-length field; and random byte edits and truncations) is judged by both:
refldm must accept exactly what the library accepts, with the same metadata and the same bytes, and
refuse anything else with a WeightsError. A disagreement is written to --out for a bug report.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.weights_fuzz import run  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=100_000, help="mutants to try (default 100000)")
    parser.add_argument("--seed", type=int, default=1, help="random seed of the mutations")
    parser.add_argument("--out", default="fuzz-failures", help="folder for the files refldm disagrees on")
    parser.add_argument("--keep-going", action="store_true", help="do not stop at the first disagreement")
    args = parser.parse_args()
    start = time.perf_counter()
    scratch = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(dir=scratch) as folder:
        counts, failures = run(args.count, args.seed, folder, stop_at_first=not args.keep_going)
    seconds = time.perf_counter() - start
    print(f"{sum(counts.values()) + len(failures)} mutants in {seconds:.1f} s: {counts['accepted']} accepted by "
          f"both, {counts['refused']} refused by both, {counts['load refused']} valid but not representable in "
          f"NumPy (refused by both); {len(failures)} disagreements")
    if failures:
        os.makedirs(args.out, exist_ok=True)
        for index, problem, blob in failures:
            name = os.path.join(args.out, f"mutant-{args.seed}-{index}.safetensors")
            with open(name, "wb") as f:
                f.write(blob)
            print(f"  {name}: {problem}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
