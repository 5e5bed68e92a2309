//! Test drive and back: `run --capture` boots a writable copy of the disk kept in
//! `target/appliance/NAME/testdrive/`, and `capture` turns what was done inside into manifest
//! edits. The copy's root filesystem is read without mounting (`disk`), compared with the
//! appliance's image by the same typed diff as `cargo appliance diff`, runtime noise left out
//! ([`crate::change::CAPTURE_NOISE`] and the manifest's `capture { ignore }`), consequences
//! set aside (apt's dependencies, what the packages' scripts and `useradd` made), and each
//! remaining change said as the manifest node that makes it (`items`): packages, files (copied
//! into the workspace), users, groups, services, host name, time zone, locale.

pub mod disk;
mod items;

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

pub use items::{Action, Capture, CapturedFile, ImageSide, Item, apply, compare};

/// The test drive's writable disk in `testdrive/`.
pub const DISK_FILE: &str = "disk.raw";
/// What the disk was made from, and whether it has been captured since.
const STATE_FILE: &str = "capture.json";

/// `testdrive/capture.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskState {
    /// The image the disk was written from (`NAME@VERSION`).
    pub image: String,
    pub tree_digest: String,
    /// `capture --apply` took its changes into the manifest: a new build may replace it.
    pub captured: bool,
}

/// How `run --capture` found the test drive's disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prepared {
    /// Copied from the output just now.
    Fresh,
    /// The disk of an earlier `run --capture` of the same image, booted again.
    Continued,
}

pub fn disk_path(drive: &Path) -> PathBuf {
    drive.join(DISK_FILE)
}

pub fn read_state(drive: &Path) -> anyhow::Result<Option<DiskState>> {
    let path = drive.join(STATE_FILE);
    match fs_err::read(&path) {
        Ok(data) => Ok(Some(serde_json::from_slice(&data).with_context(|| {
            format!(
                "{} is damaged; delete it and {DISK_FILE} beside it to start a new test drive",
                path.display()
            )
        })?)),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error.into()),
    }
}

fn write_state(drive: &Path, state: &DiskState) -> anyhow::Result<()> {
    crate::json_file::write_atomically(&drive.join(STATE_FILE), state)
}

/// Mark the test drive's disk as taken into the manifest.
pub fn mark_captured(drive: &Path) -> anyhow::Result<()> {
    if let Some(mut state) = read_state(drive)? {
        state.captured = true;
        write_state(drive, &state)?;
    }
    Ok(())
}

/// The writable disk `run --capture` boots: the earlier one when it was made from the same
/// image, else a sparse raw copy of `output` (raw or qcow2) made by `qemu-img convert`. A disk
/// of another image that was never captured is not replaced: that would lose what was done
/// in it.
pub fn prepare_disk(
    drive: &Path,
    output: &Path,
    output_format: &str,
    image: &crate::store::ImageRecord,
) -> anyhow::Result<(PathBuf, Prepared)> {
    fs_err::create_dir_all(drive)?;
    let disk = disk_path(drive);
    let state = read_state(drive)?;
    if disk.is_file()
        && let Some(state) = &state
    {
        if state.tree_digest == image.tree_digest {
            return Ok((disk, Prepared::Continued));
        }
        if !state.captured {
            bail!(
                "{} holds a test drive of {} that was never captured; take it into the manifest with `cargo appliance capture --apply`, or delete {} to start over",
                disk.display(),
                state.image,
                drive.display()
            );
        }
    }
    // Written beside and renamed into place: a killed copy never passes for a disk.
    let partial = drive.join(format!(".{DISK_FILE}.partial"));
    let _ = std::fs::remove_file(&partial);
    crate::process::Cmd::new("qemu-img")
        .args(["convert", "-f", output_format, "-O", "raw"])
        .arg(output)
        .arg(&partial)
        .output()
        .context("copying the disk for the test drive")?;
    fs_err::rename(&partial, &disk)?;
    write_state(
        drive,
        &DiskState {
            image: image.reference(),
            tree_digest: image.tree_digest.clone(),
            captured: false,
        },
    )?;
    Ok((disk, Prepared::Fresh))
}
