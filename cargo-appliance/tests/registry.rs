//! Stored images through a real OCI registry: Docker's registry (Debian's `docker-registry`)
//! on a loopback port with storage of its own, skopeo and umoci as independent readers.
//! Needs root for nothing; the appliances here have no package step.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod support;
use support::{Registry, binary};

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, text).expect("write");
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A store and a workspace beside it.
struct Site {
    dir: tempfile::TempDir,
}

impl Site {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn store(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    fn workspace(&self) -> PathBuf {
        self.dir.path().join("ws")
    }

    fn run(&self, args: &[&str]) -> Output {
        binary()
            .arg("--store")
            .arg(self.store())
            .args(args)
            .env("CARGO_TARGET_DIR", self.dir.path().join("target"))
            .output()
            .expect("the binary runs")
    }

    fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(output.status.success(), "{args:?}: {}", text(&output));
        text(&output)
    }

    /// A workspace whose appliance `web` derives from `base` with one copied file.
    fn workspace_on(&self, base: &str, motd: &str) {
        let ws = self.workspace();
        write(
            &ws.join("Cargo.toml"),
            "[package]\nname = \"tool\"\nversion = \"0.1.0\"\nedition = \"2021\"\n",
        );
        write(&ws.join("src/main.rs"), "fn main() {}\n");
        write(&ws.join("etc/motd"), motd);
        write(
            &ws.join("appliance.kdl"),
            &format!(
                "appliance \"web\" {{\n    base \"{base}\"\n    copy \"etc/motd\" to=\"/etc/motd\"\n    user \"api\"\n}}\n"
            ),
        );
    }

    fn build(&self) {
        let manifest = self.workspace().join("Cargo.toml");
        let manifest = manifest.to_string_lossy().into_owned();
        self.ok(&["build", "--manifest-path", &manifest]);
    }

    /// (reference, tree digest, parent reference) of every image.
    fn images(&self) -> Vec<(String, String, Option<String>)> {
        let listing = self.ok(&["images", "--message-format", "json"]);
        let records: Vec<serde_json::Value> = listing
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
        let by_id = |id: &serde_json::Value| {
            records.iter().find(|r| &r["id"] == id).map(|r| {
                format!(
                    "{}@{}",
                    r["name"].as_str().unwrap_or(""),
                    r["version"].as_str().unwrap_or("")
                )
            })
        };
        let mut images: Vec<_> = records
            .iter()
            .map(|r| {
                (
                    format!(
                        "{}@{}",
                        r["name"].as_str().unwrap_or(""),
                        r["version"].as_str().unwrap_or("")
                    ),
                    r["tree_digest"].as_str().unwrap_or("").to_owned(),
                    by_id(&r["parent"]),
                )
            })
            .collect();
        images.sort();
        images
    }

    fn packages(&self, image: &str) -> serde_json::Value {
        let shown = self.ok(&["image", "show", image, "--message-format", "json"]);
        let line = shown.lines().find(|l| l.starts_with('{')).expect("json");
        serde_json::from_str::<serde_json::Value>(line).expect("json")["packages"].clone()
    }

    fn fsck_is_clean(&self) {
        self.ok(&["fsck"]);
    }
}

fn skopeo(args: &[&str]) -> String {
    let output = Command::new("skopeo")
        .args(args)
        .output()
        .expect("skopeo runs (installed by .ci/install-deps)");
    assert!(
        output.status.success(),
        "skopeo {args:?}: {}",
        text(&output)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The minbase image, and `web` built on it.
fn source_site() -> Site {
    let site = Site::new();
    let tarball = support::minbase_tarball();
    site.ok(&[
        "image",
        "import",
        "debian/bookworm",
        &tarball.to_string_lossy(),
    ]);
    site.workspace_on("debian/bookworm", "hello from the team\n");
    site.build();
    site
}

#[test]
fn an_image_pushed_with_its_lineage_is_an_oci_image_and_pulls_back_whole() {
    let registry = Registry::start();
    let host = registry.host();
    let source = source_site();
    let pushed = source.ok(&["push", "web", &format!("{host}/team/web"), "--lineage"]);
    assert!(
        pushed.contains(&format!(
            "debian/bookworm@1 → {host}/team/debian/bookworm:1"
        )),
        "{pushed}"
    );
    assert!(
        pushed.contains(&format!("web@1 → {host}/team/web:1")),
        "{pushed}"
    );

    // Other tools read it as a normal image, and its tree is the store's.
    let inspected: serde_json::Value = serde_json::from_str(&skopeo(&[
        "inspect",
        "--tls-verify=false",
        &format!("docker://{host}/team/web:1"),
    ]))
    .expect("json");
    assert_eq!(
        inspected["Layers"].as_array().map(Vec::len),
        Some(2),
        "{inspected}"
    );
    let copied = source.dir.path().join("copied");
    skopeo(&[
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        &format!("docker://{host}/team/web:1"),
        &format!("oci:{}:1", copied.display()),
    ]);
    let bundle = source.dir.path().join("bundle");
    let unpack = Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:1", copied.display()))
        .arg(&bundle)
        .output()
        .expect("umoci runs");
    assert!(unpack.status.success(), "{}", text(&unpack));
    let exported = source.dir.path().join("exported");
    source.ok(&[
        "image",
        "export",
        "web@1",
        "-o",
        &exported.to_string_lossy(),
    ]);
    let unpacked = support::tree_listing(&bundle.join("rootfs"));
    let stored = support::tree_listing(&exported);
    assert!(stored.len() > 5000, "{}", stored.len());
    assert_eq!(
        unpacked, stored,
        "umoci's unpacking equals the store's export"
    );

    // Pulled into an empty store: the same trees, packages and lineage; the base layer is
    // fetched once, for the parent, and not again for the image that shares it.
    let base_layer = inspected["Layers"][0].as_str().expect("layer").to_owned();
    let base_reads = registry.requests("GET", &format!("/blobs/{base_layer}"));
    let other = Site::new();
    let pulled = other.ok(&["pull", &format!("{host}/team/web:1")]);
    assert_eq!(
        registry.requests("GET", &format!("/blobs/{base_layer}")),
        base_reads + 1
    );
    assert!(
        pulled.contains("derived from debian/bookworm@1"),
        "{pulled}"
    );
    assert_eq!(other.images(), source.images());
    assert_eq!(other.packages("web@1"), source.packages("web@1"));
    assert!(
        other
            .packages("web@1")
            .as_array()
            .is_some_and(|p| p.len() > 50),
        "the packages came along"
    );
    other.fsck_is_clean();

    // Again: nothing moves.
    let blob_reads = registry.requests("GET", "/blobs/");
    let again = other.ok(&["pull", &format!("{host}/team/web:1")]);
    assert!(again.contains("already stored"), "{again}");
    assert_eq!(registry.requests("GET", "/blobs/"), blob_reads);

    // A rebuilt appliance: its push sends its own layer and config only, and its pull
    // fetches no layer of the base it shares.
    source.workspace_on("debian/bookworm", "hello again\n");
    source.build();
    let uploads = registry.requests("PATCH", "/blobs/uploads/");
    let base_uploads = registry.requests("PATCH", "/team/debian/bookworm/blobs/uploads/");
    source.ok(&["push", "web@2", &format!("{host}/team/web"), "--lineage"]);
    assert_eq!(
        registry.requests("PATCH", "/blobs/uploads/") - uploads,
        2,
        "one layer and one config sent"
    );
    assert_eq!(
        registry.requests("PATCH", "/team/debian/bookworm/blobs/uploads/"),
        base_uploads
    );
    // Pushed again with nothing new: the registry is asked for the top manifest only;
    // nothing is uploaded and no manifest written.
    let (uploads, manifests_written) = (
        registry.requests("PATCH", "/blobs/uploads/"),
        registry.requests("PUT", "/manifests/"),
    );
    let repushed = source.ok(&["push", "web@2", &format!("{host}/team/web"), "--lineage"]);
    assert!(
        repushed.contains(&format!("web@2 → {host}/team/web:2")),
        "{repushed}"
    );
    assert_eq!(registry.requests("PATCH", "/blobs/uploads/"), uploads);
    assert_eq!(registry.requests("PUT", "/manifests/"), manifests_written);
    let base_reads = registry.requests("GET", &format!("/blobs/{base_layer}"));
    other.ok(&["pull", &format!("{host}/team/web:2")]);
    assert_eq!(
        registry.requests("GET", &format!("/blobs/{base_layer}")),
        base_reads
    );
    assert_eq!(other.images(), source.images());
    other.fsck_is_clean();

    // Removed from the store, its layers still cached, one of them damaged on disk (same
    // size, other bytes): the pull imports from the cache, notices, fetches that layer
    // again and stores the same image.
    let inspected: serde_json::Value = serde_json::from_str(&skopeo(&[
        "inspect",
        "--tls-verify=false",
        &format!("docker://{host}/team/web:2"),
    ]))
    .expect("json");
    let top_layer = inspected["Layers"][1].as_str().expect("layer").to_owned();
    let cached = other
        .store()
        .join("cache/oci/blobs/sha256")
        .join(top_layer.strip_prefix("sha256:").expect("a sha256 digest"));
    let mut damaged = std::fs::read(&cached).expect("the cached layer");
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0xff;
    std::fs::write(&cached, &damaged).expect("damage it");
    other.ok(&["image", "rm", "web@2"]);
    let layer_reads = registry.requests("GET", &format!("/blobs/{top_layer}"));
    let base_reads = registry.requests("GET", &format!("/blobs/{base_layer}"));
    let repulled = other.ok(&["pull", &format!("{host}/team/web:2")]);
    assert!(repulled.contains("Pulled web@2"), "{repulled}");
    assert_eq!(
        registry.requests("GET", &format!("/blobs/{top_layer}")),
        layer_reads + 1,
        "the damaged layer fetched again"
    );
    assert_eq!(
        registry.requests("GET", &format!("/blobs/{base_layer}")),
        base_reads,
        "the base's layer is stored, so not fetched"
    );
    assert_eq!(other.images(), source.images());
    other.fsck_is_clean();
}

#[test]
fn an_image_pushed_by_other_tools_pulls_as_a_base_that_builds_on() {
    let registry = Registry::start();
    let host = registry.host();
    let work = tempfile::tempdir().expect("temp dir");
    // A plain OCI layout made by umoci: a small root with no annotations of ours.
    let layout = work.path().join("layout");
    let bundle = work.path().join("bundle");
    for args in [
        vec!["init", "--layout", &*layout.to_string_lossy()],
        vec!["new", "--image", &format!("{}:1", layout.display())],
        vec![
            "unpack",
            "--image",
            &format!("{}:1", layout.display()),
            &*bundle.to_string_lossy(),
        ],
    ] {
        let output = Command::new("umoci")
            .args(&args)
            .output()
            .expect("umoci runs");
        assert!(output.status.success(), "umoci {args:?}: {}", text(&output));
    }
    write(&bundle.join("rootfs/etc/os-release"), "ID=tiny\n");
    write(
        &bundle.join("rootfs/etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\n",
    );
    write(&bundle.join("rootfs/etc/group"), "root:x:0:\n");
    write(
        &bundle.join("rootfs/etc/shadow"),
        "root:*:19000:0:99999:7:::\n",
    );
    write(&bundle.join("rootfs/etc/gshadow"), "root:*::\n");
    let repack = Command::new("umoci")
        .args(["repack", "--image"])
        .arg(format!("{}:1", layout.display()))
        .arg(&bundle)
        .output()
        .expect("umoci runs");
    assert!(repack.status.success(), "{}", text(&repack));
    skopeo(&[
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        &format!("oci:{}:1", layout.display()),
        &format!("docker://{host}/plain/tiny:1"),
    ]);

    let site = Site::new();
    let pulled = site.ok(&["pull", &format!("{host}/plain/tiny:1")]);
    assert!(
        pulled.contains("plain/tiny@1"),
        "named after its repository and tag: {pulled}"
    );
    assert!(pulled.contains("a base of its own"), "{pulled}");
    site.workspace_on("plain/tiny", "built on a pulled base\n");
    site.build();
    let images = site.images();
    assert!(
        images
            .iter()
            .any(|(image, _, parent)| image == "web@1" && parent.as_deref() == Some("plain/tiny@1")),
        "{images:?}"
    );
}

#[test]
fn a_pull_refuses_an_image_whose_layers_are_not_what_its_annotations_say() {
    let registry = Registry::start();
    let host = registry.host();
    let source = source_site();
    source.ok(&["push", "web", &format!("{host}/team/web")]);
    // Copy it out, change the claimed tree digest, push it back under another name.
    let copied = source.dir.path().join("liar");
    skopeo(&[
        "copy",
        "--quiet",
        "--preserve-digests",
        "--src-tls-verify=false",
        &format!("docker://{host}/team/web:1"),
        &format!("oci:{}:1", copied.display()),
    ]);
    let script = r#"
import hashlib, json, os, sys
layout = sys.argv[1]
index = json.load(open(os.path.join(layout, "index.json")))
old = index["manifests"][0]["digest"].split(":")[1]
manifest = json.load(open(os.path.join(layout, "blobs/sha256", old)))
manifest["annotations"]["dev.cargo-appliance.tree-digest"] = "0" * 64
data = json.dumps(manifest).encode()
new = hashlib.sha256(data).hexdigest()
open(os.path.join(layout, "blobs/sha256", new), "wb").write(data)
index["manifests"][0]["digest"] = "sha256:" + new
index["manifests"][0]["size"] = len(data)
json.dump(index, open(os.path.join(layout, "index.json"), "w"))
"#;
    let edited = Command::new("python3")
        .args(["-c", script])
        .arg(&copied)
        .output()
        .expect("python3 runs");
    assert!(edited.status.success(), "{}", text(&edited));
    skopeo(&[
        "copy",
        "--quiet",
        "--preserve-digests",
        "--dest-tls-verify=false",
        &format!("oci:{}:1", copied.display()),
        &format!("docker://{host}/team/liar:1"),
    ]);
    let other = Site::new();
    let refused = other.run(&["pull", &format!("{host}/team/liar:1")]);
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("its annotation says"),
        "{}",
        text(&refused)
    );
    assert!(other.images().is_empty(), "nothing stored");
    other.fsck_is_clean();
    // A name that is not a registry reference says what to write.
    let malformed = other.run(&["pull", "team/web:1"]);
    assert!(
        text(&malformed).contains("HOST[:PORT]/REPOSITORY[:TAG]"),
        "{}",
        text(&malformed)
    );
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

impl Site {
    /// `suggest` for the fixture workspace of the suggestion tests, as JSON lines.
    fn suggestions(&self) -> Vec<serde_json::Value> {
        let output = binary()
            .arg("--store")
            .arg(self.store())
            .args(["suggest", "--message-format", "json"])
            .current_dir(fixtures().join("suggest"))
            .env_remove("CARGO_TARGET_DIR")
            .output()
            .expect("runs");
        assert!(output.status.success(), "{}", text(&output));
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect()
    }
}

#[test]
fn a_history_pushed_by_one_store_gives_another_its_evidence_once() {
    let registry = Registry::start();
    let host = registry.host();
    let source = source_site();
    let history = fixtures().join("suggest/history.jsonl");
    source.ok(&["history", "import", &history.to_string_lossy()]);
    let pushed = source.ok(&["history", "push", &format!("{host}/team/history:1")]);
    // The fixture's 40 derivations and the store's one build of `web`.
    assert!(pushed.contains("41 derivations"), "{pushed}");

    let other = Site::new();
    assert!(other.suggestions().is_empty(), "no history, no suggestions");
    let pulled = other.ok(&["history", "pull", &format!("{host}/team/history:1")]);
    assert!(
        pulled.contains(&format!("origin pull:{host}/team/history")),
        "{pulled}"
    );
    let expected = source.suggestions();
    assert!(!expected.is_empty());
    assert_eq!(other.suggestions(), expected, "the same evidence");

    // Pulled again: merged, not added.
    let origins = other.ok(&["history", "--message-format", "json"]);
    other.ok(&["history", "pull", &format!("{host}/team/history:1")]);
    assert_eq!(other.ok(&["history", "--message-format", "json"]), origins);
    assert_eq!(other.suggestions(), expected);

    // An image is not a history.
    source.ok(&["push", "web", &format!("{host}/team/web")]);
    let refused = other.run(&["history", "pull", &format!("{host}/team/web:1")]);
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("is not a cargo-appliance history"),
        "{}",
        text(&refused)
    );
}

#[test]
fn a_base_missing_from_the_store_comes_from_the_registry_and_the_lock_pins_it() {
    let registry = Registry::start();
    let host = registry.host();
    let source = source_site();
    source.ok(&[
        "push",
        "debian/bookworm",
        &format!("{host}/team/debian/bookworm"),
    ]);

    let site = Site::new();
    site.workspace_on("debian/bookworm", "from the registry\n");
    let manifest = site.workspace().join("appliance.kdl");
    let original = std::fs::read_to_string(&manifest).expect("manifest");
    std::fs::write(
        &manifest,
        original.replace(
            "base \"debian/bookworm\"",
            &format!("base \"debian/bookworm\" version=\">=1\" registry=\"{host}/team\""),
        ),
    )
    .expect("write");
    let cargo_toml = site.workspace().join("Cargo.toml");
    let cargo_toml = cargo_toml.to_string_lossy().into_owned();

    // --offline never reaches the registry.
    let offline = site.run(&["build", "--manifest-path", &cargo_toml, "--offline"]);
    assert!(!offline.status.success());
    assert!(
        text(&offline).contains("appliance::base-offline"),
        "{}",
        text(&offline)
    );
    assert_eq!(registry.requests("GET", "/v2/team/"), 0, "nothing asked");

    let built = site.ok(&["build", "--manifest-path", &cargo_toml]);
    assert!(
        built.contains(&format!(
            "Pulling debian/bookworm@1 from {host}/team/debian/bookworm:1"
        )),
        "{built}"
    );
    let images = site.images();
    let source_base = source
        .images()
        .into_iter()
        .find(|(image, _, _)| image == "debian/bookworm@1")
        .expect("the source's base");
    assert!(images.contains(&source_base), "{images:?}");
    let lock = std::fs::read_to_string(site.workspace().join("Appliance.lock")).expect("lock");
    let pulled = lock
        .lines()
        .find_map(|l| l.split("pulled=\"").nth(1))
        .and_then(|rest| rest.split('"').next())
        .expect("the lock pins what was pulled");
    assert!(
        pulled.starts_with(&format!("{host}/team/debian/bookworm@sha256:")),
        "{lock}"
    );

    // Built again: the store has it, the registry is not asked.
    let asked = registry.requests("GET", "/v2/team/");
    site.ok(&["build", "--manifest-path", &cargo_toml]);
    assert_eq!(registry.requests("GET", "/v2/team/"), asked);

    // A teammate's empty store with the committed lock pulls exactly the pinned manifest,
    // even after a newer version was pushed.
    source.ok(&[
        "image",
        "import",
        "debian/bookworm@2",
        &support::minbase_tarball().to_string_lossy(),
    ]);
    source.ok(&[
        "push",
        "debian/bookworm@2",
        &format!("{host}/team/debian/bookworm"),
    ]);
    std::fs::remove_dir_all(site.store()).expect("store removed");
    let digest = pulled.split('@').nth(1).expect("digest");
    let pinned_reads = registry.requests("GET", &format!("/manifests/{digest}"));
    site.ok(&["build", "--manifest-path", &cargo_toml, "--locked"]);
    assert!(registry.requests("GET", &format!("/manifests/{digest}")) > pinned_reads);
    assert!(
        site.images()
            .iter()
            .all(|(image, _, _)| image != "debian/bookworm@2"),
        "{:?}",
        site.images()
    );
}

/// `support/hostile_registry.py` serving one broken image on loopback; stopped on drop.
struct HostileRegistry {
    port: u16,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl HostileRegistry {
    fn start(scenario: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port_file = dir.path().join("port");
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/hostile_registry.py");
        let child = Command::new("python3")
            .arg(script)
            .arg(scenario)
            .arg(&port_file)
            .spawn()
            .expect("python3 runs");
        let start = std::time::Instant::now();
        let port = loop {
            if let Some(port) = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|p| p.trim().parse().ok())
            {
                break port;
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(10),
                "the server did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        Self {
            port,
            child,
            _dir: dir,
        }
    }

    fn reference(&self) -> String {
        format!("127.0.0.1:{}/hostile/image:1", self.port)
    }
}

impl Drop for HostileRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Site {
    /// Nothing listed, nothing staged, every object accounted for.
    fn holds_nothing(&self) {
        assert!(
            self.images().is_empty(),
            "nothing stored: {:?}",
            self.images()
        );
        let staging = self.store().join("staging");
        let left: Vec<_> = std::fs::read_dir(&staging)
            .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "staging left behind: {left:?}");
        self.fsck_is_clean();
    }
}

#[test]
fn hostile_registry_answers_fail_the_pull_clearly_and_store_nothing() {
    for (scenario, expected) in [
        (
            "wrong-digest",
            "does not hash to the digest its manifest names",
        ),
        ("short-blob", "ended early"),
        ("oversized-manifest", "larger than 4 MiB"),
        ("redirect-loop", "redirects in a loop"),
        ("unauthorized", "skopeo login"),
    ] {
        let server = HostileRegistry::start(scenario);
        let site = Site::new();
        let output = site.run(&["pull", &server.reference()]);
        let said = text(&output);
        assert!(!output.status.success(), "{scenario}: {said}");
        assert!(
            said.contains(expected),
            "{scenario}: expected {expected:?} in {said}"
        );
        assert!(said.contains("error: "), "{scenario}: {said}");
        site.holds_nothing();
    }
}

#[test]
fn a_pull_stopped_mid_transfer_leaves_nothing_listed() {
    for signal in ["KILL", "TERM"] {
        let server = HostileRegistry::start("slow-blob");
        let site = Site::new();
        site.ok(&["images"]);
        let mut pull = binary()
            .arg("--store")
            .arg(site.store())
            .args(["pull", &server.reference()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("pull starts");
        // The transfer has begun once skopeo runs and the pull has its staging directory.
        let start = std::time::Instant::now();
        while std::fs::read_dir(site.store().join("staging"))
            .map_or(true, |mut d| d.next().is_none())
        {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(20),
                "no transfer"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
        let killed = Command::new("kill")
            .args([&format!("-{signal}"), &pull.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(killed.success());
        let status = pull.wait().expect("wait");
        assert!(!status.success(), "{signal}: {status:?}");
        let port = server.port.to_string();
        let start = std::time::Instant::now();
        while Command::new("pgrep")
            .args(["-f", &format!("skopeo.*127.0.0.1:{port}")])
            .status()
            .is_ok_and(|s| s.success())
        {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(5),
                "{signal}: skopeo still runs"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        if signal == "KILL" {
            // What SIGKILL leaves is gc's to remove; nothing is listed meanwhile.
            assert!(site.images().is_empty());
            site.ok(&["gc"]);
        }
        site.holds_nothing();
    }
}

fn openssl(args: &[&str], dir: &Path) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs (installed by .ci/install-deps)");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        text(&output)
    );
}

/// A CA and a certificate for 127.0.0.1 signed by it, in `dir`: ca/ca.crt, server.crt,
/// server.key.
fn make_certificates(dir: &Path) {
    std::fs::create_dir_all(dir.join("ca")).expect("mkdir");
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca/ca.crt",
            "-subj",
            "/CN=cargo-appliance test CA",
            "-days",
            "2",
        ],
        dir,
    );
    openssl(
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
        dir,
    );
    write(&dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n");
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca/ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
        dir,
    );
}

#[test]
fn a_registry_with_tls_and_credentials_is_reached_as_the_container_tools_reach_it() {
    let work = tempfile::tempdir().expect("temp dir");
    let tls = work.path().join("tls");
    make_certificates(&tls);
    let other_ca = work.path().join("other");
    make_certificates(&other_ca);
    let hash = Command::new("python3")
        .args([
            "-W",
            "ignore",
            "-c",
            "import crypt; print(crypt.crypt('s3cret', crypt.mksalt(crypt.METHOD_BLOWFISH)))",
        ])
        .output()
        .expect("python3 runs");
    assert!(hash.status.success(), "{}", text(&hash));
    let htpasswd = work.path().join("htpasswd");
    write(
        &htpasswd,
        &format!("team:{}", String::from_utf8_lossy(&hash.stdout)),
    );
    let registry = Registry::start_with(&support::Guard {
        tls: Some((&tls.join("server.crt"), &tls.join("server.key"))),
        htpasswd: Some(&htpasswd),
    });
    let host = registry.host();
    // Credentials where skopeo and podman keep them; none anywhere else.
    let home = work.path().join("home");
    std::fs::create_dir_all(&home).expect("home");
    let auth = work.path().join("auth.json");
    let token = {
        let output = Command::new("python3")
            .args([
                "-c",
                "import base64; print(base64.b64encode(b'team:s3cret').decode())",
            ])
            .output()
            .expect("python3 runs");
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    };
    write(
        &auth,
        &format!("{{\"auths\": {{\"{host}\": {{\"auth\": \"{token}\"}}}}}}"),
    );
    let source = source_site();
    let ca = tls.join("ca").to_string_lossy().into_owned();
    let reference = format!("{host}/team/web");
    let run = |site: &Site, args: &[&str], credentials: bool| {
        let mut command = binary();
        command
            .arg("--store")
            .arg(site.store())
            .args(args)
            .env("HOME", &home)
            .env("XDG_RUNTIME_DIR", &home)
            .env("CARGO_TARGET_DIR", site.dir.path().join("target"));
        if credentials {
            command.env("REGISTRY_AUTH_FILE", &auth);
        } else {
            command.env("REGISTRY_AUTH_FILE", home.join("none.json"));
        }
        command.output().expect("runs")
    };

    let refused = run(
        &source,
        &["push", "web", &reference, "--cert-dir", &ca],
        false,
    );
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("skopeo login"),
        "{}",
        text(&refused)
    );

    let pushed = run(
        &source,
        &["push", "web", &reference, "--lineage", "--cert-dir", &ca],
        true,
    );
    assert!(pushed.status.success(), "{}", text(&pushed));

    let other = Site::new();
    let untrusted = run(
        &other,
        &[
            "pull",
            &format!("{reference}:1"),
            "--cert-dir",
            &other_ca.join("ca").to_string_lossy(),
        ],
        true,
    );
    assert!(!untrusted.status.success());
    assert!(
        text(&untrusted).contains("--cert-dir"),
        "{}",
        text(&untrusted)
    );
    other.holds_nothing();

    let pulled = run(
        &other,
        &["pull", &format!("{reference}:1"), "--cert-dir", &ca],
        true,
    );
    assert!(pulled.status.success(), "{}", text(&pulled));
    assert_eq!(other.images(), source.images());

    // A build pulls its base through the same TLS: `--cert-dir` reaches the base's pull.
    let builder = Site::new();
    builder.workspace_on("web", "edge\n");
    let manifest = builder.workspace().join("appliance.kdl");
    write(
        &manifest,
        &format!(
            "appliance \"edge\" {{\n    base \"web\" registry=\"{host}/team\"\n    copy \"etc/motd\" to=\"/etc/motd\"\n}}\n"
        ),
    );
    let cargo_toml = builder.workspace().join("Cargo.toml");
    let cargo_toml = cargo_toml.to_string_lossy().into_owned();
    let build = |cert_dir: &str| {
        run(
            &builder,
            &[
                "build",
                "--manifest-path",
                &cargo_toml,
                "--cert-dir",
                cert_dir,
            ],
            true,
        )
    };
    let untrusted = build(&other_ca.join("ca").to_string_lossy());
    assert!(!untrusted.status.success());
    assert!(
        text(&untrusted).contains("--cert-dir"),
        "{}",
        text(&untrusted)
    );
    let built = build(&ca);
    assert!(built.status.success(), "{}", text(&built));
    assert!(
        builder
            .images()
            .iter()
            .any(|(reference, _, _)| reference == "edge@1"),
        "{:?}",
        builder.images()
    );
}

#[test]
fn build_push_sends_what_it_built_with_its_lineage() {
    let registry = Registry::start();
    let host = registry.host();
    let source = source_site();
    let manifest = source.workspace().join("Cargo.toml");
    let built = source.ok(&[
        "build",
        "--manifest-path",
        &manifest.to_string_lossy(),
        "--push",
        &format!("{host}/ci/{{appliance}}:ci-{{version}}"),
    ]);
    assert!(
        built.contains(&format!("web@1 → {host}/ci/web:ci-1")),
        "{built}"
    );
    for image in ["ci/web:ci-1", "ci/debian/bookworm:1"] {
        skopeo(&[
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{host}/{image}"),
        ]);
    }
    let malformed = source.run(&[
        "build",
        "--manifest-path",
        &manifest.to_string_lossy(),
        "--push",
        "no-registry",
    ]);
    assert!(!malformed.status.success());
    assert!(
        !text(&malformed).contains("Fresh"),
        "refused before building: {}",
        text(&malformed)
    );
    assert!(
        text(&malformed).contains("--push no-registry: `no-registry` is not a registry host"),
        "{}",
        text(&malformed)
    );
}
