"""Strict readers for fields of user-written YAML documents (policies).

Each reader takes the value and its dotted path and raises ``FieldError`` naming that path,
so the loader can prefix file and document and the user sees exactly what to fix.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from proxy.config.units import parse_duration, parse_size
from proxy.errors import PullgateError


class FieldError(PullgateError):
    """A bad field in a document; ``path`` is the dotted field path (``spec.rules.denyTags``)."""

    code, status = "INVALID", 400

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


def kind_of(value: object) -> str:
    if value is None:
        return "null"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def mapping(value: object, path: str, allowed: Collection[str]) -> Mapping[str, Any]:
    """A mapping with only ``allowed`` keys (an absent or null value is an empty mapping)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise FieldError(path, f"expected a mapping, got {kind_of(value)}")
    for key in value:
        if key not in allowed:
            choices = ", ".join(sorted(allowed))
            raise FieldError(f"{path}.{key}", f"unknown field (allowed: {choices})")
    return value


def string(value: object, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise FieldError(path, f"expected a non-empty string, got {kind_of(value)}")
    return value


def boolean(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise FieldError(path, f"expected true or false, got {kind_of(value)}")
    return value


def choice(value: object, path: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise FieldError(path, f"must be one of {' | '.join(choices)}, got {value!r}")
    return str(value)


def string_list(value: object, path: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise FieldError(path, f"expected a list of strings, got {kind_of(value)}")
    return tuple(string(item, f"{path}[{i}]") for i, item in enumerate(value))


def duration(value: object, path: str) -> float:
    """A positive duration (``30s``, ``10m``, ``90d``; a bare number is seconds)."""
    try:
        seconds = parse_duration(value) if isinstance(value, str | int | float) else -1.0  # refuses bools
    except ValueError as exc:
        raise FieldError(path, str(exc)) from exc
    if seconds <= 0:
        raise FieldError(path, f"expected a positive duration like 90d, got {value!r}")
    return seconds


def size(value: object, path: str) -> int:
    """A positive byte size (``500MiB``, ``2GB``; a bare number is bytes)."""
    try:
        found = parse_size(value) if isinstance(value, str | int) else -1  # parse_size refuses bools
    except ValueError as exc:
        raise FieldError(path, str(exc)) from exc
    if found <= 0:
        raise FieldError(path, f"expected a positive size like 500MiB, got {value!r}")
    return found
