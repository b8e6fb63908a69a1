"""Budget deadline: trials stop at an optimizer step once a search's budget is spent.

``training.fit(should_stop=...)`` leaves mid-epoch with its last complete epoch's
checkpoint intact (resume stays bit-exact); the ledger projects when the budget runs
out; the ``BudgetClock`` actor carries that deadline to trials; a search whose epochs
are far longer than its budget ends close to the budget, not an epoch later.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from automl_ad.results import store
from automl_ad.experiment import CHECKPOINT_FILE
from automl_ad.training.loop import TrainConfig, fit
from automl_ad.tuning.budget import DeadlineWatch, Ledger, parse_budget, start_clock
from automl_ad.tuning.search import run_search

from conftest import search_options as options
from conftest import toy_category, toy_val


def _stop_after(steps: int):
    calls = {"n": 0}

    def should_stop() -> bool:
        calls["n"] += 1
        return calls["n"] >= steps

    return should_stop


def test_fit_stops_mid_epoch_and_resumes_bit_exactly(tmp_path):
    data = toy_category()
    cfg = TrainConfig(method="_tiny_seg", image_size=32, epochs=4, steps_per_epoch=3, batch_size=4, seed=5)
    straight = fit(cfg, data, toy_val(data), checkpoint_dir=tmp_path / "a", evaluate_test=False)

    seen = []
    stopped = fit(cfg, data, toy_val(data), checkpoint_dir=tmp_path / "b", evaluate_test=False,
                  on_epoch=lambda r, d: seen.append(r.epoch), should_stop=_stop_after(10))
    # Asked before each step and before each validation: 4 asks per epoch of 3 steps, so
    # the 10th ask comes before the 8th step, inside epoch 3, which is dropped.
    assert stopped.stopped_early and [r.epoch for r in stopped.reports] == [1, 2] and seen == [1, 2]
    assert stopped.test == {} and stopped.reports[-1].step == 6
    saved = torch.load(tmp_path / "b" / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    assert saved["epoch"] == 2 and saved["step"] == 6, "the checkpoint is the last complete epoch"

    resumed = fit(cfg, data, toy_val(data), checkpoint_dir=tmp_path / "b", resume_from=tmp_path / "b",
                  evaluate_test=False)
    assert [r.train_loss for r in resumed.reports] == [r.train_loss for r in straight.reports]
    for key, value in straight.method.state_dict().items():
        assert torch.equal(value, resumed.method.state_dict()[key]), key


def test_fit_stopped_in_its_first_epoch_reports_nothing(tmp_path):
    data = toy_category()
    cfg = TrainConfig(method="_tiny_seg", image_size=32, epochs=2, steps_per_epoch=5, batch_size=4)
    result = fit(cfg, data, toy_val(data), checkpoint_dir=tmp_path, should_stop=_stop_after(6))  # 5 steps
    assert result.stopped_early and result.reports == [] and result.test == {}
    assert not (tmp_path / CHECKPOINT_FILE).exists()


def test_ledger_projects_when_the_budget_runs_out(tmp_path):
    device = Ledger(tmp_path / "d", parse_budget("10cpu-m"))  # 600 device-seconds
    device.try_reserve("a", 100)
    device.record("a", devices=2, wall_s=50)  # 100 used, 500 left
    assert device.projected_end(running_devices=2, now=1000.0) == pytest.approx(1250.0)
    assert device.projected_end(running_devices=4, now=1000.0) == pytest.approx(1125.0)
    assert device.projected_end(running_devices=0, now=1000.0) is None

    wall = Ledger(tmp_path / "w", parse_budget("2m"))
    wall.start_session()
    end = wall.projected_end(running_devices=3, now=1000.0)
    assert 1000.0 + 119.0 < end <= 1000.0 + 120.0, "a wall budget ends 2 minutes after the search started"
    assert Ledger(tmp_path / "t", parse_budget("3trials")).projected_end(2, now=0.0) is None


def test_budget_clock_reaches_deadline_watches(tmp_path, ray_session):
    import ray

    assert not DeadlineWatch(tmp_path / "no-clock").active, "no clock: nothing to watch"
    clock = start_clock(tmp_path)
    ray.get(clock.set.remote(time.time() + 3600))
    watch = DeadlineWatch(tmp_path, refresh_s=0.0)
    assert watch.active and not watch()
    ray.get(clock.set.remote(time.time() - 1))
    assert watch()
    ray.get(clock.set.remote(None))
    assert not watch()
    ray.kill(clock)


def test_search_stops_a_long_epoch_when_the_budget_is_spent(tmp_path, tiny_mvtec, ray_session):
    # Each epoch would take minutes; the budget is 30 device-seconds (1 CPU per trial, two
    # at once): enough to cover the trials' start-up even on a loaded machine.
    opts = options(tmp_path, tiny_mvtec, budget="30cpu-s", experiment="deadline", methods=["ssae"])
    spaces = Path(opts.space_dir)
    common = (spaces / "common.yaml").read_text().replace("steps_per_epoch: 2", "steps_per_epoch: 100000")
    (spaces / "common.yaml").write_text(common)
    began = time.monotonic()
    summary = run_search(opts)
    wall = time.monotonic() - began
    ledger = json.loads((summary.experiment_dir / "budget.json").read_text())
    used = sum(e["used"] for e in ledger["trials"].values())
    rows = store.read_table(summary.experiment_dir).to_pylist()
    assert rows and all(r["epochs"] == 0 and r["status"] == "stopped" for r in rows), rows
    # Without the deadline the first epoch (100000 steps) would run for many minutes. What
    # may still go over: a trial whose start-up (imports, data) spans the deadline stops
    # at its first check after it, a few seconds late on a loaded 2-core machine.
    assert 30.0 <= used <= 30.0 + 2 * 6.0, f"used {used:.2f} device-s of 30"
    assert wall < 120




def test_a_memory_bank_setup_and_a_long_validation_stop_at_the_deadline():
    """PatchCore's coreset search and a validation over many batches cannot be cut by a
    step loop: they ask the deadline themselves (issue 21: a 333 s PatchCore trial had
    started 2.8 minutes before the end of a 15-minute budget and overran it)."""
    data = toy_category()
    cfg = TrainConfig(method="patchcore", image_size=32, epochs=1, batch_size=4, seed=0, eval_batch_size=2,
                      method_params={"backbone": "efficientnet_lite0", "coreset_ratio": 0.5, "weights": "random"})
    asks = {"n": 0}

    def during_setup() -> bool:
        asks["n"] += 1
        return asks["n"] >= 3  # the first ask is fit's own; the 3rd comes from inside setup

    stopped = fit(cfg, data, toy_val(data), should_stop=during_setup, evaluate_test=False)
    assert stopped.stopped_early and stopped.reports == [] and asks["n"] == 3
    assert stopped.method.memory_bank.shape[0] == 0, "no bank: setup was left part-way"

    # The deadline passes during validation, between two of its batches: nothing reported.
    import inspect

    def inside_validation() -> bool:
        return inspect.stack()[1].function == "predict"

    reported = []
    stopped = fit(cfg, data, toy_val(data), should_stop=inside_validation, evaluate_test=False,
                  on_epoch=lambda r, d: reported.append(r))
    assert len(toy_val(data)) > cfg.eval_batch_size, "several validation batches"
    assert stopped.stopped_early and stopped.reports == [] and reported == []
    finished = fit(cfg, data, toy_val(data), evaluate_test=False)
    assert finished.reports and not finished.stopped_early


def test_a_patchcore_configuration_costs_what_drives_its_work():
    """Strides 4+8 at a 4.7 % coreset cost 3.5-7.4x the default's setup and validation
    (benchmarks/patchcore_cost.py; 333 s against about 140 s for a whole trial on real
    images); a parameter count had said they cost less."""
    from automl_ad.tuning.sampled_costs import config_cost_factor

    counts = {"fit": 194, "val_good": 48}
    heavy = config_cost_factor("patchcore", {"feature_strides": "4+8", "coreset_ratio": 0.047}, 256, counts)
    light = config_cost_factor("patchcore", {"coreset_ratio": 0.0059}, 256, counts)
    wider = config_cost_factor("patchcore", {"backbone": "efficientnet_lite2"}, 256, counts)
    assert 3.0 < heavy < 7.5 and 0.7 < light < 1.0 and wider > 1.05
    assert config_cost_factor("patchcore", {}, 256, counts) == pytest.approx(1.0)


def test_patchcore_cost_benchmark_times_configurations_against_the_estimate(tmp_path):
    """benchmarks/patchcore_cost.py (whose timings the constants were fitted to) runs and
    reports, per configuration, the measured seconds and the ratio to the estimate."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "patchcore_cost.py"
    out = tmp_path / "rows.json"
    run = subprocess.run([sys.executable, str(script), "--fit", "3", "--val", "2", "--sizes", "64", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert len(rows) == 9 and rows[0]["params"] == {} and rows[0]["ratio"] == 1.0
    assert all(row["measured_s"] > 0 and row["estimated"] > 0 for row in rows)
    assert "measured/estimated vs default" in run.stdout


def test_patchcore_cost_benchmark_refuses_bad_input_in_one_line(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "patchcore_cost.py"
    for bad in (["--fit", "0"], ["--sizes", "abc"], ["--sizes", "16"], ["--out", str(tmp_path / "missing" / "rows.json")]):
        run = subprocess.run([sys.executable, str(script), *bad], capture_output=True, text=True, timeout=120)
        assert run.returncode == 2, (bad, run.stderr)
        assert "Traceback" not in run.stderr and run.stderr.strip().splitlines()[-1].startswith("patchcore_cost.py: error:")
    assert not list(tmp_path.iterdir())
