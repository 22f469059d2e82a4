"""The ``storage:`` and ``coordination:`` blocks: where blobs live (local disk, or an S3-API
object store shared by replicas) and how replicas agree (local SQLite, or Redis).

Secrets never sit in the config: ``access_key_env``/``secret_key_env``/``password_env`` name
environment variables, read when a client is opened. ``check_storage`` and
``check_coordination`` raise ``ConfigError`` naming the bad key; ``load_config`` calls them.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from proxy.config.units import parse_duration, parse_size
from proxy.errors import ConfigError

# S3 bucket naming rules (https://docs.aws.amazon.com/AmazonS3/latest/userguide/bucketnamingrules.html),
# the strict DNS-compatible form every engine accepts.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_PREFIX_CHARS = re.compile(r"^[A-Za-z0-9!_.*'()/-]*$")  # S3's "safe characters" for keys
_KEY_PREFIX_CHARS = re.compile(r"^[A-Za-z0-9:_.{}/-]+$")
MIN_PART_SIZE = 5 << 20  # S3 multipart: every part but the last is 5 MiB .. 5 GiB
MAX_PART_SIZE = 5 << 30
MAX_PRESIGN_TTL = 7 * 24 * 3600.0  # SigV4 presigned URLs live at most 7 days


def _duration(default: str) -> Any:
    return field(default=parse_duration(default), metadata={"parse": parse_duration})


def _size(default: str) -> Any:
    return field(default=parse_size(default), metadata={"parse": parse_size})


def _optional(parse: Callable[[Any], str]) -> Callable[[Any], str | None]:
    return lambda value: None if value is None else parse(value)


def _url(value: Any, schemes: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a {' or '.join(s + '://' for s in schemes)} URL, got {value!r}")
    parts = urlsplit(value)
    if parts.username or parts.password:
        # Never echo it: the error would put the secret in logs and terminals.
        raise ValueError("the URL must not carry credentials (name environment variables instead)")
    if parts.scheme not in schemes or not (parts.hostname or (parts.scheme == "unix" and parts.path)):
        raise ValueError(f"expected a {' or '.join(s + '://' for s in schemes)} URL, got {value!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"the URL must not carry a query or a fragment: {value!r}")
    return value


def _endpoint(value: Any) -> str:
    url = _url(value, ("http", "https")).rstrip("/")
    if urlsplit(url).path:
        # Buckets are addressed path-style by the client: a path here would be taken as a key.
        raise ValueError(f"the endpoint must not have a path: {value!r}")
    return url


def _redis_url(value: Any) -> str:
    url = _url(value, ("redis", "rediss", "unix"))
    parts = urlsplit(url)
    if parts.scheme != "unix" and parts.path.strip("/") and not parts.path.strip("/").isdigit():
        raise ValueError(f"the path of a redis URL is a database number: {value!r}")
    return url


def _prefix(value: Any) -> str:
    """A key prefix inside the bucket, normalized to end with ``/`` (or empty)."""
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    if value.startswith("/") or "//" in value or any(p in (".", "..") for p in value.split("/")):
        raise ValueError(f"must be a relative key prefix like cache/ (no leading /, // or ..): {value!r}")
    if not _PREFIX_CHARS.match(value):
        raise ValueError(f"use letters, digits and !_.*'()/- only: {value!r}")
    return value if not value or value.endswith("/") else value + "/"


@dataclass(frozen=True)
class StorageConfig:
    """``type: filesystem`` keeps blobs under ``cache.dir`` (the default); ``type: s3`` in a
    bucket of any S3-API store, shared by every replica, with ``cache.dir`` as a local tier."""

    type: Literal["filesystem", "s3"] = "filesystem"
    endpoint: str | None = field(default=None, metadata={"parse": _optional(_endpoint)})  # None: AWS S3
    bucket: str | None = None
    region: str = "us-east-1"
    prefix: str = field(default="", metadata={"parse": _prefix})
    access_key_env: str | None = None  # neither set: the AWS default chain (IRSA, instance role)
    secret_key_env: str | None = None
    redirect: bool = False  # blob GETs answer 307 to a presigned URL of the object
    redirect_ttl: float = _duration("10m")
    part_size: int = _size("16MiB")  # multipart part; an upload holds about three in memory
    timeout: float = _duration("30s")  # one S3 request, including botocore's retries
    # Quota of the bucket, kept by whole-image LRU eviction on one replica at a time (needs
    # coordination: redis). 0: unlimited — the bucket's size is the operator's budget, and
    # without Redis no replica knows the whole image graph to evict safely.
    max_size: int = _size("0")

    def credentials(self, environ: Mapping[str, str] | None = None) -> tuple[str, str] | None:
        """The access key pair from the environment (never stored in the config)."""
        env = os.environ if environ is None else environ
        if self.access_key_env is None or self.secret_key_env is None:
            return None
        access, secret = env.get(self.access_key_env), env.get(self.secret_key_env)
        if not access or not secret:
            missing = self.access_key_env if not access else self.secret_key_env
            raise ConfigError(f"storage: environment variable {missing} is not set")
        return access, secret


@dataclass(frozen=True)
class CoordinationConfig:
    """``type: local`` (one replica: SQLite next to the cache, the default) or ``type: redis``
    (tags, leases and shared state for several replicas)."""

    type: Literal["local", "redis"] = "local"
    url: str | None = field(default=None, metadata={"parse": _optional(_redis_url)})
    username: str | None = None  # Redis ACL user (6.0+); None: the default user
    password_env: str | None = None
    key_prefix: str = "pullgate:"
    timeout: float = _duration("2s")  # one Redis command (connect included)
    lease_ttl: float = _duration("30s")  # a download lease expires unless renewed (every third of it)
    # Where the other replicas reach this one's peer endpoint (streaming a blob while it
    # downloads here), e.g. http://$(POD_IP):5000. None: no peer streaming; replicas wait
    # for the downloader and read the object store.
    advertise_url: str | None = field(default=None, metadata={"parse": _optional(_endpoint)})

    def password(self, environ: Mapping[str, str] | None = None) -> str | None:
        env = os.environ if environ is None else environ
        if self.password_env is None:
            return None
        value = env.get(self.password_env)
        if not value:
            raise ConfigError(f"coordination.password_env: environment variable {self.password_env} is not set")
        return value


def _non_default(config: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(config) if f.name != "type" and getattr(config, f.name) != f.default]


def check_storage(storage: StorageConfig, key: str = "storage") -> None:
    if storage.type == "filesystem":
        extra = _non_default(storage)
        if extra:
            raise ConfigError(f"{key}.{extra[0]}: only for type s3 (type is filesystem)")
        return
    if storage.bucket is None:
        raise ConfigError(f"{key}.bucket: required for type s3")
    if not _BUCKET.match(storage.bucket) or ".." in storage.bucket:
        raise ConfigError(f"{key}.bucket: not a valid bucket name (3-63 of a-z 0-9 . -): {storage.bucket!r}")
    if not storage.region or not re.fullmatch(r"[a-z0-9-]+", storage.region):
        raise ConfigError(f"{key}.region: expected a region name like us-east-1, got {storage.region!r}")
    if (storage.access_key_env is None) != (storage.secret_key_env is None):
        raise ConfigError(f"{key}.access_key_env: access_key_env and secret_key_env go together")
    if not MIN_PART_SIZE <= storage.part_size <= MAX_PART_SIZE:
        raise ConfigError(f"{key}.part_size: must be between 5MiB and 5GiB")
    if storage.timeout <= 0:
        raise ConfigError(f"{key}.timeout: must be positive")
    if storage.max_size and storage.max_size < MIN_PART_SIZE:
        raise ConfigError(f"{key}.max_size: 0 (unlimited) or at least 5MiB")
    if not 1 <= storage.redirect_ttl <= MAX_PRESIGN_TTL:
        raise ConfigError(f"{key}.redirect_ttl: must be between 1s and 7d (the limit of presigned URLs)")


def check_coordination(coordination: CoordinationConfig, key: str = "coordination") -> None:
    if coordination.type == "local":
        extra = _non_default(coordination)
        if extra:
            raise ConfigError(f"{key}.{extra[0]}: only for type redis (type is local)")
        return
    if coordination.url is None:
        raise ConfigError(f"{key}.url: required for type redis")
    if not _KEY_PREFIX_CHARS.match(coordination.key_prefix):
        raise ConfigError(f"{key}.key_prefix: use letters, digits and :_.{{}}/- only, got {coordination.key_prefix!r}")
    if coordination.timeout <= 0:
        raise ConfigError(f"{key}.timeout: must be positive")
    if coordination.lease_ttl < 3 * coordination.timeout:
        # Renewals run every third of the TTL and may take a whole timeout each.
        raise ConfigError(f"{key}.lease_ttl: must be at least three times {key}.timeout")
