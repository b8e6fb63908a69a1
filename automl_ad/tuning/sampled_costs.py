"""What a configuration drawn from the search space costs, on average, against the
method's default Config (the one a calibration times).

A plan counts the trials a budget buys. Its warm starts are default configurations, but
every later trial is drawn from the space, and the space of a memory bank reaches
configurations several times dearer than its default (PatchCore's feature strides 4+8
patch the image four times as densely; a larger coreset ratio runs more selection
steps). Counting every drawn trial at the default's cost planned 11 trials where a
10-minute search ran 8. This module draws a fixed, seeded sample of configurations of one
method (Optuna's random sampler on the space's own define-by-run function, so every
parameter the space searches takes part) and keeps ``config_cost_factor`` of
each draw per image size (defined here: the ratio of the method's own ``estimated_work``, or
of parameter counts, built on the meta device): the planner averages them, leaving out the draws the searcher
would pass over while it paces (``schedule.PACE``). 48 draws (8 did before stop 33) give
every size a dozen or more: with 8, a size held 2-3 draws and its mean swung 3.8-6.6x.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from automl_ad.methods.base import create_method
from automl_ad.param_keys import split_config
from automl_ad.tuning.schedule import val_images
from automl_ad.tuning.space import SearchSpace

DRAWS = 48  # configurations per method (a build on the meta device is cached per configuration: ~3 s in all)


def sampled_cost_factors(space: SearchSpace, method: str, data: Mapping[str, int] | None = None,
                         draws: int = DRAWS, seed: int = 0) -> tuple[tuple[int, tuple[float, ...]], ...]:
    """``((size, (cost factor of each draw at that size, ...)), ...)`` of ``draws`` seeded
    random configurations of ``method`` (1.0 where a method cannot be costed beyond its
    default)."""
    import optuna

    only = dataclasses.replace(space, methods={method: space.methods[method]})
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        by_size: dict[int, list[float]] = {}
        for _ in range(max(1, draws)):
            trial = study.ask()
            only.suggest(trial)
            split = split_config(trial.params, only.method_sizes(method)[0])
            by_size.setdefault(split.image_size, []).append(
                config_cost_factor(method, split.method_params, split.image_size, data))
            study.tell(trial, 0.0)
    finally:
        optuna.logging.set_verbosity(verbosity)
    return tuple(sorted((size, tuple(values)) for size, values in by_size.items()))


_FACTORS: dict[tuple[str, int, str, int, int], float] = {}
_WORK: dict[tuple[str, int, str, int, int], float] = {}


def config_cost_factor(method: str, params: Mapping[str, Any], image_size: int,
                       data: Mapping[str, int] | None = None) -> float:
    """How much costlier a sampled configuration is than the method's default Config (the
    one calibrated), both built on the meta device (nothing allocated, no weights read):
    the ratio of the method's own ``estimated_work`` on the plan's image counts (``data``:
    fit, val_good) where it has one (PatchCore: strides, coreset ratio), else of their
    parameter counts; 1.0 when that cannot be told."""
    import warnings

    import torch

    counts = dict(data or {})
    fit = int(counts.get("fit", 200))
    evaluated = val_images(None, int(counts.get("val_good", 50)))
    key = (method, int(image_size), repr(sorted(params.items())), fit, evaluated)
    if key not in _FACTORS:
        def cost(values: Mapping[str, Any]) -> float:
            work_key = (method, int(image_size), repr(sorted(values.items())), fit, evaluated)
            if work_key not in _WORK:  # the default is costed once per method and size
                with warnings.catch_warnings(), torch.device("meta"):
                    warnings.simplefilter("ignore")
                    built = create_method(method, dict(values), image_size, "plan")
                    work = built.estimated_work(fit, evaluated)
                    _WORK[work_key] = (float(work) if work is not None
                                       else float(sum(p.numel() for p in built.parameters())))
            return _WORK[work_key]

        try:
            default, sampled = cost({}), cost(params)
            _FACTORS[key] = sampled / default if default > 0 and sampled > 0 else 1.0
        except Exception:  # a method that cannot be built on the meta device
            _FACTORS[key] = 1.0
    return _FACTORS[key]
