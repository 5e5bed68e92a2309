//! The schema document (`schema/appliance.schema.kdl`, in the shape of the KDL Schema
//! Language) and the Markdown reference (`schema/reference.md`), generated from
//! [`super::schema`]. Both files are committed; a test regenerates them and fails when they
//! differ, and `APPLIANCE_BLESS=1 cargo test` rewrites them.

use std::fmt::Write as _;

use super::schema::{APPLIANCE, GRAMMARS, NodeSpec, OUTPUT_FORMATS, Repeat, ValueKind};

/// A KDL string literal for `text` (quotes, backslashes and newlines escaped).
pub(crate) fn kdl_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn kdl_value(out: &mut String, indent: &str, kind: &ValueKind) {
    match kind {
        ValueKind::String { grammar } => {
            let _ = writeln!(out, "{indent}type \"string\"");
            let _ = writeln!(out, "{indent}grammar {}", kdl_string(grammar.name));
        }
        ValueKind::Choice { choices } => {
            let _ = writeln!(out, "{indent}type \"string\"");
            let quoted: Vec<String> = choices.iter().map(|c| kdl_string(c)).collect();
            let _ = writeln!(out, "{indent}enum {}", quoted.join(" "));
        }
        ValueKind::Bool => {
            let _ = writeln!(out, "{indent}type \"boolean\"");
        }
        ValueKind::Mode => {
            let _ = writeln!(out, "{indent}type \"integer\"");
            let _ = writeln!(out, "{indent}format \"octal\"");
            let _ = writeln!(out, "{indent}range 0 0o7777");
        }
        ValueKind::Port => {
            let _ = writeln!(out, "{indent}type \"integer\"");
            let _ = writeln!(out, "{indent}range 1 65535");
        }
        ValueKind::Size => {
            let _ = writeln!(out, "{indent}type \"integer\" \"string\"");
            let _ = writeln!(out, "{indent}format \"size\"");
        }
        ValueKind::Duration => {
            let _ = writeln!(out, "{indent}type \"integer\" \"string\"");
            let _ = writeln!(out, "{indent}format \"duration\"");
            let _ = writeln!(out, "{indent}range 1 604800");
        }
        ValueKind::Fraction => {
            let _ = writeln!(out, "{indent}type \"number\"");
            let _ = writeln!(out, "{indent}range 0 1");
        }
        ValueKind::Id => {
            let _ = writeln!(out, "{indent}type \"integer\"");
            let _ = writeln!(out, "{indent}range 0 4294967294");
        }
        ValueKind::Count => {
            let _ = writeln!(out, "{indent}type \"integer\"");
            let _ = writeln!(out, "{indent}range 1 1000");
        }
    }
}

fn kdl_node(out: &mut String, depth: usize, spec: &NodeSpec) {
    let indent = "    ".repeat(depth);
    let inner = "    ".repeat(depth + 1);
    let _ = writeln!(out, "{indent}node {} {{", kdl_string(spec.name));
    let _ = writeln!(out, "{inner}description {}", kdl_string(spec.summary));
    if spec.required {
        let _ = writeln!(out, "{inner}min 1");
    }
    if spec.repeat == Repeat::Once {
        let _ = writeln!(out, "{inner}max 1");
    }
    if let Some(args) = spec.args {
        let _ = writeln!(out, "{inner}value {{");
        let deeper = "    ".repeat(depth + 2);
        let _ = writeln!(out, "{deeper}description {}", kdl_string(args.what));
        kdl_value(out, &deeper, &args.kind);
        let _ = writeln!(out, "{deeper}min {}", args.min);
        if let Some(max) = args.max {
            let _ = writeln!(out, "{deeper}max {max}");
        }
        let _ = writeln!(out, "{inner}}}");
    }
    for prop in spec.props {
        let _ = writeln!(out, "{inner}prop {} {{", kdl_string(prop.name));
        let deeper = "    ".repeat(depth + 2);
        let _ = writeln!(out, "{deeper}description {}", kdl_string(prop.summary));
        if prop.required {
            let _ = writeln!(out, "{deeper}required #true");
        }
        kdl_value(out, &deeper, &prop.kind);
        let _ = writeln!(out, "{inner}}}");
    }
    if !spec.children.is_empty() {
        let _ = writeln!(out, "{inner}children {{");
        for child in spec.children {
            kdl_node(out, depth + 2, child);
        }
        let _ = writeln!(out, "{inner}}}");
    }
    let _ = writeln!(out, "{indent}}}");
}

/// The schema as a KDL document.
pub fn schema_document() -> String {
    let mut out = String::new();
    out.push_str(
        "// Generated from appliance-core/src/manifest/schema.rs by its tests; do not edit.\n",
    );
    out.push_str(
        "// Regenerate with `APPLIANCE_BLESS=1 cargo test -p appliance-core reference`.\n",
    );
    out.push_str("document {\n");
    out.push_str("    info {\n");
    out.push_str("        title \"cargo-appliance manifest (appliance.kdl, *.appliance.kdl)\"\n");
    out.push_str(
        "        description \"Appliances built by cargo-appliance from a Rust workspace\"\n",
    );
    out.push_str("    }\n");
    kdl_node(&mut out, 1, &APPLIANCE);
    out.push_str("    definitions {\n");
    for grammar in GRAMMARS {
        let _ = writeln!(
            out,
            "        grammar {} description={}",
            kdl_string(grammar.name),
            kdl_string(grammar.description)
        );
    }
    for format in OUTPUT_FORMATS {
        let props: Vec<String> = format.props.iter().map(|p| kdl_string(p)).collect();
        let _ = writeln!(
            out,
            "        output-format {} {} disk=#{} description={}",
            kdl_string(format.name),
            props.join(" "),
            format.disk,
            kdl_string(format.summary)
        );
    }
    out.push_str("    }\n}\n");
    out
}

fn md_value(kind: &ValueKind) -> String {
    match kind {
        ValueKind::String { grammar } => format!("string ([{0}](#{0}))", grammar.name),
        other => other.describe(),
    }
}

fn md_node(out: &mut String, path: &str, spec: &NodeSpec) {
    let _ = writeln!(out, "### `{path}`\n");
    let _ = writeln!(out, "{}\n", spec.summary);
    let _ = writeln!(out, "```kdl\n{}\n```\n", spec.example);
    let occurs = match (spec.required, spec.repeat) {
        (true, Repeat::Once) => "required, once",
        (true, Repeat::Many) => "required, one or more",
        (false, Repeat::Once) => "optional, at most once",
        (false, Repeat::Many) => "optional, any number",
    };
    let _ = writeln!(out, "- Occurs: {occurs}");
    if let Some(args) = spec.args {
        let count = match (args.min, args.max) {
            (min, Some(max)) if min == max => format!("exactly {min}"),
            (0, Some(max)) => format!("at most {max}"),
            (min, Some(max)) => format!("{min} to {max}"),
            (min, None) => format!("{min} or more"),
        };
        let _ = writeln!(
            out,
            "- Arguments: {count} {}, each {}",
            args.what,
            md_value(&args.kind)
        );
    } else {
        let _ = writeln!(out, "- Arguments: none");
    }
    if !spec.props.is_empty() {
        let _ = writeln!(
            out,
            "\n| property | value | required | meaning |\n|---|---|---|---|"
        );
        for prop in spec.props {
            let _ = writeln!(
                out,
                "| `{}` | {} | {} | {} |",
                prop.name,
                md_value(&prop.kind),
                if prop.required { "yes" } else { "no" },
                prop.summary
            );
        }
    }
    out.push('\n');
    for child in spec.children {
        md_node(out, &format!("{path} > {}", child.name), child);
    }
}

/// The Markdown reference of the manifest language.
pub fn reference_markdown() -> String {
    let mut out = String::new();
    out.push_str("<!-- Generated from appliance-core/src/manifest/schema.rs by its tests; do not edit. -->\n");
    out.push_str("# Manifest reference\n\n");
    out.push_str(
        "Appliances are declared in KDL v2 files named `appliance.kdl` or `*.appliance.kdl` \
         anywhere in a Cargo workspace (files ignored by `.gitignore` and the target directory \
         are skipped). Each file holds one or more `appliance` nodes. Every node, argument and \
         property below is checked by `cargo appliance check`; anything else is an error with \
         a \"did you mean\" where a known name is close. The machine-readable form of this \
         reference is [`appliance.schema.kdl`](appliance.schema.kdl).\n\n",
    );
    out.push_str(
        "Paths: copy and script sources are relative to the manifest's directory and must stay \
         inside the workspace (a symlink that leads outside is refused unless \
         `allow-outside-workspace=#true`). A source that is a symlink is followed; symlinks \
         inside a copied directory are copied as symlinks. Destinations are absolute paths in \
         the image and resolve inside the image root, so `/var/run/x` lands in `/run/x` when \
         the base links `/var/run` to `/run`.\n\n",
    );
    out.push_str("## Nodes\n\n");
    md_node(&mut out, "appliance", &APPLIANCE);
    out.push_str(
        "## Output formats\n\n| format | writes | options | bootable disk |\n|---|---|---|---|\n",
    );
    for format in OUTPUT_FORMATS {
        let props: Vec<String> = format.props.iter().map(|p| format!("`{p}`")).collect();
        let _ = writeln!(
            out,
            "| `{}` | {} | {} | {} |",
            format.name,
            format.summary,
            props.join(", "),
            if format.disk { "yes" } else { "no" }
        );
    }
    change_kinds_markdown(&mut out);
    diagnostic_codes_markdown(&mut out);
    out.push_str("\n## Value grammars\n\n");
    for grammar in GRAMMARS {
        let _ = writeln!(out, "#### {}\n\n{}.\n", grammar.name, grammar.description);
    }
    out
}

/// The diagnostic-code table ([`crate::diagnostics::codes::CODES`]), by stage.
fn diagnostic_codes_markdown(out: &mut String) {
    use crate::diagnostics::codes::CODES;
    out.push_str(
        "\n## Diagnostic codes\n\nEvery diagnostic carries a code (`code` in \
         `--message-format json`).\n",
    );
    let mut stage = None;
    for code in CODES {
        if stage != Some(code.stage) {
            stage = Some(code.stage);
            let _ = write!(
                out,
                "\n### {}\n\n| code | meaning |\n|---|---|\n",
                code.stage.title()
            );
        }
        let _ = writeln!(out, "| `{}` | {} |", code.code, code.meaning);
    }
}

/// The change-kind table ([`crate::change::CHANGE_KINDS`]): what `diff` shows, the history
/// records and suggestion keys (`suggest --apply KIND:SUBJECT`) name.
fn change_kinds_markdown(out: &mut String) {
    use crate::change::{CHANGE_KINDS, Learnt, PLUMBING_DIRS, PLUMBING_PATHS, PLUMBING_UNITS};
    out.push_str(
        "\n## Change kinds\n\n`cargo appliance diff` reports changes between two images by \
         kind; the derivation history records them, and a suggestion's key is \
         `KIND:SUBJECT` (`package-added:ca-certificates`).\n\n\
         | kind | meaning | learnt and suggested |\n|---|---|---|\n",
    );
    for kind in CHANGE_KINDS {
        let learnt = match kind.learnt {
            Learnt::Always => "yes",
            Learnt::UnlessPlumbing => "yes, except the build's own plumbing (below)",
            Learnt::Never => "no",
        };
        let _ = writeln!(out, "| `{}` | {} | {learnt} |", kind.name, kind.description);
    }
    let list = |items: &[&str]| -> String {
        items
            .iter()
            .map(|i| format!("`{i}`"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = write!(
        out,
        "\nThe build's own plumbing, never learnt or suggested: the files {}; everything \
         under {}; the units {}.\n",
        list(PLUMBING_PATHS),
        list(PLUMBING_DIRS),
        list(PLUMBING_UNITS)
    );
    out.push_str(
        "\n`cargo appliance capture` leaves out what a running system writes by itself (and \
         the globs of `capture { ignore }`):\n\n| paths | why |\n|---|---|\n",
    );
    for (glob, why) in crate::change::CAPTURE_NOISE {
        let _ = writeln!(out, "| `{glob}` | {why} |");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn schema_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../schema")
    }

    /// Compare a generated file with the committed one; `APPLIANCE_BLESS=1` rewrites it.
    fn assert_current(name: &str, generated: &str) {
        let path = schema_dir().join(name);
        if std::env::var_os("APPLIANCE_BLESS").is_some() {
            fs_err::write(&path, generated).expect("schema directory is writable");
            return;
        }
        let committed = fs_err::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == generated,
            "schema/{name} is out of date with schema.rs; run `APPLIANCE_BLESS=1 cargo test -p appliance-core reference`"
        );
    }

    #[test]
    fn kdl_strings_escape_quotes_and_backslashes() {
        assert_eq!(kdl_string("a\"b\\c"), "\"a\\\"b\\\\c\"");
    }

    #[test]
    fn reference_files_match_the_schema() {
        assert_current("appliance.schema.kdl", &schema_document());
        assert_current("reference.md", &reference_markdown());
    }

    #[test]
    fn schema_document_is_valid_kdl_naming_every_node() {
        let document =
            kdl::KdlDocument::parse_v2(&schema_document()).expect("generated schema parses");
        let text = document.to_string();
        for child in APPLIANCE.children {
            assert!(
                text.contains(&format!("node \"{}\"", child.name)),
                "{}",
                child.name
            );
        }
    }
}
