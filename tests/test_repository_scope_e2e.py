"""Issue 13, finding 1: private cached content must not leak through a public repository.

The attack, mounted against real registries: user alice pulls a private image through the
mirror (``ghcr.io`` -> Distribution behind the token issuer), so its manifest, config and
layers are in the shared store. An attacker then pushes to a *public* repository of the
public upstream (``docker.io`` -> Distribution configured with
``validation.manifests.urls.allow``, which accepts layers that carry ``urls`` without
checking that the repository holds them) a manifest whose layers name the private digests,
and asks the mirror anonymously for those digests under the public name.

A manifest of the requested repository that *references* a digest proves nothing (public
manifests are attacker-written). Only the upstream can say that the repository holds a
digest: the mirror HEADs it there, the public registry answers 404, and nothing is served —
whatever the spelling (path prefix, ``ns``, default upstream), method, or whether the
attacker's manifest was fetched by tag or by digest.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from proxy.http.app import create_app
from tests.support.accesssetup import ALICE, public_and_private_config
from tests.support.aio import ServerFactory
from tests.support.images import ImageFactory, ImageInfo
from tests.support.registry import Registry
from tests.support.tokenserver import TokenServer

# Written by Apache's `htpasswd -nbB -C 5 alice 'correct horse battery'`.
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
# Distribution 2.8 checks that a layer exists in the repository unless it has `urls` that
# this pattern allows (registry/storage/ocimanifesthandler.go); without it the push fails.
URLS_ALLOWED = {"validation": {"manifests": {"urls": {"allow": ["^https?://"]}}}}


@pytest.fixture(autouse=True)
def _scan_logs_for_credentials(secret: Callable[[str], str]) -> None:
    secret(ALICE[1])


@pytest.fixture(scope="module")
def public_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with Registry(tmp_path_factory.mktemp("public"), extra_config=URLS_ALLOWED) as started:
        yield started


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def basic(creds: tuple[str, str]) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(":".join(creds).encode()).decode()}


@dataclass
class Attack:
    mirror: str  # http://host:port
    private: ImageInfo  # ghcr.io/acme/secret-*:1, alice only, cached by alice's pull
    private_repo: str
    leak_repo: str  # attacker/leak-* on the public upstream
    leak_digest: str  # the attacker's manifest

    @property
    def secrets(self) -> dict[str, bytes]:
        """Every private object and its bytes (what must never be served to anonymous)."""
        layout = self.private.layout / "blobs" / "sha256"
        return {d: (layout / d.partition(":")[2]).read_bytes() for d in self.private.all_digests}


async def push_blob(session: aiohttp.ClientSession, registry: Registry, repo: str, data: bytes) -> None:
    async with session.post(f"{registry.url}/v2/{repo}/blobs/uploads/") as started:
        assert started.status == 202, await started.text()
        location = started.headers["Location"]
    url = location if location.startswith("http") else registry.url + location
    separator = "&" if "?" in url else "?"
    async with session.put(f"{url}{separator}digest={digest_of(data)}", data=data) as done:
        assert done.status == 201, await done.text()


async def push_leak_manifest(registry: Registry, repo: str, private: ImageInfo) -> str:
    """The attacker's manifest: their own config, and one "layer" per private digest (the
    private manifest too), each with ``urls`` so the registry does not look for the bytes."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers"}}).encode()
    targets = [*private.layer_digests, private.config_digest, private.manifest_digest]
    sizes = {
        **dict(zip(private.layer_digests, private.layer_sizes, strict=True)),
        private.config_digest: len(private.config_bytes),
        private.manifest_digest: len(private.manifest_bytes),
    }
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest_of(config),
                   "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER, "digest": d, "size": sizes[d], "urls": ["https://example.invalid/x"]}
                   for d in targets],
    }).encode()  # fmt: skip
    async with aiohttp.ClientSession() as session:
        await push_blob(session, registry, repo, config)
        headers = {"Content-Type": OCI_MANIFEST}
        async with session.put(f"{registry.url}/v2/{repo}/manifests/latest", data=manifest, headers=headers) as r:
            assert r.status == 201, await r.text()
    return digest_of(manifest)


@pytest.fixture
async def attack(
    public_registry: Registry,
    auth_registry: Registry,
    token_server: TokenServer,
    aiohttp_server: ServerFactory,
    image_factory: ImageFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Attack:
    config = public_and_private_config(
        tmp_path, public_registry.url, auth_registry, token_server, monkeypatch, anonymous="docker.io/**"
    )
    suffix = secrets.token_hex(3)
    private = image_factory.image("1", layers=[40_000, 3_000], seed=suffix)
    private_repo = f"acme/secret-{suffix}"
    await auth_registry.apush(private.layout, "1", f"{private_repo}:1")
    server = await aiohttp_server(create_app(config))
    mirror = f"http://{server.host}:{server.port}"
    async with aiohttp.ClientSession(headers=basic(ALICE)) as alice:  # alice's pull: all of it cached
        for kind, ref in [("manifests", "1"), *(("blobs", d) for d in private.blob_digests)]:
            async with alice.get(f"{mirror}/v2/ghcr.io/{private_repo}/{kind}/{ref}") as response:
                assert response.status == 200, (kind, ref, await response.text())
    leak_repo = f"attacker/leak-{suffix}"
    leak_digest = await push_leak_manifest(public_registry, leak_repo, private)
    return Attack(mirror, private, private_repo, leak_repo, leak_digest)


# How a client names the public repository: path prefix, `ns` (containerd), default upstream.
SPELLINGS = {
    "prefix": ("/v2/docker.io/{repo}/{kind}/{ref}", ""),
    "ns": ("/v2/{repo}/{kind}/{ref}", "?ns=docker.io"),
    "default": ("/v2/{repo}/{kind}/{ref}", ""),
}


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
@pytest.mark.parametrize("leak_ref", ["tag", "digest"])
async def test_private_cached_content_is_not_served_through_a_public_name(
    attack: Attack, public_registry: Registry, spelling: str, leak_ref: str
) -> None:
    template, query = SPELLINGS[spelling]

    def url(kind: str, ref: str) -> str:
        return attack.mirror + template.format(repo=attack.leak_repo, kind=kind, ref=ref) + query

    async with aiohttp.ClientSession() as anonymous:
        # The attacker's own manifest is public and served (the mirror caches its references).
        async with anonymous.get(url("manifests", "latest" if leak_ref == "tag" else attack.leak_digest)) as r:
            assert (r.status, digest_of(await r.read())) == (200, attack.leak_digest)
        since = await public_registry.amark()
        cases = [  # (method, endpoint, digest, expected status, expected error code)
            *((m, "blobs", d, 404, "BLOB_UNKNOWN") for m in ("GET", "HEAD") for d in attack.private.all_digests),
            *((m, "manifests", attack.private.manifest_digest, 404, "MANIFEST_UNKNOWN") for m in ("GET", "HEAD")),
        ]
        for _ in range(2):  # a refusal is not remembered as a permission
            for method, kind, digest, status, code in cases:
                async with anonymous.request(method, url(kind, digest)) as response:
                    body = await response.read()
                    assert (method, kind, digest, response.status) == (method, kind, digest, status), body[:200]
                    if method == "GET":
                        assert json.loads(body)["errors"][0]["code"] == code
                    assert not any(secret in body for secret in attack.secrets.values())
        # Each refusal is the public upstream's answer, asked under the public name.
        asked = await public_registry.acount_requests("HEAD", rf"^/v2/{attack.leak_repo}/", since=since)
        assert asked >= len(attack.private.all_digests)
        # The referrers API answers from the public upstream (Distribution 2.8: none), never the cache.
        async with anonymous.get(url("referrers", attack.private.manifest_digest)) as response:
            assert response.status == 200
            assert json.loads(await response.read())["manifests"] == []


async def test_alice_still_gets_her_image_and_anonymous_still_cannot(attack: Attack) -> None:
    base = f"{attack.mirror}/v2/ghcr.io/{attack.private_repo}"
    async with aiohttp.ClientSession() as anonymous, aiohttp.ClientSession(headers=basic(ALICE)) as alice:
        for digest, data in attack.secrets.items():
            kind = "manifests" if digest == attack.private.manifest_digest else "blobs"
            async with alice.get(f"{base}/{kind}/{digest}") as response:
                assert (digest, response.status, await response.read()) == (digest, 200, data)
            async with anonymous.get(f"{base}/{kind}/{digest}") as response:
                assert (digest, response.status) == (digest, 401)
