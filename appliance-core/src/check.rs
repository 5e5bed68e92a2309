//! `cargo appliance check`: read every manifest of the workspace, validate it, resolve what
//! can be resolved without building, and collect every problem at once.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use crate::diagnostics::{Diagnostic, SourceFile, Span, did_you_mean};
use crate::manifest::model::{Appliance, BaseRef};
use crate::manifest::schema::MAX_MANIFEST_BYTES;
use crate::manifest::{Manifest, parse_manifest};
use crate::workspace::{Resolver, Workspace, WorkspaceError};

#[derive(Debug, Clone, Default)]
pub struct CheckOptions {
    /// `Cargo.toml` of the workspace, or one appliance manifest.
    pub manifest_path: Option<PathBuf>,
    /// Only these appliances (and those they derive from); all when empty.
    pub appliances: Vec<String>,
}

/// What `check` found.
#[derive(Debug)]
pub struct CheckReport {
    pub workspace: Workspace,
    pub manifests: Vec<Manifest>,
    pub diagnostics: Vec<Diagnostic>,
    /// Names of the appliances that were checked, in manifest order.
    pub checked: Vec<String>,
}

impl CheckReport {
    pub fn has_errors(&self) -> bool {
        self.diagnostics.iter().any(Diagnostic::is_error)
    }

    pub fn appliances(&self) -> impl Iterator<Item = (&Manifest, &Appliance)> {
        self.manifests
            .iter()
            .flat_map(|m| m.appliances.iter().map(move |a| (m, a)))
            .filter(|(_, a)| self.checked.contains(&a.name.value))
    }
}

#[derive(Debug, Serialize)]
pub struct CheckSummary<'a> {
    pub reason: &'static str,
    pub success: bool,
    pub errors: usize,
    pub warnings: usize,
    pub appliances: &'a [String],
}

/// Run the checks. `Err` only when there is no workspace to check.
pub fn check(options: &CheckOptions) -> Result<CheckReport, WorkspaceError> {
    let workspace = Workspace::discover(options.manifest_path.as_deref())?;
    let mut diagnostics = Vec::new();
    let mut manifests = Vec::new();
    for path in &workspace.manifests {
        if let Some(file) = read_manifest(&workspace, path, &mut diagnostics) {
            let (appliances, found) = parse_manifest(&file);
            diagnostics.extend(found);
            manifests.push(Manifest {
                path: path.clone(),
                source: file,
                appliances,
            });
        }
    }
    if workspace.manifests.is_empty() {
        diagnostics.push(
            Diagnostic::warning(
                "appliance::no-manifests",
                format!(
                    "no `appliance.kdl` or `*.appliance.kdl` under {}",
                    workspace.root.display()
                ),
            )
            .help("create `appliance.kdl` next to your code; see schema/reference.md"),
        );
    }
    check_names_and_bases(&manifests, &mut diagnostics);
    let checked = select(&manifests, &options.appliances, &mut diagnostics);
    {
        let mut resolver = Resolver {
            workspace: &workspace,
            diagnostics: &mut diagnostics,
        };
        for manifest in &manifests {
            resolver.check_manifest(manifest);
        }
    }
    diagnostics.retain(|d| {
        d.appliance
            .as_ref()
            .is_none_or(|name| checked.contains(name))
    });
    // Report in reading order: by file, then position; stable, so phases keep their order
    // for diagnostics at one position.
    diagnostics.sort_by_key(|d| {
        (
            d.file.as_ref().map(|f| f.display_name.clone()),
            d.span.map_or(0, |s| s.offset),
        )
    });
    Ok(CheckReport {
        workspace,
        manifests,
        diagnostics,
        checked,
    })
}

/// Read a manifest with a size cap and a UTF-8 check; problems become diagnostics.
fn read_manifest(
    workspace: &Workspace,
    path: &Path,
    diagnostics: &mut Vec<Diagnostic>,
) -> Option<Arc<SourceFile>> {
    let display = workspace.display_path(path);
    let empty = SourceFile::new(path, display.clone(), String::new());
    let size = match fs_err::metadata(path) {
        Ok(meta) => meta.len(),
        Err(error) => {
            diagnostics.push(
                Diagnostic::error("appliance::unreadable-manifest", error.to_string())
                    .in_file(&empty),
            );
            return None;
        }
    };
    if size > MAX_MANIFEST_BYTES as u64 {
        diagnostics.push(
            Diagnostic::error(
                "appliance::manifest-too-large",
                format!(
                    "manifest is {size} bytes; manifests are limited to {MAX_MANIFEST_BYTES} bytes"
                ),
            )
            .in_file(&empty),
        );
        return None;
    }
    let bytes = match fs_err::read(path) {
        Ok(bytes) => bytes,
        Err(error) => {
            diagnostics.push(
                Diagnostic::error("appliance::unreadable-manifest", error.to_string())
                    .in_file(&empty),
            );
            return None;
        }
    };
    match String::from_utf8(bytes) {
        Ok(text) => Some(SourceFile::new(path, display, text)),
        Err(error) => {
            let offset = error.utf8_error().valid_up_to();
            let lossy = String::from_utf8_lossy(error.as_bytes()).into_owned();
            let file = SourceFile::new(path, display, lossy);
            diagnostics.push(
                Diagnostic::error("appliance::invalid-utf8", "manifest is not valid UTF-8")
                    .at(&file, Span { offset, len: 1 })
                    .label("invalid byte")
                    .help("KDL documents are UTF-8 text"),
            );
            None
        }
    }
}

/// Rules across appliances: unique names, `base appliance=` references, no cycles.
fn check_names_and_bases(manifests: &[Manifest], diagnostics: &mut Vec<Diagnostic>) {
    let mut first: BTreeMap<&str, (&Manifest, &Appliance)> = BTreeMap::new();
    for manifest in manifests {
        for appliance in &manifest.appliances {
            let name = appliance.name.value.as_str();
            if let Some((first_manifest, first_appliance)) = first.get(name) {
                let mut diagnostic = Diagnostic::error(
                    "appliance::duplicate-appliance",
                    format!("appliance `{name}` is declared twice"),
                )
                .at(&manifest.source, appliance.name.span)
                .label("declared again here");
                if Arc::ptr_eq(&first_manifest.source, &manifest.source) {
                    diagnostic =
                        diagnostic.related(first_appliance.name.span, "first declared here");
                } else {
                    let (line, column) = first_manifest
                        .source
                        .line_column(first_appliance.name.span.offset);
                    diagnostic = diagnostic.help(format!(
                        "first declared at {}:{line}:{column}; appliance names are unique in a workspace",
                        first_manifest.source.display_name
                    ));
                }
                diagnostics.push(diagnostic);
            } else {
                first.insert(name, (manifest, appliance));
            }
        }
    }
    // Unknown references.
    let names: Vec<&str> = first.keys().copied().collect();
    for manifest in manifests {
        for appliance in &manifest.appliances {
            if let Some(reference) = appliance_base(appliance)
                && !first.contains_key(reference.value.as_str())
            {
                let help = did_you_mean(
                    &reference.value,
                    names.iter().copied().filter(|n| *n != appliance.name.value),
                )
                .map(|close| format!("did you mean `{close}`?"))
                .unwrap_or_else(|| format!("appliances in this workspace: {}", names.join(", ")));
                diagnostics.push(
                    Diagnostic::error(
                        "appliance::unknown-appliance",
                        format!(
                            "`base` names appliance `{}`, which no manifest declares",
                            reference.value
                        ),
                    )
                    .at(&manifest.source, reference.span)
                    .label("unknown appliance")
                    .help(help)
                    .for_appliance(&appliance.name.value),
                );
            }
        }
    }
    // Cycles: follow each appliance's base chain; report each appliance that is on a cycle.
    let parent: BTreeMap<&str, &str> = first
        .iter()
        .filter_map(|(name, (_, appliance))| {
            appliance_base(appliance).map(|r| (*name, r.value.as_str()))
        })
        .collect();
    let mut reported = BTreeSet::new();
    for (name, (manifest, appliance)) in &first {
        let mut chain = vec![*name];
        let mut current = *name;
        while let Some(next) = parent.get(current) {
            if *next == *name {
                chain.push(next);
                if reported.insert(*name) {
                    let reference =
                        appliance_base(appliance).map_or(appliance.name.span, |r| r.span);
                    diagnostics.push(
                        Diagnostic::error(
                            "appliance::base-cycle",
                            format!(
                                "appliance `{name}` derives from itself: {}",
                                chain.join(" → ")
                            ),
                        )
                        .at(&manifest.source, reference)
                        .label("closes the cycle")
                        .help("an appliance's base chain must end in a stored image")
                        .for_appliance(name),
                    );
                }
                break;
            }
            if chain.contains(next) || chain.len() > first.len() {
                break;
            }
            chain.push(next);
            current = next;
        }
    }
}

fn appliance_base(appliance: &Appliance) -> Option<&crate::manifest::model::Spanned<String>> {
    match &appliance.base {
        Some(base) => match &base.value {
            BaseRef::Appliance { name } => Some(name),
            BaseRef::Image { .. } => None,
        },
        None => None,
    }
}

/// The appliances to check: the named ones and everything they derive from.
fn select(
    manifests: &[Manifest],
    wanted: &[String],
    diagnostics: &mut Vec<Diagnostic>,
) -> Vec<String> {
    let all: Vec<&Appliance> = manifests.iter().flat_map(|m| m.appliances.iter()).collect();
    let mut names: Vec<String> = Vec::new();
    let push_unique = |names: &mut Vec<String>, name: &str| {
        if !names.iter().any(|n| n == name) {
            names.push(name.to_owned());
        }
    };
    if wanted.is_empty() {
        for appliance in &all {
            push_unique(&mut names, &appliance.name.value);
        }
        return names;
    }
    let mut queue: Vec<String> = Vec::new();
    for name in wanted {
        if all.iter().any(|a| &a.name.value == name) {
            queue.push(name.clone());
        } else {
            let help = did_you_mean(name, all.iter().map(|a| a.name.value.as_str()))
                .map(|close| format!("did you mean `{close}`?"))
                .unwrap_or_else(|| {
                    let known: Vec<&str> = all.iter().map(|a| a.name.value.as_str()).collect();
                    format!("appliances in this workspace: {}", known.join(", "))
                });
            diagnostics.push(
                Diagnostic::error(
                    "appliance::unknown-appliance",
                    format!("no appliance named `{name}`"),
                )
                .help(help),
            );
        }
    }
    while let Some(name) = queue.pop() {
        if names.contains(&name) {
            continue;
        }
        push_unique(&mut names, &name);
        for appliance in all.iter().filter(|a| a.name.value == name) {
            if let Some(parent) = appliance_base(appliance) {
                queue.push(parent.value.clone());
            }
        }
    }
    // Keep manifest order, so output is stable whatever order `-a` was given in.
    let mut ordered = Vec::new();
    for appliance in &all {
        if names.contains(&appliance.name.value) {
            push_unique(&mut ordered, &appliance.name.value);
        }
    }
    ordered
}
