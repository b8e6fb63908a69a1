"""PatchCore: a memory bank of locally aware patch features (Roth et al., CVPR 2022).

Nothing is trained. A frozen ImageNet backbone gives mid-level feature maps; each map is
aggregated over a p x p neighbourhood (average pooling keeps the resolution), the coarser
map is upsampled to the finer one's grid, and the two are concatenated into one patch
feature per location. ``setup`` collects the patch features of every fit image and keeps
a *greedy coreset* of them (iterative farthest-point selection, run on a random
Johnson-Lindenstrauss projection so each step is cheap), which covers the normal patches
with a fraction of the memory. A test patch's anomaly score is its distance to the
nearest bank patch; the map is that score upsampled to the image and Gaussian-smoothed.

The image score is the paper's reweighted maximum: for the test patch with the largest
distance s* to its nearest bank patch m*, s* is scaled by 1 - softmax over the distances
from the test patch to m* and m*'s b nearest bank neighbours, taken at m*. A test patch
whose nearest normal patch sits in a dense region of normal space keeps most of its
score; one near an isolated, rare normal patch is trusted less. The neighbours of every
bank patch are found once in ``setup``, so the exported graph holds the bank and a small
index table, and nothing else is searched at inference.

Written from the paper; the method has no gradient phase (``phases = ()``): the training
loop runs ``setup`` and validates once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from automl_ad.methods.backbones import create_backbone, default_layers
from automl_ad.errors import UserError
from automl_ad.methods.base import Method, Recipe, check_config, register
from automl_ad.methods._layers import effective_side, gaussian_blur

_SETUP_CHUNK = 16  # fit images per backbone pass in setup()
_DISTANCE_CHUNK = 4096  # patches per block in nearest-neighbour searches
_CORESET_SEED = 0
# Bounds on the coreset's work (count x candidates x projection_dim): a stride-4 grid at
# 256 px has 4096 patches per image, and a 10 % coreset of 160 such images took minutes
# per trial. Above _MAX_CANDIDATES the greedy selection runs on a seeded random sample of
# that many patches (160 images at 256 px on the stride-8 grid stay exact); the bank
# holds at most _MAX_BANK patches.
_MAX_CANDIDATES = 163_840
_MAX_BANK = 8192
# estimated_work's constants: seconds on one thread of the 2-core reference VM, fitted
# (non-negative least squares on relative error) to setup() + the maps of the val images
# timed by benchmarks/patchcore_cost.py over the searched strides, coreset ratios,
# backbones and sizes (128-256 px, 120-160 fit and 100-240 val images): the backbone pass
# per image at 256 px, the map's upsampling and blur per inferred image at 256 px (its
# kernel grows with the side, so it scales with the side cubed), one greedy-coreset
# multiply-add, one distance multiply-add, and per test-patch x bank pair the work that
# does not depend on the channels (the distance matrix's writes and its minimum). The
# stride-4 grids are costed right only with that last term: their distances have fewer
# channels but 4x the pairs.
_FEATURE_S_AT_256 = 0.0151
_MAP_S_AT_256 = 0.0260
_CORESET_S_PER_OP = 1.98e-10
_DISTANCE_S_PER_OP = 3.05e-11
_PAIR_S = 6.8e-9
_BACKBONE_COST = {"efficientnet_lite0": 1.0, "efficientnet_lite1": 1.36, "efficientnet_lite2": 1.42}  # same VM


@dataclass
class PatchCoreConfig:
    backbone: str = "efficientnet_lite0"  # the paper's is wide_resnet50_2
    weights: str = "pretrained"  # "pretrained", "random" or a checkpoint path
    feature_strides: str = "8+16"  # which of the backbone's stride-4/8/16 layers to use
    neighbourhood: int = 3  # p: local aggregation window (odd)
    coreset_ratio: float = 0.01  # fraction of fit patches in the bank (paper: 1 % nearly as good as 10 %)
    projection_dim: int = 64  # random projection for coreset selection only (paper: 128)
    reweight_neighbours: int = 9  # b: bank neighbours of m* in the image-score reweighting
    smoothing_sigma: float = 4.0  # Gaussian sigma in pixels at 224 px, scaled with size

    def __post_init__(self) -> None:
        check_config(self, "patchcore")  # ranges and stride choices (4, 8, 16 = the backbone's layers): space.yaml
        if self.neighbourhood % 2 == 0:
            raise UserError(f"patchcore: neighbourhood must be an odd number >= 1, got {self.neighbourhood}")


def _layers_for(backbone: str, feature_strides: str) -> list[str]:
    by_stride = dict(zip((4, 8, 16), default_layers(backbone)))
    return [by_stride[int(stride)] for stride in feature_strides.split("+")]


_INTERRUPT_EVERY = 64  # coreset steps between two looks at the caller's deadline


def greedy_coreset(points: Tensor, count: int, projection_dim: int, seed: int,
                   check_interrupt: Callable[[], None] | None = None) -> Tensor:
    """Indices of ``count`` points chosen by greedy k-center (farthest-point) selection.

    Distances are taken in a seeded random projection to ``projection_dim`` dimensions
    (the paper's Johnson-Lindenstrauss speed-up). Each step reads the projected points
    once: the cost is count x N x projection_dim. ``check_interrupt`` is called every
    few steps and may raise to stop the selection (a search's budget deadline).
    """
    n, dim = points.shape
    if count >= n:
        return torch.arange(n, device=points.device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if projection_dim < dim:
        projection = torch.randn(dim, projection_dim, generator=generator) / math.sqrt(projection_dim)
        projected = points @ projection.to(points.device, points.dtype)
    else:
        projected = points
    projected = projected.contiguous()
    squared_norms = (projected * projected).sum(dim=1)
    chosen = torch.empty(count, dtype=torch.long, device=points.device)
    current = int(torch.randint(n, (1,), generator=generator))
    nearest = torch.full((n,), float("inf"), device=points.device, dtype=projected.dtype)
    scratch = torch.empty_like(nearest)
    for step in range(count):
        if check_interrupt is not None and step % _INTERRUPT_EVERY == 0:
            check_interrupt()
        chosen[step] = current
        centre = projected[current]
        # |x - c|^2 = |x|^2 - 2 x.c + |c|^2, written into one buffer per step.
        torch.mv(projected, centre, out=scratch)
        scratch.mul_(-2.0).add_(squared_norms).add_(squared_norms[current])
        torch.minimum(nearest, scratch, out=nearest)
        current = int(nearest.argmax())
    return chosen


@register
class PatchCore(Method):
    name = "patchcore"
    # the paper schedule (sources: shared/reference/methods.md) and the CPU speed prior
    # (tuning/calibration.py says how it was measured; GPU: an estimate, never measured)
    recipe = Recipe(0, 8, 224, "PatchCore: no training (memory bank), 224 px (resize 256 + crop)")
    cpu_prior = {
        128: (8, 0.109, 0.00985, 1.33, 0.0, 0.008864, 0.005),
        224: (8, 0.0944, 0.015404, 1.317, 0.0, 0.03706, 0.012),
        256: (8, 0.141, 0.0033444, 1.738, 0.0, 0.06086, 0.016),
    }
    gpu_speedup = 80.0
    phases = ()
    Config = PatchCoreConfig

    def __init__(self, config: PatchCoreConfig, image_size: int, category: str) -> None:
        super().__init__(config, image_size, category)
        self.backbone = create_backbone(
            config.backbone, weights=config.weights, layers=_layers_for(config.backbone, config.feature_strides)
        )
        channels = sum(self.backbone.channels)
        # Filled by setup(); their sizes depend on the fit set, so loading a state dict
        # resizes them (see _load_from_state_dict) and a reloaded model needs no setup().
        self.register_buffer("memory_bank", torch.empty(0, channels))
        self.register_buffer("bank_neighbours", torch.empty(0, 1, dtype=torch.long))

    # --- cost ---------------------------------------------------------------------------
    def estimated_work(self, fit_images: int, eval_images: int) -> float:
        """Seconds on one CPU thread (the constants above): a backbone pass per fit and
        inferred image, the coreset's count x candidates x projection steps, and per
        inferred image its map's post-processing and its patches x bank distances. The
        feature strides and coreset ratio move it most: strides 4+8 at ratio 0.047
        measured 3.5x the default at 256 px with 100 val images and 7.4x at 224 px with
        240 (benchmarks/patchcore_cost.py), which a parameter count (smaller for 4+8)
        got backwards."""
        size, config = int(self.image_size), self.config
        finest = min(int(stride) for stride in str(config.feature_strides).split("+"))
        per_image = (size // finest) ** 2
        patches = max(1, fit_images) * per_image
        bank = min(_MAX_BANK, max(1, math.ceil(float(config.coreset_ratio) * patches)))
        candidates = min(patches, _MAX_CANDIDATES)
        features = _FEATURE_S_AT_256 * _BACKBONE_COST.get(str(config.backbone), 1.0) * (size / 256) ** 2
        post_processing = _MAP_S_AT_256 * (size / 256) ** 3
        coreset = _CORESET_S_PER_OP * bank * candidates * int(config.projection_dim)
        nearest = per_image * bank * (_DISTANCE_S_PER_OP * sum(self.backbone.channels) + _PAIR_S)
        return fit_images * features + coreset + eval_images * (features + post_processing + nearest)

    # --- features -------------------------------------------------------------------
    @torch.no_grad()
    def patch_features(self, images: Tensor) -> Tensor:
        """B x C x h x w locally aggregated patch features on the finest layer's grid."""
        maps = self.backbone(images)
        size = maps[0].shape[-2:]
        p = int(self.config.neighbourhood)
        pooled = [F.avg_pool2d(m, kernel_size=p, stride=1, padding=p // 2) if p > 1 else m for m in maps]
        resized = [
            m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear", align_corners=False)
            for m in pooled
        ]
        return torch.cat(resized, dim=1)

    # --- memory bank ----------------------------------------------------------------
    @torch.no_grad()
    def setup(self, fit_images: Tensor) -> None:
        if len(fit_images) == 0:
            raise UserError("patchcore: setup() needs at least one fit image")
        chunks = []
        for start in range(0, len(fit_images), _SETUP_CHUNK):
            self.check_interrupt()
            features = self.patch_features(fit_images[start : start + _SETUP_CHUNK])
            chunks.append(features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]))
        patches = torch.cat(chunks)
        count = min(_MAX_BANK, max(1, math.ceil(float(self.config.coreset_ratio) * patches.shape[0])))
        if patches.shape[0] > _MAX_CANDIDATES:
            generator = torch.Generator().manual_seed(_CORESET_SEED)
            keep = torch.randperm(patches.shape[0], generator=generator)[:_MAX_CANDIDATES]
            patches = patches[keep.to(patches.device)]
        chosen = greedy_coreset(patches, count, int(self.config.projection_dim), _CORESET_SEED, self.check_interrupt)
        self.memory_bank = patches[chosen].contiguous()
        self.bank_neighbours = self._bank_neighbourhoods(min(int(self.config.reweight_neighbours), len(chosen)))

    @torch.no_grad()
    def _bank_neighbourhoods(self, count: int) -> Tensor:
        """M x count indices: each bank patch itself, then its nearest other bank patches
        (itself first even when a duplicate patch is equally near)."""
        bank = self.memory_bank
        rows = []
        for start in range(0, bank.shape[0], _DISTANCE_CHUNK):
            d2 = self._squared_distances(bank[start : start + _DISTANCE_CHUNK])
            own = torch.arange(start, start + d2.shape[0], device=bank.device)
            d2[torch.arange(d2.shape[0], device=bank.device), own] = -1.0
            rows.append(d2.topk(count, dim=1, largest=False).indices)
        return torch.cat(rows)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for key in ("memory_bank", "bank_neighbours"):
            saved = state_dict.get(prefix + key)
            current = getattr(self, key)
            if saved is not None and saved.shape != current.shape:
                setattr(self, key, torch.empty_like(saved, device=current.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _check_bank(self) -> None:
        if self.memory_bank.shape[0] == 0:
            raise RuntimeError("patchcore: call setup(fit_images) or load a state dict before use")

    def _squared_distances(self, queries: Tensor) -> Tensor:
        bank = self.memory_bank
        d2 = (queries * queries).sum(dim=1, keepdim=True) - 2.0 * queries @ bank.T + (bank * bank).sum(dim=1)
        return d2.clamp_min(0.0)

    @torch.no_grad()
    def _nearest(self, queries: Tensor, count: int) -> tuple[Tensor, Tensor]:
        """(squared distances, bank indices) of the ``count`` nearest bank patches, in
        blocks so the whole N x M distance matrix is never held at once."""
        values, indices = [], []
        # An exported graph must not unroll the block loop for the traced batch size
        # (it would silently drop the patches of larger batches): one block there.
        chunk = queries.shape[0] if torch.jit.is_tracing() else _DISTANCE_CHUNK
        for start in range(0, queries.shape[0], chunk):
            d2 = self._squared_distances(queries[start : start + chunk])
            if count == 1:
                v, i = d2.min(dim=1, keepdim=True)
            else:
                v, i = d2.topk(count, dim=1, largest=False)
            values.append(v)
            indices.append(i)
        return torch.cat(values), torch.cat(indices)

    # --- inference ------------------------------------------------------------------
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        self._check_bank()
        features = self.patch_features(images)
        b, c, h, w = features.shape
        queries = features.permute(0, 2, 3, 1).reshape(-1, c)
        _, nearest = self._nearest(queries, 1)
        # The expanded |q|^2 - 2 q.b + |b|^2 finds the nearest patch fast but loses digits
        # to cancellation (and sqrt amplifies them near 0): the distance to the one found
        # is taken again directly, so eager and exported maps agree to float precision.
        patch_scores = (queries - self.memory_bank[nearest[:, 0]]).pow(2).sum(dim=1).sqrt().reshape(b, h * w)
        maps = self._upsampled_map(patch_scores.reshape(b, 1, h, w), images.shape[-2:])
        return maps, self._reweighted_max(queries.reshape(b, h * w, c), patch_scores, nearest.reshape(b, h * w))

    def anomaly_map(self, images: Tensor) -> Tensor:
        return self.forward(images)[0]

    def _upsampled_map(self, patch_scores: Tensor, size: torch.Size) -> Tensor:
        maps = F.interpolate(patch_scores, size=size, mode="bilinear", align_corners=False).squeeze(1)
        return gaussian_blur(maps, float(self.config.smoothing_sigma) * effective_side(*size) / 224.0)

    def _reweighted_max(self, queries: Tensor, patch_scores: Tensor, nearest: Tensor) -> Tensor:
        """s* x (1 - softmax_0 of the distances from the worst test patch to its nearest
        bank patch m* and m*'s bank neighbours)."""
        worst_score, worst = patch_scores.max(dim=1)  # B
        if self.bank_neighbours.shape[1] < 2:  # no neighbours to compare with: plain max
            return worst_score
        worst_query = torch.gather(queries, 1, worst.view(-1, 1, 1).expand(-1, 1, queries.shape[2])).squeeze(1)
        m_star = torch.gather(nearest, 1, worst.view(-1, 1)).squeeze(1)  # B
        neighbourhood = self.bank_neighbours[m_star]  # B x b, m* itself first
        neighbours = self.memory_bank[neighbourhood]  # B x b x C
        distances = (neighbours - worst_query.unsqueeze(1)).pow(2).sum(dim=2).sqrt()
        # m* is its own nearest neighbour (distance 0 in the bank), so column 0 is the
        # distance to m*, i.e. s* itself.
        weight = 1.0 - torch.softmax(distances, dim=1)[:, 0]
        return weight * worst_score
