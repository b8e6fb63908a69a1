"""The leaderboard of a search and the Spearman verdict on its val objective.

One ranking and one set of rules, used by ``automl-ad results``/``search`` (text) and by
the HTML report: trials ranked by val objective (none last, ties by trial id); the
Spearman rank correlation between val objective and test image AUROC is taken over the
trials that did not fail and have both as finite numbers, and is undefined (None) with
fewer than 3 such trials, a constant side, or a NaN result.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from rich.console import Console
from rich.table import Table
from scipy.stats import spearmanr

from automl_ad.param_keys import METHOD, size_key, split_config
from automl_ad.evaluation.uncertainty import within_noise
from automl_ad.results import store

Z_TWO_SIDED = 1.96  # the leaderboard's interval: objective ± 1.96 standard errors

MIN_SPEARMAN_PAIRS = 3
KEY_PARAMS_SHOWN = 3
TITLE = "leaderboard (val objective; test reported, never optimised)"
COLUMNS = ("#", "trial", "method", "backbone", "synthesis", "key params", "status", "epochs",
           "val obj", "± 95%", "tied", "test AUROC", "test AUPRO", "device-h")


def number(value: Any) -> float | None:
    """``value`` as a finite float, else None (missing, NaN, inf, bool, text)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(result) or math.isinf(result) else result


def ranked(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Rows by val objective, best first; rows without one last; ties by trial id."""
    return sorted(rows, key=lambda r: (number(r.get("objective")) is None, -(number(r.get("objective")) or 0.0),
                                       str(r.get("trial_id"))))


def val_test_pairs(rows: Sequence[Mapping[str, Any]]) -> list[tuple[float, float, Mapping[str, Any]]]:
    """(val objective, test image AUROC, row) of every trial that did not fail and has both."""
    pairs = []
    for row in rows:
        x, y = number(row.get("objective")), number(row.get("test_image_auroc"))
        if x is not None and y is not None and row.get("status") != "error":
            pairs.append((x, y, row))
    return pairs


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's rho, or None where it is undefined (see the module docstring)."""
    if len(xs) < MIN_SPEARMAN_PAIRS or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    rho = spearmanr(xs, ys).statistic
    return None if rho is None or math.isnan(float(rho)) else float(rho)


def spearman_val_test(rows: Sequence[Mapping[str, Any]]) -> tuple[float | None, int]:
    """(Spearman of val objective against test image AUROC, trials it is taken over)."""
    pairs = val_test_pairs(rows)
    return spearman([x for x, _, _ in pairs], [y for _, y, _ in pairs]), len(pairs)


def trust(rho: float) -> str:
    """What a Spearman value says about choosing by val objective."""
    if rho >= 0.7:
        return "val selection tracks test"
    if rho >= 0.3:
        return "val selection only partly tracks test"
    return "val selection does not track test: add real defects with --val-defects"


def verdict(rows: Sequence[Mapping[str, Any]]) -> str:
    """The one line printed under the leaderboard."""
    rho, n = spearman_val_test(rows)
    if rho is None:
        return (f"Spearman(val objective, test image AUROC): needs >= {MIN_SPEARMAN_PAIRS} trials with both "
                f"and neither side constant, have {n}")
    return (f"Spearman(val objective, test image AUROC) over {n} trials: {rho:+.3f} "
            f"({trust(rho)}; 1 would mean val ranks trials as test does)")


def key_params(row: Mapping[str, Any]) -> str:
    """The first few of the method's own sampled parameters, ``name=value``."""
    raw = row.get("params") or "{}"
    params = json.loads(raw) if isinstance(raw, str) else dict(raw)
    method = row.get("method") or ""
    if not method:
        return ""
    split = split_config({**params, METHOD: method}, 0)
    sized = [("image_size", params[size_key(method)])] if size_key(method) in params else []
    shown = [f"{name}={_short(v)}" for name, v in sized + list(split.method_params.items())]
    return ", ".join(shown[:KEY_PARAMS_SHOWN])


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _cell(value: Any) -> str:
    value = number(value)
    return "-" if value is None else f"{value:.4f}"


def tied_with_best(row: Mapping[str, Any], best: Mapping[str, Any] | None) -> bool | None:
    """Whether the val set cannot tell ``row`` from the best trial (one-sided 95 %, from
    the stored standard errors; ``evaluation.uncertainty``); None when unknown."""
    if best is None or number(row.get("objective")) is None or number(row.get("objective_se")) is None:
        return None
    return within_noise(float(best["objective"]), number(best.get("objective_se")),
                        float(row["objective"]), number(row.get("objective_se")))


def table_cells(rank: int, row: Mapping[str, Any], best: Mapping[str, Any] | None = None) -> list[str]:
    """One leaderboard line, in COLUMNS order (``best``: the top-ranked row, for "tied")."""
    se = number(row.get("objective_se"))
    tied = tied_with_best(row, best)
    return [
        str(rank), str(row["trial_id"]), row.get("method") or "-", row.get("backbone") or "-",
        row.get("synthesis") or "-", key_params(row), row.get("status") or "-", str(row.get("epochs") or 0),
        _cell(row.get("objective")), "-" if se is None else f"{Z_TWO_SIDED * se:.4f}",
        "-" if tied is None else ("yes" if tied else "no"),
        _cell(row.get("test_image_auroc")), _cell(row.get("test_aupro")),
        f"{(row.get('device_s') or 0.0) / 3600:.4f}",
    ]


def ties_line(rows: Sequence[Mapping[str, Any]]) -> str | None:
    """How many trials the val set cannot tell from the best, or None when unknown."""
    order = [r for r in ranked(rows) if r.get("status") != "error"]
    if not order:
        return None
    flags = [tied_with_best(r, order[0]) for r in order]
    if all(flag is None for flag in flags):
        return None
    count = sum(1 for flag in flags if flag)
    return (f"{count} trial(s) within val noise of the best (one-sided 95 %): the val set cannot rank them; "
            "the export ensembles the tied ones (docs/search.md, \"Choosing the model\")")


def leaderboard_text(folder: Path, top: int = 20) -> str:
    """The experiment's leaderboard (its ``top`` trials) and the verdict, as plain text."""
    rows = store.read_table(folder).to_pylist()
    table = Table(title=TITLE)
    for column in COLUMNS:
        table.add_column(column)
    order = ranked(rows)
    best = next((r for r in order if r.get("status") != "error" and number(r.get("objective")) is not None), None)
    for rank, row in enumerate(order[:top], 1):
        table.add_row(*table_cells(rank, row, best))
    console = Console(width=180, record=True, force_terminal=False)
    with console.capture() as capture:
        console.print(table)
        console.print(verdict(rows))
        ties = ties_line(rows)
        if ties:
            console.print(ties)
    return capture.get()
