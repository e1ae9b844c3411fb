//! The syntax tree: what the parser read, with a span for every token that a
//! diagnostic may point at. Nothing here is resolved or checked beyond syntax.

use super::source::Span;
use std::net::IpAddr;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Name {
    pub text: String,
    pub span: Span,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }
}

/// An address, a prefix, a range of addresses, a name, or `any`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetItem {
    /// `10.0.0.0/8`, `192.0.2.1` (a /32), `2001:db8::/32`.
    Prefix {
        addr: IpAddr,
        len: u8,
        span: Span,
    },
    /// `192.0.2.10-192.0.2.20`.
    Range {
        lo: IpAddr,
        hi: IpAddr,
        span: Span,
    },
    /// `any` (both families), `any4`, `any6`.
    Any {
        family: Option<Family>,
        span: Span,
    },
    Name(Name),
}

impl NetItem {
    pub fn span(&self) -> Span {
        match self {
            NetItem::Prefix { span, .. }
            | NetItem::Range { span, .. }
            | NetItem::Any { span, .. } => *span,
            NetItem::Name(n) => n.span,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

/// A port or an inclusive port range as written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    /// Values as written (may be out of range: the resolver reports it).
    pub lo: u32,
    pub hi: u32,
    pub span: Span,
}

/// The protocol part of a service item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
    Icmp,
    Icmpv6,
    /// Any IP protocol by number (`ip/47`, or a name such as `gre`).
    Number(u32),
}

impl Proto {
    pub fn number(self) -> u32 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
            Proto::Sctp => 132,
            Proto::Icmp => 1,
            Proto::Icmpv6 => 58,
            Proto::Number(n) => n,
        }
    }

    pub fn has_ports(self) -> bool {
        matches!(self, Proto::Tcp | Proto::Udp | Proto::Sctp)
    }

    pub fn is_icmp(self) -> bool {
        matches!(self, Proto::Icmp | Proto::Icmpv6)
    }
}

/// An ICMP type and optional code, by number or name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IcmpSpec {
    pub ty: IcmpValue,
    pub code: Option<IcmpValue>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IcmpValue {
    Number(u32),
    Name(String),
}

/// One item of a service: `tcp/443`, `udp/53 sport 53`, `icmp/echo-request`,
/// `ip/47`, `tcp` (any port), or a service name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SvcItem {
    Proto {
        proto: Proto,
        proto_span: Span,
        dst_ports: Vec<PortRange>,
        src_ports: Vec<PortRange>,
        icmp: Option<IcmpSpec>,
        span: Span,
    },
    Name(Name),
}

impl SvcItem {
    pub fn span(&self) -> Span {
        match self {
            SvcItem::Proto { span, .. } => *span,
            SvcItem::Name(n) => n.span,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Def<T> {
    pub name: Name,
    pub items: Vec<T>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Date {
    pub year: u16,
    pub month: u8,
    pub day: u8,
    pub span: Span,
}

/// Options common to packet and HTTP rules.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleOptions {
    pub log: bool,
    pub owner: Option<(String, Span)>,
    pub expires: Option<Date>,
    pub comment: Option<(String, Span)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PacketRule {
    pub name: Name,
    pub action: Action,
    pub src: Vec<NetItem>,
    pub dst: Vec<NetItem>,
    /// Empty: every protocol.
    pub services: Vec<SvcItem>,
    pub options: RuleOptions,
    pub span: Span,
}

/// A destination of an HTTP rule: a quoted host pattern or an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HttpDest {
    Host { pattern: String, span: Span },
    Net(NetItem),
}

impl HttpDest {
    pub fn span(&self) -> Span {
        match self {
            HttpDest::Host { span, .. } => *span,
            HttpDest::Net(n) => n.span(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpRule {
    pub name: Name,
    pub action: Action,
    pub src: Vec<NetItem>,
    pub dst: Vec<HttpDest>,
    /// Empty: every port.
    pub ports: Vec<PortRange>,
    /// Empty: every method.
    pub methods: Vec<Name>,
    /// Allow CONNECT tunnels that do not start with a TLS ClientHello.
    pub plain_tunnel: bool,
    pub options: RuleOptions,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DefaultStmt {
    pub action: Action,
    pub log: bool,
    pub span: Span,
}

/// What an expectation sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    Packet {
        proto: Proto,
        proto_span: Span,
        src: IpAddr,
        src_port: Option<u32>,
        dst: IpAddr,
        dst_port: Option<u32>,
        icmp: Option<IcmpSpec>,
    },
    Http {
        src: IpAddr,
        url: String,
        url_span: Span,
        method: Option<Name>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expect {
    pub action: Action,
    pub probe: Probe,
    /// `by NAME`: the rule that must decide.
    pub by: Option<Name>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stmt {
    Include { path: String, span: Span },
    Net(Def<NetItem>),
    Svc(Def<SvcItem>),
    Zone(Def<NetItem>),
    Rule(PacketRule),
    Http(HttpRule),
    Default(DefaultStmt),
    Expect(Expect),
}

impl Stmt {
    pub fn span(&self) -> Span {
        match self {
            Stmt::Include { span, .. } => *span,
            Stmt::Net(d) | Stmt::Zone(d) => d.span,
            Stmt::Svc(d) => d.span,
            Stmt::Rule(r) => r.span,
            Stmt::Http(r) => r.span,
            Stmt::Default(d) => d.span,
            Stmt::Expect(e) => e.span,
        }
    }
}

/// A comment as written, kept for the formatter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Comment {
    pub text: String,
    pub span: Span,
}

/// One parsed file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct File {
    pub stmts: Vec<Stmt>,
    pub comments: Vec<Comment>,
}
