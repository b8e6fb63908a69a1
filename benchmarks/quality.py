"""Detection quality of every method at its default configuration on the built-in products.

Each (method, category) pair is one `automl-ad train` run with a wall-clock limit, run
in parallel processes with one CPU thread each (so "N minutes" is N CPU-minutes per run).
Prints val objective and test image/pixel AUROC and AUPRO per pair.

    python benchmarks/quality.py --minutes 10 --image-size 128 --jobs 2
    python benchmarks/quality.py --methods draem,nsa --categories screw --minutes 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_one(method: str, category: str, args: argparse.Namespace) -> dict:
    out = args.out / f"{category}-{method}"
    command = [
        sys.executable, str(ROOT / "cli.py"), "train", "--method", method, "--category", category,
        "--data", str(args.data), "--image-size", str(args.image_size), "--epochs", str(args.epochs),
        "--time-limit", str(args.minutes), "--device", args.device, "--seed", str(args.seed), "--out", str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    row = {"method": method, "category": category, "wall_s": round(time.perf_counter() - began, 1)}
    if done.returncode != 0:
        row["error"] = (done.stderr.strip().splitlines() or ["?"])[-1]
        return row
    metrics = json.loads((out / "metrics.json").read_text())
    row.update(
        epochs=len(metrics["epochs"]),
        val_objective=metrics["objective"],
        **{f"test_{k}": metrics["test"].get(k) for k in ("image_auroc", "pixel_auroc", "aupro")},
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="draem,nsa,ssae,cfa,ast")
    parser.add_argument("--categories", default="fabric,marble,screw,washer")
    parser.add_argument("--data", type=Path, help="dataset root (default: the built-in products, generated once)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--epochs", type=int, default=1000, help="upper bound; the time limit normally ends a run")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/quality"))
    args = parser.parse_args()
    if args.data is None:
        from automl_ad.data.builtin import ensure_builtin_root

        args.data = ensure_builtin_root()
    pairs = [(m, c) for c in args.categories.split(",") for m in args.methods.split(",")]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(lambda pair: run_one(*pair, args), pairs))

    def fmt(value):
        return "   -  " if value is None else f"{value:6.3f}"

    print(f"{'category':9} {'method':6} {'epochs':>6} {'val obj':>7} {'img AUROC':>9} {'px AUROC':>8} {'AUPRO':>6} {'wall s':>7}")
    for row in rows:
        if "error" in row:
            print(f"{row['category']:9} {row['method']:6} error: {row['error']}")
            continue
        print(f"{row['category']:9} {row['method']:6} {row['epochs']:6d} {fmt(row['val_objective']):>7} "
              f"{fmt(row['test_image_auroc']):>9} {fmt(row['test_pixel_auroc']):>8} {fmt(row['test_aupro']):>6} {row['wall_s']:7.0f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
