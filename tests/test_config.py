from pathlib import Path

import pytest

from proxy.config.settings import load_config
from proxy.errors import ConfigError

DATA = Path(__file__).parent / "data" / "config"


def test_embedded_defaults() -> None:
    config = load_config(None, {})
    assert config.listen == ("127.0.0.1", 5000)
    assert config.cache.dir == Path("pullgate-cache")
    assert [(u.name, u.url) for u in config.upstreams] == [("docker.io", "https://registry-1.docker.io")]
    assert config.default_upstream == "docker.io"


def test_full_file_as_documented() -> None:
    config = load_config(DATA / "full.yaml", {"GHCR_TOKEN": "s3cret"})
    assert config.cache.max_size == 50 * 1024**3
    assert config.cache.tag_ttl == 300
    assert config.cache.max_stale == 86400
    ghcr = config.upstream("ghcr.io")
    assert ghcr is not None and ghcr.username == "robot" and ghcr.password_env == "GHCR_TOKEN"
    # The secret is never part of the config object or its dump.
    assert "s3cret" not in repr(config) and "s3cret" not in str(config.redacted())


def test_password_read_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config(DATA / "full.yaml", {})
    monkeypatch.setenv("GHCR_TOKEN", "tok")
    ghcr = config.upstream("ghcr.io")
    assert ghcr is not None and ghcr.password() == "tok"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"PULLGATE_CACHE__TAG_TTL": "10m"}, ("cache.tag_ttl", 600.0)),
        ({"PULLGATE_LISTEN": "0.0.0.0:6000"}, ("listen", ("0.0.0.0", 6000))),
        ({"PULLGATE_MIRROR__ENFORCE_POLICIES": "true"}, ("mirror.enforce_policies", True)),
        ({"PULLGATE_UPSTREAMS__1__URL": "http://127.0.0.1:5001"}, ("upstreams.1.url", "http://127.0.0.1:5001")),
    ],
)
def test_environment_overrides(env: dict[str, str], expected: tuple[str, object]) -> None:
    config = load_config(DATA / "full.yaml", env)
    value: object = config
    for part in expected[0].split("."):
        value = value[int(part)] if part.isdigit() else getattr(value, part)  # type: ignore[index]
    assert value == expected[1]


@pytest.mark.parametrize(
    ("yaml_text", "error"),
    [
        ("lisen: '127.0.0.1:5000'", "lisen: unknown key"),
        ("cache: {tag_ttl: soon}", "cache.tag_ttl: not a duration"),
        ("cache: {max_size: lots}", "cache.max_size: not a size"),
        ("cache: {dirr: /x}", "cache.dirr: unknown key"),
        ("listen: 5000", "listen: expected HOST:PORT"),
        ("upstreams: [{name: a, url: 'ftp://x'}]\ndefault_upstream: a", "upstreams[0].url: expected an http"),
        ("upstreams: [{name: a, url: 'https://u:p@x'}]\ndefault_upstream: a", "upstreams[0].url: the URL must not"),
        ("upstreams: [{name: a}]", "upstreams[0]"),
        ("upstreams: [{name: a, url: 'https://x', password: p}]", "upstreams[0].password: unknown key"),
        ("default_upstream: quay.io", "default_upstream: 'quay.io' is not an upstream"),
        ("upstreams: []", "upstreams: at least one"),
        ("log: {level: loud}", "log.level: must be one of"),
        ("mirror: {enforce_policies: 'yes please'}", "mirror.enforce_policies: expected true or false"),
        ("- a\n- b", "top level must be a mapping"),
        ("cache: [1]", "cache: expected a mapping"),
        ("admission: {tls_cert: /a.pem}", "admission.tls_cert: tls_cert and tls_key go together"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, yaml_text: str, error: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=error.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        load_config(path, {})


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml", {})


def test_environment_variables_that_are_not_config_keys_are_left_alone() -> None:
    # Secrets the config names by variable (token_secret_env) may share the prefix.
    config = load_config(DATA / "full.yaml", {"PULLGATE_TOKEN_KEY": "s3cret", "PULLGATE_CONFIG": "/x.yaml"})
    assert config.cache.tag_ttl == 300
    with pytest.raises(ConfigError, match=r"cache\.tag_tl: unknown key"):
        load_config(DATA / "full.yaml", {"PULLGATE_CACHE__TAG_TL": "1m"})
