//! Updating the root filesystem of a disk written for an earlier tree, instead of writing it
//! again: the changes between the two trees become a `debugfs -w` script (remove what went,
//! create what came, set modes, owners and times) run on the partition in place. A rebuild
//! after one copied file changed then touches that file's blocks, not the disk's gigabytes.
//!
//! Only what debugfs does exactly is done this way: files, directories, symlinks, device
//! nodes and fifos with their modes, owners and mtimes. Hard links, xattrs, sockets and names
//! debugfs cannot quote make [`script`] decline, and the caller writes the disk from scratch.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context as _, bail};

use crate::process::Cmd;
use crate::store::objects::Objects;
use crate::store::tree::{Entry, EntryKind, Tree};

/// A debugfs script and the files it copies in.
#[derive(Debug, Default)]
pub struct Script {
    pub commands: String,
    /// (digest, local file name) of the contents `write` commands read.
    pub contents: Vec<(String, String)>,
    /// Entries added, changed or removed.
    pub changed: usize,
}

/// A name debugfs reads back as written inside double quotes.
fn quotable(path: &str) -> bool {
    !path.is_empty()
        && path
            .chars()
            .all(|c| c != '"' && c != '\\' && !c.is_control())
        && !path.split('/').any(|part| part.starts_with('-'))
}

fn type_bits(kind: EntryKind) -> Option<u32> {
    Some(match kind {
        EntryKind::File => 0o100000,
        EntryKind::Dir => 0o040000,
        EntryKind::Symlink => 0o120000,
        EntryKind::CharDevice => 0o020000,
        EntryKind::BlockDevice => 0o060000,
        EntryKind::Fifo => 0o010000,
        EntryKind::Hardlink | EntryKind::Socket => return None,
    })
}

fn same_content(old: &Entry, new: &Entry) -> bool {
    old.kind == new.kind
        && old.digest == new.digest
        && old.link_target == new.link_target
        && old.device == new.device
}

fn same_metadata(old: &Entry, new: &Entry) -> bool {
    old.mode == new.mode && old.uid == new.uid && old.gid == new.gid && old.mtime == new.mtime
}

fn split(path: &str) -> (&str, &str) {
    path.rsplit_once('/').unwrap_or(("", path))
}

/// The script that turns a filesystem holding `old` into one holding `new`, or `None` when a
/// change is beyond what debugfs does exactly.
pub fn script(old: &Tree, new: &Tree) -> Option<Script> {
    let mut out = Script::default();
    let mut removed = Vec::new();
    let mut created = Vec::new();
    let mut touched = Vec::new();
    for (path, entry) in old.entries() {
        match new.get(path) {
            Some(now) if same_content(entry, now) => {}
            _ => removed.push(path.as_str()),
        }
    }
    for (path, entry) in new.entries() {
        match old.get(path) {
            Some(before) if same_content(before, entry) => {
                if !same_metadata(before, entry) || before.xattrs != entry.xattrs {
                    touched.push(path.as_str());
                }
            }
            _ => created.push(path.as_str()),
        }
    }
    let changed: Vec<&str> = removed
        .iter()
        .chain(&created)
        .chain(&touched)
        .copied()
        .collect();
    for path in &changed {
        let named = if path.is_empty() {
            // The root directory can change its metadata, not be created or removed.
            !removed.contains(path) && !created.contains(path)
        } else {
            quotable(path)
        };
        let kinds_supported = [old.get(path), new.get(path)]
            .iter()
            .flatten()
            .all(|e| type_bits(e.kind).is_some());
        if !named || !kinds_supported {
            return None;
        }
    }
    // The script writes no xattrs: a created entry has none, a changed one keeps its own.
    if created
        .iter()
        .any(|p| new.get(p).is_some_and(|e| !e.xattrs.is_empty()))
        || touched
            .iter()
            .any(|p| old.get(p).map(|e| &e.xattrs) != new.get(p).map(|e| &e.xattrs))
    {
        return None;
    }
    out.changed = changed.len();
    let commands = &mut out.commands;
    // Children before their directories.
    for path in removed.iter().rev() {
        let entry = old.get(path)?;
        let verb = if entry.kind == EntryKind::Dir {
            "rmdir"
        } else {
            "rm"
        };
        let _ = writeln!(commands, "{verb} \"/{path}\"");
    }
    // Parents before their children.
    for path in &created {
        let entry = new.get(path)?;
        let (parent, name) = split(path);
        let _ = writeln!(commands, "cd \"/{parent}\"");
        match entry.kind {
            EntryKind::Dir => {
                let _ = writeln!(commands, "mkdir \"{name}\"");
            }
            EntryKind::File => {
                let digest = entry.digest.clone()?;
                let local = format!("content-{}", out.contents.len());
                let _ = writeln!(commands, "write \"{{CONTENTS}}/{local}\" \"{name}\"");
                out.contents.push((digest, local));
            }
            EntryKind::Symlink => {
                let target = entry.link_target.as_deref()?;
                if !quotable(target.trim_start_matches('/')) {
                    return None;
                }
                let _ = writeln!(commands, "symlink \"{name}\" \"{target}\"");
            }
            EntryKind::CharDevice | EntryKind::BlockDevice => {
                let (major, minor) = entry.device?;
                let letter = if entry.kind == EntryKind::CharDevice {
                    'c'
                } else {
                    'b'
                };
                let _ = writeln!(commands, "mknod \"{name}\" {letter} {major} {minor}");
            }
            EntryKind::Fifo => {
                let _ = writeln!(commands, "mknod \"{name}\" p");
            }
            EntryKind::Hardlink | EntryKind::Socket => return None,
        }
    }
    let _ = writeln!(commands, "cd /");
    // Modes, owners and times of what was created or changed, and the mtimes of the
    // directories whose listings changed (debugfs leaves those at the time of the edit).
    let mut parents: BTreeSet<&str> = BTreeSet::new();
    for path in removed.iter().chain(&created) {
        parents.insert(split(path).0);
    }
    let metadata: BTreeSet<&str> = created
        .iter()
        .chain(&touched)
        .copied()
        .chain(parents.iter().copied().filter(|p| new.get(p).is_some()))
        .collect();
    for path in metadata {
        let entry = new.get(path)?;
        let mode = type_bits(entry.kind)? | (entry.mode & 0o7777);
        let quoted = format!("\"/{path}\"");
        let _ = writeln!(commands, "sif {quoted} mode 0{mode:o}");
        let _ = writeln!(commands, "sif {quoted} uid {}", entry.uid);
        let _ = writeln!(commands, "sif {quoted} gid {}", entry.gid);
        let _ = writeln!(commands, "sif {quoted} mtime @{}", entry.mtime.max(0));
    }
    Some(out)
}

/// Run `script` on the ext4 filesystem at byte `offset` of `disk`, with the file contents
/// staged in `work`. Any complaint of debugfs is an error: the caller then writes the disk
/// from scratch.
pub fn apply(
    script: &Script,
    objects: &Objects,
    disk: &Path,
    offset: u64,
    work: &Path,
) -> anyhow::Result<()> {
    let contents = work.join("contents");
    fs_err::create_dir_all(&contents)?;
    for (digest, local) in &script.contents {
        let mut reader = objects.open(digest)?;
        let mut file = fs_err::File::create(contents.join(local))?;
        std::io::copy(&mut reader, &mut file)?;
    }
    let Some(contents_text) = contents.to_str().filter(|p| quotable(p)) else {
        bail!("the work directory's path cannot be quoted for debugfs");
    };
    let commands = script.commands.replace("{CONTENTS}", contents_text);
    let script_path = work.join("update.debugfs");
    fs_err::write(&script_path, commands)?;
    let (_, stderr) = Cmd::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(&script_path)
        .arg(format!("{}?offset={offset}", disk.display()))
        .output_and_stderr()
        .context("updating the root filesystem with debugfs")?;
    // debugfs exits 0 whatever its commands did; its complaints go to stderr, after the
    // version banner.
    let stderr = String::from_utf8_lossy(&stderr);
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|line| !line.starts_with("debugfs ") && !line.trim().is_empty())
        .collect();
    if !complaints.is_empty() {
        bail!("debugfs: {}", complaints.join("; "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(digest: &str, mode: u32) -> Entry {
        Entry {
            kind: EntryKind::File,
            size: 1,
            digest: Some(digest.into()),
            ..Entry::dir(mode)
        }
    }

    fn tree(entries: &[(&str, Entry)]) -> Tree {
        let mut tree = Tree::new();
        tree.insert("", Entry::dir(0o755)).expect("root");
        for (path, entry) in entries {
            tree.insert(path, entry.clone()).expect("insert");
        }
        tree
    }

    #[test]
    fn removals_go_deepest_first_creations_parents_first_and_metadata_follows() {
        let old = tree(&[
            ("etc", Entry::dir(0o755)),
            ("etc/old", Entry::dir(0o755)),
            ("etc/old/file", file("a", 0o644)),
            ("etc/kept", file("k", 0o644)),
            ("etc/edited", file("e1", 0o644)),
        ]);
        let new = tree(&[
            ("etc", Entry::dir(0o755)),
            ("etc/kept", file("k", 0o600)),
            ("etc/edited", file("e2", 0o640)),
            ("etc/new", Entry::dir(0o750)),
            ("etc/new/file", file("n", 0o644)),
        ]);
        let script = script(&old, &new).expect("supported");
        let lines: Vec<&str> = script.commands.lines().collect();
        let at = |line: &str| {
            lines
                .iter()
                .position(|l| *l == line)
                .unwrap_or_else(|| panic!("no {line:?} in {lines:#?}"))
        };
        assert!(at("rm \"/etc/old/file\"") < at("rmdir \"/etc/old\""));
        assert!(at("rm \"/etc/edited\"") < at("write \"{CONTENTS}/content-0\" \"edited\""));
        assert!(at("mkdir \"new\"") < at("write \"{CONTENTS}/content-1\" \"file\""));
        assert!(at("sif \"/etc/kept\" mode 0100600") > at("cd /"));
        assert!(lines.contains(&"sif \"/etc/edited\" mode 0100640"));
        assert!(lines.contains(&"sif \"/etc/new\" mode 040750"));
        // The parent whose listing changed gets its recorded mtime back.
        assert!(lines.contains(&"sif \"/etc\" mtime @0"));
        assert_eq!(
            script.contents,
            [
                ("e2".to_owned(), "content-0".to_owned()),
                ("n".to_owned(), "content-1".to_owned())
            ]
        );
        assert!(!script.commands.contains("/etc/kept\" mode 0100644"));
    }

    #[test]
    fn hard_links_xattrs_and_unquotable_names_are_declined() {
        let old = tree(&[("a", file("x", 0o644))]);
        let with_link = tree(&[
            ("a", file("x", 0o644)),
            (
                "b",
                Entry {
                    kind: EntryKind::Hardlink,
                    link_target: Some("a".into()),
                    ..Entry::dir(0o644)
                },
            ),
        ]);
        assert!(script(&old, &with_link).is_none());
        let mut xattrs = file("x", 0o644);
        xattrs
            .xattrs
            .insert("security.capability".into(), vec![1, 2, 3]);
        assert!(script(&old, &tree(&[("a", xattrs)])).is_none());
        let quoted = tree(&[("a", file("x", 0o644)), ("say \"hi\"", file("y", 0o644))]);
        assert!(script(&old, &quoted).is_none());
        assert!(script(&old, &old).is_some_and(|s| s.changed == 0));
    }
}
