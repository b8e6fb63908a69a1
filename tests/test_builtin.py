"""Built-in procedural products: layout, determinism, masks, the screw's shape, errors."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from automl_ad.data import builtin
from automl_ad.data.builtin import (
    BUILTIN_CATEGORIES,
    BUILTIN_VERSION,
    DEFECT_TYPES,
    builtin_cache_root,
    ensure_builtin_root,
    generate_builtin,
    image_rng,
    render_sample,
    defect_plan,
)
from automl_ad.errors import UserError

SMALL = {"n_train": 3, "n_test": 11, "image_size": 32}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_builtin(tmp_path_factory.mktemp("builtin"), **SMALL, seed=3)


def test_categories_cover_textures_objects_and_screw() -> None:
    kinds = list(BUILTIN_CATEGORIES.values())
    assert kinds.count("texture") >= 2 and kinds.count("object") >= 2
    assert BUILTIN_CATEGORIES["screw"] == "object"
    assert all(len(DEFECT_TYPES[name]) >= 4 for name in BUILTIN_CATEGORIES)


def test_layout_counts_and_masks_on_disk(small_root: Path) -> None:
    assert sorted(p.name for p in small_root.iterdir()) == sorted(BUILTIN_CATEGORIES)
    for category in BUILTIN_CATEGORIES:
        folder = small_root / category
        train = sorted((folder / "train" / "good").glob("*.png"))
        assert [p.name for p in train] == ["000.png", "001.png", "002.png"]
        plan = defect_plan(category, SMALL["n_test"])
        assert plan.count("good") == 3  # round(11 / 4)
        test_dirs = {p.name: sorted(p.glob("*.png")) for p in (folder / "test").iterdir()}
        assert sum(len(files) for files in test_dirs.values()) == SMALL["n_test"]
        assert set(test_dirs) == set(plan)
        for defect, files in test_dirs.items():
            assert len(files) == plan.count(defect)
            for image_path in files:
                image = cv2.imread(str(image_path), cv2.IMREAD_UNCHANGED)
                assert image.shape[:2] == (32, 32)
                assert image.ndim == (2 if category == "screw" else 3)
                mask_path = folder / "ground_truth" / defect / f"{image_path.stem}_mask.png"
                if defect == "good":
                    assert not mask_path.exists()
                    continue
                mask = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
                assert mask.shape == (32, 32) and mask.dtype == np.uint8
                assert set(np.unique(mask).tolist()) == {0, 255}
        assert not (folder / "ground_truth" / "good").exists()
    assert not [p for p in small_root.iterdir() if p.name.startswith(".")], "temporary folders left"


def test_default_test_split_can_rank_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    n_test = inspect.signature(generate_builtin).parameters["n_test"].default
    assert builtin._DEFAULT_SETTINGS["n_test"] == n_test  # the cache uses the same split
    assert builtin._DEFAULT_SETTINGS["n_train"] == 200
    for category in BUILTIN_CATEGORIES:
        plan = defect_plan(category, n_test)
        assert len(plan) == n_test
        assert plan.count("good") >= 40 and len(plan) - plan.count("good") >= 100, category
        counts = [plan.count(defect) for defect in DEFECT_TYPES[category]]
        assert set(plan) == {"good", *DEFECT_TYPES[category]}
        assert max(counts) - min(counts) <= 1, (category, counts)
    # the 15 good + 45 defective split was builtin-v1: its cache must not be reused
    assert BUILTIN_VERSION != "builtin-v1"
    monkeypatch.setenv("AUTOML_AD_CACHE", str(tmp_path))
    assert builtin_cache_root() == tmp_path / BUILTIN_VERSION


def test_same_seed_same_bytes_other_seed_differs(small_root: Path, tmp_path: Path) -> None:
    again = generate_builtin(tmp_path / "again", ["washer", "screw"], **SMALL, seed=3)
    for category in ("washer", "screw"):
        assert _files(again / category) == _files(small_root / category)
    other = generate_builtin(tmp_path / "other", ["washer"], **SMALL, seed=4)
    first, second = _files(small_root / "washer"), _files(other / "washer")
    assert first.keys() == second.keys()
    assert all(first[name] != second[name] for name in first)


def test_fewer_images_are_a_prefix_of_more(tmp_path: Path) -> None:
    few = generate_builtin(tmp_path / "few", ["marble"], n_train=2, n_test=0, image_size=32, seed=5)
    many = generate_builtin(tmp_path / "many", ["marble"], n_train=4, n_test=0, image_size=32, seed=5)
    train_few, train_many = _files(few / "marble"), _files(many / "marble")
    assert len(train_many) == 4 and all(train_many[name] == data for name, data in train_few.items())
    assert train_many["train/good/000.png"] != train_many["train/good/001.png"]


@pytest.mark.parametrize("category", list(BUILTIN_CATEGORIES))
def test_masks_mark_exactly_the_changed_pixels(category: str) -> None:
    for defect in DEFECT_TYPES[category]:
        for index in range(3):
            clean = render_sample(category, "good", image_rng(index, category, "test", 1), 64)
            sample = render_sample(category, defect, image_rng(index, category, "test", 1), 64)
            outside = sample.mask == 0
            assert sample.mask.any(), (category, defect)
            assert set(np.unique(sample.mask).tolist()) == {0, 1}
            # outside the mask the defective image is the independently rendered clean one
            np.testing.assert_array_equal(sample.image[outside], clean.image[outside])
            changed = (sample.image != clean.image).any(axis=2)
            assert not (changed & outside).any()
            # and the mask is not padded with untouched pixels
            assert changed[sample.mask == 1].mean() > 0.6, (category, defect)
            contrast = np.abs(sample.image.astype(int) - clean.image.astype(int)).max(axis=2)
            assert contrast[sample.mask == 1].mean() >= 0.05 * 255


def test_normal_images_vary() -> None:
    for category in BUILTIN_CATEGORIES:
        images = [render_sample(category, "good", image_rng(0, category, "train", i), 48).image.astype(float)
                  for i in range(4)]
        for i in range(1, 4):
            assert np.abs(images[i] - images[0]).mean() > 3.0, category


def _screw_pose(image: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(principal-axis ratio, orientation, centroid) of the darkest large blob."""
    grey = image[..., 0]
    _, dark = cv2.threshold(grey, 0, 1, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(dark)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    ys, xs = np.nonzero(labels == largest)
    points = np.stack([xs, ys], axis=1).astype(float)
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(points.T))
    major = eigenvectors[:, 1]
    return math.sqrt(eigenvalues[1] / eigenvalues[0]), math.atan2(major[1], major[0]) % math.pi, points.mean(0)


def test_screw_is_elongated_grey_and_posed_at_random() -> None:
    orientations, centroids = [], []
    for index in range(8):
        image = render_sample("screw", "good", image_rng(0, "screw", "train", index), 128).image
        assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
        ratio, orientation, centroid = _screw_pose(image)
        assert ratio > 3.0
        orientations.append(orientation)
        centroids.append(centroid)
    assert np.ptp(orientations) > math.radians(60)
    assert np.ptp(np.array(centroids), axis=0).min() > 8


def test_bent_screw_is_less_straight() -> None:
    ratios = []
    for defect in ("good", "bent_shaft"):
        image = render_sample("screw", defect, image_rng(2, "screw", "test", 0), 128).image
        ratios.append(_screw_pose(image)[0])
    assert ratios[1] < ratios[0]


def test_bad_input_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="'bolt'"):
        generate_builtin(tmp_path, ["screw", "bolt"], **SMALL)
    assert not (tmp_path / "screw").exists()  # checked before anything is written
    with pytest.raises(UserError, match="n_train"):
        generate_builtin(tmp_path, ["screw"], n_train=0)
    with pytest.raises(UserError, match="image_size"):
        generate_builtin(tmp_path, ["screw"], image_size=4)
    with pytest.raises(UserError, match="'dent'"):
        render_sample("washer", "dent", image_rng(0, "washer", "test", 0), 32)


def test_crash_leaves_nothing_half_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = builtin._write_png
    written = []

    def failing_write(path: Path, image: np.ndarray, grayscale: bool) -> None:
        if len(written) == 5:
            raise OSError("disk full")
        written.append(path)
        real_write(path, image, grayscale)

    monkeypatch.setattr(builtin, "_write_png", failing_write)
    with pytest.raises(OSError, match="disk full"):
        generate_builtin(tmp_path, ["fabric"], **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_regenerating_replaces_a_category(tmp_path: Path) -> None:
    generate_builtin(tmp_path, ["fabric"], n_train=4, n_test=0, image_size=32)
    generate_builtin(tmp_path, ["fabric"], n_train=2, n_test=0, image_size=32)
    assert len(list((tmp_path / "fabric" / "train" / "good").iterdir())) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["fabric"]


def test_ensure_builtin_root_fills_only_missing_categories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOML_AD_CACHE", str(tmp_path))
    root = tmp_path / BUILTIN_VERSION
    for category in BUILTIN_CATEGORIES:
        if category != "screw":
            (root / category).mkdir(parents=True)
            (root / category / "kept.txt").write_text("already here")
    assert ensure_builtin_root() == root
    assert all((root / c / "kept.txt").exists() for c in BUILTIN_CATEGORIES if c != "screw")
    assert len(list((root / "screw" / "train" / "good").glob("*.png"))) == 200
    test_counts = {p.name: len(list(p.glob("*.png"))) for p in (root / "screw" / "test").iterdir()}
    assert test_counts == {"good": 40, **{defect: 20 for defect in DEFECT_TYPES["screw"]}}
    assert len(list((root / "screw" / "ground_truth").rglob("*_mask.png"))) == 100
    assert cv2.imread(str(root / "screw" / "train" / "good" / "000.png"), cv2.IMREAD_UNCHANGED).shape == (256, 256)
    assert ensure_builtin_root() == root  # second call: nothing to do
