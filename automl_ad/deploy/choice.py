"""From a finished search to the model to ship: which trials, single or ensemble, threshold.

The val set is small (tens of good images), so its AUROC is noisy: a choice by the larger
number among trials that differ by less than that noise is a choice by chance (on real
solar-cell photographs such a choice cost 0.055 test AUROC). The rule
(``automl_ad.evaluation.uncertainty``):

1. **Plausible trials**: those whose stored val objective is within noise of the best
   (one-sided 95 %, from each trial's ``objective_se``; unpaired, since trials at other
   sizes or with other held-out families saw other val images).
2. **Image size**: the largest size among them (a documented prior, docs/search.md "Warm
   start": finer patch grids resolve smaller defects; the val set ranks sizes weakly).
   Members of one graph share the input size.
3. **Shared val set** for the plausible trials at that size: val-good + the frozen val
   anomalies of the families *no* candidate trained with (when the candidates together
   cover every family, all of them, and the manifest says so).
4. **Ties**: a paired bootstrap over those val images (the same resample for every
   candidate) keeps the candidates not significantly worse than the best. The best joins;
   then the best on val of each other feature extractor among the tied (method +
   backbone; the best's method first); then, while places are left, the tied candidate
   among the five best on val whose val scores agree least with those already in (mean
   Spearman correlation over the shared val images), ``k`` (default 3) in all
   (``evaluation.diversity``). With two or more, the export is their equal-weight
   ensemble (robust z-score per member on val-good), unless the best single one is
   significantly better than that ensemble. Averaging detectors the val set cannot tell
   apart needs no label and does not bet on one of them; TPE's later trials sit next to
   the best one, so the three best on val were often three copies of one detector.
   Members built on other features err on other images (the PatchCore paper's
   three-backbone ensemble), a prior that does not rest on the small val set; rank
   disagreement on val fills the places left. Replayed by ``benchmarks/selection.py``
   (docs/search.md "Choosing the model", where the numbers are).

Test metrics are computed for the exported model only, reported, never used. Rules 1-3
and the candidates' models and stored scores: ``deploy/candidates.py``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from automl_ad.data.dataset import load_category
from automl_ad.data.types import ImageSet, to_float
from automl_ad.deploy.candidates import (Candidate, cached_val_scores, load_candidate_model, load_candidates,
                                         measure_latency_ms, shared_val_set, within_latency)
from automl_ad.deploy.ensemble import (
    EnsembleModel,
    EnsembleResult,
    MemberPredictions,
    RobustScaler,
    ensemble_test_metrics,
    fuse,
)
from automl_ad.deploy.export import calibrate_threshold, export_bundle
from automl_ad.errors import UserError
from automl_ad.evaluation.diversity import other_extractors_first
from automl_ad.evaluation.metrics import evaluate, f1_max, image_auroc
from automl_ad.evaluation.normalisation import robust_center_scale
from automl_ad.evaluation.uncertainty import CONFIDENCE, paired_bootstrap
from automl_ad.evaluation.validation import objective as val_objective
from automl_ad.experiment import ENSEMBLES, cache_dir, read_record, read_test_predictions, read_val_anomalies, record_shape
from automl_ad.results import store
from automl_ad.training.loop import predict


DEFAULT_MEMBERS = 3  # most members of an exported ensemble (module doc, 4)


@dataclass
class Choice:
    kind: str  # "ensemble" or "single"
    members: list[str]
    weights: dict[str, int]
    val: dict[str, float | None]
    objective: float
    test: dict[str, float | None]
    latency_ms: float
    val_families: list[str]
    model: EnsembleModel
    val_scores: torch.Tensor
    val_labels: torch.Tensor
    candidates: list[Candidate]
    # The selection's evidence: the candidates compared on the shared val set, each one's
    # 90 % bootstrap interval, those tied with the best, and the rule that decided.
    compared: list[str] = dataclasses.field(default_factory=list)
    intervals: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    tied: list[str] = dataclasses.field(default_factory=list)
    rule: str = ""


class _Quiet:
    """Progress that shows nothing (a caller without a display)."""

    @contextmanager
    def step(self, description: str, total: int | None = None) -> Iterator[Any]:
        class _Step:
            def advance(self, n: int = 1) -> None:
                pass

        yield _Step()


def choose_model(
    folder: Path,
    *,
    k: int = DEFAULT_MEMBERS,
    top: int = 10,
    fusion: str = "mean",
    max_latency_ms: float | None = None,
    progress: Any = None,
) -> Choice:
    """The deployable model of a finished search (module doc). ``progress``: an object
    with ``step(description, total)`` (``automl_ad.deploy.progress``), or None."""
    progress = progress or _Quiet()
    record = read_record(folder)
    category, seed = record["category"], int(record.get("seed", 0))
    listed = load_candidates(folder, top)
    with progress.step(f"loading {len(listed)} candidate model(s)", total=len(listed)) as step:
        loaded = {}
        for c in listed:
            loaded[c.trial_id] = (c, load_candidate_model(c, category))
            step.advance()
    candidates = [c for c, method in loaded.values() if method is not None]
    if not candidates:
        raise UserError(f"no trial in {folder} has a usable checkpoint (see the warnings above)")
    size = candidates[0].image_size
    data = load_category(Path(record["data"]), category, size, shape=record_shape(record, size), seed=seed,
                         cache_dir=cache_dir(folder))
    anomalies = read_val_anomalies(folder, size)
    models = {c.trial_id: loaded[c.trial_id][1] for c in candidates}
    if max_latency_ms is not None:
        candidates = within_latency(candidates, models, record_shape(record, size), max_latency_ms)
    trained = {c.synthesis for c in candidates if c.synthesis}
    val, families = shared_val_set(data.val_good, anomalies, trained)

    device = torch.device("cpu")
    predictions: list[MemberPredictions] = []
    pixel_stats: dict[str, tuple[float, float]] = {}
    for candidate in candidates:  # what each trial's own last validation scored
        cached = cached_val_scores(candidate, val)
        if cached is not None:
            predictions.append(MemberPredictions(candidate.trial_id, cached[0], None))
            pixel_stats[candidate.trial_id] = cached[1]
    missing = [c for c in candidates if c.trial_id not in pixel_stats]
    if missing:
        with progress.step(f"scoring {len(missing)} candidate(s) on {len(val)} val images", total=len(missing)) as step:
            for candidate in missing:
                val_maps, val_scores = predict(models[candidate.trial_id], val.images, device, 16)
                predictions.append(MemberPredictions(candidate.trial_id, val_scores, val_maps))
                step.advance()
    order = {c.trial_id: i for i, c in enumerate(candidates)}
    predictions.sort(key=lambda p: order[p.name])

    masks = val.masks[:, 0]
    good = val.labels == 0
    bootstrap = paired_bootstrap(torch.stack([p.val_scores for p in predictions]), val.labels, seed=seed)
    everyone_tied = [predictions[i] for i in bootstrap.tied_with_best()]
    best = everyone_tied[0]
    extractors = {c.trial_id: c.extractor for c in candidates}
    tied = ensemble_members(everyone_tied, k, extractors)
    single = _result([best], val, masks, good, fusion, pixel_stats)
    kind, chosen, rule = "single", single, ("the best candidate is significantly better than the others on val"
                                            if len(everyone_tied) == 1 else "k=1: the best on val alone")
    if len(tied) > 1:
        ensemble = _result(tied, val, masks, good, fusion, pixel_stats)
        fused = fuse([single_scores(ensemble, member) for member in tied], fusion)
        versus = paired_bootstrap(torch.stack([single_scores(single, best), fused]), val.labels, seed=seed)
        if versus.worse_probability(1, 0) >= CONFIDENCE:
            rule = (f"{len(tied)} candidates tied on val, but the best alone is significantly better than their "
                    "ensemble")
        else:
            kind, chosen = "ensemble", ensemble
            rule = (f"{len(everyone_tied)} candidates tied with the best on val (paired bootstrap, "
                    f"{int(CONFIDENCE * 100)} %); the best and {len(tied) - 1} of them, other backbones first, "
                    "then those whose val scores agree least: their equal-weight ensemble")
    if len(data.test):
        with progress.step(f"test metrics of the {kind} (reported, never used)", total=len(chosen.scalers)) as step:
            by_name = {p.name: p for p in predictions}
            for name in chosen.scalers:
                stored = read_test_predictions(folder, name)
                if stored is not None and len(stored[0]) == len(data.test):
                    by_name[name].test_scores, by_name[name].test_maps = stored
                else:
                    by_name[name].test_maps, by_name[name].test_scores = predict(models[name], data.test.images,
                                                                                 device, 16)
                step.advance()
        chosen.test = ensemble_test_metrics(chosen, predictions, data.test.labels, data.test.masks[:, 0],
                                            data.test.has_mask)
    weights = chosen.weights
    names = list(weights)
    model = EnsembleModel([models[n] for n in names], [chosen.scalers[n] for n in names],
                          [weights[n] for n in names], fusion=chosen.fusion)
    with progress.step("measuring latency"):
        latency = measure_latency_ms(model, tuple(data.fit.shape[-2:]))
    return Choice(
        kind=kind,
        members=names,
        weights=weights,
        val=chosen.val,
        objective=chosen.objective,
        test=chosen.test,
        latency_ms=latency,
        val_families=families,
        model=model,
        val_scores=model_scores_from_predictions(chosen, predictions),
        val_labels=val.labels,
        candidates=[c for c in candidates if c.trial_id in weights],
        compared=[p.name for p in predictions],
        intervals={p.name: bootstrap.interval(i) for i, p in enumerate(predictions)},
        tied=[p.name for p in everyone_tied],
        rule=rule,
    )


def ensemble_members(tied: Sequence[MemberPredictions], k: int,
                     extractors: Mapping[str, str] | None = None) -> list[MemberPredictions]:
    """Of the candidates tied with the best, in their val order (the best first): the best,
    the best of each other feature extractor (``extractors``: trial id -> method:backbone;
    the best's method first), then those of the first ``diversity.POOL`` whose val scores
    agree least with the ones picked, ``k`` in all (module doc, 4). ``k`` = 1: the best alone."""
    if len(tied) <= 1 or k <= 1:
        return list(tied[:1])
    kinds = [(extractors or {}).get(m.name, "") for m in tied]  # unknown: one extractor, disagreement decides
    picked = other_extractors_first(kinds, torch.stack([m.val_scores for m in tied]), k)
    return [tied[i] for i in picked]


def _result(members: Sequence[MemberPredictions], val: ImageSet, masks: torch.Tensor, good: torch.Tensor,
            fusion: str, pixel_stats: dict[str, tuple[float, float]]) -> EnsembleResult:
    """The equal-weight ensemble of ``members`` (one member: itself) on the shared val set,
    each member normalised on val-good. Members known by their trial's stored val scores
    have no maps here: the val metrics are then the image ones only."""
    scalers = {m.name: _scaler(m, good, pixel_stats) for m in members}
    scores = fuse([scalers[m.name].scores(m.val_scores) for m in members], fusion)
    if all(m.val_maps is not None for m in members):
        maps = fuse([scalers[m.name].maps(m.val_maps) for m in members], fusion)
        metrics = evaluate(scores, maps, val.labels, masks, val.has_mask)
    else:
        best_f1 = f1_max(scores, val.labels)
        metrics = {"image_auroc": image_auroc(scores, val.labels), "pixel_auroc": None, "aupro": None,
                   "f1_max": best_f1[0] if best_f1 else None, "f1_threshold": best_f1[1] if best_f1 else None}
    return EnsembleResult(members=[m.name for m in members], scalers=scalers, fusion=fusion, val=metrics,
                          objective=val_objective(metrics))


def _scaler(member: MemberPredictions, good: torch.Tensor, pixel_stats: dict[str, tuple[float, float]]) -> RobustScaler:
    if member.val_maps is not None:
        return RobustScaler.fit(member.val_scores[good], member.val_maps[good])
    return RobustScaler(*robust_center_scale(member.val_scores[good]), *pixel_stats[member.name])


def single_scores(result: EnsembleResult, member: MemberPredictions) -> torch.Tensor:
    return result.scalers[member.name].scores(member.val_scores)


def model_scores_from_predictions(result: EnsembleResult, predictions: Sequence[MemberPredictions]) -> torch.Tensor:
    by_name = {p.name: p for p in predictions}
    return fuse([result.scalers[n].scores(by_name[n].val_scores) for n in result.members], result.fusion)


def store_choice(folder: Path, choice: Choice, k: int) -> None:
    row = {
        "schema_version": 1,
        "experiment": folder.name,
        "kind": choice.kind,
        "members": json.dumps(choice.weights),
        "k": k,
        "val_families": ",".join(choice.val_families),
        **{f"val_{key}": choice.val.get(key) for key in store.METRIC_KEYS},
        "objective": choice.objective,
        **{f"test_{key}": choice.test.get(key) for key in store.METRIC_KEYS},
        "latency_ms": choice.latency_ms,
        "compared": ",".join(choice.compared),
        "tied": ",".join(choice.tied),
        "rule": choice.rule,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    store.write_rows(folder, ENSEMBLES, f"choice-k{k}", [row])


def export_choice(
    folder: Path,
    choice: Choice,
    out: Path,
    *,
    formats: Sequence[str],
    fpr: float | None = None,
) -> dict[str, Any]:
    record = read_record(folder)
    size = choice.candidates[0].image_size
    operating_point = calibrate_threshold(choice.val_scores, choice.val_labels, fpr=fpr)
    data = load_category(Path(record["data"]), record["category"], size, shape=record_shape(record, size),
                         seed=int(record.get("seed", 0)), cache_dir=cache_dir(folder))
    real = data.test.images[:4] if len(data.test) else data.val_good[:4]
    scalers = {
        name: {
            "image_center": float(choice.model.image_center[i]),
            "image_scale": float(choice.model.image_scale[i]),
            "pixel_center": float(choice.model.pixel_center[i]),
            "pixel_scale": float(choice.model.pixel_scale[i]),
        }
        for i, name in enumerate(choice.members)
    }
    manifest = {
        "category": record["category"],
        "experiment": folder.name,
        "kind": choice.kind,
        "members": [
            {"trial_id": c.trial_id, "method": c.method, "synthesis": c.synthesis, "weight": choice.weights[c.trial_id],
             "params": c.params, "val_objective": c.objective, "normalisation": scalers[c.trial_id]}
            for c in choice.candidates
        ],
        "fusion": choice.model.fusion,
        "normalisation": "robust z-score per member fitted on val-good: (x - median) / (1.4826 * MAD)",
        "operating_point": operating_point,
        "val": choice.val,
        "val_objective": choice.objective,
        "val_anomaly_families": choice.val_families,
        "selection": {
            "rule": choice.rule,
            "compared": choice.compared,
            "tied_with_best": choice.tied,
            "val_auroc_interval_90": {name: list(bounds) for name, bounds in choice.intervals.items()},
        },
        "test": choice.test,
        "latency_ms_cpu_batch1": choice.latency_ms,
        "data_fingerprint": data.fingerprint,
    }
    return export_bundle(choice.model, out, image_size=size, manifest=manifest, example_images=to_float(real), formats=formats)
