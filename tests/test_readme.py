"""README commands: every fenced example in README.md is run here as a user would run it,
with local registries (Debian's docker-registry) standing in for Docker Hub and ghcr.io.

Each test takes its block's text from README.md itself (found by the block's first line), so
an edit to the README is an edit to what runs. A block no test claims fails
``test_every_readme_block_is_run``: a new example needs a test, or a place in ILLUSTRATIVE.

What differs from a user's machine, and why (kept small and explicit):
- ILLUSTRATIVE blocks are not run, for the reason given.
- SUBSTITUTIONS are applied to the text of a block before it runs, for the reason given.
- Environment: ``PULLGATE_LISTEN`` (a free loopback port instead of 5000 or 0.0.0.0),
  ``PULLGATE_CACHE__DIR`` where a config names /var/cache, and ``PULLGATE_UPSTREAMS__N__URL``
  (the README's own override mechanism) pointing the upstreams at the local registry.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import pytest
import yaml

from proxy.config.settings import load_config
from tests.signer import SimpleSigningLayer, legacy_artifact
from tests.support.certs import make_ca, write_cert
from tests.support.containerd import Containerd
from tests.support.daemon import OriginThread
from tests.support.images import ImageFactory, ImageInfo
from tests.support.origin import Origin
from tests.support.procs import Completed, free_port, http_status, run, start_daemon, stop_daemon, wait_until
from tests.support.redis_server import RedisServer
from tests.support.registry import Registry
from tests.support.seaweedfs import SeaweedFS

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# Signed by containers/image's cosign test key, which policies/keys/release.pub is.
VECTOR = Path(__file__).parent / "data" / "cosign" / "containers-image-cosign-valid"

ILLUSTRATIVE = {
    "python3 -m ruff check proxy tests bench fuzz": "the test command: it is what runs this test (CI runs it)",
    "pullgate verify registry.k8s.io/pause:3.10": "needs registry.k8s.io and ghcr.io (no internet here); the same "
    "flags verify the real legacy keyless signature through a real mirror in tests/test_verifytool.py",
    'container "app": policy github-release-keyless': "output of a denial, not a command; the message is produced "
    "by tests/test_keyless_e2e.py against a real registry and the real legacy keyless signature",
    "                 containerd on every node": "a diagram of the scale-out design; the blocks after it "
    "(config, Helm values) run below, the failure table's behaviour is the scale-out tests' (issue 17)",
}
SUBSTITUTIONS = {
    "kubectl get deploy -A -o yaml": (
        "cat cluster-deployments.yaml",
        "no cluster here: a file with what kubectl prints (a List of Deployments)",
    ),
    "http://127.0.0.1:5000": ("{mirror}", "port 5000 may be taken: the daemon under test listens on a free port"),
    "http://pullgate.example:5000": ("{mirror}", "hosts.toml: the address of the daemon under test"),
    "https://registry-1.docker.io": ("{registry}", "hosts.toml's fallback server: never the internet in tests"),
    '"0.0.0.0:8443"': ('"127.0.0.1:{webhook_port}"', "tests listen on loopback only, on a free port"),
    "/etc/pullgate/": ("{etc}/", "the config's files, written to a temp dir instead of /etc"),
}


@dataclass(frozen=True)
class Block:
    lang: str
    text: str

    @property
    def first(self) -> str:
        return self.text.splitlines()[0]

    def lines(self) -> list[str]:
        return [line for line in self.text.splitlines() if line.strip()]


def blocks() -> list[Block]:
    text = README.read_text()
    return [
        Block(m["lang"], m["body"]) for m in re.finditer(r"^```(?P<lang>\w*)\n(?P<body>.*?)^```", text, re.S | re.M)
    ]


def block(first: str) -> Block:
    (found,) = [b for b in blocks() if b.first.startswith(first)]
    return found


def substitute(text: str, **values: str) -> str:
    for old, (new, _) in SUBSTITUTIONS.items():
        if old in text:
            text = text.replace(old, new.format(**values))
    return text


# Each run block by its first line, and the test that runs it.
RUN = {
    "python3 -m pip install . && pullgate serve": "test_quick_start",
    'listen: "0.0.0.0:5000"': "test_cluster_admin_config_and_containerd",
    'server = "https://registry-1.docker.io"': "test_cluster_admin_config_and_containerd",
    "apiVersion: pullgate.dev/v1": "test_policy_document_example",
    "pullgate policy lint policies/": "test_security_team_commands",
    "  rules:": "test_keyless_rules_example",
    "admission:": "test_admission_config",
    "trust:": "test_trust_tuf_config",
    "tls_cert: /etc/pullgate/tls/tls.crt": "test_access_config",
    "pullgate warm nginx:1.25 ghcr.io/acme/app:2.1": "test_cache_operations_and_air_gap",
    "storage:": "test_scaling_out_config",
    "replicaCount: 3": "test_scaling_out_helm_values",
}


def test_every_readme_block_is_run() -> None:
    found = blocks()
    assert found, "README.md has fenced examples"
    for b in found:
        claimed = [k for k in [*RUN, *ILLUSTRATIVE] if b.first.startswith(k)]
        assert claimed, f"README block {b.first!r} is run by no test (add one to tests/test_readme.py)"
    for first in RUN:
        assert any(b.first.startswith(first) for b in found), f"RUN names a block the README no longer has: {first!r}"


# --- running commands ---------------------------------------------------------------------------
def environment(**extra: str) -> dict[str, str]:
    """This process's environment (PYTHONPATH: the code under test) without PULLGATE_*
    variables of its own, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PULLGATE_")}
    return {**env, **extra}


def sh(line: str, cwd: Path, env: Mapping[str, str], *, expect: int = 0, timeout: float = 120) -> Completed:
    """One README line through bash (globs, pipes and comments as a user's shell has them)."""
    done = run(["bash", "-c", line], timeout=timeout, check=False, env=env, cwd=cwd)
    assert done.returncode == expect, f"$ {line}\n-> {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr
    return done


@contextlib.contextmanager
def serving(command: str, cwd: Path, env: Mapping[str, str], ready: str, timeout: float = 30) -> Iterator[Path]:
    """``command`` (through bash) as a daemon until ``ready`` answers 200; yields its log."""
    log = cwd / f"daemon-{free_port()}.log"
    proc = start_daemon(["bash", "-c", command], stdout=log, stderr=log, cwd=cwd, env=env)
    try:
        wait_until(lambda: http_status(ready) == 200, timeout=timeout, what=command, proc=proc, log=log)
        yield log
    finally:
        stop_daemon(proc, grace=10)


def https_status(url: str, ca: Path, headers: Mapping[str, str] | None = None) -> int:
    context = ssl.create_default_context(cafile=str(ca))
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with opener.open(request, timeout=10) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return 0  # nothing listening yet


# --- images the README names, in the local registry ----------------------------------------------
@pytest.fixture(scope="module")
def images(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> dict[str, ImageInfo]:
    """``nginx:1.25`` and ``ghcr.io/acme/app:2.1`` (repository ``acme/app``) with fixed
    content, so pushing them again is a no-op."""
    factory = ImageFactory(tmp_path_factory.mktemp("readme-images"))
    found = {}
    for name, repo_ref in (("nginx:1.25", "library/nginx:1.25"), ("ghcr.io/acme/app:2.1", "acme/app:2.1")):
        image = factory.image("x", layers=[3_000], seed=f"readme {name}")
        registry.push(image.layout, "x", repo_ref)
        found[name] = image
    return found


def upstream_env(url: str) -> dict[str, str]:
    """Both README upstreams (docker.io, then ghcr.io) at ``url``, the README's way."""
    return {
        "PULLGATE_UPSTREAMS__0__URL": url,
        "PULLGATE_UPSTREAMS__1__NAME": "ghcr.io",
        "PULLGATE_UPSTREAMS__1__URL": url,
    }


# --- quick start ---------------------------------------------------------------------------------
def test_quick_start(tmp_path: Path) -> None:
    """``pip install .`` into a fresh virtual environment (offline: the dependencies come from
    this environment's site-packages, no build isolation), then ``pullgate serve`` with the
    embedded defaults, from a copy of the source tree (pip builds in place)."""
    (line,) = block("python3 -m pip install . && pullgate serve").lines()
    source = tmp_path / "pullgate"
    shutil.copytree(ROOT / "proxy", source / "proxy", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], timeout=120)
    port = free_port()
    env = environment(
        PATH=f"{venv / 'bin'}:{os.environ['PATH']}",
        PIP_NO_INDEX="1",
        PIP_NO_BUILD_ISOLATION="0",  # pip's spelling of --no-build-isolation
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        PULLGATE_LISTEN=f"127.0.0.1:{port}",
    )
    env.pop("PYTHONPATH", None)  # the installed copy runs, not this checkout
    with serving(line, source, env, f"http://127.0.0.1:{port}/readyz", timeout=180) as log:
        events = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
        listening = next(e for e in events if e.get("event") == "mirror_listening")
        assert listening["upstreams"] == ["docker.io"]
        assert (source / "pullgate-cache" / "catalog.db").exists(), "the cache is ./pullgate-cache"
    where = run(
        [str(venv / "bin" / "python"), "-E", "-c", "import proxy; print(proxy.__file__)"],
        timeout=30,
        env=env,
        cwd=tmp_path,
    )
    assert where.stdout.startswith(str(venv)), where.stdout


def test_help() -> None:
    """'pullgate --help and pullgate COMMAND --help document every command and option.'"""
    top = run(["pullgate", "--help"], timeout=30, env=environment()).stdout
    commands = re.findall(r"^    (\w+)\s", top.split("commands:")[1], re.M)
    assert {"serve", "config", "policy", "verify", "warm", "export", "import", "cache"} <= set(commands)
    for command in commands:
        assert "usage: pullgate" in run(["pullgate", command, "--help"], timeout=30, env=environment()).stdout


# --- cluster admins --------------------------------------------------------------------------------
def test_cluster_admin_config_and_containerd(
    registry: Registry, images: dict[str, ImageInfo], containerd: Containerd, tmp_path: Path
) -> None:
    """The README's config, overridden from the environment as the README says, served; then
    containerd pulls through it with the README's hosts.toml."""
    config = tmp_path / "pullgate.yaml"
    config.write_text(block('listen: "0.0.0.0:5000"').text)
    port = free_port()
    env = environment(
        GHCR_TOKEN="readme-ghcr-token-for-tests",
        PULLGATE_LISTEN=f"127.0.0.1:{port}",
        PULLGATE_CACHE__DIR=str(tmp_path / "cache"),
        PULLGATE_UPSTREAMS__0__URL=registry.url,
        PULLGATE_UPSTREAMS__1__URL=registry.url,
    )
    assert sh("pullgate config check pullgate.yaml", tmp_path, env).stdout == "ok: pullgate.yaml\n"
    # The inline example, against the embedded defaults.
    shown = sh("PULLGATE_UPSTREAMS__0__URL=http://127.0.0.1:5001 pullgate config show --json", tmp_path, environment())
    assert json.loads(shown.stdout)["upstreams"][0]["url"] == "http://127.0.0.1:5001"
    mirror = f"http://127.0.0.1:{port}"
    hosts = tmp_path / "certs.d" / "docker.io"
    hosts.mkdir(parents=True)
    (hosts / "hosts.toml").write_text(
        substitute(block('server = "https://registry-1.docker.io"').text, mirror=mirror, registry=registry.url)
    )
    with serving("pullgate serve --config pullgate.yaml", tmp_path, env, f"{mirror}/readyz"):
        args = ["images", "pull", "--hosts-dir", str(tmp_path / "certs.d"), "--snapshotter", "native"]
        containerd.ctr(*args, "docker.io/library/nginx:1.25", namespace=containerd.new_namespace())
    assert registry.count_requests("GET", r"/manifests/", user_agent="pullgate") >= 1, "pulled through pullgate"


# --- security teams --------------------------------------------------------------------------------
def test_keyless_rules_example(tmp_path: Path) -> None:
    """The keyless ``rules:`` fragment is valid policy syntax once placed in a document (its
    ``keys: [...]`` line stands for the key list shown earlier and is left out)."""
    rules = "\n".join(line for line in block("  rules:").text.splitlines() if "keys: [...]" not in line)
    document = (
        "apiVersion: pullgate.dev/v1\nkind: ImagePolicy\nmetadata: {name: readme-keyless}\n"
        'spec:\n  match: {images: ["ghcr.io/acme/**"]}\n' + rules + "\n"
    )
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "keyless.yaml").write_text(document)
    linted = sh("pullgate policy lint policies", tmp_path, environment()).stdout
    assert linted == "ok: policies: 1 policy in 1 file\n"


def test_policy_document_example(tmp_path: Path) -> None:
    """The annotated ImagePolicy: valid, and its rules do what its comments say."""
    (tmp_path / "policies" / "keys").mkdir(parents=True)
    shutil.copy(ROOT / "policies" / "keys" / "release.pub", tmp_path / "policies" / "keys" / "release.pub")
    (tmp_path / "policies" / "prod-pinned.yaml").write_text(block("apiVersion: pullgate.dev/v1").text)
    linted = sh("pullgate policy lint policies", tmp_path, environment()).stdout
    assert linted == "ok: policies: 1 policy in 1 file\n"
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": "payments-eu"},
        "spec": {
            "containers": [
                {"name": "latest", "image": "nginx"},
                {"name": "elsewhere", "image": "quay.io/acme/app:1"},
                {"name": "tagged", "image": "ghcr.io/acme/app:1.0"},
                {"name": "excluded", "image": "busybox:1.36"},
            ]
        },
    }
    (tmp_path / "pod.yaml").write_text(yaml.safe_dump(pod))
    out = sh("pullgate policy check --policies policies pod.yaml", tmp_path, environment(), expect=1).stdout
    assert re.search(r'DENY .*"nginx": policy prod-pinned denies tag latest', out), out
    assert re.search(r'DENY .*"quay.io/acme/app:1": policy prod-pinned does not allow registry quay.io', out), out
    assert re.search(r'SKIP .*"ghcr.io/acme/app:1.0": policy prod-pinned not evaluated offline: .*signatures', out), out
    assert re.search(r'ALLOW .*"busybox:1.36": no policy matches', out), out


@pytest.fixture
def signed_origin() -> Iterator[OriginThread]:
    """ghcr.io's ``acme/app:1.0`` as a registry serving the image manifest that
    containers/image's cosign test fixture signed, with that signature: the README's
    placeholder key (policies/keys/release.pub) is that fixture's key. (The real registry
    will not take a manifest without its layers, which the fixture does not include.)"""
    source = VECTOR
    assert (source / "cosign.pub").read_bytes() == (ROOT / "policies" / "keys" / "release.pub").read_bytes()
    manifest = (source / "image-manifest.json").read_bytes()
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    signature = base64.b64decode((source / "signature.b64").read_text().strip())
    artifact = legacy_artifact(digest, [SimpleSigningLayer((source / "payload.json").read_bytes(), signature)])
    origin = Origin()
    origin.put_manifest("acme/app", "1.0", "application/vnd.docker.distribution.manifest.v2+json", manifest)
    for manifest_digest, (body, media_type) in artifact.manifests.items():
        tag = next((t for t, d in artifact.tags.items() if d == manifest_digest), None)
        origin.put_manifest("acme/app", tag, media_type, body)
    for blob_digest, data in artifact.blobs.items():
        origin.blobs[("acme/app", blob_digest)] = data
    with OriginThread(origin) as running:
        yield running


def test_security_team_commands(
    registry: Registry, images: dict[str, ImageInfo], signed_origin: OriginThread, tmp_path: Path
) -> None:
    shutil.copytree(ROOT / "policies", tmp_path / "policies")
    (tmp_path / "deploy").mkdir()
    web = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "prod"},
        "spec": {"template": {"spec": {"containers": [{"name": "web", "image": "nginx:1.25"}]}}},
    }
    tool = copy_with(web, name="tool", namespace="default", image="quay.io/acme/tool:1")
    (tmp_path / "deploy" / "web.yaml").write_text(yaml.safe_dump(web))
    (tmp_path / "deploy" / "tool.yaml").write_text(yaml.safe_dump(tool))
    (tmp_path / "cluster-deployments.yaml").write_text(
        yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": [web, tool]})
    )
    (tmp_path / "pullgate.yaml").write_text(
        yaml.safe_dump(
            {
                "cache": {"dir": str(tmp_path / "cache")},
                "upstreams": [{"name": "docker.io", "url": registry.url}, {"name": "ghcr.io", "url": registry.url}],
            }
        )
    )
    lint, offline, online, piped, verify = block("pullgate policy lint policies/").lines()
    env = environment()
    assert sh(lint, tmp_path, env).stdout.startswith("ok: policies: ")
    out = sh(offline, tmp_path, env, expect=1).stdout  # exit 1 on any deny: quay.io is not allowed
    assert re.search(r'DENY .*"quay.io/acme/tool:1": policy allowed-registries does not allow', out), out
    assert re.search(r'SKIP .*"nginx:1.25": policy prod-pinned not evaluated offline', out), out
    out = sh(online, tmp_path, env, expect=1).stdout
    assert "SKIP" not in out and re.search(r'ALLOW .*"nginx:1.25": policy prod-pinned passed', out), out
    out = sh(substitute(piped), tmp_path, env, expect=1).stdout
    assert out.splitlines()[-1].startswith("2 images, "), out
    port = free_port()
    daemon_env = environment(
        PULLGATE_LISTEN=f"127.0.0.1:{port}",
        PULLGATE_CACHE__DIR=str(tmp_path / "mirror-cache"),
        PULLGATE_UPSTREAMS__0__URL=registry.url,
        PULLGATE_UPSTREAMS__1__NAME="ghcr.io",
        PULLGATE_UPSTREAMS__1__URL=signed_origin.url,
    )
    mirror = f"http://127.0.0.1:{port}"
    with serving("pullgate serve", tmp_path, daemon_env, f"{mirror}/readyz"):
        done = sh(substitute(verify, mirror=mirror), tmp_path, env)
    assert "1 of 1 required signatures verified" in done.stderr
    (payload,) = json.loads(done.stdout)
    assert payload["critical"]["type"] == "cosign container image signature"


def copy_with(deployment: dict[str, object], *, name: str, namespace: str, image: str) -> dict[str, object]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"template": {"spec": {"containers": [{"name": name, "image": image}]}}},
    }


def test_admission_config(registry: Registry, images: dict[str, ImageInfo], tmp_path: Path) -> None:
    """The webhook's config block (with its files made), checked and served over TLS."""
    etc = tmp_path / "etc"
    (etc / "tls").mkdir(parents=True)
    write_cert(etc / "tls", serial=1)
    shutil.copytree(ROOT / "policies", etc / "policies")
    webhook_port = free_port()
    text = substitute(block("admission:").text, etc=str(etc), webhook_port=str(webhook_port))
    (tmp_path / "pullgate.yaml").write_text(text)
    port = free_port()
    env = environment(
        PULLGATE_LISTEN=f"127.0.0.1:{port}",
        PULLGATE_CACHE__DIR=str(tmp_path / "cache"),
        PULLGATE_UPSTREAMS__0__URL=registry.url,
    )
    # The optional client CA the block names (the API server's client certificates' CA).
    make_ca(etc, "apiserver-client-ca")
    assert sh("pullgate config check pullgate.yaml", tmp_path, env).stdout == "ok: pullgate.yaml\n"
    with serving("pullgate serve --config pullgate.yaml", tmp_path, env, f"http://127.0.0.1:{port}/readyz"):
        ca = etc / "tls" / "tls.crt"
        wait_until(
            lambda: https_status(f"https://localhost:{webhook_port}/readyz", ca) == 200, timeout=15, what="webhook"
        )
        # Not served on the webhook port: 404, or 403 first when (as here) client_ca asks
        # callers other than the probes for a client certificate.
        assert https_status(f"https://localhost:{webhook_port}/metrics", ca) in (403, 404), "metrics: mirror port"


def test_access_config(registry: Registry, images: dict[str, ImageInfo], tmp_path: Path) -> None:
    """The access block added to the cluster admin's config, its files made as the comments
    say: anonymous pulls where a rule allows them, credentials elsewhere."""
    etc = tmp_path / "etc"
    (etc / "tls").mkdir(parents=True)
    write_cert(etc / "tls", serial=2)
    password = "readme-ci-password-for-tests"
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()  # what htpasswd -B writes
    (etc / "htpasswd").write_text(f"ci:{hashed}\n")
    (etc / "tokens").write_text(f"deploy:sha256:{hashlib.sha256(b'readme-static-token-value').hexdigest()}\n")
    base = yaml.safe_load(block('listen: "0.0.0.0:5000"').text)
    access = yaml.safe_load(substitute(block("tls_cert: /etc/pullgate/tls/tls.crt").text, etc=str(etc)))
    (tmp_path / "pullgate.yaml").write_text(yaml.safe_dump({**base, **access}))
    port = free_port()
    env = environment(
        GHCR_TOKEN="readme-ghcr-token-for-tests",
        PULLGATE_TOKEN_KEY="readme-token-signing-key-of-32-chars-or-more",
        PULLGATE_LISTEN=f"127.0.0.1:{port}",
        PULLGATE_CACHE__DIR=str(tmp_path / "cache"),
        PULLGATE_UPSTREAMS__0__URL=registry.url,
        PULLGATE_UPSTREAMS__1__URL=registry.url,
    )
    assert sh("pullgate config check pullgate.yaml", tmp_path, env).stdout == "ok: pullgate.yaml\n"
    ca = etc / "tls" / "tls.crt"
    command = "pullgate serve --config pullgate.yaml"
    log = tmp_path / "serve.log"
    proc = start_daemon(["bash", "-c", command], stdout=log, stderr=log, cwd=tmp_path, env=env)
    try:
        mirror = f"https://localhost:{port}"
        wait_until(lambda: https_status(f"{mirror}/readyz", ca) == 200, timeout=30, what=command, proc=proc, log=log)
        accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
        assert https_status(f"{mirror}/v2/library/nginx/manifests/1.25?ns=docker.io", ca, accept) == 200
        assert https_status(f"{mirror}/v2/acme/app/manifests/2.1?ns=ghcr.io", ca, accept) == 401
        basic = {**accept, "Authorization": "Basic " + base64.b64encode(f"ci:{password}".encode()).decode()}
        assert https_status(f"{mirror}/v2/acme/app/manifests/2.1?ns=ghcr.io", ca, basic) == 200
    finally:
        stop_daemon(proc, grace=10)


# --- SREs ------------------------------------------------------------------------------------------
def test_cache_operations_and_air_gap(registry: Registry, images: dict[str, ImageInfo], tmp_path: Path) -> None:
    """The cache tools block as written (no --config: ./pullgate-cache and the embedded
    defaults, the upstreams overridden from the environment): warm, export on the connected
    side; import and everything after it on the air-gapped side, whose upstreams are dead."""
    site, airgap = tmp_path / "site", tmp_path / "airgap"
    (site / "deploy").mkdir(parents=True)
    airgap.mkdir()
    deployment = copy_with({}, name="app", namespace="prod", image="ghcr.io/acme/app:2.1")
    (site / "deploy" / "app.yaml").write_text(yaml.safe_dump(deployment))
    shutil.copytree(ROOT / "policies", airgap / "policies")
    lines = block("pullgate warm nginx:1.25 ghcr.io/acme/app:2.1").lines()
    warm, warm_manifests, export, load, ls, inspect, du, prune = lines
    connected = environment(**upstream_env(registry.url))
    assert "warmed 2 of 2" in sh(warm, site, connected).stdout
    assert "warmed 1 of 1" in sh(warm_manifests, site, connected).stdout
    exported = sh(export, site, connected).stdout
    assert "exported docker.io/library/nginx:1.25" in exported and "exported ghcr.io/acme/app:2.1" in exported
    shutil.copy(site / "site.tar", airgap / "site.tar")
    offline = environment(**upstream_env(f"http://127.0.0.1:{free_port()}"))
    loaded = sh(load, airgap, offline).stdout
    assert loaded.count("pinned: served without asking an upstream") == 2, loaded
    listing = sh(ls, airgap, offline).stdout
    assert "library/nginx" in listing and "acme/app" in listing
    details = sh(inspect, airgap, offline).stdout
    assert details.startswith("IMAGE        docker.io/library/nginx:1.25") and "POLICY" in details
    assert "layer sharing saves" in sh(du, airgap, offline).stdout
    pruned = sh(prune, airgap, offline).stdout
    assert pruned == "would remove 0 objects, 0 B (dry run)\n", "nothing is 30 days old here"
    assert not (tmp_path / "pullgate-cache").exists() and (airgap / "pullgate-cache").is_dir()


def test_trust_tuf_config(tmp_path: Path) -> None:
    """The TUF refresh block is a valid config (checked without contacting the repository;
    tests/test_tufroot.py runs the refresh itself against a real local TUF repository)."""
    (tmp_path / "pullgate.yaml").write_text(block("trust:").text)
    env = environment(PULLGATE_CACHE__DIR=str(tmp_path / "cache"))
    assert sh("pullgate config check pullgate.yaml", tmp_path, env).stdout == "ok: pullgate.yaml\n"
    config = load_config(tmp_path / "pullgate.yaml", {})
    assert config.trust.tuf.url == "https://tuf-repo-cdn.sigstore.dev"
    assert config.trust.tuf.interval == 24 * 3600
    assert config.trust.tuf.root is None  # the shipped Sigstore root.json


# --- scaling out -----------------------------------------------------------------------------------
def test_scaling_out_config(seaweedfs_engine: SeaweedFS, key_prefix: str, tmp_path: Path) -> None:
    """The replica config, checked and served against a real S3 engine (SeaweedFS) and a real
    Redis with a password: the replica turns ready with both reported up. Its addresses are
    replaced by the local engines' (endpoint, bucket ``pullgate-test``, a prefix of this
    test's own, the Redis URL, a loopback advertise_url); the secrets come from the
    environment variables the block names."""
    password = "readme-redis-password-for-tests"
    with RedisServer(tmp_path / "redis", password=password) as redis:
        port = free_port()
        text = block("storage:").text
        for old, new in (
            ("https://rgw.example:443", seaweedfs_engine.endpoint),
            ("bucket: pullgate\n", "bucket: pullgate-test\n"),  # tests/conftest.py S3_BUCKET
            ("prefix: cache/", f"prefix: {key_prefix}"),
            ("redis://redis.example:6379/0", redis.url),
            ("http://10.0.0.11:5000", f"http://127.0.0.1:{port}"),
        ):
            assert old in text, old
            text = text.replace(old, new)
        (tmp_path / "pullgate.yaml").write_text(text)
        env = environment(
            S3_ACCESS_KEY=seaweedfs_engine.keys.access_key,
            S3_SECRET_KEY=seaweedfs_engine.keys.secret_key,
            REDIS_PASSWORD=password,
            PULLGATE_LISTEN=f"127.0.0.1:{port}",
            PULLGATE_CACHE__DIR=str(tmp_path / "cache"),
        )
        assert sh("pullgate config check pullgate.yaml", tmp_path, env).stdout == "ok: pullgate.yaml\n"
        mirror = f"http://127.0.0.1:{port}"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with (
            serving("pullgate serve --config pullgate.yaml", tmp_path, env, f"{mirror}/readyz"),
            opener.open(f"{mirror}/metrics", timeout=10) as response,
        ):
            metrics = response.read().decode()
    for gauge in ("pullgate_coordination_up", "pullgate_object_store_up"):
        assert re.search(rf"^{gauge} 1\.0$", metrics, re.M), f"{gauge} is not 1"


def test_scaling_out_helm_values(tmp_path: Path) -> None:
    """The Helm values: three replicas install (the schema's requirement met), the rendered
    config is the block above's shape, each pod advertises its own peer endpoint, with a
    PodDisruptionBudget and a spread over nodes."""
    helm = pytest.importorskip("helm_python", reason="pip install '.[test]' (helm-python-sdk)")
    values = yaml.safe_load(block("replicaCount: 3").text)
    with contextlib.closing(helm.Chart.load(str(ROOT / "charts" / "pullgate"))) as chart:
        files = chart.render(values, name="pg", namespace="pullgate", is_install=True)
        with pytest.raises(helm.HelmValuesError, match="/coordination/type"):
            chart.render({**values, "coordination": {}}, name="pg", namespace="pullgate", is_install=True)
    texts = [text for path, text in files.items() if path.endswith(".yaml")]
    objects = [o for text in texts for o in yaml.safe_load_all(text) if o]
    by_kind = {o["kind"]: o for o in objects if o["kind"] != "ConfigMap" or o["metadata"]["name"] == "pg-pullgate"}
    (tmp_path / "config.yaml").write_text(by_kind["ConfigMap"]["data"]["config.yaml"])
    config = load_config(tmp_path / "config.yaml", {})
    assert (config.storage.type, config.storage.bucket, config.coordination.type) == ("s3", "pullgate", "redis")
    assert config.storage.access_key_env and config.coordination.password_env
    pod = by_kind["Deployment"]["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["PULLGATE_COORDINATION__ADVERTISE_URL"]["value"] == "http://$(POD_IP):5000"
    assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert by_kind["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    assert pod["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname"
