"""What trials cost against their plan, kept per machine for the next plan
(tuning/learned_costs.py), and what a configuration drawn from the space costs
(tuning/sampled_costs.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from automl_ad.tuning import learned_costs
from automl_ad.tuning.budget import parse_budget
from automl_ad.tuning.calibration import SpeedBook
from automl_ad.tuning.sampled_costs import sampled_cost_factors
from automl_ad.tuning.planner import make_plan
from automl_ad.tuning.schedule import (
    PACE, PACE_MIN_FACTOR, DataCounts, Fidelity, MethodInput, recipe_for, sampled_seconds,
)
from automl_ad.tuning.space import load_space

BUILTIN = DataCounts(fit=160, val_good=40, test=140)


def test_factor_is_used_over_planned_of_the_recent_trials(tmp_path: Path):
    path = tmp_path / "learned.json"
    machine = learned_costs.machine_key("cpu", 1, host="box")
    assert learned_costs.record(machine, [("patchcore", 30.0, 60.0, "e/t1")], path) == 1
    assert learned_costs.factors(machine, path) == {}, "one trial is not enough to move a plan"
    added = learned_costs.record(machine, [("patchcore", 30.0, 60.0, "e/t1"),  # again after a resume
                                           ("patchcore", 10.0, 30.0, "e/t2"),
                                           ("cfa", 100.0, 0.0, "e/t3")], path)  # no wall time: ignored
    assert added == 1
    (factor, trials), = learned_costs.factors(machine, path).values()
    assert trials == 2 and factor == pytest.approx(90 / 40)
    assert learned_costs.factors(learned_costs.machine_key("cpu", 2, host="box"), path) == {}, "per thread count"
    # Only the most recent KEEP trials count, and a factor is clamped to a sane range.
    learned_costs.record(machine, [("patchcore", 1.0, 100.0, f"f/t{i}") for i in range(learned_costs.KEEP)], path)
    factor, trials = learned_costs.factors(machine, path)["patchcore"]
    assert trials == learned_costs.KEEP and factor == learned_costs.FACTOR_RANGE[1]
    assert not list(tmp_path.glob(".*.tmp")), "the write is atomic: no temporary file left"


def test_a_damaged_or_foreign_file_reads_as_empty_and_is_replaced(tmp_path: Path):
    path = tmp_path / "learned.json"
    machine = learned_costs.machine_key("cpu", 1, host="box")
    for content in ("{not json", json.dumps({"version": 999, "machines": {machine: {}}}), "[]"):
        path.write_text(content)
        assert learned_costs.factors(machine, path) == {}
    learned_costs.record(machine, [("cfa", 10.0, 12.0, "e/a"), ("cfa", 10.0, 14.0, "e/b")], path)
    assert learned_costs.factors(machine, path)["cfa"] == (pytest.approx(1.3), 2)


def test_ratios_planned_by_another_calibration_are_not_used(tmp_path: Path, monkeypatch):
    # A ratio is of used to planned seconds: once the calibration (the planned seconds)
    # changes, a ratio kept from the old one would scale the new plan wrongly.
    path = tmp_path / "learned.json"
    machine = learned_costs.machine_key("cpu", 1, host="box")
    learned_costs.record(machine, [("cfa", 10.0, 6.0, "e/a"), ("cfa", 10.0, 5.0, "e/b")], path)
    assert learned_costs.factors(machine, path)["cfa"] == (pytest.approx(0.55), 2)
    monkeypatch.setattr(learned_costs, "CALIBRATION_VERSION", learned_costs.CALIBRATION_VERSION + 1)
    assert learned_costs.factors(machine, path) == {}
    learned_costs.record(machine, [("cfa", 10.0, 20.0, "f/a"), ("cfa", 10.0, 22.0, "f/b")], path)
    assert learned_costs.factors(machine, path)["cfa"] == (pytest.approx(2.1), 2), "the old ratios are gone"


def _bank(**kwargs) -> MethodInput:
    return MethodInput(name="patchcore", trainable=False, recipe=recipe_for("patchcore"), sizes=(128,),
                       val_images=200, **kwargs)


def test_the_plan_scales_a_method_by_its_learnt_factor_and_counts_sampled_configurations_dearer():
    budget, book = parse_budget("10m"), SpeedBook("cpu", None)
    options = dict(devices_per_trial=1, concurrency=1, use_train=False)
    plain = make_plan(budget, [_bank()], Fidelity(), book, BUILTIN, **options)
    learned = make_plan(budget, [_bank(learned=2.0, learned_trials=5)], Fidelity(), book, BUILTIN, **options)
    (before,), (after,) = plain.entries, learned.entries
    assert after.full_s == pytest.approx(2 * before.full_s), "every part of the cost, start-up included"
    assert after.learned_factor == 2.0 and learned.expected_trials < plain.expected_trials
    assert any("x2.00 (5 trials)" in note for note in learned.notes)
    sampled = make_plan(budget, [_bank(sampled_cost=((128, 3.0),))], Fidelity(), book, BUILTIN, **options)
    (entry,) = sampled.entries
    assert entry.full_s == pytest.approx(before.full_s), "s/full trial stays the default's"
    overhead = entry.overhead_s
    assert sampled_seconds(entry) == pytest.approx(overhead + 3 * (entry.expected_s - overhead))
    assert sampled.expected_trials < plain.expected_trials
    assert any("patchcore x3.0 by size" in note for note in sampled.notes)


def test_sampled_patchcore_configurations_cost_more_than_the_default_and_the_draw_is_seeded():
    space = load_space(["patchcore"])
    data = {"fit": 160, "val_good": 40}
    first = sampled_cost_factors(space, "patchcore", data, draws=6, seed=0)
    assert first == sampled_cost_factors(space, "patchcore", data, draws=6, seed=0)
    sizes = {size for size, _ in first}
    assert sizes and sizes <= set(space.method_sizes("patchcore"))
    assert sum(len(draws) for _, draws in first) == 6, "each draw is kept, by its size"
    # The space reaches strides 4+8 and larger coresets: on average dearer than the default.
    assert all(sum(draws) / len(draws) > 1.2 for _, draws in first), first


def test_the_count_leaves_out_draws_the_searcher_passes_over_behind_its_pace():
    budget, book = parse_budget("10m"), SpeedBook("cpu", None)
    options = dict(devices_per_trial=1, concurrency=1, use_train=False)
    plain = make_plan(budget, [_bank()], Fidelity(), book, BUILTIN, **options)
    # one draw in four costs 40x the default: far over PACE x the pace of ~40 trials
    tail = make_plan(budget, [_bank(sampled_cost=((128, (1.0, 1.0, 1.0, 40.0)),))], Fidelity(), book, BUILTIN,
                     **options)
    (entry,) = tail.entries
    assert entry.sampled_factor == pytest.approx(1.0), "the 40x draw waits for a cheaper one"
    assert tail.expected_trials == pytest.approx(plain.expected_trials)
    assert any(f"over {PACE:g}x the pace" in note for note in tail.notes)
    # draws within PACE x the pace, or within PACE_MIN_FACTOR of the default, all count
    mild = make_plan(budget, [_bank(sampled_cost=((128, (1.0, PACE_MIN_FACTOR)),))], Fidelity(), book, BUILTIN,
                     **options)
    assert mild.entries[0].sampled_factor == pytest.approx((1.0 + PACE_MIN_FACTOR) / 2)
    assert mild.expected_trials < plain.expected_trials


def test_tiled_trials_learn_apart_from_untiled_ones(tmp_path: Path, monkeypatch):
    from automl_ad.tuning.planning import _with_learned_costs

    path = tmp_path / "learned.json"
    monkeypatch.setenv(learned_costs.LEARNED_ENV, str(path))
    machine = learned_costs.machine_key("cpu", 1)
    tiled = learned_costs.cost_key("patchcore", 4)
    assert tiled != "patchcore" and learned_costs.cost_key("patchcore", 1) == "patchcore"
    learned_costs.record(machine, [(tiled, 100.0, 215.0, "e/t1"), (tiled, 100.0, 215.0, "e/t2"),
                                   ("patchcore", 20.0, 35.0, "e/t3"), ("patchcore", 20.0, 36.0, "e/t4")])
    entry = MethodInput(name="patchcore", trainable=False, recipe=recipe_for("patchcore"), sizes=(256,))
    (untiled,) = _with_learned_costs([entry], "cpu", 1)
    (four,) = _with_learned_costs([entry], "cpu", 1, tiles=4)
    assert untiled.learned == pytest.approx(71 / 40) and four.learned == pytest.approx(2.15)
    (nine,) = _with_learned_costs([entry], "cpu", 1, tiles=9)
    assert nine.learned == untiled.learned, "nothing learnt at 3 x 3 tiles yet: the untiled ratio"
