"""The contract every registered method keeps, run over the registry (a method added to
``automl_ad/methods/`` is tested without editing this file): the protocol, its shipped
search space agreeing with its Config, a checkpoint round trip, an exported bundle
(ONNX and TorchScript) equal to the eager model, and ``predict`` on image files.

Tiny on purpose: 32 px, 8 fit images, two optimizer steps per phase, and random backbone
weights where the Config has a ``weights`` field (the contract is about shapes and
equality, not accuracy; the pretrained weights are tested in test_methods_pretrained).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import toy_category, toy_val
from PIL import Image

from automl_ad.data.types import to_float
from automl_ad.deploy.export import export_bundle, load_bundle
from automl_ad.methods import Batch, Method, available_methods, create_method, get_method_class
from automl_ad.methods.base import packaged_spec
from automl_ad.deploy.predict import predict_files
from automl_ad.synthesis import FAMILIES
from automl_ad.training.loop import TrainConfig, fit, load_trained_method

SIZE = 32
METHODS = available_methods()  # the registry; names starting with "_" are test helpers


def _params(name: str) -> dict:
    fields = {f.name for f in dataclasses.fields(get_method_class(name).Config)}
    return {"weights": "random"} if "weights" in fields else {}


def _eager(method: Method, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    method.eval()
    with torch.no_grad():
        return method(images)


@pytest.fixture(scope="module")
def toy():
    data = toy_category(n_fit=8, size=SIZE)
    return data, toy_val(data), to_float(data.test.images)


@pytest.fixture(scope="module", params=METHODS)
def trained(request, toy, tmp_path_factory, one_torch_thread):
    """Each method fitted briefly with a checkpoint (once per module and method)."""
    name = request.param
    data, val, _ = toy
    folder = tmp_path_factory.mktemp(f"{name}-checkpoint")
    cfg = TrainConfig(method=name, method_params=_params(name), image_size=SIZE,
                      epochs=max(1, len(get_method_class(name).phases)), steps_per_epoch=2, batch_size=4, seed=0)
    result = fit(cfg, data, val, checkpoint_dir=folder, evaluate_test=False)
    return name, result.method.eval(), folder


def test_the_registry_is_what_the_suite_runs():
    assert {"draem", "nsa", "ssae", "cfa", "ast", "patchcore"} <= set(METHODS)


@pytest.mark.parametrize("name", METHODS)
def test_protocol_and_shipped_space(name, toy, one_torch_thread):
    cls = get_method_class(name)
    assert cls.name == name and issubclass(cls, Method)
    assert isinstance(cls.phases, tuple) and all(isinstance(p, str) for p in cls.phases)
    assert dataclasses.is_dataclass(cls.Config)
    if cls.phases:  # the loop hands lr to configure_optimizer
        assert "lr" in {f.name for f in dataclasses.fields(cls.Config)}
    defaults = cls.Config()

    # The shipped space.yaml: its default family is the class's, its defaults the Config's.
    spec = packaged_spec(name)
    assert spec is not None and spec["method"] == name, f"{name} ships no space.yaml"
    families = spec.get("synthesis") or []
    assert cls.synthesis == (families[0] if families else None)
    assert set(families) <= set(FAMILIES)
    for pname, pspec in (spec.get("params") or {}).items():
        if "default" in pspec:
            assert getattr(defaults, pname) == pytest.approx(pspec["default"]), f"{name}.{pname}"

    data, _, images = toy
    method = create_method(name, _params(name), SIZE, "toy")
    method.setup(to_float(data.fit))
    method.train()
    clean = to_float(data.fit[:4])
    masks = torch.zeros(4, 1, SIZE, SIZE)
    masks[:2, :, 8:16, 8:16] = 1.0
    batch = Batch(images=torch.where(masks.bool(), torch.ones_like(clean), clean), clean=clean, masks=masks,
                  labels=torch.tensor([1.0, 1.0, 0.0, 0.0]))
    for phase in cls.phases:
        optimizer, _ = method.configure_optimizer(phase, total_steps=2)
        losses = method.training_step(batch, phase)
        loss = losses["loss"]
        assert loss.dim() == 0 and torch.isfinite(loss) and loss.requires_grad, phase
        before = [p.detach().clone() for group in optimizer.param_groups for p in group["params"]]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        after = [p.detach() for group in optimizer.param_groups for p in group["params"]]
        assert any(not torch.equal(a, b) for a, b in zip(before, after)), f"phase {phase} changed no weight"

    maps, scores = _eager(method, images)
    assert maps.shape == (len(images), SIZE, SIZE) and scores.shape == (len(images),)
    assert torch.isfinite(maps).all() and torch.isfinite(scores).all()
    again_maps, again_scores = _eager(method, images)
    assert torch.equal(maps, again_maps) and torch.equal(scores, again_scores), "eval is deterministic"


def test_checkpoint_round_trip(trained, toy):
    name, method, folder = trained
    images = toy[2]
    loaded, cfg = load_trained_method(folder, "toy")
    assert cfg.method == name and type(loaded) is type(method)
    ref_maps, ref_scores = _eager(method, images)
    maps, scores = _eager(loaded, images)
    assert torch.allclose(maps, ref_maps, atol=1e-6) and torch.allclose(scores, ref_scores, atol=1e-6)


@pytest.fixture(scope="module")
def bundle(trained, toy, tmp_path_factory) -> tuple[str, Method, Path, float]:
    name, method, _ = trained
    images = toy[2]
    _, ref_scores = _eager(method, images)
    # Between two scores, not on one: a score equal to the threshold could flip with the
    # last bit of a float and the export check rightly counts that as a changed decision.
    ordered = ref_scores.sort().values
    threshold = float((ordered[1] + ordered[2]) / 2) if ordered[2] > ordered[1] else float(ordered[-1]) + 1.0
    out = tmp_path_factory.mktemp(f"{name}-bundle") / "bundle"
    manifest = {"category": "toy", "methods": [name], "operating_point": {"threshold": threshold}}
    export_bundle(method, out, image_size=SIZE, manifest=manifest, example_images=images)
    return name, method, out, threshold


def test_export_equals_eager(bundle, toy):
    _, method, folder, threshold = bundle
    images = toy[2]
    ref_maps, ref_scores = _eager(method, images)
    loaded = load_bundle(folder)
    assert loaded.manifest["export_check"]["onnx_vs_torch_max_abs_map_diff"] <= 1e-4
    assert loaded.manifest["export_check"]["same_decisions"]
    maps, scores = loaded.predictor.run(images.numpy())
    assert np.abs(maps - ref_maps.numpy()).max() <= 1e-4
    assert np.abs(scores - ref_scores.numpy()).max() <= 1e-4
    scripted = torch.jit.load(str(folder / loaded.manifest["files"]["torchscript"]))
    with torch.no_grad():
        script_maps, script_scores = scripted(images)
    assert torch.allclose(script_maps, ref_maps, atol=1e-4) and torch.allclose(script_scores, ref_scores, atol=1e-4)


def test_predict_on_files_equals_eager(bundle, toy, tmp_path):
    _, method, folder, threshold = bundle
    data = toy[0]
    paths = []
    for index, image in enumerate(data.test.images):  # uint8 at the bundle's size: no resize
        paths.append(tmp_path / f"{index}.png")
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(paths[-1])
    results = predict_files(load_bundle(folder), paths, out_dir=tmp_path / "overlays", batch_size=3)
    _, ref_scores = _eager(method, to_float(data.test.images))
    assert [r.error for r in results] == [None] * len(paths)
    assert np.allclose([r.score for r in results], ref_scores.numpy(), atol=1e-4)
    assert [r.anomalous for r in results] == [bool(s >= threshold) for s in ref_scores]
    assert all(Path(r.overlay).is_file() for r in results)
