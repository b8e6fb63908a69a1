"""NSA as its official code trains it (hmsch/natural-synthetic-anomalies, commit 9195916):
the label pipeline of patch_ex against an independent cv2/scipy reference, the
per-class constants of train_mvtec.py, and the training augmentations (tiny images, CPU)."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.morphology import disk

from automl_ad.methods.nsa import Nsa
from automl_ad.synthesis import build_synthesizer
from automl_ad.synthesis.base import majority_filter
from automl_ad.synthesis.nsa_recipe import (
    OBJECT_CROP,
    TEXTURE_CROP,
    augment,
    augmentation_defaults,
    category_defaults,
    disk_offsets,
    nsa_labels,
)
from automl_ad.synthesis.poisson import NSASynthesizer, _official_resize, foreground, paste_rectangles


def _pair(seed: int, batch: int = 3, size: int = 40) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images before/after a change made of blobs (every changed pixel moves 3 to 80 grey
    levels, far from the 1-level tolerance, so float rounding cannot flip a test), and
    the region the labels may cover."""
    g = torch.Generator().manual_seed(seed)
    before = torch.randint(60, 180, (batch, 3, size, size), generator=g).float() / 255
    blobs = torch.nn.functional.interpolate(torch.rand(batch, 1, 6, 6, generator=g), size=(size, size), mode="bilinear")
    amount = torch.randint(3, 81, (batch, 1, size, size), generator=g).float() / 255
    noise = torch.rand(batch, 1, size, size, generator=g) < 0.15  # grain the 5x5 median removes
    change = ((blobs > 0.6) | noise).float() * amount
    after = before + change
    region = torch.zeros(batch, 1, size, size)
    region[:, :, 4:-6, 3:-4] = 1.0
    return before, after, region


def _reference(before: torch.Tensor, after: torch.Tensor, region: torch.Tensor, mode: str, k: float, x0: float) -> np.ndarray:
    """patch_ex's label step written from its description with OpenCV and SciPy:
    cv2.medianBlur(5) of the uint8 change mask, skimage's median (scipy, mode nearest)
    over disk(5) of the masked mean intensity change, then the logistic map."""
    out = []
    for b in range(before.shape[0]):
        d = ((after[b] - before[b]).abs().mean(0) * 255).numpy().astype(np.float64)
        inside = region[b, 0].numpy() > 0.5
        label_mask = cv2.medianBlur(((d > 1.0) & inside).astype(np.uint8), 5).astype(np.float64)
        if mode == "binary":
            out.append(label_mask)
            continue
        m = ndimage.median_filter(label_mask * d, footprint=disk(5), mode="nearest")
        out.append(label_mask / (1 + np.exp(-k * (m - x0))) if mode == "logistic" else m / 255.0)
    return np.stack(out)[:, None]


@pytest.mark.parametrize("mode", ["binary", "logistic", "continuous"])
def test_labels_match_patch_ex(mode: str) -> None:
    before, after, region = _pair(seed=1)
    masks, labels = nsa_labels(before, after, region, mode, 1 / 3, 7.0)
    expected = _reference(before, after, region, mode, 1 / 3, 7.0)
    assert np.allclose(masks.numpy(), expected, atol=1e-5)
    assert (expected > 0).sum() > 100  # the test exercised labelled pixels
    assert labels.tolist() == [1.0] * before.shape[0]
    # the filters matter: without the medians the logistic label would differ
    if mode == "logistic":
        d = (after - before).abs().mean(1, keepdim=True) * 255
        unfiltered = region * torch.sigmoid(1 / 3 * (d - 7.0)) * (d > 1)
        assert not torch.allclose(masks, unfiltered, atol=1e-3)


def test_disk_is_skimage_disk() -> None:
    offsets = disk_offsets(5)
    footprint = np.zeros((11, 11), dtype=np.uint8)
    footprint[offsets[:, 0] + 5, offsets[:, 1] + 5] = 1
    assert np.array_equal(footprint, disk(5)) and len(offsets) == 81


@pytest.mark.parametrize("size", [5, 7])
def test_replicate_majority_is_cv2_median_blur(size: int) -> None:
    g = torch.Generator().manual_seed(size)
    binary = torch.rand(4, 1, 23, 17, generator=g) < 0.5
    ours = majority_filter(binary, size, border="replicate")
    for b in range(4):
        expected = cv2.medianBlur(binary[b, 0].numpy().astype(np.uint8), size)
        assert np.array_equal(ours[b, 0].numpy().astype(np.uint8), expected)
    # and the border rule matters: cut windows disagree somewhere at the edge
    assert not torch.equal(ours, majority_filter(binary, size))


def test_foreground_is_patch_ex_object_mask() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 30, 26), generator=g).float() / 255
    ours = foreground(images, 200.0, 60.0)
    for b in range(3):
        gray = (images[b] * 255).mean(0).numpy()
        expected = cv2.medianBlur((np.abs(gray - 200.0) > 60.0).astype(np.uint8), 7)
        assert np.array_equal(ours[b, 0].numpy().astype(np.uint8), expected)


def test_per_class_constants_are_the_official_ones() -> None:
    # train_mvtec.py: MIN_OBJECT_PCT, BACKGROUND, NUM_PATCHES, WIDTH_BOUNDS_PCT,
    # INTENSITY_LOGISTIC_PARAMS (transcribed here by hand from the official file)
    official_min_object = {"bottle": 0.7, "capsule": 0.7, "hazelnut": 0.7, "metal_nut": 0.5,
                           "pill": 0.7, "screw": 0.5, "toothbrush": 0.25, "zipper": 0.7}
    official_background = {"bottle": (200, 60), "screw": (200, 60), "capsule": (200, 60), "zipper": (200, 60),
                           "hazelnut": (20, 20), "pill": (20, 20), "toothbrush": (20, 20), "metal_nut": (20, 20)}
    for name, share in official_min_object.items():
        params = build_synthesizer("nsa", category=name).params
        assert params.object and params.min_object == share and params.min_overlap == 0.25, name
        assert (params.fg_bright, params.fg_thresh) == official_background[name], name
    for name in ("cable", "transistor", "carpet", "grid", "leather", "tile", "wood"):
        assert not build_synthesizer("nsa", category=name).params.object, name
    four = {"screw", "zipper", "carpet", "grid", "leather", "tile", "wood"}
    logistic = {"bottle": (1 / 12, 24), "cable": (1 / 12, 24), "capsule": (1 / 2, 4), "hazelnut": (1 / 12, 24),
                "metal_nut": (1 / 3, 7), "pill": (1 / 3, 7), "screw": (1, 3), "toothbrush": (1 / 6, 15),
                "transistor": (1 / 6, 15), "zipper": (1 / 6, 15), "carpet": (1 / 3, 7), "grid": (1 / 3, 7),
                "leather": (1 / 3, 7), "tile": (1 / 3, 7), "wood": (1 / 6, 15)}
    widths = {"cable": (0.05, 0.4, 0.05, 0.4), "capsule": (0.03, 0.15, 0.03, 0.4), "hazelnut": (0.03, 0.35, 0.03, 0.35),
              "pill": (0.03, 0.2, 0.03, 0.4), "screw": (0.03, 0.12, 0.03, 0.12), "toothbrush": (0.03, 0.4, 0.03, 0.2),
              "zipper": (0.03, 0.4, 0.03, 0.2)}
    for name, (k, x0) in logistic.items():
        params = build_synthesizer("nsa", category=name).params
        assert math.isclose(params.k, k) and params.x0 == x0, name
        assert params.n_patches == (4 if name in four else 3), name
        got = (params.width_min_y, params.width_max_y, params.width_min_x, params.width_max_x)
        assert got == widths.get(name, (0.03, 0.4, 0.03, 0.4)), name
        textures = name in ("carpet", "grid", "leather", "tile", "wood")
        assert params.mode == ("mixed" if textures else "normal"), name
        assert (params.resize_min, params.resize_max) == ((0.5, 2.0) if textures else (0.7, 1.3)), name
    assert category_defaults("kolektor") == {}


def test_augmentation_defaults_by_kind() -> None:
    assert augmentation_defaults("screw") == {"crop": OBJECT_CROP, "rotate": 5.0, "vflip": 0.0}
    assert augmentation_defaults("metal_nut")["rotate"] == 5.0
    assert augmentation_defaults("transistor") == {"crop": OBJECT_CROP, "rotate": 0.0, "vflip": 0.0}
    assert augmentation_defaults("fabric") == {"crop": TEXTURE_CROP, "rotate": 0.0, "vflip": 0.5}
    # an unknown product: the crop jitter only, never a flip or a rotation
    assert augmentation_defaults("kolektor") == {"crop": OBJECT_CROP, "rotate": 0.0, "vflip": 0.0}
    assert augmentation_defaults(None) == augmentation_defaults("kolektor")


def test_nsa_method_turns_on_its_category_augmentation() -> None:
    method = Nsa(Nsa.Config(width=8), 64, "fabric")
    assert method.synthesis_overrides("nsa") == {"label": "logistic", **augmentation_defaults("fabric")}
    assert method.synthesis_overrides("perlin") == {}
    off = Nsa(Nsa.Config(width=8, augment=False), 64, "fabric")
    assert off.synthesis_overrides("nsa") == {"label": "logistic"}
    # the family alone (another method training with it) and the val set never augment
    assert build_synthesizer("nsa", category="fabric").params.vflip == 0.0
    val = build_synthesizer("nsa", dict(NSASynthesizer.VAL_PARAMS), category="screw").params
    assert (val.crop, val.rotate, val.vflip) == (1.0, 0.0, 0.0)


def _ramp(batch: int, height: int, width: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(height).float(), torch.arange(width).float(), indexing="ij")
    return (0.1 + 0.004 * xs + 0.002 * ys).expand(batch, 3, height, width).contiguous()


def test_augment_off_draws_nothing_and_flip_is_exact() -> None:
    images = torch.rand(4, 3, 16, 20, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    state = generator.get_state()
    assert augment(images, generator, 1.0, 0.0, 0.0) is images
    assert torch.equal(generator.get_state(), state)
    flipped = augment(images, generator, 1.0, 0.0, 1.0)
    assert torch.allclose(flipped, images.flip(2), atol=1e-5)


def test_augment_crops_and_rotates_in_pixels() -> None:
    # a linear ramp stays a ramp under an affine map: its slopes show the zoom and the
    # angle. Not square, so a rotation done in normalised coordinates would show.
    height, width, crop, rotate = 48, 64, OBJECT_CROP, 5.0
    images = _ramp(64, height, width)
    out = augment(images, torch.Generator().manual_seed(3), crop, rotate, 0.0)
    centre = out[:, 0, 12:-12, 16:-16]  # away from the reflected corners
    gx = (centre[:, :, 1:] - centre[:, :, :-1]).mean((1, 2))
    gy = (centre[:, 1:, :] - centre[:, :-1, :]).mean((1, 2))
    # a rotation keeps the gradient's length; the crop zooms by 1 / crop
    assert torch.allclose(torch.hypot(gx, gy), torch.tensor(math.hypot(0.004, 0.002) * crop), rtol=1e-3)
    turned = torch.rad2deg(torch.atan2(gy, gx) - math.atan2(0.002, 0.004))
    assert turned.abs().max() <= rotate + 1e-3 and turned.abs().max() > 3.0 and turned.std() > 1.0
    # the window moves: the value at the centre spreads over the crop's margin
    mid = out[:, 0, height // 2, width // 2] - images[:, 0, height // 2, width // 2]
    assert mid.std() > 0 and mid.abs().max() <= (1 - crop) * (0.004 * width + 0.002 * height) / 2 * 1.4
    # seeded
    again = augment(images, torch.Generator().manual_seed(3), crop, rotate, 0.0)
    assert torch.equal(out, again)


def test_synthesizer_augments_normal_images_too() -> None:
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    synth = build_synthesizer("nsa", {"normal_share": 1.0, "vflip": 1.0})
    out = synth(images, torch.Generator().manual_seed(0))
    assert torch.allclose(out.images, images.flip(2), atol=1e-5)
    assert out.masks.abs().sum() == 0 and out.labels.sum() == 0
    assert torch.equal(out.clean, out.images)  # the loop's reconstruction target follows
    assert build_synthesizer("nsa", {"normal_share": 1.0})(images, torch.Generator()).clean is None
    # vflip is a probability: about half of 200 images come out upside down
    many = torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(1)).expand(-1, 3, -1, -1)
    half = build_synthesizer("nsa", {"normal_share": 1.0, "vflip": 0.5})(many, torch.Generator().manual_seed(2))
    flipped = sum(bool(torch.allclose(o, i.flip(1), atol=1e-5)) for o, i in zip(half.images, many))
    kept = sum(bool(torch.allclose(o, i, atol=1e-5)) for o, i in zip(half.images, many))
    assert flipped + kept == 200 and 70 < flipped < 130


def test_official_resize_clips_the_full_size_to_the_half_width_bounds() -> None:
    side = torch.tensor([128.0, 128.0])
    lower, upper = torch.tensor([0.03, 0.03]), torch.tensor([0.12, 0.12])
    half = _official_resize(torch.tensor([[20.0, 10.0]]), torch.tensor([1.0]), lower, upper, side)
    # full height 40 clipped to 0.12 * 128 = 15.36; the width follows the aspect (7.68)
    assert torch.allclose(half, torch.tensor([[7.68, 3.84]]))
    half = _official_resize(torch.tensor([[5.0, 5.0]]), torch.tensor([1.2]), lower, upper, side)
    assert torch.allclose(half, torch.tensor([[6.0, 6.0]]))  # inside the bounds: just rescaled


def test_object_labels_only_where_source_or_destination_is_object() -> None:
    height = width = 32
    current = torch.full((1, 3, height, width), 0.5)
    donors = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    target_fg = torch.zeros(1, 1, height, width)
    target_fg[..., 8:16, :] = 1.0  # the destination's object: rows 8-15
    donor_fg = torch.zeros(1, 1, height, width)
    donor_fg[..., :, 20:] = 1.0  # the donor's object: columns 20 on
    patch_mask = torch.zeros(1, 1, height, width)
    centre = torch.tensor([[16.0, 16.0]])
    paste_rectangles(current, patch_mask, torch.cat((donors, donor_fg), 1), torch.tensor([True]), centre,
                     torch.tensor([[10.0, 10.0]]), centre, torch.tensor([1.0]), "normal", target_fg=target_fg)
    rect = torch.zeros(1, 1, height, width, dtype=torch.bool)
    rect[..., 7:26, 7:26] = True  # strict interior of the 20 x 20 rectangle around (16, 16)
    expected = rect & ((target_fg > 0.5) | (donor_fg > 0.5))
    assert torch.equal(patch_mask > 0.5, expected)
    assert bool((current[..., 20:24, 8:12] != 0.5).any())  # the blend still covers background pixels
