//! The first bytes of a tunnel: a TLS ClientHello and its server name, read
//! with tls-parser.

use tls_parser::{
    parse_tls_extensions, parse_tls_plaintext, TlsExtension, TlsMessage, TlsMessageHandshake,
};

/// What the client sent first in a tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirstBytes {
    /// A ClientHello, with its server name if it had one.
    ClientHello {
        server_name: Option<String>,
        /// It offers Encrypted ClientHello (ECH, or its ESNI draft).
        /// Chromium sends a GREASE ECH extension in every ClientHello that
        /// has no ECH configuration, built to look like real ECH, so the
        /// offer alone cannot be refused: the outer server name is checked
        /// as always, and the tunnel goes to the address checked for the
        /// CONNECT host. What a real offer hides is an inner name for that
        /// same server to route by; the record says the offer was there.
        offers_ech: bool,
    },
    /// A ClientHello whose server name cannot be read as one host name:
    /// extensions that do not parse, several server-name extensions, or a
    /// list that is not exactly one `host_name` entry (RFC 6066 allows one
    /// name per type, and servers differ on which entry they use).
    Ambiguous { reason: &'static str },
    /// Bytes that are not the start of a TLS handshake.
    NotTls,
    /// The start of a TLS record, but more bytes are needed.
    Incomplete { need: usize },
}

/// Whether a server name is a DNS host name as RFC 6066 requires (ASCII,
/// at most 253 bytes, labels of letters, digits, hyphens and, as seen in
/// practice, underscores; one trailing dot tolerated). Anything else (a
/// NUL, a newline, an escape sequence, UTF-8) is never matched against a
/// CONNECT host nor written to the trail as a name.
fn is_host_name(name: &[u8]) -> bool {
    let name = name.strip_suffix(b".").unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split(|&b| b == b'.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .iter()
                    .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// The `encrypted_client_hello` extension (RFC 9849, draft-ietf-tls-esni).
const ECH: u16 = 0xfe0d;

/// Largest TLS record plus its header.
pub const MAX_RECORD: usize = 5 + 16_384 + 2048;

/// Whether `rest`, what the client sent right after its ClientHello, is
/// what a TLS client may send before the server answers, as far as it
/// goes: the 1-byte change_cipher_spec of TLS 1.3's middlebox
/// compatibility, a 2-byte alert, and application data (0-RTT early data)
/// only if the hello offered it (`early_data`). Another handshake record,
/// or application data the hello did not announce, is refused: a record
/// header is five bytes anyone can write in front of plain data.
fn records_follow(mut rest: &[u8], early_data: bool) -> bool {
    while let Some(&kind) = rest.first() {
        if rest.get(1).is_some_and(|&major| major != 3) {
            return false;
        }
        let Some(len) = rest.get(3..5) else {
            return matches!(kind, 20 | 21) || kind == 23 && early_data;
        };
        let len = u16::from_be_bytes([len[0], len[1]]) as usize;
        let fits = match kind {
            20 => len == 1 && rest.get(5).is_none_or(|&b| b == 1),
            21 => len == 2,
            23 => early_data && len <= 16_384 + 256,
            _ => false,
        };
        if !fits {
            return false;
        }
        rest = rest.get(5 + len..).unwrap_or(&[]);
    }
    true
}

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
    // Longer than any TLS record may be: not TLS, whatever follows.
    if 5 + len > MAX_RECORD {
        return FirstBytes::NotTls;
    }
    if buf.len() < 5 + len {
        return FirstBytes::Incomplete { need: 5 + len };
    }
    match parse_tls_plaintext(&buf[..5 + len]) {
        Ok((_, record)) => {
            for msg in &record.msg {
                if let TlsMessage::Handshake(TlsMessageHandshake::ClientHello(ch)) = msg {
                    let mut server_name = None;
                    let mut offers_ech = false;
                    let mut early_data = false;
                    if let Some(ext) = ch.ext {
                        let Ok((rest, exts)) = parse_tls_extensions(ext) else {
                            return FirstBytes::Ambiguous {
                                reason: "its extensions do not parse",
                            };
                        };
                        if !rest.is_empty() {
                            return FirstBytes::Ambiguous {
                                reason: "bytes follow its extensions",
                            };
                        }
                        for e in exts {
                            early_data |= matches!(e, TlsExtension::EarlyData(_));
                            offers_ech |= match &e {
                                TlsExtension::EncryptedServerName { .. } => true,
                                TlsExtension::Unknown(t, _) => t.0 == ECH,
                                _ => false,
                            };
                            if let TlsExtension::SNI(names) = e {
                                if server_name.is_some() {
                                    return FirstBytes::Ambiguous {
                                        reason: "it has several server name extensions",
                                    };
                                }
                                match names.as_slice() {
                                    [(kind, name)] if kind.0 == 0 => {
                                        if !is_host_name(name) {
                                            return FirstBytes::Ambiguous {
                                                reason: "its server name is not a DNS host name (RFC 6066: ASCII letters, digits, hyphens and dots)",
                                            };
                                        }
                                        server_name =
                                            Some(String::from_utf8_lossy(name).into_owned());
                                    }
                                    _ => {
                                        return FirstBytes::Ambiguous {
                                            reason:
                                                "its server name list is not exactly one host name",
                                        }
                                    }
                                }
                            }
                        }
                    }
                    if !records_follow(&buf[5 + len..], early_data) {
                        return FirstBytes::Ambiguous {
                            reason: "bytes that are not TLS records follow it (plain data behind a ClientHello)",
                        };
                    }
                    return FirstBytes::ClientHello {
                        server_name,
                        offers_ech,
                    };
                }
            }
            FirstBytes::NotTls
        }
        // A ClientHello split over several records: not accepted (no
        // common client does it, and it would let a name hide).
        Err(_) => FirstBytes::NotTls,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TLS 1.2-framed ClientHello whose server name extension lists
    /// `names` as (type, name); no extension when `names` is `None`.
    fn client_hello(names: Option<&[(u8, &str)]>) -> Vec<u8> {
        client_hello_with(names, &[])
    }

    /// A ClientHello with `extra` (whole extensions) after the server name.
    fn client_hello_with(names: Option<&[(u8, &str)]>, extra: &[u8]) -> Vec<u8> {
        let mut ext = Vec::new();
        if let Some(names) = names {
            let mut list = Vec::new();
            for (kind, name) in names {
                list.push(*kind);
                list.extend_from_slice(&(name.len() as u16).to_be_bytes());
                list.extend_from_slice(name.as_bytes());
            }
            ext.extend_from_slice(&[0, 0]);
            ext.extend_from_slice(&(list.len() as u16 + 2).to_be_bytes());
            ext.extend_from_slice(&(list.len() as u16).to_be_bytes());
            ext.extend_from_slice(&list);
        }
        ext.extend_from_slice(extra);
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        let mut hs = vec![1, 0];
        hs.extend_from_slice(&(body.len() as u16).to_be_bytes());
        hs.extend_from_slice(&body);
        let mut rec = vec![22, 3, 1];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    #[test]
    fn an_ech_offer_is_seen_and_the_outer_name_still_read() {
        // encrypted_client_hello (0xfe0d) with an opaque payload, as
        // Chromium's GREASE sends it: the outer name is read as always.
        let ech = [0xfe, 0x0d, 0, 4, 0, 1, 2, 3];
        let hello = client_hello_with(Some(&[(0, "origin.test")]), &ech);
        assert_eq!(
            inspect(&hello),
            FirstBytes::ClientHello {
                server_name: Some("origin.test".into()),
                offers_ech: true
            }
        );
        assert_eq!(
            inspect(&client_hello(Some(&[(0, "origin.test")]))),
            FirstBytes::ClientHello {
                server_name: Some("origin.test".into()),
                offers_ech: false
            }
        );
    }

    #[test]
    fn plain_data_behind_a_client_hello_is_refused() {
        let hello = client_hello(Some(&[(0, "origin.test")]));
        let mut smuggled = hello.clone();
        smuggled.extend_from_slice(b"GET /after-hello HTTP/1.1\r\n\r\n");
        assert!(matches!(inspect(&smuggled), FirstBytes::Ambiguous { .. }));
        // A change_cipher_spec may follow; early data (application_data
        // records) too, whole or in part, from a hello that offers it.
        let early_hello = client_hello_with(Some(&[(0, "origin.test")]), &[0, 42, 0, 0]);
        let mut early = early_hello.clone();
        early.extend_from_slice(&[20, 3, 3, 0, 1, 1, 23, 3, 3, 0, 4, 9, 9]);
        assert_eq!(
            inspect(&early),
            FirstBytes::ClientHello {
                server_name: Some("origin.test".into()),
                offers_ech: false
            }
        );
        let mut ccs = hello.clone();
        ccs.extend_from_slice(&[20, 3, 3, 0, 1, 1]);
        assert!(matches!(inspect(&ccs), FirstBytes::ClientHello { .. }));
        // A record header in front of plain data does not make it TLS: not
        // an application_data record the hello did not announce, nor one
        // after a hello that did but announcing more than a record holds,
        // nor a second handshake record, nor an oversized change_cipher_spec.
        for (base, tail) in [
            (&hello, &b"\x17\x03\x03\xff\xffPLAIN DATA"[..]),
            (&hello, &b"\x17\x03\x03"[..]),
            (&early_hello, &b"\x17\x03\x03\xff\xffPLAIN DATA"[..]),
            (&hello, &b"\x16\x03\x03\x00\x05PLAIN"[..]),
            (&hello, &b"\x14\x03\x03\x00\x20PLAIN DATA"[..]),
        ] {
            let mut smuggled = base.clone();
            smuggled.extend_from_slice(tail);
            assert!(
                matches!(inspect(&smuggled), FirstBytes::Ambiguous { .. }),
                "{tail:?}"
            );
        }
    }

    #[test]
    fn reads_the_one_host_name() {
        assert_eq!(
            inspect(&client_hello(Some(&[(0, "origin.test")]))),
            FirstBytes::ClientHello {
                server_name: Some("origin.test".into()),
                offers_ech: false
            }
        );
        assert_eq!(
            inspect(&client_hello(None)),
            FirstBytes::ClientHello {
                server_name: None,
                offers_ech: false
            }
        );
        let whole = client_hello(Some(&[(0, "origin.test")]));
        assert!(matches!(
            inspect(&whole[..20]),
            FirstBytes::Incomplete { .. }
        ));
        assert_eq!(inspect(b"GET / HTTP/1.1\r\n"), FirstBytes::NotTls);
        // A record header announcing more than TLS allows in a record is
        // not TLS: nothing waits for the rest.
        assert_eq!(inspect(&[22, 3, 1, 0x4c, 0xbb]), FirstBytes::NotTls);
    }

    #[test]
    fn a_name_list_servers_could_read_differently_is_ambiguous() {
        // A non-host_name entry first, the real name second: a server that
        // skips unknown types would use the second.
        for names in [
            &[(1, "origin.test"), (0, "evil.example")][..],
            &[(0, "origin.test"), (0, "evil.example")][..],
            &[(1, "origin.test")][..],
            &[][..],
        ] {
            assert!(
                matches!(
                    inspect(&client_hello(Some(names))),
                    FirstBytes::Ambiguous { .. }
                ),
                "{names:?}"
            );
        }
    }

    #[test]
    fn a_server_name_that_is_not_a_host_name_is_refused() {
        for name in [
            "origin.test\n2026-12-03T23:59:59Z 999 allowed",
            "\u{1b}[2Korigin.test",
            "origin\0.test",
            "origin..test",
            "bücher.test",
            "",
        ] {
            assert!(
                matches!(
                    inspect(&client_hello(Some(&[(0, name)]))),
                    FirstBytes::Ambiguous { .. }
                ),
                "{name:?}"
            );
        }
        for name in ["origin.test.", "ORIGIN.test", "_dmarc.origin-1.test"] {
            assert!(
                matches!(
                    inspect(&client_hello(Some(&[(0, name)]))),
                    FirstBytes::ClientHello { .. }
                ),
                "{name:?}"
            );
        }
    }
}
