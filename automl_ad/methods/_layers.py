"""Building blocks shared by the from-scratch methods (DRAEM, NSA, SSAE).

Losses (SSIM, focal), conv blocks, map filters (mean, Gaussian), padding to a multiple
of the network stride, and DCGAN-style weight initialisation. Everything here is
deterministic given its inputs; nothing draws random numbers except the explicit
``normal_init``, which uses the global generator like every ``nn.Module`` constructor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from automl_ad.errors import UserError

REFERENCE_SIZE = 256  # resolution at which the papers state their window sizes


def conv_bn_relu(in_channels: int, out_channels: int, dilation: int = 1) -> nn.Sequential:
    """3x3 conv (same size), batch norm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two conv-BN-ReLU layers: the unit block of DRAEM's sub-networks."""
    return nn.Sequential(conv_bn_relu(in_channels, out_channels), conv_bn_relu(out_channels, out_channels))


def normal_init(module: nn.Module, std: float = 0.02) -> None:
    """Conv weights ~ N(0, std), BN weights ~ N(1, std), biases 0 (DRAEM's init)."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(layer.weight, 0.0, std)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.normal_(layer.weight, 1.0, std)
            nn.init.zeros_(layer.bias)


def pad_to_multiple(images: Tensor, multiple: int) -> tuple[Tensor, int, int]:
    """Replicate-pad H and W up to a multiple of the network's total stride.

    Returns the padded tensor and the original (H, W) so outputs can be cropped back;
    sizes already divisible pass through untouched.
    """
    height, width = images.shape[-2:]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    if pad_h or pad_w:
        images = F.pad(images, (0, pad_w, 0, pad_h), mode="replicate")
    return images, height, width


def effective_side(height: int, width: int) -> float:
    """The side of the square with as many pixels as ``height x width``: what a length
    given at a square size scales with on a non-square image (equal to the side on a square)."""
    return math.sqrt(int(height) * int(width))


def scaled_odd_window(window_at_reference: int, size: float) -> int:
    """A window given at 256 px rescaled to ``size`` px, rounded to an odd number >= 1."""
    scaled = max(1, round(window_at_reference * size / REFERENCE_SIZE))
    return scaled if scaled % 2 == 1 else scaled + 1


def mean_filter(maps: Tensor, window: int) -> Tensor:
    """B x H x W box filter, same size (zero padding counted, as DRAEM's avg_pool2d)."""
    if window <= 1:
        return maps
    return F.avg_pool2d(maps[:, None], window, stride=1, padding=window // 2)[:, 0]


def gaussian_kernel1d(sigma: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    radius = max(1, int(math.ceil(4.0 * sigma)))
    offsets = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(maps: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian filter of B x H x W maps (reflect padding keeps borders fair)."""
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel1d(sigma, maps.device, maps.dtype)
    radius = kernel.numel() // 2
    x = maps[:, None]
    # Reflect padding needs pad < size; tiny maps fall back to replicate.
    mode = "reflect" if radius < min(x.shape[-2:]) else "replicate"
    x = F.pad(x, (radius, radius, 0, 0), mode=mode)
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, radius, radius), mode=mode)
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x[:, 0]


def ssim(a: Tensor, b: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Mean SSIM of two B x C x H x W images in [0, 1] with a Gaussian window.

    Constants are those of Wang et al. 2004 for a dynamic range of 1; zero padding
    as in DRAEM's implementation, so borders count like interior pixels.
    """
    if a.dtype != torch.float32 or b.dtype != torch.float32 or torch.is_autocast_enabled(a.device.type):
        # Always in fp32: the local variances E[x^2] - E[x]^2 are small differences of
        # values near 0.25 that bf16/fp16 cancel (a mixed-precision training step).
        with torch.autocast(a.device.type, enabled=False):
            return ssim(a.float(), b.float(), window, sigma)
    channels = a.shape[1]
    offsets = torch.arange(window, device=a.device, dtype=a.dtype) - window // 2
    g = torch.exp(-0.5 * (offsets / sigma) ** 2)
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(channels, 1, window, window).contiguous()

    def blur(x: Tensor) -> Tensor:
        return F.conv2d(x, kernel, padding=window // 2, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim_map.mean()


def ssim_loss(a: Tensor, b: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    return 1.0 - ssim(a, b, window, sigma)


def focal_loss(probabilities: Tensor, targets: Tensor, gamma: float = 2.0, smoothing: float = 1e-5) -> Tensor:
    """Focal loss (Lin et al. 2017, no alpha) on B x K x H x W softmax outputs.

    ``targets`` is B x K x H x W in [0, 1] (one-hot for hard labels); soft targets
    weight each class's term, which reduces to the usual form for one-hot labels.
    ``smoothing`` keeps log() finite, as in DRAEM.
    """
    p = probabilities.clamp(smoothing, 1.0 - smoothing)
    per_class = -targets * (1.0 - p) ** gamma * torch.log(p)
    return per_class.sum(dim=1).mean()


def check_range(method: str, key: str, value: float, low: float, high: float) -> None:
    """Raise the one-line UserError every Config uses for an out-of-range value."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"method {method!r}: {key}={value!r} must be a number")
    if not (low <= value <= high):
        raise UserError(f"method {method!r}: {key}={value!r} is outside [{low}, {high}]")


def check_choice(method: str, key: str, value: object, choices: tuple[object, ...]) -> None:
    if value not in choices:
        raise UserError(f"method {method!r}: {key}={value!r} is not one of {', '.join(map(str, choices))}")


def check_int(method: str, key: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"method {method!r}: {key}={value!r} must be an integer")
    check_range(method, key, value, low, high)
