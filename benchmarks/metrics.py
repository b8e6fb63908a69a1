"""Time the pixel metrics at MVTec-like size (default 100 maps of 256 x 256).

Prints seconds for pixel_auroc, aupro, both together through evaluate (one shared sort),
and sklearn's roc_auc_score on the same pixels as a reference, with the ratios.

    .venv/bin/python benchmarks/metrics.py [--images 100] [--size 256] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from sklearn.metrics import roc_auc_score

from automl_ad.evaluation.metrics import aupro, evaluate, pixel_auroc
from automl_ad.runtime import tune_cpu_allocator


def synthetic_evaluation_set(
    images: int, size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Half the images carry 1-4 rectangular defects of varied size; maps are noisy."""
    generator = torch.Generator().manual_seed(seed)
    masks = torch.zeros(images, 1, size, size, dtype=torch.uint8)
    for index in range(images // 2):
        for _ in range(int(torch.randint(1, 5, (1,), generator=generator))):
            height, width = torch.randint(2, size // 4, (2,), generator=generator).tolist()
            top = int(torch.randint(0, size - height, (1,), generator=generator))
            left = int(torch.randint(0, size - width, (1,), generator=generator))
            masks[index, 0, top : top + height, left : left + width] = 1
    maps = torch.rand(images, size, size, generator=generator) + 0.8 * masks[:, 0]
    labels = (masks.flatten(1).amax(1) > 0).long()
    scores = maps.flatten(1).amax(1)
    return scores, maps, labels, masks


def best_seconds(function: Callable[[], object], repeats: int, device: torch.device) -> float:
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tune_cpu_allocator()  # as the CLI and trial workers do

    device = torch.device(args.device)
    scores, maps, labels, masks = synthetic_evaluation_set(args.images, args.size, args.seed)
    maps_np, masks_np = maps.numpy().ravel(), masks.numpy().ravel()
    scores, maps, labels, masks = (t.to(device) for t in (scores, maps, labels, masks))

    pixel_auroc(maps, masks)  # warm-up (CUDA kernels, allocator)
    timings = {
        "pixel_auroc": best_seconds(lambda: pixel_auroc(maps, masks), args.repeats, device),
        "aupro": best_seconds(lambda: aupro(maps, masks), args.repeats, device),
        "evaluate (all metrics)": best_seconds(
            lambda: evaluate(scores, maps, labels, masks), args.repeats, device
        ),
    }
    timings["pixel_auroc + aupro"] = timings["pixel_auroc"] + timings["aupro"]
    reference = best_seconds(
        lambda: roc_auc_score(masks_np, maps_np), args.repeats, torch.device("cpu")
    )

    ours, theirs = pixel_auroc(maps, masks), roc_auc_score(masks_np, maps_np)
    print(
        f"{args.images} maps of {args.size}x{args.size} on {device} "
        f"(torch threads: {torch.get_num_threads()}), best of {args.repeats}"
    )
    print(f"pixel AUROC {ours:.6f} (sklearn {theirs:.6f}), AUPRO {aupro(maps, masks):.6f}")
    for name, seconds in timings.items():
        print(f"{name:24s} {seconds:7.3f} s   {seconds / reference:5.2f} x sklearn")
    print(f"{'sklearn roc_auc_score':24s} {reference:7.3f} s")


if __name__ == "__main__":
    main()
