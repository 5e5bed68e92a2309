//! Transcripts of what the commands print for people (insta snapshots), on a small store
//! made from directories: `images --tree`, `image show`, `diff`, `fsck`, and `build --plan`
//! before and after a build. A change of wording or layout shows up as a snapshot diff to
//! review (`cargo insta review`); temp paths, digests and times are filtered out.

use std::path::Path;
use std::process::Output;

mod support;
use support::binary;

struct Work {
    dir: tempfile::TempDir,
}

impl Work {
    fn store(&self) -> std::path::PathBuf {
        self.dir.path().join("store")
    }

    fn run(&self, cwd: &Path, args: &[&str]) -> Output {
        binary()
            .current_dir(cwd)
            .arg("--store")
            .arg(self.store())
            .args(args)
            .env("CARGO_TARGET_DIR", self.dir.path().join("target"))
            .env("APPLIANCE_NO_SEED", "1")
            .env("NO_COLOR", "1")
            .output()
            .expect("the binary runs")
    }

    /// The command's stdout and stderr, which must succeed, with what varies filtered.
    fn transcript(&self, cwd: &Path, args: &[&str]) -> String {
        let output = self.run(cwd, args);
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{args:?}: {stdout}{stderr}");
        let text = format!("$ cargo appliance {}\n{stdout}{stderr}", args.join(" "));
        text.replace(&self.dir.path().display().to_string(), "[TMP]")
    }
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, text).expect("write");
}

/// A base with two packages and one user, and a child that installs a package, adds a
/// user, a file under /srv, a unit link and changes its hostname.
fn small_store(work: &Work) {
    let base = work.dir.path().join("base");
    let status = "Package: base-files\nStatus: install ok installed\nVersion: 12.4\nArchitecture: amd64\n\n\
                  Package: dash\nStatus: install ok installed\nVersion: 0.5.12-2\nArchitecture: amd64\n";
    write(&base.join("var/lib/dpkg/status"), status);
    write(&base.join("etc/hostname"), "debian\n");
    write(&base.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n");
    write(&base.join("etc/group"), "root:x:0:\n");
    let child = work.dir.path().join("child");
    write(
        &child.join("var/lib/dpkg/status"),
        &format!(
            "{status}\nPackage: nginx\nStatus: install ok installed\nVersion: 1.22.1-9\nArchitecture: amd64\n"
        ),
    );
    write(&child.join("etc/hostname"), "web\n");
    write(
        &child.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napi:x:999:999::/var/lib/api:/usr/sbin/nologin\n",
    );
    write(&child.join("etc/group"), "root:x:0:\n");
    write(&child.join("srv/index.html"), "<h1>hi</h1>\n");
    std::fs::create_dir_all(child.join("etc/systemd/system/multi-user.target.wants"))
        .expect("mkdir");
    std::os::unix::fs::symlink(
        "/etc/systemd/system/api.service",
        child.join("etc/systemd/system/multi-user.target.wants/api.service"),
    )
    .expect("symlink");
    let root = Path::new("/");
    for args in [
        vec!["image", "import", "base", base.to_str().expect("utf-8")],
        vec![
            "image",
            "import",
            "web",
            child.to_str().expect("utf-8"),
            "--parent",
            "base",
        ],
    ] {
        let output = work.run(root, &args);
        assert!(output.status.success(), "{output:?}");
    }
}

fn settings() -> insta::Settings {
    let mut settings = insta::Settings::clone_current();
    settings.add_filter(r"[0-9a-f]{64}", "[DIGEST]");
    settings.add_filter(r"\b[0-9a-f]{12}\b", "[SHORT]");
    settings.add_filter(
        r"\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}(:\d{2})?(Z| UTC)?",
        "[TIME]",
    );
    settings.add_filter(r"\d+\.\d+s\b", "[SECS]");
    settings
}

#[test]
fn store_commands_print_for_people() {
    let work = Work {
        dir: tempfile::tempdir().expect("temp dir"),
    };
    small_store(&work);
    let root = Path::new("/");
    settings().bind(|| {
        insta::assert_snapshot!("images_tree", work.transcript(root, &["images", "--tree"]));
        insta::assert_snapshot!(
            "image_show",
            work.transcript(root, &["image", "show", "web"])
        );
        insta::assert_snapshot!("diff", work.transcript(root, &["diff", "base", "web"]));
        insta::assert_snapshot!("fsck", work.transcript(root, &["fsck"]));
    });
}

#[test]
fn build_plan_prints_each_step_and_why() {
    let work = Work {
        dir: tempfile::tempdir().expect("temp dir"),
    };
    small_store(&work);
    let ws = work.dir.path().join("ws");
    write(
        &ws.join("Cargo.toml"),
        "[package]\nname = \"tool\"\nversion = \"0.1.0\"\nedition = \"2021\"\n",
    );
    write(&ws.join("src/main.rs"), "fn main() {}\n");
    write(&ws.join("motd"), "hello\n");
    write(
        &ws.join("appliance.kdl"),
        "appliance \"site\" {\n    base \"web\"\n    copy \"motd\" to=\"/etc/motd\"\n    hostname \"site\"\n    output \"tar\"\n}\n",
    );
    settings().bind(|| {
        insta::assert_snapshot!("plan_first", work.transcript(&ws, &["build", "--plan"]));
        let built = work.run(&ws, &["build", "-q"]);
        assert!(built.status.success(), "{built:?}");
        insta::assert_snapshot!("plan_fresh", work.transcript(&ws, &["build", "--plan"]));
        write(&ws.join("motd"), "changed\n");
        insta::assert_snapshot!("plan_changed", work.transcript(&ws, &["build", "--plan"]));
    });
}
