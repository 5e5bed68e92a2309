//! The image store: a catalog of images with their lineage, and content-addressed objects.
//!
//! Layout on disk (only this module knows it):
//! ```text
//! <store>/
//!   catalog.duckdb      images, entries (path, type, mode, owner, size, digest, link,
//!                       device numbers, xattrs, mtime), installed packages, and the
//!                       derivation history (see `history`); its schema version is in
//!                       `meta`, and a writing open upgrades older ones
//!   objects/ab/cdef…    file contents named by SHA-256, stored once, read-only
//!   staging/<id>/       objects of imports in progress (gc removes those of dead processes)
//!   quarantine/         objects that failed verification (`fsck --repair`)
//!   cache/trees/<digest>/  materialized image trees the package step overlays (see
//!                       `materialized`), with `<digest>.lock` held shared while in use
//!   cache/debs/, cache/apt-lists/  downloaded packages and package lists, reused
//!   catalog.lock        flock: shared to read the catalog, exclusive to change it
//!   gc.lock             flock: shared while an import runs, exclusive for gc
//! ```
//! Crash safety: objects are staged, flushed, renamed into place and flushed again before
//! the catalog transaction that names them commits (see `objects`). The catalog is only
//! opened while `catalog.lock` is held, so concurrent processes never see DuckDB's own
//! lock errors: readers share the lock, writers wait for each other.

pub mod catalog;
pub mod deb_cache;
pub mod derivations;
pub mod diff;
pub mod download_caches;
pub mod export;
pub mod import;
pub mod materialized;
pub mod objects;
pub mod provenance;
pub mod tar_reader;
pub mod tree;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde::Serialize;

use catalog::Catalog;
pub use catalog::{ImageRecord, NewImage};
use objects::{Objects, Staging};
use tree::Tree;

use crate::dpkg::{InstalledPackage, parse_status};
use crate::manifest::version::Version;

#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// A held flock; released on drop.
#[derive(Debug)]
pub struct LockGuard {
    file: File,
}

impl LockGuard {
    /// Set the lock file's mtime to now: when the locked thing was last used.
    pub(super) fn touch(&self) -> std::io::Result<()> {
        self.file.set_modified(std::time::SystemTime::now())
    }
}

fn open_lock_file(path: &Path) -> anyhow::Result<File> {
    Ok(fs_err::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?
        .into_parts()
        .0)
}

fn lock(path: &Path, exclusive: bool) -> anyhow::Result<LockGuard> {
    let file = open_lock_file(path)?;
    let operation = if exclusive {
        rustix::fs::FlockOperation::LockExclusive
    } else {
        rustix::fs::FlockOperation::LockShared
    };
    rustix::fs::flock(&file, operation).with_context(|| format!("locking {}", path.display()))?;
    Ok(LockGuard { file })
}

/// Ancestors an image records derivations from (a guard against a damaged, cyclic catalog).
const MAX_LINEAGE_DEPTH: usize = 16;

/// The default store: `$XDG_DATA_HOME/cargo-appliance/store`, or `~/.local/share/…`.
pub fn default_store_dir() -> anyhow::Result<PathBuf> {
    if let Some(data) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(data).join("cargo-appliance/store"));
    }
    let home = std::env::var_os("HOME")
        .context("neither XDG_DATA_HOME nor HOME is set; pass --store DIR")?;
    Ok(PathBuf::from(home).join(".local/share/cargo-appliance/store"))
}

/// A catalog opened under its lock.
#[derive(Debug)]
pub struct LockedCatalog {
    pub catalog: Catalog,
    _guard: LockGuard,
}

impl std::ops::Deref for LockedCatalog {
    type Target = Catalog;
    fn deref(&self) -> &Catalog {
        &self.catalog
    }
}

impl std::ops::DerefMut for LockedCatalog {
    fn deref_mut(&mut self) -> &mut Catalog {
        &mut self.catalog
    }
}

/// Image trees loaded from the catalog once per operation: recording a derivation diffs an
/// image against each ancestor and each package step on the way, which share trees.
pub struct TreeCache<'c> {
    catalog: &'c Catalog,
    trees: HashMap<i64, Tree>,
}

impl std::fmt::Debug for TreeCache<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TreeCache")
            .field("images", &self.trees.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl<'c> TreeCache<'c> {
    pub fn new(catalog: &'c Catalog) -> Self {
        Self {
            catalog,
            trees: HashMap::new(),
        }
    }

    fn insert(&mut self, image: i64, tree: Tree) {
        self.trees.insert(image, tree);
    }

    pub fn get(&mut self, image: i64) -> anyhow::Result<&Tree> {
        if !self.trees.contains_key(&image) {
            let tree = self.catalog.tree(image)?;
            self.trees.insert(image, tree);
        }
        Ok(self.loaded(image))
    }

    /// A tree [`TreeCache::get`] has loaded.
    fn loaded(&self, image: i64) -> &Tree {
        &self.trees[&image]
    }
}

/// A tree about to become an image.
#[derive(Debug, Clone)]
pub struct NewTree {
    pub name: String,
    /// `None`: the next free major version of `name`.
    pub version: Option<String>,
    pub parent: Option<i64>,
    pub provenance: serde_json::Value,
}

/// What `images --tree` and `image show` print.
#[derive(Debug, Serialize)]
pub struct ImageDetails {
    #[serde(flatten)]
    pub record: ImageRecord,
    pub parent_reference: Option<String>,
    pub children: Vec<String>,
    pub packages: Vec<InstalledPackage>,
}

#[derive(Debug, Default, Serialize)]
pub struct GcReport {
    pub removed_objects: usize,
    pub removed_bytes: u64,
    pub removed_staging: usize,
    pub removed_cached_trees: usize,
    /// Package lists set aside for deletion, lists and packages left partial by dead builds.
    pub removed_stale_downloads: usize,
}

#[derive(Debug, Default, Serialize)]
pub struct FsckReport {
    pub objects_checked: usize,
    pub corrupt_objects: Vec<String>,
    pub missing_objects: Vec<String>,
    pub unreferenced_objects: usize,
    pub images_needing_repair: Vec<String>,
    pub quarantined: usize,
    /// Materialized trees in the cache that differ from their tree (removed with repair).
    pub damaged_cached_trees: Vec<String>,
    /// OCI layer blobs and apt lists in the cache that are not what they claim (removed
    /// with repair).
    pub damaged_download_caches: Vec<String>,
}

impl FsckReport {
    pub fn is_clean(&self) -> bool {
        self.corrupt_objects.is_empty()
            && self.missing_objects.is_empty()
            && self.damaged_cached_trees.is_empty()
            && self.damaged_download_caches.is_empty()
    }
}

impl Store {
    /// Open (creating if needed) a store directory.
    pub fn open(root: &Path) -> anyhow::Result<Self> {
        for dir in ["objects", "staging", "quarantine"] {
            fs_err::create_dir_all(root.join(dir))
                .with_context(|| format!("creating the store at {}", root.display()))?;
        }
        let store = Self {
            root: fs_err::canonicalize(root)?,
        };
        if !store.root.join("catalog.duckdb").exists() {
            drop(store.write_catalog()?);
        }
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn objects(&self) -> Objects {
        Objects::new(self.root.join("objects"))
    }

    pub fn read_catalog(&self) -> anyhow::Result<LockedCatalog> {
        let guard = lock(&self.root.join("catalog.lock"), false)?;
        match Catalog::open(&self.root.join("catalog.duckdb"), true) {
            Ok(catalog) => Ok(LockedCatalog {
                catalog,
                _guard: guard,
            }),
            Err(read_only_error) => {
                // A writer killed mid-commit leaves a write-ahead log that only a read-write
                // open replays; do that under the exclusive lock, then read.
                drop(guard);
                let catalog = self.write_catalog().with_context(|| {
                    format!("after a read-only open failed: {read_only_error:#}")
                })?;
                catalog.connection().execute_batch("CHECKPOINT")?;
                Ok(catalog)
            }
        }
    }

    pub fn write_catalog(&self) -> anyhow::Result<LockedCatalog> {
        let guard = lock(&self.root.join("catalog.lock"), true)?;
        let catalog = Catalog::open(&self.root.join("catalog.duckdb"), false)?;
        Ok(LockedCatalog {
            catalog,
            _guard: guard,
        })
    }

    /// Resolve `NAME`, `NAME@VERSION` or a tree-digest prefix (at least 6 hex digits).
    pub fn resolve(&self, catalog: &Catalog, reference: &str) -> anyhow::Result<ImageRecord> {
        let images = catalog.images()?;
        if let Some((name, version)) = reference.split_once('@') {
            return images
                .into_iter()
                .find(|i| i.name == name && i.version == version)
                .with_context(|| format!("no image {name}@{version} in the store"));
        }
        let newest = images
            .iter()
            .filter(|i| i.name == reference)
            .max_by(|a, b| {
                version_key(&a.version)
                    .cmp(&version_key(&b.version))
                    .then(a.id.cmp(&b.id))
            });
        if let Some(image) = newest {
            return Ok(image.clone());
        }
        if reference.len() >= 6 && reference.bytes().all(|b| b.is_ascii_hexdigit()) {
            let matching: Vec<&ImageRecord> = images
                .iter()
                .filter(|i| i.tree_digest.starts_with(reference))
                .collect();
            match matching.as_slice() {
                [one] => return Ok((*one).clone()),
                [] => {}
                several => bail!(
                    "digest prefix {reference} is ambiguous: {}",
                    several
                        .iter()
                        .map(|i| i.reference())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }
        }
        let names: BTreeSet<&str> = images.iter().map(|i| i.name.as_str()).collect();
        let hint = crate::diagnostics::did_you_mean(reference, names.iter().copied())
            .map(|close| format!("; did you mean `{close}`?"))
            .unwrap_or_default();
        bail!("no image `{reference}` in the store{hint}")
    }

    /// Import a directory, tar archive or OCI layout as `name[@version]`.
    pub fn import(
        &self,
        reference: &str,
        source: &Path,
        parent: Option<&str>,
        provenance: serde_json::Value,
    ) -> anyhow::Result<ImageRecord> {
        self.import_with_limits(
            reference,
            source,
            parent,
            provenance,
            import::Limits::default(),
        )
    }

    pub fn import_with_limits(
        &self,
        reference: &str,
        source: &Path,
        parent: Option<&str>,
        provenance: serde_json::Value,
        limits: import::Limits,
    ) -> anyhow::Result<ImageRecord> {
        let (name, version) = parse_new_reference(reference)?;
        // Hold off gc for as long as this import has staged or unreferenced objects.
        let _lease = self.gc_lease()?;
        let parent_id = match parent {
            Some(parent) => {
                let catalog = self.read_catalog()?;
                Some(self.resolve(&catalog, parent)?.id)
            }
            None => None,
        };
        let mut staging = self.staging()?;
        let imported = match import::import_path(source, &mut staging, limits) {
            Ok(imported) => imported,
            Err(error) => {
                staging.discard();
                return Err(error.context(format!(
                    "importing {} from {}",
                    reference,
                    source.display()
                )));
            }
        };
        let mut provenance = provenance;
        if let Some(object) = provenance.as_object_mut() {
            object.insert("format".into(), imported.format.into());
        }
        self.commit_tree(
            &NewTree {
                name,
                version,
                parent: parent_id,
                provenance,
            },
            &imported.tree,
            staging,
            imported.dpkg_status.as_deref(),
        )
    }

    /// A shared lease on the store's objects: `gc` waits until it is dropped. Hold it from
    /// the first staged object until the catalog names every object the work will use.
    pub fn gc_lease(&self) -> anyhow::Result<LockGuard> {
        lock(&self.root.join("gc.lock"), false)
    }

    /// A staging area for new objects (removed by `gc` if this process dies).
    pub fn staging(&self) -> anyhow::Result<Staging> {
        let staging_dir = self.root.join("staging").join(format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        Staging::new(staging_dir, self.objects())
    }

    /// Make the staged objects durable, then insert the tree as an image in one catalog
    /// transaction and record its derivation from the parent. `dpkg_status` is the content
    /// of the tree's `/var/lib/dpkg/status`, when the caller has it at hand; otherwise it is
    /// read from the objects.
    pub fn commit_tree(
        &self,
        new: &NewTree,
        tree: &Tree,
        staging: Staging,
        dpkg_status: Option<&[u8]>,
    ) -> anyhow::Result<ImageRecord> {
        // The last moment a signal can still leave the store as it was.
        crate::process::interrupt::check()?;
        staging.commit()?;
        // Objects are in place, the catalog does not list them yet: `gc` removes them.
        crate::test_hooks::point("objects-committed");
        let status_from_objects;
        let dpkg_status = match dpkg_status {
            Some(status) => Some(status),
            None => {
                status_from_objects = tree
                    .get(crate::dpkg::STATUS_PATH)
                    .and_then(|entry| entry.digest.as_deref())
                    .map(|digest| self.objects().read(digest))
                    .transpose()?;
                status_from_objects.as_deref()
            }
        };
        let packages = dpkg_status
            .map(|status| parse_status(&String::from_utf8_lossy(status)))
            .unwrap_or_default();
        let mut provenance = new.provenance.clone();
        if let Some(object) = provenance.as_object_mut()
            && !packages.is_empty()
        {
            let versions: BTreeMap<&str, &str> = packages
                .iter()
                .map(|p| (p.name.as_str(), p.version.as_str()))
                .collect();
            object.insert("packages".into(), serde_json::json!(versions));
        }
        let name = new.name.clone();
        let mut catalog = self.write_catalog()?;
        let images = catalog.images()?;
        if let Some(parent_id) = new.parent {
            anyhow::ensure!(
                images.iter().any(|i| i.id == parent_id),
                "the parent image was removed while importing"
            );
        }
        let version = match &new.version {
            Some(version) => {
                anyhow::ensure!(
                    !images
                        .iter()
                        .any(|i| i.name == name && &i.version == version),
                    "{name}@{version} is already in the store"
                );
                version.clone()
            }
            None => next_version(&images, &name),
        };
        // The image and its derivations are one transaction: a process killed in between
        // must not leave an image listed whose history is missing.
        let record = catalog.atomically(|catalog| {
            let record = catalog.insert_image_in_transaction(
                &NewImage {
                    name,
                    version,
                    parent: new.parent,
                    provenance,
                },
                tree,
                &packages,
            )?;
            // The lineage walk of the package steps on the way starts from the new image.
            let mut images = images;
            images.push(record.clone());
            let derivations = self
                .derivations_of(catalog, &images, &record, Some(tree))
                .context("recording the image's derivation")?;
            derivations::insert_for_images_in_transaction(
                catalog.connection(),
                derivations.iter().map(|d| (d, Some(record.id))),
                "store",
            )?;
            Ok(record)
        })?;
        // Stored with its derivation; the build's own records (lock, outputs) not yet.
        crate::test_hooks::point("image-committed");
        Ok(record)
    }

    /// Typed changes from one stored image to another, with the consequences of package
    /// steps on the way marked (see [`crate::store::diff::attribute`]).
    pub fn diff_images(
        &self,
        trees: &mut TreeCache<'_>,
        images: &[ImageRecord],
        parent: &ImageRecord,
        child: &ImageRecord,
    ) -> anyhow::Result<Vec<crate::store::diff::DiffEntry>> {
        let mut entries = self.plain_diff(trees, parent, child)?;
        // Package steps from the child up to where its lineage meets the parent's.
        let mut parent_line = BTreeSet::new();
        let mut ancestor = Some(parent.id);
        while let Some(id) = ancestor.filter(|id| parent_line.insert(*id)) {
            ancestor = images.iter().find(|i| i.id == id).and_then(|i| i.parent);
        }
        let mut steps = Vec::new();
        let mut current = images.iter().find(|i| i.id == child.id);
        while let Some(image) = current.filter(|i| !parent_line.contains(&i.id)) {
            if steps.len() >= MAX_LINEAGE_DEPTH {
                break;
            }
            let step_parent = image
                .parent
                .and_then(|id| images.iter().find(|i| i.id == id));
            if let Some(step_parent) = step_parent
                && matches!(image.step(), Some(provenance::Step::Packages(_)))
            {
                let changes = self.plain_diff(trees, step_parent, image)?;
                steps.push((image.id, changes));
            }
            current = step_parent;
        }
        if !steps.is_empty() {
            trees.get(child.id)?;
            let steps: Vec<crate::store::diff::PackageStep<'_>> = steps
                .into_iter()
                .map(|(id, changes)| crate::store::diff::PackageStep {
                    changes,
                    tree: trees.loaded(id),
                })
                .collect();
            crate::store::diff::attribute(&mut entries, trees.loaded(child.id), &steps);
        }
        Ok(entries)
    }

    fn plain_diff(
        &self,
        trees: &mut TreeCache<'_>,
        parent: &ImageRecord,
        child: &ImageRecord,
    ) -> anyhow::Result<Vec<crate::store::diff::DiffEntry>> {
        let objects = self.objects();
        let read = |digest: &str| objects.read(digest);
        let (parent_packages, child_packages) = (
            trees.catalog.packages(parent.id)?,
            trees.catalog.packages(child.id)?,
        );
        trees.get(parent.id)?;
        trees.get(child.id)?;
        let (parent_tree, child_tree) = (trees.loaded(parent.id), trees.loaded(child.id));
        crate::store::diff::diff(
            &crate::store::diff::Side {
                tree: parent_tree,
                packages: &parent_packages,
                read: &read,
            },
            &crate::store::diff::Side {
                tree: child_tree,
                packages: &child_packages,
                read: &read,
            },
        )
    }

    pub fn diff(&self, a: &str, b: &str) -> anyhow::Result<Vec<crate::store::diff::DiffEntry>> {
        let catalog = self.read_catalog()?;
        let (a, b) = (self.resolve(&catalog, a)?, self.resolve(&catalog, b)?);
        let images = catalog.images()?;
        self.diff_images(&mut TreeCache::new(&catalog), &images, &a, &b)
    }

    /// How `child` derives from each of its ancestors: from its parent, and from every
    /// image further up its lineage with the changes accumulated on the way. A base's
    /// statistics then count every image derived from it, directly or through intermediate
    /// images (a build stores base → packages → appliance; the appliance is derived from the
    /// base with all of it). Only intended changes are recorded: dependencies and what
    /// maintainer scripts did follow from the packages. `images` must include `child`: the
    /// package steps on its lineage are found from it.
    fn derivations_of(
        &self,
        catalog: &Catalog,
        images: &[ImageRecord],
        child: &ImageRecord,
        known_tree: Option<&Tree>,
    ) -> anyhow::Result<Vec<derivations::Derivation>> {
        let mut derivations = Vec::new();
        let mut trees = TreeCache::new(catalog);
        if let Some(tree) = known_tree {
            trees.insert(child.id, tree.clone());
        }
        let mut ancestor = child.parent;
        while let Some(parent) = ancestor.and_then(|id| images.iter().find(|i| i.id == id)) {
            if derivations.len() >= MAX_LINEAGE_DEPTH {
                break;
            }
            let changes = self.diff_images(&mut trees, images, parent, child)?;
            derivations.push(derivations::Derivation {
                parent: parent.name.clone(),
                child: child.reference(),
                changes: changes
                    .iter()
                    .filter(|c| c.is_intended())
                    .map(crate::store::diff::DiffEntry::change)
                    .filter(crate::change::is_choice)
                    .collect(),
            });
            ancestor = parent.parent;
        }
        Ok(derivations)
    }

    /// Re-derive the history of stored images (derivations with origin `store`) from the
    /// catalog; imported history is kept.
    pub fn rebuild_history(&self) -> anyhow::Result<usize> {
        let mut catalog = self.write_catalog()?;
        catalog.atomically(|catalog| {
            derivations::remove_in_transaction(catalog.connection(), "origin = 'store'", &[])?;
            let images = catalog.images()?;
            let mut count = 0;
            for child in &images {
                let recorded = self.derivations_of(catalog, &images, child, None)?;
                count += derivations::insert_for_images_in_transaction(
                    catalog.connection(),
                    recorded.iter().map(|d| (d, Some(child.id))),
                    "store",
                )?;
            }
            Ok(count)
        })
    }

    pub fn tree(&self, image: &ImageRecord) -> anyhow::Result<Tree> {
        self.read_catalog()?.tree(image.id)
    }

    pub fn export(
        &self,
        reference: &str,
        destination: &Path,
    ) -> anyhow::Result<export::ExportReport> {
        let (image, tree) = {
            let catalog = self.read_catalog()?;
            let image = self.resolve(&catalog, reference)?;
            let tree = catalog.tree(image.id)?;
            (image, tree)
        };
        anyhow::ensure!(
            !image.needs_repair,
            "{} has corrupt objects (fsck marked it); re-import it or remove it",
            image.reference()
        );
        export::export(&tree, &self.objects(), destination).with_context(|| {
            format!(
                "exporting {} to {}",
                image.reference(),
                destination.display()
            )
        })
    }

    pub fn list(&self) -> anyhow::Result<Vec<ImageRecord>> {
        self.read_catalog()?.images()
    }

    /// A stamp of the catalog's files: every write to the catalog changes it (size, mtime or
    /// inode of the database or its write-ahead log); reads never do.
    pub fn catalog_stamp(&self) -> String {
        use std::os::unix::fs::MetadataExt as _;
        ["catalog.duckdb", "catalog.duckdb.wal"]
            .iter()
            .map(|file| {
                let stamp = std::fs::metadata(self.root.join(file))
                    .ok()
                    .map(|m| (m.len(), m.mtime(), m.mtime_nsec(), m.ino()));
                format!("{file} {stamp:?}\n")
            })
            .collect()
    }

    /// [`Store::list`], answered from `cache` while the catalog is unchanged: opening the
    /// catalog costs more than a no-op build may take.
    pub fn list_cached(&self, cache: &Path) -> anyhow::Result<Vec<ImageRecord>> {
        let stamp = self.catalog_stamp();
        if let Ok(data) = std::fs::read(cache)
            && let Ok((cached_stamp, images)) =
                serde_json::from_slice::<(String, Vec<ImageRecord>)>(&data)
            && cached_stamp == stamp
        {
            return Ok(images);
        }
        let images = self.list()?;
        // Only a stamp taken before the read may label it: a write in between changes it.
        crate::json_file::write_atomically(cache, &(&stamp, &images))?;
        Ok(images)
    }

    pub fn show(&self, reference: &str) -> anyhow::Result<ImageDetails> {
        let catalog = self.read_catalog()?;
        let record = self.resolve(&catalog, reference)?;
        let images = catalog.images()?;
        let parent_reference = record
            .parent
            .and_then(|p| images.iter().find(|i| i.id == p))
            .map(ImageRecord::reference);
        let children = images
            .iter()
            .filter(|i| i.parent == Some(record.id))
            .map(ImageRecord::reference)
            .collect();
        let packages = catalog.packages(record.id)?;
        Ok(ImageDetails {
            record,
            parent_reference,
            children,
            packages,
        })
    }

    /// Remove an image; with `recursive`, its descendants too. Objects stay until `gc`.
    pub fn remove(&self, reference: &str, recursive: bool) -> anyhow::Result<Vec<String>> {
        let mut catalog = self.write_catalog()?;
        let image = self.resolve(&catalog, reference)?;
        let images = catalog.images()?;
        let mut doomed = vec![image.id];
        let mut frontier = vec![image.id];
        while let Some(id) = frontier.pop() {
            for child in images.iter().filter(|i| i.parent == Some(id)) {
                doomed.push(child.id);
                frontier.push(child.id);
            }
        }
        if doomed.len() > 1 && !recursive {
            let children: Vec<String> = images
                .iter()
                .filter(|i| i.parent == Some(image.id))
                .map(ImageRecord::reference)
                .collect();
            bail!(
                "{} has derived images ({}); remove them first or pass --recursive",
                image.reference(),
                children.join(", ")
            );
        }
        // The images and their derivations (which describe images that no longer exist)
        // go together.
        let ids: Vec<String> = doomed.iter().map(i64::to_string).collect();
        catalog.atomically(|catalog| {
            catalog.remove_images_in_transaction(&doomed)?;
            derivations::remove_in_transaction(
                catalog.connection(),
                &format!("image IN ({})", ids.join(", ")),
                &[],
            )
        })?;
        Ok(images
            .iter()
            .filter(|i| doomed.contains(&i.id))
            .map(ImageRecord::reference)
            .collect())
    }

    /// Remove objects no image references and staging directories of dead imports. Waits
    /// for running imports: they hold `gc.lock` shared from their first object to their
    /// catalog commit.
    pub fn gc(&self) -> anyhow::Result<GcReport> {
        let _exclusive = lock(&self.root.join("gc.lock"), true)?;
        let referenced = self.read_catalog()?.referenced_digests()?;
        let mut report = GcReport::default();
        for (digest, path) in self.objects().list()? {
            if !referenced.contains(&digest) {
                report.removed_bytes += fs_err::metadata(&path).map_or(0, |m| m.len());
                fs_err::remove_file(&path)?;
                report.removed_objects += 1;
            }
        }
        for staging in fs_err::read_dir(self.root.join("staging"))? {
            fs_err::remove_dir_all(staging?.path())?;
            report.removed_staging += 1;
        }
        let live_trees = self.list()?.into_iter().map(|i| i.tree_digest).collect();
        report.removed_cached_trees = self.prune_materialized(&live_trees)?;
        report.removed_stale_downloads = self.prune_download_caches()?;
        Ok(report)
    }

    /// Verify every object against its digest and every catalog reference against the
    /// objects. With `repair`, corrupt objects move to `quarantine/` and the images that
    /// need them are marked.
    pub fn fsck(&self, repair: bool) -> anyhow::Result<FsckReport> {
        let _exclusive = if repair {
            Some(lock(&self.root.join("gc.lock"), true)?)
        } else {
            None
        };
        let (referenced, images) = {
            let catalog = self.read_catalog()?;
            (catalog.referenced_digests()?, catalog.images()?)
        };
        let objects = self.objects();
        let mut report = FsckReport::default();
        let mut present = BTreeSet::new();
        for (digest, path) in objects.list()? {
            report.objects_checked += 1;
            present.insert(digest.clone());
            let ok = objects
                .open(&digest)
                .and_then(|mut reader| Ok(std::io::copy(&mut reader, &mut std::io::sink())?))
                .is_ok();
            if !ok {
                report.corrupt_objects.push(digest.clone());
                if repair {
                    fs_err::rename(&path, self.root.join("quarantine").join(&digest))?;
                    report.quarantined += 1;
                }
            } else if !referenced.contains(&digest) {
                report.unreferenced_objects += 1;
            }
        }
        report.missing_objects = referenced.difference(&present).cloned().collect();
        report.damaged_cached_trees = self.check_materialized(
            |digest| match images.iter().find(|i| i.tree_digest == digest) {
                Some(image) => Ok(Some(self.read_catalog()?.tree(image.id)?)),
                None => Ok(None),
            },
            repair,
        )?;
        report.damaged_download_caches = self.check_download_caches(repair)?;
        let bad: BTreeSet<String> = report
            .corrupt_objects
            .iter()
            .chain(report.missing_objects.iter())
            .cloned()
            .collect();
        if !bad.is_empty() {
            let mut catalog = if repair {
                Some(self.write_catalog()?)
            } else {
                None
            };
            let users = match &catalog {
                Some(catalog) => catalog.images_using(&bad)?,
                None => self.read_catalog()?.images_using(&bad)?,
            };
            report.images_needing_repair = images
                .iter()
                .filter(|i| users.contains(&i.id))
                .map(ImageRecord::reference)
                .collect();
            if let Some(catalog) = catalog.as_mut() {
                catalog.mark_needs_repair(&users)?;
            }
        }
        Ok(report)
    }
}

/// How versions sort: numerically by dotted components.
pub fn version_key(version: &str) -> Version {
    Version::parse(version).unwrap_or(Version(Vec::new()))
}

fn next_version(images: &[ImageRecord], name: &str) -> String {
    let newest = images
        .iter()
        .filter(|i| i.name == name)
        .filter_map(|i| Version::parse(&i.version).ok())
        .filter_map(|v| v.0.first().copied())
        .max();
    (newest.map_or(1, |major| major + 1)).to_string()
}

/// `NAME` or `NAME@VERSION` for a new image, with the manifest's grammars.
pub fn parse_new_reference(reference: &str) -> anyhow::Result<(String, Option<String>)> {
    let (name, version) = match reference.split_once('@') {
        Some((name, version)) => (name, Some(version)),
        None => (reference, None),
    };
    (crate::manifest::grammar::IMAGE_NAME.check)(name)
        .map_err(|e| anyhow::anyhow!("image name `{}` {e}", name.escape_debug()))?;
    if let Some(version) = version {
        Version::parse(version)
            .map_err(|e| anyhow::anyhow!("version `{}` {e}", version.escape_debug()))?;
    }
    Ok((name.to_owned(), version.map(str::to_owned)))
}

/// A tree of images by lineage, for `images --tree`.
pub fn lineage(images: &[ImageRecord]) -> BTreeMap<Option<i64>, Vec<&ImageRecord>> {
    let mut children: BTreeMap<Option<i64>, Vec<&ImageRecord>> = BTreeMap::new();
    for image in images {
        let parent = image.parent.filter(|p| images.iter().any(|i| i.id == *p));
        children.entry(parent).or_default().push(image);
    }
    children
}
/// The first twelve hex digits of a digest, as images and diagnostics show it.
pub fn short(digest: &str) -> &str {
    &digest[..12.min(digest.len())]
}
