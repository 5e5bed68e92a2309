//! Issue 15's kill harness on builds that do everything a build can do. Every round's build
//! materializes two cached trees with a cache of one (each evicts the other), runs apt for
//! two package steps (each round asks for another set of packages), runs a `run` script and
//! writes tar, OCI and qcow2 outputs (the disk updated from the previous one). The builds are
//! SIGKILLed at each fault point the code exposes on that way and then at seeded random
//! moments; after every kill `fsck` finds no damage, the history is what the images say
//! (none listed without its derivations), the next build succeeds by itself, and what it
//! stored and wrote holds that round's inputs: the packages, the copied file, the script's
//! output — the outputs being those of the newest stored images — and its images have the
//! tree digests an uninterrupted build of the round gives (`SOURCE_DATE_EPOCH` is set, so
//! the same inputs give the same trees) in a reference store: a copy of the store taken
//! before the first kill, that builds every round once, never killed.
//!
//! `APPLIANCE_KILLS` random kills (2 by default, for CI; 60 or more for a long run) and
//! `APPLIANCE_KILL_SEED` (printed) reproduce a schedule. Needs root (the sandbox).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod support;
use support::{binary, is_root, root_filesystem};

/// Small packages without many dependencies; round `r` installs those whose bit is set in
/// `r + 1`, so every round up to 62 asks apt for a set no earlier round had.
const ROTATED_PACKAGES: [&str; 6] = ["less", "tree", "bc", "ed", "lsof", "psmisc"];

fn packages_of(round: u32) -> Vec<&'static str> {
    let bits = (round % 63) + 1;
    ROTATED_PACKAGES
        .iter()
        .enumerate()
        .filter(|(bit, _)| bits & (1 << bit) != 0)
        .map(|(_, name)| *name)
        .collect()
}

fn manifest(round: u32) -> String {
    let packages: Vec<String> = packages_of(round)
        .iter()
        .map(|p| format!("\"{p}\""))
        .collect();
    let packages = packages.join(" ");
    // `bootable` is built once: the kernel's install is the same every round.
    format!(
        r#"appliance "bootable" {{
    base "debian/bookworm"
    packages "linux-image-cloud-amd64" "systemd-sysv" "systemd-boot-efi"
    output "tar"
}}

appliance "side" {{
    base "debian/bookworm"
    packages {packages}
    output "tar"
}}

appliance "stopped" {{
    base appliance="bootable"
    kernel "linux-image-cloud-amd64"
    packages {packages}
    user "api"
    copy "motd" to="/etc/motd"
    run "echo round {round} > /etc/round"
    output "tar"
    output "oci"
    output "qcow2" size="2G"
}}
"#
    )
}

fn motd(round: u32) -> String {
    format!("motd {round}\n")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Every build's `SOURCE_DATE_EPOCH`: a round's trees depend on its inputs only.
const EPOCH: &str = "1700000000";

struct Harness {
    work: tempfile::TempDir,
}

/// Where a store, its target directory and its workspace live: the harness' own, killed,
/// or the reference, built uninterrupted.
#[derive(Clone, Copy)]
enum Side {
    Killed,
    Reference,
}

impl Harness {
    fn new() -> Self {
        assert!(
            is_root(),
            "the kill harness needs root for the sandbox (see README)"
        );
        let harness = Self {
            work: tempfile::tempdir().expect("temp dir"),
        };
        let imported = harness
            .command(&["image", "import", "debian/bookworm"])
            .arg(support::minbase_tarball())
            .output()
            .expect("runs");
        assert!(imported.status.success(), "{}", text(&imported));
        let ws = harness.workspace();
        std::fs::create_dir_all(ws.join("src")).expect("mkdir");
        std::fs::write(
            ws.join("Cargo.toml"),
            "[package]\nname = \"tool\"\nversion = \"0.1.0\"\nedition = \"2021\"\n",
        )
        .expect("write");
        std::fs::write(ws.join("src/main.rs"), "fn main() {}\n").expect("write");
        harness
    }

    fn root(&self, side: Side) -> PathBuf {
        match side {
            Side::Killed => self.work.path().to_path_buf(),
            Side::Reference => self.work.path().join("reference"),
        }
    }

    fn workspace(&self) -> PathBuf {
        self.root(Side::Killed).join("ws")
    }

    fn outputs(&self, appliance: &str) -> PathBuf {
        self.work.path().join("target/appliance").join(appliance)
    }

    /// The binary on this harness' store and target directory, with a cache of one
    /// materialized tree: each package step's copy evicts the other's.
    fn command(&self, args: &[&str]) -> Command {
        self.command_on(Side::Killed, args)
    }

    fn command_on(&self, side: Side, args: &[&str]) -> Command {
        let root = self.root(side);
        let mut command = binary();
        command
            .current_dir(&root)
            .arg("--store")
            .arg(root.join("store"))
            .args(args)
            .env("CARGO_TARGET_DIR", root.join("target"))
            .env("APPLIANCE_CACHED_TREES", "1")
            .env("SOURCE_DATE_EPOCH", EPOCH);
        command
    }

    fn set_round(&self, round: u32) {
        for side in [Side::Killed, Side::Reference] {
            let ws = self.root(side).join("ws");
            if ws.is_dir() {
                std::fs::write(ws.join("appliance.kdl"), manifest(round)).expect("write");
                std::fs::write(ws.join("motd"), motd(round)).expect("write");
            }
        }
    }

    fn build(&self) -> Command {
        self.build_on(Side::Killed)
    }

    fn build_on(&self, side: Side) -> Command {
        let mut command = self.command_on(side, &["build", "--manifest-path"]);
        command.arg(self.root(side).join("ws/Cargo.toml"));
        command
    }

    /// The reference: a copy of the store and workspace as they are now (uninterrupted so
    /// far), without outputs.
    fn start_reference(&self) {
        let reference = self.root(Side::Reference);
        std::fs::create_dir_all(&reference).expect("mkdir");
        for what in ["store", "ws"] {
            let copied = Command::new("cp")
                .arg("-a")
                .arg(self.work.path().join(what))
                .arg(&reference)
                .output()
                .expect("cp runs");
            assert!(copied.status.success(), "{}", text(&copied));
        }
    }

    /// The round built uninterrupted in the reference store (with the lock the recovered
    /// build wrote, so both install the same versions) gives the images the same trees.
    fn equals_uninterrupted(&self, context: &str) {
        std::fs::copy(
            self.workspace().join("Appliance.lock"),
            self.root(Side::Reference).join("ws/Appliance.lock"),
        )
        .expect("copy the lock");
        let output = self.build_on(Side::Reference).output().expect("runs");
        assert!(
            output.status.success(),
            "{context}: the reference build: {}",
            text(&output)
        );
        for appliance in ["side", "stopped"] {
            let killed = self.newest_on(Side::Killed, appliance, context);
            let reference = self.newest_on(Side::Reference, appliance, context);
            assert_eq!(
                killed["tree_digest"], reference["tree_digest"],
                "{context}: {appliance}'s tree differs from an uninterrupted build's \
                 ({killed} and {reference})"
            );
        }
    }

    fn build_ok(&self, context: &str) -> String {
        let output = self.build().output().expect("runs");
        assert!(output.status.success(), "{context}: {}", text(&output));
        text(&output)
    }

    fn ok(&self, args: &[&str], context: &str) -> String {
        let output = self.command(args).output().expect("runs");
        assert!(
            output.status.success(),
            "{context}: {args:?}: {}",
            text(&output)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// The newest stored image of `appliance`, as `images --message-format json` lists it.
    fn newest(&self, appliance: &str, context: &str) -> serde_json::Value {
        self.newest_on(Side::Killed, appliance, context)
    }

    fn newest_on(&self, side: Side, appliance: &str, context: &str) -> serde_json::Value {
        let output = self
            .command_on(side, &["images", "--message-format", "json"])
            .output()
            .expect("runs");
        assert!(output.status.success(), "{context}: {}", text(&output));
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|i| i["name"] == appliance)
            .max_by_key(|i| i["version"].as_str().and_then(|v| v.parse::<u64>().ok()))
            .unwrap_or_else(|| panic!("{context}: no image of {appliance}"))
    }

    /// After a killed build: no damage, the history whole, the next build succeeds by
    /// itself, stores and writes this round's inputs, and its trees are an uninterrupted
    /// build's.
    fn recovers(&self, round: u32, context: &str) {
        let fsck = self.command(&["fsck"]).output().expect("fsck runs");
        assert!(fsck.status.success(), "{context}: {}", text(&fsck));
        self.build_ok(context);
        self.history_is_whole(context);
        self.holds_round(round, context);
        self.equals_uninterrupted(context);
    }

    /// Every stored image with a parent has its derivations in the history.
    fn history_is_whole(&self, context: &str) {
        let history = self.ok(&["history", "export", "-"], context);
        let children: std::collections::BTreeSet<String> = history
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|d| d["child"].as_str().map(str::to_owned))
            .collect();
        for image in self
            .ok(&["images", "--message-format", "json"], context)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|i| !i["parent"].is_null())
        {
            let reference = format!(
                "{}@{}",
                image["name"].as_str().unwrap_or_default(),
                image["version"].as_str().unwrap_or_default()
            );
            assert!(
                children.contains(&reference),
                "{context}: {reference} is listed without its derivations"
            );
        }
    }

    /// The newest images and every output hold `round`'s packages, file and script output.
    fn holds_round(&self, round: u32, context: &str) {
        let scratch = self.work.path().join("check");
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch).expect("mkdir");
        let tar_output =
            |appliance: &str| self.outputs(appliance).join(format!("{appliance}.tar.zst"));
        let [side_status] = <[String; 1]>::try_from(tar_files(
            &tar_output("side"),
            &["var/lib/dpkg/status"],
            &scratch,
        ))
        .expect("one file");
        let [status, motd_file, round_file, passwd] = <[String; 4]>::try_from(tar_files(
            &tar_output("stopped"),
            &["var/lib/dpkg/status", "etc/motd", "etc/round", "etc/passwd"],
            &scratch,
        ))
        .expect("four files");
        for (appliance, status) in [("side", &side_status), ("stopped", &status)] {
            for package in packages_of(round) {
                assert!(
                    status.contains(&format!("Package: {package}\nStatus: install ok installed")),
                    "{context}: {appliance} has {package} installed"
                );
            }
        }
        assert_eq!(motd_file, motd(round), "{context}");
        assert_eq!(
            round_file,
            format!("round {round}\n"),
            "{context}: the run script's output"
        );
        assert!(passwd.contains("\napi:"), "{context}: the user");
        // The OCI output claims the newest image and no other.
        let newest = self.newest("stopped", context);
        let layout = self.outputs("stopped").join("stopped.oci");
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(layout.join("index.json")).expect("index"))
                .expect("json");
        let digest = index["manifests"][0]["digest"]
            .as_str()
            .and_then(|d| d.strip_prefix("sha256:"))
            .expect("manifest digest")
            .to_owned();
        let oci_manifest: serde_json::Value = serde_json::from_slice(
            &std::fs::read(layout.join("blobs/sha256").join(digest)).expect("manifest"),
        )
        .expect("json");
        assert_eq!(
            oci_manifest["annotations"]["dev.cargo-appliance.tree-digest"], newest["tree_digest"],
            "{context}: the OCI output is of the newest image"
        );
        // The disk: accepted by qemu-img, sfdisk and e2fsck, and its root filesystem holds
        // this round's files.
        let root = root_filesystem(
            &self.outputs("stopped").join("stopped.qcow2"),
            &scratch.join("disk"),
        );
        assert_eq!(
            debugfs_cat(&root, "/etc/motd"),
            motd(round),
            "{context}: the disk"
        );
        assert_eq!(
            debugfs_cat(&root, "/etc/round"),
            format!("round {round}\n"),
            "{context}: the disk"
        );
        std::fs::remove_dir_all(&scratch).expect("cleanup");
    }
}

/// Files of a `.tar.zst`, in the order asked, from one pass over the archive (matched
/// however its member names begin: `./path` or `path`).
fn tar_files(archive: &Path, paths: &[&str], scratch: &Path) -> Vec<String> {
    let into = scratch.join("from-tar");
    let _ = std::fs::remove_dir_all(&into);
    std::fs::create_dir_all(&into).expect("mkdir");
    let output = Command::new("tar")
        .args(["--zstd", "-xf"])
        .arg(archive)
        .arg("-C")
        .arg(&into)
        .args(["--wildcards", "--no-anchored"])
        .args(paths)
        .output()
        .expect("tar runs");
    assert!(
        output.status.success(),
        "{paths:?} in {}: {}",
        archive.display(),
        text(&output)
    );
    let files = paths
        .iter()
        .map(|path| std::fs::read_to_string(into.join(path)).unwrap_or_default())
        .collect();
    std::fs::remove_dir_all(&into).expect("cleanup");
    files
}

fn debugfs_cat(filesystem: &Path, path: &str) -> String {
    let output = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat {path}"))
        .arg(filesystem)
        .output()
        .expect("debugfs runs");
    assert!(output.status.success(), "{}", text(&output));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The fault points on a full build's way, each between a step that is done and the record
/// that says so: a cached tree renamed into place before its marker, one renamed aside for
/// deletion, a layer blob's record, the objects and the catalog, an output and its stamp,
/// a state file and `Appliance.lock`.
const FAULT_POINTS: [&str; 8] = [
    "materialized-renamed",
    "materialized-discard-renamed",
    "layer-renaming",
    "objects-committed",
    "image-committed",
    "output-written",
    "state-renaming",
    "lock-renaming",
];

#[test]
fn full_builds_killed_at_fault_points_and_random_moments_recover_by_themselves() {
    let (kills, mut moments) = support::kill_schedule("full-build kill harness", 2);
    let harness = Harness::new();
    harness.set_round(0);
    harness.build_ok("the first build");
    harness.holds_round(0, "the first build");
    // How long a round's build takes uninterrupted: the random kills fall inside it.
    harness.set_round(1);
    let started = Instant::now();
    harness.build_ok("an uninterrupted round");
    let span = started.elapsed();
    harness.holds_round(1, "an uninterrupted round");
    eprintln!("an uninterrupted round's build: {span:?}");
    harness.start_reference();

    let mut round = 1;
    for point in FAULT_POINTS {
        round += 1;
        harness.set_round(round);
        let killed = harness
            .build()
            .env("APPLIANCE_FAULT_KILL_AT", point)
            .output()
            .expect("runs");
        {
            use std::os::unix::process::ExitStatusExt as _;
            assert_eq!(
                killed.status.signal(),
                Some(9),
                "the build did not reach `{point}`: {}",
                text(&killed)
            );
        }
        harness.recovers(round, &format!("round {round}, killed at `{point}`"));
    }
    for kill in 1..=kills {
        round += 1;
        harness.set_round(round);
        let mut build = harness
            .build()
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the build starts");
        let after = moments.next_below(span.as_millis() as u64);
        std::thread::sleep(Duration::from_millis(after));
        let _ = build.kill();
        let _ = build.wait();
        harness.recovers(
            round,
            &format!(
                "round {round}, random kill {kill} after {after} ms (seed {})",
                moments.seed
            ),
        );
    }
    support::assert_history_rederivable(
        |args| harness.command(args),
        "stopped",
        "after every round",
    );
    eprintln!(
        "full-build kill harness: {} kills",
        FAULT_POINTS.len() as u32 + kills
    );
}
