"""One typed settings object for the front end, the workers and the CLI.

Every field reads from an environment variable ``MOMENTS_<FIELD>`` (upper case) and may be
overridden by a CLI flag of the same name (``--field-name``). The README's configuration table
is generated from the ``help`` of each field (``moments config``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct-AWQ"


def _setting(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class Settings:
    """Settings shared by every Moments process."""

    redis_url: str = _setting("", "Redis URL; empty starts a private redis-server (serve/demo only)")
    redis_sentinels: str = _setting(
        "", "Comma list of Redis Sentinel host:port; set, every process follows the primary they name "
            "for redis_master (and its failovers) instead of redis_url")
    redis_master: str = _setting("moments", "Master name the sentinels monitor (with redis_sentinels)")
    redis_max_connections: int = _setting(
        64, "Most pooled Redis connections of one process (a command waits for a free one); the front "
            "end's waiting calls share one more, and cancellations a few of their own")
    data_dir: str = _setting("./var", "Local blob store and upload temp files (local backend), the worker blob "
                                       "cache (s3 backend) and the private Redis live here")
    listen: str = _setting("127.0.0.1:50051", "gRPC listen address of the front end")
    metrics_port: int = _setting(0, "Prometheus metrics HTTP port (0 = off)")
    api_keys: str = _setting(
        "",
        "Comma list of tenant:sha256(key)[:rate_per_s[:max_concurrent]]; empty = no auth",
    )
    auth_failures_max: int = _setting(
        10, "Failed authentications from one peer address, or with one presented key, within "
            "auth_failure_window_s before every call from it gets RESOURCE_EXHAUSTED (0 = off)")
    auth_failure_window_s: float = _setting(60.0, "Window (and lockout) of auth_failures_max")
    tls_cert: str = _setting("", "PEM server certificate (TLS on when set)")
    tls_key: str = _setting("", "PEM server private key")
    tls_client_ca: str = _setting("", "PEM CA for client certificates (mTLS on when set)")
    max_upload_bytes: int = _setting(8 * 1024**3, "Largest accepted upload or ingested file")
    max_duration_s: float = _setting(4 * 3600.0, "Longest accepted video")
    max_pixels_per_frame: int = _setting(8192 * 8192, "Largest accepted frame (width x height)")
    max_queries: int = _setting(16, "Most queries in one Localize request")
    max_query_chars: int = _setting(500, "Longest accepted query")
    max_queue_jobs: int = _setting(256, "Jobs waiting before new calls get RESOURCE_EXHAUSTED")
    max_open_uploads: int = _setting(16, "Upload streams one tenant may have open at once (0 = no cap)")
    max_pending_upload_bytes: int = _setting(
        32 * 1024**3, "Declared bytes of one tenant's unfinished uploads, at most (0 = no cap)")
    upload_ttl_s: int = _setting(24 * 3600, "Abandoned partial uploads are removed after this")
    job_timeout_s: float = _setting(600.0, "Deadline for a Localize call that sets none")
    job_lease_s: float = _setting(60.0, "A job idle this long (no heartbeat) is reclaimed")
    worker_stale_s: float = _setting(10.0, "No worker heartbeat for this long: calls get UNAVAILABLE")
    job_max_attempts: int = _setting(3, "Deliveries before a job goes to the dead-letter stream")
    blob_backend: str = _setting("local", "Where video bytes live: local (a directory under data_dir) or s3")
    s3_endpoint_url: str = _setting("", "S3-compatible endpoint URL (empty = AWS for s3_region)")
    s3_bucket: str = _setting("", "Bucket of the s3 blob store (must exist)")
    s3_region: str = _setting("us-east-1", "Region of the bucket (signing region for other S3 servers)")
    s3_access_key_id: str = _setting("", "S3 access key id; empty = boto3's default chain (AWS_* env, instance role)")
    s3_secret_access_key: str = _setting("", "S3 secret access key (never logged)")
    s3_prefix: str = _setting("moments/", "Key prefix of everything Moments stores in the bucket")
    s3_part_bytes: int = _setting(8 * 1024**2, "Multipart part size of uploads into S3 (>= 5 MiB): the "
                                               "front end buffers up to two parts per upload")
    s3_timeout_s: float = _setting(10.0, "Connect and read timeout of one S3 request")
    blob_cache_bytes: int = _setting(16 * 1024**3, "s3 backend: worker disk cache of blobs under data_dir "
                                                   "(least recently used evicted; blobs in use are kept)")
    ingest_s3_buckets: str = _setting("", "Comma list of bucket or bucket/prefix that s3:// ingest may read "
                                          "(with the server's S3 credentials); empty = s3:// ingest off")
    ingest_timeout_s: float = _setting(900.0, "Longest URI ingest (fetch, verify, probe, store)")
    ingest_max_redirects: int = _setting(5, "Most HTTP redirects one ingest follows (each hop re-checked)")
    ingest_ca_bundle: str = _setting("", "PEM CA bundle for https:// ingest (empty = the system's CAs)")
    allow_networks: str = _setting(
        "", "Comma list of networks (CIDR) that outbound URLs (ingest, webhooks) may reach despite being "
            "private, loopback or link-local; empty = public addresses only")
    # Webhooks (callback_url of jobs); outbound addresses follow allow_networks.
    webhook_secret: str = _setting("", "HMAC-SHA256 key of webhook signatures (never logged); empty and no "
                                       "tenant secret = callback_url refused")
    webhook_tenant_secrets: str = _setting("", "Comma list of tenant:secret, a tenant's own webhook key "
                                               "(overrides webhook_secret for it)")
    webhook_max_attempts: int = _setting(8, "Webhook POSTs per event before it goes to the dead-letter stream")
    webhook_backoff_s: float = _setting(2.0, "Pause after a webhook's first failed attempt; doubles per "
                                             "attempt (at most 1 hour), with jitter")
    webhook_timeout_s: float = _setting(10.0, "Time limit of one webhook POST (connect to answer)")
    probe_timeout_s: float = _setting(30.0, "Time limit of the child process that probes a file")
    probe_memory_bytes: int = _setting(2 * 1024**3, "Address-space limit of the probe child")
    max_probes: int = _setting(0, "Probe children one front end runs at once (0 = one per core); more uploads "
                                  "wait their turn, and the wait does not count toward probe_timeout_s")
    model: str = _setting(DEFAULT_MODEL, "Hub id or local directory of the Qwen2.5-VL checkpoint")
    device: str = _setting("auto", "Torch device for the worker (auto, cpu, cuda, cuda:1)")
    dtype: str = _setting("auto", "auto (fp16 on CUDA, fp32 on CPU), float16, bfloat16, float32")
    attn_implementation: str = _setting("sdpa", "sdpa, eager or flash_attention_2")
    awq_kernel: str = _setting(
        "auto", "AWQ checkpoints: auto (4-bit on torch's int4 kernel on CUDA, else dequantized), int4, gptqmodel, dequantize")
    fast_decode: bool = _setting(True, "CUDA only: static KV buffer + CUDA-graph decode steps")
    compile: bool = _setting(True, "CUDA only: torch.compile the fused vision blocks and prefill")
    fused_prefill: bool = _setting(True, "CUDA only: fused prefix prefill (plain Linear layers)")
    budget_tokens: int = _setting(24576, "Default visual-token budget per video")
    max_budget_tokens: int = _setting(115200, "Largest visual-token budget a request may ask for")
    max_frames: int = _setting(768, "Most sampled frames per video (default and cap)")
    max_fps: float = _setting(2.0, "Highest sampled frame rate, default and cap (plans use 2/k fps)")
    max_new_tokens: int = _setting(64, "Most generated tokens per answer")
    min_confidence: float = _setting(
        0.5, "Default min_confidence: segments scoring below it are dropped (the query is then not found)")
    search_mode: str = _setting("auto", "Default search through long videos: auto (coarse windows, then zoom) or off")
    search_min_event_s: float = _setting(
        2.0, "Shortest event a search must see: coarse windows sample a frame at least this often")
    search_max_rounds: int = _setting(2, "Most search rounds per query (the coarse pass, then zoom passes)")
    search_max_passes: int = _setting(64, "Most model passes (windows) per query in a search")
    search_max_visual_tokens: int = _setting(
        4_000_000, "Most visual tokens over all passes of one query's search")
    search_fanout_jobs: int = _setting(4, "SearchVideos: most Localize jobs one library search has queued or running")
    search_max_results: int = _setting(1000, "SearchVideos: largest limit (segments in the final results)")
    search_max_videos: int = _setting(10000, "SearchVideos: most videos one library search covers")
    decode_backend: str = _setting("auto", "auto, pyav or decord")
    decode_threads: int = _setting(0, "Chunks of one video decoded in parallel (0 = one per core, at most 8)")
    token_cache_ttl_s: int = _setting(7 * 24 * 3600, "TTL of cached visual tokens in Redis")
    token_cache_chunk_bytes: int = _setting(8 * 1024**2, "Chunk size of cached visual tokens")
    kv_cache_bytes: int = _setting(4 * 1024**3, "Worker memory for hot KV prefixes (0 = off)")
    kv_affinity: bool = _setting(
        True, "Hand a job to the live worker holding its KV prefix, unless it has 2 x its lanes jobs pending")
    worker_gpus: str = _setting(
        "", "GPUs `moments serve` spreads its workers over, one each in turn (comma list, also --devices; "
            "empty = every visible GPU)")
    worker_jobs: int = _setting(
        0, "Jobs a worker runs at once, their questions decoding in the same steps (0 = 8 on CUDA, 1 on CPU)")
    worker_name: str = _setting("", "Consumer name in the job group (default host-pid)")
    log_json: bool = _setting(False, "JSON log lines")
    log_level: str = _setting("INFO", "Log level")
    target: str = _setting("127.0.0.1:50051", "Front end address for the client commands (upload, ask, ...)")
    api_key: str = _setting("", "API key the client commands send (never logged)")
    client_state: str = _setting("~/.cache/moments/uploads.json", "Where the client remembers unfinished uploads")
    faults: str = _setting("", "Fault injection for tests and drills (JSON, see moments.tools.faults); never in production")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> "Settings":
        """Build settings from ``MOMENTS_*`` variables, then explicit overrides (CLI flags)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"MOMENTS_{f.name.upper()}")
            if raw is not None:
                values[f.name] = _parse(f.type, raw, f.name)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)

    @property
    def redis_configured(self) -> bool:
        """A Redis is named (a URL or sentinels): nothing private needs starting."""
        return bool(self.redis_url or self.redis_sentinels)

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """``redis_sentinels`` as (host, port) pairs."""
        out = []
        for item in self.redis_sentinels.split(","):
            if item.strip():
                host, _, port = item.strip().rpartition(":")
                out.append((host or "127.0.0.1", int(port)))
        return out

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).resolve()

    @property
    def blob_dir(self) -> Path:
        return self.data_path / "blobs"

    @property
    def upload_dir(self) -> Path:
        return self.data_path / "uploads"

    @property
    def blob_cache_dir(self) -> Path:
        return self.data_path / "blob-cache"


def _parse(type_name: Any, raw: str, name: str) -> Any:
    kind = type_name if isinstance(type_name, str) else getattr(type_name, "__name__", "str")
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            return raw.strip().lower() in {"1", "true", "yes", "on"}
    except ValueError as exc:
        raise ValueError(f"MOMENTS_{name.upper()}={raw!r}: {exc}") from exc
    return raw


def settings_table() -> str:
    """Markdown table of every setting, for the README."""
    rows = ["| env var | default | meaning |", "|---|---|---|"]
    for f in fields(Settings):
        rows.append(f"| `MOMENTS_{f.name.upper()}` | `{f.default!r}` | {f.metadata['help']} |")
    return "\n".join(rows)
