"""Bundles: ONNX equals PyTorch on real images, loading runs no pickle, predict on a folder."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from automl_ad.deploy.ensemble import EnsembleModel, RobustScaler
from automl_ad.errors import UserError
from automl_ad.deploy.export import calibrate_threshold, export_bundle, load_bundle
from automl_ad.deploy.predict import expand_inputs, predict_files


class _ConvScorer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 3, padding=1))

    def forward(self, images):
        maps = self.net(images)[:, 0]
        return maps, maps.flatten(1).amax(dim=1)


def _images(n: int = 4, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(3))


def _bundle(tmp_path: Path, threshold: float = 0.0) -> tuple[Path, nn.Module]:
    model = EnsembleModel([_ConvScorer(), _ConvScorer()], [RobustScaler(0.1, 2.0, 0.0, 1.0)] * 2, [1, 1])
    manifest = {"category": "toy", "methods": ["conv", "conv"], "operating_point": {"threshold": threshold}}
    export_bundle(model, tmp_path / "bundle", image_size=32, manifest=manifest, example_images=_images())
    return tmp_path / "bundle", model


def test_bundle_round_trip_equals_pytorch(tmp_path):
    folder, model = _bundle(tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["export_check"]["onnx_vs_torch_max_abs_map_diff"] <= 1e-4
    assert set(manifest["files"]) == {"onnx", "torchscript"}
    bundle = load_bundle(folder)
    images = _images(6)
    maps, scores = bundle.predictor.run(images.numpy())
    ref_maps, ref_scores = model(images)
    assert np.abs(maps - ref_maps.detach().numpy()).max() <= 1e-4
    assert np.array_equal(scores >= 0.0, ref_scores.detach().numpy() >= 0.0)
    scripted = torch.jit.load(str(folder / "model.torchscript.pt"))
    assert torch.allclose(scripted(images)[0], ref_maps, atol=1e-5)


def test_loading_a_bundle_needs_no_pickle(tmp_path, monkeypatch):
    folder, _ = _bundle(tmp_path)
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used while loading a bundle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    bundle = load_bundle(folder)
    assert bundle.predictor.run(_images(1).numpy())[0].shape == (1, 32, 32)


def test_predict_on_a_mixed_folder_reports_the_bad_file_and_scores_the_rest(tmp_path):
    folder, _ = _bundle(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(images / "a.png")
    Image.fromarray(rng.integers(0, 255, (50, 30), dtype=np.uint8)).save(images / "b_gray.jpg")
    (images / "c_broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    results = predict_files(load_bundle(folder), expand_inputs([images]), out_dir=tmp_path / "out", batch_size=2)
    by_name = {Path(r.path).name: r for r in results}
    assert by_name["c_broken.png"].error and by_name["c_broken.png"].score is None
    for name, own_size in (("a.png", (40, 40)), ("b_gray.jpg", (50, 30))):
        assert by_name[name].error is None and by_name[name].score is not None
        # the heat map overlays the file at its own size, not at the network's
        assert np.asarray(Image.open(by_name[name].overlay)).shape == (*own_size, 3)


def test_export_refuses_unknown_formats_and_leaves_nothing(tmp_path):
    model = EnsembleModel([_ConvScorer()], [RobustScaler(0, 1, 0, 1)], [1])
    with pytest.raises(UserError, match="unknown export format"):
        export_bundle(model, tmp_path / "b", image_size=32, manifest={}, example_images=_images(), formats=["onnx", "tflite"])
    assert not (tmp_path / "b").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_threshold_calibration_rules():
    scores = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.9, 0.8])
    labels = torch.tensor([0, 0, 0, 0, 1, 1])
    point = calibrate_threshold(scores, labels)
    assert point["rule"].startswith("f1_max") and 0.4 < point["threshold"] < 0.8 and point["val_recall"] == 1.0
    strict = calibrate_threshold(scores, labels, fpr=0.0)
    assert 0.4 < strict["threshold"] <= 0.8 and strict["val_false_alarm_rate"] == 0.0
    loose = calibrate_threshold(scores, labels, fpr=0.25)
    assert 0.3 < loose["threshold"] <= 0.4 and loose["val_false_alarm_rate"] == 0.25


def test_balanced_f1_does_not_flag_everything_when_anomalies_outnumber_good_images():
    # 4 good images, 40 anomalies of which half score like good ones: plain F1 would flag all.
    good = torch.tensor([0.1, 0.2, 0.3, 0.4])
    anomalies = torch.cat([torch.linspace(0.05, 0.45, 20), torch.linspace(0.8, 1.0, 20)])
    scores, labels = torch.cat([good, anomalies]), torch.cat([torch.zeros(4), torch.ones(40)]).long()
    point = calibrate_threshold(scores, labels)
    assert point["val_false_alarm_rate"] == 0.0 and 0.4 < point["threshold"] <= 0.8 and point["val_recall"] > 0.5


def test_load_bundle_names_a_missing_or_corrupt_manifest(tmp_path):
    with pytest.raises(UserError, match="not a model bundle"):
        load_bundle(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match=r"corrupt .*manifest\.json"):
        load_bundle(tmp_path)


class _FrozenLoop(_ConvScorer):
    """Scores in chunks of two images: tracing at batch 4 unrolls the loop to exactly two
    chunks, so the graph silently drops every image past the fourth."""

    def forward(self, images):
        maps = torch.cat([self.net(images[start:start + 2])[:, 0] for start in range(0, images.shape[0], 2)])
        return maps, maps.flatten(1).amax(dim=1)


def test_a_graph_with_its_batch_size_frozen_by_tracing_is_refused(tmp_path):
    model = EnsembleModel([_FrozenLoop()], [RobustScaler(0, 1, 0, 1)], [1])
    with pytest.raises(RuntimeError, match=r"at batch 5 has shapes \(4, 32, 32\).*frozen during tracing"):
        export_bundle(model, tmp_path / "b", image_size=32, manifest={}, example_images=_images(), formats=["onnx"])
    assert not (tmp_path / "b").exists()


def test_export_shows_and_times_each_step(tmp_path):
    from automl_ad.deploy.progress import DeployProgress

    log = io.StringIO()
    progress = DeployProgress(file=log)
    model = EnsembleModel([_ConvScorer()], [RobustScaler(0, 1, 0, 1)], [1])
    export_bundle(model, tmp_path / "b", image_size=32, manifest={"operating_point": {"threshold": 0.0}},
                  example_images=_images(), progress=progress)
    steps = [t.name for t in progress.timings]
    assert steps == ["export: PyTorch reference on 4 images", "export: ONNX graph", "export: ONNX Runtime session",
                     "export: ONNX vs PyTorch at batches of 4, 1, 5", "export: TorchScript", "export: checksums"]
    assert all(not t.failed and t.seconds >= 0 for t in progress.timings)
    lines = log.getvalue().splitlines()
    assert "export: ONNX graph ..." in lines and any(re.fullmatch(r"export: TorchScript \d+\.\d s", s) for s in lines)
