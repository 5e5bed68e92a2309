//! Store commands: run the library call, print the result for humans or as JSON.

use std::process::ExitCode;

use anyhow::Context as _;

use crate::cli::printer::{outln, print_json, status_line};
use crate::cli::{
    BaseCommand, FsckArgs, GlobalArgs, HistoryArgs, HistoryCommand, ImageCommand, ImagesArgs,
    MessageFormat, PullArgs, PushArgs, plural,
};
use crate::history;
use crate::packages::debian::{BaseRequest, create_base};
use crate::store::{ImageRecord, Store, default_store_dir, lineage};

pub(crate) fn open_store(global: &GlobalArgs) -> anyhow::Result<Store> {
    let dir = match &global.store {
        Some(dir) => dir.clone(),
        None => default_store_dir()?,
    };
    let store = Store::open(&dir)?;
    // A new store starts with the seed history, so its first suggestions have evidence.
    // Seeding happens once per store (the catalog records it), so a marker beside the
    // catalog spares every later command a catalog open only to learn that (a re-push
    // takes less time in all than two opens).
    let seeded_marker = store.root().join(SEEDED_MARKER);
    if history::seed::disabled() || seeded_marker.exists() {
        return Ok(store);
    }
    let needed = history::seed::needed(store.read_catalog()?.connection())?;
    if needed {
        let mut catalog = store.write_catalog()?;
        let count =
            history::seed::ensure(catalog.connection_mut()).context("seeding the history")?;
        if count > 0 {
            status(
                global,
                "Seeded",
                &format!(
                    "the history with {count} derivations of public images (`history rm --origin seed` removes them)"
                ),
            );
        }
    }
    // Only a shortcut: without it the next command reads the catalog again.
    let _ = fs_err::write(
        &seeded_marker,
        "the history was seeded (see the catalog's meta)\n",
    );
    Ok(store)
}

/// The file whose presence says the store's history was seeded.
const SEEDED_MARKER: &str = "seeded";

fn status(global: &GlobalArgs, verb: &str, what: &str) {
    if !global.quiet && global.message_format == MessageFormat::Human {
        status_line(format_args!("{verb:>12} {what}"));
    }
}

fn human_bytes(bytes: i64) -> String {
    crate::manifest::validate::human_size(bytes.max(0) as u64)
}

fn image_line(image: &ImageRecord) -> String {
    format!(
        "{:<32} {:<14} {:>8} entries {:>8}{}",
        image.reference(),
        &image.tree_digest[..12.min(image.tree_digest.len())],
        image.entry_count,
        human_bytes(image.content_bytes),
        if image.needs_repair {
            "  NEEDS REPAIR"
        } else {
            ""
        }
    )
}

/// The store's commands, as `cli::run_command` hands them over: exactly the commands this
/// group serves, so both matches are exhaustive.
#[derive(Debug)]
pub(crate) enum StoreCommand<'a> {
    Images(&'a ImagesArgs),
    Image(&'a ImageCommand),
    Base(&'a BaseCommand),
    Gc,
    Fsck(&'a FsckArgs),
    History(&'a HistoryArgs),
    Push(&'a PushArgs),
    Pull(&'a PullArgs),
    Diff { from: &'a str, to: &'a str },
}

pub(crate) fn run_store_command(
    global: &GlobalArgs,
    command: StoreCommand<'_>,
) -> anyhow::Result<ExitCode> {
    let store = open_store(global)?;
    let json = global.message_format == MessageFormat::Json;
    match command {
        StoreCommand::Images(args) => {
            let images = store.list()?;
            if json {
                for image in &images {
                    print_json(image)?;
                }
            } else if args.tree {
                let children = lineage(&images);
                let mut out = String::new();
                fn walk(
                    out: &mut String,
                    children: &std::collections::BTreeMap<Option<i64>, Vec<&ImageRecord>>,
                    parent: Option<i64>,
                    prefix: &str,
                ) {
                    let Some(list) = children.get(&parent) else {
                        return;
                    };
                    for (i, image) in list.iter().enumerate() {
                        let last = i + 1 == list.len();
                        let branch = if parent.is_none() {
                            ""
                        } else if last {
                            "└── "
                        } else {
                            "├── "
                        };
                        out.push_str(&format!("{prefix}{branch}{}\n", image_line(image)));
                        let deeper = if parent.is_none() {
                            String::new()
                        } else {
                            format!("{prefix}{}", if last { "    " } else { "│   " })
                        };
                        walk(out, children, Some(image.id), &deeper);
                    }
                }
                walk(&mut out, &children, None, "");
                outln!("{}", out.trim_end_matches('\n'))?;
            } else {
                for image in &images {
                    outln!("{}", image_line(image))?;
                }
            }
        }
        StoreCommand::Push(args) => push(global, &store, args)?,
        StoreCommand::Pull(args) => pull(global, &store, args)?,
        StoreCommand::Image(ImageCommand::Import {
            reference,
            path,
            parent,
        }) => {
            status(
                global,
                "Importing",
                &format!("{reference} from {}", path.display()),
            );
            let provenance =
                serde_json::json!({"source": "import", "path": path.display().to_string()});
            let image = store.import(reference, path, parent.as_deref(), provenance)?;
            if json {
                print_json(&image)?;
            } else {
                status(
                    global,
                    "Imported",
                    &format!(
                        "{} ({} entries, {})",
                        image.reference(),
                        image.entry_count,
                        human_bytes(image.content_bytes)
                    ),
                );
            }
        }
        StoreCommand::Image(ImageCommand::Export { image, output })
            if matches!(
                output.extension().and_then(|e| e.to_str()),
                Some(extension) if crate::output::is_disk(extension)
            ) =>
        {
            export_disk(global, &store, image, output)?;
        }
        StoreCommand::Image(ImageCommand::Export { image, output }) => {
            let report = store.export(image, output)?;
            if json {
                print_json(&report)?;
            } else {
                status(
                    global,
                    "Exported",
                    &format!(
                        "{image} to {} ({} entries)",
                        output.display(),
                        report.entries
                    ),
                );
                if report.skipped_devices > 0 {
                    status(
                        global,
                        "Skipped",
                        &format!(
                            "{} (device nodes need root)",
                            plural(report.skipped_devices, "entry")
                        ),
                    );
                }
            }
        }
        StoreCommand::Image(ImageCommand::Show { image }) => {
            let details = store.show(image)?;
            if json {
                print_json(&details)?;
            } else {
                let record = &details.record;
                outln!("image:       {}", record.reference())?;
                outln!("tree digest: {}", record.tree_digest)?;
                outln!(
                    "parent:      {}",
                    details.parent_reference.as_deref().unwrap_or("(none)")
                )?;
                outln!(
                    "children:    {}",
                    if details.children.is_empty() {
                        "(none)".into()
                    } else {
                        details.children.join(", ")
                    }
                )?;
                outln!(
                    "entries:     {} ({} of content)",
                    record.entry_count,
                    human_bytes(record.content_bytes)
                )?;
                outln!("provenance:  {}", record.provenance)?;
                outln!("packages:    {}", details.packages.len())?;
                for package in &details.packages {
                    outln!(
                        "  {} {} {}",
                        package.name,
                        package.version,
                        package.architecture
                    )?;
                }
            }
        }
        StoreCommand::Image(ImageCommand::Rm { image, recursive }) => {
            let removed = store.remove(image, *recursive)?;
            if json {
                print_json(&serde_json::json!({"removed": removed}))?;
            } else {
                for reference in removed {
                    status(global, "Removed", &reference);
                }
            }
        }
        StoreCommand::Base(BaseCommand::Create {
            name,
            suite,
            variant,
            include,
            mirror,
        }) => {
            status(
                global,
                "Creating",
                &format!("{name} from Debian {suite} ({variant}) with mmdebstrap"),
            );
            let request = BaseRequest {
                name: name.clone(),
                suite: suite.clone(),
                variant: variant.clone(),
                include: include.clone(),
                mirror: mirror.clone(),
            };
            let image =
                create_base(&store, &request).with_context(|| format!("creating base {name}"))?;
            if json {
                print_json(&image)?;
            } else {
                status(
                    global,
                    "Created",
                    &format!("{} ({} entries)", image.reference(), image.entry_count),
                );
            }
        }
        StoreCommand::Gc => {
            let report = store.gc()?;
            if json {
                print_json(&report)?;
            } else {
                status(
                    global,
                    "Removed",
                    &format!(
                        "{} ({}), {}, {}, {}",
                        plural(report.removed_objects, "object"),
                        human_bytes(report.removed_bytes as i64),
                        plural(report.removed_staging, "interrupted import"),
                        plural(report.removed_cached_trees, "cached tree"),
                        plural(report.removed_stale_downloads, "stale download")
                    ),
                );
            }
        }
        StoreCommand::History(HistoryArgs {
            command: Some(HistoryCommand::Import { file }),
        }) => {
            let mut catalog = store.write_catalog()?;
            let derivations = history::read_file(catalog.connection(), file)?;
            let origin = format!("import:{}", file.display());
            let count = history::insert(catalog.connection_mut(), &derivations, &origin)?;
            if json {
                print_json(&serde_json::json!({"imported": count}))?;
            } else {
                status(
                    global,
                    "Imported",
                    &format!("{} from {}", plural(count, "derivation"), file.display()),
                );
            }
        }
        StoreCommand::History(HistoryArgs {
            command:
                Some(HistoryCommand::Push {
                    reference,
                    registry,
                }),
        }) => {
            let destination = registry_reference(reference)?;
            let (pushed, count) = crate::registry::history::push(
                &store,
                &destination,
                &registry.access(),
                transfer_progress(global),
            )?;
            if json {
                print_json(&serde_json::json!({
                    "pushed": count, "reference": pushed.reference, "digest": pushed.digest,
                }))?;
            } else {
                status(
                    global,
                    "Pushed",
                    &format!(
                        "{} to {} ({})",
                        plural(count, "derivation"),
                        pushed.reference,
                        pushed.digest
                    ),
                );
            }
        }
        StoreCommand::History(HistoryArgs {
            command:
                Some(HistoryCommand::Pull {
                    reference,
                    registry,
                }),
        }) => {
            let source = registry_reference(reference)?;
            let (origin, count) = crate::registry::history::pull(
                &store,
                &source,
                &registry.access(),
                transfer_progress(global),
            )?;
            if json {
                print_json(&serde_json::json!({"pulled": count, "origin": origin}))?;
            } else {
                status(
                    global,
                    "Pulled",
                    &format!(
                        "{} from {source} (origin {origin})",
                        plural(count, "derivation")
                    ),
                );
            }
        }
        StoreCommand::History(HistoryArgs {
            command: Some(HistoryCommand::Export { file }),
        }) => {
            let catalog = store.read_catalog()?;
            let count = history::export(catalog.connection(), file)?;
            if file.as_os_str() == "-" {
                // The derivations were the output.
            } else if json {
                print_json(&serde_json::json!({"exported": count}))?;
            } else {
                status(
                    global,
                    "Exported",
                    &format!("{} to {}", plural(count, "derivation"), file.display()),
                );
            }
        }
        StoreCommand::History(HistoryArgs { command: None }) => {
            let origins = history::origins(store.read_catalog()?.connection())?;
            if json {
                for (origin, derivations) in &origins {
                    print_json(&serde_json::json!({"origin": origin, "derivations": derivations}))?;
                }
            } else if origins.is_empty() {
                outln!("no history (`history import FILE` adds some; builds add theirs)")?;
            } else {
                for (origin, derivations) in &origins {
                    outln!("{derivations:>8} {origin}")?;
                }
            }
        }
        StoreCommand::History(HistoryArgs {
            command: Some(HistoryCommand::Rm { origin }),
        }) => {
            let mut catalog = store.write_catalog()?;
            let values: [&dyn duckdb::ToSql; 1] = [origin];
            let removed = history::remove(catalog.connection_mut(), "origin = ?", &values)?;
            if json {
                print_json(&serde_json::json!({"removed": removed, "origin": origin}))?;
            } else if removed == 0 {
                status(
                    global,
                    "Removed",
                    &format!("nothing: no derivation has origin `{origin}`"),
                );
            } else {
                status(
                    global,
                    "Removed",
                    &format!("{} of origin `{origin}`", plural(removed, "derivation")),
                );
            }
        }
        StoreCommand::History(HistoryArgs {
            command: Some(HistoryCommand::Rebuild),
        }) => {
            let count = store.rebuild_history()?;
            if json {
                print_json(&serde_json::json!({"derivations": count}))?;
            } else {
                status(
                    global,
                    "Rebuilt",
                    &format!("{} of stored images", plural(count, "derivation")),
                );
            }
        }
        StoreCommand::Diff { from, to } => {
            let entries = store.diff(from, to)?;
            if json {
                for entry in &entries {
                    print_json(entry)?;
                }
            } else {
                print_diff(&entries)?;
            }
        }
        StoreCommand::History(HistoryArgs {
            command:
                Some(HistoryCommand::Evaluate {
                    file,
                    held_out: true,
                    validation,
                }),
        }) => {
            let derivations = match file {
                Some(file) => {
                    let conn = duckdb::Connection::open_in_memory()?;
                    history::read_file(&conn, file)?
                }
                None => crate::history::seed::derivations()?,
            };
            use crate::suggest::evaluate::{Part, held_out};
            let part = if *validation {
                Part::Validation
            } else {
                Part::Test
            };
            let evaluation = held_out(&derivations, part)?;
            if json {
                print_json(&evaluation)?;
            } else {
                print_held_out(&evaluation)?;
            }
        }
        StoreCommand::History(HistoryArgs {
            command: Some(HistoryCommand::Evaluate { file, .. }),
        }) => {
            let derivations = match file {
                Some(file) => {
                    let conn = duckdb::Connection::open_in_memory()?;
                    history::read_file(&conn, file)?
                        .into_iter()
                        .map(|d| (0, d))
                        .collect()
                }
                None => history::load(store.read_catalog()?.connection())?,
            };
            let children: Vec<String> = derivations.iter().map(|(_, d)| d.child.clone()).collect();
            let index = crate::suggest::engine::Index::build(&derivations);
            let evaluation = crate::suggest::engine::evaluate(&index, &children);
            if json {
                print_json(&evaluation)?;
            } else {
                outln!(
                    "leave-one-out over {} derivations ({} with at least 3 added packages, one hidden each)",
                    evaluation.derivations,
                    evaluation.cases
                )?;
                outln!("| ranking | recall@5 | recall@10 |")?;
                outln!("|---|---|---|")?;
                outln!(
                    "| suggestions | {:.3} | {:.3} |",
                    evaluation.recall_at_5,
                    evaluation.recall_at_10
                )?;
                outln!(
                    "| popularity baseline | {:.3} | {:.3} |",
                    evaluation.baseline_recall_at_5,
                    evaluation.baseline_recall_at_10
                )?;
                if evaluation.baseline_recall_at_5 > 0.0 {
                    outln!(
                        "recall@5 is {:.2}x the baseline",
                        evaluation.recall_at_5 / evaluation.baseline_recall_at_5
                    )?;
                }
            }
        }
        StoreCommand::Fsck(args) => {
            let report = store.fsck(args.repair)?;
            if json {
                print_json(&report)?;
            } else {
                outln!("checked {}", plural(report.objects_checked, "object"))?;
                let repair = |action: &str, hint: &str| {
                    if args.repair {
                        action.to_owned()
                    } else {
                        hint.to_owned()
                    }
                };
                let set_aside = repair(
                    "moved to quarantine/",
                    "`cargo appliance fsck --repair` sets it aside",
                );
                for digest in &report.corrupt_objects {
                    outln!("corrupt object {digest} ({set_aside})")?;
                }
                let marked = repair(
                    "the images that need it are marked",
                    "`cargo appliance fsck --repair` marks the images that need it",
                );
                for digest in &report.missing_objects {
                    outln!("missing object {digest} ({marked})")?;
                }
                let rebuilt = repair(
                    "marked: builds no longer use it; rebuild it or `cargo appliance image rm` it",
                    "`cargo appliance fsck --repair` marks it for builds to pass over",
                );
                for image in &report.images_needing_repair {
                    outln!("image {image} needs repair ({rebuilt})")?;
                }
                let removed = repair(
                    "removed; the next build writes it again",
                    "`cargo appliance fsck --repair` removes it; builds write it again",
                );
                for damage in &report.damaged_cached_trees {
                    outln!("cached materialized tree {damage} ({removed})")?;
                }
                for damage in &report.damaged_download_caches {
                    outln!("{damage} ({removed})")?;
                }
                if report.unreferenced_objects > 0 {
                    outln!(
                        "{} unreferenced (run `cargo appliance gc`)",
                        plural(report.unreferenced_objects, "object")
                    )?;
                }
            }
            if !report.is_clean() {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `image export IMAGE -o disk.raw|disk.qcow2`: the disk writer of the build's outputs, for
/// an image that has a kernel, an init and systemd-boot.
fn export_disk(
    global: &GlobalArgs,
    store: &Store,
    reference: &str,
    output: &std::path::Path,
) -> anyhow::Result<()> {
    let image = {
        let catalog = store.read_catalog()?;
        store.resolve(&catalog, reference)?
    };
    let qcow2 = output.extension().is_some_and(|e| e == "qcow2");
    let raw = if qcow2 {
        output.with_extension("raw.partial")
    } else {
        output.to_path_buf()
    };
    let layout = crate::output::disk::write_raw(
        store,
        &image,
        &[],
        None,
        &raw,
        crate::output::disk::Reuse::Never,
    );
    let result = layout.and_then(|(layout, _)| {
        if qcow2 {
            crate::output::disk::write_qcow2(&raw, output)?;
        }
        Ok(layout)
    });
    if qcow2 {
        let _ = std::fs::remove_file(&raw);
    }
    let layout = result?;
    status(
        global,
        "Exported",
        &format!(
            "{} to {} ({} disk, root UUID {})",
            image.reference(),
            output.display(),
            human_bytes(layout.size as i64),
            layout.root_uuid
        ),
    );
    Ok(())
}

/// Intended changes grouped by kind, then the consequences (dependencies, package scripts)
/// the same way under their own heading.
fn print_diff(entries: &[crate::store::diff::DiffEntry]) -> std::io::Result<()> {
    if entries.is_empty() {
        outln!("no changes")?;
        return Ok(());
    }
    let (intended, consequences): (Vec<_>, Vec<_>) =
        entries.iter().partition(|entry| entry.is_intended());
    let print_group = |group: &[&crate::store::diff::DiffEntry], indent: &str| {
        let mut kind = "";
        for entry in group {
            if entry.kind != kind {
                kind = &entry.kind;
                outln!("{indent}{kind}:")?;
            }
            let mut detail: Vec<&str> = entry.detail.iter().map(String::as_str).collect();
            detail.extend(entry.cause.map(crate::store::diff::Cause::describe));
            if detail.is_empty() {
                outln!("{indent}  {}", entry.subject)?;
            } else {
                outln!("{indent}  {} ({})", entry.subject, detail.join(", "))?;
            }
        }
        Ok::<(), std::io::Error>(())
    };
    print_group(&intended, "")?;
    if !consequences.is_empty() {
        outln!(
            "consequences ({}: dependencies and what package scripts did):",
            consequences.len()
        )?;
        print_group(&consequences, "  ")?;
    }
    Ok(())
}

/// skopeo's per-layer progress bars on a terminal, none off it.
fn transfer_progress(global: &GlobalArgs) -> bool {
    use std::io::IsTerminal as _;
    !global.quiet
        && global.message_format == MessageFormat::Human
        && std::io::stdout().is_terminal()
}

fn registry_reference(text: &str) -> anyhow::Result<crate::registry::Reference> {
    crate::registry::Reference::parse(text).map_err(|e| anyhow::anyhow!("{e}"))
}

fn push(global: &GlobalArgs, store: &Store, args: &crate::cli::PushArgs) -> anyhow::Result<()> {
    let destination = registry_reference(&args.reference)?;
    status(
        global,
        "Pushing",
        &format!("{} to {destination}", args.image),
    );
    let pushed = crate::registry::push(
        store,
        &args.image,
        &destination,
        args.lineage,
        &args.registry.access(),
        transfer_progress(global),
    )?;
    for one in &pushed {
        if global.message_format == MessageFormat::Json {
            print_json(one)?;
        } else {
            status(
                global,
                "Pushed",
                &format!("{} → {} ({})", one.image, one.reference, one.digest),
            );
        }
    }
    Ok(())
}

fn pull(global: &GlobalArgs, store: &Store, args: &crate::cli::PullArgs) -> anyhow::Result<()> {
    let source = registry_reference(&args.reference)?;
    status(global, "Pulling", &source.to_string());
    let pulled = crate::registry::pull(
        store,
        &source,
        args.name.as_deref(),
        &args.registry.access(),
        transfer_progress(global),
    )?;
    if global.message_format == MessageFormat::Json {
        return print_json(&pulled);
    }
    for parent in &pulled.parents {
        status(global, "Pulled", &format!("{parent} (a parent)"));
    }
    let derived = pulled.parent.as_ref().map_or_else(
        || ", a base of its own".to_owned(),
        |p| format!(", derived from {p}"),
    );
    status(
        global,
        if pulled.already_stored {
            "Fresh"
        } else {
            "Pulled"
        },
        &format!(
            "{} [{}]{derived}{}",
            pulled.image,
            crate::store::short(&pulled.tree_digest),
            if pulled.already_stored {
                " (already stored; nothing fetched)"
            } else {
                ""
            }
        ),
    );
    Ok(())
}

/// The held-out evaluation as a table: each change kind, our ranking next to the baselines.
fn print_held_out(evaluation: &crate::suggest::evaluate::HeldOut) -> anyhow::Result<()> {
    use crate::suggest::evaluate::Part;
    outln!(
        "held out: {} {} derivations ({}), {} to learn from; one change hidden per trial",
        evaluation.test,
        match evaluation.part {
            Part::Test => "test",
            Part::Validation => "validation",
        },
        match evaluation.part {
            Part::Test => "one in five by a hash of the record id",
            Part::Validation => "a fifth of the train part; the test part unread",
        },
        evaluation.train
    )?;
    outln!(
        "| kind | trials | suggestions @5 | @10 | popularity @5 | @10 | co-occurrence @5 | @10 | vs co-occurrence @5 | @10 |"
    )?;
    outln!("|---|---|---|---|---|---|---|---|---|---|")?;
    for kind in &evaluation.kinds {
        let ratio = |ours: f64, theirs: f64| {
            if theirs > 0.0 {
                format!("{:.2}x", ours / theirs)
            } else {
                "-".to_owned()
            }
        };
        outln!(
            "| {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {} |",
            kind.kind,
            kind.cases,
            kind.suggestions.at_5,
            kind.suggestions.at_10,
            kind.popularity.at_5,
            kind.popularity.at_10,
            kind.cooccurrence.at_5,
            kind.cooccurrence.at_10,
            ratio(kind.suggestions.at_5, kind.cooccurrence.at_5),
            ratio(kind.suggestions.at_10, kind.cooccurrence.at_10),
        )?;
    }
    Ok(())
}
