"""SSAE: self-supervised autoencoder (Bauer, Nakajima, Müller; arXiv 2206.11723,
journal version "Self-Supervised Autoencoders for Visual Anomaly Detection",
Mathematics 2024, 12(24), 3988).

SOURCE STATUS — read this before trusting the details. Only the abstracts of the two
papers were reachable from this machine (arXiv v8 HTML and the MDPI page are stored
only up to their abstracts; no official code exists). What follows is therefore the
abstract-level method plus a third-party description of the architecture, with the
gaps filled by stated assumptions, not a transcription of the paper's equations.

What the abstracts state (implemented):
  * A convolutional autoencoder f trained as a denoising AE with structured,
    spatially coherent corruption: input x~ = corrupted image, target x = clean image.
  * A "modified reconstruction error" that makes f reproduce uncorrupted regions
    faithfully while replacing corrupted ones (a hybrid of inpainting and
    segmentation); the optimum resembles an orthogonal projection onto the manifold
    of normal images.
  * Inference is one forward pass; the anomaly map is the reconstruction error.

Equations implemented (M = batch.masks, 1 on corrupted pixels; e = per-pixel squared
error averaged over the 3 channels, e(p) = mean_c (f(x~)_c(p) - x_c(p))^2):
  (1) L = sum_p (1 - M) e / sum_p (1 - M)  +  lambda * sum_p M e / sum_p M
      i.e. the mean error on uncorrupted pixels plus lambda times the mean error on
      corrupted pixels, each over the whole batch (a term is dropped when its region
      is empty). ASSUMPTION: per-region normalisation, so small corrupted regions are
      not drowned by the background; ``corruption_weight`` = lambda (default 1).
  (2) map(x) = G_sigma * mean_c (f(x)_c - x_c)^2, G_sigma a Gaussian filter
      (ASSUMPTION from the third-party description: sigma = 4 px at 256 px, scaled
      with the image size; ``smoothing_sigma``). Image score = max of the map
      (ASSUMPTION; the abstracts do not say).

Architecture (third-party description, UNVERIFIED against the paper): a U-Net-like
autoencoder whose skip connections are "convex combination" modules — a learned
per-pixel, per-channel gate g = sigmoid(conv1x1([skip, up])) mixing
g * skip + (1 - g) * up, so the network can copy clean context and ignore corrupted
context — and a bottleneck of stacked dilated 3x3 convs (dilations 1, 2, 4, ...,
``bottleneck_dilations`` of them) for a receptive field that can inpaint large
holes. Encoder: ``depth`` stride-2 stages doubling the width from ``width``.
Output: sigmoid, since images are in [0, 1].
Optimiser (ASSUMPTION): Adam, constant lr 2e-4.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from automl_ad.methods._layers import (
    conv_bn_relu,
    double_conv,
    effective_side,
    gaussian_blur,
    pad_to_multiple,
)
from automl_ad.methods.base import Batch, Method, Recipe, check_config, register


class ConvexCombination(nn.Module):
    """Gated skip: g * skip + (1 - g) * up with g = sigmoid(1x1 conv of both)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gate = nn.Conv2d(2 * channels, channels, 1)

    def forward(self, skip: Tensor, up: Tensor) -> Tensor:
        gate = torch.sigmoid(self.gate(torch.cat([skip, up], dim=1)))
        return gate * skip + (1.0 - gate) * up


class SelfSupervisedAutoencoder(nn.Module):
    def __init__(self, width: int, depth: int, dilations: int) -> None:
        super().__init__()
        channels = [width * 2**level for level in range(depth + 1)]
        self.stem = double_conv(3, channels[0])
        self.down = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(channels[level], channels[level + 1], 3, stride=2, padding=1),
                nn.BatchNorm2d(channels[level + 1]),
                nn.ReLU(inplace=True),
                conv_bn_relu(channels[level + 1], channels[level + 1]),
            )
            for level in range(depth)
        )
        self.bottleneck = nn.Sequential(*(conv_bn_relu(channels[-1], channels[-1], 2**i) for i in range(dilations)))
        self.up = nn.ModuleList(
            nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                conv_bn_relu(channels[level + 1], channels[level]),
            )
            for level in reversed(range(depth))
        )
        self.combine = nn.ModuleList(ConvexCombination(channels[level]) for level in reversed(range(depth)))
        self.refine = nn.ModuleList(conv_bn_relu(channels[level], channels[level]) for level in reversed(range(depth)))
        self.output = nn.Conv2d(channels[0], 3, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        skips = [x]
        for down in self.down:
            x = down(x)
            skips.append(x)
        x = self.bottleneck(x)
        for up, combine, refine, skip in zip(self.up, self.combine, self.refine, reversed(skips[:-1])):
            x = refine(combine(skip, up(x)))
        return torch.sigmoid(self.output(x))


@register
class Ssae(Method):
    name = "ssae"
    # the paper schedule (sources: shared/reference/methods.md) and the CPU speed prior
    # (tuning/calibration.py says how it was measured; GPU: an estimate, never measured)
    recipe = Recipe(300, 8, 256, "SSAE: no code found; 300 epochs, batch 8, 256 px is an UNVERIFIED assumption")
    cpu_prior = {
        128: (8, 0.016, 0.0002128, 1.0, 1.923, 0.05195, 0.005),
        256: (8, 0.0159, 0.0008194, 1.0, 7.248, 0.2405, 0.016),
    }
    gpu_speedup = 150.0

    @dataclass
    class Config:
        lr: float = 2e-4
        width: int = 32
        depth: int = 3
        bottleneck_dilations: int = 4
        corruption_weight: float = 1.0
        smoothing_sigma: float = 4.0  # at 256 px

        def __post_init__(self) -> None:
            check_config(self, "ssae")  # ranges: space.yaml

    def __init__(self, config: "Ssae.Config", image_size: int, category: str) -> None:
        super().__init__(config, image_size, category)
        self.autoencoder = SelfSupervisedAutoencoder(config.width, config.depth, config.bottleneck_dilations)
        self.stride = 2**config.depth

    def reconstruct(self, images: Tensor) -> Tensor:
        padded, height, width = pad_to_multiple(images, self.stride)
        return self.autoencoder(padded)[..., :height, :width]

    def training_step(self, batch: Batch, phase: str) -> dict[str, Tensor]:
        error = (self.reconstruct(batch.images) - batch.clean).pow(2).mean(dim=1)
        corrupted = (batch.masks[:, 0] > 0.5).to(error.dtype)
        clean_area, corrupted_area = (1.0 - corrupted).sum(), corrupted.sum()
        clean_term = ((1.0 - corrupted) * error).sum() / clean_area.clamp_min(1.0)
        corrupted_term = (corrupted * error).sum() / corrupted_area.clamp_min(1.0)
        loss = clean_term + self.config.corruption_weight * corrupted_term
        return {"loss": loss, "clean_error": clean_term.detach(), "corrupted_error": corrupted_term.detach()}

    def anomaly_map(self, images: Tensor) -> Tensor:
        error = (self.reconstruct(images) - images).pow(2).mean(dim=1)
        sigma = self.config.smoothing_sigma * effective_side(*images.shape[-2:]) / 256.0
        return gaussian_blur(error, sigma)
