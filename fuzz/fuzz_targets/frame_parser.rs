//! Fuzzes frame parsing on arbitrary bytes: the parser must never panic or
//! read out of bounds (the contract in `src/packet`), and a parsed IP
//! packet's reported length never exceeds the frame. The first 10 bytes are
//! also read as the offload header a batched port receives with a frame:
//! counting a super-frame's segments must not panic either, and gives at
//! least one packet and at most one per payload byte.

#![no_main]

use libfuzzer_sys::fuzz_target;
use palisade::dataplane::port::{Frame, Offload};
use palisade::packet::{parse, Payload};

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = parse(data) {
        if let Payload::Ip(ip) = frame.payload {
            assert!(
                ip.ip_len <= data.len(),
                "ip_len {} > frame {}",
                ip.ip_len,
                data.len()
            );
        }
    }
    if data.len() >= 10 {
        let mut o = Offload::NONE;
        o.0.copy_from_slice(&data[..10]);
        let f = Frame {
            data: &data[10..],
            offload: o,
        };
        let (packets, _) = f.segments();
        assert!(packets >= 1);
        assert!(packets as usize <= f.data.len().max(1));
    }
});
