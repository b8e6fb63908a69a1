"""The Python API (automl_ad.api, docs/api.md): plan, search, the result's leaderboard,
verdict, ensemble/export/report, load + predict on every input form, refusals, and the
quick-start notebook run end to end in its own kernel."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, TINY_EXPERIMENT_CATEGORY, build_tiny_experiment, tiny_space_dir

import automl_ad as ad
from automl_ad.errors import UserError


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> dict[str, Path]:
    """A finished search on disk (three CFA trials and a failed one) and its bundle, without Ray."""
    root = tmp_path_factory.mktemp("finished")
    folder, bundle = build_tiny_experiment(root)
    return {"root": root, "folder": folder, "storage": folder.parent, "bundle": bundle,
            "data": root / "data" / TINY_EXPERIMENT_CATEGORY}


def test_import_automl_ad_stays_light_and_offers_the_api():
    code = ("import sys, automl_ad as ad; heavy = [m for m in ('torch', 'ray', 'onnxruntime') if m in sys.modules]; "
            "assert not heavy, heavy; assert ad.search is ad.api.search and 'load' in dir(ad); "
            "assert 'torch' not in sys.modules and 'ray' not in sys.modules")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        ad.nonsense  # noqa: B018


def test_plan_needs_no_training_and_no_ray(tmp_path, tiny_mvtec, monkeypatch):
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("a plan starts no Ray")

    monkeypatch.setattr(ray, "init", no_ray)  # whether or not this test session's Ray is up
    schedule = ad.plan("screw", "10m", data=tiny_mvtec, image_size=32, space_dir=tiny_space_dir(tmp_path / "spaces"),
                       storage=tmp_path / "results")
    assert {e.method for e in schedule.entries} == {"draem", "ssae"}
    for entry in schedule.entries:
        assert entry.image_size == 32 and entry.steps > 0 and entry.expected_trials > 0
        assert all(costs["fixed"] > 0 and costs["round"] > 0 for costs in entry.costs.values())
    assert schedule.text().startswith("plan: budget 10m")
    assert not (tmp_path / "results").exists(), "a plan writes nothing"


def test_search_returns_a_result_with_the_leaderboard_verdict_and_chosen_model(tmp_path, tiny_mvtec, ray_session):
    from automl_ad.results import leaderboard, store

    result = ad.search("screw", "3trials", data=tiny_mvtec, storage=tmp_path / "results", experiment="api",
                       image_size=32, seed=0, use_ray_train=False, space_dir=tiny_space_dir(tmp_path / "spaces"))
    assert ray_session.is_initialized(), "a Ray instance the caller started is left running"
    assert (result.category, result.experiment, result.folder) == ("screw", "api", tmp_path / "results" / "api")
    assert result.summary is not None and result.summary.trials == 3
    rows = store.read_table(result.folder).to_pylist()
    board = result.leaderboard()
    assert list(board.index) == [1, 2, 3]
    assert sorted(board["trial_id"]) == sorted(r["trial_id"] for r in rows)
    assert list(board["trial_id"]) == [r["trial_id"] for r in leaderboard.ranked(rows)]
    assert set(board["method"]) <= {"draem", "ssae"} and all(isinstance(p, dict) for p in board["params"])
    scored = board["objective"].dropna()
    assert list(scored) == sorted(scored, reverse=True)
    assert result.best["trial_id"] == board.iloc[0]["trial_id"]
    verdict = result.spearman
    assert verdict.text == leaderboard.verdict(rows) and verdict.trials <= 3
    assert result.leaderboard_text().count("\n") > 3 and verdict.text in " ".join(result.leaderboard_text().split())

    again = ad.open_search("screw", storage=tmp_path / "results")
    assert again.experiment == "api" and list(again.leaderboard()["trial_id"]) == list(board["trial_id"])
    shipped = again.ship(tmp_path / "models" / "screw", k=2)
    assert again.chosen is shipped.choice and set(shipped.choice.members) <= set(board["trial_id"])
    assert shipped.report.is_file() and (tmp_path / "models" / "screw" / "manifest.json").is_file()


def test_ensemble_export_report_as_methods_of_a_stored_search(finished, tmp_path):
    from automl_ad.results import store

    result = ad.open_search(TINY_EXPERIMENT_CATEGORY, storage=finished["storage"])
    assert result.experiment == finished["folder"].name and result.data_root == finished["data"].parent
    choice = result.ensemble(k=2, top=3)
    assert result.chosen is choice and choice.kind in ("single", "ensemble")
    assert len(store.read_table(result.folder, "ensembles").to_pylist()) >= 1, "the choice is stored"
    detector = result.export(tmp_path / "bundle", choice=choice, formats=["onnx"], fpr=0.05)
    assert isinstance(detector, ad.Detector) and detector.folder == tmp_path / "bundle"
    assert [m["trial_id"] for m in detector.manifest["members"]] == [c.trial_id for c in choice.candidates]
    assert detector.manifest["operating_point"]["rule"].startswith("fpr")
    assert set(detector.manifest["files"]) == {"onnx"}
    page = result.report(tmp_path / "r.html", bundle=detector.folder)
    assert page == tmp_path / "r.html" and "<html" in page.read_text()[:400].lower()


def test_predict_on_a_path_a_pil_image_and_an_array_gives_the_same_score(finished, tmp_path):
    detector = ad.load(finished["bundle"])
    paths = sorted((finished["data"] / "test").glob("*/*.png"))[:3]
    path = paths[0]
    pixels = np.asarray(Image.open(path).convert("RGB"))
    forms = [path, str(path), Image.open(path), pixels, pixels.astype(np.float32) / 255.0, pixels[None]]
    singles = [detector.predict(form) for form in forms]
    for one in singles:
        assert len(one) == 1 and one.maps.shape == (1, detector.image_size, detector.image_size)
        np.testing.assert_allclose(one.scores, singles[0].scores, rtol=1e-6)
        np.testing.assert_allclose(one.maps, singles[0].maps, rtol=1e-5, atol=1e-6)
        assert one.anomalous[0] == bool(one.scores[0] >= detector.threshold)
    mixed = detector.predict([paths[1], Image.open(paths[2]), pixels], batch_size=2)
    assert mixed.sources == [str(paths[1]), "PIL image #1", "array #2"]
    files = detector.predict_files(paths[1:3] + [path])  # what `automl-ad predict` prints
    np.testing.assert_allclose(mixed.scores, [f.score for f in files], rtol=1e-5)
    assert list(mixed.anomalous) == [f.anomalous for f in files]
    assert mixed.overlay(0).shape == (detector.image_size, detector.image_size, 3)
    assert list(mixed.to_frame().columns) == ["source", "score", "anomalous"]


def test_bad_input_is_one_user_error(finished, tmp_path):
    from automl_ad.results import store

    detector = ad.load(finished["bundle"])
    rgb = np.zeros((32, 32, 3), np.uint8)
    cases = [
        (lambda: detector.predict(tmp_path / "missing.png"), "image file not found"),
        (lambda: detector.predict(rgb.transpose(2, 0, 1)), "channels first"),
        (lambda: detector.predict(rgb.astype(np.float32) + 2.0), r"in \[0, 1\]"),
        (lambda: detector.predict(rgb.astype(np.int16)), "dtype int16"),
        (lambda: detector.predict(42), "cannot score an object of type int"),
        (lambda: detector.predict([]), "no images given"),
        (lambda: detector.predict(rgb, batch_size=0), "batch_size"),
        (lambda: ad.load(tmp_path), "not a model bundle"),
        (lambda: ad.search("screw", ""), "a budget is required"),
        (lambda: ad.plan("screw", "lots"), "lots"),
        (lambda: ad.open_search("gadget", storage=finished["storage"]), "no stored search for category 'gadget'"),
        (lambda: ad.open_search(TINY_EXPERIMENT_CATEGORY, experiment="nope", storage=finished["storage"]),
         "no search named 'nope'"),
    ]
    for call, message in cases:
        with pytest.raises(UserError, match=message):
            call()
    result = ad.open_search(TINY_EXPERIMENT_CATEGORY, storage=finished["storage"])
    before = len(store.read_table(result.folder, "ensembles").to_pylist())
    for kwargs, message in (({"formats": "tflite"}, "--format 'tflite'"), ({"fpr": 2.0}, "--fpr 2.0")):
        with pytest.raises(UserError, match=message):
            result.export(tmp_path / "b", **kwargs)
    assert len(store.read_table(result.folder, "ensembles").to_pylist()) == before, "refused before any work"
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    """docs/examples/quickstart.ipynb as committed (a one-minute search at 64 px on the
    built-in screw), in its own kernel: the search starts and stops its own Ray there."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(REPO / "docs" / "examples" / "quickstart.ipynb", as_version=4)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")  # figures as PNG outputs
    NotebookClient(notebook, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = {index: cell.get("outputs", []) for index, cell in enumerate(notebook.cells) if cell.cell_type == "code"}
    assert not any(o.get("output_type") == "error" for cell in outputs.values() for o in cell)
    text = "".join(o.get("text", "") for cell in outputs.values() for o in cell if o.get("output_type") == "stream")
    assert "plan: budget 1m" in text and "Spearman(val objective, test image AUROC)" in text
    assert any("image/png" in o.get("data", {}) for cell in outputs.values() for o in cell), "the heat maps"
    assert any("text/html" in o.get("data", {}) and "trial_id" in o["data"]["text/html"]
               for cell in outputs.values() for o in cell), "the leaderboard DataFrame"
    assert (tmp_path / "models" / "screw" / "manifest.json").is_file()
    assert (tmp_path / "models" / "screw" / "report.html").is_file()
    assert len(list((tmp_path / "results").glob("screw-*/trials/*.parquet"))) >= 1
