//! ClassBench rule and trace files, parsed without I/O.
//!
//! Rules (one per line, fields separated by tabs):
//! `@SRC/LEN  DST/LEN  SPLO : SPHI  DPLO : DPHI  PROTO/PMASK  FLAGS/FMASK`.
//! The rule id of a rule is the 0-based index of its line in the file (the
//! convention of the traces' last column); rules keep file order, which is
//! their priority (first match wins). A protocol mask of `0xFF` is an exact
//! protocol and `0x00` any protocol; other masks are refused. The flags field
//! is ignored.
//!
//! Traces (one header per line, whitespace separated):
//! `SRC DST SPORT DPORT PROTO [FLAGS [RULEID]]`, addresses as unsigned
//! decimal integers. The trailing columns are ignored: the rule id there is
//! a rule the header was generated from, not necessarily its first match.
//!
//! Blank lines are skipped in both (they still count for line numbers and
//! rule ids). Every error names the 1-based line and column and the field; no
//! input makes the parser panic.

use super::{Entry, Fields, Interval, Key};

/// Which part of a ClassBench line was wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClassBenchField {
    Source,
    Destination,
    SourcePort,
    DestinationPort,
    Protocol,
    Flags,
}

impl std::fmt::Display for ClassBenchField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ClassBenchField::Source => "source address",
            ClassBenchField::Destination => "destination address",
            ClassBenchField::SourcePort => "source port",
            ClassBenchField::DestinationPort => "destination port",
            ClassBenchField::Protocol => "protocol",
            ClassBenchField::Flags => "flags",
        })
    }
}

/// A malformed ClassBench rule or trace line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{line}:{column}: {field}: {reason}")]
pub struct ClassBenchError {
    /// 1-based line number in the input.
    pub line: usize,
    /// 1-based column (in characters) where the bad field starts, or where it
    /// was expected.
    pub column: usize,
    pub field: ClassBenchField,
    pub reason: String,
}

/// A piece of a line with the byte offset where it starts.
struct Token<'a> {
    text: &'a str,
    offset: usize,
}

struct Line<'a> {
    number: usize,
    text: &'a str,
}

impl Line<'_> {
    fn error(
        &self,
        offset: usize,
        field: ClassBenchField,
        reason: impl Into<String>,
    ) -> ClassBenchError {
        let column = self
            .text
            .get(..offset)
            .map_or(offset, |prefix| prefix.chars().count())
            + 1;
        ClassBenchError {
            line: self.number,
            column,
            field,
            reason: reason.into(),
        }
    }
}

/// Splits on runs of `sep`-matching characters, keeping offsets.
fn tokens(text: &str, sep: impl Fn(char) -> bool) -> Vec<Token<'_>> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, ch) in text.char_indices() {
        match (sep(ch), start) {
            (true, Some(s)) => {
                out.push(Token {
                    text: &text[s..i],
                    offset: s,
                });
                start = None;
            }
            (false, None) => start = Some(i),
            _ => {}
        }
    }
    if let Some(s) = start {
        out.push(Token {
            text: &text[s..],
            offset: s,
        });
    }
    out
}

fn lines(input: &str) -> impl Iterator<Item = Line<'_>> {
    input
        .lines()
        .enumerate()
        .map(|(i, text)| Line {
            number: i + 1,
            text,
        })
        .filter(|l| !l.text.trim().is_empty())
}

/// Parses a ClassBench rule file into IPv4 entries, one per rule line, the
/// rule id being the line's 0-based index in the file.
pub fn parse_rules(input: &str) -> Result<Vec<Entry<u32>>, ClassBenchError> {
    let mut entries = Vec::new();
    for line in lines(input) {
        let fields = parse_rule_line(&line)?;
        let rule = u32::try_from(line.number - 1).map_err(|_| {
            line.error(
                0,
                ClassBenchField::Source,
                "too many rules for a 32-bit rule id",
            )
        })?;
        entries.push(Entry { fields, rule });
    }
    Ok(entries)
}

fn parse_rule_line(line: &Line<'_>) -> Result<Fields<u32>, ClassBenchError> {
    use ClassBenchField as F;
    let cols = tokens(line.text, |c| c == '\t');
    let col = |i: usize, field: F| -> Result<&Token<'_>, ClassBenchError> {
        cols.get(i).ok_or_else(|| {
            line.error(
                line.text.trim_end().len(),
                field,
                format!("missing field {} of 6", i + 1),
            )
        })
    };
    let src = col(0, F::Source)?;
    let Some(src_text) = src.text.strip_prefix('@') else {
        return Err(line.error(src.offset, F::Source, "a rule line starts with '@'"));
    };
    let src = prefix(line, src_text, src.offset + 1, F::Source)?;
    let dst_tok = col(1, F::Destination)?;
    let dst = prefix(line, dst_tok.text, dst_tok.offset, F::Destination)?;
    let sp = col(2, F::SourcePort)?;
    let src_port = port_range(line, sp, F::SourcePort)?;
    let dp = col(3, F::DestinationPort)?;
    let dst_port = port_range(line, dp, F::DestinationPort)?;
    let pr = col(4, F::Protocol)?;
    let proto = protocol(line, pr)?;
    // The flags field is required by the format but does not take part in
    // 5-tuple matching; only its presence is checked.
    col(5, F::Flags)?;
    if let Some(extra) = cols.get(6) {
        return Err(line.error(extra.offset, F::Flags, "unexpected field after flags"));
    }
    Ok(Fields {
        src,
        dst,
        src_port,
        dst_port,
        proto,
    })
}

fn prefix(
    line: &Line<'_>,
    text: &str,
    offset: usize,
    field: ClassBenchField,
) -> Result<Interval<u32>, ClassBenchError> {
    let Some((addr, len)) = text.split_once('/') else {
        return Err(line.error(
            offset,
            field,
            format!("expected ADDRESS/LEN, found {text:?}"),
        ));
    };
    let addr: std::net::Ipv4Addr = addr
        .parse()
        .map_err(|_| line.error(offset, field, format!("bad IPv4 address {addr:?}")))?;
    let len_offset = offset + text.len() - len.len();
    let len: u32 = match len.parse() {
        Ok(l) if l <= 32 => l,
        _ => {
            return Err(line.error(
                len_offset,
                field,
                format!("prefix length must be 0 to 32, found {len:?}"),
            ))
        }
    };
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    let lo = u32::from(addr) & mask;
    Ok(Interval { lo, hi: lo | !mask })
}

fn port_range(
    line: &Line<'_>,
    tok: &Token<'_>,
    field: ClassBenchField,
) -> Result<Interval<u16>, ClassBenchError> {
    let Some((lo, hi)) = tok.text.split_once(':') else {
        return Err(line.error(
            tok.offset,
            field,
            format!("expected \"LO : HI\", found {:?}", tok.text),
        ));
    };
    let num = |s: &str, at: usize| -> Result<u16, ClassBenchError> {
        s.trim()
            .parse()
            .map_err(|_| line.error(at, field, format!("bad port {:?} (0 to 65535)", s.trim())))
    };
    let lo_v = num(lo, tok.offset)?;
    let hi_v = num(hi, tok.offset + lo.len() + 1)?;
    Interval::new(lo_v, hi_v).ok_or_else(|| {
        line.error(
            tok.offset,
            field,
            format!("empty port range {lo_v} : {hi_v}"),
        )
    })
}

fn protocol(line: &Line<'_>, tok: &Token<'_>) -> Result<Interval<u8>, ClassBenchError> {
    let field = ClassBenchField::Protocol;
    let hex = |s: &str, at: usize| -> Result<u8, ClassBenchError> {
        s.strip_prefix("0x")
            .or_else(|| s.strip_prefix("0X"))
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .ok_or_else(|| {
                line.error(
                    at,
                    field,
                    format!("expected a hex byte like 0x06, found {s:?}"),
                )
            })
    };
    let Some((value, mask)) = tok.text.split_once('/') else {
        return Err(line.error(
            tok.offset,
            field,
            format!("expected VALUE/MASK, found {:?}", tok.text),
        ));
    };
    let v = hex(value, tok.offset)?;
    let mask_offset = tok.offset + value.len() + 1;
    match hex(mask, mask_offset)? {
        0xFF => Ok(Interval::single(v)),
        0x00 => Ok(Interval { lo: 0, hi: u8::MAX }),
        m => Err(line.error(
            mask_offset,
            field,
            format!("mask must be 0xFF (exact) or 0x00 (any), found 0x{m:02X}"),
        )),
    }
}

/// Parses a ClassBench trace into IPv4 keys, one per non-blank line.
pub fn parse_trace(input: &str) -> Result<Vec<Key<u32>>, ClassBenchError> {
    use ClassBenchField as F;
    let mut keys = Vec::new();
    for line in lines(input) {
        let cols = tokens(line.text, char::is_whitespace);
        let fields = [
            F::Source,
            F::Destination,
            F::SourcePort,
            F::DestinationPort,
            F::Protocol,
        ];
        let mut vals = [0u64; 5];
        for (i, field) in fields.into_iter().enumerate() {
            let tok = cols.get(i).ok_or_else(|| {
                line.error(
                    line.text.trim_end().len(),
                    field,
                    format!("missing column {} of 5", i + 1),
                )
            })?;
            let max = match i {
                0 | 1 => u64::from(u32::MAX),
                2 | 3 => u64::from(u16::MAX),
                _ => u64::from(u8::MAX),
            };
            vals[i] = match tok.text.parse::<u64>() {
                Ok(v) if v <= max => v,
                _ => {
                    return Err(line.error(
                        tok.offset,
                        field,
                        format!("expected a decimal number 0 to {max}, found {:?}", tok.text),
                    ))
                }
            };
        }
        // The range checks above make these conversions lossless.
        keys.push(Key {
            src: vals[0] as u32,
            dst: vals[1] as u32,
            src_port: vals[2] as u16,
            dst_port: vals[3] as u16,
            proto: vals[4] as u8,
        });
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: &str = "@237.73.3.4/32\t67.236.63.0/24\t0 : 65535\t1711 : 1711\t0x06/0xFF\t0x0000/0x0200\t\n\
                         @0.0.0.0/0\t10.0.0.0/8\t1024 : 2048\t0 : 65535\t0x00/0x00\t0x0000/0x0000\t\n";

    #[test]
    fn parses_rules_in_order() {
        let e = parse_rules(RULES).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].rule, 0);
        assert_eq!(e[0].fields.src, Interval::single(0xED49_0304));
        assert_eq!(
            e[0].fields.dst,
            Interval {
                lo: 0x43EC_3F00,
                hi: 0x43EC_3FFF
            }
        );
        assert_eq!(e[0].fields.src_port, Interval { lo: 0, hi: 65535 });
        assert_eq!(e[0].fields.dst_port, Interval::single(1711));
        assert_eq!(e[0].fields.proto, Interval::single(6));
        assert_eq!(e[1].rule, 1);
        assert_eq!(
            e[1].fields.src,
            Interval {
                lo: 0,
                hi: u32::MAX
            }
        );
        assert_eq!(e[1].fields.proto, Interval { lo: 0, hi: 255 });
    }

    #[test]
    fn rule_ids_are_line_indices_even_across_blank_lines() {
        let text = RULES.replace('\n', "\n\n");
        let e = parse_rules(&text).unwrap();
        assert_eq!(e.iter().map(|e| e.rule).collect::<Vec<_>>(), vec![0, 2]);
    }

    #[test]
    fn bad_protocol_mask_names_line_column_and_field() {
        let text = "@1.2.3.4/32\t5.6.7.8/32\t0 : 65535\t80 : 80\t0x06/0xF0\t0x0000/0x0000\t\n";
        let err = parse_rules(&format!("{RULES}{text}")).unwrap_err();
        assert_eq!(err.line, 3);
        assert_eq!(err.field, ClassBenchField::Protocol);
        assert_eq!(err.column, text.find("0xF0").unwrap() + 1);
    }

    #[test]
    fn malformed_rules_are_errors() {
        for (text, field) in [
            (
                "1.2.3.4/32\t5.6.7.8/32\t0 : 1\t0 : 1\t0x06/0xFF\t0x0/0x0",
                ClassBenchField::Source,
            ),
            (
                "@1.2.3.4/33\t5.6.7.8/32\t0 : 1\t0 : 1\t0x06/0xFF\t0x0/0x0",
                ClassBenchField::Source,
            ),
            (
                "@1.2.3.4/32\t5.6.7/32\t0 : 1\t0 : 1\t0x06/0xFF\t0x0/0x0",
                ClassBenchField::Destination,
            ),
            (
                "@1.2.3.4/32\t5.6.7.8/32\t9 : 1\t0 : 1\t0x06/0xFF\t0x0/0x0",
                ClassBenchField::SourcePort,
            ),
            (
                "@1.2.3.4/32\t5.6.7.8/32\t0 : 1\t0 : 70000\t0x06/0xFF\t0x0/0x0",
                ClassBenchField::DestinationPort,
            ),
            (
                "@1.2.3.4/32\t5.6.7.8/32\t0 : 1\t0 : 1\t6/0xFF\t0x0/0x0",
                ClassBenchField::Protocol,
            ),
            (
                "@1.2.3.4/32\t5.6.7.8/32\t0 : 1\t0 : 1\t0x06/0xFF",
                ClassBenchField::Flags,
            ),
            ("@1.2.3.4/32", ClassBenchField::Destination),
            (
                "@é/32\t5.6.7.8/32\t0 : 1\t0 : 1\t0x06/0xFF\t0x0/0x0",
                ClassBenchField::Source,
            ),
        ] {
            let err = parse_rules(text).unwrap_err();
            assert_eq!(err.field, field, "{text:?}: {err}");
            assert_eq!(err.line, 1);
        }
    }

    #[test]
    fn parses_traces_and_rejects_out_of_range_values() {
        let keys =
            parse_trace("1923697128\t2273746465\t0\t1221\t6\t4294967295\t261\n\n1 2 3 4 17\n")
                .unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(
            keys[0],
            Key {
                src: 1923697128,
                dst: 2273746465,
                src_port: 0,
                dst_port: 1221,
                proto: 6
            }
        );
        assert_eq!(keys[1].proto, 17);
        let err = parse_trace("1 2 3 65536 6\n").unwrap_err();
        assert_eq!(
            (err.line, err.column, err.field),
            (1, 7, ClassBenchField::DestinationPort)
        );
        let err = parse_trace("1 2 3\n").unwrap_err();
        assert_eq!(err.field, ClassBenchField::DestinationPort);
    }
}
