"""A wheel built from the project carries its search spaces and runs from outside the
checkout: the shipped YAML files are package data (``importlib.resources``), not files
found next to the source tree."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from automl_ad.methods.base import available_methods
from automl_ad.tuning.space import packaged_space_files

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel ``pip wheel`` builds from a copy of the sources (the build writes
    ``build/`` and egg-info beside them, which must not land in the checkout)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "automl_ad", source / "automl_ad", ignore=shutil.ignore_patterns("__pycache__"))
    # No build isolation and no index: setuptools comes from this environment, offline.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "--quiet", "-w", str(root / "dist"), str(source)], check=True, timeout=300)
    (built,) = (root / "dist").glob("automl_ad-*.whl")
    return built


def test_the_wheel_holds_every_shipped_search_space(wheel: Path) -> None:
    shipped = packaged_space_files()
    assert set(shipped) == {"common", *available_methods()}
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for name, path in shipped.items():
            member = "automl_ad/tuning/common.yaml" if name == "common" else f"automl_ad/methods/{name}/space.yaml"
            assert member in names, f"{member} is not in {wheel.name}"
            assert archive.read(member).decode() == path.read_text()
        assert "automl_ad/methods/draem/model.py" in names and "automl_ad/methods/draem/__init__.py" in names


def test_the_installed_wheel_loads_its_spaces_and_plans_a_search_outside_the_checkout(
        wheel: Path, tmp_path: Path, tiny_mvtec: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "--quiet", str(wheel)], check=True, timeout=300)
    # The dependencies (torch, ray, ...) come from this environment's site-packages, added
    # after the install so pip never sees (or touches) the checkout's own automl_ad there.
    # A path added by a .pth file is not a site dir: its own .pth files, the editable
    # install's among them, are not run, so only the wheel's automl_ad is importable.
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    probe = (
        "import json, automl_ad; from automl_ad.tuning.space import load_space; s = load_space(); "
        "print(json.dumps({'package': automl_ad.__file__, 'methods': sorted(s.methods), 'sources': s.sources}))"
    )
    result = subprocess.run([str(python), "-c", probe], cwd=outside, check=True, capture_output=True, text=True,
                            timeout=300)
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(loaded["package"]).is_relative_to(site), loaded["package"]
    assert loaded["methods"] == sorted(available_methods())
    assert loaded["sources"] and all(Path(p).is_relative_to(site) for p in loaded["sources"])

    # The console script plans a search on data outside the checkout (no training).
    plan = subprocess.run([str(venv / "bin" / "automl-ad"), "search", "--category", "screw", "--budget", "2m",
                           "--data", str(tiny_mvtec), "--plan"], cwd=outside, capture_output=True, text=True,
                          timeout=300)
    assert plan.returncode == 0, plan.stderr
    assert "patchcore" in plan.stdout
