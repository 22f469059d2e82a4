"""The SRE's cache tools: ``pullgate warm``, ``export``, ``import`` and ``pullgate cache
{ls,inspect,du,prune}``. Each works on a cache directory (``cache.dir`` from ``--config``,
or ``--cache-dir``) with or without the daemon running, safely alongside it.

Exit status: 0 done, 1 the operation failed (image not cached, archive corrupt, digest
mismatch, an image that would not warm), 2 bad usage or configuration. Errors go to stderr
as one line; ``--json`` puts the result on stdout for scripts; progress goes to stderr (bars
on a terminal, log lines otherwise).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, TypeAlias

from proxy.admission.workloads import images_in_files
from proxy.config.settings import Config, LogConfig, load_config
from proxy.config.units import format_size, parse_duration
from proxy.errors import ConfigError, PullgateError
from proxy.inventory import listing
from proxy.inventory.export import ExportPlan, export_to_file, plan_export, write_archive
from proxy.inventory.images import PINNED, Inventory
from proxy.inventory.imports import Target, commit, plan_import, stage
from proxy.inventory.warm import Warmer, open_mirror, read_list
from proxy.oci.digest import Digest
from proxy.oci.globs import GlobSet
from proxy.oci.reference import ImageReference
from proxy.ops.logs import configure_logging
from proxy.ops.progress import Progress
from proxy.policy.active import PolicySet, load_policies
from proxy.policy.findings import image_findings
from proxy.registry.catalog import CatalogDatabase
from proxy.registry.routing import Router, registry_name
from proxy.registry.store import BlobStore

EXAMPLES = {
    "warm": """examples:
  pullgate warm nginx:1.25 ghcr.io/acme/app:2.1
  pullgate warm --platform linux/amd64,linux/arm64 --file images.txt
  pullgate warm --from-manifests deploy/*.yaml""",
    "export": """examples:
  pullgate export nginx:1.25 redis:7 -o images.tar
  skopeo copy oci-archive:images.tar:docker.io/library/nginx:1.25 docker://registry.local/nginx:1.25""",
    "import": """examples:
  pullgate import images.tar                       # names from the archive (full references)
  pullgate import --image docker.io/acme/app app.tar   # archive names only tags (e.g. '1.25')
  skopeo copy docker://nginx:1.25 oci-archive:nginx.tar:nginx:1.25 && pullgate import nginx.tar""",
    "cache": """examples:
  pullgate cache ls --repository 'library/*'
  pullgate cache inspect nginx:1.25 --platform linux/arm64
  pullgate cache du --json
  pullgate cache prune --older-than 30d --dry-run""",
}


class CacheMissing(PullgateError):
    code, status = "NAME_UNKNOWN", 404


Parsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def register(commands: Parsers) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        default=os.environ.get("PULLGATE_CONFIG") or None,
        help="YAML config file (default: $PULLGATE_CONFIG, else embedded defaults)",
    )
    common.add_argument("--cache-dir", type=Path, help="override cache.dir")
    common.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    _warm_parser(commands, common)
    _archive_parsers(commands, common)
    _cache_parsers(commands, common)


def _parser(commands: Parsers, name: str, common: argparse.ArgumentParser, help: str) -> argparse.ArgumentParser:
    return commands.add_parser(
        name,
        parents=[common],
        help=help,
        description=help[0].upper() + help[1:] + ".",
        epilog=EXAMPLES.get(name),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _warm_parser(commands: Parsers, common: argparse.ArgumentParser) -> None:
    warm = _parser(commands, "warm", common, "pre-pull images into the cache through the configured upstreams")
    warm.add_argument("images", nargs="*", metavar="IMAGE", help="image reference (nginx:1.25, ghcr.io/a/b@sha256:...)")
    warm.add_argument("--file", action="append", default=[], metavar="LIST", help="file with one image per line")
    warm.add_argument(
        "--from-manifests", nargs="+", default=[], metavar="K8S_YAML", help="warm every image these manifests run"
    )
    warm.add_argument("--platform", type=_platforms, help="only these platforms of an index (os/arch[/variant],...)")
    warm.add_argument("--jobs", type=int, default=4, help="images warmed at once (default 4)")
    warm.add_argument("--signatures", action="store_true", help="also warm cosign sha256-<hex>.sig/.att tags")
    warm.set_defaults(func=_command(_warm))


def _archive_parsers(commands: Parsers, common: argparse.ArgumentParser) -> None:
    export = _parser(commands, "export", common, "write cached images to an OCI image-layout tarball")
    export.add_argument("images", nargs="+", metavar="IMAGE")
    export.add_argument("-o", "--output", required=True, metavar="FILE.tar", help="archive to write ('-' = stdout)")
    export.add_argument("--partial", action="store_true", help="leave out platforms of an index that are not cached")
    export.add_argument("--no-signatures", action="store_true", help="leave out cosign signatures and referrers")
    export.set_defaults(func=_command(_export))
    load = _parser(commands, "import", common, "load an OCI image-layout tarball into the cache")
    load.add_argument("archive", metavar="FILE.tar", help="oci-archive tarball ('-' = stdin)")
    load.add_argument(
        "--image",
        metavar="NAME[:TAG]",
        help="repository for entries named only by a tag (or not at all); its tag names a lone unnamed entry",
    )
    load.add_argument(
        "--no-pin",
        action="store_true",
        help="treat imported tags as just pulled (revalidated upstream after cache.tag_ttl) instead of pinned",
    )
    load.set_defaults(func=_command(_import))


def _cache_parsers(commands: Parsers, common: argparse.ArgumentParser) -> None:
    cache = commands.add_parser(
        "cache",
        help="list, inspect, measure and prune the cache",
        description="Query and prune the cache directory (with or without the daemon running).",
        epilog=EXAMPLES["cache"],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tools = cache.add_subparsers(title="tools", dest="tool", metavar="TOOL", required=True)
    ls = tools.add_parser(
        "ls",
        parents=[common],
        help="images in the cache (like docker images); SIZE is everything cached for the image: "
        "manifests, configs and layers",
    )
    ls.add_argument("--repository", action="append", default=[], metavar="GLOB", help="only matching repositories")
    ls.add_argument("--all", action="store_true", help="also list signatures, attestations and referrers")
    ls.set_defaults(func=_command(_ls))
    inspect = tools.add_parser("inspect", parents=[common], help="manifest, config, layers and history of an image")
    inspect.add_argument("image", metavar="IMAGE")
    inspect.add_argument("--platform", help="only this platform of an index")
    inspect.add_argument(
        "--policies", type=Path, help="policy file or directory to judge the image by (default: config policies)"
    )
    inspect.set_defaults(func=_command(_inspect))
    du = tools.add_parser("du", parents=[common], help="disk usage per repository and layer-sharing savings")
    du.set_defaults(func=_command(_du))
    prune = tools.add_parser("prune", parents=[common], help="remove images and objects nothing needs")
    prune.add_argument(
        "--older-than", type=_age, metavar="AGE", help="images not pulled for AGE, with a unit: 30d, 12h, 90m"
    )
    prune.add_argument("--repository", action="append", default=[], metavar="GLOB", help="only these repositories")
    prune.add_argument("--dry-run", action="store_true", help="show what would go, remove nothing")
    prune.add_argument(
        "--include-pinned", action="store_true", help="also remove images pinned by import (kept otherwise)"
    )
    prune.set_defaults(func=_command(_prune))


def _age(text: str) -> float:
    """A duration with its unit: ``--older-than 30`` is ambiguous (30 seconds? days?)."""
    if text.strip().replace(".", "", 1).isdigit():
        raise argparse.ArgumentTypeError(
            f"{text!r} has no unit: write e.g. {text.strip()}d, {text.strip()}h or {text.strip()}m"
        )
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _platforms(text: str) -> frozenset[str]:
    platforms = frozenset(p.strip() for p in text.split(",") if p.strip())
    if not platforms or any(len(p.split("/")) not in (2, 3) for p in platforms):
        raise argparse.ArgumentTypeError(f"expected os/arch[/variant],... got {text!r}")
    return platforms


# --- running ----------------------------------------------------------------------------------
def _command(action: Callable[[Config, argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        name = " ".join(filter(None, [args.command, getattr(args, "tool", None)]))
        try:
            config = _config(args)
            configure_logging(LogConfig(level="warning", format="console"))
            return action(config, args)
        except ConfigError as exc:
            print(f"pullgate {name}: config error: {exc.message}", file=sys.stderr)
            return 2
        except PullgateError as exc:
            print(f"pullgate {name}: {exc.message}", file=sys.stderr)
            return 1
        except (OSError, sqlite3.Error) as exc:
            print(f"pullgate {name}: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"pullgate {name}: interrupted", file=sys.stderr)
            return 130

    return run


def _config(args: argparse.Namespace) -> Config:
    overrides = dict(os.environ)
    if args.cache_dir:
        overrides["PULLGATE_CACHE__DIR"] = str(args.cache_dir)
    return load_config(Path(args.config) if args.config else None, overrides)


@contextmanager
def _cache(config: Config, *, create: bool = False) -> Iterator[tuple[BlobStore, CatalogDatabase]]:
    root = config.cache.dir
    if not create and not (root / "catalog.db").is_file():
        raise CacheMissing(f"no cache at {root} (use --cache-dir or cache.dir in --config)")
    store = BlobStore(root)
    if create:  # never BlobStore.open(): it sweeps tmp/, where a running daemon downloads
        store.blobs.mkdir(parents=True, exist_ok=True)
        store.tmp.mkdir(parents=True, exist_ok=True)
    catalog = CatalogDatabase(root / "catalog.db").open()
    try:
        yield store, catalog
    finally:
        catalog.close()


def _inventory(config: Config, store: BlobStore, catalog: CatalogDatabase) -> Inventory:
    return Inventory(store, catalog, Router(config), config.upstreams).load()


def _emit(args: argparse.Namespace, data: Any, text: Callable[[], Iterator[str]]) -> None:
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        for line in text():
            print(line)


# --- warm, export, import ---------------------------------------------------------------------------
def _warm(config: Config, args: argparse.Namespace) -> int:
    images = list(args.images)
    for path in args.file:
        images += read_list(path)
    images += images_in_files(args.from_manifests)
    if not images:
        print("pullgate warm: no images given (IMAGE..., --file or --from-manifests)", file=sys.stderr)
        return 2
    results = asyncio.run(_warm_all(config, args, list(dict.fromkeys(images))))
    failed = [r for r in results if r.error]
    _emit(
        args, [r.to_json() for r in results], lambda: iter([f"warmed {len(results) - len(failed)} of {len(results)}"])
    )
    return 1 if failed else 0


async def _warm_all(config: Config, args: argparse.Namespace, images: list[str]) -> list[Any]:
    mirror = await open_mirror(config)
    progress = Progress(sys.stderr)
    try:
        warmer = Warmer(mirror, progress, platforms=args.platform, jobs=args.jobs, signatures=args.signatures)
        return await warmer.run(images)
    finally:
        progress.close()
        await mirror.close()


def _export(config: Config, args: argparse.Namespace) -> int:
    if args.output == "-" and (args.json or sys.stdout.isatty()):
        print("pullgate export: -o - writes the archive to stdout: pipe it, and leave out --json", file=sys.stderr)
        return 2
    with _cache(config) as (store, catalog):
        plan = plan_export(_inventory(config, store, catalog), args.images, partial=args.partial,
                           attachments=not args.no_signatures)  # fmt: skip
        for note in plan.notes:
            print(f"pullgate export: note: {note}", file=sys.stderr)
        started = time.monotonic()
        _write_export(store, plan, args.output)
    seconds = time.monotonic() - started
    summary = {
        "output": args.output,
        "images": [e.to_json() for e in plan.entries],
        "objects": len(plan.blobs),
        "bytes": plan.total,
        "seconds": round(seconds, 3),
        "notes": plan.notes,
    }
    if args.output != "-":
        _emit(args, summary, lambda: (f"exported {e.name}  {e.digest}" for e in plan.entries))
    return 0


def _write_export(store: BlobStore, plan: ExportPlan, output: str) -> None:
    task = Progress(sys.stderr).task(f"export {output}", plan.total)
    try:
        if output == "-":
            write_archive(store, plan, sys.stdout.buffer, task)
            sys.stdout.buffer.flush()
        else:
            export_to_file(store, plan, Path(output), task)
    except PullgateError:
        task.fail("")  # the error itself is printed once, as the last line
        raise
    task.finish(f"{len(plan.entries)} image(s), {len(plan.blobs)} objects")


def _import(config: Config, args: argparse.Namespace) -> int:
    source: Path | BinaryIO = sys.stdin.buffer if args.archive == "-" else Path(args.archive)
    size = source.stat().st_size if isinstance(source, Path) and source.is_file() else None
    with _cache(config, create=True) as (store, catalog):
        results, size, seconds = asyncio.run(_import_archive(config, args, (source, size), store, catalog))
        total, _ = catalog.totals()
    if total > config.cache.max_size:
        print(
            f"pullgate import: warning: the cache holds {format_size(total)}, over cache.max_size "
            f"{format_size(config.cache.max_size)}: a running daemon evicts least recently pulled images",
            file=sys.stderr,
        )
    summary = {"archive": args.archive, "images": results, "bytes": size, "seconds": round(seconds, 3)}
    _emit(args, summary, lambda: _import_lines(results, size, seconds))
    return 0


async def _import_archive(
    config: Config,
    args: argparse.Namespace,
    archive: tuple[Path | BinaryIO, int | None],
    store: BlobStore,
    catalog: CatalogDatabase,
) -> tuple[list[dict[str, Any]], int, float]:
    source, size = archive
    progress, started = Progress(sys.stderr), time.monotonic()
    task = progress.task(f"import {args.archive}", size)
    try:
        staged = await asyncio.to_thread(stage, source, store, task)
        try:
            registries = {u.name: registry_name(u) for u in config.upstreams}
            targets = plan_import(staged, store, Router(config), registries, args.image)
            results = []
            for target in targets:
                result = target.to_json()
                unpinned = args.no_pin and target.tag is not None and _pinned(catalog, target)
                if unpinned:
                    result["notes"].append("was pinned by an earlier import: --no-pin un-pins it")
                written = await commit(target, staged, store, catalog, time.time() if args.no_pin else PINNED)
                pinned = None if target.tag is None else not args.no_pin
                results.append(result | {"new_bytes": written, "pinned": pinned, "unpinned": unpinned})
        finally:
            staged.discard()
    except PullgateError:
        task.fail("")  # the error itself is printed once, as the last line
        raise
    task.finish(f"{len(results)} image(s)")
    return results, task.done, time.monotonic() - started


def _pinned(catalog: CatalogDatabase, target: Target) -> bool:
    assert target.tag is not None
    entry = catalog.tag(target.upstream, target.repository, target.tag)
    return entry is not None and entry.checked >= PINNED


def _import_lines(results: list[dict[str, Any]], size: int, seconds: float) -> Iterator[str]:
    for r in results:
        stored = f"{r['objects']} objects, {format_size(r['size'])}, {format_size(r['new_bytes'])} new"
        if r["pinned"] is None:
            state = "by digest only (no tag)"
        elif r["pinned"]:
            state = "pinned: served without asking an upstream"
        else:
            state = "not pinned: revalidated upstream after cache.tag_ttl"
        yield f"imported {r['reference']}  {r['digest']}  ({stored}; {state})"
        yield from (f"  note: {note}" for note in r["notes"])
    rate = format_size(size / max(seconds, 1e-6))
    yield f"{len(results)} image(s), {format_size(size)} read in {seconds:.1f}s ({rate}/s)"


# --- cache ls, inspect, du, prune -------------------------------------------------------------------
def _ls(config: Config, args: argparse.Namespace) -> int:
    with _cache(config) as (store, catalog):
        images = _inventory(config, store, catalog).images(GlobSet.compile(args.repository), attachments=args.all)
    _emit(args, [i.to_json() for i in images], lambda: listing.ls_lines(images))
    return 0


def _inspect(config: Config, args: argparse.Namespace) -> int:
    with _cache(config) as (store, catalog):
        inventory = _inventory(config, store, catalog)
        image = inventory.locate(args.image)
        details = listing.inspect(inventory, image, args.platform)
    policies = args.policies or config.policies
    if policies is not None:
        ref = ImageReference(image.registry, image.repository, None, Digest.parse(image.digest))
        details["policy_findings"] = asyncio.run(_findings(config, load_policies(policies), ref))
    _emit(args, details, lambda: listing.inspect_lines(details))
    return 0


async def _findings(config: Config, policies: PolicySet, ref: ImageReference) -> list[str]:
    """Which ``image`` rules the cached image would fail (configs are read through the cache)."""
    mirror = await open_mirror(config)
    try:
        return await image_findings(policies, mirror, mirror, ref)
    finally:
        await mirror.close()


def _du(config: Config, args: argparse.Namespace) -> int:
    with _cache(config) as (store, catalog):
        usage = _inventory(config, store, catalog).usage()
    usage["max_size"] = config.cache.max_size
    _emit(args, usage, lambda: listing.du_lines(usage))
    return 0


def _prune(config: Config, args: argparse.Namespace) -> int:
    with _cache(config) as (store, catalog):
        inventory = _inventory(config, store, catalog)
        plan = inventory.plan_prune(
            args.older_than, GlobSet.compile(args.repository), include_pinned=args.include_pinned
        )
        freed = plan.bytes if args.dry_run else inventory.prune(plan)
    data = plan.to_json() | {"dry_run": args.dry_run, "freed": freed}
    _emit(args, data, lambda: listing.prune_lines(plan, freed, args.dry_run))
    return 0
