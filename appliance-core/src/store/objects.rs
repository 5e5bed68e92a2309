//! Content-addressed file objects: `objects/<2 hex>/<62 hex>`, named by the SHA-256 of their
//! content, each stored once across all images, read-only (0444).
//!
//! Writes are staged: content goes to a temp file in the staging directory of one import
//! while it is hashed; [`Staging::commit`] then flushes the filesystem (`syncfs`), renames the
//! new objects into place and flushes again. Only after that may the catalog row naming them
//! commit. A process killed at any point leaves a staging directory or unreferenced objects,
//! which `gc` removes; never a catalog row without its object, never a torn object under its
//! final name.
//!
//! Small content is hashed where it is read and written to its temp file by a second thread
//! ([`Writer`]): an import of thousands of files spends most of its time in the kernel
//! creating them, which then overlaps with decompressing and parsing the layer. Everything
//! that looks at staged files (`staged`, `commit`) waits for that thread first.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use fs_err::os::unix::fs::OpenOptionsExt as _;
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
    /// Staged content by digest (a map: an import of thousands of files asks it per file).
    pending: std::collections::HashMap<String, PathBuf>,
    counter: u64,
    /// Bytes of new (not previously stored) content.
    pub new_bytes: u64,
    /// The thread writing small content, started by the first such file.
    writer: Option<Writer>,
}

/// Content up to this size is read into memory and written by the [`Writer`]; larger
/// content streams to its temp file on the calling thread.
const BACKGROUND_WRITE_MAX: u64 = 1 << 20;
/// Files queued for the writer at most (so at most this many MiB held in memory).
const WRITER_QUEUE: usize = 32;

/// A thread that creates staged files from content already hashed; its first error is
/// returned by [`Writer::finish`].
#[derive(Debug)]
struct Writer {
    queue: std::sync::mpsc::SyncSender<(PathBuf, Vec<u8>)>,
    thread: std::thread::JoinHandle<anyhow::Result<()>>,
}

impl Writer {
    fn start() -> Self {
        let (queue, files) = std::sync::mpsc::sync_channel::<(PathBuf, Vec<u8>)>(WRITER_QUEUE);
        let thread = std::thread::spawn(move || {
            for (path, content) in files {
                write_staged(&path, &content)?;
            }
            Ok(())
        });
        Self { queue, thread }
    }

    /// Queue a file; an error when the thread has stopped (its own error says why).
    fn write(self, path: PathBuf, content: Vec<u8>) -> Result<Self, anyhow::Error> {
        match self.queue.send((path, content)) {
            Ok(()) => Ok(self),
            Err(_) => Err(self
                .finish()
                .err()
                .unwrap_or_else(|| anyhow::anyhow!("the staging writer stopped"))),
        }
    }

    /// Wait for every queued file to be written.
    fn finish(self) -> anyhow::Result<()> {
        drop(self.queue);
        self.thread
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the staging writer panicked")))
    }
}

/// A staged file, created read-only like the streamed ones.
fn write_staged(path: &Path, content: &[u8]) -> anyhow::Result<()> {
    let mut file = fs_err::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .open(path)?;
    file.write_all(content)?;
    Ok(())
}

impl Staging {
    pub fn new(dir: PathBuf, objects: Objects) -> anyhow::Result<Self> {
        fs_err::create_dir_all(&dir)?;
        Ok(Self {
            dir,
            objects,
            pending: Default::default(),
            counter: 0,
            new_bytes: 0,
            writer: None,
        })
    }

    /// Store content from a reader; returns its digest and size. Content already stored (or
    /// already staged by this import) is not written twice.
    pub fn add(&mut self, mut reader: impl Read) -> anyhow::Result<(String, u64)> {
        let mut head = Vec::new();
        (&mut reader)
            .take(BACKGROUND_WRITE_MAX + 1)
            .read_to_end(&mut head)
            .context("reading content")?;
        if head.len() as u64 > BACKGROUND_WRITE_MAX {
            return self.add_streamed(io::Cursor::new(head).chain(reader));
        }
        let size = head.len() as u64;
        let digest = hex(&Sha256::digest(&head));
        if !self.pending.contains_key(&digest) && !self.objects.has(&digest, size) {
            self.counter += 1;
            let temp = self.dir.join(self.counter.to_string());
            let writer = self.writer.take().unwrap_or_else(Writer::start);
            self.writer = Some(writer.write(temp.clone(), head)?);
            self.new_bytes += size;
            self.pending.insert(digest.clone(), temp);
        }
        Ok((digest, size))
    }

    /// [`Staging::add`] for large content: written to its temp file while it is hashed.
    fn add_streamed(&mut self, mut reader: impl Read) -> anyhow::Result<(String, u64)> {
        self.counter += 1;
        let temp = self.dir.join(self.counter.to_string());
        // Created read-only as objects are kept (the open descriptor still writes): no
        // chmod per object at commit.
        let mut file = fs_err::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o444)
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
        if self.pending.contains_key(&digest) || self.objects.has(&digest, size) {
            fs_err::remove_file(&temp)?;
        } else {
            self.new_bytes += size;
            self.pending.insert(digest.clone(), temp);
        }
        Ok((digest, size))
    }

    /// Wait for the writer thread's queued files; its error if one failed.
    fn finish_writes(&mut self) -> anyhow::Result<()> {
        match self.writer.take() {
            Some(writer) => writer.finish().context("writing staged content"),
            None => Ok(()),
        }
    }

    /// Content staged by this import and not yet committed, by digest (written out first).
    pub fn staged(&mut self, digest: &str) -> anyhow::Result<Option<&Path>> {
        self.finish_writes()?;
        Ok(self.pending.get(digest).map(PathBuf::as_path))
    }

    /// Stage the content of a file in a scratch directory on the store's filesystem by
    /// moving it rather than copying it (the caller discards the directory afterwards).
    pub fn adopt(&mut self, file: &Path) -> anyhow::Result<(String, u64)> {
        let mut reader = fs_err::File::open(file)?;
        let mut hasher = Sha256::new();
        let size = std::io::copy(&mut reader, &mut hasher).context("reading content")?;
        drop(reader);
        let digest = hex(&hasher.finalize());
        if !self.pending.contains_key(&digest) && !self.objects.has(&digest, size) {
            self.counter += 1;
            let temp = self.dir.join(self.counter.to_string());
            fs_err::rename(file, &temp)?;
            set_read_only(&temp)?;
            self.new_bytes += size;
            self.pending.insert(digest.clone(), temp);
        }
        Ok((digest, size))
    }

    /// Drop what was staged (the work failed); `gc` would remove it too.
    pub fn discard(mut self) {
        let _ = self.finish_writes();
        let _ = fs_err::remove_dir_all(&self.dir);
    }

    /// Where new content is staged: on the store's filesystem, so a tree materialized for
    /// work (an apt run) can live next to it.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Make every staged object durable under its final name. Call before committing the
    /// catalog rows that reference them.
    pub fn commit(mut self) -> anyhow::Result<()> {
        self.finish_writes()?;
        sync_filesystem(&self.dir)?;
        // Staged files are read-only already (created so, or set so when adopted).
        let mut fans = std::collections::HashSet::new();
        for (digest, temp) in &self.pending {
            let destination = self.objects.path(digest);
            if let Some(parent) = destination.parent()
                && fans.insert(parent.to_owned())
            {
                fs_err::create_dir_all(parent)?;
            }
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
        // The writer first, so no file appears after the directory is gone.
        let _ = self.finish_writes();
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn digest_of(content: &[u8]) -> String {
        hex(&Sha256::digest(content))
    }

    #[test]
    fn small_and_large_content_is_staged_once_and_committed_read_only() {
        let dir = tempfile::tempdir().expect("temp dir");
        let objects = Objects::new(dir.path().join("objects"));
        let mut staging =
            Staging::new(dir.path().join("staging"), objects.clone()).expect("staging");
        let large = vec![7u8; (BACKGROUND_WRITE_MAX + 5) as usize];
        let mut added = Vec::new();
        for index in 0..200u32 {
            let content = format!("file {}", index % 150).into_bytes();
            added.push((staging.add(&content[..]).expect("add"), content));
        }
        added.push((staging.add(&large[..]).expect("add large"), large.clone()));
        for ((digest, size), content) in &added {
            assert_eq!(digest, &digest_of(content));
            assert_eq!(*size, content.len() as u64);
        }
        // 150 distinct small contents and the large one; duplicates are counted once.
        let small_bytes: u64 = (0..150).map(|i| format!("file {i}").len() as u64).sum();
        assert_eq!(staging.new_bytes, small_bytes + large.len() as u64);
        let staged = staging
            .staged(&digest_of(b"file 7"))
            .expect("written out")
            .expect("staged")
            .to_owned();
        assert_eq!(fs_err::read(&staged).expect("read"), b"file 7");
        staging.commit().expect("commit");
        for ((digest, size), content) in &added {
            assert!(objects.has(digest, *size));
            assert_eq!(&objects.read(digest).expect("read"), content);
            let mode = fs_err::metadata(objects.path(digest))
                .expect("stat")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o444, "{digest}");
        }
        // Already stored: nothing staged again.
        let mut again = Staging::new(dir.path().join("again"), objects).expect("staging");
        again.add(&b"file 3"[..]).expect("add");
        assert_eq!(again.new_bytes, 0);
    }

    #[test]
    fn a_failed_background_write_fails_the_commit() {
        let dir = tempfile::tempdir().expect("temp dir");
        let objects = Objects::new(dir.path().join("objects"));
        let staging_dir = dir.path().join("staging");
        let mut staging = Staging::new(staging_dir.clone(), objects.clone()).expect("staging");
        // The directory gone under the writer: its file cannot be created.
        fs_err::remove_dir_all(&staging_dir).expect("rm");
        staging.add(&b"content"[..]).expect("queued");
        let error = staging.commit().expect_err("the write failed");
        assert!(
            format!("{error:#}").contains("writing staged content"),
            "{error:#}"
        );
        assert!(!objects.has(&digest_of(b"content"), 7));
    }
}
