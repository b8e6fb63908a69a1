"""Shared fixtures. ``ray_session``: one local Ray instance for the whole test run,
started only when a test asks for it (most tests never import Ray); ``one_torch_thread``
and ``offline_weight_caches`` for the tests of pretrained backbones."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def one_torch_thread():
    """The machine's 2 cores are shared: two torch threads each thrash (10x slower here)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def offline_weight_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Empty torch and Hugging Face caches and no downloads: weights must come from a
    file, a cache the test fills, or the packaged checkpoint."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("AUTOML_AD_ALLOW_DOWNLOAD", raising=False)
    return tmp_path


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
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "WANDB_SILENT": "true"},
                     # as run_search does: Train's placement-group cleaner must find this
                     # Ray even while a test runs a second one in a subprocess
                     "worker_process_setup_hook": "automl_ad.tuning.ray_setup.pin_ray_address"},
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
