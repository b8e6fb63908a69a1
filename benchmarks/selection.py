"""Selection rules replayed on finished searches: which val signal and which rule would
have exported the better detector, measured without training anything again.

Every trial of a search keeps its val image scores (``val_scores.json`` beside its
checkpoint) and its test scores (``cache/test_predictions``). This script reads them,
fuses members the way ``deploy/ensemble.py`` does (robust z-score on val-good, equal
weights) and prints, per experiment, the test image AUROC of the detector each rule
would export, its **selection regret** (best single trial's test AUROC minus it) and the
Spearman correlation of each val signal with test AUROC. Rules see val only; test scores
are read to *report* the rules, which is what this benchmark is for (issue 21, point 2).

    python benchmarks/selection.py runs/quality/results/*/*-*/ [--json out.json]

Rules (all val-only):
  best-val        the trial with the largest val objective
  shipped         choice.py's rule (stop 37): plausible trials, largest size, the 10 best
                  there, paired-bootstrap ties; the best, the best of each other backbone
                  of its method, then of other methods, then the tied (of the 5 best) whose
                  val scores agree least with those in, 3 in all, ensembled
                  (evaluation/diversity.py)
  least-agree3    the rule of stops 33-36: the best and the tied (of the 5 best) whose val
                  scores agree least with those in, 3 in all
  tied-top3       the rule of stop 29-32: the 3 tied candidates best on val
  tied-feat3      of the tied candidates, the best on val of each method + backbone (3 at most)
  plaus-feat3     the same over every plausible trial at that size, tied or not
  tiedall-feat3   of every tied candidate (the 10 best at that size), one per method + backbone
  tiedall-bb3     the same, the best's method first (= shipped, without the fill)
  plaus-bb3       the same over every plausible trial at that size
  plaus-div3      the same diversity pick over every plausible trial at that size, tied or not
  tied-all        the rule before it: every tied candidate (at most 5) ensembled, unless the
                  best alone is significantly better
  tied-wf3        the rule of stop 28: the 3 tied candidates best on their hardest
                  synthetic family
  tied-wf2        the same, with 2 members
  wf-top3-size    the 3 best on their hardest family at that size, tied or not
  wf-tied-size    ties decided on val-good + the best trial's hardest family only
  tied-all-sizes  the same ties, but members from every plausible size (score fusion)
  top3-size       ensemble of the top three trials at the best trial's size
  all-size        ensemble of every trial at the best trial's size
  plausible       ensemble of every trial within noise of the best (any size)
  all-trials      ensemble of every trial
  worst-family    the trial whose worst per-family val AUROC is largest (ties: pooled)
  rank-family     the trial with the best mean rank over per-family val AUROCs
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from automl_ad.data.dataset import load_category  # noqa: E402
from automl_ad.evaluation.diversity import feature_extractor, least_agreeing, other_extractors_first  # noqa: E402
from automl_ad.evaluation.metrics import image_auroc  # noqa: E402
from automl_ad.evaluation.normalisation import robust_center_scale  # noqa: E402
from automl_ad.evaluation.uncertainty import CONFIDENCE, paired_bootstrap, within_noise  # noqa: E402
from automl_ad.experiment import (cache_dir, read_record, read_test_predictions, read_val_anomalies,  # noqa: E402
                                  read_val_scores, record_shape)
from automl_ad.results import store  # noqa: E402


@dataclass
class Trial:
    trial_id: str
    method: str
    size: int
    objective: float
    se: float | None
    val: dict[str, float]  # val image id -> score
    test: torch.Tensor
    features: str = ""  # method and backbone: what a member's scores are made of


def _features(row: dict) -> str:
    return feature_extractor(str(row["method"]), json.loads(row.get("params") or "{}"))


def _one_per_features(candidates: list["Trial"], k: int = 3) -> list["Trial"]:
    """The first (best on val) candidate of each method + backbone, ``k`` at most."""
    seen, out = set(), []
    for t in candidates:
        if t.features not in seen:
            seen.add(t.features)
            out.append(t)
    return out[:k]


def _one_per_backbone(candidates: list["Trial"], k: int = 3) -> list["Trial"]:
    """The first candidate, then the best on val of each other backbone of its method,
    then of each other method + backbone, ``k`` at most."""
    if not candidates:
        return []
    method = candidates[0].method
    same = [t for t in candidates if t.method == method]
    return _one_per_features(same + [t for t in candidates if t.method != method], k)


def _spearman(a: list[float], b: list[float]) -> float | None:
    if len(a) < 3:
        return None
    ra = torch.tensor(a).argsort().argsort().float()
    rb = torch.tensor(b).argsort().argsort().float()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = (ra.norm() * rb.norm()).item()
    return float((ra * rb).sum().item() / denominator) if denominator else None


class Experiment:
    """One finished search: its trials' val and test scores and the labels."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        record = read_record(folder)
        rows = [r for r in store.read_table(folder, store.TRIALS).to_pylist()
                if r.get("checkpoint") and r.get("objective") is not None and r.get("status") != "error"]
        self.category = record["category"]
        self.trials: list[Trial] = []
        for row in rows:
            stored, tested = read_val_scores(Path(row["checkpoint"])), read_test_predictions(folder, row["trial_id"])
            if stored is None or tested is None:
                continue
            self.trials.append(Trial(str(row["trial_id"]), str(row["method"]), int(row["image_size"]),
                                     float(row["objective"]), row.get("objective_se"),
                                     dict(zip(stored["paths"], stored["scores"])), tested[0].float(),
                                     _features(row)))
        self.trials.sort(key=lambda t: (-t.objective, t.trial_id))
        size = self.trials[0].size if self.trials else 256
        data = load_category(Path(record["data"]), self.category, size, shape=record_shape(record, size),
                             seed=int(record.get("seed", 0)),
                             cache_dir=cache_dir(folder))
        self.test_labels = data.test.labels
        self.val_labels: dict[str, int] = {f"val-good:{i}": 0 for i in range(len(data.val_good))}
        self.family: dict[str, str] = {}
        for size in sorted({t.size for t in self.trials}):
            anomalies = read_val_anomalies(folder, size)
            for i, label in enumerate(anomalies.labels.tolist()):
                self.val_labels[f"val-anomaly:{i}"] = int(label)
                self.family[f"val-anomaly:{i}"] = str(anomalies.defect_types[i])

    def test_auroc(self, members: list[Trial]) -> float:
        """Test image AUROC of the equal-weight ensemble of ``members`` (robust z-score on val-good)."""
        parts = []
        for t in members:
            good = torch.tensor([v for k, v in t.val.items() if self.val_labels.get(k) == 0])
            center, scale = robust_center_scale(good)
            parts.append((t.test - center) / scale)
        return image_auroc(torch.stack(parts).mean(0), self.test_labels)

    def shared(self, members: list[Trial]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        ids = sorted(set.intersection(*(set(t.val) for t in members)) & set(self.val_labels))
        scores = torch.tensor([[t.val[i] for i in ids] for t in members])
        return scores, torch.tensor([self.val_labels[i] for i in ids]), ids

    def family_aurocs(self, t: Trial) -> dict[str, float]:
        good = [k for k in t.val if self.val_labels.get(k) == 0]
        out = {}
        for family in sorted(set(self.family.values()) - {"good"}):
            bad = [k for k in t.val if self.family.get(k) == family and self.val_labels.get(k) == 1]
            if bad and good:
                scores = torch.tensor([t.val[k] for k in good + bad])
                out[family] = image_auroc(scores, torch.tensor([0] * len(good) + [1] * len(bad)))
        return out

    # --- rules ------------------------------------------------------------------------------
    def plausible(self) -> list[Trial]:
        best = self.trials[0]
        return [t for t in self.trials if within_noise(best.objective, best.se, t.objective, t.se)]

    def tied(self, candidates: list[Trial], cap: int | None = 5) -> list[Trial]:
        scores, labels, _ = self.shared(candidates)
        return [candidates[i] for i in paired_bootstrap(scores, labels, seed=0).tied_with_best()][:cap]

    def worst_family_ids(self, candidates: list[Trial]) -> set[str]:
        """val-good + the anomalies of the family the first candidate finds hardest."""
        fam = self.family_aurocs(candidates[0])
        hardest = min(fam, key=fam.get) if fam else None
        return {k for k in self.val_labels if self.val_labels[k] == 0 or self.family.get(k) == hardest}

    def tied_on(self, candidates: list[Trial], ids: set[str]) -> list[Trial]:
        """Paired-bootstrap ties with the first candidate on the val images ``ids`` only."""
        shared = sorted(set.intersection(*(set(t.val) for t in candidates)) & ids)
        scores = torch.tensor([[t.val[i] for i in shared] for t in candidates])
        labels = torch.tensor([self.val_labels[i] for i in shared])
        return [candidates[i] for i in paired_bootstrap(scores, labels, seed=0).tied_with_best()][:5]

    def diverse(self, candidates: list[Trial], k: int = 3) -> list[Trial]:
        """``diversity.least_agreeing`` on the candidates' shared val scores."""
        if len(candidates) <= 1:
            return candidates[:1]
        scores, _, _ = self.shared(candidates)
        return [candidates[i] for i in least_agreeing(scores, k)]

    def extractors_first(self, candidates: list[Trial], k: int = 3) -> list[Trial]:
        """``diversity.other_extractors_first``, what ``choice.py`` ships (stop 37)."""
        if len(candidates) <= 1:
            return candidates[:1]
        scores, _, _ = self.shared(candidates)
        return [candidates[i] for i in other_extractors_first([t.features for t in candidates], scores, k)]

    def rules(self) -> dict[str, list[Trial]]:
        plausible = self.plausible()
        size = max(t.size for t in plausible)
        at_size = [t for t in plausible if t.size == size]
        tied = self.tied(at_size)
        tied_all = self.tied(at_size[:10], cap=None)
        shipped = tied  # the rule of stop 26: every tied candidate (at most 5)
        if len(tied) > 1:
            scores, labels, _ = self.shared(tied)
            good = labels == 0
            z = [(s - robust_center_scale(s[good])[0]) / robust_center_scale(s[good])[1] for s in scores]
            versus = paired_bootstrap(torch.stack([z[0], torch.stack(z).mean(0)]), labels, seed=0)
            if versus.worse_probability(1, 0) >= CONFIDENCE:
                shipped = tied[:1]
        best_size = [t for t in self.trials if t.size == self.trials[0].size]
        families = {t.trial_id: self.family_aurocs(t) for t in self.trials}
        names = sorted({f for fam in families.values() for f in fam})
        ranks = {t.trial_id: 0.0 for t in self.trials}
        for family in names:
            ordered = sorted(self.trials, key=lambda t: -families[t.trial_id].get(family, 0.0))
            for rank, t in enumerate(ordered):
                ranks[t.trial_id] += rank / max(1, len(names))
        worst = {t.trial_id: min(families[t.trial_id].values(), default=0.0) for t in self.trials}
        by_worst = sorted(at_size, key=lambda t: (-worst[t.trial_id], -t.objective))
        return {
            "best-val": self.trials[:1],
            "wf-top3-size": by_worst[:3],
            "shipped": self.extractors_first(tied_all, 3),
            "least-agree3": self.diverse(tied, 3),
            "tied-top3": tied[:3],
            "tied-feat3": _one_per_features(tied),
            "plaus-feat3": _one_per_features(at_size),
            "tiedall-feat3": _one_per_features(tied_all),
            "tiedall-bb3": _one_per_backbone(tied_all),
            "plaus-bb3": _one_per_backbone(at_size),
            "plaus-div3": self.diverse(at_size, 3),
            "tied-wf3": sorted(tied, key=lambda t: (-worst[t.trial_id], -t.objective))[:3],
            "tied-wf2": sorted(tied, key=lambda t: (-worst[t.trial_id], -t.objective))[:2],
            "wf-tied-size": self.tied_on(by_worst, self.worst_family_ids(by_worst)),
            "tied-all": shipped,
            "tied-all-sizes": self.tied(plausible),
            "top3-size": best_size[:3],
            "plausible": plausible,
            "all-trials": self.trials,
            "all-size": best_size,
            "worst-family": [max(self.trials, key=lambda t: (min(families[t.trial_id].values(), default=0.0),
                                                             t.objective))],
            "rank-family": [min(self.trials, key=lambda t: (ranks[t.trial_id], -t.objective))],
        }

    def signals(self) -> dict[str, list[float]]:
        families = [self.family_aurocs(t) for t in self.trials]
        return {"pooled": [t.objective for t in self.trials],
                "worst-family": [min(f.values(), default=0.0) for f in families],
                "mean-family": [sum(f.values()) / max(1, len(f)) for f in families]}


def summarise(folder: Path) -> dict:
    experiment = Experiment(folder)
    if not experiment.trials:
        return {"experiment": str(folder), "error": "no trial with stored val and test scores"}
    tests = {t.trial_id: experiment.test_auroc([t]) for t in experiment.trials}
    best = max(tests.values())
    rules = {name: {"members": [f"{t.trial_id}:{t.method}@{t.size}" for t in members],
                    "test": (auroc := experiment.test_auroc(members)), "regret": best - auroc}
             for name, members in experiment.rules().items()}
    test_order = [tests[t.trial_id] for t in experiment.trials]
    spearman = {name: _spearman(values, test_order) for name, values in experiment.signals().items()}
    return {"experiment": str(folder), "category": experiment.category, "trials": len(experiment.trials),
            "best_trial_test": best, "rules": rules, "spearman": spearman}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiments", nargs="+", type=Path, help="finished search folders (<storage>/<experiment>)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    results = [summarise(folder) for folder in args.experiments]
    rule_names = list(next((r["rules"] for r in results if "rules" in r), {}))
    print(f"{'category':10} {'trials':>6} {'best':>6}  " + " ".join(f"{n:>14}" for n in rule_names))
    for r in results:
        if "rules" not in r:
            print(f"{r['experiment']}: {r['error']}")
            continue
        cells = " ".join(f"{r['rules'][n]['test']:.3f} {-r['rules'][n]['regret']:+.3f}".rjust(14) for n in rule_names)
        print(f"{r['category']:10} {r['trials']:6d} {r['best_trial_test']:6.3f}  {cells}")
    done = [r for r in results if "rules" in r]
    if done:
        means = " ".join(f"{sum(r['rules'][n]['regret'] for r in done) / len(done):14.3f}" for n in rule_names)
        print(f"{'mean regret':25} {means}")
        worst = " ".join(f"{max(r['rules'][n]['regret'] for r in done):14.3f}" for n in rule_names)
        print(f"{'max regret':25} {worst}")
        for r in done:
            print(f"spearman {r['category']:10} " + ", ".join(f"{k} {v:+.2f}" if v is not None else f"{k} -"
                                                             for k, v in r["spearman"].items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
