"""Synthetic-anomaly families, batched in torch on the images' device.

Families (``FAMILIES``): perlin (DRAEM), nsa (NSA, Poisson blending), cutpaste and
cutpaste_scar (CutPaste), corruption (SSAE). Build one with ``build_synthesizer``::

    synth = build_synthesizer("nsa", {"label": "binary"}, category="screw")
    batch = synth(images, torch.Generator(images.device).manual_seed(0))
    batch.images, batch.masks, batch.labels   # B x C x H x W, B x 1 x H x W, B

Each family's parameter names, defaults and ranges are in its module docstring and in
``<Params>.RANGES``; ``range_doc(FAMILIES[name].Params)`` prints them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from automl_ad.errors import UserError
from automl_ad.synthesis.base import FAMILIES, SynthBatch, SynthParams, Synthesizer, range_doc, val_families

# Importing a family's module registers it (@register_family). The order is the frozen
# val set's family order: keep it, or every seeded val set changes.
from automl_ad.synthesis.perlin import PerlinParams, PerlinSynthesizer  # noqa: E402  (perlin)
from automl_ad.synthesis.poisson import NSAParams, NSASynthesizer, category_defaults, poisson_blend  # noqa: E402  (nsa)
from automl_ad.synthesis.cutpaste import (  # noqa: E402  (cutpaste, cutpaste_scar)
    CutPasteParams, CutPasteSynthesizer, ScarParams, ScarSynthesizer,
)
from automl_ad.synthesis.corruption import CorruptionParams, CorruptionSynthesizer  # noqa: E402  (corruption)


def build_synthesizer(
    family: str,
    params: Mapping[str, Any] | None = None,
    *,
    category: str | None = None,
    texture_dir: Path | None = None,
) -> Synthesizer:
    """Family by name with ``params`` over its (per-category, for NSA) defaults.

    Unknown family, unknown key or a value outside its range raise ``UserError``.
    ``texture_dir``: folder of anomaly-source images such as DTD (used by perlin,
    ignored by the other families).
    """
    if family not in FAMILIES:
        from automl_ad.plugins import load_plugins

        load_plugins()  # a family from AUTOML_AD_PLUGINS
    if family not in FAMILIES:
        raise UserError(f"unknown synthesis family {family!r} (known: {', '.join(FAMILIES)})")
    cls = FAMILIES[family]
    defaults = cls.category_defaults(category)
    built = cls.Params.from_mapping(params, defaults)
    return cls(built, category=category, texture_dir=Path(texture_dir) if texture_dir is not None else None)


__all__ = [
    "FAMILIES",
    "SynthBatch",
    "SynthParams",
    "Synthesizer",
    "build_synthesizer",
    "val_families",
    "category_defaults",
    "poisson_blend",
    "range_doc",
    "CorruptionParams",
    "CorruptionSynthesizer",
    "CutPasteSynthesizer",
    "NSASynthesizer",
    "PerlinSynthesizer",
    "ScarSynthesizer",
    "CutPasteParams",
    "NSAParams",
    "PerlinParams",
    "ScarParams",
]
