//! The filter's two ports behind one interface, as smoltcp's `phy` puts
//! every way of moving frames behind one device trait: a pnet datalink port
//! for real interfaces and an in-memory port for tests.
//!
//! The pnet port opens its own `AF_PACKET` socket and hands it to pnet:
//! the socket carries a classic BPF filter that refuses frames of type
//! `PACKET_OUTGOING`, because a packet socket otherwise also reads every
//! frame the filter itself transmits on that interface, and a bridge that
//! reads its own output forwards it again, forever.

use std::io;
use std::sync::mpsc;
use std::time::Duration;

/// Receiving half of a port.
pub trait RxPort: Send {
    /// The next frame, or `None` when `timeout` passed without one.
    fn recv(&mut self, timeout: Duration) -> io::Result<Option<&[u8]>>;
}

/// Sending half of a port.
pub trait TxPort: Send {
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;
}

/// An in-memory port: frames sent to one end come out of the other.
pub struct MemRx {
    rx: mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
}

pub struct MemTx {
    tx: mpsc::Sender<Vec<u8>>,
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
    fn recv(&mut self, timeout: Duration) -> io::Result<Option<&[u8]>> {
        match self.rx.recv_timeout(timeout) {
            Ok(f) => {
                self.buf = f;
                Ok(Some(&self.buf))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => Ok(None),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(io::Error::new(io::ErrorKind::BrokenPipe, "wire closed"))
            }
        }
    }
}

impl TxPort for MemTx {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.tx
            .send(frame.to_vec())
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "wire closed"))
    }
}

/// A real interface: frames read with their VLAN tags restored (see
/// [`crate::sys::recv_frame`]); sent through pnet's datalink layer.
pub struct PnetRx {
    sock: socket2::Socket,
    buf: Vec<u8>,
    len: usize,
}

pub struct PnetTx {
    tx: Box<dyn pnet_datalink::DataLinkSender>,
}

/// `PACKET_OUTGOING` from `linux/if_packet.h`.
const PACKET_OUTGOING: u32 = 4;
/// The BPF ancillary load of the packet type (`SKF_AD_OFF + SKF_AD_PKTTYPE`).
const SKF_AD_PKTTYPE: u32 = 0xffff_f000 + 4;

/// Opens interface `name` for raw frames in both directions.
pub fn open_pnet(name: &str) -> io::Result<(PnetTx, PnetRx)> {
    use socket2::{Domain, Protocol, SockFilter, Socket, Type};
    use std::os::fd::IntoRawFd;
    let iface = pnet_datalink::interfaces()
        .into_iter()
        .find(|i| i.name == name)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no interface named {name}"),
            )
        })?;
    const ETH_P_ALL: u16 = 0x0003;
    let socket = Socket::new(
        Domain::PACKET,
        Type::RAW,
        Some(Protocol::from(i32::from(ETH_P_ALL.to_be()))),
    )?;
    // ld pkttype; jeq #OUTGOING, drop, accept; accept: ret #max; drop: ret #0
    let program = [
        SockFilter::new(0x20, 0, 0, SKF_AD_PKTTYPE),
        SockFilter::new(0x15, 1, 0, PACKET_OUTGOING),
        SockFilter::new(0x06, 0, 0, 0x0004_0000),
        SockFilter::new(0x06, 0, 0, 0),
    ];
    socket.attach_filter(&program)?;
    socket.set_recv_buffer_size(4 << 20)?;
    {
        use std::os::fd::AsFd;
        crate::sys::enable_auxdata(socket.as_fd())?;
    }
    // pnet sends through one handle of the socket; frames are read through
    // the other, with their ancillary data.
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
        pnet_datalink::Channel::Ethernet(tx, _pnet_rx) => Ok((
            PnetTx { tx },
            PnetRx {
                sock: reader,
                buf: vec![0; 65_536 + 4],
                len: 0,
            },
        )),
        _ => Err(io::Error::other("pnet returned a non-Ethernet channel")),
    }
}

impl RxPort for PnetRx {
    fn recv(&mut self, timeout: Duration) -> io::Result<Option<&[u8]>> {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        use std::os::fd::AsFd;
        // The socket is non-blocking (pnet sets it so): wait for a frame.
        let ts = Timespec {
            tv_sec: timeout.as_secs() as _,
            tv_nsec: timeout.subsec_nanos() as _,
        };
        let mut fds = [PollFd::new(&self.sock, PollFlags::IN)];
        match poll(&mut fds, Some(&ts)) {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        match crate::sys::recv_frame(self.sock.as_fd(), &mut self.buf)? {
            Some(n) => {
                self.len = n;
                Ok(Some(&self.buf[..self.len]))
            }
            None => Ok(None),
        }
    }
}

impl TxPort for PnetTx {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        match self.tx.send_to(frame, None) {
            Some(r) => r,
            None => Err(io::Error::other("frame larger than the send buffer")),
        }
    }
}
