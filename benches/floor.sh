#!/usr/bin/env bash
# A reference point for the proxy's keep-alive target: runs the smallest
# forward proxy on palisade's stack (benches/floor: hyper on tokio, one
# event loop per core, no policy, no audit, no limits) in the same harness,
# on the same origin and load as benches/proxy.sh, beside Squid and the
# direct baseline, and prints its ratios to Squid. palisade does all the
# floor does per kept-alive request and more (it decides, rewrites
# hop-by-hop headers and audits every request), so the floor's keep-alive
# rate is what palisade could at best approach on the machine. It is no
# ceiling for new connections: the floor opens an origin connection per
# client connection, where palisade reuses idle ones.
#
#   benches/floor.sh                        # REPS=1 DURATION=5
#   REPS=2 DURATION=10 benches/floor.sh
#
# Root needed, and the same tools as benches/proxy.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
HARNESS="${HARNESS:-$ROOT/../shared/peers/proxy}"
[[ -x "$HARNESS/bench.sh" ]] || { echo "needs the peer harness at $HARNESS" >&2; exit 2; }
CARGO_TARGET_DIR="$ROOT/target/floor" cargo build --release \
  --manifest-path "$ROOT/benches/floor/Cargo.toml" >&2
BIN="$ROOT/target/floor/release/palisade-bench-floor"

WORK="$(mktemp -d /tmp/palisade-floor-bench.XXXXXX)"
chmod 755 "$WORK"
cp -r "$HARNESS/." "$WORK/"
LOGD="${LOG_DIR:-/dev/shm/palisade-floor-bench-logs}"
mkdir -p "$LOGD/custom"
export CUSTOM_NAME=floor CUSTOM_PORT=13998 CUSTOM_CMD="$BIN 127.0.0.1:13998" CUSTOM_LOG=""
export PEERS="${PEERS:-direct squid custom}" TESTS="${TESTS:-ka close}"
export REPS="${REPS:-1}" DURATION="${DURATION:-5}" LOG_DIR="$LOGD"
(cd "$WORK" && ./bench.sh) || { echo "harness failed; see $WORK" >&2; exit 1; }
cat "$WORK/results/latest/summary.md"
python3 - "$WORK/results/latest/raw.jsonl" <<'PY'
import json, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def med(peer, test, key):
    v = [r[key] for r in rows if r.get("peer") == peer and r.get("test") == test and isinstance(r.get(key), (int, float))]
    return statistics.median(v) if v else None
def per_req(peer, test, key):
    v = [r[key] / r["requests"] for r in rows if r.get("peer") == peer and r.get("test") == test and r.get("requests")]
    return statistics.median(v) * 1e6 if v else None
print("\nfloor vs squid (same run):")
for test in ("a50", "a500", "close50"):
    f, s, d = med("floor", test, "rps"), med("squid", test, "rps"), med("direct", test, "rps")
    if f is None or s is None:
        print(f"  {test} rps: missing"); continue
    print(f"  {test} rps: floor {f:.1f}, squid {s:.1f}: ratio {f/s:.2f}" + (f", direct {d:.1f}" if d else ""))
cpu = [per_req("floor", "a50", k) for k in ("proxy_cpu_s", "client_cpu_s", "origin_cpu_s")]
if None not in cpu:
    print(f"CPU per request at 50 connections: floor {cpu[0]:.1f} us, wrk {cpu[1]:.1f} us, origin {cpu[2]:.1f} us")
PY
echo "raw results: $WORK/results/latest" >&2
