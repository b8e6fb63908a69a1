"""Preview grids of synthetic anomalies: for eyeballing a family's parameters.

Each column is one example; rows: the normal image, the synthesized image with the
mask's outline drawn in red, and the pixel label map.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from automl_ad.synthesis import build_synthesizer


def preview_grid(
    family: str,
    params: Mapping[str, Any] | None,
    images: Tensor,
    generator: torch.Generator,
    out_png: Path,
    *,
    category: str | None = None,
    texture_dir: Path | None = None,
    sources: Tensor | None = None,
) -> Path:
    """Synthesize ``family`` on ``images`` (B x C x H x W float in [0, 1]) with every
    sample anomalous and write a 3-row grid to ``out_png`` (atomic write)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = {**dict(params or {}), "normal_share": 0.0}
    synth = build_synthesizer(family, settings, category=category, texture_dir=texture_dir)
    batch = synth(images, generator, sources=sources)
    count = images.shape[0]
    fig, axes = plt.subplots(3, count, figsize=(2.0 * count, 6.2), squeeze=False)
    for column in range(count):
        before = _to_display(images[column])
        after = _to_display(batch.images[column])
        label_map = batch.masks[column, 0].detach().cpu().numpy()
        gray = "gray" if before.ndim == 2 else None
        axes[0, column].imshow(before, cmap=gray, vmin=0, vmax=1)
        axes[1, column].imshow(after, cmap=gray, vmin=0, vmax=1)
        if label_map.max() > 0:
            level = 0.5 * float(label_map.max())
            axes[1, column].contour(label_map, levels=[level], colors="red", linewidths=0.8)
        axes[2, column].imshow(label_map, cmap="magma", vmin=0, vmax=1)
        axes[0, column].set_title(f"label {batch.labels[column].item():.0f}", fontsize=8)
        for row in range(3):
            axes[row, column].set_axis_off()
    axes[0, 0].text(-0.1, 0.5, "normal", transform=axes[0, 0].transAxes, rotation=90, va="center", ha="right", fontsize=9)
    axes[1, 0].text(-0.1, 0.5, family, transform=axes[1, 0].transAxes, rotation=90, va="center", ha="right", fontsize=9)
    axes[2, 0].text(-0.1, 0.5, "label map", transform=axes[2, 0].transAxes, rotation=90, va="center", ha="right", fontsize=9)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(f".{out_png.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png


def _to_display(image: Tensor):
    array = image.detach().float().clamp(0, 1).cpu().numpy()
    return array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)
