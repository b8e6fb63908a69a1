"""A measured GPU speed prior: the calibration rows ``benchmarks/gpu_check.sh`` writes.

Without a GPU on the machine, a GPU budget is planned from a prior. The shipped one is
an estimate (each method's CPU prior divided by its ``gpu_speedup``, calibration.py's
``GPU_ESTIMATE``). A ``gpu_check.sh`` run on a real GPU times every method with the
search's own ``calibration.measure`` (the training step on the method's precision
switch, as trials run it) and writes them in its results JSON under ``calibration``;
that file, named by ``AUTOML_AD_GPU_PRIOR`` or copied to
``~/.cache/automl_ad/gpu_prior.json``, replaces the estimate for the methods it covers
(their plan rows then say ``gpu_check`` instead of ``estimate``).

A results file of a smoke run (CPU, tiny sizes) or of a check that failed is refused:
it measured no GPU.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from automl_ad.errors import UserError

GPU_PRIOR_ENV = "AUTOML_AD_GPU_PRIOR"
FORMAT = "automl_ad.gpu_check/1"  # the results JSON's "format"
ROW_FIELDS = ("batch", "build_s", "setup_c", "setup_p", "step_s", "infer_s", "metrics_s")


@dataclass(frozen=True)
class GpuPrior:
    """Measured rows per method and image size, in the order of ``methods.base.SpeedRow``."""

    path: Path
    device: str  # the GPU's name
    measured_at: str
    rows: dict[str, dict[int, tuple]]

    def label(self) -> str:
        return f"gpu_check prior from {self.device} ({self.measured_at}, {self.path})"


def default_path() -> Path:
    return Path.home() / ".cache" / "automl_ad" / "gpu_prior.json"


def current() -> GpuPrior | None:
    """The prior ``AUTOML_AD_GPU_PRIOR`` names (it must exist), else the default file if
    present, else None (the estimate stands)."""
    named = os.environ.get(GPU_PRIOR_ENV)
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            raise UserError(f"{GPU_PRIOR_ENV}={named}: no such file (a gpu_check.sh results JSON)")
    else:
        path = default_path()
        if not path.is_file():
            return None
    stat = path.stat()
    return _load(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _load(path: str, _mtime_ns: int, _size: int) -> GpuPrior:
    """Parse and check one results file (cached while the file is unchanged)."""
    try:
        content: Any = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: not a readable gpu_check results JSON ({error})") from None
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise UserError(f"{path}: not a gpu_check results JSON (format {FORMAT!r} expected)")
    if content.get("mode") != "full" or not content.get("ok"):
        raise UserError(f"{path}: a {content.get('mode')} run that {'passed' if content.get('ok') else 'failed'}; "
                        "only a passing full run on a GPU is a GPU prior")
    calibration = content.get("calibration") or {}
    device = str(calibration.get("device") or "")
    if not device or device == "cpu":
        raise UserError(f"{path}: its calibration ran on {device or 'no device'}, not on a GPU")
    rows: dict[str, dict[int, tuple]] = {}
    for index, row in enumerate(calibration.get("rows") or []):
        try:
            method, size = str(row["method"]), int(row["size"])
            values = (int(row["batch"]), *(float(row[key]) for key in ROW_FIELDS[1:]))
        except (KeyError, TypeError, ValueError) as error:
            raise UserError(f"{path}: calibration.rows[{index}]: {error!r}") from None
        # one row per method and size: the backbone a calibration times (its default)
        rows.setdefault(method, {}).setdefault(size, values)
    if not rows:
        raise UserError(f"{path}: calibration.rows holds no method")
    return GpuPrior(path=Path(path), device=device, measured_at=str(content.get("finished_at", "?")), rows=rows)
