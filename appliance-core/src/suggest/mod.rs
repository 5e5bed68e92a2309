//! Suggestions for the appliances of a workspace, from their manifests alone: the base is
//! matched by name, the declared packages, users, services, files and ports are the known
//! changes. Each suggestion becomes a help-level diagnostic on the manifest node it concerns.

pub mod apply;
pub mod engine;
pub mod evaluate;
pub mod item_model;
pub mod stats;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::change::{Anchor, Change, change_kind};
use crate::check::CheckReport;
use crate::diagnostics::{Diagnostic, Level, SourceFile, Span};
use crate::manifest::model::{Appliance, BaseRef};
use crate::store::Store;
use stats::{Evidence, Ranked, Scope, sql_scope, sql_suggest};

#[derive(Debug, Clone)]
pub struct SuggestOptions {
    pub limit: usize,
    pub min_support: f64,
    pub min_confidence: f64,
    /// Images that must have made the change: on a young store "2 of 3 images" is an
    /// accident, not a habit.
    pub min_images: i64,
}

pub const DEFAULT_MIN_IMAGES: i64 = 3;

impl Default for SuggestOptions {
    fn default() -> Self {
        Self {
            limit: 5,
            min_support: 0.0,
            min_confidence: 0.0,
            min_images: DEFAULT_MIN_IMAGES,
        }
    }
}

pub use crate::diagnostics::SuggestionInfo;

/// The changes an appliance declares, with where each is declared.
pub fn known_changes(appliance: &Appliance) -> Vec<(Change, Span)> {
    let mut known = Vec::new();
    for package in &appliance.packages {
        known.push((
            Change::new("package-added", &package.name.value),
            package.name.span,
        ));
    }
    for package in &appliance.remove {
        known.push((Change::new("package-removed", &package.value), package.span));
    }
    for user in &appliance.users {
        known.push((Change::new("user-added", &user.name.value), user.name.span));
    }
    for group in &appliance.groups {
        known.push((
            Change::new("group-added", &group.name.value),
            group.name.span,
        ));
    }
    for service in &appliance.services {
        let kind = if service.enable {
            "service-enabled"
        } else {
            "service-disabled"
        };
        known.push((Change::new(kind, &service.unit.value), service.unit.span));
    }
    for copy in &appliance.copies {
        known.push((Change::new("file-added", &copy.to.value), copy.to.span));
    }
    for binary in &appliance.binaries {
        known.push((Change::new("file-added", &binary.to), binary.span));
    }
    for forward in &appliance.forwards {
        known.push((
            Change::new("port-exposed", forward.guest.to_string()),
            forward.span,
        ));
    }
    for output in &appliance.outputs {
        for (port, _) in &output.expose {
            known.push((Change::new("port-exposed", port.to_string()), output.span));
        }
    }
    known
}

/// Whether a file change is already made by a `copy` into a directory (a glob or a whole
/// directory: the manifest does not name each file, the destination covers them).
fn covered_by_copies(appliance: &Appliance, change: &Change) -> bool {
    if !matches!(change.kind.as_str(), "file-added" | "config-changed") {
        return false;
    }
    appliance.copies.iter().any(|copy| {
        let to = &copy.to.value;
        (to.ends_with('/') && change.subject.starts_with(to.as_str())) || &change.subject == to
    })
}

/// The stored-image base an appliance ends at, following `base appliance=` chains, and the
/// changes of the appliances on the way (an appliance has what its base appliance has).
fn resolve_base<'a>(
    appliance: &'a Appliance,
    all: &BTreeMap<&str, &'a Appliance>,
) -> (Option<String>, Vec<Change>) {
    let mut inherited = Vec::new();
    let mut current = appliance;
    for _ in 0..=all.len() {
        match current.base.as_ref().map(|b| &b.value) {
            Some(BaseRef::Image { name, .. }) => return (Some(name.clone()), inherited),
            Some(BaseRef::Appliance { name }) => match all.get(name.value.as_str()) {
                Some(parent) => {
                    inherited.extend(known_changes(parent).into_iter().map(|(c, _)| c));
                    current = parent;
                }
                None => return (None, inherited),
            },
            None => return (None, inherited),
        }
    }
    (None, inherited)
}

/// The appliance and every appliance of the workspace it derives from or that derives from
/// it (directly or not): the images whose evidence would be its own.
fn lineage(appliance: &Appliance, all: &BTreeMap<&str, &Appliance>) -> Vec<String> {
    let ancestors = |start: &Appliance| -> Vec<String> {
        let mut names = Vec::new();
        let mut current = start;
        for _ in 0..=all.len() {
            let Some(BaseRef::Appliance { name }) = current.base.as_ref().map(|b| &b.value) else {
                break;
            };
            names.push(name.value.clone());
            match all.get(name.value.as_str()) {
                Some(parent) => current = parent,
                None => break,
            }
        }
        names
    };
    let own = &appliance.name.value;
    let mut names = vec![own.clone()];
    names.extend(ancestors(appliance));
    for (name, other) in all {
        if *name != own && ancestors(other).contains(own) {
            names.push((*name).to_owned());
        }
    }
    names.sort();
    names.dedup();
    names
}

fn message(change: &Change) -> String {
    match change.kind() {
        Some(kind) => kind.suggestion_for(&change.subject),
        None => format!("consider `{}`", change.key()),
    }
}

fn verb(kind: &str) -> &'static str {
    change_kind(kind).map_or("have", |kind| kind.verb)
}

fn explain(change: &Change, scope: &str, evidence: &Evidence) -> String {
    let mut text = format!(
        "{} of {} {scope} also {} {}",
        evidence.scope_with,
        evidence.scope_total,
        verb(&change.kind),
        change.subject
    );
    if let Some(given) = &evidence.given {
        let (kind, subject) = given.split_once(':').unwrap_or(("", given));
        text.push_str(&format!(
            " ({} of {} that {} {subject})",
            evidence.given_with,
            evidence.given_total,
            verb(kind)
        ));
    }
    text
}

/// Where a suggestion is attached: the node of the same kind when the manifest has one.
fn anchor(appliance: &Appliance, change: &Change) -> Span {
    let anchor = change.kind().map_or(Anchor::Appliance, |kind| kind.anchor);
    let first = match anchor {
        Anchor::Packages => appliance.packages.first().map(|p| p.name.span),
        Anchor::Remove => appliance.remove.first().map(|p| p.span),
        Anchor::Users => appliance.users.first().map(|u| u.span),
        Anchor::Groups => appliance.groups.first().map(|g| g.span),
        Anchor::Services => appliance.services.first().map(|s| s.span),
        Anchor::Forwards => appliance.forwards.first().map(|f| f.span),
        Anchor::Copies => appliance.copies.first().map(|c| c.span),
        Anchor::Appliance => None,
    };
    first.unwrap_or(appliance.name.span)
}

/// One suggestion before it is attached to a manifest: what `suggest` computes and the
/// cache keeps.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Found {
    appliance: String,
    change: Change,
    scope: String,
    info: SuggestionInfo,
}

/// Suggestions for every checked appliance of a report, as help diagnostics. An empty
/// history gives none.
pub fn suggest(
    store: &Store,
    report: &CheckReport,
    options: &SuggestOptions,
) -> anyhow::Result<Vec<Diagnostic>> {
    Ok(render(report, &compute(store, report, options)?))
}

/// As [`suggest`], but kept in `cache` and recomputed only when the catalog (any write
/// changes its files) or the manifests or options change: a no-op build stays fast.
pub fn suggest_cached(
    store: &Store,
    report: &CheckReport,
    options: &SuggestOptions,
    cache: &Path,
) -> anyhow::Result<Vec<Diagnostic>> {
    let key = cache_key(store, report, options);
    if let Ok(data) = std::fs::read(cache)
        && let Ok((cached_key, found)) = serde_json::from_slice::<(String, Vec<Found>)>(&data)
        && cached_key == key
    {
        return Ok(render(report, &found));
    }
    let found = compute(store, report, options)?;
    crate::json_file::write_atomically(cache, &(&key, &found))?;
    Ok(render(report, &found))
}

fn cache_key(store: &Store, report: &CheckReport, options: &SuggestOptions) -> String {
    use sha2::{Digest as _, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(store.catalog_stamp());
    // Another build of cargo-appliance may rank differently.
    hasher.update(format!(
        "{} {} {}\n",
        env!("CARGO_PKG_VERSION"),
        engine::SHARPNESS,
        engine::PRIOR
    ));
    hasher.update(format!(
        "{} {} {} {}\n",
        options.limit, options.min_support, options.min_confidence, options.min_images
    ));
    hasher.update(serde_json::to_string(&report.checked).unwrap_or_default());
    for manifest in &report.manifests {
        hasher.update(serde_json::to_string(&manifest.appliances).unwrap_or_default());
    }
    crate::store::tree::hex(&hasher.finalize())
}

fn render(report: &CheckReport, found: &[Found]) -> Vec<Diagnostic> {
    found
        .iter()
        .filter_map(|found| {
            let (manifest, appliance) = report
                .appliances()
                .find(|(_, a)| a.name.value == found.appliance)?;
            Some(suggestion_diagnostic(
                &manifest.source,
                appliance,
                &found.change,
                &found.scope,
                found.info.clone(),
            ))
        })
        .collect()
}

/// Every appliance of the workspace (checked or not: bases and lineage span them all).
fn appliances_by_name(report: &CheckReport) -> BTreeMap<&str, &Appliance> {
    report
        .manifests
        .iter()
        .flat_map(|m| m.appliances.iter())
        .map(|a| (a.name.value.as_str(), a))
        .collect()
}

fn compute(
    store: &Store,
    report: &CheckReport,
    options: &SuggestOptions,
) -> anyhow::Result<Vec<Found>> {
    let catalog = store.read_catalog()?;
    let conn = catalog.connection();
    let derivations: i64 =
        conn.query_row("SELECT count(*) FROM derivations", [], |row| row.get(0))?;
    if derivations == 0 {
        return Ok(Vec::new());
    }
    // The seed's item model ranks with the history it was fitted on: not once the seed is
    // removed (`history rm --origin seed`).
    let seeded: i64 = conn.query_row(
        "SELECT count(*) FROM derivations WHERE origin = ?",
        [crate::history::seed::ORIGIN],
        |row| row.get(0),
    )?;
    let model = if seeded > 0 {
        Some(item_model::ItemModel::of_seed()?)
    } else {
        None
    };
    let all = appliances_by_name(report);
    let mut found = Vec::new();
    for (_, appliance) in report.appliances() {
        let (Some(base), inherited) = resolve_base(appliance, &all) else {
            continue;
        };
        let declared = known_changes(appliance);
        let mut known: Vec<Change> = declared.iter().map(|(c, _)| c.clone()).collect();
        known.extend(inherited);
        let ignored: Vec<&str> = appliance
            .suggest
            .ignore
            .iter()
            .map(|i| i.value.as_str())
            .collect();
        let limit = appliance
            .suggest
            .limit
            .map_or(options.limit, |l| l as usize);
        let min_support = appliance.suggest.min_support.unwrap_or(options.min_support);
        let min_confidence = appliance
            .suggest
            .min_confidence
            .unwrap_or(options.min_confidence);
        let (scope_label, scope_pattern, _) = sql_scope(conn, &base)?;
        let excluding = lineage(appliance, &all);
        let scope = Scope {
            pattern: &scope_pattern,
            excluding: &excluding,
        };
        let (seed, other) = stats::scope_origins(conn, scope)?;
        let phrase = stats::scope_phrase(&scope_label, seed, other);
        let candidates = sql_suggest(conn, scope, &known, model, limit * 4 + ignored.len())?
            .into_iter()
            .filter(|ranked| {
                // Histories recorded before the rule (or imported) may still hold plumbing.
                crate::change::is_choice(&ranked.scored.change)
                    && !ignored.contains(&ranked.scored.change.key().as_str())
                    && !covered_by_copies(appliance, &ranked.scored.change)
            });
        let mut rank = 0;
        for Ranked { scored, evidence } in candidates {
            if rank >= limit {
                break;
            }
            if evidence.support < min_support
                || evidence.confidence < min_confidence
                || evidence.scope_with < options.min_images
            {
                continue;
            }
            rank += 1;
            found.push(Found {
                appliance: appliance.name.value.clone(),
                change: scored.change.clone(),
                scope: phrase.clone(),
                info: SuggestionInfo {
                    kind: scored.change.kind.clone(),
                    subject: scored.change.subject.clone(),
                    score: (scored.score * 1000.0).round() / 1000.0,
                    rank,
                    scope: scope_label.clone(),
                    evidence,
                    edit: None,
                },
            });
        }
    }
    Ok(found)
}

/// Where a suggestion comes from, for `suggest --explain KEY`: its evidence for one
/// appliance and some of the images that made the change.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    pub appliance: String,
    pub key: String,
    /// The suggestion's help line ("30 of 40 images derived from … also install …").
    pub evidence: String,
    /// (image, origin): the store's own and imported first, then the seed's.
    pub examples: Vec<(String, String)>,
}

/// Explain `key` for each checked appliance it is suggested to.
pub fn explain_key(
    store: &Store,
    report: &CheckReport,
    options: &SuggestOptions,
    key: &str,
    examples: usize,
) -> anyhow::Result<Vec<Explanation>> {
    let found = compute(store, report, options)?;
    let catalog = store.read_catalog()?;
    let conn = catalog.connection();
    let all = appliances_by_name(report);
    let mut out = Vec::new();
    for found in found.iter().filter(|f| f.change.key() == key) {
        let Some(appliance) = all.get(found.appliance.as_str()) else {
            continue;
        };
        let (Some(base), _) = resolve_base(appliance, &all) else {
            continue;
        };
        let (_, pattern, _) = sql_scope(conn, &base)?;
        let excluding = lineage(appliance, &all);
        let scope = Scope {
            pattern: &pattern,
            excluding: &excluding,
        };
        out.push(Explanation {
            appliance: found.appliance.clone(),
            key: key.to_owned(),
            evidence: explain(&found.change, &found.scope, &found.info.evidence),
            examples: stats::examples(conn, scope, &found.change, examples)?,
        });
    }
    Ok(out)
}

fn suggestion_diagnostic(
    file: &Arc<SourceFile>,
    appliance: &Appliance,
    change: &Change,
    scope: &str,
    mut info: SuggestionInfo,
) -> Diagnostic {
    info.edit = apply::edit_for(file, appliance, change);
    let apply = if info.edit.is_some() {
        format!(
            "; apply with `cargo appliance suggest -a {} --apply {}`",
            appliance.name.value,
            change.key()
        )
    } else {
        String::new()
    };
    let help = format!(
        "{}{apply}; silence with `suggest {{ ignore \"{}\" }}`",
        explain(change, scope, &info.evidence),
        change.key()
    );
    let mut diagnostic = Diagnostic::new(Level::Help, "appliance::suggestion", message(change))
        .at(file, anchor(appliance, change))
        .label(format!(
            "suggestion {} for `{}`",
            info.rank, appliance.name.value
        ))
        .help(help)
        .for_appliance(&appliance.name.value);
    diagnostic.suggestion = Some(info);
    diagnostic
}
