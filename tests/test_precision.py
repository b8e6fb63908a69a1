"""The training loop's GPU speed path (training/precision.py), proven on the CPU: each
method's precision switch, autocast (bf16 and fp16 run on a CPU too), fp16's GradScaler in
checkpoints, channels_last, the block-wise loss read-back, and that precision auto on a
CPU changes nothing."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from conftest import _TinySegmenter, toy_category, toy_val

from automl_ad.errors import UserError
from automl_ad.methods.base import (
    PRECISION_DTYPES, Batch, Precision, _precision_of, available_methods, create_method, get_method_class,
    packaged_spec, register,
)
from automl_ad.methods._layers import ssim
from automl_ad.training import loop
from automl_ad.training.loop import TrainConfig, fit
from automl_ad.training.precision import SpeedPath, sync_every
from automl_ad.tuning.space import load_space

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a CUDA device object needs no GPU


@register
class _NanAtStep3(_TinySegmenter):
    """The toy segmenter whose loss turns NaN on its fourth step (step index 3)."""

    name = "_nan_at_step3"

    def __init__(self, config, image_size: int, category: str) -> None:
        super().__init__(config, image_size, category)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def training_step(self, batch: Batch, phase: str) -> dict[str, torch.Tensor]:
        loss = super().training_step(batch, phase)["loss"]
        self.calls += 1
        return {"loss": loss * float("nan") if int(self.calls) == 4 else loss}


def _cfg(method: str = "_tiny_seg", **overrides) -> TrainConfig:
    return TrainConfig(**{"method": method, "image_size": 32, "epochs": 2, "steps_per_epoch": 3, "batch_size": 4,
                          "seed": 2, **overrides})


def test_every_built_in_method_has_a_switch_with_its_reason():
    for name in available_methods():
        cls = get_method_class(name)
        if packaged_spec(name) is None:
            continue  # a test helper registered from outside the package
        entry = packaged_spec(name)["precision"]
        assert cls.precision == Precision(entry["dtype"], entry["channels_last"], entry["reason"]), name
        assert cls.precision.dtype in PRECISION_DTYPES and len(cls.precision.reason) > 40, name
    # what the switch encodes: flows (log-det) and memory-bank distances stay in fp32
    for risky in ("ast", "cfa", "patchcore"):
        assert get_method_class(risky).precision.dtype == "fp32", risky
    for conv_net in ("draem", "nsa", "ssae"):
        assert get_method_class(conv_net).precision == Precision("bf16", True, get_method_class(conv_net).precision.reason)


@pytest.mark.parametrize("entry,needle", [
    ({"dtype": "fp8", "reason": "x"}, "precision.dtype must be one of"),
    ({"dtype": "bf16"}, "precision.reason"),
    ({"dtype": "bf16", "reason": "ok", "channels_last": "yes"}, "channels_last must be true or false"),
    ({"dtype": "bf16", "reason": "ok", "speed": 2}, "expected {dtype"),
])
def test_a_malformed_precision_entry_is_one_line_naming_the_file(entry, needle):
    with pytest.raises(UserError, match=needle):
        _precision_of({"precision": entry}, "x/space.yaml")
    assert _precision_of({}, "x/space.yaml") == Precision(), "no entry: fp32"


def test_a_search_space_cannot_change_the_switch(tmp_path):
    user = tmp_path / "mine.yaml"
    user.write_text(yaml.safe_dump({"methods": {"draem": {"precision": {"dtype": "fp16", "reason": "faster"}}}}))
    with pytest.raises(UserError, match="precision: the GPU speed switch is the method's own"):
        load_space(["draem"], user_file=user)


def test_auto_is_the_switch_on_cuda_and_fp32_on_a_cpu():
    draem, cfa = get_method_class("draem"), get_method_class("cfa")
    on_cpu = SpeedPath.resolve("auto", draem, CPU)
    assert (on_cpu.dtype, on_cpu.channels_last, on_cpu.mixed) == ("fp32", False, False)
    on_gpu = SpeedPath.resolve("auto", draem, CUDA)
    assert (on_gpu.dtype, on_gpu.channels_last) == (draem.precision.dtype, draem.precision.channels_last)
    assert SpeedPath.resolve("auto", cfa, CUDA).dtype == "fp32"
    asked = SpeedPath.resolve("bf16", cfa, CPU)
    assert asked.dtype == "bf16" and not asked.channels_last, "channels_last only on CUDA"
    assert SpeedPath.resolve("fp16", draem, CPU).grad_scaler() is not None
    assert SpeedPath.resolve("bf16", draem, CPU).grad_scaler() is None, "bf16 keeps fp32's range: no scaler"
    with pytest.raises(UserError, match="precision must be one of"):
        TrainConfig(method="_tiny_seg", precision="fp8")


def test_precision_auto_on_a_cpu_is_fp32_and_bf16_is_autocast_and_seeded():
    data = toy_category()
    val = toy_val(data)
    auto = fit(_cfg(), data, val, evaluate_test=False)
    fp32 = fit(_cfg(precision="fp32"), data, val, evaluate_test=False)
    bf16 = fit(_cfg(precision="bf16"), data, val, evaluate_test=False)
    again = fit(_cfg(precision="bf16"), data, val, evaluate_test=False)
    assert [r.train_loss for r in auto.reports] == [r.train_loss for r in fp32.reports]
    for key, value in auto.method.state_dict().items():
        assert torch.equal(value, fp32.method.state_dict()[key]), key
    # bf16 really autocasts (other losses), stays close, and is deterministic with a seed
    assert [r.train_loss for r in bf16.reports] != [r.train_loss for r in fp32.reports]
    for ours, reference in zip(bf16.reports, fp32.reports):
        assert ours.train_loss == pytest.approx(reference.train_loss, rel=0.05)
    assert [r.train_loss for r in bf16.reports] == [r.train_loss for r in again.reports]
    assert bf16.val == again.val


def test_fp16_scales_losses_and_resumes_bit_exactly_with_the_scaler_state(tmp_path):
    data = toy_category()
    val = toy_val(data)
    cfg = _cfg(precision="fp16", epochs=4)
    straight = fit(cfg, data, val, evaluate_test=False)
    fit(cfg, data, val, checkpoint_dir=tmp_path, on_epoch=lambda r, d: r.epoch == 2, evaluate_test=False)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["scaler"]["scale"] > 1.0, "fp16's loss scale is in the checkpoint"
    resumed = fit(cfg, data, val, checkpoint_dir=tmp_path, resume_from=tmp_path, evaluate_test=False)
    assert [r.train_loss for r in resumed.reports] == [r.train_loss for r in straight.reports]
    for key, value in straight.method.state_dict().items():
        assert torch.equal(value, resumed.method.state_dict()[key]), key
    assert all(math.isfinite(r.train_loss) for r in straight.reports)


def test_losses_read_back_in_blocks_are_the_same_and_a_nan_names_its_step(monkeypatch):
    data = toy_category()
    val = toy_val(data)
    assert sync_every(CPU) == 1 and sync_every(CUDA) > 1
    per_step = fit(_cfg(steps_per_epoch=7), data, val, evaluate_test=False)
    monkeypatch.setattr(loop, "sync_every", lambda device: 4)  # a GPU's block read-back, on the CPU
    blocks = fit(_cfg(steps_per_epoch=7), data, val, evaluate_test=False)
    assert [r.train_loss for r in blocks.reports] == [r.train_loss for r in per_step.reports]
    with pytest.raises(FloatingPointError, match="_nan_at_step3: loss became nan at step 3"):
        fit(_cfg("_nan_at_step3", steps_per_epoch=7), data, val, evaluate_test=False)
    monkeypatch.undo()
    with pytest.raises(FloatingPointError, match="_nan_at_step3: loss became nan at step 3"):
        fit(_cfg("_nan_at_step3", steps_per_epoch=7), data, val, evaluate_test=False)


@pytest.mark.parametrize("name", ["draem", "nsa", "ssae", "cfa", "ast"])
def test_each_method_trains_on_what_its_switch_runs_on_cuda(name, one_torch_thread):
    """The switch's dtype and channels_last (model and batch), run on the CPU: the step
    works, its loss is close to fp32's on the same weights and batch, gradients are finite."""
    cls = get_method_class(name)
    switch = SpeedPath(device=CPU, dtype=cls.precision.dtype, channels_last=cls.precision.channels_last,
                       reason="what CUDA runs")
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 32, 32, generator=generator)
    masks = torch.zeros(4, 1, 32, 32)
    masks[:2, :, 4:12, 4:12] = 1.0
    batch = Batch(images=images, clean=images, masks=masks, labels=torch.tensor([1.0, 1.0, 0.0, 0.0]))
    torch.manual_seed(0)
    method = create_method(name, {}, 32, "screw")
    method.setup(torch.rand(4, 3, 32, 32, generator=generator))
    phase = method.phases[0]
    method.train()
    reference = float(method.training_step(batch, phase)["loss"].detach())
    switch.prepare(method)
    with switch.autocast():
        loss = method.training_step(switch.batch(batch), phase)["loss"]
    loss.backward()
    assert math.isfinite(float(loss.detach())) and float(loss.detach()) == pytest.approx(reference, rel=0.05, abs=1e-3)
    grads = [p.grad for p in method.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    if switch.channels_last:
        assert any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last)
                   and not p.is_contiguous() for p in method.parameters())
        switch.release(method)
        assert all(p.is_contiguous() for p in method.parameters())


def test_ssim_is_taken_in_fp32_under_autocast():
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 32, 32, generator=generator)
    b = (a + 0.02 * torch.randn(a.shape, generator=generator)).clamp(0, 1)
    low = a.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = ssim(low, b)
    assert under_autocast.dtype == torch.float32
    assert torch.equal(under_autocast, ssim(low.float(), b)), "same as fp32 on the bf16-rounded input"

