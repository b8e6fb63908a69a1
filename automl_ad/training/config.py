"""What one training run is asked to do (TrainConfig) and what it reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from automl_ad.errors import UserError
from automl_ad.methods.base import Method
from automl_ad.training.precision import check_precision


@dataclass
class TrainConfig:
    method: str
    method_params: dict[str, Any] = field(default_factory=dict)
    synthesis: str | None = None  # None: the method's default family
    synthesis_params: dict[str, Any] = field(default_factory=dict)
    image_size: int = 128
    epochs: int = 10
    steps_per_epoch: int | None = None  # None: one pass over the fit images
    batch_size: int = 8
    seed: int = 0
    device: str = "cpu"
    eval_batch_size: int = 32
    # training/precision.py: auto = the method's switch (its space.yaml) on CUDA, fp32 on
    # a CPU; fp32, bf16 or fp16 (with a GradScaler) on any device
    precision: str = "auto"
    texture_dir: str | None = None  # anomaly-source images for perlin (e.g. DTD); None: procedural
    # data.tiling.Tiling.to_dict() when the images are canvases cut into tiles (search
    # --geometry tiled): the method fits and trains on tiles and scores whole canvases
    tiling: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        check_precision(self.precision)
        for name in ("image_size", "epochs", "batch_size", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise UserError(f"steps_per_epoch must be >= 1, got {self.steps_per_epoch}")


@dataclass
class EpochReport:
    epoch: int  # 1-based, counted across phases
    phase: str
    step: int  # optimizer steps so far
    train_loss: float
    val: dict[str, float | None]
    objective: float
    elapsed_s: float


@dataclass
class TrainResult:
    method: Method
    reports: list[EpochReport]
    val: dict[str, float | None]
    objective: float
    test: dict[str, float | None]
    stopped_early: bool = False


EpochHook = Callable[[EpochReport, "Path | None"], "bool | None"]


def synthesis_family(cfg: TrainConfig, method_cls: type[Method]) -> str | None:
    """The family a trial trains with: explicit, else the method's default."""
    if cfg.synthesis in (None, ""):
        return method_cls.synthesis
    if cfg.synthesis == "none":
        return None
    return cfg.synthesis


