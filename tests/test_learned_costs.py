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
    (cost,) = learned_costs.factors(machine, path).values()
    assert cost.trials == 2 and cost.factor == pytest.approx(90 / 40) and cost.start_up is None
    assert learned_costs.factors(learned_costs.machine_key("cpu", 2, host="box"), path) == {}, "per thread count"
    # Only the most recent KEEP trials count, and a factor is clamped to a sane range.
    learned_costs.record(machine, [("patchcore", 1.0, 100.0, f"f/t{i}") for i in range(learned_costs.KEEP)], path)
    cost = learned_costs.factors(machine, path)["patchcore"]
    assert cost.trials == learned_costs.KEEP and cost.factor == learned_costs.FACTOR_RANGE[1]
    assert not list(tmp_path.glob(".*.tmp")), "the write is atomic: no temporary file left"


def test_a_damaged_or_foreign_file_reads_as_empty_and_is_replaced(tmp_path: Path):
    path = tmp_path / "learned.json"
    machine = learned_costs.machine_key("cpu", 1, host="box")
    for content in ("{not json", json.dumps({"version": 999, "machines": {machine: {}}}), "[]"):
        path.write_text(content)
        assert learned_costs.factors(machine, path) == {}
    learned_costs.record(machine, [("cfa", 10.0, 12.0, "e/a"), ("cfa", 10.0, 14.0, "e/b")], path)
    assert learned_costs.factors(machine, path)["cfa"] == learned_costs.LearnedCost(pytest.approx(1.3), 2)


def test_ratios_planned_by_another_calibration_are_not_used(tmp_path: Path, monkeypatch):
    # A ratio is of used to planned seconds: once the calibration (the planned seconds)
    # changes, a ratio kept from the old one would scale the new plan wrongly.
    path = tmp_path / "learned.json"
    machine = learned_costs.machine_key("cpu", 1, host="box")
    learned_costs.record(machine, [("cfa", 10.0, 6.0, "e/a"), ("cfa", 10.0, 5.0, "e/b")], path)
    assert learned_costs.factors(machine, path)["cfa"] == learned_costs.LearnedCost(pytest.approx(0.55), 2)
    monkeypatch.setattr(learned_costs, "CALIBRATION_VERSION", learned_costs.CALIBRATION_VERSION + 1)
    assert learned_costs.factors(machine, path) == {}
    learned_costs.record(machine, [("cfa", 10.0, 20.0, "f/a"), ("cfa", 10.0, 22.0, "f/b")], path)
    assert learned_costs.factors(machine, path)["cfa"].factor == pytest.approx(2.1), "the old ratios are gone"


def test_trials_of_several_sizes_learn_a_start_up_apart_from_a_factor_on_the_work(tmp_path: Path):
    # Stop 37: one ratio per method made PatchCore's 128 px trials cost 0.3-0.5 of their
    # plan (its 6 s start-up, which a warm worker does not pay, was scaled like the work).
    path = tmp_path / "learned.json"
    machine = learned_costs.machine_key("cpu", 1, host="box")
    work = (2.0, 5.0, 10.0, 20.0)  # calibrated seconds after a planned start-up of 6 s
    learned_costs.record(machine, [("patchcore", 6.0 + w, 4.0 + 1.8 * w, f"e/t{i}", 6.0)
                                   for i, w in enumerate(work)], path)
    cost = learned_costs.factors(machine, path)["patchcore"]
    assert cost.trials == 4 and cost.factor == pytest.approx(1.8) and cost.start_up == pytest.approx(4.0)
    # Trials all of one size cannot tell a start-up from work: one ratio, as before.
    same = tmp_path / "same.json"
    learned_costs.record(machine, [("patchcore", 16.0, 22.0, f"e/t{i}", 6.0) for i in range(5)], same)
    cost = learned_costs.factors(machine, same)["patchcore"]
    assert cost.start_up is None and cost.factor == pytest.approx(22 / 16)
    # ... and trials planned with different start-ups (with and without a TorchTrainer) too.
    mixed = tmp_path / "mixed.json"
    learned_costs.record(machine, [("cfa", s + w, 4.0 + 1.8 * w, f"e/t{i}", s)
                                   for i, (w, s) in enumerate(zip(work, (15.0, 3.0, 15.0, 3.0)))], mixed)
    assert learned_costs.factors(machine, mixed)["cfa"].start_up is None
    # The planner puts the learnt start-up in place of its own, scaled one.
    budget, book = parse_budget("10m"), SpeedBook("cpu", None)
    options = dict(devices_per_trial=1, concurrency=1, use_train=False)
    (plain,) = make_plan(budget, [_bank()], Fidelity(), book, BUILTIN, **options).entries
    fitted = make_plan(budget, [_bank(learned=1.8, learned_trials=4, learned_start_up=4.0)], Fidelity(), book,
                       BUILTIN, **options)
    (entry,) = fitted.entries
    assert entry.overhead_s == pytest.approx(4.0) and entry.start_up_s == plain.overhead_s
    assert entry.full_s == pytest.approx(4.0 + 1.8 * (plain.full_s - plain.overhead_s))
    assert any("patchcore 4.0 s start-up + x1.80 (4 trials)" in note for note in fitted.notes)
    # learnt against a 12 s start-up, it scales to this plan's own (a trial without a TorchTrainer, say)
    other = make_plan(budget, [_bank(learned=1.8, learned_trials=4, learned_start_up=4.0,
                                     learned_start_up_planned=2 * plain.overhead_s)], Fidelity(), book, BUILTIN,
                      **options)
    assert other.entries[0].overhead_s == pytest.approx(2.0)


def test_damaged_rows_are_passed_over_and_the_rest_kept(tmp_path: Path):
    path = tmp_path / "learned.json"
    machine = learned_costs.machine_key("cpu", 1, host="box")
    path.write_text(json.dumps({
        "version": learned_costs.LEARNED_VERSION, "calibration_version": learned_costs.CALIBRATION_VERSION,
        "machines": {machine: {"cfa": [[10.0, 12.0, "e/a"], "junk", ["x", 1, "e/b"], [10.0, 14.0, "e/c"]],
                               "nsa": "junk"}, "other": 3},
        "draws": {machine: {"cfa": [[1.0, 2.0, f"e/{i}"] for i in range(4)] + [[None, 2.0, "e/x"]]}}}))
    assert learned_costs.factors(machine, path) == {"cfa": learned_costs.LearnedCost(pytest.approx(1.3), 2)}
    assert learned_costs.draw_ratios(machine, path) == {"cfa": (pytest.approx(0.5), 4)}
    assert learned_costs.record(machine, [("cfa", 10.0, 16.0, "e/d")], path) == 1, "a new trial is still kept"
    assert learned_costs.factors(machine, path)["cfa"].factor == pytest.approx(42 / 30)


def test_a_tpe_plan_scales_its_draws_by_the_learnt_ratio_and_a_random_search_does_not(tmp_path: Path, monkeypatch):
    from automl_ad.tuning.options import SearchOptions
    from automl_ad.tuning.planning import preview_plan

    monkeypatch.setenv("AUTOML_AD_CALIBRATION", str(tmp_path / "calibration.json"))
    machine = learned_costs.machine_key("cpu", 1)
    learned_costs.record(machine, [], draws=[("patchcore", 1.0, 4.0, f"e/t{i}") for i in range(4)])

    def plan(searcher: str):
        return preview_plan(SearchOptions(category="screw", budget="10m", methods=["patchcore"], searcher=searcher,
                                          calibrate=False))

    tpe, random = plan("tpe"), plan("random")
    assert {e.draw_ratio for e in tpe.entries} == {0.25} and {e.draw_ratio for e in random.entries} == {1.0}
    assert tpe.expected_trials > random.expected_trials
    assert any("patchcore x0.25" in note for note in tpe.notes)
    assert not any("drawn trials counted" in note for note in random.notes)


def test_a_version_2_file_keeps_its_trials_as_one_ratio(tmp_path: Path):
    path = tmp_path / "learned.json"
    machine = learned_costs.machine_key("cpu", 1, host="box")
    path.write_text(json.dumps({"version": 2, "calibration_version": learned_costs.CALIBRATION_VERSION,
                                "machines": {machine: {"cfa": [[10.0, 12.0, "e/a"], [10.0, 14.0, "e/b"]]}}}))
    assert learned_costs.factors(machine, path)["cfa"] == learned_costs.LearnedCost(pytest.approx(1.3), 2)
    assert learned_costs.draw_ratios(machine, path) == {}


def test_drawn_trials_scale_the_next_tpe_plans_draws_by_what_they_cost_against_the_spaces_mean(tmp_path: Path):
    path = tmp_path / "learned.json"
    machine = learned_costs.machine_key("cpu", 1, host="box")
    draws = [("patchcore", 1.5, 3.0, f"e/t{i}") for i in range(learned_costs.MIN_DRAWS - 1)]
    learned_costs.record(machine, [], path, draws=draws)
    assert learned_costs.draw_ratios(machine, path) == {}, "too few drawn trials to move a plan"
    learned_costs.record(machine, [], path, draws=draws + [("patchcore", 1.5, 3.0, "e/last")])
    assert learned_costs.draw_ratios(machine, path) == {"patchcore": (pytest.approx(0.5), learned_costs.MIN_DRAWS)}
    budget, book = parse_budget("10m"), SpeedBook("cpu", None)
    options = dict(devices_per_trial=1, concurrency=1, use_train=False)
    space_mean = make_plan(budget, [_bank(sampled_cost=((128, 3.0),))], Fidelity(), book, BUILTIN, **options)
    learnt = make_plan(budget, [_bank(sampled_cost=((128, 3.0),), draw_ratio=0.5)], Fidelity(), book, BUILTIN,
                       **options)
    assert learnt.entries[0].sampled_factor == pytest.approx(1.5) and learnt.entries[0].draw_ratio == 0.5
    assert learnt.expected_trials > space_mean.expected_trials
    assert any("patchcore x0.50" in note for note in learnt.notes)


def test_a_search_keeps_its_trials_start_up_and_its_drawn_trials_factors(tmp_path: Path, own_learned_costs: Path):
    import datetime as dt

    from automl_ad import experiment as layout
    from automl_ad.param_keys import METHOD, size_key
    from automl_ad.results import store
    from automl_ad.tuning.options import SearchOptions
    from automl_ad.tuning.planning import learn_costs

    budget, book = parse_budget("10m"), SpeedBook("cpu", "cpu", 1)
    plan = make_plan(budget, [_bank(sampled_cost=((128, 3.0),), draw_ratio=0.5)], Fidelity(), book, BUILTIN,
                     devices_per_trial=1, concurrency=1, use_train=False)
    folder = tmp_path / "exp"
    folder.mkdir()
    layout.write_record(folder, {"category": "c", "data": str(tmp_path), "plan": plan.to_dict()})
    start = dt.datetime(2026, 12, 7, tzinfo=dt.timezone.utc)
    warm = {**load_space(["patchcore"]).defaults("patchcore"), size_key("patchcore"): 128}  # the defaults
    configs = [{}, {"patchcore.coreset_ratio": 0.02}, {"patchcore.coreset_ratio": 0.05},
               {"patchcore.feature_strides": "4+8"}, {}]
    for index, extra in enumerate(configs):  # a warm start, three drawn trials, the warm start again (a resume)
        params = {**warm, **extra}
        store.write_trial(folder, {"experiment": "exp", "trial_id": f"t{index}", "method": "patchcore",
                                   "params": json.dumps(params), "status": "finished", "wall_s": 10.0 + index,
                                   "epochs": 1, "started": start + dt.timedelta(minutes=index)})
    learn_costs(folder, SearchOptions(category="c", budget="10m", cpus_per_trial=1), False, warm_starts=[warm])
    kept = json.loads(own_learned_costs.read_text())
    machine = learned_costs.machine_key("cpu", 1)
    trials = kept["machines"][machine]["patchcore"]
    assert [t[2] for t in trials] == ["exp/t0", "exp/t1", "exp/t2", "exp/t3", "exp/t4"]
    (entry,) = plan.entries
    assert all(t[3] == pytest.approx(entry.start_up_s) for t in trials), "each trial keeps its planned start-up"
    assert trials[0][0] == pytest.approx(plan.seconds_at("patchcore", 128, None, 1) / entry.learned_factor, rel=1e-3)
    drawn = kept["draws"][machine]["patchcore"]
    assert [d[2] for d in drawn] == ["exp/t1", "exp/t2", "exp/t3"], "a warm start is no draw, run again or not"
    assert all(d[1] == pytest.approx(3.0) for d in drawn), "against the factor counted, before the learnt ratio"
    assert drawn[0][0] < drawn[1][0] and drawn[2][0] > 1.5, "each draw's own cost factor"


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
