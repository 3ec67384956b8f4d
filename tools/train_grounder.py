"""Train the tiny grounder shipped in ``moments/assets/grounder``: a small Qwen2.5-VL (the same
transformers classes and checkpoint layout as the 7B, the project's tiny tokenizer) that answers
"when does the <colour> <shape> appear?" about synthetic videos, in the 7B's answer form.

Each example goes through the project's own path: a :mod:`moments.media.sampling` plan (dynamic FPS,
``second_per_grid_ts``), frames at the plan's times (rendered with numpy at the frame a player shows
at that time, then scaled by swscale like the decoder), the engine's patchify and M-RoPE position
ids, the :mod:`moments.workers.model.prompt` text, and the answer :func:`moments.workers.model.answer_parser.format_segment`
writes. The loss is on the answer tokens, plus two training-only auxiliary losses at the middle
layer: per video step, its time and the colours on screen (early in the run), and a binding loss
that scores each video step against the token that predicts the answer (is the *asked* event
happening here?). Every training video shows 2-3 events ("appears", or an object on screen that
"moves left" during its interval) and every one of them is asked about, so the model must read the
query to answer. The model can only learn absolute times from the temporal position ids (2 per
second), so a wrong fps or ``second_per_grid_ts`` at inference moves every answer.

CLI: the shipped checkpoint came from random init in one run on one H100 (14 render processes,
time-limited to 510 s; the defaults are that recipe)::

    python -m moments.tools.train_grounder OUT --device cuda --workers 14 --time-limit-s 510 \
        --eval-every-s 115 --eval-at-start --steps 100000

It runs on a CPU too, but a step of 64 takes ~12 s on a 2-core machine: an hour gives ~300 steps,
and the H100 run was at quick held-out mIoU 0.46 after 441 steps and 0.93 after 1830.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import av
import numpy as np
import torch

from moments.media.decode import INTERPOLATION
from moments.media.sampling import SamplingOptions, SamplingPlan, plan_sampling
from moments.tools.synthetic import (
    COLORS,
    FOREIGN,
    NATIVE_FPS,
    Scene,
    absent_queries,
    frame_times_s,
    random_scene,
    render_frame,
    shown_time_s,
    wording,
)
from moments.tools.tiny_model import build_tiny_model, legacy_key
from moments.workers.model import prompt
from moments.workers.model.answer_parser import format_segments
from moments.workers.model.engine import Engine, EngineOptions
from moments.workers.model.loading import SAMPLING_FILE, Checkpoint
from moments.workers.model.positions import mrope_positions
from moments.workers.model.preprocessing import VideoProcessing, pixel_values_videos
from moments.tools.scoring import auroc, best_iou
from moments.workers.answers import answer_segments

log = logging.getLogger(__name__)

MIN_PIXELS = 56 * 56
MAX_PIXELS = 2 * 56 * 56
"""A 4:3 video becomes 56x84 frames: 6 visual tokens per 2-frame step."""
VIDEO_SIZE = (224, 168)
TRAIN_MAX_FRAMES = (16, 24, 32, 48, 64, 64, 64)
"""Frame caps drawn per example, so one duration is seen at several sampled rates (2/k fps,
``second_per_grid_ts`` k). Evaluate with ``--max-frames 64 --budget-tokens 512`` (the tests' stack)."""
BUDGET_TOKENS = 512
TRAIN_DURATION_S = (20.0, 3600.0)
"""Training videos are whole seconds, log-uniform in this range (the upper end is ``--max-duration-s``);
evaluation uses other lengths."""
HELD_OUT_DURATIONS_S = (23.5, 37.5, 53.0, 67.5, 81.0, 96.5, 117.0, 143.0, 188.5, 251.0, 415.5, 737.0, 1187.5)
"""Lengths never drawn for training (half-second ones cannot be; whole ones are skipped)."""

PATCH, MERGE, TOKENS_PER_SECOND = 14, 2, 2
"""The grounder's patch size, spatial merge and ``tokens_per_second`` (as in its config)."""

# Model sizes: a 192-wide, 6-layer decoder with 3 heads of 64 (~3.4 M parameters, ~13.5 MB float32). The temporal M-RoPE section gets 16
# of the 32 rotary frequencies (rope_theta 1e6: periods from 3 s to 35 min at 2 ids per second),
# so time is readable at every scale from the first to the last frame of a 20 min video.
TEXT = dict(hidden_size=192, num_hidden_layers=6, num_attention_heads=3, num_key_value_heads=3,
            intermediate_size=512)
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


def checkpoint_bounds() -> dict[str, int]:
    """What the grounder was trained with: every sampling plan for it stays within these."""
    return {"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS, "max_frames": max(TRAIN_MAX_FRAMES),
            "budget_tokens": BUDGET_TOKENS}


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
            rgb = np.zeros((size[1], size[0], 3), np.uint8) if scene.black else \
                render_frame(size[0], size[1], shown, scene.events)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
            cache[shown] = frame.reformat(width=plan.width, height=plan.height, format="rgb24",
                                          interpolation=INTERPOLATION).to_ndarray()
        out[i] = cache[shown]
    return out


def training_duration(rng: random.Random, hi: float = TRAIN_DURATION_S[1]) -> float:
    lo = TRAIN_DURATION_S[0]
    while True:
        d = float(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))
        if d not in HELD_OUT_DURATIONS_S:
            return d


@dataclass(frozen=True)
class DataMix:
    """What training examples look like. Defaults: the recipe of the shipped grounder."""

    min_events: int = 1
    max_events: int = 3
    max_duration_s: float = 3600.0
    """Videos are 20 s to this long (log-uniform, whole seconds)."""
    move_fraction: float = 0.3
    """Share of events where an object on screen slides left (else it appears)."""
    short_event_fraction: float = 0.4
    """Share of scenes whose events last SHORT_EVENT_S seconds instead of 12-45% of the video."""
    repeat_fraction: float = 0.25
    """Share of events that happen 2-3 times."""
    empty_fraction: float = 0.04
    black_fraction: float = 0.02
    """Scenes with no event at all; black ones show nothing but black."""
    window_fraction: float = 0.5
    """Share of examples that see a window of the video (as a search pass does), not all of it."""
    absent_fraction: float = 0.2
    """Share of the asked queries that name something the example does not show."""
    wording_fraction: float = 0.5
    """Share of queries asked in another wording than the canonical one (case variants included)."""
    foreign_fraction: float = 0.03
    """Share of examples with a query in another language (answered "not in the video")."""


SHORT_EVENT_S = (2.0, 12.0)
WINDOW_S = (16.0, 1200.0)
"""Window lengths (log-uniform), as the search's coarse (128 s) and zoom (32 s) windows and more."""


def _window(rng: random.Random, scene: Scene) -> tuple[float, float]:
    """A whole-second window of the scene: around an occurrence half of the time, else anywhere."""
    d = scene.duration_s
    span = float(round(math.exp(rng.uniform(math.log(WINDOW_S[0]), math.log(min(WINDOW_S[1], d))))))
    span = min(span, math.floor(d))
    occurrences = [o for e in scene.events for o in e.occurrences]
    if occurrences and rng.random() < 0.5:
        a, b = rng.choice(occurrences)
        lo, hi = max(0, math.ceil(b - span)), min(math.floor(a), math.floor(d - span))
        start = float(rng.randint(lo, hi)) if lo <= hi else float(max(0, min(math.floor(a), math.floor(d - span))))
    else:
        start = float(rng.randint(0, max(0, math.floor(d - span))))
    return start, min(start + span, d)


def seen_occurrences(event, plan: SamplingPlan, shown: list[float], end_s: float) -> list[tuple[float, float]]:
    """The event's occurrences that a sampled frame shows, clipped to [first frame, ``end_s``), relative
    to the first sampled frame (the model's time 0). Occurrences no frame shows cannot be answered."""
    first = plan.frame_times_s[0]
    out = []
    for a, b in event.occurrences:
        if any(a <= t < b for t in shown):
            lo, hi = max(a, first) - first, min(b, end_s) - first
            if hi > lo:
                out.append((lo, hi))
    return out


class Examples:
    """Training example number ``i``: a function of (seed, i) only, so a run is reproducible
    whichever process renders it. Each is a scene (or a window of it) and several questions about
    it: every event it shows (in varied wordings), and questions about what it does not show,
    answered with the "not in the video" sentence."""

    def __init__(self, tokenizer, seed: int, mix: DataMix = DataMix()) -> None:
        self.tok = tokenizer
        self.seed = seed
        self.mix = mix
        self.end_id = tokenizer.convert_tokens_to_ids(prompt.IM_END)
        self.video_token_id = tokenizer.convert_tokens_to_ids(prompt.VIDEO_PAD)
        self.absent_answer = self.ids(prompt.ABSENT_ANSWER) + [self.end_id]

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def scene(self, rng: random.Random) -> Scene:
        m = self.mix
        duration = training_duration(rng, m.max_duration_s)
        r = rng.random()
        if r < m.empty_fraction + m.black_fraction:
            return Scene(duration, rng.choice(NATIVE_FPS), (), vfr=rng.random() < 0.25, seed=rng.randrange(2**31),
                         black=r < m.black_fraction)
        short = rng.random() < m.short_event_fraction
        return random_scene(rng, duration, max_events=m.max_events, min_events=m.min_events,
                            move_fraction=m.move_fraction, event_s=SHORT_EVENT_S if short else None,
                            repeat_fraction=m.repeat_fraction)

    def __call__(self, i: int) -> dict:
        rng = random.Random(self.seed * 1_000_003 + i)
        m = self.mix
        scene = self.scene(rng)
        start_s, end_s = _window(rng, scene) if rng.random() < m.window_fraction else (0.0, scene.duration_s)
        options = replace(sampling_options(rng.choice(TRAIN_MAX_FRAMES)), start_s=start_s,
                          end_s=end_s if end_s < scene.duration_s else None)
        plan = plan_for(scene, options)
        shown = shown_times_s(scene, plan)
        prefix = self.ids(prompt.video_prefix_text(plan.visual_tokens))
        rows: list[tuple[list[int], int]] = []
        asked = []  # per row: the event asked about, or None
        present = []
        for event in scene.events:
            seen = seen_occurrences(event, plan, shown, end_s)
            text = wording(rng, event.color, event.shape, event.kind) if rng.random() < m.wording_fraction \
                else event.query
            if seen:
                present.append((text, self.ids(format_segments(seen)) + [self.end_id], event))
            else:  # nothing of it in view: the right answer is "not in the video"
                rows.append((prefix + self.ids(prompt.question_suffix_text(text)) + self.absent_answer,
                             len(self.absent_answer)))
                asked.append(None)
        for text, answer, event in present:
            rows.append((prefix + self.ids(prompt.question_suffix_text(text)) + answer, len(answer)))
            asked.append(event)
        n_absent = max(1, round(m.absent_fraction / (1 - m.absent_fraction) * len(present))) if present else 2
        queries = absent_queries(rng, scene.events, n_absent, wordings=rng.random() < m.wording_fraction)
        if rng.random() < m.foreign_fraction:
            queries.append(rng.choice(FOREIGN))
        for text in queries:
            rows.append((prefix + self.ids(prompt.question_suffix_text(text)) + self.absent_answer,
                         len(self.absent_answer)))
            asked.append(None)
        # Position ids are computed here, in the render process, so the training loop only stacks arrays.
        grid = (plan.frames // 2, plan.height // PATCH, plan.width // PATCH)
        positions = [mrope_positions(r, self.video_token_id, grid, plan.second_per_grid_ts, TOKENS_PER_SECOND,
                                     MERGE)[0].numpy().astype(np.int32) for r, _ in rows]
        steps = plan.frames // 2
        visible = [step_visibility(e, shown) if e is not None else np.zeros(steps, np.float32) for e in asked]
        return {"scene": scene, "plan": plan, "frames": scene_frames(scene, plan), "grid": grid, "rows": rows,
                "positions": positions, "asked_visible": np.stack(visible), **aux_targets(scene, plan, shown)}


AUX_COLORS = sorted(COLORS)


def shown_times_s(scene: Scene, plan: SamplingPlan) -> list[float]:
    """For each of the plan's frames, the time of the video frame a player shows then."""
    times = frame_times_s(scene.duration_s, scene.fps, vfr=scene.vfr, seed=scene.seed)
    return [shown_time_s(times, t) for t in plan.frame_times_s]


def aux_targets(scene: Scene, plan: SamplingPlan, shown: list[float]) -> dict:
    """Per temporal grid step (2 frames): its time in seconds as the M-RoPE ids say it (id / 2, from
    the first sampled frame), and which colours have an event happening in it. Auxiliary
    training targets read from the LM's middle layer at the video tokens, so that the decoder learns
    early to turn temporal rotary ids into a time value and to see the objects."""
    gt = plan.frames // 2
    step_s = [int(k * 2 * plan.second_per_grid_ts) / 2.0 for k in range(gt)]
    vis = np.zeros((gt, len(AUX_COLORS)), np.float32)
    for e in scene.events:  # colours are distinct within a scene
        vis[:, AUX_COLORS.index(e.color)] = step_visibility(e, shown)
    return {"step_s": np.asarray(step_s, np.float32), "visible": vis}


def step_visibility(event, shown: list[float]) -> np.ndarray:
    """Per temporal grid step (2 frames, shown at ``shown`` times): 1.0 where ``event`` happens (an
    "appear" object is on screen, a "move" object is moving) in either frame."""
    return np.asarray([float(event.active(shown[k]) or event.active(shown[k + 1]))
                       for k in range(0, len(shown), 2)], np.float32)


def _batched_vision_attention(original):
    """Qwen2.5-VL's vision attention without flash-attn loops over every window/frame chunk (thousands
    per training batch). When all chunks have one length (training: every frame is 56x84), run them
    as one batched SDPA call instead; same math. Anything else goes to ``original``."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as m

    def forward(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None, **kwargs):
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        n = int(lengths[0])
        if position_embeddings is None or not bool((lengths == n).all()):
            return original(self, hidden_states, cu_seqlens, position_embeddings=position_embeddings,
                            max_seqlen=max_seqlen, **kwargs)
        seq = hidden_states.shape[0]
        q, k, v = self.qkv(hidden_states).reshape(seq, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = position_embeddings
        q, k = m.apply_rotary_pos_emb_vision(q, k, cos, sin)
        c = seq // n
        q, k, v = (t.reshape(c, n, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=self.scaling)
        return self.proj(o.transpose(1, 2).reshape(seq, -1))

    return forward


def patch_vision_attention() -> None:
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as m

    cls = m.Qwen2_5_VLVisionAttention
    if not getattr(cls, "_moments_batched", False):
        cls.forward = _batched_vision_attention(cls.forward)
        cls._moments_batched = True


class AuxHeads(torch.nn.Module):
    """Training-only heads on the middle layer's video tokens (not saved with the checkpoint)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.time = torch.nn.Linear(hidden, 1 + 3 * 10)  # seconds / 100, and its 3 digits (hundreds, tens, units)
        self.visible = torch.nn.Linear(hidden, len(AUX_COLORS))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.time(h), self.visible(h)


class BindHead(torch.nn.Module):
    """Training-only: from the middle layer, scores each video token against the last prompt token
    (the one that predicts the answer), so that the query's words and the video tokens showing the
    queried object meet in one space early. Step logit = log-sum-exp over the step's tokens."""

    def __init__(self, hidden: int, dim: int = 64) -> None:
        super().__init__()
        self.q = torch.nn.Linear(hidden, dim)
        self.k = torch.nn.Linear(hidden, dim)

    def forward(self, h_query: torch.Tensor, h_video: torch.Tensor) -> torch.Tensor:
        """[B, d], [B, N, d] -> [B, N] scores."""
        return torch.einsum("bd,bnd->bn", self.q(h_query), self.k(h_video)) / self.q.out_features ** 0.5


def video_features(model, batch: list[dict], proc: VideoProcessing, dev: torch.device,
                   one_grid: bool | None = None) -> list[torch.Tensor]:
    """The vision tower's output for each example. When every example has one frame size (training),
    all frames go through as one grid: the tower attends within a 2-frame step (window and full
    attention alike), so this equals one grid per example, without the per-grid Python loops.
    ``one_grid`` False forces a grid per example."""
    frames = [torch.from_numpy(np.ascontiguousarray(ex["frames"])) for ex in batch]
    if one_grid is None:
        one_grid = len({ex["frames"].shape[1:] for ex in batch}) == 1
    if one_grid:
        stacked = torch.cat(frames)
        if dev.type == "cuda":
            stacked = stacked.pin_memory()
        pixels, thw = pixel_values_videos(stacked.to(dev, non_blocking=True), proc)
        feats = model.model.get_video_features(pixels, torch.tensor([thw], device=dev)).pooler_output
        feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats
        per_step = feats.shape[0] // thw[0]
        return list(feats.split([ex["frames"].shape[0] // 2 * per_step for ex in batch]))
    pixels, grids = [], []
    for f in frames:
        p, thw = pixel_values_videos(f.to(dev, non_blocking=True), proc)
        pixels.append(p)
        grids.append(thw)
    feats = model.model.get_video_features(torch.cat(pixels), torch.tensor(grids, device=dev)).pooler_output
    if isinstance(feats, (list, tuple)):
        return list(feats)
    return list(feats.split([g[0] * g[1] * g[2] // 4 for g in grids]))


def batch_loss(model, batch: list[dict], proc: VideoProcessing, aux: AuxHeads | None = None,
               aux_weight: float = 0.0, bind: BindHead | None = None,
               bind_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of the answer tokens over a batch (vision tower run once for all, one padded
    LM forward for all); plus the auxiliary losses. Returns (total, answer loss, aux loss)."""
    cfg = model.config
    dev = next(model.parameters()).device
    feats = video_features(model, batch, proc, dev)
    embed = model.get_input_embeddings()
    # One LM row per query: every event of a video is asked about (the video is encoded once).
    rows = [(e, k) for e, ex in enumerate(batch) for k in range(len(ex["rows"]))]
    B, L = len(rows), max(len(batch[e]["rows"][k][0]) for e, k in rows)
    ids = np.zeros((B, L), np.int64)
    pos = np.zeros((3, B, L), np.int64)
    att = np.zeros((B, L), np.int64)
    targets = np.full((B, L), -100, np.int64)
    last_prompt = np.zeros(B, np.int64)
    for b, (e, k) in enumerate(rows):
        ex = batch[e]
        row_ids, n = ex["rows"][k]
        n_ids = len(row_ids)
        ids[b, :n_ids] = row_ids
        pos[:, b, :n_ids] = ex["positions"][k]
        att[b, :n_ids] = 1
        targets[b, n_ids - n - 1:n_ids - 1] = ids[b, n_ids - n:n_ids]
        last_prompt[b] = n_ids - n - 1
    ids, pos, att, targets = (torch.from_numpy(t).to(dev, non_blocking=True) for t in (ids, pos, att, targets))
    x = embed(ids)
    mask = (ids == cfg.video_token_id).unsqueeze(-1).expand_as(x)
    x = x.masked_scatter(mask, torch.cat([feats[e] for e, _ in rows]).to(x.dtype))
    want_aux = aux is not None and aux_weight > 0
    want_bind = bind is not None and bind_weight > 0
    out = model.model.language_model(inputs_embeds=x, position_ids=pos, attention_mask=att, use_cache=False,
                                     output_hidden_states=want_aux or want_bind)
    logits = model.lm_head(out.last_hidden_state)
    answer = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    aux_loss = torch.zeros((), device=dev)
    if want_aux or want_bind:
        middle = out.hidden_states[len(out.hidden_states) // 2]
    if want_aux:
        first = torch.tensor([b for b, (e, k) in enumerate(rows) if k == 0], device=dev)
        h = middle[first][mask[first][..., 0]]  # video tokens, batch order
        per_step = [f.shape[0] // (ex["frames"].shape[0] // 2) for f, ex in zip(feats, batch)]
        step_s = torch.cat([torch.as_tensor(ex["step_s"]).repeat_interleave(n) for ex, n in zip(batch, per_step)]).to(dev)
        vis = torch.cat([torch.as_tensor(ex["visible"]).repeat_interleave(n, dim=0) for ex, n in zip(batch, per_step)]).to(dev)
        t_out, v_out = aux(h.float())
        sec = step_s.round().long().clamp(0, 999)
        digits = torch.stack([sec // 100, (sec // 10) % 10, sec % 10], dim=1)
        aux_loss = aux_loss + aux_weight * (
            torch.nn.functional.mse_loss(t_out[:, 0], step_s / 100.0)
            + torch.nn.functional.cross_entropy(t_out[:, 1:].reshape(-1, 3, 10).flatten(0, 1), digits.flatten())
            + torch.nn.functional.binary_cross_entropy_with_logits(v_out, vis))
    if want_bind:
        aux_loss = aux_loss + bind_weight * bind_loss(bind, middle, mask[..., 0], rows, batch, feats, last_prompt, dev)
    return answer + aux_loss, answer, aux_loss


def bind_loss(bind: BindHead, middle: torch.Tensor, video_mask: torch.Tensor, rows, batch, feats,
              last_prompt: np.ndarray, dev: torch.device) -> torch.Tensor:
    """Binary cross-entropy of 'the asked event is on screen in this step' from :class:`BindHead`."""
    B = len(rows)
    n_tok = [feats[e].shape[0] for e, _ in rows]
    n_max = max(n_tok)
    start = video_mask.float().argmax(dim=1)  # first video token of each row
    idx = start[:, None] + torch.arange(n_max, device=dev)[None, :]
    valid = torch.arange(n_max, device=dev)[None, :] < torch.tensor(n_tok, device=dev)[:, None]
    idx = torch.where(valid, idx, start[:, None])
    h_video = middle.gather(1, idx[..., None].expand(-1, -1, middle.shape[-1]))
    h_query = middle[torch.arange(B, device=dev), torch.from_numpy(last_prompt).to(dev)]
    scores = bind(h_query.float(), h_video.float()).masked_fill(~valid, -1e4)
    per_step = n_tok[0] // (batch[rows[0][0]]["frames"].shape[0] // 2)
    steps = scores.reshape(B, n_max // per_step, per_step).logsumexp(-1)
    target = np.zeros((B, n_max // per_step), np.float32)
    weight = np.zeros_like(target)
    for b, (e, k) in enumerate(rows):
        vis = batch[e]["asked_visible"][k]
        target[b, :len(vis)] = vis
        weight[b, :len(vis)] = 1.0
    target, weight = torch.from_numpy(target).to(dev), torch.from_numpy(weight).to(dev)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(steps, target, weight=weight, reduction="sum")
    return loss / weight.sum()


def iou(a: tuple[float, float], b: tuple[float, float]) -> float:
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union if union > 0 else 0.0


@dataclass(frozen=True)
class EvalCase:
    """A held-out question for :func:`quick_eval`: a scene, the window looked at, a query, and the truth
    (occurrences relative to the video start; empty: not in the window)."""

    scene: Scene
    start_s: float
    end_s: float | None
    query: str
    truth: tuple[tuple[float, float], ...]


def eval_cases(seed: int, move_fraction: float = 0.3) -> list[EvalCase]:
    """Held-out lengths (never drawn in training): whole videos with their events and two absent
    queries each, and windows like the search's around short events: coarse ones (128 s) and zoom
    ones (a few seconds either side of the event), half of their events moves."""
    rng = random.Random(seed + 1)
    cases = []
    for d in HELD_OUT_DURATIONS_S:
        scene = random_scene(rng, d, min_events=1, move_fraction=move_fraction)
        cases += [EvalCase(scene, 0.0, None, e.query, e.occurrences) for e in scene.events]
        cases += [EvalCase(scene, 0.0, None, q, ()) for q in absent_queries(rng, scene.events, 2)]
    for d in (615.5, 903.5, 1433.5, 2111.5, 2987.5):
        scene = random_scene(rng, d, event_s=(2.0, 8.0), min_events=2, move_fraction=max(0.5, move_fraction))
        for e in scene.events:
            coarse = float(max(0, math.floor(e.start_s) - rng.randint(5, 100)))
            zoom = float(max(0, math.floor(e.start_s) - rng.randint(3, 12)))
            for start, end in ((coarse, min(d, coarse + 128.0)),
                               (zoom, min(d, math.ceil(e.end_s) + rng.randint(3, 30)))):
                inside = tuple((max(a, start), min(b, end)) for a, b in e.occurrences if a < end and b > start)
                cases.append(EvalCase(scene, start, end, e.query, inside))
    return cases


def quick_eval(engine: Engine, cases: list[EvalCase]) -> dict[str, float]:
    """On rendered frames: mIoU of present questions (best segment per occurrence), overall, on the
    search-like windows and on "moves left" questions; the AUROC of the raw presence score between
    present and absent questions; the selection score is mIoU + window mIoU + AUROC."""
    ious, windowed, moves, pos, neg = [], [], [], [], []
    by_view: dict[tuple, list[EvalCase]] = {}
    for c in cases:
        by_view.setdefault((id(c.scene), c.start_s, c.end_s), []).append(c)
    for group in by_view.values():
        first = group[0]
        plan = plan_for(first.scene, replace(sampling_options(), start_s=first.start_s, end_s=first.end_s))
        tokens = engine.encode(scene_frames(first.scene, plan), plan)
        generations = engine.generate(tokens, [c.query for c in group], max_new_tokens=32)
        for c, g in zip(group, generations):
            predicted = [(s.start_s, s.end_s) for s in answer_segments(g, tokens, c.scene.duration_s)]
            if c.truth:
                pos.append(g.raw_presence)
                got = [best_iou(t, predicted) for t in c.truth]
                ious += got
                if c.end_s is not None:
                    windowed += got
                if "moves left" in c.query:
                    moves += got
            else:
                neg.append(g.raw_presence)
    mean = lambda xs: float(np.mean(xs)) if xs else 0.0  # noqa: E731
    area = auroc(pos, neg)
    area = 0.0 if math.isnan(area) else area
    return {"miou": mean(ious), "miou_window": mean(windowed), "miou_move": mean(moves), "auroc": area,
            "selection": mean(ious) + mean(windowed) + area}


def save(model, cfg: dict, out: Path, name: str = "model.safetensors") -> None:
    from safetensors.torch import save_file

    state = {legacy_key(k): v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / name), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


_EXAMPLES: "Examples | None" = None


def _set_examples(examples: "Examples") -> None:
    global _EXAMPLES
    _EXAMPLES = examples


def _render(start: int, n: int) -> list[dict]:
    return [_EXAMPLES(i) for i in range(start, start + n)]


def _prefetch(pool, total: int, *, chunk: int, ahead: int):
    """Examples 0..total-1 in order, rendered by ``pool`` at most ``ahead`` chunks in advance."""
    from collections import deque

    pending, nxt = deque(), 0
    while pending or nxt < total:
        while len(pending) < ahead and nxt < total:
            pending.append(pool.apply_async(_render, (nxt, min(chunk, total - nxt))))
            nxt += chunk
        yield from pending.popleft().get()


def load_init(model, init: Path, cfg: dict) -> None:
    """Copy an existing checkpoint's weights (same grounder config) into ``model`` (strict)."""
    from safetensors.torch import load_file

    init = Path(init)
    init_cfg = json.loads((init / "config.json").read_text())
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "rope_scaling"):
        if init_cfg.get(key) != cfg.get(key):
            raise ValueError(f"--init {init}: config {key} {init_cfg.get(key)!r} != {cfg.get(key)!r}")
    stored = load_file(str(init / "model.safetensors"))
    own = model.state_dict()
    by_legacy = {legacy_key(k): k for k in own}
    state = {by_legacy.get(k, k): v for k, v in stored.items()}
    missing = sorted(set(own) - set(state))
    # lm_head may be tied to the embeddings and then absent from the file.
    if missing == ["lm_head.weight"] and getattr(model.config, "tie_word_embeddings", False):
        missing = []
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"--init {init}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=False)
    log.info("initialized from %s (%d tensors)", init, len(state))


class ReusePool:
    """Batches drawn partly from fresh renders and partly from a pool of already-rendered examples
    kept in memory: each rendered example is used at most ``reuse`` times. A batch takes
    ``ceil(batch_size / reuse)`` fresh examples and fills up from the pool (more fresh ones while
    the pool is short), so the GPU needs ``reuse`` times fewer renders per step. Seeded: the draws
    from the pool depend only on ``seed`` and the order of the stream."""

    def __init__(self, stream, *, reuse: int, seed: int) -> None:
        self.stream = stream
        self.reuse = max(1, reuse)
        self.rng = random.Random(seed * 7919 + 17)
        self.items: list[list] = []  # [example, uses left]
        self.fresh = 0
        self.reused = 0

    def batch(self, batch_size: int) -> list[dict]:
        n_fresh = -(-batch_size // self.reuse)
        n_pool = min(batch_size - n_fresh, len(self.items))
        n_fresh = batch_size - n_pool
        picked = self.rng.sample(range(len(self.items)), n_pool) if n_pool else []
        out = []
        for i in picked:
            entry = self.items[i]
            out.append(entry[0])
            entry[1] -= 1
        if picked:
            self.items = [e for e in self.items if e[1] > 0]
        for _ in range(n_fresh):
            ex = next(self.stream)
            out.append(ex)
            if self.reuse > 1:
                self.items.append([ex, self.reuse - 1])
        self.fresh += n_fresh
        self.reused += n_pool
        return out


def train(out: Path, *, steps: int, batch_size: int, lr: float, seed: int, eval_every: int, threads: int,
          stop_after_steps: int = 0, time_limit_s: float, device: str = "cpu", workers: int = 1,
          aux_weight: float = 0.0, aux_until: float = 1.0, eval_every_s: float = 0.0, command: str = "",
          init: Path | None = None, reuse: int = 1, eval_at_start: bool = False, data_seed: int | None = None,
          bind_weight: float = 0.0, mix: DataMix = DataMix()) -> dict:
    from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = Path(out)
    build_tiny_model(out, seed=seed)  # tokenizer, chat template, processor configs, generation config
    if init is not None:  # the tokenizer the initial weights were trained with
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.json", "generation_config.json"):
            if (Path(init) / name).is_file():
                (out / name).write_bytes((Path(init) / name).read_bytes())
    cfg = grounder_config(json.loads((out / "config.json").read_text()))
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (out / SAMPLING_FILE).write_text(json.dumps(checkpoint_bounds()) + "\n")
    patch_vision_attention()
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**cfg))
    if init is not None:
        load_init(model, init, cfg)
    model = model.to(dev).train()
    aux = AuxHeads(cfg["hidden_size"]).to(dev)
    bind = BindHead(cfg["hidden_size"]).to(dev)
    tok = AutoTokenizer.from_pretrained(str(out))
    proc = VideoProcessing.from_model_dir(out)
    engine = Engine(Checkpoint(model=model, tokenizer=tok, directory=out, revision="train", processing=proc,
                               quantization="none"), EngineOptions(optimize=False), model_name="train")
    n_params = sum(p.numel() for p in model.parameters())
    log.info("training %.2fM parameters for %d steps of %d on %s, %d render workers, aux weight %.2f, "
             "reuse %d, init %s", n_params / 1e6, steps, batch_size, dev, workers, aux_weight, reuse, init)

    data_seed = seed if data_seed is None else data_seed
    examples = Examples(tok, data_seed, mix)
    # Child processes render examples while this one trains (uint8 frames are cheap to pickle), a
    # bounded number of chunks ahead, in order.
    pool = multiprocessing.get_context("fork").Pool(workers, initializer=_set_examples, initargs=(examples,))
    stream = _prefetch(pool, steps * batch_size, chunk=8, ahead=4 * workers)
    data = ReusePool(stream, reuse=reuse, seed=data_seed)
    cases = eval_cases(seed, mix.move_fraction)
    opt = torch.optim.AdamW(list(model.parameters()) + list(aux.parameters()) + list(bind.parameters()),
                            lr=lr, weight_decay=0.01,
                            betas=(0.9, 0.98))
    started = time.monotonic()

    def progress(step: int) -> float:
        """Fraction of the run done: by steps, or by the time limit when that comes first."""
        return min(1.0, max(step / steps, (time.monotonic() - started) / time_limit_s))

    def lr_at(step: int) -> float:
        p = progress(step)
        return lr * min(1.0, p / 0.03 + 0.01) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))

    history = []
    if eval_at_start:
        model.eval()
        with torch.no_grad():
            first = quick_eval(engine, cases)
        model.train()
        history.append({"step": 0, "loss_ema": None, **{k: round(v, 4) for k, v in first.items()}, "elapsed_s": 0})
        log.info("step 0 held-out %s", first)
        started = time.monotonic()  # the schedule and time limit start after this evaluation
    ema = None
    waited = 0.0
    last_eval = started
    best = -1.0
    for step in range(1, steps + 1):
        t0 = time.monotonic()
        batch = data.batch(batch_size)
        waited += time.monotonic() - t0
        w = aux_weight if progress(step) < aux_until else 0.0
        loss, answer, aux_loss = batch_loss(model, batch, proc, aux, w, bind, bind_weight)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        a = answer.item()
        ema = a if ema is None else 0.95 * ema + 0.05 * a
        elapsed = time.monotonic() - started
        if step % 25 == 0:
            log.info("step %d answer loss %.4f (ema %.4f) aux %.4f lr %.2e %.0f s (%.0f s waiting for data, "
                     "%d fresh / %d reused examples)", step, a, ema, aux_loss.item(), opt.param_groups[0]["lr"],
                     elapsed, waited, data.fresh, data.reused)
        last = step == steps or step == stop_after_steps or elapsed > time_limit_s
        due = (step % eval_every == 0) if not eval_every_s else (time.monotonic() - last_eval > eval_every_s)
        if due or last:
            model.eval()
            try:
                with torch.no_grad():
                    scores = quick_eval(engine, cases)
            except Exception:  # an evaluation failure must not lose the run
                log.exception("quick_eval failed")
                scores = {"miou": -1.0, "auroc": -1.0, "selection": -2.0}
            model.train()
            last_eval = time.monotonic()
            history.append({"step": step, "loss_ema": round(ema, 4), **{k: round(v, 4) for k, v in scores.items()},
                            "elapsed_s": round(elapsed)})
            log.info("step %d held-out %s", step, scores)
            save(model, cfg, out)
            if scores["selection"] >= best:
                best = scores["selection"]
                save(model, cfg, out, name="model_best.safetensors")
        if last:
            break
    pool.terminate()
    summary = {"command": command, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
               "steps": step, "batch_size": batch_size, "lr": lr, "seed": seed, "parameters": n_params,
               "aux_weight": aux_weight, "aux_until": aux_until, "workers": workers,
               "train_s": round(time.monotonic() - started), "data_wait_s": round(waited), "best_selection": best,
               "init": str(init) if init is not None else None, "reuse": reuse, "data_seed": data_seed,
               "fresh_examples": data.fresh, "reused_examples": data.reused, "bind_weight": bind_weight,
               "mix": asdict(mix),
               "steps_per_s": round(step / max(1e-9, time.monotonic() - started), 2),
               "history": history, "torch": torch.__version__}
    (out / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    import dataclasses

    parser = argparse.ArgumentParser(description="Train the tiny grounder on synthetic event videos.")
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is fastest for these tiny matrices on a shared 2-core box)")
    parser.add_argument("--stop-after-steps", type=int, default=0,
                        help="stop (and save) here, with the learning-rate schedule of --steps")
    parser.add_argument("--time-limit-s", type=float, default=3300.0,
                        help="stop (and save) after this; the cosine schedule ends here if it comes first")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--workers", type=int, default=1, help="processes rendering examples")
    parser.add_argument("--aux-weight", type=float, default=0.3,
                        help="weight of the auxiliary per-step time/visibility loss (middle layer, video tokens)")
    parser.add_argument("--aux-until", type=float, default=0.3, help="fraction of the run with the aux loss")
    parser.add_argument("--eval-every-s", type=float, default=0.0, help="evaluate by time instead of steps")
    parser.add_argument("--init", type=Path, default=None,
                        help="start from this checkpoint's weights (same grounder config) instead of random init")
    parser.add_argument("--reuse", type=int, default=6,
                        help="use each rendered example up to this many times (in-memory pool; 1: no reuse)")
    parser.add_argument("--data-seed", type=int, default=None,
                        help="seed of the training examples (default --seed; the quick-eval scenes follow --seed)")
    parser.add_argument("--eval-at-start", action="store_true", help="quick-evaluate before the first step")
    parser.add_argument("--bind-weight", type=float, default=0.5,
                        help="weight of the auxiliary query-to-video binding loss (middle layer)")
    mix = parser.add_argument_group("data mix (moments.tools.train_grounder.DataMix)")
    for f in dataclasses.fields(DataMix):
        mix.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    data_mix = DataMix(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DataMix)})
    summary = train(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                    eval_every=args.eval_every, threads=args.threads, stop_after_steps=args.stop_after_steps,
                    time_limit_s=args.time_limit_s, device=args.device, workers=args.workers,
                    aux_weight=args.aux_weight, aux_until=args.aux_until, eval_every_s=args.eval_every_s,
                    init=args.init, reuse=args.reuse, eval_at_start=args.eval_at_start, data_seed=args.data_seed,
                    bind_weight=args.bind_weight, mix=data_mix,
                    command="python -m moments.tools.train_grounder " + " ".join(sys.argv[1:] if argv is None else argv))
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}))


if __name__ == "__main__":
    main()
