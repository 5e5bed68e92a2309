//! The command line as users meet it: cargo-style invocation, exit codes, appliance
//! selection, workspace discovery.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn demo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/demo")
}

fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cargo-appliance"))
        .args(args)
        .current_dir(dir)
        .env_remove("CARGO_TARGET_DIR")
        // No store: suggestions would depend on whatever history this machine holds.
        .env("APPLIANCE_STORE", "/nonexistent/appliance-store")
        .output()
        .expect("the binary runs")
}

fn json_messages(output: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("JSON line"))
        .collect()
}

fn finished(output: &Output) -> serde_json::Value {
    json_messages(output)
        .into_iter()
        .find(|m| m["reason"] == "check-finished")
        .expect("a check-finished message")
}

#[test]
fn demo_workspace_checks_cleanly_both_as_cargo_subcommand_and_directly() {
    for args in [&["check"][..], &["appliance", "check"][..]] {
        let output = run(&demo(), args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(
            stderr.contains("Finished checking 2 appliances"),
            "{stderr}"
        );
    }
}

#[test]
fn usage_errors_exit_with_2() {
    let output = run(&demo(), &["check", "--no-such-flag"]);
    assert_eq!(output.status.code(), Some(2));
    let output = run(&demo(), &["check", "--message-format", "xml"]);
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn selecting_an_appliance_also_checks_what_it_derives_from() {
    let output = run(
        &demo(),
        &["check", "-a", "web-debug", "--message-format", "json"],
    );
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(
        finished(&output)["appliances"],
        serde_json::json!(["web", "web-debug"])
    );

    let output = run(&demo(), &["check", "-a", "web", "--message-format", "json"]);
    assert_eq!(finished(&output)["appliances"], serde_json::json!(["web"]));
}

#[test]
fn an_unknown_appliance_name_suggests_the_closest() {
    let output = run(
        &demo(),
        &["check", "-a", "web-debgu", "--message-format", "json"],
    );
    assert_eq!(output.status.code(), Some(1));
    let messages = json_messages(&output);
    let error = messages
        .iter()
        .find(|m| m["code"] == "appliance::unknown-appliance")
        .expect("an unknown-appliance diagnostic");
    assert_eq!(error["help"], "did you mean `web-debug`?");
}

#[test]
fn outside_a_workspace_the_error_says_so() {
    let empty = tempfile::tempdir().expect("temp dir");
    let output = run(empty.path(), &["check"]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("could not find a Cargo workspace"),
        "{stderr}"
    );
}

#[test]
fn discovery_finds_nested_manifests_and_skips_ignored_and_target() {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path();
    let write = |path: &str, text: &str| {
        let path = root.join(path);
        std::fs::create_dir_all(path.parent().expect("has a parent")).expect("mkdir");
        std::fs::write(path, text).expect("write");
    };
    write(
        "Cargo.toml",
        "[workspace]\nresolver = \"3\"\nmembers = []\n",
    );
    write(".gitignore", "ignored/\n");
    let appliance =
        |name: &str| format!("appliance \"{name}\" {{\n    base \"debian/bookworm\"\n}}\n");
    write("appliance.kdl", &appliance("root"));
    write("services/api/api.appliance.kdl", &appliance("api"));
    write("services/api/notes.kdl", &appliance("not-a-manifest"));
    write("ignored/appliance.kdl", &appliance("ignored"));
    write("target/appliance.kdl", &appliance("in-target"));

    let output = run(root, &["check", "--message-format", "json"]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    assert_eq!(
        finished(&output)["appliances"],
        serde_json::json!(["root", "api"])
    );

    // Pointing --manifest-path at one manifest checks that manifest alone.
    let output = run(
        root,
        &[
            "check",
            "--message-format",
            "json",
            "--manifest-path",
            "services/api/api.appliance.kdl",
        ],
    );
    assert_eq!(finished(&output)["appliances"], serde_json::json!(["api"]));
}

/// `check` and `build` walk copy sources with one walker: a glob that matches only files under
/// `.git/` (which `build` never copies) matches nothing for `check` too.
#[test]
fn check_does_not_approve_files_under_git_that_build_would_not_copy() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ws = dir.path();
    std::fs::create_dir_all(ws.join("src")).expect("mkdir");
    std::fs::create_dir_all(ws.join("data/.git")).expect("mkdir");
    std::fs::write(
        ws.join("Cargo.toml"),
        "[package]\nname = \"tool\"\nversion = \"0.1.0\"\nedition = \"2021\"\n",
    )
    .expect("write");
    std::fs::write(ws.join("src/main.rs"), "fn main() {}\n").expect("write");
    std::fs::write(ws.join("data/.git/notes.txt"), "not for the image\n").expect("write");
    std::fs::write(ws.join("data/readme.md"), "not a .txt\n").expect("write");
    std::fs::write(
        ws.join("appliance.kdl"),
        "appliance \"tool\" {\n    base \"debian/bookworm\"\n    copy \"data/**/*.txt\" to=\"/srv/\"\n}\n",
    )
    .expect("write");
    let output = run(ws, &["check"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("appliance::glob-matches-nothing"),
        "{stderr}"
    );
}

/// `capture` says what to do first, before building anything: boot a test drive to capture,
/// and only appliances with a disk have one.
#[test]
fn capture_without_a_test_drive_says_how_to_start_one() {
    let output = run(&demo(), &["capture", "-a", "web"]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(
            "`web` has no test drive to capture; boot one with `cargo appliance run --capture -a web`"
        ),
        "{stderr}"
    );
    let output = run(&demo(), &["capture", "-a", "web-debug"]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("appliance `web-debug` has no disk output"),
        "{stderr}"
    );
}
