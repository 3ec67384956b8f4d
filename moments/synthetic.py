"""Synthetic videos with known events: a moving textured background and shapes that appear during
known intervals. Used by the demo, the tiny grounder's training data and accuracy tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 200, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 220, 40),
}
SHAPES = ("square", "circle", "triangle")


@dataclass(frozen=True)
class Event:
    """``shape`` of ``color`` is visible from ``start_s`` to ``end_s``."""

    color: str
    shape: str
    start_s: float
    end_s: float

    @property
    def query(self) -> str:
        return f"the {self.color} {self.shape} appears"


def _background(width: int, height: int, t: float) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    shift = 6.0 * t
    stripes = 0.5 + 0.25 * np.sin((x + shift) / 7.0) * np.cos((y - shift * 0.5) / 11.0)
    base = (stripes * 90 + 60).astype(np.uint8)
    return np.stack([base, base, base + 10], axis=-1)


def _draw(frame: np.ndarray, event: Event, t: float) -> None:
    h, w, _ = frame.shape
    size = min(h, w) // 3
    cx = int(w * 0.3 + (w * 0.4) * ((t - event.start_s) / max(event.end_s - event.start_s, 1e-6)))
    cy = h // 2
    y, x = np.ogrid[0:h, 0:w]
    if event.shape == "square":
        mask = (abs(x - cx) <= size // 2) & (abs(y - cy) <= size // 2)
    elif event.shape == "circle":
        mask = (x - cx) ** 2 + (y - cy) ** 2 <= (size // 2) ** 2
    else:
        mask = (y - (cy - size // 2) >= 0) & (y - (cy + size // 2) <= 0) & \
               (abs(x - cx) <= (y - (cy - size // 2)) // 2)
    frame[mask] = COLORS[event.color]


def render_frame(width: int, height: int, t: float, events: list[Event]) -> np.ndarray:
    frame = _background(width, height, t)
    for event in events:
        if event.start_s <= t < event.end_s:
            _draw(frame, event, t)
    return frame


def write_event_video(path: Path, events: list[Event], *, seconds: float, fps: float = 8.0,
                      width: int = 224, height: int = 168, codec: str = "libx264") -> Path:
    """Write an H.264 (by default) MP4 showing ``events``; returns ``path``."""
    path = Path(path)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=int(fps) if float(fps).is_integer() else None)
        if not float(fps).is_integer():
            from fractions import Fraction

            stream.codec_context.framerate = Fraction(fps).limit_denominator(1000)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "g": str(int(fps * 2))}
        for i in range(int(round(seconds * fps))):
            frame = av.VideoFrame.from_ndarray(render_frame(width, height, i / fps, events), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
