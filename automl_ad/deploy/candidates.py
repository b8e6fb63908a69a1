"""The candidates of a finished search: which stored trials may be shipped, their models,
their stored val scores, and the val set they are compared on (``choice.py`` decides).

Rules 1-3 of ``choice.py``'s module doc live here: the plausible trials (within noise of
the best val objective), at the largest image size among them, and the shared val set of
the anomaly families no candidate trained with.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from automl_ad.data.tiling import inference_graph
from automl_ad.data.types import ImageSet
from automl_ad.errors import DamagedCheckpoint, UserError
from automl_ad.evaluation.diversity import feature_extractor
from automl_ad.evaluation.uncertainty import within_noise
from automl_ad.evaluation.validation import val_set_for
from automl_ad.experiment import checkpoints_newest_first, read_val_scores
from automl_ad.results import store
from automl_ad.training.loop import load_trained_method


@dataclass
class Candidate:
    trial_id: str
    method: str
    synthesis: str | None
    image_size: int
    objective: float
    checkpoint: Path
    params: dict[str, Any]
    objective_se: float | None = None

    @property
    def extractor(self) -> str:
        """``"method:backbone"``: what the candidate's scores are made of (the method
        alone for one without a backbone), ``evaluation.diversity``'s feature extractor."""
        return feature_extractor(self.method, self.params)


def load_candidate_model(candidate: Candidate, category: str) -> Any | None:
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


def _number(value: Any) -> float | None:
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return None if result != result else result


def load_candidates(folder: Path, top: int) -> list[Candidate]:
    """The plausible trials (module doc, 1-2): within noise of the best val objective,
    at the largest image size among them, best first, at most ``top``. Trials stored
    without ``objective_se`` (older searches) fall back to the top trials at the best
    one's size."""
    table = store.read_table(folder, store.TRIALS)
    if table.num_rows == 0:
        raise UserError(f"no trials stored in {folder}")
    rows = [r for r in table.to_pylist() if r.get("checkpoint") and _number(r.get("objective")) is not None
            and r.get("status") != "error"]
    if not rows:
        raise UserError(f"no trial in {folder} finished with a checkpoint")
    rows.sort(key=lambda r: (-float(r["objective"]), str(r["trial_id"])))
    best = rows[0]
    if any(_number(r.get("objective_se")) is not None for r in rows):
        plausible = [r for r in rows if within_noise(float(best["objective"]), _number(best.get("objective_se")),
                                                     float(r["objective"]), _number(r.get("objective_se")))]
        size = max(int(r["image_size"]) for r in plausible)
        picked = [r for r in plausible if int(r["image_size"]) == size][:top]
    else:
        size = int(best["image_size"])
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
            objective_se=_number(r.get("objective_se")),
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


def measure_latency_ms(model: torch.nn.Module, shape: int | tuple[int, int], repeats: int = 5) -> float:
    """Median wall time of one single-image forward pass on CPU (after a warm-up), on an
    input of ``shape`` (height, width; or a square's side)."""
    model = inference_graph(model).eval()
    height, width = (shape, shape) if isinstance(shape, int) else shape
    image = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        model(image)
        for _ in range(repeats):
            began = time.perf_counter()
            model(image)
            times.append((time.perf_counter() - began) * 1000)
    return sorted(times)[len(times) // 2]


def cached_val_scores(candidate: Candidate, val: ImageSet) -> tuple[torch.Tensor, tuple[float, float]] | None:
    """The candidate's image scores on ``val`` from its trial's last validation (and its
    val-good maps' centre and scale), or None when that did not score every image of it."""
    stored = read_val_scores(candidate.checkpoint)
    if stored is None:
        return None
    by_path = dict(zip(stored["paths"], stored["scores"]))
    if len(by_path) != len(stored["paths"]) or any(not path or path not in by_path for path in val.paths):
        return None
    scores = torch.tensor([by_path[path] for path in val.paths], dtype=torch.float32)
    return scores, (float(stored["pixel_center"]), float(stored["pixel_scale"]))


def within_latency(candidates: list[Candidate], models: dict[str, Any], shape: tuple[int, int],
                    max_latency_ms: float) -> list[Candidate]:
    """The candidates whose single-image CPU latency fits ``max_latency_ms``."""
    latency = {c.trial_id: measure_latency_ms(models[c.trial_id], shape) for c in candidates}
    kept = [c for c in candidates if latency[c.trial_id] <= max_latency_ms]
    if not kept:
        raise UserError(f"no model meets --max-latency-ms {max_latency_ms}: the fastest candidate takes "
                        f"{min(latency.values()):.1f} ms")
    return kept
