"""DRAEM as its official code trains it: texture anomaly sources (a folder, else the
procedural bank), the 30 % rotation of normal images (the reconstruction target is the
rotated image), and the paper's widths in the search space."""

from __future__ import annotations

import math

import pytest
import torch

from automl_ad.methods.base import create_method, packaged_spec
from automl_ad.synthesis import build_synthesizer
from automl_ad.synthesis import perlin as perlin_module
from automl_ad.synthesis.perlin import BANK_SEED, BANK_SIZE, PerlinSynthesizer, rotate_images
from automl_ad.synthesis.textures import texture_bank
from automl_ad.training.loop import _make_batch

SIZE = 32


def _images(batch: int, seed: int = 0, size: int = SIZE) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(batch, 3, 4, 4, generator=g)
    smooth = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (0.2 + 0.6 * smooth).clamp(0, 1)  # no black pixels: rotated-in corners are told apart


def test_rotate_images_is_a_pixel_true_rotation() -> None:
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    quarter = rotate_images(images, torch.full((2,), math.pi / 2))
    assert torch.allclose(quarter, torch.rot90(images, k=-1, dims=(2, 3)), atol=1e-5)
    assert torch.allclose(rotate_images(images, torch.zeros(2)), images, atol=1e-6)
    wide = torch.rand(1, 3, 6, 10, generator=torch.Generator().manual_seed(1))
    half_turn = rotate_images(wide, torch.full((1,), math.pi))
    assert torch.allclose(half_turn, wide.flip(2, 3), atol=1e-5)  # a non-square image too
    # a quarter turn of a non-square image leaves black where the original does not reach
    turned = rotate_images(wide, torch.full((1,), math.pi / 2))
    assert turned[..., :, 0].abs().max() == 0 and turned[..., 3, 5].abs().min() > 0


def test_normals_rotate_with_the_official_probability() -> None:
    images = _images(400, size=16)
    synth = build_synthesizer("perlin", {"normal_share": 1.0})  # defaults: 0.3, 90 degrees
    out = synth(images, torch.Generator().manual_seed(1))
    assert out.clean is not None and torch.equal(out.images, out.clean)  # normals: the rotated image
    assert out.labels.abs().sum() == 0
    turned = (out.clean - images).flatten(1).abs().amax(1) > 1e-4
    assert 0.22 < turned.float().mean() < 0.38
    # black reaches a rotated image's corners (the input has no pixel below 0.2) unless
    # its angle is a few degrees
    corners = out.clean[turned][:, :, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners.flatten(1).amin(1) < 0.15).float().mean() > 0.85
    off = build_synthesizer("perlin", {"normal_share": 1.0, "rotate_normal_p": 0.0})
    kept = off(images, torch.Generator().manual_seed(1))
    assert kept.clean is None and torch.equal(kept.images, images)


def test_anomalies_are_pasted_into_the_rotated_image() -> None:
    images = _images(6)
    synth = build_synthesizer("perlin", {"normal_share": 0.0, "rotate_normal_p": 1.0, "rotate_normal": 60.0})
    out = synth(images, torch.Generator().manual_seed(2))
    assert out.clean is not None and not torch.allclose(out.clean, images)
    outside = (out.masks == 0).expand_as(images)
    assert torch.equal(out.images[outside], out.clean[outside])
    assert out.labels.sum() >= 3  # a Perlin mask at a high threshold may come out empty


def test_training_batches_reconstruct_the_rotated_image() -> None:
    fit = _images(8)
    synth = build_synthesizer("perlin", {"normal_share": 1.0, "rotate_normal_p": 1.0})
    batch = _make_batch(fit, torch.arange(8), synth, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert torch.equal(batch.clean, batch.images)  # every sample normal: target = input
    assert not torch.allclose(batch.clean, fit)  # ... and both rotated
    plain = build_synthesizer("perlin", {"normal_share": 1.0, "rotate_normal_p": 0.0})
    batch = _make_batch(fit, torch.arange(8), plain, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert torch.equal(batch.clean, fit)


def _pasted_from(out, candidates: torch.Tensor) -> list[int]:
    """For each anomalous image, which candidate source its masked pixels were copied
    from (n_aug 0, opacity 1), or -1 when none matches."""
    found = []
    for index in out.labels.nonzero().squeeze(1).tolist():
        inside = out.masks[index, 0] > 0
        pasted = out.images[index][:, inside]  # 3 x N
        match = [k for k in range(candidates.shape[0]) if torch.allclose(pasted, candidates[k][:, inside], atol=1e-5)]
        found.append(match[0] if match else -1)
    return found


EXACT_PASTE = {"normal_share": 0.0, "n_aug": 0, "beta_low": 0.0, "beta_high": 0.0, "min_scale_exp": 1,
               "max_scale_exp": 2, "rotate_normal_p": 0.0}


def test_without_a_folder_the_sources_are_the_procedural_bank() -> None:
    images = _images(6)
    out = build_synthesizer("perlin", EXACT_PASTE)(images, torch.Generator().manual_seed(3))
    bank = texture_bank(BANK_SIZE, SIZE, SIZE, seed=BANK_SEED).float() / 255
    picked = _pasted_from(out, bank)
    assert len(picked) >= 5 and min(picked) >= 0
    assert _pasted_from(out, images) == [-1] * len(picked)  # no normal image was pasted


def test_texture_share_zero_keeps_other_normal_images_and_noise() -> None:
    images = _images(6)
    donors_only = {**EXACT_PASTE, "texture_share": 0.0, "noise_share": 0.0}
    out = build_synthesizer("perlin", donors_only)(images, torch.Generator().manual_seed(3))
    picked = _pasted_from(out, images)
    anomalous = out.labels.nonzero().squeeze(1).tolist()
    assert picked == [(i - 1) % 6 for i in anomalous]  # the batch rolled by one
    half = {**EXACT_PASTE, "texture_share": 0.5, "noise_share": 0.0}
    out = build_synthesizer("perlin", half)(_images(40), torch.Generator().manual_seed(4))
    bank = texture_bank(BANK_SIZE, SIZE, SIZE, seed=BANK_SEED).float() / 255
    from_bank = sum(k >= 0 for k in _pasted_from(out, bank))
    assert 8 < from_bank < 32


def test_val_anomalies_use_neither_bank_nor_rotation(monkeypatch) -> None:
    params = {"normal_share": 0.0, **PerlinSynthesizer.VAL_PARAMS}

    def refuse(*args, **kwargs):
        raise AssertionError("the val set must not read the texture bank")

    monkeypatch.setattr(perlin_module, "texture_bank", refuse)
    out = build_synthesizer("perlin", params)(_images(6), torch.Generator().manual_seed(0))
    assert out.clean is None and out.labels.sum() >= 5


def test_paper_widths_are_in_the_space_and_build_the_paper_network() -> None:
    spec = packaged_spec("draem")
    assert 128 in spec["params"]["rec_width"]["choices"] and 32 in spec["params"]["rec_width"]["choices"]
    assert 64 in spec["params"]["disc_width"]["choices"] and 16 in spec["params"]["disc_width"]["choices"]
    with torch.device("meta"):
        paper = create_method("draem", {"rec_width": 128, "disc_width": 64}, 256, "screw")
    rec = sum(p.numel() for p in paper.reconstructive.parameters())
    disc = sum(p.numel() for p in paper.discriminative.parameters())
    # the official model_unet.py at these widths (shared/reference/methods.md): 69.0M + 28.4M
    assert rec == pytest.approx(69.0e6, rel=0.01) and disc == pytest.approx(28.4e6, rel=0.01)
