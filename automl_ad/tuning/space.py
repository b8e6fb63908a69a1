"""Search-space YAML: loading, validation, and the define-by-run Optuna space.

``search_spaces/common.yaml`` holds what every trial shares (image sizes, synthesis
family parameter ranges, fidelity); ``search_spaces/<method>.yaml`` holds one method's
parameters and allowed synthesis families (format in docs/DEVELOPING.md). A user's
``--space FILE`` may add or override any of it with the same keys.

The Optuna space is conditional, sampled in this order: ``method``, then that method's
parameters as ``<method>.<param>``, then ``synthesis`` among the method's families (as
``<method>.synthesis`` so each method keeps its own choice list), then that family's
parameters as ``<family>.<param>``. The prefixes keep names unique per distribution kind,
which Optuna requires.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from automl_ad.errors import UserError

DEFAULT_SPACE_DIR = Path(__file__).resolve().parents[2] / "search_spaces"
PARAM_KEYS = {"type", "low", "high", "step", "log", "choices", "default"}
METHOD_KEYS = {"method", "synthesis", "params"}
COMMON_KEYS = {"image_size", "synthesis", "fidelity"}
FIDELITY_KEYS = {"max_epochs", "grace_period", "reduction_factor", "steps_per_epoch", "batch_size"}
PARAM_TYPES = {"float", "int", "categorical"}


@dataclass(frozen=True)
class Param:
    """One searchable parameter (validated)."""

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()
    default: Any = None

    def suggest(self, trial: Any, key: str) -> Any:
        if self.type == "categorical":
            return trial.suggest_categorical(key, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(key, float(self.low), float(self.high), step=self.step, log=self.log)


@dataclass(frozen=True)
class MethodSpace:
    name: str
    synthesis: tuple[str, ...]
    params: dict[str, Param]


@dataclass(frozen=True)
class Fidelity:
    max_epochs: int = 4
    grace_period: int = 1
    reduction_factor: int = 2
    steps_per_epoch: int | None = None
    batch_size: int = 8


@dataclass(frozen=True)
class SearchSpace:
    """The whole validated space; ``suggest(trial)`` is the define-by-run function."""

    methods: dict[str, MethodSpace]
    image_sizes: tuple[int, ...]
    synthesis: dict[str, dict[str, Param]]
    fidelity: Fidelity
    sources: tuple[str, ...] = field(default=())

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Sample one configuration with an Optuna trial (define-by-run)."""
        method = trial.suggest_categorical("method", sorted(self.methods))
        space = self.methods[method]
        if len(self.image_sizes) > 1:
            trial.suggest_categorical("image_size", list(self.image_sizes))
        for name, param in space.params.items():
            param.suggest(trial, f"{method}.{name}")
        if space.synthesis:
            family = trial.suggest_categorical(f"{method}.synthesis", list(space.synthesis))
            for name, param in self.synthesis.get(family, {}).items():
                param.suggest(trial, f"{family}.{name}")
        return {}

    def defaults(self, method: str) -> dict[str, Any]:
        """The flat config of ``method`` at every parameter's default (a first point)."""
        space = self.methods[method]
        point: dict[str, Any] = {"method": method}
        if len(self.image_sizes) > 1:
            point["image_size"] = self.image_sizes[0]
        point.update({f"{method}.{n}": p.default for n, p in space.params.items()})
        if space.synthesis:
            family = space.synthesis[0]
            point[f"{method}.synthesis"] = family
            point.update({f"{family}.{n}": p.default for n, p in self.synthesis.get(family, {}).items()})
        return point


@dataclass(frozen=True)
class TrialConfig:
    """A flat sampled config split back into what ``training.TrainConfig`` needs."""

    method: str
    method_params: dict[str, Any]
    synthesis: str | None
    synthesis_params: dict[str, Any]
    image_size: int


def split_config(flat: Mapping[str, Any], default_image_size: int) -> TrialConfig:
    """Undo the prefixes of a flat sampled config (see the module docstring)."""
    method = str(flat["method"])
    family = flat.get(f"{method}.synthesis")
    family_prefix = f"{family}." if family else None
    method_params = {k[len(method) + 1:]: v for k, v in flat.items()
                     if k.startswith(f"{method}.") and k != f"{method}.synthesis"}
    synthesis_params = ({k[len(family_prefix):]: v for k, v in flat.items() if k.startswith(family_prefix)}
                        if family_prefix else {})
    return TrialConfig(
        method=method,
        method_params=method_params,
        synthesis=str(family) if family else "none",
        synthesis_params=synthesis_params,
        image_size=int(flat.get("image_size", default_image_size)),
    )


# --- loading and validation -----------------------------------------------------------

def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"search-space file not found: {path}")
    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise UserError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise UserError(f"{path}: expected a mapping at the top level")
    return content


def _check_keys(path: Path, where: str, mapping: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise UserError(f"{path}: unknown key {where}{unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")


def parse_param(path: Path, key: str, name: str, spec: Any, fields: set[str] | None) -> Param:
    """Validate one parameter spec; ``key`` is its dotted location for messages."""
    where = f"{path}: {key}"
    if fields is not None and name not in fields:
        raise UserError(f"{where}: not a parameter of this config; known: {', '.join(sorted(fields))}")
    if not isinstance(spec, dict):
        raise UserError(f"{where}: expected a mapping with type/low/high or choices")
    _check_keys(path, f"in {key}: ", spec, PARAM_KEYS)
    kind = spec.get("type")
    if kind not in PARAM_TYPES:
        raise UserError(f"{where}.type: {kind!r} is not one of {', '.join(sorted(PARAM_TYPES))}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise UserError(f"{where}.choices: a categorical needs a non-empty list")
        default = spec.get("default", choices[0])
        if default not in choices:
            raise UserError(f"{where}.default: {default!r} is not among the choices {choices}")
        return Param(name=name, type=kind, choices=tuple(choices), default=default)
    for bound in ("low", "high"):
        if not isinstance(spec.get(bound), (int, float)) or isinstance(spec.get(bound), bool):
            raise UserError(f"{where}.{bound}: a number is required, got {spec.get(bound)!r}")
    low, high = spec["low"], spec["high"]
    if kind == "int" and (int(low) != low or int(high) != high):
        raise UserError(f"{where}: int bounds must be whole numbers, got {low}..{high}")
    if low >= high:
        raise UserError(f"{where}: low {low} must be below high {high}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise UserError(f"{where}.log: true or false, got {log!r}")
    if log and low <= 0:
        raise UserError(f"{where}: log scale needs low > 0, got {low}")
    step = spec.get("step")
    if step is not None and (not isinstance(step, (int, float)) or step <= 0):
        raise UserError(f"{where}.step: a positive number, got {step!r}")
    if step is not None and log:
        raise UserError(f"{where}: step and log cannot be combined")
    default = spec.get("default", math.sqrt(low * high) if log else (low + high) / 2)
    if kind == "int":
        default = int(round(default))
    if not isinstance(default, (int, float)) or not low <= default <= high:
        raise UserError(f"{where}.default: {default!r} is outside [{low}, {high}]")
    return Param(name=name, type=kind, low=low, high=high, step=step, log=log, default=default)


def _config_fields(config_type: type) -> set[str]:
    return {f.name for f in dataclasses.fields(config_type)}


def family_param_fields(family: str) -> set[str] | None:
    """Field names of a synthesis family's parameter dataclass (None: cannot tell)."""
    from automl_ad.synthesis import FAMILIES

    target = FAMILIES[family]
    for candidate in (getattr(target, "Params", None), getattr(target, "params_type", None), target):
        if candidate is not None and dataclasses.is_dataclass(candidate):
            return _config_fields(candidate)
    return None


def _families() -> set[str]:
    from automl_ad.synthesis import FAMILIES

    return set(FAMILIES)


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge where a parameter spec (a mapping with ``type``) replaces as a whole."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and "type" not in value:
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_space(
    methods: list[str] | None = None,
    user_file: Path | None = None,
    space_dir: Path = DEFAULT_SPACE_DIR,
    image_size: int | None = None,
) -> SearchSpace:
    """Load and validate common.yaml + the method YAMLs (+ a user's overrides).

    ``methods`` restricts the search (default: every method with a YAML file);
    ``image_size`` pins one size instead of the common.yaml choices.
    """
    from automl_ad.methods.base import available_methods, get_method_class

    space_dir = Path(space_dir)
    common_path = space_dir / "common.yaml"
    common = _read_yaml(common_path)
    user: dict[str, Any] = _read_yaml(Path(user_file)) if user_file is not None else {}
    user_path = Path(user_file) if user_file is not None else common_path
    _check_keys(user_path, "", user, COMMON_KEYS | {"methods"})
    _check_keys(common_path, "", common, COMMON_KEYS)
    user_methods = user.get("methods") or {}
    if not isinstance(user_methods, dict):
        raise UserError(f"{user_path}: methods must map method names to method specs")

    registry = set(available_methods())
    if methods:
        chosen = list(dict.fromkeys(methods))
    else:
        chosen = sorted(p.stem for p in space_dir.glob("*.yaml") if p.stem != "common") + sorted(user_methods)
        chosen = list(dict.fromkeys(chosen))
    if not chosen:
        raise UserError(f"no method search spaces in {space_dir}")
    families = _families()

    method_spaces: dict[str, MethodSpace] = {}
    for name in chosen:
        if name not in registry:
            raise UserError(f"--methods: unknown method {name!r}; available: {', '.join(sorted(registry))}")
        path = space_dir / f"{name}.yaml"
        spec = _read_yaml(path) if path.exists() or name not in user_methods else {"method": name}
        if name in user_methods:
            spec = _merge(spec, user_methods[name])
            path = user_path if not (space_dir / f"{name}.yaml").exists() else path
        _check_keys(path, "", spec, METHOD_KEYS)
        if spec.get("method") != name:
            raise UserError(f"{path}: method: {spec.get('method')!r} must equal the file name {name!r}")
        cls = get_method_class(name)
        synthesis = spec.get("synthesis", [])
        if synthesis is None:
            synthesis = []
        if not isinstance(synthesis, list):
            raise UserError(f"{path}: synthesis must be a list of family names")
        for family in synthesis:
            if family not in families:
                raise UserError(f"{path}: synthesis: unknown family {family!r}; known: {', '.join(sorted(families))}")
        fields = _config_fields(cls.Config)
        params_spec = spec.get("params") or {}
        if not isinstance(params_spec, dict):
            raise UserError(f"{path}: params must be a mapping")
        params = {pname: parse_param(path, f"params.{pname}", pname, pspec, fields)
                  for pname, pspec in params_spec.items()}
        method_spaces[name] = MethodSpace(name=name, synthesis=tuple(synthesis), params=params)

    merged_common = _merge(common, {k: v for k, v in user.items() if k != "methods"})
    synthesis_params: dict[str, dict[str, Param]] = {}
    synth_spec = merged_common.get("synthesis") or {}
    if not isinstance(synth_spec, dict):
        raise UserError(f"{common_path}: synthesis must map family names to {{params: ...}}")
    user_synthesis = user.get("synthesis") if isinstance(user.get("synthesis"), dict) else {}
    for family, fspec in synth_spec.items():
        source = user_path if family in user_synthesis else common_path
        if family not in families:
            raise UserError(f"{source}: synthesis: unknown family {family!r}; known: {', '.join(sorted(families))}")
        fspec = fspec or {}
        if not isinstance(fspec, dict):
            raise UserError(f"{source}: synthesis.{family}: expected {{params: ...}}")
        _check_keys(source, f"in synthesis.{family}: ", fspec, {"params"})
        fields = family_param_fields(family)
        synthesis_params[family] = {
            pname: parse_param(source, f"synthesis.{family}.params.{pname}", pname, pspec, fields)
            for pname, pspec in (fspec.get("params") or {}).items()
        }

    sizes = merged_common.get("image_size", {"choices": [128]})
    if image_size is not None:
        image_sizes: tuple[int, ...] = (int(image_size),)
    else:
        choices = sizes.get("choices") if isinstance(sizes, dict) else sizes
        if not isinstance(choices, list) or not choices or not all(isinstance(s, int) and s >= 16 for s in choices):
            raise UserError(f"{common_path}: image_size: expected {{choices: [sizes >= 16]}}, got {sizes!r}")
        image_sizes = tuple(choices)

    fidelity_spec = merged_common.get("fidelity") or {}
    if "fidelity" in user:
        common_path = user_path  # name the file the user gave in messages about it
    _check_keys(common_path, "in fidelity: ", fidelity_spec, FIDELITY_KEYS)
    for key, value in fidelity_spec.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise UserError(f"{common_path}: fidelity.{key}: a whole number >= 1, got {value!r}")
    fidelity = Fidelity(**fidelity_spec)
    if fidelity.grace_period > fidelity.max_epochs:
        raise UserError(f"{common_path}: fidelity.grace_period {fidelity.grace_period} exceeds max_epochs {fidelity.max_epochs}")
    if fidelity.reduction_factor < 2:
        raise UserError(f"{common_path}: fidelity.reduction_factor must be >= 2")

    sources = tuple(str(p) for p in [common_path, *(space_dir / f"{m}.yaml" for m in chosen)] if Path(p).exists())
    return SearchSpace(
        methods=method_spaces,
        image_sizes=image_sizes,
        synthesis=synthesis_params,
        fidelity=fidelity,
        sources=sources + ((str(user_file),) if user_file else ()),
    )
