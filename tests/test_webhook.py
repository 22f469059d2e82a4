"""The webhook over HTTP: real aiohttp app, AdmissionReview fixtures shaped like the API
server's, JSONPatch applied to the object, bad input, deadlines, readiness, metrics, logs and
TLS with certificate rotation."""

from __future__ import annotations

import asyncio
import base64
import copy
import dataclasses
import json
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient
from cryptography import x509
from prometheus_client import CollectorRegistry

from proxy.admission.webhook import WEBHOOK, create_webhook_app
from proxy.config.settings import AdmissionConfig, Config, PolicyDefaults
from proxy.errors import UpstreamUnavailable
from proxy.http.webhook_listener import run_webhook
from proxy.ops.metrics import Metrics
from tests.support.certs import write_cert
from tests.support.polling import eventually
from tests.support.resolver import DictResolver, text_digest

DATA = Path(__file__).parent / "data"
POLICIES = DATA / "policies" / "webhook"
TAGS = [
    "docker.io/library/nginx:1.25",
    "ghcr.io/acme/proxy:2.1",
    "ghcr.io/acme/proxy:2.2",
    "ghcr.io/acme/models:v3",
    "docker.io/library/busybox:latest",
    "docker.io/library/busybox:1.36",
]
Client = Callable[..., Awaitable[TestClient[Any, Any]]]


def pinned(image: str, full: str) -> str:
    return f"{image}@{text_digest(full)}"


def config(policies: Path | None = POLICIES, **admission: Any) -> Config:
    no_match = admission.pop("no_match", "allow")
    return dataclasses.replace(
        Config(),
        policies=policies,
        defaults=PolicyDefaults(no_match=no_match),
        admission=dataclasses.replace(AdmissionConfig(), **admission),
    )


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


@pytest.fixture
def resolver() -> DictResolver:
    return DictResolver(dict.fromkeys(TAGS))


@pytest.fixture
async def client(aiohttp_client: Client, metrics: Metrics, resolver: DictResolver) -> TestClient[Any, Any]:
    app = create_webhook_app(config(), resolver, metrics, structlog.get_logger())
    return await aiohttp_client(app)


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DATA / "admission" / f"{name}.json").read_text())
    return data


def apply_patch(obj: Any, ops: list[dict[str, Any]]) -> Any:
    """RFC 6902 for the ops the webhook sends: ``replace`` needs an existing target."""
    obj = copy.deepcopy(obj)
    for op in ops:
        assert set(op) == {"op", "path", "value"} and op["op"] == "replace"
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"][1:].split("/")]
        node = obj
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            assert 0 <= int(last) < len(node)
            node[int(last)] = op["value"]
        else:
            assert last in node, f"replace of a missing member {op['path']}"
            node[last] = op["value"]
    return obj


async def post(client: TestClient[Any, Any], endpoint: str, review: dict[str, Any]) -> dict[str, Any]:
    resp = await client.post(f"/{endpoint}", json=review)
    assert resp.status == 200, await resp.text()
    answer: dict[str, Any] = await resp.json()
    assert answer["apiVersion"] == "admission.k8s.io/v1" and answer["kind"] == "AdmissionReview"
    response = answer["response"]
    assert response["uid"] == review["request"]["uid"]
    assert set(response) <= {"uid", "allowed", "status", "patchType", "patch", "warnings", "auditAnnotations"}
    assert all(len(w) <= 120 for w in response.get("warnings", []))
    if not response["allowed"]:
        assert response["status"]["code"] == 403 and response["status"]["message"]
        assert "patch" not in response
    return answer


def images_after(review: dict[str, Any], response: dict[str, Any]) -> Any:
    obj = review["request"]["object"]
    if "patch" not in response:
        return obj
    assert response["patchType"] == "JSONPatch"
    return apply_patch(obj, json.loads(base64.b64decode(response["patch"])))


T = "/spec/template/spec/containers"
NGINX_PIN = pinned("nginx:1.25", TAGS[0])
PROXY_PIN = pinned("ghcr.io/acme/proxy:2.1", TAGS[1])
WORKLOAD = {
    f"{T}/0/image": NGINX_PIN,
    f"{T}/1/image": PROXY_PIN,
    f"{T}/2/image": "quay.io/prometheus/node-exporter:v1.8.0",
}


def under(prefix: str) -> dict[str, str]:
    return {k.replace("/spec/template/spec", prefix): v for k, v in WORKLOAD.items()}


BUSYBOX_WARNING = 'container "setup" image "busybox": policy no-latest denies tag latest'


@pytest.mark.parametrize(
    ("name", "endpoint", "allowed", "images", "warnings", "message"),
    [
        # every kind with a pod template: tags pinned, excluded image untouched
        ("deployment-create", "mutate", True, WORKLOAD, [], None),
        ("replicaset-create", "mutate", True, WORKLOAD, [], None),
        ("statefulset-create", "mutate", True, WORKLOAD, [], None),
        ("daemonset-create", "mutate", True, WORKLOAD, [], None),
        ("job-create", "mutate", True, WORKLOAD, [], None),
        ("replicationcontroller-create", "mutate", True, WORKLOAD, [], None),
        ("cronjob-create", "mutate", True, under("/spec/jobTemplate/spec/template/spec"), [], None),
        ("podtemplate-create", "mutate", True, under("/template/spec"), [], None),
        # a Pod: init containers, containers and image volumes
        (
            "pod-create",
            "mutate",
            True,
            {
                "/spec/initContainers/0/image": pinned("busybox:latest", TAGS[4]),
                "/spec/containers/0/image": NGINX_PIN,
                "/spec/containers/1/image": PROXY_PIN,
                "/spec/volumes/0/image/reference": pinned("ghcr.io/acme/models:v3", TAGS[3]),
            },
            [BUSYBOX_WARNING],
            None,
        ),
        (
            "pod-create",
            "validate",
            False,
            {"/spec/containers/0/image": "nginx:1.25"},
            [BUSYBOX_WARNING],
            'container "setup" image "busybox": policy prod-pinned requires a digest; '
            'container "web" image "nginx:1.25": policy prod-pinned requires a digest; '
            'container "sidecar" image "ghcr.io/acme/proxy:2.1": policy prod-pinned requires a '
            'digest; volume "models" image "ghcr.io/acme/models:v3": policy prod-pinned requires '
            "a digest",
        ),
        # ephemeral containers arrive through the pods/ephemeralcontainers subresource
        (
            "pod-ephemeral-update",
            "mutate",
            True,
            {"/spec/ephemeralContainers/0/image": pinned("busybox:1.36", TAGS[5])},
            [],
            None,
        ),
        # UPDATE: only the changed image is resolved and patched
        (
            "deployment-update",
            "mutate",
            True,
            {f"{T}/0/image": "nginx:1.25", f"{T}/1/image": pinned("ghcr.io/acme/proxy:2.2", TAGS[2])},
            [],
            None,
        ),
        ("deployment-update-scale", "mutate", True, {f"{T}/0/image": "nginx:1.25"}, [], None),
        ("deployment-update-scale", "validate", True, {}, [], None),
        # idempotent: images with digests are left alone
        ("pod-create-pinned", "mutate", True, {"/spec/containers/0/image": f"nginx:1.25@sha256:{'a' * 64}"}, [], None),
        ("pod-create-pinned", "validate", True, {}, [], None),
        # namespace outside prod-pinned: nothing to pin, nothing to deny
        ("pod-create-dev", "mutate", True, {"/spec/containers/0/image": "nginx:1.25"}, [], None),
        (
            "pod-create-invalid-image",
            "mutate",
            False,
            {},
            [],
            'container "broken" image "Not A Valid/Ref": invalid image reference',
        ),
        # untouched
        ("pod-delete", "mutate", True, {}, [], None),
        ("pod-delete", "validate", True, {}, [], None),
        ("pod-exec-connect", "validate", True, {}, [], None),
        ("pod-status-update", "mutate", True, {}, [], None),
        ("configmap-create", "mutate", True, {}, [], None),
    ],
)
async def test_fixtures(
    client: TestClient[Any, Any],
    name: str,
    endpoint: str,
    allowed: bool,
    images: dict[str, str],
    warnings: list[str],
    message: str | None,
) -> None:
    review = load(name)
    response = (await post(client, endpoint, review))["response"]
    assert response["allowed"] is allowed
    assert response.get("warnings", []) == warnings
    if message is not None:
        assert message in response["status"]["message"]
    if endpoint == "validate" or not allowed:
        assert "patch" not in response
    patched = images_after(review, response)
    for pointer, image in images.items():
        node = patched
        for part in pointer[1:].split("/"):
            node = node[int(part)] if isinstance(node, list) else node[part]
        assert node == image, pointer
    if response.get("patch"):  # mutation is idempotent: the patched object needs no patch
        again = copy.deepcopy(review)
        again["request"]["object"] = patched
        assert "patch" not in (await post(client, endpoint, again))["response"]


async def test_audit_mode_records(client: TestClient[Any, Any], metrics: Metrics) -> None:
    review = load("pod-create")
    with structlog.testing.capture_logs() as logs:
        response = (await post(client, "validate", review))["response"]
    message = 'container "setup" image "busybox": policy audit-busybox requires a digest'
    assert response["auditAnnotations"] == {"audit-busybox": message}
    (event,) = [e for e in logs if e["event"] == "policy_audit_violation"]
    assert (event["policy"], event["rule"], event["message"]) == ("audit-busybox", "requireDigest", message)
    assert (
        metrics.registry.get_sample_value(
            "pullgate_admission_decisions_total", {"policy": "audit-busybox", "mode": "audit", "result": "violation"}
        )
        == 1
    )


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        (b"not json", 400, "body is not JSON"),
        (
            b'{"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": {}}',
            400,
            "expected apiVersion admission.k8s.io/v1 kind AdmissionReview",
        ),
        (b'{"apiVersion": "v1", "kind": "Pod"}', 400, "expected apiVersion admission.k8s.io/v1"),
        (b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}', 400, "request: missing or not an object"),
        (
            json.dumps(
                {
                    "apiVersion": "admission.k8s.io/v1",
                    "kind": "AdmissionReview",
                    "request": {
                        "uid": "u",
                        "kind": {"group": "", "version": "v1", "kind": "Pod"},
                        "operation": "CREATE",
                        "object": {"spec": {"containers": 5}},
                    },
                }
            ).encode(),
            400,
            "/spec/containers: not a list",
        ),
        (b"{" + b" " * (4 << 20) + b"}", 413, "AdmissionReview larger than admission.max_body_size (3.0 MiB)"),
        # issue 13 finding 5: 200,000 levels (400 kB) once raised RecursionError; now a 400
        (b"[" * 200_000 + b"]" * 200_000, 400, "AdmissionReview body nests deeper than 200 levels"),
        (
            b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": "u", "object": '
            + b"[" * 100_000 + b"]" * 100_000 + b"}}",
            400,
            "AdmissionReview body nests deeper than 200 levels",
        ),
    ],
    ids=lambda value: repr(value[:40]) if isinstance(value, bytes) else None,
)
async def test_bad_requests(
    client: TestClient[Any, Any], metrics: Metrics, body: bytes, status: int, error: str
) -> None:
    for endpoint in ("validate", "mutate"):
        resp = await client.post(f"/{endpoint}", data=body, headers={"Content-Type": "application/json"})
        assert resp.status == status
        answer = await resp.json()
        assert error in answer["errors"][0]["message"]
    assert (
        metrics.registry.get_sample_value(
            "pullgate_admission_reviews_total", {"endpoint": "mutate", "outcome": "error"}
        )
        == 1
    )


async def test_get_is_not_allowed(client: TestClient[Any, Any]) -> None:
    assert (await client.get("/mutate")).status == 405


@pytest.mark.parametrize(
    ("on_timeout", "allowed", "text"),
    [
        ("deny", False, "pullgate: image policy check did not finish within 0.1s; denied (admission.on_timeout: deny)"),
        (
            "allow",
            True,
            "pullgate: image policy check did not finish within 0.1s; admitted (admission.on_timeout: allow)",
        ),
    ],
)
async def test_deadline(aiohttp_client: Client, metrics: Metrics, on_timeout: str, allowed: bool, text: str) -> None:
    slow = DictResolver(dict.fromkeys(TAGS), delay=5)
    app = create_webhook_app(config(deadline=0.1, on_timeout=on_timeout), slow, metrics, structlog.get_logger())
    client = await aiohttp_client(app)
    started = asyncio.get_running_loop().time()
    response = (await post(client, "mutate", load("deployment-create")))["response"]
    assert asyncio.get_running_loop().time() - started < 1
    assert response["allowed"] is allowed
    assert text in (response["status"]["message"] if not allowed else response["warnings"][0])
    assert (
        metrics.registry.get_sample_value(
            "pullgate_admission_reviews_total", {"endpoint": "mutate", "outcome": "timeout"}
        )
        == 1
    )


async def test_resolution_failure_names_the_cause(aiohttp_client: Client, metrics: Metrics) -> None:
    tags: dict[str, Any] = dict.fromkeys(TAGS)
    tags["ghcr.io/acme/proxy:2.1"] = UpstreamUnavailable("connect to ghcr.io:443 refused")
    app = create_webhook_app(config(), DictResolver(tags), metrics, structlog.get_logger())
    client = await aiohttp_client(app)
    response = (await post(client, "mutate", load("deployment-create")))["response"]
    assert response["status"]["message"] == (
        'container "sidecar" image "ghcr.io/acme/proxy:2.1": policy prod-pinned requires a '
        "digest (tag resolution failed: upstream ghcr.io unreachable: connect to ghcr.io:443 "
        "refused)"
    )
    assert metrics.registry.get_sample_value("pullgate_tag_resolutions_total", {"source": "failed"}) == 1


async def test_no_match_default(aiohttp_client: Client, metrics: Metrics, tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text((POLICIES / "policies.yaml").read_text().split("---")[0])
    app = create_webhook_app(config(tmp_path, no_match="deny"), DictResolver(), metrics, structlog.get_logger())
    client = await aiohttp_client(app)
    response = (await post(client, "validate", load("pod-create-dev")))["response"]
    assert response["status"]["message"] == (
        'container "tool" image "nginx:1.25": no policy matches (defaults.no_match: deny)'
    )


async def test_not_ready_until_policies_load(aiohttp_client: Client, metrics: Metrics, tmp_path: Path) -> None:
    bad = tmp_path / "p.yaml"
    bad.write_text("apiVersion: pullgate.dev/v1\nkind: ImagePolicy\nmetadata: {name: x}\n")
    app = create_webhook_app(config(tmp_path), DictResolver(), metrics, structlog.get_logger())
    store = app[WEBHOOK].policies
    store.interval = 0.01
    client = await aiohttp_client(app)
    resp = await client.get("/readyz")
    assert resp.status == 503
    assert "p.yaml: document 1 (x): spec: required" in (await resp.json())["error"]
    resp = await client.post("/validate", json=load("pod-create"))
    assert resp.status == 503 and "no valid policy set loaded" in await resp.text()
    assert (await client.get("/healthz")).status == 200
    # requests that cannot add images are answered even before policies load
    assert (await post(client, "validate", load("pod-delete")))["response"]["allowed"] is True
    bad.write_text((POLICIES / "policies.yaml").read_text())

    async def ready() -> bool:
        return (await client.get("/readyz")).status == 200

    await eventually(ready)
    assert (await (await client.get("/readyz")).json()) == {"ready": True, "policies": 4}


async def test_metrics_and_log_event(client: TestClient[Any, Any], metrics: Metrics) -> None:
    review = load("deployment-create")
    with structlog.testing.capture_logs() as logs:
        await post(client, "mutate", review)
    value = metrics.registry.get_sample_value
    assert value("pullgate_admission_reviews_total", {"endpoint": "mutate", "outcome": "allowed"}) == 1
    assert value("pullgate_admission_review_duration_seconds_count", {"endpoint": "mutate"}) == 1
    assert value("pullgate_tag_resolutions_total", {"source": "cache"}) == 2
    assert (
        value("pullgate_admission_decisions_total", {"policy": "prod-pinned", "mode": "enforce", "result": "pass"}) == 2
    )
    assert (
        value("pullgate_admission_decisions_total", {"policy": "registries", "mode": "enforce", "result": "pass"}) == 3
    )
    (event,) = [e for e in logs if e["event"] == "admission_review"]
    assert {
        k: event[k] for k in ("uid", "namespace", "kind", "name", "operation", "allowed", "patched", "dry_run")
    } == {
        "uid": review["request"]["uid"],
        "namespace": "prod",
        "kind": "Deployment",
        "name": "web",
        "operation": "CREATE",
        "allowed": True,
        "patched": 2,
        "dry_run": False,
    }
    assert "web nginx:1.25 prod-pinned:allow" in event["decisions"]


async def test_dry_run_has_no_side_effects(client: TestClient[Any, Any], metrics: Metrics) -> None:
    with structlog.testing.capture_logs() as logs:
        answer = await post(client, "validate", load("pod-create-dryrun"))
    assert answer["response"]["allowed"] is False  # same answer as without dryRun
    assert (
        metrics.registry.get_sample_value(
            "pullgate_admission_decisions_total", {"policy": "audit-busybox", "mode": "audit", "result": "violation"}
        )
        is None
    )
    assert [e["event"] for e in logs] == ["admission_review"]
    assert logs[0]["dry_run"] is True and logs[0]["name"] == "web-"  # generateName


# --- TLS -----------------------------------------------------------------------------------
async def served_serial(port: int, server_name: str | None) -> int:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname=server_name or "")
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    await writer.wait_closed()
    return x509.load_der_x509_certificate(der).serial_number


async def test_tls_with_rotation(tmp_path: Path, metrics: Metrics) -> None:
    cert, key = write_cert(tmp_path, serial=1)
    cfg = config(listen=("127.0.0.1", 0), tls_cert=cert, tls_key=key)
    app = create_webhook_app(cfg, DictResolver(dict.fromkeys(TAGS)), metrics, structlog.get_logger())
    with structlog.testing.capture_logs() as logs:
        async with run_webhook(app, cfg, structlog.get_logger(), metrics) as server:
            assert server.tls is not None
            assert await served_serial(server.port, "localhost") == 1
            assert await served_serial(server.port, None) == 1  # no SNI
            context = ssl.create_default_context(cafile=str(cert))
            async with aiohttp.ClientSession() as session:
                url = f"https://localhost:{server.port}/mutate"
                async with session.post(url, json=load("pod-create"), ssl=context) as resp:
                    assert resp.status == 200
                    assert (await resp.json())["response"]["allowed"] is True
            write_cert(tmp_path, serial=2)
            reloader = server.tls  # its watcher polls every 10 s: reload now instead
            assert await reloader.reload()
            assert await served_serial(server.port, "localhost") == 2
            assert await served_serial(server.port, None) == 2  # no SNI: the callback runs too
            # a broken rotation keeps the current certificate
            key.write_text("garbage")
            assert not await reloader.reload()
            assert await served_serial(server.port, "localhost") == 2
    assert "admission_tls_reload_failed" in [e["event"] for e in logs]


async def test_plain_http_warns(metrics: Metrics) -> None:
    cfg = config(listen=("127.0.0.1", 0))
    app = create_webhook_app(cfg, DictResolver(), metrics, structlog.get_logger())
    with structlog.testing.capture_logs() as logs:
        async with run_webhook(app, cfg, structlog.get_logger(), metrics) as server:
            assert server.tls is None
            url = f"http://127.0.0.1:{server.port}/healthz"
            async with aiohttp.ClientSession() as session, session.get(url) as resp:
                assert resp.status == 200
    warning = next(e for e in logs if e["event"] == "admission_tls_disabled")
    assert warning["log_level"] == "warning"


def test_webhook_app_is_an_application(metrics: Metrics) -> None:
    app = create_webhook_app(config(), DictResolver(), metrics, structlog.get_logger())
    assert isinstance(app, web.Application)
    assert app._client_max_size == AdmissionConfig().max_body_size
