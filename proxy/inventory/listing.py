"""What the cache tools show: the ``cache inspect`` view of an image (manifest, and per
platform its config, layers and ``history`` matched to them, like ``docker inspect`` and
``docker history``) and the text tables of ``cache ls``, ``inspect``, ``du`` and ``prune``
(``--json`` prints the same data as JSON instead)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from typing import Any

from proxy.config.units import format_size
from proxy.inventory.images import Image, ImageNotCached, Inventory, PrunePlan


# --- inspect ------------------------------------------------------------------------------------
def inspect(inventory: Inventory, image: Image, platform: str | None = None) -> dict[str, Any]:
    """Manifest, and per platform: config, layers and ``history`` (like ``docker
    inspect`` and ``docker history``)."""
    parsed = inventory.manifest(image.digest)
    targets = [(image.platforms[0] if image.platforms else None, image.digest)]
    if parsed is not None and parsed.is_index:
        targets = [(c.platform, str(c.digest)) for c in parsed.children]
    if platform is not None:
        targets = [t for t in targets if t[0] == platform]
        if not targets:
            raise ImageNotCached(f"{image.reference()} offers no platform {platform}")
    return {
        "image": image.to_json(),
        "manifest": inventory.json_blob(image.digest),
        "platforms": [_detail(inventory, p, d) for p, d in targets],
    }


def _detail(inventory: Inventory, platform: str | None, digest: str) -> dict[str, Any]:
    manifest = inventory.json_blob(digest) if digest in inventory.snap.manifests else None
    detail: dict[str, Any] = {"platform": platform, "digest": digest, "cached": manifest is not None}
    if manifest is None:
        return detail
    raw_layers = manifest.get("layers")
    raw_layers = raw_layers if isinstance(raw_layers, list) else []
    layers = [
        {
            "digest": layer.get("digest"),
            "media_type": layer.get("mediaType"),
            "size": layer.get("size"),
            "cached": layer.get("digest") in inventory.snap.sizes,
        }
        for layer in raw_layers
        if isinstance(layer, dict)
    ]
    config_digest = (manifest.get("config") or {}).get("digest")
    config = inventory.json_blob(config_digest) if config_digest in inventory.snap.sizes else None
    detail.update(manifest=manifest, config=config, layers=layers, history=_history(config, layers))
    return detail


def _history(config: dict[str, Any] | None, layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The config's ``history`` with each non-empty entry matched to its layer, in order."""
    entries = config.get("history") if config else None
    if not isinstance(entries, list):
        return []
    out, index = [], 0
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        empty = bool(entry.get("empty_layer"))
        layer = layers[index] if not empty and index < len(layers) else None
        index += 0 if empty else 1
        out.append(
            {
                "created": entry.get("created"),
                "created_by": entry.get("created_by"),
                "comment": entry.get("comment"),
                "empty_layer": empty,
                "layer": layer["digest"] if layer else None,
                "size": layer["size"] if layer else 0,
            }
        )
    return out


# --- text ---------------------------------------------------------------------------------------
def ls_lines(images: list[Image]) -> Iterator[str]:
    header = ("UPSTREAM", "REPOSITORY", "TAGS", "DIGEST", "PLATFORMS", "SIZE", "LAST PULLED", "PULLS")
    rows = [
        (
            i.upstream,
            i.repository,
            ",".join(i.tags) or "<none>",
            i.digest.partition(":")[2][:12],
            _platform_text(i),
            format_size(i.size) + ("" if i.complete else " (partial)"),
            _ago(i.last_pulled),
            str(i.pull_count),
        )
        for i in images
    ]
    return _table(header, rows)


def _platform_text(image: Image) -> str:
    cached = [p for p in image.platforms if p not in image.missing_platforms]
    text = ",".join(cached) or "-"
    return f"{text} (+{len(image.missing_platforms)} not cached)" if image.missing_platforms else text


def inspect_lines(details: dict[str, Any]) -> Iterator[str]:
    image = details["image"]
    yield from (f"{k:<12} {v}" for k, v in _image_facts(image))
    for platform in details["platforms"]:
        yield ""
        yield f"PLATFORM {platform['platform'] or '-'}  {platform['digest']}" + (
            "" if platform["cached"] else "  (not cached)"
        )
        config = (platform.get("config") or {}).get("config") or {}
        for key in ("Entrypoint", "Cmd", "User", "WorkingDir", "Env"):
            if config.get(key):
                value = config[key]
                yield f"  {key:<11} {json.dumps(value) if isinstance(value, list) else value}"
        if platform.get("layers"):
            rows = [(layer["digest"], format_size(layer["size"] or 0), "" if layer["cached"] else "not cached")
                    for layer in platform["layers"]]  # fmt: skip
            yield from ("  " + line for line in _table(("LAYER", "SIZE", ""), rows))
        if platform.get("history"):
            rows = [(h["created"] or "", _clip(h["created_by"] or h["comment"] or "", 70), format_size(h["size"]))
                    for h in reversed(platform["history"])]  # fmt: skip
            yield from ("  " + line for line in _table(("CREATED", "CREATED BY", "SIZE"), rows))
    findings = details.get("policy_findings")
    if findings is not None:
        yield ""
        yield f"POLICY       {len(findings)} image rule violation(s)" if findings else "POLICY       image rules pass"
        yield from (f"  {line}" for line in findings)


def _image_facts(image: dict[str, Any]) -> list[tuple[str, Any]]:
    return [
        ("IMAGE", image["reference"]),
        ("DIGEST", image["digest"]),
        ("MEDIA TYPE", image["media_type"]),
        ("TAGS", ", ".join(image["tags"]) or "<none>"),
        ("SIZE", format_size(image["size"]) + ("" if image["complete"] else " (not all content cached)")),
        ("LAST PULLED", f"{image['last_pulled'] or 'never'} (pulls: {image['pull_count']})"),
    ]


def du_lines(usage: dict[str, Any]) -> Iterator[str]:
    rows = [
        (r["upstream"], r["repository"], str(r["images"]), format_size(r["size"]), format_size(r["logical"]))
        for r in usage["repositories"]
    ]
    yield from _table(("UPSTREAM", "REPOSITORY", "IMAGES", "SIZE", "WITHOUT SHARING"), rows)
    logical, stored = usage["logical"], usage["stored"]
    share = f" ({usage['savings'] / logical * 100:.1f}%)" if logical else ""
    saved = format_size(usage["savings"])
    yield ""
    yield f"images {format_size(logical)}, stored {format_size(stored)}: layer sharing saves {saved}{share}"
    yield f"unreferenced: {format_size(usage['unreferenced'])} (cache prune removes it)"
    yield (
        f"on disk: {format_size(usage['on_disk'])} in {usage['objects']} objects, "
        f"{usage['on_disk'] / max(usage['max_size'], 1) * 100:.1f}% of cache.max_size {format_size(usage['max_size'])}"
    )


def prune_lines(plan: PrunePlan, freed: int, dry_run: bool) -> Iterator[str]:
    verb = "would remove" if dry_run else "removed"
    for image in plan.images:
        yield f"{verb} {image.reference()}  {image.digest}  (last pulled {_ago(image.last_pulled)})"
    kept = "would keep" if dry_run else "kept"
    for image in plan.kept_pinned:
        yield f"{kept} {image.reference()}  {image.digest}  (pinned by import; --include-pinned removes it)"
    yield f"{verb} {len(plan.blobs)} objects, {format_size(freed)}" + (" (dry run)" if dry_run else "")


# --- text helpers ------------------------------------------------------------------------------
def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> Iterator[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        yield "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()


def _ago(timestamp: float, now: float | None = None) -> str:
    if timestamp <= 0:
        return "never"
    seconds = max((now or time.time()) - timestamp, 0)
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if count > 1 else ''} ago"
    return "just now"


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
