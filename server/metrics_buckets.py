"""Histogram buckets and the bounded label values of hotlora's metrics.

Kept apart from the metric definitions because they are long tables: dashboards, alert rules and the tests
read these exact values, so they change only with a reason."""

from __future__ import annotations

import re

# Buckets span a tiny model on CPU (sub-millisecond steps) to the default model on a busy CPU
# (seconds per token, minutes per request) and GPU (milliseconds per token).
TTFT_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
)
ITL_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
)
E2E_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
)
QUEUE_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
RPC_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    25.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
FORWARD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LOAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
REQUEST_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)

FORWARD_KINDS = ("prefill", "decode")
FINISH_REASONS = ("length", "stop", "eos", "cancelled", "deadline", "error")
CACHE_EVENTS = ("hit", "miss", "eviction")
CACHE_TIERS = ("device", "host")
ADAPTER_STATES = ("stored", "host", "device", "pinned")
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled", "rejected")
UPLOAD_OUTCOMES = (
    "ok",
    "invalid_config",
    "invalid_tensor",
    "too_large",
    "unsupported_option",
    "does_not_fit",
    "cancelled",
    "deadline_exceeded",
    "unavailable",
)
HTTP_ROUTES = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/models",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
)
MAX_OUTCOMES = 32  # more distinct upload outcomes than this are counted as "other"
MAX_LORA_NAMES = 16  # adapter names in hotlora_lora_requests_info, most requested first
LABEL_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
