//! `cargo appliance build` end to end with real parts: a base made by `base create`
//! (mmdebstrap), real Debian packages installed by apt in the sandbox, a binary built by
//! cargo from the demo workspace, and the stored result inspected after exporting it.
//! Needs root (the package step's chroot), as the README says.

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod support;
use support::{binary, is_root, root_filesystem};

fn demo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/demo")
}

/// A copy of a fixture workspace (without build output), so builds do not write into the repository.
fn copy_workspace(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("cp runs");
    assert!(status.success());
    let _ = std::fs::remove_dir_all(to.join("target"));
    let _ = std::fs::remove_file(to.join("Appliance.lock"));
}

struct Env {
    store: PathBuf,
    target: PathBuf,
}

impl Env {
    /// A store and a target directory under `work`.
    fn new(work: &Path) -> Self {
        Self {
            store: work.join("store"),
            target: work.join("target"),
        }
    }

    /// Import the cached minbase tarball as `debian/bookworm` (a new version each time).
    fn import_minbase(&self) {
        let tarball = support::minbase_tarball();
        self.ok(
            Path::new("/"),
            &[
                "image",
                "import",
                "debian/bookworm",
                tarball.to_str().expect("utf-8"),
            ],
        );
    }

    /// `image export IMAGE -o DESTINATION`: a directory, tar or disk by the name's ending.
    fn export(&self, image: &str, destination: &Path) {
        self.ok(
            Path::new("/"),
            &[
                "image",
                "export",
                image,
                "-o",
                destination.to_str().expect("utf-8"),
            ],
        );
    }

    fn command(&self, workspace: &Path, args: &[&str]) -> Output {
        self.command_with(workspace, args, &[])
    }

    fn command_with(&self, workspace: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
        binary()
            .current_dir(workspace)
            .arg("--store")
            .arg(&self.store)
            .args(args)
            .env("CARGO_TARGET_DIR", &self.target)
            .envs(env.iter().copied())
            .output()
            .expect("the binary runs")
    }

    fn ok(&self, workspace: &Path, args: &[&str]) -> String {
        self.ok_with(workspace, args, &[])
    }

    fn ok_with(&self, workspace: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
        let output = self.command_with(workspace, args, env);
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(
            output.status.success(),
            "{args:?} failed:\n{}{stderr}",
            String::from_utf8_lossy(&output.stdout)
        );
        stderr
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let output = self.command(
            Path::new("/"),
            &[args, &["--message-format", "json"]].concat(),
        );
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("json")
    }

    fn images(&self) -> Vec<serde_json::Value> {
        let output = self.command(Path::new("/"), &["images", "--message-format", "json"]);
        assert!(output.status.success());
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect()
    }
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, text).expect("write");
}

fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).expect("read");
    assert!(text.contains(from), "{} has no {from:?}", path.display());
    std::fs::write(path, text.replacen(from, to, 1)).expect("write");
}

/// `build --plan -a web --message-format json`: each step (`output FORMAT` for outputs)
/// and whether it will run; every step must carry a key or say why it has none.
fn plan_of(env: &Env, workspace: &Path) -> Vec<(String, bool)> {
    let output = env.command(
        workspace,
        &["build", "--plan", "-a", "web", "--message-format", "json"],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let plan: serde_json::Value = serde_json::from_slice(&output.stdout).expect("one JSON plan");
    assert_eq!(plan["reason"], "build-plan");
    let appliances = plan["appliances"].as_array().expect("appliances");
    assert_eq!(appliances.len(), 1, "{plan}");
    appliances[0]["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|step| {
            let name = match step["format"].as_str() {
                Some(format) => format!("output {format}"),
                None => step["step"].as_str().expect("step").to_owned(),
            };
            let run = step["run"].as_bool().expect("run");
            if matches!(name.as_str(), "base" | "packages" | "appliance") && !run {
                assert!(step["key"].is_string(), "a reused step has its key: {step}");
            }
            assert!(step["why"].is_string(), "{step}");
            (name, run)
        })
        .collect()
}

fn dpkg_state(status: &str, package: &str) -> Option<String> {
    status.split("\n\n").find_map(|stanza| {
        let name = stanza.lines().find_map(|l| l.strip_prefix("Package: "))?;
        (name == package).then(|| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix("Status: "))
                .unwrap_or_default()
                .to_owned()
        })
    })
}

#[test]
fn build_installs_packages_binaries_files_users_and_services_and_reuses_what_it_can() {
    if !is_root() {
        panic!("the build tests need root for the package step's chroot (see README)");
    }
    let work = tempfile::tempdir().expect("temp dir");
    let env = Env::new(work.path());
    let workspace = work.path().join("demo");
    copy_workspace(&demo(), &workspace);
    // The disk output (a kernel, a boot loader) is the boot test's business.
    edit(
        &workspace.join("appliance.kdl"),
        "    output \"qcow2\" size=\"2G\"\n",
        "",
    );

    // Without a base in the store, the diagnostic points at the `base` node and says how.
    let output = env.command(&workspace, &["build", "-a", "web"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("appliance::base-not-found"), "{stderr}");
    assert!(
        stderr.contains("cargo appliance base create debian/bookworm --suite bookworm"),
        "{stderr}"
    );

    env.ok(
        Path::new("/"),
        &["base", "create", "debian/bookworm", "--suite", "bookworm"],
    );
    let built = env.ok(&workspace, &["build", "-a", "web", "-v"]);
    assert!(
        built.contains("Installing nginx, openssh-server"),
        "{built}"
    );
    assert!(built.contains("Built web → web@1"), "{built}");
    assert!(
        built.contains("working on an overlay of debian/bookworm@1"),
        "apt ran on an overlay of the cached base: {built}"
    );
    assert!(workspace.join("Appliance.lock").is_file());

    // Inspect the stored image, exported as root so owners are real.
    let root = work.path().join("web-root");
    env.export("web", &root);
    let status = std::fs::read_to_string(root.join("var/lib/dpkg/status")).expect("dpkg status");
    for package in ["nginx", "openssh-server"] {
        assert_eq!(
            dpkg_state(&status, package).as_deref(),
            Some("install ok installed"),
            "{package} is not in state ii"
        );
    }
    let version = Command::new("chroot")
        .arg(&root)
        .args(["/usr/local/bin/api", "--version"])
        .output()
        .expect("chroot runs");
    assert!(version.status.success());
    assert_eq!(String::from_utf8_lossy(&version.stdout).trim(), "api 0.1.0");

    let group_file = std::fs::read_to_string(root.join("etc/group")).expect("group");
    let www_data_gid: u32 = group_file
        .lines()
        .find_map(|l| l.strip_prefix("www-data:x:"))
        .and_then(|rest| rest.split(':').next())
        .and_then(|gid| gid.parse().ok())
        .expect("www-data group");
    let htpasswd = std::fs::symlink_metadata(root.join("etc/nginx/htpasswd")).expect("htpasswd");
    assert_eq!(htpasswd.permissions().mode() & 0o7777, 0o640);
    assert_eq!((htpasswd.uid(), htpasswd.gid()), (0, www_data_gid));

    let passwd = std::fs::read_to_string(root.join("etc/passwd")).expect("passwd");
    let api = passwd
        .lines()
        .find(|l| l.starts_with("api:"))
        .expect("api in passwd");
    let fields: Vec<&str> = api.split(':').collect();
    let uid: u32 = fields[2].parse().expect("uid");
    assert!((100..1000).contains(&uid), "a system uid: {api}");
    assert_eq!(
        (fields[5], fields[6]),
        ("/var/lib/api", "/usr/sbin/nologin")
    );
    let shadow = std::fs::read_to_string(root.join("etc/shadow")).expect("shadow");
    assert!(shadow.lines().any(|l| l.starts_with("api:!:")), "{shadow}");
    assert!(
        group_file.lines().any(|l| l.starts_with("api:x:")),
        "{group_file}"
    );
    let home = std::fs::metadata(root.join("var/lib/api")).expect("home");
    assert_eq!(home.uid(), uid);
    let api_toml = std::fs::metadata(root.join("etc/api/api.toml")).expect("api.toml");
    assert_eq!(api_toml.gid(), fields[3].parse::<u32>().expect("gid"));

    let wants = root.join("etc/systemd/system/multi-user.target.wants/api.service");
    assert_eq!(
        std::fs::read_link(&wants).expect("api.service is enabled"),
        Path::new("/etc/systemd/system/api.service")
    );
    assert_eq!(
        std::fs::read_to_string(root.join("etc/hostname")).expect("hostname"),
        "web\n"
    );
    // The sandbox left nothing behind.
    assert!(!root.join("usr/sbin/policy-rc.d").exists());
    assert!(
        std::fs::read_dir(root.join("var/cache/apt/archives"))
            .expect("archives")
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().ends_with(".deb"))
    );
    // Lineage: base → packages → appliance.
    let show = env.json(&["image", "show", "web"]);
    assert_eq!(show["parent_reference"], "web/packages@1");
    let packages_image = env.json(&["image", "show", "web/packages"]);
    assert_eq!(packages_image["parent_reference"], "debian/bookworm@1");
    // The history counts web as derived from the base too, with everything on the way.
    let history = work.path().join("history.jsonl");
    env.ok(
        Path::new("/"),
        &["history", "export", history.to_str().expect("utf-8")],
    );
    let derivations: Vec<serde_json::Value> = std::fs::read_to_string(&history)
        .expect("history")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let from_base = derivations
        .iter()
        .find(|d| d["parent"] == "debian/bookworm" && d["child"] == "web@1")
        .expect("web derived from debian/bookworm");
    let changes = from_base["changes"].as_array().expect("changes");
    let has = |kind: &str, subject: &str| {
        changes
            .iter()
            .any(|c| c["kind"] == kind && c["subject"] == subject)
    };
    assert!(has("package-added", "nginx"), "{changes:?}");
    assert!(has("user-added", "api"), "{changes:?}");
    assert!(has("service-enabled", "api.service"), "{changes:?}");
    assert!(
        derivations
            .iter()
            .any(|d| d["parent"] == "web/packages" && d["child"] == "web@1")
    );

    // A no-op build stores nothing and says the appliance is fresh.
    let images_before = env.images().len();
    let again = env.ok(&workspace, &["build", "-a", "web"]);
    assert!(again.contains("Fresh web → web@1"), "{again}");
    assert_eq!(env.images().len(), images_before);

    // The plan of a no-op build: every step reused, each with its key.
    let plan = plan_of(&env, &workspace);
    assert_eq!(
        plan,
        [
            ("base".to_owned(), false),
            ("packages".to_owned(), false),
            ("appliance".to_owned(), false),
            ("output oci".to_owned(), false),
            ("output tar".to_owned(), false),
        ],
        "the demo's web appliance as planned"
    );

    // Changing one copied file redoes the appliance step only: the plan says so before any
    // work, and -v says which file.
    write(&workspace.join("static/index.html"), "<h1>changed</h1>\n");
    let plan = plan_of(&env, &workspace);
    let running: Vec<&str> = plan
        .iter()
        .filter(|(_, run)| *run)
        .map(|(step, _)| step.as_str())
        .collect();
    assert_eq!(
        running,
        ["appliance", "output oci", "output tar"],
        "{plan:?}"
    );
    assert_eq!(env.images().len(), images_before, "planning stores nothing");
    let changed = env.ok(&workspace, &["build", "-a", "web", "-v"]);
    assert!(
        changed
            .contains("web: appliance runs: `static/index.html` changed (→ /srv/www/index.html)"),
        "{changed}"
    );
    assert!(!changed.contains("Installing"), "{changed}");
    assert!(changed.contains("Built web → web@2"), "{changed}");
    let web2 = env.json(&["image", "show", "web@2"]);
    assert_eq!(web2["parent_reference"], "web/packages@1");
    assert_eq!(env.images().len(), images_before + 1);

    // Offline, the package step runs again from the store's cached lists and .debs; this
    // time on a full copy of the base instead of an overlay, which must give the same tree.
    let overlaid = work.path().join("overlaid-packages");
    env.export("web/packages", &overlaid);
    env.ok(
        Path::new("/"),
        &["image", "rm", "web/packages", "--recursive"],
    );
    let offline = env.ok_with(
        &workspace,
        &["build", "-a", "web", "--offline", "-v"],
        &[("CARGO_APPLIANCE_NO_OVERLAY", "1")],
    );
    assert!(
        offline.contains("Installing nginx, openssh-server"),
        "{offline}"
    );
    assert!(!offline.contains("working on an overlay"), "{offline}");
    let copied = work.path().join("copied-packages");
    env.export("web/packages", &copied);
    // apt's own logs name the command line, which differs (--no-download).
    let listing = |root: &Path| -> Vec<String> {
        support::tree_listing(root)
            .into_iter()
            .filter(|l| !l.starts_with("./var/log/apt/"))
            .collect()
    };
    let (from_overlay, from_copy) = (listing(&overlaid), listing(&copied));
    assert!(from_overlay.len() > 5000, "{}", from_overlay.len());
    for (a, b) in from_overlay.iter().zip(&from_copy) {
        assert_eq!(a, b, "overlay and copy disagree");
    }
    assert_eq!(from_overlay.len(), from_copy.len());
    let images_before = env.images().len();

    // --locked accepts an unchanged lock and refuses a change.
    env.ok(&workspace, &["build", "-a", "web", "--locked"]);
    let manifest = workspace.join("appliance.kdl");
    let text = std::fs::read_to_string(&manifest).expect("manifest");
    std::fs::write(
        &manifest,
        text.replace(
            "packages \"nginx\" \"openssh-server\"",
            "packages \"nginx\" \"openssh-server\" \"less\"",
        ),
    )
    .expect("edit");
    let locked = env.command(&workspace, &["build", "-a", "web", "--locked"]);
    assert!(!locked.status.success());
    assert!(String::from_utf8_lossy(&locked.stderr).contains("--locked"));

    // An unknown package is a diagnostic on its node, with apt's index for "did you mean".
    std::fs::write(
        &manifest,
        text.replace(
            "packages \"nginx\" \"openssh-server\"",
            "packages \"nginx\" \"opensh-server\"",
        ),
    )
    .expect("edit");
    let unknown = env.command(&workspace, &["build", "-a", "web"]);
    assert!(!unknown.status.success());
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert!(stderr.contains("appliance::unknown-package"), "{stderr}");
    assert!(
        stderr.contains("did you mean `openssh-server`?"),
        "{stderr}"
    );
    assert!(stderr.contains("appliance.kdl:5:"), "{stderr}");
    assert_eq!(
        env.images().len(),
        images_before,
        "a failed build stores nothing"
    );

    // Closest base: with {nginx} and {nginx, curl} stored, {nginx, curl, git} starts from the
    // second and installs only git.
    let closest = work.path().join("closest");
    write(
        &closest.join("Cargo.toml"),
        "[package]\nname = \"closest\"\nversion = \"0.1.0\"\nedition = \"2021\"\n",
    );
    write(&closest.join("src/lib.rs"), "");
    write(
        &closest.join("appliance.kdl"),
        "appliance \"one\" {\n    base \"debian/bookworm\"\n    packages \"nginx\"\n}\n\
         appliance \"two\" {\n    base \"debian/bookworm\"\n    packages \"nginx\" \"curl\"\n}\n",
    );
    // Too little memory for apt's changes: the package step runs again with them on disk.
    let cramped = env.ok_with(
        &closest,
        &["build", "-v"],
        &[("CARGO_APPLIANCE_OVERLAY_MEMORY", "4000000")],
    );
    assert!(
        cramped.contains("apt filled the memory set aside for its changes"),
        "{cramped}"
    );
    assert!(cramped.contains("changes on disk)"), "{cramped}");
    std::fs::write(
        closest.join("appliance.kdl"),
        "appliance \"three\" {\n    base \"debian/bookworm\"\n    packages \"nginx\" \"curl\" \"git\"\n}\n",
    )
    .expect("write");
    let third = env.ok(&closest, &["build", "-v"]);
    assert!(
        third.contains("starting the package step from two/packages@1"),
        "{third}"
    );
    assert!(
        third.contains("Installing git on two/packages@1"),
        "{third}"
    );
    let three = env.json(&["image", "show", "three/packages"]);
    assert_eq!(three["parent_reference"], "two/packages@1");
    assert_eq!(three["provenance"]["installed"], serde_json::json!(["git"]));
    let names: Vec<&str> = three["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    for wanted in ["nginx", "curl", "git"] {
        assert!(names.contains(&wanted), "{wanted} missing");
    }

    // `diff` from the base to an appliance with nginx and openssh-server, an edited
    // sshd_config, a new user and an enabled unit reports exactly those as intended; apt's
    // dependencies and what the packages' scripts did (host keys, their own units, the sshd
    // user) are consequences. The package steps go base → one/packages (nginx, the closest
    // base) → edge/packages (openssh-server), so attribution spans two steps.
    let edge = work.path().join("edge");
    write(
        &edge.join("Cargo.toml"),
        "[package]\nname = \"edge\"\nversion = \"0.1.0\"\nedition = \"2021\"\n",
    );
    write(&edge.join("src/lib.rs"), "");
    write(
        &edge.join("sshd_config"),
        "Include /etc/ssh/sshd_config.d/*.conf\nPermitRootLogin no\nPasswordAuthentication no\n",
    );
    write(
        &edge.join("appliance.kdl"),
        "appliance \"edge\" {\n    base \"debian/bookworm\"\n    packages \"nginx\" \"openssh-server\"\n    \
         copy \"sshd_config\" to=\"/etc/ssh/sshd_config\" mode=0o644\n    \
         user \"deploy\" system=#true\n    service \"ssh.socket\" enable=#true\n}\n",
    );
    env.ok(&edge, &["build"]);
    let output = env.command(
        Path::new("/"),
        &[
            "diff",
            "debian/bookworm",
            "edge",
            "--message-format",
            "json",
        ],
    );
    assert!(output.status.success());
    let entries: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let key = |e: &serde_json::Value| {
        format!(
            "{}:{}",
            e["kind"].as_str().unwrap_or_default(),
            e["subject"].as_str().unwrap_or_default()
        )
    };
    let intended: Vec<String> = entries
        .iter()
        .filter(|e| e.get("cause").is_none())
        .map(key)
        .collect();
    assert_eq!(
        intended,
        [
            "config-changed:/etc/ssh/sshd_config",
            "group-added:deploy",
            "package-added:nginx",
            "package-added:openssh-server",
            "service-enabled:ssh.socket",
            "user-added:deploy",
        ],
        "{entries:#?}"
    );
    let caused = |kind: &str, subject: &str, cause: &str| {
        entries
            .iter()
            .any(|e| e["kind"] == kind && e["subject"] == subject && e["cause"] == cause)
    };
    for (kind, subject, cause) in [
        ("package-added", "openssh-sftp-server", "dependency"),
        ("package-added", "nginx-common", "dependency"),
        ("user-added", "sshd", "package-scripts"),
        ("service-enabled", "ssh.service", "package-scripts"),
        (
            "file-added",
            "/etc/ssh/ssh_host_ed25519_key",
            "package-scripts",
        ),
    ] {
        assert!(
            caused(kind, subject, cause),
            "{kind}:{subject} {entries:#?}"
        );
    }
    // People read the same: intended changes first, consequences after.
    let human = env.command(Path::new("/"), &["diff", "debian/bookworm", "edge"]);
    let human = String::from_utf8_lossy(&human.stdout);
    let consequences_at = human
        .find("consequences (")
        .expect("a consequences section");
    assert!(
        human[..consequences_at].contains("/etc/ssh/sshd_config (differs from its package)"),
        "{human}"
    );
    assert!(!human[..consequences_at].contains("ssh_host_"), "{human}");
    let fsck = env.command(Path::new("/"), &["fsck"]);
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stderr)
    );
}

#[test]
fn configuration_run_scripts_and_failures_without_a_package_step() {
    if !is_root() {
        panic!("the build tests need root for the run scripts' chroot (see README)");
    }
    let work = tempfile::tempdir().expect("temp dir");
    let env = Env::new(work.path());
    env.import_minbase();
    let ws = work.path().join("ws");
    write(
        &ws.join("Cargo.toml"),
        "[package]\nname = \"tool\"\nversion = \"0.3.0\"\nedition = \"2021\"\n",
    );
    write(
        &ws.join("src/main.rs"),
        "fn main() { println!(\"tool {}\", env!(\"CARGO_PKG_VERSION\")); }\n",
    );
    write(
        &ws.join("src/bin/broken.rs"),
        "fn main() { let n: u32 = \"not a number\"; println!(\"{n}\"); }\n",
    );
    let manifest = ws.join("appliance.kdl");
    write(
        &manifest,
        r#"appliance "configured" {
    base "debian/bookworm"
    user "svc" system=#true home="/var/lib/svc"
    mkdir "/var/lib/svc/data" owner="svc" group="svc" mode=0o750
    binary "tool"
    symlink "/usr/bin/tool" target="/usr/local/bin/tool"
    hostname "box"
    locale "C.UTF-8"
    env "RUST_LOG" "info"
    kernel-cmdline "console=ttyS0" "quiet"
    run "echo built-by-run > /etc/motd; id -u svc > /etc/svc-uid; tool > /etc/tool-version"
}
appliance "child" {
    base appliance="configured"
    hostname "child"
}
"#,
    );
    let built = env.ok(&ws, &["build"]);
    assert!(built.contains("Built configured → configured@1"), "{built}");
    assert!(built.contains("Built child → child@1"), "{built}");
    let root = work.path().join("configured-root");
    env.export("configured", &root);
    let read = |path: &str| std::fs::read_to_string(root.join(path)).expect(path);
    assert_eq!(read("etc/motd"), "built-by-run\n");
    assert_eq!(read("etc/tool-version"), "tool 0.3.0\n");
    let passwd = read("etc/passwd");
    let uid = passwd
        .lines()
        .find_map(|l| l.strip_prefix("svc:x:"))
        .and_then(|rest| rest.split(':').next())
        .expect("svc in passwd");
    assert_eq!(
        read("etc/svc-uid").trim(),
        uid,
        "run scripts see the manifest's users"
    );
    let data = std::fs::metadata(root.join("var/lib/svc/data")).expect("data dir");
    assert_eq!(data.uid().to_string(), uid);
    assert_eq!(data.permissions().mode() & 0o7777, 0o750);
    assert_eq!(
        std::fs::read_link(root.join("usr/bin/tool")).expect("symlink"),
        Path::new("/usr/local/bin/tool")
    );
    assert_eq!(read("etc/hostname"), "box\n");
    assert!(read("etc/hosts").contains("127.0.1.1\tbox"));
    assert_eq!(read("etc/default/locale"), "LANG=C.UTF-8\n");
    assert!(read("etc/environment").contains("RUST_LOG=\"info\""));
    assert_eq!(read("etc/kernel/cmdline"), "console=ttyS0 quiet\n");
    // The sandbox's preparations are gone from the stored image.
    assert!(!root.join("usr/sbin/policy-rc.d").exists());
    assert!(!root.join("run-0.sh").exists());
    let child = env.json(&["image", "show", "child"]);
    assert_eq!(child["parent_reference"], "configured@1");

    // A newer base does not move a locked build; `update` does.
    env.import_minbase();
    let pinned = env.ok(&ws, &["build", "-a", "configured"]);
    assert!(
        pinned.contains("Fresh configured → configured@1"),
        "{pinned}"
    );
    let updated = env.ok(&ws, &["update"]);
    assert!(
        updated.contains("configured: debian/bookworm@1 -> debian/bookworm@2"),
        "{updated}"
    );
    let lock = std::fs::read_to_string(ws.join("Appliance.lock")).expect("lock");
    assert!(
        lock.contains("base \"debian/bookworm\" version=\"2\""),
        "{lock}"
    );
    let rebuilt = env.ok(&ws, &["build", "-a", "configured", "--locked"]);
    assert!(
        rebuilt.contains("Building configured on debian/bookworm@2"),
        "{rebuilt}"
    );

    let text = std::fs::read_to_string(&manifest).expect("manifest");
    // A failing script: its span, its status and its output.
    std::fs::write(
        &manifest,
        text.replace(
            "run \"echo built-by-run",
            "run \"echo about to fail; exit 3; echo",
        ),
    )
    .expect("edit");
    let failed = env.command(&ws, &["build", "-a", "configured"]);
    assert_eq!(failed.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stderr.contains("appliance::run-failed"), "{stderr}");
    assert!(stderr.contains("exit status: 3"), "{stderr}");
    assert!(stderr.contains("about to fail"), "{stderr}");
    assert!(stderr.contains("appliance.kdl:11:"), "{stderr}");

    // A binary that does not compile: cargo's error under the binary's node.
    std::fs::write(
        &manifest,
        text.replace("binary \"tool\"", "binary \"broken\""),
    )
    .expect("edit");
    let failed = env.command(&ws, &["build", "-a", "configured"]);
    assert_eq!(failed.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stderr.contains("appliance::cargo-failed"), "{stderr}");
    assert!(stderr.contains("mismatched types"), "{stderr}");
    assert!(stderr.contains("appliance.kdl:5:"), "{stderr}");

    // A time zone the image's tzdata does not know.
    std::fs::write(
        &manifest,
        text.replace("hostname \"box\"", "timezone \"Europe/Atlantis\""),
    )
    .expect("edit");
    let failed = env.command(&ws, &["build", "-a", "configured"]);
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stderr.contains("appliance::unknown-timezone"), "{stderr}");
    assert!(stderr.contains("tzdata"), "{stderr}");

    // None of the failures stored anything or broke the store.
    let names: Vec<String> = env
        .images()
        .iter()
        .filter_map(|i| i["name"].as_str().map(str::to_owned))
        .collect();
    // (configured@1 on the first base, configured@2 after `update`.)
    assert_eq!(
        names.iter().filter(|n| *n == "configured").count(),
        2,
        "{names:?}"
    );
    let fsck = env.command(Path::new("/"), &["fsck"]);
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stderr)
    );
}

fn sha256_of(path: &Path) -> String {
    let output = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn oci_and_tar_outputs_are_reproducible_layered_and_accepted_by_skopeo_and_umoci() {
    let work = tempfile::tempdir().expect("temp dir");
    let env = Env::new(work.path());
    env.import_minbase();
    let ws = work.path().join("ws");
    write(
        &ws.join("Cargo.toml"),
        "[package]\nname = \"x\"\nversion = \"0.1.0\"\nedition = \"2021\"\n",
    );
    write(&ws.join("src/lib.rs"), "");
    write(&ws.join("etc/motd"), "hello from the appliance\n");
    write(
        &ws.join("appliance.kdl"),
        r#"appliance "small" {
    base "debian/bookworm"
    copy "etc/motd" to="/etc/motd" mode=0o644
    user "svc" system=#true
    hostname "small"
    output "tar"
    output "oci" tag="small:1.0" user="svc" workdir="/" {
        entrypoint "/bin/sh" "-c"
        cmd "cat /etc/motd"
        env "GREETING" "hi"
        expose 8080
    }
}
appliance "smaller" {
    base appliance="small"
    hostname "smaller"
    output "oci" tag="smaller:latest"
}
"#,
    );
    let build = |epoch: &str| {
        let output = binary()
            .current_dir(&ws)
            .arg("--store")
            .arg(&env.store)
            .arg("build")
            .env("CARGO_TARGET_DIR", &env.target)
            .env("SOURCE_DATE_EPOCH", epoch)
            .output()
            .expect("runs");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    build("1700000000");
    let out = env.target.join("appliance");
    let files = [
        out.join("small/small.tar.zst"),
        out.join("small/small.oci.tar"),
        out.join("smaller/smaller.oci.tar"),
    ];
    let first: Vec<String> = files.iter().map(|f| sha256_of(f)).collect();
    // Same store, same lock: written again from nothing, the outputs are the same bytes.
    std::fs::remove_dir_all(&out).expect("rm outputs");
    build("1700000000");
    let second: Vec<String> = files.iter().map(|f| sha256_of(f)).collect();
    assert_eq!(first, second);
    assert!(first.iter().all(|h| h.len() == 64));
    // Made to be shared: readable by others as `tar` would leave them (the test runs with
    // a umask that keeps group and other read), not the temporary files' 0600.
    for file in &files {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(file).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode & 0o044, 0o044, "{} is {mode:o}", file.display());
    }

    // skopeo reads both the layout and the archive.
    let layout = out.join("small/small.oci");
    let inspect = |reference: String| -> serde_json::Value {
        let output = Command::new("skopeo")
            .args(["inspect", "--config"])
            .arg(&reference)
            .output()
            .expect("skopeo runs (installed by .ci/install-deps)");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("json")
    };
    let config = inspect(format!("oci:{}:1.0", layout.display()));
    assert_eq!(config["os"], "linux");
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(config["created"], "2023-11-14T22:13:20Z");
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["/bin/sh", "-c"])
    );
    assert_eq!(
        config["config"]["Cmd"],
        serde_json::json!(["cat /etc/motd"])
    );
    assert_eq!(config["config"]["User"], "svc");
    assert!(config["config"]["ExposedPorts"].get("8080/tcp").is_some());
    assert!(
        config["config"]["Env"]
            .as_array()
            .expect("env")
            .contains(&serde_json::json!("GREETING=hi"))
    );
    // One layer per lineage step: the base, then the appliance (no package step here).
    assert_eq!(
        config["rootfs"]["diff_ids"].as_array().map(Vec::len),
        Some(2)
    );
    let archived = inspect(format!(
        "oci-archive:{}:1.0",
        out.join("small/small.oci.tar").display()
    ));
    assert_eq!(archived["rootfs"], config["rootfs"]);
    // The derived appliance shares its parent's layers and adds its own.
    let smaller = inspect(format!(
        "oci:{}:latest",
        out.join("smaller/smaller.oci").display()
    ));
    let small_layers = config["rootfs"]["diff_ids"]
        .as_array()
        .expect("layers")
        .clone();
    let smaller_layers = smaller["rootfs"]["diff_ids"]
        .as_array()
        .expect("layers")
        .clone();
    assert_eq!(smaller_layers.len(), 3);
    assert_eq!(smaller_layers[..2], small_layers[..]);

    // umoci unpacks it, and the tree equals the stored image.
    let bundle = work.path().join("bundle");
    let unpack = Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:1.0", layout.display()))
        .arg(&bundle)
        .output()
        .expect("umoci runs (installed by .ci/install-deps)");
    assert!(
        unpack.status.success(),
        "{}",
        String::from_utf8_lossy(&unpack.stderr)
    );
    let exported = work.path().join("exported");
    env.export("small", &exported);
    let unpacked = support::tree_listing(&bundle.join("rootfs"));
    let stored = support::tree_listing(&exported);
    assert!(stored.len() > 5000);
    let missing: Vec<_> = stored
        .iter()
        .filter(|l| !unpacked.contains(l))
        .take(10)
        .collect();
    let extra: Vec<_> = unpacked
        .iter()
        .filter(|l| !stored.contains(l))
        .take(10)
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}\nextra {extra:?}"
    );
    assert_eq!(
        std::fs::read_to_string(bundle.join("rootfs/etc/motd")).expect("motd"),
        "hello from the appliance\n"
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn http_get(port: u16) -> Option<String> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .ok()?;
    stream
        .write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

#[test]
fn an_nginx_appliance_boots_from_its_qcow2_and_serves_through_a_forwarded_port() {
    if !is_root() {
        panic!("the boot test needs root for the package step's chroot (see README)");
    }
    let work = tempfile::tempdir().expect("temp dir");
    let env = Env::new(work.path());
    env.import_minbase();
    let workspace = work.path().join("demo");
    copy_workspace(&demo(), &workspace);
    let port = free_port();
    edit(
        &workspace.join("appliance.kdl"),
        "forward host=8080 guest=80",
        &format!("forward host={port} guest=80"),
    );
    env.ok(&workspace, &["build", "-a", "web"]);
    let qcow2 = env.target.join("appliance/web/web.qcow2");
    let first = root_filesystem(&qcow2, &work.path().join("first"));

    // One copied file changed: the rebuild updates the previous disk's root filesystem in
    // place of writing it again, and the result holds what a disk written from scratch for
    // the same image holds. That updated disk is the one booted below.
    write(
        &workspace.join("static/index.html"),
        "<!doctype html><title>web</title><h1>It works, updated</h1>\n",
    );
    let rebuilt = env.ok(&workspace, &["build", "-a", "web", "-v"]);
    assert!(
        rebuilt.contains("web.qcow2: updated the previous disk's root filesystem"),
        "{rebuilt}"
    );
    let updated = root_filesystem(&qcow2, &work.path().join("updated"));
    let full_disk = work.path().join("full.raw");
    env.export("web", &full_disk);
    let full = root_filesystem(&full_disk, &work.path().join("full"));
    // The same disk written where there is no room for it: refused before writing, with
    // what it needs, what is free and what to do, and nothing left behind.
    let small = work.path().join("small");
    std::fs::create_dir(&small).expect("mkdir");
    let mut export = binary();
    export
        .args([
            "--store",
            &env.store.to_string_lossy(),
            "image",
            "export",
            "web",
            "-o",
        ])
        .arg(small.join("web.raw"));
    let output = support::on_small_tmpfs("64m", &small, &export)
        .output()
        .expect("unshare runs");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert_eq!(output.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stderr.contains(&format!("the disk {}/web.raw needs about", small.display()))
            && stderr.contains("MiB free")
            && stderr.contains("help: a filesystem is full: free space on it"),
        "{stderr}"
    );
    assert_eq!(stdout.trim(), "left:", "{stderr}");
    // Modes (with setuid and sticky bits), owners, sizes and device nodes, as the
    // filesystems hold them, against the store's own export of the image.
    let exported = work.path().join("exported");
    env.export("web", &exported);
    // No SSH host keys in the image (openssh-server's installation made some): every
    // machine makes its own at first boot, by a unit sshd waits for.
    let host_keys: Vec<String> = std::fs::read_dir(exported.join("etc/ssh"))
        .expect("/etc/ssh")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("ssh_host_"))
        .collect();
    assert!(host_keys.is_empty(), "{host_keys:?}");
    let unit = std::fs::read_to_string(
        exported.join("etc/systemd/system/cargo-appliance-ssh-host-keys.service"),
    )
    .expect("the host keys' unit");
    assert!(
        unit.contains("ExecStart=/usr/bin/ssh-keygen -A") && unit.contains("Before=ssh.service"),
        "{unit}"
    );
    assert!(
        std::fs::symlink_metadata(exported.join(
            "etc/systemd/system/multi-user.target.wants/cargo-appliance-ssh-host-keys.service"
        ))
        .is_ok(),
        "the unit is enabled"
    );
    let mut expected = directory_listing(&exported);
    // The disk's fstab names its root filesystem; the image's own is the one it came with.
    expected.remove("etc/fstab");
    assert_eq!(filesystem_listing(&full, &expected), expected);
    assert_eq!(filesystem_listing(&updated, &expected), expected);
    let updated_tree = work.path().join("updated-tree");
    std::fs::create_dir_all(&updated_tree).expect("mkdir");
    let dump = Command::new("debugfs")
        .arg("-R")
        .arg(format!("rdump /srv {}", updated_tree.display()))
        .arg(&updated)
        .output()
        .expect("debugfs");
    assert!(dump.status.success());
    assert_eq!(
        std::fs::read_to_string(updated_tree.join("srv/www/index.html")).expect("page"),
        "<!doctype html><title>web</title><h1>It works, updated</h1>\n"
    );
    let first_page = Command::new("debugfs")
        .args(["-R", "cat /srv/www/index.html"])
        .arg(&first)
        .output()
        .expect("debugfs");
    assert_eq!(
        String::from_utf8_lossy(&first_page.stdout),
        "<!doctype html><title>web</title><h1>It works</h1>\n"
    );

    let output_digest = sha256_of(&qcow2);
    // Boot it: KVM when it works here, TCG otherwise; a login prompt on the serial console,
    // then nginx's page through the forwarded port.
    use std::os::unix::process::CommandExt as _;
    let mut vm = binary()
        .current_dir(&workspace)
        .arg("--store")
        .arg(&env.store)
        .args(["run", "-a", "web", "--timeout", "600"])
        .env("CARGO_TARGET_DIR", &env.target)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("run starts");
    let group = vm.id();
    let stdout = vm.stdout.take().expect("stdout");
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::Read as _;
        // Chunks, not lines: the login prompt ends without a newline.
        let mut stdout = stdout;
        let mut buffer = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buffer) {
            if n == 0
                || sender
                    .send(String::from_utf8_lossy(&buffer[..n]).into_owned())
                    .is_err()
            {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    let mut console = String::new();
    let mut logged_in_prompt = false;
    while std::time::Instant::now() < deadline {
        match receiver.recv_timeout(std::time::Duration::from_secs(5)) {
            Ok(chunk) => {
                console.push_str(&chunk);
                if console.contains("web login:") {
                    logged_in_prompt = true;
                    break;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let mut page = None;
    if logged_in_prompt {
        for _ in 0..30 {
            if let Some(response) = http_get(port).filter(|r| r.contains("200 OK")) {
                page = Some(response);
                break;
            }
            std::thread::sleep(std::time::Duration::from_secs(2));
        }
    }
    // Issue 18: logging in to the test drive with `cargo appliance ssh` (root, the test
    // drive's own key and port), a command's words and exit status passed as ssh(1) passes
    // them; then powered off from inside.
    let ssh = |words: &[&str]| {
        let mut command = binary();
        command
            .current_dir(&workspace)
            .arg("--store")
            .arg(&env.store)
            .args(["ssh", "-a", "web", "--"])
            .args(words)
            .env("CARGO_TARGET_DIR", &env.target)
            .stdin(std::process::Stdio::null());
        command.output().expect("ssh runs")
    };
    let mut hostname = None;
    if page.is_some() {
        for _ in 0..30 {
            let output = ssh(&["cat", "/etc/hostname"]);
            if output.status.success() {
                hostname = Some(String::from_utf8_lossy(&output.stdout).into_owned());
                break;
            }
            std::thread::sleep(std::time::Duration::from_secs(2));
        }
    }
    let exit_status = hostname
        .is_some()
        .then(|| ssh(&["exit", "3"]).status.code());
    let words = hostname.is_some().then(|| {
        String::from_utf8_lossy(&ssh(&["echo", "two  words", "'$HOSTNAME'"]).stdout).into_owned()
    });
    let powered_off = hostname.is_some() && {
        let _ = ssh(&["systemctl", "poweroff"]);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
        loop {
            if let Ok(Some(status)) = vm.try_wait() {
                break status.success();
            }
            if std::time::Instant::now() > deadline {
                break false;
            }
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    };
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{group}")])
        .status();
    let _ = vm.wait();
    let tail: String = console
        .chars()
        .rev()
        .take(3000)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    assert!(
        logged_in_prompt,
        "no login prompt on the serial console:\n{tail}"
    );
    let page = page.expect("nginx answered through the forwarded port");
    assert!(page.contains("It works, updated"), "{page}");
    assert_eq!(
        hostname.as_deref(),
        Some("web\n"),
        "ssh as root with the test drive's key"
    );
    assert_eq!(
        exit_status,
        Some(Some(3)),
        "the remote command's exit status"
    );
    assert_eq!(words.as_deref(), Some("two words $HOSTNAME\n"));
    assert!(powered_off, "`run` ends when the VM powers off from inside");
    let after = ssh(&["true"]);
    assert!(
        String::from_utf8_lossy(&after.stderr).contains("no test drive of `web` is running"),
        "{}",
        String::from_utf8_lossy(&after.stderr)
    );
    let serial = std::fs::read_to_string(env.target.join("appliance/web/serial.log"))
        .expect("the console is kept in serial.log");
    assert!(serial.contains("web login:"), "{serial}");
    // The test drive never wrote the output.
    assert_eq!(sha256_of(&qcow2), output_digest);
}

/// `path mode uid gid size` of every entry under `root` (sizes of regular files only), as
/// lstat sees them.
fn directory_listing(root: &Path) -> std::collections::BTreeMap<String, String> {
    let mut listing = std::collections::BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("readdir").flatten() {
            let meta = std::fs::symlink_metadata(entry.path()).expect("lstat");
            let path = entry
                .path()
                .strip_prefix(root)
                .expect("under root")
                .to_string_lossy()
                .into_owned();
            let size = if meta.is_file() { meta.len() } else { 0 };
            listing.insert(
                path,
                format!("{:o} {} {} {size}", meta.mode(), meta.uid(), meta.gid()),
            );
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    listing
}

/// The same listing read from an ext4 filesystem with `debugfs ls -p`, for the directories
/// `expected` has (what the disk adds, lost+found and its fstab, left out).
fn filesystem_listing(
    filesystem: &Path,
    expected: &std::collections::BTreeMap<String, String>,
) -> std::collections::BTreeMap<String, String> {
    let mut directories: Vec<&str> = vec![""];
    directories.extend(
        expected
            .iter()
            .filter(|(_, line)| {
                line.split(' ')
                    .next()
                    .and_then(|mode| u32::from_str_radix(mode, 8).ok())
                    .is_some_and(|mode| mode & 0o170000 == 0o040000)
            })
            .map(|(path, _)| path.as_str()),
    );
    let script: String = directories
        .iter()
        .map(|dir| format!("ls -p \"/{dir}\"\n"))
        .collect();
    let script_path = filesystem.with_extension("ls.debugfs");
    std::fs::write(&script_path, script).expect("write");
    let output = Command::new("debugfs")
        .arg("-f")
        .arg(&script_path)
        .arg(filesystem)
        .output()
        .expect("debugfs");
    assert!(output.status.success());
    let mut listing = std::collections::BTreeMap::new();
    let mut current = String::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        if let Some(dir) = line.strip_prefix("debugfs: ls -p \"/") {
            current = dir.trim_end_matches('"').to_owned();
            continue;
        }
        // /inode/mode/uid/gid/name/size/
        let fields: Vec<&str> = line.split('/').collect();
        if fields.len() < 7 || matches!(fields[5], "." | "..") {
            continue;
        }
        let path = if current.is_empty() {
            fields[5].to_owned()
        } else {
            format!("{current}/{}", fields[5])
        };
        if path == "lost+found" || path == "etc/fstab" {
            continue;
        }
        let mode = u32::from_str_radix(fields[2], 8).expect("octal mode");
        let size = if mode & 0o170000 == 0o100000 {
            fields[6]
        } else {
            "0"
        };
        listing.insert(path, format!("{mode:o} {} {} {size}", fields[3], fields[4]));
    }
    listing
}

/// Issue 14: `--locked` fails before the first step of any appliance. With the first
/// appliance's files changed (it would be rebuilt and stored) and the second's lock entry
/// stale, nothing may be stored and no output written for either.
#[test]
fn build_locked_with_a_stale_second_appliance_builds_nothing() {
    let work = tempfile::tempdir().expect("temp dir");
    let env = Env::new(work.path());
    env.import_minbase();
    env.import_minbase();
    let ws = work.path().join("ws");
    let write = |path: &str, text: &str| {
        let path = ws.join(path);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, text).expect("write");
    };
    write(
        "Cargo.toml",
        "[package]\nname = \"tool\"\nversion = \"0.1.0\"\nedition = \"2021\"\n",
    );
    write("src/main.rs", "fn main() {}\n");
    write("motd", "first\n");
    let manifest = |second_version: &str| {
        format!(
            "appliance \"first\" {{\n    base \"debian/bookworm\" version=\"=1\"\n    copy \"motd\" to=\"/etc/motd\"\n    output \"tar\"\n}}\n\
             appliance \"second\" {{\n    base \"debian/bookworm\" version=\"={second_version}\"\n    output \"tar\"\n}}\n"
        )
    };
    write("appliance.kdl", &manifest("1"));
    env.ok(&ws, &["build"]);
    let images = || String::from_utf8_lossy(&env.command(&ws, &["images"]).stdout).into_owned();
    let images_before = images();
    assert!(images_before.contains("first@1"), "{images_before}");
    let outputs = env.target.join("appliance");
    // The outputs and their stamps; the target directory's own caches (`.images.json`, a
    // copy of the catalog's listing) may be refreshed.
    let listing = |dir: &Path| -> Vec<String> {
        support::tree_listing(dir)
            .into_iter()
            .filter(|l| !l.starts_with("./."))
            .collect()
    };
    let outputs_before = listing(&outputs);

    write("motd", "changed\n");
    write("appliance.kdl", &manifest("2"));
    let refused = env.command(&ws, &["build", "--locked"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("needs to be updated for `second`"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("Building first"),
        "nothing was built: {stderr}"
    );
    assert_eq!(images(), images_before, "no new image");
    assert_eq!(listing(&outputs), outputs_before, "no output written");
}

/// Issue 18: users one can log in as: a crypt(3) hash in /etc/shadow, keys from `ssh-key`
/// children and an `authorized-keys=` file in ~/.ssh/authorized_keys, owned by the user,
/// with the modes sshd's StrictModes wants.
#[test]
fn users_get_their_password_hash_and_ssh_keys() {
    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhscHR4f admin@laptop";
    const CI_KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8g ci@runner";
    const HASH: &str = "$6$rounds=5000$salt$IxDD3jeSOb5eB1CX5LBsqZFVkJdido3OUILO5Ifz5iwMuTS4XMS130MTSuDDl3aCI6WouIL9AjRbLCelDCy.g.";
    let work = tempfile::tempdir().expect("temp dir");
    let env = Env::new(work.path());
    env.import_minbase();
    let ws = work.path().join("ws");
    let write = |path: &str, text: &str| {
        let path = ws.join(path);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, text).expect("write");
    };
    write(
        "Cargo.toml",
        "[package]\nname = \"tool\"\nversion = \"0.1.0\"\nedition = \"2021\"\n",
    );
    write("src/main.rs", "fn main() {}\n");
    write("deploy/ci.pub", &format!("# the CI runner\n\n{CI_KEY}\n"));
    write(
        "appliance.kdl",
        &format!(
            "appliance \"login\" {{\n    base \"debian/bookworm\"\n    user \"admin\" groups=\"sudo\" password-hash=\"{HASH}\" authorized-keys=\"deploy/ci.pub\" {{\n        ssh-key \"{KEY}\"\n    }}\n    user \"svc\" system=#true\n}}\n"
        ),
    );
    env.ok(&ws, &["build"]);
    let root = work.path().join("root");
    env.export("login", &root);
    let shadow = std::fs::read_to_string(root.join("etc/shadow")).expect("shadow");
    assert!(
        shadow
            .lines()
            .any(|l| l.starts_with(&format!("admin:{HASH}:"))),
        "{shadow}"
    );
    assert!(
        shadow.lines().any(|l| l.starts_with("svc:!:")),
        "no hash, no password login: {shadow}"
    );
    let ssh = root.join("home/admin/.ssh");
    let keys = std::fs::read_to_string(ssh.join("authorized_keys")).expect("keys");
    assert_eq!(keys, format!("{KEY}\n{CI_KEY}\n"));
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).expect("passwd");
    let uid: u32 = passwd
        .lines()
        .find(|l| l.starts_with("admin:"))
        .and_then(|l| l.split(':').nth(2))
        .and_then(|u| u.parse().ok())
        .expect("admin's uid");
    for (path, mode) in [(ssh.clone(), 0o700), (ssh.join("authorized_keys"), 0o600)] {
        let meta = std::fs::symlink_metadata(&path).expect("metadata");
        assert_eq!(
            meta.permissions().mode() & 0o7777,
            mode,
            "{}",
            path.display()
        );
        assert_eq!(meta.uid(), uid, "{} is the user's", path.display());
    }

    // A changed key file is a changed appliance.
    write("deploy/ci.pub", &format!("{KEY}\n"));
    let rebuilt = env.ok(&ws, &["build"]);
    assert!(rebuilt.contains("Building login"), "{rebuilt}");
    let root = work.path().join("root2");
    env.export("login", &root);
    assert_eq!(
        std::fs::read_to_string(root.join("home/admin/.ssh/authorized_keys")).expect("keys"),
        format!("{KEY}\n{KEY}\n")
    );
}
