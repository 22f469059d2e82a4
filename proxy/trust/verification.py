"""Does an image carry the signatures a policy asks for? Finding cosign signatures through a
``SignatureSource`` (the mirror implements it over its cache) and applying the policy.

For each candidate digest (the pulled manifest and, when the caller knows it, the index
that lists it: a signature on a multi-arch index covers its platform manifests) both
formats are looked up at once: the legacy tag ``sha256-<hex>.sig`` and the OCI 1.1
referrers (``GET /v2/<name>/referrers/<digest>``, falling back to the referrers tag
``sha256-<hex>``, https://github.com/opencontainers/distribution-spec/blob/main/spec.md#listing-referrers).
Then blobs are fetched concurrently and every signature is checked against every key by
the pure functions in ``proxy.trust.cosign``.

Errors the source raises (upstream unreachable, ...) propagate: whether to fail open or
closed is the caller's decision. Malformed signature objects are skipped and named in the
result's notes; a key then reports "no signature found" unless another object said more.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

from proxy.errors import ConfigError, SignatureInvalid
from proxy.oci import jsondoc
from proxy.oci.digest import Digest
from proxy.trust import cosign
from proxy.trust.cosign import REASON_RANK, Outcome, Reason, Signature
from proxy.trust.keys import VerifyingKey, load_public_key


class SignatureSource(Protocol):
    """Read access to a repository's signature objects. None means "not there"."""

    async def get_manifest(self, repository: str, reference: str) -> tuple[bytes, str] | None:
        """Manifest bytes and media type for a tag or digest."""

    async def get_blob(self, repository: str, digest: Digest) -> bytes | None: ...

    async def get_referrers(self, repository: str, digest: Digest, artifact_type: str | None) -> dict[str, Any] | None:
        """The referrers index (OCI image index JSON); None when the API is unavailable."""


@dataclass(frozen=True, slots=True)
class SignaturePolicy:
    """Named keys, how many distinct ones must verify, and the transparency-log key (if
    set, every accepted signature must carry the log's signed entry timestamp)."""

    keys: Mapping[str, VerifyingKey]
    threshold: int = 1
    log_key: VerifyingKey | None = None

    def __post_init__(self) -> None:
        if not self.keys:
            raise ConfigError("signature policy: keys is empty")
        if not 1 <= self.threshold <= len(self.keys):
            raise ConfigError(
                f"signature policy: threshold {self.threshold} must be between 1 and the"
                f" number of keys ({len(self.keys)})"
            )
        seen: dict[str, str] = {}
        for name, key in self.keys.items():
            if key.key_id in seen:  # the threshold counts distinct keys
                raise ConfigError(f"signature policy: keys {seen[key.key_id]!r} and {name!r} are the same")
            seen[key.key_id] = name
        object.__setattr__(self, "keys", MappingProxyType(dict(self.keys)))

    @classmethod
    def from_pem(
        cls,
        keys: Mapping[str, bytes | str],
        *,
        threshold: int = 1,
        log_key: bytes | str | None = None,
    ) -> SignaturePolicy:
        loaded = {name: load_public_key(pem, name=f"keys.{name}") for name, pem in keys.items()}
        log = load_public_key(log_key, name="transparency_log_key") if log_key else None
        return cls(loaded, threshold, log)


@dataclass(frozen=True, slots=True)
class KeyResult:
    name: str
    reason: Reason | None  # None: verified
    detail: str = ""  # which object verified, or what the most telling failure was

    @property
    def verified(self) -> bool:
        return self.reason is None


@dataclass(frozen=True, slots=True)
class VerificationResult:
    keys: tuple[KeyResult, ...]
    threshold: int
    notes: tuple[str, ...] = field(default=())  # signature objects that could not be used

    @property
    def verified_keys(self) -> tuple[str, ...]:
        return tuple(k.name for k in self.keys if k.verified)

    @property
    def allowed(self) -> bool:
        return len(self.verified_keys) >= self.threshold

    def message(self) -> str:
        """One line for an admission response: the count, then each failing key's reason."""
        count = f"{len(self.verified_keys)} of {self.threshold} required signatures verified"
        failures = [f"{k.name}: {k.reason}" for k in self.keys if k.reason is not None]
        return "; ".join([count, *failures])


def evaluate(
    signatures: Iterable[Signature],
    digests: Collection[Digest],
    policy: SignaturePolicy,
    notes: Sequence[str] = (),
) -> VerificationResult:
    """Apply ``policy`` to signatures already fetched: pure, no I/O."""
    found = tuple(signatures)
    accepted = frozenset(digests)
    results = tuple(_key_result(name, key, found, accepted, policy.log_key, notes) for name, key in policy.keys.items())
    return VerificationResult(results, policy.threshold, tuple(notes))


def _key_result(
    name: str,
    key: VerifyingKey,
    signatures: tuple[Signature, ...],
    digests: frozenset[Digest],
    log_key: VerifyingKey | None,
    notes: Sequence[str],
) -> KeyResult:
    best = Outcome(Reason.NO_SIGNATURE, "; ".join(notes))
    for signature in signatures:
        outcome = cosign.check(signature, key, digests, log_key)
        if outcome.reason is None:
            return KeyResult(name, None, outcome.detail)
        if REASON_RANK[outcome.reason] > REASON_RANK[best.reason or Reason.NO_SIGNATURE]:
            best = outcome
    return KeyResult(name, best.reason, best.detail)


async def verify_image(
    source: SignatureSource,
    repository: str,
    digests: Sequence[Digest],
    policy: SignaturePolicy,
) -> VerificationResult:
    """Fetch the signatures of ``digests`` in ``repository`` and apply ``policy``.

    ``digests``: every digest a signature may name, e.g. the pulled platform manifest and
    the index the caller saw list it. A signature found for any of them counts if its
    payload names any of them. The source bounds each request; the caller bounds the
    whole lookup (``async with asyncio.timeout(...)``), cancelling the pending fetches.
    """
    signatures, notes = await collect_signatures(source, repository, digests)
    return evaluate(signatures, digests, policy, notes)


_Found = tuple[list[Signature], list[str]]  # signatures, notes about unusable objects


async def collect_signatures(source: SignatureSource, repository: str, digests: Sequence[Digest]) -> _Found:
    """Every cosign signature object for ``digests``, both formats, fetched concurrently."""
    per_digest = await asyncio.gather(
        *(_legacy(source, repository, d) for d in dict.fromkeys(digests)),
        *(_bundles(source, repository, d) for d in dict.fromkeys(digests)),
    )
    signatures = [s for found, _ in per_digest for s in found]
    return signatures, [n for _, notes in per_digest for n in notes]


async def _legacy(source: SignatureSource, repository: str, digest: Digest) -> _Found:
    tag = f"{digest.algorithm}-{digest.hex}.sig"
    got = await source.get_manifest(repository, tag)
    if got is None:
        return [], []
    try:
        layers = cosign.signature_layers(got[0])
    except SignatureInvalid as exc:
        return [], [f"{tag}: {exc.message}"]
    blobs = await asyncio.gather(*(_blob(source, repository, layer.digest) for layer in layers))
    signatures: list[Signature] = []
    notes = []
    for index, (layer, blob) in enumerate(zip(layers, blobs, strict=True)):
        origin = f"{tag} layer {index}"
        if blob is None:
            notes.append(f"{origin}: payload blob {layer.digest} not found")
        else:
            signatures.append(cosign.simple_signature(layer, blob, origin))
    return signatures, notes


async def _bundles(source: SignatureSource, repository: str, digest: Digest) -> _Found:
    index = await source.get_referrers(repository, digest, cosign.BUNDLE_MEDIA_TYPE)
    tag = f"{digest.algorithm}-{digest.hex}"
    try:
        if index is None:  # no referrers API: the referrers tag schema
            got = await source.get_manifest(repository, tag)
            if got is None:
                return [], []
            index = jsondoc.parse(got[0], tag, error=SignatureInvalid)
        references = cosign.bundle_manifests(index)
    except SignatureInvalid as exc:
        return [], [f"referrers of {digest}: {exc.message}"]
    found = await asyncio.gather(*(_bundle(source, repository, ref) for ref in references))
    return [s for s, _ in found if s is not None], [n for _, n in found if n is not None]


async def _bundle(source: SignatureSource, repository: str, reference: Digest) -> tuple[Signature | None, str | None]:
    origin = f"bundle {reference}"
    got = await source.get_manifest(repository, str(reference))
    if got is None:
        return None, f"{origin}: manifest not found"
    try:
        layer = cosign.bundle_layer(got[0])
        if layer is None:
            return None, None  # another kind of referrer (SBOM, attestation...)
        blob = await _blob(source, repository, layer)
        if blob is None:
            return None, f"{origin}: blob {layer} not found"
        return cosign.parse_bundle(blob, origin), None
    except SignatureInvalid as exc:
        return None, f"{origin}: {exc.message}"


async def _blob(source: SignatureSource, repository: str, digest: Digest) -> bytes | None:
    data = await source.get_blob(repository, digest)
    if data is not None and Digest.of(data, digest.algorithm) != digest:
        return None  # a source that returns other bytes is as good as none
    return data


class VerificationCache:
    """Results by image digest for one signature rule (one policy version: a reload builds
    new rules, so a changed key set never reuses old answers). Successes are trusted for
    ``ttl``, failures only for ``failure_ttl`` so a freshly pushed signature is seen soon.
    Keyed by digest, so a tag moved to an unsigned image is verified afresh."""

    def __init__(self, ttl: float = 600.0, failure_ttl: float = 30.0, max_entries: int = 10_000) -> None:
        self.ttl = ttl
        self.failure_ttl = failure_ttl
        self.max_entries = max_entries
        self._entries: dict[Digest, tuple[float, VerificationResult]] = {}

    def get(self, digest: Digest) -> VerificationResult | None:
        entry = self._entries.get(digest)
        if entry is None or entry[0] <= time.monotonic():
            return None
        return entry[1]

    def put(self, digest: Digest, result: VerificationResult) -> None:
        if len(self._entries) >= self.max_entries:
            now = time.monotonic()
            self._entries = {d: e for d, e in self._entries.items() if e[0] > now}
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
        ttl = self.ttl if result.allowed else self.failure_ttl
        self._entries[digest] = (time.monotonic() + ttl, result)
