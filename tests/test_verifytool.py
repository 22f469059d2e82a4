"""``pullgate verify`` against the real registry, as a security team would run it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from proxy.cli import main
from tests.signer import generate_key, sign_bundle, sign_legacy, unsupported_public_pem, write_oci_layout
from tests.support.images import ImageFactory
from tests.support.procs import arun
from tests.support.registry import Registry


@pytest.mark.parametrize(
    ("signed_by", "fmt", "checked_with", "exit_code", "stderr"),
    [
        ("ci", "legacy", ["ci"], 0, "1 of 1 required signatures verified"),
        ("ci", "bundle", ["ci"], 0, "1 of 1 required signatures verified"),
        ("ci", "legacy", ["other"], 1, "signature does not verify"),
        (None, "legacy", ["ci"], 1, "no signature found"),
        ("ci", "legacy", ["ci", "other"], 0, "other.pub: signature does not verify"),
    ],
)
async def test_verify_command(
    registry: Registry,
    image_factory: ImageFactory,
    repo: str,
    tmp_path: Path,
    signed_by: str | None,
    fmt: str,
    checked_with: list[str],
    exit_code: int,
    stderr: str,
) -> None:
    keys = {"ci": generate_key(), "other": generate_key()}
    for name, key in keys.items():
        (tmp_path / f"{name}.pub").write_bytes(key.public_pem)
    image = image_factory.image("1", layers=[1_000])
    await registry.apush(image.layout, "1", f"{repo}:1")
    if signed_by is not None:
        sign = sign_legacy if fmt == "legacy" else sign_bundle
        artifact = sign(image.manifest_digest, f"docker.io/{repo}", [keys[signed_by]])
        await registry.apush(write_oci_layout(tmp_path / "sig", artifact), artifact.tag, f"{repo}:{artifact.tag}")
    args = [sys.executable, "-m", "proxy", "verify", f"docker.io/{repo}:1", "--mirror", registry.url]
    for name in checked_with:
        args += ["--key", str(tmp_path / f"{name}.pub")]
    result = await arun(args, timeout=60, check=False)
    assert result.returncode == exit_code, result.stderr
    assert stderr in result.stderr
    payloads = json.loads(result.stdout)
    if exit_code == 0:
        assert payloads, "the verified payloads are printed"
        text = json.dumps(payloads)
        assert image.manifest_digest.split(":")[1] in text
    else:
        assert payloads == []


def test_verify_rejects_unsupported_keys(tmp_path: Path) -> None:
    (tmp_path / "dsa.pub").write_bytes(unsupported_public_pem("dsa"))
    assert main(["verify", "alpine:3", "--key", str(tmp_path / "dsa.pub"), "--mirror", "http://127.0.0.1:9"]) == 2
