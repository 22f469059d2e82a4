"""``pullgate policy check`` and ``pullgate policy lint`` through the real CLI entry point."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from proxy.cli import main

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parent.parent
WEBHOOK_POLICIES = str(DATA / "policies" / "webhook")


def test_lint_examples_ship_valid(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "lint", str(ROOT / "policies")]) == 0
    assert capsys.readouterr().out.startswith(f"ok: {ROOT / 'policies'}: ")


@pytest.mark.parametrize(
    ("path", "code", "lines"),
    [
        ("policies/valid", 0, ["ok: {d}/policies/valid: 3 policies in 2 files"]),
        ("policies/valid/pinned.yaml", 0, ["ok: {d}/policies/valid/pinned.yaml: 1 policy in 1 file"]),
        (
            "policies/invalid",
            1,
            [
                "error: {d}/policies/invalid/bad-yaml.yaml: invalid YAML at line 4, column 1: "
                "expected ',' or '}}', but got '<stream end>'",
                "error: {d}/policies/invalid/second-doc.yaml: document 2 (broken): "
                "spec.rules.denyTags: expected a list of strings, got a string",
            ],
        ),
        ("policies/missing", 1, ["error: {d}/policies/missing: no such policy file or directory"]),
    ],
)
def test_lint(capsys: pytest.CaptureFixture[str], path: str, code: int, lines: list[str]) -> None:
    assert main(["policy", "lint", str(DATA / path)]) == code
    assert capsys.readouterr().out.splitlines() == [line.format(d=DATA) for line in lines]


def test_lint_duplicates_across_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = (DATA / "policies/valid/pinned.yaml").read_text()
    (tmp_path / "a.yaml").write_text(policy)
    (tmp_path / "b.yaml").write_text(policy)
    assert main(["policy", "lint", str(tmp_path)]) == 1
    assert "b.yaml: document 1 (prod-pinned): metadata.name: policy 'prod-pinned' is already" in (
        capsys.readouterr().out
    )


def test_check_manifests(capsys: pytest.CaptureFixture[str]) -> None:
    app, listing = DATA / "manifests/app.yaml", DATA / "manifests/list.yaml"
    code = main(["policy", "check", "--policies", WEBHOOK_POLICIES, str(app), str(listing)])
    out = capsys.readouterr().out.splitlines()
    assert code == 1  # the CronJob's registry is denied
    web = f"{app}#1 prod/Deployment/web"
    report = f"{app}#2 prod/CronJob/report"
    assert (
        f'WARN   {web}  container "setup" image "busybox": policy no-latest denies tag latest [no-latest/denyTags]'
    ) in out
    assert (
        f'SKIP   {web}  container "web" image "nginx:1.25": policy prod-pinned not evaluated offline: '
        "tag resolution (resolveTags) (use --config or --cache-dir)"
    ) in out
    assert f'ALLOW  {web}  container "web" image "nginx:1.25": policy registries passed' in out
    assert (
        f'DENY   {report}  container "report" image "registry.evil.example/tools/report:1": policy '
        "registries does not allow registry registry.evil.example (allowed: docker.io, ghcr.io, "
        "quay.io) [registries/allowedRegistries]"
    ) in out
    assert any(line.startswith(f"ALLOW  {listing}#1 default/Pod/tool") for line in out)
    assert out[-1].startswith("5 images, 14 decisions: ")
    assert out[-1].endswith(" not evaluated offline (use --config or --cache-dir)")
    assert not any(" passed (" in line for line in out), "nothing unevaluated is reported as passed"


@pytest.mark.parametrize(
    ("args", "code", "stderr"),
    [
        (["--policies", str(DATA / "policies/invalid"), "x.yaml"], 2, "invalid YAML at line 4"),
        (["--policies", WEBHOOK_POLICIES, str(DATA / "nope.yaml")], 2, "nope.yaml: cannot read manifests"),
    ],
)
def test_check_bad_input(capsys: pytest.CaptureFixture[str], args: list[str], code: int, stderr: str) -> None:
    assert main(["policy", "check", *args]) == code
    assert stderr in capsys.readouterr().err


@pytest.mark.parametrize(
    ("no_match", "namespace", "code", "last"),
    [
        ("allow", "default", 0, "1 image, 1 decision: 1 allow, 0 warn, 0 audit, 0 deny"),
        ("deny", "default", 1, "1 image, 1 decision: 0 allow, 0 warn, 0 audit, 1 deny"),
        # pinned.yaml resolves tags: offline, whether nginx:1 resolves is not known.
        ("deny", "prod", 0, "1 image, 1 decision: 0 allow, 0 warn, 0 audit, 0 deny, 1 not evaluated offline"),
    ],
)
def test_check_stdin_namespace_and_no_match(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_match: str,
    namespace: str,
    code: int,
    last: str,
) -> None:
    pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, image: nginx:1}]}\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(pod))
    policies = str(DATA / "policies/valid/pinned.yaml")  # matches only in prod
    args = ["policy", "check", "--policies", policies, "--no-match", no_match, "--namespace", namespace, "-"]
    assert main(args) == code
    assert capsys.readouterr().out.splitlines()[-1].startswith(last)


@pytest.mark.parametrize(
    ("field", "patterns", "error"),
    [
        ("images", ["NGINX"], "spec.match.images[0]: 'NGINX' can never match: repository names are lowercase"),
        (
            "images",
            ["ghcr.io/acme/**", "docker.io/library/[abc"],
            "spec.match.images[1]: 'docker.io/library/[abc' can never match: '[' is not in any repository name "
            "(patterns use * and ** as globs; every other character is literal)",
        ),
        ("excludeImages", ["Acme/app"], "spec.match.excludeImages[0]: invalid image name 'Acme/app': 'Acme' is not"),
        ("images", ["ghcr.io./acme/**"], "spec.match.images[0]: invalid image name 'ghcr.io./acme/**': invalid"),
        ("allowedBaseImages", ["PYTHON:*"], "spec.rules.image.allowedBaseImages[0]: expected an image pattern"),
        ("allowedRegistries", ["quay"], "spec.rules.allowedRegistries[0]: 'quay' is not a registry host"),
    ],
)
def test_lint_rejects_patterns_that_can_never_match(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str, patterns: list[str], error: str
) -> None:
    """Issue 15 item 6: a pattern that cannot match any image would silently enforce nothing."""
    match: dict[str, object] = {"images": ["**"]}
    rules: dict[str, object] = {"requireDigest": True}
    if field in ("images", "excludeImages"):
        match[field] = patterns
    elif field == "allowedBaseImages":
        rules["image"] = {"allowedBaseImages": patterns}
    else:
        rules[field] = patterns
    doc = {"apiVersion": "pullgate.dev/v1", "kind": "ImagePolicy", "metadata": {"name": "p"},
           "spec": {"match": match, "rules": rules}}
    (tmp_path / "p.yaml").write_text(json.dumps(doc))  # JSON is YAML
    assert main(["policy", "lint", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"error: {tmp_path / 'p.yaml'}: document 1 (p): {error}" in out, out
