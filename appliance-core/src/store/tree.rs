//! An image's root tree as data: every entry with its metadata, keyed by its path inside the
//! image. Importers build a [`Tree`] entry by entry; nothing is created on the host.
//!
//! Invariants kept by [`Tree::insert`] (docs/HOSTILE.md items 1–12):
//! - paths are normalized, relative to the root (`""` is the root), without `.`/`..`;
//! - the root is always a directory;
//! - no entry lies beneath a symlink: the parent of a new entry is resolved *in the root*
//!   (absolute targets and `..` re-anchored at the root, as `openat2(RESOLVE_IN_ROOT)` does),
//!   so `/var/run/x` written into a tree where `/var/run -> /run` lands at `run/x`;
//! - an existing non-directory at the final path is replaced, never followed;
//! - a hard link points at a regular file of the tree (resolved in root), never at a symlink.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::manifest::grammar::{MAX_COMPONENT_LEN, MAX_PATH_LEN};

/// Symlinks followed while resolving one path, as Linux' MAXSYMLINKS.
const MAX_SYMLINK_HOPS: usize = 40;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    Hardlink,
    CharDevice,
    BlockDevice,
    Fifo,
    Socket,
}

impl EntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::File => "file",
            EntryKind::Dir => "dir",
            EntryKind::Symlink => "symlink",
            EntryKind::Hardlink => "hardlink",
            EntryKind::CharDevice => "char-device",
            EntryKind::BlockDevice => "block-device",
            EntryKind::Fifo => "fifo",
            EntryKind::Socket => "socket",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "file" => EntryKind::File,
            "dir" => EntryKind::Dir,
            "symlink" => EntryKind::Symlink,
            "hardlink" => EntryKind::Hardlink,
            "char-device" => EntryKind::CharDevice,
            "block-device" => EntryKind::BlockDevice,
            "fifo" => EntryKind::Fifo,
            "socket" => EntryKind::Socket,
            _ => return None,
        })
    }
}

/// One entry's metadata. Content lives in the object store under `digest`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    pub kind: EntryKind,
    /// Permission bits with setuid/setgid/sticky (`0o7777` at most).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Bytes of content (files and hard links), 0 otherwise.
    pub size: u64,
    /// SHA-256 of the content, hex (files and hard links).
    pub digest: Option<String>,
    /// A symlink's target as written, or the tree path a hard link points at.
    pub link_target: Option<String>,
    /// Device numbers of character and block devices.
    pub device: Option<(u32, u32)>,
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// Seconds since the epoch.
    pub mtime: i64,
}

impl Entry {
    pub fn dir(mode: u32) -> Self {
        Self {
            kind: EntryKind::Dir,
            mode,
            uid: 0,
            gid: 0,
            size: 0,
            digest: None,
            link_target: None,
            device: None,
            xattrs: BTreeMap::new(),
            mtime: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TreeError {
    #[error("entry `{path}`: {reason}")]
    BadPath { path: String, reason: &'static str },
    #[error("entry `{path}` would replace the root directory with a {kind}")]
    RootNotDirectory { path: String, kind: &'static str },
    #[error("entry `{path}` lies beneath `{parent}`, which is not a directory")]
    ParentNotDirectory { path: String, parent: String },
    #[error("entry `{path}`: too many levels of symbolic links")]
    SymlinkLoop { path: String },
    #[error("hard link `{path}` points at `{target}`, which is not a regular file in the image")]
    BadHardlink { path: String, target: String },
    #[error("entry `{path}` would replace the non-empty directory `{existing}` with a {kind}")]
    ReplacesDirectory {
        path: String,
        existing: String,
        kind: &'static str,
    },
}

/// Normalize a path from an archive or directory walk: strip leading `/` and `./`, drop
/// empty and `.` components, reject `..`, NUL, newline and oversized names.
pub fn normalize_path(raw: &str) -> Result<String, TreeError> {
    let bad = |reason| TreeError::BadPath {
        path: raw.escape_debug().to_string(),
        reason,
    };
    if raw.len() > MAX_PATH_LEN {
        return Err(bad("path is longer than 4096 bytes"));
    }
    if raw.contains('\0') {
        return Err(bad("path contains a NUL byte"));
    }
    if raw.contains('\n') {
        return Err(bad("path contains a newline"));
    }
    let mut parts = Vec::new();
    for component in raw.split('/') {
        match component {
            "" | "." => {}
            ".." => return Err(bad("path contains `..`")),
            name if name.len() > MAX_COMPONENT_LEN => {
                return Err(bad("a path component is longer than 255 bytes"));
            }
            name => parts.push(name),
        }
    }
    Ok(parts.join("/"))
}

fn parent_and_name(path: &str) -> (&str, &str) {
    match path.rfind('/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => ("", path),
    }
}

fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_owned()
    } else {
        format!("{parent}/{name}")
    }
}

/// A root tree. Keys are normalized paths; `""` is the root directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    entries: BTreeMap<String, Entry>,
}

impl Default for Tree {
    fn default() -> Self {
        Self::new()
    }
}

impl Tree {
    pub fn new() -> Self {
        let mut entries = BTreeMap::new();
        entries.insert(String::new(), Entry::dir(0o755));
        Self { entries }
    }

    pub fn entries(&self) -> &BTreeMap<String, Entry> {
        &self.entries
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.len() <= 1
    }

    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.entries.get(path)
    }

    /// Give every entry last modified at or after `since` the time `to`; the count changed.
    /// What a step in the sandbox wrote carries the time it ran at, and `SOURCE_DATE_EPOCH`
    /// asks for a tree that depends on the inputs only (files unpacked from packages keep
    /// their packages' times, which are older).
    pub fn clamp_mtimes_since(&mut self, since: i64, to: i64) -> usize {
        let mut changed = 0;
        for entry in self.entries.values_mut() {
            if entry.mtime >= since && entry.mtime != to {
                entry.mtime = to;
                changed += 1;
            }
        }
        changed
    }

    /// Build a tree from catalog rows, which already satisfy the invariants.
    pub fn from_entries(entries: BTreeMap<String, Entry>) -> Self {
        let mut tree = Self { entries };
        tree.entries
            .entry(String::new())
            .or_insert_with(|| Entry::dir(0o755));
        tree
    }

    /// Resolve a path's directory part in root, following symlinks of the tree; the final
    /// component is not followed. Missing directories are created (mode 0755, root-owned)
    /// when `create` is set, as tar does for entries listed before their parents.
    fn resolve_parent(&mut self, path: &str, create: bool) -> Result<String, TreeError> {
        let (parent, _) = parent_and_name(path);
        let mut hops = 0;
        let mut resolved = String::new();
        let mut pending: Vec<String> = parent
            .split('/')
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
            .rev()
            .collect();
        while let Some(component) = pending.pop() {
            match component.as_str() {
                "." => continue,
                ".." => {
                    // In-root semantics: `..` at the root stays at the root.
                    resolved = parent_and_name(&resolved).0.to_owned();
                    continue;
                }
                _ => {}
            }
            let candidate = join(&resolved, &component);
            match self.entries.get(&candidate) {
                Some(entry) if entry.kind == EntryKind::Dir => resolved = candidate,
                Some(entry) if entry.kind == EntryKind::Symlink => {
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err(TreeError::SymlinkLoop {
                            path: path.to_owned(),
                        });
                    }
                    let target = entry.link_target.clone().unwrap_or_default();
                    if target.starts_with('/') {
                        resolved.clear();
                    }
                    for part in target.split('/').filter(|c| !c.is_empty()).rev() {
                        pending.push(part.to_owned());
                    }
                }
                Some(_) => {
                    return Err(TreeError::ParentNotDirectory {
                        path: path.to_owned(),
                        parent: candidate,
                    });
                }
                None if create => {
                    self.entries.insert(candidate.clone(), Entry::dir(0o755));
                    resolved = candidate;
                }
                None => {
                    return Err(TreeError::ParentNotDirectory {
                        path: path.to_owned(),
                        parent: candidate,
                    });
                }
            }
        }
        Ok(resolved)
    }

    /// Where `path` lands in this tree: its parent resolved in root, its name unchanged.
    pub fn resolve(&mut self, path: &str, create_parents: bool) -> Result<String, TreeError> {
        let (_, name) = parent_and_name(path);
        if name.is_empty() {
            return Ok(String::new());
        }
        let parent = self.resolve_parent(path, create_parents)?;
        Ok(join(&parent, name))
    }

    /// Insert an entry at a normalized path, with the rules in the module doc. Returns the
    /// path it landed at.
    pub fn insert(&mut self, path: &str, mut entry: Entry) -> Result<String, TreeError> {
        if path.is_empty() {
            if entry.kind != EntryKind::Dir {
                return Err(TreeError::RootNotDirectory {
                    path: "/".into(),
                    kind: entry.kind.as_str(),
                });
            }
            self.entries.insert(String::new(), entry);
            return Ok(String::new());
        }
        let landed = self.resolve(path, true)?;
        if entry.kind == EntryKind::Hardlink {
            let raw_target = entry.link_target.clone().unwrap_or_default();
            let target = normalize_path(&raw_target).map_err(|_| TreeError::BadHardlink {
                path: path.to_owned(),
                target: raw_target.clone(),
            })?;
            let target = self
                .resolve(&target, false)
                .map_err(|_| TreeError::BadHardlink {
                    path: path.to_owned(),
                    target: raw_target.clone(),
                })?;
            let resolved = match self.entries.get(&target) {
                Some(found) if found.kind == EntryKind::File => target,
                Some(found) if found.kind == EntryKind::Hardlink => {
                    found.link_target.clone().unwrap_or_default()
                }
                _ => {
                    return Err(TreeError::BadHardlink {
                        path: path.to_owned(),
                        target: raw_target,
                    });
                }
            };
            if resolved == landed {
                // A link to itself: the file is already there.
                return Ok(landed);
            }
            let Some(file) = self.entries.get(&resolved) else {
                return Err(TreeError::BadHardlink {
                    path: path.to_owned(),
                    target: raw_target,
                });
            };
            entry.size = file.size;
            entry.digest = file.digest.clone();
            entry.link_target = Some(resolved);
        }
        if let Some(existing) = self.entries.get(&landed) {
            match (existing.kind, entry.kind) {
                (EntryKind::Dir, EntryKind::Dir) => {}
                (EntryKind::Dir, kind) => {
                    let prefix = format!("{landed}/");
                    if self
                        .entries
                        .range(prefix.clone()..)
                        .next()
                        .is_some_and(|(p, _)| p.starts_with(&prefix))
                    {
                        return Err(TreeError::ReplacesDirectory {
                            path: path.to_owned(),
                            existing: landed,
                            kind: kind.as_str(),
                        });
                    }
                }
                _ => self.remove_entry(&landed),
            }
        }
        self.entries.insert(landed.clone(), entry);
        Ok(landed)
    }

    /// Remove one entry (and, for a directory, everything beneath it). Hard links to a
    /// removed file are re-pointed: the first becomes the file.
    pub fn remove(&mut self, path: &str) {
        if path.is_empty() {
            return;
        }
        let prefix = format!("{path}/");
        let beneath: Vec<String> = self
            .entries
            .range(prefix.clone()..)
            .take_while(|(p, _)| p.starts_with(&prefix))
            .map(|(p, _)| p.clone())
            .collect();
        for child in beneath.iter().rev() {
            self.remove_entry(child);
        }
        self.remove_entry(path);
    }

    /// Remove the children of a directory (an OCI opaque whiteout).
    pub fn clear_dir(&mut self, path: &str) {
        let prefix = if path.is_empty() {
            String::new()
        } else {
            format!("{path}/")
        };
        let beneath: Vec<String> = self
            .entries
            .range(prefix.clone()..)
            .take_while(|(p, _)| p.starts_with(&prefix))
            .filter(|(p, _)| !p.is_empty())
            .map(|(p, _)| p.clone())
            .collect();
        for child in beneath.iter().rev() {
            self.remove_entry(child);
        }
    }

    fn remove_entry(&mut self, path: &str) {
        let Some(removed) = self.entries.remove(path) else {
            return;
        };
        if removed.kind != EntryKind::File {
            return;
        }
        let links: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, e)| {
                e.kind == EntryKind::Hardlink && e.link_target.as_deref() == Some(path)
            })
            .map(|(p, _)| p.clone())
            .collect();
        if let Some((first, rest)) = links.split_first() {
            if let Some(promoted) = self.entries.get_mut(first) {
                promoted.kind = EntryKind::File;
                promoted.link_target = None;
            }
            for link in rest {
                if let Some(entry) = self.entries.get_mut(link) {
                    entry.link_target = Some(first.clone());
                }
            }
        }
    }

    /// Make the first path (in path order) of each hard-link group the file and the others
    /// links to it. Archives list groups in any order; after this, equal trees are equal
    /// data, and exporters that write in path order always write a file before its links.
    pub fn canonicalize_hardlinks(&mut self) {
        let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (path, entry) in &self.entries {
            if entry.kind == EntryKind::Hardlink
                && let Some(target) = &entry.link_target
            {
                groups.entry(target.clone()).or_default().push(path.clone());
            }
        }
        for (file, links) in groups {
            let Some(first_link) = links.first() else {
                continue;
            };
            if first_link > &file {
                continue;
            }
            // `links` is in path order, so `first_link` is the smallest path of the group.
            let new_file = first_link.clone();
            let Some(mut file_entry) = self.entries.get(&file).cloned() else {
                continue;
            };
            // Links share one inode: the promoted path takes the file's metadata and content.
            let promoted = Entry {
                kind: EntryKind::File,
                link_target: None,
                ..file_entry.clone()
            };
            self.entries.insert(new_file.clone(), promoted);
            file_entry.kind = EntryKind::Hardlink;
            file_entry.link_target = Some(new_file.clone());
            self.entries.insert(file.clone(), file_entry);
            for link in links.iter().skip(1) {
                if let Some(entry) = self.entries.get_mut(link) {
                    entry.link_target = Some(new_file.clone());
                }
            }
        }
    }

    /// A deterministic digest of every entry's path and metadata: equal trees have equal
    /// digests whatever order they were built in. Changing the encoding is a format break
    /// (stored digests would no longer match), so it is versioned by its first line, and the
    /// catalog migrates stored digests when it changes ([`TREE_DIGEST_FORMAT`]).
    ///
    /// Every variable-length field is either NUL-terminated (paths, link targets: they
    /// cannot hold NUL) or length-prefixed (xattr names and values), so no two different
    /// trees encode alike.
    pub fn digest(&self) -> String {
        self.digest_as(DigestFormat::V2)
    }

    /// The digest in the first format (xattrs as `name=hex;`, which let a name holding `;`
    /// make two trees hash alike). Kept so that locks, registry annotations and catalogs
    /// written by earlier versions still match ([`super::ImageRecord::has_tree`]).
    pub fn legacy_digest(&self) -> String {
        self.digest_as(DigestFormat::V1)
    }

    fn digest_as(&self, format: DigestFormat) -> String {
        let mut hasher = Sha256::new();
        hasher.update(match format {
            DigestFormat::V1 => &b"cargo-appliance tree v1\n"[..],
            DigestFormat::V2 => &b"cargo-appliance tree v2\n"[..],
        });
        let mut line = String::new();
        for (path, entry) in &self.entries {
            line.clear();
            let _ = write!(
                line,
                "{}\0{}\0{:o}\0{}\0{}\0{}\0{}\0{}\0",
                path,
                entry.kind.as_str(),
                entry.mode,
                entry.uid,
                entry.gid,
                entry.size,
                entry.digest.as_deref().unwrap_or(""),
                entry.link_target.as_deref().unwrap_or(""),
            );
            if let Some((major, minor)) = entry.device {
                let _ = write!(line, "{major},{minor}");
            }
            line.push('\0');
            for (key, value) in &entry.xattrs {
                let _ = match format {
                    DigestFormat::V1 => write!(line, "{key}={};", hex(value)),
                    DigestFormat::V2 => {
                        write!(line, "{}:{key}{}:{};", key.len(), value.len(), hex(value))
                    }
                };
            }
            let _ = writeln!(line, "\0{}", entry.mtime);
            hasher.update(line.as_bytes());
        }
        hex(&hasher.finalize())
    }
}

/// The tree digest's current format, as recorded in the catalog's `meta` table.
pub const TREE_DIGEST_FORMAT: &str = "2";

#[derive(Debug, Clone, Copy)]
enum DigestFormat {
    V1,
    V2,
}

pub fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(digest: &str) -> Entry {
        Entry {
            kind: EntryKind::File,
            digest: Some(digest.into()),
            size: 1,
            ..Entry::dir(0o644)
        }
    }

    fn symlink(target: &str) -> Entry {
        Entry {
            kind: EntryKind::Symlink,
            link_target: Some(target.into()),
            ..Entry::dir(0o777)
        }
    }

    fn hardlink(target: &str) -> Entry {
        Entry {
            kind: EntryKind::Hardlink,
            link_target: Some(target.into()),
            ..Entry::dir(0o644)
        }
    }

    #[test]
    fn normalization_rejects_traversal_and_strips_roots() {
        assert_eq!(normalize_path("/etc/passwd"), Ok("etc/passwd".into()));
        assert_eq!(normalize_path("./etc//./passwd/"), Ok("etc/passwd".into()));
        for root in [".", "./", "/", "//", ""] {
            assert_eq!(normalize_path(root), Ok(String::new()), "{root:?}");
        }
        assert!(normalize_path("../../outside/x").is_err());
        assert!(normalize_path("a/../../b").is_err());
        assert!(normalize_path("a\0b").is_err());
        assert!(normalize_path("a\nb").is_err());
        assert!(normalize_path(&"x".repeat(300)).is_err());
        assert!(normalize_path(&"a/".repeat(2500)).is_err());
    }

    #[test]
    fn the_root_stays_a_directory() {
        let mut tree = Tree::new();
        for kind in [file("d"), symlink("/"), hardlink("x")] {
            assert!(tree.insert("", kind).is_err());
        }
        assert_eq!(tree.get("").map(|e| e.kind), Some(EntryKind::Dir));
    }

    #[test]
    fn entries_beneath_symlinks_resolve_in_root() {
        let mut tree = Tree::new();
        tree.insert("run", Entry::dir(0o755)).expect("dir");
        tree.insert("var/run", symlink("/run")).expect("link");
        assert_eq!(
            tree.insert("var/run/app.pid", file("a")),
            Ok("run/app.pid".into())
        );
        // `x -> ../../../outside` then `x/authorized_keys`: re-anchored at the root.
        tree.insert("x", symlink("../../../outside")).expect("link");
        assert_eq!(
            tree.insert("x/authorized_keys", file("b")),
            Ok("outside/authorized_keys".into())
        );
        // `s -> ..` then `s/a/b/c`: the parent of the root is the root.
        tree.insert("s", symlink("..")).expect("link");
        assert_eq!(tree.insert("s/a/b/c", file("c")), Ok("a/b/c".into()));
    }

    #[test]
    fn a_file_replaces_a_symlink_instead_of_following_it() {
        let mut tree = Tree::new();
        tree.insert("etc/localtime", symlink("/usr/share/zoneinfo/UTC"))
            .expect("link");
        assert_eq!(
            tree.insert("etc/localtime", file("tz")),
            Ok("etc/localtime".into())
        );
        assert_eq!(
            tree.get("etc/localtime").map(|e| e.kind),
            Some(EntryKind::File)
        );
        assert!(tree.get("usr/share/zoneinfo/UTC").is_none());
    }

    #[test]
    fn symlink_loops_are_errors() {
        let mut tree = Tree::new();
        tree.insert("a", symlink("b")).expect("link");
        tree.insert("b", symlink("a")).expect("link");
        assert!(matches!(
            tree.insert("a/x", file("x")),
            Err(TreeError::SymlinkLoop { .. })
        ));
    }

    #[test]
    fn hard_links_must_point_at_files_in_the_tree() {
        let mut tree = Tree::new();
        tree.insert("etc/shadow-copy", file("s")).expect("file");
        tree.insert("etc/link-to-symlink", symlink("shadow-copy"))
            .expect("link");
        assert!(tree.insert("h1", hardlink("/etc/shadow-copy")).is_ok());
        assert!(tree.insert("h2", hardlink("../../outside/f")).is_err());
        assert!(tree.insert("h3", hardlink("etc/link-to-symlink")).is_err());
        assert!(tree.insert("h4", hardlink("etc/missing")).is_err());
        // Removing the target promotes a link to the file.
        tree.remove("etc/shadow-copy");
        assert_eq!(tree.get("h1").map(|e| e.kind), Some(EntryKind::File));
    }

    #[test]
    fn digest_ignores_insertion_order() {
        let mut a = Tree::new();
        a.insert("b/c", file("1")).expect("ok");
        a.insert("a", file("2")).expect("ok");
        let mut b = Tree::new();
        b.insert("a", file("2")).expect("ok");
        b.insert("b", Entry::dir(0o755)).expect("ok");
        b.insert("b/c", file("1")).expect("ok");
        assert_eq!(a.digest(), b.digest());
        b.insert("a", file("3")).expect("ok");
        assert_ne!(a.digest(), b.digest());
    }

    #[test]
    fn xattr_names_holding_separators_do_not_make_trees_hash_alike() {
        // Regression: the first format wrote `name=hex;`, so one xattr named `a=00;b` with
        // value 0x11 encoded exactly as two xattrs `a`=0x00 and `b`=0x11.
        let with = |xattrs: &[(&str, &[u8])]| {
            let mut entry = file("1");
            for (name, value) in xattrs {
                entry.xattrs.insert((*name).to_owned(), value.to_vec());
            }
            let mut tree = Tree::new();
            tree.insert("f", entry).expect("ok");
            tree
        };
        let one = with(&[("a=00;b", &[0x11])]);
        let two = with(&[("a", &[0x00]), ("b", &[0x11])]);
        assert_eq!(
            one.legacy_digest(),
            two.legacy_digest(),
            "the old collision"
        );
        assert_ne!(one.digest(), two.digest());
    }

    /// Golden values: a change of either encoding changes every stored digest, lock and
    /// annotation, so it must be a deliberate new format (and a catalog migration), never an
    /// accident of a refactoring.
    #[test]
    fn digests_of_a_known_tree_are_stable() {
        let mut tree = Tree::new();
        tree.insert("etc", Entry::dir(0o755)).expect("ok");
        let mut conf = file("ab".repeat(32).as_str());
        conf.mtime = 1_700_000_000;
        conf.uid = 33;
        conf.xattrs
            .insert("security.capability".into(), vec![1, 0, 0, 2]);
        tree.insert("etc/app.conf", conf).expect("ok");
        tree.insert("etc/link", symlink("app.conf")).expect("ok");
        tree.insert("etc/hard", hardlink("etc/app.conf"))
            .expect("ok");
        let mut device = Entry::dir(0o600);
        device.kind = EntryKind::CharDevice;
        device.device = Some((1, 3));
        tree.insert("dev-null", device).expect("ok");
        assert_eq!(
            tree.digest(),
            "d3720a110a4cac46cd296e154ff673688d6706d3f96291c3c72824939ccb77b5"
        );
        assert_eq!(
            tree.legacy_digest(),
            "25d825ccf5dc384cf94f29ea5d8d3ea75f68f1411e9a3658d5905d96476e5598"
        );
    }

    #[test]
    fn hard_link_groups_are_canonical_whatever_the_archive_order() {
        let mut a = Tree::new();
        a.insert("usr/bin/perl5.36.0", file("p")).expect("ok");
        a.insert("usr/bin/perl", hardlink("usr/bin/perl5.36.0"))
            .expect("ok");
        a.canonicalize_hardlinks();
        let mut b = Tree::new();
        b.insert("usr/bin/perl", file("p")).expect("ok");
        b.insert("usr/bin/perl5.36.0", hardlink("usr/bin/perl"))
            .expect("ok");
        b.canonicalize_hardlinks();
        assert_eq!(a.get("usr/bin/perl").map(|e| e.kind), Some(EntryKind::File));
        assert_eq!(
            a.get("usr/bin/perl5.36.0")
                .and_then(|e| e.link_target.clone()),
            Some("usr/bin/perl".into())
        );
        assert_eq!(a.digest(), b.digest());
    }

    #[test]
    fn non_empty_directories_are_not_replaced_by_files() {
        let mut tree = Tree::new();
        tree.insert("d/f", file("1")).expect("ok");
        assert!(matches!(
            tree.insert("d", file("2")),
            Err(TreeError::ReplacesDirectory { .. })
        ));
        tree.insert("e", Entry::dir(0o700)).expect("ok");
        assert!(tree.insert("e", symlink("/")).is_ok());
    }

    #[test]
    fn clamping_changes_only_entries_written_since_the_step_started() {
        let mut tree = Tree::new();
        let at = |mtime: i64| Entry { mtime, ..file("1") };
        tree.insert("old", at(1_000)).expect("ok");
        tree.insert("written", at(5_000)).expect("ok");
        tree.insert("later", at(6_000)).expect("ok");
        let before = tree.digest();
        assert_eq!(tree.clamp_mtimes_since(5_000, 2_000), 2);
        assert_ne!(tree.digest(), before);
        let times: Vec<i64> = ["old", "written", "later"]
            .iter()
            .map(|p| tree.get(p).expect("entry").mtime)
            .collect();
        assert_eq!(times, [1_000, 2_000, 2_000]);
        assert_eq!(
            tree.clamp_mtimes_since(5_000, 2_000),
            0,
            "nothing left to clamp"
        );
    }
}
