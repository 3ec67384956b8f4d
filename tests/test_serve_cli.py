"""``moments serve`` out of the box, through the real CLI in subprocesses: the shipped grounder when
no weights are on the machine, health that follows the workers, one-line errors instead of tracebacks."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moments.tools import GROUNDER_DIR
from moments.tools.synthetic import Event, write_event_video
from tests.conftest import free_port

pytestmark = pytest.mark.slow


def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a user's shell: no MOMENTS_* settings, an empty Hugging Face cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOMENTS_")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               MOMENTS_CLIENT_STATE=str(tmp_path / "uploads.json"), TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def moments(*args: str, env: dict[str, str], timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moments.app.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout_s)


def health(target: str) -> int | None:
    """The server's overall health status, or None while it does not answer."""
    try:
        with grpc.insecure_channel(target) as channel:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
    except grpc.RpcError:
        return None


def wait_health(target: str, want: int, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while (status := health(target)) != want:
        assert proc.poll() is None, f"serve exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"health stayed {status}, wanted {want}"
        time.sleep(0.2)


def stop(proc: subprocess.Popen) -> tuple[str, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    return out, err


@pytest.mark.skipif(not (GROUNDER_DIR / "config.json").exists(), reason="the shipped grounder is absent")
def test_serve_without_weights_serves_the_grounder_and_ask_answers(tmp_path):
    env = cli_env(tmp_path)
    target = f"127.0.0.1:{free_port()}"
    serve = subprocess.Popen([sys.executable, "-m", "moments.app.cli", "serve", "--listen", target,
                              "--data-dir", str(tmp_path / "var")],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_health(target, health_pb2.HealthCheckResponse.SERVING, serve)
        video = write_event_video(tmp_path / "match.mp4", [Event("red", "circle", 6, 10)], seconds=16)
        uploaded = moments("upload", str(video), "--json", "--quiet", "--target", target, env=env)
        assert uploaded.returncode == 0, uploaded.stderr
        video_id = json.loads(uploaded.stdout)["video_id"]
        asked = moments("ask", video_id, "the red circle appears", "--json", "--target", target, env=env)
        assert asked.returncode == 0, asked.stderr
        segments = json.loads(asked.stdout)["results"][0]["segments"]
        assert segments, asked.stdout
        start_s, end_s = (float(segments[0][k].rstrip("s")) for k in ("startOffset", "endOffset"))
        assert start_s < 10 and end_s > 6, segments  # overlaps the truth, 6 - 10 s
    finally:
        out, err = stop(serve)
    assert serve.returncode == 0, err
    warnings = [line for line in err.splitlines() if "not on this machine" in line]
    assert len(warnings) == 1 and str(GROUNDER_DIR) in warnings[0], err
    assert "Traceback" not in err


def test_health_follows_workers(tmp_path, redis_url, tiny_model_dir):
    """NOT_SERVING with no worker, SERVING once one heartbeats, NOT_SERVING again when it leaves."""
    env = cli_env(tmp_path, MOMENTS_REDIS_URL=redis_url, MOMENTS_DATA_DIR=str(tmp_path / "var"))
    target = f"127.0.0.1:{free_port()}"
    serve = subprocess.Popen([sys.executable, "-m", "moments.app.cli", "serve", "--workers", "0",
                              "--listen", target], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    worker = None
    try:
        wait_health(target, health_pb2.HealthCheckResponse.NOT_SERVING, serve, timeout_s=30)
        worker = subprocess.Popen([sys.executable, "-m", "moments.app.cli", "worker", "--model",
                                   str(tiny_model_dir), "--device", "cpu"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_health(target, health_pb2.HealthCheckResponse.SERVING, serve)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0
        wait_health(target, health_pb2.HealthCheckResponse.NOT_SERVING, serve, timeout_s=10)
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
            worker.wait()
        stop(serve)


def test_a_missing_model_directory_stops_serve_at_once(tmp_path):
    missing = tmp_path / "no-such-model"
    served = moments("serve", "--listen", f"127.0.0.1:{free_port()}", "--data-dir", str(tmp_path / "var"),
                     "--model", str(missing), env=cli_env(tmp_path), timeout_s=30)
    assert served.returncode == 2
    assert served.stderr.strip() == f"error: the model directory {missing} does not exist"


def test_a_model_that_does_not_load_is_one_line_not_a_traceback(tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "qwen2_5_vl"')  # cut short
    served = moments("serve", "--listen", f"127.0.0.1:{free_port()}", "--data-dir", str(tmp_path / "var"),
                     "--model", str(broken), env=cli_env(tmp_path))
    assert served.returncode == 1
    assert "Traceback" not in served.stderr, served.stderr
    worker_errors = [line for line in served.stderr.splitlines() if line.startswith("moments worker:")]
    assert len(worker_errors) == 1 and str(broken) in worker_errors[0], served.stderr
    assert re.search(r"^error: every worker exited", served.stderr, re.M), served.stderr


def test_serve_places_one_worker_per_gpu(stack_factory):
    """With GPUs named, worker k sees only GPU k (in turn): each worker process's own environment."""
    with stack_factory(workers=0, worker_gpus="0,1") as s:
        procs = [s.stack.start_worker(i) for i in range(3)]
        envs = []
        for proc in procs:
            raw = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
            envs.append(next(v for v in raw if v.startswith(b"CUDA_VISIBLE_DEVICES=")).decode().split("=", 1)[1])
    assert envs == ["0", "1", "0"]


def test_devices_flag_names_the_gpus_and_sets_the_default_worker_count():
    """``moments serve --devices 0,2`` spreads workers over GPUs 0 and 2; without ``--workers``, one each."""
    from moments.app.cli import build_parser, settings_from_args
    from moments.app.serve import default_worker_count, worker_gpus

    args = build_parser().parse_args(["serve", "--devices", "0,2"])
    settings = settings_from_args(args)
    assert args.workers is None
    assert worker_gpus(settings) == ["0", "2"]
    assert default_worker_count(settings) == 2
    assert default_worker_count(settings.replace(worker_gpus="", device="cpu")) == 1
