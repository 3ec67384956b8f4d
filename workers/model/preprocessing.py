"""Frames -> the vision tower's input, exactly as transformers' ``Qwen2VLVideoProcessor`` does it.

Frames arrive already resized by the decoder (the sampling plan fixes their size), so only
rescale + normalize + patchify remain; uint8 goes to the device and the float work runs there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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
