#!/usr/bin/env bash
# CONNECT relay throughput, palisade against a direct connection, for two
# kinds of transfer, interleaved run by run, and the ratios:
#
#   1m  : 1024 x 1 MiB over one plain CONNECT tunnel (what benches/proxy.sh's
#         `bulkplain` measures through the shared harness)
#   64m : 16 x 64 MiB over one tunnel: a stream with 64 times fewer
#         response boundaries, each of which is a request's round trip
#         through the relay and a restart of its pipeline
#
# One curl downloads to /dev/null from an nginx origin on loopback
# (sendfile on), either directly or through `curl -p --proxy` (a CONNECT
# tunnel that palisade relays with splice). Each line gives MB/s and the CPU
# seconds per GiB of the origin, the client and palisade.
#
#   benches/relay.sh                            # REPS=5
#   REPS=9 PALISADE_BIN=/tmp/palisade benches/relay.sh
#
# Takes /tmp/anchor-bench.lock around each run (LOCK=path for another, or
# LOCK=none under an outer lock). Needs nginx (nginx-light), curl, python3,
# GNU time.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
REPS="${REPS:-5}"
LOCK="${LOCK:-/tmp/anchor-bench.lock}"
ORIGIN_PORT="${ORIGIN_PORT:-18090}"
PROXY_PORT="${PROXY_PORT:-13998}"
for tool in nginx curl python3 /usr/bin/time; do
  command -v "$tool" >/dev/null || { echo "relay.sh needs $tool" >&2; exit 2; }
done

if [[ -n "${PALISADE_BIN:-}" ]]; then
  BIN="$(realpath "$PALISADE_BIN")"
else
  cargo build --release --manifest-path "$ROOT/Cargo.toml" >&2
  BIN="$ROOT/target/release/palisade"
fi

W="$(mktemp -d /tmp/palisade-relay-bench.XXXXXX)"
chmod 755 "$W"
NGINX_PID="" PROXY_PID=""
cleanup() {
  [[ -n "$PROXY_PID" ]] && kill "$PROXY_PID" 2>/dev/null && wait "$PROXY_PID" 2>/dev/null
  [[ -f "$W/nginx.pid" ]] && kill "$(cat "$W/nginx.pid")" 2>/dev/null
  sleep 0.2
  rm -rf "$W"
}
trap cleanup EXIT

mkdir -p "$W/www" "$W/tmp"
head -c $((1 << 20)) /dev/urandom > "$W/www/1m"
head -c $((64 << 20)) /dev/urandom > "$W/www/64m"
chmod -R a+rX "$W/www"
cat > "$W/nginx.conf" <<CONF
daemon on;
worker_processes 1;
pid $W/nginx.pid;
error_log $W/nginx.err warn;
events { worker_connections 1024; }
http {
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 10000000;
    open_file_cache max=16 inactive=600s;
    client_body_temp_path $W/tmp/body;
    proxy_temp_path $W/tmp/proxy;
    fastcgi_temp_path $W/tmp/fastcgi;
    uwsgi_temp_path $W/tmp/uwsgi;
    scgi_temp_path $W/tmp/scgi;
    server {
        listen 127.0.0.1:$ORIGIN_PORT;
        root $W/www;
    }
}
CONF
nginx -p "$W" -c "$W/nginx.conf"
for _ in $(seq 50); do
  curl -fsS -o /dev/null "http://127.0.0.1:$ORIGIN_PORT/1m" 2>/dev/null && break
  sleep 0.1
done
NGINX_WORKER="$(pgrep -P "$(cat "$W/nginx.pid")" | head -1)"

mkdir -p "$W/keys"
"$BIN" audit keygen --out "$W/keys" >/dev/null
cat > "$W/relay.policy" <<POLICY
net local = 127.0.0.1
http origin allow local -> 127.0.0.1 port $ORIGIN_PORT plain-tunnel
default deny log
POLICY
cat > "$W/palisade.toml" <<CONFIG
policy = "relay.policy"
[proxy]
listen = "127.0.0.1:$PROXY_PORT"
[audit]
dir = "$W/audit"
signing_key = "$W/keys/audit.key"
CONFIG
"$BIN" proxy --config "$W/palisade.toml" 2>"$W/palisade.err" &
PROXY_PID=$!
for _ in $(seq 50); do
  curl -sS -o /dev/null -p --proxy "http://127.0.0.1:$PROXY_PORT" \
    "http://127.0.0.1:$ORIGIN_PORT/1m" 2>/dev/null && break
  sleep 0.1
done

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# The lock is opened only now, so that nginx and palisade do not inherit it.
if [[ "$LOCK" != none ]]; then exec 9>>"$LOCK"; fi
lock() { if [[ "$LOCK" != none ]]; then flock -w 3600 9; fi; }
unlock() { if [[ "$LOCK" != none ]]; then flock -u 9; fi; }

# One transfer: prints "size peer MB/s origin_s client_s proxy_s" (CPU seconds).
one() {
  local size=$1 n=$2 peer=$3 via=()
  [[ "$peer" == palisade ]] && via=(-p --proxy "http://127.0.0.1:$PROXY_PORT")
  local o0 p0 o1 p1 t0 t1
  o0=$(ticks "$NGINX_WORKER"); p0=$(ticks "$PROXY_PID")
  t0=$(date +%s%N)
  /usr/bin/time -f '%U %S' -o "$W/curl.time" curl -sS "${via[@]}" --max-time 300 \
    -o /dev/null -w '%{size_download}\n' "http://127.0.0.1:$ORIGIN_PORT/$size?n=[1-$n]" > "$W/sizes"
  t1=$(date +%s%N)
  o1=$(ticks "$NGINX_WORKER"); p1=$(ticks "$PROXY_PID")
  python3 - "$size" "$peer" "$t0" "$t1" "$o0" "$o1" "$p0" "$p1" "$W/curl.time" "$W/sizes" <<'PY'
import sys
size, peer, t0, t1, o0, o1, p0, p1, tf, sf = sys.argv[1:]
tick = 0.01
total = sum(int(l) for l in open(sf) if l.strip())
u, s = map(float, open(tf).read().split()[-2:])
secs = (int(t1) - int(t0)) / 1e9
print(size, peer, f"{total / secs / 1e6:.0f}", f"{(int(o1) - int(o0)) * tick:.2f}",
      f"{u + s:.2f}", f"{(int(p1) - int(p0)) * tick:.2f}", total)
PY
}

RESULTS="$W/results"
: > "$RESULTS"
for rep in $(seq "$REPS"); do
  for spec in "1m 1024" "64m 16"; do
    set -- $spec
    for peer in direct palisade; do
      lock
      line=$(one "$1" "$2" "$peer")
      unlock
      echo "[$(date +%T)] rep $rep: $line" >&2
      echo "$line" >> "$RESULTS"
    done
  done
done

python3 - "$RESULTS" <<'PY'
import sys, statistics
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
print(f"{'transfer':<24} {'peer':<9} {'MB/s median [min-max]':<26} {'CPU s/GiB: origin':>17} {'client':>7} {'palisade':>9}")
med = {}
for size, label in (("1m", "1024 x 1 MiB"), ("64m", "16 x 64 MiB")):
    for peer in ("direct", "palisade"):
        rs = [r for r in rows if r[0] == size and r[1] == peer]
        if not rs:
            continue
        mbs = [float(r[2]) for r in rs]
        gib = [int(r[6]) / 2**30 for r in rs]
        per = lambda i: statistics.median(float(r[i]) / g for r, g in zip(rs, gib))
        med[size, peer] = statistics.median(mbs)
        print(f"{label:<24} {peer:<9} {statistics.median(mbs):>7.0f} [{min(mbs):.0f}-{max(mbs):.0f}]{'':<10}"
              f" {per(3):>17.2f} {per(4):>7.2f} {per(5) if peer == 'palisade' else float('nan'):>9.2f}")
print()
for size, label in (("1m", "1024 x 1 MiB"), ("64m", "16 x 64 MiB")):
    if (size, "direct") in med and (size, "palisade") in med:
        print(f"palisade / direct, {label}: {med[size, 'palisade'] / med[size, 'direct']:.2f} "
              f"(medians of {sum(1 for r in rows if r[0] == size and r[1] == 'palisade')} interleaved runs)")
PY
