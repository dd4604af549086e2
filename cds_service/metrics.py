"""Prometheus metrics. Under gunicorn every worker writes to PROMETHEUS_MULTIPROC_DIR (set by
`cds-service serve`) and /metrics adds them up; labels never carry patient data."""
from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest, multiprocess

# `service`: the kind of endpoint (discovery, service, feedback, ...); `service_id`: which CDS service was
# called ("" for endpoints that are not one, "unknown" for an id this server does not offer)
REQUESTS = Counter("cds_requests_total", "HTTP requests by endpoint, status and CDS service",
                   ["service", "status", "service_id"])
LATENCY = Histogram("cds_request_duration_seconds", "Request latency by endpoint, status and CDS service",
                    ["service", "status", "service_id"],
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0))
FALLBACK_CALLS = Counter("cds_fhir_fallback_calls_total", "Invocations that queried the FHIR server")
FALLBACK_FAILURES = Counter("cds_fhir_fallback_failures_total", "FHIR fallback failures by kind", ["reason"])
CARDS = Counter("cds_cards_total", "Cards returned, by CDS service and indicator", ["service_id", "indicator"])
FEEDBACK = Counter("cds_feedback_entries_total", "Feedback entries received, by outcome", ["outcome"])

CONTENT_TYPE = CONTENT_TYPE_LATEST


def render() -> bytes:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest()


def endpoint_label(rule: str | None) -> str:
    if rule is None:
        return "unmatched"
    return {"/cds-services": "discovery", "/cds-services/<service_id>": "service",
            "/cds-services/<service_id>/feedback": "feedback", "/healthz": "healthz",
            "/metrics": "metrics"}.get(rule, "other")
