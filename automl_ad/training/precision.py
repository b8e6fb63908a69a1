"""The training loop's speed path on a GPU: mixed precision, channels_last, cudnn.benchmark.

``SpeedPath.resolve(cfg.precision, method class, device)`` decides, once per run:

* ``auto`` (the default, and what every search trial uses): on CUDA the method's own
  switch (``Method.precision``, the ``precision:`` entry of its ``space.yaml``, with the
  reason it is numerically safe); on a CPU fp32, so CPU results stay bit-identical to a
  run without a speed path;
* ``fp32`` / ``bf16`` / ``fp16``: that dtype on any device (CPU autocast runs bf16 and
  fp16 too, which is how the tests cover the path). fp16 has a ``GradScaler``: its range
  under- and overflows gradients, bf16 keeps fp32's range and needs none.

Only the training step autocasts (forward and loss); setup (memory banks) and every
validation run in fp32, so a val AUROC is that of the fp32 graph a bundle exports.
channels_last (model and batch images) follows the method's switch and cudnn.benchmark
is on, both on CUDA only; benchmark is restored afterwards (process-wide state is the
caller's).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from automl_ad.errors import UserError
from automl_ad.methods.base import Batch, Method

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(value: str) -> str:
    """``value`` when it names a precision, else the one-line UserError."""
    if value not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {value!r}")
    return value


@dataclass(frozen=True)
class SpeedPath:
    """What a run's training steps do for speed on its device."""

    device: torch.device
    dtype: str  # fp32 / bf16 / fp16: what the training step autocasts to (fp32: none)
    channels_last: bool
    reason: str  # where the choice came from, for logs and the gpu_check JSON

    @classmethod
    def resolve(cls, precision: str, method: type[Method], device: torch.device) -> "SpeedPath":
        check_precision(precision)
        cuda = device.type == "cuda"
        switch = method.precision
        if precision == "auto":
            dtype = switch.dtype if cuda else "fp32"
            reason = f"{method.name}'s switch: {switch.reason}" if cuda else "auto on a CPU: fp32"
        else:
            dtype, reason = precision, f"asked for {precision}"
        return cls(device=device, dtype=dtype, channels_last=cuda and switch.channels_last, reason=reason)

    @property
    def mixed(self) -> bool:
        return self.dtype != "fp32"

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The training step's context: autocast to the path's dtype, or nothing."""
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_DTYPES[self.dtype])

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """fp16's loss scaler (None for bf16 and fp32, which keep fp32's exponent range)."""
        return torch.amp.GradScaler(self.device.type) if self.dtype == "fp16" else None

    def prepare(self, module: nn.Module) -> nn.Module:
        """``module`` in the path's memory format (channels_last for its 4-D weights)."""
        return module.to(memory_format=torch.channels_last) if self.channels_last else module

    def release(self, module: nn.Module) -> nn.Module:
        """``module`` back in the default memory format, as the rest of the program expects."""
        return module.to(memory_format=torch.contiguous_format) if self.channels_last else module

    def batch(self, batch: Batch) -> Batch:
        """The batch's images in the path's memory format (masks have one channel: the
        layout is the same either way)."""
        if not self.channels_last:
            return batch
        return Batch(images=batch.images.contiguous(memory_format=torch.channels_last),
                     clean=batch.clean.contiguous(memory_format=torch.channels_last),
                     masks=batch.masks, labels=batch.labels)



@contextlib.contextmanager
def cuda_backends(device: torch.device) -> Iterator[None]:
    """On CUDA, cudnn.benchmark for the run (fixed batch shapes: the autotuned kernels are
    reused every step), restored afterwards; nothing on a CPU."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def sync_every(device: torch.device) -> int:
    """Steps between reading losses back to the host. A CPU has no queue to wait for, so
    every step (the loss of each step is checked at once, as before); on a GPU each read
    waits for the queue to drain, so the loop reads a block of losses at a time."""
    return 1 if device.type == "cpu" else 32
