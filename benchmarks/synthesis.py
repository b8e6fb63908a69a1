"""Throughput of the batched synthesis families against per-image references.

    .venv/bin/python benchmarks/synthesis.py [--device cuda] [--batch 32] [--size 256] [--repeats 5]
                                             [--category screw] [--json synthesis.json]

Per family: images/s of the batched torch synthesizer (batch --batch, --size px, RGB),
from the median and the best (min) of --repeats timed batches; the ratio uses medians.
The load average is printed before and after: the machine may be shared.
References, one image at a time as the original data loaders do, measured in the same
run on the CPU:
  perlin: numpy Perlin noise (lattice gradients, fade, lerp, as DRAEM's loader) rotated
          with cv2.warpAffine, thresholded, 3 random ops out of DRAEM's ten (numpy/cv2)
          on another image, blended with opacity beta;
  nsa:    a patch cut from another image, rescaled with cv2.resize, Poisson-blended
          with cv2.seamlessClone (NORMAL_CLONE) at a random location, NSA's logistic
          label computed.
For the ratio the batched family runs with SAME_WORK (the same amount of work as its
reference: other images as sources, one NSA patch); its default settings are timed too,
with ``--category`` those of that product (NSA: its patch sizes, patch count and, for
objects such as screw, the foreground test that keeps patches on the part).
Both sides run under automl_ad.runtime.tune_cpu_allocator, as the CLI and trial workers do.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import cv2
import numpy as np
import torch

from automl_ad.runtime import tune_cpu_allocator
from automl_ad.synthesis import FAMILIES, build_synthesizer


def numpy_perlin(shape: tuple[int, int], periods: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    height, width = shape
    ys = (np.arange(height) + 0.5) / height * periods[0]
    xs = (np.arange(width) + 0.5) / width * periods[1]
    ly, lx = np.meshgrid(ys, xs, indexing="ij")
    angles = rng.uniform(0, 2 * np.pi, (periods[0] + 1, periods[1] + 1))
    gy, gx = np.sin(angles), np.cos(angles)
    iy, ix = ly.astype(int), lx.astype(int)
    fy, fx = ly - iy, lx - ix

    def dot(oy: int, ox: int) -> np.ndarray:
        return gy[iy + oy, ix + ox] * (fy - oy) + gx[iy + oy, ix + ox] * (fx - ox)

    def fade(t: np.ndarray) -> np.ndarray:
        return t * t * t * (t * (t * 6 - 15) + 10)

    wy, wx = fade(fy), fade(fx)
    top = dot(0, 0) + wx * (dot(0, 1) - dot(0, 0))
    bottom = dot(1, 0) + wx * (dot(1, 1) - dot(1, 0))
    return math.sqrt(2) * (top + wy * (bottom - top))


def _np_sharpness(x: np.ndarray, factor: float) -> np.ndarray:
    smooth = cv2.filter2D(x, -1, _SMOOTH_KERNEL, borderType=cv2.BORDER_REPLICATE)
    return smooth + factor * (x - smooth)


def _np_hue_saturation(x: np.ndarray, hue: float, saturation: float) -> np.ndarray:
    hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV)  # float32: H in degrees, S and V in [0, 1]
    hsv[..., 0] = (hsv[..., 0] + hue * 360.0) % 360.0
    hsv[..., 1] = np.clip(hsv[..., 1] + saturation, 0, 1)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def _np_equalize(x: np.ndarray) -> np.ndarray:
    levels = (x * 255 + 0.5).astype(np.uint8)
    return np.dstack([cv2.equalizeHist(np.ascontiguousarray(levels[..., c])) for c in range(x.shape[2])]) / np.float32(255)


def _np_posterize(x: np.ndarray, bits: int) -> np.ndarray:
    step = 2 ** (8 - bits)
    return np.floor(x * 255 / step) * step / 255


_SMOOTH_KERNEL = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13


def _np_augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Three distinct ops out of DRAEM's ten (imgaug in the original loader), one image."""
    ops = [
        lambda x: np.power(x, rng.uniform(0.5, 2.0, size=(1, 1, x.shape[2]))),
        lambda x: x * rng.uniform(0.8, 1.2) + rng.uniform(-30, 30) / 255,
        lambda x: _np_sharpness(x, rng.uniform(0, 2)),
        lambda x: _np_hue_saturation(x, rng.uniform(-50, 50) / 255, rng.uniform(-50, 50) / 255),
        lambda x: np.where(x >= rng.uniform(32, 128) / 255, 1 - x, x) if rng.uniform() < 0.5 else x,
        lambda x: _np_posterize(x, int(rng.integers(1, 8))),
        lambda x: 1 - x,
        lambda x: (x - x.min(axis=(0, 1))) / np.maximum(x.max(axis=(0, 1)) - x.min(axis=(0, 1)), 1e-6),
        _np_equalize,
        lambda x: cv2.warpAffine(x, cv2.getRotationMatrix2D((x.shape[1] / 2, x.shape[0] / 2), rng.uniform(-45, 45), 1.0), (x.shape[1], x.shape[0]), borderMode=cv2.BORDER_REFLECT),
    ]
    for index in rng.choice(len(ops), 3, replace=False):
        image = np.clip(ops[index](image), 0, 1).astype(np.float32)
    return image


def reference_perlin(images: np.ndarray, rng: np.random.Generator) -> None:
    count, height, width, _ = images.shape
    for index in range(count):
        periods = (2 ** rng.integers(0, 6), 2 ** rng.integers(0, 6))
        noise = numpy_perlin((height, width), periods, rng).astype(np.float32)
        rotation = cv2.getRotationMatrix2D((width / 2, height / 2), rng.uniform(-90, 90), 1.0)
        noise = cv2.warpAffine(noise, rotation, (width, height))
        mask = (noise > 0.5).astype(np.float32)[..., None]
        source = _np_augment(images[(index + 1) % count], rng)
        beta = rng.uniform(0, 0.8)
        _ = (1 - mask) * images[index] + (1 - beta) * mask * source + beta * mask * images[index]


def reference_nsa(images: np.ndarray, rng: np.random.Generator) -> None:
    count, height, width, _ = images.shape
    for index in range(count):
        target, donor = images[index], images[(index + 1) % count]
        half_h = int(np.clip(0.03 + rng.gamma(2, 0.05), 0.03, 0.4) * height)
        half_w = int(np.clip(0.03 + rng.gamma(2, 0.05), 0.03, 0.4) * width)
        y, x = rng.integers(half_h, height - half_h), rng.integers(half_w, width - half_w)
        patch = donor[y - half_h : y + half_h, x - half_w : x + half_w]
        scale = float(np.clip(rng.normal(1, 0.5), 0.7, 1.3))
        scale = min(scale, (height - 8) / (2 * half_h), (width - 8) / (2 * half_w))
        patch = cv2.resize(patch, None, fx=scale, fy=scale)
        ph, pw = patch.shape[:2]
        cy = int(rng.integers(ph // 2 + 2, height - ph // 2 - 2))
        cx = int(rng.integers(pw // 2 + 2, width - pw // 2 - 2))
        mask = np.full(patch.shape[:2], 255, np.uint8)
        mask[[0, -1], :] = 0
        mask[:, [0, -1]] = 0
        blended = cv2.seamlessClone(patch, target, mask, (cx, cy), cv2.NORMAL_CLONE)
        # NSA's logistic label (k = 1/3, x0 = 7 grey levels); zero outside the rectangle,
        # so only its inside is computed
        top, left = cy - ph // 2 + 1, cx - pw // 2 + 1
        inside = (slice(top, top + ph - 2), slice(left, left + pw - 2))
        diff = np.abs(blended[inside].astype(np.float32) - target[inside]).mean(axis=2)
        label = np.zeros((height, width), np.float32)
        label[inside] = 1 / (1 + np.exp(-(diff - 7.0) / 3.0))


REFERENCES = {"perlin": reference_perlin, "nsa": reference_nsa}
# Settings under which the batched family does what its reference does: sources are
# other images of the batch (no generated noise textures), one NSA patch per image.
SAME_WORK = {"perlin": {"noise_share": 0.0}, "nsa": {"n_patches": 1}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--category", default=None, help="time the defaults of this product too (e.g. screw)")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()
    if min(args.batch, args.size, args.repeats) < 1:
        parser.error(f"--batch, --size and --repeats must be >= 1 (got {args.batch}, {args.size}, {args.repeats})")
    unknown = sorted(set(args.families.split(",")) - set(FAMILIES))
    if unknown:
        parser.error(f"unknown --families {', '.join(unknown)}; known: {', '.join(FAMILIES)}")
    tune_cpu_allocator()  # as the CLI and trial workers do; both sides run under it
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    cv2.setNumThreads(1)  # references run one image at a time, as in a loader worker
    device = torch.device(args.device)
    generator = torch.Generator(device).manual_seed(0)
    images = torch.rand(args.batch, 3, 8, 8, generator=generator, device=device)
    images = torch.nn.functional.interpolate(images, size=(args.size, args.size), mode="bilinear") * 0.7
    images = images + 0.3 * torch.rand(images.shape, generator=generator, device=device)
    host = images.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)
    host_u8 = (host * 255).astype(np.uint8)
    print(f"device {device}, torch threads {threads}, batch {args.batch}, {args.size}x{args.size} RGB, "
          f"load average {_load()}")
    print(f"{'family':15}{'batched img/s med (best)':>26}{'reference img/s med (best)':>28}{'ratio':>8}")
    rows: list[dict] = []
    for family in args.families.split(","):
        synth = build_synthesizer(family, {"normal_share": 0.0, **SAME_WORK.get(family, {})})
        synth(images, generator)  # warm-up

        def run_batched() -> None:
            synth(images, generator)
            if device.type == "cuda":
                torch.cuda.synchronize()

        median, best = _timed(run_batched, args.repeats)
        line = f"{family:15}{args.batch / median:18.1f} ({args.batch / best:6.1f})"
        row = {"family": family, "batched_img_s": args.batch / median}
        rows.append(row)
        if family in REFERENCES:
            rng = np.random.default_rng(0)
            data = host_u8 if family == "nsa" else host
            REFERENCES[family](data[:4], rng)  # warm-up
            ref_median, ref_best = _timed(lambda: REFERENCES[family](data, rng), args.repeats)
            line += f"{args.batch / ref_median:20.1f} ({args.batch / ref_best:6.1f}){ref_median / median:8.2f}"
            row.update(reference_img_s=args.batch / ref_median, ratio=ref_median / median)
        print(line, flush=True)
        if family in SAME_WORK:
            for category in (None, args.category) if args.category else (None,):
                default = build_synthesizer(family, {"normal_share": 0.0}, category=category)
                default(images, generator)
                median, best = _timed(lambda: (default(images, generator), device.type == "cuda" and torch.cuda.synchronize()), args.repeats)
                label = f"{family} {category or 'defaults'}"
                print(f"  {label:13}{args.batch / median:18.1f} ({args.batch / best:6.1f})", flush=True)
                row[f"{category or 'defaults'}_img_s"] = args.batch / median
    print(f"load average {_load()}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": str(device), "batch": args.batch, "size": args.size, "repeats": args.repeats,
                       "families": rows}, handle, indent=1)


def _timed(run, repeats: int) -> tuple[float, float]:
    """(median, min) seconds of ``repeats`` calls."""
    seconds = []
    for _ in range(repeats):
        began = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - began)
    return statistics.median(seconds), min(seconds)


def _load() -> str:
    try:
        with open("/proc/loadavg") as handle:
            return " ".join(handle.read().split()[:3])
    except OSError:
        return "n/a"


if __name__ == "__main__":
    main()
