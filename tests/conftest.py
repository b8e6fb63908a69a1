"""Shared fixtures. ``ray_session``: one local Ray instance for the whole test run,
started only when a test asks for it (most tests never import Ray)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_session():
    import ray

    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # address="local": never join a cluster a stale ray_current_cluster file points at.
    # The dashboard stays on: Train's placement-group cleanup after an ASHA stop needs it.
    ray.init(
        address="local",
        num_cpus=2,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}},
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_mvtec(tmp_path_factory) -> Path:
    """A tiny MVTec-style built-in ``screw`` folder (12 train, 6 test images, 32 px)."""
    from automl_ad.data.builtin import generate_builtin

    root = tmp_path_factory.mktemp("mvtec")
    generate_builtin(root, ["screw"], n_train=12, n_test=6, image_size=32, seed=0)
    return root
