"""The experiment folder: every name under ``<storage>/<experiment>/`` and the checkpoint format.

The one place that spells them; every other module asks here::

    search.json                               the search record (options, plan, data root)
    budget.json                               the budget ledger (tuning.budget.Ledger)
    optuna.db                                 the Optuna study (sqlite)
    .driver.lock                              the running driver (tuning.lock)
    val/val_anomalies_<size>px.safetensors    frozen val anomalies, one file per image size
    cache/                                    decoded images (rebuilt from the data)
    tune/                                     Ray Tune's state; trials' checkpoint_*/checkpoint.pt
    train/                                    Ray Train runs (their own checkpoints)
    trials/ epochs/ ensembles/                the results store's tables (store.py)
    damaged/<table>/                          store files set aside unread
    bundle/                                   the exported bundle, in a bucket

A checkpoint is a folder holding ``checkpoint.pt``: a ``torch.save`` dict with the keys
of ``CHECKPOINT_KEYS`` (``training.loop.fit`` fills them), read with ``weights_only`` so no
code runs. Tune keeps a trial's checkpoints side by side as ``checkpoint_000001``, …
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from automl_ad.data.types import ImageSet
from automl_ad.errors import DamagedCheckpoint, UserError, writing
from automl_ad.jsonio import read_json
from automl_ad.evaluation.validation import load_image_set

SEARCH_RECORD = "search.json"
LEDGER_FILE = "budget.json"
OPTUNA_DB = "optuna.db"
LOCK_FILE = ".driver.lock"
VAL_DIR = "val"
CACHE_DIR = "cache"
TUNE_DIR = "tune"  # Ray Tune's own state: on a bucket Tune writes it there itself
TRAIN_DIR = "train"
TRIALS = "trials"
EPOCHS = "epochs"
ENSEMBLES = "ensembles"
DAMAGED = "damaged"
BUNDLE_DIR = "bundle"

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
# Keys every checkpoint the training loop writes holds.
CHECKPOINT_KEYS = ("config", "method", "epoch", "step", "sampler", "synth_rng", "torch_rng", "reports")
_TUNE_CHECKPOINT_PREFIX = "checkpoint_"


# --- the search record ------------------------------------------------------------------

def record_path(folder: Path) -> Path:
    return Path(folder) / SEARCH_RECORD


def has_record(folder: Path) -> bool:
    """Whether ``folder`` holds a search (its record is the mark of one)."""
    return record_path(folder).is_file()


def read_record(folder: Path) -> dict[str, Any]:
    """The experiment's search record; one line naming it when it is missing or corrupt."""
    path = record_path(folder)
    record = read_json(path, f"not an experiment folder (no {SEARCH_RECORD}): {folder}")
    if not isinstance(record, dict) or not {"category", "data"} <= set(record):
        raise UserError(f"corrupt {path}: no category and data")
    return record


def write_record(folder: Path, record: Mapping[str, Any]) -> None:
    """Write the search record through a temporary file: a full disk or a kill mid-write
    leaves the previous record (a resume needs it), never half of one."""
    path = record_path(folder)
    with writing(path, "the search record"):
        Path(folder).mkdir(parents=True, exist_ok=True)
        _replace_with(path, lambda tmp: Path(tmp).write_text(json.dumps(dict(record), indent=1)))


def _replace_with(path: Path, write: Callable[[str], Any]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then move it onto ``path``; the
    temporary file is removed when anything fails."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- other files and folders -----------------------------------------------------------

def val_anomalies_path(folder: Path | str, image_size: int) -> Path:
    return Path(folder) / VAL_DIR / f"val_anomalies_{int(image_size)}px.safetensors"


def read_val_anomalies(folder: Path, size: int) -> ImageSet:
    """The experiment's frozen val anomalies at ``size``; one line naming the file when it
    is missing or damaged (every trial was judged on it, so there is nothing to skip to)."""
    path = val_anomalies_path(folder, size)
    if not path.is_file():
        raise UserError(f"no frozen val anomalies at {size} px in {path.parent}")
    try:
        return load_image_set(path)
    except Exception as error:  # safetensors, JSON and key errors alike: the file is not what we wrote
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise UserError(f"damaged val set {path} ({reason})") from None


def cache_dir(folder: Path | str) -> Path:
    return Path(folder) / CACHE_DIR


def optuna_url(folder: Path) -> str:
    return f"sqlite:///{Path(folder) / OPTUNA_DB}"


def tune_path(root: str) -> str:
    """Tune's folder under an experiment root (a local path or a bucket URI)."""
    return f"{root}/{TUNE_DIR}"


def train_path(root: str) -> str:
    """Ray Train's folder under an experiment root (a local path or a bucket URI)."""
    return f"{root}/{TRAIN_DIR}"


# --- checkpoints -----------------------------------------------------------------------

def checkpoint_file(folder: Path | str) -> Path:
    return Path(folder) / CHECKPOINT_FILE


def has_checkpoint(folder: Path | str) -> bool:
    return checkpoint_file(folder).exists()


def write_checkpoint(folder: Path, state: Mapping[str, Any]) -> None:
    """Save ``state`` (the keys of CHECKPOINT_KEYS) to ``folder/checkpoint.pt`` through a
    temporary file and a rename, so a kill mid-write leaves the previous checkpoint."""
    folder = Path(folder)
    with writing(checkpoint_file(folder), "a checkpoint"):
        folder.mkdir(parents=True, exist_ok=True)
        _replace_with(checkpoint_file(folder), lambda tmp: _torch_save({"format": CHECKPOINT_FORMAT, **state}, tmp))


def _torch_save(state: Mapping[str, Any], tmp: str) -> None:
    # Through a Python file: a full disk then raises OSError(ENOSPC) (chained); torch's own
    # file writer reports it only as "[enforce fail at inline_container.cc] unexpected pos".
    with open(tmp, "wb") as handle:
        torch.save(dict(state), handle)


def read_checkpoint(folder: Path) -> dict[str, Any]:
    """The saved state (``weights_only``: no code runs); DamagedCheckpoint naming the file
    when it is truncated, not a torch file, or not one the training loop wrote."""
    path = checkpoint_file(folder)
    if not path.exists():
        raise UserError(f"no checkpoint to resume from: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        # First sentence only: torch appends a paragraph of advice to its zip errors.
        reason = str(error).strip().splitlines()[0].split(". ")[0][:200] if str(error).strip() else type(error).__name__
        raise DamagedCheckpoint(f"damaged checkpoint {path}: {reason}") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise DamagedCheckpoint(f"damaged checkpoint {path}: not an automl_ad training checkpoint (no {', '.join(missing)})")
    return state


# --- what a trial's last validation scored (the model choice reuses it) ----------------

VAL_SCORES_FILE = "val_scores.json"


def write_val_scores(folder: Path, paths: list[str], scores: list[float], pixel_center: float,
                     pixel_scale: float) -> None:
    """The image scores of a trial's last validation, keyed by val image (``paths``: the
    frozen val set's ids), and the robust centre/scale of its val-good maps, next to the
    checkpoint: the model choice reads them instead of scoring the val set again."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"paths": list(paths), "scores": [float(v) for v in scores],
               "pixel_center": float(pixel_center), "pixel_scale": float(pixel_scale)}
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".val_scores.", suffix=".tmp")
    os.close(fd)
    try:
        Path(tmp).write_text(json.dumps(payload))
        os.replace(tmp, folder / VAL_SCORES_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_val_scores(folder: Path) -> dict[str, Any] | None:
    """What ``write_val_scores`` wrote, or None (none written, or unreadable: the caller
    scores the val set itself)."""
    path = Path(folder) / VAL_SCORES_FILE
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(payload, dict) or len(payload.get("paths", [])) != len(payload.get("scores", [None])):
        return None
    return payload


def test_predictions_path(folder: Path, trial_id: str) -> Path:
    """Test scores and maps of a trial the choice may ship (``search.evaluate_tests``)."""
    return cache_dir(folder) / "test_predictions" / f"{trial_id}.safetensors"


def write_test_predictions(folder: Path, trial_id: str, scores: torch.Tensor, maps: torch.Tensor) -> None:
    """Keep a trial's test scores and maps (maps as float16: the metrics need the ranking
    of pixel scores, not their last digits) for the model choice's test report."""
    from safetensors.torch import save_file

    path = test_predictions_path(folder, trial_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({"scores": scores.float().contiguous(), "maps": maps.half().contiguous()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_test_predictions(folder: Path, trial_id: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(scores, maps as float32) that ``write_test_predictions`` kept, or None."""
    from safetensors.torch import load_file

    path = test_predictions_path(folder, trial_id)
    try:
        tensors = load_file(str(path))
    except (OSError, ValueError, RuntimeError):
        return None
    return tensors["scores"], tensors["maps"].float()


def checkpoints_newest_first(checkpoint: Path) -> list[Path]:
    """A trial's checkpoint, then the earlier ones Tune kept beside it (``checkpoint_000002``
    before ``checkpoint_000003``): where to fall back when the newest is damaged."""
    if not checkpoint.name.startswith(_TUNE_CHECKPOINT_PREFIX):
        return [checkpoint]
    earlier = sorted((p for p in checkpoint.parent.glob(f"{_TUNE_CHECKPOINT_PREFIX}*")
                      if p.is_dir() and p.name < checkpoint.name), reverse=True)
    return [checkpoint, *earlier]


def record_shape(record: Mapping[str, Any], image_size: int) -> tuple[int, int]:
    """(height, width) a search's images had at ``image_size`` (its stored geometry;
    square for a search recorded before geometries existed)."""
    from automl_ad.data.geometry import Geometry

    return Geometry.from_dict(record.get("geometry")).shape(int(image_size))
