//! Fuzzes the whole policy front end: arbitrary bytes as a policy file
//! (with an include of a second arbitrary file), through UTF-8 checks,
//! parsing, resolution, compilation and expectations. Nothing may panic;
//! a policy that compiles must format to text that parses to the same
//! formatted text again (the formatter is idempotent), and every diagnostic
//! must render.

#![no_main]

use libfuzzer_sys::fuzz_target;
use palisade::policy::load::{load_policy, MemLoader};
use palisade::policy::{expect, fmt, parse, source::FileId, Date, Options};
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    // Split the input in two files at the first 0xff byte, so includes are
    // exercised too.
    let (main, other) = match data.iter().position(|&b| b == 0xff) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let mut loader = MemLoader::new();
    loader.add("main.policy", main.to_vec());
    loader.add("other.policy", other.to_vec());
    let opts = Options {
        today: Date::new(2026, 11, 25).unwrap(),
    };
    match load_policy(Path::new("main.policy"), &loader, opts) {
        Ok(c) => {
            let _ = c.diagnostics.render(&c.sources);
            for e in &c.expectations {
                let _ = expect::run(&c.policy, e);
            }
        }
        Err(f) => {
            let _ = f.diagnostics.render(&f.sources);
        }
    }
    if let Ok(text) = std::str::from_utf8(main) {
        if let Ok(formatted) = fmt::format_text(text) {
            let again = fmt::format_text(&formatted).expect("formatted text must parse");
            assert_eq!(again, formatted, "fmt is not idempotent");
        }
        let _ = parse::parse_probe(FileId(0), text);
    }
});
