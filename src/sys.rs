//! The operating-system calls no safe crate offers, in one place: every
//! `unsafe` block in palisade lives here, each with its `SAFETY:` reasoning.
//!
//! - [`default_sigpipe`]: one-shot commands die quietly on a closed pipe.
//! - [`recv_frames`] / [`send_frames`]: many frames per system call
//!   (`recvmmsg`/`sendmmsg`) for the filter's ports, each received frame
//!   with its VLAN tag. The kernel strips a received 802.1Q tag into the
//!   packet's metadata (VLAN receive offload) and reports it only as
//!   `PACKET_AUXDATA` ancillary data, which pnet does not read; a bridge
//!   that ignored it would forward tagged frames untagged.
//!   [`bind_packet`], [`set_promiscuous`] and [`set_packet_option`] set
//!   such a socket up.
//! - [`lean_allocator`]: two of mimalloc's process-wide options, set
//!   through its C interface.
//! - [`bpf`]: the `bpf(2)` calls behind the filter's kernel fast path
//!   (maps, program loading, attaching to a port and to a packet socket,
//!   test runs), which no kept crate offers without a C toolchain.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Restores the default SIGPIPE disposition.
pub fn default_sigpipe() {
    // SAFETY: called once at start-up, before any thread exists, with a
    // valid signal number and the SIG_DFL disposition; no handler code runs.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

extern "C" {
    /// mimalloc's option setter; `option` is its `mi_option_t` (v3, the
    /// version the `mimalloc` crate builds by default).
    fn mi_option_set(option: libc::c_int, value: libc::c_long);
}

/// `mi_option_arena_eager_commit` in mimalloc v3's `mi_option_e`.
const MI_OPTION_ARENA_EAGER_COMMIT: libc::c_int = 4;
/// `mi_option_purge_delay` in mimalloc v3's `mi_option_e`.
const MI_OPTION_PURGE_DELAY: libc::c_int = 15;

/// mimalloc commits arena memory only as it is used and returns freed pages
/// at once (its defaults commit a whole arena up front, backed by huge
/// pages). Takes effect only before the first allocation.
///
/// Returning pages at once costs TLB shootdowns (each an exit on both
/// vCPUs of a VM) when a page empties and fills again quickly. Measured on
/// an Intel Xeon VM (2026-12-05, `benches/proxy.sh` with palisade alone,
/// alternated): a purge delay of 10 ms or 100 ms instead of 0 gave 4-8%
/// more kept-alive requests a second at 50 connections, but a peak of
/// 16.9-17.9 MiB at 500 connections against 15.7-15.8, past the proxy's
/// 16 MiB target. Nearly all of that churn was one 3.6 KiB box per
/// request, which the proxy no longer makes (see `proxy::handle_request`):
/// over 5 s of the keep-alive load, 30 shootdowns instead of 4,578.
pub fn lean_allocator() {
    // SAFETY: plain setters of mimalloc's process-wide options, which it
    // reads without locks; called from `.init_array` while the process has
    // one thread, with option numbers of the linked version's enum.
    unsafe {
        mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0);
        mi_option_set(MI_OPTION_PURGE_DELAY, 0);
    }
}

/// `struct tpacket_auxdata` from `linux/if_packet.h`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct TpacketAuxdata {
    tp_status: u32,
    tp_len: u32,
    tp_snaplen: u32,
    tp_mac: u16,
    tp_net: u16,
    tp_vlan_tci: u16,
    tp_vlan_tpid: u16,
}

const PACKET_AUXDATA: libc::c_int = 8;
const TP_STATUS_VLAN_VALID: u32 = 1 << 4;
const TP_STATUS_VLAN_TPID_VALID: u32 = 1 << 6;

/// Asks the kernel to report VLAN tags (and more) with every frame.
pub fn enable_auxdata(fd: BorrowedFd<'_>) -> io::Result<()> {
    set_packet_option(fd, PACKET_AUXDATA, 1)
}

/// `PACKET_VNET_HDR`: frames carry a `virtio_net_hdr` in front, which lets
/// segmentation and checksum offloads cross the socket.
pub const PACKET_VNET_HDR: libc::c_int = 15;

/// Sets an integer `SOL_PACKET` option.
pub fn set_packet_option(fd: BorrowedFd<'_>, option: libc::c_int, value: i32) -> io::Result<()> {
    set_int_option(fd, libc::SOL_PACKET, option, value)
}

/// Sets an integer socket option at `level`.
fn set_int_option(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    option: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `fd` is a live socket for the duration of the call; the option
    // value points to a c_int that outlives the call, with its exact size.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Binds a packet socket to interface `ifindex` for EtherType `protocol`
/// (host order; `ETH_P_ALL` for every frame).
pub fn bind_packet(fd: BorrowedFd<'_>, ifindex: u32, protocol: u16) -> io::Result<()> {
    // SAFETY: an all-zero sockaddr_ll is valid; the fields set are plain data.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = protocol.to_be();
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: `sll` is a valid sockaddr_ll and the length passed is its size.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Puts interface `ifindex` in promiscuous mode for as long as the socket
/// lives: a bump in the wire forwards frames addressed to anyone.
pub fn set_promiscuous(fd: BorrowedFd<'_>, ifindex: u32) -> io::Result<()> {
    // SAFETY: an all-zero packet_mreq is valid; the fields set are plain data.
    let mut mreq: libc::packet_mreq = unsafe { std::mem::zeroed() };
    mreq.mr_ifindex = ifindex as i32;
    mreq.mr_type = libc::PACKET_MR_PROMISC as u16;
    // SAFETY: `fd` is a live socket; the option value is a packet_mreq of
    // exactly the size passed, alive for the call.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_ADD_MEMBERSHIP,
            (&mreq as *const libc::packet_mreq).cast(),
            std::mem::size_of::<libc::packet_mreq>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Most frames one [`recv_frames`] or [`send_frames`] call moves.
pub const MAX_BATCH: usize = 64;

/// What the kernel said about one frame [`recv_frames`] read.
#[derive(Debug, Clone, Copy, Default)]
pub struct Received {
    /// The frame's full length; more than the buffer when it was cut.
    pub len: usize,
    /// An offloaded VLAN tag: (TPID, TCI).
    pub vlan: Option<(u16, u16)>,
}

/// Reads up to `bufs.len()` (at most [`MAX_BATCH`]) frames that are already
/// queued, without waiting, each into its own buffer; fills `out` and
/// returns how many were read (0 when none was queued).
pub fn recv_frames(
    fd: BorrowedFd<'_>,
    bufs: &mut [Box<[u8]>],
    out: &mut [Received],
) -> io::Result<usize> {
    let n = bufs.len().min(out.len()).min(MAX_BATCH);
    if n == 0 {
        return Ok(0);
    }
    const CONTROL: usize = 8;
    let mut control = [[0u64; CONTROL]; MAX_BATCH];
    // SAFETY: all-zero iovec and mmsghdr values are valid empty ones.
    let mut iov: [libc::iovec; MAX_BATCH] = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut msgs: [libc::mmsghdr; MAX_BATCH] = unsafe { std::mem::zeroed() };
    for i in 0..n {
        iov[i].iov_base = bufs[i].as_mut_ptr().cast();
        iov[i].iov_len = bufs[i].len();
        msgs[i].msg_hdr.msg_iov = &mut iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_control = control[i].as_mut_ptr().cast();
        msgs[i].msg_hdr.msg_controllen = std::mem::size_of_val(&control[i]) as _;
    }
    // SAFETY: each of the first `n` headers points at its own iovec (which
    // covers exactly its buffer, exclusively borrowed) and its own control
    // array, all alive for the call; the kernel writes within those lengths.
    let r = unsafe {
        libc::recvmmsg(
            fd.as_raw_fd(),
            msgs.as_mut_ptr(),
            n as libc::c_uint,
            libc::MSG_DONTWAIT | libc::MSG_TRUNC,
            std::ptr::null_mut(),
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
            _ => Err(e),
        };
    }
    let got = r as usize;
    for i in 0..got {
        let msg = &msgs[i].msg_hdr;
        let mut vlan = None;
        // SAFETY: `msg` was filled by a successful recvmmsg; CMSG_FIRSTHDR
        // and CMSG_NXTHDR only return headers inside its control buffer, and
        // the auxdata payload is read unaligned by value.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_PACKET
                    && (*c).cmsg_type == PACKET_AUXDATA
                    && (*c).cmsg_len as usize
                        >= libc::CMSG_LEN(std::mem::size_of::<TpacketAuxdata>() as u32) as usize
                {
                    let a = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const TpacketAuxdata);
                    vlan = vlan_of(&a);
                }
                c = libc::CMSG_NXTHDR(msg, c);
            }
        }
        out[i] = Received {
            len: msgs[i].msg_len as usize,
            vlan,
        };
    }
    Ok(got)
}

fn vlan_of(a: &TpacketAuxdata) -> Option<(u16, u16)> {
    if a.tp_status & TP_STATUS_VLAN_VALID == 0 {
        return None;
    }
    let tpid = if a.tp_status & TP_STATUS_VLAN_TPID_VALID != 0 && a.tp_vlan_tpid != 0 {
        a.tp_vlan_tpid
    } else {
        0x8100
    };
    Some((tpid, a.tp_vlan_tci))
}

/// Sends frames, each given as two parts sent as one (a header and the
/// frame), with one system call for as many as the kernel takes; returns
/// how many it took. A frame the kernel refuses ends the call early: the
/// caller counts it lost and sends the rest. `WouldBlock` when the socket's
/// send buffer is full before the first frame.
pub fn send_frames(fd: BorrowedFd<'_>, frames: &[[&[u8]; 2]]) -> io::Result<usize> {
    let n = frames.len().min(MAX_BATCH);
    if n == 0 {
        return Ok(0);
    }
    // SAFETY: all-zero iovec and mmsghdr values are valid empty ones.
    let mut iov: [[libc::iovec; 2]; MAX_BATCH] = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut msgs: [libc::mmsghdr; MAX_BATCH] = unsafe { std::mem::zeroed() };
    for i in 0..n {
        for (j, part) in frames[i].iter().enumerate() {
            iov[i][j].iov_base = part.as_ptr() as *mut libc::c_void;
            iov[i][j].iov_len = part.len();
        }
        msgs[i].msg_hdr.msg_iov = iov[i].as_mut_ptr();
        msgs[i].msg_hdr.msg_iovlen = 2;
    }
    // SAFETY: each of the first `n` headers points at its own two iovecs,
    // which cover borrowed slices alive for the call; the kernel only reads
    // them (sendmmsg writes nothing but msg_len).
    let r = unsafe {
        libc::sendmmsg(
            fd.as_raw_fd(),
            msgs.as_mut_ptr(),
            n as libc::c_uint,
            libc::MSG_DONTWAIT,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// The `bpf(2)` system call: maps, programs and links for the filter's
/// kernel fast path. Every pointer the kernel reads or writes is built here
/// from a borrowed slice of the size the kernel expects, so callers stay in
/// safe code.
pub mod bpf {
    use std::io;
    use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

    const MAP_CREATE: u32 = 0;
    const MAP_LOOKUP_ELEM: u32 = 1;
    const MAP_UPDATE_ELEM: u32 = 2;
    const MAP_DELETE_ELEM: u32 = 3;
    const PROG_LOAD: u32 = 5;
    const MAP_LOOKUP_AND_DELETE_ELEM: u32 = 21;
    const PROG_TEST_RUN: u32 = 10;
    const LINK_CREATE: u32 = 28;

    /// `union bpf_attr`, as bytes: every command's fields sit at fixed
    /// offsets and the rest must be zero.
    struct Attr([u8; 128]);

    impl Attr {
        fn new() -> Attr {
            Attr([0; 128])
        }
        fn u32(&mut self, at: usize, v: u32) -> &mut Attr {
            self.0[at..at + 4].copy_from_slice(&v.to_ne_bytes());
            self
        }
        fn u64(&mut self, at: usize, v: u64) -> &mut Attr {
            self.0[at..at + 8].copy_from_slice(&v.to_ne_bytes());
            self
        }
        fn name(&mut self, at: usize, name: &str) -> &mut Attr {
            // At most 15 bytes and a NUL; the kernel accepts [A-Za-z0-9_.].
            for (i, b) in name.bytes().take(15).enumerate() {
                self.0[at + i] = b;
            }
            self
        }
        fn get_u32(&self, at: usize) -> u32 {
            u32::from_ne_bytes([self.0[at], self.0[at + 1], self.0[at + 2], self.0[at + 3]])
        }
    }

    /// Runs one command. The caller has put into `attr` only addresses of
    /// buffers that stay borrowed until this returns, with the lengths the
    /// command makes the kernel read or write.
    fn call(cmd: u32, attr: &mut Attr) -> io::Result<i64> {
        // SAFETY: `attr` is a live 128-byte buffer the kernel reads (and,
        // for test runs, writes) within its size; every address inside it
        // was built by this module's functions from a borrowed slice whose
        // length matches what the command makes the kernel access, and that
        // borrow outlives this call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd as libc::c_long,
                attr.0.as_mut_ptr(),
                attr.0.len() as libc::c_long,
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }

    fn fd(r: i64) -> OwnedFd {
        // SAFETY: a successful map, program or link command returns a new
        // file descriptor that nothing else owns.
        unsafe { OwnedFd::from_raw_fd(r as i32) }
    }

    /// A hash map with its key and value sizes, so that lookups can only
    /// hand the kernel buffers of exactly those sizes.
    pub struct Map {
        fd: OwnedFd,
        key_size: usize,
        value_size: usize,
    }

    /// `BPF_MAP_TYPE_HASH`.
    pub const MAP_TYPE_HASH: u32 = 1;
    /// `BPF_MAP_TYPE_ARRAY`: `max_entries` values under the keys 0, 1, ...
    pub const MAP_TYPE_ARRAY: u32 = 2;
    /// Entries are allocated when added, not all at creation.
    pub const F_NO_PREALLOC: u32 = 1;

    impl Map {
        /// Creates a hash map.
        pub fn create_hash(
            name: &str,
            key_size: usize,
            value_size: usize,
            max_entries: u32,
            flags: u32,
        ) -> io::Result<Map> {
            Map::create(
                MAP_TYPE_HASH,
                name,
                key_size,
                value_size,
                max_entries,
                flags,
            )
        }

        /// Creates an array (4-byte keys), its values zeroed.
        pub fn create_array(name: &str, value_size: usize, max_entries: u32) -> io::Result<Map> {
            Map::create(MAP_TYPE_ARRAY, name, 4, value_size, max_entries, 0)
        }

        fn create(
            map_type: u32,
            name: &str,
            key_size: usize,
            value_size: usize,
            max_entries: u32,
            flags: u32,
        ) -> io::Result<Map> {
            let mut a = Attr::new();
            a.u32(0, map_type)
                .u32(4, key_size as u32)
                .u32(8, value_size as u32)
                .u32(12, max_entries)
                .u32(16, flags)
                .name(28, name);
            let r = call(MAP_CREATE, &mut a)?;
            Ok(Map {
                fd: fd(r),
                key_size,
                value_size,
            })
        }

        pub fn fd(&self) -> BorrowedFd<'_> {
            use std::os::fd::AsFd;
            self.fd.as_fd()
        }

        fn check(&self, key: &[u8], value: Option<usize>) -> io::Result<()> {
            if key.len() != self.key_size || value.is_some_and(|v| v != self.value_size) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "map key or value of the wrong size",
                ));
            }
            Ok(())
        }

        /// Copies the value under `key` into `value`; false when absent.
        pub fn lookup(&self, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
            self.read_elem(MAP_LOOKUP_ELEM, key, value)
        }

        /// Adds or replaces the value under `key`.
        pub fn update(&self, key: &[u8], value: &[u8]) -> io::Result<()> {
            self.check(key, Some(value.len()))?;
            let mut a = Attr::new();
            a.u32(0, self.fd.as_raw_fd() as u32)
                .u64(8, key.as_ptr() as u64)
                .u64(16, value.as_ptr() as u64);
            call(MAP_UPDATE_ELEM, &mut a).map(|_| ())
        }

        /// Removes `key` and copies its last value into `value`, in one
        /// step (nothing the kernel adds in between is lost); false when it
        /// was absent.
        pub fn take(&self, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
            self.read_elem(MAP_LOOKUP_AND_DELETE_ELEM, key, value)
        }

        /// A map command that copies the value under `key` into `value`
        /// (lookup, lookup-and-delete); false when the key is absent.
        fn read_elem(&self, cmd: u32, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
            self.check(key, Some(value.len()))?;
            let mut a = Attr::new();
            a.u32(0, self.fd.as_raw_fd() as u32)
                .u64(8, key.as_ptr() as u64)
                .u64(16, value.as_mut_ptr() as u64);
            match call(cmd, &mut a) {
                Ok(_) => Ok(true),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
                Err(e) => Err(e),
            }
        }

        /// Removes `key`; false when it was absent.
        pub fn delete(&self, key: &[u8]) -> io::Result<bool> {
            self.check(key, None)?;
            let mut a = Attr::new();
            a.u32(0, self.fd.as_raw_fd() as u32)
                .u64(8, key.as_ptr() as u64);
            match call(MAP_DELETE_ELEM, &mut a) {
                Ok(_) => Ok(true),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
                Err(e) => Err(e),
            }
        }
    }

    /// `BPF_PROG_TYPE_SOCKET_FILTER`.
    pub const PROG_TYPE_SOCKET_FILTER: u32 = 1;
    /// `BPF_PROG_TYPE_SCHED_CLS`.
    pub const PROG_TYPE_SCHED_CLS: u32 = 3;
    /// `BPF_TCX_INGRESS`.
    pub const TCX_INGRESS: u32 = 46;

    /// Loads a program (instructions in the kernel's 8-byte encoding).
    /// On refusal the error carries the verifier's log.
    pub fn prog_load(prog_type: u32, insns: &[[u8; 8]], name: &str) -> io::Result<OwnedFd> {
        let license = b"GPL\0";
        let mut log = vec![0u8; 64 * 1024];
        let mut a = Attr::new();
        a.u32(0, prog_type)
            .u32(4, insns.len() as u32)
            .u64(8, insns.as_ptr() as u64)
            .u64(16, license.as_ptr() as u64)
            .name(48, name);
        match call(PROG_LOAD, &mut a) {
            Ok(r) => Ok(fd(r)),
            Err(first) => {
                // Load again with the log on, for the error message.
                a.u32(24, 1)
                    .u32(28, log.len() as u32)
                    .u64(32, log.as_mut_ptr() as u64);
                match call(PROG_LOAD, &mut a) {
                    Ok(r) => Ok(fd(r)),
                    Err(_) => {
                        let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
                        let text = String::from_utf8_lossy(&log[..end]);
                        let tail: Vec<&str> = text.lines().rev().take(12).collect();
                        let tail: Vec<&str> = tail.into_iter().rev().collect();
                        Err(io::Error::new(
                            first.kind(),
                            format!("{first}; verifier: {}", tail.join(" | ")),
                        ))
                    }
                }
            }
        }
    }

    /// Attaches a program to interface `ifindex` at `attach_type`; the
    /// program stays attached while the returned link lives (it is
    /// detached when the link is closed, also when the process dies).
    pub fn link_create(
        prog: BorrowedFd<'_>,
        ifindex: u32,
        attach_type: u32,
    ) -> io::Result<OwnedFd> {
        let mut a = Attr::new();
        a.u32(0, prog.as_raw_fd() as u32)
            .u32(4, ifindex)
            .u32(8, attach_type);
        call(LINK_CREATE, &mut a).map(fd)
    }

    /// Runs a program once on `data` (a frame from its Ethernet header) and
    /// returns its verdict.
    pub fn prog_test_run(prog: BorrowedFd<'_>, data: &[u8]) -> io::Result<u32> {
        let mut a = Attr::new();
        a.u32(0, prog.as_raw_fd() as u32)
            .u32(8, data.len() as u32)
            .u64(16, data.as_ptr() as u64)
            .u32(32, 1);
        call(PROG_TEST_RUN, &mut a)?;
        Ok(a.get_u32(4))
    }

    /// `SO_ATTACH_BPF`: the program filters what the socket receives,
    /// replacing any filter it had.
    pub fn attach_socket_filter(sock: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
        // asm-generic's value (x86, arm, riscv); the fast path refuses to
        // load on architectures where it differs.
        const SO_ATTACH_BPF: libc::c_int = 50;
        // The option's value is the program's descriptor.
        super::set_int_option(sock, libc::SOL_SOCKET, SO_ATTACH_BPF, prog.as_raw_fd())
    }
}

/// Raises this process's soft limit on open files to its hard limit (a
/// service manager's default soft limit, often 1024, is far below what a
/// proxy with thousands of connections needs) and returns the limit now in
/// force. `None` if the limit cannot be read.
pub fn raise_open_file_limit() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    if l.current != l.maximum {
        let raised = rustix::process::Rlimit {
            current: l.maximum,
            maximum: l.maximum,
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            l = raised;
        }
    }
    // `None` there is "unlimited".
    Some(l.current.unwrap_or(u64::MAX))
}
