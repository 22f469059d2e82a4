"""The admission webhook: ``POST /validate`` and ``POST /mutate`` (admission.k8s.io/v1
AdmissionReview), ``/healthz`` and ``/readyz``, on its own listener with reloading TLS.

Every answer comes within ``admission.deadline`` (below the API server's ``timeoutSeconds``,
https://kubernetes.io/docs/reference/access-authn-authz/extensible-admission-controllers/#timeouts);
past it the answer follows ``admission.on_timeout`` and says so. Bad requests get a 4xx with
a JSON error body, never a 500: the API server then applies the webhook's ``failurePolicy``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware
from structlog.typing import FilteringBoundLogger

from proxy.admission.review import AdmissionRequest, parse_review, review_response, sites_to_check
from proxy.config.settings import Config
from proxy.config.units import format_size
from proxy.errors import PullgateError
from proxy.ops.metrics import Metrics
from proxy.policy.active import PolicyStore
from proxy.policy.evaluation import ContentProvider, Decision, Evaluation, Evaluator, TagResolver
from proxy.policy.sites import clip

MAX_MESSAGE = 4000  # the API server shows the message to the user; keep it readable


class PoliciesNotReady(PullgateError):
    code, status = "UNAVAILABLE", 503


@dataclass(frozen=True)
class Webhook:
    """What the handlers need; one per webhook app."""

    config: Config
    resolver: TagResolver
    metrics: Metrics
    logger: FilteringBoundLogger
    policies: PolicyStore
    content: ContentProvider | None = None  # image content for signature/content rules


WEBHOOK = web.AppKey("webhook", Webhook)


def create_webhook_app(
    config: Config,
    resolver: TagResolver,
    metrics: Metrics,
    logger: FilteringBoundLogger,
    *,
    policies: PolicyStore | None = None,
    content: ContentProvider | None = None,
    middlewares: Sequence[Middleware] = (),
) -> web.Application:
    """The webhook application. Without ``policies`` it loads and watches ``config.policies``
    itself (through ``cleanup_ctx``); pass a ``PolicyStore`` to share one that runs elsewhere.
    ``middlewares``: the listener's error boundary (``proxy.http.boundary``)."""
    app = web.Application(client_max_size=config.admission.max_body_size, middlewares=middlewares)
    store = policies or PolicyStore(config.policies, metrics, logger)
    app[WEBHOOK] = Webhook(config, resolver, metrics, logger, store, content)
    if policies is None:
        app.cleanup_ctx.append(_policies_ctx)
    app.router.add_post("/validate", validate)
    app.router.add_post("/mutate", mutate)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def _policies_ctx(app: web.Application) -> AsyncIterator[None]:
    async with app[WEBHOOK].policies.running():
        yield


async def validate(request: web.Request) -> web.Response:
    return await _handle(request, "validate")


async def mutate(request: web.Request) -> web.Response:
    return await _handle(request, "mutate")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    store = request.app[WEBHOOK].policies
    if store.current is None:
        error = store.error or "policies not loaded yet"
        return web.json_response({"ready": False, "error": error}, status=503)
    return web.json_response({"ready": True, "policies": len(store.current.policies)})


async def _handle(request: web.Request, endpoint: str) -> web.Response:
    hook = request.app[WEBHOOK]
    started = time.perf_counter()
    try:
        review = parse_review(await request.read())
        answer, outcome = await _answer(hook, review, endpoint, started)
    except web.HTTPRequestEntityTooLarge:
        limit = format_size(hook.config.admission.max_body_size)
        message = f"AdmissionReview larger than admission.max_body_size ({limit})"
        return _error(hook, endpoint, 413, "SIZE_INVALID", message)
    except PullgateError as exc:
        return _error(hook, endpoint, exc.status, exc.code, exc.message)
    hook.metrics.admission_reviews.labels(endpoint=endpoint, outcome=outcome).inc()
    hook.metrics.admission_seconds.labels(endpoint=endpoint).observe(time.perf_counter() - started)
    return web.Response(body=json.dumps(answer).encode(), content_type="application/json")


def _error(hook: Webhook, endpoint: str, status: int, code: str, message: str) -> web.Response:
    hook.metrics.admission_reviews.labels(endpoint=endpoint, outcome="error").inc()
    hook.logger.warning("admission_review_rejected", endpoint=endpoint, status=status, error=message)
    body = {"errors": [{"code": code, "message": message}]}
    return web.json_response(body, status=status)


async def _answer(hook: Webhook, review: AdmissionRequest, endpoint: str, started: float) -> tuple[dict[str, Any], str]:
    if not review.checks_images:  # DELETE, CONNECT, status updates, ...: even when not ready
        return review_response(review.uid, allowed=True), "allowed"
    policies = hook.policies.current
    if policies is None:
        raise PoliciesNotReady(f"no valid policy set loaded: {hook.policies.error or 'loading'}")
    sites = sites_to_check(review)
    evaluator = Evaluator(policies, hook.config.defaults.no_match, hook.resolver, hook.metrics, hook.content)
    namespace = review.namespace or _metadata(review, "namespace")
    deadline = hook.config.admission.deadline
    try:
        async with asyncio.timeout(max(0.0, deadline - (time.perf_counter() - started))):
            evaluation = await evaluator.evaluate(sites, namespace, mutate=endpoint == "mutate")
    except TimeoutError:
        return _timed_out(hook, review, endpoint, deadline), "timeout"
    answer = _response(review, evaluation)
    _record(hook, review, endpoint, evaluation, started)
    return answer, "allowed" if evaluation.allowed else "denied"


def _response(review: AdmissionRequest, evaluation: Evaluation) -> dict[str, Any]:
    if not evaluation.allowed:
        message = clip("; ".join(evaluation.messages("deny")), MAX_MESSAGE)
        return review_response(
            review.uid,
            allowed=False,
            message=message,
            warnings=evaluation.warnings(),
            audit_annotations=evaluation.audit_annotations(),
        )
    return review_response(
        review.uid,
        allowed=True,
        patch=evaluation.patch(),
        warnings=evaluation.warnings(),
        audit_annotations=evaluation.audit_annotations(),
    )


def _timed_out(hook: Webhook, review: AdmissionRequest, endpoint: str, deadline: float) -> dict[str, Any]:
    policy = hook.config.admission.on_timeout
    verdict = "admitted" if policy == "allow" else "denied"
    message = (
        f"pullgate: image policy check did not finish within {deadline:g}s; {verdict} (admission.on_timeout: {policy})"
    )
    hook.logger.warning(
        "admission_timeout",
        uid=review.uid,
        endpoint=endpoint,
        namespace=review.namespace,
        kind=review.kind,
        name=review.name or _metadata(review, "name"),
        on_timeout=policy,
    )
    if policy == "allow":
        return review_response(review.uid, allowed=True, warnings=[message])
    return review_response(review.uid, allowed=False, message=message)


def _record(
    hook: Webhook,
    review: AdmissionRequest,
    endpoint: str,
    evaluation: Evaluation,
    started: float,
) -> None:
    """One log event per review; decision metrics and audit events unless dry-run."""
    if not review.dry_run:
        _count_decisions(hook, review, evaluation)
    hook.logger.info(
        "admission_review",
        uid=review.uid,
        endpoint=endpoint,
        operation=review.operation,
        namespace=review.namespace,
        kind=review.kind,
        name=review.name or _metadata(review, "name"),
        dry_run=review.dry_run,
        allowed=evaluation.allowed,
        patched=len(evaluation.patch()),
        decisions=[_summary(d) for d in evaluation.decisions],
        duration_ms=round((time.perf_counter() - started) * 1000, 2),
    )


def _count_decisions(hook: Webhook, review: AdmissionRequest, evaluation: Evaluation) -> None:
    decisions = hook.metrics.admission_decisions
    for d in evaluation.decisions:
        result = "pass" if d.outcome == "allow" else "violation"
        decisions.labels(policy=d.policy or "(none)", mode=d.mode, result=result).inc()
        if d.outcome == "audit":
            hook.logger.info(
                "policy_audit_violation",
                uid=review.uid,
                policy=d.policy,
                rule=d.rule,
                namespace=review.namespace,
                message=d.message,
            )


def _summary(d: Decision) -> str:
    rule = f"/{d.rule}" if d.rule else ""
    return f"{d.site.name} {d.site.image} {d.policy or '-'}:{d.outcome}{rule}"


def _metadata(review: AdmissionRequest, key: str) -> str:
    metadata = (review.object or review.old_object or {}).get("metadata")
    value = metadata.get(key) if isinstance(metadata, dict) else None
    if not value and key == "name" and isinstance(metadata, dict):
        value = metadata.get("generateName")
    return value if isinstance(value, str) else ""
