//! What a newcomer meets first: a host that lacks a program the build needs (the build says
//! so at once, on the manifest node that needs it, and stores nothing), and command output
//! piped into a reader that goes away (`… | head -1`: a quiet stop, never a panic).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod support;
use support::binary;

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, text).expect("write");
}

/// A directory of links to every program on PATH but `left_out`, to stand in for PATH.
fn path_without(left_out: &str, dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("mkdir");
    let path = std::env::var_os("PATH").expect("PATH");
    for entry_dir in std::env::split_paths(&path) {
        let Ok(entries) = std::fs::read_dir(&entry_dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name == left_out || bin.join(&name).exists() {
                continue;
            }
            std::os::unix::fs::symlink(entry.path(), bin.join(&name)).expect("symlink");
        }
    }
    assert!(bin.join("cargo").exists(), "cargo is on PATH");
    assert!(!bin.join(left_out).exists());
    bin
}

fn store_images(store: &Path) -> usize {
    let output = binary()
        .arg("--store")
        .arg(store)
        .args(["images", "--message-format", "json"])
        .output()
        .expect("the binary runs");
    assert!(output.status.success(), "{output:?}");
    String::from_utf8_lossy(&output.stdout).lines().count()
}

fn import_minbase(store: &Path, name: &str) {
    let tarball = support::minbase_tarball();
    let output = binary()
        .arg("--store")
        .arg(store)
        .args(["image", "import", name])
        .arg(&tarball)
        .output()
        .expect("the binary runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn a_qcow2_build_without_qemu_img_fails_at_once_naming_the_program_and_stores_nothing() {
    let work = tempfile::tempdir().expect("temp dir");
    let store = work.path().join("store");
    import_minbase(&store, "debian/bookworm");
    let before = store_images(&store);
    let ws = work.path().join("ws");
    write(
        &ws.join("Cargo.toml"),
        "[package]\nname = \"tool\"\nversion = \"0.1.0\"\nedition = \"2021\"\n",
    );
    write(&ws.join("src/main.rs"), "fn main() {}\n");
    write(
        &ws.join("appliance.kdl"),
        "appliance \"vm\" {\n    base \"debian/bookworm\"\n    packages \"htop\"\n    output \"qcow2\"\n}\n",
    );
    let path = path_without("qemu-img", work.path());
    let started = Instant::now();
    let output = binary()
        .current_dir(&ws)
        .arg("--store")
        .arg(&store)
        .arg("build")
        .env("PATH", &path)
        .env("CARGO_TARGET_DIR", work.path().join("target"))
        .output()
        .expect("the binary runs");
    let elapsed = started.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        elapsed < Duration::from_secs(2),
        "took {elapsed:?}: {stderr}"
    );
    assert!(
        stderr.contains("`qemu-img` (Debian package qemu-utils)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("appliance::missing-host-program"),
        "{stderr}"
    );
    // The diagnostic points at the output node's format.
    assert!(stderr.contains("output \"qcow2\""), "{stderr}");
    assert_eq!(store_images(&store), before, "nothing was stored");
    assert!(
        !work.path().join("target/appliance").join("vm").exists(),
        "no output was written"
    );
}

/// Run the binary with stdout a pipe whose reader is already gone: every write fails with
/// EPIPE, as it does once `head -1` has its line and exits.
fn with_closed_stdout(store: &Path, dir: &Path, args: &[&str]) -> Output {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let child = binary()
        .current_dir(dir)
        .arg("--store")
        .arg(store)
        .args(args)
        .stdout(writer)
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    child.wait_with_output().expect("wait")
}

/// The same through a real `head -n1`, for output long enough to outlast the pipe's buffer.
fn through_head(store: &Path, dir: &Path, args: &[&str]) -> (String, Output) {
    let mut child = binary()
        .current_dir(dir)
        .arg("--store")
        .arg(store)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    let stdout = child.stdout.take().expect("stdout");
    let head = Command::new("head")
        .arg("-n1")
        .stdin(stdout)
        .output()
        .expect("head runs");
    (
        String::from_utf8_lossy(&head.stdout).into_owned(),
        child.wait_with_output().expect("wait"),
    )
}

fn assert_quiet_stop(args: &[&str], output: &Output) {
    use std::os::unix::process::ExitStatusExt as _;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    assert!(
        output.status.success() || output.status.signal() == Some(13),
        "{args:?} exited with {:?}: {stderr}",
        output.status
    );
}

#[test]
fn output_into_a_closed_pipe_stops_quietly() {
    let work = tempfile::tempdir().expect("temp dir");
    let store = work.path().join("store");
    import_minbase(&store, "debian/bookworm");
    import_minbase(&store, "debian/bookworm");
    let history = work.path().join("history.jsonl");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/suggest/history.jsonl"),
        &history,
    )
    .expect("copy the fixture history");
    let import = binary()
        .arg("--store")
        .arg(&store)
        .args(["history", "import"])
        .arg(&history)
        .output()
        .expect("runs");
    assert!(import.status.success(), "{import:?}");
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/demo");
    let commands: &[&[&str]] = &[
        &["images"],
        &["images", "--tree"],
        &["images", "--message-format", "json"],
        &["image", "show", "debian/bookworm"],
        &["diff", "debian/bookworm@1", "debian/bookworm@2"],
        &["history", "export", "-"],
        &["suggest", "--message-format", "json"],
        &["fsck"],
    ];
    for args in commands {
        let output = with_closed_stdout(&store, &demo, args);
        assert_quiet_stop(args, &output);
    }
    // Long outputs through a real `head`: the first line arrives, then the pipe closes.
    for args in [
        &["image", "show", "debian/bookworm"][..],
        &["history", "export", "-"][..],
    ] {
        let (first, output) = through_head(&store, &demo, args);
        assert!(!first.is_empty(), "{args:?} printed nothing");
        assert_quiet_stop(args, &output);
    }
}
