"""The smallest usable product (issue 25): 2 good images, 1 to fit and 1 held out.

The minimum README "Data" states is only true if every method a plan can run trains and
is validated on exactly that split, and if the count the search checks before Ray starts
is the split the loader and the planner make.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from automl_ad.data.builtin import generate_builtin
from automl_ad.data.dataset import load_category, split_train
from automl_ad.data.minimum import MIN_TRAIN_GOOD, check_product, held_out, product_size
from automl_ad.errors import UserError
from automl_ad.evaluation.validation import build_val_anomalies, val_set_for
from automl_ad.methods import available_methods, get_method_class
from automl_ad.methods.base import packaged_spec
from automl_ad.training.loop import TrainConfig, fit, synthesis_family
from automl_ad.tuning.schedule import data_counts

SIZE = 32
# The methods a plan can run: every registered method that ships a search space.
PLANNED = [name for name in available_methods() if packaged_spec(name) is not None]


@pytest.fixture(scope="module")
def smallest(tmp_path_factory) -> Path:
    """A built-in product with exactly MIN_TRAIN_GOOD good images."""
    root = tmp_path_factory.mktemp("smallest")
    generate_builtin(root, ["screw"], n_train=MIN_TRAIN_GOOD, n_test=4, image_size=SIZE, seed=0)
    return root


def test_the_minimum_is_one_fit_and_one_val_image_and_one_less_is_refused(smallest, tmp_path, capsys):
    size = check_product(smallest, "screw")
    assert (size.good, size.fit, size.val_good) == (2, 1, 1)
    assert "notice: category 'screw' has 2 good images (1 to fit, 1 held out)" in capsys.readouterr().err
    loaded = load_category(smallest, "screw", SIZE)
    assert (len(loaded.fit), len(loaded.val_good)) == (size.fit, size.val_good)

    generate_builtin(tmp_path, ["screw"], n_train=1, n_test=2, image_size=SIZE, seed=0)
    with pytest.raises(UserError, match=r"holds 1 good image; a search needs at least 2 \(1 to fit, 1 held out"):
        check_product(tmp_path, "screw")


def test_the_count_checked_is_the_split_the_loader_and_the_planner_make():
    for count in range(0, 41):
        fit_index, val_index = split_train(count, 0.2, seed=3)
        assert len(val_index) == held_out(count), count
        if count >= MIN_TRAIN_GOOD:
            assert len(fit_index) >= 1 and len(val_index) >= 1
    assert held_out(10) == 2 and held_out(100) == 20 and held_out(7) == 1


def test_the_planner_counts_the_same_split(smallest):
    counts = data_counts(smallest, "screw")
    size = product_size(smallest, "screw")
    assert (counts.fit, counts.val_good) == (size.fit, size.val_good)


@pytest.mark.parametrize("name", PLANNED)
def test_every_planned_method_trains_and_validates_on_the_smallest_product(name, smallest, one_torch_thread):
    assert {"draem", "nsa", "ssae", "cfa", "ast", "patchcore"} <= set(PLANNED)
    data = load_category(smallest, "screw", SIZE)
    assert (len(data.fit), len(data.val_good)) == (1, 1)
    cls = get_method_class(name)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    cfg = TrainConfig(method=name, method_params={"weights": "random"} if "weights" in fields else {},
                      image_size=SIZE, epochs=max(1, len(cls.phases)), steps_per_epoch=2, batch_size=4, seed=0)
    anomalies = build_val_anomalies(data, seed=0)
    val = val_set_for(data.val_good, anomalies, synthesis_family(cfg, cls))
    assert int((val.labels == 0).sum()) == 1 and int(val.labels.sum()) >= 1
    result = fit(cfg, data, val, evaluate_test=False)
    assert result.objective is not None and math.isfinite(result.objective) and 0.0 <= result.objective <= 1.0
