"""PatchCore: coreset selection, memory bank from setup, reweighted image score, planted
defects, checkpoints without setup, the no-gradient training path, and export."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from skimage.data import chelsea

from automl_ad.errors import UserError
from automl_ad.methods import create_method
from automl_ad.methods.patchcore import greedy_coreset

SIZE = 64
RANDOM = {"weights": "random", "backbone": "resnet18"}

pytestmark = pytest.mark.usefixtures("one_torch_thread", "offline_weight_caches")


def normal_images(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    base = 0.5 + 0.25 * torch.sin(xs / 3.0) * torch.cos(ys / 5.0)
    images = (base * torch.tensor([0.9, 0.7, 0.5]).view(3, 1, 1)).expand(n, 3, SIZE, SIZE).clone()
    images += 0.02 * torch.randn(n, 3, SIZE, SIZE, generator=generator)
    return images.clamp(0, 1)


def brute_force_k_center(points: torch.Tensor, count: int, first: int) -> list[int]:
    chosen = [first]
    for _ in range(count - 1):
        d = torch.cdist(points, points[chosen]).min(dim=1).values
        chosen.append(int(d.argmax()))
    return chosen


def test_greedy_coreset_is_farthest_point_selection_and_covers_outliers() -> None:
    generator = torch.Generator().manual_seed(1)
    points = torch.randn(400, 6, generator=generator)
    points[17] += 40.0  # one far outlier: a coreset must keep it, a random sample rarely does
    chosen = greedy_coreset(points, 12, projection_dim=6, seed=3)  # no projection: exact
    assert chosen.tolist() == brute_force_k_center(points, 12, int(chosen[0]))
    assert 17 in chosen.tolist()[:2]
    assert len(set(chosen.tolist())) == 12
    projected = greedy_coreset(points, 12, projection_dim=3, seed=3)
    assert 17 in projected.tolist()[:2]
    torch.testing.assert_close(greedy_coreset(points, 12, 3, seed=3), projected)  # seeded
    assert greedy_coreset(points, 500, 3, seed=3).tolist() == list(range(400))


def test_bank_size_follows_the_coreset_ratio_and_neighbours_start_with_themselves() -> None:
    torch.manual_seed(0)
    method = create_method("patchcore", {**RANDOM, "coreset_ratio": 0.25, "reweight_neighbours": 4}, SIZE, "toy")
    method.setup(normal_images(6, seed=0))
    grid = SIZE // 8  # "8+16": the stride-8 grid
    assert method.memory_bank.shape == (math.ceil(0.25 * 6 * grid * grid), 128 + 256)
    assert method.bank_neighbours.shape == (method.memory_bank.shape[0], 4)
    assert torch.equal(method.bank_neighbours[:, 0], torch.arange(method.memory_bank.shape[0]))
    d = torch.cdist(method.memory_bank, method.memory_bank)
    d.fill_diagonal_(-1)
    expected = d.topk(4, dim=1, largest=False).indices
    assert torch.equal(method.bank_neighbours[:, 1:].sort(dim=1).values, expected[:, 1:].sort(dim=1).values)


def test_image_score_is_the_reweighted_maximum_of_the_patch_distances() -> None:
    torch.manual_seed(0)
    method = create_method("patchcore", {**RANDOM, "coreset_ratio": 0.5, "smoothing_sigma": 0.0}, SIZE, "toy").eval()
    method.setup(normal_images(4, seed=0))
    images = normal_images(3, seed=9)
    with torch.no_grad():
        maps, scores = method(images)
        features = method.patch_features(images)
    queries = features.permute(0, 2, 3, 1).reshape(3, -1, features.shape[1])
    largest = []
    for i in range(3):
        d = torch.cdist(queries[i], method.memory_bank)
        nearest, index = d.min(dim=1)
        worst = int(nearest.argmax())
        m_star = int(index[worst])
        neighbourhood = method.bank_neighbours[m_star]
        distances = torch.cdist(queries[i][worst : worst + 1], method.memory_bank[neighbourhood])[0]
        expected = (1 - torch.softmax(distances, 0)[0]) * nearest[worst]
        torch.testing.assert_close(scores[i], expected, rtol=2e-3, atol=2e-3)  # |q|^2 - 2qb + |b|^2 vs cdist
        assert scores[i] <= nearest.max() + 1e-5
        largest.append(nearest.max())
    plain = create_method("patchcore", {**RANDOM, "coreset_ratio": 0.5, "reweight_neighbours": 1,
                                        "smoothing_sigma": 0.0}, SIZE, "toy").eval()
    plain.load_state_dict({**method.state_dict(), "bank_neighbours": method.bank_neighbours[:, :1]})
    with torch.no_grad():
        torch.testing.assert_close(plain(images)[1], torch.stack(largest), rtol=2e-3, atol=2e-3)


def test_patchcore_finds_a_planted_defect_with_pretrained_weights() -> None:
    torch.manual_seed(0)
    method = create_method("patchcore", {"coreset_ratio": 0.2}, SIZE, "toy").eval()
    method.setup(normal_images(8, seed=0))
    image = normal_images(1, seed=5)
    top, left = 36, 12
    image[0, :, top : top + 16, left : left + 16] = (
        torch.from_numpy(chelsea()[100:116, 200:216].copy()).permute(2, 0, 1).float() / 255.0)
    with torch.no_grad():
        maps, scores = method(torch.cat([image, normal_images(1, seed=6)]))
    inside = maps[0, top + 4 : top + 12, left + 4 : left + 12].mean()
    far = torch.ones(SIZE, SIZE, dtype=torch.bool)
    far[top - 12 : top + 28, left - 12 : left + 28] = False
    assert inside > 1.5 * maps[0][far].max(), (float(inside), float(maps[0][far].max()))
    assert scores[0] > 2 * scores[1], scores


def test_checkpoint_round_trip_needs_no_setup_and_config_is_checked() -> None:
    torch.manual_seed(0)
    method = create_method("patchcore", {**RANDOM, "feature_strides": "4+8+16", "neighbourhood": 5}, SIZE, "toy")
    method.setup(normal_images(4, seed=0))
    restored = create_method("patchcore", {**RANDOM, "feature_strides": "4+8+16", "neighbourhood": 5}, SIZE, "toy")
    assert restored.memory_bank.shape[0] == 0
    restored.load_state_dict(method.state_dict())
    images = normal_images(2, seed=3)
    with torch.no_grad():
        for got, want in zip(restored.eval()(images), method.eval()(images)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    for bad, message in (({"feature_strides": "2+4"}, "feature_strides"), ({"neighbourhood": 2}, "odd"),
                         ({"coreset_ratio": 0.0}, "coreset_ratio"), ({"reweight_neighbours": 0}, "reweight")):
        with pytest.raises(UserError, match=message):
            create_method("patchcore", {**RANDOM, **bad}, SIZE, "toy")
    with pytest.raises(RuntimeError, match="setup"):
        create_method("patchcore", RANDOM, SIZE, "toy")(images)


def test_the_training_loop_runs_patchcore_as_one_full_fidelity_epoch(tmp_path) -> None:
    from automl_ad.data.types import CategoryData, ImageSet
    from automl_ad.training.loop import TrainConfig, fit, load_trained_method

    images = (normal_images(10, seed=0) * 255).to(torch.uint8)
    test_images = images[6:].clone()
    test_images[2:, :, 20:40, 20:40] = 255
    labels = torch.tensor([0, 0, 1, 1])
    masks = torch.zeros(4, 1, SIZE, SIZE, dtype=torch.uint8)
    masks[2:, :, 20:40, 20:40] = 1
    test = ImageSet(test_images, masks, labels, torch.ones(4, dtype=torch.bool), ["good", "good", "x", "x"])
    data = CategoryData(category="toy", root=tmp_path, image_size=SIZE, fit=images[:4], val_good=images[4:6],
                        test=test, fingerprint="f")
    seen = []
    cfg = TrainConfig(method="patchcore", method_params={**RANDOM, "coreset_ratio": 0.5}, image_size=SIZE, epochs=6)
    result = fit(cfg, data, test, checkpoint_dir=tmp_path / "ckpt", on_epoch=lambda r, d: seen.append((r.epoch, d)))
    assert [epoch for epoch, _ in seen] == [6] and len(result.reports) == 1
    assert result.reports[0].step == 0 and result.test["image_auroc"] == 1.0
    restored, restored_cfg = load_trained_method(tmp_path / "ckpt", "toy")
    assert restored_cfg.method == "patchcore"
    torch.testing.assert_close(restored.memory_bank, result.method.memory_bank, rtol=0, atol=0)


def test_exported_patchcore_scores_equal_eager_scores(tmp_path) -> None:
    from automl_ad.deploy.ensemble import EnsembleModel, RobustScaler
    from automl_ad.deploy.export import export_bundle, load_bundle

    torch.manual_seed(0)
    method = create_method("patchcore", {**RANDOM, "coreset_ratio": 0.3}, SIZE, "toy").eval()
    method.setup(normal_images(4, seed=0))
    model = EnsembleModel([method], [RobustScaler(1.0, 2.0, 0.5, 3.0)], [1.0])
    example = normal_images(2, seed=1)
    export_bundle(model, tmp_path / "bundle", image_size=SIZE, manifest={"category": "toy",
                  "operating_point": {"threshold": 0.0}}, example_images=example)
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["export_check"]["onnx_vs_torch_max_abs_map_diff"] <= 1e-3
    images = normal_images(5, seed=7)  # another batch size than the traced one
    images[3, :, 10:30, 10:30] = 1.0
    maps, scores = load_bundle(tmp_path / "bundle").predictor.run(images.numpy())
    with torch.no_grad():
        ref_maps, ref_scores = model(images)
    assert np.abs(scores - ref_scores.numpy()).max() <= 1e-3 * max(1.0, float(ref_scores.abs().max()))
    assert np.abs(maps - ref_maps.numpy()).max() <= 1e-3 * max(1.0, float(ref_maps.abs().max()))
    assert int(np.argmax(scores)) == 3
    scripted = torch.jit.load(str(tmp_path / "bundle" / "model.torchscript.pt"))
    torch.testing.assert_close(scripted(images)[1], ref_scores, rtol=1e-4, atol=1e-4)
