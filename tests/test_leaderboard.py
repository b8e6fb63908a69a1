"""The one leaderboard ranking and Spearman rule set (automl_ad.results.leaderboard), shared by
``automl-ad results``/``search`` and the HTML report: its edge cases."""

from __future__ import annotations

import math

import pytest

from automl_ad.results import leaderboard
from automl_ad.deploy.report import spearman_text


def row(trial_id: str, objective, test=None, status: str = "finished") -> dict:
    return {"trial_id": trial_id, "objective": objective, "test_image_auroc": test, "status": status,
            "method": "cfa", "params": '{"cfa.lr": 0.001, "cfa.synthesis": null, "method": "cfa"}'}


def test_ranked_puts_best_first_missing_and_nan_last_and_breaks_ties_by_trial_id():
    rows = [row("c", 0.5), row("z", None), row("b", 0.9), row("a", 0.5), row("n", math.nan), row("i", math.inf)]
    assert [r["trial_id"] for r in leaderboard.ranked(rows)] == ["b", "a", "c", "i", "n", "z"]


@pytest.mark.parametrize("rows, why", [
    ([row("a", 0.1, 0.2), row("b", 0.2, 0.3)], "fewer than three pairs"),
    ([row("a", 0.1, 0.5), row("b", 0.2, 0.5), row("c", 0.3, 0.5)], "constant test side"),
    ([row("a", 0.4, 0.1), row("b", 0.4, 0.2), row("c", 0.4, 0.3)], "constant val side"),
    ([row("a", 0.1, 0.1), row("b", 0.2, 0.2), row("c", 0.3, math.nan)], "NaN is not a value"),
    ([row("a", 0.1, 0.1), row("b", 0.2, 0.2), row("c", 0.3, 0.3, status="error")], "a failed trial does not count"),
    ([row("a", None, 0.1), row("b", 0.2, None), row("c", 0.3, 0.3)], "one side missing"),
])
def test_spearman_is_undefined_rather_than_a_number_that_means_nothing(rows, why):
    rho, n = leaderboard.spearman_val_test(rows)
    assert rho is None, why
    assert "needs >= 3 trials" in leaderboard.verdict(rows)
    pairs = leaderboard.val_test_pairs(rows)
    assert spearman_text([x for x, _, _ in pairs], [y for _, y, _ in pairs]) == "n/a", "the report says the same"


def test_spearman_counts_only_usable_trials_and_the_verdict_names_the_trust():
    rows = [row("a", 0.1, 0.2), row("b", 0.2, 0.4), row("c", 0.3, 0.3), row("d", 0.4, 0.9),
            row("x", 0.9, 0.1, status="error"), row("y", None, 0.5)]
    rho, n = leaderboard.spearman_val_test(rows)
    assert n == 4 and rho == pytest.approx(0.8)
    assert "over 4 trials: +0.800 (val selection tracks test" in leaderboard.verdict(rows)
    assert spearman_text([0.1, 0.2, 0.3, 0.4], [0.2, 0.4, 0.3, 0.9]) == "0.80"


def test_key_params_shows_the_methods_own_parameters_only():
    assert leaderboard.key_params(row("a", 0.5)) == "lr=0.001"
    assert leaderboard.table_cells(1, row("a", None))[8] == "-", "no objective: a dash, not 'None' or 'nan'"


def test_the_leaderboard_shows_each_trials_noise_and_which_are_tied_with_the_best(tmp_path):
    from automl_ad.results import store

    rows = [{**row("a", 0.9706, 0.91), "objective_se": 0.01, "experiment": "e"},
            {**row("b", 0.9700, 0.96), "objective_se": 0.01, "experiment": "e"},
            {**row("c", 0.80, 0.70), "objective_se": 0.02, "experiment": "e"}]
    best = leaderboard.ranked(rows)[0]
    assert [leaderboard.tied_with_best(r, best) for r in rows] == [True, True, False]
    cells = leaderboard.table_cells(2, rows[1], best)
    assert cells[9] == f"{1.96 * 0.01:.4f}" and cells[10] == "yes"
    assert leaderboard.table_cells(3, rows[2], best)[10] == "no"
    assert leaderboard.table_cells(1, row("d", 0.5), best)[9:11] == ["-", "-"], "older rows: no interval"
    for r in rows:
        store.write_trial(tmp_path, r)
    text = leaderboard.leaderboard_text(tmp_path)
    assert "± 95%" in text and "tied" in text
    assert "2 trial(s) within val noise of the best" in text
