"""``pullgate verify IMAGE --key FILE``: check an image's cosign signatures the way
``cosign verify --key`` does, with the same in-process verifier the webhook uses — so a
security team can test keys before writing a policy. Keyless signatures take cosign's
flags: ``--certificate-identity`` (or ``-regexp``, which must match the whole identity)
and ``--certificate-oidc-issuer`` (or ``-regexp``), checked against the Sigstore
public-good trust root shipped with pullgate or ``--trusted-root FILE``.
``--attestation-type TYPE`` verifies attestations of that predicate type instead
(like ``cosign verify-attestation --type``).

Signatures are read through a running mirror (``--mirror URL``; any registry URL works
too) or, without it, through the local cache and the configured upstreams. The verified
payloads are printed as a JSON array (as cosign prints them); the exit code is 1 when fewer
than ``--threshold`` keys verified.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp

from proxy.config.settings import load_config
from proxy.errors import ConfigError, PullgateError, UpstreamError
from proxy.oci import jsondoc
from proxy.oci.digest import Digest
from proxy.oci.mediatypes import UPSTREAM_ACCEPT
from proxy.oci.reference import ImageReference
from proxy.registry.mirror import Mirror
from proxy.trust.checks import SIGNATURE, Purpose
from proxy.trust.identity import KeylessIdentity
from proxy.trust.trustroot import default_trusted_root, load_trusted_root
from proxy.trust.verification import SignaturePolicy, SignatureSource, verify_image

_TIMEOUT = aiohttp.ClientTimeout(total=30, connect=10)
_MAX_BODY = 4 << 20


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "verify",
        help="verify an image's cosign signatures (like cosign verify --key)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("image", help="image reference, e.g. ghcr.io/acme/app:1.0 or ...@sha256:...")
    parser.add_argument("--key", action="append", default=[], type=Path, help="PEM public key (repeatable)")
    parser.add_argument("--threshold", type=int, default=1, help="keys and identities that must verify (default 1)")
    parser.add_argument("--rekor-key", type=Path, help="also require a Rekor entry signed by this key (keyed)")
    identity = parser.add_mutually_exclusive_group()
    identity.add_argument("--certificate-identity", help="keyless: the certificate subject (exact, or a glob with *)")
    identity.add_argument("--certificate-identity-regexp", help="keyless: a regular expression for the subject")
    issuer = parser.add_mutually_exclusive_group()
    issuer.add_argument("--certificate-oidc-issuer", help="keyless: the OIDC issuer (exact, or a glob with *)")
    issuer.add_argument("--certificate-oidc-issuer-regexp", help="keyless: a regular expression for the issuer")
    parser.add_argument("--trusted-root", type=Path, help="Sigstore trusted_root.json (default: the public-good root)")
    parser.add_argument("--attestation-type", help="verify attestations of this predicate type instead of signatures")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--mirror", help="read through this mirror/registry URL, e.g. http://127.0.0.1:5000")
    source.add_argument("--config", type=Path, default=os.environ.get("PULLGATE_CONFIG"), help="use this cache")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        ref = ImageReference.parse(args.image)
        return asyncio.run(_verify(args, ref, _policy(args)))
    except (PullgateError, OSError) as exc:
        print(f"pullgate verify: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2


def _policy(args: argparse.Namespace) -> SignaturePolicy:
    keys = {path.name: path.read_bytes() for path in args.key}
    rekor = args.rekor_key.read_bytes() if args.rekor_key else None
    identities = []
    subject, subject_re = args.certificate_identity, args.certificate_identity_regexp
    issuer, issuer_re = args.certificate_oidc_issuer, args.certificate_oidc_issuer_regexp
    if any((subject, subject_re, issuer, issuer_re)):
        if not (subject or subject_re) or not (issuer or issuer_re):
            raise ConfigError(
                "keyless verification needs --certificate-identity[-regexp] and --certificate-oidc-issuer[-regexp]"
            )
        identities.append(
            KeylessIdentity.of(issuer=issuer, subject=subject, issuer_regexp=issuer_re, subject_regexp=subject_re)
        )
    elif not keys:
        raise ConfigError("give --key, or --certificate-identity and --certificate-oidc-issuer for keyless signatures")
    root = None
    if identities or args.trusted_root:
        root = load_trusted_root(args.trusted_root) if args.trusted_root else default_trusted_root()
    purpose = Purpose(args.attestation_type) if args.attestation_type else SIGNATURE
    return SignaturePolicy.from_pem(
        keys, threshold=args.threshold, log_key=rekor, identities=identities, trusted_root=root, purpose=purpose
    )


async def _verify(args: argparse.Namespace, ref: ImageReference, policy: SignaturePolicy) -> int:
    if args.mirror:
        async with aiohttp.ClientSession(timeout=_TIMEOUT) as session:
            source = HttpSource(session, args.mirror.rstrip("/"), ref.registry)
            return await _report(source, ref, await source.digest(ref), policy)
    mirror = Mirror(load_config(args.config))
    await mirror.open()
    try:
        digest = (await mirror.resolve(ref)).digest
        return await _report(mirror.content(ref), ref, digest, policy)
    finally:
        await mirror.close()


async def _report(source: SignatureSource, ref: ImageReference, digest: Digest, policy: SignaturePolicy) -> int:
    result = await verify_image(source, ref.repository, [digest], policy)
    payloads = [jsondoc.parse(payload, "signature payload") for payload in result.payloads if payload]
    print(json.dumps(payloads, indent=2))
    for signer in result.keys:
        if signer.verified and signer.identity is not None:
            print(f"{signer.name}: signed by {signer.identity.describe()}", file=sys.stderr)
    noun = "signatures" if policy.purpose.predicate_type is None else "attestations"
    print(f"{ref.name}@{digest}: {result.message(noun)}", file=sys.stderr)
    return 0 if result.allowed else 1


class HttpSource:
    """``SignatureSource`` over the distribution API of a mirror (``?ns=`` names the
    image's registry) or of the registry itself."""

    def __init__(self, session: aiohttp.ClientSession, base: str, registry: str) -> None:
        self._session = session
        self._base = base
        self._params = {"ns": registry}

    async def _get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, str]:
        async with self._session.get(f"{self._base}/v2/{path}", params=self._params, headers=headers) as response:
            # read(n) returns what has arrived, not n bytes: read to the end, bounded.
            body = bytearray()
            async for chunk in response.content.iter_chunked(64 << 10):
                body += chunk
                if len(body) > _MAX_BODY:
                    raise PullgateError(f"{path}: response too large")
            return response.status, bytes(body), response.headers.get("Content-Type", "")

    async def digest(self, ref: ImageReference) -> Digest:
        if ref.digest is not None:
            return ref.digest
        status, body, _ = await self._get(f"{ref.repository}/manifests/{ref.tag}", {"Accept": UPSTREAM_ACCEPT})
        if status != 200:
            raise PullgateError(f"{ref}: manifest request answered {status}")
        return Digest.of(body)

    async def get_manifest(self, repository: str, reference: str) -> tuple[bytes, str] | None:
        status, body, media_type = await self._get(f"{repository}/manifests/{reference}", {"Accept": UPSTREAM_ACCEPT})
        return (body, media_type.split(";")[0]) if status == 200 else None

    async def get_blob(self, repository: str, digest: Digest) -> bytes | None:
        status, body, _ = await self._get(f"{repository}/blobs/{digest}")
        return body if status == 200 and Digest.of(body, digest.algorithm) == digest else None

    async def get_referrers(self, repository: str, digest: Digest, artifact_type: str | None) -> dict[str, Any] | None:
        status, body, _ = await self._get(f"{repository}/referrers/{digest}")
        if status != 200:
            return None
        index = jsondoc.parse_object(body, "referrers index", error=UpstreamError)
        return index if index.get("manifests") else None
