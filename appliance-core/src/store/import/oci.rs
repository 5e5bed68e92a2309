//! OCI image layouts and layer blobs: the index and manifest parsed as typed documents, every
//! blob checked against its descriptor's size and digest before its content counts.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use sha2::{Digest as _, Sha256};

use super::tar::{apply_tar, decompress};
use super::{Builder, Imported, Limits};
use crate::oci_json::{Descriptor, ImageIndex, ImageManifest};
use crate::store::objects::Staging;
use crate::store::tree::{Tree, hex};

/// Import an OCI image layout: the image of `index.json`'s manifest for linux/amd64 (or its
/// only manifest), layers applied in order with whiteouts. Every blob is checked against its
/// descriptor's size and digest before its content counts (docs/HOSTILE.md 19).
pub fn import_oci_layout(
    layout: &Path,
    staging: &mut Staging,
    limits: Limits,
) -> anyhow::Result<Imported> {
    let index: ImageIndex =
        serde_json::from_slice(&read_blob_file(&layout.join("index.json"), 1 << 20)?)
            .context("parsing index.json")?;
    let manifest_descriptor = pick_manifest(layout, &index)?;
    let manifest_bytes = read_verified_blob(layout, &manifest_descriptor, 4 << 20)?;
    let manifest: ImageManifest =
        serde_json::from_slice(&manifest_bytes).context("parsing the image manifest")?;
    if manifest.manifests.is_some() && manifest.layers.is_some() {
        bail!(
            "the image manifest has both `manifests` and `layers`; refusing an ambiguous document"
        );
    }
    let layers = manifest
        .layers
        .context("the image manifest has no `layers`")?;
    apply_oci_layers(&layout.join("blobs/sha256"), &layers, None, staging, limits)
}

/// Apply the layer blobs `layers` (manifest descriptors, blobs as `<blobs>/<hex>`) in order
/// onto `base` (or an empty tree). Every blob is checked against its descriptor's size and
/// digest before its content counts.
pub fn apply_oci_layers(
    blobs: &Path,
    layers: &[Descriptor],
    base: Option<Tree>,
    staging: &mut Staging,
    limits: Limits,
) -> anyhow::Result<Imported> {
    let mut builder = Builder::new(staging, limits);
    if let Some(base) = base {
        builder.tree = base;
    }
    for layer in layers {
        crate::process::interrupt::check()?;
        let (digest, size) = (layer.digest.clone(), layer.size);
        let blob = blob_path(blobs, &digest)?;
        let file = fs_err::File::open(&blob)?.into_parts().0;
        anyhow::ensure!(
            file.metadata()?.len() == size,
            "layer {digest}: the blob's size differs from its descriptor ({size} bytes)"
        );
        let hashing = HashingReader {
            inner: file,
            hasher: Sha256::new(),
        };
        let hashed = std::rc::Rc::new(std::cell::RefCell::new(hashing));
        let (reader, _) = decompress(BufReader::new(SharedReader(hashed.clone())), limits)?;
        apply_tar(&mut builder, reader, true)
            .with_context(|| format!("applying layer {digest}"))?;
        // Drain what the tar reader left (end-of-archive padding) so the hash covers the blob.
        io::copy(&mut SharedReader(hashed.clone()), &mut io::sink())?;
        let actual = format!(
            "sha256:{}",
            hex(&hashed.borrow_mut().hasher.clone().finalize())
        );
        anyhow::ensure!(
            actual == digest,
            "layer {digest}: its content hashes to {actual}"
        );
    }
    Ok(builder.finish("oci"))
}

struct HashingReader {
    inner: File,
    hasher: Sha256,
}

struct SharedReader(std::rc::Rc<std::cell::RefCell<HashingReader>>);

impl Read for SharedReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut inner = self.0.borrow_mut();
        let n = inner.inner.read(buf)?;
        inner.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// `<blobs>/<hex>` for a `sha256:<hex>` digest, refusing anything else.
pub fn blob_path(blobs: &Path, digest: &str) -> anyhow::Result<PathBuf> {
    let hex_part = digest
        .strip_prefix("sha256:")
        .with_context(|| format!("unsupported digest algorithm in {digest}"))?;
    anyhow::ensure!(
        hex_part.len() == 64
            && hex_part
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
        "malformed digest {digest}"
    );
    Ok(blobs.join(hex_part))
}

pub(super) fn read_blob_file(path: &Path, limit: u64) -> anyhow::Result<Vec<u8>> {
    let mut data = Vec::new();
    fs_err::File::open(path)?
        .take(limit + 1)
        .read_to_end(&mut data)?;
    anyhow::ensure!(
        data.len() as u64 <= limit,
        "{} is larger than {limit} bytes",
        path.display()
    );
    Ok(data)
}

pub(super) fn read_verified_blob(
    layout: &Path,
    descriptor: &Descriptor,
    limit: u64,
) -> anyhow::Result<Vec<u8>> {
    let (digest, size) = (&descriptor.digest, descriptor.size);
    anyhow::ensure!(
        size <= limit,
        "blob {digest} claims {size} bytes, more than {limit}"
    );
    let data = read_blob_file(&blob_path(&layout.join("blobs/sha256"), digest)?, limit)?;
    anyhow::ensure!(
        data.len() as u64 == size,
        "blob {digest} is {} bytes, its descriptor says {size}",
        data.len()
    );
    let actual = format!("sha256:{}", hex(&Sha256::digest(&data)));
    anyhow::ensure!(&actual == digest, "blob {digest} hashes to {actual}");
    Ok(data)
}

pub(super) fn pick_manifest(layout: &Path, index: &ImageIndex) -> anyhow::Result<Descriptor> {
    if index.layers.is_some() {
        bail!("index.json has `layers`; refusing an ambiguous document");
    }
    let manifests = index
        .manifests
        .as_deref()
        .context("index.json has no `manifests`")?;
    if manifests.is_empty() {
        bail!("index.json lists no manifests");
    }
    let chosen = index
        .pick(false)
        .cloned()
        .context("index.json has several manifests and none for linux/amd64")?;
    // A nested index: follow it once.
    if chosen.media_type == crate::oci_json::MEDIA_TYPE_INDEX {
        let nested: ImageIndex =
            serde_json::from_slice(&read_verified_blob(layout, &chosen, 4 << 20)?)?;
        return nested
            .pick(true)
            .cloned()
            .context("nested index lists no manifests");
    }
    Ok(chosen)
}
