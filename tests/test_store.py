"""The Parquet store: atomic per-trial files, one table via pyarrow.dataset and duckdb."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pyarrow.parquet as pq
import pytest

from automl_ad.results import store
from automl_ad.errors import UserError


def _row(trial_id: str, method: str, objective: float, test_auroc: float | None, params: dict) -> dict:
    now = datetime.now(timezone.utc)
    return {
        "experiment": "exp", "category": "screw", "trial_id": trial_id, "method": method,
        "backbone": None, "synthesis": "perlin", "image_size": 32, "params": params,
        "status": "finished", "epochs": 2, "max_epochs": 2, "wall_s": 3.5, "devices": 1.0,
        "device_kind": "cpu", "device_s": 3.5, "budget_used": 3.5,
        "val_image_auroc": objective, "val_aupro": None, "objective": objective,
        "test_image_auroc": test_auroc, "checkpoint": f"/x/{trial_id}", "seed": 0,
        "code_version": "0.1.0", "started": now, "ended": now,
    }


def test_trials_read_back_with_pyarrow_and_duckdb(tmp_path):
    store.write_trial(tmp_path, _row("t1", "draem", 0.8, 0.7, {"method": "draem", "draem.lr": 1e-4}),
                      epochs=[{"epoch": 1, "phase": "train", "step": 3, "train_loss": 0.5, "objective": 0.6,
                               "val_image_auroc": 0.6, "elapsed_s": 1.0}])
    store.write_trial(tmp_path, _row("t2", "nsa", 0.9, None, {"method": "nsa", "nsa.lr": 2e-4, "nsa.depth": 3}))
    table = store.read_table(tmp_path)
    assert table.num_rows == 2
    rows = {r["trial_id"]: r for r in table.to_pylist()}
    assert rows["t1"]["param_draem.lr"] == pytest.approx(1e-4)
    assert rows["t1"]["param_nsa.depth"] is None and rows["t2"]["param_nsa.depth"] == 3
    assert rows["t2"]["test_image_auroc"] is None
    assert json.loads(rows["t2"]["params"])["nsa.lr"] == pytest.approx(2e-4)
    assert rows["t1"]["schema_version"] == store.SCHEMA_VERSION
    sql = "SELECT method, objective FROM trials ORDER BY objective DESC"
    assert store.query(tmp_path, sql) == [("nsa", 0.9), ("draem", 0.8)]
    epochs = store.read_table(tmp_path, store.EPOCHS)
    assert epochs.column("trial_id").to_pylist() == ["t1"] and epochs.column("step").to_pylist() == [3]


def test_rewrite_replaces_and_leaves_no_temp_files(tmp_path):
    store.write_trial(tmp_path, _row("t1", "draem", 0.5, 0.5, {}))
    store.write_trial(tmp_path, _row("t1", "draem", 0.75, 0.5, {}))
    assert store.query(tmp_path, "SELECT count(*), max(objective) FROM trials") == [(1, 0.75)]
    assert sorted(p.name for p in (tmp_path / "trials").iterdir()) == ["t1.parquet"]
    assert store.stored_trial_ids(tmp_path) == {"t1"}
    schema = pq.read_schema(tmp_path / "trials" / "t1.parquet")
    assert str(schema.field("started").type) == "timestamp[us, tz=UTC]"


def test_other_tables_and_experiment_names(tmp_path):
    store.write_rows(tmp_path, "ensembles", "e1", [{"members": "t1,t2", "objective": 0.9}])
    assert store.read_table(tmp_path, "ensembles").column("members").to_pylist() == ["t1,t2"]
    assert store.read_table(tmp_path / "missing").num_rows == 0
    with pytest.raises(UserError, match="--experiment"):
        store.experiment_dir(tmp_path, "../evil")
    folder = store.experiment_dir(tmp_path, "screw-1")
    store.write_trial(folder, _row("t9", "cfa", 0.6, 0.6, {}))
    assert store.list_experiments(tmp_path, "screw") == ["screw-1"]
    assert store.list_experiments(tmp_path, "fabric") == []


def test_a_trial_row_keeps_method_and_synthesis_parameters_in_their_own_columns(tmp_path):
    params = {"method": "nsa", "nsa.image_size": 64, "nsa.lr": 2e-4, "nsa.synthesis": "nsa",
              "synthesis.nsa.n_patches": 2}
    outcome = store.TrialOutcome(experiment="exp", category="screw", trial_id="t1", method="nsa", synthesis="nsa",
                                 image_size=64, params=params, status="finished", result={"epoch": 1},
                                 max_epochs=1, wall_s=1.0, devices=1.0, device_kind="cpu", budget_used=1.0, seed=0)
    store.store_trial(tmp_path, outcome)
    (row,) = store.read_table(tmp_path).to_pylist()
    assert json.loads(row["method_params"]) == {"lr": 2e-4}, "size and family are columns of their own"
    assert json.loads(row["synthesis_params"]) == {"n_patches": 2}
    assert json.loads(row["params"]) == params, "the flat configuration stays as sampled"
