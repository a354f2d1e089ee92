#!/usr/bin/env bash
# The docker compose rehearsal, proved on this machine (run as root; .ci/run runs it):
#   1. a docker engine (Debian's docker.io and docker-compose installed, dockerd started with
#      --iptables=false --ip-masq=false if none is running: it is stopped again at the end);
#   2. host firewall rules that drop everything from the docker bridges to any other interface
#      or to the host itself (with --iptables=false the host would forward it), removed at the end;
#   3. a base image: $FEDPEFT_BASE_IMAGE (python:3.11-slim) if present or pullable, else a local
#      Debian bookworm with python3 made by debootstrap (fedpeft-base:bookworm, kept);
#   4. the wheelhouse (deploy/build-wheelhouse.sh) and the image, built with no network;
#   5. `setup`, then `up --exit-code-from coordinator`: one federated run of the heart
#      benchmark at three hospitals; then deploy/e2e_check.py reads the coordinator's store
#      (every round applied, an AUC per site and round) and checks the network isolation, and
#      deploy/e2e_site_check.py, in each hospital's container, verifies that site's ledger;
#   6. everything torn down: containers, network, volumes (keys and store). Images are kept, so
#      a second run is warm.
# FEDPEFT_ROUNDS sets the run's rounds (default 2 here, to keep CI short; the compose file's
# own default is the benchmark's 5). Prints the time of each step.
set -euo pipefail
cd "$(dirname "$0")/.."
export FLWR_TELEMETRY_ENABLED=0
export FEDPEFT_ROUNDS=${FEDPEFT_ROUNDS:-2}
project=fedpeft-e2e
t0=$(date +%s)
step_t=$t0
say() { echo "[e2e $(date +%H:%M:%S) +$(( $(date +%s) - t0 )) s] $*"; }
step() { local now; now=$(date +%s); say "done in $(( now - step_t )) s: $1"; step_t=$now; }

if [ "$(id -u)" != 0 ]; then
    echo "e2e-compose.sh: run as root (it starts dockerd and edits the host firewall)" >&2
    exit 2
fi

need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v docker-compose >/dev/null || need+=(docker-compose)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v iptables >/dev/null || need+=(iptables)
if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
if docker compose version >/dev/null 2>&1; then compose=(docker compose); else compose=(docker-compose); fi
compose+=(-p "$project")
export DOCKER_BUILDKIT=0   # the classic builder: in every engine, and --network none works

dockerd_pid=""
rules=(
    "FORWARD -i fedpeft0 ! -o fedpeft0 -j DROP"
    "FORWARD -i docker0 ! -o docker0 -j DROP"
    "INPUT -i fedpeft0 -j DROP"
    "INPUT -i docker0 -j DROP"
)
cleanup() {
    local rc=$?
    set +e
    if [ -n "${compose_ready:-}" ]; then
        [ "$rc" = 0 ] || "${compose[@]}" logs --no-color --tail 60
        "${compose[@]}" down -v --remove-orphans >/dev/null 2>&1
    fi
    for rule in "${rules[@]}"; do
        # shellcheck disable=SC2086
        while iptables -D ${rule%% *} ${rule#* } -m comment --comment fedpeft-e2e 2>/dev/null; do :; done
    done
    if [ -n "$dockerd_pid" ]; then
        kill "$dockerd_pid" 2>/dev/null && wait "$dockerd_pid" 2>/dev/null
    fi
    say "exit $rc"
    exit $rc
}
trap cleanup EXIT

for rule in "${rules[@]}"; do
    # shellcheck disable=SC2086
    iptables -I ${rule%% *} 1 ${rule#* } -m comment --comment fedpeft-e2e
done
say "host firewall: nothing from fedpeft0/docker0 goes anywhere but its own bridge"

if ! docker info >/dev/null 2>&1; then
    log=$(mktemp /tmp/fedpeft-dockerd.XXXXXX.log)
    dockerd --storage-driver=overlay2 --iptables=false --ip-masq=false >"$log" 2>&1 &
    dockerd_pid=$!
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { echo "dockerd did not start; see $log" >&2; exit 1; }
    say "started dockerd (pid $dockerd_pid, log $log)"
fi
step "docker engine"

base=${FEDPEFT_BASE_IMAGE:-python:3.11-slim}
if ! docker image inspect "$base" >/dev/null 2>&1 && ! timeout 120 docker pull -q "$base" >/dev/null 2>&1; then
    say "$base cannot be pulled; using a local Debian bookworm base"
    base=fedpeft-base:bookworm
    if ! docker image inspect "$base" >/dev/null 2>&1; then
        rootfs=$(mktemp -d /tmp/fedpeft-rootfs.XXXXXX)
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            bookworm "$rootfs" http://deb.debian.org/debian >"$rootfs.log" 2>&1 \
            || { echo "debootstrap failed; see $rootfs.log" >&2; exit 1; }
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        tar -C "$rootfs" -c . | docker import -c 'ENV LANG=C.UTF-8' -c 'CMD ["/bin/bash"]' - "$base" >/dev/null
        rm -rf "$rootfs" "$rootfs.log"
    fi
fi
export FEDPEFT_BASE_IMAGE=$base
step "base image $base"

[ -x .venv/bin/python ] || make install
deploy/build-wheelhouse.sh .venv/bin/python 2> >(grep -v "is ignored" >&2)
step "wheelhouse"
docker build -q --network none --build-arg BASE_IMAGE="$base" -t fedpeft:local \
    -f deploy/Dockerfile deploy >/dev/null
step "image fedpeft:local"

compose_ready=1
"${compose[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
"${compose[@]}" run --rm setup
step "setup (certificates, keys, configs, records)"
"${compose[@]}" up --no-build --exit-code-from coordinator
step "docker compose up: a federated run of $FEDPEFT_ROUNDS round(s) at three hospitals"
"${compose[@]}" run --rm -T --no-deps -e FEDPEFT_ROUNDS --entrypoint python coordinator - \
    < deploy/e2e_check.py
step "store and isolation checked"
for site in cleveland hungary va-long-beach; do
    "${compose[@]}" run --rm -T --no-deps -e FEDPEFT_ROUNDS --entrypoint python "$site" - \
        < deploy/e2e_site_check.py
done
step "each hospital's ledger verified: one sealed train upload per round, no refusal"
say "passed"
