"""A Docker token-auth issuer for tests: Distribution demands its tokens, skopeo,
containerd and the mirror fetch them.

Flow (https://distribution.github.io/distribution/spec/auth/token/): the registry answers
401 with ``WWW-Authenticate: Bearer realm=...,service=...,scope=...``; the client GETs
``realm?service=S&scope=repository:NAME:pull,push`` (Basic credentials optional) or POSTs
the OAuth2 form (https://distribution.github.io/distribution/spec/auth/oauth/), and gets a
JWT back. Distribution 2.8 verifies the JWT with the ``x5c`` chain in its header against
``rootcertbundle``; ES256 signatures are raw ``r || s`` (RFC 7518 section 3.4), not DER.

The server runs its own event loop in a thread, so blocking clients (skopeo via
``subprocess.run``) and async tests can both use it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import json
import secrets
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

_START_TIMEOUT = 10.0


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenIssuer:
    """An EC P-256 key with a self-signed certificate; signs registry JWTs."""

    def __init__(self, *, issuer: str = "pullgate-test-issuer",
                 service: str = "pullgate-test-registry", lifetime: int = 300) -> None:
        self.issuer = issuer
        self.service = service
        self.lifetime = lifetime
        self._key = ec.generate_private_key(ec.SECP256R1())
        self.certificate = _self_signed(self._key, issuer)
        self._x5c = [base64.b64encode(
            self.certificate.public_bytes(serialization.Encoding.DER)).decode()]

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def write_bundle(self, path: Path) -> Path:
        """The ``rootcertbundle`` file Distribution trusts."""
        path.write_bytes(self.cert_pem)
        return path

    def issue(self, subject: str, access: list[dict[str, Any]], *,
              lifetime: int | None = None) -> str:
        now = int(time.time())
        header = {"typ": "JWT", "alg": "ES256", "x5c": self._x5c}
        claims = {"iss": self.issuer, "sub": subject, "aud": self.service,
                  "exp": now + (lifetime or self.lifetime), "nbf": now - 5, "iat": now,
                  "jti": secrets.token_hex(16), "access": access}
        signing_input = (_b64url(json.dumps(header).encode()) + "."
                         + _b64url(json.dumps(claims).encode()))
        der = self._key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return signing_input + "." + _b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


def _self_signed(key: ec.EllipticCurvePrivateKey, name: str) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))


@dataclass(frozen=True, slots=True)
class TokenRequest:
    """One request the server answered, for assertions (e.g. the mirror caches tokens)."""

    method: str
    user: str | None
    service: str | None
    scopes: tuple[str, ...]
    status: int


def parse_scope(scope: str) -> dict[str, Any] | None:
    """"repository:library/app:pull,push" -> access entry; None when malformed."""
    kind, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    if not kind or not name or not actions:
        return None
    return {"type": kind, "name": name, "actions": actions.split(",")}


class TokenServer:
    """Loopback token endpoint. ``users`` may pull and push; anonymous callers get pull
    access only when ``anonymous_pull`` is true (an empty grant otherwise)."""

    def __init__(self, issuer: TokenIssuer | None = None, *,
                 users: Mapping[str, str] | None = None, anonymous_pull: bool = False) -> None:
        self.issuer = issuer or TokenIssuer()
        self.users = dict({"pusher": "push-secret"} if users is None else users)
        self.anonymous_pull = anonymous_pull
        self.requests: list[TokenRequest] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def realm(self) -> str:
        return f"{self.url}/token"

    @property
    def creds(self) -> tuple[str, str]:
        """The first configured user, for ``--creds`` style arguments."""
        user, password = next(iter(self.users.items()))
        return user, password

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self.requests)

    def registry_auth_config(self, bundle: Path) -> dict[str, Any]:
        """The ``auth:`` section of a Distribution config trusting this server."""
        self.issuer.write_bundle(bundle)
        return {"token": {"realm": self.realm, "service": self.issuer.service,
                          "issuer": self.issuer.issuer, "rootcertbundle": str(bundle)}}

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> TokenServer:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="token-server",
                                        daemon=True)
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start(), loop)
        self.port = future.result(_START_TIMEOUT)
        return self

    async def _start(self) -> int:
        app = web.Application()
        app.router.add_get("/token", self._get_token)
        app.router.add_post("/token", self._post_token)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(self._runner, sock).start()
        port: int = sock.getsockname()[1]
        return port

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(
                _START_TIMEOUT)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(_START_TIMEOUT)
        self._loop.close()
        self._loop = self._thread = self._runner = None

    def __enter__(self) -> TokenServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- handlers ----------------------------------------------------------------------
    async def _get_token(self, request: web.Request) -> web.Response:
        user = _basic_user(request.headers.get("Authorization", ""))
        scopes = tuple(request.query.getall("scope", []))
        return self._answer("GET", user, request.query.get("service"), scopes, oauth=False)

    async def _post_token(self, request: web.Request) -> web.Response:
        form = await request.post()
        user: tuple[str, str] | None = None
        if form.get("grant_type") == "password":
            user = (str(form.get("username", "")), str(form.get("password", "")))
        scopes = tuple(str(form.get("scope", "")).split())
        service = form.get("service")
        return self._answer("POST", user, None if service is None else str(service), scopes,
                            oauth=True)

    def _answer(self, method: str, user: tuple[str, str] | None, service: str | None,
                scopes: tuple[str, ...], *, oauth: bool) -> web.Response:
        name = None if user is None else user[0]
        if user is not None and self.users.get(user[0]) != user[1]:
            self._record(TokenRequest(method, name, service, scopes, 401))
            return web.json_response({"errors": [{"code": "UNAUTHORIZED",
                                                  "message": "bad credentials"}]}, status=401)
        access = [a for a in map(parse_scope, scopes) if a is not None]
        if user is None:
            access = [{**a, "actions": ["pull"]} for a in access
                      if self.anonymous_pull and "pull" in a["actions"]]
        token = self.issuer.issue(name or "", access)
        self._record(TokenRequest(method, name, service, scopes, 200))
        body: dict[str, Any] = {"access_token": token, "expires_in": self.issuer.lifetime,
                                "issued_at": dt.datetime.now(dt.UTC).isoformat()}
        if not oauth:
            body["token"] = token
        return web.json_response(body)

    def _record(self, entry: TokenRequest) -> None:
        with self._lock:
            self.requests.append(entry)


def _basic_user(header: str) -> tuple[str, str] | None:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return ("", "")  # present but unreadable: treat as bad credentials
    user, _, password = decoded.partition(":")
    return user, password
