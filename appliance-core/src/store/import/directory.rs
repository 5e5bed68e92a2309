//! Directories on the host: an exported or scratch root read back (trusting the content of
//! files it vouches for), and an overlay's upper layer applied to its base tree.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

use super::{Builder, Imported, Limits, checked_link, read_xattrs};
use crate::dpkg::STATUS_PATH;
use crate::store::objects::Staging;
use crate::store::tree::{Entry, EntryKind, Tree, normalize_path};

/// Files of a directory whose content is already stored, by inode: what was materialized
/// from the store for work (an apt run). A file whose inode, size and change time are
/// unchanged has the recorded content and is not read again; anything that wrote to it (or
/// replaced it) changed its ctime or inode.
#[derive(Debug, Default)]
pub struct KnownContent {
    files: HashMap<(u64, u64), (u64, i64, i64, String)>,
}

impl KnownContent {
    /// Record the files of `tree` as materialized under `root`.
    pub fn record(root: &Path, tree: &Tree) -> anyhow::Result<Self> {
        let mut files = HashMap::new();
        for (path, entry) in tree.entries() {
            if entry.kind != EntryKind::File {
                continue;
            }
            let Some(digest) = &entry.digest else {
                continue;
            };
            let meta = fs_err::symlink_metadata(root.join(path))?;
            files.insert(
                (meta.dev(), meta.ino()),
                (meta.len(), meta.ctime(), meta.ctime_nsec(), digest.clone()),
            );
        }
        // File times come from a coarse clock (a jiffy, up to 10 ms): a write within the tick
        // of the recording would keep the recorded ctime. Wait the tick out, so that every
        // later write shows.
        std::thread::sleep(std::time::Duration::from_millis(20));
        Ok(Self { files })
    }

    fn digest_of(&self, meta: &std::fs::Metadata) -> Option<&str> {
        let (size, ctime, ctime_nsec, digest) = self.files.get(&(meta.dev(), meta.ino()))?;
        (*size == meta.len() && *ctime == meta.ctime() && *ctime_nsec == meta.ctime_nsec())
            .then_some(digest.as_str())
    }
}

/// Import a directory tree as it is on disk: lstat metadata, symlinks not followed, hard
/// links detected by inode, xattrs read where the filesystem has them.
pub fn import_directory(
    root: &Path,
    staging: &mut Staging,
    limits: Limits,
) -> anyhow::Result<Imported> {
    import_directory_with(root, staging, limits, None, false)
}

/// [`import_directory`], trusting `known` for the content of files it vouches for (their
/// objects are stored: they were materialized from them). With `scratch`, the directory is
/// work space on the store's filesystem that the caller discards: new content is moved into
/// the store instead of copied.
pub fn import_directory_with(
    root: &Path,
    staging: &mut Staging,
    limits: Limits,
    known: Option<&KnownContent>,
    scratch: bool,
) -> anyhow::Result<Imported> {
    let mut builder = Builder::new(staging, limits);
    let root_meta = fs_err::symlink_metadata(root)?;
    builder.add("", entry_from_metadata(root, &root_meta, EntryKind::Dir)?)?;
    let mut walk = DiskWalk {
        root,
        known,
        scratch,
        overlay: false,
        inodes: HashMap::new(),
    };
    let mut stack: Vec<PathBuf> = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        crate::process::interrupt::check()?;
        for (full, path, meta) in walk.children(&dir)? {
            if walk.add(&mut builder, &full, &path, &meta)? {
                stack.push(full);
            }
        }
    }
    Ok(builder.finish("directory"))
}

/// Apply the upper layer of an overlay mounted over `base` (materialized) to `base`: its
/// whiteouts (character devices 0:0) remove entries, its opaque directories (xattr
/// `trusted.overlay.opaque`) replace theirs, everything else is added or replaces the entry
/// at its path. overlayfs' own xattrs are not part of the result. The root keeps `base`'s
/// metadata. With `scratch`, `upper` is on the store's filesystem and discarded by the
/// caller: content is moved into the store rather than copied.
pub fn apply_overlay_upper(
    base: Tree,
    upper: &Path,
    staging: &mut Staging,
    limits: Limits,
    scratch: bool,
) -> anyhow::Result<Imported> {
    use std::os::unix::fs::FileTypeExt as _;
    let mut builder = Builder::new(staging, limits);
    builder.tree = base;
    let mut walk = DiskWalk {
        root: upper,
        known: None,
        scratch,
        overlay: true,
        inodes: HashMap::new(),
    };
    let mut stack: Vec<PathBuf> = vec![upper.to_path_buf()];
    while let Some(dir) = stack.pop() {
        crate::process::interrupt::check()?;
        for (full, path, meta) in walk.children(&dir)? {
            let file_type = meta.file_type();
            if file_type.is_char_device() && meta.rdev() == 0 {
                builder.tree.remove(&path);
                continue;
            }
            let existing = builder.tree.get(&path).map(|e| e.kind);
            if file_type.is_dir() {
                if existing.is_some_and(|kind| kind != EntryKind::Dir) {
                    builder.tree.remove(&path);
                }
                if is_opaque(&full)? {
                    builder.tree.clear_dir(&path);
                }
            } else if existing == Some(EntryKind::Dir) {
                builder.tree.remove(&path);
            }
            if walk.add(&mut builder, &full, &path, &meta)? {
                stack.push(full);
            }
        }
    }
    Ok(builder.finish("overlay"))
}

pub(super) fn is_opaque(dir: &Path) -> anyhow::Result<bool> {
    let mut value = [0u8; 8];
    match rustix::fs::lgetxattr(dir, "trusted.overlay.opaque", &mut value) {
        Ok(n) => Ok(&value[..n] == b"y"),
        Err(rustix::io::Errno::NODATA | rustix::io::Errno::OPNOTSUPP) => Ok(false),
        Err(e) => Err(e).with_context(|| format!("reading xattrs of {}", dir.display())),
    }
}

/// Walks a directory on disk into a [`Builder`]: lstat metadata, symlinks not followed, hard
/// links detected by inode, xattrs read where the filesystem has them.
struct DiskWalk<'a> {
    root: &'a Path,
    known: Option<&'a KnownContent>,
    scratch: bool,
    /// The directory is an overlay's upper layer: leave out overlayfs' xattrs.
    overlay: bool,
    inodes: HashMap<(u64, u64), String>,
}

impl DiskWalk<'_> {
    /// The children of `dir` in name order, with their tree paths and metadata.
    fn children(&self, dir: &Path) -> anyhow::Result<Vec<(PathBuf, String, std::fs::Metadata)>> {
        let mut children: Vec<_> = fs_err::read_dir(dir)?.collect::<Result<_, _>>()?;
        children.sort_by_key(|c| c.file_name());
        children
            .into_iter()
            .map(|child| {
                let full = child.path();
                let relative = full.strip_prefix(self.root).unwrap_or(&full);
                let Some(relative) = relative.to_str() else {
                    bail!("{} has a name that is not valid UTF-8", full.display());
                };
                let path = normalize_path(relative)?;
                let meta = fs_err::symlink_metadata(&full)?;
                Ok((full, path, meta))
            })
            .collect()
    }

    fn entry(
        &self,
        full: &Path,
        meta: &std::fs::Metadata,
        kind: EntryKind,
    ) -> anyhow::Result<Entry> {
        let mut entry = entry_from_metadata(full, meta, kind)?;
        if self.overlay {
            entry
                .xattrs
                .retain(|name, _| !name.starts_with("trusted.overlay."));
        }
        Ok(entry)
    }

    /// Add one entry; true when it is a directory to descend into.
    fn add(
        &mut self,
        builder: &mut Builder<'_>,
        full: &Path,
        path: &str,
        meta: &std::fs::Metadata,
    ) -> anyhow::Result<bool> {
        use std::os::unix::fs::FileTypeExt as _;
        let file_type = meta.file_type();
        let context = || format!("importing {}", full.display());
        if file_type.is_dir() {
            builder
                .add(path, self.entry(full, meta, EntryKind::Dir)?)
                .with_context(context)?;
            return Ok(true);
        }
        if file_type.is_file() {
            let key = (meta.dev(), meta.ino());
            if meta.nlink() > 1
                && let Some(first) = self.inodes.get(&key)
            {
                let mut entry = self.entry(full, meta, EntryKind::Hardlink)?;
                entry.link_target = Some(first.clone());
                builder.add(path, entry).with_context(context)?;
                return Ok(false);
            }
            let mut entry = self.entry(full, meta, EntryKind::File)?;
            match self.known.and_then(|k| k.digest_of(meta)) {
                Some(digest) if path != STATUS_PATH => {
                    entry.size = meta.len();
                    entry.digest = Some(digest.to_owned());
                    builder.add(path, entry).with_context(context)?;
                }
                // Hard-linked files stay: their other names are imported later.
                _ if self.scratch && path != STATUS_PATH && meta.nlink() == 1 => {
                    builder
                        .adopt_file(path, entry, full)
                        .with_context(context)?;
                }
                _ => {
                    let file = fs_err::File::open(full)?;
                    builder.add_file(path, entry, file).with_context(context)?;
                }
            }
            if meta.nlink() > 1 {
                self.inodes.insert(key, path.to_owned());
            }
        } else if file_type.is_symlink() {
            let mut entry = self.entry(full, meta, EntryKind::Symlink)?;
            let target = fs_err::read_link(full)?;
            let Some(target) = target.to_str() else {
                bail!("{}: symlink target is not valid UTF-8", full.display());
            };
            entry.link_target = Some(checked_link(target)?);
            builder.add(path, entry).with_context(context)?;
        } else {
            let kind = if file_type.is_char_device() {
                EntryKind::CharDevice
            } else if file_type.is_block_device() {
                EntryKind::BlockDevice
            } else if file_type.is_fifo() {
                EntryKind::Fifo
            } else {
                EntryKind::Socket
            };
            let mut entry = self.entry(full, meta, kind)?;
            if matches!(kind, EntryKind::CharDevice | EntryKind::BlockDevice) {
                let rdev = meta.rdev();
                entry.device = Some((rustix::fs::major(rdev), rustix::fs::minor(rdev)));
            }
            builder.add(path, entry).with_context(context)?;
        }
        Ok(false)
    }
}

pub(super) fn entry_from_metadata(
    path: &Path,
    meta: &std::fs::Metadata,
    kind: EntryKind,
) -> anyhow::Result<Entry> {
    Ok(Entry {
        kind,
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        size: 0,
        digest: None,
        link_target: None,
        device: None,
        xattrs: read_xattrs(path)?,
        mtime: meta.mtime(),
    })
}
