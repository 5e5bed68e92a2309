//! One place that turns problems into reports: compiler-style miette reports for humans, one
//! JSON object per line for machines (in the manner of cargo's `--message-format json`).
//!
//! Every other module produces [`Diagnostic`] values; only this module knows how they look.
//! Spans are byte ranges into the manifest's text. They are clamped to the text and to UTF-8
//! character boundaries before rendering, so a diagnostic from any source (including the KDL
//! parser's own) can never make the renderer fail.

pub mod codes;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use miette::{GraphicalReportHandler, GraphicalTheme, LabeledSpan, NamedSource, SourceSpan};
use serde::Serialize;

/// How bad a diagnostic is. `Help` is for suggestions: never an error, never changes the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Error,
    Warning,
    Help,
}

/// A manifest file's name and text, shared by every diagnostic that points into it.
#[derive(Debug)]
pub struct SourceFile {
    /// The path as shown to the user (relative to the workspace root when inside it).
    pub display_name: String,
    pub path: PathBuf,
    source: NamedSource<String>,
}

impl SourceFile {
    pub fn new(path: &Path, display_name: String, text: String) -> Arc<Self> {
        Arc::new(Self {
            source: NamedSource::new(&display_name, text),
            display_name,
            path: path.to_path_buf(),
        })
    }

    pub fn text(&self) -> &str {
        self.source.inner()
    }

    /// Clamp a span to the text and to character boundaries.
    fn clamp(&self, span: Span) -> Span {
        let len = self.text().len();
        let mut start = span.offset.min(len);
        while !self.text().is_char_boundary(start) {
            start -= 1;
        }
        let mut end = span.offset.saturating_add(span.len).min(len).max(start);
        while !self.text().is_char_boundary(end) {
            end += 1;
        }
        Span {
            offset: start,
            len: end - start,
        }
    }

    /// One-based line and column (in characters) of a byte offset.
    pub fn line_column(&self, offset: usize) -> (usize, usize) {
        let offset = self.clamp(Span { offset, len: 0 }).offset;
        let before = &self.text()[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        (line, column)
    }
}

/// A byte range in a source file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Default)]
pub struct Span {
    pub offset: usize,
    pub len: usize,
}

impl From<SourceSpan> for Span {
    fn from(span: SourceSpan) -> Self {
        Self {
            offset: span.offset(),
            len: span.len(),
        }
    }
}

impl From<Span> for SourceSpan {
    fn from(span: Span) -> Self {
        SourceSpan::new(span.offset.into(), span.len)
    }
}

/// A secondary location shown with a diagnostic ("first defined here").
#[derive(Debug, Clone)]
pub struct Related {
    pub span: Span,
    pub label: String,
}

/// A problem or suggestion, optionally located in a manifest.
#[derive(Debug, Clone)]
pub struct Diagnostic {
    pub level: Level,
    /// Stable identifier, e.g. `appliance::unknown-node`; documented in the schema reference.
    pub code: &'static str,
    pub message: String,
    pub file: Option<Arc<SourceFile>>,
    pub span: Option<Span>,
    pub label: Option<String>,
    pub help: Option<String>,
    pub related: Vec<Related>,
    /// The appliance the diagnostic concerns, when there is one.
    pub appliance: Option<String>,
    /// For suggestions: kind, subject, score, rank and evidence.
    pub suggestion: Option<SuggestionInfo>,
}

impl Diagnostic {
    pub fn new(level: Level, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            level,
            code,
            message: message.into(),
            file: None,
            span: None,
            label: None,
            help: None,
            related: Vec::new(),
            appliance: None,
            suggestion: None,
        }
    }

    pub fn error(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(Level::Error, code, message)
    }

    pub fn warning(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(Level::Warning, code, message)
    }

    pub fn at(mut self, file: &Arc<SourceFile>, span: impl Into<Span>) -> Self {
        self.file = Some(Arc::clone(file));
        self.span = Some(span.into());
        self
    }

    pub fn in_file(mut self, file: &Arc<SourceFile>) -> Self {
        self.file = Some(Arc::clone(file));
        self
    }

    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }

    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    pub fn maybe_help(mut self, help: Option<String>) -> Self {
        if help.is_some() {
            self.help = help;
        }
        self
    }

    pub fn related(mut self, span: impl Into<Span>, label: impl Into<String>) -> Self {
        self.related.push(Related {
            span: span.into(),
            label: label.into(),
        });
        self
    }

    pub fn for_appliance(mut self, name: &str) -> Self {
        self.appliance = Some(name.to_owned());
        self
    }

    pub fn is_error(&self) -> bool {
        self.level == Level::Error
    }

    /// The machine-readable form, one per line with `--message-format json`.
    pub fn to_message(&self) -> Message<'_> {
        let located = self.file.as_ref().zip(self.span).map(|(file, span)| {
            let span = file.clamp(span);
            let (line, column) = file.line_column(span.offset);
            (span, line, column)
        });
        Message {
            reason: "diagnostic",
            level: self.level,
            code: self.code,
            message: &self.message,
            file: self.file.as_ref().map(|f| f.display_name.as_str()),
            line: located.map(|(_, line, _)| line),
            column: located.map(|(_, _, column)| column),
            span: located.map(|(span, _, _)| span),
            label: self.label.as_deref(),
            help: self.help.as_deref(),
            appliance: self.appliance.as_deref(),
            suggestion: self.suggestion.as_ref(),
        }
    }

    /// Render for a terminal: a rustc-like report with the span underlined.
    pub fn render_human(&self, color: bool) -> String {
        let theme = if color {
            GraphicalTheme::unicode()
        } else {
            GraphicalTheme::unicode_nocolor()
        };
        let handler = GraphicalReportHandler::new_themed(theme)
            .with_width(100)
            .with_links(false)
            .with_context_lines(1);
        let report = Report { diagnostic: self };
        let mut out = String::new();
        if handler.render_report(&mut out, &report).is_err() {
            // Rendering into a String only fails on a broken Display impl; fall back to the
            // plain message rather than losing the diagnostic.
            out = format!("{}: {}\n", self.level_word(), self.message);
        }
        out
    }

    fn level_word(&self) -> &'static str {
        match self.level {
            Level::Error => "error",
            Level::Warning => "warning",
            Level::Help => "help",
        }
    }
}

/// `--message-format json` output for one diagnostic.
#[derive(Debug, Serialize)]
pub struct Message<'a> {
    pub reason: &'static str,
    pub level: Level,
    pub code: &'static str,
    pub message: &'a str,
    pub file: Option<&'a str>,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub span: Option<Span>,
    pub label: Option<&'a str>,
    pub help: Option<&'a str>,
    pub appliance: Option<&'a str>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub suggestion: Option<&'a SuggestionInfo>,
}

/// What a suggestion carries in `--message-format json`, beside the diagnostic fields. Part
/// of this leaf module (not of the history that computes it) so that every layer can speak
/// of suggestions without depending on how they are found.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct SuggestionInfo {
    pub kind: String,
    pub subject: String,
    pub score: f64,
    pub rank: usize,
    pub scope: String,
    #[serde(flatten)]
    pub evidence: Evidence,
    /// The manifest edit that applies the suggestion, when it can be made by machine (as
    /// rustc's suggestions carry theirs for `cargo fix`); `suggest --apply KEY` makes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edit: Option<Edit>,
}

/// Support, confidence and lift of a change, from SQL over the history.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Evidence {
    /// Derivations in scope (from the base, or its family).
    pub scope_total: i64,
    /// Of those, how many have the change.
    pub scope_with: i64,
    /// The known change that best predicts this one, with its counts.
    pub given: Option<String>,
    pub given_total: i64,
    pub given_with: i64,
    pub support: f64,
    pub confidence: f64,
    pub lift: f64,
}

/// Replace `len` bytes at `offset` of `file` with `replacement` (an insertion when `len` is 0).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Edit {
    /// The manifest, as shown in diagnostics (relative to the workspace root).
    pub file: String,
    pub offset: usize,
    pub len: usize,
    pub replacement: String,
}

/// Adapter from our diagnostic to miette's rendering traits.
struct Report<'a> {
    diagnostic: &'a Diagnostic,
}

impl fmt::Debug for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.diagnostic, f)
    }
}

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.diagnostic.message)
    }
}

impl std::error::Error for Report<'_> {}

impl miette::Diagnostic for Report<'_> {
    fn code<'b>(&'b self) -> Option<Box<dyn fmt::Display + 'b>> {
        Some(Box::new(self.diagnostic.code))
    }

    fn severity(&self) -> Option<miette::Severity> {
        Some(match self.diagnostic.level {
            Level::Error => miette::Severity::Error,
            Level::Warning => miette::Severity::Warning,
            Level::Help => miette::Severity::Advice,
        })
    }

    fn help<'b>(&'b self) -> Option<Box<dyn fmt::Display + 'b>> {
        self.diagnostic
            .help
            .as_ref()
            .map(|h| Box::new(h) as Box<dyn fmt::Display>)
    }

    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        self.diagnostic
            .span
            .and(self.diagnostic.file.as_ref())
            .map(|file| &file.source as &dyn miette::SourceCode)
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        let file = self.diagnostic.file.as_ref()?;
        let span = self.diagnostic.span?;
        let mut labels = vec![LabeledSpan::new_primary_with_span(
            self.diagnostic.label.clone(),
            SourceSpan::from(file.clamp(span)),
        )];
        labels.extend(self.diagnostic.related.iter().map(|related| {
            LabeledSpan::new_with_span(
                Some(related.label.clone()),
                SourceSpan::from(file.clamp(related.span)),
            )
        }));
        Some(Box::new(labels.into_iter()))
    }
}

/// Counts for the closing summary line.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Summary {
    pub errors: usize,
    pub warnings: usize,
}

impl Summary {
    pub fn of(diagnostics: &[Diagnostic]) -> Self {
        let mut summary = Self::default();
        for diagnostic in diagnostics {
            match diagnostic.level {
                Level::Error => summary.errors += 1,
                Level::Warning => summary.warnings += 1,
                Level::Help => {}
            }
        }
        summary
    }
}

/// Pick the candidate closest to `wrong`, if it is close enough to be a plausible typo.
pub fn did_you_mean<'a, I>(wrong: &str, candidates: I) -> Option<&'a str>
where
    I: IntoIterator<Item = &'a str>,
{
    let wrong_lower = wrong.to_ascii_lowercase();
    candidates
        .into_iter()
        .map(|candidate| {
            let distance =
                strsim::damerau_levenshtein(&wrong_lower, &candidate.to_ascii_lowercase());
            (distance, candidate)
        })
        .filter(|(distance, candidate)| {
            // Allow about one edit per three characters: catches typos, rejects unrelated words.
            let longest = wrong.chars().count().max(candidate.chars().count());
            *distance <= (longest / 3).max(1)
        })
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn did_you_mean_catches_typos_and_rejects_strangers() {
        let nodes = ["packages", "remove", "copy", "hostname", "kernel-cmdline"];
        assert_eq!(did_you_mean("pakages", nodes), Some("packages"));
        assert_eq!(did_you_mean("hostnam", nodes), Some("hostname"));
        assert_eq!(did_you_mean("Copy", nodes), Some("copy"));
        assert_eq!(did_you_mean("kernel-cmdlin", nodes), Some("kernel-cmdline"));
        assert_eq!(did_you_mean("zzzzzz", nodes), None);
        assert_eq!(did_you_mean("x", nodes), None);
    }

    #[test]
    fn spans_are_clamped_to_character_boundaries() {
        let file = SourceFile::new(Path::new("a.kdl"), "a.kdl".into(), "é\nxyz".into());
        assert_eq!(
            file.clamp(Span { offset: 1, len: 1 }),
            Span { offset: 0, len: 2 }
        );
        assert_eq!(
            file.clamp(Span { offset: 99, len: 5 }),
            Span { offset: 6, len: 0 }
        );
        assert_eq!(file.line_column(3), (2, 1));
        assert_eq!(file.line_column(5), (2, 3));
    }
}
