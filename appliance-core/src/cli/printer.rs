//! Everything the commands print goes through here. A reader that goes away (`… | head -1`)
//! is not an error: as cargo and ripgrep do, the command stops writing and exits quietly
//! with success. Rust ignores SIGPIPE, so a write to a closed pipe returns `EPIPE`; the
//! `outln!` macro turns that into an error the command returns with `?`, and
//! [`is_closed_pipe`] tells `cli::run` to end without a word.

use std::fmt;
use std::io::{self, Write as _};

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
