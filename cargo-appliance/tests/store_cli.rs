//! The store through the real binary, with real Debian content: a minbase root filesystem
//! made by mmdebstrap (cached in Cargo's target directory between runs).

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

mod support;
use support::{binary, is_root, minbase_tarball};

fn run(store: &Path, args: &[&str]) -> Output {
    binary()
        .arg("--store")
        .arg(store)
        .args(args)
        .output()
        .expect("the binary runs")
}

fn ok(store: &Path, args: &[&str]) -> String {
    let output = run(store, args);
    assert!(
        output.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn listing(archive: &Path) -> Vec<serde_json::Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/tar_listing.py");
    let output = Command::new("python3")
        .arg(script)
        .arg(archive)
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("JSON"))
        .collect()
}

fn dir_size(path: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("readdir").flatten() {
            let meta = entry.metadata().expect("stat");
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                total += meta.len();
            }
        }
    }
    total
}

#[test]
fn a_minbase_root_filesystem_round_trips_with_the_same_listing() {
    let tarball = minbase_tarball();
    let work = tempfile::tempdir().expect("temp dir");
    let store = work.path().join("store");
    ok(
        &store,
        &[
            "image",
            "import",
            "debian/bookworm",
            tarball.to_str().expect("utf-8"),
        ],
    );
    let exported = work.path().join("export.tar");
    ok(
        &store,
        &[
            "image",
            "export",
            "debian/bookworm",
            "-o",
            exported.to_str().expect("utf-8"),
        ],
    );
    let original = listing(&tarball);
    let ours = listing(&exported);
    assert!(
        original.len() > 5000,
        "a minbase tree has thousands of entries: {}",
        original.len()
    );
    assert_eq!(original.len(), ours.len());
    for (a, b) in original.iter().zip(&ours) {
        assert_eq!(a, b);
    }
    // The packages were read from the image's own dpkg status.
    let show: serde_json::Value = serde_json::from_str(&ok(
        &store,
        &[
            "image",
            "show",
            "debian/bookworm",
            "--message-format",
            "json",
        ],
    ))
    .expect("json");
    let packages = show["packages"].as_array().expect("packages");
    assert!(
        packages.iter().any(|p| p["name"] == "base-files"),
        "{packages:?}"
    );
    assert!(packages.len() > 50);

    // Deterministic tar output: two exports are byte-identical.
    let again = work.path().join("again.tar");
    ok(
        &store,
        &[
            "image",
            "export",
            "debian/bookworm",
            "-o",
            again.to_str().expect("utf-8"),
        ],
    );
    assert_eq!(
        std::fs::read(&exported).expect("read"),
        std::fs::read(&again).expect("read")
    );
}

#[test]
fn a_second_image_sharing_most_files_stores_only_the_new_ones() {
    let tarball = minbase_tarball();
    let work = tempfile::tempdir().expect("temp dir");
    let store = work.path().join("store");
    ok(
        &store,
        &[
            "image",
            "import",
            "debian/bookworm",
            tarball.to_str().expect("utf-8"),
        ],
    );
    let before = dir_size(&store.join("objects"));

    let tree = work.path().join("tree");
    ok(
        &store,
        &[
            "image",
            "export",
            "debian/bookworm",
            "-o",
            tree.to_str().expect("utf-8"),
        ],
    );
    let new_content: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::create_dir_all(tree.join("srv/app")).expect("mkdir");
    std::fs::write(tree.join("srv/app/data.bin"), &new_content).expect("write");
    std::fs::write(tree.join("etc/motd"), b"a derived image\n").expect("write");
    ok(
        &store,
        &[
            "image",
            "import",
            "web",
            tree.to_str().expect("utf-8"),
            "--parent",
            "debian/bookworm",
        ],
    );
    let after = dir_size(&store.join("objects"));
    let growth = after - before;
    let new_bytes = new_content.len() as u64 + 16;
    assert!(
        growth >= new_bytes,
        "grew {growth}, new content is {new_bytes}"
    );
    assert!(
        growth < new_bytes + 64 * 1024,
        "grew {growth} bytes for {new_bytes} bytes of new content"
    );

    let tree_output = ok(&store, &["images", "--tree"]);
    let lines: Vec<&str> = tree_output.lines().collect();
    assert!(lines[0].starts_with("debian/bookworm@1"), "{tree_output}");
    assert!(lines[1].starts_with("└── web@1"), "{tree_output}");
}

#[test]
fn killing_imports_at_random_moments_never_leaves_a_listed_half_image() {
    let tarball = minbase_tarball();
    let work = tempfile::tempdir().expect("temp dir");
    let store = work.path().join("store");
    let tarball_arg = tarball.to_str().expect("utf-8");

    // A first import fills the objects and shows what a complete image looks like; a second,
    // timed, is what each victim below costs (its content is already stored), so the kills
    // spread over the whole window.
    let probe: serde_json::Value = serde_json::from_str(&ok(
        &store,
        &[
            "image",
            "import",
            "probe",
            tarball_arg,
            "--message-format",
            "json",
        ],
    ))
    .expect("json");
    let started = std::time::Instant::now();
    ok(&store, &["image", "import", "probe", tarball_arg]);
    let full = started.elapsed();
    let complete_entries = probe["entry_count"].as_i64().expect("entry count");

    let mut seed: u64 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1;
    let mut killed = 0;
    // Until 50 imports have really been interrupted (an import that finished before its kill
    // does not count), bounded so a machine that imports too fast still ends.
    for round in 0..200 {
        if killed == 50 {
            break;
        }
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = full.mul_f64((seed % 1000) as f64 / 1000.0 * 0.6);
        let mut child = binary()
            .arg("--store")
            .arg(&store)
            .args(["image", "import", "victim", tarball_arg])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        std::thread::sleep(delay);
        let _ = child.kill();
        let status = child.wait().expect("wait");
        if !status.success() {
            killed += 1;
        }
        let fsck = run(&store, &["fsck", "--message-format", "json"]);
        let report: serde_json::Value = serde_json::from_slice(&fsck.stdout).expect("fsck json");
        assert!(
            fsck.status.success(),
            "round {round} (after {delay:?}): fsck reports {report}"
        );
        let images = ok(&store, &["images", "--message-format", "json"]);
        for line in images.lines() {
            let image: serde_json::Value = serde_json::from_str(line).expect("json");
            assert_eq!(
                image["entry_count"].as_i64(),
                Some(complete_entries),
                "round {round}: half image listed: {image}"
            );
        }
    }
    assert_eq!(
        killed, 50,
        "the kills came too late to interrupt 50 imports"
    );

    // The next import succeeds, exports, and gc leaves a clean store.
    ok(&store, &["image", "import", "after-the-storm", tarball_arg]);
    ok(
        &store,
        &[
            "image",
            "export",
            "after-the-storm",
            "-o",
            work.path().join("out.tar").to_str().expect("utf-8"),
        ],
    );
    ok(&store, &["gc"]);
    let fsck: serde_json::Value =
        serde_json::from_str(&ok(&store, &["fsck", "--message-format", "json"])).expect("json");
    assert_eq!(fsck["unreferenced_objects"], 0);
    assert!(
        std::fs::read_dir(store.join("staging"))
            .expect("staging")
            .next()
            .is_none()
    );
}

#[test]
fn two_imports_at_once_both_succeed_and_gc_waits_for_them() {
    let tarball = minbase_tarball();
    let work = tempfile::tempdir().expect("temp dir");
    let store = work.path().join("store");
    ok(&store, &["images"]);
    let spawn = |name: &str| {
        binary()
            .arg("--store")
            .arg(&store)
            .args(["image", "import", name, tarball.to_str().expect("utf-8")])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn")
    };
    let first = spawn("one");
    let second = spawn("two");
    // gc while both run: it must wait for their leases, never delete their objects.
    std::thread::sleep(Duration::from_millis(200));
    ok(&store, &["gc"]);
    for child in [first, second] {
        let output = child.wait_with_output().expect("wait");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let fsck: serde_json::Value =
        serde_json::from_str(&ok(&store, &["fsck", "--message-format", "json"])).expect("json");
    assert_eq!(fsck["missing_objects"], serde_json::json!([]));
    assert_eq!(fsck["corrupt_objects"], serde_json::json!([]));
    ok(
        &store,
        &[
            "image",
            "export",
            "one",
            "-o",
            work.path().join("one.tar").to_str().expect("utf-8"),
        ],
    );
    ok(
        &store,
        &[
            "image",
            "export",
            "two",
            "-o",
            work.path().join("two.tar").to_str().expect("utf-8"),
        ],
    );
}

#[test]
fn exporting_to_a_directory_and_importing_it_again_gives_the_same_tree() {
    let tarball = minbase_tarball();
    let work = tempfile::tempdir().expect("temp dir");
    let store = work.path().join("store");
    let original: serde_json::Value = serde_json::from_str(&ok(
        &store,
        &[
            "image",
            "import",
            "debian/bookworm",
            tarball.to_str().expect("utf-8"),
            "--message-format",
            "json",
        ],
    ))
    .expect("json");
    let tree = work.path().join("tree");
    ok(
        &store,
        &[
            "image",
            "export",
            "debian/bookworm",
            "-o",
            tree.to_str().expect("utf-8"),
        ],
    );
    let again: serde_json::Value = serde_json::from_str(&ok(
        &store,
        &[
            "image",
            "import",
            "again",
            tree.to_str().expect("utf-8"),
            "--message-format",
            "json",
        ],
    ))
    .expect("json");
    // Ownership and device nodes only survive a directory when we are root.
    if is_root() {
        assert_eq!(original["tree_digest"], again["tree_digest"]);
    }
    assert_eq!(original["entry_count"], again["entry_count"]);
    // Exporting into a non-empty directory is refused rather than merged.
    let output = run(
        &store,
        &[
            "image",
            "export",
            "again",
            "-o",
            tree.to_str().expect("utf-8"),
        ],
    );
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("not empty"));
}

#[test]
fn base_create_runs_mmdebstrap_and_records_provenance() {
    let work = tempfile::tempdir().expect("temp dir");
    let store = work.path().join("store");
    let created: serde_json::Value = serde_json::from_str(&ok(
        &store,
        &[
            "base",
            "create",
            "debian/bookworm",
            "--suite",
            "bookworm",
            "--variant",
            "minbase",
            "--include",
            "ca-certificates",
            "--message-format",
            "json",
        ],
    ))
    .expect("json");
    let provenance = &created["provenance"];
    assert_eq!(provenance["suite"], "bookworm");
    assert_eq!(provenance["variant"], "minbase");
    assert_eq!(
        provenance["include"],
        serde_json::json!(["ca-certificates"])
    );
    assert!(
        provenance["mirror"]
            .as_array()
            .is_some_and(|m| !m.is_empty()),
        "{provenance}"
    );
    assert!(
        provenance["packages"]["ca-certificates"].is_string(),
        "{provenance}"
    );
    assert!(
        provenance["packages"]["base-files"].is_string(),
        "{provenance}"
    );

    let output = run(
        &store,
        &[
            "base",
            "create",
            "x",
            "--suite",
            "bookworm",
            "--variant",
            "huge",
        ],
    );
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown variant `huge`"));
}

#[test]
fn image_references_resolve_by_name_version_and_digest_prefix() {
    let work = tempfile::tempdir().expect("temp dir");
    let store = work.path().join("store");
    let source = work.path().join("src");
    std::fs::create_dir_all(source.join("etc")).expect("mkdir");
    std::fs::write(source.join("etc/hostname"), "one\n").expect("write");
    ok(
        &store,
        &["image", "import", "demo", source.to_str().expect("utf-8")],
    );
    std::fs::write(source.join("etc/hostname"), "two\n").expect("write");
    ok(
        &store,
        &["image", "import", "demo", source.to_str().expect("utf-8")],
    );
    ok(
        &store,
        &[
            "image",
            "import",
            "demo@10",
            source.to_str().expect("utf-8"),
        ],
    );
    let newest: serde_json::Value = serde_json::from_str(&ok(
        &store,
        &["image", "show", "demo", "--message-format", "json"],
    ))
    .expect("json");
    assert_eq!(newest["version"], "10");
    let first: serde_json::Value = serde_json::from_str(&ok(
        &store,
        &["image", "show", "demo@1", "--message-format", "json"],
    ))
    .expect("json");
    let prefix = &first["tree_digest"].as_str().expect("digest")[..10];
    let by_digest: serde_json::Value = serde_json::from_str(&ok(
        &store,
        &["image", "show", prefix, "--message-format", "json"],
    ))
    .expect("json");
    assert_eq!(by_digest["version"], "1");
    let output = run(&store, &["image", "show", "dmeo"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("did you mean `demo`?"));
    let output = run(
        &store,
        &[
            "image",
            "import",
            "demo@10",
            source.to_str().expect("utf-8"),
        ],
    );
    assert!(String::from_utf8_lossy(&output.stderr).contains("already in the store"));
    let output = run(
        &store,
        &[
            "image",
            "import",
            "Bad;Name",
            source.to_str().expect("utf-8"),
        ],
    );
    assert_eq!(output.status.code(), Some(1));
}

#[test]
fn derived_imports_record_their_changes_and_history_follows_the_images() {
    let work = tempfile::tempdir().expect("temp dir");
    let store = work.path().join("store");
    let base = work.path().join("base");
    std::fs::create_dir_all(base.join("etc")).expect("mkdir");
    std::fs::write(base.join("etc/hostname"), "debian\n").expect("write");
    std::fs::write(base.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").expect("write");
    ok(
        &store,
        &["image", "import", "base", base.to_str().expect("utf-8")],
    );
    let child = work.path().join("child");
    std::fs::create_dir_all(child.join("etc/systemd/system/multi-user.target.wants"))
        .expect("mkdir");
    std::fs::create_dir_all(child.join("srv")).expect("mkdir");
    std::fs::write(child.join("etc/hostname"), "web\n").expect("write");
    std::fs::write(
        child.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napi:x:999:999::/var/lib/api:/usr/sbin/nologin\n",
    )
    .expect("write");
    std::fs::write(child.join("srv/index.html"), "<h1>hi</h1>\n").expect("write");
    std::os::unix::fs::symlink(
        "/etc/systemd/system/api.service",
        child.join("etc/systemd/system/multi-user.target.wants/api.service"),
    )
    .expect("symlink");
    ok(
        &store,
        &[
            "image",
            "import",
            "web",
            child.to_str().expect("utf-8"),
            "--parent",
            "base",
        ],
    );

    // The hostname is a change `diff` shows, but a value unique to one image: never history.
    let expected = serde_json::json!({
        "parent": "base",
        "child": "web@1",
        "changes": [
            {"kind": "file-added", "subject": "/srv/index.html"},
            {"kind": "service-enabled", "subject": "api.service"},
            {"kind": "user-added", "subject": "api"},
        ],
    });
    let export = |name: &str| -> Vec<serde_json::Value> {
        let path = work.path().join(name);
        ok(
            &store,
            &["history", "export", path.to_str().expect("utf-8")],
        );
        std::fs::read_to_string(&path)
            .expect("read")
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect()
    };
    assert_eq!(export("recorded.jsonl"), vec![expected.clone()]);
    ok(&store, &["history", "rebuild"]);
    assert_eq!(export("rebuilt.jsonl"), vec![expected]);
    let diff = ok(&store, &["diff", "base", "web", "--message-format", "json"]);
    assert_eq!(diff.lines().count(), 4, "{diff}");
    assert!(diff.contains("\"kind\":\"hostname\""), "{diff}");
    ok(&store, &["image", "rm", "web"]);
    assert!(export("after-rm.jsonl").is_empty());
}

/// docs/HOSTILE.md item 34: the disk fills up during an import. The store sits on a 48 MiB tmpfs
/// mounted in a private mount namespace (nothing outside the test sees it); a 64 MiB import
/// fails with the system's message, and afterwards fsck is clean, the half image is not
/// listed, its staged objects are gone, and a small import fits again.
#[test]
fn a_full_disk_during_an_import_is_a_clear_error_and_the_store_stays_consistent() {
    if !is_root() {
        panic!("the full-disk test needs root to mount a small tmpfs in its own namespace");
    }
    let work = tempfile::tempdir().expect("temp dir");
    let small = work.path().join("small");
    std::fs::create_dir_all(small.join("etc")).expect("mkdir");
    std::fs::write(small.join("etc/motd"), "small\n").expect("write");
    let big = work.path().join("big");
    std::fs::create_dir_all(&big).expect("mkdir");
    let mut noise = vec![0u8; 64 << 20];
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for chunk in noise.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(big.join("noise"), &noise).expect("write");
    let mount_point = work.path().join("small-disk");
    std::fs::create_dir_all(&mount_point).expect("mkdir");
    let results = work.path().join("results");
    std::fs::create_dir_all(&results).expect("mkdir");
    let script = r#"
        set -u
        mount -t tmpfs -o size=48m tmpfs "$DISK" || exit 90
        "$BIN" --store "$DISK/store" image import small "$SMALL" || exit 91
        "$BIN" --store "$DISK/store" image import big "$BIG" 2>"$OUT/big.err"
        echo $? >"$OUT/big.status"
        "$BIN" --store "$DISK/store" fsck >"$OUT/fsck.out" 2>&1
        echo $? >"$OUT/fsck.status"
        "$BIN" --store "$DISK/store" images --message-format json >"$OUT/images.json"
        ls -A "$DISK/store/staging" >"$OUT/staging" 2>/dev/null
        "$BIN" --store "$DISK/store" image import small-again "$SMALL" 2>"$OUT/again.err"
        echo $? >"$OUT/again.status"
    "#;
    let status = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", script])
        .env("DISK", &mount_point)
        .env("BIN", env!("CARGO_BIN_EXE_cargo-appliance"))
        .env("APPLIANCE_NO_SEED", "1")
        .env("SMALL", &small)
        .env("BIG", &big)
        .env("OUT", &results)
        .status()
        .expect("unshare runs");
    assert!(status.success(), "the namespace script failed: {status}");
    let read = |name: &str| std::fs::read_to_string(results.join(name)).unwrap_or_default();
    assert_ne!(read("big.status").trim(), "0", "the big import cannot fit");
    let error = read("big.err");
    assert!(error.contains("No space left on device"), "{error}");
    assert!(
        error.contains("noise"),
        "the error names the entry: {error}"
    );
    assert_eq!(read("fsck.status").trim(), "0", "{}", read("fsck.out"));
    let listed: Vec<String> = read("images.json")
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|image| image["name"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(listed, ["small"]);
    assert_eq!(
        read("staging").trim(),
        "",
        "the failed import's staging is gone"
    );
    assert_eq!(read("again.status").trim(), "0", "{}", read("again.err"));
}

/// A flipped object: the command that meets it and `fsck` say what is wrong and which
/// command cures it, `fsck --repair` does what they said, and the image is then refused
/// for what it is (marked), not for a digest mismatch.
#[test]
fn a_corrupt_object_is_reported_with_the_repair_that_cures_it() {
    let work = tempfile::tempdir().expect("temp dir");
    let store = work.path().join("store");
    let rootfs = work.path().join("rootfs");
    std::fs::create_dir_all(rootfs.join("etc")).expect("mkdir");
    let content = "a message of the day that will be damaged\n";
    std::fs::write(rootfs.join("etc/motd"), content).expect("write");
    ok(
        &store,
        &["image", "import", "tiny", rootfs.to_str().expect("utf-8")],
    );
    let fsck: serde_json::Value =
        serde_json::from_str(&ok(&store, &["fsck", "--message-format", "json"])).expect("json");
    assert_eq!(fsck["objects_checked"], 1, "{fsck}");
    // The one object: flip its content (same length, another digest).
    let object = std::fs::read_dir(store.join("objects"))
        .expect("objects")
        .flatten()
        .filter(|fan| fan.path().is_dir())
        .flat_map(|fan| std::fs::read_dir(fan.path()).expect("fan").flatten())
        .map(|entry| entry.path())
        .next()
        .expect("an object");
    let digest = format!(
        "{}{}",
        object
            .parent()
            .and_then(|p| p.file_name())
            .expect("fan")
            .to_string_lossy(),
        object.file_name().expect("name").to_string_lossy()
    );
    std::fs::set_permissions(&object, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .expect("chmod");
    std::fs::write(&object, content.replace("day", "dax")).expect("flip");

    let exported = work.path().join("out.tar");
    let export_tiny = || {
        let destination = exported.to_str().expect("utf-8");
        run(&store, &["image", "export", "tiny", "-o", destination])
    };
    let export = export_tiny();
    assert!(!export.status.success());
    let stderr = String::from_utf8_lossy(&export.stderr);
    assert!(
        stderr.contains(&format!("object {digest} is corrupt")),
        "{stderr}"
    );
    assert!(stderr.contains("cargo appliance fsck --repair"), "{stderr}");

    let check = run(&store, &["fsck"]);
    assert!(!check.status.success());
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert!(
        stdout.contains(&format!(
            "corrupt object {digest} (`cargo appliance fsck --repair` sets it aside)"
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains("image tiny@1 needs repair (`cargo appliance fsck --repair` marks it"),
        "{stdout}"
    );

    let repaired = run(&store, &["fsck", "--repair"]);
    let stdout = String::from_utf8_lossy(&repaired.stdout);
    assert!(
        stdout.contains(&format!("corrupt object {digest} (moved to quarantine/)")),
        "{stdout}"
    );
    assert!(store.join("quarantine").join(&digest).is_file());
    let after = run(&store, &["fsck"]);
    let stdout = String::from_utf8_lossy(&after.stdout);
    assert!(
        stdout.contains(&format!(
            "missing object {digest} (`cargo appliance fsck --repair` marks"
        )),
        "{stdout}"
    );
    let export = export_tiny();
    let stderr = String::from_utf8_lossy(&export.stderr);
    assert!(
        stderr.contains("tiny@1 has corrupt objects (fsck marked it)"),
        "{stderr}"
    );
}
