//! The compiled classifier used on the data path.
//!
//! # Algorithm: partitioned multiway split trees (HyperSplit + CutSplit)
//!
//! Each entry is a box in a five-dimensional space (source, destination,
//! source port, destination port, protocol). The structure is a small set of
//! decision trees:
//!
//! - **Root table.** When a few top bits (16 at most in all) of one or two
//!   fields spread a tree's entries well (at most 8× copies, fullest slot
//!   clearly below the whole), the first level is a table indexed by those
//!   bits, as HiCuts/HyperCuts' equal-size cuts: one load instead of several
//!   levels. Adjacent slots with
//!   the same entries share a subtree.
//! - **Internal nodes** cut their region along one dimension at up to six
//!   thresholds taken from entry endpoints and chosen to balance entries among
//!   the children (HyperSplit's endpoint-based, rule-balanced splits, Qi et
//!   al., INFOCOM 2009, made multiway to cut the depth as HyperCuts does). The
//!   thresholds and the seven child references sit inside the node, which is
//!   one 64-byte line for IPv4, so a step is one cache-line load and a
//!   branch-free count (six independent compares; unused children repeat
//!   the last, so the count needs no clamp). The node's dimension travels
//!   in the reference to it, so the key's value in that dimension is read
//!   while the node itself is still loading. Each node also records the
//!   best priority below it.
//! - **Leaves** hold at most a few entry copies (box and priority, 32 bytes
//!   for IPv4) in priority order, scanned linearly until the first match.
//!   Each range is kept as its start and width, so a field is tested with
//!   one subtraction and one compare.
//!   A parent's reference to a leaf packs the leaf's start and length, so
//!   the walk goes from the last internal node straight to the entries: per
//!   tree the dependent loads are the root slot, the internal nodes on the
//!   path, and the leaf's consecutive entries (measured: copying entries
//!   into leaves and dropping leaf nodes each removed a dependent load and
//!   together raised lookups/s by 10-50% on the ClassBench 10k sets). While
//!   building, a node drops every entry after one that covers the node's
//!   whole region and (for short lists) every entry covered within the
//!   region by an earlier one: those can never be the first match there.
//!
//! Entries are partitioned by which fields are "small" (CutSplit, Li et al.,
//! INFOCOM 2018), since one tree over rule sets that mix wildcards in
//! different fields replicates too much (the classic failure of decision
//! trees), and where it does not, it is still larger and deeper than the
//! groups' trees (one tree over ClassBench acl1 10k: 1.82 MB, 2.44 nodes
//! per lookup; the groups: 0.85 MB, 1.94 nodes, 10% more lookups/s, and
//! 10-35% more on the 1k sets). Small sets (at most 128 entries) are the
//! exception: one tree over them is a few levels deep and is tried first
//! (the first 60 or 120 rules of fw1_1k: 40% more lookups/s than the
//! groups; at 200 rules the groups are 20% faster). The groups: small
//! source; else small destination; else, for entries wide in both
//! addresses, small destination port; small source port; the rest. One
//! tree per group; a lookup walks them in order of their best priority and
//! skips a tree, or stops inside it, as soon as it cannot hold an earlier
//! match than the one already found.
//! Each leaf entry also carries the set of later trees that hold an entry
//! with a better priority overlapping its box within its leaf's region
//! (computed once while building, pairwise within the work cap): after a
//! match only those trees are entered, since any entry that matches the
//! same key overlaps the matched box there. With it a lookup enters 1.28
//! trees on average on the ClassBench ipc1 10k trace (1.36 with whole
//! boxes, about 2.1 without) and 1.49 on acl2's.
//!
//! [`Classifier::lookup_batch`] walks a group of keys through the first tree
//! in lockstep so that their memory accesses overlap, as DPDK's ACL
//! classifies bursts, without priority checks, since no key holds a match
//! yet (a batch is bound by instructions more than by memory; measured:
//! ipc1_10k batched +8%). The later trees, which few keys enter, each key
//! then walks as a single lookup does (measured 2026-12-04 against walking
//! every tree in lockstep, median of 5 interleaved rounds, two runs:
//! ipc1_10k +10% and +12%, acl2_10k +11%, fw1_10k -3% and +1%, the 1k
//! sets +7% to +20%).
//!
//! # Why this and not the others
//!
//! - Tuple-space search and its descendants (TupleMerge, PartitionSort, the
//!   Open vSwitch classifier) have a lookup cost proportional to the number of
//!   tuples or partitions, which the rule set (or, with a megaflow cache, the
//!   traffic) controls: that is CVE-2019-25076. Here the lookup cost is fixed
//!   by the built structure: at most, summed over the trees (at most five in
//!   the default strategies, sixteen in the last fallbacks), one table load
//!   plus `depth` node steps plus one leaf scan, with depth and leaf size
//!   capped while building ([`BuildLimits`]: depth 24, leaf 32 by default,
//!   so never more than 16 × (1 + 24 + 32) = 912 steps, each one cache-line
//!   load and a few compares) and the actual bound of a built structure
//!   reported by [`Classifier::stats`] (`worst_case_steps`; 13 to 48 on the
//!   ClassBench 10k sets). [`Classifier::lookup_steps`] counts the steps of
//!   one lookup and the tests check the bound on every key. No key can take
//!   a longer path than the longest one that exists, priority pruning only
//!   shortens paths, and nothing changes at lookup time: there is no cache
//!   for traffic to pollute.
//! - RFC and the cross-producting schemes have a fixed small number of memory
//!   accesses but a table size that explodes on ClassBench firewall sets.
//! - Bit-vector schemes have bounded lookups but cost `N/64` words per field
//!   and `N²` bits of memory; too slow and too large at 10k rules.
//! - DPDK's ACL multibit trie is excellent but its byte-wise range expansion
//!   and trie merging are a large amount of subtle code; the split trees get
//!   close to it with a fraction of that.
//!
//! # Where the time goes
//!
//! Figures from `cargo bench --bench classify -- --summary` on the
//! development machine (AMD EPYC Zen 4, 2.6 GHz, 1 MiB L2 per core, run
//! under the shared bench lock; 2026-11-25 21:09-21:11 UTC, three runs
//! each, interleaved with the previous round's build, averaged; the
//! machine was shared with another benchmark and runs varied by up to 8%),
//! single / batched lookups per second: acl1_10k 26.2M / 32.8M, acl2_10k
//! 36.1M / 33.9M, fw1_10k 60.6M / 60.6M, ipc1_10k 26.9M / 29.2M (27.6M to
//! 30.1M); the previous round's build in the same runs: 23.0M / 32.2M,
//! 36.3M / 34.0M, 60.5M / 62.0M, 26.1M / 28.4M. The 1k sets: acl1 50.8M /
//! 69.8M, fw1 49.4M / 56.9M, ipc1 49.8M / 60.4M (previously 45.6M / 64.6M,
//! 38.9M / 57.6M, 42.2M / 60.6M). Builds 29-73 ms (previously up to 129
//! ms), memory at most 3.14 MB, worst-case steps 24 to 48. The 30M target
//! is met on acl2 and fw1 and on acl1 batched; not on acl1 single, ipc1
//! single, nor (but for some runs) ipc1 batched.
//!
//! Earlier figures (same command, two runs averaged): acl1_10k 23.8M /
//! 33.1M, acl2_10k 36.5M / 34.2M, fw1_10k 61.0M / 63.7M, ipc1_10k 26.3M /
//! 28.6M; before that round: 18.6M / 32.4M, 31.5M / 32.2M, 58.0M / 60.6M,
//! 20.7M / 28.0M.
//!
//! The machine is a virtual one without hardware counters (`perf stat`
//! reports cycles, branches and cache events as not supported), so the
//! evidence is by decomposition and simulation:
//!
//! - acl1_10k, 100k keys streamed, one key at a time: the root slot alone
//!   runs at 320M/s, root plus the walk to the leaf reference at 46M/s
//!   (about 57 cycles), and adding a load of the leaf's first entry that
//!   nothing branches on at 42M/s; the whole lookup runs at 23-24M/s
//!   (about 110 cycles). The leaf scan, whose branches wait on the leaf's
//!   entries, costs as much as the walk. Testing only source and
//!   destination in the scan (inexact; a diagnostic) gave 28M/s.
//! - Repeating n distinct keys of acl1_10k: n = 1 (every branch predicted,
//!   everything in L1) 60M/s, n = 64 40M/s, n = 1000 36M/s, all 100k 23M/s.
//!   So about 30 cycles go to mispredicted branches and L1 misses inside
//!   a warm structure and about 40 more to the structure not fitting the
//!   core's caches.
//! - cachegrind (simulated 32 KiB L1, 1 MiB last level) per acl1 lookup:
//!   about 250 instructions, 80 loads, 5 L1 misses, 0.5 misses of the
//!   1 MiB level, 29 conditional branches of which 1.5 mispredicted; per
//!   ipc1 key in a batch: 340 instructions and 50 branches, 4 mispredicted
//!   (a batch is bound by instructions and branches, not by memory).
//!   (2026-11-25: per batched ipc1 key 313 instructions, 44 branches, 2.8
//!   L1 and 0.4 L2-sized misses.)
//! - 2026-11-25, cycling a window of n trace keys through the same
//!   key array (so the same 1.4 MB key stream): ipc1_10k with n = 3000 or
//!   10000 runs at 39-40M/s single and 50M/s batched, n = 20000 at
//!   28M / 29M, the whole trace at 26M / 28.5M; 10000 keys taken every
//!   ninth key across the whole trace also give 39.5M. acl1_10k (one
//!   tree): 36M single at n = 3000, 26M at 20000. So about a third of a
//!   lookup's time, batched too, goes to structure lines that a full pass
//!   touches but that do not stay in the 1 MiB L2 next to the key stream:
//!   a pass
//!   over the ipc1 trace touches about 570 KB of structure (leaf entries
//!   483 KB, nodes 68 KB, root slots 20 KB), acl1's 685 KB with one tree
//!   and about 560 KB with the groups (leaf target 7; leaf entries 433
//!   KB).
//! - ipc1 against acl2 (36M/s single with more trees entered, 1.49 per key
//!   against 1.28): ipc1 walks 1.81 internal nodes per key, acl2 0.82; one
//!   more dependent L2 load per key is most of the difference.
//!
//! ## On an Intel Xeon VM (2026-12-03)
//!
//! The same code on an Intel Xeon (Ice Lake server, model 106, "2.6 GHz",
//! 2 vCPUs under KVM; 48 KiB L1d and 1.25 MiB L2 per core, no hardware
//! counters) runs at 55-65% of the Zen 4 figures single and 50-60%
//! batched, and batched lookups are no faster than single ones. The same command (the bench binary with
//! `--summary`), 17:54-18:35 UTC, 33 runs of this round's build
//! interleaved with as many of the previous round's, mean [lowest-highest],
//! single / batched lookups per second: acl1_10k 17.6M [13.6-21.6] / 20.1M
//! [15.1-27.8], acl2_10k 23.2M [15.6-30.6] / 18.4M [12.9-27.4], fw1_10k
//! 32.8M [22.6-44.8] / 31.5M [18.1-49.5], ipc1_10k 18.8M [15.4-23.7] /
//! 16.5M [11.7-23.8]; the previous build: 17.5M / 20.3M, 22.4M / 19.2M,
//! 33.6M / 30.9M, 17.7M / 17.7M. The 1k sets (18 runs): acl1 27.3M /
//! 27.8M, fw1 27.0M / 19.4M, ipc1 23.0M / 18.8M. Builds 9-162 ms, memory
//! at most 3.14 MiB, worst-case steps 22 to 48. So 30M/s is met on
//! fw1_10k on average, and on no other set. One run differs from the next
//! by up to 40%, so only large changes show between processes; the
//! figures for changes below come from both variants interleaved in one
//! process (12 rounds of a few passes each, median ratio), which resolves
//! about 3%. This round's change, so measured: single lookups +5% to +9%
//! on acl2_10k and ipc1_10k, +1% to +3% on acl1_10k and fw1_10k; over the
//! 33 runs above, paired run by run, +5% and +7% on acl2 and ipc1 and no
//! change on acl1 and fw1.
//!
//! - The variance is the machine's: a loop of eight independent additions
//!   ran at 4.3 to 10.5 additions per ns within 20 s while a dependent
//!   chain kept a steady 3.0 GHz, the signature of another tenant on the
//!   core's second hardware thread (invisible from inside the VM; our
//!   second vCPU is not it: streaming memory or spinning on it left the
//!   L1 and L2 latencies seen from the first unchanged). Looking up one
//!   key over and over (everything in L1, every branch predicted) ran at
//!   35M to 53M/s on acl1_10k between runs.
//! - Memory: a pointer chase takes 1.7 ns within 32 KiB, 5 ns at 256 KiB,
//!   9-12 ns at 1 MiB, 25-30 ns at 1.5-2 MiB and 120-140 ns from 3 MiB on:
//!   the 48 MiB L3 is not there for this VM: a line that leaves the L2
//!   costs 70-90 cycles while the working set stays under about 2 MiB and
//!   about 350 beyond. A pass over a 10k set (1.6 MB of keys and up
//!   to 3.3 MB of structure) does not fit.
//! - Cost split, by the keys looked up (single / batched M/s, 16:45-17:05):
//!   acl1_10k whole stream 16-22 / 16-28, 1000 keys taken evenly from it
//!   22-32 / 30-45, one key 47-53 / 48-62; ipc1_10k 15-21 / 13-23, 20-23 /
//!   19-21, 30-34 / 30-42; fw1_10k 24-43 / 20-47, 31-45 / 31-61, 66-72 /
//!   74-77. Streaming 10000 distinct keys costs as much as the whole
//!   trace, whether the key array is 160 KB or 1.6 MB: the structure lines
//!   a pass needs, not the key stream, leave the cache. A quarter to a
//!   third of the time goes to those misses, the rest to instructions and
//!   mispredicted branches; ipc1 stays near 20M/s even with 1000 keys.
//! - Per single lookup (cachegrind, this build's predecessor): acl1 230
//!   instructions, 72 loads, 30 conditional branches (1.6 mispredicted in
//!   cachegrind's model); acl2 217 / 33 (2.1); fw1 191 / 30 (1.8); ipc1 258
//!   / 37 (2.5); batched ipc1 310 instructions and 43 branches (3.6). Per
//!   key: acl1 enters 1.01 trees, 1.94 nodes, tests 2.11 leaf entries of
//!   4.07; acl2 1.49 trees (2.23 considered), 0.82 nodes, 2.05 entries;
//!   fw1 1.92 trees (2.06), 0.03 nodes, 1.05 entries; ipc1 1.28 trees
//!   (2.12), 1.81 nodes, 2.52 entries of 4.93.
//! - So a single lookup is a chain of three or four dependent loads (root
//!   slot, nodes, leaf), most of them L2 hits or worse, plus one or two
//!   mispredicted branches that keep the next lookup from overlapping it:
//!   130-180 cycles on acl1 and ipc1 (16-22M/s at 3 GHz) against the 100
//!   that 30M/s allows. Batching overlaps the loads but not the
//!   instructions, which a shared core makes the scarce part: likely why
//!   batches gain nothing here.
//!
//! ## On an AMD EPYC VM, beside DPDK's ACL (2026-12-04)
//!
//! 2 vCPUs at 2.45 GHz, 1 MiB L2 per core; a pointer chase takes 2.7 ns
//! within 16 KiB, 10 ns at 256 KiB, 19 ns at 1-2 MiB, 67 ns at 4 MiB and
//! 180-215 ns from 16 MiB on (the 32 MiB L3 the VM reports does not show).
//! `benches/classify-peers.sh` (REPS=3, best of each, 21:29-21:35 UTC)
//! runs DPDK 22.11's `rte_acl` (`dpdk-test-acl`, scalar, SSE and AVX2,
//! bursts of 256) on the same rules and keys. Single / batched lookups per
//! second against DPDK's best: acl1_10k 19.0M / 26.0M against 11.9M
//! (AVX2; 2.2x), acl2_10k 28.6M / 26.1M against 3.2M (9.0x), fw1_10k
//! 40.3M / 45.2M against 3.7M (12.1x), ipc1_10k 22.6M / 22.6M against
//! 8.3M (2.7x); the 1k sets acl1 1.45x, fw1 1.32x, ipc1 0.95x (DPDK's SSE
//! path, 28.9M, is 5% ahead there). DPDK's tries for the 10k firewall
//! sets take over a gigabyte of memory (the tool's resident size while
//! classifying fw1_10k: 1.2 GB), where these trees take 0.85-3.14 MB.
//! Other runs the same evening gave palisade 12-20M single on acl1_10k and
//! 15-21M on ipc1_10k: the host's load moves every figure by up to 40%.
//! Two more attempts, measured in one process against the code above
//! (median of 5 rounds) and not kept: a batched lookup as a software
//! pipeline over the key stream (the first tree's root slot prefetched 24
//! keys ahead, read and the node or leaf it names prefetched 16 ahead, one
//! more step taken and prefetched 8 ahead; and an earlier variant that
//! prefetched the slot 16 ahead and read it 8 ahead), as ratios to single lookups in the same
//! rounds: acl2 0.75-0.99, fw1 0.86-0.92, ipc1 0.92-1.16, the 1k sets
//! 0.77-0.96. A profile of single ipc1 lookups puts 45% of the
//! samples on the loads of the root slot, the nodes and the leaf's first
//! entry, yet loading the first two ahead of time does not pay: the
//! misses that remain and the mispredicted branches of the leaf scan keep
//! a lookup at 45-55 ns. Building for the host CPU (`-C
//! target-cpu=native`: BMI, AVX2): within the run-to-run noise.
//!
//! Where an ipc1 lookup goes, counted over its trace (2026-12-05): every
//! key enters the first tree (small sources) and walks 1.62 nodes and
//! tests 2.08 leaf entries there; 86% find their match in it. Of the 14%
//! that do not, four in five reach an empty leaf (no entry of that tree
//! covers the region: the walk, no scan) and go on to the second tree.
//! Of the keys that match in the first tree, 11% still enter a later
//! tree their entry names, and 4 of those 9,309 find a better match
//! there. cachegrind: 219 instructions, 28.5 conditional branches per
//! single lookup (1.75 mispredicted in its model), 257 and 32 (2.9) per
//! batched key. So the time is the first tree's chain of loads and its
//! leaf scan, not the later trees. Three attempts, each measured in one
//! process against the code it would change (median ratio of 5 to 9
//! interleaved rounds, single / batched):
//!
//! - Follow lists: each leaf entry with later trees to enter got the
//!   list of those trees' better entries that overlap its clipped box (at
//!   most 8, covered ones dropped, identical lists shared), scanned
//!   instead of walking the trees: acl2_10k 0.99 / 0.98, fw1_10k 0.96 /
//!   0.97, ipc1_10k 0.99 / 0.99, the 1k sets 0.95-1.00. A later tree's
//!   walk mostly stops at its first node (no better entry below), so a
//!   list saves little; lists existed for a third of those keys. Dropped.
//! - Merging later trees' entries into the first tree's leaves, so that a
//!   key's match there is final: the merged, pruned leaves would hold over
//!   12 entries for most ipc1 keys, and more than 256 for a quarter of
//!   them (the second tree's entries have wide sources, the first tree's
//!   leaves are cut by source). Not built.
//! - Kept: a batched lookup loads each lane's first leaf entry before any
//!   lane's scan, where a tree's leaves exceed 256 KiB: acl1_10k batched
//!   1.05, 1.11, 1.02 in three runs, ipc1_10k 1.02 in each, the others
//!   0.99-1.02 (their first trees' leaves are smaller and skip it); for
//!   every tree it cost fw1_10k 0.91 and fw1_1k 0.95 (leaves of 0-1
//!   entries that stay in the cache). Loading the second entry as well:
//!   no better (0.98-1.01).
//!
//! Later the same day, two more, measured the same way (9 rounds):
//!
//! - A root table indexed by protocol class instead of the protocol's top
//!   bits (the one or three protocols most entries name each a class,
//!   the rest one more; the class found by comparing, not by a table
//!   load, in every tree): the first trees of ipc1 and acl1 then take
//!   15 source bits and 1 class bit (ipc1: 12 and 4 before), 14% (ipc1)
//!   smaller, yet ipc1 walks the same 1.63 nodes per key. Against the
//!   same slot code without class shapes: ipc1_10k 0.98 / 0.96, acl1_10k
//!   1.03 / 1.03, acl2 and fw1 0.99-1.01; with the class read from a
//!   256-byte table instead: ipc1 0.98 / 0.96, acl1 1.03 / 1.04. Not
//!   kept: the set short of the target loses what the other gains.
//! - The first tree's leaf scan in a batch done without branches over
//!   each lane's whole leaf (every entry's five fields combined with
//!   `&`, the first match kept by a conditional move): ipc1_10k 0.87,
//!   acl1_10k 0.90 batched. cachegrind counts about 3 mispredicted branches
//!   per batched ipc1 key in its model (the lanes' walk loop 0.5, the
//!   leaf scans about 2), but removing them costs more instructions than
//!   the mispredictions do here.
//! - Kept: a batch finds its lanes' root slots with the table's fields
//!   read once (LLVM reloaded the dimensions and shifts, and checked the
//!   dimensions' bounds, for every lane): batched lookups +2% to +8% on
//!   every set, in two runs (acl1_10k 1.05 and 1.02, ipc1_10k 1.02 and
//!   1.02, fw1_10k 1.07 and 1.08). Holding the node array the same way
//!   for the walk: 0.98-1.02, not kept.
//!
//! 2026-12-05, later, the same way (9 rounds, single / batched):
//!
//! - The batch's walk over a packed list of the lanes still at an
//!   internal node (one loop-end branch per round instead of a branch per
//!   lane; about a sixth of a batched ipc1 key's mispredictions are those
//!   per-lane branches): batched ipc1_10k 0.95, acl1_10k 0.90, fw1_10k
//!   0.96, acl2_10k 1.01. The packing costs more than the mispredictions.
//! - Before the later trees are walked lane by lane, loading each lane's
//!   first slot and node (or leaf entry) of its next tree, so that those
//!   misses overlap across lanes: batched 0.85 (fw1_10k) to 0.96
//!   (acl1_10k), ipc1_10k 0.89. Not kept.
//!
//! ## On an Intel Xeon VM with a quiet host (2026-12-05, evening)
//!
//! 2 vCPUs, 48 KiB L1d and 2 MiB L2 per core; a pointer chase takes 1.4
//! ns within 32 KiB, 4.5-5.8 ns from 64 KiB to 1 MiB, 8 ns at 1.5 MiB, 16
//! ns at 2 MiB and 33-38 ns from 3 to 8 MiB (huge pages change none of
//! it). Whole `--summary` runs repeat to within 1%, so a change is
//! measured as whole runs of each build, alternated. Before this round:
//! single / batched acl1_10k 26.2-26.5M / 36.7M, acl2_10k 36.8-37.0M /
//! 35.6-35.8M, fw1_10k 62.8-62.9M / 60.1-60.7M, ipc1_10k 28.3-28.4M /
//! 31.4-31.5M.
//!
//! - Kept: the first tree walked and its leaf scanned without priority
//!   checks (see [`Classifier::lookup`]): acl1_10k 27.3M, acl2_10k 39.2M,
//!   fw1_10k 66.0M, ipc1_10k 29.7M single (batched unchanged), acl1_1k
//!   42.8M to 50.6M. cachegrind counts 224 instructions per acl1_10k
//!   lookup before it.
//! - Where acl1_10k's single lookup goes, counted over its keys: the first
//!   tree's root table takes 10 source and 6 destination bits (65,536
//!   slots, 256 KiB), 84% of keys then walk two nodes (mostly on the
//!   source), and the leaf scan finds the match at the first entry for 44%
//!   of keys, the second for 28%, the third for 13%. Repeating n keys
//!   spread over the stream: n = 1 64M/s, 64 51M/s, 1,000 41M/s, 10,000
//!   29M/s, all 100,000 26M/s (before the kept change): the structure's
//!   lines (root 256 KiB, leaves 487 KiB) leave the L1 and a lookup waits
//!   on three or four dependent L2 loads.
//! - A point padded to eight fields so that a reference's dimension
//!   indexes it with a mask instead of a clamp: 0.97-0.99 on the 10k
//!   sets. Testing the destination before the source in a leaf entry:
//!   ipc1_10k 1.01, the others 0.99-1.00. The first tree's node array held
//!   in a local slice: no change. Root tables of up to 18 bits (with 8x or
//!   16x copies): acl2_10k 0.96, fw1_10k 0.87, the others 0.99. Root
//!   tables of at most 14 bits: acl1_10k 1.02, ipc1_10k 1.00-1.03,
//!   acl2_10k 0.93, fw1_10k 0.88; of at most 12: acl1_10k 1.02-1.07,
//!   acl2_10k 0.87-0.90, fw1_10k 0.75 (smaller tables suit the sets short
//!   of the target and cost the others more: a cap for all trees does not
//!   pay; choosing per tree would need a cost model of the table's size).
//! - Kept (2026-12-05, later): a root table that still leaves a key more
//!   than 32 entries on average (the squared slot sizes over the copies)
//!   gives way to the best table of at most 12 bits, in trees of at least
//!   1,024 entries. Only the first trees of acl1_10k (10 + 6 bits, a list
//!   of 58, to 8 + 4) and ipc1_10k (12 + 4, a list of 56, to 8 + 4)
//!   change: those tables save no level (nodes follow them anyway) and a
//!   16 KiB one stays in the cache where a 256 KiB one does not. Two
//!   whole runs of each build, alternated: acl1_10k 27.1-27.2M to
//!   27.5-27.7M single, ipc1_10k 29.7M to 30.1-30.2M, acl2_10k and
//!   fw1_10k unchanged (acl1_10k's memory 0.85 to 0.62 MB). Without the
//!   floor of 1,024 entries fw1_1k's 405-entry tree took 6 + 6 bits
//!   instead of 8 + 8 and lost 3%.
//! - Beside DPDK 22.11's `rte_acl` on this machine, which has AVX-512
//!   (`benches/classify-peers.sh`, REPS=3, best of each), palisade's
//!   better of single and batched against DPDK's best (its AVX-512 path,
//!   16 lanes): acl1_10k 37.4M against 28.6M (1.31x), acl2_10k 39.9M
//!   against 20.6M (1.94x), fw1_10k 67.2M against 13.6M (4.96x),
//!   ipc1_10k 31.8M against 23.6M (1.35x); on the 1k sets DPDK leads
//!   (acl1 0.79x, fw1 0.73x, ipc1 0.51x), where its tries fit the caches
//!   and its 16 lanes run in lockstep.
//!
//! Measured and dropped (each against the code it would have changed, same
//! session):
//!
//! - A walk and leaf scan without any data-dependent branch (fixed depth,
//!   every leaf entry tested with conditional moves): acl1 10M/s from 19M.
//!   The instructions of one lookup then fill the reorder window, so
//!   consecutive lookups no longer overlap. A branch-free scan alone
//!   (conditional moves over the whole leaf): 17M/s from 24M.
//! - One branch-free test of all five fields per leaf entry (integer
//!   arithmetic the compiler cannot split into branches), or of the ports
//!   and protocol only: 5-15% slower than a branch per field.
//! - Leaf boxes of four wide fields tested by one vector compare, the
//!   protocol, priority and later trees in a parallel array (32-byte boxes):
//!   ipc1 +5% single and batched, acl1 -7% (the match then touches a second
//!   line). With everything in one 40-byte entry: acl1 -10%, fw1 -30%
//!   (entries straddle lines); 64-byte aligned entries: acl1 -10%.
//! - Sharing identical leaves: acl1 memory 1.81 to 1.19 MB, no faster (as
//!   with the earlier leaves of indices, 0.7 MB).
//! - Leaf targets 4, 6, 12 and 16 instead of 8: no faster (acl1 14.2M,
//!   17.9M, 17.9M, 17.8M against 19.0M).
//! - Root tables with up to 16x copies: the same as 8x.
//! - A first-tree lookup without priority checks and a key padded to eight
//!   fields (no bounds checks) for single lookups; testing the destination
//!   before the source: no measurable change.
//! - A node count as a thermometer mask and a trailing-zero count instead
//!   of six added compares: acl1 -6%, ipc1 -3%.
//! - Batched lookups visiting only the lanes that want a later tree
//!   (packed lane list): +1-3%, within the noise; not kept.
//! - Batched rounds without a branch per lane (lanes at a leaf step
//!   through node 0 and keep their leaf): -25% batched.
//! - Leaves starting on even entries of a 64-byte-aligned array, so that
//!   a leaf's first two entries share a line: within the noise.
//! - Huge pages for the structure through glibc's malloc tunable
//!   (diagnostic only): no visible change.
//! - 2026-11-25 (each A/B interleaved, the machine shared and noisy, so
//!   changes under 3% are not resolved):
//!   - A branch-free test of a leaf's first four entries (a match mask
//!     and a trailing-zero count, then the rest by the loop): acl1 -20%
//!     single, fw1 -60% (its leaves hold 0-1 entries; the extra
//!     instructions dominate).
//!   - Batched: testing every lane's first leaf entry, without branches,
//!     before any lane's scan so that the lanes' leaf loads overlap:
//!     batched -5% (ipc1) to -25% (fw1).
//!   - Batches of 16 keys: fw1 batched -15%, ipc1 no better.
//!   - Batched lookups in chunks of 256 keys taken tree by tree, the keys
//!     that want a tree packed into full groups of eight: fw1 batched
//!     -20%, acl1 -4%, ipc1 no better.
//!   - A "no match here" last entry in leaves (matches everything, at a
//!     priority no rule has, naming the later trees that overlap the
//!     leaf's region): no fewer trees entered than the clipped later sets
//!     already give; in every leaf fw1 -16% single (memory 1.15 to 1.70
//!     MB); only where it excludes the next tree: no change. Not kept.
//!   - Leaf entries reordered likeliest first (by the share of an entry's
//!     box inside the leaf's region, as ClassBench draws keys; entries that
//!     overlap within the region keep their order): the match position
//!     barely moves (entries in a leaf overlap within its region), no
//!     change.
//!   - Leaf targets 5, 6 and 7 with the groups: within the noise.
//!   - Root tables of up to 20 bits or 16x copies with the groups: memory
//!     to 4.6 MB, no faster. Sharing identical leaves with the groups:
//!     acl1 0.85 to 0.83 MB, no faster.
//!   - Later-tree lists of up to 4096 entries per tree instead of 64:
//!     ipc1 trees entered 20614 to 20567 per pass, not kept.
//!   - Leaf entries that test at most one address and one port or
//!     protocol field (16 bytes, the rest covering the leaf's region):
//!     only 14% (acl1) and 22% (ipc1) of leaf entries sit in leaves where
//!     every entry qualifies; not built.
//!   - glibc's huge-page tunables again (hugetlb=1, larger mmap threshold):
//!     no change; the structure's vectors are each under 2 MiB, so they
//!     are likely never backed by huge pages (anything more would need
//!     unsafe code outside `sys.rs`).
//! - 2026-12-03, on the Intel Xeon VM, interleaved in one process (single /
//!   batched, ratio against the code then current):
//!   - Trees taken in order with one test each (the bit of the later-tree
//!     mask, no best-priority test) instead of by the set bits: acl1 0.98,
//!     acl2 1.04, fw1 0.97-0.99, ipc1 1.04-1.05 against the old loop; the
//!     set bits give 1.00, 1.04-1.06, 1.01-1.03 and 1.05-1.10 and were
//!     kept.
//!   - Prefetching the leaf's third entry (the line after the first two)
//!     as soon as the walk reaches the leaf: 1.00 / 0.97-1.00.
//!   - One branch-free test of all five fields per leaf entry (64-bit
//!     borrows or-ed together): 0.91-0.94 / 0.93-0.95, as on Zen 4.
//!   - Loading the second tree's root slot at the start of a lookup, so
//!     that it does not wait for the first tree: 0.90-0.95 single.
//!   - The root slot from the key held in two 64-bit registers instead
//!     of the point array reloaded by index: 0.96-0.98.
//!   - Batched: prefetching every lane's first two leaf entries before any
//!     lane's scan: 0.91 (ipc1) to 1.05 (acl1), within that run's noise.
//!     Batched: a non-temporal prefetch of the keys four groups ahead:
//!     0.98-1.00. Batched: looking one group ahead (the next group's
//!     first-tree root slot and a prefetch of the line it names): 0.82
//!     (fw1) to 0.91 (ipc1). The batch is bound by instructions here, not
//!     by memory.
//!   - Batches of 16 keys: fw1 0.87 batched, the rest 0.96-1.01; of 4:
//!     fw1 0.93, acl1 0.95.
//!   - Batched: walking only the trees some lane still wants, by the set
//!     bits of the lanes' masks (as single lookups now do): within 0.95 to
//!     1.08, no trend.
//!   - Leaf targets 4, 6, 12 and 16 instead of 8: acl1 single 15.2M,
//!     15.0M, 12.8M, 12.6M against 15.4M; no gain elsewhere (acl2 memory
//!     5.6 MB at 4, 2.0 MB at 16).
//!   - The six threshold flags of a step summed as a tree (and masked)
//!     instead of LLVM's chain of five address additions: LLVM folded it
//!     back into the same chain; not pursued.
//!   - Leaves as struct-of-arrays blocks (each field's starts and widths
//!     in lane arrays, priorities and later trees beside them; unused lanes
//!     at priority `u32::MAX`), every lane of a block tested in one
//!     branch-free pass of plain array loops and the first match taken as
//!     the lowest set bit. Single lookups, median ratio of 12 interleaved
//!     rounds (acl1, acl2, fw1, ipc1 10k): blocks of 4 (128 bytes, two
//!     lines) in every leaf 0.94, 0.85, 0.58, 0.92 (batched 1.16, 0.96,
//!     0.61, 1.01; memory 0.85 to 1.11 MB on acl1, 1.15 to 1.99 on fw1);
//!     the same with leaves of at most two entries left to the scan 0.93,
//!     0.89, 0.95, 0.88; blocks of 2 (one 64-byte line) 1.02, 0.90, 0.73,
//!     0.94, with one-entry leaves left to the scan 0.99, 0.91, 0.93,
//!     0.95; blocks of 8 (8 rounds) 0.77, 0.73, 0.34, 0.78. Taking the
//!     match lane by a branch per lane instead of the trailing-zero count
//!     (blocks of 4, 8 rounds): 0.93, 0.86, 0.54, 0.92 against 0.90, 0.81,
//!     0.52, 0.84, still below the scan. LLVM vectorises such loops for
//!     baseline SSE2 only in part (the addresses once compared signed with
//!     the top bit flipped, the ports as interleaved 16-bit pairs; the
//!     protocol and the reduction stay scalar): about 75 instructions per
//!     block of four, yet a version it left scalar (about 110) measured
//!     the same. What costs is likely
//!     that the whole block (two lines) must arrive and be reduced before
//!     the match's priority and later trees are known, a data dependency
//!     where the scan has a predicted branch: besides fw1 (leaves of 0-1
//!     entries), the sets that enter more trees (acl2, ipc1) lose most.
//!     Not kept.
//!   - Transparent huge pages for the structure and the keys (the bench
//!     binary run with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, which
//!     backed 10-20 MiB of it with 2 MiB pages, against the default 4 KiB
//!     pages; the VM's page walks are two-dimensional, so TLB misses were a
//!     suspect): 8 interleaved pairs of whole `--summary` runs, median
//!     ratio single / batched, acl1_10k 0.99 / 1.01, acl2_10k 1.00 / 0.96,
//!     fw1_10k 0.98 / 1.02, ipc1_10k 1.00 / 1.00. TLB misses are not
//!     where the time goes; not pursued.
//! - Earlier, before this round: walks without branches, nodes with fifteen
//!   children, leaves naming shared entries instead of holding copies,
//!   capped root tables, other split scores, batches of 4 or 16, prefetching
//!   the next batch and touching each lane's first leaf entry.
//!
//! ## The same VM, a faster host (2026-12-05, night)
//!
//! Four whole `--summary` runs (21:29-21:32 UTC) of the code above,
//! unchanged since the root-table rule: single / batched lookups per
//! second acl1_10k 31.6-31.7M / 41.3-42.5M, acl2_10k 44.6-45.0M /
//! 40.2-41.1M, fw1_10k 73.1-75.3M / 68.4-69.7M, ipc1_10k 34.2-34.7M /
//! 35.3-36.5M; the 1k sets acl1 52.4M, fw1 52.8M, ipc1 40.2M single;
//! builds 6-69 ms, memory at most 3.14 MB. Every set ran 12-15% faster
//! than in the runs above, a few hours earlier, on the same code: the
//! host's speed, not a change. So 30M/s single is met on every 10k set in
//! these runs (acl1_10k by 5%), where the slower runs left acl1_10k at
//! 92-94% of it.
//!
//! # Bounded building
//!
//! Replication, depth, leaf size, memory and build work all have caps
//! ([`BuildLimits`]). A build first tries the CutSplit groups (after one
//! tree, for a small set), then a finer partition that also separates by
//! ports, then larger leaves; if no strategy fits the caps it returns
//! [`BuildError::TooComplex`] instead of growing without bound. The work
//! cap bounds build time even on sets designed to defeat every strategy.

use super::{Address, Entry, Key, RuleId};

/// Why a classifier could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BuildError {
    #[error("too many classifier entries: {count} (limit {limit})")]
    TooManyEntries { count: usize, limit: usize },
    #[error(
        "the rule set is too complex to compile within {memory_limit} bytes and a \
         worst-case leaf of {max_leaf} entries; simplify overlapping rules or raise the limits"
    )]
    TooComplex {
        memory_limit: usize,
        max_leaf: usize,
    },
}

/// Root tables of at most this many bits stand in for larger ones that
/// leave long lists (see `Builder::choose_root`).
const SMALL_ROOT_BITS: u32 = 12;
/// The longest average list a key may meet after a root table before a
/// smaller table is chosen instead.
const ROOT_LIST_MAX: u64 = 32;
/// Trees of fewer entries keep their larger tables (fw1_1k's tree of 405
/// entries measured 3% slower with the smaller one).
const SMALL_ROOT_MIN_ENTRIES: usize = 1024;

/// Most entries one family's classifier accepts.
pub const MAX_ENTRIES: usize = 1 << 22;

/// Caps that keep building bounded on any rule set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildLimits {
    /// Most bytes the compiled structure may occupy.
    pub max_memory_bytes: usize,
    /// Most entries a leaf may hold in the last-resort strategy; the worst
    /// lookup scans at most this many entries per tree.
    pub max_leaf: usize,
    /// Most internal nodes on any root-to-leaf path.
    pub max_depth: usize,
    /// Most rule-list items the builder may process in all, summed over
    /// strategies tried; bounds build time.
    pub max_work: u64,
}

impl Default for BuildLimits {
    fn default() -> Self {
        BuildLimits {
            max_memory_bytes: 32 << 20,
            max_leaf: 32,
            max_depth: 24,
            max_work: 1_000_000_000,
        }
    }
}

/// Figures about a built classifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClassifierStats {
    /// Number of decision trees.
    pub trees: usize,
    /// Internal and leaf nodes in all trees.
    pub nodes: usize,
    /// Entry copies held in leaves (replication included).
    pub leaf_entries: usize,
    /// Deepest root-to-leaf path (internal nodes) in any tree.
    pub max_depth: usize,
    /// Largest leaf in any tree.
    pub max_leaf: usize,
    /// Upper bound on the steps of one lookup: summed over trees, the largest
    /// internal nodes + leaf entries on any path.
    pub worst_case_steps: usize,
    /// Target leaf size of the strategy that was used.
    pub leaf_target: usize,
    /// Bytes of the compiled structure.
    pub memory_bytes: usize,
    /// Work units the build used, over every strategy tried (compare
    /// [`BuildLimits::max_work`]).
    pub build_work: u64,
}

const DIMS: usize = 5;
/// Most children of an internal node (six thresholds and seven child
/// references fit one cache line with the node's other fields for IPv4).
const FANOUT: usize = 7;
/// Keys a batched lookup walks in lockstep.
const BATCH: usize = 8;
/// Leaf entries (256 KiB of them for IPv4) from which a batched lookup
/// loads its lanes' first leaf entries ahead of their scans.
const TOUCH_LEAVES_MIN: usize = 8192;
/// A set of trees, bit `t` for tree `t` in lookup order.
type TreeMask = u16;
/// Every tree.
const ALL_TREES: TreeMask = TreeMask::MAX;
/// Most trees a classifier has (one per partition group).
const MAX_TREES: usize = TreeMask::BITS as usize;

/// The mask of trees `0..n` (`n` at most [`MAX_TREES`]).
fn first_trees(n: usize) -> TreeMask {
    (u32::from(ALL_TREES) >> (MAX_TREES - n)) as TreeMask
}
/// Most better overlapping entries of one later tree that a leaf entry's
/// copies test against their clipped boxes (see `Builder::link_trees`).
const LINKS_LISTED: usize = 64;

/// A leaf's entries (`start..end` in its tree's leaf entries) and region,
/// kept while building to link the trees.
struct LeafRegion<A> {
    start: usize,
    end: usize,
    region: Rect<A>,
}

/// A box or a region: inclusive bounds per dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rect<A> {
    lo: [A; DIMS],
    hi: [A; DIMS],
}

impl<A: Address> Rect<A> {
    fn of(e: &Entry<A>) -> Self {
        let f = &e.fields;
        Rect {
            lo: [
                f.src.lo,
                f.dst.lo,
                A::from(f.src_port.lo),
                A::from(f.dst_port.lo),
                A::from(u16::from(f.proto.lo)),
            ],
            hi: [
                f.src.hi,
                f.dst.hi,
                A::from(f.src_port.hi),
                A::from(f.dst_port.hi),
                A::from(u16::from(f.proto.hi)),
            ],
        }
    }

    fn universe() -> Self {
        Rect {
            lo: [A::MIN, A::MIN, A::from(0), A::from(0), A::from(0)],
            hi: [
                A::MAX,
                A::MAX,
                A::from(u16::MAX),
                A::from(u16::MAX),
                A::from(u16::from(u8::MAX)),
            ],
        }
    }

    fn covers(&self, other: &Self) -> bool {
        (0..DIMS).all(|d| self.lo[d] <= other.lo[d] && other.hi[d] <= self.hi[d])
    }

    fn overlaps(&self, other: &Self) -> bool {
        (0..DIMS).all(|d| self.lo[d] <= other.hi[d] && other.lo[d] <= self.hi[d])
    }

    fn clip(&self, region: &Self) -> Self {
        let mut r = *self;
        for d in 0..DIMS {
            r.lo[d] = r.lo[d].max(region.lo[d]);
            r.hi[d] = r.hi[d].min(region.hi[d]);
        }
        r
    }
}

/// A reference to a child: an internal node's index, or (with [`LEAF`]
/// set) a leaf's entries, `len` of them from `start`, packed as
/// `LEAF | len << LEAF_LEN_SHIFT | start`. A parent names its leaves
/// directly, so reaching a leaf costs no load of its own: the walk goes from
/// the last internal node straight to the entries.
type Ref = u32;
/// Marks a [`Ref`] to a leaf.
const LEAF: Ref = 1 << 31;
/// Where a leaf reference keeps its length (7 bits).
const LEAF_LEN_SHIFT: u32 = 24;
/// Most entries a leaf reference can name.
const LEAF_LEN_MAX: usize = (1 << (31 - LEAF_LEN_SHIFT)) - 1;
/// Most leaf entries (of a tree) a leaf reference can start at.
const LEAF_START_MAX: usize = 1 << LEAF_LEN_SHIFT;
/// The empty leaf: matches nothing.
const EMPTY: Ref = LEAF;
/// Where a reference to an internal node keeps the node's dimension, so
/// that a step can fetch the key's value in that dimension while the node
/// itself is still being loaded.
const NODE_DIM_SHIFT: u32 = 28;
/// Most internal nodes a tree can have.
const NODE_INDEX_MAX: usize = 1 << NODE_DIM_SHIFT;

fn node_ref(index: usize, dim: usize) -> Ref {
    debug_assert!(index < NODE_INDEX_MAX && dim < DIMS);
    (dim as u32) << NODE_DIM_SHIFT | index as u32
}

fn leaf_ref(start: usize, len: usize) -> Ref {
    debug_assert!(len <= LEAF_LEN_MAX && start + len <= LEAF_START_MAX);
    LEAF | (len as u32) << LEAF_LEN_SHIFT | start as u32
}

/// The entry range `start..end` a leaf reference names.
#[inline(always)]
fn leaf_range(r: Ref) -> (usize, usize) {
    let start = (r & ((1 << LEAF_LEN_SHIFT) - 1)) as usize;
    let len = ((r & !LEAF) >> LEAF_LEN_SHIFT) as usize;
    (start, start + len)
}

/// An internal node of a tree: the first `len` thresholds are in use (the
/// rest hold `A::MAX`), and `children[..=len]` are the references of the
/// `len + 1` parts (the rest repeat the last). Thresholds and children are
/// inline and fixed in number so that a step is one cache-line load (for
/// IPv4) and a branch-free count. The node's dimension is kept in the
/// references to it (see [`node_ref`]).
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
struct Node<A> {
    thresholds: [A; FANOUT - 1],
    children: [Ref; FANOUT],
    /// The smallest entry index (best priority) anywhere below this node: a
    /// lookup that already holds a better match stops here.
    min_priority: u32,
    len: u8,
}

impl<A: Address> Node<A> {
    /// The reference of the child holding `v`, the key's value in the
    /// node's dimension.
    #[inline(always)]
    fn step(&self, v: A) -> Ref {
        let t = &self.thresholds;
        let c = |i: usize| usize::from(v >= t[i]);
        // Unused thresholds are A::MAX, which a key at A::MAX reaches; the
        // unused children repeat the last one.
        self.children[(c(0) + c(1)) + (c(2) + c(3)) + (c(4) + c(5))]
    }

    /// [`step`](Self::step) in fewer instructions but a longer chain of
    /// dependent ones (a vector compare and a count): better where many
    /// keys step at once and throughput, not latency, counts.
    #[inline(always)]
    fn step_wide(&self, v: A) -> Ref {
        let mut idx = 0usize;
        for &t in &self.thresholds {
            idx += usize::from(v >= t);
        }
        self.children[idx.min(FANOUT - 1)]
    }
}

/// One entry copy in a leaf: the entry's box in the fields' own widths and
/// its priority. Leaves hold copies rather than indices so that a leaf scan
/// reads consecutive memory the node already pointed at, instead of one
/// more dependent load per entry (32 bytes a copy for IPv4).
#[derive(Debug, Clone, Copy)]
struct LeafEntry<A> {
    /// Each range as `[start, width]` (its last value minus its first), so
    /// that a field is tested with one subtraction and one compare.
    src: [A; 2],
    dst: [A; 2],
    src_port: [u16; 2],
    dst_port: [u16; 2],
    priority: u32,
    proto: [u8; 2],
    /// The later trees (bit `t` for tree `t`) that hold an entry with a
    /// better priority overlapping this entry's box: after this entry
    /// matches, only those can still hold an earlier match.
    later: TreeMask,
}

impl<A: Address> LeafEntry<A> {
    fn of(r: &Rect<A>, priority: u32) -> Self {
        // Rect bounds of ports and protocol came from u16 and u8 values.
        let narrow = |v: A| v.low_u32() as u16;
        LeafEntry {
            src: [r.lo[0], r.hi[0] - r.lo[0]],
            dst: [r.lo[1], r.hi[1] - r.lo[1]],
            src_port: [narrow(r.lo[2]), narrow(r.hi[2] - r.lo[2])],
            dst_port: [narrow(r.lo[3]), narrow(r.hi[3] - r.lo[3])],
            priority,
            proto: [narrow(r.lo[4]) as u8, narrow(r.hi[4] - r.lo[4]) as u8],
            later: ALL_TREES,
        }
    }

    #[inline(always)]
    fn contains(&self, k: &Key<A>) -> bool {
        // One subtraction and compare per field (each range is kept as its
        // start and width). The compiler may test them with one branch
        // each, which measured faster than one branch-free test of all.
        (k.src.wrapping_sub(self.src[0]) <= self.src[1])
            & (k.dst.wrapping_sub(self.dst[0]) <= self.dst[1])
            & (k.src_port.wrapping_sub(self.src_port[0]) <= self.src_port[1])
            & (k.dst_port.wrapping_sub(self.dst_port[0]) <= self.dst_port[1])
            & (k.proto.wrapping_sub(self.proto[0]) <= self.proto[1])
    }
}

/// Padded to 128 bytes: a lookup finds the next tree to enter from its index
/// (a bit of the trees still to enter), and with the padding its address
/// is a shift instead of a multiply by 120 on the lookup's critical path
/// (without it, walking the trees by their bits measured 5-9% slower on
/// fw1_10k on an Intel Xeon).
#[derive(Debug, Clone)]
#[repr(align(128))]
struct Tree<A> {
    /// Internal nodes; a child's index is above its parent's.
    nodes: Vec<Node<A>>,
    /// Leaf contents: entry copies, ascending priority within a leaf.
    leaves: Vec<LeafEntry<A>>,
    /// The smallest priority of any entry in the tree.
    best_priority: u32,
    /// The most internal nodes on any path below the root table.
    depth: usize,
    /// Where lookups start when there is no root table.
    top: Ref,
    /// A direct-indexed first level, when the entries spread well on a few
    /// top bits of one field.
    root: Option<RootTable>,
}

/// The first level of a tree: the reference to start from, indexed by the top
/// bits of one or two fields (`slots[(a >> shift_a) << bits_b | b >> shift_b]`).
/// It replaces several levels of thresholds with one load; adjacent slots
/// (in one row) with the same entries share a subtree.
#[derive(Debug, Clone)]
struct RootTable {
    /// The slot of a point is `(p[dims[0]] >> shifts[0]) << shifts[2] |
    /// (p[dims[1]] >> shifts[1]) & mask`, precomputed from the shape so
    /// that finding the slot is a few independent operations.
    dims: [usize; 2],
    shifts: [u32; 3],
    mask: u32,
    slots: Vec<u32>,
}

impl RootTable {
    fn new<A: Address>(shape: RootShape, slots: Vec<u32>) -> Self {
        let shift = |f: usize| dim_bits::<A>(shape.dims[f]) - shape.bits[f];
        RootTable {
            dims: shape.dims,
            // With no bits of the second field, its term is masked away.
            shifts: [
                shift(0),
                if shape.bits[1] == 0 { 0 } else { shift(1) },
                shape.bits[1],
            ],
            mask: (1u32 << shape.bits[1]) - 1,
            slots,
        }
    }

    /// The references to start from for many points at once: the
    /// table's shape is read once, not for every point (measured against
    /// [`slot`](Self::slot) per point, batched lookups, median of 9
    /// interleaved rounds in two runs: +2% to +8% on every ClassBench set).
    #[inline(always)]
    fn start_many<A: Address>(&self, points: &[[A; DIMS]], out: &mut [Ref]) {
        let (d0, d1) = (self.dims[0].min(DIMS - 1), self.dims[1].min(DIMS - 1));
        let (s0, s1, s2, mask) = (self.shifts[0], self.shifts[1], self.shifts[2], self.mask);
        let slots = &self.slots[..];
        for (a, p) in out.iter_mut().zip(points) {
            let x = (p[d0] >> s0).low_u32();
            let y = (p[d1] >> s1).low_u32();
            *a = slots[(x << s2 | y & mask) as usize];
        }
    }

    #[inline(always)]
    fn slot<A: Address>(&self, p: &[A; DIMS]) -> usize {
        let a = (p[self.dims[0]] >> self.shifts[0]).low_u32();
        let b = (p[self.dims[1]] >> self.shifts[1]).low_u32();
        (a << self.shifts[2] | b & self.mask) as usize
    }
}

/// Which fields index a root table and by how many top bits each; the
/// second field may use no bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct RootShape {
    dims: [usize; 2],
    bits: [u32; 2],
}

impl RootShape {
    /// The slot range `lo..=hi` of values `lo..=hi` in field `f` (0 or 1).
    #[inline(always)]
    fn span<A: Address>(&self, f: usize, lo: A, hi: A) -> (usize, usize) {
        if self.bits[f] == 0 {
            return (0, 0);
        }
        let shift = dim_bits::<A>(self.dims[f]) - self.bits[f];
        (
            (lo >> shift).low_u32() as usize,
            (hi >> shift).low_u32() as usize,
        )
    }

    /// [`span`](Self::span) from the top 16 bits of each field's ends, as
    /// `top_bits` gives them: the same slots.
    #[inline(always)]
    fn top_span(&self, f: usize, tops: &[u16; 2 * DIMS]) -> (usize, usize) {
        let (d, bits) = (self.dims[f], self.bits[f]);
        if bits == 0 {
            return (0, 0);
        }
        (
            usize::from(tops[2 * d] >> (16 - bits)),
            usize::from(tops[2 * d + 1] >> (16 - bits)),
        )
    }

    fn total_bits(&self) -> u32 {
        self.bits[0] + self.bits[1]
    }

    /// Values of field `f` in slots `first..=last` of that field.
    fn range<A: Address>(&self, f: usize, first: usize, last: usize, region: &mut Rect<A>) {
        let d = self.dims[f];
        if self.bits[f] == 0 {
            return;
        }
        let shift = dim_bits::<A>(d) - self.bits[f];
        // Slot numbers are below 2^16, so they fit a u16.
        region.lo[d] = A::from(first as u16) << shift;
        if last + 1 < 1 << self.bits[f] {
            region.hi[d] = (A::from((last + 1) as u16) << shift) - A::from(1);
        }
    }
}

/// The top 16 bits of each field's ends (lowest, highest; a protocol's 8
/// bits shifted up): every root shape's slots are their top bits.
fn top_bits<A: Address>(r: &Rect<A>) -> [u16; 2 * DIMS] {
    std::array::from_fn(|k| {
        let (d, v) = (k / 2, if k % 2 == 0 { r.lo[k / 2] } else { r.hi[k / 2] });
        match dim_bits::<A>(d) {
            8 => (v.low_u32() as u16) << 8,
            w => (v >> (w - 16)).low_u32() as u16,
        }
    })
}

/// Width in bits of each dimension.
fn dim_bits<A: Address>(d: usize) -> u32 {
    match d {
        0 | 1 => A::BITS,
        2 | 3 => 16,
        _ => 8,
    }
}

impl<A: Address> Tree<A> {
    /// The reference a lookup of `p` starts from.
    #[inline(always)]
    fn start(&self, p: &[A; DIMS]) -> Ref {
        match &self.root {
            Some(r) => r.slots[r.slot(p)],
            None => self.top,
        }
    }

    /// The internal node a (non-leaf) reference names.
    #[inline(always)]
    fn node(&self, r: Ref) -> &Node<A> {
        &self.nodes[(r & (NODE_INDEX_MAX as u32 - 1)) as usize]
    }

    /// The key's value in the dimension of the node `r` names.
    #[inline(always)]
    fn value(r: Ref, p: &[A; DIMS]) -> A {
        p[((r >> NODE_DIM_SHIFT) as usize).min(DIMS - 1)]
    }

    /// The first entry in the tree containing the key (`k`, and `p` as a
    /// point) when its priority is below `bound`.
    #[inline(always)]
    fn lookup(&self, k: &Key<A>, p: &[A; DIMS], bound: u32) -> Option<&LeafEntry<A>> {
        let mut at = self.start(p);
        while at & LEAF == 0 {
            let v = Self::value(at, p);
            let node = self.node(at);
            if node.min_priority >= bound {
                return None;
            }
            at = node.step(v);
        }
        self.leaf_match(at, k, bound)
    }

    /// [`lookup`](Self::lookup) for a key that holds no match yet: no
    /// priority checks.
    #[inline(always)]
    fn lookup_first(&self, k: &Key<A>, p: &[A; DIMS]) -> Option<&LeafEntry<A>> {
        let mut at = self.start(p);
        while at & LEAF == 0 {
            at = self.node(at).step(Self::value(at, p));
        }
        let (start, end) = leaf_range(at);
        self.leaves[start..end].iter().find(|e| e.contains(k))
    }

    /// The first entry of the leaf `leaf` containing `k`, when its priority
    /// is below `bound`. (A branch-free scan of the whole leaf measured
    /// slower than stopping at the first match.)
    #[inline(always)]
    fn leaf_match(&self, leaf: Ref, k: &Key<A>, bound: u32) -> Option<&LeafEntry<A>> {
        let (start, end) = leaf_range(leaf);
        self.leaves[start..end]
            .iter()
            .take_while(|e| e.priority < bound)
            .find(|e| e.contains(k))
    }

    fn memory_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.nodes.len() * std::mem::size_of::<Node<A>>()
            + self.leaves.len() * std::mem::size_of::<LeafEntry<A>>()
            + self
                .root
                .as_ref()
                .map_or(0, |r| r.slots.len() * std::mem::size_of::<u32>())
    }
}

/// The compiled first-match classifier of one address family.
#[derive(Debug, Clone)]
pub struct Classifier<A> {
    /// Trees in ascending order of their best priority.
    trees: Vec<Tree<A>>,
    /// Every tree (bit `t` for tree `t`): where a lookup starts.
    all_trees: TreeMask,
    /// Rules, indexed by priority.
    rules: Vec<RuleId>,
    len: usize,
    stats: ClassifierStats,
}

impl<A: Address> Classifier<A> {
    /// Builds the classifier with the default [`BuildLimits`].
    pub fn build(entries: Vec<Entry<A>>) -> Result<Self, BuildError> {
        Self::build_with(entries, &BuildLimits::default())
    }

    /// Builds the classifier under explicit limits.
    pub fn build_with(entries: Vec<Entry<A>>, limits: &BuildLimits) -> Result<Self, BuildError> {
        if entries.len() > MAX_ENTRIES {
            return Err(BuildError::TooManyEntries {
                count: entries.len(),
                limit: MAX_ENTRIES,
            });
        }
        let rects: Vec<Rect<A>> = entries.iter().map(Rect::of).collect();
        let rules: Vec<RuleId> = entries.iter().map(|e| e.rule).collect();
        let mut work_left = limits.max_work;
        // A small set gets one tree over everything first: it is a few
        // levels deep at most, and walking several groups' trees costs more.
        let single = (entries.len() <= SINGLE_TREE_MAX).then_some(Strategy {
            partition: Partition::Single,
            leaf: STRATEGIES[0].leaf,
        });
        // The groups and leaf target of the strategy that last failed.
        let mut failed: Option<(Vec<Vec<u32>>, usize)> = None;
        for strategy in single.into_iter().chain(STRATEGIES) {
            if strategy.leaf > limits.max_leaf.max(1) {
                continue;
            }
            let mut groups = partition(&rects, strategy.partition);
            // Trees are looked up in order of their best priority; sorting
            // the groups first lets each tree's leaves know the later trees.
            groups.sort_by_key(|g| g.first().copied().unwrap_or(u32::MAX));
            // A partition that groups the entries as the one that just
            // failed would fail the same way (when all of a set's entries
            // are wide in one field, say): not built twice.
            if failed.as_ref() == Some(&(groups.clone(), strategy.leaf)) {
                continue;
            }
            let shared = rules.len() * std::mem::size_of::<RuleId>();
            let mut builder = Builder {
                rects: &rects,
                limits,
                leaf_target: strategy.leaf,
                memory_left: limits.max_memory_bytes.saturating_sub(shared),
                work_left,
                stats: ClassifierStats {
                    leaf_target: strategy.leaf,
                    ..ClassifierStats::default()
                },
            };
            let built = groups
                .iter()
                .map(|g| builder.tree(g.clone()))
                .collect::<Option<Vec<_>>>();
            if let Some(built) = built {
                let (mut trees, regions): (Vec<_>, Vec<_>) = built.into_iter().unzip();
                builder.link_trees(&mut trees, &groups, &regions);
                work_left = builder.work_left;
                let mut stats = builder.stats;
                stats.trees = trees.len();
                stats.build_work = limits.max_work - work_left;
                stats.memory_bytes = std::mem::size_of::<Self>()
                    + rules.len() * std::mem::size_of::<RuleId>()
                    + trees.iter().map(Tree::memory_bytes).sum::<usize>();
                return Ok(Classifier {
                    all_trees: first_trees(trees.len()),
                    trees,
                    rules,
                    len: entries.len(),
                    stats,
                });
            }
            work_left = builder.work_left;
            if work_left == 0 {
                break;
            }
            failed = Some((groups, strategy.leaf));
        }
        Err(BuildError::TooComplex {
            memory_limit: limits.max_memory_bytes,
            max_leaf: limits.max_leaf,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of the compiled structure.
    pub fn memory_bytes(&self) -> usize {
        self.stats.memory_bytes
    }

    /// Shape and bounds of the compiled structure.
    pub fn stats(&self) -> ClassifierStats {
        self.stats
    }

    /// The rule of the first entry, in priority order, that contains `key`.
    ///
    /// The first tree is walked without priority checks, since nothing is
    /// matched before it (measured on an Intel Xeon with a quiet host,
    /// whole `--summary` runs: single lookups +3% on acl1_10k, +5% on
    /// ipc1_10k, +6% to +7% on acl2_10k and fw1_10k, +18% on acl1_1k).
    #[inline(always)]
    pub fn lookup(&self, key: &Key<A>) -> Option<RuleId> {
        let p = point(key);
        let first = self.trees.first()?;
        let (best, todo) = match first.lookup_first(key, &p) {
            Some(e) => (e.priority, e.later & self.all_trees & !1),
            None => (u32::MAX, self.all_trees & !1),
        };
        let best = self.enter_trees(key, &p, best, todo);
        self.rules.get(best as usize).copied()
    }

    /// Enters the trees in `todo`, lowest first, for the key (`key`, and
    /// `p` as a point) that holds a match of priority `best` so far (or
    /// `u32::MAX`), and returns the best priority found: every tree until
    /// a match, then only the later ones its entry names (only trees whose
    /// best priority beats it, see `Builder::link_trees`). Going by the set
    /// bits costs one branch per tree entered instead of a few per tree
    /// passed over (measured on an Intel Xeon, interleaved in one process:
    /// +5% to +9% on acl2_10k and ipc1_10k, +1% to +3% on acl1_10k and
    /// fw1_10k).
    #[inline(always)]
    fn enter_trees(&self, key: &Key<A>, p: &[A; DIMS], mut best: u32, mut todo: TreeMask) -> u32 {
        while todo != 0 {
            let t = todo.trailing_zeros() as usize;
            todo &= todo - 1;
            if let Some(e) = self.trees[t].lookup(key, p, best) {
                best = e.priority;
                todo &= e.later;
            }
        }
        best
    }

    /// [`lookup`](Self::lookup), also counting its steps the way
    /// [`ClassifierStats::worst_case_steps`] bounds them: root-table loads,
    /// internal nodes and leaf entries examined, summed over the trees it
    /// enters. For tests and analysis (the bound must hold for every key);
    /// it walks the same path as `lookup`, with the same pruning.
    pub fn lookup_steps(&self, key: &Key<A>) -> (Option<RuleId>, usize) {
        let p = point(key);
        let mut best = u32::MAX;
        let mut steps = 0;
        let mut todo = self.all_trees;
        'trees: while todo != 0 {
            let t = todo.trailing_zeros() as usize;
            todo &= todo - 1;
            let tree = &self.trees[t];
            steps += usize::from(tree.root.is_some());
            let mut at = tree.start(&p);
            while at & LEAF == 0 {
                let node = tree.node(at);
                if node.min_priority >= best {
                    continue 'trees;
                }
                steps += 1;
                at = node.step(Tree::value(at, &p));
            }
            let (start, end) = leaf_range(at);
            for e in &tree.leaves[start..end] {
                if e.priority >= best {
                    break;
                }
                steps += 1;
                if e.contains(key) {
                    best = e.priority;
                    todo &= e.later;
                    break;
                }
            }
        }
        (self.rules.get(best as usize).copied(), steps)
    }

    /// Classifies many keys at once: `out[i]` gets the rule of `keys[i]`, the
    /// same answer [`lookup`](Self::lookup) gives. Keys are walked in groups
    /// that step through the first tree in lockstep, so the memory accesses
    /// of different keys overlap instead of waiting on one another (as
    /// DPDK's ACL classifies a burst); the few that want a later tree go on
    /// one by one. Only `min(keys.len(), out.len())` keys are classified.
    pub fn lookup_batch(&self, keys: &[Key<A>], out: &mut [Option<RuleId>]) {
        for (keys, out) in keys.chunks(BATCH).zip(out.chunks_mut(BATCH)) {
            self.lookup_group(keys, out);
        }
    }

    #[inline(always)]
    fn lookup_group(&self, keys: &[Key<A>], out: &mut [Option<RuleId>]) {
        let n = keys.len().min(out.len()).min(BATCH);
        let Some(first) = self.trees.first() else {
            out[..n].fill(None);
            return;
        };
        let mut points = [[A::MIN; DIMS]; BATCH];
        for (p, k) in points.iter_mut().zip(&keys[..n]) {
            *p = point(k);
        }
        let mut best = [u32::MAX; BATCH];
        let mut todo = [ALL_TREES; BATCH];
        Lanes {
            n,
            keys,
            points: &points,
            best: &mut best,
            todo: &mut todo,
        }
        .walk_first(first);
        // The later trees key by key, as a single lookup goes on: few keys
        // want any (1.28 trees entered per key on ipc1_10k, 1.49 on
        // acl2_10k), and walking them in lockstep cost more in passes over
        // the lanes than it saved in overlapped loads.
        for j in 0..n {
            let later = todo[j] & self.all_trees & !1;
            let b = self.enter_trees(&keys[j], &points[j], best[j], later);
            out[j] = self.rules.get(b as usize).copied();
        }
    }
}

/// The keys of a batched lookup and what each has matched so far.
struct Lanes<'a, A> {
    n: usize,
    keys: &'a [Key<A>],
    points: &'a [[A; DIMS]; BATCH],
    best: &'a mut [u32; BATCH],
    todo: &'a mut [TreeMask; BATCH],
}

impl<A: Address> Lanes<'_, A> {
    /// Walks every lane through the first tree in lockstep. No lane holds
    /// a match yet, so there are no priority checks (a batch is bound by
    /// instructions more than by memory).
    #[inline(always)]
    fn walk_first(&mut self, tree: &Tree<A>) {
        let n = self.n;
        let mut at = [EMPTY; BATCH];
        match &tree.root {
            Some(r) => r.start_many(&self.points[..n], &mut at[..n]),
            None => at[..n].fill(tree.top),
        }
        // Every lane still at an internal node takes one step per round,
        // so the loads of different lanes overlap; stop once every lane
        // is at a leaf.
        for _ in 0..tree.depth {
            let mut moving = false;
            for (a, p) in at[..n].iter_mut().zip(self.points) {
                if *a & LEAF == 0 {
                    *a = tree.node(*a).step_wide(Tree::value(*a, p));
                    moving = true;
                }
            }
            if !moving {
                break;
            }
        }
        // Where the leaves are too large to stay in the core's caches,
        // load every lane's first leaf entry before any lane's scan, so
        // that those misses overlap instead of each waiting on the scan
        // before it (whose exit is a mispredicted branch). Where they fit,
        // the extra loads are pure cost (see the module docs).
        if tree.leaves.len() >= TOUCH_LEAVES_MIN {
            let mut touched = 0;
            for &leaf in &at[..n] {
                touched ^= tree
                    .leaves
                    .get(leaf_range(leaf).0)
                    .map_or(0, |e| e.priority);
            }
            std::hint::black_box(touched);
        }
        for (j, &leaf) in at[..n].iter().enumerate() {
            let (start, end) = leaf_range(leaf);
            if let Some(e) = tree.leaves[start..end]
                .iter()
                .find(|e| e.contains(&self.keys[j]))
            {
                self.best[j] = e.priority;
                self.todo[j] = e.later;
            }
        }
    }
}

/// A key as a point of the five-dimensional space.
#[inline(always)]
fn point<A: Address>(key: &Key<A>) -> [A; DIMS] {
    [
        key.src,
        key.dst,
        A::from(key.src_port),
        A::from(key.dst_port),
        A::from(u16::from(key.proto)),
    ]
}

/// How entries are grouped into trees.
#[derive(Debug, Clone, Copy)]
enum Partition {
    /// One tree for everything (small sets only, see [`SINGLE_TREE_MAX`]).
    Single,
    /// By whether the source and destination ranges are small.
    Addresses,
    /// By whether addresses and ports are small.
    AddressesAndPorts,
}

#[derive(Debug, Clone, Copy)]
struct Strategy {
    partition: Partition,
    leaf: usize,
}

/// Most entries for which one tree over everything is tried before the
/// CutSplit groups. (Measured on the first 60 rules of the ClassBench 1k
/// sets: one tree 10-40% faster; at 200 rules and above the groups are as
/// fast or faster: see the module docs.)
const SINGLE_TREE_MAX: usize = 128;

/// Tried in order: fastest lookups first, smallest structures last. (One
/// tree over everything was tried first until it measured slower than the
/// CutSplit groups on every ClassBench set it fitted, except small ones:
/// see [`SINGLE_TREE_MAX`].)
const STRATEGIES: [Strategy; 5] = [
    Strategy {
        partition: Partition::Addresses,
        leaf: 8,
    },
    Strategy {
        partition: Partition::AddressesAndPorts,
        leaf: 8,
    },
    Strategy {
        partition: Partition::AddressesAndPorts,
        leaf: 16,
    },
    Strategy {
        partition: Partition::AddressesAndPorts,
        leaf: 32,
    },
    Strategy {
        partition: Partition::AddressesAndPorts,
        leaf: 64,
    },
];

/// Splits entry indices into groups, each in priority order.
fn partition<A: Address>(rects: &[Rect<A>], how: Partition) -> Vec<Vec<u32>> {
    // "Small" address range: at most 2^(BITS/2) addresses (a /16 or longer
    // prefix in IPv4, a /64 or longer in IPv6). Small port range: at most
    // 1024 ports.
    let addr_small = |lo: A, hi: A| {
        let width = hi - lo;
        width < (A::MAX >> (A::BITS / 2))
    };
    let port_small = |lo: A, hi: A| hi - lo < A::from(1024);
    let class = |r: &Rect<A>| -> usize {
        match how {
            // Entries small in both addresses join the small-source tree
            // (CutSplit); entries wide in both addresses are split again
            // by their ports, where their overlap would otherwise explode.
            Partition::Single => 0,
            Partition::Addresses => {
                if addr_small(r.lo[0], r.hi[0]) {
                    1
                } else if addr_small(r.lo[1], r.hi[1]) {
                    2
                } else if port_small(r.lo[3], r.hi[3]) {
                    3
                } else if port_small(r.lo[2], r.hi[2]) {
                    4
                } else {
                    0
                }
            }
            Partition::AddressesAndPorts => {
                usize::from(addr_small(r.lo[0], r.hi[0]))
                    | usize::from(addr_small(r.lo[1], r.hi[1])) << 1
                    | usize::from(port_small(r.lo[2], r.hi[2])) << 2
                    | usize::from(port_small(r.lo[3], r.hi[3])) << 3
            }
        }
    };
    let mut groups: Vec<Vec<u32>> = vec![Vec::new(); MAX_TREES];
    for (i, r) in rects.iter().enumerate() {
        groups[class(r)].push(i as u32);
    }
    groups.retain(|g| !g.is_empty());
    if groups.is_empty() {
        groups.push(Vec::new());
    }
    groups
}

/// Where the reference of a finished node or leaf goes.
#[derive(Debug, Clone, Copy)]
enum Dest {
    /// The tree's start, when it has no root table.
    Top,
    /// Root-table slots `.0..=.1`.
    Table(usize, usize),
    /// Child `.1` of internal node `.0`.
    Child(usize, usize),
}

/// A node still to be built.
struct Pending<A> {
    dest: Dest,
    region: Rect<A>,
    ids: Vec<u32>,
    depth: usize,
}

struct Builder<'a, A> {
    rects: &'a [Rect<A>],
    limits: &'a BuildLimits,
    leaf_target: usize,
    memory_left: usize,
    work_left: u64,
    stats: ClassifierStats,
}

/// A chosen cut: dimension, thresholds (each the first value of a child
/// after the first), and the resulting (max child size, summed child sizes).
struct Cut<A> {
    dim: usize,
    thresholds: Vec<A>,
    score: (usize, usize),
}

impl<A: Address> Builder<'_, A> {
    /// Charges `items` units of work; false when the budget is spent.
    fn charge_work(&mut self, items: usize) -> bool {
        let items = items as u64;
        if items > self.work_left {
            self.work_left = 0;
            return false;
        }
        self.work_left -= items;
        true
    }

    fn charge_memory(&mut self, bytes: usize) -> bool {
        if bytes > self.memory_left {
            return false;
        }
        self.memory_left -= bytes;
        true
    }

    /// Sets each leaf entry's [`LeafEntry::later`]: the later trees holding
    /// an entry with a better priority that overlaps the entry's box
    /// clipped to its leaf's region (a key that matches the copy lies in
    /// both). `groups[t]` lists tree `t`'s entries in priority order and
    /// `regions[t]` its leaves. First, per entry, the better entries of
    /// later trees that overlap its whole box are listed (a tree with more
    /// than [`LINKS_LISTED`], or more than are left of eight per entry in
    /// all, is always entered after the entry); then each
    /// copy tests the listed ones against its clipped box. The tests have
    /// their own budget (64 per entry, at least 2^25, at most what is left
    /// of the build's work cap) so that a large set cannot spend the whole
    /// cap here; once it runs out the remaining copies keep every later
    /// tree, which is always safe.
    fn link_trees(
        &mut self,
        trees: &mut [Tree<A>],
        groups: &[Vec<u32>],
        regions: &[Vec<LeafRegion<A>>],
    ) {
        let n = self.rects.len();
        let mut always = vec![ALL_TREES; n];
        let mut overlapping: Vec<Vec<u32>> = vec![Vec::new(); n];
        let mut tree_of = vec![0u8; n];
        for (t, group) in groups.iter().enumerate() {
            for &i in group {
                tree_of[i as usize] = t as u8;
            }
        }
        let budget = (n as u64 * 64).max(1 << 25).min(self.work_left);
        let mut left = budget;
        // The lists, all together, hold at most 8 entries per entry.
        let mut room = 8 * n;
        'all: for (t, group) in groups.iter().enumerate() {
            for &i in group {
                let r = &self.rects[i as usize];
                let mut wide: TreeMask = 0;
                let mut list = Vec::new();
                for (u, other) in groups.iter().enumerate().skip(t + 1) {
                    let better = other.partition_point(|&j| j < i);
                    let Some(rest) = left.checked_sub(better as u64) else {
                        break 'all;
                    };
                    left = rest;
                    let before = list.len();
                    list.extend(
                        other[..better]
                            .iter()
                            .copied()
                            .filter(|&j| self.rects[j as usize].overlaps(r)),
                    );
                    let listed = list.len() - before;
                    if listed > LINKS_LISTED.min(room) {
                        list.truncate(before);
                        wide |= 1 << u;
                    } else {
                        room -= listed;
                    }
                }
                always[i as usize] = wide;
                overlapping[i as usize] = list;
            }
        }
        'copies: for (tree, regions) in trees.iter_mut().zip(regions) {
            for leaf in regions {
                for e in &mut tree.leaves[leaf.start..leaf.end] {
                    let i = e.priority as usize;
                    let Some(rest) = left.checked_sub(overlapping[i].len() as u64) else {
                        break 'copies;
                    };
                    left = rest;
                    let clipped = self.rects[i].clip(&leaf.region);
                    e.later = overlapping[i]
                        .iter()
                        .filter(|&&j| self.rects[j as usize].overlaps(&clipped))
                        .fold(always[i], |m, &j| m | 1 << tree_of[j as usize]);
                }
            }
        }
        self.work_left -= budget - left;
        // Where the work cap cut the lists short an entry names every
        // tree, but it never needs one whose best priority does not beat
        // its own (the trees are in order of best priority). Lookups do not
        // test a tree's best priority before entering it (a tree that
        // cannot win is left at its first node or leaf entry), so such
        // trees are taken out here.
        let best: Vec<u32> = trees.iter().map(|t| t.best_priority).collect();
        for tree in trees.iter_mut() {
            for e in &mut tree.leaves {
                let beating = best.partition_point(|&b| b < e.priority);
                e.later &= first_trees(beating);
            }
        }
    }

    /// Builds one tree over `ids` (priority order); `None` when a limit was
    /// hit.
    fn tree(&mut self, ids: Vec<u32>) -> Option<(Tree<A>, Vec<LeafRegion<A>>)> {
        let mut regions = Vec::new();
        let mut tree = Tree {
            nodes: Vec::new(),
            leaves: Vec::new(),
            best_priority: ids.first().copied().unwrap_or(u32::MAX),
            depth: 0,
            top: EMPTY,
            root: None,
        };
        if !self.charge_memory(std::mem::size_of::<Tree<A>>()) {
            return None;
        }
        let mut worst_steps = 0;
        let universe = Rect::universe();
        let ids = self.prune(&universe, ids);
        let mut stack = Vec::new();
        let mut table: Vec<Ref> = Vec::new();
        let shape = self.choose_root(&ids);
        match shape {
            None => stack.push(Pending {
                dest: Dest::Top,
                region: universe,
                ids,
                depth: 0,
            }),
            Some(shape) => {
                let slots = 1usize << shape.total_bits();
                if !self.charge_memory(slots * std::mem::size_of::<Ref>()) {
                    return None;
                }
                let mut lists: Vec<Vec<u32>> = vec![Vec::new(); slots];
                for &i in &ids {
                    let r = &self.rects[i as usize];
                    let (a0, a1) = shape.span(0, r.lo[shape.dims[0]], r.hi[shape.dims[0]]);
                    let (b0, b1) = shape.span(1, r.lo[shape.dims[1]], r.hi[shape.dims[1]]);
                    for a in a0..=a1 {
                        for list in
                            &mut lists[(a << shape.bits[1] | b0)..=(a << shape.bits[1] | b1)]
                        {
                            list.push(i);
                        }
                    }
                }
                table = vec![EMPTY; slots];
                let row = 1usize << shape.bits[1];
                let mut b = 0;
                while b < slots {
                    // A run of equal slots stays within one row, so that its
                    // region is a box.
                    let mut e = b;
                    while e + 1 < slots && (e + 1) % row != 0 && lists[e + 1] == lists[b] {
                        e += 1;
                    }
                    if shape.bits[1] == 0 {
                        while e + 1 < slots && lists[e + 1] == lists[b] {
                            e += 1;
                        }
                    }
                    let mut region = universe;
                    if shape.bits[1] == 0 {
                        shape.range(0, b, e, &mut region);
                    } else {
                        shape.range(0, b / row, b / row, &mut region);
                        shape.range(1, b % row, e % row, &mut region);
                    }
                    stack.push(Pending {
                        dest: Dest::Table(b, e),
                        region,
                        ids: std::mem::take(&mut lists[b]),
                        depth: 0,
                    });
                    b = e + 1;
                }
                worst_steps = 1;
            }
        }
        let table_step = worst_steps;
        while let Some(Pending {
            dest,
            region,
            ids,
            depth,
        }) = stack.pop()
        {
            // Pruning and scoring a cut scan the list once per dimension and
            // child.
            if !self.charge_work(ids.len() * DIMS * (FANOUT + 1)) {
                return None;
            }
            let ids = self.prune(&region, ids);
            let cut = if ids.len() <= self.leaf_target || depth >= self.limits.max_depth {
                None
            } else {
                self.choose_cut(&region, &ids)
            };
            let made = match cut {
                None => {
                    if ids.len() > self.limits.max_leaf.clamp(1, LEAF_LEN_MAX)
                        || tree.leaves.len() + ids.len() > LEAF_START_MAX
                    {
                        return None;
                    }
                    let bytes = ids.len() * std::mem::size_of::<LeafEntry<A>>();
                    if !self.charge_memory(bytes) {
                        return None;
                    }
                    let leaf = leaf_ref(tree.leaves.len(), ids.len());
                    regions.push(LeafRegion {
                        start: tree.leaves.len(),
                        end: tree.leaves.len() + ids.len(),
                        region,
                    });
                    tree.leaves.extend(
                        ids.iter()
                            .map(|&i| LeafEntry::of(&self.rects[i as usize], i)),
                    );
                    worst_steps = worst_steps.max(table_step + depth + ids.len());
                    tree.depth = tree.depth.max(depth);
                    self.stats.nodes += 1;
                    self.stats.max_depth = self.stats.max_depth.max(depth);
                    self.stats.max_leaf = self.stats.max_leaf.max(ids.len());
                    self.stats.leaf_entries += ids.len();
                    leaf
                }
                Some(cut) => {
                    if !self.charge_memory(std::mem::size_of::<Node<A>>())
                        || tree.nodes.len() >= NODE_INDEX_MAX
                    {
                        return None;
                    }
                    let index = tree.nodes.len();
                    let mut thresholds = [A::MAX; FANOUT - 1];
                    thresholds[..cut.thresholds.len()].copy_from_slice(&cut.thresholds);
                    tree.nodes.push(Node {
                        thresholds,
                        children: [EMPTY; FANOUT],
                        min_priority: u32::MAX,
                        len: cut.thresholds.len() as u8,
                    });
                    self.stats.nodes += 1;
                    let children = cut.thresholds.len() + 1;
                    let d = cut.dim;
                    for c in (0..children).rev() {
                        let mut sub = region;
                        if c > 0 {
                            sub.lo[d] = cut.thresholds[c - 1];
                        }
                        if c + 1 < children {
                            sub.hi[d] = cut.thresholds[c] - A::from(1);
                        }
                        let sub_ids: Vec<u32> = ids
                            .iter()
                            .copied()
                            .filter(|&i| {
                                let r = &self.rects[i as usize];
                                r.lo[d] <= sub.hi[d] && sub.lo[d] <= r.hi[d]
                            })
                            .collect();
                        stack.push(Pending {
                            dest: Dest::Child(index, c),
                            region: sub,
                            ids: sub_ids,
                            depth: depth + 1,
                        });
                    }
                    node_ref(index, cut.dim)
                }
            };
            match dest {
                Dest::Top => tree.top = made,
                Dest::Table(b, e) => table[b..=e].fill(made),
                Dest::Child(parent, c) => tree.nodes[parent].children[c] = made,
            }
        }
        if let Some(shape) = shape {
            tree.root = Some(RootTable::new::<A>(shape, table));
        }
        // Children come after their parent, so one backward pass sees every
        // child before its parent.
        for i in (0..tree.nodes.len()).rev() {
            let n = tree.nodes[i];
            let min = n.children[..=usize::from(n.len)]
                .iter()
                .map(|&r| {
                    if r & LEAF != 0 {
                        let (start, end) = leaf_range(r);
                        tree.leaves[start..end]
                            .first()
                            .map_or(u32::MAX, |e| e.priority)
                    } else {
                        tree.node(r).min_priority
                    }
                })
                .min()
                .unwrap_or(u32::MAX);
            tree.nodes[i].min_priority = min;
            let last = tree.nodes[i].children[usize::from(n.len)];
            tree.nodes[i].children[usize::from(n.len) + 1..].fill(last);
        }
        // memory_bytes counts lengths; make the allocations match.
        tree.nodes.shrink_to_fit();
        tree.leaves.shrink_to_fit();
        self.stats.worst_case_steps += worst_steps;
        Some((tree, regions))
    }

    /// The fields and numbers of top bits for a root table, when some spread
    /// the entries well: at most eight times as many entry copies as
    /// entries, at most 2^16 slots, and the fullest slot clearly below all
    /// of them. (Three times, as before, kept the protocol out of the
    /// ClassBench ipc1 10k set's first root table; with it the trees below
    /// lose two levels and lookups/s rose by about 10%, acl2's by 5%.) Among those, the smallest fullest slot wins; once the
    /// fullest slot is down to a sixty-fourth of the entries, more bits win
    /// instead, since the typical slot, not only the fullest, then shrinks
    /// and lookups skip tree levels (measured: 5-10% more lookups/s on the
    /// ClassBench acl2 and ipc1 10k sets, whose first trees lose a level or
    /// two). Equal shapes are told apart by the sum of squared slot sizes,
    /// which picked smaller trees there (ipc1's small-destination tree:
    /// 141 nodes instead of 461).
    ///
    /// A table so chosen that still leaves a key a long list (more than
    /// [`ROOT_LIST_MAX`] entries on average, so internal nodes follow it
    /// anyway) gives way to the best of at most [`SMALL_ROOT_BITS`] bits,
    /// in a tree of at least [`SMALL_ROOT_MIN_ENTRIES`]: the table saves
    /// no level there, and a smaller one stays in the cache (see the module
    /// docs, "On an Intel Xeon VM with a quiet host").
    fn choose_root(&mut self, ids: &[u32]) -> Option<RootShape> {
        let n = ids.len();
        if n <= 4 * self.leaf_target {
            return None;
        }
        let mut shapes = Vec::new();
        for d in 0..DIMS {
            for bits in [4u32, 6, 8, 10, 12, 14, 16] {
                shapes.push(RootShape {
                    dims: [d, 0],
                    bits: [bits, 0],
                });
            }
            for e in d + 1..DIMS {
                for b0 in [2u32, 4, 6, 8, 10, 12, 14] {
                    for b1 in [2u32, 4, 6, 8, 10, 12, 14] {
                        shapes.push(RootShape {
                            dims: [d, e],
                            bits: [b0, b1],
                        });
                    }
                }
            }
        }
        // The entries' top bits, read once: their boxes (up to 160 bytes
        // each) are then read once instead of once per shape.
        let tops: Vec<[u16; 2 * DIMS]> = ids
            .iter()
            .map(|&i| top_bits(&self.rects[i as usize]))
            .collect();
        let mut best: Option<((usize, u32, u64), RootShape, usize)> = None;
        let mut small: Option<((usize, u32, u64), RootShape, usize)> = None;
        let enough = n / 64;
        for shape in shapes {
            if shape.bits[0] > dim_bits::<A>(shape.dims[0])
                || shape.bits[1] > dim_bits::<A>(shape.dims[1])
                || shape.total_bits() > 16
            {
                continue;
            }
            let (w0, w1) = (1usize << shape.bits[0], 1usize << shape.bits[1]);
            if !self.charge_work(n + w0 * w1) {
                return None;
            }
            // Two-dimensional difference array of slot counts.
            let stride = w1 + 1;
            let mut diff = vec![0i64; (w0 + 1) * stride];
            let mut copies = 0usize;
            for t in &tops {
                let ((a0, a1), (b0, b1)) = (shape.top_span(0, t), shape.top_span(1, t));
                diff[a0 * stride + b0] += 1;
                diff[a0 * stride + b1 + 1] -= 1;
                diff[(a1 + 1) * stride + b0] -= 1;
                diff[(a1 + 1) * stride + b1 + 1] += 1;
                copies += (a1 - a0 + 1) * (b1 - b0 + 1);
            }
            if copies > 8 * n {
                continue;
            }
            for a in 0..=w0 {
                for b in 1..=w1 {
                    diff[a * stride + b] += diff[a * stride + b - 1];
                }
            }
            for a in 1..=w0 {
                for b in 0..=w1 {
                    diff[a * stride + b] += diff[(a - 1) * stride + b];
                }
            }
            let fullest = diff.iter().copied().max().unwrap_or(0).max(0) as usize;
            if fullest * 4 >= n * 3 {
                continue;
            }
            // Ties: the smallest sum of squared slot sizes, the expected
            // list a key meets when keys follow the entries.
            let spread: u64 = diff.iter().map(|&c| (c.max(0) as u64).pow(2)).sum();
            let score = (fullest.max(enough), u32::MAX - shape.total_bits(), spread);
            if best.is_none_or(|(s, _, _)| score < s) {
                best = Some((score, shape, copies));
            }
            if shape.total_bits() <= SMALL_ROOT_BITS && small.is_none_or(|(s, _, _)| score < s) {
                small = Some((score, shape, copies));
            }
        }
        // The list a key meets after the table: the squared slot sizes over
        // the copies.
        let pick = match (best, small) {
            (Some((s, _, copies)), Some(small))
                if n >= SMALL_ROOT_MIN_ENTRIES && s.2 > ROOT_LIST_MAX * copies.max(1) as u64 =>
            {
                Some(small)
            }
            (best, _) => best,
        };
        pick.map(|(_, shape, _)| shape)
    }

    /// Drops the entries that cannot be the first match anywhere in `region`:
    /// those after an entry covering the whole region and, for short lists,
    /// those covered within the region by an earlier entry.
    fn prune(&self, region: &Rect<A>, ids: Vec<u32>) -> Vec<u32> {
        let mut out: Vec<u32> = Vec::with_capacity(ids.len());
        let small = ids.len() <= 4 * self.leaf_target;
        let mut clipped: Vec<Rect<A>> = Vec::new();
        for i in ids {
            let r = &self.rects[i as usize];
            if small {
                let c = r.clip(region);
                if clipped.iter().any(|e| e.covers(&c)) {
                    continue;
                }
                clipped.push(c);
            }
            out.push(i);
            if r.covers(region) {
                break;
            }
        }
        out
    }

    /// The best multiway cut of `region` for `ids`, or `None` when no
    /// dimension has an endpoint inside the region.
    fn choose_cut(&self, region: &Rect<A>, ids: &[u32]) -> Option<Cut<A>> {
        let n = ids.len();
        let one = A::from(1);
        // Cover cut: when the first entry hides at least half of the others
        // within the region, cut along its edges. The child inside its box
        // then prunes down to it; balanced cuts would instead keep every
        // hidden entry until the box is carved out by chance (a staircase of
        // nested boxes defeats them entirely).
        if let Some(&first) = ids.first() {
            let top = self.rects[first as usize].clip(region);
            let hidden = ids[1..]
                .iter()
                .filter(|&&i| top.covers(&self.rects[i as usize].clip(region)))
                .count();
            if hidden * 2 >= n {
                let open =
                    (0..DIMS).find(|&d| top.lo[d] > region.lo[d] || top.hi[d] < region.hi[d]);
                if let Some(d) = open {
                    let mut thresholds = Vec::with_capacity(2);
                    if top.lo[d] > region.lo[d] {
                        thresholds.push(top.lo[d]);
                    }
                    if top.hi[d] < region.hi[d] {
                        thresholds.push(top.hi[d] + one);
                    }
                    return Some(Cut {
                        dim: d,
                        thresholds,
                        score: (0, 0),
                    });
                }
            }
        }
        let mut best: Option<Cut<A>> = None;
        let mut los: Vec<A> = Vec::with_capacity(n);
        let mut his: Vec<A> = Vec::with_capacity(n);
        let mut cands: Vec<A> = Vec::with_capacity(2 * n);
        for d in 0..DIMS {
            los.clear();
            his.clear();
            cands.clear();
            for &i in ids {
                let r = &self.rects[i as usize];
                let lo = r.lo[d].max(region.lo[d]);
                let hi = r.hi[d].min(region.hi[d]);
                los.push(lo);
                his.push(hi);
                if lo > region.lo[d] {
                    cands.push(lo);
                }
                if hi < region.hi[d] {
                    cands.push(hi + one);
                }
            }
            if cands.is_empty() {
                continue;
            }
            los.sort_unstable();
            his.sort_unstable();
            cands.sort_unstable();
            cands.dedup();
            // Position of a threshold c: entries starting before c plus
            // entries ending before c, from 0 to 2n. Thresholds at equal
            // steps of position balance the children.
            let position = |c: A| los.partition_point(|&x| x < c) + his.partition_point(|&x| x < c);
            let parts = FANOUT.min(cands.len() + 1);
            let mut thresholds: Vec<A> = Vec::with_capacity(parts - 1);
            let mut k = 0;
            for j in 1..parts {
                let target = j * 2 * n / parts;
                while k < cands.len() && position(cands[k]) < target {
                    k += 1;
                }
                if k >= cands.len() {
                    break;
                }
                if thresholds.last() != Some(&cands[k]) {
                    thresholds.push(cands[k]);
                }
            }
            if thresholds.is_empty() {
                thresholds.push(cands[cands.len() / 2]);
            }
            // Entries a child keeps: those overlapping it, up to the first
            // that covers it whole (the rest would be pruned there). Counting
            // the pruning sees cuts that pay off only once it applies, like
            // the second side of a staircase step.
            let mut max_child = 0;
            let mut sum = 0;
            for c in 0..=thresholds.len() {
                let mut child = *region;
                if c > 0 {
                    child.lo[d] = thresholds[c - 1];
                }
                if let Some(&next) = thresholds.get(c) {
                    child.hi[d] = next - one;
                }
                let mut count = 0;
                for &i in ids {
                    let r = &self.rects[i as usize];
                    if r.lo[d] <= child.hi[d] && child.lo[d] <= r.hi[d] {
                        count += 1;
                        if r.covers(&child) {
                            break;
                        }
                    }
                }
                max_child = max_child.max(count);
                sum += count;
            }
            let score = (max_child, sum);
            if best.as_ref().is_none_or(|b| score < b.score) {
                best = Some(Cut {
                    dim: d,
                    thresholds,
                    score,
                });
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Fields, Interval, LinearMatcher};
    use super::*;

    proptest::proptest! {
        /// A root shape's slots from an entry's top bits are its slots
        /// from the entry itself, in every field width (IPv4 and IPv6
        /// addresses, ports, the protocol).
        #[test]
        fn top_bits_give_the_same_slots(
            lo in proptest::array::uniform5(proptest::num::u128::ANY),
            hi in proptest::array::uniform5(proptest::num::u128::ANY),
            dims in (0usize..DIMS, 0usize..DIMS),
            bits in (0u32..=16, 0u32..=16),
        ) {
            fn check<A: Address>(r: Rect<A>, shape: RootShape) -> Result<(), proptest::test_runner::TestCaseError> {
                let tops = top_bits(&r);
                for f in 0..2 {
                    let d = shape.dims[f];
                    proptest::prop_assert_eq!(shape.top_span(f, &tops), shape.span(f, r.lo[d], r.hi[d]));
                }
                Ok(())
            }
            // Each field's values within its width.
            let width = |d: usize, bits: u32, v: u128| match d {
                0 | 1 => v >> (128 - bits),
                2 | 3 => v >> 112,
                _ => v >> 120,
            };
            let shape_for = |abits: u32| {
                let fit = |d: usize, b: u32| match d {
                    0 | 1 => b.min(abits),
                    2 | 3 => b,
                    _ => b.min(8),
                };
                RootShape { dims: [dims.0, dims.1], bits: [fit(dims.0, bits.0), fit(dims.1, bits.1)] }
            };
            let r4 = Rect::<u32> {
                lo: std::array::from_fn(|d| width(d, 32, lo[d]) as u32),
                hi: std::array::from_fn(|d| width(d, 32, hi[d]) as u32),
            };
            check(r4, shape_for(32))?;
            let r6 = Rect::<u128> {
                lo: std::array::from_fn(|d| width(d, 128, lo[d])),
                hi: std::array::from_fn(|d| width(d, 128, hi[d])),
            };
            check(r6, shape_for(128))?;
        }
    }

    fn entry(src: (u32, u32), dport: (u16, u16), proto: Option<u8>, rule: RuleId) -> Entry<u32> {
        let mut fields = Fields::any();
        fields.src = Interval {
            lo: src.0,
            hi: src.1,
        };
        fields.dst_port = Interval {
            lo: dport.0,
            hi: dport.1,
        };
        if let Some(p) = proto {
            fields.proto = Interval::single(p);
        }
        Entry { fields, rule }
    }

    fn key(src: u32, dport: u16, proto: u8) -> Key<u32> {
        Key {
            src,
            dst: 0,
            src_port: 0,
            dst_port: dport,
            proto,
        }
    }

    #[test]
    fn empty_classifier_matches_nothing() {
        let c = Classifier::<u32>::build(Vec::new()).unwrap();
        assert!(c.is_empty());
        assert_eq!(c.lookup(&key(1, 2, 6)), None);
    }

    #[test]
    fn first_match_wins_over_later_narrower_entries() {
        let entries = vec![
            entry((0, u32::MAX), (80, 80), Some(6), 0),
            entry((10, 20), (0, u16::MAX), None, 1),
            entry((15, 15), (80, 80), Some(6), 2),
        ];
        let c = Classifier::build(entries.clone()).unwrap();
        let r = LinearMatcher::new(entries);
        for k in [
            key(15, 80, 6),
            key(15, 81, 6),
            key(15, 80, 17),
            key(21, 80, 17),
        ] {
            assert_eq!(c.lookup(&k), r.lookup(&k), "{k:?}");
        }
        assert_eq!(c.lookup(&key(15, 80, 6)), Some(0));
        assert_eq!(c.lookup(&key(15, 81, 6)), Some(1));
    }

    #[test]
    fn many_entries_split_into_a_bounded_tree() {
        let entries: Vec<_> = (0..2000u32)
            .map(|i| entry((i * 7, i * 7 + 20), (i as u16, i as u16 + 3), None, i / 2))
            .collect();
        let c = Classifier::build(entries.clone()).unwrap();
        let r = LinearMatcher::new(entries);
        for s in (0..15_000u32).step_by(3) {
            let k = key(s, (s % 2100) as u16, 6);
            assert_eq!(c.lookup(&k), r.lookup(&k), "{k:?}");
        }
        let st = c.stats();
        assert!(st.max_leaf <= BuildLimits::default().max_leaf);
        assert!(st.max_depth <= BuildLimits::default().max_depth);
    }

    #[test]
    fn cross_product_explosion_is_refused_or_bounded() {
        // Half the entries pin only the source, half only the destination
        // port: one tree would need n²/4 leaves.
        let mut entries = Vec::new();
        for i in 0..3000u32 {
            entries.push(entry((i * 2, i * 2), (0, u16::MAX), None, i));
            entries.push(entry((0, u32::MAX), (i as u16, i as u16), None, 3000 + i));
        }
        let limits = BuildLimits::default();
        match Classifier::build_with(entries.clone(), &limits) {
            Ok(c) => {
                assert!(c.memory_bytes() <= limits.max_memory_bytes);
                let r = LinearMatcher::new(entries);
                for s in (0..7000u32).step_by(7) {
                    let k = key(s, (s / 3) as u16, 17);
                    assert_eq!(c.lookup(&k), r.lookup(&k), "{k:?}");
                }
            }
            Err(e) => assert!(matches!(e, BuildError::TooComplex { .. })),
        }
    }

    /// Entry i covers sources `i..=n+100` and destinations `0..=n-i`.
    fn staircase(n: u32, reversed: bool) -> Vec<Entry<u32>> {
        let order: Vec<u32> = if reversed {
            (0..n).rev().collect()
        } else {
            (0..n).collect()
        };
        order
            .into_iter()
            .enumerate()
            .map(|(rule, i)| {
                let mut fields = Fields::any();
                fields.src = Interval { lo: i, hi: n + 100 };
                fields.dst = Interval { lo: 0, hi: n - i };
                Entry {
                    fields,
                    rule: rule as RuleId,
                }
            })
            .collect()
    }

    #[test]
    fn nested_boxes_behind_a_covering_first_entry_collapse() {
        // Every entry hides behind the first; balanced cuts alone would
        // carve the staircase step by step and hit the depth cap.
        let entries = staircase(3000, false);
        let c = Classifier::build(entries.clone()).unwrap();
        assert!(c.stats().nodes < 100, "{:?}", c.stats());
        let r = LinearMatcher::new(entries);
        for x in (0..3200u32).step_by(7) {
            let k = Key {
                src: x,
                dst: 3100u32.saturating_sub(x),
                src_port: 0,
                dst_port: 0,
                proto: 6,
            };
            assert_eq!(c.lookup(&k), r.lookup(&k), "{k:?}");
        }
    }

    #[test]
    fn reversed_staircase_builds_and_agrees() {
        // With the narrowest step first nothing hides behind the first
        // entry; only counting what each child would prune away finds the
        // cuts that pay off (without it this set hit the depth cap).
        let entries = staircase(1000, true);
        let c = Classifier::build(entries.clone()).unwrap();
        let r = LinearMatcher::new(entries);
        for x in (0..1200u32).step_by(3) {
            for y in [0, 1, 500, 999, 1000, 1001, 1050 - x.min(1050)] {
                let k = Key {
                    src: x,
                    dst: y,
                    src_port: 0,
                    dst_port: 0,
                    proto: 6,
                };
                assert_eq!(c.lookup(&k), r.lookup(&k), "{k:?}");
            }
        }
    }

    #[test]
    fn later_tree_sets_cut_short_by_the_work_cap_stay_exact() {
        // Pinned sources and pinned destination ports, interleaved in
        // priority: they land in different trees, and a key often matches
        // in both. With the work cap just below what the full build used,
        // the trees still build but the later-tree sets of some entries are
        // left at "every tree"; answers must not change.
        let mut entries = Vec::new();
        for i in 0..600u32 {
            entries.push(entry((i * 3, i * 3 + 1), (0, u16::MAX), Some(6), 2 * i));
            entries.push(entry((0, u32::MAX), (i as u16, i as u16), None, 2 * i + 1));
        }
        let full = Classifier::build(entries.clone()).unwrap();
        assert!(full.stats().trees > 1, "{:?}", full.stats());
        let used = full.stats().build_work;
        let r = LinearMatcher::new(entries.clone());
        let mut cut_short = 0;
        for less in [1, 10, 100, 1000, 10_000, 100_000] {
            let limits = BuildLimits {
                max_work: used.saturating_sub(less),
                ..BuildLimits::default()
            };
            let Ok(c) = Classifier::build_with(entries.clone(), &limits) else {
                continue;
            };
            cut_short += 1;
            for s in (0..2000u32).step_by(3) {
                for dport in [0, 1, s as u16 % 700, 599, 600] {
                    let k = key(s, dport, if s % 2 == 0 { 6 } else { 17 });
                    assert_eq!(c.lookup(&k), r.lookup(&k), "{k:?}");
                    let mut out = [None];
                    c.lookup_batch(&[k], &mut out);
                    assert_eq!(out[0], r.lookup(&k), "batched {k:?}");
                }
            }
        }
        assert!(cut_short > 0, "no build fitted a slightly smaller cap");
    }

    #[test]
    fn tiny_memory_limit_is_an_error_not_an_explosion() {
        let entries: Vec<_> = (0..500u32)
            .map(|i| entry((i, i + 1000), (0, u16::MAX), None, i))
            .collect();
        let limits = BuildLimits {
            max_memory_bytes: 4096,
            ..BuildLimits::default()
        };
        assert!(matches!(
            Classifier::build_with(entries, &limits),
            Err(BuildError::TooComplex { .. })
        ));
    }
}
