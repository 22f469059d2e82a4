"""Quota enforcement: when the store grows past ``cache.max_size``, evict whole images,
least recently pulled first, down to ``low_water * max_size``.

An image is a root manifest (one no other cached manifest references — an index, or a
single-platform manifest) with everything it references. Objects still referenced by a
manifest that stays are kept, so no kept manifest ever points at missing bytes (the failure
mode of TTL expiry in Distribution's proxy, distribution#2367/#4191). Blobs being downloaded
are not in the store yet; blobs being read stay readable (an open file survives unlink).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from proxy.oci.digest import Digest
from proxy.registry.catalog import CatalogSnapshot


@dataclass(frozen=True, slots=True)
class Victim:
    root: str
    members: tuple[str, ...]  # digests to delete (root first)
    size: int
    last_used: float


def plan_eviction(snapshot: CatalogSnapshot, target: int, busy: frozenset[str] = frozenset()) -> list[Victim]:
    """Which images to evict, oldest first, so the store shrinks to ``target`` bytes."""
    children: dict[str, set[str]] = defaultdict(set)
    parents: dict[str, set[str]] = defaultdict(set)
    for parent, child in snapshot.refs:
        if parent in snapshot.sizes:
            children[parent].add(child)
            parents[child].add(parent)
    groups = [(_closure(root, children, snapshot), root) for root in snapshot.sizes if not parents[root]]
    ordered = sorted(groups, key=lambda g: max(snapshot.last_used.get(d, 0.0) for d in g[0]))
    total = sum(snapshot.sizes.values())
    evicted: set[str] = set()
    victims = []
    for members, root in ordered:
        if total <= target:
            break
        if root in busy:
            continue
        removable = _removable(members, parents, evicted, busy)
        if not removable:
            continue
        evicted.update(removable)
        size = sum(snapshot.sizes[d] for d in removable)
        total -= size
        last = max(snapshot.last_used.get(d, 0.0) for d in members)
        victims.append(Victim(root, tuple(sorted(removable, key=lambda d: d != root)), size, last))
    return victims


def _closure(root: str, children: dict[str, set[str]], snapshot: CatalogSnapshot) -> set[str]:
    seen, stack = {root}, [root]
    while stack:
        for child in children.get(stack.pop(), ()):
            if child in snapshot.sizes and child not in seen:
                seen.add(child)
                stack.append(child)
    return seen


def _removable(members: set[str], parents: dict[str, set[str]], evicted: set[str], busy: frozenset[str]) -> set[str]:
    """Members no manifest outside the evicted set still needs. A shared member keeps its
    own children too, so the fixpoint walks down from the root."""
    removable: set[str] = set()
    changed = True
    while changed:
        changed = False
        for digest in members - removable:
            if digest in busy:
                continue
            holders = parents.get(digest, set()) - removable - evicted
            if not holders:
                removable.add(digest)
                changed = True
    return removable


def digests(victim: Victim) -> list[Digest]:
    return [Digest.parse(d) for d in victim.members]
