"""The grounding engine: Qwen2.5-VL behind a narrow interface (encode a video, prefill it, generate).

Everything transformers- and AWQ-specific stays behind this module and its siblings
(:mod:`.loading`, :mod:`.preprocessing`, :mod:`.positions`, :mod:`.kernels`). Flow for one video::

    tokens = engine.encode(frames, plan)          # vision tower, in chunks of whole 2-frame groups
    prefix = engine.prefill(tokens)               # KV cache of [system][video], reusable
    texts = engine.generate(tokens, queries, prefix=prefix)   # greedy answers, with token probabilities

Turning answers into segments is the pipeline's job (:mod:`moments.workers.pipeline`).

Position ids are the reference M-RoPE ids (:mod:`.positions`), passed explicitly.

On CUDA, by :class:`EngineOptions` (see ``benchmarks/RESULTS.md``, "GPU performance"):

* the vision attention runs as one packed varlen call per layer, each vision block as [norm, qkv,
  rotary] -> varlen -> [proj, norm, MLP, residuals] with the bracketed work fused by ``torch.compile``;
* the ``[system][video]`` prefix is prefilled with the same split per decoder layer
  (:class:`.kernels.prefill.FusedPrefill`, plain ``Linear`` layers only);
* frames are normalized and patchified on the GPU (uint8 goes over the bus, not float32);
* every question in flight decodes in the same steps from static KV buffers (the video prefix shared,
  never copied), one CUDA graph per step shape (:mod:`.kernels.batch_decode`, :mod:`.scheduler`).

One forward runs at a time (a lock); the worker calls the engine from a thread.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import inspect
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from moments.core.errors import Internal
from moments.media.sampling import SamplingPlan
from moments.workers.model import prompt
from moments.workers.model.calibration import platt
from moments.workers.model.device_errors import device_errors
from moments.workers.model.loading import Checkpoint, load_checkpoint
from moments.workers.model.positions import mrope_positions
from moments.workers.model.preprocessing import VideoProcessing, pixel_values_videos

log = logging.getLogger(__name__)

TokenProbs = list[tuple[str, float]]


@dataclass(frozen=True)
class EngineOptions:
    """How the engine runs; fixed at construction (nothing changes an engine afterwards)."""

    device: str = "auto"
    """auto (CUDA when available), cpu, cuda, cuda:1."""
    dtype: str = "auto"
    """auto (fp16 on CUDA, fp32 on CPU), float16, bfloat16, float32."""
    attn_implementation: str = "sdpa"
    vision_attention: str = "auto"
    """A :mod:`.kernels.vision_attention` backend; auto: packed varlen on CUDA, transformers' loop elsewhere."""
    fast_decode: bool | None = None
    """Static-KV decoding (CUDA graphs on CUDA). None: on CUDA only."""
    compile: bool | None = None
    """torch.compile the fused vision blocks and prefix prefill. None: on CUDA only."""
    fused_prefill: bool | None = None
    """Prefix prefill through :class:`.kernels.prefill.FusedPrefill` (where the model allows). None: on CUDA only."""
    prefill_attention: str | None = None
    """SDPA backend for the prefix prefill ("cudnn", "flash", "efficient"); None: PyTorch's choice."""
    optimize: bool = True
    """False: the model exactly as transformers builds it (the benchmarks' baseline)."""
    decode_slots: int = 4
    """Static-KV decoder: prefixes (video windows) decoding at once."""
    decode_lanes: int = 16
    """Static-KV decoder: questions per prefix decoding at once."""
    decode_suffix: int = 384
    """Static-KV decoder: positions per question (question, scored answer, generated tokens)."""
    awq_kernel: str = "auto"
    """How AWQ checkpoints run: auto (torch's int4 kernel on CUDA, else dequantized), int4, gptqmodel,
    dequantize (``moments.workers.model.loading.AWQ_KERNELS``)."""
    decode_bucket: int = 1024
    decode_grow: int = 4096
    """Static-KV decoder: attend lengths are multiples of ``decode_bucket``; the buffer grows by ``decode_grow``."""

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self, device: torch.device, *, int4: bool = False) -> torch.dtype:
        """auto: fp16 on CUDA (bf16 for weights on torch's int4 kernel, which takes bf16), fp32 on CPU."""
        if self.dtype == "auto":
            return (torch.bfloat16 if int4 else torch.float16) if device.type == "cuda" else torch.float32
        return getattr(torch, self.dtype)


@dataclass
class VisualTokens:
    """The vision tower's output for one video at one sampling plan (what the token cache stores)."""

    embeds: torch.Tensor
    """[n_tokens, hidden], model dtype, on CPU."""
    grid_thw: tuple[int, int, int]
    """Patch grid (t = frames / 2, h, w = size / 14), before the 2x2 spatial merge."""
    second_per_grid_ts: float
    frame_times_s: tuple[float, ...]
    fingerprint: str
    """Model, revision, dtype and processor settings that produced ``embeds``."""

    @property
    def n_tokens(self) -> int:
        return int(self.embeds.shape[0])

    @property
    def first_frame_s(self) -> float:
        """Where the model's time 0 is, in video time (the first sampled frame)."""
        return self.frame_times_s[0] if self.frame_times_s else 0.0

    @property
    def span_end_s(self) -> float:
        """One frame step after the last sampled frame: the end of what the tokens cover."""
        times = self.frame_times_s
        step = times[1] - times[0] if len(times) > 1 else 0.0
        return (times[-1] + step) if times else 0.0


@dataclass
class Prefix:
    """KV cache of ``[system][video]`` plus the rope state to continue from it."""

    cache: object
    """A transformers ``DynamicCache``; never mutated (each question works on a copy)."""
    length: int
    """Tokens in the cache."""
    next_position: int
    """M-RoPE id of the next text token: max id of the prefix + 1 (not ``length``)."""
    key: tuple
    """Identity of the visual tokens it was built from."""
    prefill_ms: float = 0.0


@dataclass
class Generation:
    """One greedy answer: its text and, per generated token, the decoded piece and its probability."""

    text: str
    pieces: TokenProbs | None
    """None when the per-token pieces do not add up to ``text``."""
    stage_ms: dict[str, float] = field(default_factory=dict)
    """``prefill`` (the question, plus the prefix when this call built it), ``generate``."""
    absent_logprob: float = 0.0
    """Log-probability of answering :data:`prompt.ABSENT_ANSWER` ("not in the video"), teacher-forced."""

    @property
    def raw_presence(self) -> float:
        """1 - P(the "not in the video" answer): the uncalibrated chance the event is there."""
        return -math.expm1(min(0.0, self.absent_logprob))


class Engine:
    """Qwen2.5-VL for temporal grounding. Build with :meth:`load` (or from a loaded :class:`Checkpoint`)."""

    def __init__(self, checkpoint: Checkpoint, options: EngineOptions = EngineOptions(), *,
                 model_name: str = "") -> None:
        from moments.workers.model.kernels import vision_attention as va

        self.checkpoint = checkpoint
        self.options = options
        self.model = checkpoint.model
        self.tokenizer = checkpoint.tokenizer
        self.model_name = model_name or str(checkpoint.directory)
        p = next(self.model.parameters())
        self.device = p.device
        self.dtype = self.model.model.language_model.embed_tokens.weight.dtype
        self.processing: VideoProcessing = checkpoint.processing
        self.sampling_bounds = dict(checkpoint.sampling_bounds)
        """The checkpoint's own sampling bounds (``moments_sampling.json``): they bound every plan."""
        self.quantization = checkpoint.quantization
        self.fingerprint = hashlib.sha256(json.dumps(
            [self.model_name, checkpoint.revision, str(self.dtype), self.processing.__dict__], sort_keys=True,
            default=str).encode()).hexdigest()[:24]
        cfg = self.model.config
        self.video_token_id = int(cfg.video_token_id)
        self.tokens_per_second = float(cfg.vision_config.tokens_per_second)
        self.merge_size = int(cfg.vision_config.spatial_merge_size)
        self.stop_ids = {self.tokenizer.convert_tokens_to_ids(prompt.IM_END)}
        eos = self.tokenizer.convert_tokens_to_ids("<|endoftext|>")
        if isinstance(eos, int):
            self.stop_ids.add(eos)
        self.absent_ids = self.tokenizer(prompt.ABSENT_ANSWER, add_special_tokens=False).input_ids + \
            [self.tokenizer.convert_tokens_to_ids(prompt.IM_END)]
        """The "not in the video" answer and its end-of-turn token: scored after every question."""
        self.calibration = dict(checkpoint.calibration)
        """Platt parameters (``a``, ``b``) mapping the raw presence log-odds to a calibrated probability."""
        lm_params = inspect.signature(self.model.model.language_model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in lm_params else "past_key_values"  # 5.24 renamed it
        cuda = self.device.type == "cuda"
        optimize = options.optimize

        def wanted(flag: bool | None) -> bool:
            return optimize and (cuda if flag is None else flag)

        self.vision_attention = va.install(self.model, options.vision_attention if optimize else "loop")
        self.compile = wanted(options.compile)
        if cuda and optimize:
            va.speed_up_vision_tower(self.model)
            if self.vision_attention != "loop":
                va.fuse_vision_blocks(self.model, self.vision_attention, compile=self.compile)
        self.fast_decode = wanted(options.fast_decode)
        self._fused_prefill = None
        if wanted(options.fused_prefill):
            from moments.workers.model.kernels.prefill import FusedPrefill

            if FusedPrefill.supported(self.model):
                self._fused_prefill = FusedPrefill(self.model, compile=self.compile)
            else:
                log.info("fused prefill not supported by this model: transformers' forward")
        self._lock = threading.Lock()
        self._scheduler = None
        if self.fast_decode:
            from moments.workers.model.scheduler import DecodeScheduler

            self._scheduler = DecodeScheduler(self, max_slots=options.decode_slots, max_lanes=options.decode_lanes,
                                              suffix=options.decode_suffix, bucket_tokens=options.decode_bucket,
                                              grow_tokens=options.decode_grow)

    def close(self) -> None:
        """Stop the decoding thread and let the model's memory go (the engine is unusable after)."""
        if self._scheduler is not None:
            self._scheduler.close()
            self._scheduler = None

    @property
    def prefill_fused(self) -> bool:
        return self._fused_prefill is not None

    @classmethod
    def load(cls, model: str, options: EngineOptions | None = None, **option_fields) -> "Engine":
        """Load a Qwen2.5-VL checkpoint (local folder or hub id already in the local cache).

        ``options`` (or its fields as keywords) say how it runs; see :class:`EngineOptions`.
        """
        from moments.workers.model.loading import awq_kernel_for, resolve_dir

        opts = dataclasses.replace(options or EngineOptions(), **option_fields)
        dev = opts.torch_device()
        config = json.loads((resolve_dir(model) / "config.json").read_text())
        awq = (config.get("quantization_config") or {}).get("quant_method") == "awq"
        dtype = opts.torch_dtype(dev, int4=awq and awq_kernel_for(opts.awq_kernel, dev) == "int4")
        with device_errors():
            ckpt = load_checkpoint(model, device=dev, dtype=dtype, attn_implementation=opts.attn_implementation,
                                   awq_kernel=opts.awq_kernel)
        engine = cls(ckpt, opts, model_name=model)
        log.info("loaded %s on %s as %s (attention %s, vision attention %s, quantization %s, fast decode %s, "
                 "fused prefill %s)", model, dev, dtype, opts.attn_implementation, engine.vision_attention,
                 ckpt.quantization, engine.fast_decode, engine.prefill_fused)
        return engine

    # --- encode -----------------------------------------------------------------------------------

    def encode(self, frames: np.ndarray, plan: SamplingPlan, *, chunk_frames: int = 64,
               progress: Callable[[int, int], None] | None = None) -> VisualTokens:
        """Visual tokens of frames [T, H, W, 3] uint8, already at ``plan.height`` x ``plan.width``.

        Vision attention never crosses a 2-frame group, so whole groups are encoded ``chunk_frames``
        at a time and concatenated; ``progress(frames_done, frames_total)`` after each chunk.
        """
        n, h, w = frames.shape[0], frames.shape[1], frames.shape[2]
        if (n, h, w) != (plan.frames, plan.height, plan.width):
            raise Internal(f"frames {n}x{h}x{w} do not match the plan {plan.frames}x{plan.height}x{plan.width}")
        tps = self.processing.temporal_patch_size
        step = max(tps, chunk_frames - chunk_frames % tps)
        parts: list[torch.Tensor] = []
        grid: tuple[int, int, int] | None = None
        with self._lock, device_errors(), torch.inference_mode():
            for start in range(0, n, step):
                # uint8 to the device, then the same float32 normalize/patchify there.
                chunk = torch.as_tensor(frames[start:start + step]).to(self.device, non_blocking=True)
                pixels, (gt, gh, gw) = pixel_values_videos(chunk, self.processing)
                grid = (gt if grid is None else grid[0] + gt, gh, gw)
                thw = torch.tensor([[gt, gh, gw]], device=self.device)
                out = self.model.get_video_features(pixels.to(self.dtype), thw)
                parts.append(out.pooler_output[0].to("cpu", self.dtype))
                if progress is not None:
                    progress(min(start + step, n), n)
        assert grid is not None
        if grid != (plan.grid_t, plan.grid_h, plan.grid_w):
            raise Internal(f"grid {grid} does not match the plan's {(plan.grid_t, plan.grid_h, plan.grid_w)}")
        return VisualTokens(embeds=torch.cat(parts), grid_thw=grid, second_per_grid_ts=plan.second_per_grid_ts,
                            frame_times_s=tuple(plan.frame_times_s), fingerprint=self.fingerprint)

    # --- prefill / generate ----------------------------------------------------------------------

    def prefill(self, tokens: VisualTokens) -> Prefix:
        """Run ``[system][video]`` through the language model once; the result serves any question."""
        with self._lock, device_errors(), torch.inference_mode():
            return self._prefill(tokens)

    def generate(self, tokens: VisualTokens, queries: Sequence[str], *, max_new_tokens: int = 64,
                 prefix: Prefix | None = None, on_progress: Callable[[int, int], None] | None = None,
                 cancel: threading.Event | None = None) -> list[Generation]:
        """Greedy answers to each query about one video, reusing one ``[system][video]`` prefix.

        With the static-KV decoder every query decodes in the same steps (and with the questions of
        other callers in flight); otherwise one after another, ``on_progress(done, total)`` after each.
        ``cancel`` set: the remaining work stops (raises ``scheduler.Cancelled``).
        """
        if self._scheduler is not None:
            return self._generate_batched(tokens, queries, max_new_tokens, prefix, cancel)
        out: list[Generation] = []
        with self._lock, device_errors(), torch.inference_mode():
            built_ms = 0.0
            if prefix is None:
                prefix = self._prefill(tokens)
                built_ms = prefix.prefill_ms
            elif prefix.key != self._key(tokens):
                raise Internal("prefix was built from other visual tokens")
            for i, query in enumerate(queries):
                g = self._generate_one(prefix, query, max_new_tokens)
                if i == 0 and built_ms:
                    g.stage_ms["prefill"] += built_ms
                out.append(g)
                if on_progress is not None:
                    on_progress(i + 1, len(queries))
        return out

    def _key(self, tokens: VisualTokens) -> tuple:
        # A strided content sample tells videos apart without hashing every token.
        sample = tokens.embeds[:: max(1, tokens.n_tokens // 64)].float().contiguous().cpu().numpy().tobytes()
        return (tokens.fingerprint, tokens.grid_thw, tokens.second_per_grid_ts, tokens.n_tokens,
                hashlib.sha256(sample).hexdigest())

    def _ensure_positions(self, needed: int) -> None:
        """Raise ``max_position_embeddings`` when a prompt needs more ids (model card advice, no YaRN)."""
        for cfg in (self.model.config.text_config, self.model.config):
            limit = getattr(cfg, "max_position_embeddings", None)
            if limit is not None and needed > limit:
                log.warning("prompt needs %d positions > max_position_embeddings %d: raising it", needed, limit)
                cfg.max_position_embeddings = needed

    def presence_score(self, generation: Generation) -> float:
        """The calibrated probability that the asked event is in the looked-at video (QueryResult.score)."""
        return platt(generation.raw_presence, self.calibration)

    def _language_model(self, embeds: torch.Tensor, positions: torch.Tensor, cache, *,
                        last: int = 1) -> torch.Tensor:
        """One forward of the decoder on [1, n, hidden] with ids [3, n]; logits (fp32) of the last
        ``last`` tokens, [vocab] when ``last`` is 1, else [last, vocab]."""
        out = self.model.model.language_model(
            inputs_embeds=embeds, position_ids=positions[:, None, :].to(self.device), use_cache=True,
            **{self._cache_kwarg: cache})
        logits = self.model.lm_head(out.last_hidden_state[0, -last:]).float()
        return logits[0] if last == 1 else logits

    def _prefill(self, tokens: VisualTokens) -> Prefix:
        t0 = time.perf_counter()
        from transformers import DynamicCache

        self.model.model.rope_deltas = None  # module state; our explicit ids never read it
        ids = self.tokenizer(prompt.video_prefix_text(tokens.n_tokens), add_special_tokens=False).input_ids
        positions, next_position = mrope_positions(ids, self.video_token_id, tokens.grid_thw,
                                                   tokens.second_per_grid_ts, self.tokens_per_second, self.merge_size)
        self._ensure_positions(next_position)
        input_ids = torch.tensor([ids], device=self.device)
        embeds = self.model.get_input_embeddings()(input_ids)
        mask = (input_ids == self.video_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(mask, tokens.embeds.to(self.device, embeds.dtype))
        cache = DynamicCache(config=self.model.config.text_config)
        with self._prefill_backend():
            if self._fused_prefill is not None:
                self._fused_prefill(embeds, positions[:, None, :].to(self.device), cache)
            else:
                self._language_model(embeds, positions, cache)
        return Prefix(cache=cache, length=len(ids), next_position=next_position, key=self._key(tokens),
                      prefill_ms=(time.perf_counter() - t0) * 1e3)

    def _prefill_backend(self):
        if self.options.prefill_attention is None or self.device.type != "cuda":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        names = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION}
        return sdpa_kernel([names[self.options.prefill_attention], SDPBackend.FLASH_ATTENTION,
                            SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])

    def _generate_batched(self, tokens: VisualTokens, queries: Sequence[str], max_new_tokens: int,
                          prefix: Prefix | None, cancel: threading.Event | None) -> list[Generation]:
        with device_errors():
            built_ms = 0.0
            if prefix is None:
                prefix = self.prefill(tokens)
                built_ms = prefix.prefill_ms
            elif prefix.key != self._key(tokens):
                raise Internal("prefix was built from other visual tokens")
            q_ids = [self.tokenizer(prompt.question_suffix_text(q), add_special_tokens=False).input_ids for q in queries]
            self._ensure_positions(prefix.next_position + max(map(len, q_ids)) + len(self.absent_ids) + max_new_tokens)
            rows = self._scheduler.generate(prefix, q_ids, self.absent_ids, max_new_tokens,
                                            cancel.is_set if cancel is not None else None)
        out = []
        for i, row in enumerate(rows):
            text, pieces = self._detokenize(row.tokens, row.probs)
            generate_ms = (time.perf_counter() - row.started_s) * 1e3
            out.append(Generation(text=text, pieces=pieces, absent_logprob=row.absent_logprob,
                                  stage_ms={"prefill": row.prefill_ms + (built_ms if i == 0 else 0.0),
                                            "generate": generate_ms}))
        return out

    def _generate_one(self, prefix: Prefix, query: str, max_new_tokens: int) -> Generation:
        """The eager greedy loop (transformers' forward on a copy of the prefix's cache)."""
        t0 = time.perf_counter()
        q_ids = self.tokenizer(prompt.question_suffix_text(query), add_special_tokens=False).input_ids
        self._ensure_positions(prefix.next_position + len(q_ids) + max_new_tokens)
        decoder = _EagerDecoder(self, prefix)
        # The question and the "not in the video" answer in one forward: the logits at the question's
        # last token pick the first answer token, the rest score the absence sentence (teacher forcing).
        logits = decoder.start(q_ids, self.absent_ids, max_new_tokens + len(self.absent_ids))
        token, prob = _greedy(logits[0])
        absent_logprob = float(torch.log_softmax(logits, dim=-1).gather(
            1, torch.tensor(self.absent_ids, device=logits.device)[:, None]).sum())
        t1 = time.perf_counter()
        generated: list[int] = []
        probs: list[float] = []
        while token not in self.stop_ids:
            generated.append(token)
            probs.append(prob)
            if len(generated) >= max_new_tokens:
                break
            token, prob = decoder.step(token)
        t2 = time.perf_counter()
        text, pieces = self._detokenize(generated, probs)
        return Generation(text=text, pieces=pieces, stage_ms={"prefill": (t1 - t0) * 1e3, "generate": (t2 - t1) * 1e3},
                          absent_logprob=absent_logprob)

    def _detokenize(self, ids: list[int], probs: list[float]) -> tuple[str, TokenProbs | None]:
        """Text and its per-token pieces (for confidences); pieces None if they do not add up."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        pieces: TokenProbs = []
        prev = ""
        for k, prob in enumerate(probs):
            cur = self.tokenizer.decode(ids[: k + 1], skip_special_tokens=True)
            pieces.append((cur[len(prev):] if cur.startswith(prev) else "", prob))
            prev = cur if cur.startswith(prev) else prev
        return text, pieces if "".join(p for p, _ in pieces) == text else None


def _greedy(logits: torch.Tensor) -> tuple[int, float]:
    token = int(torch.argmax(logits))
    return token, float(torch.softmax(logits, dim=-1)[token])


class _EagerDecoder:
    """transformers' forward on a copy of the prefix's ``DynamicCache``."""

    def __init__(self, engine: Engine, prefix: Prefix) -> None:
        self.engine = engine
        self.prefix = prefix
        self.embed = engine.model.get_input_embeddings()
        self.cache = None
        self.pos = prefix.next_position

    def start(self, q_ids: list[int], scored: list[int], reserve: int) -> torch.Tensor:
        """Run the question then ``scored[:-1]`` (teacher-forced); logits [len(scored), vocab] from the
        question's last token on. Generation continues right after the question."""
        e = self.engine
        e.model.model.rope_deltas = None
        self.cache = copy.deepcopy(self.prefix.cache)
        ids = q_ids + scored[:-1]
        positions = torch.arange(self.pos, self.pos + len(ids)).expand(3, -1)
        logits = e._language_model(self.embed(torch.tensor([ids], device=e.device)), positions, self.cache,
                                   last=len(scored))
        if len(scored) > 1:  # drop the teacher-forced tokens; a negative count works on every transformers
            self.cache.crop(-(len(scored) - 1))
        self.pos += len(q_ids)
        return logits.reshape(len(scored), -1)

    def step(self, token: int) -> tuple[int, float]:
        e = self.engine
        logits = e._language_model(self.embed(torch.tensor([[token]], device=e.device)),
                                   torch.full((3, 1), self.pos), self.cache)
        self.pos += 1
        return _greedy(logits)


__all__ = ["Engine", "EngineOptions", "Generation", "Prefix", "VisualTokens"]
