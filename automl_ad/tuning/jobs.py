"""Many products in one run: ``--jobs FILE`` and ``--category all``, one search per
product, one after the other."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from automl_ad import experiment as layout
from automl_ad.data.builtin import BUILTIN_CATEGORIES
from automl_ad.data.layout import list_categories
from automl_ad.errors import UserError
from automl_ad.results.remote_storage import Storage, parse_storage
from automl_ad.tuning.budget import parse_budget
from automl_ad.tuning.options import SearchOptions, SearchSummary
from automl_ad.tuning.search import run_search

@dataclass(frozen=True)
class Job:
    """One product's search in a many-product run."""

    category: str
    budget: str


def load_jobs(path: Path) -> list[Job]:
    """``--jobs FILE``: a YAML list of ``{category, budget}``, checked before anything runs."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--jobs file not found: {path}")
    try:
        items = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"--jobs {path}: not valid YAML ({first})") from None
    if not isinstance(items, list) or not items:
        raise UserError(f"--jobs {path}: expected a non-empty list of {{category, budget}} items")
    jobs: list[Job] = []
    for index, item in enumerate(items):
        where = f"--jobs {path}: item {index + 1}"
        if not isinstance(item, dict) or set(item) != {"category", "budget"}:
            keys = sorted(item) if isinstance(item, dict) else type(item).__name__
            raise UserError(f"{where}: expected exactly the keys category and budget, got {keys}")
        category, budget = str(item["category"]).strip(), str(item["budget"]).strip()
        if not category:
            raise UserError(f"{where}: empty category")
        try:
            parse_budget(budget)
        except UserError as exc:
            raise UserError(f"{where} ({category}): {exc}") from None
        if any(job.category == category for job in jobs):
            raise UserError(f"{where}: category {category!r} appears twice")
        jobs.append(Job(category, budget))
    return jobs


def all_categories(data: Path | None) -> list[str]:
    """``--category all``: every category folder under ``data``, else every built-in product."""
    if data is None:
        return list(BUILTIN_CATEGORIES)

    root = Path(data).expanduser()
    if not root.is_dir():
        raise UserError(f"--data folder not found: {root}")
    found = sorted(list_categories(root))
    if not found:
        raise UserError(f"--data {root}: no category folders (a category folder holds train/good/)")
    return found


def run_jobs(base: SearchOptions, jobs: Sequence[Job],
             on_done: Callable[[SearchSummary], None] | None = None) -> list[SearchSummary]:
    """One search per job, one after the other on the same Ray instance, each with its
    own budget, ledger and experiment folder (``<experiment>-<category>`` when
    ``base.experiment`` is set). ``on_done`` sees each summary as soon as it exists."""
    if not jobs:
        raise UserError("no categories to search")
    storage = parse_storage(base.storage)
    for job in jobs:  # every budget is checked before the first search starts
        parse_budget(job.budget)
    summaries = []
    for job in jobs:
        experiment = f"{base.experiment}-{job.category}" if base.experiment else None
        # A run stopped before this product's search began: start it instead of failing.
        resume = base.resume and _has_search(storage, job.category, experiment)
        summary = run_search(dataclasses.replace(base, category=job.category, budget=job.budget,
                                                 experiment=experiment, resume=resume))
        summaries.append(summary)
        if on_done is not None:
            on_done(summary)
    return summaries


def _has_search(storage: Storage, category: str, experiment: str | None) -> bool:
    if storage.is_remote:
        return storage.has_search(experiment) if experiment is not None else bool(storage.searches(category))
    if experiment is not None:
        return layout.has_record(storage.local / experiment)
    return any(layout.has_record(p) for p in storage.local.glob(f"{category}-*"))
