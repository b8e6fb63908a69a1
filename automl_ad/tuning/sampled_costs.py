"""What a configuration drawn from the search space costs, on average, against the
method's default Config (the one a calibration times).

A plan counts the trials a budget buys. Its warm starts are default configurations, but
every later trial is drawn from the space, and the space of a memory bank reaches
configurations several times dearer than its default (PatchCore's feature strides 4+8
patch the image four times as densely; a larger coreset ratio runs more selection
steps). Counting every drawn trial at the default's cost planned 11 trials where a
10-minute search ran 8. This module draws a fixed, seeded sample of configurations of one
method (Optuna's random sampler on the space's own define-by-run function, so every
parameter the space searches takes part) and keeps ``schedule.config_cost_factor`` of
each draw per image size: the planner averages them, leaving out the draws the searcher
would pass over while it paces (``schedule.PACE``). 48 draws (8 did before stop 33) give
every size a dozen or more: with 8, a size held 2-3 draws and its mean swung 3.8-6.6x.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from automl_ad.tuning.schedule import config_cost_factor
from automl_ad.param_keys import split_config
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
