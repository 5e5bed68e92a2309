//! KDL text → typed appliances. Pure: takes the text, returns data and diagnostics.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use kdl::KdlDocument;

use super::grammar;
use super::model::*;
use super::schema::{self, APPLIANCE};
use super::validate::{NodeView, Validator, quote};
use super::version::VersionReq;
use crate::diagnostics::{Diagnostic, SourceFile, Span, did_you_mean};

/// Parse and validate one manifest. Never panics; every problem becomes a diagnostic.
pub fn parse_manifest(file: &Arc<SourceFile>) -> (Vec<Appliance>, Vec<Diagnostic>) {
    let mut diagnostics = Vec::new();
    let text = file.text();
    if text.len() > schema::MAX_MANIFEST_BYTES {
        diagnostics.push(
            Diagnostic::error(
                "appliance::manifest-too-large",
                format!(
                    "manifest is {} bytes; manifests are limited to {} bytes",
                    text.len(),
                    schema::MAX_MANIFEST_BYTES
                ),
            )
            .in_file(file),
        );
        return (Vec::new(), diagnostics);
    }
    if let Some(offset) = nesting_too_deep(text, schema::MAX_NESTING) {
        diagnostics.push(
            Diagnostic::error(
                "appliance::nesting-too-deep",
                format!(
                    "children are nested more than {} levels deep",
                    schema::MAX_NESTING
                ),
            )
            .at(file, Span { offset, len: 1 })
            .label("too deep")
            .help("appliance manifests need at most three levels"),
        );
        return (Vec::new(), diagnostics);
    }
    let document = match KdlDocument::parse_v2(text) {
        Ok(document) => document,
        Err(error) => {
            diagnostics.extend(error.diagnostics.into_iter().map(|d| {
                let message = d.message.unwrap_or_else(|| "invalid KDL".into());
                Diagnostic::error("appliance::syntax", format!("syntax error: {message}"))
                    .at(file, d.span)
                    .label(d.label.unwrap_or_else(|| "here".into()))
                    .maybe_help(d.help)
            }));
            if diagnostics.is_empty() {
                diagnostics
                    .push(Diagnostic::error("appliance::syntax", "syntax error").in_file(file));
            }
            return (Vec::new(), diagnostics);
        }
    };

    let mut validator = Validator {
        file,
        diagnostics: &mut diagnostics,
    };
    let mut appliances = Vec::new();
    for node in document.nodes() {
        if node.name().value() != APPLIANCE.name {
            let name = node.name().value();
            let help = if APPLIANCE.child(name).is_some() {
                format!("`{name}` belongs inside an `appliance \"…\" {{ … }}` block")
            } else if let Some(close) = did_you_mean(name, [APPLIANCE.name]) {
                format!("did you mean `{close}`?")
            } else {
                "a manifest holds `appliance \"name\" { … }` blocks".into()
            };
            validator.diagnostics.push(
                Diagnostic::error(
                    "appliance::unknown-node",
                    format!("unknown top-level node `{name}`"),
                )
                .at(file, node.name().span())
                .label("expected `appliance`")
                .help(help),
            );
            continue;
        }
        let first_new = validator.diagnostics.len();
        let view = validator.check_node(node, &APPLIANCE);
        if let Some((name, _)) = view.str_arg(0) {
            for diagnostic in &mut validator.diagnostics[first_new..] {
                diagnostic.appliance = Some(name.clone());
            }
        }
        if let Some(appliance) = build_appliance(&view, file, validator.diagnostics) {
            appliances.push(appliance);
        }
    }
    if appliances.is_empty() && document.nodes().is_empty() {
        diagnostics.push(
            Diagnostic::warning(
                "appliance::empty-manifest",
                "manifest declares no appliances",
            )
            .in_file(file),
        );
    }
    (appliances, diagnostics)
}

/// The offset of the first `{` nested deeper than `max`, skipping strings and comments.
///
/// The KDL parser recurses once per level; this pre-scan keeps hostile nesting away from it.
/// It only needs to be right for text the parser would accept: on anything else it may stop
/// early, and the parser reports the syntax error.
fn nesting_too_deep(text: &str, max: usize) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut depth = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'{' => {
                depth += 1;
                if depth > max {
                    return Some(i);
                }
            }
            b'}' => depth = depth.saturating_sub(1),
            b'/' if bytes.get(i + 1) == Some(&b'/') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                let mut comment_depth = 1usize;
                i += 2;
                while i < bytes.len() && comment_depth > 0 {
                    if bytes[i..].starts_with(b"/*") {
                        comment_depth += 1;
                        i += 1;
                    } else if bytes[i..].starts_with(b"*/") {
                        comment_depth -= 1;
                        i += 1;
                    }
                    i += 1;
                }
                continue;
            }
            b'#' | b'"' => {
                // Raw strings: `#"…"#` with any number of hashes; plain strings: `"…"` with escapes.
                let hashes = bytes[i..].iter().take_while(|&&b| b == b'#').count();
                if bytes.get(i + hashes) != Some(&b'"') {
                    i += hashes.max(1);
                    continue;
                }
                let multiline = bytes[i + hashes..].starts_with(b"\"\"\"");
                let quote_len = if multiline { 3 } else { 1 };
                let mut closing = vec![b'"'; quote_len];
                closing.extend(std::iter::repeat_n(b'#', hashes));
                i += hashes + quote_len;
                while i < bytes.len() {
                    if hashes == 0 && bytes[i] == b'\\' {
                        i += 2;
                        continue;
                    }
                    if bytes[i..].starts_with(&closing) {
                        i += closing.len();
                        break;
                    }
                    i += 1;
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    None
}

fn spanned(pair: (String, Span)) -> Spanned<String> {
    Spanned::new(pair.0, pair.1)
}

/// The typed layer: cross-field rules inside one appliance.
fn build_appliance(
    view: &NodeView,
    file: &Arc<SourceFile>,
    diagnostics: &mut Vec<Diagnostic>,
) -> Option<Appliance> {
    let name = spanned(view.str_arg(0)?);
    let mut appliance = Appliance {
        name: name.clone(),
        span: view.span,
        description: None,
        base: None,
        packages: Vec::new(),
        remove: Vec::new(),
        kernel: None,
        binaries: Vec::new(),
        copies: Vec::new(),
        users: Vec::new(),
        groups: Vec::new(),
        services: Vec::new(),
        hostname: None,
        timezone: None,
        locale: None,
        kernel_cmdline: Vec::new(),
        runs: Vec::new(),
        forwards: Vec::new(),
        outputs: Vec::new(),
        suggest: SuggestSettings::default(),
        capture: CaptureSettings::default(),
        env: Vec::new(),
        mkdirs: Vec::new(),
        symlinks: Vec::new(),
    };
    let mut report = |diagnostic: Diagnostic| {
        diagnostics.push(diagnostic.for_appliance(&name.value));
    };
    let mut base_seen = false;
    for child in &view.children {
        match child.spec.name {
            "description" => appliance.description = child.str_arg(0).map(spanned),
            "base" => {
                base_seen = true;
                appliance.base = build_base(child, file, &mut report);
            }
            "packages" => {
                let recommends = child.bool_prop("recommends").unwrap_or(false);
                for package in child.str_args() {
                    appliance.packages.push(PackageRequest {
                        name: spanned(package),
                        recommends,
                    });
                }
            }
            "remove" => appliance.remove.extend(child.str_args().map(spanned)),
            "kernel" => appliance.kernel = child.str_arg(0).map(spanned),
            "binary" => {
                let Some(bin) = child.str_arg(0) else {
                    continue;
                };
                appliance.binaries.push(Binary {
                    span: child.span,
                    to: child
                        .str_prop("to")
                        .map(|(to, _)| {
                            if to.ends_with('/') {
                                format!("{to}{}", bin.0)
                            } else {
                                to
                            }
                        })
                        .unwrap_or_else(|| format!("/usr/local/bin/{}", bin.0)),
                    name: spanned(bin),
                    package: child.str_prop("package").map(spanned),
                    target: child.str_prop("target").map(|(t, _)| t),
                    profile: child
                        .str_prop("profile")
                        .map_or_else(|| "release".into(), |(p, _)| p),
                    mode: child.int_prop("mode").map_or(0o755, |m| m as u32),
                });
            }
            "copy" => {
                let (Some(source), Some(to)) = (child.str_arg(0), child.str_prop("to")) else {
                    continue;
                };
                let copy = Copy {
                    span: child.span,
                    source: spanned(source),
                    to: spanned(to),
                    mode: child.int_prop("mode").map(|m| m as u32),
                    owner: child.str_prop("owner").map(spanned),
                    group: child.str_prop("group").map(spanned),
                    allow_outside_workspace: child
                        .bool_prop("allow-outside-workspace")
                        .unwrap_or(false),
                };
                if copy.is_glob() && !copy.to.value.ends_with('/') {
                    report(
                        Diagnostic::error(
                            "appliance::glob-needs-directory",
                            "a glob copies any number of files, so its destination must be a directory",
                        )
                        .at(file, copy.to.span)
                        .label("not a directory")
                        .help(format!("end the destination with `/`: to=\"{}/\"", copy.to.value)),
                    );
                }
                appliance.copies.push(copy);
            }
            "user" => {
                let Some(user) = child.str_arg(0) else {
                    continue;
                };
                appliance.users.push(User {
                    span: child.span,
                    name: spanned(user),
                    system: child.bool_prop("system").unwrap_or(false),
                    uid: child.int_prop("uid").map(|id| id as u32),
                    group: child.str_prop("group").map(|(g, _)| g),
                    groups: child
                        .str_prop("groups")
                        .map(|(list, _)| list.split(',').map(|g| g.trim().to_owned()).collect())
                        .unwrap_or_default(),
                    home: child.str_prop("home").map(|(h, _)| h),
                    shell: child.str_prop("shell").map(|(s, _)| s),
                    comment: child.str_prop("comment").map(|(c, _)| c),
                    password_hash: child.str_prop("password-hash").map(|(h, _)| h),
                    ssh_keys: child
                        .children
                        .iter()
                        .filter(|c| c.spec.name == "ssh-key")
                        .filter_map(|c| c.str_arg(0))
                        .map(spanned)
                        .collect(),
                    authorized_keys: child.str_prop("authorized-keys").map(spanned),
                });
            }
            "group" => {
                let Some(group) = child.str_arg(0) else {
                    continue;
                };
                appliance.groups.push(Group {
                    span: child.span,
                    name: spanned(group),
                    system: child.bool_prop("system").unwrap_or(false),
                    gid: child.int_prop("gid").map(|id| id as u32),
                });
            }
            "service" => {
                let Some(unit) = child.str_arg(0) else {
                    continue;
                };
                appliance.services.push(Service {
                    span: child.span,
                    unit: spanned(unit),
                    enable: child.bool_prop("enable").unwrap_or(true),
                });
            }
            "hostname" => appliance.hostname = child.str_arg(0).map(spanned),
            "timezone" => appliance.timezone = child.str_arg(0).map(spanned),
            "locale" => appliance.locale = child.str_arg(0).map(spanned),
            "kernel-cmdline" => appliance
                .kernel_cmdline
                .extend(child.str_args().map(spanned)),
            "run" => {
                if let Some(run) = build_run(child, file, &mut report) {
                    appliance.runs.push(run);
                }
            }
            "forward" => {
                let (Some(host), Some(guest)) = (child.int_prop("host"), child.int_prop("guest"))
                else {
                    continue;
                };
                appliance.forwards.push(Forward {
                    span: child.span,
                    host: host as u16,
                    guest: guest as u16,
                    protocol: protocol(child.str_prop("protocol")),
                });
            }
            "output" => {
                if let Some(output) = build_output(child, file, &mut report) {
                    appliance.outputs.push(output);
                }
            }
            "suggest" => {
                appliance.suggest = SuggestSettings {
                    span: Some(child.span),
                    limit: child.int_prop("limit").map(|n| n as u32),
                    min_support: child.float_prop("min-support"),
                    min_confidence: child.float_prop("min-confidence"),
                    ignore: child
                        .children
                        .iter()
                        .flat_map(|ignore| ignore.str_args().map(spanned))
                        .collect(),
                };
            }
            "capture" => {
                appliance.capture = CaptureSettings {
                    span: Some(child.span),
                    ignore: child
                        .children
                        .iter()
                        .flat_map(|ignore| ignore.str_args().map(spanned))
                        .collect(),
                };
            }
            "env" => {
                if let Some(env) = build_env(child, file, &mut report) {
                    appliance.env.push(env);
                }
            }
            "mkdir" => {
                let Some((path, _)) = child.str_arg(0) else {
                    continue;
                };
                appliance.mkdirs.push(MakeDir {
                    span: child.span,
                    path,
                    mode: child.int_prop("mode").map_or(0o755, |m| m as u32),
                    owner: child.str_prop("owner").map(spanned),
                    group: child.str_prop("group").map(spanned),
                });
            }
            "symlink" => {
                let (Some((path, _)), Some((target, _))) =
                    (child.str_arg(0), child.str_prop("target"))
                else {
                    continue;
                };
                appliance.symlinks.push(Symlink {
                    span: child.span,
                    path,
                    target,
                });
            }
            other => {
                // The schema and this match must list the same nodes; a test walks the schema.
                report(Diagnostic::error(
                    "appliance::internal",
                    format!("node `{other}` is in the schema but not handled; please report this"),
                ));
            }
        }
    }
    if !base_seen {
        report(
            Diagnostic::error(
                "appliance::missing-base",
                format!("appliance `{}` has no `base`", name.value),
            )
            .at(file, name.span)
            .label("every appliance starts from a base")
            .help("add `base \"debian/bookworm\"`, or `base appliance=\"other\"` to build on another appliance"),
        );
    }
    check_repeats(&appliance, file, &mut report);
    Some(appliance)
}

fn protocol(value: Option<(String, Span)>) -> Protocol {
    match value {
        Some((p, _)) if p == "udp" => Protocol::Udp,
        _ => Protocol::Tcp,
    }
}

fn build_base(
    view: &NodeView,
    file: &Arc<SourceFile>,
    report: &mut impl FnMut(Diagnostic),
) -> Option<Spanned<BaseRef>> {
    let image = view.str_arg(0);
    let appliance = view.str_prop("appliance");
    let written_appliance = view.wrote("appliance");
    if view.arg_count > 0 && written_appliance {
        report(
            Diagnostic::error(
                "appliance::conflicting-base",
                "`base` names both a stored image and an appliance",
            )
            .at(file, view.span)
            .label("pick one")
            .help("write `base \"debian/bookworm\"` or `base appliance=\"other\"`"),
        );
        return None;
    }
    if view.arg_count == 0 && !written_appliance {
        report(
            Diagnostic::error(
                "appliance::missing-argument",
                "`base` needs an image name or `appliance=`",
            )
            .at(file, view.name_span)
            .label("no base given")
            .help("write `base \"debian/bookworm\"` or `base appliance=\"other\"`"),
        );
        return None;
    }
    if written_appliance && view.wrote("registry") {
        report(
            Diagnostic::error(
                "appliance::registry-on-appliance-base",
                "`registry=` applies to stored images, not to appliances of the workspace",
            )
            .at(file, view.prop_span("registry").unwrap_or(view.span))
            .label("remove this")
            .help("an appliance base is built from the workspace's manifests"),
        );
    }
    if written_appliance && view.wrote("version") {
        report(
            Diagnostic::error(
                "appliance::version-on-appliance-base",
                "`version=` applies to stored images, not to appliances of the workspace",
            )
            .at(file, view.prop_span("version").unwrap_or(view.span))
            .label("remove this")
            .help("an appliance base is always the version built from the current manifests"),
        );
    }
    if let Some((name, span)) = appliance {
        return Some(Spanned::new(
            BaseRef::Appliance {
                name: Spanned::new(name, span),
            },
            view.span,
        ));
    }
    let (name, _) = image?;
    if view.wrote("version") && !view.props.contains_key("version") {
        return None;
    }
    let version = view
        .str_prop("version")
        .and_then(|(req, _)| VersionReq::parse(&req).ok());
    if view.wrote("registry") && !view.props.contains_key("registry") {
        return None;
    }
    let registry = view
        .str_prop("registry")
        .map(|(prefix, span)| Spanned::new(prefix, span));
    Some(Spanned::new(
        BaseRef::Image {
            name,
            version,
            registry,
        },
        view.span,
    ))
}

fn build_run(
    view: &NodeView,
    file: &Arc<SourceFile>,
    report: &mut impl FnMut(Diagnostic),
) -> Option<RunScript> {
    let inline = view.str_arg(0);
    let script = view.str_prop("script");
    match (view.arg_count > 0, view.wrote("script")) {
        (true, true) => {
            report(
                Diagnostic::error(
                    "appliance::conflicting-run",
                    "`run` has both an inline script and `script=`",
                )
                .at(file, view.span)
                .label("pick one")
                .help("write `run \"commands\"` or `run script=\"path/to/script.sh\"`"),
            );
            None
        }
        (false, false) => {
            report(
                Diagnostic::error("appliance::missing-argument", "`run` needs a script")
                    .at(file, view.name_span)
                    .label("nothing to run")
                    .help("write `run \"commands\"` or `run script=\"path/to/script.sh\"`"),
            );
            None
        }
        _ => {
            let source = match (inline, script) {
                (Some((script, _)), _) => RunSource::Inline { script },
                (_, Some(path)) => RunSource::File {
                    path: spanned(path),
                },
                _ => return None,
            };
            Some(RunScript {
                span: view.span,
                source,
                timeout: view
                    .int_prop("timeout")
                    .map_or(DEFAULT_RUN_TIMEOUT, std::time::Duration::from_secs),
            })
        }
    }
}

fn build_env(
    view: &NodeView,
    file: &Arc<SourceFile>,
    report: &mut impl FnMut(Diagnostic),
) -> Option<EnvVar> {
    let (name, name_span) = view.str_arg(0)?;
    let (value, _) = view.str_arg(1)?;
    if let Err(problem) = (grammar::ENV_NAME.check)(&name) {
        report(
            Diagnostic::error(
                "appliance::invalid-value",
                format!(
                    "invalid environment variable name: {} {problem}",
                    quote(&name)
                ),
            )
            .at(file, name_span)
            .label("not a variable name")
            .help(format!("expected {}", grammar::ENV_NAME.description)),
        );
        return None;
    }
    Some(EnvVar {
        span: view.span,
        name,
        value,
    })
}

fn build_output(
    view: &NodeView,
    file: &Arc<SourceFile>,
    report: &mut impl FnMut(Diagnostic),
) -> Option<Output> {
    let format = spanned(view.str_arg(0)?);
    let spec = schema::output_format(&format.value)?;
    for prop in &view.written_props {
        if !spec.props.contains(prop) {
            let takers: Vec<&str> = schema::OUTPUT_FORMATS
                .iter()
                .filter(|f| f.props.contains(prop))
                .map(|f| f.name)
                .collect();
            report(
                Diagnostic::error(
                    "appliance::option-not-for-format",
                    format!("`{prop}` is not an option of output \"{}\"", spec.name),
                )
                .at(file, view.prop_span(prop).unwrap_or(view.span))
                .label(format!("not used by \"{}\"", spec.name))
                .help(format!(
                    "\"{}\" takes: {}; `{prop}` applies to {}",
                    spec.name,
                    spec.props.join(", "),
                    takers
                        .iter()
                        .map(|t| format!("\"{t}\""))
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            );
        }
    }
    let mut output = Output {
        span: view.span,
        format,
        name: view.str_prop("name").map(|(n, _)| n),
        size: view.int_prop("size"),
        tag: view.str_prop("tag").map(|(t, _)| t),
        user: view.str_prop("user").map(|(u, _)| u),
        workdir: view.str_prop("workdir").map(|(w, _)| w),
        entrypoint: Vec::new(),
        cmd: Vec::new(),
        env: Vec::new(),
        expose: Vec::new(),
    };
    for child in &view.children {
        if spec.name != "oci" {
            report(
                Diagnostic::error(
                    "appliance::option-not-for-format",
                    format!(
                        "`{}` applies to output \"oci\" only, not \"{}\"",
                        child.spec.name, spec.name
                    ),
                )
                .at(file, child.name_span)
                .label("not used by this format"),
            );
            continue;
        }
        match child.spec.name {
            "entrypoint" => output.entrypoint = child.str_args().map(|(a, _)| a).collect(),
            "cmd" => output.cmd = child.str_args().map(|(a, _)| a).collect(),
            "env" => {
                if let Some(env) = build_env(child, file, report) {
                    output.env.push((env.name, env.value));
                }
            }
            "expose" => {
                if let Some(port) = child.int_arg(0) {
                    output
                        .expose
                        .push((port as u16, protocol(child.str_prop("protocol"))));
                }
            }
            _ => {}
        }
    }
    Some(output)
}

/// Rules about things given more than once inside one appliance.
fn check_repeats(
    appliance: &Appliance,
    file: &Arc<SourceFile>,
    report: &mut impl FnMut(Diagnostic),
) {
    let mut installed: BTreeMap<&str, Span> = BTreeMap::new();
    for package in &appliance.packages {
        if let Some(first) = installed.get(package.name.value.as_str()) {
            report(
                Diagnostic::warning(
                    "appliance::duplicate-package",
                    format!("package `{}` is listed twice", package.name.value),
                )
                .at(file, package.name.span)
                .label("listed again here")
                .related(*first, "first listed here")
                .help("remove the second mention"),
            );
        } else {
            installed.insert(&package.name.value, package.name.span);
        }
    }
    let mut removed = BTreeSet::new();
    for package in &appliance.remove {
        if let Some(install) = installed.get(package.value.as_str()) {
            report(
                Diagnostic::warning(
                    "appliance::remove-installed",
                    format!("package `{}` is both installed and removed", package.value),
                )
                .at(file, package.span)
                .label("removed here")
                .related(*install, "installed here")
                .help("packages are installed, then removed: the package will not be in the image"),
            );
        }
        if !removed.insert(package.value.as_str()) {
            report(
                Diagnostic::warning(
                    "appliance::duplicate-package",
                    format!("package `{}` is removed twice", package.value),
                )
                .at(file, package.span)
                .label("removed again here"),
            );
        }
    }
    unique_by(
        appliance.users.iter().map(|u| &u.name),
        "appliance::duplicate-user",
        "user",
        file,
        report,
    );
    unique_by(
        appliance.groups.iter().map(|g| &g.name),
        "appliance::duplicate-group",
        "group",
        file,
        report,
    );
    let mut services: BTreeMap<&str, &Service> = BTreeMap::new();
    for service in &appliance.services {
        match services.get(service.unit.value.as_str()) {
            Some(first) if first.enable != service.enable => report(
                Diagnostic::error(
                    "appliance::conflicting-service",
                    format!(
                        "service `{}` is both enabled and disabled",
                        service.unit.value
                    ),
                )
                .at(file, service.unit.span)
                .related(first.unit.span, "first given here")
                .label("contradicts the first"),
            ),
            Some(first) => report(
                Diagnostic::warning(
                    "appliance::duplicate-service",
                    format!("service `{}` is given twice", service.unit.value),
                )
                .at(file, service.unit.span)
                .related(first.unit.span, "first given here")
                .label("given again here"),
            ),
            None => {
                services.insert(&service.unit.value, service);
            }
        }
    }
    let mut host_ports: BTreeMap<(u16, Protocol), Span> = BTreeMap::new();
    for forward in &appliance.forwards {
        if let Some(first) = host_ports.insert((forward.host, forward.protocol), forward.span) {
            report(
                Diagnostic::error(
                    "appliance::duplicate-forward",
                    format!("host port {} is forwarded twice", forward.host),
                )
                .at(file, forward.span)
                .related(first, "first forwarded here")
                .label("forwarded again here"),
            );
        }
    }
    let mut outputs: BTreeMap<(&str, &str), Span> = BTreeMap::new();
    for output in &appliance.outputs {
        let stem = output.name.as_deref().unwrap_or(&appliance.name.value);
        if let Some(first) = outputs.insert((&output.format.value, stem), output.span) {
            report(
                Diagnostic::error(
                    "appliance::duplicate-output",
                    format!(
                        "two `{}` outputs would both write `{stem}`",
                        output.format.value
                    ),
                )
                .at(file, output.format.span)
                .related(first, "first output here")
                .label("writes the same file")
                .help("give one of them a different `name=`"),
            );
        }
    }
}

fn unique_by<'a>(
    names: impl Iterator<Item = &'a Spanned<String>>,
    code: &'static str,
    what: &str,
    file: &Arc<SourceFile>,
    report: &mut impl FnMut(Diagnostic),
) {
    let mut seen: BTreeMap<&str, Span> = BTreeMap::new();
    for name in names {
        if let Some(first) = seen.insert(&name.value, name.span) {
            report(
                Diagnostic::error(code, format!("{what} `{}` is declared twice", name.value))
                    .at(file, name.span)
                    .related(first, "first declared here")
                    .label("declared again here"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn parse(text: &str) -> (Vec<Appliance>, Vec<Diagnostic>) {
        let file = SourceFile::new(Path::new("t.kdl"), "t.kdl".into(), text.into());
        parse_manifest(&file)
    }

    #[test]
    fn the_design_example_parses_cleanly() {
        let (appliances, diagnostics) = parse(include_str!("../../../fixtures/demo/appliance.kdl"));
        let errors: Vec<_> = diagnostics
            .iter()
            .filter(|d| d.is_error())
            .map(|d| &d.message)
            .collect();
        assert!(errors.is_empty(), "{errors:?}");
        let web = appliances
            .iter()
            .find(|a| a.name.value == "web")
            .expect("web is declared");
        assert_eq!(web.packages.len(), 2);
        assert_eq!(web.copies[1].mode, Some(0o640));
        assert_eq!(
            web.outputs
                .iter()
                .find(|o| o.format.value == "qcow2")
                .and_then(|o| o.size),
            Some(2 << 30)
        );
        assert!(web.users[0].system);
        assert_eq!(web.binaries[0].to, "/usr/local/bin/api");
    }

    #[test]
    fn nesting_scan_skips_strings_and_comments() {
        let deep = "{".repeat(40);
        assert_eq!(nesting_too_deep(&deep, 16), Some(16));
        assert_eq!(nesting_too_deep(&format!("a \"{deep}\""), 16), None);
        assert_eq!(nesting_too_deep(&format!("a #\"{deep}\"#"), 16), None);
        assert_eq!(nesting_too_deep(&format!("// {deep}\na"), 16), None);
        assert_eq!(nesting_too_deep(&format!("/* /* */ {deep} */"), 16), None);
        assert_eq!(nesting_too_deep("a { b { c { } } }", 2), Some(10));
    }

    #[test]
    fn every_schema_node_is_handled() {
        for child in APPLIANCE.children {
            let text = format!(
                "appliance \"x\" {{ base \"debian/bookworm\"; {} }}",
                child.example
            );
            let (_, diagnostics) = parse(&text);
            assert!(
                !diagnostics.iter().any(|d| d.code == "appliance::internal"),
                "{} is not handled",
                child.name
            );
            let errors: Vec<_> = diagnostics
                .iter()
                .filter(|d| d.is_error())
                .map(|d| d.message.clone())
                .collect();
            // `base` twice is expected for the base example itself.
            if child.name != "base" {
                assert!(
                    errors.is_empty(),
                    "{}: example {:?} gives {errors:?}",
                    child.name,
                    child.example
                );
            }
        }
    }
}
