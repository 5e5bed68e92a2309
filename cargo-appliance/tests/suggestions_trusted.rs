//! Suggestions a user can trust, with real builds: an appliance's evidence never counts its
//! own lineage (a child appliance adding curl is no reason to suggest curl) nor every rebuild
//! of another appliance, never names what the build writes itself, and a suggestion applied
//! with `--apply` edits the manifest in place and is installed by the next build. Needs root
//! (the package step's chroot).

use std::path::{Path, PathBuf};
use std::process::Output;

mod support;
use support::{binary, is_root};

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, text).expect("write");
}

struct Env {
    work: tempfile::TempDir,
}

impl Env {
    fn ws(&self) -> PathBuf {
        self.work.path().join("ws")
    }

    fn run(&self, args: &[&str]) -> Output {
        binary()
            .current_dir(self.ws())
            .arg("--store")
            .arg(self.work.path().join("store"))
            .args(args)
            .env("CARGO_TARGET_DIR", self.work.path().join("target"))
            .output()
            .expect("the binary runs")
    }

    fn ok(&self, args: &[&str]) -> Output {
        let output = self.run(args);
        assert!(
            output.status.success(),
            "{args:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    fn suggestions(&self, appliance: Option<&str>) -> Vec<serde_json::Value> {
        self.suggestions_with(appliance, &[])
    }

    fn suggestions_with(&self, appliance: Option<&str>, extra: &[&str]) -> Vec<serde_json::Value> {
        let mut args = vec!["suggest", "--message-format", "json"];
        args.extend(extra);
        if let Some(name) = appliance {
            args.extend(["-a", name]);
        }
        let output = self.ok(&args);
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|line| serde_json::from_str::<serde_json::Value>(line).expect("JSON"))
            .filter(|m| m["code"] == "appliance::suggestion")
            .collect()
    }
}

/// What a user reads of a suggestion: its key and its counts.
fn evidence_of(suggestions: &[serde_json::Value]) -> Vec<(String, i64, i64)> {
    suggestions
        .iter()
        .map(|s| {
            (
                format!(
                    "{}:{}",
                    s["kind"].as_str().unwrap_or_default(),
                    s["subject"].as_str().unwrap_or_default()
                ),
                s["scope_with"].as_i64().unwrap_or_default(),
                s["scope_total"].as_i64().unwrap_or_default(),
            )
        })
        .collect()
}

const SITE: &str = "appliance \"site\" {
    base \"debian/bookworm\"
    packages \"nginx\" // the web server; keep this comment
    hostname \"site-host\"
    copy \"motd\" to=\"/etc/motd\"
}

appliance \"other\" {
    base \"debian/bookworm\"
    hostname \"other-host\"
    copy \"other.conf\" to=\"/etc/other.conf\"
}

// Two more with hostnames: with `other`, three images whose build wrote /etc/hosts and
// /etc/hostname, enough to be suggested if the build's plumbing entered the history.
appliance \"second\" {
    base \"debian/bookworm\"
    hostname \"second-host\"
}

appliance \"third\" {
    base \"debian/bookworm\"
    hostname \"third-host\"
}
";

const SITE_DEBUG: &str = "
appliance \"site-debug\" {
    base appliance=\"site\"
    packages \"curl\" \"strace\"
    hostname \"site-debug-host\"
}
";

#[test]
fn evidence_ignores_own_lineage_and_rebuilds_and_an_applied_suggestion_is_built() {
    assert!(is_root(), "the build tests need root (see README)");
    let env = Env {
        work: tempfile::tempdir().expect("temp dir"),
    };
    let ws = env.ws();
    write(
        &ws.join("Cargo.toml"),
        "[package]\nname = \"site\"\nversion = \"0.1.0\"\nedition = \"2021\"\n",
    );
    write(&ws.join("src/main.rs"), "fn main() {}\n");
    write(&ws.join("motd"), "welcome 0\n");
    write(&ws.join("other.conf"), "setting = 0\n");
    write(&ws.join("appliance.kdl"), SITE);
    let tarball = support::minbase_tarball();
    env.ok(&[
        "image",
        "import",
        "debian/bookworm",
        tarball.to_str().expect("utf-8"),
    ]);
    let history = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/suggest/history.jsonl");
    env.ok(&["history", "import", history.to_str().expect("utf-8")]);
    env.ok(&["build"]);
    let before = evidence_of(&env.suggestions(Some("site")));
    assert!(before.len() >= 3, "{before:?}");

    // A child appliance of `site` adding curl and strace, then five rebuilds of `site` and of
    // `other` (each with new content, so each is a new image).
    std::fs::write(ws.join("appliance.kdl"), format!("{SITE}{SITE_DEBUG}")).expect("write");
    env.ok(&["build"]);
    for round in 1..=5 {
        write(&ws.join("motd"), &format!("welcome {round}\n"));
        write(&ws.join("other.conf"), &format!("setting = {round}\n"));
        env.ok(&["build", "-a", "site", "-a", "other"]);
    }
    let images = env.ok(&["images", "--message-format", "json"]);
    let site_images = String::from_utf8_lossy(&images.stdout)
        .lines()
        .filter(|l| l.contains("\"name\":\"site\""))
        .count();
    assert_eq!(site_images, 6, "every round stored a new image of site");
    let after = evidence_of(&env.suggestions(Some("site")));
    assert_eq!(
        after, before,
        "site's suggestions and counts do not change with its child or with rebuilds"
    );

    // Nothing the build writes itself, and no hostname, for any appliance.
    // Far down the ranking too: the fixture's strong habits fill the first places.
    let all = env.suggestions_with(None, &["--limit", "100"]);
    assert!(all.len() > 20, "{}", all.len());
    for suggestion in all {
        let subject = suggestion["subject"].as_str().unwrap_or_default();
        assert_ne!(suggestion["kind"], "hostname", "{suggestion}");
        for plumbing in [
            "/etc/hosts",
            "/etc/hostname",
            "-host",
            "networkd",
            "network1",
        ] {
            assert!(!subject.contains(plumbing), "{suggestion}");
        }
    }

    // Apply a package suggestion: it joins the `packages` node, the comment stays, `check`
    // passes, and the next build installs it.
    let (key, _, _) = before
        .iter()
        .find(|(key, _, _)| key == "package-added:ca-certificates")
        .or_else(|| {
            before
                .iter()
                .find(|(key, _, _)| key.starts_with("package-added:"))
        })
        .cloned()
        .expect("a package suggestion");
    let package = key.trim_start_matches("package-added:").to_owned();
    env.ok(&["suggest", "-a", "site", "--apply", &key]);
    let manifest = std::fs::read_to_string(ws.join("appliance.kdl")).expect("read");
    assert!(
        manifest.contains(&format!(
            "packages \"nginx\" \"{package}\" // the web server; keep this comment"
        )),
        "{manifest}"
    );
    assert!(
        manifest.contains("appliance \"site-debug\""),
        "the rest is kept"
    );
    env.ok(&["check"]);
    assert!(
        env.suggestions(Some("site"))
            .iter()
            .all(|s| s["subject"] != package.as_str()),
        "an applied suggestion is not suggested again"
    );
    env.ok(&["build", "-a", "site"]);
    let show = env.ok(&["image", "show", "site"]);
    assert!(
        String::from_utf8_lossy(&show.stdout)
            .lines()
            .any(|line| line.trim_start().starts_with(&format!("{package} "))),
        "{package} is installed: {}",
        String::from_utf8_lossy(&show.stdout)
    );
    // A key that is not a suggestion is refused, and the manifest is left alone.
    let refused = env.run(&["suggest", "-a", "site", "--apply", "package-added:no-such"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("is not among the suggestions"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(ws.join("appliance.kdl")).expect("read"),
        manifest
    );
}
