#!/usr/bin/env bash
# Runs palisade's proxy side by side with Squid and tinyproxy (and a direct
# baseline) on the same nginx origin with the same wrk load, every access
# log / audit trail on, using the peer harness in ../shared/peers/proxy, and
# prints the ratios and the targets, met or not. Root needed (the harness
# starts squid as its user).
#
#   benches/proxy.sh                       # REPS=1 DURATION=5 by default
#   REPS=3 DURATION=10 benches/proxy.sh    # the harness's full settings
#   PALISADE_BIN=/tmp/old/palisade benches/proxy.sh   # a given build
#
# The harness takes /tmp/anchor-bench.lock for each run itself; under an
# outer flock on that same file, give it its own: LOCK=/tmp/other.lock.
#
# Needs: nginx-light squid tinyproxy wrk curl jq openssl python3 (apt-get).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
HARNESS="${HARNESS:-$ROOT/../shared/peers/proxy}"
[[ -x "$HARNESS/bench.sh" ]] || { echo "needs the peer harness at $HARNESS" >&2; exit 2; }

# PALISADE_BIN=path runs that build instead (A/B of two builds, one run each).
if [[ -n "${PALISADE_BIN:-}" ]]; then
  BIN="$(realpath "$PALISADE_BIN")"
else
  cargo build --release --manifest-path "$ROOT/Cargo.toml" >&2
  BIN="$ROOT/target/release/palisade"
fi

# The harness writes next to itself; run a private copy.
WORK="$(mktemp -d /tmp/palisade-proxy-bench.XXXXXX)"
chmod 755 "$WORK"   # the origin and the peers run as their own users
cp -r "$HARNESS/." "$WORK/"
LOGD="${LOG_DIR:-/dev/shm/palisade-proxy-bench-logs}"
mkdir -p "$WORK/run" "$LOGD/custom"
rm -rf "$LOGD/custom/audit"

# Same allowlist as the peers: the origin on loopback, HTTP and HTTPS.
cat > "$WORK/run/bench.policy" <<'POLICY'
net local = 127.0.0.1
http origin allow local -> "localhost", "*.example.internal", 127.0.0.1 port 18080, 18443 plain-tunnel
default deny log
POLICY
cat > "$WORK/run/palisade-bench.toml" <<CONFIG
policy = "bench.policy"
[proxy]
listen = "127.0.0.1:13999"
max_connections_per_client = 20000
requests_per_second_per_client = 10000000
request_burst_per_client = 10000000
[audit]
dir = "$LOGD/custom/audit"
signing_key = "$WORK/run/audit.key"
rotate_size = "4GiB"
rotate_age = "off"
CONFIG

# The harness restarts the proxy for every rep and counts lines of
# CUSTOM_LOG; palisade never reuses a trail file (each start opens the next
# one), so each start begins with an empty trail directory: every rep then
# writes audit-00000001.jsonl and "access-log lines / req" counts them.
cat > "$WORK/run/start-palisade.sh" <<START
#!/bin/sh
rm -rf "$LOGD/custom/audit"
exec env ${PALISADE_ENV:-} $BIN proxy --config $WORK/run/palisade-bench.toml
START
chmod 755 "$WORK/run/start-palisade.sh"
export CUSTOM_NAME=palisade CUSTOM_PORT=13999
export CUSTOM_CMD="$WORK/run/start-palisade.sh"
export CUSTOM_LOG="$LOGD/custom/audit/audit-00000001.jsonl"
export PEERS="${PEERS:-direct squid tinyproxy custom}"
export REPS="${REPS:-1}" DURATION="${DURATION:-5}" LOG_DIR="$LOGD"
(cd "$WORK" && ./bench.sh) || { echo "harness failed; see $WORK" >&2; exit 1; }

SUMMARY="$WORK/results/latest/summary.md"
cat "$SUMMARY"
# Ratios palisade / squid from the raw results (medians per test).
python3 - "$WORK/results/latest/raw.jsonl" <<'PY'
import json, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def med(peer, test, key):
    v = [r[key] for r in rows if r.get("peer") == peer and r.get("test") == test and isinstance(r.get(key), (int, float))]
    return statistics.median(v) if v else None
print("\npalisade vs squid (same run):")
for test, key, better in [("a50", "rps", "higher"), ("a500", "rps", "higher"), ("close50", "rps", "higher"),
                          ("a500", "lat_p99_us", "lower"), ("bulkplain", "mb_per_s", "higher"),
                          ("bulk1", "mb_per_s", "higher"), ("a500", "proxy_peak_rss_kib", "lower")]:
    p, s, d = med("palisade", test, key), med("squid", test, key), med("direct", test, key)
    if p is None or s is None:
        print(f"  {test} {key}: missing"); continue
    extra = f", direct {d:.1f} (palisade/direct {p/d:.2f})" if d else ""
    print(f"  {test} {key}: palisade {p:.1f}, squid {s:.1f}: ratio {p/s:.2f} ({better} is better){extra}")

# CPU the measured processes do not account for: another job on the
# machine (a compile, a second benchmark) skews every ratio, so say so.
busy = []
for r in rows:
    w = r.get("wall_s")
    if not w or "machine_busy_s" not in r:
        continue
    own = sum(r.get(k, 0) for k in ("client_cpu_s", "proxy_cpu_s", "origin_cpu_s"))
    other = (r["machine_busy_s"] - own) / w
    if other > 0.25:
        busy.append(f"{r['peer']} {r['test']} r{r.get('rep', '?')}: {other:.2f}")
if busy:
    print(f"\nWARNING: processes other than the proxy, origin and client kept the machine busy "
          f"in {len(busy)} of {len(rows)} runs (cores): these runs are not comparable: "
          + ", ".join(busy[:8]) + (" ..." if len(busy) > 8 else ""))

# The proxy issue's targets, each against its baseline from this run.
print("\ntargets:")
def target(name, value, ok, goal):
    if value is None:
        print(f"  {name}: missing"); return
    print(f"  {name}: {value:.2f} ({goal}): {'met' if ok(value) else 'NOT met'}")
def ratio(test, key, base):
    p, b = med("palisade", test, key), med(base, test, key)
    return p / b if p is not None and b else None
target("keep-alive req/s at 50 connections vs squid", ratio("a50", "rps", "squid"), lambda v: v >= 4, ">= 4x")
target("new connections/s vs squid", ratio("close50", "rps", "squid"), lambda v: v >= 3, ">= 3x")
target("p99 at 500 connections vs squid", ratio("a500", "lat_p99_us", "squid"), lambda v: v <= 0.25, "<= 0.25x")
target("plain CONNECT relay vs direct", ratio("bulkplain", "mb_per_s", "direct"), lambda v: v >= 0.9, ">= 0.9x")
rss = med("palisade", "a500", "proxy_peak_rss_kib")
target("peak RSS at 500 connections, MiB", rss / 1024 if rss else None, lambda v: v <= 16, "<= 16")

# What the keep-alive target leaves for the proxy: the load generator and
# the origin share the machine, so their CPU per request comes first.
def per_req(peer, test, key):
    v = [r[key] / r["requests"] for r in rows if r.get("peer") == peer and r.get("test") == test and r.get("requests")]
    return statistics.median(v) * 1e6 if v else None
others = [per_req("palisade", "a50", k) for k in ("client_cpu_s", "origin_cpu_s")]
own, squid = per_req("palisade", "a50", "proxy_cpu_s"), med("squid", "a50", "rps")
if None not in others and own is not None and squid:
    import os
    cores = os.cpu_count() or 1
    budget = cores * 1e6 / (4 * squid) - sum(others)
    print(f"\nCPU per request at 50 connections: wrk {others[0]:.1f} us, origin {others[1]:.1f} us, "
          f"palisade {own:.1f} us; on {cores} cores 4x squid ({4 * squid:.0f} req/s) leaves "
          f"{budget:.1f} us per request for the proxy")
PY
echo "raw results: $WORK/results/latest" >&2
