"""Many hosts, for real: Redis, the S3 server, the front end and two workers each in a network
namespace of its own (``ip netns`` + veth into one bridge), nothing shared on disk between them.
Answers must be right; then one worker's link is cut mid-job and the job completes on the other.

Root only (namespaces, links); skipped otherwise. Everything the test creates (namespaces, links,
the bridge, processes) is removed at the end, also on failure."""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import boto3
import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moments.app.client import MomentsClient
from moments.app.evaluate import temporal_iou
from moments.core.records import duration_s
from moments.tools import GROUNDER_DIR
from moments.tools.synthetic import Event, write_event_video
from tests.s3_server import S3Server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                       reason="network namespaces need root and iproute2"),
    pytest.mark.skipif(not (GROUNDER_DIR / "config.json").exists(), reason="the shipped grounder is absent"),
]

HOSTS = ("redis", "s3", "front", "w1", "w2")
REDIS_PORT, S3_PORT, GRPC_PORT = 6379, 9000, 50051


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


def free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.199.0.0/16 that no route of this machine touches."""
    routes = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True).stdout
    used = {ipaddress.ip_network(word, strict=False) for line in routes.splitlines()
            for word in line.split()[:1] if word[0].isdigit()}
    for third in range(16, 250):
        net = ipaddress.ip_network(f"10.199.{third}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    pytest.skip("no free 10.199.x.0/24 subnet")


class Hosts:
    """One namespace per host, each with a veth into a bridge in the root namespace."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:6]
        self.net = free_subnet()
        self.bridge = f"mbr{self.tag}"
        self.addr = {name: str(self.net[10 + i]) for i, name in enumerate(HOSTS)}
        self.procs: list[subprocess.Popen] = []

    def ns(self, host: str) -> str:
        return f"m{self.tag}{host}"

    def link(self, host: str) -> str:
        return f"v{self.tag}{host}"  # the root-namespace end of the host's veth (<= 15 characters)

    def up(self) -> None:
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{self.net[1]}/{self.net.prefixlen}", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        for host in HOSTS:
            ns, outer, inner = self.ns(host), self.link(host), f"i{self.tag}{host}"
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
            sh("ip", "link", "set", inner, "netns", ns)
            sh("ip", "link", "set", outer, "master", self.bridge, "up")
            sh("ip", "-n", ns, "addr", "add", f"{self.addr[host]}/{self.net.prefixlen}", "dev", inner)
            sh("ip", "-n", ns, "link", "set", inner, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")

    def start(self, host: str, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        with open(log, "wb") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", self.ns(host), *argv], env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def cut(self, host: str) -> None:
        sh("ip", "link", "set", self.link(host), "down")

    def down(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        for host in HOSTS:
            subprocess.run(["ip", "netns", "del", self.ns(host)], capture_output=True)
            subprocess.run(["ip", "link", "del", self.link(host)], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


def wait_until(what: str, check, timeout_s: float = 120, procs=()) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if check():
                return
        except (OSError, redis.RedisError, grpc.RpcError):
            pass
        for proc in procs:
            assert proc.poll() is None, f"{what}: {proc.args} exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        time.sleep(0.2)


def serving(target: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
    return status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
def hosts():
    h = Hosts()
    try:
        h.up()
        yield h
    finally:
        h.down()


def test_hosts_in_namespaces_answer_and_a_cut_worker_loses_no_job(hosts, tmp_path):
    a = hosts.addr
    redis_url = f"redis://{a['redis']}:{REDIS_PORT}/0"
    s3_url = f"http://{a['s3']}:{S3_PORT}"
    target = f"{a['front']}:{GRPC_PORT}"
    redis_proc = hosts.start("redis", ["redis-server", "--bind", a["redis"], "--port", str(REDIS_PORT), "--save", "",
                                       "--appendonly", "no", "--protected-mode", "no"], dict(os.environ),
                             tmp_path / "redis.log")
    s3_proc = hosts.start("s3", [sys.executable, "-m", "moto.server", "-H", a["s3"], "-p", str(S3_PORT)],
                          dict(os.environ), tmp_path / "s3.log")
    wait_until("redis", lambda: redis.Redis.from_url(redis_url, socket_timeout=1).ping(), procs=[redis_proc])
    bucket = f"moments-{hosts.tag}"
    boto = boto3.client("s3", endpoint_url=s3_url, region_name=S3Server.REGION,
                        aws_access_key_id=S3Server.ACCESS_KEY_ID, aws_secret_access_key=S3Server.SECRET_ACCESS_KEY)
    wait_until("s3", lambda: urllib.request.urlopen(f"{s3_url}/moto-api/", timeout=1).read(), procs=[s3_proc])
    boto.create_bucket(Bucket=bucket)

    def env(host: str, **extra: str) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("MOMENTS_")}
        base.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                    OMP_NUM_THREADS="1", MOMENTS_REDIS_URL=redis_url, MOMENTS_DATA_DIR=str(tmp_path / host),
                    MOMENTS_BLOB_BACKEND="s3", MOMENTS_S3_ENDPOINT_URL=s3_url, MOMENTS_S3_BUCKET=bucket,
                    MOMENTS_S3_REGION=S3Server.REGION, MOMENTS_S3_ACCESS_KEY_ID=S3Server.ACCESS_KEY_ID,
                    MOMENTS_S3_SECRET_ACCESS_KEY=S3Server.SECRET_ACCESS_KEY, MOMENTS_S3_PART_BYTES=str(5 * 1024**2),
                    MOMENTS_MODEL=str(GROUNDER_DIR), MOMENTS_DEVICE="cpu", MOMENTS_MAX_FRAMES="64",
                    MOMENTS_BUDGET_TOKENS="512", MOMENTS_MAX_NEW_TOKENS="24", MOMENTS_JOB_LEASE_S="4",
                    MOMENTS_WORKER_STALE_S="6", MOMENTS_WORKER_NAME=host)
        base.update(extra)
        return base

    cli = [sys.executable, "-m", "moments.app.cli"]
    front = hosts.start("front", [*cli, "serve", "--workers", "0", "--listen", target], env("front"),
                        tmp_path / "front.log")
    # w1 encodes slowly, so the test can cut its link while it holds the job.
    w1 = hosts.start("w1", [*cli, "worker"], env("w1", MOMENTS_FAULTS='{"encode_sleep_s": 60}'), tmp_path / "w1.log")
    wait_until("front end serving with w1", lambda: serving(target), procs=[front, w1])

    events = [Event("red", "circle", 9.0, 21.0, lane=0), Event("blue", "square", 24.0, 33.0, lane=2)]
    video = write_event_video(tmp_path / "match.mp4", events, seconds=40, fps=8, seed=3)
    with MomentsClient(target) as client:
        video_id = client.upload(video).video.video_id
        assert not list((tmp_path / "front").rglob("*.part")), "the front end kept part files with an S3 store"

        answer: dict = {}

        def ask() -> None:
            try:
                answer["response"] = client.localize(video_id, [e.query for e in events], timeout_s=240)
            except grpc.RpcError as exc:  # the assertion below names it
                answer["error"] = exc

        asker = threading.Thread(target=ask)
        asker.start()
        wait_until("w1 runs the job", lambda: " running video=" in (tmp_path / "w1.log").read_text(), procs=[w1])
        # w2 joins once w1 holds the job, so the job can only reach w2 by being taken back from w1.
        w2 = hosts.start("w2", [*cli, "worker"], env("w2"), tmp_path / "w2.log")
        wait_until("w2 serving", lambda: " serving model " in (tmp_path / "w2.log").read_text(), procs=[w2])
        assert " done video=" not in (tmp_path / "w1.log").read_text(), "w1 finished before its link was cut"
        hosts.cut("w1")  # mid-encode: w1 can no longer reach Redis, the S3 server or the front end
        asker.join(240)
        assert not asker.is_alive(), "Localize did not return after w1's link was cut"
        assert "error" not in answer, f"the job was lost with w1's link: {answer.get('error')}"
        response = answer["response"]
        assert w2.poll() is None and "done video=" in (tmp_path / "w2.log").read_text(), "w2 did not finish the job"
        for event, result in zip(events, response.results):
            assert result.segments, f"{event.query!r}: no segment in {result.raw_answer!r}"
            seg = result.segments[0]
            got = (duration_s(seg.start_offset), duration_s(seg.end_offset))
            assert temporal_iou(got, (event.start_s, event.end_s)) >= 0.5, (event, got)
    # Nothing on disk is shared: the blob lives in the bucket only, each worker has its own cache dir.
    assert [o["Key"] for o in boto.list_objects_v2(Bucket=bucket).get("Contents", ())
            if o["Key"].endswith(video_id)], "the video is not in the bucket"
    assert not (tmp_path / "front" / "blobs").exists()
