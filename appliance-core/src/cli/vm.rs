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

/// What a test-drive command built: the checked workspace, the appliance's image and the
/// disk output to boot.
struct TestDriveBuild {
    report: crate::check::CheckReport,
    name: String,
    image: crate::store::ImageRecord,
    disk: std::path::PathBuf,
    format: String,
    store: crate::store::Store,
    reporter: crate::build::progress::Reporter,
}

/// Check and build the appliance a test-drive command means (every step cached as in
/// `build`); `None` when diagnostics were printed instead.
fn build_for_test_drive(
    global: &GlobalArgs,
    name: String,
    format: Option<&str>,
) -> anyhow::Result<Option<TestDriveBuild>> {
    let is_disk = crate::output::is_disk;
    let options = CheckOptions {
        manifest_path: global.manifest_path.clone(),
        appliances: vec![name.clone()],
    };
    let Some(report) = check_or_report(global, &options) else {
        return Ok(None);
    };
    if report.has_errors() {
        emit(global, &report.diagnostics);
        return Ok(None);
    }
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
            return Ok(None);
        }
        Err(crate::build::BuildError::Other(error)) => return Err(error),
    };
    let done = built
        .into_iter()
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
            match format {
                Some(format) => extension == format,
                None => is_disk(extension),
            }
        })
        .with_context(|| format!("`{name}` has no {} output", format.unwrap_or("disk")))?
        .clone();
    let format = disk
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("raw")
        .to_owned();
    Ok(Some(TestDriveBuild {
        report,
        name,
        image: done.image,
        disk,
        format,
        store,
        reporter,
    }))
}

pub(super) fn boot(global: &GlobalArgs, args: &RunArgs) -> anyhow::Result<ExitCode> {
    crate::run::preflight()?;
    let Some(TestDriveBuild {
        report,
        name,
        image,
        disk,
        format,
        store: _store,
        reporter,
    }) = build_for_test_drive(
        global,
        test_drive_appliance(global, args.appliance.as_ref())?.1,
        args.format.as_deref(),
    )?
    else {
        return Ok(ExitCode::FAILURE);
    };
    let appliance = report
        .appliances()
        .find(|(_, a)| a.name.value == name)
        .map(|(_, a)| a)
        .context("the appliance vanished")?;
    // The test drive: its console in a log file as well, its SSH key and port for
    // `cargo appliance ssh` (never in the image or the output: see run::TestDriveSsh).
    use std::io::IsTerminal as _;
    let drive = crate::run::test_drive_dir(&report.workspace.target_dir, &name);
    fs_err::create_dir_all(&drive)?;
    // `--capture`: a writable copy of the disk that outlives the VM, for `capture`.
    let (disk, format, snapshot) = if args.capture {
        let (copy, prepared) = crate::capture::prepare_disk(&drive, &disk, &format, &image)?;
        reporter.status(
            "Capture",
            &match prepared {
                crate::capture::Prepared::Fresh => format!(
                    "booting a writable copy of the disk ({}); after power-off, `cargo appliance capture -a {name}` turns the changes into manifest edits",
                    copy.display()
                ),
                crate::capture::Prepared::Continued => format!(
                    "continuing the test drive in {} (made from the same image)",
                    copy.display()
                ),
            },
        );
        (copy, "raw".to_owned(), false)
    } else {
        (disk, format, true)
    };
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
            snapshot,
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

/// `cargo appliance capture`: the test drive's changes against the appliance's image as it
/// builds now, printed as the manifest edits that say them; `--apply` makes them.
pub(super) fn capture(global: &GlobalArgs, args: &CaptureArgs) -> anyhow::Result<ExitCode> {
    // Whether there is a stopped test drive to capture, before any build.
    let (all, name) = test_drive_appliance(global, args.appliance.as_ref())?;
    let drive = crate::run::test_drive_dir(&all.workspace.target_dir, &name);
    let disk_path = crate::capture::disk_path(&drive);
    if !disk_path.is_file() {
        anyhow::bail!(
            "`{name}` has no test drive to capture; boot one with `cargo appliance run --capture -a {name}`, change it, power it off, then capture"
        );
    }
    if let Ok(data) = fs_err::read(drive.join("ssh.json"))
        && let Ok(state) = serde_json::from_slice::<crate::run::TestDriveState>(&data)
        && std::path::Path::new(&format!("/proc/{}", state.pid)).exists()
    {
        anyhow::bail!(
            "the test drive of `{name}` is still running; power it off first (`cargo appliance ssh -a {name} -- systemctl poweroff`)"
        );
    }
    let Some(built) = build_for_test_drive(global, name, None)? else {
        return Ok(ExitCode::FAILURE);
    };
    let name = &built.name;
    let (manifest, appliance) = built
        .report
        .appliances()
        .find(|(_, a)| a.name.value == *name)
        .context("the appliance vanished")?;
    built.reporter.status(
        "Reading",
        &format!("the test drive's disk {}", disk_path.display()),
    );
    let disk = crate::capture::disk::read_root(&disk_path)?;
    let catalog = built.store.read_catalog()?;
    let packages = catalog.packages(built.image.id)?;
    let tree = built.store.tree(&built.image)?;
    let objects = built.store.objects();
    let read = |digest: &str| objects.read(digest);
    let captured = crate::capture::compare(
        &crate::capture::ImageSide {
            reference: built.image.reference(),
            tree: &tree,
            packages: &packages,
            read: &read,
        },
        &crate::store::diff::Side {
            tree: &disk.tree,
            packages: &disk.packages,
            read: &|digest: &str| disk.read(digest),
        },
        manifest,
        appliance,
    )?;
    drop(catalog);
    super::printer::print_capture(global, &captured, &disk.skipped)?;
    if args.apply && !captured.is_empty() {
        crate::capture::apply(&captured, manifest, &built.report.workspace.root)?;
        crate::capture::mark_captured(&drive)?;
        built.reporter.status(
            "Applied",
            &format!(
                "{} to {}; `cargo appliance build -a {name}` builds them",
                super::plural(captured.items.len(), "change"),
                manifest.source.display_name
            ),
        );
    } else if args.apply {
        crate::capture::mark_captured(&drive)?;
    } else if !captured.is_empty() {
        built.reporter.status(
            "Apply",
            &format!("with `cargo appliance capture -a {name} --apply`"),
        );
    }
    Ok(ExitCode::SUCCESS)
}
