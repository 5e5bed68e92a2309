//! The workspace commands: `check`, `suggest`, `build` (with `--plan` and `--push`) and
//! `update`.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context as _;

use super::printer::{self, emit, report_error};
use super::store_commands;
use super::*;
use crate::check::{CheckOptions, CheckSummary, check};
use crate::diagnostics::{Diagnostic, Summary};
use crate::suggest::SuggestOptions;

/// Suggestions for the checked appliances, when a store with history exists. Never an
/// error: a suggestion that cannot be computed is logged and skipped.
pub(super) fn suggestions_for(
    global: &GlobalArgs,
    report: &crate::check::CheckReport,
    options: &SuggestOptions,
) -> Vec<Diagnostic> {
    let dir = match &global.store {
        Some(dir) => dir.clone(),
        None => match crate::store::default_store_dir() {
            Ok(dir) => dir,
            Err(_) => return Vec::new(),
        },
    };
    if !dir.join("catalog.duckdb").exists() {
        return Vec::new();
    }
    let cache = report
        .workspace
        .target_dir
        .join("appliance/.suggestions.json");
    match crate::store::Store::open(&dir)
        .and_then(|store| crate::suggest::suggest_cached(&store, report, options, &cache))
    {
        Ok(diagnostics) => diagnostics,
        Err(error) => {
            if global.verbose > 0 {
                let _ = writeln!(std::io::stderr().lock(), "note: no suggestions: {error:#}");
            }
            Vec::new()
        }
    }
}

/// Run the checks; when there is no workspace, say so as a diagnostic (for `check` and
/// `suggest` alike) and return `None`.
pub(super) fn check_or_report(
    global: &GlobalArgs,
    options: &CheckOptions,
) -> Option<crate::check::CheckReport> {
    match check(options) {
        Ok(report) => Some(report),
        Err(error) => {
            let mut diagnostic = Diagnostic::error("appliance::no-workspace", error.to_string());
            if let Some(source) = std::error::Error::source(&error) {
                diagnostic = diagnostic.help(source.to_string().trim().to_owned());
            }
            emit(global, std::slice::from_ref(&diagnostic));
            None
        }
    }
}

pub(super) fn run_suggest(global: &GlobalArgs, args: &SuggestArgs) -> ExitCode {
    let options = CheckOptions {
        manifest_path: global.manifest_path.clone(),
        appliances: args.appliances.clone(),
    };
    let Some(report) = check_or_report(global, &options) else {
        return ExitCode::FAILURE;
    };
    let errors: Vec<Diagnostic> = report
        .diagnostics
        .iter()
        .filter(|d| d.is_error())
        .cloned()
        .collect();
    if !errors.is_empty() {
        emit(global, &errors);
        return ExitCode::FAILURE;
    }
    let suggest_options = SuggestOptions {
        limit: args.limit,
        min_support: args.min_support,
        min_confidence: args.min_confidence,
        min_images: args.min_images,
    };
    let store = match store_commands::open_store(global) {
        Ok(store) => store,
        Err(error) => {
            report_error(global, &error);
            return ExitCode::FAILURE;
        }
    };
    if let Some(key) = &args.explain {
        return match explain_suggestion(global, &store, &report, &suggest_options, key) {
            Ok(code) => code,
            Err(error) if printer::is_closed_pipe(&error) => ExitCode::SUCCESS,
            Err(error) => {
                report_error(global, &error);
                ExitCode::FAILURE
            }
        };
    }
    match crate::suggest::suggest(&store, &report, &suggest_options) {
        Ok(diagnostics) if !args.apply.is_empty() => {
            match apply_suggestions(global, &diagnostics, &args.apply) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    report_error(global, &error);
                    ExitCode::FAILURE
                }
            }
        }
        Ok(diagnostics) => {
            if diagnostics.is_empty()
                && global.message_format == MessageFormat::Human
                && !global.quiet
            {
                let _ = writeln!(
                    std::io::stderr().lock(),
                    "no suggestions (the history has nothing to go on; `cargo appliance history import FILE` adds some)"
                );
            }
            emit(global, &diagnostics);
            ExitCode::SUCCESS
        }
        Err(error) => {
            report_error(global, &error);
            ExitCode::FAILURE
        }
    }
}

/// `suggest --explain KEY`: the evidence of one suggestion and ten images that made it.
pub(super) fn explain_suggestion(
    global: &GlobalArgs,
    store: &crate::store::Store,
    report: &crate::check::CheckReport,
    options: &SuggestOptions,
    key: &str,
) -> anyhow::Result<ExitCode> {
    use printer::{outln, print_json};
    let explanations = crate::suggest::explain_key(store, report, options, key, 10)?;
    if explanations.is_empty() {
        anyhow::bail!(
            "`{key}` is not among the suggestions (`cargo appliance suggest` lists them)"
        );
    }
    for explanation in &explanations {
        if global.message_format == MessageFormat::Json {
            print_json(explanation)?;
            continue;
        }
        outln!(
            "{} for `{}`: {}",
            explanation.key,
            explanation.appliance,
            explanation.evidence
        )?;
        for (image, origin) in &explanation.examples {
            outln!("  {image}  ({origin})")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `suggest --apply KEY…`: make the suggestions' edits in their manifests. Each edited text
/// must still parse without errors before it replaces the file (by rename, so a reader sees
/// the old manifest or the new one).
pub(super) fn apply_suggestions(
    global: &GlobalArgs,
    diagnostics: &[Diagnostic],
    keys: &[String],
) -> anyhow::Result<()> {
    let by_file = crate::suggest::apply::select(diagnostics, keys)?;
    for (path, edits) in &by_file {
        let text = fs_err::read_to_string(path)?;
        let edited = crate::suggest::apply::apply_edits(&text, edits)
            .with_context(|| format!("editing {}", path.display()))?;
        let display = edits
            .first()
            .map_or_else(|| path.display().to_string(), |e| e.file.clone());
        let source = crate::diagnostics::SourceFile::new(path, display.clone(), edited.clone());
        let (_, problems) = crate::manifest::parse::parse_manifest(&source);
        if problems.iter().any(Diagnostic::is_error) {
            emit(global, &problems);
            anyhow::bail!("the edited {display} would not parse; it was left as it was");
        }
        crate::suggest::apply::replace_file(path, edited.as_bytes(), 0o644)?;
        if !global.quiet && global.message_format == MessageFormat::Human {
            let _ = writeln!(
                std::io::stderr().lock(),
                "{:>12} {} to {display}",
                "Applied",
                plural(edits.len(), "suggestion")
            );
        }
    }
    Ok(())
}

pub(super) fn run_check(global: &GlobalArgs, args: &CheckArgs) -> ExitCode {
    let options = CheckOptions {
        manifest_path: global.manifest_path.clone(),
        appliances: args.appliances.clone(),
    };
    let Some(report) = check_or_report(global, &options) else {
        return ExitCode::FAILURE;
    };
    let mut diagnostics = report.diagnostics.clone();
    if !report.has_errors() {
        let options = SuggestOptions {
            limit: 3,
            ..SuggestOptions::default()
        };
        diagnostics.extend(suggestions_for(global, &report, &options));
    }
    emit(global, &diagnostics);
    let summary = Summary::of(&report.diagnostics);
    match global.message_format {
        MessageFormat::Json => {
            let finished = CheckSummary {
                reason: "check-finished",
                success: summary.errors == 0,
                errors: summary.errors,
                warnings: summary.warnings,
                appliances: &report.checked,
            };
            if let Ok(line) = serde_json::to_string(&finished) {
                let _ = writeln!(std::io::stdout().lock(), "{line}");
            }
        }
        MessageFormat::Human if !global.quiet => {
            let _ = writeln!(
                std::io::stderr().lock(),
                "{}",
                summary_line(&summary, report.checked.len())
            );
        }
        MessageFormat::Human => {}
    }
    if summary.errors > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

pub(super) fn run_build(global: &GlobalArgs, args: &BuildArgs) -> ExitCode {
    let options = CheckOptions {
        manifest_path: global.manifest_path.clone(),
        appliances: args.appliances.clone(),
    };
    let Some(report) = check_or_report(global, &options) else {
        return ExitCode::FAILURE;
    };
    emit(global, &report.diagnostics);
    if report.has_errors() {
        return ExitCode::FAILURE;
    }
    let store = match store_commands::open_store(global) {
        Ok(store) => store,
        Err(error) => {
            report_error(global, &error);
            return ExitCode::FAILURE;
        }
    };
    let reporter = if global.message_format == MessageFormat::Json {
        crate::build::progress::Reporter::silent()
    } else {
        crate::build::progress::Reporter::new(global.quiet, global.verbose > 0)
    };
    let started = std::time::Instant::now();
    // A push that cannot happen is said before the build, not after it.
    if let Some(template) = &args.push
        && let Err(error) = push_destination(template, "appliance", "1")
    {
        report_error(global, &error);
        return ExitCode::FAILURE;
    }
    let registry = match default_registry() {
        Ok(registry) => registry,
        Err(error) => {
            report_error(global, &error);
            return ExitCode::FAILURE;
        }
    };
    let build_options = crate::build::BuildOptions {
        locked: args.locked,
        offline: args.offline,
        registry,
        access: args.registry.access(),
    };
    if args.plan {
        return match crate::build::plan(&report, &store, &build_options, &reporter) {
            Ok(plan) => {
                let printed = match global.message_format {
                    MessageFormat::Json => printer::print_json(&serde_json::json!({
                        "reason": "build-plan",
                        "appliances": plan.appliances,
                    })),
                    MessageFormat::Human => {
                        printer::write_stdout(format_args!("{}", crate::build::plan::render(&plan)))
                            .map_err(anyhow::Error::from)
                    }
                };
                match printed {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(error) if printer::is_closed_pipe(&error) => ExitCode::SUCCESS,
                    Err(error) => {
                        report_error(global, &error);
                        ExitCode::FAILURE
                    }
                }
            }
            Err(crate::build::BuildError::Diagnostics(diagnostics)) => {
                emit(global, &diagnostics);
                ExitCode::FAILURE
            }
            Err(crate::build::BuildError::Other(error)) => {
                report_error(global, &error);
                ExitCode::FAILURE
            }
        };
    }
    match crate::build::build(&report, &store, &build_options, &reporter) {
        Ok(built) => {
            let suggestions = suggestions_for(
                global,
                &report,
                &SuggestOptions {
                    limit: 3,
                    ..SuggestOptions::default()
                },
            );
            emit(global, &suggestions);
            for done in &built {
                match global.message_format {
                    MessageFormat::Json => {
                        let message = serde_json::json!({
                            "reason": "appliance-built",
                            "appliance": done.appliance,
                            "image": done.image.reference(),
                            "tree_digest": done.image.tree_digest,
                            "fresh": done.fresh,
                            "outputs": done.outputs,
                            "seconds": done.elapsed.as_secs_f64(),
                            "output_seconds": done.outputs_elapsed.as_secs_f64(),
                        });
                        let _ = writeln!(std::io::stdout().lock(), "{message}");
                    }
                    MessageFormat::Human => reporter.status(
                        if done.fresh { "Fresh" } else { "Built" },
                        &format!(
                            "{} → {} [{}]{}",
                            done.appliance,
                            done.image.reference(),
                            crate::store::short(&done.image.tree_digest),
                            done.outputs
                                .iter()
                                .map(|p| format!(", {}", report.workspace.display_path(p)))
                                .collect::<String>()
                        ),
                    ),
                }
            }
            if let Some(template) = &args.push
                && let Err(error) = push_built(global, &store, &built, template, &args.registry)
            {
                report_error(
                    global,
                    &error.context("the build is stored; pushing it failed"),
                );
                return ExitCode::FAILURE;
            }
            if global.message_format == MessageFormat::Human {
                reporter.status(
                    "Finished",
                    &format!(
                        "{} in {:.2}s",
                        plural(built.len(), "appliance"),
                        started.elapsed().as_secs_f64()
                    ),
                );
            }
            ExitCode::SUCCESS
        }
        Err(crate::build::BuildError::Diagnostics(_))
            if crate::process::interrupt::received().is_some() =>
        {
            ExitCode::FAILURE
        }
        Err(crate::build::BuildError::Diagnostics(diagnostics)) => {
            emit(global, &diagnostics);
            if global.message_format == MessageFormat::Human && !global.quiet {
                let _ = writeln!(
                    std::io::stderr().lock(),
                    "error: build failed; the store and the previous outputs are unchanged"
                );
            }
            ExitCode::FAILURE
        }
        Err(crate::build::BuildError::Other(error)) => {
            report_error(global, &error);
            ExitCode::FAILURE
        }
    }
}

/// The reference `build --push TEMPLATE` makes of an image.
pub(super) fn push_destination(
    template: &str,
    name: &str,
    version: &str,
) -> anyhow::Result<crate::registry::Reference> {
    let text = if template.contains("{appliance}") || template.contains("{version}") {
        template
            .replace("{appliance}", name)
            .replace("{version}", version)
    } else {
        format!("{}/{name}:{version}", template.trim_end_matches('/'))
    };
    crate::registry::Reference::parse(&text).map_err(|e| anyhow::anyhow!("--push {template}: {e}"))
}

/// `build --push`: each built image to the reference the template makes of it.
pub(super) fn push_built(
    global: &GlobalArgs,
    store: &crate::store::Store,
    built: &[crate::build::Built],
    template: &str,
    registry: &RegistryArgs,
) -> anyhow::Result<()> {
    use std::io::IsTerminal as _;
    let progress = !global.quiet
        && global.message_format == MessageFormat::Human
        && std::io::stdout().is_terminal();
    for done in built {
        let destination = push_destination(template, &done.image.name, &done.image.version)?;
        let pushed = crate::registry::push(
            store,
            &done.image.reference(),
            &destination,
            true,
            &registry.access(),
            progress,
        )?;
        for one in &pushed {
            match global.message_format {
                MessageFormat::Json => {
                    let _ = writeln!(
                        std::io::stdout().lock(),
                        "{}",
                        serde_json::json!({
                            "reason": "image-pushed",
                            "image": one.image,
                            "reference": one.reference,
                            "digest": one.digest,
                        })
                    );
                }
                MessageFormat::Human if !global.quiet => {
                    let _ = writeln!(
                        std::io::stderr().lock(),
                        "{:>12} {} → {} ({})",
                        "Pushed",
                        one.image,
                        one.reference,
                        one.digest
                    );
                }
                MessageFormat::Human => {}
            }
        }
    }
    Ok(())
}

/// `APPLIANCE_REGISTRY`: the registry of bases without `registry=`, checked as the
/// manifest's property is.
pub(super) fn default_registry() -> anyhow::Result<Option<String>> {
    match std::env::var("APPLIANCE_REGISTRY") {
        Ok(value) if !value.is_empty() => {
            (crate::manifest::grammar::REGISTRY_PREFIX.check)(&value)
                .map_err(|e| anyhow::anyhow!("APPLIANCE_REGISTRY `{value}` {e}"))?;
            Ok(Some(value))
        }
        _ => Ok(None),
    }
}

pub(super) fn run_update(global: &GlobalArgs, args: &CheckArgs) -> ExitCode {
    let options = CheckOptions {
        manifest_path: global.manifest_path.clone(),
        appliances: args.appliances.clone(),
    };
    let Some(report) = check_or_report(global, &options) else {
        return ExitCode::FAILURE;
    };
    if report.has_errors() {
        emit(global, &report.diagnostics);
        return ExitCode::FAILURE;
    }
    let reporter = crate::build::progress::Reporter::new(global.quiet, global.verbose > 0);
    match store_commands::open_store(global)
        .and_then(|store| crate::build::update(&report, &store, &reporter))
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            report_error(global, &error);
            ExitCode::FAILURE
        }
    }
}

pub(super) fn summary_line(summary: &Summary, appliances: usize) -> String {
    let warnings = if summary.warnings > 0 {
        format!("; {} emitted", plural(summary.warnings, "warning"))
    } else {
        String::new()
    };
    if summary.errors > 0 {
        format!(
            "error: check failed with {}{warnings}",
            plural(summary.errors, "error")
        )
    } else {
        format!(
            "    Finished checking {}{warnings}",
            plural(appliances, "appliance")
        )
    }
}
