//! OCI image output: an image layout directory and the same layout as an archive
//! (`oci-archive`), one layer per lineage step (base, packages, appliance…), so appliances on
//! one base share its layer blob. Deterministic: sorted entries, gzip without timestamps,
//! canonical JSON, times clamped to `SOURCE_DATE_EPOCH`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde_json::json;
use sha2::{Digest as _, Sha256};

use crate::store::export::write_tar;
use crate::store::objects::Objects;
use crate::store::tree::{Entry, EntryKind, Tree, hex};
use crate::store::{ImageRecord, Store};

const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MEDIA_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The image configuration the manifest asks for.
#[derive(Debug, Clone, Default)]
pub struct OciConfig {
    /// `name:tag`; the tag names the image in the layout's index.
    pub tag: String,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<(String, String)>,
    pub user: Option<String>,
    pub workdir: Option<String>,
    /// `80/tcp`, …
    pub exposed: Vec<String>,
}

/// A layer blob: gzip of the layer tar.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Layer {
    /// sha256 of the compressed blob.
    digest: String,
    size: u64,
    /// sha256 of the uncompressed tar (the config's diff_id).
    diff_id: String,
}

/// The layer from `parent` to `child`: every entry that is new or changed, with its
/// ancestors (so their metadata is the child's), and a whiteout for every removed path.
pub fn layer_tree(parent: Option<&Tree>, child: &Tree) -> Tree {
    let Some(parent) = parent else {
        return child.clone();
    };
    let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
    let include = |path: &str, entries: &mut BTreeMap<String, Entry>| {
        let mut current = path;
        loop {
            if let Some(entry) = child.get(current) {
                entries
                    .entry(current.to_owned())
                    .or_insert_with(|| entry.clone());
            }
            match current.rfind('/') {
                Some(i) => current = &current[..i],
                None if !current.is_empty() => current = "",
                None => break,
            }
        }
    };
    for (path, entry) in child.entries() {
        if parent.get(path) != Some(entry) {
            include(path, &mut entries);
        }
    }
    let mut removed_dirs: Vec<String> = Vec::new();
    for (path, entry) in parent.entries() {
        if path.is_empty() {
            continue;
        }
        let replaced_kind = child
            .get(path)
            .is_some_and(|c| (c.kind == EntryKind::Dir) != (entry.kind == EntryKind::Dir));
        if child.get(path).is_some() && !replaced_kind {
            continue;
        }
        // Children of a removed directory go with it.
        if removed_dirs.iter().any(|dir| {
            path.starts_with(dir.as_str()) && path.as_bytes().get(dir.len()) == Some(&b'/')
        }) {
            continue;
        }
        if entry.kind == EntryKind::Dir {
            removed_dirs.push(path.clone());
        }
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        let whiteout = if dir.is_empty() {
            format!(".wh.{name}")
        } else {
            format!("{dir}/.wh.{name}")
        };
        include(dir, &mut entries);
        entries.insert(
            whiteout,
            Entry {
                kind: EntryKind::File,
                mode: 0o644,
                uid: 0,
                gid: 0,
                size: 0,
                digest: Some(hex(&Sha256::digest(b""))),
                link_target: None,
                device: None,
                xattrs: BTreeMap::new(),
                mtime: 0,
            },
        );
    }
    // A hard link whose file is not in this layer carries the content itself.
    let paths: BTreeSet<String> = entries.keys().cloned().collect();
    for entry in entries.values_mut() {
        if entry.kind == EntryKind::Hardlink
            && entry
                .link_target
                .as_ref()
                .is_none_or(|target| !paths.contains(target))
        {
            entry.kind = EntryKind::File;
            entry.link_target = None;
        }
    }
    Tree::from_entries(entries)
}

struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Blobs and layer descriptions cached in the store, so every appliance on a base reuses
/// its layer instead of compressing it again.
struct BlobCache {
    dir: PathBuf,
}

impl BlobCache {
    fn blob(&self, digest: &str) -> PathBuf {
        self.dir.join("blobs/sha256").join(digest)
    }

    fn layer(&self, key: &str) -> Option<Layer> {
        let data = std::fs::read(self.dir.join("layers").join(key)).ok()?;
        let layer: Layer = serde_json::from_slice(&data).ok()?;
        // A blob of another size is not the layer (fsck checks the digests); it is written
        // again.
        std::fs::metadata(self.blob(&layer.digest))
            .is_ok_and(|m| m.is_file() && m.len() == layer.size)
            .then_some(layer)
    }

    fn write_layer(
        &self,
        key: &str,
        tree: &Tree,
        objects: &Objects,
        epoch: Option<i64>,
    ) -> anyhow::Result<Layer> {
        if let Some(layer) = self.layer(key) {
            return Ok(layer);
        }
        fs_err::create_dir_all(self.dir.join("blobs/sha256"))?;
        fs_err::create_dir_all(self.dir.join("layers"))?;
        // Layout blobs are links to these: readable as the layout's other files are.
        let temp = tempfile::Builder::new()
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666))
            .tempfile_in(self.dir.join("blobs/sha256"))?;
        let compressed = HashingWriter {
            inner: io::BufWriter::new(temp.reopen()?),
            hasher: Sha256::new(),
            written: 0,
        };
        // No name, no timestamp in the gzip header: equal layers are equal bytes.
        let encoder = flate2::GzBuilder::new()
            .mtime(0)
            .write(compressed, flate2::Compression::new(6));
        let mut uncompressed = HashingWriter {
            inner: encoder,
            hasher: Sha256::new(),
            written: 0,
        };
        write_tar(tree, objects, &mut uncompressed, epoch)?;
        let diff_id = hex(&uncompressed.hasher.finalize());
        let mut compressed = uncompressed.inner.finish()?;
        compressed.flush()?;
        let HashingWriter {
            inner,
            hasher,
            written,
        } = compressed;
        inner.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        let digest = hex(&hasher.finalize());
        let layer = Layer {
            digest: digest.clone(),
            size: written,
            diff_id,
        };
        temp.persist(self.blob(&digest))?;
        crate::json_file::write_bytes_atomically(
            &self.dir.join("layers").join(key),
            &serde_json::to_vec(&layer)?,
            "layer-renaming",
        )?;
        Ok(layer)
    }
}

/// Seconds since the epoch as RFC 3339 (UTC), for the config's `created`.
fn rfc3339(seconds: i64) -> String {
    let days = seconds.div_euclid(86_400);
    let rest = seconds.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// What was written.
#[derive(Debug, Clone)]
pub struct OciOutput {
    pub layout: PathBuf,
    pub archive: PathBuf,
    pub manifest_digest: String,
}

/// Where layer blobs are cached, as `sha256/<hex>`: the layout of skopeo's
/// `--src-shared-blob-dir`/`--dest-shared-blob-dir`, so a push reads them and a pull leaves
/// the layers it fetched for the next pull.
pub fn blob_dir(store: &Store) -> PathBuf {
    store.root().join(crate::store::download_caches::OCI_BLOBS)
}

/// An image as OCI documents, its layers in the store's blob cache: what a layout, an
/// archive and a push are made of.
#[derive(Debug, Clone)]
pub struct Composed {
    cache_dir: PathBuf,
    layers: Vec<Layer>,
    config_bytes: Vec<u8>,
    config_digest: String,
    pub manifest_bytes: Vec<u8>,
    /// Hex sha256 of `manifest_bytes`.
    pub manifest_digest: String,
    tag: String,
    image_name: String,
}

/// Compose the image of `chain` (root first, the image last): one layer per lineage step,
/// cached by (parent tree, tree), and `annotations` added to the manifest's own.
pub fn compose(
    store: &Store,
    chain: &[ImageRecord],
    config: &OciConfig,
    created: i64,
    annotations: &BTreeMap<String, String>,
) -> anyhow::Result<Composed> {
    let epoch = crate::store::export::source_date_epoch();
    let objects = store.objects();
    let cache = BlobCache {
        dir: store.root().join("cache/oci"),
    };
    let mut layers = Vec::new();
    let mut parent_digest = String::new();
    for (at, image) in chain.iter().enumerate() {
        crate::process::interrupt::check()?;
        // v2: gzip by zlib-rs (other bytes than v1's miniz_oxide for the same layer; a cached
        // v1 layer would make the output depend on what the cache held).
        let key = hex(&Sha256::digest(
            format!("layer v2 {parent_digest} {} {epoch:?}", image.tree_digest).as_bytes(),
        ));
        // A cached layer needs no tree: a re-push or an unchanged output reads no catalog.
        let layer = match cache.layer(&key) {
            Some(layer) => layer,
            None => {
                let tree = store.tree(image)?;
                let parent_tree = match at.checked_sub(1) {
                    Some(parent) => Some(store.tree(&chain[parent])?),
                    None => None,
                };
                let layer_tree = layer_tree(parent_tree.as_ref(), &tree);
                cache
                    .write_layer(&key, &layer_tree, &objects, epoch)
                    .with_context(|| format!("writing the layer of {}", image.reference()))?
            }
        };
        layers.push((image.reference(), layer));
        parent_digest = image.tree_digest.clone();
    }
    let created = rfc3339(created);
    let mut env: Vec<String> = vec![DEFAULT_PATH.to_owned()];
    for (name, value) in &config.env {
        env.retain(|e| !e.starts_with(&format!("{name}=")));
        env.push(format!("{name}={value}"));
    }
    let mut image_config = serde_json::Map::new();
    image_config.insert("Env".into(), json!(env));
    if !config.entrypoint.is_empty() {
        image_config.insert("Entrypoint".into(), json!(config.entrypoint));
    }
    if !config.cmd.is_empty() {
        image_config.insert("Cmd".into(), json!(config.cmd));
    }
    if let Some(user) = &config.user {
        image_config.insert("User".into(), json!(user));
    }
    if let Some(workdir) = &config.workdir {
        image_config.insert("WorkingDir".into(), json!(workdir));
    }
    if !config.exposed.is_empty() {
        let ports: serde_json::Map<String, serde_json::Value> = config
            .exposed
            .iter()
            .map(|p| (p.clone(), json!({})))
            .collect();
        image_config.insert("ExposedPorts".into(), serde_json::Value::Object(ports));
    }
    let config_json = json!({
        "created": created,
        "architecture": "amd64",
        "os": "linux",
        "config": image_config,
        "rootfs": {
            "type": "layers",
            "diff_ids": layers.iter().map(|(_, l)| format!("sha256:{}", l.diff_id)).collect::<Vec<_>>(),
        },
        "history": layers.iter().map(|(reference, _)| json!({
            "created": created,
            "created_by": format!("cargo-appliance: {reference}"),
        })).collect::<Vec<_>>(),
    });
    let config_bytes = serde_json::to_vec(&config_json)?;
    let config_digest = hex(&Sha256::digest(&config_bytes));
    let lineage: Vec<String> = chain.iter().map(ImageRecord::reference).collect();
    let mut manifest_annotations = serde_json::Map::new();
    manifest_annotations.insert("org.opencontainers.image.created".into(), json!(created));
    manifest_annotations.insert(LINEAGE.into(), json!(lineage.join(" ")));
    manifest_annotations.insert(
        TREE_DIGEST.into(),
        json!(
            chain
                .last()
                .map(|i| i.tree_digest.clone())
                .unwrap_or_default()
        ),
    );
    for (key, value) in annotations {
        manifest_annotations.insert(key.clone(), json!(value));
    }
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {
            "mediaType": MEDIA_CONFIG,
            "digest": format!("sha256:{config_digest}"),
            "size": config_bytes.len(),
        },
        "layers": layers.iter().map(|(_, l)| json!({
            "mediaType": MEDIA_LAYER,
            "digest": format!("sha256:{}", l.digest),
            "size": l.size,
        })).collect::<Vec<_>>(),
        "annotations": manifest_annotations,
    });
    let manifest_bytes = serde_json::to_vec(&manifest)?;
    let manifest_digest = hex(&Sha256::digest(&manifest_bytes));
    Ok(Composed {
        cache_dir: cache.dir,
        layers: layers.into_iter().map(|(_, layer)| layer).collect(),
        config_bytes,
        config_digest,
        manifest_bytes,
        manifest_digest,
        tag: config
            .tag
            .rsplit_once(':')
            .map_or("latest", |(_, tag)| tag)
            .to_owned(),
        image_name: config.tag.clone(),
    })
}

/// The annotation listing the lineage (`name@version` each, root first).
pub const LINEAGE: &str = "dev.cargo-appliance.lineage";
/// The annotation holding the image's tree digest.
pub const TREE_DIGEST: &str = "dev.cargo-appliance.tree-digest";

impl Composed {
    /// Write an OCI image layout into the empty directory `dir`, layer blobs hard-linked from
    /// the cache (copied where links fail).
    pub fn write_layout(&self, dir: &Path) -> anyhow::Result<()> {
        let cache = BlobCache {
            dir: self.cache_dir.clone(),
        };
        let blobs = dir.join("blobs/sha256");
        fs_err::create_dir_all(&blobs)?;
        for layer in &self.layers {
            let target = blobs.join(&layer.digest);
            if !target.exists() && std::fs::hard_link(cache.blob(&layer.digest), &target).is_err() {
                fs_err::copy(cache.blob(&layer.digest), &target)?;
            }
        }
        fs_err::write(blobs.join(&self.config_digest), &self.config_bytes)?;
        fs_err::write(blobs.join(&self.manifest_digest), &self.manifest_bytes)?;
        let index = json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": MEDIA_MANIFEST,
                "digest": format!("sha256:{}", self.manifest_digest),
                "size": self.manifest_bytes.len(),
                "annotations": {
                    "org.opencontainers.image.ref.name": self.tag,
                    "io.containerd.image.name": self.image_name,
                },
            }],
        });
        fs_err::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
        fs_err::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        Ok(())
    }

    /// The tag the layout's index names the image by.
    pub fn tag(&self) -> &str {
        &self.tag
    }
}

/// Write the image of `chain` (root first, the appliance last) as a layout directory and an
/// archive. `created` is the image's creation time (clamped by the caller).
pub fn write(
    store: &Store,
    chain: &[ImageRecord],
    config: &OciConfig,
    created: i64,
    layout: &Path,
    archive: &Path,
) -> anyhow::Result<OciOutput> {
    let composed = compose(store, chain, config, created, &BTreeMap::new())?;
    // The layout: written beside its final place, then swapped in.
    let parent = layout
        .parent()
        .context("the layout has no parent directory")?;
    fs_err::create_dir_all(parent)?;
    let staging = tempfile::Builder::new()
        .prefix(".oci-")
        .tempdir_in(parent)?;
    composed.write_layout(staging.path())?;
    write_archive(staging.path(), archive)?;
    if layout.exists() {
        fs_err::remove_dir_all(layout)?;
    }
    fs_err::rename(staging.keep(), layout)?;
    Ok(OciOutput {
        layout: layout.to_path_buf(),
        archive: archive.to_path_buf(),
        manifest_digest: composed.manifest_digest,
    })
}

/// The layout as a tar (what `oci-archive:` reads): sorted, root-owned, mtime 0.
fn write_archive(layout: &Path, archive: &Path) -> anyhow::Result<()> {
    let parent = archive
        .parent()
        .context("the archive has no parent directory")?;
    // Readable as any file the user creates (0644 under the usual umask), not 0600.
    let temp = tempfile::Builder::new()
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666))
        .tempfile_in(parent)?;
    {
        let mut builder = tar::Builder::new(io::BufWriter::new(temp.reopen()?));
        let mut files = Vec::new();
        collect_files(layout, layout, &mut files)?;
        files.sort();
        let mut dirs_written = BTreeSet::new();
        for relative in files {
            let mut ancestors: Vec<String> = Vec::new();
            let mut current = Path::new(&relative).parent();
            while let Some(dir) = current.filter(|d| !d.as_os_str().is_empty()) {
                ancestors.push(dir.to_string_lossy().into_owned());
                current = dir.parent();
            }
            for dir in ancestors.into_iter().rev() {
                if dirs_written.insert(dir.clone()) {
                    let mut header = tar::Header::new_ustar();
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_mode(0o755);
                    header.set_size(0);
                    header.set_mtime(0);
                    builder.append_data(&mut header, format!("{dir}/"), io::empty())?;
                }
            }
            let mut file = fs_err::File::open(layout.join(&relative))?;
            let size = file.metadata()?.len();
            let mut header = tar::Header::new_ustar();
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mode(0o644);
            header.set_size(size);
            header.set_mtime(0);
            builder.append_data(&mut header, &relative, (&mut file).take(size))?;
        }
        builder.into_inner()?.flush()?;
    }
    temp.as_file().sync_all()?;
    temp.persist(archive)?;
    Ok(())
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<String>) -> anyhow::Result<()> {
    for entry in fs_err::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            collect_files(root, &path, out)?;
        } else {
            let relative = path.strip_prefix(root).unwrap_or(&path);
            out.push(relative.to_string_lossy().into_owned());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(digest: &str) -> Entry {
        Entry {
            kind: EntryKind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: 1,
            digest: Some(digest.into()),
            link_target: None,
            device: None,
            xattrs: BTreeMap::new(),
            mtime: 1,
        }
    }

    #[test]
    fn layers_hold_changes_their_parents_and_whiteouts() {
        let mut parent = Tree::new();
        parent.insert("etc", Entry::dir(0o755)).expect("insert");
        parent.insert("etc/a", file("a")).expect("insert");
        parent.insert("etc/gone", file("g")).expect("insert");
        parent.insert("opt", Entry::dir(0o755)).expect("insert");
        parent.insert("opt/x", file("x")).expect("insert");
        parent.insert("usr", Entry::dir(0o755)).expect("insert");
        let mut child = parent.clone();
        child.insert("etc/a", file("changed")).expect("insert");
        child.remove("etc/gone");
        child.remove("opt");
        let layer = layer_tree(Some(&parent), &child);
        let paths: Vec<&str> = layer.entries().keys().map(String::as_str).collect();
        assert_eq!(paths, ["", ".wh.opt", "etc", "etc/.wh.gone", "etc/a"]);
        assert_eq!(
            layer.get("etc/a").and_then(|e| e.digest.as_deref()),
            Some("changed")
        );
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
