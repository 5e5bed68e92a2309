//! The test drive: `run` boots an appliance's disk under QEMU, `ssh` logs in to it.

use std::process::ExitCode;

use anyhow::Context as _;

use super::printer::{emit, report_error};
use super::store_commands;
use super::workspace::check_or_report;
use super::*;
use crate::check::{CheckOptions, check};

pub(super) fn run_vm(global: &GlobalArgs, args: &RunArgs) -> ExitCode {
    match boot(global, args) {
        Ok(code) => code,
        Err(error) => {
            report_error(global, &error);
            ExitCode::FAILURE
        }
    }
}

/// The appliance a test-drive command means: `-a NAME`, or the only one with a disk output.
pub(super) fn test_drive_appliance(
    global: &GlobalArgs,
    chosen: Option<&String>,
) -> anyhow::Result<(crate::check::CheckReport, String)> {
    let all = check(&CheckOptions {
        manifest_path: global.manifest_path.clone(),
        appliances: Vec::new(),
    })?;
    let is_disk = crate::output::is_disk;
    let candidates: Vec<String> = all
        .appliances()
        .filter(|(_, a)| a.outputs.iter().any(|o| is_disk(&o.format.value)))
        .map(|(_, a)| a.name.value.clone())
        .collect();
    let name = match chosen {
        Some(name) => name.clone(),
        None => match candidates.as_slice() {
            [one] => one.clone(),
            [] => anyhow::bail!(
                "no appliance has a disk output (`output \"qcow2\"` or `output \"raw\"`)"
            ),
            several => anyhow::bail!(
                "several appliances have disk outputs ({}); pick one with -a",
                several.join(", ")
            ),
        },
    };
    if !candidates.contains(&name) {
        anyhow::bail!("appliance `{name}` has no disk output to boot (add `output \"qcow2\"`)");
    }
    Ok((all, name))
}

/// `cargo appliance ssh`: ssh(1) into the running test drive with its key and port; the
/// exit status is the remote command's (ssh's own 255 when it cannot connect).
pub(super) fn ssh(global: &GlobalArgs, args: &SshArgs) -> anyhow::Result<ExitCode> {
    use std::io::IsTerminal as _;
    if let Some(missing) = crate::process::host::describe_missing(crate::process::host::Need::Ssh) {
        anyhow::bail!("`cargo appliance ssh` needs {missing}");
    }
    let (report, name) = test_drive_appliance(global, args.appliance.as_ref())?;
    let dir = crate::run::test_drive_dir(&report.workspace.target_dir, &name);
    let state_path = dir.join("ssh.json");
    let not_running = || {
        anyhow::anyhow!(
            "no test drive of `{name}` is running; start one with `cargo appliance run -a {name}` (it can run in the background: its console goes to target/appliance/{name}/serial.log)"
        )
    };
    let state: crate::run::TestDriveState = match fs_err::read(&state_path) {
        Ok(data) => serde_json::from_slice(&data)
            .with_context(|| format!("{} is damaged", state_path.display()))?,
        Err(_) => return Err(not_running()),
    };
    if !std::path::Path::new(&format!("/proc/{}", state.pid)).exists() {
        return Err(not_running());
    }
    let mut command = crate::process::dies_with_us("ssh");
    command
        .arg("-i")
        .arg(&state.key)
        .args(["-p", &state.port.to_string()])
        // A test drive's host key changes with every build: nothing to remember or check.
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "ConnectTimeout=10",
        ]);
    if args.command.is_empty() && std::io::stdin().is_terminal() {
        command.arg("-t");
    }
    command
        .arg("--")
        .arg(format!("{}@127.0.0.1", args.user))
        .args(&args.command);
    let status = command
        .status()
        .context("running ssh (Debian package openssh-client)")?;
    use std::os::unix::process::ExitStatusExt as _;
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1);
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

pub(super) fn boot(global: &GlobalArgs, args: &RunArgs) -> anyhow::Result<ExitCode> {
    let (_all, name) = test_drive_appliance(global, args.appliance.as_ref())?;
    let is_disk = crate::output::is_disk;
    let options = CheckOptions {
        manifest_path: global.manifest_path.clone(),
        appliances: vec![name.clone()],
    };
    let Some(report) = check_or_report(global, &options) else {
        return Ok(ExitCode::FAILURE);
    };
    if report.has_errors() {
        emit(global, &report.diagnostics);
        return Ok(ExitCode::FAILURE);
    }
    crate::run::preflight()?;
    let store = store_commands::open_store(global)?;
    let reporter = crate::build::progress::Reporter::new(global.quiet, global.verbose > 0);
    let built = match crate::build::build(
        &report,
        &store,
        &crate::build::BuildOptions::default(),
        &reporter,
    ) {
        Ok(built) => built,
        Err(crate::build::BuildError::Diagnostics(diagnostics)) => {
            emit(global, &diagnostics);
            return Ok(ExitCode::FAILURE);
        }
        Err(crate::build::BuildError::Other(error)) => return Err(error),
    };
    let done = built
        .iter()
        .find(|b| b.appliance == name)
        .context("the appliance was not built")?;
    let disk = done
        .outputs
        .iter()
        .find(|path| {
            let extension = path
                .extension()
                .and_then(|e| e.to_str())
                .unwrap_or_default();
            match &args.format {
                Some(format) => extension == format,
                None => is_disk(extension),
            }
        })
        .with_context(|| {
            format!(
                "`{name}` has no {} output",
                args.format.as_deref().unwrap_or("disk")
            )
        })?;
    let appliance = report
        .appliances()
        .find(|(_, a)| a.name.value == name)
        .map(|(_, a)| a)
        .context("the appliance vanished")?;
    let format = disk
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("raw")
        .to_owned();
    // The test drive: its console in a log file as well, its SSH key and port for
    // `cargo appliance ssh` (never in the image or the output: see run::TestDriveSsh).
    use std::io::IsTerminal as _;
    let drive = crate::run::test_drive_dir(&report.workspace.target_dir, &name);
    fs_err::create_dir_all(&drive)?;
    let serial_log = drive.parent().map(|dir| dir.join("serial.log"));
    let ssh = if crate::process::host::missing(crate::process::host::Need::Ssh).is_empty() {
        let (key, public_key) = crate::run::test_drive_key(&drive)?;
        let port = appliance
            .forwards
            .iter()
            .find(|f| f.guest == 22)
            .map(|f| f.host)
            .map_or_else(crate::run::free_loopback_port, Ok)?;
        let state = crate::run::TestDriveState {
            port,
            key,
            pid: std::process::id(),
        };
        crate::json_file::write_atomically(&drive.join("ssh.json"), &state)?;
        Some(crate::run::TestDriveSsh { port, public_key })
    } else {
        reporter.status(
            "Note",
            "ssh-keygen (openssh-client) is missing: no SSH into this test drive",
        );
        None
    };
    if let Some(ssh) = &ssh {
        reporter.status(
            "SSH",
            &format!(
                "`cargo appliance ssh -a {name}` logs in as root (port {} on 127.0.0.1)",
                ssh.port
            ),
        );
    }
    let outcome = crate::run::run(
        &crate::run::RunOptions {
            disk: disk.clone(),
            format,
            forwards: appliance.forwards.clone(),
            kvm: !args.no_kvm,
            timeout: args.timeout.map(std::time::Duration::from_secs),
            memory_mib: args.memory,
            serial_log,
            interactive: std::io::stdin().is_terminal(),
            ssh,
        },
        |note| reporter.status("Running", note),
    );
    let _ = std::fs::remove_file(drive.join("ssh.json"));
    let outcome = outcome?;
    if !outcome.powered_off {
        reporter.status("Stopped", "the timeout ended the VM");
        return Ok(ExitCode::SUCCESS);
    }
    match outcome.exit_code {
        Some(0) => {
            reporter.status("Finished", "the VM powered off");
            Ok(ExitCode::SUCCESS)
        }
        code => anyhow::bail!("qemu exited with {code:?}"),
    }
}
