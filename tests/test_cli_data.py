"""``automl-ad data check`` and ``data synth`` through click, exit codes included."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from automl_ad.cli import data as data_cli
from automl_ad.errors import UserError

from conftest import make_broken_category, make_category


class _UserErrorGroup(click.Group):
    """Stands in for the main group: UserError -> 'error: ...' on stderr and exit 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(2)


_cli = _UserErrorGroup(commands={"data": data_cli.command})


def _run(*args: str):
    return CliRunner().invoke(_cli, list(args), catch_exceptions=False)


def test_check_usable_category_exits_zero(tmp_path: Path) -> None:
    make_category(tmp_path)
    result = _run("data", "check", str(tmp_path), "--category", "widget")
    assert result.exit_code == 0, result.output
    assert "widget in" in result.output and ": usable" in result.output
    assert "train/good: 6 images" in result.output
    assert "masks 2/2" in result.output


def test_check_broken_category_exits_two_and_names_files(tmp_path: Path) -> None:
    paths = make_broken_category(tmp_path)
    result = _run("data", "check", str(tmp_path), "--category", "broken")
    assert result.exit_code == 2
    assert "NOT usable" in result.output
    for path in paths.values():
        assert str(path) in result.output


def test_check_missing_category_is_a_user_error(tmp_path: Path) -> None:
    make_category(tmp_path)
    result = _run("data", "check", str(tmp_path), "--category", "gadget")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: category 'gadget' not found")
    result = _run("data", "check", str(tmp_path / "nowhere"), "--category", "widget")
    assert result.exit_code == 2 and "nowhere" in result.stderr


def test_synth_writes_a_loadable_dataset(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    result = _run("data", "synth", "--out", str(out), "--categories", "screw, fabric",
                  "--n-train", "3", "--n-test", "4", "--image-size", "32", "--seed", "1")
    assert result.exit_code == 0, result.output
    assert f"wrote {out / 'screw'}: 3 train, 4 test images" in result.output
    assert "done in" in result.output
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["fabric", "screw"]
    checked = _run("data", "check", str(out), "--category", "screw")
    assert checked.exit_code == 0, checked.output
    assert "32x32 (7)" in checked.output


@pytest.mark.parametrize("args, needle", [
    (["--categories", " , "], "--categories"),
    (["--categories", "bottle"], "bottle"),
    (["--n-train", "0"], "n_train"),
])
def test_synth_bad_input_exits_two(tmp_path: Path, args: list[str], needle: str) -> None:
    result = _run("data", "synth", "--out", str(tmp_path / "o"), *args)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and needle in result.stderr


def test_help_teaches_with_examples() -> None:
    for command in (["data", "check", "--help"], ["data", "synth", "--help"]):
        result = _run(*command)
        assert result.exit_code == 0 and "Examples:" in result.output and "automl-ad data" in result.output


def test_registered_in_the_main_command(tmp_path: Path) -> None:
    from automl_ad.cli import main

    assert main.commands["data"] is data_cli.command
    make_broken_category(tmp_path)
    result = CliRunner().invoke(main, ["data", "check", str(tmp_path), "--category", "broken"])
    assert result.exit_code == 2
