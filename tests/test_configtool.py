"""``pullgate config check|show``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from proxy.cli import main
from tests.support.procs import free_port, run

DATA = Path(__file__).parent / "data" / "config"


@pytest.mark.parametrize(
    ("text", "code", "output"),
    [
        ((DATA / "full.yaml").read_text(), 0, "ok: "),
        ("cache: {tag_ttl: soon}", 2, "cache.tag_ttl: not a duration"),
        ("upstreams: [{name: x, url: 'https://u:s3cret@x'}]\ndefault_upstream: x", 2, "upstreams[0].url"),
    ],
)
def test_check(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    text: str,
    code: int,
    output: str,
) -> None:
    monkeypatch.setenv("GHCR_TOKEN", "ghp_configCheckSecretValue")  # full.yaml names it
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


# --- config check runs serve's start-up checks (one function: proxy.cli.preflight) -----------
GOOD_POLICY = """\
apiVersion: pullgate.dev/v1
kind: ImagePolicy
metadata: {name: no-latest}
spec:
  match: {images: ["**"]}
  rules: {denyTags: [latest]}
"""


def _startup_case(tmp_path: Path, case: str) -> str:
    """A config (as YAML text) with one thing serve refuses at start, by name."""
    (tmp_path / "policies").mkdir(exist_ok=True)
    (tmp_path / "policies" / "p.yaml").write_text(GOOD_POLICY)
    (tmp_path / "htpasswd").write_text("")
    base = f"listen: 127.0.0.1:{free_port()}\ncache: {{dir: {tmp_path / 'cache'}}}\n"
    access = "access: {{enabled: true, htpasswd: {}, rules: [{{repositories: ['docker.io/**'], users: [a]}}]{}}}\n"
    cases = {
        "ok": f"policies: {tmp_path / 'policies'}\n",
        "htpasswd missing": access.format(tmp_path / "nosuch-htpasswd", ""),
        "htpasswd plain": access.format(tmp_path / "plain-htpasswd", ""),
        "tls_cert missing": f"tls_cert: {tmp_path / 'nosuch.crt'}\ntls_key: {tmp_path / 'nosuch.key'}\n",
        "admission tls missing": (
            f"admission: {{enabled: true, listen: '127.0.0.1:{free_port()}', tls_cert: {tmp_path / 'x.crt'},"
            f" tls_key: {tmp_path / 'x.key'}}}\n"
        ),
        "policies missing": f"policies: {tmp_path / 'nosuch-policies'}\n",
        "policy invalid": f"policies: {tmp_path / 'bad.yaml'}\n",
        "password_env unset": (
            "upstreams: [{name: docker.io, url: 'https://registry-1.docker.io', username: robot,"
            " password_env: PULLGATE_TEST_UNSET_PASSWORD}]\n"
        ),
        "token_secret_env unset": access.format(tmp_path / "htpasswd", ", token_secret_env: PULLGATE_TEST_UNSET_KEY"),
    }
    (tmp_path / "plain-htpasswd").write_text("a:plaintext\n")
    (tmp_path / "bad.yaml").write_text("apiVersion: pullgate.dev/v1\nkind: ImagePolicy\nmetadata: {name: x}\n")
    return base + cases[case]


@pytest.mark.parametrize(
    ("case", "error", "without_env"),
    [
        ("ok", None, None),
        ("htpasswd missing", "access.htpasswd: cannot read", "access.htpasswd: cannot read"),
        ("htpasswd plain", "access.htpasswd:", "access.htpasswd:"),
        ("tls_cert missing", "tls_cert: cannot load", "tls_cert: cannot load"),
        ("admission tls missing", "admission.tls_cert: cannot load", "admission.tls_cert: cannot load"),
        ("policies missing", "policies: ", "no such policy file or directory"),
        ("policy invalid", "policies: ", "spec: required"),
        ("password_env unset", "upstreams[0].password_env: $PULLGATE_TEST_UNSET_PASSWORD is not set", None),
        ("token_secret_env unset", "access.token_secret_env: $PULLGATE_TEST_UNSET_KEY", None),
    ],
)
def test_config_check_runs_the_checks_serve_runs(
    tmp_path: Path, case: str, error: str | None, without_env: str | None
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(_startup_case(tmp_path, case))
    check = run([sys.executable, "-m", "proxy", "config", "check", str(path)], timeout=30, check=False, env={})
    assert (check.returncode, check.stdout) == ((0, f"ok: {path}\n") if error is None else (2, "")), check.stderr
    if error is not None:
        assert error in check.stderr
    # --no-env: for a config meant for another machine, the environment is not consulted.
    no_env = run([sys.executable, "-m", "proxy", "config", "check", "--no-env", str(path)], timeout=30, check=False)
    assert no_env.returncode == (0 if without_env is None else 2), no_env.stderr
    if without_env is not None:
        assert without_env in no_env.stderr
    if error is None:
        return
    # serve refuses the same config with the same message, before it listens.
    serve = run([sys.executable, "-m", "proxy", "serve", "--config", str(path)], timeout=30, check=False, env={})
    assert serve.returncode == 2
    assert error in serve.stderr
    assert "Traceback" not in serve.stderr + check.stderr


def test_config_check_reports_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        _startup_case(tmp_path, "tls_cert missing") + f"policies: {tmp_path / 'nosuch'}\n"
        "upstreams: [{name: a, url: 'https://a', username: r, password_env: PULLGATE_TEST_UNSET_PASSWORD}]\n"
    )
    result = run([sys.executable, "-m", "proxy", "config", "check", str(path)], timeout=30, check=False, env={})
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert [line.split(":")[1].strip() for line in lines] == ["tls_cert", "policies", "upstreams[0].password_env"]


@pytest.mark.parametrize(
    ("command", "text"),
    [
        (["config", "--help"], "PULLGATE_* environment overrides"),
        (["config", "check", "--help"], "the YAML config file to check"),
        (["verify", "--help"], "'cosign verify' does"),
    ],
)
def test_help_is_plain_text(command: list[str], text: str) -> None:
    result = run([sys.executable, "-m", "proxy", *command], timeout=30)
    assert text in result.stdout
    assert "``" not in result.stdout, "no reStructuredText markup in --help"


@pytest.mark.parametrize(
    ("variable", "message"),
    [
        ("PULLGATE_LISTN", "PULLGATE_LISTN: not a config key (did you mean PULLGATE_LISTEN?)"),
        ("PULLGATE_CACHEE__DIR", "(did you mean PULLGATE_CACHE__DIR?)"),
        ("PULLGATE_CACHE_TAG_TTL", "(did you mean PULLGATE_CACHE__TAG_TTL?)"),
        ("PULLGATE_FOO__BAR", "PULLGATE_FOO__BAR: not a config key"),
    ],
)
def test_misspelled_environment_overrides_stop_serve(tmp_path: Path, variable: str, message: str) -> None:
    env = {
        variable: "10m",
        "PULLGATE_CACHE__DIR": str(tmp_path / "cache"),
        "PULLGATE_LISTEN": f"127.0.0.1:{free_port()}",
    }
    for command in (["serve"], ["config", "show"]):
        result = run([sys.executable, "-m", "proxy", *command], timeout=30, check=False, env=env)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr


def test_readme_environment_override_example(tmp_path: Path) -> None:
    """README: list items by index, against the embedded defaults."""
    env = {"PULLGATE_UPSTREAMS__0__URL": "http://127.0.0.1:5001"}
    result = run([sys.executable, "-m", "proxy", "config", "show", "--json"], timeout=30, env=env, cwd=tmp_path)
    assert json.loads(result.stdout)["upstreams"][0] == {
        "name": "docker.io",
        "url": "http://127.0.0.1:5001",
        "username": None,
        "password_env": None,
        "auth_hosts": [],
    }
    env = {"PULLGATE_UPSTREAMS__1__URL": "https://ghcr.io"}
    result = run([sys.executable, "-m", "proxy", "config", "show"], timeout=30, check=False, env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert "upstreams[1].name: required (environment PULLGATE_UPSTREAMS__1__URL adds upstreams[1])" in result.stderr
    assert "__init__" not in result.stderr
