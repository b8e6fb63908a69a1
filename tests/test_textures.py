"""The procedural texture bank (synthesis/textures.py): DRAEM's anomaly source without a
texture folder."""

from __future__ import annotations

import ast
from pathlib import Path

import torch
import torch.nn.functional as F

from automl_ad.synthesis import textures
from automl_ad.synthesis.textures import KINDS, generate_textures, texture_bank


def test_same_seed_same_bank_other_seed_other_bank() -> None:
    first = generate_textures(12, 40, 40, torch.Generator().manual_seed(3))
    again = generate_textures(12, 40, 40, torch.Generator().manual_seed(3))
    other = generate_textures(12, 40, 40, torch.Generator().manual_seed(4))
    assert first.shape == (12, 3, 40, 40) and first.dtype == torch.float32
    assert torch.isfinite(first).all() and first.min() >= 0 and first.max() <= 1
    assert torch.equal(first, again)
    assert (first - other).abs().mean() > 0.05


def test_every_kind_is_a_varied_pattern_and_textures_differ() -> None:
    count = 2 * len(KINDS)
    bank = generate_textures(count, 48, 48, torch.Generator().manual_seed(0)).float()
    # each texture has structure (not a flat colour) ...
    grey = bank.mean(1)
    assert (grey.flatten(1).std(1) > 0.03).all(), grey.flatten(1).std(1)
    # ... and no two are alike
    flat = bank.flatten(1)
    distance = torch.cdist(flat, flat) / flat.shape[1] ** 0.5  # RMS difference
    distance.fill_diagonal_(1.0)
    assert distance.min() > 0.05


def test_each_kind_makes_a_field_in_the_unit_range() -> None:
    grid = textures._Grid(40, 56)
    for name, make in KINDS.items():
        field = make(3, grid, torch.Generator().manual_seed(0))
        assert field.shape == (3, 40, 56), name
        assert torch.isfinite(field).all() and field.min() >= -1e-5 and field.max() <= 1 + 1e-5, name
        assert (field.flatten(1).std(1) > 0.05).all(), (name, field.flatten(1).std(1))


def test_lengths_are_in_image_units_so_sizes_give_the_same_textures() -> None:
    small = generate_textures(10, 48, 48, torch.Generator().manual_seed(1))
    large = generate_textures(10, 96, 96, torch.Generator().manual_seed(1))
    shrunk = F.interpolate(large, size=(48, 48), mode="area")
    same = (shrunk - small).abs().mean((1, 2, 3))
    others = (shrunk - small.roll(1, 0)).abs().mean((1, 2, 3))
    assert (same < 0.5 * others).all(), (same, others)


def test_non_square_shapes() -> None:
    bank = generate_textures(10, 64, 24, torch.Generator().manual_seed(2))
    assert bank.shape == (10, 3, 64, 24)
    assert bank.mean(1).flatten(1).std(1).min() > 0.02


def test_bank_is_uint8_cached_per_shape_and_seed() -> None:
    textures._CACHE.clear()
    bank = texture_bank(10, 32, 32, seed=5)
    assert bank.dtype == torch.uint8 and bank.shape == (10, 3, 32, 32)
    assert texture_bank(10, 32, 32, seed=5) is bank  # made once
    expected = generate_textures(10, 32, 32, torch.Generator().manual_seed(5)).mul(255).round().to(torch.uint8)
    assert torch.equal(bank, expected)
    assert texture_bank(10, 32, 32, seed=6) is not bank
    for size in (16, 24, 40, 48):
        texture_bank(10, size, size, seed=5)
    assert len(textures._CACHE) == textures._CACHE_ENTRIES  # old shapes are dropped


def test_shares_nothing_with_the_builtin_products_drawing() -> None:
    source = Path(textures.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    assert not any(name.startswith("automl_ad.data") for name in imported), imported
