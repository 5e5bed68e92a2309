//! Suggestions as manifest edits: each suggestion of a kind a manifest node can say carries
//! the edit that says it (`packages`, `remove`, `user`, `group`, `service`), and
//! `suggest --apply KEY` makes it in place. Only bytes are inserted: comments, order and
//! formatting of everything else stay as the user wrote them. A value joins the existing
//! node of its kind (`packages "nginx"` → `packages "nginx" "ca-certificates"`); without one,
//! a new node goes at the end of the appliance's block, indented like its first child.

use std::collections::BTreeMap;

use anyhow::{Context as _, bail};

use crate::change::Change;
use crate::diagnostics::{Diagnostic, Edit, SourceFile};
use crate::manifest::model::Appliance;
use crate::manifest::reference::kdl_string;

/// The edit that applies `change` to `appliance` in `file`, when a node can say it.
pub fn edit_for(file: &SourceFile, appliance: &Appliance, change: &Change) -> Option<Edit> {
    let value = kdl_string(&change.subject);
    let append_to = |spans: Vec<crate::diagnostics::Span>| -> Option<Edit> {
        let last = spans.into_iter().max_by_key(|span| span.offset)?;
        Some(Edit {
            file: file.display_name.clone(),
            offset: last.offset + last.len,
            len: 0,
            replacement: format!(" {value}"),
        })
    };
    match change.kind.as_str() {
        "package-added" => append_to(appliance.packages.iter().map(|p| p.name.span).collect())
            .or_else(|| new_node(file, appliance, &format!("packages {value}"))),
        "package-removed" => append_to(appliance.remove.iter().map(|p| p.span).collect())
            .or_else(|| new_node(file, appliance, &format!("remove {value}"))),
        "user-added" => new_node(file, appliance, &format!("user {value}")),
        "group-added" => new_node(file, appliance, &format!("group {value}")),
        "service-enabled" => new_node(file, appliance, &format!("service {value} enable=#true")),
        "service-disabled" => new_node(file, appliance, &format!("service {value} enable=#false")),
        // Files need content and ports a decision about outputs: no edit a machine can make.
        _ => None,
    }
}

/// Insert `node` as the last child of the appliance's block.
fn new_node(file: &SourceFile, appliance: &Appliance, node: &str) -> Option<Edit> {
    new_nodes(file, appliance, &[node.to_owned()])
}

/// Insert `nodes`, in order, as the last children of the appliance's block: one edit, so
/// several new nodes do not compete for the same offset.
pub fn new_nodes(file: &SourceFile, appliance: &Appliance, nodes: &[String]) -> Option<Edit> {
    if nodes.is_empty() {
        return None;
    }
    let text = file.text();
    let start = appliance.span.offset;
    let end = start.checked_add(appliance.span.len)?.min(text.len());
    let block = text.get(start..end)?;
    let close = start + block.rfind('}')?;
    let line_start = text[..close].rfind('\n').map_or(0, |i| i + 1);
    let indent = child_indent(text, appliance).unwrap_or_else(|| "    ".to_owned());
    let (offset, replacement) = if text[line_start..close].trim().is_empty() {
        // `}` on a line of its own: a new line before it.
        let lines: String = nodes
            .iter()
            .map(|node| format!("{indent}{node}\n"))
            .collect();
        (line_start, lines)
    } else {
        // `{ base "x" }` on one line: a `;` ends the previous node.
        let before = text[..close].trim_end();
        let separator = if before.ends_with(['{', ';']) {
            " "
        } else {
            "; "
        };
        (before.len(), format!("{separator}{} ", nodes.join("; ")))
    };
    Some(Edit {
        file: file.display_name.clone(),
        offset,
        len: 0,
        replacement,
    })
}

/// The indentation of the appliance's first child node (its name is followed by `{`).
fn child_indent(text: &str, appliance: &Appliance) -> Option<String> {
    let first_child = appliance
        .base
        .as_ref()
        .map(|b| b.span.offset)
        .or_else(|| appliance.packages.first().map(|p| p.name.span.offset))?;
    let line_start = text[..first_child].rfind('\n').map_or(0, |i| i + 1);
    let indent: String = text[line_start..first_child]
        .chars()
        .take_while(|c| c.is_whitespace())
        .collect();
    (!indent.is_empty()).then_some(indent)
}

/// Apply edits to a text; they must not overlap (each suggestion edits its own place).
pub fn apply_edits(text: &str, edits: &[&Edit]) -> anyhow::Result<String> {
    let mut sorted: Vec<&&Edit> = edits.iter().collect();
    // Back to front, so earlier offsets stay valid; insertions at one offset keep their order.
    sorted.sort_by_key(|edit| std::cmp::Reverse(edit.offset));
    let mut out = text.to_owned();
    for edit in sorted {
        let end = edit
            .offset
            .checked_add(edit.len)
            .context("edit out of range")?;
        if end > out.len() || !out.is_char_boundary(edit.offset) || !out.is_char_boundary(end) {
            bail!(
                "the edit at byte {} does not fit the manifest; was it changed?",
                edit.offset
            );
        }
        out.replace_range(edit.offset..end, &edit.replacement);
    }
    Ok(out)
}

/// Replace a file with `bytes` through a uniquely named temporary file beside it and a
/// rename, so a reader sees the old content or the new; the file keeps its permissions (a new
/// one gets `new_mode`).
pub fn replace_file(path: &std::path::Path, bytes: &[u8], new_mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(path).map_or(new_mode, |m| m.permissions().mode() & 0o7777);
    crate::json_file::write_bytes_atomically(path, bytes, "file-renaming")?;
    fs_err::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// The suggestions among `diagnostics` whose key (`kind:subject`) is in `keys`, grouped by
/// the manifest file they edit; an error names a key no suggestion has, or one that cannot
/// be applied by machine.
pub fn select<'a>(
    diagnostics: &'a [Diagnostic],
    keys: &[String],
) -> anyhow::Result<BTreeMap<std::path::PathBuf, Vec<&'a Edit>>> {
    let mut by_file: BTreeMap<std::path::PathBuf, Vec<&Edit>> = BTreeMap::new();
    for key in keys {
        let matching: Vec<&Diagnostic> = diagnostics
            .iter()
            .filter(|d| {
                d.suggestion
                    .as_ref()
                    .is_some_and(|s| format!("{}:{}", s.kind, s.subject) == *key)
            })
            .collect();
        if matching.is_empty() {
            let shown: Vec<String> = diagnostics
                .iter()
                .filter_map(|d| d.suggestion.as_ref())
                .map(|s| format!("{}:{}", s.kind, s.subject))
                .collect();
            bail!(
                "`{key}` is not among the suggestions{}",
                if shown.is_empty() {
                    " (there are none)".to_owned()
                } else {
                    format!(": {}", shown.join(", "))
                }
            );
        }
        for diagnostic in matching {
            let (Some(edit), Some(file)) = (
                diagnostic.suggestion.as_ref().and_then(|s| s.edit.as_ref()),
                diagnostic.file.as_ref(),
            ) else {
                bail!("`{key}` cannot be applied by machine: write it into the manifest by hand");
            };
            by_file.entry(file.path.clone()).or_default().push(edit);
        }
    }
    Ok(by_file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnostics::Edit;

    fn insert(offset: usize, text: &str) -> Edit {
        Edit {
            file: "appliance.kdl".into(),
            offset,
            len: 0,
            replacement: text.into(),
        }
    }

    #[test]
    fn edits_apply_back_to_front_and_refuse_what_does_not_fit() {
        let text = "abc";
        let (a, b) = (insert(1, "X"), insert(3, "Y"));
        assert_eq!(apply_edits(text, &[&a, &b]).expect("fits"), "aXbcY");
        assert!(apply_edits(text, &[&insert(9, "Z")]).is_err());
    }
}
