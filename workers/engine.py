"""The grounding engine: Qwen2.5-VL behind a narrow interface (encode a video, answer queries).

Everything transformers- and AWQ-specific stays here. Flow for one video::

    tokens = engine.encode(frames, plan)          # vision tower, in chunks of whole 2-frame groups
    prefix = engine.prefill(tokens)               # KV cache of [system][video], reusable
    answers = engine.answer(tokens, queries, prefix=prefix)

Position ids follow the reference Qwen2.5-VL M-RoPE (Qwen's release, transformers 4.x, vLLM): a
video token's temporal id is ``tokens_per_second * second_per_grid_ts * t`` after the text before
it, and text after the video continues at ``max(all ids) + 1``. They are computed here and passed
explicitly, so no model state (``model.model.rope_deltas``) is read; transformers 5.24's own
``get_rope_index`` starts text after a video at ``start + max(h, w) / merge`` instead, which the
model was not trained with.

On CUDA the engine also (see ``benchmarks/RESULTS.md``, "GPU performance"):

* patches the vision attention to one packed varlen call per layer (``workers.vision_attention``)
  and runs each vision block as [norm, qkv, rotary] -> varlen -> [proj, norm, MLP, residuals] with the
  bracketed elementwise work fused by ``torch.compile`` (setting ``compile``);
* prefills the ``[system][video]`` prefix with the same split per decoder layer
  (``workers.fast_decode.FusedPrefill``; setting ``fused_prefill``);
* normalizes and patchifies frames on the GPU (uint8 goes over the bus, not float32);
* decodes answers with a static KV buffer and one CUDA graph per step (``workers.fast_decode``);
* dequantizes AWQ checkpoints on the GPU when gptqmodel is absent (``workers.awq_device``).

One forward runs at a time (a lock); the worker calls the engine from a thread.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from moments.errors import FatalDeviceError
from moments.records import Segment
from workers import prompt
from workers.answer_parser import parse_answer
from workers.sampling import SamplingPlan

log = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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
class Answer:
    text: str
    segments: tuple[Segment, ...]
    stage_ms: dict[str, float] = field(default_factory=dict)
    """``prefill`` (the question, plus the prefix when this call built it), ``generate``."""


@dataclass(frozen=True)
class VideoProcessing:
    """The Qwen2VLVideoProcessor settings the engine reproduces (no resizing: frames come sized)."""

    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> "VideoProcessing":
        for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
            f = model_dir / name
            if f.exists():
                d = json.loads(f.read_text())
                return cls(
                    image_mean=tuple(d.get("image_mean", OPENAI_CLIP_MEAN)),
                    image_std=tuple(d.get("image_std", OPENAI_CLIP_STD)),
                    rescale_factor=float(d.get("rescale_factor", 1 / 255)),
                    patch_size=int(d.get("patch_size", 14)),
                    temporal_patch_size=int(d.get("temporal_patch_size", 2)),
                    merge_size=int(d.get("merge_size", 2)),
                )
        return cls()


def pixel_values_videos(frames: np.ndarray | torch.Tensor, proc: VideoProcessing) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """uint8 frames [T, H, W, 3] -> (pixel_values_videos [T/2*h*w, 3*2*14*14] float32, grid_thw).

    The same operations, in the same order, as ``Qwen2VLVideoProcessor`` with resizing off:
    fused rescale+normalize ``(x - 255 mean) / (255 std)`` in float32, then its patchify layout.
    """
    video = torch.as_tensor(frames)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3], got {tuple(video.shape)}")
    video = video.permute(0, 3, 1, 2)  # T, C, H, W
    mean = (torch.tensor(proc.image_mean) * (1.0 / proc.rescale_factor)).to(video.device)
    std = (torch.tensor(proc.image_std) * (1.0 / proc.rescale_factor)).to(video.device)
    video = video.to(torch.float32).sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))
    t, c, h, w = video.shape
    ps, tps, ms = proc.patch_size, proc.temporal_patch_size, proc.merge_size
    if t % tps or h % (ps * ms) or w % (ps * ms):
        raise ValueError(f"frames {t}x{h}x{w} must be a multiple of {tps} frames and {ps * ms} px")
    gt, gh, gw = t // tps, h // ps, w // ps
    patches = video.reshape(1, gt, tps, c, gh // ms, ms, ps, gw // ms, ms, ps)
    patches = patches.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return patches.reshape(gt * gh * gw, c * tps * ps * ps), (gt, gh, gw)


def mrope_positions(input_ids: Sequence[int], video_token_id: int, grid_thw: tuple[int, int, int],
                    second_per_grid_ts: float, tokens_per_second: float, merge_size: int) -> tuple[torch.Tensor, int]:
    """Reference 3D rope ids [3, L] for ``text, one video, text`` and the id the next token takes."""
    ids = torch.as_tensor(list(input_ids))
    where = torch.nonzero(ids == video_token_id).flatten()
    gt, gh, gw = grid_thw[0], grid_thw[1] // merge_size, grid_thw[2] // merge_size
    n_video = gt * gh * gw
    if len(where) != n_video or (n_video and int(where[-1] - where[0]) + 1 != n_video):
        raise ValueError(f"expected one run of {n_video} video tokens, found {len(where)}")
    start = int(where[0]) if n_video else len(ids)
    before = torch.arange(start).expand(3, -1)
    interval = tokens_per_second * second_per_grid_ts
    t_idx = (torch.arange(gt) * interval).long()  # truncation as in the reference (``.long()``)
    grid = torch.meshgrid(t_idx, torch.arange(gh), torch.arange(gw), indexing="ij")
    video = torch.stack([g.reshape(-1) for g in grid]) + start
    after_start = int(video.max()) + 1 if n_video else start
    n_after = len(ids) - start - n_video
    after = torch.arange(n_after).expand(3, -1) + after_start
    positions = torch.cat([before, video, after], dim=1)
    return positions, int(positions.max()) + 1 if positions.numel() else 0


def _revision(model_dir: Path) -> str:
    if "snapshots" in model_dir.parts:  # a hub cache snapshot: the folder is the commit
        return model_dir.name
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def _is_device_error(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return False  # recoverable: fail this job, keep the worker
    accel = getattr(torch, "AcceleratorError", None)
    if accel is not None and isinstance(exc, accel):
        return True
    return isinstance(exc, RuntimeError) and ("CUDA error" in str(exc) or "CUBLAS_STATUS" in str(exc)
                                              or "cuDNN error" in str(exc))


class Engine:
    """Qwen2.5-VL for temporal grounding. Build with :meth:`load`."""

    def __init__(self, model, tokenizer, *, model_name: str, revision: str, device: torch.device,
                 dtype: torch.dtype, processing: VideoProcessing, fast_decode: bool | None = None,
                 compile: bool = True, fused_prefill: bool = True) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.device = device
        self.dtype = dtype
        self.processing = processing
        self.fingerprint = hashlib.sha256(json.dumps(
            [model_name, revision, str(dtype), processing.__dict__], sort_keys=True, default=str).encode()
        ).hexdigest()[:24]
        self._lock = threading.Lock()
        cfg = model.config
        self.video_token_id = int(cfg.video_token_id)
        self.tokens_per_second = float(cfg.vision_config.tokens_per_second)
        self.merge_size = int(cfg.vision_config.spatial_merge_size)
        self.stop_ids = {tokenizer.convert_tokens_to_ids(prompt.IM_END)}
        eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        if isinstance(eos, int):
            self.stop_ids.add(eos)
        lm_params = inspect.signature(model.model.language_model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in lm_params else "past_key_values"  # 5.24 renamed it
        self.fast_decode = device.type == "cuda" if fast_decode is None else fast_decode
        self._fast = None
        self.prefill_attention: str | None = None
        """SDPA backend for the prefix prefill ("cudnn", "flash", "efficient"); None: PyTorch's choice."""
        self.vision_attention = "loop"
        self.compile = device.type == "cuda" and compile
        """torch.compile the fused elementwise parts (vision blocks, prefix prefill)."""
        self.prefill_fused = device.type == "cuda" and fused_prefill
        """Prefix prefill through :class:`workers.fast_decode.FusedPrefill` (where the model allows)."""
        self._fused_prefill = None
        self.sampling_bounds: dict[str, int] = {}
        """Per-frame pixel bounds the checkpoint needs (``moments_sampling.json``; the tiny grounder)."""

    @classmethod
    def load(cls, model: str, *, device: str = "auto", dtype: str = "auto",
             attn_implementation: str = "sdpa", vision_attention: str = "auto",
             fast_decode: bool | None = None, compile: bool = True, fused_prefill: bool = True,
             optimize: bool = True) -> "Engine":
        """Load a Qwen2.5-VL checkpoint (local folder or hub id already in the local cache).

        ``vision_attention``: a ``workers.vision_attention`` backend ("auto": packed varlen on CUDA,
        transformers' loop elsewhere). ``fast_decode``: static-KV CUDA-graph decoding (None: on CUDA).
        ``compile``: torch.compile the fused vision blocks and prefill; ``fused_prefill``: prefix
        prefill through ``workers.fast_decode.FusedPrefill`` (both CUDA only). ``optimize=False`` leaves the model exactly as transformers
        built it (stock vision attention, no padding / fusing / compiling, stock prefill and decoding):
        the baseline for benchmarks.
        """
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        from workers import vision_attention as va
        from workers.awq import load_awq_model, native_awq_available

        model_dir = Path(model)
        if not (model_dir / "config.json").exists():
            from huggingface_hub import snapshot_download
            model_dir = Path(snapshot_download(model))
        dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                           ("cpu" if device == "auto" else device))
        torch_dtype = (torch.float16 if dev.type == "cuda" else torch.float32) if dtype == "auto" \
            else getattr(torch, dtype) if isinstance(dtype, str) else dtype
        config = json.loads((model_dir / "config.json").read_text())
        quant = (config.get("quantization_config") or {}).get("quant_method")
        with _device_errors():
            if quant == "awq" and dev.type == "cuda" and not native_awq_available():
                from workers.awq_device import load_awq_dequantized_on_device

                m = load_awq_dequantized_on_device(model_dir, dtype=torch_dtype, device=dev,
                                                   attn_implementation=attn_implementation)
            elif quant == "awq":
                m = load_awq_model(model_dir, dtype=torch_dtype, device=dev, attn_implementation=attn_implementation)
            else:
                m = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                    str(model_dir), dtype=torch_dtype, attn_implementation=attn_implementation).to(dev)
        m.eval()
        backend = va.install(m, vision_attention if optimize else "loop")
        compile_ = dev.type == "cuda" and optimize and compile
        if dev.type == "cuda" and optimize:
            va.speed_up_vision_tower(m)
            if backend != "loop":
                va.fuse_vision_blocks(m, backend, compile=compile_)
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        log.info("loaded %s on %s as %s (attention %s, vision attention %s, quantization %s)", model, dev,
                 torch_dtype, attn_implementation, backend, quant or "none")
        engine = cls(m, tok, model_name=model, revision=_revision(model_dir), device=dev, dtype=torch_dtype,
                     processing=VideoProcessing.from_model_dir(model_dir),
                     fast_decode=fast_decode if optimize else False, compile=compile_,
                     fused_prefill=fused_prefill and optimize)
        engine.vision_attention = backend
        bounds = model_dir / "moments_sampling.json"
        if bounds.is_file():
            engine.sampling_bounds = {k: int(v) for k, v in json.loads(bounds.read_text()).items()
                                      if k in ("min_pixels", "max_pixels")}
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
            raise ValueError(f"frames {n}x{h}x{w} do not match the plan {plan.frames}x{plan.height}x{plan.width}")
        tps = self.processing.temporal_patch_size
        step = max(tps, chunk_frames - chunk_frames % tps)
        parts: list[torch.Tensor] = []
        grid: tuple[int, int, int] | None = None
        with self._lock, _device_errors(), torch.inference_mode():
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
            raise ValueError(f"grid {grid} does not match the plan's {(plan.grid_t, plan.grid_h, plan.grid_w)}")
        return VisualTokens(embeds=torch.cat(parts), grid_thw=grid, second_per_grid_ts=plan.second_per_grid_ts,
                            frame_times_s=tuple(plan.frame_times_s), fingerprint=self.fingerprint)

    # --- prefill / answer ----------------------------------------------------------------------------

    def prefill(self, tokens: VisualTokens) -> Prefix:
        """Run ``[system][video]`` through the language model once; the result serves any question."""
        with self._lock, _device_errors(), torch.inference_mode():
            return self._prefill(tokens)

    def answer(self, tokens: VisualTokens, queries: Sequence[str], *, max_new_tokens: int = 64,
               prefix: Prefix | None = None, duration_s: float | None = None,
               on_progress: Callable[[int, int], None] | None = None) -> list[Answer]:
        """Greedy answers to each query about one video, reusing one ``[system][video]`` prefix.

        The model counts time from the first sampled frame; segments are shifted by
        ``frame_times_s[0]`` into video time and clamped to ``duration_s`` (default: the sampled span). ``on_progress(done, total)``
        after each query.
        """
        if duration_s is None:
            times = tokens.frame_times_s
            step = times[1] - times[0] if len(times) > 1 else 0.0
            duration_s = (times[-1] + step) if times else 0.0
        first_frame_s = tokens.frame_times_s[0] if tokens.frame_times_s else 0.0
        answers: list[Answer] = []
        with self._lock, _device_errors(), torch.inference_mode():
            built_ms = 0.0
            if prefix is None:
                prefix = self._prefill(tokens)
                built_ms = prefix.prefill_ms
            elif prefix.key != self._key(tokens):
                raise ValueError("prefix was built from other visual tokens")
            for i, query in enumerate(queries):
                a = self._answer_one(prefix, query, max_new_tokens, first_frame_s, duration_s)
                if i == 0 and built_ms:
                    a.stage_ms["prefill"] += built_ms
                answers.append(a)
                if on_progress is not None:
                    on_progress(i + 1, len(queries))
        return answers

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

    def _language_model(self, embeds: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """One forward of the decoder on [1, n, hidden] with ids [3, n]; returns last-token logits (fp32)."""
        out = self.model.model.language_model(
            inputs_embeds=embeds, position_ids=positions[:, None, :].to(self.device), use_cache=True,
            **{self._cache_kwarg: cache})
        return self.model.lm_head(out.last_hidden_state[:, -1]).float()[0]

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
        fused = self._fused()
        with self._prefill_backend():
            if fused is not None:
                fused.compile = self.compile
                fused(embeds, positions[:, None, :].to(self.device), cache)
            else:
                self._language_model(embeds, positions, cache)
        return Prefix(cache=cache, length=len(ids), next_position=next_position, key=self._key(tokens),
                      prefill_ms=(time.perf_counter() - t0) * 1e3)

    def _fused(self):
        """The fused prefix prefill, built on first use (None where off or unsupported)."""
        if not self.prefill_fused:
            return None
        if self._fused_prefill is None:
            from workers.fast_decode import FusedPrefill

            if not FusedPrefill.supported(self.model):
                log.info("fused prefill not supported by this model: transformers' forward")
                self.prefill_fused = False
                return None
            self._fused_prefill = FusedPrefill(self.model, compile=self.compile)
        return self._fused_prefill

    def _prefill_backend(self):
        if self.prefill_attention is None or self.device.type != "cuda":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        names = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION}
        return sdpa_kernel([names[self.prefill_attention], SDPBackend.FLASH_ATTENTION,
                            SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])

    def _answer_one(self, prefix: Prefix, query: str, max_new_tokens: int, first_frame_s: float,
                    duration_s: float) -> Answer:
        if self.fast_decode:
            return self._answer_one_fast(prefix, query, max_new_tokens, first_frame_s, duration_s)
        t0 = time.perf_counter()
        self.model.model.rope_deltas = None
        cache = copy.deepcopy(prefix.cache)
        q_ids = self.tokenizer(prompt.question_suffix_text(query), add_special_tokens=False).input_ids
        self._ensure_positions(prefix.next_position + len(q_ids) + max_new_tokens)
        embed = self.model.get_input_embeddings()
        pos = prefix.next_position
        positions = torch.arange(pos, pos + len(q_ids)).expand(3, -1)
        logits = self._language_model(embed(torch.tensor([q_ids], device=self.device)), positions, cache)
        pos += len(q_ids)
        t1 = time.perf_counter()
        generated: list[int] = []
        probs: list[float] = []
        for _ in range(max_new_tokens):
            p = torch.softmax(logits, dim=-1)
            token = int(torch.argmax(logits))
            if token in self.stop_ids:
                break
            generated.append(token)
            probs.append(float(p[token]))
            if len(generated) == max_new_tokens:
                break
            logits = self._language_model(embed(torch.tensor([[token]], device=self.device)),
                                          torch.full((3, 1), pos), cache)
            pos += 1
        t2 = time.perf_counter()
        text, pieces = self._decode(generated, probs)
        return Answer(text=text, segments=video_segments(text, pieces, first_frame_s, duration_s),
                      stage_ms={"prefill": (t1 - t0) * 1e3, "generate": (t2 - t1) * 1e3})

    def _answer_one_fast(self, prefix: Prefix, query: str, max_new_tokens: int, first_frame_s: float,
                         duration_s: float) -> Answer:
        """:meth:`_answer_one` on the static-KV decoder: same tokens, no copy of a hot prefix."""
        from workers.fast_decode import FastDecoder

        t0 = time.perf_counter()
        if self._fast is None:
            self._fast = FastDecoder(self.model)
        fd = self._fast
        q_ids = self.tokenizer(prompt.question_suffix_text(query), add_special_tokens=False).input_ids
        self._ensure_positions(prefix.next_position + len(q_ids) + max_new_tokens)
        fd.reserve(prefix.length + len(q_ids) + max_new_tokens)
        fd.load_prefix(prefix.cache, prefix.length, (id(prefix.cache), prefix.length, prefix.key))
        embed = self.model.get_input_embeddings()
        logits = fd.prefill(embed(torch.tensor(q_ids, device=self.device)), prefix.next_position, prefix.length)
        p = torch.softmax(logits, dim=-1)
        token = int(torch.argmax(logits))
        prob = float(p[token])
        rope, index = prefix.next_position + len(q_ids), prefix.length + len(q_ids)
        t1 = time.perf_counter()
        generated: list[int] = []
        probs: list[float] = []
        while token not in self.stop_ids:
            generated.append(token)
            probs.append(prob)
            if len(generated) == max_new_tokens:
                break
            token, prob = fd.step(token, rope, index)
            rope += 1
            index += 1
        t2 = time.perf_counter()
        text, pieces = self._decode(generated, probs)
        return Answer(text=text, segments=video_segments(text, pieces, first_frame_s, duration_s),
                      stage_ms={"prefill": (t1 - t0) * 1e3, "generate": (t2 - t1) * 1e3})

    def _decode(self, ids: list[int], probs: list[float]) -> tuple[str, list[tuple[str, float]] | None]:
        """Text and its per-token pieces (for confidences); pieces None if they do not add up."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        pieces: list[tuple[str, float]] = []
        prev = ""
        for k, prob in enumerate(probs):
            cur = self.tokenizer.decode(ids[: k + 1], skip_special_tokens=True)
            pieces.append((cur[len(prev):] if cur.startswith(prev) else "", prob))
            prev = cur if cur.startswith(prev) else prev
        return text, pieces if "".join(p for p, _ in pieces) == text else None


def video_segments(text: str, pieces, first_frame_s: float, duration_s: float) -> tuple[Segment, ...]:
    """Segments of an answer in video time: the model counts from the first sampled frame (rope id 0)."""
    relative = parse_answer(text, max(0.0, duration_s - first_frame_s), pieces)
    return tuple(Segment(s.start_s + first_frame_s, s.end_s + first_frame_s, s.confidence) for s in relative)


@contextlib.contextmanager
def _device_errors() -> Iterator[None]:
    """CUDA failures leave the device unusable: surface them as :class:`FatalDeviceError`."""
    try:
        yield
    except FatalDeviceError:
        raise
    except Exception as exc:
        if _is_device_error(exc):
            raise FatalDeviceError(f"device error: {exc}") from exc
        raise


__all__ = ["Answer", "Engine", "Prefix", "VisualTokens", "VideoProcessing", "mrope_positions",
           "pixel_values_videos", "video_segments"]
