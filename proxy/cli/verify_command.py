"""``pullgate verify IMAGE --key FILE``: check an image's cosign signatures the way
``cosign verify --key`` does, with the same in-process verifier the webhook uses — so a
security team can test keys before writing a policy.

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
from proxy.errors import PullgateError, UpstreamError
from proxy.oci import jsondoc
from proxy.oci.digest import Digest
from proxy.oci.mediatypes import UPSTREAM_ACCEPT
from proxy.oci.reference import ImageReference
from proxy.registry.mirror import Mirror
from proxy.trust import cosign
from proxy.trust.verification import SignaturePolicy, SignatureSource, collect_signatures, evaluate

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
    parser.add_argument("--key", action="append", required=True, type=Path, help="PEM public key (repeatable)")
    parser.add_argument("--threshold", type=int, default=1, help="distinct keys that must verify (default 1)")
    parser.add_argument("--rekor-key", type=Path, help="also require a Rekor entry signed by this key")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--mirror", help="read through this mirror/registry URL, e.g. http://127.0.0.1:5000")
    source.add_argument("--config", type=Path, default=os.environ.get("PULLGATE_CONFIG"), help="use this cache")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        ref = ImageReference.parse(args.image)
        keys = {path.name: path.read_bytes() for path in args.key}
        rekor = args.rekor_key.read_bytes() if args.rekor_key else None
        policy = SignaturePolicy.from_pem(keys, threshold=args.threshold, log_key=rekor)
        return asyncio.run(_verify(args, ref, policy))
    except (PullgateError, OSError) as exc:
        print(f"pullgate verify: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2


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
    signatures, notes = await collect_signatures(source, ref.repository, [digest])
    result = evaluate(signatures, [digest], policy, notes)
    payloads = [
        jsondoc.parse(sig.payload, "signature payload")
        for sig in signatures
        if any(cosign.check(sig, key, [digest], policy.log_key).reason is None for key in policy.keys.values())
    ]
    print(json.dumps(payloads, indent=2))
    print(f"{ref.name}@{digest}: {result.message()}", file=sys.stderr)
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
            body = await response.content.read(_MAX_BODY + 1)
            if len(body) > _MAX_BODY:
                raise PullgateError(f"{path}: response too large")
            return response.status, body, response.headers.get("Content-Type", "")

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
