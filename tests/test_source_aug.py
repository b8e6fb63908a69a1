"""DRAEM source augmentations: the lookup-table ops equal their per-pixel definitions."""

from __future__ import annotations

import numpy as np
import torch

from automl_ad.synthesis import source_aug
from automl_ad.synthesis.source_aug import POINTWISE_OPS, augment_sources, build_table, hue_saturation_matrix, quantize


def _images(seed: int = 0, batch: int = 4, channels: int = 3, size: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # a narrow range so that autocontrast and equalize have work to do
    return 0.2 + 0.5 * torch.rand(batch, channels, size, size, generator=g)


def _only(*names: str, rows: int) -> torch.Tensor:
    chosen = torch.zeros(rows, len(POINTWISE_OPS), dtype=torch.bool)
    for name in names:
        chosen[:, POINTWISE_OPS.index(name)] = True
    return chosen


def _histogram(levels: torch.Tensor) -> torch.Tensor:
    count, channels = levels.shape[:2]
    flat = levels.view(count, channels, -1)
    return torch.zeros(count, channels, 256).scatter_add_(-1, flat, torch.ones_like(flat, dtype=torch.float32))


def _apply(table: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    count, channels = levels.shape[:2]
    return table.reshape(count * channels, 256).gather(1, levels.reshape(count * channels, -1)).view(levels.shape)


def test_autocontrast_table_matches_direct_stretch():
    images = _images()
    levels = quantize(images)
    table = build_table(_only("autocontrast", rows=4), 3, torch.Generator().manual_seed(1), images.device, _histogram(levels))
    values = levels.float() / 255
    low = values.amin(dim=(2, 3), keepdim=True)
    high = values.amax(dim=(2, 3), keepdim=True)
    expected = (values - low) / (high - low)
    assert torch.allclose(_apply(table, levels), expected, atol=1e-6)
    assert float(_apply(table, levels).amin()) == 0.0 and float(_apply(table, levels).amax()) == 1.0


def test_equalize_after_invert_matches_numpy_on_the_inverted_image():
    images = _images(seed=3)
    levels = quantize(images)
    table = build_table(_only("invert", "equalize", rows=4), 3, torch.Generator().manual_seed(2), images.device, _histogram(levels))
    got = _apply(table, levels).numpy()
    inverted = 255 - levels.numpy()
    for b in range(4):
        for c in range(3):
            plane = inverted[b, c]
            hist = np.bincount(plane.ravel(), minlength=256)
            cdf = hist.cumsum()
            cdf_min = cdf[hist > 0][0]
            lut = (cdf - cdf_min) / max(plane.size - cdf_min, 1)
            assert np.allclose(got[b, c], lut[plane], atol=1e-6)


def test_gamma_then_posterize_composes_like_two_passes():
    images = _images(seed=5)
    levels = quantize(images)
    g = torch.Generator().manual_seed(7)
    table = build_table(_only("gamma", "posterize", rows=4), 3, g, images.device, None)
    # the same draws, op by op, on the pixel values
    g = torch.Generator().manual_seed(7)
    identity = (torch.arange(256, dtype=torch.float32) / 255).expand(4, 3, -1)
    expected_table = identity
    for name in POINTWISE_OPS:
        applied = source_aug._TABLE_OPS[name](expected_table, g, None).clamp(0, 1)
        if name in ("gamma", "posterize"):
            expected_table = applied
    assert torch.equal(table, expected_table)
    # posterize leaves at most 2**7 levels per channel
    out = _apply(table, levels)
    for b in range(4):
        assert out[b, 0].unique().numel() <= 128


def test_augment_sources_is_deterministic_in_range_and_changes_images():
    images = _images(batch=8)
    first = augment_sources(images, torch.Generator().manual_seed(11), 3)
    second = augment_sources(images, torch.Generator().manual_seed(11), 3)
    assert torch.equal(first, second)
    assert first.shape == images.shape and torch.isfinite(first).all()
    assert float(first.min()) >= 0.0 and float(first.max()) <= 1.0
    changed = (first - images).abs().flatten(1).amax(1) > 1 / 255
    assert bool(changed.all())  # three ops out of ten: none is the identity on every pixel
    assert torch.equal(augment_sources(images, torch.Generator().manual_seed(11), 0), images)


def test_hue_saturation_matrix_keeps_luma_and_greys():
    shift = torch.tensor([0.0, 0.1, -0.2, 1.0])
    scale = torch.tensor([1.0, 1.3, 0.7, 1.0])
    matrix = hue_saturation_matrix(shift, scale)
    assert torch.allclose(matrix[0], torch.eye(3), atol=1e-5)
    assert torch.allclose(matrix[3], torch.eye(3), atol=1e-5)  # a full turn
    grey = torch.full((4, 3, 1), 0.4)
    assert torch.allclose(matrix @ grey, grey, atol=1e-5)
    colour = torch.tensor([0.8, 0.3, 0.1]).view(1, 3, 1).expand(4, -1, -1)
    luma = torch.tensor([0.299, 0.587, 0.114])
    assert torch.allclose(luma @ (matrix @ colour), (luma @ colour), atol=1e-5)
    desaturated = hue_saturation_matrix(torch.tensor([0.0]), torch.tensor([0.0])) @ colour[:1]
    assert torch.allclose(desaturated.squeeze(), (luma @ colour[0]).expand(3), atol=1e-5)


def test_sampling_chosen_pixels_equals_rendering_every_pixel():
    for channels, n_aug in ((3, 3), (3, 10), (1, 4), (3, 1)):
        g = torch.Generator().manual_seed(channels * 100 + n_aug)
        images = torch.rand(6, channels, 20, 28, generator=g)
        augmentation = source_aug.plan_augmentation(images.clone(), torch.Generator().manual_seed(5), n_aug)
        full = source_aug.render(augmentation)
        image, y, x = torch.meshgrid(torch.arange(6), torch.arange(20), torch.arange(28), indexing="ij")
        points = source_aug.sample(augmentation, image.flatten(), y.flatten(), x.flatten())
        expected = full.permute(0, 2, 3, 1).reshape(-1, channels)
        assert (points - expected).abs().max() < 1e-5, (channels, n_aug)
    assert augmentation.angle is None or bool((augmentation.angle != 0).any())


def test_rotation_is_drawn_and_sampled_like_grid_sample():
    # every image rotates: n_aug = 10 draws all ten ops
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    augmentation = source_aug.plan_augmentation(images.clone(), torch.Generator().manual_seed(2), 10)
    assert augmentation.angle is not None and bool((augmentation.angle != 0).all())
    rendered = source_aug.render(augmentation)
    picked = source_aug.sample(augmentation, torch.tensor([0, 1, 2]), torch.tensor([0, 7, 15]), torch.tensor([15, 3, 0]))
    assert torch.allclose(picked, rendered[[0, 1, 2], :, [0, 7, 15], [15, 3, 0]], atol=1e-5)


def test_sharpness_is_pils_kernel_and_histograms_count_levels():
    images = _images(seed=9, batch=5, size=18)
    factor = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0])
    kernel = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1), mode="replicate")
    smooth = torch.nn.functional.conv2d(padded, kernel.expand(3, 1, 3, 3).contiguous(), groups=3)
    expected = (smooth + factor.view(-1, 1, 1, 1) * (images - smooth)).clamp(0, 1)
    sharpened = source_aug._sharpen(images, factor)
    assert torch.allclose(sharpened, expected, atol=1e-6)
    assert torch.allclose(sharpened[2], images[2], atol=1e-6), "factor 1 leaves the image as it is"

    rows = torch.tensor([True, True, False, True, True])
    histogram = source_aug._histograms(sharpened, rows)
    assert torch.equal(histogram[rows], _histogram(quantize(sharpened))[rows])
    assert not histogram[2].any() and histogram[0].sum() == 3 * 18 * 18
