"""A lost node, on one machine: a 3-node Ray cluster, a worker node killed mid-trial.

The cluster (``ray.cluster_utils.Cluster``) mirrors ``cluster/``: a head with no CPUs, an
on-demand node carrying ``TRAIN_DRIVER`` (where the trial drivers and Train controllers
go) and one worker node, the only place with CPUs, so the Train worker is pinned there
(it also carries a ``TRAIN_WORKER`` label like the GPU node types). Once Tune has received
the trial's first epoch (so its checkpoint is registered with the Train controller), the
worker node is killed without warning and a replacement added. The search must finish,
the trial must resume from its last checkpoint (Tune sees every epoch exactly once, the
controller logged a worker-group retry), and the store must hold the trial exactly once
with no temporary files.

The scenario runs in a subprocess: it needs its own cluster, never the session Ray of
``conftest.py``, and a hung cluster must not hang the test run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # a 3-node Ray cluster in subprocesses

REPO = Path(__file__).resolve().parents[1]
MAX_EPOCHS = 4
# ~1.5 s per epoch here: long enough that the kill lands between two epochs, short
# enough that the whole scenario (two TorchTrainer start-ups) stays near 2 minutes.
STEPS_PER_EPOCH = 40
SCENARIO_TIMEOUT_S = 280


def _write_space(folder: Path) -> Path:
    from automl_ad.tuning.space import packaged_space_files

    folder.mkdir(parents=True, exist_ok=True)
    common = yaml.safe_load(packaged_space_files()["common"].read_text())
    common["fidelity"] = {"max_epochs": MAX_EPOCHS, "grace_period": MAX_EPOCHS, "reduction_factor": 2,
                          "steps_per_epoch": STEPS_PER_EPOCH, "batch_size": 4}
    (folder / "common.yaml").write_text(yaml.safe_dump(common))
    (folder / "ssae.yaml").write_text(yaml.safe_dump({
        "method": "ssae",
        "synthesis": ["corruption"],
        "params": {
            "lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-3, "log": True, "default": 3.0e-4},
            "width": {"type": "categorical", "choices": [4], "default": 4},
            "depth": {"type": "int", "low": 1, "high": 2, "default": 1},
        },
    }))
    return folder


def _tune_epochs(experiment_dir: Path) -> list[dict]:
    """The reports Tune has received so far, from its trials' result.json files."""
    rows = []
    for path in sorted((experiment_dir / "tune").glob("*/result.json")):
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # the line being written right now
                    pass
    return rows


def run_scenario(work: Path, data: Path, out: Path) -> None:
    """Start the cluster, run the search, kill the worker node mid-trial; write what happened."""
    import ray
    from ray.cluster_utils import Cluster

    from automl_ad.tuning.search import DRIVER_RESOURCE, SearchOptions, run_search

    began = time.monotonic()
    folder = work / "results" / "failover"
    log: dict = {}
    # shutdown_at_exit=False: add_node from the killer thread must not install a signal
    # handler (only the main thread may); the cluster is shut down in `finally` instead.
    cluster = Cluster(initialize_head=True, shutdown_at_exit=False, head_node_args={"num_cpus": 0})
    try:
        cluster.add_node(num_cpus=0, resources={DRIVER_RESOURCE: 2})
        worker = cluster.add_node(num_cpus=1, resources={"TRAIN_WORKER": 1})
        log["session_dir"] = cluster.head_node.get_session_dir_path()

        def kill_worker_node_mid_trial() -> None:
            deadline = time.monotonic() + SCENARIO_TIMEOUT_S
            while time.monotonic() < deadline:
                seen = _tune_epochs(folder) if folder.exists() else []
                if seen:
                    break
                time.sleep(0.05)
            else:
                return
            log["epochs_before_kill"] = [r["epoch"] for r in seen]
            log["epoch1_elapsed_s"] = seen[0]["elapsed_s"]
            log["killed_at_s"] = time.monotonic() - began
            cluster.remove_node(worker, allow_graceful=False)
            time.sleep(2.0)  # the worker group has failed; now the "autoscaler" brings a node
            cluster.add_node(num_cpus=1, resources={"TRAIN_WORKER": 1})
            log["replaced_at_s"] = time.monotonic() - began

        killer = threading.Thread(target=kill_worker_node_mid_trial, daemon=True)
        killer.start()
        summary = run_search(SearchOptions(
            category="screw", budget="1trials", data=data, storage=work / "results", experiment="failover",
            image_size=32, use_train=True, live=False, seed=0, space_dir=_write_space(work / "spaces"),
            methods=["ssae"], address=cluster.address,
        ))
        killer.join(timeout=5)
        log["trials"] = summary.trials
        log["experiment_dir"] = str(summary.experiment_dir)
        log["tune_epochs"] = [r["epoch"] for r in _tune_epochs(folder)]
        log["ended_at_s"] = time.monotonic() - began
    finally:
        ray.shutdown()
        cluster.shutdown()
        out.write_text(json.dumps(log, indent=1))


def test_search_survives_losing_the_worker_node_mid_trial(tmp_path, tiny_mvtec):
    import torch

    from automl_ad.results import store
    from automl_ad.experiment import CHECKPOINT_FILE

    out = tmp_path / "scenario.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "RAY_AIR_NEW_OUTPUT": "0"}
    began = time.monotonic()
    scenario = subprocess.Popen(
        [sys.executable, __file__, str(tmp_path), str(tiny_mvtec), str(out)],
        cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        output, _ = scenario.communicate(timeout=SCENARIO_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(scenario.pid, signal.SIGKILL)
        output, _ = scenario.communicate()
    took = time.monotonic() - began
    assert scenario.returncode == 0, output[-4000:]
    log = json.loads(out.read_text())
    print(f"failover scenario: {took:.0f} s; {json.dumps({k: v for k, v in log.items() if k != 'session_dir'})}")

    # The node went while the trial was half way: Tune had epoch 1, not the last one.
    assert "killed_at_s" in log and "replaced_at_s" in log, "the worker node was never removed"
    assert 1 <= max(log["epochs_before_kill"]) < MAX_EPOCHS
    # Resumed, not restarted: a restart from scratch would report epoch 1 to Tune again.
    assert log["tune_epochs"] == list(range(1, MAX_EPOCHS + 1))
    folder = Path(log["experiment_dir"])
    rows = store.read_table(folder).to_pylist()
    assert log["trials"] == 1 and len(rows) == 1
    row = rows[0]
    assert row["status"] == "finished" and row["epochs"] == MAX_EPOCHS
    assert row["objective"] is not None and row["test_image_auroc"] is not None
    # The final checkpoint carries epoch 1 exactly as reported before the kill.
    final = torch.load(Path(row["checkpoint"]) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    assert final["epoch"] == MAX_EPOCHS
    assert final["reports"][0]["elapsed_s"] == log["epoch1_elapsed_s"]
    epochs = store.read_table(folder, store.EPOCHS).to_pylist()
    assert sorted(e["epoch"] for e in epochs) == list(range(1, MAX_EPOCHS + 1))
    assert {e["trial_id"] for e in epochs} == {row["trial_id"]}
    # The Train controller saw the worker group fail and retried it on the new node.
    controller_logs = list(Path(log["session_dir"], "logs", "train").glob("ray-train-app-controller-*.log"))
    retried = [line for p in controller_logs for line in p.read_text().splitlines()
               if "[FailurePolicy] RETRY" in line and f"train-{row['trial_id']}" in line]
    assert retried, "no worker-group retry in the Train controller logs"
    # Exactly once, nothing half-written.
    for table in (store.TRIALS, store.EPOCHS):
        names = sorted(p.name for p in (folder / table).iterdir())
        assert names == [f"{row['trial_id']}.parquet"], names
    ledger = json.loads((folder / "budget.json").read_text())
    assert list(ledger["trials"]) == [row["trial_id"]]
    assert ledger["trials"][row["trial_id"]]["state"] == "finished"
    assert took < 300


if __name__ == "__main__":
    run_scenario(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
