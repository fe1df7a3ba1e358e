#!/usr/bin/env bash
# Instructions the gateway executes per request, counted by valgrind's callgrind: a measure
# that does not move with the machine's load, so a change of a few percent shows in one run
# (req/s and CPU time on this shared 2-core machine vary by 10-30 % from run to run).
#
# Each case runs the request benchmark (benchmarks/gateway/, one mode, c = 256, 128 B, one
# worker thread) with the gateway under callgrind. Once requests flow, the counters are zeroed,
# and INSTR_SECONDS later dumped; instructions / requests answered in between (the gateway's
# own ipc_gateway_requests_total) is the figure. Under callgrind the gateway is the bottleneck
# (about 50x slower), so it works with full batches: the figure is the per-request work of the
# gateway's code, not a latency.
#
#   bash benchmarks/instructions.sh [[LABEL=]GATEWAY_BINARY ...]
#
# Binaries default to target/release/ipc-gateway (built first); a label names a binary in the
# report (a commit, say). Knobs (environment):
# INSTR_MODES (default "binary json ws-binary"; any request benchmark mode), INSTR_SECONDS
# (measured seconds, default 8), INSTR_REPEATS (default 1), INSTR_GATEWAY_ARGS (default: a
# policy of three grants, as artifacts/bench/request-path.md used), INSTR_NO_ARTIFACTS (print
# only; else artifacts/bench/instructions.md).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/install-deps
if ! have valgrind; then
  echo "installing valgrind..." >&2
  apt_install valgrind || { echo "error: valgrind is needed (apt-get install valgrind)" >&2; exit 1; }
fi

modes="${INSTR_MODES:-binary json ws-binary}"
seconds="${INSTR_SECONDS:-8}"
repeats="${INSTR_REPEATS:-1}"
work="$(mktemp -d /tmp/ipc-gw-instr.XXXXXX)"
trap 'rm -rf "$work"' EXIT
cat > "$work/policy.toml" <<'EOF'
[[grant]]
match = { any = true }
request = { allow = ["bench.>", "svc.>"], deny = ["svc.admin.>", "bench.private.>"] }
publish = { allow = ["events.>"] }
subscribe = { allow = ["events.>"], deny = ["events.internal.>"] }
[[grant]]
match = { user = "nobody-here" }
request = { allow = [">"] }
status = true
EOF
gateway_args="${INSTR_GATEWAY_ARGS:---policy $work/policy.toml}"

binaries=("$@")
if [[ ${#binaries[@]} -eq 0 ]]; then
  cargo build --release --bin ipc-gateway
  binaries=("$PWD/target/release/ipc-gateway")
fi
cargo bench --bench gateway --no-run 2>/dev/null

count_requests() {
  curl -s "http://$1/metrics" | awk '/^ipc_gateway_requests_total/ {s += $2} END {printf "%d", s}'
}

# One case: prints "requests instructions".
measure() {
  local binary="$1" mode="$2" case_dir="$work/case.$RANDOM"
  mkdir -p "$case_dir"
  # The bench starts `ipc-gateway serve` and `ipc-gateway demo-echo`: only serve runs under
  # callgrind.
  cat > "$case_dir/gateway" <<EOT
#!/bin/bash
if [ "\$1" = serve ]; then
  exec valgrind --tool=callgrind --callgrind-out-file=$case_dir/callgrind.%p.out "$binary" "\$@"
fi
exec "$binary" "\$@"
EOT
  chmod +x "$case_dir/gateway"
  IPC_GATEWAY_BIN="$case_dir/gateway" BENCH_MODES="$mode" BENCH_CONCURRENCY=256 \
    BENCH_PAYLOADS=128 BENCH_WORKERS=1 BENCH_REPEATS=1 BENCH_SECONDS=$((seconds + 20)) \
    BENCH_GATEWAY_ARGS="$gateway_args" BENCH_NO_ARTIFACTS=1 \
    cargo bench --bench gateway >"$case_dir/bench.log" 2>&1 &
  local bench=$! pid="" http="" before after
  for _ in $(seq 1 200); do
    pid="$(pgrep -f "valgrind.*$case_dir/callgrind.*serve" | head -1 || true)"
    [[ -n "$pid" ]] && break
    sleep 0.2
  done
  [[ -n "$pid" ]] || { echo "the gateway did not start; see $case_dir/bench.log" >&2; return 1; }
  http="$(tr '\0' ' ' < "/proc/$pid/cmdline" | grep -o -- '--http [0-9.:]*' | awk '{print $2}')"
  for _ in $(seq 1 200); do
    [[ "$(count_requests "$http")" -gt 2000 ]] && break
    sleep 0.3
  done
  sleep 2
  before="$(count_requests "$http")"
  callgrind_control -z "$pid" >/dev/null 2>&1
  sleep "$seconds"
  callgrind_control -d "$pid" >/dev/null 2>&1
  after="$(count_requests "$http")"
  sleep 1
  local dump instructions
  dump="$(ls -t "$case_dir"/callgrind.*.out.* | head -1)"
  instructions="$(awk '/^(summary|totals):/ {print $2; exit}' "$dump")"
  wait "$bench" || true
  echo "$((after - before)) $instructions"
}

rows=""
for ((round = 1; round <= repeats; round++)); do
  for mode in $modes; do
    for named in "${binaries[@]}"; do
      label="${named%%=*}" binary="${named#*=}"
      [[ "$named" == *=* ]] || label="$binary"
      read -r requests instructions < <(measure "$binary" "$mode")
      per=$((instructions / requests))
      line="| $mode | $label | $requests | $instructions | $per |"
      echo "$line"
      rows+="$line"$'\n'
    done
  done
done

recorded=""
for knob in INSTR_MODES INSTR_SECONDS INSTR_REPEATS INSTR_GATEWAY_ARGS; do
  if [[ -n "${!knob:-}" ]]; then
    value="${!knob}"
    [[ "$value" == *" "* ]] && value="\"${value}\""
    recorded+="${knob}=${value} "
  fi
done
if [[ -z "${INSTR_NO_ARTIFACTS:-}" ]]; then
  mkdir -p artifacts/bench
  {
    echo "# Instructions per request in the gateway (callgrind)"
    echo
    echo "- Command: \`${recorded}bash benchmarks/instructions.sh $*\`"
    echo "- Date: $(date -u +%Y-%m-%dT%H:%M:%SZ); git $(git rev-parse --short HEAD)$(git diff --quiet || echo ' (with uncommitted changes)')"
    echo "- Each row: the request benchmark's mode at c = 256, 128 B, one worker thread, the gateway under \`valgrind --tool=callgrind\` started with \`${gateway_args/$work/<tmp>}\`; instructions counted over ${seconds} s once requests flowed, divided by the requests the gateway answered in that window (its \`ipc_gateway_requests_total\`)"
    echo
    echo "| mode | gateway | requests | instructions | instructions / request |"
    echo "| --- | --- | ---: | ---: | ---: |"
    printf '%s' "$rows"
  } > artifacts/bench/instructions.md
  echo "wrote artifacts/bench/instructions.md" >&2
fi
