//! The store's cache of downloaded packages with real Debian packages: apt takes a cached
//! `.deb` whose size matches the index without hashing it, so a file damaged on disk was
//! installed as it was and broke every later build that needed it (issue 15). Needs root
//! (the package step's chroot) and the Debian mirror of the host's apt sources.

use std::io::{Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod support;
use support::{binary, is_root};

struct Env {
    store: PathBuf,
    target: PathBuf,
    workspace: PathBuf,
}

impl Env {
    fn run(&self, args: &[&str]) -> Output {
        binary()
            .current_dir(&self.workspace)
            .arg("--store")
            .arg(&self.store)
            .args(args)
            .env("CARGO_TARGET_DIR", &self.target)
            .output()
            .expect("the binary runs")
    }

    /// Stdout and stderr of a command that must succeed.
    fn ok(&self, args: &[&str]) -> (String, String) {
        let output = self.run(args);
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(
            output.status.success(),
            "{args:?} failed:\n{stdout}{stderr}"
        );
        (stdout, stderr)
    }

    /// The one cached file of `package`.
    fn cached(&self, package: &str) -> PathBuf {
        let debs = self.store.join("cache/debs");
        let found: Vec<PathBuf> = std::fs::read_dir(&debs)
            .expect("the package cache exists after a package step")
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
            })
            .collect();
        assert_eq!(found.len(), 1, "{found:?}");
        found[0].clone()
    }

    /// `tree --version` inside the exported image: the installed binary is whole.
    fn tree_runs_in(&self, image: &str) {
        let root = self.workspace.join(format!("{image}-root"));
        self.ok(&[
            "image",
            "export",
            image,
            "-o",
            root.to_str().expect("utf-8"),
        ]);
        let ran = Command::new("chroot")
            .arg(&root)
            .args(["/usr/bin/tree", "--version"])
            .output()
            .expect("chroot runs");
        assert!(
            ran.status.success(),
            "{}",
            String::from_utf8_lossy(&ran.stderr)
        );
        assert!(String::from_utf8_lossy(&ran.stdout).starts_with("tree v"));
    }
}

/// Overwrite 100 bytes in the middle of the file, its size unchanged; with `keep_mtime`, its
/// modification time as it was (as bytes rotting on disk leave it).
fn flip_bytes(path: &Path, keep_mtime: bool) {
    let modified = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .expect("mtime");
    let size = std::fs::metadata(path).expect("stat").len();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open");
    file.seek(SeekFrom::Start(size / 2)).expect("seek");
    file.write_all(&[0x5a; 100]).expect("write");
    if keep_mtime {
        file.set_modified(modified).expect("set mtime");
    }
    assert_eq!(std::fs::metadata(path).expect("stat").len(), size);
}

#[test]
fn a_damaged_cached_package_is_downloaded_again_and_fsck_finds_one_that_rotted() {
    if !is_root() {
        panic!("the build tests need root for the package step's chroot (see README)");
    }
    let work = tempfile::tempdir().expect("temp dir");
    let env = Env {
        store: work.path().join("store"),
        target: work.path().join("target"),
        workspace: work.path().join("ws"),
    };
    std::fs::create_dir_all(env.workspace.join("src")).expect("mkdir");
    std::fs::write(
        env.workspace.join("Cargo.toml"),
        "[package]\nname = \"tool\"\nversion = \"0.1.0\"\nedition = \"2021\"\n",
    )
    .expect("write");
    std::fs::write(env.workspace.join("src/main.rs"), "fn main() {}\n").expect("write");
    let tarball = support::minbase_tarball();
    env.ok(&[
        "image",
        "import",
        "debian/bookworm",
        tarball.to_str().expect("utf-8"),
    ]);
    let manifest = "appliance \"one\" {\n    base \"debian/bookworm\"\n    packages \"tree\"\n}\n\
                    appliance \"two\" {\n    base \"debian/bookworm\"\n    packages \"tree\" \"less\"\n}\n\
                    appliance \"three\" {\n    base \"debian/bookworm\"\n    packages \"tree\" \"bc\"\n}\n";
    std::fs::write(env.workspace.join("appliance.kdl"), manifest).expect("write");
    env.ok(&["build", "-a", "one"]);
    let cached = env.cached("tree");
    let fsck = env.ok(&["fsck"]);
    assert!(!fsck.0.contains("cached package"), "{fsck:?}");

    // Written over (its modification time changes): the next build that needs it hashes it,
    // removes it, says so, and apt downloads it again. (Without `one`'s images, `two` starts
    // from the base and needs the package again.)
    flip_bytes(&cached, false);
    env.ok(&["image", "rm", "--recursive", "one/packages"]);
    let (_, stderr) = env.ok(&["build", "-a", "two"]);
    assert!(
        stderr.contains("cached package tree_")
            && stderr.contains("removed it, apt downloads it again"),
        "{stderr}"
    );
    env.tree_runs_in("two");
    let again = env.cached("tree");
    assert_eq!(again, cached, "downloaded again under the same name");

    // Damaged in place with its identity kept: builds cannot see it without hashing every
    // file every time, so fsck does, and --repair removes it.
    flip_bytes(&cached, true);
    let output = env.run(&["fsck"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(&format!("cached package {}", cached.display()))
            && stdout.contains("`cargo appliance fsck --repair` removes it"),
        "{stdout}"
    );
    let repaired = env.run(&["fsck", "--repair"]);
    let stdout = String::from_utf8_lossy(&repaired.stdout);
    assert_eq!(repaired.status.code(), Some(1), "it found damage: {stdout}");
    assert!(
        stdout.contains("cached package") && stdout.contains("(removed;"),
        "{stdout}"
    );
    assert!(!cached.exists(), "--repair removed it");
    let (clean, _) = env.ok(&["fsck"]);
    assert!(!clean.contains("cached package"), "{clean}");
    env.ok(&["image", "rm", "--recursive", "two/packages"]);
    env.ok(&["build", "-a", "three"]);
    assert!(env.cached("tree").exists(), "downloaded and kept again");
    env.tree_runs_in("three");
}
