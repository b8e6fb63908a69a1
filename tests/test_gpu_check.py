"""benchmarks/gpu_check.py's results JSON as the GPU prior (tuning/gpu_prior.py): the
calibration cache a full run leaves -> its results JSON -> AUTOML_AD_GPU_PRIOR -> a GPU plan
whose rows say ``gpu_check`` instead of ``estimate``. The full check itself needs a GPU;
``bash benchmarks/gpu_check.sh --smoke`` runs every stage on a CPU (minutes, not here)."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from automl_ad.errors import UserError
from automl_ad.tuning import gpu_prior
from automl_ad.tuning.budget import parse_budget
from automl_ad.tuning.calibration import CALIBRATION_VERSION, SpeedBook, prior_speed
from automl_ad.tuning.planner import make_plan
from automl_ad.tuning.schedule import DataCounts, Fidelity

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ("ast", "cfa", "draem", "nsa", "patchcore", "ssae")
BUILTIN = DataCounts(fit=160, val_good=40, test=140)
GPU = "NVIDIA H100 80GB HBM3"


def _driver():
    spec = importlib.util.spec_from_file_location("gpu_check_driver", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _cache(path: Path, device: str, methods=SHIPPED, step_s: float = 0.02) -> Path:
    """A calibration cache in tuning/calibration.py's format, as ``search --plan
    --calibrate`` leaves it in a check's work folder (numbers of the right magnitude for a
    datacenter GPU; what matters here is that they reach the plan)."""
    entries = {}
    for method in methods:
        for size in (128, 256):
            backbone = "efficientnet_lite0" if method in ("ast", "cfa", "patchcore") else "-"
            scale = (size / 128) ** 2
            entries[f"gpuhost|{device}|1t|{method}|{size}px|b8|{backbone}"] = {
                "build_s": 2.0, "setup_c": 0.001 * scale, "setup_p": 1.0,
                "step_s": 0.0 if method == "patchcore" else step_s * scale,
                "infer_s": 0.002 * scale, "metrics_s": 0.004 * scale, "batch": 8,
                "measured_at": "2026-12-01T10:00:00", "torch_threads": 1}
    path.write_text(json.dumps({"version": CALIBRATION_VERSION, "entries": entries}))
    return path


def _results(tmp_path: Path, *, mode: str = "full", device: str = GPU, ok: bool = True, **cache_args) -> Path:
    driver = _driver()
    found_device, rows = driver.calibration_rows(_cache(tmp_path / "calibration.json", device, **cache_args))
    stages = {"calibration": {"ok": True, "device": found_device, "rows": rows},
              "search": {"ok": ok, **({} if ok else {"error": "exit 1"})}}
    document = driver.results_document(mode, stages, {"torch": "2.14.1"}, started=dt.datetime.now(dt.timezone.utc),
                                       seconds=400.0, deadline_s=465.0, work=tmp_path)
    out = tmp_path / "gpu_check.json"
    out.write_text(json.dumps(document))
    return out


def _gpu_plan():
    from automl_ad.tuning.search import method_inputs
    from automl_ad.tuning.space import load_space

    methods = method_inputs(load_space(list(SHIPPED)), BUILTIN.val_good)
    return make_plan(parse_budget("20gpu-m"), methods, Fidelity(), SpeedBook("gpu", None), BUILTIN,
                     devices_per_trial=1, concurrency=1)


@pytest.fixture
def no_default_prior(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.cache/automl_ad/gpu_prior.json
    monkeypatch.delenv(gpu_prior.GPU_PRIOR_ENV, raising=False)


def test_calibration_rows_read_the_cache_a_check_leaves(tmp_path):
    device, rows = _driver().calibration_rows(_cache(tmp_path / "c.json", GPU))
    assert device == GPU and len(rows) == 2 * len(SHIPPED)
    draem = next(r for r in rows if r["method"] == "draem" and r["size"] == 256)
    assert (draem["batch"], draem["backbone"], draem["step_s"]) == (8, None, pytest.approx(0.08))
    assert next(r for r in rows if r["method"] == "cfa")["backbone"] == "efficientnet_lite0"


def test_a_plan_from_the_check_s_json_no_longer_says_estimate(tmp_path, monkeypatch, no_default_prior):
    before = _gpu_plan()
    assert {e.source.split(",")[0] for e in before.entries} == {"estimate"}
    monkeypatch.setenv(gpu_prior.GPU_PRIOR_ENV, str(_results(tmp_path)))
    after = _gpu_plan()
    assert {e.source.split(",")[0] for e in after.entries} == {"gpu_check"}
    text = after.text()
    assert "estimate" not in text.split("note:")[0], "no GPU row of the plan says estimate"
    assert f"gpu_check prior from {GPU}" in text
    # the measured numbers are what the plan uses (not the estimate's)
    speed = prior_speed("draem", 256, 8, "gpu")
    assert speed.source == "gpu_check" and speed.step_s == pytest.approx(0.08) and speed.build_s == 2.0
    assert prior_speed("draem", 512, 8, "gpu").step_s == pytest.approx(0.32), "other sizes scale from the nearest"
    assert prior_speed("draem", 256, 8, "cpu").source == "prior", "the CPU prior is untouched"
    assert "gpu_check prior" in SpeedBook("gpu", None).device_label


def test_a_method_the_check_did_not_time_keeps_the_estimate(tmp_path, monkeypatch, no_default_prior):
    monkeypatch.setenv(gpu_prior.GPU_PRIOR_ENV, str(_results(tmp_path, methods=("draem", "nsa"))))
    assert prior_speed("draem", 256, 8, "gpu").source == "gpu_check"
    assert prior_speed("ssae", 256, 8, "gpu").source == "estimate"


@pytest.mark.parametrize("kind,needle", [
    ("smoke", "a smoke run that passed; only a passing full run on a GPU is a GPU prior"),
    ("failed", "a full run that failed"),
    ("cpu", "its calibration ran on cpu, not on a GPU"),
    ("missing", "no such file"),
    ("other", "not a gpu_check results JSON"),
])
def test_a_results_file_that_measured_no_gpu_is_refused(tmp_path, monkeypatch, no_default_prior, kind, needle):
    path = {"smoke": lambda: _results(tmp_path, mode="smoke", device="cpu"),
            "failed": lambda: _results(tmp_path, ok=False),
            "cpu": lambda: _results(tmp_path, device="cpu"),
            "missing": lambda: tmp_path / "nowhere.json",
            "other": lambda: _cache(tmp_path / "calibration.json", GPU)}[kind]()
    monkeypatch.setenv(gpu_prior.GPU_PRIOR_ENV, str(path))
    with pytest.raises(UserError, match=needle):
        prior_speed("draem", 256, 8, "gpu")


def test_the_default_prior_file_is_read_when_present(tmp_path, monkeypatch, no_default_prior):
    assert gpu_prior.current() is None
    target = gpu_prior.default_path()
    target.parent.mkdir(parents=True)
    target.write_text(_results(tmp_path).read_text())
    assert prior_speed("nsa", 128, 8, "gpu").source == "gpu_check"
