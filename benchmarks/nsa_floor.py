"""What a batched NSA step cannot go below on this machine, next to its per-image reference.

    .venv/bin/python benchmarks/nsa_floor.py [--batch 32] [--size 256] [--patch 67] [--repeats 20]

Prints, measured in one process (medians of --repeats):
  reference   cv2.seamlessClone of one --patch px patch into a --size px image (one
              thread, as in a loader worker): the per-image Poisson step of NSA's loader;
  copy        copying the batch (every synthesizer returns a new batch);
  dst matmul  the Poisson solve of --batch patches of --patch px x 3 channels as DST-I
              matrix products, exactly sized (no padding): the solve ``poisson.py`` uses;
  dst rfft    the same solve by torch's real FFT (odd extension), for comparison;
and the per-batch budget a 10x speed-up over the full per-image reference of
``benchmarks/synthesis.py`` leaves (pass that reference's images/s with --reference).
The solve and the copy alone are a floor for any batched torch implementation; the
patch sizes NSA draws are heavy-tailed, so real batches cost more than --patch suggests.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import cv2
import numpy as np
import torch

from automl_ad.runtime import tune_cpu_allocator


def _median_ms(run, repeats: int) -> float:
    run()
    seconds = []
    for _ in range(repeats):
        began = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - began)
    return 1000 * statistics.median(seconds)


def _dst_by_rfft(planes: torch.Tensor) -> torch.Tensor:
    """DST-I along the last axis via the real FFT of the odd extension."""
    size = planes.shape[-1]
    zero = planes.new_zeros(*planes.shape[:-1], 1)
    extended = torch.cat((zero, planes, zero, -planes.flip(-1)), -1)
    return -torch.fft.rfft(extended, dim=-1).imag[..., 1 : size + 1] / 2.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--patch", type=int, default=67, help="patch side in px (NSA's mean draw at 256 px: about 67)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--reference", type=float, default=None, help="per-image reference images/s from synthesis.py")
    args = parser.parse_args()
    if min(args.batch, args.repeats) < 1 or not 3 <= args.patch <= args.size - 4:
        parser.error(f"need --batch, --repeats >= 1 and 3 <= --patch <= --size - 4 (got {args.batch}, {args.repeats}, {args.patch}, {args.size})")
    if args.reference is not None and args.reference <= 0:
        parser.error(f"--reference must be images/s > 0, got {args.reference}")
    tune_cpu_allocator()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    cv2.setNumThreads(1)
    rng = np.random.default_rng(0)
    target = (rng.random((args.size, args.size, 3)) * 255).astype(np.uint8)
    patch = (rng.random((args.patch, args.patch, 3)) * 255).astype(np.uint8)
    mask = np.full((args.patch, args.patch), 255, np.uint8)
    mask[[0, -1], :] = 0
    mask[:, [0, -1]] = 0
    centre = (args.size // 2, args.size // 2)
    clone_ms = _median_ms(lambda: cv2.seamlessClone(patch, target, mask, centre, cv2.NORMAL_CLONE), args.repeats)

    images = torch.rand(args.batch, 3, args.size, args.size)
    copy_ms = _median_ms(lambda: images.clone(), args.repeats)
    n = args.patch
    planes = torch.rand(args.batch * 3, n, n)
    k = torch.arange(1, n + 1, dtype=torch.float64)
    sine = torch.sin(math.pi * k[:, None] * k[None, :] / (n + 1)).float()
    eigen = 2 - 2 * torch.cos(math.pi * k.float() / (n + 1))
    eigen = eigen[:, None] + eigen[None, :]
    matmul_ms = _median_ms(lambda: sine @ ((sine @ planes @ sine) / eigen) @ sine, args.repeats)

    def rfft_solve() -> torch.Tensor:
        spectrum = _dst_by_rfft(_dst_by_rfft(planes).transpose(-1, -2)).transpose(-1, -2) / eigen
        return _dst_by_rfft(_dst_by_rfft(spectrum).transpose(-1, -2)).transpose(-1, -2)

    rfft_ms = _median_ms(rfft_solve, args.repeats)
    print(f"torch threads {torch.get_num_threads()}, batch {args.batch}, {args.size} px images, {n} px patches x 3 channels")
    print(f"reference  cv2.seamlessClone         {clone_ms:7.3f} ms per image")
    print(f"copy       batch clone               {copy_ms:7.2f} ms per batch")
    print(f"dst matmul exact-size solve          {matmul_ms:7.2f} ms per batch")
    print(f"dst rfft   exact-size solve          {rfft_ms:7.2f} ms per batch")
    print(f"floor      copy + matmul solve       {copy_ms + matmul_ms:7.2f} ms per batch "
          f"= {(copy_ms + matmul_ms) / args.batch:.3f} ms per image")
    if args.reference is not None:
        budget = args.batch / args.reference / 10 * 1000
        print(f"10x over the {args.reference:.0f} img/s reference leaves {budget:.2f} ms per batch "
              f"({budget - copy_ms - matmul_ms:+.2f} ms after the floor)")


if __name__ == "__main__":
    main()
