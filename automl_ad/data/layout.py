"""Finding the files of one category in an MVTec-AD-style folder, without decoding any.

::

    <root>/<category>/train/good/*                      normal training images
    <root>/<category>/test/good/*                       normal test images
    <root>/<category>/test/<defect-type>/*              defective test images
    <root>/<category>/ground_truth/<defect-type>/<stem>_mask.<ext>   optional masks

Masks are optional per defect type, so image-level-only datasets work. Images are files
with a suffix in ``IMAGE_SUFFIXES`` (case-insensitive); hidden files (``.DS_Store``) are
skipped silently. Everything else the walk meets (unknown folders, stray files, masks with
no image) is collected in ``CategoryLayout`` so ``check`` can report it; loading ignores it.
All lists are sorted by path, so the same folder always gives the same order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from automl_ad.data.images import IMAGE_SUFFIXES
from automl_ad.errors import UserError

GOOD = "good"
MASK_SUFFIX = "_mask"
_KNOWN_TOP_LEVEL = ("train", "test", "ground_truth")


@dataclass(frozen=True)
class LabelledFile:
    """One test image and its label; ``mask`` is None when there is no ground-truth file for it."""

    path: Path
    defect_type: str
    mask: Path | None = None

    @property
    def is_good(self) -> bool:
        return self.defect_type == GOOD


@dataclass
class CategoryLayout:
    """The files of one category, plus what did not fit the layout."""

    root: Path
    category: str
    folder: Path
    train: list[Path]
    test: list[LabelledFile]
    unknown_folders: list[Path] = field(default_factory=list)
    unknown_files: list[Path] = field(default_factory=list)
    orphan_masks: list[Path] = field(default_factory=list)

    @property
    def defect_types(self) -> list[str]:
        """Test folder names other than ``good``, sorted."""
        return sorted({item.defect_type for item in self.test if not item.is_good})

    def files(self) -> list[Path]:
        """Every image and mask file the loader reads, sorted."""
        masks = [item.mask for item in self.test if item.mask is not None]
        return sorted([*self.train, *(item.path for item in self.test), *masks])


def _visible_children(folder: Path) -> list[Path]:
    return sorted(child for child in folder.iterdir() if not child.name.startswith("."))


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def list_categories(root: Path) -> list[str]:
    """Folder names under ``root`` that look like categories (have a ``train`` folder)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return [child.name for child in _visible_children(root) if (child / "train").is_dir()]


def category_folder(root: Path, category: str) -> Path:
    """``root / category``, or UserError naming what is missing."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data root not found: {root}")
    if not category or "/" in category or "\\" in category or category in (".", ".."):
        raise UserError(f"bad category name {category!r}: expected a folder name under {root}")
    folder = root / category
    if not folder.is_dir():
        found = list_categories(root)
        hint = f" (found: {', '.join(found)})" if found else " (no folder with a train/ subfolder there)"
        raise UserError(f"category {category!r} not found in {root}{hint}")
    return folder


def _images_in(folder: Path, layout: CategoryLayout) -> list[Path]:
    """Image files directly in ``folder``; subfolders and other files go to ``layout``."""
    images = []
    for child in _visible_children(folder):
        if child.is_dir():
            layout.unknown_folders.append(child)
        elif _is_image_name(child):
            images.append(child)
        else:
            layout.unknown_files.append(child)
    return images


def _mask_index(folder: Path, defect_type: str, layout: CategoryLayout) -> dict[str, Path]:
    """stem of the image -> mask path, for ``ground_truth/<defect_type>``."""
    masks: dict[str, Path] = {}
    gt_dir = folder / "ground_truth" / defect_type
    if not gt_dir.is_dir():
        return masks
    for mask in _images_in(gt_dir, layout):
        stem = mask.stem
        if stem.endswith(MASK_SUFFIX) and stem[: -len(MASK_SUFFIX)] not in masks:
            masks[stem[: -len(MASK_SUFFIX)]] = mask
        else:
            layout.orphan_masks.append(mask)  # wrong name or a duplicate: matches no image
    return masks


def discover_category(root: Path, category: str) -> CategoryLayout:
    """Walk ``<root>/<category>`` and sort its files into the layout (no decoding).

    Raises UserError when ``root`` or the category folder does not exist. An empty or
    missing ``train/good`` is *not* raised here (``check`` reports it, loading raises).
    """
    folder = category_folder(root, category)
    layout = CategoryLayout(root=Path(root), category=category, folder=folder, train=[], test=[])

    for child in _visible_children(folder):
        if child.name not in _KNOWN_TOP_LEVEL:
            (layout.unknown_folders if child.is_dir() else layout.unknown_files).append(child)

    train_dir = folder / "train"
    if train_dir.is_dir():
        for child in _visible_children(train_dir):
            if child.is_dir() and child.name == GOOD:
                layout.train = _images_in(child, layout)
            else:
                (layout.unknown_folders if child.is_dir() else layout.unknown_files).append(child)

    test_dir = folder / "test"
    test_types: list[str] = []
    if test_dir.is_dir():
        for child in _visible_children(test_dir):
            if not child.is_dir():
                layout.unknown_files.append(child)
                continue
            test_types.append(child.name)
            masks = {} if child.name == GOOD else _mask_index(folder, child.name, layout)
            for image in _images_in(child, layout):
                mask = masks.pop(image.stem, None)
                layout.test.append(LabelledFile(path=image, defect_type=child.name, mask=mask))
            layout.orphan_masks.extend(masks.values())  # masks whose image is missing

    gt_dir = folder / "ground_truth"
    if gt_dir.is_dir():
        for child in _visible_children(gt_dir):
            if not child.is_dir():
                layout.unknown_files.append(child)
            elif child.name == GOOD or child.name not in test_types:
                # No defect images to pair with: every mask in it is an orphan.
                for mask in _images_in(child, layout):
                    layout.orphan_masks.append(mask)

    layout.test.sort(key=lambda item: item.path)
    layout.unknown_folders.sort()
    layout.unknown_files.sort()
    layout.orphan_masks.sort()
    return layout
