"""Parquet results store: one file per finished trial, read back as one table.

Layout under ``<storage>/<experiment>/``::

    trials/<trial_id>.parquet    one row per finished trial (written once it has ended)
    epochs/<trial_id>.parquet    one row per validation epoch of that trial
    <table>/<name>.parquet       any other table (the ensemble step adds ``ensembles``)

A ``checkpoint`` inside the experiment folder is stored relative to it and read back
as an absolute path under the folder being read, so an experiment can be copied
(``rsync``, the mirror of an ``s3://``/``gs://`` store) and still find its checkpoints.

Every file is written to a temporary name in the same folder and renamed with
``os.replace``, so a reader never sees half a file and a rewrite of the same trial
replaces it (a resumed search stores every trial exactly once). Rows carry
``schema_version``. Nothing from the environment (API keys, tokens) is ever stored.
Read with :func:`read_table` (pyarrow) or :func:`query` (duckdb SQL).

A file that cannot be read (truncated, not Parquet, a trial row without ``trial_id``)
costs only itself: readers move it aside to ``<experiment>/damaged/<table>/`` (never
deleting it), say so in one ``warning:`` line on stderr naming it, and go on with the
rest. A resumed search then stores that trial again from its checkpoint.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from automl_ad.param_keys import METHOD, split_config
from automl_ad import __version__
from automl_ad.errors import UserError, writing
# The table folders and damaged/ (<experiment>/damaged/<table>/<file>: store files set aside unread).
from automl_ad.experiment import DAMAGED, EPOCHS, TRIALS

SCHEMA_VERSION = 1
# Tables whose every row names its trial: a file without the column is not one of ours.
_KEYED_TABLES = (TRIALS, EPOCHS)
METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro", "f1_max")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.=-]+$")

# Columns every trial row has, in this order; flattened params (param_*) follow.
TRIAL_FIELDS: dict[str, pa.DataType] = {
    "schema_version": pa.int32(),
    "experiment": pa.string(),
    "category": pa.string(),
    "trial_id": pa.string(),
    "method": pa.string(),
    "backbone": pa.string(),
    "synthesis": pa.string(),
    "image_size": pa.int32(),
    "params": pa.string(),  # the flat sampled configuration (JSON; param_keys reads it)
    "method_params": pa.string(),  # the method's own parameters, keys unprefixed (JSON)
    "synthesis_params": pa.string(),  # the training family's parameters, keys unprefixed (JSON)
    "status": pa.string(),
    "epochs": pa.int32(),
    "max_epochs": pa.int32(),
    "wall_s": pa.float64(),
    "devices": pa.float64(),
    "device_kind": pa.string(),
    "device_s": pa.float64(),
    "budget_used": pa.float64(),
    **{f"val_{k}": pa.float64() for k in METRIC_KEYS},
    "objective": pa.float64(),
    "objective_se": pa.float64(),  # the val objective's standard error (evaluation.uncertainty)
    **{f"test_{k}": pa.float64() for k in METRIC_KEYS},
    "threshold": pa.float64(),
    "checkpoint": pa.string(),
    "seed": pa.int64(),
    "code_version": pa.string(),
    "data_fingerprint": pa.string(),
    "started": pa.timestamp("us", tz="UTC"),
    "ended": pa.timestamp("us", tz="UTC"),
    "error": pa.string(),
}

EPOCH_FIELDS: dict[str, pa.DataType] = {
    "schema_version": pa.int32(),
    "experiment": pa.string(),
    "trial_id": pa.string(),
    "method": pa.string(),
    "epoch": pa.int32(),
    "phase": pa.string(),
    "step": pa.int64(),
    "train_loss": pa.float64(),
    **{f"val_{k}": pa.float64() for k in METRIC_KEYS},
    "objective": pa.float64(),
    "elapsed_s": pa.float64(),
}


@dataclass(frozen=True)
class TrialOutcome:
    """What the search driver knows of one ended trial; :func:`trial_row` makes its row."""

    experiment: str
    category: str
    trial_id: str
    method: str
    synthesis: str
    image_size: int
    params: Mapping[str, Any]  # the flat sampled configuration
    status: str  # finished, stopped or error
    # The trial's last reported metrics: epoch, val_*, objective, test_*, test_threshold.
    result: Mapping[str, Any]
    max_epochs: int
    wall_s: float
    devices: float  # allocated while it ran (budget accounting, not utilisation)
    device_kind: str
    budget_used: float
    seed: int
    backbone: str | None = None
    checkpoint: str | None = None
    data_fingerprint: str | None = None
    started: dt.datetime | None = None
    ended: dt.datetime | None = None  # None: now
    error: str | None = None


def trial_row(outcome: TrialOutcome) -> dict[str, Any]:
    """The ``trials`` row of an ended trial (columns of TRIAL_FIELDS)."""
    result = outcome.result
    split = (split_config({**outcome.params, METHOD: outcome.method}, outcome.image_size)
             if outcome.method else None)
    return {
        "experiment": outcome.experiment,
        "category": outcome.category,
        "trial_id": outcome.trial_id,
        "method": outcome.method,
        "backbone": outcome.backbone,
        "synthesis": outcome.synthesis,
        "image_size": outcome.image_size,
        "params": dict(outcome.params),
        "method_params": json.dumps(split.method_params if split else {}, sort_keys=True, default=str),
        "synthesis_params": json.dumps(split.synthesis_params if split else {}, sort_keys=True, default=str),
        "status": outcome.status,
        "epochs": int(result.get("epoch", 0) or 0),
        "max_epochs": outcome.max_epochs,
        "wall_s": outcome.wall_s,
        "devices": outcome.devices,
        "device_kind": outcome.device_kind,
        "device_s": outcome.devices * outcome.wall_s,
        "budget_used": outcome.budget_used,
        **{f"val_{k}": result.get(f"val_{k}") for k in METRIC_KEYS},
        "objective": result.get("objective"),
        "objective_se": result.get("objective_se"),
        **{f"test_{k}": result.get(f"test_{k}") for k in METRIC_KEYS},
        "threshold": result.get("test_threshold"),
        "checkpoint": outcome.checkpoint,
        "seed": outcome.seed,
        "code_version": code_version(),
        "data_fingerprint": outcome.data_fingerprint,
        "started": outcome.started,
        "ended": outcome.ended or dt.datetime.now(dt.timezone.utc),
        "error": outcome.error,
    }


def epoch_rows(reports: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``epochs`` rows from a trial's epoch reports (``training.EpochReport`` as dicts,
    as its checkpoint keeps them)."""
    rows = []
    for report in reports:
        val = report.get("val") or {}
        rows.append({
            "epoch": report["epoch"], "phase": report["phase"], "step": report["step"],
            "train_loss": report["train_loss"], "objective": report["objective"],
            "elapsed_s": report["elapsed_s"], **{f"val_{k}": val.get(k) for k in METRIC_KEYS},
        })
    return rows


def store_trial(folder: Path, outcome: TrialOutcome, reports: Iterable[Mapping[str, Any]] = ()) -> Path:
    """Store an ended trial: its row and one row per epoch report."""
    return write_trial(folder, trial_row(outcome), epoch_rows(reports))


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Package version plus the git commit when run from a checkout (asked once per process)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+{commit}" if commit else __version__


def experiment_dir(storage: Path | str, experiment: str) -> Path:
    """``<storage>/<experiment>`` after checking the experiment name is a plain name."""
    if not _SAFE_NAME.match(experiment):
        raise UserError(f"--experiment {experiment!r}: use letters, digits, '_', '-', '.' or '='")
    return Path(storage) / experiment


def _clean(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    return value


def flatten_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """``{"draem.lr": 1e-4}`` -> ``{"param_draem.lr": 1e-4}`` with scalar values only."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, (bool, int, float, str)) or value is None:
            flat[f"param_{key}"] = _clean(value)
        else:
            flat[f"param_{key}"] = json.dumps(value, sort_keys=True, default=str)
    return flat


def _write_table(table: pa.Table, path: Path) -> Path:
    with writing(path, f"results ({path.parent.name} table)"):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


def _rows_to_table(rows: list[Mapping[str, Any]], fields: Mapping[str, pa.DataType]) -> pa.Table:
    extra = sorted({k for row in rows for k in row} - set(fields))
    schema_fields = [pa.field(name, kind) for name, kind in fields.items()]
    for name in extra:
        values = [_clean(row.get(name)) for row in rows]
        schema_fields.append(pa.field(name, _infer_type(values)))
    schema = pa.schema(schema_fields)
    columns = {
        field.name: [_clean(row.get(field.name)) for row in rows] for field in schema
    }
    if "schema_version" in columns:
        columns["schema_version"] = [SCHEMA_VERSION] * len(rows)
    return pa.table(columns, schema=schema)


def _infer_type(values: list[Any]) -> pa.DataType:
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return pa.bool_()
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return pa.int64()
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return pa.float64()
    return pa.string()


def write_rows(folder: Path, table_name: str, name: str, rows: list[Mapping[str, Any]],
               fields: Mapping[str, pa.DataType] | None = None) -> Path:
    """Write ``rows`` as ``<folder>/<table_name>/<name>.parquet`` (atomic, replaces).

    Columns named in ``fields`` get those types; other columns are inferred.
    """
    if not _SAFE_NAME.match(name):
        raise ValueError(f"unsafe file name for the store: {name!r}")
    table = _rows_to_table(rows, fields or {"schema_version": pa.int32()})
    return _write_table(table, Path(folder) / table_name / f"{name}.parquet")


def write_trial(folder: Path, row: Mapping[str, Any], epochs: Iterable[Mapping[str, Any]] = ()) -> Path:
    """Store one finished trial and its per-epoch rows; returns the trial file path."""
    trial_id = str(row["trial_id"])
    row = {**row, "checkpoint": _relative_checkpoint(Path(folder), row.get("checkpoint"))}
    params = row.get("params") or {}
    if isinstance(params, str):
        params = json.loads(params)
    full = {**row, "params": json.dumps(params, sort_keys=True, default=str), **flatten_params(params)}
    epoch_rows = [{**e, "trial_id": trial_id, "experiment": row.get("experiment"), "method": row.get("method")}
                  for e in epochs]
    if epoch_rows:
        write_rows(folder, EPOCHS, trial_id, epoch_rows, EPOCH_FIELDS)
    return write_rows(folder, TRIALS, trial_id, [full], TRIAL_FIELDS)


def set_test_metrics(folder: Path, trial_id: str, metrics: Mapping[str, Any], error: str | None = None) -> Path:
    """Write ``test_*`` metrics into a stored trial's row (the driver evaluates the test
    set after the search, from the trial's checkpoint); atomic like every write."""
    path = Path(folder) / TRIALS / f"{trial_id}.parquet"
    row = pq.read_table(path).to_pylist()[0]
    row.update({f"test_{k}": metrics.get(k) for k in METRIC_KEYS})
    if error:
        row["error"] = error
    table = _rows_to_table([row], TRIAL_FIELDS)
    return _write_table(table, path)


def needs_test_metrics(folder: Path) -> list[str]:
    """Stored trials with a checkpoint and no test metrics yet, by trial id."""
    return sorted(str(r["trial_id"]) for r in read_table(folder).to_pylist()
                  if r.get("checkpoint") and r.get("status") != "error" and r.get("test_image_auroc") is None
                  and not r.get("error"))


def _relative_checkpoint(folder: Path, checkpoint: Any) -> Any:
    if not checkpoint or "://" in str(checkpoint) or not Path(str(checkpoint)).is_absolute():
        return checkpoint
    try:
        return Path(str(checkpoint)).resolve().relative_to(folder.resolve()).as_posix()
    except ValueError:
        return checkpoint


def _absolute_checkpoints(table: pa.Table, folder: Path) -> pa.Table:
    if "checkpoint" not in table.column_names:
        return table
    base = Path(folder).resolve()
    values = [v if not v or "://" in v or Path(v).is_absolute() else str(base / v)
              for v in table["checkpoint"].to_pylist()]
    index = table.column_names.index("checkpoint")
    return table.set_column(index, "checkpoint", pa.array(values, pa.string()))


def stored_trial_ids(folder: Path) -> set[str]:
    """Trial ids that already have a row (cheap: file names only)."""
    directory = Path(folder) / TRIALS
    return {p.stem for p in directory.glob("*.parquet")} if directory.is_dir() else set()


def _table_files(folder: Path, table_name: str) -> list[str]:
    directory = Path(folder) / table_name
    if not directory.is_dir():
        return []
    return sorted(str(p) for p in directory.glob("*.parquet") if not p.name.startswith("."))


def _read_checked(path: Path, table_name: str) -> pa.Table | str:
    """The file as a table, or why it cannot be used as rows of ``table_name``."""
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        text = str(error).strip()
        return text.splitlines()[0][:200] if text else type(error).__name__
    if table_name in _KEYED_TABLES and "trial_id" not in table.column_names:
        return "not a trial table (no trial_id column)"
    return table


def set_aside(folder: Path, path: Path, reason: str) -> Path:
    """Move a damaged store file to ``<folder>/damaged/<table>/`` (kept, never deleted) and
    say so in one line on stderr; returns where it went."""
    path = Path(path)
    target_dir = Path(folder) / DAMAGED / path.parent.name
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / path.name
    serial = 1
    while target.exists():  # an earlier damaged copy of the same trial stays too
        target = target_dir / f"{path.stem}.{serial}{path.suffix}"
        serial += 1
    os.replace(path, target)
    print(f"warning: damaged store file {path} ({reason}): moved to {target} and left out", file=sys.stderr)
    return target


def _readable_tables(folder: Path, table_name: str) -> list[tuple[str, pa.Table]]:
    readable = []
    for name in _table_files(folder, table_name):
        got = _read_checked(Path(name), table_name)
        if isinstance(got, str):
            set_aside(folder, Path(name), got)
        else:
            readable.append((name, got))
    return readable


def readable_files(folder: Path, table_name: str = TRIALS) -> list[str]:
    """The table's files that read as Parquet; the others are set aside (:func:`set_aside`)."""
    return [name for name, _ in _readable_tables(folder, table_name)]


def check_tables(folder: Path, tables: tuple[str, ...] = _KEYED_TABLES) -> None:
    """Set aside every damaged file of these tables (before a resume trusts their file
    names as the trials already stored)."""
    for table_name in tables:
        readable_files(folder, table_name)


def read_table(folder: Path, table_name: str = TRIALS) -> pa.Table:
    """All readable rows of a table as one pyarrow Table (columns unified across files);
    stored relative ``checkpoint`` values come back as absolute paths under ``folder``.
    Damaged files are set aside and left out (module doc)."""
    tables = [table for _, table in _readable_tables(folder, table_name)]
    if not tables:
        return pa.table({})
    try:
        merged = pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowException as error:
        raise UserError(f"{Path(folder) / table_name}: files with conflicting columns ({error})") from None
    return _absolute_checkpoints(merged, Path(folder))


def query(folder: Path, sql: str, table_name: str = TRIALS) -> list[tuple]:
    """Run duckdb ``sql`` over a table exposed as the view named ``table_name``."""
    import duckdb

    files = readable_files(folder, table_name)
    if not files:
        return []
    con = duckdb.connect()
    try:
        file_list = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
        con.execute(f"CREATE VIEW {table_name} AS SELECT * FROM read_parquet([{file_list}], union_by_name=true)")
        return con.execute(sql).fetchall()
    finally:
        con.close()


def list_experiments(storage: Path | str, category: str | None = None) -> list[str]:
    """Experiments under ``storage`` (newest first) that hold trials, optionally of a category."""
    root = Path(storage)
    if not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        if not folder.is_dir() or not _table_files(folder, TRIALS):
            continue
        if category is not None:
            table = read_table(folder)
            if "category" not in table.column_names or category not in set(table["category"].to_pylist()):
                continue
        found.append((folder.stat().st_mtime, folder.name))
    return [name for _, name in sorted(found, reverse=True)]
