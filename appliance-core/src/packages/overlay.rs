//! A writable view of a read-only tree: an overlayfs whose lower layer is a materialized
//! image (kept in the store's cache and shared by builds) and whose upper layer is scratch
//! space: a tmpfs that lives in the overlay's namespace, or a directory on disk. apt writes into the view; afterwards the upper layer holds exactly what changed, and
//! [`crate::store::import::apply_overlay_upper`] turns it into an edit of the image's tree.
//! Nothing is copied before apt runs and only what changed is read after.
//!
//! The overlay is mounted in a private mount namespace held by a helper process: the host
//! never sees the mount, and when the helper dies (with us, or killed) the mount goes with
//! its namespace. We reach the view through `/proc/<helper>/root`, and commands enter the
//! namespace with `nsenter` before they build their own sandbox inside it.

use std::ffi::OsString;
use std::io::{BufRead as _, BufReader, Read as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};

use anyhow::{Context as _, bail};

/// Mounts the overlay (its layers on a tmpfs when a size is given), says so, and holds the
/// namespace until its stdin closes. A line on stdin unmounts the overlay first, so that
/// the upper layer can be read while the tmpfs holding it still exists.
const HOLD_OVERLAY: &str = r#"set -eu
options=$1 merged=$2 layers=$3 size=$4
if [ -n "$size" ]; then
    mount -t tmpfs -o "size=$size,mode=0700" tmpfs "$layers"
fi
mkdir -p "$layers/upper" "$layers/work"
mount -t overlay overlay -o "$options" "$merged"
echo mounted
read -r _ || exit 0
umount "$merged"
echo unmounted
read -r _ || true
"#;

/// Extended attributes overlayfs interprets on its layers (`trusted.overlay.*`): a lower
/// layer carrying them would change what the view shows, so such trees are not overlaid.
pub const OVERLAY_XATTR_PREFIX: &str = "trusted.overlay.";

/// A mounted overlay; dropped, it is unmounted (its namespace ends).
#[derive(Debug)]
pub struct Overlay {
    helper: Child,
    keep_alive: Option<ChildStdin>,
    said: Option<BufReader<std::process::ChildStdout>>,
    merged: PathBuf,
    layers: PathBuf,
    in_memory: bool,
}

/// Where the upper layer lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpperLayer {
    /// On the filesystem of the scratch directory: its files can be moved into the store.
    OnDisk,
    /// On a tmpfs of at most this many bytes: dpkg's many fsyncs cost nothing there, and
    /// what apt writes is read back once from memory.
    InMemory(u64),
}

/// The upper layer after [`Overlay::unmount`]: readable until this is dropped.
#[derive(Debug)]
pub struct Unmounted {
    overlay: Overlay,
}

impl Unmounted {
    /// The upper layer's directory, as this process reaches it.
    pub fn upper(&self) -> PathBuf {
        if self.overlay.in_memory {
            self.overlay.reach(&self.overlay.layers.join("upper"))
        } else {
            self.overlay.layers.join("upper")
        }
    }

    /// Whether the upper layer's files are on the scratch directory's filesystem (and can be
    /// moved rather than copied).
    pub fn on_disk(&self) -> bool {
        !self.overlay.in_memory
    }
}

impl Overlay {
    /// Overlay `lower` (never written) with a new upper layer under `scratch`, which must be
    /// on a filesystem that overlayfs accepts as an upper layer.
    pub fn mount(lower: &Path, scratch: &Path, upper_layer: UpperLayer) -> anyhow::Result<Self> {
        let layers = scratch.join("layers");
        let upper = layers.join("upper");
        let work = layers.join("work");
        let merged = scratch.join("merged");
        for dir in [&layers, &merged] {
            fs_err::create_dir_all(dir)?;
        }
        let mut options = OsString::from("lowerdir=");
        options.push(escape_option(lower)?);
        options.push(",upperdir=");
        options.push(escape_option(&upper)?);
        options.push(",workdir=");
        options.push(escape_option(&work)?);
        // Directory renames fail with EXDEV (tools fall back to copying) instead of leaving
        // redirect xattrs, and files are copied up whole: the upper layer is then plain
        // files, directories and whiteouts, which is all `apply_overlay_upper` reads.
        options.push(",redirect_dir=nofollow,metacopy=off,index=off,xino=off");
        let mut helper = Command::new("unshare")
            .args(["--mount", "--propagation", "private"])
            .args(["sh", "-c", HOLD_OVERLAY, "overlay"])
            .arg(&options)
            .arg(&merged)
            .arg(&layers)
            .arg(match upper_layer {
                UpperLayer::OnDisk => String::new(),
                UpperLayer::InMemory(bytes) => bytes.to_string(),
            })
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running `unshare` (util-linux) to mount an overlay")?;
        let keep_alive = helper.stdin.take();
        let mut said = helper.stdout.take().map(BufReader::new);
        let mut line = String::new();
        if let Some(said) = said.as_mut() {
            said.read_line(&mut line)?;
        }
        if line.trim() != "mounted" {
            let mut error = String::new();
            if let Some(mut stderr) = helper.stderr.take() {
                stderr.read_to_string(&mut error).ok();
            }
            drop(keep_alive);
            helper.wait().ok();
            bail!("cannot mount an overlay here: {}", error.trim());
        }
        Ok(Self {
            helper,
            keep_alive,
            said,
            merged,
            layers,
            in_memory: matches!(upper_layer, UpperLayer::InMemory(_)),
        })
    }

    /// A path of the helper's namespace, as this process reaches it.
    fn reach(&self, path: &Path) -> PathBuf {
        let inside = path.strip_prefix("/").unwrap_or(path);
        PathBuf::from(format!("/proc/{}/root", self.helper.id())).join(inside)
    }

    /// The writable view, as this process reaches it.
    pub fn view(&self) -> PathBuf {
        self.reach(&self.merged)
    }

    /// Free bytes of the upper layer's filesystem (while mounted).
    pub fn upper_free_bytes(&self) -> Option<u64> {
        let stat = rustix::fs::statvfs(self.reach(&self.layers)).ok()?;
        Some(stat.f_bavail.saturating_mul(stat.f_frsize))
    }

    /// The view's path inside the helper's namespace.
    pub fn merged(&self) -> &Path {
        &self.merged
    }

    /// The command prefix that runs a program in the namespace where the view is mounted.
    pub fn enter(&self) -> Vec<OsString> {
        vec![
            "nsenter".into(),
            "--target".into(),
            self.helper.id().to_string().into(),
            "--mount".into(),
            "--".into(),
        ]
    }

    /// Unmount the overlay; its upper layer (what changed) stays readable until the result
    /// is dropped.
    pub fn unmount(mut self) -> anyhow::Result<Unmounted> {
        use std::io::Write as _;
        let stdin = self
            .keep_alive
            .as_mut()
            .context("the overlay's holder is gone")?;
        stdin
            .write_all(b"unmount\n")
            .and_then(|()| stdin.flush())
            .context("asking the overlay's holder to unmount")?;
        let mut line = String::new();
        if let Some(said) = self.said.as_mut() {
            said.read_line(&mut line)?;
        }
        if line.trim() != "unmounted" {
            drop(self.keep_alive.take());
            let mut error = String::new();
            if let Some(mut stderr) = self.helper.stderr.take() {
                stderr.read_to_string(&mut error).ok();
            }
            self.helper.wait().ok();
            bail!("cannot unmount the overlay: {}", error.trim());
        }
        Ok(Unmounted { overlay: self })
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        if self.keep_alive.is_some() {
            self.helper.kill().ok();
            drop(self.keep_alive.take());
            self.helper.wait().ok();
        }
    }
}

/// A path as a mount option value. overlayfs splits its options at `,` and its lower layers
/// at `:`, and mount(8) has its own quoting: paths with those characters are refused (the
/// caller falls back to a plain copy) rather than escaped two ways.
fn escape_option(path: &Path) -> anyhow::Result<OsString> {
    let bytes = path.as_os_str().as_encoded_bytes();
    if bytes
        .iter()
        .any(|b| matches!(b, b',' | b':' | b'\\' | b'"' | b'\n'))
    {
        bail!(
            "{} has a character overlayfs options cannot carry",
            path.display()
        );
    }
    Ok(path.as_os_str().to_owned())
}

/// Whether the sandbox may overlay `tree`: none of its entries carry attributes overlayfs
/// would act on.
pub fn can_overlay(tree: &crate::store::tree::Tree) -> bool {
    tree.entries()
        .values()
        .all(|e| !e.xattrs.keys().any(|k| k.starts_with(OVERLAY_XATTR_PREFIX)))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use super::*;
    use crate::store::Store;
    use crate::store::import::{Limits, apply_overlay_upper, import_directory};
    use crate::store::tree::{Entry, EntryKind};

    /// The base's mtime, told apart from the times the changes leave.
    const BASE_TIME: i64 = 1_000_000_000;

    fn write(path: &Path, text: &str) {
        fs_err::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs_err::write(path, text).expect("write");
    }

    fn base(root: &Path) {
        write(&root.join("etc/kept"), "kept");
        rustix::fs::setxattr(
            root.join("etc/kept"),
            "user.origin",
            b"base",
            rustix::fs::XattrFlags::empty(),
        )
        .expect("xattr");
        write(&root.join("etc/edited"), "old");
        write(&root.join("etc/chmodded"), "same content");
        write(&root.join("etc/removed"), "gone soon");
        write(&root.join("etc/moved"), "moving");
        write(&root.join("etc/links/a"), "linked");
        fs_err::hard_link(root.join("etc/links/a"), root.join("etc/links/b")).expect("link");
        write(&root.join("usr/share/doc/pkg/x"), "x");
        write(&root.join("usr/share/doc/pkg/deeper/y"), "y");
        write(&root.join("usr/share/doc/other/z"), "z");
        write(&root.join("var/dir-to-file/child"), "child");
        write(&root.join("var/file-to-dir"), "file");
        std::os::unix::fs::symlink("target", root.join("var/symlink")).expect("symlink");
        write(&root.join("opt/gone/a/b"), "b");
        let status = std::process::Command::new("find")
            .arg(root)
            .args(["-exec", "touch", "-h", "-d", "@1000000000", "{}", "+"])
            .status()
            .expect("find");
        assert!(status.success());
    }

    /// What a package install does to a tree, in miniature: every kind of change overlayfs
    /// records differently (copy-up, whiteout, opaque directory, replaced kinds, links).
    fn change(root: &Path) {
        fs_err::write(root.join("etc/edited"), "new content").expect("edit");
        fs_err::set_permissions(
            root.join("etc/chmodded"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .expect("chmod");
        fs_err::remove_file(root.join("etc/removed")).expect("rm");
        fs_err::rename(root.join("etc/moved"), root.join("etc/moved-to")).expect("mv");
        fs_err::hard_link(root.join("etc/kept"), root.join("etc/kept-link")).expect("link");
        fs_err::remove_file(root.join("etc/links/b")).expect("rm link");
        std::os::unix::fs::symlink("../kept", root.join("etc/new-link")).expect("symlink");
        fs_err::remove_dir_all(root.join("usr/share/doc/pkg")).expect("rm -r");
        write(&root.join("usr/share/doc/pkg/fresh"), "fresh");
        fs_err::remove_dir_all(root.join("var/dir-to-file")).expect("rm -r");
        write(&root.join("var/dir-to-file"), "now a file");
        fs_err::remove_file(root.join("var/file-to-dir")).expect("rm");
        write(&root.join("var/file-to-dir/child"), "now a directory");
        fs_err::remove_file(root.join("var/symlink")).expect("rm");
        write(&root.join("var/symlink"), "now a file");
        fs_err::remove_dir_all(root.join("opt/gone")).expect("rm -r");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            root.join("var/fifo"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o640),
            0,
        )
        .expect("mkfifo");
    }

    /// Entries with the mtime reduced to "the base's" or "changed": the two runs of the
    /// changes happen at different instants.
    fn comparable(entries: &BTreeMap<String, Entry>) -> BTreeMap<String, (Entry, bool)> {
        entries
            .iter()
            .map(|(path, entry)| {
                let kept_time = entry.mtime == BASE_TIME;
                (
                    path.clone(),
                    (
                        Entry {
                            mtime: 0,
                            ..entry.clone()
                        },
                        kept_time,
                    ),
                )
            })
            .collect()
    }

    #[test]
    fn the_upper_layer_applied_to_the_base_equals_the_same_changes_made_to_a_copy() {
        assert!(
            rustix::process::geteuid().is_root(),
            "mounting an overlay needs root (see README)"
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("store")).expect("store");
        let source = dir.path().join("base");
        base(&source);
        let mut staging = store.staging().expect("staging");
        let tree = import_directory(&source, &mut staging, Limits::default())
            .expect("import")
            .tree;
        staging.commit().expect("commit");
        assert!(can_overlay(&tree));

        let copy = dir.path().join("copy");
        crate::store::export::export_directory(&tree, &store.objects(), &copy).expect("export");
        change(&copy);
        let mut staging = store.staging().expect("staging");
        let expected = import_directory(&copy, &mut staging, Limits::default()).expect("import");
        let expected = comparable(expected.tree.entries());

        let lower = store
            .materialized(&tree, &tree.digest())
            .expect("materialize");
        assert!(lower.written);
        for (index, upper_layer) in [UpperLayer::OnDisk, UpperLayer::InMemory(64 << 20)]
            .into_iter()
            .enumerate()
        {
            let scratch = dir.path().join(format!("scratch-{index}"));
            let overlay = Overlay::mount(lower.path(), &scratch, upper_layer).expect("mount");
            change(&overlay.view());
            let unmounted = overlay.unmount().expect("unmount");
            assert_eq!(unmounted.on_disk(), upper_layer == UpperLayer::OnDisk);
            let mut staging = store.staging().expect("staging");
            let applied = apply_overlay_upper(
                tree.clone(),
                &unmounted.upper(),
                &mut staging,
                Limits::default(),
                unmounted.on_disk(),
            )
            .expect("apply");
            drop(unmounted);
            let applied = comparable(applied.tree.entries());
            for path in expected.keys().chain(applied.keys()) {
                assert_eq!(
                    applied.get(path),
                    expected.get(path),
                    "at {path:?}, upper layer {upper_layer:?}"
                );
            }
            // The cases the comparison must have seen.
            assert_eq!(applied["etc/kept-link"].0.kind, EntryKind::Hardlink);
            assert_eq!(applied["etc/links/a"].0.kind, EntryKind::File);
            assert_eq!(applied["etc/kept"].0.xattrs["user.origin"], b"base");
            assert!(applied["etc/kept"].1, "a copied-up file keeps its mtime");
            assert!(!applied.contains_key("usr/share/doc/pkg/x"));
            assert!(applied.contains_key("usr/share/doc/other/z"));
            assert_eq!(applied["var/file-to-dir"].0.kind, EntryKind::Dir);
            assert!(!applied.keys().any(|p| p.starts_with("opt/gone")));
            assert!(
                applied
                    .values()
                    .all(|(e, _)| !e.xattrs.keys().any(|k| k.starts_with(OVERLAY_XATTR_PREFIX)))
            );
        }
        // The in-memory upper layer went with its namespace.
        let layers = dir.path().join("scratch-1/layers");
        assert_eq!(fs_err::read_dir(&layers).expect("layers").count(), 0);
    }

    #[test]
    fn an_overlay_whose_tmpfs_fills_up_says_how_much_is_left() {
        assert!(rustix::process::geteuid().is_root(), "needs root");
        let dir = tempfile::tempdir().expect("temp dir");
        let lower = dir.path().join("lower");
        fs_err::create_dir_all(&lower).expect("mkdir");
        let overlay = Overlay::mount(
            &lower,
            &dir.path().join("scratch"),
            UpperLayer::InMemory(1 << 20),
        )
        .expect("mount");
        let free = overlay.upper_free_bytes().expect("statvfs");
        assert!(free <= 1 << 20 && free > 0, "{free}");
        let too_big = vec![0u8; 2 << 20];
        let error = std::fs::write(overlay.view().join("big"), &too_big).expect_err("full");
        assert_eq!(
            error.raw_os_error(),
            Some(rustix::io::Errno::NOSPC.raw_os_error()),
            "{error}"
        );
        assert!(overlay.upper_free_bytes().expect("statvfs") < 64 << 10);
    }

    #[test]
    fn a_tree_carrying_overlayfs_attributes_is_not_overlaid() {
        let mut entries = BTreeMap::new();
        entries.insert(String::new(), Entry::dir(0o755));
        let mut opaque = Entry::dir(0o755);
        opaque
            .xattrs
            .insert("trusted.overlay.opaque".into(), b"y".to_vec());
        entries.insert("etc".into(), opaque);
        let tree = crate::store::tree::Tree::from_entries(entries);
        assert!(!can_overlay(&tree));
    }
}
