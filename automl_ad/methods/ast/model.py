"""AST: asymmetric student-teacher anomaly detection (Rudolph et al., WACV 2023).

Phase "teacher": a conditional normalizing flow (FrEIA affine couplings, conditioned on
a sinusoidal positional encoding) is fit to frozen pretrained features by per-pixel
negative log-likelihood. Phase "teacher" ends with a frozen flow; phase "student" trains
a plain convolutional network to regress the flow's outputs z on normal images. The flow
is bijective, so on anomalies z differs from what the (non-invertible) student predicts;
the anomaly map is the per-pixel mean squared student-teacher distance.

Written from the paper; the official code (marco-rudolph/AST, no licence file: read, not
copied) settled the details. As the official code: block permutations seeded by their
index, couplings on both halves with a zero-initialised output gain, kernels 3 and 5 in
the last block, the atan soft clamp, Adam (2e-4, weight decay 1e-5), the student's
per-pixel mean squared distance as the map, its mean as the image score (RGB).

The feature stage: the paper takes EfficientNet-B5's block 35 (the end of its 304-channel
stride-32 stage) at 768 px, 24 x 24 cells. ``feature_stride=32`` takes that stage
(``backbones.BackboneSpec.coarse_layer``; torchvision's efficientnet_b5 with the same
lukemelas weights is the paper's own extractor when its file is on the machine, Lite0-2
offer their stride-32 stage); the default stays 16, the previous behaviour, since the
sizes a CPU budget affords leave a stride-32 grid of 4 x 4 cells at 128 px. 768 px is
among AST's candidate sizes whenever the budget affords it (common.yaml adds each
method's paper size), but the space samples parameters independently of the size, so
(768, 32) is a point the search can reach, not one it is tied to. Not as the official
code: features are computed on the fly (it pre-extracts them), the positional encoding's
sin/cos channels are stacked, not interleaved (the same code, permuted), the student's
LeakyReLU has the paper's slope 0.2 (the code's nn.LeakyReLU() default is 0.01), and the
teacher's NLL is averaged over channels as well as pixels (the code sums over channels:
a constant scale, which Adam ignores).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from FrEIA.framework import SequenceINN
from FrEIA.modules import GLOWCouplingBlock
from FrEIA.modules.base import InvertibleModule
from torch import Tensor, nn

from automl_ad.methods.backbones import create_backbone, default_layers
from automl_ad.errors import UserError
from automl_ad.methods.base import Batch, Method, Recipe, check_config, register


@dataclass
class ASTConfig:
    backbone: str = "efficientnet_lite0"  # the paper's is EfficientNet-B5
    weights: str = "pretrained"  # "pretrained", "random" or a checkpoint path
    # 16: the deepest stride-16 stage; 32: the stride-32 stage the paper takes (its
    # EfficientNet-B5 block 35, 24 x 24 cells at its 768 px), backbones.BackboneSpec.coarse_layer.
    feature_stride: int = 16
    coupling_blocks: int = 4
    teacher_hidden: int = 1024  # paper, MVTec AD
    clamp_alpha: float = 3.0  # soft clamp of the log-scales (paper, MVTec AD)
    student_blocks: int = 4
    student_hidden: int = 1024
    pos_dim: int = 32  # channels of the positional encoding (even; 0 = none)
    lr: float = 2e-4
    weight_decay: float = 1e-5
    score_reduce: str = "mean"  # image score from the map: "mean" (paper, RGB) or "max"

    def __post_init__(self) -> None:
        check_config(self, "ast")  # ranges and reductions: space.yaml
        if self.pos_dim % 4:
            raise UserError(f"ast: pos_dim must be a multiple of 4 (>= 0), got {self.pos_dim}")


def positional_encoding(channels: int, height: int, width: int, device: torch.device | None = None) -> Tensor:
    """channels x height x width sinusoidal 2-D encoding: half the channels encode the
    column, half the row, each as sin/cos pairs at geometrically spaced frequencies."""
    if channels == 0:
        return torch.zeros(0, height, width, device=device)
    quarter = channels // 4
    frequencies = torch.exp(
        -math.log(10000.0) * torch.arange(quarter, device=device, dtype=torch.float32) / quarter
    )
    cols = torch.arange(width, device=device, dtype=torch.float32)[:, None] * frequencies  # W x q
    rows = torch.arange(height, device=device, dtype=torch.float32)[:, None] * frequencies  # H x q
    col_code = torch.cat([cols.sin(), cols.cos()], dim=1).T[:, None, :].expand(-1, height, -1)
    row_code = torch.cat([rows.sin(), rows.cos()], dim=1).T[:, :, None].expand(-1, -1, width)
    return torch.cat([col_code, row_code], dim=0)


class SeededChannelPermutation(InvertibleModule):
    """A fixed random channel permutation from an explicit seed (FrEIA's PermuteRandom
    reseeds numpy's global generator, which library code must not touch)."""

    def __init__(self, dims_in: list[tuple[int, ...]], dims_c: Any = None, seed: int = 0) -> None:
        super().__init__(dims_in, dims_c)
        channels = dims_in[0][0]
        generator = torch.Generator().manual_seed(seed)
        permutation = torch.randperm(channels, generator=generator)
        self.register_buffer("permutation", permutation)
        self.register_buffer("inverse", torch.argsort(permutation))

    def forward(self, x: list[Tensor], c: Any = None, rev: bool = False, jac: bool = True) -> tuple[list[Tensor], Tensor]:
        index = self.inverse if rev else self.permutation
        return [x[0][:, index]], torch.zeros(x[0].shape[0], device=x[0].device)

    def output_dims(self, input_dims: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        return input_dims


class _CouplingSubnet(nn.Module):
    """conv-ReLU-conv predicting a coupling's scales and shifts. The output is multiplied
    by a learnable gain that starts at 0, so every block starts as the identity and the
    flow trains stably (the paper's initialisation)."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int, kernel: int) -> None:
        super().__init__()
        pad = kernel // 2
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, hidden, kernel, padding=pad, padding_mode="replicate"),
            nn.ReLU(),
            nn.Conv2d(hidden, out_channels, kernel, padding=pad, padding_mode="replicate"),
        )
        self.gain = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x) * self.gain


def build_teacher(channels: int, grid: tuple[int, int], config: ASTConfig) -> SequenceINN:
    """Conditional Real-NVP: permutation + GLOW-style affine coupling (both halves) per block."""
    flow = SequenceINN(channels, *grid)
    cond_shape = (int(config.pos_dim), *grid)
    blocks = int(config.coupling_blocks)
    for index in range(blocks):
        kernel = 5 if index == blocks - 1 and blocks > 1 else 3  # wider view in the last block

        def subnet(c_in: int, c_out: int, kernel: int = kernel) -> nn.Module:
            return _CouplingSubnet(c_in, c_out, int(config.teacher_hidden), kernel)

        flow.append(SeededChannelPermutation, seed=index)
        coupling_kwargs: dict[str, Any] = {
            "subnet_constructor": subnet,
            "clamp": float(config.clamp_alpha),
            "clamp_activation": "ATAN",
        }
        if config.pos_dim:
            flow.append(GLOWCouplingBlock, cond=0, cond_shape=cond_shape, **coupling_kwargs)
        else:
            flow.append(GLOWCouplingBlock, **coupling_kwargs)
    return flow


class _ResidualBlock(nn.Module):
    def __init__(self, channels: int, slope: float) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.LeakyReLU(slope),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.LeakyReLU(slope),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class Student(nn.Module):
    """conv 3x3 -> LeakyReLU -> residual blocks -> conv 3x3, features(+position) -> z."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int, blocks: int, slope: float = 0.2) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, hidden, 3, padding=1), nn.LeakyReLU(slope)]
        layers += [_ResidualBlock(hidden, slope) for _ in range(blocks)]
        layers.append(nn.Conv2d(hidden, out_channels, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@register
class AST(Method):
    name = "ast"
    # the paper schedule (sources: shared/reference/methods.md) and the CPU speed prior
    # (tuning/calibration.py says how it was measured; GPU: an estimate, never measured)
    recipe = Recipe(480, 8, 768, "AST paper: 240 teacher + 240 student epochs, batch 8, 768 px")
    cpu_prior = {
        128: (8, 0.421, 0.0002278, 1.0, 1.748, 0.1003, 0.005),
        256: (8, 0.493, 0.001348, 1.0, 6.827, 0.4803, 0.016),
    }
    gpu_speedup = 120.0
    phases = ("teacher", "student")
    Config = ASTConfig

    def __init__(self, config: ASTConfig, image_size: int, category: str) -> None:
        super().__init__(config, image_size, category)
        self.backbone = create_backbone(
            config.backbone,
            weights=config.weights,
            layers=default_layers(config.backbone, single=True, stride=int(config.feature_stride)),
        )
        channels = self.backbone.channels[0]
        stride = self.backbone.strides[0]
        # The flow's declared grid only fixes FrEIA's shape bookkeeping; the convolutions
        # run on whatever grid the input gives.
        grid = (math.ceil(image_size / stride), math.ceil(image_size / stride))
        self.teacher = build_teacher(channels, grid, config)
        self.student = Student(channels + int(config.pos_dim), channels, int(config.student_hidden), int(config.student_blocks))
        # Until the student has trained, validation scores with the teacher alone
        # (per-pixel 0.5 ||z||^2, the paper's "teacher only" variant), so teacher epochs
        # report a meaningful objective to the search instead of an untrained student's.
        self.register_buffer("student_steps", torch.zeros((), dtype=torch.long))

    # --- cost ---------------------------------------------------------------------------
    def estimated_work(self, fit_images: int, eval_images: int) -> float:
        """Multiply-adds of the flow and the student per image (each weight once per cell of
        the feature grid) times the images. Without it the planner scaled by parameter
        count, which got the feature stride backwards: stride 32 has more channels (more
        weights) on a quarter of the cells. Counted on the meta device (Lite0, 256 px,
        defaults) the two nets are 50.8 GFLOP at stride 16 and 14.5 at stride 32 and the
        frozen backbone 0.6-0.9, so the backbone is left out; a training step scales with
        the same forward work, so the ratio of two configurations holds for it too."""
        stride = int(self.backbone.strides[0])
        cells = math.ceil(int(self.image_size) / stride) ** 2
        weights = sum(p.numel() for p in self.teacher.parameters()) + sum(p.numel() for p in self.student.parameters())
        return float(max(1, fit_images + eval_images) * weights * cells)

    # --- shared pieces --------------------------------------------------------------
    @torch.no_grad()
    def features(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(backbone features B x C x h x w, positional condition B x P x h x w)."""
        feats = self.backbone(images)[0]
        b, _, h, w = feats.shape
        position = positional_encoding(int(self.config.pos_dim), h, w, feats.device).to(feats.dtype)
        return feats, position.unsqueeze(0).expand(b, -1, -1, -1)

    def teacher_forward(self, feats: Tensor, position: Tensor, rev: bool = False) -> tuple[Tensor, Tensor]:
        """(z, log|det J| per sample); ``rev`` maps z back to features."""
        conditions = [position] if self.config.pos_dim else []
        z, log_det = self.teacher(feats, c=conditions, rev=rev)
        return z, log_det

    def _student_input(self, feats: Tensor, position: Tensor) -> Tensor:
        return torch.cat([feats, position], dim=1) if self.config.pos_dim else feats

    # --- training -------------------------------------------------------------------
    def configure_optimizer(self, phase: str, total_steps: int) -> tuple[torch.optim.Optimizer, None]:
        if phase not in self.phases:
            raise ValueError(f"ast: unknown phase {phase!r}")
        trained = self.teacher if phase == "teacher" else self.student
        frozen = self.student if phase == "teacher" else self.teacher
        for parameter in frozen.parameters():
            parameter.requires_grad_(False)
        for parameter in trained.parameters():
            parameter.requires_grad_(True)
        optimizer = torch.optim.Adam(
            trained.parameters(), lr=self.config.lr, betas=(0.9, 0.999), eps=1e-8,
            weight_decay=self.config.weight_decay,
        )
        return optimizer, None

    def training_step(self, batch: Batch, phase: str) -> dict[str, Tensor]:
        feats, position = self.features(batch.images)
        if phase == "teacher":
            z, log_det = self.teacher_forward(feats, position)
            per_value = z[0].numel()
            # Per-pixel, per-channel NLL under a standard normal base distribution.
            nll = 0.5 * z.pow(2).mean() - log_det.mean() / per_value
            return {"loss": nll}
        if phase == "student":
            with torch.no_grad():
                target, _ = self.teacher_forward(feats, position)
            predicted = self.student(self._student_input(feats, position))
            self.student_steps += 1
            return {"loss": F.mse_loss(predicted, target)}
        raise ValueError(f"ast: unknown phase {phase!r}")

    # --- inference ------------------------------------------------------------------
    def anomaly_map(self, images: Tensor) -> Tensor:
        feats, position = self.features(images)
        target, _ = self.teacher_forward(feats, position)
        if int(self.student_steps) == 0:
            grid_map = 0.5 * target.pow(2).mean(dim=1, keepdim=True)
        else:
            predicted = self.student(self._student_input(feats, position))
            grid_map = (predicted - target).pow(2).mean(dim=1, keepdim=True)
        return F.interpolate(grid_map, size=images.shape[-2:], mode="bilinear", align_corners=False).squeeze(1)

    def image_score(self, maps: Tensor) -> Tensor:
        flat = maps.flatten(1)
        return flat.mean(dim=1) if self.config.score_reduce == "mean" else flat.amax(dim=1)
