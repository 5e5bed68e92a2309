//! Tar archives, plain or compressed (gzip, zstd; detected by magic bytes), applied to the
//! builder; whiteouts for OCI layers. Every stream is bounded in size and ratio.

use std::io::{self, BufReader, Read};

use anyhow::Context as _;

use super::{Builder, Limits, ZSTD_WINDOW_LOG_MAX, checked_link};
use crate::store::tar_reader::{TarKind, TarReader};
use crate::store::tree::{Entry, EntryKind, normalize_path};

/// Detect compression by magic bytes and wrap the stream with the bounds above.
pub(super) fn decompress<R: io::BufRead + 'static>(
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
pub(super) fn apply_tar(
    builder: &mut Builder<'_>,
    reader: impl Read,
    whiteouts: bool,
) -> anyhow::Result<()> {
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
