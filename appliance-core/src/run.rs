//! `cargo appliance run`: the test drive. Boots a disk output under QEMU with UEFI firmware
//! (OVMF), the serial console on the terminal and the manifest's `forward` ports on loopback.
//! KVM when `/dev/kvm` is usable; when KVM fails under the firmware (it does on some hosts:
//! "KVM internal error … emulation failure"), the VM is restarted under TCG. The disk is
//! opened with `-snapshot`: a test drive never changes the build's output (`run --capture`
//! boots a copy of it instead, kept for `capture`).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::manifest::model::{Forward, Protocol};

/// Firmware pairs (code, variables template), newest layout first.
const FIRMWARE: &[(&str, &str)] = &[
    (
        "/usr/share/OVMF/OVMF_CODE_4M.fd",
        "/usr/share/OVMF/OVMF_VARS_4M.fd",
    ),
    (
        "/usr/share/OVMF/OVMF_CODE.fd",
        "/usr/share/OVMF/OVMF_VARS.fd",
    ),
];

/// What stderr says when KVM cannot run the firmware.
const KVM_FAILURES: &[&str] = &[
    "KVM internal error",
    "emulation failure",
    "failed to initialize kvm",
    "Could not access KVM kernel module",
];

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub disk: PathBuf,
    /// `raw` or `qcow2`.
    pub format: String,
    pub forwards: Vec<Forward>,
    pub kvm: bool,
    pub timeout: Option<Duration>,
    pub memory_mib: u32,
    /// Where the serial console is written as well (the terminal gets it too).
    pub serial_log: Option<PathBuf>,
    /// Give QEMU our stdin (the console's keyboard); without a terminal, nothing.
    pub interactive: bool,
    /// SSH into the test drive: a forwarded port and a key for root.
    pub ssh: Option<TestDriveSsh>,
    /// Open the disk with `-snapshot` (writes go to a temporary file QEMU deletes); off for
    /// `run --capture`, whose disk is a copy kept for `capture`.
    pub snapshot: bool,
}

/// What `cargo appliance ssh` needs of a running test drive: root's test-drive key goes in as
/// a systemd credential (`ssh.authorized_keys.root`, which systemd's tmpfiles provision.conf
/// writes to /root/.ssh/authorized_keys at boot unless the image has one), so neither the
/// image nor the disk output changes; port 22 is forwarded to `port` on loopback.
#[derive(Debug, Clone)]
pub struct TestDriveSsh {
    pub port: u16,
    /// One OpenSSH public key line.
    pub public_key: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

#[derive(Debug)]
pub struct RunOutcome {
    pub accel: Accel,
    /// The VM powered off (rather than the timeout ending it).
    pub powered_off: bool,
    pub exit_code: Option<i32>,
}

fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// What booting needs on the host (QEMU and the UEFI firmware), checked before the build
/// that precedes a boot, so a missing QEMU does not cost a build first.
pub fn preflight() -> anyhow::Result<()> {
    if let Some(missing) = crate::process::host::describe_missing(crate::process::host::Need::Boot)
    {
        bail!(
            "booting needs {missing}, which is not on PATH (`.ci/install-deps` installs everything cargo-appliance uses)"
        );
    }
    firmware().map(drop)
}

fn firmware() -> anyhow::Result<(PathBuf, PathBuf)> {
    FIRMWARE
        .iter()
        .map(|(code, vars)| (PathBuf::from(code), PathBuf::from(vars)))
        .find(|(code, vars)| code.is_file() && vars.is_file())
        .context("no OVMF firmware in /usr/share/OVMF (Debian package ovmf; `.ci/install-deps` installs it)")
}

/// A path as the value of a QEMU `key=value,…` option: a comma ends the value unless it is
/// doubled, so `/tmp/a,b/disk.raw` would otherwise open `/tmp/a` with an option `b/disk.raw`.
fn qemu_option_value(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

fn qemu_command(options: &RunOptions, accel: Accel, vars: &Path, code: &Path) -> Command {
    let mut command = crate::process::dies_with_us("qemu-system-x86_64");
    command.args(["-machine", "q35", "-nographic", "-no-reboot"]);
    if options.snapshot {
        command.arg("-snapshot");
    }
    command.args(["-m", &options.memory_mib.to_string(), "-smp", "2"]);
    match accel {
        Accel::Kvm => command.args(["-accel", "kvm", "-cpu", "host"]),
        Accel::Tcg => command.args(["-accel", "tcg", "-cpu", "max"]),
    };
    command
        .arg("-drive")
        .arg(format!(
            "if=pflash,format=raw,unit=0,readonly=on,file={}",
            qemu_option_value(code)
        ))
        .arg("-drive")
        .arg(format!(
            "if=pflash,format=raw,unit=1,file={}",
            qemu_option_value(vars)
        ))
        .arg("-drive")
        .arg(format!(
            "if=virtio,format={},file={}",
            options.format,
            qemu_option_value(&options.disk)
        ));
    let mut netdev = "user,id=net0".to_owned();
    for forward in &options.forwards {
        let protocol = match forward.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        };
        netdev.push_str(&format!(
            ",hostfwd={protocol}:127.0.0.1:{}-:{}",
            forward.host, forward.guest
        ));
    }
    if let Some(ssh) = &options.ssh {
        if !options.forwards.iter().any(|f| f.guest == 22) {
            netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{}-:22", ssh.port));
        }
        use base64::Engine as _;
        let key = base64::engine::general_purpose::STANDARD.encode(format!("{}\n", ssh.public_key));
        command.arg("-smbios").arg(format!(
            "type=11,value=io.systemd.credential.binary:ssh.authorized_keys.root={key}"
        ));
    }
    command
        .args(["-netdev", &netdev])
        .args(["-device", "virtio-net-pci,netdev=net0"]);
    command
}

enum Event {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
}

fn pump(mut reader: impl Read + Send + 'static, sender: mpsc::Sender<Event>, is_stdout: bool) {
    std::thread::spawn(move || {
        let mut buffer = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buffer) {
            if n == 0 {
                break;
            }
            let chunk = buffer[..n].to_vec();
            let event = if is_stdout {
                Event::Stdout(chunk)
            } else {
                Event::Stderr(chunk)
            };
            if sender.send(event).is_err() {
                break;
            }
        }
    });
}

enum Attempt {
    Finished(RunOutcome),
    KvmFailed(String),
}

fn attempt(
    options: &RunOptions,
    accel: Accel,
    deadline: Option<Instant>,
) -> anyhow::Result<Attempt> {
    let (code, vars_template) = firmware()?;
    let vars = tempfile::NamedTempFile::new()?;
    fs_err::copy(&vars_template, vars.path())?;
    let mut serial_log = match &options.serial_log {
        Some(path) => Some(
            fs_err::File::create(path)
                .with_context(|| format!("creating the serial log {}", path.display()))?,
        ),
        None => None,
    };
    let mut child: Child = qemu_command(options, accel, vars.path(), &code)
        .stdin(if options.interactive {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64 (Debian package qemu-system-x86)")?;
    let (sender, receiver) = mpsc::channel();
    pump(
        child.stdout.take().context("qemu stdout")?,
        sender.clone(),
        true,
    );
    pump(child.stderr.take().context("qemu stderr")?, sender, false);
    let mut stderr_text = String::new();
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    loop {
        match receiver.recv_timeout(Duration::from_millis(200)) {
            Ok(Event::Stdout(chunk)) => {
                let _ = stdout.write_all(&chunk);
                let _ = stdout.flush();
                if let Some(log) = serial_log.as_mut() {
                    let _ = log.write_all(&chunk);
                }
            }
            Ok(Event::Stderr(chunk)) => {
                let text = String::from_utf8_lossy(&chunk);
                stderr_text.push_str(&text);
                if accel == Accel::Kvm && KVM_FAILURES.iter().any(|m| stderr_text.contains(m)) {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Ok(Attempt::KvmFailed(stderr_text));
                }
                let _ = stderr.write_all(&chunk);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait()?;
                if accel == Accel::Kvm && !status.success() {
                    return Ok(Attempt::KvmFailed(stderr_text));
                }
                return Ok(Attempt::Finished(RunOutcome {
                    accel,
                    powered_off: true,
                    exit_code: status.code(),
                }));
            }
        }
        if let Some(status) = child.try_wait()? {
            // Drain what is left, then report.
            while let Ok(event) = receiver.recv_timeout(Duration::from_millis(50)) {
                if let Event::Stdout(chunk) = event {
                    let _ = stdout.write_all(&chunk);
                    if let Some(log) = serial_log.as_mut() {
                        let _ = log.write_all(&chunk);
                    }
                }
            }
            // Under KVM, QEMU dying (rather than the guest powering off) is KVM failing.
            if accel == Accel::Kvm
                && (!status.success() || KVM_FAILURES.iter().any(|m| stderr_text.contains(m)))
            {
                return Ok(Attempt::KvmFailed(stderr_text));
            }
            return Ok(Attempt::Finished(RunOutcome {
                accel,
                powered_off: true,
                exit_code: status.code(),
            }));
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(Attempt::Finished(RunOutcome {
                accel,
                powered_off: false,
                exit_code: None,
            }));
        }
    }
}

/// Boot the disk; returns when the VM powers off or the timeout ends it.
pub fn run(options: &RunOptions, mut note: impl FnMut(&str)) -> anyhow::Result<RunOutcome> {
    preflight()?;
    let deadline = options.timeout.map(|t| Instant::now() + t);
    let mut accel = if options.kvm && kvm_usable() {
        Accel::Kvm
    } else {
        Accel::Tcg
    };
    loop {
        note(&format!(
            "booting {} under {}",
            options.disk.display(),
            match accel {
                Accel::Kvm => "KVM",
                Accel::Tcg => "TCG (no KVM: slower)",
            }
        ));
        match attempt(options, accel, deadline)? {
            Attempt::Finished(outcome) => return Ok(outcome),
            Attempt::KvmFailed(why) if accel == Accel::Kvm => {
                let first = why
                    .lines()
                    .find(|l| KVM_FAILURES.iter().any(|m| l.contains(m)));
                note(&format!(
                    "KVM failed ({}); restarting under TCG",
                    first.unwrap_or("unknown error").trim()
                ));
                accel = Accel::Tcg;
            }
            Attempt::KvmFailed(why) => bail!("qemu failed: {why}"),
        }
    }
}

/// Where a running test drive says how to reach it: `target/appliance/NAME/testdrive/`.
pub fn test_drive_dir(target_dir: &Path, appliance: &str) -> PathBuf {
    target_dir
        .join("appliance")
        .join(appliance)
        .join("testdrive")
}

/// `testdrive/ssh.json`: written when a test drive with SSH starts, removed when it ends.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TestDriveState {
    pub port: u16,
    pub key: PathBuf,
    /// The `cargo appliance run` that owns the VM.
    pub pid: u32,
}

/// The test drive's key pair in `dir` (`id_ed25519`, `.pub`), made by ssh-keygen once and
/// kept: a test drive's key is a throwaway that never leaves the target directory.
pub fn test_drive_key(dir: &Path) -> anyhow::Result<(PathBuf, String)> {
    let key = dir.join("id_ed25519");
    let public = dir.join("id_ed25519.pub");
    if !(key.is_file() && public.is_file()) {
        fs_err::create_dir_all(dir)?;
        let _ = std::fs::remove_file(&key);
        let _ = std::fs::remove_file(&public);
        crate::process::Cmd::new("ssh-keygen")
            .args([
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "cargo-appliance-test-drive",
                "-f",
            ])
            .arg(&key)
            .output()
            .context("making the test drive's SSH key")?;
    }
    let line = fs_err::read_to_string(&public)?.trim().to_owned();
    Ok((key, line))
}

/// A free TCP port on loopback, for the test drive's SSH.
pub fn free_loopback_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    Ok(listener.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_with_commas_reach_qemu_doubled() {
        let options = RunOptions {
            disk: PathBuf::from("/work/a,b/web.qcow2"),
            format: "qcow2".into(),
            forwards: Vec::new(),
            kvm: false,
            timeout: None,
            memory_mib: 512,
            serial_log: None,
            interactive: false,
            snapshot: true,
            ssh: Some(TestDriveSsh {
                port: 2222,
                public_key: "ssh-ed25519 AAAA test".into(),
            }),
        };
        let command = qemu_command(
            &options,
            Accel::Tcg,
            Path::new("/tmp/x,vars.fd"),
            Path::new("/usr/share/OVMF/OVMF_CODE.fd"),
        );
        let args: Vec<String> = command
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(
            args.contains(&"if=virtio,format=qcow2,file=/work/a,,b/web.qcow2".to_owned()),
            "{args:?}"
        );
        assert!(
            args.contains(&"if=pflash,format=raw,unit=1,file=/tmp/x,,vars.fd".to_owned()),
            "{args:?}"
        );
        // The test drive's SSH: a forwarded port, and root's key as a credential.
        assert!(
            args.contains(&"user,id=net0,hostfwd=tcp:127.0.0.1:2222-:22".to_owned()),
            "{args:?}"
        );
        assert!(
            args.contains(&"type=11,value=io.systemd.credential.binary:ssh.authorized_keys.root=c3NoLWVkMjU1MTkgQUFBQSB0ZXN0Cg==".to_owned()),
            "{args:?}"
        );
    }
}
