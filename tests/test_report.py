"""The HTML search report, checked as a person would: a tiny real experiment (three trained
trials, frozen val anomalies, an exported bundle), the report built from it, and the page
rendered in headless Chromium with its plots counted and its console watched."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from automl_ad.errors import UserError
from conftest import TINY_EXPERIMENT_CATEGORY as CATEGORY
from conftest import TINY_EXPERIMENT_FAILED_TRIAL as FAILED_TRIAL
from conftest import TINY_EXPERIMENT_SIZE as SIZE
from conftest import TINY_EXPERIMENT_TRIALS as TRIALS
from conftest import build_tiny_experiment


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> tuple[Path, Path]:
    return build_tiny_experiment(tmp_path_factory.mktemp("report"))


def _artifact_dir() -> Path:
    return Path(os.environ.get("REPORT_ARTIFACT_DIR", Path(__file__).parent / "artifacts"))


@pytest.mark.slow  # a headless Chromium
def test_report_page_renders_offline_with_every_plot(experiment, tmp_path):
    """The page a person opens: built through the CLI, rendered by Chromium from a file
    URL; every plot and overlay decodes, no script error, one screenshot kept."""
    import numpy as np
    from click.testing import CliRunner
    from PIL import Image

    import browser
    from automl_ad.cli import main
    from automl_ad.data.dataset import load_category

    browser.require_chromium()
    folder, bundle = experiment
    out = tmp_path / "page" / "report.html"
    result = CliRunner().invoke(main, ["report", "--category", CATEGORY, "--storage", str(folder.parent),
                                       "--bundle", str(bundle), "--out", str(out)])
    assert result.exit_code == 0, result.output
    page = out.read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page, "the page must not load anything from the network"
    assert not list(out.parent.glob(".*.tmp")), "temporary file left behind"
    for trial_id, *_ in TRIALS:
        assert trial_id in page
    assert FAILED_TRIAL in page and "out of memory" in page

    test = load_category(Path(json.loads((folder / "search.json").read_text())["data"]), CATEGORY, SIZE).test
    defect_types = [t for t, label in zip(test.defect_types, test.labels.tolist()) if label == 1]
    expected_overlays = sum(min(4, defect_types.count(t)) for t in set(defect_types))
    expected_overlays += min(4, int((test.labels == 0).sum()))
    plots = 6  # progress, val-vs-test, method, backbone, importances, ROC

    seen, stderr = browser.probe_page(out)
    images = seen["images"]
    assert len(images) == plots + expected_overlays
    assert all(img["src"].startswith("data:image/png;base64") for img in images)
    assert all(img["complete"] and img["width"] > 0 and img["height"] > 0 for img in images), images
    assert seen["errors"] == [] and browser.uncaught_errors(stderr) == []
    assert seen["headings"][:2] == ["Leaderboard", "Search progress"]
    assert "The deployed model" in seen["headings"]

    shot = browser.screenshot(out, _artifact_dir() / "report.png")
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (4000, 1280)
    assert (pixels < 128).mean() > 0.01, "the screenshot is (nearly) blank"


def test_deployed_model_scores_are_what_predict_says(experiment):
    """The ROC and overlays use the bundle's ONNX graph exactly as `predict` does on files."""
    import numpy as np

    from automl_ad.deploy.export import load_bundle
    from automl_ad.deploy.predict import predict_files
    from automl_ad.deploy.report import scored_sets

    folder, bundle_dir = experiment
    bundle = load_bundle(bundle_dir)
    sets, notes = scored_sets(folder, bundle)
    assert notes == []
    by_name = {s.name: s for s in sets}
    assert set(by_name) == {"val", "test"}
    test = by_name["test"]
    from_files = predict_files(bundle, [Path(p) for p in test.paths])
    np.testing.assert_allclose(test.scores, [p.score for p in from_files], rtol=1e-5, atol=1e-5)
    val = by_name["val"]
    families = set(bundle.manifest["val_anomaly_families"])
    assert {t for t in val.defect_types if t != "good"} == families
    # The bundle's threshold was calibrated (in PyTorch) on exactly this val set: the same
    # recall and false alarms on it. F1-max puts the threshold exactly on a val score, and
    # the exported graph differs from the offline fusion by ~1e-4 (z-score units), so a
    # score at the threshold may fall either side of it.
    point = bundle.manifest["operating_point"]
    for label, key in ((1, "val_recall"), (0, "val_false_alarm_rate")):
        scores = val.scores[val.labels == label]
        strict = float((scores >= bundle.threshold + 1e-3).mean())
        lenient = float((scores >= bundle.threshold - 1e-3).mean())
        assert strict - 1e-9 <= point[key] <= lenient + 1e-9, (key, strict, point[key], lenient)


def test_spearman_text_says_na_when_undefined():
    from automl_ad.deploy.report import spearman_text

    assert spearman_text([0.1, 0.2], [0.3, 0.4]) == "n/a"
    assert spearman_text([0.1, 0.2, 0.3], [0.5, 0.5, 0.5]) == "n/a"
    assert spearman_text([0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.9, 1.0]) == "1.00"
    assert spearman_text([0.1, 0.2, 0.3, 0.4], [0.9, 0.6, 0.5, 0.1]) == "-1.00"


def test_importances_find_the_parameter_that_drives_the_objective():
    import numpy as np

    from automl_ad.deploy.report import param_importances

    rng = np.random.default_rng(0)
    rows = []
    for index in range(16):
        lr, width = float(10 ** rng.uniform(-5, -3)), int(rng.choice([8, 16, 32]))
        rows.append({"trial_id": f"t{index}", "method": "draem", "status": "finished",
                     "objective": width / 32 + 0.01 * float(rng.normal()),
                     "params": {"method": "draem", "draem.lr": lr, "draem.rec_width": width, "image_size": 32}})
    importances = param_importances(rows)
    assert set(importances) == {"draem.lr", "draem.rec_width"}  # image_size never varied
    assert importances["draem.rec_width"] > 0.8
    assert param_importances(rows, seed=0) == importances
    assert param_importances(rows[:2]) == {}


def test_report_command_refuses_bad_input_in_one_line(experiment, tmp_path):
    from click.testing import CliRunner

    from automl_ad.cli import main

    folder, _ = experiment
    runner = CliRunner()
    missing_bundle = runner.invoke(main, ["report", "-c", CATEGORY, "--storage", str(folder.parent), "-e", folder.name,
                                          "--bundle", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r.html")])
    assert missing_bundle.exit_code == 2 and "nowhere" in missing_bundle.output
    assert len(missing_bundle.output.strip().splitlines()) == 1
    missing_experiment = runner.invoke(main, ["report", "-c", CATEGORY, "--storage", str(folder.parent), "-e", "nope",
                                              "--out", str(tmp_path / "r.html")])
    assert missing_experiment.exit_code == 2 and "nope" in missing_experiment.output
    assert not (tmp_path / "r.html").exists()
    with pytest.raises(UserError, match="search.json"):
        from automl_ad.deploy.report import build_report

        build_report(tmp_path, tmp_path / "r.html")


def test_report_shows_and_times_each_section(experiment, tmp_path):
    """Each slow section is a step; scoring and the heat-map tiles count their work."""
    import io

    from automl_ad.deploy.export import load_bundle
    from automl_ad.deploy.progress import DeployProgress
    from automl_ad.deploy.report import build_report, gallery_indices, scored_sets

    folder, bundle_dir = experiment
    log = io.StringIO()
    progress = DeployProgress(file=log, plain_every_s=0)  # a count line for every unit of work
    build_report(folder, tmp_path / "r.html", bundle_dir=bundle_dir, progress=progress)
    sets, _ = scored_sets(folder, load_bundle(bundle_dir))
    images = {s.name: len(s.scores) for s in sets}
    tiles = len(gallery_indices(next(s for s in sets if s.name == "test")))
    scoring = f"report: scoring val ({images['val']}) and test ({images['test']}) images with the bundle's ONNX graph"
    assert [t.name for t in progress.timings] == [
        "report: check and load the bundle", "report: leaderboard and search plots (4 trials)",
        "report: parameter importances (fANOVA)", scoring, "report: ROC curves", "report: heat-map tiles"]
    lines = log.getvalue().splitlines()
    assert f"report: heat-map tiles {tiles - 1}/{tiles}" in lines and f"report: heat-map tiles 1/{tiles}" in lines
    assert f"{scoring} {images['val']}/{images['val'] + images['test']}" in lines  # after the val batch
    assert (tmp_path / "r.html").is_file()


def test_ship_runs_every_step_under_one_progress(experiment, tmp_path):
    """ship's progress reaches export_bundle through export_choice, which takes none."""
    from automl_ad.deploy.pipeline import ship
    from automl_ad.deploy.progress import DeployProgress

    folder, _ = experiment
    progress = DeployProgress(quiet=True)
    bundle = tmp_path / "bundle"
    shipped = ship(folder, folder.name, CATEGORY, bundle, k=2, progress=progress)
    assert shipped.report == bundle / "report.html" and shipped.report.is_file()
    top = [t.name for t in progress.timings if t.depth == 0]
    assert top == ["ensemble: choose among the best trials (k=2)", f"export: bundle to {bundle}", "report"]
    seconds = progress.seconds()
    assert {"export: ONNX graph", "export: checksums", "report: heat-map tiles"} <= set(seconds)
    assert seconds[f"export: bundle to {bundle}"] >= seconds["export: ONNX graph"]
    # The val scores the threshold was calibrated on are reused: only test goes through the graph.
    assert "report: scoring test (8) images with the bundle's ONNX graph" in seconds
    assert "Except on val: the val curve uses the scores the threshold was calibrated on" in shipped.report.read_text()


def test_val_scores_from_the_caller_replace_the_graph_only_when_they_are_its_scores(experiment):
    import numpy as np

    from automl_ad.deploy.export import load_bundle
    from automl_ad.deploy.report import scored_sets

    folder, bundle_dir = experiment
    bundle = load_bundle(bundle_dir)
    graph = {s.name: s for s in scored_sets(folder, bundle)[0]}
    val = graph["val"]
    given = val.scores + np.float32(2e-4)  # what PyTorch gives: the graph's scores within float noise
    sets, notes = scored_sets(folder, bundle, val_scores=given, val_labels=val.labels)
    reused = {s.name: s for s in sets}
    assert reused["val"].maps is None and np.array_equal(reused["val"].scores, given)
    assert reused["test"].maps is not None and np.array_equal(reused["test"].scores, graph["test"].scores)
    assert any(n.startswith("Except on val") for n in notes)
    order = np.argsort(val.labels, kind="stable")[::-1].copy()  # same labels, scores of other images
    wrong = [(val.scores + 1.0, val.labels), (val.scores[:-1], val.labels[:-1]), (val.scores[order], val.labels)]
    for scores, labels in wrong:
        sets, notes = scored_sets(folder, bundle, val_scores=scores, val_labels=labels)
        fallback = {s.name: s for s in sets}["val"]
        assert fallback.maps is not None and np.array_equal(fallback.scores, val.scores)
        assert not any(n.startswith("Except on val") for n in notes)
