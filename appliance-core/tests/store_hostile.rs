//! The store against hostile archives and faults (docs/HOSTILE.md). Every test imports
//! into a fresh store next to a sentinel directory and checks the sentinel is byte-for-byte
//! unchanged afterwards (the "escape oracle"), besides the outcome the catalogue asks for.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use appliance_core::store::Store;
use appliance_core::store::import::Limits;
use appliance_core::store::tree::EntryKind;

/// A store and a sentinel directory side by side in a temp dir.
struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    store: Store,
    sentinel: BTreeMap<PathBuf, (Vec<u8>, u32)>,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().to_path_buf();
        let outside = root.join("outside");
        std::fs::create_dir_all(outside.join("dir")).expect("mkdir");
        std::fs::write(outside.join("f"), b"outside file").expect("write");
        std::fs::write(outside.join("dir/authorized_keys"), b"keys").expect("write");
        let store = Store::open(&root.join("store")).expect("store opens");
        let sentinel = snapshot(&outside);
        Self {
            _dir: dir,
            root,
            store,
            sentinel,
        }
    }

    fn archive(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.root.join(name);
        std::fs::write(&path, bytes).expect("write archive");
        path
    }

    fn import(
        &self,
        reference: &str,
        bytes: &[u8],
    ) -> anyhow::Result<appliance_core::store::ImageRecord> {
        let path = self.archive(&format!("{}.tar", reference.replace('/', "_")), bytes);
        self.store
            .import(reference, &path, None, serde_json::json!({}))
    }

    fn entries(&self, reference: &str) -> BTreeMap<String, appliance_core::store::tree::Entry> {
        let catalog = self.store.read_catalog().expect("catalog");
        let image = self
            .store
            .resolve(&catalog, reference)
            .expect("image exists");
        catalog.entries(image.id).expect("entries")
    }

    fn images(&self) -> usize {
        self.store.list().expect("list").len()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            assert_eq!(
                snapshot(&self.root.join("outside")),
                self.sentinel,
                "the sentinel directory changed"
            );
        }
    }
}

fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (Vec<u8>, u32)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(current) = stack.pop() {
        let meta = std::fs::symlink_metadata(&current).expect("stat");
        let content = if meta.is_file() {
            std::fs::read(&current).expect("read")
        } else {
            Vec::new()
        };
        out.insert(current.clone(), (content, meta.mode()));
        if meta.is_dir() {
            for entry in std::fs::read_dir(&current).expect("readdir") {
                stack.push(entry.expect("entry").path());
            }
        }
    }
    out
}

/// A raw ustar entry, written by hand so that hostile names (which the `tar` crate refuses
/// to write) can be produced.
fn raw_entry(name: &[u8], flag: u8, link: &[u8], data: &[u8]) -> Vec<u8> {
    let mut header = [0u8; 512];
    header[..name.len().min(100)].copy_from_slice(&name[..name.len().min(100)]);
    header[100..108].copy_from_slice(b"0000644\0");
    header[108..116].copy_from_slice(b"0000000\0");
    header[116..124].copy_from_slice(b"0000000\0");
    header[124..136].copy_from_slice(format!("{:011o}\0", data.len()).as_bytes());
    header[136..148].copy_from_slice(b"00000000000\0");
    header[156] = flag;
    header[157..157 + link.len().min(100)].copy_from_slice(&link[..link.len().min(100)]);
    header[257..263].copy_from_slice(b"ustar\0");
    header[263..265].copy_from_slice(b"00");
    set_checksum(&mut header);
    let mut out = header.to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

/// Recompute a ustar header's checksum after editing its fields.
fn set_checksum(header: &mut [u8]) {
    header[148..156].copy_from_slice(b"        ");
    let sum: u32 = header[..512].iter().map(|&b| u32::from(b)).sum();
    header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
}

fn file(name: &str, data: &[u8]) -> Vec<u8> {
    raw_entry(name.as_bytes(), b'0', b"", data)
}

fn dir(name: &str) -> Vec<u8> {
    raw_entry(name.as_bytes(), b'5', b"", b"")
}

fn symlink(name: &str, target: &str) -> Vec<u8> {
    raw_entry(name.as_bytes(), b'2', target.as_bytes(), b"")
}

fn hardlink(name: &str, target: &str) -> Vec<u8> {
    raw_entry(name.as_bytes(), b'1', target.as_bytes(), b"")
}

fn tar(parts: &[Vec<u8>]) -> Vec<u8> {
    let mut out: Vec<u8> = parts.concat();
    out.extend_from_slice(&[0u8; 1024]);
    out
}

fn error_text(result: anyhow::Result<appliance_core::store::ImageRecord>) -> String {
    format!("{:#}", result.expect_err("import must fail"))
}

#[test]
fn item_01_parent_traversal_is_rejected_and_names_the_entry() {
    let fx = Fixture::new();
    let message = error_text(fx.import("evil", &tar(&[file("../../outside/x", b"pwned")])));
    assert!(message.contains("../../outside/x"), "{message}");
    assert!(message.contains(".."), "{message}");
    assert_eq!(fx.images(), 0);
}

#[test]
fn item_02_absolute_entries_land_inside_the_root() {
    let fx = Fixture::new();
    fx.import(
        "abs",
        &tar(&[file("/etc/passwd", b"root:x:0:0::/root:/bin/sh\n")]),
    )
    .expect("imports");
    let entries = fx.entries("abs");
    assert_eq!(
        entries.get("etc/passwd").map(|e| e.kind),
        Some(EntryKind::File)
    );
}

#[test]
fn item_03_root_entries_that_are_not_directories_are_rejected() {
    for name in [".", "./", "/", "//", ""] {
        for entry in [
            file(name, b"x"),
            symlink(name, "/"),
            hardlink(name, "x"),
            raw_entry(name.as_bytes(), b'3', b"", b""),
        ] {
            let fx = Fixture::new();
            let result = fx.import("root", &tar(&[file("x", b"x"), entry]));
            assert!(result.is_err(), "{name:?} accepted");
            assert_eq!(fx.images(), 0);
        }
    }
}

#[test]
fn item_04_a_file_replaces_a_symlink_to_outside() {
    let fx = Fixture::new();
    let outside = fx.root.join("outside/f");
    let archive = tar(&[
        symlink("s", outside.to_str().expect("utf-8")),
        file("s", b"replaced"),
    ]);
    fx.import("replace", &archive).expect("imports");
    assert_eq!(
        fx.entries("replace").get("s").map(|e| e.kind),
        Some(EntryKind::File)
    );
}

#[test]
fn item_05_entries_through_a_parent_symlink_stay_in_root() {
    let fx = Fixture::new();
    fx.import("up", &tar(&[symlink("s", ".."), file("s/a/b/c", b"c")]))
        .expect("imports in root");
    let entries = fx.entries("up");
    assert!(
        entries.contains_key("a/b/c"),
        "{:?}",
        entries.keys().collect::<Vec<_>>()
    );
}

#[test]
fn item_06_a_directory_replaces_a_symlink_without_touching_its_target() {
    let fx = Fixture::new();
    let outside = fx.root.join("outside/dir");
    let mut d = dir("d");
    d[100..108].copy_from_slice(b"0000777\0");
    set_checksum(&mut d);
    fx.import(
        "d",
        &tar(&[symlink("d", outside.to_str().expect("utf-8")), d]),
    )
    .expect("imports");
    let entry = fx.entries("d").get("d").cloned().expect("d exists");
    assert_eq!((entry.kind, entry.mode), (EntryKind::Dir, 0o777));
}

#[test]
fn item_07_symlink_chains_resolve_in_root_and_hardlinks_cannot_leave() {
    let fx = Fixture::new();
    let archive = tar(&[
        dir("a/b/c"),
        symlink("a/b/c/up", "../.."),
        symlink("a/b/e", "c/up/../.."),
        file("a/b/e/x", b"x"),
        file("target", b"t"),
        hardlink("a/b/e/link", "a/b/e/target"),
    ]);
    fx.import("chains", &archive).expect("imports");
    let entries = fx.entries("chains");
    assert!(
        entries.contains_key("x"),
        "{:?}",
        entries.keys().collect::<Vec<_>>()
    );
    // The link landed at `link` (a/b/e resolves to the root); as the first path of its
    // group it holds the content, and `target` links to it.
    assert_eq!(entries.get("link").map(|e| e.kind), Some(EntryKind::File));
    assert_eq!(
        entries.get("target").and_then(|e| e.link_target.clone()),
        Some("link".into())
    );
    let fx2 = Fixture::new();
    let outside = fx2.root.join("outside/f");
    let result = fx2.import(
        "out",
        &tar(&[hardlink("h", outside.to_str().expect("utf-8"))]),
    );
    assert!(result.is_err());
}

#[test]
fn item_08_hardlinks_to_missing_outside_or_symlinks_are_rejected() {
    for archive in [
        tar(&[hardlink("h", "/etc/shadow")]),
        tar(&[hardlink("h", "../../outside/f")]),
        tar(&[file("f", b"f"), symlink("s", "f"), hardlink("h", "s")]),
    ] {
        let fx = Fixture::new();
        let message = error_text(fx.import("links", &archive));
        assert!(message.contains('h'), "{message}");
        assert_eq!(fx.images(), 0);
    }
}

#[test]
fn item_09_a_planted_link_in_one_layer_cannot_redirect_the_next() {
    let fx = Fixture::new();
    let layer1 = tar(&[symlink("x", "../../../outside")]);
    let layer2 = tar(&[file("x/authorized_keys", b"attacker key")]);
    let layout = oci_layout(&fx.root.join("layout"), &[layer1, layer2]);
    fx.store
        .import("layers", &layout, None, serde_json::json!({}))
        .expect("imports in root");
    let entries = fx.entries("layers");
    assert!(entries.contains_key("outside/authorized_keys"));
}

#[test]
fn item_12_the_same_path_with_different_types_last_wins() {
    let fx = Fixture::new();
    let archive = tar(&[
        file("p", b"1"),
        symlink("p", "/etc"),
        dir("p"),
        file("q", b"2"),
        dir("q"),
        symlink("q", "x"),
    ]);
    fx.import("types", &archive).expect("imports");
    let entries = fx.entries("types");
    assert_eq!(entries.get("p").map(|e| e.kind), Some(EntryKind::Dir));
    assert_eq!(entries.get("q").map(|e| e.kind), Some(EntryKind::Symlink));
}

#[test]
fn item_13_device_nodes_are_recorded_not_created() {
    let fx = Fixture::new();
    let mut null = raw_entry(b"dev/null", b'3', b"", b"");
    null[329..337].copy_from_slice(b"0000001\0");
    null[337..345].copy_from_slice(b"0000003\0");
    set_checksum(&mut null);
    fx.import("dev", &tar(&[null, raw_entry(b"run/fifo", b'6', b"", b"")]))
        .expect("imports");
    let entries = fx.entries("dev");
    let null = entries.get("dev/null").expect("recorded");
    assert_eq!(
        (null.kind, null.device),
        (EntryKind::CharDevice, Some((1, 3)))
    );
    assert_eq!(
        entries.get("run/fifo").map(|e| e.kind),
        Some(EntryKind::Fifo)
    );
}

#[test]
fn item_14_unknown_type_flags_are_rejected() {
    let fx = Fixture::new();
    let message = error_text(fx.import("weird", &tar(&[raw_entry(b"weird", b'Z', b"", b"data")])));
    assert!(
        message.contains("weird") && message.contains("'Z'"),
        "{message}"
    );
}

#[test]
fn item_15_bad_names_and_depths_are_clear_errors() {
    let long_component = format!("{}/f", "a".repeat(300));
    let long_path = "d/".repeat(2600) + "f";
    let deep: String = "n/".repeat(10_000) + "f";
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (gnu_long_name(b"a\nb", b"0"), "newline"),
        (gnu_long_name(&[b'a', 0xff, b'b'], b"0"), "UTF-8"),
        (gnu_long_name(long_component.as_bytes(), b"0"), "255"),
        (gnu_long_name(long_path.as_bytes(), b"0"), "4096"),
        (gnu_long_name(deep.as_bytes(), b"0"), "4096"),
    ];
    for (entry, expected) in cases {
        let fx = Fixture::new();
        let message = error_text(fx.import("names", &tar(&[entry])));
        assert!(
            message.contains(expected),
            "expected {expected:?} in {message}"
        );
    }
}

fn gnu_long_name(name: &[u8], flag: &[u8]) -> Vec<u8> {
    let mut out = raw_entry(b"././@LongLink", b'L', b"", name);
    out.extend(raw_entry(b"short", flag[0], b"", b"x"));
    out
}

#[test]
fn item_18_pax_size_disagreeing_with_ustar_is_rejected_and_nested_tars_list_like_gnu_tar() {
    let fx = Fixture::new();
    let record = b"15 size=999999\n";
    let mut archive = raw_entry(b"PaxHeaders/f", b'x', b"", record);
    archive.extend(file("f", b"12345"));
    let message = error_text(fx.import("pax", &tar(&[archive])));
    assert!(message.contains("ambiguous"), "{message}");

    // A file whose content is itself a tar archive: we list what GNU tar lists.
    let inner = tar(&[file("inner-file", b"hidden")]);
    let outer = tar(&[file("carrier.tar", &inner), file("after", b"a")]);
    let path = fx.archive("nested.tar", &outer);
    fx.store
        .import("nested", &path, None, serde_json::json!({}))
        .expect("imports");
    let ours: Vec<String> = fx
        .entries("nested")
        .keys()
        .filter(|k| !k.is_empty())
        .cloned()
        .collect();
    let gnu = std::process::Command::new("tar")
        .arg("-tf")
        .arg(&path)
        .output()
        .expect("GNU tar runs");
    let mut gnu: Vec<String> = String::from_utf8_lossy(&gnu.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    gnu.sort();
    assert_eq!(ours, gnu);
}

/// Write an OCI image layout with the given layer tarballs (uncompressed).
fn oci_layout(dir: &Path, layers: &[Vec<u8>]) -> PathBuf {
    use sha2::Digest as _;
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("mkdir");
    let put = |bytes: &[u8]| -> (String, usize) {
        let hex: String = sha2::Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        std::fs::write(blobs.join(&hex), bytes).expect("write blob");
        (format!("sha256:{hex}"), bytes.len())
    };
    let layer_descriptors: Vec<serde_json::Value> = layers
        .iter()
        .map(|layer| {
            let (digest, size) = put(layer);
            serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest, "size": size})
        })
        .collect();
    let (config_digest, config_size) =
        put(br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
        "layers": layer_descriptors,
    });
    let (manifest_digest, manifest_size) = put(manifest.to_string().as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest, "size": manifest_size}],
    });
    std::fs::write(dir.join("index.json"), index.to_string()).expect("write index");
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)
        .expect("write layout");
    dir.to_path_buf()
}

#[test]
fn item_19_ambiguous_or_mismatched_oci_documents_are_rejected() {
    let fx = Fixture::new();
    let layout = oci_layout(&fx.root.join("layout"), &[tar(&[file("a", b"a")])]);
    // A descriptor whose digest does not match its blob.
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).expect("index"))
            .expect("json");
    let manifest_digest = index["manifests"][0]["digest"]
        .as_str()
        .expect("digest")
        .to_owned();
    let manifest_path = layout
        .join("blobs/sha256")
        .join(manifest_digest.trim_start_matches("sha256:"));
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).expect("manifest")).expect("json");
    manifest["layers"][0]["size"] = serde_json::json!(12345);
    let tampered = manifest.to_string();
    std::fs::write(&manifest_path, &tampered).expect("write");
    let message = format!(
        "{:#}",
        fx.store
            .import("tampered", &layout, None, serde_json::json!({}))
            .expect_err("rejected")
    );
    assert!(
        message.contains("hashes to") || message.contains("descriptor"),
        "{message}"
    );

    // A manifest with both `manifests` and `layers`, correctly hashed.
    let fx2 = Fixture::new();
    let layout = oci_layout(&fx2.root.join("layout"), &[tar(&[file("a", b"a")])]);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).expect("index"))
            .expect("json");
    let manifest_digest = index["manifests"][0]["digest"]
        .as_str()
        .expect("digest")
        .to_owned();
    let manifest_path = layout
        .join("blobs/sha256")
        .join(manifest_digest.trim_start_matches("sha256:"));
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).expect("manifest")).expect("json");
    manifest["manifests"] = serde_json::json!([]);
    let bytes = manifest.to_string();
    use sha2::Digest as _;
    let hex: String = sha2::Sha256::digest(bytes.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    std::fs::write(layout.join("blobs/sha256").join(&hex), &bytes).expect("write");
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{"digest": format!("sha256:{hex}"), "size": bytes.len()}]});
    std::fs::write(layout.join("index.json"), index.to_string()).expect("write");
    let message = format!(
        "{:#}",
        fx2.store
            .import("both", &layout, None, serde_json::json!({}))
            .expect_err("rejected")
    );
    assert!(message.contains("ambiguous"), "{message}");
    assert_eq!(fx.images() + fx2.images(), 0);
}

#[test]
fn item_20_decompression_bombs_stop_at_the_ratio_limit() {
    let fx = Fixture::new();
    let path = fx.root.join("bomb.tar.gz");
    {
        let file = std::fs::File::create(&path).expect("create");
        let mut encoder = flate2::write::GzEncoder::new(file, flate2::Compression::best());
        let size: u64 = 1 << 30;
        let mut header = raw_entry(b"zeros", b'0', b"", b"");
        header[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
        set_checksum(&mut header);
        encoder.write_all(&header).expect("write");
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..1024 {
            encoder.write_all(&zeros).expect("write");
        }
        encoder.finish().expect("finish");
    }
    let compressed = std::fs::metadata(&path).expect("stat").len();
    assert!(compressed < 2 << 20, "the bomb is small: {compressed}");
    let message = format!(
        "{:#}",
        fx.store
            .import("bomb", &path, None, serde_json::json!({}))
            .expect_err("stopped")
    );
    assert!(message.contains("decompression bomb"), "{message}");
    assert_eq!(fx.images(), 0);
}

#[test]
fn item_21_zstd_frames_asking_for_a_2_gib_window_are_rejected() {
    let fx = Fixture::new();
    // Frame header: magic, descriptor (no single segment), window byte for windowLog 31.
    let mut frame = vec![0x28, 0xb5, 0x2f, 0xfd, 0x00, (31 - 10) << 3];
    // One raw last block of 4 bytes.
    frame.extend_from_slice(&[0x21, 0x00, 0x00]);
    frame.extend_from_slice(b"abcd");
    let path = fx.archive("window.tar.zst", &frame);
    let message = format!(
        "{:#}",
        fx.store
            .import("window", &path, None, serde_json::json!({}))
            .expect_err("rejected")
    );
    assert!(
        message.to_lowercase().contains("memory") || message.contains("window"),
        "{message}"
    );
}

#[test]
fn item_22_23_huge_metadata_and_sparse_entries_are_rejected() {
    let fx = Fixture::new();
    let mut long = raw_entry(b"././@LongLink", b'L', b"", b"");
    long[124..136].copy_from_slice(format!("{:011o}\0", 4u64 << 30).as_bytes());
    set_checksum(&mut long);
    let message = error_text(fx.import("long", &long));
    assert!(message.contains("limit"), "{message}");
    let message = error_text(fx.import("sparse", &tar(&[raw_entry(b"sparse", b'S', b"", b"")])));
    assert!(message.contains("sparse"), "{message}");
}

#[test]
fn item_24_entry_count_is_capped() {
    let fx = Fixture::new();
    let parts: Vec<Vec<u8>> = (0..200).map(|i| file(&format!("f{i}"), b"")).collect();
    let path = fx.archive("many.tar", &tar(&parts));
    let limits = Limits {
        max_entries: 100,
        ..Limits::default()
    };
    let message = format!(
        "{:#}",
        fx.store
            .import_with_limits("many", &path, None, serde_json::json!({}), limits)
            .expect_err("capped")
    );
    assert!(message.contains("more than 100 entries"), "{message}");
}

#[test]
fn item_31_a_flipped_bit_fails_reads_and_fsck_reports_it() {
    let fx = Fixture::new();
    fx.import("img", &tar(&[file("etc/motd", b"hello world\n")]))
        .expect("imports");
    let digest = fx
        .entries("img")
        .get("etc/motd")
        .and_then(|e| e.digest.clone())
        .expect("digest");
    let object = fx.store.objects().path(&digest);
    let mut permissions = std::fs::metadata(&object).expect("stat").permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    permissions.set_readonly(false);
    std::fs::set_permissions(&object, permissions).expect("chmod");
    let mut bytes = std::fs::read(&object).expect("read");
    bytes[0] ^= 0x01;
    std::fs::write(&object, bytes).expect("write");

    let export = fx.store.export("img", &fx.root.join("out.tar"));
    assert!(format!("{:#}", export.expect_err("fails closed")).contains("corrupt"));
    assert!(!fx.root.join("out.tar").exists(), "no half-written export");

    let report = fx.store.fsck(false).expect("fsck runs");
    assert_eq!(report.corrupt_objects, vec![digest.clone()]);
    assert_eq!(report.images_needing_repair, vec!["img@1".to_owned()]);
    let repaired = fx.store.fsck(true).expect("fsck --repair runs");
    assert_eq!(repaired.quarantined, 1);
    assert!(fx.store.list().expect("list")[0].needs_repair);
    let after = fx.store.fsck(false).expect("fsck runs");
    assert_eq!(after.missing_objects, vec![digest]);
}

#[test]
fn gc_removes_only_unreferenced_objects() {
    let fx = Fixture::new();
    fx.import(
        "a",
        &tar(&[file("shared", b"shared"), file("only-a", b"a")]),
    )
    .expect("imports");
    fx.import(
        "b",
        &tar(&[file("shared", b"shared"), file("only-b", b"b")]),
    )
    .expect("imports");
    assert_eq!(fx.store.objects().list().expect("list").len(), 3);
    fx.store.remove("a", false).expect("removes");
    let report = fx.store.gc().expect("gc");
    assert_eq!(report.removed_objects, 1);
    assert_eq!(fx.store.objects().list().expect("list").len(), 2);
    assert!(fx.store.fsck(false).expect("fsck").is_clean());
    fx.store
        .export("b", &fx.root.join("b.tar"))
        .expect("b still exports");
}

#[test]
fn removing_an_image_with_children_needs_recursive() {
    let fx = Fixture::new();
    fx.import("base", &tar(&[file("a", b"a")]))
        .expect("imports");
    let path = fx.archive("child.tar", &tar(&[file("a", b"a"), file("b", b"b")]));
    fx.store
        .import("child", &path, Some("base"), serde_json::json!({}))
        .expect("imports");
    let message = format!("{:#}", fx.store.remove("base", false).expect_err("refused"));
    assert!(
        message.contains("child@1") && message.contains("--recursive"),
        "{message}"
    );
    let removed = fx.store.remove("base", true).expect("recursive");
    assert_eq!(removed.len(), 2);
    assert_eq!(fx.images(), 0);
}
