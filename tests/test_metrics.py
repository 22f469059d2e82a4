"""``RequestSeries`` (``proxy.ops.metrics``) exports exactly what the prometheus_client
``Counter`` and ``Histogram`` it replaces would: same series, labels, values and order
(``_created`` timestamps aside)."""

from __future__ import annotations

import re

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from proxy.ops.metrics import _LATENCY_BUCKETS, Metrics

Request = tuple[str, str, int, float]  # endpoint, method, status, seconds


def exposition(registry: CollectorRegistry) -> list[str]:
    text = generate_latest(registry).decode()
    return [re.sub(r"(_created\{[^}]*\}) \S+$", r"\1 T", line) for line in text.splitlines()]


def reference(requests: list[Request]) -> list[str]:
    registry = CollectorRegistry()
    counter = Counter("pullgate_http_requests_total", "Mirror HTTP requests by endpoint, method and status code.",
                      ["endpoint", "method", "status"], registry=registry)  # fmt: skip
    histogram = Histogram("pullgate_http_request_duration_seconds",
                          "Mirror HTTP request duration (to the last byte) by endpoint.", ["endpoint"],
                          buckets=_LATENCY_BUCKETS, registry=registry)  # fmt: skip
    for endpoint, method, status, seconds in requests:
        counter.labels(endpoint, method, str(status)).inc()
        histogram.labels(endpoint).observe(seconds)
    return exposition(registry)


@pytest.mark.parametrize(
    "requests",
    [
        [],
        [("manifest", "GET", 200, 0.0003)],
        [("manifest", "GET", 200, 0.005), ("manifest", "GET", 200, 0.0051)],  # on a bucket's bound, just past it
        [("blob", "HEAD", 404, 0.7), ("manifest", "GET", 200, 130.0), ("other", "GET", 404, 0.01)],  # past the last
        [("blob", "GET", 200, 1.0), ("blob", "GET", 499, 2.5), ("blob", "GET", 200, 60.0)],
    ],
)
def test_request_series_exports_what_counter_and_histogram_would(requests: list[Request]) -> None:
    metrics = Metrics(CollectorRegistry())
    for endpoint, method, status, seconds in requests:
        metrics.request_done(endpoint, method, status, seconds)
    ours = exposition(metrics.registry)
    theirs = reference(requests)
    positions = [ours.index(line) for line in theirs]  # every line, in the same order
    assert positions == sorted(positions)
    for endpoint, method, status, _ in requests:
        labels = {"endpoint": endpoint, "method": method, "status": str(status)}
        expected = sum(1 for r in requests if r[:3] == (endpoint, method, status))
        assert metrics.registry.get_sample_value("pullgate_http_requests_total", labels) == expected
