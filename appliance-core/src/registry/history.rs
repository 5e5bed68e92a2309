//! The derivation history through a registry: one OCI artifact per push (an image manifest
//! with `artifactType`, the empty config, one Parquet blob), merged on pull by origin so a
//! history pulled twice is there once.

use std::path::Path;

use anyhow::Context as _;
use serde_json::json;
use sha2::{Digest as _, Sha256};

use super::{Access, Pushed, Reference, skopeo};
use crate::store::Store;
use crate::store::tree::hex;

pub const ARTIFACT_TYPE: &str = "application/vnd.cargo-appliance.history.v1";
pub const PARQUET: &str = "application/vnd.apache.parquet";
const EMPTY_CONFIG: &str = "application/vnd.oci.empty.v1+json";
const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// The annotation counting the derivations of the artifact.
const COUNT: &str = "dev.cargo-appliance.history.derivations";
/// A history blob larger than this is refused before it is fetched.
pub const MAX_HISTORY_BYTES: u64 = 1 << 30;

/// Push the store's shareable history ([`crate::history::export_shared`]) to `destination`.
pub fn push(
    store: &Store,
    destination: &Reference,
    access: &Access,
    progress: bool,
) -> anyhow::Result<(Pushed, usize)> {
    skopeo::require()?;
    anyhow::ensure!(
        destination.digest.is_none(),
        "push to a tag, not a digest: `{destination}`"
    );
    let mut destination = destination.clone();
    destination.tag.get_or_insert_with(|| "latest".to_owned());
    let staging = store.staging()?;
    let layout = staging.dir().join("history");
    let blobs = layout.join("blobs/sha256");
    fs_err::create_dir_all(&blobs)?;
    let parquet = staging.dir().join("history.parquet");
    let count = {
        let catalog = store.read_catalog()?;
        crate::history::export_shared(catalog.connection(), &parquet)?
    };
    let data = fs_err::read(&parquet)?;
    let data_digest = hex(&Sha256::digest(&data));
    fs_err::write(blobs.join(&data_digest), &data)?;
    let config = b"{}";
    let config_digest = hex(&Sha256::digest(config));
    fs_err::write(blobs.join(&config_digest), config)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": {
            "mediaType": EMPTY_CONFIG,
            "digest": format!("sha256:{config_digest}"),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": PARQUET,
            "digest": format!("sha256:{data_digest}"),
            "size": data.len(),
            "annotations": { "org.opencontainers.image.title": "history.parquet" },
        }],
        "annotations": { COUNT: count.to_string() },
    });
    let manifest_bytes = serde_json::to_vec(&manifest)?;
    let manifest_digest = hex(&Sha256::digest(&manifest_bytes));
    fs_err::write(blobs.join(&manifest_digest), &manifest_bytes)?;
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": MEDIA_MANIFEST,
            "artifactType": ARTIFACT_TYPE,
            "digest": format!("sha256:{manifest_digest}"),
            "size": manifest_bytes.len(),
            "annotations": { "org.opencontainers.image.ref.name": "history" },
        }],
    });
    fs_err::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
    fs_err::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let digest = skopeo::copy(
        &skopeo::Endpoint::Layout {
            dir: layout,
            tag: "history".into(),
        },
        &skopeo::Endpoint::Registry(&destination),
        access,
        progress,
        None,
    )
    .with_context(|| format!("pushing the history to {destination}"))?;
    let expected = format!("sha256:{manifest_digest}");
    anyhow::ensure!(
        digest == expected,
        "the registry stored the history as {digest}, not as the pushed manifest {expected}"
    );
    staging.discard();
    Ok((
        Pushed {
            image: "history".into(),
            reference: destination.to_string(),
            digest,
        },
        count,
    ))
}

/// Pull a history artifact and merge it: the sender's own builds under origin
/// `pull:REGISTRY/REPOSITORY` (replacing what an earlier pull of it brought), its other
/// origins under their own names.
pub fn pull(
    store: &Store,
    source: &Reference,
    access: &Access,
    progress: bool,
) -> anyhow::Result<(String, usize)> {
    skopeo::require()?;
    let (pinned, manifest_bytes) = skopeo::manifest(source, access)?;
    let manifest: crate::oci_json::ImageManifest = serde_json::from_slice(&manifest_bytes)
        .with_context(|| format!("{source}: parsing the manifest"))?;
    anyhow::ensure!(
        manifest.artifact_type.as_deref() == Some(ARTIFACT_TYPE),
        "{source} is not a cargo-appliance history (its artifactType is {}); `history push` writes one",
        manifest.artifact_type.as_deref().unwrap_or("missing")
    );
    let layer = manifest
        .layers
        .iter()
        .flatten()
        .find(|l| l.media_type == PARQUET)
        .with_context(|| format!("{source}: the history has no Parquet layer"))?;
    let digest = layer.digest.clone();
    let size = layer.size;
    anyhow::ensure!(
        size <= MAX_HISTORY_BYTES,
        "{source}: the history is {size} bytes, more than the {MAX_HISTORY_BYTES} accepted"
    );
    let staging = store.staging()?;
    let layout = staging.dir().join("history");
    skopeo::copy(
        &skopeo::Endpoint::Registry(&pinned),
        &skopeo::Endpoint::Layout {
            dir: layout.clone(),
            tag: "history".into(),
        },
        access,
        progress,
        None,
    )
    .with_context(|| format!("pulling the history {source}"))?;
    let hex_digest = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .with_context(|| format!("{source}: malformed layer digest {digest}"))?;
    let blob = layout.join("blobs/sha256").join(hex_digest);
    check_blob(&blob, &digest, size)?;
    let origin = format!("pull:{}/{}", pinned.registry, pinned.repository);
    let mut catalog = store.write_catalog()?;
    let incoming = crate::history::read_shared(catalog.connection(), &blob, &origin)
        .with_context(|| format!("{source}: reading the history"))?;
    crate::process::interrupt::check()?;
    let count = crate::history::replace_origins(catalog.connection_mut(), &incoming)?;
    drop(catalog);
    staging.discard();
    Ok((origin, count))
}

/// The blob is what its descriptor says, byte for byte.
fn check_blob(path: &Path, digest: &str, size: u64) -> anyhow::Result<()> {
    let mut file = fs_err::File::open(path)?;
    let actual_size = file.metadata()?.len();
    anyhow::ensure!(
        actual_size == size,
        "the history blob is {actual_size} bytes, its descriptor says {size}"
    );
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    let actual = format!("sha256:{}", hex(&hasher.finalize()));
    anyhow::ensure!(
        actual == digest,
        "the history blob hashes to {actual}, not {digest}"
    );
    Ok(())
}
