//! Every manifest in `fixtures/invalid/` is checked alone through the real binary. Each
//! must produce exactly the diagnostics its `// expect: LEVEL CODE LINE:COLUMN` lines name,
//! and its human and JSON outputs are kept as snapshots.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/invalid")
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn check(manifest: &str, format: &str) -> Run {
    let output = Command::new(env!("CARGO_BIN_EXE_cargo-appliance"))
        .args([
            "check",
            "--color",
            "never",
            "--message-format",
            format,
            "--manifest-path",
            manifest,
        ])
        .current_dir(fixtures())
        .env_remove("CARGO_TARGET_DIR")
        // No store: suggestions would depend on whatever history this machine holds.
        .env("APPLIANCE_STORE", "/nonexistent/appliance-store")
        .output()
        .expect("the binary runs");
    Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn expectations(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).expect("fixture is readable");
    String::from_utf8_lossy(&bytes)
        .lines()
        .filter_map(|line| line.strip_prefix("// expect: "))
        .map(str::to_owned)
        .collect()
}

#[test]
fn invalid_manifests_report_the_expected_diagnostics() {
    let mut manifests: Vec<PathBuf> = std::fs::read_dir(fixtures())
        .expect("fixtures/invalid exists")
        .map(|entry| entry.expect("readable entry").path())
        .filter(|path| path.to_string_lossy().ends_with(".appliance.kdl"))
        .collect();
    manifests.sort();
    assert!(
        manifests.len() >= 20,
        "only {} invalid manifests",
        manifests.len()
    );

    for path in &manifests {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("utf-8 name");
        let stem = name.trim_end_matches(".appliance.kdl");
        let expected = expectations(path);
        assert!(!expected.is_empty(), "{name} has no `// expect:` lines");

        let json = check(name, "json");
        let mut found = Vec::new();
        let mut summary = None;
        for line in json.stdout.lines() {
            let message: serde_json::Value = serde_json::from_str(line).expect("each line is JSON");
            match message["reason"].as_str() {
                Some("diagnostic") => found.push(format!(
                    "{} {} {}:{}",
                    message["level"].as_str().unwrap_or("?"),
                    message["code"].as_str().unwrap_or("?"),
                    message["line"],
                    message["column"]
                )),
                Some("check-finished") => summary = Some(message),
                other => panic!("{name}: unexpected message reason {other:?}"),
            }
        }
        assert_eq!(
            found, expected,
            "{name}: diagnostics differ from its `// expect:` lines"
        );
        let has_errors = expected.iter().any(|e| e.starts_with("error "));
        assert_eq!(
            json.code,
            Some(if has_errors { 1 } else { 0 }),
            "{name}: exit code"
        );
        let summary = summary.unwrap_or_else(|| panic!("{name}: no check-finished message"));
        assert_eq!(
            summary["success"],
            serde_json::Value::Bool(!has_errors),
            "{name}"
        );

        let human = check(name, "human");
        assert_eq!(
            human.code, json.code,
            "{name}: human and JSON runs disagree"
        );
        assert!(
            human.stdout.is_empty(),
            "{name}: human diagnostics belong on stderr"
        );
        insta::assert_snapshot!(format!("{stem}.human"), human.stderr);
        insta::assert_snapshot!(format!("{stem}.json"), json.stdout);
    }
}
