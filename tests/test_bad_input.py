"""Bad input and damaged files, command by command, as one table (issue 17).

Every refused case must: exit with its code (2 for bad input, 1 for a full disk), print exactly one
``error:`` line on stderr (``notice:`` lines aside), show no traceback, and leave every
file of the results folder, the bundle and the output paths as it was. Cases where a
damaged store file or checkpoint is *isolated* rather than refused are in a second
table: the command succeeds, names the damaged file in a warning, moves it aside
under ``<experiment>/damaged/`` and goes on with the rest.

Issue 25 adds data and faults as a factory hands them over: a product too small to split
into fit and val (in the table), a full disk under every writer (in the table through
the CLI, and writer by writer below; one test on a real full tmpfs), and searches
stopped by a full disk or by SIGINT/SIGTERM, then resumed.

One tiny real experiment (three CFA trials, frozen val anomalies, a bundle; built once
per module without Ray) is copied for each case, so cases cannot disturb each other.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from automl_ad.cli import main
from automl_ad.deploy.export import MANIFEST, file_checksum, manifest_digest
from automl_ad.tuning.lock import LOCK_FILE

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TINY_EXPERIMENT_CATEGORY as CATEGORY  # noqa: E402
from conftest import TINY_EXPERIMENT_TRIALS as TRIALS  # noqa: E402
from conftest import build_tiny_experiment  # noqa: E402

CAT = CATEGORY  # washer, 32 px


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad_input")
    build_tiny_experiment(root)  # root/data, root/results/exp1, root/models/washer
    return root


@dataclass
class World:
    """One case's own copies: ``results`` (the experiment exp1), ``bundle``, images."""

    built: Path
    tmp: Path

    @property
    def data(self) -> Path:
        return self.built / "data"  # read only: no case writes into the data root

    @property
    def results(self) -> Path:
        target = self.tmp / "results"
        if not target.exists():
            shutil.copytree(self.built / "results", target)
        return target

    @property
    def exp(self) -> Path:
        return self.results / "exp1"

    @property
    def bundle(self) -> Path:
        target = self.tmp / "bundle"
        if not target.exists():
            shutil.copytree(self.built / "models" / CAT, target)
        return target

    @property
    def images(self) -> Path:
        target = self.tmp / "images"
        if not target.exists():
            target.mkdir()
            rng = np.random.default_rng(0)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(target / f"ok{i}.png")
        return target

    def data_copy(self) -> Path:
        target = self.tmp / "data"
        if not target.exists():
            shutil.copytree(self.data, target)
        return target

    def store(self) -> list[str]:
        return ["--storage", str(self.results), "-e", "exp1"]

    def train(self, *extra: str, method: str = "cfa", data: Path | None = None) -> list[str]:
        return ["train", "-m", method, "-c", CAT, "--data", str(data or self.data), "--image-size", "32",
                "--epochs", "1", "--steps", "1", "--out", str(self.tmp / "run"), *extra]

    def search(self, *extra: str) -> list[str]:
        return ["search", "-c", CAT, "--data", str(self.data), "--storage", str(self.results), *extra]


# --- damaging files -------------------------------------------------------------------

def bomb_png(path: Path, width: int, height: int) -> Path:
    """A 70-byte PNG whose header declares width x height (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def rewrite_manifest(bundle: Path, rehash: bool = True, **changes) -> None:
    """Edit the manifest as a crafted (foreign) bundle would: checksums and digest redone."""
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest.update(changes)
    if rehash:
        manifest["checksums"] = {name: file_checksum(bundle / name) for name in manifest["checksums"]
                                 if (bundle / name).is_file()} | manifest.get("checksums_override", {})
        manifest.pop("checksums_override", None)
        manifest["manifest_sha256"] = manifest_digest(manifest)
    (bundle / MANIFEST).write_text(json.dumps(manifest))


def trial_file(w: World, index: int = 0) -> Path:
    return w.exp / "trials" / f"{TRIALS[index][0]}.parquet"


def checkpoint_file(w: World, index: int) -> Path:
    return w.exp / "checkpoints" / TRIALS[index][0] / "checkpoint.pt"


def search_record(w: World) -> dict:
    from automl_ad.tuning.budget import parse_budget

    record = json.loads((w.exp / "search.json").read_text())
    record.update({"budget": parse_budget("2trials").text, "seed": 0, "searcher": "tpe"})
    (w.exp / "search.json").write_text(json.dumps(record))
    return record


def hold_lock(w: World) -> None:
    """A live driver's lock (this test process is alive, on this host)."""
    import datetime as dt
    import socket

    search_record(w)
    (w.exp / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                               "started": dt.datetime(2026, 1, 1).isoformat(), "token": "other"}))


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


# --- the refused cases ------------------------------------------------------------------

@dataclass
class Case:
    id: str
    argv: Callable[[World], list[str]]
    needle: str
    code: int = 2
    report: bool = False  # data check: the problem is a line of its report on stdout, exit 2
    # Makes the disk "full" for the command (a writer's library call fails with ENOSPC
    # after writing part of its file), for the out-of-space cases (exit 1).
    patch: Callable[[pytest.MonkeyPatch], None] | None = None


# --- a full disk, as the libraries the writers call meet it ---------------------------

def no_space(filename: str | Path | None = None) -> OSError:
    """What a write on a full volume raises (with the file name when the OS gives one)."""
    error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if filename is not None:
        error.filename = str(filename)
    return error


class Replaced:
    """``module`` with some functions replaced, seen only by the module it is patched into."""

    def __init__(self, module: Any, **replaced: Any) -> None:
        self._module, self._replaced = module, replaced

    def __getattr__(self, name: str) -> Any:
        return self._replaced[name] if name in self._replaced else getattr(self._module, name)


def _half_then_full(target: Path | str, data: bytes = b"half a file") -> None:
    """Write the first bytes of a file, as a write that runs out of space does."""
    Path(target).write_bytes(data)


def full_disk_at_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    from automl_ad.tuning import lock

    def dump(obj: Any, stream: Any, **kwargs: Any) -> None:
        stream.write(json.dumps(obj)[:9])
        stream.flush()
        raise no_space()

    monkeypatch.setattr(lock, "json", Replaced(json, dump=dump))


def full_disk_at_val_set(monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors import SafetensorError

    from automl_ad.evaluation import validation

    def save_file(tensors: Any, filename: str, metadata: Any = None) -> None:
        _half_then_full(filename)
        # safetensors' own wording (Rust I/O error), as the issue saw it: not an OSError
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(validation, "save_file", save_file)


def full_disk_at_store(monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow.parquet as pq

    from automl_ad.results import store

    def write_table(table: Any, where: str, **kwargs: Any) -> None:
        _half_then_full(where, b"PAR1 half")
        raise no_space()

    monkeypatch.setattr(store, "pq", Replaced(pq, write_table=write_table))


def full_disk_at_report(monkeypatch: pytest.MonkeyPatch) -> None:
    from automl_ad.deploy import report

    class FillingUp:
        def __init__(self, stream: Any) -> None:
            self.stream = stream

        def __enter__(self) -> "FillingUp":
            return self

        def __exit__(self, *exc: Any) -> None:
            self.stream.close()

        def write(self, text: str) -> int:
            self.stream.write(text[:100])
            self.stream.flush()
            raise no_space()

    monkeypatch.setattr(report, "os", Replaced(os, fdopen=lambda fd, *a, **k: FillingUp(os.fdopen(fd, *a, **k))))


def full_disk_unnamed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk met in code that does not say what it wrote (a library's own write)."""
    from automl_ad.data import check

    def check_category(root: Path, category: str) -> None:
        raise no_space("/var/spool/somewhere/file.bin")

    monkeypatch.setattr(check, "check_category", check_category)


def _long_thin_parts(w: World) -> Path:
    """A copy of the data whose train/good images are 10 times wider than high."""
    data = w.data_copy()
    for path in (data / CAT / "train" / "good").iterdir():
        Image.open(path).resize((320, 32)).save(path)
    return data


def _one_good_image(w: World) -> Path:
    """A copy of the data whose product keeps a single train/good image."""
    data = w.data_copy()
    for extra in sorted((data / CAT / "train" / "good").iterdir())[1:]:
        extra.unlink()
    return data


def _report_over_an_old_page(w: World) -> list[str]:
    (w.tmp / "r.html").write_text("<html>the previous report</html>")
    return ["report", "-c", CAT, *w.store(), "--bundle", str(w.bundle), "--out", str(w.tmp / "r.html")]


def _train_bomb(w: World) -> list[str]:
    data = w.data_copy()
    bomb_png(data / CAT / "train" / "good" / "zz_bomb.png", 30000, 30000)
    return w.train(data=data)


def _check_bomb(w: World) -> list[str]:
    data = w.data_copy()
    bomb_png(data / CAT / "test" / "good" / "zz_bomb.png", 20000, 20000)
    return ["data", "check", str(data), "-c", CAT]


def _train_damaged_checkpoint(w: World) -> list[str]:
    run = w.tmp / "run"
    run.mkdir()
    shutil.copy(checkpoint_file(w, 0), run / "checkpoint.pt")
    truncate(run / "checkpoint.pt")
    return w.train("--resume")


def _predict_damaged(change: Callable[[Path], None]) -> Callable[[World], list[str]]:
    def argv(w: World) -> list[str]:
        change(w.bundle)
        return ["predict", str(w.bundle), str(w.images)]

    return argv


def _foreign_graph(bundle: Path) -> None:
    (bundle / "model.onnx").write_bytes(b"this is not an ONNX graph")
    rewrite_manifest(bundle)


def _outside_name(bundle: Path) -> None:
    manifest = json.loads((bundle / MANIFEST).read_text())
    files = {**manifest["files"], "onnx": "../outside.onnx"}
    rewrite_manifest(bundle, files=files)


def _all_checkpoints_damaged(w: World) -> list[str]:
    for index in range(len(TRIALS)):
        truncate(checkpoint_file(w, index), 0.3)
    return ["export", "-c", CAT, *w.store(), "--out", str(w.tmp / "bundle_out")]


def _corrupt_record(w: World) -> list[str]:
    (w.exp / "search.json").write_text("{not json")
    return ["ensemble", "-c", CAT, *w.store()]


def _lock_held(w: World) -> list[str]:
    hold_lock(w)
    return w.search("--budget", "2trials", "--resume", "--experiment", "exp1")


CASES = [
    # train: -p of every type, other options, data and checkpoints
    Case("train -p float", lambda w: w.train("-p", "lr=abc"), "-p lr=abc: cfa.lr takes a finite number"),
    Case("train -p int", lambda w: w.train("-p", "K=2.5"), "-p K=2.5: cfa.K takes an integer"),
    Case("train -p categorical", lambda w: w.train("-p", "label_mode=bogus", method="nsa"), "label_mode"),
    Case("train -p categorical backbone", lambda w: w.train("-p", "backbone=bogus"), "unknown backbone 'bogus'"),
    Case("train -p path", lambda w: w.train("-p", f"weights={w.tmp / 'nope.pt'}"), "existing checkpoint file"),
    Case("train -p list", lambda w: w.train("-p", "lr=[1,2]"), "takes one value"),
    Case("train -p no value", lambda w: w.train("-p", "lr"), "expects key=value"),
    Case("train -p unknown", lambda w: w.train("-p", "bogus=1"), "has no parameter(s) bogus"),
    Case("train --synth-param", lambda w: w.train("--synth-param", "bogus=1", method="draem"), "unknown parameter 'bogus'"),
    Case("train --synthesis", lambda w: w.train("--synthesis", "nope", method="draem"), "unknown synthesis family 'nope'"),
    Case("train unknown method", lambda w: w.train(method="nope"), "unknown method"),
    Case("train --device", lambda w: w.train("--device", "tpu"), "--device 'tpu'"),
    Case("train --image-size", lambda w: w.train("--image-size", "5"), "'--image-size': 5 is not in the range"),
    Case("train unknown category", lambda w: ["train", "-m", "cfa", "-c", "gadget", "--data", str(w.data),
                                               "--out", str(w.tmp / "run")], "gadget"),
    Case("train empty data root", lambda w: w.train(data=w.tmp), "category 'washer' not found"),
    Case("train --resume without checkpoint", lambda w: w.train("--resume"), "no checkpoint.pt"),
    Case("train --resume damaged checkpoint", _train_damaged_checkpoint, "damaged checkpoint"),
    Case("train decompression bomb", _train_bomb, "too large to decode safely"),
    # data
    Case("data check decompression bomb", _check_bomb, "too large to decode safely", report=True),
    Case("data check missing root", lambda w: ["data", "check", str(w.tmp / "nowhere"), "-c", CAT], "nowhere"),
    Case("data check unknown category", lambda w: ["data", "check", str(w.data), "-c", "gadget"], "gadget"),
    Case("data synth unknown product", lambda w: ["data", "synth", "--out", str(w.tmp / "s"), "--categories", "bottle"],
         "bottle"),
    # search (all refused before Ray starts)
    Case("search garbage budget", lambda w: w.search("--budget", "lots"), "lots"),
    Case("search zero budget", lambda w: w.search("--budget", "0m"), "budget"),
    Case("search no budget", lambda w: w.search(), "--budget is required"),
    Case("search missing space file", lambda w: w.search("--budget", "2trials", "--space", str(w.tmp / "no.yaml")),
         "no.yaml"),
    Case("search malformed space file", lambda w: w.search("--budget", "2trials", "--space",
                                                           str(_write(w.tmp / "bad.yaml", "params: [unclosed"))),
         "bad.yaml"),
    Case("search missing jobs file", lambda w: ["search", "--jobs", str(w.tmp / "jobs.yaml")], "--jobs file not found"),
    Case("search malformed jobs file", lambda w: ["search", "--jobs", str(_write(w.tmp / "jobs.yaml", "category: x"))],
         "expected a non-empty list"),
    Case("search unknown method", lambda w: w.search("--budget", "2trials", "--methods", "nope"), "nope"),
    Case("search empty data root", lambda w: ["search", "-c", CAT, "--budget", "2trials", "--data", str(w.tmp)],
         "washer"),
    Case("search --searcher", lambda w: w.search("--budget", "2trials", "--searcher", "grid"), "'--searcher'"),
    Case("search --gpus-per-trial", lambda w: w.search("--budget", "2trials", "--gpus-per-trial", "0"),
         "'--gpus-per-trial'"),
    # --max-gpus 0: the same refusal on a machine with a GPU as on one without
    Case("search GPU budget without GPUs", lambda w: w.search("--budget", "1gpu-h", "--max-gpus", "0"),
         "--budget 1gpu-h: the Ray cluster has no GPU"),
    Case("search --resume nothing to resume", lambda w: w.search("--budget", "2trials", "--resume"), "--resume"),
    Case("search second driver", _lock_held, "being searched by another driver (host"),
    Case("search --experiment unsafe", lambda w: w.search("--budget", "2trials", "--experiment", "../up"),
         "--experiment '../up'"),
    # issue 25: a product too small to split into fit and val, refused before Ray starts
    Case("search one good image", lambda w: ["search", "-c", CAT, "--data", str(_one_good_image(w)), "--budget", "2m",
                                             "--storage", str(w.results)],
         "train/good holds 1 good image; a search needs at least 2 (1 to fit, 1 held out to validate on)"),
    # issue 22: an aspect the geometry cannot keep is one line before Ray starts
    Case("search parts beyond 1:8", lambda w: ["search", "-c", CAT, "--data", str(_long_thin_parts(w)), "--budget",
                                               "2m", "--storage", str(w.results)],
         "aspect of 10 (width / height) is beyond 1:8; crop the images to the part first, or pass --geometry square"),
    # issue 24: DRAEM's texture source is checked before Ray starts
    Case("search texture dir missing", lambda w: w.search("--budget", "2trials", "--texture-dir", str(w.tmp / "nope")),
         "nope is not a folder"),
    Case("search texture dir without images", lambda w: w.search("--budget", "2trials", "--texture-dir", str(w.tmp)),
         "holds no images"),
    Case("train texture dir without images", lambda w: w.train("--texture-dir", str(w.tmp), method="draem"),
         "holds no images"),
    Case("train one good image", lambda w: w.train(data=_one_good_image(w)),
         "holds 1 good image; training needs at least 2"),
    # issue 25: a full disk is one line naming the file and what it holds, exit 1
    Case("search disk full at the driver lock", lambda w: w.search("--budget", "2trials", "--experiment", "full"),
         "out of disk space writing the driver lock", code=1, patch=full_disk_at_lock),
    Case("train disk full at the val set", lambda w: w.train(), "out of disk space writing the frozen val set",
         code=1, patch=full_disk_at_val_set),
    Case("ensemble disk full at the store", lambda w: ["ensemble", "-c", CAT, *w.store()],
         "out of disk space writing results (ensembles table)", code=1, patch=full_disk_at_store),
    Case("report disk full", _report_over_an_old_page, "out of disk space writing the report", code=1,
         patch=full_disk_at_report),
    Case("data check disk full in a library", lambda w: ["data", "check", str(w.data), "-c", CAT],
         "out of disk space writing /var/spool/somewhere/file.bin (No space left on device)", code=1,
         patch=full_disk_unnamed),
    # results, ensemble, export, report
    Case("results unknown category", lambda w: ["results", "-c", "gadget", "--storage", str(w.results)], "gadget"),
    Case("results unsafe experiment", lambda w: ["results", "-c", CAT, "--storage", str(w.results),
                                                 "--experiment", "../x"], "--experiment '../x'"),
    Case("ensemble corrupt search.json", _corrupt_record, "corrupt"),
    Case("ensemble unknown experiment", lambda w: ["ensemble", "-c", CAT, "--storage", str(w.results), "-e", "nope"],
         "no search named 'nope'"),
    Case("export unknown format", lambda w: ["export", "-c", CAT, *w.store(), "--format", "tflite",
                                             "--out", str(w.tmp / "b")], "--format 'tflite'"),
    Case("export --fpr out of range", lambda w: ["export", "-c", CAT, *w.store(), "--fpr", "2",
                                                 "--out", str(w.tmp / "b")], "--fpr 2.0"),
    Case("export every checkpoint damaged", _all_checkpoints_damaged, "has a usable checkpoint"),
    Case("report tampered bundle", lambda w: ["report", "-c", CAT, *w.store(), "--bundle",
                                              str(_predict_damaged(lambda b: truncate(b / "model.onnx"))(w)[1]),
                                              "--out", str(w.tmp / "r.html")], "truncated or replaced"),
    # predict: bundles checked before they run
    Case("predict truncated graph", _predict_damaged(lambda b: truncate(b / "model.onnx")), "truncated or replaced"),
    Case("predict modified graph", _predict_damaged(lambda b: _flip_byte(b / "model.onnx")), "modified after export"),
    Case("predict foreign graph", _predict_damaged(_foreign_graph), "cannot be loaded by ONNX Runtime"),
    Case("predict name outside bundle", _predict_damaged(_outside_name), "outside the bundle folder"),
    Case("predict newer format", _predict_damaged(lambda b: rewrite_manifest(b, bundle_version=99)),
         "format version 99, newer than this automl-ad reads"),
    Case("predict format without checksums", _predict_damaged(lambda b: rewrite_manifest(b, bundle_version=1)),
         "records no checksums"),
    Case("predict edited manifest", _predict_damaged(
        lambda b: rewrite_manifest(b, rehash=False, operating_point={"threshold": 0.0})), "edited after export"),
    Case("predict missing manifest", _predict_damaged(lambda b: (b / MANIFEST).unlink()), "not a model bundle"),
    Case("predict broken manifest", _predict_damaged(lambda b: (b / MANIFEST).write_text("{")), "corrupt"),
    Case("predict no images", lambda w: ["predict", str(w.bundle), str(_mkdir(w.tmp / "empty"))], "no image files"),
    Case("predict --batch-size", lambda w: ["predict", str(w.bundle), str(w.images), "--batch-size", "0"],
         "'--batch-size'"),
    Case("predict decompression bomb", lambda w: ["predict", str(w.bundle),
                                                  str(bomb_png(w.tmp / "bomb.png", 30000, 30000))],
         "too large to decode safely", code=1),
]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (the case's copies and outputs) with its SHA-256."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def invoke(argv: list[str]):
    return CliRunner().invoke(main, argv)


def _no_traceback(result) -> None:
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output


def test_there_are_at_least_thirty_cases():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_refused_in_one_line_leaving_everything_as_it_was(case: Case, built: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch):
    world = World(built, tmp_path)
    argv = case.argv(world)
    before = snapshot(tmp_path)
    if case.patch is not None:
        case.patch(monkeypatch)
    result = invoke(argv)
    _no_traceback(result)
    assert result.exit_code == case.code, result.output
    if case.report:
        assert result.stderr == "" and "NOT usable" in result.stdout
        assert case.needle in result.stdout
    else:
        # notice: and warning: lines (a damaged file left out on the way) are not errors
        lines = [line for line in result.stderr.splitlines() if line.strip()
                 and not line.startswith(("notice:", "warning:"))]
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert case.needle in lines[0], lines[0]
    assert snapshot(tmp_path) == before


# --- damaged files that are isolated, not fatal -------------------------------------------

def _assert_set_aside(world: World, result, damaged: Path) -> None:
    _no_traceback(result)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert any(str(damaged) in line and "moved to" in line for line in warnings), result.stderr
    assert not damaged.exists()
    assert (world.exp / "damaged" / damaged.parent.name / damaged.name).is_file()  # kept, not deleted


def test_results_leave_out_a_truncated_trial_file_and_show_the_rest(built, tmp_path):
    world = World(built, tmp_path)
    damaged = truncate(trial_file(world, 0))
    result = invoke(["results", "-c", CAT, "--storage", str(world.results)])
    _assert_set_aside(world, result, damaged)
    assert TRIALS[1][0] in result.stdout and TRIALS[2][0] in result.stdout and TRIALS[0][0] not in result.stdout
    again = invoke(["results", "-c", CAT, "--storage", str(world.results)])  # set aside once, then quiet
    assert again.exit_code == 0 and "warning" not in again.stderr


def test_a_foreign_parquet_file_among_the_trials_is_set_aside(built, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    world = World(built, tmp_path)
    foreign = world.exp / "trials" / "foreign.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), foreign)
    result = invoke(["results", "-c", CAT, "--storage", str(world.results), "--experiment", "exp1"])
    _assert_set_aside(world, result, foreign)
    assert all(t[0] in result.stdout for t in TRIALS)


def test_report_and_ensemble_go_on_without_a_damaged_trial_file(built, tmp_path):
    world = World(built, tmp_path)
    damaged = trial_file(world, 1)
    damaged.write_bytes(b"PAR1 not really parquet")
    report = invoke(["report", "-c", CAT, *world.store(), "--bundle", str(world.bundle), "--out",
                     str(tmp_path / "r.html")])
    _assert_set_aside(world, report, damaged)
    assert (tmp_path / "r.html").is_file()
    ensemble = invoke(["ensemble", "-c", CAT, *world.store(), "--k", "2", "--top", "3"])
    assert ensemble.exit_code == 0, ensemble.output
    assert TRIALS[1][0] not in ensemble.stdout and "chosen:" in ensemble.stdout


def test_export_falls_back_to_an_earlier_checkpoint_or_leaves_the_trial_out(built, tmp_path):
    world = World(built, tmp_path)
    best = TRIALS[0][0]
    # Trial 0 as Tune keeps it: checkpoint_000002 (damaged: wrong shapes) after checkpoint_000001.
    trial_dir = world.exp / "checkpoints" / best
    older, newer = trial_dir / "checkpoint_000001", trial_dir / "checkpoint_000002"
    older.mkdir()
    shutil.copy(trial_dir / "checkpoint.pt", older / "checkpoint.pt")
    newer.mkdir()
    _swap_weights(trial_dir / "checkpoint.pt", checkpoint_file(world, 2), newer / "checkpoint.pt")
    _point_trial_at(world, 0, newer)
    truncate(checkpoint_file(world, 1), 0.2)  # trial 1 has no earlier checkpoint: left out
    out = tmp_path / "bundle_out"
    result = invoke(["export", "-c", CAT, *world.store(), "--out", str(out), "--format", "onnx", "--k", "3"])
    _no_traceback(result)
    assert result.exit_code == 0, result.output
    assert f"trial {best}: using its earlier checkpoint {older}" in result.stderr
    assert f"trial {TRIALS[1][0]} left out" in result.stderr
    assert "damaged checkpoint" in result.stderr and "do not fit" in result.stderr
    manifest = json.loads((out / MANIFEST).read_text())
    assert TRIALS[1][0] not in {m["trial_id"] for m in manifest["members"]}
    assert invoke(["predict", str(out), str(world.images)]).exit_code == 0


def _swap_weights(own: Path, other: Path, out: Path) -> None:
    """A checkpoint with its own config but another trial's weights (other shapes)."""
    import torch

    state = torch.load(own, weights_only=True)
    state["method"] = torch.load(other, weights_only=True)["method"]
    torch.save(state, out)


def _point_trial_at(world: World, index: int, checkpoint: Path) -> None:
    from automl_ad.results import store

    row = store.read_table(world.exp).to_pylist()
    row = next(r for r in row if r["trial_id"] == TRIALS[index][0])
    row["checkpoint"] = str(checkpoint)
    row["params"] = json.loads(row["params"])
    store.write_trial(world.exp, {k: v for k, v in row.items() if not k.startswith("param_")})


def test_a_failed_export_leaves_the_previous_bundle_untouched(built, tmp_path):
    world = World(built, tmp_path)
    before = snapshot(world.bundle)
    for index in range(len(TRIALS)):
        truncate(checkpoint_file(world, index), 0.3)
    result = invoke(["export", "-c", CAT, *world.store(), "--out", str(world.bundle)])
    assert result.exit_code == 2 and snapshot(world.bundle) == before


# --- bundles, images and the driver lock at the library level -------------------------------

def test_a_verified_bundle_loads_and_ignores_files_written_beside_it(built, tmp_path):
    from automl_ad.deploy.export import BUNDLE_VERSION, load_bundle

    world = World(built, tmp_path)
    (world.bundle / "report.html").write_text("<html></html>")  # what search writes next to it
    bundle = load_bundle(world.bundle)
    assert bundle.manifest["bundle_version"] == BUNDLE_VERSION == 2
    for name, recorded in bundle.manifest["checksums"].items():
        assert recorded == file_checksum(world.bundle / name)


def test_an_8k_image_passes_the_size_limit_and_a_bomb_does_not(tmp_path):
    from automl_ad.data.images import image_size_of, read_image
    from automl_ad.errors import UserError

    assert image_size_of(bomb_png(tmp_path / "8k.png", 8192, 8192)) == (8192, 8192)
    for width, height in ((30000, 30000), (9500, 9500), (70000, 4)):
        with pytest.raises(UserError, match="too large to decode safely"):
            read_image(bomb_png(tmp_path / f"b{width}.png", width, height))


def test_a_stale_lock_from_a_killed_driver_is_taken_over(tmp_path):
    import socket

    from automl_ad.tuning.lock import acquire

    folder = tmp_path / "exp"
    folder.mkdir()
    (folder / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid(),
                                                "started": "2026-01-01T00:00:00+00:00", "token": "old"}))
    lock = acquire(folder, "exp")
    assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (folder / LOCK_FILE).exists()


def test_a_lock_from_another_host_is_stale_only_once_its_heartbeat_stops(tmp_path):
    import time

    from automl_ad.errors import UserError
    from automl_ad.tuning.lock import STALE_AFTER_S, acquire

    folder = tmp_path / "exp"
    folder.mkdir()
    lock_path = folder / LOCK_FILE
    lock_path.write_text(json.dumps({"host": "node-7", "pid": 1, "started": "2026-01-01T00:00:00+00:00", "token": "x"}))
    with pytest.raises(UserError, match="host node-7, pid 1"):
        acquire(folder, "exp")
    old = time.time() - STALE_AFTER_S - 5
    os.utime(lock_path, (old, old))
    acquire(folder, "exp").release()


# --- the search: a resume after damage, and a second driver ---------------------------------

def test_resume_stores_a_damaged_trial_row_again_and_a_second_driver_is_refused(tmp_path, tiny_mvtec, ray_session):
    from automl_ad.results import store
    from automl_ad.errors import UserError
    from automl_ad.tuning.lock import acquire
    from automl_ad.tuning.search import run_search
    from conftest import search_options as options

    summary = run_search(options(tmp_path, tiny_mvtec, budget="2trials", experiment="dmg"))
    folder = summary.experiment_dir
    rows = {r["trial_id"]: r for r in store.read_table(folder).to_pylist()}
    assert len(rows) == 2 and not (folder / LOCK_FILE).exists(), "the lock goes with the driver"
    lost = sorted(rows)[0]
    damaged = truncate(folder / "trials" / f"{lost}.parquet")
    ledger = (folder / "budget.json").read_bytes()

    held = acquire(folder, "dmg")  # another driver is running this experiment
    try:
        with pytest.raises(UserError, match=r"being searched by another driver \(host .*, pid \d+, since "):
            run_search(options(tmp_path, tiny_mvtec, budget="2trials", experiment="dmg", resume=True))
    finally:
        held.release()
    assert (folder / "budget.json").read_bytes() == ledger and damaged.is_file(), "the refused driver wrote nothing"

    run_search(options(tmp_path, tiny_mvtec, budget="2trials", experiment="dmg", resume=True))
    again = {r["trial_id"]: r for r in store.read_table(folder).to_pylist()}
    assert sorted(again) == sorted(rows), "the lost row is stored again, no trial twice"
    assert again[lost]["objective"] == pytest.approx(rows[lost]["objective"])
    assert (folder / "damaged" / "trials" / damaged.name).is_file()


# --- a trial Tune restores from a damaged checkpoint -----------------------------------------

class _RestoringReporter:
    """What Ray Tune hands a restored trial, without a cluster: its last checkpoint (a
    real ``ray.tune.Checkpoint`` over a folder) and a record of what the trial reports."""

    rank = 0
    trial_id = TRIALS[0][0]

    def __init__(self, folder: Path) -> None:
        from ray.tune import Checkpoint

        self.checkpoint = Checkpoint.from_directory(str(folder))
        self.epochs: list[int] = []

    def get_checkpoint(self):
        return self.checkpoint

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        self.epochs.append(int(metrics["epoch"]))


@pytest.mark.parametrize("damage", ["truncated", "wrong shapes"])
def test_a_trial_restored_from_a_damaged_checkpoint_runs_again_from_the_start(
        built, tmp_path, damage, monkeypatch, capfd):
    from automl_ad.tuning import trainable

    world = World(built, tmp_path)
    restored = tmp_path / "restored"
    restored.mkdir()
    if damage == "truncated":
        truncate(shutil.copy(checkpoint_file(world, 0), restored / "checkpoint.pt"), 0.4)
    else:  # reads as a checkpoint, but holds another backbone's weights
        _swap_weights(checkpoint_file(world, 0), checkpoint_file(world, 2), restored / "checkpoint.pt")
    reporter = _RestoringReporter(restored)
    monkeypatch.setattr(trainable, "_Reporter", lambda use_train: reporter)
    trial_id, method, _, params = TRIALS[0]
    context = trainable.TrialContext(
        experiment="exp1", experiment_dir=str(world.exp), category=CAT, data_root=str(world.data), seed=0,
        default_image_size=32, max_epochs=2, steps_per_epoch=1, batch_size=4, use_train=False)
    flat = {"method": method, "image_size": 32, **{f"{method}.{k}": v for k, v in params.items()}}

    trainable.train_worker_loop({"context": dataclasses.asdict(context), "config": flat})

    assert reporter.epochs == [1, 2], "the damaged checkpoint's epoch 1 was not resumed: epoch 1 ran again"
    warnings = [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, warnings
    # It names the worker's copy of the restored checkpoint (Tune's folder may be remote).
    assert f"trial {trial_id}: damaged checkpoint " in warnings[0] and "checkpoint.pt" in warnings[0]
    assert warnings[0].endswith("running it again from the start")


# --- issue 25: every writer on a full disk names its file and keeps the previous one ------

def _torch_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.save on a full volume, as it really fails: a RuntimeError from its zip writer
    whose context is the OSError(ENOSPC) the Python file raised (seen on a 64 KiB tmpfs)."""
    import torch

    from automl_ad import experiment

    def save(obj: Any, handle: Any) -> None:
        handle.write(b"PK half a zip")
        try:
            raise no_space()
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(experiment, "torch", Replaced(torch, save=save))


def _record_full(monkeypatch: pytest.MonkeyPatch) -> None:
    from automl_ad import experiment

    class FullPath(type(Path())):
        def write_text(self, *args: Any, **kwargs: Any) -> int:
            self.write_bytes(b'{"category": "hal')
            raise no_space()

    monkeypatch.setattr(experiment, "Path", FullPath)


def _cache_full(monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch
    from safetensors import SafetensorError

    def save_file(tensors: Any, filename: str, metadata: Any = None) -> None:
        _half_then_full(filename)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def _ledger_full(monkeypatch: pytest.MonkeyPatch) -> None:
    from automl_ad.tuning import budget

    def dump(obj: Any, stream: Any, **kwargs: Any) -> None:
        stream.write('{"budget": "ha')
        stream.flush()
        raise no_space()

    monkeypatch.setattr(budget, "json", Replaced(json, dump=dump))


def _write_checkpoint(w: World) -> Path:
    from automl_ad import experiment

    folder = checkpoint_file(w, 0).parent
    experiment.write_checkpoint(folder, experiment.read_checkpoint(folder))
    return folder / "checkpoint.pt"


def _write_record(w: World) -> Path:
    from automl_ad import experiment

    experiment.write_record(w.exp, {"category": CAT, "data": "elsewhere"})
    return w.exp / "search.json"


def _write_row(w: World) -> Path:
    from automl_ad.results import store

    store.write_rows(w.exp, store.TRIALS, TRIALS[0][0], [{"trial_id": TRIALS[0][0]}], {})
    return trial_file(w, 0)


def _write_val_set(w: World) -> Path:
    from automl_ad.evaluation.validation import load_image_set, save_image_set

    path = w.exp / "val" / "val_anomalies_32px.safetensors"
    save_image_set(load_image_set(path), path)
    return path


def _write_cache(w: World) -> Path:
    from automl_ad.data.dataset import clear_memory_cache, load_category

    clear_memory_cache()
    load_category(w.data, CAT, 24, cache_dir=w.exp / "cache")  # a size not cached yet
    return w.exp / "cache"


def _write_ledger(w: World) -> Path:
    from automl_ad.tuning.budget import Ledger, parse_budget

    ledger = Ledger(w.exp, parse_budget("2trials"))
    ledger.record("t1", 1.0, 5.0)
    return w.exp / "budget.json"


def _write_lock(w: World) -> Path:
    from automl_ad.tuning.lock import acquire

    acquire(w.results / "new-experiment", "new-experiment")
    return w.results / "new-experiment" / LOCK_FILE


def _write_report(w: World) -> Path:
    from automl_ad.deploy.report import write_atomic

    page = w.tmp / "report.html"
    write_atomic(page, "<html>" + "x" * 10_000 + "</html>")
    return page


def _old_page(w: World) -> None:
    (w.tmp / "report.html").write_text("<html>the previous report</html>")


def _first_ledger(w: World) -> None:
    from automl_ad.tuning.budget import Ledger, parse_budget

    Ledger(w.exp, parse_budget("2trials")).record("t0", 1.0, 1.0)  # a good budget.json to keep


WRITERS = [
    # (id, make the disk full, write, what the error names, set up a previous file)
    ("checkpoint", _torch_full, _write_checkpoint, "a checkpoint", None),
    ("search record", _record_full, _write_record, "the search record", None),
    ("store row", full_disk_at_store, _write_row, "results (trials table)", None),
    ("val set", full_disk_at_val_set, _write_val_set, "the frozen val set", None),
    ("data cache", _cache_full, _write_cache, "the data cache", None),
    ("budget ledger", _ledger_full, _write_ledger, "the budget ledger", _first_ledger),
    ("driver lock", full_disk_at_lock, _write_lock, "the driver lock", None),
    ("report", full_disk_at_report, _write_report, "the report", _old_page),
]


@pytest.mark.parametrize("writer", WRITERS, ids=[w[0] for w in WRITERS])
def test_a_full_disk_is_one_error_naming_the_file_and_the_previous_file_stays(writer, built, tmp_path, monkeypatch):
    from automl_ad.errors import OutOfSpace

    _, fill, write, what, before_write = writer
    world = World(built, tmp_path)
    world.exp  # the copies exist before the disk fills
    if before_write is not None:
        before_write(world)
    before = snapshot(tmp_path)
    fill(monkeypatch)
    with pytest.raises(OutOfSpace) as raised:
        write(world)
    error = raised.value
    assert error.exit_code == 1 and "\n" not in str(error)
    assert str(error).startswith(f"out of disk space writing {what} ") and "No space left on device" in str(error)
    assert error.path is not None and Path(error.path).is_relative_to(tmp_path), error.path
    assert snapshot(tmp_path) == before, "no half-written file in place of a good one, no temporary file left"
    if writer[0] == "driver lock":
        assert not (world.results / "new-experiment").exists(), "no empty lock or folder that would hold off --resume"


def test_the_real_torch_writers_raise_what_the_checkpoint_and_bundle_writers_recognise(tmp_path):
    """torch.save and torch.jit.save through a Python file: their error on a full volume
    chains the OSError (checked on /dev/full, a device every write to fails with ENOSPC)."""
    import torch

    from automl_ad.errors import out_of_space

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    with pytest.raises(BaseException) as saved:
        with open("/dev/full", "wb") as handle:
            torch.save({"x": torch.zeros(100_000)}, handle)
    assert out_of_space(saved.value), repr(saved.value)
    traced = torch.jit.trace(torch.nn.Linear(4, 4), (torch.zeros(1, 4),))
    with pytest.raises(BaseException) as scripted:
        with open("/dev/full", "wb") as handle:
            torch.jit.save(traced, handle)
    assert out_of_space(scripted.value), repr(scripted.value)


def test_a_full_disk_during_export_leaves_the_previous_bundle(built, tmp_path, monkeypatch):
    import torch

    world = World(built, tmp_path)
    before = snapshot(world.bundle)

    def export(model: Any, args: Any, f: str, **kwargs: Any) -> None:
        _half_then_full(f, b"\x08half a graph")
        raise no_space(f)

    monkeypatch.setattr(torch.onnx, "export", export)
    result = invoke(["export", "-c", CAT, *world.store(), "--out", str(world.bundle), "--format", "onnx"])
    _no_traceback(result)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert lines == [f"error: out of disk space writing the bundle {world.bundle} (No space left on device)"]
    assert snapshot(world.bundle) == before, "the previous bundle is kept whole"
    assert not [p for p in world.bundle.parent.iterdir() if p.name.startswith(f".{world.bundle.name}.")], \
        "no staging folder left"


def test_a_trial_that_found_the_disk_full_stops_the_search_naming_its_file(tmp_path):
    """StopOnFullDisk on the error Tune pickles for a trial (a RayTaskError around the
    trial's OutOfSpace), and on Tune's text form of a library's error."""
    from ray.exceptions import RayTaskError

    from automl_ad.errors import OutOfSpace
    from automl_ad.tuning.interrupt import StopOnFullDisk

    class FailedTrial:
        trial_id = "abc123"

        def __init__(self, error: BaseException | None, text: BaseException | None = None) -> None:
            self.error, self.text = error, text

        def get_pickled_error(self):
            return self.error

        def get_error(self):
            return self.text

    inner = OutOfSpace(tmp_path / "exp" / "cache" / "screw-32px.safetensors", "the data cache")
    wrapped = RayTaskError("run_trial", "Traceback (most recent call last): ...", inner).as_instanceof_cause()
    with pytest.raises(OutOfSpace) as stopped:
        StopOnFullDisk(tmp_path / "exp").on_trial_error(0, [], FailedTrial(wrapped))
    assert str(stopped.value) == (f"out of disk space writing the data cache {tmp_path}/exp/cache/screw-32px.safetensors "
                                  "(No space left on device)")
    from ray.tune import TuneError

    text = TuneError("Failure # 1\nOSError: [Errno 28] Error writing bytes to file. Detail: [errno 28] No space left "
                     "on device")
    with pytest.raises(OutOfSpace, match=r"writing the files of trial abc123 .*exp \(OSError: \[Errno 28\]"):
        StopOnFullDisk(tmp_path / "exp").on_trial_recover(0, [], FailedTrial(None, text))
    StopOnFullDisk(tmp_path / "exp").on_trial_error(0, [], FailedTrial(RuntimeError("CUDA out of memory")))


def _mountable() -> bool:
    if not shutil.which("unshare") or sys.platform != "linux":
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt || "
                            "mount -t tmpfs -o size=64k tmpfs /tmp"], capture_output=True)
    return probe.returncode == 0


def test_train_on_a_really_full_volume_is_one_line_and_leaves_no_half_file(built, tmp_path):
    """A real ENOSPC: ``train --out`` on a 256 KiB tmpfs (mounted in a user+mount
    namespace, no root needed) that the val set or the checkpoint overflows."""
    if not _mountable():
        pytest.skip("cannot mount a tmpfs in a user namespace here")
    world = World(built, tmp_path)
    volume = tmp_path / "volume"
    volume.mkdir()
    argv = " ".join(world.train("--image-size", "64")).replace(str(tmp_path / "run"), str(volume / "run"))
    script = (f"mount -t tmpfs -o size=256k tmpfs {volume} && "
              f"{sys.executable} {Path(__file__).resolve().parents[1] / 'cli.py'} {argv}; "
              f"echo rc=$?; ls -A {volume / 'run'}")
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: out of disk space writing "), done.stderr
    assert str(volume / "run") in errors[0] and "No space left on device" in errors[0]
    assert "rc=1" in done.stdout, done.stdout
    left = done.stdout.split("rc=1", 1)[1].split()
    assert not [name for name in left if name.startswith(".") or name.endswith(".tmp")], left


# --- issue 25: searches stopped by a full disk or a signal, then resumed (Ray) -------------

def _no_temporary_files(folder: Path) -> list[Path]:
    """The project's temporary files (Tune's own folder aside) left in the experiment."""
    return [p for p in folder.rglob("*.tmp") if "tune" not in p.relative_to(folder).parts]


def test_a_full_disk_stops_the_search_in_one_error_and_resume_goes_on(tmp_path, tiny_mvtec, ray_session,
                                                                     monkeypatch):
    import pyarrow.parquet as pq

    from automl_ad.errors import OutOfSpace
    from automl_ad.results import store
    from automl_ad.tuning.search import run_search
    from conftest import search_options as options

    rows_written: list[str] = []

    def write_table(table: Any, where: str, **kwargs: Any) -> None:
        if Path(where).parent.name == store.TRIALS:
            rows_written.append(where)
            if len(rows_written) == 2:  # the disk fills up while the second trial is stored
                _half_then_full(where, b"PAR1 half")
                raise no_space()
        pq.write_table(table, where, **kwargs)

    monkeypatch.setattr(store, "pq", Replaced(pq, write_table=write_table))
    folder = tmp_path / "results" / "full"
    with pytest.raises(OutOfSpace) as full:
        run_search(options(tmp_path, tiny_mvtec, budget="4trials", experiment="full"))
    message = str(full.value)
    assert message.startswith(f"out of disk space writing results (trials table) {folder / 'trials'}/"), message
    assert len(store.stored_trial_ids(folder)) == 1 and not _no_temporary_files(folder)
    store.check_tables(folder)
    assert not (folder / "damaged").exists(), "what was stored reads back whole"
    json.loads((folder / "budget.json").read_text())
    assert not (folder / LOCK_FILE).exists(), "the lock goes with the driver"

    monkeypatch.undo()  # space freed
    summary = run_search(options(tmp_path, tiny_mvtec, budget="4trials", experiment="full", resume=True))
    rows = store.read_table(summary.experiment_dir).to_pylist()
    assert len(rows) == len({r["trial_id"] for r in rows}) == 4, "each trial stored once"
    assert all(r["objective"] is not None for r in rows)


def test_sigint_stops_a_search_cleanly_and_resume_finishes_it(tmp_path, tiny_mvtec, ray_session):
    import signal
    import threading
    import time

    from automl_ad.errors import Interrupted
    from automl_ad.results import store
    from automl_ad.tuning.interrupt import SignalGuard
    from automl_ad.tuning.search import run_search
    from conftest import search_options as options

    folder = tmp_path / "results" / "stop"

    def interrupt_once_a_trial_runs() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ledger = folder / "budget.json"
            if ledger.is_file() and '"running"' in ledger.read_text():
                os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C does
                return
            time.sleep(0.05)

    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    threading.Thread(target=interrupt_once_a_trial_runs, daemon=True).start()
    with SignalGuard() as guard, pytest.raises(Interrupted) as stopped:
        run_search(options(tmp_path, tiny_mvtec, budget="4trials", experiment="stop"))
    assert stopped.value.signum == signal.SIGINT and stopped.value.exit_code == 130
    assert (guard.experiment, guard.folder) == ("stop", folder)
    assert {s: signal.getsignal(s) for s in handlers} == handlers, "the guard puts the handlers back"
    stored = store.stored_trial_ids(folder)
    assert len(stored) < 4, "stopped, not run to the end"
    assert not _no_temporary_files(folder) and not (folder / LOCK_FILE).exists()
    ledger = json.loads((folder / "budget.json").read_text())
    assert "running" in {entry["state"] for entry in ledger["trials"].values()}, "the stopped trial resumes"

    summary = run_search(options(tmp_path, tiny_mvtec, budget="4trials", experiment="stop", resume=True))
    rows = store.read_table(summary.experiment_dir).to_pylist()
    assert len(rows) == len({r["trial_id"] for r in rows}) == 4
    assert set(stored) <= {r["trial_id"] for r in rows}
    assert all(r["objective"] is not None for r in rows)


def test_a_product_just_above_the_minimum_searches_and_says_what_it_cannot_give(tmp_path, ray_session, capfd):
    from automl_ad.data.builtin import generate_builtin
    from automl_ad.evaluation.validation import load_image_set
    from automl_ad.synthesis import val_families
    from automl_ad.results import store
    from automl_ad.tuning.search import run_search
    from conftest import search_options as options

    data = generate_builtin(tmp_path / "data", ["screw"], n_train=2, n_test=4, image_size=32, seed=0)
    summary = run_search(options(tmp_path, data, budget="1trials", experiment="small"))
    notices = [line for line in capfd.readouterr().err.splitlines() if line.startswith("notice: category")]
    assert notices == [
        "notice: category 'screw' has 2 good images (1 to fit, 1 held out): every trial is judged on that one good "
        "image and the synthetic anomalies made from it, so the model choice and the bundle's threshold are coarse "
        "(8 or more good images hold out 2)"]
    rows = store.read_table(summary.experiment_dir).to_pylist()
    assert len(rows) == 1 and rows[0]["objective"] is not None
    val = load_image_set(summary.experiment_dir / "val" / "val_anomalies_32px.safetensors")
    assert len(val) <= len(val_families()), "one synthetic anomaly per family, from the one val image"


SIGNAL_SCRIPT_TIMEOUT_S = 150


@pytest.mark.slow
@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_the_search_command_stopped_by_a_signal_prints_its_resume_command(signame, tmp_path, tiny_mvtec,
                                                                          monkeypatch):
    """The CLI in its own process (its own Ray, Ray Train trials): Ctrl-C (SIGINT to the
    process group, as a terminal sends it) or SIGTERM (to the driver, as kill, systemd or
    Kubernetes send it) once the first trial runs."""
    import shlex
    import signal
    import time

    from automl_ad.results import store
    from conftest import tiny_space_dir

    tiny_space_dir(tmp_path / "search_spaces")  # read from the working directory: seconds per trial
    argv = ["search", "--category", "screw", "--budget", "4trials", "--data", str(tiny_mvtec), "--methods", "ssae",
            "--storage", "results", "--image-size", "32", "--no-export", "--experiment", "sig"]
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    driver = subprocess.Popen([sys.executable, str(repo / "cli.py"), *argv], cwd=tmp_path, env=env,
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    folder = tmp_path / "results" / "sig"
    try:
        deadline = time.monotonic() + SIGNAL_SCRIPT_TIMEOUT_S
        while driver.poll() is None and time.monotonic() < deadline:
            ledger = folder / "budget.json"
            if ledger.is_file() and '"running"' in ledger.read_text():
                break
            time.sleep(0.2)
        assert driver.poll() is None, "the search ended before a trial ran"
        time.sleep(1.0)  # inside the trial
        if signame == "SIGINT":
            os.killpg(driver.pid, signal.SIGINT)
        else:
            os.kill(driver.pid, signal.SIGTERM)
        _, stderr = driver.communicate(timeout=SIGNAL_SCRIPT_TIMEOUT_S)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    number = getattr(signal, signame)
    assert driver.returncode == 128 + number, stderr
    assert "Traceback" not in stderr and "Tuner.restore" not in stderr and "Resume experiment" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    stored = len(store.stored_trial_ids(folder))
    command = ("automl-ad search --category screw --budget 4trials --data " + shlex.quote(str(tiny_mvtec))
               + " --methods ssae --storage results --image-size 32 --no-export --experiment sig --resume")
    assert errors == [f"error: search stopped by {signame}; experiment sig is saved in {folder} ({stored} trial"
                      f"{'' if stored == 1 else 's'} stored); resume it with: {command}"], stderr
    # The store is consistent: every file reads back, nothing half written, no lock held.
    json.loads((folder / "budget.json").read_text())
    store.check_tables(folder)
    assert not (folder / "damaged").exists() and not _no_temporary_files(folder)
    assert not (folder / LOCK_FILE).exists()
    # The printed command is one this CLI runs on this experiment (--plan: its stored plan).
    monkeypatch.chdir(tmp_path)
    words = shlex.split(command)
    assert words[0] == "automl-ad"
    planned = invoke([*words[1:], "--plan"])
    assert planned.exit_code == 0, planned.output
    assert "fixed by fidelity.steps_per_epoch" in planned.output


@pytest.mark.parametrize("stop", ["full disk", "SIGTERM", "full disk before the record"])
def test_the_search_command_ends_a_stopped_search_with_the_command_that_resumes_it(stop, built, tmp_path,
                                                                                     monkeypatch):
    """The CLI's side without Ray: whatever stops run_search once the experiment exists, the
    one error line ends with this search's own resume command (the options the user gave,
    the experiment named, --resume); before the experiment exists, with "run it again"."""
    import signal

    from automl_ad import experiment as layout
    from automl_ad.errors import Interrupted
    from automl_ad.tuning import interrupt, search

    world = World(built, tmp_path)
    folder = world.results / "auto-named"

    def run_search(options: Any) -> None:
        if stop != "full disk before the record":
            interrupt.watch("auto-named", folder)
            layout.write_record(folder, {"category": CAT, "data": str(world.data)})
        if stop == "SIGTERM":
            raise Interrupted(signal.SIGTERM)
        raise no_space(folder / "optuna.db")  # a library's own write (SQLite's, Ray's)

    monkeypatch.setattr(search, "run_search", run_search)
    result = invoke(world.search("--budget", "2trials", "--seed", "3", "--no-export"))
    _no_traceback(result)
    command = (f"automl-ad search --category {CAT} --budget 2trials --data {world.data} --storage {world.results} "
               f"--seed 3 --no-export --experiment auto-named --resume")
    expected = {
        "full disk": (1, f"error: out of disk space writing {folder / 'optuna.db'} (No space left on device); "
                         f"free space there, then resume with: {command}"),
        "SIGTERM": (143, f"error: search stopped by SIGTERM; experiment auto-named is saved in {folder} "
                         f"(0 trials stored); resume it with: {command}"),
        "full disk before the record": (1, f"error: out of disk space writing {folder / 'optuna.db'} (No space "
                                           "left on device); free space there, then run the same command again"),
    }[stop]
    assert (result.exit_code, result.stderr.strip().splitlines()[-1]) == expected, result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1


def test_ray_tracebacks_of_a_full_disk_and_its_restore_hint_are_not_shown():
    """While the search command runs, Ray's own lines about what it reports in one line
    are dropped: a traceback of a full disk (from any of the loggers it came from on a
    full tmpfs) and, once stopped, Tune's `Tuner.restore(...)` hint. Others pass."""
    import logging
    import signal

    from automl_ad.tuning.interrupt import SignalGuard

    class Shown(logging.Handler):  # on each logger itself: Ray's loggers do not propagate
        def __init__(self) -> None:
            super().__init__()
            self.records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    shown = Shown()
    names = ("ray.tune.execution.experiment_state", "ray._private.worker", "ray.tune.tune",
             "ray.tune.execution.tune_controller")
    for name in names:
        logging.getLogger(name).addHandler(shown)
    full = no_space("/results/exp/tune/experiment_state.json")
    with SignalGuard() as guard:
        logging.getLogger("ray.tune.execution.experiment_state").error("Saving experiment state failed: ",
                                                                        exc_info=full)
        logging.getLogger("ray._private.worker").error(
            "Unhandled error (suppress with 'RAY_IGNORE_UNHANDLED_ERRORS=1'): ray::ImplicitFunc.train() ...\n"
            "OSError: [Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device")
        logging.getLogger("ray.tune.tune").warning("Resume experiment with: Tuner.restore(path=x, trainable=...)")
        guard.signum = signal.SIGINT  # stopped: now the hint is Ray's, and not for CLI users
        logging.getLogger("ray.tune.tune").warning("Experiment has been interrupted, but the most recent state was "
                                                   "saved.\nResume experiment with: Tuner.restore(path=x, ...)")
        logging.getLogger("ray.tune.execution.tune_controller").error("Trial task failed for trial t1",
                                                                       exc_info=RuntimeError("CUDA out of memory"))
    logging.getLogger("ray.tune.tune").warning("Resume experiment with: after the guard")
    for name in names:
        logging.getLogger(name).removeHandler(shown)
    assert [record.getMessage() for record in shown.records] == [
        "Resume experiment with: Tuner.restore(path=x, trainable=...)", "Trial task failed for trial t1",
        "Resume experiment with: after the guard"], "dropped only what the search reports itself, only meanwhile"
