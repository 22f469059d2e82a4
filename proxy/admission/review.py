"""Kubernetes AdmissionReview (admission.k8s.io/v1): parsing requests, which images a request
introduces (found by ``proxy.admission.workloads``), and building responses with JSONPatch
mutations.

Shapes follow https://kubernetes.io/docs/reference/access-authn-authz/extensible-admission-controllers/
(request and response). The body is untrusted JSON (``proxy.oci.jsondoc``: size and depth
bounded). Anything malformed raises ``ReviewInvalid`` or ``WorkloadInvalid`` (HTTP 400);
it never becomes a 500.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from proxy.admission.workloads import POD_SPEC_PATHS, WorkloadInvalid, extract_sites
from proxy.errors import PullgateError
from proxy.oci import jsondoc
from proxy.policy.sites import ImageSite, clip

API_VERSION = "admission.k8s.io/v1"
OPERATIONS = ("CREATE", "UPDATE", "DELETE", "CONNECT")
# Pods nest ~12 levels inside an AdmissionReview, CronJobs ~16; CRD-heavy objects more, but
# nothing the API server stores comes near this. Far below Python's recursion limit.
MAX_DEPTH = 200

# Subresources whose requests carry a whole Pod with new images; others (status, binding,
# eviction, scale, ...) cannot change images.
_IMAGE_SUBRESOURCES = ("", "ephemeralcontainers")


class ReviewInvalid(PullgateError):
    code, status = "BAD_REQUEST", 400


@dataclass(frozen=True, slots=True)
class AdmissionRequest:
    uid: str
    group: str
    kind: str
    sub_resource: str
    name: str
    namespace: str
    operation: str
    object: Mapping[str, Any] | None
    old_object: Mapping[str, Any] | None
    dry_run: bool

    @property
    def checks_images(self) -> bool:
        """Whether this request can introduce images (else it is allowed untouched)."""
        return (
            self.operation in ("CREATE", "UPDATE")
            and (self.group, self.kind) in POD_SPEC_PATHS
            and self.sub_resource in _IMAGE_SUBRESOURCES
            and self.object is not None
        )


def parse_review(body: bytes) -> AdmissionRequest:
    """The request of an AdmissionReview body; ``ReviewInvalid`` (400) for anything else,
    including JSON nested deeper than any Kubernetes object (``MAX_DEPTH``). The size is
    bounded before: by the listener (``admission.max_body_size``)."""
    review = jsondoc.parse_object(body, "AdmissionReview body", max_depth=MAX_DEPTH, error=ReviewInvalid)
    if review.get("apiVersion") != API_VERSION or review.get("kind") != "AdmissionReview":
        raise ReviewInvalid(
            f"expected apiVersion {API_VERSION} kind AdmissionReview, got "
            f"{str(review.get('apiVersion'))[:60]!r} {str(review.get('kind'))[:60]!r}"
        )
    request = review.get("request")
    if not isinstance(request, dict):
        raise ReviewInvalid("request: missing or not an object")
    return _parse_request(request)


def _parse_request(request: Mapping[str, Any]) -> AdmissionRequest:
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise ReviewInvalid("request.uid: missing or not a string")
    kind = request.get("kind")
    if not isinstance(kind, dict) or not isinstance(kind.get("kind"), str):
        raise ReviewInvalid("request.kind: missing or not a GroupVersionKind")
    operation = request.get("operation")
    if operation not in OPERATIONS:
        raise ReviewInvalid(f"request.operation: must be one of {', '.join(OPERATIONS)}")
    return AdmissionRequest(
        uid=uid,
        group=_string(kind, "group", "request.kind.group"),
        kind=kind["kind"],
        sub_resource=_string(request, "subResource", "request.subResource"),
        name=_string(request, "name", "request.name"),
        namespace=_string(request, "namespace", "request.namespace"),
        operation=str(operation),
        object=_object(request, "object"),
        old_object=_object(request, "oldObject"),
        dry_run=request.get("dryRun") is True,
    )


def _string(data: Mapping[str, Any], key: str, where: str) -> str:
    value = data.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ReviewInvalid(f"{where}: not a string")
    return value


def _object(request: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    value = request.get(key)
    if value is not None and not isinstance(value, dict):
        raise ReviewInvalid(f"request.{key}: not an object")
    return value


def sites_to_check(request: AdmissionRequest) -> tuple[ImageSite, ...]:
    """The images a request introduces: all on CREATE, on UPDATE only those not already in
    the old object with the same user to run as (they were admitted before, and policies
    depend only on the image, the user it runs as and the namespace, which an update
    cannot change)."""
    if not request.checks_images or request.object is None:
        return ()
    sites = extract_sites(request.object, request.group, request.kind)
    if request.operation == "UPDATE" and request.old_object is not None:
        try:
            old = {_admitted(s) for s in extract_sites(request.old_object, request.group, request.kind)}
        except WorkloadInvalid:
            old = set()
        sites = tuple(s for s in sites if _admitted(s) not in old)
    return sites


def _admitted(site: ImageSite) -> tuple[str, int | None, bool | None]:
    return site.image, site.run_as_user, site.run_as_non_root


def review_response(
    uid: str,
    *,
    allowed: bool,
    message: str | None = None,
    patch: Sequence[Mapping[str, Any]] = (),
    warnings: Sequence[str] = (),
    audit_annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """An AdmissionReview answer; denials carry ``status`` 403 with ``message``."""
    response: dict[str, Any] = {"uid": uid, "allowed": allowed}
    if not allowed:
        response["status"] = {"code": 403, "message": message or "denied"}
    elif message:
        response["status"] = {"code": 200, "message": message}
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(list(patch)).encode()).decode()
    if warnings:
        response["warnings"] = [clip(w) for w in warnings]
    if audit_annotations:
        response["auditAnnotations"] = dict(audit_annotations)
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}
