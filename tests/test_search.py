"""The search end to end on CPU: tiny images, 2 epochs of 2 steps.

Most tests run the per-trial loop directly as a Tune function (``use_train=False``, a
second or two per trial); one goes through Ray Train's TorchTrainer (the production
path, ~20 s of worker start-up) with W&B offline.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import optuna
import pytest

from automl_ad.results import store
from automl_ad.errors import UserError
from automl_ad.tuning import learned_costs, scratch
from automl_ad.tuning.search import run_search
from conftest import TINY_FIDELITY as FIDELITY
from conftest import TINY_SPACES as SPACES
from conftest import search_options as options

REPO = Path(__file__).resolve().parents[1]


def test_search_stores_every_trial_with_val_and_test(tmp_path, tiny_mvtec, ray_session):
    summary = run_search(options(tmp_path, tiny_mvtec, budget="3trials"))
    folder = summary.experiment_dir
    table = store.read_table(folder).to_pylist()
    assert len(table) == 3 and len({r["trial_id"] for r in table}) == 3
    for row in table:
        assert row["method"] in SPACES and row["category"] == "screw"
        assert 0.0 <= row["objective"] <= 1.0
        assert row["test_image_auroc"] is not None, "test metrics stored for stopped trials too"
        assert row["status"] in {"finished", "stopped"}
        assert row["epochs"] == (2 if row["status"] == "finished" else 1)
        assert row["device_s"] > 0 and row["budget_used"] == 1.0
        assert json.loads(row["params"])["method"] == row["method"]
        assert row[f"param_{row['method']}.lr"] is not None
    epochs = store.read_table(folder, store.EPOCHS).to_pylist()
    assert {e["trial_id"] for e in epochs} == {r["trial_id"] for r in table}
    assert store.query(folder, "SELECT count(DISTINCT trial_id) FROM trials") == [(3,)]
    assert (folder / "val" / "val_anomalies_32px.safetensors").exists()
    # The schedule the search ran is in its record (a resume reuses it).
    plan = json.loads((folder / "search.json").read_text())["plan"]
    assert plan["rounds"] == FIDELITY["max_epochs"] and plan["fixed_steps"]
    assert {e["method"] for e in plan["entries"]} == set(SPACES)
    assert all(e["steps_per_epoch"] == FIDELITY["steps_per_epoch"] and e["batch_size"] == FIDELITY["batch_size"]
               and e["image_size"] == 32 for e in plan["entries"])
    ledger = json.loads((folder / "budget.json").read_text())
    assert sorted(ledger["trials"]) == sorted(r["trial_id"] for r in table)
    assert all(e["state"] == "finished" for e in ledger["trials"].values())
    # Optuna sees ASHA-stopped trials as PRUNED, full ones as COMPLETE.
    study = optuna.load_study(study_name="exp", storage=f"sqlite:///{folder / 'optuna.db'}")
    states = sorted(t.state.name for t in study.trials)
    expected = sorted("PRUNED" if r["status"] == "stopped" else "COMPLETE" for r in table)
    assert states == expected

    from click.testing import CliRunner

    from automl_ad.cli import main

    out = CliRunner().invoke(main, ["results", "--category", "screw", "--storage", str(tmp_path / "results")])
    assert out.exit_code == 0, out.output
    assert "leaderboard" in out.output and "Spearman" in out.output and "track" in out.output
    assert table[0]["trial_id"] in out.output
    stored = CliRunner().invoke(main, ["search", "-c", "screw", "--budget", "3trials", "--plan", "--resume",
                                       "--storage", str(tmp_path / "results"), "--experiment", "exp"])
    assert stored.exit_code == 0, stored.output
    assert "fixed by fidelity.steps_per_epoch" in stored.output and "ssae" in stored.output, "the stored plan"

    with pytest.raises(UserError, match="exists"):
        run_search(options(tmp_path, tiny_mvtec))

    # The end of `search`: ensemble on val, bundle, report; then predict from the bundle alone.
    from automl_ad.deploy.pipeline import ship

    bundle = tmp_path / "models" / "screw"
    ship(folder, folder.name, "screw", bundle, k=3)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["kind"] in {"single", "ensemble"} and manifest["members"]
    assert manifest["export_check"]["onnx_vs_torch_max_abs_map_diff"] <= 1e-4
    assert {m["method"] for m in manifest["members"]} <= set(SPACES)
    assert (bundle / "report.html").stat().st_size > 10_000
    assert store.read_table(folder, "ensembles").num_rows == 1
    images = sorted((tiny_mvtec / "screw" / "test").rglob("*.png"))[:3]
    predicted = subprocess.run([sys.executable, str(REPO / "cli.py"), "predict", str(bundle), *map(str, images),
                                "--format", "json"], capture_output=True, text=True, cwd=tmp_path)
    assert predicted.returncode == 0, predicted.stderr
    rows = json.loads(predicted.stdout)["predictions"]
    assert len(rows) == 3 and all(r["score"] is not None and r["error"] is None for r in rows)


def test_device_budget_is_enforced_and_gpu_budget_refused(tmp_path, tiny_mvtec, ray_session, own_learned_costs):
    with pytest.raises(UserError, match="no GPU.*cpu-m"):
        run_search(options(tmp_path, tiny_mvtec, budget="5gpu-m", experiment="gpu"))
    assert not (tmp_path / "results" / "gpu").exists(), "a refused search leaves nothing behind"
    summary = run_search(options(tmp_path, tiny_mvtec, budget="6cpu-s", experiment="cpu"))
    ledger = json.loads((summary.experiment_dir / "budget.json").read_text())
    used = sum(e["used"] for e in ledger["trials"].values())
    rows = store.read_table(summary.experiment_dir).to_pylist()
    assert rows, "at least one trial ran"
    assert used >= 6.0, "the search ran until the budget was spent"
    # A running trial stops at its next report once the budget is gone: the overshoot
    # is at most about one epoch of one trial.
    longest_epoch = max(r["wall_s"] / max(r["epochs"], 1) for r in rows)
    assert used <= 6.0 + 2 * longest_epoch + 3.0
    assert sum(r["budget_used"] for r in rows) == pytest.approx(used)
    # What the finished trials cost against their plan is kept for the next plan here.
    finished = [r for r in rows if r["status"] == "finished" and r["wall_s"]]
    kept = json.loads(own_learned_costs.read_text())["machines"] if finished else {}
    # Each method keeps its last KEEP finished trials (a fast machine finishes more).
    for method in {r["method"] for r in finished}:
        ran = {f"cpu/{r['trial_id']}" for r in finished if r["method"] == method}
        names = {t[2] for machine in kept.values() for t in machine.get(method, [])}
        assert names <= ran and len(names) == min(len(ran), learned_costs.KEEP), (method, names, ran)


def test_torch_trainer_trial_with_wandb_offline(tmp_path, tiny_mvtec, ray_session, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # no network: must not matter
    summary = run_search(options(tmp_path, tiny_mvtec, budget="1trials", use_train=True, wandb=True,
                                 methods=["ssae"], experiment="trainer"))
    rows = store.read_table(summary.experiment_dir).to_pylist()
    assert len(rows) == 1 and rows[0]["status"] == "finished"
    assert rows[0]["checkpoint"] and "/train/train-" in rows[0]["checkpoint"]
    assert rows[0]["devices"] == 2.0, "Train driver CPU + one worker CPU"
    runs = list((summary.experiment_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "one W&B run, from rank 0 only"


def test_a_memory_bank_trial_runs_without_a_torch_trainer(tmp_path, tiny_mvtec, ray_session):
    """A method without a gradient phase has no loop for Ray Train to wrap: even in a
    TorchTrainer search it runs in the Tune function, holds one CPU, and its test metrics
    come from the driver after the search (issue 21: per-trial overhead)."""
    import yaml

    from conftest import tiny_space_dir

    spaces = tiny_space_dir(tmp_path / "spaces")
    (spaces / "patchcore.yaml").write_text(yaml.safe_dump({
        "method": "patchcore", "synthesis": [],
        "params": {"coreset_ratio": {"type": "float", "low": 0.01, "high": 0.05, "log": True, "default": 0.02},
                   "backbone": {"type": "categorical", "choices": ["efficientnet_lite0"],
                                "default": "efficientnet_lite0"}}}))
    summary = run_search(options(tmp_path, tiny_mvtec, budget="1trials", use_train=True, methods=["patchcore"],
                                 experiment="bank", space_dir=spaces))
    (row,) = store.read_table(summary.experiment_dir).to_pylist()
    assert row["status"] == "finished" and row["method"] == "patchcore"
    assert "/train/train-" not in row["checkpoint"], "no Ray Train run"
    assert row["devices"] == 1.0, "one worker CPU, no Train driver"
    assert row["objective_se"] is not None and 0 < row["objective_se"] < 0.5
    assert row["test_image_auroc"] is not None, "evaluated by the driver after the search"


def test_torch_trainer_trials_after_an_asha_stop_keep_running(tmp_path, tiny_mvtec, ray_session):
    # One trial at a time: from the second on, ASHA stops a trial whose first epoch is
    # below the rung's median. Such a trial is still inside trainer.fit(); a Tune actor
    # reused for the next trial then stalled the whole search (reuse_actors with Train).
    summary = run_search(options(tmp_path, tiny_mvtec, budget="4trials", use_train=True, methods=["ssae"],
                                 experiment="asha", max_concurrent=1))
    rows = store.read_table(summary.experiment_dir).to_pylist()
    assert len(rows) == 4 and len({r["trial_id"] for r in rows}) == 4
    statuses = sorted(r["status"] for r in rows)
    assert "stopped" in statuses and "error" not in statuses, statuses
    assert all(r["objective"] is not None for r in rows)


def test_ray_workers_know_their_own_cluster(ray_session):
    # Train's placement-group cleaner asks the state API about the trial's controller;
    # without RAY_ADDRESS that fails whenever a second Ray runs on the machine.
    import ray

    @ray.remote(num_cpus=0)
    def ray_address() -> str | None:
        return os.environ.get("RAY_ADDRESS")

    assert ray.get(ray_address.remote()) == ray.get_runtime_context().gcs_address


def test_workers_get_bucket_location_never_credentials_and_local_train_settings(tmp_path, tiny_mvtec, monkeypatch):
    from automl_ad.tuning.ray_session import worker_env as _worker_env

    for key, value in {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_REGION": "eu-west-1",
                       "AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret",
                       "AWS_SESSION_TOKEN": "token", "GOOGLE_APPLICATION_CREDENTIALS": "/k.json"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", raising=False)
    local = _worker_env(options(tmp_path, tiny_mvtec))
    assert local["AWS_ENDPOINT_URL"] == "http://minio:9000" and local["AWS_REGION"] == "eu-west-1"
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                "GOOGLE_APPLICATION_CREDENTIALS"} & set(local), "credentials never travel to workers"
    assert local["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.2" and local["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    cluster = _worker_env(options(tmp_path, tiny_mvtec, address="ray://head:10001"))
    assert "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S" not in cluster, "a cluster keeps Ray's defaults (spot nodes)"
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "1.5")
    assert _worker_env(options(tmp_path, tiny_mvtec))["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "1.5", "user's value wins"


def test_spearman_line_says_whether_val_selection_can_be_trusted():
    from automl_ad.results.leaderboard import trust

    assert trust(0.9) == "val selection tracks test"
    assert trust(0.5) == "val selection only partly tracks test"
    assert "--val-defects" in trust(0.1) and "does not track" in trust(-0.4)


RESUME_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from conftest import search_options as options
    from automl_ad.tuning.search import run_search
    run_search(options(Path({tmp!r}), Path({data!r}), budget="4trials", experiment="resume"))
    """
)


def test_sigkill_then_resume_stores_each_trial_once(tmp_path, tiny_mvtec, ray_session, capsys):
    script = RESUME_SCRIPT.format(tests=str(REPO / "tests"), tmp=str(tmp_path), data=str(tiny_mvtec))
    folder = tmp_path / "results" / "resume"
    scratch_root = Path(tempfile.gettempdir())
    scratch_before = set(scratch_root.glob(f"{scratch.PREFIX}*"))
    began = time.monotonic()
    driver = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(store.stored_trial_ids(folder)) < 1 and time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.2)
        assert driver.poll() is None, "the driver finished before it could be killed"
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started
        driver.wait()
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    first_session = time.monotonic() - began
    stored_before = set(store.stored_trial_ids(folder))
    assert 1 <= len(stored_before) < 4
    record_path = folder / "search.json"
    record = json.loads(record_path.read_text())
    record["plan"]["notes"].append("the stored plan, kept on resume")
    record_path.write_text(json.dumps(record))
    time.sleep(3)  # the search is down: the ledger must not charge this

    second_began = time.monotonic()
    capsys.readouterr()
    summary = run_search(options(tmp_path, tiny_mvtec, budget="4trials", experiment="resume", resume=True,
                                 live=True))
    second_session = time.monotonic() - second_began
    rows = store.read_table(summary.experiment_dir).to_pylist()
    ids = [r["trial_id"] for r in rows]
    assert len(ids) == len(set(ids)) == 4
    # The restored search's callbacks reach this session's live view (one line a trial off a terminal).
    printed = capsys.readouterr().out
    assert all(f"trial {t} " in printed for t in set(ids) - stored_before), printed
    ledger = json.loads((folder / "budget.json").read_text())
    finished = sorted(t for t, e in ledger["trials"].items() if e["state"] == "finished")
    assert finished == sorted(ids)
    assert all(e["state"] == "lost" for t, e in ledger["trials"].items() if t not in ids)
    assert ledger["search_s"] < first_session + second_session
    assert "the stored plan, kept on resume" in json.loads(record_path.read_text())["plan"]["notes"], \
        "resume runs the stored plan, never a new one"
    assert all(r["objective"] is not None and r["test_image_auroc"] is not None for r in rows)
    # The killed session's trials never ran their cleanup; their scratch folders (epoch
    # checkpoints, 130 MB each at 256 px) must not outlive the resumed search.
    left = [f for f in set(scratch_root.glob(f"{scratch.PREFIX}*")) - scratch_before
            if not scratch.owned_by_live_process(f)]
    assert not left, left


def test_trial_restarted_after_its_last_checkpoint_reports_it_again_in_full(tmp_path, tiny_mvtec, ray_session,
                                                                            monkeypatch):
    """A driver killed after a trial's last checkpoint but before Tune stored it: the
    re-run trial reports that checkpoint's last epoch, test metrics and path, so the row
    gets an objective and a checkpoint (Train's reports name it; they carry no files)."""
    import dataclasses

    from ray.train import Checkpoint

    from automl_ad.tuning import trainable

    summary = run_search(options(tmp_path, tiny_mvtec, budget="1trials", methods=["ssae"]))
    row = store.read_table(summary.experiment_dir).to_pylist()[0]
    assert row["status"] == "finished" and row["checkpoint"]
    reported: list[dict] = []

    class RestartedReporter:  # what a re-run trial sees: its last checkpoint, nothing reported yet
        rank = 0
        trial_id = row["trial_id"]

        def __init__(self, use_train: bool) -> None:
            pass

        def get_checkpoint(self):
            return Checkpoint(row["checkpoint"])

        def report(self, metrics, checkpoint_dir):
            reported.append({**metrics, "files": checkpoint_dir})

    monkeypatch.setattr(trainable, "_Reporter", RestartedReporter)
    context = trainable.TrialContext(experiment="exp", experiment_dir=str(summary.experiment_dir), category="screw",
                                     data_root=str(tiny_mvtec), seed=0, default_image_size=32,
                                     max_epochs=FIDELITY["max_epochs"], steps_per_epoch=FIDELITY["steps_per_epoch"],
                                     batch_size=FIDELITY["batch_size"], use_train=False)
    trainable.train_worker_loop({"context": dataclasses.asdict(context), "config": json.loads(row["params"])})
    assert len(reported) == 1, "no training again: the checkpoint covers every epoch"
    again = reported[0]
    assert again["epoch"] == FIDELITY["max_epochs"] and again["objective"] == pytest.approx(row["objective"])
    assert again["checkpoint_path"] == row["checkpoint"] and again["files"] is None
    assert "test_image_auroc" not in again, "a trial never evaluates the test set: the driver does, after the search"
    assert row["test_image_auroc"] is not None


# --- clusters: devices, storage, many products ------------------------------------------

def test_device_plan_gpu_budget_on_an_autoscaling_cluster():
    from automl_ad.tuning.budget import parse_budget
    from automl_ad.tuning.search import plan_devices

    gpu_budget = parse_budget("8gpu-h")
    head_only = {"CPU": 0.0, "TRAIN_DRIVER": 16.0, "memory": 1e9}
    with pytest.raises(UserError, match="no GPU.*8cpu-h.*--max-gpus"):
        plan_devices(gpu_budget, head_only)
    # GPU nodes start from zero: trials ask for GPUs that do not exist yet, and the head's
    # zero CPUs do not cap concurrency (the GPU nodes bring their own).
    plan = plan_devices(gpu_budget, head_only, max_gpus=8)
    assert plan.use_gpu and plan.autoscale_gpus and plan.gpus == 8
    assert plan.max_concurrent == 8 and plan.driver_resource == "TRAIN_DRIVER"
    assert plan_devices(gpu_budget, head_only, max_gpus=8, gpus_per_trial=2).max_concurrent == 4
    assert plan_devices(gpu_budget, head_only, max_gpus=8, gpus_per_trial=0.5).max_concurrent == 16
    assert plan_devices(gpu_budget, head_only, max_gpus=8, max_concurrent=3).max_concurrent == 3
    with pytest.raises(UserError, match="--gpus-per-trial 4"):
        plan_devices(gpu_budget, head_only, max_gpus=2, gpus_per_trial=4)
    # GPUs already there: no autoscaling, CPUs count again; --max-gpus can also cap.
    static = {"CPU": 16.0, "GPU": 4.0}
    plan = plan_devices(gpu_budget, static)
    assert plan.use_gpu and not plan.autoscale_gpus and plan.max_concurrent == 4 and plan.driver_resource is None
    assert plan_devices(gpu_budget, static, max_gpus=2).max_concurrent == 2
    assert plan_devices(gpu_budget, {"CPU": 3.0, "GPU": 4.0}).max_concurrent == 1, "driver CPU + worker CPU each"
    # A CPU budget never asks for GPUs, whatever --max-gpus says.
    cpu_plan = plan_devices(parse_budget("4cpu-h"), {"CPU": 8.0}, max_gpus=8)
    assert not cpu_plan.use_gpu and cpu_plan.gpus == 0 and cpu_plan.max_concurrent == 4
    # Trial drivers on TRAIN_DRIVER take no CPU, so the same CPUs hold twice the trials.
    assert plan_devices(parse_budget("4cpu-h"), {"CPU": 8.0, "TRAIN_DRIVER": 16.0}).max_concurrent == 8
    assert plan_devices(parse_budget("4cpu-h"), {"CPU": 8.0, "TRAIN_DRIVER": 16.0},
                        use_train=False).driver_resource is None


def test_storage_accepts_paths_file_and_object_store_uris_and_refuses_other_schemes(tmp_path, monkeypatch):
    from automl_ad.tuning.search import storage_folder

    assert storage_folder(tmp_path / "r") == (tmp_path / "r").resolve()
    assert storage_folder(f"file://{tmp_path}/r%20s") == (tmp_path / "r s").resolve()
    # Object stores: the driver works in a local mirror of the bucket (tests/test_storage_s3.py).
    monkeypatch.setenv("AUTOML_AD_STORAGE_MIRROR", str(tmp_path / "mirror"))
    for scheme in ("s3", "gs"):
        assert storage_folder(f"{scheme}://bucket/automl_ad") == (tmp_path / "mirror" / scheme / "bucket" / "automl_ad").resolve()
    for uri in ("ftp://host/automl_ad", "hdfs://namenode/automl_ad"):
        with pytest.raises(UserError, match=f"--storage {uri}: .*not supported.*s3://bucket/prefix"):
            storage_folder(uri)
    with pytest.raises(UserError, match="file://host/x"):
        storage_folder("file://host/x")


def test_jobs_file_is_checked_before_anything_runs(tmp_path):
    from automl_ad.tuning.jobs import Job, load_jobs

    good = tmp_path / "jobs.yaml"
    good.write_text("- {category: screw, budget: 8gpu-h}\n- {category: washer, budget: 20trials}\n")
    assert load_jobs(good) == [Job("screw", "8gpu-h"), Job("washer", "20trials")]
    cases = {
        "- {category: screw}\n": "item 1: expected exactly the keys category and budget",
        "- {category: screw, budget: 8gpu-h}\n- {category: washer, budget: lots}\n": "item 2 \\(washer\\)",
        "- {category: screw, budget: 1trials}\n- {category: screw, budget: 2trials}\n": "'screw' appears twice",
        "category: screw\n": "non-empty list",
        "- [unclosed\n": "not valid YAML",
    }
    for index, (text, message) in enumerate(cases.items()):
        path = tmp_path / f"bad{index}.yaml"
        path.write_text(text)
        with pytest.raises(UserError, match=message):
            load_jobs(path)
    with pytest.raises(UserError, match="--jobs file not found"):
        load_jobs(tmp_path / "missing.yaml")


def test_cli_chooses_one_search_or_many():
    from click.testing import CliRunner

    from automl_ad.cli import main
    from automl_ad.cli.search import _jobs_of
    from automl_ad.data.builtin import BUILTIN_CATEGORIES
    assert _jobs_of("screw", "10m", None, None) == {}
    assert _jobs_of("all", "10m", None, None) == {c: "10m" for c in BUILTIN_CATEGORIES}
    runner = CliRunner()
    for args, message in ((["--budget", "10m"], "give --category"), (["-c", "screw"], "--budget is required"),
                          (["--jobs", "j.yaml", "-c", "screw"], "leave out --category")):
        out = runner.invoke(main, ["search", *args])
        assert out.exit_code == 2 and message in out.output, out.output


@pytest.fixture(scope="module")
def two_products(tmp_path_factory) -> Path:
    from automl_ad.data.builtin import generate_builtin

    root = tmp_path_factory.mktemp("two")
    generate_builtin(root, ["screw", "washer"], n_train=12, n_test=6, image_size=32, seed=0)
    return root


def test_all_categories_one_search_each_with_its_own_budget_and_ledger(tmp_path, two_products, ray_session):
    from automl_ad.results.leaderboard import leaderboard_text
    from automl_ad.tuning.jobs import Job, all_categories, run_jobs

    assert all_categories(two_products) == ["screw", "washer"]
    jobs = [Job("screw", "2trials"), Job("washer", "1trials")]
    seen = []
    base = options(tmp_path, two_products, storage=f"file://{tmp_path}/shared", experiment="many")
    summaries = run_jobs(base, jobs, on_done=lambda s: seen.append((s.category, leaderboard_text(s.experiment_dir))))
    assert [s.category for s in summaries] == ["screw", "washer"] == [c for c, _ in seen]
    for summary, job, (_, board) in zip(summaries, jobs, seen):
        folder = summary.experiment_dir
        assert folder == tmp_path / "shared" / f"many-{job.category}"
        rows = store.read_table(folder).to_pylist()
        assert len(rows) == summary.trials == int(job.budget[0])
        assert {r["category"] for r in rows} == {job.category}
        ledger = json.loads((folder / "budget.json").read_text())
        assert ledger["budget"] == job.budget
        assert sorted(ledger["trials"]) == sorted(r["trial_id"] for r in rows)
        study = optuna.load_study(study_name=folder.name, storage=f"sqlite:///{folder / 'optuna.db'}")
        assert len(study.trials) == len(rows)
        assert json.loads((folder / "search.json").read_text())["category"] == job.category
        assert all(r["trial_id"] in board for r in rows)
    other = {r["trial_id"] for r in store.read_table(summaries[1].experiment_dir).to_pylist()}
    assert not any(t in seen[0][1] for t in other), "each leaderboard shows its own product only"
    # Resuming the whole run finds each product's search; nothing is run or stored twice.
    again = run_jobs(dataclasses.replace(base, resume=True), jobs)
    assert [s.trials for s in again] == [2, 1]


def test_random_searcher_runs_every_trial_to_full_fidelity_and_resume_keeps_it(tmp_path, tiny_mvtec, ray_session):
    import optuna

    with pytest.raises(UserError, match="--searcher"):
        run_search(options(tmp_path, tiny_mvtec, searcher="grid", experiment="bad"))
    assert not (tmp_path / "results" / "bad").exists(), "a refused searcher leaves nothing behind"
    summary = run_search(options(tmp_path, tiny_mvtec, budget="2trials", searcher="random", experiment="rand"))
    rows = store.read_table(summary.experiment_dir).to_pylist()
    assert len(rows) == 2 and all(r["status"] == "finished" for r in rows), "no early stopping"
    study = optuna.load_study(study_name="rand", storage=f"sqlite:///{summary.experiment_dir / 'optuna.db'}")
    assert len(study.trials) == 2
    assert all("fixed_params" not in t.system_attrs for t in study.trials), "random search has no warm start"
    assert json.loads((summary.experiment_dir / "search.json").read_text())["searcher"] == "random"
    with pytest.raises(UserError, match="searcher"):
        run_search(options(tmp_path, tiny_mvtec, budget="2trials", searcher="tpe", experiment="rand", resume=True))
