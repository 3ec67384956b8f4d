#!/usr/bin/env bash
# The compose stack for real: build the base image (debootstrap, cached) and the front-end and CPU
# worker images (Docker's layer cache), `docker-compose up -d` docker/compose.yaml (host networking,
# loopback ports), wait until every container is healthy, upload the demo's video and ask the demo's
# question through the stack with the project's client (the host's venv), then `down -v`.
# Prints the timings and the demo run on the host in the same run as the baseline; exits non-zero
# on any failure. Needs root, a running dockerd and docker-compose (Debian's docker.io and
# docker-compose packages).
#   bash scripts/compose_smoke.sh                  # blobs on a volume shared by front end and worker
#   SMOKE_BLOB=s3 bash scripts/compose_smoke.sh    # blobs in S3 (moto's server on loopback, from the venv)
#   SMOKE_BASELINE=0 ...                           # skip the demo baseline
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
BLOB=${SMOKE_BLOB:-local}
# Free loopback ports unless given: on a shared host a fixed port may be taken (the compose file's
# defaults, 56xxx, lie in Linux's ephemeral range). Every socket stays bound until all four are chosen.
read -r port1 port2 port3 port4 < <("$PY" -c '
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
export STACK_REDIS_PORT=${STACK_REDIS_PORT:-$port1} STACK_GRPC_PORT=${STACK_GRPC_PORT:-$port2}
export STACK_METRICS_PORT=${STACK_METRICS_PORT:-$port3} STACK_TAG=${STACK_TAG:-latest}
S3_PORT=${SMOKE_S3_PORT:-$port4}
COMPOSE=(docker-compose -f docker/compose.yaml -p "${SMOKE_PROJECT:-moments-smoke}")
HEALTH_TIMEOUT_S=${SMOKE_HEALTH_TIMEOUT_S:-300}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

docker info >/dev/null 2>&1 || {
  echo "error: no Docker daemon (as root: dockerd --bridge=none --iptables=false &)" >&2; exit 1; }
command -v docker-compose >/dev/null || { echo "error: docker-compose missing (apt-get install docker-compose)" >&2; exit 1; }

WORK=$(mktemp -d /tmp/moments-smoke.XXXXXX)
MOTO_PID=""
stack_up=""
cleanup() {
  local rc=$?
  if [ -n "$stack_up" ]; then
    [ "$rc" = 0 ] || "${COMPOSE[@]}" logs --no-color --tail 40 >&2 || true
    "${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
  fi
  [ -z "$MOTO_PID" ] || kill "$MOTO_PID" 2>/dev/null || true
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN {printf "%.1f", b - a}'; }

# Build inputs that never go into git: this machine's extra CA certificates and the torch CPU wheel.
cp /usr/local/share/ca-certificates/*.crt docker/ca/ 2>/dev/null || true
WHEEL=${MOMENTS_TORCH_WHEEL:-$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -n1 || true)}
[ -z "$WHEEL" ] || [ -e "docker/wheels/$(basename "$WHEEL")" ] || cp "$WHEEL" docker/wheels/

t=$(now); bash scripts/build_base_image.sh; base_s=$(since "$t")
build() {  # IMAGE DOCKERFILE: Docker's layer cache makes a rebuild of unchanged inputs take seconds
  docker build --network host -f "$2" -t "$1" . >"$WORK/build.log" 2>&1 ||
    { tail -n 40 "$WORK/build.log" >&2; exit 1; }
}
t=$(now); build "moments-frontend:$STACK_TAG" docker/frontend.Dockerfile; frontend_s=$(since "$t")
t=$(now); build "moments-worker-cpu:$STACK_TAG" docker/worker-cpu.Dockerfile; worker_s=$(since "$t")
echo "images built: base ${base_s} s, frontend ${frontend_s} s, worker ${worker_s} s"

demo_s=""
if [ "${SMOKE_BASELINE:-1}" = 1 ]; then
  echo "baseline: moments demo on the host"
  t=$(now); "$PY" -m moments.app.cli demo --data-dir "$WORK/demo" >"$WORK/demo.log" 2>&1 ||
    { cat "$WORK/demo.log" >&2; exit 1; }
  demo_s=$(since "$t")
  tail -n 1 "$WORK/demo.log"
fi

if [ "$BLOB" = s3 ]; then
  export MOMENTS_BLOB_BACKEND=s3 MOMENTS_S3_ENDPOINT_URL="http://127.0.0.1:$S3_PORT" MOMENTS_S3_BUCKET=moments-smoke
  export MOMENTS_S3_REGION=us-east-1 MOMENTS_S3_ACCESS_KEY_ID=smoke MOMENTS_S3_SECRET_ACCESS_KEY=smoke-secret
  "$PY" -m moto.server -H 127.0.0.1 -p "$S3_PORT" >"$WORK/moto.log" 2>&1 &
  MOTO_PID=$!
  "$PY" - <<'EOF'
import os, time, boto3, botocore.exceptions
s3 = boto3.client("s3", endpoint_url=os.environ["MOMENTS_S3_ENDPOINT_URL"], region_name="us-east-1",
                  aws_access_key_id="smoke", aws_secret_access_key="smoke-secret")
deadline = time.monotonic() + 30
while True:
    try:
        s3.create_bucket(Bucket=os.environ["MOMENTS_S3_BUCKET"])
        break
    except botocore.exceptions.EndpointConnectionError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.2)
EOF
elif [ "$BLOB" != local ]; then
  echo "error: SMOKE_BLOB is local or s3, not $BLOB" >&2; exit 1
fi

t=$(now)
stack_up=1
"${COMPOSE[@]}" up -d --no-build >"$WORK/up.log" 2>&1 || { cat "$WORK/up.log" >&2; exit 1; }
deadline=$(( $(date +%s) + HEALTH_TIMEOUT_S ))
containers=$("${COMPOSE[@]}" ps -q)
while :; do
  states=$(docker inspect -f '{{.Name}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}' \
           $containers)
  if echo "$states" | awk '$2 != "running" {bad = 1} END {exit !bad}'; then
    echo "error: a container stopped: $states" >&2; exit 1
  fi
  echo "$states" | awk '$3 != "healthy" {bad = 1} END {exit bad}' && break
  [ "$(date +%s)" -lt "$deadline" ] || { echo "error: not healthy within ${HEALTH_TIMEOUT_S} s: $states" >&2; exit 1; }
  sleep 0.5
done
startup_s=$(since "$t")
echo "stack healthy in ${startup_s} s (blobs: $BLOB)"

"$PY" scripts/compose_smoke_client.py --target "127.0.0.1:$STACK_GRPC_PORT" --work-dir "$WORK" | tee "$WORK/client.log"
client=$(sed -n 's/^SMOKE_CLIENT //p' "$WORK/client.log")

t=$(now); "${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1; stack_up=""; down_s=$(since "$t")

"$PY" - "$client" <<EOF
import json, os, platform, sys
client = json.loads(sys.argv[1])
demo_s = float("$demo_s") if "$demo_s" else None
answered_s = client["upload_s"] + client["first_answer_s"]
cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
load = "/".join(f"{x:.1f}" for x in os.getloadavg())
result = {"blob": "$BLOB", "machine": f"{os.cpu_count()} cores, {cpu}", "load_avg_at_end": load, "base_image_s": $base_s,
          "frontend_image_s": $frontend_s, "worker_image_s": $worker_s, "startup_s": $startup_s,
          "down_s": $down_s, "demo_s": demo_s, **client}
rows = [("base image (debootstrap + import)", $base_s), ("front-end image", $frontend_s),
        ("CPU worker image", $worker_s), ("compose up until healthy", $startup_s),
        ("upload (24 s video)", client["upload_s"]), ("first answer", client["first_answer_s"]),
        ("repeat answer (token cache)", client["repeat_answer_s"]), ("compose down -v", $down_s)]
print(f"\nCompose smoke on {result['machine']}, load average {load} at the end (blobs: $BLOB)")
print("| step | s |\n|---|---|")
for name, value in rows:
    print(f"| {name} | {value:.1f} |")
if demo_s is not None:
    print(f"| baseline: moments demo on the host (start-up, upload, two answers) | {demo_s:.1f} |")
    print(f"| stack: upload + first answer / demo | {answered_s / demo_s:.2f}x |")
    print(f"| stack: compose up + upload + first answer / demo | {($startup_s + answered_s) / demo_s:.2f}x |")
print("SMOKE_RESULT " + json.dumps(result))
EOF
