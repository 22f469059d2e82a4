"""What an OCI manifest *is*: an image a runtime could run, or a signature/attestation
artifact — decided from its structure and content, never from the tag it was pushed under
or a free-form field (annotations, ``artifactType`` on the manifest itself). The one source
of truth for "is this a signature object" (pull-time enforcement exempts only those; the
inventory files them under the image they sign).

A signature artifact (cosign's formats, https://github.com/sigstore/cosign/blob/main/specs/)
is an image manifest (OCI or Docker)

- whose every layer — at least one, at most ``MAX_LAYERS`` — has a signature or attestation
  media type (``SIGNATURE_LAYER_TYPES``): no filesystem layer;
- whose config is empty (``application/vnd.oci.empty.v1+json``, the bundle format), a
  cosign/sigstore type, or — cosign's legacy ``.sig``/``.att`` format — an image config;
- and whose every layer's bytes are the JSON document its media type names
  (``payload_matches``; ``Artifact.inspect`` lists the layers the caller must read).

The content check is what makes the exemption safe on every runtime. containerd refuses
signature-typed layers ("no processor for media-type") and containers/image refuses an
empty config, but containers/image (podman, CRI-O) unpacks *any* layer's bytes as a tar
under an image config, whatever the layer's media type (checked: a tar typed as a
simplesigning layer became the container's rootfs). No compressed stream parses as JSON,
and JSON carries no NUL byte, so a layer that does is no archive of an executable.

An OCI index is a signature list (cosign's referrers fallback tag ``sha256-<hex>``) when
every entry is an image manifest without a platform: not a multi-platform image. Its
entries' ``artifactType`` is not required (skopeo drops it when it copies an index) and
would prove nothing: an index runs nothing itself, a runtime fetches the entry it picks by
digest, and that manifest is judged on its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Any

from proxy.errors import ManifestInvalid
from proxy.oci.mediatypes import (
    DOCKER_MANIFEST,
    IMAGE_TYPES,
    OCI_EMPTY,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    parse_manifest,
)

SIMPLESIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"  # legacy .sig layers
SIGSTORE_BUNDLE = "application/vnd.dev.sigstore.bundle.v0.3+json"  # cosign v3 bundles
DSSE_ENVELOPE = "application/vnd.dsse.envelope.v1+json"  # legacy .att layers
IN_TOTO = "application/vnd.in-toto+json"
# Layer media type -> a key its JSON document must have (what makes it that document).
SIGNATURE_LAYER_TYPES: dict[str, str] = {
    SIMPLESIGNING: "critical",
    SIGSTORE_BUNDLE: "mediaType",
    "application/vnd.dev.sigstore.bundle+json;version=0.1": "mediaType",
    "application/vnd.dev.sigstore.bundle+json;version=0.2": "mediaType",
    "application/vnd.dev.sigstore.bundle+json;version=0.3": "mediaType",
    DSSE_ENVELOPE: "payload",
    IN_TOTO: "_type",
}
OCI_IMAGE_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_IMAGE_CONFIG = "application/vnd.docker.container.image.v1+json"
IMAGE_CONFIG_TYPES = frozenset({OCI_IMAGE_CONFIG, DOCKER_IMAGE_CONFIG})
_SIGNATURE_TYPE_PREFIXES = ("application/vnd.dev.cosign.", "application/vnd.dev.sigstore.")
MAX_LAYERS = 64  # signatures per manifest: beyond is abuse, not signing
MAX_LAYER_SIZE = 4 << 20  # one payload, bundle or attestation envelope
MAX_INSPECTED = 16 << 20  # all of one manifest's layers that must be read to be believed


class Kind(Enum):
    IMAGE = "image"  # runnable, or anything not shown to be a signature object
    SIGNATURE = "signature"  # a signature/attestation artifact (possibly pending ``inspect``)
    SIGNATURE_LIST = "signature_list"  # an index of signature artifacts (referrers fallback)


@dataclass(frozen=True, slots=True)
class Artifact:
    kind: Kind
    # Layers whose bytes must pass ``payload_matches`` before a SIGNATURE counts.
    inspect: tuple[Descriptor, ...] = ()


IMAGE = Artifact(Kind.IMAGE)


def classify(data: bytes, content_type: str | None) -> Artifact:
    """What the manifest ``data`` is (an unparsable manifest is an ``IMAGE``: never exempt)."""
    try:
        parsed = parse_manifest(data, content_type)
    except (ManifestInvalid, RecursionError):
        return IMAGE
    if parsed.is_index:
        return _classify_index(data) if parsed.media_type == OCI_INDEX else IMAGE
    if parsed.media_type not in IMAGE_TYPES:
        return IMAGE
    config, layers = parsed.children[0], parsed.children[1:]
    if not 0 < len(layers) <= MAX_LAYERS or not all(d.media_type in SIGNATURE_LAYER_TYPES for d in layers):
        return IMAGE
    signature_config = config.media_type.startswith(_SIGNATURE_TYPE_PREFIXES)
    if config.media_type not in (OCI_EMPTY, *IMAGE_CONFIG_TYPES) and not signature_config:
        return IMAGE
    if any(d.size > MAX_LAYER_SIZE for d in layers) or sum(d.size for d in layers) > MAX_INSPECTED:
        return IMAGE
    return Artifact(Kind.SIGNATURE, layers)


def _classify_index(data: bytes) -> Artifact:
    # parse_manifest accepted these bytes already: a second parse meets no surprise.
    entries = json.loads(data).get("manifests")
    if not isinstance(entries, list) or len(entries) > MAX_LAYERS:
        return IMAGE
    return Artifact(Kind.SIGNATURE_LIST) if all(_signature_entry(e) for e in entries) else IMAGE


def _signature_entry(entry: Any) -> bool:
    return (
        isinstance(entry, dict)
        and entry.get("mediaType") in (OCI_MANIFEST, DOCKER_MANIFEST)
        and "platform" not in entry
    )


def payload_matches(media_type: str, data: bytes) -> bool:
    """Are ``data`` the JSON document a layer of ``media_type`` holds (a cosign payload, a
    bundle, a DSSE envelope)? No tar, compressed stream or executable is valid JSON."""
    key = SIGNATURE_LAYER_TYPES.get(media_type)
    if key is None or len(data) > MAX_LAYER_SIZE:
        return False
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(doc, dict) and key in doc


def is_signature_object(data: bytes, content_type: str | None) -> bool:
    """The structural answer alone (no layer bytes read): for listings, never for trust."""
    return classify(data, content_type).kind is not Kind.IMAGE
