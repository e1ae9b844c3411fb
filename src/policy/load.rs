//! Loading a policy's files, following `include`, then compiling.
//!
//! File access goes through [`Loader`] so the language can be exercised from
//! memory (tests, fuzzing); [`FsLoader`] is the one implementation that
//! touches the file system.

use super::ast;
use super::diag::{Diagnostic, Diagnostics};
use super::parse::parse_file;
use super::source::{SourceMap, Span};
use super::{compile, Compiled, Options};
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

/// Deepest chain of includes.
const MAX_INCLUDE_DEPTH: usize = 32;
/// Largest policy file accepted.
pub const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;

/// Reads policy files.
pub trait Loader {
    /// The bytes of a file and an identity that is equal for two paths that
    /// name the same file (used to find include cycles).
    fn read(&self, path: &Path) -> io::Result<(PathBuf, Vec<u8>)>;
}

/// Reads files from the file system.
pub struct FsLoader;

impl Loader for FsLoader {
    fn read(&self, path: &Path) -> io::Result<(PathBuf, Vec<u8>)> {
        use std::io::Read;
        let identity = std::fs::canonicalize(path)?;
        let file = std::fs::File::open(path)?;
        if file.metadata()?.is_dir() {
            return Err(io::Error::other("is a directory"));
        }
        let mut bytes = Vec::new();
        file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes)?;
        if bytes.len() as u64 > MAX_FILE_BYTES {
            return Err(io::Error::other(format!(
                "larger than {} MiB",
                MAX_FILE_BYTES / (1024 * 1024)
            )));
        }
        Ok((identity, bytes))
    }
}

/// Files held in memory, keyed by path.
#[derive(Default)]
pub struct MemLoader {
    pub files: HashMap<PathBuf, Vec<u8>>,
}

impl MemLoader {
    pub fn new() -> Self {
        MemLoader::default()
    }

    pub fn add(&mut self, path: impl Into<PathBuf>, text: impl Into<Vec<u8>>) -> &mut Self {
        self.files.insert(path.into(), text.into());
        self
    }
}

/// Removes `.` and `a/..` components without touching the file system.
fn lexical_normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other),
        }
    }
    out
}

impl Loader for MemLoader {
    fn read(&self, path: &Path) -> io::Result<(PathBuf, Vec<u8>)> {
        let key = lexical_normalize(path);
        self.files
            .get(&key)
            .map(|b| (key.clone(), b.clone()))
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such file"))
    }
}

/// A policy that did not compile: its sources (for rendering) and why.
#[derive(Debug)]
pub struct Failed {
    pub sources: SourceMap,
    pub diagnostics: Diagnostics,
}

struct Walk<'l> {
    loader: &'l dyn Loader,
    sources: SourceMap,
    files: Vec<ast::File>,
    diags: Diagnostics,
    /// Identities of files loaded so far.
    loaded: Vec<PathBuf>,
    /// Identities on the current include chain, with display paths.
    stack: Vec<(PathBuf, PathBuf)>,
}

/// Where the first invalid UTF-8 byte is: line, column, byte offset.
fn utf8_error_position(bytes: &[u8], valid_up_to: usize) -> (usize, usize) {
    let before = &bytes[..valid_up_to];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map(|i| i + 1)
        .unwrap_or(0);
    let col = String::from_utf8_lossy(&before[line_start..])
        .chars()
        .count()
        + 1;
    (line, col)
}

impl Walk<'_> {
    fn load(&mut self, path: &Path, from: Option<Span>) {
        let (identity, bytes) = match self.loader.read(path) {
            Ok(x) => x,
            Err(e) => {
                let mut d =
                    Diagnostic::error("E0003", format!("cannot read `{}`: {e}", path.display()));
                if let Some(span) = from {
                    d = d.at(span, "included here");
                }
                self.diags.push(d);
                return;
            }
        };
        if let Some(pos) = self.stack.iter().position(|(id, _)| *id == identity) {
            let mut chain: Vec<String> = self.stack[pos..]
                .iter()
                .map(|(_, p)| p.display().to_string())
                .collect();
            chain.push(path.display().to_string());
            let mut d =
                Diagnostic::error("E0004", format!("include cycle: {}", chain.join(" -> ")));
            if let Some(span) = from {
                d = d.at(span, "includes a file that is already being read");
            }
            self.diags.push(d);
            return;
        }
        if self.loaded.contains(&identity) {
            // Included twice along different paths: read once.
            return;
        }
        if self.stack.len() >= MAX_INCLUDE_DEPTH {
            let mut d = Diagnostic::error(
                "E0004",
                format!("includes nest more than {MAX_INCLUDE_DEPTH} deep"),
            );
            if let Some(span) = from {
                d = d.at(span, "too deep here");
            }
            self.diags.push(d);
            return;
        }
        let text = match String::from_utf8(bytes) {
            Ok(t) => t,
            Err(e) => {
                let bytes = e.as_bytes();
                let (line, col) = utf8_error_position(bytes, e.utf8_error().valid_up_to());
                let mut d = Diagnostic::error(
                    "E0002",
                    format!(
                        "`{}` is not UTF-8 text: invalid byte at line {line}, column {col} (byte offset {})",
                        path.display(),
                        e.utf8_error().valid_up_to()
                    ),
                );
                if let Some(span) = from {
                    d = d.at(span, "included here");
                }
                self.diags
                    .push(d.help("policy files are UTF-8 text; is this the right file?"));
                return;
            }
        };
        self.loaded.push(identity.clone());
        let id = self.sources.add(path.to_path_buf(), text);
        let (file, diags) = parse_file(id, &self.sources.file(id).text);
        self.diags.extend(diags);
        let includes: Vec<(String, Span)> = file
            .stmts
            .iter()
            .filter_map(|s| match s {
                ast::Stmt::Include { path, span } => Some((path.clone(), *span)),
                _ => None,
            })
            .collect();
        self.files.push(file);
        self.stack.push((identity, path.to_path_buf()));
        let dir = path.parent().unwrap_or(Path::new(""));
        for (inc, span) in includes {
            let target = lexical_normalize(&dir.join(&inc));
            self.load(&target, Some(span));
        }
        self.stack.pop();
    }
}

/// Reads a policy from its root file (following includes) and compiles it.
pub fn load_policy(root: &Path, loader: &dyn Loader, opts: Options) -> Result<Compiled, Failed> {
    let mut w = Walk {
        loader,
        sources: SourceMap::new(),
        files: Vec::new(),
        diags: Diagnostics::default(),
        loaded: Vec::new(),
        stack: Vec::new(),
    };
    w.load(root, None);
    if w.files.is_empty() {
        return Err(Failed {
            sources: w.sources,
            diagnostics: w.diags,
        });
    }
    compile(w.sources, w.files, opts, w.diags).map_err(|(sources, diagnostics)| Failed {
        sources,
        diagnostics,
    })
}

/// Compiles a single policy text held in memory (tests, fuzzing).
pub fn compile_str(name: &str, text: &str, opts: Options) -> Result<Compiled, Failed> {
    let mut l = MemLoader::new();
    l.add(name, text.as_bytes().to_vec());
    load_policy(Path::new(name), &l, opts)
}
