"""Deployable bundles: one graph (members + normalisation + fusion), a manifest, a loader.

A bundle folder holds
  model.onnx           the whole graph, input ``images`` N x 3 x S x S float in [0, 1],
                       outputs ``maps`` N x S x S and ``scores`` N (fused, normalised)
  model.torchscript.pt the same graph as TorchScript (optional format)
  manifest.json        methods, parameters, preprocessing, normalisation, threshold and
                       operating point, val/test metrics, data fingerprint, code version,
                       the bundle format version, and each file's size and SHA-256
Loading for prediction uses ONNX Runtime and JSON only: no pickle is executed, and
neither Ray nor the training code is needed.

This module owns the manifest format. :func:`load_bundle` checks a bundle before
anything runs: the format version (a newer one is refused, saying so), every file name
stays inside the bundle folder, every file has the recorded size and SHA-256, the
manifest itself is unchanged (``manifest_sha256`` over its other keys), and ONNX
Runtime accepts the graph with the expected inputs and outputs. Any failure is one
``UserError`` line; files written next to the bundle later (``report.html``) are not
part of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from automl_ad.data.tiling import graph_tiling
from automl_ad.deploy.progress import DeployProgress, resolve
from automl_ad.errors import UserError, writing
from automl_ad.jsonio import read_json
from automl_ad.results.store import code_version

MANIFEST = "manifest.json"
ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.torchscript.pt"
FORMATS = ("onnx", "torchscript")
BUNDLE_VERSION = 2  # 2: checksums and manifest_sha256 (1 had neither and is refused)
_HASH_CHUNK = 1 << 20
_GRAPH_INPUTS, _GRAPH_OUTPUTS = ["images"], ["maps", "scores"]


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
    progress: DeployProgress | None = None,
) -> dict[str, Any]:
    """Write the bundle atomically (temp folder, then rename) and check ONNX against
    PyTorch on ``example_images`` (real images): max |diff| of maps <= tolerance and the
    same decisions at the manifest's threshold. Returns the manifest as written.
    ``progress``: where each step is shown and timed (default: the running one, if any). A full
    disk is one OutOfSpace naming ``out``; the previous bundle there stays as it was."""
    with writing(out, "the bundle"):
        return _export_bundle(model, Path(out), image_size=image_size, manifest=manifest,
                              example_images=example_images, formats=formats, tolerance=tolerance,
                              progress=progress)


def _export_bundle(model: nn.Module, out: Path, *, image_size: int, manifest: dict[str, Any],
                   example_images: Tensor, formats: Sequence[str], tolerance: float,
                   progress: DeployProgress | None) -> dict[str, Any]:
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise UserError(f"unknown export format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    if "onnx" not in formats:
        raise UserError("the onnx format is required: predict runs bundles with ONNX Runtime")
    progress = resolve(progress)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        model = model.eval().cpu()
        example = example_images.float().cpu()
        with progress.step(f"export: PyTorch reference on {len(example)} images"):
            ref_maps, ref_scores = _check_traceable(model, example)
        # Check at the traced batch size, at batch 1 and at the next odd batch above it: a
        # shape or loop frozen during tracing would make the bundle wrong for other batch
        # sizes. Those batches repeat the traced images, so their reference is the same rows:
        # a deployed model scores each image on its own (predict batches unrelated files),
        # which running PyTorch again at each size would neither check nor need.
        rows = [i % len(example) for i in range(len(example) + 1 + len(example) % 2)]
        checks = [(example, ref_maps, ref_scores), (example[:1], ref_maps[:1], ref_scores[:1]),
                  (example[rows], ref_maps[rows], ref_scores[rows])]
        with progress.step("export: ONNX graph"), warnings.catch_warnings():
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
        with progress.step("export: ONNX Runtime session"):
            predictor = OnnxPredictor(staging / ONNX_FILE)
        threshold = manifest.get("operating_point", {}).get("threshold")
        max_diff, same_decisions = 0.0, True
        with progress.step(f"export: ONNX vs PyTorch at batches of {', '.join(str(len(c[0])) for c in checks)}",
                           total=len(checks)) as step:
            for images, maps_ref, scores_ref in checks:
                onnx_maps, onnx_scores = predictor.run(images.numpy())
                if onnx_maps.shape != tuple(maps_ref.shape) or onnx_scores.shape != tuple(scores_ref.shape):
                    raise RuntimeError(f"ONNX output at batch {len(images)} has shapes {onnx_maps.shape} and "
                                       f"{onnx_scores.shape}, PyTorch {tuple(maps_ref.shape)} and "
                                       f"{tuple(scores_ref.shape)}: a batch size frozen during tracing")
                # relative to the map's own magnitude: an ensemble's maps are z-scores that
                # reach the hundreds, where float32 kernels that differ in summation order
                # differ by 1e-4 (seen: 1.2e-4 on maps of a few hundred)
                scale = max(1.0, float(np.abs(maps_ref.numpy()).max()))
                max_diff = max(max_diff, float(np.abs(onnx_maps - maps_ref.numpy()).max()) / scale)
                if threshold is not None:
                    same_decisions &= bool(np.array_equal(onnx_scores >= threshold, scores_ref.numpy() >= threshold))
                step.advance()
        del predictor  # the session holds its own copy of every weight: free it before tracing again
        if max_diff > tolerance or not same_decisions:
            raise RuntimeError(
                f"ONNX output differs from PyTorch: max |map diff| / max |map| {max_diff:.2e} (tolerance {tolerance:.0e}), "
                f"same decisions: {same_decisions}"
            )
        files = {"onnx": ONNX_FILE}
        if "torchscript" in formats:
            with progress.step("export: TorchScript"):
                files["torchscript"] = _write_torchscript(model, example, ref_maps[:1], staging, tolerance)
        with progress.step("export: checksums"):
            checksums = {name: file_checksum(staging / name) for name in files.values()}
        full = {
            "bundle_version": BUNDLE_VERSION,
            "code_version": code_version(),
            **manifest,
            "preprocessing": {
                "image_size": image_size,  # the search's size (pixel budget)
                "height": int(example.shape[-2]),  # what every image is resized to
                "width": int(example.shape[-1]),
                "channels": "RGB (grayscale replicated, alpha dropped)",
                "resize": "bilinear (antialiased) to height x width (the part's aspect or a square: search --geometry)",
                "scale": "uint8 / 255 -> float32 in [0, 1]",
                "layout": "N x 3 x H x W",
                # None, or the tiles the graph cuts the resized image into and stitches back
                # (data.tiling): done inside the ONNX graph, nothing for the caller to do
                "tiling": graph_tiling(model),
            },
            "files": files,
            "checksums": checksums,
            "export_check": {"onnx_vs_torch_max_abs_map_diff": max_diff, "same_decisions": same_decisions},
        }
        full = json.loads(json.dumps(full, default=float))  # the manifest exactly as it reads back
        full["manifest_sha256"] = manifest_digest(full)
        (staging / MANIFEST).write_text(json.dumps(full, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
        return full
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_torchscript(model: nn.Module, example: Tensor, ref_maps_batch1: Tensor, staging: Path,
                       tolerance: float) -> str:
    """Trace at the export's batch size, check at batch 1 against PyTorch, save."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (example,), check_trace=False)
    with torch.no_grad():
        scale = max(1.0, float(ref_maps_batch1.abs().max()))  # relative, as the ONNX check
        script_diff = float((traced(example[:1])[0] - ref_maps_batch1).abs().max()) / scale
    if script_diff > tolerance:
        raise RuntimeError(f"TorchScript output differs from PyTorch at batch 1: {script_diff:.2e}")
    # Through a Python file: on a full disk, ScriptModule.save(path) aborts the whole
    # process from C++ (std::terminate); a file object gets OSError(ENOSPC).
    with open(staging / TORCHSCRIPT_FILE, "wb") as handle:
        torch.jit.save(traced, handle)
    return TORCHSCRIPT_FILE


def file_checksum(path: Path) -> dict[str, Any]:
    """``{"bytes": size, "sha256": hex}`` of a file, read in chunks (graphs can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return {"bytes": Path(path).stat().st_size, "sha256": digest.hexdigest()}


def manifest_digest(manifest: dict[str, Any]) -> str:
    """SHA-256 of the manifest's keys other than itself, in canonical JSON."""
    rest = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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
        """The search's size: the pixel budget the input shape was made for."""
        return int(self.manifest["preprocessing"]["image_size"])

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) every input image is resized to (a bundle written before
        non-square geometries: image_size x image_size)."""
        pre = self.manifest["preprocessing"]
        return int(pre.get("height", pre["image_size"])), int(pre.get("width", pre["image_size"]))

    @property
    def threshold(self) -> float:
        return float(self.manifest["operating_point"]["threshold"])


def _check_version(folder: Path, manifest: Any) -> None:
    version = manifest.get("bundle_version") if isinstance(manifest, dict) else None
    if isinstance(version, bool) or not isinstance(version, int):
        raise UserError(f"not a model bundle: {folder / MANIFEST} has no bundle_version")
    if version > BUNDLE_VERSION:
        raise UserError(f"bundle {folder} has format version {version}, newer than this automl-ad reads "
                        f"(up to {BUNDLE_VERSION}): upgrade automl-ad to run it")
    if version < BUNDLE_VERSION:
        raise UserError(f"bundle {folder} has format version {version}, which records no checksums: "
                        f"export it again with this automl-ad")


def _bundle_file(folder: Path, name: Any) -> Path:
    """``folder / name`` for a plain relative name that stays inside the bundle folder."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise UserError(f"bundle {folder}: manifest names file {name!r}, which is outside the bundle folder")
    path = folder / name
    if not path.resolve().is_relative_to(folder.resolve()):  # a symlink out of the folder
        raise UserError(f"bundle {folder}: file {name!r} points outside the bundle folder")
    return path


def _check_files(folder: Path, manifest: dict[str, Any]) -> None:
    files, checksums = manifest.get("files"), manifest.get("checksums")
    if not isinstance(files, dict) or "onnx" not in files or not isinstance(checksums, dict):
        raise UserError(f"bundle {folder}: {MANIFEST} lacks its files or checksums; export it again")
    for name in set(files.values()) | set(checksums):
        path = _bundle_file(folder, name)
        expected = checksums.get(name)
        if not isinstance(expected, dict):
            raise UserError(f"bundle {folder}: {MANIFEST} records no checksum for {name}")
        if not path.is_file():
            raise UserError(f"bundle {folder}: {name} is missing")
        found = file_checksum(path)
        if found["bytes"] != expected.get("bytes"):
            raise UserError(f"bundle {folder}: {name} is {found['bytes']} bytes, the manifest says "
                            f"{expected.get('bytes')} (truncated or replaced); export it again")
        if found["sha256"] != expected.get("sha256"):
            raise UserError(f"bundle {folder}: {name} was modified after export (SHA-256 differs from the manifest)")


def _check_fields(folder: Path, manifest: dict[str, Any]) -> None:
    size = (manifest.get("preprocessing") or {}).get("image_size")
    threshold = (manifest.get("operating_point") or {}).get("threshold")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise UserError(f"bundle {folder}: {MANIFEST} has no valid preprocessing.image_size")
    for side in ("height", "width"):
        value = manifest["preprocessing"].get(side, size)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"bundle {folder}: {MANIFEST} has no valid preprocessing.{side}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise UserError(f"bundle {folder}: {MANIFEST} has no numeric operating_point.threshold")


def verify_bundle(folder: Path) -> dict[str, Any]:
    """The manifest of a bundle that passed every check in the module doc (else UserError)."""
    folder = Path(folder)
    manifest = read_json(folder / MANIFEST, f"not a model bundle (no {MANIFEST}): {folder}")
    _check_version(folder, manifest)
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise UserError(f"bundle {folder}: {MANIFEST} was edited after export (its manifest_sha256 does not match)")
    _check_fields(folder, manifest)
    _check_files(folder, manifest)
    return manifest


def _open_graph(path: Path) -> OnnxPredictor:
    """ONNX Runtime session, or one line saying why the graph cannot run."""
    try:
        predictor = OnnxPredictor(path)
    except Exception as error:  # onnxruntime raises its own pybind classes (InvalidProtobuf, Fail, ...)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"bundle graph {path} cannot be loaded by ONNX Runtime: {reason[:200]}") from None
    inputs = [i.name for i in predictor.session.get_inputs()]
    outputs = [o.name for o in predictor.session.get_outputs()]
    if inputs != _GRAPH_INPUTS or sorted(outputs) != sorted(_GRAPH_OUTPUTS):
        raise UserError(f"bundle graph {path} takes {inputs} and gives {outputs}; expected "
                        f"{_GRAPH_INPUTS} -> {_GRAPH_OUTPUTS}: not an automl-ad model")
    return predictor


def load_bundle(folder: Path) -> Bundle:
    """A verified bundle ready to run (see the module doc for what is checked)."""
    folder = Path(folder)
    manifest = verify_bundle(folder)
    return Bundle(folder, manifest, _open_graph(_bundle_file(folder, manifest["files"]["onnx"])))
