"""The ``automl-ad`` command line: a click group; each command group lives in its own module.

Commands are thin: they parse options, call the package, and print. A
``UserError`` anywhere below becomes one line ``error: ...`` on stderr and its exit code
(2; ``OutOfSpace``: 1). So does running out of disk space in code that does not say so
itself (Ray's, SQLite's), and a search stopped by SIGINT/SIGTERM (``Interrupted``: 130/143).
"""

from __future__ import annotations

import importlib
import sys

import click

from automl_ad import __version__
from automl_ad.errors import Interrupted, OutOfSpace, UserError, as_out_of_space, out_of_space
from automl_ad.runtime import tune_cpu_allocator

# Modules under automl_ad/cli that contribute commands, as `command` or `commands`.
COMMAND_MODULES = ("data", "synth", "train", "search", "ensemble", "export", "report")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class _Main(click.Group):
    def invoke(self, ctx: click.Context):  # noqa: D401 - click hook
        try:
            return super().invoke(ctx)
        except UserError as error:
            click.echo(f"error: {_one_line(error)}", err=True)
            sys.exit(error.exit_code)
        except Interrupted as stop:
            click.echo(f"error: {_one_line(stop)}", err=True)
            sys.exit(stop.exit_code)
        except click.UsageError as error:
            # A wrong option value of a command (click's range and choice checks): the
            # same one line as every other bad input, naming the command to ask --help.
            where = error.ctx.command_path if error.ctx is not None else ctx.command_path
            click.echo(f"error: {_one_line(error.format_message())} (see `{where} --help`)", err=True)
            sys.exit(2)
        except Exception as error:
            if not out_of_space(error):
                raise
            # A full disk met where no writer of ours named the file (a library's own
            # write): still one line, naming the file when the OS error did.
            click.echo(f"error: {_one_line(as_out_of_space(error))}", err=True)
            sys.exit(OutOfSpace.exit_code)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="automl-ad")
def main() -> None:
    """AutoML for industrial visual anomaly detection, one product (category) at a time.

    \b
    Typical session:
      automl-ad data check /data/mvtec --category screw     # is my folder usable?
      automl-ad train --method draem --category screw       # one config, no search
      automl-ad search --category screw --budget 50gpu-h    # the main job
      automl-ad results --category screw                    # leaderboard from Parquet

    Without --data, every command uses the built-in procedural products
    (textures: fabric, marble; objects: screw, washer).
    """
    tune_cpu_allocator()


def _register() -> None:
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"automl_ad.cli.{name}")
        except ModuleNotFoundError as error:
            if error.name == f"automl_ad.cli.{name}":
                continue  # that command group is not part of this build
            raise
        for command in getattr(module, "commands", None) or [module.command]:
            main.add_command(command)


_register()
