"""Search-space YAML: loading, validation, and the define-by-run Optuna space.

The shipped spaces are package data, read through ``importlib.resources`` so an installed
wheel has them: ``automl_ad/tuning/common.yaml`` holds what every trial shares (image
sizes, synthesis family parameter ranges, fidelity bounds) and each method's folder holds
its ``space.yaml`` (parameters, what its Config accepts, allowed synthesis families;
format in docs/DEVELOPING.md). A ``<name>.yaml`` in the working directory's
``search_spaces/`` replaces the shipped file of that name (``common`` or a method), and a
user's ``--space FILE`` then adds to or overrides any of it with the same keys. ``copy_packaged`` writes the shipped files out for editing.

The Optuna space is conditional, sampled in this order: ``method``, then that method's
image size as ``<method>.image_size`` (its candidates are common.yaml's sizes plus the
method's paper size, narrowed by the schedule to what the budget affords, see
``schedule.py``), then its parameters as ``<method>.<param>`` (``<method>.backbone``
among the backbones whose weights are present, for methods whose Config has a
``backbone``), then ``synthesis`` among the method's families (as ``<method>.synthesis``
so each method keeps its own choice list), then that family's parameters as
``synthesis.<family>.<param>`` (``synthesis_key``; a family may share its method's name,
as NSA does, so a bare ``<family>.`` prefix would read as a method parameter).
``automl_ad.param_keys`` writes and reads these keys, for every layer.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from automl_ad.errors import UserError
from automl_ad.methods.base import available_methods
from automl_ad.param_keys import family_key, method_key, size_key, synthesis_key
from automl_ad.tuning.schedule import Fidelity, recipe_for
from automl_ad.tuning.space_files import (  # noqa: F401 (Param, packaged_space_files, copy_packaged: read from here)
    COMMON, COMMON_KEYS, USER_SPACE_DIR, MethodSpace, Param, SpaceFile, check_keys, copy_packaged, fidelity_of,
    known_families, merge_specs, method_space_of, packaged_space_files, parse_sizes, read_yaml, space_files,
    synthesis_params_of,
)


@dataclass(frozen=True)
class SearchSpace:
    """The whole validated space; ``suggest(trial)`` is the define-by-run function."""

    methods: dict[str, MethodSpace]
    image_sizes: tuple[int, ...]
    synthesis: dict[str, dict[str, Param]]
    fidelity: Fidelity
    sources: tuple[str, ...] = field(default=())

    def method_sizes(self, method: str) -> tuple[int, ...]:
        return self.methods[method].image_sizes or self.image_sizes

    def sizes_searched(self, method: str) -> bool:
        """Whether ``<method>.image_size`` is part of a configuration (several sizes, or
        one that is not the default ``image_sizes[0]``)."""
        sizes = self.method_sizes(method)
        return len(sizes) > 1 or sizes[0] != self.image_sizes[0]

    def all_image_sizes(self) -> tuple[int, ...]:
        """Every size some method may train at (each needs its frozen val set)."""
        return tuple(sorted({s for m in self.methods for s in self.method_sizes(m)}))

    def with_sizes(self, sizes: Mapping[str, tuple[int, ...]]) -> "SearchSpace":
        """The space with each method's image sizes narrowed to ``sizes`` (the plan's)."""
        methods = {name: dataclasses.replace(space, image_sizes=tuple(sorted(sizes.get(name, space.image_sizes))))
                   for name, space in self.methods.items()}
        return dataclasses.replace(self, methods=methods)

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Sample one configuration with an Optuna trial (define-by-run)."""
        method = trial.suggest_categorical("method", sorted(self.methods))
        space = self.methods[method]
        if self.sizes_searched(method):
            trial.suggest_categorical(size_key(method), list(self.method_sizes(method)))
        for name, param in space.params.items():
            param.suggest(trial, method_key(method, name))
        if space.synthesis:
            family = trial.suggest_categorical(family_key(method), list(space.synthesis))
            for name, param in self.synthesis.get(family, {}).items():
                param.suggest(trial, synthesis_key(family, name))
        return {}

    def defaults(self, method: str) -> dict[str, Any]:
        """The flat config of ``method`` at every parameter's default (a first point)."""
        space = self.methods[method]
        point: dict[str, Any] = {"method": method}
        if self.sizes_searched(method):
            point[size_key(method)] = self.method_sizes(method)[0]
        point.update({method_key(method, n): p.default for n, p in space.params.items()})
        if space.synthesis:
            family = space.synthesis[0]
            point[family_key(method)] = family
            point.update({synthesis_key(family, n): p.default for n, p in self.synthesis.get(family, {}).items()})
        return point



def load_space(
    methods: list[str] | None = None,
    user_file: Path | None = None,
    space_dir: Path | None = None,
    image_size: int | None = None,
) -> SearchSpace:
    """Load and validate common.yaml + the method spaces (+ a user's overrides).

    Files come from ``space_files(space_dir)``: the shipped ones, each replaced by a file
    of the same name in ``./search_spaces/``, or only ``space_dir``'s. ``methods``
    restricts the search (default: every method with a file, and those ``user_file``
    names); ``image_size`` pins one size for every method instead of the candidates
    (common.yaml's choices plus each method's paper size, or a method spec's own
    ``image_size``). Methods whose Config has a ``backbone`` get ``backbone`` as a
    categorical over ``automl_ad.methods.backbones.searchable_backbones()`` unless their spec
    sets it.
    """
    files = space_files(space_dir)
    common_path = files[COMMON]
    common = read_yaml(common_path)
    user: dict[str, Any] = read_yaml(Path(user_file)) if user_file is not None else {}
    user_path: SpaceFile = Path(user_file) if user_file is not None else common_path
    check_keys(user_path, "", user, COMMON_KEYS | {"methods"})
    check_keys(common_path, "", common, COMMON_KEYS)
    user_methods = user.get("methods") or {}
    if not isinstance(user_methods, dict):
        raise UserError(f"{user_path}: methods must map method names to method specs")

    registry = set(available_methods())
    chosen = list(dict.fromkeys(methods or [*sorted(n for n in files if n != COMMON), *sorted(user_methods)]))
    families = known_families()
    method_spaces: dict[str, MethodSpace] = {}
    read: list[SpaceFile] = [common_path]
    for name in chosen:
        if name not in registry:
            raise UserError(f"--methods: unknown method {name!r}; available: {', '.join(sorted(registry))}")
        path = files.get(name)
        if path is None and name not in user_methods:
            where = f"{USER_SPACE_DIR}/ nor --space has" if space_dir is None else f"{space_dir} has"
            raise UserError(f"no search space for method {name!r}: none is shipped and neither {where} one")
        spec = read_yaml(path) if path is not None else {"method": name}
        if path is not None:
            read.append(path)
        user_spec = user_methods.get(name) or {}
        if name in user_methods:
            spec = merge_specs(spec, user_spec)
            path = path if path is not None else user_path
        user_params = set(user_spec.get("params") or {}) if isinstance(user_spec, dict) else set()
        method_spaces[name] = method_space_of(name, path, spec, families, user_path, user_params)

    merged_common = merge_specs(common, {k: v for k, v in user.items() if k != "methods"})
    synthesis_params = synthesis_params_of(merged_common, user, common_path, user_path, families)

    sizes = merged_common.get("image_size", {"choices": [128]})
    if image_size is not None:
        image_sizes: tuple[int, ...] = (int(image_size),)
    else:
        image_sizes = parse_sizes(user_path if "image_size" in user else common_path, "image_size", sizes,
                                   keep_order=True)

    for name, method_space in list(method_spaces.items()):
        if image_size is not None:
            candidates = image_sizes
        elif method_space.image_sizes:
            candidates = method_space.image_sizes
        elif "image_size" in user:  # the user chose the sizes: no paper size added
            candidates = tuple(sorted(image_sizes))
        else:
            candidates = tuple(sorted({*image_sizes, int(recipe_for(name).image_size)}))
        method_spaces[name] = dataclasses.replace(method_space, image_sizes=candidates)

    fidelity = fidelity_of(merged_common, user_path if "fidelity" in user else common_path,
                         user.get("fidelity") or {})
    return SearchSpace(
        methods=method_spaces,
        image_sizes=image_sizes,
        synthesis=synthesis_params,
        fidelity=fidelity,
        sources=tuple(str(p) for p in read) + ((str(user_file),) if user_file else ()),
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m automl_ad.tuning.space``: list the shipped search-space files, print
    one (``--show NAME``), or copy them out for editing (``--copy DIR [NAME ...]``; a
    copy in ``./search_spaces/`` replaces the shipped file it came from)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m automl_ad.tuning.space", description=main.__doc__)
    parser.add_argument("names", nargs="*", help="common and/or method names (default: all)")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--show", action="store_true", help="print the files' contents")
    action.add_argument("--copy", type=Path, metavar="DIR", help="write <name>.yaml files into DIR")
    args = parser.parse_args(argv)
    try:
        shipped = packaged_space_files()
        if args.copy is not None:
            for path in copy_packaged(args.copy, args.names or None):
                print(path)
            return 0
        unknown = sorted(set(args.names) - set(shipped))
        if unknown:
            raise UserError(f"no shipped search space {unknown[0]!r}; shipped: {', '.join(sorted(shipped))}")
        for name in args.names or sorted(shipped):
            print(f"# {shipped[name]}\n{shipped[name].read_text()}" if args.show else f"{name}: {shipped[name]}")
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
