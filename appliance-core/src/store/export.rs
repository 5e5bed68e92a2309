//! Exporters: a stored tree to a directory, a `.tar` or a `.tar.zst`.
//!
//! Tar output is deterministic: entries in path order (parents first), numeric owners only,
//! mtimes clamped to `SOURCE_DATE_EPOCH` when it is set. Archives are written to a temp file
//! beside the destination and renamed into place, so a failed export leaves no half file.
//!
//! Directory export creates every entry relative to directory handles with `openat2`
//! (`RESOLVE_IN_ROOT | RESOLVE_NO_SYMLINKS`) and `O_EXCL | O_NOFOLLOW`: the tree's own
//! symlinks are created, never followed. Ownership and device nodes need root; without it
//! they are skipped and counted in the report.

use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use anyhow::{Context as _, bail};
use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags, Timestamps};
use serde::Serialize;

use super::objects::Objects;
use super::tree::{EntryKind, Tree};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    Directory,
    Tar,
    TarZst,
}

impl ExportFormat {
    /// Chosen by the destination's name: `.tar`, `.tar.zst`, anything else is a directory.
    pub fn for_path(path: &Path) -> Self {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.ends_with(".tar.zst") || name.ends_with(".tzst") {
            ExportFormat::TarZst
        } else if name.ends_with(".tar") {
            ExportFormat::Tar
        } else {
            ExportFormat::Directory
        }
    }
}

#[derive(Debug, Default, Serialize)]
pub struct ExportReport {
    pub entries: usize,
    /// Entries that could not be created without root (device nodes, ownership).
    pub skipped_devices: usize,
    pub ownership_kept: bool,
}

/// `SOURCE_DATE_EPOCH`, when set and valid.
pub fn source_date_epoch() -> Option<i64> {
    std::env::var("SOURCE_DATE_EPOCH").ok()?.trim().parse().ok()
}

/// Archive writes go out in chunks this large rather than per 8 KiB read.
const WRITE_CHUNK: usize = 1024 * 1024;

pub fn export(tree: &Tree, objects: &Objects, destination: &Path) -> anyhow::Result<ExportReport> {
    match ExportFormat::for_path(destination) {
        ExportFormat::Directory => export_directory(tree, objects, destination),
        format => {
            let parent = destination
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let temp = tempfile::Builder::new()
                .prefix(".appliance-export-")
                // As `tar` or `cp` would create it (0644 under the usual umask), not the
                // temporary file's 0600: an archive is made to be shared.
                .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666))
                .tempfile_in(parent)
                .with_context(|| format!("creating a temp file in {}", parent.display()))?;
            let file = temp.reopen()?;
            let epoch = source_date_epoch();
            let report = if format == ExportFormat::TarZst {
                let mut encoder = zstd::stream::write::Encoder::new(
                    io::BufWriter::with_capacity(WRITE_CHUNK, file),
                    3,
                )?;
                encoder.include_checksum(true)?;
                encoder.multithread(compression_threads())?;
                let report = write_tar(tree, objects, &mut encoder, epoch)?;
                encoder.finish()?.flush()?;
                report
            } else {
                let mut writer = io::BufWriter::with_capacity(WRITE_CHUNK, file);
                let report = write_tar(tree, objects, &mut writer, epoch)?;
                writer.flush()?;
                report
            };
            // Not flushed to disk: like tar and cp (and our disk outputs), an export is a copy
            // of what the store holds durably. The rename keeps a killed export from leaving
            // a partial file at the destination.
            temp.persist(destination)
                .with_context(|| format!("moving the archive to {}", destination.display()))?;
            Ok(report)
        }
    }
}

/// zstd workers for an archive export. With one or more workers zstd's output is the same
/// whatever their number, so archives stay reproducible across machines.
fn compression_threads() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(1))
}

/// Write the tree as a tar stream.
pub fn write_tar(
    tree: &Tree,
    objects: &Objects,
    out: &mut impl Write,
    epoch: Option<i64>,
) -> anyhow::Result<ExportReport> {
    let mut builder = tar::Builder::new(out);
    builder.mode(tar::HeaderMode::Complete);
    let mut report = ExportReport {
        ownership_kept: true,
        ..ExportReport::default()
    };
    for (path, entry) in tree.entries() {
        crate::process::interrupt::check()?;
        let name = if path.is_empty() {
            "./".to_owned()
        } else if entry.kind == EntryKind::Dir {
            format!("./{path}/")
        } else {
            format!("./{path}")
        };
        let mtime = match epoch {
            Some(epoch) => entry.mtime.min(epoch),
            None => entry.mtime,
        };
        if !entry.xattrs.is_empty() {
            let pax: Vec<(String, &[u8])> = entry
                .xattrs
                .iter()
                .map(|(key, value)| (format!("SCHILY.xattr.{key}"), value.as_slice()))
                .collect();
            builder.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), *v)))?;
        }
        let mut header = tar::Header::new_gnu();
        header.set_mode(entry.mode);
        header.set_uid(u64::from(entry.uid));
        header.set_gid(u64::from(entry.gid));
        header.set_mtime(mtime.max(0) as u64);
        header.set_size(0);
        let context = || format!("writing {name}");
        match entry.kind {
            EntryKind::File => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_size(entry.size);
                let digest = entry
                    .digest
                    .as_deref()
                    .with_context(|| format!("{path} has no content digest"))?;
                if entry.size == 0 {
                    // Empty content needs no object (OCI whiteouts are empty files).
                    builder
                        .append_data(&mut header, &name, io::empty())
                        .with_context(context)?;
                } else {
                    let reader = objects.open(digest).with_context(context)?;
                    builder
                        .append_data(&mut header, &name, reader)
                        .with_context(context)?;
                }
            }
            EntryKind::Dir => {
                header.set_entry_type(tar::EntryType::Directory);
                builder
                    .append_data(&mut header, &name, io::empty())
                    .with_context(context)?;
            }
            EntryKind::Symlink => {
                header.set_entry_type(tar::EntryType::Symlink);
                let target = entry.link_target.as_deref().unwrap_or_default();
                builder
                    .append_link(&mut header, &name, target)
                    .with_context(context)?;
            }
            EntryKind::Hardlink => {
                header.set_entry_type(tar::EntryType::Link);
                let target = format!("./{}", entry.link_target.as_deref().unwrap_or_default());
                builder
                    .append_link(&mut header, &name, target)
                    .with_context(context)?;
            }
            EntryKind::CharDevice | EntryKind::BlockDevice | EntryKind::Fifo => {
                header.set_entry_type(match entry.kind {
                    EntryKind::CharDevice => tar::EntryType::Char,
                    EntryKind::BlockDevice => tar::EntryType::Block,
                    _ => tar::EntryType::Fifo,
                });
                let (major, minor) = entry.device.unwrap_or((0, 0));
                header.set_device_major(major)?;
                header.set_device_minor(minor)?;
                builder
                    .append_data(&mut header, &name, io::empty())
                    .with_context(context)?;
            }
            EntryKind::Socket => {
                // tar has no socket type; GNU tar skips sockets too.
                report.skipped_devices += 1;
                continue;
            }
        }
        report.entries += 1;
    }
    builder.finish()?;
    Ok(report)
}

fn open_in_root(root: &OwnedFd, path: &str) -> anyhow::Result<OwnedFd> {
    if path.is_empty() {
        return Ok(rustix::io::dup(root)?);
    }
    rustix::fs::openat2(
        root,
        path,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )
    .with_context(|| format!("opening directory {path} inside the export root"))
}

fn split(path: &str) -> (&str, &str) {
    path.rsplit_once('/').unwrap_or(("", path))
}

/// Export into `destination`, which must not exist or be an empty directory.
pub fn export_directory(
    tree: &Tree,
    objects: &Objects,
    destination: &Path,
) -> anyhow::Result<ExportReport> {
    match std::fs::read_dir(destination) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                bail!("{} exists and is not empty", destination.display());
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs_err::create_dir(destination)?,
        Err(e) => return Err(e).with_context(|| format!("reading {}", destination.display())),
    }
    let root = rustix::fs::open(
        destination,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
    )
    .with_context(|| format!("opening {}", destination.display()))?;
    let privileged = rustix::process::geteuid().is_root();
    let mut report = ExportReport {
        ownership_kept: privileged,
        ..ExportReport::default()
    };
    let mut parent_cache: Option<(String, OwnedFd)> = None;
    for (path, entry) in tree.entries() {
        crate::process::interrupt::check()?;
        let (parent, name) = split(path);
        let context = || format!("exporting {path}");
        if path.is_empty() {
            // The root's mode, owner and mtime are set last, after its children.
            report.entries += 1;
            continue;
        }
        if parent_cache.as_ref().is_none_or(|(p, _)| p != parent) {
            parent_cache = Some((parent.to_owned(), open_in_root(&root, parent)?));
        }
        let Some((_, dir)) = parent_cache.as_ref() else {
            continue;
        };
        let mode = Mode::from_raw_mode(entry.mode & 0o7777);
        match entry.kind {
            EntryKind::Dir => {
                rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o700)).with_context(context)?;
                // Mode, owner and mtime of directories are set after their children below.
            }
            EntryKind::File => {
                let fd = rustix::fs::openat(
                    dir,
                    name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .with_context(context)?;
                let digest = entry
                    .digest
                    .as_deref()
                    .with_context(|| format!("{path} has no content digest"))?;
                let mut file = std::fs::File::from(fd);
                io::copy(&mut objects.open(digest)?, &mut file).with_context(context)?;
                let fd = OwnedFd::from(file);
                set_metadata(&fd, entry, privileged).with_context(context)?;
            }
            EntryKind::Symlink => {
                let target = entry.link_target.as_deref().unwrap_or_default();
                rustix::fs::symlinkat(target, dir, name).with_context(context)?;
                if privileged {
                    rustix::fs::chownat(
                        dir,
                        name,
                        Some(rustix::fs::Uid::from_raw(entry.uid)),
                        Some(rustix::fs::Gid::from_raw(entry.gid)),
                        AtFlags::SYMLINK_NOFOLLOW,
                    )
                    .with_context(context)?;
                }
                let time = timestamps(entry.mtime);
                rustix::fs::utimensat(dir, name, &time, AtFlags::SYMLINK_NOFOLLOW)
                    .with_context(context)?;
            }
            EntryKind::Hardlink => {
                let target = entry.link_target.as_deref().unwrap_or_default();
                let (target_parent, target_name) = split(target);
                let target_dir = open_in_root(&root, target_parent)?;
                rustix::fs::linkat(&target_dir, target_name, dir, name, AtFlags::empty())
                    .with_context(context)?;
            }
            EntryKind::Fifo
            | EntryKind::CharDevice
            | EntryKind::BlockDevice
            | EntryKind::Socket => {
                let file_type = match entry.kind {
                    EntryKind::Fifo => rustix::fs::FileType::Fifo,
                    EntryKind::CharDevice => rustix::fs::FileType::CharacterDevice,
                    EntryKind::BlockDevice => rustix::fs::FileType::BlockDevice,
                    _ => rustix::fs::FileType::Socket,
                };
                let needs_root = entry.kind != EntryKind::Fifo;
                if needs_root && !privileged {
                    report.skipped_devices += 1;
                    continue;
                }
                let (major, minor) = entry.device.unwrap_or((0, 0));
                rustix::fs::mknodat(
                    dir,
                    name,
                    file_type,
                    mode,
                    rustix::fs::makedev(major, minor),
                )
                .with_context(context)?;
                // mknod applies the umask; the node must have exactly the recorded mode.
                rustix::fs::chmodat(dir, name, mode, AtFlags::empty()).with_context(context)?;
                let fd = rustix::fs::openat(
                    dir,
                    name,
                    OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )?;
                if privileged {
                    rustix::fs::chownat(
                        &fd,
                        "",
                        Some(rustix::fs::Uid::from_raw(entry.uid)),
                        Some(rustix::fs::Gid::from_raw(entry.gid)),
                        AtFlags::EMPTY_PATH,
                    )
                    .with_context(context)?;
                }
                rustix::fs::utimensat(
                    dir,
                    name,
                    &timestamps(entry.mtime),
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .with_context(context)?;
            }
        }
        report.entries += 1;
    }
    // Directories last, deepest first: creating children changes a directory's mtime, and a
    // read-only directory mode would stop us creating them.
    for (path, entry) in tree.entries().iter().rev() {
        if entry.kind == EntryKind::Dir && !path.is_empty() {
            let fd = open_in_root(&root, path)?;
            set_metadata(&fd, entry, privileged).with_context(|| format!("exporting {path}"))?;
        }
    }
    if let Some(entry) = tree.get("") {
        set_metadata(&root, entry, privileged)?;
    }
    Ok(report)
}

fn timestamps(mtime: i64) -> Timestamps {
    let time = rustix::fs::Timespec {
        tv_sec: mtime,
        tv_nsec: 0,
    };
    Timestamps {
        last_access: time,
        last_modification: time,
    }
}

/// Owner (when privileged), xattrs, mode and mtime of an opened file or directory. The mode
/// is set after the owner, because chown clears setuid bits.
fn set_metadata(
    fd: &impl AsFd,
    entry: &super::tree::Entry,
    privileged: bool,
) -> anyhow::Result<()> {
    if privileged {
        rustix::fs::fchown(
            fd,
            Some(rustix::fs::Uid::from_raw(entry.uid)),
            Some(rustix::fs::Gid::from_raw(entry.gid)),
        )?;
    }
    for (key, value) in &entry.xattrs {
        // Unprivileged users may only set user.* attributes; others are kept in the catalog.
        if privileged || key.starts_with("user.") {
            rustix::fs::fsetxattr(fd, key.as_str(), value, rustix::fs::XattrFlags::empty())
                .with_context(|| format!("setting xattr {key}"))?;
        }
    }
    rustix::fs::fchmod(fd, Mode::from_raw_mode(entry.mode & 0o7777))?;
    rustix::fs::futimens(fd, &timestamps(entry.mtime))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    /// What [`compression_threads`] relies on for reproducible archives.
    #[test]
    fn zstd_output_does_not_depend_on_the_number_of_workers() {
        // Compressible but not trivial, and several of zstd's jobs long.
        let mut state = 0x2545_f491_u32;
        let data: Vec<u8> = (0..24 << 20)
            .map(|i| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                if i % 7 == 0 {
                    (state % 26) as u8 + b'a'
                } else {
                    b' '
                }
            })
            .collect();
        let compress = |workers: u32| {
            let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3).expect("encoder");
            encoder.include_checksum(true).expect("checksum");
            encoder.multithread(workers).expect("workers");
            encoder.write_all(&data).expect("compress");
            encoder.finish().expect("finish")
        };
        let one = compress(1);
        assert!(one.len() < data.len() / 2);
        assert_eq!(one, compress(2));
        assert_eq!(one, compress(3));
    }
}
