"""``-p key=value`` on the command line: parsed and typed against the method's Config.

A value is read as a YAML scalar and then coerced to the type of the Config field it
names, so ``-p lr=abc`` is refused here in one line (naming the option and what the
field takes) instead of failing deep inside a method as a ``ValueError`` traceback.
The Config's own checks (ranges, choices) run last, on typed values.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path
from typing import Any, Callable

from automl_ad.errors import UserError

_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})
# String fields whose value is a choice word or else a file path (backbone weights).
_PATH_WORDS: dict[str, frozenset[str]] = {"weights": frozenset({"pretrained", "random"})}


def split_pairs(pairs: tuple[str, ...], option: str) -> dict[str, str]:
    """``("lr=1e-4",)`` -> ``{"lr": "1e-4"}``; a pair without ``=`` or key is refused."""
    raw: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{option} expects key=value, got {pair!r}")
        raw[key.strip()] = value.strip()
    return raw


def yaml_scalars(raw: dict[str, str], option: str) -> dict[str, Any]:
    """Values parsed as YAML scalars (``1e-4`` -> float, ``true`` -> bool); used where no
    typed target is known (synthesis parameters, whose own checks name the range)."""
    return {key: _yaml_scalar(text, f"{option} {key}={text}:") for key, text in raw.items()}


def _yaml_scalar(text: str, where: str) -> Any:
    import yaml

    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        raise UserError(f"{where} takes one plain value") from None
    if isinstance(value, (dict, list)):
        raise UserError(f"{where} takes one value, not a list or mapping")
    return value


def _as_bool(text: str, where: str) -> bool:
    word = text.lower()
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise UserError(f"{where} takes true or false")


def _as_int(text: str, where: str) -> int:
    value = _yaml_scalar(text, where)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{where} takes an integer, e.g. 8")
    return value


def _as_float(text: str, where: str) -> float:
    value = _yaml_scalar(text, where)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{where} takes a finite number, e.g. 1e-3")
    return float(value)


def _as_str(text: str, where: str) -> str:
    if not text:
        raise UserError(f"{where} takes a non-empty value")
    return text


_COERCE: dict[Any, Callable[[str, str], Any]] = {bool: _as_bool, int: _as_int, float: _as_float, str: _as_str}


def _check_string(key: str, value: str, where: str) -> None:
    """Names checked before any work: a backbone must exist; a field that takes a word or
    a file path (weights) must be one of the words or an existing file."""
    if key == "backbone":
        from automl_ad.methods.backbones import get_spec

        try:
            get_spec(value)
        except UserError as error:
            raise UserError(f"{where}: {error}") from None
    words = _PATH_WORDS.get(key)
    if words is not None and value not in words and not Path(value).expanduser().is_file():
        raise UserError(f"{where} takes {' or '.join(sorted(words))} or an existing checkpoint file")


def method_params(method: str, pairs: tuple[str, ...], option: str = "-p") -> dict[str, Any]:
    """Typed ``-p`` values for ``method``, checked by its Config (UserError otherwise)."""
    from automl_ad.methods.base import get_method_class, make_config

    cls = get_method_class(method)
    raw = split_pairs(pairs, option)
    hints = typing.get_type_hints(cls.Config)
    known = {f.name for f in dataclasses.fields(cls.Config)}
    params: dict[str, Any] = {}
    for key, text in raw.items():
        if key not in known:
            params[key] = text  # make_config names every unknown key with the known ones
            continue
        where = f"{option} {key}={text}: {method}.{key}"
        coerce = _COERCE.get(hints.get(key), lambda value, _where: _yaml_scalar(value, _where))
        params[key] = coerce(text, where)
        if isinstance(params[key], str):
            _check_string(key, params[key], where)
    try:
        make_config(cls, params)
    except UserError as error:
        raise UserError(f"{option}: {error}") from None
    except (TypeError, ValueError) as error:  # a Config check that is not a UserError yet
        raise UserError(f"{option}: {method} refuses {raw}: {error}") from None
    return params
