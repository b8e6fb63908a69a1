"""Time the built-in dataset generator: seconds per category and in total.

    .venv/bin/python benchmarks/builtin_data.py [--n-train 200] [--n-test 140] [--size 256]

Writes into a temporary folder that is removed afterwards; prints the size on disk too.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from automl_ad.data.builtin import BUILTIN_CATEGORIES, generate_builtin


def folder_megabytes(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=200)
    parser.add_argument("--n-test", type=int, default=140)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="builtin-bench-") as tmp:
        out = Path(tmp)
        total = 0.0
        for category in BUILTIN_CATEGORIES:
            start = time.perf_counter()
            generate_builtin(out, [category], n_train=args.n_train, n_test=args.n_test,
                             image_size=args.size, seed=args.seed)
            seconds = time.perf_counter() - start
            total += seconds
            images = args.n_train + args.n_test
            print(f"{category:8s} {seconds:6.2f} s  {1000 * seconds / images:5.1f} ms/image  "
                  f"{folder_megabytes(out / category):6.1f} MB")
        print(f"{'total':8s} {total:6.2f} s  ({args.n_train} train + {args.n_test} test per category "
              f"at {args.size} px)")


if __name__ == "__main__":
    main()
