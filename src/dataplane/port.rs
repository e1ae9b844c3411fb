//! The filter's two ports behind one interface, as smoltcp's `phy` puts
//! every way of moving frames behind one device trait. Three kinds:
//!
//! - [`open_batched`] (the default): an `AF_PACKET` socket of palisade's
//!   own that moves up to [`sys::MAX_BATCH`](crate::sys::MAX_BATCH) frames
//!   per system call (`recvmmsg`/`sendmmsg`) and reads and writes a
//!   `virtio_net_hdr` before each frame (`PACKET_VNET_HDR`). The header is
//!   what lets a 64 KiB TCP segment-offload frame cross the filter whole:
//!   the kernel segments it (or the NIC does) only where it leaves, so the
//!   filter decides once per super-frame instead of once per 1,500 bytes,
//!   and the ports can keep their offloads on. pnet's datalink channel
//!   moves one frame per call and has neither, which measured at less
//!   than half the kernel's packet rate and a tenth of its TCP throughput.
//! - [`open_pnet`]: pnet's datalink channel, one frame per call; the ports
//!   must have segmentation and receive offloads off (`ethtool -K IFACE
//!   gro off gso off tso off`), since a super-frame cannot be sent whole.
//! - [`mem_wire`]: in memory, for tests.
//!
//! Both socket kinds read frames with [`PacketRx`], which restores VLAN
//! tags the kernel moved into the packet's metadata, and carry a classic
//! BPF filter that refuses frames of type `PACKET_OUTGOING`, because a
//! packet socket otherwise also reads every frame the filter itself
//! transmits on that interface, and a bridge that reads its own output
//! forwards it again, forever.

use std::io;
use std::os::fd::AsFd;
use std::sync::mpsc;
use std::time::Duration;

/// A frame's offload metadata: the `virtio_net_hdr` a batched port read
/// with it (segmentation size and type, where a partial checksum starts).
/// All zero means a whole frame with its checksums done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offload(pub [u8; 10]);

const VNET_HDR_LEN: usize = 10;
const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;

impl Offload {
    pub const NONE: Offload = Offload([0; 10]);

    /// The segmentation type (0 = none).
    pub fn gso_type(&self) -> u8 {
        self.0[1]
    }

    fn needs_csum(&self) -> bool {
        self.0[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0
    }

    /// The little-endian field at byte `at`: 2 header length, 4 segment
    /// size, 6 checksum start.
    fn field(&self, at: usize) -> u16 {
        u16::from_le_bytes([self.0[at], self.0[at + 1]])
    }

    fn set_field(&mut self, at: usize, v: u16) {
        self.0[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }

    /// The same metadata for the frame with a 4-byte tag inserted before
    /// the checksummed part: the checksum starts 4 bytes later.
    fn shifted(mut self, by: u16) -> Offload {
        if self.needs_csum() {
            self.set_field(6, self.field(6).saturating_add(by));
        }
        if self.gso_type() != 0 {
            self.set_field(2, self.field(2).saturating_add(by));
        }
        self
    }
}

/// One received frame.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    pub data: &'a [u8],
    pub offload: Offload,
}

impl Frame<'_> {
    /// How many packets this frame carries on the wire, and how many bytes
    /// of headers from its start each of them repeats: `(1, 0)` for an
    /// ordinary frame; for a segment-offload super-frame, its payload
    /// divided into segments of the offload's segment size.
    pub fn segments(&self) -> (u64, usize) {
        let o = &self.offload;
        let gso_size = usize::from(o.field(4));
        if o.gso_type() == 0 || gso_size == 0 || !o.needs_csum() {
            return (1, 0);
        }
        // The checksum starts at the transport header.
        let l4 = usize::from(o.field(6));
        let l4_len = match o.gso_type() & 0x7f {
            // TCP over IPv4 or IPv6: the data offset.
            1 | 4 => self.data.get(l4 + 12).map(|b| usize::from(b >> 4) * 4),
            // UDP (fragmentation or segmentation offload).
            3 | 5 => Some(8),
            _ => None,
        };
        let Some(l4_len) = l4_len else {
            return (1, 0);
        };
        let hdrs = l4 + l4_len;
        let payload = self.data.len().saturating_sub(hdrs);
        ((payload.div_ceil(gso_size).max(1)) as u64, hdrs)
    }
}

/// Receiving half of a port.
pub trait RxPort: Send {
    /// Waits up to `timeout` for frames and returns how many are ready
    /// (0 when none came); they stay readable through [`frame`](Self::frame)
    /// until the next call.
    fn recv(&mut self, timeout: Duration) -> io::Result<usize>;
    /// Frame `i` of the last [`recv`](Self::recv); `None` when it was
    /// larger than the port's buffers and arrived cut short.
    fn frame(&self, i: usize) -> Option<Frame<'_>>;
}

/// Sending half of a port.
pub trait TxPort: Send {
    /// Sends `frames` in order; returns how many the port did not take (a
    /// full queue, a link that is down, a frame over its MTU), which are
    /// lost as on a wire.
    fn send(&mut self, frames: &[Frame<'_>]) -> usize;
}

/// An in-memory port: frames sent to one end come out of the other.
pub struct MemRx {
    rx: mpsc::Receiver<(Vec<u8>, Offload)>,
    buf: Vec<(Vec<u8>, Offload)>,
}

pub struct MemTx {
    tx: mpsc::Sender<(Vec<u8>, Offload)>,
}

/// A one-way in-memory wire.
pub fn mem_wire() -> (MemTx, MemRx) {
    let (tx, rx) = mpsc::channel();
    (
        MemTx { tx },
        MemRx {
            rx,
            buf: Vec::new(),
        },
    )
}

impl RxPort for MemRx {
    fn recv(&mut self, timeout: Duration) -> io::Result<usize> {
        self.buf.clear();
        match self.rx.recv_timeout(timeout) {
            Ok(f) => self.buf.push(f),
            Err(mpsc::RecvTimeoutError::Timeout) => return Ok(0),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(io::Error::new(io::ErrorKind::BrokenPipe, "wire closed"))
            }
        }
        while self.buf.len() < crate::sys::MAX_BATCH {
            match self.rx.try_recv() {
                Ok(f) => self.buf.push(f),
                Err(_) => break,
            }
        }
        Ok(self.buf.len())
    }

    fn frame(&self, i: usize) -> Option<Frame<'_>> {
        self.buf.get(i).map(|(data, offload)| Frame {
            data,
            offload: *offload,
        })
    }
}

impl TxPort for MemTx {
    fn send(&mut self, frames: &[Frame<'_>]) -> usize {
        frames
            .iter()
            .filter(|f| self.tx.send((f.data.to_vec(), f.offload)).is_err())
            .count()
    }
}

/// `PACKET_IGNORE_OUTGOING` from `linux/if_packet.h`.
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
/// `PACKET_OUTGOING` from `linux/if_packet.h`.
const PACKET_OUTGOING: u32 = 4;
/// The BPF ancillary load of the packet type (`SKF_AD_OFF + SKF_AD_PKTTYPE`).
const SKF_AD_PKTTYPE: u32 = 0xffff_f000 + 4;
const ETH_P_ALL: u16 = 0x0003;

/// Whether the interface `name` is administratively up; `None` if there
/// is no such interface.
pub fn is_up(name: &str) -> Option<bool> {
    interface(name).ok().map(|i| i.is_up())
}

fn interface(name: &str) -> io::Result<pnet_datalink::NetworkInterface> {
    pnet_datalink::interfaces()
        .into_iter()
        .find(|i| i.name == name)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no interface named {name}"),
            )
        })
}

/// A packet socket that receives nothing yet, with the filter against its
/// own output and VLAN reporting on.
fn packet_socket() -> io::Result<socket2::Socket> {
    use socket2::{Domain, SockFilter, Socket, Type};
    // Protocol 0: no frame is queued before the socket is bound to its port.
    let socket = Socket::new(Domain::PACKET, Type::RAW, None)?;
    // ld pkttype; jeq #OUTGOING, drop, accept; accept: ret #max; drop: ret #0
    let program = [
        SockFilter::new(0x20, 0, 0, SKF_AD_PKTTYPE),
        SockFilter::new(0x15, 1, 0, PACKET_OUTGOING),
        SockFilter::new(0x06, 0, 0, 0x0004_0000),
        SockFilter::new(0x06, 0, 0, 0),
    ];
    socket.attach_filter(&program)?;
    // Better still, the kernel skips the socket for outgoing frames, before
    // it would copy one for it (Linux 4.20 and later; the filter covers
    // older kernels).
    let _ = crate::sys::set_packet_option(socket.as_fd(), PACKET_IGNORE_OUTGOING, 1);
    // Room for a burst of 64 KiB super-frames. The forced variants pass
    // the net.core.{r,w}mem_max caps (often 208 KiB), which the filter may
    // do since it holds CAP_NET_ADMIN to open the socket at all.
    let size = SOCKET_BUFFER;
    if rustix::net::sockopt::set_socket_recv_buffer_size_force(&socket, size).is_err() {
        socket.set_recv_buffer_size(size)?;
    }
    if rustix::net::sockopt::set_socket_send_buffer_size_force(&socket, size).is_err() {
        socket.set_send_buffer_size(size)?;
    }
    crate::sys::enable_auxdata(socket.as_fd())?;
    Ok(socket)
}

/// Each port socket's receive and send buffer.
const SOCKET_BUFFER: usize = 16 << 20;

/// Frames a batched port reads per call.
const BATCH: usize = 32;
/// Room for a virtio header, the largest segment-offload frame (IP's 64 KiB
/// plus link headers) and a restored VLAN tag.
const SLOT: usize = VNET_HDR_LEN + 65_536 + 64 + 4;

/// Receiving half of either socket port: frames read with `recvmmsg`, up to
/// its number of buffers per call, each with its VLAN tag restored and,
/// where the socket reads them, its offload header.
pub struct PacketRx {
    sock: socket2::Socket,
    /// Bytes of offload header before each frame (0 or `VNET_HDR_LEN`).
    hdr: usize,
    bufs: Vec<Box<[u8]>>,
    got: Vec<crate::sys::Received>,
    frames: Vec<Option<(usize, Offload)>>,
    n: usize,
}

/// Where the filter's port claims live: a directory only root and the
/// filter's own user can write (the shipped unit's `RuntimeDirectory=`).
pub const CLAIM_DIR: &str = "/run/palisade-filter";

/// A port held by this filter for as long as the value lives: a second
/// filter on the same interface would forward every frame again, and what
/// this one drops the other (an older policy, say) could pass.
///
/// The claim is an exclusive `flock` on `CLAIM_DIR/port-NETNS-IFINDEX.lock`
/// (the network namespace's inode and the interface's index: names belong
/// to a namespace). The lock goes with the process however it ends. The
/// file is created readable and writable by its owner alone, in a
/// directory only root and the filter's user can write, so no other user
/// can take (or hold) a port's claim.
pub struct PortClaim {
    path: std::path::PathBuf,
    /// Holds the lock; closed (unlocked) after `drop` removed the file.
    _lock: std::fs::File,
}

impl Drop for PortClaim {
    fn drop(&mut self) {
        // Removed while still locked: a filter that opened the old file
        // finds it replaced and tries again (see `claim`).
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Claims interface `name` for this filter, or says which process holds it.
pub fn claim(name: &str) -> io::Result<PortClaim> {
    claim_in(std::path::Path::new(CLAIM_DIR), name)
}

fn claim_in(dir: &std::path::Path, name: &str) -> io::Result<PortClaim> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
    let index = ifindex(name)?;
    let netns = std::fs::metadata("/proc/self/ns/net")?.ino();
    let denied = |what: String| io::Error::new(io::ErrorKind::PermissionDenied, what);
    match std::fs::DirBuilder::new().mode(0o755).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(denied(format!(
                "cannot create {} for the ports' claims ({e}): create it for the filter's user (the shipped unit's RuntimeDirectory=palisade-filter does)",
                dir.display()
            )))
        }
    }
    let meta = std::fs::metadata(dir)?;
    if meta.mode() & 0o022 != 0 {
        return Err(denied(format!(
            "{} is writable by others (mode {:o}): anyone could hold a port's claim; make it writable by its owner alone",
            dir.display(),
            meta.mode() & 0o7777
        )));
    }
    let path = dir.join(format!("port-{netns}-{index}.lock"));
    // A few rounds: the file may be replaced under us by a filter that
    // stops, or be a stale one of another user that no filter holds.
    for _ in 0..4 {
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied && !path.exists() => {
                return Err(denied(format!(
                    "cannot create a claim in {} ({e}): it must be writable by the filter's user (the shipped unit's RuntimeDirectory=palisade-filter is)",
                    dir.display()
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                // Another user's file: held by a filter of that user, or
                // left by one that crashed.
                if let Some(pid) = lock_holder(&path) {
                    return Err(in_use(Some(pid)));
                }
                std::fs::remove_file(&path).map_err(|r| {
                    denied(format!(
                        "{} belongs to another user and no filter holds it, but it cannot be removed ({r}): remove it",
                        path.display()
                    ))
                })?;
                continue;
            }
            Err(e) => return Err(e),
        };
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(in_use(lock_holder(&path)));
            }
            Err(e) => return Err(e.into()),
        }
        // Still the file the path names (not one a stopping filter removed
        // after this one opened it): the claim is this filter's.
        let here = file.metadata()?;
        match std::fs::metadata(&path) {
            Ok(now) if now.ino() == here.ino() && now.dev() == here.dev() => {
                return Ok(PortClaim { path, _lock: file });
            }
            _ => continue,
        }
    }
    Err(io::Error::other(format!(
        "{} kept changing while it was being claimed",
        path.display()
    )))
}

fn in_use(pid: Option<u32>) -> io::Error {
    let who = pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
    io::Error::new(
        io::ErrorKind::AddrInUse,
        format!(
            "already in use by another palisade filter{who}: two filters on one port would each forward what the other drops"
        ),
    )
}

/// The process holding a lock on the file at `path`, from `/proc/locks`
/// (its lines name the holder's pid and the file's device and inode);
/// `None` when no lock is held (or the holder is in a PID namespace this
/// one cannot see).
fn lock_holder(path: &std::path::Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    let dev = rustix::fs::Dev::from(meta.dev());
    let id = format!(
        "{:02x}:{:02x}:{}",
        rustix::fs::major(dev),
        rustix::fs::minor(dev),
        meta.ino()
    );
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let at = fields.iter().position(|f| *f == id)?;
        fields.get(at.checked_sub(1)?)?.parse().ok()
    })
}

/// The interface index of port `name`.
pub fn ifindex(name: &str) -> io::Result<u32> {
    Ok(interface(name)?.index)
}

impl PacketRx {
    /// The packet socket (shared with its port's sending half).
    pub fn socket(&self) -> std::os::fd::BorrowedFd<'_> {
        self.sock.as_fd()
    }

    fn new(sock: socket2::Socket, hdr: usize, batch: usize) -> PacketRx {
        PacketRx {
            sock,
            hdr,
            bufs: (0..batch)
                .map(|_| vec![0u8; SLOT].into_boxed_slice())
                .collect(),
            got: vec![crate::sys::Received::default(); batch],
            frames: vec![None; batch],
            n: 0,
        }
    }
}

/// Sending half of a batched port.
pub struct BatchedTx {
    sock: socket2::Socket,
}

/// Opens interface `name` as a batched port with offload headers.
pub fn open_batched(name: &str) -> io::Result<(BatchedTx, PacketRx)> {
    let iface = interface(name)?;
    let socket = packet_socket()?;
    crate::sys::set_packet_option(socket.as_fd(), crate::sys::PACKET_VNET_HDR, 1)?;
    crate::sys::bind_packet(socket.as_fd(), iface.index, ETH_P_ALL)?;
    crate::sys::set_promiscuous(socket.as_fd(), iface.index)?;
    let tx = socket.try_clone()?;
    Ok((
        BatchedTx { sock: tx },
        PacketRx::new(socket, VNET_HDR_LEN, BATCH),
    ))
}

fn wait(
    fd: std::os::fd::BorrowedFd<'_>,
    flags: rustix::event::PollFlags,
    timeout: Duration,
) -> io::Result<bool> {
    use rustix::event::{poll, PollFd, Timespec};
    let ts = Timespec {
        tv_sec: timeout.as_secs() as _,
        tv_nsec: timeout.subsec_nanos() as _,
    };
    let mut fds = [PollFd::new(&fd, flags)];
    match poll(&mut fds, Some(&ts)) {
        Ok(0) => Ok(false),
        Ok(_) => Ok(true),
        Err(rustix::io::Errno::INTR) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

impl PacketRx {
    fn take(&mut self) -> io::Result<usize> {
        let hdr = self.hdr;
        let n = crate::sys::recv_frames(self.sock.as_fd(), &mut self.bufs, &mut self.got)?;
        for i in 0..n {
            let r = self.got[i];
            // The last 4 bytes of each slot stay free for a restored tag.
            let room = SLOT - 4;
            self.frames[i] = if r.len > room || r.len < hdr {
                None
            } else {
                let buf = &mut self.bufs[i];
                let mut offload = Offload::NONE;
                offload.0[..hdr].copy_from_slice(&buf[..hdr]);
                let mut len = r.len - hdr;
                if let Some((tpid, tci)) = r.vlan {
                    if len >= 12 {
                        let at = hdr + 12;
                        buf.copy_within(at..hdr + len, at + 4);
                        buf[at..at + 2].copy_from_slice(&tpid.to_be_bytes());
                        buf[at + 2..at + 4].copy_from_slice(&tci.to_be_bytes());
                        len += 4;
                        offload = offload.shifted(4);
                    }
                }
                Some((len, offload))
            };
        }
        Ok(n)
    }
}

impl RxPort for PacketRx {
    fn recv(&mut self, timeout: Duration) -> io::Result<usize> {
        self.n = self.take()?;
        if self.n == 0 && wait(self.sock.as_fd(), rustix::event::PollFlags::IN, timeout)? {
            self.n = self.take()?;
        }
        Ok(self.n)
    }

    fn frame(&self, i: usize) -> Option<Frame<'_>> {
        if i >= self.n {
            return None;
        }
        let (len, offload) = self.frames[i]?;
        Some(Frame {
            data: &self.bufs[i][self.hdr..self.hdr + len],
            offload,
        })
    }
}

/// How often a full send queue is waited for before a batch's rest counts
/// as lost.
const SEND_RETRIES: u32 = 3;

impl TxPort for BatchedTx {
    fn send(&mut self, frames: &[Frame<'_>]) -> usize {
        let parts: Vec<[&[u8]; 2]> = frames.iter().map(|f| [&f.offload.0[..], f.data]).collect();
        let mut lost = 0;
        let mut retries = 0;
        let mut at = 0;
        while at < parts.len() {
            match crate::sys::send_frames(self.sock.as_fd(), &parts[at..]) {
                Ok(0) => {
                    lost += 1;
                    at += 1;
                }
                Ok(k) => at += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && retries < SEND_RETRIES => {
                    retries += 1;
                    let _ = wait(
                        self.sock.as_fd(),
                        rustix::event::PollFlags::OUT,
                        Duration::from_millis(10),
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    lost += parts.len() - at;
                    at = parts.len();
                }
                Err(_) => {
                    // This frame was refused (over the MTU, a link down,
                    // the peer's queue full); the rest still go.
                    lost += 1;
                    at += 1;
                }
            }
        }
        lost
    }
}

/// A pnet port, sending side: pnet's datalink sender.
pub struct PnetTx {
    tx: Box<dyn pnet_datalink::DataLinkSender>,
}

/// Opens interface `name` for raw frames in both directions through pnet.
pub fn open_pnet(name: &str) -> io::Result<(PnetTx, PacketRx)> {
    use std::os::fd::IntoRawFd;
    let iface = interface(name)?;
    let socket = packet_socket()?;
    // pnet binds the socket to the interface (for every EtherType) and
    // sends through one handle; frames are read through the other, with
    // their ancillary data.
    let reader = socket.try_clone()?;
    let config = pnet_datalink::Config {
        read_timeout: Some(Duration::from_millis(100)),
        read_buffer_size: 65_536,
        write_buffer_size: 65_536,
        promiscuous: true,
        socket_fd: Some(socket.into_raw_fd()),
        ..Default::default()
    };
    match pnet_datalink::channel(&iface, config)? {
        // One frame per call, as pnet's own receiver reads them.
        pnet_datalink::Channel::Ethernet(tx, _pnet_rx) => {
            Ok((PnetTx { tx }, PacketRx::new(reader, 0, 1)))
        }
        _ => Err(io::Error::other("pnet returned a non-Ethernet channel")),
    }
}

impl TxPort for PnetTx {
    fn send(&mut self, frames: &[Frame<'_>]) -> usize {
        frames
            .iter()
            .filter(|f| {
                // A frame that needs offload work done cannot go out whole.
                f.offload.gso_type() != 0 || !matches!(self.tx.send_to(f.data, None), Some(Ok(())))
            })
            .count()
    }
}

#[cfg(test)]
mod tests {
    /// One claim per port: a second is refused and names the holder; the
    /// claim ends with its holder; a directory others can write is
    /// refused, since anyone could hold a claim in it.
    #[test]
    fn a_port_is_claimed_once() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let claims = dir.path().join("claims");
        let first = super::claim_in(&claims, "lo").unwrap();
        let again = super::claim_in(&claims, "lo").err().expect("held");
        assert!(
            again.to_string().contains(&format!(
                "already in use by another palisade filter (pid {})",
                std::process::id()
            )),
            "{again}"
        );
        drop(first);
        let second = super::claim_in(&claims, "lo").unwrap();
        drop(second);
        std::fs::set_permissions(&claims, std::fs::Permissions::from_mode(0o777)).unwrap();
        let open = super::claim_in(&claims, "lo").err().expect("refused");
        assert!(open.to_string().contains("is writable by others"), "{open}");
    }
}
