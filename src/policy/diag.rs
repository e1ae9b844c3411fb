//! Diagnostics: what is wrong with a policy, where, and what to do about it.
//!
//! Every diagnostic carries a stable code (E… for errors, W… for warnings),
//! a message, and usually a primary span that is rendered like rustc or
//! nftables do: `file:line:col`, the source line, and carets under the exact
//! token.

use super::source::{SourceMap, Span};
use std::fmt::Write;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Warning,
    Error,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        }
    }
}

/// A span with a short text printed beside its carets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Label {
    pub span: Span,
    pub text: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    pub code: &'static str,
    pub message: String,
    pub primary: Option<Label>,
    /// Other places worth showing ("first defined here").
    pub secondary: Vec<Label>,
    pub help: Option<String>,
}

impl Diagnostic {
    pub fn error(code: &'static str, message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Error,
            code,
            message: message.into(),
            primary: None,
            secondary: Vec::new(),
            help: None,
        }
    }

    pub fn warning(code: &'static str, message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Warning,
            ..Diagnostic::error(code, message)
        }
    }

    pub fn at(mut self, span: Span, text: impl Into<String>) -> Self {
        self.primary = Some(Label {
            span,
            text: text.into(),
        });
        self
    }

    pub fn also(mut self, span: Span, text: impl Into<String>) -> Self {
        self.secondary.push(Label {
            span,
            text: text.into(),
        });
        self
    }

    pub fn help(mut self, text: impl Into<String>) -> Self {
        self.help = Some(text.into());
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    /// The diagnostic as people read it, with source excerpts.
    pub fn render(&self, sources: &SourceMap) -> String {
        let mut out = String::new();
        let kind = self.severity.as_str();
        let _ = writeln!(out, "{kind}[{}]: {}", self.code, self.message);
        let labels: Vec<&Label> = self.primary.iter().chain(self.secondary.iter()).collect();
        let gutter = labels
            .iter()
            .map(|l| {
                sources
                    .file(l.span.file)
                    .line_col(l.span.start)
                    .line
                    .to_string()
                    .len()
            })
            .max()
            .unwrap_or(1);
        let pad = " ".repeat(gutter);
        for (i, label) in labels.iter().enumerate() {
            let caret = if i == 0 && self.primary.is_some() {
                '^'
            } else {
                '-'
            };
            let arrow = if i == 0 { "-->" } else { ":::" };
            let _ = writeln!(out, "{pad}{arrow} {}", sources.location(label.span));
            let _ = writeln!(out, "{pad} |");
            render_excerpt(&mut out, sources, label, caret, gutter);
        }
        if !labels.is_empty() && self.help.is_some() {
            let _ = writeln!(out, "{pad} |");
        }
        if let Some(help) = &self.help {
            let _ = writeln!(out, "{pad} = help: {help}");
        }
        out
    }
}

impl Diagnostic {
    /// The diagnostic as tools read it: severity, code, message, where
    /// (`file`, 1-based `line` and `column` of the primary span, or nulls),
    /// its label, the other places, and the help.
    pub fn to_json(&self, sources: &SourceMap) -> serde_json::Value {
        let place = |l: &Label| {
            let f = sources.file(l.span.file);
            let lc = f.line_col(l.span.start);
            serde_json::json!({
                "file": f.path.display().to_string(),
                "line": lc.line,
                "column": lc.col,
                "label": l.text,
            })
        };
        let primary = self.primary.as_ref().map(place);
        let at = |k: &str| {
            primary
                .as_ref()
                .map_or(serde_json::Value::Null, |p| p[k].clone())
        };
        serde_json::json!({
            "severity": self.severity.as_str(),
            "code": self.code,
            "message": self.message,
            "file": at("file"),
            "line": at("line"),
            "column": at("column"),
            "label": at("label"),
            "also": self.secondary.iter().map(place).collect::<Vec<_>>(),
            "help": self.help,
        })
    }
}

/// Longest run of source characters shown around a caret; longer lines are
/// cut with an ellipsis so a megabyte line stays readable.
const EXCERPT_WIDTH: usize = 100;

fn render_excerpt(
    out: &mut String,
    sources: &SourceMap,
    label: &Label,
    caret: char,
    gutter: usize,
) {
    let file = sources.file(label.span.file);
    let start = file.line_col(label.span.start);
    let line_text = file.line_text(start.line);
    let chars: Vec<char> = line_text.chars().collect();
    // Carets stay on the first line of a multi-line span.
    let line_end = file.line_start(label.span.start) + line_text.len();
    let end_byte = label.span.end.min(line_end).max(label.span.start);
    let end_col = file.line_col(end_byte).col.max(start.col);
    let caret_from = start.col - 1;
    let caret_len = (end_col - start.col).max(1);

    // Window of characters to show.
    let (win_start, win_end) = if chars.len() <= EXCERPT_WIDTH {
        (0, chars.len())
    } else {
        let s = caret_from.saturating_sub(EXCERPT_WIDTH / 2);
        let e = (s + EXCERPT_WIDTH).min(chars.len());
        (e.saturating_sub(EXCERPT_WIDTH), e)
    };
    let mut shown = String::new();
    let mut under = String::new();
    if win_start > 0 {
        shown.push('…');
        under.push(' ');
    }
    for (i, &c) in chars[win_start..win_end].iter().enumerate() {
        let c = if c.is_control() && c != '\t' {
            '�'
        } else {
            c
        };
        shown.push(c);
        let idx = win_start + i;
        if idx < caret_from {
            under.push(if c == '\t' { '\t' } else { ' ' });
        }
    }
    if win_end < chars.len() {
        shown.push('…');
    }
    let visible_carets = caret_len.min(win_end.saturating_sub(caret_from).max(1));
    for _ in 0..visible_carets {
        under.push(caret);
    }
    if !label.text.is_empty() {
        under.push(' ');
        under.push_str(&label.text);
    }
    let _ = writeln!(out, "{:>gutter$} | {shown}", start.line);
    let _ = writeln!(out, "{:gutter$} | {under}", "");
}

/// The diagnostics of one run, errors and warnings together.
#[derive(Clone, Debug, Default)]
pub struct Diagnostics {
    pub items: Vec<Diagnostic>,
}

/// At most this many diagnostics are kept; a file of junk produces one
/// useful screen, not a million lines.
pub const MAX_DIAGNOSTICS: usize = 100;

impl Diagnostics {
    pub fn push(&mut self, d: Diagnostic) {
        if self.items.len() < MAX_DIAGNOSTICS {
            self.items.push(d);
        } else if self.items.len() == MAX_DIAGNOSTICS {
            self.items.push(Diagnostic::error(
                "E0000",
                format!("too many diagnostics; stopped after {MAX_DIAGNOSTICS}"),
            ));
        }
    }

    pub fn extend(&mut self, other: Diagnostics) {
        for d in other.items {
            self.push(d);
        }
    }

    pub fn has_errors(&self) -> bool {
        self.items.iter().any(|d| d.is_error())
    }

    pub fn error_count(&self) -> usize {
        self.items.iter().filter(|d| d.is_error()).count()
    }

    pub fn warning_count(&self) -> usize {
        self.items.iter().filter(|d| !d.is_error()).count()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Sorts by file and position so output is stable and reads top-down.
    pub fn sort(&mut self) {
        self.items.sort_by_key(|d| {
            d.primary
                .as_ref()
                .map(|l| (0, l.span.file, l.span.start))
                .unwrap_or((1, super::source::FileId(0), 0))
        });
    }

    pub fn render(&self, sources: &SourceMap) -> String {
        let mut out = String::new();
        for d in &self.items {
            out.push_str(&d.render(sources));
            out.push('\n');
        }
        out
    }
}
