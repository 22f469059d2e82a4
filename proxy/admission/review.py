"""Kubernetes AdmissionReview (admission.k8s.io/v1): parsing requests, finding every image in
Pods and pod templates, and building responses with JSONPatch mutations.

Shapes follow https://kubernetes.io/docs/reference/access-authn-authz/extensible-admission-controllers/
(request and response) and the core/v1 PodSpec (where images live). Anything malformed
raises ``ReviewInvalid`` (HTTP 400); it never becomes a 500.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from proxy.errors import PullgateError
from proxy.policy.sites import ImageSite, clip

API_VERSION = "admission.k8s.io/v1"
OPERATIONS = ("CREATE", "UPDATE", "DELETE", "CONNECT")

# Where the PodSpec sits in each kind that carries one, by (API group, kind).
POD_SPEC_PATHS: Mapping[tuple[str, str], tuple[str, ...]] = {
    ("", "Pod"): ("spec",),
    ("", "PodTemplate"): ("template", "spec"),
    ("", "ReplicationController"): ("spec", "template", "spec"),
    ("apps", "Deployment"): ("spec", "template", "spec"),
    ("apps", "ReplicaSet"): ("spec", "template", "spec"),
    ("apps", "StatefulSet"): ("spec", "template", "spec"),
    ("apps", "DaemonSet"): ("spec", "template", "spec"),
    ("batch", "Job"): ("spec", "template", "spec"),
    ("batch", "CronJob"): ("spec", "jobTemplate", "spec", "template", "spec"),
}
CONTAINER_LISTS = ("initContainers", "containers", "ephemeralContainers")
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
    try:
        review = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ReviewInvalid(f"body is not JSON: {str(exc)[:200]}") from exc
    if not isinstance(review, dict):
        raise ReviewInvalid("body is not a JSON object")
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


def extract_sites(obj: Mapping[str, Any], group: str, kind: str) -> tuple[ImageSite, ...]:
    """Every image in the object's PodSpec (empty for kinds without one)."""
    path = POD_SPEC_PATHS.get((group, kind))
    if path is None:
        return ()
    spec: Any = obj
    for i, key in enumerate(path):
        spec = spec.get(key)
        if spec is None:
            return ()
        if not isinstance(spec, dict):
            raise ReviewInvalid(f"{'.'.join(path[: i + 1])}: not an object")
    prefix = "/" + "/".join(path)
    return tuple(_pod_spec_sites(spec, prefix))


def _pod_spec_sites(spec: Mapping[str, Any], prefix: str) -> Iterator[ImageSite]:
    pod_user, pod_non_root = _run_as(spec)
    for field in CONTAINER_LISTS:
        for i, container in _items(spec, field, prefix):
            image = _image(container.get("image"), f"{prefix}/{field}/{i}/image")
            if image is not None:
                name = str(container.get("name") or f"#{i}")
                user, non_root = _run_as(container)
                yield ImageSite(
                    f"{prefix}/{field}/{i}/image",
                    field,
                    name,
                    image,
                    pod_user if user is None else user,
                    pod_non_root if non_root is None else non_root,
                )
    for i, volume in _items(spec, "volumes", prefix):
        source = volume.get("image")
        if isinstance(source, dict):
            pointer = f"{prefix}/volumes/{i}/image/reference"
            image = _image(source.get("reference"), pointer)
            if image is not None:
                yield ImageSite(pointer, "volumes", str(volume.get("name") or f"#{i}"), image)


def _run_as(holder: Mapping[str, Any]) -> tuple[int | None, bool | None]:
    """``securityContext.runAsUser`` and ``runAsNonRoot`` of a pod spec or container; the
    container's settings win over the pod's (core/v1 SecurityContext). The API server has
    already checked the types; anything else counts as unset."""
    context = holder.get("securityContext")
    if not isinstance(context, dict):
        return None, None
    user, non_root = context.get("runAsUser"), context.get("runAsNonRoot")
    return (
        user if isinstance(user, int) and not isinstance(user, bool) else None,
        non_root if isinstance(non_root, bool) else None,
    )


def _items(spec: Mapping[str, Any], field: str, prefix: str) -> Iterator[tuple[int, Any]]:
    items = spec.get(field)
    if items is None:
        return
    if not isinstance(items, list):
        raise ReviewInvalid(f"{prefix}/{field}: not a list")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ReviewInvalid(f"{prefix}/{field}/{i}: not an object")
        yield i, item


def _image(value: object, pointer: str) -> str | None:
    # Templates may leave the image out for tools to fill in (core/v1 Container.image).
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ReviewInvalid(f"{pointer}: not a string")
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
        except ReviewInvalid:
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
