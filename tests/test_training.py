"""The generic loop: reports, hook, checkpoints, bit-exact resume, validation sets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import toy_category, toy_val

from automl_ad.errors import UserError
from automl_ad.training.loop import TrainConfig, evaluate, fit, load_trained_method, predict
from automl_ad.evaluation.validation import good_set, objective


def test_val_set_excludes_the_trial_family_and_keeps_good_images():
    data = toy_category()
    val = toy_val(data)
    assert val.defect_types.count("good") == len(data.val_good)
    assert "cutpaste" not in val.defect_types and "perlin" in val.defect_types
    assert int(val.labels.sum()) == 1


def test_objective_is_val_image_auroc_and_ignores_aupro():
    assert objective({"image_auroc": 0.8, "aupro": 0.6}) == pytest.approx(0.8)
    assert objective({"image_auroc": 0.8, "aupro": 0.99}) == pytest.approx(0.8)
    assert objective({"image_auroc": 0.8, "aupro": None}) == pytest.approx(0.8)
    assert objective({"image_auroc": None}) == 0.0


def test_fit_reports_every_epoch_and_hook_can_stop(tmp_path):
    data = toy_category()
    seen = []

    def hook(report, checkpoint_dir):
        seen.append((report.epoch, (Path(checkpoint_dir) / "checkpoint.pt").exists()))
        return report.epoch == 2

    cfg = TrainConfig(method="_tiny_seg", image_size=32, epochs=4, steps_per_epoch=3, batch_size=4)
    result = fit(cfg, data, toy_val(data), checkpoint_dir=tmp_path, on_epoch=hook)
    assert seen == [(1, True), (2, True)]
    assert result.stopped_early and len(result.reports) == 2
    assert set(result.test) >= {"image_auroc", "pixel_auroc", "aupro"}
    assert result.reports[-1].step == 6


def test_resume_continues_bit_exactly(tmp_path):
    data = toy_category()
    cfg = TrainConfig(method="_tiny_seg", image_size=32, epochs=4, steps_per_epoch=3, batch_size=4, seed=3)
    straight = fit(cfg, data, toy_val(data), checkpoint_dir=tmp_path / "a", evaluate_test=False)

    fit(cfg, data, toy_val(data), checkpoint_dir=tmp_path / "b", on_epoch=lambda r, d: r.epoch == 2, evaluate_test=False)
    resumed = fit(cfg, data, toy_val(data), checkpoint_dir=tmp_path / "b", resume_from=tmp_path / "b", evaluate_test=False)

    assert [r.train_loss for r in resumed.reports] == [r.train_loss for r in straight.reports]
    for key, value in straight.method.state_dict().items():
        assert torch.equal(value, resumed.method.state_dict()[key]), key


def test_two_phase_resume_across_the_phase_boundary(tmp_path):
    data = toy_category()
    cfg = TrainConfig(method="_two_phase", image_size=32, epochs=4, steps_per_epoch=2, batch_size=4, seed=1)
    straight = fit(cfg, data, toy_val(data), evaluate_test=False)
    assert [r.phase for r in straight.reports] == ["first", "first", "second", "second"]
    fit(cfg, data, toy_val(data), checkpoint_dir=tmp_path, on_epoch=lambda r, d: r.epoch == 2, evaluate_test=False)
    resumed = fit(cfg, data, toy_val(data), checkpoint_dir=tmp_path, resume_from=tmp_path, evaluate_test=False)
    assert [r.train_loss for r in resumed.reports] == [r.train_loss for r in straight.reports]


def test_checkpoint_loads_with_weights_only_and_rebuilds_the_model(tmp_path):
    data = toy_category()
    cfg = TrainConfig(method="_tiny_seg", image_size=32, epochs=1, steps_per_epoch=2, batch_size=4)
    result = fit(cfg, data, toy_val(data), checkpoint_dir=tmp_path, evaluate_test=False)
    torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    method, loaded_cfg = load_trained_method(tmp_path, "toy")
    assert loaded_cfg == cfg
    maps_a, scores_a = predict(result.method, data.test.images, torch.device("cpu"), 8)
    maps_b, scores_b = predict(method, data.test.images, torch.device("cpu"), 8)
    assert torch.equal(maps_a, maps_b) and torch.equal(scores_a, scores_b)


def test_loss_decreases_and_reported_val_matches_a_fresh_evaluation():
    data = toy_category(n_fit=24)
    val = toy_val(data)
    cfg = TrainConfig(method="_tiny_seg", image_size=32, epochs=3, steps_per_epoch=15, batch_size=8, seed=0)
    result = fit(cfg, data, val)
    assert result.reports[-1].train_loss < result.reports[0].train_loss
    assert evaluate(result.method, val, torch.device("cpu")) == result.val
    assert result.objective == objective(result.val)


def test_bad_config_is_a_user_error():
    with pytest.raises(UserError):
        TrainConfig(method="_tiny_seg", epochs=0)
    with pytest.raises(UserError, match="unknown method"):
        fit(TrainConfig(method="nope", image_size=32), toy_category(), good_set(toy_category().val_good))


def test_fit_leaves_the_process_random_stream_and_allocator_alone(tmp_path):
    """Process-wide state is the caller's (the CLI, the trial worker): fit trains on its own
    copy of torch's global RNG and never tunes the allocator itself."""
    import automl_ad.training.loop

    assert not hasattr(automl_ad.training.loop, "tune_cpu_allocator"), "the training loop does not tune the allocator"
    data = toy_category()
    cfg = TrainConfig(method="_tiny_seg", image_size=32, epochs=1, steps_per_epoch=2, batch_size=4, seed=5)
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    first = fit(cfg, data, toy_val(data), checkpoint_dir=tmp_path / "a")
    assert torch.equal(torch.get_rng_state(), before), "the caller's random stream is where it was"
    second = fit(cfg, data, toy_val(data), checkpoint_dir=tmp_path / "b")
    assert first.objective == second.objective, "and training is still seeded by cfg.seed alone"
