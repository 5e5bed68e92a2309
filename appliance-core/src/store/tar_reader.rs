//! A tar reader that bounds everything it reads (docs/HOSTILE.md items 14, 18, 20–24).
//!
//! The `tar` crate reads GNU long-name and PAX extension members whole into memory, whatever
//! size their header claims; this reader caps them, rejects what it does not understand
//! (unknown type flags, sparse files, headers whose checksum fails, PAX sizes that disagree
//! with the ustar size) instead of guessing, and streams file data to the caller.
//! It understands ustar, GNU (long names and links) and PAX (path, linkpath, size, uid, gid,
//! uname/gname are ignored, mtime, SCHILY.xattr.*). Writing uses the `tar` crate.

use std::collections::BTreeMap;
use std::io::{self, Read};

/// Largest GNU long-name or PAX extended header member we accept.
pub const MAX_METADATA_BYTES: u64 = 1 << 20;
/// Largest single file we accept in an image (a 64 GiB file in a root filesystem is an attack).
pub const MAX_FILE_BYTES: u64 = 64 << 30;
const BLOCK: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum TarError {
    #[error("reading the archive")]
    Io(#[from] io::Error),
    #[error("header at byte {offset} has a bad checksum (not a tar archive, or corrupt)")]
    Checksum { offset: u64 },
    #[error("entry `{path}` has type flag {flag:?}, which is not supported")]
    UnknownType { path: String, flag: char },
    #[error("entry `{path}` is a sparse file, which is not supported")]
    Sparse { path: String },
    #[error("an extended header of {size} bytes exceeds the {MAX_METADATA_BYTES}-byte limit")]
    MetadataTooLarge { size: u64 },
    #[error("entry `{path}` claims {size} bytes, more than the {MAX_FILE_BYTES}-byte limit")]
    FileTooLarge { path: String, size: u64 },
    #[error(
        "entry `{path}`: PAX size {pax} disagrees with the header size {header}; the archive is ambiguous"
    )]
    AmbiguousSize { path: String, pax: u64, header: u64 },
    #[error("malformed {what} in the header at byte {offset}")]
    Malformed { what: &'static str, offset: u64 },
    #[error("entry name is not valid UTF-8: {lossy:?}")]
    NotUtf8 { lossy: String },
    #[error("the archive ends in the middle of an entry")]
    Truncated,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TarKind {
    File,
    Dir,
    Symlink,
    Hardlink,
    CharDev,
    BlockDev,
    Fifo,
}

/// One entry's header, with extensions applied.
#[derive(Debug, Clone)]
pub struct TarHeader {
    pub path: String,
    pub kind: TarKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: i64,
    pub link_target: String,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

/// Streams entries from a tar archive.
#[derive(Debug)]
pub struct TarReader<R> {
    inner: R,
    offset: u64,
    /// Bytes of the current entry's data (plus padding) not yet consumed.
    pending: u64,
    finished: bool,
}

impl<R: Read> TarReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            offset: 0,
            pending: 0,
            finished: false,
        }
    }

    fn read_block(&mut self, block: &mut [u8; BLOCK]) -> Result<bool, TarError> {
        let mut filled = 0;
        while filled < BLOCK {
            let n = self.inner.read(&mut block[filled..])?;
            if n == 0 {
                return if filled == 0 {
                    Ok(false)
                } else {
                    Err(TarError::Truncated)
                };
            }
            filled += n;
        }
        self.offset += BLOCK as u64;
        Ok(true)
    }

    fn skip_pending(&mut self) -> Result<(), TarError> {
        if self.pending > 0 {
            let copied = io::copy(&mut (&mut self.inner).take(self.pending), &mut io::sink())?;
            if copied != self.pending {
                return Err(TarError::Truncated);
            }
            self.offset += self.pending;
            self.pending = 0;
        }
        Ok(())
    }

    fn read_member(&mut self, size: u64) -> Result<Vec<u8>, TarError> {
        if size > MAX_METADATA_BYTES {
            return Err(TarError::MetadataTooLarge { size });
        }
        let padded = size.div_ceil(BLOCK as u64) * BLOCK as u64;
        let mut data = Vec::with_capacity(padded as usize);
        let read = (&mut self.inner).take(padded).read_to_end(&mut data)?;
        if read as u64 != padded {
            return Err(TarError::Truncated);
        }
        self.offset += padded;
        data.truncate(size as usize);
        Ok(data)
    }

    /// The next entry's header; its data must be read with [`Self::data`] or is skipped.
    pub fn next_header(&mut self) -> Result<Option<TarHeader>, TarError> {
        if self.finished {
            return Ok(None);
        }
        self.skip_pending()?;
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut pax: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut block = [0u8; BLOCK];
        loop {
            let header_offset = self.offset;
            if !self.read_block(&mut block)? {
                // EOF without the end-of-archive blocks: accept, as GNU tar does (with a warning there).
                self.finished = true;
                return Ok(None);
            }
            if block.iter().all(|&b| b == 0) {
                self.finished = true;
                return Ok(None);
            }
            verify_checksum(&block, header_offset)?;
            let flag = block[156];
            let size = parse_number(&block[124..136]).ok_or(TarError::Malformed {
                what: "size",
                offset: header_offset,
            })?;
            match flag {
                b'L' => {
                    long_name = Some(trim_nul(self.read_member(size)?));
                    continue;
                }
                b'K' => {
                    long_link = Some(trim_nul(self.read_member(size)?));
                    continue;
                }
                b'x' => {
                    let data = self.read_member(size)?;
                    parse_pax(&data, &mut pax, header_offset)?;
                    continue;
                }
                b'g' => {
                    // Global headers set defaults we do not use; read and drop (bounded).
                    self.read_member(size)?;
                    continue;
                }
                _ => {}
            }
            let name_bytes = match (pax.remove("path"), long_name.take()) {
                (Some(path), _) => path,
                (None, Some(long)) => long,
                (None, None) => {
                    let name = field(&block[0..100]);
                    let prefix = if &block[257..262] == b"ustar" {
                        field(&block[345..500])
                    } else {
                        &[]
                    };
                    if prefix.is_empty() {
                        name.to_vec()
                    } else {
                        [prefix, b"/", name].concat()
                    }
                }
            };
            let path = utf8(name_bytes)?;
            let link_bytes = match (pax.remove("linkpath"), long_link.take()) {
                (Some(link), _) => link,
                (None, Some(long)) => long,
                (None, None) => field(&block[157..257]).to_vec(),
            };
            let link_target = utf8(link_bytes)?;
            let kind = match flag {
                b'0' | 0 | b'7' => TarKind::File,
                b'5' => TarKind::Dir,
                b'2' => TarKind::Symlink,
                b'1' => TarKind::Hardlink,
                b'3' => TarKind::CharDev,
                b'4' => TarKind::BlockDev,
                b'6' => TarKind::Fifo,
                b'S' => return Err(TarError::Sparse { path }),
                other => {
                    return Err(TarError::UnknownType {
                        path,
                        flag: char::from(other),
                    });
                }
            };
            let mut size = size;
            if let Some(pax_size) = pax.remove("size") {
                let pax_size = std::str::from_utf8(&pax_size)
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or(TarError::Malformed {
                        what: "PAX size",
                        offset: header_offset,
                    })?;
                // A header size of 0 with a PAX size is how >8 GiB files are written;
                // anything else that disagrees is the differential GNU tar and others
                // resolve differently (docs/HOSTILE.md 18).
                if size != 0 && size != pax_size {
                    return Err(TarError::AmbiguousSize {
                        path,
                        pax: pax_size,
                        header: size,
                    });
                }
                size = pax_size;
            }
            let number =
                |key: &str, range: std::ops::Range<usize>, pax: &mut BTreeMap<String, Vec<u8>>| {
                    match pax.remove(key) {
                        Some(value) => std::str::from_utf8(&value)
                            .ok()
                            .and_then(|s| s.parse::<u64>().ok()),
                        None => parse_number(&block[range]),
                    }
                };
            let malformed = |what| TarError::Malformed {
                what,
                offset: header_offset,
            };
            let uid = number("uid", 108..116, &mut pax)
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| malformed("uid"))?;
            let gid = number("gid", 116..124, &mut pax)
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| malformed("gid"))?;
            let mode =
                parse_number(&block[100..108]).ok_or_else(|| malformed("mode"))? as u32 & 0o7777;
            let mtime = match pax.remove("mtime") {
                Some(value) => std::str::from_utf8(&value)
                    .ok()
                    .and_then(|s| s.split('.').next().and_then(|s| s.parse::<i64>().ok()))
                    .ok_or_else(|| malformed("PAX mtime"))?,
                None => parse_number(&block[136..148]).ok_or_else(|| malformed("mtime"))? as i64,
            };
            let (dev_major, dev_minor) = if matches!(kind, TarKind::CharDev | TarKind::BlockDev) {
                (
                    parse_number(&block[329..337]).ok_or_else(|| malformed("device major"))? as u32,
                    parse_number(&block[337..345]).ok_or_else(|| malformed("device minor"))? as u32,
                )
            } else {
                (0, 0)
            };
            let xattrs = std::mem::take(&mut pax)
                .into_iter()
                .filter_map(|(key, value)| {
                    key.strip_prefix("SCHILY.xattr.")
                        .map(|name| (name.to_owned(), value))
                })
                .collect();
            // Whatever the type, `size` bytes follow the header (as the `tar` crate and GNU
            // tar skip them); only a regular file's bytes are its content.
            let data_size = size;
            if data_size > MAX_FILE_BYTES {
                return Err(TarError::FileTooLarge {
                    path,
                    size: data_size,
                });
            }
            self.pending = data_size.div_ceil(BLOCK as u64) * BLOCK as u64;
            return Ok(Some(TarHeader {
                path,
                kind,
                mode,
                uid,
                gid,
                size: if kind == TarKind::File { size } else { 0 },
                mtime,
                link_target,
                dev_major,
                dev_minor,
                xattrs,
            }));
        }
    }

    /// A reader over the current entry's data (exactly `size` bytes of a regular file).
    pub fn data(&mut self, size: u64) -> EntryData<'_, R> {
        EntryData {
            reader: self,
            remaining: size,
        }
    }
}

/// The data of the current entry. Reading it to the end consumes it; padding is skipped later.
#[derive(Debug)]
pub struct EntryData<'a, R> {
    reader: &'a mut TarReader<R>,
    remaining: u64,
}

impl<R: Read> Read for EntryData<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let want = buf.len().min(self.remaining as usize);
        let n = self.reader.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "archive ends inside a file",
            ));
        }
        self.remaining -= n as u64;
        self.reader.pending -= n as u64;
        self.reader.offset += n as u64;
        Ok(n)
    }
}

fn verify_checksum(block: &[u8; BLOCK], offset: u64) -> Result<(), TarError> {
    let stored = parse_number(&block[148..156]).ok_or(TarError::Checksum { offset })?;
    let unsigned: u64 = block
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                u64::from(b' ')
            } else {
                u64::from(b)
            }
        })
        .sum();
    // Some old writers summed signed bytes; accept both, as GNU tar does.
    let signed: i64 = block
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                i64::from(b' ')
            } else {
                i64::from(b as i8)
            }
        })
        .sum();
    if stored == unsigned || stored as i64 == signed {
        Ok(())
    } else {
        Err(TarError::Checksum { offset })
    }
}

/// Octal (space/NUL terminated) or GNU base-256 numbers.
fn parse_number(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        // base-256: big-endian, high bit of the first byte is the marker; negative unsupported.
        if field[0] & 0x40 != 0 {
            return None;
        }
        let mut value: u64 = u64::from(field[0] & 0x3f);
        for &b in &field[1..] {
            value = value.checked_mul(256)?.checked_add(u64::from(b))?;
        }
        return Some(value);
    }
    let text = std::str::from_utf8(field).ok()?;
    let trimmed = text.trim_matches(|c: char| c == '\0' || c == ' ');
    if trimmed.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(trimmed, 8).ok()
}

fn field(bytes: &[u8]) -> &[u8] {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    &bytes[..end]
}

fn trim_nul(mut bytes: Vec<u8>) -> Vec<u8> {
    while bytes.last() == Some(&0) {
        bytes.pop();
    }
    bytes
}

fn utf8(bytes: Vec<u8>) -> Result<String, TarError> {
    String::from_utf8(bytes).map_err(|e| TarError::NotUtf8 {
        lossy: String::from_utf8_lossy(e.as_bytes()).into_owned(),
    })
}

/// PAX records: `"%d %s=%s\n"`, the length counting the whole record.
fn parse_pax(
    data: &[u8],
    out: &mut BTreeMap<String, Vec<u8>>,
    offset: u64,
) -> Result<(), TarError> {
    let malformed = || TarError::Malformed {
        what: "PAX record",
        offset,
    };
    let mut rest = data;
    while !rest.is_empty() {
        let space = rest.iter().position(|&b| b == b' ').ok_or_else(malformed)?;
        let length: usize = std::str::from_utf8(&rest[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(malformed)?;
        if length <= space + 1 || length > rest.len() || rest[length - 1] != b'\n' {
            return Err(malformed());
        }
        let record = &rest[space + 1..length - 1];
        let equals = record
            .iter()
            .position(|&b| b == b'=')
            .ok_or_else(malformed)?;
        let key = String::from_utf8(record[..equals].to_vec()).map_err(|_| malformed())?;
        out.insert(key, record[equals + 1..].to_vec());
        rest = &rest[length..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        build(&mut builder);
        builder.into_inner().expect("in-memory archive")
    }

    fn file(builder: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        builder
            .append_data(&mut header, path, data)
            .expect("append");
    }

    #[test]
    fn reads_files_long_names_and_links() {
        let long = format!("{}/file", "d".repeat(200));
        let bytes = archive(|b| {
            file(b, "etc/hostname", b"web\n");
            file(b, &long, b"x");
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            b.append_link(&mut header, "etc/localtime", "/usr/share/zoneinfo/UTC")
                .expect("link");
        });
        let mut reader = TarReader::new(&bytes[..]);
        let first = reader.next_header().expect("ok").expect("entry");
        assert_eq!(
            (first.path.as_str(), first.size, first.kind),
            ("etc/hostname", 4, TarKind::File)
        );
        let mut data = String::new();
        reader
            .data(first.size)
            .read_to_string(&mut data)
            .expect("data");
        assert_eq!(data, "web\n");
        let second = reader.next_header().expect("ok").expect("entry");
        assert_eq!(second.path, long);
        let third = reader.next_header().expect("ok").expect("entry");
        assert_eq!(
            (third.kind, third.link_target.as_str()),
            (TarKind::Symlink, "/usr/share/zoneinfo/UTC")
        );
        assert!(reader.next_header().expect("ok").is_none());
    }

    #[test]
    fn huge_long_name_members_are_refused_before_allocation() {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::GNULongName);
        header.set_size(4 << 30);
        header.set_path("././@LongLink").expect("path");
        header.set_cksum();
        let mut reader = TarReader::new(header.as_bytes().as_slice());
        assert!(matches!(
            reader.next_header(),
            Err(TarError::MetadataTooLarge { .. })
        ));
    }

    #[test]
    fn unknown_type_flags_and_bad_checksums_are_rejected() {
        let mut header = tar::Header::new_ustar();
        header.set_path("weird").expect("path");
        header.set_entry_type(tar::EntryType::new(b'Z'));
        header.set_size(0);
        header.set_cksum();
        let mut reader = TarReader::new(header.as_bytes().as_slice());
        assert!(matches!(
            reader.next_header(),
            Err(TarError::UnknownType { flag: 'Z', .. })
        ));

        let mut bytes = header.as_bytes().to_vec();
        bytes[0] ^= 1;
        let mut reader = TarReader::new(bytes.as_slice());
        assert!(matches!(
            reader.next_header(),
            Err(TarError::Checksum { .. })
        ));
    }

    #[test]
    fn pax_size_disagreeing_with_the_header_is_ambiguous() {
        let mut bytes = Vec::new();
        let record = "15 size=999999\n";
        let mut pax = tar::Header::new_ustar();
        pax.set_path("pax").expect("path");
        pax.set_entry_type(tar::EntryType::XHeader);
        pax.set_size(record.len() as u64);
        pax.set_cksum();
        bytes.extend_from_slice(pax.as_bytes());
        let mut padded = record.as_bytes().to_vec();
        padded.resize(512, 0);
        bytes.extend_from_slice(&padded);
        let mut header = tar::Header::new_ustar();
        header.set_path("f").expect("path");
        header.set_size(5);
        header.set_cksum();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&[0u8; 512]);
        let mut reader = TarReader::new(bytes.as_slice());
        assert!(matches!(
            reader.next_header(),
            Err(TarError::AmbiguousSize {
                pax: 999999,
                header: 5,
                ..
            })
        ));
    }

    #[test]
    fn truncated_archives_are_errors_not_short_files() {
        let bytes = archive(|b| file(b, "f", &[7u8; 2000]));
        let cut = &bytes[..512 + 1000];
        let mut reader = TarReader::new(cut);
        let header = reader.next_header().expect("header").expect("entry");
        let mut sink = Vec::new();
        assert!(reader.data(header.size).read_to_end(&mut sink).is_err());
    }
}
