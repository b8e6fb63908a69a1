"""Methods and synthesis families from outside the package: modules a user names are
imported so their ``@register`` / ``@register_family`` classes join the registries.

A plugin is a module name (``mypkg.methods``, importable where the search runs) or a
``.py`` file. ``search --plugin`` names them, and so does ``AUTOML_AD_PLUGINS`` (comma
separated) for every command; a search hands the list to each of its trials, which import
them again in their own processes (a Ray worker is a fresh interpreter). Below every
layer: the registries call it when they look a name up.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Iterable

from automl_ad.errors import UserError

PLUGINS_ENV = "AUTOML_AD_PLUGINS"
_LOADED: dict[str, str] = {}  # spec -> module name, once per process


def env_plugins() -> tuple[str, ...]:
    """The plugins ``AUTOML_AD_PLUGINS`` names."""
    return tuple(p.strip() for p in os.environ.get(PLUGINS_ENV, "").split(",") if p.strip())


def load_plugins(specs: Iterable[str] = ()) -> tuple[str, ...]:
    """Import ``specs`` and the environment's plugins (each once per process); the specs
    loaded, in order. One clear error for one that cannot be imported."""
    loaded = []
    for spec in dict.fromkeys([*env_plugins(), *specs]):
        if spec not in _LOADED:
            _LOADED[spec] = _import(spec)
        loaded.append(spec)
    return tuple(loaded)


def _import(spec: str) -> str:
    try:
        if spec.endswith(".py") or os.sep in spec:
            path = Path(spec).expanduser().resolve()
            if not path.is_file():
                raise UserError(f"plugin {spec!r}: no such file")
            name = f"automl_ad_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            if module_spec is None or module_spec.loader is None:
                raise UserError(f"plugin {spec!r}: not a Python file")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
            return name
        importlib.import_module(spec)
        return spec
    except UserError:
        raise
    except Exception as error:  # the plugin's own fault, shown in one line
        raise UserError(f"plugin {spec!r} cannot be imported: {type(error).__name__}: {error}") from None
