import pytest

from proxy.registry.catalog import CatalogSnapshot
from proxy.registry.eviction import plan_eviction


def snapshot(objects: dict[str, int], refs: dict[str, list[str]], last_used: dict[str, float]) -> CatalogSnapshot:
    return CatalogSnapshot(
        sizes=objects,
        manifests=set(refs),
        refs=[(parent, child) for parent, children in refs.items() for child in children],
        last_used={d: last_used.get(d, 0.0) for d in objects},
    )


# Three images: A (old), B (middle), C (new). A and B share layer "shared"; C is an index
# over two platform manifests.
OBJECTS = {"A": 1, "a1": 100, "shared": 50, "B": 1, "b1": 100, "C": 1, "c-amd": 1, "c-arm": 1, "c1": 100, "c2": 100}
REFS = {"A": ["a1", "shared"], "B": ["b1", "shared"], "C": ["c-amd", "c-arm"], "c-amd": ["c1"], "c-arm": ["c2"]}
LAST = {"A": 10.0, "B": 20.0, "C": 30.0, "c-amd": 5.0}


@pytest.mark.parametrize(
    ("target", "busy", "expected"),
    [
        (10_000, frozenset(), []),  # under quota: nothing
        (400, frozenset(), [("A", {"A", "a1"})]),  # oldest image; the shared layer stays with B
        (350, frozenset(), [("A", {"A", "a1"}), ("B", {"B", "b1", "shared"})]),
        (
            100,
            frozenset(),
            [("A", {"A", "a1"}), ("B", {"B", "b1", "shared"}), ("C", {"C", "c-amd", "c-arm", "c1", "c2"})],
        ),
        (350, frozenset({"A"}), [("B", {"B", "b1"}), ("C", {"C", "c-amd", "c-arm", "c1", "c2"})]),
        (400, frozenset({"a1"}), [("A", {"A"}), ("B", {"B", "b1", "shared"})]),  # a busy layer stays
    ],
)
def test_plan_evicts_whole_images_least_recently_used_first(
    target: int, busy: frozenset[str], expected: list[tuple[str, set[str]]]
) -> None:
    plan = plan_eviction(snapshot(OBJECTS, REFS, LAST), target, busy)
    assert [(v.root, set(v.members)) for v in plan] == expected
    for victim in plan:
        assert victim.members[0] == victim.root, "the manifest goes first, never leaving it without blobs"


def test_platform_manifest_pull_keeps_the_index_young() -> None:
    # c-amd was pulled recently: the whole index C counts as recently used.
    plan = plan_eviction(snapshot(OBJECTS, REFS, {**LAST, "c-amd": 99.0, "C": 1.0}), 400)
    assert [v.root for v in plan] == ["A"]


def test_orphan_blobs_go_first_when_oldest() -> None:
    objects = {"X": 1, "x1": 10, "orphan": 1000}
    plan = plan_eviction(snapshot(objects, {"X": ["x1"]}, {"X": 50.0, "orphan": 1.0}), 100)
    assert [v.root for v in plan] == ["orphan"]
