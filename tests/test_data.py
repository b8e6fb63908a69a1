"""Data layer: decoding, layout discovery, checking, loading, splitting and caching."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from automl_ad.data import dataset as dataset_module
from automl_ad.data.check import ERROR, WARNING, check_category, format_report
from automl_ad.data.dataset import (
    clear_memory_cache,
    load_category,
    resize_image,
    resize_mask,
    resolve_data_root,
    split_train,
)
from automl_ad.data.images import image_size_of, read_image, read_mask
from automl_ad.data.layout import discover_category
from automl_ad.errors import UserError
from conftest import IMAGE_SIDE, make_broken_category, make_category, random_rgb, save_mask, save_rgb


def _png_with_sbit(pixels16: np.ndarray, bits: int) -> bytes:
    """A 16-bit grayscale PNG carrying an sBIT chunk (PIL cannot write one)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels16).save(buffer, format="PNG")
    data = buffer.getvalue()
    chunk_body = bytes([bits])
    chunk = struct.pack(">I", 1) + b"sBIT" + chunk_body + struct.pack(">I", zlib.crc32(b"sBIT" + chunk_body))
    ihdr_end = 8 + 8 + 13 + 4  # signature, IHDR header, IHDR data, CRC
    return data[:ihdr_end] + chunk + data[ihdr_end:]


@pytest.fixture(autouse=True)
def _fresh_memory_cache():
    clear_memory_cache()
    yield
    clear_memory_cache()


# --- images ---------------------------------------------------------------------------

def test_read_image_converts_every_mode_to_rgb_uint8(tmp_path: Path) -> None:
    base = random_rgb(0)
    gray = base[..., 1]
    Image.fromarray(gray).save(tmp_path / "l.png")
    Image.fromarray(np.dstack([gray, np.zeros_like(gray)]), mode="LA").save(tmp_path / "la.png")
    Image.fromarray(np.dstack([base, np.zeros_like(gray)]), mode="RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(base).save(tmp_path / "rgb.tif")
    Image.fromarray(base).save(tmp_path / "rgb.bmp")
    palette = Image.fromarray(base).quantize(colors=16)
    palette.save(tmp_path / "p.png")

    for name in ("l.png", "la.png"):
        out = read_image(tmp_path / name)
        assert out.dtype == np.uint8 and out.shape == (IMAGE_SIDE, IMAGE_SIDE, 3)
        for channel in range(3):
            np.testing.assert_array_equal(out[..., channel], gray)
    # Alpha is dropped, not composited: fully transparent pixels keep their colour.
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), base)
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.tif"), base)
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.bmp"), base)
    np.testing.assert_array_equal(read_image(tmp_path / "p.png"), np.asarray(palette.convert("RGB")))

    Image.fromarray(base).save(tmp_path / "rgb.jpg", quality=95)
    jpeg = read_image(tmp_path / "rgb.jpg")
    assert jpeg.shape == (IMAGE_SIDE, IMAGE_SIDE, 3) and jpeg.dtype == np.uint8
    smooth = np.full((IMAGE_SIDE, IMAGE_SIDE, 3), (200, 40, 90), np.uint8)
    Image.fromarray(smooth).save(tmp_path / "smooth.jpeg", quality=95)
    assert np.abs(read_image(tmp_path / "smooth.jpeg").astype(int) - smooth).max() <= 3


def test_sixteen_bit_images_scale_by_bit_range_not_clipping(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = read_image(tmp_path / "g16.png")
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])  # clipping would give 0,255,255,255

    # 12-bit data in a 16-bit container, declared with sBIT: 4095 is full white.
    twelve = np.array([[0, 2048, 4095]], dtype=np.uint16)
    (tmp_path / "g12.png").write_bytes(_png_with_sbit(twelve, 12))
    np.testing.assert_array_equal(read_image(tmp_path / "g12.png")[0, :, 0], [0, 128, 255])

    # 32-bit integer TIFF holding 16-bit values scales by 65535 too.
    Image.fromarray(values.astype(np.int32)).save(tmp_path / "g32.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "g32.tif")[0, :, 0], [0, 1, 128, 255])


def test_unreadable_and_truncated_files_raise_user_error_naming_the_file(tmp_path: Path) -> None:
    Image.fromarray(random_rgb(0, 64, 64)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("not an image")
    Image.fromarray(random_rgb(0, 64, 64)).save(tmp_path / "ok.jpg")
    jpeg = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    for name in ("cut.png", "text.png", "cut.jpg", "missing.png"):
        with pytest.raises(UserError, match=name) as caught:
            read_image(tmp_path / name)
        assert "\n" not in str(caught.value)
    with pytest.raises(UserError, match="cut.png"):
        read_mask(tmp_path / "cut.png")


def test_read_mask_and_header_size(tmp_path: Path) -> None:
    mask = save_mask(tmp_path / "m.png", (2, 3, 5, 9), height=12, width=20)
    out = read_mask(tmp_path / "m.png")
    assert out.dtype == np.bool_ and out.shape == (12, 20)
    np.testing.assert_array_equal(out, mask)
    Image.fromarray(np.array([[0, 1], [0, 0]], np.uint16)).save(tmp_path / "m16.png")  # 0/1 in 16 bits
    np.testing.assert_array_equal(read_mask(tmp_path / "m16.png"), [[False, True], [False, False]])
    assert image_size_of(tmp_path / "m.png") == (12, 20)
    with pytest.raises(UserError, match="nope.png"):
        image_size_of(tmp_path / "nope.png")


# --- layout ---------------------------------------------------------------------------

def test_discover_category_pairs_masks_and_sorts(tmp_path: Path) -> None:
    info = make_category(tmp_path)
    layout = discover_category(tmp_path, "widget")
    assert [p.name for p in layout.train] == ["000.png", "001.png", "002.png", "003.png", "004.JPG", "005.bmp"]
    assert [(t.defect_type, t.path.name) for t in layout.test] == [
        ("crack", "000.png"), ("crack", "001.png"), ("good", "000.png"), ("good", "001.png"), ("stain", "000.png"),
    ]
    masks = {f"{t.defect_type}/{t.path.stem}": t.mask for t in layout.test}
    assert masks["crack/000"] == info["folder"] / "ground_truth" / "crack" / "000_mask.png"
    assert masks["stain/000"] is None and masks["good/000"] is None
    assert layout.defect_types == ["crack", "stain"]
    assert not layout.unknown_folders and not layout.unknown_files and not layout.orphan_masks
    assert discover_category(tmp_path, "widget") == layout  # deterministic


def test_missing_root_or_category_raise_user_error(tmp_path: Path) -> None:
    make_category(tmp_path)
    with pytest.raises(UserError, match="nowhere"):
        discover_category(tmp_path / "nowhere", "widget")
    with pytest.raises(UserError, match=r"'gadget'.*found: widget"):
        check_category(tmp_path, "gadget")
    with pytest.raises(UserError, match="gadget"):
        load_category(tmp_path, "gadget", 16)


# --- check ----------------------------------------------------------------------------

def test_check_reports_counts_sizes_and_mask_coverage(tmp_path: Path) -> None:
    make_category(tmp_path)
    report = check_category(tmp_path, "widget")
    assert report.usable and not report.errors
    assert report.counts == {"train": {"good": 6}, "test": {"crack": 2, "good": 2, "stain": 1}}
    assert report.sizes == {(IMAGE_SIDE, IMAGE_SIDE): 11}
    crack = report.masks["crack"]
    assert (crack.images, crack.with_mask) == (2, 2)
    assert crack.mean_area_fraction == pytest.approx((64 / 1024 + 256 / 1024) / 2)
    assert report.masks["stain"].with_mask == 0 and report.masks["stain"].mean_area_fraction is None
    # Six good images hold out one for validation: usable, with that said once.
    assert [(p.severity, p.path.name) for p in report.problems] == [(WARNING, "good")]
    assert "has 6 good images (5 to fit, 1 held out)" in report.problems[0].message
    text = format_report(report)
    assert "usable" in text and "NOT usable" not in text
    assert "masks 2/2" in text and "no masks (image-level only)" in text and "32x32 (11)" in text


def test_check_names_the_file_of_every_problem(tmp_path: Path) -> None:
    paths = make_broken_category(tmp_path)
    report = check_category(tmp_path, "broken")
    assert not report.usable
    lines = [problem.line() for problem in report.problems]

    def line_for(path: Path, severity: str) -> str:
        found = [line for line in lines if str(path) in line and line.startswith(severity)]
        assert found, f"no {severity} naming {path} in {lines}"
        return found[0]

    assert "truncated" in line_for(paths["truncated"], ERROR)
    assert "mask is 32x40" in line_for(paths["wrong_size_mask"], ERROR)
    assert "without mask" in line_for(paths["without_mask"], WARNING)
    assert "mask without image" in line_for(paths["orphan_mask"], WARNING)
    assert "unknown folder" in line_for(paths["unknown_top"], WARNING)
    assert "unknown folder" in line_for(paths["nested"], WARNING)
    assert len(report.errors) == 2
    assert all("\n" not in line for line in lines)
    assert "NOT usable (2 errors)" in format_report(report)


def test_check_empty_splits(tmp_path: Path) -> None:
    save_rgb(tmp_path / "notest" / "train" / "good" / "000.png", 0)
    report = check_category(tmp_path, "notest")
    # One good image cannot be split into fit and val: the smallest usable product is two.
    assert not report.usable
    assert [p.message for p in report.errors] == [
        "1 good image: a search needs at least 2 (1 to fit, 1 held out to validate on)"]
    save_rgb(tmp_path / "notest" / "train" / "good" / "001.png", 1)
    report = check_category(tmp_path, "notest")
    assert report.usable  # an empty test split is only a warning
    assert any(p.severity == WARNING and "test split is empty" in p.message for p in report.problems)
    assert any(p.severity == WARNING and "has 2 good images (1 to fit, 1 held out)" in p.message
               for p in report.problems), "a product this small is told what it cannot give"
    for _ in range(2):  # decoded, then from the disk cache
        clear_memory_cache()
        loaded = load_category(tmp_path, "notest", 16, cache_dir=tmp_path / "cache")
        assert len(loaded.test) == 0 and loaded.test.images.shape == (0, 3, 16, 16)
        assert len(loaded.fit) == 1 and len(loaded.val_good) == 1

    save_rgb(tmp_path / "notrain" / "test" / "good" / "000.png", 0)
    (tmp_path / "notrain" / "train" / "good").mkdir(parents=True)
    report = check_category(tmp_path, "notrain")
    assert not report.usable
    assert report.errors[0].path == tmp_path / "notrain" / "train" / "good"


# --- loading --------------------------------------------------------------------------

def test_load_category_shapes_labels_and_masks(tmp_path: Path) -> None:
    info = make_category(tmp_path)
    data = load_category(tmp_path, "widget", 16, val_fraction=0.34, seed=3)
    assert data.fit.dtype == torch.uint8 and data.fit.shape[1:] == (3, 16, 16)
    assert len(data.fit) + len(data.val_good) == info["n_train"] and len(data.val_good) == 2
    assert sorted(data.fit_paths + data.val_paths) == sorted(
        str(p) for p in (info["folder"] / "train" / "good").iterdir() if not p.name.startswith("."))
    test = data.test
    assert len(test) == info["n_test"] and test.images.shape == (5, 3, 16, 16)
    assert test.masks.shape == (5, 1, 16, 16) and test.masks.dtype == torch.uint8
    assert test.defect_types == ["crack", "crack", "good", "good", "stain"]
    assert test.labels.tolist() == [1, 1, 0, 0, 1]
    assert test.has_mask.tolist() == [True, True, True, True, False]
    # 32 -> 16 px halves the boxes: 8x8 at the corner becomes 4x4, 16x16 becomes 8x8.
    assert int(test.masks[0].sum()) == 16 and int(test.masks[0, 0, :4, :4].sum()) == 16
    assert int(test.masks[1].sum()) == 64
    assert int(test.masks[2:].sum()) == 0
    assert test.paths[4].endswith("test/stain/000.png")
    # The 16-bit training image (values up to 61380 of 65535) must not be clipped to white.
    by_path = dict(zip(data.fit_paths + data.val_paths, torch.cat([data.fit, data.val_good])))
    sixteen_bit = by_path[str(info["folder"] / "train" / "good" / "003.png")].float()
    assert sixteen_bit.min() < 10 and 100 < sixteen_bit.mean() < 140 and sixteen_bit.max() > 220


def test_image_level_only_dataset_has_no_masks_for_defects(tmp_path: Path) -> None:
    make_category(tmp_path, with_masks=False)
    assert not (tmp_path / "widget" / "ground_truth").exists()
    data = load_category(tmp_path, "widget", 16)
    defective = data.test.labels == 1
    assert not data.test.has_mask[defective].any()
    assert data.test.has_mask[~defective].all()
    assert int(data.test.masks.sum()) == 0
    assert check_category(tmp_path, "widget").usable


def test_split_is_seeded_and_keeps_one_val_image(tmp_path: Path) -> None:
    make_category(tmp_path)
    first = load_category(tmp_path, "widget", 16, seed=7)
    again = load_category(tmp_path, "widget", 16, seed=7)
    assert first.val_paths == again.val_paths and torch.equal(first.fit, again.fit)
    assert first.fingerprint == again.fingerprint
    splits = {tuple(load_category(tmp_path, "widget", 16, seed=seed).val_paths) for seed in range(8)}
    assert len(splits) > 1  # the seed matters
    other = load_category(tmp_path, "widget", 16, seed=8)
    assert other.fingerprint != first.fingerprint
    assert split_train(2, 0.01, 0) in (([0], [1]), ([1], [0]))
    assert split_train(1, 0.5, 0) == ([0], [])
    assert split_train(10, 0.99, 0)[0] != []  # fit is never emptied
    fit, val = split_train(100, 0.2, 5)
    assert len(val) == 20 and sorted(fit + val) == list(range(100))


def test_second_load_decodes_nothing_from_memory_or_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = make_category(tmp_path / "data")
    calls: list[Path] = []
    real_read_image = dataset_module.read_image

    def counting_read_image(path):
        calls.append(Path(path))
        return real_read_image(path)

    monkeypatch.setattr(dataset_module, "read_image", counting_read_image)
    cache_dir = tmp_path / "cache"
    first = load_category(tmp_path / "data", "widget", 16, seed=1, cache_dir=cache_dir)
    assert len(calls) == info["n_train"] + info["n_test"]
    assert len(list(cache_dir.glob("*.safetensors"))) == 1 and not list(cache_dir.glob("*.tmp"))

    calls.clear()
    memory_hit = load_category(tmp_path / "data", "widget", 16, seed=2, cache_dir=cache_dir)
    assert calls == []  # another split seed still reuses the decoded images
    clear_memory_cache()
    disk_hit = load_category(tmp_path / "data", "widget", 16, seed=1, cache_dir=cache_dir)
    assert calls == []
    assert torch.equal(disk_hit.fit, first.fit) and torch.equal(disk_hit.test.images, first.test.images)
    assert torch.equal(disk_hit.test.masks, first.test.masks) and disk_hit.test.paths == first.test.paths
    assert disk_hit.fingerprint == first.fingerprint != memory_hit.fingerprint

    # Editing the cached tensors returned to a caller must not change the cache.
    disk_hit.test.images.zero_()
    assert torch.equal(load_category(tmp_path / "data", "widget", 16, seed=1).test.images, first.test.images)

    # A changed file (new mtime) misses both caches; so does another image size.
    changed = info["folder"] / "test" / "good" / "000.png"
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    load_category(tmp_path / "data", "widget", 16, seed=1, cache_dir=cache_dir)
    assert len(calls) == info["n_train"] + info["n_test"]
    calls.clear()
    load_category(tmp_path / "data", "widget", 24, seed=1)
    assert len(calls) == info["n_train"] + info["n_test"]


def test_damaged_disk_cache_is_rebuilt(tmp_path: Path) -> None:
    make_category(tmp_path / "data")
    cache_dir = tmp_path / "cache"
    first = load_category(tmp_path / "data", "widget", 16, cache_dir=cache_dir)
    (cache_file,) = cache_dir.glob("*.safetensors")
    cache_file.write_bytes(b"garbage")
    clear_memory_cache()
    again = load_category(tmp_path / "data", "widget", 16, cache_dir=cache_dir)
    assert torch.equal(again.test.images, first.test.images)
    assert cache_file.stat().st_size > 1000  # rewritten


def test_bad_input_raises_one_line_user_errors(tmp_path: Path) -> None:
    paths = make_broken_category(tmp_path)
    with pytest.raises(UserError, match="003.png") as caught:
        load_category(tmp_path, "broken", 16)
    assert "\n" not in str(caught.value)
    paths["truncated"].unlink()
    with pytest.raises(UserError, match="002_mask.png"):
        load_category(tmp_path, "broken", 16)
    paths["wrong_size_mask"].unlink()
    data = load_category(tmp_path, "broken", 16)  # only warnings are left: it loads
    assert len(data.fit) + len(data.val_good) == 3

    (tmp_path / "empty" / "train" / "good").mkdir(parents=True)
    with pytest.raises(UserError, match="no training images"):
        load_category(tmp_path, "empty", 16)
    for bad in ({"image_size": 0}, {"image_size": 16, "val_fraction": 1.0}, {"image_size": 16, "seed": -1}):
        with pytest.raises(UserError):
            load_category(tmp_path, "broken", **bad)


def test_resize_rules() -> None:
    image = random_rgb(9)
    assert torch.equal(resize_image(image, IMAGE_SIDE), torch.from_numpy(image).permute(2, 0, 1))
    flat = np.full((40, 24, 3), 77, np.uint8)
    assert torch.equal(resize_image(flat, 16), torch.full((3, 16, 16), 77, dtype=torch.uint8))
    mask = np.zeros((8, 8), bool)
    mask[0:3, 0:3] = True  # at half size: (0,0) fully covered, (0,1) and (1,0) half, (1,1) a quarter
    resized = resize_mask(mask, 4)
    assert resized.shape == (1, 4, 4) and resized.dtype == torch.uint8
    assert resized[0].tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    thin = np.zeros((8, 8), bool)
    thin[:, 0] = True  # a quarter of each output pixel: below the 0.5 threshold
    assert int(resize_mask(thin, 2).sum()) == 0


def test_resolve_data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from automl_ad.data import builtin

    assert resolve_data_root(tmp_path, "anything") == tmp_path
    with pytest.raises(UserError, match="nowhere"):
        resolve_data_root(tmp_path / "nowhere", "screw")
    with pytest.raises(UserError, match="fabric, marble, screw, washer"):
        resolve_data_root(None, "bottle")

    # A built-in root that is already complete is used as is (tiny, so the test is quick).
    monkeypatch.setenv("AUTOML_AD_CACHE", str(tmp_path / "cache"))
    expected = builtin.builtin_cache_root()
    builtin.generate_builtin(expected, n_train=2, n_test=2, image_size=32)
    capsys.readouterr()
    assert resolve_data_root(None, "screw") == expected
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"notice: no --data given; using the built-in procedural products in {expected}"]
    assert len(load_category(expected, "screw", 16).fit) >= 1
