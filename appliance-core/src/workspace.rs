//! The Cargo workspace around the manifests: finding it (cargo metadata), finding its
//! manifests (the `ignore` walker: honours .gitignore, skips the target directory), and
//! checking what a manifest names in it — copy sources and globs, `binary` targets, scripts.
//!
//! Invariant: every source a manifest names resolves to a path inside the workspace root,
//! after following symlinks, unless the node explicitly allows otherwise (docs/HOSTILE.md item 29).

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use globset::GlobBuilder;

use crate::diagnostics::{Diagnostic, SourceFile, Span, did_you_mean};
use crate::manifest::model::{Appliance, Binary, Copy, RunSource, Spanned, is_glob};
use crate::manifest::{Manifest, is_manifest_file_name};

/// A glob or directory walk stops after this many entries: a workspace with more is not
/// something a `copy` should be walking, and the bound keeps hostile trees cheap.
pub const MAX_WALK_ENTRIES: usize = 200_000;

/// The one walk of copy sources, for `check` and `build` alike (with two walkers, `check`
/// approved files under `.git/` that `build` then did not copy): `.gitignore` honoured (in a
/// git repository or not), hidden files included, `.git/` and the target directory skipped,
/// symlinks not followed. `check` stops at [`MAX_WALK_ENTRIES`]; `build` copies everything.
pub fn walk_sources(dir: &Path, target_dir: &Path) -> ignore::Walk {
    let target = target_dir.to_path_buf();
    let canonical_target = fs_err::canonicalize(target_dir).unwrap_or_else(|_| target.clone());
    ignore::WalkBuilder::new(dir)
        .hidden(false)
        .require_git(false)
        .filter_entry(move |entry| {
            entry.path() != target
                && entry.path() != canonical_target
                && entry.file_name() != ".git"
        })
        .build()
}

#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    #[error("could not find a Cargo workspace at {path}")]
    Metadata {
        path: PathBuf,
        #[source]
        source: cargo_metadata::Error,
    },
    #[error(
        "{path} is not a manifest: expected `Cargo.toml`, `appliance.kdl` or `*.appliance.kdl`"
    )]
    NotAManifest { path: PathBuf },
    #[error("manifest {path} does not exist")]
    MissingManifest { path: PathBuf },
    #[error("manifest {path} is outside the workspace at {root}")]
    ManifestOutsideWorkspace { path: PathBuf, root: PathBuf },
    #[error("reading {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A workspace member as far as appliances care: its name and binary targets.
#[derive(Debug, Clone)]
pub struct CargoPackage {
    pub name: String,
    pub bins: Vec<String>,
    pub manifest_path: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Workspace {
    /// Canonical path of the workspace root.
    pub root: PathBuf,
    pub target_dir: PathBuf,
    pub packages: Vec<CargoPackage>,
    /// Manifest files to read, sorted.
    pub manifests: Vec<PathBuf>,
}

impl Workspace {
    /// Find the workspace from `manifest_path` (a `Cargo.toml` or an appliance manifest) or
    /// from the current directory.
    pub fn discover(manifest_path: Option<&Path>) -> Result<Self, WorkspaceError> {
        let (cargo_toml, only_manifest) = match manifest_path {
            Some(path)
                if path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(is_manifest_file_name) =>
            {
                if !path.is_file() {
                    return Err(WorkspaceError::MissingManifest {
                        path: path.to_path_buf(),
                    });
                }
                let canonical = fs_err::canonicalize(path).map_err(|e| WorkspaceError::Io {
                    path: path.to_path_buf(),
                    source: e,
                })?;
                let dir = canonical
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_default();
                (find_cargo_toml(&dir), Some(canonical))
            }
            Some(path) if path.file_name().is_some_and(|n| n == "Cargo.toml") => {
                (Some(path.to_path_buf()), None)
            }
            Some(path) => {
                return Err(WorkspaceError::NotAManifest {
                    path: path.to_path_buf(),
                });
            }
            None => (None, None),
        };
        let mut command = cargo_metadata::MetadataCommand::new();
        command.no_deps();
        if let Some(cargo_toml) = &cargo_toml {
            command.manifest_path(cargo_toml);
        }
        let metadata = command.exec().map_err(|source| WorkspaceError::Metadata {
            path: cargo_toml
                .clone()
                .or_else(|| std::env::current_dir().ok())
                .unwrap_or_default(),
            source,
        })?;
        let root_path = metadata.workspace_root.clone().into_std_path_buf();
        let root = fs_err::canonicalize(&root_path).map_err(|e| WorkspaceError::Io {
            path: root_path.clone(),
            source: e,
        })?;
        let target_dir = metadata.target_directory.clone().into_std_path_buf();
        let members = metadata.workspace_members.clone();
        let packages = metadata
            .packages
            .iter()
            .filter(|package| members.contains(&package.id))
            .map(|package| CargoPackage {
                name: package.name.to_string(),
                bins: package
                    .targets
                    .iter()
                    .filter(|target| target.is_bin())
                    .map(|target| target.name.clone())
                    .collect(),
                manifest_path: package.manifest_path.clone().into_std_path_buf(),
            })
            .collect();
        let manifests = match only_manifest {
            Some(path) => {
                if !path.starts_with(&root) {
                    return Err(WorkspaceError::ManifestOutsideWorkspace { path, root });
                }
                vec![path]
            }
            None => find_manifests(&root, &target_dir),
        };
        Ok(Self {
            root,
            target_dir,
            packages,
            manifests,
        })
    }

    /// How a path is shown to the user: relative to the workspace root when inside it.
    pub fn display_path(&self, path: &Path) -> String {
        path.strip_prefix(&self.root)
            .unwrap_or(path)
            .to_string_lossy()
            .into_owned()
    }
}

fn find_cargo_toml(dir: &Path) -> Option<PathBuf> {
    dir.ancestors()
        .map(|ancestor| ancestor.join("Cargo.toml"))
        .find(|candidate| candidate.is_file())
}

/// Every `appliance.kdl` and `*.appliance.kdl` under the root, sorted.
fn find_manifests(root: &Path, target_dir: &Path) -> Vec<PathBuf> {
    let target_dir = fs_err::canonicalize(target_dir).unwrap_or_else(|_| target_dir.to_path_buf());
    let mut found: Vec<PathBuf> = ignore::WalkBuilder::new(root)
        .hidden(true)
        .require_git(false)
        .filter_entry(move |entry| entry.path() != target_dir && entry.file_name() != "target")
        .build()
        .filter_map(Result::ok)
        .filter(|entry| entry.file_type().is_some_and(|t| t.is_file()))
        .filter(|entry| {
            entry
                .file_name()
                .to_str()
                .is_some_and(is_manifest_file_name)
        })
        .map(|entry| entry.into_path())
        .collect();
    found.sort();
    found
}

/// Remove `.` and resolve `..` lexically, without touching the filesystem.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// Checks what appliances name in the workspace.
#[derive(Debug)]
pub struct Resolver<'a> {
    pub workspace: &'a Workspace,
    pub diagnostics: &'a mut Vec<Diagnostic>,
}

/// A file a copy node will write, for the "two copies write one destination" warning.
struct Destination {
    span: Span,
}

impl Resolver<'_> {
    pub fn check_manifest(&mut self, manifest: &Manifest) {
        let dir = manifest
            .path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        for appliance in &manifest.appliances {
            self.check_appliance(appliance, &dir, &manifest.source);
        }
    }

    fn report(&mut self, appliance: &Appliance, diagnostic: Diagnostic) {
        self.diagnostics
            .push(diagnostic.for_appliance(&appliance.name.value));
    }

    fn check_appliance(&mut self, appliance: &Appliance, dir: &Path, file: &Arc<SourceFile>) {
        let mut destinations: BTreeMap<String, Destination> = BTreeMap::new();
        for copy in &appliance.copies {
            let files = self.check_copy(appliance, copy, dir, file);
            for relative in files {
                let destination = if copy.to.value.ends_with('/') {
                    format!("{}{}", copy.to.value, relative)
                } else {
                    copy.to.value.clone()
                };
                if let Some(first) = destinations.get(&destination) {
                    let first_span = first.span;
                    self.report(
                        appliance,
                        Diagnostic::warning(
                            "appliance::duplicate-destination",
                            format!("`{destination}` is written by two `copy` nodes"),
                        )
                        .at(file, copy.to.span)
                        .label("written again here")
                        .related(first_span, "first written here")
                        .help("the later copy wins; remove one if that is not intended"),
                    );
                } else {
                    destinations.insert(destination, Destination { span: copy.to.span });
                }
            }
        }
        for binary in &appliance.binaries {
            self.check_binary(appliance, binary, file);
        }
        for user in &appliance.users {
            if let Some(path) = &user.authorized_keys
                && let Some(resolved) = self.resolve_source(appliance, path, false, dir, file)
            {
                match read_authorized_keys(&resolved) {
                    Ok(_) => {}
                    Err(AuthorizedKeysError::Unreadable(message)) => self.report(
                        appliance,
                        Diagnostic::error(
                            "appliance::not-a-file",
                            format!("authorized keys `{}`: {message}", path.value),
                        )
                        .at(file, path.span)
                        .label("not a readable file"),
                    ),
                    Err(AuthorizedKeysError::Invalid { line, message }) => self.report(
                        appliance,
                        Diagnostic::error(
                            "appliance::invalid-ssh-key",
                            format!("line {line} of `{}` {message}", path.value),
                        )
                        .at(file, path.span)
                        .label("in this file")
                        .help("each line is one public key as `ssh-keygen` writes it to a .pub file; `#` starts a comment"),
                    ),
                }
            }
        }
        for run in &appliance.runs {
            if let RunSource::File { path } = &run.source
                && let Some(resolved) = self.resolve_source(appliance, path, false, dir, file)
                && !resolved.is_file()
            {
                self.report(
                    appliance,
                    Diagnostic::error(
                        "appliance::not-a-file",
                        format!("script `{}` is not a file", path.value),
                    )
                    .at(file, path.span)
                    .label("not a file"),
                );
            }
        }
    }

    /// Check a copy source; return the paths it contributes, relative to the destination
    /// directory (for file sources) — used only for the duplicate-destination warning.
    fn check_copy(
        &mut self,
        appliance: &Appliance,
        copy: &Copy,
        dir: &Path,
        file: &Arc<SourceFile>,
    ) -> Vec<String> {
        if copy.is_glob() {
            return self.check_glob(appliance, copy, dir, file);
        }
        let Some(resolved) = self.resolve_source(
            appliance,
            &copy.source,
            copy.allow_outside_workspace,
            dir,
            file,
        ) else {
            return Vec::new();
        };
        match fs_err::metadata(&resolved) {
            Ok(meta) if meta.is_file() => {
                let name = resolved
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                vec![name]
            }
            Ok(meta) if meta.is_dir() => Vec::new(),
            Ok(_) => {
                self.report(
                    appliance,
                    Diagnostic::error(
                        "appliance::special-file",
                        format!("`{}` is a device, FIFO or socket; only files and directories are copied", copy.source.value),
                    )
                    .at(file, copy.source.span)
                    .label("not a regular file or directory"),
                );
                Vec::new()
            }
            Err(error) => {
                self.report(
                    appliance,
                    Diagnostic::error(
                        "appliance::unreadable-source",
                        format!("cannot read `{}`: {error}", copy.source.value),
                    )
                    .at(file, copy.source.span),
                );
                Vec::new()
            }
        }
    }

    /// Resolve a source path relative to the manifest's directory and check it stays inside
    /// the workspace, lexically and after following symlinks.
    fn resolve_source(
        &mut self,
        appliance: &Appliance,
        source: &Spanned<String>,
        allow_outside: bool,
        dir: &Path,
        file: &Arc<SourceFile>,
    ) -> Option<PathBuf> {
        let root = &self.workspace.root;
        let joined = normalize(&dir.join(&source.value));
        if !allow_outside && !joined.starts_with(root) {
            self.report(
                appliance,
                outside_workspace(&source.value, file, source.span, "outside the workspace"),
            );
            return None;
        }
        if fs_err::symlink_metadata(&joined).is_err() {
            let parent = joined.parent().map(Path::to_path_buf).unwrap_or_default();
            let wanted = joined
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let siblings: Vec<String> = fs_err::read_dir(&parent)
                .map(|entries| {
                    entries
                        .filter_map(Result::ok)
                        .take(MAX_WALK_ENTRIES)
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            let help = did_you_mean(&wanted, siblings.iter().map(String::as_str)).map(|close| {
                let shown = Path::new(&source.value).with_file_name(close);
                format!("did you mean `{}`?", shown.display())
            });
            self.report(
                appliance,
                Diagnostic::error(
                    "appliance::missing-source",
                    format!("`{}` does not exist", source.value),
                )
                .at(file, source.span)
                .label(match self.workspace.display_path(&parent) {
                    shown if shown.is_empty() => "not found in the workspace root".to_owned(),
                    shown => format!("not found in `{shown}`"),
                })
                .help(help.unwrap_or_else(|| {
                    "paths are relative to the directory of the manifest".into()
                })),
            );
            return None;
        }
        let canonical = match fs_err::canonicalize(&joined) {
            Ok(canonical) => canonical,
            Err(error) => {
                self.report(
                    appliance,
                    Diagnostic::error(
                        "appliance::unreadable-source",
                        format!("cannot resolve `{}`: {}", source.value, error),
                    )
                    .at(file, source.span)
                    .label("a broken symlink?"),
                );
                return None;
            }
        };
        if !allow_outside && !canonical.starts_with(root) {
            self.report(
                appliance,
                outside_workspace(
                    &source.value,
                    file,
                    source.span,
                    &format!(
                        "a symlink that leads outside the workspace, to {}",
                        canonical.display()
                    ),
                ),
            );
            return None;
        }
        Some(canonical)
    }

    fn check_glob(
        &mut self,
        appliance: &Appliance,
        copy: &Copy,
        dir: &Path,
        file: &Arc<SourceFile>,
    ) -> Vec<String> {
        let pattern = &copy.source.value;
        let matcher = match GlobBuilder::new(pattern).literal_separator(true).build() {
            Ok(glob) => glob.compile_matcher(),
            Err(error) => {
                self.report(
                    appliance,
                    Diagnostic::error(
                        "appliance::invalid-glob",
                        format!("invalid glob `{pattern}`: {}", error.kind()),
                    )
                    .at(file, copy.source.span)
                    .label("invalid glob"),
                );
                return Vec::new();
            }
        };
        // Walk from the longest literal prefix, so `static/**/*.html` walks `static/` only.
        let literal: PathBuf = Path::new(pattern)
            .components()
            .take_while(|c| !is_glob(&c.as_os_str().to_string_lossy()))
            .collect();
        let base = normalize(&dir.join(&literal));
        let root = self.workspace.root.clone();
        if !copy.allow_outside_workspace && !base.starts_with(&root) {
            self.report(
                appliance,
                outside_workspace(pattern, file, copy.source.span, "outside the workspace"),
            );
            return Vec::new();
        }
        if !base.is_dir() {
            self.report(
                appliance,
                Diagnostic::error(
                    "appliance::missing-source",
                    format!(
                        "glob `{pattern}` starts in `{}`, which is not a directory",
                        literal.display()
                    ),
                )
                .at(file, copy.source.span)
                .label("no such directory")
                .help("paths are relative to the directory of the manifest"),
            );
            return Vec::new();
        }
        let mut matched = Vec::new();
        let mut escaped = None;
        for entry in walk_sources(&base, &self.workspace.target_dir)
            .filter_map(Result::ok)
            .take(MAX_WALK_ENTRIES)
        {
            let Ok(relative) = entry.path().strip_prefix(dir) else {
                continue;
            };
            if !matcher.is_match(relative) {
                continue;
            }
            let is_symlink = entry.path_is_symlink();
            if is_symlink {
                match fs_err::canonicalize(entry.path()) {
                    Ok(target) if target.starts_with(&root) || copy.allow_outside_workspace => {}
                    Ok(target) => {
                        escaped = Some((relative.to_path_buf(), target));
                        continue;
                    }
                    Err(_) => continue,
                }
            }
            if entry.path().is_file() {
                let under_base = entry.path().strip_prefix(&base).unwrap_or(relative);
                matched.push(under_base.to_string_lossy().into_owned());
            }
        }
        if let Some((relative, target)) = escaped {
            self.report(
                appliance,
                outside_workspace(
                    &relative.to_string_lossy(),
                    file,
                    copy.source.span,
                    &format!(
                        "matched by this glob, a symlink that leads outside the workspace, to {}",
                        target.display()
                    ),
                ),
            );
        }
        if matched.is_empty() {
            self.report(
                appliance,
                Diagnostic::error("appliance::glob-matches-nothing", format!("glob `{pattern}` matches no files"))
                    .at(file, copy.source.span)
                    .label("matches nothing")
                    .help(format!(
                        "the glob is matched against paths relative to the manifest's directory, under `{}` (files ignored by .gitignore are skipped)",
                        if literal.as_os_str().is_empty() { Path::new(".") } else { &literal }.display()
                    )),
            );
        }
        matched.sort();
        matched
    }

    fn check_binary(&mut self, appliance: &Appliance, binary: &Binary, file: &Arc<SourceFile>) {
        let packages = &self.workspace.packages;
        let bin = &binary.name.value;
        match &binary.package {
            Some(package) => {
                let Some(found) = packages.iter().find(|p| p.name == package.value) else {
                    let help =
                        did_you_mean(&package.value, packages.iter().map(|p| p.name.as_str()))
                            .map(|close| format!("did you mean `{close}`?"))
                            .unwrap_or_else(|| {
                                let names: Vec<&str> =
                                    packages.iter().map(|p| p.name.as_str()).collect();
                                format!("workspace members: {}", names.join(", "))
                            });
                    self.report(
                        appliance,
                        Diagnostic::error(
                            "appliance::unknown-package",
                            format!("no package `{}` in the workspace", package.value),
                        )
                        .at(file, package.span)
                        .label("not a workspace member")
                        .help(help),
                    );
                    return;
                };
                if !found.bins.contains(bin) {
                    let help = did_you_mean(bin, found.bins.iter().map(String::as_str))
                        .map(|close| format!("did you mean `{close}`?"))
                        .unwrap_or_else(|| {
                            if found.bins.is_empty() {
                                format!("`{}` has no binary targets", found.name)
                            } else {
                                format!("`{}` has: {}", found.name, found.bins.join(", "))
                            }
                        });
                    self.report(
                        appliance,
                        Diagnostic::error(
                            "appliance::unknown-binary",
                            format!("package `{}` has no binary target `{bin}`", found.name),
                        )
                        .at(file, binary.name.span)
                        .label("no such binary")
                        .help(help),
                    );
                }
            }
            None => {
                let owners: Vec<&str> = packages
                    .iter()
                    .filter(|p| p.bins.contains(bin))
                    .map(|p| p.name.as_str())
                    .collect();
                match owners.as_slice() {
                    [_] => {}
                    [] => {
                        let mut all_bins: Vec<&str> = packages
                            .iter()
                            .flat_map(|p| p.bins.iter().map(String::as_str))
                            .collect();
                        all_bins.sort_unstable();
                        all_bins.dedup();
                        let help = did_you_mean(bin, all_bins.iter().copied())
                            .map(|close| format!("did you mean `{close}`?"))
                            .unwrap_or_else(|| {
                                format!("binary targets in the workspace: {}", all_bins.join(", "))
                            });
                        self.report(
                            appliance,
                            Diagnostic::error(
                                "appliance::unknown-binary",
                                format!("no package in the workspace has a binary target `{bin}`"),
                            )
                            .at(file, binary.name.span)
                            .label("no such binary")
                            .help(help),
                        );
                    }
                    several => {
                        self.report(
                            appliance,
                            Diagnostic::error(
                                "appliance::ambiguous-binary",
                                format!(
                                    "several packages have a binary target `{bin}`: {}",
                                    several.join(", ")
                                ),
                            )
                            .at(file, binary.name.span)
                            .label("ambiguous")
                            .help(format!(
                                "add package=\"{}\" (or another of them)",
                                several[0]
                            )),
                        );
                    }
                }
            }
        }
    }
}

fn outside_workspace(source: &str, file: &Arc<SourceFile>, span: Span, how: &str) -> Diagnostic {
    Diagnostic::error(
        "appliance::source-outside-workspace",
        format!("copy source `{source}` is {how}"),
    )
    .at(file, span)
    .label("outside the workspace")
    .help("sources must stay inside the workspace; add allow-outside-workspace=#true if this is intended")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_resolves_parent_components_lexically() {
        assert_eq!(
            normalize(Path::new("/w/a/../b/./c")),
            PathBuf::from("/w/b/c")
        );
        assert_eq!(
            normalize(Path::new("/w/../../etc/shadow")),
            PathBuf::from("/etc/shadow")
        );
    }

    #[test]
    fn manifest_file_names() {
        assert!(is_manifest_file_name("appliance.kdl"));
        assert!(is_manifest_file_name("web.appliance.kdl"));
        assert!(!is_manifest_file_name(".appliance.kdl"));
        assert!(!is_manifest_file_name("appliance.kdl.bak"));
    }
}

/// Why an authorized-keys file cannot be used.
#[derive(Debug)]
pub enum AuthorizedKeysError {
    Unreadable(String),
    Invalid { line: usize, message: String },
}

/// The public keys of an authorized-keys file, each line checked as a `ssh-key` value is;
/// empty lines and `#` comments are left out.
pub fn read_authorized_keys(path: &Path) -> Result<Vec<String>, AuthorizedKeysError> {
    const LIMIT: u64 = 1 << 20;
    let text = std::fs::File::open(path)
        .and_then(|file| {
            use std::io::Read as _;
            let mut text = String::new();
            file.take(LIMIT + 1).read_to_string(&mut text)?;
            Ok(text)
        })
        .map_err(|e| AuthorizedKeysError::Unreadable(e.to_string()))?;
    if text.len() as u64 > LIMIT {
        return Err(AuthorizedKeysError::Unreadable(format!(
            "larger than {LIMIT} bytes"
        )));
    }
    let mut keys = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        crate::manifest::grammar::check_ssh_key(line).map_err(|message| {
            AuthorizedKeysError::Invalid {
                line: number + 1,
                message,
            }
        })?;
        keys.push(line.to_owned());
    }
    Ok(keys)
}
