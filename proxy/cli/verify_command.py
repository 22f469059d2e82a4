"""``pullgate verify IMAGE``: an image's cosign signatures (keyed or keyless) or
attestations checked by the webhook's own verifier, read through a mirror, a config's cache
or the upstreams (``DESCRIPTION`` is the user's account)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

from proxy.cli import logs_to_stderr
from proxy.config.settings import load_config
from proxy.errors import ConfigError, PullgateError, UpstreamError
from proxy.oci import jsondoc
from proxy.oci.digest import Digest
from proxy.oci.mediatypes import UPSTREAM_ACCEPT
from proxy.oci.reference import ImageReference
from proxy.registry.mirror import Mirror
from proxy.trust.checks import SIGNATURE, Purpose
from proxy.trust.identity import KeylessIdentity
from proxy.trust.keys import load_public_key
from proxy.trust.trustroot import default_trusted_root, load_trusted_root
from proxy.trust.verification import SignaturePolicy, SignatureSource, verify_image

DESCRIPTION = """\
Check an image's cosign signatures the way 'cosign verify' does, with the same in-process
verifier the webhook uses, so a security team can test keys and identities before writing
a policy. Keyed: --key FILE (repeatable). Keyless: cosign's flags --certificate-identity (or
-regexp, which must match the whole identity) and --certificate-oidc-issuer (or -regexp),
checked against the Sigstore public-good trust root shipped with pullgate or --trusted-root
FILE. --attestation-type TYPE verifies attestations of that predicate type instead (like
'cosign verify-attestation --type').

Signatures are read through a running mirror (--mirror URL; any registry URL works too),
through the cache and upstreams of a config (--config), or, with neither, straight from the
upstreams of the embedded defaults through a throwaway cache. The verified payloads are
printed on stdout as a JSON array (as cosign prints them), the verdict on stderr. Exit code:
0 when --threshold keys or identities verified, 1 when fewer did, 2 when it could not be
checked (unreadable key, image not found, mirror unreachable).
"""

_TIMEOUT = aiohttp.ClientTimeout(total=30, connect=10)
_MAX_BODY = 4 << 20
_CHUNK = 64 << 10


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "verify",
        help="verify an image's cosign signatures (like cosign verify --key)",
        description=DESCRIPTION,
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
    source.add_argument(
        "--config",
        type=Path,
        default=os.environ.get("PULLGATE_CONFIG") or None,
        help="read through this config's cache and upstreams (default: $PULLGATE_CONFIG)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        ref = ImageReference.parse(args.image)
        policy = _policy(args)
        with logs_to_stderr():  # stdout is the JSON alone
            return asyncio.run(_verify(args, ref, policy))
    except (PullgateError, OSError) as exc:
        print(f"pullgate verify: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2


def _policy(args: argparse.Namespace) -> SignaturePolicy:
    # Keys named as the user gave them (``--key keys/ci.pub``), in errors and the verdict.
    keys = {str(path): path.read_bytes() for path in args.key}
    for path, pem in keys.items():
        load_public_key(pem, name=f"--key {path}")  # a bad file is named as the user wrote it
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
    if args.config:
        return await _through_cache(load_config(Path(args.config)), ref, policy)
    # No cache named: one that lives as long as this command, not ./pullgate-cache.
    with tempfile.TemporaryDirectory(prefix="pullgate-verify-") as tmp:
        config = load_config(None, {**os.environ, "PULLGATE_CACHE__DIR": tmp})
        return await _through_cache(config, ref, policy)


async def _through_cache(config: Any, ref: ImageReference, policy: SignaturePolicy) -> int:
    mirror = Mirror(config)
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
        url = f"{self._base}/v2/{path}"
        try:
            async with self._session.get(url, params=self._params, headers=headers) as response:
                # The whole body: one read() returns only what has arrived so far, and a
                # mirror streams a blob it is still fetching in chunks.
                body = bytearray()
                async for chunk in response.content.iter_chunked(_CHUNK):
                    body += chunk
                    if len(body) > _MAX_BODY:
                        raise PullgateError(f"{url}: response larger than {_MAX_BODY} bytes")
                return response.status, bytes(body), response.headers.get("Content-Type", "")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise PullgateError(f"{self._base}: {_describe(exc)}") from exc

    async def digest(self, ref: ImageReference) -> Digest:
        if ref.digest is not None:
            return ref.digest
        status, body, _ = await self._get(f"{ref.repository}/manifests/{ref.tag}", {"Accept": UPSTREAM_ACCEPT})
        if status != 200:
            raise PullgateError(f"{ref}: {self._base} answered {status}{_error_text(body)}")
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


def _error_text(body: bytes) -> str:
    """The distribution spec's ``{"errors": [{"code", "message"}]}``, as `` CODE: message``."""
    try:
        errors = jsondoc.parse_object(body, "error body")["errors"]
        return "".join(f" {e['code']}: {e.get('message', '')}" for e in errors[:3])
    except (PullgateError, KeyError, TypeError):
        return ""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {_TIMEOUT.total:.0f}s"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect ({exc.os_error.strerror or exc.os_error})"
    return f"{type(exc).__name__}: {exc}"
