"""Search-space YAML loading/validation and the define-by-run Optuna space."""

from __future__ import annotations

import shutil
from pathlib import Path

import optuna
import pytest
import yaml

from automl_ad.errors import UserError
from automl_ad.tuning.space import DEFAULT_SPACE_DIR, load_space, split_config

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
    folder = tmp_path / "spaces"
    folder.mkdir(parents=True)
    shutil.copy(DEFAULT_SPACE_DIR / "common.yaml", folder / "common.yaml")
    for name, spec in methods.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    return folder


def test_shipped_common_yaml_is_valid(tmp_path):
    space = load_space(space_dir=_space_dir(tmp_path, draem=DRAEM))
    assert set(space.synthesis) >= {"perlin", "nsa", "cutpaste", "cutpaste_scar", "corruption"}
    assert space.fidelity.max_epochs >= space.fidelity.grace_period


def test_define_by_run_space_is_conditional_and_seeded(tmp_path):
    space = load_space(space_dir=_space_dir(tmp_path, draem=DRAEM, cfa=CFA))
    assert sorted(space.methods) == ["cfa", "draem"]

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
    for params in first:
        if params["method"] == "cfa":
            assert set(params) == {"method", "cfa.lr"}
        else:
            family = params["draem.synthesis"]
            assert family in {"perlin", "cutpaste"}
            assert params["draem.rec_width"] in {8, 16, 24, 32}
            assert all(not k.startswith("cfa.") for k in params)
            assert any(k.startswith(f"{family}.") for k in params)
            split = split_config(params, 64)
            assert split.method == "draem" and split.synthesis == family and split.image_size == 64
            assert set(split.method_params) == {"lr", "rec_width", "score_window"}
            assert all(f"{family}.{k}" in params for k in split.synthesis_params)


def test_methods_restrict_and_defaults(tmp_path):
    space = load_space(["cfa"], space_dir=_space_dir(tmp_path, draem=DRAEM, cfa=CFA))
    assert list(space.methods) == ["cfa"]
    point = load_space(space_dir=_space_dir(tmp_path / "b", draem=DRAEM)).defaults("draem")
    assert point["draem.lr"] == pytest.approx(1e-4) and point["draem.synthesis"] == "perlin"
    assert point["perlin.threshold"] == pytest.approx(0.5)


def test_user_space_overrides_and_pins_size(tmp_path):
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
    with pytest.raises(UserError, match="search-space file not found: .*cfa.yaml"):
        load_space(["cfa"], space_dir=_space_dir(tmp_path / "d", draem=DRAEM))
