//! Writer throughput: records/s through the real queue, hash chain and
//! group commit (fdatasync) into a file on disk. Target: >= 200,000/s.
//! Also the cost of a record's JSON body on the producer's thread: the
//! hand-written writer the producers use beside serde_json's derived one,
//! which must print the same bytes.
//!
//! `cargo bench --bench audit_writer`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use palisade::audit::json::write_event;
use palisade::audit::{Action, AuditConfig, AuditEvent, AuditLog, CheckpointSigner, Ticket};
use std::time::{Duration, Instant};

fn request(i: u64) -> AuditEvent {
    AuditEvent::proxy_request(
        Action::Allowed,
        "192.0.2.10:40000".parse().unwrap(),
        "GET",
        format!("http://www.example.com/path/{i}?q=1"),
    )
    .with_destination("203.0.113.5:80".parse().unwrap())
    .with_domain("www.example.com")
    .with_rule(
        "web-out",
        "3f1c4e0b8a7d6c5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e",
    )
    .with_status(200)
    .with_bytes(512, 8192, Duration::from_millis(12))
}

fn writer(c: &mut Criterion) {
    // A real file system (the target directory), not tmpfs.
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let config = AuditConfig {
        dir: tmp.path().join("trail"),
        signing_key: Some(tmp.path().join("unused.key")),
        rotate_size: 256 << 20,
        ..AuditConfig::default()
    };
    let log =
        AuditLog::open_with_signer(&config, CheckpointSigner::from_seed([7; 32])).expect("open");
    let events: Vec<AuditEvent> = (0..4096).map(request).collect();

    let mut group = c.benchmark_group("audit_writer");
    for producers in [1usize, 2] {
        let batch = 20_000u64;
        group.throughput(Throughput::Elements(batch));
        group.sample_size(20);
        group.bench_function(format!("durable_records_{producers}_producers"), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    std::thread::scope(|s| {
                        for p in 0..producers {
                            let (log, events) = (&log, &events);
                            s.spawn(move || {
                                // Many records in flight per producer, each
                                // awaited: every one counted is durable.
                                let mut tickets: Vec<Ticket> = Vec::with_capacity(batch as usize);
                                for i in (p as u64..batch).step_by(producers) {
                                    tickets.push(
                                        log.submit(&events[(i % 4096) as usize]).expect("submit"),
                                    );
                                }
                                for t in tickets {
                                    t.wait().expect("durable");
                                }
                            });
                        }
                    });
                }
                start.elapsed()
            });
        });
    }
    group.finish();
    let stats = log.stats();
    eprintln!(
        "records written: {}, commits (fdatasync): {}, {:.0} records per commit",
        stats.records_written,
        stats.commits,
        stats.records_written as f64 / stats.commits.max(1) as f64
    );
    log.close().expect("close");
}

fn serialise(c: &mut Criterion) {
    let events: Vec<AuditEvent> = (0..64)
        .map(|i| request(i).with_reason("allowed by rule"))
        .collect();
    let mut group = c.benchmark_group("audit_body");
    group.throughput(Throughput::Elements(events.len() as u64));
    group.bench_function("serialise_hand_written", |b| {
        b.iter(|| {
            let mut total = 0;
            for e in &events {
                let mut body = Vec::with_capacity(640);
                write_event(&mut body, std::hint::black_box(e));
                total += body.len();
            }
            total
        })
    });
    group.bench_function("serialise_serde_derived", |b| {
        b.iter(|| {
            let mut total = 0;
            for e in &events {
                let mut body = Vec::with_capacity(640);
                serde_json::to_writer(&mut body, std::hint::black_box(e)).expect("serialise");
                total += body.len();
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, serialise, writer);
criterion_main!(benches);
