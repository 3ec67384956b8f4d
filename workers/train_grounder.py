"""Train the tiny grounder shipped in ``moments/assets/grounder``: a small Qwen2.5-VL (the same
transformers classes and checkpoint layout as the 7B, the project's tiny tokenizer) that answers
"when does the <colour> <shape> appear?" about synthetic videos, in the 7B's answer form.

Each example goes through the project's own path: a :mod:`workers.sampling` plan (dynamic FPS,
``second_per_grid_ts``), frames at the plan's times (rendered with numpy at the frame a player shows
at that time, then scaled by swscale like the decoder), the engine's patchify and M-RoPE position
ids, the :mod:`workers.prompt` text, and the answer :func:`workers.answer_parser.format_segment`
writes. The loss is on the answer tokens only. The model can only learn absolute times from the
temporal position ids (2 per second), so a wrong fps or ``second_per_grid_ts`` at inference moves
every answer.

CLI (the shipped checkpoint, ~14 min on a shared 2-core CPU)::

    python -m workers.train_grounder moments/assets/grounder --steps 1400 --batch-size 6 \
        --eval-every 200 --stop-after-steps 800
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import random
import time
from pathlib import Path

import av
import numpy as np
import torch

from moments.synthetic import Scene, frame_times_s, random_scene, render_frame, shown_time_s
from workers import prompt
from workers.answer_parser import format_segment
from workers.decode import INTERPOLATION
from workers.engine import Engine, VideoProcessing, mrope_positions, pixel_values_videos
from workers.sampling import SamplingOptions, SamplingPlan, plan_sampling
from workers.tiny_model import build_tiny_model, legacy_key

log = logging.getLogger(__name__)

SAMPLING_FILE = "moments_sampling.json"
"""Per-frame pixel bounds the grounder was trained with; the sampling plan must use them."""
MIN_PIXELS = 56 * 56
MAX_PIXELS = 2 * 56 * 56
"""A 4:3 video becomes 56x84 frames: 6 visual tokens per 2-frame step."""
VIDEO_SIZE = (224, 168)
TRAIN_MAX_FRAMES = (16, 24, 32, 48, 64, 64, 64)
"""Frame caps drawn per example, so one duration is seen at several sampled rates (2/k fps,
``second_per_grid_ts`` k). Evaluate with ``--max-frames 64 --budget-tokens 512`` (the tests' stack)."""
BUDGET_TOKENS = 512
TRAIN_DURATION_S = (20.0, 300.0)
"""Training videos are whole seconds, log-uniform in this range; evaluation uses other lengths."""
HELD_OUT_DURATIONS_S = (23.5, 37.5, 53.0, 67.5, 81.0, 96.5, 117.0, 143.0, 188.5, 251.0)
"""Lengths never drawn for training (half-second ones cannot be; whole ones are skipped)."""

# Model sizes: a 128-wide, 4-layer decoder with 64-wide heads. The temporal M-RoPE section gets 16
# of the 32 rotary frequencies (rope_theta 1e6: periods from 3 s to 35 min at 2 ids per second),
# so time is readable at every scale from the first to the last frame of a 20 min video.
TEXT = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2,
            intermediate_size=384)
MROPE_SECTION = [16, 8, 8]
VISION = dict(depth=2, hidden_size=64, num_heads=2, intermediate_size=128)


def grounder_config(cfg: dict) -> dict:
    """The tiny builder's config dict with the grounder's sizes."""
    cfg = json.loads(json.dumps(cfg))
    cfg.update(TEXT)
    cfg["max_window_layers"] = TEXT["num_hidden_layers"]
    cfg["rope_scaling"] = {"type": "mrope", "mrope_section": MROPE_SECTION}
    cfg["vision_config"].update(VISION, out_hidden_size=TEXT["hidden_size"],
                                fullatt_block_indexes=[VISION["depth"] - 1], tokens_per_second=2)
    cfg["torch_dtype"] = "float32"
    return cfg


def sampling_options(max_frames: int = 64, budget_tokens: int = BUDGET_TOKENS) -> SamplingOptions:
    return SamplingOptions(max_frames=max_frames, budget_tokens=budget_tokens, min_pixels=MIN_PIXELS,
                           max_pixels=MAX_PIXELS)


def plan_for(scene: Scene, options: SamplingOptions, size: tuple[int, int] = VIDEO_SIZE) -> SamplingPlan:
    return plan_sampling(scene.duration_s, scene.fps, size[0], size[1], options)


def scene_frames(scene: Scene, plan: SamplingPlan, size: tuple[int, int] = VIDEO_SIZE) -> np.ndarray:
    """The plan's frames as the decoder would return them from the scene's video file."""
    times = frame_times_s(scene.duration_s, scene.fps, vfr=scene.vfr, seed=scene.seed)
    out = np.empty((plan.frames, plan.height, plan.width, 3), np.uint8)
    cache: dict[float, np.ndarray] = {}
    for i, t in enumerate(plan.frame_times_s):
        shown = shown_time_s(times, t)
        if shown not in cache:
            rgb = render_frame(size[0], size[1], shown, scene.events)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
            cache[shown] = frame.reformat(width=plan.width, height=plan.height, format="rgb24",
                                          interpolation=INTERPOLATION).to_ndarray()
        out[i] = cache[shown]
    return out


def training_duration(rng: random.Random) -> float:
    lo, hi = TRAIN_DURATION_S
    while True:
        d = float(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))
        if d not in HELD_OUT_DURATIONS_S:
            return d


class Examples:
    """Training example number ``i``: a function of (seed, i) only, so a run is reproducible
    whichever process renders it."""

    def __init__(self, tokenizer, seed: int, single_event_until: int = 0) -> None:
        self.tok = tokenizer
        self.seed = seed
        self.single_event_until = single_event_until
        """Curriculum: examples before this index show one event, so finding *where* comes before
        telling events apart by the query."""
        self.end_id = tokenizer.convert_tokens_to_ids(prompt.IM_END)

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def __call__(self, i: int) -> dict:
        rng = random.Random(self.seed * 1_000_003 + i)
        scene = random_scene(rng, training_duration(rng), max_events=1 if i < self.single_event_until else 3)
        plan = plan_for(scene, sampling_options(rng.choice(TRAIN_MAX_FRAMES)))
        event = rng.choice(scene.events)
        prefix = self.ids(prompt.video_prefix_text(plan.visual_tokens))
        question = self.ids(prompt.question_suffix_text(event.query))
        answer = self.ids(format_segment(event.start_s, event.end_s)) + [self.end_id]
        return {"scene": scene, "plan": plan, "frames": scene_frames(scene, plan),
                "ids": prefix + question + answer, "n_answer": len(answer)}


def batch_loss(model, batch: list[dict], proc: VideoProcessing) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens over a batch (vision tower run once for all)."""
    cfg = model.config
    pixels, grids = [], []
    for ex in batch:
        p, thw = pixel_values_videos(ex["frames"], proc)
        pixels.append(p)
        grids.append(thw)
    feats = model.model.get_video_features(torch.cat(pixels), torch.tensor(grids)).pooler_output
    embed = model.get_input_embeddings()
    total = torch.zeros(())
    for ex, video, thw in zip(batch, feats, grids):
        ids = torch.tensor([ex["ids"]])
        positions, _ = mrope_positions(ex["ids"], cfg.video_token_id, thw, ex["plan"].second_per_grid_ts,
                                       cfg.vision_config.tokens_per_second, cfg.vision_config.spatial_merge_size)
        x = embed(ids)
        mask = (ids == cfg.video_token_id).unsqueeze(-1).expand_as(x)
        x = x.masked_scatter(mask, video.to(x.dtype))
        n = ex["n_answer"]
        out = model.model.language_model(inputs_embeds=x, position_ids=positions[:, None, :], use_cache=False)
        logits = model.lm_head(out.last_hidden_state[0, -n - 1:-1])
        total = total + torch.nn.functional.cross_entropy(logits, ids[0, -n:])
    return total / len(batch)


def iou(a: tuple[float, float], b: tuple[float, float]) -> float:
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union if union > 0 else 0.0


def quick_eval(engine: Engine, scenes: list[Scene]) -> float:
    """Mean IoU of the engine's first segment over every event of ``scenes`` (rendered frames)."""
    scores = []
    for scene in scenes:
        plan = plan_for(scene, sampling_options())
        tokens = engine.encode(scene_frames(scene, plan), plan)
        answers = engine.answer(tokens, [e.query for e in scene.events], max_new_tokens=24,
                                duration_s=scene.duration_s)
        for event, a in zip(scene.events, answers):
            seg = a.segments[0] if a.segments else None
            scores.append(iou((seg.start_s, seg.end_s), (event.start_s, event.end_s)) if seg else 0.0)
    return float(np.mean(scores))


def save(model, cfg: dict, out: Path) -> None:
    from safetensors.torch import save_file

    state = {legacy_key(k): v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def train(out: Path, *, steps: int, batch_size: int, lr: float, seed: int, eval_every: int, threads: int,
          single_event_fraction: float, stop_after_steps: int = 0,
          time_limit_s: float) -> dict:
    from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out = Path(out)
    build_tiny_model(out, seed=seed)  # tokenizer, chat template, processor configs, generation config
    cfg = grounder_config(json.loads((out / "config.json").read_text()))
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (out / SAMPLING_FILE).write_text(json.dumps({"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS}) + "\n")
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**cfg)).train()
    tok = AutoTokenizer.from_pretrained(str(out))
    proc = VideoProcessing.from_model_dir(out)
    engine = Engine(model, tok, model_name="train", revision="train", device=torch.device("cpu"),
                    dtype=torch.float32, processing=proc)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("training %.2fM parameters for %d steps of %d", n_params / 1e6, steps, batch_size)

    examples = Examples(tok, seed, single_event_until=int(steps * batch_size * single_event_fraction))
    # One child process renders examples while this one trains (frames are cheap to pickle).
    pool = multiprocessing.get_context("fork").Pool(1)
    stream = pool.imap(examples, range(steps * batch_size), chunksize=batch_size)
    eval_rng = random.Random(seed + 1)
    eval_scenes = [random_scene(eval_rng, d) for d in HELD_OUT_DURATIONS_S]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    history = []
    started = time.monotonic()
    ema = None
    for step in range(1, steps + 1):
        loss = batch_loss(model, [next(stream) for _ in range(batch_size)], proc)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        elapsed = time.monotonic() - started
        if step % 25 == 0:
            log.info("step %d loss %.4f (ema %.4f) lr %.2e %.0f s", step, loss.item(), ema,
                     sched.get_last_lr()[0], elapsed)
        last = step == steps or step == stop_after_steps or elapsed > time_limit_s
        if step % eval_every == 0 or last:
            model.eval()
            miou = quick_eval(engine, eval_scenes)
            model.train()
            history.append({"step": step, "loss_ema": round(ema, 4), "held_out_miou": round(miou, 4),
                            "elapsed_s": round(elapsed)})
            log.info("step %d held-out mIoU %.3f", step, miou)
            save(model, cfg, out)
        if last:
            break
    pool.terminate()
    summary = {"steps": step, "batch_size": batch_size, "lr": lr, "seed": seed, "parameters": n_params,
               "train_s": round(time.monotonic() - started), "history": history,
               "torch": torch.__version__}
    (out / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the tiny grounder on synthetic event videos.")
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is fastest for these tiny matrices on a shared 2-core box)")
    parser.add_argument("--single-event-fraction", type=float, default=0.0,
                        help="first part of the run with one event per video (curriculum)")
    parser.add_argument("--stop-after-steps", type=int, default=0,
                        help="stop (and save) here, with the learning-rate schedule of --steps")
    parser.add_argument("--time-limit-s", type=float, default=3300.0, help="stop (and save) after this")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    summary = train(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                    eval_every=args.eval_every, threads=args.threads,
                    single_event_fraction=args.single_event_fraction, stop_after_steps=args.stop_after_steps,
                    time_limit_s=args.time_limit_s)
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}))


if __name__ == "__main__":
    main()
