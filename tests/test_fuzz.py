"""Fuzzing: property-based (hypothesis) over everything a client or an upstream controls —
request paths, ``ns``, references, digests, ``Range``, ``Authorization``, manifests,
AdmissionReview JSON and policy YAML — and a short coverage-guided run (atheris, ``fuzz/``)
over the reference/digest parsers and the naming rule, the manifest parser, the
untrusted-JSON parser, signature-artifact recognition and token-realm origins, whose corpora
are also replayed.

The properties: parsers return or raise their ``PullgateError`` (never anything else);
normalizing is idempotent and no spelling of a host changes a reference; no JSON document
nests past the parser's depth limit, however deep it is written;
the live mirror answers every request within a few seconds with a status below 500 and,
under ``/v2/``, a spec-shaped JSON error body; nothing reaches an upstream that is not
configured."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.access.passwords import HashFormatError, PasswordHash, parse_htpasswd
from proxy.access.tokens import AccessTokens
from proxy.admission.review import parse_review, sites_to_check
from proxy.config.settings import AccessConfig, AccessRule, CacheConfig, Config, TimeoutConfig, UpstreamConfig
from proxy.errors import NameInvalid, PullgateError, RangeInvalid
from proxy.http.app import create_app
from proxy.http.pullapi import _parse_range
from proxy.oci import jsondoc
from proxy.oci.digest import Digest
from proxy.oci.jsondoc import JsonInvalid
from proxy.oci.mediatypes import MANIFEST_TYPES, parse_manifest
from proxy.oci.reference import (
    ImageReference,
    looks_like_host,
    normalize_host,
    normalize_pattern,
    normalize_reference_pattern,
    normalize_registry_pattern,
    validate_repository,
    validate_tag,
)
from proxy.policy.document import PolicyInvalid, load_file, parse_policy
from proxy.registry.upstream.challenge import parse_challenge
from tests.support.origin import Origin
from tests.support.procs import free_port

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "fuzz"
TARGETS = ("fuzz_reference", "fuzz_manifest", "fuzz_json", "fuzz_artifacts", "fuzz_origin")
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- strategies -------------------------------------------------------------------------------
SEGMENT_CHARS = st.sampled_from([*"abcz019._-/:@%?#&=+ ~\\\"'<>\x00\x7f", "é", "..", "//", "%2F", "%2e"])
segments = st.lists(SEGMENT_CHARS, max_size=30).map("".join)
hexes = st.text("0123456789abcdefABCDEF", min_size=0, max_size=130)
digests = st.one_of(
    st.builds(lambda a, h: f"{a}:{h}", st.sampled_from(["sha256", "sha512", "md5", "SHA256", ""]), hexes),
    st.just("sha256:" + "a" * 64),
    segments,
)
references = st.one_of(digests, segments, st.text(max_size=140))
ranges = st.one_of(
    st.builds(lambda a, b: f"bytes={a}-{b}", st.integers(-5, 1 << 40).map(str), st.one_of(st.just(""),
              st.integers(-5, 1 << 40).map(str))),
    st.text(max_size=40),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=30,
)


# --- pure parsers -----------------------------------------------------------------------------
@FAST
@given(st.text(max_size=300))
def test_reference_digest_tag_and_name_parsers(text: str) -> None:
    for parse in (ImageReference.parse, Digest.parse, validate_tag, validate_repository):
        with contextlib.suppress(PullgateError):
            parse(text)


@FAST
@given(st.text(max_size=300))
def test_parsed_references_round_trip(text: str) -> None:
    try:
        ref = ImageReference.parse(text)
    except PullgateError:
        return
    assert ImageReference.parse(str(ref)) == ref


hosts = st.one_of(
    st.sampled_from(["ghcr.io", "docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com",
                     "localhost", "127.0.0.1", "[::1]", "[0:0::1]", "quay.io", "foo", "a-b.example"]),
    st.from_regex(r"\A[a-z0-9]{1,5}(\.[a-z0-9]{1,5}){0,2}\Z"),
)
ports = st.sampled_from(["", ":443", ":80", ":0443", ":00080", ":5000", ":05000", ":65535", ":0", ":65536", ":"])


def respell(host: str, draw_case: list[bool]) -> str:
    return "".join(c.upper() if flip else c for c, flip in zip(host, draw_case * len(host), strict=False))


@FAST
@given(hosts, ports, st.lists(st.booleans(), min_size=1, max_size=8), st.sampled_from(["app", "acme/app", "a/b/c"]),
       st.sampled_from(["", ":1.0", "@sha256:" + "a" * 64]))
def test_every_spelling_of_a_host_is_one_reference(
    host: str, port: str, case: list[bool], path: str, suffix: str
) -> None:
    """Case, default ports and leading zeros never change a reference; normalizing twice is
    normalizing once; the only error is ``NameInvalid``."""
    written = f"{respell(host, case)}{port}/{path}{suffix}"
    try:
        ref = ImageReference.parse(written)
    except NameInvalid:
        return
    assert ImageReference.parse(str(ref)) == ref
    assert normalize_host(ref.registry) == ref.registry
    plain = ImageReference.parse(f"{host}{port}/{path}{suffix}")
    assert plain == ref, (written, str(ref), str(plain))
    if port in (":443", ":80", ":0443", ":00080") and looks_like_host(host):
        assert ref == ImageReference.parse(f"{host}/{path}{suffix}")


@FAST
@given(st.text(max_size=80))
def test_pattern_normalizers_are_idempotent(text: str) -> None:
    for normalize in (normalize_pattern, normalize_reference_pattern, normalize_registry_pattern, normalize_host):
        try:
            once = normalize(text)
        except NameInvalid:
            continue
        assert normalize(once) == once, (normalize.__name__, text, once)


rfc_json = st.recursive(  # RFC 8259 has no NaN or Infinity
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=9),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=30,
)


@FAST
@given(rfc_json, st.integers(0, 12), st.integers(0, 3000), st.sampled_from(["[", '{"k":']))
def test_json_depth_bound_holds(value: Any, limit: int, extra: int, opener: str) -> None:
    """A value wrapped ``extra`` levels deeper parses only if the whole nests within
    ``limit``; otherwise ``JsonInvalid`` — never ``RecursionError``, whatever the depth."""
    closer = "]" if opener == "[" else "}"
    text = opener * extra + json.dumps(value) + closer * extra
    try:
        parsed = jsondoc.parse(text, max_depth=limit)
    except JsonInvalid:
        assert jsondoc.nesting_depth(text) > limit or extra > limit
        return
    assert jsondoc.nesting_depth(text) <= limit
    assert parsed == json.loads(text)


@FAST
@given(ranges, st.integers(1, 1 << 40))
def test_range_parser(header: str, size: int) -> None:
    try:
        start, end = _parse_range(header, size)
    except RangeInvalid as exc:
        assert exc.headers == {"Content-Range": f"bytes */{size}"}
        return
    assert 0 <= start < end <= size


manifest_docs = st.fixed_dictionaries(
    {},
    optional={
        "schemaVersion": st.sampled_from([2, 1, "2", None]),
        "mediaType": st.sampled_from([*sorted(MANIFEST_TYPES), "text/html", 7]) | json_values,
        "config": json_values | st.fixed_dictionaries({"digest": digests, "size": st.integers(-2, 10)}),
        "layers": st.lists(json_values | st.fixed_dictionaries({"digest": digests, "size": json_values}), max_size=3)
        | json_values,
        "manifests": st.lists(
            st.fixed_dictionaries({"digest": digests, "size": st.integers(0, 9), "platform": json_values}), max_size=3
        )
        | json_values,
        "subject": json_values,
    },
)


@FAST
@given(st.one_of(manifest_docs.map(lambda d: json.dumps(d).encode()), st.binary(max_size=200)),
       st.one_of(st.none(), st.sampled_from([*sorted(MANIFEST_TYPES), "application/json; x=1", ""])))
def test_manifest_parser(body: bytes, content_type: str | None) -> None:
    with contextlib.suppress(PullgateError):
        parsed = parse_manifest(body, content_type)
        assert parsed.media_type in MANIFEST_TYPES


@FAST
@given(st.one_of(st.text(max_size=200), st.builds(lambda s, p: f"{s} {p}", st.sampled_from(["Bearer", "Basic"]),
                                                   st.text(max_size=100))))
def test_challenge_and_token_parsers(text: str) -> None:
    parse_challenge(text)
    assert AccessTokens(b"k" * 32, 60).verify(text) is None
    with contextlib.suppress(HashFormatError):
        PasswordHash.parse(text)
    with contextlib.suppress(HashFormatError):
        parse_htpasswd(text, "fuzz")


pod_specs = st.fixed_dictionaries(
    {},
    optional={
        "containers": st.lists(st.fixed_dictionaries({}, optional={"name": json_values, "image": references,
                                                                   "securityContext": json_values}), max_size=3)
        | json_values,
        "initContainers": json_values,
        "ephemeralContainers": json_values,
        "volumes": st.lists(st.fixed_dictionaries({"image": st.fixed_dictionaries({"reference": references})}))
        | json_values,
        "securityContext": json_values,
    },
)
reviews = st.fixed_dictionaries(
    {
        "apiVersion": st.sampled_from(["admission.k8s.io/v1", "v1"]),
        "kind": st.sampled_from(["AdmissionReview", "Pod"]),
        "request": st.fixed_dictionaries(
            {
                "uid": st.text(max_size=10),
                "kind": st.fixed_dictionaries({"group": st.sampled_from(["", "apps", "batch"]),
                                               "kind": st.sampled_from(["Pod", "Deployment", "CronJob", "X"])}),
                "operation": st.sampled_from(["CREATE", "UPDATE", "DELETE", "CONNECT", "x"]),
            },
            optional={
                "object": st.fixed_dictionaries({}, optional={"spec": pod_specs | json_values,
                                                              "metadata": json_values}) | json_values,
                "oldObject": json_values,
                "namespace": json_values,
                "subResource": json_values,
                "dryRun": json_values,
            },
        )
        | json_values,
    }
)


@FAST
@given(st.one_of(reviews.map(lambda r: json.dumps(r).encode()), st.binary(max_size=100)))
def test_admission_review_parser(body: bytes) -> None:
    try:
        request = parse_review(body)
    except PullgateError:
        return
    with contextlib.suppress(PullgateError):
        sites_to_check(request)


POLICY_KEYS = ["requireDigest", "allowedRegistries", "denyTags", "signatures", "image", "resolveTags",
               "rewriteRegistry", "bogus"]
safe_text = st.text(st.characters(blacklist_characters="/\\\x00"), max_size=20)
policy_values = st.recursive(
    st.none() | st.booleans() | st.integers() | safe_text | st.sampled_from(["**", "ghcr.io/**", "nginx", "latest"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(safe_text, children, max_size=4),
    max_leaves=20,
)
policies = st.fixed_dictionaries(
    {
        "apiVersion": st.sampled_from(["pullgate.dev/v1", "v1"]),
        "kind": st.sampled_from(["ImagePolicy", "Policy"]),
        "metadata": st.fixed_dictionaries({"name": st.sampled_from(["p", "Bad Name", "x" * 70])}) | policy_values,
        "spec": st.fixed_dictionaries(
            {},
            optional={
                "mode": st.sampled_from(["enforce", "warn", "audit", "off"]) | policy_values,
                "match": st.fixed_dictionaries({}, optional={"images": policy_values, "namespaces": policy_values,
                                                             "excludeImages": policy_values}) | policy_values,
                "rules": st.dictionaries(st.sampled_from(POLICY_KEYS), policy_values, max_size=4) | policy_values,
            },
        )
        | policy_values,
    }
)


@FAST
@given(policies)
def test_policy_documents(doc: dict[str, Any]) -> None:
    with contextlib.suppress(PullgateError):
        parse_policy(doc, "fuzz", Path("/nonexistent-fuzz-base"))


@FAST
@given(st.one_of(policies.map(lambda d: yaml.safe_dump(d)), st.text(max_size=300)))
def test_policy_yaml_files(text: str) -> None:
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"pullgate-fuzz-{os.getpid()}-{threading.get_ident()}.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        with contextlib.suppress(PolicyInvalid, PullgateError):
            load_file(path)
    finally:
        path.unlink()


# --- the live mirror --------------------------------------------------------------------------
@dataclass
class Live:
    port: int
    origin: Origin


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """Origin and mirror (access on, anonymous rule for library/**) on their own loop in a
    thread, so hypothesis can drive them with plain sockets and unnormalised paths."""
    tmp = tmp_path_factory.mktemp("fuzz-live")
    htpasswd = tmp / "htpasswd"
    htpasswd.write_text("alice:$2y$05$yUu3giJw8xQTj8/1Y5xUfO0MfqeaBHkJgXz49OR8laMd.qY9O4RSK\n")
    origin = Origin()
    image = origin.add_image("library/app", "1", layers=[5000])
    origin_port, port = free_port(), free_port()
    config = Config(
        cache=CacheConfig(dir=tmp / "cache"),
        upstreams=(UpstreamConfig("docker.io", f"http://127.0.0.1:{origin_port}"),),
        default_upstream="docker.io",
        timeouts=TimeoutConfig(connect=1, read=2, manifest=2, retries=0, backoff=0.01),
        access=AccessConfig(
            enabled=True,
            htpasswd=htpasswd,
            failed_login_limit=1_000_000,
            rules=(AccessRule(("docker.io/library/**",), anonymous=True), AccessRule(("docker.io/**",), users=("*",))),
        ),
    )
    loop = asyncio.new_event_loop()
    runners: list[web.AppRunner] = []

    async def start() -> None:
        for app, p in ((origin.app(), origin_port), (create_app(config), port)):
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", p).start()
            runners.append(runner)

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    live = Live(port, origin)
    # Cache the image so fuzzed blob and Range requests hit cached bytes too.
    for path in ("/v2/app/manifests/1", *(f"/v2/app/blobs/{d}" for d in image.blobs)):
        assert send(live, f"GET {path} HTTP/1.1\r\nHost: m\r\n\r\n".encode())[0] == 200
    yield live

    async def stop() -> None:
        for runner in reversed(runners):
            await runner.cleanup()

    asyncio.run_coroutine_threadsafe(stop(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def send(live: Live, request: bytes) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
        sock.sendall(request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1))
        chunks = []
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
    response = b"".join(chunks)
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


REAL_BLOB = "sha256:" + "f" * 64
headers_values = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=60)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(
    name=st.one_of(st.sampled_from(["app", "library/app", "docker.io/library/app", "acme/x"]), segments),
    kind=st.sampled_from(["manifests", "blobs", "tags/list", "referrers", "nothing"]),
    reference=references,
    ns=st.one_of(st.none(), st.sampled_from(["docker.io", "DOCKER.IO:443", "Index.Docker.IO", "docker.io:0080",
                                             "evil.example", "127.0.0.2", "", "docker.io."]), segments),
    range_header=st.one_of(st.none(), ranges),
    authorization=st.one_of(
        st.none(), headers_values, st.builds(lambda v: f"Basic {v}", headers_values),
        st.builds(lambda v: f"Bearer pgt1.{v}", headers_values),
    ),
    method=st.sampled_from(["GET", "HEAD", "PUT", "DELETE", "OPTIONS"]),
)
def test_live_mirror_never_fails_on_client_input(
    live: Live, name: str, kind: str, reference: str, ns: str | None, range_header: str | None,
    authorization: str | None, method: str,
) -> None:
    path = f"/v2/{name}/{kind}" + ("" if kind == "tags/list" else f"/{reference}")
    if ns is not None:
        path += f"?ns={ns}"
    # Control characters and spaces are not a valid request-target (RFC 9112 3.2): aiohttp's
    # parser refuses them with a plain 400 before any handler runs, so they go hex-encoded.
    if any(c == " " or ord(c) < 0x20 or c == "\x7f" for c in path) or not path.isascii():
        path = path.encode("utf-8", "surrogatepass").hex()  # not sendable as is: still a path
        path = f"/v2/{path}/manifests/1"
    lines = [f"{method} {path} HTTP/1.1", "Host: m"]
    if range_header is not None and range_header.isprintable() and range_header.isascii():
        lines.append(f"Range: {range_header}")
    if authorization is not None:
        lines.append(f"Authorization: {authorization}")
    before = set(live.origin.requests)
    status, body = send(live, ("\r\n".join(lines) + "\r\n\r\n").encode())
    assert status < 500 or status in (502, 503), (path, status, body[:300])
    if status >= 400 and method != "HEAD" and status != 416:
        assert json.loads(body)["errors"][0]["code"], body
    for _method, seen in set(live.origin.requests) - before:
        assert seen.startswith("/v2/"), seen


def test_live_mirror_still_serves(live: Live) -> None:
    assert send(live, b"GET /v2/app/manifests/1 HTTP/1.1\r\nHost: m\r\n\r\n")[0] == 200


# --- atheris: coverage-guided, bounded, with a committed regression corpus --------------------
def load_target(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, FUZZ / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_corpus_replays(target: str) -> None:
    """Every committed input (seeds, and anything a fuzzer once found) runs clean."""
    module = load_target(target)
    corpus = sorted((FUZZ / "corpus" / target.removeprefix("fuzz_")).iterdir())
    assert len(corpus) >= 5
    for path in corpus:
        module.test_one_input(path.read_bytes())


@pytest.mark.parametrize("target", TARGETS)
def test_atheris_run_finds_nothing(target: str, tmp_path: Path) -> None:
    """A few seconds of libFuzzer per target (CI-bounded); a crash fails with its input."""
    pytest.importorskip("atheris", reason="atheris is in the test extras; CI installs it")
    new_inputs = tmp_path / "new"
    new_inputs.mkdir()
    seeds = FUZZ / "corpus" / target.removeprefix("fuzz_")
    args = [sys.executable, str(FUZZ / f"{target}.py"), str(new_inputs), str(seeds), "-max_total_time=4",
            "-timeout=5", "-rss_limit_mb=2048", f"-artifact_prefix={tmp_path}/", "-print_final_stats=1"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=tmp_path, env={
        **os.environ, "PYTHONPATH": str(ROOT)})
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-")))
    assert result.returncode == 0 and not crashes, f"{crashes}\n{result.stderr[-3000:]}"
    assert "Done" in result.stderr and "stat::number_of_executed_units" in result.stderr
