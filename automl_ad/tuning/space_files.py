"""The search-space files: where they are (shipped package data, ``./search_spaces/``,
a folder), reading them, and checking every entry into ``Param`` / ``MethodSpace`` with
one clear error naming the file (``space.load_space`` puts them together)."""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Mapping, Union

import yaml

from automl_ad.errors import UserError
from automl_ad.methods import backbones
from automl_ad.methods.base import accepted_values, available_methods, get_method_class, packaged_space_file, packaged_spec
from automl_ad.synthesis import FAMILIES
from automl_ad.tuning.schedule import Fidelity


# A YAML file: a Path, or package data (a Path too for an installed wheel, but only a
# Traversable is promised).
SpaceFile = Union[Path, Traversable]


COMMON = "common"


# Relative on purpose: the working directory's search_spaces/ (the checkout's, when run
# from its root) is where a user's replacement files go.
USER_SPACE_DIR = Path("search_spaces")


PARAM_KEYS = {"type", "low", "high", "step", "log", "choices", "default"}


METHOD_KEYS = {"method", "synthesis", "params", "image_size", "bounds", "precision"}


COMMON_KEYS = {"image_size", "synthesis", "fidelity"}


FIDELITY_KEYS = {"max_epochs", "rounds", "grace_period", "reduction_factor", "steps_per_epoch", "batch_size",
                 "min_steps", "max_steps", "min_trials"}


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
    image_sizes: tuple[int, ...] = ()  # candidates, smallest first (() : the space's sizes)


def read_yaml(path: SpaceFile) -> dict[str, Any]:
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


def check_keys(path: SpaceFile, where: str, mapping: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise UserError(f"{path}: unknown key {where}{unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")


def parse_param(path: SpaceFile, key: str, name: str, spec: Any, fields: set[str] | None) -> Param:
    """Validate one parameter spec; ``key`` is its dotted location for messages."""
    where = f"{path}: {key}"
    if fields is not None and name not in fields:
        raise UserError(f"{where}: not a parameter of this config; known: {', '.join(sorted(fields))}")
    if not isinstance(spec, dict):
        raise UserError(f"{where}: expected a mapping with type/low/high or choices")
    check_keys(path, f"in {key}: ", spec, PARAM_KEYS)
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


def parse_sizes(path: SpaceFile, key: str, spec: Any, keep_order: bool = False) -> tuple[int, ...]:
    """``{choices: [128, 256]}`` or a plain list of sizes >= 16."""
    choices = spec.get("choices") if isinstance(spec, dict) else spec
    if not isinstance(choices, list) or not choices or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 16 for s in choices):
        raise UserError(f"{path}: {key}: expected {{choices: [sizes >= 16]}}, got {spec!r}")
    unique = tuple(dict.fromkeys(int(s) for s in choices))
    return unique if keep_order else tuple(sorted(unique))


def _backbone_param(cls: type) -> Param | None:
    """``backbone`` as a categorical over the backbones whose weights are present, for a
    method whose Config has that field; None when there is nothing to choose (only the
    Config's default is present) or no backbone is present (the method then fails as it
    would outside a search, naming the missing weights)."""
    config_field = next((f for f in dataclasses.fields(cls.Config) if f.name == "backbone"), None)
    if config_field is None:
        return None

    choices = list(backbones.searchable_backbones())
    default = config_field.default if isinstance(config_field.default, str) else None
    if not choices or choices == [default]:
        return None
    return Param(name="backbone", type="categorical", choices=tuple(choices),
                 default=default if default in choices else choices[0])


def _config_fields(config_type: type) -> set[str]:
    return {f.name for f in dataclasses.fields(config_type)}


def _code_defaults(config_type: type | None) -> dict[str, Any]:
    """The defaults a Config (or a family's Params) dataclass declares."""
    if config_type is None or not dataclasses.is_dataclass(config_type):
        return {}
    return {f.name: f.default for f in dataclasses.fields(config_type) if f.default is not dataclasses.MISSING}


def _with_code_default(spec: Any, default: Any) -> Any:
    """``spec`` with the code's default when the YAML names none and the searched range
    holds it: defaults are written once, in the Config, and the warm start is that Config.
    A user range that leaves it out gets the range's own middle (parse_param)."""
    if not isinstance(spec, dict) or "default" in spec or default is None:
        return spec
    choices = spec.get("choices")
    if isinstance(choices, list):
        fits = default in choices
    else:
        low, high = spec.get("low"), spec.get("high")
        fits = (isinstance(default, (int, float)) and not isinstance(default, bool)
                and isinstance(low, (int, float)) and isinstance(high, (int, float)) and low <= default <= high)
    return {**spec, "default": default} if fits else spec


def family_param_fields(family: str) -> set[str] | None:
    """Field names of a synthesis family's parameter dataclass (None: cannot tell)."""

    target = FAMILIES[family]
    for candidate in (getattr(target, "Params", None), getattr(target, "params_type", None), target):
        if candidate is not None and dataclasses.is_dataclass(candidate):
            return _config_fields(candidate)
    return None


def known_families() -> set[str]:

    return set(FAMILIES)


def merge_specs(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge where a parameter spec (a mapping with ``type``) replaces as a whole."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and "type" not in value:
            merged[key] = merge_specs(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def packaged_space_files() -> dict[str, Traversable]:
    """The shipped YAML files by name: ``common`` and every registered method that has a
    ``space.yaml`` in its folder."""
    files: dict[str, Traversable] = {COMMON: resources.files("automl_ad.tuning").joinpath(f"{COMMON}.yaml")}
    for name in available_methods():
        path = packaged_space_file(name)
        if path is not None:
            files[name] = path
    return files


def space_files(space_dir: Path | None = None) -> dict[str, SpaceFile]:
    """The file each space comes from, by name (``common`` and the methods).

    Default: the shipped files, each replaced by ``search_spaces/<name>.yaml`` in the
    working directory where that exists (the user's edits; no folder, no change). An
    explicit ``space_dir`` is a whole space instead: its common.yaml and the methods it
    has a file for, nothing shipped (a test's or benchmark's own small space)."""
    if space_dir is not None:
        folder = Path(space_dir)
        if not folder.is_dir():
            raise UserError(f"search-space folder not found: {folder}")
        files: dict[str, SpaceFile] = {path.stem: path for path in sorted(folder.glob("*.yaml"))}
        files.setdefault(COMMON, folder / f"{COMMON}.yaml")  # read, so a missing one is named
        return files
    files = dict(packaged_space_files())
    if USER_SPACE_DIR.is_dir():
        files.update({path.stem: path for path in sorted(USER_SPACE_DIR.glob("*.yaml"))})
    return files


def copy_packaged(destination: Path, names: list[str] | None = None) -> list[Path]:
    """Write the shipped YAML files (all, or ``names``) into ``destination`` as
    ``<name>.yaml`` for reading or editing; an existing file is never overwritten (it
    may be the user's edit). Returns the files written."""
    shipped = packaged_space_files()
    unknown = sorted(set(names or ()) - set(shipped))
    if unknown:
        raise UserError(f"no shipped search space {unknown[0]!r}; shipped: {', '.join(sorted(shipped))}")
    destination.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names or sorted(shipped):
        target = destination / f"{name}.yaml"
        if target.exists():
            raise UserError(f"{target} exists; remove it or choose another folder")
        target.write_text(shipped[name].read_text())
        written.append(target)
    return written


def _check_param_accepted(path: SpaceFile, name: str, param: Param) -> None:
    """A searched range must stay inside what the method's Config accepts (its packaged
    ``bounds``), so every sample is valid; raises naming the file and key."""
    rule = accepted_values(name).get(param.name)
    if rule is None:
        return
    values = (*param.choices, param.default) if param.type == "categorical" else (param.low, param.high,
                                                                                   param.default)
    for value in values:
        problem = rule.problem(param.name, value)
        if problem is not None:
            raise UserError(f"{path}: params.{param.name}: outside what {name!r} accepts: {problem} "
                            f"(see {packaged_space_file(name)})")


def method_space_of(name: str, path: SpaceFile, spec: dict[str, Any], families: set[str],
                  user_path: SpaceFile, user_params: set[str]) -> MethodSpace:
    """Validate one method's (merged) spec read from ``path``; messages about the
    parameters in ``user_params`` name ``user_path`` (the ``--space`` file) instead."""
    check_keys(path, "", spec, METHOD_KEYS)
    if spec.get("method") != name:
        raise UserError(f"{path}: method: {spec.get('method')!r} must equal the file name {name!r}")
    shipped = (packaged_spec(name) or {}).get("bounds")
    if spec.get("bounds", shipped) != shipped:
        raise UserError(f"{path}: bounds: what {name!r} accepts is the method's own "
                        f"({packaged_space_file(name) or 'none shipped'}); a search space cannot change it")
    shipped_precision = (packaged_spec(name) or {}).get("precision")
    if spec.get("precision", shipped_precision) != shipped_precision:  # trials train with precision auto
        raise UserError(f"{path}: precision: the GPU speed switch is the method's own "
                        f"({packaged_space_file(name) or 'none shipped'}); a search space cannot change it")
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
    check_keys(path, "in bounds: ", spec.get("bounds") or {}, fields)
    params_spec = spec.get("params") or {}
    if not isinstance(params_spec, dict):
        raise UserError(f"{path}: params must be a mapping")
    sources = {pname: user_path if pname in user_params else path for pname in params_spec}
    defaults = _code_defaults(cls.Config)
    params = {pname: parse_param(sources[pname], f"params.{pname}", pname,
                                 _with_code_default(pspec, defaults.get(pname)), fields)
              for pname, pspec in params_spec.items()}
    for param in params.values():
        _check_param_accepted(sources[param.name], name, param)
    backbone = _backbone_param(cls) if "backbone" not in params else None
    if backbone is not None:
        params = {"backbone": backbone, **params}
    own_sizes = parse_sizes(path, "image_size", spec["image_size"]) if "image_size" in spec else ()
    return MethodSpace(name=name, synthesis=tuple(synthesis), params=params, image_sizes=own_sizes)


def synthesis_params_of(merged_common: Mapping[str, Any], user: Mapping[str, Any], common_path: SpaceFile,
                      user_path: SpaceFile, families: set[str]) -> dict[str, dict[str, Param]]:
    """Each family's searched parameters, validated against its Params fields."""
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
        check_keys(source, f"in synthesis.{family}: ", fspec, {"params"})
        fields = family_param_fields(family)
        defaults = _code_defaults(getattr(FAMILIES[family], "Params", None))
        synthesis_params[family] = {
            pname: parse_param(source, f"synthesis.{family}.params.{pname}", pname,
                               _with_code_default(pspec, defaults.get(pname)), fields)
            for pname, pspec in (fspec.get("params") or {}).items()
        }
    return synthesis_params


def fidelity_of(merged_common: Mapping[str, Any], path: SpaceFile, user_fidelity: Mapping[str, Any]) -> Fidelity:
    """The validated fidelity section; ``path`` is the file messages name (the user's when
    it has a fidelity section)."""
    fidelity_spec = dict(merged_common.get("fidelity") or {})
    check_keys(path, "in fidelity: ", fidelity_spec, FIDELITY_KEYS)
    for key, value in fidelity_spec.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise UserError(f"{path}: fidelity.{key}: a whole number >= 1, got {value!r}")
    if "rounds" in fidelity_spec:
        rounds = fidelity_spec.pop("rounds")
        if "max_epochs" in user_fidelity and "rounds" not in user_fidelity:
            rounds = fidelity_spec["max_epochs"]  # the user's own file names the old key
        if rounds is not None:
            fidelity_spec["max_epochs"] = rounds
    fidelity = Fidelity(**{k: v for k, v in fidelity_spec.items() if v is not None or k in
                           ("steps_per_epoch", "batch_size", "max_steps")})
    if fidelity.max_steps is not None and fidelity.max_steps < fidelity.min_steps:
        raise UserError(f"{path}: fidelity.max_steps {fidelity.max_steps} is below min_steps "
                        f"{fidelity.min_steps}")
    if fidelity.grace_period > fidelity.max_epochs:
        raise UserError(f"{path}: fidelity.grace_period {fidelity.grace_period} exceeds max_epochs {fidelity.max_epochs}")
    if fidelity.reduction_factor < 2:
        raise UserError(f"{path}: fidelity.reduction_factor must be >= 2")
    return fidelity
