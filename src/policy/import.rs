//! Imports from other rule formats into palisade's language.
//!
//! - Azure network security group rules, as an ARM template's
//!   `securityRules` or the output of `az network nsg rule list`.
//!
//! Imports produce policy text, never a compiled policy: the text is what a
//! security team reviews and commits. Whatever cannot be translated is an
//! error naming the rule and the field, never silently dropped.

use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write;

/// Why an NSG document could not be translated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImportError {
    #[error("not valid JSON: {message}")]
    Json {
        at: Option<(usize, usize)>,
        message: String,
    },
    #[error("the rule list is empty: the NSG has no rules of its own, only Azure's defaults; choose which with --direction inbound or --direction outbound")]
    EmptyList,
    /// A rule's field that cannot be translated; `at` is the 1-based line
    /// and column in the document of the field (or of the rule, when the
    /// field is missing).
    #[error("no security rules found: expected an ARM template with `securityRules`, or the array printed by `az network nsg rule list`")]
    NoRules,
    #[error("{rule}: field `{field}`: {problem}")]
    Field {
        at: Option<(usize, usize)>,
        rule: String,
        field: String,
        problem: String,
    },
    #[error("service tag mapping: {0}")]
    Mapping(String),
    /// A ClassBench rule line that does not parse.
    #[error("{}: {}", .0.field, .0.reason)]
    ClassBench(#[from] crate::classify::classbench::ClassBenchError),
    #[error("the document holds rules of several network security groups ({0}): traffic must pass each NSG on its path, which one first-match list cannot express; import them one at a time")]
    Several(String),
    #[error("the document holds {inbound} Inbound and {outbound} Outbound rules: an NSG judges each direction on its own and a policy is one first-match list; choose one with --direction inbound or --direction outbound")]
    BothDirections { inbound: usize, outbound: usize },
}

impl ImportError {
    /// The 1-based line and column in the imported document the error is
    /// about, when it is about one place.
    pub fn at(&self) -> Option<(usize, usize)> {
        match self {
            ImportError::Json { at, .. } | ImportError::Field { at, .. } => *at,
            ImportError::ClassBench(e) => Some((e.line, e.column)),
            _ => None,
        }
    }

    /// The error as `FILE:LINE:COL: message` (`FILE: message` when it is
    /// about the document as a whole), the form editors jump to.
    pub fn in_file(&self, file: &str) -> String {
        match self.at() {
            Some((line, col)) => format!("{file}:{line}:{col}: {self}"),
            None => format!("{file}: {self}"),
        }
    }
}

/// A security rule found in the document, with the network security group
/// it belongs to when the document says (`""` when it does not).
struct Found<'a> {
    nsg: String,
    rule: &'a Value,
    /// The rule's JSON pointer in the document.
    path: String,
}

/// The NSG an `az network nsg rule list` rule belongs to, from its `id`
/// (`.../networkSecurityGroups/NAME/securityRules/RULE`).
fn nsg_of_id(rule: &Value) -> String {
    let id = rule.get("id").and_then(Value::as_str).unwrap_or("");
    let parts: Vec<&str> = id.split('/').collect();
    parts
        .iter()
        .position(|p| p.eq_ignore_ascii_case("networkSecurityGroups"))
        .and_then(|i| parts.get(i + 1))
        .map_or(String::new(), |n| n.to_string())
}

/// Finds every security rule object, wherever the document keeps them: an
/// NSG's `securityRules`, ARM child resources of type
/// `Microsoft.Network/networkSecurityGroups/securityRules` (named
/// `NSG/RULE`), or the array `az network nsg rule list` prints. Azure's
/// `defaultSecurityRules` are left out: [`nsg`] adds the defaults itself.
/// The JSON pointer of `key` below `path` (RFC 6901 escapes `~` and `/`).
fn pointer(path: &str, key: &str) -> String {
    format!("{path}/{}", key.replace('~', "~0").replace('/', "~1"))
}

fn collect_rules<'a>(v: &'a Value, path: &str, out: &mut Vec<Found<'a>>) {
    let child = |key: &str| pointer(path, key);
    match v {
        Value::Object(m) => {
            let name = m.get("name").and_then(Value::as_str).unwrap_or("");
            let kind = m.get("type").and_then(Value::as_str).unwrap_or("");
            if kind
                .to_ascii_lowercase()
                .ends_with("networksecuritygroups/securityrules")
            {
                let nsg = if is_arm_expression(name) {
                    name.to_string()
                } else {
                    name.split_once('/').map_or("", |(n, _)| n).to_string()
                };
                out.push(Found {
                    nsg,
                    rule: v,
                    path: path.to_string(),
                });
                return;
            }
            let (rules, at) = match m.get("securityRules") {
                Some(r) => (Some(r), child("securityRules")),
                None => (
                    m.get("properties").and_then(|p| p.get("securityRules")),
                    pointer(&child("properties"), "securityRules"),
                ),
            };
            if let Some(Value::Array(rules)) = rules {
                out.extend(rules.iter().enumerate().map(|(i, rule)| Found {
                    nsg: name.to_string(),
                    rule,
                    path: format!("{at}/{i}"),
                }));
            }
            for (k, v) in m {
                if k != "defaultSecurityRules" && k != "securityRules" && k != "properties" {
                    collect_rules(v, &child(k), out);
                }
            }
            if let Some(Value::Object(props)) = m.get("properties") {
                let props_path = child("properties");
                for (k, v) in props {
                    if k != "defaultSecurityRules" && k != "securityRules" {
                        collect_rules(v, &pointer(&props_path, k), out);
                    }
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
                // `--include-default` adds Azure's default rules, which
                // the import appends itself.
                let default_rule = |rule: &Value| {
                    rule.get("type")
                        .and_then(Value::as_str)
                        .is_some_and(|t| t.to_ascii_lowercase().ends_with("/defaultsecurityrules"))
                };
                out.extend(
                    items
                        .iter()
                        .enumerate()
                        .filter(|(_, r)| !default_rule(r))
                        .map(|(i, rule)| Found {
                            nsg: nsg_of_id(rule),
                            rule,
                            path: format!("{path}/{i}"),
                        }),
                );
            } else {
                for (i, v) in items.iter().enumerate() {
                    collect_rules(v, &format!("{path}/{i}"), out);
                }
            }
        }
        _ => {}
    }
}

/// Where each value of a JSON document starts: byte offsets by JSON
/// pointer (`/resources/0/properties/securityRules/2/properties/priority`),
/// so that an error can name the line and column of the field it is about.
/// The offsets come from serde_json's raw values, which borrow the text.
fn value_offsets(text: &str) -> HashMap<String, usize> {
    use serde_json::value::RawValue;
    fn walk(base: usize, raw: &RawValue, path: String, out: &mut HashMap<String, usize>) {
        let s = raw.get();
        out.insert(path.clone(), s.as_ptr() as usize - base);
        match s.as_bytes().first() {
            Some(b'{') => {
                if let Ok(m) = serde_json::from_str::<HashMap<String, &RawValue>>(s) {
                    for (k, v) in m {
                        walk(base, v, pointer(&path, &k), out);
                    }
                }
            }
            Some(b'[') => {
                if let Ok(items) = serde_json::from_str::<Vec<&RawValue>>(s) {
                    for (i, v) in items.into_iter().enumerate() {
                        walk(base, v, format!("{path}/{i}"), out);
                    }
                }
            }
            _ => {}
        }
    }
    let mut out = HashMap::new();
    if let Ok(raw) = serde_json::from_str::<&RawValue>(text) {
        walk(text.as_ptr() as usize, raw, String::new(), &mut out);
    }
    out
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// An ARM template expression (`[parameters('p')]`, `[concat(...)]`):
/// evaluated by Azure at deployment, not by the import.
fn is_arm_expression(s: &str) -> bool {
    let s = s.trim();
    s.starts_with('[') && s.ends_with(']') && !s.starts_with("[[")
}

fn arm_expression(s: &str) -> String {
    format!("`{s}` is an ARM template expression, which the import cannot evaluate: import the deployed NSG (`az network nsg rule list`) or write the value")
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
    /// The document, where each of its values starts, and the rule's
    /// JSON pointer, for the position of an error.
    text: &'a str,
    offsets: &'a HashMap<String, usize>,
    path: &'a str,
}

impl Ctx<'_> {
    /// Line and column of the rule's field `name` (top level or under
    /// `properties`), or of the rule when it has no such field.
    fn at(&self, name: &str) -> Option<(usize, usize)> {
        let p = self.path;
        [
            format!("{p}/{name}"),
            format!("{p}/properties/{name}"),
            p.to_string(),
        ]
        .iter()
        .find_map(|k| self.offsets.get(k))
        .map(|&o| line_col(self.text, o))
    }

    fn err(&self, field: &str, problem: impl Into<String>) -> ImportError {
        ImportError::Field {
            at: self.at(field),
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
            } else if is_address_or_prefix(&item) {
                out.push(item);
            } else if let Some(mapped) = self.tags.get(&item) {
                if mapped.is_empty() {
                    return Err(self.err(
                        &single,
                        format!(
                            "service tag `{item}` maps to no prefixes in the --service-tags file"
                        ),
                    ));
                }
                out.extend(mapped.iter().cloned());
            } else if is_arm_expression(&item) {
                return Err(self.err(&single, arm_expression(&item)));
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
        // Azure requires a port range on both sides; reading a rule without
        // one as every port would let through what its author never allowed.
        if items.is_empty() {
            return Err(self.err(
                &single,
                format!("no port range given (Azure requires `{single}` or `{plural}`; \"*\" means every port)"),
            ));
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
    // A name must start with a letter, and must not be a word the language
    // reserves (an Azure rule called "Default" or "Any").
    if !s.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        || matches!(s.as_str(), "default" | "any" | "any4" | "any6")
    {
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

/// Whether `s` is an address or a prefix as the policy language writes one:
/// the address as std reads it (no leading zeros in IPv4 octets, which some
/// readers take for octal), a decimal length without leading zeros.
fn is_address_or_prefix(s: &str) -> bool {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let Ok(addr) = addr.parse::<std::net::IpAddr>() else {
        return false;
    };
    let max = if addr.is_ipv4() { 32 } else { 128 };
    len.is_none_or(|l| {
        !l.is_empty()
            && l.bytes().all(|b| b.is_ascii_digit())
            && (l == "0" || !l.starts_with('0'))
            && l.parse::<u32>().is_ok_and(|n| n <= max)
    })
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
            if !is_address_or_prefix(s) {
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

/// Which NSG rules to translate: an NSG evaluates each direction on its
/// own, and a palisade policy is one first-match list, so an import takes
/// one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "Inbound",
            Direction::Outbound => "Outbound",
        }
    }
}

/// The policy text an import produced, and what the operator should hear
/// about it (printed to stderr).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    pub text: String,
    pub warnings: Vec<String>,
}

/// Azure's default rules of each direction, below every user rule:
/// (name, priority, source, destination); each allows every protocol and
/// port, and DenyAll (65500) becomes `default deny`.
const AZURE_DEFAULTS: [(Direction, &str, i64, &str, &str); 4] = [
    (
        Direction::Inbound,
        "AllowVnetInBound",
        65000,
        "VirtualNetwork",
        "VirtualNetwork",
    ),
    (
        Direction::Inbound,
        "AllowAzureLoadBalancerInBound",
        65001,
        "AzureLoadBalancer",
        "*",
    ),
    (
        Direction::Outbound,
        "AllowVnetOutBound",
        65000,
        "VirtualNetwork",
        "VirtualNetwork",
    ),
    (
        Direction::Outbound,
        "AllowInternetOutBound",
        65001,
        "*",
        "Internet",
    ),
];

/// Which address families a list of translated addresses covers.
fn families(items: &[String]) -> (bool, bool) {
    let mut v4 = false;
    let mut v6 = false;
    for i in items {
        if i == "any" {
            return (true, true);
        }
        let ip = i
            .parse::<ipnet::IpNet>()
            .map(|n| n.addr())
            .or_else(|_| i.parse::<std::net::IpAddr>());
        match ip {
            Ok(std::net::IpAddr::V4(_)) => v4 = true,
            Ok(std::net::IpAddr::V6(_)) => v6 = true,
            Err(_) => return (true, true),
        }
    }
    (v4, v6)
}

/// Translates the NSG security rules of one direction into a policy: one
/// `rule` per NSG rule in priority order, then Azure's default rules
/// (those whose service tags the mapping gives; the others are named in a
/// warning), then `default deny` for DenyAll. `direction` may be left out
/// when the document holds rules of one direction only.
pub fn nsg(
    json: &str,
    tags: &BTreeMap<String, Vec<String>>,
    direction: Option<Direction>,
) -> Result<Imported, ImportError> {
    let doc: Value = serde_json::from_str(json).map_err(|e| {
        // serde_json's message ends with " at line L column C"; the
        // position is given as the error's own.
        let message = e.to_string();
        let message = match message.rfind(" at line ") {
            Some(i) if e.line() > 0 => message[..i].to_string(),
            _ => message,
        };
        ImportError::Json {
            at: (e.line() > 0).then(|| (e.line(), e.column().max(1))),
            message,
        }
    })?;
    let offsets = value_offsets(json);
    let position = |path: &str| offsets.get(path).map(|&o| line_col(json, o));
    let mut found = Vec::new();
    collect_rules(&doc, "", &mut found);
    if found.is_empty() {
        // `az network nsg rule list` prints `[]` for an NSG without rules
        // of its own: what remains are Azure's defaults, for the direction
        // asked for.
        if doc.as_array().is_some_and(|a| a.is_empty()) {
            if direction.is_none() {
                return Err(ImportError::EmptyList);
            }
        } else {
            return Err(ImportError::NoRules);
        }
    }
    if let Some(f) = found.iter().find(|f| is_arm_expression(&f.nsg)) {
        return Err(ImportError::Field {
            at: position(&format!("{}/name", f.path)),
            rule: "a securityRules resource".into(),
            field: "name".into(),
            problem: arm_expression(&f.nsg),
        });
    }
    let groups: std::collections::BTreeSet<&str> = found
        .iter()
        .map(|f| f.nsg.as_str())
        .filter(|n| !n.is_empty())
        .collect();
    if groups.len() > 1 {
        let names: Vec<&str> = groups.into_iter().collect();
        return Err(ImportError::Several(names.join(", ")));
    }
    let nsg_name = found.iter().map(|f| f.nsg.clone()).find(|n| !n.is_empty());

    struct Out {
        direction: Direction,
        priority: i64,
        /// Where the rule's priority is written.
        at: Option<(usize, usize)>,
        raw_name: String,
        text: String,
    }
    let mut outs = Vec::new();
    let mut taken = HashSet::new();
    for f in &found {
        let rule = f.rule;
        let raw_name = field(rule, "name")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();
        let ctx = Ctx {
            rule: if raw_name.is_empty() || is_arm_expression(&raw_name) {
                "a rule without a name".to_string()
            } else {
                format!("rule `{raw_name}`")
            },
            tags,
            text: json,
            offsets: &offsets,
            path: &f.path,
        };
        if is_arm_expression(&raw_name) {
            return Err(ImportError::Field {
                at: ctx.at("name"),
                rule: "a security rule".into(),
                field: "name".into(),
                problem: arm_expression(&raw_name),
            });
        }
        let priority = field(rule, "priority")
            .and_then(|v| v.as_i64())
            .ok_or_else(|| match field(rule, "priority").and_then(Value::as_str) {
                Some(e) if is_arm_expression(e) => ctx.err("priority", arm_expression(e)),
                _ => ctx.err("priority", "missing or not a number"),
            })?;
        if !(100..=4096).contains(&priority) {
            return Err(ctx.err(
                "priority",
                format!("{priority} is outside Azure's range 100-4096"),
            ));
        }
        let direction = field(rule, "direction")
            .and_then(|v| v.as_str())
            .ok_or_else(|| ctx.err("direction", "missing"))?;
        let direction = match direction.to_ascii_lowercase().as_str() {
            "inbound" => Direction::Inbound,
            "outbound" => Direction::Outbound,
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
        // Azure requires the protocol; only an explicit "*" means any.
        let protocol = match field(rule, "protocol") {
            None => {
                return Err(ctx.err(
                    "protocol",
                    "missing (Azure requires one of Tcp, Udp, Icmp, Esp, Ah or *)",
                ))
            }
            Some(v) => v
                .as_str()
                .ok_or_else(|| ctx.err("protocol", "expected a string"))?,
        };
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
        let (s4, s6) = families(&src);
        let (d4, d6) = families(&dst);
        if !(s4 && d4 || s6 && d6) {
            return Err(ctx.err(
                "destinationAddressPrefix",
                "the source and destination are of different address families: the rule can never match",
            ));
        }
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
        let mut comment = format!("{} priority {priority}", direction.as_str());
        if !desc.is_empty() {
            comment.push_str(": ");
            comment.push_str(desc);
        }
        // A comment is one line: line breaks and other control characters
        // in the description become spaces; quotes are escaped.
        let comment: String = comment
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        let _ = write!(text, " comment {}", super::fmt::quoted(&comment));
        outs.push(Out {
            direction,
            at: ctx.at("priority"),
            priority,
            raw_name: if raw_name.is_empty() {
                name.clone()
            } else {
                raw_name
            },
            text,
        });
    }
    let inbound = outs
        .iter()
        .filter(|o| o.direction == Direction::Inbound)
        .count();
    let outbound = outs.len() - inbound;
    let direction = match direction {
        Some(d) => d,
        None if outbound == 0 => Direction::Inbound,
        None if inbound == 0 => Direction::Outbound,
        None => return Err(ImportError::BothDirections { inbound, outbound }),
    };
    let mut warnings = Vec::new();
    let mut outs: Vec<Out> = outs
        .into_iter()
        .filter(|o| o.direction == direction)
        .collect();
    if outs.is_empty() {
        warnings.push(format!(
            "the document holds no {} rules: only Azure's defaults are translated",
            direction.as_str()
        ));
    }
    outs.sort_by_key(|o| o.priority);
    for pair in outs.windows(2) {
        if pair[0].priority == pair[1].priority {
            return Err(ImportError::Field {
                at: pair[1].at,
                rule: format!("rule `{}`", pair[1].raw_name),
                field: "priority".into(),
                problem: format!(
                    "{} {} is also the priority of rule `{}`; Azure allows one rule per priority and direction, so their order is unknown",
                    direction.as_str(),
                    pair[1].priority,
                    pair[0].raw_name
                ),
            });
        }
    }
    // The name goes into a `#` comment, which a line break would end.
    let of = nsg_name.as_deref().map_or(String::new(), |n| {
        let n: String = n
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        format!(" of NSG `{n}`")
    });
    let mut policy = format!(
        "# Imported from Azure NSG security rules by `palisade import nsg`:\n\
         # the {dir} rules{of} in priority order, then Azure's default\n\
         # {dir} rules. An NSG judges each direction on its own; this policy\n\
         # holds one direction.\n\n",
        dir = direction.as_str()
    );
    for o in &outs {
        policy.push_str(&o.text);
        policy.push('\n');
    }
    policy.push_str("\n# Azure's default rules.\n");
    let side = |item: &str| -> Option<String> {
        if item == "*" {
            Some("any".into())
        } else {
            tags.get(item).map(|p| p.join(", "))
        }
    };
    for (dir, name, priority, src, dst) in AZURE_DEFAULTS {
        if dir != direction {
            continue;
        }
        match (side(src), side(dst)) {
            (Some(s), Some(d)) => {
                let rule = sanitize(name, &mut taken);
                let _ = writeln!(
                    policy,
                    "rule {rule} allow {s} -> {d} comment \"{} priority {priority}: Azure default\"",
                    direction.as_str()
                );
            }
            _ => {
                let tag = if side(src).is_none() { src } else { dst };
                let _ = writeln!(
                    policy,
                    "# not translated: {name} (priority {priority}, {src} -> {dst}, allow): no prefixes for `{tag}`"
                );
                warnings.push(format!(
                    "Azure's default rule {name} ({src} -> {dst}, allow) is not translated: give the prefixes of `{tag}` with --service-tags FILE; without it the policy denies that traffic"
                ));
            }
        }
    }
    let _ = writeln!(
        policy,
        "\n# DenyAll{}.\ndefault deny",
        if direction == Direction::Inbound {
            "InBound"
        } else {
            "OutBound"
        }
    );
    Ok(Imported {
        text: policy,
        warnings,
    })
}

/// A ClassBench rule set as a policy: one `allow` rule per line, in order
/// (ClassBench rules carry no action; the classification is the rule), and
/// `default deny`. Rule `cbN` is line N+1 (ClassBench's 0-based rule id N).
pub fn classbench(text: &str) -> Result<String, ImportError> {
    use crate::classify::classbench::parse_rules;
    let entries = parse_rules(text)?;
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
            (58, 58) => {
                return Err(ImportError::Field {
                    at: Some((e.rule as usize + 1, 1)),
                    rule: format!("rule cb{}", e.rule),
                    field: "protocol".into(),
                    problem: "protocol 58 is ICMPv6, which palisade matches on IPv6 packets only, and ClassBench rules are IPv4: the rule could never match".into(),
                })
            }
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
                        at: Some((e.rule as usize + 1, 1)),
                        rule: format!("rule cb{}", e.rule),
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
                    at: Some((e.rule as usize + 1, 1)),
                    rule: format!("rule cb{}", e.rule),
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
    fn classbench_protocols_compile_or_are_refused_with_the_line() {
        let line = |proto: &str| {
            format!(
                "@192.0.2.0/24\t198.51.100.0/24\t0 : 65535\t0 : 65535\t{proto}\t0x0000/0x0000\n"
            )
        };
        // EIGRP (0x58 is 88): a raw protocol number, which compiles.
        let text = classbench(&format!("{}{}", line("0x06/0xFF"), line("0x58/0xFF"))).unwrap();
        assert!(text.contains("service ip/88"), "{text}");
        let opts = crate::policy::Options {
            today: crate::policy::Date::new(2026, 1, 1).unwrap(),
        };
        assert!(
            crate::policy::load::compile_str("imported.policy", &text, opts).is_ok(),
            "{text}"
        );
        // ICMPv6 on IPv4 addresses could never match: refused, with where.
        let e = classbench(&format!("{}{}", line("0x06/0xFF"), line("0x3A/0xFF")))
            .unwrap_err()
            .in_file("acl.rules");
        assert!(
            e.starts_with("acl.rules:2:1: rule cb1:") && e.contains("ICMPv6"),
            "{e}"
        );
    }

    #[test]
    fn reserved_words_are_not_used_as_rule_names() {
        let mut taken = HashSet::new();
        assert_eq!(sanitize("Default", &mut taken), "nsg-default");
        assert_eq!(sanitize("ANY", &mut taken), "nsg-any");
        assert_eq!(sanitize("Allow Web", &mut taken), "allow-web");
        assert_eq!(sanitize("443-in", &mut taken), "nsg-443-in");
    }

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
        let out = nsg(json, &BTreeMap::new(), None).unwrap().text;
        let rules: Vec<&str> = out.lines().filter(|l| l.starts_with("rule ")).collect();
        assert_eq!(rules[0], "rule deny-ssh deny 192.0.2.0/24, 198.51.100.7 -> any service tcp/22, udp/22 comment \"Inbound priority 100\"");
        assert_eq!(rules[1], "rule allow-web allow any -> 10.0.1.0/24 service tcp/80, tcp/443 comment \"Inbound priority 200\"");
        let tagged = json.replace(
            "\"*\", \"sourcePortRange\"",
            "\"Internet\", \"sourcePortRange\"",
        );
        let err = nsg(&tagged, &BTreeMap::new(), None).unwrap_err();
        // The error names the file, line and column of the field's value.
        let col = tagged.lines().nth(2).unwrap().find("\"Internet\"").unwrap() + 1;
        assert_eq!(
            err.in_file("nsg.json"),
            format!("nsg.json:3:{col}: rule `allow-web`: field `sourceAddressPrefix`: `Internet` is a service tag (or not an address); give its prefixes with --service-tags FILE")
        );
        // Found by fuzzing: a leading zero, which some readers take for
        // octal, is not an address (the policy would refuse it).
        for odd in ["096.0.2.0/24", "192.0.2.0/024", "192.0.2.0/33"] {
            let err = nsg(&json.replace("192.0.2.0/24", odd), &BTreeMap::new(), None)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("`{odd}` is a service tag (or not an address)")),
                "{err}"
            );
        }
        let mut tags = BTreeMap::new();
        tags.insert("Internet".to_string(), vec!["0.0.0.0/0".to_string()]);
        assert!(nsg(&tagged, &tags, None)
            .unwrap()
            .text
            .contains("rule allow-web allow 0.0.0.0/0 -> 10.0.1.0/24"));
        // A tag mapped to nothing says so.
        tags.insert("Internet".to_string(), vec![]);
        let err = nsg(&tagged, &tags, None).unwrap_err().to_string();
        assert!(
            err.contains("service tag `Internet` maps to no prefixes"),
            "{err}"
        );
        // `--include-default` output: Azure's default rules (priorities
        // 65000 and up) are left to the import's own defaults.
        let with_defaults = json.replacen(
            "[",
            r#"[{"name": "AllowVnetInBound", "priority": 65000, "direction": "Inbound", "access": "Allow",
                "protocol": "*", "sourceAddressPrefix": "VirtualNetwork", "sourcePortRange": "*",
                "destinationAddressPrefix": "VirtualNetwork", "destinationPortRange": "*",
                "type": "Microsoft.Network/networkSecurityGroups/defaultSecurityRules"},"#,
            1,
        );
        let out = nsg(&with_defaults, &BTreeMap::new(), None).unwrap().text;
        assert!(out.contains("rule deny-ssh deny"), "{out}");
    }

    #[test]
    fn descriptions_keep_their_quotes_and_lose_only_line_breaks() {
        let json = r#"[{"name": "web", "priority": 100, "direction": "Inbound", "access": "Allow",
            "protocol": "Tcp", "sourceAddressPrefix": "*", "sourcePortRange": "*",
            "destinationAddressPrefix": "192.0.2.10", "destinationPortRange": "443",
            "description": "the \"web\" tier\nC:\\certs"}]"#;
        let out = nsg(json, &BTreeMap::new(), None).unwrap().text;
        let rule = out.lines().find(|l| l.starts_with("rule web")).unwrap();
        assert!(
            rule.ends_with(r#"comment "Inbound priority 100: the \"web\" tier C:\\certs""#),
            "{rule}"
        );
        // The policy reads the comment back as Azure wrote it.
        let (file, diags) =
            crate::policy::parse::parse_file(crate::policy::source::FileId(0), &out);
        assert!(diags.is_empty(), "{diags:?}");
        let comment = file.stmts.iter().find_map(|s| match s {
            crate::policy::ast::Stmt::Rule(r) => r.options.comment.clone(),
            _ => None,
        });
        assert_eq!(
            comment.map(|(c, _)| c).as_deref(),
            Some("Inbound priority 100: the \"web\" tier C:\\certs")
        );
    }

    #[test]
    fn an_empty_rule_list_gives_azure_defaults_for_the_direction_asked() {
        let err = nsg("[]", &BTreeMap::new(), None).unwrap_err();
        assert_eq!(err, ImportError::EmptyList);
        assert!(err.to_string().contains("--direction"), "{err}");
        let out = nsg("[]", &BTreeMap::new(), Some(Direction::Outbound)).unwrap();
        assert!(out.text.contains("default deny"), "{}", out.text);
        assert!(
            !out.text.lines().any(|l| l.starts_with("rule ")) || out.text.contains("Azure default")
        );
        // Anything else without rules is still an error.
        assert_eq!(
            nsg("{}", &BTreeMap::new(), Some(Direction::Inbound)).unwrap_err(),
            ImportError::NoRules
        );
    }

    #[test]
    fn invalid_json_names_line_and_column() {
        let err = nsg("[\n  {\"name\": }\n]", &BTreeMap::new(), None).unwrap_err();
        assert_eq!(err.at(), Some((2, 12)), "{err}");
        assert!(
            err.in_file("x.json")
                .starts_with("x.json:2:12: not valid JSON: "),
            "{}",
            err.in_file("x.json")
        );
    }

    #[test]
    fn arm_expressions_are_named_as_such() {
        let child = r#"{"resources": [{"type": "Microsoft.Network/networkSecurityGroups/securityRules",
            "name": "[concat('app-nsg', '/Allow-Icmp')]",
            "properties": {"priority": 100, "direction": "Inbound", "access": "Allow", "protocol": "Icmp",
              "sourceAddressPrefix": "*", "sourcePortRange": "*", "destinationAddressPrefix": "*",
              "destinationPortRange": "*"}}]}"#;
        let err = nsg(child, &BTreeMap::new(), None).unwrap_err().to_string();
        assert!(
            err.contains("`[concat('app-nsg', '/Allow-Icmp')]` is an ARM template expression"),
            "{err}"
        );
        let prio = rule("r", 100, "Inbound", "Allow", "*").replace("100", "\"[parameters('p')]\"");
        let err = nsg(&format!("[{prio}]"), &BTreeMap::new(), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("field `priority`: `[parameters('p')]` is an ARM template expression"),
            "{err}"
        );
    }

    /// A rule without ports or protocol is refused, naming the rule and the
    /// field, instead of being read as every port or every protocol.
    #[test]
    fn missing_ports_or_protocol_are_errors_not_any() {
        let none = BTreeMap::new();
        let base = r#"[ {"name": "R1", "priority": 100, "direction": "Inbound", "access": "Allow", "protocol": "Tcp",
   "sourceAddressPrefix": "192.0.2.0/24", "sourcePortRange": "*",
   "destinationAddressPrefix": "198.51.100.1"DPORT} ]"#;
        let err = |doc: &str| nsg(doc, &none, None).unwrap_err().in_file("nsg.json");
        // No destination port field at all: the error points at the rule.
        let e = err(&base.replace("DPORT", ""));
        assert!(
            e.starts_with(
                "nsg.json:1:3: rule `R1`: field `destinationPortRange`: no port range given"
            ),
            "{e}"
        );
        // Present but empty, in either form or both: it points at the field.
        for empty in [
            r#", "destinationPortRange": """#,
            r#", "destinationPortRanges": []"#,
            r#", "destinationPortRange": "", "destinationPortRanges": []"#,
        ] {
            let e = err(&base.replace("DPORT", empty));
            assert!(
                e.contains("rule `R1`: field `destinationPortRange`: no port range given"),
                "{empty}: {e}"
            );
        }
        // No source port.
        let e = err(&base
            .replace(r#", "sourcePortRange": "*""#, "")
            .replace("DPORT", r#", "destinationPortRange": "22""#));
        assert!(
            e.contains("rule `R1`: field `sourcePortRange`: no port range given"),
            "{e}"
        );
        // No protocol, or one that is not a string.
        let with_port = base.replace("DPORT", r#", "destinationPortRange": "22""#);
        let e = err(&with_port.replace(r#" "protocol": "Tcp","#, ""));
        assert!(e.contains("rule `R1`: field `protocol`: missing"), "{e}");
        let e = err(&with_port.replace(r#""protocol": "Tcp""#, r#""protocol": 6"#));
        assert!(
            e.contains("rule `R1`: field `protocol`: expected a string"),
            "{e}"
        );
        // An explicit "*" is still every port and every protocol.
        let any = with_port
            .replace(r#""protocol": "Tcp""#, r#""protocol": "*""#)
            .replace(
                r#""destinationPortRange": "22""#,
                r#""destinationPortRange": "*""#,
            );
        let out = nsg(&any, &none, None).unwrap().text;
        assert_eq!(
            rule_lines(&out),
            ["rule r1 allow 192.0.2.0/24 -> 198.51.100.1 comment \"Inbound priority 100\""],
            "{out}"
        );
    }

    fn rule(name: &str, priority: i64, direction: &str, access: &str, dst: &str) -> String {
        format!(
            r#"{{"name": "{name}", "properties": {{"priority": {priority}, "direction": "{direction}",
               "access": "{access}", "protocol": "Tcp", "sourceAddressPrefix": "*",
               "sourcePortRange": "*", "destinationAddressPrefix": "{dst}",
               "destinationPortRange": "443"}}}}"#
        )
    }

    fn rule_lines(text: &str) -> Vec<&str> {
        text.lines().filter(|l| l.starts_with("rule ")).collect()
    }

    #[test]
    fn child_rule_resources_are_translated_with_the_inline_ones() {
        let allow = rule("allow-web", 200, "Inbound", "Allow", "10.0.0.0/24");
        let mut deny: Value =
            serde_json::from_str(&rule("nsg/deny-web", 100, "Inbound", "Deny", "10.0.0.0/24"))
                .unwrap();
        deny["type"] = "Microsoft.Network/networkSecurityGroups/securityRules".into();
        let doc = format!(
            r#"{{"resources": [
                 {{"type": "Microsoft.Network/networkSecurityGroups", "name": "nsg",
                   "properties": {{"securityRules": [{allow}]}}}},
                 {deny}]}}"#
        );
        let out = nsg(&doc, &BTreeMap::new(), None).unwrap().text;
        let rules = rule_lines(&out);
        assert_eq!(rules.len(), 2, "{out}");
        assert!(rules[0].starts_with("rule nsg-deny-web deny "), "{out}");
        assert!(rules[1].starts_with("rule allow-web allow "), "{out}");
    }

    #[test]
    fn rejects_what_azure_rejects_or_what_cannot_be_one_list() {
        let doc = |rules: &[String]| format!("[{}]", rules.join(","));
        let none = BTreeMap::new();
        let err = |d: &str| nsg(d, &none, None).unwrap_err().to_string();
        // Two rules at one priority and direction: their order is unknown.
        let e = err(&doc(&[
            rule("b-allow", 100, "Outbound", "Allow", "*"),
            rule("a-deny", 100, "Outbound", "Deny", "*"),
        ]));
        assert!(
            e.contains("priority") && e.contains("a-deny") && e.contains("b-allow"),
            "{e}"
        );
        // The same priority in the two directions is fine.
        let both = doc(&[
            rule("in", 100, "Inbound", "Allow", "*"),
            rule("out", 100, "Outbound", "Deny", "*"),
        ]);
        assert!(err(&both).contains("--direction"));
        let out = nsg(&both, &none, Some(Direction::Outbound)).unwrap().text;
        assert_eq!(rule_lines(&out).len(), 1, "{out}");
        assert!(rule_lines(&out)[0].starts_with("rule out deny"), "{out}");
        // Out of Azure's priority range.
        assert!(err(&doc(&[rule("low", 5, "Inbound", "Allow", "*")])).contains("100-4096"));
        // Families that never meet.
        let mixed = rule("mixed", 100, "Inbound", "Allow", "::/0").replace(
            "\"sourceAddressPrefix\": \"*\"",
            "\"sourceAddressPrefix\": \"10.0.0.0/16\"",
        );
        assert!(err(&doc(&[mixed])).contains("never match"));
        // Rules of two NSGs: each judges the traffic, not one list.
        let two = r#"{"resources": [
            {"type": "Microsoft.Network/networkSecurityGroups", "name": "a",
             "properties": {"securityRules": [RULE]}},
            {"type": "Microsoft.Network/networkSecurityGroups", "name": "b",
             "properties": {"securityRules": [RULE]}}]}"#
            .replace("RULE", &rule("r", 100, "Inbound", "Allow", "*"));
        assert!(err(&two).contains("several network security groups (a, b)"));
    }
}
