#!/usr/bin/env bash
# Where an idle (or subscribed) WebSocket connection's bytes go, per allocation site: runs a
# glibc-malloc build of the gateway under heaptrack, opens N connections with the ws_idle
# bench's own client process (WSIDLE_ROLE=client, mode idle / shared / own), then stops the
# gateway with exit(0) called through gdb while the connections are open, so that every
# allocation still live is reported as "leaked" and nothing is lost to a kill. Prints
# `heaptrack_print --print-leaks` for the run; the per-connection table in
# artifacts/ws-idle/profile-<commit>.md is that output's sites divided by N.
#
#   PROFILE_N=2000 PROFILE_MODE=idle bash benchmarks/ws_idle_profile.sh
#
# Needs heaptrack and gdb (Debian: apt-get install heaptrack gdb). The glibc build is
# `cargo build --release --no-default-features --bin ipc-gateway`, copied to
# target/release/ipc-gateway-glibc (jemalloc is invisible to heaptrack); PROFILE_GATEWAY
# names another binary.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

n="${PROFILE_N:-2000}"
mode="${PROFILE_MODE:-idle}"
gateway="${PROFILE_GATEWAY:-target/release/ipc-gateway-glibc}"
bench="$(ls -t target/release/deps/ws_idle-* | grep -v '\.d$' | head -1)"
out="${PROFILE_OUT:-/tmp/ws-idle-profile}"
mkdir -p "${out}"
ulimit -n "$(ulimit -Hn)"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
nats_port="$(free_port)"
http_port="$(free_port)"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "${pid}" 2>/dev/null || true; done; }
trap cleanup EXIT

nats-server -a 127.0.0.1 -p "${nats_port}" >"${out}/nats.log" 2>&1 &
pids+=($!)
sleep 0.5
rm -f "${out}"/heaptrack.*
heaptrack -o "${out}/heaptrack.${mode}" "${gateway}" serve --nats-url "nats://127.0.0.1:${nats_port}" \
    --socket "${out}/gw.sock" --http "127.0.0.1:${http_port}" --grpc 127.0.0.1:0 \
    --max-connections $((n + 16)) >"${out}/gateway.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
    curl -fs "http://127.0.0.1:${http_port}/ready" >/dev/null 2>&1 && break
    sleep 0.2
done
gw_pid="$(pgrep -n -f "${gateway} serve --nats-url nats://127.0.0.1:${nats_port}")"

mkfifo "${out}/commands" 2>/dev/null || true
exec 3<>"${out}/commands"
WSIDLE_ROLE=client WSIDLE_PORT="${http_port}" WSIDLE_COUNT="${n}" WSIDLE_FIRST=0 WSIDLE_SOURCES=4 \
    WSIDLE_BIG_BYTES=0 WSIDLE_HANDSHAKES=64 WSIDLE_SERVER=gateway WSIDLE_MODE="${mode}" \
    "${bench}" <&3 >"${out}/client.out" 2>&1 &
client=$!
pids+=("${client}")
for _ in $(seq 600); do
    grep -q '^opened' "${out}/client.out" && break
    sleep 0.1
done
cat "${out}/client.out" >&2
sleep 3
echo "VmRSS of the gateway (under heaptrack): $(grep VmRSS /proc/"${gw_pid}"/status)" >&2
gdb -p "${gw_pid}" -batch -ex 'call (void)exit(0)' >/dev/null 2>&1 || true
for _ in $(seq 300); do
    kill -0 "${gw_pid}" 2>/dev/null || break
    sleep 0.2
done
sleep 2
echo close >&3
data="$(ls -t "${out}"/heaptrack."${mode}".* | head -1)"
heaptrack_print --print-leaks 1 --print-peaks 0 --print-allocators 0 --print-temporary 0 \
    --print-histogram "${out}/histogram.${mode}" "${data}" >"${out}/leaks.${mode}.txt"
echo "${out}/leaks.${mode}.txt" >&2
