//! Parent/child comparison into typed changes.
//!
//! Packages come from each image's dpkg status (added, removed, upgraded). Services from the
//! `.wants` links `systemctl enable` makes. Users and groups from `/etc/passwd` and
//! `/etc/group`. Config files are files under `/etc`: a dpkg conffile counts as changed when
//! its content no longer matches the md5sum its package recorded, any other file when it
//! differs from the parent's. Other files count only when no package owns them (dpkg's
//! `.list` files), grouped by area; package payloads are what `package-added` already says.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::history::Change;
use crate::packages::dpkg::{InstalledPackage, STATUS_PATH};
use crate::store::tree::{EntryKind, Tree};

/// Areas files are grouped by, in the order they are shown.
pub const AREAS: &[&str] = &["etc", "usr/local", "opt", "srv", "var/lib", "home", "root"];

/// Paths that change on every package operation or boot and say nothing about intent.
const NOISE: &[&str] = &[
    "var/lib/dpkg/",
    "var/lib/apt/",
    "var/cache/",
    "var/log/",
    "var/lib/systemd/",
    "var/lib/ucf/",
    "tmp/",
    "run/",
    "proc/",
    "sys/",
    "dev/",
    "etc/ld.so.cache",
    "etc/shadow",
    "etc/gshadow",
    "etc/passwd-",
    "etc/group-",
    "etc/shadow-",
    "etc/gshadow-",
    "etc/subuid",
    "etc/subgid",
    "etc/alternatives/",
    "var/lib/dpkg",
    "etc/machine-id",
    "var/lib/dbus/machine-id",
];

/// One typed change with a detail for people (versions, area).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct DiffEntry {
    pub kind: String,
    pub subject: String,
    pub detail: Option<String>,
}

impl DiffEntry {
    fn new(kind: &str, subject: impl Into<String>, detail: Option<String>) -> Self {
        Self {
            kind: kind.into(),
            subject: subject.into(),
            detail,
        }
    }

    pub fn change(&self) -> Change {
        Change::new(&self.kind, &self.subject)
    }
}

/// What the diff needs of one image.
pub struct Side<'a> {
    pub tree: &'a Tree,
    pub packages: &'a [InstalledPackage],
    /// Reads a file's content by its digest (verified).
    pub read: &'a dyn Fn(&str) -> anyhow::Result<Vec<u8>>,
}

impl std::fmt::Debug for Side<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Side")
            .field("entries", &self.tree.len())
            .finish()
    }
}

fn text(side: &Side<'_>, path: &str) -> anyhow::Result<Option<String>> {
    match side.tree.get(path) {
        Some(entry) if entry.kind == EntryKind::File => match &entry.digest {
            Some(digest) => Ok(Some(
                String::from_utf8_lossy(&(side.read)(digest)?).into_owned(),
            )),
            None => Ok(None),
        },
        _ => Ok(None),
    }
}

fn first_fields(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|line| line.split(':').next())
        .filter(|name| !name.is_empty() && !name.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

/// `Conffiles:` of the dpkg status: path (relative) → md5.
fn conffiles(status: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut inside = false;
    for line in status.lines() {
        if line.starts_with("Conffiles:") {
            inside = true;
            continue;
        }
        if inside {
            if let Some(rest) = line.strip_prefix(' ') {
                let mut parts = rest.split_whitespace();
                if let (Some(path), Some(md5)) = (parts.next(), parts.next()) {
                    out.insert(path.trim_start_matches('/').to_owned(), md5.to_owned());
                }
            } else {
                inside = false;
            }
        }
    }
    out
}

/// Paths owned by packages, from `var/lib/dpkg/info/*.list`.
fn owned_paths(side: &Side<'_>) -> anyhow::Result<BTreeSet<String>> {
    let mut owned = BTreeSet::new();
    for (path, entry) in side.tree.entries().range("var/lib/dpkg/info/".to_owned()..) {
        if !path.starts_with("var/lib/dpkg/info/") {
            break;
        }
        if path.ends_with(".list") && entry.kind == EntryKind::File {
            if let Some(content) = text(side, path)? {
                owned.extend(
                    content
                        .lines()
                        .map(|l| l.trim_start_matches('/').to_owned()),
                );
            }
        }
    }
    Ok(owned)
}

fn area(path: &str) -> &'static str {
    AREAS
        .iter()
        .find(|area| path.starts_with(&format!("{area}/")))
        .copied()
        .unwrap_or("other")
}

fn md5_hex(data: &[u8]) -> String {
    use md5::Digest as _;
    crate::store::tree::hex(&md5::Md5::digest(data))
}

/// Compare a parent and a child image.
pub fn diff(parent: &Side<'_>, child: &Side<'_>) -> anyhow::Result<Vec<DiffEntry>> {
    let mut out = Vec::new();
    let before: BTreeMap<&str, &str> = parent
        .packages
        .iter()
        .map(|p| (p.name.as_str(), p.version.as_str()))
        .collect();
    let after: BTreeMap<&str, &str> = child
        .packages
        .iter()
        .map(|p| (p.name.as_str(), p.version.as_str()))
        .collect();
    for (name, version) in &after {
        match before.get(name) {
            None => out.push(DiffEntry::new(
                "package-added",
                *name,
                Some((*version).to_owned()),
            )),
            Some(old) if old != version => {
                out.push(DiffEntry::new(
                    "package-upgraded",
                    *name,
                    Some(format!("{old} → {version}")),
                ));
            }
            Some(_) => {}
        }
    }
    for (name, version) in &before {
        if !after.contains_key(name) {
            out.push(DiffEntry::new(
                "package-removed",
                *name,
                Some((*version).to_owned()),
            ));
        }
    }

    let wants = |side: &Side<'_>| -> BTreeSet<String> {
        side.tree
            .entries()
            .iter()
            .filter(|(path, entry)| {
                entry.kind == EntryKind::Symlink
                    && (path.starts_with("etc/systemd/system/")
                        || path.starts_with("usr/lib/systemd/system/"))
                    && path
                        .rsplit_once('/')
                        .is_some_and(|(dir, _)| dir.ends_with(".wants"))
            })
            .filter_map(|(path, _)| path.rsplit_once('/').map(|(_, unit)| unit.to_owned()))
            .collect()
    };
    let (wants_before, wants_after) = (wants(parent), wants(child));
    for unit in wants_after.difference(&wants_before) {
        out.push(DiffEntry::new("service-enabled", unit, None));
    }
    for unit in wants_before.difference(&wants_after) {
        out.push(DiffEntry::new("service-disabled", unit, None));
    }

    for (file, added, removed) in [
        ("etc/passwd", "user-added", "user-removed"),
        ("etc/group", "group-added", "group-removed"),
    ] {
        let a = first_fields(&text(parent, file)?.unwrap_or_default());
        let b = first_fields(&text(child, file)?.unwrap_or_default());
        out.extend(
            b.difference(&a)
                .map(|name| DiffEntry::new(added, name, None)),
        );
        out.extend(
            a.difference(&b)
                .map(|name| DiffEntry::new(removed, name, None)),
        );
    }
    let hostname = |side: &Side<'_>| -> anyhow::Result<String> {
        Ok(text(side, "etc/hostname")?
            .unwrap_or_default()
            .trim()
            .to_owned())
    };
    let (old_host, new_host) = (hostname(parent)?, hostname(child)?);
    if old_host != new_host && !new_host.is_empty() {
        out.push(DiffEntry::new(
            "hostname",
            new_host,
            Some(format!("was {old_host:?}")),
        ));
    }
    let cmdline = |side: &Side<'_>| -> anyhow::Result<String> {
        Ok(text(side, "etc/kernel/cmdline")?
            .unwrap_or_default()
            .trim()
            .to_owned())
    };
    let (old_cmdline, new_cmdline) = (cmdline(parent)?, cmdline(child)?);
    if old_cmdline != new_cmdline {
        out.push(DiffEntry::new(
            "kernel-cmdline",
            new_cmdline,
            Some(format!("was {old_cmdline:?}")),
        ));
    }

    let status = text(child, STATUS_PATH)?.unwrap_or_default();
    let conffiles = conffiles(&status);
    let owned_after = owned_paths(child)?;
    let owned_before = owned_paths(parent)?;
    let special = [
        "etc/passwd",
        "etc/group",
        "etc/hostname",
        "etc/kernel/cmdline",
    ];
    let is_noise = |path: &str| {
        NOISE.iter().any(|n| path.starts_with(n))
            || special.contains(&path)
            || path.contains(".wants/")
    };
    for (path, entry) in child.tree.entries() {
        if path.is_empty() || entry.kind == EntryKind::Dir || is_noise(path) {
            continue;
        }
        let old = parent.tree.get(path);
        let same = old.is_some_and(|o| {
            o.kind == entry.kind && o.digest == entry.digest && o.link_target == entry.link_target
        });
        if same {
            continue;
        }
        if path.starts_with("etc/") {
            if let Some(md5) = conffiles.get(path.as_str()) {
                let content = match &entry.digest {
                    Some(digest) => (child.read)(digest)?,
                    None => Vec::new(),
                };
                if entry.kind != EntryKind::File || &md5_hex(&content) != md5 {
                    out.push(DiffEntry::new(
                        "config-changed",
                        format!("/{path}"),
                        Some("differs from its package".into()),
                    ));
                }
                continue;
            }
            if old.is_some() {
                out.push(DiffEntry::new("config-changed", format!("/{path}"), None));
                continue;
            }
        }
        if owned_after.contains(path.as_str()) {
            continue;
        }
        let kind = if old.is_some() {
            "file-changed"
        } else {
            "file-added"
        };
        out.push(DiffEntry::new(
            kind,
            format!("/{path}"),
            Some(area(path).to_owned()),
        ));
    }
    for (path, entry) in parent.tree.entries() {
        if path.is_empty()
            || entry.kind == EntryKind::Dir
            || is_noise(path)
            || child.tree.get(path).is_some()
        {
            continue;
        }
        if owned_before.contains(path.as_str()) && !owned_after.contains(path.as_str()) {
            // Went with a removed package.
            continue;
        }
        out.push(DiffEntry::new(
            "file-removed",
            format!("/{path}"),
            Some(area(path).to_owned()),
        ));
    }
    out.sort();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tree::Entry;

    fn tree(files: &[(&str, &str)], links: &[(&str, &str)]) -> (Tree, BTreeMap<String, Vec<u8>>) {
        let mut tree = Tree::new();
        let mut contents = BTreeMap::new();
        for (path, content) in files {
            let digest = crate::store::tree::hex(&<sha2::Sha256 as sha2::Digest>::digest(
                content.as_bytes(),
            ));
            contents.insert(digest.clone(), content.as_bytes().to_vec());
            let entry = Entry {
                kind: EntryKind::File,
                size: content.len() as u64,
                digest: Some(digest),
                ..Entry::dir(0o644)
            };
            tree.insert(path, entry).expect("insert");
        }
        for (path, target) in links {
            let entry = Entry {
                kind: EntryKind::Symlink,
                link_target: Some((*target).to_owned()),
                ..Entry::dir(0o777)
            };
            tree.insert(path, entry).expect("insert");
        }
        (tree, contents)
    }

    fn package(name: &str, version: &str) -> InstalledPackage {
        InstalledPackage {
            name: name.into(),
            version: version.into(),
            architecture: "amd64".into(),
        }
    }

    #[test]
    fn typed_changes_between_two_trees() {
        let sshd_default = "PermitRootLogin prohibit-password\n";
        let status = format!(
            "Package: openssh-server\nStatus: install ok installed\nVersion: 1:9.2\nConffiles:\n /etc/ssh/sshd_config {}\n",
            md5_hex(sshd_default.as_bytes())
        );
        let (a, a_contents) = tree(
            &[
                ("etc/passwd", "root:x:0:0::/root:/bin/sh\n"),
                ("etc/group", "root:x:0:\n"),
                ("etc/hostname", "debian\n"),
                ("etc/motd", "hi\n"),
                ("opt/old", "x"),
            ],
            &[],
        );
        let (b, b_contents) = tree(
            &[
                (
                    "etc/passwd",
                    "root:x:0:0::/root:/bin/sh\napi:x:999:999::/var/lib/api:/usr/sbin/nologin\n",
                ),
                ("etc/group", "root:x:0:\napi:x:999:\n"),
                ("etc/hostname", "web\n"),
                ("etc/motd", "changed\n"),
                ("etc/ssh/sshd_config", "PermitRootLogin no\n"),
                ("var/lib/dpkg/status", &status),
                (
                    "var/lib/dpkg/info/openssh-server.list",
                    "/usr/sbin/sshd\n/etc/ssh/sshd_config\n",
                ),
                ("usr/sbin/sshd", "elf"),
                ("srv/www/index.html", "<h1>"),
            ],
            &[(
                "etc/systemd/system/multi-user.target.wants/api.service",
                "/etc/systemd/system/api.service",
            )],
        );
        let read_a = |digest: &str| Ok(a_contents.get(digest).cloned().unwrap_or_default());
        let read_b = |digest: &str| Ok(b_contents.get(digest).cloned().unwrap_or_default());
        let a_packages = [package("base-files", "12.4"), package("vim-tiny", "2:9.0")];
        let b_packages = [
            package("base-files", "12.5"),
            package("openssh-server", "1:9.2"),
        ];
        let entries = diff(
            &Side {
                tree: &a,
                packages: &a_packages,
                read: &read_a,
            },
            &Side {
                tree: &b,
                packages: &b_packages,
                read: &read_b,
            },
        )
        .expect("diff");
        let keys: Vec<String> = entries.iter().map(|e| e.change().key()).collect();
        assert_eq!(
            keys,
            [
                "config-changed:/etc/motd",
                "config-changed:/etc/ssh/sshd_config",
                "file-added:/srv/www/index.html",
                "file-removed:/opt/old",
                "group-added:api",
                "hostname:web",
                "package-added:openssh-server",
                "package-removed:vim-tiny",
                "package-upgraded:base-files",
                "service-enabled:api.service",
                "user-added:api",
            ]
        );
    }
}
