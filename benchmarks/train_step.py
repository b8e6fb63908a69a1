"""Milliseconds per training step of every registered method (default Configs).

    .venv/bin/python benchmarks/train_step.py                      # 256 px, batch 8, CPU
    .venv/bin/python benchmarks/train_step.py --device cuda --steps 20
    .venv/bin/python benchmarks/train_step.py --methods draem,nsa --image-size 128
    .venv/bin/python benchmarks/train_step.py --device cuda --precisions fp32,bf16 --json steps.json

Each method gets random images in [0, 1] with a random square as the synthetic mask
(the timing does not depend on the synthesis family), is set up on a few random images
when it needs ``setup`` (memory banks), and runs ``--warmup`` untimed steps before
``--steps`` timed ones (forward, backward, optimizer and scheduler step). Multi-phase
methods are timed in every phase. When ``anomalib`` imports, its DraemModel is timed on
the same shapes as a reference; otherwise that line says it was skipped.

``--precisions`` times each method once per precision, the step taking the training
loop's speed path (``automl_ad/training/precision.py``: autocast to that dtype, fp16 with
its GradScaler, channels_last per the method's switch and cudnn.benchmark on CUDA; auto =
what a trial runs). Steps/s and, on CUDA, the peak memory of each go to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from automl_ad.methods import Batch, available_methods, create_method, get_method_class  # noqa: E402
from automl_ad.runtime import tune_cpu_allocator  # noqa: E402
from automl_ad.training.precision import PRECISIONS, SpeedPath, cuda_backends  # noqa: E402


def random_batch(batch_size: int, size: int, device: torch.device, generator: torch.Generator) -> Batch:
    clean = torch.rand(batch_size, 3, size, size, generator=generator, device=device)
    images = clean.clone()
    masks = torch.zeros(batch_size, 1, size, size, device=device)
    side = max(1, size // 6)
    images[: batch_size // 2, :, :side, :side] = 1.0
    masks[: batch_size // 2, :, :side, :side] = 1.0
    labels = (torch.arange(batch_size, device=device) < batch_size // 2).float()
    return Batch(images=images, clean=clean, masks=masks, labels=labels)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], steps: int, warmup: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        step()
        synchronize(device)
        times.append((time.perf_counter() - began) * 1000.0)
    return times


def bench_method(name: str, args: argparse.Namespace, device: torch.device,
                 precision: str = "fp32") -> list[tuple[str, list[float]]]:
    torch.manual_seed(0)
    generator = torch.Generator(device=device).manual_seed(0)
    method = create_method(name, {}, args.image_size, "benchmark").to(device)
    setup_images = torch.rand(args.setup_images, 3, args.image_size, args.image_size, generator=generator, device=device)
    method.setup(setup_images)
    speed = SpeedPath.resolve(precision, get_method_class(name), device)
    speed.prepare(method)
    batch = speed.batch(random_batch(args.batch_size, args.image_size, device, generator))
    scaler = speed.grad_scaler()
    results = []
    for phase in method.phases:
        optimizer, scheduler = method.configure_optimizer(phase, args.steps + args.warmup)
        method.train()

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with speed.autocast():
                loss = method.training_step(batch, phase)["loss"]
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            if scheduler is not None:
                scheduler.step()

        label = name if len(method.phases) == 1 else f"{name}/{phase}"
        with cuda_backends(device):
            results.append((label, time_steps(step, args.steps, args.warmup, device)))
    return results


def bench_anomalib_draem(args: argparse.Namespace, device: torch.device) -> list[float] | None:
    """anomalib's DraemModel with DRAEM's loss terms (L2 + SSIM + focal) on our shapes."""
    try:
        from anomalib.models.image.draem.torch_model import DraemModel
    except ImportError:
        return None
    from automl_ad.methods._layers import focal_loss, ssim_loss

    torch.manual_seed(0)
    generator = torch.Generator(device=device).manual_seed(0)
    model = DraemModel().to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    batch = random_batch(args.batch_size, args.image_size, device, generator)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        reconstruction, logits = model(batch.images)
        probabilities = logits.softmax(dim=1)
        target = torch.cat([1 - batch.masks, batch.masks], dim=1)
        loss = (
            torch.nn.functional.mse_loss(reconstruction, batch.clean)
            + ssim_loss(reconstruction, batch.clean)
            + focal_loss(probabilities, target)
        )
        loss.backward()
        optimizer.step()

    return time_steps(step, args.steps, args.warmup, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--setup-images", type=int, default=4)
    parser.add_argument("--methods", default="", help="comma-separated subset (default: all registered)")
    parser.add_argument("--precisions", default="fp32",
                        help=f"comma-separated, each of {', '.join(PRECISIONS)} (auto: what a trial runs)")
    parser.add_argument("--json", help="also write every row (steps/s, peak memory on CUDA) to this file")
    parser.add_argument("--no-reference", action="store_true", help="skip the anomalib DRAEM reference")
    args = parser.parse_args()
    precisions = [p for p in args.precisions.split(",") if p]
    unknown = sorted(set(precisions) - set(PRECISIONS))
    if unknown:
        parser.error(f"unknown --precisions {', '.join(unknown)}; known: {', '.join(PRECISIONS)}")
    tune_cpu_allocator()  # as the CLI and trial workers do
    device = torch.device(args.device)
    names = [n for n in args.methods.split(",") if n] or available_methods()
    print(
        f"train step, {args.image_size} px, batch {args.batch_size}, device {device}, "
        f"{args.steps} timed steps after {args.warmup} warm-up, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"{'method':<16}{'precision':>10}{'params (M)':>12}{'median ms':>12}{'min ms':>10}{'max ms':>10}"
          f"{'steps/s':>9}{'peak MiB':>10}")
    records: list[dict] = []
    for name in names:
        for precision in precisions:
            speed = SpeedPath.resolve(precision, get_method_class(name), device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            try:
                rows = bench_method(name, args, device, precision)
            except Exception as error:  # one broken method must not hide the others' numbers
                print(f"{name:<16}{precision:>10}  failed: {type(error).__name__}: {error}")
                records.append({"method": name, "precision": precision, "error": f"{type(error).__name__}: {error}"})
                continue
            peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
            torch.manual_seed(0)
            params = sum(p.numel() for p in create_method(name, {}, args.image_size, "benchmark").parameters()) / 1e6
            for label, times in rows:
                median = statistics.median(times)
                print(f"{label:<16}{precision:>10}{params:>12.2f}{median:>12.1f}{min(times):>10.1f}{max(times):>10.1f}"
                      f"{1000.0 / median:>9.2f}{peak if peak is not None else float('nan'):>10.0f}")
                records.append({"method": name, "step": label, "precision": precision, "dtype": speed.dtype,
                                "channels_last": speed.channels_last, "params_m": params, "median_ms": median,
                                "min_ms": min(times), "steps_per_s": 1000.0 / median, "peak_memory_mib": peak})
    if args.json:
        Path(args.json).write_text(json.dumps({
            "image_size": args.image_size, "batch_size": args.batch_size, "device": str(device),
            "steps": args.steps, "warmup": args.warmup, "rows": records}, indent=1))
    if "draem" in names and not args.no_reference:
        reference = bench_anomalib_draem(args, device)
        if reference is None:
            print("anomalib DraemModel: skipped (anomalib is not installed)")
        else:
            print(
                f"{'anomalib draem':<16}{'':>12}{statistics.median(reference):>12.1f}"
                f"{min(reference):>10.1f}{max(reference):>10.1f}"
            )


if __name__ == "__main__":
    main()
