"""Metrics against sklearn, a brute-force PRO curve, brute-force F1 and hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import torch
from sklearn.metrics import roc_auc_score

from automl_ad.errors import UserError
from automl_ad.evaluation.metrics import aupro, evaluate, f1_max, image_auroc, pixel_auroc

# ---------------------------------------------------------------- references written here


def brute_force_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float) -> float:
    """PRO curve by looping over every threshold, one image at a time."""
    eight_connected = np.ones((3, 3), dtype=int)
    regions: list[tuple[int, np.ndarray]] = []  # (image index, boolean region)
    for index, mask in enumerate(masks):
        labelled, count = scipy.ndimage.label(mask, structure=eight_connected)
        regions += [(index, labelled == k) for k in range(1, count + 1)]
    normal_scores = maps[masks == 0]
    thresholds = np.concatenate([np.unique(maps)[::-1], [maps.min() - 1.0]])
    points = [(0.0, 0.0)]  # a threshold above every score predicts nothing
    for threshold in thresholds:
        fpr = float(np.mean(normal_scores > threshold))
        pro = float(np.mean([np.mean(maps[i][region] > threshold) for i, region in regions]))
        points.append((fpr, pro))
    x = np.array([p[0] for p in points])
    y = np.array([p[1] for p in points])
    inside = x <= fpr_limit
    x_kept, y_kept = list(x[inside]), list(y[inside])
    if x_kept[-1] < fpr_limit:
        after = int(np.argmax(x > fpr_limit))
        x0, x1, y0, y1 = x[after - 1], x[after], y[after - 1], y[after]
        x_kept.append(fpr_limit)
        y_kept.append(y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0))
    return float(np.trapezoid(y_kept, x_kept)) / fpr_limit


def brute_force_f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    best = 0.0
    for threshold in np.unique(scores):
        predicted = scores >= threshold
        tp = np.sum(predicted & (labels == 1))
        fp = np.sum(predicted & (labels == 0))
        fn = np.sum(~predicted & (labels == 1))
        best = max(best, 2 * tp / (2 * tp + fp + fn))
    return float(best)


def random_blob_masks(generator: torch.Generator, n: int, size: int) -> torch.Tensor:
    """N x 1 x H x W masks with a few rectangles of different sizes, some touching diagonally."""
    masks = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    for index in range(n):
        for _ in range(int(torch.randint(0, 4, (1,), generator=generator))):
            top, left = torch.randint(0, size - 2, (2,), generator=generator).tolist()
            height, width = torch.randint(1, 6, (2,), generator=generator).tolist()
            masks[index, 0, top : top + height, left : left + width] = 1
    # Two single pixels touching only by a corner: one component under 8-connectivity.
    masks[0, 0, 0, 0] = 1
    masks[0, 0, 1, 1] = 1
    return masks


# ---------------------------------------------------------------- AUROC


@pytest.mark.parametrize("seed", range(6))
def test_image_auroc_matches_sklearn_with_ties(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    # Few distinct values force many ties, within and across classes.
    scores = torch.randint(0, 6, (80,), generator=generator).float() / 5
    labels = torch.randint(0, 2, (80,), generator=generator)
    expected = roc_auc_score(labels.numpy(), scores.numpy())
    assert image_auroc(scores, labels) == pytest.approx(expected, abs=1e-12)


def test_image_auroc_continuous_scores_and_bool_labels() -> None:
    generator = torch.Generator().manual_seed(7)
    labels = torch.rand(200, generator=generator) < 0.3
    scores = torch.randn(200, generator=generator, dtype=torch.float64) + labels.double()
    expected = roc_auc_score(labels.numpy(), scores.numpy())
    assert image_auroc(scores, labels) == pytest.approx(expected, abs=1e-12)
    assert image_auroc(-scores, labels) == pytest.approx(1 - expected, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_pixel_auroc_matches_sklearn_with_ties(seed: int) -> None:
    generator = torch.Generator().manual_seed(100 + seed)
    masks = random_blob_masks(generator, 5, 32)
    maps = torch.randint(0, 20, (5, 32, 32), generator=generator).float() + 3 * masks[:, 0]
    expected = roc_auc_score(masks.numpy().ravel(), maps.numpy().ravel())
    assert pixel_auroc(maps, masks) == pytest.approx(expected, abs=1e-12)
    # N x H x W masks give the same value as N x 1 x H x W.
    assert pixel_auroc(maps, masks[:, 0]) == pytest.approx(expected, abs=1e-12)


def test_auroc_none_when_one_class() -> None:
    assert image_auroc(torch.rand(5), torch.ones(5)) is None
    assert image_auroc(torch.rand(5), torch.zeros(5)) is None
    assert image_auroc(torch.zeros(0), torch.zeros(0)) is None
    assert pixel_auroc(torch.rand(2, 8, 8), torch.zeros(2, 1, 8, 8)) is None
    assert pixel_auroc(torch.rand(2, 8, 8), torch.ones(2, 1, 8, 8)) is None


# ---------------------------------------------------------------- AUPRO


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_aupro_matches_brute_force(seed: int, fpr_limit: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    masks = random_blob_masks(generator, 4, 16)
    # Coarse scores: ties inside components, between components and with normal pixels.
    maps = torch.randint(0, 12, (4, 16, 16), generator=generator).float() + 4 * masks[:, 0]
    expected = brute_force_aupro(maps.numpy(), masks[:, 0].numpy(), fpr_limit)
    assert aupro(maps, masks, fpr_limit) == pytest.approx(expected, abs=1e-9)


def test_aupro_matches_brute_force_continuous_scores() -> None:
    generator = torch.Generator().manual_seed(42)
    masks = random_blob_masks(generator, 3, 20)
    maps = torch.rand(3, 20, 20, generator=generator) + 0.5 * masks[:, 0]
    expected = brute_force_aupro(maps.numpy(), masks[:, 0].numpy(), 0.3)
    assert aupro(maps, masks) == pytest.approx(expected, abs=1e-9)


def test_aupro_every_region_weighs_the_same() -> None:
    # Two images: a large component (16 pixels) and a single-pixel component.
    masks = torch.zeros(2, 1, 10, 10)
    masks[0, 0, 2:6, 2:6] = 1
    masks[1, 0, 7, 7] = 1
    normal_scores = torch.linspace(0, 1, 200).reshape(2, 10, 10)
    maps = normal_scores.clone()
    maps[0, 2:6, 2:6] = 5.0  # large region found before any false positive
    maps[1, 7, 7] = -5.0  # tiny region found only after every normal pixel
    # PRO is 0.5 all the way to FPR 1: the large region counts for half, not for 16/17.
    assert aupro(maps, masks) == pytest.approx(0.5, abs=1e-12)


def test_aupro_hand_computed_values() -> None:
    masks = torch.zeros(1, 1, 10, 20)
    masks[0, 0, 0, 0:5] = 1  # component A: 5 pixels
    masks[0, 0, 9, 15:20] = 1  # component B: 5 pixels, far from A
    defect = masks[0, 0].bool()
    n_normal = int((~defect).sum())  # 190
    normal_rank = torch.arange(n_normal, dtype=torch.float32)  # distinct scores 0..189
    base = torch.zeros(10, 20)
    base[~defect] = normal_rank.flip(0)  # highest normal score = 189

    perfect = base.clone()
    perfect[defect] = 1000.0
    assert aupro(perfect[None], masks) == pytest.approx(1.0, abs=1e-12)

    # A above every normal; B tied with nothing, just below the top 19 normals (FPR 0.1):
    # PRO 0.5 on [0, 0.1], then 1 on [0.1, 0.3] -> (0.05 + 0.2) / 0.3.
    stepped = base.clone()
    stepped[0, 0:5] = 1000.0
    stepped[9, 15:20] = 189 - 19 + 0.5
    assert aupro(stepped[None], masks) == pytest.approx(0.25 / 0.3, abs=1e-12)

    # B tied with the normals ranked 20th..38th: the curve goes straight from
    # (19/190, 0.5) to (38/190, 1) -> area 0.05 + 0.075 + 0.1 = 0.225.
    tied = base.clone()
    tied[0, 0:5] = 1000.0
    tied[~defect] = torch.where(
        (normal_rank.flip(0) <= 189 - 19) & (normal_rank.flip(0) >= 189 - 37),
        torch.tensor(170.0),
        normal_rank.flip(0),
    )
    tied[9, 15:20] = 170.0
    assert aupro(tied[None], masks) == pytest.approx(0.225 / 0.3, abs=1e-12)

    # Reversed map: every component below every normal pixel -> 0.
    assert aupro(-perfect[None], masks) == pytest.approx(0.0, abs=1e-12)


def test_aupro_eight_connectivity_joins_diagonal_pixels() -> None:
    masks = torch.zeros(1, 1, 6, 6)
    masks[0, 0, 1, 1] = 1
    masks[0, 0, 2, 2] = 1  # diagonal neighbour: same component
    masks[0, 0, 4, 4] = 1  # separate component
    maps = torch.zeros(1, 6, 6)
    maps[0, 1, 1] = 10.0  # half of the diagonal component found first
    maps[0, 4, 4] = 10.0
    maps[0, 2, 2] = -10.0
    # 8-connectivity: components {(1,1),(2,2)} and {(4,4)} -> PRO = (0.5 + 1) / 2 = 0.75
    # until every normal is flagged. (4-connectivity would give 3 components and 2/3.)
    assert aupro(maps, masks) == pytest.approx(0.75, abs=1e-12)


def test_aupro_components_do_not_join_across_images() -> None:
    masks = torch.zeros(2, 1, 4, 4)
    masks[:, 0, 1:3, 1:3] = 1  # same place in both images: two components, not one
    maps = torch.zeros(2, 4, 4)
    maps[0, 1:3, 1:3] = 1.0  # only the first image's region is found above the normals
    maps[1, 1:3, 1:3] = -1.0
    assert aupro(maps, masks) == pytest.approx(0.5, abs=1e-12)


def test_aupro_none_cases_and_bad_limit() -> None:
    assert aupro(torch.rand(2, 8, 8), torch.zeros(2, 1, 8, 8)) is None
    assert aupro(torch.rand(2, 8, 8), torch.ones(2, 1, 8, 8)) is None
    with pytest.raises(UserError, match="fpr_limit"):
        aupro(torch.rand(1, 4, 4), torch.ones(1, 1, 4, 4), fpr_limit=0.0)
    with pytest.raises(UserError, match="fpr_limit"):
        aupro(torch.rand(1, 4, 4), torch.ones(1, 1, 4, 4), fpr_limit=1.5)


# ---------------------------------------------------------------- F1


@pytest.mark.parametrize("seed", range(6))
def test_f1_max_matches_brute_force(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 8, (60,), generator=generator).float()
    labels = torch.randint(0, 2, (60,), generator=generator)
    labels[0] = 1
    best, threshold = f1_max(scores, labels)
    assert best == pytest.approx(brute_force_f1_max(scores.numpy(), labels.numpy()), abs=1e-12)
    # The threshold reproduces the reported F1 with the ">=" rule.
    predicted = scores >= threshold
    tp = int((predicted & (labels == 1)).sum())
    fp = int((predicted & (labels == 0)).sum())
    fn = int((~predicted & (labels == 1)).sum())
    assert best == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-12)
    assert threshold in scores.tolist()


def test_f1_max_hand_computed() -> None:
    scores = torch.tensor([0.9, 0.8, 0.8, 0.3, 0.1])
    labels = torch.tensor([1, 1, 0, 1, 0])
    # >= 0.9: 2/(2+0+2)=0.5; >= 0.8: 4/(4+1+1)=2/3; >= 0.3: 6/(6+1+0)=6/7; >= 0.1: 6/8.
    best, threshold = f1_max(scores, labels)
    assert best == pytest.approx(6 / 7, abs=1e-12)
    assert threshold == pytest.approx(0.3)
    # Separable scores: F1 = 1 at the lowest positive score.
    best, threshold = f1_max(torch.tensor([0.1, 0.2, 0.7, 0.9]), torch.tensor([0, 0, 1, 1]))
    assert (best, threshold) == (1.0, pytest.approx(0.7))


def test_f1_max_none_without_positives() -> None:
    assert f1_max(torch.rand(4), torch.zeros(4)) is None
    assert f1_max(torch.tensor([0.2, 0.4]), torch.ones(2)) == (1.0, pytest.approx(0.2))


# ---------------------------------------------------------------- evaluate


def _evaluation_set(seed: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    masks = random_blob_masks(generator, 6, 24)
    masks[3:] = 0  # three good images
    labels = (masks.flatten(1).amax(1) > 0).long()
    maps = torch.rand(6, 24, 24, generator=generator) + 0.7 * masks[:, 0]
    scores = maps.flatten(1).amax(1)
    return scores, maps, labels, masks


def test_evaluate_combines_the_metrics() -> None:
    scores, maps, labels, masks = _evaluation_set(3)
    result = evaluate(scores, maps, labels, masks)
    assert set(result) == {"image_auroc", "pixel_auroc", "aupro", "f1_max", "f1_threshold"}
    assert result["image_auroc"] == image_auroc(scores, labels)
    assert result["pixel_auroc"] == pixel_auroc(maps, masks)
    assert result["aupro"] == aupro(maps, masks)
    assert (result["f1_max"], result["f1_threshold"]) == f1_max(scores, labels)


def test_evaluate_uses_only_images_with_masks() -> None:
    scores, maps, labels, masks = _evaluation_set(4)
    has_mask = torch.tensor([True, False, True, True, True, False])
    # The unmasked defective image would be all "normal" pixels if it were used.
    result = evaluate(scores, maps, labels, masks, has_mask)
    assert result["pixel_auroc"] == pixel_auroc(maps[has_mask], masks[has_mask])
    assert result["aupro"] == aupro(maps[has_mask], masks[has_mask])
    assert result["pixel_auroc"] != pixel_auroc(maps, masks)
    assert result["image_auroc"] == image_auroc(scores, labels)  # image metrics use all


def test_evaluate_pixel_metrics_missing_without_defect_pixels() -> None:
    scores, maps, labels, masks = _evaluation_set(5)
    no_defect_masks = torch.tensor([False, False, False, True, True, True])
    result = evaluate(scores, maps, labels, masks, has_mask=no_defect_masks)
    assert result["pixel_auroc"] is None and result["aupro"] is None
    assert result["image_auroc"] is not None
    # Good images only: nothing is defined but nothing fails.
    good = slice(3, 6)
    result = evaluate(scores[good], maps[good], labels[good], masks[good])
    assert all(value is None for value in result.values())


# ---------------------------------------------------------------- score encodings


def test_packed_float32_ranking_equals_float64_ranking() -> None:
    # float32 maps take the packed-integer sort, float64 maps the plain float sort; the
    # values are identical, so every metric must be too. Negative scores, infinities and
    # -0.0 tied with +0.0 exercise the order-preserving key.
    generator = torch.Generator().manual_seed(11)
    masks = random_blob_masks(generator, 3, 16)
    maps = (torch.randint(-6, 6, (3, 16, 16), generator=generator).float() / 4) + masks[:, 0]
    maps[0, 5, :8] = -0.0
    maps[1, 9, :8] = 0.0
    maps[2, 0, 0] = float("inf")
    maps[2, 15, 15] = float("-inf")
    as_float64 = maps.double()
    assert pixel_auroc(maps, masks) == pixel_auroc(as_float64, masks)
    assert aupro(maps, masks) == pytest.approx(aupro(as_float64, masks), abs=1e-12)
    # The references need finite scores; +-1e6 ranks exactly like +-inf here.
    finite = torch.nan_to_num(maps, posinf=1e6, neginf=-1e6).numpy()
    expected = roc_auc_score(masks.numpy().ravel(), finite.ravel())
    assert pixel_auroc(maps, masks) == pytest.approx(expected, abs=1e-12)
    expected = brute_force_aupro(finite, masks[:, 0].numpy(), 0.3)
    assert aupro(maps, masks) == pytest.approx(expected, abs=1e-9)
    assert aupro(maps.half(), masks) == aupro(maps, masks)


def test_f1_threshold_decoded_exactly_from_packed_keys() -> None:
    scores = torch.tensor([-2.75, -0.1, 3.5e-8, 7.25, -1e30], dtype=torch.float32)
    labels = torch.tensor([1, 1, 1, 1, 0])
    best, threshold = f1_max(scores, labels)
    assert best == 1.0
    assert threshold == float(scores[0])  # exact float32 value, not an approximation
    best64, threshold64 = f1_max(scores.double(), labels)
    assert (best64, threshold64) == (best, threshold)


# ---------------------------------------------------------------- bad input


def test_bad_inputs_raise_user_error() -> None:
    with pytest.raises(UserError, match="labels"):
        image_auroc(torch.rand(3), torch.tensor([0, 2, 1]))
    with pytest.raises(UserError, match="shape"):
        image_auroc(torch.rand(3), torch.ones(4))
    with pytest.raises(UserError, match="NaN"):
        pixel_auroc(torch.full((1, 4, 4), float("nan")), torch.ones(1, 1, 4, 4))
    with pytest.raises(UserError, match="masks"):
        aupro(torch.rand(1, 4, 4), torch.full((1, 1, 4, 4), 0.5))
    with pytest.raises(UserError, match="same size"):
        pixel_auroc(torch.rand(1, 4, 4), torch.ones(1, 1, 8, 8))
    with pytest.raises(UserError, match="anomaly maps"):
        evaluate(torch.rand(2), torch.rand(3, 4, 4), torch.ones(2), torch.ones(3, 1, 4, 4))
