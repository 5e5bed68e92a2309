//! The library's layers point one way. Each top-level module has a layer in [`LAYERS`]; a
//! module may use modules of lower layers only, so there is no cycle between top-level
//! modules and a newcomer can read the crate from the bottom up (ARCHITECTURE.md draws the
//! same table). The test reads the sources: every `crate::…` path and `super::…` path that
//! leaves its top-level module is an edge. Comments, string literals and `#[cfg(test)]`
//! items do not count: a test may reach across layers to set up what it checks.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Layers from the bottom up. Leaves first: vocabulary and helpers that use nothing of ours.
const LAYERS: &[&[&str]] = &[
    // The vocabulary: diagnostics (and a suggestion's JSON contract), typed changes and
    // their kinds, dpkg's status format, image references; and helpers.
    &[
        "diagnostics",
        "disk_space",
        "change",
        "dpkg",
        "image_reference",
        "oci_json",
        "process",
        "test_hooks",
    ],
    // The manifest language; the build's JSON state files (they have fault points).
    &["manifest", "json_file"],
    &["workspace", "store"],
    &["check", "packages", "history", "run"],
    &["output", "suggest"],
    &["registry", "capture"],
    &["build"],
    &["cli"],
];

#[derive(Debug, PartialEq, Eq)]
struct Edge {
    from: String,
    to: String,
    file: String,
    line: usize,
}

/// The module path a source file defines: `src/a.rs` and `src/a/mod.rs` are `[a]`,
/// `src/a/b.rs` is `[a, b]`; `lib.rs` is the root.
fn module_path(relative: &Path) -> Vec<String> {
    let mut parts: Vec<String> = relative
        .iter()
        .map(|part| part.to_string_lossy().into_owned())
        .collect();
    if let Some(last) = parts.pop() {
        let stem = last.trim_end_matches(".rs").to_owned();
        if stem != "mod" && stem != "lib" {
            parts.push(stem);
        }
    }
    parts
}

/// The source with comments and the contents of string and character literals blanked
/// (newlines kept, so offsets keep their line numbers).
fn code_only(source: &str) -> String {
    let chars: Vec<char> = source.chars().collect();
    let mut out = String::with_capacity(source.len());
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
        } else if c == 'r'
            && (next == Some('"') || next == Some('#'))
            && !chars
                .get(i.wrapping_sub(1))
                .is_some_and(|p| p.is_alphanumeric() || *p == '_')
        {
            // A raw string: r"…" or r#"…"#.
            let mut j = i + 1;
            let mut hashes = 0;
            while chars.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if chars.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            // The opening (r, hashes, quote) becomes a quote and blanks.
            out.push('"');
            out.extend(std::iter::repeat_n(' ', j - i));
            i = j + 1;
            loop {
                match chars.get(i) {
                    None => break,
                    Some('"') if (1..=hashes).all(|k| chars.get(i + k) == Some(&'#')) => {
                        out.push('"');
                        out.extend(std::iter::repeat_n(' ', hashes));
                        i += 1 + hashes;
                        break;
                    }
                    Some(&other) => {
                        out.push(blank(other));
                        i += 1;
                    }
                }
            }
        } else if c == '"' {
            out.push('"');
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if let Some(&inner) = chars.get(i) {
                    out.push(blank(inner));
                }
                i += 1;
            }
            out.push('"');
            i += 1;
        } else if c == '\'' {
            // A character literal ('x', '\n', '\u{..}'), else a lifetime.
            let literal_end = if next == Some('\\') {
                (i + 2..chars.len().min(i + 12)).find(|&j| chars[j] == '\'')
            } else if chars.get(i + 2) == Some(&'\'') {
                Some(i + 2)
            } else {
                None
            };
            match literal_end {
                Some(end) => {
                    out.push('\'');
                    out.extend(std::iter::repeat_n(' ', end - i - 1));
                    out.push('\'');
                    i = end + 1;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// `code` with every `#[cfg(test)]` item blanked: up to its `;` or its matching `}`.
fn without_test_items(code: &str) -> String {
    let mut out: Vec<char> = code.chars().collect();
    let marker: Vec<char> = "#[cfg(test)]".chars().collect();
    let mut i = 0;
    while i + marker.len() <= out.len() {
        if out[i..i + marker.len()] != marker[..] {
            i += 1;
            continue;
        }
        let mut j = i + marker.len();
        let mut depth = 0usize;
        while j < out.len() {
            match out[j] {
                '{' => depth += 1,
                '}' => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        break;
                    }
                }
                ';' if depth == 0 => break,
                _ => {}
            }
            j += 1;
        }
        let end = (j + 1).min(out.len());
        for c in &mut out[i..end] {
            if *c != '\n' {
                *c = ' ';
            }
        }
        i = j + 1;
    }
    out.into_iter().collect()
}

fn identifier_at(code: &str, at: usize) -> &str {
    let rest = &code[at..];
    let end = rest
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(rest.len());
    &rest[..end]
}

/// The top-level modules a file's code names outside its own, with the line of each use.
fn edges_of(relative: &Path, source: &str) -> Vec<Edge> {
    let module = module_path(relative);
    let Some(own) = module.first().cloned() else {
        return Vec::new(); // lib.rs declares the modules.
    };
    let code = without_test_items(&code_only(source));
    let line_of = |offset: usize| code[..offset].matches('\n').count() + 1;
    let mut edges = Vec::new();
    let mut push = |to: &str, offset: usize| {
        if !to.is_empty() && to != own && to != "self" && to != "super" {
            edges.push(Edge {
                from: own.clone(),
                to: to.to_owned(),
                file: relative.display().to_string(),
                line: line_of(offset),
            });
        }
    };
    for (at, _) in code.match_indices("crate::") {
        if code[..at].ends_with('$') {
            continue;
        }
        let after = at + "crate::".len();
        if code[after..].starts_with('{') {
            // `use crate::{a::b, c}`: the names at the group's top level.
            let mut depth = 0;
            let mut start = true;
            for (k, c) in code[after..].char_indices() {
                match c {
                    '{' => {
                        depth += 1;
                        start = depth == 1;
                    }
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => start = true,
                    c if start && depth == 1 && (c.is_alphanumeric() || c == '_') => {
                        push(identifier_at(&code, after + k), after + k);
                        start = false;
                    }
                    _ => {}
                }
            }
        } else {
            push(identifier_at(&code, after), after);
        }
    }
    // `super::…` that climbs to the crate root names a top-level module.
    for (at, _) in code.match_indices("super::") {
        let preceded = code[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':');
        if preceded {
            continue;
        }
        let mut climbs = 0;
        let mut cursor = at;
        while code[cursor..].starts_with("super::") {
            climbs += 1;
            cursor += "super::".len();
        }
        if climbs >= module.len() {
            push(identifier_at(&code, cursor), cursor);
        }
    }
    edges
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read the source directory") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// Edges that go to the same or a higher layer, and modules the table does not place.
fn violations(edges: &[Edge]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut unplaced = BTreeMap::new();
    for edge in edges {
        match (layer_of(&edge.from), layer_of(&edge.to)) {
            (Some(from), Some(to)) if to >= from => problems.push(format!(
                "{}:{}: `{}` (layer {from}) uses `{}` (layer {to}); a module may use lower \
                 layers only: move what is shared down, or pass it in",
                edge.file, edge.line, edge.from, edge.to
            )),
            (None, _) => {
                unplaced.insert(edge.from.clone(), edge.file.clone());
            }
            (_, None) => {
                unplaced.insert(edge.to.clone(), edge.file.clone());
            }
            _ => {}
        }
    }
    for (module, file) in unplaced {
        problems.push(format!(
            "module `{module}` (seen in {file}) has no layer: add it to LAYERS in tests/layers.rs and to ARCHITECTURE.md"
        ));
    }
    problems
}

#[test]
fn top_level_modules_use_lower_layers_only() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut edges = Vec::new();
    let mut modules = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(&src).expect("under src");
        let source = std::fs::read_to_string(file).expect("read a source file");
        if let Some(module) = module_path(relative).first() {
            modules.push(module.clone());
        }
        edges.extend(edges_of(relative, &source));
    }
    assert!(
        edges.len() > 50,
        "only {} edges found: the scanner is broken",
        edges.len()
    );
    let mut problems = violations(&edges);
    modules.sort();
    modules.dedup();
    for module in modules {
        if layer_of(&module).is_none() {
            problems.push(format!("module `{module}` has no layer in tests/layers.rs"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn an_upward_use_is_found_and_comments_strings_and_tests_are_not() {
    let source = r#"
//! Docs naming [`crate::cli`] do not count.
use crate::{diagnostics::Span, store::{self, tree}};
const TEXT: &str = "crate::build in a string";
const RAW: &str = r"crate::build in a raw string";
fn f<'a>(x: &'a str) -> char { let _ = crate::cli::run; '{' }
#[cfg(test)]
mod tests {
    use crate::build::Thing;
    fn braces() { let _ = "}"; }
}
fn after() { super::run::go(); }
"#;
    let edges = edges_of(Path::new("store/import.rs"), source);
    let names: Vec<(&str, usize)> = edges.iter().map(|e| (e.to.as_str(), e.line)).collect();
    assert_eq!(names, [("diagnostics", 3), ("cli", 6)]);
    let problems = violations(&edges);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("store/import.rs:6: `store` (layer 2) uses `cli` (layer 7)"));

    // From a top-level module's own file, `super::` is the crate root.
    let edges = edges_of(Path::new("check.rs"), "fn f() { super::build::go(); }");
    assert_eq!(edges.len(), 1);
    assert_eq!(violations(&edges).len(), 1);
}
