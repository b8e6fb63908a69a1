"""Validation without real defects: frozen synthetic val anomalies and the objective.

Selection never sees the test split. A trial is judged on:
  * val-good: train/good images held out by the seeded split (never fitted);
  * frozen val anomalies: made once per category from val-good with every synthesis
    family (seeded, saved next to the results so every trial sees the same images);
    a trial is validated only on the families it did NOT train with, so a model that
    merely learned its own generator gets no credit for it;
  * real defects the user supplies with ``--val-defects DIR``.

Objective (maximised): image AUROC on that val set. AUPRO is measured and stored but not
optimised: the deployed detector decides per image, and AUPRO on synthetic masks rewards
maps that are sharp on pasted patches. In a 10-minute fabric search the old
``0.5 * image_auroc + 0.5 * aupro`` chose an unsmoothed stride-4 PatchCore (val AUPRO 0.81,
val image AUROC 0.91, test image AUROC 0.94) over the defaults (0.55, 0.95, test 0.99);
val image AUROC alone ranked those trials as test did.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from automl_ad.data.dataset import resize_image, resize_mask
from automl_ad.data.geometry import Shape, as_shape
from automl_ad.data.images import IMAGE_SUFFIXES, read_image, read_mask
from automl_ad.data.types import CategoryData, ImageSet, to_float
from automl_ad.errors import UserError, writing
from automl_ad.synthesis import FAMILIES, build_synthesizer, val_families



def objective(metrics: Mapping[str, float | None]) -> float:
    """The search's val objective (higher is better); see the module docstring."""
    image_auroc = metrics.get("image_auroc")
    return 0.0 if image_auroc is None else float(image_auroc)


def good_set(images: Tensor) -> ImageSet:
    """An ImageSet of normal images (labels 0, empty masks that count as known); each is
    named ``val-good:<i>`` so a trial's stored val scores can be matched to it."""
    n, _, h, w = images.shape
    return ImageSet(
        images=images,
        masks=torch.zeros(n, 1, h, w, dtype=torch.uint8),
        labels=torch.zeros(n, dtype=torch.long),
        has_mask=torch.ones(n, dtype=torch.bool),
        defect_types=["good"] * n,
        paths=[f"val-good:{i}" for i in range(n)],
    )


def build_val_anomalies(
    data: CategoryData,
    *,
    seed: int = 0,
    families: tuple[str, ...] | None = None,
) -> ImageSet:
    """One synthetic anomaly per val-good image and family, seeded and deterministic
    (a draw whose mask came out empty is dropped).

    Patch sources are fit images (other normal parts), never test images. ``families``:
    every family registered for the val set (``synthesis.val_families``) by default.
    """
    families = val_families() if families is None else families
    base = to_float(data.val_good)
    sources = to_float(data.fit)
    parts: list[ImageSet] = []
    offset = 0
    for index, family in enumerate(families):
        params = {"normal_share": 0.0, **FAMILIES[family].VAL_PARAMS}
        synthesizer = build_synthesizer(family, params, category=data.category)
        generator = torch.Generator().manual_seed(seed * 1000 + index)
        out = synthesizer(base, generator, sources=sources)
        masks = (out.masks > 0.5).to(torch.uint8)
        # A draw whose label mask came out empty (NSA's median filters can erase a small
        # patch) is an altered image, not a normal one: it is left out, never called good.
        marked = masks.flatten(1).amax(dim=1) > 0
        masks = masks[marked]
        labels = torch.ones(len(masks), dtype=torch.long)
        parts.append(
            ImageSet(
                images=(out.images[marked].clamp(0, 1) * 255).round().to(torch.uint8),
                masks=masks,
                labels=labels,
                has_mask=torch.ones(len(labels), dtype=torch.bool),
                defect_types=[family] * len(labels),
                # an id per frozen anomaly, so a trial's stored val scores match it
                paths=[f"val-anomaly:{offset + i}" for i in range(len(labels))],
            )
        )
        offset += len(labels)
    return ImageSet.concat(parts)


def val_set_for(
    val_good: Tensor,
    anomalies: ImageSet,
    train_family: str | None,
    extra: ImageSet | None = None,
) -> ImageSet:
    """val-good + frozen anomalies of every family but ``train_family`` + user defects."""
    keep = [i for i, kind in enumerate(anomalies.defect_types) if kind != train_family]
    parts = [good_set(val_good), anomalies.subset(keep)]
    if extra is not None and len(extra):
        parts.append(extra)
    return ImageSet.concat(parts)


def load_val_defects(folder: Path, image_size: int | Shape) -> ImageSet:
    """Real defects for validation: ``<folder>/<defect-type>/*`` images with optional
    ``<folder>/ground_truth/<defect-type>/<stem>_mask.png`` masks (MVTec naming), resized
    to ``image_size`` (a side or the search's (height, width))."""
    shape = as_shape(image_size)
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--val-defects folder not found: {folder}")
    images, masks, has_mask, kinds, paths = [], [], [], [], []
    for defect_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        if defect_dir.name in {"ground_truth", "good"}:
            continue
        for path in sorted(defect_dir.iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            image = read_image(path)
            mask_path = folder / "ground_truth" / defect_dir.name / f"{path.stem}_mask.png"
            if mask_path.exists():
                mask = read_mask(mask_path)
                if mask.shape != image.shape[:2]:
                    raise UserError(f"mask size {mask.shape} differs from image {image.shape[:2]}: {mask_path}")
                masks.append(resize_mask(mask, shape))
                has_mask.append(True)
            else:
                masks.append(torch.zeros(1, *shape, dtype=torch.uint8))
                has_mask.append(False)
            images.append(resize_image(image, shape))
            kinds.append(defect_dir.name)
            paths.append(str(path))
    if not images:
        raise UserError(f"no defect images found under {folder}/<defect-type>/")
    return ImageSet(
        images=torch.stack(images),
        masks=torch.stack(masks),
        labels=torch.ones(len(images), dtype=torch.long),
        has_mask=torch.tensor(has_mask, dtype=torch.bool),
        defect_types=kinds,
        paths=paths,
    )


def save_image_set(image_set: ImageSet, path: Path) -> None:
    """Tensors to ``path`` (safetensors), lists to ``path.json``; both written atomically."""
    path = Path(path)
    with writing(path.parent, "the val set folder"):
        path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        "images": image_set.images.contiguous(),
        "masks": image_set.masks.contiguous(),
        "labels": image_set.labels.contiguous(),
        "has_mask": image_set.has_mask.to(torch.uint8).contiguous(),
    }
    meta = {"defect_types": image_set.defect_types, "paths": image_set.paths}
    with writing(path, "the frozen val set"):
        _atomic_write(path, lambda tmp: save_file(tensors, tmp))
    sidecar = path.with_suffix(path.suffix + ".json")
    with writing(sidecar, "the frozen val set's list file"):
        _atomic_write(sidecar, lambda tmp: Path(tmp).write_text(json.dumps(meta)))


def load_image_set(path: Path) -> ImageSet:
    path = Path(path)
    tensors = load_file(str(path))
    meta = json.loads(path.with_suffix(path.suffix + ".json").read_text())
    return ImageSet(
        images=tensors["images"],
        masks=tensors["masks"],
        labels=tensors["labels"],
        has_mask=tensors["has_mask"].bool(),
        defect_types=list(meta["defect_types"]),
        paths=list(meta["paths"]),
    )


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
