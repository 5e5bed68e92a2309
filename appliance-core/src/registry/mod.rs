//! Stored images through any OCI registry (Docker's registry, Harbor, GHCR, ECR, Zot…).
//!
//! The protocol is spoken by `skopeo` (containers/image: credentials from
//! `$REGISTRY_AUTH_FILE`, `$XDG_RUNTIME_DIR/containers/auth.json` and
//! `~/.docker/config.json`, basic and bearer auth, TLS with the system's roots, blob
//! existence checks and cross-repository mounts, digest verification of everything it
//! fetches); the store does what skopeo cannot know: which layers its trees already hold,
//! and what an image is (name, version, tree digest, parent, provenance), carried as
//! manifest annotations. An image pushed is a normal OCI image, one layer per lineage step
//! (as the `oci` output writes), so images on one base share its layer in the registry.

pub mod history;
mod skopeo;

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context as _, bail};

pub use crate::image_reference::Reference;
pub use skopeo::Access;

use crate::output::oci::{self, OciConfig};
use crate::store::{ImageRecord, NewTree, Store};

/// Annotation keys of the store's facts.
pub const NAME: &str = "dev.cargo-appliance.name";
pub const VERSION: &str = "dev.cargo-appliance.version";
pub const PARENT: &str = "dev.cargo-appliance.parent";
pub const PARENT_TREE_DIGEST: &str = "dev.cargo-appliance.parent.tree-digest";
/// `REGISTRY/REPOSITORY@sha256:…` of the parent's manifest, when it was pushed with it.
pub const PARENT_MANIFEST: &str = "dev.cargo-appliance.parent.manifest";
pub const PROVENANCE: &str = "dev.cargo-appliance.provenance";
pub const PACKAGES: &str = "dev.cargo-appliance.packages";

/// Manifests larger than this are refused before anything is fetched (the registry
/// distribution spec's recommended limit, and skopeo's).
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;
/// A lineage deeper than this is refused (a loop of parent references, or a hostile one).
const MAX_LINEAGE: usize = 32;

/// What one push sent.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Pushed {
    pub image: String,
    pub reference: String,
    /// `sha256:…` of the manifest.
    pub digest: String,
}

/// Push `image` to `destination`; with `lineage`, its ancestors first (root first), each
/// beside it ([`Reference::sibling`]: `host/team/web:2` puts `debian/bookworm@1` at
/// `host/team/debian/bookworm:1`), so a pull can follow the parents.
pub fn push(
    store: &Store,
    image: &str,
    destination: &Reference,
    lineage: bool,
    access: &Access,
    progress: bool,
) -> anyhow::Result<Vec<Pushed>> {
    skopeo::require()?;
    anyhow::ensure!(
        destination.digest.is_none(),
        "push to a tag, not a digest: `{destination}` (the registry names what it stores by digest itself)"
    );
    // Holds off gc: compose reads objects, and the layout lives in the staging area.
    let _lease = store.gc_lease()?;
    // One read of the catalog for everything the annotations say (each open costs more
    // than a re-push may take in all).
    let (chain, packages) = {
        let catalog = store.read_catalog()?;
        let images = catalog.images()?;
        let image = store.resolve(&catalog, image)?;
        let chain = chain_of(&images, &image)?;
        let packages = chain
            .iter()
            .map(|image| catalog.packages(image.id))
            .collect::<anyhow::Result<Vec<_>>>()?;
        (chain, packages)
    };
    let image = &chain[chain.len() - 1];
    let mut targets: Vec<(usize, Reference)> = Vec::new();
    if lineage {
        for (at, ancestor) in chain.iter().enumerate().take(chain.len() - 1) {
            let reference = destination
                .sibling(&ancestor.name, &ancestor.version)
                .map_err(|e| {
                    anyhow::anyhow!("{} cannot be pushed beside it: {e}", ancestor.reference())
                })?;
            targets.push((at, reference));
        }
    }
    let mut destination = destination.clone();
    if destination.tag.is_none() {
        crate::image_reference::check_tag(&image.version).map_err(|e| anyhow::anyhow!("{e}"))?;
        destination.tag = Some(image.version.clone());
    }
    targets.push((chain.len() - 1, destination));
    // Compose every image first: its manifest digest is known before anything moves, and
    // each names its parent by the digest the parent's push will have.
    let mut composed = Vec::new();
    let mut parent_manifest: Option<String> = None;
    for (at, reference) in targets {
        let image = &chain[at];
        let parent = at.checked_sub(1).map(|p| &chain[p]);
        let annotations = facts(image, &packages[at], parent, parent_manifest.as_deref())?;
        let created = crate::store::export::source_date_epoch()
            .map_or(image.created_at, |epoch| image.created_at.min(epoch));
        let config = OciConfig {
            tag: reference.to_string(),
            ..OciConfig::default()
        };
        let image_composed = oci::compose(store, &chain[..=at], &config, created, &annotations)
            .with_context(|| format!("composing {} as an OCI image", image.reference()))?;
        parent_manifest = Some(format!(
            "{}/{}@sha256:{}",
            reference.registry, reference.repository, image_composed.manifest_digest
        ));
        composed.push((at, reference, image_composed));
    }
    // A re-push: this store pushed exactly these manifests here before, and the registry
    // still has the top one (which names each parent by digest), so nothing is missing.
    // One manifest lookup instead of a copy per image.
    let record_path = store.root().join(PUSHED_RECORD);
    let mut record: BTreeMap<String, String> = crate::json_file::load_or_default(&record_path);
    let all_recorded = composed.iter().all(|(_, reference, c)| {
        record.get(&reference.to_string()) == Some(&format!("sha256:{}", c.manifest_digest))
    });
    if all_recorded && let Some((_, top, top_composed)) = composed.last() {
        let there = skopeo::manifest(top, access).ok().map(|(pinned, _)| {
            pinned.digest == Some(format!("sha256:{}", top_composed.manifest_digest))
        });
        if there == Some(true) {
            return Ok(composed
                .iter()
                .map(|(at, reference, c)| Pushed {
                    image: chain[*at].reference(),
                    reference: reference.to_string(),
                    digest: format!("sha256:{}", c.manifest_digest),
                })
                .collect());
        }
    }
    let staging = store.staging()?;
    let push_one = |at: usize,
                    reference: &Reference,
                    composed: &oci::Composed,
                    progress: bool|
     -> anyhow::Result<Pushed> {
        let image = &chain[at];
        let layout = staging.dir().join(format!("push-{at}"));
        composed.write_layout(&layout)?;
        let digest = skopeo::copy(
            &skopeo::Endpoint::Layout {
                dir: layout.clone(),
                tag: composed.tag().to_owned(),
            },
            &skopeo::Endpoint::Registry(reference),
            access,
            progress,
            None,
        )
        .with_context(|| format!("pushing {} to {reference}", image.reference()))?;
        let expected = format!("sha256:{}", composed.manifest_digest);
        anyhow::ensure!(
            digest == expected,
            "the registry stored {reference} as {digest}, not as the pushed manifest {expected}"
        );
        fs_err::remove_dir_all(&layout)?;
        Ok(Pushed {
            image: image.reference(),
            reference: reference.to_string(),
            digest,
        })
    };
    // The image itself first: its layers are every ancestor's, so once it is there each
    // ancestor needs only its config and manifest (skopeo mounts the layers across
    // repositories), and those small pushes go at once, side by side.
    let Some((top_at, top_reference, top_composed)) = composed.last() else {
        bail!("nothing to push");
    };
    let top = push_one(*top_at, top_reference, top_composed, progress)?;
    let ancestors = &composed[..composed.len() - 1];
    let mut pushed: Vec<Pushed> = std::thread::scope(|scope| {
        let pushes: Vec<_> = ancestors
            .iter()
            .map(|(at, reference, composed)| {
                scope.spawn(|| push_one(*at, reference, composed, false))
            })
            .collect();
        pushes
            .into_iter()
            .map(|push| {
                push.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a push thread panicked")))
            })
            .collect::<anyhow::Result<Vec<_>>>()
    })?;
    pushed.push(top);
    for one in &pushed {
        record.insert(one.reference.clone(), one.digest.clone());
    }
    staging.discard();
    // Only a cache: losing it costs the next re-push its copies, nothing else.
    let _ = crate::json_file::write_atomically(&record_path, &record);
    Ok(pushed)
}

/// What this store pushed where: reference → manifest digest.
const PUSHED_RECORD: &str = "cache/oci/pushed.json";

/// The lineage of `image`, root first.
fn chain_of(images: &[ImageRecord], image: &ImageRecord) -> anyhow::Result<Vec<ImageRecord>> {
    let mut chain = vec![image.clone()];
    while let Some(parent) = chain
        .last()
        .and_then(|i| i.parent)
        .and_then(|p| images.iter().find(|i| i.id == p))
    {
        anyhow::ensure!(
            chain.len() <= images.len(),
            "the lineage of {} loops",
            image.reference()
        );
        chain.push(parent.clone());
    }
    chain.reverse();
    Ok(chain)
}

/// The store's facts about `image` as annotations.
fn facts(
    image: &ImageRecord,
    packages: &[crate::dpkg::InstalledPackage],
    parent: Option<&ImageRecord>,
    parent_manifest: Option<&str>,
) -> anyhow::Result<BTreeMap<String, String>> {
    let mut annotations = BTreeMap::new();
    annotations.insert(NAME.to_owned(), image.name.clone());
    annotations.insert(VERSION.to_owned(), image.version.clone());
    annotations.insert(oci::TREE_DIGEST.to_owned(), image.tree_digest.clone());
    if let Some(parent) = parent {
        annotations.insert(PARENT.to_owned(), parent.reference());
        annotations.insert(PARENT_TREE_DIGEST.to_owned(), parent.tree_digest.clone());
    }
    if let Some(manifest) = parent_manifest {
        annotations.insert(PARENT_MANIFEST.to_owned(), manifest.to_owned());
    }
    annotations.insert(
        PROVENANCE.to_owned(),
        serde_json::to_string(&image.provenance)?,
    );
    if !packages.is_empty() {
        let list: Vec<String> = packages
            .iter()
            .map(|p| format!("{}={}", p.name, p.version))
            .collect();
        annotations.insert(PACKAGES.to_owned(), list.join(" "));
    }
    Ok(annotations)
}

/// What a pull did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Pulled {
    pub image: String,
    pub tree_digest: String,
    /// `sha256:…` of the manifest.
    pub digest: String,
    /// Already in the store: nothing was fetched.
    pub already_stored: bool,
    /// Parents pulled first, root first.
    pub parents: Vec<String>,
    /// The parent the image derives from in this store (pulled or found by tree digest).
    pub parent: Option<String>,
}

/// Pull `source` into the store, its parents first when they carry references and the store
/// lacks them. `name` (`NAME` or `NAME@VERSION`) overrides the annotated name; an image
/// without annotations (pushed by other tools) needs none: it is named after its
/// repository and imported as a base of its own.
pub fn pull(
    store: &Store,
    source: &Reference,
    name: Option<&str>,
    access: &Access,
    progress: bool,
) -> anyhow::Result<Pulled> {
    skopeo::require()?;
    let _lease = store.gc_lease()?;
    let mut parents = Vec::new();
    let mut seen = BTreeSet::new();
    let mut pulled = pull_one(
        store,
        source,
        name,
        access,
        progress,
        &mut parents,
        &mut seen,
    )?;
    pulled.parents = parents;
    Ok(pulled)
}

fn pull_one(
    store: &Store,
    source: &Reference,
    name: Option<&str>,
    access: &Access,
    progress: bool,
    parents: &mut Vec<String>,
    seen: &mut BTreeSet<String>,
) -> anyhow::Result<Pulled> {
    let (pinned, manifest_bytes) = skopeo::manifest(source, access)?;
    let digest = pinned.digest.clone().unwrap_or_default();
    anyhow::ensure!(
        seen.insert(digest.clone()) && seen.len() <= MAX_LINEAGE,
        "{source}: the parent references loop or go deeper than {MAX_LINEAGE} images"
    );
    let manifest: crate::oci_json::ImageManifest = serde_json::from_slice(&manifest_bytes)
        .with_context(|| format!("{source}: parsing the manifest"))?;
    let layers = manifest
        .layers
        .with_context(|| format!("{source}: the manifest has no `layers`"))?;
    let annotations: BTreeMap<String, String> = manifest.annotations;
    let claimed_tree = annotations.get(oci::TREE_DIGEST).cloned();
    let (image_name, version) = match name {
        Some(name) => crate::store::parse_new_reference(name)?,
        None => match annotations.get(NAME) {
            Some(annotated) => {
                let annotated = match annotations.get(VERSION) {
                    Some(version) => format!("{annotated}@{version}"),
                    None => annotated.clone(),
                };
                crate::store::parse_new_reference(&annotated)
                    .with_context(|| format!("{source}: the annotated name"))?
            }
            None => (
                source.repository.clone(),
                source
                    .tag
                    .clone()
                    .filter(|tag| crate::manifest::version::Version::parse(tag).is_ok()),
            ),
        },
    };
    let images = store.list()?;
    // The same image already here: nothing moves.
    if let Some(tree) = &claimed_tree
        && let Some(existing) = images
            .iter()
            .find(|i| i.has_tree(tree) && i.name == image_name)
    {
        return Ok(Pulled {
            image: existing.reference(),
            tree_digest: existing.tree_digest.clone(),
            digest,
            already_stored: true,
            parents: Vec::new(),
            parent: parent_reference(&images, existing),
        });
    }
    if let Some(version) = &version
        && let Some(taken) = images
            .iter()
            .find(|i| i.name == image_name && &i.version == version)
    {
        bail!(
            "{source}: the store already has {} with other content (tree {}); pull it under another name or version with `--name NAME@VERSION`",
            taken.reference(),
            crate::store::short(&taken.tree_digest)
        );
    }
    // This image's layers first: they include its parents' (a pushed lineage shares them),
    // so one copy brings every layer, and a parent pulled below finds its own in the cache.
    let blobs = oci::blob_dir(store);
    let by_digest = blobs.join("sha256");
    fs_err::create_dir_all(&blobs)?;
    let fetch = || -> anyhow::Result<()> {
        let layout = tempfile::Builder::new()
            .prefix("pull-")
            .tempdir_in(store.root().join("staging"))?;
        skopeo::copy(
            &skopeo::Endpoint::Registry(&pinned),
            &skopeo::Endpoint::Layout {
                dir: layout.path().to_owned(),
                tag: "pulled".into(),
            },
            access,
            progress,
            Some(&blobs),
        )
        .with_context(|| format!("pulling {source}"))?;
        Ok(())
    };
    // Blobs already cached are verified by the import, which hashes every layer it reads.
    let cached = layers.iter().all(|layer| {
        crate::store::import::blob_path(&by_digest, &layer.digest)
            .is_ok_and(|path| fs_err::metadata(path).is_ok_and(|m| m.len() == layer.size))
    });
    if !cached {
        fetch()?;
    }
    // The parent: found by tree digest, else pulled from its annotated manifest.
    let mut parent: Option<ImageRecord> = None;
    if let Some(parent_tree) = annotations.get(PARENT_TREE_DIGEST) {
        parent = images.iter().find(|i| i.has_tree(parent_tree)).cloned();
        if parent.is_none()
            && let Some(parent_manifest) = annotations.get(PARENT_MANIFEST)
        {
            let parent_source = Reference::parse(parent_manifest)
                .map_err(|e| anyhow::anyhow!("{source}: the parent annotation: {e}"))?;
            anyhow::ensure!(
                parent_source.registry == source.registry,
                "{source}: its parent is in another registry ({}); pull it from there first",
                parent_source.registry
            );
            let pulled = pull_one(store, &parent_source, None, access, progress, parents, seen)?;
            parents.push(pulled.image.clone());
            let images = store.list()?;
            parent = images.iter().find(|i| i.has_tree(parent_tree)).cloned();
            anyhow::ensure!(
                parent.is_some(),
                "{source}: its parent {parent_source} holds another tree than the annotation says"
            );
        }
    }
    // Layers the parent's tree already holds are not applied again: the image's own layer
    // goes onto the parent's stored tree, and the tree digest check below proves the result.
    let onto_parent = parent
        .as_ref()
        .filter(|_| !layers.is_empty() && claimed_tree.is_some());
    let own_layers = match onto_parent {
        Some(_) => &layers[layers.len() - 1..],
        None => &layers[..],
    };
    let apply = || {
        let base = onto_parent.map(|parent| store.tree(parent)).transpose()?;
        let mut staging = store.staging()?;
        let imported = crate::store::import::apply_oci_layers(
            &by_digest,
            own_layers,
            base,
            &mut staging,
            crate::store::import::Limits::default(),
        )
        .with_context(|| format!("importing {source}"))?;
        anyhow::Ok((imported, staging))
    };
    let (imported, staging) = match apply() {
        Ok(done) => done,
        // A cached blob that does not hash to its digest (damaged on disk): fetched again.
        Err(error) if cached => {
            for layer in own_layers {
                if let Ok(path) = crate::store::import::blob_path(&by_digest, &layer.digest) {
                    let _ = fs_err::remove_file(path);
                }
            }
            fetch().with_context(|| format!("after the cached layers failed: {error:#}"))?;
            apply()?
        }
        Err(error) => return Err(error),
    };
    let tree_digest = imported.tree.digest();
    if let Some(claimed) = &claimed_tree {
        // An image pushed before tree digest format 2 is annotated with the first format.
        anyhow::ensure!(
            &tree_digest == claimed || &imported.tree.legacy_digest() == claimed,
            "{source}: its layers make tree {tree_digest}, but its annotation says {claimed}; refusing it"
        );
    }
    let mut provenance = annotations
        .get(PROVENANCE)
        .and_then(|text| serde_json::from_str::<serde_json::Value>(text).ok())
        .filter(serde_json::Value::is_object)
        .unwrap_or_else(|| serde_json::json!({}));
    if let Some(object) = provenance.as_object_mut() {
        object.insert(
            "pulled".into(),
            serde_json::json!({ "from": source.to_string(), "manifest": digest }),
        );
    }
    let record = store.commit_tree(
        &NewTree {
            name: image_name,
            version,
            parent: parent.as_ref().map(|p| p.id),
            provenance,
        },
        &imported.tree,
        staging,
        imported.dpkg_status.as_deref(),
    )?;
    Ok(Pulled {
        image: record.reference(),
        tree_digest: record.tree_digest.clone(),
        digest,
        already_stored: false,
        parents: Vec::new(),
        parent: parent.map(|p| p.reference()),
    })
}

fn parent_reference(images: &[ImageRecord], image: &ImageRecord) -> Option<String> {
    let parent = image.parent?;
    images
        .iter()
        .find(|i| i.id == parent)
        .map(ImageRecord::reference)
}

/// `HOST/REPOSITORY@sha256:…` of the manifest a stored image was pulled from.
pub fn pulled_from(image: &ImageRecord) -> Option<String> {
    let pulled = crate::store::provenance::common(&image.provenance).pulled?;
    let from = Reference::parse(&pulled.from).ok()?;
    Some(from.at_digest(&pulled.manifest).to_string())
}

/// The tags of `repository` (its tag, if any, ignored).
pub fn list_tags(repository: &Reference, access: &Access) -> anyhow::Result<Vec<String>> {
    skopeo::require()?;
    skopeo::list_tags(repository, access)
}
