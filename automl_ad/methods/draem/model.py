"""DRAEM (Zavrtanik, Kristan, Skočaj, ICCV 2021): reconstruct, then discriminate.

A reconstructive encoder-decoder (no skip connections) learns to turn images with
synthetic anomalies back into the clean image; a discriminative U-Net sees
[reconstruction, input] and segments where they disagree (2-class softmax).

Follows the official code (VitjanZ/DRAEM; shared/reference/methods.md, section 1):
* Networks as ``model_unet.py``: the same blocks, widths per level and skip layout
  (69.0M + 28.4M parameters at the paper's widths 128/64), init N(0, 0.02) for convs
  and N(1, 0.02) for batch-norm weights.
* Loss (``train_DRAEM.py``): L2(rec, clean) + ssim_weight * (1 - SSIM(rec, clean);
  window 11, sigma 1.5) + focal(softmax, mask; gamma 2), weights 1. Optimiser Adam,
  lr 1e-4; MultiStepLR x0.2 at 80 % and 90 % of the steps.
* Map: softmax channel 1 at the input resolution. Image score: max of the map after a
  mean filter (21 x 21 at 256 px, scaled with the size).
* Training data (the perlin family, ``synthesis/perlin.py``): half the samples normal;
  Perlin masks with 2^0..2^5 periods per axis, rotated, threshold 0.5; the source
  blended with beta ~ U(0, 0.8); three of the ten imgaug ops on the source; 30 % of
  the normal images rotated by U(-90, 90) degrees before anything is pasted, the
  rotated image being the reconstruction target.

Where it cannot or does not:
* Anomaly sources: DTD when given (``texture_dir``), else a procedural DTD-like texture
  bank (``synthesis/textures.py``): DTD cannot ship with the package or be downloaded.
* Widths: the defaults are 32/16 (6.1M parameters, 1/16 of the paper's compute) so a
  CPU run finishes; the space searches 16..128 and 8..64, the paper's 128/64 included.
* Length: the loop counts optimizer steps; the official "epoch" is len(train) random
  samples and its README trains 700 of them (``recipe``).
* Source augmentation runs its ops in a fixed order (imgaug's is random) and shifts
  hue by a linear YIQ rotation (``synthesis/source_aug.py``).
* Inputs of any size are replicate-padded to a multiple of 32 and cropped back (the
  official code is 256 x 256 only); images are RGB (cv2's BGR makes no difference to
  networks trained from scratch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from automl_ad.methods._layers import (
    conv_bn_relu,
    double_conv,
    effective_side,
    focal_loss,
    mean_filter,
    normal_init,
    pad_to_multiple,
    scaled_odd_window,
    ssim_loss,
)
from automl_ad.methods.base import Batch, Method, Recipe, check_config, register

DISCRIMINATIVE_STRIDE = 32  # 5 max-pools in the U-Net


class ReconstructiveNetwork(nn.Module):
    """Encoder (5 double-conv blocks, 4 max-pools) and decoder, no skips, linear output.

    As the official ``DecoderReconstructive``: 4 stages of (bilinear x2 upsample, then
    three conv-BN-ReLU of which the last one changes the width) to 4w, 2w, w, w."""

    def __init__(self, width: int) -> None:
        super().__init__()
        channels = [width, 2 * width, 4 * width, 8 * width, 8 * width]
        blocks, previous = [], 3
        for out in channels:
            blocks.append(double_conv(previous, out))
            previous = out
        self.encoder = nn.ModuleList(blocks)
        stages = []
        for out in (4 * width, 2 * width, width, width):
            stages.append(
                nn.Sequential(
                    nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
                    conv_bn_relu(previous, previous),
                    conv_bn_relu(previous, previous),
                    conv_bn_relu(previous, out),
                )
            )
            previous = out
        self.decoder = nn.Sequential(*stages)
        self.output = nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        for index, block in enumerate(self.encoder):
            if index:
                x = F.max_pool2d(x, 2)
            x = block(x)
        return self.output(self.decoder(x))


class DiscriminativeUNet(nn.Module):
    """U-Net: 6 encoder blocks, 5 max-pools, 5 up-stages with skip concatenation.

    As the official ``DecoderDiscriminative``: each up-stage (bilinear x2, conv-BN-ReLU)
    narrows to 8w, 4w, 2w, w, w, is concatenated with the encoder block of that size
    (8w, 8w, 4w, 2w, w) and merged back to its own width by a double conv."""

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        channels = [width, 2 * width, 4 * width, 8 * width, 8 * width, 8 * width]
        blocks, previous = [], in_channels
        for out in channels:
            blocks.append(double_conv(previous, out))
            previous = out
        self.encoder = nn.ModuleList(blocks)
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for out, skip in zip((8 * width, 4 * width, 2 * width, width, width), channels[::-1][1:]):
            self.up.append(
                nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True), conv_bn_relu(previous, out))
            )
            self.merge.append(double_conv(out + skip, out))
            previous = out
        self.output = nn.Conv2d(width, 2, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for index, block in enumerate(self.encoder):
            if index:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips[:-1])):
            x = merge(torch.cat([up(x), skip], dim=1))
        return self.output(x)


@register
class Draem(Method):
    name = "draem"
    # the paper schedule (sources: shared/reference/methods.md) and the CPU speed prior
    # (tuning/calibration.py says how it was measured; GPU: an estimate, never measured)
    recipe = Recipe(700, 8, 256, "DRAEM README example: 700 epochs, batch 8, 256 px")
    cpu_prior = {
        128: (8, 0.0859, 0.0002773, 1.0, 2.731, 0.09912, 0.005),
        256: (8, 0.0568, 0.0009384, 1.0, 11.73, 0.4281, 0.016),
    }
    gpu_speedup = 150.0

    @dataclass
    class Config:
        lr: float = 1e-4
        rec_width: int = 32  # paper: 128
        disc_width: int = 16  # paper: 64
        ssim_weight: float = 1.0
        focal_gamma: float = 2.0
        score_window: int = 21  # mean-filter side at 256 px (paper's s_f)

        def __post_init__(self) -> None:
            check_config(self, "draem")  # ranges: space.yaml

    def __init__(self, config: "Draem.Config", image_size: int, category: str) -> None:
        super().__init__(config, image_size, category)
        self.reconstructive = ReconstructiveNetwork(config.rec_width)
        self.discriminative = DiscriminativeUNet(6, config.disc_width)
        normal_init(self)

    def _segment(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(reconstruction B x 3 x H x W, softmax B x 2 x H x W) at the input size."""
        padded, height, width = pad_to_multiple(images, DISCRIMINATIVE_STRIDE)
        reconstruction = self.reconstructive(padded)
        logits = self.discriminative(torch.cat([reconstruction, padded], dim=1))
        return reconstruction[..., :height, :width], logits.softmax(dim=1)[..., :height, :width]

    def configure_optimizer(self, phase: str, total_steps: int) -> tuple[
        torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None
    ]:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.config.lr)
        milestones = sorted({max(1, int(0.8 * total_steps)), max(1, int(0.9 * total_steps))})
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.2)
        return optimizer, scheduler

    def training_step(self, batch: Batch, phase: str) -> dict[str, Tensor]:
        reconstruction, probabilities = self._segment(batch.images)
        l2 = F.mse_loss(reconstruction, batch.clean)
        structural = ssim_loss(reconstruction, batch.clean)
        mask = batch.masks.clamp(0.0, 1.0)
        focal = focal_loss(probabilities, torch.cat([1.0 - mask, mask], dim=1), self.config.focal_gamma)
        loss = l2 + self.config.ssim_weight * structural + focal
        return {"loss": loss, "l2": l2.detach(), "ssim": structural.detach(), "focal": focal.detach()}

    def anomaly_map(self, images: Tensor) -> Tensor:
        return self._segment(images)[1][:, 1]

    def image_score(self, maps: Tensor) -> Tensor:
        window = scaled_odd_window(self.config.score_window, effective_side(*maps.shape[-2:]))
        return mean_filter(maps, window).flatten(1).amax(dim=1)
