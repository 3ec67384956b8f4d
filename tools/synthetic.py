"""Synthetic videos with known events: a moving textured background and shapes that appear and move
during known intervals. Used by the demo, the tiny grounder's training data, the accuracy tests
and ``moments eval`` (Charades-STA-style annotation files with true intervals).

Everything is deterministic in its seed. Frames are rendered with numpy (:func:`render_frame`), so
training can draw the exact frames a sampling plan asks for without writing a file, while
evaluation writes real H.264 files (:func:`write_event_video`), constant or variable frame rate.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
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
KINDS = ("appear", "move")
LANES = 3
"""Horizontal bands an object can move along; events of one scene use different lanes."""
NATIVE_FPS = (8.0, 10.0, 12.5, 15.0, 24.0, 25.0, 29.97, 30.0)
TIME_BASE = Fraction(1, 90000)


@dataclass(frozen=True)
class Event:
    """Something ``shape`` of ``color`` does from ``start_s`` to ``end_s`` (and again in ``repeats``).

    ``kind`` "appear": it is visible only then, drifting right. "move": it is on screen for the
    whole video and still except then, when it slides left from 70% to 30% of the width (it starts
    at 70%, rests at 30% after an occurrence and is back at 70% when the next one starts).
    ``lane`` (0..LANES-1) picks a horizontal band; None is the middle one. ``repeats`` are further
    occurrences of the same event, after the first and apart from each other.
    """

    color: str
    shape: str
    start_s: float
    end_s: float
    lane: int | None = None
    kind: str = "appear"
    repeats: tuple[tuple[float, float], ...] = ()

    @property
    def query(self) -> str:
        if self.kind == "move":
            return f"the {self.color} {self.shape} moves left"
        return f"the {self.color} {self.shape} appears"

    @property
    def occurrences(self) -> tuple[tuple[float, float], ...]:
        return ((self.start_s, self.end_s), *self.repeats)

    def occurrence_at(self, t: float) -> tuple[float, float] | None:
        return next(((a, b) for a, b in self.occurrences if a <= t < b), None)

    def on_screen(self, t: float) -> bool:
        return self.kind == "move" or self.occurrence_at(t) is not None

    def active(self, t: float) -> bool:
        """The event is happening at ``t`` (shown, or moving)."""
        return self.occurrence_at(t) is not None


@dataclass(frozen=True)
class Scene:
    """A synthetic video's content: its length, native frame rate and events."""

    duration_s: float
    fps: float
    events: tuple[Event, ...]
    vfr: bool = False
    seed: int = 0
    black: bool = False
    """Every frame black (no background, no events)."""

    def to_dict(self) -> dict:
        return {"duration_s": self.duration_s, "fps": self.fps, "vfr": self.vfr, "seed": self.seed,
                "black": self.black, "events": [asdict(e) for e in self.events]}

    @property
    def colors(self) -> set[str]:
        return {e.color for e in self.events}


def _background(width: int, height: int, t: float) -> np.ndarray:
    """Grey stripes drifting right and up (separable, so cheap at any size)."""
    shift = 6.0 * t
    sx = np.sin((np.arange(width, dtype=np.float32) + shift) / 7.0)
    cy = np.cos((np.arange(height, dtype=np.float32) - shift * 0.5) / 11.0)
    base = ((0.5 + 0.25 * cy[:, None] * sx[None, :]) * 90 + 60).astype(np.uint8)
    frame = np.empty((height, width, 3), np.uint8)
    frame[..., 0] = base
    frame[..., 1] = base
    frame[..., 2] = base + 10
    return frame


def _draw(frame: np.ndarray, event: Event, t: float) -> None:
    h, w, _ = frame.shape
    lane = (LANES - 1) // 2 if event.lane is None else event.lane  # None: the middle band
    size, cy = h // (LANES + 1), int(h * (lane + 1) / (LANES + 1))
    span = event.occurrence_at(t)
    if span is not None:  # sliding: from 70% to 30% of the width over the occurrence
        progress = min(1.0, max(0.0, (t - span[0]) / max(span[1] - span[0], 1e-6)))
    else:  # still: where the last occurrence left it (30%), or at the start (70%) before the first
        progress = 1.0 if any(b <= t for _, b in event.occurrences) else 0.0
    cx = int(w * 0.7 - (w * 0.4) * progress) if event.kind == "move" else int(w * 0.3 + (w * 0.4) * progress)
    half = size // 2
    y0, y1, x0, x1 = max(0, cy - half), min(h, cy + half + 1), max(0, cx - half), min(w, cx + half + 1)
    y, x = np.ogrid[y0:y1, x0:x1]
    if event.shape == "square":
        mask = (abs(x - cx) <= half) & (abs(y - cy) <= half)
    elif event.shape == "circle":
        mask = (x - cx) ** 2 + (y - cy) ** 2 <= half ** 2
    else:
        mask = (y - (cy - half) >= 0) & (y - (cy + half) <= 0) & (abs(x - cx) <= (y - (cy - half)) // 2)
    frame[y0:y1, x0:x1][mask] = COLORS[event.color]


def render_frame(width: int, height: int, t: float, events: Sequence[Event]) -> np.ndarray:
    """RGB uint8 frame [height, width, 3] at time ``t`` (seconds from the first frame)."""
    frame = _background(width, height, t)
    for event in events:
        if event.on_screen(t):
            _draw(frame, event, t)
    return frame


def frame_times_s(seconds: float, fps: float, *, vfr: bool = False, seed: int = 0) -> list[float]:
    """Presentation times of the frames :func:`write_event_video` writes.

    Constant rate: ``i / fps``. Variable rate: bursts at 2x and 1/2 the nominal rate with random
    lengths, so frame *i* is far from ``i / fps``. Times are quantised to the file's time base.
    """
    if not vfr:
        times = [i / fps for i in range(max(1, int(round(seconds * fps))))]
    else:
        rng = random.Random(seed)
        times, t, fast = [], 0.0, True
        while t < seconds:
            step = 1.0 / (fps * 2.0) if fast else 2.0 / fps
            for _ in range(rng.randint(3, 12)):
                if t >= seconds:
                    break
                times.append(t)
                t += step
            fast = not fast
    ticks = TIME_BASE.denominator
    return [round(t * ticks) / ticks for t in times]


def shown_time_s(times_s: Sequence[float], t: float) -> float:
    """Time of the frame a player shows at ``t``: the last frame at or before it (else the first)."""
    i = int(np.searchsorted(np.asarray(times_s), t + 1e-6, side="right")) - 1
    return float(times_s[max(0, i)])


def write_event_video(path: Path, events: Sequence[Event], *, seconds: float, fps: float = 8.0,
                      width: int = 224, height: int = 168, codec: str = "libx264", vfr: bool = False,
                      seed: int = 0, black: bool = False) -> Path:
    """Write an H.264 (by default) MP4 showing ``events``; returns ``path``.

    With ``vfr`` the frame times follow :func:`frame_times_s` (bursts around the nominal rate).
    ``black``: every frame is black (nothing happens). About 10 s per hour of 8 fps on one core.
    """
    path = Path(path)
    times = frame_times_s(seconds, fps, vfr=vfr, seed=seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = TIME_BASE
        stream.codec_context.time_base = TIME_BASE
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "g": str(max(1, int(fps * 2)))}
            if vfr:
                stream.options = {**stream.options, "x264-params": "force-cfr=0"}
        blank = np.zeros((height, width, 3), np.uint8)
        for t in times:
            rgb = blank if black else render_frame(width, height, t, events)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = int(round(t / TIME_BASE))
            frame.time_base = TIME_BASE
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def random_events(rng: random.Random, duration_s: float, *, max_events: int = 3, min_events: int = 1,
                  min_fraction: float = 0.12, max_fraction: float = 0.45,
                  move_fraction: float = 0.0, event_s: tuple[float, float] | None = None,
                  repeat_fraction: float = 0.0, max_occurrences: int = 3) -> tuple[Event, ...]:
    """min_events..max_events events of different colours on different lanes, whole-second boundaries.

    Each lasts ``min_fraction``..``max_fraction`` of the video, or, with ``event_s`` = (shortest,
    longest), that many seconds (at least 2 s either way); they may overlap in time. Colours are
    distinct, so a query's colour alone names one event. Each event is a "move" with probability
    ``move_fraction``, else an "appear"; with probability ``repeat_fraction`` it happens 2 to
    ``max_occurrences`` times, apart from each other. At the default options the draws are those of
    older versions.
    """
    most = min(max_events, len(COLORS), LANES)
    n = rng.randint(min(min_events, most), most)
    colors = rng.sample(sorted(COLORS), n)
    lanes = rng.sample(range(LANES), n)
    events = []
    for color, lane in zip(colors, lanes):
        if event_s is None:
            length = max(2.0, round(duration_s * rng.uniform(min_fraction, max_fraction)))
        else:
            length = max(2.0, float(round(rng.uniform(*event_s))))
        length = min(length, math.floor(duration_s) - 1)
        start = float(rng.randint(0, max(0, int(math.floor(duration_s - length)) - 1)))
        shape = rng.choice(SHAPES)
        kind = "move" if move_fraction > 0 and rng.random() < move_fraction else "appear"
        spans = [(start, start + length)]
        if repeat_fraction > 0 and rng.random() < repeat_fraction:
            spans = _spread(rng, duration_s, length, rng.randint(2, max(2, max_occurrences))) or spans
        events.append(Event(color, shape, spans[0][0], spans[0][1], lane, kind, tuple(spans[1:])))
    return tuple(events)


def _spread(rng: random.Random, duration_s: float, length: float, count: int) -> list[tuple[float, float]]:
    """``count`` occurrences of ``length`` s, in time order, at least ``length`` (and 2 s) apart; [] if
    they do not fit."""
    gap = max(2.0, length)
    free = math.floor(duration_s) - 1 - count * length - (count - 1) * gap
    if free < 0:
        return []
    cuts = sorted(rng.randint(0, int(free)) for _ in range(count))
    spans = []
    for i, cut in enumerate(cuts):
        start = float(cut) + i * (length + gap)
        spans.append((start, start + length))
    return spans


def random_scene(rng: random.Random, duration_s: float, *, fps: float | None = None,
                 vfr: bool | None = None, **event_kwargs) -> Scene:
    """A scene of ``duration_s`` with random events, native rate and (1 in 4) variable frame rate."""
    return Scene(
        duration_s=float(duration_s),
        fps=float(fps if fps is not None else rng.choice(NATIVE_FPS)),
        events=random_events(rng, duration_s, **event_kwargs),
        vfr=bool(rng.random() < 0.25) if vfr is None else vfr,
        seed=rng.randrange(2**31),
    )


def write_scene(path: Path, scene: Scene, **kwargs) -> Path:
    return write_event_video(path, scene.events, seconds=scene.duration_s, fps=scene.fps, vfr=scene.vfr,
                             seed=scene.seed, black=scene.black, **kwargs)


# --- queries: wordings, and questions about what is not in a video ------------------------------------

APPEAR_WORDINGS = (
    "the {c} {s} appears", "a {c} {s} appears", "the {c} {s} shows up", "when does the {c} {s} appear",
    "the {c} {s} comes into view", "a {c} {s} is visible", "the {c} {s} is shown", "{c} {s}", "the {c} {s}",
    "a {c} {s} on screen", "the {c} {s} can be seen",
)
MOVE_WORDINGS = (
    "the {c} {s} moves left", "the {c} {s} slides to the left", "the {c} {s} moving left",
    "a {c} {s} moves to the left", "{c} {s} moves left", "the {c} {s} goes left", "when does the {c} {s} move left",
)
HELD_OUT_WORDINGS = {"appear": ("at what time is a {c} {s} seen", "{c} {s} visible"),
                     "move": ("the {c} {s} shifts left", "when is the {c} {s} sliding left")}
"""Wordings training never uses: they measure how far the grounder generalizes."""
UNRELATED = (
    "a dog barks", "the goalkeeper saves a penalty", "a car drives by", "someone opens a door", "a man waves",
    "it starts raining", "a woman laughs", "the lights turn off", "a ball bounces", "a phone rings",
    "the crowd cheers", "a person sits down", "a cat jumps on the table", "the camera zooms in",
    "a red card is shown", "two people shake hands", "the sun sets", "a bird flies away",
)
FOREIGN = ("el triángulo rojo aparece", "der rote Kreis erscheint", "红色三角形出现", "le carré vert bouge",
           "красный круг появляется", "赤い四角が現れる", "o círculo azul aparece")


def wording(rng: random.Random, color: str, shape: str, kind: str, *, case: bool = True,
            templates: Sequence[str] | None = None) -> str:
    """A random phrasing of "the <color> <shape> appears / moves left", sometimes in upper or title case."""
    pool = templates or (APPEAR_WORDINGS if kind == "appear" else MOVE_WORDINGS)
    text = rng.choice(pool).format(c=color, s=shape)
    if case:
        r = rng.random()
        text = text.upper() if r < 0.08 else text.title() if r < 0.16 else text.capitalize() if r < 0.3 else text
    return text


def absent_queries(rng: random.Random, events: Sequence[Event], n: int, *, wordings: bool = False) -> list[str]:
    """``n`` questions about what the scene does not show: a colour not in it, a present colour with
    another shape, "moves left" for an object that only appears, unrelated events. With ``wordings``,
    in varied phrasings (else the canonical one)."""
    present = {e.color: e for e in events}
    out: list[str] = []
    for _ in range(20 * n):
        if len(out) >= n:
            break
        kinds = ["colour", "unrelated"] + (["shape", "verb"] if events else [])
        which = rng.choice(kinds)
        if which == "colour" and len(present) < len(COLORS):
            color, shape = rng.choice(sorted(set(COLORS) - set(present))), rng.choice(SHAPES)
            kind = rng.choice(("appear", "move"))
        elif which == "shape":
            e = rng.choice(list(events))
            color, shape, kind = e.color, rng.choice([x for x in SHAPES if x != e.shape]), e.kind
        elif which == "verb" and any(e.kind == "appear" for e in events):
            e = rng.choice([e for e in events if e.kind == "appear"])
            color, shape, kind = e.color, e.shape, "move"
        else:
            color = shape = kind = ""
        text = rng.choice(UNRELATED) if not color else \
            wording(rng, color, shape, kind) if wordings else Event(color, shape, 0, 1, kind=kind).query
        if text not in out:
            out.append(text)
    return out


def wording_variants(event: Event) -> dict[str, str]:
    """The event's query in the wordings evaluations compare: canonical, bare noun phrase (appear
    events), upper case, title case, a trained paraphrase, and a held-out one training never used."""
    pool = APPEAR_WORDINGS if event.kind == "appear" else MOVE_WORDINGS
    out = {"canonical": event.query, "upper": event.query.upper(), "title": event.query.title(),
           "paraphrase": pool[2].format(c=event.color, s=event.shape),
           "held_out": HELD_OUT_WORDINGS[event.kind][0].format(c=event.color, s=event.shape)}
    if event.kind == "appear":
        out["bare"] = f"{event.color} {event.shape}"
    return out


def write_annotation_set(out_dir: Path, durations_s: Sequence[float], *, seed: int = 0,
                         fps_choices: Sequence[float] = NATIVE_FPS, json_form: bool = False,
                         move_fraction: float = 0.0, absent_per_video: int = 0,
                         event_kwargs: dict | None = None, wordings: bool = False, black: int = 0,
                         **video_kwargs) -> Path:
    """Write one video per duration and an annotation file; returns the annotation file.

    Charades-STA form (default), ``<video> <start> <end>##<query>`` per line, video names without
    extension (``<video>.mp4`` in ``out_dir``), or with ``json_form`` a JSON list of
    ``{"video", "query", "start", "end"}``. An event that happens several times has a row per
    occurrence (same query). ``absent_per_video`` queries about things not in the video get rows
    with no interval (``<video> - -##<query>``, or null start/end). ``event_kwargs`` go to
    :func:`random_events` (``event_s``, ``repeat_fraction``, ...). A ``scenes.json`` next to it
    records every scene.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows, scenes = [], []
    for i, duration in enumerate(durations_s):
        scene = random_scene(rng, duration, fps=rng.choice(list(fps_choices)), move_fraction=move_fraction,
                             **(event_kwargs or {}))
        if i < black:  # nothing but black: every question about it is absent
            scene = Scene(scene.duration_s, scene.fps, (), scene.vfr, scene.seed, black=True)
        name = f"synth{seed:03d}_{i:03d}_{duration:g}s"
        write_scene(out_dir / f"{name}.mp4", scene, **video_kwargs)
        scenes.append({"video": name, **scene.to_dict()})
        for e in scene.events:
            variants = wording_variants(e) if wordings else {"canonical": e.query}
            for tag, query in variants.items():
                rows += [{"video": name, "query": query, "start": a, "end": b, "tags": {"wording": tag}}
                         for a, b in e.occurrences]
        absent = absent_queries(rng, scene.events, absent_per_video, wordings=wordings)
        if black > i:
            absent = [Event(c, rng.choice(SHAPES), 0, 1).query for c in sorted(COLORS)][:max(1, absent_per_video)]
        rows += [{"video": name, "query": q, "start": None, "end": None, "tags": {"wording": "absent"}} for q in absent]
    (out_dir / "scenes.json").write_text(json.dumps(scenes, indent=1) + "\n")
    if json_form:
        path = out_dir / "annotations.json"
        path.write_text(json.dumps(rows, indent=1) + "\n")
    else:
        path = out_dir / "annotations.txt"
        path.write_text("".join(
            f"{r['video']} {r['start']:.1f} {r['end']:.1f}##{r['query']}\n" if r["start"] is not None
            else f"{r['video']} - -##{r['query']}\n" for r in rows))
    return path


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Write synthetic event videos and their annotations.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--durations", default="37.5,53,81,117,143",
                        help="comma list of video lengths in seconds (20 to 3600)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="JSON annotations instead of Charades-STA lines")
    parser.add_argument("--move-fraction", type=float, default=0.0,
                        help="share of events where an object on screen slides left (else it appears)")
    parser.add_argument("--absent-per-video", type=int, default=0,
                        help="questions per video about things it does not show (rows without times)")
    parser.add_argument("--event-s", default="", help="event lengths in seconds, e.g. 2,8 (default: 12-45%% of the video)")
    parser.add_argument("--repeat-fraction", type=float, default=0.0, help="share of events that happen 2-3 times")
    parser.add_argument("--wordings", action="store_true",
                        help="ask every event also in other wordings (JSON tags say which)")
    parser.add_argument("--black", type=int, default=0, help="make the first N videos all black")
    parser.add_argument("--fps", type=float, default=0.0, help="native frame rate of every video (default: drawn)")
    args = parser.parse_args(argv)
    durations = [float(d) for d in args.durations.split(",") if d]
    event_kwargs = {"repeat_fraction": args.repeat_fraction}
    if args.event_s:
        lo, hi = (float(x) for x in args.event_s.split(","))
        event_kwargs["event_s"] = (lo, hi)
    print(write_annotation_set(args.out_dir, durations, seed=args.seed, json_form=args.json or args.wordings,
                               move_fraction=args.move_fraction, absent_per_video=args.absent_per_video,
                               event_kwargs=event_kwargs, wordings=args.wordings, black=args.black,
                               fps_choices=(args.fps,) if args.fps else NATIVE_FPS))


if __name__ == "__main__":
    main()
