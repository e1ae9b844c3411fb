//! Why a flow or request got its verdict: the deciding rule and the rules
//! before it that came close.

use super::expect::Query;
use super::{Policy, Verdict};

/// A rule that matched all but some fields of the query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NearMiss {
    pub rule: String,
    pub verdict: Verdict,
    pub location: String,
    /// What did not match, in words.
    pub mismatches: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    pub verdict: Verdict,
    /// Deciding rule name, or `default`.
    pub rule: String,
    /// Where the deciding rule (or the default) was written, if known.
    pub location: Option<String>,
    /// Earlier rules that missed on one field only (or shared the
    /// destination but not the port), in policy order.
    pub near_misses: Vec<NearMiss>,
}

pub fn explain(policy: &Policy, query: &Query) -> Explanation {
    match query {
        Query::Packet(key) => {
            let d = policy.decide(key);
            let upto = d.rule.map(|r| r as usize).unwrap_or(policy.rules().len());
            let mut near = Vec::new();
            for r in policy.rules()[..upto].iter().filter(|r| r.active) {
                let src = r.src.contains(key.src);
                let dst = r.dst.contains(key.dst);
                let proto = r.services.iter().any(|s| s.proto.contains(key.proto));
                let svc = r
                    .services
                    .iter()
                    .any(|s| s.matches(key.proto, key.src_port, key.dst_port));
                let mut miss = Vec::new();
                if !src {
                    miss.push(format!("source {} is not in {}", key.src, r.src.describe()));
                }
                if !dst {
                    miss.push(format!(
                        "destination {} is not in {}",
                        key.dst,
                        r.dst.describe()
                    ));
                }
                if !svc {
                    let svcs: Vec<String> = r.services.iter().map(|s| s.describe()).collect();
                    let what = if proto {
                        format!("port {} (from {})", key.dst_port, key.src_port)
                    } else {
                        format!("protocol {}", key.proto)
                    };
                    miss.push(format!("{what} is not in service {}", svcs.join(", ")));
                }
                let close = (dst && !svc) || miss.len() == 1;
                if close && !miss.is_empty() {
                    near.push(NearMiss {
                        rule: r.name.clone(),
                        verdict: r.verdict,
                        location: r.location.to_string(),
                        mismatches: miss,
                    });
                }
            }
            Explanation {
                verdict: d.verdict,
                rule: policy.rule_name(d.rule).to_string(),
                location: d
                    .rule
                    .and_then(|id| policy.rule(id))
                    .map(|r| r.location.to_string()),
                near_misses: near,
            }
        }
        Query::Http(req) => {
            let d = policy.decide_http(req);
            let upto = d.rule.unwrap_or(policy.http_rules().len());
            let mut near = Vec::new();
            for r in policy.http_rules()[..upto].iter().filter(|r| r.active) {
                let mut miss = Vec::new();
                if !r.src.contains(req.src) {
                    miss.push(format!("source {} is not in {}", req.src, r.src.describe()));
                }
                let host_ok = match &req.host {
                    super::HttpHost::Name(n) => r.hosts.iter().any(|h| h.matches(n)),
                    super::HttpHost::Ip(ip) => r.addrs.contains(*ip),
                };
                let host_text = match &req.host {
                    super::HttpHost::Name(n) => n.clone(),
                    super::HttpHost::Ip(ip) => ip.to_string(),
                };
                if !host_ok {
                    // Everything the rule's destination names: its host
                    // patterns, then its addresses.
                    let mut dests: Vec<String> =
                        r.hosts.iter().map(|h| format!("\"{h}\"")).collect();
                    if !r.addrs.is_empty() {
                        dests.push(r.addrs.describe());
                    }
                    miss.push(format!(
                        "host {host_text} does not match {}",
                        dests.join(", ")
                    ));
                }
                if !(r.ports.is_empty() || r.ports.iter().any(|p| p.contains(req.port))) {
                    miss.push(format!("port {} is not allowed by the rule", req.port));
                }
                if !(r.methods.is_empty() || r.methods.contains(&req.method)) {
                    miss.push(format!(
                        "method {} is not in {}",
                        req.method,
                        r.methods.join(", ")
                    ));
                }
                if (host_ok && !miss.is_empty()) || miss.len() == 1 {
                    near.push(NearMiss {
                        rule: r.name.clone(),
                        verdict: r.verdict,
                        location: r.location.to_string(),
                        mismatches: miss,
                    });
                }
            }
            Explanation {
                verdict: d.verdict,
                rule: policy.http_rule_name(d.rule).to_string(),
                location: d.rule.map(|i| policy.http_rules()[i].location.to_string()),
                near_misses: near,
            }
        }
    }
}
