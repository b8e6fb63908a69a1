"""One self-contained HTML page per search: what was tried, what won, what the model sees.

The page reads the experiment folder (``trials`` table, ``search.json``, the frozen val
anomalies) and, when there is one, the exported bundle. Plots are matplotlib figures
embedded as base64 PNG, so the file opens from disk with no server, no internet and no
JavaScript. Scores of the deployed model are recomputed by running the bundle's ONNX
graph, i.e. exactly what ``predict`` would say, on the val set the threshold was
calibrated on and on the real test split (reported, never used for selection).
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from automl_ad.param_keys import METHOD, method_key, split_config, synthesis_key
from automl_ad import experiment
from automl_ad.data.dataset import load_category
from automl_ad.data.geometry import shape_text
from automl_ad.deploy.export import load_bundle
from automl_ad.deploy.predict import heat_overlay
from automl_ad.deploy.progress import DeployProgress, resolve
from automl_ad.errors import UserError, writing
from automl_ad.evaluation.validation import val_set_for
from automl_ad.jsonio import read_json
from automl_ad.results import leaderboard, store

EXAMPLES_PER_GROUP = 4  # overlays shown per defect type, and false alarms
THUMBNAIL_PX = 160  # overlays are upscaled (nearest) so 32-64 px images stay legible
MIN_TRIALS_FOR_IMPORTANCE = 3

HOW_TO_READ = """
<p><b>How to read this page.</b> The search trained many models (<i>trials</i>), each a
method (DRAEM, NSA, CFA, AST, SSAE), a backbone and a synthetic-anomaly recipe, and scored
each on a <i>validation</i> set made only of good training images plus synthetic defects.
The <b>objective</b> (higher is better, at most 1) is that validation score; the search
never looked at your real defective images. The <b>test</b> columns use your real test
split and are shown so you can check that the objective points the right way: if the
val-vs-test plot shows no relation, trust the test numbers and collect a few real defects
for <code>--val-defects</code>. The <b>deployed model</b> section shows the bundle you
would ship: its ROC curves (how many defects it catches for each false-alarm rate), the
threshold it will use, and heat maps of where it sees anomalies. Look first at the
<i>worst misses</i> (defective parts with the lowest scores) and the <i>false alarms</i>
(good parts with the highest scores): they tell you what the model does not understand.</p>
"""

_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', Roboto, Arial, sans-serif; margin: 24px auto;
       max-width: 1320px; color: #1d1d1f; line-height: 1.45; padding: 0 16px; }
h1 { margin-bottom: 4px; } h2 { margin-top: 36px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.meta { color: #555; } .note { color: #555; font-size: 0.9em; }
table { border-collapse: collapse; font-size: 0.8em; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 5px; text-align: right; vertical-align: top; }
th { background: #f3f3f6; position: sticky; top: 0; } td.text { text-align: left; }
tr.deployed td { background: #e8f5e9; font-weight: 600; } tr.error td { color: #a33; }
td.params { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.9em; max-width: 360px; }
.summary td:first-child { text-align: left; font-weight: 600; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; } figure.tile { width: 336px; }
figure.tile img { image-rendering: pixelated; }
figcaption { font-size: 0.8em; color: #333; }
.bad { color: #b00020; font-weight: 600; } .good { color: #1b7f3b; font-weight: 600; }
img.plot { max-width: 100%; height: auto; }
.scroll { overflow-x: auto; }
.groups { display: flex; flex-wrap: wrap; column-gap: 28px; } h4 { margin: 14px 0 6px; }
td.params { white-space: normal; overflow-wrap: anywhere; min-width: 130px; max-width: 260px; }
"""


@dataclass
class ScoredSet:
    """The deployed model's output on one labelled set (ONNX, at the bundle's size)."""

    name: str
    images: np.ndarray  # N x S x S x 3 uint8, for display
    maps: np.ndarray | None  # N x S x S float32; None: scores given by the caller, not shown as heat maps
    scores: np.ndarray  # N float32
    labels: np.ndarray  # N int
    masks: np.ndarray  # N x S x S uint8
    defect_types: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)


# --- loading --------------------------------------------------------------------------


def load_trials(folder: Path) -> list[dict[str, Any]]:
    """Trial rows of an experiment, params decoded; UserError when there are none."""
    table = store.read_table(folder, store.TRIALS)
    if table.num_rows == 0:
        raise UserError(f"no trials stored in {folder / store.TRIALS}; has the search finished a trial?")
    rows = table.to_pylist()
    for row in rows:
        raw = row.get("params")
        try:
            row["params"] = json.loads(raw) if isinstance(raw, str) else dict(raw or {})
        except json.JSONDecodeError:
            row["params"] = {}
    return rows


def _finished(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if _number(r.get("objective")) is not None and r.get("status") != "error"]


_number = leaderboard.number  # one rule, shared with the text leaderboard, for what counts as a value


def _timestamp(value: Any) -> dt.datetime | None:
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
    return None


# --- figures --------------------------------------------------------------------------


def _figure(width: float = 6.4, height: float = 3.6):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _img_tag(png: bytes, alt: str, css_class: str = "plot", width: int | None = None) -> str:
    encoded = base64.b64encode(png).decode("ascii")
    size = f' width="{width}"' if width else ""
    return f'<img class="{css_class}" alt="{html.escape(alt)}"{size} src="data:image/png;base64,{encoded}">'


def _figure_tag(figure, alt: str) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return _img_tag(buffer.getvalue(), alt)


def _method_colours(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    return {name: palette(i % 10) for i, name in enumerate(sorted({str(r["method"]) for r in rows}))}


def _running_best(values: Sequence[float]) -> list[float]:
    best, out = -math.inf, []
    for value in values:
        best = max(best, value)
        out.append(best)
    return out


def figure_objective_progress(rows: Sequence[dict[str, Any]]) -> str:
    """Objective per trial against end time and against cumulative budget, with the
    running best: a flat running best at the end means more budget would likely not help."""
    done = sorted(_finished(rows), key=lambda r: (_timestamp(r.get("ended")) or dt.datetime.min.replace(tzinfo=dt.timezone.utc), str(r["trial_id"])))
    figure = _figure(12, 3.8)
    by_time, by_budget = figure.subplots(1, 2)
    colours = _method_colours(done)
    all_rows = sorted(rows, key=lambda r: (_timestamp(r.get("ended")) or dt.datetime.min.replace(tzinfo=dt.timezone.utc), str(r["trial_id"])))
    spent, cumulative = 0.0, {}
    for row in all_rows:  # failed trials spend budget too
        spent += _number(row.get("budget_used")) or 0.0
        cumulative[row["trial_id"]] = spent
    objectives = [float(r["objective"]) for r in done]
    times = [_timestamp(r.get("ended")) for r in done]
    have_times = all(t is not None for t in times) and bool(times)
    if have_times:
        start = min(_timestamp(r.get("started")) or t for r, t in zip(done, times))
        x_time = [(t - start).total_seconds() / 3600 for t in times]
    else:
        x_time = list(range(1, len(done) + 1))
    x_budget = [cumulative[r["trial_id"]] for r in done]
    for axes, xs, label in ((by_time, x_time, "hours since the first trial started" if have_times else "trial (order of completion)"),
                            (by_budget, x_budget, "budget spent (cumulative budget_used)")):
        for method, colour in colours.items():
            points = [(x, y) for x, y, r in zip(xs, objectives, done) if r["method"] == method]
            if points:
                axes.scatter(*zip(*points), color=colour, label=method, s=28, zorder=3)
        if done:
            axes.step(xs, _running_best(objectives), where="post", color="black", linewidth=1, label="best so far")
        axes.set_xlabel(label)
        axes.set_ylabel("val objective")
        axes.grid(alpha=0.3)
    by_time.set_title("Objective over time")
    by_budget.set_title("Objective over budget spent")
    if done:
        by_budget.legend(fontsize=8, loc="lower right")
    return _figure_tag(figure, "objective of each trial over time and over budget spent")


def spearman_text(xs: Sequence[float], ys: Sequence[float]) -> str:
    """Spearman's rho as text (``leaderboard.spearman``'s rules); 'n/a' where undefined."""
    rho = leaderboard.spearman(xs, ys)
    return "n/a" if rho is None else f"{rho:.2f}"


def figure_val_vs_test(rows: Sequence[dict[str, Any]]) -> str:
    pairs = leaderboard.val_test_pairs(rows)
    figure = _figure(6.4, 4.2)
    axes = figure.subplots()
    colours = _method_colours([r for _, _, r in pairs])
    for method, colour in colours.items():
        points = [(x, y) for x, y, r in pairs if r["method"] == method]
        axes.scatter(*zip(*points), color=colour, label=method, s=30)
    rho = spearman_text([x for x, _, _ in pairs], [y for _, y, _ in pairs])
    axes.set_title(f"Val objective vs test image AUROC (Spearman {rho}, n={len(pairs)})")
    axes.set_xlabel("val objective (what the search optimised)")
    axes.set_ylabel("test image AUROC (real defects)")
    axes.grid(alpha=0.3)
    if pairs:
        axes.legend(fontsize=8)
    return _figure_tag(figure, f"val objective against test image AUROC, Spearman {rho}")


def figure_by_group(rows: Sequence[dict[str, Any]], key: str, title: str) -> str:
    """Box plot plus every trial as a jittered dot, objective per value of ``key``."""
    done = _finished(rows)
    groups: dict[str, list[float]] = {}
    for row in done:
        groups.setdefault(str(row.get(key) or "none"), []).append(float(row["objective"]))
    names = sorted(groups, key=lambda name: -max(groups[name]))
    figure = _figure(5.6, 0.9 + 0.4 * max(3, len(names)))
    axes = figure.subplots()
    if names:
        axes.boxplot([groups[n] for n in names], orientation="horizontal", widths=0.5, showfliers=False)
        jitter = np.random.default_rng(0)
        for position, name in enumerate(names, start=1):
            values = groups[name]
            axes.scatter(values, position + jitter.uniform(-0.12, 0.12, len(values)), s=18, color="#1f77b4", zorder=3)
        axes.set_yticks(range(1, len(names) + 1), [f"{n} ({len(groups[n])})" for n in names])
    axes.set_xlabel("val objective")
    axes.set_title(title)
    axes.grid(alpha=0.3, axis="x")
    return _figure_tag(figure, title)


# --- parameter importances ------------------------------------------------------------


def _distribution(values: list[Any]):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if numeric and all(isinstance(v, int) for v in values):
        return IntDistribution(min(values), max(values))
    if numeric:
        low, high = float(min(values)), float(max(values))
        return FloatDistribution(low, high, log=low > 0 and high / low >= 100)
    return CategoricalDistribution(sorted({json.dumps(v, sort_keys=True) for v in values}))


def param_importances(rows: Sequence[dict[str, Any]], seed: int = 0) -> dict[str, float]:
    """fANOVA importances (optuna) of the parameters every finished trial has and that
    took at least two values, on a study rebuilt from the stored trials. Empty when
    fewer than ``MIN_TRIALS_FOR_IMPORTANCE`` trials finished or nothing varied."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    done = _finished(rows)
    if len(done) < MIN_TRIALS_FOR_IMPORTANCE:
        return {}
    configs = [{k: v for k, v in r["params"].items() if v is not None} for r in done]
    shared = set.intersection(*(set(c) for c in configs))
    varying = sorted(k for k in shared if len({json.dumps(c[k], sort_keys=True) for c in configs}) > 1)
    if not varying:
        return {}
    distributions = {k: _distribution([c[k] for c in configs]) for k in varying}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    for row, config in zip(done, configs):
        params = {}
        for key in varying:
            value = config[key]
            if isinstance(distributions[key], CategoricalDistribution):
                value = json.dumps(value, sort_keys=True)  # lists and mixed types become one choice each
            elif isinstance(distributions[key], FloatDistribution):
                value = float(value)
            params[key] = value
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions,
                                                  value=float(row["objective"])))
    return dict(get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=seed)))


def figure_importances(importances: dict[str, float]) -> str:
    names = list(importances)[::-1]
    figure = _figure(6.4, 0.6 + 0.32 * max(3, len(names)))
    axes = figure.subplots()
    axes.barh(names, [importances[n] for n in names], color="#4c72b0")
    axes.set_xlabel("share of the objective's variance explained (fANOVA)")
    axes.set_title("Parameter importances")
    axes.set_xlim(0, 1)
    axes.grid(alpha=0.3, axis="x")
    return _figure_tag(figure, "parameter importances")


# --- the deployed model ---------------------------------------------------------------


def score_with_bundle(bundle: Any, images: np.ndarray, batch_size: int = 16,
                      on_batch: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(maps N x H x W, scores N) from the bundle's ONNX graph for uint8 N x 3 x H x W;
    ``on_batch(images in it)`` after each batch."""
    maps, scores = [], []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size].astype(np.float32) / 255.0
        batch_maps, batch_scores = bundle.predictor.run(chunk)
        maps.append(batch_maps)
        scores.append(batch_scores)
        if on_batch is not None:
            on_batch(len(chunk))
    if not maps:
        return np.zeros((0, *images.shape[-2:]), np.float32), np.zeros(0, np.float32)
    return np.concatenate(maps), np.concatenate(scores)


def scored_sets(folder: Path, bundle: Any, *, val_scores: np.ndarray | None = None,
                val_labels: np.ndarray | None = None, progress: DeployProgress | None = None,
                ) -> tuple[list[ScoredSet], list[str]]:
    """The bundle's val set (val-good + the frozen anomalies its threshold was calibrated
    on) and the test split, scored by the ONNX graph; plus notes for the reader.

    ``val_scores``/``val_labels``: the deployed model's scores on that val set, already
    computed by the caller (``ship``: the fused scores the threshold was calibrated on).
    With a test split to show heat maps of, they replace running the graph on every val
    image again, once two of them agree with the graph (else the graph scores all)."""
    progress = resolve(progress)
    notes: list[str] = []
    record = experiment.read_record(folder)
    size = bundle.image_size
    data = load_category(Path(record["data"]), record["category"], size, shape=bundle.shape,
                         seed=int(record.get("seed", 0)), cache_dir=experiment.cache_dir(folder))
    fingerprint = bundle.manifest.get("data_fingerprint")
    if fingerprint and fingerprint != data.fingerprint:
        notes.append(f"The data folder changed since the bundle was exported (fingerprint {fingerprint} then, "
                     f"{data.fingerprint} now): the curves below use today's files.")
    sets = []
    anomalies_file = experiment.val_anomalies_path(folder, size)
    if anomalies_file.is_file():
        anomalies = experiment.read_val_anomalies(folder, size)
        families = set(bundle.manifest.get("val_anomaly_families") or [])
        keep = [i for i, t in enumerate(anomalies.defect_types) if t != "good" and (not families or t in families)]
        sets.append(("val", val_set_for(data.val_good, anomalies.subset(keep), train_family=None)))
    else:
        notes.append(f"No frozen val anomalies at {anomalies_file}: the val curve is missing.")
    if len(data.test):
        sets.append(("test", data.test))
    known: dict[str, np.ndarray] = {}
    if sets and sets[0][0] == "val" and len(data.test) and val_scores is not None and val_labels is not None:
        difference = _spot_check(bundle, sets[0][1], np.asarray(val_scores), np.asarray(val_labels))
        if difference is not None:
            known["val"] = np.asarray(val_scores, np.float32)
            notes.append(f"Except on val: the val curve uses the scores the threshold was calibrated on (the same "
                         f"model in PyTorch; on spot checks they differ from the ONNX graph's by at most "
                         f"{difference:.1e}).")
    scored = []
    todo = [(name, image_set) for name, image_set in sets if name not in known]
    names = " and ".join(f"{name} ({len(image_set)})" for name, image_set in todo)
    with progress.step(f"report: scoring {names or 'no'} images with the bundle's ONNX graph",
                       total=sum(len(image_set) for _, image_set in todo)) as step:
        for name, image_set in sets:
            images = image_set.images.numpy()
            if name in known:
                maps, scores = None, known[name]
            else:
                maps, scores = score_with_bundle(bundle, images, on_batch=step.advance)
            scored.append(ScoredSet(
                name=name, images=images.transpose(0, 2, 3, 1), maps=maps, scores=scores,
                labels=image_set.labels.numpy(), masks=image_set.masks.numpy()[:, 0],
                defect_types=list(image_set.defect_types), paths=list(image_set.paths or [""] * len(image_set)),
            ))
    return scored, notes


SPOT_CHECK_TOLERANCE = 1e-3  # scores are z-scores; the export check holds maps to 1e-4


def _spot_check(bundle: Any, image_set: Any, scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Max |difference| between given scores and the graph's on the set's first good and
    first anomalous image, or None when they do not belong to this set (other length,
    other labels, or scores that disagree with the graph)."""
    if scores.shape != (len(image_set),) or not np.array_equal(labels, image_set.labels.numpy()):
        return None
    probes = [int(np.flatnonzero(labels == label)[0]) for label in (0, 1) if (labels == label).any()]
    _, graph = score_with_bundle(bundle, image_set.images.numpy()[probes])
    difference = float(np.abs(graph - scores[probes]).max())
    return difference if difference <= SPOT_CHECK_TOLERANCE else None


def figure_roc(sets: Sequence[ScoredSet], threshold: float) -> str:
    from sklearn.metrics import roc_auc_score, roc_curve

    figure = _figure(12, 4.4)
    panels = figure.subplots(1, max(1, len(sets)), squeeze=False)[0]
    for axes, scored in zip(panels, sets):
        both = len(set(scored.labels.tolist())) == 2
        if both:
            fpr, tpr, _ = roc_curve(scored.labels, scored.scores)
            auroc = roc_auc_score(scored.labels, scored.scores)
            axes.plot(fpr, tpr, color="#4c72b0", label=f"ROC (AUROC {auroc:.3f})")
        flagged = scored.scores >= threshold
        positives, negatives = scored.labels == 1, scored.labels == 0
        at_fpr = float(flagged[negatives].mean()) if negatives.any() else float("nan")
        at_tpr = float(flagged[positives].mean()) if positives.any() else float("nan")
        axes.scatter([at_fpr], [at_tpr], color="#d62728", zorder=4, s=50,
                     label=f"threshold {threshold:.3g}: catches {at_tpr:.0%}, false alarms {at_fpr:.0%}")
        axes.plot([0, 1], [0, 1], linestyle=":", color="grey")
        axes.set_xlim(-0.02, 1.02)
        axes.set_ylim(-0.02, 1.02)
        axes.set_xlabel("false-alarm rate (good parts flagged)")
        axes.set_ylabel("detection rate (defective parts flagged)")
        title = "val (good + synthetic defects)" if scored.name == "val" else "test (real defects)"
        axes.set_title(title + ("" if both else " - one class only"))
        axes.legend(fontsize=8, loc="lower right")
        axes.grid(alpha=0.3)
    return _figure_tag(figure, "ROC curves of the deployed model with its threshold on val and test")


def _map_range(sets: Sequence[ScoredSet]) -> tuple[float, float]:
    """One colour scale for every overlay: from a typical good pixel to a strong defect
    pixel, so a calm map on a good part looks calm instead of stretched to full colour."""
    mapped = [s for s in sets if s.maps is not None]
    good = np.concatenate([s.maps[s.labels == 0].ravel() for s in mapped] or [np.zeros(1, np.float32)])
    every = np.concatenate([s.maps.ravel() for s in mapped] or [np.zeros(1, np.float32)])
    low = float(np.percentile(good, 50)) if good.size else float(every.min())
    high = float(np.percentile(every, 99.9))
    return low, max(high, low + 1e-6)


def side_by_side_png(image: np.ndarray, heat: np.ndarray, mask: np.ndarray | None,
                     value_range: tuple[float, float]) -> bytes:
    """Original | ``predict.heat_overlay`` on the page's shared scale, ground-truth outline
    in white; upscaled for display."""
    import cv2

    blended = heat_overlay(image, heat, value_range)
    factor = max(1, THUMBNAIL_PX // max(image.shape[:2]))
    big = lambda array: cv2.resize(array, None, fx=factor, fy=factor, interpolation=cv2.INTER_NEAREST)  # noqa: E731
    left, right = big(np.ascontiguousarray(image)), big(blended)
    if mask is not None and mask.any():
        contours, _ = cv2.findContours(big(mask.astype(np.uint8)), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(right, contours, -1, (255, 255, 255), 1)
        cv2.drawContours(left, contours, -1, (255, 255, 255), 1)
    gap = np.full((left.shape[0], 4, 3), 255, np.uint8)
    ok, encoded = cv2.imencode(".png", np.concatenate([left, gap, right], axis=1)[:, :, ::-1])
    if not ok:
        raise RuntimeError("could not encode an overlay PNG")
    return encoded.tobytes()


def _tile(scored: ScoredSet, index: int, threshold: float, value_range: tuple[float, float]) -> str:
    score = float(scored.scores[index])
    defective = int(scored.labels[index]) == 1
    flagged = score >= threshold
    if defective:
        verdict = '<span class="good">caught</span>' if flagged else '<span class="bad">missed</span>'
    else:
        verdict = '<span class="bad">false alarm</span>' if flagged else '<span class="good">passed</span>'
    name = Path(scored.paths[index]).name if scored.paths and scored.paths[index] else f"#{index}"
    assert scored.maps is not None, "a set scored by the caller has no heat maps to show"
    png = side_by_side_png(scored.images[index], scored.maps[index], scored.masks[index] if defective else None, value_range)
    alt = f"{scored.defect_types[index]} {name} score {score:.3g}"
    return (f'<figure class="tile">{_img_tag(png, alt, "overlay", width=None)}<figcaption>'
            f"{html.escape(scored.defect_types[index])} · {html.escape(name)} · score {score:.3g} · {verdict}"
            "</figcaption></figure>")


def gallery_groups(scored: ScoredSet) -> list[tuple[str, list[int], bool]]:
    """(defect type, its defective images lowest score first, True) per type, then
    ("good", good images highest score first, False): worst misses and false alarms lead."""
    groups: dict[str, list[int]] = {}
    good: list[int] = []
    for i, (defect, label) in enumerate(zip(scored.defect_types, scored.labels)):
        (groups.setdefault(defect, []) if label == 1 else good).append(i)
    ordered = [(defect, sorted(groups[defect], key=lambda i: (float(scored.scores[i]), i)), True)
               for defect in sorted(groups)]
    if good:
        ordered.append(("good", sorted(good, key=lambda i: (-float(scored.scores[i]), i)), False))
    return ordered


def gallery_indices(scored: ScoredSet, per_group: int = EXAMPLES_PER_GROUP) -> list[int]:
    """The images :func:`overlay_gallery` draws, in page order."""
    return [i for _, index, _ in gallery_groups(scored) for i in index[:per_group]]


def overlay_gallery(scored: ScoredSet, threshold: float, value_range: tuple[float, float],
                    per_group: int = EXAMPLES_PER_GROUP, on_tile: Callable[[], None] | None = None) -> str:
    """Per defect type the lowest-scored defective images (worst misses first), then the
    highest-scored good images (false alarms first). ``on_tile`` is called per drawn tile."""
    def tiles(index: list[int]) -> str:
        drawn = []
        for i in index[:per_group]:
            drawn.append(_tile(scored, i, threshold, value_range))
            if on_tile is not None:
                on_tile()
        return '<div class="grid">' + "".join(drawn) + "</div></div>"

    parts = []
    for defect, index, defective in gallery_groups(scored):
        if not defective:
            alarms = sum(float(scored.scores[i]) >= threshold for i in index)
            parts.append(f"<div><h4>good: {alarms} of {len(index)} false alarms (highest scores first)</h4>" + tiles(index))
        else:
            missed = sum(float(scored.scores[i]) < threshold for i in index)
            parts.append(f"<div><h4>{html.escape(defect)}: {missed} of {len(index)} missed (lowest scores first)</h4>"
                         + tiles(index))
    return '<div class="groups">' + "\n".join(parts) + "</div>"


# --- tables ---------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 4) -> str:
    number = _number(value)
    if number is None:
        return "–"
    return f"{number:.{digits}f}"


def _short_params(row: dict[str, Any]) -> str:
    method = str(row.get("method"))
    split = split_config({**row["params"], METHOD: method}, 0)
    labelled = [(method_key(method, name), name, value) for name, value in split.method_params.items()
                if name != "backbone"]
    labelled += [(synthesis_key(str(split.synthesis), name),) * 2 + (value,)
                 for name, value in split.synthesis_params.items()]
    return ", ".join(f"{label}={value:.3g}" if isinstance(value, float) else f"{label}={value}"
                     for _, label, value in sorted(labelled) if value is not None)


def leaderboard_html(rows: Sequence[dict[str, Any]], deployed: set[str]) -> str:
    ordered = leaderboard.ranked(rows)
    header = ("#", "trial", "method", "backbone", "synthesis", "size", "status", "epochs", "objective",
              "val img AUROC", "val AUPRO", "test img AUROC", "test px AUROC", "test AUPRO", "budget", "wall s", "parameters")
    lines = ["<table><thead><tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr></thead><tbody>"]
    for rank, row in enumerate(ordered, start=1):
        css = "deployed" if row["trial_id"] in deployed else ("error" if row.get("status") == "error" else "")
        details = _short_params(row)
        if row.get("error"):
            details = f"{details} — {row['error']}" if details else str(row["error"])
        cells = [
            str(rank), f'<td class="text">{html.escape(str(row["trial_id"]))}{" ★" if row["trial_id"] in deployed else ""}</td>',
            f'<td class="text">{html.escape(str(row.get("method")))}</td>',
            f'<td class="text">{html.escape(str(row.get("backbone") or "–"))}</td>',
            f'<td class="text">{html.escape(str(row.get("synthesis") or "–"))}</td>',
            str(row.get("image_size") or "–"), f'<td class="text">{html.escape(str(row.get("status")))}</td>',
            str(row.get("epochs") if row.get("epochs") is not None else "–"),
            _fmt(row.get("objective")), _fmt(row.get("val_image_auroc")), _fmt(row.get("val_aupro")),
            _fmt(row.get("test_image_auroc")), _fmt(row.get("test_pixel_auroc")), _fmt(row.get("test_aupro")),
            _fmt(row.get("budget_used"), 3), _fmt(row.get("wall_s"), 0),
            f'<td class="text params">{html.escape(details)}</td>',
        ]
        lines.append(f'<tr class="{css}">' + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in cells) + "</tr>")
    lines.append("</tbody></table>")
    return "\n".join(lines)


def _summary_html(record: dict[str, Any], rows: Sequence[dict[str, Any]], manifest: dict[str, Any] | None) -> str:
    done = _finished(rows)
    statuses: dict[str, int] = {}
    for row in rows:
        statuses[str(row.get("status"))] = statuses.get(str(row.get("status")), 0) + 1
    spent = sum(_number(r.get("budget_used")) or 0.0 for r in rows)
    best = max(done, key=lambda r: float(r["objective"]), default=None)
    items = [
        ("trials", f"{len(rows)} ({', '.join(f'{n} {s}' for s, n in sorted(statuses.items()))})"),
        ("budget", f"{spent:.3g} spent" + (f" of {record['budget']}" if record.get("budget") else "")),
        ("best trial", f"{best['trial_id']} ({best['method']}), objective {float(best['objective']):.4f}" if best else "none finished"),
    ]
    if manifest:
        members = ", ".join(f"{m.get('method')}:{m.get('trial_id')}×{m.get('weight', 1)}" for m in manifest.get("members", []))
        point = manifest.get("operating_point", {})
        val, test = manifest.get("val") or {}, manifest.get("test") or {}
        items += [
            ("deployed model", f"{manifest.get('kind')} [{members}]"),
            ("threshold", f"{_fmt(point.get('threshold'))} ({point.get('rule')}; on val: false alarms "
                          f"{_fmt(point.get('val_false_alarm_rate'), 3)}, recall {_fmt(point.get('val_recall'), 3)})"),
            ("val (selection)", f"objective {_fmt(manifest.get('val_objective'))}, image AUROC {_fmt(val.get('image_auroc'))}, "
                                f"AUPRO {_fmt(val.get('aupro'))}"),
            ("test (reported only)", f"image AUROC {_fmt(test.get('image_auroc'))}, pixel AUROC {_fmt(test.get('pixel_auroc'))}, "
                                     f"AUPRO {_fmt(test.get('aupro'))}"),
            ("latency", f"{_fmt(manifest.get('latency_ms_cpu_batch1'), 1)} ms per image (CPU, batch 1)"),
        ]
    body = "".join(f"<tr><td>{html.escape(k)}</td><td class='text'>{html.escape(v)}</td></tr>" for k, v in items)
    return f'<table class="summary"><tbody>{body}</tbody></table>'


# --- the page -------------------------------------------------------------------------


def build_report(folder: Path, out: Path, *, bundle_dir: Path | None = None, bundle_required: bool = False,
                 examples_per_group: int = EXAMPLES_PER_GROUP, val_scores: np.ndarray | None = None,
                 val_labels: np.ndarray | None = None, progress: DeployProgress | None = None) -> Path:
    """Write the HTML report of the experiment in ``folder`` to ``out`` (atomically).

    ``bundle_dir``: the exported model to show; when it is missing the model section
    says how to make one, unless ``bundle_required`` (then UserError). ``val_scores``,
    ``val_labels``: the model's val scores when the caller has them (:func:`scored_sets`).
    ``progress``: where each section is shown and timed (default: the running one, if any)."""
    progress = resolve(progress)
    folder = Path(folder)
    record = read_json(experiment.record_path(folder), f"not an experiment folder (no {experiment.SEARCH_RECORD}): {folder}")
    rows = load_trials(folder)
    bundle = None
    if bundle_dir is not None and (Path(bundle_dir) / "manifest.json").is_file():
        with progress.step("report: check and load the bundle"):
            bundle = load_bundle(Path(bundle_dir))
    elif bundle_required:
        raise UserError(f"--bundle {bundle_dir}: no manifest.json there; run `export` first")
    manifest = bundle.manifest if bundle else None
    if manifest and manifest.get("experiment") not in (None, folder.name):
        bundle_note = (f"<p class='note'>Note: this bundle was exported from experiment "
                       f"{html.escape(str(manifest.get('experiment')))}, not {html.escape(folder.name)}.</p>")
    else:
        bundle_note = ""
    deployed = {str(m.get("trial_id")) for m in (manifest or {}).get("members", [])}
    category = str(record.get("category", "?"))

    with progress.step(f"report: leaderboard and search plots ({len(rows)} trials)"):
        sections = _search_sections(record, rows, manifest, deployed, folder.name, category)
    with progress.step("report: parameter importances (fANOVA)"):
        importances = param_importances(rows, seed=int(record.get("seed", 0) or 0))
        if importances:
            sections += [
                "<p class='note'>Computed with optuna's fANOVA importance evaluator on a study rebuilt from the "
                "stored trials (distributions inferred from the values seen), over the parameters every finished "
                "trial has; parameters of only some methods are left out. With few trials these are rough.</p>",
                figure_importances(importances),
            ]
        else:
            sections.append(f"<p class='note'>Not computed: it needs at least {MIN_TRIALS_FOR_IMPORTANCE} finished "
                            "trials sharing a parameter that took two or more values.</p>")
    sections.append("<h2>The deployed model</h2>" + bundle_note)
    if bundle is None:
        sections.append(f"<p>No bundle found at {html.escape(str(bundle_dir))}. Run <code>automl-ad export "
                        f"--category {html.escape(category)}</code>, then build this report again.</p>")
    else:
        sections += _model_sections(folder, bundle, examples_per_group, progress, val_scores, val_labels)
    page = ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>automl_ad report: {html.escape(category)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(sections) + "\n</body></html>\n")
    return write_atomic(Path(out), page)


def _search_sections(record: dict[str, Any], rows: Sequence[dict[str, Any]], manifest: dict[str, Any] | None,
                     deployed: set[str], name: str, category: str) -> list[str]:
    """The page up to the parameter importances: summary, leaderboard, search plots."""
    return [
        f"<h1>Search report: {html.escape(category)}</h1>",
        f"<p class='meta'>experiment <b>{html.escape(name)}</b> · data {html.escape(str(record.get('data', '?')))}"
        f" · seed {html.escape(str(record.get('seed', '?')))} · generated {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC</p>",
        HOW_TO_READ,
        _summary_html(record, rows, manifest),
        "<h2>Leaderboard</h2>",
        "<p class='note'>Sorted by val objective. ★ and green: members of the deployed model. "
        "Test columns are reported only; the search never used them.</p>",
        '<div class="scroll">' + leaderboard_html(rows, deployed) + "</div>",
        "<h2>Search progress</h2>",
        figure_objective_progress(rows),
        "<h2>Does the val objective predict real defects?</h2>",
        "<p class='note'>Each dot is a trial. A clear rising trend (Spearman near 1) means choosing by the "
        "synthetic val objective also picks models that find the real defects.</p>",
        figure_val_vs_test(rows),
        "<h2>Methods and backbones</h2>",
        '<div class="grid">' + figure_by_group(rows, "method", "Objective per method (trials)")
        + figure_by_group(rows, "backbone", "Objective per backbone (trials)") + "</div>",
        "<h2>Parameter importances</h2>",
    ]


def _model_sections(folder: Path, bundle: Any, examples_per_group: int, progress: DeployProgress,
                    val_scores: np.ndarray | None, val_labels: np.ndarray | None) -> list[str]:
    """The deployed model: its scores on val and test, ROC curves, heat-map galleries."""
    sets, notes = scored_sets(folder, bundle, val_scores=val_scores, val_labels=val_labels, progress=progress)
    sections = [f"<p class='note'>Scores from the bundle's ONNX graph ({html.escape(str(bundle.folder))}) at "
                f"{shape_text(bundle.shape)}, exactly as <code>predict</code> computes them. The red dot is the threshold "
                f"({bundle.threshold:.4g}) the bundle uses.</p>"]
    sections += [f"<p class='note'>{html.escape(n)}</p>" for n in notes]
    with progress.step("report: ROC curves"):
        sections.append(figure_roc(sets, bundle.threshold))
    shown = [s for s in sets if s.name == "test"] or sets
    tiles = sum(len(gallery_indices(s, examples_per_group)) for s in shown)
    with progress.step("report: heat-map tiles", total=tiles) as step:
        value_range = _map_range(sets)
        for scored in shown:
            sections += [
                f"<h3>Heat maps on {'the test split' if scored.name == 'test' else 'the val set'}</h3>",
                "<p class='note'>Left: the image; right: the anomaly map (blue = normal, red = anomalous, one "
                "colour scale for every image); white outline: the true defect region.</p>",
                overlay_gallery(scored, bundle.threshold, value_range, examples_per_group, on_tile=step.advance),
            ]
    return sections


def write_atomic(out: Path, text: str) -> Path:
    with writing(out, "the report"):
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the page from colleagues
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return out
