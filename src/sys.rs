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
    let v: libc::c_int = value;
    // SAFETY: `fd` is a live socket for the duration of the call; the option
    // value points to a c_int that outlives the call, with its exact size.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            option,
            (&v as *const libc::c_int).cast(),
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
