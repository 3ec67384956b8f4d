"""The Node grpc-js example (examples/node) against a real stack: it loads protos/ alone, uploads with
a cut first stream and resumes, asks with Localize and StreamLocalize, and decodes error details."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from moments.service.auth import hash_key
from moments.tools.synthetic import Event, write_event_video

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "node"
NODE = shutil.which("node")
KEY = "node-example-key"
RATE_PER_S = 4
"""The example's tenant may make this many calls a second, so a burst of calls meets RetryInfo."""

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(NODE is None, reason="node is not installed (Node 18+ runs examples/node; "
                                            ".ci/run installs its packages when npm is there)"),
]


@pytest.fixture(scope="module")
def stack(redis_server, stack_factory):
    redis_server.client().flushall()
    with stack_factory(api_keys=f"node:{hash_key(KEY)}:{RATE_PER_S}") as s:
        yield s


def test_node_client_uploads_with_resume_asks_and_decodes_errors(stack, tmp_path):
    if not (EXAMPLE / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail(f"node is installed but the example's packages are not: cd {EXAMPLE} && npm ci")
    video = write_event_video(tmp_path / "match.mp4", [Event("red", "circle", 1, 3)], seconds=4, fps=4)
    size = video.stat().st_size
    run = subprocess.run(
        [NODE, str(EXAMPLE / "client.js"), "--target", stack.target, "--api-key", KEY,
         "--cut-after", str(size // 2), "--burst", str(3 * RATE_PER_S), str(video), "a red circle appears"],
        capture_output=True, text=True, timeout=240)
    steps: dict[str, list[dict]] = {}
    for line in run.stdout.splitlines():
        entry = json.loads(line)
        steps.setdefault(entry.pop("step"), []).append(entry)
    assert run.returncode == 0 and "finished" in steps, run.stdout + run.stderr

    # The first stream ended at half the file: WRONG_OFFSET with the id and offset, decoded from
    # the trailer; GetUpload says the same; the second stream goes on from there.
    error = steps["upload_interrupted"][0]["error"]
    assert error["code"] == "FAILED_PRECONDITION"
    [info] = [d for d in error["details"] if d["type"] == "google.rpc.ErrorInfo"]
    assert info["reason"] == "WRONG_OFFSET" and info["domain"] == "moments.v1"
    assert info["metadata"]["committed_bytes"] == str(size // 2)
    [upload] = steps["get_upload"]
    assert upload["upload_id"] == info["metadata"]["upload_id"]
    assert upload["committed_bytes"] == size // 2 and upload["size_bytes"] == size  # int64 as Number
    [uploaded] = steps["uploaded"]
    assert uploaded["resumed_at"] == size // 2 and uploaded["size_bytes"] == size
    assert abs(uploaded["duration_s"] - 4.0) < 0.3  # a Duration object made seconds

    [answer] = steps["localize"]
    assert answer["results"][0]["query"] == "a red circle appears"
    assert answer["stats"]["cache"].startswith("CACHE_") and answer["stats"]["frames"] > 0  # enums by name
    assert steps["stream_result"][0]["query_index"] == 0
    [done] = steps["stream_done"]
    assert done["stages"][0] == "QUEUED" and done["cache"] == "CACHE_HIT_KV"

    [bad] = steps["bad_request"]
    assert bad["error"]["code"] == "INVALID_ARGUMENT"
    [violation] = bad["error"]["details"][0]["fieldViolations"]
    assert bad["error"]["details"][0]["type"] == "google.rpc.BadRequest" and violation["field"] == "queries[0]"
    [bad_range] = steps["bad_range"]
    assert bad_range["error"]["details"][0]["fieldViolations"][0]["field"] == "sampling.start_offset"

    retries = [r["error"] for r in steps.get("retry", [])]
    assert any(e["code"] == "RESOURCE_EXHAUSTED" for e in retries), steps.keys()
    retry_info = [d for e in retries for d in e["details"] if d["type"] == "google.rpc.RetryInfo"]
    assert retry_info and retry_info[0]["retryDelay"] == {"seconds": 1, "nanos": 0}
    assert steps["burst"] == [{"calls": 3 * RATE_PER_S, "all_found": True}]
