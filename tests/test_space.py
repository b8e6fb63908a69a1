"""Search-space YAML loading/validation and the define-by-run Optuna space."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import yaml

from automl_ad.errors import UserError
from automl_ad.methods import base
from automl_ad.methods.base import Method
from automl_ad.param_keys import split_config
from automl_ad.tuning.space import copy_packaged, load_space, packaged_space_files

DRAEM = {
    "method": "draem",
    "synthesis": ["perlin", "cutpaste"],
    "params": {
        "lr": {"type": "float", "low": 1.0e-5, "high": 1.0e-3, "log": True, "default": 1.0e-4},
        "rec_width": {"type": "int", "low": 8, "high": 32, "step": 8, "default": 16},
        "score_window": {"type": "categorical", "choices": [3, 5], "default": 3},
    },
}
CFA = {"method": "cfa", "synthesis": [], "params": {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}}


def _space_dir(tmp_path: Path, **methods: dict) -> Path:
    """A replacement folder: these method files replace the shipped ones (common.yaml is
    the shipped one, copied)."""
    folder = tmp_path / "spaces"
    copy_packaged(folder, ["common"])
    for name, spec in methods.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    return folder


def test_shipped_common_yaml_is_valid(tmp_path):
    space = load_space(space_dir=_space_dir(tmp_path, draem=DRAEM))
    assert set(space.synthesis) >= {"perlin", "nsa", "cutpaste", "cutpaste_scar", "corruption"}
    assert space.fidelity.max_epochs >= space.fidelity.grace_period


@pytest.fixture
def one_backbone(monkeypatch):
    """Only the Configs' default backbone has weights (as on the reference machine)."""
    import automl_ad.methods.backbones as backbones

    monkeypatch.setattr(backbones, "searchable_backbones", lambda: ["efficientnet_lite0"])


@pytest.fixture
def two_backbones(monkeypatch):
    import automl_ad.methods.backbones as backbones

    monkeypatch.setattr(backbones, "searchable_backbones", lambda: ["efficientnet_lite0", "resnet18"])


def test_define_by_run_space_is_conditional_and_seeded(tmp_path, one_backbone):
    space = load_space(["draem", "cfa"], space_dir=_space_dir(tmp_path, draem=DRAEM, cfa=CFA))
    assert sorted(space.methods) == ["cfa", "draem"]
    # common.yaml's sizes plus each method's paper size (DRAEM 256, CFA 224)
    assert space.method_sizes("draem") == (128, 256) and space.method_sizes("cfa") == (128, 224, 256)
    assert space.all_image_sizes() == (128, 224, 256)

    def sample(seed: int) -> list[dict]:
        study = optuna.create_study(sampler=optuna.samplers.TPESampler(multivariate=True, seed=seed))
        out = []
        for _ in range(12):
            trial = study.ask()
            space.suggest(trial)
            out.append(dict(trial.params))
            study.tell(trial, 0.5)
        return out

    first = sample(3)
    assert first == sample(3), "same seed, same configurations"
    methods = {p["method"] for p in first}
    assert methods == {"draem", "cfa"}
    assert {p["draem.image_size"] for p in first if p["method"] == "draem"} == {128, 256}
    for params in first:
        if params["method"] == "cfa":
            assert set(params) == {"method", "cfa.image_size", "cfa.lr"}, "one backbone: nothing to choose"
            assert params["cfa.image_size"] in {128, 224, 256}
            assert split_config(params, 64).image_size == params["cfa.image_size"]
            assert split_config(params, 64).method_params == {"lr": params["cfa.lr"]}
        else:
            family = params["draem.synthesis"]
            assert family in {"perlin", "cutpaste"}
            assert params["draem.rec_width"] in {8, 16, 24, 32}
            assert all(not k.startswith("cfa.") for k in params)
            assert any(k.startswith(f"synthesis.{family}.") for k in params)
            split = split_config(params, 64)
            assert split.method == "draem" and split.synthesis == family
            assert split.image_size == params["draem.image_size"] in {128, 256}
            assert set(split.method_params) == {"lr", "rec_width", "score_window"}
            assert all(f"synthesis.{family}.{k}" in params for k in split.synthesis_params)


def test_methods_restrict_and_defaults(tmp_path, one_backbone):
    space = load_space(["cfa"], space_dir=_space_dir(tmp_path, draem=DRAEM, cfa=CFA))
    assert list(space.methods) == ["cfa"]
    point = load_space(space_dir=_space_dir(tmp_path / "b", draem=DRAEM)).defaults("draem")
    assert point["draem.lr"] == pytest.approx(1e-4) and point["draem.synthesis"] == "perlin"
    assert point["synthesis.perlin.threshold"] == pytest.approx(0.5)
    assert point["draem.image_size"] == 128, "the smallest size first"


def test_backbone_is_a_conditional_choice_of_methods_with_a_backbone_field(tmp_path, two_backbones):
    ast = {"method": "ast", "synthesis": [], "params": {"lr": {"type": "float", "low": 1e-4, "high": 1e-3}}}
    space = load_space(["draem", "cfa", "ast"], space_dir=_space_dir(tmp_path, draem=DRAEM, cfa=CFA, ast=ast),
                       image_size=64)
    for name in ("cfa", "ast"):
        backbone = space.methods[name].params["backbone"]
        assert backbone.choices == ("efficientnet_lite0", "resnet18")
        assert backbone.default == "efficientnet_lite0", "the Config's default"
        assert space.defaults(name)[f"{name}.backbone"] == "efficientnet_lite0"
    assert "backbone" not in space.methods["draem"].params, "DRAEM's Config has no backbone"
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    seen: dict[str, set] = {"cfa": set(), "ast": set()}
    for _ in range(30):
        trial = study.ask()
        space.suggest(trial)
        params = dict(trial.params)
        method = params["method"]
        assert not any(k.endswith(".image_size") for k in params), "--image-size pins the size"
        assert split_config(params, 64).image_size == 64
        if method in seen:
            split = split_config(params, 64)
            assert split.method_params["backbone"] == params[f"{method}.backbone"]
            seen[method].add(params[f"{method}.backbone"])
            assert not any(k.startswith("draem.") for k in params)
        else:
            assert not any(k.endswith(".backbone") for k in params)
        study.tell(trial, 0.5)
    assert seen["cfa"] == seen["ast"] == {"efficientnet_lite0", "resnet18"}

    # The method YAML or the user's --space pins it instead.
    user = tmp_path / "mine.yaml"
    user.write_text(yaml.safe_dump({"methods": {"cfa": {"params": {
        "backbone": {"type": "categorical", "choices": ["resnet18"]}}}}}))
    pinned = load_space(user_file=user, space_dir=_space_dir(tmp_path / "b", cfa=CFA))
    assert pinned.methods["cfa"].params["backbone"].choices == ("resnet18",)


def test_image_size_is_per_method_and_narrowed_by_the_plan(tmp_path, one_backbone):
    user = tmp_path / "mine.yaml"
    user.write_text(yaml.safe_dump({"methods": {"cfa": {"image_size": {"choices": [256]}}}}))
    space = load_space(["draem", "cfa"], user_file=user, space_dir=_space_dir(tmp_path, draem=DRAEM, cfa=CFA))
    assert space.method_sizes("cfa") == (256,) and space.method_sizes("draem") == (128, 256)
    narrowed = space.with_sizes({"draem": (128,)})
    assert narrowed.method_sizes("draem") == (128,) and narrowed.method_sizes("cfa") == (256,)
    assert narrowed.all_image_sizes() == (128, 256), "every size some method may sample gets a val set"
    assert not narrowed.sizes_searched("draem"), "one size, the default: not a parameter"
    assert narrowed.sizes_searched("cfa"), "one size, not the default: still named in the config"
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=1))
    for _ in range(10):
        trial = study.ask()
        narrowed.suggest(trial)
        params = dict(trial.params)
        expected = 256 if params["method"] == "cfa" else 128
        assert split_config(params, narrowed.image_sizes[0]).image_size == expected
        assert "draem.image_size" not in params
        study.tell(trial, 0.1)
    # Configs stored before sizes were per method name one global size.
    assert split_config({"method": "draem", "image_size": 64, "draem.lr": 0.1}, 32).image_size == 64


def test_fidelity_bounds_and_rounds_alias(tmp_path, one_backbone):
    folder = _space_dir(tmp_path, draem=DRAEM)
    shipped = load_space(space_dir=folder).fidelity
    assert shipped.steps_per_epoch is None and shipped.batch_size is None, "planned, not fixed"
    assert shipped.min_steps >= shipped.max_epochs and shipped.min_trials == 6
    user = tmp_path / "mine.yaml"
    user.write_text(yaml.safe_dump({"fidelity": {"rounds": 8, "min_steps": 16, "max_steps": 1000}}))
    fidelity = load_space(user_file=user, space_dir=folder).fidelity
    assert (fidelity.max_epochs, fidelity.min_steps, fidelity.max_steps) == (8, 16, 1000)
    user.write_text(yaml.safe_dump({"fidelity": {"min_steps": 100, "max_steps": 10}}))
    with pytest.raises(UserError, match="mine.yaml: fidelity.max_steps 10 is below min_steps"):
        load_space(user_file=user, space_dir=folder)
    user.write_text(yaml.safe_dump({"fidelity": {"min_trials": 0}}))
    with pytest.raises(UserError, match="fidelity.min_trials"):
        load_space(user_file=user, space_dir=folder)


def test_user_space_overrides_and_pins_size(tmp_path, one_backbone):
    folder = _space_dir(tmp_path, draem=DRAEM)
    user = tmp_path / "mine.yaml"
    user.write_text(yaml.safe_dump({
        "fidelity": {"max_epochs": 2, "grace_period": 1},
        "methods": {"draem": {"params": {"lr": {"type": "float", "low": 0.01, "high": 0.1}}}},
    }))
    space = load_space(user_file=user, space_dir=folder, image_size=32)
    assert space.fidelity.max_epochs == 2 and space.image_sizes == (32,)
    assert space.methods["draem"].params["lr"].low == 0.01
    assert "rec_width" in space.methods["draem"].params, "overrides merge, they do not replace the method"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d["params"].update(nope={"type": "float", "low": 0, "high": 1}), "params.nope"),
        (lambda d: d["params"]["lr"].update(low=1.0, high=0.1), "low 1.0 must be below high 0.1"),
        (lambda d: d["params"]["lr"].update(default=1.0), "params.lr.default"),
        (lambda d: d["params"]["lr"].update(low=0.0), "log scale needs low > 0"),
        (lambda d: d["params"]["lr"].update(type="complex"), "params.lr.type"),
        (lambda d: d["params"]["lr"].update(lo=1), "unknown key in params.lr: 'lo'"),
        (lambda d: d.update(synthesis=["sparkles"]), "unknown family 'sparkles'"),
        (lambda d: d.update(extra=1), "unknown key 'extra'"),
        (lambda d: d.update(method="nsa"), "must equal the file name"),
        (lambda d: d["params"]["score_window"].update(default=7), "params.score_window.default"),
    ],
)
def test_bad_method_yaml_names_file_and_key(tmp_path, change, message):
    spec = yaml.safe_load(yaml.safe_dump(DRAEM))
    change(spec)
    folder = _space_dir(tmp_path, draem=spec)
    with pytest.raises(UserError) as error:
        load_space(space_dir=folder)
    assert message in str(error.value)
    assert "draem.yaml" in str(error.value)


def test_bad_common_and_missing_files(tmp_path):
    folder = _space_dir(tmp_path, draem=DRAEM)
    common = yaml.safe_load((folder / "common.yaml").read_text())
    common["synthesis"]["perlin"]["params"]["sparkle"] = {"type": "float", "low": 0, "high": 1}
    (folder / "common.yaml").write_text(yaml.safe_dump(common))
    with pytest.raises(UserError, match=r"common.yaml: synthesis.perlin.params.sparkle"):
        load_space(space_dir=folder)
    with pytest.raises(UserError, match="unknown method 'nomethod'"):
        load_space(["nomethod"], space_dir=_space_dir(tmp_path / "b", draem=DRAEM))
    with pytest.raises(UserError, match="not found: .*missing.yaml"):
        load_space(user_file=tmp_path / "missing.yaml", space_dir=_space_dir(tmp_path / "c", draem=DRAEM))
    with pytest.raises(UserError, match="search-space folder not found: .*nowhere"):
        load_space(space_dir=tmp_path / "nowhere")


@dataclass
class _SpacelessConfig:
    lr: float = 1e-3


class _Spaceless(Method):
    """A registered method with no shipped space.yaml (as a plug-in would be)."""

    name = "spaceless"
    Config = _SpacelessConfig


@pytest.fixture
def spaceless(monkeypatch):
    monkeypatch.setitem(base._REGISTRY, "spaceless", _Spaceless)


def test_a_method_without_a_shipped_space_needs_a_file_or_a_user_spec(tmp_path, spaceless):
    with pytest.raises(UserError, match="no search space for method 'spaceless'"):
        load_space(["spaceless"])
    user = tmp_path / "mine.yaml"
    user.write_text(yaml.safe_dump({"methods": {"spaceless": {"method": "spaceless", "params": {
        "lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}}}}))
    assert load_space(["spaceless"], user_file=user).methods["spaceless"].params["lr"].high == 1e-2
    user.write_text(yaml.safe_dump({"methods": {"spaceless": {"method": "spaceless", "bounds": {"lr": {"gt": 0}}}}}))
    with pytest.raises(UserError, match="mine.yaml: bounds: .*cannot change it"):
        load_space(["spaceless"], user_file=user)


def test_shipped_spaces_are_package_data_and_search_spaces_replaces_them(tmp_path, monkeypatch, one_backbone):
    shipped = packaged_space_files()
    assert set(shipped) == {"common", *base.available_methods()}, "every built-in method ships its space"
    assert all("automl_ad" in str(path) and path.is_file() for path in shipped.values())
    monkeypatch.chdir(tmp_path)  # no search_spaces/ here: the shipped files only
    default = load_space()
    assert default.sources == tuple(str(shipped[n]) for n in ["common", *sorted(default.methods)])
    assert default.methods["draem"].params["rec_width"].choices == (16, 32, 64, 128)

    # The working directory's search_spaces/<name>.yaml replaces the shipped file whole.
    (tmp_path / "search_spaces").mkdir()
    (tmp_path / "search_spaces" / "draem.yaml").write_text(yaml.safe_dump(DRAEM))
    replaced = load_space()
    assert replaced.methods["draem"].params["rec_width"].high == 32 and "ssim_weight" not in replaced.methods["draem"].params
    assert str(Path("search_spaces") / "draem.yaml") in replaced.sources
    assert replaced.methods["cfa"] == default.methods["cfa"], "other methods keep the shipped space"

    # A user's --space still merges on top of it.
    user = tmp_path / "mine.yaml"
    user.write_text(yaml.safe_dump({"methods": {"draem": {"params": {
        "rec_width": {"type": "categorical", "choices": [8]}}}}}))
    assert load_space(user_file=user).methods["draem"].params["rec_width"].choices == (8,)


def test_copy_packaged_writes_the_shipped_files_unchanged(tmp_path, monkeypatch, one_backbone):
    monkeypatch.chdir(tmp_path)
    written = copy_packaged(tmp_path / "copy")
    shipped = packaged_space_files()
    assert sorted(p.stem for p in written) == sorted(shipped)
    assert all(p.read_text() == shipped[p.stem].read_text() for p in written)
    # A verbatim copy (its bounds included) loads to the same space as the shipped one.
    copied = load_space(space_dir=tmp_path / "copy")
    assert copied.methods == load_space().methods
    with pytest.raises(UserError, match="exists"):
        copy_packaged(tmp_path / "copy", ["draem"])
    with pytest.raises(UserError, match="no shipped search space 'nope'"):
        copy_packaged(tmp_path / "other", ["nope"])


@pytest.mark.parametrize(
    "params, message",
    [
        ({"rec_width": {"type": "categorical", "choices": [2, 16]}}, "rec_width must be >= 4, got 2"),
        ({"lr": {"type": "float", "low": 1e-4, "high": 0.5, "log": True}}, "lr must be <= 0.1, got 0.5"),
        ({"score_window": {"type": "int", "low": 1, "high": 99}}, "score_window must be <= 63, got 99"),
    ],
)
def test_a_searched_range_must_stay_inside_what_the_config_accepts(tmp_path, params, message):
    user = tmp_path / "mine.yaml"
    user.write_text(yaml.safe_dump({"methods": {"draem": {"params": params}}}))
    with pytest.raises(UserError, match=f"mine.yaml: params.*outside what 'draem' accepts: {message}"):
        load_space(["draem"], user_file=user)


def test_bounds_are_the_methods_own(tmp_path):
    user = tmp_path / "mine.yaml"
    user.write_text(yaml.safe_dump({"methods": {"draem": {"bounds": {"lr": {"ge": 0.0, "le": 1.0}}}}}))
    with pytest.raises(UserError, match="bounds: what 'draem' accepts is the method's own"):
        load_space(["draem"], user_file=user)
    from automl_ad.methods.base import make_config

    with pytest.raises(UserError, match="method 'draem': lr must be <= 0.1, got 0.5"):
        make_config(base.get_method_class("draem"), {"lr": 0.5})
    assert make_config(base.get_method_class("draem"), {"rec_width": 256}).rec_width == 256, \
        "the Config accepts its bounds, wider than the searched choices"


def test_register_takes_the_default_family_from_the_yaml_only():
    assert base.get_method_class("draem").synthesis == "perlin"  # first of draem/space.yaml's synthesis
    assert base.get_method_class("cfa").synthesis is None

    class Draem2(base.get_method_class("draem")):
        synthesis = "nsa"

    with pytest.raises(TypeError, match="sets synthesis; its default family is the first of synthesis in"):
        base.register(Draem2)
    assert base.get_method_class("draem") is not Draem2



def test_a_family_named_like_its_method_keeps_its_parameters_apart():
    """NSA trains with the NSA family: the family's parameters must not read as the
    method's (a random search once failed a trial with "method 'nsa' has no parameter(s)
    gamma_scale, n_patches")."""
    space = load_space(["nsa"])
    point = space.defaults("nsa")
    assert point["nsa.synthesis"] == "nsa"
    split = split_config(point, 128)
    assert set(split.method_params) == set(space.methods["nsa"].params)
    assert split.synthesis == "nsa" and split.synthesis_params
    assert set(split.synthesis_params) == set(space.synthesis["nsa"])
    from automl_ad.methods.base import create_method
    create_method("nsa", split.method_params, 32, "screw")  # the Config accepts what the split hands it
