"""``check_category``: is this MVTec-style folder usable, and what is in it?

Decodes every image and mask once (a truncated file is only found by decoding it) and
reports counts per split and defect type, the distinct image sizes, mask coverage per
defect type, and problems. Each problem is one line naming the file. Errors make the
category unusable (``report.usable`` is False): unreadable or truncated images or masks,
masks whose size differs from their image, fewer good ``train/good`` images than the
smallest usable product (``minimum.MIN_TRAIN_GOOD``). Everything else is a
warning: the loader ignores it or copes (an empty test split, masks without images,
images without masks among masked siblings, unknown folders and files).
"""

from __future__ import annotations

import statistics

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from automl_ad.data.images import read_image, read_mask
from automl_ad.data.geometry import Geometry, median_aspect, suggest
from automl_ad.data.layout import GOOD, discover_category
from automl_ad.data.minimum import MIN_FIT_IMAGES, MIN_TRAIN_GOOD, MIN_VAL_GOOD, ProductSize
from automl_ad.errors import UserError

ERROR = "error"
WARNING = "warning"


@dataclass(frozen=True)
class Problem:
    severity: str  # ERROR or WARNING
    path: Path
    message: str

    def line(self) -> str:
        return f"{self.severity}: {self.path}: {self.message}"


@dataclass(frozen=True)
class MaskCoverage:
    """Masks of one defect type: how many images have one, and their mean defect area."""

    images: int
    with_mask: int
    mean_area_fraction: float | None  # over readable masks; None when there are none


@dataclass
class CheckReport:
    root: Path
    category: str
    counts: dict[str, dict[str, int]]  # split -> defect type -> images
    sizes: dict[tuple[int, int], int]  # (height, width) -> images, readable images only
    masks: dict[str, MaskCoverage]  # defect type -> coverage
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == ERROR]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == WARNING]

    @property
    def usable(self) -> bool:
        return not self.errors


def _try_read(reader, path: Path, problems: list[Problem], what: str):
    try:
        return reader(path)
    except UserError as error:
        reason = str(error).rsplit(": ", 1)[-1] if ": " in str(error) else str(error)
        problems.append(Problem(ERROR, path, f"unreadable or truncated {what} ({reason})"))
        return None


def check_category(root: Path, category: str) -> CheckReport:
    """Inspect ``<root>/<category>``; UserError only when root or category is missing."""
    layout = discover_category(Path(root), category)
    problems: list[Problem] = []
    sizes: Counter[tuple[int, int]] = Counter()

    train_dir = layout.folder / "train" / GOOD
    if not layout.train:
        problems.append(Problem(ERROR, train_dir, "no training images (train/good is empty or missing)"))
    elif len(layout.train) < MIN_TRAIN_GOOD:
        problems.append(Problem(ERROR, train_dir, f"{len(layout.train)} good image: a search needs at least "
                                                  f"{MIN_TRAIN_GOOD} ({MIN_FIT_IMAGES} to fit, {MIN_VAL_GOOD} held "
                                                  "out to validate on)"))
    else:  # usable, but the search will say what a product this small cannot give
        shortfalls = ProductSize.of(category, train_dir, len(layout.train)).shortfalls()
        problems.extend(Problem(WARNING, train_dir, line) for line in shortfalls)
    for path in layout.train:
        image = _try_read(read_image, path, problems, "image")
        if image is not None:
            sizes[image.shape[:2]] += 1

    counts_test: Counter[str] = Counter()
    masked: Counter[str] = Counter()
    areas: dict[str, list[float]] = {}
    for item in layout.test:
        counts_test[item.defect_type] += 1
        image = _try_read(read_image, item.path, problems, "image")
        if image is not None:
            sizes[image.shape[:2]] += 1
        if item.mask is None:
            continue
        masked[item.defect_type] += 1
        mask = _try_read(read_mask, item.mask, problems, "mask")
        if mask is None:
            continue
        areas.setdefault(item.defect_type, []).append(float(mask.mean()))
        if image is not None and mask.shape != image.shape[:2]:
            problems.append(Problem(
                ERROR, item.mask,
                f"mask is {_size_text(mask.shape)} but its image {item.path.name} is {_size_text(image.shape[:2])}",
            ))

    for item in layout.test:
        if item.mask is None and not item.is_good and masked[item.defect_type]:
            expected = f"ground_truth/{item.defect_type}/{item.path.stem}_mask.png"
            problems.append(Problem(
                WARNING, item.path,
                f"image without mask though {masked[item.defect_type]} other {item.defect_type} images have one "
                f"(expected {expected}; pixel metrics will skip it)",
            ))

    for mask in layout.orphan_masks:
        problems.append(Problem(WARNING, mask, "mask without image (expected test/<defect>/<stem>.<ext> for "
                                               "ground_truth/<defect>/<stem>_mask.<ext>); ignored"))
    for folder in layout.unknown_folders:
        problems.append(Problem(WARNING, folder, "unknown folder, ignored"))
    for path in layout.unknown_files:
        problems.append(Problem(WARNING, path, "unknown file (not an image, or not where images belong), ignored"))

    test_dir = layout.folder / "test"
    if not layout.test:
        problems.append(Problem(WARNING, test_dir, "test split is empty: no test metrics can be reported"))
    else:
        if not counts_test[GOOD]:
            problems.append(Problem(WARNING, test_dir / GOOD, "no good test images: image AUROC needs both classes"))
        if not layout.defect_types:
            problems.append(Problem(WARNING, test_dir, "no defective test images: image AUROC needs both classes"))

    coverage = {
        defect: MaskCoverage(
            images=counts_test[defect],
            with_mask=masked[defect],
            mean_area_fraction=(sum(areas[defect]) / len(areas[defect])) if areas.get(defect) else None,
        )
        for defect in layout.defect_types
    }
    problems.sort(key=lambda p: (p.severity != ERROR, str(p.path), p.message))
    return CheckReport(
        root=layout.root,
        category=category,
        counts={"train": {GOOD: len(layout.train)}, "test": dict(sorted(counts_test.items()))},
        sizes=dict(sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))),
        masks=coverage,
        problems=problems,
    )


def _size_text(shape: tuple[int, ...]) -> str:
    return f"{shape[1]}x{shape[0]}"  # width x height, as image viewers print it


def _geometry_line(sizes: dict[tuple[int, int], int]) -> str:
    """The aspect spread and the geometry ``search --geometry auto`` would choose."""
    aspects = sorted(width / height for (height, width), count in sizes.items() for _ in range(count))
    geometry = suggest(median_aspect((height, width) for (height, width), count in sizes.items()
                                     for _ in range(count)))
    spread = f"{aspects[0]:.2f}" if aspects[0] == aspects[-1] else f"{aspects[0]:.2f}-{aspects[-1]:.2f}"
    line = (f"aspect (width / height): median {statistics.median(aspects):.2f}, range {spread}; "
            f"search --geometry auto: {geometry.describe(256)}")
    height = statistics.median(h for (h, _), count in sizes.items() for _ in range(count))
    width = statistics.median(w for (_, w), count in sizes.items() for _ in range(count))
    tiled = Geometry("tiled", geometry.aspect)
    canvas = tiled.shape(256)
    if height >= canvas[0] and width >= canvas[1]:  # the files hold the detail tiles would see
        line += f"; or --geometry tiled: {tiled.describe(256)}, about {tiled.tiles(256)}x the cost an image"
    return line


def format_report(report: CheckReport) -> str:
    """Human-readable report: verdict, counts, sizes, mask coverage, then one line per problem."""
    verdict = "usable" if report.usable else f"NOT usable ({len(report.errors)} errors)"
    lines = [f"{report.category} in {report.root}: {verdict}"]
    lines.append(f"  train/good: {report.counts['train'][GOOD]} images")
    test_counts = report.counts["test"]
    lines.append(f"  test: {sum(test_counts.values())} images")
    width = max((len(name) for name in test_counts), default=0)
    for defect, count in test_counts.items():
        text = f"    {defect:<{width}}  {count:>4}"
        coverage = report.masks.get(defect)
        if coverage is not None:
            if coverage.with_mask:
                area = coverage.mean_area_fraction
                area_text = f", mean defect area {area:.2%}" if area is not None else ""
                text += f"  masks {coverage.with_mask}/{coverage.images}{area_text}"
            else:
                text += "  no masks (image-level only)"
        lines.append(text)
    if report.sizes:
        sizes = ", ".join(f"{_size_text(size)} ({count})" for size, count in report.sizes.items())
        lines.append(f"  image sizes (width x height): {sizes}")
        lines.append(f"  {_geometry_line(report.sizes)}")
    if report.problems:
        lines.append(f"  problems: {len(report.errors)} errors, {len(report.warnings)} warnings")
        lines.extend(f"    {problem.line()}" for problem in report.problems)
    else:
        lines.append("  problems: none")
    return "\n".join(lines)
