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

/// Replace the file with `value`, creating its directory.
pub fn write_atomically(path: &Path, value: &impl Serialize) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        fs_err::create_dir_all(parent)?;
    }
    let temp = path.with_extension("tmp");
    fs_err::write(&temp, serde_json::to_vec(value)?)?;
    crate::test_hooks::point("state-renaming");
    fs_err::rename(&temp, path)?;
    Ok(())
}
