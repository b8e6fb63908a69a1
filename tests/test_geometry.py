"""Image geometry: a product whose parts are not square keeps its aspect (issue 22)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import automl_ad as ad
from automl_ad.data.dataset import decode_key, load_category
from automl_ad.data.geometry import Geometry, median_aspect, resolve, stored, suggest
from automl_ad.data.layout import discover_category
from automl_ad.errors import UserError
from conftest import tiny_space_dir


def test_keep_aspect_keeps_the_pixel_count_in_multiples_of_32():
    kolektor = Geometry("keep_aspect", 500 / 1260)  # KolektorSDD's commutator photographs
    assert kolektor.shape(256) == (416, 160)
    height, width = kolektor.shape(256)
    assert abs(height * width - 256 ** 2) / 256 ** 2 < 0.05
    assert Geometry("keep_aspect", 2.0).shape(128) == (96, 192)
    assert Geometry("square", 0.4).shape(224) == (224, 224)
    assert Geometry("keep_aspect", 1.02).shape(256) == (256, 256) and Geometry("keep_aspect", 1.02).square
    assert Geometry("keep_aspect", 1 / 7.5).shape(32) == (96, 32), "no side below 32"
    assert Geometry.from_dict(kolektor.to_dict()) == Geometry("keep_aspect", round(500 / 1260, 4))
    assert Geometry.from_dict(None) == Geometry(), "a search recorded before geometries is square"


def test_auto_keeps_the_aspect_only_of_parts_that_are_clearly_not_square():
    assert suggest(median_aspect([(1260, 500), (1255, 500), (1270, 500)])).mode == "keep_aspect"
    assert suggest(median_aspect([(300, 320), (310, 300)])).mode == "square"
    assert suggest(1.3).mode == "keep_aspect" and suggest(1 / 1.3).mode == "keep_aspect"


def test_bad_geometry_is_one_user_error(wide_mvtec):
    with pytest.raises(UserError, match="geometry must be one of"):
        Geometry("tiles")
    with pytest.raises(UserError, match="beyond 1:8"):
        Geometry("keep_aspect", 20.0)
    with pytest.raises(UserError, match="--geometry square differs from keep_aspect"):
        stored({"geometry": {"mode": "keep_aspect", "aspect": 2.5}}, "square")
    assert stored({"geometry": {"mode": "keep_aspect", "aspect": 2.5}}, "auto").mode == "keep_aspect"


def test_a_wide_product_loads_at_its_aspect_and_caches_apart_from_the_square(wide_mvtec):
    layout = discover_category(wide_mvtec, "screw")
    geometry = resolve("auto", layout.train)
    assert geometry.mode == "keep_aspect" and geometry.aspect == pytest.approx(80 / 32)
    shape = geometry.shape(32)
    assert shape == (32, 64)
    data = load_category(wide_mvtec, "screw", 32, shape=shape, seed=0)
    square = load_category(wide_mvtec, "screw", 32, seed=0)
    assert data.fit.shape[-2:] == data.val_good.shape[-2:] == data.test.images.shape[-2:] == (32, 64)
    assert data.test.masks.shape[-2:] == (32, 64) and int(data.test.masks.sum()) > 0
    assert square.fit.shape[-2:] == (32, 32)
    assert decode_key(layout, shape) != decode_key(layout, 32) and data.fingerprint != square.fingerprint
    assert decode_key(layout, 32) == decode_key(layout, (32, 32)), "square keys are the same as before shapes"


def test_plan_names_the_geometry_of_a_wide_product(wide_mvtec, tiny_mvtec, tmp_path):
    spaces = tiny_space_dir(tmp_path / "spaces")
    wide = ad.plan("screw", "3trials", data=wide_mvtec, image_size=32, space_dir=spaces, storage=tmp_path / "r")
    assert "geometry keep_aspect" in wide.text() and "32 -> 32x64 px" in wide.text()
    square = ad.plan("screw", "3trials", data=tiny_mvtec, image_size=32, space_dir=spaces, storage=tmp_path / "r")
    assert "geometry" not in square.text(), "a square product's plan says nothing of geometry"


def test_a_wide_product_searches_exports_and_predicts_at_its_aspect(wide_mvtec, tmp_path, ray_session):
    result = ad.search("screw", "2trials", data=wide_mvtec, storage=tmp_path / "results", experiment="wide",
                       image_size=32, seed=0, use_ray_train=False, space_dir=tiny_space_dir(tmp_path / "spaces"))
    record = json.loads((result.folder / "search.json").read_text())
    assert record["geometry"]["mode"] == "keep_aspect"
    shipped = result.ship(tmp_path / "models" / "screw", k=1)
    manifest = json.loads((tmp_path / "models" / "screw" / "manifest.json").read_text())
    assert (manifest["preprocessing"]["height"], manifest["preprocessing"]["width"]) == (32, 64)
    assert manifest["export_check"]["same_decisions"] and manifest["export_check"]["onnx_vs_torch_max_abs_map_diff"] < 1e-3
    assert shipped.report.is_file()

    detector = ad.load(tmp_path / "models" / "screw")
    assert detector.shape == (32, 64)
    full_size = tmp_path / "part.png"  # a new image at the camera's own size, 200 x 80
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (80, 200, 3), dtype=np.uint8)).save(full_size)
    one = detector.predict(full_size)
    assert one.maps.shape == (1, 32, 64) and one.overlay(0).shape == (32, 64, 3)
    files = detector.predict_files([full_size])
    np.testing.assert_allclose(one.scores, [files[0].score], rtol=1e-5)


def test_data_check_reports_the_aspect_and_the_geometry_auto_picks(wide_mvtec, tiny_mvtec):
    from automl_ad.data.check import check_category, format_report

    wide = format_report(check_category(wide_mvtec, "screw"))
    assert "aspect (width / height): median 2.50, range 2.50;" in wide
    assert "search --geometry auto: keep_aspect (aspect 2.50 width/height; 256 px budget -> 160x416 px)" in wide
    assert "search --geometry auto: square" in format_report(check_category(tiny_mvtec, "screw"))


def test_train_keeps_the_aspect_of_a_wide_product_and_square_on_request(wide_mvtec, tmp_path):
    from click.testing import CliRunner

    from automl_ad.cli import main

    def train(*extra: str):
        return CliRunner().invoke(main, ["train", "-m", "patchcore", "-c", "screw", "--data", str(wide_mvtec),
                                         "--image-size", "32", "--epochs", "1", *extra])

    wide = train("--out", str(tmp_path / "wide"))
    assert wide.exit_code == 0, wide.output
    assert "test images at 32x64 px" in wide.output
    square = train("--out", str(tmp_path / "square"), "--geometry", "square")
    assert square.exit_code == 0, square.output
    assert "test images at 32 px" in square.output
