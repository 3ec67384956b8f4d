"""The ``moments`` command line: serve, worker, demo, upload, ingest, ask, search, videos, delete, config."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from dataclasses import fields

from moments.core.logs import setup_logging
from moments.core.config import Settings, settings_table

log = logging.getLogger(__name__)
EXIT_NO_MODEL = 4
"""``moments worker`` exit code when its model does not load (missing, unreadable, no network)."""


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (also MOMENTS_* environment variables)")
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        if flag in parser._option_string_actions:  # the command defines it itself (eval's --target)
            continue
        if f.type in ("bool", bool):
            group.add_argument(flag, action="store_true", default=None, help=f.metadata["help"])
        else:
            kind = {"int": int, "float": float}.get(f.type if isinstance(f.type, str) else "", str)
            group.add_argument(flag, type=kind, default=None, help=f.metadata["help"])


def settings_from_args(args: argparse.Namespace) -> Settings:
    """``MOMENTS_*`` environment variables, then the command's flags."""
    overrides = {f.name: getattr(args, f.name, None) for f in fields(Settings)}
    return Settings.from_env(**overrides)


def _client(args):
    from moments.app.client import MomentsClient

    settings = settings_from_args(args)
    return MomentsClient(settings.target, api_key=settings.api_key or None, state_path=settings.client_state)


def cmd_serve(args) -> int:
    from moments.app.serve import serve_forever

    settings = settings_from_args(args)
    setup_logging(settings.log_level, settings.log_json)
    return asyncio.run(serve_forever(settings, args.workers))


def cmd_worker(args) -> int:
    from moments.app.serve import missing_local_model
    from moments.tools.faults import maybe_faulty
    from moments.workers.main import load_engine, run_worker

    settings = settings_from_args(args)
    setup_logging(settings.log_level, settings.log_json)
    if not settings.redis_configured:
        print("moments worker needs MOMENTS_REDIS_URL / --redis-url (or MOMENTS_REDIS_SENTINELS)", file=sys.stderr)
        return 2
    if missing_local_model(settings.model):
        print(f"moments worker: the model directory {settings.model} does not exist", file=sys.stderr)
        return EXIT_NO_MODEL
    try:
        engine = load_engine(settings)
    except Exception as exc:  # noqa: BLE001 - any load failure: one line, not a traceback
        log.debug("model load failed", exc_info=True)
        print(f"moments worker: cannot load the model {settings.model}: {type(exc).__name__}: "
              f"{_one_line(exc)}", file=sys.stderr)
        return EXIT_NO_MODEL
    return asyncio.run(run_worker(settings, maybe_faulty(engine, settings.faults)))


def _one_line(exc: BaseException, max_chars: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= max_chars else text[:max_chars - 3] + "..."


def cmd_demo(args) -> int:
    from moments.app.demo import run_demo

    settings = settings_from_args(args)
    setup_logging("WARNING" if not args.verbose else "INFO", settings.log_json)
    return asyncio.run(run_demo(settings, seconds=args.seconds, verbose=args.verbose))


def cmd_upload(args) -> int:
    from tqdm import tqdm

    with _client(args) as client:
        size = os.path.getsize(args.file)
        with tqdm(total=size, unit="B", unit_scale=True, desc="upload", disable=args.quiet) as bar:
            def progress(done: int, total: int) -> None:
                bar.update(done - bar.n)

            response = client.upload(args.file, progress=progress)
    _print_stored(response, args.json)
    return 0


def cmd_ingest(args) -> int:
    with _client(args) as client:
        response = client.ingest(args.uri, sha256=args.sha256 or "", timeout_s=args.timeout)
    _print_stored(response, args.json)
    return 0


def _print_stored(response, as_json: bool) -> None:
    video = response.video
    print(json.dumps({
        "video_id": video.video_id,
        "deduplicated": response.deduplicated,
        "duration_s": video.duration.ToNanoseconds() / 1e9,
        "fps": round(video.native_fps, 3),
        "size": f"{video.width}x{video.height}",
        "codec": video.codec,
    }) if as_json else f"{video.video_id}  {video.duration.ToNanoseconds() / 1e9:.1f} s  "
                       f"{video.width}x{video.height} {video.codec}"
          + ("  (already stored)" if response.deduplicated else ""))


def cmd_ask(args) -> int:
    from moments.app.render import print_events

    queries = [args.query, *(args.extra_query or [])]
    with _client(args) as client:
        from moments.app.client import search_options

        search = search_options(args.search or "", min_event_s=args.min_event_s or 0.0)
        events = client.stream_localize(args.video, queries, max_new_tokens=args.max_new_tokens,
                                        min_confidence=args.min_confidence or 0.0, search=search,
                                        timeout_s=args.timeout)
        return print_events(events, queries, as_json=args.json)


def cmd_search(args) -> int:
    from moments.app.render import print_search

    queries = [args.query, *(args.extra_query or [])]
    if bool(args.video) == args.all:
        print("moments search: name videos with --video ID (repeatable) or search --all of yours", file=sys.stderr)
        return 2
    with _client(args) as client:
        events = client.search_videos(queries, video_ids=args.video or (), all_of_mine=args.all, limit=args.limit,
                                      min_confidence=args.min_confidence or 0.0, timeout_s=args.timeout)
        return print_search(events, as_json=args.json)


def cmd_videos(args) -> int:
    with _client(args) as client:
        for video in client.list_videos():
            print(f"{video.video_id}  {video.duration.ToNanoseconds() / 1e9:8.1f} s  "
                  f"{video.width}x{video.height}  {video.filename}")
    return 0


def cmd_delete(args) -> int:
    with _client(args) as client:
        response = client.delete_video(args.video)
    print(f"deleted {args.video} ({response.cache_entries_removed} cache entries)")
    return 0


def cmd_config(args) -> int:
    print(settings_table())
    return 0


def cmd_eval(args) -> int:
    from moments.app.evaluate import run_eval

    return run_eval(args, settings_from_args(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moments", description="Find when things happen in long videos.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the front end, workers and (if needed) a private Redis")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes, one per device in turn (default: one per GPU, else 1; 0 = front end only)")
    p.add_argument("--devices", dest="worker_gpus", default=None,
                   help="GPUs to spread the workers over, comma list (the same as --worker-gpus)")
    _add_settings_flags(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="run one worker process")
    _add_settings_flags(p)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("demo", help="make a video, run everything, ask a question, shut down")
    p.add_argument("--seconds", type=float, default=24.0, help="length of the synthetic video")
    p.add_argument("--verbose", action="store_true")
    _add_settings_flags(p)
    p.set_defaults(func=cmd_demo)

    for name, func, help_text in (
        ("upload", cmd_upload, "upload a video file (resumes an interrupted upload)"),
        ("ingest", cmd_ingest, "have the server fetch a video from an s3:// or https:// URI"),
        ("ask", cmd_ask, "ask when something happens in a video"),
        ("search", cmd_search, "ask when something happens across many videos, best segments first"),
        ("videos", cmd_videos, "list your videos"),
        ("delete", cmd_delete, "delete a video"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--target", default=None, help="front end address (MOMENTS_TARGET)")
        p.add_argument("--api-key", default=None, help="API key (MOMENTS_API_KEY)")
        p.set_defaults(func=func)
        if name == "upload":
            p.add_argument("file")
            p.add_argument("--json", action="store_true")
            p.add_argument("--quiet", action="store_true")
        elif name == "ingest":
            p.add_argument("uri")
            p.add_argument("--sha256", default=None, help="the bytes' expected sha256 (skips the fetch if stored)")
            p.add_argument("--json", action="store_true")
            p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
        elif name == "ask":
            p.add_argument("video")
            p.add_argument("query")
            p.add_argument("--query", dest="extra_query", action="append", help="another query")
            p.add_argument("--json", action="store_true")
            p.add_argument("--max-new-tokens", type=int, default=0)
            p.add_argument("--min-confidence", type=float, default=None,
                           help="segments scoring below this are dropped (0-1; default: the server's)")
            p.add_argument("--search", choices=["off", "auto"], default=None,
                           help="coarse-to-fine search through long videos (default: the server's)")
            p.add_argument("--min-event-s", type=float, default=None,
                           help="the shortest event a search must not miss (seconds)")
            p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
        elif name == "search":
            p.add_argument("query")
            p.add_argument("--query", dest="extra_query", action="append", help="another query")
            p.add_argument("--video", action="append", help="a video to search (repeatable)")
            p.add_argument("--all", action="store_true", help="search every video of yours")
            p.add_argument("--limit", type=int, default=10, help="most segments to show")
            p.add_argument("--min-confidence", type=float, default=None,
                           help="segments scoring below this are dropped (0-1; default: the server's)")
            p.add_argument("--json", action="store_true")
            p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
        elif name == "delete":
            p.add_argument("video")

    p = sub.add_parser("eval", help="evaluate grounding on Charades-STA-style annotations")
    p.add_argument("annotations")
    p.add_argument("--videos-dir", default=None, help="where the videos are (default: beside ANNOTATIONS)")
    p.add_argument("--target", default=None, help="evaluate through this front end (default: engine)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--report", default="eval-report.json")
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--write-calibration", action="store_true",
                   help="fit the score calibration on these annotations (absent queries needed) and write it "
                        "into the model directory (engine runner; one pass per question)")
    _add_settings_flags(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("config", help="print the settings table")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - print gRPC errors plainly
        import grpc

        if isinstance(exc, grpc.RpcError):
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
