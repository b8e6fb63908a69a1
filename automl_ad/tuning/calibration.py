"""How fast each method trains and infers, per device and image size.

The search plans its schedule (``schedule.py``) from these numbers. They come from:

* a **calibration** on the device the trials will run on: a few timed training steps
  (synthesis included), a timed ``setup`` on a few fit-like images, a timed inference
  batch, and (once per size) the metrics of a batch of maps. Results are cached in
  ``~/.cache/automl_ad/calibration.json`` (``AUTOML_AD_CALIBRATION`` moves it), keyed by
  machine (hostname), device (``cpu`` or the GPU's name), torch threads, method, image
  size, batch size and backbone, and written atomically (temporary file + rename);
* the project's **prior** (each method's ``cpu_prior``, in its folder), used when the device is not present, e.g.
  planning a GPU budget on a CPU machine. The CPU rows were measured with
  ``measure()`` on the project's 2-core reference VM, one torch thread (a trial's worker
  holds one CPU, and Ray gives it one thread), while other jobs shared the machine; the
  GPU rows are an **estimate**: the CPU numbers divided by a stated factor per method
  plus a per-step launch floor (``GPU_ESTIMATE``), never measured — unless a
  ``benchmarks/gpu_check.sh`` results JSON is given (``gpu_prior.py``:
  ``AUTOML_AD_GPU_PRIOR`` or ``~/.cache/automl_ad/gpu_prior.json``): its rows, measured
  with ``measure()`` on a real GPU, replace the estimate for the methods they cover.

A training step is timed as trials run it: on CUDA on the method's precision switch
(``training/precision.py``: autocast, channels_last, cudnn.benchmark), fp32 on a CPU.

Every timing is of a method's *default* Config (with the given backbone): a sampled
configuration that is wider than the default trains slower than planned. The ledger
charges what trials really use, and the searcher corrects its reservations by the
ratio of used to planned cost of the trials that finished.
"""

from __future__ import annotations

import json
import math
import os
import socket
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterable

from automl_ad.methods.base import Batch, create_method, get_method_class
from automl_ad.evaluation.metrics import evaluate
from automl_ad.synthesis import build_synthesizer
from automl_ad.training.precision import SpeedPath, cuda_backends
from automl_ad.tuning import gpu_prior

CALIBRATION_VERSION = 3  # 2: memory banks' setup timed on 32/64/128 images; 3: CFA's faster step
CACHE_ENV = "AUTOML_AD_CALIBRATION"


@dataclass(frozen=True)
class Speed:
    """Seconds a method takes at one image size and batch size on one device.

    ``setup_c``/``setup_p``: ``Method.setup`` on n fit images takes c * n^p seconds
    (p = 1 for per-image statistics, up to 3 for memory banks whose coreset search grows
    faster than the image count). ``step_s``: one optimizer step at
    ``batch`` with synthesis, averaged over the method's phases (0 when it has none).
    ``infer_s``: the forward pass per image. ``metrics_s``: image + pixel metrics per
    image at this size. ``build_s``: constructing the method (backbone weights).
    ``source``: measured / prior / estimate.
    """

    build_s: float
    setup_c: float
    setup_p: float
    step_s: float
    infer_s: float
    metrics_s: float
    batch: int
    source: str

    def setup_s(self, n_images: int) -> float:
        return self.setup_c * float(n_images) ** self.setup_p

    def at_batch(self, batch: int) -> "Speed":
        """The same device at another batch size (step time scales with the batch)."""
        if batch == self.batch or self.step_s == 0:
            return replace(self, batch=batch)
        return replace(self, step_s=self.step_s * batch / self.batch, batch=batch)

    def at_size(self, size: int, measured_size: int) -> "Speed":
        """Scaled by the pixel count from a measured size (an extrapolation)."""
        if size == measured_size:
            return self
        ratio = (size / measured_size) ** 2
        return replace(self, setup_c=self.setup_c * ratio ** self.setup_p,
                       step_s=self.step_s * ratio, infer_s=self.infer_s * ratio,
                       metrics_s=self.metrics_s * ratio,
                       source=self.source if "scaled" in self.source else f"{self.source}, scaled")


# --- the prior --------------------------------------------------------------------------
# CPU, one torch thread, default Configs (efficientnet_lite0 for backbone methods),
# measured with measure() on the 2-core reference VM on 2026-12-01 (torch 2.14, load 1-5
# from other jobs: the fastest of 2-4 runs per field), paper batch sizes; each method's
# class holds its rows as ``cpu_prior`` = {size: (batch, build_s, setup_c, setup_p,
# step_s, infer_s, metrics_s)} (methods/base.py ``SpeedRow``).
# metrics_s: the median of the runs (64-200 maps). PatchCore's setup: fitted to setup()
# timed on 32-160 fit-like images (160 images: 8.4 s at 128 px); at 224 and 256 px
# refitted to setup() with the 1 % coreset default on 80 and 160 screw images (160: 12.3 s
# at 224 px, 22.7 s at 256 px; the 10 % coreset had taken 222 s at 256 px).
# GPU estimate (NOT measured): time on one datacenter GPU (A100/H100 class) = CPU time
# of one reference thread / factor (each method's ``gpu_speedup``), plus a floor per optimizer step (kernel launches of
# a forward, backward and optimizer step) and per inferred image. The factors assume a
# GPU sustains 100-200x one CPU thread on these conv nets at the paper batch sizes;
# backbone methods gain less (small frozen backbones at batch 4-8 are launch bound).
GPU_ESTIMATE = {
    "default_factor": 100.0,  # a method without its own ``gpu_speedup``
    "step_floor_s": 0.010,
    "infer_floor_s": 0.0005,
    "build_extra_s": 3.0,  # CUDA context and moving the weights
}


def _prior_rows(method: str) -> dict[int, tuple]:
    return dict(get_method_class(method).cpu_prior)


def prior_speed(method: str, size: int, batch: int, device_kind: str) -> Speed | None:
    """The prior for ``method`` at ``size``/``batch`` on a ``cpu`` or ``gpu`` (None:
    no row for the method). Sizes without a row are scaled from the nearest measured one."""
    measured_gpu = gpu_prior.current() if device_kind == "gpu" else None
    if measured_gpu is not None and method in measured_gpu.rows:
        return _row_speed(measured_gpu.rows[method], size, batch, "gpu_check")
    rows = _prior_rows(method)
    if not rows:
        return None
    speed = _row_speed(rows, size, batch, "prior")
    if device_kind == "gpu":
        factor = get_method_class(method).gpu_speedup or GPU_ESTIMATE["default_factor"]
        speed = replace(
            speed,
            build_s=speed.build_s + GPU_ESTIMATE["build_extra_s"],
            setup_c=speed.setup_c / factor,
            step_s=speed.step_s / factor + GPU_ESTIMATE["step_floor_s"] if speed.step_s else 0.0,
            infer_s=speed.infer_s / factor + GPU_ESTIMATE["infer_floor_s"],
            source="estimate" + (", scaled" if "scaled" in speed.source else ""),
        )
    return speed


def _row_speed(rows: dict[int, tuple], size: int, batch: int, source: str) -> Speed:
    """The row of the size nearest ``size`` (log scale), scaled to ``size`` and ``batch``."""
    measured = min(rows, key=lambda s: (abs(math.log(s / size)), s))
    b, build, c, p, step, infer, metrics = rows[measured]
    return Speed(build_s=build, setup_c=c, setup_p=p, step_s=step, infer_s=infer, metrics_s=metrics,
                 batch=b, source=source).at_size(size, measured).at_batch(batch)


def fallback_speed(size: int, batch: int, device_kind: str, trainable: bool) -> Speed:
    """For a method with neither a calibration nor a prior: a conservative constant (about
    the slowest shipped prior per pixel: a convolutional autoencoder trained at batch 8)."""
    scale = (size / 128) ** 2
    base = Speed(build_s=1.0, setup_c=0.01 * scale, setup_p=1.0, step_s=3.0 * scale * batch / 8,
                 infer_s=0.1 * scale, metrics_s=0.005 * scale, batch=batch, source="assumed")
    if device_kind == "gpu":
        factor = GPU_ESTIMATE["default_factor"]
        base = replace(base, step_s=base.step_s / factor + GPU_ESTIMATE["step_floor_s"],
                       infer_s=base.infer_s / factor + GPU_ESTIMATE["infer_floor_s"])
    return replace(base, step_s=base.step_s if trainable else 0.0, source="assumed (no prior)")


# --- the cache --------------------------------------------------------------------------

def cache_path() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "automl_ad" / "calibration.json"


def device_name(device: str) -> str:
    """``cpu`` or the GPU's name (``NVIDIA H100 80GB HBM3``)."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def cache_key(method: str, size: int, batch: int, backbone: str | None, device: str, threads: int,
              host: str | None = None) -> str:
    host = host or socket.gethostname()
    return f"{host}|{device_name(device)}|{threads}t|{method}|{size}px|b{batch}|{backbone or '-'}"


def load_cache(path: Path | None = None) -> dict[str, Any]:
    path = path or cache_path()
    try:
        content = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(content, dict) or content.get("version") != CALIBRATION_VERSION:
        return {}
    return dict(content.get("entries") or {})


def save_entries(entries: dict[str, Any], path: Path | None = None) -> None:
    """Merge ``entries`` into the cache file, atomically (temporary file + rename)."""
    path = Path(path or cache_path())
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = {**load_cache(path), **entries}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump({"version": CALIBRATION_VERSION, "entries": merged}, handle, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cached_speed(method: str, size: int, batch: int, backbone: str | None, device: str, threads: int,
                 cache: dict[str, Any] | None = None) -> Speed | None:
    entry = (load_cache() if cache is None else cache).get(cache_key(method, size, batch, backbone, device, threads))
    if not entry:
        return None
    fields = {k: entry[k] for k in ("build_s", "setup_c", "setup_p", "step_s", "infer_s", "metrics_s", "batch")}
    return Speed(**fields, source="measured")


# --- measuring ----------------------------------------------------------------------------

def _smooth_images(n: int, size: int, generator: Any, device: Any) -> Any:
    """Random images with image-like spatial correlation (synthesis behaves as on photos)."""
    import torch
    import torch.nn.functional as F

    low = torch.rand(n, 3, max(2, size // 8), max(2, size // 8), generator=generator)
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1).to(device)


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device) -> float:
    _sync(device)
    began = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - began


def measure_metrics(size: int, n_images: int = 64) -> float:
    """Seconds per image of ``automl_ad.evaluation.metrics.evaluate`` on maps of ``size`` (CPU)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(n_images, size, size, generator=generator)
    masks = torch.zeros(n_images, size, size, dtype=torch.uint8)
    masks[n_images // 2:, size // 4: size // 2, size // 4: size // 2] = 1
    labels = (torch.arange(n_images) >= n_images // 2).long()
    scores = maps.flatten(1).amax(dim=1)
    began = time.perf_counter()
    evaluate(scores, maps, labels, masks, torch.ones(n_images, dtype=torch.bool))
    return (time.perf_counter() - began) / n_images


def measure(method: str, size: int, batch: int, *, device: str = "cpu", backbone: str | None = None,
            threads: int | None = None, steps: int = 3, warmup: int = 1, setup_images: int = 16,
            infer_images: int | None = None, metrics_s: float | None = None) -> Speed:
    """Time ``method`` (default Config, ``backbone`` if given) at ``size`` and ``batch``."""
    import torch

    before = torch.get_num_threads()
    if threads is not None and not device.startswith("cuda"):
        torch.set_num_threads(int(threads))
    try:
        dev = torch.device(device)
        torch.manual_seed(0)
        generator = torch.Generator().manual_seed(0)
        cls = get_method_class(method)
        speed = SpeedPath.resolve("auto", cls, dev)  # as a trial's training step runs
        params = {"backbone": backbone} if backbone else {}
        began = time.perf_counter()
        model = create_method(method, params, size, "calibration").to(dev)
        _sync(dev)
        build_s = time.perf_counter() - began

        # setup: c * n^p, p from the two largest of k, 2k, 4k images (a coreset search
        # only shows its growth once the bank outgrows the caches); cheap setups: p = 1
        def setup_time(n: int) -> float:
            nonlocal model
            model = create_method(method, params, size, "calibration").to(dev)
            return _timed(lambda: model.setup(_smooth_images(n, size, generator, dev)), dev)

        # A memory bank's setup is its whole trial and grows faster than the image count
        # (coreset steps x candidates; the bank also slows every inference): time it on
        # enough images for that growth to show, always at three counts. Timed on 16/32
        # images it planned a 194-image PatchCore setup at 5 s; it took about 15.
        bank = not tuple(cls.phases)
        k = max(1, setup_images) * (2 if bank else 1)
        points = [(k, setup_time(k))]
        for n in (2 * k, 4 * k):
            if not bank and (points[-1][1] < 0.1 or (n == 4 * k and points[-1][1] < 1.0)):
                break
            points.append((n, setup_time(n)))
        if len(points) == 1:
            setup_p, setup_c = 1.0, points[0][1] / k
        else:
            (n_a, t_a), (n_b, t_b) = points[-2], points[-1]
            setup_p = min(3.0, max(1.0, math.log(max(t_b, 1e-9) / max(t_a, 1e-9)) / math.log(n_b / n_a)))
            setup_c = t_b / n_b ** setup_p

        step_times: list[float] = []
        family = cls.synthesis
        synthesizer = build_synthesizer(family, {}, category="calibration") if family else None
        synth_generator = torch.Generator(device=dev).manual_seed(1)
        clean = _smooth_images(batch, size, generator, dev)
        speed.prepare(model)
        scaler = speed.grad_scaler()
        for phase in cls.phases:
            optimizer, scheduler = model.configure_optimizer(phase, 1000)
            model.train()

            def step() -> None:
                if synthesizer is not None:
                    out = synthesizer(clean, synth_generator)
                    data = Batch(images=out.images, clean=clean, masks=out.masks, labels=out.labels)
                else:
                    zeros = torch.zeros(batch, 1, size, size, device=dev)
                    data = Batch(images=clean, clean=clean, masks=zeros, labels=torch.zeros(batch, device=dev))
                optimizer.zero_grad(set_to_none=True)
                with speed.autocast():
                    loss = model.training_step(speed.batch(data), phase)["loss"]
                if scaler is None:
                    loss.backward()
                    optimizer.step()
                else:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                if scheduler is not None:
                    scheduler.step()

            with cuda_backends(dev):
                for _ in range(warmup):
                    step()
                step_times.append(statistics.median(_timed(step, dev) for _ in range(max(1, steps))))
        step_s = sum(step_times) / len(step_times) if step_times else 0.0
        model = speed.release(model)

        model.eval()
        n_infer = infer_images or (32 if dev.type == "cuda" else 8)
        images = _smooth_images(n_infer, size, generator, dev)
        with torch.no_grad():
            model(images[:2])
            infer_s = _timed(lambda: model(images), dev) / n_infer
    finally:
        torch.set_num_threads(before)
    if metrics_s is None:
        metrics_s = measure_metrics(size)
    return Speed(build_s=build_s, setup_c=setup_c, setup_p=setup_p, step_s=step_s, infer_s=infer_s,
                 metrics_s=metrics_s, batch=batch, source="measured")


@dataclass(frozen=True)
class Probe:
    """One (method, size, batch, backbone) the planner wants a speed for."""

    method: str
    size: int
    batch: int
    backbone: str | None = None


class SpeedBook:
    """Speeds for the planner: cached calibrations of this machine's ``device`` first,
    then the prior for ``device_kind``. ``calibrate(probes)`` measures the missing ones
    (only when the device is here) and caches them."""

    def __init__(self, device_kind: str, device: str | None = None, threads: int = 1,
                 trainable: dict[str, bool] | None = None) -> None:
        self.device_kind = device_kind
        self.device = device  # "cpu" / "cuda:0" when present on this machine, else None
        self.threads = threads
        self.trainable = trainable or {}
        self._cache = load_cache() if device is not None else {}
        self.measured: dict[Probe, Speed] = {}

    @property
    def device_label(self) -> str:
        if self.device is None:
            measured = gpu_prior.current() if self.device_kind == "gpu" else None
            if measured is not None:
                return f"gpu (not on this machine: {measured.label()})"
            return f"{self.device_kind} (not on this machine: prior{' estimate' if self.device_kind == 'gpu' else ''})"
        name = device_name(self.device)
        return f"{name}, {self.threads} thread{'s' if self.threads != 1 else ''}" if name == "cpu" else name

    def prior_note(self) -> str:
        """What a plan's note says of its speeds when the device is not on this machine."""
        if self.device_kind != "gpu":
            return "speeds are the project's prior"
        measured = gpu_prior.current()
        if measured is None:
            return ("speeds are the project's prior (GPU: an estimate scaled from CPU, see "
                    "automl_ad/tuning/calibration.py)")
        return (f"speeds are the {measured.label()}; a method it does not cover: the estimate "
                "scaled from CPU (automl_ad/tuning/calibration.py)")

    def lookup(self, probe: Probe, stand_in: Probe | None = None) -> Speed:
        """The measured speed of ``probe``, else of ``stand_in`` (the same method with
        the backbone a calibration times), else the prior."""
        for candidate in (probe, stand_in):
            if candidate is None:
                continue
            if candidate in self.measured:
                return self.measured[candidate]
            if self.device is not None:
                found = cached_speed(candidate.method, candidate.size, candidate.batch, candidate.backbone,
                                     self.device, self.threads, self._cache)
                if found is not None:
                    return found
        speed = prior_speed(probe.method, probe.size, probe.batch, self.device_kind)
        if speed is None:
            speed = fallback_speed(probe.size, probe.batch, self.device_kind, self.trainable.get(probe.method, True))
        return speed

    def missing(self, probes: Iterable[Probe]) -> list[Probe]:
        if self.device is None:
            return []
        return [p for p in dict.fromkeys(probes) if p not in self.measured and cached_speed(
            p.method, p.size, p.batch, p.backbone, self.device, self.threads, self._cache) is None]

    def calibrate(self, probes: Iterable[Probe], log=None) -> list[tuple[Probe, Speed]]:
        """Measure and cache every probe not measured yet; returns what it measured."""
        done: list[tuple[Probe, Speed]] = []
        metrics_by_size: dict[int, float] = {}
        for probe in self.missing(probes):
            if log is not None:
                log(f"calibrating {probe.method} at {probe.size} px, batch {probe.batch}"
                    f"{', ' + probe.backbone if probe.backbone else ''} on {self.device_label}")
            if probe.size not in metrics_by_size:
                metrics_by_size[probe.size] = measure_metrics(probe.size)
            speed = measure(probe.method, probe.size, probe.batch, device=self.device, backbone=probe.backbone,
                            threads=self.threads, metrics_s=metrics_by_size[probe.size])
            self.measured[probe] = speed
            entry = {**{k: v for k, v in asdict(speed).items() if k != "source"},
                     "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "torch_threads": self.threads}
            key = cache_key(probe.method, probe.size, probe.batch, probe.backbone, self.device, self.threads)
            self._cache[key] = entry
            save_entries({key: entry})
            done.append((probe, speed))
        return done
