from pathlib import Path

import pytest

from proxy.config.settings import changed_keys, load_config
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
        ("upstreams: [{name: a}]", "upstreams[0].url: required"),
        ("upstreams: [{url: 'https://a'}]", "upstreams[0].name: required"),
        ("upstreams: [{name: a, url: 'https://x', password: p}]", "upstreams[0].password: unknown key"),
        ("default_upstream: quay.io", "default_upstream: 'quay.io' is not an upstream"),
        ("access: {rules: [{users: [a]}]}", "access.rules[0].repositories: required"),
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


@pytest.mark.parametrize(
    ("variable", "error"),
    [
        ("PULLGATE_LISTN", "PULLGATE_LISTN: not a config key (did you mean PULLGATE_LISTEN?)"),
        ("PULLGATE_CACHEE__DIR", "PULLGATE_CACHEE__DIR: not a config key (did you mean PULLGATE_CACHE__DIR?)"),
        ("PULLGATE_CACHE_TAG_TTL", "(did you mean PULLGATE_CACHE__TAG_TTL?)"),
        ("PULLGATE_CACHE__TAG_TL", "(did you mean PULLGATE_CACHE__TAG_TTL?)"),
        ("PULLGATE_UPSTREAMS__1__UR", "(did you mean PULLGATE_UPSTREAMS__1__URL?)"),
        ("PULLGATE_FOO__BAR", "PULLGATE_FOO__BAR: not a config key; overrides are"),
        ("PULLGATE_TOKEN_KEY", "PULLGATE_TOKEN_KEY: not a config key"),  # no config names it
        ("PULLGATE_CONFIG", None),
        ("PULLGATE_SERVICE_HOST", None),  # Kubernetes service links for a Service "pullgate"
        ("PULLGATE_PORT", None),
        ("PULLGATE_PORT_5000_TCP_ADDR", None),
        ("PULLGATE_WEBHOOK_SERVICE_PORT_HTTPS", None),
        ("GHCR_TOKEN", None),
    ],
)
def test_pullgate_variables_that_are_no_config_key_are_an_error(variable: str, error: str | None) -> None:
    env = {variable: "10m"}
    if error is None:
        assert load_config(DATA / "full.yaml", env).cache.tag_ttl == 300
        return
    with pytest.raises(ConfigError) as raised:
        load_config(DATA / "full.yaml", env)
    assert error in raised.value.message


def test_variables_the_config_names_as_secrets_are_allowed(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "upstreams: [{name: a, url: 'https://a', username: u, password_env: PULLGATE_A_PASSWORD}]\n"
        "access: {enabled: true, token_secret_env: PULLGATE_TOKEN_KEY,"
        " rules: [{repositories: ['a/**'], anonymous: true}]}\n"
    )
    config = load_config(path, {"PULLGATE_TOKEN_KEY": "k" * 40, "PULLGATE_A_PASSWORD": "p"})
    assert config.access.token_secret_env == "PULLGATE_TOKEN_KEY"
    # A secret variable named through an override counts too.
    env = {"PULLGATE_ACCESS__TOKEN_SECRET_ENV": "PULLGATE_OTHER_KEY", "PULLGATE_OTHER_KEY": "k" * 40}
    assert load_config(path, env).access.token_secret_env == "PULLGATE_OTHER_KEY"


@pytest.mark.parametrize(
    ("file", "env", "expected", "error"),
    [
        # List items count from 0 in the file's list, or the embedded defaults' list.
        (None, {"PULLGATE_UPSTREAMS__0__URL": "http://127.0.0.1:5001"}, [("docker.io", "http://127.0.0.1:5001")], None),
        (
            None,
            {"PULLGATE_UPSTREAMS__1__NAME": "ghcr.io", "PULLGATE_UPSTREAMS__1__URL": "https://ghcr.io"},
            [("docker.io", "https://registry-1.docker.io"), ("ghcr.io", "https://ghcr.io")],
            None,
        ),
        (
            None,
            {"PULLGATE_UPSTREAMS__1__URL": "https://ghcr.io"},
            None,
            "upstreams[1].name: required (environment PULLGATE_UPSTREAMS__1__URL adds upstreams[1])",
        ),
        (
            None,
            {"PULLGATE_UPSTREAMS__3__URL": "https://x"},
            None,
            "upstreams has 1 item(s); the next new item is index 1",
        ),
        (
            "full.yaml",
            {"PULLGATE_UPSTREAMS__1__URL": "http://127.0.0.1:5001"},
            [("docker.io", "https://registry-1.docker.io"), ("ghcr.io", "http://127.0.0.1:5001")],
            None,
        ),
    ],
)
def test_list_items_by_index(
    file: str | None, env: dict[str, str], expected: list[tuple[str, str]] | None, error: str | None
) -> None:
    path = DATA / file if file else None
    if error is not None:
        with pytest.raises(ConfigError) as raised:
            load_config(path, env)
        assert error in raised.value.message
        return
    assert [(u.name, u.url) for u in load_config(path, env).upstreams] == expected


@pytest.mark.parametrize(
    ("yaml_text", "default", "error"),
    [
        ("upstreams: [{name: ghcr.io, url: 'https://ghcr.io'}]", "ghcr.io", None),
        ("upstreams: [{name: a, url: 'https://a'}, {name: docker.io, url: 'https://d'}]", "docker.io", None),
        ("upstreams: [{name: a, url: 'https://a'}, {name: b, url: 'https://b'}]\ndefault_upstream: b", "b", None),
        ("upstreams: [{name: a, url: 'https://a'}, {name: b, url: 'https://b'}]\ndefault_upstream: null", None, None),
        (
            "upstreams: [{name: a, url: 'https://a'}, {name: b, url: 'https://b'}]",
            None,
            "default_upstream: required with several upstreams (a, b)",
        ),
        (
            "upstreams: [{name: a, url: 'https://a'}]\ndefault_upstream: docker.io",
            None,
            "'docker.io' is not an upstream",
        ),
    ],
)
def test_default_upstream(tmp_path: Path, yaml_text: str, default: str | None, error: str | None) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml_text)
    if error is not None:
        with pytest.raises(ConfigError) as raised:
            load_config(path, {})
        assert error in raised.value.message
        return
    assert load_config(path, {}).default_upstream == default


@pytest.mark.parametrize(
    ("env", "keys"),
    [
        ({"PULLGATE_CACHE__TAG_TTL": "1m"}, ["cache.tag_ttl"]),
        ({"PULLGATE_LOG__LEVEL": "debug", "PULLGATE_LISTEN": "127.0.0.1:6000"}, ["listen", "log.level"]),
        ({"PULLGATE_UPSTREAMS__1__URL": "https://other"}, ["upstreams[1].url"]),
        ({"PULLGATE_UPSTREAMS__2__NAME": "q", "PULLGATE_UPSTREAMS__2__URL": "https://q"}, ["upstreams"]),
        ({}, []),
    ],
)
def test_changed_keys_name_the_leaf(env: dict[str, str], keys: list[str]) -> None:
    assert changed_keys(load_config(DATA / "full.yaml", {}), load_config(DATA / "full.yaml", env)) == keys
