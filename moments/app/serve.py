"""``moments serve``: the front end, worker processes and (without a Redis URL) a private Redis."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from moments.core import keys
from moments.core.config import DEFAULT_MODEL, Settings
from moments.core.redis_client import connect, connect_sync
from moments.app.redis_server import PrivateRedis

log = logging.getLogger(__name__)


def weights_available(model: str) -> bool:
    """True for a local checkpoint directory or a hub id already in the local cache."""
    if Path(model, "config.json").exists():
        return True
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model, "config.json"), str)
    except Exception:  # noqa: BLE001 - no hub library or a malformed id
        return False


def missing_local_model(model: str) -> bool:
    """True when ``model`` is written as a path (not a hub id like ``org/name``) and is not there."""
    looks_like_path = model.startswith(("/", "./", "../", "~")) or model.count("/") > 1
    return looks_like_path and not Path(model).expanduser().exists()


def demo_model_dir(settings: Settings) -> Path:
    """The project's tiny model: the shipped trained grounder if present, else one built now."""
    from moments.tools import GROUNDER_DIR

    if (GROUNDER_DIR / "config.json").exists():
        return GROUNDER_DIR
    out = settings.data_path / "tiny-model"
    if not (out / "config.json").exists():
        subprocess.run([sys.executable, "-m", "moments.tools.tiny_model", str(out)], check=True)
    return out


class Stack:
    """Everything ``moments serve`` runs, as a context for the CLI, the demo and tests."""

    def __init__(self, settings: Settings, *, workers: int = 1,
                 worker_env: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.worker_count = workers
        self.worker_env = worker_env
        self.redis: PrivateRedis | None = None
        self.workers: list[subprocess.Popen] = []
        self.worker_names: list[str] = []
        """Consumer name of each of ``workers``, so the reaper can drop a dead one's heartbeat."""
        self.front = None
        self.all_exited = asyncio.Event()
        """Set by the reaper once every worker this stack started has exited."""
        self._reaper: asyncio.Task | None = None

    async def __aenter__(self) -> "Stack":
        self.settings.data_path.mkdir(parents=True, exist_ok=True)
        if not self.settings.redis_configured:
            self.redis = PrivateRedis(self.settings.data_path / "redis")
            self.settings = self.settings.replace(redis_url=self.redis.start())
            log.info("private redis-server at %s", self.settings.redis_url)
        for i in range(self.worker_count):
            self.start_worker(i)
        from moments.service.server import start_front_end

        self.front = await start_front_end(self.settings)
        self._reaper = asyncio.create_task(self._reap())
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @property
    def target(self) -> str:
        host = self.settings.listen.rsplit(":", 1)[0]
        return f"{host}:{self.front.port}"

    def start_worker(self, index: int, **setting_overrides) -> subprocess.Popen:
        """Start worker process ``index`` with the stack's settings (``setting_overrides`` changed); on a
        host with several GPUs, worker ``index`` sees only GPU ``gpus[index % len(gpus)]``."""
        settings = self.settings.replace(**setting_overrides)
        name = f"worker-{index}-{time.monotonic_ns()}"
        env = {**os.environ, **_settings_env(settings), "MOMENTS_WORKER_NAME": name, **(self.worker_env or {})}
        gpus = worker_gpus(settings)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
        elif self.worker_count > 1 and "OMP_NUM_THREADS" not in env:
            # CPU workers share the cores: each gets its part, not all of them (no oversubscription).
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.worker_count))
        proc = subprocess.Popen([sys.executable, "-m", "moments.app.cli", "worker"], env=env)
        self.workers.append(proc)
        self.worker_names.append(name)
        return proc

    def wait_for_workers(self, count: int | None = None, timeout_s: float = 180.0) -> None:
        """Block until ``count`` workers heartbeat (model loaded), or raise."""
        want = self.worker_count if count is None else count
        client = connect_sync(self.settings)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            beats = client.hgetall(keys.WORKERS_HASH)
            now = time.time()
            if sum(1 for v in beats.values() if now - float(v) < self.settings.worker_stale_s) >= want:
                return
            dead = [p for p in self.workers if p.poll() is not None]
            if len(dead) == len(self.workers):
                raise RuntimeError(f"every worker exited (codes {[p.returncode for p in dead]})")
            time.sleep(0.2)
        raise TimeoutError(f"{want} workers did not start within {timeout_s} s")

    async def _reap(self) -> None:
        """Watch the worker processes: one that exits is logged and its heartbeat dropped at once, so
        the other workers claim back what was handed to it (not after the lease) and hand it no more;
        sets ``all_exited`` once every one has exited."""
        reported: set[int] = set()
        redis = connect(self.settings)
        try:
            while True:
                for index, proc in enumerate(list(self.workers)):
                    if proc.poll() is None or index in reported:
                        continue
                    reported.add(index)
                    log.warning("worker %d (%s) exited with code %s", index, self.worker_names[index], proc.returncode)
                    try:
                        await redis.hdel(keys.WORKERS_HASH, self.worker_names[index])
                        await redis.hdel(keys.WORKER_LANES, self.worker_names[index])
                    except Exception:  # noqa: BLE001 - Redis gone: the heartbeat goes stale by itself
                        log.warning("could not drop the heartbeat of %s", self.worker_names[index])
                if self.workers and len(reported) == len(self.workers):
                    self.all_exited.set()
                await asyncio.sleep(WORKER_POLL_S)
        finally:
            await redis.aclose()

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            try:
                await self._reaper
            except asyncio.CancelledError:
                pass
            self._reaper = None
        if self.front is not None:
            await self.front.stop(grace_s=5.0)
            self.front = None
        for proc in self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.workers:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.workers.clear()
        self.worker_names.clear()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None


def worker_gpus(settings: Settings) -> list[str]:
    """The GPUs workers are spread over: ``Settings.worker_gpus`` (a comma list), else, for a CUDA
    device, every GPU this host shows (``CUDA_VISIBLE_DEVICES`` or ``nvidia-smi -L``); [] on CPU."""
    if settings.worker_gpus:
        return [g.strip() for g in settings.worker_gpus.split(",") if g.strip()]
    if settings.device == "cpu" or (settings.device.startswith("cuda:")):
        return []  # one device named for every worker: leave placement to the caller
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip()]
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(listed.splitlines()) if line.startswith("GPU ")]


def default_worker_count(settings: Settings) -> int:
    """``moments serve`` without ``--workers``: one worker per GPU it spreads over, else one."""
    return len(worker_gpus(settings)) or 1


def _settings_env(settings: Settings) -> dict[str, str]:
    env = {}
    for name, value in settings.__dict__.items():
        env[f"MOMENTS_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    env["MOMENTS_DATA_DIR"] = str(settings.data_path)
    return env


def model_or_grounder(settings: Settings) -> Settings:
    """Settings whose model is on this machine: without the default model's weights, the shipped
    grounder (with a one-line warning), so ``moments serve`` answers out of the box."""
    if settings.model != DEFAULT_MODEL or weights_available(settings.model):
        return settings
    model_dir = demo_model_dir(settings)
    log.warning("weights of %s are not on this machine: serving the project's tiny grounder %s (it "
                "knows only synthetic events; download the weights or pass --model DIR for real videos)",
                settings.model, model_dir)
    return settings.replace(model=str(model_dir))


WORKER_POLL_S = 0.5


async def serve_forever(settings: Settings, workers: int | None) -> int:
    """Run until SIGTERM/SIGINT (exit 0), or until every worker this command started has exited
    (exit 1: nothing of this machine can answer; the workers said why). A model directory that
    does not exist stops it before anything starts (exit 2). ``workers`` None: one per device."""
    if workers is None:
        workers = default_worker_count(settings)
    if workers and missing_local_model(settings.model):
        print(f"error: the model directory {settings.model} does not exist", file=sys.stderr)
        return 2
    settings = model_or_grounder(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with Stack(settings, workers=workers) as stack:
        print(f"Moments listening on {stack.target} (redis {stack.settings.redis_url or stack.settings.redis_sentinels}); it answers "
              f"once a worker has loaded {settings.model}", flush=True)
        watch = asyncio.create_task(_wait_for_exits(stack, workers))
        await asyncio.wait([watch, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
        if watch.done():
            print(f"error: every worker exited (exit codes {[p.returncode for p in stack.workers]}); "
                  "shutting down", file=sys.stderr, flush=True)
            return 1
        watch.cancel()
        print("shutting down: draining calls in flight", flush=True)
    return 0


async def _wait_for_exits(stack: Stack, workers: int) -> None:
    """Return once every worker has exited (the stack's reaper says which); never with ``--workers 0``
    (a front end alone runs until stopped)."""
    if not workers:
        await asyncio.Event().wait()
    await stack.all_exited.wait()
