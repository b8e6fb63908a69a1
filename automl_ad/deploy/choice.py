"""From a finished search to the model to ship: ensemble, choice, threshold, bundle.

1. Candidates: the top trials by val objective that finished with a checkpoint, at the
   image size of the best trial (members of one graph share the input size).
2. A shared val set for all candidates: val-good + the frozen val anomalies of the
   families *no* candidate trained with (each trial was validated without its own
   family; judging members on one set must keep that rule). When the candidates
   together cover every family, all frozen anomalies are used and the manifest says so.
3. Caruana selection of up to k members (``automl_ad.deploy.ensemble``); the ensemble and every
   single candidate are compared on that same val set, optionally only among those whose
   measured latency fits ``max_latency_ms``. The winner is stored in the ``ensembles``
   table and exported with its threshold calibrated on val.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from automl_ad.results import store
from automl_ad.data.dataset import load_category
from automl_ad.data.types import ImageSet, to_float
from automl_ad.deploy.ensemble import (
    EnsembleModel,
    EnsembleResult,
    MemberPredictions,
    caruana_select,
    ensemble_test_metrics,
    fuse,
)
from automl_ad.errors import DamagedCheckpoint, UserError
from automl_ad.experiment import (ENSEMBLES, cache_dir, checkpoints_newest_first, has_record, read_record,
                                  read_val_anomalies)
from automl_ad.deploy.export import calibrate_threshold, export_bundle
from automl_ad.training.loop import load_trained_method, predict
from automl_ad.evaluation.validation import val_set_for


@dataclass
class Candidate:
    trial_id: str
    method: str
    synthesis: str | None
    image_size: int
    objective: float
    checkpoint: Path
    params: dict[str, Any]


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


def _load_candidate(candidate: Candidate, category: str) -> Any | None:
    """The candidate's model from its newest usable checkpoint, or None (left out) when
    every one is damaged; each damaged checkpoint is named in one warning line."""
    for folder in checkpoints_newest_first(candidate.checkpoint):
        try:
            method, _ = load_trained_method(folder, category)
        except DamagedCheckpoint as error:
            print(f"warning: trial {candidate.trial_id}: {error}", file=sys.stderr)
            continue
        if folder != candidate.checkpoint:
            print(f"warning: trial {candidate.trial_id}: using its earlier checkpoint {folder}", file=sys.stderr)
        return method
    print(f"warning: trial {candidate.trial_id} left out: no usable checkpoint", file=sys.stderr)
    return None


def find_experiment(storage: Path, category: str, experiment: str | None) -> Path:
    storage = Path(storage)
    if experiment:
        folder = storage / experiment
        if not has_record(folder):
            raise UserError(f"no search named {experiment!r} in {storage}")
        return folder
    found = [name for name in store.list_experiments(storage, category)]
    if not found:
        raise UserError(f"no finished search of category {category!r} in {storage}; run `search` first")
    return storage / found[0]


def load_candidates(folder: Path, top: int) -> list[Candidate]:
    table = store.read_table(folder, store.TRIALS)
    if table.num_rows == 0:
        raise UserError(f"no trials stored in {folder}")
    rows = [r for r in table.to_pylist() if r.get("checkpoint") and r.get("objective") is not None and r.get("status") != "error"]
    if not rows:
        raise UserError(f"no trial in {folder} finished with a checkpoint")
    rows.sort(key=lambda r: (-float(r["objective"]), str(r["trial_id"])))
    size = int(rows[0]["image_size"])
    picked = [r for r in rows if int(r["image_size"]) == size][:top]
    return [
        Candidate(
            trial_id=str(r["trial_id"]),
            method=str(r["method"]),
            synthesis=r.get("synthesis"),
            image_size=size,
            objective=float(r["objective"]),
            checkpoint=Path(r["checkpoint"]),
            params=json.loads(r["params"]) if isinstance(r.get("params"), str) else dict(r.get("params") or {}),
        )
        for r in picked
    ]


def shared_val_set(val_good: torch.Tensor, anomalies: ImageSet, trained_families: set[str]) -> tuple[ImageSet, list[str]]:
    unused = sorted({t for t in anomalies.defect_types if t != "good"} - trained_families)
    if unused:
        keep = [i for i, t in enumerate(anomalies.defect_types) if t in unused]
        families = unused
    else:
        keep = [i for i, t in enumerate(anomalies.defect_types) if t != "good"]
        families = sorted({anomalies.defect_types[i] for i in keep})
    return val_set_for(val_good, anomalies.subset(keep), train_family=None), families


def measure_latency_ms(model: torch.nn.Module, image_size: int, repeats: int = 5) -> float:
    """Median wall time of one single-image forward pass on CPU (after a warm-up)."""
    model = model.eval()
    image = torch.rand(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        model(image)
        for _ in range(repeats):
            began = time.perf_counter()
            model(image)
            times.append((time.perf_counter() - began) * 1000)
    return sorted(times)[len(times) // 2]


def choose_model(
    folder: Path,
    *,
    k: int = 5,
    top: int = 10,
    fusion: str = "mean",
    max_latency_ms: float | None = None,
) -> Choice:
    """Ensemble the top trials and choose the deployable model on val (see module doc)."""
    record = read_record(folder)
    category, seed = record["category"], int(record.get("seed", 0))
    loaded = {c.trial_id: (c, _load_candidate(c, category)) for c in load_candidates(folder, top)}
    candidates = [c for c, method in loaded.values() if method is not None]
    if not candidates:
        raise UserError(f"no trial in {folder} has a usable checkpoint (see the warnings above)")
    size = candidates[0].image_size
    data = load_category(Path(record["data"]), category, size, seed=seed, cache_dir=cache_dir(folder))
    anomalies = read_val_anomalies(folder, size)
    trained = {c.synthesis for c in candidates if c.synthesis}
    val, families = shared_val_set(data.val_good, anomalies, trained)

    device = torch.device("cpu")
    models, predictions, latency = {}, [], {}
    for candidate in candidates:
        method = loaded[candidate.trial_id][1]
        models[candidate.trial_id] = method
        val_maps, val_scores = predict(method, val.images, device, 16)
        test_maps, test_scores = predict(method, data.test.images, device, 16) if len(data.test) else (None, None)
        predictions.append(MemberPredictions(candidate.trial_id, val_scores, val_maps, test_scores, test_maps))
        latency[candidate.trial_id] = measure_latency_ms(method, size)

    masks = val.masks[:, 0]
    options: list[tuple[str, EnsembleResult]] = []
    for prediction in predictions:
        if max_latency_ms is None or latency[prediction.name] <= max_latency_ms:
            options.append(("single", caruana_select([prediction], val.labels, masks, val.has_mask, k=1, fusion=fusion)))
    allowed = [p for p in predictions if max_latency_ms is None or latency[p.name] <= max_latency_ms]
    if len(allowed) > 1:
        options.append(("ensemble", caruana_select(allowed, val.labels, masks, val.has_mask, k=k, fusion=fusion)))
    if not options:
        fastest = min(latency.values())
        raise UserError(f"no model meets --max-latency-ms {max_latency_ms}: the fastest candidate takes {fastest:.1f} ms")

    kind, best = max(options, key=lambda option: (option[1].objective, option[0] == "single"))
    if kind == "ensemble" and len(set(best.members)) == 1:
        kind = "single"
    if len(data.test):
        best.test = ensemble_test_metrics(best, predictions, data.test.labels, data.test.masks[:, 0], data.test.has_mask)
    weights = best.weights
    names = list(weights)
    model = EnsembleModel([models[n] for n in names], [best.scalers[n] for n in names], [weights[n] for n in names], fusion=best.fusion)
    fused_val = model_scores_from_predictions(best, predictions)
    return Choice(
        kind=kind,
        members=names,
        weights=weights,
        val=best.val,
        objective=best.objective,
        test=best.test,
        latency_ms=measure_latency_ms(model, size),
        val_families=families,
        model=model,
        val_scores=fused_val,
        val_labels=val.labels,
        candidates=[c for c in candidates if c.trial_id in weights],
    )


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
    data = load_category(Path(record["data"]), record["category"], size, seed=int(record.get("seed", 0)), cache_dir=cache_dir(folder))
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
        "test": choice.test,
        "latency_ms_cpu_batch1": choice.latency_ms,
        "data_fingerprint": data.fingerprint,
    }
    return export_bundle(choice.model, out, image_size=size, manifest=manifest, example_images=to_float(real), formats=formats)
