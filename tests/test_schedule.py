"""The schedule planner, the calibration cache and the searcher's per-config reservations."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from torch import nn

from automl_ad.methods.base import Method, register
from automl_ad.tuning.budget import Ledger, parse_budget
from automl_ad.tuning.calibration import Probe, Speed, SpeedBook, prior_speed
from automl_ad.tuning.planner import make_plan
from automl_ad.tuning.schedule import (
    DataCounts, Fidelity, MethodInput, Plan, asha_rungs, expected_cost, recipe_for, trial_cost,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ("ast", "cfa", "draem", "nsa", "ssae")
MVTEC_SCREW = DataCounts(fit=256, val_good=64, test=160)
BUILTIN = DataCounts(fit=160, val_good=40, test=140)


@register
class _TinyBank(Method):
    """A method without a gradient phase: a mean image as its 'memory bank'."""

    name = "_tiny_bank"
    phases = ()
    synthesis = None

    @dataclass
    class Config:
        lr: float = 1e-3

    def setup(self, fit_images: torch.Tensor) -> None:
        self.register_buffer("mean", fit_images.mean(dim=0, keepdim=True))

    def anomaly_map(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean).abs().mean(dim=1)


@register
class _TinyConv(Method):
    name = "_tiny_conv"
    synthesis = None

    @dataclass
    class Config:
        lr: float = 1e-3

    def __init__(self, config, image_size: int, category: str) -> None:
        super().__init__(config, image_size, category)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def training_step(self, batch, phase):
        return {"loss": (self.conv(batch.images) - batch.clean).pow(2).mean()}

    def anomaly_map(self, images):
        return (self.conv(images) - images).abs().mean(dim=1)


def shipped_methods(val_good: int) -> list[MethodInput]:
    """The shipped methods as the search plans them (sizes from common.yaml + paper)."""
    from automl_ad.tuning.search import method_inputs
    from automl_ad.tuning.space import load_space

    return [m for m in method_inputs(load_space(list(SHIPPED)), val_good)]


class FakeBook(SpeedBook):
    """Speeds from a formula: training and inference cost grow with the pixel count."""

    def __init__(self, step_128: dict[str, float], setup_128: dict[str, float] | None = None) -> None:
        super().__init__("cpu", None)
        self.step_128, self.setup_128 = step_128, setup_128 or {}

    def lookup(self, probe: Probe, stand_in: Probe | None = None) -> Speed:
        scale = (probe.size / 128) ** 2
        return Speed(build_s=0.5, setup_c=self.setup_128.get(probe.method, 0.0) * scale, setup_p=1.0,
                     step_s=self.step_128.get(probe.method, 0.0) * scale, infer_s=0.01 * scale,
                     metrics_s=0.005 * scale, batch=probe.batch, source="fake")


def method(name: str, sizes=(128, 256), **kwargs) -> MethodInput:
    recipe = recipe_for(name)
    trainable = recipe.epochs > 0
    return MethodInput(name=name, trainable=trainable, recipe=recipe, sizes=tuple(sizes), val_images=200, **kwargs)


# --- the rule ------------------------------------------------------------------------------

def test_asha_rungs_and_expected_cost():
    assert asha_rungs(4, 1, 2) == [1, 2, 4]
    assert asha_rungs(9, 1, 3) == [1, 3, 9]
    assert asha_rungs(10, 1, 3) == [1, 3, 9, 10]
    costs = {"fixed": 10.0, "round": 4.0, "val": 1.0, "test": 3.0}
    # rung 1 always, rung 2 with 1/2, rung 4 with 1/4; the test set is evaluated after the
    # search, outside the budget, so it is in no trial's cost
    assert expected_cost(costs, [1, 2, 4], 2, True) == pytest.approx(10 + 5 + 0.5 * 5 + 0.25 * 2 * 5)
    assert trial_cost(costs, 4, 4, True) == pytest.approx(10 + 4 * 5)
    assert trial_cost(costs, 1, 4, True) == pytest.approx(15)
    assert trial_cost(costs, 1, 4, False) == trial_cost(costs, 4, 4, False) == pytest.approx(11)


def test_ten_minute_cpu_plan_finishes_at_least_six_trials():
    methods = shipped_methods(BUILTIN.val_good)
    # Methods the budget cannot train to a tenth of their paper schedule leave the search.
    plan = make_plan(parse_budget("10m"), methods, Fidelity(), SpeedBook("cpu", None), BUILTIN,
                     category="screw", devices_per_trial=2, concurrency=1, use_train=True)
    assert plan.expected_trials >= 6, plan.text()
    left = {d["method"] for d in plan.dropped if d["image_size"] == "any"}
    assert left and "draem" in left and {e.method for e in plan.entries} == set(SHIPPED) - left
    for entry in plan.entries:
        assert entry.steps >= 0.1 * entry.paper_steps, "who stays trains at least 10 % of the paper's"
    # Named with --methods, every method stays, at the floor.
    plan = make_plan(parse_budget("10m"), methods, Fidelity(), SpeedBook("cpu", None), BUILTIN,
                     category="screw", devices_per_trial=2, concurrency=1, use_train=True, keep_all=True)
    assert plan.expected_trials >= 6, plan.text()
    assert {e.method for e in plan.entries} == set(SHIPPED), "every method keeps a size"
    for entry in plan.entries:
        assert entry.steps >= Fidelity().min_steps and entry.steps % plan.rounds == 0
        assert entry.steps_per_epoch * plan.rounds == entry.steps
        assert entry.rungs == [r * entry.steps_per_epoch for r in plan.rung_rounds]
        assert entry.steps < entry.paper_steps, "10 CPU minutes buy no paper schedule"
        assert entry.full_s > entry.expected_s > entry.first_rung_s > 0
    assert plan.sizes("draem") == (128,), "DRAEM cannot afford 256 px in 10 CPU minutes"
    assert any(d["method"] == "draem" and d["image_size"] == 256 for d in plan.dropped)
    assert "draem" in plan.text() and "expected:" in plan.text()


def test_fifty_gpu_hours_train_every_method_to_its_paper_schedule():
    methods = shipped_methods(MVTEC_SCREW.val_good)
    plan = make_plan(parse_budget("50gpu-h"), methods, Fidelity(), SpeedBook("gpu", None), MVTEC_SCREW,
                     category="screw", devices_per_trial=1, concurrency=1, use_train=True)
    assert plan.phi >= 1 and plan.device_kind == "gpu"
    for m in methods:
        entries = [e for e in plan.entries if e.method == m.name]
        recipe = recipe_for(m.name)
        paper = math.ceil(recipe.epochs_for("screw") * MVTEC_SCREW.fit / recipe.batch_size)
        assert entries, m.name
        for entry in entries:
            assert entry.paper_steps == paper and entry.steps >= paper, (m.name, entry.steps, paper)
            assert entry.epochs >= recipe.epochs_for("screw")
            assert "estimate" in entry.source, "GPU speeds are the CPU prior scaled: an estimate"
        assert sum(e.expected_full for e in entries) >= 1, f"{m.name}: no full-fidelity trial expected"
        assert {128, 256} <= set(plan.sizes(m.name)), (m.name, plan.sizes(m.name), plan.dropped)
    assert plan.entry("nsa", 256).paper_epochs == 560, "NSA trains screw for 560 epochs"
    assert plan.entry("cfa", 224) is not None, "CFA's paper size is searched too"


def test_sizes_are_dropped_per_method_when_unaffordable():
    book = FakeBook({"draem": 0.5, "_tiny_conv": 0.5}, {"_tiny_bank": 0.01})
    methods = [method("draem"), method("_tiny_bank")]
    plan = make_plan(parse_budget("1h"), methods, Fidelity(), book, BUILTIN, devices_per_trial=1, concurrency=1,
                     use_train=False)
    assert plan.sizes("draem") == (128,), plan.text()
    assert plan.sizes("_tiny_bank") == (128, 256), "a memory bank affords 256 px where DRAEM does not"
    (drop,) = plan.dropped
    assert drop["method"] == "draem" and drop["image_size"] == 256 and "of the paper" in drop["reason"]
    # With the budget to train DRAEM to its paper schedule, 256 px comes back.
    rich = make_plan(parse_budget("2000h"), methods, Fidelity(), book, BUILTIN, devices_per_trial=1,
                     concurrency=1, use_train=False)
    assert rich.sizes("draem") == (128, 256) and rich.phi >= 1 and not rich.dropped
    # A budget too small for the floor keeps only the smallest sizes.
    poor = make_plan(parse_budget("30s"), methods, Fidelity(), book, BUILTIN, devices_per_trial=1, concurrency=1,
                     use_train=False, keep_all=True)
    assert poor.sizes("draem") == (128,)
    assert all("too small" in d["reason"] or "may block" in d["reason"] for d in poor.dropped) and poor.notes
    # ... and the bank, whose setup + validation alone is more than 30 s / min_trials, none
    assert poor.sizes("_tiny_bank") == () and any("one trial may block" in d["reason"] for d in poor.dropped)
    # Unless named, DRAEM leaves such a budget to the method that needs no training.
    spent = make_plan(parse_budget("30s"), methods, Fidelity(), book, BUILTIN, devices_per_trial=1, concurrency=1,
                      use_train=False)
    assert [e.method for e in spent.entries] == ["_tiny_bank"] * len(spent.entries)
    assert spent.dropped[0]["method"] == "draem" and spent.dropped[0]["image_size"] == "any"


def test_a_memory_bank_keeps_its_larger_size_and_a_starved_trained_method_leaves_instead():
    # DRAEM reaches 10.7 % of its paper schedule beside a bank at 128 px only; the bank's
    # 256 px would take it to 9.6 %. The bank's size is what a small budget buys: it
    # stays, and DRAEM, under the joining share, leaves (stop 32: marble's plan dropped
    # PatchCore at 256 px to keep the trained methods' share, and exported less).
    book = FakeBook({"draem": 1.0}, {"_tiny_bank": 0.3})
    options = dict(devices_per_trial=1, concurrency=1, use_train=False)
    small = make_plan(parse_budget("1h"), [method("draem"), method("_tiny_bank", sizes=(128,))], Fidelity(), book,
                      BUILTIN, **options)
    assert small.sizes("draem") == (128,) and 0.1 <= small.phi < 0.11, small.text()
    plan = make_plan(parse_budget("1h"), [method("draem"), method("_tiny_bank")], Fidelity(), book, BUILTIN,
                     **options)
    assert plan.sizes("_tiny_bank") == (128, 256) and plan.sizes("draem") == (), plan.text()
    assert plan.dropped[0]["method"] == "draem" and plan.dropped[0]["image_size"] == "any"
    # named with --methods, DRAEM stays at the floor beside the bank's two sizes
    kept = make_plan(parse_budget("1h"), [method("draem"), method("_tiny_bank")], Fidelity(), book, BUILTIN,
                     keep_all=True, **options)
    assert kept.sizes("_tiny_bank") == (128, 256) and kept.sizes("draem") == (128,)


def test_a_method_without_gradient_phase_costs_setup_and_evaluation_only():
    assert recipe_for("_tiny_bank").epochs == 0
    book = FakeBook({}, {"_tiny_bank": 0.02})
    for budget in ("10m", "5cpu-m", "3trials"):
        plan = make_plan(parse_budget(budget), [method("_tiny_bank", sizes=(64,))], Fidelity(), book, BUILTIN,
                         devices_per_trial=1, concurrency=1, use_train=False)
        (entry,) = plan.entries
        assert entry.steps == entry.paper_steps == 0 and entry.epochs == 0 and entry.rungs == []
        assert entry.steps_per_epoch == 1, "a valid TrainConfig; the loop runs no step"
        costs = entry.costs["-"]
        speed = book.lookup(Probe("_tiny_bank", 64, entry.batch_size))
        setup = 3.0 + speed.build_s + speed.setup_s(BUILTIN.fit)  # start-up of a Tune-function trial
        per_image = speed.infer_s + speed.metrics_s
        assert costs["round"] == 0
        assert costs["fixed"] == pytest.approx(setup)
        assert costs["val"] == pytest.approx(200 * per_image) and costs["test"] == pytest.approx(140 * per_image)
        assert entry.full_s == pytest.approx(setup + 200 * per_image), "the test set is not charged"
        assert entry.expected_s == pytest.approx(entry.full_s) == pytest.approx(entry.first_rung_s)
        assert entry.expected_full == pytest.approx(entry.expected_trials), "every trial is a full one"
        assert plan.seconds_at("_tiny_bank", 64, None, 0) == pytest.approx(entry.full_s)
    assert plan.expected_trials == 3


def test_steps_and_batch_overrides_fix_the_schedule():
    book = FakeBook({"draem": 0.1, "nsa": 0.1})
    bounds = Fidelity(max_epochs=2, steps_per_epoch=3, batch_size=4)
    plan = make_plan(parse_budget("1h"), [method("draem", (32,)), method("nsa", (32,))], bounds, book, BUILTIN,
                     devices_per_trial=1, concurrency=1)
    assert plan.fixed_steps and "override" in plan.text()
    assert {(e.steps, e.steps_per_epoch, e.batch_size) for e in plan.entries} == {(6, 3, 4)}
    assert plan.schedule() == {"draem@32": {"steps_per_epoch": 3, "batch_size": 4},
                               "nsa@32": {"steps_per_epoch": 3, "batch_size": 4}}


def test_max_steps_bounds_and_data_parallel_workers():
    book = FakeBook({"draem": 0.001})
    plan = make_plan(parse_budget("30trials"), [method("draem", (128,))], Fidelity(max_steps=400), book, BUILTIN)
    assert plan.entries[0].steps == 400 and plan.trial_seconds is None
    two = make_plan(parse_budget("30trials"), [method("draem", (128,))], Fidelity(), book, BUILTIN, workers=2)
    assert two.entries[0].paper_steps == math.ceil(700 * 160 / (8 * 2)), "each worker draws its own batch"


def test_plan_round_trips_through_json():
    book = FakeBook({"draem": 0.2}, {"_tiny_bank": 0.01})
    plan = make_plan(parse_budget("2h"), [method("draem"), method("_tiny_bank")], Fidelity(), book, BUILTIN)
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan and again.text() == plan.text()
    assert again.first_rung_seconds("draem", 128) == pytest.approx(plan.entry("draem", 128).first_rung_s)
    assert again.first_rung_seconds("draem", 999) is None


# --- the calibration ----------------------------------------------------------------------

def test_calibration_is_cached_per_machine_device_method_and_size(tmp_path, monkeypatch):
    cache = tmp_path / "calibration.json"
    monkeypatch.setenv("AUTOML_AD_CALIBRATION", str(cache))
    book = SpeedBook("cpu", "cpu", threads=1)
    probes = [Probe("_tiny_conv", 32, 4), Probe("_tiny_bank", 32, 4)]
    assert book.missing(probes) == probes
    measured = dict(book.calibrate(probes))
    assert measured[probes[0]].step_s > 0 and measured[probes[0]].infer_s > 0
    assert measured[probes[1]].step_s == 0, "no gradient phase, no step"
    assert measured[probes[1]].setup_c > 0
    entries = json.loads(cache.read_text())["entries"]
    key = f"{socket.gethostname()}|cpu|1t|_tiny_conv|32px|b4|-"
    assert key in entries and entries[key]["step_s"] == pytest.approx(measured[probes[0]].step_s)
    assert not list(tmp_path.glob(".*.tmp")), "written by rename, no temporary left"
    again = SpeedBook("cpu", "cpu", threads=1)
    assert again.missing(probes) == [] and again.calibrate(probes) == []
    assert again.lookup(probes[0]).source == "measured"
    assert again.lookup(Probe("_tiny_conv", 64, 4)).source != "measured", "another size is another entry"
    assert SpeedBook("cpu", "cpu", threads=2).missing(probes) == probes, "threads are part of the key"


def test_prior_is_used_without_the_device_and_gpu_is_an_estimate():
    cpu = prior_speed("draem", 256, 8, "cpu")
    gpu = prior_speed("draem", 256, 8, "gpu")
    assert cpu is not None and gpu is not None
    assert cpu.source == "prior" and gpu.source == "estimate"
    assert gpu.step_s < cpu.step_s / 20 and gpu.infer_s < cpu.infer_s
    scaled = prior_speed("draem", 512, 8, "cpu")
    assert scaled.step_s == pytest.approx(cpu.step_s * 4) and "scaled" in scaled.source
    assert prior_speed("draem", 256, 16, "cpu").step_s == pytest.approx(2 * cpu.step_s)
    book = SpeedBook("gpu", None)
    assert book.missing([Probe("draem", 256, 8)]) == [], "nothing to measure without the device"
    assert "prior" in book.device_label
    for name in SHIPPED:
        assert prior_speed(name, 128, recipe_for(name).batch_size, "cpu") is not None, name


# --- the searcher -------------------------------------------------------------------------

def test_searcher_reserves_each_configuration_s_first_rung_and_keeps_its_turn(tmp_path):
    import optuna
    from ray.tune.search import Searcher

    from automl_ad.tuning.search import BudgetedOptunaSearch, method_inputs
    from automl_ad.tuning.space import load_space

    space = load_space(["draem"], image_size=32)  # the shipped widths: 16 to 128
    methods = method_inputs(space, 2)
    plan = make_plan(parse_budget("20cpu-s"), methods, Fidelity(steps_per_epoch=1), FakeBook({}), BUILTIN,
                     overhead_s=12.0)
    assert plan.heavy_limit_s == pytest.approx(20.0 / 6)
    ledger = Ledger(tmp_path, parse_budget("20cpu-s"))
    searcher = BudgetedOptunaSearch(space.suggest, metric="objective", mode="max",
                                    sampler=optuna.samplers.TPESampler(seed=0), ledger=ledger, max_epochs=4,
                                    plan=plan, devices_per_trial=1.0, default_image_size=32)
    config = searcher.suggest("t1")
    key = searcher._config_key(config)
    rung1 = plan.first_rung_seconds(*key)
    assert rung1 == pytest.approx(12.0 + key[3] * (plan.entries[0].first_rung_s - 12.0)), "scaled but the start-up"
    assert ledger.trial("t1")["reserved"] == pytest.approx(rung1)
    assert searcher.suggest("t2") is None, "the rest cannot hold a second first rung while t1 runs"
    waiting = searcher._pending[1]
    assert searcher.suggest("t3") is None and searcher._pending == ("t3", waiting), "same configuration waits"
    ledger.record("t1", 1.0, 1.25 * rung1, finished=True)
    searcher.on_trial_complete("t1", {"epoch": 1, "objective": 0.5})
    assert searcher._correction() == pytest.approx(1.25), "used / planned of finished trials"
    # Nothing runs: the waiting configuration starts with what is left (the deadline bounds it).
    assert searcher.suggest("t4") == waiting
    assert ledger.trial("t4")["reserved"] == pytest.approx(20.0 - 1.25 * rung1)
    assert searcher.suggest("t5") is None, "t4 holds the rest"
    ledger.record("t4", 1.0, 20.0 - 1.25 * rung1, finished=True)
    searcher.on_trial_complete("t4", {"epoch": 4, "objective": 0.6})
    assert searcher.suggest("t6") == Searcher.FINISHED, "the budget is spent"
    trials = searcher.study.trials
    assert sorted(t.state.name for t in trials if t.state.name != "FAIL") == ["COMPLETE", "PRUNED"]
    not_run = [t.user_attrs.get("not_run", "") for t in trials if t.state.name == "FAIL"]
    assert sum("budget was spent" in r for r in not_run) == 1, not_run
    for trial in trials:  # every configuration that ran fits the limit; the skipped ones do not
        factor = searcher._config_key(trial.params)[3]
        heavy = plan.too_heavy("draem", 32, None, factor)
        assert (heavy is not None) == ("a trial may block" in trial.user_attrs.get("not_run", "")), (trial.params,
                                                                                                   heavy)


def test_paper_width_draem_is_too_heavy_for_ten_cpu_minutes():
    from automl_ad.tuning.sampled_costs import config_cost_factor

    wide = config_cost_factor("draem", {"rec_width": 128, "disc_width": 64}, 128)
    assert 12 < wide < 20, "parameters grow with width squared"
    assert config_cost_factor("draem", {}, 128) == 1.0
    assert config_cost_factor("nsa", {"width": 16}, 128) < 0.2
    plan = make_plan(parse_budget("10m"), shipped_methods(BUILTIN.val_good), Fidelity(), SpeedBook("cpu", None),
                     BUILTIN, category="screw", devices_per_trial=2, concurrency=1, keep_all=True)
    assert plan.too_heavy("draem", 128, None, 1.0) is None
    assert "more than" in plan.too_heavy("draem", 128, None, wide)
    rich = make_plan(parse_budget("4cpu-h"), shipped_methods(BUILTIN.val_good), Fidelity(), SpeedBook("cpu", None),
                     BUILTIN, category="screw", devices_per_trial=2, concurrency=1, keep_all=True)
    assert rich.too_heavy("draem", 128, None, wide) is None, "four CPU hours can afford it"


# --- the command line ----------------------------------------------------------------------

PLAN_SCRIPT = """
import sys
from click.testing import CliRunner
from automl_ad.cli import main
out = CliRunner().invoke(main, sys.argv[1:])
import ray
print(out.output)
print("exit", out.exit_code, "ray_started", ray.is_initialized())
"""


@pytest.mark.parametrize("budget", ["10m", "50gpu-h"])
def test_cli_plan_prints_the_schedule_without_training_or_ray(tmp_path, budget):
    env = {**os.environ, "AUTOML_AD_CALIBRATION": str(tmp_path / "calibration.json")}
    run = subprocess.run([sys.executable, "-c", PLAN_SCRIPT, "search", "-c", "screw", "--budget", budget, "--plan",
                          "--methods", ",".join(SHIPPED)], capture_output=True, text=True, cwd=REPO, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert out.rstrip().endswith("exit 0 ray_started False"), out
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0] in SHIPPED]
    assert {r[0] for r in rows} == set(SHIPPED)
    for row in rows:
        size, batch, steps = int(row[1]), int(row[2]), int(row[3])
        assert size >= 128 and batch >= 1 and steps >= 8
    expected = next(line for line in out.splitlines() if line.startswith("expected:"))
    trials = float(expected.split()[1])
    if budget == "10m":
        # every shipped method is forced in at its floor, and a configuration drawn from
        # their spaces (DRAEM at the paper's widths) costs more than the default: fewer
        # than min_trials is what the plan honestly expects, and it says why
        assert trials >= 5 and "cpu" in out and "at its mean cost over the space (" in out
    else:
        assert "estimate" in out and "paper schedule (phi = 1)" in out
    assert not (tmp_path / "calibration.json").exists(), "--plan alone measures nothing"
    assert not (REPO / "results" / "never").exists()


# --- the warm start ------------------------------------------------------------------------

def test_warm_start_runs_defaults_trainless_first_at_their_largest_size_and_every_backbone():
    import dataclasses

    from automl_ad.methods.backbones import searchable_backbones
    from automl_ad.tuning.search import method_inputs, warm_start_points
    from automl_ad.param_keys import split_config
    from automl_ad.tuning.space import load_space

    space = load_space(["cfa", "patchcore"])
    plan = make_plan(parse_budget("10m"), method_inputs(space, BUILTIN.val_good), Fidelity(),
                     FakeBook({"cfa": 0.01}, {"patchcore": 0.05, "cfa": 0.01}), BUILTIN, category="screw")
    assert plan.sizes("patchcore") and plan.sizes("cfa"), plan.text()
    space = space.with_sizes({name: plan.sizes(name) for name in space.methods})
    points = warm_start_points(space, plan)
    backbones = searchable_backbones()
    assert [p["method"] for p in points] == ["patchcore"] * len(backbones) + ["cfa"]
    assert [p["patchcore.backbone"] for p in points[:-1]] == backbones  # the Config's default (lite0) first
    assert len(plan.sizes("patchcore")) > 1, plan.text()
    for point in points[:-1]:
        config = split_config(point, 128)
        assert config.image_size == max(plan.sizes("patchcore"))  # a memory bank: largest affordable size
        assert config.method_params["coreset_ratio"] == space.methods["patchcore"].params["coreset_ratio"].default
    cfa = split_config(points[-1], 128)
    assert cfa.image_size == min(plan.sizes("cfa"), key=lambda s: (abs(s - 224), s))  # a trained one: paper-nearest
    assert dataclasses.asdict(cfa)["method_params"]["lr"] == 1e-3



def test_no_warm_start_for_a_method_one_trial_of_which_would_block_too_much_of_the_budget():
    """A warm start is a prior: one that takes more than budget / min_trials (CFA at its
    full schedule on a 10-minute CPU budget) is left to TPE, and the plan's expected trial
    count follows the same warm starts."""
    from automl_ad.tuning.search import method_inputs, warm_start_points
    from automl_ad.tuning.space import load_space

    space = load_space(["cfa", "patchcore"])
    slow = FakeBook({"cfa": 0.2}, {"patchcore": 0.05, "cfa": 0.01})
    plan = make_plan(parse_budget("10m"), method_inputs(space, BUILTIN.val_good), Fidelity(), slow, BUILTIN,
                     category="screw")
    cfa = min(e.full_s for e in plan.entries if e.method == "cfa")
    assert plan.sizes("cfa") and cfa > plan.heavy_limit_s, plan.text()
    space = space.with_sizes({name: plan.sizes(name) for name in space.methods})
    assert {p["method"] for p in warm_start_points(space, plan)} == {"patchcore"}


def test_searcher_passes_over_a_heavy_draw_only_while_it_runs_behind_the_plan(tmp_path):
    import optuna

    from automl_ad.tuning.schedule import PACE
    from automl_ad.tuning.search import BudgetedOptunaSearch, method_inputs
    from automl_ad.tuning.space import load_space

    space = load_space(["patchcore"], image_size=64)
    budget = parse_budget("600cpu-s")
    plan = make_plan(budget, method_inputs(space, 2), Fidelity(), FakeBook({}, {"patchcore": 0.01}), BUILTIN,
                     use_train=False)
    ledger = Ledger(tmp_path, budget)
    searcher = BudgetedOptunaSearch(space.suggest, metric="objective", mode="max",
                                    sampler=optuna.samplers.TPESampler(seed=0), ledger=ledger, max_epochs=4,
                                    plan=plan, devices_per_trial=1.0, default_image_size=64)
    size = plan.entries[0].image_size
    heavy = {"method": "patchcore", "patchcore.image_size": size, "patchcore.feature_strides": "4+8",
             "patchcore.coreset_ratio": 0.05}
    default = {"method": "patchcore", "patchcore.image_size": size}
    factor = searcher._config_key(heavy)[3]
    assert factor > 3, "strides 4+8 with a 5 % coreset cost several defaults"
    cost = plan.expected_seconds("patchcore", size, None, factor)
    assert cost > plan.expected_seconds("patchcore", size, None, 1.0)
    # On pace (nothing spent, nothing run) a draw within PACE x the pace runs.
    pace = budget.amount / plan.expected_trials
    assert (searcher._behind_pace(heavy) is None) == (cost <= PACE * pace)
    # Behind: most of the budget spent on no trial the plan counted -> the heavy draw waits,
    # the default never does.
    assert ledger.try_reserve("spent", 1.0)
    ledger.record("spent", 1.0, budget.amount - 3 * cost / PACE, finished=True)
    reason = searcher._behind_pace(heavy)
    assert reason is not None and "behind the plan's pace" in reason, reason
    assert searcher._behind_pace(default) is None
    # Ahead of the plan (it has run every trial it expected): the same draw runs.
    searcher._planned = {f"t{i}": ("patchcore", size, None, 1.0) for i in range(int(plan.expected_trials) + 1)}
    assert searcher._behind_pace(heavy) is None


def test_a_size_or_method_whose_default_the_searcher_would_refuse_is_not_planned():
    """The plan counts only trials the searcher runs: a size whose default setup + one
    validation is more than budget / min_trials (Plan.too_heavy, what the searcher
    refuses) leaves with that reason, and a method whose smallest size is that heavy leaves
    the plan (stop 35: a tiled KolektorSDD plan counted 3.3 trials at 256 px, the search
    refused every one and ran the 128 px ones)."""
    book = FakeBook({"_tiny_conv": 0.001}, {"_tiny_bank": 0.3})  # bank setup 48 s at 128 px, 192 s at 256
    plan = make_plan(parse_budget("10m"), [method("_tiny_bank")], Fidelity(), book, BUILTIN, use_train=False)
    limit = plan.heavy_limit_s
    assert plan.sizes("_tiny_bank") == (128,), plan.text()
    assert plan.too_heavy("_tiny_bank", 128, None, 1.0) is None
    dropped = {(d["method"], d["image_size"]): d["reason"] for d in plan.dropped}
    assert "one trial may block" in dropped[("_tiny_bank", 256)]
    roomy = make_plan(parse_budget("1h"), [method("_tiny_bank")], Fidelity(), book, BUILTIN, use_train=False)
    assert roomy.sizes("_tiny_bank") == (128, 256) and roomy.heavy_limit_s > 192 > limit
    both = make_plan(parse_budget("10m"), [method("_tiny_bank", sizes=(256,)), method("_tiny_conv")], Fidelity(),
                     book, BUILTIN, use_train=False, keep_all=True)
    assert both.sizes("_tiny_bank") == () and both.sizes("_tiny_conv"), both.text()
    assert any(d["method"] == "_tiny_bank" and "one trial may block" in d["reason"] for d in both.dropped)
