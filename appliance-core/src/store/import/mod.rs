//! Importers: a directory, a tar archive (plain, gzip, zstd) or an OCI image layout becomes a
//! [`Tree`] plus staged objects. Nothing is ever created on the host at an entry's path: the
//! tree is data, file content goes to the object staging area under its digest.
//!
//! Everything read from outside is bounded (docs/HOSTILE.md 20–24): entry count, decompressed size
//! (absolute, and as a ratio to the compressed bytes read), zstd window, metadata members (in
//! the tar reader). By source: [`tar`], [`directory`] (and an overlay's upper layer), [`oci`]
//! layouts and layers, around the shared [`Builder`] and [`Limits`] here.

mod directory;
mod oci;
mod tar;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufReader, Read};
use std::path::Path;

use anyhow::{Context as _, bail};

use super::objects::Staging;
use super::tree::{Entry, EntryKind, Tree};
use crate::dpkg::STATUS_PATH;

pub use directory::{KnownContent, apply_overlay_upper, import_directory, import_directory_with};
pub use oci::{apply_oci_layers, blob_path, import_oci_layout};
use tar::{apply_tar, decompress};

/// More entries than this in one image is an attack, not a root filesystem (a full Debian
/// desktop has about 300,000).
pub const MAX_ENTRIES: usize = 2_000_000;
/// Largest total decompressed size of one archive.
pub const MAX_DECOMPRESSED_BYTES: u64 = 64 << 30;
/// Real root filesystems compress 2–6×; a stream expanding past this ratio (after a
/// 64 MiB allowance) is a decompression bomb.
pub const MAX_COMPRESSION_RATIO: u64 = 100;
/// zstd frames may ask for a window up to 2^31 bytes; we allow 2^27 (128 MiB), the
/// reference encoder's maximum for levels up to 19 (docs/HOSTILE.md 21).
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

fn checked_link(target: &str) -> anyhow::Result<String> {
    if target.is_empty() {
        bail!("symlink has an empty target");
    }
    if target.contains('\0') || target.len() > crate::manifest::grammar::MAX_PATH_LEN {
        bail!("symlink target is not a valid path");
    }
    Ok(target.to_owned())
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

#[cfg(test)]
mod tests {
    use sha2::{Digest as _, Sha256};

    use super::*;
    use crate::store::objects::Objects;
    use crate::store::tree::hex;

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
