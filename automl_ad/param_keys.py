"""The flat keys of a sampled configuration: the one place they are written and read.

Optuna needs every parameter name unique per distribution kind, so a trial's
configuration is one flat mapping: ``method``, then ``<method>.image_size``,
``<method>.<param>`` (``<method>.backbone`` among them), ``<method>.synthesis`` (each
method keeps its own list of families) and ``synthesis.<family>.<param>`` (a family may
share its method's name, as NSA does, so a bare ``<family>.`` prefix would read as a
method parameter). The search space writes keys with the functions here; the search, the
store's readers, the leaderboard, the report and the benchmarks read them back with
``split_config``. Below every layer that reads them: it imports nothing of the project.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

METHOD = "method"
SYNTHESIS_PREFIX = "synthesis."


def method_key(method: str, name: str) -> str:
    """The flat key of a method's own parameter (``image_size`` and ``synthesis`` too)."""
    return f"{method}.{name}"


def size_key(method: str) -> str:
    return method_key(method, "image_size")


def family_key(method: str) -> str:
    """The key of the synthesis family a method trains with."""
    return method_key(method, "synthesis")


def synthesis_key(family: str, name: str) -> str:
    """The flat key of a synthesis family's parameter."""
    return f"{SYNTHESIS_PREFIX}{family}.{name}"


@dataclass(frozen=True)
class TrialConfig:
    """A flat sampled config split back into what ``training.TrainConfig`` needs."""

    method: str
    method_params: dict[str, Any]
    synthesis: str | None
    synthesis_params: dict[str, Any]
    image_size: int


def split_config(flat: Mapping[str, Any], default_image_size: int) -> TrialConfig:
    """Undo the prefixes of a flat sampled config. The size is ``<method>.image_size``,
    else ``image_size`` (searches before sizes were per method), else
    ``default_image_size``."""
    method = str(flat[METHOD])
    family = flat.get(family_key(method))
    family_prefix = synthesis_key(str(family), "") if family else None
    special = {family_key(method), size_key(method)}
    own = method_key(method, "")
    method_params = {k[len(own):]: v for k, v in flat.items() if k.startswith(own) and k not in special}
    synthesis_params = ({k[len(family_prefix):]: v for k, v in flat.items() if k.startswith(family_prefix)}
                        if family_prefix else {})
    return TrialConfig(
        method=method,
        method_params=method_params,
        synthesis=str(family) if family else "none",
        synthesis_params=synthesis_params,
        image_size=int(flat.get(size_key(method), flat.get("image_size", default_image_size))),
    )
