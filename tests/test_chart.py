"""The Helm chart (``charts/pullgate``), rendered by Helm's own engine (``helm-python-sdk``
embeds the Go SDK: no helm binary, no cluster): lint, every rendered object against the
Kubernetes OpenAPI schemas (``kubernetes-validate``), the webhook configurations' safety
properties, the generated config against pullgate's own loader, the generated webhook
certificate in a real TLS handshake, and the node-mirror script writing real hosts.toml files.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import hashlib
import http.server
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import tomllib
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config.settings import Config, load_config
from proxy.config.storage import CoordinationConfig, StorageConfig
from proxy.config.units import parse_duration
from tests.support.certs import make_ca
from tests.support.procs import free_port, http_status, start_daemon, stop_daemon, wait_until

helm = pytest.importorskip("helm_python", reason="pip install '.[test]' (helm-python-sdk)")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install '.[test]'")

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "pullgate"
NAME, NAMESPACE = "pg", "pullgate-system"
FULLNAME = "pg-pullgate"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and a current one.
KUBE_VERSIONS = ("1.28.0", "1.33.0")
# Custom resources: no OpenAPI schema in kubernetes-validate; checked field by field below.
CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("cert-manager.io/v1", "Certificate"),
    ("cert-manager.io/v1", "Issuer"),
}
CLUSTER_SCOPED = {"MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"}

EVERYTHING: dict[str, Any] = {
    "image": {"digest": "sha256:" + "a" * 64},
    "replicaCount": 3,
    "upstreams": [
        {
            "name": "docker.io",
            "url": "https://registry-1.docker.io",
            "username": "robot",
            "passwordSecret": {"name": "hub", "key": "token"},
        },
        {"name": "ghcr.io", "url": "https://ghcr.io"},
        {"name": "registry.internal:5001", "url": "http://10.0.0.7:5001"},
    ],
    "config": {
        "cache": {"max_size": "40GiB", "tag_ttl": "10m"},
        "log": {"level": "debug"},
        "defaults": {"no_match": "warn"},
        "admission": {"on_timeout": "allow"},
    },
    "extraEnv": [{"name": "PULLGATE_CACHE__NEGATIVE_TTL", "value": "1m"}],
    "storage": {
        "type": "s3",
        "endpoint": "https://rgw.internal:8443",
        "bucket": "pullgate",
        "region": "eu-1",
        "prefix": "cache/",
        "credentialsSecret": {"name": "pullgate-s3", "accessKeyKey": "id", "secretKeyKey": "key"},
        "redirect": True,
        "redirect_ttl": "5m",
        "part_size": "32MiB",
        "timeout": "20s",
    },
    "coordination": {
        "type": "redis",
        "url": "rediss://redis.internal:6380/2",
        "username": "pullgate",
        "passwordSecret": {"name": "pullgate-redis", "key": "pw"},
        "key_prefix": "pg:",
        "timeout": "1s",
        "lease_ttl": "20s",
    },
    "policies": {"files": {"no-latest.yaml": (ROOT / "policies" / "no-latest.yaml").read_text()}},
    "persistence": {"enabled": True, "size": "50Gi", "storageClassName": "fast"},
    "webhook": {
        "failurePolicy": "Ignore",
        "timeoutSeconds": 5,
        "excludeNamespaces": ["monitoring"],
        "mutating": {"workloads": False},
        "matchConditions": [{"name": "not-dry-run", "expression": "!request.dryRun"}],
    },
    "certManager": {
        "enabled": True,
        "issuerRef": {"kind": "ClusterIssuer", "name": "internal-ca", "group": "cert-manager.io"},
    },
    "nodeMirror": {"enabled": True, "registries": ["docker.io", "ghcr.io", "registry.internal:5001"]},
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kps"}}, "prometheusRule": {"enabled": True}},
    "autoscaling": {"enabled": True},
    "networkPolicy": {
        "enabled": True,
        "mirrorFrom": [{"ipBlock": {"cidr": "10.0.0.0/16"}}],
        "metricsFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}],
        "apiServer": {"cidrs": ["10.0.0.0/24"]},
    },
}

COMBINATIONS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "persistence": {"persistence": {"enabled": True}},
    "cert-manager": {"certManager": {"enabled": True}},
    "webhook-off": {"webhook": {"enabled": False}},
    "validating-only": {"webhook": {"mutating": {"enabled": False}}},
    "existing-policies": {"policies": {"existingConfigMap": "team-policies"}},
    "tls-and-access": {
        "upstreams": [
            {"name": "docker.io", "url": "https://registry-1.docker.io"},
            {"name": "ghcr.io", "url": "https://ghcr.io"},
        ],
        "mirrorTLS": {"existingSecret": "mirror-tls"},
        "accessSecret": {
            "name": "mirror-users",
            "htpasswdKey": "htpasswd",
            "tokensKey": "tokens",
            "tokenSecretKey": "signing-key",
        },
        "config": {
            "access": {
                "enabled": True,
                "token_ttl": "10m",
                "groups": {"ci": ["robot"]},
                "rules": [
                    {"repositories": ["docker.io/**"], "anonymous": True},
                    {"repositories": ["ghcr.io/acme/**"], "groups": ["ci"]},
                ],
            },
            "limits": {"upstream_fetches": 32, "idle_timeout": "20s"},
        },
        "nodeMirror": {"enabled": True, "endpoint": "https://mirror.internal:5000"},
        "metrics": {"serviceMonitor": {"enabled": True}},
    },
    "node-mirror-endpoint": {
        "nodeMirror": {"enabled": True, "endpoint": "http://10.96.0.50:5000"},
        "service": {"clusterIP": "10.96.0.50"},
    },
    "everything": EVERYTHING,
    "scale-out": {
        "replicaCount": 2,
        "storage": {"type": "s3", "endpoint": "http://minio.minio.svc:9000", "bucket": "pullgate"},
        "coordination": {"type": "redis", "url": "redis://redis.redis.svc:6379/0"},
        "networkPolicy": {
            "enabled": True,
            "mirrorFrom": [{"ipBlock": {"cidr": "10.0.0.0/16"}}],
            "apiServer": {"cidrs": ["10.0.0.0/24"]},
        },
    },
}
# The shared tier several replicas need (storage s3, coordination redis).
S3 = {"type": "s3", "endpoint": "https://rgw.internal", "bucket": "pullgate"}
REDIS = {"type": "redis", "url": "redis://redis.internal:6379/0"}
SHARED = {"storage": S3, "coordination": REDIS}
# The example values files (charts/pullgate/examples), each rendered and checked like the rest.
EXAMPLES = sorted(p.name for p in (CHART / "examples").glob("*.yaml"))
COMBINATIONS.update({f"example {name}": yaml.safe_load((CHART / "examples" / name).read_text()) for name in EXAMPLES})


# --- rendering ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chart() -> Iterator[Any]:
    loaded = helm.Chart.load(str(CHART))
    yield loaded
    loaded.close()


def render(chart: Any, values: dict[str, Any], namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    files = chart.render(values, name=NAME, namespace=namespace, is_install=True)
    objects = []
    for path, text in sorted(files.items()):
        if path.endswith("NOTES.txt"):
            continue
        for obj in yaml.safe_load_all(text):
            if obj is not None:
                obj.setdefault("_template", path)
                objects.append(obj)
    return objects


def strip(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k != "_template"}


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def kinds(objects: list[dict[str, Any]]) -> list[str]:
    return sorted(o["kind"] for o in objects)


def workload(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
    return found


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    containers = workload(objects)["spec"]["template"]["spec"]["containers"]
    (main,) = [c for c in containers if c["name"] == "pullgate"]
    return dict(main)


def rendered_config(objects: list[dict[str, Any]], tmp_path: Path) -> Config:
    """The ConfigMap's config.yaml, loaded by pullgate's own loader (paths moved under tmp)."""
    text = find(objects, "ConfigMap", FULLNAME)["data"]["config.yaml"]
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return load_config(path, environ={})


# --- lint and schemas ---------------------------------------------------------------------
@pytest.mark.parametrize("combination", ["defaults", "everything", "scale-out", *(f"example {e}" for e in EXAMPLES)])
def test_helm_lint_is_clean(combination: str) -> None:
    report = helm.lint(str(CHART), COMBINATIONS[combination], strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


@pytest.mark.parametrize("combination", sorted(COMBINATIONS))
def test_rendered_objects_are_valid_kubernetes(chart: Any, combination: str) -> None:
    objects = render(chart, COMBINATIONS[combination])
    assert objects
    for obj in objects:
        where = f"{obj['_template']}: {obj['kind']}/{obj['metadata']['name']}"
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(strip(obj), version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{where} invalid for Kubernetes {version}: {exc.message} at {list(exc.path)}")
        if obj["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in obj["metadata"], where
        else:
            assert obj["metadata"]["namespace"] == NAMESPACE, where
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == NAME and labels["app.kubernetes.io/name"] == "pullgate", where
    names = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(names) == len(set(names)), "duplicate objects"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"webhook": {"failurePolicy": "Sometimes"}}, "failurePolicy"),
        ({"webhook": {"timeoutSeconds": 31}}, "timeoutSeconds"),
        ({"webhook": {"timeoutSeconds": 1}}, "timeoutSeconds"),
        ({"config": {"cache": {"max_sise": "1GiB"}}}, "max_sise"),
        ({"config": {"cache": {"tag_ttl": "soon"}}}, "tag_ttl"),
        ({"config": {"listen": "0.0.0.0:80"}}, "listen"),
        ({"config": {"defaults": {"no_match": "maybe"}}}, "no_match"),
        ({"upstreams": []}, "upstreams"),
        ({"upstreams": [{"name": "x", "url": "ftp://x"}]}, "url"),
        ({"upstreams": [{"name": "x", "url": "https://x", "password": "hunter2"}]}, "password"),
        ({"persistence": {"enabled": "yes"}}, "enabled"),
        ({"image": {"digest": "latest"}}, "digest"),
        ({"policies": {"files": {"policy.json": "{}"}}}, "policy.json"),
        ({"replicas": 3}, "replicas"),
        ({"storage": {"type": "s3"}}, "/storage/bucket"),
        ({"storage": {"type": "s3", "bucket": "x"}}, "/storage/bucket"),
        ({"storage": {"type": "gcs"}}, "/storage/type"),
        ({"storage": {"bucket": "pullgate"}}, "/storage/bucket"),  # type filesystem: no bucket
        ({"storage": {"type": "s3", "bucket": "pg", "endpoint": "https://s3.example/pullgate"}}, "/storage/endpoint"),
        ({"storage": {**S3, "credentialsSecret": {"name": "s", "secretKey": "k"}}}, "secretKey"),
        ({"storage": {**S3, "secret_key": "hunter2"}}, "secret_key"),
        ({"storage": S3, "coordination": {"type": "redis"}}, "/coordination/url"),
        ({"storage": S3, "coordination": {"type": "redis", "url": "http://r:6379"}}, "url"),
        ({"storage": S3, "coordination": {"type": "redis", "url": "redis://u:pw@r"}}, "url"),
        ({"coordination": {"type": "redis", "url": "redis://r:6379"}}, "/storage/type"),  # redis needs s3
        ({"coordination": {"url": "redis://r:6379"}}, "/coordination/url"),  # type local: no url
    ],
)  # fmt: skip
def test_bad_values_fail_at_install_time(chart: Any, values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError) as failure:
        chart.render(values, name=NAME, namespace=NAMESPACE, is_install=True)
    assert message in str(failure.value)


def test_node_mirror_over_tls_needs_an_endpoint_the_nodes_trust(chart: Any) -> None:
    values = {"mirrorTLS": {"existingSecret": "mirror-tls"}, "nodeMirror": {"enabled": True}}
    with pytest.raises(helm.HelmError) as failure:
        chart.render(values, name=NAME, namespace=NAMESPACE, is_install=True)
    assert "nodeMirror.endpoint" in str(failure.value)


def test_mirror_tls_and_access_secrets_are_mounted_where_the_config_points(chart: Any, tmp_path: Path) -> None:
    objects = render(chart, COMBINATIONS["tls-and-access"])
    config = rendered_config(objects, tmp_path)
    main = container(objects)
    mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
    volumes = {v["name"]: v for v in workload(objects)["spec"]["template"]["spec"]["volumes"]}
    for path, secret in (
        (config.tls_cert, "mirror-tls"),
        (config.access.htpasswd, "mirror-users"),
        (config.access.tokens, "mirror-users"),
    ):
        assert path is not None
        volume = volumes[mounts[str(path.parent)]]
        assert volume["secret"]["secretName"] == secret
    assert config.access.enabled and config.access.rules[0].anonymous
    assert config.limits.upstream_fetches == 32
    assert config.access.token_secret_env == "ACCESS_TOKEN_SECRET" and config.access.token_ttl == 600
    env_from = {e["name"]: e.get("valueFrom") for e in main["env"]}
    assert env_from["ACCESS_TOKEN_SECRET"] == {"secretKeyRef": {"name": "mirror-users", "key": "signing-key"}}
    for probe in ("livenessProbe", "readinessProbe"):
        assert main[probe]["httpGet"]["scheme"] == "HTTPS"
    endpoint = find(objects, "ServiceMonitor")["spec"]["endpoints"][0]
    assert endpoint["scheme"] == "https"
    env = {
        e["name"]: e.get("value")
        for e in find(objects, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["MIRROR_ENDPOINT"] == "https://mirror.internal:5000"


def test_values_schema_covers_pullgate_config() -> None:
    """Every key of pullgate's config is either settable under ``config`` or owned by the
    chart, and the schema allows no key pullgate would reject at startup."""
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["config"]["properties"]
    owned = {
        "listen",
        "upstreams",
        "policies",
        "shutdown_grace",
        "shutdown_delay",
        "cache.dir",
        "tls_cert",
        "tls_key",
        "access.htpasswd",
        "access.tokens",
        "access.token_secret_env",
        "admission.enabled",
        "admission.listen",
        "admission.tls_cert",
        "admission.tls_key",
        "admission.client_ca",  # webhook.clientCA
    }

    def keys(cls: type[Any], prefix: str = "") -> set[str]:
        out = set()
        for f in dataclasses.fields(cls):
            nested = f.default_factory if f.default_factory is not dataclasses.MISSING else None
            if nested is not None and dataclasses.is_dataclass(nested):
                out |= keys(nested, f"{prefix}{f.name}.")
            else:
                out.add(prefix + f.name)
        return out

    def schema_keys(props: dict[str, Any], prefix: str = "") -> set[str]:
        out = set()
        for name, sub in props.items():
            if sub.get("type") == "object" and "properties" in sub:
                out |= schema_keys(sub["properties"], f"{prefix}{name}.")
            else:
                out.add(prefix + name)
        return out

    daemon, chart_keys = keys(Config), schema_keys(schema)
    # storage and coordination: top-level values (with Secrets for the credentials), below.
    owned |= {k for k in daemon if k.startswith(("storage.", "coordination."))}
    assert chart_keys <= daemon, f"schema allows keys pullgate does not know: {sorted(chart_keys - daemon)}"
    assert daemon - owned <= chart_keys, f"config keys the chart cannot set: {sorted(daemon - owned - chart_keys)}"


@pytest.mark.parametrize(
    ("section", "config_class", "secret_keys", "per_pod"),
    [
        ("storage", StorageConfig, {"credentialsSecret": {"access_key_env", "secret_key_env"}}, set()),
        ("coordination", CoordinationConfig, {"passwordSecret": {"password_env"}}, {"advertise_url"}),
    ],
)
def test_storage_and_coordination_values_cover_pullgate_config(
    section: str, config_class: type[Any], secret_keys: dict[str, set[str]], per_pod: set[str]
) -> None:
    """The top-level ``storage``/``coordination`` values are pullgate's blocks key for key,
    except the secrets (a Secret reference instead of an ``*_env`` name) and what is per pod
    (set from the environment)."""
    values = set(json.loads((CHART / "values.schema.json").read_text())["properties"][section]["properties"])
    fields = {f.name for f in dataclasses.fields(config_class)}
    env_names = set().union(*secret_keys.values())
    assert values - set(secret_keys) == fields - env_names, "values.schema.json and pullgate disagree"
    assert per_pod <= values
    documented = yaml.safe_load((CHART / "values.yaml").read_text())[section]
    text = (CHART / "values.yaml").read_text()
    for key in values:
        assert key in documented or f"# {key}:" in text, f"values.yaml does not document {section}.{key}"


# --- the generated config -------------------------------------------------------------------
@pytest.mark.parametrize("combination", sorted(COMBINATIONS))
def test_generated_config_is_accepted_by_pullgate(chart: Any, combination: str, tmp_path: Path) -> None:
    values = COMBINATIONS[combination]
    objects = render(chart, values)
    config = rendered_config(objects, tmp_path)
    main = container(objects)
    assert main["args"] == ["--config", "/etc/pullgate/config/config.yaml"]
    mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
    assert mounts["/etc/pullgate/config"] == "config"
    assert str(config.policies) == "/etc/pullgate/policies" and mounts[str(config.policies)] == "policies"
    assert str(config.cache.dir) == "/var/cache/pullgate" and mounts[str(config.cache.dir)] == "cache"
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert config.listen == ("0.0.0.0", ports["http"])
    # Credentials: only a reference to a Secret, in an env name that is not a config override.
    env = {e["name"]: e for e in main.get("env", [])}
    secret_envs = [u.password_env for u in config.upstreams]
    secret_envs += [config.storage.access_key_env, config.storage.secret_key_env, config.coordination.password_env]
    for name in filter(None, secret_envs):
        assert not name.startswith("PULLGATE_")
        assert set(env[name]["valueFrom"]) == {"secretKeyRef"}
    assert "hunter2" not in json.dumps(objects)
    webhook = values.get("webhook", {})
    if webhook.get("enabled", True):
        assert config.admission.enabled
        assert config.admission.listen == ("0.0.0.0", ports["webhook"])
        assert str(config.admission.tls_cert).startswith("/etc/pullgate/tls/")
        assert mounts["/etc/pullgate/tls"] == "webhook-tls"
        # pullgate must answer (even "timed out") before the API server gives up.
        assert config.admission.deadline < webhook.get("timeoutSeconds", 10)
    else:
        assert not config.admission.enabled and "webhook" not in ports
    # The kubelet's SIGKILL must come after pullgate's own drain: unready, then in-flight pulls.
    spec = workload(objects)["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] > config.shutdown_delay + config.shutdown_grace
    assert config.shutdown_delay > 0, "endpoints need time to drop the pod before the port closes"


def test_config_overrides_reach_pullgate(chart: Any, tmp_path: Path) -> None:
    config = rendered_config(render(chart, EVERYTHING), tmp_path)
    assert config.cache.max_size == 40 << 30 and config.cache.tag_ttl == 600
    assert config.admission.on_timeout == "allow" and config.admission.deadline == 3
    assert [u.name for u in config.upstreams] == ["docker.io", "ghcr.io", "registry.internal:5001"]
    assert config.upstreams[0].username == "robot" and config.upstreams[0].password_env == "UPSTREAM_0_PASSWORD"
    assert config.shutdown_grace == 25 and config.shutdown_delay == 5
    storage, coordination = config.storage, config.coordination
    assert (storage.type, storage.endpoint, storage.bucket) == ("s3", "https://rgw.internal:8443", "pullgate")
    assert storage.region == "eu-1"
    assert (storage.prefix, storage.redirect, storage.redirect_ttl) == ("cache/", True, 300)
    assert (storage.part_size, storage.timeout) == (32 << 20, 20)
    assert (storage.access_key_env, storage.secret_key_env) == ("STORAGE_ACCESS_KEY", "STORAGE_SECRET_KEY")
    assert (coordination.type, coordination.url) == ("redis", "rediss://redis.internal:6380/2")
    assert coordination.username == "pullgate"
    assert (coordination.key_prefix, coordination.timeout, coordination.lease_ttl) == ("pg:", 1, 20)
    assert coordination.password_env == "COORDINATION_PASSWORD"
    env = {e["name"]: e.get("valueFrom") for e in container(render(chart, EVERYTHING))["env"]}
    assert env["STORAGE_ACCESS_KEY"] == {"secretKeyRef": {"name": "pullgate-s3", "key": "id"}}
    assert env["STORAGE_SECRET_KEY"] == {"secretKeyRef": {"name": "pullgate-s3", "key": "key"}}
    assert env["COORDINATION_PASSWORD"] == {"secretKeyRef": {"name": "pullgate-redis", "key": "pw"}}


# --- several replicas ------------------------------------------------------------------------
POD_IP, POD_IP6 = "10.244.1.7", "fd00:10:244::7"


def pod_env(objects: list[dict[str, Any]], pod_ip: str = POD_IP) -> dict[str, str]:
    """The container's literal environment as the kubelet builds it: downward-API fields
    filled in (status.podIP = pod_ip) and ``$(VAR)`` references to earlier variables
    expanded, in order (Kubernetes' dependent environment variables)."""
    fields = {"status.podIP": pod_ip, "metadata.name": f"{FULLNAME}-0"}
    out: dict[str, str] = {}
    for var in container(objects).get("env", []):
        if "value" in var:
            out[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: out.get(m[1], m[0]), var["value"])
        elif "fieldRef" in var.get("valueFrom", {}):
            out[var["name"]] = fields[var["valueFrom"]["fieldRef"]["fieldPath"]]
    return out


@pytest.mark.parametrize(
    ("values", "error", "pdb", "advertise"),
    [
        ({}, None, False, None),  # the default: one replica, its own disk, no PDB
        ({"replicaCount": 1, **SHARED}, None, False, f"http://{POD_IP}:5000"),
        ({"replicaCount": 2}, "/storage/type", None, None),
        ({"replicaCount": 2}, "/coordination/type", None, None),
        ({"replicaCount": 2, "storage": S3}, "/coordination/type", None, None),
        ({"replicaCount": 2, "storage": {"type": "s3"}, "coordination": REDIS}, "/storage/bucket", None, None),
        ({"replicaCount": 2, "coordination": REDIS}, "/storage/type", None, None),
        ({"replicaCount": 2, "storage": S3, "coordination": {"type": "redis"}}, "/coordination/url", None, None),
        ({"autoscaling": {"enabled": True}}, "/storage/type", None, None),  # the HPA scales past one
        ({"replicaCount": 2, **SHARED}, None, True, f"http://{POD_IP}:5000"),
        ({"autoscaling": {"enabled": True}, **SHARED}, None, True, f"http://{POD_IP}:5000"),
        ({"replicaCount": 3, **SHARED, "mirrorTLS": {"existingSecret": "mirror-tls"}, "nodeMirror": {"enabled": False}},
         None, True, f"https://{POD_IP}:5000"),
        ({"replicaCount": 3, **SHARED, "podDisruptionBudget": {"enabled": False}}, None, False, f"http://{POD_IP}:5000"),
        ({"replicaCount": 2, "storage": S3, "coordination": {**REDIS, "advertise_url": "http://[$(POD_IP)]:5000"}},
         None, True, f"http://[{POD_IP6}]:5000"),  # an IPv6 cluster's pod IP needs the brackets
    ],
)  # fmt: skip
def test_several_replicas_need_the_shared_tier(
    chart: Any, tmp_path: Path, values: dict[str, Any], error: str | None, pdb: bool | None, advertise: str | None
) -> None:
    """replicaCount > 1 (or the HPA) without storage s3 and coordination redis fails at
    install time naming the key; with them each pod advertises its own peer endpoint, a
    PodDisruptionBudget keeps all but one up and the pods spread over nodes."""
    if error is not None:
        with pytest.raises(helm.HelmValuesError) as failure:
            chart.render(values, name=NAME, namespace=NAMESPACE, is_install=True)
        assert error in str(failure.value)
        return
    objects = render(chart, values)
    budgets = [o for o in objects if o["kind"] == "PodDisruptionBudget"]
    assert bool(budgets) == pdb
    if budgets:
        assert budgets[0]["spec"]["maxUnavailable"] == 1
        assert budgets[0]["spec"]["selector"]["matchLabels"] == workload(objects)["spec"]["selector"]["matchLabels"]
    (spread,) = workload(objects)["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert (spread["topologyKey"], spread["whenUnsatisfiable"], spread["maxSkew"]) == (
        "kubernetes.io/hostname",
        "ScheduleAnyway",
        1,
    )
    env = pod_env(objects, POD_IP6 if advertise and POD_IP6 in advertise else POD_IP)
    assert env.get("PULLGATE_COORDINATION__ADVERTISE_URL") == advertise
    names = [e["name"] for e in container(objects).get("env", [])]
    if advertise is not None:
        assert names.index("POD_IP") < names.index("PULLGATE_COORDINATION__ADVERTISE_URL"), "POD_IP must come first"
    # What pullgate makes of the ConfigMap plus this pod's environment.
    text = find(objects, "ConfigMap", FULLNAME)["data"]["config.yaml"]
    (tmp_path / "config.yaml").write_text(text)
    config = load_config(tmp_path / "config.yaml", environ={k: v for k, v in env.items() if k.startswith("PULLGATE_")})
    assert config.coordination.advertise_url == (advertise.rstrip("/") if advertise else None)
    shared = values.get("storage") == S3
    assert (config.storage.type, config.coordination.type) == (("s3", "redis") if shared else ("filesystem", "local"))


def test_spread_over_nodes_can_be_made_a_rule(chart: Any) -> None:
    values = {
        "replicaCount": 3,
        **SHARED,
        "topologySpreadConstraints": [
            {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "DoNotSchedule"}
        ],
    }
    objects = render(chart, values)
    (spread,) = workload(objects)["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert spread["whenUnsatisfiable"] == "DoNotSchedule" and spread["topologyKey"] == "topology.kubernetes.io/zone"
    assert spread["labelSelector"]["matchLabels"] == workload(objects)["spec"]["selector"]["matchLabels"]


def test_replicas_may_reach_each_others_peer_endpoint(chart: Any) -> None:
    """With a NetworkPolicy restricting the mirror port, the release's own pods are let in:
    the other replicas stream blobs from it (the peer endpoint shares the mirror port)."""
    objects = render(chart, COMBINATIONS["scale-out"])
    mirror_rule = find(objects, "NetworkPolicy")["spec"]["ingress"][0]
    assert mirror_rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    selector = workload(objects)["spec"]["selector"]["matchLabels"]
    assert {"podSelector": {"matchLabels": selector}} in mirror_rule["from"]
    alone = render(chart, {**COMBINATIONS["scale-out"], "replicaCount": 1, "storage": {}, "coordination": {}})
    assert all("podSelector" not in peer for peer in find(alone, "NetworkPolicy")["spec"]["ingress"][0]["from"])


def test_docs_deploy_typical_values_install(chart: Any, tmp_path: Path) -> None:
    """docs/deploy.md's "typical values.yaml" (three replicas on the shared tier) installs."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    (block,) = [b for b in re.findall(r"^```yaml\n(.*?)^```", text, re.S | re.M) if b.startswith("image:")]
    values = yaml.safe_load(block)
    objects = render(chart, values)
    config = rendered_config(objects, tmp_path)
    assert values["replicaCount"] == 3 and (config.storage.type, config.coordination.type) == ("s3", "redis")
    assert find(objects, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) not in CUSTOM_KINDS:
            kubernetes_validate.validate(strip(obj), KUBE_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("example", EXAMPLES)
def test_example_values_render_a_shared_tier(chart: Any, tmp_path: Path, example: str) -> None:
    """Each example values file (Ceph RGW, MinIO, AWS S3 with IRSA, GCS interop) installs:
    objects valid for Kubernetes (test_rendered_objects_are_valid_kubernetes), a config
    pullgate accepts, credentials only as Secret references (none for IRSA)."""
    values = COMBINATIONS[f"example {example}"]
    objects = render(chart, values)
    config = rendered_config(objects, tmp_path)
    assert config.storage.type == "s3" and config.coordination.type == "redis"
    assert config.storage.bucket == values["storage"]["bucket"]
    env = {e["name"]: e for e in container(objects)["env"]}
    secret = values["storage"].get("credentialsSecret", {}).get("name")
    if secret:
        assert config.storage.access_key_env and config.storage.secret_key_env
        for name in (config.storage.access_key_env, config.storage.secret_key_env):
            assert env[name]["valueFrom"]["secretKeyRef"]["name"] == secret
    else:  # the AWS default chain: IRSA through the ServiceAccount's role annotation
        assert config.storage.access_key_env is None and config.storage.secret_key_env is None
        annotations = find(objects, "ServiceAccount")["metadata"].get("annotations", {})
        assert "eks.amazonaws.com/role-arn" in annotations
    assert "PULLGATE_COORDINATION__ADVERTISE_URL" in env
    if values.get("replicaCount", 1) > 1:
        assert find(objects, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


# --- workload -------------------------------------------------------------------------------
@pytest.mark.parametrize("combination", ["defaults", "persistence", "everything"])
def test_pod_is_locked_down_and_probed(chart: Any, combination: str) -> None:
    objects = render(chart, COMBINATIONS[combination])
    pod = workload(objects)["spec"]["template"]["spec"]
    main = container(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    context = main["securityContext"]
    assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert main["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert main["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert {"cpu", "memory"} <= set(main["resources"]["requests"]) and "memory" in main["resources"]["limits"]
    assert pod["automountServiceAccountToken"] is False
    assert find(objects, "ServiceAccount")["automountServiceAccountToken"] is False
    assert not {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"} & set(kinds(objects))
    spread = pod["topologySpreadConstraints"][0]
    assert spread["labelSelector"]["matchLabels"] == workload(objects)["spec"]["selector"]["matchLabels"]


def test_persistence_makes_a_statefulset_with_a_claim(chart: Any) -> None:
    objects = render(chart, {"persistence": {"enabled": True, "size": "50Gi", "storageClassName": "fast"}})
    assert "Deployment" not in kinds(objects)
    sts = find(objects, "StatefulSet")
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "cache"
    assert claim["spec"]["resources"]["requests"]["storage"] == "50Gi" and claim["spec"]["storageClassName"] == "fast"
    assert "cache" not in {v["name"] for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert find(objects, "Service", sts["spec"]["serviceName"])["spec"]["clusterIP"] == "None"
    defaults = render(chart, {})
    volumes = {v["name"]: v for v in find(defaults, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["cache"]["emptyDir"]["sizeLimit"] == "10Gi"


def test_optional_objects_follow_values(chart: Any) -> None:
    defaults = kinds(render(chart, {}))
    assert defaults == sorted(
        [
            "ConfigMap",
            "ConfigMap",
            "ConfigMap",
            "Deployment",
            "MutatingWebhookConfiguration",
            "Secret",
            "Service",
            "ServiceAccount",
            "ValidatingWebhookConfiguration",
        ]
    )
    everything = render(chart, EVERYTHING)
    for kind in (
        "ServiceMonitor",
        "PrometheusRule",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
        "DaemonSet",
        "Certificate",
        "StatefulSet",
        "PodDisruptionBudget",
    ):
        assert kind in kinds(everything), kind
    hpa = find(everything, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "StatefulSet"
    assert "replicas" not in find(everything, "StatefulSet")["spec"], "the HPA owns the replica count"
    monitor = find(everything, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kps"
    assert monitor["spec"]["endpoints"][0]["port"] == "http" and monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    service = find(everything, "Service", FULLNAME)
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    policy = find(everything, "NetworkPolicy")
    mirror_rule, webhook_rule = policy["spec"]["ingress"]
    assert {"ipBlock": {"cidr": "10.0.0.0/16"}} in mirror_rule["from"]
    assert webhook_rule["from"] == [{"ipBlock": {"cidr": "10.0.0.0/24"}}], "the API server only"


def test_policies_from_values_or_an_existing_configmap(chart: Any) -> None:
    inline = render(chart, EVERYTHING)
    data = find(inline, "ConfigMap", f"{FULLNAME}-policies")["data"]
    assert yaml.safe_load(data["no-latest.yaml"])["metadata"]["name"] == "no-latest"
    existing = render(chart, COMBINATIONS["existing-policies"])
    assert not [o for o in existing if o["metadata"]["name"] == f"{FULLNAME}-policies"]
    volumes = {v["name"]: v for v in workload(existing)["spec"]["template"]["spec"]["volumes"]}
    assert volumes["policies"]["configMap"]["name"] == "team-policies"


def test_dashboard_configmap_ships_the_dashboard_file(chart: Any) -> None:
    configmap = find(render(chart, {}), "ConfigMap", f"{FULLNAME}-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads(configmap["data"]["pullgate.json"])
    assert shipped == json.loads((CHART / "dashboards" / "pullgate.json").read_text())


# --- webhooks ---------------------------------------------------------------------------------
def webhooks(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
        for obj in objects:
            if obj["kind"] == kind:
                (hook,) = obj["webhooks"]
                out[kind] = hook
    return out


def excluded_namespaces(hook: dict[str, Any]) -> set[str]:
    for expression in hook["namespaceSelector"]["matchExpressions"]:
        if expression["key"] == "kubernetes.io/metadata.name":
            assert expression["operator"] == "NotIn"
            return set(expression["values"])
    return set()


def resources(hook: dict[str, Any]) -> set[str]:
    out = set()
    for rule in hook["rules"]:
        assert set(rule["operations"]) == {"CREATE", "UPDATE"}
        out |= {
            f"{group}/{resource}" if group else resource
            for group in rule["apiGroups"]
            for resource in rule["resources"]
        }
    return out


WORKLOADS = {
    "apps/deployments",
    "apps/replicasets",
    "apps/statefulsets",
    "apps/daemonsets",
    "batch/jobs",
    "batch/cronjobs",
    "replicationcontrollers",
    "podtemplates",
}


@pytest.mark.parametrize("namespace", [NAMESPACE, "kube-system", "images"])
def test_webhooks_never_see_their_own_namespace_or_kube_system(chart: Any, namespace: str) -> None:
    hooks = webhooks(render(chart, {}, namespace=namespace))
    assert set(hooks) == {"MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"}
    for hook in hooks.values():
        assert {"kube-system", namespace} <= excluded_namespaces(hook)
        opt_out = [e for e in hook["namespaceSelector"]["matchExpressions"] if e["key"] == "pullgate.dev/admission"]
        assert opt_out == [{"key": "pullgate.dev/admission", "operator": "NotIn", "values": ["disabled"]}]


def test_webhook_defaults_are_safe(chart: Any) -> None:
    objects = render(chart, {})
    hooks = webhooks(objects)
    for kind, hook in hooks.items():
        assert hook["failurePolicy"] == "Fail" and hook["timeoutSeconds"] == 10, kind
        assert hook["sideEffects"] == "None" and hook["admissionReviewVersions"] == ["v1"], kind
        assert {"pods", "pods/ephemeralcontainers"} | WORKLOADS <= resources(hook), kind
        assert all(rule["scope"] == "Namespaced" for rule in hook["rules"])
        assert {c["name"] for c in hook["matchConditions"]} == {"spec-changed", "not-controller-owned-template"}
    assert hooks["MutatingWebhookConfiguration"]["reinvocationPolicy"] == "IfNeeded"
    assert hooks["MutatingWebhookConfiguration"]["clientConfig"]["service"]["path"] == "/mutate"
    assert hooks["ValidatingWebhookConfiguration"]["clientConfig"]["service"]["path"] == "/validate"
    # The clientConfig reaches the container's webhook port through the Service.
    service = find(objects, "Service", FULLNAME)
    for hook in hooks.values():
        ref = hook["clientConfig"]["service"]
        assert (ref["name"], ref["namespace"]) == (FULLNAME, NAMESPACE)
        (port,) = [p for p in service["spec"]["ports"] if p["port"] == ref["port"]]
        assert port["targetPort"] == "webhook"
    assert {"name": "webhook", "containerPort": 8443, "protocol": "TCP"} in container(objects)["ports"]


def test_webhook_settings_follow_values(chart: Any) -> None:
    objects = render(chart, EVERYTHING)
    hooks = webhooks(objects)
    for kind, hook in hooks.items():
        assert hook["failurePolicy"] == "Ignore" and hook["timeoutSeconds"] == 5, kind
        assert {"kube-system", "monitoring", NAMESPACE} == excluded_namespaces(hook), kind
        assert {"name": "not-dry-run", "expression": "!request.dryRun"} in hook["matchConditions"]
        assert "caBundle" not in hook["clientConfig"], "cert-manager injects it"
    assert resources(hooks["MutatingWebhookConfiguration"]) == {"pods", "pods/ephemeralcontainers"}
    assert resources(hooks["ValidatingWebhookConfiguration"]) >= WORKLOADS
    for kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
        annotation = find(objects, kind)["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
        assert annotation == f"{NAMESPACE}/{FULLNAME}-webhook"
    certificate = find(objects, "Certificate")
    assert certificate["metadata"]["name"] == f"{FULLNAME}-webhook"
    assert certificate["spec"]["secretName"] == f"{FULLNAME}-webhook-tls"
    assert f"{FULLNAME}.{NAMESPACE}.svc" in certificate["spec"]["dnsNames"]
    assert certificate["spec"]["issuerRef"] == {
        "kind": "ClusterIssuer",
        "name": "internal-ca",
        "group": "cert-manager.io",
    }
    assert "Issuer" not in kinds(objects) and "Secret" not in kinds(objects)
    own_issuer = render(chart, COMBINATIONS["cert-manager"])
    issuer = find(own_issuer, "Issuer")
    assert issuer["spec"] == {"selfSigned": {}}
    assert find(own_issuer, "Certificate")["spec"]["issuerRef"]["name"] == issuer["metadata"]["name"]


def test_webhook_off_renders_no_webhook(chart: Any) -> None:
    objects = render(chart, COMBINATIONS["webhook-off"])
    assert not webhooks(objects) and "Secret" not in kinds(objects)
    assert [p["name"] for p in find(objects, "Service", FULLNAME)["spec"]["ports"]] == ["http"]
    assert container(objects)["startupProbe"]["httpGet"]["port"] == "http"


@dataclasses.dataclass
class Pod:
    """The pullgate container as rendered, run as a local process: its ConfigMaps and
    Secret written where the volumes mount them (under ``root``), its args; listen addresses
    moved to loopback ports and paths under ``root``."""

    objects: list[dict[str, Any]]
    root: Path
    secrets: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)  # ones the chart only references
    config_maps: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)  # likewise
    ports: dict[str, int] = dataclasses.field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def local(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    @property
    def log(self) -> Path:
        return self.root / "pod.log"

    def __enter__(self) -> Pod:
        main = container(self.objects)
        volumes = {v["name"]: v for v in workload(self.objects)["spec"]["template"]["spec"]["volumes"]}
        for mount in main["volumeMounts"]:
            target = self.local(mount["mountPath"])
            target.mkdir(parents=True, exist_ok=True)
            volume = volumes[mount["name"]]
            if "configMap" in volume and volume["configMap"]["name"] in self.config_maps:
                data = self.config_maps[volume["configMap"]["name"]]
            elif "configMap" in volume:
                data = find(self.objects, "ConfigMap", volume["configMap"]["name"])["data"]
            elif "secret" in volume and volume["secret"]["secretName"] in self.secrets:
                data = self.secrets[volume["secret"]["secretName"]]
            elif "secret" in volume:
                encoded = find(self.objects, "Secret", volume["secret"]["secretName"])["data"]
                data = {k: base64.b64decode(v).decode() for k, v in encoded.items()}
            else:
                continue
            for key, text in data.items():
                (target / key).write_text(text)
        self.ports = {p["name"]: free_port() for p in main["ports"]}
        assert main["args"][0] == "--config"
        config_path = self.local(main["args"][1])
        config = yaml.safe_load(config_path.read_text())
        config["listen"] = f"127.0.0.1:{self.ports['http']}"
        config["cache"]["dir"] = str(self.local(config["cache"]["dir"]))
        config["policies"] = str(self.local(config["policies"]))
        if config["admission"]["enabled"]:
            config["admission"]["listen"] = f"127.0.0.1:{self.ports['webhook']}"
            for key in ("tls_cert", "tls_key", "client_ca"):
                if config["admission"].get(key):
                    config["admission"][key] = str(self.local(config["admission"][key]))
        for section in (config, config.get("access", {})):
            for key in ("tls_cert", "tls_key", "htpasswd", "tokens"):
                if section.get(key):
                    section[key] = str(self.local(section[key]))
        config["shutdown_delay"] = "0s"  # no Service endpoints to drain here
        config_path.write_text(yaml.safe_dump(config))
        command = [sys.executable, "-m", "proxy", "serve", "--config", str(config_path)]
        self.proc = start_daemon(command, stdout=self.log, stderr=self.log, cwd=ROOT, env=self.environment(main))
        return self

    def environment(self, main: dict[str, Any]) -> dict[str, str]:
        """This process's environment plus the container's, as the kubelet builds it: Secret
        references from ``secrets``, the downward API's pod IP as 127.0.0.1, ``$(VAR)``
        expanded; the container's ports moved to the local ones."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PULLGATE_")}
        for var in main.get("env", []):
            source = var.get("valueFrom", {})
            if "value" in var:
                value = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), var["value"])
                for port in main["ports"]:
                    value = value.replace(f":{port['containerPort']}", f":{self.ports[port['name']]}")
            elif "secretKeyRef" in source:
                value = self.secrets[source["secretKeyRef"]["name"]][source["secretKeyRef"]["key"]]
            else:
                value = {"status.podIP": "127.0.0.1", "metadata.name": "pod-0"}[source["fieldRef"]["fieldPath"]]
            env[var["name"]] = value
        return env

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_daemon(self.proc)

    def url(self, port: str, path: str, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.ports[port]}{path}"

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{") and json.loads(line).get("event") == name:
                out.append(json.loads(line))
        return out


def test_rendered_pod_starts_and_passes_its_probes(chart: Any, tmp_path: Path) -> None:
    """Every probe of the pod spec passes against the pod as rendered, and an AdmissionReview
    over TLS is answered with the certificate checked against caBundle for the Service's DNS
    name (what the API server does)."""
    values = {"policies": {"files": {"no-latest.yaml": (ROOT / "policies" / "no-latest.yaml").read_text()}}}
    objects = render(chart, values)
    main = container(objects)
    secret = find(objects, "Secret", f"{FULLNAME}-webhook-tls")["data"]
    tls = ssl.create_default_context(cadata=base64.b64decode(secret["ca.crt"]).decode())
    server_name = f"{FULLNAME}.{NAMESPACE}.svc"
    with Pod(objects, tmp_path / "pod") as pod:
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            get = main[probe]["httpGet"]
            url = pod.url(get["port"], get["path"], get.get("scheme", "HTTP").lower())
            wait_until(
                functools.partial(probe_passes, url, tls, server_name),
                timeout=20,
                what=f"{probe} {url}",
                proc=pod.proc,
                log=pod.log,
            )
        review = json.loads((ROOT / "tests" / "data" / "admission" / "pod-create-dev.json").read_text())
        review["request"]["object"]["spec"]["containers"][0]["image"] = "docker.io/library/nginx:latest"
        hook = webhooks(objects)["ValidatingWebhookConfiguration"]["clientConfig"]["service"]
        status, body = https_post(pod.url("webhook", hook["path"], "https"), review, tls, server_name)
    assert status == 200, body
    answer = json.loads(body)["response"]
    assert answer["allowed"] is True and any("latest" in w for w in answer.get("warnings", [])), answer


def test_access_control_from_a_secret_leaves_the_probes_open(chart: Any, tmp_path: Path) -> None:
    """With client authentication on, the kubelet's unauthenticated probes and Prometheus'
    scrape still work; pulls need the token from the Secret."""
    token = "s3cret-token-for-ci"
    values = {
        "webhook": {"enabled": False},
        "accessSecret": {"name": "mirror-users", "htpasswdKey": "", "tokensKey": "tokens"},
        "config": {"access": {"enabled": True, "rules": [{"repositories": ["docker.io/**"], "users": ["ci"]}]}},
    }
    objects = render(chart, values)
    main = container(objects)
    tokens = {"tokens": f"ci:sha256:{hashlib.sha256(token.encode()).hexdigest()}\n"}
    with Pod(objects, tmp_path / "pod", secrets={"mirror-users": tokens}) as pod:
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            url = pod.url("http", main[probe]["httpGet"]["path"])
            wait_until(functools.partial(status_is, url, 200), timeout=20, what=probe, proc=pod.proc, log=pod.log)
        metrics = http_status(pod.url("http", "/metrics"))
        anonymous = http_status(pod.url("http", "/v2/"))
        request = urllib.request.Request(pod.url("http", "/v2/"), headers={"Authorization": f"Bearer {token}"})
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=5) as response:
            authenticated = response.status
    assert (metrics, anonymous, authenticated) == (200, 401, 200)


def test_node_mirror_routes_containerd_through_the_rendered_pod(
    chart: Any, tmp_path: Path, containerd: Any, registry: Any, image_factory: Any, repo: str
) -> None:
    """End to end on one machine: the rendered pod mirrors a real registry, the node-mirror
    script writes hosts.toml for it, and a real containerd pulls through it."""
    values = {
        "upstreams": [{"name": "docker.io", "url": registry.url}],
        "webhook": {"enabled": False},
        "nodeMirror": {"enabled": True},
    }
    objects = render(chart, values)
    image = image_factory.image("1", layers=[100_000, 2000])
    registry.push(image.layout, image.tag, f"{repo}:1")
    hosts = tmp_path / "certs.d"
    with Pod(objects, tmp_path / "pod") as pod:
        wait_until(
            lambda: http_status(pod.url("http", "/readyz")) == 200, timeout=20, what="pod", proc=pod.proc, log=pod.log
        )
        command, env = node_mirror(objects, hosts, MIRROR_ENDPOINT=pod.url("http", ""))
        done = subprocess.run([*command, "--once"], env=env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stdout + done.stderr
        namespace = containerd.new_namespace()
        ref = f"docker.io/{repo}:1"
        containerd.ctr(
            "images",
            "pull",
            "--hosts-dir",
            str(hosts),
            "--snapshotter",
            "native",
            ref,
            namespace=namespace,
            timeout=120,
        )
        digest = containerd.image_digest(ref, namespace=namespace)
        served = [e for e in pod.events("http_request") if e.get("repository") == repo]
    assert digest == image.manifest_digest
    assert {e["endpoint"] for e in served} >= {"manifest", "blob"}, "containerd pulled through pullgate"


def test_rendered_pods_share_a_real_object_store_and_redis(
    chart: Any, tmp_path: Path, seaweedfs_engine: Any, redis_server: Any, key_prefix: str
) -> None:
    """Two pods as rendered with storage s3 (keys from a Secret) and coordination redis start
    against a real S3 engine (SeaweedFS) and a real Redis, turn ready and report both up;
    each advertises its own peer endpoint."""
    values = {
        "replicaCount": 2,
        "webhook": {"enabled": False},
        "storage": {
            "type": "s3",
            "endpoint": seaweedfs_engine.endpoint,
            "bucket": "pullgate-test",  # tests/conftest.py S3_BUCKET
            "prefix": key_prefix,
            "credentialsSecret": {"name": "pullgate-s3"},
        },
        "coordination": {"type": "redis", "url": redis_server.url, "key_prefix": f"{key_prefix.rstrip('/')}:"},
    }
    objects = render(chart, values)
    keys = {"access-key": seaweedfs_engine.keys.access_key, "secret-key": seaweedfs_engine.keys.secret_key}
    with contextlib.ExitStack() as stack:
        pods = [stack.enter_context(Pod(objects, tmp_path / f"pod-{i}", secrets={"pullgate-s3": keys})) for i in (0, 1)]
        for pod in pods:
            url = pod.url("http", "/readyz")
            wait_until(functools.partial(status_is, url, 200), timeout=30, what="readyz", proc=pod.proc, log=pod.log)
        for pod in pods:
            metrics = metric_values(pod.url("http", "/metrics"))
            assert metrics["pullgate_coordination_up"] == 1.0 and metrics["pullgate_object_store_up"] == 1.0, pod.log
        advertised = [pod.environment(container(objects))["PULLGATE_COORDINATION__ADVERTISE_URL"] for pod in pods]
    assert advertised == [f"http://127.0.0.1:{pod.ports['http']}" for pod in pods]
    assert seaweedfs_engine.keys.secret_key not in json.dumps(objects), "keys only in the Secret"


def metric_values(url: str) -> dict[str, float]:
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=5) as response:
        text = response.read().decode()
    return {name: float(value) for name, value in re.findall(r"^([a-z_:]+) ([0-9.eE+-]+|NaN)$", text, re.M)}


def status_is(url: str, status: int) -> bool:
    return http_status(url) == status


def probe_passes(url: str, context: ssl.SSLContext, server_name: str) -> bool:
    return https_status(url, context, server_name) == 200


def https_status(url: str, context: ssl.SSLContext, server_name: str) -> int | None:
    if url.startswith("http://"):
        return http_status(url)
    try:
        return https_post(url, None, context, server_name)[0]
    except OSError:
        return None


def https_post(url: str, payload: Any, context: ssl.SSLContext, server_name: str) -> tuple[int, str]:
    """GET (payload None) or POST JSON over TLS, verifying the certificate for ``server_name``
    while connecting to 127.0.0.1."""
    parts = urllib.parse.urlsplit(url)
    with (
        socket.create_connection((parts.hostname, parts.port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as conn,
    ):
        body = b"" if payload is None else json.dumps(payload).encode()
        method = "GET" if payload is None else "POST"
        head = (
            f"{method} {parts.path} HTTP/1.1\r\nHost: {server_name}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        conn.sendall(head.encode() + body)
        response = b""
        while chunk := conn.recv(65536):
            response += chunk
    status_line, _, rest = response.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2].decode(errors="replace")


def test_generated_certificate_passes_a_real_tls_handshake(chart: Any, tmp_path: Path) -> None:
    """What the API server does: verify the webhook's certificate against caBundle for the
    Service's DNS name <service>.<namespace>.svc."""
    objects = render(chart, {})
    secret = find(objects, "Secret", f"{FULLNAME}-webhook-tls")
    assert secret["type"] == "kubernetes.io/tls"
    files = {key: base64.b64decode(value) for key, value in secret["data"].items()}
    for hook in webhooks(objects).values():
        assert base64.b64decode(hook["clientConfig"]["caBundle"]) == files["ca.crt"]
    (tmp_path / "tls.crt").write_bytes(files["tls.crt"])
    (tmp_path / "tls.key").write_bytes(files["tls.key"])
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    client_context = ssl.create_default_context(cadata=files["ca.crt"].decode())
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            with server_context.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            client_context.wrap_socket(raw, server_hostname=f"{FULLNAME}.{NAMESPACE}.svc") as tls,
        ):
            assert tls.recv(2) == b"ok"
        thread.join(5)
    # A wrong name must fail: the SANs are what the API server checks.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        thread = threading.Thread(target=lambda: _accept_tls(listener, server_context), daemon=True)
        thread.start()
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            pytest.raises(ssl.SSLCertVerificationError),
        ):
            client_context.wrap_socket(raw, server_hostname="evil.example.svc")
        thread.join(5)


def _accept_tls(listener: socket.socket, context: ssl.SSLContext) -> None:
    conn, _ = listener.accept()
    try:
        context.wrap_socket(conn, server_side=True).close()
    except (ssl.SSLError, OSError):
        conn.close()


# --- node mirror ---------------------------------------------------------------------------
class _V2(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status = 200 if self.path == "/v2/" else 404
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_mirror() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _V2)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(5)


def node_mirror(objects: list[dict[str, Any]], hosts: Path, **env: str) -> tuple[list[str], dict[str, str]]:
    """The DaemonSet's command and environment, pointed at a local hosts directory."""
    daemonset = find(objects, "DaemonSet")
    (main,) = daemonset["spec"]["template"]["spec"]["containers"]
    script_cm = find(objects, "ConfigMap", f"{FULLNAME}-node-mirror")
    script = hosts.parent / "node-mirror.py"
    script.write_text(script_cm["data"]["node-mirror.py"])
    assert main["command"] == ["python", "/opt/pullgate/node-mirror.py"]
    mounts = {m["name"]: m["mountPath"] for m in main["volumeMounts"]}
    variables = {e["name"]: e["value"] for e in main["env"]}
    assert variables["HOSTS_DIR"] == mounts["hosts"]
    host_path = {v["name"]: v for v in daemonset["spec"]["template"]["spec"]["volumes"]}["hosts"]["hostPath"]
    assert host_path == {"path": "/etc/containerd/certs.d", "type": "DirectoryOrCreate"}
    variables.update(HOSTS_DIR=str(hosts), **env)
    return [sys.executable, str(script)], {**os.environ, **variables}


def test_node_mirror_writes_hosts_toml_for_each_upstream(chart: Any, tmp_path: Path, fake_mirror: int) -> None:
    objects = render(chart, EVERYTHING)
    hosts = tmp_path / "certs.d"
    (hosts / "ghcr.io").mkdir(parents=True)
    (hosts / "ghcr.io" / "hosts.toml").write_text('server = "https://ghcr.io"\n# written by the admin\n')
    command, env = node_mirror(objects, hosts)
    assert env["MIRROR_SERVICE"] == f"{FULLNAME}.{NAMESPACE}.svc.cluster.local"
    env.update(MIRROR_SERVICE="localhost", MIRROR_PORT=str(fake_mirror))  # resolved like the Service name
    done = subprocess.run([*command, "--once"], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    hub = tomllib.loads((hosts / "docker.io" / "hosts.toml").read_text())
    assert hub == {
        "server": "https://registry-1.docker.io",
        "host": {f"http://127.0.0.1:{fake_mirror}": {"capabilities": ["pull", "resolve"]}},
    }
    internal = tomllib.loads((hosts / "registry.internal:5001" / "hosts.toml").read_text())
    assert internal["server"] == "https://registry.internal:5001"
    assert "written by the admin" in (hosts / "ghcr.io" / "hosts.toml").read_text(), "never clobbers by default"


def test_node_mirror_cleans_up_on_sigterm(chart: Any, tmp_path: Path, fake_mirror: int) -> None:
    objects = render(chart, COMBINATIONS["node-mirror-endpoint"])
    hosts = tmp_path / "certs.d"
    command, env = node_mirror(objects, hosts)
    assert env["MIRROR_ENDPOINT"] == "http://10.96.0.50:5000"
    env.update(MIRROR_ENDPOINT=f"http://127.0.0.1:{fake_mirror}", RESYNC_SECONDS="0.2")
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        target = hosts / "docker.io" / "hosts.toml"
        deadline = time.monotonic() + 10
        while not target.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert target.exists(), "hosts.toml not written"
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output
    assert not target.exists(), output
    assert "hosts_toml_removed" in output


def test_node_mirror_does_not_point_nodes_at_a_dead_mirror(chart: Any, tmp_path: Path) -> None:
    objects = render(chart, COMBINATIONS["node-mirror-endpoint"])
    hosts = tmp_path / "certs.d"
    with socket.create_server(("127.0.0.1", 0)) as closed:
        dead = closed.getsockname()[1]
    command, env = node_mirror(objects, hosts, MIRROR_ENDPOINT=f"http://127.0.0.1:{dead}")
    done = subprocess.run([*command, "--once"], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "mirror_unreachable" in done.stdout
    assert not (hosts / "docker.io" / "hosts.toml").exists()


def test_admission_deadline_is_below_every_allowed_timeout(chart: Any, tmp_path: Path) -> None:
    for timeout in (2, 3, 10, 30):
        objects = render(chart, {"webhook": {"timeoutSeconds": timeout}})
        config = rendered_config(objects, tmp_path)
        assert 0 < config.admission.deadline < timeout
        assert parse_duration(f"{timeout}s") == webhooks(objects)["ValidatingWebhookConfiguration"]["timeoutSeconds"]


# --- who may call the webhook (issue 13 finding 10) -----------------------------------------
KONNECTIVITY = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
    "podSelector": {"matchLabels": {"k8s-app": "konnectivity-agent"}},
}


@pytest.mark.parametrize(
    ("network_policy", "webhook_from"),
    [
        ({"apiServer": {"cidrs": ["10.0.0.0/24", "fd00:10::/64"]}},
         [{"ipBlock": {"cidr": "10.0.0.0/24"}}, {"ipBlock": {"cidr": "fd00:10::/64"}}]),
        ({"apiServer": {"peers": [KONNECTIVITY]}}, [KONNECTIVITY]),
        ({"apiServer": {"cidrs": ["10.0.0.0/24"], "peers": [KONNECTIVITY]}},
         [{"ipBlock": {"cidr": "10.0.0.0/24"}}, KONNECTIVITY]),
        # webhookFrom replaces the API server's peers (anyone, if the operator insists).
        ({"apiServer": {"cidrs": ["10.0.0.0/24"]}, "webhookFrom": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]},
         [{"ipBlock": {"cidr": "0.0.0.0/0"}}]),
    ],
)  # fmt: skip
def test_network_policy_admits_only_the_api_server_to_the_webhook(
    chart: Any, network_policy: dict[str, Any], webhook_from: list[dict[str, Any]]
) -> None:
    objects = render(chart, {"networkPolicy": {"enabled": True, **network_policy}})
    policy = find(objects, "NetworkPolicy")
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(strip(policy), version, strict=True)
    (webhook_rule,) = [r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == "webhook"]
    assert webhook_rule["from"] == webhook_from, "never a rule without 'from' (that admits anyone)"


def test_network_policy_without_the_api_servers_address_fails_to_install(chart: Any) -> None:
    """The chart cannot know where the API server calls from; it will not guess "anyone"."""
    with pytest.raises(helm.HelmError) as failure:
        chart.render({"networkPolicy": {"enabled": True}}, name=NAME, namespace=NAMESPACE, is_install=True)
    assert "networkPolicy.apiServer.cidrs" in str(failure.value)
    without_webhook = render(chart, {"networkPolicy": {"enabled": True}, "webhook": {"enabled": False}})
    assert [r["ports"][0]["port"] for r in find(without_webhook, "NetworkPolicy")["spec"]["ingress"]] == ["http"]


@pytest.mark.parametrize(
    ("client_ca", "volume", "error"),
    [
        ({"configMap": "apiserver-client-ca"}, {"configMap": {"name": "apiserver-client-ca"}}, None),
        ({"secret": "apiserver-client-ca", "key": "ca.pem"}, {"secret": {"secretName": "apiserver-client-ca"}}, None),
        ({"configMap": "a", "secret": "b"}, None, "set configMap or secret, not both"),
        ({"configMap": "a", "key": "../etc/passwd"}, None, "key"),
    ],
)
def test_webhook_client_ca_is_mounted_where_the_config_points(
    chart: Any, tmp_path: Path, client_ca: dict[str, str], volume: dict[str, Any] | None, error: str | None
) -> None:
    values = {"webhook": {"clientCA": client_ca}}
    if error is not None:
        with pytest.raises(helm.HelmError) as failure:
            chart.render(values, name=NAME, namespace=NAMESPACE, is_install=True)
        assert error in str(failure.value)
        return
    assert volume is not None
    objects = render(chart, values)
    config = rendered_config(objects, tmp_path)
    key = client_ca.get("key", "ca.crt")
    assert str(config.admission.client_ca) == f"/etc/pullgate/admission-client-ca/{key}"
    volumes = {v["name"]: v for v in workload(objects)["spec"]["template"]["spec"]["volumes"]}
    kind = next(iter(volume))
    assert volumes["webhook-client-ca"][kind].items() >= volume[kind].items()
    assert volumes["webhook-client-ca"][kind]["items"] == [{"key": key, "path": key}]
    mounts = {m["name"]: m["mountPath"] for m in container(objects)["volumeMounts"]}
    assert mounts["webhook-client-ca"] == "/etc/pullgate/admission-client-ca"


def test_rendered_pod_with_client_ca_answers_only_the_api_server(chart: Any, tmp_path: Path) -> None:
    """The pod as rendered with webhook.clientCA: the kubelet's probes (no certificate) pass,
    a review without a client certificate gets 403, one from another CA fails the TLS
    handshake, and the API server's certificate is answered."""
    pki = tmp_path / "pki"
    apiserver_ca, other_ca = make_ca(pki, "apiserver-client-ca"), make_ca(pki, "other-ca")
    apiserver, stranger = apiserver_ca.issue(pki, "kube-apiserver"), other_ca.issue(pki / "other", "kube-apiserver")
    values = {
        "policies": {"files": {"no-latest.yaml": (ROOT / "policies" / "no-latest.yaml").read_text()}},
        "webhook": {"clientCA": {"configMap": "apiserver-client-ca"}},
    }
    objects = render(chart, values)
    main = container(objects)
    ca = base64.b64decode(find(objects, "Secret", f"{FULLNAME}-webhook-tls")["data"]["ca.crt"]).decode()
    server_name = f"{FULLNAME}.{NAMESPACE}.svc"
    anonymous = ssl.create_default_context(cadata=ca)
    config_maps = {"apiserver-client-ca": {"ca.crt": apiserver_ca.pem.read_text()}}
    with Pod(objects, tmp_path / "pod", config_maps=config_maps) as pod:
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            get = main[probe]["httpGet"]
            url = pod.url(get["port"], get["path"], get.get("scheme", "HTTP").lower())
            wait_until(
                functools.partial(probe_passes, url, anonymous, server_name),
                timeout=20,
                what=f"{probe} {url}",
                proc=pod.proc,
                log=pod.log,
            )
        review = json.loads((ROOT / "tests" / "data" / "admission" / "pod-create-dev.json").read_text())
        url = pod.url("webhook", webhooks(objects)["ValidatingWebhookConfiguration"]["clientConfig"]["service"]["path"])
        url = url.replace("http://", "https://")
        assert https_post(url, review, anonymous, server_name)[0] == 403
        foreign = ssl.create_default_context(cadata=ca)
        foreign.load_cert_chain(*stranger)
        assert answer_or_refusal(url, review, foreign, server_name) == "refused"
        trusted = ssl.create_default_context(cadata=ca)
        trusted.load_cert_chain(*apiserver)
        status, body = https_post(url, review, trusted, server_name)
    assert status == 200 and json.loads(body)["response"]["allowed"] is True


def answer_or_refusal(url: str, payload: Any, context: ssl.SSLContext, server_name: str) -> tuple[int, str] | str:
    """``https_post``, or ``"refused"`` when the server ended the TLS session without an
    HTTP answer (with TLS 1.3 a rejected client certificate surfaces on the first read)."""
    try:
        return https_post(url, payload, context, server_name)
    except (ssl.SSLError, ConnectionError):
        return "refused"
    except IndexError:  # no status line: the connection closed before any response
        return "refused"
