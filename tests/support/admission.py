"""AdmissionReview requests shaped exactly as the API server sends them, built from the
recorded fixtures in ``tests/data/admission`` with one container's image (and optionally
its namespace and security contexts) replaced."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.registry import Registry

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


@dataclass
class WebhookWorld:
    """A webhook under test in front of a real registry (``repo`` is the test's own
    repository there); end-to-end test modules extend it with what they need."""

    registry: Registry
    webhook: str  # base URL of the webhook listener
    session: aiohttp.ClientSession
    repo: str

    async def answer(self, endpoint: str, review: dict[str, Any]) -> dict[str, Any]:
        """POST ``review`` to ``/validate`` or ``/mutate``; the AdmissionReview's ``response``."""
        async with self.session.post(f"{self.webhook}/{endpoint}", json=review) as response:
            assert response.status == 200, await response.text()
            answer: dict[str, Any] = (await response.json())["response"]
            return answer
