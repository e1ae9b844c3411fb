#!/usr/bin/env bash
# Runs palisade's compiled classifier side by side with DPDK's ACL library
# (rte_acl, through its own `dpdk-test-acl` tool: multibit tries walked with
# SSE or AVX2 over bursts of packets) on the ClassBench sets in
# ../shared/data/classbench/, on the same keys, one core each, and prints
# lookups per second of both and palisade's ratio to DPDK's best algorithm.
#
#   benches/classify-peers.sh                  # every set, REPS=3
#   SETS="acl1_10k ipc1_10k" REPS=5 benches/classify-peers.sh
#   ALGS="scalar sse avx2" benches/classify-peers.sh
#
# Each figure is the best of REPS runs (the best for the peer too). DPDK's
# rate is per second of wall time (its TSC), palisade's per second of the
# measuring thread's CPU time: on a quiet machine the two agree; run it
# under the shared bench lock. DPDK runs without huge pages (--no-huge);
# HUGE=1 gives it 2 MiB pages if the system has them reserved and mounted.
# Needs dpdk-test-acl (Debian: apt-get install dpdk-dev).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DATA="${DATA:-$ROOT/../shared/data/classbench}"
SETS="${SETS:-acl1_1k fw1_1k ipc1_1k acl1_10k acl2_10k fw1_10k ipc1_10k}"
REPS="${REPS:-3}"
LOOKUPS="${LOOKUPS:-5000000}" # DPDK lookups per run (iterations over the keys)
command -v dpdk-test-acl >/dev/null || {
  echo "needs dpdk-test-acl (Debian: apt-get install dpdk-dev)" >&2
  exit 2
}
[[ -d "$DATA" ]] || { echo "no ClassBench data at $DATA" >&2; exit 2; }
if [[ -z "${ALGS:-}" ]]; then
  ALGS="scalar sse"
  grep -qw avx2 /proc/cpuinfo && ALGS="$ALGS avx2"
  grep -qw avx512bw /proc/cpuinfo && ALGS="$ALGS avx512x16 avx512x32"
fi
HUGE_ARGS=(--no-huge -m 512)
[[ "${HUGE:-0}" == 1 ]] && HUGE_ARGS=(-m 1024)

WORK="$(mktemp -d /tmp/palisade-classify-peers.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
cd "$ROOT"
# The same keys for both: each set's trace, or for a set without one the
# points the bench draws inside its rules.
CLASSIFY_SETS="$(echo "$SETS" | tr ' ' ',')" \
  cargo bench --quiet --bench classify -- --write-traces "$WORK/traces" >"$WORK/traces.log"

dpdk_rate() { # set alg -> pkt/s of one run (0 if it failed)
  local set="$1" alg="$2" keys iter out
  keys=$(wc -l <"$WORK/traces/${set}_trace")
  iter=$(((LOOKUPS + keys - 1) / keys))
  out=$(timeout 300 dpdk-test-acl "${HUGE_ARGS[@]}" --no-pci -l 0 --file-prefix "palisade-peers-$$" \
    --log-level=lib.eal:error -- --rulesf="$DATA/$set" --tracef="$WORK/traces/${set}_trace" \
    --tracenum="$keys" --rulenum=65536 --iter="$iter" --verbose=1 --alg="$alg" 2>&1) || true
  grep -o '[0-9.]* pkt/sec' <<<"$out" | awk '{print int($1)}' | tail -1 | grep . || echo 0
}

: >"$WORK/dpdk"
for set in $SETS; do
  [[ -f "$WORK/traces/${set}_trace" ]] || continue
  for alg in $ALGS; do
    for _ in $(seq 1 "$REPS"); do
      echo "$set $alg $(dpdk_rate "$set" "$alg")" >>"$WORK/dpdk"
    done
  done
done
: >"$WORK/palisade"
for _ in $(seq 1 "$REPS"); do
  CLASSIFY_NO_LINEAR=1 CLASSIFY_SETS="$(echo "$SETS" | tr ' ' ',')" \
    cargo bench --quiet --bench classify -- --summary >>"$WORK/palisade"
done

python3 - "$WORK/dpdk" "$WORK/palisade" $SETS <<'PY'
import sys
dpdk_file, pal_file, sets = sys.argv[1], sys.argv[2], sys.argv[3:]
dpdk = {}
for line in open(dpdk_file):
    s, alg, r = line.split()
    d = dpdk.setdefault(s, {})
    d[alg] = max(d.get(alg, 0), int(r))
pal = {}
for line in open(pal_file):
    f = line.split()
    if len(f) > 6 and f[0] in sets and f[4].isdigit():
        single, batch = int(f[4]), int(f[5])
        old = pal.get(f[0], (0, 0, f[3]))
        pal[f[0]] = (max(old[0], single), max(old[1], batch), f[3])
algs = sorted({a for d in dpdk.values() for a in d})
print("lookups per second, best of each; keys from the set's trace or drawn in its rules")
head = f"{'set':<9} {'keys':>9} {'palisade':>10} {'pal.batch':>10} " + " ".join(f"{'dpdk-' + a:>14}" for a in algs)
print(head + f" {'x best dpdk':>12}")
for s in sets:
    if s not in pal or s not in dpdk:
        print(f"{s:<9} missing (palisade {'yes' if s in pal else 'no'}, dpdk {'yes' if s in dpdk else 'no'})")
        continue
    single, batch, src = pal[s]
    best_alg = max(dpdk[s], key=dpdk[s].get)
    best = dpdk[s][best_alg]
    ours = max(single, batch)
    ratio = f"{ours / best:.2f}x" if best else "n/a"
    print(f"{s:<9} {src:>9} {single/1e6:>9.1f}M {batch/1e6:>9.1f}M " +
          " ".join(f"{dpdk[s].get(a, 0)/1e6:>13.1f}M" for a in algs) + f" {ratio:>12}")
print("ratio: palisade's better of single and batched lookups to DPDK's best algorithm")
PY
