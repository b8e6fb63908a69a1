"""Procedural drawing for the built-in products: four product renderers and their defects.

Everything is drawn in normalised coordinates (0..1 across the image) so a product looks
the same at 32 px and at 512 px. A product is described by a frozen *scene* (plain
numbers and seeds); ``render(scene, size)`` turns it into a float RGB image in [0, 1]
plus a foreground alpha. Defects come in two kinds:

- ``Overlay``: paint layered on top of the clean image (scratch, crack, stain, hole,
  particles, fibres). Drawn with OpenCV polygons and polylines, never with noise masks,
  patches cut from other images or Poisson blending, so a detector trained only on the
  synthetic-anomaly families gets no free ride from shared artefacts.
- a changed scene: the part itself is deformed (bent shaft, missing thread, broken tip,
  missing chunk, misprinted mark) and rendered again with the same sensor noise.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import cv2
import numpy as np

FloatImage = np.ndarray  # H x W x 3 float32 in [0, 1]
FloatMap = np.ndarray  # H x W float32

_SUBPIXEL_SHIFT = 4  # OpenCV fixed-point bits: lines and polygons land at 1/16 px


@dataclass(frozen=True)
class Rendering:
    image: FloatImage
    foreground: FloatMap  # 1 on the part, 0 on background; all ones for textures


@dataclass(frozen=True)
class Overlay:
    """Paint layers applied in order; each is (colour H x W x 3, alpha H x W)."""

    layers: tuple[tuple[FloatImage, FloatMap], ...]


# ----------------------------------------------------------------------------- primitives


@functools.lru_cache(maxsize=8)
def pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in normalised units (x, y), each H x W float32, read-only."""
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size
    x, y = np.meshgrid(axis, axis)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def value_noise(rng: np.random.Generator, size: int, cells: int) -> FloatMap:
    """Smooth noise in about [-1, 1] with ``cells`` features across the image."""
    grid = rng.uniform(-1.0, 1.0, (cells + 1, cells + 1)).astype(np.float32)
    return cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)


def fractal_noise(rng: np.random.Generator, size: int, base_cells: int, octaves: int) -> FloatMap:
    total = np.zeros((size, size), np.float32)
    amplitude, norm = 1.0, 0.0
    for octave in range(octaves):
        total += amplitude * value_noise(rng, size, base_cells * 2**octave)
        norm += amplitude
        amplitude *= 0.5
    return total / norm


def lighting_field(size: int, gain: float, grad_x: float, grad_y: float, vignette: float) -> FloatMap:
    """Multiplicative illumination: overall gain, a linear tilt and a radial fall-off."""
    x, y = pixel_grid(size)
    radial = (x - 0.5) ** 2 + (y - 0.5) ** 2
    return gain * (1.0 + grad_x * (x - 0.5) + grad_y * (y - 0.5)) * (1.0 - vignette * radial)


def sensor_noise(seed: int, size: int, sigma: float) -> FloatMap:
    return np.random.default_rng(seed).normal(0.0, sigma, (size, size)).astype(np.float32)


def _fixed_point(points: np.ndarray, size: int) -> np.ndarray:
    return np.round(np.asarray(points, np.float64) * size * (1 << _SUBPIXEL_SHIFT)).astype(np.int32)


def stroke_px(width: float, size: int) -> int:
    """A line width given in pixels at 256 px, scaled to ``size`` (at least 1)."""
    return max(1, int(round(width * size / 256.0)))


def draw_polylines(size: int, paths: list[np.ndarray], thickness: int) -> FloatMap:
    """Antialiased open polylines (normalised points) as an alpha map in [0, 1]."""
    canvas = np.zeros((size, size), np.uint8)
    cv2.polylines(canvas, [_fixed_point(p, size) for p in paths], False, 255, thickness,
                  cv2.LINE_AA, _SUBPIXEL_SHIFT)
    return canvas.astype(np.float32) / 255.0


def draw_polygons(size: int, polygons: list[np.ndarray]) -> FloatMap:
    canvas = np.zeros((size, size), np.uint8)
    cv2.fillPoly(canvas, [_fixed_point(p, size) for p in polygons], 255, cv2.LINE_AA,
                 _SUBPIXEL_SHIFT)
    return canvas.astype(np.float32) / 255.0


def blob_outline(rng: np.random.Generator, centre: np.ndarray, radius: float,
                 roughness: float, aspect: float = 1.0) -> np.ndarray:
    """An irregular star-shaped outline: a circle whose radius wobbles with angle."""
    angles = np.linspace(0.0, 2 * math.pi, 48, endpoint=False)
    wobble = np.zeros_like(angles)
    for harmonic in range(2, 6):
        wobble += rng.normal(0.0, roughness / harmonic) * np.cos(harmonic * angles + rng.uniform(0, 2 * math.pi))
    radii = radius * np.clip(1.0 + wobble, 0.4, 1.8)
    tilt = rng.uniform(0.0, math.pi)
    local = np.stack([radii * np.cos(angles) * aspect, radii * np.sin(angles)], axis=1)
    rotation = np.array([[math.cos(tilt), -math.sin(tilt)], [math.sin(tilt), math.cos(tilt)]])
    return centre + local @ rotation.T


def random_walk(rng: np.random.Generator, start: np.ndarray, heading: float, steps: int,
                step_length: float, wiggle: float) -> np.ndarray:
    """A polyline whose heading drifts by Gaussian turns: fibres, cracks."""
    headings = heading + np.cumsum(rng.normal(0.0, wiggle, steps))
    moves = step_length * np.stack([np.cos(headings), np.sin(headings)], axis=1)
    return np.concatenate([start[None, :], start + np.cumsum(moves, axis=0)])


def branching_walk(rng: np.random.Generator, start: np.ndarray, heading: float, steps: int,
                   step_length: float, wiggle: float, depth: int) -> list[np.ndarray]:
    """A crack: a main random walk with shorter walks splitting off at random points."""
    trunk = random_walk(rng, start, heading, steps, step_length, wiggle)
    paths = [trunk]
    if depth > 0 and steps >= 6:
        for _ in range(int(rng.integers(1, 4))):
            at = int(rng.integers(steps // 4, steps))
            side = rng.choice([-1.0, 1.0])
            local_heading = math.atan2(*(trunk[at] - trunk[at - 1])[::-1])
            paths += branching_walk(rng, trunk[at], local_heading + side * rng.uniform(0.4, 1.0),
                                    steps // 2, step_length, wiggle, depth - 1)
    return paths


def curved_line(rng: np.random.Generator, centre: np.ndarray, length: float, heading: float,
                bow: float) -> np.ndarray:
    """A nearly straight stroke (quadratic Bezier): scratches."""
    direction = np.array([math.cos(heading), math.sin(heading)])
    normal = np.array([-direction[1], direction[0]])
    start, end = centre - direction * length / 2, centre + direction * length / 2
    control = centre + normal * bow * length
    t = np.linspace(0.0, 1.0, 24)[:, None]
    return (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t**2 * end


def solid(colour: tuple[float, float, float] | np.ndarray, size: int, grain: float = 0.0,
          rng: np.random.Generator | None = None) -> FloatImage:
    layer = np.empty((size, size, 3), np.float32)
    layer[:] = np.asarray(colour, np.float32)
    if grain > 0 and rng is not None:
        layer += rng.normal(0.0, grain, (size, size, 1)).astype(np.float32)
    return layer


def soft_blotch(rng: np.random.Generator, size: int, centre: np.ndarray, radius: float) -> FloatMap:
    """A few overlapping ellipses, blurred: the soft footprint of a stain, peak 1."""
    canvas = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.integers(2, 5))):
        offset = rng.normal(0.0, radius * 0.35, 2)
        axes = _fixed_point(radius * rng.uniform(0.4, 0.9, 2), size)
        cv2.ellipse(canvas, tuple(_fixed_point(centre + offset, size)), tuple(axes),
                    float(rng.uniform(0, 180)), 0, 360, 255, -1, cv2.LINE_AA, _SUBPIXEL_SHIFT)
    sigma = max(0.8, radius * size * 0.25)
    blurred = cv2.GaussianBlur(canvas.astype(np.float32) / 255.0, (0, 0), sigma)
    return blurred / max(float(blurred.max()), 1e-6)


def _random_point(rng: np.random.Generator, margin: float) -> np.ndarray:
    return rng.uniform(margin, 1.0 - margin, 2)


def point_on(rng: np.random.Generator, region: FloatMap) -> np.ndarray:
    """A random normalised point inside ``region`` (> 0.5), e.g. on the part."""
    ys, xs = np.nonzero(region > 0.5)
    size = region.shape[0]
    if len(xs) == 0:
        return _random_point(rng, 0.3)
    pick = int(rng.integers(len(xs)))
    return (np.array([xs[pick], ys[pick]], np.float64) + 0.5) / size


# ----------------------------------------------------------------------------- shared defects


def scratch_overlay(rng: np.random.Generator, size: int, centre: np.ndarray, length: float,
                    bright: bool, clip: FloatMap | None = None) -> Overlay:
    heading = rng.uniform(0, math.pi)
    paths = []
    for _ in range(int(rng.integers(1, 4))):
        offset = rng.normal(0.0, 0.012, 2)
        paths.append(curved_line(rng, centre + offset, length * rng.uniform(0.6, 1.0),
                                 heading + rng.normal(0, 0.08), rng.normal(0, 0.08)))
    alpha = draw_polylines(size, paths, stroke_px(rng.uniform(1.0, 2.0), size)) * rng.uniform(0.7, 0.95)
    if clip is not None:
        alpha *= clip
    tone = rng.uniform(0.88, 1.0) if bright else rng.uniform(0.05, 0.2)
    return Overlay(((solid((tone, tone, tone), size, 0.03, rng), alpha),))


def crack_overlay(rng: np.random.Generator, size: int, start: np.ndarray, heading: float,
                  length: float, clip: FloatMap | None = None) -> Overlay:
    step = 1.5 / 256
    steps = max(8, int(length / step))
    paths = branching_walk(rng, start, heading, steps, step, 0.3, depth=2)
    core = draw_polylines(size, paths, stroke_px(rng.uniform(1.0, 2.2), size))
    halo = cv2.GaussianBlur(core, (0, 0), max(0.7, 1.5 * size / 256)) * 0.35
    if clip is not None:
        core, halo = core * clip, halo * clip
    dark = rng.uniform(0.05, 0.18)
    return Overlay(((solid((dark * 2, dark * 2, dark * 2), size), halo),
                    (solid((dark, dark, dark), size, 0.02, rng), core * 0.95)))


def stain_overlay(rng: np.random.Generator, size: int, clean: FloatImage, centre: np.ndarray,
                  radius: float, clip: FloatMap | None = None) -> Overlay:
    palettes = [(0.55, 0.4, 0.22), (0.35, 0.33, 0.3), (0.7, 0.55, 0.2), (0.45, 0.2, 0.15)]
    tint = np.asarray(palettes[int(rng.integers(len(palettes)))], np.float32)
    alpha = soft_blotch(rng, size, centre, radius) * rng.uniform(0.55, 0.85)
    if clip is not None:
        alpha *= clip
    # a stain soaks in: the texture underneath stays visible, only tinted and darkened
    colour = clean * tint * rng.uniform(0.6, 0.9)
    return Overlay(((colour.astype(np.float32), alpha),))


def contamination_overlay(rng: np.random.Generator, size: int, centre: np.ndarray) -> Overlay:
    palettes = [(0.05, 0.05, 0.05), (0.95, 0.95, 0.92), (0.7, 0.12, 0.1), (0.15, 0.25, 0.65),
                (0.45, 0.35, 0.2)]
    layers = []
    kind = int(rng.integers(3))  # 0 fibres, 1 particles, 2 both
    if kind in (0, 2):
        paths = [random_walk(rng, centre + rng.normal(0, 0.02, 2), rng.uniform(0, 2 * math.pi),
                             int(rng.integers(20, 60)), 1.6 / 256, 0.18)
                 for _ in range(int(rng.integers(1, 3)))]
        tone = palettes[int(rng.integers(len(palettes)))]
        alpha = draw_polylines(size, paths, stroke_px(rng.uniform(1.0, 2.0), size)) * 0.95
        layers.append((solid(tone, size, 0.03, rng), alpha))
    if kind in (1, 2):
        grains = [blob_outline(rng, centre + rng.normal(0, 0.025, 2), rng.uniform(1.2, 4.0) / 256, 0.3)
                  for _ in range(int(rng.integers(2, 7)))]
        tone = palettes[int(rng.integers(len(palettes)))]
        layers.append((solid(tone, size, 0.04, rng), draw_polygons(size, grains)))
    return Overlay(tuple(layers))


def hole_overlay(rng: np.random.Generator, size: int, clean: FloatImage, centre: np.ndarray,
                 radius: float, interior: float, rim_gain: float) -> Overlay:
    """A dark blob ringed by a lighter rim: a hole in cloth, a chip in stone."""
    outline = blob_outline(rng, centre, radius, 0.25, aspect=rng.uniform(0.7, 1.3))
    inside = draw_polygons(size, [outline])
    rim_px = max(1, int(round(rng.uniform(1.5, 3.0) * size / 256)))
    rim = cv2.dilate(inside, np.ones((2 * rim_px + 1, 2 * rim_px + 1), np.uint8))
    rim = cv2.GaussianBlur(rim, (0, 0), max(0.5, rim_px * 0.5))
    x, y = pixel_grid(size)
    # light from the upper left: the far wall of the hole is lit, the near wall shaded
    depth_shade = 1.0 + 1.5 * ((x - centre[0]) + (y - centre[1])) / max(radius, 1e-3) * 0.2
    interior_colour = solid((interior,) * 3, size, 0.02, rng) * depth_shade[..., None]
    rim_colour = np.clip(clean * rim_gain, 0, 1)
    return Overlay(((rim_colour.astype(np.float32), rim * 0.8),
                    (interior_colour.astype(np.float32), inside)))


# ----------------------------------------------------------------------------- fabric


@dataclass(frozen=True)
class FabricScene:
    period: float
    angle: float
    phase_warp: float
    phase_weft: float
    warp_colour: tuple[float, float, float]
    weft_colour: tuple[float, float, float]
    yarn_seed: int
    light: tuple[float, float, float, float]
    noise_seed: int


def sample_fabric(rng: np.random.Generator) -> FabricScene:
    base = np.array([0.42, 0.5, 0.62]) + rng.normal(0, 0.02, 3)
    return FabricScene(
        period=float(rng.uniform(0.034, 0.044)),
        angle=float(rng.normal(0, math.radians(2.5))),
        phase_warp=float(rng.uniform(0, 1)),
        phase_weft=float(rng.uniform(0, 1)),
        warp_colour=tuple(np.clip(base, 0, 1).tolist()),
        weft_colour=tuple(np.clip(base * rng.uniform(0.8, 0.9) + rng.normal(0, 0.015, 3), 0, 1).tolist()),
        yarn_seed=int(rng.integers(2**31)),
        light=_sample_light(rng),
        noise_seed=int(rng.integers(2**31)),
    )


def render_fabric(scene: FabricScene, size: int) -> Rendering:
    x, y = pixel_grid(size)
    cos_a, sin_a = math.cos(scene.angle), math.sin(scene.angle)
    along_warp = (x * cos_a + y * sin_a) / scene.period + scene.phase_warp
    along_weft = (-x * sin_a + y * cos_a) / scene.period + scene.phase_weft
    warp_index, weft_index = np.floor(along_warp), np.floor(along_weft)
    frac_warp, frac_weft = along_warp - warp_index, along_weft - weft_index
    # plain weave: warp on top where the thread indices have even sum
    warp_on_top = ((warp_index + weft_index) % 2) == 0
    bump_warp = np.sqrt(np.clip(1.0 - (2.0 * frac_warp - 1.0) ** 2, 0, 1))
    bump_weft = np.sqrt(np.clip(1.0 - (2.0 * frac_weft - 1.0) ** 2, 0, 1))
    height = np.where(warp_on_top, bump_warp * (0.7 + 0.3 * np.sin(math.pi * frac_weft)),
                      bump_weft * (0.7 + 0.3 * np.sin(math.pi * frac_warp)))
    yarn_rng = np.random.default_rng(scene.yarn_seed)
    yarn_warp = 1.0 + yarn_rng.normal(0, 0.06, 256).astype(np.float32)
    yarn_weft = 1.0 + yarn_rng.normal(0, 0.06, 256).astype(np.float32)
    yarn = np.where(warp_on_top, yarn_warp[warp_index.astype(np.int64) % 256],
                    yarn_weft[weft_index.astype(np.int64) % 256])
    fuzz = fractal_noise(yarn_rng, size, max(4, size // 16), 2) * 0.05
    colour = np.where(warp_on_top[..., None], np.asarray(scene.warp_colour, np.float32),
                      np.asarray(scene.weft_colour, np.float32))
    shade = (0.45 + 0.55 * height) * yarn + fuzz
    image = colour * shade[..., None] * lighting_field(size, *scene.light)[..., None]
    image = image + sensor_noise(scene.noise_seed, size, 0.012)[..., None]
    return Rendering(np.clip(image, 0, 1).astype(np.float32), np.ones((size, size), np.float32))


def fabric_defect(name: str, scene: FabricScene, clean: Rendering, rng: np.random.Generator,
                  size: int) -> Overlay | FabricScene:
    centre = _random_point(rng, 0.15)
    if name == "hole":
        return hole_overlay(rng, size, clean.image, centre, rng.uniform(0.025, 0.06), 0.05, 1.35)
    if name == "stain":
        return stain_overlay(rng, size, clean.image, centre, rng.uniform(0.05, 0.12))
    if name == "contamination":
        return contamination_overlay(rng, size, centre)
    if name == "cut":
        heading = rng.uniform(0, math.pi)
        path = random_walk(rng, centre, heading, int(rng.integers(20, 50)), 2.0 / 256, 0.06)
        gap = draw_polylines(size, [path], stroke_px(rng.uniform(1.5, 3.0), size))
        fray = cv2.GaussianBlur(gap, (0, 0), max(0.6, 1.6 * size / 256))
        bright = np.clip(clean.image * 1.4, 0, 1).astype(np.float32)
        return Overlay(((bright, np.clip(fray * 1.2, 0, 0.7)), (solid((0.04,) * 3, size, 0.02, rng), gap)))
    raise KeyError(name)


# ----------------------------------------------------------------------------- marble


@dataclass(frozen=True)
class MarbleScene:
    base_colour: tuple[float, float, float]
    vein_colour: tuple[float, float, float]
    vein_angle: float
    vein_frequency: float
    turbulence: float
    sharpness: float
    field_seed: int
    light: tuple[float, float, float, float]
    noise_seed: int


def sample_marble(rng: np.random.Generator) -> MarbleScene:
    base = np.array([0.86, 0.84, 0.8]) + rng.normal(0, 0.02, 3)
    vein = np.array([0.38, 0.4, 0.4]) + rng.normal(0, 0.04, 3)
    return MarbleScene(
        base_colour=tuple(np.clip(base, 0, 1).tolist()),
        vein_colour=tuple(np.clip(vein, 0, 1).tolist()),
        vein_angle=float(rng.uniform(0, math.pi)),
        vein_frequency=float(rng.uniform(1.2, 2.4)),
        turbulence=float(rng.uniform(0.8, 1.4)),
        sharpness=float(rng.uniform(6, 14)),
        field_seed=int(rng.integers(2**31)),
        light=_sample_light(rng),
        noise_seed=int(rng.integers(2**31)),
    )


def render_marble(scene: MarbleScene, size: int) -> Rendering:
    x, y = pixel_grid(size)
    field_rng = np.random.default_rng(scene.field_seed)
    swirl = fractal_noise(field_rng, size, 3, 4)
    along = x * math.cos(scene.vein_angle) + y * math.sin(scene.vein_angle)
    veins = (1.0 - np.abs(np.sin(math.pi * (scene.vein_frequency * along + scene.turbulence * swirl)))) ** scene.sharpness
    fine_swirl = fractal_noise(field_rng, size, 6, 3)
    faint = (1.0 - np.abs(np.sin(math.pi * (3.1 * scene.vein_frequency * along + 1.6 * fine_swirl)))) ** 20
    clouds = fractal_noise(field_rng, size, 2, 3) * 0.04
    grain = fractal_noise(field_rng, size, max(8, size // 6), 1) * 0.015
    weight = np.clip(veins * 0.85 + faint * 0.3, 0, 1)[..., None]
    base = np.asarray(scene.base_colour, np.float32) * (1.0 + clouds + grain)[..., None]
    image = base * (1 - weight) + np.asarray(scene.vein_colour, np.float32) * weight
    image = image * lighting_field(size, *scene.light)[..., None]
    image = image + sensor_noise(scene.noise_seed, size, 0.01)[..., None]
    return Rendering(np.clip(image, 0, 1).astype(np.float32), np.ones((size, size), np.float32))


def marble_defect(name: str, scene: MarbleScene, clean: Rendering, rng: np.random.Generator,
                  size: int) -> Overlay | MarbleScene:
    centre = _random_point(rng, 0.15)
    if name == "crack":
        return crack_overlay(rng, size, centre, rng.uniform(0, 2 * math.pi), rng.uniform(0.15, 0.35))
    if name == "scratch":
        return scratch_overlay(rng, size, centre, rng.uniform(0.15, 0.4), bright=True)
    if name == "stain":
        return stain_overlay(rng, size, clean.image, centre, rng.uniform(0.05, 0.12))
    if name == "hole":
        return hole_overlay(rng, size, clean.image, centre, rng.uniform(0.02, 0.045), 0.3, 1.1)
    raise KeyError(name)


# ----------------------------------------------------------------------------- screw


@dataclass(frozen=True)
class ScrewScene:
    centre_x: float
    centre_y: float
    angle: float
    length: float
    head_length: float
    head_half_width: float
    shaft_half_width: float
    tip_length: float
    pitch: float
    metal: float
    background: float
    light: tuple[float, float, float, float]
    background_seed: int
    noise_seed: int
    bend: float = 0.0  # sideways deflection of the tip (normalised units)
    bend_start: float = 0.0  # where the bend begins, as a fraction of the shaft
    bare_from: float = 0.0  # a worn-off thread section, fractions of the thread
    bare_to: float = 0.0
    tip_cut: float = 0.0  # how much of the tip is broken off (normalised units)
    tip_cut_slope: float = 0.0


def sample_screw(rng: np.random.Generator) -> ScrewScene:
    length = float(rng.uniform(0.5, 0.6))
    angle = float(rng.uniform(0, 2 * math.pi))
    # keep both ends 0.06 inside the image whatever the rotation
    reach_x = abs(math.cos(angle)) * length / 2 + 0.08
    reach_y = abs(math.sin(angle)) * length / 2 + 0.08
    return ScrewScene(
        centre_x=float(rng.uniform(reach_x, 1 - reach_x)),
        centre_y=float(rng.uniform(reach_y, 1 - reach_y)),
        angle=angle,
        length=length,
        head_length=float(length * rng.uniform(0.12, 0.14)),
        head_half_width=float(rng.uniform(0.068, 0.078)),
        shaft_half_width=float(rng.uniform(0.032, 0.037)),
        tip_length=float(length * rng.uniform(0.1, 0.13)),
        pitch=float(rng.uniform(0.017, 0.02)),
        metal=float(rng.uniform(0.5, 0.62)),
        background=float(rng.uniform(0.78, 0.86)),
        light=_sample_light(rng),
        background_seed=int(rng.integers(2**31)),
        noise_seed=int(rng.integers(2**31)),
    )


@dataclass(frozen=True)
class _ScrewFrame:
    along: np.ndarray  # u: along the screw, head at -length/2
    across: np.ndarray  # v: across the screw, after undoing the bend
    head_end: float
    thread_start: float
    tip_end: float


def _screw_frame(scene: ScrewScene, size: int) -> _ScrewFrame:
    x, y = pixel_grid(size)
    dx, dy = x - scene.centre_x, y - scene.centre_y
    cos_a, sin_a = math.cos(scene.angle), math.sin(scene.angle)
    along = dx * cos_a + dy * sin_a
    across = -dx * sin_a + dy * cos_a
    head_end = -scene.length / 2 + scene.head_length
    tip_end = scene.length / 2
    if scene.bend != 0.0:
        start = head_end + scene.bend_start * (tip_end - head_end)
        bent = np.clip((along - start) / (tip_end - start), 0, None)
        across = across - scene.bend * bent**2
    return _ScrewFrame(along, across, head_end, head_end + 0.07 * scene.length, tip_end)


def render_screw(scene: ScrewScene, size: int) -> Rendering:
    frame = _screw_frame(scene, size)
    u, v = frame.along, frame.across
    threaded_span = frame.tip_end - frame.thread_start
    in_thread = u > frame.thread_start
    if scene.bare_to > scene.bare_from:
        bare = (u > frame.thread_start + scene.bare_from * threaded_span) & (
            u < frame.thread_start + scene.bare_to * threaded_span)
        in_thread &= ~bare
    else:
        bare = np.zeros_like(in_thread)
    # helical thread seen from the side: slanted crests spaced one pitch apart
    phase = (u + 0.25 * v) / scene.pitch
    groove = np.abs(phase - np.floor(phase) - 0.5) * 2.0  # 1 at the crest line, 0 mid-groove
    taper = np.clip((frame.tip_end - u) / scene.tip_length, 0, 1) ** 0.85
    half_width = scene.shaft_half_width * np.where(in_thread, 0.86 + 0.14 * groove, np.where(bare, 0.84, 1.0))
    half_width = half_width * np.maximum(taper, 0.04)
    tip_limit = frame.tip_end - scene.tip_cut + scene.tip_cut_slope * v
    inside_shaft = np.minimum(np.minimum(half_width - np.abs(v), u - frame.head_end + 0.01), tip_limit - u)
    head_centre = -scene.length / 2 + scene.head_length / 2
    head_radius = ((u - head_centre) / (scene.head_length / 2)) ** 4 + (frame.across / scene.head_half_width) ** 4
    inside_head = (1.0 - head_radius**0.25) * min(scene.head_length / 2, scene.head_half_width)
    head_mask = inside_head > inside_shaft
    alpha = np.clip(0.5 + np.maximum(inside_shaft, inside_head) * size, 0, 1).astype(np.float32)

    across_norm = np.clip(v / np.maximum(half_width, 1e-4), -1, 1)
    cylinder = 0.45 + 0.35 * np.sqrt(1 - across_norm**2) + 0.35 * np.exp(-((across_norm + 0.35) / 0.2) ** 2)
    thread_shade = np.where(in_thread, 0.55 + 0.45 * groove**0.7, np.where(bare, 1.12, 1.0))
    head_norm = np.clip(frame.across / scene.head_half_width, -1, 1)
    head_shade = 0.4 + 0.3 * np.sqrt(1 - head_norm**2) + 0.3 * np.exp(-((head_norm + 0.3) / 0.25) ** 2)
    # the head's bearing face and slot show as dark bands across the head
    head_shade = head_shade * (1.0 - 0.35 * np.exp(-(((u - frame.head_end) / 0.006) ** 2)))
    head_shade = head_shade * (1.0 - 0.4 * np.exp(-(((u - head_centre + scene.head_length * 0.15) / 0.004) ** 2)))
    metal = scene.metal * np.where(head_mask, head_shade, cylinder * thread_shade)

    bg_rng = np.random.default_rng(scene.background_seed)
    background = scene.background * (1.0 + fractal_noise(bg_rng, size, 4, 3) * 0.03)
    shadow_px = 3.0 * size / 256
    shift = max(1, int(round(shadow_px)))
    shadow = cv2.GaussianBlur(np.roll(alpha, (shift, shift), axis=(0, 1)), (0, 0), max(0.8, shadow_px))
    background = background * (1.0 - 0.3 * shadow)
    grey = (background * (1 - alpha) + metal * alpha) * lighting_field(size, *scene.light)
    grey = np.clip(grey + sensor_noise(scene.noise_seed, size, 0.012), 0, 1).astype(np.float32)
    return Rendering(np.repeat(grey[..., None], 3, axis=2), alpha)


def screw_defect(name: str, scene: ScrewScene, clean: Rendering, rng: np.random.Generator,
                 size: int) -> Overlay | ScrewScene:
    if name == "bent_shaft":
        return dataclasses.replace(scene, bend=float(rng.choice([-1, 1]) * rng.uniform(0.035, 0.07)),
                                   bend_start=float(rng.uniform(0.2, 0.5)))
    if name == "thread_missing":
        start = float(rng.uniform(0.1, 0.6))
        return dataclasses.replace(scene, bare_from=start, bare_to=start + float(rng.uniform(0.15, 0.3)))
    if name == "damaged_tip":
        return dataclasses.replace(scene, tip_cut=float(scene.tip_length * rng.uniform(0.45, 0.8)),
                                   tip_cut_slope=float(rng.uniform(-1.0, 1.0)))
    if name == "scratch_head":
        frame = _screw_frame(scene, size)
        head = ((frame.along < frame.head_end) & (clean.foreground > 0.5)).astype(np.float32)
        centre = point_on(rng, head)
        return scratch_overlay(rng, size, centre, scene.head_half_width * rng.uniform(0.8, 1.4),
                               bright=bool(rng.integers(2)), clip=head)
    if name == "contamination":
        return contamination_overlay(rng, size, point_on(rng, clean.foreground))
    raise KeyError(name)


# ----------------------------------------------------------------------------- washer


@dataclass(frozen=True)
class WasherScene:
    centre_x: float
    centre_y: float
    outer_radius: float
    inner_radius: float
    mark_angle: float  # where the printed mark sits; the part's pose
    brushed_angle: float
    metal_colour: tuple[float, float, float]
    background_colour: tuple[float, float, float]
    light: tuple[float, float, float, float]
    background_seed: int
    noise_seed: int
    mark_radial_shift: float = 0.0  # misprints
    mark_ghost: float = 0.0
    mark_turn: float = 0.0
    mark_drop: int = -1  # index of a missing bar
    notch_angle: float = 0.0  # a chunk broken out of the rim
    notch_radius: float = 0.0
    notch_seed: int = 0


_MARK_BARS = 4


def sample_washer(rng: np.random.Generator) -> WasherScene:
    outer = float(rng.uniform(0.28, 0.32))
    metal = np.array([0.78, 0.74, 0.62]) + rng.normal(0, 0.02, 3)
    background = np.array([0.2, 0.24, 0.22]) + rng.normal(0, 0.015, 3)
    return WasherScene(
        centre_x=float(0.5 + rng.uniform(-0.1, 0.1)),
        centre_y=float(0.5 + rng.uniform(-0.1, 0.1)),
        outer_radius=outer,
        inner_radius=float(outer * rng.uniform(0.44, 0.5)),
        mark_angle=float(rng.uniform(0, 2 * math.pi)),
        brushed_angle=float(rng.uniform(0, math.pi)),
        metal_colour=tuple(np.clip(metal, 0, 1).tolist()),
        background_colour=tuple(np.clip(background, 0, 1).tolist()),
        light=_sample_light(rng),
        background_seed=int(rng.integers(2**31)),
        noise_seed=int(rng.integers(2**31)),
    )


def _washer_mark(scene: WasherScene, size: int) -> FloatMap:
    """The printed code: four radial bars and an arrow, tangential to the ring."""
    ring_middle = (scene.outer_radius + scene.inner_radius) / 2 + scene.mark_radial_shift
    centre = np.array([scene.centre_x, scene.centre_y])
    radial = np.array([math.cos(scene.mark_angle), math.sin(scene.mark_angle)])
    tangent = np.array([-radial[1], radial[0]])
    turn = scene.mark_turn
    radial, tangent = (radial * math.cos(turn) + tangent * math.sin(turn),
                       -radial * math.sin(turn) + tangent * math.cos(turn))
    width = scene.outer_radius - scene.inner_radius
    bar_half_len, bar_half_wid, gap = width * 0.22, width * 0.045, width * 0.16
    origin = centre + np.array([math.cos(scene.mark_angle), math.sin(scene.mark_angle)]) * ring_middle
    shapes = []
    for index in range(_MARK_BARS):
        if index == scene.mark_drop:
            continue
        mid = origin + tangent * (index - (_MARK_BARS - 1) / 2) * gap
        shapes.append(np.array([mid + radial * bar_half_len + tangent * bar_half_wid,
                                mid + radial * bar_half_len - tangent * bar_half_wid,
                                mid - radial * bar_half_len - tangent * bar_half_wid,
                                mid - radial * bar_half_len + tangent * bar_half_wid]))
    tip = origin + tangent * (_MARK_BARS / 2 + 0.6) * gap
    shapes.append(np.array([tip + tangent * gap * 0.8, tip + radial * bar_half_len * 0.8,
                            tip - radial * bar_half_len * 0.8]))
    ink = draw_polygons(size, shapes)
    if scene.mark_ghost > 0:
        ghost = draw_polygons(size, [s + tangent * scene.mark_ghost + radial * scene.mark_ghost * 0.4
                                     for s in shapes])
        ink = np.maximum(ink, ghost * 0.65)
    return ink


def render_washer(scene: WasherScene, size: int) -> Rendering:
    x, y = pixel_grid(size)
    dx, dy = x - scene.centre_x, y - scene.centre_y
    radius = np.sqrt(dx**2 + dy**2)
    theta = np.arctan2(dy, dx)
    inside = np.minimum(scene.outer_radius - radius, radius - scene.inner_radius)
    if scene.notch_radius > 0:
        notch_x = scene.centre_x + scene.outer_radius * math.cos(scene.notch_angle)
        notch_y = scene.centre_y + scene.outer_radius * math.sin(scene.notch_angle)
        around = np.arctan2(y - notch_y, x - notch_x)
        notch_rng = np.random.default_rng(scene.notch_seed)
        jagged = sum(notch_rng.normal(0, 0.12 / k) * np.cos(k * around + notch_rng.uniform(0, 6.3))
                     for k in range(3, 9))
        notch_edge = np.sqrt((x - notch_x) ** 2 + (y - notch_y) ** 2) - scene.notch_radius * (1 + jagged)
        inside = np.minimum(inside, notch_edge)
    alpha = np.clip(0.5 + inside * size, 0, 1).astype(np.float32)

    width = scene.outer_radius - scene.inner_radius
    brushed = 0.78 + 0.14 * np.cos(2 * (theta - scene.brushed_angle))
    edge_distance = np.clip(inside, 0, None) / width
    bevel = 0.3 * np.exp(-edge_distance / 0.05) * np.cos(theta + math.pi / 4)
    metal = np.asarray(scene.metal_colour, np.float32) * (brushed + bevel)[..., None]
    ink = _washer_mark(scene, size) * alpha * 0.9
    metal = metal * (1 - ink[..., None]) + np.float32(0.08) * ink[..., None]

    bg_rng = np.random.default_rng(scene.background_seed)
    texture = 1.0 + fractal_noise(bg_rng, size, max(8, size // 8), 2) * 0.08
    background = np.asarray(scene.background_colour, np.float32) * texture[..., None]
    shift = max(1, int(round(4.0 * size / 256)))
    shadow = cv2.GaussianBlur(np.roll(alpha, (shift, shift), axis=(0, 1)), (0, 0), max(0.8, 4.0 * size / 256))
    background = background * (1.0 - 0.5 * shadow)[..., None]
    image = background * (1 - alpha[..., None]) + metal * alpha[..., None]
    image = image * lighting_field(size, *scene.light)[..., None]
    image = image + sensor_noise(scene.noise_seed, size, 0.012)[..., None]
    return Rendering(np.clip(image, 0, 1).astype(np.float32), alpha)


def washer_defect(name: str, scene: WasherScene, clean: Rendering, rng: np.random.Generator,
                  size: int) -> Overlay | WasherScene:
    width = scene.outer_radius - scene.inner_radius
    ring = (clean.foreground > 0.5).astype(np.float32)
    if name == "missing_chunk":
        return dataclasses.replace(scene, notch_angle=float(rng.uniform(0, 2 * math.pi)),
                                   notch_radius=float(width * rng.uniform(0.35, 0.7)),
                                   notch_seed=int(rng.integers(2**31)))
    if name == "misprint":
        kind = int(rng.integers(4))
        if kind == 0:
            return dataclasses.replace(scene, mark_radial_shift=float(rng.choice([-1, 1]) * width * rng.uniform(0.3, 0.5)))
        if kind == 1:
            return dataclasses.replace(scene, mark_ghost=float(width * rng.uniform(0.12, 0.25)))
        if kind == 2:
            return dataclasses.replace(scene, mark_turn=float(rng.choice([-1, 1]) * rng.uniform(0.6, 1.5)))
        return dataclasses.replace(scene, mark_drop=int(rng.integers(_MARK_BARS)))
    if name == "crack":
        from_outside = bool(rng.integers(2))
        at = rng.uniform(0, 2 * math.pi)
        edge = scene.outer_radius if from_outside else scene.inner_radius
        start = np.array([scene.centre_x + edge * math.cos(at), scene.centre_y + edge * math.sin(at)])
        heading = at + (math.pi if from_outside else 0.0) + rng.normal(0, 0.3)
        return crack_overlay(rng, size, start, heading, width * rng.uniform(0.6, 1.0), clip=ring)
    if name == "scratch":
        return scratch_overlay(rng, size, point_on(rng, ring), width * rng.uniform(0.6, 1.2),
                               bright=bool(rng.integers(2)), clip=ring)
    if name == "contamination":
        return contamination_overlay(rng, size, point_on(rng, ring))
    raise KeyError(name)


def _sample_light(rng: np.random.Generator) -> tuple[float, float, float, float]:
    return (float(rng.uniform(0.88, 1.1)), float(rng.normal(0, 0.12)), float(rng.normal(0, 0.12)),
            float(rng.uniform(0.0, 0.5)))
