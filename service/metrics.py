"""Prometheus metrics of the front end (served on ``metrics_port`` when set)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("moments_requests_total", "RPCs handled", ["method", "code"])
LATENCY = Histogram(
    "moments_request_seconds",
    "RPC latency",
    ["method"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
)
STAGE_SECONDS = Histogram(
    "moments_stage_seconds",
    "Job time per stage, as reported by workers",
    ["stage"],
    buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
)
QUEUE_DEPTH = Gauge("moments_queue_jobs", "Jobs submitted and not finished")
CACHE_EVENTS = Counter("moments_token_cache_total", "Visual-token cache outcomes of jobs", ["outcome"])
UPLOAD_BYTES = Counter("moments_upload_bytes_total", "Bytes received by UploadVideo")
JOBS_LOST = Counter("moments_jobs_lost_total", "Jobs whose record vanished from Redis while a caller waited "
                                               "(failover or restart); the caller got ABORTED JOB_LOST")
WEBHOOK_DELIVERIES = Counter("moments_webhook_deliveries_total", "Webhook POST attempts by outcome: delivered, "
                                                                 "retried (failed, tried again later), dead "
                                                                 "(given up: in the dead-letter stream)", ["outcome"])
