"""DRAEM, NSA and SSAE: protocol conformance, determinism, and that training learns.

The training tests build their own tiny data: smooth striped "normal" images and a
pasted bright square as the anomaly (the square's mask is the pixel label), so they
check the methods, not a synthesis family.
"""

from __future__ import annotations

import math

import pytest
import torch

from automl_ad.errors import UserError
from automl_ad.methods import Batch, Method, available_methods, create_method, get_method_class
from automl_ad.methods._layers import focal_loss, gaussian_blur, mean_filter, scaled_odd_window, ssim

METHODS = ["draem", "nsa", "ssae"]
DEFAULT_SYNTHESIS = {"draem": "perlin", "nsa": "nsa", "ssae": "corruption"}
# Narrow networks keep the training tests at a few seconds on 2 shared CPU cores.
SMALL = {
    "draem": {"rec_width": 8, "disc_width": 8, "lr": 1e-3},
    "nsa": {"width": 16, "lr": 3e-3},
    "ssae": {"width": 8, "depth": 2, "bottleneck_dilations": 2, "lr": 2e-3},
}


def striped_images(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Smooth horizontal stripes with a random phase and contrast: the normal class."""
    rows = torch.arange(size, dtype=torch.float32).view(1, size, 1)
    phase = torch.rand(n, 1, 1, generator=generator) * 2 * math.pi
    contrast = 0.15 + 0.1 * torch.rand(n, 1, 1, generator=generator)
    stripes = 0.4 + contrast * torch.sin(2 * math.pi * rows / 8 + phase)
    return stripes.expand(n, size, size)[:, None].expand(n, 3, size, size).clone()


def plant_squares(
    clean: torch.Tensor, generator: torch.Generator, probability: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paste a bright square into each image with ``probability``: (images, masks, labels)."""
    n, _, size, _ = clean.shape
    images, masks = clean.clone(), torch.zeros(n, 1, size, size)
    labels = (torch.rand(n, generator=generator) < probability).float()
    for i in range(n):
        if labels[i]:
            side = int(torch.randint(size // 6, size // 3, (1,), generator=generator))
            top, left = (int(v) for v in torch.randint(0, size - side, (2,), generator=generator))
            images[i, :, top : top + side, left : left + side] = 0.95
            masks[i, :, top : top + side, left : left + side] = 1.0
    return images, masks, labels


def make_batch(n: int, size: int, generator: torch.Generator) -> Batch:
    clean = striped_images(n, size, generator)
    images, masks, labels = plant_squares(clean, generator)
    return Batch(images=images, clean=clean, masks=masks, labels=labels)


def build(name: str, size: int, seed: int = 0, params: dict | None = None) -> Method:
    torch.manual_seed(seed)  # module init draws from the global generator, like the loop
    return create_method(name, SMALL[name] if params is None else params, size, "screw")


def train(method: Method, steps: int, batch_size: int, size: int, seed: int) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    optimizer, scheduler = method.configure_optimizer("train", steps)
    method.train()
    losses = []
    for _ in range(steps):
        batch = make_batch(batch_size, size, generator)
        optimizer.zero_grad(set_to_none=True)
        loss = method.training_step(batch, "train")["loss"]
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(float(loss.detach()))
    return losses


# --- protocol -------------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_registry_and_defaults(name: str) -> None:
    assert name in available_methods()
    cls = get_method_class(name)
    assert cls.name == name
    assert cls.synthesis == DEFAULT_SYNTHESIS[name]
    method = create_method(name, {}, 32, "screw")
    assert isinstance(method, cls)
    assert method.config == cls.Config()
    assert hasattr(method.config, "lr") and method.config.lr > 0


@pytest.mark.parametrize("name", METHODS)
def test_unknown_and_out_of_range_params_raise_user_error(name: str) -> None:
    with pytest.raises(UserError, match="no_such_param"):
        create_method(name, {"no_such_param": 1}, 32, "screw")
    with pytest.raises(UserError, match="lr"):
        create_method(name, {"lr": -1.0}, 32, "screw")
    with pytest.raises(UserError, match="lr"):
        create_method(name, {"lr": "fast"}, 32, "screw")


@pytest.mark.parametrize(
    "name,params,key",
    [
        ("draem", {"rec_width": 2}, "rec_width"),
        ("draem", {"disc_width": 8.5}, "disc_width"),
        ("draem", {"score_window": 0}, "score_window"),
        ("nsa", {"label_mode": "fuzzy"}, "label_mode"),
        ("nsa", {"width": 18}, "width"),
        ("ssae", {"depth": 9}, "depth"),
        ("ssae", {"corruption_weight": -1.0}, "corruption_weight"),
    ],
)
def test_config_validation_names_the_key(name: str, params: dict, key: str) -> None:
    with pytest.raises(UserError, match=key):
        create_method(name, params, 32, "screw")


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("size", [32, 64])
def test_output_shapes(name: str, size: int) -> None:
    method = build(name, size, params={})
    method.eval()
    with torch.no_grad():
        maps, scores = method(torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1)))
    assert maps.shape == (2, size, size)
    assert scores.shape == (2,)
    assert torch.isfinite(maps).all() and torch.isfinite(scores).all()


@pytest.mark.parametrize("name", METHODS)
def test_sizes_not_divisible_by_the_stride_are_padded_and_cropped(name: str) -> None:
    method = build(name, 40).eval()
    with torch.no_grad():
        maps, scores = method(torch.rand(1, 3, 40, 48, generator=torch.Generator().manual_seed(2)))
    assert maps.shape == (1, 40, 48) and scores.shape == (1,)


@pytest.mark.parametrize("name", METHODS)
def test_state_dict_round_trip_gives_identical_outputs(name: str) -> None:
    trained = build(name, 32, seed=0)
    train(trained, steps=2, batch_size=4, size=32, seed=3)  # move BN stats off their init
    other = build(name, 32, seed=1)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    trained.eval()
    other.eval()
    with torch.no_grad():
        before = other(images)[0]
        other.load_state_dict(trained.state_dict())
        expected, after = trained(images), other(images)
    assert not torch.equal(before, expected[0])
    assert torch.equal(expected[0], after[0]) and torch.equal(expected[1], after[1])


@pytest.mark.parametrize("name", METHODS)
def test_same_seed_same_training(name: str) -> None:
    first = train(build(name, 32, seed=5), steps=3, batch_size=4, size=32, seed=6)
    second = train(build(name, 32, seed=5), steps=3, batch_size=4, size=32, seed=6)
    assert first == second


# --- method specifics ------------------------------------------------------------------


def test_nsa_passes_label_mode_to_its_family_only() -> None:
    method = create_method("nsa", {"label_mode": "continuous"}, 32, "screw")
    # the label mode, plus the official augmentation of the category (nsa_recipe.py)
    from automl_ad.synthesis.nsa_recipe import augmentation_defaults

    assert method.synthesis_overrides("nsa") == {"label": "continuous", **augmentation_defaults("screw")}
    assert method.synthesis_overrides("perlin") == {}
    assert create_method("nsa", {}, 32, "screw").synthesis_overrides("nsa")["label"] == "logistic"
    # The override must be a parameter the real nsa family accepts.
    from automl_ad.synthesis import build_synthesizer

    synthesizer = build_synthesizer("nsa", method.synthesis_overrides("nsa"), category="screw")
    clean = striped_images(2, 32, torch.Generator().manual_seed(13))
    out = synthesizer(clean, torch.Generator().manual_seed(14))
    assert out.masks.shape == (2, 1, 32, 32)


def test_nsa_continuous_labels_use_mse_and_the_score_is_the_map_mean() -> None:
    method = build("nsa", 32, params={"width": 16, "label_mode": "continuous"})
    batch = make_batch(2, 32, torch.Generator().manual_seed(7))
    method.eval()
    with torch.no_grad():
        predicted = method.anomaly_map(batch.images)
        loss = method.training_step(batch, "train")["loss"]
    assert torch.allclose(loss, ((predicted - batch.masks[:, 0]) ** 2).mean(), atol=1e-6)
    assert torch.allclose(method.image_score(predicted), predicted.mean(dim=(1, 2)))


def test_draem_schedule_drops_at_80_and_90_percent() -> None:
    method = create_method("draem", {"rec_width": 4, "disc_width": 4}, 32, "screw")
    optimizer, scheduler = method.configure_optimizer("train", 100)
    rates = []
    for _ in range(100):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    base = method.config.lr
    assert rates[79] == pytest.approx(base) and rates[80] == pytest.approx(0.2 * base)
    assert rates[89] == pytest.approx(0.2 * base) and rates[90] == pytest.approx(0.04 * base)


def test_nsa_schedule_anneals_to_min_lr() -> None:
    method = create_method("nsa", {"width": 8}, 32, "screw")
    optimizer, scheduler = method.configure_optimizer("train", 50)
    for _ in range(50):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(method.config.min_lr)


def test_draem_image_score_is_max_after_a_scaled_mean_filter() -> None:
    method = create_method("draem", {"rec_width": 4, "disc_width": 4}, 64, "screw")
    maps = torch.zeros(2, 64, 64)
    maps[0, 10, 10] = 1.0  # one hot pixel: averaged away by the window
    maps[1, 20:40, 20:40] = 1.0  # a blob bigger than the window keeps its peak
    window = scaled_odd_window(21, 64)
    assert window == 5
    scores = method.image_score(maps)
    assert scores[0] == pytest.approx(1.0 / window**2)
    assert scores[1] == pytest.approx(1.0)


def test_ssae_loss_weights_corrupted_and_clean_regions_separately() -> None:
    method = build("ssae", 32, params={"width": 8, "depth": 2, "bottleneck_dilations": 1, "corruption_weight": 3.0})
    batch = make_batch(4, 32, torch.Generator().manual_seed(8))
    method.eval()
    with torch.no_grad():
        error = (method.reconstruct(batch.images) - batch.clean).pow(2).mean(dim=1)
        parts = method.training_step(batch, "train")
    inside = batch.masks[:, 0] > 0.5
    assert torch.allclose(parts["clean_error"], error[~inside].mean(), rtol=1e-5)
    assert torch.allclose(parts["corrupted_error"], error[inside].mean(), rtol=1e-5)
    assert torch.allclose(parts["loss"], error[~inside].mean() + 3.0 * error[inside].mean(), rtol=1e-5)


# --- building blocks --------------------------------------------------------------------


def test_ssim_is_one_for_equal_images_and_drops_with_noise() -> None:
    generator = torch.Generator().manual_seed(9)
    image = torch.rand(2, 3, 32, 32, generator=generator)
    noisy = (image + 0.3 * torch.randn(image.shape, generator=generator)).clamp(0, 1)
    assert float(ssim(image, image)) == pytest.approx(1.0, abs=1e-5)
    assert float(ssim(image, noisy)) < 0.9


def test_focal_loss_down_weights_easy_pixels() -> None:
    target = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1)
    confident = torch.tensor([0.05, 0.95]).view(1, 2, 1, 1)
    unsure = torch.tensor([0.4, 0.6]).view(1, 2, 1, 1)
    assert float(focal_loss(confident, target, gamma=2.0)) == pytest.approx(-(0.05**2) * math.log(0.95), rel=1e-4)
    assert float(focal_loss(unsure, target, gamma=0.0)) == pytest.approx(-math.log(0.6), rel=1e-4)


def test_map_filters_preserve_constants_and_spread_peaks() -> None:
    constant = torch.full((1, 16, 16), 0.7)
    assert torch.allclose(gaussian_blur(constant, 2.0), constant, atol=1e-6)
    peak = torch.zeros(1, 16, 16)
    peak[0, 8, 8] = 1.0
    blurred = gaussian_blur(peak, 1.5)
    assert float(blurred.sum()) == pytest.approx(1.0, abs=1e-5) and float(blurred.max()) < 0.2
    assert float(mean_filter(peak, 3)[0, 7, 7]) == pytest.approx(1.0 / 9)


# --- training learns ---------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_loss_decreases_on_a_tiny_run(name: str) -> None:
    losses = train(build(name, 32, seed=0), steps=30, batch_size=4, size=32, seed=10)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5


def defect_contrast(method: Method, size: int) -> float:
    """Mean map inside planted squares / mean map on the clean rest of those images."""
    generator = torch.Generator().manual_seed(123)
    clean = striped_images(8, size, generator)
    images, masks, _ = plant_squares(clean, generator, probability=1.0)
    method.eval()
    with torch.no_grad():
        maps, scores = method(images)
    inside = masks[:, 0] > 0.5
    return float(maps[inside].mean() / maps[~inside].mean().clamp_min(1e-8))


# (image size, steps, minimum defect/clean map ratio). NSA has no skip connections and
# a stride-32 code, so at 64 px it localises only to a 2x2 grid: a lower bar, 64 px.
# NSA at 60 steps sat on its bar (ratio 1.197 with numpy 2.4 / torch 2.14); 80 steps give 1.79.
PLANTED_DEFECT_RUN = {"draem": (32, 80, 2.0), "nsa": (64, 80, 1.2), "ssae": (32, 60, 2.0)}


@pytest.mark.parametrize("name", METHODS)
def test_map_and_score_single_out_a_planted_defect_after_training(name: str) -> None:
    size, steps, min_ratio = PLANTED_DEFECT_RUN[name]
    method = build(name, size, seed=0)
    untrained = defect_contrast(method, size)
    train(method, steps=steps, batch_size=8, size=size, seed=11)
    trained = defect_contrast(method, size)
    assert trained > min_ratio, f"{name}: defect/clean map ratio {trained:.2f} (untrained {untrained:.2f})"
    assert trained > untrained

    generator = torch.Generator().manual_seed(321)
    clean = striped_images(8, size, generator)
    defective, _, _ = plant_squares(clean, generator, probability=1.0)
    with torch.no_grad():
        clean_scores, defect_scores = method(clean)[1], method(defective)[1]
    # Image AUROC over all (defective, clean) pairs.
    auroc = float((defect_scores[:, None] > clean_scores[None, :]).float().mean())
    assert auroc > 0.9, f"{name}: pairwise image AUROC {auroc:.2f}"
