"""``pullgate config check|show``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy.cli import main

DATA = Path(__file__).parent / "data" / "config"


@pytest.mark.parametrize(
    ("text", "code", "output"),
    [
        ((DATA / "full.yaml").read_text(), 0, "ok: "),
        ("cache: {tag_ttl: soon}", 2, "cache.tag_ttl: not a duration"),
        ("upstreams: [{name: x, url: 'https://u:s3cret@x'}]\ndefault_upstream: x", 2, "upstreams[0].url"),
    ],
)
def test_check(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, code: int, output: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    assert main(["config", "check", str(path)]) == code
    captured = capsys.readouterr()
    assert output in captured.out + captured.err
    assert "s3cret" not in captured.out + captured.err, "a password in a URL is never echoed"


def test_show_is_the_effective_config_without_secrets(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GHCR_TOKEN", "ghp_thisIsTheSecretValue0123456789")
    monkeypatch.setenv("PULLGATE_CACHE__TAG_TTL", "10m")
    assert main(["config", "show", "--json", "--config", str(DATA / "full.yaml")]) == 0
    text = capsys.readouterr().out
    dump = json.loads(text)
    assert dump["listen"] == "127.0.0.1:5000"
    assert dump["cache"]["tag_ttl"] == 600.0, "environment overrides are applied"
    assert dump["upstreams"][1]["password_env"] == "GHCR_TOKEN"
    assert "thisIsTheSecretValue" not in text
