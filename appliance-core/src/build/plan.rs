//! The build plan: every selected appliance resolved — base, package step, appliance step,
//! outputs — with each step's key and whether it will run, before any work. `build --plan`
//! prints it; `build -v` prints why each step that runs does ("appliance: `deploy/greeting.txt`
//! changed"), as Cargo's "Dirty" lines do. Nothing here pulls, installs, compiles or writes:
//! a base that must be pulled, or binaries whose sources changed since cargo last built them,
//! make the steps after them "will run" with the reason, and the plan says it cannot be sure.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::files::{CopyItem, CopyKind};
use super::lockfile::LockFile;
use super::packages_step::{self, Plan};
use super::{BaseChoice, BuildError, Context, Site, appliance_config, appliance_key, package_wish};
use crate::manifest::model::{Appliance, BaseRef};
use crate::store::ImageRecord;
use crate::store::provenance::Step;
use crate::store::tree::hex;

/// The plan of one `build`.
#[derive(Debug, Clone, Serialize)]
pub struct BuildPlan {
    pub appliances: Vec<AppliancePlan>,
}

impl AppliancePlan {
    /// The stored image the plan's `step` reuses, when it does not run.
    pub(super) fn reused(&self, step: &str) -> Option<&ImageRecord> {
        self.steps
            .iter()
            .find(|s| s.step == step && !s.run)
            .and_then(|s| s.reused.as_ref())
    }
}

impl BuildPlan {
    /// Whether any step of any appliance will run.
    pub fn has_work(&self) -> bool {
        self.appliances
            .iter()
            .any(|a| a.steps.iter().any(|s| s.run))
    }
}

/// The steps of one appliance, in order.
#[derive(Debug, Clone, Serialize)]
pub struct AppliancePlan {
    pub appliance: String,
    pub manifest: String,
    pub steps: Vec<PlannedStep>,
}

/// One step: its key (when it can be known before the steps ahead of it run), whether it
/// will run, the stored image it reuses, and why.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedStep {
    /// `base`, `packages`, `appliance` or `output`.
    pub step: &'static str,
    /// The output format, for `output` steps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    pub run: bool,
    /// False when whether the step runs depends on work before it (a pull, cargo).
    pub certain: bool,
    /// The stored image the step reuses (or the base it starts from).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    pub why: String,
    /// The stored image a step that does not run stands for: the build takes it as is.
    #[serde(skip)]
    pub(super) reused: Option<ImageRecord>,
}

impl PlannedStep {
    fn new(step: &'static str, run: bool, why: impl Into<String>) -> Self {
        Self {
            step,
            format: None,
            key: None,
            run,
            certain: true,
            image: None,
            why: why.into(),
            reused: None,
        }
    }
}

/// What the appliance step's key is made of, part by part. Kept in the step's provenance,
/// so the next plan can say which part changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplianceInputs {
    /// The start image's tree digest.
    pub parent: String,
    /// A digest of the configuration as written (users, services, settings …).
    pub config: String,
    /// Destination → what is copied there (the source, as the manifest names it, and its
    /// digest, mode or link target).
    pub copies: BTreeMap<String, CopyInput>,
    /// Destination → the binary's digest.
    pub binaries: BTreeMap<String, String>,
    /// Each `run` script's digest, in order.
    pub scripts: Vec<String>,
    /// User → a digest of their authorized keys.
    pub authorized_keys: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyInput {
    pub source: String,
    pub content: String,
}

fn digest_of(text: &str) -> String {
    hex(&Sha256::digest(text.as_bytes()))
}

/// The appliance step's inputs, as [`ApplianceInputs`].
pub(super) fn appliance_inputs(
    appliance: &Appliance,
    parent: &ImageRecord,
    copies: &[CopyItem],
    binaries: &[(String, u32, super::cargo::Artifact)],
    scripts: &[super::Script],
    authorized_keys: &BTreeMap<String, String>,
    workspace_root: &Path,
) -> ApplianceInputs {
    let config = digest_of(&format!(
        "{} {}",
        appliance_config(appliance),
        super::is_bootable(appliance)
    ));
    let copies = copies
        .iter()
        .map(|item| {
            let node = appliance.copies.get(item.node);
            let (source, content) = match &item.kind {
                CopyKind::File { source, digest, .. } => (
                    source
                        .strip_prefix(workspace_root)
                        .unwrap_or(source)
                        .display()
                        .to_string(),
                    format!("{digest} {:o}", item.mode),
                ),
                CopyKind::Dir => (
                    node.map(|n| n.source.value.clone()).unwrap_or_default(),
                    format!("dir {:o}", item.mode),
                ),
                CopyKind::Symlink { target } => (
                    node.map(|n| n.source.value.clone()).unwrap_or_default(),
                    format!("-> {target}"),
                ),
            };
            (item.destination.clone(), CopyInput { source, content })
        })
        .collect();
    ApplianceInputs {
        parent: parent.tree_digest.clone(),
        config,
        copies,
        binaries: binaries
            .iter()
            .map(|(to, mode, artifact)| (to.clone(), format!("{} {mode:o}", artifact.digest)))
            .collect(),
        scripts: scripts.iter().map(|s| digest_of(&s.text)).collect(),
        authorized_keys: authorized_keys
            .iter()
            .map(|(user, keys)| (user.clone(), digest_of(keys)))
            .collect(),
    }
}

/// Why the appliance step runs: what differs between the last build's inputs and these.
pub fn changed_inputs(previous: &ApplianceInputs, now: &ApplianceInputs) -> Vec<String> {
    let mut why = Vec::new();
    if previous.parent != now.parent {
        why.push("its start image changed".to_owned());
    }
    for (destination, input) in &now.copies {
        match previous.copies.get(destination) {
            None => why.push(format!("`{}` is new (→ {destination})", input.source)),
            Some(old) if old != input => {
                why.push(format!("`{}` changed (→ {destination})", input.source));
            }
            Some(_) => {}
        }
    }
    for (destination, old) in &previous.copies {
        if !now.copies.contains_key(destination) {
            why.push(format!(
                "`{}` is no longer copied to {destination}",
                old.source
            ));
        }
    }
    for (destination, digest) in &now.binaries {
        if previous.binaries.get(destination) != Some(digest) {
            why.push(format!("the binary for {destination} changed"));
        }
    }
    for destination in previous.binaries.keys() {
        if !now.binaries.contains_key(destination) {
            why.push(format!("no binary goes to {destination} any more"));
        }
    }
    if previous.scripts != now.scripts {
        why.push("its `run` scripts changed".to_owned());
    }
    if previous.authorized_keys != now.authorized_keys {
        why.push("authorized SSH keys changed".to_owned());
    }
    if previous.config != now.config {
        why.push("its configuration in the manifest changed".to_owned());
    }
    why
}

/// What is known of an appliance's images while planning.
#[derive(Debug, Clone)]
enum Known {
    Image(ImageRecord),
    /// Made by a step that will run first: `why` says which, and `certain` whether it will
    /// surely make a new image (a pull or cargo may find nothing new).
    Unknown {
        why: String,
        certain: bool,
    },
}

impl Known {
    fn unknown(why: impl Into<String>, certain: bool) -> Self {
        Known::Unknown {
            why: why.into(),
            certain,
        }
    }
}

impl Context<'_> {
    /// Plan the build of `order` (appliances in build order) without doing any of it.
    pub(super) fn plan(
        &mut self,
        order: &[String],
        sites: &BTreeMap<&str, Site<'_>>,
        lock: &LockFile,
    ) -> Result<BuildPlan, BuildError> {
        let mut finals: BTreeMap<String, Known> = BTreeMap::new();
        let mut appliances = Vec::new();
        for name in order {
            let Some(site) = sites.get(name.as_str()) else {
                continue;
            };
            let locked = lock.appliances.get(name).cloned().unwrap_or_default();
            let (plan, last) = self.plan_one(site, &finals, &locked)?;
            finals.insert(name.clone(), last);
            appliances.push(plan);
        }
        Ok(BuildPlan { appliances })
    }

    fn plan_one(
        &mut self,
        site: &Site<'_>,
        finals: &BTreeMap<String, Known>,
        locked: &super::lockfile::LockedAppliance,
    ) -> Result<(AppliancePlan, Known), BuildError> {
        let appliance = site.appliance;
        let mut steps = Vec::new();

        // Base.
        let base_node = appliance.base.as_ref().ok_or_else(|| {
            anyhow::anyhow!("the appliance has no base (check should have said so)")
        })?;
        let base = match &base_node.value {
            BaseRef::Image {
                name: image_name,
                version,
                registry,
            } => {
                let registry = self.base_registry(registry.as_ref(), base_node.span);
                match self.find_base(
                    site,
                    base_node.span,
                    image_name,
                    version.as_ref(),
                    registry.as_ref().map(|(r, span)| (r.as_str(), *span)),
                    locked,
                ) {
                    BaseChoice::Stored(image) => {
                        let mut step = PlannedStep::new("base", false, "stored");
                        step.key = Some(image.tree_digest.clone());
                        step.image = Some(image.reference());
                        step.reused = Some(image.clone());
                        steps.push(step);
                        Known::Image(image)
                    }
                    BaseChoice::Pull { prefix, .. } => {
                        let why = format!("`{image_name}` is pulled from {prefix}");
                        steps.push(PlannedStep::new("base", true, why.clone()));
                        Known::unknown(why, true)
                    }
                    BaseChoice::Missing(diagnostic) => return Err((*diagnostic).into()),
                }
            }
            BaseRef::Appliance { name: parent } => {
                let known = finals.get(&parent.value).cloned().unwrap_or_else(|| {
                    Known::unknown(
                        format!("appliance `{}` is not planned", parent.value),
                        false,
                    )
                });
                let mut step =
                    PlannedStep::new("base", false, format!("appliance `{}`", parent.value));
                match &known {
                    Known::Image(image) => {
                        step.key = Some(image.tree_digest.clone());
                        step.image = Some(image.reference());
                    }
                    Known::Unknown { .. } => {
                        step.why = format!("appliance `{}`, built first", parent.value);
                    }
                }
                steps.push(step);
                match known {
                    Known::Image(image) => Known::Image(image),
                    Known::Unknown { certain, .. } => Known::unknown(
                        format!("its base appliance `{}` is rebuilt", parent.value),
                        certain,
                    ),
                }
            }
        };

        // Packages.
        let wish = package_wish(appliance);
        let packages = if wish.is_empty() {
            base
        } else {
            match &base {
                Known::Image(base_image) => {
                    let pinned = locked.packages.as_ref().map(|p| p.digest.as_str());
                    let (mut step, known) =
                        match packages_step::plan(&self.images, base_image, &wish, pinned) {
                            Plan::Stored(image) => {
                                let mut step = PlannedStep::new(
                                    "packages",
                                    false,
                                    "stored: the same start image and package set",
                                );
                                step.image = Some(image.reference());
                                step.reused = Some(image.clone());
                                (step, Known::Image(image))
                            }
                            Plan::Install { start, reason, .. } => {
                                let mut step = PlannedStep::new(
                                    "packages",
                                    true,
                                    format!("{reason} (apt starts from {})", start.reference()),
                                );
                                step.image = Some(start.reference());
                                (step, Known::unknown("its package step runs", true))
                            }
                        };
                    step.key = Some(wish.key(base_image));
                    steps.push(step);
                    known
                }
                Known::Unknown { why, certain } => {
                    let mut step = PlannedStep::new("packages", true, why.clone());
                    step.certain = *certain;
                    steps.push(step);
                    Known::unknown(why.clone(), *certain)
                }
            }
        };

        // Files, binaries, configuration, scripts.
        let image = self.plan_appliance_step(site, &packages, &mut steps)?;

        // Outputs.
        let chain = match &image {
            Known::Image(image) => Some(self.lineage(image)),
            Known::Unknown { .. } => None,
        };
        let dir = self
            .workspace
            .target_dir
            .join("appliance")
            .join(&appliance.name.value);
        let cmdline: Vec<String> = appliance
            .kernel_cmdline
            .iter()
            .map(|w| w.value.clone())
            .collect();
        for output in &appliance.outputs {
            let Some(format) = crate::output::Format::parse(&output.format.value) else {
                continue;
            };
            let mut step = match (&chain, &image) {
                (Some(chain), _) => {
                    let request = crate::output::Request {
                        store: self.store,
                        appliance: &appliance.name.value,
                        chain,
                        output,
                        dir: &dir,
                        kernel_cmdline: &cmdline,
                    };
                    match crate::output::freshness(format, &request)? {
                        crate::output::Freshness::Current => PlannedStep::new(
                            "output",
                            false,
                            "reused: written from this image with these options",
                        ),
                        crate::output::Freshness::Missing => {
                            PlannedStep::new("output", true, "not written yet")
                        }
                        crate::output::Freshness::Stale => PlannedStep::new(
                            "output",
                            true,
                            "written from another image or with other options",
                        ),
                    }
                }
                (None, Known::Unknown { why, certain }) => {
                    let mut step = PlannedStep::new("output", true, why.clone());
                    step.certain = *certain;
                    step
                }
                (None, Known::Image(_)) => PlannedStep::new("output", true, "its image changed"),
            };
            step.format = Some(output.format.value.clone());
            steps.push(step);
        }
        Ok((
            AppliancePlan {
                appliance: appliance.name.value.clone(),
                manifest: self.workspace.display_path(&site.manifest.path),
                steps,
            },
            image,
        ))
    }

    fn plan_appliance_step(
        &mut self,
        site: &Site<'_>,
        parent: &Known,
        steps: &mut Vec<PlannedStep>,
    ) -> Result<Known, BuildError> {
        let appliance = site.appliance;
        let parent = match parent {
            Known::Image(image) => image,
            Known::Unknown { why, certain } => {
                let mut step = PlannedStep::new("appliance", true, why.clone());
                step.certain = *certain;
                steps.push(step);
                return Ok(Known::unknown(why.clone(), *certain));
            }
        };
        let manifest_dir = site
            .manifest
            .path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let copies = super::files::collect(
            self.workspace,
            &manifest_dir,
            &appliance.copies,
            &mut self.fingerprints,
        )?;
        let scripts = self.run_scripts(site, &manifest_dir)?;
        let keys = super::authorized_keys(site, &manifest_dir)?;
        // Binaries as cargo last built them, if the workspace is as it was then.
        let stamp = self.workspace_stamp();
        let mut binaries = Vec::new();
        let mut binaries_known = true;
        for binary in &appliance.binaries {
            let spec = self.binary_spec(binary)?;
            match super::cargo::cached_artifact(&self.artifacts, &stamp, &spec) {
                Some(artifact) => binaries.push((binary.to.clone(), binary.mode, artifact)),
                None => binaries_known = false,
            }
        }
        let inputs = appliance_inputs(
            appliance,
            parent,
            &copies,
            &binaries,
            &scripts,
            &keys,
            &self.workspace.root,
        );
        // The last build of this appliance, and the inputs it recorded.
        let previous = self
            .images
            .iter()
            .filter_map(|image| match image.step()? {
                Step::Appliance(step) if step.appliance == appliance.name.value => {
                    Some((image.id, step))
                }
                _ => None,
            })
            .max_by_key(|(id, _)| *id)
            .map(|(_, step)| step);
        let previous_inputs = previous
            .as_ref()
            .and_then(|step| serde_json::from_value::<ApplianceInputs>(step.inputs.clone()?).ok());
        let mut why = match (&previous, &previous_inputs) {
            (None, _) => vec![format!("`{}` was never built", appliance.name.value)],
            (Some(_), None) => vec!["the last build recorded no inputs".to_owned()],
            (Some(_), Some(previous)) => {
                let mut now = inputs.clone();
                if !binaries_known {
                    // Unknown binaries are not changes yet.
                    now.binaries = previous.binaries.clone();
                }
                changed_inputs(previous, &now)
            }
        };
        if !binaries_known {
            let key_unknown = PlannedStep {
                certain: !why.is_empty(),
                ..PlannedStep::new(
                    "appliance",
                    true,
                    if why.is_empty() {
                        "if cargo's binaries change: the workspace's sources changed since cargo built them".to_owned()
                    } else {
                        why.join("; ")
                    },
                )
            };
            let certain = key_unknown.certain;
            steps.push(key_unknown);
            return Ok(if certain {
                Known::unknown("its appliance step runs", true)
            } else {
                Known::unknown("if its binaries change", false)
            });
        }
        let key = appliance_key(appliance, parent, &copies, &binaries, &scripts, &keys);
        let found = self
            .images
            .iter()
            .filter(|i| !i.needs_repair && i.parent == Some(parent.id))
            .filter(|i| matches!(i.step(), Some(Step::Appliance(step)) if step.key == key))
            .max_by_key(|i| i.id)
            .cloned();
        let mut step = match &found {
            Some(image) => {
                let mut step = PlannedStep::new("appliance", false, "stored: the same inputs");
                step.image = Some(image.reference());
                step.reused = Some(image.clone());
                step
            }
            None => {
                if why.is_empty() {
                    why.push("no stored image has its key".to_owned());
                }
                PlannedStep::new("appliance", true, why.join("; "))
            }
        };
        step.key = Some(key);
        steps.push(step);
        Ok(match found {
            Some(image) => Known::Image(image),
            None => Known::unknown("its appliance step runs", true),
        })
    }
}

/// The plan for people: one line per step.
pub fn render(plan: &BuildPlan) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for appliance in &plan.appliances {
        let _ = writeln!(out, "{} ({})", appliance.appliance, appliance.manifest);
        for step in &appliance.steps {
            let label = match &step.format {
                Some(format) => format!("{} {format}", step.step),
                None => step.step.to_owned(),
            };
            let action = match (step.run, step.certain) {
                (false, _) => "reuse",
                (true, true) => "run",
                (true, false) => "run?",
            };
            let image = step
                .image
                .as_ref()
                .map(|i| format!(" [{i}]"))
                .unwrap_or_default();
            let _ = writeln!(out, "  {label:<12} {action:<6} {}{image}", step.why);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> ApplianceInputs {
        ApplianceInputs {
            parent: "p".into(),
            config: "c".into(),
            copies: BTreeMap::from([(
                "/srv/greeting.txt".to_owned(),
                CopyInput {
                    source: "deploy/greeting.txt".into(),
                    content: "d1 644".into(),
                },
            )]),
            binaries: BTreeMap::from([("/usr/bin/hello".to_owned(), "b1 755".to_owned())]),
            scripts: vec!["s1".into()],
            authorized_keys: BTreeMap::new(),
        }
    }

    #[test]
    fn unchanged_inputs_give_no_reason() {
        assert!(changed_inputs(&inputs(), &inputs()).is_empty());
    }

    #[test]
    fn each_changed_part_is_named() {
        let mut now = inputs();
        if let Some(copy) = now.copies.get_mut("/srv/greeting.txt") {
            copy.content = "d2 644".into();
        }
        assert_eq!(
            changed_inputs(&inputs(), &now),
            ["`deploy/greeting.txt` changed (→ /srv/greeting.txt)"]
        );
        let mut now = inputs();
        now.copies.clear();
        now.binaries
            .insert("/usr/bin/other".into(), "b2 755".into());
        now.scripts.clear();
        now.config = "c2".into();
        now.parent = "p2".into();
        assert_eq!(
            changed_inputs(&inputs(), &now),
            [
                "its start image changed",
                "`deploy/greeting.txt` is no longer copied to /srv/greeting.txt",
                "the binary for /usr/bin/other changed",
                "its `run` scripts changed",
                "its configuration in the manifest changed",
            ]
        );
    }
}
