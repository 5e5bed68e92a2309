//! The command line: `args` (the clap types), one exhaustive dispatch here, `printer` (all
//! output, the closed-pipe rule, error rendering) and one file per command group:
//! `workspace` (check, suggest, build, update), `vm` (run, ssh), `store_commands` (images,
//! image, base, gc, fsck, diff, history, push, pull).
//!
//! Lives in the library so that `--help` text and docs can be generated from it; the binary
//! only calls [`main`]. Exit codes follow cargo: 0 success (warnings allowed), 1 failure,
//! 2 usage error (clap's own).

mod args;
pub(crate) mod printer;
pub mod store_commands;
mod vm;
mod workspace;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser as _;

pub use args::*;
pub use printer::report_error;
use store_commands::StoreCommand;

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
    use crate::process::interrupt;
    // `run` and `ssh` leave Ctrl-C to the program on the terminal (QEMU, ssh) and die with
    // the default handler.
    if !matches!(cli.command, Command::Run(_) | Command::Ssh(_))
        && let Err(error) = interrupt::install()
    {
        let _ = writeln!(
            std::io::stderr().lock(),
            "warning: cannot handle SIGINT/SIGTERM ({error}); an interrupted build leaves temporary files for `gc`"
        );
    }
    // Work that makes temporary state stops cleanly; anything else ends at once.
    let clean_stop = matches!(
        cli.command,
        Command::Build(_)
            | Command::Base(_)
            | Command::Image(ImageCommand::Import { .. } | ImageCommand::Export { .. })
            | Command::Push(_)
            | Command::Pull(_)
            | Command::History(HistoryArgs {
                command: Some(HistoryCommand::Push { .. } | HistoryCommand::Pull { .. })
            })
    )
    .then(interrupt::clean_stop);
    let code = run_command(cli);
    drop(clean_stop);
    if let Some(interrupted) = interrupt::received() {
        if !cli.global.quiet {
            let _ = writeln!(
                std::io::stderr().lock(),
                "error: {interrupted}: stopped; nothing half-done was stored and temporary files were removed"
            );
        }
        interrupted.die();
    }
    code
}

/// Every command to the function of its group: adding a command without a place to go is a
/// compile error, not a panic.
fn run_command(cli: &Cli) -> ExitCode {
    let global = &cli.global;
    let stored = |result: anyhow::Result<ExitCode>| match result {
        Ok(code) => code,
        // The reader went away (`… | head`): stop quietly, as cargo and ripgrep do.
        Err(error) if printer::is_closed_pipe(&error) => ExitCode::SUCCESS,
        Err(error) => {
            report_error(global, &error);
            ExitCode::FAILURE
        }
    };
    let store =
        |command: StoreCommand<'_>| stored(store_commands::run_store_command(global, command));
    match &cli.command {
        Command::Check(args) => workspace::run_check(global, args),
        Command::Suggest(args) => workspace::run_suggest(global, args),
        Command::Build(args) => workspace::run_build(global, args),
        Command::Update(args) => workspace::run_update(global, args),
        Command::Run(args) => vm::run_vm(global, args),
        Command::Ssh(args) => stored(vm::ssh(global, args)),
        Command::Capture(args) => stored(vm::capture(global, args)),
        Command::Images(args) => store(StoreCommand::Images(args)),
        Command::Image(command) => store(StoreCommand::Image(command)),
        Command::Base(command) => store(StoreCommand::Base(command)),
        Command::Gc => store(StoreCommand::Gc),
        Command::Fsck(args) => store(StoreCommand::Fsck(args)),
        Command::History(args) => store(StoreCommand::History(args)),
        Command::Push(args) => store(StoreCommand::Push(args)),
        Command::Pull(args) => store(StoreCommand::Pull(args)),
        Command::Diff { from, to } => store(StoreCommand::Diff { from, to }),
    }
}

pub(crate) fn plural(count: usize, word: &str) -> String {
    if count == 1 {
        format!("1 {word}")
    } else {
        format!("{count} {word}s")
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
