//! Bases: which stored image an appliance starts from (the lock's pin, the newest match, or
//! a pull from the manifest's registry), `--locked` before any work, and `update`.

use anyhow::Context as _;

use super::lockfile::{self, LockFile, LockedAppliance, LockedImage};
use super::packages_step::PackageWish;
use super::progress::Reporter;
use super::{BuildError, Context, Site, package_wish};
use crate::check::CheckReport;
use crate::diagnostics::{Diagnostic, Span};
use crate::manifest::model::BaseRef;
use crate::store::{ImageRecord, Store};

/// `--locked`: the error when `name`'s resolution (`base_entry`, the package step's key on
/// `base`) is not what `locked` pins, as Cargo fails when resolution would change its lock.
pub(super) fn locked_violation(
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
pub(super) enum BaseChoice<'a> {
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
pub(super) enum BaseSource<'a> {
    /// The manifest `Appliance.lock` pinned.
    Pinned { reference: String, version: String },
    /// The newest tag matching the requirement.
    Newest(Option<&'a crate::manifest::version::VersionReq>),
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

impl Context<'_> {
    /// The registry a base image comes from when the store lacks it: the node's
    /// `registry=`, else the workspace default (`APPLIANCE_REGISTRY`), with the span to blame.
    pub(super) fn base_registry(
        &self,
        written: Option<&crate::manifest::model::Spanned<String>>,
        base_span: Span,
    ) -> Option<(String, Span)> {
        written
            .map(|r| (r.value.clone(), r.span))
            .or_else(|| self.options.registry.clone().map(|r| (r, base_span)))
    }

    pub(super) fn resolve_base(
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
    pub(super) fn find_base<'r>(
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
    pub(super) fn check_locked(
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
        let registry = self.base_registry(registry.as_ref(), base_node.span);
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
    pub(super) fn pull_base(
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
        let access = self.options.access.clone();
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
}
