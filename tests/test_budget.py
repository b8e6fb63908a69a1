"""Budget parsing and the persisted ledger."""

from __future__ import annotations

import json

import pytest

from automl_ad.errors import UserError
from automl_ad.tuning.budget import Ledger, parse_budget


@pytest.mark.parametrize(
    "text, kind, device, amount",
    [
        ("50gpu-h", "device", "gpu", 50 * 3600),
        ("90gpu-m", "device", "gpu", 90 * 60),
        ("4cpu-h", "device", "cpu", 4 * 3600),
        ("5cpu-m", "device", "cpu", 300),
        ("20m", "wall", None, 1200),
        ("2h", "wall", None, 7200),
        ("1.5h", "wall", None, 5400),
        ("30trials", "trials", None, 30),
        (" 1trial ", "trials", None, 1),
    ],
)
def test_parse_budget(text, kind, device, amount):
    budget = parse_budget(text)
    assert (budget.kind, budget.device, budget.amount) == (kind, device, amount)


@pytest.mark.parametrize("text", ["", "50", "50gpu", "gpu-h", "10x", "0m", "0trials", "-5m", "3tpu-h"])
def test_bad_budget_is_user_error(text):
    with pytest.raises(UserError, match="--budget"):
        parse_budget(text)


def test_device_ledger_reserves_records_and_persists(tmp_path):
    ledger = Ledger(tmp_path, parse_budget("10cpu-m"))  # 600 device-seconds
    assert ledger.try_reserve("a", 400)
    assert not ledger.try_reserve("b", 300), "400 reserved + 300 > 600"
    ledger.record("a", devices=2, wall_s=50)  # used 100, still holds 300 more
    assert ledger.used() == 100
    assert not ledger.try_reserve("b", 250)
    ledger.record("a", devices=2, wall_s=60, finished=True)  # 120 used, reservation released
    assert ledger.try_reserve("b", 250)
    assert ledger.committed() == pytest.approx(370)

    # The driver dies while "b" runs: the new ledger keeps usage, drops b's reservation.
    ledger.record("b", devices=1, wall_s=30)
    reloaded = Ledger(tmp_path, parse_budget("10cpu-m"))
    assert reloaded.used() == pytest.approx(150)
    assert reloaded.committed() == pytest.approx(150)
    assert reloaded.try_reserve("b", 999), "a resumed trial keeps its place"
    stored = json.loads((tmp_path / "budget.json").read_text())
    assert stored["trials"]["a"]["state"] == "finished"
    reloaded.record("b", devices=1, wall_s=500, finished=True)
    assert reloaded.exhausted() and reloaded.remaining() == 0


def test_ledger_refuses_other_budget_on_resume(tmp_path):
    Ledger(tmp_path, parse_budget("10m")).start_session()
    Ledger(tmp_path, parse_budget("10m")).tick()
    (tmp_path / "budget.json").write_text(json.dumps({"budget": "10m", "search_s": 1.0, "trials": {}}))
    with pytest.raises(UserError, match="budget.json"):
        Ledger(tmp_path, parse_budget("20m"))


class FakeClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_wall_ledger_charges_only_running_sessions(tmp_path):
    clock = FakeClock()
    ledger = Ledger(tmp_path, parse_budget("1h"), clock=clock)
    ledger.start_session()
    clock.now += 30
    assert ledger.used() == pytest.approx(30), "a running session counts before its tick"
    ledger.end_session()
    assert ledger.used() == pytest.approx(30)
    clock.now += 600  # the search is "down": nothing charged
    assert ledger.used() == pytest.approx(30)
    reloaded = Ledger(tmp_path, parse_budget("1h"), clock=clock)
    assert reloaded.used() == pytest.approx(30), "search time persists across a restart"
    reloaded.start_session()
    clock.now += 20
    reloaded.tick()
    assert json.loads((tmp_path / "budget.json").read_text())["search_s"] == pytest.approx(50)
    clock.now += 3550
    assert reloaded.exhausted() and reloaded.remaining() == 0
    assert reloaded.projected_end(running_devices=1, now=5000.0) == pytest.approx(5000.0)


def test_trials_ledger_counts_trials(tmp_path):
    ledger = Ledger(tmp_path, parse_budget("2trials"))
    assert ledger.try_reserve("a", 1) and ledger.try_reserve("b", 1)
    assert not ledger.try_reserve("c", 1)
    ledger.record("a", devices=1, wall_s=9, finished=True)
    assert ledger.used() == 1


def test_trial_drivers_go_to_the_driver_resource_when_the_cluster_has_it():
    from automl_ad.tuning.trainable import TrialContext, allocated_devices, trial_resources

    base = dict(experiment="e", experiment_dir="/tmp/e", category="screw", data_root="/d", seed=0,
                default_image_size=32, max_epochs=2, steps_per_epoch=1, batch_size=2, use_train=True)
    assert trial_resources(TrialContext(**base)) == {"CPU": 1.0}
    on_demand = TrialContext(**base, driver_resource="TRAIN_DRIVER")
    assert trial_resources(on_demand) == {"CPU": 0.0, "TRAIN_DRIVER": 1.0}
    assert allocated_devices(on_demand, "cpu") == allocated_devices(TrialContext(**base), "cpu") - 1.0
