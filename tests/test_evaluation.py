"""Policy evaluation: every rule, every mode, namespaces, exclusions, defaults, mutations
(tag pinning, registry rewrite, idempotence) and tag-resolution failures."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import pytest

from proxy.errors import NameUnknown, UpstreamDenied, UpstreamRateLimited, UpstreamUnavailable
from proxy.policy.active import PolicySet
from proxy.policy.document import Policy, parse_policy
from proxy.policy.evaluation import Evaluator, NoMatch, pin_text
from proxy.policy.rules.base import ImageContext
from proxy.policy.sites import ImageSite
from tests.support.resolver import DictResolver, text_digest

D = "sha256:" + "a" * 64
NGINX = "docker.io/library/nginx:1.25"
PINNED = f"nginx:1.25@{text_digest(NGINX)}"


def pol(
    name: str = "p",
    mode: str = "enforce",
    images: tuple[str, ...] = ("**",),
    exclude: tuple[str, ...] = (),
    namespaces: list[str] | None = None,
    **rules: Any,
) -> Policy:
    match: dict[str, Any] = {"images": list(images), "excludeImages": list(exclude)}
    if namespaces is not None:
        match["namespaces"] = namespaces
    return parse_policy(
        {
            "apiVersion": "pullgate.dev/v1",
            "kind": "ImagePolicy",
            "metadata": {"name": name},
            "spec": {"mode": mode, "match": match, "rules": rules},
        }
    )


def site(image: str, name: str = "web", field: str = "containers") -> ImageSite:
    return ImageSite(f"/spec/{field}/0/image", field, name, image)


async def evaluate(
    policies: list[Policy],
    images: list[str],
    *,
    mutate: bool = False,
    namespace: str = "prod",
    no_match: NoMatch = "allow",
    resolver: DictResolver | None = None,
) -> Any:
    evaluator = Evaluator(
        PolicySet.of(tuple(policies)), no_match, resolver if resolver is not None else DictResolver({NGINX: None})
    )
    sites = tuple(site(image, f"c{i}") for i, image in enumerate(images))
    return await evaluator.evaluate(sites, namespace, mutate=mutate)


REQUIRE = {"requireDigest": True}
PIN = {"requireDigest": True, "resolveTags": True}


@pytest.mark.parametrize(
    ("policy", "image", "mutate", "outcomes", "message", "new_image"),
    [
        # requireDigest
        (
            pol("prod-pinned", **REQUIRE),
            "nginx:1.25",
            False,
            ["deny"],
            'container "c0" image "nginx:1.25": policy prod-pinned requires a digest',
            None,
        ),
        (pol(**REQUIRE), f"nginx@{D}", False, ["allow"], "", None),
        (pol(**REQUIRE), "nginx:1.25", True, ["deny"], "policy p requires a digest", None),
        # resolveTags pins, and requireDigest then passes
        (pol(**PIN), "nginx:1.25", True, ["allow"], "", PINNED),
        (pol(**PIN), "nginx:1.25", False, ["deny"], "requires a digest", None),  # /validate
        (
            pol(**PIN),
            "docker.io/library/nginx:1.25",
            True,
            ["allow"],
            "",
            f"docker.io/library/nginx:1.25@{text_digest(NGINX)}",
        ),
        (
            pol(**PIN),
            "nginx:9",
            True,
            ["deny"],
            "requires a digest (tag resolution failed: tag 9 not found in docker.io/library/nginx)",
            None,
        ),
        (
            pol(resolveTags=True),
            "nginx:9",
            True,
            ["deny"],
            "policy p could not pin the tag to a digest: tag 9 not found",
            None,
        ),
        (pol(mode="warn", resolveTags=True), "nginx:9", True, ["warn"], "could not pin", None),
        (pol(**PIN), f"nginx:1.25@{D}", True, ["allow"], "", None),  # idempotent
        # allowedRegistries
        (pol(allowedRegistries=["ghcr.io", "index.docker.io"]), "nginx", False, ["allow"], "", None),
        (
            pol(allowedRegistries=["ghcr.io", "docker.io"]),
            "quay.io/x/y:1",
            False,
            ["deny"],
            "policy p does not allow registry quay.io (allowed: ghcr.io, docker.io)",
            None,
        ),
        (pol(allowedRegistries=["*.acme.example"]), "r.acme.example/x:1", False, ["allow"], "", None),
        (pol(allowedRegistries=["localhost:5000"]), "localhost:5000/x", False, ["allow"], "", None),
        # denyTags: a bare name counts as :latest
        (pol(denyTags=["latest"]), "nginx", False, ["deny"], "policy p denies tag latest", None),
        (pol(denyTags=["latest"]), "nginx:latest", False, ["deny"], "denies tag latest", None),
        (pol(denyTags=["latest"]), f"nginx@{D}", False, ["allow"], "", None),
        (pol(denyTags=["*-rc*"]), "nginx:1.25-rc1", False, ["deny"], "denies tag 1.25-rc1", None),
        (pol(denyTags=["latest"]), "nginx:1.25", False, ["allow"], "", None),
        # modes
        (pol(mode="warn", **REQUIRE), "nginx:1.25", False, ["warn"], "requires a digest", None),
        (pol(mode="audit", **REQUIRE), "nginx:1.25", False, ["audit"], "requires a digest", None),
        # one violation per rule
        (pol(denyTags=["latest"], **REQUIRE), "nginx", False, ["deny", "deny"], "requires a digest", None),
        # matching: exclusions and namespaces fall through to defaults.no_match (allow)
        (pol(exclude=("docker.io/library/*",), **REQUIRE), "nginx", False, ["allow"], "", None),
        (pol(namespaces=["payments-*"], **REQUIRE), "nginx", False, ["allow"], "", None),
        (pol(images=("ghcr.io/**",), **REQUIRE), "nginx", False, ["allow"], "", None),
        # invalid references are denied whatever the policies say
        (
            pol(),
            "Not/Valid",
            False,
            ["deny"],
            'container "c0" image "Not/Valid": invalid image reference: invalid repository',
            None,
        ),
        (pol(), f"nginx@sha256:{'z' * 64}", False, ["deny"], "invalid image reference", None),
    ],
)
async def test_rules_and_modes(
    policy: Policy,
    image: str,
    mutate: bool,
    outcomes: list[str],
    message: str,
    new_image: str | None,
) -> None:
    evaluation = await evaluate([policy], [image], mutate=mutate)
    (result,) = evaluation.results
    assert [d.outcome for d in result.decisions] == outcomes
    assert message in " ".join(d.message for d in result.decisions)
    assert result.new_image == new_image


@pytest.mark.parametrize(
    ("no_match", "outcome", "message"),
    [
        ("allow", "allow", ""),
        ("warn", "warn", 'container "c0" image "nginx": no policy matches (defaults.no_match: warn)'),
        ("deny", "deny", 'container "c0" image "nginx": no policy matches (defaults.no_match: deny)'),
    ],
)
async def test_no_match_default(no_match: NoMatch, outcome: str, message: str) -> None:
    evaluation = await evaluate([pol(namespaces=["other"])], ["nginx"], no_match=no_match)
    (decision,) = evaluation.decisions
    assert (decision.policy, decision.outcome, decision.message) == (None, outcome, message)


async def test_every_matching_policy_must_pass() -> None:
    policies = [
        pol("a", allowedRegistries=["docker.io"]),
        pol("b", denyTags=["latest"]),
        pol("c", mode="warn", **REQUIRE),
    ]
    evaluation = await evaluate(policies, ["nginx"])
    assert [(d.policy, d.outcome) for d in evaluation.decisions] == [
        ("a", "allow"),
        ("b", "deny"),
        ("c", "warn"),
    ]
    assert not evaluation.allowed
    assert evaluation.warnings() == ['container "c0" image "nginx": policy c requires a digest']


async def test_audit_annotations_per_policy() -> None:
    evaluation = await evaluate([pol("a", mode="audit", **REQUIRE)], ["nginx", "busybox:1"])
    assert evaluation.allowed
    assert evaluation.audit_annotations() == {
        "a": 'container "c0" image "nginx": policy a requires a digest; '
        'container "c1" image "busybox:1": policy a requires a digest',
    }


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (
            UpstreamUnavailable("connect to registry-1.docker.io timed out"),
            "upstream docker.io unreachable: connect to registry-1.docker.io timed out",
        ),
        (UpstreamDenied("401 from upstream"), "upstream docker.io refused access (auth)"),
        (UpstreamRateLimited("429"), "upstream docker.io rate-limited us"),
        (NameUnknown("not mirrored"), "the mirror has no upstream for docker.io"),
    ],
)
async def test_resolution_failures_say_why(error: Exception, reason: str) -> None:
    resolver = DictResolver({NGINX: error})  # type: ignore[dict-item]
    evaluation = await evaluate([pol(**PIN)], ["nginx:1.25"], mutate=True, resolver=resolver)
    (decision,) = evaluation.decisions
    assert decision.outcome == "deny"
    assert f"requires a digest (tag resolution failed: {reason}" in decision.message
    assert evaluation.results[0].resolution == "failed"


@pytest.mark.parametrize(
    ("image", "new_image"),
    [
        ("nginx", f"nginx:latest@{text_digest('docker.io/library/nginx:latest')}"),
        ("nginx:1.25", PINNED),
        ("localhost:5000/app:v1", f"localhost:5000/app:v1@{text_digest('localhost:5000/app:v1')}"),
    ],
)
async def test_pin_keeps_the_tag(image: str, new_image: str) -> None:
    resolver = DictResolver({"docker.io/library/nginx:latest": None, NGINX: None, "localhost:5000/app:v1": None})
    evaluation = await evaluate([pol(resolveTags=True)], [image], mutate=True, resolver=resolver)
    assert evaluation.results[0].new_image == new_image
    again = await evaluate([pol(resolveTags=True)], [new_image], mutate=True, resolver=resolver)
    assert again.results[0].new_image is None and again.allowed  # idempotent


@pytest.mark.parametrize(
    ("image", "rules", "new_image"),
    [
        ("nginx:1.25", {"rewriteRegistry": "m:5000"}, "m:5000/docker.io/library/nginx:1.25"),
        (
            "nginx:1.25",
            {"rewriteRegistry": "m:5000", **PIN},
            f"m:5000/docker.io/library/nginx:1.25@{text_digest(NGINX)}",
        ),
        (f"ghcr.io/a/b@{D}", {"rewriteRegistry": "m:5000"}, f"m:5000/ghcr.io/a/b@{D}"),
        ("localhost:5000/x:1", {"rewriteRegistry": "m:5000"}, None),  # host:port stays
    ],
)
async def test_rewrite_registry(image: str, rules: dict[str, Any], new_image: str | None) -> None:
    policies = [pol(**rules)]
    evaluation = await evaluate(policies, [image], mutate=True)
    assert evaluation.results[0].new_image == new_image
    assert evaluation.allowed
    if new_image is not None:  # the moved image is judged as the original, and left alone
        again = await evaluate(policies, [new_image], mutate=True)
        assert again.results[0].new_image is None and again.allowed
        assert again.decisions[0].policy == "p"


async def test_resolution_once_per_tag_and_concurrent() -> None:
    tags = {f"docker.io/library/img{i}:1": None for i in range(3)}
    resolver = DictResolver(tags, delay=0.2, source="upstream")
    images = ["img0:1", "img1:1", "img2:1", "img0:1"]
    started = time.perf_counter()
    evaluation = await evaluate([pol(**PIN)], images, mutate=True, resolver=resolver)
    assert time.perf_counter() - started < 0.35  # concurrent, not 4 x 0.2 s
    assert sorted(resolver.calls) == sorted(tags)  # the repeated tag resolved once
    assert [r.resolution for r in evaluation.results] == ["upstream"] * 4
    assert evaluation.allowed and len(evaluation.patch()) == 4


async def test_patch_ops() -> None:
    evaluation = await evaluate([pol(**PIN)], ["nginx:1.25", f"nginx@{D}"], mutate=True)
    assert evaluation.patch() == [
        {"op": "replace", "path": "/spec/containers/0/image", "value": PINNED},
    ]


@dataclass(frozen=True)
class DigestPrefixRule:
    """A plug-in rule that needs the resolved digest (like signature checks will)."""

    name = "digestPrefix"
    prefix: str

    async def check(self, image: ImageContext) -> tuple[str, ...]:
        digest = await image.facts.digest()
        return () if digest.hex.startswith(self.prefix) else (f"digest {digest} is not ok",)


async def test_plugged_in_rule_awaits_the_digest() -> None:
    base = pol()
    policy = Policy(base.name, base.mode, base.match, (DigestPrefixRule("zz"),))
    resolver = DictResolver({NGINX: None})
    evaluation = await evaluate([policy], ["nginx:1.25", f"nginx@{D}"], resolver=resolver)
    assert [d.outcome for d in evaluation.decisions] == ["deny", "deny"]
    assert resolver.calls == [NGINX]  # only the tag needed resolving
    assert f"digest {D} is not ok" in evaluation.decisions[1].message


async def test_timeout_cancels_resolutions() -> None:
    resolver = DictResolver({NGINX: None}, delay=10)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await evaluate([pol(**PIN)], ["nginx:1.25", "nginx:1.25"], mutate=True, resolver=resolver)
    await asyncio.sleep(0)
    pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert not pending


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        ("nginx", f"nginx:latest@{D}"),
        ("nginx:1", f"nginx:1@{D}"),
        ("localhost:5000/x", f"localhost:5000/x:latest@{D}"),
        ("localhost:5000/x:2", f"localhost:5000/x:2@{D}"),
    ],
)
def test_pin_text(image: str, expected: str) -> None:
    from proxy.oci.digest import Digest

    assert pin_text(image, Digest.parse(D)) == expected
