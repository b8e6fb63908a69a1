"""Shared fixtures and helpers. ``ray_session``: one local Ray instance for the whole test
run, started only when a test asks for it (most tests never import Ray); ``one_torch_thread``
and ``offline_weight_caches`` for the tests of pretrained backbones; ``tiny_mvtec``, a
built-in product on disk. Helpers a test module or a spawned test process calls directly
(``from conftest import toy_category``): ``toy_category``/``toy_val``, a tiny category in
memory, ``make_category``/``make_broken_category``, MVTec-style folders on disk,
``search_options`` over ``TINY_SPACES``, ``build_tiny_experiment`` (a finished search on disk,
with its bundle, written without Ray), and the private test methods ``_tiny_seg`` and ``_two_phase`` (registered here, so
every test module sees them without importing another test module)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from automl_ad.data.types import CategoryData, ImageSet
from automl_ad.methods.base import Batch, Method, register
from automl_ad.evaluation.validation import val_set_for

if TYPE_CHECKING:
    from automl_ad.tuning.search import SearchOptions

REPO = Path(__file__).resolve().parents[1]


@dataclass
class _TinyConfig:
    lr: float = 1e-2
    width: int = 4


@register
class _TinySegmenter(Method):
    """A two-layer segmenter: enough to learn pasted squares at 32 px."""

    name = "_tiny_seg"
    synthesis = "cutpaste"
    Config = _TinyConfig

    def __init__(self, config: _TinyConfig, image_size: int, category: str) -> None:
        super().__init__(config, image_size, category)
        self.net = nn.Sequential(
            nn.Conv2d(3, config.width, 3, padding=1), nn.ReLU(), nn.Dropout2d(0.1), nn.Conv2d(config.width, 1, 3, padding=1)
        )

    def training_step(self, batch: Batch, phase: str) -> dict[str, torch.Tensor]:
        logits = self.net(batch.images)
        return {"loss": nn.functional.binary_cross_entropy_with_logits(logits, batch.masks)}

    def anomaly_map(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(images))[:, 0]


@register
class _TwoPhase(_TinySegmenter):
    name = "_two_phase"
    phases = ("first", "second")
    synthesis = None

    def training_step(self, batch: Batch, phase: str) -> dict[str, torch.Tensor]:
        target = batch.clean.mean(dim=1, keepdim=True) * (1.0 if phase == "first" else 0.5)
        return {"loss": nn.functional.mse_loss(self.net(batch.images), target)}


def toy_category(n_fit: int = 16, size: int = 32, seed: int = 0) -> CategoryData:
    """A tiny uint8 category: a horizontal ramp plus noise; test has 2 good images and 2
    with a bright square (pixel masks). Seeded, no files."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.linspace(60, 180, size).view(1, 1, 1, size).expand(n_fit + 8, 3, size, size)
    noise = torch.randint(0, 20, (n_fit + 8, 3, size, size), generator=generator)
    images = (base + noise).clamp(0, 255).to(torch.uint8)
    test_images = images[n_fit + 4 :].clone()
    masks = torch.zeros(4, 1, size, size, dtype=torch.uint8)
    test_images[2:, :, 8:16, 8:16] = 255
    masks[2:, :, 8:16, 8:16] = 1
    test = ImageSet(
        images=test_images,
        masks=masks,
        labels=torch.tensor([0, 0, 1, 1]),
        has_mask=torch.ones(4, dtype=torch.bool),
        defect_types=["good", "good", "spot", "spot"],
        paths=[""] * 4,
    )
    return CategoryData("toy", Path("."), size, images[:n_fit], images[n_fit : n_fit + 4], test, "f" * 8)


def toy_val(data: CategoryData) -> ImageSet:
    """val-good + the two defective test images relabelled perlin/cutpaste, as a trial
    trained with cutpaste would validate on (cutpaste's is left out)."""
    anomalies = data.test.subset([2, 3])
    anomalies.defect_types = ["perlin", "cutpaste"]
    return val_set_for(data.val_good, anomalies, train_family="cutpaste")


# The tiny search space the search tests run: two from-scratch methods at 4-8 channels.
TINY_SPACES = {
    "draem": {
        "method": "draem",
        "synthesis": ["perlin", "cutpaste"],
        "params": {
            "lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-3, "log": True, "default": 3.0e-4},
            "rec_width": {"type": "int", "low": 4, "high": 8, "step": 4, "default": 4},
            "disc_width": {"type": "categorical", "choices": [4], "default": 4},
        },
    },
    "ssae": {
        "method": "ssae",
        "synthesis": ["corruption"],
        "params": {
            "lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-3, "log": True, "default": 3.0e-4},
            "width": {"type": "categorical", "choices": [4, 8], "default": 4},
            "depth": {"type": "int", "low": 1, "high": 2, "default": 1},
        },
    },
}
TINY_FIDELITY = {"max_epochs": 2, "grace_period": 1, "reduction_factor": 2, "steps_per_epoch": 2, "batch_size": 4}


def tiny_space_dir(folder: Path) -> Path:
    """A whole space folder (``space_dir``): the shipped common.yaml with TINY_FIDELITY,
    and TINY_SPACES' methods only."""
    import yaml

    from automl_ad.tuning.space import packaged_space_files

    folder.mkdir(parents=True, exist_ok=True)
    common = yaml.safe_load(packaged_space_files()["common"].read_text())
    common["fidelity"] = TINY_FIDELITY
    (folder / "common.yaml").write_text(yaml.safe_dump(common))
    for name, spec in TINY_SPACES.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    return folder


def search_options(tmp_path: Path, data: Path, **overrides: Any) -> "SearchOptions":
    """SearchOptions of a tiny search on ``data`` under ``tmp_path`` (imported lazily:
    the search module imports Ray, which most tests never need)."""
    from automl_ad.tuning.search import SearchOptions

    base = dict(category="screw", budget="3trials", data=data, storage=tmp_path / "results", experiment="exp",
                image_size=32, use_train=False, live=False, seed=0, space_dir=tiny_space_dir(tmp_path / "spaces"))
    base.update(overrides)
    return SearchOptions(**base)


# --- image folders on disk (test_data, test_cli_data) ----------------------------------

IMAGE_SIDE = 32


def random_rgb(seed: int, height: int = IMAGE_SIDE, width: int = IMAGE_SIDE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def save_rgb(path: Path, seed: int, height: int = IMAGE_SIDE, width: int = IMAGE_SIDE) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = random_rgb(seed, height, width)
    Image.fromarray(pixels).save(path)
    return pixels


def save_mask(path: Path, box: tuple[int, int, int, int], height: int = IMAGE_SIDE, width: int = IMAGE_SIDE) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((height, width), np.uint8)
    top, left, bottom, right = box
    mask[top:bottom, left:right] = 255
    Image.fromarray(mask).save(path)
    return mask > 0


def make_category(root: Path, name: str = "widget", *, with_masks: bool = True) -> dict[str, object]:
    """A small MVTec-style category mixing every source format the loader converts."""
    folder = root / name
    train = folder / "train" / "good"
    train.mkdir(parents=True)
    Image.fromarray(random_rgb(1)).save(train / "000.png")
    Image.fromarray(random_rgb(2)[..., 0]).save(train / "001.png")  # grayscale L
    rgba = np.dstack([random_rgb(3), np.full((IMAGE_SIDE, IMAGE_SIDE), 7, np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(train / "002.png")
    Image.fromarray((np.arange(IMAGE_SIDE * IMAGE_SIDE).reshape(IMAGE_SIDE, IMAGE_SIDE) * 60).astype(np.uint16)).save(train / "003.png")
    Image.fromarray(random_rgb(4)).save(train / "004.JPG", quality=95)  # upper-case suffix
    Image.fromarray(random_rgb(5)).save(train / "005.bmp")
    (train / ".DS_Store").write_bytes(b"junk")  # hidden files are skipped silently
    save_rgb(folder / "test" / "good" / "000.png", 10)
    save_rgb(folder / "test" / "good" / "001.png", 11)
    save_rgb(folder / "test" / "crack" / "000.png", 20)
    save_rgb(folder / "test" / "crack" / "001.png", 21)
    save_rgb(folder / "test" / "stain" / "000.png", 30)  # stain never has masks
    masks = {}
    if with_masks:
        masks["crack/000"] = save_mask(folder / "ground_truth" / "crack" / "000_mask.png", (0, 0, 8, 8))
        masks["crack/001"] = save_mask(folder / "ground_truth" / "crack" / "001_mask.png", (8, 8, 24, 24))
    return {"folder": folder, "masks": masks, "n_train": 6, "n_test": 5}


def make_broken_category(root: Path, name: str = "broken") -> dict[str, Path]:
    """One of each problem ``check`` must report."""
    folder = root / name
    for index in range(3):
        save_rgb(folder / "train" / "good" / f"{index:03d}.png", index)
    truncated = folder / "train" / "good" / "003.png"
    good_bytes = (folder / "train" / "good" / "000.png").read_bytes()
    truncated.write_bytes(good_bytes[: len(good_bytes) // 2])
    save_rgb(folder / "test" / "good" / "000.png", 40)
    save_rgb(folder / "test" / "crack" / "000.png", 41)
    save_mask(folder / "ground_truth" / "crack" / "000_mask.png", (0, 0, 4, 4))
    without_mask = folder / "test" / "crack" / "001.png"
    save_rgb(without_mask, 42)
    wrong_size_image = folder / "test" / "crack" / "002.png"
    save_rgb(wrong_size_image, 43)
    wrong_size_mask = folder / "ground_truth" / "crack" / "002_mask.png"
    save_mask(wrong_size_mask, (0, 0, 4, 4), height=IMAGE_SIDE + 8, width=IMAGE_SIDE)
    orphan_mask = folder / "ground_truth" / "crack" / "099_mask.png"
    save_mask(orphan_mask, (0, 0, 4, 4))
    unknown_top = folder / "foo"
    unknown_top.mkdir()
    nested = folder / "test" / "crack" / "sub"
    nested.mkdir()
    save_rgb(nested / "x.png", 44)
    return {
        "truncated": truncated,
        "without_mask": without_mask,
        "wrong_size_mask": wrong_size_mask,
        "orphan_mask": orphan_mask,
        "unknown_top": unknown_top,
        "nested": nested,
    }


# Tests that start Ray, an S3 server or a cluster are marked slow by the fixtures they use
# (no list of test names to keep); `pytest -m "not slow"` runs the rest in a few minutes,
# `make test` and CI run everything. Tests that start a cluster or a browser themselves
# carry the marker in their module.
SLOW_FIXTURES = frozenset({"ray_session", "s3_server"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module")
def one_torch_thread():
    """The machine's 2 cores are shared: two torch threads each thrash (10x slower here)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def offline_weight_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Empty torch and Hugging Face caches and no downloads: weights must come from a
    file, a cache the test fills, or the packaged checkpoint."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("AUTOML_AD_ALLOW_DOWNLOAD", raising=False)
    return tmp_path


_RAY_SESSION_STARTED = False


@pytest.fixture(autouse=True)
def own_learned_costs(tmp_path_factory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test plans from its own (empty) history of trial costs: what one test's tiny
    trials cost must not rescale the plan of the next (tuning/learned_costs.py)."""
    path = tmp_path_factory.mktemp("learned") / "learned_costs.json"
    monkeypatch.setenv("AUTOML_AD_LEARNED_COSTS", str(path))
    return path


@pytest.fixture(autouse=True)
def no_stray_ray():
    """A test that starts Ray in this process without ``ray_session`` (a refused search that
    got as far as ray.init, say) fails here, not as 'ray.init twice' in a later module."""
    yield
    ray = sys.modules.get("ray")
    if ray is not None and not _RAY_SESSION_STARTED and ray.is_initialized():
        ray.shutdown()
        pytest.fail("this test left a Ray instance running in the test process")


@pytest.fixture(scope="session")
def ray_session():
    global _RAY_SESSION_STARTED
    import ray

    _RAY_SESSION_STARTED = True

    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # address="local": never join a cluster a stale ray_current_cluster file points at.
    # The dashboard stays on: Train's placement-group cleanup after an ASHA stop needs it.
    ray.init(
        address="local",
        num_cpus=2,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "WANDB_SILENT": "true"},
                     # as run_search does: Train's placement-group cleaner must find this
                     # Ray even while a test runs a second one in a subprocess
                     "worker_process_setup_hook": "automl_ad.tuning.ray_setup.pin_ray_address"},
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_mvtec(tmp_path_factory) -> Path:
    """A tiny MVTec-style built-in ``screw`` folder (12 train, 6 test images, 32 px)."""
    from automl_ad.data.builtin import generate_builtin

    root = tmp_path_factory.mktemp("mvtec")
    generate_builtin(root, ["screw"], n_train=12, n_test=6, image_size=32, seed=0)
    return root


@pytest.fixture(scope="session")
def wide_mvtec(tiny_mvtec, tmp_path_factory) -> Path:
    """``tiny_mvtec``'s screw with every image and mask stretched to 80 x 32 px (width x
    height): a product whose parts are not square (data.geometry)."""
    return _resized_screw(tiny_mvtec, tmp_path_factory.mktemp("wide"), (80, 32))


@pytest.fixture(scope="session")
def large_mvtec(tiny_mvtec, tmp_path_factory) -> Path:
    """``tiny_mvtec``'s screw at 320 x 128 px (width x height): wide parts photographed at
    a higher resolution than a 64 px budget keeps, the case tiling is for (data.tiling)."""
    return _resized_screw(tiny_mvtec, tmp_path_factory.mktemp("large"), (320, 128))


def _resized_screw(source: Path, root: Path, size: tuple[int, int]) -> Path:
    """A copy of ``source``'s screw under ``root`` with every image and mask at ``size``
    (width, height); masks resized nearest, so they stay binary."""
    import shutil

    shutil.copytree(source / "screw", root / "screw")
    for path in (root / "screw").rglob("*.png"):
        image = Image.open(path)
        image.resize(size, Image.Resampling.NEAREST if "ground_truth" in path.parts else
                     Image.Resampling.BILINEAR).save(path)
    return root


# --- a finished search on disk (without Ray), for the report and the damaged-file tests ---

TINY_EXPERIMENT_CATEGORY = "washer"
TINY_EXPERIMENT_SIZE = 32
# CFA with random backbones trains in seconds and exports cleanly; the failed DRAEM row
# is what a crashed trial leaves (no objective, no checkpoint) and must not break the page.
TINY_EXPERIMENT_TRIALS = (
    ("t_cfa_r18_k3", "cfa", "none", {"lr": 1e-3, "K": 3, "backbone": "resnet18", "weights": "random"}),
    ("t_cfa_r18_k1", "cfa", "none", {"lr": 3e-3, "K": 1, "backbone": "resnet18", "weights": "random"}),
    ("t_cfa_eff", "cfa", "none", {"lr": 2e-3, "K": 2, "backbone": "efficientnet_lite0", "weights": "random"}),
)
TINY_EXPERIMENT_FAILED_TRIAL = "t_draem_crashed"


def build_tiny_experiment(root: Path) -> tuple[Path, Path]:
    """A finished search as the search writes it (without Ray), plus its bundle.

    Returns (experiment folder, bundle folder)."""
    from automl_ad.results import store
    from automl_ad.data.builtin import generate_builtin
    from automl_ad.data.dataset import load_category
    from automl_ad.deploy.choice import choose_model, export_choice
    from automl_ad.experiment import SEARCH_RECORD
    from automl_ad.training.loop import TrainConfig, fit
    from automl_ad.tuning.trainable import objective_noise
    from automl_ad.evaluation.validation import build_val_anomalies, save_image_set, val_set_for

    data_root = generate_builtin(root / "data", [TINY_EXPERIMENT_CATEGORY], n_train=16, n_test=8, image_size=TINY_EXPERIMENT_SIZE)
    folder = root / "results" / "exp1"
    folder.mkdir(parents=True)
    (folder / SEARCH_RECORD).write_text(json.dumps(
        {"category": TINY_EXPERIMENT_CATEGORY, "data": str(data_root), "seed": 0, "image_sizes": [TINY_EXPERIMENT_SIZE], "budget": "1cpu-h"}))
    data = load_category(data_root, TINY_EXPERIMENT_CATEGORY, TINY_EXPERIMENT_SIZE, seed=0, cache_dir=folder / "cache")
    anomalies = build_val_anomalies(data, seed=0)
    save_image_set(anomalies, folder / "val" / f"val_anomalies_{TINY_EXPERIMENT_SIZE}px.safetensors")

    clock = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.timezone.utc)
    for index, (trial_id, method, family, params) in enumerate(TINY_EXPERIMENT_TRIALS):
        cfg = TrainConfig(method=method, method_params=params, synthesis=family, image_size=TINY_EXPERIMENT_SIZE, epochs=1,
                          steps_per_epoch=2, batch_size=4, seed=index, eval_batch_size=64)
        checkpoint = folder / "checkpoints" / trial_id
        val_set = val_set_for(data.val_good, anomalies, None if family == "none" else family)
        result = fit(cfg, data, val_set, checkpoint_dir=checkpoint)
        flat = {"method": method, f"{method}.synthesis": None if family == "none" else family,
                "image_size": TINY_EXPERIMENT_SIZE, **{f"{method}.{k}": v for k, v in params.items()}}
        started = clock + dt.timedelta(minutes=10 * index)
        # What the search driver hands the store for a finished trial (store.TrialOutcome).
        store.store_trial(folder, store.TrialOutcome(
            experiment=folder.name, category=TINY_EXPERIMENT_CATEGORY, trial_id=trial_id, method=method,
            backbone=params.get("backbone"), synthesis=family, image_size=TINY_EXPERIMENT_SIZE, params=flat, status="finished",
            result={"epoch": 1, **{f"val_{k}": v for k, v in result.val.items()}, "objective": result.objective,
                    **objective_noise(result.val, val_set), **{f"test_{k}": v for k, v in result.test.items()}},
            max_epochs=1, wall_s=60.0 + index, devices=1.0, device_kind="cpu", budget_used=0.01 * (index + 1),
            seed=index, checkpoint=str(checkpoint), started=started, ended=started + dt.timedelta(minutes=5),
        ), [dataclasses.asdict(report) for report in result.reports])
    failed_start = clock + dt.timedelta(minutes=10 * len(TINY_EXPERIMENT_TRIALS))
    store.store_trial(folder, store.TrialOutcome(
        experiment=folder.name, category=TINY_EXPERIMENT_CATEGORY, trial_id=TINY_EXPERIMENT_FAILED_TRIAL, method="draem", synthesis="perlin",
        image_size=TINY_EXPERIMENT_SIZE, params={"method": "draem", "draem.lr": 1e-4}, status="error", result={}, max_epochs=1,
        wall_s=3.0, devices=1.0, device_kind="cpu", budget_used=0.001, seed=len(TINY_EXPERIMENT_TRIALS), started=failed_start,
        ended=failed_start + dt.timedelta(seconds=3), error="RuntimeError: out of memory",
    ))
    bundle = root / "models" / TINY_EXPERIMENT_CATEGORY
    choice = choose_model(folder, k=3, top=3)
    export_choice(folder, choice, bundle, formats=["onnx"])
    return folder, bundle
