"""Configuration: frozen dataclasses, loaded once from a YAML file plus ``PULLGATE_*``
environment overrides. Unknown keys and bad values raise ``ConfigError`` naming the key.

Environment overrides use ``__`` for nesting and numbers for list items, e.g.
``PULLGATE_CACHE__TAG_TTL=10m`` or ``PULLGATE_UPSTREAMS__0__URL=http://127.0.0.1:5001``
(``proxy.config.environment``). Values are parsed as YAML scalars, so
``PULLGATE_MIRROR__ENFORCE_POLICIES=true`` works.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml

from proxy.config import environment
from proxy.config.storage import CoordinationConfig, StorageConfig, check_coordination, check_storage
from proxy.config.units import parse_duration, parse_size
from proxy.errors import ConfigError

DEFAULT_UPSTREAM = "docker.io"  # the default_upstream when several upstreams include it


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
    if parts.username or parts.password:
        # Never echo it: the error would put the password in logs and terminals.
        raise ValueError("the URL must not carry credentials (use username and password_env)")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"the URL must not carry a query or a fragment: {value!r}")
    return value.rstrip("/")


def _optional_http_url(value: str | None) -> str | None:
    return None if value is None else _http_url(value)


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
    # CA (PEM) whose client certificates may call /validate and /mutate: the API server's,
    # when an AdmissionConfiguration gives it one. Unset: any caller that reaches the port.
    client_ca: Path | None = None
    deadline: float = _duration("8s")
    on_timeout: Literal["allow", "deny"] = "deny"
    max_body_size: int = _size("3MiB")


@dataclass(frozen=True)
class PolicyDefaults:
    no_match: Literal["allow", "warn", "deny"] = "allow"


@dataclass(frozen=True)
class MirrorConfig:
    enforce_policies: bool = False


def _groups(value: Any) -> Mapping[str, tuple[str, ...]]:
    """``{group: [user, ...]}`` as a read-only mapping."""
    if not isinstance(value, dict):
        raise ValueError("expected a mapping of group name to a list of users")
    groups: dict[str, tuple[str, ...]] = {}
    for name, users in value.items():
        if not isinstance(name, str) or not isinstance(users, list) or not all(isinstance(u, str) for u in users):
            raise ValueError(f"group {name!r}: expected a list of user names")
        groups[name] = tuple(users)
    return MappingProxyType(groups)


@dataclass(frozen=True)
class AccessRule:
    """Who may pull which repositories. ``repositories`` are globs over
    ``UPSTREAM/REPOSITORY`` (the configured upstream's name and the repository as the
    upstream knows it, e.g. ``docker.io/library/**``, ``ghcr.io/acme/*``). A rule grants
    ``pull`` to the ``users`` (``"*"``: any authenticated identity), to members of
    ``groups``, and to everyone when ``anonymous``."""

    repositories: tuple[str, ...]
    users: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    anonymous: bool = False


@dataclass(frozen=True)
class AccessConfig:
    """Client authentication and pull rules for the mirror listener (off: a public mirror).

    ``htpasswd``: ``user:hash`` lines, hashes bcrypt (``htpasswd -B``), argon2id or
    ``$scrypt$``. ``tokens``: ``name:sha256:<hex of the token's SHA-256>`` lines for static
    bearer tokens. Files are re-read when they change; no secret is ever held in plain."""

    enabled: bool = False
    realm: str = "pullgate"  # the realm of Basic challenges and the service of Bearer ones
    token_realm: str | None = field(default=None, metadata={"parse": _optional_http_url})  # default: this listener
    token_secret_env: str | None = None  # env var with the token signing key (share it between replicas)
    token_ttl: float = _duration("5m")
    htpasswd: Path | None = None
    tokens: Path | None = None
    groups: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: MappingProxyType({}), metadata={"parse": _groups}
    )
    rules: tuple[AccessRule, ...] = ()
    failed_login_limit: int = 10  # failed logins per minute per source address, then 429
    credential_cache_ttl: float = _duration("5m")  # how long a verified password is remembered

    def token_secret(self) -> bytes | None:
        """The signing key, read from the environment (never stored in the config)."""
        value = os.environ.get(self.token_secret_env) if self.token_secret_env else None
        return value.encode() if value else None


@dataclass(frozen=True)
class LimitsConfig:
    """Input and concurrency limits of the mirror listener."""

    max_header_size: int = _size("8KiB")  # one request header field
    max_headers: int = 100
    max_url_length: int = 8192
    upstream_fetches: int = 64  # concurrent upstream fetches in all
    upstream_fetches_per_client: int = 16  # ... started by one client address
    idle_timeout: float = _duration("30s")  # idle keep-alive, and a request's headers must arrive within it
    send_timeout: float = _duration("60s")  # a client that accepts no byte for this long is cut off


@dataclass(frozen=True)
class TufConfig:
    """Refreshing the default Sigstore trusted root through TUF (``proxy.trust.tufroot``).
    Unset ``url``: no refresh, the shipped root only (offline: air-gapped clusters)."""

    url: str | None = field(default=None, metadata={"parse": _optional_http_url})  # the TUF repository
    root: Path | None = None  # the TUF root.json trusted first; default: Sigstore's, shipped
    interval: float = _duration("24h")
    timeout: float = _duration("30s")  # each network read of the repository
    cache_dir: Path | None = None  # metadata and the fetched trusted_root.json; default: <cache.dir>/tuf


@dataclass(frozen=True)
class TrustConfig:
    tuf: TufConfig = field(default_factory=TufConfig)


@dataclass(frozen=True)
class Config:
    listen: tuple[str, int] = _listen("127.0.0.1:5000")
    tls_cert: Path | None = None  # mirror listener TLS (PEM), reloaded when the files change
    tls_key: Path | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    upstreams: tuple[UpstreamConfig, ...] = (UpstreamConfig(name="docker.io", url="https://registry-1.docker.io"),)
    default_upstream: str | None = "docker.io"
    timeouts: TimeoutConfig = field(default_factory=TimeoutConfig)
    log: LogConfig = field(default_factory=LogConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    policies: Path | None = None
    defaults: PolicyDefaults = field(default_factory=PolicyDefaults)
    mirror: MirrorConfig = field(default_factory=MirrorConfig)
    access: AccessConfig = field(default_factory=AccessConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)  # proxy/config/storage.py
    coordination: CoordinationConfig = field(default_factory=CoordinationConfig)
    trust: TrustConfig = field(default_factory=TrustConfig)
    shutdown_grace: float = _duration("30s")  # how long in-flight pulls may finish after SIGTERM
    shutdown_delay: float = _duration("3s")  # unready before closing, so load balancers stop routing

    def tuf_cache_dir(self) -> Path:
        return self.trust.tuf.cache_dir or self.cache.dir / "tuf"

    def upstream(self, name: str) -> UpstreamConfig | None:
        return next((u for u in self.upstreams if u.name == name), None)

    def redacted(self) -> dict[str, Any]:
        """A dump safe for logs and ``/debug``: secrets are read from env and never held here,
        but the env variable names are not secret and help debugging."""
        return typing.cast(dict[str, Any], _plain(self))


def load_config(
    path: Path | None = None, environ: Mapping[str, str] | None = None, *, use_environment: bool = True
) -> Config:
    """Load the config file (or the embedded defaults) and apply ``PULLGATE_*`` overrides
    (``use_environment=False``: the file alone, e.g. checking it for another machine)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config {path}: top level must be a mapping")
        data = loaded or {}
    env = (os.environ if environ is None else environ) if use_environment else {}
    overrides, others = environment.split(env, Config)
    added = environment.apply(data, overrides, _DEFAULTS)
    try:
        config = typing.cast(Config, build(Config, data, ""))
    except ConfigError as exc:
        raise _blame_added_item(exc, added) from None
    if "default_upstream" not in data:
        config = dataclasses.replace(config, default_upstream=_implied_default(config))
    _check(config)
    environment.refuse_unknown(others, set(environment.named_variables(_plain(config))), Config)
    return config


def _blame_added_item(exc: ConfigError, added: Mapping[str, environment.Override]) -> ConfigError:
    """``upstreams[1].name: required`` when ``PULLGATE_UPSTREAMS__1__URL`` added that item:
    say which variable added it, and how many the list had."""
    for path, override in added.items():
        if exc.message.startswith(path + "."):
            return ConfigError(f"{exc.message} (environment {override.variable} adds {path})")
    return exc


def _implied_default(config: Config) -> str | None:
    """An unset ``default_upstream``: the only upstream, else docker.io when configured (Docker
    Hub's short names, ``nginx`` = ``docker.io/library/nginx``); else it must be set."""
    names = [u.name for u in config.upstreams]
    if len(names) == 1:
        return names[0]
    if DEFAULT_UPSTREAM in names or not names:
        return DEFAULT_UPSTREAM
    raise ConfigError(
        f"default_upstream: required with several upstreams ({', '.join(names)}): the upstream for "
        "image names without a registry, or null to require one in every name"
    )


def build(cls: type[Any], data: Any, path: str) -> Any:
    """Build dataclass ``cls`` from ``data``, naming the key path in every error."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{path}.{unknown[0]}" if path else str(unknown[0])
        raise ConfigError(f"{key}: unknown key (allowed: {', '.join(sorted(fields))})")
    missing = [
        name
        for name, f in fields.items()
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        key = f"{path}.{missing[0]}" if path else missing[0]
        raise ConfigError(f"{key}: required")
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
    if config.admission.client_ca is not None and config.admission.tls_cert is None:
        raise ConfigError("admission.client_ca: client certificates need TLS (admission.tls_cert and tls_key)")
    if (config.tls_cert is None) != (config.tls_key is None):
        raise ConfigError("tls_cert: tls_cert and tls_key go together")
    for i, upstream in enumerate(config.upstreams):
        if upstream.password_env and not upstream.username:
            raise ConfigError(f"upstreams[{i}].password_env: needs a username")
    _check_limits(config.limits)
    _check_tuf(config.trust.tuf)
    _check_access(config.access, names)
    check_storage(config.storage)
    check_coordination(config.coordination)
    if config.coordination.type == "redis" and config.storage.type != "s3":
        # Replicas share blobs through the object store; Redis alone would elect one
        # downloader per blob whose bytes the other replicas could not read afterwards.
        raise ConfigError("coordination.type: redis needs storage.type: s3 (the blobs replicas share)")
    if config.storage.max_size and config.coordination.type != "redis":
        # The bucket's image graph and pull times live in Redis: without it no replica can
        # tell which objects a kept image still needs, so the quota would silently not hold.
        raise ConfigError("storage.max_size: needs coordination.type: redis (the cluster-wide image graph)")


def _check_tuf(tuf: TufConfig) -> None:
    for key in ("interval", "timeout"):
        if getattr(tuf, key) <= 0:
            raise ConfigError(f"trust.tuf.{key}: must be more than 0")
    if tuf.url is None:
        for key in ("root", "cache_dir"):
            if getattr(tuf, key) is not None:
                raise ConfigError(f"trust.tuf.{key}: only used with trust.tuf.url (the repository to refresh from)")


def _check_limits(limits: LimitsConfig) -> None:
    for key in ("max_header_size", "max_headers", "max_url_length", "upstream_fetches", "upstream_fetches_per_client"):
        if getattr(limits, key) < 1:
            raise ConfigError(f"limits.{key}: must be at least 1")
    for key in ("idle_timeout", "send_timeout"):
        if getattr(limits, key) <= 0:
            raise ConfigError(f"limits.{key}: must be positive")


def _check_access(access: AccessConfig, upstreams: list[str]) -> None:
    if not access.enabled:
        return
    if not access.rules:
        raise ConfigError("access.rules: access is enabled but no rule grants anything")
    if access.failed_login_limit < 1:
        raise ConfigError("access.failed_login_limit: must be at least 1")
    if not access.realm or '"' in access.realm or "\\" in access.realm:
        raise ConfigError("access.realm: must be non-empty, without quotes or backslashes")
    if access.token_realm is not None and ('"' in access.token_realm or "\\" in access.token_realm):
        raise ConfigError("access.token_realm: must not contain quotes or backslashes")
    if access.token_ttl <= 0:
        raise ConfigError("access.token_ttl: must be positive")
    for name, members in access.groups.items():
        if not members:
            raise ConfigError(f"access.groups.{name}: a group needs at least one user")
    for i, rule in enumerate(access.rules):
        key = f"access.rules[{i}]"
        if not rule.repositories:
            raise ConfigError(f"{key}.repositories: at least one glob is required")
        for glob in rule.repositories:
            first = glob.partition("/")[0]
            if "*" not in first and first not in upstreams:
                raise ConfigError(f"{key}.repositories: {glob!r} does not start with a configured upstream name")
        unknown = sorted(set(rule.groups) - set(access.groups))
        if unknown:
            raise ConfigError(f"{key}.groups: unknown group {unknown[0]!r}")
        if not (rule.users or rule.groups or rule.anonymous):
            raise ConfigError(f"{key}: grants nobody (set users, groups or anonymous)")
        if (rule.users or rule.groups) and access.htpasswd is None and access.tokens is None:
            raise ConfigError(f"{key}.users: no access.htpasswd or access.tokens file to authenticate them")


def _hostport(value: tuple[str, int]) -> str:
    host, port = value
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _hostport(getattr(value, f.name))
            if f.metadata.get("parse") is _split_hostport
            else _plain(getattr(value, f.name))
            for f in dataclasses.fields(value)
        }
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def changed_keys(old: Config, new: Config) -> list[str]:
    """The key paths whose values differ (``cache.tag_ttl``, ``upstreams[1].url``, or
    ``upstreams`` when items were added or removed), e.g. for a reload to name."""
    return sorted(_diff(old.redacted(), new.redacted(), ""))


def _diff(old: Any, new: Any, path: str) -> Iterator[str]:
    if isinstance(old, dict) and isinstance(new, dict) and old.keys() == new.keys():
        for key in old:
            yield from _diff(old[key], new[key], f"{path}.{key}" if path else str(key))
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            yield from _diff(a, b, f"{path}[{i}]")
    elif old != new:
        yield path


_DEFAULTS = {f.name: _plain(getattr(Config(), f.name)) for f in dataclasses.fields(Config)}
