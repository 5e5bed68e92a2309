//! The one place that runs external programs (`mmdebstrap`, later `apt`, `mke2fs`, `qemu`…).
//! A command is a value; a failure names the program, its arguments and the tail of its
//! stderr, so the user sees what ran and why it failed.

pub mod host;
pub mod interrupt;

use std::ffi::OsString;
use std::path::Path;
use std::process::{Command, Stdio};

/// A [`Command`] for `program` that the kernel kills (SIGKILL) when this process dies, by
/// SIGKILL, SIGTERM or Ctrl-C alike: `setpriv --pdeathsig KILL` sets the parent-death signal
/// and execs the program, which keeps it (the workspace forbids the `unsafe` a `pre_exec`
/// would need). The signal follows the thread that spawned the child, so spawn from the
/// thread that waits for it. With the sandbox's `unshare --pid --kill-child` behind it, the
/// whole PID namespace (a script that ignores SIGTERM as PID 1 included) goes too.
pub fn dies_with_us(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new("setpriv");
    command.args(["--pdeathsig", "KILL", "--"]).arg(program);
    command
}

/// [`dies_with_us`] for a program that needs no terminal, in a process group of its own:
/// [`interrupt`] stops it with everything it started (cargo's rustc, mmdebstrap's apt), and a
/// terminal's Ctrl-C reaches only this process, which then stops it. QEMU in the foreground
/// of a terminal is the one program not started this way.
pub fn background(program: impl AsRef<std::ffi::OsStr>) -> Command {
    use std::os::unix::process::CommandExt as _;
    let mut command = dies_with_us(program);
    command.process_group(0);
    command
}

/// Run a [`background`] command to completion with its output captured, watched by
/// [`interrupt`]: a signal stops it and the result is an [`interrupt::Interrupted`] error.
pub fn output_of(command: &mut Command) -> std::io::Result<std::process::Output> {
    wait_watched(command.stdout(Stdio::piped()).stderr(Stdio::piped()))
}

/// [`output_of`] with the caller's choice of stdio.
fn wait_watched(command: &mut Command) -> std::io::Result<std::process::Output> {
    let child = command.spawn()?;
    let watched = interrupt::watch(&child);
    let output = child.wait_with_output();
    drop(watched);
    interrupt::check().map_err(std::io::Error::other)?;
    output
}

/// Lines of stderr kept in an error.
const STDERR_TAIL_LINES: usize = 20;

#[derive(Debug, Clone)]
pub struct Cmd {
    program: OsString,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    /// Let stdout through to ours (a program's own progress bars on a terminal).
    show_stdout: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    #[error("could not run `{program}`: {source}{hint}")]
    Spawn {
        program: String,
        hint: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status})\n{stderr_tail}")]
    Failed {
        command: String,
        status: String,
        stderr_tail: String,
    },
}

impl Cmd {
    pub fn new(program: impl Into<OsString>) -> Self {
        Self {
            program: program.into(),
            args: Vec::new(),
            envs: Vec::new(),
            show_stdout: false,
        }
    }

    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.envs.push((key.into(), value.into()));
        self
    }

    /// Let the program's stdout through when `show` (stderr is still kept for errors).
    pub fn show_stdout(mut self, show: bool) -> Self {
        self.show_stdout = show;
        self
    }

    pub fn display(&self) -> String {
        std::iter::once(&self.program)
            .chain(&self.args)
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Run to completion; stdout is returned, stderr kept for the error.
    pub fn output(&self) -> Result<Vec<u8>, CmdError> {
        self.output_and_stderr().map(|(stdout, _)| stdout)
    }

    /// [`Cmd::output`] that also returns stderr, for programs that report trouble there
    /// while exiting 0 (debugfs).
    pub fn output_and_stderr(&self) -> Result<(Vec<u8>, Vec<u8>), CmdError> {
        // setpriv would start and then fail to exec a missing program: look it up first, so
        // that a missing program is reported as one.
        let name = self.program.to_string_lossy();
        if !name.contains('/') && !available(&name) {
            return Err(CmdError::Spawn {
                program: name.into_owned(),
                hint: " (not installed? `.ci/install-deps` installs what cargo-appliance needs)"
                    .into(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        let mut command = background(&self.program);
        command
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(if self.show_stdout {
                Stdio::inherit()
            } else {
                Stdio::piped()
            })
            .stderr(Stdio::piped());
        let output = wait_watched(&mut command).map_err(|source| CmdError::Spawn {
            program: self.program.to_string_lossy().into_owned(),
            hint: if source.kind() == std::io::ErrorKind::NotFound {
                " (not installed? `.ci/install-deps` installs what cargo-appliance needs)".into()
            } else {
                String::new()
            },
            source,
        })?;
        if output.status.success() {
            return Ok((output.stdout, output.stderr));
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        let lines: Vec<&str> = stderr.lines().collect();
        let tail = lines[lines.len().saturating_sub(STDERR_TAIL_LINES)..].join("\n");
        Err(CmdError::Failed {
            command: self.display(),
            status: output.status.to_string(),
            stderr_tail: tail,
        })
    }
}

/// Whether a program is on PATH.
pub fn available(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| is_executable(&dir.join(program)))
    })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_name_the_command_and_keep_stderr() {
        let error = Cmd::new("sh")
            .args(["-c", "echo first >&2; echo second >&2; exit 3"])
            .output()
            .expect_err("exits 3");
        let message = error.to_string();
        assert!(message.contains("`sh -c"), "{message}");
        assert!(message.contains("exit status: 3"), "{message}");
        assert!(message.ends_with("first\nsecond"), "{message}");
        let missing = Cmd::new("no-such-program-here")
            .output()
            .expect_err("missing");
        assert!(missing.to_string().contains("not installed?"));
    }
}
