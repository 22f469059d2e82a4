"""``pullgate policy check`` and ``pullgate policy lint``: policies without a cluster.

``check`` evaluates Kubernetes manifests (multi-document YAML, ``kind: List`` too) against a
policy set, the way ``/mutate`` would. It prints one line per image and policy; exit 1 on any
deny, 2 on bad input.

Offline (the default) nothing is fetched, so three things cannot be judged: whether a tag
that a ``resolveTags`` policy pins resolves, ``signatures``, and ``image`` rules (what is
inside the image). A policy that passes everything else but has one of those prints a SKIP
line saying what was not evaluated, never "passed", and an offline run never denies for
what it could not see. With ``--config FILE`` and/or ``--cache-dir DIR`` it opens the
mirror's cache (and its upstreams) as the webhook does: tags resolve, signatures verify, and
content rules are judged on the cached manifests and configs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, TextIO, cast

from proxy.admission.workloads import group_kind, read_objects, sites_of
from proxy.cli import logs_to_stderr
from proxy.config.settings import load_config
from proxy.errors import PullgateError
from proxy.policy.active import PolicySet, load_policies, policy_files
from proxy.policy.document import PolicyInvalid, load_file
from proxy.policy.evaluation import Decision, Evaluator, ImageResult, NoMatch
from proxy.policy.rules import image as imagerules
from proxy.policy.rules.signature import Signatures
from proxy.registry.mirror import Mirror

EXAMPLES = """\
examples:
  pullgate policy lint policies/
  pullgate policy check --policies policies/ deploy/web.yaml deploy/jobs.yaml
  kubectl get deploy -A -o yaml | pullgate policy check --policies policies/ -
  pullgate policy check --config /etc/pullgate/config.yaml --policies policies/ deploy/web.yaml
"""
ONLINE_HINT = "use --config or --cache-dir"


# What an offline run cannot judge, by the name its SKIP lines use.
_OFFLINE_RULES: dict[str, type] = {"signatures": Signatures, "image rules": imagerules.ImageRules}


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "policy",
        help="check manifests against image policies, lint policy files",
        description="Offline tools for ImagePolicy files (see policies/ for examples).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tools = parser.add_subparsers(title="tools", dest="tool", metavar="TOOL", required=True)
    check = tools.add_parser("check", help="evaluate Kubernetes manifests against policies")
    check.add_argument("--policies", type=Path, required=True, help="policy file or directory")
    check.add_argument("--namespace", default="default", help="namespace for objects that name none (default: default)")
    check.add_argument(
        "--no-match",
        choices=("allow", "warn", "deny"),
        default="allow",
        help="what happens to images no policy matches (defaults.no_match)",
    )
    check.add_argument("--config", type=Path, help="judge content too, through this mirror config's cache")
    check.add_argument("--cache-dir", type=Path, help="judge content too, through this cache (overrides cache.dir)")
    check.add_argument("files", nargs="+", metavar="FILE", help="manifest files ('-' = stdin)")
    check.set_defaults(func=run_check)
    lint = tools.add_parser("lint", help="validate policy files")
    lint.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="file or directory")
    lint.set_defaults(func=run_lint)


def run_lint(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    failed = False
    for path in cast(list[Path], args.paths):
        errors = _lint_errors(path)
        for error in errors:
            print(f"error: {error}", file=out)
        if not errors:
            policies = load_policies(path)
            n, files = len(policies.policies), len(policies.files)
            count = f"{n} {'policy' if n == 1 else 'policies'} in {_count(files, 'file')}"
            print(f"ok: {path}: {count}", file=out)
        failed = failed or bool(errors)
    return 1 if failed else 0


def _lint_errors(path: Path) -> list[str]:
    """Every bad file's error (not only the first), then cross-file problems."""
    try:
        files = policy_files(path)
    except PolicyInvalid as exc:
        return [exc.message]
    errors = []
    for file in files:
        try:
            load_file(file)
        except PolicyInvalid as exc:
            errors.append(exc.message)
    if not errors:
        try:
            load_policies(path)
        except PolicyInvalid as exc:
            errors.append(exc.message)
    return errors


def run_check(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    online = args.config is not None or args.cache_dir is not None
    try:
        policies = load_policies(args.policies)
        objects = [obj for name in args.files for obj in read_objects(name)]
        skipped = {} if online else _offline_parts(policies)
        if skipped:
            policies = _without_offline_rules(policies)
        results = asyncio.run(_check(args, policies, objects))
    except PullgateError as exc:
        print(f"pullgate policy check: {exc.message}", file=sys.stderr)
        return 2
    pinning = {p.name for p in policies.policies if p.resolve_tags}
    counts = {"allow": 0, "warn": 0, "audit": 0, "deny": 0}
    unevaluated = 0
    for label, result in results:
        for decision in result.decisions:
            parts = _not_evaluated(decision, result, skipped, pinning)
            if parts and decision.outcome == "allow":
                unevaluated += 1
                text = f"policy {decision.policy} not evaluated offline: {', '.join(parts)} ({ONLINE_HINT})"
                print(f"SKIP   {label}  {result.site.describe()}: {text}", file=out)
                continue
            counts[decision.outcome] += 1
            offline = f"; not evaluated offline: {', '.join(parts)}" if parts else ""
            print(_line(label, result, decision) + offline, file=out)
    summary = ", ".join(f"{n} {k}" for k, n in counts.items())
    if unevaluated:
        summary += f", {unevaluated} not evaluated offline ({ONLINE_HINT})"
    print(
        f"{_count(len(results), 'image')}, {_count(sum(counts.values()) + unevaluated, 'decision')}: {summary}",
        file=out,
    )
    return 1 if counts["deny"] else 0


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _offline_parts(policies: PolicySet) -> dict[str, list[str]]:
    """Per policy, the rules an offline run cannot judge (they need the image or its signatures)."""
    parts: dict[str, list[str]] = {}
    for policy in policies.policies:
        found = [name for name, kind in _OFFLINE_RULES.items() if any(isinstance(r, kind) for r in policy.rules)]
        if found:
            parts[policy.name] = found
    return parts


def _not_evaluated(
    decision: Decision, result: ImageResult, skipped: Mapping[str, list[str]], pinning: set[str]
) -> list[str]:
    if decision.policy is None:
        return []
    parts = list(skipped.get(decision.policy, ()))
    if decision.policy in pinning and result.resolution == "offline":
        parts.insert(0, "tag resolution (resolveTags)")
    return parts


def _without_offline_rules(policies: PolicySet) -> PolicySet:
    """The policy set minus the rules that need the image's content or signatures."""
    kinds = tuple(_OFFLINE_RULES.values())
    kept = tuple(
        dataclasses.replace(p, rules=tuple(r for r in p.rules if not isinstance(r, kinds))) for p in policies.policies
    )
    return PolicySet.of(kept, policies.files)


@contextlib.asynccontextmanager
async def _evaluator(args: argparse.Namespace, policies: PolicySet) -> AsyncIterator[Evaluator]:
    no_match = cast(NoMatch, args.no_match)
    if args.config is None and args.cache_dir is None:
        yield Evaluator(policies, no_match)
        return
    overrides = dict(os.environ)
    if args.cache_dir is not None:
        overrides["PULLGATE_CACHE__DIR"] = str(args.cache_dir)
    mirror = Mirror(load_config(args.config, overrides))
    with logs_to_stderr():
        await mirror.open()
        try:
            yield Evaluator(policies, no_match, mirror, mirror.metrics, mirror)
        finally:
            await mirror.close()


async def _check(
    args: argparse.Namespace, policies: PolicySet, objects: list[tuple[str, Mapping[str, Any]]]
) -> list[tuple[str, ImageResult]]:
    async with _evaluator(args, policies) as evaluator:
        return await _evaluate(evaluator, objects, args.namespace)


async def _evaluate(
    evaluator: Evaluator, objects: list[tuple[str, Mapping[str, Any]]], namespace: str
) -> list[tuple[str, ImageResult]]:
    results: list[tuple[str, ImageResult]] = []
    for source, obj in objects:
        metadata = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
        assert isinstance(metadata, dict)
        ns = str(metadata.get("namespace") or namespace)
        label = f"{source} {ns}/{group_kind(obj)[1]}/{metadata.get('name') or '?'}"
        sites = sites_of(obj, label)
        evaluation = await evaluator.evaluate(sites, ns, mutate=True)
        results.extend((label, r) for r in evaluation.results)
    return results


def _line(label: str, result: ImageResult, d: Decision) -> str:
    if d.message:
        text = d.message
    elif d.policy is None:
        text = f"{result.site.describe()}: no policy matches (allowed by default)"
    else:
        text = f"{result.site.describe()}: policy {d.policy} passed"
    rule = f" [{d.policy or '-'}/{d.rule}]" if d.rule else ""
    return f"{d.outcome.upper():<5}  {label}  {text}{rule}"
