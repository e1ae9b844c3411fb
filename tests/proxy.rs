//! The forced-tunneling proxy as a user runs it: the real `palisade proxy`
//! binary on loopback, real origins (HTTP, and HTTPS with a test CA), real
//! clients (curl, and raw Rust clients where curl cannot misbehave on
//! purpose). Every test also reads the audit trail the proxy wrote.

mod common;
use common::{records, s, signal, stop_and_verify};

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Origins on loopback, served from a background runtime.
struct Origins {
    http: u16,
    /// A port nothing listens on.
    closed: u16,
    tls: u16,
    echo: u16,
    /// Answers 413 as soon as a request head arrives, reads no body, and
    /// holds the connection open; for `POST /continue`, sends a 100
    /// Continue unasked, reads the body and answers `got <length>`.
    early: u16,
    /// Accepts connections and never answers; each accepted connection
    /// is announced on `silent_accepts` and held until the test ends.
    silent: u16,
    silent_accepts: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
    ca_pem: PathBuf,
    _rt: tokio::runtime::Runtime,
}

/// A response body sent in chunks as they come down a channel (a body
/// that streams for a while).
struct Drip(tokio::sync::mpsc::Receiver<hyper::body::Bytes>);

impl hyper::body::Body for Drip {
    type Data = hyper::body::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|c| c.map(|c| Ok(hyper::body::Frame::data(c))))
    }
}

fn origins(dir: &Path) -> Origins {
    use http_body_util::{BodyExt, Full};
    use hyper::body::Bytes;
    fn full(b: Bytes) -> http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible> {
        Full::new(b).boxed()
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let http = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let tls = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let echo = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let early = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let ports = (
        http.local_addr().unwrap().port(),
        tls.local_addr().unwrap().port(),
        echo.local_addr().unwrap().port(),
        early.local_addr().unwrap().port(),
    );

    // Each response names the connection it came on (the proxy's address
    // and port as the origin sees them).
    let service = |from: std::net::SocketAddr| {
        hyper::service::service_fn(
            move |req: hyper::Request<hyper::body::Incoming>| async move {
                let header = |name: &str| {
                    req.headers()
                        .get(name)
                        .and_then(|h| h.to_str().ok())
                        .unwrap_or("")
                        .to_string()
                };
                let (host, via) = (header("host"), header("via"));
                // Which of the headers a hop-by-hop test sends got through.
                let passed: Vec<&str> = ["x-secret", "keep-alive", "close", "te", "x-kept"]
                    .into_iter()
                    .filter(|h| req.headers().contains_key(*h))
                    .collect();
                let passed = passed.join(",");
                let (method, uri) = (req.method().clone(), req.uri().clone());
                // `/big/N`: N bytes, for clients that do not read them.
                if let Some(n) = uri
                    .path()
                    .strip_prefix("/big/")
                    .and_then(|n| n.parse().ok())
                {
                    return Ok(hyper::Response::new(full(Bytes::from(vec![b'x'; n]))));
                }
                // `/drip/N/MS`: N chunks of 1000 bytes, one every MS
                // milliseconds.
                if let Some((n, ms)) = uri
                    .path()
                    .strip_prefix("/drip/")
                    .and_then(|r| r.split_once('/'))
                    .and_then(|(n, ms)| Some((n.parse::<u32>().ok()?, ms.parse().ok()?)))
                {
                    let (tx, rx) = tokio::sync::mpsc::channel(1);
                    tokio::spawn(async move {
                        for i in 0..n {
                            if i > 0 {
                                tokio::time::sleep(Duration::from_millis(ms)).await;
                            }
                            if tx.send(Bytes::from(vec![b'd'; 1000])).await.is_err() {
                                return;
                            }
                        }
                    });
                    return Ok(hyper::Response::new(Drip(rx).boxed()));
                }
                // `/slow/MS`: answers after MS milliseconds.
                if let Some(ms) = uri
                    .path()
                    .strip_prefix("/slow/")
                    .and_then(|n| n.parse().ok())
                {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    return Ok(hyper::Response::new(full(Bytes::from(format!(
                        "slow answer after {ms} ms\n"
                    )))));
                }
                // How many request body bytes arrived, and how they were
                // framed on the way from the proxy.
                let framing = if req.headers().contains_key("transfer-encoding") {
                    "chunked"
                } else if req.headers().contains_key("content-length") {
                    "length"
                } else {
                    "none"
                };
                let sent = req
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes().len())
                    .unwrap_or(usize::MAX);
                let body = format!(
                    "origin saw {method} {uri} host={host} via={via} sent={sent}/{framing} from={from} passed={passed}\n",
                );
                Ok::<_, std::convert::Infallible>(hyper::Response::new(full(Bytes::from(body))))
            },
        )
    };
    rt.spawn(async move {
        loop {
            let Ok((s, from)) = http.accept().await else {
                return;
            };
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), service(from)),
            );
        }
    });

    let ck = rcgen::generate_simple_self_signed(vec!["secure.test".to_string()]).unwrap();
    let ca_pem = dir.join("ca.pem");
    std::fs::write(&ca_pem, ck.cert.pem()).unwrap();
    let cert = rustls::pki_types::CertificateDer::from(ck.cert.der().to_vec());
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    rt.spawn(async move {
        loop {
            let Ok((s, from)) = tls.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(t) = acceptor.accept(s).await {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(t), service(from))
                        .await;
                }
            });
        }
    });
    rt.spawn(async move {
        loop {
            let Ok((mut s, _)) = echo.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    rt.spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let Ok((mut s, _)) = early.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 65536 {
                    if s.read(&mut b).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                let head = String::from_utf8_lossy(&head).to_lowercase();
                if head.starts_with("post /continue ") {
                    // Asks for the body with a 100 Continue of its own
                    // accord, reads it, then answers with its length.
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    let _ = s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await;
                    let mut body = vec![0u8; len];
                    if s.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let answer = format!("got {len}");
                    let _ = s
                        .write_all(
                            format!(
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{answer}",
                                answer.len()
                            )
                            .as_bytes(),
                        )
                        .await;
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    return;
                }
                let _ = s
                    .write_all(
                        b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 9\r\n\r\ntoo large",
                    )
                    .await;
                tokio::time::sleep(Duration::from_secs(30)).await;
            });
        }
    });
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let silent_listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let silent = silent_listener.local_addr().unwrap().port();
    let (accepted, silent_accepts) = std::sync::mpsc::channel();
    rt.spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent_listener.accept().await {
            held.push(s);
            let _ = accepted.send(());
        }
    });
    Origins {
        closed,
        silent,
        silent_accepts: std::sync::Mutex::new(silent_accepts),
        http: ports.0,
        tls: ports.1,
        echo: ports.2,
        early: ports.3,
        ca_pem,
        _rt: rt,
    }
}

struct Proxy {
    child: Option<Child>,
    addr: SocketAddr,
    dir: tempfile::TempDir,
    policy: PathBuf,
    origins: Origins,
    /// What the proxy said on stderr up to "listening on".
    startup: Vec<String>,
    /// What it says after.
    stderr: std::sync::mpsc::Receiver<String>,
}

/// How a test starts the proxy binary.
#[derive(Clone, Copy)]
enum Launch<'a> {
    Plain,
    /// Its clock started at libfaketime's `@YYYY-MM-DD HH:MM:SS`.
    FakeTime(&'a str),
    /// Under `prlimit --nofile=SOFT:HARD`.
    OpenFiles(u64, u64),
    /// After this is done to the test's directory.
    Prepare(&'a dyn Fn(&Path)),
    /// In a mount namespace of its own whose `/etc/resolv.conf` (this
    /// file) names a resolver.
    Resolver(&'a Path),
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn policy_text(o: &Origins) -> String {
    format!(
        "net local = 127.0.0.1, ::1\n\
         http blocked  deny  local -> \"blocked.test\"\n\
         http origin   allow local -> \"origin.test\", \"*.origin.test\", 127.0.0.1 port {http}\n\
         http secure   allow local -> \"secure.test\", 127.0.0.1 port {tls}\n\
         http echo     allow local -> \"echo.test\", 127.0.0.1 port {echo} plain-tunnel\n\
         http internal allow local -> \"internal.test\" port {http}\n\
         http closed   allow local -> \"closed.test\", 127.0.0.1 port {closed}\n\
         http early    allow local -> \"early.test\", 127.0.0.1 port {early}\n\
         http silent   allow local -> \"silent.test\", 127.0.0.1 port {silent}\n\
         http resolved allow local -> \"localhost\" port {http}\n\
         default deny log\n",
        http = o.http,
        tls = o.tls,
        echo = o.echo,
        closed = o.closed,
        early = o.early,
        silent = o.silent
    )
}

fn start_proxy(extra: &str) -> Proxy {
    start_proxy_with(extra, &policy_text, Launch::Plain)
}

/// A proxy with its own policy text, started as `launch` says.
fn start_proxy_with(
    extra: &str,
    policy_text: &dyn Fn(&Origins) -> String,
    launch: Launch,
) -> Proxy {
    // Several serving threads whatever the machine, so every test also
    // crosses them (limits, reloads and the trail are shared by all).
    let workers = if extra.contains("workers") {
        ""
    } else {
        "workers = 3"
    };
    // Tests that stop the proxy with a tunnel open wait its drain period.
    let drain = if extra.contains("drain_timeout") {
        ""
    } else {
        "drain_timeout = \"1s\""
    };
    let dir = tempfile::tempdir().unwrap();
    let origins = origins(dir.path());
    let policy = dir.path().join("test.policy");
    std::fs::write(&policy, policy_text(&origins)).unwrap();
    if let Launch::Prepare(f) = launch {
        f(dir.path());
    }
    let config = dir.path().join("palisade.toml");
    std::fs::write(
        &config,
        format!(
            "policy = \"test.policy\"\n\
             [proxy]\n\
             listen = \"127.0.0.1:0\"\n\
             header_read_timeout = \"1s\"\n\
             tunnel_first_bytes_timeout = \"2s\"\n\
             {workers}\n\
             {drain}\n\
             {extra}\n\
             [proxy.hosts]\n\
             \"origin.test\" = [\"127.0.0.1\"]\n\
             \"www.origin.test\" = [\"127.0.0.1\"]\n\
             \"secure.test\" = [\"127.0.0.1\"]\n\
             \"echo.test\" = [\"127.0.0.1\"]\n\
             \"internal.test\" = [\"127.0.0.1\"]\n\
             \"closed.test\" = [\"127.0.0.1\"]\n\
             \"early.test\" = [\"127.0.0.1\"]\n\
             \"silent.test\" = [\"127.0.0.1\"]\n\
             [audit]\n\
             dir = \"audit\"\n\
             signing_key = \"keys/audit.key\"\n\
             group_commit_window = \"1ms\"\n"
        ),
    )
    .unwrap();
    // libfaketime preloaded into the proxy itself (not the `faketime`
    // wrapper, which would stand between the test's signals and the proxy).
    let bin = env!("CARGO_BIN_EXE_palisade");
    let mut command = match launch {
        // prlimit sets the limits and execs the proxy (same process).
        Launch::OpenFiles(soft, hard) => {
            let mut c = Command::new("prlimit");
            c.arg(format!("--nofile={soft}:{hard}")).arg(bin);
            c
        }
        // unshare and sh exec the proxy (same process, so it gets the
        // test's signals).
        Launch::Resolver(conf) => {
            let mut c = Command::new("unshare");
            c.args(["--mount", "--propagation", "private", "sh", "-c"])
                .arg(r#"mount --bind "$0" /etc/resolv.conf && exec "$@""#)
                .arg(conf)
                .arg(bin);
            c
        }
        _ => Command::new(bin),
    };
    if let Launch::FakeTime(at) = launch {
        command
            .env("LD_PRELOAD", libfaketime().expect("libfaketime"))
            .env("FAKETIME", at);
    }
    let started = common::start_listening(command.args(["proxy", "--config"]).arg(&config));
    Proxy {
        child: Some(started.child),
        addr: started.addr,
        dir,
        policy,
        origins,
        startup: started.startup,
        stderr: started.stderr,
    }
}

impl Proxy {
    /// Waits up to 10 s for a line on the proxy's stderr that contains
    /// `text`.
    fn wait_stderr(&self, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self
                .stderr
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(line) if line.contains(text) => return line,
                Ok(_) => {}
                Err(_) => panic!("the proxy did not say `{text}`"),
            }
        }
    }

    fn curl(&self, args: &[&str]) -> (u16, String) {
        common::curl_via(self.addr, args)
    }

    /// Every audit record so far, as JSON.
    fn records(&self) -> Vec<serde_json::Value> {
        records(&self.dir.path().join("audit"))
    }

    /// Waits (bounded) for a record that satisfies `pred`.
    fn wait_record(
        &self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(r) = self.records().into_iter().find(|r| pred(r)) {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "no audit record {what}; records:\n{:#?}",
                self.records()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the proxy cleanly and checks the trail is whole.
    fn stop_and_verify(mut self) {
        self.stop();
    }

    /// [`stop_and_verify`](Self::stop_and_verify), keeping the records
    /// readable afterwards.
    fn stop(&mut self) {
        let child = self.child.take().unwrap();
        stop_and_verify(
            child,
            "the proxy",
            &self.dir.path().join("audit"),
            &self.dir.path().join("keys/audit.pub"),
        );
    }
}

fn n(v: &serde_json::Value, path: &str) -> u64 {
    v.pointer(path).and_then(|x| x.as_u64()).unwrap_or(u64::MAX)
}

/// Hop-by-hop headers stay on the hop they came on: the fixed ones, and
/// whatever the client's Connection header names (in any case), including
/// a header named `Close`.
#[test]
fn hop_by_hop_headers_are_not_forwarded() {
    let p = start_proxy("");
    let url = format!("http://origin.test:{}/hop", p.origins.http);
    let (code, body) = p.curl(&[
        "-H",
        "Connection: X-Secret, close",
        "-H",
        "X-Secret: for the proxy only",
        "-H",
        "Close: 1",
        "-H",
        "Keep-Alive: timeout=5",
        "-H",
        "TE: trailers",
        "-H",
        "X-Kept: for the origin",
        &url,
    ]);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(" passed=x-kept\n"), "{body}");
}

#[test]
fn plain_http_allowed_and_denied() {
    let p = start_proxy("");
    let url = format!("http://origin.test:{}/hello?x=1", p.origins.http);
    let (code, body) = p.curl(&[&url]);
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains(&format!(
            "origin saw GET /hello?x=1 host=origin.test:{}",
            p.origins.http
        )),
        "{body}"
    );
    assert!(body.contains("via=1.1 palisade"), "{body}");
    let r = p.wait_record("for the allowed request", |r| {
        s(r, "/url/full") == url && s(r, "/event/action") == "allowed"
    });
    assert_eq!(s(&r, "/rule/name"), "origin");
    assert_eq!(n(&r, "/http/response/status_code"), 200);
    assert_eq!(s(&r, "/destination/ip"), "127.0.0.1");
    assert_eq!(n(&r, "/destination/bytes"), body.len() as u64);
    assert_eq!(s(&r, "/event/code"), "proxy_request");

    // Denied by an explicit rule, then by the default: 403 with the rule and
    // a request id that the audit record carries too.
    for (host, rule) in [("blocked.test", "blocked"), ("elsewhere.test", "default")] {
        let url = format!("http://{host}/");
        let (code, body) = p.curl(&[&url]);
        assert_eq!(code, 403, "{body}");
        assert!(body.contains(&format!("rule: {rule}")), "{body}");
        let id = body
            .split("request id: ")
            .nth(1)
            .unwrap()
            .trim()
            .to_string();
        let r = p.wait_record("for the refusal", |r| s(r, "/http/request/id") == id);
        assert_eq!(s(&r, "/event/action"), "denied");
        assert_eq!(s(&r, "/rule/name"), rule);
        assert_eq!(n(&r, "/http/response/status_code"), 403);
        // Where the refused request was for: the host and the port.
        assert_eq!(s(&r, "/destination/domain"), host);
        assert_eq!(n(&r, "/destination/port"), 80);
    }
    p.stop_and_verify();
}

#[test]
fn ip_literals_in_any_spelling_are_normalised() {
    let p = start_proxy("");
    let port = p.origins.http;
    // 127.0.0.1 is named by rule `origin`: every spelling reaches the origin.
    for spelling in [
        "127.0.0.1",
        "2130706433",
        "0x7f000001",
        "0x7f.1",
        "0177.0.0.1",
        "127.1",
        "[::ffff:127.0.0.1]",
    ] {
        let (code, body) = p.curl(&[&format!("http://{spelling}:{port}/")]);
        assert_eq!(code, 200, "{spelling}: {body}");
    }
    // 127.0.0.2 is loopback and named by no rule: every spelling is refused.
    for spelling in [
        "127.0.0.2",
        "2130706434",
        "0x7f.2",
        "0177.0.0.2",
        "[::ffff:127.0.0.2]",
        "[::ffff:7f00:2]",
    ] {
        let (code, body) = p.curl(&[&format!("http://{spelling}:{port}/")]);
        assert_eq!(code, 403, "{spelling}: {body}");
    }
    let denied: Vec<_> = p
        .records()
        .into_iter()
        .filter(|r| s(r, "/event/action") == "denied")
        .collect();
    assert!(denied.len() >= 6);
    p.stop_and_verify();
}

#[test]
fn a_name_resolving_to_an_internal_address_is_refused() {
    let p = start_proxy("");
    let (code, body) = p.curl(&[&format!("http://internal.test:{}/", p.origins.http)]);
    assert_eq!(code, 403, "{body}");
    assert!(
        body.contains("resolves to 127.0.0.1, which is loopback"),
        "{body}"
    );
    let r = p.wait_record("for internal.test", |r| {
        s(r, "/url/full").contains("internal.test")
    });
    assert_eq!(s(&r, "/event/action"), "denied");
    assert!(s(&r, "/event/reason").contains("loopback"), "{r}");
    p.stop_and_verify();
}

#[test]
fn a_cached_lookup_is_checked_again_for_every_request() {
    // `localhost` is not in [proxy.hosts]: it goes through the resolver and
    // its answer is cached. The cached loopback address must be refused
    // just like the first lookup's.
    let p = start_proxy("resolve_cache_ttl = \"60s\"");
    for _ in 0..2 {
        let (code, body) = p.curl(&[&format!("http://localhost:{}/", p.origins.http)]);
        assert_eq!(code, 403, "{body}");
        assert!(body.contains("which is loopback"), "{body}");
    }
    // A refusal is durable before the client hears of it: both are there.
    let refused: Vec<_> = p
        .records()
        .into_iter()
        .filter(|r| s(r, "/url/full").contains("localhost"))
        .collect();
    assert_eq!(refused.len(), 2, "{refused:#?}");
    for r in &refused {
        assert_eq!(s(r, "/event/action"), "denied");
        assert!(s(r, "/event/reason").contains("loopback"), "{r}");
    }
    p.stop_and_verify();
}

#[test]
fn host_header_must_match_the_target() {
    let p = start_proxy("");
    let (code, body) = p.curl(&[
        "-H",
        "Host: blocked.test",
        &format!("http://origin.test:{}/", p.origins.http),
    ]);
    assert_eq!(code, 403, "{body}");
    assert!(
        body.contains("Host header \"blocked.test\" does not match"),
        "{body}"
    );
    p.wait_record("for the mismatch", |r| {
        s(r, "/event/reason").contains("Host header \"blocked.test\" does not match")
    });
    // A matching Host followed by another: an origin could route by the
    // second, so neither is trusted.
    let target = format!("origin.test:{}", p.origins.http);
    let head = raw_status(
        p.addr,
        &format!("GET http://{target}/ HTTP/1.1\r\nHost: {target}\r\nHost: evil.example\r\n\r\n"),
    );
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    p.wait_record("for the doubled Host", |r| {
        s(r, "/event/reason") == "several Host headers"
    });
    // User information in the Host header: an origin might route by the
    // part before the `@`.
    let head = raw_status(
        p.addr,
        &format!("GET http://{target}/ HTTP/1.1\r\nHost: blocked.test@{target}\r\n\r\n"),
    );
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    p.wait_record("for the Host with user information", |r| {
        s(r, "/event/reason").contains("Host header \"blocked.test@")
    });
    // User information in a CONNECT target.
    let head = raw_status(
        p.addr,
        &format!("CONNECT user@{target} HTTP/1.1\r\nHost: {target}\r\n\r\n"),
    );
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    // A CONNECT whose Host names another host or port is refused; one
    // without a port, or the target itself, is not.
    let echo = format!("echo.test:{}", p.origins.echo);
    for (host, want) in [
        ("blocked.test:443".to_string(), "HTTP/1.1 403"),
        (format!("echo.test:{}", p.origins.echo + 1), "HTTP/1.1 403"),
        ("echo.test".to_string(), "HTTP/1.1 200"),
        (echo.clone(), "HTTP/1.1 200"),
    ] {
        let head = raw_status(
            p.addr,
            &format!("CONNECT {echo} HTTP/1.1\r\nHost: {host}\r\n\r\n"),
        );
        assert!(head.starts_with(want), "Host {host}: {head}");
    }
    p.stop_and_verify();
}

/// Sends `request` as written and returns the response's status line.
fn raw_status(proxy: SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    // Bounded by the read timeout and the line length.
    while !head.ends_with(b"\r\n") && head.len() < 4096 {
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

#[test]
fn https_through_connect_with_sni() {
    let p = start_proxy("");
    let url = format!("https://secure.test:{}/tls", p.origins.tls);
    let (code, body) = p.curl(&["--cacert", p.origins.ca_pem.to_str().unwrap(), &url]);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("origin saw GET /tls"), "{body}");
    let r = p.wait_record("for the tunnel", |r| {
        s(r, "/event/code") == "connect_tunnel" && s(r, "/event/action") == "allowed"
    });
    assert_eq!(s(&r, "/tls/client/server_name"), "secure.test");
    assert_eq!(s(&r, "/rule/name"), "secure");
    assert!(
        n(&r, "/source/bytes") > 100 && n(&r, "/destination/bytes") > 100,
        "{r}"
    );
    assert!(r.pointer("/event/duration").is_some());
    // The client got 200 and the tunnel ran from start to end.
    assert_eq!(n(&r, "/http/response/status_code"), 200);
    assert!(s(&r, "/event/start") <= s(&r, "/event/end"), "{r}");
    assert!(!s(&r, "/event/start").is_empty(), "{r}");
    // One record for the tunnel: the bytes after its head are the
    // tunnel's, not the start of a request left unfinished.
    assert!(
        !p.records()
            .iter()
            .any(|r| s(r, "/event/reason").contains("before its request head was complete")),
        "{:#?}",
        p.records()
    );

    // CONNECT to a port no rule allows.
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_connect}",
            "--max-time",
            "10",
            "-x",
        ])
        .arg(format!("http://{}", p.addr))
        .arg("https://secure.test:1/")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "403");
    p.wait_record("for the refused port", |r| {
        s(r, "/event/code") == "connect_tunnel" && n(r, "/destination/port") == 1
    });
    p.stop_and_verify();
}

/// Opens a tunnel by hand and returns the stream after the 200.
fn connect_tunnel(proxy: SocketAddr, target: &str) -> TcpStream {
    let mut s = TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).unwrap(), 1, "proxy closed during CONNECT");
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s
}

/// A TLS handshake over `stream` naming `server`; Ok when it completed.
fn tls_handshake(
    stream: TcpStream,
    server: rustls::pki_types::ServerName<'static>,
    ca: &Path,
) -> Result<(), String> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read_to_string(ca).unwrap();
    let der = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<String>();
    let der = base64_decode(&der);
    let _ = roots.add(rustls::pki_types::CertificateDer::from(der));
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let conn = rustls::ClientConnection::new(Arc::new(config), server).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, stream);
    tls.write_all(b"GET / HTTP/1.0\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    tls.read_to_end(&mut out).map_err(|e| e.to_string())?;
    if out.is_empty() {
        return Err("no response".into());
    }
    Ok(())
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

#[test]
fn sni_must_match_the_connect_host() {
    let p = start_proxy("");
    let target = format!("secure.test:{}", p.origins.tls);
    // Domain fronting: CONNECT to an allowed name, TLS for another.
    let t1 = connect_tunnel(p.addr, &target);
    let r = tls_handshake(t1, "evil.test".try_into().unwrap(), &p.origins.ca_pem);
    assert!(r.is_err(), "a fronted handshake must not complete");
    let rec = p.wait_record("for the fronted tunnel", |r| {
        s_contains(r, "/event/reason", "does not match the CONNECT host")
    });
    assert_eq!(s(&rec, "/event/action"), "denied");
    assert_eq!(s(&rec, "/tls/client/server_name"), "evil.test");

    // No SNI (a client naming the server by IP sends none) to a name:
    // refused.
    let s2 = connect_tunnel(p.addr, &target);
    let r = tls_handshake(
        s2,
        rustls::pki_types::ServerName::IpAddress(
            "127.0.0.1".parse::<std::net::IpAddr>().unwrap().into(),
        ),
        &p.origins.ca_pem,
    );
    assert!(r.is_err());
    p.wait_record("for the missing SNI", |r| {
        s_contains(r, "/event/reason", "without a server name")
    });

    // No SNI to an IP literal the policy allows: the tunnel opens (the
    // certificate does not name the IP, so the client's own check may fail
    // after the proxy let it through; the audit record says allowed).
    let s3 = connect_tunnel(p.addr, &format!("127.0.0.1:{}", p.origins.tls));
    let _ = tls_handshake(
        s3,
        rustls::pki_types::ServerName::IpAddress(
            "127.0.0.1".parse::<std::net::IpAddr>().unwrap().into(),
        ),
        &p.origins.ca_pem,
    );
    p.wait_record("for the IP tunnel", |r| {
        s(r, "/event/code") == "connect_tunnel"
            && s(r, "/event/action") == "allowed"
            && s(r, "/rule/name") == "secure"
            && s(r, "/tls").is_empty()
    });
    p.stop_and_verify();
}

fn s_contains(v: &serde_json::Value, path: &str, needle: &str) -> bool {
    s(v, path).contains(needle)
}

/// A ClientHello record whose server name list holds `names` as (type,
/// name): hand-built, as no TLS library sends unusual lists.
fn client_hello_with_names(names: &[(u8, &str)]) -> Vec<u8> {
    let mut list = Vec::new();
    for (kind, name) in names {
        list.push(*kind);
        list.extend_from_slice(&(name.len() as u16).to_be_bytes());
        list.extend_from_slice(name.as_bytes());
    }
    let mut ext = vec![0, 0];
    ext.extend_from_slice(&(list.len() as u16 + 2).to_be_bytes());
    ext.extend_from_slice(&(list.len() as u16).to_be_bytes());
    ext.extend_from_slice(&list);
    let mut body = vec![3, 3];
    body.extend_from_slice(&[7; 32]);
    body.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut hs = vec![1, 0];
    hs.extend_from_slice(&(body.len() as u16).to_be_bytes());
    hs.extend_from_slice(&body);
    let mut rec = vec![22, 3, 1];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

#[test]
fn a_server_name_list_that_hides_a_second_name_is_denied() {
    let p = start_proxy("");
    // The CONNECT host first under an unknown name type, another host as
    // the host_name entry: a server that skips unknown types sees the
    // second. Even on a plain-tunnel rule the bytes must not pass.
    let mut t = connect_tunnel(p.addr, &format!("echo.test:{}", p.origins.echo));
    t.write_all(&client_hello_with_names(&[
        (1, "echo.test"),
        (0, "evil.example"),
    ]))
    .unwrap();
    let mut buf = [0u8; 64];
    assert_eq!(t.read(&mut buf).unwrap_or(0), 0, "the tunnel must be cut");
    let r = p.wait_record("for the ambiguous ClientHello", |r| {
        s_contains(r, "/event/reason", "unclear server name")
    });
    assert_eq!(s(&r, "/event/action"), "denied");
    assert_eq!(n(&r, "/destination/bytes"), 0);
    p.stop_and_verify();
}

#[test]
fn plain_bytes_in_a_tunnel_need_plain_tunnel() {
    let p = start_proxy("");
    // Not TLS, rule without plain-tunnel: cut.
    let mut t = connect_tunnel(p.addr, &format!("secure.test:{}", p.origins.tls));
    t.write_all(b"hello, not tls\n").unwrap();
    let mut buf = [0u8; 64];
    assert_eq!(
        t.read(&mut buf).unwrap_or(0),
        0,
        "the proxy must close a non-TLS tunnel"
    );
    p.wait_record("for the non-TLS tunnel", |r| {
        s_contains(r, "/event/reason", "does not start with a TLS ClientHello")
    });

    // plain-tunnel: bytes flow both ways.
    let mut t = connect_tunnel(p.addr, &format!("echo.test:{}", p.origins.echo));
    t.write_all(b"ping through the tunnel").unwrap();
    let mut got = [0u8; 23];
    t.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping through the tunnel");
    // While it is open, the trail already holds it: who, where, by which
    // rule, and why it passed; and the summary counts it as open.
    let opened = p.wait_record("for the open tunnel", |r| {
        s(r, "/event/code") == "tunnel_open" && s(r, "/rule/name") == "echo"
    });
    assert_eq!(s(&opened, "/event/action"), "allowed");
    assert_eq!(s(&opened, "/destination/domain"), "echo.test");
    assert_eq!(s(&opened, "/event/reason"), "allowed by rule; plain tunnel");
    assert!(opened.pointer("/event/duration").is_none(), "{opened}");
    let id = s(&opened, "/http/request/id");
    assert!(!id.is_empty(), "{opened}");
    let summary = |p: &Proxy| {
        let out = Command::new(env!("CARGO_BIN_EXE_palisade"))
            .args(["audit", "summary"])
            .arg(p.dir.path().join("audit"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let open_now = summary(&p);
    assert!(
        open_now.contains("tunnels opened with no end record")
            && open_now.contains(&format!("  {id}  127.0.0.1 -> echo.test:")),
        "{open_now}"
    );
    drop(t);
    let r = p.wait_record("for the plain tunnel", |r| {
        s(r, "/event/code") == "connect_tunnel" && s(r, "/rule/name") == "echo"
    });
    assert_eq!(s(&r, "/event/action"), "allowed");
    assert_eq!(
        s(&r, "/http/request/id"),
        id,
        "one id pairs the two records"
    );
    assert_eq!(n(&r, "/source/bytes"), 23);
    assert_eq!(n(&r, "/destination/bytes"), 23);
    let closed = summary(&p);
    assert!(!closed.contains("no end record"), "{closed}");
    assert!(
        closed.contains("records: 2 (allowed 1, denied 1)"),
        "{closed}"
    );
    p.stop_and_verify();
}

/// A CONNECT that the proxy refuses at accept: the socket is closed
/// before any response.
/// Whether a new connection is refused at accept: answered 503 and closed.
fn refused_at_accept(proxy: SocketAddr, target: &str) -> bool {
    let mut s = TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = write!(s, "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(n) => b[..n].starts_with(b"HTTP/1.1 503"),
        Err(_) => false,
    }
}

#[test]
fn open_tunnels_count_against_the_connection_limit() {
    let p = start_proxy("max_connections_per_client = 2");
    let target = format!("echo.test:{}", p.origins.echo);
    let mut open = Vec::new();
    for i in 0..2u8 {
        let mut t = connect_tunnel(p.addr, &target);
        t.write_all(&[b'a' + i]).unwrap();
        let mut got = [0u8; 1];
        t.read_exact(&mut got).unwrap();
        open.push(t);
    }
    // Two tunnels are open: a third connection is over the limit.
    assert!(
        refused_at_accept(p.addr, &target),
        "a third connection while two tunnels are open must be refused with a 503"
    );
    let r = p.wait_record("for the refused connection", |r| {
        s_contains(r, "/event/reason", "max_connections_per_client")
    });
    assert_eq!(n(&r, "/http/response/status_code"), 503);
    assert_eq!(s(&r, "/event/action"), "denied");
    // Closing one frees its place.
    drop(open.pop());
    p.wait_record("for the closed tunnel", |r| {
        s(r, "/rule/name") == "echo" && n(r, "/source/bytes") == 1
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while refused_at_accept(p.addr, &target) {
        assert!(
            Instant::now() < deadline,
            "the closed tunnel's place was not freed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(open);
    p.stop_and_verify();
}

/// The proxy raises its soft open-file limit to the hard one; where even
/// the hard limit cannot hold `max_connections` at their worst, it lowers
/// `max_connections` and says so, and past it clients get a 503 and a
/// record instead of waiting unanswered on a proxy out of files.
#[test]
fn the_connection_limit_fits_the_open_file_limit() {
    let target = |p: &Proxy| format!("echo.test:{}", p.origins.echo);
    // Plain bytes (a letter; 0x16 would start a TLS record).
    let tunnel = |p: &Proxy, i: usize| {
        let letter = b'a' + (i % 26) as u8;
        let mut t = connect_tunnel(p.addr, &target(p));
        t.write_all(&[letter]).unwrap();
        let mut got = [0u8; 1];
        t.read_exact(&mut got)
            .unwrap_or_else(|e| panic!("tunnel {i}: {e}"));
        assert_eq!(got[0], letter);
        t
    };
    // A soft limit of 64 holds about ten tunnels; raised to 4096, 100.
    let p = start_proxy_with(
        "max_connections = 100\nmax_connections_per_client = 100",
        &policy_text,
        Launch::OpenFiles(64, 4096),
    );
    assert!(
        !p.startup.iter().any(|l| l.contains("open-file limit")),
        "{:#?}",
        p.startup
    );
    let open: Vec<TcpStream> = (0..100).map(|i| tunnel(&p, i)).collect();
    drop(open);
    p.stop_and_verify();

    // A hard limit of 300 holds (300 - 256) / 7 = 6 connections at worst.
    let p = start_proxy_with("", &policy_text, Launch::OpenFiles(300, 300));
    assert!(
        p.startup.iter().any(|l| l.contains("open-file limit (300)")
            && l.contains("max_connections lowered from 10000 to 6")),
        "{:#?}",
        p.startup
    );
    let open: Vec<TcpStream> = (0..6).map(|i| tunnel(&p, i)).collect();
    assert!(
        refused_at_accept(p.addr, &target(&p)),
        "the seventh is refused"
    );
    let r = p.wait_record("for the refused connection", |r| {
        s_contains(r, "/event/reason", "(max_connections)")
    });
    assert_eq!(n(&r, "/http/response/status_code"), 503);
    drop(open);
    // A reload does not say it again unless it says something new.
    signal(p.child.as_ref().unwrap(), rustix::process::Signal::HUP);
    let mut said = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !said.iter().any(|l: &String| l.contains("reloaded policy")) {
        let left = deadline.saturating_duration_since(Instant::now());
        said.push(p.stderr.recv_timeout(left).expect("no reload said"));
    }
    assert!(
        !said.iter().any(|l| l.contains("open-file limit")),
        "{said:#?}"
    );
    p.stop_and_verify();
}

#[test]
fn a_tunnel_carries_bulk_both_ways_in_order() {
    let p = start_proxy("");
    let t = connect_tunnel(p.addr, &format!("echo.test:{}", p.origins.echo));
    // Far past every socket and pipe buffer on the way there and back.
    const LEN: usize = 24 << 20;
    let byte = |i: usize| (i.wrapping_mul(31) ^ (i >> 11)) as u8;
    let mut w = t.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let data: Vec<u8> = (0..LEN).map(byte).collect();
        for chunk in data.chunks(64 << 10) {
            w.write_all(chunk).unwrap();
        }
        w.shutdown(std::net::Shutdown::Write).unwrap();
    });
    // Nothing is read for a while, so every buffer fills up and the relay
    // has to stop and resume in both directions.
    std::thread::sleep(Duration::from_millis(300));
    let mut r = t;
    let (mut got, mut buf) = (0usize, vec![0u8; 64 << 10]);
    loop {
        let k = r.read(&mut buf).expect("the tunnel stalled");
        if k == 0 {
            break;
        }
        for (j, b) in buf[..k].iter().enumerate() {
            assert_eq!(*b, byte(got + j), "byte {} came back wrong", got + j);
        }
        got += k;
        assert!(got <= LEN, "more bytes came back than were sent");
    }
    writer.join().unwrap();
    assert_eq!(got, LEN, "the end came before every byte was back");
    drop(r);
    let rec = p.wait_record("for the bulk tunnel", |r| {
        s(r, "/event/code") == "connect_tunnel"
            && s(r, "/rule/name") == "echo"
            && s(r, "/event/action") == "allowed"
    });
    assert_eq!(n(&rec, "/source/bytes"), LEN as u64);
    assert_eq!(n(&rec, "/destination/bytes"), LEN as u64);
    p.stop_and_verify();
}

#[test]
fn an_early_answer_from_the_origin_is_forwarded_without_the_rest_of_the_body() {
    let p = start_proxy("");
    // Far more than the socket buffers between the proxy and the origin,
    // which reads none of it.
    let upload = p.dir.path().join("upload.bin");
    std::fs::write(&upload, vec![b'x'; 32 << 20]).unwrap();
    let url = format!("http://early.test:{}/upload", p.origins.early);
    let started = Instant::now();
    let (code, body) = p.curl(&["--data-binary", &format!("@{}", upload.display()), &url]);
    assert_eq!(
        code, 413,
        "the origin's early answer must reach the client: {body}"
    );
    assert_eq!(body, "too large");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the answer waited for the body or a timeout"
    );
    let r = p.wait_record("for the early answer", |r| s(r, "/url/full") == url);
    assert_eq!(n(&r, "/http/response/status_code"), 413);
    // A kept-alive client whose upload the origin answered early: the
    // connection closes after the answer (the rest of its body was not
    // read, so nothing after it could be told from a new request).
    let c = TcpStream::connect(p.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let t = format!("early.test:{}", p.origins.early);
    let mut w = c.try_clone().unwrap();
    let head =
        format!("POST http://{t}/up HTTP/1.1\r\nHost: {t}\r\nContent-Length: 33554432\r\n\r\n");
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(head.as_bytes());
        // Far more than the buffers on the way; the write fails once the
        // proxy closes.
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..32 {
            if w.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    let mut answer = Vec::new();
    let _ = (&c).take(4096).read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 413"), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
    drop(c);
    let _ = writer.join();
    // The same upload refused by the policy.
    let denied = "http://blocked.test/upload";
    let (code, _) = p.curl(&["--data-binary", &format!("@{}", upload.display()), denied]);
    assert_eq!(code, 403);
    // The rest of each body, still arriving after the answer, is not a
    // new request the client abandoned: one refusal, the policy's.
    let mut p = p;
    p.stop();
    let records = p.records();
    let refusals: Vec<_> = records
        .iter()
        .filter(|r| s(r, "/event/action") == "denied")
        .collect();
    assert_eq!(refusals.len(), 1, "{refusals:#?}");
    assert_eq!(s(refusals[0], "/url/full"), denied);
}

/// Sends one request with `Connection: close` and returns the whole answer.
fn raw_exchange(proxy: SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut all = Vec::new();
    // Bounded by the read timeout; the proxy closes after the answer.
    let _ = s.take(1 << 20).read_to_end(&mut all);
    String::from_utf8_lossy(&all).into_owned()
}

#[test]
fn targets_and_versions_are_forwarded_as_http_requires() {
    let p = start_proxy("");
    let port = p.origins.http;
    // An absolute URI with an empty path goes out with the path `/`.
    let answer = raw_exchange(
        p.addr,
        &format!(
            "GET http://origin.test:{port}?q=1 HTTP/1.1\r\nHost: origin.test:{port}\r\nConnection: close\r\n\r\n"
        ),
    );
    assert!(answer.contains("origin saw GET /?q=1 "), "{answer}");
    // Via names the version the request came in; the client is answered
    // in HTTP/1.x as it asked.
    let answer = raw_exchange(
        p.addr,
        &format!("GET http://origin.test:{port}/old HTTP/1.0\r\nHost: origin.test:{port}\r\n\r\n"),
    );
    assert!(answer.contains("via=1.0 palisade"), "{answer}");
    let answer = raw_exchange(
        p.addr,
        &format!(
            "GET http://origin.test:{port}/new HTTP/1.1\r\nHost: origin.test:{port}\r\nConnection: close\r\n\r\n"
        ),
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("via=1.1 palisade"), "{answer}");
    // A port outside 1-65535 is a bad request, not port 80.
    for bad in ["99999", "65616", "0"] {
        let status = raw_status(
            p.addr,
            &format!("GET http://origin.test:{bad}/ HTTP/1.1\r\nHost: origin.test:{bad}\r\n\r\n"),
        );
        assert!(status.starts_with("HTTP/1.1 400"), "port {bad}: {status}");
    }
    p.stop_and_verify();
}

#[test]
fn uploads_that_wait_for_100_continue_go_through() {
    let p = start_proxy("");
    let upload = p.dir.path().join("upload.bin");
    std::fs::write(&upload, vec![b'x'; 2 << 20]).unwrap();
    let data = format!("@{}", upload.display());
    // The client asks for a 100 Continue before it sends the body (curl
    // does so on its own for large bodies); the body must still arrive
    // whole, on a fresh and on a reused origin connection.
    let url = format!("http://origin.test:{}/upload", p.origins.http);
    for _ in 0..2 {
        let started = Instant::now();
        let (code, body) = p.curl(&["-H", "Expect: 100-continue", "--data-binary", &data, &url]);
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("sent=2097152/length"), "{body}");
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "it waited for a timeout"
        );
    }
    // An origin that sends a 100 Continue unasked gets the body too.
    let url = format!("http://early.test:{}/continue", p.origins.early);
    let (code, body) = p.curl(&["-H", "Expect:", "--data-binary", &data, &url]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(body, "got 2097152");
    let r = p.wait_record("for the upload to the 100 origin", |r| {
        s(r, "/url/full") == url
    });
    assert_eq!(n(&r, "/http/response/status_code"), 200);
    assert_eq!(n(&r, "/source/bytes"), 2 << 20);
    p.stop_and_verify();
}

#[test]
fn request_bodies_and_head_requests_are_forwarded() {
    let p = start_proxy("");
    let url = format!("http://origin.test:{}/upload", p.origins.http);
    // A body with a length goes with that length; a chunked one is chunked
    // again toward the origin (Transfer-Encoding is hop-by-hop).
    let (code, body) = p.curl(&["-d", "hello world", &url]);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("origin saw POST /upload"), "{body}");
    assert!(body.contains("sent=11/length"), "{body}");
    let (code, body) = p.curl(&[
        "-H",
        "Transfer-Encoding: chunked",
        "-d",
        "hello world",
        &url,
    ]);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("sent=11/chunked"), "{body}");
    // The uploads' records count the bytes the client sent (what an
    // auditor looks at for exfiltration), for both framings.
    let uploads = |p: &Proxy| {
        p.records()
            .into_iter()
            .filter(|r| s(r, "/http/request/method") == "POST" && s(r, "/url/full") == url)
            .map(|r| n(&r, "/source/bytes"))
            .collect::<Vec<_>>()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while uploads(&p).len() < 2 {
        assert!(Instant::now() < deadline, "records for both uploads");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(uploads(&p), vec![11, 11]);
    // A coding the proxy would have to drop (gzip under chunked) is
    // refused, not passed on as if the body were plain.
    let target = format!("origin.test:{}", p.origins.http);
    let head = raw_status(
        p.addr,
        &format!(
            "POST http://{target}/upload HTTP/1.1\r\nHost: {target}\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        ),
    );
    assert!(head.starts_with("HTTP/1.1 501"), "{head}");
    p.wait_record("for the gzip upload", |r| {
        n(r, "/http/response/status_code") == 501
    });
    let (code, body) = p.curl(&[&url]);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("origin saw GET /upload"), "{body}");
    assert!(body.contains("sent=0/none"), "{body}");
    // HEAD: the length of the body a GET would get, and no body.
    let out = Command::new("curl")
        .args(["-s", "-I", "--max-time", "10", "-x"])
        .arg(format!("http://{}", p.addr))
        .arg(&url)
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-length:"), "{head}");
    assert!(head.contains("via: 1.1 palisade"), "{head}");
    let posts = p
        .records()
        .iter()
        .filter(|r| s(r, "/url/full") == url)
        .count();
    assert!(posts >= 3, "one record per request");
    p.stop_and_verify();
}

#[test]
fn a_client_that_half_closes_still_gets_its_response() {
    let p = start_proxy("");
    let url = format!("http://origin.test:{}/half", p.origins.http);
    let mut c = TcpStream::connect(p.addr).unwrap();
    c.write_all(
        format!(
            "GET {url} HTTP/1.1\r\nHost: origin.test:{}\r\n\r\n",
            p.origins.http
        )
        .as_bytes(),
    )
    .unwrap();
    // Done sending: the client shuts its side and waits for the answer.
    c.shutdown(std::net::Shutdown::Write).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = Vec::new();
    let _ = c.read_to_end(&mut got);
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(got.contains("origin saw GET /half"), "{got}");
    let r = p.wait_record("for the half-closed client", |r| s(r, "/url/full") == url);
    assert_eq!(n(&r, "/http/response/status_code"), 200);
    p.stop_and_verify();
}

#[test]
fn oversize_headers_and_slowloris_are_cut() {
    let p = start_proxy("max_header_bytes = 16384");
    let big = format!("X-Big: {}", "a".repeat(40_000));
    let (code, _) = p.curl(&[
        "-H",
        &big,
        &format!("http://origin.test:{}/", p.origins.http),
    ]);
    assert_eq!(code, 431);
    let r = p.wait_record("for the oversize head", |r| {
        s(r, "/event/reason") == "request head too large"
    });
    // The record says what the client got, under its own request id.
    assert_eq!(n(&r, "/http/response/status_code"), 431);
    assert!(!s(&r, "/http/request/id").is_empty(), "{r}");
    // Nothing was read to record as a method or URL: no placeholders.
    assert!(
        r.pointer("/url").is_none() && r.pointer("/http/request/method").is_none(),
        "{r}"
    );
    // Just over the limit, sent in one write: the limit is the head's
    // size, not how the read buffer happens to fill.
    let target = format!("origin.test:{}", p.origins.http);
    for extra in [100, 4000, 20_000] {
        let head = raw_status(
            p.addr,
            &format!(
                "GET http://{target}/ HTTP/1.1\r\nHost: {target}\r\nX-Big: {}\r\n\r\n",
                "b".repeat(16384 + extra)
            ),
        );
        assert!(head.starts_with("HTTP/1.1 431"), "{extra}: {head}");
    }
    // A URI past hyper's own limit (64 KiB) under a larger head limit:
    // 414, and the record says so.
    let u = start_proxy("max_header_bytes = 131072");
    let head = raw_status(
        u.addr,
        &format!(
            "GET http://{target}/{} HTTP/1.1\r\nHost: {target}\r\n\r\n",
            "u".repeat(70_000)
        ),
    );
    assert!(head.starts_with("HTTP/1.1 414"), "{head}");
    let r = u.wait_record("for the long URI", |r| {
        s(r, "/event/reason") == "request URI too long"
    });
    assert_eq!(n(&r, "/http/response/status_code"), 414);
    u.stop_and_verify();
    // The same at the default limit (64 KiB).
    let d = start_proxy("");
    let target = format!("origin.test:{}", d.origins.http);
    for size in [66_000, 100_000] {
        let head = raw_status(
            d.addr,
            &format!(
                "GET http://{target}/ HTTP/1.1\r\nHost: {target}\r\nX-Big: {}\r\n\r\n",
                "b".repeat(size)
            ),
        );
        assert!(head.starts_with("HTTP/1.1 431"), "{size}: {head}");
    }
    d.stop_and_verify();

    // A client that sends half a request head and stalls.
    let mut slow = TcpStream::connect(p.addr).unwrap();
    slow.write_all(b"GET http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\n")
        .unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let _ = slow.read_to_end(&mut buf);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the proxy must cut a stalled head"
    );
    let r = p.wait_record("for the slowloris client", |r| {
        s_contains(r, "/event/reason", "header read timeout")
    });
    assert!(!s(&r, "/http/request/id").is_empty(), "{r}");
    assert!(n(&r, "/event/duration") > 0, "{r}");

    // Half a head, then the client hangs up: recorded too.
    let mut gone = TcpStream::connect(p.addr).unwrap();
    gone.write_all(b"GET http://blocked.test/partial HTTP/1.1\r\nHost: bl")
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    drop(gone);
    p.wait_record("for the client that left mid-head", |r| {
        s(r, "/event/reason")
            == "the client closed the connection before its request head was complete"
    });
    // An HTTP/2 client with prior knowledge gets no HTTP/1.1 answer (the
    // connection is closed), and the record says why, with no status.
    let head = raw_status(p.addr, "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    assert_eq!(head, "", "nothing is answered to an HTTP/2 preface");
    let r = p.wait_record("for the HTTP/2 preface", |r| {
        s_contains(r, "/event/reason", "HTTP/2 connection preface")
    });
    assert!(r.pointer("/http/response").is_none(), "{r}");
    // A CONNECT in absolute form that is refused names its host and port.
    let head = raw_status(
        p.addr,
        &format!(
            "CONNECT http://secure.test:{0}/ HTTP/1.1\r\nHost: other.test:{0}\r\n\r\n",
            p.origins.tls
        ),
    );
    assert!(head.starts_with("HTTP/1.1 4"), "{head}");
    let r = p.wait_record("for the absolute-form CONNECT", |r| {
        s(r, "/event/code") == "connect_tunnel" && s(r, "/destination/domain") == "secure.test"
    });
    assert_eq!(n(&r, "/destination/port"), u64::from(p.origins.tls), "{r}");
    p.stop_and_verify();
}

#[test]
fn per_client_rate_limit_answers_429() {
    let p = start_proxy("requests_per_second_per_client = 2\nrequest_burst_per_client = 3");
    let url = format!("http://origin.test:{}/", p.origins.http);
    let codes: Vec<u16> = (0..12).map(|_| p.curl(&[&url]).0).collect();
    assert!(codes.contains(&200), "{codes:?}");
    assert!(codes.contains(&429), "{codes:?}");
    p.wait_record("for the 429", |r| {
        n(r, "/http/response/status_code") == 429 && s(r, "/event/action") == "denied"
    });
    p.stop_and_verify();
}

#[test]
fn reload_keeps_serving_through_a_broken_policy() {
    let p = start_proxy("");
    let url = format!("http://origin.test:{}/", p.origins.http);
    assert_eq!(p.curl(&[&url]).0, 200);
    let child = p.child.as_ref().unwrap();
    // A broken policy: reported, the old one stays.
    std::fs::write(
        &p.policy,
        "net local = 127.0.0.1\nhttp origin allow lcal -> \"origin.test\"\n",
    )
    .unwrap();
    signal(child, rustix::process::Signal::HUP);
    let r = p.wait_record("for the failed reload", |r| {
        s(r, "/event/action") == "reload-failed"
    });
    assert!(r.to_string().contains("unknown network"), "{r}");
    assert_eq!(p.curl(&[&url]).0, 200, "the old policy must stay in force");
    // A policy that compiles but fails its own expectations is refused
    // too: it does not do what its authors said.
    std::fs::write(
        &p.policy,
        format!(
            "default deny log\nexpect allow http 127.0.0.1 -> http://origin.test:{}/\n",
            p.origins.http
        ),
    )
    .unwrap();
    signal(child, rustix::process::Signal::HUP);
    let r = p.wait_record("for the refused reload", |r| {
        s(r, "/event/action") == "reload-failed" && r.to_string().contains("expectations fail")
    });
    assert!(r.to_string().contains("E0400"), "{r}");
    assert_eq!(p.curl(&[&url]).0, 200, "the old policy must stay in force");
    // A good policy that denies the origin: swapped in.
    std::fs::write(&p.policy, "default deny log\n").unwrap();
    signal(child, rustix::process::Signal::HUP);
    p.wait_record("for the reload", |r| {
        s(r, "/event/action") == "policy-loaded"
            && s_contains(r, "/event/reason", "")
            && r.to_string().contains("reload")
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while p.curl(&[&url]).0 != 403 {
        assert!(Instant::now() < deadline, "the new policy was not applied");
        std::thread::sleep(Duration::from_millis(50));
    }
    p.stop_and_verify();
}

/// A tunnel is decided when it opens; a reload whose policy no longer
/// allows it cuts it (an emergency deny must not wait for the tunnel to go
/// idle), records it denied with what it carried, and leaves the tunnels
/// the new policy still allows open.
#[test]
fn a_reload_cuts_open_tunnels_the_new_policy_denies() {
    let p = start_proxy("");
    let echo = p.origins.echo;
    let mut doomed = connect_tunnel(p.addr, &format!("echo.test:{echo}"));
    let mut kept = connect_tunnel(p.addr, &format!("127.0.0.1:{echo}"));
    let echoed = |t: &mut TcpStream, msg: &[u8]| {
        t.write_all(msg).unwrap();
        let mut back = vec![0u8; msg.len()];
        t.read_exact(&mut back).unwrap();
        assert_eq!(back, msg);
    };
    echoed(&mut doomed, b"ping\n");
    echoed(&mut kept, b"ping\n");
    // The echo rule keeps its address and loses the name.
    let text = policy_text(&p.origins);
    let narrowed = text.replace("\"echo.test\", 127.0.0.1 port", "127.0.0.1 port");
    assert_ne!(text, narrowed);
    std::fs::write(&p.policy, narrowed).unwrap();
    signal(p.child.as_ref().unwrap(), rustix::process::Signal::HUP);
    let r = p.wait_record("for the cut tunnel", |r| {
        s(r, "/event/code") == "connect_tunnel" && s(r, "/event/action") == "denied"
    });
    assert!(
        s_contains(&r, "/event/reason", "no longer allows it")
            && s_contains(&r, "/event/reason", "echo.test")
            && s_contains(&r, "/event/reason", "admitted by rule echo of ruleset"),
        "{r}"
    );
    // It names the rule and policy that denied it, as any denial does.
    assert_eq!(s(&r, "/rule/name"), "default", "{r}");
    let opened = p.wait_record("for its opening", |o| {
        s(o, "/event/code") == "tunnel_open"
            && s(o, "/http/request/id") == s(&r, "/http/request/id")
    });
    assert_ne!(s(&r, "/rule/ruleset"), s(&opened, "/rule/ruleset"), "{r}");
    assert_eq!(n(&r, "/source/bytes"), 5, "{r}");
    assert_eq!(n(&r, "/http/response/status_code"), 200, "{r}");
    // Its sockets are closed: the client reads the end.
    doomed
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut b = [0u8; 16];
    match doomed.read(&mut b) {
        Ok(0) => {}
        Err(e)
            if !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) => {}
        other => panic!("the cut tunnel is still open: {other:?}"),
    }
    // The other one goes on.
    echoed(&mut kept, b"still here\n");
    drop(kept);
    p.stop_and_verify();
}

/// SIGHUP also reads the configuration file again: limits and fixed host
/// answers change without a restart, together with the policy, and the
/// reload record says which settings changed. A broken configuration keeps
/// the settings and policy in force; a new listen address is refused with
/// a warning (it takes a restart).
#[test]
fn reload_applies_changed_settings_or_none() {
    let p = start_proxy("");
    let config = p.dir.path().join("palisade.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let pinned = format!("http://pinned.origin.test:{}/", p.origins.http);
    let url = format!("http://origin.test:{}/", p.origins.http);
    // Not in [proxy.hosts] yet, and not in DNS: 502.
    assert_eq!(p.curl(&[&pinned]).0, 502);
    let child = p.child.as_ref().unwrap();
    // A broken configuration: refused, the old settings stay.
    std::fs::write(
        &config,
        text.replace("[proxy]\n", "[proxy]\nidle_timeout = 60\n"),
    )
    .unwrap();
    signal(child, rustix::process::Signal::HUP);
    let r = p.wait_record("for the failed reload", |r| {
        s(r, "/event/action") == "reload-failed"
    });
    assert!(r.to_string().contains("idle_timeout"), "{r}");
    let said = p.wait_stderr("reload failed");
    assert!(
        said.contains("previous policy and settings stay in force"),
        "{said}"
    );
    assert_eq!(p.curl(&[&url]).0, 200);
    // A working one: a pinned name, a strict rate limit, a new address.
    let changed = text
        .replace(
            "[proxy.hosts]\n",
            "[proxy.hosts]\n\"pinned.origin.test\" = [\"127.0.0.1\"]\n",
        )
        .replace(
            "[proxy]\n",
            "[proxy]\nrequests_per_second_per_client = 1\nrequest_burst_per_client = 2\n",
        )
        .replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\"");
    std::fs::write(&config, changed).unwrap();
    signal(child, rustix::process::Signal::HUP);
    let said = p.wait_stderr("takes a restart");
    assert!(said.contains("proxy.listen"), "{said}");
    let said = p.wait_stderr("settings changed");
    assert!(
        said.contains("proxy.requests_per_second_per_client 200 -> 1"),
        "{said}"
    );
    assert!(said.contains("proxy.hosts (9 names)"), "{said}");
    let r = p.wait_record("for the reload", |r| {
        s(r, "/event/action") == "policy-loaded"
            && s_contains(r, "/event/reason", "settings changed")
    });
    assert!(
        s(&r, "/event/reason").contains("request_burst_per_client 400 -> 2"),
        "{r}"
    );
    // Still on its address; the pinned name resolves; the limit holds.
    let codes: Vec<u16> = (0..6).map(|_| p.curl(&[&pinned]).0).collect();
    assert_eq!(codes[0], 200, "{codes:?}");
    assert!(codes.contains(&429), "{codes:?}");
    p.stop_and_verify();
}

#[test]
fn rejects_a_config_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "policy = \"x.policy\"\n[proxy]\nmax_headers = 0\n[audit]\nsigning_key = \"k\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(["proxy", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("proxy.max_headers: must be at least 1"));
    let _ = TcpListener::bind("127.0.0.1:0");
}

#[test]
fn idle_keepalive_connections_are_closed() {
    let p = start_proxy("idle_timeout = \"1s\"");
    let mut c = TcpStream::connect(p.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let port = p.origins.http;
    write!(
        c,
        "GET http://origin.test:{port}/ HTTP/1.1\r\nHost: origin.test:{port}\r\n\r\n"
    )
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("origin saw") {
        let n = c.read(&mut buf).unwrap();
        assert!(n > 0, "closed before the response");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    // The connection stays open for the next request, then idles out.
    let started = Instant::now();
    let n = c.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the proxy must close an idle kept-alive connection");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    p.stop_and_verify();
}

#[test]
fn a_kept_alive_connection_waits_the_idle_timeout_not_the_header_timeout() {
    // Header read timeout 1 s (start_proxy), idle timeout 3 s.
    let p = start_proxy("idle_timeout = \"3s\"");
    let mut c = TcpStream::connect(p.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let port = p.origins.http;
    let request =
        format!("GET http://origin.test:{port}/ HTTP/1.1\r\nHost: origin.test:{port}\r\n\r\n");
    let mut buf = [0u8; 4096];
    let mut exchange = |c: &mut TcpStream| {
        c.write_all(request.as_bytes()).unwrap();
        let mut got = Vec::new();
        while !String::from_utf8_lossy(&got).contains("origin saw") {
            let n = c.read(&mut buf).unwrap();
            assert!(n > 0, "closed before the response");
            got.extend_from_slice(&buf[..n]);
        }
    };
    exchange(&mut c);
    // Quiet for longer than the header timeout: still open, and serves.
    std::thread::sleep(Duration::from_millis(2000));
    exchange(&mut c);
    // Then it idles out after the idle timeout.
    let started = Instant::now();
    let mut rest = [0u8; 16];
    assert_eq!(c.read(&mut rest).unwrap_or(0), 0, "closed when idle");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(2500) && waited < Duration::from_secs(8),
        "{waited:?}"
    );
    // An idle client did nothing wrong: no refusal is recorded.
    let denied: Vec<_> = p
        .records()
        .into_iter()
        .filter(|r| s(r, "/event/action") == "denied")
        .collect();
    assert!(denied.is_empty(), "{denied:?}");
    p.stop_and_verify();
}

#[test]
fn origin_connections_are_reused() {
    // Idle origin connections are kept per serving thread (they belong to
    // its event loop): one thread, so the second client surely lands where
    // the first one's connection waits.
    let p = start_proxy("workers = 1");
    let port = p.origins.http;
    let url = |path: &str| format!("http://origin.test:{port}/{path}");
    let from = |body: &str| -> Vec<String> {
        body.lines()
            .filter_map(|l| l.split(" from=").nth(1))
            .map(str::to_string)
            .collect()
    };
    // Two requests on one client connection go out on one origin connection.
    let (code, body) = p.curl(&[&url("a"), &url("b")]);
    assert_eq!(code, 200, "{body}");
    let first = from(&body);
    assert_eq!(first.len(), 2, "{body}");
    assert_eq!(first[0], first[1], "{body}");
    // The next client connection takes it over once the first has left.
    std::thread::sleep(Duration::from_millis(200));
    let (code, body) = p.curl(&[&url("c")]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(from(&body), vec![first[0].clone()], "{body}");
    // Still one record per request.
    for path in ["a", "b", "c"] {
        let r = p.wait_record(path, |r| s(r, "/url/full") == url(path));
        assert_eq!(n(&r, "/http/response/status_code"), 200);
    }
    let per_request = p
        .records()
        .iter()
        .filter(|r| s(r, "/event/code") == "proxy_request")
        .count();
    assert_eq!(per_request, 3);
    p.stop_and_verify();
}

#[test]
fn upstream_failures_are_502_and_audited() {
    let p = start_proxy("");
    let url = format!("http://closed.test:{}/", p.origins.closed);
    let (code, body) = p.curl(&[&url]);
    assert_eq!(code, 502, "{body}");
    assert!(body.contains("rule: closed"), "{body}");
    let r = p.wait_record("for the 502", |r| s(r, "/url/full") == url);
    assert_eq!(n(&r, "/http/response/status_code"), 502);
    // The policy allowed it; the origin failed: not a refusal.
    assert_eq!(s(&r, "/event/action"), "allowed");
    assert_eq!(s(&r, "/destination/ip"), "127.0.0.1");
    // The same through CONNECT.
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_connect}",
            "--max-time",
            "10",
            "-x",
        ])
        .arg(format!("http://{}", p.addr))
        .arg(format!("https://closed.test:{}/", p.origins.closed))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "502");
    p.wait_record("for the tunnel 502", |r| {
        s(r, "/event/code") == "connect_tunnel" && n(r, "/http/response/status_code") == 502
    });
    p.stop_and_verify();
}

#[test]
fn an_upload_to_an_origin_that_never_answers_is_504_with_its_bytes_recorded() {
    let p = start_proxy("upstream_timeout = \"1s\"");
    // The body fits the socket buffers, so all of it leaves palisade
    // before the origin's silence runs out the timeout: the record must
    // say the bytes went out, 504 or not.
    let url = format!("http://silent.test:{}/upload", p.origins.silent);
    let upload = p.dir.path().join("upload.bin");
    std::fs::write(&upload, vec![b'x'; 100_000]).unwrap();
    let (code, body) = p.curl(&[
        "-H",
        "Expect:",
        "--data-binary",
        &format!("@{}", upload.display()),
        &url,
    ]);
    assert_eq!(code, 504, "{body}");
    let r = p.wait_record("for the 504", |r| s(r, "/url/full") == url);
    assert_eq!(n(&r, "/http/response/status_code"), 504);
    assert_eq!(n(&r, "/source/bytes"), 100_000);
    p.stop_and_verify();
}

#[test]
fn an_upload_that_keeps_moving_may_take_longer_than_the_upstream_timeout() {
    // upstream_timeout bounds the origin's silence, not the upload: a body
    // that arrives a byte every 400 ms for 2 s goes through under a 1 s
    // timeout, and the origin's answer comes back.
    use std::io::{Read, Write};
    let p = start_proxy("upstream_timeout = \"1s\"");
    let mut c = std::net::TcpStream::connect(p.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let url = format!("http://origin.test:{}/upload", p.origins.http);
    write!(
        c,
        "POST {url} HTTP/1.1\r\nHost: origin.test:{}\r\nContent-Length: 6\r\nConnection: close\r\n\r\n",
        p.origins.http
    )
    .unwrap();
    for b in b"upload" {
        std::thread::sleep(Duration::from_millis(400));
        c.write_all(&[*b]).unwrap();
    }
    let mut answer = String::new();
    c.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("sent=6/length"), "{answer}");
    let r = p.wait_record("for the upload", |r| s(r, "/url/full") == url);
    assert_eq!(n(&r, "/http/response/status_code"), 200);
    assert_eq!(n(&r, "/source/bytes"), 6);
    p.stop_and_verify();
}

#[test]
fn a_port_already_taken_is_refused_not_shared() {
    let p = start_proxy("");
    // A second proxy on the first one's address must fail as a single
    // socket would, not join its listening sockets and take half the
    // clients.
    let config = p.dir.path().join("second.toml");
    std::fs::write(
        &config,
        format!(
            "policy = \"test.policy\"\n\
             [proxy]\n\
             listen = \"{}\"\n\
             workers = 2\n\
             [audit]\n\
             dir = \"audit-second\"\n\
             signing_key = \"keys/second.key\"\n",
            p.addr
        ),
    )
    .unwrap();
    let mut second = Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(["proxy", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = second.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = second.kill();
            let _ = second.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    let _ = std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut err);
    assert_eq!(status.and_then(|s| s.code()), Some(2), "{err}");
    assert!(
        err.contains(&format!("cannot listen on {}", p.addr)) && err.contains("in use"),
        "{err}"
    );
    // The first one still serves every client.
    for i in 0..8 {
        let url = format!("http://origin.test:{}/still-{i}", p.origins.http);
        let (code, body) = p.curl(&[&url]);
        assert_eq!(code, 200, "{body}");
    }
    p.stop_and_verify();
}

#[test]
fn requests_and_tunnels_open_when_the_proxy_stops_are_recorded() {
    let mut p = start_proxy("");
    // A request waiting for an origin that never answers.
    let url = format!("http://silent.test:{}/waiting", p.origins.silent);
    let proxy = p.addr;
    let waiting = {
        let url = url.clone();
        std::thread::spawn(move || {
            Command::new("curl")
                .args(["-s", "-o", "/dev/null", "--max-time", "20", "-x"])
                .arg(format!("http://{proxy}"))
                .arg(&url)
                .output()
        })
    };
    p.origins
        .silent_accepts
        .lock()
        .unwrap()
        .recv_timeout(Duration::from_secs(10))
        .expect("the proxy did not connect to the silent origin");
    // A tunnel that carried bytes and is still open.
    let mut tunnel = connect_tunnel(p.addr, &format!("echo.test:{}", p.origins.echo));
    tunnel.write_all(b"ping").unwrap();
    let mut back = [0u8; 4];
    tunnel.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"ping");

    p.stop();
    let _ = waiting.join();
    let records = p.records();
    let request = records
        .iter()
        .find(|r| s(r, "/url/full") == url)
        .unwrap_or_else(|| panic!("no record of the waiting request:\n{records:#?}"));
    assert_eq!(s(request, "/event/action"), "allowed");
    assert!(
        s(request, "/event/reason").contains("cut short"),
        "{request:#}"
    );
    assert_eq!(s(request, "/destination/ip"), "127.0.0.1");
    let tunnel = records
        .iter()
        .find(|r| {
            s(r, "/event/code") == "connect_tunnel" && s(r, "/destination/domain") == "echo.test"
        })
        .unwrap_or_else(|| panic!("no record of the open tunnel:\n{records:#?}"));
    assert!(
        s(tunnel, "/event/reason").contains("cut short"),
        "{tunnel:#}"
    );
    assert_eq!(n(tunnel, "/source/bytes"), 4, "{tunnel:#}");
    assert_eq!(n(tunnel, "/destination/bytes"), 4, "{tunnel:#}");
}

/// A stop drains: the proxy stops accepting at once, an idle kept-alive
/// connection is closed, a response the origin is still preparing reaches
/// its client whole (saying `connection: close`) and is recorded as
/// served, an open tunnel keeps carrying bytes, and a second stop signal
/// cuts what is left at once, recorded as cut short.
#[test]
fn a_stop_lets_requests_in_progress_finish() {
    let mut p = start_proxy("drain_timeout = \"30s\"");
    let port = p.origins.http;
    // A kept-alive connection that has been served and now idles.
    let mut idle = TcpStream::connect(p.addr).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        idle,
        "GET http://origin.test:{port}/ HTTP/1.1\r\nHost: origin.test:{port}\r\n\r\n"
    )
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("origin saw") {
        let n = idle.read(&mut buf).unwrap();
        assert!(n > 0, "closed before the response");
        got.extend_from_slice(&buf[..n]);
    }
    // A tunnel that carries bytes.
    let mut tunnel = connect_tunnel(p.addr, &format!("echo.test:{}", p.origins.echo));
    tunnel
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    tunnel.write_all(b"ping").unwrap();
    let mut back = [0u8; 4];
    tunnel.read_exact(&mut back).unwrap();
    // A request the origin answers 1.5 s after it arrives.
    let mut slow = TcpStream::connect(p.addr).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        slow,
        "GET http://origin.test:{port}/slow/1500 HTTP/1.1\r\nHost: origin.test:{port}\r\n\r\n"
    )
    .unwrap();
    // All three are the proxy's before it is stopped (its counters say).
    let child = p.child.as_ref().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        signal(child, rustix::process::Signal::USR1);
        if p.wait_stderr("requests and tunnels").contains("(3 open") {
            break;
        }
        assert!(Instant::now() < deadline, "the slow request never arrived");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(200));
    signal(child, rustix::process::Signal::TERM);
    let said = p.wait_stderr("stopping: no new connections");
    assert!(
        said.contains("3 open may finish within 30s"),
        "{said}\n{:#?}",
        p.records()
    );
    // No new clients: the listening sockets are closed.
    let deadline = Instant::now() + Duration::from_secs(2);
    while TcpStream::connect(p.addr).is_ok() {
        assert!(
            Instant::now() < deadline,
            "the proxy still accepts while draining"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The idle connection is closed at once, not at its idle timeout.
    let started = Instant::now();
    assert_eq!(
        idle.read(&mut buf).unwrap_or(1),
        0,
        "idle connection not closed"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    // The slow response arrives whole, and the connection closes after it.
    let mut answer = String::new();
    slow.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("slow answer after 1500 ms"), "{answer}");
    assert!(
        answer.to_lowercase().contains("connection: close"),
        "{answer}"
    );
    // The tunnel still carries bytes.
    tunnel.write_all(b"pong").unwrap();
    tunnel.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"pong");
    // The proxy counts the finished ones out (its counters, which it still
    // prints while draining, say so) ...
    let child = p.child.as_ref().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        signal(child, rustix::process::Signal::USR1);
        let said = p.wait_stderr("requests and tunnels");
        assert!(said.contains("draining: "), "{said}");
        if said.contains("(1 open") {
            break;
        }
        assert!(Instant::now() < deadline, "still open: {said}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // ... and a second stop cuts the tunnel at once.
    signal(child, rustix::process::Signal::TERM);
    let said = p.wait_stderr("cutting");
    assert!(said.contains("cutting 1 connections"), "{said}");
    let mut child = p.child.take().unwrap();
    common::wait_exit(
        &mut child,
        Duration::from_secs(5),
        "the proxy did not stop on a second signal",
    );
    assert_eq!(tunnel.read(&mut back).unwrap_or(0), 0, "tunnel not closed");
    let (code, out) = common::verify_with(
        &p.dir.path().join("audit"),
        &p.dir.path().join("keys/audit.pub"),
    );
    assert_eq!(code, 0, "verify: {out}");

    let records = p.records();
    let slow = records
        .iter()
        .find(|r| s(r, "/url/full").ends_with("/slow/1500"))
        .unwrap_or_else(|| panic!("no record of the slow request:\n{records:#?}"));
    assert_eq!(s(slow, "/event/action"), "allowed", "{slow:#}");
    assert_eq!(n(slow, "/http/response/status_code"), 200, "{slow:#}");
    assert!(!s(slow, "/event/reason").contains("cut short"), "{slow:#}");
    let tunnel = records
        .iter()
        .find(|r| s(r, "/event/code") == "connect_tunnel")
        .unwrap_or_else(|| panic!("no record of the tunnel:\n{records:#?}"));
    assert!(
        s(tunnel, "/event/reason").contains("cut short"),
        "{tunnel:#}"
    );
    assert_eq!(n(tunnel, "/source/bytes"), 8, "{tunnel:#}");
    assert_eq!(n(tunnel, "/destination/bytes"), 8, "{tunnel:#}");
}

/// A stop is not held by a name lookup the resolver never answers: the
/// lookup runs on a blocking thread the stop does not wait for, so a
/// second signal ends the proxy at once, not at the resolver's timeout
/// (past a service manager's SIGKILL).
#[test]
fn a_lookup_the_resolver_never_answers_does_not_hold_the_stop() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("SKIP: a mount namespace and port 53 need root");
        return;
    }
    // A resolver on loopback that takes queries and never answers.
    let silent = std::net::UdpSocket::bind("127.0.0.153:53").expect("bind 127.0.0.153:53");
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("resolv.conf");
    std::fs::write(
        &conf,
        "nameserver 127.0.0.153\noptions timeout:30 attempts:1\n",
    )
    .unwrap();
    let mut p = start_proxy_with("", &policy_text, Launch::Resolver(&conf));
    // Not pinned in [proxy.hosts]: the proxy asks the resolver.
    let url = format!("http://unpinned.origin.test:{}/", p.origins.http);
    let proxy = p.addr;
    let waiting = std::thread::spawn(move || common::curl_via(proxy, &[&url]));
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut query = [0u8; 512];
    silent
        .recv(&mut query)
        .expect("the proxy never asked the resolver");
    let child = p.child.as_ref().unwrap();
    signal(child, rustix::process::Signal::TERM);
    p.wait_stderr("stopping: no new connections");
    std::thread::sleep(Duration::from_millis(300));
    signal(child, rustix::process::Signal::TERM);
    let mut child = p.child.take().unwrap();
    common::wait_exit(
        &mut child,
        Duration::from_secs(5),
        "the stop waited for the resolver",
    );
    let _ = waiting.join();
    let (code, out) = common::verify_with(
        &p.dir.path().join("audit"),
        &p.dir.path().join("keys/audit.pub"),
    );
    assert_eq!(code, 0, "verify: {out}");
    let r = p
        .records()
        .into_iter()
        .find(|r| s(r, "/url/full").contains("unpinned.origin.test"))
        .expect("no record of the request");
    assert!(s(&r, "/event/reason").contains("cut short"), "{r:#}");
}

/// A Ctrl-C that a wrapper also forwards as SIGTERM arrives as two
/// signals at once: that is one stop, which drains; a stop sent later
/// cuts.
#[test]
fn two_signals_at_once_are_one_stop() {
    let mut p = start_proxy("drain_timeout = \"30s\"");
    let mut tunnel = connect_tunnel(p.addr, &format!("echo.test:{}", p.origins.echo));
    tunnel.write_all(b"ping").unwrap();
    let mut back = [0u8; 4];
    tunnel.read_exact(&mut back).unwrap();
    let child = p.child.as_ref().unwrap();
    signal(child, rustix::process::Signal::INT);
    signal(child, rustix::process::Signal::TERM);
    p.wait_stderr("stopping: no new connections");
    std::thread::sleep(Duration::from_millis(500));
    let mut child = p.child.take().unwrap();
    assert!(
        child.try_wait().unwrap().is_none(),
        "two signals at once cut the drain short"
    );
    // The tunnel still carries bytes.
    tunnel.write_all(b"pong").unwrap();
    tunnel.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"pong");
    signal(&child, rustix::process::Signal::TERM);
    common::wait_exit(
        &mut child,
        Duration::from_secs(5),
        "a later stop did not cut",
    );
}

/// SIGUSR1 prints the counters, as for the filter, and the proxy serves
/// on (a signal an operator sends to both daemons must not stop one).
#[test]
fn sigusr1_prints_the_counters() {
    let p = start_proxy("");
    let url = format!("http://origin.test:{}/", p.origins.http);
    assert_eq!(p.curl(&[&url]).0, 200);
    assert_eq!(p.curl(&["http://blocked.test/"]).0, 403);
    // Refused after its CONNECT: not TLS where the rule wants it.
    let mut t = connect_tunnel(p.addr, &format!("secure.test:{}", p.origins.tls));
    t.write_all(b"not tls\n").unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(t.read(&mut buf).unwrap_or(0), 0);
    p.wait_record("for the refused tunnel", |r| {
        s_contains(r, "/event/reason", "does not start with a TLS ClientHello")
    });
    // Refused before it could be read.
    assert!(raw_status(p.addr, "NOT HTTP\r\n\r\n").contains(" 400 "));
    p.wait_record("for the malformed request", |r| {
        s(r, "/event/reason") == "malformed request"
    });
    signal(p.child.as_ref().unwrap(), rustix::process::Signal::USR1);
    let line = p.wait_stderr("requests and tunnels");
    // As the trail counts them.
    assert!(
        line.contains("4 requests and tunnels (1 tunnels)"),
        "{line}"
    );
    assert!(line.contains("3 denied"), "{line}");
    assert_eq!(p.curl(&[&url]).0, 200, "still serving");
    p.stop_and_verify();
}

/// A policy that does not compile stops the proxy at start, before it
/// opens its audit trail (no boot is recorded that served nothing), with
/// the diagnostic as `check` prints it. A policy put in force with
/// warnings (here: empty, at a reload) has them said on stderr.
#[test]
fn policy_errors_stop_the_start_and_warnings_are_said() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.policy"),
        "rule x allow nothere -> any\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("palisade.toml"),
        "policy = \"bad.policy\"\n[proxy]\nlisten = \"127.0.0.1:0\"\n[audit]\ndir = \"audit\"\nsigning_key = \"keys/audit.key\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(["proxy", "--config"])
        .arg(dir.path().join("palisade.toml"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("error[E0101]: unknown network `nothere`"),
        "{err}"
    );
    assert!(!err.contains("error: error"), "{err}");
    assert!(
        !dir.path().join("audit").exists(),
        "no trail for a start that failed"
    );

    let p = start_proxy("");
    // The key the proxy created is its owner's alone: no warning.
    assert!(
        !p.startup
            .iter()
            .any(|l| l.contains("signing key") && l.contains("other users")),
        "{:#?}",
        p.startup
    );
    // A key others can read is said at start.
    let loose = |dir: &Path| {
        let keys = dir.join("keys");
        let o = Command::new(env!("CARGO_BIN_EXE_palisade"))
            .args(["audit", "keygen", "--out"])
            .arg(&keys)
            .output()
            .unwrap();
        assert!(o.status.success());
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            keys.join("audit.key"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
    };
    let q = start_proxy_with("", &policy_text, Launch::Prepare(&loose));
    assert!(
        q.startup.iter().any(|l| l.contains("signing key")
            && l.contains("mode 644")
            && l.contains("chmod 600")),
        "{:#?}",
        q.startup
    );
    q.stop_and_verify();
    std::fs::write(&p.policy, "").unwrap();
    signal(p.child.as_ref().unwrap(), rustix::process::Signal::HUP);
    p.wait_stderr("warning[W0303]");
    p.wait_stderr("has no rules: everything is denied");
    // An expectation that relied on a rule past its date is said, and the
    // policy still goes in force: a restart or reload must not refuse what
    // a running proxy did by itself at the rule's last midnight.
    std::fs::write(
        &p.policy,
        "net here = 127.0.0.1\nhttp old allow here -> \"old.test\" expires 2020-01-01\ndefault deny\nexpect allow http 127.0.0.1 -> http://old.test/\n",
    )
    .unwrap();
    signal(p.child.as_ref().unwrap(), rustix::process::Signal::HUP);
    p.wait_stderr(
        "warning[W0404]: expectation no longer holds: rule `old`, which it relies on, expired on 2020-01-01",
    );
    p.wait_stderr("palisade proxy: reloaded policy");
    // One the rules contradict still keeps the policy out.
    std::fs::write(
        &p.policy,
        "net here = 127.0.0.1\ndefault deny\nexpect allow http 127.0.0.1 -> http://old.test/\n",
    )
    .unwrap();
    signal(p.child.as_ref().unwrap(), rustix::process::Signal::HUP);
    p.wait_stderr("reload failed, the previous policy and settings stay in force");
    p.wait_stderr("error[E0400]: expectation failed");
    p.stop_and_verify();
}

/// Mounts a small tmpfs for a test and always takes it away again.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(at: &Path) -> SmallFs {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
            .arg(at)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount tmpfs at {}", at.display());
        SmallFs(at.to_path_buf())
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// An operator hears at once, on stderr, that the audit trail cannot be
/// written (its records cannot say so until it can), and when it can
/// again.
#[test]
fn audit_write_failures_are_said_on_stderr() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("SKIP: mounting a small filesystem needs root");
        return;
    }
    let fs = std::cell::RefCell::new(None);
    let mount = |dir: &Path| *fs.borrow_mut() = Some(SmallFs::mount(&dir.join("audit")));
    let p = start_proxy_with("", &policy_text, Launch::Prepare(&mount));
    let url = format!("http://origin.test:{}/", p.origins.http);
    assert_eq!(p.curl(&[&url]).0, 200);
    // Fill the filesystem the trail is on.
    let filler = p.dir.path().join("audit/filler");
    {
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 4096];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }
    // Fail-closed (the default): the request is refused, and stderr says
    // why.
    let deadline = Instant::now() + Duration::from_secs(10);
    while p.curl(&[&url]).0 != 503 {
        assert!(
            Instant::now() < deadline,
            "no 503 with the trail's disk full"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let said = p.wait_stderr("audit trail: writes are failing");
    assert!(said.contains("fail-closed"), "{said}");
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while p.curl(&[&url]).0 != 200 {
        assert!(Instant::now() < deadline, "the trail did not recover");
        std::thread::sleep(Duration::from_millis(100));
    }
    p.wait_stderr("audit trail: writes succeed again");
    let mut p = p;
    p.stop();
    // Unmounted before the test's directory is removed.
    drop(fs.borrow_mut().take());
    drop(p);
}

/// Deleting the audit directory under a running proxy is noticed at the
/// next write: the records are not written into a file no one can read.
/// The trail goes on in a new file in a new directory whose first record
/// names the lost file, the failure and what it cost are recorded, stderr
/// says so, and `audit verify` reports the trail as incomplete.
#[test]
fn a_deleted_audit_directory_is_noticed_and_the_trail_goes_on() {
    let mut p = start_proxy("");
    let url = format!("http://origin.test:{}/", p.origins.http);
    assert_eq!(p.curl(&[&url]).0, 200);
    let audit = p.dir.path().join("audit");
    p.wait_record("for the first request", |r| s(r, "/url/full") == url);
    std::fs::remove_dir_all(&audit).unwrap();
    let said = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            p.curl(&[&url]);
            if let Ok(line) = p.stderr.recv_timeout(Duration::from_millis(200)) {
                if line.contains("the trail goes on in") {
                    break line;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the deleted trail was not noticed"
            );
        }
    };
    assert!(said.contains("was deleted or replaced"), "{said}");
    let fresh = format!("http://www.origin.test:{}/after", p.origins.http);
    let deadline = Instant::now() + Duration::from_secs(10);
    while p.curl(&[&fresh]).0 != 200 {
        assert!(Instant::now() < deadline, "the trail did not recover");
        std::thread::sleep(Duration::from_millis(100));
    }
    p.wait_record("for the request after the deletion", |r| {
        s(r, "/url/full") == fresh
    });
    let records = p.records();
    assert_eq!(
        s(&records[0], "/event/action"),
        "rotation",
        "{:#}",
        records[0]
    );
    let failed = records
        .iter()
        .find(|r| s(r, "/event/action") == "log-failed")
        .unwrap_or_else(|| panic!("no log-failed record:\n{records:#?}"));
    assert!(
        failed.to_string().contains("deleted or replaced"),
        "{failed:#}"
    );
    assert!(records
        .iter()
        .any(|r| s(r, "/event/action") == "log-recovered"));
    let mut child = p.child.take().unwrap();
    signal(&child, rustix::process::Signal::TERM);
    common::wait_exit(
        &mut child,
        Duration::from_secs(10),
        "the proxy did not stop",
    );
    let (code, out) = common::verify_with(&audit, &p.dir.path().join("keys/audit.pub"));
    assert_ne!(
        code, 0,
        "verify must not call a trail with a lost file whole: {out}"
    );
    assert!(out.contains("audit-00000001.jsonl"), "{out}");
}

/// Debian's libfaketime (package faketime), if installed.
fn libfaketime() -> Option<std::path::PathBuf> {
    std::fs::read_dir("/usr/lib")
        .ok()?
        .filter_map(Result::ok)
        .map(|d| d.path().join("faketime/libfaketime.so.1"))
        .find(|p| p.exists())
}

/// A rule that expires while the proxy runs stops matching when its date
/// ends (midnight UTC), without a reload, and the trail says so. The
/// proxy's clock is started just before midnight with libfaketime.
#[test]
fn a_rule_stops_matching_when_its_expiry_date_ends() {
    if libfaketime().is_none() {
        eprintln!("SKIP: this test needs libfaketime (.ci/run installs package faketime)");
        return;
    }
    let expiring = |o: &Origins| {
        policy_text(o).replace(
            &format!("127.0.0.1 port {}\n", o.http),
            &format!("127.0.0.1 port {} expires 2027-06-30\n", o.http),
        )
    };
    let p = start_proxy_with("", &expiring, Launch::FakeTime("@2027-06-30 23:59:57"));
    let url = format!("http://origin.test:{}/", p.origins.http);
    let (code, body) = p.curl(&[&url]);
    assert_eq!(code, 200, "allowed before midnight: {body}");
    // Due at the proxy's midnight, 3 s after it started (wait_record
    // waits up to 10 s).
    let r = p.wait_record("for the expiry", |r| {
        s(r, "/event/action") == "policy-loaded" && s(r, "/event/reason").contains("expired")
    });
    assert!(
        s(&r, "/event/reason").contains("again on 2027-07-01: rule(s) `origin` expired"),
        "{r}"
    );
    let (code, body) = p.curl(&[&url]);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("rule: default"), "{body}");
    p.stop_and_verify();
}

/// A deny rule whose expiry would let through what the policy's own
/// `expect ... deny` holds it to deny stays in force at its midnight (a
/// restart would refuse the file as it stands), and the trail and the
/// operator are told which rule and which expectation.
#[test]
fn a_deny_rule_an_expectation_needs_outlives_its_date() {
    if libfaketime().is_none() {
        eprintln!("SKIP: this test needs libfaketime (.ci/run installs package faketime)");
        return;
    }
    let held = |o: &Origins| {
        policy_text(o).replace(
            "http origin ",
            "http legacy deny local -> \"legacy.origin.test\" expires 2027-06-30\nhttp origin ",
        ) + &format!(
            "expect deny http 127.0.0.1 -> http://legacy.origin.test:{}/\n",
            o.http
        )
    };
    let p = start_proxy_with("", &held, Launch::FakeTime("@2027-06-30 23:59:57"));
    let r = p.wait_record("for the expiry", |r| {
        s(r, "/event/action") == "policy-loaded" && s(r, "/event/reason").contains("expired")
    });
    let why = s(&r, "/event/reason");
    assert!(
        why.contains("again on 2027-07-01: deny rule(s) `legacy` expired but stay in force")
            && why.contains("expect deny http 127.0.0.1 -> http://legacy.origin.test"),
        "{r}"
    );
    let (code, body) = p.curl(&[&format!("http://legacy.origin.test:{}/", p.origins.http)]);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("rule: legacy"), "{body}");
    let (code, body) = p.curl(&[&format!("http://origin.test:{}/", p.origins.http)]);
    assert_eq!(code, 200, "{body}");
    p.stop_and_verify();
}

/// A response that lasts longer than a few seconds is in the trail while
/// it lasts (`response_open`, with the bytes so far), even while no data
/// comes, and its `proxy_request` record follows at its end with the same
/// request id.
#[test]
fn a_long_response_is_in_the_trail_while_it_streams() {
    let p = start_proxy("");
    // 1000 bytes, 6 s of nothing, 1000 bytes.
    let url = format!("http://origin.test:{}/drip/2/6000", p.origins.http);
    let (code, body) = p.curl(&[&url]);
    assert_eq!((code, body.len()), (200, 2_000));
    let end = p.wait_record("for the request's record", |r| {
        s(r, "/event/code") == "proxy_request" && s(r, "/url/full") == url
    });
    assert_eq!(n(&end, "/destination/bytes"), 2_000, "{end}");
    assert_eq!(s(&end, "/event/reason"), "allowed by rule", "{end}");
    let id = s(&end, "/http/request/id");
    let opening = p.wait_record("for the response's opening record", |r| {
        s(r, "/event/code") == "response_open"
    });
    assert_eq!(s(&opening, "/http/request/id"), id, "{opening}");
    assert_eq!(
        s(&opening, "/event/reason"),
        "allowed by rule; the response is still streaming"
    );
    // Written at 5 s, while the origin sent nothing.
    assert_eq!(n(&opening, "/destination/bytes"), 1_000, "{opening}");
    assert!(
        opening["seq"].as_u64() < end["seq"].as_u64(),
        "{opening} {end}"
    );
    p.stop_and_verify();
}

/// A client that sends `GET path` to the origin through the proxy with a
/// 4 kB receive buffer and reads nothing of the answer.
fn ask_without_reading(p: &Proxy, path: &str) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&p.addr.into()).unwrap();
    let mut client: TcpStream = sock.into();
    let target = format!("origin.test:{}", p.origins.http);
    client
        .write_all(
            format!("GET http://{target}{path} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes(),
        )
        .unwrap();
    client
}

/// A response whose client stopped reading is in the trail too: the
/// proxy polls nothing of it then, but its `response_open` record is due
/// all the same.
#[test]
fn a_response_the_client_stopped_reading_is_in_the_trail() {
    let p = start_proxy("");
    let client = ask_without_reading(&p, "/big/33554432");
    let opening = p.wait_record("for the opening record of the unread response", |r| {
        s(r, "/event/code") == "response_open"
    });
    assert!(
        s(&opening, "/url/full").ends_with("/big/33554432"),
        "{opening}"
    );
    assert!(n(&opening, "/destination/bytes") < 33_554_432, "{opening}");
    drop(client);
    let end = p.wait_record("for the request's record", |r| {
        s(r, "/event/code") == "proxy_request" && s(r, "/url/full").ends_with("/big/33554432")
    });
    assert_eq!(
        s(&end, "/event/reason"),
        "allowed by rule; the response did not complete"
    );
    p.stop_and_verify();
}

/// A client that asks for a large response and never reads it does not keep
/// its connection (and an origin connection) past the idle timeout: the
/// proxy cuts it and the record says the response did not complete.
#[test]
fn a_client_that_stops_reading_is_cut_after_the_idle_timeout() {
    let p = start_proxy("idle_timeout = \"2s\"");
    let client = ask_without_reading(&p, "/big/33554432");
    let r = p.wait_record("for the response the client never read", |r| {
        s(r, "/event/reason") == "allowed by rule; the response did not complete"
    });
    assert!(n(&r, "/destination/bytes") < 33_554_432, "{r}");
    drop(client);

    p.stop_and_verify();
}
