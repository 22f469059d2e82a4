"""``pullgate verify`` as a user runs it: a real process against the real daemon
(``python -m proxy serve``) in front of the real registry."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.signer import generate_key, sign_bundle, sign_legacy, write_oci_layout
from tests.support.daemon import Daemon
from tests.support.images import ImageFactory
from tests.support.procs import run
from tests.support.registry import Registry


@pytest.mark.parametrize("fmt", ["legacy", "bundle"])
def test_verify_through_a_cold_mirror_is_right_the_first_time(
    registry: Registry, image_factory: ImageFactory, repo: str, tmp_path: Path, fmt: str
) -> None:
    key = generate_key()
    (tmp_path / "cosign.pub").write_bytes(key.public_pem)
    image = image_factory.image("1", layers=[1_000])
    registry.push(image.layout, "1", f"{repo}:1")
    sign = sign_legacy if fmt == "legacy" else sign_bundle
    artifact = sign(image.manifest_digest, f"docker.io/{repo}", [key])
    registry.push(write_oci_layout(tmp_path / "sig", artifact), artifact.tag, f"{repo}:{artifact.tag}")
    with Daemon(tmp_path / "daemon", registry.url) as daemon:
        args = [sys.executable, "-m", "proxy", "verify", f"docker.io/{repo}:1"]
        args += ["--key", str(tmp_path / "cosign.pub"), "--mirror", f"http://{daemon.host}"]
        for attempt in ("cold", "warm"):
            result = run(args, timeout=60, check=False, env={})
            assert result.returncode == 0, f"{attempt}: {result.stderr}\n{daemon.events_text()}"
            assert "1 of 1 required signatures verified" in result.stderr
            assert image.manifest_digest.split(":")[1] in json.dumps(json.loads(result.stdout))
        # verify reads every body to its end: the mirror never writes to a closed connection.
        assert "Traceback" not in daemon.events_text()


@pytest.fixture
def signed(registry: Registry, image_factory: ImageFactory, repo: str, tmp_path: Path) -> tuple[str, Path]:
    """``docker.io/REPO:1`` signed (legacy format) by the key in the returned file."""
    key = generate_key()
    (tmp_path / "cosign.pub").write_bytes(key.public_pem)
    image = image_factory.image("1", layers=[1_000])
    registry.push(image.layout, "1", f"{repo}:1")
    artifact = sign_legacy(image.manifest_digest, f"docker.io/{repo}", [key])
    registry.push(write_oci_layout(tmp_path / "sig", artifact), artifact.tag, f"{repo}:{artifact.tag}")
    return f"docker.io/{repo}:1", tmp_path / "cosign.pub"


def test_verify_with_a_config_prints_json_alone_on_stdout(
    registry: Registry, signed: tuple[str, Path], tmp_path: Path
) -> None:
    image, key = signed
    config = tmp_path / "pullgate.yaml"
    config.write_text(
        f"cache: {{dir: {tmp_path / 'cache'}}}\n"
        f"upstreams: [{{name: docker.io, url: '{registry.url}'}}]\n"
        "log: {level: debug}\n"
    )
    result = run(_verify(image, key, "--config", str(config)), timeout=60, check=False, env={})
    assert result.returncode == 0, result.stderr
    assert isinstance(json.loads(result.stdout), list), "stdout is the JSON array and nothing else"
    assert "1 of 1 required signatures verified" in result.stderr


def test_verify_without_a_cache_leaves_no_directory_behind(
    registry: Registry, signed: tuple[str, Path], tmp_path: Path
) -> None:
    image, key = signed
    workdir, scratch = tmp_path / "cwd", tmp_path / "tmp"
    workdir.mkdir()
    scratch.mkdir()
    env = {"PULLGATE_UPSTREAMS__0__URL": registry.url, "TMPDIR": str(scratch), "PULLGATE_CONFIG": ""}
    result = run(_verify(image, key), timeout=60, check=False, env=env, cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)
    assert list(workdir.iterdir()) == [], "no ./pullgate-cache"
    assert list(scratch.iterdir()) == [], "the throwaway cache is removed"


@pytest.mark.parametrize(
    ("image", "key_file", "mirror", "code", "message"),
    [
        ("nosuch/thing:9", "cosign.pub", "daemon", 2, "answered 404 MANIFEST_UNKNOWN"),
        ("signed", "README.md", "daemon", 2, "--key README.md: not a PEM public key"),
        ("signed", "missing.pub", "daemon", 2, "missing.pub"),
        ("signed", "cosign.pub", "http://127.0.0.1:9", 2, "http://127.0.0.1:9: cannot connect"),
    ],
)
def test_verify_errors_say_what_went_wrong(
    registry: Registry,
    signed: tuple[str, Path],
    tmp_path: Path,
    image: str,
    key_file: str,
    mirror: str,
    code: int,
    message: str,
) -> None:
    (tmp_path / "README.md").write_text("# not a key\n")
    signed_image, _ = signed
    with Daemon(tmp_path / "daemon", registry.url) as daemon:
        url = f"http://{daemon.host}" if mirror == "daemon" else mirror
        args = _verify(signed_image if image == "signed" else image, Path(key_file), "--mirror", url)
        result = run(args, timeout=60, check=False, env={}, cwd=tmp_path)
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def _verify(image: str, key: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "proxy", "verify", image, "--key", str(key), *extra]
