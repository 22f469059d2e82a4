"""What ``pullgate serve`` checks before it starts, beyond the config's own keys: the files
the config names exist and load (TLS certificates and keys, htpasswd and tokens files, the
policies), and the environment variables it names as secrets are set. ``serve`` runs it and
refuses to start on any problem; ``pullgate config check`` runs the very same function, so a
config that passes the check is one ``serve`` accepts.

Each check calls the loader the daemon itself uses (``ReloadingTLS``, ``CredentialFiles`` /
``Access``, ``load_policies``); nothing here re-implements a format.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import structlog
from prometheus_client import CollectorRegistry

from proxy.access.control import Access, CredentialFiles
from proxy.config.settings import Config
from proxy.errors import ConfigError
from proxy.http.tls import ReloadingTLS
from proxy.ops.metrics import Metrics
from proxy.policy.active import load_policies


def preflight(config: Config, *, environment: bool = True) -> list[str]:
    """Every problem, as ``key: what is wrong`` lines (empty: ``serve`` will start).
    ``environment=False`` skips what depends on this machine's environment variables (for
    a config meant for another machine)."""
    checks: list[Callable[[], None]] = [
        lambda: _tls(config),
        lambda: _access(config, environment),
        lambda: _policies(config),
    ]
    problems = []
    for check in checks:
        try:
            check()
        except ConfigError as exc:
            problems.append(exc.message)
    if environment:
        problems += list(_unset_secrets(config))
    return problems


def _tls(config: Config) -> None:
    log, metrics = structlog.get_logger("pullgate.preflight"), Metrics(CollectorRegistry())
    if config.tls_cert is not None and config.tls_key is not None:
        ReloadingTLS(config.tls_cert, config.tls_key, log, metrics, name="mirror")
    admission = config.admission
    if admission.enabled and admission.tls_cert is not None and admission.tls_key is not None:
        ReloadingTLS(
            admission.tls_cert, admission.tls_key, log, metrics, name="admission", client_ca=admission.client_ca
        )


def _access(config: Config, environment: bool) -> None:
    if not config.access.enabled:
        return
    if environment:  # the credential files and the token signing key from the environment
        Access(config.access, Metrics(CollectorRegistry()))
    else:
        CredentialFiles(config.access.htpasswd, config.access.tokens)


def _policies(config: Config) -> None:
    if config.policies is None:
        return
    try:
        load_policies(config.policies)
    except OSError as exc:
        raise ConfigError(f"policies: cannot read {config.policies}: {exc.strerror or exc}") from exc
    except ConfigError as exc:
        raise ConfigError(f"policies: {exc.message}") from exc


def _unset_secrets(config: Config) -> Iterator[str]:
    for i, upstream in enumerate(config.upstreams):
        if upstream.password_env and not os.environ.get(upstream.password_env):
            yield f"upstreams[{i}].password_env: ${upstream.password_env} is not set"
