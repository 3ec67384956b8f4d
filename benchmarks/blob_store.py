"""Blob store benchmark: a large upload into S3 and URI ingest, each with its baseline in the same run.

Everything runs on this machine over loopback: moto's S3 server (a subprocess, ``tests/s3_server.py``),
a front end with no workers (a child process, with a private redis-server), an HTTPS and an HTTP
source (``tests/http_source.py``, TLS with a CA made by openssl) and the gRPC client (this process).

Rows:

* upload, local directory (the baseline) and S3: ``MomentsClient.upload`` of one real video of
  ``--size-mib`` (lossless noise frames, made once), wall time from the first byte to the stored,
  probed video; the front end's peak RSS (``VmHWM``, one fresh front end per row; the probe child is
  not counted);
* S3 ceiling: the same bytes as a multipart upload straight into moto with boto3 (the same part
  size, one part at a time), no front end: what the S3 server alone manages;
* ingest from https://, http:// (allow-listed loopback) and s3://, into each store; baseline: the
  same URL downloaded by httpx into nothing (the source's own speed).

Usage::

    python benchmarks/blob_store.py                  # 1 GiB
    python benchmarks/blob_store.py --size-mib 256 --json /tmp/blob.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MiB = 1024 * 1024
INBOX = "bench-inbox"


# ------------------------------------------------------------------------------ front end


async def serve_child(settings_json: str) -> None:
    """Run a front end (no workers); print its target and pid; stop on SIGTERM."""
    import asyncio
    import logging

    from moments.app.serve import Stack
    from moments.core.config import Settings

    logging.basicConfig(level=logging.WARNING)
    settings = Settings.from_env(environ={}, **json.loads(settings_json))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with Stack(settings, workers=0) as stack:
        print(json.dumps({"target": stack.target, "pid": os.getpid()}), flush=True)
        await stop.wait()


class FrontEnd:
    def __init__(self, **settings) -> None:
        self.settings = settings

    def __enter__(self) -> "FrontEnd":
        cmd = [sys.executable, __file__, "--serve-child", json.dumps(self.settings)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the front end did not start (exit {self.proc.wait()})")
        info = json.loads(line)
        self.target, self.pid = info["target"], info["pid"]
        return self

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")


# ---------------------------------------------------------------------------------- inputs


def big_video(size_mib: int, cache: Path) -> Path:
    """A real MP4 of at least ``size_mib`` MiB (made once per size)."""
    from tests.media import make_large_video

    path = cache / f"moments-bench-{size_mib}mib.mp4"
    if not path.exists() or path.stat().st_size < size_mib * MiB:
        started = time.monotonic()
        make_large_video(path.with_suffix(".tmp.mp4"), size_mib * MiB, width=640, height=480)
        path.with_suffix(".tmp.mp4").rename(path)
        print(f"made {path} ({path.stat().st_size / MiB:.0f} MiB) in {time.monotonic() - started:.0f} s",
              file=sys.stderr)
    return path


def moto_ceiling(s3, bucket: str, path: Path, part_bytes: int) -> float:
    """Seconds for a plain sequential multipart upload of ``path`` into moto (no front end)."""
    started = time.monotonic()
    key = "ceiling/upload"
    mpu = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    parts = []
    with open(path, "rb") as f:
        while body := f.read(part_bytes):
            n = len(parts) + 1
            parts.append({"PartNumber": n, "ETag": s3.upload_part(Bucket=bucket, Key=key, UploadId=mpu,
                                                                  PartNumber=n, Body=body)["ETag"]})
    s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=mpu, MultipartUpload={"Parts": parts})
    elapsed = time.monotonic() - started
    s3.delete_object(Bucket=bucket, Key=key)
    return elapsed


def download_s(url: str, ca: Path) -> float:
    """Seconds for httpx to read ``url`` to the end, keeping nothing."""
    import ssl

    import httpx

    started = time.monotonic()
    with httpx.Client(verify=ssl.create_default_context(cafile=str(ca)), trust_env=False, timeout=60) as client:
        with client.stream("GET", url) as reply:
            for _ in reply.iter_raw(MiB):
                pass
    return time.monotonic() - started


# ----------------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> list[dict]:
    from moments.app.client import MomentsClient
    from tests.http_source import MediaServer
    from tests.pki import make_pki
    from tests.s3_server import S3Server

    work = Path(tempfile.mkdtemp(prefix="moments-blob-bench-"))
    video = big_video(args.size_mib, Path(args.cache))
    size = video.stat().st_size
    sha = hashlib.sha256(video.read_bytes()).hexdigest()
    (work / "pki").mkdir()
    pki = make_pki(work / "pki", leaves=("server",))
    moto = S3Server()
    moto.start()
    rows: list[dict] = []

    def row(kind: str, store: str, seconds: float, rss_mb: float | None = None, **extra) -> None:
        rows.append({"what": kind, "store": store, "seconds": round(seconds, 2),
                     "mb_per_s": round(size / 1e6 / seconds, 1), "peak_rss_mb": rss_mb and round(rss_mb), **extra})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    try:
        s3 = moto.client()
        s3.create_bucket(Bucket=INBOX)
        s3.upload_file(str(video), INBOX, "in/video.mp4")
        part_bytes = args.part_mib * MiB
        stores = {
            "local": dict(blob_backend="local"),
            "s3": {**moto.settings(""), "s3_part_bytes": part_bytes},
        }
        common = dict(redis_url="", listen="127.0.0.1:0", log_level="WARNING", probe_timeout_s=120.0,
                      allow_networks="127.0.0.0/8", ingest_ca_bundle=str(pki / "ca.pem"),
                      ingest_s3_buckets=f"{INBOX}/in/", s3_endpoint_url=moto.url, s3_region=moto.REGION,
                      s3_access_key_id=moto.ACCESS_KEY_ID, s3_secret_access_key=moto.SECRET_ACCESS_KEY,
                      max_upload_bytes=max(8 * 1024**3, 2 * size))
        buckets = {}

        def settings_for(store: str) -> dict:
            bucket = moto.new_bucket() if store == "s3" else ""
            buckets[store] = bucket
            data = work / f"data-{store}-{len(rows)}"
            return {**common, **stores[store], "s3_bucket": bucket, "data_dir": str(data)}

        # Uploads: local baseline, then S3, one fresh front end each.
        for store in ("local", "s3") if args.only in ("", "upload") else ():
            with FrontEnd(**settings_for(store)) as front, MomentsClient(front.target, state_path=work / "c.json") as c:
                started = time.monotonic()
                reply = c.upload(video, timeout_s=1800)
                elapsed = time.monotonic() - started
                assert reply.video.video_id == sha, reply
                row("upload", store, elapsed, front.peak_rss_mb())
        if args.only in ("", "upload"):
            row("S3 ceiling: boto3 multipart straight into moto", "s3",
                moto_ceiling(s3, buckets["s3"], video, part_bytes))
        if args.only == "upload":
            return rows

        # Ingest: each source's own speed, then through the front end into each store.
        with MediaServer(cert=pki / "server.pem", key=pki / "server.key") as https, MediaServer() as http:
            https.files["video.mp4"] = http.files["video.mp4"] = video
            sources = {"https": https.url("/files/video.mp4"), "http": http.url("/files/video.mp4", host="127.0.0.1"),
                       "s3": f"s3://{INBOX}/in/video.mp4"}
            for name in ("https", "http"):
                row(f"source alone: httpx GET ({name})", "-", download_s(sources[name], pki / "ca.pem"))
            for store in ("local", "s3"):
                for name, uri in sources.items():
                    with FrontEnd(**settings_for(store)) as front, MomentsClient(front.target) as c:
                        started = time.monotonic()
                        reply = c.ingest(uri, timeout_s=1800)
                        elapsed = time.monotonic() - started
                        assert reply.video.video_id == sha, reply
                        row(f"ingest {name}://", store, elapsed, front.peak_rss_mb())
    finally:
        moto.stop()
    return rows


def table(rows: list[dict]) -> str:
    """One line per row; the baseline of each (measured in the same run) and the speed ratio."""
    by = {(r["what"], r["store"]): r for r in rows}
    out = ["| what | store | seconds | MB/s | baseline (same run) | speed vs baseline | front-end peak RSS MB |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        base = None
        if r["store"] == "s3" and (r["what"], "local") in by:
            base = (f"{r['what']}, local", by[(r["what"], "local")])
        elif r["what"].startswith("ingest"):
            scheme = r["what"].split()[1].split(":")[0]
            source = by.get((f"source alone: httpx GET ({scheme})", "-"))
            base = (source["what"], source) if source else None
        elif r["what"].startswith("S3 ceiling"):
            base = ("upload, s3", by[("upload", "s3")])
        shown, ratio = ("", "")
        if base is not None:
            shown, ratio = base[0], f"{base[1]['seconds'] / r['seconds']:.2f}x"
        rss = "" if r["peak_rss_mb"] is None else r["peak_rss_mb"]
        out.append(f"| {r['what']} | {r['store']} | {r['seconds']} | {r['mb_per_s']} | {shown} | {ratio} | {rss} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--serve-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--part-mib", type=int, default=8, help="s3_part_bytes in MiB")
    parser.add_argument("--cache", default=tempfile.gettempdir(), help="where the test video is kept")
    parser.add_argument("--only", choices=("", "upload", "ingest"), default="", help="one half of the rows")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.serve_child:
        import asyncio

        asyncio.run(serve_child(args.serve_child))
        return
    rows = run(args)
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}; object {args.size_mib} MiB, S3 parts {args.part_mib} MiB")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
