"""`automl-ad train` end to end on a tiny built-in product."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from automl_ad.cli import main
from automl_ad.data.builtin import generate_builtin


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return generate_builtin(tmp_path_factory.mktemp("data"), ["washer"], n_train=10, n_test=6, image_size=32)


def _train(root, out, *extra):
    args = ["train", "-m", "draem", "-c", "washer", "--data", str(root), "--image-size", "32", "--epochs", "2",
            "--steps", "2", "--batch-size", "4", "-p", "rec_width=8", "-p", "disc_width=8", "--out", str(out), *extra]
    return CliRunner().invoke(main, args)


def test_train_writes_checkpoint_metrics_and_summary(tiny_root, tmp_path):
    result = _train(tiny_root, tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "objective" in result.output and "never optimised" in result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 2 and metrics["test"]["image_auroc"] is not None
    assert metrics["config"]["method_params"] == {"rec_width": 8, "disc_width": 8}
    torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)


def test_train_refuses_to_overwrite_and_resume_needs_a_checkpoint(tiny_root, tmp_path):
    assert _train(tiny_root, tmp_path / "run").exit_code == 0
    again = _train(tiny_root, tmp_path / "run")
    assert again.exit_code == 2 and "--resume" in again.output
    missing = _train(tiny_root, tmp_path / "other", "--resume")
    assert missing.exit_code == 2 and "no checkpoint" in missing.output


def test_time_limit_stops_after_the_first_epoch(tiny_root, tmp_path):
    result = _train(tiny_root, tmp_path / "run", "--time-limit", "0.0001")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 1 and metrics["stopped_by_time_limit"]


@pytest.mark.parametrize("args,needle", [
    (["-m", "nope"], "unknown method"),
    (["-m", "draem", "-p", "bogus=1"], "bogus"),
    (["-m", "draem", "-p", "novalue"], "key=value"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_root, tmp_path, args, needle):
    result = CliRunner().invoke(main, ["train", "-c", "washer", "--data", str(tiny_root), "--image-size", "32", "--out", str(tmp_path / "r"), *args])
    assert result.exit_code == 2 and needle in result.output


def test_precision_option_reaches_the_training_step(tiny_root, tmp_path):
    """--precision bf16 autocasts the step on the CPU too (other losses than auto, which is
    fp32 on a CPU); the choice is recorded with the run's config."""
    auto = _train(tiny_root, tmp_path / "auto")
    bf16 = _train(tiny_root, tmp_path / "bf16", "--precision", "bf16")
    assert auto.exit_code == 0 and bf16.exit_code == 0, bf16.output
    first = json.loads((tmp_path / "auto" / "metrics.json").read_text())
    second = json.loads((tmp_path / "bf16" / "metrics.json").read_text())
    assert first["config"]["precision"] == "auto" and second["config"]["precision"] == "bf16"
    assert [e["train_loss"] for e in first["epochs"]] != [e["train_loss"] for e in second["epochs"]]
    bad = _train(tiny_root, tmp_path / "bad", "--precision", "fp8")
    assert bad.exit_code == 2 and "--precision" in bad.output
