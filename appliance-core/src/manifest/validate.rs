//! Schema-driven checks of one KDL node: arguments, properties, children and value types.
//!
//! The output is a [`NodeView`] holding only values that passed their checks, already
//! converted; the typed layer in `parse.rs` reads from it and never sees a raw KDL value.

use std::collections::BTreeMap;
use std::sync::Arc;

use kdl::{KdlEntry, KdlNode, KdlValue};

use super::schema::{self, NodeSpec, Repeat, ValueKind};
use crate::diagnostics::{Diagnostic, SourceFile, Span, did_you_mean};

/// A checked, converted value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Bool(bool),
    Int(u64),
    Float(f64),
}

#[derive(Debug, Clone)]
pub struct Checked {
    pub value: Value,
    pub span: Span,
}

/// A node after schema checks: the values that passed, and its children's views.
#[derive(Debug)]
pub struct NodeView {
    pub spec: &'static NodeSpec,
    pub span: Span,
    pub name_span: Span,
    pub args: Vec<Checked>,
    /// Number of arguments written, valid or not (so callers can tell "missing" from "invalid").
    pub arg_count: usize,
    pub props: BTreeMap<&'static str, Checked>,
    /// Properties written, valid or not.
    pub written_props: Vec<&'static str>,
    pub children: Vec<NodeView>,
}

impl NodeView {
    pub fn str_arg(&self, index: usize) -> Option<(String, Span)> {
        match self.args.get(index) {
            Some(Checked {
                value: Value::Str(s),
                span,
            }) => Some((s.clone(), *span)),
            _ => None,
        }
    }

    pub fn str_args(&self) -> impl Iterator<Item = (String, Span)> + '_ {
        self.args.iter().filter_map(|checked| match &checked.value {
            Value::Str(s) => Some((s.clone(), checked.span)),
            _ => None,
        })
    }

    pub fn int_arg(&self, index: usize) -> Option<u64> {
        match self.args.get(index) {
            Some(Checked {
                value: Value::Int(n),
                ..
            }) => Some(*n),
            _ => None,
        }
    }

    pub fn str_prop(&self, name: &str) -> Option<(String, Span)> {
        match self.props.get(name) {
            Some(Checked {
                value: Value::Str(s),
                span,
            }) => Some((s.clone(), *span)),
            _ => None,
        }
    }

    pub fn bool_prop(&self, name: &str) -> Option<bool> {
        match self.props.get(name) {
            Some(Checked {
                value: Value::Bool(b),
                ..
            }) => Some(*b),
            _ => None,
        }
    }

    pub fn int_prop(&self, name: &str) -> Option<u64> {
        match self.props.get(name) {
            Some(Checked {
                value: Value::Int(n),
                ..
            }) => Some(*n),
            _ => None,
        }
    }

    pub fn float_prop(&self, name: &str) -> Option<f64> {
        match self.props.get(name) {
            Some(Checked {
                value: Value::Float(f),
                ..
            }) => Some(*f),
            _ => None,
        }
    }

    pub fn prop_span(&self, name: &str) -> Option<Span> {
        self.props.get(name).map(|checked| checked.span)
    }

    pub fn wrote(&self, prop: &str) -> bool {
        self.written_props.contains(&prop)
    }
}

/// Checks nodes against specs, collecting diagnostics.
#[derive(Debug)]
pub struct Validator<'a> {
    pub file: &'a Arc<SourceFile>,
    pub diagnostics: &'a mut Vec<Diagnostic>,
}

impl Validator<'_> {
    fn report(&mut self, diagnostic: Diagnostic) {
        self.diagnostics.push(diagnostic);
    }

    /// Check a node against its spec, recursing into children.
    pub fn check_node(&mut self, node: &KdlNode, spec: &'static NodeSpec) -> NodeView {
        let name_span = Span::from(node.name().span());
        if let Some(ty) = node.ty() {
            self.report(
                Diagnostic::error(
                    "appliance::type-annotation",
                    format!(
                        "type annotations are not used in appliance manifests: `({})`",
                        ty.value()
                    ),
                )
                .at(self.file, ty.span())
                .label("remove this annotation"),
            );
        }
        let mut view = NodeView {
            spec,
            span: node.span().into(),
            name_span,
            args: Vec::new(),
            arg_count: 0,
            props: BTreeMap::new(),
            written_props: Vec::new(),
            children: Vec::new(),
        };
        let mut first_prop_span: BTreeMap<&'static str, Span> = BTreeMap::new();
        for entry in node.entries() {
            match entry.name() {
                None => {
                    view.arg_count += 1;
                    self.check_arg(spec, entry, view.arg_count, &mut view.args);
                }
                Some(key) => {
                    let Some(prop) = spec.prop(key.value()) else {
                        self.unknown_prop(spec, entry, key.value());
                        continue;
                    };
                    if let Some(first) = first_prop_span.get(prop.name) {
                        self.report(
                            Diagnostic::error(
                                "appliance::duplicate-property",
                                format!("`{}` is given twice on `{}`", prop.name, spec.name),
                            )
                            .at(self.file, entry.span())
                            .label("given again here")
                            .related(*first, "first given here")
                            .help("remove one of them"),
                        );
                        continue;
                    }
                    first_prop_span.insert(prop.name, entry.span().into());
                    view.written_props.push(prop.name);
                    if let Some(value) = self.check_value(entry, &prop.kind, prop.name) {
                        view.props.insert(
                            prop.name,
                            Checked {
                                value,
                                span: entry.span().into(),
                            },
                        );
                    }
                }
            }
        }
        self.check_arg_count(node, spec, view.arg_count);
        for prop in spec.props.iter().filter(|prop| prop.required) {
            if !first_prop_span.contains_key(prop.name) {
                self.report(
                    Diagnostic::error(
                        "appliance::missing-property",
                        format!("`{}` needs `{}=`: {}", spec.name, prop.name, prop.summary),
                    )
                    .at(self.file, name_span)
                    .label(format!("no `{}` given", prop.name))
                    .help(format!(
                        "add {}={}",
                        prop.name,
                        example_value(&prop.kind)
                    )),
                );
            }
        }
        if let Some(children) = node.children() {
            if spec.children.is_empty() {
                self.report(
                    Diagnostic::error(
                        "appliance::unexpected-children",
                        format!("`{}` takes no children", spec.name),
                    )
                    .at(self.file, children.span())
                    .label("remove this block"),
                );
            } else {
                view.children = self.check_children(children.nodes(), spec);
            }
        }
        view
    }

    /// Check the children of a node: names, repetition and required children.
    pub fn check_children(
        &mut self,
        nodes: &[KdlNode],
        parent: &'static NodeSpec,
    ) -> Vec<NodeView> {
        let mut views: Vec<NodeView> = Vec::new();
        for child in nodes {
            let name = child.name().value();
            let Some(spec) = parent.child(name) else {
                self.unknown_node(child, parent);
                continue;
            };
            if spec.repeat == Repeat::Once
                && let Some(first) = views.iter().find(|v| v.spec.name == spec.name)
            {
                let first_span = first.name_span;
                self.report(
                    Diagnostic::error(
                        "appliance::duplicate-node",
                        format!("`{name}` may appear only once in `{}`", parent.name),
                    )
                    .at(self.file, child.name().span())
                    .label("given again here")
                    .related(first_span, "first given here")
                    .help("remove one of them, or merge them"),
                );
                continue;
            }
            views.push(self.check_node(child, spec));
        }
        views
    }

    fn check_arg(
        &mut self,
        spec: &NodeSpec,
        entry: &KdlEntry,
        position: usize,
        out: &mut Vec<Checked>,
    ) {
        let Some(args) = spec.args else {
            return;
        };
        if args.max.is_some_and(|max| position > max) {
            return;
        }
        if let Some(value) = self.check_value(entry, &args.kind, args.what) {
            out.push(Checked {
                value,
                span: entry.span().into(),
            });
        }
    }

    fn check_arg_count(&mut self, node: &KdlNode, spec: &NodeSpec, count: usize) {
        let arg_entries: Vec<&KdlEntry> = node
            .entries()
            .iter()
            .filter(|e| e.name().is_none())
            .collect();
        match spec.args {
            None if count > 0 => {
                self.report(
                    Diagnostic::error(
                        "appliance::unexpected-argument",
                        format!("`{}` takes no arguments, only properties", spec.name),
                    )
                    .at(self.file, arg_entries[0].span())
                    .label("unexpected argument")
                    .help(format!("for example: {}", spec.example)),
                );
            }
            Some(args) if count < args.min => {
                self.report(
                    Diagnostic::error(
                        "appliance::missing-argument",
                        format!("`{}` needs a {}", spec.name, args.what),
                    )
                    .at(self.file, node.name().span())
                    .label(format!("expected {}", args.kind.describe()))
                    .help(format!("for example: {}", spec.example)),
                );
            }
            Some(args) if args.max.is_some_and(|max| count > max) => {
                let max = args.max.unwrap_or(0);
                let plural = if max == 1 { "" } else { "s" };
                self.report(
                    Diagnostic::error(
                        "appliance::too-many-arguments",
                        format!(
                            "`{}` takes {max} {}{plural}, found {count}",
                            spec.name, args.what
                        ),
                    )
                    .at(self.file, arg_entries[max].span())
                    .label("unexpected argument")
                    .help(format!("for example: {}", spec.example)),
                );
            }
            _ => {}
        }
    }

    fn unknown_prop(&mut self, spec: &NodeSpec, entry: &KdlEntry, key: &str) {
        let known: Vec<&str> = spec.props.iter().map(|p| p.name).collect();
        let help = match did_you_mean(key, known.iter().copied()) {
            Some(close) => format!("did you mean `{close}`?"),
            None if known.is_empty() => format!("`{}` takes no properties", spec.name),
            None => format!("`{}` knows: {}", spec.name, known.join(", ")),
        };
        self.report(
            Diagnostic::error(
                "appliance::unknown-property",
                format!("unknown property `{key}` on `{}`", spec.name),
            )
            .at(self.file, entry.span())
            .label("unknown property")
            .help(help),
        );
    }

    fn unknown_node(&mut self, node: &KdlNode, parent: &NodeSpec) {
        let name = node.name().value();
        let known: Vec<&str> = parent.children.iter().map(|c| c.name).collect();
        let belongs_elsewhere = find_parent_of(name, &schema::APPLIANCE)
            .filter(|elsewhere| *elsewhere != parent.name)
            .or_else(|| (name == schema::APPLIANCE.name).then_some("the top level"));
        let help = if let Some(close) = did_you_mean(name, known.iter().copied()) {
            format!("did you mean `{close}`?")
        } else if let Some(elsewhere) = belongs_elsewhere {
            let place = if elsewhere == "the top level" {
                elsewhere.to_owned()
            } else {
                format!("`{elsewhere}`")
            };
            format!("`{name}` belongs inside {place}, not `{}`", parent.name)
        } else {
            format!("`{}` knows: {}", parent.name, known.join(", "))
        };
        self.report(
            Diagnostic::error(
                "appliance::unknown-node",
                format!("unknown node `{name}` in `{}`", parent.name),
            )
            .at(self.file, node.name().span())
            .label("unknown node")
            .help(help),
        );
    }

    /// Check one value against its kind. `what` names the argument or property in messages.
    pub fn check_value(&mut self, entry: &KdlEntry, kind: &ValueKind, what: &str) -> Option<Value> {
        if let Some(ty) = entry.ty() {
            self.report(
                Diagnostic::error(
                    "appliance::type-annotation",
                    format!(
                        "type annotations are not used in appliance manifests: `({})`",
                        ty.value()
                    ),
                )
                .at(self.file, entry.span())
                .label("remove this annotation"),
            );
            return None;
        }
        let repr = entry.format().map(|f| f.value_repr.as_str()).unwrap_or("");
        match convert(entry.value(), repr, kind) {
            Ok(value) => Some(value),
            Err(problem) => {
                let code = if problem.wrong_type {
                    "appliance::wrong-type"
                } else {
                    "appliance::invalid-value"
                };
                let label = if problem.wrong_type {
                    format!("expected {}", kind.describe())
                } else {
                    format!("invalid {what}")
                };
                self.report(
                    Diagnostic::error(code, format!("invalid {what}: {}", problem.message))
                        .at(self.file, entry.span())
                        .label(label)
                        .maybe_help(problem.help),
                );
                None
            }
        }
    }
}

/// Which node, if any, has a child called `name` — to tell "wrong place" from "misspelled".
fn find_parent_of(name: &str, spec: &'static NodeSpec) -> Option<&'static str> {
    let children: &'static [NodeSpec] = spec.children;
    if children.iter().any(|child| child.name == name) {
        return Some(spec.name);
    }
    children
        .iter()
        .find_map(|child| find_parent_of(name, child))
}

fn example_value(kind: &ValueKind) -> String {
    match kind {
        ValueKind::String { .. } => "\"…\"".into(),
        ValueKind::Choice { choices } => format!("\"{}\"", choices.first().copied().unwrap_or("")),
        ValueKind::Bool => "#true".into(),
        ValueKind::Mode => "0o644".into(),
        ValueKind::Port => "8080".into(),
        ValueKind::Size => "\"2G\"".into(),
        ValueKind::Duration => "\"10m\"".into(),
        ValueKind::Fraction => "0.5".into(),
        ValueKind::Id | ValueKind::Count => "1".into(),
    }
}

#[derive(Debug)]
struct Problem {
    message: String,
    help: Option<String>,
    wrong_type: bool,
}

fn wrong_type(found: &KdlValue, kind: &ValueKind, help: Option<String>) -> Problem {
    Problem {
        message: format!(
            "expected {}, found {}",
            kind.describe(),
            describe_kdl(found)
        ),
        help,
        wrong_type: true,
    }
}

fn invalid(message: String, help: Option<String>) -> Problem {
    Problem {
        message,
        help,
        wrong_type: false,
    }
}

fn describe_kdl(value: &KdlValue) -> String {
    match value {
        KdlValue::String(s) => format!("the string {}", quote(s)),
        KdlValue::Integer(n) => format!("the number {n}"),
        KdlValue::Float(f) => format!("the number {f}"),
        KdlValue::Bool(b) => format!("#{b}"),
        KdlValue::Null => "#null".into(),
    }
}

/// Quote a user value for a message, escaping anything that could break the line.
pub fn quote(value: &str) -> String {
    const SHOWN: usize = 80;
    let shown: String = value.chars().take(SHOWN).collect();
    let ellipsis = if value.chars().count() > SHOWN {
        "…"
    } else {
        ""
    };
    format!("{:?}{ellipsis}", shown)
}

fn convert(value: &KdlValue, repr: &str, kind: &ValueKind) -> Result<Value, Problem> {
    match kind {
        ValueKind::String { grammar } => match value {
            KdlValue::String(s) => {
                (grammar.check)(s)
                    .map(|()| Value::Str(s.clone()))
                    .map_err(|e| {
                        invalid(
                            format!("{} {e}", quote(s)),
                            Some(format!("expected {}", grammar.description)),
                        )
                    })
            }
            KdlValue::Integer(_) | KdlValue::Float(_) | KdlValue::Bool(_) => Err(wrong_type(
                value,
                kind,
                Some(format!(
                    "write it as a string: \"{}\"",
                    repr.trim_start_matches('#')
                )),
            )),
            KdlValue::Null => Err(wrong_type(value, kind, None)),
        },
        ValueKind::Choice { choices } => match value {
            KdlValue::String(s) if choices.contains(&s.as_str()) => Ok(Value::Str(s.clone())),
            KdlValue::String(s) => Err(invalid(
                format!("{} is not {}", quote(s), kind.describe()),
                did_you_mean(s, choices.iter().copied())
                    .map(|close| format!("did you mean \"{close}\"?")),
            )),
            _ => Err(wrong_type(value, kind, None)),
        },
        ValueKind::Bool => match value {
            KdlValue::Bool(b) => Ok(Value::Bool(*b)),
            KdlValue::String(s) if matches!(s.as_str(), "true" | "false" | "yes" | "no") => {
                let b = matches!(s.as_str(), "true" | "yes");
                Err(wrong_type(
                    value,
                    kind,
                    Some(format!("write #{b} (KDL booleans are not strings)")),
                ))
            }
            _ => Err(wrong_type(
                value,
                kind,
                Some("write #true or #false".into()),
            )),
        },
        ValueKind::Mode => convert_mode(value, repr, kind),
        ValueKind::Port => integer_in(value, kind, 1, 65535),
        ValueKind::Id => integer_in(value, kind, 0, u64::from(u32::MAX - 1)),
        ValueKind::Count => integer_in(value, kind, 1, 1000),
        ValueKind::Fraction => match value {
            KdlValue::Float(f) if (0.0..=1.0).contains(f) => Ok(Value::Float(*f)),
            KdlValue::Integer(n) if (0..=1).contains(n) => Ok(Value::Float(*n as f64)),
            KdlValue::Float(_) | KdlValue::Integer(_) => Err(invalid(
                format!("{} is outside 0–1", describe_kdl(value)),
                Some("write a share such as 0.25".into()),
            )),
            _ => Err(wrong_type(value, kind, None)),
        },
        ValueKind::Duration => {
            let seconds = match value {
                KdlValue::Integer(n) => u64::try_from(*n).map_err(|_| {
                    invalid(
                        format!("{n} is not a duration"),
                        Some("write a duration such as \"10m\"".into()),
                    )
                })?,
                KdlValue::String(s) => parse_duration(s).map_err(|e| {
                    invalid(
                        e,
                        Some("write a duration such as \"30s\", \"10m\" or \"2h\"".into()),
                    )
                })?,
                _ => return Err(wrong_type(value, kind, None)),
            };
            if !(1..=MAX_DURATION_SECS).contains(&seconds) {
                return Err(invalid(
                    format!("{seconds} s is outside 1 s – 7 days"),
                    Some("write a duration such as \"10m\"".into()),
                ));
            }
            Ok(Value::Int(seconds))
        }
        ValueKind::Size => {
            let bytes = match value {
                KdlValue::Integer(n) => u64::try_from(*n).map_err(|_| {
                    invalid(
                        format!("{n} is not a size"),
                        Some("write a size such as \"2G\"".into()),
                    )
                })?,
                KdlValue::String(s) => parse_size(s).map_err(|e| {
                    invalid(e, Some("write a size such as \"2G\" or \"512M\"".into()))
                })?,
                _ => return Err(wrong_type(value, kind, None)),
            };
            if bytes > schema::MAX_DISK_BYTES {
                return Err(invalid(
                    format!(
                        "{} is larger than the largest supported disk (16T)",
                        human_size(bytes)
                    ),
                    Some("disk sizes are limited to 16T, the ext4 limit with 4 KiB blocks".into()),
                ));
            }
            if bytes < schema::MIN_DISK_BYTES {
                return Err(invalid(
                    format!(
                        "{} is smaller than the smallest useful disk (64M)",
                        human_size(bytes)
                    ),
                    Some("sizes are bytes unless suffixed: \"2G\", \"512M\"".into()),
                ));
            }
            Ok(Value::Int(bytes))
        }
    }
}

fn integer_in(value: &KdlValue, kind: &ValueKind, min: u64, max: u64) -> Result<Value, Problem> {
    match value {
        KdlValue::Integer(n) => match u64::try_from(*n) {
            Ok(n) if (min..=max).contains(&n) => Ok(Value::Int(n)),
            _ => Err(invalid(format!("{n} is out of range {min}–{max}"), None)),
        },
        KdlValue::String(s) if s.parse::<u64>().is_ok() => Err(wrong_type(
            value,
            kind,
            Some(format!("write the number without quotes: {s}")),
        )),
        _ => Err(wrong_type(value, kind, None)),
    }
}

fn convert_mode(value: &KdlValue, repr: &str, kind: &ValueKind) -> Result<Value, Problem> {
    const MAX_MODE: i128 = 0o7777;
    match value {
        KdlValue::Integer(n) => {
            let written_in_octal = repr.starts_with("0o") || repr.starts_with("+0o");
            if !written_in_octal && *n != 0 {
                let help = if repr.len() <= 4 && repr.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
                    format!("did you mean 0o{}?", repr.trim_start_matches('0'))
                } else {
                    "write modes in octal, such as 0o644".into()
                };
                return Err(invalid(
                    format!("mode `{repr}` is not written in octal"),
                    Some(help),
                ));
            }
            if !(0..=MAX_MODE).contains(n) {
                return Err(invalid(
                    format!("mode 0o{n:o} is larger than 0o7777"),
                    Some("a mode has permission bits and setuid/setgid/sticky only".into()),
                ));
            }
            Ok(Value::Int(*n as u64))
        }
        KdlValue::String(s) => {
            let digits = s.trim_start_matches("0o").trim_start_matches('0');
            let help = if !digits.is_empty()
                && digits.len() <= 4
                && digits.bytes().all(|b| (b'0'..=b'7').contains(&b))
            {
                format!("write the mode as an octal number without quotes: 0o{digits}")
            } else {
                "write modes in octal, such as 0o644".into()
            };
            Err(wrong_type(value, kind, Some(help)))
        }
        _ => Err(wrong_type(
            value,
            kind,
            Some("write modes in octal, such as 0o644".into()),
        )),
    }
}

/// The longest duration a manifest may give (a week): beyond it a limit is no limit.
const MAX_DURATION_SECS: u64 = 7 * 24 * 3600;

/// Parse `30s`, `10m`, `2h`, `1d` or `90` (seconds) into seconds.
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let unit_seconds = match unit.trim() {
        "" | "s" | "sec" => 1,
        "m" | "min" => 60,
        "h" => 3600,
        "d" => 86400,
        other => {
            return Err(format!(
                "{} has an unknown unit {} (s, m, h or d)",
                quote(text),
                quote(other)
            ));
        }
    };
    if number.is_empty() || number.len() > 12 {
        return Err(format!("{} is not a duration", quote(text)));
    }
    let value: u64 = number
        .parse()
        .map_err(|_| format!("{} is not a duration", quote(text)))?;
    value
        .checked_mul(unit_seconds)
        .ok_or_else(|| format!("{} is too long", quote(text)))
}

/// Parse `2G`, `512M`, `2GiB`, `1.5G`, `4096` into bytes (binary multiples).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let unit = unit.trim();
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        "P" | "PB" | "PIB" => 50,
        "E" | "EB" | "EIB" => 60,
        _ => {
            return Err(format!(
                "{} has an unknown unit {}",
                quote(text),
                quote(unit)
            ));
        }
    };
    if number.is_empty() || number.len() > 24 {
        return Err(format!("{} is not a size", quote(text)));
    }
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{} is not a size", quote(text)))?;
    let bytes = value * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("{} is too large", quote(text)));
    }
    Ok(bytes as u64)
}

pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "K", "M", "G", "T", "P", "E"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if value.fract() == 0.0 {
        format!("{value}{}", UNITS[unit])
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        let cases = [
            ("2G", 2 << 30),
            ("512M", 512 << 20),
            ("2GiB", 2 << 30),
            ("1.5G", 3 << 29),
            ("4096", 4096),
            ("1P", 1 << 50),
        ];
        for (text, bytes) in cases {
            assert_eq!(parse_size(text), Ok(bytes), "{text}");
        }
        for bad in [
            "",
            "G",
            "2Q",
            "1.2.3G",
            "99999999999999999999999999E",
            "-1G",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn modes_must_be_octal() {
        let kind = ValueKind::Mode;
        assert_eq!(
            convert_mode(&KdlValue::Integer(0o644), "0o644", &kind).ok(),
            Some(Value::Int(0o644))
        );
        let decimal =
            convert_mode(&KdlValue::Integer(644), "644", &kind).expect_err("decimal rejected");
        assert_eq!(decimal.help.as_deref(), Some("did you mean 0o644?"));
        assert!(convert_mode(&KdlValue::Integer(0o17777), "0o17777", &kind).is_err());
        let quoted = convert_mode(&KdlValue::String("0644".into()), "\"0644\"", &kind)
            .expect_err("string rejected");
        assert!(quoted.wrong_type);
    }
}
