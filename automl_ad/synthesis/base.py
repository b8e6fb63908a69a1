"""Shared pieces of every synthetic-anomaly family.

A family is a ``Synthesizer`` subclass plus a params dataclass derived from
``SynthParams``. Params declare ``RANGES``: for each field either ``(low, high)`` (inclusive,
numbers) or a tuple of allowed strings; ``__post_init__`` checks every field and raises
``UserError`` naming family, key, value and range.

Calling a synthesizer: ``synth(images, generator, sources=None) -> SynthBatch``. It draws
which samples stay normal (``normal_share``), picks a donor image for each anomalous one
(``sources`` when given, else the batch rolled by one), and asks the family for the
anomalous subset only. All randomness comes from the generator passed in.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from automl_ad.errors import UserError


@dataclass
class SynthBatch:
    """images: B x C x H x W in [0, 1]; masks: B x 1 x H x W pixel labels in [0, 1];
    labels: B float, 1 = anomalous; clean: the images the anomalies were pasted into when
    the family changed them first (perlin's rotation of normals: the reconstruction
    target), None when they are the input images."""

    images: Tensor
    masks: Tensor
    labels: Tensor
    clean: Tensor | None = None


@dataclass
class SynthParams:
    """Base of every family's params. ``RANGES`` documents and bounds every field."""

    FAMILY: ClassVar[str] = ""
    RANGES: ClassVar[dict[str, tuple]] = {}

    normal_share: float = 0.5

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            bounds = self.RANGES.get(field.name)
            if bounds is None:
                raise TypeError(f"{type(self).__name__}.{field.name} has no entry in RANGES")
            value = getattr(self, field.name)
            if all(isinstance(b, str) for b in bounds):
                if value not in bounds:
                    raise UserError(
                        f"synthesis {self.FAMILY}: {field.name}={value!r} not one of {', '.join(bounds)}"
                    )
                continue
            low, high = bounds
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                if isinstance(low, bool) and isinstance(value, bool):
                    continue
                raise UserError(f"synthesis {self.FAMILY}: {field.name}={value!r} must be a number in [{low}, {high}]")
            if isinstance(low, int) and not isinstance(low, bool) and isinstance(high, int) and float(value) != int(value):
                raise UserError(f"synthesis {self.FAMILY}: {field.name}={value!r} must be an integer in [{low}, {high}]")
            if not (low <= value <= high) or (isinstance(value, float) and math.isnan(value)):
                raise UserError(f"synthesis {self.FAMILY}: {field.name}={value!r} outside range [{low}, {high}]")
            if isinstance(low, int) and isinstance(high, int):
                object.__setattr__(self, field.name, int(value))
            else:
                object.__setattr__(self, field.name, float(value))
        self.check_pairs()

    def check_pairs(self) -> None:
        """Cross-field checks (low <= high); subclasses list their pairs in ``PAIRS``."""
        for low_key, high_key in getattr(self, "PAIRS", ()):
            if getattr(self, low_key) > getattr(self, high_key):
                raise UserError(
                    f"synthesis {self.FAMILY}: {low_key}={getattr(self, low_key)} must be <= "
                    f"{high_key}={getattr(self, high_key)}"
                )

    @classmethod
    def from_mapping(cls, params: Mapping[str, Any] | None, defaults: Mapping[str, Any] | None = None):
        known = {f.name for f in dataclasses.fields(cls)}
        merged = dict(defaults or {})
        for key, value in (params or {}).items():
            if key not in known:
                raise UserError(
                    f"synthesis {cls.FAMILY}: unknown parameter {key!r} (known: {', '.join(sorted(known))})"
                )
            merged[key] = value
        return cls(**merged)


def range_doc(params_cls: type[SynthParams]) -> str:
    """One line per field: ``name: default, range`` (used in docs and --help)."""
    lines = []
    for field in dataclasses.fields(params_cls):
        bounds = params_cls.RANGES[field.name]
        shown = "|".join(bounds) if all(isinstance(b, str) for b in bounds) else f"[{bounds[0]}, {bounds[1]}]"
        lines.append(f"{field.name}={field.default!r} {shown}")
    return "\n".join(lines)


class Synthesizer:
    """Callable family instance. Subclasses set FAMILY, Params and implement ``synthesize``,
    and join the registry with ``@register_family``.

    VAL_PARAMS: what a frozen val anomaly of the family sets over its defaults (NSA's
    masks must be binary ground truth there, not soft training targets); IN_VAL: whether
    the val set has anomalies of this family; ``category_defaults``: per-product defaults
    (NSA's per-class constants)."""

    FAMILY: ClassVar[str] = ""
    Params: ClassVar[type[SynthParams]]
    VAL_PARAMS: ClassVar[Mapping[str, Any]] = {}
    IN_VAL: ClassVar[bool] = True
    # True when ``synthesize`` already returns images and masks in [0, 1] (saves two
    # full passes over the batch)
    OUTPUT_IN_RANGE: ClassVar[bool] = False

    def __init__(self, params: SynthParams, *, category: str | None = None, texture_dir: Path | None = None) -> None:
        self.params = params
        self.category = category
        self.texture_dir = texture_dir

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params})"

    @classmethod
    def category_defaults(cls, category: str | None) -> dict[str, Any]:
        """Defaults of this family for ``category`` over its Params' own (none here)."""
        return {}

    def __call__(self, images: Tensor, generator: torch.Generator, *, sources: Tensor | None = None) -> SynthBatch:
        images = check_images(images).contiguous()
        batch = images.shape[0]
        anomalous = uniform(generator, (batch,), images.device) >= self.params.normal_share
        index = anomalous.nonzero().squeeze(1)
        if index.numel() == batch:  # every sample anomalous: no gather/scatter copies
            donors = pick_donors(images, index, generator, sources)
            result = self.synthesize(images, donors, generator, sources_given=sources is not None)
            if self.OUTPUT_IN_RANGE:
                return result
            return SynthBatch(result.images.clamp(0.0, 1.0), result.masks.clamp(0.0, 1.0), result.labels.clone())
        out = images.clone()
        masks = images.new_zeros(batch, 1, *images.shape[2:])
        labels = images.new_zeros(batch)
        if index.numel() == 0:
            return SynthBatch(out, masks, labels)
        donors = pick_donors(images, index, generator, sources)
        result = self.synthesize(images[index], donors, generator, sources_given=sources is not None)
        out[index] = result.images.clamp(0.0, 1.0)
        masks[index] = result.masks.clamp(0.0, 1.0)
        labels[index] = result.labels
        return SynthBatch(out, masks, labels)

    def synthesize(self, images: Tensor, donors: Tensor, generator: torch.Generator, *, sources_given: bool) -> SynthBatch:
        """``images`` may be the caller's tensor: never modify it. ``donors`` is a fresh
        tensor made for this call: the family may modify it in place."""
        raise NotImplementedError


# ---------------------------------------------------------------- tensor helpers


def check_images(images: Tensor) -> Tensor:
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"synthesis expects B x C x H x W images with C in (1, 3), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"synthesis expects float images in [0, 1], got {images.dtype}")
    return images.float()


def match_images(other: Tensor, like: Tensor) -> Tensor:
    """Bring ``other`` (N x C' x H' x W', any float/uint8) to ``like``'s channels, size, device."""
    other = other.to(like.device)
    other = other.float().div(255.0) if other.dtype == torch.uint8 else other.float()
    channels = like.shape[1]
    if other.shape[1] != channels:
        other = other.mean(1, keepdim=True) if channels == 1 else other[:, :1].expand(-1, channels, -1, -1)
    if other.shape[2:] != like.shape[2:]:
        other = F.interpolate(other, size=like.shape[2:], mode="bilinear", align_corners=False, antialias=True)
    return other.clamp(0.0, 1.0)


def pick_donors(images: Tensor, index: Tensor, generator: torch.Generator, sources: Tensor | None) -> Tensor:
    """One donor image per anomalous sample: a random ``sources`` image, else the batch
    rolled by one (the previous image, as NSA does), else the image itself (batch of 1)."""
    if sources is not None:
        pool = match_images(sources, images)
        pick = torch.randint(0, pool.shape[0], (index.numel(),), generator=generator, device=images.device)
        return pool[pick]
    return images[(index - 1) % images.shape[0]]


def uniform(generator: torch.Generator, shape: tuple[int, ...], device: torch.device, low: float | Tensor = 0.0, high: float | Tensor = 1.0) -> Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, device=device)


def normal(generator: torch.Generator, shape: tuple[int, ...], device: torch.device, mean: float = 0.0, std: float = 1.0) -> Tensor:
    return mean + std * torch.randn(shape, generator=generator, device=device)


def gamma_samples(generator: torch.Generator, shape: tuple[int, ...], device: torch.device, shape_k: float, scale: float) -> Tensor:
    """Gamma(shape_k, scale) via Marsaglia-Tsang (torch's gamma sampler takes no generator)."""
    boost = shape_k < 1.0
    k = shape_k + 1.0 if boost else shape_k
    d = k - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = torch.zeros(shape, device=device)
    done = torch.zeros(shape, dtype=torch.bool, device=device)
    for _ in range(64):  # acceptance rate > 95 %: a handful of rounds fill every entry
        x = torch.randn(shape, generator=generator, device=device)
        u = torch.rand(shape, generator=generator, device=device)
        v = (1.0 + c * x) ** 3
        ok = (v > 0) & (torch.log(u.clamp_min(1e-30)) < 0.5 * x * x + d - d * v + d * torch.log(v.clamp_min(1e-30)))
        take = ok & ~done
        out = torch.where(take, d * v, out)
        done |= ok
        if bool(done.all()):
            break
    if boost:
        out = out * torch.rand(shape, generator=generator, device=device) ** (1.0 / shape_k)
    return out * scale


def pixel_grid(batch: int, height: int, width: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates (y, x), each B x H x W, in pixels."""
    ys = torch.arange(height, device=device, dtype=torch.float32)
    xs = torch.arange(width, device=device, dtype=torch.float32)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return yy.expand(batch, -1, -1), xx.expand(batch, -1, -1)


def affine_paste(
    donors: Tensor,
    dest_center: Tensor,
    dest_half: Tensor,
    src_center: Tensor,
    scale: Tensor,
    angle: Tensor | None = None,
    padding: str = "reflection",
) -> tuple[Tensor, Tensor]:
    """Sample each donor so that its rectangle around ``src_center`` lands, scaled by
    ``scale`` and rotated by ``angle`` (radians), around ``dest_center``.

    dest_center, dest_half, src_center: B x 2 as (y, x) pixels; scale, angle: B.
    Returns (placed donor B x C x H x W, rectangle mask B x 1 x H x W in {0, 1}); the
    mask is the strict interior of the destination rectangle.
    """
    batch, _, height, width = donors.shape
    yy, xx = pixel_grid(batch, height, width, donors.device)
    dy = yy - dest_center[:, 0, None, None]
    dx = xx - dest_center[:, 1, None, None]
    if angle is not None:
        cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
        dy, dx = cos * dy - sin * dx, sin * dy + cos * dx
    inside = (dy.abs() < dest_half[:, 0, None, None]) & (dx.abs() < dest_half[:, 1, None, None])
    src_y = src_center[:, 0, None, None] + dy / scale[:, None, None]
    src_x = src_center[:, 1, None, None] + dx / scale[:, None, None]
    grid = torch.stack(((2 * src_x + 1) / width - 1, (2 * src_y + 1) / height - 1), dim=-1)
    placed = F.grid_sample(donors, grid, mode="bilinear", padding_mode=padding, align_corners=False)
    return placed, inside.unsqueeze(1).float()


def color_jitter(images: Tensor, generator: torch.Generator, strength: float) -> Tensor:
    """torchvision-style ColorJitter(b, c, s, h = strength), batched with per-image factors."""
    if strength <= 0:
        return images
    batch, channels = images.shape[:2]
    dev = images.device
    def factor() -> Tensor:
        return uniform(generator, (batch, 1, 1, 1), dev, 1 - strength, 1 + strength)
    out = images * factor()
    gray = out.mean(dim=(1, 2, 3), keepdim=True) if channels == 1 else luminance(out).mean(dim=(1, 2, 3), keepdim=True)
    out = (gray + factor() * (out - gray)).clamp(0, 1)
    if channels == 3:
        gray_px = luminance(out)
        out = (gray_px + factor() * (out - gray_px)).clamp(0, 1)
        out = shift_hue(out, uniform(generator, (batch,), dev, -strength, strength))
    return out.clamp(0, 1)


def luminance(images: Tensor) -> Tensor:
    weights = images.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True)


def rgb_to_hsv(images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r, g, b = images.unbind(1)
    value, argmax = images.max(1)
    delta = value - images.min(1).values
    safe = delta.clamp_min(1e-8)
    hue = torch.stack((((g - b) / safe) % 6, (b - r) / safe + 2, (r - g) / safe + 4), 1)
    hue = hue.gather(1, argmax.unsqueeze(1)).squeeze(1) / 6.0
    hue = torch.where(delta > 1e-8, hue, torch.zeros_like(hue))
    saturation = delta / value.clamp_min(1e-8)
    return hue % 1.0, saturation, value


def hsv_to_rgb(hue: Tensor, saturation: Tensor, value: Tensor) -> Tensor:
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = (n + hue * 6.0) % 6.0
        channels.append(value - value * saturation * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0))
    return torch.stack(channels, 1)


def shift_hue(images: Tensor, shift: Tensor, saturation_add: Tensor | None = None) -> Tensor:
    """Rotate hue by ``shift`` (fraction of the circle, B) and add to saturation (B)."""
    hue, sat, val = rgb_to_hsv(images)
    hue = (hue + shift[:, None, None]) % 1.0
    if saturation_add is not None:
        sat = (sat + saturation_add[:, None, None]).clamp(0, 1)
    return hsv_to_rgb(hue, sat, val)


def majority_filter(binary: Tensor, size: int, border: str = "cut") -> Tensor:
    """Median filter of a {0,1} map (B x 1 x H x W): for binary input the median of an
    odd window is the majority vote. ``border="cut"``: windows are cut at the image
    border (as a box filter without padded pixels counts them): 1 where more than half
    of the window's pixels inside the image are 1. ``border="replicate"``: the map is
    extended by repeating its edge pixels, as cv2.medianBlur does (NSA's official code
    filters its object and label masks with it)."""
    # Counts by separable shifted sums in uint8 (at most size**2 = 49 for NSA's 7 x 7):
    # exact, and about 9x faster on CPU than a float 2-D avg_pool with border counts.
    if border not in ("cut", "replicate"):
        raise ValueError(f"majority_filter: border={border!r} not one of cut, replicate")
    ones = binary.to(torch.uint8)
    reach = size // 2
    height, width = ones.shape[-2:]
    if border == "cut":
        padded = F.pad(ones, (reach, reach, reach, reach))
    else:  # edge pixels repeated: gather rows and columns at clamped indices
        rows = torch.arange(-reach, height + reach, device=ones.device).clamp(0, height - 1)
        cols = torch.arange(-reach, width + reach, device=ones.device).clamp(0, width - 1)
        padded = ones.index_select(-2, rows).index_select(-1, cols)
    across = padded[..., :, :width].clone()
    for shift in range(1, size):
        across += padded[..., :, shift : shift + width]
    count = across[..., :height, :].clone()
    for shift in range(1, size):
        count += across[..., shift : shift + height, :]
    if border == "replicate":
        return (2 * count.float() > size * size).float()
    inside = _window_sizes(height, reach, ones.device)[:, None] * _window_sizes(width, reach, ones.device)[None, :]
    return (2 * count.float() > inside).float()


def _window_sizes(length: int, reach: int, device: torch.device) -> Tensor:
    """How many of positions i - reach .. i + reach lie in 0 .. length - 1, per i."""
    at = torch.arange(length, device=device)
    return ((at + reach).clamp_max(length - 1) - (at - reach).clamp_min(0) + 1).float()


def median_filter(values: Tensor, size: int, chunk: int = 8) -> Tensor:
    """Exact median over a size x size window (B x 1 x H x W), in chunks to bound memory."""
    height, width = values.shape[2:]
    parts = []
    for start in range(0, values.shape[0], chunk):
        part = values[start : start + chunk]
        padded = F.pad(part, (size // 2,) * 4, mode="replicate")
        windows = F.unfold(padded, size)
        parts.append(windows.median(dim=1).values.view(part.shape[0], 1, height, width))
    return torch.cat(parts)


# The families by name, in registration order: the order of the frozen val set's families
# (synthesis/__init__.py imports the modules in that order: keep it, or every seeded val
# set changes).
FAMILIES: dict[str, type[Synthesizer]] = {}


def register_family(cls: type[Synthesizer]) -> type[Synthesizer]:
    """Class decorator: ``cls`` becomes the family ``cls.FAMILY``."""
    if not cls.FAMILY or cls.FAMILY in FAMILIES:
        raise ValueError(f"synthesis family {cls.FAMILY!r}: empty or registered twice")
    FAMILIES[cls.FAMILY] = cls
    return cls


def val_families() -> tuple[str, ...]:
    """The families the frozen val set has anomalies of, in registration order."""
    return tuple(name for name, cls in FAMILIES.items() if cls.IN_VAL)
