"""Repeat questions, three ways in one run: cold, Redis token-cache hit, hot KV prefix.

Same video, same question. Cold = nothing cached (decode + encode + prefill + generate);
tokens = visual tokens from Redis (prefill + generate); kv = the worker holds the prefix KV
(question prefill + generate). Runs the real Pipeline against a private redis-server.

    python benchmarks/repeat.py --minutes 10 --repeats 5            # tiny model on this CPU
    python benchmarks/repeat.py --model /path/to/ckpt --device cuda  # a real checkpoint

Also measures what int8 / fp8 storage of the visual tokens would save and cost (error of the
first answer token's logits against the stored-as-is tokens).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moments.core.config import Settings  # noqa: E402
from moments.media.probe import probe_file  # noqa: E402
from moments.core.blobs import LocalBlobStore  # noqa: E402
from moments.core.records import Job, SamplingRequest  # noqa: E402
from moments.app.redis_server import PrivateRedis  # noqa: E402
from moments.tools.synthetic import Event, write_event_video  # noqa: E402
from moments.workers.model.engine import Engine, VisualTokens  # noqa: E402
from moments.workers.job_loop import JobContext  # noqa: E402
from moments.workers.kv_cache import KVPrefixCache  # noqa: E402
from moments.workers.pipeline import Pipeline  # noqa: E402
from moments.workers.token_cache import TokenCache  # noqa: E402


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "?")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{platform.node()} | {cpu} x{torch.get_num_threads()} threads | {gpu}"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def measure(args) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="moments-repeat-"))
    server = PrivateRedis(workdir / "redis")
    url = server.start()
    try:
        if args.model:
            model_dir = args.model
        else:
            from moments.tools.tiny_model import build_tiny_model

            model_dir = str(build_tiny_model(workdir / "tiny"))
        engine = Engine.load(model_dir, device=args.device)
        video = write_event_video(workdir / "v.mp4", [Event("red", "circle", 30, 60)],
                                  seconds=args.minutes * 60, fps=args.fps, width=320, height=240)
        video_id = hashlib.sha256(video.read_bytes()).hexdigest()
        info = probe_file(video, video_id=video_id)
        settings = Settings.from_env(environ={}, budget_tokens=args.budget_tokens, max_new_tokens=args.max_new_tokens)
        client = aioredis.Redis.from_url(url)
        cache = TokenCache(client, ttl_s=3600, chunk_bytes=8 << 20)
        kv = KVPrefixCache(8 << 30)
        blobs = LocalBlobStore(workdir / "blobs", workdir / "uploads")
        blobs.commit_file(video, video_id)
        pipeline = Pipeline(settings, engine, cache, kv, blobs, owner="bench")
        job = Job(kind="localize", video_id=video_id, queries=("the red circle appears",),
                  sampling=SamplingRequest())
        work = pipeline.prepare(job, info)
        times: dict[str, list[float]] = {"cold": [], "tokens": [], "kv": []}
        stats_seen = {}
        for way in ("cold", "tokens", "kv"):
            for _ in range(args.repeats):
                if way == "cold":
                    await client.flushall()
                if way in ("cold", "tokens"):
                    kv._entries.clear()
                    kv.used_bytes = 0
                started = time.perf_counter()
                stats = await pipeline.run(work, JobContext(client, job, 1))
                times[way].append(time.perf_counter() - started)
                want = {"cold": "miss", "tokens": "tokens", "kv": "kv"}[way]
                assert stats.cache == want or (way == "tokens" and stats.cache == "miss"), stats.cache
                stats_seen[way] = stats
            if way == "cold":
                # leave one entry in Redis for the token-cache way
                await pipeline.run(job, info, JobContext(client, job, 1))
        plan = pipeline.plan(job, info)
        result = {
            "machine": machine(),
            "video_minutes": args.minutes,
            "frames": plan.frames,
            "sampled_fps": plan.fps,
            "visual_tokens": plan.visual_tokens,
            "ways": {w: {"p50_s": statistics.median(t), "p95_s": pct(t, 0.95), "n": len(t),
                         "stage_ms": stats_seen[w].stage_ms} for w, t in times.items()},
        }
        result["storage"] = storage_error(engine, await cache.get(next(iter(
            [k.decode().removesuffix(":manifest").removeprefix("moments:tok:")
             async for k in client.scan_iter(match="moments:tok:*:manifest")]))))
        await client.aclose()
        return result
    finally:
        server.stop()


def _first_token_logits(engine: Engine, tokens: VisualTokens) -> torch.Tensor:
    """Logits of the first answer token (the prefix prefill plus the question, no sampling)."""
    from moments.workers.model import prompt

    with torch.inference_mode():
        prefix = engine._prefill(tokens)
        q_ids = engine.tokenizer(prompt.question_suffix_text("the red circle appears"),
                                 add_special_tokens=False).input_ids
        positions = torch.arange(prefix.next_position, prefix.next_position + len(q_ids)).expand(3, -1)
        embeds = engine.model.get_input_embeddings()(torch.tensor([q_ids], device=engine.device))
        return engine._language_model(embeds, positions, prefix.cache).float().cpu()


def storage_error(engine: Engine, tokens: VisualTokens) -> dict:
    """Bytes and logit error of int8 (per-token absmax) and fp8 e4m3 storage vs the stored dtype."""
    reference = _first_token_logits(engine, tokens)
    x = tokens.embeds.float()
    rows = {}
    scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0
    int8 = torch.clamp((x / scale).round(), -127, 127).to(torch.int8)
    variants = {"int8+scale": (int8.float() * scale, int8.numel() + scale.numel() * 2)}
    if hasattr(torch, "float8_e4m3fn"):
        fp8_scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 448.0
        fp8 = (x / fp8_scale).to(torch.float8_e4m3fn)
        variants["fp8 e4m3+scale"] = (fp8.float() * fp8_scale, fp8.numel() + fp8_scale.numel() * 2)
    variants["fp16"] = (x.half().float(), x.numel() * 2)
    for name, (approx, nbytes) in variants.items():
        other = VisualTokens(approx.to(tokens.embeds.dtype), tokens.grid_thw, tokens.second_per_grid_ts,
                             tokens.frame_times_s, tokens.fingerprint)
        logits = _first_token_logits(engine, other)
        err = (logits - reference).abs()
        rows[name] = {
            "bytes": int(nbytes),
            "ratio_to_fp16": nbytes / (x.numel() * 2),
            "max_abs_logit_err": float(err.max()),
            "mean_abs_logit_err": float(err.mean()),
            "same_argmax": bool(logits.argmax() == reference.argmax()),
        }
    return rows


def print_table(r: dict) -> None:
    print(f"machine: {r['machine']}")
    print(f"video: {r['video_minutes']} min, {r['frames']} frames at {r['sampled_fps']:.3g} fps, "
          f"{r['visual_tokens']} visual tokens")
    cold = r["ways"]["cold"]["p50_s"]
    print(f"{'way':<8}{'p50 s':>10}{'p95 s':>10}{'ratio to cold (p50)':>22}")
    for way, w in r["ways"].items():
        print(f"{way:<8}{w['p50_s']:>10.3f}{w['p95_s']:>10.3f}{w['p50_s'] / cold:>22.3f}")
    print(f"\n{'storage':<16}{'bytes':>10}{'x fp16':>8}{'max |dlogit|':>14}{'mean |dlogit|':>15}{'argmax':>8}")
    for name, s in r["storage"].items():
        print(f"{name:<16}{s['bytes']:>10}{s['ratio_to_fp16']:>8.2f}{s['max_abs_logit_err']:>14.2e}"
              f"{s['mean_abs_logit_err']:>15.2e}{str(s['same_argmax']):>8}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--fps", type=float, default=2, help="native fps of the synthetic video")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default="")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--budget-tokens", type=int, default=4096)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    result = asyncio.run(measure(args))
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
