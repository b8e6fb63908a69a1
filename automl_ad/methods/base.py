"""The method protocol: what every anomaly-detection method implements.

A method is one folder ``automl_ad/methods/<name>/``: the model (``model.py``, re-exported
by the folder's ``__init__.py``) and its search space ``space.yaml`` (package data). The
YAML is the one source of the method's search ranges, of the values its Config accepts
(``bounds``, checked by ``check_config``) and of its default synthesis family (the first
of ``synthesis``, set as the class's ``synthesis`` by ``register``). It is a
``torch.nn.Module`` (so ``state_dict``/``to(device)`` come for free), knows
nothing of Ray, and is driven by the generic loop in ``automl_ad.training.loop``.

Images reaching a method are float32 in [0, 1], shape B x 3 x H x W (grayscale data is
replicated to 3 channels by the data layer). Any normalisation a method needs (e.g.
ImageNet mean/std for a pretrained backbone) happens *inside* the method, so an exported
graph takes the same [0, 1] input for every method.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any, Callable, ClassVar, Mapping

import torch
import yaml
from torch import Tensor, nn

from automl_ad.errors import DeadlineReached, UserError


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


@dataclass(frozen=True)
class Recipe:
    """A method's paper training schedule (``epochs`` over all phases together)."""

    epochs: float
    batch_size: int
    image_size: int
    note: str
    epochs_by_category: tuple[tuple[str, float], ...] = ()

    def epochs_for(self, category: str | None) -> float:
        return dict(self.epochs_by_category).get(category or "", self.epochs)


# The dtypes a training step may autocast to (``Precision.dtype``; fp32: no autocast).
PRECISION_DTYPES = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Precision:
    """A method's GPU speed switch, from the ``precision:`` entry of its ``space.yaml``:
    the dtype its training steps autocast to on CUDA (``train --precision auto``; CPU
    stays fp32), whether its model and batches go channels_last there, and why that is
    numerically safe for what the method computes (or why it stays in fp32)."""

    dtype: str = "fp32"
    channels_last: bool = False
    reason: str = "no precision entry: fp32"

    def __post_init__(self) -> None:
        if self.dtype not in PRECISION_DTYPES:
            raise ValueError(f"precision dtype must be one of {', '.join(PRECISION_DTYPES)}, got {self.dtype!r}")


def _precision_of(spec: Mapping[str, Any], where: Any) -> Precision:
    """The ``precision:`` entry of a packaged space (``{dtype, channels_last, reason}``)."""
    entry = spec.get("precision")
    if entry is None:
        return Precision()
    if not isinstance(entry, dict) or set(entry) - {"dtype", "channels_last", "reason"}:
        raise UserError(f"{where}: precision: expected {{dtype: fp32|bf16|fp16, channels_last: bool, reason: text}}, "
                        f"got {entry!r}")
    dtype, channels_last, reason = entry.get("dtype"), entry.get("channels_last", False), entry.get("reason")
    if dtype not in PRECISION_DTYPES:
        raise UserError(f"{where}: precision.dtype must be one of {', '.join(PRECISION_DTYPES)}, got {dtype!r}")
    if not isinstance(channels_last, bool):
        raise UserError(f"{where}: precision.channels_last must be true or false, got {channels_last!r}")
    if not isinstance(reason, str) or not reason.strip():
        raise UserError(f"{where}: precision.reason: say in one line why {dtype} is safe for this method")
    return Precision(dtype=dtype, channels_last=channels_last, reason=reason.strip())


# One row of a method's CPU speed prior, per image size: (batch, build_s, setup_c,
# setup_p, step_s, infer_s, metrics_s); tuning/calibration.py says how they were measured.
SpeedRow = tuple[int, float, float, float, float, float, float]


class Method(nn.Module):
    """Base class of every method. Subclasses set the class attributes and override.

    Class attributes:
      name:      registry name, also the search-space file name.
      phases:    training phases run in order (AST: ("teacher", "student")); empty for
                 a method with no gradient phase (PatchCore): ``setup`` builds the whole
                 model, no optimizer runs, and the loop validates once.
      synthesis: default synthetic-anomaly family it trains with, or None when it
                 trains on normal images only (CFA, AST). Built-in methods do not set
                 it: ``register`` takes it from their ``space.yaml``.
      Config:    a dataclass of hyperparameters with defaults; the search space's
                 parameter names are exactly its field names.
      recipe:    the paper's training schedule (epochs, batch, size; the planner scales
                 it to the budget), None: a default the plan says it assumed.
      cpu_prior: the CPU speed prior per image size (``SpeedRow``), used where the
                 device is not present to calibrate on; {}: none.
      gpu_speedup: how many times faster than one CPU thread a datacenter GPU is
                 assumed to run it (an estimate, never measured); None: the default.
      precision: its GPU speed switch (``Precision``). Built-in methods do not set it:
                 ``register`` takes it from the ``precision:`` entry of their
                 ``space.yaml``; a method of one's own may set it in code (default fp32).
    """

    name: ClassVar[str] = ""
    phases: ClassVar[tuple[str, ...]] = ("train",)
    synthesis: ClassVar[str | None] = None
    Config: ClassVar[type]
    recipe: ClassVar[Recipe | None] = None
    cpu_prior: ClassVar[dict[int, SpeedRow]] = {}
    gpu_speedup: ClassVar[float | None] = None
    precision: ClassVar[Precision] = Precision()

    def __init__(self, config: Any, image_size: int, category: str) -> None:
        super().__init__()
        self.config = config
        self.image_size = image_size
        self.category = category

    # --- training -------------------------------------------------------------------
    def setup(self, fit_images: Tensor) -> None:
        """Called once before training with all fit images (float, on the device).

        For memory banks (CFA, PatchCore) or feature statistics. Default: nothing. A long
        setup calls ``self.check_interrupt()`` now and then, so a search's budget
        deadline stops it like it stops a training loop.
        """

    def estimated_work(self, fit_images: int, eval_images: int) -> float | None:
        """Relative cost of ``setup`` on ``fit_images`` plus inference on ``eval_images``
        (any unit, compared only with another configuration of the same method), for the
        planner to cost a sampled configuration. None: the planner scales by parameter
        count instead, which fits methods whose cost is their network's size."""
        return None

    # ``data.tiling.Tiling`` of a method that sees tiles of larger images (set from its
    # TrainConfig when built; a plain attribute, so never in a state dict); None: whole images.
    tiling: Any = None

    # Set by the training loop for the duration of ``setup`` (a search's deadline);
    # an instance attribute, never a module, so it is not saved or exported.
    interrupt_requested: Callable[[], bool] | None = None

    def check_interrupt(self) -> None:
        """Raise ``DeadlineReached`` when the loop has asked this method to stop."""
        if self.interrupt_requested is not None and self.interrupt_requested():
            raise DeadlineReached(f"{self.name}: setup stopped at the budget deadline")

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
    """Class decorator adding a method to the registry under ``cls.name``. A method with a
    packaged ``space.yaml`` gets its default synthesis family and its precision switch
    from there, never from the class (one source)."""
    if not cls.name:
        raise TypeError(f"{cls.__qualname__} has no name")
    spec = packaged_spec(cls.name)
    if spec is not None:
        for attribute, entry in (("synthesis", "its default family is the first of synthesis"),
                                 ("precision", "its precision switch is the precision entry")):
            if attribute in vars(cls):
                raise TypeError(f"{cls.__qualname__} sets {attribute}; {entry} in {packaged_space_file(cls.name)}")
        families = spec.get("synthesis") or []
        cls.synthesis = str(families[0]) if families else None
        cls.precision = _precision_of(spec, packaged_space_file(cls.name))
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
    from automl_ad.plugins import load_plugins

    load_plugins()  # AUTOML_AD_PLUGINS: methods from outside the package


# --- the packaged search space: ranges, accepted values, default family ---------------

SPACE_FILE = "space.yaml"
BOUND_KEYS = {"ge": (">=", float.__ge__), "gt": (">", float.__gt__), "le": ("<=", float.__le__),
              "lt": ("<", float.__lt__)}


def packaged_space_file(name: str) -> Traversable | None:
    """``automl_ad/methods/<name>/space.yaml`` as package data (found through
    ``importlib.resources``, so it works from a wheel), or None for a method without one
    (a test helper registered from outside the package)."""
    if not name or name.startswith((".", "_")) or "/" in name:
        return None
    candidate = resources.files("automl_ad.methods").joinpath(name, SPACE_FILE)
    return candidate if candidate.is_file() else None


@functools.lru_cache(maxsize=None)
def packaged_spec(name: str) -> dict[str, Any] | None:
    """The parsed packaged ``space.yaml`` of method ``name`` (None: it has none)."""
    path = packaged_space_file(name)
    if path is None:
        return None
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise UserError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise UserError(f"{path}: expected a mapping at the top level")
    return spec


@dataclass(frozen=True)
class Accepts:
    """The values a Config field accepts: numeric bounds (``ge``/``gt``/``le``/``lt``) or
    a set of choices."""

    bounds: tuple[tuple[str, float], ...] = ()
    choices: tuple[Any, ...] | None = None

    def problem(self, key: str, value: Any) -> str | None:
        """Why ``value`` is not accepted for ``key`` (None: it is)."""
        if self.choices is not None:
            if value not in self.choices:
                return f"{key} must be one of {', '.join(map(str, self.choices))}, got {value!r}"
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{key} must be a number, got {value!r}"
        for op, limit in self.bounds:
            symbol, holds = BOUND_KEYS[op]
            if not holds(float(value), float(limit)):
                return f"{key} must be {symbol} {limit}, got {value!r}"
        return None


def accepted_values(name: str) -> dict[str, Accepts]:
    """What method ``name``'s Config accepts per field, from its packaged YAML: a field's
    ``bounds`` entry, else its searched range (a categorical's choices, a number's
    [low, high]). Fields named in neither (``backbone``, ``weights``) are checked by the
    code that uses them."""
    spec = packaged_spec(name) or {}
    where = packaged_space_file(name)
    accepts: dict[str, Accepts] = {}
    for field_name, pspec in (spec.get("params") or {}).items():
        if not isinstance(pspec, dict):
            continue  # the space loader reports the malformed spec, naming the file
        if pspec.get("type") == "categorical":
            accepts[field_name] = Accepts(choices=tuple(pspec.get("choices") or ()))
        else:
            accepts[field_name] = Accepts(bounds=tuple((op, pspec[key]) for op, key in (("ge", "low"), ("le", "high"))
                                                       if isinstance(pspec.get(key), (int, float))))
    bounds = spec.get("bounds") or {}
    if not isinstance(bounds, dict):
        raise UserError(f"{where}: bounds must map Config fields to {{ge, gt, le, lt: number}}")
    for field_name, limits in bounds.items():
        if not isinstance(limits, dict) or not limits or set(limits) - set(BOUND_KEYS) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in limits.values()):
            raise UserError(f"{where}: bounds.{field_name}: expected numbers under {', '.join(BOUND_KEYS)}, "
                            f"got {limits!r}")
        accepts[field_name] = Accepts(bounds=tuple(sorted(limits.items())))
    return accepts


_FIELD_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,)}


def check_config(config: Any, name: str) -> None:
    """Raise the one-line UserError for a Config field of the wrong type or outside what
    method ``name``'s packaged YAML accepts (``accepted_values``). Called by each
    Config's ``__post_init__``; rules that are not ranges (odd, divisible by 4, one field
    below another) stay in the Config."""
    accepts = accepted_values(name)
    for config_field in dataclasses.fields(config):
        value = getattr(config, config_field.name)
        # A string under ``from __future__ import annotations``, else the type itself.
        annotation = config_field.type if isinstance(config_field.type, str) else getattr(config_field.type, "__name__", "")
        kinds = _FIELD_TYPES.get(annotation)
        if kinds is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
            raise UserError(f"method {name!r}: {config_field.name} must be {annotation}, got {value!r}")
        rule = accepts.get(config_field.name)
        problem = rule.problem(config_field.name, value) if rule is not None else None
        if problem is not None:
            raise UserError(f"method {name!r}: {problem}")
