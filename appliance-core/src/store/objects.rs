//! Content-addressed file objects: `objects/<2 hex>/<62 hex>`, named by the SHA-256 of their
//! content, each stored once across all images, read-only (0444).
//!
//! Writes are staged: content goes to a temp file in the staging directory of one import
//! while it is hashed; [`Staging::commit`] then flushes the filesystem (`syncfs`), renames the
//! new objects into place and flushes again. Only after that may the catalog row naming them
//! commit. A process killed at any point leaves a staging directory or unreferenced objects,
//! which `gc` removes; never a catalog row without its object, never a torn object under its
//! final name.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use sha2::{Digest as _, Sha256};

use super::tree::hex;

#[derive(Debug, Clone)]
pub struct Objects {
    root: PathBuf,
}

impl Objects {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    pub fn path(&self, digest: &str) -> PathBuf {
        let (fan, rest) = digest.split_at(2.min(digest.len()));
        self.root.join(fan).join(rest)
    }

    /// Whether an object is present with the expected size (a cheap check; `fsck` verifies content).
    pub fn has(&self, digest: &str, size: u64) -> bool {
        std::fs::metadata(self.path(digest)).is_ok_and(|m| m.is_file() && m.len() == size)
    }

    /// Open an object for reading; the reader verifies the digest at EOF. It is buffered
    /// up to [`READ_CHUNK`]: `io::copy` from it moves whole chunks, where an unbuffered
    /// reader went through a stack buffer in 8 KiB reads and writes.
    pub fn open(&self, digest: &str) -> anyhow::Result<ObjectReader> {
        let path = self.path(digest);
        let file = fs_err::File::open(&path)
            .with_context(|| {
                format!(
                    "opening object {digest} (`cargo appliance fsck --repair` marks the images that need it, which builds then pass over)"
                )
            })?
            .into_parts()
            .0;
        let size = file.metadata().map_or(0, |m| m.len());
        let capacity = usize::try_from(size.clamp(4096, READ_CHUNK as u64)).unwrap_or(READ_CHUNK);
        Ok(io::BufReader::with_capacity(
            capacity,
            VerifyingReader {
                inner: file,
                hasher: Sha256::new(),
                expected: digest.to_owned(),
            },
        ))
    }

    /// Read a whole object, verified.
    pub fn read(&self, digest: &str) -> anyhow::Result<Vec<u8>> {
        let mut data = Vec::new();
        self.open(digest)?
            .read_to_end(&mut data)
            .with_context(|| format!("reading object {digest}"))?;
        Ok(data)
    }

    /// Every object file under the store (for gc and fsck), as (digest, path).
    pub fn list(&self) -> anyhow::Result<Vec<(String, PathBuf)>> {
        let mut found = Vec::new();
        // Only a missing directory is empty: gc and fsck must not go silent on EACCES.
        let fans = match std::fs::read_dir(&self.root) {
            Ok(fans) => fans,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(found),
            Err(error) => {
                return Err(
                    anyhow::Error::new(error).context(format!("listing {}", self.root.display()))
                );
            }
        };
        for fan in fans {
            let fan = fan.with_context(|| format!("listing {}", self.root.display()))?;
            let fan_name = fan.file_name().to_string_lossy().into_owned();
            if fan_name.len() != 2 || !fan.path().is_dir() {
                continue;
            }
            for object in fs_err::read_dir(fan.path())? {
                let object = object?;
                let name = object.file_name().to_string_lossy().into_owned();
                found.push((format!("{fan_name}{name}"), object.path()));
            }
        }
        found.sort();
        Ok(found)
    }
}

/// A stored object being read, verified at EOF.
pub type ObjectReader = io::BufReader<VerifyingReader<File>>;

/// Read size for objects: large enough that syscalls do not dominate, small enough to stay
/// in the allocator's heap for the many small files of a root filesystem.
pub const READ_CHUNK: usize = 256 * 1024;

/// A reader that hashes what it reads and fails at EOF when the content is not the object
/// it claims to be (docs/HOSTILE.md item 31: a flipped bit fails the read, the build fails closed).
#[derive(Debug)]
pub struct VerifyingReader<R> {
    inner: R,
    hasher: Sha256,
    expected: String,
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 {
            let actual = hex(&std::mem::take(&mut self.hasher).finalize());
            if actual != self.expected {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "object {} is corrupt: its content hashes to {actual} (`cargo appliance fsck --repair` sets it aside and marks the images that need it, which builds then pass over)",
                        self.expected
                    ),
                ));
            }
            // Reset so repeated EOF reads keep failing or succeeding the same way.
            self.hasher = Sha256::new();
            self.expected = hex(&Sha256::new().finalize());
        } else {
            self.hasher.update(&buf[..n]);
        }
        Ok(n)
    }
}

/// New objects of one import, staged until the import commits.
#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
    objects: Objects,
    pending: Vec<(String, PathBuf)>,
    counter: u64,
    /// Bytes of new (not previously stored) content.
    pub new_bytes: u64,
}

impl Staging {
    pub fn new(dir: PathBuf, objects: Objects) -> anyhow::Result<Self> {
        fs_err::create_dir_all(&dir)?;
        Ok(Self {
            dir,
            objects,
            pending: Vec::new(),
            counter: 0,
            new_bytes: 0,
        })
    }

    /// Store content from a reader; returns its digest and size. Content already stored (or
    /// already staged by this import) is not written twice.
    pub fn add(&mut self, mut reader: impl Read) -> anyhow::Result<(String, u64)> {
        self.counter += 1;
        let temp = self.dir.join(self.counter.to_string());
        let mut file = fs_err::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)?;
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; 128 * 1024];
        let mut size = 0u64;
        loop {
            let n = reader.read(&mut buffer).context("reading content")?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
            file.write_all(&buffer[..n])?;
            size += n as u64;
        }
        drop(file);
        let digest = hex(&hasher.finalize());
        let already_staged = self.pending.iter().any(|(d, _)| d == &digest);
        if already_staged || self.objects.has(&digest, size) {
            fs_err::remove_file(&temp)?;
        } else {
            self.new_bytes += size;
            self.pending.push((digest.clone(), temp));
        }
        Ok((digest, size))
    }

    /// Content staged by this import and not yet committed, by digest.
    pub fn staged(&self, digest: &str) -> Option<&Path> {
        self.pending
            .iter()
            .find(|(d, _)| d == digest)
            .map(|(_, path)| path.as_path())
    }

    /// Stage the content of a file in a scratch directory on the store's filesystem by
    /// moving it rather than copying it (the caller discards the directory afterwards).
    pub fn adopt(&mut self, file: &Path) -> anyhow::Result<(String, u64)> {
        let mut reader = fs_err::File::open(file)?;
        let mut hasher = Sha256::new();
        let size = std::io::copy(&mut reader, &mut hasher).context("reading content")?;
        drop(reader);
        let digest = hex(&hasher.finalize());
        let already_staged = self.pending.iter().any(|(d, _)| d == &digest);
        if !already_staged && !self.objects.has(&digest, size) {
            self.counter += 1;
            let temp = self.dir.join(self.counter.to_string());
            fs_err::rename(file, &temp)?;
            self.new_bytes += size;
            self.pending.push((digest.clone(), temp));
        }
        Ok((digest, size))
    }

    /// Drop what was staged (the work failed); `gc` would remove it too.
    pub fn discard(self) {
        let _ = fs_err::remove_dir_all(&self.dir);
    }

    /// Where new content is staged: on the store's filesystem, so a tree materialized for
    /// work (an apt run) can live next to it.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Make every staged object durable under its final name. Call before committing the
    /// catalog rows that reference them.
    pub fn commit(self) -> anyhow::Result<()> {
        sync_filesystem(&self.dir)?;
        for (digest, temp) in &self.pending {
            let destination = self.objects.path(digest);
            if let Some(parent) = destination.parent() {
                fs_err::create_dir_all(parent)?;
            }
            set_read_only(temp)?;
            fs_err::rename(temp, &destination)?;
        }
        sync_filesystem(&self.dir)?;
        fs_err::remove_dir_all(&self.dir)?;
        Ok(())
    }
}

/// Work that fails or is interrupted leaves no staging directory for `gc` to find: its
/// objects and scratch directories (a copied root for apt) go with it.
impl Drop for Staging {
    fn drop(&mut self) {
        // Gone already after commit or discard; what a failure leaves, gc removes.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn set_read_only(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs_err::set_permissions(path, std::fs::Permissions::from_mode(0o444))?;
    Ok(())
}

/// `syncfs(2)` on the filesystem holding `path`: one flush for thousands of objects, where
/// an fsync per file would cost a disk round trip each.
pub fn sync_filesystem(path: &Path) -> anyhow::Result<()> {
    let dir = fs_err::File::open(path)?;
    rustix::fs::syncfs(&dir)
        .with_context(|| format!("syncing the filesystem of {}", path.display()))?;
    Ok(())
}
