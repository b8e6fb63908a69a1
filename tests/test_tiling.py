"""Tiling (issue 22 (c)): a model that sees tiles of a larger image, maps stitched back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import automl_ad as ad
from automl_ad.data.geometry import Geometry, resolve
from automl_ad.data.layout import discover_category
from automl_ad.data.tiling import Tiled, Tiling, graph_tiling, inference_graph, training_images
from automl_ad.errors import UserError
from conftest import tiny_space_dir


def test_kolektor_tiles_are_keep_aspect_shapes_cut_from_a_canvas_twice_as_fine():
    tiled = Geometry("tiled", 500 / 1260)  # KolektorSDD's commutator photographs
    assert tiled.input_shape(256) == Geometry("keep_aspect", 500 / 1260).shape(256) == (416, 160)
    tiling = tiled.tiling(256)
    assert tiling.canvas == tiled.shape(256) == (736, 288) and tiling.stride == (320, 128)
    assert tiling.origins == [(0, 0), (0, 128), (320, 0), (320, 128)] and tiled.tiles(256) == 4
    assert Geometry.from_dict(tiled.to_dict()) == Geometry("tiled", round(500 / 1260, 4))
    assert Geometry("keep_aspect", 0.4).tiling(256) is None and Geometry("keep_aspect", 0.4).tiles(256) == 1
    assert not tiled.square and Geometry("tiled", 1.0).shape(256) == (448, 448)
    assert "4 tiles of 416x160 px overlapping by 96x32 px, from each image at 736x288 px" in tiled.describe(256)
    with pytest.raises(UserError, match="tiles per side"):
        Geometry("tiled", 1.0, per_side=0)


def test_split_then_stitch_gives_back_every_canvas_and_an_image_scores_as_its_highest_tile():
    tiling = Tiling.grid((32, 96), 2, (32, 64))
    canvases = torch.rand(3, 1, *tiling.canvas, generator=torch.Generator().manual_seed(0))
    tiles = tiling.split(canvases)
    assert tiles.shape == (3 * 4, 1, 32, 96)
    torch.testing.assert_close(tiles[5], canvases[1, :, 0:32, 64:160])  # image 1, tile 1 (top right)
    torch.testing.assert_close(tiling.stitch(tiles[:, 0]), canvases[:, 0])
    coverage = tiling.coverage()
    assert coverage[0, 0] == 1 and coverage[0, 80] == 2 and coverage.sum() == 4 * 32 * 96
    scores = torch.tensor([0.1, 0.9, 0.2, 0.3, 0.5, 0.4, 0.2, 0.1, 0.0, 0.0, 0.0, 0.7])
    torch.testing.assert_close(tiling.image_scores(scores), torch.tensor([0.9, 0.5, 0.7]))
    assert Tiling.from_dict(tiling.to_dict()) == tiling and Tiling.from_dict(None) is None


class _Brightness(nn.Module):
    """A stand-in detector: each pixel's mean over channels, the image score its max."""

    def forward(self, images):
        maps = images.mean(dim=1) * 2.0
        return maps, maps.flatten(1).amax(dim=1)


def test_a_tiled_method_trains_on_tiles_and_its_graph_scores_whole_canvases():
    method = _Brightness()
    assert inference_graph(method) is method and training_images(method, torch.zeros(2, 3, 8, 8)).shape == (2, 3, 8, 8)
    method.tiling = Tiling.grid((32, 32), 2, (16, 16))
    canvases = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    assert training_images(method, canvases).shape == (8, 3, 32, 32)
    graph = inference_graph(method)
    assert isinstance(graph, Tiled) and inference_graph(graph) is graph and graph_tiling(graph) == method.tiling.to_dict()
    maps, scores = graph(canvases)
    whole_maps, whole_scores = _Brightness()(canvases)  # per pixel, so tiling must change nothing
    torch.testing.assert_close(maps, whole_maps)
    torch.testing.assert_close(scores, whole_scores)
    assert "coverage" not in graph.state_dict(), "a constant of the geometry, not a weight"


def test_tiles_larger_than_the_images_are_one_user_error(large_mvtec, tmp_path):
    from click.testing import CliRunner

    from automl_ad.cli import main

    train = discover_category(large_mvtec, "screw").train
    assert resolve("tiled", train, 64).tiling(64).canvas == (64, 160)
    with pytest.raises(UserError, match="larger than the images"):
        resolve("tiled", train, 512)
    result = CliRunner().invoke(main, ["train", "-m", "patchcore", "-c", "screw", "--data", str(large_mvtec),
                                       "--image-size", "512", "--geometry", "tiled", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "larger than the images (128x320 px, median)" in result.output
    assert not (tmp_path / "x").exists()


def test_train_with_tiles_fits_tiles_and_reports_metrics_on_whole_images(large_mvtec, tmp_path):
    from click.testing import CliRunner

    from automl_ad.cli import main
    from automl_ad.training.loop import load_trained_method

    result = CliRunner().invoke(main, ["train", "-m", "patchcore", "-c", "screw", "--data", str(large_mvtec),
                                       "--image-size", "64", "--geometry", "tiled", "--epochs", "1",
                                       "-p", "weights=random", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "test images at 64x160 px" in result.output
    method, cfg = load_trained_method(tmp_path / "run", "screw")
    assert cfg.tiling == {"tile": [32, 96], "canvas": [64, 160], "stride": [32, 64]}
    assert method.tiling == Tiling.from_dict(cfg.tiling)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test"]["image_auroc"] is not None


def test_a_tiled_search_exports_a_bundle_that_tiles_inside_its_graph(large_mvtec, tmp_path, ray_session):
    result = ad.search("screw", "2trials", data=large_mvtec, storage=tmp_path / "results", experiment="tiled",
                       image_size=64, seed=0, use_ray_train=False, geometry="tiled",
                       space_dir=tiny_space_dir(tmp_path / "spaces"))
    record = json.loads((result.folder / "search.json").read_text())
    assert record["geometry"]["mode"] == "tiled"
    result.ship(tmp_path / "models" / "screw", k=1)
    manifest = json.loads((tmp_path / "models" / "screw" / "manifest.json").read_text())
    pre = manifest["preprocessing"]
    assert (pre["height"], pre["width"]) == (64, 160)
    assert pre["tiling"] == {"tile": [32, 96], "canvas": [64, 160], "stride": [32, 64]}
    assert manifest["export_check"]["same_decisions"] and manifest["export_check"]["onnx_vs_torch_max_abs_map_diff"] < 1e-3

    detector = ad.load(tmp_path / "models" / "screw")
    full_size = tmp_path / "part.png"  # a new image at the camera's own size, 320 x 128
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (128, 320, 3), dtype=np.uint8)).save(full_size)
    one = detector.predict(full_size)
    assert one.maps.shape == (1, 64, 160)
    files = detector.predict_files([full_size])
    np.testing.assert_allclose(one.scores, [files[0].score], rtol=1e-5)


def test_the_plan_costs_every_tile(large_mvtec, tmp_path):
    spaces = tiny_space_dir(tmp_path / "spaces")
    plans = {mode: ad.plan("screw", "2m", data=large_mvtec, image_size=64, space_dir=spaces,
                           storage=tmp_path / "r", geometry=mode, calibrate=False) for mode in ("keep_aspect", "tiled")}
    assert "geometry tiled: every image is 4 model inputs" in plans["tiled"].text()
    assert "4 tiles of 32x96 px" in plans["tiled"].text()
    assert ("geometries that can help these images at 64 px (--geometry; setup and inference a trial against this "
            "search's keep_aspect): square 64 px (1x), keep_aspect 32x96 px (1x), tiled 4 x 32x96 px of 64x160 px "
            "(4x)") in plans["keep_aspect"].text()
    for flat, tiled in zip(plans["keep_aspect"].entries, plans["tiled"].entries):
        for backbone, costs in flat.costs.items():  # a validation scores four times the inputs
            assert tiled.costs[backbone]["val"] == pytest.approx(4 * costs["val"], rel=0.15), flat.key


def test_data_check_offers_tiles_only_where_the_files_hold_the_detail(tmp_path, wide_mvtec):
    from automl_ad.data.check import check_category, format_report

    folder = tmp_path / "big" / "part"
    for sub in ("train/good", "test/good"):
        (folder / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(3):  # 1260 x 500 px, as KolektorSDD's photographs
        Image.fromarray(rng.integers(0, 256, (1260, 500, 3), dtype=np.uint8)).save(folder / "train/good" / f"{index}.png")
    Image.fromarray(rng.integers(0, 256, (1260, 500, 3), dtype=np.uint8)).save(folder / "test/good/0.png")
    big = format_report(check_category(tmp_path / "big", "part"))
    assert "or --geometry tiled: tiled (4 tiles of 416x160 px" in big and "from each image at 736x288 px" in big
    assert "--geometry tiled" not in format_report(check_category(wide_mvtec, "screw")), "80 x 32 px: nothing to gain"


def test_a_pixel_budget_beyond_memory_is_one_line_before_anything_runs(large_mvtec, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import automl_ad.data.geometry as geometry_module
    from automl_ad.cli import main
    from automl_ad.data.geometry import check_memory, data_memory_bytes

    kolektor = Geometry("tiled", 500 / 1260)
    needed = data_memory_bytes(kolektor, 256, 347, 157)  # KolektorSDD's counts at its 736 x 288 canvas
    assert 1.5 * 2**30 < needed < 2.5 * 2**30
    assert data_memory_bytes(Geometry("keep_aspect", 500 / 1260), 256, 347, 157) < needed / 4
    check_memory(kolektor, 256, 347, 157, available=24 * 2**30)  # this VM: fine
    with pytest.raises(UserError, match="more than half of this machine's 2.0 GB; pass a smaller --image-size or "
                                        "--geometry keep_aspect"):
        check_memory(kolektor, 256, 347, 157, available=2 * 2**30)
    monkeypatch.setattr(geometry_module, "machine_memory_bytes", lambda: 2**20)
    result = CliRunner().invoke(main, ["train", "-m", "patchcore", "-c", "screw", "--data", str(large_mvtec),
                                       "--image-size", "64", "--geometry", "tiled", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "before any model" in result.output and not (tmp_path / "x").exists()
    plan = CliRunner().invoke(main, ["search", "-c", "screw", "--data", str(large_mvtec), "--budget", "2m",
                                     "--image-size", "64", "--geometry", "tiled", "--plan"])
    assert plan.exit_code == 2 and "before any model" in plan.output
