"""The shipped example policies (``policies/``), loaded together as one set by the real
daemon's webhook, do what each file says they do.

Convention (every file in ``policies/`` must follow it, so new examples are covered): the
file's comments hold one or more lines

    # expect: in NAMESPACE, IMAGE -> RESULT[, image becomes NEW_IMAGE]

RESULT is ``allowed`` (admitted, and no policy of this file warned or audited), ``denied
"TEXT"``, ``warned "TEXT"`` or ``audited "TEXT"`` (TEXT is part of the deny message, a
warning, or an audit annotation). ``image becomes`` is the image after ``/mutate``
(``<digest>`` stands for the digest the registry holds); without it the image must stay as
written. IMAGE followed by ``(not in any registry)`` is not pushed; every other image is
pushed (a plain test image) to the registry behind the daemon's ``docker.io`` and
``ghcr.io`` upstreams. Each expectation is one Pod: ``/mutate``, the patch applied, then
``/validate`` — what the API server does.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.oci.reference import ImageReference
from tests.support.daemon import Daemon
from tests.support.images import ImageFactory
from tests.support.procs import free_port, http_status, wait_until
from tests.support.registry import Registry

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ROOT / "policies"
REVIEW = Path(__file__).parent / "data" / "admission" / "pod-create.json"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_EXPECT = re.compile(
    r"^#\s*expect:\s*in (?P<namespace>[a-z0-9-]+), (?P<image>\S+)(?P<absent> \(not in any registry\))?"
    r' -> (?P<result>allowed|denied|warned|audited)(?: "(?P<text>[^"]+)")?(?:, image becomes (?P<new>\S+))?\s*$'
)


@dataclass(frozen=True)
class Expectation:
    file: str
    line: str
    namespace: str
    image: str
    present: bool
    result: str
    text: str | None
    new_image: str | None
    policies: tuple[str, ...]  # the file's own policies


def expectations(path: Path) -> list[Expectation]:
    policies = tuple(doc["metadata"]["name"] for doc in yaml.safe_load_all(path.read_text()) if doc)
    found = []
    for line in path.read_text().splitlines():
        if not re.match(r"^#\s*expect:", line):
            continue
        match = _EXPECT.match(line)
        assert match is not None, f"{path.name}: malformed expectation (see {__name__}'s docstring): {line}"
        found.append(
            Expectation(
                path.name,
                line,
                match["namespace"],
                match["image"],
                match["absent"] is None,
                match["result"],
                match["text"],
                match["new"],
                policies,
            )
        )
    return found


def example_files() -> list[Path]:
    return sorted(p for p in POLICIES.iterdir() if p.suffix in (".yaml", ".yml") and not p.name.startswith("."))


@pytest.mark.parametrize("path", example_files(), ids=lambda p: p.name)
def test_every_example_documents_its_effect(path: Path) -> None:
    found = expectations(path)
    assert found, f"{path.name}: add '# expect: in NAMESPACE, IMAGE -> RESULT' lines (see {__name__})"
    if len(found) > 0 and all(e.result == "allowed" and e.new_image is None for e in found):
        pytest.fail(f"{path.name}: no expectation shows what the policy does (deny, warn, audit or a mutation)")


@dataclass
class Webhook:
    url: str
    digests: dict[str, str]  # image as written -> digest pushed

    def post(self, path: str, review: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            f"{self.url}{path}", data=json.dumps(review).encode(), headers={"Content-Type": "application/json"}
        )
        with _OPENER.open(request, timeout=30) as response:
            answer: dict[str, Any] = json.loads(response.read())["response"]
            return answer


@pytest.fixture(scope="module")
def webhook(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Webhook]:
    """The daemon with policies/ and a registry of its own holding every image the
    expectations name (except those marked as absent)."""
    tmp = tmp_path_factory.mktemp("examples")
    factory = ImageFactory(tmp / "layouts")
    digests: dict[str, str] = {}
    with Registry(tmp / "registry") as registry:
        for expectation in (e for path in example_files() for e in expectations(path)):
            ref = ImageReference.parse(expectation.image)
            if not expectation.present or expectation.image in digests:
                continue
            image = factory.image("x", layers=[500], seed=expectation.image)
            registry.push(image.layout, "x", f"{ref.repository}:{ref.tag}")
            digests[expectation.image] = image.manifest_digest
        port = free_port()
        upstreams = [{"name": name, "url": registry.url} for name in ("docker.io", "ghcr.io")]
        admission = {"enabled": True, "listen": f"127.0.0.1:{port}"}
        with Daemon(tmp / "daemon", registry.url, upstreams=upstreams, admission=admission, policies=str(POLICIES)):
            url = f"http://127.0.0.1:{port}"
            wait_until(lambda: http_status(f"{url}/readyz") == 200, timeout=15, what="webhook")
            yield Webhook(url, digests)


def pod_review(namespace: str, image: str) -> dict[str, Any]:
    review: dict[str, Any] = copy.deepcopy(json.loads(REVIEW.read_text()))
    request = review["request"]
    request["namespace"] = request["object"]["metadata"]["namespace"] = namespace
    request["object"]["spec"] = {"containers": [{"name": "c", "image": image}]}
    return review


def mutated_image(answer: dict[str, Any], image: str) -> str:
    if "patch" not in answer:
        return image
    ops = json.loads(base64.b64decode(answer["patch"]))
    values = [op["value"] for op in ops if op["path"].endswith("/image")]
    return str(values[-1]) if values else image


@pytest.mark.parametrize(
    "expectation",
    [e for path in example_files() for e in expectations(path)],
    ids=lambda e: f"{e.file}:{e.namespace}:{e.image}",
)
def test_example_policies_together_do_what_each_file_says(webhook: Webhook, expectation: Expectation) -> None:
    e = expectation
    mutate = webhook.post("/mutate", pod_review(e.namespace, e.image))
    answers = [mutate]
    image = e.image
    if mutate["allowed"]:
        image = mutated_image(mutate, e.image)
        answers.append(webhook.post("/validate", pod_review(e.namespace, image)))
    allowed = all(a["allowed"] for a in answers)
    denial = " ".join(a.get("status", {}).get("message", "") for a in answers if not a["allowed"])
    warnings = [w for a in answers for w in a.get("warnings") or []]
    audits = json.dumps([a.get("auditAnnotations") or {} for a in answers])
    context = f"{e.file}: {e.line}\n  allowed={allowed} denial={denial!r}\n  warnings={warnings}\n  audits={audits}"
    if e.result == "denied":
        assert not allowed and e.text is not None and e.text in denial, context
        return
    assert allowed, context
    if e.result == "warned":
        assert any(e.text in w for w in warnings), context
    elif e.result == "audited":
        assert e.text is not None and e.text in audits, context
    else:
        mine = [p for p in e.policies if any(f"policy {p} " in text for text in [*warnings, audits])]
        assert not mine, f"{context}\n  this file's policies {mine} objected"
    expected = (e.new_image or e.image).replace("<digest>", webhook.digests.get(e.image, "<digest>"))
    assert image == expected, context
