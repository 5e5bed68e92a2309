//! A test drive's root filesystem read as a tree, without mounting anything: the root
//! partition found in the disk's GPT (the Discoverable Partitions type the disk output
//! writes), its ext4 read by `ext4-view` (which replays the journal, so a disk the guest
//! powered off cleanly reads as the guest left it), every file hashed as the store hashes.

use std::collections::BTreeMap;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::Path;

use anyhow::{Context as _, bail};
use ext4_view::{Ext4, FileType};

use crate::dpkg::InstalledPackage;
use crate::store::tree::{Entry, EntryKind, Tree};

const SECTOR: u64 = 512;
/// The root partition's type GUID, as the disk output writes it (`output::disk`).
const ROOT_TYPE: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";
/// Entries read from one directory or files from one filesystem before giving up: a
/// corrupt directory must not make the walk endless.
const MAX_ENTRIES: usize = 2_000_000;

/// The test drive's root tree, with the content of its files by digest on demand.
pub struct DiskTree {
    pub tree: Tree,
    pub packages: Vec<InstalledPackage>,
    fs: Ext4,
    /// Digest → a path with that content, for reading it back.
    paths: BTreeMap<String, String>,
    /// Entries left out because their names are not UTF-8 (the store's paths are).
    pub skipped: Vec<String>,
}

impl std::fmt::Debug for DiskTree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskTree")
            .field("entries", &self.tree.len())
            .finish()
    }
}

impl DiskTree {
    /// The content of a file of the tree by its digest.
    pub fn read(&self, digest: &str) -> anyhow::Result<Vec<u8>> {
        let path = self
            .paths
            .get(digest)
            .with_context(|| format!("no file of the test drive has content {digest}"))?;
        self.fs
            .read(format!("/{path}").as_str())
            .with_context(|| format!("reading /{path} from the test drive's disk"))
    }
}

/// Reads a partition of a disk file as if it were the whole device.
struct Partition {
    file: std::fs::File,
    start: u64,
    len: u64,
}

impl ext4_view::Ext4Read for Partition {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        if start_byte
            .checked_add(dst.len() as u64)
            .is_none_or(|end| end > self.len)
        {
            return Err("read beyond the end of the partition".into());
        }
        self.file.seek(SeekFrom::Start(self.start + start_byte))?;
        self.file.read_exact(dst)?;
        Ok(())
    }
}

/// A GUID as GPT stores it: the first three fields little-endian, the rest as written.
fn guid_bytes(text: &str) -> Option<[u8; 16]> {
    let hex: String = text.chars().filter(|c| *c != '-').collect();
    let raw = crate::store::tree::unhex(&hex.to_ascii_lowercase())?;
    let raw: [u8; 16] = raw.try_into().ok()?;
    let mut out = raw;
    out[0..4].copy_from_slice(&[raw[3], raw[2], raw[1], raw[0]]);
    out[4..6].copy_from_slice(&[raw[5], raw[4]]);
    out[6..8].copy_from_slice(&[raw[7], raw[6]]);
    Some(out)
}

/// Byte offset and length of the root partition of a raw GPT disk.
pub fn root_partition(disk: &Path) -> anyhow::Result<(u64, u64)> {
    let mut file = fs_err::File::open(disk)?;
    let size = file.metadata()?.len();
    let mut header = [0u8; 92];
    file.seek(SeekFrom::Start(SECTOR))?;
    file.read_exact(&mut header)
        .with_context(|| format!("{} is too small to be a disk", disk.display()))?;
    if &header[0..8] != b"EFI PART" {
        bail!("{} has no GPT partition table", disk.display());
    }
    let u64_at = |bytes: &[u8], at: usize| {
        u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or([0; 8]))
    };
    let u32_at = |bytes: &[u8], at: usize| {
        u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or([0; 4]))
    };
    let (table, count, entry_size) = (
        u64_at(&header, 72),
        u32_at(&header, 80),
        u32_at(&header, 84),
    );
    if !(128..=4096).contains(&entry_size) || count > 1024 {
        bail!("{}'s partition table is damaged", disk.display());
    }
    let wanted = guid_bytes(ROOT_TYPE).context("the root type GUID")?;
    let mut entry = vec![0u8; entry_size as usize];
    for index in 0..u64::from(count) {
        file.seek(SeekFrom::Start(
            table * SECTOR + index * u64::from(entry_size),
        ))?;
        file.read_exact(&mut entry)?;
        if entry[0..16] == wanted {
            let (first, last) = (u64_at(&entry, 32), u64_at(&entry, 40));
            let (start, end) = (first * SECTOR, (last + 1) * SECTOR);
            if first == 0 || end <= start || end > size {
                bail!("{}'s root partition lies outside the disk", disk.display());
            }
            return Ok((start, end - start));
        }
    }
    bail!(
        "{} has no root partition (type {ROOT_TYPE})",
        disk.display()
    )
}

/// Read the root filesystem of the raw disk at `disk` into a tree.
pub fn read_root(disk: &Path) -> anyhow::Result<DiskTree> {
    let (start, len) = root_partition(disk)?;
    let file = std::fs::File::open(disk).with_context(|| format!("opening {}", disk.display()))?;
    let fs = Ext4::load(Box::new(Partition { file, start, len }))
        .map_err(|e| anyhow::anyhow!("{}'s root filesystem cannot be read: {e}", disk.display()))?;
    let mut entries = BTreeMap::new();
    let mut paths = BTreeMap::new();
    let mut skipped = Vec::new();
    let root = fs
        .metadata("/")
        .map_err(|e| anyhow::anyhow!("the root directory: {e}"))?;
    entries.insert(
        String::new(),
        Entry {
            uid: root.uid(),
            gid: root.gid(),
            ..Entry::dir(u32::from(root.mode()))
        },
    );
    let mut pending = vec![String::new()];
    while let Some(dir) = pending.pop() {
        let listing = fs
            .read_dir(format!("/{dir}").as_str())
            .map_err(|e| anyhow::anyhow!("listing /{dir}: {e}"))?;
        for item in listing {
            let item = item.map_err(|e| anyhow::anyhow!("listing /{dir}: {e}"))?;
            let name = item.file_name();
            let Ok(name) = name.as_str() else {
                skipped.push(format!("/{dir}/{}", name.display()));
                continue;
            };
            if name == "." || name == ".." || (dir.is_empty() && name == "lost+found") {
                continue;
            }
            if entries.len() >= MAX_ENTRIES {
                bail!("the test drive's root filesystem has more than {MAX_ENTRIES} entries");
            }
            let path = if dir.is_empty() {
                name.to_owned()
            } else {
                format!("{dir}/{name}")
            };
            let metadata = item
                .metadata()
                .map_err(|e| anyhow::anyhow!("/{path}: {e}"))?;
            let mut entry = Entry {
                uid: metadata.uid(),
                gid: metadata.gid(),
                ..Entry::dir(u32::from(metadata.mode()))
            };
            match metadata.file_type() {
                FileType::Directory => pending.push(path.clone()),
                FileType::Regular => {
                    let mut reader = fs
                        .open(format!("/{path}").as_str())
                        .map_err(|e| anyhow::anyhow!("/{path}: {e}"))?;
                    let (digest, size) =
                        hash(&mut reader).with_context(|| format!("reading /{path}"))?;
                    paths.entry(digest.clone()).or_insert_with(|| path.clone());
                    entry.kind = EntryKind::File;
                    entry.size = size;
                    entry.digest = Some(digest);
                }
                FileType::Symlink => {
                    let target = fs
                        .read_link(format!("/{path}").as_str())
                        .map_err(|e| anyhow::anyhow!("/{path}: {e}"))?;
                    entry.kind = EntryKind::Symlink;
                    entry.link_target = Some(String::from_utf8_lossy(target.as_ref()).into_owned());
                }
                FileType::CharacterDevice => entry.kind = EntryKind::CharDevice,
                FileType::BlockDevice => entry.kind = EntryKind::BlockDevice,
                FileType::Fifo => entry.kind = EntryKind::Fifo,
                FileType::Socket => entry.kind = EntryKind::Socket,
            }
            entries.insert(path, entry);
        }
    }
    let tree = Tree::from_entries(entries);
    let status = match tree
        .get(crate::dpkg::STATUS_PATH)
        .and_then(|e| e.digest.clone())
    {
        Some(digest) => {
            let path = paths.get(&digest).cloned().unwrap_or_default();
            String::from_utf8_lossy(
                &fs.read(format!("/{path}").as_str())
                    .map_err(|e| anyhow::anyhow!("reading dpkg's status: {e}"))?,
            )
            .into_owned()
        }
        None => String::new(),
    };
    Ok(DiskTree {
        packages: crate::dpkg::parse_status(&status),
        tree,
        fs,
        paths,
        skipped,
    })
}

fn hash(reader: &mut impl std::io::Read) -> std::io::Result<(String, u64)> {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    let mut buffer = vec![0u8; 256 * 1024];
    let mut size = 0u64;
    loop {
        let n = reader.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        size += n as u64;
    }
    Ok((crate::store::tree::hex(&hasher.finalize()), size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guids_are_stored_mixed_endian() {
        // The root type's bytes as sfdisk writes them.
        assert_eq!(
            guid_bytes(ROOT_TYPE).map(|b| crate::store::tree::hex(&b)),
            Some("e3bc684fcde8b14d96e7fbcaf984b709".to_owned())
        );
    }
}
