//! `cargo appliance build`: the step graph base → packages → files, binaries and
//! configuration → outputs. Each step's key hashes its inputs; a stored image with the key is
//! reused, so a no-op build only checks. Only the package step (and `run` scripts) need a
//! materialized tree; files and configuration are edits of the stored tree.

pub mod accounts;
pub mod cargo;
pub mod edit;
pub mod files;
pub mod lockfile;
pub mod packages_step;
pub mod plan;
pub mod progress;
pub mod systemd;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::json;
use sha2::{Digest as _, Sha256};

use crate::check::CheckReport;
use crate::diagnostics::{Diagnostic, SourceFile, Span};
use crate::manifest::Manifest;
use crate::manifest::model::{Appliance, BaseRef, Spanned};
use crate::store::tree::hex;
use crate::store::{ImageRecord, NewTree, Store};

use edit::TreeEditor;
use files::{CopyKind, Fingerprints};
use lockfile::{LockFile, LockedAppliance, LockedImage, LockedPackages};
use packages_step::{PackageFailure, PackageWish, Plan};
use progress::Reporter;

#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// Fail instead of changing `Appliance.lock`.
    pub locked: bool,
    /// Use only what the store and Cargo have cached.
    pub offline: bool,
    /// `HOST[:PORT]/PREFIX` for bases without `registry=` (`APPLIANCE_REGISTRY`).
    pub registry: Option<String>,
}

/// One appliance built (or found up to date).
#[derive(Debug, Clone)]
pub struct Built {
    pub appliance: String,
    pub image: ImageRecord,
    /// Nothing had to be done: every step's key was stored.
    pub fresh: bool,
    pub outputs: Vec<PathBuf>,
    pub elapsed: Duration,
    /// Of `elapsed`, the time spent writing outputs.
    pub outputs_elapsed: Duration,
}

/// A failed build: diagnostics that point into the manifests, or another error.
#[derive(Debug)]
pub enum BuildError {
    Diagnostics(Vec<Diagnostic>),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for BuildError {
    fn from(error: anyhow::Error) -> Self {
        BuildError::Other(error)
    }
}

impl From<std::io::Error> for BuildError {
    fn from(error: std::io::Error) -> Self {
        BuildError::Other(error.into())
    }
}

impl From<Diagnostic> for BuildError {
    fn from(diagnostic: Diagnostic) -> Self {
        BuildError::Diagnostics(vec![diagnostic])
    }
}

/// Where an appliance came from, for diagnostics.
struct Site<'a> {
    manifest: &'a Manifest,
    appliance: &'a Appliance,
}

impl Site<'_> {
    fn file(&self) -> &Arc<SourceFile> {
        &self.manifest.source
    }

    fn error(&self, code: &'static str, message: impl Into<String>, span: Span) -> Diagnostic {
        Diagnostic::error(code, message)
            .at(self.file(), span)
            .for_appliance(&self.appliance.name.value)
    }
}

/// Build the checked appliances of `report` (which must be free of errors), bases first.
/// The plan of `build` with these options: what each step would do and why, with nothing
/// done (no pull, no apt, no cargo, no output written, the lock untouched).
pub fn plan(
    report: &CheckReport,
    store: &Store,
    options: &BuildOptions,
    reporter: &Reporter,
) -> Result<plan::BuildPlan, BuildError> {
    let sites = sites_of(report);
    let order = build_order(report, &sites);
    let lock = LockFile::read(&lockfile::path(&report.workspace.root))?.unwrap_or_default();
    let mut context = Context::new(report, store, options, reporter)?;
    context.plan(&order, &sites, &lock)
}

fn sites_of(report: &CheckReport) -> BTreeMap<&str, Site<'_>> {
    report
        .manifests
        .iter()
        .flat_map(|manifest| {
            manifest.appliances.iter().map(move |appliance| {
                (
                    appliance.name.value.as_str(),
                    Site {
                        manifest,
                        appliance,
                    },
                )
            })
        })
        .collect()
}

pub fn build(
    report: &CheckReport,
    store: &Store,
    options: &BuildOptions,
    reporter: &Reporter,
) -> Result<Vec<Built>, BuildError> {
    let workspace = &report.workspace;
    let sites = sites_of(report);
    let order = build_order(report, &sites);
    // Before any work: a missing program should not cost the minutes apt and cargo take.
    let missing: Vec<Diagnostic> = order
        .iter()
        .filter_map(|name| sites.get(name.as_str()))
        .flat_map(missing_host_programs)
        .collect();
    if !missing.is_empty() {
        return Err(BuildError::Diagnostics(missing));
    }
    let lock_path = lockfile::path(&workspace.root);
    let old_lock = LockFile::read(&lock_path)?;
    if options.locked && old_lock.is_none() {
        return Err(anyhow::anyhow!(
            "--locked: {} does not exist; build once without --locked to create it",
            lock_path.display()
        )
        .into());
    }
    let old_lock = old_lock.unwrap_or_default();
    let mut new_lock = old_lock.clone();
    // A build holds off gc from its first staged object to its last catalog row.
    let _lease = store.gc_lease()?;
    let mut context = Context::new(report, store, options, reporter)?;
    // --locked: every appliance whose base is a stored image is checked before any work, so
    // a stale entry of the second appliance fails the build before the first is built.
    if options.locked {
        for name in &order {
            if let Some(site) = sites.get(name.as_str()) {
                let locked = old_lock.appliances.get(name).cloned().unwrap_or_default();
                context.check_locked(site, &locked)?;
            }
        }
    }
    if options.locked || reporter.is_verbose() {
        let plan = context.plan(&order, &sites, &old_lock)?;
        // An appliance on an appliance: its package step's key follows its base appliance's
        // image. Known from the plan (the base is reused), it must be the locked key; when
        // the base is surely rebuilt, the locked key cannot hold. Either fails before work.
        if options.locked {
            for planned in &plan.appliances {
                let on_appliance = sites.get(planned.appliance.as_str()).is_some_and(|site| {
                    matches!(
                        site.appliance.base.as_ref().map(|b| &b.value),
                        Some(BaseRef::Appliance { .. })
                    )
                });
                let Some(packages) = planned.steps.iter().find(|s| s.step == "packages") else {
                    continue;
                };
                let locked_key = old_lock
                    .appliances
                    .get(&planned.appliance)
                    .and_then(|entry| entry.packages.as_ref())
                    .map(|p| p.key.as_str());
                let stale = match &packages.key {
                    Some(key) => locked_key != Some(key.as_str()),
                    None => packages.run && packages.certain,
                };
                if on_appliance && stale {
                    return Err(anyhow::anyhow!(
                        "--locked: Appliance.lock needs to be updated for `{}` (its package step starts from its base appliance's image, which {}), but --locked forbids changing it",
                        planned.appliance,
                        if packages.key.is_some() {
                            "is not the one it pins"
                        } else {
                            "is rebuilt first"
                        }
                    )
                    .into());
                }
            }
        }
        // -v: why each step that runs does, before it runs (as Cargo's "Dirty" lines).
        for appliance in &plan.appliances {
            for step in appliance.steps.iter().filter(|s| s.run) {
                let label = match &step.format {
                    Some(format) => format!("output {format}"),
                    None => step.step.to_owned(),
                };
                reporter.explain(&format!(
                    "{}: {label} runs: {}{}",
                    appliance.appliance,
                    step.why,
                    if step.certain {
                        ""
                    } else {
                        " (it may find nothing new)"
                    }
                ));
            }
        }
    }
    let mut built: BTreeMap<String, Built> = BTreeMap::new();
    let mut results = Vec::new();
    for name in order {
        let Some(site) = sites.get(name.as_str()) else {
            continue;
        };
        crate::process::interrupt::check().map_err(anyhow::Error::from)?;
        let locked = old_lock.appliances.get(&name).cloned().unwrap_or_default();
        let (done, lock_entry) = context.build_one(site, &built, &locked)?;
        new_lock.appliances.insert(name.clone(), lock_entry);
        built.insert(name, done.clone());
        results.push(done);
    }
    context.fingerprints.save(workspace)?;
    context.artifacts.save(workspace)?;
    if new_lock != old_lock {
        if options.locked {
            return Err(anyhow::anyhow!(
                "--locked: {} needs to be updated ({}), but --locked forbids changing it",
                lock_path.display(),
                describe_lock_change(&old_lock, &new_lock)
            )
            .into());
        }
        new_lock.write(&lock_path)?;
    }
    Ok(results)
}

fn describe_lock_change(old: &LockFile, new: &LockFile) -> String {
    let changed: Vec<&str> = new
        .appliances
        .iter()
        .filter(|(name, entry)| old.appliances.get(*name) != Some(entry))
        .map(|(name, _)| name.as_str())
        .collect();
    format!("changed for {}", changed.join(", "))
}

/// Each user's `~/.ssh/authorized_keys`: its `ssh-key` children, then the lines of its
/// `authorized-keys=` file, each checked (the file may have changed since `check`).
fn authorized_keys(
    site: &Site<'_>,
    manifest_dir: &Path,
) -> Result<BTreeMap<String, String>, BuildError> {
    let mut all = BTreeMap::new();
    for user in &site.appliance.users {
        let mut lines: Vec<String> = user.ssh_keys.iter().map(|k| k.value.clone()).collect();
        if let Some(path) = &user.authorized_keys {
            let read = crate::workspace::read_authorized_keys(&manifest_dir.join(&path.value));
            match read {
                Ok(keys) => lines.extend(keys),
                Err(crate::workspace::AuthorizedKeysError::Unreadable(message)) => {
                    return Err(site
                        .error(
                            "appliance::unreadable-source",
                            format!("authorized keys `{}`: {message}", path.value),
                            path.span,
                        )
                        .into());
                }
                Err(crate::workspace::AuthorizedKeysError::Invalid { line, message }) => {
                    return Err(site
                        .error(
                            "appliance::invalid-ssh-key",
                            format!("line {line} of `{}` {message}", path.value),
                            path.span,
                        )
                        .into());
                }
            }
        }
        if !lines.is_empty() {
            let mut text = lines.join("\n");
            text.push('\n');
            all.insert(user.name.value.clone(), text);
        }
    }
    Ok(all)
}

/// What the package step is asked for: the manifest's packages, and the boot packages of a
/// disk output.
fn package_wish(appliance: &crate::manifest::model::Appliance) -> PackageWish {
    let mut wish = PackageWish {
        wanted: appliance
            .packages
            .iter()
            .map(|p| p.name.value.clone())
            .collect(),
        removed: appliance.remove.iter().map(|p| p.value.clone()).collect(),
        recommends: appliance.packages.iter().any(|p| p.recommends),
    };
    if is_bootable(appliance) {
        wish.wanted.extend(crate::output::disk::boot_packages(
            appliance.kernel.as_ref().map(|k| k.value.as_str()),
        ));
    }
    wish
}

/// `--locked`: the error when `name`'s resolution (`base_entry`, the package step's key on
/// `base`) is not what `locked` pins, as Cargo fails when resolution would change its lock.
fn locked_violation(
    name: &str,
    base_entry: Option<&LockedImage>,
    wish: &PackageWish,
    base: &ImageRecord,
    locked: &LockedAppliance,
) -> Result<(), BuildError> {
    let base_changed = base_entry.is_some() && base_entry != locked.base.as_ref();
    let packages_changed = !wish.is_empty()
        && locked.packages.as_ref().map(|p| p.key.as_str()) != Some(wish.key(base).as_str());
    if base_changed || packages_changed {
        let older_format = locked
            .base
            .as_ref()
            .is_some_and(|pin| base.legacy_tree_digest.as_deref() == Some(pin.digest.as_str()));
        return Err(anyhow::anyhow!(
            "--locked: Appliance.lock needs to be updated for `{name}` ({}), but --locked forbids changing it",
            if older_format {
                "it pins its base by the earlier tree-digest format; run `cargo appliance build` once without --locked to rewrite it"
            } else if base_changed {
                "its base resolves to another image"
            } else {
                "its package set changed"
            }
        )
        .into());
    }
    Ok(())
}

/// What a base resolves to before anything is pulled.
enum BaseChoice<'a> {
    Stored(ImageRecord),
    Pull {
        prefix: String,
        span: Span,
        source: BaseSource<'a>,
    },
    /// Boxed: a diagnostic is large, and it is the rare case.
    Missing(Box<Diagnostic>),
}

/// Where a base missing from the store comes from.
enum BaseSource<'a> {
    /// The manifest `Appliance.lock` pinned.
    Pinned { reference: String, version: String },
    /// The newest tag matching the requirement.
    Newest(Option<&'a crate::manifest::version::VersionReq>),
}

/// A `run` script as the build runs it: where it is declared, its text, its limit.
struct Script {
    span: Span,
    text: String,
    timeout: Duration,
}

/// The diagnostic for a script that failed or ran out of time.
fn script_failure(site: &Site<'_>, script: &Script, error: anyhow::Error) -> BuildError {
    let error = match error.downcast::<crate::packages::apt::SandboxTimeout>() {
        Ok(timeout) => {
            let tail = timeout.tail(25);
            return site
                .error(
                    "appliance::run-timeout",
                    format!(
                        "the script ran longer than its limit of {} and was killed",
                        human_duration(timeout.limit)
                    ),
                    script.span,
                )
                .label("this script")
                .help(if tail.is_empty() {
                    "raise the limit with `timeout=` (e.g. `timeout=\"1h\"`) if it needs longer; it printed nothing".to_owned()
                } else {
                    format!("raise the limit with `timeout=` (e.g. `timeout=\"1h\"`) if it needs longer; its output ends with:\n{tail}")
                })
                .into();
        }
        Err(error) => error,
    };
    match error.downcast::<crate::packages::apt::SandboxFailure>() {
        Ok(failure) => site
            .error(
                "appliance::run-failed",
                format!("the script failed inside the image ({})", failure.status),
                script.span,
            )
            .label("this script")
            .help(format!("its output ends with:\n{}", failure.tail(25)))
            .into(),
        Err(other) => BuildError::Other(other),
    }
}

/// `5s`, `10m`, `1h30m` for a limit.
fn human_duration(duration: Duration) -> String {
    let seconds = duration.as_secs();
    match (seconds / 3600, seconds % 3600 / 60, seconds % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, 0) => format!("{m}m"),
        (0, m, s) => format!("{m}m{s}s"),
        (h, 0, 0) => format!("{h}h"),
        (h, m, _) => format!("{h}h{m}m"),
    }
}

/// An error on the node that needs it for each program the appliance's build would run and
/// this host lacks: `packages`/`run` need the sandbox, disk outputs their filesystem tools,
/// `qcow2` qemu-img.
fn missing_host_programs(site: &Site<'_>) -> Vec<Diagnostic> {
    use crate::process::host::{Need, describe_missing};
    let appliance = site.appliance;
    let mut needs: Vec<(Need, Span, &str)> = Vec::new();
    if let Some(package) = appliance.packages.first() {
        needs.push((Need::Sandbox, package.name.span, "installing packages"));
    } else if let Some(run) = appliance.runs.first() {
        needs.push((Need::Sandbox, run.span, "`run` scripts"));
    }
    for output in &appliance.outputs {
        let Some(format) = crate::output::Format::parse(&output.format.value) else {
            continue;
        };
        if format.is_bootable() {
            if appliance.packages.is_empty() && appliance.runs.is_empty() {
                // The boot packages are installed by the sandbox too.
                needs.push((
                    Need::Sandbox,
                    output.format.span,
                    "installing the boot packages",
                ));
            }
            needs.push((Need::Disk, output.format.span, "disk outputs"));
        }
        if output.format.value == "qcow2" {
            needs.push((Need::Qcow2, output.format.span, "the qcow2 output"));
        }
    }
    let mut seen = Vec::new();
    needs
        .into_iter()
        .filter(|(need, _, _)| {
            let new = !seen.contains(need);
            seen.push(*need);
            new
        })
        .filter_map(|(need, span, purpose)| {
            let missing = describe_missing(need)?;
            Some(
                site.error(
                    "appliance::missing-host-program",
                    format!("{purpose} needs {missing}, which is not on PATH"),
                    span,
                )
                .help(
                    "install it (`.ci/install-deps` installs everything cargo-appliance uses), \
                     then build again; nothing was built or stored",
                ),
            )
        })
        .collect()
}

/// The checked appliances, each after the appliance it derives from.
fn build_order(report: &CheckReport, sites: &BTreeMap<&str, Site<'_>>) -> Vec<String> {
    let mut order = Vec::new();
    fn visit(name: &str, sites: &BTreeMap<&str, Site<'_>>, order: &mut Vec<String>, depth: usize) {
        if order.iter().any(|n| n == name) || depth > sites.len() {
            return;
        }
        if let Some(site) = sites.get(name)
            && let Some(base) = &site.appliance.base
            && let BaseRef::Appliance { name: parent } = &base.value
        {
            visit(&parent.value, sites, order, depth + 1);
        }
        order.push(name.to_owned());
    }
    for (_, appliance) in report.appliances() {
        visit(&appliance.name.value, sites, &mut order, 0);
    }
    order
}

struct Context<'a> {
    store: &'a Store,
    reporter: &'a Reporter,
    options: &'a BuildOptions,
    workspace: &'a crate::workspace::Workspace,
    fingerprints: Fingerprints,
    artifacts: cargo::ArtifactCache,
    workspace_stamp: Option<String>,
    images: Vec<ImageRecord>,
    epoch: i64,
}

impl<'a> Context<'a> {
    fn new(
        report: &'a CheckReport,
        store: &'a Store,
        options: &'a BuildOptions,
        reporter: &'a Reporter,
    ) -> anyhow::Result<Self> {
        let workspace = &report.workspace;
        Ok(Context {
            store,
            reporter,
            options,
            workspace,
            fingerprints: Fingerprints::load(workspace),
            artifacts: cargo::ArtifactCache::load(workspace),
            workspace_stamp: None,
            // One read of the catalog per build; images this build stores are added as it goes.
            images: store.list_cached(&workspace.target_dir.join("appliance/.images.json"))?,
            epoch: crate::store::export::source_date_epoch().unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() as i64)
            }),
        })
    }

    fn build_one(
        &mut self,
        site: &Site<'_>,
        built: &BTreeMap<String, Built>,
        locked: &LockedAppliance,
    ) -> Result<(Built, LockedAppliance), BuildError> {
        let started = Instant::now();
        let appliance = site.appliance;
        let name = &appliance.name.value;
        let mut lock_entry = LockedAppliance::default();
        let mut fresh = true;

        // Base.
        let base_node = appliance
            .base
            .as_ref()
            .context("the appliance has no base (check should have said so)")?;
        let base = match &base_node.value {
            BaseRef::Image {
                name: image_name,
                version,
                registry,
            } => {
                let registry = registry
                    .as_ref()
                    .map(|r| (r.value.clone(), r.span))
                    .or_else(|| self.options.registry.clone().map(|r| (r, base_node.span)));
                let image = self.resolve_base(
                    site,
                    base_node.span,
                    image_name,
                    version.as_ref(),
                    registry.as_ref().map(|(r, span)| (r.as_str(), *span)),
                    locked,
                )?;
                lock_entry.base = Some(LockedImage {
                    name: image.name.clone(),
                    version: image.version.clone(),
                    digest: image.tree_digest.clone(),
                    pulled: crate::registry::pulled_from(&image),
                });
                image
            }
            BaseRef::Appliance { name: parent } => built
                .get(&parent.value)
                .map(|b| b.image.clone())
                .with_context(|| format!("appliance `{}` was not built first", parent.value))?,
        };
        self.reporter.explain(&format!(
            "{name}: base {} ({})",
            base.reference(),
            crate::store::short(&base.tree_digest)
        ));

        // Packages.
        let wish = package_wish(appliance);
        if self.options.locked {
            locked_violation(name, lock_entry.base.as_ref(), &wish, &base, locked)?;
        }
        let packages_image = if wish.is_empty() {
            base.clone()
        } else {
            let (image, did_work) = self.package_step(site, &base, &wish, locked)?;
            fresh &= !did_work;
            // Stored images carry their package versions in the provenance: no catalog query.
            let installed: BTreeMap<String, String> =
                crate::store::provenance::common(&image.provenance)
                    .packages
                    .into_iter()
                    .filter(|(name, _)| wish.wanted.contains(name))
                    .collect();
            lock_entry.packages = Some(LockedPackages {
                key: wish.key(&base),
                digest: image.tree_digest.clone(),
                versions: installed,
            });
            image
        };

        // Files, binaries, configuration, run scripts.
        let (image, did_work) = self.appliance_step(site, &packages_image)?;
        fresh &= !did_work;

        // Outputs.
        let outputs_started = Instant::now();
        let outputs = self.write_outputs(site, &image)?;
        let done = Built {
            appliance: name.clone(),
            image,
            fresh,
            outputs,
            elapsed: started.elapsed(),
            outputs_elapsed: outputs_started.elapsed(),
        };
        Ok((done, lock_entry))
    }

    fn resolve_base(
        &mut self,
        site: &Site<'_>,
        span: Span,
        image_name: &str,
        requirement: Option<&crate::manifest::version::VersionReq>,
        registry: Option<(&str, Span)>,
        locked: &LockedAppliance,
    ) -> Result<ImageRecord, BuildError> {
        match self.find_base(site, span, image_name, requirement, registry, locked) {
            BaseChoice::Stored(image) => Ok(image),
            BaseChoice::Pull {
                prefix,
                span,
                source,
            } => self.pull_base(site, span, image_name, &prefix, source),
            BaseChoice::Missing(diagnostic) => Err((*diagnostic).into()),
        }
    }

    /// Where a base comes from, without pulling: the stored image the lock pins, else the
    /// newest stored match, else the registry's (the lock's pulled image, or the newest tag).
    fn find_base<'r>(
        &self,
        site: &Site<'_>,
        span: Span,
        image_name: &str,
        requirement: Option<&'r crate::manifest::version::VersionReq>,
        registry: Option<(&str, Span)>,
        locked: &LockedAppliance,
    ) -> BaseChoice<'r> {
        let images = &self.images;
        let matches = |image: &ImageRecord| {
            image.name == image_name
                && !image.needs_repair
                && requirement.is_none_or(|req| {
                    crate::manifest::version::Version::parse(&image.version)
                        .is_ok_and(|v| req.matches(&v))
                })
        };
        if let Some(pin) = &locked.base
            && pin.name == image_name
            && let Some(image) = images
                .iter()
                .filter(|i| matches(i))
                .find(|i| i.has_tree(&pin.digest) && i.version == pin.version)
        {
            return BaseChoice::Stored(image.clone());
        }
        // Pinned to an image pulled from the registry the manifest still names: that image
        // exactly, not whatever the store or the registry has now.
        if let (Some(pin), Some((prefix, registry_span))) = (&locked.base, registry)
            && pin.name == image_name
            && let Some(pulled) = &pin.pulled
        {
            return BaseChoice::Pull {
                prefix: prefix.to_owned(),
                span: registry_span,
                source: BaseSource::Pinned {
                    reference: pulled.clone(),
                    version: pin.version.clone(),
                },
            };
        }
        let newest = images.iter().filter(|i| matches(i)).max_by(|a, b| {
            crate::store::version_key(&a.version)
                .cmp(&crate::store::version_key(&b.version))
                .then(a.id.cmp(&b.id))
        });
        match (newest, registry) {
            (Some(image), _) => BaseChoice::Stored(image.clone()),
            (None, Some((prefix, registry_span))) => BaseChoice::Pull {
                prefix: prefix.to_owned(),
                span: registry_span,
                source: BaseSource::Newest(requirement),
            },
            (None, None) => {
                let other_versions: Vec<String> = images
                    .iter()
                    .filter(|i| i.name == image_name)
                    .map(ImageRecord::reference)
                    .collect();
                let suite = image_name.rsplit('/').next().unwrap_or(image_name);
                let help = if other_versions.is_empty() {
                    format!(
                        "create it: `cargo appliance base create {image_name} --suite {suite}`, or import one with `cargo appliance image import {image_name} PATH`"
                    )
                } else {
                    format!(
                        "the store has {}, none matching the version requirement",
                        other_versions.join(", ")
                    )
                };
                BaseChoice::Missing(Box::new(
                    site.error(
                        "appliance::base-not-found",
                        format!(
                            "no image `{image_name}` in the store {}",
                            self.store.root().display()
                        ),
                        span,
                    )
                    .label("not in the store")
                    .help(help),
                ))
            }
        }
    }

    /// `--locked` for one appliance on a stored image, before any work.
    fn check_locked(
        &mut self,
        site: &Site<'_>,
        locked: &LockedAppliance,
    ) -> Result<(), BuildError> {
        let appliance = site.appliance;
        let Some(base_node) = &appliance.base else {
            return Ok(());
        };
        let BaseRef::Image {
            name: image_name,
            version,
            registry,
        } = &base_node.value
        else {
            return Ok(());
        };
        let registry = registry
            .as_ref()
            .map(|r| (r.value.clone(), r.span))
            .or_else(|| self.options.registry.clone().map(|r| (r, base_node.span)));
        let base = self.resolve_base(
            site,
            base_node.span,
            image_name,
            version.as_ref(),
            registry.as_ref().map(|(r, span)| (r.as_str(), *span)),
            locked,
        )?;
        let entry = LockedImage {
            name: base.name.clone(),
            version: base.version.clone(),
            digest: base.tree_digest.clone(),
            pulled: crate::registry::pulled_from(&base),
        };
        locked_violation(
            &appliance.name.value,
            Some(&entry),
            &package_wish(appliance),
            &base,
            locked,
        )
    }

    /// Pull a base the store lacks from `prefix`/`image_name`: the pinned manifest, or the
    /// newest tag that is a version matching the requirement.
    fn pull_base(
        &mut self,
        site: &Site<'_>,
        span: Span,
        image_name: &str,
        prefix: &str,
        source: BaseSource<'_>,
    ) -> Result<ImageRecord, BuildError> {
        use crate::registry::Reference;
        let repository = Reference::parse(&format!("{prefix}/{image_name}"))
            .map_err(|e| anyhow::anyhow!("the base's registry: {e}"))?;
        if self.options.offline {
            return Err(site
                .error(
                    "appliance::base-offline",
                    format!(
                        "no image `{image_name}` in the store, and --offline forbids pulling it from {}",
                        repository
                    ),
                    span,
                )
                .label("the registry it would come from")
                .help("build once without --offline, or `cargo appliance pull` it first")
                .into());
        }
        let access = crate::registry::Access::default();
        let (reference, version) = match source {
            BaseSource::Pinned { reference, version } => (
                Reference::parse(&reference)
                    .map_err(|e| anyhow::anyhow!("Appliance.lock's pulled base: {e}"))?,
                version,
            ),
            BaseSource::Newest(requirement) => {
                let tags = crate::registry::list_tags(&repository, &access)?;
                let newest = tags
                    .iter()
                    .filter_map(|tag| {
                        let version = crate::manifest::version::Version::parse(tag).ok()?;
                        requirement
                            .is_none_or(|req| req.matches(&version))
                            .then_some(tag)
                    })
                    .max_by(|a, b| crate::store::version_key(a).cmp(&crate::store::version_key(b)));
                let Some(tag) = newest else {
                    let shown: Vec<&str> = tags.iter().take(10).map(String::as_str).collect();
                    return Err(site
                        .error(
                            "appliance::base-not-in-registry",
                            format!(
                                "no image `{image_name}` in the store, and no tag of {repository} is a version{}",
                                if requirement.is_some() { " matching the requirement" } else { "" }
                            ),
                            span,
                        )
                        .label("looked here")
                        .help(if shown.is_empty() {
                            format!("push one: `cargo appliance push {image_name} {repository}`")
                        } else {
                            format!("its tags: {}", shown.join(", "))
                        })
                        .into());
                };
                let mut reference = repository.clone();
                reference.tag = Some(tag.clone());
                (reference, tag.clone())
            }
        };
        self.reporter.status(
            "Pulling",
            &format!("{image_name}@{version} from {reference}"),
        );
        let pulled = crate::registry::pull(
            self.store,
            &reference,
            Some(&format!("{image_name}@{version}")),
            &access,
            false,
        )
        .with_context(|| format!("pulling the base {image_name} from {reference}"))?;
        self.images = self.store.list()?;
        Ok(self
            .images
            .iter()
            .find(|i| i.reference() == pulled.image)
            .cloned()
            .with_context(|| format!("{} was pulled but is not listed", pulled.image))?)
    }

    fn package_step(
        &mut self,
        site: &Site<'_>,
        origin: &ImageRecord,
        wish: &PackageWish,
        locked: &LockedAppliance,
    ) -> Result<(ImageRecord, bool), BuildError> {
        let appliance = site.appliance;
        let pinned = locked.packages.as_ref();
        let plan = packages_step::plan(
            &self.images,
            origin,
            wish,
            pinned.map(|p| p.digest.as_str()),
        );
        let (start, install, remove, reason) = match plan {
            Plan::Stored(image) => {
                self.reporter.explain(&format!(
                    "{}: packages stored as {} (same start image and package set)",
                    appliance.name.value,
                    image.reference()
                ));
                return Ok((image, false));
            }
            Plan::Install {
                start,
                install,
                remove,
                reason,
            } => (start, install, remove, reason),
        };
        self.reporter.explain(&format!(
            "{}: starting the package step from {}: {reason}",
            appliance.name.value,
            start.reference()
        ));
        let mut what: Vec<String> = install.iter().cloned().collect();
        what.extend(remove.iter().map(|r| format!("-{r}")));
        self.reporter.status(
            "Installing",
            &format!("{} on {}", what.join(", "), start.reference()),
        );
        let no_pins = BTreeMap::new();
        let exec = packages_step::Execution {
            store: self.store,
            reporter: self.reporter,
            offline: self.options.offline,
            image_name: format!("{}/packages", appliance.name.value),
            pins: pinned.map_or(&no_pins, |p| &p.versions),
        };
        match packages_step::execute(&exec, origin, wish, &start, &install, &remove) {
            Ok(image) => {
                self.images.push(image.clone());
                Ok((image, true))
            }
            Err(error) => Err(self.package_error(site, error)),
        }
    }

    /// An apt failure as a diagnostic on the manifest node that asked for the package.
    fn package_error(&self, site: &Site<'_>, error: anyhow::Error) -> BuildError {
        let appliance = site.appliance;
        let span_of = |package: &str| {
            appliance
                .packages
                .iter()
                .map(|p| &p.name)
                .chain(appliance.remove.iter())
                .find(|p| p.value == package)
                .map(|p| p.span)
        };
        let first_span = appliance
            .packages
            .first()
            .map(|p| p.name.span)
            .or_else(|| appliance.remove.first().map(|r| r.span))
            .unwrap_or(appliance.name.span);
        match error.downcast::<PackageFailure>() {
            Ok(PackageFailure::Unknown(unknown)) => BuildError::Diagnostics(
                unknown
                    .iter()
                    .map(|package| {
                        site.error(
                            "appliance::unknown-package",
                            format!(
                                "package `{}` is not in the apt indexes of the image",
                                package.name
                            ),
                            span_of(&package.name).unwrap_or(first_span),
                        )
                        .label("unknown package")
                        .maybe_help(
                            package
                                .did_you_mean
                                .as_ref()
                                .map(|close| format!("did you mean `{close}`?")),
                        )
                    })
                    .collect(),
            ),
            Ok(PackageFailure::Apt(failure)) => site
                .error(
                    "appliance::apt-failed",
                    format!("apt failed: {failure}"),
                    first_span,
                )
                .label("while installing these packages")
                .help(format!("apt's output ends with:\n{}", failure.tail(25)))
                .into(),
            Err(other) => BuildError::Other(other.context("the package step failed")),
        }
    }

    /// The files, binaries and configuration step; `run` scripts after it.
    fn appliance_step(
        &mut self,
        site: &Site<'_>,
        parent: &ImageRecord,
    ) -> Result<(ImageRecord, bool), BuildError> {
        let appliance = site.appliance;
        let manifest_dir = site
            .manifest
            .path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let copies = files::collect(
            self.workspace,
            &manifest_dir,
            &appliance.copies,
            &mut self.fingerprints,
        )
        .map_err(|e| {
            BuildError::Other(e.context(format!(
                "collecting the files of `{}`",
                appliance.name.value
            )))
        })?;
        let binaries = self.build_binaries(site)?;
        let scripts = self.run_scripts(site, &manifest_dir)?;
        let keys = authorized_keys(site, &manifest_dir)?;
        let key = appliance_key(appliance, parent, &copies, &binaries, &scripts, &keys);
        if let Some(found) = self
            .images
            .iter()
            .filter(|i| !i.needs_repair && i.parent == Some(parent.id))
            .filter(|i| {
                matches!(i.step(), Some(crate::store::provenance::Step::Appliance(step)) if step.key == key)
            })
            .max_by_key(|i| i.id)
        {
            return Ok((found.clone(), false));
        }
        self.reporter.status(
            "Building",
            &format!("{} on {}", appliance.name.value, parent.reference()),
        );
        let tree = self.store.tree(parent)?;
        let mut editor = TreeEditor::new(
            tree,
            self.store.staging()?,
            self.store.objects(),
            self.epoch,
        );
        let applied = apply(&mut editor, site, &copies, &binaries, &keys);
        let editor = match applied {
            Ok(()) => editor,
            Err(error) => {
                editor.staging.discard();
                return Err(error);
            }
        };
        // The key's parts, so the next plan can say which one changed.
        let inputs = plan::appliance_inputs(
            appliance,
            parent,
            &copies,
            &binaries,
            &scripts,
            &keys,
            &self.workspace.root,
        );
        let provenance = packages_step::step_provenance(crate::store::provenance::Step::Appliance(
            crate::store::provenance::ApplianceStep {
                key,
                appliance: appliance.name.value.clone(),
                manifest: Some(self.workspace.display_path(&site.manifest.path)),
                inputs: serde_json::to_value(&inputs).ok(),
            },
        ));
        let new = NewTree {
            name: appliance.name.value.clone(),
            version: None,
            parent: Some(parent.id),
            provenance,
        };
        let record = if scripts.is_empty() {
            self.store
                .commit_tree(&new, &editor.tree, editor.staging, None)?
        } else {
            self.run_and_store(site, editor, &scripts, &new)?
        };
        self.images.push(record.clone());
        Ok((record, true))
    }

    fn build_binaries(
        &mut self,
        site: &Site<'_>,
    ) -> Result<Vec<(String, u32, cargo::Artifact)>, BuildError> {
        let appliance = site.appliance;
        let mut out = Vec::new();
        for binary in &appliance.binaries {
            let spec = self.binary_spec(binary)?;
            let stamp = self.workspace_stamp();
            let spinner = self
                .reporter
                .spinner(&format!("cargo build --bin {}", spec.bin));
            let result = cargo::build_binary(
                self.workspace,
                &mut self.artifacts,
                &stamp,
                &spec,
                self.options.offline,
            );
            spinner.finish_and_clear();
            match result {
                Ok((artifact, reused)) => {
                    if !reused {
                        self.reporter
                            .status("Compiled", &format!("{} ({})", spec.bin, spec.package));
                    }
                    out.push((binary.to.clone(), binary.mode, artifact));
                }
                Err(error) => {
                    return Err(match error.downcast::<cargo::CargoFailure>() {
                        Ok(failure) => site
                            .error(
                                "appliance::cargo-failed",
                                format!("cargo could not build `{}`", failure.bin),
                                binary.span,
                            )
                            .label("this binary")
                            .help(format!("cargo's output:\n{}", tail(&failure.output, 30)))
                            .into(),
                        Err(other) => BuildError::Other(other),
                    });
                }
            }
        }
        Ok(out)
    }

    fn binary_spec(
        &self,
        binary: &crate::manifest::model::Binary,
    ) -> Result<cargo::BinarySpec, BuildError> {
        let package = match &binary.package {
            Some(package) => package.value.clone(),
            None => self
                .workspace
                .packages
                .iter()
                .find(|p| p.bins.contains(&binary.name.value))
                .map(|p| p.name.clone())
                .context("binary without a package (check should have said so)")?,
        };
        Ok(cargo::BinarySpec {
            package,
            bin: binary.name.value.clone(),
            target: binary.target.clone(),
            profile: binary.profile.clone(),
        })
    }

    /// The workspace's source stamp, computed once per build.
    fn workspace_stamp(&mut self) -> String {
        self.workspace_stamp
            .get_or_insert_with(|| cargo::workspace_stamp(self.workspace))
            .clone()
    }

    fn run_scripts(&self, site: &Site<'_>, manifest_dir: &Path) -> Result<Vec<Script>, BuildError> {
        let mut scripts = Vec::new();
        for run in &site.appliance.runs {
            let text = match &run.source {
                crate::manifest::model::RunSource::Inline { script } => script.clone(),
                crate::manifest::model::RunSource::File { path } => {
                    fs_err::read_to_string(manifest_dir.join(&path.value)).map_err(|e| {
                        BuildError::from(site.error(
                            "appliance::unreadable-source",
                            format!("cannot read script: {e}"),
                            path.span,
                        ))
                    })?
                }
            };
            scripts.push(Script {
                span: run.span,
                text,
                timeout: run.timeout,
            });
        }
        Ok(scripts)
    }

    /// Materialize the edited tree, run the scripts in the sandbox, store the result. The
    /// scripts write to an overlay whose upper layer is a tmpfs of bounded size (as apt's
    /// changes are): a script that fills it fails on its `run` node, and the store's disk
    /// never fills. Where overlayfs cannot be used, they run on the copy itself.
    fn run_and_store(
        &self,
        site: &Site<'_>,
        editor: TreeEditor,
        scripts: &[Script],
        new: &NewTree,
    ) -> Result<ImageRecord, BuildError> {
        let store = self.store;
        let TreeEditor { tree, staging, .. } = editor;
        // The edited content must be durable objects before it is materialized from them.
        staging.commit()?;
        let work = store.staging()?;
        let root = work.dir().join("root");
        let result = (|| -> Result<ImageRecord, BuildError> {
            crate::store::export::export_directory(&tree, &store.objects(), &root)?;
            let space = packages_step::script_space();
            let overlay = match space {
                Some(bytes) if crate::packages::overlay::can_overlay(&tree) => {
                    match crate::packages::overlay::Overlay::mount(
                        &root,
                        &work.dir().join("overlay"),
                        crate::packages::overlay::UpperLayer::InMemory(bytes),
                    ) {
                        Ok(overlay) => Some(overlay),
                        Err(error) => {
                            self.reporter
                                .explain(&format!("{error:#}; the scripts write to the copy"));
                            None
                        }
                    }
                }
                _ => None,
            };
            let (view, sandbox) = match &overlay {
                Some(overlay) => (
                    overlay.view(),
                    crate::packages::apt::Sandbox::prepare_entered(
                        &overlay.view(),
                        overlay.merged(),
                        overlay.enter(),
                    )?,
                ),
                None => (root.clone(), crate::packages::apt::Sandbox::prepare(&root)?),
            };
            // Files the scripts leave alone are not read and hashed again (copy only).
            let known = match overlay {
                Some(_) => None,
                None => Some(crate::store::import::KnownContent::record(&root, &tree)?),
            };
            for (index, script) in scripts.iter().enumerate() {
                // /tmp is a fresh tmpfs inside the sandbox: the script waits in the root.
                let script_in_root = view.join(format!("run-{index}.sh"));
                fs_err::write(&script_in_root, &script.text)?;
                let name = format!("/run-{index}.sh");
                let spinner = self.reporter.spinner(&format!("run script {}", index + 1));
                let ran = sandbox.run_limited(&["sh", "-e", &name], &[], Some(script.timeout));
                spinner.finish_and_clear();
                let full = overlay.as_ref().is_some_and(|o| {
                    o.upper_free_bytes()
                        .is_some_and(|free| free < packages_step::FULL_UPPER)
                });
                let _ = fs_err::remove_file(&script_in_root);
                if let Err(error) = ran {
                    if full && let Some(bytes) = space {
                        return Err(site
                            .error(
                                "appliance::run-out-of-space",
                                format!(
                                    "the script filled the {} MiB its changes may take",
                                    bytes >> 20
                                ),
                                script.span,
                            )
                            .label("this script")
                            .help(format!(
                                "a script's changes are kept in memory, up to half of the memory available (or {} bytes); the store's disk is untouched",
                                packages_step::OVERLAY_MEMORY_ENV
                            ))
                            .into());
                    }
                    return Err(script_failure(site, script, error));
                }
            }
            sandbox.finish()?;
            let mut import_staging = store.staging()?;
            let limits = crate::store::import::Limits::default();
            let imported = match overlay {
                Some(overlay) => {
                    let unmounted = overlay.unmount()?;
                    crate::store::import::apply_overlay_upper(
                        tree,
                        &unmounted.upper(),
                        &mut import_staging,
                        limits,
                        unmounted.on_disk(),
                    )?
                }
                None => crate::store::import::import_directory_with(
                    &root,
                    &mut import_staging,
                    limits,
                    known.as_ref(),
                    true,
                )?,
            };
            // Dropped before the commit's sync, which would otherwise flush its pages.
            fs_err::remove_dir_all(&root)?;
            Ok(store.commit_tree(
                new,
                &imported.tree,
                import_staging,
                imported.dpkg_status.as_deref(),
            )?)
        })();
        work.discard();
        result
    }

    fn write_outputs(
        &self,
        site: &Site<'_>,
        image: &ImageRecord,
    ) -> Result<Vec<PathBuf>, BuildError> {
        let appliance = site.appliance;
        let dir = self
            .workspace
            .target_dir
            .join("appliance")
            .join(&appliance.name.value);
        let chain = self.lineage(image);
        let cmdline: Vec<String> = appliance
            .kernel_cmdline
            .iter()
            .map(|w| w.value.clone())
            .collect();
        let mut written = Vec::new();
        for output in &appliance.outputs {
            let Some(format) = crate::output::Format::parse(&output.format.value) else {
                self.reporter.warn(&format!(
                    "{}: the `{}` output is not known to this version",
                    appliance.name.value, output.format.value
                ));
                continue;
            };
            let spinner = self
                .reporter
                .spinner(&format!("writing the {} output", output.format.value));
            let request = crate::output::Request {
                store: self.store,
                appliance: &appliance.name.value,
                chain: &chain,
                output,
                dir: &dir,
                kernel_cmdline: &cmdline,
            };
            let result = crate::output::write(format, &request);
            spinner.finish_and_clear();
            let outcome = result.map_err(|e| {
                BuildError::Other(e.context(format!(
                    "writing the `{}` output of `{}`",
                    output.format.value, appliance.name.value
                )))
            })?;
            if let Some(note) = &outcome.note {
                self.reporter.explain(note);
            }
            written.extend(outcome.files);
        }
        Ok(written)
    }

    /// The image and its ancestors, root first.
    fn lineage(&self, image: &ImageRecord) -> Vec<ImageRecord> {
        let mut chain = vec![image.clone()];
        while let Some(parent) = chain
            .last()
            .and_then(|i| i.parent)
            .and_then(|id| self.images.iter().find(|i| i.id == id))
        {
            if chain.len() > self.images.len() {
                break;
            }
            chain.push(parent.clone());
        }
        chain.reverse();
        chain
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The configuration as written, as the appliance step's key sees it: spans, outputs and
/// the nodes other steps or keys cover left out.
fn appliance_config(appliance: &Appliance) -> serde_json::Value {
    let mut config = serde_json::to_value(appliance).unwrap_or_default();
    crate::manifest::model::strip_spans(&mut config);
    if let Some(object) = config.as_object_mut() {
        for irrelevant in [
            "description",
            "outputs",
            "forwards",
            "suggest",
            "packages",
            "remove",
            "base",
            "kernel",
            "runs",
        ] {
            object.remove(irrelevant);
        }
    }
    config
}

/// The appliance step's key: the parent tree, the configuration as written (spans, outputs
/// and other build-irrelevant nodes left out), and the content digests of what is copied.
fn appliance_key(
    appliance: &Appliance,
    parent: &ImageRecord,
    copies: &[files::CopyItem],
    binaries: &[(String, u32, cargo::Artifact)],
    scripts: &[Script],
    authorized_keys: &BTreeMap<String, String>,
) -> String {
    let config = appliance_config(appliance);
    let inputs = json!({
        "version": 1,
        "parent": parent.tree_digest,
        "config": config,
        "copies": copies,
        "binaries": binaries.iter().map(|(to, mode, a)| json!([to, mode, a.digest])).collect::<Vec<_>>(),
        "scripts": scripts.iter().map(|s| &s.text).collect::<Vec<_>>(),
        "bootable": is_bootable(appliance),
        "authorized_keys": authorized_keys,
    });
    let mut hasher = Sha256::new();
    hasher.update(inputs.to_string());
    hex(&hasher.finalize())
}

/// Apply files, binaries and configuration to the tree, in the order the design fixes:
/// groups and users first (so owners by name resolve), then files, then services and the rest.
fn apply(
    editor: &mut TreeEditor,
    site: &Site<'_>,
    copies: &[files::CopyItem],
    binaries: &[(String, u32, cargo::Artifact)],
    authorized_keys: &BTreeMap<String, String>,
) -> Result<(), BuildError> {
    let appliance = site.appliance;
    let mut accounts = accounts::Accounts::read(editor)?;
    for group in &appliance.groups {
        accounts
            .add_group(&group.name.value, group.gid, group.system)
            .map_err(|e| site.error("appliance::group-failed", format!("{e:#}"), group.span))?;
    }
    let mut homes = Vec::new();
    let mut logins = Vec::new();
    for user in &appliance.users {
        let added = accounts
            .add_user(&accounts::NewUser {
                name: &user.name.value,
                system: user.system,
                uid: user.uid,
                group: user.group.as_deref(),
                groups: &user.groups,
                home: user.home.as_deref(),
                shell: user.shell.as_deref(),
                comment: user.comment.as_deref(),
                password_hash: user.password_hash.as_deref(),
            })
            .map_err(|e| site.error("appliance::user-failed", format!("{e:#}"), user.span))?;
        if let Some(keys) = authorized_keys.get(&user.name.value) {
            logins.push((user, added.clone(), keys));
        }
        if added.create_home {
            homes.push(added);
        }
    }
    if !appliance.groups.is_empty() || !appliance.users.is_empty() {
        accounts.write(editor)?;
    }
    for home in homes {
        if !editor.exists(&home.home) {
            editor.mkdir(&home.home, 0o755, home.uid, home.gid)?;
        }
    }
    // ~/.ssh as sshd's StrictModes wants it: the user's own, 0700, the keys 0600.
    for (user, added, keys) in logins {
        if added.home == "/nonexistent" || !editor.exists(&added.home) {
            return Err(site
                .error(
                    "appliance::no-home-for-keys",
                    format!(
                        "user `{}` has no home directory for ~/.ssh/authorized_keys",
                        user.name.value
                    ),
                    user.span,
                )
                .label("keys for this user")
                .help(
                    "give it one with `home=\"/var/lib/NAME\"` (system users have none by default)",
                )
                .into());
        }
        let ssh = format!("{}/.ssh", added.home.trim_end_matches('/'));
        editor.mkdir(&ssh, 0o700, added.uid, added.gid)?;
        editor.write(
            &format!("{ssh}/authorized_keys"),
            keys.as_bytes(),
            0o600,
            added.uid,
            added.gid,
        )?;
    }
    let owner_of = |accounts: &accounts::Accounts,
                    owner: Option<&Spanned<String>>,
                    group: Option<&Spanned<String>>|
     -> Result<(u32, u32), BuildError> {
        let uid = match owner {
            Some(owner) => account_id(site, owner, accounts.uid(&owner.value), "user", || {
                accounts.user_names()
            })?,
            None => 0,
        };
        let gid = match group {
            Some(group) => account_id(site, group, accounts.gid(&group.value), "group", || {
                accounts.group_names()
            })?,
            None => 0,
        };
        Ok((uid, gid))
    };
    for mkdir in &appliance.mkdirs {
        let (uid, gid) = owner_of(&accounts, mkdir.owner.as_ref(), mkdir.group.as_ref())?;
        editor
            .mkdir(&mkdir.path, mkdir.mode, uid, gid)
            .map_err(|e| site.error("appliance::mkdir-failed", format!("{e:#}"), mkdir.span))?;
    }
    for item in copies {
        let copy = &appliance.copies[item.node];
        let (uid, gid) = owner_of(&accounts, copy.owner.as_ref(), copy.group.as_ref())?;
        let result = match &item.kind {
            CopyKind::File { source, .. } => fs_err::File::open(source)
                .map_err(anyhow::Error::from)
                .and_then(|file| editor.write(&item.destination, file, item.mode, uid, gid)),
            CopyKind::Dir => editor.mkdir(&item.destination, item.mode, uid, gid),
            CopyKind::Symlink { target } => editor.symlink(&item.destination, target),
        };
        result.map_err(|e| site.error("appliance::copy-failed", format!("{e:#}"), copy.span))?;
    }
    for (to, mode, artifact) in binaries {
        let file = fs_err::File::open(&artifact.path)?;
        editor.write(to, file, *mode, 0, 0)?;
    }
    for symlink in &appliance.symlinks {
        editor
            .symlink(&symlink.path, &symlink.target)
            .map_err(|e| site.error("appliance::symlink-failed", format!("{e:#}"), symlink.span))?;
    }
    for service in &appliance.services {
        let result = if service.enable {
            systemd::enable(editor, &service.unit.value).map(|_| ())
        } else {
            systemd::disable(editor, &service.unit.value).map(|_| ())
        };
        result.map_err(|e| {
            site.error(
                "appliance::service-failed",
                format!("{e:#}"),
                service.unit.span,
            )
            .label(if service.enable {
                "cannot enable"
            } else {
                "cannot disable"
            })
        })?;
    }
    configure_system(editor, site)?;
    Ok(())
}

/// Whether the appliance has a disk output, which needs a kernel, an init and a network.
fn is_bootable(appliance: &Appliance) -> bool {
    appliance.outputs.iter().any(|o| {
        crate::output::Format::parse(&o.format.value)
            .is_some_and(crate::output::Format::is_bootable)
    })
}

/// What a booting appliance needs beyond its packages: DHCP on the first Ethernet link by
/// systemd-networkd (QEMU's user network answers it).
fn configure_boot(editor: &mut TreeEditor) -> anyhow::Result<()> {
    let network = "/etc/systemd/network/80-appliance-dhcp.network";
    if !editor.exists(network) {
        editor.mkdir("/etc/systemd/network", 0o755, 0, 0)?;
        editor.write(
            network,
            &b"# Written by cargo-appliance for disk outputs.\n[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n"[..],
            0o644,
            0,
            0,
        )?;
    }
    systemd::enable(editor, "systemd-networkd.service")?;
    Ok(())
}

/// A user or group named by a node, as resolved in the image's own account files, or a
/// diagnostic on the name with the closest existing one.
fn account_id(
    site: &Site<'_>,
    name: &Spanned<String>,
    found: Option<u32>,
    what: &str,
    names: impl FnOnce() -> Vec<String>,
) -> Result<u32, BuildError> {
    found.ok_or_else(|| {
        let (code, file) = if what == "user" {
            ("appliance::unknown-owner", "/etc/passwd")
        } else {
            ("appliance::unknown-group", "/etc/group")
        };
        let known = names();
        site.error(
            code,
            format!("{what} `{}` does not exist in the image", name.value),
            name.span,
        )
        .label(format!("no such {what} in {file}"))
        .maybe_help(
            crate::diagnostics::did_you_mean(&name.value, known.iter().map(String::as_str))
                .map(|c| format!("did you mean `{c}`? (or add a `{what}` node)")),
        )
        .into()
    })
}

/// Hostname, time zone, locale, environment and kernel command line.
fn configure_system(editor: &mut TreeEditor, site: &Site<'_>) -> Result<(), BuildError> {
    let appliance = site.appliance;
    if is_bootable(appliance) {
        configure_boot(editor).context("configuring the network of the disk image")?;
    }
    if let Some(hostname) = &appliance.hostname {
        editor.rewrite(
            "/etc/hostname",
            format!("{}\n", hostname.value).as_bytes(),
            0o644,
        )?;
        let hosts = editor.read_text("/etc/hosts")?.unwrap_or_else(|| {
            "127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n".to_owned()
        });
        // Debian maps the host name to 127.0.1.1 (as the installer does).
        let mut lines: Vec<String> = hosts
            .lines()
            .filter(|l| !l.starts_with("127.0.1.1"))
            .map(str::to_owned)
            .collect();
        lines.insert(1.min(lines.len()), format!("127.0.1.1\t{}", hostname.value));
        editor.rewrite("/etc/hosts", (lines.join("\n") + "\n").as_bytes(), 0o644)?;
    }
    if let Some(timezone) = &appliance.timezone {
        let zone = format!("/usr/share/zoneinfo/{}", timezone.value);
        if !editor.exists(&zone) {
            return Err(site
                .error(
                    "appliance::unknown-timezone",
                    format!("the image has no {zone}"),
                    timezone.span,
                )
                .label("not in the image's tzdata")
                .help("add `packages \"tzdata\"`, or check the zone's name")
                .into());
        }
        editor.symlink("/etc/localtime", &zone)?;
        editor.rewrite(
            "/etc/timezone",
            format!("{}\n", timezone.value).as_bytes(),
            0o644,
        )?;
    }
    if let Some(locale) = &appliance.locale {
        editor.rewrite(
            "/etc/default/locale",
            format!("LANG={}\n", locale.value).as_bytes(),
            0o644,
        )?;
    }
    if !appliance.env.is_empty() {
        let existing = editor.read_text("/etc/environment")?.unwrap_or_default();
        let names: BTreeSet<&str> = appliance.env.iter().map(|e| e.name.as_str()).collect();
        let mut lines: Vec<String> = existing
            .lines()
            .filter(|l| {
                l.split_once('=')
                    .is_none_or(|(name, _)| !names.contains(name.trim()))
            })
            .map(str::to_owned)
            .collect();
        for var in &appliance.env {
            lines.push(format!(
                "{}=\"{}\"",
                var.name,
                var.value.replace('"', "\\\"")
            ));
        }
        editor.rewrite(
            "/etc/environment",
            (lines.join("\n") + "\n").as_bytes(),
            0o644,
        )?;
    }
    if !appliance.kernel_cmdline.is_empty() {
        let words: Vec<&str> = appliance
            .kernel_cmdline
            .iter()
            .map(|w| w.value.as_str())
            .collect();
        editor.mkdir("/etc/kernel", 0o755, 0, 0)?;
        editor.rewrite(
            "/etc/kernel/cmdline",
            (words.join(" ") + "\n").as_bytes(),
            0o644,
        )?;
    }
    Ok(())
}

/// Re-resolve the bases of the given appliances (all when empty) to the newest stored
/// matches and drop their package pins: what `cargo appliance update` does.
pub fn update(report: &CheckReport, store: &Store, reporter: &Reporter) -> anyhow::Result<()> {
    let lock_path = lockfile::path(&report.workspace.root);
    let mut lock = LockFile::read(&lock_path)?.unwrap_or_default();
    let images = store.list()?;
    for (_, appliance) in report.appliances() {
        let name = &appliance.name.value;
        let old = lock.appliances.remove(name).unwrap_or_default();
        let mut entry = LockedAppliance::default();
        if let Some(base) = &appliance.base
            && let BaseRef::Image {
                name: image_name,
                version,
                ..
            } = &base.value
        {
            let newest = images
                .iter()
                .filter(|i| &i.name == image_name && !i.needs_repair)
                .filter(|i| {
                    version.as_ref().is_none_or(|req| {
                        crate::manifest::version::Version::parse(&i.version)
                            .is_ok_and(|v| req.matches(&v))
                    })
                })
                .max_by(|a, b| {
                    crate::store::version_key(&a.version)
                        .cmp(&crate::store::version_key(&b.version))
                        .then(a.id.cmp(&b.id))
                });
            if let Some(image) = newest {
                let before = old
                    .base
                    .as_ref()
                    .map(|b| format!("{}@{}", b.name, b.version));
                let after = image.reference();
                if before.as_deref() != Some(after.as_str()) {
                    reporter.status(
                        "Updating",
                        &format!(
                            "{name}: {} -> {after}",
                            before.unwrap_or_else(|| "(none)".into())
                        ),
                    );
                }
                entry.base = Some(LockedImage {
                    name: image.name.clone(),
                    version: image.version.clone(),
                    digest: image.tree_digest.clone(),
                    pulled: crate::registry::pulled_from(image),
                });
            }
        }
        lock.appliances.insert(name.clone(), entry);
    }
    lock.write(&lock_path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Golden values: the appliance step's key is what stored images are found by, so an
    /// accidental change rebuilds every user's appliances. A deliberate one changes these.
    #[test]
    fn the_appliance_key_of_a_known_manifest_is_stable() {
        let text = "appliance \"web\" {\n    base \"debian/bookworm\"\n    packages \"nginx\"\n    \
                    copy \"motd\" to=\"/etc/motd\" mode=0o644\n    user \"api\" system=#true\n    \
                    service \"api.service\" enable=#true\n    hostname \"web\"\n    output \"tar\"\n}\n";
        let file = SourceFile::new(
            Path::new("appliance.kdl"),
            "appliance.kdl".into(),
            text.into(),
        );
        let (appliances, diagnostics) = crate::manifest::parse::parse_manifest(&file);
        assert!(diagnostics.is_empty(), "{diagnostics:?}");
        let parent = ImageRecord {
            id: 1,
            name: "web/packages".into(),
            version: "1".into(),
            tree_digest: "ab".repeat(32),
            legacy_tree_digest: None,
            parent: None,
            created_at: 0,
            provenance: json!({}),
            entry_count: 0,
            content_bytes: 0,
            needs_repair: false,
        };
        let copies = [files::CopyItem {
            destination: "/etc/motd".into(),
            kind: CopyKind::File {
                source: PathBuf::from("/ws/motd"),
                digest: "cd".repeat(32),
                size: 6,
            },
            mode: 0o644,
            node: 0,
        }];
        let key = appliance_key(&appliances[0], &parent, &copies, &[], &[], &BTreeMap::new());
        assert_eq!(
            key,
            "aae221db3597e71acfc088cefa79f0212a0b104f3c86be2bce15bf822680cfa1"
        );
    }

    #[test]
    fn spans_do_not_reach_the_key() {
        let mut value = json!({"name": {"value": "web", "span": {"offset": 3, "len": 5}},
                               "copies": [{"span": {"offset": 1, "len": 2}, "mode": 420}]});
        crate::manifest::model::strip_spans(&mut value);
        assert_eq!(value, json!({"name": "web", "copies": [{"mode": 420}]}));
    }
}
