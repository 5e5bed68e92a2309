//! A test drive's changes as manifest edits: which changes are noise or consequences, the
//! node that says each of the others, and the edits and workspace files that apply them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde::Serialize;

use crate::change::Change;
use crate::diagnostics::{Edit, Span};
use crate::manifest::model::{Appliance, Manifest};
use crate::manifest::reference::kdl_string;
use crate::store::diff::{DiffEntry, Side};
use crate::store::tree::{EntryKind, Tree};

/// Where captured files go, under the manifest's directory: `appliance/NAME/captured/PATH`.
fn captured_dir(appliance: &str) -> String {
    format!("appliance/{appliance}/captured")
}

/// One change of the test drive and what the manifest does about it.
#[derive(Debug, Clone, Serialize)]
pub struct Item {
    #[serde(flatten)]
    pub change: Change,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(flatten)]
    pub action: Action,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", content = "text", rename_all = "kebab-case")]
pub enum Action {
    /// The manifest gains or changes this node (as written).
    Node(String),
    /// A value leaves a node: `remove "tree" from packages`.
    Unsay(String),
    /// A workspace file a `copy` node already copies is rewritten (its path).
    Workspace(String),
    /// No node can say it; why, and what to do instead.
    Manual(String),
}

/// A file of the test drive copied into the workspace.
#[derive(Debug, Clone, Serialize)]
pub struct CapturedFile {
    /// Absolute, inside the workspace.
    pub path: PathBuf,
    #[serde(skip)]
    pub content: Vec<u8>,
    pub executable: bool,
}

/// Everything `capture` found, and how to apply it.
#[derive(Debug, Clone, Serialize)]
pub struct Capture {
    pub appliance: String,
    /// The image the test drive's disk was compared with.
    pub image: String,
    pub items: Vec<Item>,
    /// Left out as runtime noise or by `capture { ignore }`: (change, why).
    pub ignored: Vec<(Change, String)>,
    /// Consequences of the changes above, which the rebuild makes again: (change, why).
    pub consequences: Vec<(Change, String)>,
    /// Non-overlapping edits of the manifest.
    #[serde(skip)]
    pub edits: Vec<Edit>,
    #[serde(skip)]
    pub files: Vec<CapturedFile>,
}

impl Capture {
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// The image paths left out: the noise table and the manifest's `capture { ignore }`.
fn noise_matcher(appliance: &Appliance) -> anyhow::Result<(globset::GlobSet, Vec<String>)> {
    let mut builder = globset::GlobSetBuilder::new();
    let mut why = Vec::new();
    let ignores = appliance
        .capture
        .ignore
        .iter()
        .map(|glob| (glob.value.as_str(), "`capture { ignore }` of the manifest"));
    for (glob, reason) in crate::change::CAPTURE_NOISE.iter().copied().chain(ignores) {
        builder.add(
            globset::GlobBuilder::new(glob)
                .literal_separator(true)
                .build()
                .with_context(|| format!("the capture glob `{glob}`"))?,
        );
        why.push(reason.to_owned());
    }
    Ok((builder.build()?, why))
}

/// `name → fields` of a colon-separated account database.
fn accounts(text: &str) -> BTreeMap<String, Vec<String>> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let fields: Vec<String> = line.split(':').map(str::to_owned).collect();
            Some((fields.first()?.clone(), fields))
        })
        .filter(|(name, _)| !name.is_empty())
        .collect()
}

/// A file of either side as text, empty when absent.
fn side_text(side: &Side<'_>, path: &str) -> anyhow::Result<String> {
    Ok(crate::store::diff::text(side, path)?.unwrap_or_default())
}

/// What `compare` needs of the image: its tree, packages and a reader of its files.
pub struct ImageSide<'a> {
    pub reference: String,
    pub tree: &'a Tree,
    pub packages: &'a [crate::dpkg::InstalledPackage],
    pub read: &'a dyn Fn(&str) -> anyhow::Result<Vec<u8>>,
}

impl std::fmt::Debug for ImageSide<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageSide")
            .field("reference", &self.reference)
            .field("entries", &self.tree.len())
            .finish()
    }
}

/// Compare the test drive's disk with the image of the appliance, and say each change as an
/// edit of `manifest`.
pub fn compare(
    image: &ImageSide<'_>,
    disk: &Side<'_>,
    manifest: &Manifest,
    appliance: &Appliance,
) -> anyhow::Result<Capture> {
    let changes = crate::store::diff::diff(
        &Side {
            tree: image.tree,
            packages: image.packages,
            read: image.read,
        },
        disk,
    )?;
    let (noise, noise_why) = noise_matcher(appliance)?;
    let passwd = accounts(&side_text(disk, "etc/passwd")?);
    let shadow = accounts(&side_text(disk, "etc/shadow")?);
    let groups = accounts(&side_text(disk, "etc/group")?);
    let image_automatic = crate::store::diff::auto_installed(&side_text(
        &Side {
            tree: image.tree,
            packages: image.packages,
            read: image.read,
        },
        "var/lib/apt/extended_states",
    )?);
    let packages_added = changes
        .iter()
        .any(|c| c.kind == "package-added" && c.is_intended());
    let users_added: BTreeSet<&str> = changes
        .iter()
        .filter(|c| c.kind == "user-added")
        .map(|c| c.subject.as_str())
        .collect();
    // Homes of login users (ids from 1000): what `useradd -m` copied from /etc/skel into
    // them is the account's doing, whether the account is new or the build made it.
    let homes: Vec<(String, String)> = passwd
        .values()
        .filter(|fields| {
            fields
                .get(2)
                .and_then(|uid| uid.parse::<u32>().ok())
                .is_some_and(|uid| (1000..65534).contains(&uid))
        })
        .filter_map(|fields| fields.get(5))
        .map(|home| home.trim_start_matches('/').to_owned())
        .filter(|home| !home.is_empty() && home != "nonexistent")
        .map(|home| (home.clone(), format!("{home}/")))
        .collect();
    let mut capture = Capture {
        appliance: appliance.name.value.clone(),
        image: image.reference.clone(),
        items: Vec::new(),
        ignored: Vec::new(),
        consequences: Vec::new(),
        edits: Vec::new(),
        files: Vec::new(),
    };
    let mut plan = Plan::default();
    let manifest_dir = manifest
        .path
        .parent()
        .context("the manifest has no directory")?
        .to_path_buf();
    for entry in &changes {
        let change = entry.change();
        if let Some(cause) = entry.cause {
            capture
                .consequences
                .push((change, cause.describe().to_owned()));
            continue;
        }
        let path = entry_path(entry);
        if let Some(path) = path {
            let matches = noise.matches(format!("/{path}"));
            if let Some(first) = matches.first() {
                capture.ignored.push((change, noise_why[*first].clone()));
                continue;
            }
        }
        if let Some(why) = consequence(
            entry,
            disk,
            image,
            &passwd,
            &groups,
            &users_added,
            &homes,
            packages_added,
            &image_automatic,
        )? {
            capture.consequences.push((change, why));
            continue;
        }
        let action = say(
            entry,
            disk,
            manifest,
            &manifest_dir,
            appliance,
            &passwd,
            &shadow,
            &groups,
            &mut plan,
            &mut capture.files,
        )?;
        capture.items.push(Item {
            change,
            detail: entry.detail.clone(),
            action,
        });
    }
    capture.edits = plan.edits(manifest, appliance);
    Ok(capture)
}

/// The image path of a file-level change, without its leading `/`.
fn entry_path(entry: &DiffEntry) -> Option<&str> {
    matches!(
        entry.kind.as_str(),
        "config-changed" | "file-added" | "file-changed" | "file-removed"
    )
    .then(|| entry.subject.trim_start_matches('/'))
}

/// Why a change follows from another one the capture says (so the rebuild makes it again),
/// if it does.
#[allow(clippy::too_many_arguments)]
fn consequence(
    entry: &DiffEntry,
    disk: &Side<'_>,
    image: &ImageSide<'_>,
    passwd: &BTreeMap<String, Vec<String>>,
    groups: &BTreeMap<String, Vec<String>>,
    users_added: &BTreeSet<&str>,
    homes: &[(String, String)],
    packages_added: bool,
    image_automatic: &BTreeSet<String>,
) -> anyhow::Result<Option<String>> {
    let subject = entry.subject.as_str();
    // The account databases are parsed once, in `compare`.
    let id_of = |table: &BTreeMap<String, Vec<String>>| -> Option<u32> {
        table
            .get(subject)
            .and_then(|fields| fields.get(2))
            .and_then(|id| id.parse().ok())
    };
    Ok(match entry.kind.as_str() {
        "group-added" if users_added.contains(subject) => Some("the user's own group".into()),
        "user-added" | "group-added"
            if packages_added
                && id_of(if entry.kind == "user-added" {
                    passwd
                } else {
                    groups
                })
                .is_some_and(|id| id < 1000) =>
        {
            Some("a system account made by the scripts of a package installed".into())
        }
        "service-enabled" => {
            // deb-systemd-helper records the units package scripts enabled.
            let recorded = |tree: &Tree| {
                tree.entries().keys().any(|path| {
                    path.starts_with("var/lib/systemd/deb-systemd-helper-enabled/")
                        && path.ends_with(&format!("/{subject}"))
                })
            };
            (recorded(disk.tree) && !recorded(image.tree))
                .then(|| "enabled by its package's scripts".into())
        }
        "package-removed" if image_automatic.contains(subject) => {
            Some("a dependency apt removed with the package it served".into())
        }
        "file-added" => {
            let path = subject.trim_start_matches('/');
            let skeleton = homes.iter().find_map(|(_, prefix)| {
                path.strip_prefix(prefix.as_str())
                    .map(|rest| format!("etc/skel/{rest}"))
            });
            match skeleton {
                Some(skel) => {
                    let digest = |tree: &Tree, p: &str| tree.get(p).and_then(|e| e.digest.clone());
                    (digest(disk.tree, path).is_some()
                        && digest(disk.tree, path) == digest(disk.tree, &skel))
                    .then(|| "copied from /etc/skel with the user's home".into())
                }
                None => None,
            }
        }
        _ => None,
    })
}

/// The edits being assembled: values joining existing nodes, values leaving them, node
/// values replaced, and new nodes (one edit each kind, so insertions never share an offset).
#[derive(Default)]
struct Plan {
    packages: Vec<String>,
    remove: Vec<String>,
    removals: Vec<String>,
    edits: Vec<Edit>,
    nodes: Vec<String>,
}

impl Plan {
    fn edits(mut self, manifest: &Manifest, appliance: &Appliance) -> Vec<Edit> {
        let file = &manifest.source;
        let mut out = std::mem::take(&mut self.edits);
        let mut nodes = Vec::new();
        for (values, spans, node) in [
            (
                &self.packages,
                appliance
                    .packages
                    .iter()
                    .filter(|p| !p.recommends)
                    .map(|p| p.name.span)
                    .collect::<Vec<_>>(),
                "packages",
            ),
            (
                &self.remove,
                appliance.remove.iter().map(|r| r.span).collect(),
                "remove",
            ),
        ] {
            if values.is_empty() {
                continue;
            }
            let quoted: Vec<String> = values.iter().map(|v| kdl_string(v)).collect();
            match spans.into_iter().max_by_key(|span| span.offset) {
                Some(last) => out.push(Edit {
                    file: file.display_name.clone(),
                    offset: last.offset + last.len,
                    len: 0,
                    replacement: format!(" {}", quoted.join(" ")),
                }),
                None => nodes.push(format!("{node} {}", quoted.join(" "))),
            }
        }
        nodes.append(&mut self.nodes);
        if !self.removals.is_empty() {
            let words: Vec<String> = self.removals.iter().map(|p| shell_quote(p)).collect();
            nodes.push(format!(
                "run {}",
                kdl_string(&format!("rm -f -- {}", words.join(" ")))
            ));
        }
        out.extend(crate::suggest::apply::new_nodes(file, appliance, &nodes));
        out
    }
}

fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// The edit deleting one value of a `packages` or `remove` node: the value with the space
/// before it, or the whole line when the node has no other value.
fn unsay(text: &str, span: Span, node: &str) -> Option<Edit> {
    let end = span.offset.checked_add(span.len)?;
    let line_start = text.get(..span.offset)?.rfind('\n').map_or(0, |i| i + 1);
    let line_end = text
        .get(end..)?
        .find('\n')
        .map_or(text.len(), |i| end + i + 1);
    let alone = text.get(line_start..span.offset)?.trim() == node
        && text
            .get(end..line_end)?
            .trim()
            .trim_end_matches(';')
            .trim()
            .is_empty();
    let start = if alone {
        line_start
    } else {
        text.get(..span.offset)?.trim_end().len()
    };
    Some(Edit {
        file: String::new(),
        offset: start,
        len: if alone { line_end } else { end } - start,
        replacement: String::new(),
    })
}

/// The edit that replaces a node's first value (hostname, time zone, locale).
fn replace_value(span: Span, value: &str) -> Edit {
    Edit {
        file: String::new(),
        offset: span.offset,
        len: span.len,
        replacement: kdl_string(value),
    }
}

fn grammar_ok(grammar: &crate::manifest::grammar::Grammar, value: &str) -> bool {
    (grammar.check)(value).is_ok()
}

#[allow(clippy::too_many_arguments)]
fn say(
    entry: &DiffEntry,
    disk: &Side<'_>,
    manifest: &Manifest,
    manifest_dir: &Path,
    appliance: &Appliance,
    passwd: &BTreeMap<String, Vec<String>>,
    shadow: &BTreeMap<String, Vec<String>>,
    groups: &BTreeMap<String, Vec<String>>,
    plan: &mut Plan,
    files: &mut Vec<CapturedFile>,
) -> anyhow::Result<Action> {
    use crate::manifest::grammar;
    let subject = entry.subject.as_str();
    let quoted = kdl_string(subject);
    let text = manifest.source.text();
    let with_file = |mut edit: Edit| {
        edit.file = manifest.source.display_name.clone();
        edit
    };
    Ok(match entry.kind.as_str() {
        "package-added" => {
            if let Some(span) = appliance
                .remove
                .iter()
                .find(|r| r.value == subject)
                .map(|r| r.span)
            {
                match unsay(text, span, "remove") {
                    Some(edit) => {
                        plan.edits.push(with_file(edit));
                        Action::Unsay(format!("{quoted} from `remove`"))
                    }
                    None => Action::Manual(format!("take {quoted} out of `remove`")),
                }
            } else {
                plan.packages.push(subject.to_owned());
                Action::Node(format!("packages {quoted}"))
            }
        }
        "package-removed" => {
            let listed = appliance.packages.iter().find(|p| p.name.value == subject);
            if let Some(span) = listed.map(|p| p.name.span) {
                match unsay(text, span, "packages") {
                    Some(edit) => {
                        plan.edits.push(with_file(edit));
                        Action::Unsay(format!("{quoted} from `packages`"))
                    }
                    None => Action::Manual(format!("take {quoted} out of `packages`")),
                }
            } else {
                plan.remove.push(subject.to_owned());
                Action::Node(format!("remove {quoted}"))
            }
        }
        "package-upgraded" => Action::Manual(
            "upgraded in the test drive; a rebuild installs what the mirror has now".into(),
        ),
        "config-changed" | "file-added" | "file-changed" => say_file(
            entry,
            disk,
            manifest_dir,
            appliance,
            passwd,
            groups,
            plan,
            files,
        )?,
        "file-removed" => {
            if grammar_ok(&grammar::IMAGE_PATH, subject) {
                plan.removals.push(subject.to_owned());
                Action::Node(format!(
                    "run {}",
                    kdl_string(&format!("rm -f -- {}", shell_quote(subject)))
                ))
            } else {
                Action::Manual("remove it in a `run` script".into())
            }
        }
        "user-added" => {
            let Some(fields) = passwd
                .get(subject)
                .filter(|_| grammar_ok(&grammar::USER_NAME, subject))
            else {
                return Ok(Action::Manual("add a `user` node".into()));
            };
            let field = |i: usize| fields.get(i).map(String::as_str).unwrap_or_default();
            let uid: u32 = field(2).parse().unwrap_or(0);
            let system = uid < 1000;
            let mut node = format!("user {quoted}");
            if system {
                node.push_str(" system=#true");
            }
            let member_of: Vec<&str> = groups
                .iter()
                .filter(|(name, fields)| {
                    name.as_str() != subject
                        && fields
                            .get(3)
                            .is_some_and(|members| members.split(',').any(|m| m.trim() == subject))
                })
                .map(|(name, _)| name.as_str())
                .collect();
            if !member_of.is_empty() {
                node.push_str(&format!(" groups={}", kdl_string(&member_of.join(","))));
            }
            let default_home = if system {
                "/nonexistent".to_owned()
            } else {
                format!("/home/{subject}")
            };
            if field(5) != default_home && grammar_ok(&grammar::IMAGE_PATH, field(5)) {
                node.push_str(&format!(" home={}", kdl_string(field(5))));
            }
            let default_shell = if system {
                "/usr/sbin/nologin"
            } else {
                "/bin/bash"
            };
            if field(6) != default_shell && grammar_ok(&grammar::IMAGE_PATH, field(6)) {
                node.push_str(&format!(" shell={}", kdl_string(field(6))));
            }
            let comment = field(4).trim_end_matches(',');
            if !comment.is_empty() && grammar_ok(&grammar::TEXT, comment) {
                node.push_str(&format!(" comment={}", kdl_string(comment)));
            }
            if let Some(hash) = shadow.get(subject).and_then(|f| f.get(1))
                && hash.starts_with('$')
                && grammar_ok(&grammar::PASSWORD_HASH, hash)
            {
                node.push_str(&format!(" password-hash={}", kdl_string(hash)));
            }
            plan.nodes.push(node.clone());
            Action::Node(node)
        }
        "group-added" => {
            if !grammar_ok(&grammar::USER_NAME, subject) {
                return Ok(Action::Manual("add a `group` node".into()));
            }
            let system = groups
                .get(subject)
                .and_then(|f| f.get(2))
                .and_then(|gid| gid.parse::<u32>().ok())
                .is_some_and(|gid| gid < 1000);
            let node = format!(
                "group {quoted}{}",
                if system { " system=#true" } else { "" }
            );
            plan.nodes.push(node.clone());
            Action::Node(node)
        }
        "service-enabled" | "service-disabled" => {
            let enable = entry.kind == "service-enabled";
            let node = format!("service {quoted} enable=#{enable}");
            match appliance.services.iter().find(|s| s.unit.value == subject) {
                Some(existing) => plan.edits.push(with_file(Edit {
                    file: String::new(),
                    offset: existing.span.offset,
                    len: existing.span.len,
                    replacement: node.clone(),
                })),
                None => plan.nodes.push(node.clone()),
            }
            Action::Node(node)
        }
        kind @ ("hostname" | "timezone" | "locale") => {
            let (existing, grammar) = match kind {
                "hostname" => (&appliance.hostname, &grammar::HOSTNAME),
                "timezone" => (&appliance.timezone, &grammar::TIMEZONE),
                _ => (&appliance.locale, &grammar::LOCALE),
            };
            if !grammar_ok(grammar, subject) {
                return Ok(Action::Manual(format!(
                    "`{subject}` is not a {}",
                    grammar.name
                )));
            }
            let node = format!("{kind} {quoted}");
            match existing {
                Some(value) => plan
                    .edits
                    .push(with_file(replace_value(value.span, subject))),
                None => plan.nodes.push(node.clone()),
            }
            Action::Node(node)
        }
        "user-removed" | "group-removed" => Action::Manual(
            "no node removes an account; a `run` script with userdel/groupdel would".into(),
        ),
        _ => Action::Manual("no manifest node says this".into()),
    })
}

/// A file of the test drive: the workspace source of the `copy` that already puts it there is
/// rewritten, or the file goes to `appliance/NAME/captured/` with a new `copy` node; a symlink
/// becomes a `symlink` node.
#[allow(clippy::too_many_arguments)]
fn say_file(
    entry: &DiffEntry,
    disk: &Side<'_>,
    manifest_dir: &Path,
    appliance: &Appliance,
    passwd: &BTreeMap<String, Vec<String>>,
    groups: &BTreeMap<String, Vec<String>>,
    plan: &mut Plan,
    files: &mut Vec<CapturedFile>,
) -> anyhow::Result<Action> {
    use crate::manifest::grammar;
    let subject = entry.subject.as_str();
    let path = subject.trim_start_matches('/');
    let Some(found) = disk.tree.get(path) else {
        return Ok(Action::Manual("gone from the disk".into()));
    };
    if !grammar_ok(&grammar::IMAGE_PATH, subject) {
        return Ok(Action::Manual(
            "its path cannot be written in a manifest".into(),
        ));
    }
    match found.kind {
        EntryKind::Symlink => {
            let target = found.link_target.clone().unwrap_or_default();
            if !grammar_ok(&grammar::TEXT, &target) {
                return Ok(Action::Manual(
                    "its target cannot be written in a manifest".into(),
                ));
            }
            let node = format!(
                "symlink {} target={}",
                kdl_string(subject),
                kdl_string(&target)
            );
            plan.nodes.push(node.clone());
            return Ok(Action::Node(node));
        }
        EntryKind::File | EntryKind::Hardlink => {}
        _ => {
            return Ok(Action::Manual(
                "a special file: make it in a `run` script".into(),
            ));
        }
    }
    let digest = found
        .digest
        .as_deref()
        .context("a file of the test drive without content")?;
    let content = (disk.read)(digest)?;
    let executable = found.mode & 0o111 != 0;
    // A `copy` of one workspace file to exactly this path: that file is what changed.
    let copied = appliance.copies.iter().find(|copy| {
        copy.to.value == subject
            && !copy.is_glob()
            && manifest_dir.join(&copy.source.value).is_file()
    });
    if let Some(copy) = copied {
        let source = manifest_dir.join(&copy.source.value);
        files.push(CapturedFile {
            path: source,
            content,
            executable,
        });
        return Ok(Action::Workspace(copy.source.value.clone()));
    }
    let source = format!("{}/{path}", captured_dir(&appliance.name.value));
    if !grammar_ok(&grammar::SOURCE_PATH, &source) || source.contains(['*', '?', '[', '{']) {
        return Ok(Action::Manual("its path cannot be a copy source".into()));
    }
    let mut node = format!(
        "copy {} to={} mode=0o{:o}",
        kdl_string(&source),
        kdl_string(subject),
        found.mode & 0o7777
    );
    let name_of = |table: &BTreeMap<String, Vec<String>>, id: u32| {
        table
            .iter()
            .find(|(_, fields)| fields.get(2).and_then(|f| f.parse::<u32>().ok()) == Some(id))
            .map(|(name, _)| name.clone())
    };
    for (property, id, table) in [("owner", found.uid, passwd), ("group", found.gid, groups)] {
        if id == 0 {
            continue;
        }
        match name_of(table, id).filter(|name| grammar_ok(&grammar::USER_NAME, name)) {
            Some(name) => node.push_str(&format!(" {property}={}", kdl_string(&name))),
            None => return Ok(Action::Manual(format!("its {property} ({id}) has no name"))),
        }
    }
    files.push(CapturedFile {
        path: manifest_dir.join(&source),
        content,
        executable,
    });
    plan.nodes.push(node.clone());
    Ok(Action::Node(node))
}

/// Write the captured files into the workspace and the edits into the manifest (in place,
/// through a temporary file). The edited manifest is parsed first: an edit that would leave it
/// broken writes nothing.
pub fn apply(capture: &Capture, manifest: &Manifest, workspace_root: &Path) -> anyhow::Result<()> {
    let text = manifest.source.text();
    let edits: Vec<&Edit> = capture.edits.iter().collect();
    let edited = crate::suggest::apply::apply_edits(text, &edits)?;
    let source = crate::diagnostics::SourceFile::new(
        &manifest.path,
        manifest.source.display_name.clone(),
        edited.clone(),
    );
    let (_, diagnostics) = crate::manifest::parse::parse_manifest(&source);
    if let Some(error) = diagnostics.iter().find(|d| d.is_error()) {
        bail!(
            "the edited manifest would not parse ({}); nothing was written",
            error.message
        );
    }
    let root = fs_err::canonicalize(workspace_root)?;
    for file in &capture.files {
        let parent = file
            .path
            .parent()
            .context("a captured file without a directory")?;
        fs_err::create_dir_all(parent)?;
        // A symlinked directory on the way must not carry the file out of the workspace.
        if !fs_err::canonicalize(parent)?.starts_with(&root) {
            bail!(
                "{} is outside the workspace; nothing more was written",
                parent.display()
            );
        }
        if file
            .path
            .symlink_metadata()
            .is_ok_and(|m| m.file_type().is_symlink())
        {
            bail!(
                "{} is a symbolic link; not writing through it",
                file.path.display()
            );
        }
        let mode = if file.executable { 0o755 } else { 0o644 };
        crate::suggest::apply::replace_file(&file.path, &file.content, mode)?;
    }
    if !edits.is_empty() {
        crate::suggest::apply::replace_file(&manifest.path, edited.as_bytes(), 0o644)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dpkg::InstalledPackage;
    use crate::store::tree::Entry;

    /// A tree of files (path, content, uid) and symlinks, with its contents by digest.
    fn tree(
        files: &[(&str, &str, u32)],
        links: &[(&str, &str)],
    ) -> (Tree, BTreeMap<String, Vec<u8>>) {
        let mut tree = Tree::new();
        let mut contents = BTreeMap::new();
        for (path, content, uid) in files {
            let digest = crate::store::tree::hex(&<sha2::Sha256 as sha2::Digest>::digest(
                content.as_bytes(),
            ));
            contents.insert(digest.clone(), content.as_bytes().to_vec());
            let entry = Entry {
                kind: EntryKind::File,
                size: content.len() as u64,
                digest: Some(digest),
                uid: *uid,
                gid: *uid,
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

    fn packages(names: &[&str]) -> Vec<InstalledPackage> {
        names
            .iter()
            .map(|name| InstalledPackage {
                name: (*name).into(),
                version: "1.0".into(),
                architecture: "amd64".into(),
            })
            .collect()
    }

    fn status(names: &[&str], conffiles: &str) -> String {
        names
            .iter()
            .map(|name| {
                format!(
                    "Package: {name}\nStatus: install ok installed\nVersion: 1.0\n{}\n",
                    if *name == "nginx" { conffiles } else { "" }
                )
            })
            .collect()
    }

    const HASH: &str = "$y$j9T$F5Jx5fExrKuPp53xLKQ..1$X3DX6M94c7o.9agCG9G317fhZg9SqC.5i5rd.RhAtQ7";
    const MANIFEST: &str = "// The web appliance.\nappliance \"web\" {\n    base \"debian/bookworm\"\n    packages \"nginx\" \"vim-tiny\" // what it serves with\n    copy \"static/index.html\" to=\"/srv/www/index.html\"\n    capture {\n        ignore \"/var/lib/app/**\"\n    }\n}\n";

    /// Every kind of change a test drive makes, on constructed trees: what becomes a node,
    /// what is noise, what is a consequence, and the manifest the edits give.
    #[test]
    fn each_change_kind_becomes_its_edit_and_noise_stays_out() {
        let nginx_conf = "worker_processes auto;\n";
        let conffiles = format!(
            "Conffiles:\n /etc/nginx/nginx.conf {}\n",
            crate::store::tree::hex(&<md5::Md5 as md5::Digest>::digest(nginx_conf.as_bytes()))
        );
        let image_status = status(&["nginx", "vim-tiny"], &conffiles);
        let disk_status = status(&["nginx", "tree"], &conffiles);
        let (image_tree, image_contents) = tree(
            &[
                ("etc/passwd", "root:x:0:0:root:/root:/bin/bash\n", 0),
                ("etc/group", "root:x:0:\nsudo:x:27:\n", 0),
                ("etc/shadow", "root:*:19000:0:99999:7:::\n", 0),
                ("etc/hostname", "web\n", 0),
                ("etc/motd", "hello\n", 0),
                ("etc/skel/.bashrc", "# bashrc\n", 0),
                ("etc/nginx/nginx.conf", nginx_conf, 0),
                ("srv/www/index.html", "<h1>old</h1>\n", 0),
                ("var/lib/dpkg/status", &image_status, 0),
                ("var/lib/dpkg/info/nginx.list", "/etc/nginx/nginx.conf\n", 0),
            ],
            &[("etc/localtime", "/usr/share/zoneinfo/Etc/UTC")],
        );
        let (disk_tree, disk_contents) = tree(
            &[
                (
                    "etc/passwd",
                    "root:x:0:0:root:/root:/bin/bash\nalice:x:1001:1001:Alice,,,:/home/alice:/bin/bash\n",
                    0,
                ),
                (
                    "etc/group",
                    "root:x:0:\nsudo:x:27:alice\nalice:x:1001:\n",
                    0,
                ),
                (
                    "etc/shadow",
                    &format!("root:*:19000:0:99999:7:::\nalice:{HASH}:19000:0:99999:7:::\n"),
                    0,
                ),
                ("etc/hostname", "web2\n", 0),
                ("etc/skel/.bashrc", "# bashrc\n", 0),
                ("etc/nginx/nginx.conf", "worker_processes 2;\n", 0),
                ("etc/ssh/ssh_host_ed25519_key", "secret", 0),
                ("srv/www/index.html", "<h1>new</h1>\n", 0),
                ("srv/notes.txt", "notes\n", 1001),
                ("home/alice/.bashrc", "# bashrc\n", 1001),
                ("home/alice/.bash_history", "ls\n", 1001),
                (
                    "root/.ssh/authorized_keys",
                    "ssh-ed25519 AAAA test-drive\n",
                    0,
                ),
                ("var/lib/app/cache/x", "x", 0),
                ("usr/bin/tree", "elf", 0),
                ("var/lib/dpkg/status", &disk_status, 0),
                ("var/lib/dpkg/info/nginx.list", "/etc/nginx/nginx.conf\n", 0),
                ("var/lib/dpkg/info/tree.list", "/usr/bin/tree\n", 0),
            ],
            &[
                ("etc/localtime", "/usr/share/zoneinfo/Europe/Paris"),
                (
                    "etc/systemd/system/sysinit.target.wants/systemd-time-wait-sync.service",
                    "/usr/lib/systemd/system/systemd-time-wait-sync.service",
                ),
            ],
        );
        let workspace = tempfile::tempdir().expect("temp dir");
        let manifest_path = workspace.path().join("appliance.kdl");
        std::fs::write(&manifest_path, MANIFEST).expect("manifest");
        std::fs::create_dir_all(workspace.path().join("static")).expect("mkdir");
        std::fs::write(workspace.path().join("static/index.html"), "<h1>old</h1>\n").expect("page");
        let source = crate::diagnostics::SourceFile::new(
            &manifest_path,
            "appliance.kdl".into(),
            MANIFEST.into(),
        );
        let (appliances, diagnostics) = crate::manifest::parse::parse_manifest(&source);
        assert!(diagnostics.is_empty(), "{diagnostics:?}");
        let manifest = Manifest {
            path: manifest_path.clone(),
            source,
            appliances,
        };
        let image_read = |digest: &str| {
            image_contents
                .get(digest)
                .cloned()
                .context("no such content")
        };
        let disk_read = |digest: &str| {
            disk_contents
                .get(digest)
                .cloned()
                .context("no such content")
        };
        let (image_packages, disk_packages) = (
            packages(&["nginx", "vim-tiny"]),
            packages(&["nginx", "tree"]),
        );
        let capture = compare(
            &ImageSide {
                reference: "web@1".into(),
                tree: &image_tree,
                packages: &image_packages,
                read: &image_read,
            },
            &Side {
                tree: &disk_tree,
                packages: &disk_packages,
                read: &disk_read,
            },
            &manifest,
            &manifest.appliances[0],
        )
        .expect("compare");
        let said: Vec<(String, Action)> = capture
            .items
            .iter()
            .map(|item| (item.change.key(), item.action.clone()))
            .collect();
        let node = |text: &str| Action::Node(text.to_owned());
        assert_eq!(
            said,
            [
                (
                    "config-changed:/etc/nginx/nginx.conf".to_owned(),
                    node(
                        "copy \"appliance/web/captured/etc/nginx/nginx.conf\" to=\"/etc/nginx/nginx.conf\" mode=0o644"
                    )
                ),
                (
                    "file-added:/srv/notes.txt".into(),
                    node(
                        "copy \"appliance/web/captured/srv/notes.txt\" to=\"/srv/notes.txt\" mode=0o644 owner=\"alice\" group=\"alice\""
                    )
                ),
                (
                    "file-changed:/srv/www/index.html".into(),
                    Action::Workspace("static/index.html".into())
                ),
                (
                    "file-removed:/etc/motd".into(),
                    node("run \"rm -f -- '/etc/motd'\"")
                ),
                ("hostname:web2".into(), node("hostname \"web2\"")),
                ("package-added:tree".into(), node("packages \"tree\"")),
                (
                    "package-removed:vim-tiny".into(),
                    Action::Unsay("\"vim-tiny\" from `packages`".into())
                ),
                (
                    "service-enabled:systemd-time-wait-sync.service".into(),
                    node("service \"systemd-time-wait-sync.service\" enable=#true")
                ),
                (
                    "timezone:Europe/Paris".into(),
                    node("timezone \"Europe/Paris\"")
                ),
                (
                    "user-added:alice".into(),
                    node(&format!(
                        "user \"alice\" groups=\"sudo\" comment=\"Alice\" password-hash=\"{HASH}\""
                    ))
                ),
            ]
        );
        let ignored: Vec<String> = capture.ignored.iter().map(|(c, _)| c.key()).collect();
        assert_eq!(
            ignored,
            [
                "file-added:/etc/ssh/ssh_host_ed25519_key",
                "file-added:/home/alice/.bash_history",
                "file-added:/root/.ssh/authorized_keys",
                "file-added:/var/lib/app/cache/x",
            ]
        );
        let consequences: Vec<String> = capture.consequences.iter().map(|(c, _)| c.key()).collect();
        assert_eq!(
            consequences,
            ["file-added:/home/alice/.bashrc", "group-added:alice"]
        );

        apply(&capture, &manifest, workspace.path()).expect("apply");
        let edited = std::fs::read_to_string(&manifest_path).expect("manifest");
        assert_eq!(
            edited,
            format!(
                "// The web appliance.\nappliance \"web\" {{\n    base \"debian/bookworm\"\n    packages \"nginx\" \"tree\" // what it serves with\n    copy \"static/index.html\" to=\"/srv/www/index.html\"\n    capture {{\n        ignore \"/var/lib/app/**\"\n    }}\n    copy \"appliance/web/captured/etc/nginx/nginx.conf\" to=\"/etc/nginx/nginx.conf\" mode=0o644\n    copy \"appliance/web/captured/srv/notes.txt\" to=\"/srv/notes.txt\" mode=0o644 owner=\"alice\" group=\"alice\"\n    hostname \"web2\"\n    service \"systemd-time-wait-sync.service\" enable=#true\n    timezone \"Europe/Paris\"\n    user \"alice\" groups=\"sudo\" comment=\"Alice\" password-hash=\"{HASH}\"\n    run \"rm -f -- '/etc/motd'\"\n}}\n"
            )
        );
        let read = |path: &str| std::fs::read_to_string(workspace.path().join(path)).expect(path);
        assert_eq!(read("static/index.html"), "<h1>new</h1>\n");
        assert_eq!(
            read("appliance/web/captured/etc/nginx/nginx.conf"),
            "worker_processes 2;\n"
        );
        assert_eq!(read("appliance/web/captured/srv/notes.txt"), "notes\n");
    }

    #[test]
    fn the_noise_table_is_made_of_valid_globs_that_match_what_they_name() {
        let source = crate::diagnostics::SourceFile::new(
            Path::new("appliance.kdl"),
            "appliance.kdl".into(),
            "appliance \"a\" {\n    base \"debian/bookworm\"\n}\n".into(),
        );
        let (appliances, _) = crate::manifest::parse::parse_manifest(&source);
        let (set, why) = noise_matcher(&appliances[0]).expect("globs");
        assert_eq!(why.len(), crate::change::CAPTURE_NOISE.len());
        for (path, noise) in [
            ("/var/log/journal/abc/system.journal", true),
            ("/etc/ssh/ssh_host_rsa_key.pub", true),
            ("/home/alice/.bash_history", true),
            ("/root/.cache/pip/x", true),
            ("/etc/fstab", true),
            ("/etc/ssh/sshd_config", false),
            ("/srv/notes.txt", false),
            ("/var/lib/nginx/body", false),
        ] {
            assert_eq!(set.is_match(path), noise, "{path}");
        }
    }

    #[test]
    fn a_value_leaves_its_node_or_the_node_its_line() {
        let text = "appliance \"a\" {\n    packages \"tree\"\n    packages \"nginx\" \"vim\"\n}\n";
        let span = |needle: &str| Span {
            offset: text.find(needle).expect("needle"),
            len: needle.len(),
        };
        let apply_one =
            |edit: Edit| crate::suggest::apply::apply_edits(text, &[&edit]).expect("fits");
        assert_eq!(
            apply_one(unsay(text, span("\"tree\""), "packages").expect("edit")),
            "appliance \"a\" {\n    packages \"nginx\" \"vim\"\n}\n"
        );
        assert_eq!(
            apply_one(unsay(text, span("\"vim\""), "packages").expect("edit")),
            "appliance \"a\" {\n    packages \"tree\"\n    packages \"nginx\"\n}\n"
        );
    }
}
