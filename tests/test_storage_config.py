"""The ``storage:`` and ``coordination:`` blocks: defaults, parsing, and errors that name the
bad key — including the ways a secret could slip into the config or a key into the bucket."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.config.settings import build, load_config
from proxy.config.storage import CoordinationConfig, StorageConfig, check_coordination, check_storage
from proxy.errors import ConfigError

S3 = {"type": "s3", "endpoint": "http://127.0.0.1:8333", "bucket": "pullgate"}


def storage(data: dict[str, Any]) -> StorageConfig:
    config: StorageConfig = build(StorageConfig, data, "storage")
    check_storage(config)
    return config


def coordination(data: dict[str, Any]) -> CoordinationConfig:
    config: CoordinationConfig = build(CoordinationConfig, data, "coordination")
    check_coordination(config)
    return config


@pytest.mark.parametrize(
    ("data", "expected", "error"),
    [
        ({}, {"type": "filesystem"}, None),
        (
            {**S3, "prefix": "cache", "redirect": True, "redirect_ttl": "15m", "part_size": "8MiB"},
            {"prefix": "cache/", "redirect": True, "redirect_ttl": 900.0, "part_size": 8 << 20, "region": "us-east-1"},
            None,
        ),
        ({**S3, "endpoint": "https://s3.example:443/"}, {"endpoint": "https://s3.example:443"}, None),
        ({**S3, "endpoint": None}, {"endpoint": None}, None),  # AWS S3 by region
        ({**S3, "prefix": "a/b/"}, {"prefix": "a/b/"}, None),
        ({**S3, "access_key_env": "S3_ACCESS_KEY", "secret_key_env": "S3_SECRET_KEY"}, {}, None),
        ({"type": "gcs"}, None, "storage.type: must be one of filesystem, s3"),
        ({"type": "filesystem", "bucket": "x"}, None, "storage.bucket: only for type s3"),
        ({"type": "filesystem", "redirect": True}, None, "storage.redirect: only for type s3"),
        ({"type": "s3"}, None, "storage.bucket: required for type s3"),
        ({**S3, "bucket": "Pullgate"}, None, "storage.bucket: not a valid bucket name"),
        ({**S3, "bucket": "a..b"}, None, "storage.bucket: not a valid bucket name"),
        ({**S3, "bucket": "ab"}, None, "storage.bucket: not a valid bucket name"),
        ({**S3, "endpoint": "ftp://s3.example"}, None, "storage.endpoint: expected a http:// or https:// URL"),
        ({**S3, "endpoint": "https://s3.example/bucket"}, None, "storage.endpoint: the endpoint must not have a path"),
        ({**S3, "endpoint": "https://s3.example?x=1"}, None, "storage.endpoint: the URL must not carry a query"),
        ({**S3, "endpoint": "https://AKIA:hunter2hunter2@s3.example"}, None, "storage.endpoint: the URL must not"),
        ({**S3, "prefix": "/cache/"}, None, "storage.prefix: must be a relative key prefix"),
        ({**S3, "prefix": "a//b"}, None, "storage.prefix: must be a relative key prefix"),
        ({**S3, "prefix": "a/../b"}, None, "storage.prefix: must be a relative key prefix"),
        ({**S3, "prefix": "a b"}, None, "storage.prefix: use letters"),
        ({**S3, "prefix": "caché"}, None, "storage.prefix: use letters"),
        ({**S3, "access_key_env": "S3_ACCESS_KEY"}, None, "storage.access_key_env: access_key_env and secret_key_env"),
        ({**S3, "part_size": "1MiB"}, None, "storage.part_size: must be between 5MiB and 5GiB"),
        ({**S3, "redirect_ttl": "8d"}, None, "storage.redirect_ttl: must be between 1s and 7d"),
        ({**S3, "redirect_ttl": 0}, None, "storage.redirect_ttl: must be between 1s and 7d"),
        ({**S3, "timeout": 0}, None, "storage.timeout: must be positive"),
        ({**S3, "region": "US East"}, None, "storage.region: expected a region name"),
        ({**S3, "secret_key": "x"}, None, "storage.secret_key: unknown key"),
        ({**S3}, {"max_size": 0}, None),  # unlimited by default
        ({**S3, "max_size": "2TiB"}, {"max_size": 2 << 40}, None),
        ({**S3, "max_size": "1MiB"}, None, "storage.max_size: 0 (unlimited) or at least 5MiB"),
        ({**S3, "max_size": "lots"}, None, "storage.max_size: not a size"),
        ({"type": "filesystem", "max_size": "1GiB"}, None, "storage.max_size: only for type s3"),
    ],
)
def test_storage_config(data: dict[str, Any], expected: dict[str, Any] | None, error: str | None) -> None:
    if error is not None:
        with pytest.raises(ConfigError) as info:
            storage(data)
        assert str(info.value).startswith(error)
        assert "hunter2" not in str(info.value)
        return
    config = storage(data)
    for key, value in (expected or {}).items():
        assert getattr(config, key) == value


@pytest.mark.parametrize(
    ("environ", "expected", "error"),
    [
        ({"S3_ACCESS_KEY": "AKIAEXAMPLE", "S3_SECRET_KEY": "s3cr3t-value"}, ("AKIAEXAMPLE", "s3cr3t-value"), None),
        ({"S3_ACCESS_KEY": "AKIAEXAMPLE"}, None, "storage: environment variable S3_SECRET_KEY is not set"),
        ({"S3_ACCESS_KEY": "", "S3_SECRET_KEY": "x"}, None, "storage: environment variable S3_ACCESS_KEY is not set"),
    ],
)
def test_storage_credentials_come_from_the_environment(
    environ: dict[str, str], expected: tuple[str, str] | None, error: str | None
) -> None:
    config = storage({**S3, "access_key_env": "S3_ACCESS_KEY", "secret_key_env": "S3_SECRET_KEY"})
    if error is not None:
        with pytest.raises(ConfigError, match=error):
            config.credentials(environ)
    else:
        assert config.credentials(environ) == expected
    assert storage(S3).credentials(environ) is None  # none named: the AWS default chain


@pytest.mark.parametrize(
    ("data", "expected", "error"),
    [
        ({}, {"type": "local"}, None),
        ({"type": "redis", "url": "redis://redis.pullgate:6379/0"}, {"key_prefix": "pullgate:", "lease_ttl": 30}, None),
        ({"type": "redis", "url": "rediss://redis:6380", "username": "pullgate", "password_env": "REDIS_PASSWORD"},
         {"username": "pullgate"}, None),
        ({"type": "redis", "url": "unix:///run/redis.sock"}, {}, None),
        ({"type": "redis", "url": "redis://r:6379", "timeout": "500ms", "lease_ttl": "2s"}, {"timeout": 0.5}, None),
        ({"type": "etcd"}, None, "coordination.type: must be one of local, redis"),
        ({"type": "redis"}, None, "coordination.url: required for type redis"),
        ({"type": "local", "url": "redis://r:6379"}, None, "coordination.url: only for type redis"),
        ({"type": "redis", "url": "http://r:6379"}, None, "coordination.url: expected a redis://"),
        ({"type": "redis", "url": "redis://:hunter2hunter2@r:6379"}, None, "coordination.url: the URL must not carry"),
        ({"type": "redis", "url": "redis://r:6379/cache"}, None, "coordination.url: the path of a redis URL"),
        ({"type": "redis", "url": "redis://r:6379", "key_prefix": ""}, None, "coordination.key_prefix: use letters"),
        ({"type": "redis", "url": "redis://r:6379", "key_prefix": "a b"}, None, "coordination.key_prefix: use letters"),
        ({"type": "redis", "url": "redis://r", "lease_ttl": "5s"}, None, "coordination.lease_ttl: must be at least"),
        ({"type": "redis", "url": "redis://r", "timeout": 0}, None, "coordination.timeout: must be positive"),
    ],
)
def test_coordination_config(data: dict[str, Any], expected: dict[str, Any] | None, error: str | None) -> None:
    if error is not None:
        with pytest.raises(ConfigError) as info:
            coordination(data)
        assert str(info.value).startswith(error)
        assert "hunter2" not in str(info.value)
        return
    config = coordination(data)
    for key, value in (expected or {}).items():
        assert getattr(config, key) == value


def test_redis_password_comes_from_the_environment() -> None:
    config = coordination({"type": "redis", "url": "redis://r:6379", "password_env": "REDIS_PASSWORD"})
    assert config.password({"REDIS_PASSWORD": "pw-from-env"}) == "pw-from-env"
    with pytest.raises(ConfigError, match=r"coordination\.password_env: environment variable REDIS_PASSWORD"):
        config.password({})
    assert coordination({"type": "redis", "url": "redis://r:6379"}).password({}) is None


@pytest.mark.parametrize(
    ("yaml_text", "environ", "error"),
    [
        ("", {}, None),
        ("storage: {type: filesystem}\ncoordination: {type: local}\n", {}, None),
        ("storage: {type: s3}\n", {}, "storage.bucket: required for type s3"),
        ("storage: {type: s3, bucket: pullgate}\n", {}, None),
        ("storage: {type: s3, bucket: pullgate}\ncoordination: {type: redis, url: 'redis://r:6379',"
         " advertise_url: 'http://10.0.0.7:5000'}\n", {}, None),
        ("storage: {type: s3, bucket: pullgate}\ncoordination: {type: redis, url: 'redis://r:6379',"
         " advertise_url: 'http://10.0.0.7:5000/x'}\n", {}, "coordination.advertise_url: the endpoint must not have"),
        ("", {"PULLGATE_COORDINATION__TYPE": "redis"}, "coordination.url: required for type redis"),
        ("coordination: {type: redis, url: 'redis://r:6379'}\n", {},
         "coordination.type: redis needs storage.type: s3"),
        ("storage: {type: filesystem, bucket: x}\n", {}, "storage.bucket: only for type s3"),
        ("storage: {type: s3, bucket: pullgate, max_size: 1TiB}\n", {},
         "storage.max_size: needs coordination.type: redis"),
        ("storage: {type: s3, bucket: pullgate, max_size: 1TiB}\ncoordination: {type: redis, url: 'redis://r:6379'}\n",
         {}, None),
    ],
)
def test_blocks_in_the_config_file(tmp_path: Path, yaml_text: str, environ: dict[str, str], error: str | None) -> None:
    path = tmp_path / "pullgate.yaml"
    path.write_text(yaml_text)
    if error is not None:
        with pytest.raises(ConfigError) as info:
            load_config(path, environ)
        assert str(info.value).startswith(error)
        return
    config = load_config(path, environ)
    if "s3" not in yaml_text:
        assert (config.storage, config.coordination) == (StorageConfig(), CoordinationConfig())
    assert config.redacted()["storage"]["type"] == ("s3" if "s3" in yaml_text else "filesystem")
