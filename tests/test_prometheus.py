"""Monitoring that ships with the chart, against real Prometheus (Debian's ``prometheus``
package) and a running daemon: Prometheus scrapes ``/metrics``, the PrometheusRule's alerts
load (``promtool check rules``), fire on the conditions they describe (``promtool test
rules``) and evaluate without error against the scraped series; the Grafana dashboard is
well-formed and every query in it evaluates and names only metrics pullgate exports.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from proxy.ops.metrics import Metrics
from tests.support.admission import pod_review
from tests.support.daemon import Daemon, OriginThread
from tests.support.origin import Origin
from tests.support.procs import free_port, http_status, start_daemon, stop_daemon, wait_until

helm = pytest.importorskip("helm_python", reason="pip install '.[test]' (helm-python-sdk)")

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "charts" / "pullgate" / "dashboards" / "pullgate.json"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# Labels Prometheus or the ServiceMonitor put on every scraped series.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "container", "endpoint"}
KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "and",
    "or",
    "unless",
    "inf",
    "nan",
}
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m", "$job": ".*", "$instance": ".*"}

needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None or shutil.which("promtool") is None,
    reason="apt-get install prometheus (.ci/run does)",
)


# --- what the daemon exports -----------------------------------------------------------------
def exported() -> dict[str, set[str]]:
    """Every series name pullgate can export, with its label names."""
    names: dict[str, set[str]] = {}
    metrics = Metrics(CollectorRegistry())
    for collector in vars(metrics).values():
        describe = getattr(collector, "describe", None)
        if describe is None or collector is metrics.registry:
            continue
        labels = set(getattr(collector, "_labelnames", ()))
        for family in describe():
            labels = set(getattr(collector, "label_names", {}).get(family.name, labels))  # several families
            if family.type == "counter":
                names[f"{family.name}_total"] = labels
            elif family.type == "histogram":
                names[f"{family.name}_bucket"] = labels | {"le"}
                names[f"{family.name}_sum"] = names[f"{family.name}_count"] = labels
            else:
                names[family.name] = labels
    return names


@dataclass(frozen=True)
class Query:
    metrics: dict[str, set[str]]  # metric name -> label names used in its matchers
    grouping: set[str]  # labels in by (...) / without (...) / on (...)


def parse_query(expr: str) -> Query:
    """The metric names and label names a PromQL expression uses (enough of PromQL for
    the shipped queries: selectors, matchers, ranges, grouping, functions)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    metrics: dict[str, set[str]] = {}
    for match in re.finditer(r"\b([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}", text):
        labels = set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", match.group(2)))
        metrics.setdefault(match.group(1), set()).update(labels)
    grouping: set[str] = set()
    for match in re.finditer(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", text):
        grouping |= {label.strip() for label in match.group(1).split(",") if label.strip()}
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)
    bare = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", bare)
    for match in re.finditer(r"(?<![\w$.])([a-zA-Z_:][\w:]*)\b(?!\s*\()", bare):
        if match.group(1) not in KEYWORDS:
            metrics.setdefault(match.group(1), set())
    return Query(metrics, grouping)


def check_names(expr: str, where: str, known: dict[str, set[str]]) -> list[str]:
    query = parse_query(expr)
    problems = []
    if not query.metrics:
        problems.append(f"{where}: no metric in {expr!r}")
    available = set(TARGET_LABELS)
    for name, labels in query.metrics.items():
        if name not in known:
            problems.append(f"{where}: {name} is not exported by pullgate")
            continue
        available |= known[name]
        unknown = labels - known[name] - TARGET_LABELS
        if unknown:
            problems.append(f"{where}: {name} has no label {sorted(unknown)}")
    if query.grouping - available:
        problems.append(f"{where}: grouping by {sorted(query.grouping - available)}, which no metric here has")
    return problems


def dashboard_queries() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    out = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            inner = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", variable["definition"])
            assert inner, variable["definition"]
            out.append((f"variable {variable['name']}", inner.group(1)))
    return out


def grafana_to_promql(expr: str) -> str:
    for variable, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unhandled Grafana variable in {expr!r}"
    return expr


def alert_rules() -> list[dict[str, Any]]:
    with contextlib.closing(helm.Chart.load(str(ROOT / "charts" / "pullgate"))) as chart:
        files = chart.render(
            {"metrics": {"prometheusRule": {"enabled": True}}}, name="pg", namespace="pullgate", is_install=True
        )
    rule = yaml.safe_load(files["pullgate/templates/prometheusrule.yaml"])
    assert rule["kind"] == "PrometheusRule" and rule["apiVersion"] == "monitoring.coreos.com/v1"
    return list(rule["spec"]["groups"])


@pytest.fixture(scope="module")
def rules_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rules") / "pullgate-rules.yml"
    path.write_text(yaml.safe_dump({"groups": alert_rules()}, sort_keys=False))
    return path


# --- static checks ----------------------------------------------------------------------------
def test_query_parser() -> None:
    query = parse_query(
        'histogram_quantile(0.99, sum by (le, endpoint) (rate(a_bucket{job=~"$job", x!="}"}[5m]))) '
        "/ on (instance) b offset 5m > 3 * (c or vector(0))"
    )
    assert query.metrics == {"a_bucket": {"job", "x"}, "b": set(), "c": set()}
    assert query.grouping == {"le", "endpoint", "instance"}


def test_dashboard_is_well_formed_grafana_json() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] == "pullgate" and board["title"] and board["schemaVersion"] >= 36
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    titles = " ".join(p["title"].lower() for p in board["panels"])
    for topic in (
        "cache hit ratio",
        "bytes served by source",
        "upstream latency",
        "rate-limit remaining",
        "admission reviews",
        "policy decisions",
        "verification results",
        "webhook latency",
    ):
        assert topic in titles, topic
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert 'job=~"$job"' in target["expr"], f"{panel['title']}: honour the job/instance filters"


def test_dashboard_and_alerts_name_only_exported_metrics() -> None:
    known = exported()
    problems = []
    for where, expr in dashboard_queries():
        problems += check_names(expr, where, known)
    for group in alert_rules():
        for rule in group["rules"]:
            problems += check_names(rule["expr"], f"alert {rule['alert']}", known)
    assert problems == []


def test_every_alert_is_documented_and_labelled() -> None:
    docs = (ROOT / "docs" / "deploy.md").read_text().lower()
    names = []
    for group in alert_rules():
        for rule in group["rules"]:
            names.append(rule["alert"])
            assert rule["labels"]["severity"] in ("info", "warning", "critical"), rule["alert"]
            assert {"summary", "description", "runbook_url"} <= set(rule["annotations"]), rule["alert"]
            assert rule["annotations"]["runbook_url"].endswith("#" + rule["alert"].lower())
            assert f"### {rule['alert'].lower()}" in docs, f"docs/deploy.md has no section for {rule['alert']}"
    required = {
        "PullgateUpstreamErrors",
        "PullgateRateLimitRemainingLow",
        "PullgateCacheNearQuota",
        "PullgateDigestMismatch",
        "PullgateAdmissionDenialsSpike",
        "PullgateWebhookSlow",
        "PullgateCoordinationDown",
        "PullgateObjectStoreDown",
    }
    assert required <= set(names)


# --- promtool ---------------------------------------------------------------------------------
@needs_prometheus
def test_promtool_check_rules(rules_file: Path) -> None:
    result = subprocess.run(
        ["promtool", "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


# Synthetic series (1 sample per minute) and, per alert, what its expression must return.
SERIES = {
    # upstream errors: docker.io fails half its requests; ghcr.io almost never; quay.io is only rate-limited.
    'pullgate_upstream_errors_total{upstream="docker.io", kind="status_5xx"}': "0+30x100",
    'pullgate_upstream_request_duration_seconds_count{upstream="docker.io", method="GET"}': "0+60x100",
    'pullgate_upstream_errors_total{upstream="ghcr.io", kind="connect"}': "0+1x100",
    'pullgate_upstream_request_duration_seconds_count{upstream="ghcr.io", method="GET"}': "0+6000x100",
    'pullgate_upstream_errors_total{upstream="quay.io", kind="rate_limited"}': "0+10x100",
    'pullgate_upstream_request_duration_seconds_count{upstream="quay.io", method="GET"}': "0+10x100",
    # rate limits: docker.io nearly used up, ghcr.io fine, quay.io sends no limit (0).
    'pullgate_upstream_ratelimit_remaining{upstream="docker.io"}': "5x100",
    'pullgate_upstream_ratelimit_limit{upstream="docker.io"}': "100x100",
    'pullgate_upstream_ratelimit_remaining{upstream="ghcr.io"}': "90x100",
    'pullgate_upstream_ratelimit_limit{upstream="ghcr.io"}': "100x100",
    'pullgate_upstream_ratelimit_remaining{upstream="quay.io"}': "0x100",
    'pullgate_upstream_ratelimit_limit{upstream="quay.io"}': "0x100",
    # cache: instance a at 97 % of its quota, b at half.
    'pullgate_cache_size_bytes{instance="a"}': "97x100",
    'pullgate_cache_max_size_bytes{instance="a"}': "100x100",
    'pullgate_cache_size_bytes{instance="b"}': "50x100",
    'pullgate_cache_max_size_bytes{instance="b"}': "100x100",
    'pullgate_ready{instance="a"}': "0x100",
    'pullgate_ready{instance="b"}': "1x100",
    # one blob digest mismatch from docker.io at 3m.
    'pullgate_digest_mismatches_total{upstream="docker.io", kind="blob"}': "0 0 0 1x97",
    'pullgate_digest_mismatches_total{upstream="ghcr.io", kind="manifest"}': "0x100",
    # admission: 0.1 denials/s for an hour, then 2/s; /mutate times out; /validate is slow.
    'pullgate_admission_reviews_total{endpoint="validate", outcome="denied"}': "0+6x60 360+120x40",
    'pullgate_admission_reviews_total{endpoint="validate", outcome="allowed"}': "0+600x100",
    'pullgate_admission_reviews_total{endpoint="mutate", outcome="timeout"}': "0+6x100",
    'pullgate_admission_reviews_total{endpoint="validate", outcome="error"}': "0x100",
    'pullgate_admission_review_duration_seconds_bucket{endpoint="validate", le="1"}': "0x100",
    'pullgate_admission_review_duration_seconds_bucket{endpoint="validate", le="2.5"}': "0x100",
    'pullgate_admission_review_duration_seconds_bucket{endpoint="validate", le="5"}': "0+60x100",
    'pullgate_admission_review_duration_seconds_bucket{endpoint="validate", le="+Inf"}': "0+60x100",
    'pullgate_admission_review_duration_seconds_bucket{endpoint="mutate", le="0.01"}': "0+60x100",
    'pullgate_admission_review_duration_seconds_bucket{endpoint="mutate", le="+Inf"}': "0+60x100",
    'pullgate_signature_verifications_total{result="error", key="release"}': "0 0 1+1x98",
    'pullgate_signature_verifications_total{result="failed", key="other"}': "0+1x100",
    'pullgate_policy_reloads_total{result="error"}': "0 0 1x98",
    'pullgate_policy_reloads_total{result="ok"}': "0+1x100",
    # shared tier: a cannot reach Redis, b cannot reach the object store, c's uploads fail from 3m.
    'pullgate_coordination_up{instance="a"}': "0x100",
    'pullgate_coordination_up{instance="b"}': "1x100",
    'pullgate_coordination_up{instance="c"}': "1x100",
    'pullgate_object_store_up{instance="a"}': "1x100",
    'pullgate_object_store_up{instance="b"}': "0x100",
    'pullgate_object_store_up{instance="c"}': "1x100",
    'pullgate_object_uploads_total{instance="c", result="failed"}': "0 0 0 1+1x97",
    'pullgate_object_uploads_total{instance="c", result="stored"}': "0+5x100",
    'pullgate_object_uploads_total{instance="a", result="stored"}': "0+5x100",
}
# alert -> (evaluation time, grouping labels, the label sets the expression must return)
EXPECTED: dict[str, tuple[str, str, list[str]]] = {
    "PullgateUpstreamErrors": ("20m", "upstream", ['{upstream="docker.io"}']),
    "PullgateUpstreamRateLimited": ("20m", "upstream", ['{upstream="quay.io"}']),
    "PullgateRateLimitRemainingLow": ("20m", "upstream", ['{upstream="docker.io"}']),
    "PullgateCacheNearQuota": ("20m", "instance", ['{instance="a"}']),
    "PullgateNotReady": ("20m", "instance", ['{instance="a"}']),
    "PullgateDigestMismatch": ("10m", "upstream, kind", ['{upstream="docker.io", kind="blob"}']),
    "PullgateAdmissionDenialsSpike": ("75m", "", ["{}"]),
    "PullgateAdmissionErrors": ("20m", "endpoint, outcome", ['{endpoint="mutate", outcome="timeout"}']),
    "PullgateWebhookSlow": ("20m", "endpoint", ['{endpoint="validate"}']),
    "PullgateSignatureVerificationErrors": ("10m", "key", ['{key="release"}']),
    "PullgatePolicyReloadFailed": ("5m", "", ["{}"]),
    "PullgateCoordinationDown": ("20m", "instance", ['{instance="a"}']),
    "PullgateObjectStoreDown": ("20m", "instance", ['{instance="b"}']),
    "PullgateObjectUploadsFailing": ("20m", "instance", ['{instance="c"}']),
}
# ... and when it must stay quiet.
QUIET = {"PullgateAdmissionDenialsSpike": "30m", "PullgateDigestMismatch": "30m", "PullgatePolicyReloadFailed": "30m"}


@needs_prometheus
def test_promtool_alerts_fire_on_what_they_describe(rules_file: Path, tmp_path: Path) -> None:
    expressions = {rule["alert"]: rule["expr"] for group in alert_rules() for rule in group["rules"]}
    assert set(EXPECTED) == set(expressions), "every alert has a scenario"
    cases = []
    for alert, (at, by, label_sets) in EXPECTED.items():
        grouped = f"count by ({by}) ({expressions[alert]})"
        cases.append(
            {"expr": grouped, "eval_time": at, "exp_samples": [{"labels": labels, "value": 1} for labels in label_sets]}
        )
        if alert in QUIET:
            cases.append({"expr": grouped, "eval_time": QUIET[alert], "exp_samples": []})
    spec = {
        "rule_files": [str(rules_file)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": series, "values": values} for series, values in SERIES.items()],
                "promql_expr_test": cases,
            }
        ],
    }
    test_file = tmp_path / "alerts-test.yml"
    test_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    result = subprocess.run(
        ["promtool", "test", "rules", str(test_file)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- real Prometheus scraping a real daemon -------------------------------------------------
@dataclass
class Stack:
    prometheus: str
    daemon: Daemon

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.prometheus}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with _OPENER.open(url, timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        try:
            data = self.api("query", query=expr)
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{expr!r}: {exc.code} {exc.read()[:500]!r}") from None
        return list(data["result"])


def pull(daemon: Daemon, path: str) -> None:
    # 404s and the like are part of the traffic: only the metrics matter here.
    with (
        contextlib.suppress(urllib.error.HTTPError, urllib.error.URLError, OSError),
        _OPENER.open(daemon.url(path), timeout=10) as response,
    ):
        response.read()


POLICY = """\
apiVersion: pullgate.dev/v1
kind: ImagePolicy
metadata: {name: allowed-registries}
spec:
  mode: enforce
  match: {images: ["**"]}
  rules: {allowedRegistries: ["docker.io"]}
"""


def review(webhook: str, endpoint: str, image: str) -> dict[str, Any]:
    body = pod_review(image, fixture="pod-create-dev.json")
    request = urllib.request.Request(
        f"{webhook}/{endpoint}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with _OPENER.open(request, timeout=10) as response:
        return dict(json.loads(response.read())["response"])


def traffic(daemon: Daemon, origin: Origin, webhook: str, tag: str) -> None:
    image = origin.add_image("library/app", tag, layers=[4096])
    for _ in range(2):  # a miss, then a hit
        pull(daemon, f"/v2/library/app/manifests/{tag}?ns=docker.io")
        for digest in image.blobs:
            pull(daemon, f"/v2/library/app/blobs/{digest}?ns=docker.io")
    pull(daemon, "/v2/library/nothing/manifests/1?ns=docker.io")
    assert review(webhook, "validate", f"docker.io/library/app:{tag}")["allowed"] is True
    assert review(webhook, "validate", "quay.io/evil/app:1")["allowed"] is False
    assert review(webhook, "mutate", f"docker.io/library/app:{tag}")["allowed"] is True


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, rules_file: Path) -> Iterator[Stack]:
    if shutil.which("prometheus") is None:
        pytest.skip("apt-get install prometheus (.ci/run does)")
    tmp = tmp_path_factory.mktemp("prometheus")
    origin = Origin()
    # Docker Hub's headers: 5 pulls left of 100 (PullgateRateLimitRemainingLow must go pending).
    headers = {"ratelimit-limit": "100;w=21600", "ratelimit-remaining": "5;w=21600"}
    (tmp / "policies").mkdir()
    (tmp / "policies" / "allowed-registries.yaml").write_text(POLICY)
    webhook_port = free_port()
    admission = {"enabled": True, "listen": f"127.0.0.1:{webhook_port}"}  # plain HTTP here: no API server
    webhook = f"http://127.0.0.1:{webhook_port}"
    with (
        OriginThread(origin, headers) as upstream,
        Daemon(tmp, upstream.url, admission=admission, policies=str(tmp / "policies")) as daemon,
    ):
        traffic(daemon, origin, webhook, "1")
        port = free_port()
        config = tmp / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "500ms", "evaluation_interval": "500ms", "scrape_timeout": "500ms"},
                    "rule_files": [str(rules_file)],
                    "scrape_configs": [
                        {"job_name": "pullgate", "static_configs": [{"targets": [f"127.0.0.1:{daemon.port}"]}]}
                    ],
                }
            )
        )
        log = tmp / "prometheus.log"
        proc = start_daemon(
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=log,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until(lambda: http_status(f"{url}/-/ready") == 200, timeout=30, what="prometheus", proc=proc, log=log)
            running = Stack(url, daemon)
            wait_until(lambda: _scraped(running, 3), timeout=30, what="three scrapes", proc=proc, log=log)
            traffic(daemon, origin, webhook, "2")  # after Prometheus saw the counters: rates are non-zero
            wait_until(
                lambda: _scraped(running, 6) and _rules_evaluated(running),
                timeout=30,
                what="scrapes and rule evaluation",
                proc=proc,
                log=log,
            )
            yield running
        finally:
            stop_daemon(proc)


def _scraped(stack: Stack, samples: int) -> bool:
    try:
        result = stack.query('count_over_time(pullgate_ready{job="pullgate"}[1m])')
    except (AssertionError, OSError):
        return False
    return bool(result) and float(result[0]["value"][1]) >= samples


def _rules_evaluated(stack: Stack) -> bool:
    groups = stack.api("rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    return bool(rules) and all(
        r.get("lastEvaluation", "").startswith("20") and not r["lastEvaluation"].startswith("0001") for r in rules
    )


@needs_prometheus
def test_prometheus_scrapes_the_daemon(stack: Stack) -> None:
    (target,) = stack.api("targets")["activeTargets"]
    assert target["health"] == "up", target
    assert target["lastError"] == ""
    for expr in (
        'pullgate_cache_requests_total{kind="blob", result="hit"}',
        'pullgate_cache_requests_total{kind="blob", result="miss"}',
        'pullgate_bytes_served_total{source="cache"}',
        "pullgate_upstream_request_duration_seconds_bucket",
        'pullgate_upstream_ratelimit_remaining{upstream="docker.io"}',
        "pullgate_cache_size_bytes",
        'pullgate_http_requests_total{endpoint="blob", status="200"}',
        'pullgate_admission_reviews_total{endpoint="validate", outcome="denied"}',
        'pullgate_admission_decisions_total{policy="allowed-registries", result="violation"}',
        "pullgate_admission_review_duration_seconds_bucket",
        "pullgate_policies_loaded == 1",
    ):
        assert stack.query(expr), f"no series for {expr}"
    (remaining,) = stack.query('pullgate_upstream_ratelimit_remaining{upstream="docker.io"}')
    assert float(remaining["value"][1]) == 5


@needs_prometheus
def test_alert_rules_load_and_evaluate_against_scraped_series(stack: Stack) -> None:
    groups = stack.api("rules")["groups"]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    expected = {r["alert"] for g in alert_rules() for r in g["rules"]}
    assert set(rules) == expected
    for name, rule in rules.items():
        assert rule["health"] == "ok", f"{name}: {rule.get('lastError')}"
        stack.query(rule["query"])  # and again by hand: no error
    low = rules["PullgateRateLimitRemainingLow"]
    assert low["state"] == "pending", "5 of 100 pulls left must trip the alert (for: 5m)"
    assert low["alerts"][0]["labels"]["upstream"] == "docker.io"
    quiet = {name for name, rule in rules.items() if rule["state"] == "inactive"}
    assert {"PullgateUpstreamErrors", "PullgateDigestMismatch", "PullgateNotReady"} <= quiet


@needs_prometheus
def test_dashboard_queries_evaluate(stack: Stack) -> None:
    empty = []
    for where, expr in dashboard_queries():
        if not stack.query(grafana_to_promql(expr)):
            empty.append(where)
    # Every panel fed by the traffic above shows it (signature panels need a signed image).
    for must_have_data in (
        "Cache hit ratio",
        "Bytes served by source",
        "Upstream latency",
        "Rate-limit remaining",
        "Requests by endpoint and status",
        "Cache size vs quota",
        "Admission reviews by outcome",
        "Policy decisions",
        "Webhook latency",
        "Policies loaded",
        "Ready replicas",
    ):
        assert not [w for w in empty if must_have_data in w], f"{must_have_data}: no data ({empty})"
    (ratio,) = stack.query(grafana_to_promql(dict(dashboard_queries())["panel 'Cache hit ratio' A"]))
    assert 0 < float(ratio["value"][1]) <= 1


def test_counters_the_alerts_watch_exist_from_startup(tmp_path: Path) -> None:
    """``increase()`` needs a sample before the first event: the series must exist at 0."""
    with (
        OriginThread(Origin()) as upstream,
        Daemon(tmp_path, upstream.url) as daemon,
        _OPENER.open(daemon.url("/metrics"), timeout=10) as response,
    ):
        text = response.read().decode()
    for series in (
        'pullgate_digest_mismatches_total{kind="blob",upstream="docker.io"} 0.0',
        'pullgate_digest_mismatches_total{kind="manifest",upstream="docker.io"} 0.0',
        'pullgate_upstream_errors_total{kind="rate_limited",upstream="docker.io"} 0.0',
        'pullgate_policy_reloads_total{result="error"} 0.0',
    ):
        assert series in text, series
