#!/usr/bin/env bash
# Profile one row of the benchmark under one workload with perf, same-core
# (everything on CPU 0), loopback only, bounded in time. Prints the top
# symbols (by comm and symbol) and context-switch counts, and leaves
# perf.data in $OUT for `perf report -i`.
#
#   benches/profile.sh <mode> <workload> [seconds]
#     mode:     sockmap | uring | epoll | haproxy | direct
#     workload: tput1 | lat64 | conn | accept
#   AMBASSADOR_BIN (default target/release/ambassador), OUT (default /tmp/amb-profile),
#   AMB_ARGS (more ambassador flags, e.g. "--splice always")
#
# Needs linux-perf (apt-get install linux-perf), sockperf, iperf3, wrk, nginx, haproxy.
set -euo pipefail
MODE=${1:?mode}; WORK=${2:?workload}; SECS=${3:-4}
BIN=${AMBASSADOR_BIN:-target/release/ambassador}
OUT=${OUT:-/tmp/amb-profile}/$MODE-$WORK
mkdir -p "$OUT"
pids=()
cleanup() { for p in "${pids[@]}"; do kill -- -"$p" 2>/dev/null || true; done; }
trap cleanup EXIT
# A loopback port nothing listens on.
port() { while :; do p=$(shuf -i 20000-32000 -n 1); ss -Hltn "sport = :$p" | grep -q . || { echo "$p"; return; }; done; }
command -v perf >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q linux-perf
start() { setsid taskset -c 0 "$@" >"$OUT/$(basename "$1").log" 2>&1 & pids+=($!); }
wait_port() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 not up" >&2; exit 1; }

S=$(port)                      # backend
case $WORK in
  tput1) start iperf3 -s -B 127.0.0.1 -p "$S" ;;
  lat64) start sockperf server --tcp -i 127.0.0.1 -p "$S" ;;
  conn|accept)
    mkdir -p "$OUT/www"; echo ok > "$OUT/www/x"
    cat > "$OUT/nginx.conf" <<EOF
worker_processes 1; daemon off; pid $OUT/nginx.pid; error_log $OUT/error.log warn;
events { worker_connections 8192; }
http { access_log off; client_body_temp_path $OUT/cb; proxy_temp_path $OUT/pt; fastcgi_temp_path $OUT/ft;
  uwsgi_temp_path $OUT/ut; scgi_temp_path $OUT/st; server { listen 127.0.0.1:$S backlog=4096; root $OUT/www; } }
EOF
    start nginx -p "$OUT" -e "$OUT/error.log" -c "$OUT/nginx.conf" ;;
  *) echo "unknown workload $WORK" >&2; exit 2 ;;
esac
wait_port "$S"

L=$(port)
case $MODE in
  direct) L=$S ;;
  haproxy)
    printf 'global\n  nbthread 1\n  maxconn 4000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\nlisten f\n  bind 127.0.0.1:%s\n  server s 127.0.0.1:%s\n' "$L" "$S" > "$OUT/haproxy.cfg"
    start haproxy -db -f "$OUT/haproxy.cfg" ;;
  # shellcheck disable=SC2086 # AMB_ARGS is a list of flags
  *) start "$BIN" --mode "$MODE" ${AMB_ARGS:-} --forward "127.0.0.1:$L=127.0.0.1:$S" ;;
esac
wait_port "$L"
PROXY=${pids[-1]}

case $WORK in
  tput1) CMD=(iperf3 -c 127.0.0.1 -p "$L" -t "$((SECS + 1))") ;;
  lat64) CMD=(sockperf ping-pong --tcp -i 127.0.0.1 -p "$L" -m 64 -t "$((SECS + 3))" --full-rtt) ;;
  conn|accept) CMD=(wrk -t1 -c32 -d"$((SECS + 1))"s -H 'Connection: close' "http://127.0.0.1:$L/x") ;;
esac
taskset -c 0 timeout $((SECS + 20)) "${CMD[@]}" > "$OUT/client.out" 2>&1 &
client=$!
sleep "$([ "$WORK" = lat64 ] && echo 2.5 || echo 0.5)"   # skip start-up (sockperf sleeps 2 s)
perf record -q -g -C 0 -o "$OUT/perf.data" -- sleep "$SECS" 2>/dev/null
perf stat -C 0 -e context-switches,cpu-migrations -o "$OUT/stat.txt" -- sleep 1 2>/dev/null || true
wait "$client" || true
echo "== client output (tail)"; tail -4 "$OUT/client.out"
echo "== context switches on CPU 0 over 1 s"; grep -E "context|migr" "$OUT/stat.txt" || true
echo "== top by comm"; perf report -i "$OUT/perf.data" --no-children --sort comm --stdio 2>/dev/null | grep -E '^ +[0-9]' | head -12
echo "== top symbols (comm, symbol; other tenants' processes show under their own comm)"
perf report -i "$OUT/perf.data" --no-children --sort comm,sym --stdio 2>/dev/null | grep -E '^ +[0-9]' | head -40
if [ "$MODE" != direct ] && [ "$MODE" != haproxy ]; then
  kill -USR1 "$PROXY" 2>/dev/null && sleep 0.3
  echo "== the proxy's own stats line"; grep -o 'stats forward=.*' "$OUT/$(basename "$BIN").log" | tail -1
fi
echo "(perf.data in $OUT; proxy pgid $PROXY)"
