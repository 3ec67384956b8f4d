"""The compose stack for real (scripts/compose_smoke.sh): images built from docker/ on a debootstrap
base, Redis, the front end and a CPU worker in containers on the host's network, a Localize answered
through them. Runs only with MOMENTS_COMPOSE_SMOKE=1 (root, a running dockerd, docker-compose; CI
leaves it out): about 2 minutes warm, 5 cold (see the README's Docker section)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("MOMENTS_COMPOSE_SMOKE") != "1",
                       reason="the compose smoke builds images and runs containers: set MOMENTS_COMPOSE_SMOKE=1 "
                              "(root, a running dockerd, docker-compose)"),
]


@pytest.mark.timeout(1800)
def test_compose_stack_answers_a_localize():
    env = {**os.environ, "PY": sys.executable, "SMOKE_BASELINE": "0"}
    run = subprocess.run(["bash", "scripts/compose_smoke.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, f"compose_smoke.sh exited {run.returncode}:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    line = next(line for line in run.stdout.splitlines() if line.startswith("SMOKE_RESULT "))
    result = json.loads(line.removeprefix("SMOKE_RESULT "))
    assert result["iou"] >= 0.3, result
    assert result["first_answer_s"] > 0 and result["startup_s"] > 0, result
    # The stack was taken down: none of its containers is left.
    left = subprocess.run(["docker", "ps", "-aq", "--filter", "label=com.docker.compose.project=moments-smoke"],
                          capture_output=True, text=True, check=True).stdout.split()
    assert not left, f"containers left behind: {left}"
