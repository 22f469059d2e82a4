"""Does an image carry the signatures (or attestations) a policy asks for? Finding cosign
signature objects through a ``SignatureSource`` (the mirror implements it over its cache)
and applying a ``SignaturePolicy``: public keys and keyless identities, each counting once
toward ``threshold``.

For each candidate digest (the pulled manifest and the indexes that list it: a signature
on a multi-arch index covers its platform manifests) both formats are looked up at once:
the legacy tag ``sha256-<hex>.sig`` (``.att`` for attestations) and the OCI 1.1 referrers
(``GET /v2/<name>/referrers/<digest>``, falling back to the referrers tag ``sha256-<hex>``,
https://github.com/opencontainers/distribution-spec/blob/main/spec.md#listing-referrers).
Then blobs are fetched concurrently and every object is checked by ``proxy.trust.checks``:
against each key, and once keyless against the trust root (then matched to each identity).

Library choice (issue 14): keyless verification extends this verifier with ``cryptography``
rather than building on sigstore-python 4.x. sigstore-python verifies bundles offline with
a given trusted root, Rekor v2 and RFC 3161 included, but (1) it requires an inclusion proof
with a checkpoint on every log entry, so legacy cosign signatures, whose
``dev.sigstore.cosign/bundle`` annotation holds only a SET (cosign <= v2, what
registry.k8s.io serves), cannot be verified even through ``Bundle.from_parts``; (2) it has
no public-key verification, so keyed bundles (cosign v3 ``--key``) would still need our
path, i.e. two verifiers; (3) it pulls ~20 packages into the daemon (requests, rich,
pydantic, PyJWT, tuf, securesystemslib, rfc3161-client, ...) and ~0.6 s of imports. What it
would have given — chain, SCT, SET, inclusion proof, checkpoint, RFC 3161 — is ~600 lines
here (``certificates``, ``rekor``, ``timestamps``), checked against the real Sigstore
vectors (sigstore-conformance, sigstore-go, containers/image) in the tests.

Errors the source raises (upstream unreachable, ...) propagate: whether to fail open or
closed is the caller's decision. Malformed signature objects are skipped and named in the
result's notes; a signer then reports "no signature found" unless another object said more.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Protocol

from proxy.errors import ConfigError, SignatureInvalid
from proxy.oci.digest import Digest
from proxy.trust import cosign
from proxy.trust.attestations import StatementRequirements
from proxy.trust.bundles import parse_bundle
from proxy.trust.certificates import CertIdentity
from proxy.trust.checks import SIGNATURE, Outcome, Purpose, check, check_keyless
from proxy.trust.cosign import Reason, Signature
from proxy.trust.documents import parse_json
from proxy.trust.identity import KeylessIdentity
from proxy.trust.keys import VerifyingKey, load_public_key
from proxy.trust.trustroot import RootHolder, TrustedRoot

# Reasons whose detail (found vs wanted) belongs in the one-line denial.
_EXPLAINED = frozenset(
    {
        Reason.ISSUER_MISMATCH,
        Reason.IDENTITY_MISMATCH,
        Reason.EXTENSION_MISMATCH,
        Reason.CONDITION_FAILED,
        Reason.TOO_OLD,
        Reason.WRONG_PREDICATE,
        Reason.CERT_NOT_VALID_AT_TIME,
    }
)


class SignatureSource(Protocol):
    """Read access to a repository's signature objects. None means "not there"."""

    async def get_manifest(self, repository: str, reference: str) -> tuple[bytes, str] | None:
        """Manifest bytes and media type for a tag or digest."""

    async def get_blob(self, repository: str, digest: Digest) -> bytes | None: ...

    async def get_referrers(self, repository: str, digest: Digest, artifact_type: str | None) -> dict[str, Any] | None:
        """The referrers index (OCI image index JSON); None when the API is unavailable."""


@dataclass(frozen=True, slots=True)
class SignaturePolicy:
    """Named keys and keyless identities, how many distinct ones must verify, the
    transparency-log key for keyed signatures (if set, each must carry a log entry), the
    trust root for keyless ones, and what is verified: signatures, or attestations of one
    predicate type with ``requirements`` on the statement."""

    keys: Mapping[str, VerifyingKey] = field(default_factory=dict)
    threshold: int = 1
    log_key: VerifyingKey | None = None
    identities: tuple[KeylessIdentity, ...] = ()
    trusted_root: TrustedRoot | RootHolder | None = None  # a holder: the default root, read at each use
    purpose: Purpose = SIGNATURE
    requirements: StatementRequirements | None = None

    def __post_init__(self) -> None:
        signers = len(self.keys) + len(self.identities)
        if not signers:
            raise ConfigError("signature policy: give keys or keyless identities")
        if not 1 <= self.threshold <= signers:
            raise ConfigError(
                f"signature policy: threshold {self.threshold} must be between 1 and the"
                f" number of keys and identities ({signers})"
            )
        if self.identities and self.trusted_root is None:
            raise ConfigError("signature policy: keyless identities need a trusted root")
        seen: dict[str, str] = {}
        for name, key in self.keys.items():
            if key.key_id in seen:  # the threshold counts distinct keys
                raise ConfigError(f"signature policy: keys {seen[key.key_id]!r} and {name!r} are the same")
            seen[key.key_id] = name
        names = [i.name for i in self.identities]
        if len(set(names)) != len(names) or set(names) & set(self.keys):
            raise ConfigError("signature policy: keys and keyless identities need distinct names")
        object.__setattr__(self, "keys", MappingProxyType(dict(self.keys)))

    @classmethod
    def from_pem(
        cls,
        keys: Mapping[str, bytes | str],
        *,
        threshold: int = 1,
        log_key: bytes | str | None = None,
        identities: Sequence[KeylessIdentity] = (),
        trusted_root: TrustedRoot | RootHolder | None = None,
        purpose: Purpose = SIGNATURE,
    ) -> SignaturePolicy:
        loaded = {name: load_public_key(pem, name=f"keys.{name}") for name, pem in keys.items()}
        log = load_public_key(log_key, name="transparency_log_key") if log_key else None
        return cls(loaded, threshold, log, tuple(identities), trusted_root, purpose)

    def root(self) -> TrustedRoot | None:
        """The trusted root to verify with now (a holder's current one)."""
        if isinstance(self.trusted_root, RootHolder):
            return self.trusted_root.current
        return self.trusted_root


@dataclass(frozen=True, slots=True)
class KeyResult:
    """One signer's verdict: a key (``issuer`` empty) or a keyless identity."""

    name: str
    reason: Reason | None  # None: verified
    detail: str = ""  # which object verified, or what the most telling failure was
    identity: CertIdentity | None = None  # keyless: the identity found (verified or the nearest miss)
    issuer: str = ""  # keyless: the issuer the policy wants (bounded: for metric labels)
    why: str = ""  # the failure in a few words, without where it was found

    @property
    def verified(self) -> bool:
        return self.reason is None

    def describe(self) -> str:
        if self.reason is None:
            return f"{self.name}: verified"
        if self.reason in _EXPLAINED and self.why:
            return f"{self.name}: {self.reason} ({self.why})"
        return f"{self.name}: {self.reason}"


@dataclass(frozen=True, slots=True)
class VerificationResult:
    keys: tuple[KeyResult, ...]
    threshold: int
    notes: tuple[str, ...] = field(default=())  # signature objects that could not be used
    payloads: tuple[bytes, ...] = field(default=(), compare=False)  # what verified, for display

    @property
    def verified_keys(self) -> tuple[str, ...]:
        return tuple(k.name for k in self.keys if k.verified)

    @property
    def allowed(self) -> bool:
        return len(self.verified_keys) >= self.threshold

    def message(self, noun: str = "signatures") -> str:
        """One line for an admission response: the count, then each failing signer's reason
        (with what was found and wanted, for identity and attestation mismatches)."""
        count = f"{len(self.verified_keys)} of {self.threshold} required {noun} verified"
        failures = [k.describe() for k in self.keys if k.reason is not None]
        return "; ".join([count, *failures])


def evaluate(
    signatures: Iterable[Signature],
    digests: Collection[Digest],
    policy: SignaturePolicy,
    notes: Sequence[str] = (),
    now: datetime | None = None,
) -> VerificationResult:
    """Apply ``policy`` to signature objects already fetched: pure, no I/O, CPU-bound
    (keyless chains, SCTs and logs: run it off the event loop)."""
    found = tuple(signatures)
    accepted = frozenset(digests)
    when = now or datetime.now(UTC)
    judged: list[tuple[KeyResult, Signature | None]] = []
    root = policy.root()  # once: one verification sees one root, even if a refresh lands meanwhile
    for name, key in policy.keys.items():
        outcomes = [(s, check(s, key, accepted, policy.log_key, policy.purpose, root)) for s in found]
        judged.append(_best(name, outcomes, policy, notes, when, None))
    if policy.identities:
        assert root is not None
        keyless = [(s, check_keyless(s, root, accepted, policy.purpose)) for s in found]
        counted: set[bytes] = set()  # one certificate counts once, however many identities it matches
        for identity in policy.identities:
            verdict = _best(identity.name, keyless, policy, notes, when, identity, counted)
            judged.append(verdict)
            if verdict[1] is not None and verdict[1].certificate is not None:
                counted.add(verdict[1].certificate)
    payloads = tuple(dict.fromkeys(s.payload for _, s in judged if s is not None))
    return VerificationResult(tuple(r for r, _ in judged), policy.threshold, tuple(notes), payloads)


def _best(
    name: str,
    outcomes: list[tuple[Signature, Outcome]],
    policy: SignaturePolicy,
    notes: Sequence[str],
    now: datetime,
    identity: KeylessIdentity | None,
    counted: Collection[bytes] = (),
) -> tuple[KeyResult, Signature | None]:
    """The signer's verdict over every object: the first that verifies (and meets the
    identity and statement requirements), else the failure that got furthest."""
    issuer = identity.issuer.text if identity is not None else ""
    best, why = Outcome(Reason.NO_SIGNATURE, "; ".join(notes)), ""
    for sig, outcome in outcomes:
        if outcome.reason is None:
            unmet = identity.mismatch(outcome.identity) if identity and outcome.identity else None
            if unmet is None and policy.requirements is not None:
                unmet = policy.requirements.unmet(outcome, now)
            if unmet is None and sig.certificate is not None and sig.certificate in counted:
                unmet = (Reason.ALREADY_COUNTED, "the same certificate matched an earlier identity")
            if unmet is None:
                return KeyResult(name, None, outcome.detail, outcome.identity, issuer), sig
            outcome = Outcome(unmet[0], f"{outcome.detail}: {unmet[1]}", outcome.identity)
        if outcome.better_than(best):
            best, why = outcome, outcome.detail.removeprefix(f"{sig.origin}: ")
    return KeyResult(name, best.reason, best.detail, best.identity, issuer, why), None


async def verify_image(
    source: SignatureSource,
    repository: str,
    digests: Sequence[Digest],
    policy: SignaturePolicy,
) -> VerificationResult:
    """Fetch the signature objects of ``digests`` in ``repository`` and apply ``policy``
    (off the event loop).

    ``digests``: every digest a signature may name, e.g. the pulled platform manifest and
    the index the caller saw list it. A signature found for any of them counts if its
    payload names any of them. The source bounds each request; the caller bounds the
    whole lookup (``async with asyncio.timeout(...)``), cancelling the pending fetches.
    """
    signatures, notes = await collect_signatures(source, repository, digests, policy.purpose)
    return await asyncio.to_thread(evaluate, signatures, digests, policy, notes)


_Found = tuple[list[Signature], list[str]]  # signatures, notes about unusable objects


async def collect_signatures(
    source: SignatureSource, repository: str, digests: Sequence[Digest], purpose: Purpose = SIGNATURE
) -> _Found:
    """Every cosign signature object (or attestation) for ``digests``, both formats,
    fetched concurrently."""
    suffix = ".sig" if purpose.predicate_type is None else ".att"
    per_digest = await asyncio.gather(
        *(_legacy(source, repository, d, suffix) for d in dict.fromkeys(digests)),
        *(_bundles(source, repository, d) for d in dict.fromkeys(digests)),
    )
    signatures = [s for found, _ in per_digest for s in found]
    return signatures, [n for _, notes in per_digest for n in notes]


async def _legacy(source: SignatureSource, repository: str, digest: Digest, suffix: str) -> _Found:
    tag = f"{digest.algorithm}-{digest.hex}{suffix}"
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
            index = parse_json(got[0], tag)
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
            return None, None  # another kind of referrer (SBOM, ...)
        blob = await _blob(source, repository, layer)
        if blob is None:
            return None, f"{origin}: blob {layer} not found"
        return parse_bundle(blob, origin), None
    except SignatureInvalid as exc:
        return None, f"{origin}: {exc.message}"


async def _blob(source: SignatureSource, repository: str, digest: Digest) -> bytes | None:
    data = await source.get_blob(repository, digest)
    if data is not None and Digest.of(data, digest.algorithm) != digest:
        return None  # a source that returns other bytes is as good as none
    return data
