//! Issue 18, test drive and back, as a user meets it: the demo's `web` appliance with an admin
//! user and an SSH key is built, booted with `run --capture` in the background (TCG here, KVM
//! where it works), changed over `cargo appliance ssh` (a package installed from a `.deb`, a
//! config file edited, a file under /srv, a user, an enabled unit), powered off, and
//! `capture --apply` takes exactly those five changes into the manifest and the workspace. The
//! rebuilt image holds them, and capturing the same disk against it finds nothing left but
//! the noise list. Its own test binary: one VM at a time, beside no other build. Needs root
//! (the package step's chroot), as the README says.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod support;
use support::{binary, is_root};

struct Drive {
    workspace: PathBuf,
    store: PathBuf,
    target: PathBuf,
}

impl Drive {
    fn command(&self, args: &[&str]) -> Command {
        let mut command = binary();
        command
            .current_dir(&self.workspace)
            .arg("--store")
            .arg(&self.store)
            .args(args)
            .env("CARGO_TARGET_DIR", &self.target);
        command
    }

    fn ok(&self, args: &[&str]) -> (String, String) {
        let output = self.command(args).output().expect("the binary runs");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        );
        assert!(
            output.status.success(),
            "{args:?} failed:\n{stdout}{stderr}"
        );
        (stdout, stderr)
    }

    /// `cargo appliance ssh -a web -- WORDS`, stdin from `input` (or nothing).
    fn ssh(&self, words: &[&str], input: Option<&Path>) -> Output {
        let mut command = self.command(&["ssh", "-a", "web", "--"]);
        command.args(words).stdin(match input {
            Some(path) => Stdio::from(std::fs::File::open(path).expect("input")),
            None => Stdio::null(),
        });
        command.output().expect("ssh runs")
    }

    /// A command in the guest that must succeed.
    fn guest(&self, script: &str) {
        let output = self.ssh(
            &["sh", "-ec", &format!("'{}'", script.replace('\'', r"'\''"))],
            None,
        );
        assert!(
            output.status.success(),
            "{script} failed in the test drive:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// The `.deb` of a small package the image lacks, from the host's Debian mirror.
fn download_deb(package: &str, dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).expect("mkdir");
    let output = Command::new("apt-get")
        .args(["download", package])
        .current_dir(dir)
        .output()
        .expect("apt-get runs");
    assert!(
        output.status.success(),
        "apt-get download {package} (the host's apt lists come from `.ci/install-deps`): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::read_dir(dir)
        .expect("readdir")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("a .deb")
}

fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).expect("read");
    assert!(text.contains(from), "{from:?} not in {}", path.display());
    std::fs::write(path, text.replacen(from, to, 1)).expect("write");
}

fn capture_summary(drive: &Drive) -> (Vec<serde_json::Value>, serde_json::Value) {
    let (stdout, _) = drive.ok(&["capture", "-a", "web", "--message-format", "json"]);
    let mut lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).expect("json"))
        .collect();
    let summary = lines.pop().expect("a summary line");
    assert_eq!(summary["reason"], "capture-summary", "{stdout}");
    (lines, summary)
}

#[test]
fn a_test_drive_is_changed_over_ssh_and_captured_back_into_the_manifest() {
    if !is_root() {
        panic!("the test drive test needs root for the package step's chroot (see README)");
    }
    let work = tempfile::tempdir().expect("temp dir");
    let workspace = work.path().join("demo");
    let status = Command::new("cp")
        .arg("-a")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/demo"))
        .arg(&workspace)
        .status()
        .expect("cp");
    assert!(status.success());
    let _ = std::fs::remove_dir_all(workspace.join("target"));
    let _ = std::fs::remove_file(workspace.join("Appliance.lock"));
    let drive = Drive {
        workspace: workspace.clone(),
        store: work.path().join("store"),
        target: work.path().join("target"),
    };
    let tarball = support::minbase_tarball();
    drive.ok(&[
        "image",
        "import",
        "debian/bookworm",
        tarball.to_str().expect("utf-8"),
    ]);
    // An admin who logs in with a key of their own; only the disk output, and a free port
    // for the forwarded HTTP one.
    let admin_key = work.path().join("admin");
    let keygen = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "admin@laptop", "-f"])
        .arg(&admin_key)
        .status()
        .expect("ssh-keygen");
    assert!(keygen.success());
    let public = std::fs::read_to_string(admin_key.with_extension("pub")).expect("key");
    let manifest = workspace.join("appliance.kdl");
    edit(
        &manifest,
        "    user \"api\" system=#true home=\"/var/lib/api\"\n",
        &format!(
            "    user \"api\" system=#true home=\"/var/lib/api\"\n    user \"admin\" groups=\"sudo\" {{\n        ssh-key \"{}\"\n    }}\n",
            public.trim()
        ),
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    edit(
        &manifest,
        "forward host=8080 guest=80",
        &format!("forward host={port} guest=80"),
    );
    edit(
        &manifest,
        "    output \"oci\" tag=\"web:latest\"\n    output \"tar\"\n",
        "",
    );
    drive.ok(&["build", "-a", "web"]);
    let output_disk = drive.target.join("appliance/web/web.qcow2");
    // Length and modification time: a write by the VM would change the time (reading the
    // whole disk twice to hash it would cost more than the rest of the check).
    let output_stamp = |path: &Path| {
        let metadata = std::fs::metadata(path).expect("the disk output");
        (metadata.len(), metadata.modified().expect("mtime"))
    };
    let output_before = output_stamp(&output_disk);

    // Boot it in the background on a writable copy.
    use std::os::unix::process::CommandExt as _;
    let mut vm = drive
        .command(&["run", "-a", "web", "--capture", "--timeout", "900"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("run starts");
    let group = vm.id();
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut reachable = false;
    while Instant::now() < deadline {
        if drive.ssh(&["true"], None).status.success() {
            reachable = true;
            break;
        }
        if let Ok(Some(status)) = vm.try_wait() {
            panic!("the VM ended before SSH answered: {status}");
        }
        std::thread::sleep(Duration::from_secs(3));
    }
    let kill_vm = || {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{group}")])
            .status();
    };
    if !reachable {
        kill_vm();
        let serial = std::fs::read_to_string(drive.target.join("appliance/web/serial.log"))
            .unwrap_or_default();
        panic!("SSH never answered; console:\n{serial}");
    }
    // SSH answered: sshd had host keys, made at this first boot (the image has none).
    drive.guest("test -s /etc/ssh/ssh_host_ed25519_key && test -s /etc/ssh/ssh_host_rsa_key");
    // The five changes, made as a user would.
    let deb = download_deb("tree", &work.path().join("debs"));
    let copied = drive.ssh(&["cat", ">", "/tmp/tree.deb"], Some(&deb));
    assert!(
        copied.status.success(),
        "{}",
        String::from_utf8_lossy(&copied.stderr)
    );
    drive.guest("dpkg -i /tmp/tree.deb && rm /tmp/tree.deb");
    drive.guest("echo '# tuned in the test drive' >> /etc/nginx/nginx.conf");
    drive.guest("echo 'notes from the test drive' > /srv/notes.txt");
    drive.guest("useradd -m -s /bin/bash alice");
    drive.guest("systemctl enable systemd-time-wait-sync.service");
    // `capture` refuses while the VM runs: its disk is still being written.
    let early = drive
        .command(&["capture", "-a", "web"])
        .output()
        .expect("capture");
    assert!(!early.status.success());
    assert!(
        String::from_utf8_lossy(&early.stderr).contains("is still running; power it off first"),
        "{}",
        String::from_utf8_lossy(&early.stderr)
    );
    let _ = drive.ssh(&["systemctl", "poweroff"], None);
    let deadline = Instant::now() + Duration::from_secs(300);
    let powered_off = loop {
        if let Ok(Some(status)) = vm.try_wait() {
            break status.success();
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    kill_vm();
    let _ = vm.wait();
    assert!(powered_off, "the VM powers off from inside and `run` ends");
    // The output was never written by the test drive.
    assert_eq!(output_stamp(&output_disk), output_before);

    // What capture finds: exactly the five changes, each with its node.
    let (items, summary) = capture_summary(&drive);
    let said: Vec<String> = items
        .iter()
        .map(|line| {
            let item = &line["item"];
            format!(
                "{}:{} {} {}",
                item["kind"].as_str().unwrap_or_default(),
                item["subject"].as_str().unwrap_or_default(),
                item["action"].as_str().unwrap_or_default(),
                item["text"].as_str().unwrap_or_default()
            )
        })
        .collect();
    assert_eq!(
        said,
        [
            "config-changed:/etc/nginx/nginx.conf workspace deploy/nginx.conf",
            "file-added:/srv/notes.txt node copy \"appliance/web/captured/srv/notes.txt\" to=\"/srv/notes.txt\" mode=0o644",
            "package-added:tree node packages \"tree\"",
            "service-enabled:systemd-time-wait-sync.service node service \"systemd-time-wait-sync.service\" enable=#true",
            "user-added:alice node user \"alice\"",
        ],
        "summary: {summary}"
    );
    // The disk output's fstab and the test drive's own key are noise; the account's own
    // group and its /etc/skel copies are consequences.
    let ignored = summary["ignored"].to_string();
    assert!(ignored.contains("\"/etc/fstab\""), "{ignored}");
    assert!(
        ignored.contains("\"/root/.ssh/authorized_keys\""),
        "{ignored}"
    );
    assert!(
        ignored.contains("\"/etc/ssh/ssh_host_ed25519_key\""),
        "the keys made at first boot are the machine's, not the image's: {ignored}"
    );
    let consequences = summary["consequences"].to_string();
    assert!(
        consequences.contains("\"/home/alice/.bashrc\""),
        "{consequences}"
    );
    assert!(
        consequences.contains("the user's own group"),
        "{consequences}"
    );

    let before = std::fs::read_to_string(&manifest).expect("manifest");
    drive.ok(&["capture", "-a", "web", "--apply"]);
    let after = std::fs::read_to_string(&manifest).expect("manifest");
    // The value joins the existing `packages` node, new nodes end the block; every other
    // byte of the manifest (comments, order, spacing) stays as it was written.
    let expected = before
        .replacen(
            "    packages \"nginx\" \"openssh-server\"\n",
            "    packages \"nginx\" \"openssh-server\" \"tree\"\n",
            1,
        )
        .replacen(
            "    output \"qcow2\" size=\"2G\"\n}",
            "    output \"qcow2\" size=\"2G\"\n    copy \"appliance/web/captured/srv/notes.txt\" to=\"/srv/notes.txt\" mode=0o644\n    service \"systemd-time-wait-sync.service\" enable=#true\n    user \"alice\"\n}",
            1,
        );
    assert_ne!(expected, before);
    assert_eq!(after, expected);
    assert_eq!(
        std::fs::read_to_string(workspace.join("appliance/web/captured/srv/notes.txt"))
            .expect("captured file"),
        "notes from the test drive\n"
    );
    assert!(
        std::fs::read_to_string(workspace.join("deploy/nginx.conf"))
            .expect("nginx.conf")
            .ends_with("# tuned in the test drive\n")
    );
    drive.ok(&["check"]);

    // The rebuild holds them, and the same disk against it leaves only the noise list.
    drive.ok(&["build", "-a", "web"]);
    let exported = work.path().join("rebuilt");
    drive.ok(&[
        "image",
        "export",
        "web",
        "-o",
        exported.to_str().expect("utf-8"),
    ]);
    assert!(exported.join("usr/bin/tree").is_file());
    assert_eq!(
        std::fs::read_to_string(exported.join("srv/notes.txt")).expect("notes"),
        "notes from the test drive\n"
    );
    assert!(
        std::fs::read_to_string(exported.join("etc/passwd"))
            .expect("passwd")
            .contains("\nalice:x:")
    );
    assert!(
        exported
            .join("etc/systemd/system/sysinit.target.wants/systemd-time-wait-sync.service")
            .symlink_metadata()
            .is_ok()
    );
    let (items, summary) = capture_summary(&drive);
    assert!(
        items.is_empty(),
        "left after the rebuild: {items:?}\n{summary}"
    );
    assert_eq!(summary["changes"], 0);
    // Captured, so the next `run --capture` starts from the rebuilt disk.
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(drive.target.join("appliance/web/testdrive/capture.json")).expect("state"),
    )
    .expect("json");
    assert_eq!(state["captured"], true);
}
