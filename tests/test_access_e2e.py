"""The access matrix with real clients against real registries: a public upstream
(``docker.io`` -> plain Distribution) and a private one the mirror holds credentials for
(``ghcr.io`` -> Distribution behind the token issuer). The same layer is in a public and a
private image. skopeo (``--src-creds``), containerd (an ``Authorization`` header in
hosts.toml) and raw HTTP must get exactly what the rules allow, and a refused request
never reaches an upstream (counted in the registries' access logs)."""

from __future__ import annotations

import asyncio
import base64
import secrets
import signal
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509

from proxy.http.app import create_app
from tests.support import skopeo
from tests.support.accesssetup import ALICE, public_and_private_config
from tests.support.aio import ServerFactory
from tests.support.certs import write_cert
from tests.support.containerd import Containerd
from tests.support.daemon import Daemon
from tests.support.images import ImageFactory, ImageInfo, OciLayout, assert_layout_matches
from tests.support.polling import eventually
from tests.support.procs import CommandError, free_port
from tests.support.registry import Registry
from tests.support.tokenserver import TokenServer

ROOT = Path(__file__).resolve().parent.parent
# Written by Apache's `htpasswd -nbB -C 5 alice 'correct horse battery'`.
WRONG = ("alice", "incorrect horse battery")


@pytest.fixture(autouse=True)
def _scan_logs_for_credentials(secret: Callable[[str], str]) -> None:
    secret(ALICE[1])
    secret(WRONG[1])


@dataclass
class Setup:
    host: str  # the mirror, host:port
    public: ImageInfo  # docker.io/library/pub-*:1, anonymous pulls allowed
    private: ImageInfo  # ghcr.io/acme/priv-*:1, alice only; shares its first layer with public
    public_repo: str
    private_repo: str

    @property
    def url(self) -> str:
        return f"http://{self.host}"


@pytest.fixture
async def setup(
    registry: Registry,
    auth_registry: Registry,
    token_server: TokenServer,
    aiohttp_server: ServerFactory,
    image_factory: ImageFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Setup:
    config = public_and_private_config(
        tmp_path, registry.url, auth_registry, token_server, monkeypatch, anonymous="docker.io/library/**"
    )
    seed = secrets.token_hex(4)
    public = image_factory.image("1", layers=[60_000], seed=seed)
    private = image_factory.image("1", layers=[60_000, 20_000], seed=seed)
    assert public.layer_digests[0] == private.layer_digests[0], "one layer, two repositories"
    suffix = secrets.token_hex(3)
    public_repo, private_repo = f"library/pub-{suffix}", f"acme/priv-{suffix}"
    await registry.apush(public.layout, "1", f"{public_repo}:1")
    await auth_registry.apush(private.layout, "1", f"{private_repo}:1")
    server = await aiohttp_server(create_app(config))
    return Setup(f"{server.host}:{server.port}", public, private, public_repo, private_repo)


def basic_header(creds: tuple[str, str]) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(":".join(creds).encode()).decode()}


async def test_skopeo_access_matrix(setup: Setup, registry: Registry, auth_registry: Registry, tmp_path: Path) -> None:
    public = f"docker://{setup.host}/{setup.public_repo}:1"
    private = f"docker://{setup.host}/ghcr.io/{setup.private_repo}:1"
    rows: list[tuple[str, tuple[str, str] | None, ImageInfo | None]] = [
        # (source, --src-creds, expected image or None for refused)
        (private, None, None),
        (private, WRONG, None),
        (public, WRONG, None),  # wrong credentials never fall back to anonymous
        (public, None, setup.public),
        (private, ALICE, setup.private),
        (public, ALICE, setup.public),
        (private, None, None),  # everything is cached now: still refused
        (private, WRONG, None),
    ]
    for i, (source, creds, expected) in enumerate(rows):
        before = (await auth_registry.amark(), await registry.amark())
        dest = tmp_path / f"out-{i}"
        if expected is None:
            with pytest.raises(CommandError, match=r"(?i)unauthorized|authentication required|invalid credentials"):
                await skopeo.acopy(source, f"oci:{dest}:x", src_creds=creds)
            assert await auth_registry.acount_requests(None, r"^/v2/", since=before[0]) == 0, (i, "private upstream")
            assert await registry.acount_requests(None, r"^/v2/", since=before[1]) == 0, (i, "public upstream")
        else:
            await skopeo.acopy(source, f"oci:{dest}:x", src_creds=creds)
            assert_layout_matches(dest, expected)


async def test_shared_layer_over_raw_http(setup: Setup, auth_registry: Registry) -> None:
    shared, private_only = setup.private.layer_digests[0], setup.private.layer_digests[1]
    alice = basic_header(ALICE)
    async with aiohttp.ClientSession() as session:
        # alice pulls the private image: the shared layer is cached now
        for digest in (setup.private.manifest_digest, *setup.private.blob_digests):
            kind = "manifests" if digest == setup.private.manifest_digest else "blobs"
            url = f"{setup.url}/v2/{setup.private_repo}/{kind}/{digest}?ns=ghcr.io"
            async with session.get(url, headers=alice) as r:
                assert r.status == 200
        since = await auth_registry.amark()
        cases = [
            (f"/v2/{setup.private_repo}/blobs/{shared}?ns=ghcr.io", None, 401),
            (f"/v2/ghcr.io/{setup.private_repo}/blobs/{private_only}", None, 401),
            (f"/v2/ghcr.io/{setup.private_repo}/blobs/{private_only}", basic_header(WRONG), 401),
            (f"/v2/{setup.private_repo}/manifests/{setup.private.manifest_digest}?ns=ghcr.io", None, 401),
            (f"/v2/{setup.public_repo}/blobs/{private_only}?ns=docker.io", None, 404),
            (f"/v2/{setup.public_repo}/manifests/{setup.private.manifest_digest}", None, 404),
            (f"/v2/{setup.public_repo}/blobs/{shared}?ns=docker.io", None, 200),
        ]
        for path, headers, status in cases:
            async with session.get(setup.url + path, headers=headers) as response:
                assert (path, response.status) == (path, status)
        assert await auth_registry.acount_requests(None, r"^/v2/", since=since) == 0


async def test_containerd_with_a_hosts_toml_authorization_header(
    setup: Setup, containerd: Containerd, auth_registry: Registry
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # the fallback `server`: nothing listens there
    public_ref = f"docker.io/{setup.public_repo}:1"
    private_ref = f"ghcr.io/{setup.private_repo}:1"
    digest = await containerd.apull(public_ref, setup.url, server=dead, namespace=containerd.new_namespace())
    assert digest == setup.public.manifest_digest
    since = await auth_registry.amark()
    wrong = basic_header(WRONG)
    for headers in (None, wrong):
        with pytest.raises(CommandError):
            await containerd.apull(
                private_ref, setup.url, server=dead, namespace=containerd.new_namespace(), headers=headers, timeout=60
            )
    assert await auth_registry.acount_requests(None, r"^/v2/", since=since) == 0
    right = basic_header(ALICE)
    namespace = containerd.new_namespace()
    digest = await containerd.apull(private_ref, setup.url, server=dead, namespace=namespace, headers=right)
    assert digest == setup.private.manifest_digest
    source = OciLayout(setup.private.layout)
    for blob in setup.private.all_digests:
        assert containerd.content_get(blob, namespace=namespace) == source.blob_path(blob).read_bytes()
    # Credentials the way the CRI plugin passes them (ctr --user): containerd answers the
    # Bearer challenge through the mirror's token endpoint.
    digest = await containerd.apull(
        private_ref, setup.url, server=dead, namespace=containerd.new_namespace(), extra=("--user", ":".join(ALICE))
    )
    assert digest == setup.private.manifest_digest
    with pytest.raises(CommandError):
        await containerd.apull(
            private_ref,
            setup.url,
            server=dead,
            namespace=containerd.new_namespace(),
            extra=("--user", ":".join(WRONG)),
            timeout=60,
        )


def served_serial(port: int, ca: Path) -> int:
    """The serial of the certificate the listener presents (verified against ``ca``)."""
    context = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def test_mirror_listener_tls_and_reload(tmp_path: Path) -> None:
    """``tls_cert``/``tls_key``: the mirror speaks only TLS; a rotated certificate is served
    to new connections after SIGHUP (the file watcher would pick it up within 10 s)."""
    certs = tmp_path / "certs"
    certs.mkdir()
    cert, key = write_cert(certs, serial=1)
    first_ca = tmp_path / "ca-1.pem"
    first_ca.write_bytes(cert.read_bytes())
    daemon = Daemon(tmp_path / "daemon", "http://127.0.0.1:9", tls_cert=str(cert), tls_key=str(key))
    daemon.start(wait=False)  # its /readyz is HTTPS: polled below
    try:
        async with aiohttp.ClientSession() as session:
            context = ssl.create_default_context(cafile=str(first_ca))

            async def healthy() -> bool:
                try:
                    async with session.get(f"https://localhost:{daemon.port}/healthz", ssl=context) as response:
                        return response.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await eventually(healthy, timeout=20)
            with pytest.raises(aiohttp.ClientError):  # plain HTTP is not served
                async with session.get(f"http://127.0.0.1:{daemon.port}/healthz") as response:
                    await response.read()
        assert await asyncio.to_thread(served_serial, daemon.port, first_ca) == 1
        write_cert(certs, serial=2)
        second_ca = tmp_path / "ca-2.pem"
        second_ca.write_bytes(cert.read_bytes())
        daemon.proc.send_signal(signal.SIGHUP)

        async def rotated() -> bool:
            try:  # the reload runs in a thread: until it lands, the old certificate fails verification
                return await asyncio.to_thread(served_serial, daemon.port, second_ca) == 2
            except ssl.SSLCertVerificationError:
                return False

        await eventually(rotated, timeout=10, step=0.2)
    finally:
        daemon.stop()
    assert any(event.get("event") == "mirror_tls_reloaded" for event in daemon.events())
