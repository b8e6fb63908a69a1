"""Scoring image files with a bundle: per-image score and decision, heat-map overlays.

Needs only the bundle folder (ONNX Runtime + JSON): no Ray, no training code. A file
that cannot be read gets an error row while the others are processed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from automl_ad.data.dataset import resize_image
from automl_ad.data.images import is_image_file, read_image
from automl_ad.errors import UserError
from automl_ad.deploy.export import Bundle


@dataclass
class Prediction:
    path: str
    score: float | None
    anomalous: bool | None
    error: str | None = None
    overlay: str | None = None


def _prepare(path: Path, size: int | tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(network input 3 x H x W float32 in [0, 1], the file's own pixels H0 x W0 x 3 uint8)."""
    image = read_image(path)
    return prepare_rgb(image, size)[0], image


def at_size(heat: np.ndarray, height: int, width: int) -> np.ndarray:
    """An anomaly map resized (bilinear) to ``height`` x ``width``, e.g. its image's own size."""
    import cv2

    if heat.shape == (height, width):
        return heat
    return cv2.resize(np.ascontiguousarray(heat, dtype=np.float32), (width, height), interpolation=cv2.INTER_LINEAR)


def prepare_rgb(image: np.ndarray, size: int | tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """An RGB uint8 image of any size as the bundle takes it, ``size`` being the bundle's
    (height, width) (or a square's side): (network input 3 x H x W float32 in [0, 1],
    display image H x W x 3 uint8). One path for files, PIL images and arrays, so each
    gives the same score."""
    resized = resize_image(image, size).numpy()  # 3 x H x W uint8
    return resized.astype(np.float32) / 255.0, resized.transpose(1, 2, 0)


def heat_overlay(image: np.ndarray, heat: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """A JET heat map blended over ``image`` (H x W x 3 uint8), ``heat`` scaled from
    ``value_range`` (low, high) to the colour map's ends."""
    import cv2

    low, high = value_range
    scaled = np.clip((heat - low) / max(high - low, 1e-6), 0, 1)
    colour = cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_JET)[:, :, ::-1]
    return np.ascontiguousarray((0.55 * image + 0.45 * colour).astype(np.uint8))


def overlay_png(image: np.ndarray, heat: np.ndarray, threshold_map: float | None, out: Path) -> None:
    """Write the heat overlay of one image; the map is scaled to its own robust range."""
    import cv2

    blended = heat_overlay(image, heat, (float(np.percentile(heat, 1)), float(np.percentile(heat, 99.5))))
    if threshold_map is not None:
        contour_mask = (heat >= threshold_map).astype(np.uint8)
        contours, _ = cv2.findContours(contour_mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        blended = np.ascontiguousarray(blended)
        cv2.drawContours(blended, contours, -1, (255, 255, 255), 1)
    tmp = out.with_name(f".{out.name}.tmp.png")
    cv2.imwrite(str(tmp), blended[:, :, ::-1])
    tmp.replace(out)


def predict_files(
    bundle: Bundle,
    paths: Sequence[Path],
    *,
    out_dir: Path | None = None,
    batch_size: int = 8,
) -> list[Prediction]:
    """Score every file in batches; unreadable files become error rows."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    size, threshold = bundle.shape, bundle.threshold
    results: dict[int, Prediction] = {}
    ready: list[tuple[int, np.ndarray, np.ndarray]] = []

    def flush() -> None:
        if not ready:
            return
        batch = np.stack([item[1] for item in ready])
        maps, scores = bundle.predictor.run(batch)
        for (index, _, original), heat, score in zip(ready, maps, scores):
            path = Path(paths[index])
            overlay = None
            if out_dir is not None:  # drawn over the file at its own size, not the network's
                overlay_path = out_dir / f"{index:04d}_{path.stem}_overlay.png"
                overlay_png(original, at_size(heat, *original.shape[:2]), None, overlay_path)
                overlay = str(overlay_path)
            results[index] = Prediction(str(path), float(score), bool(score >= threshold), None, overlay)
        ready.clear()

    for index, path in enumerate(paths):
        try:
            network_input, original = _prepare(Path(path), size)
        except UserError as error:
            results[index] = Prediction(str(path), None, None, str(error))
            continue
        ready.append((index, network_input, original if out_dir is not None else original[:1, :1]))
        if len(ready) == batch_size:
            flush()
    flush()
    return [results[i] for i in range(len(paths))]


def expand_inputs(inputs: Iterable[Path]) -> list[Path]:
    """Files as given, folders expanded to their image files (sorted)."""
    files: list[Path] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if is_image_file(p))
        else:
            files.append(item)
    return files
