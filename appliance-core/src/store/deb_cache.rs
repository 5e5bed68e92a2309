//! apt's downloaded packages, kept under the store (`cache/debs/`) for every later build.
//!
//! apt takes a file in its archives directory whose size matches the index as downloaded: it
//! does not hash it. A cached `.deb` damaged on disk (same size, other bytes) was therefore
//! installed as it was — dpkg-deb failing in every later build, with nothing pointing at the
//! cache. So a cached package is offered to apt only once its SHA-256 equals the entry of the
//! package lists in use, and one that does not is removed for apt to download again. A file's
//! hash is remembered per identity (inode, size, modification time: a write changes the
//! last) in `.verified.json`, so a build hashes only the files new to it, and `fsck` hashes
//! them all against every cached set of lists.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The cached packages, under the store's root.
pub const DEBS: &str = "cache/debs";
/// The hashes already computed, per file identity.
const VERIFIED: &str = ".verified.json";
/// A package being saved into the cache (renamed into place when whole).
const SAVING_SUFFIX: &str = ".partial";

/// One package version as the index describes its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexedFile {
    pub size: u64,
    pub sha256: String,
}

/// What a set of fetched package lists says: every package name (and every name a package
/// provides), and each version's file under the name apt gives it in its archives directory.
#[derive(Debug, Default)]
pub struct PackageIndex {
    pub names: BTreeSet<String>,
    pub files: HashMap<String, IndexedFile>,
}

impl PackageIndex {
    /// Read every `*_Packages` file of an apt lists directory.
    pub fn read(lists: &Path) -> anyhow::Result<Self> {
        let mut index = Self::default();
        for entry in fs_err::read_dir(lists)? {
            let path = entry?.path();
            if path.to_string_lossy().ends_with("_Packages") {
                index.add(&fs_err::read_to_string(&path)?);
            }
        }
        Ok(index)
    }

    /// Add the stanzas of one `Packages` file.
    fn add(&mut self, text: &str) {
        for stanza in text.split("\n\n") {
            let mut fields: HashMap<&str, &str> = HashMap::new();
            for line in stanza.lines() {
                // Continuation lines (descriptions) start with white space.
                if line.starts_with([' ', '\t']) {
                    continue;
                }
                if let Some((field, value)) = line.split_once(':') {
                    fields.insert(field, value.trim());
                }
            }
            let Some(package) = fields.get("Package") else {
                continue;
            };
            self.names.insert((*package).to_owned());
            if let Some(provides) = fields.get("Provides") {
                for item in provides.split(',') {
                    if let Some(name) = item.split_whitespace().next() {
                        self.names.insert(name.to_owned());
                    }
                }
            }
            let (Some(version), Some(architecture), Some(filename), Some(size), Some(sha256)) = (
                fields.get("Version"),
                fields.get("Architecture"),
                fields.get("Filename"),
                fields.get("Size").and_then(|s| s.parse::<u64>().ok()),
                fields.get("SHA256"),
            ) else {
                continue;
            };
            let extension = filename.rsplit_once('.').map_or("deb", |(_, e)| e);
            self.files.insert(
                archive_file_name(package, version, architecture, extension),
                IndexedFile {
                    size,
                    sha256: sha256.to_ascii_lowercase(),
                },
            );
        }
    }
}

/// The name apt stores a package version's file under: `name_version_arch.deb`, each part
/// quoted as apt's `QuoteString` does (an epoch's `:` becomes `%3a`). The pool's file name
/// cannot be used: it leaves the epoch out.
fn archive_file_name(package: &str, version: &str, architecture: &str, extension: &str) -> String {
    format!(
        "{}_{}_{}.{extension}",
        quote(package, "_:"),
        quote(version, "_:"),
        quote(architecture, "_:.")
    )
}

fn quote(text: &str, bad: &str) -> String {
    let mut quoted = String::with_capacity(text.len());
    for byte in text.bytes() {
        if bad.as_bytes().contains(&byte) || byte == b'%' || !(0x21..0x7f).contains(&byte) {
            quoted.push_str(&format!("%{byte:02x}"));
        } else {
            quoted.push(char::from(byte));
        }
    }
    quoted
}

/// A file's identity, for [`Verified`]: any write to it changes its modification time, a
/// replacement its inode. (Not the change time: hard-linking it into a build changes that.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Identity {
    inode: u64,
    size: u64,
    modified_ns: i128,
}

impl Identity {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            inode: meta.ino(),
            size: meta.size(),
            modified_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Hashed {
    identity: Identity,
    sha256: String,
}

/// The hashes computed so far, by file name. Lost or stale entries only cost a rehash.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Verified {
    files: BTreeMap<String, Hashed>,
}

/// The cache directory's hashes: reading them, hashing what is new, writing them back.
struct Hashes<'a> {
    dir: &'a Path,
    verified: Verified,
    changed: bool,
}

impl<'a> Hashes<'a> {
    fn load(dir: &'a Path) -> Self {
        Self {
            dir,
            verified: crate::json_file::load_or_default(&dir.join(VERIFIED)),
            changed: false,
        }
    }

    /// The file's SHA-256, hashed only when its identity is new.
    fn of(&mut self, name: &str) -> anyhow::Result<String> {
        let path = self.dir.join(name);
        let identity = Identity::of(&fs_err::metadata(&path)?);
        if let Some(known) = self.verified.files.get(name)
            && known.identity == identity
        {
            return Ok(known.sha256.clone());
        }
        let sha256 = crate::store::download_caches::file_sha256(&path)?;
        self.verified.files.insert(
            name.to_owned(),
            Hashed {
                identity,
                sha256: sha256.clone(),
            },
        );
        self.changed = true;
        Ok(sha256)
    }

    fn forget(&mut self, name: &str) {
        self.changed |= self.verified.files.remove(name).is_some();
    }

    fn save(self) -> anyhow::Result<()> {
        if self.changed {
            crate::json_file::write_atomically(&self.dir.join(VERIFIED), &self.verified)?;
        }
        Ok(())
    }
}

/// Offer apt the cached packages the index lists, each only once its hash equals the index
/// entry. A cached file that does not is removed (`damaged` is told its name), so apt
/// downloads it again; files of versions the index does not list are left alone.
pub fn offer(
    cache: &Path,
    archives: &Path,
    index: &PackageIndex,
    mut damaged: impl FnMut(&str),
) -> anyhow::Result<()> {
    let mut hashes = Hashes::load(cache);
    for name in cached_packages(cache)? {
        let Some(expected) = index.files.get(&name) else {
            continue;
        };
        let target = archives.join(&name);
        if target.exists() {
            continue;
        }
        let path = cache.join(&name);
        let whole =
            fs_err::metadata(&path)?.len() == expected.size && hashes.of(&name)? == expected.sha256;
        if !whole {
            damaged(&name);
            fs_err::remove_file(&path)?;
            hashes.forget(&name);
            continue;
        }
        if std::fs::hard_link(&path, &target).is_err() {
            fs_err::copy(&path, &target)?;
        }
    }
    hashes.save()
}

/// Keep what apt downloaded for later builds: each file new to the cache is hashed and kept
/// only when it equals its index entry (it is not trusted for having been in the sandbox),
/// and is put in place by a rename of a whole copy.
pub fn keep(archives: &Path, cache: &Path, index: &PackageIndex) -> anyhow::Result<()> {
    fs_err::create_dir_all(cache)?;
    let mut hashes = Hashes::load(cache);
    for name in cached_packages(archives)? {
        let target = cache.join(&name);
        if target.exists() {
            continue;
        }
        let Some(expected) = index.files.get(&name) else {
            continue;
        };
        if crate::store::download_caches::file_sha256(&archives.join(&name))? != expected.sha256 {
            continue;
        }
        let temp = cache.join(format!(".{name}.{}{SAVING_SUFFIX}", std::process::id()));
        if std::fs::hard_link(archives.join(&name), &temp).is_err() {
            fs_err::copy(archives.join(&name), &temp)?;
        }
        fs_err::rename(&temp, &target)?;
        hashes.verified.files.insert(
            name.clone(),
            Hashed {
                identity: Identity::of(&fs_err::metadata(&target)?),
                sha256: expected.sha256.clone(),
            },
        );
        hashes.changed = true;
    }
    hashes.save()
}

/// For `fsck`: cached packages whose content differs from every cached index's entry for
/// them, each said with what is wrong; `repair` removes them. Packages no cached index lists
/// cannot be checked, and are never offered to apt.
pub fn damaged(cache: &Path, lists: &Path, repair: bool) -> anyhow::Result<Vec<String>> {
    let names = cached_packages(cache)?;
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let mut expected: HashMap<String, BTreeSet<String>> = HashMap::new();
    if let Ok(entries) = std::fs::read_dir(lists) {
        for entry in entries.flatten() {
            let whole = entry
                .path()
                .join(crate::store::download_caches::LISTS_WHOLE_MARKER)
                .is_file();
            if !whole {
                continue;
            }
            for (name, file) in PackageIndex::read(&entry.path())?.files {
                if names.contains(&name) {
                    expected.entry(name).or_default().insert(file.sha256);
                }
            }
        }
    }
    let mut hashes = Hashes::load(cache);
    let mut damaged = Vec::new();
    for name in &names {
        let Some(hashes_listed) = expected.get(name) else {
            continue;
        };
        let path = cache.join(name);
        // Hashed again whatever the memo says: fsck is where bytes rotting in place show.
        let actual = crate::store::download_caches::file_sha256(&path)?;
        if !hashes_listed.contains(&actual) {
            damaged.push(format!(
                "cached package {}: its content hashes to {actual}, not to what the package lists say",
                path.display()
            ));
            if repair {
                fs_err::remove_file(&path)?;
                hashes.forget(name);
            }
        }
    }
    hashes.save()?;
    Ok(damaged)
}

/// For `gc`: files of saves killed half-way (each has its writer's process id in its name, so
/// only a dead build's are old).
pub fn prune_partial(cache: &Path, older_than: std::time::Duration) -> anyhow::Result<usize> {
    let mut removed = 0;
    if let Ok(entries) = std::fs::read_dir(cache) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > older_than);
            if name.starts_with('.') && name.ends_with(SAVING_SUFFIX) && old {
                fs_err::remove_file(entry.path())?;
                removed += 1;
            }
        }
    }
    Ok(removed)
}

/// The `.deb` files (regular files only) of a directory; none when it does not exist.
fn cached_packages(dir: &Path) -> anyhow::Result<BTreeSet<String>> {
    let mut debs = BTreeSet::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".deb")
                && !name.starts_with('.')
                && entry.file_type().is_ok_and(|t| t.is_file())
            {
                debs.insert(name);
            }
        }
    }
    Ok(debs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest as _, Sha256};

    const PACKAGES: &str = "Package: tree\n\
Version: 2.1.0-1\n\
Architecture: amd64\n\
Description: displays a tree\n continued line: not a field\n\
Filename: pool/main/t/tree/tree_2.1.0-1_amd64.deb\n\
Size: 5\n\
SHA256: SHA\n\
\n\
Package: dmsetup\n\
Version: 2:1.02.185-2\n\
Architecture: amd64\n\
Provides: device-mapper\n\
Filename: pool/main/l/lvm2/dmsetup_1.02.185-2_amd64.deb\n\
Size: 9\n\
SHA256: abc\n";

    #[test]
    fn index_names_files_as_apt_does_with_the_epoch_quoted() {
        let mut index = PackageIndex::default();
        index.add(PACKAGES);
        assert_eq!(
            index.names.iter().map(String::as_str).collect::<Vec<_>>(),
            ["device-mapper", "dmsetup", "tree"]
        );
        assert_eq!(
            index.files.get("dmsetup_2%3a1.02.185-2_amd64.deb"),
            Some(&IndexedFile {
                size: 9,
                sha256: "abc".into()
            })
        );
        assert_eq!(index.files["tree_2.1.0-1_amd64.deb"].sha256, "sha");
        assert_eq!(index.files.len(), 2);
    }

    fn index_of(files: &[(&str, &[u8])]) -> PackageIndex {
        let mut index = PackageIndex::default();
        for (name, content) in files {
            index.files.insert(
                (*name).to_owned(),
                IndexedFile {
                    size: content.len() as u64,
                    sha256: crate::store::tree::hex(&Sha256::digest(content)),
                },
            );
        }
        index
    }

    #[test]
    fn only_packages_equal_to_their_index_entry_are_offered_and_damaged_ones_are_removed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let cache = dir.path().join("cache");
        let archives = dir.path().join("archives");
        fs_err::create_dir_all(&cache).expect("mkdir");
        fs_err::create_dir_all(&archives).expect("mkdir");
        let index = index_of(&[("a_1_all.deb", b"good a"), ("b_1_all.deb", b"good b")]);
        fs_err::write(cache.join("a_1_all.deb"), b"good a").expect("write");
        // Same size, other bytes: what apt would have taken.
        fs_err::write(cache.join("b_1_all.deb"), b"bad! b").expect("write");
        fs_err::write(cache.join("c_1_all.deb"), b"not listed").expect("write");

        let mut told = Vec::new();
        offer(&cache, &archives, &index, |name| told.push(name.to_owned())).expect("offer");
        assert_eq!(told, ["b_1_all.deb"]);
        assert_eq!(
            cached_packages(&archives).expect("list"),
            BTreeSet::from(["a_1_all.deb".to_owned()])
        );
        assert!(!cache.join("b_1_all.deb").exists(), "damaged one removed");
        assert!(cache.join("c_1_all.deb").exists(), "unlisted one kept");

        // Damaged after it was hashed once: its new modification time makes it hashed again.
        fs_err::remove_file(archives.join("a_1_all.deb")).expect("rm");
        std::thread::sleep(std::time::Duration::from_millis(10));
        fs_err::write(cache.join("a_1_all.deb"), b"evil a").expect("write");
        told.clear();
        offer(&cache, &archives, &index, |name| told.push(name.to_owned())).expect("offer");
        assert_eq!(told, ["a_1_all.deb"]);
        assert!(cached_packages(&archives).expect("list").is_empty());
    }

    #[test]
    fn kept_packages_are_checked_and_fsck_finds_damage_the_memo_cannot_see() {
        let dir = tempfile::tempdir().expect("temp dir");
        let cache = dir.path().join("cache");
        let archives = dir.path().join("archives");
        let lists = dir.path().join("lists");
        fs_err::create_dir_all(&archives).expect("mkdir");
        fs_err::create_dir_all(lists.join("one")).expect("mkdir");
        let index = index_of(&[("a_1_all.deb", b"good a"), ("b_1_all.deb", b"good b")]);
        fs_err::write(archives.join("a_1_all.deb"), b"good a").expect("write");
        fs_err::write(archives.join("b_1_all.deb"), b"bad! b").expect("write");
        keep(&archives, &cache, &index).expect("keep");
        assert_eq!(
            cached_packages(&cache).expect("list"),
            BTreeSet::from(["a_1_all.deb".to_owned()]),
            "a file unequal to its index entry is not kept"
        );

        let sha = crate::store::tree::hex(&Sha256::digest(b"good a"));
        fs_err::write(
            lists.join("one/x_Packages"),
            format!(
                "Package: a\nVersion: 1\nArchitecture: all\nFilename: pool/a_1_all.deb\nSize: 6\nSHA256: {sha}\n"
            ),
        )
        .expect("write");
        assert!(
            damaged(&cache, &lists, false).expect("fsck").is_empty(),
            "lists without their marker are not read"
        );
        fs_err::write(
            lists
                .join("one")
                .join(crate::store::download_caches::LISTS_WHOLE_MARKER),
            b"",
        )
        .expect("write");
        assert!(damaged(&cache, &lists, false).expect("fsck").is_empty());

        // Bytes changed in place with the identity kept (as rot on disk would): only a hash
        // shows it.
        let path = cache.join("a_1_all.deb");
        let before = fs_err::metadata(&path)
            .expect("stat")
            .modified()
            .expect("mtime");
        fs_err::write(&path, b"rot! a").expect("write");
        fs_err::File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(before))
            .expect("set mtime");
        let found = damaged(&cache, &lists, false).expect("fsck");
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("a_1_all.deb"), "{found:?}");
        assert_eq!(damaged(&cache, &lists, true).expect("repair").len(), 1);
        assert!(!path.exists());
        assert!(damaged(&cache, &lists, false).expect("fsck").is_empty());
    }

    #[test]
    fn gc_removes_old_partial_saves_only() {
        let dir = tempfile::tempdir().expect("temp dir");
        fs_err::write(dir.path().join(".a_1_all.deb.42.partial"), b"half").expect("write");
        fs_err::write(dir.path().join("a_1_all.deb"), b"whole").expect("write");
        assert_eq!(
            prune_partial(dir.path(), std::time::Duration::from_secs(3600)).expect("prune"),
            0
        );
        assert_eq!(
            prune_partial(dir.path(), std::time::Duration::ZERO).expect("prune"),
            1
        );
        assert!(dir.path().join("a_1_all.deb").exists());
    }
}
