//! The operating-system calls no safe crate offers, in one place: every
//! `unsafe` block in palisade lives here, each with its `SAFETY:` reasoning.
//!
//! - [`default_sigpipe`]: one-shot commands die quietly on a closed pipe.
//! - [`recv_frame`]: a frame from an `AF_PACKET` socket with its VLAN tag
//!   put back. The kernel strips a received 802.1Q tag into the packet's
//!   metadata (VLAN receive offload) and reports it only as `PACKET_AUXDATA`
//!   ancillary data, which pnet does not read; a bridge that ignored it
//!   would forward tagged frames untagged.

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
    let one: libc::c_int = 1;
    // SAFETY: `fd` is a live socket for the duration of the call; the option
    // value points to a c_int that outlives the call, with its exact size.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            PACKET_AUXDATA,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Receives one frame into `buf` (leaving room for a tag) and returns its
/// length with any offloaded VLAN tag re-inserted after the MAC addresses.
/// `Ok(None)` when the socket's receive timeout passed.
pub fn recv_frame(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Option<usize>> {
    if buf.len() < 64 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "buffer too small",
        ));
    }
    // Keep 4 bytes free for a tag.
    let room = buf.len() - 4;
    let mut control = [0u64; 16];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: room,
    };
    // SAFETY: an all-zero msghdr is a valid empty message header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: `msg` points at `iov` (which covers `room` bytes of `buf`) and
    // at `control`, all alive and exclusively borrowed for the call; the
    // kernel writes at most those lengths.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_TRUNC) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted => {
                Ok(None)
            }
            _ => Err(e),
        };
    }
    let mut len = (n as usize).min(room);
    let mut aux = None;
    // SAFETY: `msg` was filled by a successful recvmsg; CMSG_FIRSTHDR and
    // CMSG_NXTHDR only return headers inside `msg_control[..msg_controllen]`,
    // and the auxdata payload is read unaligned by value.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_PACKET
                && (*c).cmsg_type == PACKET_AUXDATA
                && (*c).cmsg_len as usize
                    >= libc::CMSG_LEN(std::mem::size_of::<TpacketAuxdata>() as u32) as usize
            {
                aux = Some(std::ptr::read_unaligned(
                    libc::CMSG_DATA(c) as *const TpacketAuxdata
                ));
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if let Some(a) = aux {
        if a.tp_status & TP_STATUS_VLAN_VALID != 0 && len >= 12 {
            let tpid = if a.tp_status & TP_STATUS_VLAN_TPID_VALID != 0 && a.tp_vlan_tpid != 0 {
                a.tp_vlan_tpid
            } else {
                0x8100
            };
            buf.copy_within(12..len, 16);
            buf[12..14].copy_from_slice(&tpid.to_be_bytes());
            buf[14..16].copy_from_slice(&a.tp_vlan_tci.to_be_bytes());
            len += 4;
        }
    }
    Ok(Some(len))
}
