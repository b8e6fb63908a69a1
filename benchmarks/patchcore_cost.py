"""Does PatchCore's ``estimated_work`` rank configurations by what they really cost?

The planner costs a sampled configuration as the calibrated default's seconds times
``estimated_work(config) / estimated_work(default)`` (tuning/sampled_costs.config_cost_factor).
This times ``setup`` on ``--fit`` images and the anomaly maps of ``--val`` images (one torch
thread, as a trial's worker), for configurations across the searched strides, coreset
ratios, backbones and sizes, and prints measured seconds, the estimate and their ratio
normalised to the default configuration at each size. A model that costs configurations
right keeps that ratio near 1 for every row.

    python benchmarks/patchcore_cost.py --fit 160 --val 200
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from automl_ad.deploy.report import write_atomic
from automl_ad.methods.base import create_method

CONFIGS = [
    {},
    {"feature_strides": "4+8"},
    {"feature_strides": "4+8+16"},
    {"coreset_ratio": 0.005},
    {"coreset_ratio": 0.05},
    {"feature_strides": "4+8", "coreset_ratio": 0.047},
    {"backbone": "efficientnet_lite2"},
    {"projection_dim": 32},
    {"reweight_neighbours": 27, "neighbourhood": 5},
]


def timed(params: dict, size: int, fit: int, val: int) -> dict:
    torch.manual_seed(0)
    method = create_method("patchcore", params, size, "bench")
    method.eval()
    fit_images = torch.rand(fit, 3, size, size)
    start = time.perf_counter()
    method.setup(fit_images)
    setup_s = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        for first in range(0, val, 16):
            method(torch.rand(min(16, val - first), 3, size, size))
    val_s = time.perf_counter() - start
    return {"setup_s": setup_s, "val_s": val_s, "measured_s": setup_s + val_s,
            "estimated": float(method.estimated_work(fit, val))}


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def _sizes(text: str) -> list[int]:
    sizes = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() and int(part) >= 32 for part in sizes):
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes >= 32 px, got {text!r}")
    return [int(part) for part in sizes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit", type=_positive, default=160, help="fit images for setup()")
    parser.add_argument("--val", type=_positive, default=200, help="images whose maps are timed")
    parser.add_argument("--sizes", type=_sizes, default=_sizes("128,256"), help="comma-separated image sizes")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    if args.out is not None and not args.out.parent.is_dir():
        parser.error(f"--out: folder {args.out.parent} does not exist")
    torch.set_num_threads(1)
    rows = []
    for size in args.sizes:
        reference = None
        for params in CONFIGS:
            row = {"size": size, "params": params, **timed(params, size, args.fit, args.val)}
            reference = reference or row
            row["ratio"] = (row["measured_s"] / reference["measured_s"]) / (row["estimated"] / reference["estimated"])
            rows.append(row)
            print(f"{size:4d} {json.dumps(params):55s} setup {row['setup_s']:7.1f} s  val {row['val_s']:6.1f} s  "
                  f"estimate {row['estimated']:7.1f}  measured/estimated vs default {row['ratio']:.2f}", flush=True)
    if args.out is not None:
        write_atomic(args.out, json.dumps(rows, indent=1))  # whole or not at all


if __name__ == "__main__":
    main()
