"""GPU benchmark of the engine against the model card's path, in one run (issues 4 and 8).

Builds a random-weight Qwen2.5-VL-7B-shaped AWQ checkpoint on the GPU, makes synthetic 720p H.264
videos (10 and 60 minutes, low native fps, ultrafast preset) in background processes, then measures:

* ceilings: fp16 matrix rate (8192^3 GEMM) and device memory bandwidth (copy, read + write bytes);
* load: AWQ checkpoint -> Engine (dequantized to fp16 on the GPU: no gptqmodel here);
* vision encoder, 768 frames at 364x644: engine (packed varlen attention, GPU patchify) against the
  stock per-window loop (timed on 64 frames and scaled x12);
* prefill at 32k tokens per SDPA backend, generation ms/token at 32k (CUDA-graph decoder vs eager);
* end to end per video: probe, plan, decode, encode, token-cache store, prefill, first answer;
  repeat from the Redis token cache; repeat from the hot KV prefix (p50 of 5);
* the model card's path on the same video: qwen-vl-utils-style decord decode at its defaults (full
  resolution, 768 frames, resize), CPU patchify, ``model.generate``, on an UNMODIFIED copy of the
  checkpoint (``Engine.load(optimize=False)``: stock attention, MLP width, patch embedding, nothing
  fused or compiled), loaded after the engine is freed; the stock vision micro runs on it too.
* the engine's fused/compiled paths against the previous ones in the same run (vision unfused,
  prefill through transformers' forward per SDPA backend), their numerics against the unmodified
  model, and the prefill's matrix products and attention timed alone (what bounds it).

Device call: ``pip install --no-index --no-deps --target /tmp/site .gpu_wheels/*.whl`` (carry
``.gpu_wheels``: av, decord, redis client, redis-server), ``PYTHONPATH=/tmp/site:$PWD``, then this script.

Every stage records wall time and peak GPU memory; ``$OUT/gpu_bench.json`` is rewritten after each
stage, so a run cut short keeps what it measured. ``--tiny`` runs the same code end to end on the
tiny model and small videos (CPU, about a minute).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

QUESTIONS = ["a man opens the door", "the dog jumps", "seasoning the steak", "someone waves",
             "a car drives past", "the lights turn off"]
T0 = time.monotonic()


class Bench:
    def __init__(self, out: Path, tiny: bool) -> None:
        self.out = out
        self.tiny = tiny
        self.cuda = torch.cuda.is_available()
        self.dev = torch.device("cuda" if self.cuda else "cpu")
        self.r: dict = {"meta": {}, "stages": {}, "errors": {}}
        out.mkdir(parents=True, exist_ok=True)

    def save(self) -> None:
        (self.out / "gpu_bench.json").write_text(json.dumps(self.r, indent=2, default=str))

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def stage(self, name: str, **extra):
        """Time a stage (wall s, peak GPU GiB); an exception is recorded and the run goes on."""
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        rec = dict(extra)
        t = time.perf_counter()
        try:
            yield rec
            self.sync()
            rec["wall_s"] = time.perf_counter() - t
        except Exception as exc:  # noqa: BLE001
            rec["error"] = f"{type(exc).__name__}: {exc}"
            self.r["errors"][name] = traceback.format_exc()[-3000:]
            print(f"[{name}] FAILED: {rec['error']}", flush=True)
        if self.cuda:
            rec["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
        rec["at_s"] = time.monotonic() - T0
        self.r["stages"][name] = rec
        print(f"[{name}] " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in rec.items() if k != "error"), flush=True)
        self.save()

    def timed(self, fn, *, repeat: int = 3, warmup: int = 1) -> float:
        """Median seconds of ``fn()``."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeat):
            self.sync()
            t = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t)
        return float(np.median(times))


# --- checkpoint --------------------------------------------------------------------------------------

TEXT_7B = dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_hidden_layers=28,
               num_key_value_heads=4, max_window_layers=28, max_position_embeddings=128000,
               rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, vocab_size=152064)
VISION_7B = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                 fullatt_block_indexes=[7, 15, 23, 31], window_size=112, tokens_per_second=2)
GROUP = 128


def build_7b_awq(out: Path, device: torch.device) -> dict:
    """Random-weight Qwen2.5-VL-7B-shaped AWQ (GEMM, 4 bit, group 128) checkpoint, made on ``device``."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from moments.tools import tiny_model as tm

    out.mkdir(parents=True, exist_ok=True)
    tok = tm.build_tokenizer(0)
    ids = {t: tok.token_to_id(t) for t in tm.SPECIAL_TOKENS}
    cfg = tm._model_config(TEXT_7B["vocab_size"], ids, TEXT_7B["max_position_embeddings"], "float16")
    cfg.update(TEXT_7B)
    cfg["vision_config"].update(VISION_7B)
    with init_empty_weights():
        shapes = {k: tuple(v.shape) for k, v in
                  Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**json.loads(json.dumps(cfg)))).state_dict().items()}
    cfg["quantization_config"] = {"bits": 4, "group_size": GROUP, "modules_to_not_convert": ["visual"],
                                  "quant_method": "awq", "version": "gemm", "zero_point": True}
    g = torch.Generator(device=device).manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    n_shard, total_bytes = 0, 0

    def flush():
        nonlocal shard, n_shard, total_bytes
        if shard:
            total_bytes += sum(t.numel() * t.element_size() for t in shard.values())
            save_file({k: v.cpu() for k, v in shard.items()}, str(out / f"model-{n_shard:05d}.safetensors"),
                      metadata={"format": "pt"})
            n_shard += 1
            shard = {}

    for name, shape in shapes.items():
        key = tm.legacy_key(name)
        parts = key.split(".")
        if key.startswith("model.layers.") and parts[-2] in tm.AWQ_MODULES and parts[-1] == "weight":
            o, i = shape
            base = key[: -len(".weight")]
            # Uniform nibbles and zero points: (q - z) has std ~6.5; scale for a ~1/sqrt(in) weight std.
            shard[base + ".qweight"] = torch.randint(-2**31, 2**31 - 1, (i, o // 8), dtype=torch.int32,
                                                     device=device, generator=g)
            shard[base + ".qzeros"] = torch.randint(-2**31, 2**31 - 1, (i // GROUP, o // 8), dtype=torch.int32,
                                                    device=device, generator=g)
            s = 0.5 / (6.5 * math.sqrt(i))
            shard[base + ".scales"] = (torch.rand((i // GROUP, o), device=device, generator=g) * s + s / 2).half()
        elif len(shape) >= 2:
            shard[key] = (torch.randn(shape, device=device, generator=g) * 0.02).half()
        elif key.endswith("weight"):
            shard[key] = torch.ones(shape, dtype=torch.float16, device=device)
        else:
            shard[key] = (torch.randn(shape, device=device, generator=g) * 0.02).half()
        if sum(t.numel() * t.element_size() for t in shard.values()) > 2 * 2**30:
            flush()
    flush()
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tm._tokenizer_config(tok), indent=2) + "\n")
    (out / "preprocessor_config.json").write_text(json.dumps(tm._preprocessor_config(), indent=2) + "\n")
    (out / "video_preprocessor_config.json").write_text(json.dumps(tm._video_preprocessor_config(), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "pad_token_id": ids["<|endoftext|>"]}) + "\n")
    return {"bytes": total_bytes, "shards": n_shard}


# --- videos ------------------------------------------------------------------------------------------

def start_videos(directory: Path, specs: list[tuple[float, int, int, float]]) -> list[tuple[Path, subprocess.Popen]]:
    """One background process per video (minutes, width, height, native fps)."""
    directory.mkdir(parents=True, exist_ok=True)
    jobs = []
    for minutes, w, h, fps in specs:
        path = directory / f"synth_{minutes:g}min_{h}p_{fps:g}fps.mp4"
        code = ("import sys, time; sys.path.insert(0, %r); from tests.media import make_video; t = time.time(); "
                "make_video(%r, seconds=%r, fps=%r, width=%d, height=%d, gop=%d, pattern='moving', "
                "preset='ultrafast'); print(time.time() - t)") % (
            str(ROOT), str(path), minutes * 60, fps, w, h, max(1, int(4 * fps)))
        jobs.append((path, subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)))
    return jobs


# --- floors ------------------------------------------------------------------------------------------

def lm_linear_params(cfg) -> int:
    t = cfg.text_config if hasattr(cfg, "text_config") else cfg
    h, kv = t.hidden_size, t.num_key_value_heads * (t.hidden_size // t.num_attention_heads)
    return t.num_hidden_layers * (2 * h * h + 2 * h * kv + 3 * h * t.intermediate_size)


def vision_flops(cfg, frames: int, height: int, width: int) -> float:
    v = cfg.vision_config
    patches = frames // 2 * (height // 14) * (width // 14)
    d, f = v.hidden_size, v.intermediate_size
    linear = 2 * (d * 3 * d + d * d + 3 * d * f) * v.depth
    win = (v.window_size // 14) ** 2
    per_frame = (height // 14) * (width // 14)
    attn = sum(4 * (per_frame if i in v.fullatt_block_indexes else win) * d for i in range(v.depth))
    merged = patches // 4
    return patches * (linear + attn + 2 * 3 * 1176 * d / 3) + merged * 2 * (4 * d * 4 * d + 4 * d * v.out_hidden_size)


def prefill_flops(cfg, n: int) -> float:
    t = cfg.text_config
    return 2.0 * n * lm_linear_params(cfg) + 2.0 * n * n * t.hidden_size * t.num_hidden_layers


def kv_bytes_per_token(cfg) -> int:
    t = cfg.text_config
    return 2 * t.num_hidden_layers * t.num_key_value_heads * (t.hidden_size // t.num_attention_heads) * 2


def decode_bytes(cfg, ctx: int) -> float:
    t = cfg.text_config
    return 2.0 * (lm_linear_params(cfg) + t.vocab_size * t.hidden_size) + ctx * kv_bytes_per_token(cfg)


# --- helpers -----------------------------------------------------------------------------------------

def synthetic_tokens(engine, n_tokens: int, seed: int = 0):
    """VisualTokens of about ``n_tokens`` (grid t x 32 x 32 patches, 1 s per grid step)."""
    from moments.workers.model.engine import VisualTokens

    side = 32 if n_tokens >= 256 else 4
    t = max(1, n_tokens // (side * side // 4))
    hidden = engine.model.config.text_config.hidden_size
    gen = torch.Generator().manual_seed(seed)
    embeds = (torch.randn(t * side * side // 4, hidden, generator=gen) * 0.5).to(engine.dtype)
    return VisualTokens(embeds=embeds, grid_thw=(t, side, side), second_per_grid_ts=2.0,
                        frame_times_s=tuple(float(i) for i in range(2 * t)), fingerprint=engine.fingerprint)


def count_tokens(engine):
    counts: list[int] = []
    orig = engine._decode

    def wrapped(ids, probs):
        counts.append(len(ids))
        return orig(ids, probs)

    engine._decode = wrapped
    return counts


def qwen_card_video(path: str, video_fps: float, total_frames: int):
    """qwen-vl-utils 0.0.14 ``fetch_video`` (decord) at its defaults: frames, size, fps."""
    from moments.media.sampling import smart_resize

    fps, min_frames, max_frames_cap = 2.0, 4, 768
    min_pixels, max_pixels_cap, total_pixels = 128 * 28 * 28, 768 * 28 * 28, int(128000 * 28 * 28 * 0.9)
    max_frames = math.floor(min(max_frames_cap, total_frames) / 2) * 2
    nframes = total_frames / video_fps * fps
    nframes = min(max(nframes, min_frames), max_frames, total_frames)
    nframes = max(2, round(nframes / 2) * 2)
    from benchmarks.decode import _qwen_replica
    import decord

    vr = decord.VideoReader(path)
    h0, w0 = vr[0].shape[:2]
    del vr
    max_pixels = max(min(max_pixels_cap, total_pixels / nframes * 2), int(min_pixels * 1.05))
    h, w = smart_resize(h0, w0, min_pixels=min_pixels, max_pixels=int(max_pixels))
    frames = _qwen_replica(path, nframes, h, w)
    sample_fps = nframes / max(total_frames, 1e-6) * video_fps
    return frames, sample_fps


# --- stages ------------------------------------------------------------------------------------------

def measure_rates(b: Bench) -> None:
    with b.stage("rates") as rec:
        n = 512 if b.tiny or not b.cuda else 8192
        dt = torch.float16 if b.cuda else torch.float32
        x = torch.randn(n, n, device=b.dev, dtype=dt)
        y = torch.randn(n, n, device=b.dev, dtype=dt)
        s = b.timed(lambda: x @ y, repeat=10, warmup=3)
        rec["matmul_tflops"] = 2 * n**3 / s / 1e12
        nbytes = (64 if b.tiny or not b.cuda else 4096) * 2**20
        src = torch.randn(nbytes // 4, device=b.dev)
        dst = torch.empty_like(src)
        s = b.timed(lambda: dst.copy_(src), repeat=10, warmup=3)
        rec["bandwidth_tbs"] = 2 * nbytes / s / 1e12
        del x, y, src, dst
    b.rate = b.r["stages"]["rates"].get("matmul_tflops", 1.0) * 1e12
    b.bw = b.r["stages"]["rates"].get("bandwidth_tbs", 1.0) * 1e12


def vision_micro(b: Bench, engine, frames_n: int, h: int, w: int) -> None:
    from moments.workers.model.kernels import vision_attention as va
    from moments.media.sampling import SamplingPlan

    plan = SamplingPlan(fps=2.0, frame_times_s=tuple(i / 2 for i in range(frames_n)), height=h, width=w,
                        grid_t=frames_n // 2, grid_h=h // 14, grid_w=w // 14,
                        visual_tokens=frames_n // 2 * (h // 28) * (w // 28), second_per_grid_ts=1.0)
    frames = np.random.default_rng(0).integers(0, 256, (frames_n, h, w, 3), dtype=np.uint8)
    floor_s = vision_flops(engine.model.config, frames_n, h, w) / b.rate
    b.vision_check = (frames[:8], _sub(plan, 8))
    fused = any(getattr(blk, "_moments_fused", False) for blk in engine.model.model.visual.blocks)
    with b.stage("vision_engine", frames=frames_n, size=f"{h}x{w}", tokens=plan.visual_tokens,
                 backend=engine.vision_attention, fused_blocks=fused, compiled=engine.compile,
                 floor_s=floor_s) as rec:
        t = time.perf_counter()
        b.vision_ref = {"engine": engine.encode(*b.vision_check).embeds.float()}  # warm-up (compiles)
        rec["first_call_s"] = time.perf_counter() - t
        rec["median_s"] = b.timed(lambda: engine.encode(frames, plan), repeat=3, warmup=1)
        rec["over_floor"] = rec["median_s"] / floor_s
    if fused:  # the previous engine path on the same card: varlen + padded MLP, transformers' block
        with b.stage("vision_engine_unfused", frames=frames_n, backend=engine.vision_attention) as rec:
            va.unfuse_vision_blocks(engine.model)
            try:
                b.vision_ref["unfused"] = engine.encode(*b.vision_check).embeds.float()
                rec["median_s"] = b.timed(lambda: engine.encode(frames, plan), repeat=2, warmup=0)
            finally:
                va.fuse_vision_blocks(engine.model, engine.vision_attention, compile=engine.compile)
    b.vision_full = (frames, plan)


def vision_stock(b: Bench, stock, frames_n: int) -> None:
    """transformers' unmodified vision tower (per-window loop, 3420-wide MLP, Conv3d) on the same frames."""
    frames, plan = b.vision_full
    chunk = min(64, frames_n)
    with b.stage("vision_stock", frames=frames_n, measured_frames=chunk, backend=stock.vision_attention,
                 model="unmodified (Engine.load(optimize=False))") as rec:
        ref = stock.encode(*b.vision_check).embeds.float()
        for name, got in b.vision_ref.items():
            rec[f"rel_err_{name}"] = float((got - ref).norm() / ref.norm())
        rec["chunk_s"] = b.timed(lambda: stock.encode(frames[:chunk], _sub(plan, chunk)), repeat=1, warmup=0)
        rec["median_s"] = rec["chunk_s"] * frames_n / chunk


def _sub(plan, n):
    from dataclasses import replace

    return replace(plan, frame_times_s=plan.frame_times_s[:n], grid_t=n // 2,
                   visual_tokens=n // 2 * plan.grid_h * plan.grid_w // 4)


def prefill_micro(b: Bench, engine, n_tokens: int) -> None:
    tokens = synthetic_tokens(engine, n_tokens)
    cfg = engine.model.config
    flops = prefill_flops(cfg, tokens.n_tokens)
    floor = max(flops / b.rate, (2 * lm_linear_params(cfg) + tokens.n_tokens * kv_bytes_per_token(cfg)) / b.bw)
    fused_default = engine.prefill_fused
    # Numerics: the fused prefix KV against transformers' forward, on a shorter prompt.
    check = synthetic_tokens(engine, min(4096, n_tokens), seed=3)
    if fused_default:
        with b.stage("prefill_check", tokens=check.n_tokens) as rec:
            engine.prefill_fused = False
            ref = engine.prefill(check).cache
            engine.prefill_fused = True
            got = engine.prefill(check).cache  # also compiles
            for i in (0, len(ref.layers) // 2, len(ref.layers) - 1):
                for kind in ("keys", "values"):
                    a, g_ = getattr(ref.layers[i], kind).float(), getattr(got.layers[i], kind).float()
                    rec[f"rel_err_{kind}_{i}"] = float((g_ - a).norm() / a.norm())
            del ref, got
    variants = [(False, None), (False, "cudnn"), (False, "flash")] if b.cuda else [(False, None)]
    if fused_default:
        variants += [(True, "cudnn"), (True, "flash"), (True, None)]
    if b.skip_backends:
        variants = [v for v in variants if v[1] == "cudnn"]
    best = ((fused_default, None), float("inf"))
    for fused, backend in variants:
        engine.prefill_fused, engine.prefill_attention = fused, backend
        name = f"prefill_{'fused_' if fused else ''}{backend or 'default'}"
        with b.stage(name, tokens=tokens.n_tokens, floor_s=floor, fused=fused) as rec:
            rec["median_s"] = b.timed(lambda: engine.prefill(tokens), repeat=3, warmup=1)
            rec["over_floor"] = rec["median_s"] / floor
            rec["tflops"] = flops / rec["median_s"] / 1e12
        s = b.r["stages"][name].get("median_s")
        if s is not None and s < best[1]:
            best = ((fused, backend), s)
    engine.prefill_fused, engine.prefill_attention = best[0]
    b.r["meta"]["prefill_attention"] = ("fused_" if best[0][0] else "") + (best[0][1] or "default")
    prefill_parts(b, engine, tokens.n_tokens)


def prefill_parts(b: Bench, engine, n: int) -> None:
    """What bounds the prefill: its matrix products alone, and its attention alone, per backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    t = engine.model.config.text_config
    h, heads, kvh, layers = t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.num_hidden_layers
    d = h // heads
    g = torch.Generator(device=b.dev).manual_seed(5)
    with b.stage("prefill_parts", tokens=n) as rec:
        x = torch.randn(n, h, device=b.dev, dtype=engine.dtype, generator=g)
        w = {k: torch.randn(shape, device=b.dev, dtype=engine.dtype, generator=g) * 0.02 for k, shape in
             dict(qkv=((heads + 2 * kvh) * d, h), o=(h, h), gu=(2 * t.intermediate_size, h),
                  down=(h, t.intermediate_size)).items()}

        xd = torch.randn(n, t.intermediate_size, device=b.dev, dtype=engine.dtype, generator=g)

        def gemms():
            F.linear(x, w["qkv"])
            F.linear(x, w["o"])
            F.linear(x, w["gu"])
            return F.linear(xd, w["down"])
        s = b.timed(gemms, repeat=5, warmup=2)
        rec["gemm_s"] = s * layers
        rec["gemm_tflops"] = 2 * n * lm_linear_params(engine.model.config) / layers / s / 1e12
        q = torch.randn(1, heads, n, d, device=b.dev, dtype=engine.dtype, generator=g)
        k = torch.randn(1, kvh, n, d, device=b.dev, dtype=engine.dtype, generator=g)
        v = torch.randn(1, kvh, n, d, device=b.dev, dtype=engine.dtype, generator=g)
        attn_flops = 2.0 * n * n * h  # causal: half of 4 n^2 d per head
        for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            try:
                with sdpa_kernel([be]):
                    s = b.timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                                repeat=5, warmup=2)
                rec[f"attn_{name}_s"] = s * layers
                rec[f"attn_{name}_tflops"] = attn_flops / s / 1e12
            except Exception as exc:  # noqa: BLE001
                rec[f"attn_{name}_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        del x, xd, w, q, k, v


def generation_micro(b: Bench, engine, ctx: int, label: str, eager_tokens: int, fast_tokens: int) -> None:
    from moments.workers.model.kernels.decode_graphs import FastDecoder  # noqa: F401

    tokens = synthetic_tokens(engine, ctx, seed=1)
    prefix = engine.prefill(tokens)
    counts = count_tokens(engine)
    floor = decode_bytes(engine.model.config, prefix.length) / b.bw
    for mode, n in (("fast", fast_tokens), ("eager", eager_tokens)):
        if n <= 0:
            continue
        engine.fast_decode = mode == "fast"
        with b.stage(f"generate_{label}_{mode}", context=prefix.length, floor_ms=floor * 1e3) as rec:
            engine.generate(tokens, [QUESTIONS[0]], max_new_tokens=n, prefix=prefix)  # warm-up / graph capture
            a = engine.generate(tokens, [QUESTIONS[1]], max_new_tokens=n, prefix=prefix)[0]
            steps = max(1, counts[-1] - 1)
            rec["ms_per_token"] = a.stage_ms["generate"] / steps
            rec["tokens"] = counts[-1]
            rec["question_prefill_ms"] = a.stage_ms["prefill"]
    engine.fast_decode = b.cuda
    engine._decode = type(engine)._decode.__get__(engine)
    del prefix


def e2e_engine(b: Bench, engine, video: Path, label: str, redis_url: str | None, max_new: int) -> None:
    from moments.media.probe import probe_file
    from moments.media.decode import decode_frames, default_threads
    from moments.workers.pipeline import DECODE_CHUNK_FRAMES, concat_visual_tokens, _sub_plan
    from moments.media.sampling import SamplingOptions, plan_sampling

    counts = count_tokens(engine)
    st: dict = {}
    with b.stage(f"e2e_{label}_first") as rec:
        t = time.perf_counter()
        info = probe_file(video)
        plan = plan_sampling(info.duration_s, info.native_fps, info.width, info.height, SamplingOptions())
        st["probe_plan_s"] = time.perf_counter() - t
        # As the worker does: parallel chunk decoders (decode_threads 0), which also decode ahead
        # while this thread encodes, so "decode_s" is only the time spent waiting for frames.
        st["decode_threads"] = default_threads()
        frames_iter = decode_frames(video, plan, info, backend="auto", chunk_frames=DECODE_CHUNK_FRAMES,
                                    threads=st["decode_threads"])
        parts, done, dec, enc = [], 0, 0.0, 0.0
        while True:
            t = time.perf_counter()
            chunk = next(frames_iter, None)
            dec += time.perf_counter() - t
            if chunk is None:
                break
            t = time.perf_counter()
            parts.append(engine.encode(chunk, _sub_plan(plan, done, len(chunk))))
            enc += time.perf_counter() - t
            done += len(chunk)
        tokens = concat_visual_tokens(parts, plan)
        st.update(decode_s=dec, encode_s=enc, frames=plan.frames, size=f"{plan.height}x{plan.width}",
                  fps=plan.fps, visual_tokens=tokens.n_tokens, duration_s=info.duration_s)
        t = time.perf_counter()
        key = f"bench-{label}"
        if redis_url:
            asyncio.run(_cache_put(redis_url, key, tokens))
        st["token_cache_put_s"] = time.perf_counter() - t
        t = time.perf_counter()
        prefix = engine.prefill(tokens)
        b.sync()
        st["prefill_s"] = time.perf_counter() - t
        t = time.perf_counter()
        a = engine.generate(tokens, [QUESTIONS[0]], max_new_tokens=max_new, prefix=prefix)[0]
        st["answer_s"] = time.perf_counter() - t
        st["generate_ms_per_token"] = a.stage_ms["generate"] / max(1, counts[-1] - 1)
        st["total_s"] = sum(st[k] for k in ("probe_plan_s", "decode_s", "encode_s", "token_cache_put_s",
                                            "prefill_s", "answer_s"))
        rec.update(st)
    with b.stage(f"e2e_{label}_repeat_token_cache", source="redis" if redis_url else "in-process") as rec:
        t = time.perf_counter()
        cached = asyncio.run(_cache_get(redis_url, key)) if redis_url else tokens
        rec["token_cache_get_s"] = time.perf_counter() - t
        t = time.perf_counter()
        prefix2 = engine.prefill(cached)
        b.sync()
        rec["prefill_s"] = time.perf_counter() - t
        t = time.perf_counter()
        engine.generate(cached, [QUESTIONS[1]], max_new_tokens=max_new, prefix=prefix2)
        rec["answer_s"] = time.perf_counter() - t
        rec["total_s"] = rec["token_cache_get_s"] + rec["prefill_s"] + rec["answer_s"]
        del prefix2
    with b.stage(f"e2e_{label}_repeat_hot_kv") as rec:
        times = []
        for q in QUESTIONS[1:]:
            t = time.perf_counter()
            engine.generate(tokens, [q], max_new_tokens=max_new, prefix=prefix)
            times.append(time.perf_counter() - t)
        rec["p50_s"] = float(np.median(times))
        rec["all_s"] = times
        rec["tokens_each"] = counts[-len(times):]
    del prefix
    engine._decode = type(engine)._decode.__get__(engine)


async def _cache_put(url, key, tokens):
    import redis.asyncio as aioredis

    from moments.workers.token_cache import TokenCache

    r = aioredis.from_url(url)
    try:
        await TokenCache(r, ttl_s=3600, chunk_bytes=8 * 2**20).put(key, "bench", tokens)
    finally:
        await r.aclose()


async def _cache_get(url, key):
    import redis.asyncio as aioredis

    from moments.workers.token_cache import TokenCache

    r = aioredis.from_url(url)
    try:
        return await TokenCache(r, ttl_s=3600, chunk_bytes=8 * 2**20).get(key)
    finally:
        await r.aclose()


def e2e_card(b: Bench, engine, video: Path, label: str, max_new: int) -> None:
    """The model card's path: decord at qwen-vl-utils defaults, CPU patchify, model.generate.

    ``engine`` is an unmodified model (``Engine.load(optimize=False)``): transformers' vision tower
    and decoder exactly as loaded; the engine object only supplies the tokenizer and processor values.
    """
    from moments.media.probe import probe_file
    from moments.workers.model import prompt
    from moments.workers.model.engine import pixel_values_videos

    with b.stage(f"card_{label}") as rec:
        info = probe_file(video)
        import decord

        vr = decord.VideoReader(str(video))
        total, vfps = len(vr), float(vr.get_avg_fps())
        del vr
        t = time.perf_counter()
        frames, sample_fps = qwen_card_video(str(video), vfps, total)
        rec["decode_s"] = time.perf_counter() - t
        t = time.perf_counter()
        pixels, grid = pixel_values_videos(frames, engine.processing)  # = Qwen2VLVideoProcessor (tested)
        rec["patchify_s"] = time.perf_counter() - t
        n_video = grid[0] * grid[1] * grid[2] // 4
        rec.update(frames=int(frames.shape[0]), size=f"{frames.shape[1]}x{frames.shape[2]}", visual_tokens=n_video,
                   second_per_grid_ts=2 / sample_fps, duration_s=info.duration_s)
        text = prompt.video_prefix_text(n_video) + prompt.question_suffix_text(QUESTIONS[0])
        ids = torch.tensor([engine.tokenizer(text, add_special_tokens=False).input_ids], device=engine.device)
        if True:
            t = time.perf_counter()
            with torch.inference_mode():
                pv = pixels.to(engine.device, engine.dtype)
                thw = torch.tensor([grid], device=engine.device)
                b.sync()
                rec["to_gpu_s"] = time.perf_counter() - t
                t = time.perf_counter()
                engine.model.model.get_video_features(pv, thw)  # the vision part of generate, timed alone
                b.sync()
                rec["vision_s"] = time.perf_counter() - t
                t = time.perf_counter()
                out = engine.model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=pv,
                    video_grid_thw=thw, second_per_grid_ts=torch.tensor([2 / sample_fps]),
                    max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False)
                b.sync()
                rec["generate_call_s"] = time.perf_counter() - t
                rec["new_tokens"] = int(out.shape[1] - ids.shape[1])
        # generate = vision + prefill + decode; prefill + decode is the remainder.
        rec["prefill_and_decode_s"] = rec["generate_call_s"] - rec["vision_s"]
        rec["total_s"] = rec["decode_s"] + rec["patchify_s"] + rec["to_gpu_s"] + rec["generate_call_s"]


def eager_decode_on_card_context(b: Bench, engine, n_tokens: int) -> None:
    """Stock decode speed (model.generate's per-token cost) at the card's context, from a prefix."""


# --- main --------------------------------------------------------------------------------------------

def start_redis(b: Bench) -> tuple[str | None, subprocess.Popen | None]:
    binary = shutil.which("redis-server")
    carried = ROOT / ".gpu_wheels" / "redis" / "redis-server"
    env = None
    if binary is None and carried.exists():  # carried with its less common libraries
        binary, env = str(carried), {**os.environ, "LD_LIBRARY_PATH": str(carried.parent)}
    if binary is None:
        return None, None
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--proto-max-bulk-len", "1gb"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    import redis

    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            return f"redis://127.0.0.1:{port}/0", proc
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    return None, None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model and small videos (CPU smoke run)")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu-bench-out"))
    ap.add_argument("--work", default="/tmp/gpu-bench-work")
    ap.add_argument("--native-fps", type=float, default=2.0)
    ap.add_argument("--minutes", type=float, nargs="+", default=[60.0, 10.0])
    ap.add_argument("--card-videos", type=int, default=2, help="run the card path on the first N videos")
    ap.add_argument("--deadline-s", type=float, default=530.0, help="skip optional stages after this")
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--skip-prefill-backends", action="store_true", help="prefill micro with cudnn only")
    args = ap.parse_args(argv)
    b = Bench(Path(args.out), args.tiny)
    b.skip_backends = args.skip_prefill_backends
    work = Path(args.work)
    import transformers

    try:
        from torch.nn.attention import list_flash_attention_impls

        b.r["meta"]["flash_attention_impls"] = list(list_flash_attention_impls())
    except Exception as exc:  # noqa: BLE001
        b.r["meta"]["flash_attention_impls"] = f"n/a ({type(exc).__name__})"
    b.r["meta"].update(torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
                       device=torch.cuda.get_device_name() if b.cuda else "cpu", tiny=args.tiny,
                       cpus=os.cpu_count(), native_fps=args.native_fps)
    if args.tiny:
        specs = [(m, 320, 180, args.native_fps) for m in (1.0, 0.5)]
    else:
        specs = [(m, 1280, 720, args.native_fps) for m in args.minutes]
    videos = start_videos(work / "videos", specs)
    redis_url, redis_proc = start_redis(b)
    b.r["meta"]["token_cache"] = f"redis-server {redis_proc.args[0]}" if redis_url else "none (in-process tokens)"
    try:
        measure_rates(b)
        model_dir = work / ("tiny-awq" if args.tiny else "qwen2_5_vl_7b_awq_random")
        with b.stage("build_checkpoint") as rec:
            if args.tiny:
                from moments.tools.tiny_model import build_tiny_model

                build_tiny_model(model_dir, awq=True)
            else:
                rec.update(build_7b_awq(model_dir, b.dev))
            rec["disk_gib"] = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 2**30
        if b.cuda:
            torch.cuda.empty_cache()
        from moments.workers.model.engine import Engine

        with b.stage("load") as rec:
            engine = Engine.load(str(model_dir))
            rec["vision_attention"] = engine.vision_attention
            rec["fast_decode"] = engine.fast_decode
            from moments.workers.model.awq import native_awq_available

            rec["awq"] = "native (gptqmodel)" if native_awq_available() else "dequantized to fp16 at load"
            if b.cuda:
                rec["resident_gib"] = torch.cuda.memory_allocated() / 2**30
        vision_frames = 8 if args.tiny else 768
        if args.tiny and not b.cuda:  # exercise the fused code paths (eager) on the CPU too
            from moments.workers.model.kernels import vision_attention as va

            va.install(engine.model, "sdpa_mask")
            engine.vision_attention = "sdpa_mask"
            va.fuse_vision_blocks(engine.model, "sdpa_mask", compile=False)
            engine.prefill_fused = True
        if args.tiny:
            vision_micro(b, engine, 8, 56, 84)
            prefill_micro(b, engine, 512)
            generation_micro(b, engine, 512, "ctx", eager_tokens=8, fast_tokens=16)
        else:
            vision_micro(b, engine, 768, 364, 644)
            prefill_micro(b, engine, 32768)
            generation_micro(b, engine, 32768, "32k", eager_tokens=12, fast_tokens=64)
            generation_micro(b, engine, 1024, "1k", eager_tokens=0, fast_tokens=64)
        labels = []
        for i, (path, proc) in enumerate(videos):
            label = f"{specs[i][0]:g}min"
            with b.stage(f"video_{label}") as rec:
                out, _ = proc.communicate(timeout=600)
                rec["make_s"] = float(out.strip().splitlines()[-1]) if proc.returncode == 0 else None
                rec["bytes"] = path.stat().st_size
            e2e_engine(b, engine, path, label, redis_url, args.max_new_tokens)
            labels.append((label, path))
        # The baseline: an unmodified copy of the same checkpoint (no padding, patch-embed or attention
        # changes, nothing fused or compiled), loaded after the engine is freed.
        del engine
        import gc

        gc.collect()
        if b.cuda:
            torch.cuda.empty_cache()
        with b.stage("load_stock") as rec:
            stock = Engine.load(str(model_dir), optimize=False)
            rec["vision_attention"] = stock.vision_attention
            rec["mlp_width"] = stock.model.model.visual.blocks[0].mlp.gate_proj.out_features
        vision_stock(b, stock, vision_frames)
        for i, (label, path) in enumerate(labels):
            if i < args.card_videos and (time.monotonic() - T0 < args.deadline_s or i == 0):
                if b.cuda:
                    torch.cuda.empty_cache()
                e2e_card(b, stock, path, label, args.max_new_tokens)
    finally:
        if redis_proc is not None:
            redis_proc.kill()
        for _, proc in videos:
            if proc.poll() is None:
                proc.kill()
        b.r["meta"]["total_s"] = time.monotonic() - T0
        b.save()
    print_table(b)
    return 0


def fmt_(x):
    return "n/a" if x is None else f"{x:.3g}"


def print_table(b: Bench) -> None:
    s = b.r["stages"]
    g = lambda name, key: s.get(name, {}).get(key)  # noqa: E731
    rows = []

    def row(stage, ours, card, floor, target):
        ratio = f"{card / ours:.1f}x" if ours and card else ""
        fmt = lambda x: "" if x is None else (f"{x:.3g}" if isinstance(x, float) else str(x))  # noqa: E731
        rows.append(f"| {stage} | {fmt(ours)} | {fmt(card)} | {ratio} | {fmt(floor)} | {target} |")

    row("vision 768 fr 364x644 (s)", g("vision_engine", "median_s"), g("vision_stock", "median_s"),
        g("vision_engine", "floor_s"), "<= 3 s")
    row("vision, previous engine path (unfused) (s)", g("vision_engine_unfused", "median_s"), None,
        g("vision_engine", "floor_s"), "")
    pf = f"prefill_{b.r['meta'].get('prefill_attention', 'default')}"
    for name in [k for k in s if k.startswith("prefill_") and k != pf and "median_s" in s[k]]:
        row(f"{name} 32k (s), x floor {s[name].get('over_floor', 0):.2f}", s[name]["median_s"], None,
            s[name].get("floor_s"), "")
    parts = s.get("prefill_parts", {})
    if parts:
        rows.append("| prefill parts: gemm %.3g s (%.0f TFLOP/s), attention cudnn %s s, flash %s s | | | | | |" % (
            parts.get("gemm_s", 0), parts.get("gemm_tflops", 0), fmt_(parts.get("attn_cudnn_s")),
            fmt_(parts.get("attn_flash_s"))))
    row(f"prefill 32k ({b.r['meta'].get('prefill_attention')}) (s)", g(pf, "median_s"), g("prefill_default", "median_s"),
        g(pf, "floor_s"), "<= 1.25x floor")
    for lab in ("32k", "1k", "ctx"):
        if f"generate_{lab}_fast" in s:
            row(f"generation {lab} (ms/token)", g(f"generate_{lab}_fast", "ms_per_token"),
                g(f"generate_{lab}_eager", "ms_per_token"), g(f"generate_{lab}_fast", "floor_ms"),
                "<= 12 ms at 32k")
    for name in [k[len("e2e_"):-len("_first")] for k in s if k.startswith("e2e_") and k.endswith("_first")]:
        f = s[f"e2e_{name}_first"]
        c = s.get(f"card_{name}", {})
        row(f"{name}: decode (s)", f.get("decode_s"), c.get("decode_s"), None, "")
        row(f"{name}: encode (s)", f.get("encode_s"), c.get("vision_s"), None, "")
        row(f"{name}: prefill (s)", f.get("prefill_s"), None, None, "")
        row(f"{name}: first answer, upload done -> answer (s)", f.get("total_s"), c.get("total_s"), None,
            "<= 30 s (60 min)")
        row(f"{name}: repeat, token cache (s)", g(f"e2e_{name}_repeat_token_cache", "total_s"), c.get("total_s"),
            None, "")
        row(f"{name}: repeat, hot KV p50 (s)", g(f"e2e_{name}_repeat_hot_kv", "p50_s"), c.get("total_s"), None,
            "<= 0.5 s (60 min)")
        rows.append(f"| {name}: plan | {f.get('frames')} fr {f.get('size')} @ {f.get('fps', 0):.3g} fps, "
                    f"{f.get('visual_tokens')} tok | {c.get('frames')} fr {c.get('size')}, {c.get('visual_tokens')} tok "
                    f"| | | |")
    head = ["| stage | engine | card path | card / engine | floor | target |", "|---|---|---|---|---|---|"]
    text = "\n".join(head + rows)
    meta = b.r["meta"]
    print(f"\ndevice: {meta.get('device')}, torch {meta.get('torch')}, transformers {meta.get('transformers')}, "
          f"matmul {g('rates', 'matmul_tflops') or 0:.0f} TFLOP/s, copy {g('rates', 'bandwidth_tbs') or 0:.2f} TB/s, "
          f"load {g('load', 'wall_s') or 0:.1f} s ({g('load', 'resident_gib') or 0:.1f} GiB resident)")
    print(text)
    (b.out / "gpu_bench_table.md").write_text(text + "\n")
    if b.r["errors"]:
        print("errors in:", ", ".join(b.r["errors"]))


if __name__ == "__main__":
    sys.exit(main())
