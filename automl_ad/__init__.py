"""automl_ad: AutoML for industrial visual anomaly detection.

The Python API (``automl_ad.api``; docs/api.md) is reachable from here, imported on first
use so that ``import automl_ad`` stays light (no torch, no Ray)::

    import automl_ad as ad
    result = ad.search("screw", "10m")
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Names of automl_ad.api offered here. Only by name (importlib), never an import statement,
# not even under TYPE_CHECKING: the layers below import this root for __version__, and
# import-linter would read an import of the API here as theirs.
_API = ("Detector", "ImageLike", "Predictions", "SearchResult", "SpearmanVerdict", "all_products", "load",
        "open_search", "plan", "read_jobs", "search", "search_many")

__all__ = ["__version__", *_API]



def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module("automl_ad.api"), name)
    raise AttributeError(f"module 'automl_ad' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
