"""moto's S3 server as a subprocess on a free loopback port (tests and benchmarks)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
import uuid


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto in server mode: a real S3 HTTP API on a free loopback port, in a subprocess.

    Why moto: it installs from PyPI with the test extras and starts in ~2 s; it speaks the S3 REST
    API over HTTP with signature checks, multipart uploads (5 MiB minimum part), ranged GETs and
    presigned URLs, which is all the blob store uses. MinIO is on neither PyPI nor Debian;
    Debian's radosgw needs a Ceph cluster; LocalStack runs in Docker; npm's s3rver would add a
    Node toolchain to CI. Its state lives in memory, so a restart
    empties it: outage tests cut the network in front of it instead (``tests/netproxy.py``).
    """

    ACCESS_KEY_ID = "moments-test"
    SECRET_ACCESS_KEY = "moments-test-secret"
    REGION = "us-east-1"

    def __init__(self) -> None:
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1).read()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def settings(self, bucket: str, endpoint_url: str | None = None) -> dict:
        """Settings overrides for a blob store in ``bucket`` (through ``endpoint_url``, default direct)."""
        return dict(blob_backend="s3", s3_endpoint_url=endpoint_url or self.url, s3_bucket=bucket,
                    s3_region=self.REGION, s3_access_key_id=self.ACCESS_KEY_ID,
                    s3_secret_access_key=self.SECRET_ACCESS_KEY, s3_part_bytes=5 * 1024**2, s3_timeout_s=5.0)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name=self.REGION,
                            aws_access_key_id=self.ACCESS_KEY_ID, aws_secret_access_key=self.SECRET_ACCESS_KEY)

    def new_bucket(self) -> str:
        name = f"moments-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name
