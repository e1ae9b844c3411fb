//! The daemon's TOML configuration, validated before anything starts.
//!
//! Relative paths in the file are relative to the file's own directory, so
//! the shipped `config/palisade.toml` works from any working directory.

use crate::audit::config::parse_duration;
use crate::audit::AuditConfig;
use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What is wrong with a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {field}: {problem}")]
    Invalid {
        path: PathBuf,
        field: String,
        problem: String,
    },
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

/// The forced-tunneling proxy's settings. Every limit has the default a
/// production proxy ships with.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Where clients connect.
    pub listen: SocketAddr,
    /// Largest request head (request line and headers) in bytes.
    pub max_header_bytes: usize,
    /// Most header fields in a request.
    pub max_headers: usize,
    /// A client must send its whole request head within this time
    /// (slowloris).
    #[serde(deserialize_with = "de_duration")]
    pub header_read_timeout: Duration,
    /// A kept-alive client connection with no request for this long closes.
    #[serde(deserialize_with = "de_duration")]
    pub idle_timeout: Duration,
    /// A tunnel with no bytes either way for this long closes.
    #[serde(deserialize_with = "de_duration")]
    pub tunnel_idle_timeout: Duration,
    /// How long to wait for the client's first bytes in a tunnel.
    #[serde(deserialize_with = "de_duration")]
    pub tunnel_first_bytes_timeout: Duration,
    /// Connecting to an origin gives up after this long (504).
    #[serde(deserialize_with = "de_duration")]
    pub connect_timeout: Duration,
    /// An origin must take each part of a forwarded request's body, and
    /// then answer, within this time of the last bytes it took (504): an
    /// upload may take as long as it keeps moving.
    #[serde(deserialize_with = "de_duration")]
    pub upstream_timeout: Duration,
    /// Client connections open at once, in total.
    pub max_connections: usize,
    /// Client connections open at once from one source address.
    pub max_connections_per_client: usize,
    /// Requests and tunnels per second from one source address (429 past it).
    pub requests_per_second_per_client: u32,
    /// Requests one source address may send in a burst above the rate.
    pub request_burst_per_client: u32,
    /// Fixed name-to-address answers used instead of DNS (a hosts file for
    /// the proxy: tests, or pinning a name).
    pub hosts: BTreeMap<String, Vec<IpAddr>>,
    /// How long a name's resolved addresses are reused (`"0s"`: resolve for
    /// every request). Only the lookup is reused: every request checks the
    /// addresses against its own rule and the internal ranges again.
    #[serde(deserialize_with = "de_duration")]
    pub resolve_cache_ttl: Duration,
    /// Threads that serve clients, each with its own event loop and its
    /// own listening socket on `listen` (0: one per CPU core).
    pub workers: usize,
    /// At a stop (SIGTERM, SIGINT) the proxy stops accepting and lets
    /// requests and tunnels in progress finish for up to this long, then
    /// cuts what is left (`"0s"`: cut at once). A second stop signal cuts
    /// at once.
    #[serde(deserialize_with = "de_duration")]
    pub drain_timeout: Duration,
}

impl ProxyConfig {
    /// How many serving threads run: `workers`, or one per CPU core.
    pub fn worker_count(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 3128)),
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            tunnel_idle_timeout: Duration::from_secs(300),
            tunnel_first_bytes_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            upstream_timeout: Duration::from_secs(60),
            max_connections: 10_000,
            max_connections_per_client: 256,
            requests_per_second_per_client: 200,
            request_burst_per_client: 400,
            hosts: BTreeMap::new(),
            resolve_cache_ttl: Duration::from_secs(5),
            workers: 0,
            // Within the 10 s a container runtime gives between its
            // SIGTERM and its SIGKILL, leaving time to seal the trail.
            drain_timeout: Duration::from_secs(5),
        }
    }
}

/// The inline filter's settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilterConfig {
    /// The port toward the provider edge and the VNet.
    pub edge: String,
    /// The port toward the on-premises routers.
    pub onprem: String,
    /// Most flows tracked at once.
    pub conntrack_size: usize,
    /// New flows per second one source address may start.
    pub new_flows_per_second_per_source: u32,
    pub new_flow_burst_per_source: u32,
    /// EtherTypes besides IPv4, IPv6 and ARP that may cross (e.g. 0x88cc
    /// for LLDP).
    pub allow_ethertypes: Vec<u16>,
    /// How long an established TCP flow may idle.
    #[serde(deserialize_with = "de_duration")]
    pub tcp_established_timeout: Duration,
    /// How long a UDP flow that saw a reply may idle.
    #[serde(deserialize_with = "de_duration")]
    pub udp_timeout: Duration,
    /// How frames move through the ports.
    pub io: PortIo,
    /// Hand established TCP and UDP flows to the kernel (BPF programs on
    /// the ports), so their frames cross without being copied through
    /// palisade. Needs batched ports and Linux 6.6 or later; where the
    /// kernel refuses, the filter warns and forwards everything itself.
    pub fast_path: bool,
}

/// How the filter reads and writes its ports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortIo {
    /// Many frames per system call, with offload headers: segment-offload
    /// super-frames cross whole, so the ports keep their offloads on.
    #[default]
    Batched,
    /// pnet's datalink channel, one frame per call; the ports need their
    /// segmentation and receive offloads off.
    Pnet,
}

impl Default for FilterConfig {
    fn default() -> Self {
        let t = crate::conntrack::Timeouts::default();
        FilterConfig {
            edge: String::new(),
            onprem: String::new(),
            conntrack_size: 262_144,
            new_flows_per_second_per_source: 1000,
            new_flow_burst_per_source: 2000,
            allow_ethertypes: Vec::new(),
            tcp_established_timeout: t.tcp_established,
            udp_timeout: t.udp_replied,
            io: PortIo::default(),
            fast_path: true,
        }
    }
}

/// The whole daemon configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The policy's root file.
    pub policy: PathBuf,
    #[serde(default)]
    pub proxy: ProxyConfig,
    #[serde(default)]
    pub filter: FilterConfig,
    pub audit: AuditConfig,
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Config::parse(path, &text)?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.policy = resolve(base, &config.policy);
        config.audit.dir = resolve(base, &config.audit.dir);
        if let Some(k) = &config.audit.signing_key {
            config.audit.signing_key = Some(resolve(base, k));
        }
        Ok(config)
    }

    /// Parses and validates configuration text; `path` names it in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        config.validate(path)?;
        // Host names as the proxy looks them up (lower case, no trailing
        // dot), so that `Mixed-Case.test.` pins what requests for
        // mixed-case.test resolve to instead of being passed over for DNS.
        let mut hosts = BTreeMap::new();
        for (name, addrs) in std::mem::take(&mut config.proxy.hosts) {
            let invalid = |problem: String| ConfigError::Invalid {
                path: path.to_path_buf(),
                field: format!("proxy.hosts.{name}"),
                problem,
            };
            let Some(key) = crate::policy::normalize_host(&name) else {
                return Err(invalid("not a valid host name".into()));
            };
            if hosts.insert(key.clone(), addrs).is_some() {
                return Err(invalid(format!(
                    "names the same host as another entry ({key})"
                )));
            }
        }
        config.proxy.hosts = hosts;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |field: &str, problem: &str| ConfigError::Invalid {
            path: path.to_path_buf(),
            field: field.to_string(),
            problem: problem.to_string(),
        };
        self.audit
            .validate()
            .map_err(|e| invalid(&format!("audit.{}", e.field), &e.problem))?;
        let p = &self.proxy;
        if p.max_header_bytes < 1024 {
            return Err(invalid("proxy.max_header_bytes", "must be at least 1024"));
        }
        if p.max_headers == 0 {
            return Err(invalid("proxy.max_headers", "must be at least 1"));
        }
        if p.max_connections == 0 || p.max_connections_per_client == 0 {
            return Err(invalid(
                "proxy.max_connections",
                "connection limits must be at least 1",
            ));
        }
        if p.workers > 1024 {
            return Err(invalid(
                "proxy.workers",
                "at most 1024 serving threads (0: one per core)",
            ));
        }
        if p.requests_per_second_per_client == 0 {
            return Err(invalid(
                "proxy.requests_per_second_per_client",
                "must be at least 1",
            ));
        }
        if p.request_burst_per_client == 0 {
            return Err(invalid(
                "proxy.request_burst_per_client",
                "must be at least 1 (a burst of 0 would refuse every request)",
            ));
        }
        for (field, d) in [
            ("proxy.header_read_timeout", p.header_read_timeout),
            ("proxy.idle_timeout", p.idle_timeout),
            ("proxy.tunnel_idle_timeout", p.tunnel_idle_timeout),
            (
                "proxy.tunnel_first_bytes_timeout",
                p.tunnel_first_bytes_timeout,
            ),
            ("proxy.connect_timeout", p.connect_timeout),
            ("proxy.upstream_timeout", p.upstream_timeout),
        ] {
            if d.is_zero() {
                return Err(invalid(field, "must be longer than zero"));
            }
        }
        let f = &self.filter;
        if f.conntrack_size == 0 {
            return Err(invalid("filter.conntrack_size", "must be at least 1"));
        }
        if f.new_flows_per_second_per_source == 0 {
            return Err(invalid(
                "filter.new_flows_per_second_per_source",
                "must be at least 1",
            ));
        }
        if !f.edge.is_empty() && f.edge == f.onprem {
            return Err(invalid(
                "filter.onprem",
                "must be another interface than filter.edge",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_overrides_are_kept_under_the_name_requests_use() {
        let p = Path::new("t.toml");
        let c = Config::parse(
            p,
            "policy = \"p.policy\"\n[audit]\nsigning_key = \"k\"\n[proxy.hosts]\n\"Mixed-Case.test\" = [\"192.0.2.1\"]\n\"dot.test.\" = [\"192.0.2.2\"]\n",
        )
        .unwrap();
        let keys: Vec<&str> = c.proxy.hosts.keys().map(String::as_str).collect();
        assert_eq!(keys, ["dot.test", "mixed-case.test"]);
        let e = Config::parse(
            p,
            "policy = \"p.policy\"\n[audit]\nsigning_key = \"k\"\n[proxy.hosts]\n\"a.test\" = [\"192.0.2.1\"]\n\"A.test.\" = [\"192.0.2.2\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("names the same host as another entry (a.test)"),
            "{e}"
        );
    }

    #[test]
    fn shipped_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/palisade.toml");
        let c = Config::load(&path).unwrap();
        assert_eq!(c.proxy.listen, "127.0.0.1:3128".parse().unwrap());
        assert!(c.policy.ends_with("policies/example.policy"));
    }

    #[test]
    fn errors_name_the_field() {
        let p = Path::new("x.toml");
        let e = Config::parse(
            p,
            "policy = \"a\"\n[audit]\nsigning_key = \"k\"\n[proxy]\nmax_headers = 0\n",
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "x.toml: proxy.max_headers: must be at least 1"
        );
        let e = Config::parse(
            p,
            "policy = \"a\"\n[audit]\nsigning_key = \"k\"\n[proxy]\nlisten = \"nowhere\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("listen"), "{e}");
        let e = Config::parse(
            p,
            "policy = \"a\"\n[audit]\nsigning_key = \"k\"\n[proxy]\nlisen = \"127.0.0.1:1\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown field `lisen`"), "{e}");
        let e = Config::parse(
            p,
            "policy = \"a\"\n[audit]\nsigning_key = \"k\"\n[proxy]\nworkers = 5000\n",
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "x.toml: proxy.workers: at most 1024 serving threads (0: one per core)"
        );
    }

    #[test]
    fn workers_default_to_one_per_core() {
        let mut p = ProxyConfig::default();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(p.worker_count(), cores);
        p.workers = 3;
        assert_eq!(p.worker_count(), 3);
    }
}
