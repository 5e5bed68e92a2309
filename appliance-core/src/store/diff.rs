//! Parent/child comparison into typed changes.
//!
//! Packages come from each image's dpkg status (added, removed, upgraded). Services from the
//! `.wants` links `systemctl enable` makes. Users and groups from `/etc/passwd` and
//! `/etc/group`. Config files are files under `/etc`: a dpkg conffile counts as changed when
//! its content no longer matches the md5sum its package recorded, any other file when it
//! differs from the parent's (files ucf manages, like `/etc/ssh/sshd_config`, are compared with
//! the md5sum ucf recorded). Other files count only when no package owns them (dpkg's `.list`
//! files), grouped by area; package payloads are what `package-added` already says.
//!
//! Some changes are consequences rather than intent, and carry a [`Cause`]: packages apt
//! installed only as dependencies (apt's `extended_states`), and what maintainer scripts did
//! (host keys, enabled units, system users, generated files). The second is known only through
//! lineage: [`attribute`] marks a change that a package step on the way from parent to child
//! already made, when the child still has that step's result.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::change::Change;
use crate::dpkg::{InstalledPackage, STATUS_PATH};
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

/// Why a change happened when nobody asked for it directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Cause {
    /// apt installed the package to satisfy another one.
    Dependency,
    /// A package's maintainer scripts made it (seen in a package step of the lineage).
    PackageScripts,
}

impl Cause {
    pub fn describe(self) -> &'static str {
        match self {
            Cause::Dependency => "dependency",
            Cause::PackageScripts => "by package scripts",
        }
    }
}

/// One typed change with a detail for people (versions, area).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct DiffEntry {
    pub kind: String,
    pub subject: String,
    pub detail: Option<String>,
    /// Set for consequences; `None` for what the child's maker did on purpose.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<Cause>,
}

impl DiffEntry {
    fn new(kind: &str, subject: impl Into<String>, detail: Option<String>) -> Self {
        // Every kind the diff emits is documented, learnt and phrased by the one table.
        debug_assert!(
            crate::change::change_kind(kind).is_some(),
            "change kind {kind} is not in change::CHANGE_KINDS"
        );
        Self {
            kind: kind.into(),
            subject: subject.into(),
            detail,
            cause: None,
        }
    }

    /// Whether the change was made on purpose: what the history learns from.
    pub fn is_intended(&self) -> bool {
        self.cause.is_none()
    }

    /// The tree path a file-level change is about.
    fn path(&self) -> Option<&str> {
        matches!(
            self.kind.as_str(),
            "config-changed" | "file-added" | "file-changed" | "file-removed"
        )
        .then(|| self.subject.trim_start_matches('/'))
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

pub(crate) fn text(side: &Side<'_>, path: &str) -> anyhow::Result<Option<String>> {
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

/// Files ucf manages (generated from a package's template by its maintainer scripts), with the
/// md5sum of what the package installed: `var/lib/ucf/hashfile` lines are `md5  /path`.
fn ucf_files(hashfile: &str) -> BTreeMap<String, String> {
    hashfile
        .lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            let (md5, path) = (parts.next()?, parts.next()?);
            Some((path.trim_start_matches('/').to_owned(), md5.to_owned()))
        })
        .collect()
}

/// Packages apt marked as installed automatically (`Auto-Installed: 1`).
pub(crate) fn auto_installed(extended_states: &str) -> BTreeSet<String> {
    extended_states
        .split("\n\n")
        .filter(|stanza| stanza.lines().any(|l| l.trim() == "Auto-Installed: 1"))
        .filter_map(|stanza| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix("Package:"))
                .map(|name| name.trim().to_owned())
        })
        .collect()
}

/// Paths owned by packages, from `var/lib/dpkg/info/*.list`.
fn owned_paths(side: &Side<'_>) -> anyhow::Result<BTreeSet<String>> {
    let mut owned = BTreeSet::new();
    for (path, entry) in side.tree.entries().range("var/lib/dpkg/info/".to_owned()..) {
        if !path.starts_with("var/lib/dpkg/info/") {
            break;
        }
        if path.ends_with(".list")
            && entry.kind == EntryKind::File
            && let Some(content) = text(side, path)?
        {
            owned.extend(
                content
                    .lines()
                    .map(|line| through_top_level_links(side.tree, line)),
            );
        }
    }
    Ok(owned)
}

/// A path as dpkg recorded it, in the tree's terms: on a merged-/usr system packages still
/// list `/bin/ip` or `/lib/systemd/system/x.service`, which live under `usr/` behind the
/// top-level links.
fn through_top_level_links(tree: &Tree, listed: &str) -> String {
    let listed = listed.trim_start_matches('/');
    if let Some((top, rest)) = listed.split_once('/')
        && let Some(entry) = tree.get(top)
        && entry.kind == EntryKind::Symlink
        && let Some(target) = entry.link_target.as_deref()
        && !target.starts_with('/')
        && !target.contains("..")
    {
        return format!("{}/{rest}", target.trim_end_matches('/'));
    }
    listed.to_owned()
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

/// The zone `/etc/localtime` points at: `/usr/share/zoneinfo/Europe/Paris` → `Europe/Paris`.
fn time_zone_of(target: &str) -> String {
    target
        .rsplit_once("zoneinfo/")
        .map_or(target, |(_, zone)| zone)
        .to_owned()
}

/// `LANG` of `/etc/default/locale` (`LANG=en_US.UTF-8`, maybe quoted).
fn lang_of(text: &str) -> String {
    text.lines()
        .find_map(|line| line.trim().strip_prefix("LANG="))
        .map(|value| value.trim().trim_matches('"').trim_matches('\'').to_owned())
        .unwrap_or_default()
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
    let automatic =
        auto_installed(&text(child, "var/lib/apt/extended_states")?.unwrap_or_default());
    for (name, version) in &after {
        match before.get(name) {
            None => out.push(DiffEntry {
                cause: automatic.contains(*name).then_some(Cause::Dependency),
                ..DiffEntry::new("package-added", *name, Some((*version).to_owned()))
            }),
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

    let timezone = |side: &Side<'_>| -> String {
        side.tree
            .get("etc/localtime")
            .filter(|entry| entry.kind == EntryKind::Symlink)
            .and_then(|entry| entry.link_target.as_deref())
            .map(time_zone_of)
            .unwrap_or_default()
    };
    let (old_zone, new_zone) = (timezone(parent), timezone(child));
    if old_zone != new_zone && !new_zone.is_empty() {
        out.push(DiffEntry::new(
            "timezone",
            new_zone,
            Some(format!("was {old_zone:?}")),
        ));
    }
    let locale = |side: &Side<'_>| -> anyhow::Result<String> {
        Ok(lang_of(
            &text(side, "etc/default/locale")?.unwrap_or_default(),
        ))
    };
    let (old_locale, new_locale) = (locale(parent)?, locale(child)?);
    if old_locale != new_locale && !new_locale.is_empty() {
        out.push(DiffEntry::new(
            "locale",
            new_locale,
            Some(format!("was {old_locale:?}")),
        ));
    }

    let status = text(child, STATUS_PATH)?.unwrap_or_default();
    let mut conffiles = conffiles(&status);
    conffiles.extend(ucf_files(
        &text(child, "var/lib/ucf/hashfile")?.unwrap_or_default(),
    ));
    let owned_after = owned_paths(child)?;
    let owned_before = owned_paths(parent)?;
    // Files whose change is reported by its own kind above.
    let special = [
        "etc/passwd",
        "etc/group",
        "etc/hostname",
        "etc/kernel/cmdline",
        "etc/localtime",
        "etc/timezone",
        "etc/default/locale",
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

/// What one package step of a lineage did: its changes from its own parent, and its tree.
#[derive(Debug)]
pub struct PackageStep<'a> {
    pub changes: Vec<DiffEntry>,
    pub tree: &'a Tree,
}

/// Mark the changes from parent to child that a package step on the way made, and that the
/// child still has as that step left them: a file the child replaced (an edited
/// `sshd_config`) stays the child maker's change.
pub fn attribute(entries: &mut [DiffEntry], child: &Tree, steps: &[PackageStep<'_>]) {
    // Packages speak for themselves (dependencies are marked by apt's own record).
    let attributable = |e: &DiffEntry| e.is_intended() && !e.kind.starts_with("package-");
    for entry in entries.iter_mut().filter(|e| attributable(e)) {
        let made_by_step = steps.iter().any(|step| {
            step.changes
                .iter()
                .any(|c| c.kind == entry.kind && c.subject == entry.subject)
                && entry
                    .path()
                    .is_none_or(|path| match (child.get(path), step.tree.get(path)) {
                        (Some(now), Some(then)) => {
                            now.kind == then.kind
                                && now.digest == then.digest
                                && now.link_target == then.link_target
                        }
                        (None, None) => true,
                        _ => false,
                    })
        });
        if made_by_step {
            entry.cause = Some(Cause::PackageScripts);
        }
    }
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
            &[("lib", "usr/lib")],
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
                    "/usr/sbin/sshd\n/etc/ssh/sshd_config\n/lib/systemd/system/ssh.service\n",
                ),
                ("usr/sbin/sshd", "elf"),
                ("usr/lib/systemd/system/ssh.service", "[Unit]"),
                ("srv/www/index.html", "<h1>"),
            ],
            &[
                (
                    "etc/systemd/system/multi-user.target.wants/api.service",
                    "/etc/systemd/system/api.service",
                ),
                // Merged /usr: the package lists /lib/…, the file is under usr/lib.
                ("lib", "usr/lib"),
            ],
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

    #[test]
    fn dependencies_ucf_files_and_package_script_results_are_consequences() {
        let template = "PermitRootLogin prohibit-password\n";
        let hashfile = format!("{}  /etc/ssh/sshd_config\n", md5_hex(template.as_bytes()));
        let states = "Package: openssh-sftp-server\nArchitecture: amd64\nAuto-Installed: 1\n\n\
                      Package: openssh-server\nArchitecture: amd64\nAuto-Installed: 0\n";
        let base_files: &[(&str, &str)] = &[("etc/passwd", "root:x:0:0::/root:/bin/sh\n")];
        let step_files: &[(&str, &str)] = &[
            (
                "etc/passwd",
                "root:x:0:0::/root:/bin/sh\nsshd:x:100:65534::/run/sshd:/usr/sbin/nologin\n",
            ),
            ("etc/ssh/sshd_config", template),
            ("etc/ssh/ssh_host_ed25519_key", "secret"),
            ("etc/motd", "generated\n"),
            ("var/lib/ucf/hashfile", &hashfile),
            ("var/lib/apt/extended_states", states),
        ];
        let mut child_files = step_files.to_vec();
        child_files[1] = ("etc/ssh/sshd_config", "PermitRootLogin no\n");
        child_files[3] = ("etc/motd", "ours\n");
        let (base, base_contents) = tree(base_files, &[]);
        let (step, step_contents) = tree(step_files, &[]);
        let (child, child_contents) = tree(&child_files, &[]);
        let contents: BTreeMap<String, Vec<u8>> = base_contents
            .into_iter()
            .chain(step_contents)
            .chain(child_contents)
            .collect();
        let read = |digest: &str| Ok(contents.get(digest).cloned().unwrap_or_default());
        let base_packages = [package("base-files", "12.4")];
        let installed = [
            package("base-files", "12.4"),
            package("openssh-server", "1:9.2"),
            package("openssh-sftp-server", "1:9.2"),
        ];
        let side = |tree, packages| Side {
            tree,
            packages,
            read: &read,
        };
        let step_changes =
            diff(&side(&base, &base_packages), &side(&step, &installed)).expect("step diff");
        let mut entries =
            diff(&side(&base, &base_packages), &side(&child, &installed)).expect("diff");
        attribute(
            &mut entries,
            &child,
            &[PackageStep {
                changes: step_changes,
                tree: &step,
            }],
        );
        let described: Vec<String> = entries
            .iter()
            .map(|e| format!("{}:{} {:?}", e.kind, e.subject, e.cause))
            .collect();
        assert_eq!(
            described,
            [
                // ucf's record of the package's file says the edit is ours.
                "config-changed:/etc/ssh/sshd_config None",
                // New, unowned, and not what the package step left: ours.
                "file-added:/etc/motd None",
                "file-added:/etc/ssh/ssh_host_ed25519_key Some(PackageScripts)",
                "package-added:openssh-server None",
                "package-added:openssh-sftp-server Some(Dependency)",
                "user-added:sshd Some(PackageScripts)",
            ]
        );
    }
}
