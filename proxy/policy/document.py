"""ImagePolicy documents: the model and its strict YAML loader.

A policy file holds one or more YAML documents of ``apiVersion: pullgate.dev/v1``,
``kind: ImagePolicy`` (examples with comments in ``policies/``). Every error names the file,
the document (1-based, with the policy name when known) and the field, e.g.
``policies/prod.yaml: document 2 (prod-pinned): spec.rules.denyTags: expected a list``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import yaml

from proxy.errors import ConfigError, NameInvalid
from proxy.oci.globs import GlobSet
from proxy.oci.reference import ImageReference, normalize_pattern, normalize_registry_pattern
from proxy.policy import fields
from proxy.policy.fields import FieldError
from proxy.policy.rules.base import Origin, ResolveTagsFailure, Rule
from proxy.policy.rules.kinds import RULES
from proxy.trust.trustroot import RootHolder

API_VERSION = "pullgate.dev/v1"
KIND = "ImagePolicy"
Mode = Literal["enforce", "warn", "audit"]
MODES: tuple[Mode, ...] = ("enforce", "warn", "audit")
# A DNS label with dots: the name becomes an auditAnnotations key, which Kubernetes limits
# to a qualified name of at most 63 characters.
_NAME_RE = re.compile(r"^[a-z0-9](?:[-a-z0-9.]{0,61}[a-z0-9])?\Z")
_DIRECTIVES = ("resolveTags", "rewriteRegistry")


class PolicyInvalid(ConfigError):
    """A policy file that cannot be used; the message names file, document and field."""


@dataclass(frozen=True, slots=True)
class Match:
    images: GlobSet
    exclude_images: GlobSet
    namespaces: GlobSet | None  # None: every namespace

    def applies(self, ref: ImageReference, namespace: str) -> bool:
        if self.namespaces is not None and not self.namespaces.match(namespace):
            return False
        return self.images.match(ref.name) and not self.exclude_images.match(ref.name)


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    mode: Mode
    match: Match
    rules: tuple[Rule, ...]
    resolve_tags: bool = False  # mutation pins tags to digests
    rewrite_registry: str | None = None  # mutation moves images to this mirror host
    source: str = ""  # "FILE: document N", for messages

    def applies(self, ref: ImageReference, namespace: str) -> bool:
        return self.match.applies(ref, namespace)


def parse_policy(doc: object, source: str = "", base: Path | None = None, roots: RootHolder | None = None) -> Policy:
    """Build a policy from one YAML document; raises ``FieldError`` naming the field.
    ``base`` is where relative file names in the policy (key files) are looked up; ``roots``
    the default Sigstore trusted root (default: the shipped one)."""
    top = fields.mapping(doc, "(document)", ("apiVersion", "kind", "metadata", "spec"))
    if top.get("apiVersion") != API_VERSION:
        raise FieldError("apiVersion", f"expected {API_VERSION}, got {top.get('apiVersion')!r}")
    if top.get("kind") != KIND:
        raise FieldError("kind", f"expected {KIND}, got {top.get('kind')!r}")
    metadata = fields.mapping(top.get("metadata"), "metadata", ("name", "labels", "annotations"))
    name = fields.string(metadata.get("name"), "metadata.name")
    if not _NAME_RE.match(name):
        raise FieldError("metadata.name", "must be lowercase letters, digits, '-' or '.' (≤ 63)")
    spec = fields.mapping(top.get("spec"), "spec", ("mode", "match", "rules"))
    if "spec" not in top:
        raise FieldError("spec", "required")
    mode = fields.choice(spec.get("mode", "enforce"), "spec.mode", MODES)
    rules_doc = fields.mapping(spec.get("rules"), "spec.rules", (*RULES, *_DIRECTIVES))
    resolve_tags = fields.boolean(rules_doc.get("resolveTags", False), "spec.rules.resolveTags")
    return Policy(
        name=name,
        mode=cast(Mode, mode),
        match=_parse_match(spec.get("match")),
        rules=_parse_rules(rules_doc, resolve_tags, Origin(base or Path.cwd(), roots or RootHolder())),
        resolve_tags=resolve_tags,
        rewrite_registry=_parse_rewrite(rules_doc.get("rewriteRegistry")),
        source=source,
    )


def _parse_match(value: object) -> Match:
    match = fields.mapping(value, "spec.match", ("images", "excludeImages", "namespaces"))
    if "images" not in match:
        raise FieldError("spec.match.images", "required (use ['**'] for every image)")
    images = _image_globs(match["images"], "spec.match.images")
    if not images:
        raise FieldError("spec.match.images", "must name at least one image pattern")
    exclude = _image_globs(match.get("excludeImages", []), "spec.match.excludeImages")
    namespaces = None
    if match.get("namespaces") is not None:
        namespaces = GlobSet.compile(fields.string_list(match["namespaces"], "spec.match.namespaces"))
    return Match(images, exclude, namespaces)


def _parse_rules(rules: Mapping[str, Any], resolve_tags: bool, origin: Origin) -> tuple[Rule, ...]:
    built = []
    for key, factory in RULES.items():
        if key in rules:
            rule = factory(rules[key], f"spec.rules.{key}", origin)
            if rule is not None:
                built.append(rule)
    if resolve_tags and not rules.get("requireDigest"):
        built.append(ResolveTagsFailure())
    return tuple(built)


def _parse_rewrite(value: object) -> str | None:
    if value is None:
        return None
    host = fields.string(value, "spec.rules.rewriteRegistry")
    if "*" in host:
        raise FieldError("spec.rules.rewriteRegistry", f"expected a registry host, got the glob {host!r}")
    try:  # normalized, so an image already moved is recognized (PolicySet.canonical)
        return normalize_registry_pattern(host)
    except NameInvalid as exc:
        raise FieldError("spec.rules.rewriteRegistry", f"expected a registry host: {exc.message}") from exc


def _image_globs(value: object, path: str) -> GlobSet:
    """Repository patterns, normalized by the reference rule (``proxy.oci.reference.normalize_pattern``:
    ``nginx`` -> ``docker.io/library/nginx``, ``GHCR.IO/acme/**`` -> ``ghcr.io/acme/**``);
    a pattern that can never match is an error saying why."""
    patterns = fields.string_list(value, path)
    normalized = []
    for i, pattern in enumerate(patterns):
        if "@" in pattern or ":" in pattern.rpartition("/")[2]:
            raise FieldError(f"{path}[{i}]", f"patterns name repositories (ghcr.io/acme/**), got {pattern!r}")
        try:
            normalized.append(normalize_pattern(pattern))
        except NameInvalid as exc:
            raise FieldError(f"{path}[{i}]", exc.message) from exc
    return GlobSet.compile(normalized)


def load_file(path: Path, roots: RootHolder | None = None) -> tuple[Policy, ...]:
    """Every policy in one file; raises ``PolicyInvalid`` naming file, document and field."""
    try:
        documents = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    except OSError as exc:
        raise PolicyInvalid(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise PolicyInvalid(f"{path}: not UTF-8 text") from exc
    except yaml.YAMLError as exc:
        raise PolicyInvalid(f"{path}: invalid YAML{_yaml_where(exc)}") from exc
    policies = []
    for number, doc in enumerate(documents, 1):
        if doc is None:  # an empty document, e.g. after a trailing '---'
            continue
        where = f"{path}: document {number}{_doc_name(doc)}"
        try:
            policies.append(parse_policy(doc, where, path.parent, roots))
        except FieldError as exc:
            raise PolicyInvalid(f"{where}: {exc.message}") from exc
    return tuple(policies)


def _yaml_where(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is None:
        return f": {problem}"
    return f" at line {mark.line + 1}, column {mark.column + 1}: {problem}"


def _doc_name(doc: object) -> str:
    metadata = doc.get("metadata") if isinstance(doc, dict) else None
    name = metadata.get("name") if isinstance(metadata, dict) else None
    return f" ({name})" if isinstance(name, str) else ""
