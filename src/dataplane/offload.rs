//! The kernel fast path: established flows cross inside the kernel.
//!
//! Every frame of a flow crossing the filter through its packet sockets is
//! copied into palisade and copied out again. Once palisade has admitted a
//! flow and seen it established (a TCP handshake completed; a reply to a
//! UDP flow), the rest of the flow needs no decision, only its
//! accounting. So palisade hands such a flow to the kernel:
//!
//! - a hash map, keyed by (arrival port, protocol, addresses, ports), holds
//!   the flows palisade offloaded, one entry per direction, with the port to
//!   leave by and the flow's packet and byte counts and last-seen time;
//! - a classifier program on each port's ingress (`tcx`) sends a frame whose
//!   key is in the map straight out of the other port (`bpf_redirect`),
//!   counting it; every other frame goes on to palisade unchanged;
//! - a socket filter on each port's packet socket makes the socket skip
//!   exactly those frames, so palisade does not see them twice.
//!
//! Only what needs no decision is offloaded. A frame with TCP SYN, FIN or
//! RST, a fragment, an IPv6 extension header, a VLAN tag, ICMP, anything
//! but untagged IPv4/IPv6 TCP and UDP, always reaches palisade: it keeps
//! tracking TCP state, fragments and tags itself. Palisade keeps the flow in
//! its connection table and remains its authority: it takes the kernel's
//! last-seen time before timing a flow out, adds the kernel's counts to the
//! flow's `flow_end` record, and withdraws every offloaded flow when a
//! policy is reloaded, so that each flow's next frame is checked against
//! the new policy (and cut, or offloaded again).
//!
//! A flow's direction is offloaded only where palisade's own checks would
//! pass every frame the entry matches: the flow's source lies in the zone
//! of the port its original direction arrives on, and its destination in
//! the zone of the other port (so the reply entry cannot carry spoofed
//! frames), under the policy in force, which must be the one that admitted
//! the flow. UDP is offloaded once palisade has seen a reply.
//!
//! Hand-over and withdrawal are not atomic with frames in flight:
//! - frames of the flow already queued in a port socket (up to its receive
//!   buffer) leave after palisade decides them, and may follow frames the
//!   kernel forwarded meanwhile: a reordering, once per flow, which TCP
//!   and UDP applications tolerate as they tolerate the network's;
//! - the socket filter runs before the ingress program, each with its own
//!   lookup: a frame that arrives while its entry is being added can be
//!   forwarded by both (a duplicate), and one that arrives while its entry
//!   is being removed by neither (a loss) — a window of one frame's
//!   processing, at the hand-over and withdrawal only.
//!
//! The programs are assembled here, instruction by instruction, rather than
//! compiled from C: palisade builds with cargo alone, and the programs are
//! small. The kernel's verifier checks them when they load; a kernel that
//! refuses them (too old for `tcx`, no BPF) leaves the filter working
//! through its sockets alone, with a warning.

use crate::classify::FlowKey;
use crate::sys::bpf;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

/// Registers.
const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R3: u8 = 3;
const R4: u8 = 4;
const R6: u8 = 6;
const R7: u8 = 7;
const R8: u8 = 8;
const R9: u8 = 9;
const FP: u8 = 10;

/// Access sizes.
#[derive(Clone, Copy)]
enum Size {
    B = 0x10,
    H = 0x08,
    W = 0x00,
    Dw = 0x18,
}

/// ALU operations.
const ADD: u8 = 0x00;
const SUB: u8 = 0x10;
const MUL: u8 = 0x20;
const AND: u8 = 0x50;
const LSH: u8 = 0x60;
const RSH: u8 = 0x70;
/// Jump conditions.
const JEQ: u8 = 0x10;
const JNE: u8 = 0x50;
const JSET: u8 = 0x40;
const JLT: u8 = 0xa0;
const JGT: u8 = 0x20;

/// Helper functions.
const MAP_LOOKUP_ELEM: i32 = 1;
const KTIME_GET_NS: i32 = 5;
const REDIRECT: i32 = 23;
const SKB_LOAD_BYTES: i32 = 26;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Label(usize);

/// A small assembler for the kernel's BPF instruction set, with labels for
/// forward jumps.
struct Asm {
    insns: Vec<[u8; 8]>,
    labels: Vec<Option<usize>>,
    fixups: Vec<(usize, Label)>,
}

impl Asm {
    fn new() -> Asm {
        Asm {
            insns: Vec::new(),
            labels: Vec::new(),
            fixups: Vec::new(),
        }
    }

    fn raw(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) {
        let o = off.to_le_bytes();
        let i = imm.to_le_bytes();
        self.insns
            .push([code, (src << 4) | dst, o[0], o[1], i[0], i[1], i[2], i[3]]);
    }

    fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    fn bind(&mut self, l: Label) {
        self.labels[l.0] = Some(self.insns.len());
    }

    fn mov_imm(&mut self, dst: u8, imm: i32) {
        self.raw(0xb7, dst, 0, 0, imm);
    }

    fn mov(&mut self, dst: u8, src: u8) {
        self.raw(0xbf, dst, src, 0, 0);
    }

    fn alu_imm(&mut self, op: u8, dst: u8, imm: i32) {
        self.raw(0x07 | op, dst, 0, 0, imm);
    }

    fn alu(&mut self, op: u8, dst: u8, src: u8) {
        self.raw(0x0f | op, dst, src, 0, 0);
    }

    /// `dst = *(size *)(src + off)`
    fn ldx(&mut self, size: Size, dst: u8, src: u8, off: i16) {
        self.raw(0x61 | size as u8, dst, src, off, 0);
    }

    /// `*(size *)(dst + off) = src`
    fn stx(&mut self, size: Size, dst: u8, off: i16, src: u8) {
        self.raw(0x63 | size as u8, dst, src, off, 0);
    }

    /// `*(size *)(dst + off) = imm`
    fn st(&mut self, size: Size, dst: u8, off: i16, imm: i32) {
        self.raw(0x62 | size as u8, dst, 0, off, imm);
    }

    /// `lock *(u64 *)(dst + off) += src`
    fn atomic_add(&mut self, dst: u8, off: i16, src: u8) {
        self.raw(0xdb, dst, src, off, 0);
    }

    fn jump(&mut self, code: u8, dst: u8, src: u8, imm: i32, to: Label) {
        self.fixups.push((self.insns.len(), to));
        self.raw(code, dst, src, 0, imm);
    }

    /// `if dst <op> src goto to`
    fn jmp_reg(&mut self, op: u8, dst: u8, src: u8, to: Label) {
        self.jump(0x0d | op, dst, src, 0, to);
    }

    /// `dst = htobe16(dst)`: a big-endian 16-bit field, loaded as it lies,
    /// to its value.
    fn be16(&mut self, dst: u8) {
        self.raw(0xdc, dst, 0, 0, 16);
    }

    /// `if dst <op> imm goto to`
    fn jmp_imm(&mut self, op: u8, dst: u8, imm: i32, to: Label) {
        self.jump(0x05 | op, dst, 0, imm, to);
    }

    fn ja(&mut self, to: Label) {
        self.jump(0x05, 0, 0, 0, to);
    }

    fn call(&mut self, helper: i32) {
        self.raw(0x85, 0, 0, 0, helper);
    }

    fn exit(&mut self) {
        self.raw(0x95, 0, 0, 0, 0);
    }

    /// `dst = map` (a map descriptor, resolved by the kernel at load).
    fn ld_map(&mut self, dst: u8, map: BorrowedFd<'_>) {
        use std::os::fd::AsRawFd;
        self.raw(0x18, dst, 1, 0, map.as_raw_fd());
        self.raw(0, 0, 0, 0, 0);
    }

    fn finish(mut self) -> Vec<[u8; 8]> {
        for (at, l) in std::mem::take(&mut self.fixups) {
            let to = self.labels[l.0].expect("every jump target is bound");
            let off = (to as i64 - at as i64 - 1) as i16;
            self.insns[at][2..4].copy_from_slice(&off.to_le_bytes());
        }
        self.insns
    }
}

/// The map key: a frame's arrival port and its flow in wire order.
pub const KEY_LEN: usize = 48;
/// The map value: the port to leave by, and the kernel's counts.
pub const VALUE_LEN: usize = 32;

/// Stack layout of the programs (offsets from the frame pointer).
const KEY: i16 = -48;
const KEY_PROTO: i16 = KEY + 4;
const KEY_FAMILY: i16 = KEY + 5;
const KEY_SRC: i16 = KEY + 8;
const KEY_DST: i16 = KEY + 24;
const KEY_PORTS: i16 = KEY + 40;
/// Scratch: the EtherType, then an IPv4 header.
const SCRATCH4: i16 = -72;
/// Scratch: an IPv6 header.
const SCRATCH6: i16 = -112;
/// Scratch: TCP data offset and flags.
const SCRATCH_TCP: i16 = -120;
/// The IP packet's length by its header (u64).
const IP_LEN: i16 = -128;
/// The frame's packets and bytes, for the totals (u64 each).
const COUNTED: i16 = -144;
/// The totals' key (u32 0).
const TOTALS_KEY: i16 = -152;

/// `struct __sk_buff` fields.
const SKB_LEN: i16 = 0;
const SKB_PKT_TYPE: i16 = 4;
const SKB_VLAN_PRESENT: i16 = 20;
const SKB_IFINDEX: i16 = 40;
const SKB_GSO_SEGS: i16 = 164;

const PACKET_OUTGOING: i32 = 4;
/// A socket filter's "keep the whole frame" (as the classic filter it
/// replaces: more than the largest offload frame).
const SOCKET_KEEP: i32 = 0x0004_0000;
/// `TCX_NEXT`: the frame goes on as if no program ran.
const TCX_NEXT: i32 = -1;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// On the port's ingress: redirect offloaded flows' frames.
    Ingress,
    /// On the port's packet socket: skip offloaded flows' frames (and the
    /// socket's own output, as the classic filter did).
    Socket,
}

/// Assembles one of the two programs. Both compute the same key the same
/// way, so a frame the ingress program sends on is exactly a frame the
/// socket skips.
fn program(kind: Kind, map: BorrowedFd<'_>, totals: BorrowedFd<'_>) -> Vec<[u8; 8]> {
    let mut a = Asm::new();
    let miss = a.label();
    let v4 = a.label();
    let v6 = a.label();
    let l4 = a.label();
    let tcp = a.label();
    let udp = a.label();
    let ports = a.label();

    a.mov(R6, R1);
    if kind == Kind::Socket {
        let incoming = a.label();
        a.ldx(Size::W, R0, R6, SKB_PKT_TYPE);
        a.jmp_imm(JNE, R0, PACKET_OUTGOING, incoming);
        a.mov_imm(R0, 0);
        a.exit();
        a.bind(incoming);
    }
    // Tagged frames stay with palisade.
    a.ldx(Size::W, R0, R6, SKB_VLAN_PRESENT);
    a.jmp_imm(JNE, R0, 0, miss);
    // The key starts zeroed, with the arrival port.
    a.mov_imm(R0, 0);
    for i in 0..(KEY_LEN as i16 / 8) {
        a.stx(Size::Dw, FP, KEY + 8 * i, R0);
    }
    a.ldx(Size::W, R0, R6, SKB_IFINDEX);
    a.stx(Size::W, FP, KEY, R0);
    // EtherType.
    load_bytes(&mut a, Some(12), SCRATCH4, 2, miss);
    a.ldx(Size::H, R0, FP, SCRATCH4);
    a.jmp_imm(JEQ, R0, i32::from(u16::from_ne_bytes([0x08, 0x00])), v4);
    a.jmp_imm(JEQ, R0, i32::from(u16::from_ne_bytes([0x86, 0xdd])), v6);
    a.ja(miss);

    // IPv4: version 4, no options, not a fragment; R7 = transport offset.
    // Options stay with palisade, which refuses source routes (a sender
    // choosing the route past the receiver) and malformed option lists:
    // no established flow needs options.
    a.bind(v4);
    load_bytes(&mut a, Some(14), SCRATCH4, 20, miss);
    a.ldx(Size::B, R0, FP, SCRATCH4);
    a.mov(R7, R0);
    a.alu_imm(AND, R7, 0x0f);
    a.alu_imm(LSH, R7, 2);
    a.jmp_imm(JNE, R7, 20, miss);
    a.alu_imm(RSH, R0, 4);
    a.jmp_imm(JNE, R0, 4, miss);
    a.ldx(Size::H, R0, FP, SCRATCH4 + 6);
    // More-fragments flag or an offset: the wire's 0x3fff.
    a.jmp_imm(JSET, R0, i32::from(u16::from_ne_bytes([0x3f, 0xff])), miss);
    a.ldx(Size::B, R8, FP, SCRATCH4 + 9);
    a.ldx(Size::H, R0, FP, SCRATCH4 + 2);
    a.be16(R0);
    // A total length shorter than the header: malformed, palisade's.
    a.jmp_imm(JLT, R0, 20, miss);
    a.stx(Size::Dw, FP, IP_LEN, R0);
    a.ldx(Size::W, R0, FP, SCRATCH4 + 12);
    a.stx(Size::W, FP, KEY_SRC, R0);
    a.ldx(Size::W, R0, FP, SCRATCH4 + 16);
    a.stx(Size::W, FP, KEY_DST, R0);
    a.st(Size::B, FP, KEY_FAMILY, 4);
    a.alu_imm(ADD, R7, 14);
    a.ja(l4);

    // IPv6: version 6; the next header must be the transport.
    a.bind(v6);
    load_bytes(&mut a, Some(14), SCRATCH6, 40, miss);
    a.ldx(Size::B, R0, FP, SCRATCH6);
    a.alu_imm(RSH, R0, 4);
    a.jmp_imm(JNE, R0, 6, miss);
    a.ldx(Size::B, R8, FP, SCRATCH6 + 6);
    a.ldx(Size::H, R0, FP, SCRATCH6 + 4);
    a.be16(R0);
    a.alu_imm(ADD, R0, 40);
    a.stx(Size::Dw, FP, IP_LEN, R0);
    for i in 0..2 {
        a.ldx(Size::Dw, R0, FP, SCRATCH6 + 8 + 8 * i);
        a.stx(Size::Dw, FP, KEY_SRC + 8 * i, R0);
        a.ldx(Size::Dw, R0, FP, SCRATCH6 + 24 + 8 * i);
        a.stx(Size::Dw, FP, KEY_DST + 8 * i, R0);
    }
    a.st(Size::B, FP, KEY_FAMILY, 6);
    a.mov_imm(R7, 14 + 40);

    // Transport: R8 = protocol, then R8 = IP and transport header length.
    a.bind(l4);
    a.stx(Size::B, FP, KEY_PROTO, R8);
    a.jmp_imm(JEQ, R8, 6, tcp);
    a.jmp_imm(JEQ, R8, 17, udp);
    a.ja(miss);

    a.bind(tcp);
    a.mov(R2, R7);
    a.alu_imm(ADD, R2, 12);
    load_bytes(&mut a, None, SCRATCH_TCP, 2, miss);
    // SYN, FIN and RST are palisade's to see.
    a.ldx(Size::B, R0, FP, SCRATCH_TCP + 1);
    a.jmp_imm(JSET, R0, 0x07, miss);
    a.ldx(Size::B, R8, FP, SCRATCH_TCP);
    a.alu_imm(RSH, R8, 4);
    a.alu_imm(LSH, R8, 2);
    a.ja(ports);

    a.bind(udp);
    a.mov_imm(R8, 8);

    a.bind(ports);
    // R8 = headers per segment, from the IP header on.
    a.alu(ADD, R8, R7);
    a.alu_imm(SUB, R8, 14);
    // An IP length that cuts the transport header short: palisade's (it
    // reads the packet only as far as its length says).
    a.ldx(Size::Dw, R0, FP, IP_LEN);
    a.jmp_reg(JLT, R0, R8, miss);
    a.mov(R2, R7);
    load_bytes(&mut a, None, KEY_PORTS, 4, miss);
    a.ld_map(R1, map);
    a.mov(R2, FP);
    a.alu_imm(ADD, R2, i32::from(KEY));
    a.call(MAP_LOOKUP_ELEM);
    a.jmp_imm(JEQ, R0, 0, miss);

    match kind {
        Kind::Socket => {
            // palisade does not see what the kernel forwards.
            a.mov_imm(R0, 0);
            a.exit();
        }
        Kind::Ingress => {
            a.mov(R9, R0);
            // Packets: a segment-offload frame counts as its segments.
            let counted = a.label();
            a.ldx(Size::W, R1, R6, SKB_GSO_SEGS);
            a.jmp_imm(JNE, R1, 0, counted);
            a.mov_imm(R1, 1);
            a.bind(counted);
            a.mov(R7, R1);
            a.atomic_add(R9, 8, R1);
            a.stx(Size::Dw, FP, COUNTED, R1);
            // Bytes from the IP header on, as palisade counts them: the IP
            // length for one packet (the frame may carry Ethernet padding);
            // for a segment-offload frame, whose IP length field may be
            // unset, (len - 14) + (segments - 1) * headers, each further
            // segment repeating the headers.
            let gso = a.label();
            let add = a.label();
            a.ldx(Size::W, R1, R6, SKB_LEN);
            a.alu_imm(SUB, R1, 14);
            a.jmp_imm(JGT, R7, 1, gso);
            a.ldx(Size::Dw, R2, FP, IP_LEN);
            a.jmp_reg(JGT, R2, R1, add);
            a.mov(R1, R2);
            a.ja(add);
            a.bind(gso);
            a.alu_imm(SUB, R7, 1);
            a.alu(MUL, R7, R8);
            a.alu(ADD, R1, R7);
            a.bind(add);
            a.atomic_add(R9, 16, R1);
            a.stx(Size::Dw, FP, COUNTED + 8, R1);
            a.call(KTIME_GET_NS);
            a.stx(Size::Dw, R9, 24, R0);
            // The fast path's totals.
            let counted = a.label();
            a.st(Size::W, FP, TOTALS_KEY, 0);
            a.ld_map(R1, totals);
            a.mov(R2, FP);
            a.alu_imm(ADD, R2, i32::from(TOTALS_KEY));
            a.call(MAP_LOOKUP_ELEM);
            a.jmp_imm(JEQ, R0, 0, counted);
            a.ldx(Size::Dw, R1, FP, COUNTED);
            a.atomic_add(R0, 0, R1);
            a.ldx(Size::Dw, R1, FP, COUNTED + 8);
            a.atomic_add(R0, 8, R1);
            a.bind(counted);
            a.ldx(Size::W, R1, R9, 0);
            a.mov_imm(R2, 0);
            a.call(REDIRECT);
            a.exit();
        }
    }

    a.bind(miss);
    a.mov_imm(
        R0,
        match kind {
            Kind::Socket => SOCKET_KEEP,
            Kind::Ingress => TCX_NEXT,
        },
    );
    a.exit();
    a.finish()
}

/// `bpf_skb_load_bytes(skb, offset, fp + to, len)`, to `miss` on failure.
/// With `offset` None, R2 already holds it.
fn load_bytes(a: &mut Asm, offset: Option<i32>, to: i16, len: i32, miss: Label) {
    a.mov(R1, R6);
    if let Some(o) = offset {
        a.mov_imm(R2, o);
    }
    a.mov(R3, FP);
    a.alu_imm(ADD, R3, i32::from(to));
    a.mov_imm(R4, len);
    a.call(SKB_LOAD_BYTES);
    a.jmp_imm(JNE, R0, 0, miss);
}

/// The map key of a frame of `key`'s flow arriving on port `ifindex`.
pub fn map_key(ifindex: u32, key: &FlowKey) -> [u8; KEY_LEN] {
    let mut k = [0u8; KEY_LEN];
    k[0..4].copy_from_slice(&ifindex.to_ne_bytes());
    k[4] = key.proto;
    match (key.src, key.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            k[5] = 4;
            k[8..12].copy_from_slice(&s.octets());
            k[24..28].copy_from_slice(&d.octets());
        }
        (s, d) => {
            k[5] = 6;
            k[8..24].copy_from_slice(&v6(s).octets());
            k[24..40].copy_from_slice(&v6(d).octets());
        }
    }
    k[40..42].copy_from_slice(&key.src_port.to_be_bytes());
    k[42..44].copy_from_slice(&key.dst_port.to_be_bytes());
    k
}

fn v6(a: IpAddr) -> std::net::Ipv6Addr {
    match a {
        IpAddr::V4(v) => v.to_ipv6_mapped(),
        IpAddr::V6(v) => v,
    }
}

/// What the kernel forwarded of one direction of an offloaded flow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Forwarded {
    pub packets: u64,
    pub bytes: u64,
    /// The last frame's time, on the monotonic clock (0: none yet).
    pub last: Duration,
}

fn parse_value(v: &[u8; VALUE_LEN]) -> Forwarded {
    let u = |i: usize| u64::from_ne_bytes(v[i..i + 8].try_into().unwrap_or([0; 8]));
    Forwarded {
        packets: u(8),
        bytes: u(16),
        last: Duration::from_nanos(u(24)),
    }
}

/// The flows' map and the two programs.
pub struct FastPath {
    map: bpf::Map,
    /// Frames and bytes the kernel forwarded, in all.
    totals: bpf::Map,
    ingress: OwnedFd,
    socket: OwnedFd,
    links: Vec<OwnedFd>,
}

impl FastPath {
    /// Creates the map (room for `max_entries` directions) and loads the
    /// programs; nothing is attached yet.
    pub fn load(max_entries: u32) -> io::Result<FastPath> {
        // The programs are encoded for little-endian hosts, and the socket
        // option number is asm-generic's.
        if !cfg!(all(
            target_endian = "little",
            any(
                target_arch = "x86_64",
                target_arch = "x86",
                target_arch = "aarch64",
                target_arch = "arm",
                target_arch = "riscv64"
            )
        )) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the fast path is built for x86, arm and riscv hosts",
            ));
        }
        let map = bpf::Map::create_hash(
            "palisade_flows",
            KEY_LEN,
            VALUE_LEN,
            max_entries.max(2),
            bpf::F_NO_PREALLOC,
        )?;
        let totals = bpf::Map::create_array("palisade_total", 16, 1)?;
        let ingress = bpf::prog_load(
            bpf::PROG_TYPE_SCHED_CLS,
            &program(Kind::Ingress, map.fd(), totals.fd()),
            "palisade_in",
        )?;
        let socket = bpf::prog_load(
            bpf::PROG_TYPE_SOCKET_FILTER,
            &program(Kind::Socket, map.fd(), totals.fd()),
            "palisade_sock",
        )?;
        Ok(FastPath {
            map,
            totals,
            ingress,
            socket,
            links: Vec::new(),
        })
    }

    /// Makes a port's packet socket skip the frames the kernel forwards.
    /// Attach to both sockets before [`FastPath::attach_port`].
    pub fn attach_socket(&self, sock: BorrowedFd<'_>) -> io::Result<()> {
        bpf::attach_socket_filter(sock, self.socket.as_fd())
    }

    /// Puts the ingress program on port `ifindex`, for as long as this
    /// value lives.
    pub fn attach_port(&mut self, ifindex: u32) -> io::Result<()> {
        let link = bpf::link_create(self.ingress.as_fd(), ifindex, bpf::TCX_INGRESS)?;
        self.links.push(link);
        Ok(())
    }

    /// Offloads one direction: frames of `key` arriving on `ifindex` leave
    /// by `out`.
    pub fn insert(&self, ifindex: u32, key: &FlowKey, out: u32) -> io::Result<()> {
        let mut v = [0u8; VALUE_LEN];
        v[0..4].copy_from_slice(&out.to_ne_bytes());
        self.map.update(&map_key(ifindex, key), &v)
    }

    /// Frames (wire packets) and bytes the kernel forwarded since load.
    pub fn totals(&self) -> io::Result<(u64, u64)> {
        let mut v = [0u8; 16];
        self.totals.lookup(&0u32.to_ne_bytes(), &mut v)?;
        let u = |i: usize| u64::from_ne_bytes(v[i..i + 8].try_into().unwrap_or([0; 8]));
        Ok((u(0), u(8)))
    }

    /// What the kernel forwarded so far of one direction.
    pub fn read(&self, ifindex: u32, key: &FlowKey) -> io::Result<Option<Forwarded>> {
        let mut v = [0u8; VALUE_LEN];
        Ok(self
            .map
            .lookup(&map_key(ifindex, key), &mut v)?
            .then(|| parse_value(&v)))
    }

    /// Withdraws one direction; returns what the kernel forwarded of it
    /// (read and removed in one step, so no frame goes uncounted).
    pub fn remove(&self, ifindex: u32, key: &FlowKey) -> io::Result<Option<Forwarded>> {
        let k = map_key(ifindex, key);
        let mut v = [0u8; VALUE_LEN];
        match self.map.take(&k, &mut v) {
            Ok(true) => Ok(Some(parse_value(&v))),
            Ok(false) => Ok(None),
            // A kernel without lookup-and-delete for hash maps (before
            // 5.14): read, then delete.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                let got = self.read(ifindex, key)?;
                self.map.delete(&k)?;
                Ok(got)
            }
            Err(e) => Err(e),
        }
    }

    /// Runs the ingress program once on a frame (for tests) and returns its
    /// verdict: [`TC_ACT_REDIRECT`] when it sends the frame out of the port
    /// the map names, [`VERDICT_NEXT`] when it leaves the frame to palisade.
    pub fn test_ingress(&self, frame: &[u8]) -> io::Result<u32> {
        bpf::prog_test_run(self.ingress.as_fd(), frame)
    }
}

/// The ingress program's verdict for a redirected frame.
pub const TC_ACT_REDIRECT: u32 = 7;
/// The ingress program's verdict for a frame left to palisade.
pub const VERDICT_NEXT: u32 = TCX_NEXT as u32;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::build;
    use crate::packet::tcp_flags::{ACK, FIN, SYN};

    /// Loopback's index: a test run receives frames "on" it.
    const LO: u32 = 1;

    fn key(src: &str, dst: &str, proto: u8, sport: u16, dport: u16) -> FlowKey {
        FlowKey {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            proto,
            src_port: sport,
            dst_port: dport,
        }
    }

    /// A frame of `k`'s flow: TCP with `flags`, or UDP, with `payload` bytes.
    fn frame(k: &FlowKey, flags: u8, payload: usize) -> Vec<u8> {
        let l4 = if k.proto == 6 {
            let mut t = build::tcp(k.src_port, k.dst_port, flags);
            t.extend(std::iter::repeat_n(0u8, payload));
            t
        } else {
            build::udp(k.src_port, k.dst_port, &vec![0u8; payload])
        };
        match (k.src, k.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => build::ipv4(s, d, k.proto, &l4, (1, false, 0)),
            (s, d) => build::ipv6(v6(s), v6(d), k.proto, &l4),
        }
    }

    fn fast_path() -> Option<FastPath> {
        match FastPath::load(64) {
            Ok(f) => Some(f),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::PermissionDenied | io::ErrorKind::Unsupported
                ) =>
            {
                crate::say!("skipping: this process cannot load BPF programs ({e})");
                None
            }
            Err(e) => panic!("the kernel refused the fast path: {e}"),
        }
    }

    #[test]
    fn offloaded_flows_are_redirected_and_counted_and_others_are_not() {
        let Some(fp) = fast_path() else { return };
        let k4 = key("192.0.2.10", "198.51.100.20", 6, 40000, 443);
        let data = frame(&k4, ACK, 100);
        // Not offloaded: palisade's.
        assert_eq!(fp.test_ingress(&data).unwrap(), VERDICT_NEXT);
        fp.insert(LO, &k4, 7).unwrap();
        assert_eq!(fp.test_ingress(&data).unwrap(), TC_ACT_REDIRECT);
        assert_eq!(fp.test_ingress(&data).unwrap(), TC_ACT_REDIRECT);
        let f = fp.read(LO, &k4).unwrap().unwrap();
        assert_eq!(f.packets, 2);
        assert_eq!(f.bytes, 2 * (data.len() as u64 - 14));
        assert!(f.last > Duration::ZERO);
        assert_eq!(fp.totals().unwrap(), (2, 2 * (data.len() as u64 - 14)));
        // SYN, FIN and RST always reach palisade, so it tracks TCP state.
        for flags in [SYN, FIN | ACK, crate::packet::tcp_flags::RST] {
            let d = frame(&k4, flags, 0);
            assert_eq!(
                fp.test_ingress(&d).unwrap(),
                VERDICT_NEXT,
                "flags {flags:#x}"
            );
        }
        // The reply direction is its own entry.
        let reply = key("198.51.100.20", "192.0.2.10", 6, 443, 40000);
        assert_eq!(
            fp.test_ingress(&frame(&reply, ACK, 10)).unwrap(),
            VERDICT_NEXT
        );
        // Another port, address or protocol: not this flow.
        let other = key("192.0.2.10", "198.51.100.20", 6, 40001, 443);
        assert_eq!(
            fp.test_ingress(&frame(&other, ACK, 10)).unwrap(),
            VERDICT_NEXT
        );
        let udp = key("192.0.2.10", "198.51.100.20", 17, 40000, 443);
        assert_eq!(fp.test_ingress(&frame(&udp, 0, 10)).unwrap(), VERDICT_NEXT);
        // Withdrawn: palisade's again, with the counts handed back.
        let got = fp.remove(LO, &k4).unwrap().unwrap();
        assert_eq!(got.packets, 2);
        assert_eq!(fp.test_ingress(&data).unwrap(), VERDICT_NEXT);
        assert_eq!(fp.read(LO, &k4).unwrap(), None);
    }

    #[test]
    fn bytes_count_the_ip_packet_not_the_ethernet_padding() {
        let Some(fp) = fast_path() else { return };
        let k = key("192.0.2.10", "198.51.100.20", 6, 40002, 443);
        fp.insert(LO, &k, 7).unwrap();
        // A bare ACK is 54 bytes on the wire before padding to 60.
        let mut ack = frame(&k, ACK, 0);
        assert_eq!(ack.len(), 54);
        ack.resize(60, 0);
        assert_eq!(fp.test_ingress(&ack).unwrap(), TC_ACT_REDIRECT);
        let f = fp.remove(LO, &k).unwrap().unwrap();
        assert_eq!((f.packets, f.bytes), (1, 40));
        let k6 = key("2001:db8::10", "2001:db8:1::20", 17, 1, 2);
        fp.insert(LO, &k6, 7).unwrap();
        let mut d = frame(&k6, 0, 0);
        d.resize(d.len() + 6, 0);
        assert_eq!(fp.test_ingress(&d).unwrap(), TC_ACT_REDIRECT);
        let f = fp.remove(LO, &k6).unwrap().unwrap();
        assert_eq!(f.bytes, 40 + 8);
    }

    #[test]
    fn ipv6_and_udp_flows_are_offloaded_but_not_fragments() {
        let Some(fp) = fast_path() else { return };
        let k6 = key("2001:db8::10", "2001:db8:1::20", 17, 5353, 53);
        fp.insert(LO, &k6, 9).unwrap();
        let d = frame(&k6, 0, 30);
        assert_eq!(fp.test_ingress(&d).unwrap(), TC_ACT_REDIRECT);
        let f = fp.read(LO, &k6).unwrap().unwrap();
        assert_eq!((f.packets, f.bytes), (1, d.len() as u64 - 14));

        let k4 = key("192.0.2.10", "198.51.100.20", 17, 1000, 2000);
        fp.insert(LO, &k4, 9).unwrap();
        let whole = frame(&k4, 0, 30);
        assert_eq!(fp.test_ingress(&whole).unwrap(), TC_ACT_REDIRECT);
        // A first fragment (more-fragments set) stays with palisade.
        let mut first = whole.clone();
        first[14 + 6] |= 0x20;
        assert_eq!(fp.test_ingress(&first).unwrap(), VERDICT_NEXT);
        // So does a frame too short to hold the ports.
        assert_eq!(
            fp.test_ingress(&whole[..14 + 20 + 2]).unwrap(),
            VERDICT_NEXT
        );
        // A frame of the flow with IPv4 options (a loose source route
        // naming another host) stays with palisade, which refuses it.
        let routed = odd_frame(&k4, 0, 2, 0, false);
        let mut lsrr = routed.clone();
        lsrr[14 + 20..14 + 28].copy_from_slice(&[1, 0x83, 7, 4, 198, 51, 100, 7]);
        assert_eq!(fp.test_ingress(&lsrr).unwrap(), VERDICT_NEXT);
        assert!(matches!(
            crate::packet::parse(&lsrr).map(|f| f.payload),
            Ok(crate::packet::Payload::Ip(ip)) if ip.source_routed
        ));
        // So does one whose total length is shorter than its header, or
        // than its header and the UDP header.
        for total in [16u16, 20 + 6] {
            let mut short = whole.clone();
            short[14 + 2..14 + 4].copy_from_slice(&total.to_be_bytes());
            assert_eq!(fp.test_ingress(&short).unwrap(), VERDICT_NEXT, "{total}");
        }
        // A TCP header cut short by the IPv4 length, and by the IPv6 one.
        let t4 = key("192.0.2.10", "198.51.100.20", 6, 1000, 2000);
        fp.insert(LO, &t4, 9).unwrap();
        let mut cut = frame(&t4, ACK, 10);
        assert_eq!(fp.test_ingress(&cut).unwrap(), TC_ACT_REDIRECT);
        cut[14 + 2..14 + 4].copy_from_slice(&(20u16 + 12).to_be_bytes());
        assert_eq!(fp.test_ingress(&cut).unwrap(), VERDICT_NEXT);
        let mut cut6 = frame(&k6, 0, 30);
        cut6[14 + 4..14 + 6].copy_from_slice(&4u16.to_be_bytes());
        assert_eq!(fp.test_ingress(&cut6).unwrap(), VERDICT_NEXT);
    }

    /// A frame from its parts, for the property test: IPv4 with `options`
    /// words of options and fragment bits, or IPv6 with or without a
    /// hop-by-hop header; TCP, UDP or ICMP.
    fn odd_frame(k: &FlowKey, flags: u8, options: usize, frag: u16, hop_by_hop: bool) -> Vec<u8> {
        let l4 = match k.proto {
            6 => {
                let mut t = build::tcp(k.src_port, k.dst_port, flags);
                t.extend_from_slice(b"data");
                t
            }
            17 => build::udp(k.src_port, k.dst_port, b"data"),
            _ => vec![8, 0, 0, 0, 0, 1, 0, 1],
        };
        match (k.src, k.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut ip = vec![0x45 + options as u8, 0];
                ip.extend_from_slice(&((20 + 4 * options + l4.len()) as u16).to_be_bytes());
                ip.extend_from_slice(&[0, 7]);
                ip.extend_from_slice(&frag.to_be_bytes());
                ip.extend_from_slice(&[64, k.proto, 0, 0]);
                ip.extend_from_slice(&s.octets());
                ip.extend_from_slice(&d.octets());
                ip.extend(std::iter::repeat_n(1u8, 4 * options));
                ip.extend_from_slice(&l4);
                let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00];
                f.extend_from_slice(&ip);
                f
            }
            (s, d) => {
                if hop_by_hop {
                    let mut ext = vec![k.proto, 0, 1, 4, 0, 0, 0, 0];
                    ext.extend_from_slice(&l4);
                    build::ipv6(v6(s), v6(d), 0, &ext)
                } else {
                    build::ipv6(v6(s), v6(d), k.proto, &l4)
                }
            }
        }
    }

    proptest::proptest! {
        // No regression file: the crate's top level holds only what its
        // layout names; a failing case prints itself.
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 2048,
            failure_persistence: None,
            ..proptest::prelude::ProptestConfig::default()
        })]
        /// The kernel program (the fast path) and palisade's frame parser
        /// (the reference) agree on every frame: the program forwards a
        /// frame of an offloaded flow exactly when the parser reads that
        /// flow's key from it (ports, and TCP's flags, present), and the frame
        /// needs no decision (TCP without SYN/FIN/RST, or UDP; not a
        /// fragment; no IPv6 extension header).
        #[test]
        fn the_kernel_program_agrees_with_the_frame_parser(
            ipv6 in proptest::bool::ANY,
            hosts in (1u8..255, 1u8..255),
            proto in proptest::sample::select(vec![6u8, 17, 1]),
            ports in (proptest::num::u16::ANY, proptest::num::u16::ANY),
            flags in proptest::num::u8::ANY,
            options in 0usize..=10,
            frag in proptest::sample::select(vec![0u16, 0x4000, 0x2000, 0x0010, 0x2010]),
            hop_by_hop in proptest::bool::ANY,
            cut in proptest::option::of(0usize..100),
        ) {
            let Some(fp) = FAST.as_ref() else { return Ok(()) };
            let (src, dst) = if ipv6 {
                (format!("2001:db8::{}", hosts.0), format!("2001:db8:1::{}", hosts.1))
            } else {
                (format!("192.0.2.{}", hosts.0), format!("198.51.100.{}", hosts.1))
            };
            let k = key(&src, &dst, proto, ports.0, ports.1);
            let mut data = odd_frame(&k, flags, options, frag, hop_by_hop);
            if let Some(c) = cut {
                // Cut inside the transport header only: the fast path, like
                // the kernel's own forwarding, does not check the IP length,
                // and the kernel runs a test only on a whole IP header.
                let headers = data.len() - 4;
                let ip = if ipv6 { 14 + 40 } else { 14 + 20 + 4 * options };
                data.truncate(c.clamp(ip, headers));
            }
            // The program reads the ports (and TCP's flags, 14 bytes in);
            // the parser's `transport_complete` asks for the whole header,
            // which a tracked flow's frames need not have.
            let l4_start = if ipv6 { 14 + 40 } else { 14 + 20 + 4 * options };
            let readable = data.len().saturating_sub(l4_start) >= if proto == 6 { 14 } else { 4 };
            let expect = match crate::packet::parse(&data) {
                Ok(crate::packet::Frame { payload: crate::packet::Payload::Ip(ip), .. }) => {
                    ip.key == k
                        && readable
                        && ip.fragment == crate::packet::Fragment::Whole
                        && (proto == 17 || (proto == 6 && ip.tcp_flags & 0x07 == 0))
                        && !(ipv6 && hop_by_hop)
                        && (ipv6 || options == 0)
                }
                _ => false,
            };
            fp.insert(LO, &k, 3).unwrap();
            let got = fp.test_ingress(&data);
            fp.remove(LO, &k).unwrap();
            let want = if expect { TC_ACT_REDIRECT } else { VERDICT_NEXT };
            proptest::prop_assert_eq!(got.unwrap(), want, "frame {:02x?}", data);
        }
    }

    /// One fast path for the property test's cases.
    static FAST: std::sync::LazyLock<Option<FastPath>> = std::sync::LazyLock::new(fast_path);

    #[test]
    fn map_keys_follow_the_wire_layout() {
        let k = key("192.0.2.1", "192.0.2.2", 6, 0x1234, 0x0050);
        let m = map_key(5, &k);
        assert_eq!(&m[0..4], &5u32.to_ne_bytes());
        assert_eq!((m[4], m[5]), (6, 4));
        assert_eq!(&m[8..12], &[192, 0, 2, 1]);
        assert_eq!(&m[24..28], &[192, 0, 2, 2]);
        assert_eq!(&m[40..44], &[0x12, 0x34, 0x00, 0x50]);
        assert!(m[12..24].iter().chain(&m[28..40]).all(|b| *b == 0));
    }
}
