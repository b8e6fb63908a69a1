"""Deployable bundles: one graph (members + normalisation + fusion), a manifest, a loader.

A bundle folder holds
  model.onnx           the whole graph, input ``images`` N x 3 x S x S float in [0, 1],
                       outputs ``maps`` N x S x S and ``scores`` N (fused, normalised)
  model.torchscript.pt the same graph as TorchScript (optional format)
  manifest.json        methods, parameters, preprocessing, normalisation, threshold and
                       operating point, val/test metrics, data fingerprint, code version
Loading for prediction uses ONNX Runtime and JSON only: no pickle is executed, and
neither Ray nor the training code is needed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from automl_ad import __version__
from automl_ad.errors import UserError
from automl_ad.jsonio import read_json

MANIFEST = "manifest.json"
ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.torchscript.pt"
FORMATS = ("onnx", "torchscript")
BUNDLE_VERSION = 1


def code_version() -> str:
    """Package version plus the git commit when run from a checkout."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+{commit}" if commit else __version__


def calibrate_threshold(scores: Tensor, labels: Tensor, *, fpr: float | None = None) -> dict[str, float]:
    """Operating point on val: F1-max with good and anomalous images weighted equally,
    or a target false-alarm rate on val-good (``fpr``)."""
    scores = scores.double()
    good = scores[labels == 0]
    if fpr is not None:
        if not 0.0 <= fpr < 1.0:
            raise UserError(f"--fpr must be in [0, 1), got {fpr}")
        if len(good) == 0:
            raise UserError("cannot calibrate a false-alarm rate without val-good images")
        # The lowest val score at which no more than `fpr` of val-good would alarm.
        candidates = torch.unique(scores)
        false_alarm = (good[None, :] >= candidates[:, None]).double().mean(dim=1)
        allowed = candidates[false_alarm <= fpr]
        threshold = float(allowed.min()) if len(allowed) else float(good.max()) + 1e-6
        rule = f"fpr<={fpr}"
    else:
        threshold = _balanced_f1_threshold(scores, labels)
        rule = "f1_max (val good and anomalies weighted equally)"
    # Put the threshold halfway to the next lower val score: the same val decisions, but a
    # 1e-6 difference between the ONNX and PyTorch scores can no longer flip one.
    below = scores[scores < threshold]
    if len(below):
        threshold = 0.5 * (threshold + float(below.max()))
    predicted = scores >= threshold
    positives = labels == 1
    tp = int((predicted & positives).sum())
    fp = int((predicted & ~positives).sum())
    return {
        "threshold": float(threshold),
        "rule": rule,
        "val_false_alarm_rate": fp / max(1, int((~positives).sum())),
        "val_recall": tp / max(1, int(positives.sum())),
    }


def _balanced_f1_threshold(scores: Tensor, labels: Tensor) -> float:
    """The threshold of the best F1 with good and anomalous val images weighted equally.

    Plain F1 depends on prevalence: val sets hold several synthetic anomalies per good
    image, so its optimum often flags everything. With equal class weights precision is
    TPR / (TPR + FPR), which stays honest about false alarms.
    """
    positives, negatives = labels == 1, labels == 0
    if not positives.any():
        raise UserError("cannot calibrate F1-max without val anomalies; pass --fpr to use val-good only")
    if not negatives.any():
        raise UserError("cannot calibrate a threshold without val-good images")
    candidates = torch.unique(scores)  # ascending
    flagged = scores[None, :] >= candidates[:, None]
    tpr = (flagged & positives).double().sum(dim=1) / positives.sum()
    fpr = (flagged & negatives).double().sum(dim=1) / negatives.sum()
    precision = tpr / (tpr + fpr).clamp_min(1e-12)
    f1 = 2 * precision * tpr / (precision + tpr).clamp_min(1e-12)
    best = torch.nonzero(f1 == f1.max()).max()  # ties: the highest threshold, fewest alarms
    return float(candidates[best])


def _check_traceable(model: nn.Module, example: Tensor) -> tuple[Tensor, Tensor]:
    model.eval()
    with torch.no_grad():
        maps, scores = model(example)
    if maps.dim() != 3 or scores.dim() != 1:
        raise RuntimeError(f"model must return maps N x H x W and scores N, got {tuple(maps.shape)} and {tuple(scores.shape)}")
    return maps, scores


def export_bundle(
    model: nn.Module,
    out: Path,
    *,
    image_size: int,
    manifest: dict[str, Any],
    example_images: Tensor,
    formats: Sequence[str] = FORMATS,
    tolerance: float = 1e-4,
) -> dict[str, Any]:
    """Write the bundle atomically (temp folder, then rename) and check ONNX against
    PyTorch on ``example_images`` (real images): max |diff| of maps <= tolerance and the
    same decisions at the manifest's threshold. Returns the manifest as written."""
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise UserError(f"unknown export format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    if "onnx" not in formats:
        raise UserError("the onnx format is required: predict runs bundles with ONNX Runtime")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        model = model.eval().cpu()
        example = example_images.float().cpu()
        ref_maps, ref_scores = _check_traceable(model, example)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (example,),
                str(staging / ONNX_FILE),
                dynamo=False,
                input_names=["images"],
                output_names=["maps", "scores"],
                dynamic_axes={"images": {0: "batch"}, "maps": {0: "batch"}, "scores": {0: "batch"}},
                opset_version=17,
            )
        # Check at the traced batch size, at batch 1 and at a larger odd batch: a shape or
        # loop frozen during tracing would make the bundle wrong for other batch sizes.
        predictor = OnnxPredictor(staging / ONNX_FILE)
        threshold = manifest.get("operating_point", {}).get("threshold")
        max_diff, same_decisions = 0.0, True
        larger = example.repeat(3, 1, 1, 1)[: 2 * len(example) + 1]
        checks = [(example, ref_maps, ref_scores), (example[:1], *_check_traceable(model, example[:1])),
                  (larger, *_check_traceable(model, larger))]
        for images, maps_ref, scores_ref in checks:
            onnx_maps, onnx_scores = predictor.run(images.numpy())
            max_diff = max(max_diff, float(np.abs(onnx_maps - maps_ref.numpy()).max()))
            if threshold is not None:
                same_decisions &= bool(np.array_equal(onnx_scores >= threshold, scores_ref.numpy() >= threshold))
        if max_diff > tolerance or not same_decisions:
            raise RuntimeError(
                f"ONNX output differs from PyTorch: max |map diff| {max_diff:.2e} (tolerance {tolerance:.0e}), "
                f"same decisions: {same_decisions}"
            )
        files = {"onnx": ONNX_FILE}
        if "torchscript" in formats:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(model, (example,), check_trace=False)
            with torch.no_grad():
                script_diff = float((traced(example[:1])[0] - ref_maps[:1]).abs().max())
            if script_diff > tolerance:
                raise RuntimeError(f"TorchScript output differs from PyTorch at batch 1: {script_diff:.2e}")
            traced.save(str(staging / TORCHSCRIPT_FILE))
            files["torchscript"] = TORCHSCRIPT_FILE
        full = {
            "bundle_version": BUNDLE_VERSION,
            "code_version": code_version(),
            **manifest,
            "preprocessing": {
                "image_size": image_size,
                "channels": "RGB (grayscale replicated, alpha dropped)",
                "resize": "bilinear (antialiased) to image_size x image_size",
                "scale": "uint8 / 255 -> float32 in [0, 1]",
                "layout": "N x 3 x H x W",
            },
            "files": files,
            "export_check": {"onnx_vs_torch_max_abs_map_diff": max_diff, "same_decisions": same_decisions},
        }
        (staging / MANIFEST).write_text(json.dumps(full, indent=2, default=float))
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
        return full
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


class OnnxPredictor:
    """ONNX Runtime session over a bundle's graph (no pickle, no torch needed)."""

    def __init__(self, onnx_path: Path, providers: Sequence[str] | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(
            str(onnx_path), sess_options=options, providers=list(providers or ["CPUExecutionProvider"])
        )

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps, scores = self.session.run(["maps", "scores"], {"images": images.astype(np.float32, copy=False)})
        return maps, scores


@dataclass
class Bundle:
    folder: Path
    manifest: dict[str, Any]
    predictor: OnnxPredictor

    @property
    def image_size(self) -> int:
        return int(self.manifest["preprocessing"]["image_size"])

    @property
    def threshold(self) -> float:
        return float(self.manifest["operating_point"]["threshold"])


def load_bundle(folder: Path) -> Bundle:
    folder = Path(folder)
    manifest = read_json(folder / MANIFEST, f"not a model bundle (no {MANIFEST}): {folder}")
    onnx_path = folder / manifest.get("files", {}).get("onnx", ONNX_FILE)
    if not onnx_path.is_file():
        raise UserError(f"bundle has no ONNX graph: {onnx_path}")
    return Bundle(folder, manifest, OnnxPredictor(onnx_path))
