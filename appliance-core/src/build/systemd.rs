//! `systemctl enable`/`disable` without systemd: the symlinks it would make from the unit's
//! `[Install]` section (WantedBy, RequiredBy, UpheldBy, Alias, Also, DefaultInstance).

use anyhow::bail;

use super::edit::TreeEditor;

/// Where units are looked up, in systemd's order of precedence.
pub const UNIT_DIRS: &[&str] = &[
    "/etc/systemd/system",
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
];

const ADMIN_DIR: &str = "/etc/systemd/system";

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct InstallSection {
    pub wanted_by: Vec<String>,
    pub required_by: Vec<String>,
    pub upheld_by: Vec<String>,
    pub alias: Vec<String>,
    pub also: Vec<String>,
    pub default_instance: Option<String>,
}

impl InstallSection {
    pub fn is_empty(&self) -> bool {
        self.wanted_by.is_empty()
            && self.required_by.is_empty()
            && self.upheld_by.is_empty()
            && self.alias.is_empty()
            && self.also.is_empty()
    }
}

/// The `[Install]` section of a unit file (continuation lines and comments handled).
pub fn parse_install(text: &str) -> InstallSection {
    let mut section = InstallSection::default();
    let mut in_install = false;
    let mut logical = String::new();
    for raw in text.lines() {
        if let Some(start) = raw.strip_suffix('\\') {
            logical.push_str(start);
            logical.push(' ');
            continue;
        }
        logical.push_str(raw);
        let line = std::mem::take(&mut logical);
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') {
            in_install = line == "[Install]";
            continue;
        }
        if !in_install {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let words = || value.split_whitespace().map(str::to_owned);
        match key.trim() {
            "WantedBy" => section.wanted_by.extend(words()),
            "RequiredBy" => section.required_by.extend(words()),
            "UpheldBy" => section.upheld_by.extend(words()),
            "Alias" => section.alias.extend(words()),
            "Also" => section.also.extend(words()),
            "DefaultInstance" => section.default_instance = Some(value.trim().to_owned()),
            _ => {}
        }
    }
    section
}

/// The unit's path in the image (as systemctl would link to it), when it exists.
pub fn find_unit(editor: &mut TreeEditor, unit: &str) -> Option<String> {
    let template = template_of(unit);
    for dir in UNIT_DIRS {
        for name in [Some(unit), template.as_deref()].into_iter().flatten() {
            let path = format!("{dir}/{name}");
            if editor.entry(&path).is_some_and(|e| {
                matches!(
                    e.kind,
                    crate::store::tree::EntryKind::File | crate::store::tree::EntryKind::Hardlink
                )
            }) {
                return Some(path);
            }
        }
    }
    None
}

/// `foo@bar.service` → `foo@.service`.
fn template_of(unit: &str) -> Option<String> {
    let (prefix, rest) = unit.split_once('@')?;
    let (_, suffix) = rest.rsplit_once('.')?;
    (!rest.starts_with('.')).then(|| format!("{prefix}@.{suffix}"))
}

/// Make the links `systemctl enable UNIT` makes. Returns the links created.
pub fn enable(editor: &mut TreeEditor, unit: &str) -> anyhow::Result<Vec<String>> {
    let mut created = Vec::new();
    let mut pending = vec![unit.to_owned()];
    let mut seen = Vec::new();
    while let Some(unit) = pending.pop() {
        if seen.contains(&unit) {
            continue;
        }
        seen.push(unit.clone());
        let Some(path) = find_unit(editor, &unit) else {
            bail!(
                "unit `{unit}` is not in the image (looked in {})",
                UNIT_DIRS.join(", ")
            );
        };
        let text = editor.read_text(&path)?.unwrap_or_default();
        let install = parse_install(&text);
        if install.is_empty() {
            bail!(
                "unit `{unit}` ({path}) has no [Install] section: systemctl cannot enable it \
                 (add WantedBy=multi-user.target, or let another unit pull it in)"
            );
        }
        // A template enabled by its bare name links its default instance.
        let instance_name = if unit.contains("@.") {
            match &install.default_instance {
                Some(instance) => unit.replacen("@.", &format!("@{instance}."), 1),
                None => bail!("template unit `{unit}` has no DefaultInstance; name an instance"),
            }
        } else {
            unit.clone()
        };
        for (targets, suffix) in [
            (&install.wanted_by, "wants"),
            (&install.required_by, "requires"),
            (&install.upheld_by, "upholds"),
        ] {
            for target in targets {
                let link = format!("{ADMIN_DIR}/{target}.{suffix}/{instance_name}");
                editor.mkdir(&format!("{ADMIN_DIR}/{target}.{suffix}"), 0o755, 0, 0)?;
                editor.symlink(&link, &path)?;
                created.push(link);
            }
        }
        for alias in &install.alias {
            let link = format!("{ADMIN_DIR}/{alias}");
            editor.symlink(&link, &path)?;
            created.push(link);
        }
        pending.extend(install.also.iter().cloned());
    }
    Ok(created)
}

/// Remove what `systemctl disable UNIT` removes: every symlink under /etc/systemd/system
/// named after the unit or its aliases. Returns the links removed.
pub fn disable(editor: &mut TreeEditor, unit: &str) -> anyhow::Result<Vec<String>> {
    let mut names = vec![unit.to_owned()];
    if let Some(path) = find_unit(editor, unit) {
        let text = editor.read_text(&path)?.unwrap_or_default();
        names.extend(parse_install(&text).alias);
    }
    let admin = TreeEditor::key(ADMIN_DIR)?;
    let prefix = format!("{admin}/");
    let links: Vec<String> = editor
        .tree
        .entries()
        .range(prefix.clone()..)
        .take_while(|(p, _)| p.starts_with(&prefix))
        .filter(|(p, e)| {
            e.kind == crate::store::tree::EntryKind::Symlink
                && p.rsplit_once('/')
                    .is_some_and(|(_, name)| names.iter().any(|n| n == name))
        })
        .map(|(p, _)| p.clone())
        .collect();
    for link in &links {
        editor.tree.remove(link);
    }
    Ok(links.into_iter().map(|l| format!("/{l}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_sections_are_read_like_systemd() {
        let unit = "[Unit]\nDescription=x\nWantedBy=not-this.target\n\n[Install]\n# comment\nWantedBy=multi-user.target \\\n  graphical.target\nAlias=sshd.service\nAlso=ssh.socket\n";
        let install = parse_install(unit);
        assert_eq!(install.wanted_by, ["multi-user.target", "graphical.target"]);
        assert_eq!(install.alias, ["sshd.service"]);
        assert_eq!(install.also, ["ssh.socket"]);
        assert!(parse_install("[Service]\nExecStart=/bin/true\n").is_empty());
        assert_eq!(
            template_of("getty@tty1.service").as_deref(),
            Some("getty@.service")
        );
        assert_eq!(template_of("plain.service"), None);
    }
}
