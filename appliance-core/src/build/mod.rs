//! `cargo appliance build`: the step graph base → packages → files, binaries and
//! configuration → outputs. Each step's key hashes its inputs; a stored image with the key is
//! reused, so a no-op build only checks. Only the package step (and `run` scripts) need a
//! materialized tree; files and configuration are edits of the stored tree.

pub mod accounts;
mod base;
pub mod cargo;
mod configure;
pub mod edit;
pub mod files;
mod keys;
pub mod lockfile;
pub mod packages_step;
pub mod plan;
pub mod progress;
mod scripts;
pub mod systemd;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::check::CheckReport;
use crate::diagnostics::{Diagnostic, SourceFile, Span};
use crate::manifest::Manifest;
use crate::manifest::model::{Appliance, BaseRef};
use crate::store::{ImageRecord, NewTree, Store};

use edit::TreeEditor;
use files::Fingerprints;
use lockfile::{LockFile, LockedAppliance, LockedImage, LockedPackages};
use packages_step::{PackageFailure, PackageWish, Plan};
use progress::Reporter;

pub use base::update;
use base::{BaseChoice, locked_violation};
use configure::apply;
use keys::{appliance_config, appliance_key};
use scripts::Script;

#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// Fail instead of changing `Appliance.lock`.
    pub locked: bool,
    /// Use only what the store and Cargo have cached.
    pub offline: bool,
    /// `HOST[:PORT]/PREFIX` for bases without `registry=` (`APPLIANCE_REGISTRY`).
    pub registry: Option<String>,
    /// TLS for pulled bases and `--push`: `--insecure`, `--cert-dir`.
    pub access: crate::registry::Access,
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
    // The plan before any work: what each step will do and why. The build then takes what
    // the plan found stored and runs the rest.
    let plan = context.plan(&order, &sites, &old_lock)?;
    {
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
        let planned = plan.appliances.iter().find(|a| a.appliance == name);
        let (done, lock_entry) = context.build_one(site, &built, &locked, planned)?;
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
            epoch: crate::store::export::source_date_epoch().unwrap_or_else(unix_seconds_now),
        })
    }

    fn build_one(
        &mut self,
        site: &Site<'_>,
        built: &BTreeMap<String, Built>,
        locked: &LockedAppliance,
        planned: Option<&plan::AppliancePlan>,
    ) -> Result<(Built, LockedAppliance), BuildError> {
        let reused = |step: &str| planned.and_then(|p| p.reused(step)).cloned();
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
                let registry = self.base_registry(registry.as_ref(), base_node.span);
                let image = match reused("base") {
                    Some(image) => image,
                    None => self.resolve_base(
                        site,
                        base_node.span,
                        image_name,
                        version.as_ref(),
                        registry.as_ref().map(|(r, span)| (r.as_str(), *span)),
                        locked,
                    )?,
                };
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
            let (image, did_work) = match reused("packages") {
                Some(image) => (image, false),
                None => self.package_step(site, &base, &wish, locked)?,
            };
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
        let (image, did_work) = match reused("appliance") {
            Some(image) => (image, false),
            None => self.appliance_step(site, &packages_image)?,
        };
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

/// Whether the appliance has a disk output, which needs a kernel, an init and a network.
fn is_bootable(appliance: &Appliance) -> bool {
    appliance.outputs.iter().any(|o| {
        crate::output::Format::parse(&o.format.value)
            .is_some_and(crate::output::Format::is_bootable)
    })
}

/// The time now as file times count it (seconds since the Unix epoch).
fn unix_seconds_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn spans_do_not_reach_the_key() {
        let mut value = json!({"name": {"value": "web", "span": {"offset": 3, "len": 5}},
                               "copies": [{"span": {"offset": 1, "len": 2}, "mode": 420}]});
        crate::manifest::model::strip_spans(&mut value);
        assert_eq!(value, json!({"name": "web", "copies": [{"mode": 420}]}));
    }
}
