//! The inline filter as an operator runs it: the real `palisade filter`
//! binary between two veth ports in a namespace of its own, a VNet host on
//! the edge side and an on-premises host on the other, real traffic
//! (ping, TCP, UDP), documentation addresses only, everything torn down
//! on drop even when a test fails. Needs root, iproute2, ethtool, python3.

mod common;
use common::{records, s, signal, stop_and_verify};

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static NEXT: AtomicU32 = AtomicU32::new(0);

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn sh(cmd: &str) {
    let o = Command::new("sh").args(["-c", cmd]).output().unwrap();
    assert!(
        o.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

const POLICY: &str = "\
net vnet       = 192.0.2.0/25, 2001:db8:1::/65
net onprem     = 192.0.2.128/25, 2001:db8:1:0:8000::/65
net admins     = 192.0.2.128/28
net onprem-srv = 192.0.2.200, 2001:db8:1:0:8000::20

zone edge   = vnet
zone onprem = onprem

rule web  allow vnet -> onprem-srv service tcp/8080, udp/5353
rule ping allow vnet -> onprem service icmp/echo-request, icmpv6/echo-request
rule mgmt allow admins -> vnet service tcp/2222
default deny log
";

/// vnet host -- [e0 filter o0] -- onprem host.
struct Net {
    vnet: String,
    fw: String,
    onprem: String,
    dir: tempfile::TempDir,
    filter: Option<Child>,
    servers: Vec<Child>,
    /// The filter's port kind: "batched" (offloads on) or "pnet" (off).
    io: &'static str,
    /// The filter's stderr, line by line.
    lines: Option<std::sync::mpsc::Receiver<String>>,
    /// What it said on stderr before it started forwarding.
    startup: Vec<String>,
    /// Runs the filter as an unprivileged user holding only the
    /// capabilities the README and the shipped systemd unit give it.
    least_privilege: bool,
}

/// What the filter needs instead of root (README, and the shipped unit's
/// `AmbientCapabilities`).
const FILTER_CAPS: &str = "-all,+net_raw,+net_admin,+bpf";

impl Drop for Net {
    fn drop(&mut self) {
        for c in self.servers.iter_mut().chain(self.filter.iter_mut()) {
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in [&self.vnet, &self.fw, &self.onprem] {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

/// Namespaces this test file made in a run that was killed (a SIGKILL
/// skips `Drop`): `pf{v,f,o}<pid>x<n>` whose test process is gone.
fn remove_orphaned_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = ["pfv", "pff", "pfo"]
            .iter()
            .find_map(|p| name.strip_prefix(p))
        else {
            continue;
        };
        let Some((pid, n)) = rest.split_once('x') else {
            continue;
        };
        let ours = !pid.is_empty()
            && pid.bytes().all(|b| b.is_ascii_digit())
            && !n.is_empty()
            && n.bytes().all(|b| b.is_ascii_digit());
        if ours && !Path::new("/proc").join(pid).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}

fn probe() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/filter/netprobe.py")
}

impl Net {
    /// The default: batched ports, and every interface keeps its
    /// offloads (segmentation, checksums) as a real deployment does.
    fn new() -> Net {
        Net::with("batched")
    }

    fn with(io: &'static str) -> Net {
        remove_orphaned_namespaces();
        let id = format!(
            "{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let net = Net {
            vnet: format!("pfv{id}"),
            fw: format!("pff{id}"),
            onprem: format!("pfo{id}"),
            dir: tempfile::tempdir().unwrap(),
            filter: None,
            servers: Vec::new(),
            io,
            lines: None,
            startup: Vec::new(),
            least_privilege: false,
        };
        let (v, f, o) = (&net.vnet, &net.fw, &net.onprem);
        for n in [v, f, o] {
            sh(&format!("ip netns add {n} && ip -n {n} link set lo up"));
        }
        sh(&format!(
            "ip link add v0 netns {v} type veth peer name e0 netns {f}"
        ));
        sh(&format!(
            "ip link add h0 netns {o} type veth peer name o0 netns {f}"
        ));
        // The appliance's ports carry no addresses and the kernel does not
        // forward. pnet ports need offloads off so frames are whole and
        // checksummed; batched ports carry the offload metadata across.
        for p in ["e0", "o0"] {
            sh(&format!("ip -n {f} link set {p} up"));
            sh(&format!(
                "ip netns exec {f} sysctl -qw net.ipv6.conf.{p}.disable_ipv6=1"
            ));
            if io == "pnet" {
                sh(&format!("ip netns exec {f} ethtool -K {p} gro off gso off tso off tx off rx off >/dev/null 2>&1 || true"));
            }
        }
        if io == "pnet" {
            sh(&format!(
                "ip netns exec {v} ethtool -K v0 tx off gso off tso off >/dev/null 2>&1 || true"
            ));
            sh(&format!(
                "ip netns exec {o} ethtool -K h0 tx off gso off tso off >/dev/null 2>&1 || true"
            ));
        }
        sh(&format!("ip -n {v} addr add 192.0.2.10/24 dev v0"));
        sh(&format!("ip -n {v} addr add 192.0.2.201/32 dev v0"));
        sh(&format!(
            "ip -n {v} addr add 2001:db8:1::10/64 dev v0 nodad"
        ));
        sh(&format!("ip -n {o} addr add 192.0.2.200/24 dev h0"));
        sh(&format!("ip -n {o} addr add 192.0.2.130/24 dev h0"));
        sh(&format!(
            "ip -n {o} addr add 2001:db8:1:0:8000::20/64 dev h0 nodad"
        ));
        sh(&format!("ip -n {v} link set v0 up"));
        sh(&format!("ip -n {o} link set h0 up"));
        net
    }

    fn start_filter(&mut self) {
        self.start_filter_with("");
    }

    /// Starts the filter with `extra` lines in its `[filter]` section.
    fn start_filter_with(&mut self, extra: &str) {
        let policy = self.dir.path().join("filter.policy");
        std::fs::write(&policy, POLICY).unwrap();
        std::fs::write(
            self.dir.path().join("palisade.toml"),
            format!("policy = \"filter.policy\"\n[filter]\nedge = \"e0\"\nonprem = \"o0\"\nio = \"{}\"\n{extra}\n[audit]\ndir = \"audit\"\nsigning_key = \"keys/audit.key\"\n", self.io),
        )
        .unwrap();
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.fw]);
        if self.least_privilege {
            // The test's folder becomes the user's, as a service's state
            // directory is, and so does the ports' claim directory, as the
            // shipped unit's RuntimeDirectory is (root, which the other
            // tests' filters run as, may write in it still).
            sh(&format!(
                "chown -R 65534:65534 {}",
                self.dir.path().display()
            ));
            sh("mkdir -p -m 0755 /run/palisade-filter && chown 65534:65534 /run/palisade-filter");
            command.args([
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps",
                FILTER_CAPS,
                "--ambient-caps",
                FILTER_CAPS,
                "--bounding-set",
                FILTER_CAPS,
                "--",
            ]);
        }
        let mut child = command
            .arg(env!("CARGO_BIN_EXE_palisade"))
            .args(["filter", "--config"])
            .arg(self.dir.path().join("palisade.toml"))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        // Held (and so killed on drop) before anything here can fail.
        self.filter = Some(child);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("filter: {line}");
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("the filter did not start");
            if line.contains("forwarding between") {
                // Batched ports get the kernel fast path; pnet ports cannot.
                let expect = if self.io == "batched" {
                    "kernel fast path on"
                } else {
                    "kernel fast path off (it needs batched ports)"
                };
                assert!(line.contains(expect), "{line}");
                break;
            }
            self.startup.push(line);
        }
        self.lines = Some(rx);
    }

    /// The next line of the filter's stderr that contains `text`.
    fn wait_line(&self, text: &str) -> String {
        let rx = self.lines.as_ref().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(l) if l.contains(text) => return l,
                Ok(_) => {}
                Err(_) => panic!("the filter printed no line with {text:?}"),
            }
        }
    }

    fn serve(&mut self, ns: &str, args: &[&str]) {
        let mut c = Command::new("ip")
            .args(["netns", "exec", ns, "python3"])
            .arg(probe())
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(c.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "READY");
        self.servers.push(c);
    }

    fn run(&self, ns: &str, args: &[&str]) -> String {
        let o = Command::new("ip")
            .args(["netns", "exec", ns, "python3"])
            .arg(probe())
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    fn ping(&self, ns: &str, dst: &str) -> bool {
        Command::new("ip")
            .args(["netns", "exec", ns, "ping", "-c", "1", "-W", "2", dst])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    fn signal(&self, sig: rustix::process::Signal) {
        // `ip netns exec` execs the binary, so the child is the filter.
        signal(self.filter.as_ref().unwrap(), sig);
    }

    fn records(&self) -> Vec<serde_json::Value> {
        records(&self.dir.path().join("audit"))
    }

    /// The first record in the running filter's trail that satisfies
    /// `want`, waiting up to 10 s for it to be written.
    fn wait_record(
        &self,
        what: &str,
        want: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(r) = self.records().into_iter().find(|r| want(r)) {
                return r;
            }
            assert!(Instant::now() < deadline, "no {what} record");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop_and_verify(&mut self) -> Vec<serde_json::Value> {
        stop_and_verify(
            self.filter.take().unwrap(),
            "the filter",
            &self.dir.path().join("audit"),
            &self.dir.path().join("keys/audit.pub"),
        );
        self.records()
    }
}

fn ready() -> bool {
    if !(root() && have("ip") && have("ethtool") && have("python3") && have("ping")) {
        eprintln!("SKIP: the filter tests need root, iproute2, ethtool, python3 and ping (.ci/run installs them)");
        return false;
    }
    true
}

#[test]
fn allowed_flows_pass_both_ways_and_the_rest_is_dropped() {
    if !ready() {
        return;
    }
    allowed_and_dropped(Net::new());
}

#[test]
fn pnet_ports_with_offloads_off_filter_the_same() {
    if !ready() {
        return;
    }
    allowed_and_dropped(Net::with("pnet"));
}

/// The filter needs no root: as another user with only CAP_NET_RAW,
/// CAP_NET_ADMIN and CAP_BPF (what the shipped systemd unit grants), it
/// opens its ports, loads its kernel fast path and filters the same.
#[test]
fn the_filter_runs_with_three_capabilities_instead_of_root() {
    if !ready() || !have("setpriv") {
        return;
    }
    let mut net = Net::new();
    net.least_privilege = true;
    allowed_and_dropped(net);
}

/// An operator who starts the filter without its capabilities is told
/// which it needs, not only "Operation not permitted".
#[test]
fn without_its_capabilities_the_filter_says_which_it_needs() {
    if !ready() || !have("setpriv") {
        return;
    }
    let net = Net::new();
    std::fs::write(net.dir.path().join("filter.policy"), POLICY).unwrap();
    let config = net.dir.path().join("palisade.toml");
    std::fs::write(
        &config,
        "policy = \"filter.policy\"\n[filter]\nedge = \"e0\"\nonprem = \"o0\"\n[audit]\ndir = \"audit\"\nsigning_key = \"keys/audit.key\"\n",
    )
    .unwrap();
    sh(&format!(
        "chown -R 65534:65534 {}",
        net.dir.path().display()
    ));
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &net.fw,
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
        ])
        .args([
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--",
        ])
        .arg(env!("CARGO_BIN_EXE_palisade"))
        .args(["filter", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(
        said.contains("error: port e0:") && said.contains("needs CAP_NET_RAW and CAP_NET_ADMIN"),
        "{said}"
    );
}

/// A second filter started on a port the first one holds (another
/// config, another audit trail) refuses to start and names the holder;
/// the first one goes on filtering alone.
#[test]
fn a_second_filter_on_the_same_port_refuses_to_start() {
    if !ready() {
        return;
    }
    let mut net = Net::new();
    net.start_filter();
    let holder = net.filter.as_ref().unwrap().id();
    let other = net.dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("filter.policy"), POLICY).unwrap();
    // Only the onprem port is shared: either one is enough to refuse.
    sh(&format!(
        "ip -n {} link add x0 type veth peer name x1 && ip -n {} link set x0 up",
        net.fw, net.fw
    ));
    let config = other.join("palisade.toml");
    std::fs::write(
        &config,
        "policy = \"filter.policy\"\n[filter]\nedge = \"x0\"\nonprem = \"o0\"\n[audit]\ndir = \"audit\"\nsigning_key = \"keys/audit.key\"\n",
    )
    .unwrap();
    let out = Command::new("timeout")
        .args(["20", "ip", "netns", "exec", &net.fw])
        .arg(env!("CARGO_BIN_EXE_palisade"))
        .args(["filter", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(
        said.contains("error: port o0: already in use by another palisade filter")
            && said.contains(&format!("(pid {holder})")),
        "{said}"
    );
    assert!(
        !other.join("audit").exists(),
        "the refused filter opened no audit trail"
    );
    // The first filter still forwards.
    let v = net.vnet.clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !net.ping(&v, "192.0.2.200") {
        assert!(
            Instant::now() < deadline,
            "the first filter stopped forwarding"
        );
    }
    net.stop_and_verify();
}

/// A port that is down at start is warned of, and traffic flows once it
/// is up.
#[test]
fn a_port_down_at_start_is_warned_of() {
    if !ready() {
        return;
    }
    let mut net = Net::new();
    sh(&format!("ip -n {} link set o0 down", net.fw));
    net.start_filter();
    assert!(
        net.startup
            .iter()
            .any(|l| l.contains("warning: port o0 is down")),
        "{:?}",
        net.startup
    );
    sh(&format!("ip -n {} link set o0 up", net.fw));
    let v = net.vnet.clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !net.ping(&v, "192.0.2.200") {
        assert!(Instant::now() < deadline, "no traffic once o0 is up");
    }
    net.stop_and_verify();
}

fn allowed_and_dropped(mut net: Net) {
    net.start_filter();
    let (v, o) = (net.vnet.clone(), net.onprem.clone());
    net.serve(&o, &["serve-tcp", "8080"]);
    net.serve(&o, &["serve-tcp", "9090"]);
    net.serve(&o, &["serve-udp", "5353"]);
    net.serve(&v, &["serve-tcp", "2222"]);

    // VNet to on-prem, allowed: TCP and UDP, replies through conntrack.
    assert_eq!(
        net.run(&v, &["tcp", "192.0.2.200", "8080", "hello"]),
        "hello"
    );
    assert_eq!(net.run(&v, &["udp", "192.0.2.200", "5353", "dns?"]), "dns?");
    assert_eq!(
        net.run(&v, &["tcp", "2001:db8:1:0:8000::20", "8080", "six"]),
        "six"
    );
    assert!(net.ping(&v, "192.0.2.200"), "allowed ping");
    // Denied: another port, and on-prem to an unlisted port of the VNet.
    assert_eq!(
        net.run(&v, &["tcp", "192.0.2.200", "9090", "no"]),
        "TIMEOUT"
    );
    // On-prem to the VNet: management only from the admin range.
    assert_eq!(
        net.run(&o, &["tcp", "192.0.2.10", "2222", "admin", "192.0.2.130"]),
        "admin"
    );
    assert_eq!(
        net.run(
            &o,
            &["tcp", "192.0.2.10", "2222", "intruder", "192.0.2.200"]
        ),
        "TIMEOUT"
    );
    assert!(
        !net.ping(&o, "192.0.2.10"),
        "no rule allows on-prem to ping the VNet"
    );
    // Spoofing: the VNet host sends from an on-prem address.
    assert_eq!(
        net.run(&v, &["udp", "192.0.2.200", "5353", "spoof", "192.0.2.201"]),
        "TIMEOUT"
    );

    // The counters, live: SIGUSR1 prints them without stopping anything.
    net.signal(rustix::process::Signal::USR1);
    let hits = net.wait_line("flows admitted per rule");
    assert!(hits.contains("web ") && hits.contains("mgmt 1"), "{hits}");
    assert!(
        net.ping(&v, "192.0.2.200"),
        "still forwarding after SIGUSR1"
    );

    let records = net.stop_and_verify();
    let starts: Vec<_> = records
        .iter()
        .filter(|r| s(r, "/event/code") == "flow_start")
        .collect();
    assert!(
        starts
            .iter()
            .any(|r| s(r, "/rule/name") == "web" && s(r, "/destination/ip") == "192.0.2.200"),
        "{starts:#?}"
    );
    assert!(starts
        .iter()
        .any(|r| s(r, "/rule/name") == "mgmt" && s(r, "/source/ip") == "192.0.2.130"));
    let drops: Vec<_> = records
        .iter()
        .filter(|r| s(r, "/event/code") == "drop_summary")
        .collect();
    assert!(
        drops
            .iter()
            .any(|r| r.pointer("/destination/port").and_then(|p| p.as_u64()) == Some(9090)),
        "{drops:#?}"
    );
    assert!(
        drops.iter().any(|r| s(r, "/source/ip") == "192.0.2.201"
            && s(r, "/event/reason") == "source address not in the arrival port's zone"
            && r.pointer("/rule").is_none()),
        "the spoofed packet is recorded as spoofed, with no rule: {drops:#?}"
    );
    // Every summary says why and on which port; only policy drops name a
    // rule, and that rule denies.
    for r in &drops {
        assert!(!s(r, "/event/reason").is_empty(), "{r:#}");
        assert!(
            matches!(s(r, "/palisade/ingress"), "edge" | "onprem"),
            "{r:#}"
        );
        if s(r, "/event/reason") == "denied by the policy" {
            assert!(!s(r, "/rule/name").is_empty(), "{r:#}");
        } else {
            assert!(r.pointer("/rule/name").is_none(), "{r:#}");
        }
    }
    assert!(
        records.iter().any(|r| s(r, "/event/code") == "flow_end"),
        "flows end with a record"
    );
}

#[test]
fn a_reload_that_removes_a_rule_cuts_the_flow() {
    if !ready() {
        return;
    }
    let mut net = Net::new();
    net.start_filter();
    let (v, o) = (net.vnet.clone(), net.onprem.clone());
    net.serve(&o, &["serve-tcp", "8080"]);
    let mut client = Command::new("ip")
        .args(["netns", "exec", &v, "python3"])
        .arg(probe())
        .args(["hold", "192.0.2.200", "8080"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(client.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ONE", "the flow works before the reload");
    // The established flow is in the kernel fast path: the reload must
    // take it back for its next packet to be checked.
    net.signal(rustix::process::Signal::USR1);
    let counters = net.wait_line("flows tracked");
    assert!(counters.contains("1 in the kernel fast path"), "{counters}");
    // Remove the rule and reload.
    std::fs::write(
        net.dir.path().join("filter.policy"),
        POLICY.replace(
            "rule web  allow vnet -> onprem-srv service tcp/8080, udp/5353\n",
            "",
        ),
    )
    .unwrap();
    net.signal(rustix::process::Signal::HUP);
    net.wait_record("reload", |r| {
        s(r, "/event/action") == "policy-loaded" && r.to_string().contains("reload")
    });
    let mut stdin: ChildStdin = client.stdin.take().unwrap();
    writeln!(stdin).unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(
        line.trim(),
        "CUT",
        "the new policy cuts the flow at its next packet"
    );
    let _ = client.wait();
    let records = net.stop_and_verify();
    assert!(
        records.iter().any(|r| s(r, "/event/code") == "flow_end"
            && s(r, "/event/action") == "denied"
            && s(r, "/event/reason").contains("no longer allows")
            && s(r, "/event/reason").contains("admitted by rule web")
            && s(r, "/rule/name") == "default"),
        "the cut is recorded, under the rule that denied it, naming the one that admitted it: {records:#?}"
    );
}

#[test]
fn vlan_tags_fragments_and_icmp_errors() {
    if !ready() {
        return;
    }
    let mut net = Net::new();
    let (v, o) = (net.vnet.clone(), net.onprem.clone());
    net.start_filter();
    // 802.1Q: frames tagged with VLAN 10 are decided by what they carry.
    // Hand-made frames (the test machine's kernel may lack VLAN devices);
    // the sniffer reads the tag the way libpcap does, from PACKET_AUXDATA.
    let mut sniffer = Command::new("ip")
        .args(["netns", "exec", &o, "python3"])
        .arg(probe())
        .args(["sniff", "h0", "3"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(sniffer.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "READY");
    assert_eq!(net.run(&v, &["inject", "v0", "5353"]), "SENT");
    assert_eq!(net.run(&v, &["inject", "v0", "9999"]), "SENT");
    line.clear();
    out.read_line(&mut line).unwrap();
    let _ = sniffer.wait();
    assert_eq!(
        line.trim(),
        "5353:1",
        "the allowed tagged frame passes once, the denied one not at all"
    );

    // An ICMP error about an allowed flow passes back: UDP to the allowed
    // port before anything listens there is refused, not left to time out.
    assert_eq!(
        net.run(&v, &["udp", "192.0.2.200", "5353", "anyone?"]),
        "REFUSED"
    );

    // Fragments: a 4,000-byte datagram each way, three fragments each; the
    // later fragments follow their first fragment's verdict.
    net.serve(&o, &["serve-udp", "5353"]);
    assert_eq!(
        net.run(&v, &["udp", "192.0.2.200", "5353", "big:4000"]),
        "4000 bytes"
    );
    // Fragments sent last first wait for their first fragment, then pass.
    for host in ["192.0.2.200", "2001:db8:1:0:8000::20"] {
        assert_eq!(
            net.run(&v, &["reversed", host, "5353", "4000"]),
            "4000 bytes",
            "{host}"
        );
    }
    let records = net.stop_and_verify();
    assert!(
        records.iter().any(|r| s(r, "/event/code") == "drop_summary"
            && r.pointer("/destination/port").and_then(|p| p.as_u64()) == Some(9999)),
        "the denied tagged frame is recorded"
    );
}

#[test]
fn bulk_tcp_crosses_whole_with_offloads_on_and_is_counted_per_packet() {
    if !ready() {
        return;
    }
    let mut net = Net::new();
    net.start_filter();
    let (v, o) = (net.vnet.clone(), net.onprem.clone());
    net.serve(&o, &["serve-tcp", "8080"]);
    // 16 MiB each way: the sender's segmentation offload hands the filter
    // 64 KiB super-frames, which must arrive intact and be counted as the
    // packets the wire carries.
    const N: u64 = 16 << 20;
    assert_eq!(
        net.run(&v, &["bulk", "192.0.2.200", "8080", &N.to_string()]),
        format!("OK {N}")
    );
    assert_eq!(
        net.run(
            &v,
            &["bulk", "2001:db8:1:0:8000::20", "8080", &N.to_string()]
        ),
        format!("OK {N}")
    );
    // Both flows were handed to the kernel fast path once established:
    // palisade itself forwarded only a small part of their frames.
    net.signal(rustix::process::Signal::USR1);
    let counters = net.wait_line("flows tracked");
    let number_before = |text: &str| -> u64 {
        let head = &counters[..counters.find(text).unwrap_or_else(|| panic!("{counters}"))];
        head.split_whitespace()
            .last()
            .unwrap()
            .trim_start_matches('(')
            .parse()
            .unwrap()
    };
    assert!(number_before("offloaded in all") >= 2, "{counters}");
    assert!(number_before("frames (") < 2_000, "{counters}");
    // The kernel's count is in wire packets: at least 64 MiB in 1,500-byte
    // segments.
    let kernel = net.wait_line("fast path forwarded");
    let frames: u64 = kernel
        .split("forwarded ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{kernel}"));
    assert!(frames >= (64 << 20) / 1500, "{kernel}");
    let records = net.stop_and_verify();
    let ends: Vec<_> = records
        .iter()
        .filter(|r| s(r, "/event/code") == "flow_end" && s(r, "/rule/name") == "web")
        .collect();
    assert_eq!(ends.len(), 2, "{ends:#?}");
    for e in ends {
        let n = |p: &str| e.pointer(p).and_then(|x| x.as_u64()).unwrap_or(0);
        // Payload plus at least 40 bytes of headers per packet of at most
        // 1,500 bytes; no more packets than one per 100 payload bytes.
        for side in ["source", "destination"] {
            let (bytes, packets) = (n(&format!("/{side}/bytes")), n(&format!("/{side}/packets")));
            assert!(
                (N..=N + N / 10).contains(&bytes),
                "{side}: {bytes} bytes: {e:#}"
            );
            assert!(
                (N / 1500..=N / 100).contains(&packets),
                "{side}: {packets} packets: {e:#}"
            );
        }
    }
}

#[test]
fn an_offloaded_flow_outlives_its_idle_timeout_while_the_kernel_carries_it() {
    if !ready() {
        return;
    }
    let mut net = Net::new();
    // UDP flows time out after 1 s of silence. This one talks for 4 s, all
    // of it through the kernel fast path after its first exchange: palisade
    // must ask the kernel before timing it out.
    net.start_filter_with("udp_timeout = \"1s\"");
    let (v, o) = (net.vnet.clone(), net.onprem.clone());
    net.serve(&o, &["serve-udp", "5353"]);
    let out = net.run(&v, &["stream", "192.0.2.200", "5353", "4", "25"]);
    let n: u64 = out
        .strip_prefix("SENT ")
        .and_then(|r| r.split(" GOT ").next())
        .and_then(|x| x.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(out, format!("SENT {n} GOT {n}"), "every datagram echoed");
    assert!(n >= 50, "{out}");
    // Then it idles out, with one record for the whole conversation.
    let end = net.wait_record("flow_end", |r| {
        s(r, "/event/code") == "flow_end"
            && r.pointer("/destination/port").and_then(|p| p.as_u64()) == Some(5353)
    });
    assert_eq!(s(&end, "/event/reason"), "timed out", "{end:#}");
    for side in ["source", "destination"] {
        let packets = end
            .pointer(&format!("/{side}/packets"))
            .and_then(|x| x.as_u64());
        assert_eq!(
            packets,
            Some(n),
            "{side}, counted by palisade and the kernel: {end:#}"
        );
    }
    let records = net.stop_and_verify();
    let starts = records
        .iter()
        .filter(|r| {
            s(r, "/event/code") == "flow_start"
                && r.pointer("/destination/port").and_then(|p| p.as_u64()) == Some(5353)
        })
        .count();
    assert_eq!(starts, 1, "one flow, never timed out while it talked");
}
