"""Prometheus metrics, registered on an injected ``CollectorRegistry`` (never the global one),
so each app and each test has its own."""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


# Label values the alerts watch with increase(): created at 0 so the first event counts.
UPSTREAM_ERROR_KINDS = (
    "connect", "timeout", "read", "short_read", "status_5xx", "rate_limited", "auth",
    "realm_refused", "redirect_refused",
)  # fmt: skip


class RequestSeries(Collector):
    """``pullgate_http_requests_total`` and ``pullgate_http_request_duration_seconds``: what
    a ``Counter`` and a ``Histogram`` would export (``_created`` series included), kept as
    plain numbers until a scrape. Every mirror request updates both; prometheus_client's
    labelled children cost ~1 µs per request (method layers and a lock per value), a
    measurable share of a warm manifest request. Updated on the event loop only."""

    _REQUESTS = ("pullgate_http_requests", "Mirror HTTP requests by endpoint, method and status code.")
    _SECONDS = (
        "pullgate_http_request_duration_seconds",
        "Mirror HTTP request duration (to the last byte) by endpoint.",
    )

    def __init__(self, buckets: Iterable[float]) -> None:
        # Each family's label names (what a Counter's or Histogram's ``_labelnames`` says).
        self.label_names = {self._REQUESTS[0]: ("endpoint", "method", "status"), self._SECONDS[0]: ("endpoint",)}
        self._bounds = (*sorted(float(b) for b in buckets), float("inf"))
        self._le: tuple[str, ...] = tuple(floatToGoString(b) for b in self._bounds)  # type: ignore[no-untyped-call]
        self._requests: dict[tuple[str, str, int], list[float]] = {}  # [count, created]
        self._seconds: dict[str, tuple[list[int], list[float]]] = {}  # per-bucket counts, [sum, created]

    def done(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        counted = self._requests.get((endpoint, method, status))
        if counted is None:
            counted = self._requests[(endpoint, method, status)] = [0.0, time.time()]
        counted[0] += 1
        observed = self._seconds.get(endpoint)
        if observed is None:
            observed = self._seconds[endpoint] = ([0] * len(self._bounds), [0.0, time.time()])
        observed[0][bisect_left(self._bounds, seconds)] += 1  # the first bucket with seconds <= le
        observed[1][0] += seconds

    def describe(self) -> Iterable[Metric]:
        return [
            CounterMetricFamily(*self._REQUESTS, labels=self.label_names[self._REQUESTS[0]]),
            HistogramMetricFamily(*self._SECONDS, labels=self.label_names[self._SECONDS[0]]),
        ]

    def collect(self) -> Iterable[Metric]:
        requests = CounterMetricFamily(*self._REQUESTS, labels=self.label_names[self._REQUESTS[0]])
        for (endpoint, method, status), (count, created) in list(self._requests.items()):
            requests.add_metric((endpoint, method, str(status)), count, created=created)
        seconds = HistogramMetricFamily(*self._SECONDS, labels=self.label_names[self._SECONDS[0]])
        for endpoint, (counts, (total, created)) in list(self._seconds.items()):
            cumulative, buckets = 0, []
            for le, count in zip(self._le, counts, strict=True):
                cumulative += count
                buckets.append((le, float(cumulative)))
            seconds.add_metric((endpoint,), buckets, total)
            seconds.samples.append(Sample(f"{seconds.name}_created", {"endpoint": endpoint}, created))
        return [requests, seconds]


class Metrics:
    """Every metric pullgate exports. Names are part of the public surface (dashboards,
    alerts in ``charts/pullgate``): rename only together with them."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = RequestSeries(_LATENCY_BUCKETS)  # request_done
        registry.register(self.requests)
        self.cache_results = Counter(
            "pullgate_cache_requests_total",
            "Cache lookups by object kind (manifest, blob, tag) and result (hit, miss, revalidated, stale, negative, "
            "redirect: a blob GET answered 307 to the object store).",
            ["kind", "result"],
            registry=registry,
        )
        self.bytes_served = Counter(
            "pullgate_bytes_served_total",
            "Bytes sent to clients by source (cache, upstream).",
            ["source"],
            registry=registry,
        )
        # The children every response increments, looked up once.
        self.served_from_cache = self.bytes_served.labels("cache")
        self.served_from_upstream = self.bytes_served.labels("upstream")
        self.upstream_seconds = Histogram(
            "pullgate_upstream_request_duration_seconds",
            "Upstream request latency (to response headers) by upstream and method.",
            ["upstream", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.upstream_errors = Counter(
            "pullgate_upstream_errors_total",
            "Upstream failures by upstream and kind (connect, timeout, status_5xx, "
            "rate_limited, auth, protocol, digest_mismatch, ...).",
            ["upstream", "kind"],
            registry=registry,
        )
        self.upstream_bytes = Counter(
            "pullgate_upstream_bytes_total",
            "Bytes downloaded from upstreams.",
            ["upstream"],
            registry=registry,
        )
        self.ratelimit_limit = Gauge(
            "pullgate_upstream_ratelimit_limit",
            "Last ratelimit-limit header seen from the upstream (Docker Hub pull limit).",
            ["upstream"],
            registry=registry,
        )
        self.ratelimit_remaining = Gauge(
            "pullgate_upstream_ratelimit_remaining",
            "Last ratelimit-remaining header seen from the upstream.",
            ["upstream"],
            registry=registry,
        )
        self.digest_mismatches = Counter(
            "pullgate_digest_mismatches_total",
            "Upstream content whose digest did not match; never cached or served.",
            ["upstream", "kind"],
            registry=registry,
        )
        self.cache_bytes = Gauge("pullgate_cache_size_bytes", "Bytes held in the blob store.", registry=registry)
        self.cache_objects = Gauge("pullgate_cache_objects", "Objects held in the blob store.", registry=registry)
        self.cache_max_bytes = Gauge("pullgate_cache_max_size_bytes", "Configured cache quota.", registry=registry)
        self.evictions = Counter("pullgate_cache_evictions_total", "Images evicted for the quota.", registry=registry)
        self.evicted_bytes = Counter(
            "pullgate_cache_evicted_bytes_total", "Bytes evicted for the quota.", registry=registry
        )
        self.inflight_fetches = Gauge(
            "pullgate_upstream_inflight_fetches",
            "Blob downloads from upstream in progress.",
            registry=registry,
        )
        self.coalesced = Counter(
            "pullgate_coalesced_requests_total",
            "Requests that joined a download already in progress instead of starting one.",
            ["kind"],
            registry=registry,
        )
        self.ready = Gauge("pullgate_ready", "1 while /readyz answers ready.", registry=registry)
        self.coordination_up = Gauge(
            "pullgate_coordination_up",
            "1 while Redis coordination answers, 0 while replicas work alone (no cluster single flight); "
            "1 with local coordination.",
            registry=registry,
        )
        self.object_store_up = Gauge(
            "pullgate_object_store_up",
            "1 while the S3 object store answers, 0 while blobs pass through from upstream; 1 with filesystem storage.",
            registry=registry,
        )
        self.shared_tier = Counter(
            "pullgate_shared_tier_blobs_total",
            "Blob downloads into the local tier by source: upstream (this replica held the cluster lease "
            "or worked alone), object_store, peer (streamed from the replica downloading it).",
            ["source"],
            registry=registry,
        )
        self.redirects = Counter(
            "pullgate_blob_redirects_total",
            "Blob GETs with storage.redirect on, by outcome: redirected (307 to a presigned URL of the object "
            "store), not_stored (served by pullgate: not in the object store yet), unavailable (served by "
            "pullgate: the object store did not answer).",
            ["result"],
            registry=registry,
        )
        self.object_uploads = Counter(
            "pullgate_object_uploads_total",
            "Blobs and manifests uploaded to the object store by result (stored, present, failed).",
            ["result"],
            registry=registry,
        )
        self.object_store_bytes = Gauge(
            "pullgate_object_store_bytes",
            "Bytes of the objects the cluster index records in the bucket (orphans included once "
            "reconcile found them), as of this replica's last eviction check (every minute).",
            registry=registry,
        )
        self.object_store_max_bytes = Gauge(
            "pullgate_object_store_max_size_bytes", "Configured bucket quota (storage.max_size; 0: none).",
            registry=registry,
        )  # fmt: skip
        self.cluster_evictions = Counter(
            "pullgate_cluster_evictions_total",
            "Images evicted from the object store for storage.max_size (by the replica holding the lease).",
            registry=registry,
        )
        self.cluster_evicted_bytes = Counter(
            "pullgate_cluster_evicted_bytes_total", "Bytes evicted from the object store for storage.max_size.",
            registry=registry,
        )  # fmt: skip
        self.trusted_root_refreshed = Gauge(
            "pullgate_trusted_root_last_refresh_timestamp_seconds",
            "When the Sigstore trusted root was last refreshed through TUF (0: never, shipped root).",
            registry=registry,
        )
        self.trusted_root_refreshes = Counter(
            "pullgate_trusted_root_refreshes_total",
            "TUF refreshes of the Sigstore trusted root by result (ok, failed).",
            ["result"],
            registry=registry,
        )
        self.background_task_failures = Counter(
            "pullgate_background_task_failures_total",
            "Background task failures (each one is logged and the task restarted) by task name.",
            ["task"],
            registry=registry,
        )
        self.unhandled_errors = Counter(
            "pullgate_unhandled_errors_total",
            "Requests that failed with an unexpected exception (a bug), by listener (mirror, admission).",
            ["listener"],
            registry=registry,
        )
        self.loop_lag = Histogram(
            "pullgate_event_loop_lag_seconds",
            "How late the event loop woke a task that slept 100 ms (anything blocking the loop).",
            # 20 ms: the loop-lag objective of the storm benchmark (issue 16), a bucket bound
            # so that a p99 read off the histogram can tell whether it was met.
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        # --- client access and limits ------------------------------------------------------
        self.auth_failures = Counter(
            "pullgate_auth_failures_total",
            "Refused client credentials by reason (bad_password, unknown_user, bad_token, "
            "malformed, rate_limited). No user label: names typed by attackers are not metrics.",
            ["reason"],
            registry=registry,
        )
        self.access_decisions = Counter(
            "pullgate_access_decisions_total",
            "Pull authorisation decisions by result (allowed, unauthorized, denied).",
            ["result"],
            registry=registry,
        )
        self.fetch_limit_rejections = Counter(
            "pullgate_fetch_limit_rejections_total",
            "Upstream fetches refused with 429 by the limit hit (overall, client).",
            ["scope"],
            registry=registry,
        )
        # --- admission webhook and policies --------------------------------------------
        self.admission_reviews = Counter(
            "pullgate_admission_reviews_total",
            "AdmissionReviews answered by endpoint (validate, mutate) and outcome (allowed, denied, error, timeout).",
            ["endpoint", "outcome"],
            registry=registry,
        )
        self.admission_seconds = Histogram(
            "pullgate_admission_review_duration_seconds",
            "Time to answer an AdmissionReview by endpoint.",
            ["endpoint"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        self.admission_decisions = Counter(
            "pullgate_admission_decisions_total",
            "Per-image policy decisions by policy, mode and result (pass, violation).",
            ["policy", "mode", "result"],
            registry=registry,
        )
        self.tag_resolutions = Counter(
            "pullgate_tag_resolutions_total",
            "Tag-to-digest resolutions for admission by source (cache, upstream, failed).",
            ["source"],
            registry=registry,
        )
        self.policy_reloads = Counter(
            "pullgate_policy_reloads_total",
            "Policy set (re)loads by result (ok, error).",
            ["result"],
            registry=registry,
        )
        self.policies_loaded = Gauge("pullgate_policies_loaded", "Policies in the active set.", registry=registry)
        # --- signatures --------------------------------------------------------------------
        self.verifications = Counter(
            "pullgate_signature_verifications_total",
            "Signature and attestation verifications by result (verified, failed, error), signer"
            " (key name or keyless identity) and the OIDC issuer the policy wants (keyless only).",
            ["result", "key", "issuer"],
            registry=registry,
        )
        self.verification_seconds = Histogram(
            "pullgate_signature_verification_duration_seconds",
            "Time to verify an image's signatures (cache misses only).",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
            registry=registry,
        )
        self.verification_cache = Counter(
            "pullgate_signature_verification_cache_total",
            "Verification cache lookups by result (hit, miss).",
            ["result"],
            registry=registry,
        )

    def request_done(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        """Count one mirror request and observe its duration."""
        self.requests.done(endpoint, method, status, seconds)

    def declare_upstream(self, upstream: str) -> None:
        """Create every per-upstream series at 0: Prometheus' ``increase()`` needs a sample
        before the first event, or the first digest mismatch of a process goes unseen."""
        for kind in UPSTREAM_ERROR_KINDS:
            self.upstream_errors.labels(upstream, kind)
        for kind in ("blob", "manifest"):
            self.digest_mismatches.labels(upstream, kind)

    def declare_policies(self) -> None:
        for result in ("ok", "error"):
            self.policy_reloads.labels(result=result)
