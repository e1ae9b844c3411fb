//! A SIGHUP reload compiles the new policy beside the accept loop: while a
//! slow compile runs, clients are still served under the policy in force.
//!
//! The reload test sends SIGHUP to its own process, which the proxy under
//! test has claimed; the only other test here serves nothing a reload
//! could disturb.

mod common;

use palisade::audit::{AuditConfig, AuditLog};
use palisade::config::ProxyConfig;
use palisade::policy::load::{load_policy, FsLoader};
use palisade::policy::{Date, Options};
use palisade::proxy::Proxy;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// A loopback origin that answers `200 ok` to each of up to `n`
/// connections, then stops.
fn origin(n: usize) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in l.incoming().take(n) {
            let Ok(mut c) = c else { continue };
            let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
                match c.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => head.extend_from_slice(&buf[..k]),
                }
            }
            let _ =
                c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
        }
    });
    addr
}

/// Sends one absolute-form request for `target` and returns the status line.
fn status_line(proxy: SocketAddr, target: SocketAddr) -> String {
    let mut s = TcpStream::connect(proxy).expect("connect to the proxy");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        format!("GET http://{target}/ HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    // Bounded: the read timeout ends a stalled response, and the proxy
    // closes after one response.
    for _ in 0..64 {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => panic!("reading the response: {e} (so far {out:?})"),
        }
        if out.windows(2).any(|w| w == b"\r\n") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&out);
    text.lines().next().unwrap_or("").to_string()
}

fn compile(path: &Path) -> Result<palisade::policy::Policy, String> {
    load_policy(
        path,
        &FsLoader,
        Options {
            today: Date::new(2026, 1, 1).unwrap(),
        },
    )
    .map(|c| c.policy)
    .map_err(|f| f.diagnostics.render(&f.sources))
}

#[test]
fn a_slow_reload_does_not_stop_the_proxy_serving() {
    let dir = tempfile::tempdir().unwrap();
    let keys = common::keygen(dir.path());
    let web = origin(64);
    let policy = dir.path().join("p.policy");
    std::fs::write(&policy, "default deny log\n").unwrap();

    // The first compile (start-up) runs at once; every later one waits
    // until the test lets it go, standing in for a policy that takes long
    // to compile.
    let (release, gate) = mpsc::channel::<()>();
    let gate = Mutex::new(gate);
    let calls = Arc::new(AtomicU32::new(0));
    let (started_tx, started) = mpsc::channel::<()>();
    let started_tx = Mutex::new(started_tx);
    let loader_calls = calls.clone();
    let loader_path = policy.clone();
    let loader = Box::new(move || {
        if loader_calls.fetch_add(1, Ordering::SeqCst) > 0 {
            let _ = started_tx.lock().unwrap().send(());
            // Bounded: the test releases it, or it gives up.
            let _ = gate.lock().unwrap().recv_timeout(Duration::from_secs(30));
        }
        compile(&loader_path).map(palisade::proxy::Loaded::from)
    });

    let audit = AuditConfig {
        dir: dir.path().join("audit"),
        signing_key: Some(keys.signing.clone()),
        ..AuditConfig::default()
    };
    let log = AuditLog::open(&audit).expect("open the audit log");
    let config = ProxyConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..ProxyConfig::default()
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let proxy = rt.block_on(Proxy::bind(config, loader, log)).expect("bind");
    let addr = proxy.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = rt.spawn(proxy.run(
        async {
            let _ = stop_rx.await;
        },
        std::future::pending(),
    ));

    // Served before the reload (this also shows the SIGHUP handler is in
    // place: it is installed before the first accept).
    assert!(
        status_line(addr, web).contains(" 403 "),
        "the policy in force denies"
    );

    std::fs::write(
        &policy,
        format!(
            "net local = 127.0.0.1\nhttp web allow local -> 127.0.0.1 port {}\ndefault deny log\n",
            web.port()
        ),
    )
    .unwrap();
    rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::HUP).unwrap();
    started
        .recv_timeout(Duration::from_secs(10))
        .expect("the SIGHUP started a reload");

    // The compile is stalled; the proxy still answers, under the old policy.
    for _ in 0..3 {
        assert!(
            status_line(addr, web).contains(" 403 "),
            "served under the policy in force while the new one compiles"
        );
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2, "one reload in progress");

    // Let the compile finish: the new policy takes over.
    release.send(()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let line = status_line(addr, web);
        if !line.contains(" 403 ") {
            assert!(line.contains(" 200 "), "the new policy allows: {line}");
            break;
        }
        assert!(Instant::now() < deadline, "the new policy was not applied");
        std::thread::sleep(Duration::from_millis(20));
    }

    let _ = stop_tx.send(());
    let log = rt.block_on(serving).expect("the proxy stops");
    rt.block_on(log.close_async())
        .expect("the audit log closes");
    let records = common::records(&dir.path().join("audit"));
    let loaded: Vec<_> = records
        .iter()
        .filter(|r| common::s(r, "/event/action") == "policy-loaded")
        .collect();
    assert_eq!(loaded.len(), 2, "start and reload are both audited");
    assert!(loaded[1].to_string().contains("reload"), "{}", loaded[1]);
}

/// An embedder that drops the serving future (a task aborted, a runtime
/// shut down) ends the serving threads with it: the port is released.
#[test]
fn dropping_the_serving_future_releases_the_port() {
    let dir = tempfile::tempdir().unwrap();
    let keys = common::keygen(dir.path());
    let policy = dir.path().join("p.policy");
    std::fs::write(&policy, "default deny log\n").unwrap();
    let log = AuditLog::open(&AuditConfig {
        dir: dir.path().join("audit"),
        signing_key: Some(keys.signing.clone()),
        ..AuditConfig::default()
    })
    .unwrap();
    let config = ProxyConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        workers: 2,
        ..ProxyConfig::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let loader = Box::new(move || compile(&policy).map(palisade::proxy::Loaded::from));
    let proxy = rt.block_on(Proxy::bind(config, loader, log)).expect("bind");
    let addr = proxy.local_addr().unwrap();
    let serving = rt.spawn(proxy.run(std::future::pending(), std::future::pending()));
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "the proxy never served");
        std::thread::sleep(Duration::from_millis(20));
    }
    serving.abort();
    drop(rt);
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_ok() {
        assert!(
            Instant::now() < deadline,
            "the serving threads outlived the dropped future"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
