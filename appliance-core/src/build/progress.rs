//! What a build tells the user while it works: Cargo-style status lines on stderr, spinners
//! for long steps (apt, cargo, imports, outputs) when stderr is a terminal, nothing with `-q`.

use std::io::{IsTerminal as _, Write as _};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

#[derive(Debug, Clone)]
pub struct Reporter {
    quiet: bool,
    verbose: bool,
    spinners: bool,
}

impl Reporter {
    pub fn new(quiet: bool, verbose: bool) -> Self {
        Self {
            quiet,
            verbose,
            spinners: !quiet && std::io::stderr().is_terminal(),
        }
    }

    pub fn silent() -> Self {
        Self {
            quiet: true,
            verbose: false,
            spinners: false,
        }
    }

    /// Whether `-v` notes are shown.
    pub fn is_verbose(&self) -> bool {
        self.verbose && !self.quiet
    }

    /// `   Compiling what`, right-aligned verb as Cargo prints it.
    pub fn status(&self, verb: &str, what: &str) {
        if !self.quiet {
            let _ = writeln!(std::io::stderr().lock(), "{verb:>12} {what}");
        }
    }

    /// Only with `-v`: why the build did what it did.
    pub fn explain(&self, what: &str) {
        if self.verbose && !self.quiet {
            let _ = writeln!(std::io::stderr().lock(), "{:>12} {what}", "Note");
        }
    }

    pub fn warn(&self, what: &str) {
        if !self.quiet {
            let _ = writeln!(std::io::stderr().lock(), "warning: {what}");
        }
    }

    /// A spinner for a step of unknown length; hidden unless stderr is a terminal.
    pub fn spinner(&self, message: &str) -> ProgressBar {
        if !self.spinners {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new_spinner();
        if let Ok(style) = ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}") {
            bar.set_style(style);
        }
        bar.set_message(message.to_owned());
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    }
}
