"""``--storage`` on an object store (``s3://``, ``gs://``) as well as on a folder.

The search driver needs a real filesystem for the Optuna sqlite study, the budget ledger
and the options file, so for an object store it works in a local *mirror* folder
(``$AUTOML_AD_STORAGE_MIRROR`` or ``~/.cache/automl_ad/storage``, then
``<scheme>/<bucket>/<prefix>``) and copies the experiment between the mirror and the
bucket: :meth:`Storage.pull` before a resume or a read, :meth:`Storage.push` after each
stored trial and at the end. A PUT is atomic on S3 and GCS, so each file goes straight
to its final key; local files that may be half written (dot files, ``*.tmp``, sqlite
journals) are never pushed. Ray Tune writes its own state (``<experiment>/tune/``)
to the bucket itself, so the mirror never pushes that folder.

Credentials come from the environment the usual way (instance profile, IRSA, Workload
Identity, ``AWS_*`` / ``GOOGLE_APPLICATION_CREDENTIALS``) and are never stored or
printed; ``AWS_ENDPOINT_URL`` points pyarrow at an S3-compatible store such as MinIO.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable
from urllib.parse import unquote, urlparse

from automl_ad.results import store
from automl_ad.errors import UserError
from automl_ad.experiment import (BUNDLE_DIR, CACHE_DIR, ENSEMBLES, EPOCHS, SEARCH_RECORD, TRAIN_DIR, TRIALS,
                                  TUNE_DIR)

OBJECT_STORE_SCHEMES = ("s3", "gs")
MIRROR_ENV = "AUTOML_AD_STORAGE_MIRROR"
TABLE_PARTS = (SEARCH_RECORD, TRIALS, EPOCHS, ENSEMBLES)
# Never pulled by default: Tune's state (read remotely), the decoded-image cache
# (rebuilt from the data), checkpoints (pulled one by one when a reader needs them),
# the exported bundle.
_NOT_PULLED = {TUNE_DIR, CACHE_DIR, TRAIN_DIR, BUNDLE_DIR}
_NOT_PUSHED = {TUNE_DIR, CACHE_DIR}
# A resuming driver also needs train/: Train runs restart from their own checkpoints there.
DRIVER_NOT_PULLED = frozenset({TUNE_DIR, CACHE_DIR, BUNDLE_DIR})
_UNFINISHED_SUFFIXES = (".tmp", "-journal", "-wal", "-shm")

# Local files this process has pulled or pushed, with the (size, mtime_ns) they had
# then: unchanged files are not pushed again.
_SYNCED: dict[str, tuple[int, int]] = {}


def mirror_root() -> Path:
    base = os.environ.get(MIRROR_ENV)
    return Path(base).expanduser() if base else Path.home() / ".cache" / "automl_ad" / "storage"


@dataclass(frozen=True)
class Storage:
    """Where results live: ``local`` is always the folder code reads and writes; ``uri``
    (``s3://bucket/prefix``) is set when that folder mirrors an object store."""

    text: str
    local: Path
    uri: str | None = None

    @property
    def is_remote(self) -> bool:
        return self.uri is not None

    @property
    def filesystem(self):
        return _filesystem(self.uri)

    def _root(self) -> str:
        """The store's root as a path on :attr:`filesystem` (``bucket/prefix``)."""
        return self.uri.split("://", 1)[1]

    def experiment_uri(self, experiment: str) -> str:
        return f"{self.uri}/{experiment}"

    def as_uri(self, location: str | None) -> str | None:
        """A checkpoint location as Ray may report it on this store (``bucket/key`` with no
        scheme) made into a URI ``Checkpoint(...)`` can open anywhere."""
        if not location or not self.is_remote or "://" in location:
            return location
        if location.startswith(self._root() + "/"):
            return f"{self.uri.split('://', 1)[0]}://{location}"
        return location

    def relative_to_experiment(self, location: str | None, experiment: str) -> str | None:
        """``location`` relative to the experiment when it lies in its bucket folder, so the
        row resolves against whichever mirror reads it (see ``store.read_table``)."""
        location = self.as_uri(location)
        if not location or not self.is_remote:
            return location
        prefix = self.experiment_uri(experiment) + "/"
        return location[len(prefix):] if location.startswith(prefix) else location

    # --- what is in the bucket ------------------------------------------------------

    def _remote_files(self, experiment: str) -> dict[str, object]:
        """``{relative posix path: FileInfo}`` of every object under the experiment."""
        from pyarrow.fs import FileSelector, FileType

        base = f"{self._root()}/{experiment}"
        infos = self.filesystem.get_file_info(FileSelector(base, recursive=True, allow_not_found=True))
        return {info.path[len(base) + 1:]: info for info in infos if info.type == FileType.File}

    def has_search(self, experiment: str) -> bool:
        from pyarrow.fs import FileType

        info = self.filesystem.get_file_info(f"{self._root()}/{experiment}/{SEARCH_RECORD}")
        return info.type == FileType.File

    def searches(self, category: str | None = None) -> list[str]:
        """Experiments in the bucket (newest search record first), optionally of a category."""
        from pyarrow.fs import FileSelector, FileType

        fs = self.filesystem
        found = []
        for folder in fs.get_file_info(FileSelector(self._root(), allow_not_found=True)):
            if folder.type != FileType.Directory:
                continue
            record = fs.get_file_info(f"{folder.path}/{SEARCH_RECORD}")
            if record.type != FileType.File:
                continue
            if category is not None:
                with fs.open_input_stream(record.path) as stream:
                    if json.loads(stream.read()).get("category") != category:
                        continue
            found.append((record.mtime.timestamp() if record.mtime else 0.0, folder.base_name))
        return [name for _, name in sorted(found, reverse=True)]

    # --- copying ----------------------------------------------------------------------

    def pull(self, experiment: str, parts: Iterable[str] | None = None,
             skip: Iterable[str] = frozenset(_NOT_PULLED)) -> int:
        """Download the experiment's objects under the top-level names ``parts`` (default:
        all but those in ``skip``: Tune state, cache, checkpoints and bundle) that are
        missing from the mirror or newer in the bucket; returns how many were downloaded."""
        wanted = None if parts is None else set(parts)
        skipped = set(skip)
        local = self.local / experiment
        count = 0
        for rel, info in self._remote_files(experiment).items():
            top = rel.split("/", 1)[0]
            if (top not in wanted) if wanted is not None else (top in skipped):
                continue
            target = local / PurePosixPath(rel)
            if target.exists() and info.mtime and target.stat().st_mtime >= info.mtime.timestamp():
                continue
            self._download(info.path, target)
            count += 1
        return count

    def pull_checkpoints(self, experiment: str, relative: Iterable[str]) -> int:
        """Download the checkpoint folders ``relative`` (paths inside the experiment)."""
        remote = self._remote_files(experiment)
        local = self.local / experiment
        count = 0
        for folder in {r.rstrip("/") for r in relative if r and "://" not in r and not r.startswith("/")}:
            for rel, info in remote.items():
                target = local / PurePosixPath(rel)
                if rel.startswith(folder + "/") and not target.exists():
                    self._download(info.path, target)
                    count += 1
        return count

    def push(self, experiment: str, folder: Path | None = None, under: str = "") -> int:
        """Upload new or changed files of the experiment's mirror (or of ``folder`` to
        ``<experiment>/<under>``); returns how many were uploaded."""
        source = Path(folder) if folder is not None else self.local / experiment
        if not source.is_dir():
            return 0
        candidates = []
        for path in sorted(source.rglob("*")):
            rel = path.relative_to(source).as_posix()
            if not path.is_file() or _unfinished(path) or (folder is None and rel.split("/", 1)[0] in _NOT_PUSHED):
                continue
            stat = path.stat()
            if _SYNCED.get(str(path)) != (stat.st_size, stat.st_mtime_ns):
                candidates.append((path, f"{under}/{rel}" if under else rel, stat))
        if not candidates:
            return 0
        remote = self._remote_files(experiment)
        count = 0
        for path, rel, stat in candidates:
            info = remote.get(rel)
            same = (info is not None and info.size == stat.st_size and info.mtime is not None
                    and info.mtime.timestamp() >= stat.st_mtime)
            if not same:
                self._upload(path, f"{self._root()}/{experiment}/{rel}")
                count += 1
            _SYNCED[str(path)] = (stat.st_size, stat.st_mtime_ns)
        return count

    def push_quietly(self, experiment: str) -> int:
        """:meth:`push` that warns instead of failing: a network blip must not stop a
        search; the next push sends whatever this one could not."""
        try:
            return self.push(experiment)
        except OSError as exc:
            print(f"warning: could not copy results to {self.experiment_uri(experiment)} yet: "
                  f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", file=sys.stderr)
            return 0

    def forget_mirror(self, experiment: str) -> None:
        """Drop a mirror folder the bucket no longer has (a cache, never the only copy)."""
        shutil.rmtree(self.local / experiment, ignore_errors=True)

    def _download(self, key: str, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out, self.filesystem.open_input_stream(key) as stream:
                shutil.copyfileobj(stream, out)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        stat = target.stat()
        _SYNCED[str(target)] = (stat.st_size, stat.st_mtime_ns)

    def _upload(self, path: Path, key: str) -> None:
        # One PUT (or one completed multipart upload) per key: readers see the old
        # object or the new one, never a part.
        with open(path, "rb") as source, self.filesystem.open_output_stream(key) as out:
            shutil.copyfileobj(source, out)


def _unfinished(path: Path) -> bool:
    return path.name.startswith(".") or path.name.endswith(_UNFINISHED_SUFFIXES)


@functools.lru_cache(maxsize=8)
def _filesystem(uri: str):
    from pyarrow.fs import FileSystem

    filesystem, _ = FileSystem.from_uri(uri)
    return filesystem


def parse_storage(storage: Path | str) -> Storage:
    """``--storage``: a folder, a ``file://`` URI, or ``s3://bucket[/prefix]`` /
    ``gs://bucket[/prefix]``; anything else is a one-line :class:`UserError`."""
    text = str(storage)
    if "://" not in text:
        return Storage(text, Path(text).expanduser().resolve())
    scheme = text.split("://", 1)[0].lower()
    if scheme == "file":
        from pyarrow.fs import FileSystem, LocalFileSystem

        try:
            filesystem, path = FileSystem.from_uri(text)
        except (ValueError, OSError) as exc:
            raise UserError(f"--storage {text}: not a valid file:// URI ({exc}); write file:///absolute/path") from None
        if not isinstance(filesystem, LocalFileSystem):
            raise UserError(f"--storage {text}: not a local file:// URI; write file:///absolute/path")
        return Storage(text, Path(path).resolve())
    if scheme not in OBJECT_STORE_SCHEMES:
        raise UserError(f"--storage {text}: {scheme}:// is not supported; use a folder, file:///path, "
                        "s3://bucket/prefix or gs://bucket/prefix")
    parsed = urlparse(text)
    bucket = parsed.netloc
    prefix = "/".join(p for p in unquote(parsed.path).split("/") if p)
    if not bucket or parsed.query or parsed.fragment or any(p in (".", "..") for p in prefix.split("/")):
        raise UserError(f"--storage {text}: expected {scheme}://bucket/prefix")
    uri = f"{scheme}://{bucket}" + (f"/{prefix}" if prefix else "")
    local = mirror_root() / scheme / bucket / prefix
    return Storage(text, local.resolve(), uri)


def _inside(folder: Path, location: str) -> str:
    """``location`` relative to ``folder`` ('' when it lies elsewhere)."""
    try:
        return Path(location).relative_to(folder).as_posix()
    except ValueError:
        return ""


def latest_experiment(storage: Storage, category: str) -> str:
    """Newest search of ``category`` in the bucket (a one-line UserError when none)."""
    found = storage.searches(category)
    if not found:
        raise UserError(f"no stored search for category {category!r} under {storage.uri}")
    return found[0]


def reading_view(storage_text: Path | str, category: str, experiment: str | None, *,
                 checkpoints: bool = False) -> tuple[Storage, str | None]:
    """The storage to read and the experiment to read from it. A folder is returned as
    is (the caller picks the experiment as before); for an object store the experiment
    (named, else the newest of ``category``) is pulled into the mirror first: its
    tables, and with ``checkpoints`` also its val sets and the checkpoint folders its
    trials name (what ensembling, export and the report load)."""
    storage = parse_storage(storage_text)
    if not storage.is_remote:
        return storage, experiment
    name = experiment or latest_experiment(storage, category)
    if not storage.has_search(name):
        raise UserError(f"no search named {name!r} in {storage.uri}")
    if checkpoints:
        storage.pull(name)
        folder = storage.local / name
        resolved = [r.get("checkpoint") for r in store.read_table(folder).to_pylist()]
        storage.pull_checkpoints(name, [_inside(folder, c) for c in resolved if c])
    else:
        storage.pull(name, TABLE_PARTS)
    return storage, name


def ensure_file(experiment_uri: str, experiment_dir: Path | str, relative: str) -> Path:
    """``<experiment_dir>/<relative>``, downloaded from ``<experiment_uri>/<relative>``
    first when this node does not have it (a trial on a node other than the driver's)."""
    target = Path(experiment_dir) / PurePosixPath(relative)
    if not target.exists():
        storage = parse_storage(experiment_uri.rsplit("/", 1)[0])
        storage._download(f"{storage._root()}/{experiment_uri.rsplit('/', 1)[1]}/{relative}", target)
    return target
