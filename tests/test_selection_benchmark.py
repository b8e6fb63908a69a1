"""benchmarks/selection.py on a finished search: every rule's detector, its test AUROC
and its regret are what the stored scores say (the numbers docs/search.md quotes)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from automl_ad.data.dataset import load_category
from automl_ad.evaluation.metrics import image_auroc
from automl_ad.experiment import read_record, write_test_predictions
from automl_ad.results import store
from automl_ad.training.loop import load_trained_method, predict
from conftest import TINY_EXPERIMENT_CATEGORY, TINY_EXPERIMENT_SIZE, build_tiny_experiment

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "selection.py"


def _selection_module():
    spec = importlib.util.spec_from_file_location("selection_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> tuple[Path, dict[str, float], dict[str, float]]:
    """A finished search whose trials kept their test scores, as the search driver keeps
    them after the search; (folder, test AUROC per trial, val objective per trial)."""
    folder, _ = build_tiny_experiment(tmp_path_factory.mktemp("selection"))
    record = read_record(folder)
    data = load_category(Path(record["data"]), TINY_EXPERIMENT_CATEGORY, TINY_EXPERIMENT_SIZE, seed=0,
                         cache_dir=folder / "cache")
    tests, objectives = {}, {}
    for row in store.read_table(folder, store.TRIALS).to_pylist():
        if row["status"] == "error":
            continue
        method, _ = load_trained_method(Path(row["checkpoint"]), TINY_EXPERIMENT_CATEGORY)
        maps, scores = predict(method, data.test.images, torch.device("cpu"), 16)
        write_test_predictions(folder, row["trial_id"], scores, maps)
        tests[row["trial_id"]] = image_auroc(scores, data.test.labels)
        objectives[row["trial_id"]] = float(row["objective"])
    return folder, tests, objectives


def test_each_rule_reports_the_test_auroc_and_regret_of_the_detector_it_picks(searched):
    folder, tests, objectives = searched
    summary = _selection_module().summarise(folder)
    assert summary["trials"] == len(tests) == 3
    assert summary["best_trial_test"] == pytest.approx(max(tests.values()), abs=1e-4)
    rules = summary["rules"]
    best_on_val = max(objectives, key=lambda t: (objectives[t], t))
    assert rules["best-val"]["members"] == [f"{best_on_val}:cfa@{TINY_EXPERIMENT_SIZE}"]
    # a single trial's detector scores what that trial scored on the test set
    assert rules["best-val"]["test"] == pytest.approx(tests[best_on_val], abs=1e-4)
    assert rules["shipped"]["members"][0] == rules["best-val"]["members"][0]
    assert 1 <= len(rules["shipped"]["members"]) <= 3
    for name, rule in rules.items():
        assert rule["regret"] == pytest.approx(summary["best_trial_test"] - rule["test"], abs=1e-9), name
        if len(rule["members"]) == 1:
            assert rule["regret"] >= -1e-9, name


def test_the_script_prints_the_regret_table(searched, tmp_path):
    folder, _, _ = searched
    out = tmp_path / "selection.json"
    done = subprocess.run([sys.executable, str(SCRIPT), str(folder), "--json", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert TINY_EXPERIMENT_CATEGORY in done.stdout and "max regret" in done.stdout and "shipped" in done.stdout
    assert out.is_file() and '"rules"' in out.read_text()
