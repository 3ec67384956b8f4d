"""Every Redis key name Moments uses, in one place."""

PREFIX = "moments"

JOBS_STREAM = f"{PREFIX}:jobs"
"""Stream of job ids; consumed by the worker group."""
JOBS_GROUP = "workers"
DEAD_LETTER_STREAM = f"{PREFIX}:jobs:dead"
"""Jobs that failed ``job_max_attempts`` times, with the last error."""
WORKERS_HASH = f"{PREFIX}:workers"
"""worker name -> last heartbeat (unix seconds); used for UNAVAILABLE when none is alive."""
WORKER_LANES = f"{PREFIX}:workers:lanes"
"""worker name -> jobs it runs at once; KV-prefix affinity hands a worker at most twice that many."""
VIDEO_INDEX = f"{PREFIX}:videos"
"""Sorted set of every stored video id, scored by first upload time."""
OPEN_JOBS = f"{PREFIX}:jobs:open"
"""Sorted set of unfinished job ids scored by submit time: the queue depth for backpressure."""
PAGE_TOKEN_SECRET = f"{PREFIX}:secret:page_tokens"
"""String: the random key ListVideos page tokens are signed with (made by the first front end)."""
VIDEOS_DELETED = f"{PREFIX}:videos:deleted"
"""Stream (capped) of video ids whose last owner deleted them: every worker drops their KV prefixes."""
TOKEN_CACHE_HITS = f"{PREFIX}:stats:token_cache_hits"
TOKEN_CACHE_MISSES = f"{PREFIX}:stats:token_cache_misses"


def video(video_id: str) -> str:
    """Hash: the probed facts of one stored blob (shared by every tenant that uploaded it)."""
    return f"{PREFIX}:video:{video_id}"


def tenant_videos(tenant: str) -> str:
    """Sorted set: the video ids a tenant owns, scored by the time the tenant uploaded them."""
    return f"{PREFIX}:tenant:{tenant}:videos"


def owned_video(tenant: str, video_id: str) -> str:
    """Hash: one owner's fields of a video (filename, content type), never shown to another owner."""
    return f"{PREFIX}:tenant:{tenant}:video:{video_id}"


def tenant_views(tenant: str, video_id: str) -> str:
    """Set: the views (sampling identities) of a video a tenant has asked about, so a cache outcome
    it is shown never comes from another tenant's work."""
    return f"{PREFIX}:tenant:{tenant}:video:{video_id}:views"


def video_owners(video_id: str) -> str:
    """Set: the tenants that own a video; the blob goes when the last one deletes it."""
    return f"{PREFIX}:video:{video_id}:owners"


def upload(upload_id: str) -> str:
    """Hash: a resumable upload's header and committed offset."""
    return f"{PREFIX}:upload:{upload_id}"


def upload_writer(upload_id: str) -> str:
    """String with expiry: a random token held by the one stream (or janitor) touching an upload."""
    return f"{PREFIX}:upload:{upload_id}:writer"


def tenant_pending_uploads(tenant: str) -> str:
    """Hash: upload id -> declared size of each unfinished upload of a tenant (its pending bytes)."""
    return f"{PREFIX}:tenant:{tenant}:uploads"


UPLOADS_BY_EXPIRY = f"{PREFIX}:uploads"
"""Sorted set of upload ids scored by expiry time, for removing abandoned partial files."""


def job(job_id: str) -> str:
    """Hash: the job payload, state, attempts and result (payloads never live in the stream)."""
    return f"{PREFIX}:job:{job_id}"


def job_events(job_id: str) -> str:
    """Stream: progress events, per-query results and the final state of one job."""
    return f"{PREFIX}:job:{job_id}:events"


def job_cancel(job_id: str) -> str:
    """String: set when the caller went away; workers stop the job's remaining work."""
    return f"{PREFIX}:job:{job_id}:cancel"


def token_cache_manifest(cache_key: str) -> str:
    return f"{PREFIX}:tok:{cache_key}:manifest"


def token_cache_chunk(cache_key: str, index: int) -> str:
    return f"{PREFIX}:tok:{cache_key}:chunk:{index}"


def token_cache_lock(cache_key: str) -> str:
    """String with expiry: held by the one worker encoding an uncached (video, plan, encoder)."""
    return f"{PREFIX}:tok:{cache_key}:lock"


def video_lock(video_id: str) -> str:
    """String with expiry: held while a video's blob is placed with an owner, or deleted with its last one."""
    return f"{PREFIX}:video:{video_id}:lock"


def video_token_keys(video_id: str) -> str:
    """Set: every Redis key of the token-cache entries of one video, so DeleteVideo can drop them."""
    return f"{PREFIX}:tok:video:{video_id}"


def video_token_entries(video_id: str) -> str:
    """Set: the token-cache keys (entries) of one video."""
    return f"{PREFIX}:tok:video:{video_id}:entries"


def job_dedupe(request_id: str) -> str:
    """String: the open job serving one request identity, so a retried call joins it."""
    return f"{PREFIX}:jobkey:{request_id}"


def rate(tenant: str, second: int) -> str:
    return f"{PREFIX}:rate:{tenant}:{second}"


def auth_failures(subject: str) -> str:
    """String with expiry: failed authentications of one peer address or presented-key hash."""
    return f"{PREFIX}:authfail:{subject}"


def inflight(tenant: str) -> str:
    return f"{PREFIX}:inflight:{tenant}"


def worker_wake(worker: str) -> str:
    """Stream: one entry per job handed to ``worker``, waking its blocked read to run the job now."""
    return f"{PREFIX}:worker:{worker}:wake"


def kv_owner(cache_key: str) -> str:
    """String: the worker holding the hot KV prefix of a token-cache key (affinity hint)."""
    return f"{PREFIX}:kv:{cache_key}:owner"


def event_reader_wake(reader_id: str) -> str:
    """Stream (short, with expiry): entries that wake one front end's shared event reader."""
    return f"{PREFIX}:events:reader:{reader_id}:wake"


# Webhooks: one delivery (a hash) per job with a callback_url, due times in a sorted set.
WEBHOOKS_DUE = f"{PREFIX}:webhooks:due"
"""Sorted set of delivery ids scored by the unix ms they are due; a claim pushes the score forward."""
WEBHOOKS_DEAD = f"{PREFIX}:webhooks:dead"
"""Stream of webhook events that failed ``webhook_max_attempts`` times, with the body and last error."""


def webhook(delivery_id: str) -> str:
    """Hash: one webhook delivery (url, tenant, body, attempts, last_error)."""
    return f"{PREFIX}:webhook:{delivery_id}"
