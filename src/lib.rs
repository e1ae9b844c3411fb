//! palisade: an egress-control appliance for a hybrid network.
//!
//! One policy, written by security teams in palisade's policy language, is
//! compiled ([`policy`]) into a packet classifier ([`classify`]) and HTTP
//! rules, and enforced at two points: an inline filter between the edge and
//! on-premises ports, and a forced-tunneling HTTP(S) proxy. Both write to one
//! tamper-evident audit trail.
//!
//! The policy compiler and the classifier are sans-IO: pure functions from
//! text to a compiled value and from a flow key to a verdict.

/// `eprintln!` for the daemons: a line to stderr, where a closed or failing
/// stderr is ignored instead of panicking. The proxy and the filter keep
/// enforcing when the terminal or pipe they were started from goes away.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

pub mod audit;
pub mod classify;
pub mod config;
pub mod conntrack;
pub mod dataplane;
pub mod packet;
pub mod policy;
pub mod proxy;
pub mod sys;
