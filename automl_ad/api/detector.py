"""A deployable bundle in Python: ``load`` it once, ``predict`` on files, PIL images or arrays.

Why here and not in ``deploy``: a notebook user holds images in every form (paths from a
glob, PIL images from a camera SDK, numpy arrays from OpenCV after ``cv2.cvtColor``); the
bundle's ONNX graph takes one fixed tensor. :class:`Detector` turns each of those into
that tensor by the one rule ``automl-ad predict`` uses for files (``data.images`` decode,
``deploy.predict.prepare_rgb`` resize), so a file, the PIL image opened from it and its
pixel array score the same. Needs only the bundle (ONNX Runtime): no Ray, no training.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence, Union

import numpy as np

from automl_ad.errors import UserError

if TYPE_CHECKING:
    import pandas as pd
    from PIL import Image

    from automl_ad.deploy.export import Bundle
    from automl_ad.deploy.predict import Prediction

# What ``Detector.predict`` scores: a path, an opened PIL image, or RGB pixels
# (H x W x 3 or H x W; uint8 0-255 or float 0-1); a 4-d array is a batch of them.
ImageLike = Union[str, os.PathLike, "Image.Image", np.ndarray]


@dataclass(frozen=True)
class Predictions:
    """What a bundle says about a batch of images, one entry per input, in input order."""

    scores: np.ndarray  # (N,) float32 image anomaly score (the bundle's normalised scale)
    anomalous: np.ndarray  # (N,) bool decision: score >= threshold
    maps: np.ndarray  # (N, S, S) float32 anomaly map at the bundle's input size S
    images: np.ndarray  # (N, S, S, 3) uint8 RGB: each input as the model saw it
    threshold: float  # the bundle's operating point (manifest.json)
    sources: list[str]  # the path, or "PIL image #i" / "array #i"

    def __len__(self) -> int:
        return len(self.scores)

    def overlay(self, index: int, value_range: tuple[float, float] | None = None) -> np.ndarray:
        """Heat map of input ``index`` blended over it (S x S x 3 uint8, JET colours, as
        ``automl-ad predict --out`` draws). ``value_range``: the map values at the colour
        map's two ends; default: this map's 1st and 99.5th percentiles."""
        from automl_ad.deploy.predict import heat_overlay

        heat = self.maps[index]
        if value_range is None:
            value_range = (float(np.percentile(heat, 1)), float(np.percentile(heat, 99.5)))
        return heat_overlay(self.images[index], heat, value_range)

    def to_frame(self) -> "pd.DataFrame":
        """One row per input: source, score, anomalous."""
        import pandas as pd

        return pd.DataFrame({"source": self.sources, "score": self.scores.astype(float),
                             "anomalous": self.anomalous.astype(bool)})


class Detector:
    """A verified bundle (checksums, format version and graph checked on load), ready to score.

    ``predict`` raises on an unreadable input (a notebook wants to know at once);
    ``predict_files`` is the command line's behaviour, one error row per bad file and the
    rest scored.
    """

    def __init__(self, bundle: "Bundle") -> None:
        self.bundle = bundle

    @property
    def folder(self) -> Path:
        return self.bundle.folder

    @property
    def manifest(self) -> dict[str, Any]:
        """The bundle's manifest.json: members, operating point, val and test metrics."""
        return self.bundle.manifest

    @property
    def image_size(self) -> int:
        """The search's size (pixel budget) the bundle was made at."""
        return self.bundle.image_size

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) every input is resized to before the graph runs."""
        return self.bundle.shape

    @property
    def threshold(self) -> float:
        return self.bundle.threshold

    @property
    def category(self) -> str | None:
        return self.manifest.get("category")

    @property
    def kind(self) -> str | None:
        """"ensemble" or "single"."""
        return self.manifest.get("kind")

    def __repr__(self) -> str:
        members = ", ".join(f"{m.get('method')}:{m.get('trial_id')}" for m in self.manifest.get("members", []))
        return (f"Detector({str(self.folder)!r}, category={self.category!r}, {self.kind} [{members}], "
                f"shape={self.shape}, threshold={self.threshold:.4f})")

    def predict(self, images: ImageLike | Sequence[ImageLike], *, batch_size: int = 8) -> Predictions:
        """Scores, decisions and anomaly maps of ``images``: one path, PIL image or array,
        or a sequence of them (mixed forms are fine), or an N x H x W x C array."""
        from automl_ad.deploy.predict import prepare_rgb

        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        items = _as_items(images)
        if not items:
            raise UserError("no images given to predict")
        inputs, displays, sources = [], [], []
        for index, item in enumerate(items):
            rgb, source = _as_rgb(item, index)
            network_input, display = prepare_rgb(rgb, self.shape)
            inputs.append(network_input)
            displays.append(display)
            sources.append(source)
        maps, scores = [], []
        for start in range(0, len(inputs), batch_size):
            batch_maps, batch_scores = self.bundle.predictor.run(np.stack(inputs[start:start + batch_size]))
            maps.append(batch_maps)
            scores.append(batch_scores)
        all_scores = np.concatenate(scores).astype(np.float32).reshape(-1)
        return Predictions(scores=all_scores, anomalous=all_scores >= self.threshold,
                           maps=np.concatenate(maps).astype(np.float32), images=np.stack(displays),
                           threshold=self.threshold, sources=sources)

    def predict_files(self, paths: Iterable[str | os.PathLike], *, out_dir: str | os.PathLike | None = None,
                      batch_size: int = 8) -> list["Prediction"]:
        """Score image files and the image files in folders (sorted); a file that cannot be
        read becomes a row with its ``error`` while the rest are scored. ``out_dir``: write
        each heat-map overlay there as a PNG (the row names it)."""
        from automl_ad.deploy.predict import expand_inputs, predict_files

        files = expand_inputs(Path(p) for p in paths)
        if not files:
            raise UserError("no image files given")
        return predict_files(self.bundle, files, out_dir=Path(out_dir) if out_dir is not None else None,
                             batch_size=batch_size)


def load(bundle_dir: str | os.PathLike) -> Detector:
    """The bundle in ``bundle_dir`` (``automl-ad export``'s or a search's ``models/<category>``),
    verified before anything runs: a truncated, modified or foreign file is a UserError."""
    from automl_ad.deploy.export import load_bundle

    return Detector(load_bundle(Path(bundle_dir)))


def _as_items(images: Any) -> list[Any]:
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    if isinstance(images, (str, os.PathLike)) or _is_pil(images):
        return [images]
    if isinstance(images, (list, tuple)):
        return list(images)
    raise UserError(f"cannot score an object of type {type(images).__name__}: give a path, a PIL image, "
                    "a numpy array (H x W x 3 RGB) or a list of them")


def _is_pil(item: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        return False
    return isinstance(item, Image.Image)


def _as_rgb(item: Any, index: int) -> tuple[np.ndarray, str]:
    """(H x W x 3 uint8 RGB, a name for it) by the rules of ``data.images``."""
    from automl_ad.data.images import read_image, rgb_array

    if isinstance(item, (str, os.PathLike)):
        return read_image(Path(item)), str(item)
    if _is_pil(item):
        name = f"PIL image #{index}"
        return rgb_array(item, name), name
    if isinstance(item, np.ndarray):
        name = f"array #{index}"
        return array_to_rgb(item, name), name
    raise UserError(f"input #{index}: cannot score an object of type {type(item).__name__}: give a path, "
                    "a PIL image or a numpy array (H x W x 3 RGB)")


def array_to_rgb(array: np.ndarray, name: str = "array") -> np.ndarray:
    """RGB pixels as H x W x 3 uint8: H x W (grey) or H x W x 1/3/4 (alpha dropped, as for
    files); uint8 as is, float in [0, 1] scaled to 0-255. Channels first, other dtypes,
    out-of-range floats and empty arrays are refused rather than guessed at."""
    if array.ndim == 3 and array.shape[-1] not in (1, 3, 4):
        hint = " (channels first? use array.transpose(1, 2, 0))" if array.shape[0] in (1, 3, 4) else ""
        raise UserError(f"{name}: shape {array.shape} is not H x W x 3{hint}")
    if array.ndim not in (2, 3) or array.shape[0] == 0 or array.shape[1] == 0:
        raise UserError(f"{name}: shape {array.shape}; give H x W x 3 (RGB) or H x W (grey)")
    if array.dtype == np.uint8:
        pixels = array
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
            raise UserError(f"{name}: float pixels must be finite and in [0, 1] "
                            f"(found {np.nanmin(array):.3g} to {np.nanmax(array):.3g}); or give uint8 0-255")
        pixels = np.rint(array * 255.0).astype(np.uint8)
    else:
        raise UserError(f"{name}: dtype {array.dtype}; give uint8 (0-255) or float (0-1) RGB pixels")
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    return np.ascontiguousarray(pixels[..., :3])
