//! Free space: checked before writing what is large (a disk's root filesystem), and told
//! apart from other failures so the message says what to do. A full filesystem is the one
//! failure a user cures outside the tool, and debugfs, mke2fs or tar report it as thousands
//! of per-file complaints that hide the cause.

use std::io;
use std::path::Path;

/// Bytes an unprivileged writer may still use on the filesystem holding `dir`.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    let stat = rustix::fs::statvfs(dir).ok()?;
    Some(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// An error of kind `StorageFull` (so [`is_full`] knows it) unless the filesystem holding
/// `dir` has `needed` bytes free. `what` names what would be written.
pub fn ensure_room(dir: &Path, needed: u64, what: &str) -> anyhow::Result<()> {
    let Some(free) = free_bytes(dir) else {
        return Ok(());
    };
    if free >= needed {
        return Ok(());
    }
    Err(full(format!(
        "{what} needs about {} in {}, whose filesystem has {} free",
        mib(needed),
        dir.display(),
        mib(free)
    )))
}

/// A `StorageFull` error with `message`, for a program's report of a full filesystem.
pub fn full(message: String) -> anyhow::Error {
    io::Error::new(io::ErrorKind::StorageFull, message).into()
}

/// Whether `error` comes from a full filesystem (ENOSPC or a quota), by kind or, for a
/// program's words passed on as text, by the message `strerror` gives ENOSPC.
pub fn is_full(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause.downcast_ref::<io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
            )
        }) || cause.to_string().contains("No space left on device")
    })
}

/// What to do about a full filesystem, as a `help:` line says it.
pub const FULL_HELP: &str = "a filesystem is full: free space on it (`df -h` shows which; \
`cargo appliance gc` removes what the store keeps but no longer needs) and run the command again";

fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes.div_ceil(1 << 20))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_is_refused_beyond_the_free_space_with_an_error_that_says_full() {
        let dir = tempfile::tempdir().expect("temp dir");
        let free = free_bytes(dir.path()).expect("statvfs");
        ensure_room(dir.path(), 1, "a small file").expect("one byte fits");
        let error = ensure_room(dir.path(), free + (1 << 30), "the disk web.raw")
            .expect_err("more than is free");
        assert!(is_full(&error), "{error:#}");
        let text = format!("{error:#}");
        assert!(text.starts_with("the disk web.raw needs about "), "{text}");
        assert!(text.contains("MiB free"), "{text}");
    }

    #[test]
    fn a_programs_enospc_text_counts_as_full_and_other_errors_do_not() {
        let said = anyhow::anyhow!("write: No space left on device").context("debugfs");
        assert!(is_full(&said));
        let other = anyhow::Error::from(io::Error::from(io::ErrorKind::PermissionDenied));
        assert!(!is_full(&other));
    }
}
