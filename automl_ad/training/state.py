"""What a training run saves and restores: its seeded streams, checkpoints and val scores.

A checkpoint holds the model, optimizer and scheduler states and every RNG state a run
draws from, so a resumed run continues bit-exactly on a CPU (``experiment`` owns the file).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from automl_ad.data.tiling import Tiling
from automl_ad.data.types import ImageSet
from automl_ad.errors import DamagedCheckpoint
from automl_ad.evaluation.normalisation import robust_center_scale
from automl_ad.experiment import checkpoint_file, read_checkpoint, write_checkpoint, write_val_scores
from automl_ad.methods.base import Method, create_method
from automl_ad.training.config import EpochReport, TrainConfig


class BatchSampler:
    """Seeded shuffled batches over the fit images, with its state in checkpoints."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size = n, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._order = torch.empty(0, dtype=torch.long)

    def next_indices(self) -> Tensor:
        while len(self._order) < self.batch_size:
            self._order = torch.cat([self._order, torch.randperm(self.n, generator=self.generator)])
        picked, self._order = self._order[: self.batch_size], self._order[self.batch_size :]
        return picked

    def state_dict(self) -> dict[str, Tensor]:
        return {"rng": self.generator.get_state(), "order": self._order.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state["rng"])
        self._order = state["order"].clone()



@dataclass
class Streams:
    """The seeded draws of one rank: which fit images make each batch, and the synthetic
    anomalies pasted into them. Rank 0 keeps the single-process streams, so one worker
    trains exactly as fit() alone."""

    sampler: BatchSampler
    synth: torch.Generator

    @classmethod
    def for_rank(cls, cfg: TrainConfig, n_fit: int, rank: int, device: torch.device,
                 start_epoch: int = 0) -> "Streams":
        seed = cfg.seed + 104_729 * rank + 7 * start_epoch
        return cls(BatchSampler(n_fit, cfg.batch_size, seed), torch.Generator(device=device).manual_seed(seed + 1))


def restore(checkpoint: Mapping[str, Any], method: Method, streams: Streams,
             path: Path, scaler: torch.amp.GradScaler | None = None) -> tuple[int, int, list[EpochReport]]:
    """Weights, streams, the global RNG and fp16's loss scale from ``checkpoint``;
    (epoch, step, reports)."""
    load_weights(method, checkpoint["method"], path)
    if scaler is not None and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    streams.sampler.load_state_dict(checkpoint["sampler"])
    streams.synth.set_state(checkpoint["synth_rng"])
    torch.set_rng_state(checkpoint["torch_rng"])
    return int(checkpoint["epoch"]), int(checkpoint["step"]), [EpochReport(**r) for r in checkpoint["reports"]]


def restore_optimizer(checkpoint: Mapping[str, Any], optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    optimizer.load_state_dict(checkpoint["optimizer"])
    if scheduler is not None and checkpoint["scheduler"] is not None:
        scheduler.load_state_dict(checkpoint["scheduler"])




def save_val_scores(folder: Path, val_set: ImageSet, kept: Mapping[str, Tensor]) -> None:
    """The validation's image scores and its val-good maps' robust statistics beside the
    checkpoint (``experiment.write_val_scores``), so choosing the model after a search
    does not score every candidate on the val set again."""
    if "scores" not in kept:
        return
    good = val_set.labels == 0
    center, scale = robust_center_scale(kept["maps"][good]) if bool(good.any()) else (0.0, 1.0)
    write_val_scores(folder, list(val_set.paths), kept["scores"].tolist(), center, scale)


def save_checkpoint(
    folder: Path,
    cfg: TrainConfig,
    method: Method,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    phase: str,
    epoch: int,
    step: int,
    streams: Streams,
    reports: list[EpochReport],
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    write_checkpoint(folder, {
        "config": dataclasses.asdict(cfg),
        "method": method.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "phase": phase,
        "epoch": epoch,
        "step": step,
        "sampler": streams.sampler.state_dict(),
        "synth_rng": streams.synth.get_state(),
        "torch_rng": torch.get_rng_state(),
        "reports": [dataclasses.asdict(r) for r in reports],
        "scaler": scaler.state_dict() if scaler is not None else None,  # fp16's loss scale
    })


def load_weights(method: Method, state: Mapping[str, Any], path: Path) -> None:
    """``load_state_dict`` with weights of the wrong shapes or names as DamagedCheckpoint."""
    try:
        method.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, ValueError) as error:
        reason = " ".join(str(error).split())[:200]
        raise DamagedCheckpoint(f"damaged checkpoint {path}: its weights do not fit {method.name} ({reason})") from None


def load_trained_method(folder: Path, category: str, device: str = "cpu") -> tuple[Method, TrainConfig]:
    """Rebuild a method from a checkpoint folder (no training state needed)."""
    checkpoint = read_checkpoint(folder)
    path = checkpoint_file(folder)
    try:
        cfg = TrainConfig(**checkpoint["config"])
    except TypeError as error:
        raise DamagedCheckpoint(f"damaged checkpoint {path}: its config does not fit this version ({error})") from None
    torch.manual_seed(cfg.seed)
    method = create_method(cfg.method, cfg.method_params, cfg.image_size, category)
    method.tiling = Tiling.from_dict(cfg.tiling)
    load_weights(method, checkpoint["method"], path)
    return method.to(device).eval(), cfg
