"""``moments demo``: make a short synthetic video, run everything, upload, ask, print, shut down."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from moments.core.config import Settings
from moments.app.render import segments_table, stats_line
from moments.app.serve import Stack, demo_model_dir, weights_available
from moments.tools.synthetic import Event, write_event_video


async def run_demo(settings: Settings, *, seconds: float = 24.0, verbose: bool = False) -> int:
    from moments.app.client import MomentsClient

    started = time.perf_counter()
    if not weights_available(settings.model):
        model_dir = demo_model_dir(settings)
        print(f"Real weights of {settings.model} are not on this machine: the demo uses the "
              f"project's tiny Qwen2.5-VL at {model_dir} (answers are only as good as that model).")
        settings = settings.replace(model=str(model_dir))
    settings = settings.replace(listen="127.0.0.1:0", log_level="INFO" if verbose else "WARNING")
    quiet = {} if verbose else {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    event = Event("red", "circle", start_s=round(seconds * 0.4), end_s=round(seconds * 0.65))
    with tempfile.TemporaryDirectory() as tmp:
        video = write_event_video(Path(tmp) / "demo.mp4", [event], seconds=seconds)
        print(f"Made a {seconds:.0f} s synthetic video: {event.query} from {event.start_s:.0f} s "
              f"to {event.end_s:.0f} s.")
        async with Stack(settings, workers=1, worker_env=quiet) as stack:
            print("Starting a worker (loading the model)...")
            await asyncio.to_thread(stack.wait_for_workers)
            with MomentsClient(stack.target) as client:
                size = video.stat().st_size
                with tqdm(total=size, unit="B", unit_scale=True, desc="upload") as bar:
                    uploaded = await asyncio.to_thread(
                        client.upload, video, progress=lambda done, total: bar.update(done - bar.n)
                    )
                video_id = uploaded.video.video_id
                print(f"Uploaded video {video_id[:16]}... "
                      f"({uploaded.video.duration.ToNanoseconds() / 1e9:.1f} s, "
                      f"{uploaded.video.width}x{uploaded.video.height} {uploaded.video.codec})")
                print(f"Asking when {event.query!r} happens...")
                response = await asyncio.to_thread(client.localize, video_id, [event.query], timeout_s=300)
                print(segments_table(response.results))
                print(stats_line(response.stats))
                again = await asyncio.to_thread(client.localize, video_id, [event.query], timeout_s=300)
                print("Asked again: " + stats_line(again.stats))
        print(f"Truth: {event.start_s:.1f} - {event.end_s:.1f} s. Demo finished in "
              f"{time.perf_counter() - started:.1f} s; everything shut down.")
    return 0
