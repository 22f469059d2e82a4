"""AdmissionReview requests shaped exactly as the API server sends them, built from the
recorded fixtures in ``tests/data/admission`` with one container's image (and optionally
its namespace and security contexts) replaced."""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent.parent / "data" / "admission"


@cache
def _fixture(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((DATA / name).read_text())
    return loaded


def pod_review(
    image: str,
    *,
    namespace: str | None = None,
    pod_security: dict[str, Any] | None = None,
    container_security: dict[str, Any] | None = None,
    fixture: str = "pod-create.json",
) -> dict[str, Any]:
    """A Pod CREATE review whose only container ``app`` runs ``image``."""
    doc = copy.deepcopy(_fixture(fixture))
    obj = doc["request"]["object"]
    if namespace is not None:
        doc["request"]["namespace"] = namespace
        obj["metadata"]["namespace"] = namespace
    spec = obj["spec"]
    spec["containers"] = [{**spec["containers"][0], "name": "app", "image": image}]
    for key in ("initContainers", "ephemeralContainers", "volumes"):
        spec.pop(key, None)
    if pod_security is not None:
        spec["securityContext"] = pod_security
    if container_security is not None:
        spec["containers"][0]["securityContext"] = container_security
    return doc
