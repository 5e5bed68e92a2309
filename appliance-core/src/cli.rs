//! The command line: clap definitions and the dispatch from commands to library calls.
//!
//! Lives in the library so that `--help` text and docs can be generated from it; the binary
//! only calls [`main`]. Exit codes follow cargo: 0 success (warnings allowed), 1 failure,
//! 2 usage error (clap's own).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::check::{CheckOptions, CheckSummary, check};
use crate::diagnostics::{Diagnostic, Summary};

#[derive(Debug, Parser)]
#[command(
    name = "cargo-appliance",
    bin_name = "cargo appliance",
    version,
    about = "Build virtual appliances (VM disks, OCI images, rootfs archives) from KDL manifests in a Cargo workspace",
    long_about = "Build virtual appliances from `appliance.kdl` manifests kept next to the code of a \
                  Rust workspace.\n\nManifests are KDL v2 files named `appliance.kdl` or \
                  `*.appliance.kdl`; see schema/reference.md for the language.",
    after_help = "Exit status: 0 success (warnings allowed), 1 errors found, 2 usage error."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    #[command(flatten)]
    pub global: GlobalArgs,
}

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Path to the workspace's Cargo.toml, or to one appliance manifest to check alone
    #[arg(long, global = true, value_name = "PATH")]
    pub manifest_path: Option<PathBuf>,

    /// How diagnostics are printed
    #[arg(long, global = true, value_enum, default_value_t = MessageFormat::Human)]
    pub message_format: MessageFormat,

    /// Coloring of human output
    #[arg(long, global = true, value_enum, default_value_t = ColorChoice::Auto)]
    pub color: ColorChoice,

    /// Print less (no progress, no summary)
    #[arg(short, long, global = true)]
    pub quiet: bool,

    /// Print more (repeat for even more)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MessageFormat {
    /// Compiler-style reports on stderr
    Human,
    /// One JSON object per line on stdout
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ColorChoice {
    Auto,
    Always,
    Never,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate manifests and what they name in the workspace, without building
    Check(CheckArgs),
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Check only this appliance (and those it derives from); repeatable
    #[arg(short = 'a', long = "appliance", value_name = "NAME")]
    pub appliances: Vec<String>,
}

/// Entry point for the binary: parse arguments, run, print, return the exit code.
pub fn main() -> ExitCode {
    // Cargo runs `cargo-appliance appliance <args>`; run directly, there is no `appliance`.
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|arg| arg == "appliance") {
        args.remove(1);
    }
    let cli = Cli::parse_from(args);
    run(&cli)
}

pub fn run(cli: &Cli) -> ExitCode {
    match &cli.command {
        Command::Check(args) => run_check(&cli.global, args),
    }
}

fn use_color(global: &GlobalArgs) -> bool {
    match global.color {
        ColorChoice::Always => true,
        ColorChoice::Never => false,
        ColorChoice::Auto => {
            std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()
        }
    }
}

/// Print diagnostics in the chosen format. Write errors (a closed pipe) are not worth a panic.
fn emit(global: &GlobalArgs, diagnostics: &[Diagnostic]) {
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

fn run_check(global: &GlobalArgs, args: &CheckArgs) -> ExitCode {
    let options = CheckOptions {
        manifest_path: global.manifest_path.clone(),
        appliances: args.appliances.clone(),
    };
    let report = match check(&options) {
        Ok(report) => report,
        Err(error) => {
            let mut diagnostic = Diagnostic::error("appliance::no-workspace", error.to_string());
            if let Some(source) = std::error::Error::source(&error) {
                diagnostic = diagnostic.help(source.to_string().trim().to_owned());
            }
            emit(global, std::slice::from_ref(&diagnostic));
            return ExitCode::FAILURE;
        }
    };
    emit(global, &report.diagnostics);
    let summary = Summary::of(&report.diagnostics);
    match global.message_format {
        MessageFormat::Json => {
            let finished = CheckSummary {
                reason: "check-finished",
                success: summary.errors == 0,
                errors: summary.errors,
                warnings: summary.warnings,
                appliances: &report.checked,
            };
            if let Ok(line) = serde_json::to_string(&finished) {
                let _ = writeln!(std::io::stdout().lock(), "{line}");
            }
        }
        MessageFormat::Human if !global.quiet => {
            let _ = writeln!(
                std::io::stderr().lock(),
                "{}",
                summary_line(&summary, report.checked.len())
            );
        }
        MessageFormat::Human => {}
    }
    if summary.errors > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn plural(count: usize, word: &str) -> String {
    if count == 1 {
        format!("1 {word}")
    } else {
        format!("{count} {word}s")
    }
}

fn summary_line(summary: &Summary, appliances: usize) -> String {
    let warnings = if summary.warnings > 0 {
        format!("; {} emitted", plural(summary.warnings, "warning"))
    } else {
        String::new()
    };
    if summary.errors > 0 {
        format!(
            "error: check failed with {}{warnings}",
            plural(summary.errors, "error")
        )
    } else {
        format!(
            "    Finished checking {}{warnings}",
            plural(appliances, "appliance")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
