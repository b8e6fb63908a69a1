"""Reading the JSON files other commands wrote (bundle manifests, search records)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from automl_ad.errors import UserError


def read_json(path: Path, missing: str) -> Any:
    """The parsed file; ``UserError(missing)`` when it is absent, a one-line error naming
    the file when it is not valid JSON."""
    if not path.is_file():
        raise UserError(missing)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"corrupt {path}: {error}") from None
