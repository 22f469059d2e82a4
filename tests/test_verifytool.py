"""``pullgate verify`` against the real registry, as a security team would run it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from proxy.cli import main
from tests.signer import (
    bundle_artifact,
    generate_key,
    sign_bundle,
    sign_legacy,
    unsupported_public_pem,
    write_oci_layout,
)
from tests.sigstore_fakes import GITHUB, WORKFLOW, FakeSigstore, statement
from tests.support.images import ImageFactory
from tests.support.procs import arun
from tests.support.registry import Registry
from tests.test_keyless_e2e import real_signature


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


KEYLESS_VECTOR = Path(__file__).parent / "data" / "cosign" / "containers-image-fulcio-rekor-valid"


@pytest.mark.parametrize(
    ("flags", "exit_code", "stderr"),
    [
        (["--certificate-identity", "mitr@redhat.com", "--certificate-oidc-issuer", "https://github.com/login/oauth"],
         0, "mitr@redhat.com: signed by mitr@redhat.com (issuer https://github.com/login/oauth)"),
        (["--certificate-identity-regexp", "mitr@.*", "--certificate-oidc-issuer-regexp", "https://github\\.com/.*"],
         0, "1 of 1 required signatures verified"),
        (["--certificate-identity", "*@redhat.com", "--certificate-oidc-issuer", "https://github.com/login/oauth"],
         0, "1 of 1 required signatures verified"),
        (["--certificate-identity", "other@redhat.com", "--certificate-oidc-issuer", "https://github.com/login/oauth"],
         1, "certificate identity mismatch (identity 'mitr@redhat.com'"),
        (["--certificate-identity", "mitr@redhat.com", "--certificate-oidc-issuer", "https://accounts.google.com"],
         1, "certificate issuer mismatch (issuer 'https://github.com/login/oauth', wanted 'https://accounts.google.com')"),
        (["--certificate-identity", "mitr@redhat.com", "--certificate-oidc-issuer", "https://github.com/login/oauth",
          "--attestation-type", "https://slsa.dev/provenance/v1"], 1, "0 of 1 required attestations verified"),
        (["--certificate-identity", "mitr@redhat.com"], 2, "needs --certificate-identity"),
        ([], 2, "give --key, or --certificate-identity"),
    ],
)  # fmt: skip
async def test_verify_keyless_real_signature(
    registry: Registry, repo: str, tmp_path: Path, flags: list[str], exit_code: int, stderr: str
) -> None:
    digest = registry.plant_manifest(repo, "1", (KEYLESS_VECTOR / "image-manifest.json").read_bytes())
    artifact = real_signature()
    await registry.apush(write_oci_layout(tmp_path / "sig", artifact), artifact.tag, f"{repo}:{artifact.tag}")
    args = [sys.executable, "-m", "proxy", "verify", f"docker.io/{repo}@{digest}", "--mirror", registry.url, *flags]
    result = await arun(args, timeout=60, check=False)
    assert result.returncode == exit_code, result.stderr
    assert stderr in result.stderr
    if exit_code == 0:
        (payload,) = json.loads(result.stdout)
        assert payload["critical"]["image"]["docker-manifest-digest"] == digest


async def test_verify_attestation_with_trusted_root(
    registry: Registry, image_factory: ImageFactory, repo: str, tmp_path: Path
) -> None:
    sigstore = FakeSigstore()
    root = sigstore.write_trusted_root(tmp_path / "trusted_root.json")
    image = image_factory.image("1", layers=[1_000])
    await registry.apush(image.layout, "1", f"{repo}:1")
    slsa = "https://slsa.dev/provenance/v1"
    doc = sigstore.dsse_bundle(statement(image.manifest_digest, f"docker.io/{repo}", slsa), sigstore.issue())
    artifact = bundle_artifact(
        image.manifest_digest, image.media_type, len(image.manifest_bytes), [json.dumps(doc).encode()]
    )
    await registry.apush(write_oci_layout(tmp_path / "att", artifact), artifact.tag, f"{repo}:{artifact.tag}")
    base = [
        *[sys.executable, "-m", "proxy", "verify", f"docker.io/{repo}:1", "--mirror", registry.url],
        *["--certificate-identity", WORKFLOW, "--certificate-oidc-issuer", GITHUB, "--trusted-root", str(root)],
    ]
    attested = await arun([*base, "--attestation-type", slsa], timeout=60, check=False)
    assert attested.returncode == 0, attested.stderr
    assert json.loads(attested.stdout)[0]["predicateType"] == slsa
    unsigned = await arun(base, timeout=60, check=False)  # an attestation is not a signature
    assert unsigned.returncode == 1 and "statement has another predicate type" in unsigned.stderr, unsigned.stderr
    public_good = await arun([*base[:-2], "--attestation-type", slsa], timeout=60, check=False)
    assert public_good.returncode == 1, "the shipped public-good root does not trust the fake Fulcio"
