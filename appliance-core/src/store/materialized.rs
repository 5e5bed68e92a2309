//! Materialized trees: an image's tree written out as a directory in the store's cache, kept
//! for the next package step that starts from the same image. The package step overlays it
//! (never writes it), so one copy serves every build from that image and the base is not
//! copied again for each one.
//!
//! Each copy is `cache/trees/<tree digest>/`, whole or absent whatever moment a process dies:
//! it is written under a temporary name and renamed into place, and then `<digest>.whole` is
//! written; a copy is used only with its marker. Eviction removes the marker, renames the
//! copy out of the way and only then deletes it, so a valid name never holds a partial tree
//! (removing it in place did: a kill mid-removal left a few hundred of its thousands of
//! entries under the real name, and every later build from that base failed in its chroot).
//! A copy found without its marker is set aside and written again. Users hold
//! `<digest>.lock` shared while the copy is in use; eviction takes it exclusively without
//! waiting, so a copy in use is never removed. The least recently used copies beyond
//! [`KEEP`] are evicted whenever a new one is written; `gc` removes those of trees no image
//! has any more and anything set aside or partial.

use std::path::{Path, PathBuf};

use super::tree::Tree;
use super::{LockGuard, Store, lock, open_lock_file};

/// Materialized trees kept in the cache (a Debian base is about 150 MB).
pub const KEEP: usize = 2;

/// Overrides [`KEEP`]: a smaller cache on a small disk (and 1 in the tests, to force
/// evictions).
pub const KEEP_ENV: &str = "APPLIANCE_CACHED_TREES";

fn keep() -> usize {
    std::env::var(KEEP_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(KEEP)
}

const PARTIAL_PREFIX: &str = ".partial-";
/// Copies being deleted: renamed to this prefix first, so no valid name holds a partial tree.
const DISCARD_PREFIX: &str = ".discard-";

/// A materialized tree in use: it stays in the cache until this is dropped.
#[derive(Debug)]
pub struct MaterializedTree {
    path: PathBuf,
    _in_use: LockGuard,
    /// Whether this call wrote it (it was not cached).
    pub written: bool,
    /// Why a copy under the name was not used (not known to be whole), when one was found.
    pub replaced: Option<String>,
}

impl MaterializedTree {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Store {
    fn trees_dir(&self) -> PathBuf {
        self.root().join("cache/trees")
    }

    /// The tree with digest `digest`, materialized in the cache (written now if it is not).
    pub fn materialized(&self, tree: &Tree, digest: &str) -> anyhow::Result<MaterializedTree> {
        anyhow::ensure!(
            digest.bytes().all(|b| b.is_ascii_hexdigit()),
            "not a tree digest: {digest}"
        );
        let dir = self.trees_dir();
        fs_err::create_dir_all(&dir)?;
        let lock_path = dir.join(format!("{digest}.lock"));
        let in_use = lock(&lock_path, false)?;
        // The lock file's mtime is the copy's last use, for eviction.
        in_use.touch()?;
        let path = dir.join(digest);
        let marker = whole_marker(&dir, digest);
        let mut replaced = None;
        if path.is_dir() {
            if marker.is_file() {
                return Ok(MaterializedTree {
                    path,
                    _in_use: in_use,
                    written: false,
                    replaced: None,
                });
            }
            // Not known to be whole (a process died between its rename and its marker, or a
            // store from before markers): set it aside and write it again. Another build may
            // be writing the same copy: we hold the lock shared, as it does, and a rename of
            // a directory onto an existing one fails, so the worst case is writing it twice.
            self.discard(digest)?;
            replaced = Some(format!(
                "the cached materialized copy of {} was not known to be whole; writing it again",
                &digest[..12.min(digest.len())]
            ));
        }
        let partial = dir.join(format!("{PARTIAL_PREFIX}{digest}-{}", std::process::id()));
        if partial.exists() {
            fs_err::remove_dir_all(&partial)?;
        }
        let written = super::export::export_directory(tree, &self.objects(), &partial)
            .and_then(|_| Ok(fs_err::rename(&partial, &path)?))
            .and_then(|()| {
                // In place, not yet known to be whole: the next user writes it again.
                crate::test_hooks::point("materialized-renamed");
                write_marker(&marker)
            });
        if let Err(error) = written {
            std::fs::remove_dir_all(&partial).ok();
            // Another build may have put the same copy in place first.
            if !(path.is_dir() && marker.is_file()) {
                return Err(error);
            }
        }
        self.evict_materialized(keep())?;
        Ok(MaterializedTree {
            path,
            _in_use: in_use,
            written: true,
            replaced,
        })
    }

    /// Make the copy of `digest` invalid at once (marker first, then the name), then delete
    /// it. A kill at any point leaves a copy without marker or a `.discard-` directory for
    /// `gc`, never a partial tree under the digest's name.
    fn discard(&self, digest: &str) -> anyhow::Result<()> {
        let dir = self.trees_dir();
        match std::fs::remove_file(whole_marker(&dir, digest)) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(error.into()),
        }
        let aside = dir.join(format!(
            "{DISCARD_PREFIX}{digest}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        match std::fs::rename(dir.join(digest), &aside) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(error) => return Err(error.into()),
        }
        crate::test_hooks::point("materialized-discard-renamed");
        fs_err::remove_dir_all(&aside)?;
        Ok(())
    }

    /// Remove the least recently used copies beyond `keep`, those not in use.
    fn evict_materialized(&self, keep: usize) -> anyhow::Result<usize> {
        let mut copies: Vec<(std::time::SystemTime, String)> = self
            .materialized_digests()?
            .into_iter()
            .map(|digest| {
                let used = fs_err::metadata(self.trees_dir().join(format!("{digest}.lock")))
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH);
                (used, digest)
            })
            .collect();
        copies.sort_by(|a, b| b.cmp(a));
        let mut removed = 0;
        for (_, digest) in copies.into_iter().skip(keep) {
            removed += usize::from(self.remove_materialized(&digest)?);
        }
        Ok(removed)
    }

    fn materialized_digests(&self) -> anyhow::Result<Vec<String>> {
        let mut digests = Vec::new();
        // Only a missing cache is empty: an unreadable one is an error (fsck and gc would
        // otherwise report nothing wrong with what they cannot see).
        let entries = match std::fs::read_dir(self.trees_dir()) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(digests),
            Err(error) => {
                return Err(anyhow::Error::new(error)
                    .context(format!("reading {}", self.trees_dir().display())));
            }
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.file_type()?.is_dir() && !name.starts_with('.') {
                digests.push(name);
            }
        }
        Ok(digests)
    }

    /// Remove one copy unless a build is using it; true when removed.
    fn remove_materialized(&self, digest: &str) -> anyhow::Result<bool> {
        let lock_file = open_lock_file(&self.trees_dir().join(format!("{digest}.lock")))?;
        match lock_file.try_lock() {
            Ok(()) => {
                self.discard(digest)?;
                Ok(true)
            }
            Err(std::fs::TryLockError::WouldBlock) => Ok(false),
            Err(std::fs::TryLockError::Error(error)) => Err(error.into()),
        }
    }

    /// For `fsck`: the cached copies that no longer match their tree (`tree_of` gives the
    /// tree of a digest some image has; copies of other trees are `gc`'s business). With
    /// `repair` they are removed, and the next build writes them again.
    pub(super) fn check_materialized(
        &self,
        tree_of: impl Fn(&str) -> anyhow::Result<Option<Tree>>,
        repair: bool,
    ) -> anyhow::Result<Vec<String>> {
        let mut damaged = Vec::new();
        for digest in self.materialized_digests()? {
            let Some(tree) = tree_of(&digest)? else {
                continue;
            };
            if let Some(difference) = first_difference(&self.trees_dir().join(&digest), &tree)? {
                damaged.push(format!("{digest}: {difference}"));
                if repair {
                    self.remove_materialized(&digest)?;
                }
            }
        }
        Ok(damaged)
    }

    /// For `gc` (no build runs): remove partial copies and copies of trees no image has.
    pub(super) fn prune_materialized(
        &self,
        live_trees: &std::collections::BTreeSet<String>,
    ) -> anyhow::Result<usize> {
        let mut removed = 0;
        let entries = match std::fs::read_dir(self.trees_dir()) {
            Ok(entries) => Some(entries),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
            Err(error) => return Err(error.into()),
        };
        if let Some(entries) = entries {
            for entry in entries {
                let entry = entry?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(PARTIAL_PREFIX) || name.starts_with(DISCARD_PREFIX) {
                    fs_err::remove_dir_all(entry.path())?;
                    removed += 1;
                }
            }
        }
        for digest in self.materialized_digests()? {
            if !live_trees.contains(&digest) {
                removed += usize::from(self.remove_materialized(&digest)?);
            }
        }
        // A copy's lock file outlives the copy's eviction. With gc's exclusive lock no build
        // runs (each holds a lease), so none holds or waits on one of these.
        if let Ok(entries) = std::fs::read_dir(self.trees_dir()) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some(digest) = name.strip_suffix(".lock")
                    && !self.trees_dir().join(digest).exists()
                {
                    fs_err::remove_file(entry.path())?;
                }
            }
        }
        Ok(removed)
    }
}

/// `<digest>.whole`: written after the copy is in place, removed before it goes.
fn whole_marker(dir: &Path, digest: &str) -> PathBuf {
    dir.join(format!("{digest}.whole"))
}

fn write_marker(marker: &Path) -> anyhow::Result<()> {
    // Empty, so a torn write cannot make it say something else; its existence is the fact.
    fs_err::File::create(marker)?;
    Ok(())
}

/// Where the directory `root` differs from `tree`, if it does: every entry's kind, mode,
/// owner, mtime, xattrs, content, link target and device numbers, and nothing more on disk.
fn first_difference(root: &Path, tree: &Tree) -> anyhow::Result<Option<String>> {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};

    use sha2::{Digest as _, Sha256};

    use super::tree::EntryKind;

    let mut on_disk = 0usize;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for child in fs_err::read_dir(&dir)? {
            let child = child?;
            on_disk += 1;
            if child.file_type()?.is_dir() {
                stack.push(child.path());
            }
        }
    }
    // The tree counts its root; the walk does not.
    if on_disk + 1 != tree.len() {
        return Ok(Some(format!(
            "{on_disk} entries on disk, {} in the tree",
            tree.len() - 1
        )));
    }
    for (path, entry) in tree.entries() {
        let full = root.join(path);
        let shown = if path.is_empty() { "/" } else { path.as_str() };
        let Ok(meta) = fs_err::symlink_metadata(&full) else {
            return Ok(Some(format!("{shown} is missing")));
        };
        let file_type = meta.file_type();
        let kind_matches = match entry.kind {
            EntryKind::File | EntryKind::Hardlink => file_type.is_file(),
            EntryKind::Dir => file_type.is_dir(),
            EntryKind::Symlink => file_type.is_symlink(),
            EntryKind::CharDevice => file_type.is_char_device(),
            EntryKind::BlockDevice => file_type.is_block_device(),
            EntryKind::Fifo => file_type.is_fifo(),
            EntryKind::Socket => file_type.is_socket(),
        };
        if !kind_matches {
            return Ok(Some(format!("{shown} is not a {}", entry.kind.as_str())));
        }
        let symlink = entry.kind == EntryKind::Symlink;
        // Symlinks' modes are not kept by Linux, nor their mtimes by every export.
        if (!symlink && meta.mode() & 0o7777 != entry.mode)
            || (meta.uid(), meta.gid()) != (entry.uid, entry.gid)
            || (!symlink && meta.mtime() != entry.mtime)
        {
            return Ok(Some(format!("{shown} has other metadata")));
        }
        if super::import::read_xattrs(&full)? != entry.xattrs {
            return Ok(Some(format!("{shown} has other extended attributes")));
        }
        let same_content = match entry.kind {
            EntryKind::File | EntryKind::Hardlink => {
                meta.len() == entry.size && {
                    let mut hasher = Sha256::new();
                    std::io::copy(&mut fs_err::File::open(&full)?, &mut hasher)?;
                    entry.digest.as_deref() == Some(super::tree::hex(&hasher.finalize()).as_str())
                }
            }
            EntryKind::Symlink => {
                entry.link_target.as_deref().map(std::ffi::OsStr::new)
                    == Some(fs_err::read_link(&full)?.as_os_str())
            }
            EntryKind::CharDevice | EntryKind::BlockDevice => {
                entry.device
                    == Some((
                        rustix::fs::major(meta.rdev()),
                        rustix::fs::minor(meta.rdev()),
                    ))
            }
            _ => true,
        };
        if !same_content {
            return Ok(Some(format!("{shown} has other content")));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::import::{Limits, import_directory};

    fn stored_tree(store: &Store, content: &str) -> (Tree, String) {
        let source = tempfile::tempdir().expect("temp dir");
        fs_err::create_dir_all(source.path().join("etc")).expect("mkdir");
        fs_err::write(source.path().join("etc/name"), content).expect("write");
        let mut staging = store.staging().expect("staging");
        let tree = import_directory(source.path(), &mut staging, Limits::default())
            .expect("import")
            .tree;
        staging.commit().expect("commit");
        let digest = tree.digest();
        (tree, digest)
    }

    #[test]
    fn gc_removes_the_lock_files_of_evicted_copies_only() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("store")).expect("store");
        let trees = store.trees_dir();
        fs_err::create_dir_all(trees.join("kept")).expect("mkdir");
        fs_err::write(trees.join("kept.lock"), b"").expect("write");
        fs_err::write(trees.join("evicted.lock"), b"").expect("write");
        let live = std::collections::BTreeSet::from(["kept".to_owned()]);
        store.prune_materialized(&live).expect("prune");
        assert!(trees.join("kept.lock").exists());
        assert!(!trees.join("evicted.lock").exists());
    }

    #[test]
    fn copies_are_reused_and_evicted_least_recently_used_first_but_never_while_in_use() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("store");
        let trees: Vec<(Tree, String)> = ["one", "two", "three", "four"]
            .iter()
            .map(|content| stored_tree(&store, content))
            .collect();
        let materialize = |i: usize| store.materialized(&trees[i].0, &trees[i].1).expect("copy");

        let first = materialize(0);
        assert!(first.written);
        assert_eq!(
            fs_err::read_to_string(first.path().join("etc/name")).expect("read"),
            "one"
        );
        let first_path = first.path().to_path_buf();
        drop(materialize(1));
        // Three copies, two kept: the least recently used one is in use and stays.
        let third = materialize(2);
        assert!(first_path.is_dir());
        drop(first);
        drop(third);
        drop(materialize(3));
        let kept: Vec<bool> = trees
            .iter()
            .map(|(_, digest)| store.trees_dir().join(digest).is_dir())
            .collect();
        assert_eq!(kept, [false, false, true, true]);
        let again = materialize(2);
        assert!(!again.written, "a cached copy is reused");
        drop(again);

        // No image has these trees: gc removes the copies.
        let report = store.gc().expect("gc");
        assert_eq!(report.removed_cached_trees, 2);
        assert!(store.materialized_digests().expect("list").is_empty());
    }

    #[test]
    fn fsck_finds_a_cached_copy_that_no_longer_matches_its_tree_and_repair_removes_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("store")).expect("store");
        let source = dir.path().join("source");
        fs_err::create_dir_all(source.join("etc")).expect("mkdir");
        fs_err::write(source.join("etc/name"), "one").expect("write");
        std::os::unix::fs::symlink("name", source.join("etc/alias")).expect("symlink");
        let image = store
            .import("img", &source, None, serde_json::json!({}))
            .expect("import");
        let tree = store.tree(&image).expect("tree");
        let copy = store
            .materialized(&tree, &image.tree_digest)
            .expect("copy")
            .path()
            .to_path_buf();
        let report = store.fsck(false).expect("fsck");
        assert!(report.is_clean(), "{report:?}");

        // Same size, same mtime, other content: only reading it tells.
        let mtime = fs_err::metadata(copy.join("etc/name"))
            .and_then(|m| m.modified())
            .expect("mtime");
        std::fs::write(copy.join("etc/name"), "two").expect("tamper");
        fs_err::File::options()
            .write(true)
            .open(copy.join("etc/name"))
            .and_then(|f| f.set_modified(mtime))
            .expect("keep the mtime");
        let report = store.fsck(false).expect("fsck");
        assert_eq!(report.damaged_cached_trees.len(), 1, "{report:?}");
        assert!(report.damaged_cached_trees[0].contains("etc/name has other content"));
        assert!(!report.is_clean());
        assert!(copy.is_dir(), "a check without --repair changes nothing");

        let report = store.fsck(true).expect("fsck --repair");
        assert_eq!(report.damaged_cached_trees.len(), 1);
        assert!(!copy.exists());
        assert!(store.fsck(false).expect("fsck").is_clean());

        // An extra file is a difference too.
        let copy = store
            .materialized(&tree, &image.tree_digest)
            .expect("copy")
            .path()
            .to_path_buf();
        fs_err::write(copy.join("etc/extra"), "").expect("write");
        let report = store.fsck(false).expect("fsck");
        assert!(
            report.damaged_cached_trees[0].contains("entries on disk"),
            "{report:?}"
        );
    }

    /// What a kill during the old in-place eviction left: a few entries under the digest's
    /// name. Without its marker the copy is not used; it is set aside and written again.
    #[test]
    fn a_partial_copy_under_the_real_name_is_rewritten_not_used() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("store");
        let (tree, digest) = stored_tree(&store, "whole");
        let copy = store.materialized(&tree, &digest).expect("copy");
        assert!(copy.written && copy.replaced.is_none());
        let path = copy.path().to_path_buf();
        drop(copy);
        assert!(whole_marker(&store.trees_dir(), &digest).is_file());

        // Half removed, as a kill mid-`remove_dir_all` leaves it, marker gone first.
        fs_err::remove_file(path.join("etc/name")).expect("remove");
        fs_err::remove_file(whole_marker(&store.trees_dir(), &digest)).expect("unmark");
        let again = store.materialized(&tree, &digest).expect("copy");
        assert!(again.written, "written again");
        assert!(again.replaced.is_some(), "and said why");
        assert_eq!(
            fs_err::read_to_string(again.path().join("etc/name")).expect("read"),
            "whole"
        );
        drop(again);

        // A copy set aside by a discard that was killed before deleting it: gc removes it.
        let aside = store
            .trees_dir()
            .join(format!("{DISCARD_PREFIX}{digest}-1-2"));
        fs_err::create_dir_all(aside.join("etc")).expect("mkdir");
        store.gc().expect("gc");
        assert!(!aside.exists());
    }
}
