//! Everything the commands print goes through here. A reader that goes away (`… | head -1`)
//! is not an error: as cargo and ripgrep do, the command stops writing and exits quietly
//! with success. Rust ignores SIGPIPE, so a write to a closed pipe returns `EPIPE`; the
//! `outln!` macro turns that into an error the command returns with `?`, and
//! [`is_closed_pipe`] tells `cli::run` to end without a word.

use std::fmt;
use std::io::{self, IsTerminal as _, Write as _};

use super::{ColorChoice, GlobalArgs, MessageFormat};
use crate::diagnostics::Diagnostic;

/// Write to stdout. Errors are returned, never a panic (as `print!` would).
pub(crate) fn write_stdout(args: fmt::Arguments<'_>) -> io::Result<()> {
    let mut stdout = io::stdout().lock();
    stdout.write_fmt(args)?;
    // Flushed per call so that a closed pipe is seen by the write that met it, not at exit.
    stdout.flush()
}

/// `println!` for command output, returning the write's error: `outln!("…", x)?`.
macro_rules! outln {
    () => {
        $crate::cli::printer::write_stdout(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::printer::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}
pub(crate) use outln;

/// One JSON value per line on stdout.
pub(crate) fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    let line = serde_json::to_string(value)?;
    outln!("{line}")?;
    Ok(())
}

/// Whether the error is stdout's reader having gone away (possibly wrapped in context).
pub(crate) fn is_closed_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
    })
}

/// A line on stderr for humans (status, notes). Stderr that cannot be written to has nobody
/// to tell, so its errors are dropped.
pub(crate) fn status_line(args: fmt::Arguments<'_>) {
    let _ = writeln!(io::stderr().lock(), "{args}");
}

/// Print an error with its chain of causes, cargo-style ("error: …", "caused by: …").
pub fn report_error(global: &GlobalArgs, error: &anyhow::Error) {
    // What failed because of a signal is reported once, as the interruption (`run`).
    if crate::process::interrupt::received().is_some() {
        return;
    }
    let help = crate::disk_space::is_full(error).then_some(crate::disk_space::FULL_HELP);
    match global.message_format {
        MessageFormat::Json => {
            let causes: Vec<String> = error.chain().skip(1).map(ToString::to_string).collect();
            let mut message = serde_json::json!({
                "reason": "error",
                "message": error.to_string(),
                "causes": causes,
            });
            if let Some(help) = help {
                message["help"] = help.into();
            }
            let _ = writeln!(std::io::stdout().lock(), "{message}");
        }
        MessageFormat::Human => {
            let mut stderr = std::io::stderr().lock();
            let _ = writeln!(stderr, "error: {error}");
            for cause in error.chain().skip(1) {
                let _ = writeln!(stderr, "  caused by: {cause}");
            }
            if let Some(help) = help {
                let _ = writeln!(stderr, "  help: {help}");
            }
        }
    }
}

pub(crate) fn use_color(global: &GlobalArgs) -> bool {
    match global.color {
        ColorChoice::Always => true,
        ColorChoice::Never => false,
        ColorChoice::Auto => {
            std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()
        }
    }
}

/// Print diagnostics in the chosen format. Write errors (a closed pipe) are not worth a panic.
pub(crate) fn emit(global: &GlobalArgs, diagnostics: &[Diagnostic]) {
    match global.message_format {
        MessageFormat::Human => {
            let color = use_color(global);
            let mut stderr = std::io::stderr().lock();
            for diagnostic in diagnostics {
                let _ = write!(stderr, "{}", diagnostic.render_human(color));
            }
        }
        MessageFormat::Json => {
            let mut stdout = std::io::stdout().lock();
            for diagnostic in diagnostics {
                if let Ok(line) = serde_json::to_string(&diagnostic.to_message()) {
                    let _ = writeln!(stdout, "{line}");
                }
            }
        }
    }
}

/// `capture`'s findings: each change with the node that says it, then what was left out. As
/// JSON, one line per change (`"reason": "capture-item"`) and a summary line.
pub(crate) fn print_capture(
    global: &GlobalArgs,
    capture: &crate::capture::Capture,
    skipped: &[String],
) -> anyhow::Result<()> {
    use crate::capture::Action;
    if global.message_format == MessageFormat::Json {
        for item in &capture.items {
            print_json(&serde_json::json!({
                "reason": "capture-item",
                "appliance": capture.appliance,
                "item": item,
            }))?;
        }
        print_json(&serde_json::json!({
            "reason": "capture-summary",
            "appliance": capture.appliance,
            "image": capture.image,
            "changes": capture.items.len(),
            "ignored": capture.ignored,
            "consequences": capture.consequences,
            "files": capture.files.iter().map(|f| &f.path).collect::<Vec<_>>(),
            "skipped": skipped,
        }))?;
        return Ok(());
    }
    if capture.items.is_empty() {
        outln!(
            "Nothing to capture: the test drive of `{}` matches {} apart from what is left out below.",
            capture.appliance,
            capture.image
        )?;
    } else {
        outln!(
            "{} in the test drive of `{}` (compared with {}):",
            super::plural(capture.items.len(), "change"),
            capture.appliance,
            capture.image
        )?;
    }
    let width = capture
        .items
        .iter()
        .map(|item| item.change.key().chars().count())
        .max()
        .unwrap_or(0)
        .min(48);
    for item in &capture.items {
        let key = item.change.key();
        let says = match &item.action {
            Action::Node(node) => format!("+ {node}"),
            Action::Unsay(what) => format!("- {what}"),
            Action::Workspace(file) => {
                format!("~ {file} (rewritten; its `copy` already puts it there)")
            }
            Action::Manual(why) => format!("by hand: {why}"),
        };
        outln!("  {key:<width$}  {says}")?;
    }
    let verbose = global.verbose > 0;
    for (title, list) in [
        ("left out as runtime noise", &capture.ignored),
        (
            "consequences the rebuild makes again",
            &capture.consequences,
        ),
    ] {
        if list.is_empty() {
            continue;
        }
        if verbose {
            outln!("{} {title}:", list.len())?;
            for (change, why) in list {
                outln!("  {}  ({why})", change.key())?;
            }
        } else {
            outln!("{} {title} (-v lists them)", list.len())?;
        }
    }
    for path in skipped {
        outln!("  not compared (its name is not UTF-8): {path}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_pipe_is_recognised_through_context() {
        let error = anyhow::Error::from(io::Error::from(io::ErrorKind::BrokenPipe))
            .context("printing the diff");
        assert!(is_closed_pipe(&error));
        let other = anyhow::Error::from(io::Error::from(io::ErrorKind::PermissionDenied));
        assert!(!is_closed_pipe(&other));
    }
}
