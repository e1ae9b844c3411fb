//! Imports from other rule formats into palisade's language.
//!
//! - Azure network security group rules, as an ARM template's
//!   `securityRules` or the output of `az network nsg rule list`.
//!
//! Imports produce policy text, never a compiled policy: the text is what a
//! security team reviews and commits. Whatever cannot be translated is an
//! error naming the rule and the field, never silently dropped.

use serde_json::Value;
use std::collections::{BTreeMap, HashSet};
use std::fmt::Write;

/// Why an NSG document could not be translated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImportError {
    #[error("not valid JSON: {0}")]
    Json(String),
    #[error("no security rules found: expected an ARM template with `securityRules`, or the array printed by `az network nsg rule list`")]
    NoRules,
    #[error("{rule}: field `{field}`: {problem}")]
    Field {
        rule: String,
        field: String,
        problem: String,
    },
    #[error("service tag mapping: {0}")]
    Mapping(String),
}

/// Finds every security rule object, wherever the document keeps them.
fn collect_rules<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    match v {
        Value::Object(m) => {
            if let Some(Value::Array(rules)) = m.get("securityRules") {
                out.extend(rules.iter());
                return;
            }
            for (k, child) in m {
                if k != "defaultSecurityRules" {
                    collect_rules(child, out);
                }
            }
        }
        Value::Array(items) => {
            // `az network nsg rule list` prints the rules themselves.
            if items
                .iter()
                .all(|i| i.get("priority").is_some() || i.pointer("/properties/priority").is_some())
                && !items.is_empty()
            {
                out.extend(items.iter());
            } else {
                for i in items {
                    collect_rules(i, out);
                }
            }
        }
        _ => {}
    }
}

/// A field of a rule, at the top level or under `properties`.
fn field<'a>(rule: &'a Value, name: &str) -> Option<&'a Value> {
    rule.get(name)
        .or_else(|| rule.get("properties").and_then(|p| p.get(name)))
        .filter(|v| !v.is_null())
}

struct Ctx<'a> {
    rule: String,
    tags: &'a BTreeMap<String, Vec<String>>,
}

impl Ctx<'_> {
    fn err(&self, field: &str, problem: impl Into<String>) -> ImportError {
        ImportError::Field {
            rule: self.rule.clone(),
            field: field.to_string(),
            problem: problem.into(),
        }
    }

    /// Single and plural forms of a field (`sourceAddressPrefix` and
    /// `sourceAddressPrefixes`), as strings.
    fn strings(
        &self,
        rule: &Value,
        single: &str,
        plural: &str,
    ) -> Result<Vec<String>, ImportError> {
        let mut out = Vec::new();
        if let Some(v) = field(rule, single) {
            match v.as_str() {
                Some(s) if !s.is_empty() => out.push(s.to_string()),
                Some(_) => {}
                None => return Err(self.err(single, "expected a string")),
            }
        }
        if let Some(v) = field(rule, plural) {
            let arr = v
                .as_array()
                .ok_or_else(|| self.err(plural, "expected an array of strings"))?;
            for s in arr {
                out.push(
                    s.as_str()
                        .ok_or_else(|| self.err(plural, "expected an array of strings"))?
                        .to_string(),
                );
            }
        }
        Ok(out)
    }

    fn addresses(&self, rule: &Value, side: &str) -> Result<Vec<String>, ImportError> {
        let single = format!("{side}AddressPrefix");
        let plural = format!("{side}AddressPrefixes");
        let items = self.strings(rule, &single, &plural)?;
        if field(rule, &format!("{side}ApplicationSecurityGroups"))
            .is_some_and(|v| v.as_array().is_some_and(|a| !a.is_empty()))
        {
            return Err(self.err(
                &format!("{side}ApplicationSecurityGroups"),
                "application security groups cannot be translated; list their addresses instead",
            ));
        }
        if items.is_empty() {
            return Err(self.err(&single, "no address prefix given"));
        }
        let mut out = Vec::new();
        for item in items {
            if item == "*" || item.eq_ignore_ascii_case("any") {
                out.push("any".to_string());
            } else if item.parse::<ipnet::IpNet>().is_ok()
                || item.parse::<std::net::IpAddr>().is_ok()
            {
                out.push(item);
            } else if let Some(mapped) = self.tags.get(&item) {
                out.extend(mapped.iter().cloned());
            } else {
                return Err(self.err(
                    &single,
                    format!("`{item}` is a service tag (or not an address); give its prefixes with --service-tags FILE"),
                ));
            }
        }
        Ok(out)
    }

    fn ports(&self, rule: &Value, side: &str) -> Result<Vec<Option<(u16, u16)>>, ImportError> {
        let single = format!("{side}PortRange");
        let plural = format!("{side}PortRanges");
        let items = self.strings(rule, &single, &plural)?;
        if items.is_empty() {
            return Ok(vec![None]);
        }
        let mut out = Vec::new();
        for item in items {
            if item == "*" {
                out.push(None);
                continue;
            }
            let (lo, hi) = match item.split_once('-') {
                Some((a, b)) => (a.trim(), b.trim()),
                None => (item.trim(), item.trim()),
            };
            let parse = |s: &str| {
                s.parse::<u16>()
                    .map_err(|_| self.err(&single, format!("`{item}` is not a port or port range")))
            };
            let (lo, hi) = (parse(lo)?, parse(hi)?);
            if lo > hi {
                return Err(self.err(&single, format!("`{item}` is a reversed range")));
            }
            out.push(Some((lo, hi)));
        }
        Ok(out)
    }
}

fn sanitize(name: &str, taken: &mut HashSet<String>) -> String {
    let mut s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    if !s.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
        s.insert_str(0, "nsg-");
    }
    let mut candidate = s.clone();
    let mut n = 2;
    while !taken.insert(candidate.clone()) {
        candidate = format!("{s}-{n}");
        n += 1;
    }
    candidate
}

/// Reads a service-tag mapping: a JSON object from tag name to a list of
/// prefixes, e.g. `{"VirtualNetwork": ["10.0.0.0/16"]}`.
pub fn parse_tag_mapping(text: &str) -> Result<BTreeMap<String, Vec<String>>, ImportError> {
    let v: Value = serde_json::from_str(text).map_err(|e| ImportError::Mapping(e.to_string()))?;
    let obj = v.as_object().ok_or_else(|| {
        ImportError::Mapping("expected a JSON object of tag -> [prefixes]".into())
    })?;
    let mut out = BTreeMap::new();
    for (tag, prefixes) in obj {
        let arr = prefixes.as_array().ok_or_else(|| {
            ImportError::Mapping(format!("`{tag}`: expected an array of prefixes"))
        })?;
        let mut list = Vec::new();
        for p in arr {
            let s = p
                .as_str()
                .ok_or_else(|| ImportError::Mapping(format!("`{tag}`: expected strings")))?;
            if s.parse::<ipnet::IpNet>().is_err() && s.parse::<std::net::IpAddr>().is_err() {
                return Err(ImportError::Mapping(format!(
                    "`{tag}`: `{s}` is not an address or prefix"
                )));
            }
            list.push(s.to_string());
        }
        out.insert(tag.clone(), list);
    }
    Ok(out)
}

/// Translates NSG security rules into a policy: one `rule` per NSG rule in
/// priority order (inbound rules first, then outbound), `default deny` as
/// NSGs end in DenyAll.
pub fn nsg(json: &str, tags: &BTreeMap<String, Vec<String>>) -> Result<String, ImportError> {
    let doc: Value = serde_json::from_str(json).map_err(|e| ImportError::Json(e.to_string()))?;
    let mut rules = Vec::new();
    collect_rules(&doc, &mut rules);
    if rules.is_empty() {
        return Err(ImportError::NoRules);
    }
    struct Out {
        direction: String,
        priority: i64,
        name: String,
        text: String,
    }
    let mut outs = Vec::new();
    let mut taken = HashSet::new();
    for (i, rule) in rules.iter().enumerate() {
        let raw_name = field(rule, "name")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();
        let ctx = Ctx {
            rule: if raw_name.is_empty() {
                format!("securityRules[{i}]")
            } else {
                format!("rule `{raw_name}` (securityRules[{i}])")
            },
            tags,
        };
        let priority = field(rule, "priority")
            .and_then(|v| v.as_i64())
            .ok_or_else(|| ctx.err("priority", "missing or not a number"))?;
        let direction = field(rule, "direction")
            .and_then(|v| v.as_str())
            .ok_or_else(|| ctx.err("direction", "missing"))?;
        let direction = match direction.to_ascii_lowercase().as_str() {
            "inbound" => "Inbound",
            "outbound" => "Outbound",
            _ => {
                return Err(ctx.err(
                    "direction",
                    format!("`{direction}` is not Inbound or Outbound"),
                ))
            }
        };
        let access = field(rule, "access")
            .and_then(|v| v.as_str())
            .ok_or_else(|| ctx.err("access", "missing"))?;
        let action = match access.to_ascii_lowercase().as_str() {
            "allow" => "allow",
            "deny" => "deny",
            _ => return Err(ctx.err("access", format!("`{access}` is not Allow or Deny"))),
        };
        let protocol = field(rule, "protocol")
            .and_then(|v| v.as_str())
            .unwrap_or("*");
        let protos: Vec<&str> = match protocol.to_ascii_lowercase().as_str() {
            "tcp" => vec!["tcp"],
            "udp" => vec!["udp"],
            "icmp" => vec!["icmp", "icmpv6"],
            "esp" => vec!["esp"],
            "ah" => vec!["ah"],
            "*" | "any" => vec!["*"],
            _ => {
                return Err(ctx.err(
                    "protocol",
                    format!("`{protocol}` is not Tcp, Udp, Icmp, Esp, Ah or *"),
                ))
            }
        };
        let src = ctx.addresses(rule, "source")?;
        let dst = ctx.addresses(rule, "destination")?;
        let sports = ctx.ports(rule, "source")?;
        let dports = ctx.ports(rule, "destination")?;
        let any_ports = sports.iter().all(|p| p.is_none()) && dports.iter().all(|p| p.is_none());
        // NSG ports apply to TCP and UDP only; `*` with ports means both.
        let port_items = |proto: &str, services: &mut Vec<String>| {
            let range = |(lo, hi): (u16, u16)| {
                if lo == hi {
                    lo.to_string()
                } else {
                    format!("{lo}-{hi}")
                }
            };
            for d in &dports {
                for s in &sports {
                    let mut item = proto.to_string();
                    if let Some(d) = d {
                        item += &format!("/{}", range(*d));
                    }
                    if let Some(s) = s {
                        item += &format!(" sport {}", range(*s));
                    }
                    services.push(item);
                }
            }
        };
        let mut services = Vec::new();
        for p in &protos {
            match *p {
                "tcp" | "udp" => port_items(p, &mut services),
                "*" if !any_ports => {
                    port_items("tcp", &mut services);
                    port_items("udp", &mut services);
                }
                "*" => {}
                other => {
                    if !any_ports {
                        return Err(ctx.err(
                            "destinationPortRange",
                            format!("{other} has no ports; use `*`"),
                        ));
                    }
                    services.push(other.to_string());
                }
            }
        }
        let name = sanitize(
            if raw_name.is_empty() {
                "nsg-rule"
            } else {
                &raw_name
            },
            &mut taken,
        );
        let mut text = format!(
            "rule {name} {action} {} -> {}",
            src.join(", "),
            dst.join(", ")
        );
        if !services.is_empty() {
            let _ = write!(text, " service {}", services.join(", "));
        }
        let desc = field(rule, "description")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        let mut comment = format!("{direction} priority {priority}");
        if !desc.is_empty() {
            comment.push_str(": ");
            comment.push_str(desc);
        }
        let comment: String = comment
            .chars()
            .filter(|c| *c != '"' && !c.is_control())
            .collect();
        let _ = write!(text, " comment \"{comment}\"");
        outs.push(Out {
            direction: direction.to_string(),
            priority,
            name,
            text,
        });
    }
    outs.sort_by(|a, b| {
        a.direction
            .cmp(&b.direction)
            .then(a.priority.cmp(&b.priority))
            .then(a.name.cmp(&b.name))
    });
    let mut policy = String::from(
        "# Imported from Azure NSG security rules by `palisade import nsg`.\n\
         # NSG rules apply per direction; palisade rules apply to any packet\n\
         # whose addresses match, so inbound rules come first, then outbound,\n\
         # each in priority order. Review rules whose sides are both `any`.\n",
    );
    let mut last_dir = String::new();
    for o in outs {
        if o.direction != last_dir {
            let _ = write!(policy, "\n# {} rules\n", o.direction);
            last_dir = o.direction.clone();
        }
        policy.push_str(&o.text);
        policy.push('\n');
    }
    policy.push_str("\n# NSGs end in DenyAllInbound and DenyAllOutbound.\ndefault deny\n");
    Ok(policy)
}

/// A ClassBench rule set as a policy: one `allow` rule per line, in order
/// (ClassBench rules carry no action; the classification is the rule), and
/// `default deny`. Rule `cbN` is line N+1 (ClassBench's 0-based rule id N).
pub fn classbench(text: &str) -> Result<String, ImportError> {
    use crate::classify::classbench::parse_rules;
    let entries = parse_rules(text).map_err(|e| ImportError::Field {
        rule: format!("line {}", e.line),
        field: e.field.to_string(),
        problem: format!("column {}: {}", e.column, e.reason),
    })?;
    let addr = |iv: crate::classify::Interval<u32>| -> String {
        if iv.lo == 0 && iv.hi == u32::MAX {
            return "any4".into();
        }
        let mut s = super::AddrSet::default();
        s.add_v4(iv.lo, iv.hi);
        s.describe()
    };
    let ports = |iv: crate::classify::Interval<u16>| -> Option<String> {
        match (iv.lo, iv.hi) {
            (0, 65535) => None,
            (a, b) if a == b => Some(a.to_string()),
            (a, b) => Some(format!("{a}-{b}")),
        }
    };
    let mut out =
        String::from("# Imported from a ClassBench rule set by `palisade import classbench`.\n");
    for e in &entries {
        let f = &e.fields;
        let (sp, dp) = (ports(f.src_port), ports(f.dst_port));
        let service = match (f.proto.lo, f.proto.hi) {
            (0, 255) if sp.is_none() && dp.is_none() => None,
            (p, q) if p == q => {
                let name = match p {
                    6 => "tcp".to_string(),
                    17 => "udp".to_string(),
                    132 => "sctp".to_string(),
                    1 => "icmp".to_string(),
                    47 => "gre".to_string(),
                    50 => "esp".to_string(),
                    51 => "ah".to_string(),
                    n => format!("ip/{n}"),
                };
                let has_ports = matches!(p, 6 | 17 | 132);
                if !has_ports && (sp.is_some() || dp.is_some()) {
                    return Err(ImportError::Field {
                        rule: format!("line {}", e.rule + 1),
                        field: "protocol".into(),
                        problem: format!("protocol {p} has no ports, but the rule restricts them"),
                    });
                }
                let mut item = name;
                if let Some(d) = dp {
                    item += &format!("/{d}");
                }
                if let Some(s) = sp {
                    item += &format!(" sport {s}");
                }
                Some(item)
            }
            _ => {
                return Err(ImportError::Field {
                    rule: format!("line {}", e.rule + 1),
                    field: "protocol".into(),
                    problem: "any protocol with port restrictions cannot be expressed".into(),
                })
            }
        };
        let _ = write!(
            out,
            "rule cb{} allow {} -> {}",
            e.rule,
            addr(f.src),
            addr(f.dst)
        );
        if let Some(s) = service {
            let _ = write!(out, " service {s}");
        }
        out.push('\n');
    }
    out.push_str("default deny\n");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn translates_az_cli_output_and_reports_tags() {
        let json = r#"[
          {"name": "allow-web", "priority": 200, "direction": "Inbound", "access": "Allow", "protocol": "Tcp",
           "sourceAddressPrefix": "*", "sourcePortRange": "*",
           "destinationAddressPrefix": "10.0.1.0/24", "destinationPortRanges": ["80", "443"]},
          {"name": "deny ssh", "priority": 100, "direction": "Inbound", "access": "Deny", "protocol": "*",
           "sourceAddressPrefixes": ["192.0.2.0/24", "198.51.100.7"], "sourcePortRange": "*",
           "destinationAddressPrefix": "*", "destinationPortRange": "22"}
        ]"#;
        let out = nsg(json, &BTreeMap::new()).unwrap();
        let rules: Vec<&str> = out.lines().filter(|l| l.starts_with("rule ")).collect();
        assert_eq!(rules[0], "rule deny-ssh deny 192.0.2.0/24, 198.51.100.7 -> any service tcp/22, udp/22 comment \"Inbound priority 100\"");
        assert_eq!(rules[1], "rule allow-web allow any -> 10.0.1.0/24 service tcp/80, tcp/443 comment \"Inbound priority 200\"");
        let tagged = json.replace(
            "\"*\", \"sourcePortRange\"",
            "\"Internet\", \"sourcePortRange\"",
        );
        let err = nsg(&tagged, &BTreeMap::new()).unwrap_err();
        assert!(err.to_string().contains("rule `allow-web` (securityRules[0]): field `sourceAddressPrefix`: `Internet` is a service tag"), "{err}");
        let mut tags = BTreeMap::new();
        tags.insert("Internet".to_string(), vec!["0.0.0.0/0".to_string()]);
        assert!(nsg(&tagged, &tags)
            .unwrap()
            .contains("rule allow-web allow 0.0.0.0/0 -> 10.0.1.0/24"));
    }
}
