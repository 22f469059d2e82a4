"""The error tree: one root, each error knowing its OCI error code and HTTP status.

Codes follow the distribution spec's error table
(https://github.com/opencontainers/distribution-spec/blob/main/spec.md#error-codes);
``UNAVAILABLE`` and ``UNKNOWN`` are Distribution's own additions that clients already
understand. Exceptions travel up unchanged and become JSON bodies only in the HTTP
boundary (``proxy.http.app``'s middleware).
"""

from __future__ import annotations

from typing import Any


class PullgateError(Exception):
    """Root of every error pullgate raises on purpose."""

    code = "UNKNOWN"
    status = 500

    def __init__(self, message: str, *, detail: Any = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            error["detail"] = self.detail
        return {"errors": [error]}


class ConfigError(PullgateError):
    """Bad configuration; raised at startup (or reload) and names the offending key."""


# --- client request errors ---------------------------------------------------------------
class NameInvalid(PullgateError):
    code, status = "NAME_INVALID", 400


class NameUnknown(PullgateError):
    code, status = "NAME_UNKNOWN", 404


class DigestInvalid(PullgateError):
    code, status = "DIGEST_INVALID", 400


class TagInvalid(PullgateError):
    code, status = "MANIFEST_INVALID", 400


class RangeInvalid(PullgateError):
    code, status = "RANGE_INVALID", 416


class Unsupported(PullgateError):
    code, status = "UNSUPPORTED", 405


class Unauthorized(PullgateError):
    code, status = "UNAUTHORIZED", 401


class Denied(PullgateError):
    code, status = "DENIED", 403


class ManifestUnknown(PullgateError):
    code, status = "MANIFEST_UNKNOWN", 404


class BlobUnknown(PullgateError):
    code, status = "BLOB_UNKNOWN", 404


# --- the cache's own state -------------------------------------------------------------
class CatalogUnavailable(PullgateError):
    """The catalog could not take a write in time: another process (``pullgate cache prune``,
    ``import``) holds ``catalog.db``'s write lock past the bound, or SQLite failed. Clients
    retry a 503 with ``Retry-After``; nothing was lost (the write stays queued)."""

    code, status = "UNAVAILABLE", 503

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class CatalogLocked(CatalogUnavailable):
    """Another process held ``catalog.db``'s write lock for longer than we wait."""


# --- upstream errors ---------------------------------------------------------------------
class UpstreamError(PullgateError):
    """The upstream answered something unusable (garbage, unexpected status)."""

    code, status = "UNKNOWN", 502


class UpstreamUnavailable(UpstreamError):
    """Could not reach the upstream (connect error, timeout, 5xx after retries)."""

    code, status = "UNAVAILABLE", 503


class UpstreamRateLimited(UpstreamError):
    code, status = "TOOMANYREQUESTS", 429


class UpstreamDenied(UpstreamError):
    """The upstream refused our credentials (401/403 after the token flow)."""

    code, status = "UNAUTHORIZED", 502


class ManifestInvalid(UpstreamError):
    """A manifest that is too large, not JSON, or not a manifest at all."""

    code, status = "MANIFEST_INVALID", 502


class DigestMismatch(UpstreamError):
    """Bytes from upstream whose digest is not the one asked for: never cached or served."""

    code, status = "DIGEST_INVALID", 502


# --- signatures --------------------------------------------------------------------------
class KeyUnsupported(ConfigError):
    """A verification key that is not a PEM public key of a type cosign signs with."""


class SignatureInvalid(UpstreamError):
    """A signature object from upstream that is not shaped as cosign writes it."""

    code, status = "MANIFEST_INVALID", 502
