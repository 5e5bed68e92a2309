//! Small JSON state files beside the build (fingerprints, artifacts, caches): read leniently —
//! a missing or damaged file is an empty cache — and written atomically (temp file, rename), so
//! a killed build leaves the old file or the new one, never half of one.

use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The file's value, or the default when it is missing or unreadable.
pub fn load_or_default<T: DeserializeOwned + Default>(path: &Path) -> T {
    load(path).unwrap_or_default()
}

/// The file's value, or `None` when it is missing or unreadable.
pub fn load<T: DeserializeOwned>(path: &Path) -> Option<T> {
    std::fs::read(path)
        .ok()
        .and_then(|data| serde_json::from_slice(&data).ok())
}

/// Replace the file with `value`, creating its directory. The temporary file has a name of
/// its own, so two processes writing the same file each rename their own whole copy.
pub fn write_atomically(path: &Path, value: &impl Serialize) -> anyhow::Result<()> {
    write_bytes_atomically(path, &serde_json::to_vec(value)?, "state-renaming")
}

/// Replace the file with `bytes` by a uniquely named temporary file and a rename;
/// `fault_point` names the moment between the two for the kill tests.
pub fn write_bytes_atomically(path: &Path, bytes: &[u8], fault_point: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    fs_err::create_dir_all(parent)?;
    // Named after the file it replaces: a leftover of a killed process says what it was.
    let prefix = format!(
        ".{}.",
        path.file_name()
            .map_or_else(|| "state".into(), |n| n.to_string_lossy())
    );
    let mut temp = tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(".tmp")
        .tempfile_in(parent)
        .map_err(|e| anyhow::anyhow!("creating a temporary file in {}: {e}", parent.display()))?;
    temp.write_all(bytes)?;
    crate::test_hooks::point(fault_point);
    temp.persist(path)
        .map_err(|e| anyhow::anyhow!("replacing {}: {}", path.display(), e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_replace_the_file_and_leave_no_temporary_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("state/cache.json");
        write_atomically(&path, &vec![1, 2, 3]).expect("first write");
        write_atomically(&path, &vec![4]).expect("second write");
        assert_eq!(load::<Vec<u32>>(&path), Some(vec![4]));
        let names: Vec<String> = std::fs::read_dir(path.parent().expect("parent"))
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["cache.json"]);
    }
}
