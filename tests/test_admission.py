"""AdmissionReview parsing, image extraction for every kind and container list, UPDATE
diffs and response building."""

from __future__ import annotations

import base64
import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.admission.review import (
    ReviewInvalid,
    clip,
    parse_review,
    review_response,
    sites_to_check,
)
from proxy.admission.workloads import WorkloadInvalid

ADMISSION = Path(__file__).parent / "data" / "admission"
TEMPLATE = "/spec/template/spec"
THREE = [
    (f"{TEMPLATE}/containers/0/image", "web", "nginx:1.25"),
    (f"{TEMPLATE}/containers/1/image", "sidecar", "ghcr.io/acme/proxy:2.1"),
    (f"{TEMPLATE}/containers/2/image", "metrics", "quay.io/prometheus/node-exporter:v1.8.0"),
]


def fixture(name: str) -> bytes:
    return (ADMISSION / f"{name}.json").read_bytes()


def with_prefix(prefix: str) -> list[tuple[str, str, str]]:
    return [(p.replace(TEMPLATE, prefix), n, i) for p, n, i in THREE]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("deployment-create", THREE),
        ("replicaset-create", THREE),
        ("statefulset-create", THREE),
        ("daemonset-create", THREE),
        ("job-create", THREE),
        ("replicationcontroller-create", THREE),
        ("cronjob-create", with_prefix("/spec/jobTemplate/spec/template/spec")),
        ("podtemplate-create", with_prefix("/template/spec")),
        (
            "pod-create",
            [
                ("/spec/initContainers/0/image", "setup", "busybox"),
                ("/spec/containers/0/image", "web", "nginx:1.25"),
                ("/spec/containers/1/image", "sidecar", "ghcr.io/acme/proxy:2.1"),
                ("/spec/volumes/0/image/reference", "models", "ghcr.io/acme/models:v3"),
            ],
        ),
        # UPDATE: only what changed
        ("deployment-update", [(*THREE[1][:2], "ghcr.io/acme/proxy:2.2")]),
        ("deployment-update-scale", []),
        (
            "pod-ephemeral-update",
            [("/spec/ephemeralContainers/0/image", "debugger-x7k2p", "busybox:1.36")],
        ),
        # nothing to check: DELETE, CONNECT, status subresource, other kinds
        ("pod-delete", []),
        ("pod-exec-connect", []),
        ("pod-status-update", []),
        ("configmap-create", []),
    ],
)
def test_sites(name: str, expected: list[tuple[str, str, str]]) -> None:
    request = parse_review(fixture(name))
    sites = sites_to_check(request)
    assert [(s.pointer, s.name, s.image) for s in sites] == expected
    for site in sites:  # every pointer really points at the image
        node: Any = request.object
        for part in site.pointer.strip("/").split("/"):
            node = node[int(part)] if isinstance(node, list) else node[part]
        assert node == site.image


def test_request_fields() -> None:
    request = parse_review(fixture("pod-ephemeral-update"))
    assert (request.group, request.kind, request.sub_resource, request.operation) == (
        "",
        "Pod",
        "ephemeralcontainers",
        "UPDATE",
    )
    assert (request.name, request.namespace, request.dry_run) == ("web-7d9f8", "prod", False)
    assert parse_review(fixture("pod-create-dryrun")).dry_run is True


def review(**request: Any) -> bytes:
    base: dict[str, Any] = {
        "uid": "u1",
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "operation": "CREATE",
        "namespace": "ns",
        "object": {"spec": {"containers": [{"name": "c", "image": "nginx"}]}},
    }
    base.update(request)
    return json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": base}).encode()


def spec(**pod_spec: Any) -> dict[str, Any]:
    return {"spec": pod_spec}


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"", "body is not JSON"),
        (b"{not json", "body is not JSON"),
        (b"\xff\xfe", "body is not JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "AdmissionReview body nests deeper than 200 levels"),
        (b'{"a":' * 201 + b"1" + b"}" * 201, "AdmissionReview body nests deeper than 200 levels"),
        (b'{"a":' * 199 + b"1" + b"}" * 199, "expected apiVersion admission.k8s.io/v1"),
        (b'{"a": NaN}', "body is not JSON: NaN is not JSON"),
        (b"[]", "body is not a JSON object"),
        (
            b'{"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview"}',
            "expected apiVersion admission.k8s.io/v1 kind AdmissionReview, got "
            "'admission.k8s.io/v1beta1' 'AdmissionReview'",
        ),
        (b'{"apiVersion": "admission.k8s.io/v1", "kind": "Pod"}', "kind AdmissionReview, got"),
        (b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}', "request: missing or not an object"),
        (
            b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": 1}',
            "request: missing or not an object",
        ),
        (review(uid=""), "request.uid: missing or not a string"),
        (review(uid=7), "request.uid: missing or not a string"),
        (review(kind="Pod"), "request.kind: missing or not a GroupVersionKind"),
        (review(kind={"group": 1, "kind": "Pod"}), "request.kind.group: not a string"),
        (review(operation="PATCH"), "request.operation: must be one of CREATE, UPDATE"),
        (review(namespace=3), "request.namespace: not a string"),
        (review(subResource=[]), "request.subResource: not a string"),
        (review(object=[]), "request.object: not an object"),
        (review(oldObject="x"), "request.oldObject: not an object"),
    ],
    ids=lambda value: repr(value[:40]) if isinstance(value, bytes) else None,
)
def test_parse_errors(body: bytes, error: str) -> None:
    with pytest.raises(ReviewInvalid) as info:
        parse_review(body)
    assert error in info.value.message
    assert info.value.status == 400


@pytest.mark.parametrize(
    ("obj", "error"),
    [
        ({"spec": []}, "spec: not an object"),
        (spec(containers={}), "/spec/containers: not a list"),
        (spec(containers=["nginx"]), "/spec/containers/0: not an object"),
        (spec(containers=[{"name": "c", "image": 5}]), "/spec/containers/0/image: not a string"),
        (spec(volumes=[{"name": "v", "image": {"reference": ["x"]}}]), "/spec/volumes/0/image/reference: not a string"),
    ],
)
def test_malformed_objects(obj: dict[str, Any], error: str) -> None:
    with pytest.raises(WorkloadInvalid, match=error):
        sites_to_check(parse_review(review(object=obj)))


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({}, []),  # no spec
        (spec(containers=[{"name": "c"}]), []),  # templates may leave the image out
        (spec(containers=[{"image": "x"}]), [("#0", "x")]),  # unnamed: by index
        (spec(volumes=[{"name": "v", "emptyDir": {}}, {"name": "i", "image": {}}]), []),
    ],
)
def test_lenient_objects(obj: dict[str, Any], expected: list[tuple[str, str]]) -> None:
    sites = sites_to_check(parse_review(review(object=obj)))
    assert [(s.name, s.image) for s in sites] == expected


def test_update_with_malformed_old_object_checks_everything() -> None:
    body = review(operation="UPDATE", oldObject={"spec": {"containers": 1}})
    assert [s.image for s in sites_to_check(parse_review(body))] == ["nginx"]


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(
                st.sampled_from(
                    ["spec", "containers", "image", "name", "volumes", "reference", "template", "initContainers", "x"]
                ),
                inner,
                max_size=4,
            )
        ),
        max_leaves=20,
    )
)
def test_fuzz_objects_never_crash(obj: Any) -> None:
    """Whatever the object holds, extraction either works or raises its 400 error."""
    for kind in ("Pod", "Deployment"):
        group = "apps" if kind == "Deployment" else ""
        body = review(object=obj, kind={"group": group, "version": "v1", "kind": kind})
        with contextlib.suppress(ReviewInvalid, WorkloadInvalid):
            sites_to_check(parse_review(body))


def test_response_allowed_with_patch() -> None:
    ops = [{"op": "replace", "path": "/spec/containers/0/image", "value": "x@sha256:1"}]
    answer = review_response("u1", allowed=True, patch=ops, warnings=["w" * 200], audit_annotations={"p": "m"})
    assert answer == {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": {
            "uid": "u1",
            "allowed": True,
            "patchType": "JSONPatch",
            "patch": base64.b64encode(json.dumps(ops).encode()).decode(),
            "warnings": ["w" * 119 + "…"],
            "auditAnnotations": {"p": "m"},
        },
    }


def test_response_denied() -> None:
    assert review_response("u1", allowed=False, message="no")["response"] == {
        "uid": "u1",
        "allowed": False,
        "status": {"code": 403, "message": "no"},
    }


@pytest.mark.parametrize(("text", "limit", "expected"), [("abc", 3, "abc"), ("abcd", 3, "ab…")])
def test_clip(text: str, limit: int, expected: str) -> None:
    assert clip(text, limit) == expected
