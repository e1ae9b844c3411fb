//! The first bytes of a tunnel: a TLS ClientHello and its server name, read
//! with tls-parser.

use tls_parser::{
    parse_tls_extensions, parse_tls_plaintext, TlsExtension, TlsMessage, TlsMessageHandshake,
};

/// What the client sent first in a tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirstBytes {
    /// A ClientHello, with its server name if it had one.
    ClientHello { server_name: Option<String> },
    /// Bytes that are not the start of a TLS handshake.
    NotTls,
    /// The start of a TLS record, but more bytes are needed.
    Incomplete { need: usize },
}

/// Largest TLS record plus its header.
pub const MAX_RECORD: usize = 5 + 16_384 + 2048;

/// Classifies the bytes read so far.
pub fn inspect(buf: &[u8]) -> FirstBytes {
    if buf.is_empty() {
        return FirstBytes::Incomplete { need: 5 };
    }
    // A handshake record: content type 22, version 3.x.
    if buf[0] != 22 || (buf.len() > 1 && buf[1] != 3) {
        return FirstBytes::NotTls;
    }
    if buf.len() < 5 {
        return FirstBytes::Incomplete { need: 5 };
    }
    let len = u16::from_be_bytes([buf[3], buf[4]]) as usize;
    if buf.len() < 5 + len {
        return FirstBytes::Incomplete { need: 5 + len };
    }
    match parse_tls_plaintext(&buf[..5 + len]) {
        Ok((_, record)) => {
            for msg in &record.msg {
                if let TlsMessage::Handshake(TlsMessageHandshake::ClientHello(ch)) = msg {
                    let mut server_name = None;
                    if let Some(ext) = ch.ext {
                        if let Ok((_, exts)) = parse_tls_extensions(ext) {
                            for e in exts {
                                if let TlsExtension::SNI(names) = e {
                                    if let Some((_, name)) = names.first() {
                                        server_name =
                                            Some(String::from_utf8_lossy(name).into_owned());
                                    }
                                }
                            }
                        }
                    }
                    return FirstBytes::ClientHello { server_name };
                }
            }
            FirstBytes::NotTls
        }
        // A ClientHello split over several records: not accepted (no
        // common client does it, and it would let a name hide).
        Err(_) => FirstBytes::NotTls,
    }
}
