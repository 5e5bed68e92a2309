//! Property tests for the parsers that read what others wrote: errors are fine, panics are
//! bugs. Tar archives (plain, gzip, zstd), OCI layouts and dpkg status files, each mutated
//! from a valid one (overwritten bytes, truncation) or random, go through the same entry
//! points the commands use. A failed import must leave nothing listed and the store clean.

use std::io::Write as _;
use std::path::Path;

use appliance_core::store::Store;
use proptest::prelude::*;
use sha2::{Digest as _, Sha256};

/// A small archive with each kind of entry the importer handles.
fn valid_tar() -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Directory);
    header.set_mode(0o755);
    header.set_size(0);
    builder
        .append_data(&mut header, "etc/", std::io::empty())
        .expect("dir");
    let mut header = tar::Header::new_gnu();
    header.set_mode(0o644);
    header.set_size(4);
    builder
        .append_data(&mut header, "etc/hostname", &b"web\n"[..])
        .expect("file");
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Symlink);
    header.set_size(0);
    builder
        .append_link(&mut header, "etc/name", "hostname")
        .expect("symlink");
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Link);
    header.set_size(0);
    builder
        .append_link(&mut header, "etc/hard", "etc/hostname")
        .expect("hard link");
    let long = format!("usr/share/{}/file", "x".repeat(150));
    let mut header = tar::Header::new_gnu();
    header.set_mode(0o644);
    header.set_size(2);
    builder
        .append_data(&mut header, &long, &b"ok"[..])
        .expect("long name");
    builder.into_inner().expect("archive")
}

fn mutate(mut bytes: Vec<u8>, edits: &[(usize, u8)], keep: Option<usize>) -> Vec<u8> {
    for (at, byte) in edits {
        if !bytes.is_empty() {
            let at = at % bytes.len();
            bytes[at] = *byte;
        }
    }
    if let Some(keep) = keep {
        bytes.truncate(keep % (bytes.len() + 1));
    }
    bytes
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).expect("gzip");
    encoder.finish().expect("gzip")
}

/// Import `bytes` as a file into a fresh store: never a panic; on failure nothing listed.
fn import_bytes(bytes: &[u8]) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(&dir.path().join("store")).expect("store");
    let path = dir.path().join("archive");
    std::fs::write(&path, bytes).expect("write");
    let imported = store.import("hostile", &path, None, serde_json::json!({}));
    let listed = store.list().expect("list").len();
    match imported {
        Ok(image) => {
            assert_eq!(listed, 1);
            let tree = store.tree(&image).expect("tree");
            for path in tree.entries().keys() {
                assert!(
                    !path.starts_with('/') && !path.split('/').any(|c| c == ".." || c == "."),
                    "an entry path that is not normal: {path:?}"
                );
            }
        }
        Err(_) => assert_eq!(listed, 0, "a failed import left an image"),
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An OCI layout holding one image of one gzip layer, its JSON documents given as text so
/// that a test can mutate them; returns the layout's directory.
fn oci_layout(dir: &Path, layer: &[u8], config: &str, manifest_edit: &[(usize, u8)]) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("mkdir");
    let put = |bytes: &[u8]| -> String {
        let digest = sha256_hex(bytes);
        std::fs::write(blobs.join(&digest), bytes).expect("blob");
        digest
    };
    let layer_digest = put(layer);
    let config_digest = put(config.as_bytes());
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{config_digest}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:{layer_digest}","size":{}}}]}}"#,
        config.len(),
        layer.len()
    );
    let manifest = mutate(manifest.into_bytes(), manifest_edit, None);
    let manifest_digest = put(&manifest);
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).expect("write");
    std::fs::write(
        dir.join("index.json"),
        format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{manifest_digest}","size":{}}}]}}"#,
            manifest.len()
        ),
    )
    .expect("index");
}

const CONFIG: &str =
    r#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},"config":{}}"#;

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn mutated_tar_archives_import_or_fail_cleanly(
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 0..12),
        keep in prop::option::of(any::<usize>()),
        compression in 0..3u8,
    ) {
        let tar = mutate(valid_tar(), &edits, keep);
        let bytes = match compression {
            0 => tar,
            1 => gzip(&tar),
            _ => zstd::encode_all(&tar[..], 1).expect("zstd"),
        };
        import_bytes(&bytes);
    }

    #[test]
    fn mutated_compressed_streams_import_or_fail_cleanly(
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        keep in prop::option::of(any::<usize>()),
        zstd_stream in any::<bool>(),
    ) {
        let tar = valid_tar();
        let compressed = if zstd_stream {
            zstd::encode_all(&tar[..], 1).expect("zstd")
        } else {
            gzip(&tar)
        };
        import_bytes(&mutate(compressed, &edits, keep));
    }

    #[test]
    fn random_bytes_import_or_fail_cleanly(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        import_bytes(&bytes);
    }

    #[test]
    fn mutated_oci_layouts_import_or_fail_cleanly(
        manifest_edits in prop::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        config_edits in prop::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        layer_edits in prop::collection::vec((any::<usize>(), any::<u8>()), 0..6),
    ) {
        let dir = tempfile::tempdir().expect("temp dir");
        let layout = dir.path().join("layout");
        let layer = mutate(gzip(&valid_tar()), &layer_edits, None);
        let config = String::from_utf8_lossy(&mutate(CONFIG.as_bytes().to_vec(), &config_edits, None))
            .into_owned();
        oci_layout(&layout, &layer, &config, &manifest_edits);
        let store = Store::open(&dir.path().join("store")).expect("store");
        let imported = store.import("hostile", &layout, None, serde_json::json!({}));
        let listed = store.list().expect("list").len();
        prop_assert_eq!(listed, usize::from(imported.is_ok()));
    }

    #[test]
    fn dpkg_status_text_parses_or_is_skipped(
        text in "(Package|Status|Version|Architecture|Description|[A-Za-z-]{0,12})(: ?)[ -~]{0,40}(\n[ \t]?[ -~]{0,40}){0,30}",
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 0..8),
    ) {
        let real = "Package: base-files\nStatus: install ok installed\nVersion: 12.4\nArchitecture: amd64\nDescription: base\n more\n\nPackage: nginx\nStatus: hold ok installed\nVersion: 1.22\nArchitecture: amd64\n";
        for input in [text.clone(), format!("{real}\n{text}"),
                      String::from_utf8_lossy(&mutate(real.as_bytes().to_vec(), &edits, None)).into_owned()] {
            let packages = appliance_core::dpkg::parse_status(&input);
            for package in &packages {
                prop_assert!(!package.name.is_empty(), "a package without a name from {input:?}");
                prop_assert!(!package.name.contains('\n'));
            }
        }
    }
}

#[test]
fn the_unmutated_inputs_import() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(&dir.path().join("store")).expect("store");
    let path = dir.path().join("archive.tar");
    std::fs::write(&path, valid_tar()).expect("write");
    let image = store
        .import("valid", &path, None, serde_json::json!({}))
        .expect("the valid archive imports");
    let tree = store.tree(&image).expect("tree");
    assert!(tree.get("etc/hostname").is_some());
    let layout = dir.path().join("layout");
    oci_layout(&layout, &gzip(&valid_tar()), CONFIG, &[]);
    let image = store
        .import("valid-oci", &layout, None, serde_json::json!({}))
        .expect("the valid layout imports");
    assert!(store.tree(&image).expect("tree").get("etc/name").is_some());
}
