"""Chaos soak: a Sentinel-managed Redis, front ends and workers under a fault schedule while clients
keep calling; figures of what the clients saw and of what the stores hold afterwards.

Everything runs on loopback, as real processes: a Redis primary and a replica (each with an
append-only file fsynced every second), three sentinels (``redis-server conf --sentinel``), N front
ends (``moments serve --workers 0``) and M workers (``moments worker``, the tiny grounder), all
following the sentinels. K client threads (``moments.app.client.MomentsClient`` with its retries,
one channel round-robin over the front ends) each own a video and loop: upload it (every third
upload is cut after its first chunk and then resumed), Localize, StreamLocalize, IndexVideo and,
every fourth round, DeleteVideo. After a fault-free baseline, a fault every ``fault_every_s``, in
rotation:

* ``kill_worker``: SIGKILL a worker (one running a job when there is one), start a new one;
* ``kill_front_end``: SIGKILL a front end, start it again on its port;
* ``kill_primary``: SIGKILL the Redis primary; the sentinels promote the replica; the old primary
  comes back as a replica of the new one (a failover may drop the last writes: async replication);
* ``stop_worker``: SIGSTOP a worker running a job past its lease, then SIGCONT (another worker has
  rerun the job; the fence must keep the stopped one from writing a second result);
* ``fill_disk``: fill the blob store's file system (a small tmpfs mounted on the data directory,
  root only; skipped otherwise, and the report says so) for ``fill_s``, then free it.

Figures (:class:`Report`): requests by kind and outcome; lost calls (a job call that ended without
an answer, or still hung at the end); JOB_LOST errors the clients met and retried; duplicates (a job
with two terminal events, a result a client saw twice); token-cache entries failing their checksum
(and a self-test that corrupts one on purpose); leftover temp, part and orphan blob files; every
error a client saw that is not retryable; recovery time per fault kind: from the fault to the first
success of a call of each kind started after it, the slowest kind counting (p50 / p99), against
the same figure at marks of the fault-free baseline.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import redis

from moments.app.client import MomentsClient, RetryPolicy, file_digest
from moments.core import keys
from moments.core.config import Settings
from moments.core.redis_client import connect_sync
from moments.core.token_index import corrupt_entries
from moments.tools import GROUNDER_DIR
from moments.v1 import moments_pb2 as pb

log = logging.getLogger(__name__)
FAULT_KINDS = ("kill_worker", "kill_front_end", "kill_primary", "stop_worker", "fill_disk")
CALL_KINDS = ("upload", "localize", "stream", "index", "delete")
JOB_CALLS = ("localize", "stream", "index")
MASTER = "moments"


@dataclass
class ChaosConfig:
    """One run: sizes, schedule and bounds (the run stops at ``duration_s`` or ``max_faults``)."""

    workdir: Path
    duration_s: float = 600.0
    front_ends: int = 2
    workers: int = 3
    clients: int = 32
    fault_every_s: float = 10.0
    baseline_s: float = 30.0
    """Fault-free start: throughput and the baseline 'recovery' at marks (no fault) come from it."""
    faults: tuple[str, ...] = FAULT_KINDS
    max_faults: int = 1000
    job_lease_s: float = 4.0
    fill_s: float = 3.0
    call_timeout_s: float = 90.0
    drain_s: float = 120.0
    """How long clients may take to finish their calls in flight when the run ends."""
    seed: int = 0


@dataclass
class Call:
    kind: str
    client: int
    started_s: float
    ended_s: float = 0.0
    outcome: str = "running"
    """``ok``, or the final gRPC status code name."""
    details: str = ""
    retried: list[tuple[str, str]] = field(default_factory=list)
    """(code, details) of every error the client library retried during this call."""


@dataclass
class Fault:
    kind: str
    at_s: float
    note: str = ""


# ----------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} after {timeout_s} s")


class Proc:
    """One child process, its output appended to ``log_path`` over restarts."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name, self.argv, self.log_path, self.env = name, argv, log_path, env
        self.popen: subprocess.Popen | None = None

    def start(self) -> "Proc":
        with open(self.log_path, "ab") as out:
            self.popen = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, env=self.env)
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGCONT)  # a stopped process dies only once continued
                self.popen.kill()
            self.popen.wait()

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()


class RedisDeployment:
    """A primary and a replica (append-only, fsync every second) watched by three sentinels."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise RuntimeError("redis-server is not installed (.ci/run installs it)")
        self.nodes: dict[int, Proc] = {}
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[Proc] = []
        self.failovers_s: list[float] = []

    @property
    def sentinel_setting(self) -> str:
        return ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)

    def _node(self, port: int, replica_of: int | None) -> Proc:
        d = self.workdir / f"redis-{port}"
        d.mkdir(parents=True, exist_ok=True)
        conf = [f"port {port}", "bind 127.0.0.1", f'dir "{d}"', "appendonly yes", "appendfsync everysec",
                'save ""', "repl-diskless-sync yes", "repl-diskless-sync-delay 0"]
        if replica_of:
            conf.append(f"replicaof 127.0.0.1 {replica_of}")
        (d / "redis.conf").write_text("\n".join(conf) + "\n")
        return Proc(f"redis-{port}", [self.binary, str(d / "redis.conf")], self.workdir / f"redis-{port}.log")

    def start(self, timeout_s: float = 30.0) -> None:
        primary, replica = free_port(), free_port()
        self.nodes[primary] = self._node(primary, None).start()
        _wait_port(primary, 10)
        self.nodes[replica] = self._node(replica, primary).start()
        for port in self.sentinel_ports:
            d = self.workdir / f"sentinel-{port}"
            d.mkdir(parents=True, exist_ok=True)
            (d / "sentinel.conf").write_text("\n".join([
                f"port {port}", "bind 127.0.0.1", f'dir "{d}"',
                f"sentinel monitor {MASTER} 127.0.0.1 {primary} 2",
                f"sentinel down-after-milliseconds {MASTER} 1000",
                f"sentinel failover-timeout {MASTER} 4000",
                f"sentinel parallel-syncs {MASTER} 1"]) + "\n")
            self.sentinels.append(Proc(f"sentinel-{port}", [self.binary, str(d / "sentinel.conf"), "--sentinel"],
                                       self.workdir / f"sentinel-{port}.log").start())
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:  # every sentinel knows the replica and its peers
            try:
                if all(self._sentinel(p).sentinel_slaves(MASTER) and len(self._sentinel(p).sentinel_sentinels(MASTER)) == 2
                       for p in self.sentinel_ports):
                    if redis.Redis(port=replica).info("replication").get("master_link_status") == "up":
                        return
            except redis.RedisError:
                pass
            time.sleep(0.2)
        raise TimeoutError("the sentinels did not see the replica and each other in time")

    def _sentinel(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=1.0, socket_connect_timeout=1.0)

    def primary_port(self) -> int:
        """The port the sentinels name as primary (the first one that answers)."""
        for port in self.sentinel_ports:
            with contextlib.suppress(redis.RedisError):
                return int(self._sentinel(port).sentinel_get_master_addr_by_name(MASTER)[1])
        raise RuntimeError("no sentinel answers")

    def kill_primary(self, timeout_s: float = 30.0) -> str:
        """SIGKILL the primary, wait for the sentinels to name another, start the old one as its replica."""
        old = self.primary_port()
        killed_s = time.monotonic()
        self.nodes[old].kill()
        new = old
        while new == old and time.monotonic() - killed_s < timeout_s:
            time.sleep(0.1)
            with contextlib.suppress(RuntimeError, redis.RedisError):
                new = self.primary_port()
        elapsed_s = time.monotonic() - killed_s
        self.failovers_s.append(elapsed_s)
        self.nodes[old] = self._node(old, new if new != old else None).start()
        return f"{old} -> {new} in {elapsed_s:.1f} s"

    def close(self) -> None:
        for proc in [*self.sentinels, *self.nodes.values()]:
            proc.kill()


# ----------------------------------------------------------------------------- the service


def service_env(config: ChaosConfig, deployment: RedisDeployment, data_dir: Path) -> dict[str, str]:
    """MOMENTS_* settings every front end and worker of the run shares (sized for the tiny model)."""
    return {
        **os.environ,
        "MOMENTS_REDIS_SENTINELS": deployment.sentinel_setting, "MOMENTS_REDIS_MASTER": MASTER,
        "MOMENTS_DATA_DIR": str(data_dir), "MOMENTS_MODEL": str(GROUNDER_DIR), "MOMENTS_DEVICE": "cpu",
        "MOMENTS_BUDGET_TOKENS": "512", "MOMENTS_MAX_FRAMES": "64", "MOMENTS_MAX_NEW_TOKENS": "12",
        "MOMENTS_KV_CACHE_BYTES": str(64 * 1024**2), "MOMENTS_JOB_LEASE_S": str(config.job_lease_s),
        "MOMENTS_WORKER_STALE_S": "20", "MOMENTS_JOB_TIMEOUT_S": str(config.call_timeout_s),
        "MOMENTS_PROBE_TIMEOUT_S": "30", "MOMENTS_LOG_LEVEL": "INFO",
        "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
    }


class Service:
    """The front ends and workers, restartable one at a time."""

    def __init__(self, config: ChaosConfig, env: dict[str, str], logs: Path) -> None:
        self.config, self.env, self.logs = config, env, logs
        self.ports = [free_port() for _ in range(config.front_ends)]
        self.fronts: list[Proc] = [self._front(i) for i in range(config.front_ends)]
        self.workers: list[Proc] = []
        self.generation = 0
        self.exited: list[str] = []
        """Processes found exited on their own (not by a fault), with their exit codes."""

    def _front(self, index: int) -> Proc:
        env = {**self.env, "MOMENTS_LISTEN": f"127.0.0.1:{self.ports[index]}"}
        return Proc(f"front-{index}", [sys.executable, "-m", "moments.app.cli", "serve", "--workers", "0"],
                    self.logs / f"front-{index}.log", env)

    def _worker(self, index: int) -> Proc:
        self.generation += 1
        name = f"chaos-worker-{index}-{self.generation}"
        proc = Proc(name, [sys.executable, "-m", "moments.app.cli", "worker"], self.logs / f"worker-{index}.log",
                    {**self.env, "MOMENTS_WORKER_NAME": name})
        return proc

    @property
    def target(self) -> str:
        return "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def start(self, settings: Settings, timeout_s: float = 240.0) -> None:
        for index in range(self.config.workers):
            self.workers.append(self._worker(index).start())
        for front in self.fronts:
            front.start()
        for port in self.ports:
            _wait_port(port, timeout_s)
        client = connect_sync(settings)
        deadline = time.monotonic() + timeout_s
        while len(client.hgetall(keys.WORKERS_HASH)) < self.config.workers:
            if time.monotonic() > deadline:
                raise TimeoutError("the workers did not start in time")
            time.sleep(0.2)

    def _note_exit(self, proc: Proc) -> None:
        if proc.popen is not None and proc.popen.poll() is not None:
            self.exited.append(f"{proc.name} (exit {proc.popen.returncode})")

    def note_exits(self) -> None:
        for proc in [*self.fronts, *self.workers]:
            self._note_exit(proc)

    def restart_front(self, index: int) -> None:
        self._note_exit(self.fronts[index])
        self.fronts[index].kill()
        self.fronts[index] = self._front(index).start()

    def restart_worker(self, index: int) -> None:
        self._note_exit(self.workers[index])
        self.workers[index].kill()
        self.workers[index] = self._worker(index).start()

    def close(self) -> None:
        for proc in [*self.fronts, *self.workers]:
            proc.stop()


# ----------------------------------------------------------------------------- clients


class _RetryLog(logging.Handler):
    """Hands every retry the client library logs to the calling thread's current :class:`Call`."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.current = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        call = getattr(self.current, "call", None)
        if call is None or not record.args:
            return
        args = record.args if isinstance(record.args, tuple) else (record.args,)
        if "retrying" in record.msg and len(args) >= 3:
            call.retried.append((str(args[1]), str(args[2])))
        elif "interrupted" in record.msg:
            call.retried.append((str(args[0]), "upload resumed"))


def client_video(path: Path, index: int) -> tuple[Path, str]:
    """Client ``index``'s own video (distinct bytes: a delete never touches another client's video)
    and the query of its event."""
    from moments.tools.synthetic import COLORS, SHAPES, Event, write_event_video

    color = list(COLORS)[index % len(COLORS)]
    shape = SHAPES[(index // len(COLORS)) % len(SHAPES)]
    start_s = 1.0 + (index % 5) * 0.5
    event = Event(color, shape, start_s, start_s + 2.0)
    return write_event_video(path, [event], seconds=6, fps=6, seed=index), event.query


class Clients:
    """K threads calling the service in a loop; every call's outcome is kept."""

    POLICY = RetryPolicy(attempts=12, backoff_s=0.25, max_delay_s=5.0)
    """Wider than the library's default (a failover takes a few seconds); waits capped at 5 s, so a
    full disk's 60 s RetryInfo is retried sooner."""

    def __init__(self, config: ChaosConfig, target: str, videos: list[tuple[Path, str]], workdir: Path) -> None:
        self.config, self.target, self.videos, self.workdir = config, target, videos, workdir
        self.calls: list[Call] = []
        self.duplicates: list[str] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.handler = _RetryLog()
        client_log = logging.getLogger("moments.app.client")
        client_log.addHandler(self.handler)
        client_log.setLevel(logging.INFO)
        client_log.propagate = False
        logging.getLogger("grpc._channel").setLevel(logging.CRITICAL)  # each cut upload's traceback
        self.threads = [threading.Thread(target=self._loop, args=(i,), name=f"chaos-client-{i}", daemon=True)
                        for i in range(config.clients)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self, timeout_s: float) -> list[Call]:
        """Stop after the calls in flight; returns the calls still running at ``timeout_s`` (hung)."""
        self.stopping.set()
        deadline = time.monotonic() + timeout_s
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self.lock:
            return [c for c in self.calls if c.outcome == "running"]

    def _record(self, kind: str, index: int, fn) -> object:
        call = Call(kind, index, time.monotonic())
        with self.lock:
            self.calls.append(call)
        self.handler.current.call = call
        try:
            value = fn()
            call.outcome = "ok"
            return value
        except grpc.RpcError as exc:
            call.outcome, call.details = exc.code().name, exc.details() or ""
            return None
        finally:
            call.ended_s = time.monotonic()
            self.handler.current.call = None

    def _loop(self, index: int) -> None:
        rng = random.Random(self.config.seed * 1000 + index)
        path, query = self.videos[index]
        with MomentsClient(self.target, state_path=self.workdir / f"client-{index}.json",
                           retry=self.POLICY) as client:
            uploaded, rounds = None, 0
            while not self.stopping.is_set():
                rounds += 1
                if uploaded is None:
                    cut = rounds % 3 == 1
                    uploaded = self._record("upload", index, lambda: self._upload(client, path, cut))
                    if uploaded is None:
                        continue
                video_id = uploaded.video.video_id
                for kind, fn in (
                        ("localize", lambda: self._localize(client, video_id, query)),
                        ("stream", lambda: self._stream(client, video_id, [query, "the red circle appears"])),
                        ("index", lambda: self._index(client, video_id))):
                    if self.stopping.is_set():
                        return
                    self._record(kind, index, fn)
                if rounds % 4 == 0 and not self.stopping.is_set():
                    if self._record("delete", index, lambda: client.delete_video(video_id)) is not None:
                        uploaded = None
                time.sleep(rng.uniform(0.0, 0.2))

    def _upload(self, client: MomentsClient, path: Path, cut: bool):
        if cut:  # send the header and one small chunk, then break the stream: the next upload resumes
            sha256, size = file_digest(path)
            header = pb.UploadHeader(size_bytes=size, sha256=sha256, filename=path.name, content_type="video/*")

            def first_chunk_then_cut():
                yield pb.UploadVideoRequest(header=header)
                with open(path, "rb") as f:
                    yield pb.UploadVideoRequest(chunk=pb.UploadChunk(offset=0, data=f.read(size // 2)))
                raise ConnectionResetError("chaos: the client's connection broke mid-upload")

            with contextlib.suppress(grpc.RpcError):
                client.stub.UploadVideo(first_chunk_then_cut(), timeout=self.config.call_timeout_s)
        return client.upload(path, max_attempts=12, timeout_s=self.config.call_timeout_s)

    def _localize(self, client: MomentsClient, video_id: str, query: str):
        response = client.localize(video_id, [query], timeout_s=self.config.call_timeout_s)
        if len(response.results) != 1:
            raise _Incomplete(f"{len(response.results)} results for 1 query")
        return response

    def _stream(self, client: MomentsClient, video_id: str, queries: list[str]):
        seen: Counter = Counter()
        done = False
        for event in client.stream_localize(video_id, queries, timeout_s=self.config.call_timeout_s):
            which = event.WhichOneof("event")
            if which == "result":
                seen[event.result.query_index] += 1
            done = done or which == "done"
        for query_index, count in seen.items():
            if count > 1:
                with self.lock:
                    self.duplicates.append(f"stream of {video_id[:12]}: result {query_index} seen {count} times")
        if not done or len(seen) != len(queries):
            raise _Incomplete(f"stream ended with results {sorted(seen)} done={done}")
        return True

    def _index(self, client: MomentsClient, video_id: str):
        if not any(e.WhichOneof("event") == "done" for e in client.index(video_id, timeout_s=self.config.call_timeout_s)):
            raise _Incomplete("index stream ended without done")
        return True


class _Incomplete(grpc.RpcError):
    """A call that returned without its whole answer (recorded as outcome INCOMPLETE)."""

    def __init__(self, details: str) -> None:
        super().__init__(details)
        self._details = details

    def code(self):
        return _IncompleteCode()

    def details(self) -> str:
        return self._details


class _IncompleteCode:
    name = "INCOMPLETE"


# ----------------------------------------------------------------------------- faults


class BlobDisk:
    """A small tmpfs on the data directory (root only), so the fill fault meets a real ENOSPC."""

    def __init__(self, data_dir: Path, size_bytes: int = 64 * 1024**2) -> None:
        self.data_dir = data_dir
        self.mounted = False
        data_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0 and shutil.which("mount"):
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(data_dir)],
                                  capture_output=True)
            self.mounted = done.returncode == 0
        self.filler = data_dir / "chaos-filler"

    def fill(self) -> int:
        """Write until the file system is full; returns the bytes written."""
        written = 0
        block = b"\0" * (1024 * 1024)
        with open(self.filler, "wb") as f:
            try:
                while True:
                    f.write(block)
                    f.flush()
                    written += len(block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
        return written

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def close(self) -> None:
        self.free()
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.data_dir)], capture_output=True)


class Faults:
    """Injects the configured faults in rotation; each one is timed and noted."""

    def __init__(self, config: ChaosConfig, deployment: RedisDeployment, service: Service, disk: BlobDisk,
                 settings: Settings) -> None:
        self.config, self.deployment, self.service, self.disk = config, deployment, service, disk
        self.settings = settings
        self.kinds = [k for k in config.faults if k != "fill_disk" or disk.mounted]
        self.skipped = [k for k in config.faults if k not in self.kinds]
        self.done: list[Fault] = []
        self.rng = random.Random(config.seed)

    def inject(self, kind: str, started: float) -> Fault:
        fault = Fault(kind, time.monotonic() - started)
        fault.note = getattr(self, kind)()
        self.done.append(fault)
        log.info("fault %s at %.1f s: %s", kind, fault.at_s, fault.note)
        return fault

    def _busy_worker(self, wait_s: float = 3.0) -> int:
        """Index of a worker running a job (waiting up to ``wait_s`` for one), else a random one."""
        deadline = time.monotonic() + wait_s
        names = {name: i for i, name in enumerate(p.name for p in self.service.workers)}
        with contextlib.suppress(redis.RedisError):
            client = connect_sync(self.settings, socket_timeout_s=2.0)
            while time.monotonic() < deadline:
                for job_key in client.scan_iter(match=f"{keys.PREFIX}:job:*", count=1000):
                    if job_key.count(b":") != 2:
                        continue
                    state, worker = client.hmget(job_key, "state", "worker")
                    if state == b"running" and worker and worker.decode() in names:
                        return names[worker.decode()]
                time.sleep(0.05)
        return self.rng.randrange(len(self.service.workers))

    def kill_worker(self) -> str:
        index = self._busy_worker()
        self.service.restart_worker(index)
        return f"worker {index} killed and restarted"

    def kill_front_end(self) -> str:
        index = self.rng.randrange(len(self.service.fronts))
        self.service.restart_front(index)
        return f"front end {index} killed and restarted"

    def kill_primary(self) -> str:
        return "primary " + self.deployment.kill_primary()

    def stop_worker(self) -> str:
        index = self._busy_worker()
        proc = self.service.workers[index]
        os.kill(proc.pid, signal.SIGSTOP)
        time.sleep(self.config.job_lease_s * 1.5 + 1.0)
        os.kill(proc.pid, signal.SIGCONT)
        return f"worker {index} stopped {self.config.job_lease_s * 1.5 + 1.0:.1f} s (lease {self.config.job_lease_s} s)"

    def fill_disk(self) -> str:
        written = self.disk.fill()
        time.sleep(self.config.fill_s)
        self.disk.free()
        return f"{written >> 20} MiB filled for {self.config.fill_s} s"


# ----------------------------------------------------------------------------- figures


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def recovery_s(calls: list[Call], at_s: float, started: float) -> float | None:
    """From ``at_s`` (run time) to the first success of a call of each kind started after it, the
    slowest kind counting (a kind not called after ``at_s`` does not count); None when some kind
    was called and never succeeded again, or nothing was called after it."""
    worst: float | None = None
    for kind in CALL_KINDS:
        after = [c for c in calls if c.kind == kind and c.started_s - started >= at_s]
        ends = [c.ended_s - started for c in after if c.outcome == "ok"]
        if after and not ends:
            return None
        if ends:
            worst = max(worst or 0.0, min(ends) - at_s)
    return worst


def recovery_by_kind(calls: list[Call], at_s: float, started: float) -> dict[str, float | None]:
    """Call kind -> seconds from ``at_s`` to the first success of a call of that kind started after
    it (None: called, never succeeded); kinds not called after ``at_s`` are left out."""
    out: dict[str, float | None] = {}
    for kind in CALL_KINDS:
        after = [c for c in calls if c.kind == kind and c.started_s - started >= at_s]
        ends = [c.ended_s - started for c in after if c.outcome == "ok"]
        if after:
            out[kind] = min(ends) - at_s if ends else None
    return out


def store_checks(settings: Settings, data_dir: Path) -> dict:
    """What Redis and the blob directory hold once the run is over: duplicate terminal events,
    republished results, corrupt token-cache entries (and a self-test), leftover files."""
    client = connect_sync(settings)
    twice, republished, open_jobs = [], 0, client.zcard(keys.OPEN_JOBS)
    for name in client.scan_iter(match=f"{keys.PREFIX}:job:*:events", count=1000):
        kinds = Counter()
        results = Counter()
        for _, fields in client.xrange(name):
            kind = fields.get(b"kind", b"").decode()
            kinds[kind] += 1
            if kind == "result":
                results[fields.get(b"data", b"")] += 1
        if kinds["done"] + kinds["failed"] > 1:
            twice.append(name.decode())
        republished += sum(n - 1 for n in results.values() if n > 1)
    corrupt = corrupt_entries(client)
    self_test = "no entry to corrupt"
    entry = next(client.scan_iter(match=f"{keys.PREFIX}:tok:*:chunk:0", count=1000), None)
    if entry is not None:
        original = client.get(entry)
        if original:
            client.set(entry, bytes([original[0] ^ 0xFF]) + original[1:])
            caught = entry.decode().removesuffix(":chunk:0") in corrupt_entries(client)
            client.set(entry, original)
            self_test = "caught" if caught else "MISSED"
    leftover = []
    for path in data_dir.rglob("*"):
        if not path.is_file():
            continue
        relative = path.relative_to(data_dir)
        if relative.parts[0] == "uploads" and path.suffix == ".part":
            if not client.exists(keys.upload(path.stem)):
                leftover.append(f"{relative} (no upload record)")
        elif relative.parts[0] == "blobs":
            if not client.exists(keys.video(path.name)):
                leftover.append(f"{relative} (no video record)")
        elif relative.parts[0] not in ("redis",):
            leftover.append(str(relative))
    return {"terminal_twice": twice, "republished_results": republished, "corrupt": corrupt,
            "self_test": self_test, "leftover": leftover, "open_jobs": open_jobs}


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), cpu)
    return (f"{cpu}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} at the end, {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}")


def _count_in_logs(logs: Path, pattern: str, glob: str) -> int:
    return sum(p.read_text(errors="replace").count(pattern) for p in logs.glob(glob))


@dataclass
class Report:
    config: ChaosConfig
    calls: list[Call]
    faults: list[Fault]
    skipped_faults: list[str]
    hung: list[Call]
    client_duplicates: list[str]
    stores: dict
    final_call: str
    """After every fault: an upload and a Localize of a fresh copy ('ok', or what went wrong)."""
    failovers_s: list[float]
    fenced_out: int
    lost_logged: int
    started_faults_s: float
    run_s: float
    baseline_recovery_s: list[float]
    run_origin: float
    exited: list[str]
    """Front ends and workers that exited on their own during the run."""
    baseline_marks_s: list[float]

    @property
    def lost(self) -> list[Call]:
        """Job calls that ended without their answer (or never ended)."""
        return [c for c in self.calls if c.kind in JOB_CALLS and c.outcome != "ok"] + self.hung

    @property
    def non_retryable(self) -> list[tuple[str, str, str]]:
        """(call kind, code, details) of every error a client saw that is not retryable; an upload's
        resume answers (FAILED_PRECONDITION with the committed offset, a cut stream) are the resume
        protocol, not errors."""
        out = []
        for call in self.calls:
            for code, details in call.retried:
                if code not in ("UNAVAILABLE", "RESOURCE_EXHAUSTED", "ABORTED") and not (
                        call.kind == "upload" and code in ("FAILED_PRECONDITION", "CANCELLED")):
                    out.append((call.kind, code, details))
            if call.outcome not in ("ok", "running"):
                out.append((call.kind, call.outcome, call.details))
        return out

    @property
    def job_lost_seen(self) -> int:
        return sum(1 for c in self.calls for code, details in c.retried if code == "ABORTED" and "lost" in details)

    def recovery(self) -> dict[str, list[float | None]]:
        """Fault kind -> recovery time of each of its faults (None: not recovered by the end)."""
        out: dict[str, list[float | None]] = defaultdict(list)
        for fault in self.faults:
            out[fault.kind].append(recovery_s(self.calls, fault.at_s, self.run_origin))
        return out

    def ok_per_s(self, lo_s: float, hi_s: float) -> float:
        n = sum(1 for c in self.calls if c.outcome == "ok" and lo_s <= c.ended_s - self.run_origin < hi_s)
        return n / max(1e-9, hi_s - lo_s)

    def table(self) -> str:
        cfg = self.config
        lines = [f"machine: {machine()}",
                 f"run: {self.run_s:.0f} s ({cfg.baseline_s:.0f} s fault-free baseline), {cfg.front_ends} front ends, "
                 f"{cfg.workers} workers, {cfg.clients} clients, a fault every {cfg.fault_every_s:.0f} s "
                 f"(lease {cfg.job_lease_s:.0f} s); faults skipped: {', '.join(self.skipped_faults) or 'none'}",
                 "", "| call | ok | not ok | retried errors |", "|---|---|---|---|"]
        for kind in CALL_KINDS:
            mine = [c for c in self.calls if c.kind == kind]
            bad = Counter(c.outcome for c in mine if c.outcome not in ("ok",))
            retried = Counter(code for c in mine for code, _ in c.retried)
            lines.append(f"| {kind} | {sum(c.outcome == 'ok' for c in mine)} | "
                         f"{', '.join(f'{k} {v}' for k, v in bad.items()) or 0} | "
                         f"{', '.join(f'{k} {v}' for k, v in sorted(retried.items())) or 0} |")
        base_rate = self.ok_per_s(0.0, cfg.baseline_s)
        chaos_rate = self.ok_per_s(self.started_faults_s, self.run_s)
        ratio = chaos_rate / base_rate if base_rate else float("nan")
        base_rec = self.baseline_recovery_s
        lines += ["", "| figure | measured | target |", "|---|---|---|",
                  f"| lost (job calls without an answer) | {len(self.lost)} | 0 |",
                  f"| JOB_LOST met by clients and resubmitted (front-end log: {self.lost_logged}) | "
                  f"{self.job_lost_seen} | reported, never a hang |",
                  f"| duplicates (terminal event twice; result seen twice by a client) | "
                  f"{len(self.stores['terminal_twice'])}; {len(self.client_duplicates)} | 0 |",
                  f"| results republished by a rerun (deduped before the client) | {self.stores['republished_results']} | - |",
                  f"| deliveries fenced out (a stopped worker's late writes refused) | {self.fenced_out} | - |",
                  f"| corrupt token-cache entries (self-test: {self.stores['self_test']}) | {len(self.stores['corrupt'])} | 0 |",
                  f"| leftover temp / part / orphan files | {len(self.stores['leftover'])} | 0 |",
                  f"| jobs left open | {self.stores['open_jobs']} | 0 |",
                  f"| front ends and workers that exited on their own | {len(self.exited)} "
                  f"{' '.join(self.exited[:5])} | 0 |",
                  f"| a call after the last fault (upload + Localize) | {self.final_call} | ok |",
                  f"| errors a client saw that are not retryable | {len(self.non_retryable)} | 0 |",
                  f"| Sentinel failover (kill -> new primary named), p50 / max | "
                  f"{percentile(self.failovers_s, 50):.1f} / {max(self.failovers_s, default=float('nan')):.1f} s | - |",
                  f"| ok calls per second: baseline / under faults (ratio) | {base_rate:.2f} / {chaos_rate:.2f} "
                  f"({ratio:.2f}) | - |",
                  "", "| recovery (fault -> first success of every call kind started after it) | n | p50 s | p99 s "
                  "| never recovered | target |", "|---|---|---|---|---|---|",
                  f"| baseline: a mark with no fault | {len(base_rec)} | {percentile(base_rec, 50):.1f} | "
                  f"{percentile(base_rec, 99):.1f} | 0 | - |"]
        for kind, values in self.recovery().items():
            got = [v for v in values if v is not None]
            lines.append(f"| {kind} | {len(values)} | {percentile(got, 50):.1f} | {percentile(got, 99):.1f} | "
                         f"{len(values) - len(got)} | p99 <= 10 s |")
        lines += ["", "| recovery per call kind, p50 / p99 s (never) | " + " | ".join(CALL_KINDS) + " |",
                  "|---|" + "---|" * len(CALL_KINDS)]
        marks = [("baseline", m) for m in self.baseline_marks_s] + [(f.kind, f.at_s) for f in self.faults]
        for row in ["baseline", *dict.fromkeys(f.kind for f in self.faults)]:
            per_kind: dict[str, list[float | None]] = defaultdict(list)
            for name, at_s in marks:
                if name == row:
                    calls = [c for c in self.calls if name != "baseline" or c.started_s - self.run_origin < self.started_faults_s]
                    for kind, value in recovery_by_kind(calls, at_s, self.run_origin).items():
                        per_kind[kind].append(value)
            cells = []
            for kind in CALL_KINDS:
                got = [v for v in per_kind[kind] if v is not None]
                never = len(per_kind[kind]) - len(got)
                cells.append(f"{percentile(got, 50):.1f} / {percentile(got, 99):.1f}" + (f" ({never})" if never else ""))
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        if self.non_retryable:
            lines += ["", "errors not retryable: " + "; ".join(f"{k} {c} {d[:80]}" for k, c, d in self.non_retryable[:10])]
        if self.stores["leftover"]:
            lines += ["", "leftover: " + ", ".join(self.stores["leftover"][:10])]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- the run


def _final_call(target: str, video: tuple[Path, str], workdir: Path) -> str:
    """One upload and Localize of a video no client used, once the faults are over: the service
    answers, and the token cache holds an entry for the self-test to corrupt (a worker's hot KV
    prefix can answer a client's re-uploaded video without writing its tokens again)."""
    path, query = video
    try:
        with MomentsClient(target, state_path=workdir / "final.json", retry=Clients.POLICY) as client:
            video_id = client.upload(path, max_attempts=12, timeout_s=60).video.video_id
            client.localize(video_id, [query], timeout_s=60)
        return "ok"
    except grpc.RpcError as exc:
        return f"{exc.code().name}: {exc.details()}"


def run(config: ChaosConfig) -> Report:
    """Start everything, run the baseline, then faults until ``duration_s``; stop; check the stores."""
    workdir = config.workdir
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    data_dir = workdir / "data"
    disk = BlobDisk(data_dir)
    deployment = RedisDeployment(workdir / "redis")
    service = None
    try:
        deployment.start()
        env = service_env(config, deployment, data_dir)
        settings = Settings.from_env(environ={k: v for k, v in env.items() if k.startswith("MOMENTS_")})
        service = Service(config, env, logs)
        service.start(settings)
        video_dir = workdir / "videos"
        video_dir.mkdir(exist_ok=True)
        videos = [client_video(video_dir / f"client-{i}.mp4", i) for i in range(config.clients)]
        faults = Faults(config, deployment, service, disk, settings)
        clients = Clients(config, service.target, videos, workdir)
        origin = time.monotonic()
        clients.start()
        marks = []
        while time.monotonic() - origin < min(config.baseline_s, config.duration_s):
            time.sleep(min(2.0, config.baseline_s))
            marks.append(time.monotonic() - origin)
        started_faults_s = time.monotonic() - origin
        turn = 0
        while time.monotonic() - origin < config.duration_s and turn < config.max_faults and faults.kinds:
            fault_started = time.monotonic()
            faults.inject(faults.kinds[turn % len(faults.kinds)], origin)
            turn += 1
            time.sleep(max(0.0, config.fault_every_s - (time.monotonic() - fault_started)))
        run_s = time.monotonic() - origin
        service.note_exits()
        hung = clients.stop(config.drain_s)
        time.sleep(2.0)  # the last fenced writes and acks land
        final = _final_call(service.target, client_video(video_dir / "final.mp4", config.clients), workdir)
        stores = store_checks(settings, data_dir)
        calls = list(clients.calls)
        baseline = [r for r in (recovery_s([c for c in calls if c.started_s - origin < started_faults_s], m, origin)
                                for m in marks[:-1]) if r is not None]
        report = Report(config, calls, faults.done, faults.skipped, hung, clients.duplicates, stores, final,
                        deployment.failovers_s, _count_in_logs(logs, "another delivery holds its lease", "worker-*.log"),
                        _count_in_logs(logs, "lost: its record vanished", "front-*.log"), started_faults_s, run_s,
                        baseline, origin, list(service.exited), marks[:-1])
        return report
    finally:
        if service is not None:
            service.close()
        deployment.close()
        disk.close()
