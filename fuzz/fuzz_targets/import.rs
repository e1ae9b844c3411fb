//! Fuzzes the imports: arbitrary text as an Azure NSG document and as a
//! ClassBench rule file. Nothing may panic, every error must place itself
//! inside the document, and whatever an import prints must compile: the
//! output is what a security team commits.

#![no_main]

use libfuzzer_sys::fuzz_target;
use palisade::policy::import::{classbench, nsg, Direction};
use palisade::policy::load::compile_str;
use palisade::policy::{Date, Options};
use std::collections::BTreeMap;

fn compiles(what: &str, text: &str) {
    let opts = Options {
        today: Date::new(2026, 11, 25).unwrap(),
    };
    if let Err(f) = compile_str("imported.policy", text, opts) {
        panic!(
            "{what} printed a policy that does not compile:\n{text}\n{}",
            f.diagnostics.render(&f.sources)
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let lines = text.lines().count().max(1);
    let mut tags = BTreeMap::new();
    tags.insert(
        "VirtualNetwork".to_string(),
        vec!["192.0.2.0/24".to_string()],
    );
    tags.insert("Internet".to_string(), vec!["0.0.0.0/0".to_string()]);
    for direction in [None, Some(Direction::Inbound), Some(Direction::Outbound)] {
        match nsg(text, &tags, direction) {
            Ok(imported) => compiles("import nsg", &imported.text),
            Err(e) => {
                if let Some((line, col)) = e.at() {
                    assert!(
                        line >= 1 && line <= lines + 1 && col >= 1,
                        "{e:?} in {lines} lines"
                    );
                }
            }
        }
    }
    match classbench(text) {
        Ok(policy) => compiles("import classbench", &policy),
        Err(e) => {
            if let Some((line, col)) = e.at() {
                assert!(
                    line >= 1 && line <= lines + 1 && col >= 1,
                    "{e:?} in {lines} lines"
                );
            }
        }
    }
});
