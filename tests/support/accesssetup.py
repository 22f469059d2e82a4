"""The two-upstream access setup the end-to-end access tests share: a public upstream whose
``anonymous`` pattern anyone may pull, and a private one (``ghcr.io``, behind the token
issuer, credentials held by the mirror) that only ``alice`` may pull."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config.settings import AccessConfig, AccessRule, CacheConfig, Config, TimeoutConfig, UpstreamConfig
from tests.support.registry import Registry
from tests.support.tokenserver import TokenServer

ALICE = ("alice", "correct horse battery")
ALICE_HASH = "$2y$05$yUu3giJw8xQTj8/1Y5xUfO0MfqeaBHkJgXz49OR8laMd.qY9O4RSK"  # bcrypt of ALICE's password


def public_and_private_config(
    tmp_path: Path,
    public_url: str,
    private: Registry,
    token_server: TokenServer,
    monkeypatch: pytest.MonkeyPatch,
    *,
    anonymous: str,
) -> Config:
    """Config for that setup; ``anonymous`` is the public pattern anyone may pull."""
    user, password = token_server.creds
    monkeypatch.setenv("PULLGATE_TEST_PRIVATE_PASSWORD", password)
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"{ALICE[0]}:{ALICE_HASH}\n")
    return Config(
        cache=CacheConfig(dir=tmp_path / "cache"),
        upstreams=(
            UpstreamConfig("docker.io", public_url),
            UpstreamConfig(
                "ghcr.io",
                private.url,
                username=user,
                password_env="PULLGATE_TEST_PRIVATE_PASSWORD",
                auth_hosts=(token_server.url,),  # the token issuer's origin: another port of 127.0.0.1
            ),
        ),
        default_upstream="docker.io",
        timeouts=TimeoutConfig(connect=5, read=30, manifest=10, retries=1, backoff=0.05),
        access=AccessConfig(
            enabled=True,
            htpasswd=htpasswd,
            rules=(
                AccessRule(repositories=(anonymous,), anonymous=True),
                AccessRule(repositories=("ghcr.io/acme/**",), users=("alice",)),
            ),
        ),
    )
