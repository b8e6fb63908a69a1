"""Tests of the synthetic-anomaly library (tiny images, CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from automl_ad.errors import UserError
from automl_ad.synthesis import FAMILIES, build_synthesizer, category_defaults, poisson_blend
from automl_ad.synthesis.poisson import CHANGE_TOLERANCE

SIZE = 48


def _images(channels: int, batch: int = 6, seed: int = 0) -> torch.Tensor:
    # smooth structure plus texture, so any pasted/warped content changes pixels
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(batch, channels, 6, 6, generator=g)
    smooth = torch.nn.functional.interpolate(low, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return (0.6 * smooth + 0.4 * torch.rand(batch, channels, SIZE, SIZE, generator=g)).clamp(0, 1)


def _clean(out, images: torch.Tensor) -> torch.Tensor:
    """What the anomalies were pasted into: the input, or perlin's rotated normals."""
    return images if out.clean is None else out.clean


def _run(family: str, images: torch.Tensor, seed: int, **params):
    synth = build_synthesizer(family, params)
    return synth(images, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_range_determinism(family: str, channels: int) -> None:
    images = _images(channels)
    first = _run(family, images, 3, normal_share=0.0)
    again = _run(family, images, 3, normal_share=0.0)
    other = _run(family, images, 4, normal_share=0.0)
    assert first.images.shape == images.shape
    assert first.masks.shape == (images.shape[0], 1, SIZE, SIZE)
    assert first.labels.shape == (images.shape[0],)
    for tensor in (first.images, first.masks):
        assert not torch.isnan(tensor).any()
        assert tensor.min() >= 0 and tensor.max() <= 1
    assert torch.equal(first.images, again.images) and torch.equal(first.masks, again.masks)
    assert not torch.equal(first.images, other.images)
    assert first.labels.sum() >= images.shape[0] - 1  # every sample was asked to be anomalous


@pytest.mark.parametrize("family", list(FAMILIES))
def test_labels_follow_changes(family: str) -> None:
    images = _images(3, batch=12, seed=1)
    out = _run(family, images, 5, normal_share=0.5)
    change = (out.images - _clean(out, images)).abs().mean(1) * 255  # B x H x W, grey levels
    tolerance = CHANGE_TOLERANCE if family == "nsa" else 0.0
    for index in range(images.shape[0]):
        if out.labels[index] == 0:
            assert change[index].max() <= tolerance + 1e-4
            assert out.masks[index].max() == 0
        else:
            assert change[index].max() > tolerance
            assert out.masks[index].max() > 0
    assert 0 < out.labels.sum() < images.shape[0]


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "nsa"])
def test_pixels_change_only_inside_mask(family: str) -> None:
    images = _images(3, seed=2)
    out = _run(family, images, 7, normal_share=0.0)
    outside = (out.masks == 0).expand_as(images)
    assert torch.equal(out.images[outside], _clean(out, images)[outside])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_normal_share_one_keeps_images(family: str) -> None:
    images = _images(3)
    out = _run(family, images, 0, normal_share=1.0)
    assert torch.equal(out.images, _clean(out, images))
    assert out.masks.abs().sum() == 0 and out.labels.abs().sum() == 0


@pytest.mark.parametrize(
    "family, key, value",
    [
        ("perlin", "beta_high", 1.5),
        ("perlin", "max_scale_exp", 9),
        ("perlin", "n_aug", 2.5),
        ("nsa", "mode", "swap"),
        ("nsa", "width_max_y", 0.9),
        ("cutpaste", "area_min", -0.1),
        ("cutpaste_scar", "width_max", 100),
        ("corruption", "noise_std", 0.9),
        ("corruption", "normal_share", "half"),
        ("perlin", "no_such_key", 1),
    ],
)
def test_bad_params_raise_user_error(family: str, key: str, value) -> None:
    with pytest.raises(UserError) as info:
        build_synthesizer(family, {key: value})
    message = str(info.value)
    assert family in message and key in message


def test_unknown_family_and_swapped_bounds() -> None:
    with pytest.raises(UserError, match="unknown synthesis family"):
        build_synthesizer("gan")
    with pytest.raises(UserError, match="beta_low"):
        build_synthesizer("perlin", {"beta_low": 0.9, "beta_high": 0.2})


def test_category_defaults() -> None:
    screw = build_synthesizer("nsa", category="screw").params
    assert (screw.width_max_y, screw.k, screw.x0, screw.n_patches, screw.object) == (0.12, 1.0, 3.0, 4, True)
    fabric = build_synthesizer("nsa", category="fabric").params
    assert fabric.mode == "mixed" and fabric.resize_max == 2.0 and not fabric.object
    unknown = build_synthesizer("nsa", category="gearbox").params
    assert unknown == build_synthesizer("nsa").params
    assert category_defaults("washer")["object"] is True
    # explicit params override the category's
    assert build_synthesizer("nsa", {"k": 2.0}, category="screw").params.k == 2.0


def _grid(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.meshgrid(torch.arange(height).float(), torch.arange(width).float(), indexing="ij")


def test_poisson_blend_reproduces_analytic_solution() -> None:
    # With source s and Dirichlet data s + r on the ring around the rectangle, where
    # r is linear (discrete-harmonic), the exact solution inside is s + r.
    height, width = 20, 26
    yy, xx = _grid(height, width)
    source = 0.4 + 0.2 * torch.sin(yy / 3) * torch.cos(xx / 4)
    ramp = 0.01 * xx - 0.006 * yy + 0.1
    target = torch.rand(height, width, generator=torch.Generator().manual_seed(0)) * 0.3
    mask = torch.zeros(height, width)
    mask[3:15, 5:21] = 1
    target = torch.where(mask > 0, target, source + ramp)
    out = poisson_blend(target.expand(2, 3, -1, -1), source.expand(2, 3, -1, -1), mask.expand(2, 1, -1, -1), "normal")
    assert torch.allclose(out[:, :, 3:15, 5:21], (source + ramp)[3:15, 5:21].expand(2, 3, -1, -1), atol=1e-5)
    assert torch.equal(out[..., mask == 0], target.expand(2, 3, -1, -1)[..., mask == 0])


def test_poisson_blend_sine_eigenfunction() -> None:
    # u = sin(pi i/(h+1)) sin(pi j/(w+1)) on the rectangle, 0 on its ring, satisfies
    # L u = mu u with mu = 4 - 2 cos(pi/(h+1)) - 2 cos(pi/(w+1)): a source with that
    # Laplacian (here u itself plus a constant) must give u back over a zero target.
    h, w = 9, 13
    yy, xx = _grid(h + 2, w + 2)
    u = torch.sin(math.pi * yy / (h + 1)) * torch.sin(math.pi * xx / (w + 1))
    mask = torch.zeros(h + 2, w + 2)
    mask[1:-1, 1:-1] = 1
    canvas = torch.zeros(1, 1, h + 4, w + 4)
    target = canvas.clone()
    source = canvas.clone()
    source[..., 1:-1, 1:-1] = u + 0.25
    full_mask = canvas.clone()
    full_mask[..., 1:-1, 1:-1] = mask
    out = poisson_blend(target, source, full_mask, "normal")
    # the constant 0.25 has no gradient inside, but the ring edges carry the jump from 0:
    # the solution is u + 0.25 - 0.25 * harmonic(1 on ring) = u exactly (harmonic = 1)
    assert torch.allclose(out[0, 0, 2:-2, 2:-2], u[1:-1, 1:-1], atol=1e-5)


def test_poisson_blend_mixed_keeps_stronger_target_gradients() -> None:
    yy, xx = _grid(16, 16)
    target = (0.3 + 0.2 * torch.sin(xx)).expand(1, 3, -1, -1)
    flat = torch.full((1, 3, 16, 16), 0.7)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    assert torch.allclose(poisson_blend(target, flat, mask, "mixed"), target, atol=1e-5)
    normal = poisson_blend(target, flat, mask, "normal")
    assert normal[..., 5:11, 5:11].std() < 0.5 * target[..., 5:11, 5:11].std()
    with pytest.raises(UserError):
        poisson_blend(target, flat, mask, "swap")


def test_nsa_label_modes_and_objects() -> None:
    images = _images(3, batch=4, seed=3)
    for label in ("binary", "continuous", "logistic"):
        out = _run("nsa", images, 1, label=label, normal_share=0.0)
        assert out.masks.max() > 0
        if label == "binary":
            assert set(out.masks.unique().tolist()) <= {0.0, 1.0}
    # object category: dark object on a bright background, patches must land on it
    objects = torch.full((4, 3, 64, 64), 0.8)
    objects[:, :, 20:44, 24:40] = 0.2 + 0.3 * torch.rand(4, 3, 24, 16, generator=torch.Generator().manual_seed(0))
    synth = build_synthesizer("nsa", {"normal_share": 0.0, "n_patches": 1, "label": "binary"}, category="screw")
    out = synth(objects, torch.Generator().manual_seed(2))
    changed = ((out.images - objects).abs().mean(1) > 2 / 255).float()
    on_object = changed[:, 20:44, 24:40].sum()
    assert on_object > 0.5 * changed.sum()


def test_sources_and_texture_dir(tmp_path) -> None:
    images = _images(1, batch=3)
    sources = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(9))  # other size/channels
    for family in FAMILIES:
        out = build_synthesizer(family, {"normal_share": 0.0})(images, torch.Generator().manual_seed(0), sources=sources)
        assert out.images.shape == images.shape and out.labels.sum() >= 2
    import cv2
    import numpy as np

    texture = np.zeros((40, 40, 3), np.uint8)
    texture[:, :, 2] = 255  # pure red in BGR
    cv2.imwrite(str(tmp_path / "red.png"), texture)
    synth = build_synthesizer("perlin", {"normal_share": 0.0, "n_aug": 0, "beta_low": 0.0, "beta_high": 0.0, "min_scale_exp": 1, "max_scale_exp": 2}, texture_dir=tmp_path)
    rgb = torch.full((2, 3, SIZE, SIZE), 0.5)
    out = synth(rgb, torch.Generator().manual_seed(0))
    inside = out.masks[:, 0] > 0
    assert inside.any()
    assert torch.allclose(out.images[:, 0][inside], torch.ones(1)) and torch.allclose(out.images[:, 1][inside], torch.zeros(1))
    with pytest.raises(UserError, match="texture_dir"):
        build_synthesizer("perlin", texture_dir=tmp_path / "missing")


def test_preview_grid_writes_png(tmp_path) -> None:
    from automl_ad.synthesis.preview import preview_grid

    out = preview_grid("cutpaste", {"area_min": 0.05}, _images(3, batch=3), torch.Generator().manual_seed(0), tmp_path / "grid.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def _direct_perlin(theta: torch.Tensor, height: int, width: int, periods_y, periods_x, angle=None) -> torch.Tensor:
    """Textbook per-pixel Perlin evaluation (gathers, fade, lerps) on the same lattice."""
    from automl_ad.synthesis.perlin import _ROT_MARGIN

    batch = theta.shape[0]
    yy, xx = torch.meshgrid((torch.arange(height) + 0.5) / height, (torch.arange(width) + 0.5) / width, indexing="ij")
    yy, xx = yy.expand(batch, -1, -1), xx.expand(batch, -1, -1)
    if angle is not None:
        cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
        yy, xx = cos * (yy - 0.5) - sin * (xx - 0.5) + 0.5 + _ROT_MARGIN, sin * (yy - 0.5) + cos * (xx - 0.5) + 0.5 + _ROT_MARGIN
    ly, lx = yy * periods_y.float()[:, None, None], xx * periods_x.float()[:, None, None]
    iy, ix = ly.floor().long(), lx.floor().long()
    fy, fx = ly - iy, lx - ix
    b = torch.arange(batch)[:, None, None]

    def corner(oy: int, ox: int) -> torch.Tensor:
        return torch.sin(theta)[b, iy + oy, ix + ox] * (fy - oy) + torch.cos(theta)[b, iy + oy, ix + ox] * (fx - ox)

    def fade(t: torch.Tensor) -> torch.Tensor:
        return t * t * t * (t * (t * 6 - 15) + 10)

    top = torch.lerp(corner(0, 0), corner(0, 1), fade(fx))
    bottom = torch.lerp(corner(1, 0), corner(1, 1), fade(fx))
    return math.sqrt(2) * torch.lerp(top, bottom, fade(fy))


def test_perlin_noise_matches_direct_evaluation() -> None:
    from automl_ad.synthesis.perlin import _ROT_MARGIN, perlin_noise

    periods_y, periods_x = torch.tensor([1, 2, 8, 16]), torch.tensor([16, 4, 2, 1])
    # unrotated: the separable matrix form is exact
    noise = perlin_noise(4, 40, 56, periods_y, periods_x, torch.Generator().manual_seed(0))
    theta = 2 * math.pi * torch.rand((4, 18, 18), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(noise, _direct_perlin(theta, 40, 56, periods_y, periods_x), atol=1e-5)
    # rotated: sampled at 8 points per lattice cell and interpolated, a few % of the range
    # (images are grouped by their largest period; one image per call keeps one lattice,
    # sized by that period, whose gradients the test can redraw)
    angle = torch.tensor([-1.2, 0.3, 0.9, 1.5])
    noise, direct = [], []
    for k in range(4):
        py, px = periods_y[k : k + 1], periods_x[k : k + 1]
        noise.append(perlin_noise(1, 128, 128, py, px, torch.Generator().manual_seed(1), angle[k : k + 1]))
        cells = math.ceil((1 + 2 * _ROT_MARGIN) * int(max(py, px))) + 1
        theta = 2 * math.pi * torch.rand((1, cells + 1, cells + 1), generator=torch.Generator().manual_seed(1))
        direct.append(_direct_perlin(theta, 128, 128, py, px, angle[k : k + 1]))
    noise, direct = torch.cat(noise), torch.cat(direct)
    assert (noise - direct).abs().max() < 0.06
    assert ((noise > 0.5) != (direct > 0.5)).float().mean() < 0.01


def test_paste_rectangles_equals_full_image_paste_and_blend() -> None:
    from automl_ad.synthesis.base import affine_paste
    from automl_ad.synthesis.poisson import _size_groups, paste_rectangles

    images = _images(3, batch=6, seed=4)
    donors = images.roll(1, 0)
    dest_center = torch.tensor([[20.0, 24.0], [30.3, 12.7], [24.0, 24.0], [10.5, 33.2], [35.0, 30.0], [24.0, 20.0]])
    dest_half = torch.tensor([[6.0, 9.5], [4.2, 3.1], [12.0, 12.0], [3.0, 7.7], [5.5, 2.2], [0.3, 0.4]])
    src_center = torch.tensor([[15.0, 15.0], [25.0, 30.0], [24.0, 24.0], [12.0, 12.0], [30.0, 20.0], [20.0, 20.0]])
    scale = torch.tensor([1.0, 0.6, 1.3, 2.0, 0.8, 1.0])
    active = torch.tensor([True, True, True, False, True, True])
    for mode in ("normal", "mixed"):
        placed, rect = affine_paste(donors, dest_center, dest_half, src_center, scale)
        rect = rect * active[:, None, None, None]
        expected = poisson_blend(images, placed, rect, mode)
        current, patch_mask = images.clone(), torch.zeros_like(rect)
        paste_rectangles(current, patch_mask, donors, active, dest_center, dest_half, src_center, scale, mode, max_groups=2)
        assert torch.allclose(current, expected, atol=1e-4)
        assert torch.equal(patch_mask, rect)
        assert torch.equal(current[3], images[3])  # inactive image untouched
    sizes = [[5, 9], [0, 4], [30, 2], [7, 7], [6, 8], [1, 1], [3, 0]]
    groups = _size_groups(sizes, 3)
    assert len(groups) <= 3 and sorted(i for g in groups for i in g) == [0, 2, 3, 4, 5]


def test_nsa_logistic_labels_follow_the_formula_on_changed_pixels() -> None:
    # patch_ex's pipeline: label_mask = 5x5 median of [d > tol]; logistic label =
    # label_mask * sigmoid(k (m - x0)), m a disk median of d (exact reference:
    # tests/test_nsa_recipe.py). The label mode draws no numbers: the binary run of the
    # same seed is the same picture and its mask is the label mask.
    images = _images(3, batch=8, seed=6)
    synth = build_synthesizer("nsa", {"normal_share": 0.3, "label": "logistic"})
    out = synth(images, torch.Generator().manual_seed(3))
    binary = build_synthesizer("nsa", {"normal_share": 0.3, "label": "binary"})(images, torch.Generator().manual_seed(3))
    assert torch.equal(out.images, binary.images)
    labelled = out.masks > 0
    assert torch.equal(labelled, binary.masks > 0.5)
    floor = torch.sigmoid(torch.tensor(-synth.params.k * synth.params.x0))
    assert bool((out.masks[labelled] >= floor - 1e-6).all()) and bool((out.masks <= 1).all())
    assert bool((out.masks[labelled] > 0.9).any())  # strongly changed pixels approach 1
    diff = (out.images - images).abs().mean(1, keepdim=True) * 255
    changed = diff > CHANGE_TOLERANCE
    assert torch.equal(out.labels, changed.flatten(1).any(1).float())


@pytest.mark.parametrize("size", [5, 7])
def test_majority_filter_is_the_median_of_windows_cut_at_the_border(size: int) -> None:
    from automl_ad.synthesis.base import majority_filter

    generator = torch.Generator().manual_seed(size)
    density = 0.2 + 0.6 * torch.rand(32, 1, 1, 1, generator=generator)
    binary = torch.rand(32, 1, 23, 17, generator=generator) < density
    reach = size // 2
    # brute force: every window's pixels that lie inside the image, counted by unfold
    ones = torch.nn.functional.unfold(torch.nn.functional.pad(binary.float(), (reach,) * 4), size).sum(1)
    inside = torch.nn.functional.unfold(torch.nn.functional.pad(torch.ones_like(binary[:1]).float(), (reach,) * 4), size).sum(1)
    expected = (2 * ones > inside).float().view_as(binary)
    assert torch.equal(majority_filter(binary, size), expected)
    assert bool(((2 * ones == inside) & (ones > 0)).any())  # ties at the border were exercised


def test_size_groups_finds_the_cheapest_split_into_runs() -> None:
    import itertools

    from automl_ad.synthesis.poisson import _size_groups

    def cost(h: int, w: int) -> int:
        return h * w * (h + w)

    def padded_total(runs: list[list[int]]) -> int:
        return sum(len(r) * cost(max(sizes[i][0] for i in r), max(sizes[i][1] for i in r)) for r in runs)

    generator = torch.Generator().manual_seed(2)
    for _ in range(20):
        sizes = torch.randint(1, 60, (7, 2), generator=generator).tolist()
        order = sorted(range(7), key=lambda i: -cost(*sizes[i]))
        for groups in (1, 2, 3):
            best = min(
                padded_total([order[a:b] for a, b in zip((0, *cuts), (*cuts, 7))])
                for k in range(groups)
                for cuts in itertools.combinations(range(1, 7), k)
            )
            assert padded_total(_size_groups(sizes, groups)) == best


def test_donor_windows_are_the_same_per_member_and_batched() -> None:
    # the CPU samples each donor on its own (no copies), an accelerator all at once
    from automl_ad.synthesis.poisson import _donor_windows

    generator = torch.Generator().manual_seed(5)
    donors = torch.rand(5, 3, 40, 36, generator=generator)
    members = [3, 0, 4]
    grid = 2.4 * torch.rand(3, 9, 7, 2, generator=generator) - 1.2  # reaches past the border
    per_member = _donor_windows(donors, members, torch.tensor(members), grid, per_member=True)
    batched = _donor_windows(donors, members, torch.tensor(members), grid, per_member=False)
    assert per_member.shape == (3, 3, 9, 7)
    assert torch.equal(per_member, batched)
    expected = torch.nn.functional.grid_sample(donors[4:5], grid[2:3], padding_mode="reflection", align_corners=False)
    assert torch.equal(batched[2:3], expected)


def test_nsa_keeps_every_patch_on_its_own_image_object() -> None:
    # objects sit at a different place in each image, so a patch placed by the donor's
    # foreground (or by another patch's) would land off the target's object
    generator = torch.Generator().manual_seed(7)
    images = torch.full((4, 3, 64, 64), 0.8)
    on_object = torch.zeros(4, 64, 64, dtype=torch.bool)
    for index, (top, left) in enumerate([(4, 4), (36, 40), (4, 40), (36, 4)]):
        images[index, :, top : top + 24, left : left + 20] = 0.2 + 0.3 * torch.rand(3, 24, 20, generator=generator)
        on_object[index, top : top + 24, left : left + 20] = True
    synth = build_synthesizer("nsa", {"normal_share": 0.0, "n_patches": 4, "label": "binary"}, category="screw")
    out = synth(images, torch.Generator().manual_seed(3))
    changed = (out.images - images).abs().mean(1) > 2 / 255
    for index in range(4):
        own = changed[index][on_object[index]].sum()
        elsewhere = max(changed[index][on_object[other]].sum() for other in range(4) if other != index)
        assert own > 0 and own > 2 * elsewhere  # patches overlap their own object (min_overlap)
