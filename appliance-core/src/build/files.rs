//! The files step: what `copy` nodes bring from the workspace, hashed for the step's key
//! (with a size+mtime fast path, as Cargo's fingerprints), and written into the tree.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use anyhow::{Context as _, bail};
use globset::GlobBuilder;
use serde::{Deserialize, Serialize};

use crate::manifest::model::{Copy, is_glob};
use crate::workspace::Workspace;

/// One thing a copy node puts into the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CopyItem {
    /// Absolute image path.
    pub destination: String,
    pub kind: CopyKind,
    /// Permission bits: the manifest's mode, or the source's.
    pub mode: u32,
    /// Index of the copy node, for owner/group and diagnostics.
    pub node: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum CopyKind {
    File {
        #[serde(skip)]
        source: PathBuf,
        digest: String,
        size: u64,
    },
    Dir,
    Symlink {
        target: String,
    },
}

/// Digests of workspace files by (size, mtime, inode): a file whose stat is unchanged is not
/// read again. Kept in `<target>/appliance/.fingerprints.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Fingerprints {
    #[serde(default)]
    files: BTreeMap<PathBuf, (u64, u128, u64, String)>,
    #[serde(skip)]
    changed: bool,
}

impl Fingerprints {
    fn path(workspace: &Workspace) -> PathBuf {
        workspace.target_dir.join("appliance/.fingerprints.json")
    }

    pub fn load(workspace: &Workspace) -> Self {
        crate::json_file::load_or_default(&Self::path(workspace))
    }

    pub fn save(&self, workspace: &Workspace) -> anyhow::Result<()> {
        if !self.changed {
            return Ok(());
        }
        crate::json_file::write_atomically(&Self::path(workspace), self)
    }

    pub fn digest(&mut self, path: &Path) -> anyhow::Result<(String, u64)> {
        use std::os::unix::fs::MetadataExt as _;
        let meta = fs_err::metadata(path)?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        if let Some((size, seen_mtime, ino, digest)) = self.files.get(path)
            && *size == meta.len()
            && *seen_mtime == mtime
            && *ino == meta.ino()
            // A file modified within the clock's granularity of its stat could change again
            // unseen; such "racy" entries are always re-read, as git does.
            && !recently_modified(mtime)
        {
            return Ok((digest.clone(), *size));
        }
        let digest = super::cargo::file_digest(path)?;
        self.files.insert(
            path.to_path_buf(),
            (meta.len(), mtime, meta.ino(), digest.clone()),
        );
        self.changed = true;
        Ok((digest, meta.len()))
    }
}

fn recently_modified(mtime_ns: u128) -> bool {
    let now = std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    now.saturating_sub(mtime_ns) < 2_000_000_000
}

fn source_mode(meta: &std::fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    meta.permissions().mode() & 0o7777
}

/// Everything the copy nodes of one appliance bring, in node order (later wins).
pub fn collect(
    workspace: &Workspace,
    manifest_dir: &Path,
    copies: &[Copy],
    fingerprints: &mut Fingerprints,
) -> anyhow::Result<Vec<CopyItem>> {
    let mut items = Vec::new();
    for (node, copy) in copies.iter().enumerate() {
        let into_dir = copy.to.value.ends_with('/');
        let destination_of = |relative: &Path| -> String {
            let base = copy.to.value.trim_end_matches('/');
            if relative.as_os_str().is_empty() {
                base.to_owned()
            } else {
                format!("{base}/{}", relative.to_string_lossy())
            }
        };
        if is_glob(&copy.source.value) {
            let matcher = GlobBuilder::new(&copy.source.value)
                .literal_separator(true)
                .build()
                .with_context(|| format!("glob `{}`", copy.source.value))?
                .compile_matcher();
            let literal: PathBuf = Path::new(&copy.source.value)
                .components()
                .take_while(|c| !is_glob(&c.as_os_str().to_string_lossy()))
                .collect();
            let base = checked_source(workspace, manifest_dir, &literal, copy)?;
            let mut matched = Vec::new();
            for entry in walk(workspace, &base) {
                let relative_to_manifest = entry.strip_prefix(manifest_dir).unwrap_or(&entry);
                let relative_to_manifest = if base.starts_with(manifest_dir) {
                    relative_to_manifest.to_path_buf()
                } else {
                    literal.join(entry.strip_prefix(&base).unwrap_or(&entry))
                };
                if matcher.is_match(&relative_to_manifest) && entry.is_file() {
                    matched.push(entry);
                }
            }
            matched.sort();
            for path in matched {
                let path = checked_within(workspace, &path, copy)?;
                let relative = path.strip_prefix(&base).unwrap_or(&path).to_path_buf();
                let destination = if into_dir {
                    destination_of(&relative)
                } else {
                    bail!(
                        "glob `{}` needs a destination directory: end `to` with `/`",
                        copy.source.value
                    );
                };
                items.push(file_item(&path, destination, copy, node, fingerprints)?);
            }
            continue;
        }
        let source = checked_source(workspace, manifest_dir, Path::new(&copy.source.value), copy)?;
        let meta = fs_err::metadata(&source)?;
        if meta.is_file() {
            let destination = if into_dir {
                let name = source.file_name().context("a source without a name")?;
                destination_of(Path::new(name))
            } else {
                copy.to.value.clone()
            };
            items.push(file_item(&source, destination, copy, node, fingerprints)?);
        } else if meta.is_dir() {
            items.push(CopyItem {
                destination: destination_of(Path::new("")),
                kind: CopyKind::Dir,
                mode: copy.mode.unwrap_or(source_mode(&meta)),
                node,
            });
            let mut entries = walk(workspace, &source);
            entries.sort();
            for path in entries {
                let relative = path.strip_prefix(&source).unwrap_or(&path).to_path_buf();
                if relative.as_os_str().is_empty() {
                    continue;
                }
                let destination = destination_of(&relative);
                let lmeta = fs_err::symlink_metadata(&path)?;
                if lmeta.file_type().is_symlink() {
                    items.push(CopyItem {
                        destination,
                        kind: CopyKind::Symlink {
                            target: fs_err::read_link(&path)?.to_string_lossy().into_owned(),
                        },
                        mode: 0o777,
                        node,
                    });
                } else if lmeta.is_dir() {
                    items.push(CopyItem {
                        destination,
                        kind: CopyKind::Dir,
                        mode: source_mode(&lmeta),
                        node,
                    });
                } else if lmeta.is_file() {
                    items.push(file_item(&path, destination, copy, node, fingerprints)?);
                }
            }
        } else {
            bail!("`{}` is neither a file nor a directory", copy.source.value);
        }
    }
    Ok(items)
}

fn file_item(
    path: &Path,
    destination: String,
    copy: &Copy,
    node: usize,
    fingerprints: &mut Fingerprints,
) -> anyhow::Result<CopyItem> {
    let meta = fs_err::metadata(path)?;
    let (digest, size) = fingerprints.digest(path)?;
    Ok(CopyItem {
        destination,
        kind: CopyKind::File {
            source: path.to_path_buf(),
            digest,
            size,
        },
        mode: copy.mode.unwrap_or(source_mode(&meta)),
        node,
    })
}

/// Walk a directory with `check`'s walker ([`crate::workspace::walk_sources`]), so that what
/// `check` approves is what is copied.
fn walk(workspace: &Workspace, dir: &Path) -> Vec<PathBuf> {
    crate::workspace::walk_sources(dir, &workspace.target_dir)
        .filter_map(Result::ok)
        .map(|e| e.into_path())
        .collect()
}

/// The source resolved against the manifest's directory; it must stay inside the workspace
/// unless the node allows otherwise (checked again here: the tree may have changed since
/// `check`).
fn checked_source(
    workspace: &Workspace,
    manifest_dir: &Path,
    relative: &Path,
    copy: &Copy,
) -> anyhow::Result<PathBuf> {
    let joined = manifest_dir.join(relative);
    let canonical = fs_err::canonicalize(&joined)
        .with_context(|| format!("copy source `{}`", copy.source.value))?;
    checked_within(workspace, &canonical, copy)
}

fn checked_within(workspace: &Workspace, path: &Path, copy: &Copy) -> anyhow::Result<PathBuf> {
    let canonical = fs_err::canonicalize(path)?;
    if !copy.allow_outside_workspace && !canonical.starts_with(&workspace.root) {
        bail!(
            "copy source `{}` leads outside the workspace, to {}",
            copy.source.value,
            canonical.display()
        );
    }
    Ok(canonical)
}
