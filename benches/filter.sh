#!/usr/bin/env bash
# Runs palisade's inline filter side by side with the kernel on one
# namespace topology (vnet host -- appliance -- edge host), in one run:
#   kernel forward (no filter), nftables interval set, iptables N linear
#   rules (kernel routes between two subnets), and palisade filter (a
#   bump in the wire: the two hosts share one link through it) with an
#   N-rule policy whose matching rule is last.
# Measures delivered 64-byte UDP packets/s and TCP MB/s with iperf3 and
# prints palisade's ratios to nftables, and the packet rate the filter
# itself forwarded. Root needed.
#
#   benches/filter.sh                 # N = 10, 1000, 10000; T = 5 s per measure;
#                                     # each figure the median of REPS = 3 runs
#   NS="10000" T=5 benches/filter.sh
#   IO=pnet benches/filter.sh         # pnet ports (offloads turned off)
#   FAST="on off" benches/filter.sh   # palisade with and without its kernel
#                                     # fast path (default: on)
set -u
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
NS_LIST="${NS:-10 1000 10000}"; T="${T:-5}"; IO="${IO:-batched}"; REPS="${REPS:-3}"; FAST_LIST="${FAST:-on}"
cargo build --release --manifest-path "$ROOT/Cargo.toml" >&2 || exit 1
BIN="$ROOT/target/release/palisade"
WORK="$(mktemp -d /tmp/palisade-filter-bench.XXXXXX)"
ns() { ip netns exec "$@"; }
cleanup() {
  [[ -n "${FPID:-}" ]] && kill "$FPID" 2>/dev/null && wait "$FPID" 2>/dev/null
  [[ -f "$WORK/iperf.pid" ]] && kill "$(cat "$WORK/iperf.pid")" 2>/dev/null
  for n in pbv pbf pbe; do ip netns del $n 2>/dev/null; done
}
trap cleanup EXIT
cleanup
for n in pbv pbf pbe; do ip netns add $n; ns $n ip link set lo up; done
ip link add v0 netns pbv type veth peer name f0 netns pbf
ip link add f1 netns pbf type veth peer name e0 netns pbe
for x in "pbv v0" "pbf f0" "pbf f1" "pbe e0"; do set -- $x; ns $1 ip link set $2 up; done
ns pbe iperf3 -s -D -p 5201 --pidfile "$WORK/iperf.pid"; sleep 0.5

measure_once() {  # prints "udp_pps tcp_mbs"
  local udp tcp
  udp=$(ns pbv timeout 40 iperf3 -c 203.0.113.2 -p 5201 -u -l 64 -b 0 -t "$T" -J 2>/dev/null | python3 -c 'import json,sys
try:
  d=json.load(sys.stdin)["end"]["sum"]; print(int(d["packets"]-d["lost_packets"])//'"$T"')
except Exception: print(0)')
  tcp=$(ns pbv timeout 40 iperf3 -c 203.0.113.2 -p 5201 -t "$T" -J 2>/dev/null | python3 -c 'import json,sys
try:
  d=json.load(sys.stdin)["end"]["sum_received"]; print(round(d["bits_per_second"]/8e6))
except Exception: print(0)')
  echo "$udp $tcp"
}
measure() {  # the median of REPS runs of each figure: "udp_pps tcp_mbs"
  local runs=()
  for _ in $(seq 1 "$REPS"); do runs+=("$(measure_once)"); done
  printf '%s\n' "${runs[@]}" | python3 -c 'import sys, statistics as s
rows=[l.split() for l in sys.stdin if l.strip()]
print(int(s.median(int(r[0]) for r in rows)), int(s.median(int(r[1]) for r in rows)))'
}
routed() {
  ns pbv ip addr flush dev v0; ns pbe ip addr flush dev e0
  ns pbv ip addr add 198.51.100.2/24 dev v0; ns pbf ip addr add 198.51.100.1/24 dev f0
  ns pbf ip addr add 203.0.113.1/24 dev f1; ns pbe ip addr add 203.0.113.2/24 dev e0
  ns pbv ip route add 203.0.113.0/24 via 198.51.100.1; ns pbe ip route add 198.51.100.0/24 via 203.0.113.1
  ns pbf sysctl -qw net.ipv4.ip_forward=1
}
bridged() {
  ns pbf ip addr flush dev f0; ns pbf ip addr flush dev f1; ns pbf sysctl -qw net.ipv4.ip_forward=0
  ns pbv ip addr flush dev v0; ns pbe ip addr flush dev e0
  ns pbv ip addr add 198.51.100.2/24 dev v0; ns pbv ip route add 203.0.113.0/24 dev v0
  ns pbe ip addr add 203.0.113.2/24 dev e0; ns pbe ip route add 198.51.100.0/24 dev e0
  for p in f0 f1; do ns pbf sysctl -qw net.ipv6.conf.$p.disable_ipv6=1; done
  if [[ $IO == pnet ]]; then  # pnet moves whole wire-size frames only
    for p in f0 f1; do ns pbf ethtool -K $p gro off gso off tso off tx off rx off >/dev/null 2>&1; done
    ns pbv ethtool -K v0 tx off gso off tso off >/dev/null 2>&1; ns pbe ethtool -K e0 tx off gso off tso off >/dev/null 2>&1
  fi
}

printf '| N | config | UDP 64B delivered pkt/s | TCP MB/s |\n|---|---|---|---|\n' | tee "$WORK/table.md"
routed
read -r u t < <(measure); echo "| - | kernel forward, no filter | $u | $t |" | tee -a "$WORK/table.md"
for N in $NS_LIST; do
  { echo "table inet f { set allow { type ipv4_addr . inet_service; flags interval; elements = {"
    for i in $(seq 1 $((N-1))); do printf '10.%d.%d.0/24 . %d,\n' $((i/256%256)) $((i%256)) $((1000+i%5000)); done
    echo "203.0.113.2 . 5201 } }"
    printf 'chain forward_filter {\n type filter hook forward priority 0; policy drop;\n ct state established,related accept\n ip daddr . th dport @allow accept\n ip saddr 203.0.113.2 accept\n}\n}\n'; } > "$WORK/rules.nft"
  ns pbf nft -f "$WORK/rules.nft"; read -r nu nt < <(measure); ns pbf nft flush ruleset
  echo "| $N | nftables interval set | $nu | $nt |" | tee -a "$WORK/table.md"
  { echo "*filter"; echo ":FORWARD DROP [0:0]"
    for i in $(seq 1 $((N-1))); do printf -- '-A FORWARD -d 10.%d.%d.0/24 -p udp --dport %d -j ACCEPT\n' $((i/256%256)) $((i%256)) $((1000+i%5000)); done
    echo "-A FORWARD -d 203.0.113.2 -j ACCEPT"; echo "-A FORWARD -s 203.0.113.2 -j ACCEPT"; echo COMMIT; } > "$WORK/rules.ipt"
  ns pbf iptables-restore < "$WORK/rules.ipt"; read -r iu it < <(measure); ns pbf iptables -F FORWARD; ns pbf iptables -P FORWARD ACCEPT
  echo "| $N | iptables linear | $iu | $it |" | tee -a "$WORK/table.md"
  NSTASH_N=$N
done
bridged
for N in $NS_LIST; do
  { echo "zone edge   = 198.51.100.0/24"; echo "zone onprem = 203.0.113.0/24"
    for i in $(seq 1 $((N-1))); do printf 'rule r%d allow 198.51.100.0/24 -> 10.%d.%d.0/24 service udp/%d\n' $i $((i/256%256)) $((i%256)) $((1000+i%5000)); done
    echo "rule iperf allow 198.51.100.2 -> 203.0.113.2 service tcp/5201, udp/5201"
    echo "default deny"; } > "$WORK/bench.policy"
  for FAST in $FAST_LIST; do
  fp=true; [[ $FAST == off ]] && fp=false
  printf 'policy = "bench.policy"\n[filter]\nedge = "f0"\nonprem = "f1"\nio = "%s"\nfast_path = %s\n[audit]\ndir = "audit-%s-%s"\nsigning_key = "audit.key"\n' "$IO" "$fp" "$N" "$FAST" > "$WORK/palisade.toml"
  ip netns exec pbf "$BIN" filter --config "$WORK/palisade.toml" 2> "$WORK/filter-$N-$FAST.log" & FPID=$!   # not through ns(): $! must be the filter itself
  for _ in $(seq 1 300); do grep -q "forwarding between" "$WORK/filter-$N-$FAST.log" && break; sleep 0.1; done
  sleep 0.5
  # On two cores the receiving host competes with the filter for one core
  # (the sender has the other), so packets the filter forwarded can still
  # be lost in the receiver's socket. Its own rate, from its counters
  # (SIGUSR1 prints them) around one extra UDP run:
  fwd_count() {  # "by palisade, by the kernel fast path"
    kill -USR1 "$FPID"; sleep 0.3
    echo "$(grep -o ': forwarded [0-9]* frames' "$WORK/filter-$N-$FAST.log" | tail -n 1 | awk '{print $3}') $(grep -o 'fast path forwarded [0-9]* frames' "$WORK/filter-$N-$FAST.log" | tail -n 1 | awk '{print $4}')"
  }
  read -r p0 k0 < <(fwd_count)
  ns pbv timeout 40 iperf3 -c 203.0.113.2 -p 5201 -u -l 64 -b 0 -t "$T" >/dev/null 2>&1
  read -r p1 k1 < <(fwd_count)
  fwd=$(( (${p1:-0} - ${p0:-0}) / T )); kfwd=$(( (${k1:-0} - ${k0:-0}) / T ))
  read -r pu pt < <(measure)
  kill "$FPID"; wait "$FPID" 2>/dev/null; FPID=""; tail -n 1 "$WORK/filter-$N-$FAST.log" >&2
  echo "| $N | palisade filter ($IO, fast path $FAST; palisade forwarded $fwd pkt/s, its kernel fast path $kfwd) | $pu | $pt |" | tee -a "$WORK/table.md"
  done
done
python3 - "$WORK/table.md" <<'PY'
import sys
rows = [l.strip("|\n").split("|") for l in open(sys.argv[1]) if l.startswith("|") and not l.startswith("|---") and "config" not in l]
rows = [[c.strip() for c in r] for r in rows]
print("\npalisade / nftables, same run:")
for n in sorted({r[0] for r in rows if r[0] != "-"}, key=int):
    nft = next((r for r in rows if r[0] == n and r[1].startswith("nftables")), None)
    for pal in (r for r in rows if r[0] == n and r[1].startswith("palisade")):
        if nft and float(nft[2]) and float(nft[3]):
            fast = pal[1].split("fast path ")[1].split(";")[0]
            print(f"  N={n}, fast path {fast}: UDP pkt/s {float(pal[2])/float(nft[2]):.2f}x, TCP MB/s {float(pal[3])/float(nft[3]):.2f}x")
PY
echo "work dir: $WORK" >&2
