"""Kubernetes workload objects: which kinds carry a PodSpec and where (``POD_SPEC_PATHS``),
every image in it with the JSON pointer that patches it (``extract_sites``), and reading
such objects from manifest files (``read_objects``: multi-document YAML, ``kind: List``).

The one reader of Kubernetes objects: the webhook judges what the API server sends,
``pullgate policy check`` what a file holds, ``pullgate warm --from-manifests`` pre-pulls the
images a file runs — all through the same PodSpec walk. Shapes follow core/v1 (PodSpec,
Container, ImageVolumeSource) and the workload kinds of apps/v1 and batch/v1; anything
malformed raises ``WorkloadInvalid`` (400), never a 500.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from proxy.errors import PullgateError
from proxy.policy.sites import ImageSite


class WorkloadInvalid(PullgateError):
    """A Kubernetes object (or manifest file) that cannot be read; the message says where."""

    code, status = "BAD_REQUEST", 400


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
            raise WorkloadInvalid(f"{'.'.join(path[: i + 1])}: not an object")
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
        raise WorkloadInvalid(f"{prefix}/{field}: not a list")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise WorkloadInvalid(f"{prefix}/{field}/{i}: not an object")
        yield i, item


def _image(value: object, pointer: str) -> str | None:
    # Templates may leave the image out for tools to fill in (core/v1 Container.image).
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise WorkloadInvalid(f"{pointer}: not a string")
    return value


def group_kind(obj: Mapping[str, Any]) -> tuple[str, str]:
    """(API group, kind) of an object: ``apps/v1`` -> ``apps``, ``v1`` -> the core group ``""``."""
    api_version = obj.get("apiVersion")
    group = api_version.rpartition("/")[0] if isinstance(api_version, str) else ""
    kind = obj.get("kind")
    return group, kind if isinstance(kind, str) else ""


def read_objects(name: str) -> list[tuple[str, Mapping[str, Any]]]:
    """The objects with a PodSpec in one manifest file (``-``: stdin), labelled
    ``FILE#DOCUMENT``; other kinds are skipped, ``kind: List`` items are read."""
    try:
        text = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkloadInvalid(f"{name}: cannot read manifests: {exc}") from exc
    try:
        documents = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        raise WorkloadInvalid(f"{name}: not YAML: {exc}") from exc
    found: list[tuple[str, Mapping[str, Any]]] = []
    for number, doc in enumerate(documents, 1):
        items = doc.get("items") if isinstance(doc, dict) and doc.get("kind") == "List" else [doc]
        for obj in items if isinstance(items, list) else ():
            if isinstance(obj, dict) and group_kind(obj) in POD_SPEC_PATHS:
                found.append((f"{name}#{number}", obj))
    return found


def images_in_files(names: Sequence[str]) -> list[str]:
    """Every image the objects in ``names`` run, in order of appearance, without repeats."""
    found: dict[str, None] = {}
    for name in names:
        for label, obj in read_objects(name):
            found.update((site.image, None) for site in sites_of(obj, label))
    return list(found)


def sites_of(obj: Mapping[str, Any], label: str) -> tuple[ImageSite, ...]:
    """``extract_sites`` for an object read from a file; errors name ``label`` first."""
    try:
        return extract_sites(obj, *group_kind(obj))
    except WorkloadInvalid as exc:
        raise WorkloadInvalid(f"{label}: {exc.message}") from exc
