"""``PULLGATE_*`` environment variables: which ones are config overrides, how they apply on
top of the file (or the embedded defaults), and refusing the ones that are neither an
override nor a variable pullgate documents.

An override names a key path: ``__`` between levels, a number for a list item
(``PULLGATE_CACHE__TAG_TTL``, ``PULLGATE_UPSTREAMS__0__URL``). List items are counted from 0
in the list the file has, or the embedded defaults' list when the file has none, so
``PULLGATE_UPSTREAMS__0__URL`` changes docker.io's URL in the defaults; the next index adds
an item. Other ``PULLGATE_`` names are allowed only when documented: ``PULLGATE_CONFIG``,
variables the config names as secrets (``password_env``, ``token_secret_env``), and the
variables Kubernetes injects for a Service named ``pullgate...`` (service links,
https://kubernetes.io/docs/concepts/services-networking/service/#environment-variables).
Anything else is a typo, and a typo that is silently ignored is a setting that silently
does not apply.

This module knows the schema only through the root dataclass it is given (``Config``).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from proxy.errors import ConfigError

PREFIX = "PULLGATE_"
CONFIG_VARIABLE = "PULLGATE_CONFIG"
_SERVICE_LINK = re.compile(
    r"^PULLGATE_(?:[A-Z0-9_]+_)?"
    r"(?:SERVICE_HOST|SERVICE_PORT(?:_[A-Z0-9_]+)?|PORT(?:_\d+_(?:TCP|UDP|SCTP)(?:_(?:PROTO|PORT|ADDR))?)?)$"
)
_INDEX = re.compile(r"(?<=__)\d+(?=__|$)")


@dataclass(frozen=True, slots=True)
class Override:
    variable: str
    keys: tuple[str, ...]
    raw: str


def key_path(keys: typing.Sequence[str]) -> str:
    """``("upstreams", "1", "url")`` -> ``upstreams[1].url`` (as errors name keys)."""
    path = ""
    for key in keys:
        path += f"[{key}]" if key.isdigit() else (f".{key}" if path else key)
    return path


def split(environ: Mapping[str, str], root: type) -> tuple[list[Override], list[str]]:
    """The overrides (names that are key paths of ``root``) and the other ``PULLGATE_`` names."""
    overrides, others = [], []
    for name, raw in sorted(environ.items()):
        if not name.startswith(PREFIX) or name == CONFIG_VARIABLE:
            continue
        keys = tuple(name[len(PREFIX) :].lower().split("__"))
        if _is_key_path(root, keys):
            overrides.append(Override(name, keys, raw))
        else:
            others.append(name)
    return overrides, others


def _unwrap(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    return hint


def _is_key_path(hint: Any, keys: tuple[str, ...]) -> bool:
    for key in keys:
        hint = _unwrap(hint)
        origin = typing.get_origin(hint)
        if dataclasses.is_dataclass(hint):
            fields = typing.get_type_hints(hint)
            if key not in fields:
                return False
            hint = fields[key]
        elif origin is tuple and key.isdigit():
            hint = typing.get_args(hint)[0]
        elif origin in (Mapping, dict) or hint in (Mapping, dict):
            hint = typing.get_args(hint)[1] if typing.get_args(hint) else Any
        else:
            return False
    return bool(keys) and all(keys)


def apply(data: dict[str, Any], overrides: list[Override], defaults: Mapping[str, Any]) -> dict[str, Override]:
    """Write the overrides into ``data`` (the parsed file). A list the file does not have
    starts as the default list (``defaults``: top-level key -> plain value). Returns the
    list items the overrides added (key path -> the variable that added it)."""
    added: dict[str, Override] = {}
    for override in overrides:
        node: Any = data
        keys = override.keys
        for i, key in enumerate(keys):
            last = i == len(keys) - 1
            value: Any = yaml.safe_load(override.raw) if last else None
            if isinstance(node, list) and key.isdigit():
                index = int(key)
                if index > len(node):
                    raise ConfigError(
                        f"environment {override.variable}: {key_path(keys[:i])} has {len(node)} item(s); "
                        f"the next new item is index {len(node)}"
                    )
                if index == len(node):
                    node.append({})
                    added[key_path(keys[: i + 1])] = override
                if last:
                    node[index] = value
                node = node[index]
            elif isinstance(node, dict):
                if last:
                    node[key] = value
                    break
                if key not in node:
                    list_next = keys[i + 1].isdigit()
                    fresh = copy.deepcopy(defaults.get(key)) if i == 0 and list_next else None
                    node[key] = fresh if isinstance(fresh, list) else ([] if list_next else {})
                node = node[key]
            else:
                raise ConfigError(f"environment {override.variable}: {key_path(keys[:i])} is not a mapping")
    return added


def refuse_unknown(names: list[str], allowed: set[str], root: type) -> None:
    """Raise for the first ``PULLGATE_`` name that is neither allowed nor a service link."""
    for name in names:
        if name in allowed or _SERVICE_LINK.match(name):
            continue
        hint = suggestion(name, root)
        raise ConfigError(
            f"environment {name}: not a config key"
            + (f" (did you mean {hint}?)" if hint else "")
            + "; overrides are PULLGATE_<KEY> or PULLGATE_<SECTION>__<KEY>, e.g. PULLGATE_CACHE__TAG_TTL"
        )


def suggestion(name: str, root: type) -> str | None:
    """The closest override name, list indexes kept as the user wrote them."""
    indexes = _INDEX.findall(name)
    matches = difflib.get_close_matches(_INDEX.sub("0", name.upper()), list(names(root)), n=1, cutoff=0.75)
    if not matches:
        return None
    parts = iter(indexes)
    return _INDEX.sub(lambda m: next(parts, m.group(0)), matches[0])


def names(hint: Any, prefix: str = PREFIX) -> Iterator[str]:
    """Every override name of ``hint`` (list items as index 0)."""
    for field_name, field_hint in typing.get_type_hints(hint).items():
        name = prefix + field_name.upper()
        yield name
        field_hint = _unwrap(field_hint)
        if dataclasses.is_dataclass(field_hint):
            yield from names(field_hint, name + "__")
        elif typing.get_origin(field_hint) is tuple:
            item = _unwrap(typing.get_args(field_hint)[0])
            yield name + "__0"
            if dataclasses.is_dataclass(item):
                yield from names(item, name + "__0__")


def named_variables(plain: Any) -> Iterator[str]:
    """Values of ``*_env`` keys anywhere in a plain config dump: the variables the config
    names as its secrets."""
    if isinstance(plain, Mapping):
        for key, value in plain.items():
            if str(key).endswith("_env") and isinstance(value, str):
                yield value
            else:
                yield from named_variables(value)
    elif isinstance(plain, list):
        for value in plain:
            yield from named_variables(value)
