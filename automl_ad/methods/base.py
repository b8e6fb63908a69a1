"""The method protocol: what every anomaly-detection method implements.

A method is one module in ``automl_ad/methods/`` plus one ``search_spaces/<name>.yaml``.
It is a ``torch.nn.Module`` (so ``state_dict``/``to(device)`` come for free), knows
nothing of Ray, and is driven by the generic loop in ``automl_ad.training``.

Images reaching a method are float32 in [0, 1], shape B x 3 x H x W (grayscale data is
replicated to 3 channels by the data layer). Any normalisation a method needs (e.g.
ImageNet mean/std for a pretrained backbone) happens *inside* the method, so an exported
graph takes the same [0, 1] input for every method.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
from torch import Tensor, nn

from automl_ad.errors import UserError


@dataclass
class Batch:
    """One training batch after synthesis.

    images: B x 3 x H x W, possibly with synthetic anomalies pasted in.
    clean:  B x 3 x H x W, the same images before synthesis (reconstruction targets).
    masks:  B x 1 x H x W pixel labels in [0, 1] (binary for most families; NSA may
            give continuous or logistic labels).
    labels: B image labels (1 = anomalous).
    """

    images: Tensor
    clean: Tensor
    masks: Tensor
    labels: Tensor


class Method(nn.Module):
    """Base class of every method. Subclasses set the class attributes and override.

    Class attributes:
      name:      registry name, also the search-space file name.
      phases:    training phases run in order (AST: ("teacher", "student")); empty for
                 a method with no gradient phase (PatchCore): ``setup`` builds the whole
                 model, no optimizer runs, and the loop validates once.
      synthesis: default synthetic-anomaly family it trains with, or None when it
                 trains on normal images only (CFA, AST).
      Config:    a dataclass of hyperparameters with defaults; the search space's
                 parameter names are exactly its field names.
    """

    name: ClassVar[str] = ""
    phases: ClassVar[tuple[str, ...]] = ("train",)
    synthesis: ClassVar[str | None] = None
    Config: ClassVar[type]

    def __init__(self, config: Any, image_size: int, category: str) -> None:
        super().__init__()
        self.config = config
        self.image_size = image_size
        self.category = category

    # --- training -------------------------------------------------------------------
    def setup(self, fit_images: Tensor) -> None:
        """Called once before training with all fit images (float, on the device).

        For memory banks (CFA, PatchCore) or feature statistics. Default: nothing.
        """

    def synthesis_overrides(self, family: str) -> dict[str, Any]:
        """Synthesis parameters this method's config fixes for ``family``.

        NSA trains with BCE on binary/logistic labels and MSE on continuous ones, so its
        ``label_mode`` must reach the nsa family. Default: none.
        """
        return {}

    def phase_epochs(self, phase: str, epochs: int) -> int:
        """How many of the run's ``epochs`` go to ``phase``. Default: even split."""
        share, rest = divmod(epochs, len(self.phases))
        return share + (1 if self.phases.index(phase) < rest else 0)

    def configure_optimizer(self, phase: str, total_steps: int) -> tuple[
        torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None
    ]:
        """Optimizer (and optional scheduler, stepped once per training step) for
        ``phase``; ``total_steps`` is the phase's step count. Every Config has ``lr``."""
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.config.lr), None

    def training_step(self, batch: Batch, phase: str) -> dict[str, Tensor]:
        """One step's losses; must contain "loss" (the one back-propagated)."""
        raise NotImplementedError

    # --- inference ------------------------------------------------------------------
    def anomaly_map(self, images: Tensor) -> Tensor:
        """B x H x W map at the input resolution, higher = more anomalous."""
        raise NotImplementedError

    def image_score(self, maps: Tensor) -> Tensor:
        """B image scores from the maps. Default: max of the map."""
        return maps.flatten(1).amax(dim=1)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(maps, scores): the deployable inference graph."""
        maps = self.anomaly_map(images)
        return maps, self.image_score(maps)


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to the registry under ``cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__qualname__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    """Registered method names (names starting with "_" are private test helpers)."""
    _import_builtin_methods()
    return sorted(name for name in _REGISTRY if not name.startswith("_"))


def get_method_class(name: str) -> type[Method]:
    _import_builtin_methods()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(
            f"unknown method {name!r}; available: {', '.join(available_methods())}"
        ) from None


def make_config(cls: type[Method], params: Mapping[str, Any] | None) -> Any:
    """Build ``cls.Config`` from a mapping, rejecting unknown keys with a clear error."""
    params = dict(params or {})
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise UserError(
            f"method {cls.name!r} has no parameter(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(fields))}"
        )
    return cls.Config(**params)


def create_method(
    name: str, params: Mapping[str, Any] | None, image_size: int, category: str
) -> Method:
    """Registry lookup + config validation + construction (like timm's create_model)."""
    cls = get_method_class(name)
    return cls(make_config(cls, params), image_size=image_size, category=category)


def _import_builtin_methods() -> None:
    import importlib
    import pkgutil

    import automl_ad.methods as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name not in {"base"} and not info.name.startswith("_"):
            importlib.import_module(f"automl_ad.methods.{info.name}")
