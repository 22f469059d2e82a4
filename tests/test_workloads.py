"""The one reader of Kubernetes objects (``proxy.admission.workloads``): manifest files for
``policy check`` and ``warm --from-manifests``, PodSpecs in every workload kind, and the
errors it raises for malformed input (400, naming where)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.admission.workloads import (
    POD_SPEC_PATHS,
    WorkloadInvalid,
    extract_sites,
    group_kind,
    images_in_files,
    read_objects,
)
from proxy.cli import main

MANIFESTS = Path(__file__).parent / "data" / "manifests"


@pytest.mark.parametrize(
    ("files", "expected", "error"),
    [
        (
            ["app.yaml"],
            [
                "busybox",
                "nginx:1.25",
                "quay.io/prometheus/node-exporter:v1.8.0",
                "registry.evil.example/tools/report:1",
            ],
            None,
        ),
        (["list.yaml", "list.yaml"], ["ghcr.io/acme/tool@sha256:" + "a" * 64], None),
        (["missing.yaml"], None, "cannot read"),
        (["broken.yaml"], None, "not YAML"),
        (["bad-pod.yaml"], None, r"bad-pod.yaml#1: /spec/containers: not a list"),
    ],
)
def test_images_in_files(tmp_path: Path, files: list[str], expected: list[str] | None, error: str | None) -> None:
    (tmp_path / "broken.yaml").write_text("kind: [unclosed")
    (tmp_path / "bad-pod.yaml").write_text("apiVersion: v1\nkind: Pod\nspec: {containers: 3}\n")
    paths = [str(tmp_path / f) if (tmp_path / f).exists() else str(MANIFESTS / f) for f in files]
    if error is not None:
        with pytest.raises(WorkloadInvalid, match=error) as info:
            images_in_files(paths)
        assert info.value.status == 400
        return
    assert images_in_files(paths) == expected


def test_read_objects_labels_documents_and_skips_other_kinds() -> None:
    found = read_objects(str(MANIFESTS / "app.yaml"))
    assert [(label.rpartition("/")[2], group_kind(obj)) for label, obj in found] == [
        ("app.yaml#1", ("apps", "Deployment")),
        ("app.yaml#2", ("batch", "CronJob")),
    ]


@pytest.mark.parametrize(
    ("api_version", "kind", "expected"),
    [
        ("v1", "Pod", ("", "Pod")),
        ("apps/v1", "Deployment", ("apps", "Deployment")),
        ("batch/v1", "CronJob", ("batch", "CronJob")),
        (None, None, ("", "")),
        (7, ["Pod"], ("", "")),
    ],
)
def test_group_kind(api_version: Any, kind: Any, expected: tuple[str, str]) -> None:
    assert group_kind({"apiVersion": api_version, "kind": kind}) == expected


@pytest.mark.parametrize(("group", "kind"), sorted(POD_SPEC_PATHS))
def test_every_workload_kind_is_read_at_its_pod_spec(group: str, kind: str) -> None:
    obj: dict[str, Any] = {"containers": [{"name": "c", "image": "nginx"}]}
    for key in reversed(POD_SPEC_PATHS[(group, kind)]):
        obj = {key: obj}
    (site,) = extract_sites(obj, group, kind)
    prefix = "/" + "/".join(POD_SPEC_PATHS[(group, kind)])
    assert site.image == "nginx" and site.pointer == f"{prefix}/containers/0/image"


def test_policy_check_and_warm_read_the_same_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``policy check`` (its report) and ``warm`` (``images_in_files``) see the same images of
    the same files: they share the reader."""
    policy = tmp_path / "all.yaml"
    policy.write_text(
        "apiVersion: pullgate.dev/v1\nkind: ImagePolicy\nmetadata: {name: all}\n"
        "spec: {mode: audit, match: {images: ['**']}, rules: {requireDigest: true}}\n"
    )
    files = [str(MANIFESTS / "app.yaml"), str(MANIFESTS / "list.yaml")]
    assert main(["policy", "check", "--policies", str(policy), *files]) == 0
    report = capsys.readouterr().out
    images = images_in_files(files)
    assert len(images) == 5
    for image in images:
        assert f'image "{image}"' in report, (image, report)
