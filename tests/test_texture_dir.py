"""--texture-dir: DRAEM's anomaly-source folder travels from the search's options to the
synthesizer every trial builds, and a resume keeps the folder its trials so far used."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from automl_ad.data.geometry import Geometry
from automl_ad.errors import UserError
from automl_ad.param_keys import family_key, size_key
from automl_ad.training.loop import TrainConfig, _build
from automl_ad.tuning.devices import DevicePlan, trial_context
from automl_ad.tuning.options import SearchOptions
from automl_ad.tuning.search import _with_texture_dir
from automl_ad.tuning.space import load_space
from automl_ad.tuning.trainable import train_config


def _textures(folder: Path, count: int = 2) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / f"t{i}.png")
    return folder


def test_a_new_search_checks_the_folder_and_makes_it_absolute(tmp_path, monkeypatch):
    _textures(tmp_path / "dtd")
    monkeypatch.chdir(tmp_path)
    opts = _with_texture_dir(SearchOptions(category="screw", budget="2trials", texture_dir=Path("dtd")), None)
    assert opts.texture_dir == (tmp_path / "dtd").resolve()
    assert _with_texture_dir(SearchOptions(category="screw", budget="2trials"), None).texture_dir is None


def test_a_resume_keeps_the_stored_folder_and_refuses_another(tmp_path):
    kept = _textures(tmp_path / "dtd")
    other = _textures(tmp_path / "other")
    saved = {"texture_dir": str(kept.resolve())}
    resumed = _with_texture_dir(SearchOptions(category="screw", budget="2trials", resume=True), saved)
    assert resumed.texture_dir == kept.resolve()
    with pytest.raises(UserError, match="--texture-dir .* differs"):
        _with_texture_dir(SearchOptions(category="screw", budget="2trials", resume=True, texture_dir=other), saved)


def test_every_trial_builds_its_perlin_synthesizer_on_the_folder(tmp_path):
    folder = _textures(tmp_path / "dtd").resolve()
    opts = SearchOptions(category="screw", budget="2trials", texture_dir=folder)
    devices = DevicePlan(use_gpu=False, gpus=0.0, autoscale_gpus=False, driver_resource=None, max_concurrent=1)
    context = trial_context(opts, devices, load_space(["draem"], image_size=32), geometry=Geometry())
    cfg = train_config(context, {"method": "draem", family_key("draem"): "perlin", size_key("draem"): 32})
    assert cfg.texture_dir == str(folder)

    product = SimpleNamespace(category="screw", fit=[0])  # all _build reads of the data
    _, synthesizer = _build(cfg, product, torch.device("cpu"))
    assert Path(synthesizer.texture_dir) == folder
    _, default = _build(TrainConfig(method="draem", image_size=32), product, torch.device("cpu"))
    assert default.texture_dir is None
