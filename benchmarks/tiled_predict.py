"""Predict full-size images with an exported bundle, against the eager PyTorch model.

For each image: its own size, the bundle's input (the canvas of a tiled geometry), the map
and overlay sizes, the bundle's score (ONNX Runtime, what ``predict`` runs) and the eager
model's (the members rebuilt from their trial checkpoints, normalised and fused as the
manifest says, tiled by ``data.tiling`` in PyTorch), their difference, and the median
latency of one image (read + resize + graph) over ``--repeats`` runs for each (ONNX
Runtime at its default thread count, as ``predict`` runs it; PyTorch at one thread).

    python benchmarks/tiled_predict.py --bundle models/kolektor \\
        --experiment results/kolektor/<experiment> /work/data/kolektor/test/crack/*.png
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def eager_model(bundle, experiment: Path) -> torch.nn.Module:
    """The bundle's graph rebuilt in PyTorch from its members' trial checkpoints."""
    from automl_ad.deploy.ensemble import EnsembleModel, RobustScaler
    from automl_ad.results import store
    from automl_ad.training.loop import load_trained_method

    rows = {str(r["trial_id"]): r for r in store.read_table(experiment, store.TRIALS).to_pylist()}
    members, scalers, weights = [], [], []
    for member in bundle.manifest["members"]:
        method, _ = load_trained_method(Path(rows[member["trial_id"]]["checkpoint"]), bundle.manifest["category"])
        members.append(method)
        scalers.append(RobustScaler(**member["normalisation"]))
        weights.append(float(member["weight"]))
    return EnsembleModel(members, scalers, weights, fusion=bundle.manifest.get("fusion", "mean")).eval()


def timed_ms(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        run()
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--experiment", type=Path, required=True, help="the search's experiment folder")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from automl_ad.data.images import read_image
    from automl_ad.deploy.export import load_bundle
    from automl_ad.deploy.predict import at_size, prepare_rgb

    bundle = load_bundle(args.bundle)
    model = eager_model(bundle, args.experiment)
    pre = bundle.manifest["preprocessing"]
    print(f"bundle {args.bundle}: input {bundle.shape[0]}x{bundle.shape[1]} px, tiling {pre.get('tiling')}, "
          f"{len(bundle.manifest['members'])} member(s)")
    diffs = []
    for path in args.images:
        original = read_image(path)
        network_input = prepare_rgb(original, bundle.shape)[0][None]
        maps, scores = bundle.predictor.run(network_input)
        with torch.no_grad():
            eager_maps, eager_scores = model(torch.from_numpy(network_input))
        overlay = at_size(maps[0], *original.shape[:2])
        diff = abs(float(scores[0]) - float(eager_scores[0]))
        diffs.append(diff)
        onnx_ms = timed_ms(lambda: bundle.predictor.run(prepare_rgb(read_image(path), bundle.shape)[0][None]),
                           args.repeats)
        with torch.no_grad():
            eager_ms = timed_ms(lambda: model(torch.from_numpy(prepare_rgb(read_image(path), bundle.shape)[0][None])),
                                args.repeats)
        print(f"{path.name}: image {original.shape[0]}x{original.shape[1]}, map {maps.shape[1]}x{maps.shape[2]}, "
              f"overlay {overlay.shape[0]}x{overlay.shape[1]}; score onnx {float(scores[0]):.5f} eager "
              f"{float(eager_scores[0]):.5f} |diff| {diff:.2e} (max |map diff| "
              f"{float(np.abs(maps - eager_maps.numpy()).max()):.2e}); latency onnx {onnx_ms:.1f} ms, "
              f"eager {eager_ms:.1f} ms (read + resize + graph; ONNX Runtime at its default threads, this machine's "
              f"cores; PyTorch at 1 thread)", flush=True)
    print(f"max |score diff| onnx vs eager over {len(diffs)} images: {max(diffs):.2e}")


if __name__ == "__main__":
    main()
