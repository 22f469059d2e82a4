"""Configuration: frozen dataclasses, loaded once from a YAML file plus ``PULLGATE_*``
environment overrides. Unknown keys and bad values raise ``ConfigError`` naming the key.

Environment overrides use ``__`` for nesting and numbers for list items, e.g.
``PULLGATE_CACHE__TAG_TTL=10m`` or ``PULLGATE_UPSTREAMS__0__URL=http://127.0.0.1:5001``.
Values are parsed as YAML scalars, so ``PULLGATE_MIRROR__ENFORCE_POLICIES=true`` works.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml

from proxy.errors import ConfigError
from proxy.units import parse_duration, parse_size

ENV_PREFIX = "PULLGATE_"


def _duration(default: str) -> Any:
    return field(default=parse_duration(default), metadata={"parse": parse_duration})


def _size(default: str) -> Any:
    return field(default=parse_size(default), metadata={"parse": parse_size})


def _split_hostport(value: str) -> tuple[str, int]:
    if not isinstance(value, str):
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _listen(default: str) -> Any:
    return field(default=_split_hostport(default), metadata={"parse": _split_hostport})


def _http_url(value: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
    if parts.query or parts.fragment or parts.username:
        raise ValueError(f"the URL must not carry credentials, a query or a fragment: {value!r}")
    return value.rstrip("/")


@dataclass(frozen=True)
class CacheConfig:
    dir: Path = Path("./pullgate-cache")
    max_size: int = _size("50GiB")
    low_water: float = 0.9
    tag_ttl: float = _duration("5m")
    max_stale: float = _duration("24h")
    negative_ttl: float = _duration("30s")
    max_manifest_size: int = _size("4MiB")


@dataclass(frozen=True)
class UpstreamConfig:
    name: str
    url: str = field(metadata={"parse": _http_url})
    username: str | None = None
    password_env: str | None = None
    auth_hosts: tuple[str, ...] = ()

    @property
    def host(self) -> str:
        return urlsplit(self.url).netloc

    def password(self) -> str | None:
        """The secret, read from the environment each time (never stored in the config)."""
        return os.environ.get(self.password_env) if self.password_env else None


@dataclass(frozen=True)
class TimeoutConfig:
    connect: float = _duration("10s")
    read: float = _duration("60s")
    manifest: float = _duration("30s")
    retries: int = 3
    backoff: float = _duration("200ms")


@dataclass(frozen=True)
class LogConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"


@dataclass(frozen=True)
class AdmissionConfig:
    enabled: bool = False
    listen: tuple[str, int] = _listen("0.0.0.0:8443")
    tls_cert: Path | None = None
    tls_key: Path | None = None
    deadline: float = _duration("8s")
    on_timeout: Literal["allow", "deny"] = "deny"
    max_body_size: int = _size("3MiB")


@dataclass(frozen=True)
class PolicyDefaults:
    no_match: Literal["allow", "warn", "deny"] = "allow"


@dataclass(frozen=True)
class MirrorConfig:
    enforce_policies: bool = False


@dataclass(frozen=True)
class Config:
    listen: tuple[str, int] = _listen("127.0.0.1:5000")
    cache: CacheConfig = field(default_factory=CacheConfig)
    upstreams: tuple[UpstreamConfig, ...] = (UpstreamConfig(name="docker.io", url="https://registry-1.docker.io"),)
    default_upstream: str | None = "docker.io"
    timeouts: TimeoutConfig = field(default_factory=TimeoutConfig)
    log: LogConfig = field(default_factory=LogConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    policies: Path | None = None
    defaults: PolicyDefaults = field(default_factory=PolicyDefaults)
    mirror: MirrorConfig = field(default_factory=MirrorConfig)
    shutdown_grace: float = _duration("30s")  # how long in-flight pulls may finish after SIGTERM
    shutdown_delay: float = _duration("3s")  # unready before closing, so load balancers stop routing

    def upstream(self, name: str) -> UpstreamConfig | None:
        return next((u for u in self.upstreams if u.name == name), None)

    def redacted(self) -> dict[str, Any]:
        """A dump safe for logs and ``/debug``: secrets are read from env and never held here,
        but the env variable names are not secret and help debugging."""
        return typing.cast(dict[str, Any], _plain(self))


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Load the config file (or the embedded defaults) and apply ``PULLGATE_*`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config {path}: top level must be a mapping")
        data = loaded or {}
    _apply_env(data, os.environ if environ is None else environ)
    config = typing.cast(Config, build(Config, data, ""))
    _check(config)
    return config


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        keys = name[len(ENV_PREFIX) :].lower().split("__")
        node: Any = data
        for i, key in enumerate(keys):
            last = i == len(keys) - 1
            value: Any = yaml.safe_load(raw) if last else {}
            if isinstance(node, list) and key.isdigit():
                index = int(key)
                while len(node) <= index:
                    node.append({})
                node[index] = value if last else node[index]
                node = node[index]
            elif isinstance(node, dict):
                if last:
                    node[key] = value
                else:
                    node = node.setdefault(key, [] if keys[i + 1].isdigit() else {})
            else:
                raise ConfigError(f"environment {name}: {'.'.join(keys[:i])} is not a mapping")


def build(cls: type[Any], data: Any, path: str) -> Any:
    """Build dataclass ``cls`` from ``data``, naming the key path in every error."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{path}.{unknown[0]}" if path else str(unknown[0])
        raise ConfigError(f"{key}: unknown key (allowed: {', '.join(sorted(fields))})")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        key = f"{path}.{name}" if path else name
        values[name] = _convert(hints[name], value, key, fields[name].metadata.get("parse"))
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"{path or 'config'}: {exc}") from exc


def _convert(hint: Any, value: Any, key: str, parse: Callable[[Any], Any] | None) -> Any:
    if parse is not None:
        try:
            return parse(value)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{key}: {exc}") from exc
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        return _convert(hint, value, key, None)
    if dataclasses.is_dataclass(hint):
        return build(typing.cast(type, hint), value, key)
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list")
        return tuple(_convert(args[0], v, f"{key}[{i}]", None) for i, v in enumerate(value))
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    return _scalar(hint, value, key)


def _scalar(hint: Any, value: Any, key: str) -> Any:
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: expected a path")
        return Path(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return hint(value)
    if hint is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported value {value!r}")


def _check(config: Config) -> None:
    names = [u.name for u in config.upstreams]
    if not names:
        raise ConfigError("upstreams: at least one upstream is required")
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise ConfigError(f"upstreams: duplicate name {sorted(duplicates)[0]!r}")
    if config.default_upstream is not None and config.default_upstream not in names:
        raise ConfigError(f"default_upstream: {config.default_upstream!r} is not an upstream")
    if not 0 < config.cache.low_water <= 1:
        raise ConfigError("cache.low_water: must be in (0, 1]")
    if (config.admission.tls_cert is None) != (config.admission.tls_key is None):
        raise ConfigError("admission.tls_cert: tls_cert and tls_key go together")
    for i, upstream in enumerate(config.upstreams):
        if upstream.password_env and not upstream.username:
            raise ConfigError(f"upstreams[{i}].password_env: needs a username")


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
