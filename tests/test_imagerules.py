"""The ``image`` rule block: parsing (every field, every bad value) and each check against
images held in memory by ``MemoryImage`` — a real ``ImageFacts`` (and content source)
serving the same manifests, configs and indexes a registry would."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from proxy.admission.review import extract_sites, parse_review, sites_to_check
from proxy.oci.digest import Digest
from proxy.oci.mediatypes import OCI_INDEX, OCI_MANIFEST, parse_manifest
from proxy.oci.reference import ImageReference
from proxy.policy.active import PolicySet
from proxy.policy.document import parse_policy
from proxy.policy.evaluation import Evaluator
from proxy.policy.fields import FieldError
from proxy.policy.findings import image_findings
from proxy.policy.rules.base import DEFAULT_PLATFORM, ImageContext, ManifestDoc, Origin, ResolutionFailed
from proxy.policy.rules.image import ImageRules, build, is_root
from proxy.policy.sites import ImageSite
from proxy.trust.service import VerificationCache
from proxy.trust.trustroot import RootHolder
from proxy.trust.verification import SignaturePolicy, VerificationResult
from tests.support.resolver import DictResolver

ORIGIN = Origin(Path("."), RootHolder())  # image rules read no files and no trust root

NOW = 1_735_689_600.0  # 2025-01-01T00:00:00Z
RECENT = "2024-12-01T10:00:00.123456789Z"  # 31 days before NOW, Go's nanoseconds
OLD = "2024-01-01T00:00:00Z"  # 366 days before NOW
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
MiB = 1 << 20
REF = ImageReference.parse("docker.io/acme/app:1")


def _json(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


class MemoryImage:
    """An image (or index of images) in memory: ``ImageFacts`` for rule tests, and the
    ``ContentProvider``/``SignatureSource`` the evaluator's real ``Facts`` read through."""

    def __init__(
        self,
        *,
        user: str | None = None,
        env: Sequence[str] = ("PATH=/usr/local/bin:/usr/bin:/bin",),
        history: Sequence[str] = ("/bin/sh -c #(nop) ADD file:abc in / ",),
        labels: Mapping[str, str] | None = None,
        created: str | None = RECENT,
        layers: Sequence[int] = (MiB,),
        platforms: Sequence[str] | None = None,  # an index of these; None: one image
        annotations: Mapping[str, str] | None = None,  # on each image manifest
        index_annotations: Mapping[str, str] | None = None,
        unavailable: str | None = None,  # every fact raises ResolutionFailed(this)
        config_missing: bool = False,
    ) -> None:
        self.blobs: dict[Digest, bytes] = {}
        self.manifests: dict[Digest, tuple[bytes, str]] = {}
        self.unavailable = unavailable
        self.config_missing = config_missing
        self.fetches: list[str] = []
        run: dict[str, Any] = {"Env": list(env)}
        if user is not None:
            run["User"] = user
        if labels is not None:
            run["Labels"] = dict(labels)
        images = {}
        for platform in platforms or ["linux/amd64"]:
            os_, arch, *variant = platform.split("/")
            config: dict[str, Any] = {"architecture": arch, "os": os_, "config": run}
            if variant:
                config["variant"] = variant[0]
            if created is not None:
                config["created"] = created
            config["history"] = [{"created_by": line} for line in history]
            images[platform] = self._image(config, layers, annotations)
        if platforms is None:
            self.top = images["linux/amd64"]
        else:
            entries = [
                {"mediaType": OCI_MANIFEST, "digest": str(d), "size": len(self.manifests[d][0]), "platform": _plat(p)}
                for p, d in images.items()
            ]
            index: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
            if index_annotations:
                index["annotations"] = dict(index_annotations)
            self.top = self._put(_json(index), OCI_INDEX)

    def _image(self, config: Mapping[str, Any], layers: Sequence[int], annotations: Mapping[str, str] | None) -> Digest:
        data = _json(config)
        config_digest = Digest.of(data)
        if not self.config_missing:
            self.blobs[config_digest] = data
        manifest: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": CONFIG_TYPE, "digest": str(config_digest), "size": len(data)},
            "layers": [
                {
                    "mediaType": LAYER_TYPE,
                    "digest": str(Digest.of(f"{i}/{size}/{config_digest}".encode())),
                    "size": size,
                }
                for i, size in enumerate(layers)
            ],
        }
        if annotations:
            manifest["annotations"] = dict(annotations)
        return self._put(_json(manifest), OCI_MANIFEST)

    def _put(self, data: bytes, media_type: str) -> Digest:
        digest = Digest.of(data)
        self.manifests[digest] = (data, media_type)
        return digest

    # --- ImageFacts -------------------------------------------------------------------------
    def _check(self, what: str) -> None:
        self.fetches.append(what)
        if self.unavailable is not None:
            raise ResolutionFailed(self.unavailable)

    async def digest(self) -> Digest:
        self._check("digest")
        return self.top

    async def manifest(self, digest: Digest | None = None) -> ManifestDoc:
        self._check("manifest")
        wanted = digest or self.top
        data, media_type = self.manifests[wanted]
        return ManifestDoc(wanted, media_type, data, parse_manifest(data, media_type))

    async def image_manifest(self, platform: str = DEFAULT_PLATFORM) -> ManifestDoc:
        top = await self.manifest()
        if not top.parsed.is_index:
            return top
        entry = next((d for d in top.parsed.children if d.platform == platform), None)
        if entry is None:
            raise ResolutionFailed(f"{REF.name} has no {platform} image")
        return await self.manifest(entry.digest)

    async def blob(self, digest: Digest) -> bytes:
        self._check("blob")
        if digest not in self.blobs:
            raise ResolutionFailed(f"blob {digest} not found in {REF.name}")
        return self.blobs[digest]

    async def config(self, platform: str = DEFAULT_PLATFORM) -> dict[str, Any]:
        image = await self.image_manifest(platform)
        config: dict[str, Any] = json.loads(await self.blob(image.parsed.children[0].digest))
        return config

    async def signatures(self, policy: SignaturePolicy, cache: VerificationCache) -> VerificationResult:
        raise ResolutionFailed("no signatures in memory")

    # --- ContentProvider / SignatureSource ----------------------------------------------------
    def content(self, ref: ImageReference) -> MemoryImage:
        return self

    async def get_manifest(self, repository: str, reference: str) -> tuple[bytes, str] | None:
        key = self.top if reference == REF.tag else Digest.parse(reference)
        return self.manifests.get(key)

    async def get_blob(self, repository: str, digest: Digest) -> bytes | None:
        return self.blobs.get(digest)

    async def get_referrers(self, repository: str, digest: Digest, artifact_type: str | None) -> dict[str, Any] | None:
        return None


def _plat(text: str) -> dict[str, str]:
    parts = text.split("/")
    out = {"os": parts[0], "architecture": parts[1]}
    if len(parts) == 3:
        out["variant"] = parts[2]
    return out


def rules(**doc: Any) -> ImageRules:
    built = build(doc, "spec.rules.image", ORIGIN)
    assert built is not None
    return dataclasses.replace(built, clock=lambda: NOW)


def context(facts: MemoryImage, **security: Any) -> ImageContext:
    return ImageContext('container "app"', str(REF), REF, "prod", facts, True, **security)


BASE = "org.opencontainers.image.base.name"
SOURCE = "org.opencontainers.image.source"
AWS_ID = "AKIA" + "Z3MHALPQJ7Y4KXNB"


@pytest.mark.parametrize(
    ("doc", "image", "security", "expected"),
    [
        # denyRootUser: the image's user, and the securityContext that overrides it
        ({"denyRootUser": True}, {"user": "app"}, {}, []),
        ({"denyRootUser": True}, {"user": "1000:1000"}, {}, []),
        ({"denyRootUser": True}, {"user": "1000:0"}, {}, []),  # group 0 is not user 0
        ({"denyRootUser": True}, {}, {}, ["image.denyRootUser: runs as root (image sets no user)"]),
        ({"denyRootUser": True}, {"user": ""}, {}, ["image.denyRootUser: runs as root (image sets no user)"]),
        ({"denyRootUser": True}, {"user": "root"}, {}, ['image.denyRootUser: runs as root (image user "root")']),
        ({"denyRootUser": True}, {"user": "0"}, {}, ['image.denyRootUser: runs as root (image user "0")']),
        ({"denyRootUser": True}, {"user": "0:0"}, {}, ['image.denyRootUser: runs as root (image user "0:0")']),
        (
            {"denyRootUser": True},
            {"user": "root:wheel"},
            {},
            ['image.denyRootUser: runs as root (image user "root:wheel")'],
        ),
        ({"denyRootUser": True}, {"user": "0"}, {"run_as_non_root": True}, []),
        ({"denyRootUser": True}, {"user": "0"}, {"run_as_user": 1000}, []),
        (
            {"denyRootUser": True},
            {"user": "0"},
            {"run_as_non_root": False},
            ['image.denyRootUser: runs as root (image user "0")'],
        ),
        (
            {"denyRootUser": True},
            {"user": "1000"},
            {"run_as_user": 0},
            ["image.denyRootUser: runs as root (securityContext.runAsUser: 0)"],
        ),
        (
            {"denyRootUser": True},
            {"user": "1000"},
            {"run_as_user": 0, "run_as_non_root": True},
            ["image.denyRootUser: runs as root (securityContext.runAsUser: 0)"],
        ),
        ({"denyRootUser": True}, {"user": "0"}, {"runs": False}, []),  # an image volume never runs
        ({"denyRootUser": False, "maxLayers": 9}, {"user": "0"}, {}, []),
        # denySecretsInEnv: name and pattern, never the value
        ({"denySecretsInEnv": True}, {"env": ["PATH=/bin", "LANG=C.UTF-8", "PYTHON_VERSION=3.12.1"]}, {}, []),
        (
            {"denySecretsInEnv": True},
            {"env": ["DB_PASSWORD=hunter2", f"KEY_ID={AWS_ID}", "GPG_KEY=A035C8C19219BA821ECEA86B64E628F8D684696D"]},
            {},
            ["image.denySecretsInEnv: secret-looking env DB_PASSWORD (generic-password), KEY_ID (aws-access-key-id)"],
        ),
        ({"denySecretsInEnv": False, "maxLayers": 9}, {"env": ["DB_PASSWORD=hunter2"]}, {}, []),
        # denySecretsInHistory: the history index, the name and the pattern
        ({"denySecretsInHistory": True}, {"history": ["ENV PYTHON_VERSION=3.12.1", 'CMD ["python3"]']}, {}, []),
        (
            {"denySecretsInHistory": True},
            {
                "history": [
                    "ADD file:abc in /",
                    "|1 NPM_TOKEN=abc123 /bin/sh -c npm ci",
                    "RUN curl https://u:p4ss@x.io/",
                ]
            },
            {},
            [
                "image.denySecretsInHistory: secret-looking history[1] NPM_TOKEN (generic-token), "
                "history[2] url-credentials"
            ],
        ),
        # maxCompressedSize and maxLayers, from the platform manifest's descriptors
        ({"maxCompressedSize": "2MiB", "maxLayers": 3}, {"layers": [MiB, MiB]}, {}, []),
        (
            {"maxCompressedSize": "2MiB"},
            {"layers": [MiB, MiB, 1]},
            {},
            ["image.maxCompressedSize: image is 2.0 MiB compressed (max 2.0 MiB)"],
        ),
        ({"maxLayers": 2}, {"layers": [1, 2, 3]}, {}, ["image.maxLayers: image has 3 layers (max 2)"]),
        (
            {"maxLayers": 1, "platform": "linux/arm64"},
            {"layers": [1, 2], "platforms": ["linux/amd64", "linux/arm64"]},
            {},
            ["image.maxLayers: linux/arm64 image has 2 layers (max 1)"],
        ),
        # requirePlatforms: index entries, or the single image's config
        (
            {"requirePlatforms": ["linux/amd64", "linux/arm64"]},
            {"platforms": ["linux/amd64", "linux/arm64/v8"]},
            {},
            [],
        ),
        (
            {"requirePlatforms": ["linux/amd64", "linux/arm64", "linux/arm/v7"]},
            {"platforms": ["linux/amd64", "linux/arm/v6"]},
            {},
            ["image.requirePlatforms: missing linux/arm64, linux/arm/v7 (offers linux/amd64, linux/arm/v6)"],
        ),
        (
            {"requirePlatforms": ["linux/amd64", "linux/arm64"]},
            {},
            {},
            ["image.requirePlatforms: missing linux/arm64 (offers linux/amd64)"],
        ),
        (
            {"requirePlatforms": ["linux/arm64"]},
            {"platforms": ["linux/amd64", "unknown/unknown"]},  # buildx's attestation entry
            {},
            ["image.requirePlatforms: missing linux/arm64 (offers linux/amd64)"],
        ),
        (
            {"requirePlatforms": ["linux/amd64"]},
            {"platforms": ["linux/arm64"]},
            {},
            [
                "image.requirePlatforms: missing linux/amd64 (offers linux/arm64)",
                "image manifest unavailable: docker.io/acme/app has no linux/amd64 image",
            ],
        ),
        # maxAge from config.created
        ({"maxAge": "90d"}, {"created": RECENT}, {}, []),
        ({"maxAge": "90d"}, {"created": OLD}, {}, ["image.maxAge: built 2024-01-01, 366 days ago (max 90d)"]),
        ({"maxAge": "30d"}, {"created": RECENT}, {}, ["image.maxAge: built 2024-12-01, 31 days ago (max 30d)"]),
        ({"maxAge": "90d"}, {"created": None}, {}, ["image.maxAge: build date unknown (config.created 'None')"]),
        (
            {"maxAge": "90d"},
            {"created": "1970-01-01T00:00:00Z"},
            {},
            ["image.maxAge: build date unknown (config.created '1970-01-01T00:00:00Z')"],
        ),
        (
            {"maxAge": "90d"},
            {"created": "yesterday"},
            {},
            ["image.maxAge: build date unknown (config.created 'yesterday')"],
        ),
        # requireLabels
        ({"requireLabels": [SOURCE]}, {"labels": {SOURCE: "https://github.com/acme/app"}}, {}, []),
        ({"requireLabels": [SOURCE, "team"]}, {}, {}, [f"image.requireLabels: missing label {SOURCE}, team"]),
        ({"requireLabels": [SOURCE]}, {"labels": {SOURCE: ""}}, {}, [f"image.requireLabels: missing label {SOURCE}"]),
        # allowedBaseImages: manifest annotation, index annotation, config label
        ({"allowedBaseImages": ["python:*"]}, {"annotations": {BASE: "docker.io/library/python:3.12-slim"}}, {}, []),
        ({"allowedBaseImages": ["python:*"]}, {"labels": {BASE: "python:3.12"}}, {}, []),
        (
            {"allowedBaseImages": ["gcr.io/distroless/**"]},
            {"labels": {BASE: "gcr.io/distroless/static:nonroot"}},
            {},
            [],
        ),
        (
            {"allowedBaseImages": ["docker.io/library/python"]},
            {"platforms": ["linux/amd64"], "index_annotations": {BASE: "python:3.12@sha256:" + "a" * 64}},
            {},
            [],
        ),
        (
            {"allowedBaseImages": ["python:*", "gcr.io/distroless/**"]},
            {"annotations": {BASE: "alpine:3.19"}},
            {},
            [
                "image.allowedBaseImages: base image docker.io/library/alpine:3.19 is not allowed "
                "(allowed: docker.io/library/python:*, gcr.io/distroless/**)"
            ],
        ),
        (
            {"allowedBaseImages": ["python:*"]},
            {},
            {},
            [f"image.allowedBaseImages: base image unknown (no {BASE} annotation or label)"],
        ),
        (
            {"allowedBaseImages": ["python:*"]},
            {"labels": {BASE: "Not A Reference"}},
            {},
            ["image.allowedBaseImages: base image 'Not A Reference' is not an image reference"],
        ),
        # facts that cannot be had: one violation that says why
        (
            {"denyRootUser": True, "maxLayers": 3},
            {"unavailable": "upstream docker.io unreachable: timeout"},
            {},
            ["image manifest unavailable: upstream docker.io unreachable: timeout"],
        ),
        (
            {"denyRootUser": True},
            {"config_missing": True},
            {},
            ["image config unavailable: blob {config} not found in docker.io/acme/app"],
        ),
        # everything at once, in the documented order
        (
            {
                "denyRootUser": True,
                "denySecretsInEnv": True,
                "maxLayers": 1,
                "requirePlatforms": ["linux/arm64"],
                "maxAge": "90d",
            },
            {"user": "root", "env": ["API_TOKEN=abc"], "layers": [1, 2], "created": OLD},
            {},
            [
                "image.requirePlatforms: missing linux/arm64 (offers linux/amd64)",
                "image.maxLayers: image has 2 layers (max 1)",
                'image.denyRootUser: runs as root (image user "root")',
                "image.denySecretsInEnv: secret-looking env API_TOKEN (generic-token)",
                "image.maxAge: built 2024-01-01, 366 days ago (max 90d)",
            ],
        ),
    ],
)
async def test_check(doc: dict[str, Any], image: dict[str, Any], security: dict[str, Any], expected: list[str]) -> None:
    facts = MemoryImage(**image)
    found = await rules(**doc).check(context(facts, **security))
    config = json.loads(facts.manifests[facts.top][0]).get("config", {}).get("digest", "")
    assert list(found) == [e.replace("{config}", config) for e in expected]


async def test_only_the_facts_needed_are_fetched() -> None:
    facts = MemoryImage(platforms=["linux/amd64", "linux/arm64"])
    assert await rules(maxLayers=5, requirePlatforms=["linux/amd64"]).check(context(facts)) == ()
    assert "blob" not in facts.fetches, "size and platform checks need no config blob"
    await rules(denyRootUser=True).check(context(facts, run_as_user=1000))
    assert "blob" in facts.fetches


@pytest.mark.parametrize(
    ("doc", "error"),
    [
        ("yes", "spec.rules.image: expected a mapping, got a string"),
        ({"denyRoot": True}, "spec.rules.image.denyRoot: unknown field (allowed: "),
        ({"denyRootUser": "yes"}, "spec.rules.image.denyRootUser: expected true or false, got a string"),
        ({"platform": "amd64"}, "spec.rules.image.platform: expected os/arch[/variant] like linux/arm64, got 'amd64'"),
        (
            {"maxCompressedSize": "big"},
            "spec.rules.image.maxCompressedSize: not a size (use e.g. 512MiB, 50GiB): 'big'",
        ),
        ({"maxCompressedSize": 0}, "spec.rules.image.maxCompressedSize: expected a positive size like 500MiB, got 0"),
        (
            {"maxCompressedSize": True},
            "spec.rules.image.maxCompressedSize: not a size: True",
        ),
        ({"maxLayers": 0}, "spec.rules.image.maxLayers: expected a whole number ≥ 1, got int"),
        ({"maxLayers": "50"}, "spec.rules.image.maxLayers: expected a whole number ≥ 1, got a string"),
        (
            {"requirePlatforms": "linux/amd64"},
            "spec.rules.image.requirePlatforms: expected a list of strings, got a string",
        ),
        ({"requirePlatforms": ["linux"]}, "spec.rules.image.requirePlatforms[0]: expected os/arch[/variant] like"),
        ({"maxAge": "3 months"}, "spec.rules.image.maxAge: not a duration (use e.g. 30s, 5m, 24h, 30d): '3 months'"),
        ({"maxAge": "0d"}, "spec.rules.image.maxAge: expected a positive duration like 90d, got '0d'"),
        ({"requireLabels": [""]}, "spec.rules.image.requireLabels[0]: expected a non-empty string, got a string"),
        ({"allowedBaseImages": []}, "spec.rules.image.allowedBaseImages: must name at least one base image pattern"),
        ({"allowedBaseImages": ["python :3"]}, "spec.rules.image.allowedBaseImages[0]: expected an image pattern like"),
    ],
)
def test_parse_errors(doc: object, error: str) -> None:
    with pytest.raises(FieldError) as raised:
        build(doc, "spec.rules.image", ORIGIN)
    assert raised.value.message.startswith(error)


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        (None, None),
        ({}, None),
        ({"denyRootUser": False, "platform": "linux/arm64"}, None),  # nothing to check
        ({"denyRootUser": True}, ImageRules(deny_root_user=True)),
        ({"maxCompressedSize": "500MiB"}, ImageRules(max_compressed_size=500 * MiB)),
        ({"maxCompressedSize": 1000}, ImageRules(max_compressed_size=1000)),
        ({"maxAge": "90d"}, ImageRules(max_age=(90 * 86400.0, "90d"))),
        ({"requirePlatforms": ["linux/arm/v7"]}, ImageRules(require_platforms=("linux/arm/v7",))),
    ],
)
def test_parse(doc: object, expected: ImageRules | None) -> None:
    assert build(doc, "spec.rules.image", ORIGIN) == expected


@pytest.mark.parametrize(
    ("pattern", "base", "allowed"),
    [
        ("python:*", "docker.io/library/python:3.12", True),
        ("python:*", "index.docker.io/library/python:3.12", True),
        ("python:3.12-*", "python:3.12-slim", True),
        ("python:3.12-*", "python:3.11-slim", False),
        ("docker.io/library/*", "node:20", True),
        ("acme/*", "acme/base:1", True),
        ("gcr.io/distroless/**", "gcr.io/distroless/cc-debian12:nonroot", True),
        ("gcr.io/distroless/**", "gcr.io/distrofull/base:1", False),
        ("**", "anything.example/x/y:z", True),
        ("ghcr.io/acme/base", "ghcr.io/acme/base:2024.01", True),  # no tag in the pattern: any tag
    ],
)
async def test_base_image_patterns(pattern: str, base: str, allowed: bool) -> None:
    found = await rules(allowedBaseImages=[pattern]).check(context(MemoryImage(labels={BASE: base})))
    assert (found == ()) is allowed, found


@pytest.mark.parametrize(
    ("user", "root"),
    [("", True), ("root", True), ("0", True), ("0:0", True), (" 0 ", True), ("root:1000", True),
     ("1000", False), ("app", False), ("1000:0", False), ("rootless", False), ("00", False)],
)  # fmt: skip
def test_is_root(user: str, root: bool) -> None:
    assert is_root(user) is root


def policy(mode: str = "enforce", **image: Any) -> Any:
    return parse_policy(
        {
            "apiVersion": "pullgate.dev/v1",
            "kind": "ImagePolicy",
            "metadata": {"name": f"hygiene-{mode}"},
            "spec": {"mode": mode, "match": {"images": ["docker.io/acme/**"]}, "rules": {"image": image}},
        }
    )


@pytest.mark.parametrize(
    ("mode", "outcome"),
    [("enforce", "deny"), ("warn", "warn"), ("audit", "audit")],
)
async def test_modes_through_the_evaluator(mode: str, outcome: str) -> None:
    image = MemoryImage(user="0")
    evaluator = Evaluator(PolicySet.of((policy(mode, denyRootUser=True),)), "allow", DictResolver({}), None, image)
    sites = (
        ImageSite("/spec/containers/0/image", "containers", "app", f"{REF.name}@{image.top}"),
        ImageSite("/spec/containers/1/image", "containers", "safe", f"{REF.name}@{image.top}", 1000),
        ImageSite("/spec/volumes/0/image/reference", "volumes", "data", f"{REF.name}@{image.top}"),
    )
    evaluation = await evaluator.evaluate(sites, "prod", mutate=False)
    assert [d.outcome for d in evaluation.decisions] == [outcome, "allow", "allow"]
    assert evaluation.decisions[0].rule == "image"
    assert evaluation.decisions[0].message == (
        f'container "app" image "{REF.name}@{image.top}": policy hygiene-{mode} '
        'image.denyRootUser: runs as root (image user "0")'
    )


async def test_tags_resolve_before_the_content_is_read() -> None:
    image = MemoryImage(user="0")
    evaluator = Evaluator(
        PolicySet.of((policy(denyRootUser=True),)), "allow", DictResolver({str(REF): image.top}), None, image
    )
    site = ImageSite("/spec/containers/0/image", "containers", "app", str(REF))
    evaluation = await evaluator.evaluate((site,), "prod", mutate=False)
    assert evaluation.messages("deny") == [
        f'container "app" image "{REF}": policy hygiene-enforce image.denyRootUser: runs as root (image user "0")'
    ]


async def test_image_findings_for_cache_inspect() -> None:
    image = MemoryImage(user="0", env=["DB_PASSWORD=hunter2"], created=OLD)
    policies = PolicySet.of(
        (
            policy("enforce", denyRootUser=True, denySecretsInEnv=True),
            policy("warn", maxLayers=5),  # passes
            parse_policy(
                {
                    "apiVersion": "pullgate.dev/v1",
                    "kind": "ImagePolicy",
                    "metadata": {"name": "elsewhere"},
                    "spec": {"match": {"images": ["ghcr.io/**"]}, "rules": {"image": {"denyRootUser": True}}},
                }
            ),
        )
    )
    pinned = REF.with_digest(image.top)
    assert await image_findings(policies, image, None, pinned) == [
        'policy hygiene-enforce (enforce) image.denyRootUser: runs as root (image user "0")',
        "policy hygiene-enforce (enforce) image.denySecretsInEnv: secret-looking env DB_PASSWORD (generic-password)",
    ]
    assert await image_findings(policies, image, DictResolver({str(REF): image.top}), REF) == (
        await image_findings(policies, image, None, pinned)
    )
    assert await image_findings(policies, image, None, REF) == [
        "policy hygiene-enforce (enforce) image manifest unavailable: tag resolution is not available offline",
        "policy hygiene-warn (warn) image manifest unavailable: tag resolution is not available offline",
    ]


# --- the securityContext reaches the rule ----------------------------------------------------
def pod(spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": spec}


@pytest.mark.parametrize(
    ("pod_context", "container_context", "expected"),
    [
        (None, None, (None, None)),
        ({"runAsUser": 1000}, None, (1000, None)),
        ({"runAsNonRoot": True}, None, (None, True)),
        (None, {"runAsUser": 2000, "runAsNonRoot": True}, (2000, True)),
        ({"runAsUser": 1000, "runAsNonRoot": True}, {"runAsUser": 0}, (0, True)),  # the container's wins
        ({"runAsNonRoot": True}, {"runAsNonRoot": False}, (None, False)),
        ({"runAsUser": "0"}, None, (None, None)),  # not an integer: the API server refuses it first
        ({"runAsUser": True}, {"runAsNonRoot": "yes"}, (None, None)),
        ("nonsense", None, (None, None)),
    ],
)
def test_effective_security_context(pod_context: Any, container_context: Any, expected: tuple[Any, Any]) -> None:
    container: dict[str, Any] = {"name": "app", "image": "nginx:1"}
    if container_context is not None:
        container["securityContext"] = container_context
    spec: dict[str, Any] = {
        "initContainers": [container],
        "containers": [container],
        "volumes": [{"name": "data", "image": {"reference": "acme/data:1"}}],
    }
    if pod_context is not None:
        spec["securityContext"] = pod_context
    sites = extract_sites(pod(spec), "", "Pod")
    assert [(s.field, s.run_as_user, s.run_as_non_root) for s in sites] == [
        ("initContainers", *expected),
        ("containers", *expected),
        ("volumes", None, None),  # an image volume is mounted, not run
    ]


@pytest.mark.parametrize(
    ("old_context", "new_context", "judged"),
    [
        (None, None, False),  # same image, same user: admitted before
        ({"runAsUser": 1000}, {"runAsUser": 1000}, False),
        ({"runAsUser": 1000}, {"runAsUser": 0}, True),  # an update that makes it root is judged again
        ({"runAsNonRoot": True}, None, True),
    ],
)
def test_update_judges_a_changed_user_again(old_context: Any, new_context: Any, judged: bool) -> None:
    def deployment(context: Any) -> dict[str, Any]:
        container: dict[str, Any] = {"name": "app", "image": "nginx:1"}
        if context is not None:
            container["securityContext"] = context
        template = {"spec": {"containers": [container]}}
        return {"apiVersion": "apps/v1", "kind": "Deployment", "spec": {"template": template}}

    body = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "u",
            "kind": {"group": "apps", "version": "v1", "kind": "Deployment"},
            "operation": "UPDATE",
            "namespace": "prod",
            "object": deployment(new_context),
            "oldObject": deployment(old_context),
        },
    }
    sites = sites_to_check(parse_review(json.dumps(body).encode()))
    assert bool(sites) is judged
