//! The caches of downloaded and written bytes under the store — OCI layer blobs
//! (`cache/oci/blobs/sha256/<hex>`, also skopeo's shared blob directory), apt's package
//! lists (`cache/apt-lists/<sources digest>/`) and downloaded packages (`cache/debs/`, see
//! [`super::deb_cache`]) — as `fsck` checks them and `gc` tidies them.
//! Their writers put each entry in place by a rename of a whole file or directory, and their
//! readers check what they can afford to (a blob's size, the lists' `.fetched` marker, a
//! package's hash when its file is new); `fsck` checks the rest (every digest) and `--repair`
//! removes what is wrong, for the next build to write again.

use std::io::Read as _;
use std::path::Path;

use sha2::{Digest as _, Sha256};

use super::Store;
use super::tree::hex;

/// Layer blobs by digest, in the layout of skopeo's `--shared-blob-dir`.
pub const OCI_BLOBS: &str = "cache/oci/blobs";
/// Package lists per set of apt sources.
pub const APT_LISTS: &str = "cache/apt-lists";
/// Written into a lists directory before it is renamed into place: the lists are whole.
pub const LISTS_WHOLE_MARKER: &str = ".fetched";
/// Lists renamed out of the way, to be deleted.
pub const LISTS_DISCARD_PREFIX: &str = ".discard-lists-";
/// Lists being fetched.
pub const LISTS_PARTIAL_PREFIX: &str = ".lists-";

/// How old a partial lists directory must be before `gc` takes it for a dead build's.
const PARTIAL_AGE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

impl Store {
    /// Damaged cache entries, each said with what is wrong (removed with `repair`).
    pub(super) fn check_download_caches(&self, repair: bool) -> anyhow::Result<Vec<String>> {
        let mut damaged = Vec::new();
        let blobs = self.root().join(OCI_BLOBS).join("sha256");
        for entry in read_dir_if_any(&blobs)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // A writer's temporary file (`.tmp…`): not a blob yet.
            if name.starts_with('.') || !entry.file_type()?.is_file() {
                continue;
            }
            let actual = file_sha256(&entry.path())?;
            if actual != name {
                damaged.push(format!(
                    "OCI layer cache {}: its content hashes to {actual}",
                    entry.path().display()
                ));
                if repair {
                    fs_err::remove_file(entry.path())?;
                }
            }
        }
        for entry in read_dir_if_any(&self.root().join(APT_LISTS))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !entry.file_type()?.is_dir() {
                continue;
            }
            if !entry.path().join(LISTS_WHOLE_MARKER).is_file() {
                damaged.push(format!(
                    "apt lists cache {}: not known to be whole (no {LISTS_WHOLE_MARKER})",
                    entry.path().display()
                ));
                if repair {
                    fs_err::remove_dir_all(entry.path())?;
                }
            }
        }
        damaged.extend(super::deb_cache::damaged(
            &self.root().join(super::deb_cache::DEBS),
            &self.root().join(APT_LISTS),
            repair,
        )?);
        Ok(damaged)
    }

    /// For `gc`: lists renamed aside for deletion, partial lists and packages of builds long
    /// dead.
    pub(super) fn prune_download_caches(&self) -> anyhow::Result<usize> {
        let mut removed = 0;
        for entry in read_dir_if_any(&self.root().join(APT_LISTS))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let stale_partial = name.starts_with(LISTS_PARTIAL_PREFIX)
                && entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > PARTIAL_AGE);
            if name.starts_with(LISTS_DISCARD_PREFIX) || stale_partial {
                fs_err::remove_dir_all(entry.path())?;
                removed += 1;
            }
        }
        removed += super::deb_cache::prune_partial(
            &self.root().join(super::deb_cache::DEBS),
            PARTIAL_AGE,
        )?;
        Ok(removed)
    }
}

/// A directory's entries; none when it does not exist (a store that never cached any).
fn read_dir_if_any(path: &Path) -> anyhow::Result<Vec<std::io::Result<std::fs::DirEntry>>> {
    match std::fs::read_dir(path) {
        Ok(entries) => Ok(entries.collect()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(error) => Err(anyhow::Error::new(error).context(format!("reading {}", path.display()))),
    }
}

/// A file's SHA-256 in hex, read in chunks.
pub(crate) fn file_sha256(path: &Path) -> anyhow::Result<String> {
    let mut file = fs_err::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; super::objects::READ_CHUNK];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            return Ok(hex(&hasher.finalize()));
        }
        hasher.update(&buffer[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsck_finds_a_damaged_blob_and_lists_without_their_marker_and_repair_removes_them() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("store")).expect("store");
        let blobs = store.root().join(OCI_BLOBS).join("sha256");
        fs_err::create_dir_all(&blobs).expect("mkdir");
        let good = b"a layer";
        let good_name = hex(&Sha256::digest(good));
        fs_err::write(blobs.join(&good_name), good).expect("write");
        let bad_name = hex(&Sha256::digest(b"another layer"));
        fs_err::write(blobs.join(&bad_name), b"another lay").expect("write");
        fs_err::write(blobs.join(".tmpXYZ"), b"being written").expect("write");
        let lists = store.root().join(APT_LISTS);
        fs_err::create_dir_all(lists.join("whole")).expect("mkdir");
        fs_err::write(lists.join("whole").join(LISTS_WHOLE_MARKER), b"").expect("write");
        fs_err::create_dir_all(lists.join("half")).expect("mkdir");
        fs_err::write(lists.join("half/Packages"), b"Package: a\n").expect("write");
        fs_err::create_dir_all(lists.join(format!("{LISTS_DISCARD_PREFIX}1-2"))).expect("mkdir");

        let damaged = store.check_download_caches(false).expect("check");
        assert_eq!(damaged.len(), 2, "{damaged:?}");
        assert!(damaged[0].contains(&bad_name), "{damaged:?}");
        assert!(damaged[1].contains("half"), "{damaged:?}");
        let report = store.fsck(false).expect("fsck");
        assert!(!report.is_clean(), "a damaged cache fails fsck");

        assert_eq!(store.check_download_caches(true).expect("repair").len(), 2);
        assert!(
            store
                .check_download_caches(false)
                .expect("check")
                .is_empty()
        );
        assert!(blobs.join(&good_name).is_file() && lists.join("whole").is_dir());
        assert!(!blobs.join(&bad_name).exists() && !lists.join("half").exists());

        assert_eq!(store.prune_download_caches().expect("prune"), 1);
        assert!(lists.join("whole").is_dir());
    }
}
