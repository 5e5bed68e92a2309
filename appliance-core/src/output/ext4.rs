//! Root filesystems written by `debugfs -w` scripts run on an empty ext4 (from `mke2fs`)
//! or on the one an earlier build wrote. File contents are written straight from the store's
//! objects (verified first), so no tree is staged as thousands of files on the host's
//! filesystem, which is what made `mke2fs -d` from a staged tree slow.
//!
//! [`populate`] writes a whole tree; [`script`] turns a filesystem holding one tree into one
//! holding another (remove what went, create what came, set modes, owners and times): a
//! rebuild after one copied file changed touches that file's blocks, not the disk's
//! gigabytes. Names debugfs cannot quote make both decline; the update also declines hard
//! links and xattrs. The caller then writes the disk another way.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context as _, bail};

use crate::process::Cmd;
use crate::store::objects::Objects;
use crate::store::tree::{Entry, EntryKind, Tree};

/// A debugfs script and what it reads.
#[derive(Debug, Default)]
pub struct Script {
    /// Commands; `\0OBJECT:<digest>\0` stands for the path of an object, `\0XATTR:<n>\0`
    /// for the file holding the n-th xattr value (NUL is in no name, so no name is mistaken
    /// for a placeholder).
    pub commands: String,
    /// Digests of the contents `write` commands read.
    pub contents: BTreeSet<String>,
    pub xattr_values: Vec<Vec<u8>>,
    /// Entries added, changed or removed.
    pub changed: usize,
}

/// A name debugfs reads back as written inside double quotes (backslashes are literal there:
/// systemd's `system-systemd\x2dcryptsetup.slice` is fine). Commands that take options get
/// names as `./name` or `/path`, so a leading `-` is never read as one.
fn quotable(path: &str) -> bool {
    !path.is_empty() && path.chars().all(|c| c != '"' && !c.is_control())
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
        let _ = writeln!(out.commands, "cd \"/{parent}\"");
        create(&mut out, entry, name)?;
    }
    let commands = &mut out.commands;
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

/// Append the command that creates `entry` as `name` in debugfs's current directory;
/// returns the permission bits debugfs gives it (write takes the object file's 0444, mkdir
/// 0755, symlink 0777, mknod none; owners are root), or `None` for what the scripts do not
/// create (hard links are linked separately, sockets not at all).
fn create(out: &mut Script, entry: &Entry, name: &str) -> Option<u32> {
    let commands = &mut out.commands;
    Some(match entry.kind {
        EntryKind::Dir => {
            let _ = writeln!(commands, "mkdir \"{name}\"");
            0o755
        }
        EntryKind::File => {
            let digest = entry.digest.clone()?;
            let _ = writeln!(commands, "write \"\0OBJECT:{digest}\0\" \"{name}\"");
            out.contents.insert(digest);
            0o444
        }
        EntryKind::Symlink => {
            let target = entry.link_target.as_deref()?;
            if !quotable(target) || target.starts_with('-') {
                return None;
            }
            let _ = writeln!(commands, "symlink \"{name}\" \"{target}\"");
            0o777
        }
        EntryKind::CharDevice | EntryKind::BlockDevice => {
            let (major, minor) = entry.device?;
            let letter = if entry.kind == EntryKind::CharDevice {
                'c'
            } else {
                'b'
            };
            let _ = writeln!(commands, "mknod \"{name}\" {letter} {major} {minor}");
            0
        }
        EntryKind::Fifo => {
            let _ = writeln!(commands, "mknod \"{name}\" p");
            0
        }
        EntryKind::Hardlink | EntryKind::Socket => return None,
    })
}

/// The script that writes `tree` into an empty ext4 (`mke2fs` without `-d`), or `None` when
/// a name cannot be quoted for debugfs. Each entry is created with debugfs's clock set to its
/// mtime (`set_current_time`), so only modes and owners that differ from what debugfs
/// creates need a `sif`; hard links follow everything else, with their link counts.
pub fn populate(tree: &Tree) -> Option<Script> {
    let mut out = Script::default();
    let mut clock = None;
    let mut cwd = String::new();
    let mut links: Vec<(&str, &str)> = Vec::new();
    let mut link_counts: std::collections::BTreeMap<&str, u32> = Default::default();
    for (path, entry) in tree.entries() {
        if path.is_empty() {
            continue;
        }
        if !quotable(path) {
            return None;
        }
        if entry.kind == EntryKind::Hardlink {
            let target = entry.link_target.as_deref()?;
            if !quotable(target) {
                return None;
            }
            links.push((path, target));
            *link_counts.entry(target).or_insert(1) += 1;
            continue;
        }
        // mke2fs -d skips sockets too: nothing can use one from a disk image.
        if entry.kind == EntryKind::Socket {
            continue;
        }
        let commands = &mut out.commands;
        let (parent, name) = split(path);
        if cwd != parent {
            let _ = writeln!(commands, "cd \"/{parent}\"");
            cwd = parent.to_owned();
        }
        if clock != Some(entry.mtime) {
            let _ = writeln!(commands, "set_current_time @{}", entry.mtime.max(0));
            clock = Some(entry.mtime);
        }
        let created_mode = create(&mut out, entry, name)?;
        let commands = &mut out.commands;
        if entry.mode & 0o7777 != created_mode {
            let mode = type_bits(entry.kind)? | (entry.mode & 0o7777);
            let _ = writeln!(commands, "sif \"./{name}\" mode 0{mode:o}");
        }
        if entry.uid != 0 {
            let _ = writeln!(commands, "sif \"./{name}\" uid {}", entry.uid);
        }
        if entry.gid != 0 {
            let _ = writeln!(commands, "sif \"./{name}\" gid {}", entry.gid);
        }
        for (key, value) in &entry.xattrs {
            if !quotable(key) {
                return None;
            }
            let _ = writeln!(
                commands,
                "ea_set -f \"\0XATTR:{}\0\" \"./{name}\" \"{key}\"",
                out.xattr_values.len()
            );
            out.xattr_values.push(value.clone());
        }
    }
    let commands = &mut out.commands;
    let _ = writeln!(commands, "cd /");
    for (path, target) in &links {
        let (parent, name) = split(path);
        let _ = writeln!(commands, "cd \"/{parent}\"");
        let _ = writeln!(commands, "ln \"/{target}\" \"{name}\"");
    }
    let _ = writeln!(commands, "cd /");
    for (target, count) in &link_counts {
        let _ = writeln!(commands, "sif \"/{target}\" links_count {count}");
    }
    // Directories whose mtime the links changed, and the root: their recorded metadata.
    for (path, entry) in tree
        .entries()
        .iter()
        .filter(|(_, e)| e.kind == EntryKind::Dir)
    {
        let quoted = format!("\"/{path}\"");
        if path.is_empty() {
            let _ = writeln!(
                commands,
                "sif {quoted} mode 0{:o}",
                0o40000 | (entry.mode & 0o7777)
            );
            let _ = writeln!(commands, "sif {quoted} uid {}", entry.uid);
            let _ = writeln!(commands, "sif {quoted} gid {}", entry.gid);
        }
        if path.is_empty() || links.iter().any(|(link, _)| split(link).0 == path.as_str()) {
            let _ = writeln!(commands, "sif {quoted} mtime @{}", entry.mtime.max(0));
        }
    }
    out.changed = tree.len();
    Some(out)
}

/// Run `script` on the ext4 filesystem at byte `offset` of `disk`. The objects it writes are
/// verified against their digests first, and read by debugfs from the store; xattr values
/// are staged in `work`. Any complaint of debugfs is an error.
pub fn apply(
    script: &Script,
    objects: &Objects,
    disk: &Path,
    offset: u64,
    work: &Path,
) -> anyhow::Result<()> {
    let mut paths: std::collections::HashMap<String, String> = Default::default();
    for digest in &script.contents {
        std::io::copy(&mut objects.open(digest)?, &mut std::io::sink())
            .with_context(|| format!("verifying object {digest}"))?;
        let path = objects.path(digest);
        let Some(text) = path.to_str().filter(|p| quotable(p)) else {
            bail!("the store's path cannot be quoted for debugfs");
        };
        paths.insert(format!("OBJECT:{digest}"), text.to_owned());
    }
    if !script.xattr_values.is_empty() {
        let values = work.join("xattrs");
        fs_err::create_dir_all(&values)?;
        for (index, value) in script.xattr_values.iter().enumerate() {
            let file = values.join(index.to_string());
            fs_err::write(&file, value)?;
            let Some(text) = file.to_str().filter(|p| quotable(p)) else {
                bail!("the work directory's path cannot be quoted for debugfs");
            };
            paths.insert(format!("XATTR:{index}"), text.to_owned());
        }
    }
    let commands = fill(&script.commands, &paths)?;
    let script_path = work.join("ext4.debugfs");
    fs_err::write(&script_path, commands)?;
    let (_, stderr) = Cmd::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(&script_path)
        .arg(format!("{}?offset={offset}", disk.display()))
        .output_and_stderr()
        .context("writing the root filesystem with debugfs")?;
    // debugfs exits 0 whatever its commands did; its complaints go to stderr, after the
    // version banner.
    let stderr = String::from_utf8_lossy(&stderr);
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|line| !line.starts_with("debugfs ") && !line.trim().is_empty())
        .collect();
    if complaints.is_empty() {
        return Ok(());
    }
    // One cause repeats for every file after it (thousands of lines when the disk is full):
    // the first few say it, the count says the rest.
    const SHOWN: usize = 5;
    let mut said = complaints[..complaints.len().min(SHOWN)].join("; ");
    if complaints.len() > SHOWN {
        let _ = write!(said, "; and {} more", complaints.len() - SHOWN);
    }
    // ENOSPC is the host's filesystem (debugfs writes the disk file); a full ext4 inside the
    // disk is "Could not allocate block".
    if complaints
        .iter()
        .any(|line| line.contains("No space left on device"))
    {
        return Err(crate::disk_space::full(format!(
            "debugfs ran out of space writing the root filesystem into {}: {said}",
            disk.display()
        )));
    }
    bail!("debugfs: {said}")
}

/// The commands with each `\0NAME\0` placeholder replaced, in one pass (a script names
/// thousands of objects).
fn fill(
    commands: &str,
    values: &std::collections::HashMap<String, String>,
) -> anyhow::Result<String> {
    let mut out = String::with_capacity(commands.len() * 2);
    let mut rest = commands;
    while let Some(start) = rest.find('\0') {
        out.push_str(&rest[..start]);
        let Some(length) = rest[start + 1..].find('\0') else {
            bail!("an unterminated placeholder in the debugfs script");
        };
        let key = &rest[start + 1..start + 1 + length];
        let value = values
            .get(key)
            .with_context(|| format!("no value for {key} in the debugfs script"))?;
        out.push_str(value);
        rest = &rest[start + length + 2..];
    }
    out.push_str(rest);
    Ok(out)
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

    /// Where `line` is in the script; a missing line fails the test with the whole script.
    fn position(lines: &[&str], line: &str) -> usize {
        lines
            .iter()
            .position(|l| *l == line)
            .unwrap_or_else(|| panic!("no {line:?} in {lines:#?}"))
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
        let at = |line: &str| position(&lines, line);
        assert!(at("rm \"/etc/old/file\"") < at("rmdir \"/etc/old\""));
        assert!(at("rm \"/etc/edited\"") < at("write \"\0OBJECT:e2\0\" \"edited\""));
        assert!(at("mkdir \"new\"") < at("write \"\0OBJECT:n\0\" \"file\""));
        assert!(at("sif \"/etc/kept\" mode 0100600") > at("cd /"));
        assert!(lines.contains(&"sif \"/etc/edited\" mode 0100640"));
        assert!(lines.contains(&"sif \"/etc/new\" mode 040750"));
        // The parent whose listing changed gets its recorded mtime back.
        assert!(lines.contains(&"sif \"/etc\" mtime @0"));
        assert_eq!(
            script
                .contents
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
            ["e2", "n"]
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

    #[test]
    fn population_sets_only_what_debugfs_does_not_and_links_come_last() {
        let mut capability = file("ping", 0o755);
        capability
            .xattrs
            .insert("security.capability".into(), vec![1, 0, 0, 2]);
        let mut owned = file("conf", 0o640);
        owned.gid = 33;
        owned.mtime = 1_700_000_000;
        let tree = tree(&[
            ("etc", Entry::dir(0o755)),
            ("etc/app.conf", owned),
            ("usr", Entry::dir(0o755)),
            ("usr/bin", Entry::dir(0o755)),
            ("usr/bin/ping", capability),
            ("usr/bin/readonly", file("ro", 0o444)),
            (
                "usr/bin/system-systemd\\x2dcryptsetup.slice",
                file("unit", 0o644),
            ),
            ("usr/bin/-dash", file("dash", 0o644)),
            // Sorted first, created last: after its target.
            (
                "a-link",
                Entry {
                    kind: EntryKind::Hardlink,
                    link_target: Some("usr/bin/ping".into()),
                    ..Entry::dir(0o755)
                },
            ),
        ]);
        let script = populate(&tree).expect("supported");
        let lines: Vec<&str> = script.commands.lines().collect();
        let at = |line: &str| position(&lines, line);
        assert!(at("set_current_time @1700000000") < at("write \"\0OBJECT:conf\0\" \"app.conf\""));
        assert!(lines.contains(&"sif \"./app.conf\" mode 0100640"));
        assert!(lines.contains(&"sif \"./app.conf\" gid 33"));
        assert!(
            !lines.iter().any(|l| l.contains("\"app.conf\" uid")),
            "root is the default"
        );
        assert!(
            !lines.iter().any(|l| l.contains("\"readonly\" mode")),
            "0444 is the default"
        );
        assert!(lines.contains(&"ea_set -f \"\0XATTR:0\0\" \"./ping\" \"security.capability\""));
        assert_eq!(script.xattr_values, [vec![1, 0, 0, 2]]);
        assert!(at("ln \"/usr/bin/ping\" \"a-link\"") > at("write \"\0OBJECT:ping\0\" \"ping\""));
        assert!(lines.contains(&"sif \"/usr/bin/ping\" links_count 2"));
        // Backslashes are literal inside debugfs quotes; a leading dash is no option as ./-x.
        assert!(
            lines.contains(&"write \"\0OBJECT:unit\0\" \"system-systemd\\x2dcryptsetup.slice\"")
        );
        assert!(lines.contains(&"sif \"./-dash\" mode 0100644"));
    }
}
