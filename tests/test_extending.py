"""Adding a method or a synthesis family is one class each, in one file of the user's own:
both register, and a search samples, trains and stores them without a file of the
package touched (docs/DEVELOPING.md, "Adding a method", "Adding a synthesis family")."""

from __future__ import annotations

import json
import textwrap

import pytest
import yaml

from conftest import TINY_FIDELITY, search_options

PLUGIN = textwrap.dedent('''
    from dataclasses import dataclass
    from typing import ClassVar

    import torch
    from torch import nn

    from automl_ad.methods.base import Method, Recipe, register
    from automl_ad.synthesis.base import SynthBatch, SynthParams, Synthesizer, register_family, uniform


    @dataclass
    class DimParams(SynthParams):
        FAMILY: ClassVar[str] = "dim"
        RANGES: ClassVar[dict] = {"normal_share": (0.0, 1.0), "strength": (0.1, 0.9)}
        strength: float = 0.5


    @register_family
    class Dim(Synthesizer):
        """Darkens one square per image."""

        FAMILY = "dim"
        Params = DimParams
        IN_VAL = False  # the frozen val sets of other searches stay as they are

        def synthesize(self, images, donors, generator, *, sources_given):
            batch, _, height, width = images.shape
            masks = images.new_zeros(batch, 1, height, width)
            top = (uniform(generator, (batch,), images.device) * (height // 2)).long().tolist()
            for i, t in enumerate(top):
                masks[i, :, t:t + height // 4, t:t + width // 4] = 1.0
            return SynthBatch(images * (1 - masks * self.params.strength), masks, images.new_ones(batch))


    @dataclass
    class ProbeConfig:
        lr: float = 1e-2
        width: int = 4


    @register
    class Probe(Method):
        """A one-layer segmenter trained with the family above."""

        name = "probe"
        Config = ProbeConfig
        recipe = Recipe(2, 4, 32, "a test method: 2 epochs, batch 4, 32 px")

        def __init__(self, config, image_size, category):
            super().__init__(config, image_size, category)
            self.net = nn.Conv2d(3, 1, 3, padding=1)

        def training_step(self, batch, phase):
            return {"loss": nn.functional.binary_cross_entropy_with_logits(self.net(batch.images), batch.masks)}

        def anomaly_map(self, images):
            return torch.sigmoid(self.net(images))[:, 0]
''')


@pytest.fixture
def forget_plugin():
    """The registries as they were after the test (the method contract suite
    parametrises over the registry it finds at collection)."""
    yield
    from automl_ad.methods import base as methods_base
    from automl_ad.synthesis import base as synthesis_base

    methods_base._REGISTRY.pop("probe", None)
    synthesis_base.FAMILIES.pop("dim", None)


def test_a_method_and_a_family_in_one_plugin_file_are_searched(tmp_path, tiny_mvtec, ray_session, forget_plugin):
    from automl_ad.results import store
    from automl_ad.tuning.search import run_search
    from automl_ad.tuning.space import packaged_space_files

    plugin = tmp_path / "my_methods.py"
    plugin.write_text(PLUGIN)
    spaces = tmp_path / "my_spaces"  # search_options writes its own tmp_path/spaces
    spaces.mkdir()
    common = yaml.safe_load(packaged_space_files()["common"].read_text())
    common["fidelity"] = TINY_FIDELITY
    common["synthesis"]["dim"] = {"params": {"strength": {"type": "float", "low": 0.2, "high": 0.8}}}
    (spaces / "common.yaml").write_text(yaml.safe_dump(common))
    (spaces / "probe.yaml").write_text(yaml.safe_dump({
        "method": "probe", "synthesis": ["dim"], "params": {"width": {"type": "categorical", "choices": [2, 4]}},
    }))
    summary = run_search(search_options(tmp_path, tiny_mvtec, budget="2trials", space_dir=spaces,
                                        methods=["probe"], plugins=(str(plugin),)))
    rows = store.read_table(summary.experiment_dir).to_pylist()
    assert len(rows) == 2 and {r["method"] for r in rows} == {"probe"}
    assert {r["synthesis"] for r in rows} == {"dim"}
    assert all(r["objective"] is not None and r["status"] != "error" for r in rows), [r.get("error") for r in rows]
    assert all(set(json.loads(r["method_params"])) == {"width"} for r in rows), "searched from its YAML"
    strengths = [json.loads(r["synthesis_params"]).get("strength") for r in rows]
    assert all(s is not None and 0.2 <= s <= 0.8 for s in strengths), strengths


def test_a_plugin_that_cannot_be_imported_is_one_line(tmp_path):
    from automl_ad.errors import UserError
    from automl_ad.plugins import load_plugins

    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_module_here\n")
    with pytest.raises(UserError, match=r"plugin .*broken.py.* cannot be imported: ModuleNotFoundError"):
        load_plugins([str(broken)])
    with pytest.raises(UserError, match="no such file"):
        load_plugins([str(tmp_path / "missing.py")])
