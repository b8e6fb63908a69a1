"""The generic training loop: one method, one configuration, no Ray.

``fit`` trains a registered method on the fit images with its synthetic anomalies,
evaluates on the validation set after every epoch, writes a checkpoint every epoch,
calls an ``on_epoch`` hook (the search reports to Ray Tune through it), and finally
reports test metrics. Resuming from a checkpoint continues bit-exactly on CPU: the
checkpoint holds the model, optimizer and scheduler states and every RNG state used.

On a GPU the training step takes the speed path of ``training/precision.py`` (the
method's mixed-precision switch, channels_last, cudnn.benchmark); the fit images live on
the device as stored (uint8) and every batch is drawn and synthesised there, and losses
are read back once every ``sync_every`` steps, so a step does not wait for the host.
On a CPU ``precision="auto"`` is fp32 and a run is bit-identical to one without the path.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from pathlib import Path
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor

from automl_ad.data.types import CategoryData, ImageSet, to_float
from automl_ad.errors import DeadlineReached, UserError
from automl_ad.experiment import checkpoint_file, read_checkpoint
from automl_ad.methods.base import Batch, Method, create_method
from automl_ad.data.tiling import Tiling, inference_graph, training_images
from automl_ad.evaluation.metrics import evaluate as compute_metrics
from automl_ad.synthesis import build_synthesizer
from automl_ad.evaluation.uncertainty import delong_standard_error
from automl_ad.evaluation.validation import objective
from automl_ad.training.config import EpochHook, EpochReport, TrainConfig, TrainResult, synthesis_family
from automl_ad.training.precision import SpeedPath, cuda_backends, sync_every
from automl_ad.training.progress import ProgressBar
from automl_ad.training.state import (
    Streams,
    load_trained_method,
    restore,
    restore_optimizer,
    save_checkpoint,
    save_val_scores,
)

# Re-exported: callers import the run's types and the checkpoint loader from the loop.
__all__ = ["EpochHook", "EpochReport", "TrainConfig", "TrainResult", "evaluate", "fit",
           "load_trained_method", "predict", "synthesis_family"]

if TYPE_CHECKING:
    from automl_ad.training.distributed import DataParallel


@torch.no_grad()
def predict(method: Method, images: Tensor, device: torch.device, batch_size: int,
            should_stop: Callable[[], bool] | None = None) -> tuple[Tensor, Tensor]:
    """(maps N x H x W, scores N) on CPU for uint8 or float images. ``should_stop`` is
    asked before every batch but the first (its caller has just asked); ``DeadlineReached``
    is raised when it says yes."""
    method.eval()
    graph = inference_graph(method)  # a tiled method scores whole images through its tiles
    # ``batch_size`` model inputs at a time: a tiled image is several (memory grows with them)
    batch_size = max(1, batch_size // (method.tiling.count if method.tiling is not None else 1))
    maps, scores = [], []
    for start in range(0, len(images), batch_size):
        if should_stop is not None and start > 0 and should_stop():
            raise DeadlineReached(f"{method.name}: inference stopped at the budget deadline")
        chunk = to_float(images[start : start + batch_size]).to(device)
        batch_maps, batch_scores = graph(chunk)
        maps.append(batch_maps.float().cpu())
        scores.append(batch_scores.float().cpu())
    return torch.cat(maps), torch.cat(scores)


def evaluate(method: Method, image_set: ImageSet, device: torch.device, batch_size: int = 32,
             should_stop: Callable[[], bool] | None = None,
             kept: dict[str, Tensor] | None = None) -> dict[str, float | None]:
    """Image and pixel metrics of ``method`` on a labelled image set (``should_stop``:
    see ``predict``); ``kept``, when given, receives the ``scores`` and ``maps``."""
    maps, scores = predict(method, image_set.images, device, batch_size, should_stop)
    if kept is not None:
        kept.update(scores=scores, maps=maps)
    metrics = compute_metrics(scores, maps, image_set.labels, image_set.masks[:, 0], image_set.has_mask)
    # how far the image AUROC can be trusted on this many images (a search's leaderboard
    # and choice read it: evaluation.uncertainty)
    metrics["image_auroc_se"] = delong_standard_error(scores, image_set.labels)
    return metrics



def _phase_plan(method: Method, epochs: int) -> list[str]:
    """The phase of every epoch, in order."""
    plan: list[str] = []
    for phase in method.phases:
        plan += [phase] * method.phase_epochs(phase, epochs)
    if len(plan) != epochs:
        raise RuntimeError(f"{method.name}.phase_epochs does not add up to {epochs}: {plan}")
    return plan


def _own_rng(function: Callable[..., TrainResult]) -> Callable[..., TrainResult]:
    """Run ``function(cfg, ...)`` on a copy of torch's global RNG (CPU, and cfg's CUDA
    device), restored afterwards: training seeds it and draws from it (initial weights,
    dropout), but the process's own random stream is the caller's business. The same
    holds for cudnn.benchmark, which a CUDA run turns on (``cuda_backends``); the trained
    method is handed back in the default memory format."""

    @functools.wraps(function)
    def wrapper(cfg: TrainConfig, *args: Any, **kwargs: Any) -> TrainResult:
        device = torch.device(cfg.device)
        cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), cuda_backends(device):
            result = function(cfg, *args, **kwargs)
        if device.type == "cuda":  # a channels_last speed path ends with the run
            result.method.to(memory_format=torch.contiguous_format)
        return result

    return wrapper


@_own_rng
def fit(
    cfg: TrainConfig,
    data: CategoryData,
    val_set: ImageSet,
    *,
    checkpoint_dir: Path | None = None,
    resume_from: Path | None = None,
    on_epoch: EpochHook | None = None,
    evaluate_test: bool = True,
    progress: bool = False,
    data_parallel: "DataParallel | None" = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train, validate every epoch, checkpoint, and report test metrics at the end.

    With ``data_parallel`` (several processes, one per device) every rank draws its own
    batches and synthetic anomalies, gradients are averaged each step, and only rank 0
    validates and writes checkpoints; other ranks report their training loss only.

    ``should_stop`` is asked before every optimizer step and before each validation (a
    search's budget deadline): when it says yes, training ends at once, mid-epoch, with no
    further validation, checkpoint or test evaluation, so a spent budget is not overrun
    by the rest of an epoch. ``reports`` then holds the completed epochs only (possibly
    none) and the last checkpoint stays that of the last completed epoch, so a resume is
    still bit-exact. Data-parallel ranks agree on the answer (one tiny all-reduce).
    """
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)  # on fit's own copy of the global RNG (_own_rng)
    method, synthesizer = _build(cfg, data, device)
    speed = SpeedPath.resolve(cfg.precision, type(method), device)
    # On the device once, as stored (uint8: a quarter of float32); batches are drawn,
    # converted and synthesised there. On a CPU the same values as converting all first.
    fit_images = training_images(method, data.fit).to(device)  # a tiled method's tiles
    alone = data_parallel is None or data_parallel.world_size == 1
    if not _setup(method, to_float(fit_images), should_stop if alone else None):
        return _stopped(method, [])
    rank = data_parallel.rank if data_parallel is not None else 0
    lead = rank == 0
    streams = Streams.for_rank(cfg, len(fit_images), rank, device)
    checkpoint = read_checkpoint(resume_from) if resume_from is not None else None
    scaler = speed.grad_scaler()
    start_epoch, step, reports = 0, 0, []
    if checkpoint is not None:
        start_epoch, step, reports = restore(checkpoint, method, streams, checkpoint_file(resume_from), scaler)
        if not lead:  # the checkpoint holds rank 0's streams; others draw their own again
            streams = Streams.for_rank(cfg, len(fit_images), rank, device, start_epoch)
    if data_parallel is not None:
        data_parallel.broadcast_(method)
    speed.prepare(method)

    if not method.phases:
        return _fit_without_gradients(cfg, method, data, val_set, device, lead, checkpoint_dir, on_epoch,
                                      evaluate_test, should_stop, streams, data_parallel)

    steps_per_epoch = cfg.steps_per_epoch or max(1, math.ceil(len(fit_images) / cfg.batch_size))
    plan = _phase_plan(method, cfg.epochs)

    def next_batch() -> Batch:
        return speed.batch(_make_batch(fit_images, streams.sampler.next_indices(), synthesizer, streams.synth, device))

    # Data-parallel ranks agree on stopping with an all-reduce read back on the host; on
    # a GPU that read waits for the queue, so they agree every ``sync_every`` steps (and
    # always before a validation), not every step.
    agree_every = sync_every(device) if data_parallel is not None and data_parallel.world_size > 1 else 1
    asked = itertools.count()

    def stop_now(force: bool = False) -> bool:
        if should_stop is None or (not force and next(asked) % agree_every):
            return False
        return _agreed_stop(should_stop, data_parallel, device)

    bar = ProgressBar(cfg, plan, steps_per_epoch, start_epoch) if progress and lead else None
    began = time.perf_counter() - (reports[-1].elapsed_s if reports else 0.0)
    stopped_early = stopped_mid_epoch = False
    optimizer = scheduler = None
    try:
        for epoch in range(start_epoch, cfg.epochs):
            phase = plan[epoch]
            if optimizer is None or plan[epoch - 1] != phase or epoch == start_epoch:
                optimizer, scheduler = method.configure_optimizer(phase, plan.count(phase) * steps_per_epoch)
                if checkpoint is not None and epoch == start_epoch and checkpoint["phase"] == phase:
                    restore_optimizer(checkpoint, optimizer, scheduler)
            losses, step, stopped_mid_epoch = _train_epoch(
                cfg, method, phase, _Stepper(optimizer, scheduler, speed, scaler), steps_per_epoch, step,
                next_batch, stop_now, data_parallel, bar)
            # Asked again before validation: an epoch is complete only once validated.
            stopped_mid_epoch = stopped_mid_epoch or stop_now(force=True)
            if stopped_mid_epoch:
                stopped_early = True
                break
            kept: dict[str, Tensor] = {}
            try:
                val = evaluate(method, val_set, device, cfg.eval_batch_size, should_stop if alone else None,
                               kept) if lead else {}
            except DeadlineReached:
                stopped_early = stopped_mid_epoch = True
                break
            report = EpochReport(epoch=epoch + 1, phase=phase, step=step, train_loss=sum(losses) / len(losses),
                                 val=val, objective=objective(val), elapsed_s=time.perf_counter() - began)
            reports.append(report)
            if bar is not None:
                bar.epoch_done(report)
            if checkpoint_dir is not None and lead:
                save_checkpoint(Path(checkpoint_dir), cfg, method, optimizer, scheduler, phase, epoch + 1, step,
                                 streams, reports, scaler)
                save_val_scores(Path(checkpoint_dir), val_set, kept)
            if on_epoch is not None and on_epoch(report, checkpoint_dir if lead else None) and epoch + 1 < cfg.epochs:
                stopped_early = True
                break
    finally:
        if bar is not None:
            bar.close()

    if stopped_mid_epoch:
        return _stopped(method, reports)
    if not reports:  # resumed from a finished run
        raise UserError("nothing to train: the checkpoint already covers every epoch")
    test = evaluate(method, data.test, device, cfg.eval_batch_size) if evaluate_test and lead and len(data.test) else {}
    return TrainResult(method=method, reports=reports, val=reports[-1].val, objective=reports[-1].objective,
                       test=test, stopped_early=stopped_early)


def _setup(method: Method, fit_images: Tensor, should_stop: Callable[[], bool] | None) -> bool:
    """``method.setup`` that a deadline may stop (a coreset search takes minutes at large
    sizes); False when it was stopped."""
    method.interrupt_requested = should_stop
    try:
        method.setup(fit_images)
    except DeadlineReached:
        return False
    finally:
        method.interrupt_requested = None
    return True


def _stopped(method: Method, reports: list[EpochReport]) -> TrainResult:
    """The result of a run ``should_stop`` ended: the completed epochs only."""
    last = reports[-1] if reports else None
    return TrainResult(method=method, reports=reports, val=last.val if last else {},
                       objective=last.objective if last else float("nan"), test={}, stopped_early=True)


def _build(cfg: TrainConfig, data: CategoryData, device: torch.device) -> tuple[Method, Any]:
    """The method on ``device`` and its synthesizer (None when it trains on normal images)."""
    method = create_method(cfg.method, cfg.method_params, cfg.image_size, data.category).to(device)
    method.tiling = Tiling.from_dict(cfg.tiling)
    family = synthesis_family(cfg, type(method))
    synthesizer = None
    if family is not None:
        params = {**cfg.synthesis_params, **method.synthesis_overrides(family)}
        synthesizer = build_synthesizer(family, params, category=data.category, texture_dir=cfg.texture_dir)
    if len(data.fit) == 0:
        raise UserError(f"category {data.category!r} has no fit images")
    return method, synthesizer


@dataclass
class _Stepper:
    """A phase's optimizer and scheduler, with the run's speed path and fp16's scaler."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    speed: SpeedPath
    scaler: torch.amp.GradScaler | None

    def backward(self, loss: Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step(self) -> None:
        if self.scaler is None:
            self.optimizer.step()
        else:  # skips the update when the scaled gradients overflowed, then adapts the scale
            self.scaler.step(self.optimizer)
            self.scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()


def _train_epoch(
    cfg: TrainConfig,
    method: Method,
    phase: str,
    stepper: _Stepper,
    steps: int,
    step: int,
    next_batch: Callable[[], Batch],
    stop_now: Callable[[], bool],
    data_parallel: "DataParallel | None",
    bar: "ProgressBar | None",
) -> tuple[list[float], int, bool]:
    """Up to ``steps`` optimizer steps; (losses, the step count after them, whether
    ``stop_now`` ended the epoch early). Losses are read back every ``sync_every`` steps
    (on a CPU every step, before its update, as a loop without the speed path did)."""
    method.train()
    losses: list[float] = []
    pending: list[Tensor] = []
    every = sync_every(stepper.speed.device)
    for _ in range(steps):
        if stop_now():
            _read_losses(cfg, pending, step, losses, bar)
            return losses, step, True
        batch = next_batch()
        stepper.optimizer.zero_grad(set_to_none=True)
        with stepper.speed.autocast():
            loss = method.training_step(batch, phase)["loss"]
        pending.append(loss.detach())
        if len(pending) >= every:
            _read_losses(cfg, pending, step + 1, losses, bar)
        stepper.backward(loss)
        if data_parallel is not None:
            data_parallel.average_gradients_(method)
        stepper.step()
        step += 1
    _read_losses(cfg, pending, step, losses, bar)
    return losses, step, False


def _read_losses(cfg: TrainConfig, pending: list[Tensor], step_after: int, losses: list[float],
                 bar: "ProgressBar | None") -> None:
    """Move the ``pending`` losses (the last of them that of step ``step_after - 1``) to
    ``losses`` with one host sync; a non-finite one raises, naming its step."""
    if not pending:
        return
    values = torch.stack([loss.float() for loss in pending]).tolist()
    first = step_after - len(values)
    pending.clear()
    for offset, value in enumerate(values):
        if not math.isfinite(value):
            raise FloatingPointError(f"{cfg.method}: loss became {value} at step {first + offset}")
        losses.append(value)
        if bar is not None:
            bar.advance(value)


def _fit_without_gradients(
    cfg: TrainConfig,
    method: Method,
    data: CategoryData,
    val_set: ImageSet,
    device: torch.device,
    lead: bool,
    checkpoint_dir: Path | None,
    on_epoch: EpochHook | None,
    evaluate_test: bool,
    should_stop: Callable[[], bool] | None,
    streams: Streams,
    data_parallel: "DataParallel | None",
) -> TrainResult:
    """A method with no gradient phase (a memory bank): ``setup`` was the training, so it
    is validated once and that report stands for the whole run (``epoch = cfg.epochs``),
    which a search's scheduler reads as a full-fidelity trial."""
    began = time.perf_counter()
    if should_stop is not None and _agreed_stop(should_stop, data_parallel, device):
        return _stopped(method, [])
    alone = data_parallel is None or data_parallel.world_size == 1
    kept: dict[str, Tensor] = {}
    try:
        val = evaluate(method, val_set, device, cfg.eval_batch_size, should_stop if alone else None,
                       kept) if lead else {}
    except DeadlineReached:
        return _stopped(method, [])
    report = EpochReport(epoch=cfg.epochs, phase="setup", step=0, train_loss=float("nan"), val=val,
                         objective=objective(val), elapsed_s=time.perf_counter() - began)
    if checkpoint_dir is not None and lead:
        save_checkpoint(Path(checkpoint_dir), cfg, method, None, None, "setup", cfg.epochs, 0, streams, [report])
        save_val_scores(Path(checkpoint_dir), val_set, kept)
    if on_epoch is not None:
        on_epoch(report, checkpoint_dir if lead else None)
    test = evaluate(method, data.test, device, cfg.eval_batch_size) if evaluate_test and lead and len(data.test) else {}
    return TrainResult(method=method, reports=[report], val=val, objective=report.objective, test=test)


def _agreed_stop(should_stop: Callable[[], bool], data_parallel: "DataParallel | None",
                 device: torch.device) -> bool:
    """``should_stop()`` of this rank, or of any rank when training data-parallel: every
    rank must leave the step loop together or the next gradient all-reduce would hang."""
    stop = bool(should_stop())
    if data_parallel is None or data_parallel.world_size == 1:
        return stop
    import torch.distributed as dist

    flag = torch.tensor([1.0 if stop else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


def _make_batch(
    fit_images: Tensor,
    indices: Tensor,
    synthesizer: Any,
    generator: torch.Generator,
    device: torch.device,
) -> Batch:
    # fit_images is on the device; only the few indices travel (no stream sync: they
    # are copied from host memory the moment they are queued)
    clean = to_float(fit_images[indices.to(fit_images.device, non_blocking=True)])
    if synthesizer is None:
        n, _, h, w = clean.shape
        zeros = torch.zeros(n, 1, h, w, device=device)
        return Batch(images=clean, clean=clean, masks=zeros, labels=torch.zeros(n, device=device))
    # Patch sources are the other images of the batch (sources=None): no copy of the
    # whole fit set to the device per step.
    out = synthesizer(clean, generator)
    # a family that changes the images before pasting (perlin's rotation of normals)
    # hands back the changed clean images: they are the reconstruction targets
    target = clean if out.clean is None else out.clean
    return Batch(images=out.images, clean=target, masks=out.masks, labels=out.labels)
