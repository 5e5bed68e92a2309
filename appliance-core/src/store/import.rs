//! Importers: a directory, a tar archive (plain, gzip, zstd) or an OCI image layout becomes a
//! [`Tree`] plus staged objects. Nothing is ever created on the host at an entry's path: the
//! tree is data, file content goes to the object staging area under its digest.
//!
//! Everything read from outside is bounded (HOSTILE.md 20–24): entry count, decompressed size
//! (absolute, and as a ratio to the compressed bytes read), zstd window, metadata members (in
//! the tar reader).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use sha2::{Digest as _, Sha256};

use super::objects::Staging;
use super::tar_reader::{TarKind, TarReader};
use super::tree::{Entry, EntryKind, Tree, hex, normalize_path};
use crate::dpkg::STATUS_PATH;
use crate::oci_json::{Descriptor, ImageIndex, ImageManifest};

/// More entries than this in one image is an attack, not a root filesystem (a full Debian
/// desktop has about 300,000).
pub const MAX_ENTRIES: usize = 2_000_000;
/// Largest total decompressed size of one archive.
pub const MAX_DECOMPRESSED_BYTES: u64 = 64 << 30;
/// Real root filesystems compress 2–6×; a stream expanding past this ratio (after a
/// 64 MiB allowance) is a decompression bomb.
pub const MAX_COMPRESSION_RATIO: u64 = 100;
/// zstd frames may ask for a window up to 2^31 bytes; we allow 2^27 (128 MiB), the
/// reference encoder's maximum for levels up to 19 (HOSTILE.md 21).
pub const ZSTD_WINDOW_LOG_MAX: u32 = 27;

/// Bounds for one import; [`Limits::default`] holds the documented constants. Tests lower
/// them to exercise the checks without generating millions of entries.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_entries: usize,
    pub max_decompressed_bytes: u64,
    pub max_compression_ratio: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_entries: MAX_ENTRIES,
            max_decompressed_bytes: MAX_DECOMPRESSED_BYTES,
            max_compression_ratio: MAX_COMPRESSION_RATIO,
        }
    }
}

/// What an importer produced.
#[derive(Debug)]
pub struct Imported {
    pub tree: Tree,
    /// Content of the image's dpkg status file, when it has one.
    pub dpkg_status: Option<Vec<u8>>,
    pub format: &'static str,
}

/// Builds a tree, remembering the dpkg status content as it streams past.
struct Builder<'a> {
    tree: Tree,
    staging: &'a mut Staging,
    status_by_digest: HashMap<String, Vec<u8>>,
    limits: Limits,
}

impl<'a> Builder<'a> {
    fn new(staging: &'a mut Staging, limits: Limits) -> Self {
        Self {
            tree: Tree::new(),
            staging,
            status_by_digest: HashMap::new(),
            limits,
        }
    }

    fn check_count(&self) -> anyhow::Result<()> {
        if self.tree.len() > self.limits.max_entries {
            bail!(
                "the image has more than {} entries",
                self.limits.max_entries
            );
        }
        Ok(())
    }

    fn add_file(&mut self, path: &str, mut entry: Entry, content: impl Read) -> anyhow::Result<()> {
        let landed_preview = self.tree.resolve(path, true)?;
        let mut status_copy = None;
        let (digest, size) = if landed_preview == STATUS_PATH {
            let mut data = Vec::new();
            content
                .take(super::tar_reader::MAX_METADATA_BYTES * 64)
                .read_to_end(&mut data)
                .with_context(|| format!("reading {path}"))?;
            let stored = self.staging.add(&data[..])?;
            status_copy = Some(data);
            stored
        } else {
            self.staging
                .add(content)
                .with_context(|| format!("storing {path}"))?
        };
        if let Some(data) = status_copy {
            self.status_by_digest.insert(digest.clone(), data);
        }
        entry.kind = EntryKind::File;
        entry.size = size;
        entry.digest = Some(digest);
        self.tree.insert(path, entry)?;
        self.check_count()
    }

    /// [`Builder::add_file`] for a file of a scratch directory: moved into the staging area.
    fn adopt_file(&mut self, path: &str, mut entry: Entry, file: &Path) -> anyhow::Result<()> {
        let (digest, size) = self
            .staging
            .adopt(file)
            .with_context(|| format!("storing {path}"))?;
        entry.kind = EntryKind::File;
        entry.size = size;
        entry.digest = Some(digest);
        self.tree.insert(path, entry)?;
        self.check_count()
    }

    fn add(&mut self, path: &str, entry: Entry) -> anyhow::Result<()> {
        self.tree.insert(path, entry)?;
        self.check_count()
    }

    fn finish(mut self, format: &'static str) -> Imported {
        self.tree.canonicalize_hardlinks();
        let dpkg_status = self
            .tree
            .get(STATUS_PATH)
            .filter(|e| e.kind == EntryKind::File)
            .and_then(|e| e.digest.as_ref())
            .and_then(|digest| self.status_by_digest.remove(digest));
        Imported {
            tree: self.tree,
            dpkg_status,
            format,
        }
    }
}

/// Import any supported source, chosen by what `path` is.
pub fn import_path(path: &Path, staging: &mut Staging, limits: Limits) -> anyhow::Result<Imported> {
    let meta = fs_err::metadata(path)?;
    if meta.is_dir() {
        if path.join("oci-layout").is_file() && path.join("index.json").is_file() {
            return import_oci_layout(path, staging, limits);
        }
        return import_directory(path, staging, limits);
    }
    let file = fs_err::File::open(path)?.into_parts().0;
    let (reader, format) = decompress(BufReader::new(file), limits)?;
    let mut builder = Builder::new(staging, limits);
    apply_tar(&mut builder, reader, false)?;
    Ok(builder.finish(format))
}

/// Detect compression by magic bytes and wrap the stream with the bounds above.
fn decompress<R: io::BufRead + 'static>(
    mut reader: R,
    limits: Limits,
) -> anyhow::Result<(Box<dyn Read>, &'static str)> {
    let magic = reader.fill_buf().context("reading the archive")?.to_vec();
    let counted = CountingReader::new(reader);
    let compressed = counted.count.clone();
    let (inner, format): (Box<dyn Read>, &'static str) = if magic.starts_with(&[0x1f, 0x8b]) {
        (
            Box::new(flate2::read::MultiGzDecoder::new(counted)),
            "tar.gz",
        )
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let mut decoder = zstd::stream::read::Decoder::with_buffer(BufReader::new(counted))?;
        decoder.window_log_max(ZSTD_WINDOW_LOG_MAX)?;
        (Box::new(decoder), "tar.zst")
    } else {
        return Ok((Box::new(counted), "tar"));
    };
    Ok((
        Box::new(BoundedReader {
            inner,
            read: 0,
            compressed,
            limits,
        }),
        format,
    ))
}

#[derive(Clone, Default)]
struct SharedCount(std::rc::Rc<std::cell::Cell<u64>>);

struct CountingReader<R> {
    inner: R,
    count: SharedCount,
}

impl<R> CountingReader<R> {
    fn new(inner: R) -> Self {
        Self {
            inner,
            count: SharedCount::default(),
        }
    }
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.0.set(self.count.0.get() + n as u64);
        Ok(n)
    }
}

/// Stops a decompressed stream at the absolute limit or at the compression-ratio limit.
struct BoundedReader {
    inner: Box<dyn Read>,
    read: u64,
    compressed: SharedCount,
    limits: Limits,
}

impl Read for BoundedReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        let allowed = (self
            .compressed
            .0
            .get()
            .saturating_mul(self.limits.max_compression_ratio)
            + (64 << 20))
            .min(self.limits.max_decompressed_bytes);
        if self.read > allowed {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "decompressed size passed {} bytes from {} compressed bytes: refusing a likely decompression bomb",
                    self.read,
                    self.compressed.0.get()
                ),
            ));
        }
        Ok(n)
    }
}

/// Apply a tar stream to the tree. With `whiteouts`, OCI whiteout files remove entries.
fn apply_tar(builder: &mut Builder<'_>, reader: impl Read, whiteouts: bool) -> anyhow::Result<()> {
    let mut tar = TarReader::new(reader);
    while let Some(header) = tar.next_header()? {
        crate::process::interrupt::check()?;
        let path = normalize_path(&header.path)?;
        if whiteouts {
            let (parent, name) = path.rsplit_once('/').unwrap_or(("", path.as_str()));
            if name == ".wh..wh..opq" {
                let dir = builder.tree.resolve(&format!("{parent}/x"), false).ok();
                if let Some(dir) = dir {
                    let dir = dir
                        .rsplit_once('/')
                        .map_or(String::new(), |(d, _)| d.to_owned());
                    builder.tree.clear_dir(&dir);
                }
                continue;
            }
            if let Some(hidden) = name.strip_prefix(".wh.") {
                let target = if parent.is_empty() {
                    hidden.to_owned()
                } else {
                    format!("{parent}/{hidden}")
                };
                if let Ok(resolved) = builder.tree.resolve(&target, false) {
                    builder.tree.remove(&resolved);
                }
                continue;
            }
        }
        let entry = Entry {
            kind: EntryKind::Dir,
            mode: header.mode,
            uid: header.uid,
            gid: header.gid,
            size: 0,
            digest: None,
            link_target: None,
            device: None,
            xattrs: header.xattrs.clone(),
            mtime: header.mtime,
        };
        let context = || format!("importing entry `{}`", header.path.escape_debug());
        match header.kind {
            TarKind::File => {
                let size = header.size;
                builder
                    .add_file(&path, entry, tar.data(size))
                    .with_context(context)?;
            }
            TarKind::Dir => builder.add(&path, entry).with_context(context)?,
            TarKind::Symlink => builder
                .add(
                    &path,
                    Entry {
                        kind: EntryKind::Symlink,
                        link_target: Some(checked_link(&header.link_target).with_context(context)?),
                        ..entry
                    },
                )
                .with_context(context)?,
            TarKind::Hardlink => builder
                .add(
                    &path,
                    Entry {
                        kind: EntryKind::Hardlink,
                        link_target: Some(header.link_target.clone()),
                        ..entry
                    },
                )
                .with_context(context)?,
            TarKind::CharDev | TarKind::BlockDev | TarKind::Fifo => {
                let kind = match header.kind {
                    TarKind::CharDev => EntryKind::CharDevice,
                    TarKind::BlockDev => EntryKind::BlockDevice,
                    _ => EntryKind::Fifo,
                };
                let device =
                    (kind != EntryKind::Fifo).then_some((header.dev_major, header.dev_minor));
                builder
                    .add(
                        &path,
                        Entry {
                            kind,
                            device,
                            ..entry
                        },
                    )
                    .with_context(context)?;
            }
        }
    }
    Ok(())
}

fn checked_link(target: &str) -> anyhow::Result<String> {
    if target.is_empty() {
        bail!("symlink has an empty target");
    }
    if target.contains('\0') || target.len() > crate::manifest::grammar::MAX_PATH_LEN {
        bail!("symlink target is not a valid path");
    }
    Ok(target.to_owned())
}

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

fn is_opaque(dir: &Path) -> anyhow::Result<bool> {
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

fn entry_from_metadata(
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

pub(super) fn read_xattrs(path: &Path) -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
    let mut xattrs = BTreeMap::new();
    let mut names = vec![0u8; 4096];
    let len = match rustix::fs::llistxattr(path, &mut names) {
        Ok(len) => len,
        // Filesystems without xattr support (and kernels without it) have none to keep.
        Err(rustix::io::Errno::OPNOTSUPP) => return Ok(xattrs),
        Err(rustix::io::Errno::RANGE) => {
            bail!("{}: extended attribute list too large", path.display())
        }
        Err(e) => return Err(e).with_context(|| format!("listing xattrs of {}", path.display())),
    };
    for name in names[..len].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let Ok(name) = std::str::from_utf8(name) else {
            continue;
        };
        let mut value = vec![0u8; 64 * 1024];
        match rustix::fs::lgetxattr(path, name, &mut value) {
            Ok(n) => {
                value.truncate(n);
                xattrs.insert(name.to_owned(), value);
            }
            Err(rustix::io::Errno::NODATA) => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("reading xattr {name} of {}", path.display()));
            }
        }
    }
    Ok(xattrs)
}

/// Import an OCI image layout: the image of `index.json`'s manifest for linux/amd64 (or its
/// only manifest), layers applied in order with whiteouts. Every blob is checked against its
/// descriptor's size and digest before its content counts (HOSTILE.md 19).
pub fn import_oci_layout(
    layout: &Path,
    staging: &mut Staging,
    limits: Limits,
) -> anyhow::Result<Imported> {
    let index: ImageIndex =
        serde_json::from_slice(&read_blob_file(&layout.join("index.json"), 1 << 20)?)
            .context("parsing index.json")?;
    let manifest_descriptor = pick_manifest(layout, &index)?;
    let manifest_bytes = read_verified_blob(layout, &manifest_descriptor, 4 << 20)?;
    let manifest: ImageManifest =
        serde_json::from_slice(&manifest_bytes).context("parsing the image manifest")?;
    if manifest.manifests.is_some() && manifest.layers.is_some() {
        bail!(
            "the image manifest has both `manifests` and `layers`; refusing an ambiguous document"
        );
    }
    let layers = manifest
        .layers
        .context("the image manifest has no `layers`")?;
    apply_oci_layers(&layout.join("blobs/sha256"), &layers, None, staging, limits)
}

/// Apply the layer blobs `layers` (manifest descriptors, blobs as `<blobs>/<hex>`) in order
/// onto `base` (or an empty tree). Every blob is checked against its descriptor's size and
/// digest before its content counts.
pub fn apply_oci_layers(
    blobs: &Path,
    layers: &[Descriptor],
    base: Option<Tree>,
    staging: &mut Staging,
    limits: Limits,
) -> anyhow::Result<Imported> {
    let mut builder = Builder::new(staging, limits);
    if let Some(base) = base {
        builder.tree = base;
    }
    for layer in layers {
        crate::process::interrupt::check()?;
        let (digest, size) = (layer.digest.clone(), layer.size);
        let blob = blob_path(blobs, &digest)?;
        let file = fs_err::File::open(&blob)?.into_parts().0;
        anyhow::ensure!(
            file.metadata()?.len() == size,
            "layer {digest}: the blob's size differs from its descriptor ({size} bytes)"
        );
        let hashing = HashingReader {
            inner: file,
            hasher: Sha256::new(),
        };
        let hashed = std::rc::Rc::new(std::cell::RefCell::new(hashing));
        let (reader, _) = decompress(BufReader::new(SharedReader(hashed.clone())), limits)?;
        apply_tar(&mut builder, reader, true)
            .with_context(|| format!("applying layer {digest}"))?;
        // Drain what the tar reader left (end-of-archive padding) so the hash covers the blob.
        io::copy(&mut SharedReader(hashed.clone()), &mut io::sink())?;
        let actual = format!(
            "sha256:{}",
            hex(&hashed.borrow_mut().hasher.clone().finalize())
        );
        anyhow::ensure!(
            actual == digest,
            "layer {digest}: its content hashes to {actual}"
        );
    }
    Ok(builder.finish("oci"))
}

struct HashingReader {
    inner: File,
    hasher: Sha256,
}

struct SharedReader(std::rc::Rc<std::cell::RefCell<HashingReader>>);

impl Read for SharedReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut inner = self.0.borrow_mut();
        let n = inner.inner.read(buf)?;
        inner.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// `<blobs>/<hex>` for a `sha256:<hex>` digest, refusing anything else.
fn blob_path(blobs: &Path, digest: &str) -> anyhow::Result<PathBuf> {
    let hex_part = digest
        .strip_prefix("sha256:")
        .with_context(|| format!("unsupported digest algorithm in {digest}"))?;
    anyhow::ensure!(
        hex_part.len() == 64
            && hex_part
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
        "malformed digest {digest}"
    );
    Ok(blobs.join(hex_part))
}

fn read_blob_file(path: &Path, limit: u64) -> anyhow::Result<Vec<u8>> {
    let mut data = Vec::new();
    fs_err::File::open(path)?
        .take(limit + 1)
        .read_to_end(&mut data)?;
    anyhow::ensure!(
        data.len() as u64 <= limit,
        "{} is larger than {limit} bytes",
        path.display()
    );
    Ok(data)
}

fn read_verified_blob(
    layout: &Path,
    descriptor: &Descriptor,
    limit: u64,
) -> anyhow::Result<Vec<u8>> {
    let (digest, size) = (&descriptor.digest, descriptor.size);
    anyhow::ensure!(
        size <= limit,
        "blob {digest} claims {size} bytes, more than {limit}"
    );
    let data = read_blob_file(&blob_path(&layout.join("blobs/sha256"), digest)?, limit)?;
    anyhow::ensure!(
        data.len() as u64 == size,
        "blob {digest} is {} bytes, its descriptor says {size}",
        data.len()
    );
    let actual = format!("sha256:{}", hex(&Sha256::digest(&data)));
    anyhow::ensure!(&actual == digest, "blob {digest} hashes to {actual}");
    Ok(data)
}

fn pick_manifest(layout: &Path, index: &ImageIndex) -> anyhow::Result<Descriptor> {
    if index.layers.is_some() {
        bail!("index.json has `layers`; refusing an ambiguous document");
    }
    let manifests = index
        .manifests
        .as_deref()
        .context("index.json has no `manifests`")?;
    if manifests.is_empty() {
        bail!("index.json lists no manifests");
    }
    let chosen = index
        .pick(false)
        .cloned()
        .context("index.json has several manifests and none for linux/amd64")?;
    // A nested index: follow it once.
    if chosen.media_type == crate::oci_json::MEDIA_TYPE_INDEX {
        let nested: ImageIndex =
            serde_json::from_slice(&read_verified_blob(layout, &chosen, 4 << 20)?)?;
        return nested
            .pick(true)
            .cloned()
            .context("nested index lists no manifests");
    }
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::objects::Objects;

    #[test]
    fn known_content_is_trusted_only_while_the_file_is_untouched() {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().join("root");
        fs_err::create_dir_all(&root).expect("mkdir");
        fs_err::write(root.join("kept"), "one").expect("write");
        fs_err::write(root.join("edited"), "two").expect("write");
        fs_err::write(root.join("replaced"), "six").expect("write");
        let objects = Objects::new(dir.path().join("objects"));
        let mut staging = Staging::new(dir.path().join("s1"), objects.clone()).expect("staging");
        let first = import_directory(&root, &mut staging, Limits::default()).expect("import");
        let known = KnownContent::record(&root, &first.tree).expect("record");
        // Same size, same inode, new content; and a new inode under an old name.
        fs_err::write(root.join("edited"), "TWO").expect("write");
        fs_err::write(root.join("new"), "SIX").expect("write");
        fs_err::rename(root.join("new"), root.join("replaced")).expect("rename");
        let mut staging = Staging::new(dir.path().join("s2"), objects).expect("staging");
        let second =
            import_directory_with(&root, &mut staging, Limits::default(), Some(&known), false)
                .expect("import");
        let digest = |imported: &Imported, path: &str| {
            imported
                .tree
                .get(path)
                .and_then(|e| e.digest.clone())
                .expect("digest")
        };
        let sha = |text: &str| hex(&Sha256::digest(text.as_bytes()));
        assert_eq!(digest(&second, "kept"), digest(&first, "kept"));
        assert_eq!(digest(&second, "edited"), sha("TWO"));
        assert_eq!(digest(&second, "replaced"), sha("SIX"));
    }

    #[test]
    fn a_scratch_directory_gives_the_same_tree_and_its_new_files_move_into_the_store() {
        let dir = tempfile::tempdir().expect("temp dir");
        let make = |root: &Path| {
            fs_err::create_dir_all(root.join("etc")).expect("mkdir");
            fs_err::write(root.join("etc/one"), "one").expect("write");
            fs_err::write(root.join("etc/same"), "one").expect("write");
            fs_err::write(root.join("linked"), "shared").expect("write");
            fs_err::hard_link(root.join("linked"), root.join("etc/linked")).expect("link");
        };
        let (copied, moved) = (dir.path().join("copied"), dir.path().join("moved"));
        make(&copied);
        make(&moved);
        let objects = Objects::new(dir.path().join("objects"));
        let mut staging = Staging::new(dir.path().join("s1"), objects.clone()).expect("staging");
        let reference = import_directory(&copied, &mut staging, Limits::default()).expect("import");
        staging.discard();
        let mut staging = Staging::new(dir.path().join("s2"), objects.clone()).expect("staging");
        let adopted = import_directory_with(&moved, &mut staging, Limits::default(), None, true)
            .expect("import");
        staging.commit().expect("commit");
        assert_eq!(adopted.tree.digest(), reference.tree.digest());
        // The new file moved (once: its duplicate stayed); the hard-linked one was copied.
        assert!(!moved.join("etc/one").exists() || !moved.join("etc/same").exists());
        assert!(moved.join("linked").exists() && moved.join("etc/linked").exists());
        for (path, text) in [("etc/one", "one"), ("linked", "shared")] {
            let digest = adopted
                .tree
                .get(path)
                .and_then(|e| e.digest.clone())
                .expect("digest");
            assert_eq!(objects.read(&digest).expect("object"), text.as_bytes());
        }
    }
}
