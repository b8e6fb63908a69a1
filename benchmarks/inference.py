"""Inference throughput of deployable bundles: PyTorch eager vs ONNX Runtime vs TorchScript.

For each method (default configuration, untrained weights: speed does not depend on
training) a single-member bundle is exported exactly as `automl-ad export` does, then
images/s at --image-size are measured for the three runtimes on the same inputs.

    python benchmarks/inference.py                       # CPU, all methods, 256 px
    python benchmarks/inference.py --device cuda         # eager/TorchScript on GPU, ORT with CUDA EP if present
    python benchmarks/inference.py --device cuda --methods draem --json inference.json

On CUDA, ONNX Runtime is timed only with its CUDA execution provider: without one (the
``onnxruntime`` wheel is CPU only; ``onnxruntime-gpu`` has it) the row says so in
``onnxruntime_skipped`` instead of timing the CPU fallback as if it were the GPU. Any
other failure of a runtime is the row's ``*_error``; ``--json`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from automl_ad.runtime import tune_cpu_allocator


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return float(np.median(times))


def bench_model(name: str, model: torch.nn.Module, folder: Path, size: int, batch: int, repeats: int, device: str) -> dict:
    from automl_ad.deploy.export import OnnxPredictor

    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    row = {"model": name, "batch": batch, "image_size": size, "device": device}
    model = model.eval().to(device)
    on_device = images.to(device)

    def eager():
        with torch.no_grad():
            model(on_device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    row["eager_img_s"] = batch / _time(eager, repeats)
    scripted = torch.jit.load(str(folder / "model.torchscript.pt"), map_location=device)

    def torchscript():
        with torch.no_grad():
            scripted(on_device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    try:  # traced graphs keep constants (e.g. filter kernels) on the device they were traced on
        row["torchscript_img_s"] = batch / _time(torchscript, repeats)
    except RuntimeError as error:
        row["torchscript_error"] = str(error).strip().splitlines()[-1]
    import onnxruntime

    available = onnxruntime.get_available_providers()
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else ["CPUExecutionProvider"]
    if providers[0] not in available:
        row["onnxruntime_skipped"] = (f"onnxruntime {providers[0].replace('ExecutionProvider', '')} provider not "
                                      f"installed (onnxruntime {onnxruntime.__version__} has {', '.join(available)})")
    else:
        try:
            predictor = OnnxPredictor(folder / "model.onnx", providers=providers)
            array = images.numpy()
            row["onnxruntime_img_s"] = batch / _time(lambda: predictor.run(array), repeats)
            row["onnxruntime_provider"] = predictor.session.get_providers()[0]
            if row["onnxruntime_provider"] != providers[0]:
                row["onnxruntime_error"] = f"ran on {row['onnxruntime_provider']}, not {providers[0]}"
        except Exception as error:
            row["onnxruntime_error"] = f"{type(error).__name__}: {error}"
    row["ort_vs_eager"] = row.get("onnxruntime_img_s", float("nan")) / row["eager_img_s"]
    row["torchscript_vs_eager"] = row.get("torchscript_img_s", float("nan")) / row["eager_img_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="draem,nsa,ssae,cfa,ast,patchcore")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args()
    tune_cpu_allocator()  # as the CLI and trial workers do
    if args.threads:
        torch.set_num_threads(args.threads)

    from automl_ad.deploy.ensemble import EnsembleModel, RobustScaler
    from automl_ad.deploy.export import export_bundle
    from automl_ad.methods import create_method

    rows = []
    for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
        torch.manual_seed(0)
        method = create_method(name, {}, args.image_size, "screw")
        with torch.no_grad():  # memory banks (CFA) need fit images; random ones do for timing
            method.setup(torch.rand(4, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(2)))
        model = EnsembleModel([method], [RobustScaler(0.0, 1.0, 0.0, 1.0)], [1.0])
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "bundle"
            example = torch.rand(2, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(1))
            export_bundle(model, folder, image_size=args.image_size, manifest={"operating_point": {"threshold": 0.0}}, example_images=example, tolerance=1e-3)
            row = bench_model(name, model, folder, args.image_size, args.batch_size, args.repeats, args.device)
        rows.append(row)
        print(
            f"{name:6} eager {row['eager_img_s']:8.1f} img/s | onnxruntime {row.get('onnxruntime_img_s', float('nan')):8.1f} img/s "
            f"({row['ort_vs_eager']:.2f}x) | torchscript {row.get('torchscript_img_s', float('nan')):8.1f} img/s ({row['torchscript_vs_eager']:.2f}x)",
            flush=True,
        )
    print(json.dumps(rows, indent=1))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
