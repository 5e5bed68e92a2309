//! The package step: install and remove Debian packages on top of the start image, stored as
//! an image keyed by (start image, wanted packages). When no stored image has the exact key,
//! start from the closest one: the stored package-step image of the same lineage whose
//! wanted packages are a subset of ours with the largest overlap, and install only the rest.

use std::collections::BTreeSet;

use sha2::{Digest as _, Sha256};

use crate::packages::apt::{self, AptCache, AptRequest, Sandbox, UnknownPackage};
use crate::packages::overlay::{self, Overlay, UpperLayer};
use crate::store::materialized::MaterializedTree;
use crate::store::provenance::{PackagesStep, Step};
use crate::store::tree::{Tree, hex};
use crate::store::{ImageRecord, NewTree, Store};

use super::progress::Reporter;

/// What the manifest asks of the package step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageWish {
    pub wanted: BTreeSet<String>,
    pub removed: BTreeSet<String>,
    pub recommends: bool,
}

impl PackageWish {
    pub fn is_empty(&self) -> bool {
        self.wanted.is_empty() && self.removed.is_empty()
    }

    /// The step's key: the start image's tree digest and exactly what is asked.
    pub fn key(&self, origin: &ImageRecord) -> String {
        let mut hasher = Sha256::new();
        hasher.update(b"cargo-appliance packages v1\n");
        hasher.update(origin.tree_digest.as_bytes());
        for (label, set) in [("+", &self.wanted), ("-", &self.removed)] {
            for name in set {
                hasher.update(format!("\n{label}{name}"));
            }
        }
        hasher.update(if self.recommends {
            "\nrecommends"
        } else {
            "\n"
        });
        hex(&hasher.finalize())
    }
}

/// A stored package-step image, as its provenance describes it.
#[derive(Debug, Clone)]
struct StepImage<'a> {
    image: &'a ImageRecord,
    key: String,
    origin: String,
    wanted: BTreeSet<String>,
    removed: BTreeSet<String>,
    recommends: bool,
}

fn step_images(images: &[ImageRecord]) -> Vec<StepImage<'_>> {
    images
        .iter()
        .filter(|i| !i.needs_repair)
        .filter_map(|image| match image.step()? {
            Step::Packages(step) => Some(StepImage {
                image,
                key: step.key,
                origin: step.origin,
                wanted: step.wanted,
                removed: step.removed,
                recommends: step.recommends,
            }),
            Step::Appliance(_) => None,
        })
        .collect()
}

/// A step's provenance as the catalog keeps it: the typed record, and who wrote it.
pub(super) fn step_provenance(step: Step) -> serde_json::Value {
    let mut value = serde_json::to_value(step).unwrap_or_default();
    if let Some(object) = value.as_object_mut() {
        object.insert("source".into(), "cargo-appliance build".into());
    }
    value
}

/// Where the package step starts and what it still has to do.
#[derive(Debug, Clone)]
pub enum Plan {
    /// An image with exactly this key is stored.
    Stored(ImageRecord),
    /// Install `install` (and remove `remove`) on top of `start`.
    Install {
        start: ImageRecord,
        install: BTreeSet<String>,
        remove: BTreeSet<String>,
        reason: String,
    },
}

/// Pick the stored image that leaves the least work.
pub fn plan(
    images: &[ImageRecord],
    origin: &ImageRecord,
    wish: &PackageWish,
    pinned_digest: Option<&str>,
) -> Plan {
    let key = wish.key(origin);
    let candidates = step_images(images);
    let exact: Vec<&StepImage<'_>> = candidates.iter().filter(|c| c.key == key).collect();
    let pinned = exact
        .iter()
        .find(|c| Some(c.image.tree_digest.as_str()) == pinned_digest);
    if let Some(found) = pinned.or_else(|| exact.iter().max_by_key(|c| c.image.id)) {
        return Plan::Stored(found.image.clone());
    }
    // Same lineage (same origin), same removals and Recommends policy, nothing we don't want.
    let closest = candidates
        .iter()
        .filter(|c| {
            c.origin == origin.tree_digest
                && c.removed == wish.removed
                && c.recommends == wish.recommends
                && c.wanted.is_subset(&wish.wanted)
        })
        .max_by_key(|c| (c.wanted.len(), c.image.id));
    match closest {
        Some(found) => Plan::Install {
            start: found.image.clone(),
            install: wish.wanted.difference(&found.wanted).cloned().collect(),
            remove: BTreeSet::new(),
            reason: format!(
                "{} has {} of the {} wanted packages ({}); the largest subset stored",
                found.image.reference(),
                found.wanted.len(),
                wish.wanted.len(),
                found.wanted.iter().cloned().collect::<Vec<_>>().join(", ")
            ),
        },
        None => Plan::Install {
            start: origin.clone(),
            install: wish.wanted.clone(),
            remove: wish.removed.clone(),
            reason: format!(
                "no stored package image of {} is a subset of the wanted packages",
                origin.reference()
            ),
        },
    }
}

/// Why the package step failed in a way the manifest can point at.
#[derive(Debug, thiserror::Error)]
pub enum PackageFailure {
    #[error("unknown packages")]
    Unknown(Vec<UnknownPackage>),
    #[error(transparent)]
    Apt(#[from] apt::SandboxFailure),
}

pub struct Execution<'a> {
    pub store: &'a Store,
    pub reporter: &'a Reporter,
    pub offline: bool,
    pub image_name: String,
    /// `name=version` pins from the lock file, for the packages it knows.
    pub pins: &'a std::collections::BTreeMap<String, String>,
}

impl std::fmt::Debug for Execution<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Execution")
            .field("image_name", &self.image_name)
            .finish_non_exhaustive()
    }
}

/// Set (to anything but `0`), the package step copies the start image instead of overlaying
/// it: for stores on filesystems where overlayfs misbehaves, and to compare the two.
pub const NO_OVERLAY_ENV: &str = "CARGO_APPLIANCE_NO_OVERLAY";

/// Where apt works: an overlay on a cached materialized copy of the start image (only the
/// changes are written and read back), or, where overlayfs is unavailable, a full copy.
enum WorkRoot {
    Overlay {
        overlay: Overlay,
        upper_layer: UpperLayer,
        _lower: MaterializedTree,
    },
    Copy {
        root: std::path::PathBuf,
        known: crate::store::import::KnownContent,
    },
}

/// The in-memory upper layer may take half the memory available now; with less than this
/// available, apt writes to disk.
const MIN_MEMORY_FOR_UPPER: u64 = 512 << 20;

/// An in-memory upper layer with less than this left was the reason apt (or a script)
/// failed.
pub(super) const FULL_UPPER: u64 = 16 << 20;

/// Bytes of memory for apt's changes (0: on disk), instead of half the memory available.
pub const OVERLAY_MEMORY_ENV: &str = "CARGO_APPLIANCE_OVERLAY_MEMORY";

/// Bytes a `run` script's changes may take (in memory), or `None` to write them to disk:
/// the same budget as apt's changes.
pub(super) fn script_space() -> Option<u64> {
    match upper_layer_for_this_machine() {
        UpperLayer::InMemory(bytes) => Some(bytes),
        UpperLayer::OnDisk => None,
    }
}

fn upper_layer_for_this_machine() -> UpperLayer {
    if let Some(bytes) = std::env::var(OVERLAY_MEMORY_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        return if bytes == 0 {
            UpperLayer::OnDisk
        } else {
            UpperLayer::InMemory(bytes)
        };
    }
    let available = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib.saturating_mul(1024));
    if available / 2 >= MIN_MEMORY_FOR_UPPER {
        UpperLayer::InMemory(available / 2)
    } else {
        UpperLayer::OnDisk
    }
}

impl WorkRoot {
    fn new(
        exec: &Execution<'_>,
        start: &ImageRecord,
        tree: &Tree,
        scratch: &std::path::Path,
        upper_layer: UpperLayer,
    ) -> anyhow::Result<Self> {
        let store = exec.store;
        fs_err::create_dir_all(scratch)?;
        let refused = std::env::var_os(NO_OVERLAY_ENV).is_some_and(|v| !v.is_empty() && v != "0");
        if !refused && overlay::can_overlay(tree) {
            let lower = store.materialized(tree, &start.tree_digest)?;
            match Overlay::mount(lower.path(), &scratch.join("overlay"), upper_layer) {
                Ok(overlay) => {
                    exec.reporter.explain(&format!(
                        "working on an overlay of {} ({} materialized copy; changes {})",
                        start.reference(),
                        if lower.written { "a new" } else { "the cached" },
                        match upper_layer {
                            UpperLayer::OnDisk => "on disk".to_owned(),
                            UpperLayer::InMemory(bytes) =>
                                format!("in memory, up to {} MiB", bytes >> 20),
                        }
                    ));
                    return Ok(WorkRoot::Overlay {
                        overlay,
                        upper_layer,
                        _lower: lower,
                    });
                }
                Err(error) => exec
                    .reporter
                    .explain(&format!("{error:#}; working on a full copy instead")),
            }
        }
        let root = scratch.join("root");
        crate::store::export::export_directory(tree, &store.objects(), &root)?;
        let known = crate::store::import::KnownContent::record(&root, tree)?;
        Ok(WorkRoot::Copy { root, known })
    }

    fn sandbox(&self) -> anyhow::Result<Sandbox> {
        match self {
            WorkRoot::Overlay { overlay, .. } => {
                Sandbox::prepare_entered(&overlay.view(), overlay.merged(), overlay.enter())
            }
            WorkRoot::Copy { root, .. } => Sandbox::prepare(root),
        }
    }

    /// Whether `failure` came from the changes, kept in memory, filling the space they had:
    /// apt said so, or (a write cut short in a maintainer script may say something else)
    /// hardly any space is left.
    fn upper_layer_full(&self, failure: &anyhow::Error) -> bool {
        let WorkRoot::Overlay {
            overlay,
            upper_layer: UpperLayer::InMemory(_),
            ..
        } = self
        else {
            return false;
        };
        let said_so = matches!(
            failure.downcast_ref::<PackageFailure>(),
            Some(PackageFailure::Apt(apt)) if apt.output.contains("No space left on device")
        );
        said_so
            || overlay
                .upper_free_bytes()
                .is_some_and(|free| free < FULL_UPPER)
    }

    /// The start tree with apt's changes, its new content staged.
    fn import(
        self,
        tree: Tree,
        staging: &mut crate::store::objects::Staging,
    ) -> anyhow::Result<crate::store::import::Imported> {
        let limits = crate::store::import::Limits::default();
        match self {
            WorkRoot::Overlay { overlay, .. } => {
                let unmounted = overlay.unmount()?;
                crate::store::import::apply_overlay_upper(
                    tree,
                    &unmounted.upper(),
                    staging,
                    limits,
                    unmounted.on_disk(),
                )
            }
            WorkRoot::Copy { root, known } => {
                let imported = crate::store::import::import_directory_with(
                    &root,
                    staging,
                    limits,
                    Some(&known),
                    true,
                )?;
                // The materialized tree's unwritten pages are dropped with it rather than
                // flushed by the sync that makes the new objects durable.
                fs_err::remove_dir_all(&root)?;
                Ok(imported)
            }
        }
    }
}

/// Files that record when apt ran (its and dpkg's logs, ldconfig's cache of file times):
/// with `SOURCE_DATE_EPOCH` a package step leaves them as they were in its start tree, as
/// mmdebstrap's `cleanup/reproducible` removes them from a base.
const BUILD_TIME_RECORDS: [&str; 6] = [
    "var/log/dpkg.log",
    "var/log/alternatives.log",
    "var/log/apt/history.log",
    "var/log/apt/term.log",
    "var/log/apt/eipp.log.xz",
    "var/cache/ldconfig/aux-cache",
];

/// Run apt on `start` in the sandbox, store the result as a child of `start`.
pub fn execute(
    exec: &Execution<'_>,
    origin: &ImageRecord,
    wish: &PackageWish,
    start: &ImageRecord,
    install: &BTreeSet<String>,
    remove: &BTreeSet<String>,
) -> anyhow::Result<ImageRecord> {
    let store = exec.store;
    let staging = store.staging()?;
    let result = (|| -> anyhow::Result<ImageRecord> {
        let tree = store.tree(start)?;
        let request = AptRequest {
            install: install
                .iter()
                .map(|name| match exec.pins.get(name) {
                    Some(version) => format!("{name}={version}"),
                    None => name.clone(),
                })
                .collect(),
            remove: remove.iter().cloned().collect(),
            recommends: wish.recommends,
            offline: exec.offline,
        };
        let started = super::unix_seconds_now();
        let mut upper_layer = upper_layer_for_this_machine();
        let mut attempt = 0;
        let work = loop {
            attempt += 1;
            let scratch = staging.dir().join(format!("attempt-{attempt}"));
            let work = preparing(exec, start, || {
                WorkRoot::new(exec, start, &tree, &scratch, upper_layer)
            })?;
            match run_apt(exec, &work, &scratch, &request) {
                Ok(()) => break work,
                Err(error) if work.upper_layer_full(&error) => {
                    exec.reporter.explain(
                        "apt filled the memory set aside for its changes; running it again with \
                         the changes on disk",
                    );
                    upper_layer = UpperLayer::OnDisk;
                }
                Err(error) => return Err(error),
            }
        };
        let phase = std::time::Instant::now();
        let spinner = exec.reporter.spinner("storing the package image");
        let mut import_staging = store.staging()?;
        let records_before: Vec<(&str, Option<crate::store::tree::Entry>)> = BUILD_TIME_RECORDS
            .iter()
            .map(|path| (*path, tree.get(path).cloned()))
            .collect();
        let mut imported = work.import(tree, &mut import_staging)?;
        // With `SOURCE_DATE_EPOCH`, the same inputs give the same tree digest: what apt and
        // the packages' scripts wrote carries that time instead of the moment of the build,
        // and the logs that record the moment are kept as they were.
        if let Some(epoch) = crate::store::export::source_date_epoch() {
            for (path, before) in records_before {
                match before {
                    Some(entry) => {
                        imported.tree.insert(path, entry)?;
                    }
                    None => imported.tree.remove(path),
                }
            }
            imported.tree.clamp_mtimes_since(started, epoch);
        }
        let record = store.commit_tree(
            &NewTree {
                name: exec.image_name.clone(),
                version: None,
                parent: Some(start.id),
                provenance: step_provenance(Step::Packages(PackagesStep {
                    key: wish.key(origin),
                    origin: origin.tree_digest.clone(),
                    origin_reference: Some(origin.reference()),
                    wanted: wish.wanted.clone(),
                    removed: wish.removed.clone(),
                    recommends: wish.recommends,
                    installed: install.clone(),
                    started_from: Some(start.reference()),
                })),
            },
            &imported.tree,
            import_staging,
            imported.dpkg_status.as_deref(),
        )?;
        spinner.finish_and_clear();
        exec.reporter.explain(&format!(
            "stored {} in {:.2}s",
            record.reference(),
            phase.elapsed().as_secs_f64()
        ));
        Ok(record)
    })();
    staging.discard();
    result
}

/// `prepare`, with a spinner and its time for `-v`.
fn preparing(
    exec: &Execution<'_>,
    start: &ImageRecord,
    prepare: impl FnOnce() -> anyhow::Result<WorkRoot>,
) -> anyhow::Result<WorkRoot> {
    let phase = std::time::Instant::now();
    let spinner = exec
        .reporter
        .spinner(&format!("preparing {}", start.reference()));
    let work = prepare();
    spinner.finish_and_clear();
    let work = work?;
    exec.reporter.explain(&format!(
        "prepared {} for apt in {:.2}s",
        start.reference(),
        phase.elapsed().as_secs_f64()
    ));
    Ok(work)
}

/// apt in the sandbox on `work`; failures the manifest can point at are [`PackageFailure`]s.
fn run_apt(
    exec: &Execution<'_>,
    work: &WorkRoot,
    scratch: &std::path::Path,
    request: &AptRequest,
) -> anyhow::Result<()> {
    let phase = std::time::Instant::now();
    let sandbox = work.sandbox()?;
    let cache = AptCache {
        debs: exec.store.root().join(crate::store::deb_cache::DEBS),
        lists: exec
            .store
            .root()
            .join(crate::store::download_caches::APT_LISTS),
    };
    let spinner = exec.reporter.spinner("apt");
    let outcome = apt::install(
        &sandbox,
        &cache,
        scratch,
        request,
        |what| spinner.set_message(what.to_owned()),
        |damaged| {
            spinner.suspend(|| {
                exec.reporter.warn(&format!(
                    "cached package {damaged} differs from its entry in the package lists \
                     (damaged on disk?): removed it, apt downloads it again"
                ))
            })
        },
    );
    spinner.finish_and_clear();
    match outcome {
        Ok(Ok(_log)) => {}
        Ok(Err(unknown)) => return Err(PackageFailure::Unknown(unknown).into()),
        Err(error) => {
            return Err(match error.downcast::<apt::SandboxFailure>() {
                Ok(failure) => PackageFailure::Apt(failure).into(),
                Err(other) => other,
            });
        }
    }
    sandbox.finish()?;
    exec.reporter.explain(&format!(
        "apt finished in {:.2}s",
        phase.elapsed().as_secs_f64()
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn image(id: i64, digest: &str, provenance: serde_json::Value) -> ImageRecord {
        ImageRecord {
            id,
            name: format!("img{id}"),
            version: "1".into(),
            tree_digest: digest.into(),
            legacy_tree_digest: None,
            parent: None,
            created_at: 0,
            provenance,
            entry_count: 0,
            content_bytes: 0,
            needs_repair: false,
        }
    }

    fn wish(names: &[&str]) -> PackageWish {
        PackageWish {
            wanted: names.iter().map(|s| (*s).to_owned()).collect(),
            removed: BTreeSet::new(),
            recommends: false,
        }
    }

    fn step(id: i64, origin: &ImageRecord, names: &[&str]) -> ImageRecord {
        let w = wish(names);
        image(
            id,
            &format!("d{id}"),
            json!({"step": "packages", "key": w.key(origin), "origin": origin.tree_digest,
                   "wanted": names, "removed": [], "recommends": false}),
        )
    }

    /// Golden value: the package step's key finds stored package images and is pinned in
    /// `Appliance.lock`; an accidental change reinstalls every appliance's packages.
    #[test]
    fn the_package_key_is_stable() {
        let wish = PackageWish {
            wanted: ["nginx".to_owned(), "curl".to_owned()].into(),
            removed: ["vim-tiny".to_owned()].into(),
            recommends: false,
        };
        assert_eq!(
            wish.key(&image(1, &"ab".repeat(32), json!({}))),
            "15cc588f98711bd46125fff6fbc5bfa3b01b149d95fdbb4b6f322a66a6878a6a"
        );
    }

    #[test]
    fn the_largest_stored_subset_is_the_start() {
        let base = image(1, "base", json!({}));
        let other_base = image(5, "other", json!({}));
        let images = vec![
            base.clone(),
            step(2, &base, &["nginx"]),
            step(3, &base, &["curl", "nginx"]),
            step(4, &base, &["nginx", "vim"]),
            // A bigger subset, but of another lineage.
            step(6, &other_base, &["curl", "git", "nginx"]),
        ];
        match plan(&images, &base, &wish(&["nginx", "curl", "git"]), None) {
            Plan::Install { start, install, .. } => {
                assert_eq!(start.id, 3);
                assert_eq!(install.into_iter().collect::<Vec<_>>(), ["git"]);
            }
            Plan::Stored(found) => panic!("nothing stored has this key, got {found:?}"),
        }
        match plan(&images, &base, &wish(&["curl", "nginx"]), None) {
            Plan::Stored(found) => assert_eq!(found.id, 3),
            other => panic!("expected the stored image, got {other:?}"),
        }
        match plan(&images, &base, &wish(&["git"]), None) {
            Plan::Install { start, install, .. } => {
                assert_eq!(start.id, 1);
                assert_eq!(install.len(), 1);
            }
            other => panic!("expected a fresh install, got {other:?}"),
        }
    }
}
