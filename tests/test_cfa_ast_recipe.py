"""CFA and AST as their official code does it (issue 24, point 4): CFA scores with its K
nearest centres and divides EfficientNet features by their channel count into a descriptor
twice as wide; AST may take the stride-32 stage the paper uses. Random backbone weights
and 32-64 px images: the tests are about what is computed, not how well it detects."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from automl_ad.deploy.export import export_bundle, load_bundle
from automl_ad.errors import UserError
from automl_ad.methods import create_method
from automl_ad.methods._layers import gaussian_blur
from automl_ad.methods.base import Batch
from automl_ad.methods.backbones import BACKBONES, create_backbone, default_layers

SIZE = 64

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _images(n: int, seed: int, size: int = SIZE) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    base = (0.5 + 0.25 * torch.sin(xs / 3.0) * torch.cos(ys / 5.0)).expand(n, 3, size, size)
    return (base + 0.05 * torch.randn(n, 3, size, size, generator=generator)).clamp(0, 1)


def _cfa(params: dict, seed: int = 0, size: int = SIZE):
    torch.manual_seed(seed)
    method = create_method("cfa", {"weights": "random", **params}, size, "toy")
    method.setup(_images(4, seed=1, size=size))
    return method.eval()


# --- CFA ----------------------------------------------------------------------------------


def _brute_force_map(method, images: torch.Tensor, k: int) -> torch.Tensor:
    """The official scoring written out: Euclidean distances to every centre, the k
    smallest, softmin over them, the nearest's weight times its distance; upsampled."""
    with torch.no_grad():
        descriptors = method.describe(images)
        b, h, w, d = descriptors.shape
        distances = torch.cdist(descriptors.reshape(-1, d).double(), method.memory_bank.double())
        nearest = distances.topk(k, dim=1, largest=False).values
        scores = (F.softmin(nearest, dim=1)[:, 0] * nearest[:, 0]).float().reshape(b, 1, h, w)
        maps = F.interpolate(scores, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return gaussian_blur(maps, method.config.smoothing_sigma * SIZE / 224.0)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_cfa_scores_with_its_k_nearest_centres(k: int) -> None:
    method = _cfa({"K": k, "backbone": "resnet18"})
    images = _images(2, seed=7)
    with torch.no_grad():
        maps = method.anomaly_map(images)
    torch.testing.assert_close(maps, _brute_force_map(method, images, k), rtol=1e-4, atol=1e-4)
    if k != 3:  # the rule before: 3 centres whatever K was
        assert (maps - _brute_force_map(method, images, 3)).abs().max() > 1e-3


def test_cfa_k_one_scores_the_nearest_distance() -> None:
    method = _cfa({"K": 1, "backbone": "resnet18", "smoothing_sigma": 0.0})
    images = _images(1, seed=3)
    with torch.no_grad():
        maps = method.anomaly_map(images)
        descriptors = method.describe(images)
        nearest = torch.cdist(descriptors.reshape(-1, descriptors.shape[-1]), method.memory_bank).min(dim=1).values
        grid = nearest.reshape(1, 1, *descriptors.shape[1:3])
    expected = F.interpolate(grid, size=(SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-4)


def _definition_loss(method, images: torch.Tensor) -> torch.Tensor:
    """The paper's loss written out in float64: squared distances to every centre, the K
    nearest attracted into r^2, the next J pushed out beyond r^2 + alpha."""
    cfg = method.config
    descriptors = method.describe(images).reshape(-1, method.memory_bank.shape[1]).double()
    d2 = (descriptors.unsqueeze(1) - method.memory_bank.double().unsqueeze(0)).pow(2).sum(dim=-1)
    order = d2.detach().argsort(dim=1)[:, : cfg.K + cfg.J]
    nearest = d2.gather(1, order)
    r2 = method.radius.double() ** 2
    attraction = F.relu(nearest[:, : cfg.K] - r2).mean() / cfg.nu
    repulsion = F.relu(r2 - nearest[:, cfg.K :] - cfg.alpha).mean() / cfg.nu
    return attraction + repulsion


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "resnet18"])
def test_cfa_training_loss_and_its_gradient_are_the_papers(backbone: str) -> None:
    # The step computes distances as |x|^2 - 2x.c + |c|^2 (tuning for speed); it must stay
    # the loss of the definition, value and gradient, where EfficientNet features are
    # smallest (divided by their channel count) and cancellation would show first.
    method = _cfa({"K": 2, "J": 3, "alpha": 0.0, "backbone": backbone}).train()
    images = _images(2, seed=11)
    with torch.no_grad():  # r at the median nearest distance: both terms partly active
        d2 = torch.cdist(method.describe(images).reshape(-1, method.memory_bank.shape[1]), method.memory_bank) ** 2
        method.radius.fill_(d2.topk(5, dim=1, largest=False).values.median().sqrt().item())
    batch = Batch(images=images, clean=images, masks=torch.zeros(2, 1, SIZE, SIZE), labels=torch.zeros(2))
    loss = method.training_step(batch, "train")["loss"]
    fast = torch.autograd.grad(loss, method.descriptor.conv.weight)[0]
    reference = _definition_loss(method, images)
    slow = torch.autograd.grad(reference, method.descriptor.conv.weight)[0]
    assert reference.item() > 0
    torch.testing.assert_close(loss.double(), reference, rtol=1e-4, atol=0)
    torch.testing.assert_close(fast.double(), slow.double(), rtol=1e-3, atol=1e-3 * slow.abs().max().item())


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "efficientnet_b0"])
def test_cfa_divides_efficientnet_features_by_their_channel_count(backbone: str) -> None:
    torch.manual_seed(0)
    method = create_method("cfa", {"weights": "random", "backbone": backbone, "gamma_d": 2}, SIZE, "toy")
    images = _images(2, seed=5)
    with torch.no_grad():
        maps = method.backbone(images)
        size = maps[0].shape[-2:]
        parts = [F.avg_pool2d(m, 3, 1, 1) / m.shape[1] for m in maps]
        parts = [p if p.shape[-2:] == size else F.interpolate(p, size=size, mode="bilinear", align_corners=False)
                 for p in parts]
        torch.testing.assert_close(method.patch_features(images), torch.cat(parts, dim=1), rtol=0, atol=0)
    channels = sum(method.backbone.channels)
    # Official Descriptor for EfficientNet: 2 * dim // gamma_d outputs.
    assert method.descriptor.conv.out_channels == 2 * channels // 2
    assert method.descriptor.conv.in_channels == channels + 2


def test_cfa_resnet_features_are_as_they_were() -> None:
    torch.manual_seed(0)
    method = create_method("cfa", {"weights": "random", "backbone": "resnet18", "gamma_d": 2}, SIZE, "toy")
    images = _images(2, seed=5)
    with torch.no_grad():
        maps = method.backbone(images)
        size = maps[0].shape[-2:]
        parts = [F.avg_pool2d(m, 3, 1, 1) for m in maps]
        parts = [p if p.shape[-2:] == size else F.interpolate(p, size=size, mode="bilinear", align_corners=False)
                 for p in parts]
        torch.testing.assert_close(method.patch_features(images), torch.cat(parts, dim=1), rtol=0, atol=0)
    assert method.descriptor.conv.out_channels == (64 + 128 + 256) // 2


def test_cfa_with_k_and_efficientnet_exports_what_it_computes(tmp_path) -> None:
    """The bundle carries K (a Python int at tracing: a fixed topk) and the divisors
    (constants): ONNX and TorchScript equal eager, at K other than the old fixed 3."""
    size = 32
    method = _cfa({"K": 5, "backbone": "efficientnet_lite0"}, size=size)
    images = _images(4, seed=9, size=size)
    with torch.no_grad():
        ref_maps, ref_scores = method(images)
    ordered = ref_scores.sort().values
    threshold = float((ordered[1] + ordered[2]) / 2)
    manifest = {"category": "toy", "methods": ["cfa"], "operating_point": {"threshold": threshold}}
    export_bundle(method, tmp_path / "bundle", image_size=size, manifest=manifest, example_images=images)
    loaded = load_bundle(tmp_path / "bundle")
    assert loaded.manifest["export_check"]["same_decisions"]
    more = _images(6, seed=11, size=size)  # another batch size than the traced one
    with torch.no_grad():
        more_maps, _ = method(more)
    maps, _ = loaded.predictor.run(more.numpy())
    assert np.abs(maps - more_maps.numpy()).max() <= 1e-4
    scripted = torch.jit.load(str(tmp_path / "bundle" / loaded.manifest["files"]["torchscript"]))
    with torch.no_grad():
        assert torch.allclose(scripted(more)[0], more_maps, atol=1e-4)


# --- AST ----------------------------------------------------------------------------------

SMALL_AST = {"weights": "random", "coupling_blocks": 2, "teacher_hidden": 16, "student_blocks": 1,
             "student_hidden": 16, "pos_dim": 8}


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_names_a_stride_32_stage(name: str) -> None:
    layers = default_layers(name, single=True, stride=32)
    assert layers == [BACKBONES[name].coarse_layer]
    extractor = create_backbone(name, weights="random", layers=layers)
    assert extractor.strides == [32]
    # the stride-16 default (PatchCore, CFA, AST's default) is not changed by it
    assert default_layers(name, single=True) == [BACKBONES[name].single_layer]
    assert create_backbone(name, weights="random", layers=default_layers(name, single=True)).strides == [16]


def test_default_layers_refuses_other_strides() -> None:
    with pytest.raises(UserError, match="stride 16 or 32"):
        default_layers("resnet18", single=True, stride=8)


def test_ast_feature_stride_32_takes_the_coarse_stage() -> None:
    torch.manual_seed(0)
    coarse = create_method("ast", {**SMALL_AST, "feature_stride": 32}, SIZE, "toy").eval()
    fine = create_method("ast", SMALL_AST, SIZE, "toy").eval()
    assert coarse.backbone.layers == ["blocks.5"] and fine.backbone.layers == ["blocks.4"]
    images = torch.rand(2, 3, SIZE, 2 * SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats, position = coarse.features(images)
        assert tuple(feats.shape) == (2, 192, SIZE // 32, 2 * SIZE // 32)
        assert tuple(position.shape) == (2, 8, SIZE // 32, 2 * SIZE // 32)
        assert tuple(fine.features(images)[0].shape) == (2, 112, SIZE // 16, 2 * SIZE // 16)
        assert coarse.anomaly_map(images).shape == (2, SIZE, 2 * SIZE)
    with pytest.raises(UserError, match="feature_stride"):
        create_method("ast", {**SMALL_AST, "feature_stride": 8}, SIZE, "toy")


def test_ast_trains_at_stride_32() -> None:
    torch.manual_seed(0)
    method = create_method("ast", {**SMALL_AST, "feature_stride": 32, "lr": 1e-3}, SIZE, "toy")
    images = _images(4, seed=2)
    from automl_ad.methods import Batch

    batch = Batch(images, images, torch.zeros(4, 1, SIZE, SIZE), torch.zeros(4))
    for phase in method.phases:
        optimizer, _ = method.configure_optimizer(phase, 6)
        method.train()
        losses = []
        for _ in range(6):
            optimizer.zero_grad()
            loss = method.training_step(batch, phase)["loss"]
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        assert losses[-1] < losses[0], (phase, losses)


def test_the_planner_costs_stride_32_by_its_work() -> None:
    """A parameter count put stride 32 above the default (more channels); its flow and
    student run on a quarter of the cells, so it costs about a quarter."""
    from automl_ad.tuning.sampled_costs import config_cost_factor

    with torch.device("meta"):
        fine = create_method("ast", {}, 256, "plan")
        coarse = create_method("ast", {"feature_stride": 32}, 256, "plan")
    assert sum(p.numel() for p in coarse.parameters()) > sum(p.numel() for p in fine.parameters())
    heads = [sum(p.numel() for p in m.teacher.parameters()) + sum(p.numel() for p in m.student.parameters())
             for m in (fine, coarse)]
    expected = heads[1] * math.ceil(256 / 32) ** 2 / (heads[0] * math.ceil(256 / 16) ** 2)
    factor = config_cost_factor("ast", {"feature_stride": 32}, 256)
    assert factor == pytest.approx(expected) and 0.2 < factor < 0.4
    assert config_cost_factor("ast", {"student_hidden": 256}, 256) < 0.5  # narrower nets still cheaper
