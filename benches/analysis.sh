#!/usr/bin/env bash
# Times palisade's policy analyses (`lint`, `diff`) on the ClassBench 10k
# sets in ../shared/data/classbench/, imported into the policy language, and
# on changes a review brings: a broad rule inserted or removed, two inserted
# at once, a broad allow above every rule, a rule of many boxes (in a small
# policy, and beside a broad deny in each set). Prints, per case, the exit
# code, wall time, peak resident memory and the answer's counts (or the
# error).
#
#   benches/analysis.sh                     # every case, REPS=1
#   SETS="fw1_10k" REPS=3 benches/analysis.sh
#
# Each time is the best of REPS runs, the memory that run's. Run it under
# the shared bench lock. Needs GNU time (Debian: apt-get install time).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DATA="${DATA:-$ROOT/../shared/data/classbench}"
SETS="${SETS:-acl1_10k acl2_10k fw1_10k ipc1_10k}"
REPS="${REPS:-1}"
TODAY=2026-12-01
[[ -x /usr/bin/time ]] || { echo "needs GNU time (Debian: apt-get install time)" >&2; exit 2; }
[[ -d "$DATA" ]] || { echo "no ClassBench data at $DATA" >&2; exit 2; }

WORK="$(mktemp -d /tmp/palisade-analysis.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
cd "$ROOT"
cargo build --quiet --release
BIN="$ROOT/target/release/palisade"

# The policies. `mixed`: every third rule a deny (the imported sets allow
# everything), so that changes move verdicts both ways.
insert_after() { # file line text -> the file with `text` after line `line`
  awk -v n="$2" -v t="$3" '{print} NR == n {print t}' "$1"
}
# Two networks of 400 IPv4 /24s each, spread over the addresses: a rule
# from one to the other is 160,000 boxes.
awk 'BEGIN {
  x = 9541; for (s = 1; s <= 2; s++) { line = "net wide" s " ="; sep = " "; n = 0
    delete seen
    while (n < 400) { x = (x * 1103515245 + 12345 + s) % 2147483648; v = int(x / 256) % 16777216
      if (!(v in seen)) { seen[v] = 1; n++
        line = line sep sprintf("%d.%d.%d.0/24", int(v / 65536), int(v / 256) % 256, v % 256); sep = ", " } }
    print line } }' >"$WORK/wide.nets"
for set in $SETS; do
  "$BIN" import classbench "$DATA/$set" >"$WORK/$set.policy"
  awk '/^rule cb[0-9]+ allow/ { n = substr($2, 3) + 0; if (n % 3 == 2) sub(/ allow /, " deny ") } {print}' \
    "$WORK/$set.policy" >"$WORK/$set.mixed.policy"
  rules=$(grep -c '^rule ' "$WORK/$set.mixed.policy")
  mid=$((rules / 2))
  insert_after "$WORK/$set.mixed.policy" "$mid" "rule no_ssh deny any4 -> any4 service tcp/22" \
    >"$WORK/$set.ins.policy"
  insert_after "$WORK/$set.ins.policy" $((mid * 3 / 2)) "rule no_telnet deny any4 -> any4 service tcp/23" \
    >"$WORK/$set.two.policy"
  # The rule in the middle removed.
  at=$(grep -n '^rule ' "$WORK/$set.mixed.policy" | sed -n "${mid}p" | cut -d: -f1)
  sed "${at}d" "$WORK/$set.mixed.policy" >"$WORK/$set.rm.policy"
  # The deny for ssh, and a deny from `wide1` to `wide2` further down.
  { cat "$WORK/wide.nets" "$WORK/$set.mixed.policy"; } >"$WORK/$set.wide.policy"
  { cat "$WORK/wide.nets"
    insert_after "$WORK/$set.ins.policy" $((mid + 1000)) "rule big deny wide1 -> wide2 service tcp/80"
  } >"$WORK/$set.big.policy"
  # A broad allow above every rule.
  first=$(awk '/^rule / {print NR; exit}' "$WORK/$set.mixed.policy")
  insert_after "$WORK/$set.mixed.policy" $((first - 1)) "rule web allow any4 -> any4 service tcp/80" \
    >"$WORK/$set.top.policy"
done
# A rule from 400 networks to 400 others (160,000 boxes), in a small policy.
awk 'BEGIN {
  x = 9541; for (s = 1; s <= 2; s++) { line = "net many" s " ="; sep = " "; n = 0
    delete seen
    while (n < 400) { x = (x * 25173 + 13849 + s) % 65536
      if (!(x in seen)) { seen[x] = 1; n++; line = line sep sprintf("2001:db8:%x:%x::/64", s, x); sep = ", " } }
    print line }
  print "rule web allow 2001:db8:1::/49 -> any6 service tcp/80" }' >"$WORK/small.policy"
{ cat "$WORK/small.policy"; echo "default allow"; } >"$WORK/small.old.policy"
{ cat "$WORK/small.policy"; echo "rule big deny many1 -> many2 service tcp/80"; echo "default allow"; } \
  >"$WORK/small.new.policy"

run() { # name command... -> a table row
  local name="$1" best="" mem="" rc out
  shift
  for _ in $(seq 1 "$REPS"); do
    rc=0
    /usr/bin/time -f "%e %M" -o "$WORK/time" "$@" >"$WORK/out" 2>"$WORK/err" || rc=$?
    read -r secs kb < <(tail -1 "$WORK/time")
    if [[ -z "$best" ]] || awk -v a="$secs" -v b="$best" 'BEGIN {exit !(a < b)}'; then
      best="$secs" mem=$((kb / 1024))
    fi
  done
  # diff's two counts, lint's count of findings, or the error.
  out=$(awk -v w="$WORK/" '/^(newly|.*findings)/ && n++ < 2 { sub(w, ""); sub(/, 0 http classes/, ""); printf "%s%s", (n > 1 ? "; " : ""), $0 }' "$WORK/out")
  [[ -n "$out" ]] || out=$(awk '/^error/ && !n++' "$WORK/err")
  printf '%-26s %4s %7s %7s  %s\n' "$name" "$rc" "$best" "$mem" "${out:0:110}"
}

printf '%-26s %4s %7s %7s  %s\n' case exit seconds MB answer
for set in $SETS; do
  run "lint $set" "$BIN" lint --today "$TODAY" "$WORK/$set.policy"
  run "lint $set mixed" "$BIN" lint --today "$TODAY" "$WORK/$set.mixed.policy"
  run "diff $set +no_ssh" "$BIN" diff "$WORK/$set.mixed.policy" "$WORK/$set.ins.policy"
  run "diff $set +two denies" "$BIN" diff "$WORK/$set.mixed.policy" "$WORK/$set.two.policy"
  run "diff $set -middle rule" "$BIN" diff "$WORK/$set.mixed.policy" "$WORK/$set.rm.policy"
  run "diff $set +web on top" "$BIN" diff "$WORK/$set.mixed.policy" "$WORK/$set.top.policy"
  run "diff $set +ssh +160k" "$BIN" diff "$WORK/$set.wide.policy" "$WORK/$set.big.policy"
  run "lint $set +ssh +160k" "$BIN" lint --today "$TODAY" "$WORK/$set.big.policy"
done
run "diff small +160000 boxes" "$BIN" diff "$WORK/small.old.policy" "$WORK/small.new.policy"
run "lint small +160000 boxes" "$BIN" lint --today "$TODAY" "$WORK/small.new.policy"
