"""Selection that knows its noise: the AUROC standard error, the paired bootstrap, ties,
and the choice of trials to compare (issue 21)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from automl_ad.evaluation.metrics import image_auroc
from automl_ad.evaluation.uncertainty import (
    auroc_standard_error,
    delong_standard_error,
    paired_bootstrap,
    within_noise,
)


def _scores(labels: torch.Tensor, separation: float, seed: int, noise: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return labels.float() * separation + noise * torch.randn(len(labels), generator=generator)


LABELS = torch.tensor([0] * 80 + [1] * 320)


def test_standard_error_matches_the_spread_of_the_bootstrap():
    scores = _scores(LABELS, 2.5, seed=0)
    boot = paired_bootstrap(scores, LABELS, replicates=2000, seed=1)
    auroc = float(boot.point[0])
    assert auroc == pytest.approx(image_auroc(scores, LABELS), abs=1e-6), "the point estimate is the AUROC"
    se = delong_standard_error(scores, LABELS)
    assert 0.004 < se < 0.03
    assert float(boot.replicates[:, 0].std()) == pytest.approx(se, rel=0.15)
    # the closed form is the same order of magnitude (it assumes exponential scores)
    closed = auroc_standard_error(auroc, anomalous=320, good=80)
    assert 0.5 * se < closed < 1.5 * se
    # fewer images, more noise; a perfect or one-class set is handled
    assert auroc_standard_error(auroc, 40, 10) > closed
    assert delong_standard_error(scores[:3], LABELS[:3]) is None
    assert auroc_standard_error(1.0, 10, 10) >= 0 and math.isinf(auroc_standard_error(0.9, 0, 10))


def test_ties_follow_the_noise_not_the_larger_number():
    best = _scores(LABELS, 2.0, seed=0)
    # the same detector with a tiny perturbation: a different AUROC in the 3rd decimal, tied
    twin = best + 0.02 * torch.randn(len(LABELS), generator=torch.Generator().manual_seed(5))
    weak = _scores(LABELS, 0.5, seed=2)
    boot = paired_bootstrap(torch.stack([twin, best, weak]), LABELS, seed=0)
    assert float(boot.point[2]) < float(boot.point[0]) - 0.1
    tied = boot.tied_with_best()
    assert sorted(tied) == [0, 1], "the twin and the best are tied; the weak one is not"
    assert tied[0] == int(boot.point.argmax())
    low, high = boot.interval(2)
    assert low < float(boot.point[2]) < high
    assert boot.worse_probability(2, tied[0]) > 0.99


def test_pairing_removes_the_noise_candidates_share():
    """Two detectors that differ by a small, consistent margin on the same images: the
    paired test sees it although their unpaired intervals overlap."""
    base = _scores(LABELS, 1.5, seed=3)
    better = base + 0.15 * LABELS.float()
    boot = paired_bootstrap(torch.stack([better, base]), LABELS, seed=0)
    a, b = float(boot.point[0]), float(boot.point[1])
    se_a, se_b = auroc_standard_error(a, 320, 80), auroc_standard_error(b, 320, 80)
    se_a, se_b = delong_standard_error(better, LABELS), delong_standard_error(base, LABELS)
    assert within_noise(a, se_a, b, se_b), "unpaired, the val set cannot tell them apart"
    assert boot.tied_with_best() == [0], "paired on the same images, it can"


def test_within_noise_without_standard_errors_is_equality():
    assert within_noise(0.9, None, 0.9, None)
    assert not within_noise(0.9, None, 0.8999, None)
    assert within_noise(0.9706, 0.01, 0.9700, 0.01)
    assert not within_noise(0.97, 0.002, 0.90, 0.002)


def _row(trial_id: str, objective: float, se: float | None, size: int, checkpoint: str = "ck") -> dict:
    return {"experiment": "e", "category": "c", "trial_id": trial_id, "method": "patchcore", "backbone": None,
            "synthesis": None, "image_size": size, "params": json.dumps({"method": "patchcore"}), "status": "finished",
            "objective": objective, "objective_se": se, "checkpoint": checkpoint}


def test_candidates_are_the_plausible_trials_at_the_largest_size(tmp_path):
    from automl_ad.deploy.candidates import load_candidates
    from automl_ad.results import store

    rows = [_row("a224", 0.9706, 0.010, 224), _row("b256", 0.9700, 0.010, 256), _row("c256", 0.9650, 0.011, 256),
            _row("d256", 0.80, 0.02, 256), _row("e224", 0.9690, 0.010, 224)]
    for row in rows:
        store.write_trial(tmp_path, row)
    picked = load_candidates(tmp_path, top=10)
    assert [c.trial_id for c in picked] == ["b256", "c256"], "within noise of the best, at 256 px; not d256"
    assert all(c.image_size == 256 for c in picked) and picked[0].objective_se == pytest.approx(0.010)
    # Older searches stored no standard error: the top trials at the best one's size.
    for row in rows:
        store.write_trial(tmp_path, {**row, "objective_se": None})
    assert [c.trial_id for c in load_candidates(tmp_path, top=2)] == ["a224", "e224"]


def test_the_choice_of_a_finished_search_says_what_it_compared(tmp_path):
    from automl_ad.deploy.choice import choose_model
    from conftest import build_tiny_experiment

    folder, bundle = build_tiny_experiment(tmp_path)
    choice = choose_model(folder, k=3, top=3)
    assert set(choice.tied) <= set(choice.compared) and choice.tied
    assert set(choice.intervals) == set(choice.compared)
    for low, high in choice.intervals.values():
        assert 0.0 <= low <= high <= 1.0
    if choice.kind == "ensemble":
        assert set(choice.members) <= set(choice.tied) and 2 <= len(choice.members) <= 3
    else:
        assert choice.members == [choice.tied[0]]
    assert choice.rule
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["selection"]["tied_with_best"] and manifest["selection"]["rule"]


def test_the_choice_reuses_each_trials_val_scores_and_agrees_with_scoring_again(tmp_path):
    """After a search the choice reads every candidate's val scores from its trial
    (experiment.VAL_SCORES_FILE) instead of scoring the val set again; without them it
    scores the val set itself and decides the same."""
    from automl_ad.deploy.choice import choose_model
    from automl_ad.experiment import VAL_SCORES_FILE
    from conftest import build_tiny_experiment

    folder, _ = build_tiny_experiment(tmp_path)
    stored = sorted(folder.rglob(VAL_SCORES_FILE))
    assert len(stored) == 3, "one per trial, beside its checkpoint"
    reused = choose_model(folder, k=3, top=3)
    assert reused.val["aupro"] is None, "image scores only: no maps were kept"
    for path in stored:
        path.unlink()
    scored = choose_model(folder, k=3, top=3)
    assert scored.val["aupro"] is not None
    assert (reused.kind, reused.tied, reused.members) == (scored.kind, scored.tied, scored.members)
    assert reused.objective == pytest.approx(scored.objective, abs=1e-6)
    assert torch.allclose(reused.val_scores, scored.val_scores, atol=1e-4)


def test_ensemble_members_are_the_best_and_the_tied_candidates_that_disagree_most_with_it():
    from automl_ad.deploy.choice import ensemble_members
    from automl_ad.deploy.ensemble import MemberPredictions
    from automl_ad.evaluation.diversity import least_agreeing, rank_agreement

    order = torch.arange(12, dtype=torch.float32)
    shuffled = torch.tensor([3, 0, 7, 1, 11, 5, 9, 2, 10, 4, 8, 6], dtype=torch.float32)
    scores = {  # "second" and "third" rank the images as "best" does; "fourth" and "fifth" do not
        "best": order, "second": order * 2 + 1, "third": order.sqrt(), "fourth": shuffled, "fifth": -order,
        "sixth": -shuffled,
    }
    tied = [MemberPredictions(name, values, None) for name, values in scores.items()]
    agreement = rank_agreement(torch.stack(list(scores.values())))
    assert agreement[0, 1] == pytest.approx(1.0) and agreement[0, 4] == pytest.approx(-1.0)
    # the best first; then the least agreeing among the first five (sixth is out of the pool)
    assert [m.name for m in ensemble_members(tied, 2)] == ["best", "fifth"]
    # next to best and fifth, second and fourth agree 0 on average: the better on val joins
    assert [m.name for m in ensemble_members(tied, 3)] == ["best", "fifth", "second"]
    assert [m.name for m in ensemble_members([tied[i] for i in (0, 1, 2, 3)], 2)] == ["best", "fourth"]
    assert [m.name for m in ensemble_members(tied[:2], 3)] == ["best", "second"]
    assert [m.name for m in ensemble_members(tied, 1)] == ["best"], "k=1: the best on val alone"
    # equal agreement: the better on val joins
    same = torch.stack([order, order, order])
    assert least_agreeing(same, 2) == [0, 1]


def test_other_feature_extractors_join_before_disagreement_and_the_best_ones_method_first():
    from automl_ad.deploy.choice import ensemble_members
    from automl_ad.deploy.ensemble import MemberPredictions
    from automl_ad.evaluation.diversity import other_extractors_first

    order = torch.arange(12, dtype=torch.float32)
    names = ["best", "same-bb", "cfa", "lite2", "lite2-b", "lite0"]
    scores = torch.stack([order, -order, order.flip(0), order + 0.5, -order, order.sqrt()])
    kinds = ["patchcore:lite1", "patchcore:lite1", "cfa:lite0", "patchcore:lite2", "patchcore:lite2",
             "patchcore:lite0"]
    # the best; then the best of each other backbone of patchcore, in val order; cfa (another
    # method) and the second lite1 (which disagrees most with the best) wait
    assert other_extractors_first(kinds, scores, 3) == [0, 3, 5]
    # one backbone of the best's method besides its own: then another method's best
    assert other_extractors_first(kinds[:4], scores[:4], 3) == [0, 3, 2]
    # a single extractor: disagreement on val decides, as least_agreeing does
    assert other_extractors_first(["m:a"] * 3, scores[:3], 2) == [0, 1]
    assert other_extractors_first(kinds, scores, 1) == [0]
    tied = [MemberPredictions(name, row, None) for name, row in zip(names, scores)]
    assert [m.name for m in ensemble_members(tied, 3, dict(zip(names, kinds)))] == ["best", "lite2", "lite0"]
    # without extractors the rule of stop 33: disagreement among the first five
    assert [m.name for m in ensemble_members(tied, 2)] == ["best", "same-bb"]


def test_a_candidates_feature_extractor_is_its_method_and_backbone():
    from pathlib import Path

    from automl_ad.deploy.candidates import Candidate

    def candidate(method, params):
        return Candidate("t", method, None, 64, 0.9, Path("x"), params)

    assert candidate("patchcore", {"patchcore.backbone": "efficientnet_lite2", "patchcore.k": 1}).extractor \
        == "patchcore:efficientnet_lite2"
    assert candidate("nsa", {"nsa.lr": 0.1}).extractor == "nsa:"
