"""Tensors the data layer hands to everything downstream.

Images are stored as uint8 N x 3 x H x W (grayscale, RGBA and 16-bit sources are
converted to 8-bit RGB by the data layer) and turned into float [0, 1] per batch with
``to_float``; masks are uint8 N x 1 x H x W in {0, 1}.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor


def to_float(images: Tensor) -> Tensor:
    """uint8 [0, 255] -> float32 [0, 1] (float input is returned as float32)."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


@dataclass
class ImageSet:
    """Labelled images: the test split, or validation anomalies.

    images:       N x 3 x H x W uint8.
    masks:        N x 1 x H x W uint8 in {0, 1}; all zero for good images and for
                  defective images without a ground-truth mask.
    labels:       N int64, 0 = good, 1 = defective.
    has_mask:     N bool; True for good images and for defective images with a mask.
                  Pixel metrics use only images with has_mask; when no defective image
                  has a mask, pixel metrics are reported as missing (None), never 0.
    defect_types: N names ("good", "scratch", ... or a synthesis family for val).
    paths:        N source paths ("" for generated images).
    """

    images: Tensor
    masks: Tensor
    labels: Tensor
    has_mask: Tensor
    defect_types: list[str]
    paths: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, index: Tensor | list[int]) -> "ImageSet":
        idx = torch.as_tensor(index, dtype=torch.long)
        pick = idx.tolist()
        return ImageSet(
            images=self.images[idx],
            masks=self.masks[idx],
            labels=self.labels[idx],
            has_mask=self.has_mask[idx],
            defect_types=[self.defect_types[i] for i in pick],
            paths=[self.paths[i] for i in pick] if self.paths else [],
        )

    @staticmethod
    def concat(parts: list["ImageSet"]) -> "ImageSet":
        return ImageSet(
            images=torch.cat([p.images for p in parts]),
            masks=torch.cat([p.masks for p in parts]),
            labels=torch.cat([p.labels for p in parts]),
            has_mask=torch.cat([p.has_mask for p in parts]),
            defect_types=[t for p in parts for t in p.defect_types],
            paths=[s for p in parts for s in (p.paths or [""] * len(p))],
        )


@dataclass
class CategoryData:
    """One product, loaded and resized.

    fit:         train/good images used for fitting (uint8 N x 3 x H x W).
    val_good:    held-out train/good images (seeded split), for validation only.
    test:        the real test split (good + defects). Reported, never optimised.
    fingerprint: hash of the file list, sizes and mtimes plus image size and split seed,
                 so results and bundles can say which data they came from.
    """

    category: str
    root: Path
    image_size: int
    fit: Tensor
    val_good: Tensor
    test: ImageSet
    fingerprint: str
    fit_paths: list[str] = field(default_factory=list)
    val_paths: list[str] = field(default_factory=list)
