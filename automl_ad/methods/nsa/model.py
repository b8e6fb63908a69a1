"""NSA (Schlüter et al., ECCV 2022): natural synthetic anomalies, pixel-wise regression.

Follows the official code (hmsch/natural-synthetic-anomalies, commit 9195916) where
noted; reference notes: shared/reference/methods.md, section 2.

Network (as model/resnet.py's resnet18_enc_dec with its defaults): a ResNet-18-style
encoder trained from scratch (7x7/2 stem, max-pool, four stages of two BasicBlocks,
total stride 32), a "nin" of 1x1 convs (8w -> 4w -> 2w, ReLU), and a decoder of three
transposed BasicBlocks (stride 2; 64, 32, 16 channels at w = 64), a bilinear x2 upsample
and a 7x7/2 transposed conv to one channel, sigmoid. Kaiming init. ``width`` is the stem
width (64 = ResNet-18, ~11.5M parameters; the default). The output has the input's size
for any size divisible by 32 (others are padded and cropped).

Training (train_mvtec.py): the nsa family's pixel labels (synthesis/poisson.py, with
patch_ex's label pipeline: 5x5 median of the change mask, disk(5) median of the
intensity change, logistic map with the class's (k, x0); synthesis/nsa_recipe.py), BCE
for "binary" and "logistic" labels, MSE for "continuous" ones; ``label_mode`` travels to
the synthesizer (whose parameter is named ``label``) through ``synthesis_overrides``.
With ``augment`` (the default) the synthesizer first augments every normal image and its
donor as the official loader does (textures: vertical flip, crop; objects: crop; the
unaligned ones also rotations of up to 5 degrees; an unknown product: crop only), see
nsa_recipe.py. Adam (lr 1e-3) with cosine annealing to 1e-6; the paper's batch 64 and
320 / 560 epochs are the recipe below. Inputs are ImageNet-normalised inside, as in the
official code. Map: the sigmoid output; image score: its mean (the paper's choice, not
the max).

Where it cannot follow the official code: the official model trains on 224 px crops of
256 px objects (256 of 264 for textures) and scores objects on the centre 224 crop,
zero-padding the map back to 256; here one input size serves training, scoring and the
exported bundle, so a crop is a window resampled to the full size (a 2.7-3.1 % zoom)
and the whole image is scored. The cosine schedule steps every optimiser step, the
official one every epoch (the same curve at the official epoch counts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from automl_ad.errors import UserError
from automl_ad.methods._layers import pad_to_multiple
from automl_ad.methods.base import Batch, Method, Recipe, check_config, register
from automl_ad.synthesis.nsa_recipe import augmentation_defaults

ENCODER_STRIDE = 32
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with a (projected when needed) identity."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class TransposeBasicBlock(nn.Module):
    """Basic block that doubles H and W: transposed 3x3/2 conv, then 3x3 conv."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, 3, stride=2, padding=1, output_padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential(
            nn.ConvTranspose2d(in_channels, out_channels, 1, stride=2, output_padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.up(x)))
        return F.relu(self.bn2(self.conv(out)) + self.shortcut(x))


class NsaNetwork(nn.Module):
    """ResNet-18 encoder + nin + transposed decoder -> B x 1 x H x W logits."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        stages, previous = [], width
        for index, channels in enumerate([width, 2 * width, 4 * width, 8 * width]):
            stride = 1 if index == 0 else 2
            stages.append(nn.Sequential(BasicBlock(previous, channels, stride), BasicBlock(channels, channels, 1)))
            previous = channels
        self.stages = nn.Sequential(*stages)
        self.nin = nn.Sequential(
            nn.Conv2d(8 * width, 4 * width, 1), nn.ReLU(inplace=True),
            nn.Conv2d(4 * width, 2 * width, 1), nn.ReLU(inplace=True),
        )
        self.decoder = nn.Sequential(
            TransposeBasicBlock(2 * width, width),
            TransposeBasicBlock(width, width // 2),
            TransposeBasicBlock(width // 2, width // 4),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.ConvTranspose2d(width // 4, 1, 7, stride=2, padding=3, output_padding=1),
        )
        for layer in self.modules():
            if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
            elif isinstance(layer, nn.BatchNorm2d):
                nn.init.ones_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.nin(self.stages(self.stem(x))))


@register
class Nsa(Method):
    name = "nsa"
    # the paper schedule (sources: shared/reference/methods.md) and the CPU speed prior
    # (tuning/calibration.py says how it was measured; GPU: an estimate, never measured)
    recipe = Recipe(320, 64, 256, "NSA code: 320 epochs (560 for hazelnut, metal_nut, screw), batch 64, 256 px",
                    (("hazelnut", 560), ("metal_nut", 560), ("screw", 560)))
    cpu_prior = {
        128: (64, 0.135, 0.000347, 1.0, 2.376, 0.01567, 0.005),
        256: (64, 0.0821, 0.00184, 1.0, 10.78, 0.07061, 0.016),
    }
    gpu_speedup = 150.0

    @dataclass
    class Config:
        lr: float = 1e-3
        label_mode: str = "logistic"
        width: int = 64
        min_lr: float = 1e-6
        # the official training augmentation of the category (nsa_recipe.augmentation_defaults)
        augment: bool = True

        def __post_init__(self) -> None:
            check_config(self, "nsa")  # ranges and label modes: space.yaml
            if self.width % 4:
                raise UserError(f"method 'nsa': width={self.width} must be divisible by 4")
            if self.min_lr > self.lr:
                raise UserError(f"method 'nsa': min_lr={self.min_lr!r} must not exceed lr={self.lr!r}")

    def __init__(self, config: "Nsa.Config", image_size: int, category: str) -> None:
        super().__init__(config, image_size, category)
        self.network = NsaNetwork(config.width)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def synthesis_overrides(self, family: str) -> dict[str, Any]:
        # The nsa family calls this parameter ``label`` (automl_ad/synthesis/poisson.py).
        # The augmentation is NSA's training recipe, not the family's: other methods
        # training with the nsa family keep their inputs aligned with Batch.clean.
        if family != "nsa":
            return {}
        out: dict[str, Any] = {"label": self.config.label_mode}
        if self.config.augment:
            out.update(augmentation_defaults(self.category))
        return out

    def _logits(self, images: Tensor) -> Tensor:
        padded, height, width = pad_to_multiple((images - self.mean) / self.std, ENCODER_STRIDE)
        return self.network(padded)[:, 0, :height, :width]

    def configure_optimizer(self, phase: str, total_steps: int) -> tuple[
        torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None
    ]:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.config.lr)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(1, total_steps), eta_min=self.config.min_lr
        )
        return optimizer, scheduler

    def training_step(self, batch: Batch, phase: str) -> dict[str, Tensor]:
        logits = self._logits(batch.images)
        target = batch.masks[:, 0].clamp(0.0, 1.0)
        if self.config.label_mode == "continuous":
            loss = F.mse_loss(torch.sigmoid(logits), target)
        else:
            # BCE on logits: the same loss as BCE on the sigmoid, without its overflow.
            loss = F.binary_cross_entropy_with_logits(logits, target)
        return {"loss": loss}

    def anomaly_map(self, images: Tensor) -> Tensor:
        return torch.sigmoid(self._logits(images))

    def image_score(self, maps: Tensor) -> Tensor:
        return maps.flatten(1).mean(dim=1)
