"""``--storage s3://...`` end to end against an in-process moto S3 server (offline).

The search runs in subprocesses that start their own Ray, so the Ray workers inherit the
``AWS_*`` variables that point them at the moto server (the session's Ray fixture was
started without them). The first search is killed after its first stored trial, its
local mirror is deleted, and the resume must come back from the bucket alone. Trials run
under Ray Train (TorchTrainer) with its checkpoints in the bucket, as on a cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from automl_ad.errors import UserError

REPO = Path(__file__).resolve().parents[1]
BUCKET = "automl-bucket"
STORAGE = f"s3://{BUCKET}/runs"
TRIALS = 4

SEARCH_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from conftest import search_options as options
    from automl_ad.tuning.search import run_search
    run_search(options(Path({tmp!r}), Path({data!r}), budget="{trials}trials", experiment="exp",
                       storage={storage!r}, resume={resume}, use_train=True))
    """
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def s3_server(monkeypatch, tmp_path):
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AUTOML_AD_STORAGE_MIRROR": str(tmp_path / "mirror")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    from automl_ad.results import remote_storage

    remote_storage._filesystem.cache_clear()  # built once per endpoint
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield env
    server.stop()
    remote_storage._filesystem.cache_clear()


def _keys(prefix: str) -> list[str]:
    from pyarrow.fs import FileSelector, FileSystem, FileType

    filesystem, root = FileSystem.from_uri(f"s3://{BUCKET}/{prefix}")
    infos = filesystem.get_file_info(FileSelector(root, recursive=True, allow_not_found=True))
    return sorted(i.path[len(BUCKET) + 1:] for i in infos if i.type == FileType.File)


def _search(tmp_path: Path, data: Path, resume: bool) -> subprocess.Popen:
    script = SEARCH_SCRIPT.format(tests=str(REPO / "tests"), tmp=str(tmp_path), data=str(data), trials=TRIALS,
                                  storage=STORAGE, resume=resume)
    return subprocess.Popen([sys.executable, "-c", script], cwd=REPO, start_new_session=True,
                            env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_storage_uris_are_parsed_into_a_mirror_and_unknown_schemes_refused(tmp_path, monkeypatch):
    from automl_ad.results.remote_storage import parse_storage

    monkeypatch.setenv("AUTOML_AD_STORAGE_MIRROR", str(tmp_path / "m"))
    s3 = parse_storage("s3://bucket/a//b/")
    assert s3.uri == "s3://bucket/a/b" and s3.local == (tmp_path / "m" / "s3" / "bucket" / "a" / "b").resolve()
    assert parse_storage("gs://bucket").uri == "gs://bucket"
    assert s3.as_uri("bucket/a/b/exp/tune/t1/checkpoint_000001") == "s3://bucket/a/b/exp/tune/t1/checkpoint_000001"
    assert s3.relative_to_experiment("bucket/a/b/exp/tune/t1/c", "exp") == "tune/t1/c"
    assert s3.relative_to_experiment("s3://other/x", "exp") == "s3://other/x"
    local = parse_storage(tmp_path / "r")
    assert not local.is_remote and local.local == (tmp_path / "r").resolve()
    for bad, message in (("ftp://host/x", "ftp:// is not supported"), ("s3://", "expected s3://bucket/prefix"),
                         ("s3://b/../x", "expected s3://bucket/prefix")):
        with pytest.raises(UserError, match=f"--storage {bad}: {message}"):
            parse_storage(bad)


def test_search_on_s3_survives_losing_driver_and_mirror(tmp_path, tiny_mvtec, s3_server):
    import pyarrow.dataset as pads
    from click.testing import CliRunner
    from pyarrow.fs import FileSystem

    from automl_ad.cli import main

    mirror = Path(s3_server["AUTOML_AD_STORAGE_MIRROR"]) / "s3" / BUCKET / "runs"
    driver = _search(tmp_path, tiny_mvtec, resume=False)
    try:
        deadline = time.monotonic() + 150
        while (not any(k.startswith("runs/exp/trials/") for k in _keys("runs/exp"))
               and time.monotonic() < deadline and driver.poll() is None):
            time.sleep(0.3)
        assert driver.poll() is None, driver.communicate()[0][-3000:]
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started
        driver.wait()
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    first = [k for k in _keys("runs/exp/trials") if k.endswith(".parquet")]
    assert 1 <= len(first) < TRIALS
    assert "runs/exp/search.json" in _keys("runs/exp") and any(k.startswith("runs/exp/tune/") for k in _keys("runs/exp"))
    shutil.rmtree(mirror)  # the driver's machine is gone: only the bucket is left

    resumed = _search(tmp_path, tiny_mvtec, resume=True)
    output = resumed.communicate(timeout=240)[0]
    assert resumed.returncode == 0, output[-3000:]

    keys = _keys("runs/exp")
    # Tune's and Train's own files keep their names (Ray writes dot-named metadata there).
    ours = [k for k in keys if not k.startswith(("runs/exp/tune/", "runs/exp/train/"))]
    half_written = [k for k in ours if Path(k).name.startswith(".") or k.endswith(".tmp")]
    assert not half_written, half_written
    assert any(k.startswith("runs/exp/train/") and "/checkpoint_" in k for k in keys), \
        "Ray Train's checkpoints went to the bucket"
    filesystem, root = FileSystem.from_uri(f"{STORAGE}/exp/trials")
    rows = pads.dataset(root, filesystem=filesystem, format="parquet").to_table().to_pylist()
    ids = [r["trial_id"] for r in rows]
    assert len(ids) == len(set(ids)) == TRIALS, "every trial stored exactly once"
    assert set(ids) >= {Path(k).stem for k in first}
    # Named relative to the experiment: Tune's copy or, under Train V2, Train's own.
    assert all((r["checkpoint"] or "").startswith(("tune/", "train/")) for r in rows), [(r["checkpoint"], r["status"], r["epochs"], r["trial_id"]) for r in rows]
    with filesystem.open_input_stream(f"{BUCKET}/runs/exp/budget.json") as stream:
        ledger = json.loads(stream.read())
    assert sorted(t for t, e in ledger["trials"].items() if e["state"] == "finished") == sorted(ids)
    assert f"runs/exp/epochs/{ids[0]}.parquet" in keys and "runs/exp/optuna.db" in keys
    # A trial on a node that never had the driver's mirror fetches the frozen val set.
    from automl_ad.tuning.trainable import TrialContext, load_trial_data

    other_node = tmp_path / "other-node" / "exp"
    context = TrialContext(experiment="exp", experiment_dir=str(other_node), category="screw",
                           data_root=str(tiny_mvtec), seed=0, default_image_size=32, max_epochs=2,
                           steps_per_epoch=2, batch_size=4, storage_uri=f"{STORAGE}/exp")
    _, anomalies, _ = load_trial_data(context, 32)
    fetched = other_node / "val" / "val_anomalies_32px.safetensors"
    assert fetched.read_bytes() == (mirror / "exp" / "val" / "val_anomalies_32px.safetensors").read_bytes()
    assert len(anomalies) > 0

    # Another machine: a fresh mirror, only the bucket.
    os.environ["AUTOML_AD_STORAGE_MIRROR"] = str(tmp_path / "laptop")
    runner = CliRunner()
    board = runner.invoke(main, ["results", "--category", "screw", "--storage", STORAGE])
    assert board.exit_code == 0, board.output
    assert "leaderboard" in board.output and all(t in board.output for t in ids)
    assert (tmp_path / "laptop" / "s3" / BUCKET / "runs" / "exp" / "trials").is_dir()
    assert not (tmp_path / "laptop" / "s3" / BUCKET / "runs" / "exp" / "tune").exists(), "results pulls tables only"

    bundle = tmp_path / "bundle"
    exported = runner.invoke(main, ["export", "-c", "screw", "--storage", STORAGE, "--out", str(bundle),
                                    "--format", "onnx", "--k", "2"])
    assert exported.exit_code == 0, exported.output
    assert json.loads((bundle / "manifest.json").read_text())["members"]
    assert any(k.startswith("runs/exp/ensembles/") for k in _keys("runs/exp")), "the choice went back to the bucket"

    missing = runner.invoke(main, ["results", "--category", "washer", "--storage", STORAGE])
    assert missing.exit_code == 2 and "no stored search for category 'washer'" in missing.output
