"""One device call: AWQ kept 4-bit (issue 21) and batched decoding (issue 15), each against its
baseline measured in the same run.

* int4 kernel micro: one 7B decoder layer's products at M=1 and M=4096, torch's int4 kernel against
  fp16 ``F.linear`` on the dequantized weights (the exact same values);
* 7B (random weights, the published AWQ layout, written to disk and read by the real loader):
  load time, resident GPU memory, logits of the 4-bit path against the dequantized fp16 path
  (max/mean abs error, argmax agreement over every position), prefill 32k (fused, per-layer
  dequantization streamed from the pinned host copy) and decode ms/token at 1k and 32k, each
  against the dequantized fp16 engine; a profile of one decode step at 32k;
* batching on the 4-bit 7B: 1 / 4 / 16 questions on one hot prefix against asking them one after
  another; 1 / 4 / 16 concurrent callers on distinct hot prefixes (questions/s, p50 / p99) against
  the sequential path;
* "60 minutes": 768 frames at 364x644 through the vision tower, prefill, first answer; repeat on the
  hot prefix (decoding the file is not in this run: no PyAV on the device; see RESULTS for it);
* 3B (on disk, real loader) and 72B (built in memory: the disk cannot hold a 41 GB checkpoint next to
  the others in this call): resident memory, decode at 32k, and for the 72B a 60-minute answer.

``$OUT/gpu_4bit.json`` is rewritten after every stage (a run cut short keeps what it measured); a
global deadline skips what no longer fits. ``--tiny`` runs every stage on the tiny model (CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.gpu_bench import Bench, lm_linear_params, measure_rates  # noqa: E402

VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, fullatt_block_indexes=[7, 15, 23, 31],
              window_size=112, tokens_per_second=2)
SIZES = {
    "3B": dict(hidden_size=2048, intermediate_size=11008, num_attention_heads=16, num_hidden_layers=36,
               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7B": dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_hidden_layers=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "72B": dict(hidden_size=8192, intermediate_size=29568, num_attention_heads=64, num_hidden_layers=80,
                num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
}
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2, num_key_value_heads=2,
            vocab_size=2112, tie_word_embeddings=False)
TINY_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, fullatt_block_indexes=[1],
                   window_size=112, tokens_per_second=2)
GROUP = 128
QUESTIONS = ["a man opens the door", "the dog jumps", "seasoning the steak", "someone waves", "a car drives past",
             "the lights turn off", "a ball bounces", "the crowd cheers"]
DEADLINE_S = float(os.environ.get("BENCH_DEADLINE_S", "560"))
T0 = time.monotonic()


def left_s() -> float:
    return DEADLINE_S - (time.monotonic() - T0)


def config_dict(text: dict, vision: dict, group: int) -> dict:
    from moments.tools import tiny_model as tm

    tok = tm.build_tokenizer(0)
    ids = {t: tok.token_to_id(t) for t in tm.SPECIAL_TOKENS}
    cfg = tm._model_config(text["vocab_size"], ids, 128000, "float16")
    cfg.update(text, max_window_layers=text["num_hidden_layers"], max_position_embeddings=128000)
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    half = head_dim // 2
    cfg["rope_scaling"] = {"type": "mrope", "mrope_section": [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]}
    cfg["vision_config"].update(vision, out_hidden_size=text["hidden_size"])
    cfg["quantization_config"] = {"bits": 4, "group_size": group, "modules_to_not_convert": ["visual"],
                                  "quant_method": "awq", "version": "gemm", "zero_point": True}
    return cfg, tok, ids


def random_awq(shape, group: int, device, gen) -> dict:
    """Random AWQ GEMM tensors for a Linear [out, in] whose weights have std ~1/sqrt(in)."""
    o, i = shape
    s = 0.5 / (6.5 * math.sqrt(i))
    return {"qweight": torch.randint(-2**31, 2**31 - 1, (i, o // 8), dtype=torch.int32, device=device, generator=gen),
            "qzeros": torch.randint(-2**31, 2**31 - 1, (i // group, o // 8), dtype=torch.int32, device=device,
                                    generator=gen),
            "scales": (torch.rand((i // group, o), device=device, generator=gen) * s + s / 2).half()}


def shapes_of(cfg: dict) -> dict:
    from accelerate import init_empty_weights
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    c = dict(cfg)
    c.pop("quantization_config")
    with init_empty_weights():
        m = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**json.loads(json.dumps(c))))
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def write_checkpoint(out: Path, text: dict, vision: dict, group: int, device) -> dict:
    """A random-weight checkpoint in the published AWQ layout (hub names, GEMM packing, fp16 rest)."""
    from safetensors.torch import save_file

    from moments.tools import tiny_model as tm

    out.mkdir(parents=True, exist_ok=True)
    cfg, tok, ids = config_dict(text, vision, group)
    gen = torch.Generator(device=device).manual_seed(0)
    shard, n, total = {}, 0, 0

    def flush():
        nonlocal shard, n, total
        if shard:
            total += sum(t.numel() * t.element_size() for t in shard.values())
            save_file({k: v.cpu() for k, v in shard.items()}, str(out / f"model-{n:05d}.safetensors"), metadata={"format": "pt"})
            n, shard = n + 1, {}

    for name, shape in shapes_of(cfg).items():
        key = tm.legacy_key(name)
        parts = key.split(".")
        if key == "lm_head.weight" and text.get("tie_word_embeddings"):
            continue
        if key.startswith("model.layers.") and parts[-2] in tm.AWQ_MODULES and parts[-1] == "weight":
            for suffix, t in random_awq(shape, group, device, gen).items():
                shard[key[: -len("weight")] + suffix] = t
        elif len(shape) >= 2:
            shard[key] = (torch.randn(shape, device=device, generator=gen) * 0.02).half()
        elif key.endswith("weight"):
            shard[key] = torch.ones(shape, dtype=torch.float16, device=device)
        else:
            shard[key] = (torch.randn(shape, device=device, generator=gen) * 0.02).half()
        if sum(t.numel() * t.element_size() for t in shard.values()) > 2 * 2**30:
            flush()
    flush()
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tm._tokenizer_config(tok), indent=2) + "\n")
    (out / "preprocessor_config.json").write_text(json.dumps(tm._preprocessor_config(), indent=2) + "\n")
    (out / "video_preprocessor_config.json").write_text(json.dumps(tm._video_preprocessor_config(), indent=2) + "\n")
    return {"bytes": total, "shards": n}


def in_memory_int4_engine(text: dict, vision: dict, group: int, device, options):
    """The 72B without a file: the loader's own pieces (Int4Linear from AWQ tensors, everything else
    random in bf16), so what runs is what the loader builds."""
    from accelerate import init_empty_weights
    from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from moments.tools import tiny_model as tm
    from moments.workers.model.engine import Engine
    from moments.workers.model.loading import Checkpoint
    from moments.workers.model.preprocessing import VideoProcessing
    from moments.workers.model.quant import Int4Linear

    cfg, tok, _ = config_dict(text, vision, group)
    tmp = Path(os.environ.get("BENCH_TMP", "/tmp")) / "tok72"
    tmp.mkdir(parents=True, exist_ok=True)
    tok.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps(tm._tokenizer_config(tok), indent=2) + "\n")
    c = dict(cfg)
    c.pop("quantization_config")
    with init_empty_weights(include_buffers=False):
        model = Qwen2_5_VLForConditionalGeneration._from_config(Qwen2_5_VLConfig(**json.loads(json.dumps(c))),
                                                               dtype=torch.bfloat16)
    gen = torch.Generator(device=device).manual_seed(0)
    modules = dict(model.named_modules())
    for name, module in list(modules.items()):
        parts = name.split(".")
        if name.startswith("model.language_model.layers.") and parts[-1] in tm.AWQ_MODULES:
            awq = random_awq((module.out_features, module.in_features), group, device, gen)
            bias = torch.zeros(module.out_features, device=device) if module.bias is not None else None
            parent, _, child = name.rpartition(".")
            setattr(modules[parent], child, Int4Linear(awq["qweight"], awq["qzeros"], awq["scales"], bias, group,
                                                       device=device, dtype=torch.bfloat16))
            del awq
    for name, p in list(model.named_parameters()):
        if p.device.type == "meta":
            value = torch.ones(p.shape, device=device, dtype=torch.bfloat16) if p.ndim == 1 and name.endswith("weight") \
                else (torch.randn(p.shape, device=device, generator=gen) * 0.02).to(torch.bfloat16)
            parent, _, child = name.rpartition(".")
            setattr(dict(model.named_modules())[parent], child, torch.nn.Parameter(value, requires_grad=False))
    model.to(device).eval()
    ckpt = Checkpoint(model=model, tokenizer=AutoTokenizer.from_pretrained(str(tmp)), directory=tmp, revision="random",
                      processing=VideoProcessing(), quantization="awq-int4 (built in memory)")
    return Engine(ckpt, options, model_name="Qwen2.5-VL-72B-shaped (random)")


def resident_gib(engine) -> dict:
    from moments.workers.model.quant import int4_weight_bytes

    params = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in engine.model.buffers())
    return {"weights_gib": (params + buffers) / 2**30, "int4_gib": int4_weight_bytes(engine.model) / 2**30,
            "allocated_gib": torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0}


def synthetic_tokens(engine, n_tokens: int, seed: int = 0):
    from moments.workers.model.engine import VisualTokens

    side = 32 if n_tokens >= 1024 else 4
    t = max(1, n_tokens // (side * side // 4))
    hidden = engine.model.config.text_config.hidden_size
    gen = torch.Generator().manual_seed(seed)
    embeds = (torch.randn(t * side * side // 4, hidden, generator=gen) * 0.5).to(engine.dtype)
    return VisualTokens(embeds=embeds, grid_thw=(t, side, side), second_per_grid_ts=2.0,
                        frame_times_s=tuple(float(i) for i in range(2 * t)), fingerprint=engine.fingerprint)


def decode_ms(b: Bench, engine, prefix, tokens, n_new: int) -> dict:
    """ms per generated token on the batch decoder (one lane): two question lengths, the difference."""
    engine.generate(tokens, [QUESTIONS[0]], max_new_tokens=4, prefix=prefix)  # graphs captured
    out = {}
    for n in (4, n_new):
        b.sync()
        t = time.perf_counter()
        g = engine.generate(tokens, [QUESTIONS[1]], max_new_tokens=n, prefix=prefix)[0]
        b.sync()
        out[n] = (time.perf_counter() - t, len(engine.tokenizer(g.text).input_ids) if g.text else 0)
    (t_small, _), (t_big, _) = out[4], out[n_new]
    return {"ms_per_token": (t_big - t_small) / (n_new - 4) * 1e3, "answer_s": t_big}


def logits_compare(engine_a, engine_b, n_tokens: int) -> dict:
    """Every position's logits of [system][video][question] through both engines (see workers.model.numerics)."""
    from moments.workers.model.numerics import compare_logits

    return compare_logits(engine_a, engine_b, synthetic_tokens(engine_a, n_tokens, seed=3), QUESTIONS[2])


def batching(b: Bench, engine, ctx: int, max_new: int, tiny: bool) -> None:
    tokens = synthetic_tokens(engine, ctx, seed=7)
    prefix = engine.prefill(tokens)
    engine.generate(tokens, QUESTIONS[:2], max_new_tokens=4, prefix=prefix)
    many = [f"{q} {i}" for i in range(4) for q in QUESTIONS][:16]
    for n in (1, 4, 16):
        if left_s() < 30:
            return
        with b.stage(f"batch_{n}_queries_one_prefix", context=ctx, max_new_tokens=max_new) as rec:
            t = time.perf_counter()
            engine.generate(tokens, many[:n], max_new_tokens=max_new, prefix=prefix)
            b.sync()
            rec["batched_s"] = time.perf_counter() - t
            t = time.perf_counter()
            for q in many[:n]:  # the baseline: one question after another (today's path)
                engine.generate(tokens, [q], max_new_tokens=max_new, prefix=prefix)
            b.sync()
            rec["sequential_s"] = time.perf_counter() - t
    s1 = b.r["stages"].get("batch_1_queries_one_prefix", {}).get("batched_s")
    s16 = b.r["stages"].get("batch_16_queries_one_prefix", {}).get("batched_s")
    if s1 and s16:
        b.r["stages"]["batch_16_queries_one_prefix"]["ratio_to_one"] = s16 / s1
    # Concurrent callers, each on its own hot prefix.
    n_videos = 4 if tiny else 16
    prefixes = []
    for v in range(n_videos):
        if left_s() < 40:
            return
        t = synthetic_tokens(engine, ctx // 4, seed=100 + v)
        prefixes.append((t, engine.prefill(t)))
    for clients in (1, 4, 16):
        if left_s() < 30 or clients > len(prefixes):
            return
        with b.stage(f"concurrent_{clients}_clients", context=ctx // 4, max_new_tokens=max_new) as rec:
            lat: list[float] = []
            lock = threading.Lock()
            per_client = 2

            def client(k):
                t, p = prefixes[k % len(prefixes)]
                for j in range(per_client):
                    s = time.perf_counter()
                    engine.generate(t, [QUESTIONS[(k + j) % len(QUESTIONS)]], max_new_tokens=max_new, prefix=p)
                    with lock:
                        lat.append(time.perf_counter() - s)

            start = time.perf_counter()
            threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            wall = time.perf_counter() - start
            rec["questions_per_s"] = len(lat) / wall
            rec["p50_s"], rec["p99_s"] = float(np.percentile(lat, 50)), float(np.percentile(lat, 99))
            base = b.r["stages"].get("concurrent_1_clients", {}).get("questions_per_s")
            if base:
                rec["speedup_vs_one_client"] = rec["questions_per_s"] / base


def profile_step(b: Bench, engine, prefix, tokens) -> None:
    """Where a decode step's time goes (eager step on the same buffers: kernels by CUDA time)."""
    from torch.profiler import ProfilerActivity, profile

    if not b.cuda:
        return
    engine.generate(tokens, [QUESTIONS[3]], max_new_tokens=2, prefix=prefix)
    d = engine._scheduler.decoder
    with b.stage("profile_decode_step_32k") as rec, engine._lock, torch.inference_mode():
        d.token_in.zero_()
        d.pos_in.zero_()
        attend = d._attend(slice(0, 1))
        d._step_body(1, 1, attend)
        b.sync()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            d._step_body(1, 1, attend)
            b.sync()
        events = sorted(prof.key_averages(), key=lambda e: -getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0)))
        total = sum(getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0)) for e in events)
        rec["eager_step_gpu_ms"] = total / 1e3
        from torch.autograd import DeviceType

        rec["kernels_per_step"] = sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)
        key = (1, 1, attend)
        graph = d._graphs.get(key) or d._capture(key)
        graph.replay()
        b.sync()
        t = time.perf_counter()
        for _ in range(50):
            graph.replay()
        b.sync()
        rec["graph_replay_ms"] = (time.perf_counter() - t) / 50 * 1e3
        rec["gap_per_kernel_us"] = (rec["graph_replay_ms"] - rec["eager_step_gpu_ms"]) * 1e3 / max(1, rec["kernels_per_step"])
        rec["top"] = [(e.key[:60], round(getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0)) / 1e3, 3))
                      for e in events[:12]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gpu4bit")))
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("BENCH_TMP", "/tmp")) / "ckpt")
    parser.add_argument("--tiny", action="store_true", help="every stage on tiny shapes (CPU)")
    parser.add_argument("--seven-only", action="store_true",
                        help="the 7B stages only (numerics, prefill, decode, profile, batching, fp16 baseline)")
    args = parser.parse_args(argv)
    from moments.workers.model.engine import Engine, EngineOptions

    b = Bench(args.out, args.tiny)
    b.r["meta"].update(torch=torch.__version__, device=torch.cuda.get_device_name(0) if b.cuda else "cpu",
                       note="random weights; compile off in both paths (eager fused prefill); no video decode")
    import transformers

    b.r["meta"]["transformers"] = transformers.__version__
    measure_rates(b)
    ctx_long = 2048 if args.tiny else 32768
    ctx_short = 256 if args.tiny else 1024
    opts = EngineOptions(compile=False, fused_prefill=True, fast_decode=True, decode_slots=16, decode_lanes=16, awq_kernel="int4",
                         decode_suffix=256, decode_bucket=64 if args.tiny else 1024,
                         decode_grow=256 if args.tiny else 8192)
    text7 = TINY if args.tiny else SIZES["7B"]
    vision = TINY_VISION if args.tiny else VISION
    group = 32 if args.tiny else GROUP

    with b.stage("int4_micro_7b_layer") as rec:
        import torch.nn.functional as F

        from moments.workers.model.quant import Int4Linear
        h, inter = text7["hidden_size"], text7["intermediate_size"]
        kvd = text7["num_key_value_heads"] * (h // text7["num_attention_heads"])
        gen = torch.Generator(device=b.dev).manual_seed(1)
        shapes = [(h, h), (kvd, h), (kvd, h), (h, h), (inter, h), (inter, h), (h, inter)]
        lins = [Int4Linear(**{k: v for k, v in random_awq(s, group, b.dev, gen).items()}, bias=None, group_size=group,
                           device=b.dev, dtype=torch.bfloat16) for s in shapes]
        ws = [lin.dequantized(torch.float16) for lin in lins]
        for m in (1, 16, 4096 if not args.tiny else 128):
            x = torch.randn(m, h, device=b.dev, dtype=torch.bfloat16)
            xi = torch.randn(m, inter, device=b.dev, dtype=torch.bfloat16)
            ins = [x, x, x, x, x, x, xi]
            rec[f"int4_M{m}_us"] = b.timed(lambda: [lin(v) for lin, v in zip(lins, ins)], repeat=20, warmup=3) * 1e6
            ins16 = [t.half() for t in ins]
            rec[f"fp16_M{m}_us"] = b.timed(lambda: [F.linear(v, w) for w, v in zip(ws, ins16)], repeat=20, warmup=3) * 1e6
        y4 = lins[0](x[:1])
        y16 = F.linear(x[:1].half(), ws[0])
        rec["rel_err_vs_dequant"] = float((y4.float() - y16.float()).norm() / y16.float().norm())

    path7 = args.work / "7b"
    with b.stage("build_7b_checkpoint") as rec:
        rec.update(write_checkpoint(path7, text7, vision, group, b.dev))
    with b.stage("load_7b_int4") as rec:
        t = time.perf_counter()
        e4 = Engine.load(str(path7), opts)
        rec["load_s"] = time.perf_counter() - t
        rec["quantization"] = e4.quantization
        rec.update(resident_gib(e4))
        rec["vision_dtype"] = str(next(e4.model.model.visual.parameters()).dtype)
        rec["prefill_fused"] = e4.prefill_fused
    fp16_opts = replace(opts, decode_slots=2)
    with b.stage("load_7b_dequantized_fp16") as rec:
        t = time.perf_counter()
        e16 = Engine.load(str(path7), fp16_opts, awq_kernel="dequantize", dtype="float16")
        rec["load_s"] = time.perf_counter() - t
        rec.update(resident_gib(e16))
        rec["allocated_gib_both"] = rec.pop("allocated_gib")
    with b.stage("numerics_7b_int4_vs_dequantized_fp16") as rec:
        rec.update(logits_compare(e4, e16, 512 if not args.tiny else 64))
    free(e16)  # the baseline comes back at the end: the 4-bit stages get the whole card first
    del e16
    long_and_short(b, e4, "int4", ctx_short, ctx_long, profile=True)
    for label in ("7b", "7b_warm"):  # the second: vision kernels and decode graphs already warm
        if left_s() > 150:
            sixty_minutes(b, e4, label, args.tiny)
    if left_s() > 120:
        batching(b, e4, ctx_short * 8 if not args.tiny else 512, 24, args.tiny)
    free(e4)
    del e4
    if left_s() > 60:  # the baseline: the same checkpoint dequantized to fp16 (today's path)
        with b.stage("reload_7b_dequantized_fp16") as rec:
            t = time.perf_counter()
            e16 = Engine.load(str(path7), fp16_opts, awq_kernel="dequantize", dtype="float16")
            rec["load_s"] = time.perf_counter() - t
        long_and_short(b, e16, "fp16", ctx_short, ctx_long, profile=False)
        free(e16)
        del e16
    if left_s() > 100 and not args.seven_only:
        text72 = TINY if args.tiny else SIZES["72B"]
        with b.stage("build_72b_in_memory") as rec:
            t = time.perf_counter()
            e72 = in_memory_int4_engine(text72, vision, group, b.dev, replace(opts, decode_slots=1, decode_lanes=4))
            rec["build_s"] = time.perf_counter() - t
            rec.update(resident_gib(e72))
        if left_s() > 50:
            with b.stage("decode_32k_72b_int4") as rec:
                tokens = synthetic_tokens(e72, ctx_long, seed=5)
                t = time.perf_counter()
                prefix = e72.prefill(tokens)
                rec["prefill_s"] = time.perf_counter() - t
                rec.update(decode_ms(b, e72, prefix, tokens, 20))
                del prefix
        if left_s() > 60:
            sixty_minutes(b, e72, "72b", args.tiny)
        free(e72)
        del e72
    if left_s() > 60 and not args.seven_only:
        path3 = args.work / "3b"
        text3 = TINY if args.tiny else SIZES["3B"]
        with b.stage("build_load_3b") as rec:
            rec.update(write_checkpoint(path3, text3, vision, group, b.dev))
            t = time.perf_counter()
            e3 = Engine.load(str(path3), opts)
            rec["load_s"] = time.perf_counter() - t
            rec["quantization"] = e3.quantization
            rec.update(resident_gib(e3))
        prefix = None
        with b.stage("decode_32k_3b_int4") as rec:
            tokens = synthetic_tokens(e3, ctx_long, seed=4)
            t = time.perf_counter()
            prefix = e3.prefill(tokens)
            rec["prefill_s"] = time.perf_counter() - t
            rec.update(decode_ms(b, e3, prefix, tokens, 36))
        del prefix
        free(e3)
        del e3
    b.r["meta"]["elapsed_s"] = time.monotonic() - T0
    b.save()
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "top"} for k, v in b.r["stages"].items()},
                     default=str)[:6000])
    return 0


def long_and_short(b: Bench, e, label: str, ctx_short: int, ctx_long: int, profile: bool) -> None:
    """Prefill of a long context, then decode ms/token at a short and a long prefix."""
    if left_s() < 60:
        return
    with b.stage(f"prefill_32k_7b_{label}", tokens=ctx_long) as rec:
        tokens = synthetic_tokens(e, ctx_long)
        e.prefill(tokens)
        rec["prefill_s"] = b.timed(lambda: e.prefill(tokens), repeat=2, warmup=0)
        rec["floor_s"] = 2.0 * tokens.n_tokens * lm_linear_params(e.model.config) / b.rate
    for ctx in (ctx_short, ctx_long):
        if left_s() < 40:
            return
        prefix = None
        with b.stage(f"decode_{ctx}_7b_{label}") as rec:
            tokens = synthetic_tokens(e, ctx, seed=2)
            prefix = e.prefill(tokens)
            rec.update(decode_ms(b, e, prefix, tokens, 36))
        if profile and prefix is not None and ctx == ctx_long and left_s() > 60:
            profile_step(b, e, prefix, tokens)
        del prefix


def free(engine) -> None:
    import gc

    engine.close()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sixty_minutes(b: Bench, engine, label: str, tiny: bool) -> None:
    """A 60-minute video at the default plan: 768 frames (364x644 for 720p at the 24k budget; the
    tiny run: small) through the vision tower, prefill, first answer; then a repeat on the hot prefix."""
    from moments.media.sampling import SamplingOptions, plan_sampling

    plan = plan_sampling(3600.0, 30.0, 1280, 720, SamplingOptions() if not tiny else
                         SamplingOptions(max_frames=16, budget_tokens=512, min_pixels=3136, max_pixels=6272))
    frames = np.random.default_rng(0).integers(0, 255, (plan.frames, plan.height, plan.width, 3), dtype=np.uint8)
    with b.stage(f"sixty_minutes_{label}", frames=plan.frames, size=f"{plan.width}x{plan.height}",
                 visual_tokens=plan.visual_tokens) as rec:
        t = time.perf_counter()
        tokens = engine.encode(frames, plan)
        b.sync()
        rec["encode_s"] = time.perf_counter() - t
        t = time.perf_counter()
        prefix = engine.prefill(tokens)
        b.sync()
        rec["prefill_s"] = time.perf_counter() - t
        t = time.perf_counter()
        g = engine.generate(tokens, [QUESTIONS[0]], max_new_tokens=16, prefix=prefix)[0]
        rec["answer_s"] = time.perf_counter() - t
        rec["first_answer_s"] = rec["encode_s"] + rec["prefill_s"] + rec["answer_s"]
        reps = []
        for q in QUESTIONS[1:4]:
            t = time.perf_counter()
            engine.generate(tokens, [q], max_new_tokens=16, prefix=prefix)
            reps.append(time.perf_counter() - t)
        rec["hot_kv_repeat_p50_s"] = float(np.median(reps))
        rec["answer_chars"] = len(g.text)


if __name__ == "__main__":
    sys.exit(main())
