"""The generic loop: reports, hook, checkpoints, bit-exact resume, validation sets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from automl_ad.data.types import CategoryData, ImageSet
from automl_ad.errors import UserError
from automl_ad.methods.base import Batch, Method, register
from automl_ad.training import TrainConfig, evaluate, fit, load_trained_method, predict
from automl_ad.validation import good_set, objective, val_set_for


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


def _category(n_fit: int = 16, size: int = 32, seed: int = 0) -> CategoryData:
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


def _val(data: CategoryData) -> ImageSet:
    anomalies = data.test.subset([2, 3])
    anomalies.defect_types = ["perlin", "cutpaste"]
    return val_set_for(data.val_good, anomalies, train_family="cutpaste")


def test_val_set_excludes_the_trial_family_and_keeps_good_images():
    data = _category()
    val = _val(data)
    assert val.defect_types.count("good") == len(data.val_good)
    assert "cutpaste" not in val.defect_types and "perlin" in val.defect_types
    assert int(val.labels.sum()) == 1


def test_objective_is_val_image_auroc_and_ignores_aupro():
    assert objective({"image_auroc": 0.8, "aupro": 0.6}) == pytest.approx(0.8)
    assert objective({"image_auroc": 0.8, "aupro": 0.99}) == pytest.approx(0.8)
    assert objective({"image_auroc": 0.8, "aupro": None}) == pytest.approx(0.8)
    assert objective({"image_auroc": None}) == 0.0


def test_fit_reports_every_epoch_and_hook_can_stop(tmp_path):
    data = _category()
    seen = []

    def hook(report, checkpoint_dir):
        seen.append((report.epoch, (Path(checkpoint_dir) / "checkpoint.pt").exists()))
        return report.epoch == 2

    cfg = TrainConfig(method="_tiny_seg", image_size=32, epochs=4, steps_per_epoch=3, batch_size=4)
    result = fit(cfg, data, _val(data), checkpoint_dir=tmp_path, on_epoch=hook)
    assert seen == [(1, True), (2, True)]
    assert result.stopped_early and len(result.reports) == 2
    assert set(result.test) >= {"image_auroc", "pixel_auroc", "aupro"}
    assert result.reports[-1].step == 6


def test_resume_continues_bit_exactly(tmp_path):
    data = _category()
    cfg = TrainConfig(method="_tiny_seg", image_size=32, epochs=4, steps_per_epoch=3, batch_size=4, seed=3)
    straight = fit(cfg, data, _val(data), checkpoint_dir=tmp_path / "a", evaluate_test=False)

    fit(cfg, data, _val(data), checkpoint_dir=tmp_path / "b", on_epoch=lambda r, d: r.epoch == 2, evaluate_test=False)
    resumed = fit(cfg, data, _val(data), checkpoint_dir=tmp_path / "b", resume_from=tmp_path / "b", evaluate_test=False)

    assert [r.train_loss for r in resumed.reports] == [r.train_loss for r in straight.reports]
    for key, value in straight.method.state_dict().items():
        assert torch.equal(value, resumed.method.state_dict()[key]), key


def test_two_phase_resume_across_the_phase_boundary(tmp_path):
    data = _category()
    cfg = TrainConfig(method="_two_phase", image_size=32, epochs=4, steps_per_epoch=2, batch_size=4, seed=1)
    straight = fit(cfg, data, _val(data), evaluate_test=False)
    assert [r.phase for r in straight.reports] == ["first", "first", "second", "second"]
    fit(cfg, data, _val(data), checkpoint_dir=tmp_path, on_epoch=lambda r, d: r.epoch == 2, evaluate_test=False)
    resumed = fit(cfg, data, _val(data), checkpoint_dir=tmp_path, resume_from=tmp_path, evaluate_test=False)
    assert [r.train_loss for r in resumed.reports] == [r.train_loss for r in straight.reports]


def test_checkpoint_loads_with_weights_only_and_rebuilds_the_model(tmp_path):
    data = _category()
    cfg = TrainConfig(method="_tiny_seg", image_size=32, epochs=1, steps_per_epoch=2, batch_size=4)
    result = fit(cfg, data, _val(data), checkpoint_dir=tmp_path, evaluate_test=False)
    torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    method, loaded_cfg = load_trained_method(tmp_path, "toy")
    assert loaded_cfg == cfg
    maps_a, scores_a = predict(result.method, data.test.images, torch.device("cpu"), 8)
    maps_b, scores_b = predict(method, data.test.images, torch.device("cpu"), 8)
    assert torch.equal(maps_a, maps_b) and torch.equal(scores_a, scores_b)


def test_loss_decreases_and_reported_val_matches_a_fresh_evaluation():
    data = _category(n_fit=24)
    val = _val(data)
    cfg = TrainConfig(method="_tiny_seg", image_size=32, epochs=3, steps_per_epoch=15, batch_size=8, seed=0)
    result = fit(cfg, data, val)
    assert result.reports[-1].train_loss < result.reports[0].train_loss
    assert evaluate(result.method, val, torch.device("cpu")) == result.val
    assert result.objective == objective(result.val)


def test_bad_config_is_a_user_error():
    with pytest.raises(UserError):
        TrainConfig(method="_tiny_seg", epochs=0)
    with pytest.raises(UserError, match="unknown method"):
        fit(TrainConfig(method="nope", image_size=32), _category(), good_set(_category().val_good))
