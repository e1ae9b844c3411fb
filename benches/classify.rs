//! Lookup speed of the compiled classifier against the linear reference on
//! the ClassBench sets in `../shared/data/classbench/`.
//!
//! Before the criterion groups it prints one summary line per set: lookups/s
//! of both matchers, their ratio, build time and memory. Keys come from the
//! set's trace when there is one, else from points drawn inside the rules.
//!
//! Summary rates are per second of on-CPU time of the measuring thread
//! (from `/proc/thread-self/schedstat`), so that a machine shared with other
//! work skews them less; criterion's figures that follow are wall time.
//!
//! `cargo bench --bench classify` runs everything;
//! `cargo bench --bench classify -- --summary` prints the summary only;
//! `cargo bench --bench classify -- --write-traces DIR` writes the keys of
//! each set, in ClassBench trace format, to `DIR/<set>_trace` and exits, so
//! that another classifier can be timed on the same keys
//! (`benches/classify-peers.sh` does so with DPDK's ACL library).

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use palisade::classify::classbench::{parse_rules, parse_trace};
use palisade::classify::{Classifier, Entry, Key, LinearMatcher};

const SETS: [&str; 7] = [
    "acl1_1k", "fw1_1k", "ipc1_1k", "acl1_10k", "acl2_10k", "fw1_10k", "ipc1_10k",
];
/// Keys drawn from the rules when a set has no trace.
const GENERATED_KEYS: usize = 100_000;
/// Keys the linear matcher is timed on (it is slow at 10k rules).
const LINEAR_KEYS: usize = 5_000;

struct Set {
    name: &'static str,
    entries: Vec<Entry<u32>>,
    keys: Vec<Key<u32>>,
    keys_from: &'static str,
}

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/classbench")
}

/// Deterministic points inside randomly chosen rules (xorshift; no seed
/// dependency on the platform).
fn keys_from_rules(entries: &[Entry<u32>], n: usize) -> Vec<Key<u32>> {
    let mut s: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let mut pick = |lo: u64, hi: u64| lo + next() % (hi - lo + 1);
    (0..n)
        .map(|_| {
            let f = &entries[pick(0, entries.len() as u64 - 1) as usize].fields;
            Key {
                src: pick(f.src.lo.into(), f.src.hi.into()) as u32,
                dst: pick(f.dst.lo.into(), f.dst.hi.into()) as u32,
                src_port: pick(f.src_port.lo.into(), f.src_port.hi.into()) as u16,
                dst_port: pick(f.dst_port.lo.into(), f.dst_port.hi.into()) as u16,
                proto: pick(f.proto.lo.into(), f.proto.hi.into()) as u8,
            }
        })
        .collect()
}

fn load_sets() -> Vec<Set> {
    let dir = data_dir();
    let mut sets = Vec::new();
    // CLASSIFY_SETS=acl1_10k,fw1_10k narrows the run (handy under perf).
    let only = std::env::var("CLASSIFY_SETS").ok();
    for name in SETS {
        if only
            .as_deref()
            .is_some_and(|o| !o.split(',').any(|s| s == name))
        {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(dir.join(name)) else {
            eprintln!("skipping {name}: not found in {}", dir.display());
            continue;
        };
        let entries = match parse_rules(&text) {
            Ok(e) => e,
            Err(e) => {
                eprintln!("skipping {name}: {e}");
                continue;
            }
        };
        let trace = std::fs::read_to_string(dir.join(format!("{name}_trace")))
            .ok()
            .and_then(|t| parse_trace(&t).ok());
        let (keys, keys_from) = match trace {
            Some(k) if !k.is_empty() => (k, "trace"),
            _ => (keys_from_rules(&entries, GENERATED_KEYS), "generated"),
        };
        sets.push(Set {
            name,
            entries,
            keys,
            keys_from,
        });
    }
    sets
}

/// Nanoseconds this thread has spent on a CPU (Linux schedstat), so that
/// time lost to other processes on a shared machine does not count.
fn cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Runs `body` (which returns how many lookups it did) until at least `min`
/// elapsed; lookups per second of on-CPU time (wall time where schedstat is
/// unavailable).
fn measure(min: Duration, mut body: impl FnMut() -> u64) -> f64 {
    let cpu0 = cpu_ns();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < min {
        n += body();
    }
    let wall = start.elapsed().as_secs_f64();
    let secs = match (cpu0, cpu_ns()) {
        (Some(a), Some(b)) if b > a => (b - a) as f64 / 1e9,
        _ => wall,
    };
    n as f64 / secs
}

/// Lookups per second over `keys`.
fn rate(keys: &[Key<u32>], min: Duration, mut f: impl FnMut(&Key<u32>) -> Option<u32>) -> f64 {
    measure(min, || {
        for k in keys {
            black_box(f(black_box(k)));
        }
        keys.len() as u64
    })
}

/// Lookups per second of `lookup_batch` over `keys`.
fn batch_rate(keys: &[Key<u32>], min: Duration, c: &Classifier<u32>) -> f64 {
    let mut out = vec![None; keys.len()];
    measure(min, || {
        c.lookup_batch(black_box(keys), &mut out);
        black_box(&out);
        keys.len() as u64
    })
}

fn summary(sets: &[Set]) {
    println!(
        "{:<9} {:>6} {:>7} {:>9} {:>13} {:>13} {:>11} {:>8} {:>8} {:>9} {:>9} {:>5} {:>6} {:>6}",
        "set",
        "rules",
        "keys",
        "from",
        "compiled/s",
        "batch/s",
        "linear/s",
        "x single",
        "x batch",
        "build ms",
        "memory",
        "trees",
        "depth",
        "worst"
    );
    for set in sets {
        let mut build = Duration::MAX;
        let mut classifier = None;
        for _ in 0..3 {
            let t = Instant::now();
            let c = Classifier::build(set.entries.clone());
            build = build.min(t.elapsed());
            classifier = Some(c);
        }
        let classifier = match classifier {
            Some(Ok(c)) => c,
            Some(Err(e)) => {
                println!("{:<9} build failed: {e}", set.name);
                continue;
            }
            None => continue,
        };
        let linear = LinearMatcher::new(set.entries.clone());
        let fast = rate(&set.keys, Duration::from_secs(1), |k| classifier.lookup(k));
        let batch = batch_rate(&set.keys, Duration::from_secs(1), &classifier);
        let lin_keys = &set.keys[..set.keys.len().min(LINEAR_KEYS)];
        let slow = if std::env::var_os("CLASSIFY_NO_LINEAR").is_some() {
            f64::NAN
        } else {
            rate(lin_keys, Duration::from_millis(500), |k| linear.lookup(k))
        };
        let st = classifier.stats();
        println!(
            "{:<9} {:>6} {:>7} {:>9} {:>13.0} {:>13.0} {:>11.0} {:>7.1}x {:>7.1}x {:>9.1} {:>8.2}M {:>5} {:>6} {:>6}",
            set.name,
            set.entries.len(),
            set.keys.len(),
            set.keys_from,
            fast,
            batch,
            slow,
            fast / slow,
            batch / slow,
            build.as_secs_f64() * 1e3,
            classifier.memory_bytes() as f64 / (1 << 20) as f64,
            st.trees,
            st.max_depth,
            st.worst_case_steps,
        );
    }
}

fn criterion_groups(c: &mut Criterion, sets: &[Set]) {
    for set in sets {
        let Ok(classifier) = Classifier::build(set.entries.clone()) else {
            continue;
        };
        let linear = LinearMatcher::new(set.entries.clone());
        let mut g = c.benchmark_group(format!("classify/{}", set.name));
        g.warm_up_time(Duration::from_millis(500));
        g.measurement_time(Duration::from_secs(2));
        g.sample_size(20);
        g.throughput(Throughput::Elements(set.keys.len() as u64));
        g.bench_function("compiled", |b| {
            b.iter(|| {
                for k in &set.keys {
                    black_box(classifier.lookup(black_box(k)));
                }
            })
        });
        let mut out = vec![None; set.keys.len()];
        g.bench_function("compiled_batch", |b| {
            b.iter(|| {
                classifier.lookup_batch(black_box(&set.keys), &mut out);
                black_box(&out);
            })
        });
        let lin_keys = &set.keys[..set.keys.len().min(LINEAR_KEYS)];
        g.throughput(Throughput::Elements(lin_keys.len() as u64));
        g.bench_function("linear", |b| {
            b.iter(|| {
                for k in lin_keys {
                    black_box(linear.lookup(black_box(k)));
                }
            })
        });
        g.finish();
        c.bench_function(&format!("build/{}", set.name), |b| {
            b.iter(|| Classifier::build(black_box(set.entries.clone())))
        });
    }
}

/// Writes each set's keys as a ClassBench trace (`src dst sport dport
/// proto`, one key a line) to `dir/<set>_trace`.
fn write_traces(sets: &[Set], dir: &std::path::Path) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    for set in sets {
        let path = dir.join(format!("{}_trace", set.name));
        let mut out = std::io::BufWriter::new(std::fs::File::create(&path)?);
        for k in &set.keys {
            writeln!(
                out,
                "{}\t{}\t{}\t{}\t{}",
                k.src, k.dst, k.src_port, k.dst_port, k.proto
            )?;
        }
        out.flush()?;
        println!(
            "{} keys ({}) -> {}",
            set.keys.len(),
            set.keys_from,
            path.display()
        );
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let summary_only = args.iter().any(|a| a == "--summary");
    let sets = load_sets();
    if sets.is_empty() {
        eprintln!(
            "no ClassBench sets found in {}; this benchmark needs them",
            data_dir().display()
        );
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--write-traces") {
        let Some(dir) = args.get(i + 1) else {
            eprintln!("--write-traces needs a directory");
            std::process::exit(2);
        };
        if let Err(e) = write_traces(&sets, std::path::Path::new(dir)) {
            eprintln!("writing traces to {dir}: {e}");
            std::process::exit(1);
        }
        return;
    }
    summary(&sets);
    if summary_only {
        return;
    }
    let mut c = Criterion::default()
        .configure_from_args()
        .sample_size(10)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    criterion_groups(&mut c, &sets);
    c.final_summary();
}
