//! The command line: clap definitions and the dispatch from commands to library calls.
//!
//! Lives in the library so that `--help` text and docs can be generated from it; the binary
//! only calls [`main`]. Exit codes follow cargo: 0 success (warnings allowed), 1 failure,
//! 2 usage error (clap's own).

pub(crate) mod printer;
pub mod store_commands;

use anyhow::Context as _;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::check::{CheckOptions, CheckSummary, check};
use crate::diagnostics::{Diagnostic, Summary};
use crate::suggest::SuggestOptions;

#[derive(Debug, Parser)]
#[command(
    name = "cargo-appliance",
    bin_name = "cargo appliance",
    version,
    about = "Build virtual appliances (VM disks, OCI images, rootfs archives) from KDL manifests in a Cargo workspace",
    long_about = "Build virtual appliances from `appliance.kdl` manifests kept next to the code of a \
                  Rust workspace.\n\nManifests are KDL v2 files named `appliance.kdl` or \
                  `*.appliance.kdl`; see schema/reference.md for the language.",
    after_help = "Exit status: 0 success (warnings allowed), 1 errors found, 2 usage error."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    #[command(flatten)]
    pub global: GlobalArgs,
}

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Path to the workspace's Cargo.toml, or to one appliance manifest to check alone
    #[arg(long, global = true, value_name = "PATH")]
    pub manifest_path: Option<PathBuf>,

    /// How diagnostics are printed
    #[arg(long, global = true, value_enum, default_value_t = MessageFormat::Human)]
    pub message_format: MessageFormat,

    /// Coloring of human output
    #[arg(long, global = true, value_enum, default_value_t = ColorChoice::Auto)]
    pub color: ColorChoice,

    /// Print less (no progress, no summary)
    #[arg(short, long, global = true)]
    pub quiet: bool,

    /// Print more (repeat for even more)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// The image store to use [default: $XDG_DATA_HOME/cargo-appliance/store]
    #[arg(long, global = true, value_name = "DIR", env = "APPLIANCE_STORE")]
    pub store: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MessageFormat {
    /// Compiler-style reports on stderr
    Human,
    /// One JSON object per line on stdout
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ColorChoice {
    Auto,
    Always,
    Never,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate manifests and what they name in the workspace, without building
    Check(CheckArgs),
    /// Build the appliances: base, packages, files and binaries, configuration, outputs
    Build(BuildArgs),
    /// Build an appliance's disk output and boot it under QEMU, serial console on the terminal
    /// (and in target/appliance/NAME/serial.log)
    Run(RunArgs),
    /// Log in to the running test drive over SSH (as root, with the test drive's own key)
    Ssh(SshArgs),
    /// Re-resolve bases to the newest stored images and drop package pins in Appliance.lock
    Update(CheckArgs),
    /// List the images in the store
    Images(ImagesArgs),
    /// Import, export, show or remove one stored image
    #[command(subcommand)]
    Image(ImageCommand),
    /// Create a base image from a Debian suite with mmdebstrap
    #[command(subcommand)]
    Base(BaseCommand),
    /// Remove objects no image references, leftovers of interrupted imports, and cached
    /// materialized trees of images that are gone
    Gc,
    /// Verify every object against its digest and every catalog reference
    Fsck(FsckArgs),
    /// Suggest what the appliances probably miss, learnt from the derivation history
    Suggest(SuggestArgs),
    /// The derivation history: without a subcommand, its origins with their counts
    History(HistoryArgs),
    /// Push a stored image to an OCI registry (with `--lineage`, its ancestors too)
    Push(PushArgs),
    /// Pull an image from an OCI registry into the store, its parents first
    Pull(PullArgs),
    /// Typed changes from one stored image to another
    Diff {
        /// The parent (or older) image
        from: String,
        /// The child (or newer) image
        to: String,
    },
}

/// How to reach a registry. Credentials come from where the container tools keep them
/// (`$REGISTRY_AUTH_FILE`, `$XDG_RUNTIME_DIR/containers/auth.json`, `~/.docker/config.json`),
/// never from the command line.
#[derive(Debug, Args)]
pub struct RegistryArgs {
    /// Allow plain HTTP and unverified TLS for a registry that is not on loopback
    #[arg(long)]
    pub insecure: bool,
    /// A directory of `*.crt` files (a private CA) to verify the registry's TLS with
    #[arg(long, value_name = "DIR")]
    pub cert_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct PushArgs {
    /// The stored image: NAME, NAME@VERSION or a tree-digest prefix
    pub image: String,
    /// Where: HOST[:PORT]/REPOSITORY[:TAG] (the tag defaults to the image's version)
    pub reference: String,
    /// Push the image's ancestors first, each beside it: `HOST/team/web:2` puts
    /// `debian/bookworm@1` at `HOST/team/debian/bookworm:1`
    #[arg(long)]
    pub lineage: bool,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// HOST[:PORT]/REPOSITORY[:TAG] or HOST[:PORT]/REPOSITORY@sha256:…
    pub reference: String,
    /// Store it as NAME or NAME@VERSION instead of the name its annotations give (images
    /// pushed by other tools are named after their repository)
    #[arg(long, value_name = "NAME[@VERSION]")]
    pub name: Option<String>,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

impl RegistryArgs {
    pub fn access(&self) -> crate::registry::Access {
        crate::registry::Access {
            insecure: self.insecure,
            cert_dir: self.cert_dir.clone(),
        }
    }
}

#[derive(Debug, Args)]
pub struct SuggestArgs {
    /// Suggest for this appliance only; repeatable
    #[arg(short = 'a', long = "appliance", value_name = "NAME")]
    pub appliances: Vec<String>,
    /// Suggestions per appliance (a manifest's `suggest limit=` wins)
    #[arg(long, default_value_t = 5)]
    pub limit: usize,
    /// Hide suggestions seen in a smaller share of derived images (0–1)
    #[arg(long, default_value_t = 0.0)]
    pub min_support: f64,
    /// Hide suggestions with a lower confidence (0–1)
    #[arg(long, default_value_t = 0.0)]
    pub min_confidence: f64,
    /// Hide suggestions fewer images than this made
    #[arg(long, default_value_t = crate::suggest::DEFAULT_MIN_IMAGES)]
    pub min_images: i64,
    /// Apply this suggestion to the manifest in place (KEY as its help line shows it, e.g.
    /// `package-added:ca-certificates`); repeatable
    #[arg(long, value_name = "KEY")]
    pub apply: Vec<String>,
    /// Show where a suggestion comes from: its evidence and images that made the change
    #[arg(long, value_name = "KEY", conflicts_with = "apply")]
    pub explain: Option<String>,
}

#[derive(Debug, Args)]
pub struct HistoryArgs {
    #[command(subcommand)]
    pub command: Option<HistoryCommand>,
}

#[derive(Debug, Subcommand)]
pub enum HistoryCommand {
    /// Remove the derivations of one origin (`seed`, `store`, `import:FILE`), as `history` lists them
    Rm {
        #[arg(long, value_name = "ORIGIN")]
        origin: String,
    },
    /// Add derivations from JSON Lines (optionally .zst; corpus records are converted) or Parquet
    Import { file: PathBuf },
    /// Write the history as JSON Lines (`-` for stdout), or Parquet when FILE ends in .parquet
    Export { file: PathBuf },
    /// Push the history (all but the seed; this store's builds once per appliance) to a
    /// registry as an OCI artifact: HOST[:PORT]/REPOSITORY[:TAG]
    Push {
        reference: String,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Pull a history artifact and merge it (pulled again, it replaces what it brought before)
    Pull {
        reference: String,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Re-derive the history of the stored images from the catalog
    Rebuild,
    /// Leave-one-out recall@5/@10 of the suggestions and of a popularity baseline
    Evaluate {
        /// Evaluate on this file's derivations instead of the store's history
        file: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct ImagesArgs {
    /// Show images as a tree of derivations
    #[arg(long)]
    pub tree: bool,
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Import a directory, .tar, .tar.gz, .tar.zst or OCI image layout as NAME[@VERSION]
    Import {
        /// Image name, optionally with a version (default: the next version of NAME)
        reference: String,
        /// What to import
        path: PathBuf,
        /// The image this one derives from
        #[arg(long, value_name = "IMAGE")]
        parent: Option<String>,
    },
    /// Export an image to a directory, .tar, .tar.zst, or a bootable .raw/.qcow2 disk (chosen by the name)
    Export {
        /// NAME, NAME@VERSION or a digest prefix
        image: String,
        #[arg(short, long, value_name = "PATH")]
        output: PathBuf,
    },
    /// Show an image: lineage, provenance, packages
    Show { image: String },
    /// Remove an image (objects are freed by `gc`)
    Rm {
        image: String,
        /// Also remove the images derived from it
        #[arg(long)]
        recursive: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum BaseCommand {
    /// Run mmdebstrap and store the result as NAME
    Create {
        /// Image name, e.g. debian/bookworm
        name: String,
        /// Debian suite, e.g. bookworm
        #[arg(long)]
        suite: String,
        /// mmdebstrap variant
        #[arg(long, default_value = "minbase")]
        variant: String,
        /// Extra packages, comma-separated
        #[arg(long, value_delimiter = ',', value_name = "PKG,…")]
        include: Vec<String>,
        /// Debian mirror URL [default: the host's apt sources]
        #[arg(long)]
        mirror: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct FsckArgs {
    /// Quarantine corrupt objects and mark the images that need them
    #[arg(long)]
    pub repair: bool,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Check only this appliance (and those it derives from); repeatable
    #[arg(short = 'a', long = "appliance", value_name = "NAME")]
    pub appliances: Vec<String>,
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Build only this appliance (and those it derives from); repeatable
    #[arg(short = 'a', long = "appliance", value_name = "NAME")]
    pub appliances: Vec<String>,
    /// Fail if Appliance.lock would change
    #[arg(long)]
    pub locked: bool,
    /// Use only what the store and Cargo have cached; no network
    #[arg(long)]
    pub offline: bool,
    /// After building, push each appliance's image with its lineage: to
    /// `REF/APPLIANCE:VERSION`, or to the reference REF makes of `{appliance}` and `{version}`
    /// (e.g. `registry.example:5000/team/{appliance}:ci-{version}`)
    #[arg(long, value_name = "REF", conflicts_with = "offline")]
    pub push: Option<String>,
    /// Print what the build would do, step by step, with each step's key and why it runs
    /// or is reused; do nothing (no pull, apt, cargo or output; the lock is left alone)
    #[arg(long, conflicts_with = "push")]
    pub plan: bool,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The appliance to boot (needed when several have disk outputs)
    #[arg(short = 'a', long = "appliance", value_name = "NAME")]
    pub appliance: Option<String>,
    /// Which disk output to boot when the appliance has both
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(crate::output::Format::disk_names()))]
    pub format: Option<String>,
    /// Never use KVM, even when /dev/kvm is usable
    #[arg(long)]
    pub no_kvm: bool,
    /// Stop the VM after this many seconds
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// Memory of the VM in MiB
    #[arg(long, default_value_t = 1024, value_name = "MIB")]
    pub memory: u32,
}

#[derive(Debug, Args)]
pub struct SshArgs {
    /// The appliance whose test drive to reach (needed when several have disk outputs)
    #[arg(short = 'a', long = "appliance", value_name = "NAME")]
    pub appliance: Option<String>,
    /// The user to log in as; root has the test drive's key
    #[arg(long, default_value = "root")]
    pub user: String,
    /// A command for the remote shell (as ssh(1) passes it); interactive without one
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// Entry point for the binary: parse arguments, run, print, return the exit code.
pub fn main() -> ExitCode {
    // Cargo runs `cargo-appliance appliance <args>`; run directly, there is no `appliance`.
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|arg| arg == "appliance") {
        args.remove(1);
    }
    let cli = Cli::parse_from(args);
    run(&cli)
}

pub fn run(cli: &Cli) -> ExitCode {
    use crate::process::interrupt;
    // `run` and `ssh` leave Ctrl-C to the program on the terminal (QEMU, ssh) and die with
    // the default handler.
    if !matches!(cli.command, Command::Run(_) | Command::Ssh(_))
        && let Err(error) = interrupt::install()
    {
        let _ = writeln!(
            std::io::stderr().lock(),
            "warning: cannot handle SIGINT/SIGTERM ({error}); an interrupted build leaves temporary files for `gc`"
        );
    }
    // Work that makes temporary state stops cleanly; anything else ends at once.
    let clean_stop = matches!(
        cli.command,
        Command::Build(_)
            | Command::Base(_)
            | Command::Image(ImageCommand::Import { .. } | ImageCommand::Export { .. })
            | Command::Push(_)
            | Command::Pull(_)
            | Command::History(HistoryArgs {
                command: Some(HistoryCommand::Push { .. } | HistoryCommand::Pull { .. })
            })
    )
    .then(interrupt::clean_stop);
    let code = run_command(cli);
    drop(clean_stop);
    if let Some(interrupted) = interrupt::received() {
        if !cli.global.quiet {
            let _ = writeln!(
                std::io::stderr().lock(),
                "error: {interrupted}: stopped; nothing half-done was stored and temporary files were removed"
            );
        }
        interrupted.die();
    }
    code
}

fn run_command(cli: &Cli) -> ExitCode {
    match &cli.command {
        Command::Check(args) => run_check(&cli.global, args),
        Command::Suggest(args) => run_suggest(&cli.global, args),
        Command::Build(args) => run_build(&cli.global, args),
        Command::Update(args) => run_update(&cli.global, args),
        Command::Run(args) => run_vm(&cli.global, args),
        Command::Ssh(args) => match ssh(&cli.global, args) {
            Ok(code) => code,
            Err(error) => {
                report_error(&cli.global, &error);
                ExitCode::FAILURE
            }
        },
        command => match store_commands::run_store_command(&cli.global, command) {
            Ok(code) => code,
            // The reader went away (`… | head`): stop quietly, as cargo and ripgrep do.
            Err(error) if printer::is_closed_pipe(&error) => ExitCode::SUCCESS,
            Err(error) => {
                report_error(&cli.global, &error);
                ExitCode::FAILURE
            }
        },
    }
}

/// Print an error with its chain of causes, cargo-style ("error: …", "caused by: …").
pub fn report_error(global: &GlobalArgs, error: &anyhow::Error) {
    // What failed because of a signal is reported once, as the interruption (`run`).
    if crate::process::interrupt::received().is_some() {
        return;
    }
    match global.message_format {
        MessageFormat::Json => {
            let causes: Vec<String> = error.chain().skip(1).map(ToString::to_string).collect();
            let message = serde_json::json!({
                "reason": "error",
                "message": error.to_string(),
                "causes": causes,
            });
            let _ = writeln!(std::io::stdout().lock(), "{message}");
        }
        MessageFormat::Human => {
            let mut stderr = std::io::stderr().lock();
            let _ = writeln!(stderr, "error: {error}");
            for cause in error.chain().skip(1) {
                let _ = writeln!(stderr, "  caused by: {cause}");
            }
        }
    }
}

fn use_color(global: &GlobalArgs) -> bool {
    match global.color {
        ColorChoice::Always => true,
        ColorChoice::Never => false,
        ColorChoice::Auto => {
            std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()
        }
    }
}

/// Print diagnostics in the chosen format. Write errors (a closed pipe) are not worth a panic.
fn emit(global: &GlobalArgs, diagnostics: &[Diagnostic]) {
    match global.message_format {
        MessageFormat::Human => {
            let color = use_color(global);
            let mut stderr = std::io::stderr().lock();
            for diagnostic in diagnostics {
                let _ = write!(stderr, "{}", diagnostic.render_human(color));
            }
        }
        MessageFormat::Json => {
            let mut stdout = std::io::stdout().lock();
            for diagnostic in diagnostics {
                if let Ok(line) = serde_json::to_string(&diagnostic.to_message()) {
                    let _ = writeln!(stdout, "{line}");
                }
            }
        }
    }
}

/// Suggestions for the checked appliances, when a store with history exists. Never an
/// error: a suggestion that cannot be computed is logged and skipped.
fn suggestions_for(
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
fn check_or_report(
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

fn run_suggest(global: &GlobalArgs, args: &SuggestArgs) -> ExitCode {
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
fn explain_suggestion(
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
fn apply_suggestions(
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
        let temp = path.with_extension("kdl.applying");
        fs_err::write(&temp, &edited)?;
        fs_err::rename(&temp, path)?;
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

fn run_check(global: &GlobalArgs, args: &CheckArgs) -> ExitCode {
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

fn run_build(global: &GlobalArgs, args: &BuildArgs) -> ExitCode {
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
fn push_destination(
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
fn push_built(
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
fn default_registry() -> anyhow::Result<Option<String>> {
    match std::env::var("APPLIANCE_REGISTRY") {
        Ok(value) if !value.is_empty() => {
            (crate::manifest::grammar::REGISTRY_PREFIX.check)(&value)
                .map_err(|e| anyhow::anyhow!("APPLIANCE_REGISTRY `{value}` {e}"))?;
            Ok(Some(value))
        }
        _ => Ok(None),
    }
}

fn run_vm(global: &GlobalArgs, args: &RunArgs) -> ExitCode {
    match boot(global, args) {
        Ok(code) => code,
        Err(error) => {
            report_error(global, &error);
            ExitCode::FAILURE
        }
    }
}

/// The appliance a test-drive command means: `-a NAME`, or the only one with a disk output.
fn test_drive_appliance(
    global: &GlobalArgs,
    chosen: Option<&String>,
) -> anyhow::Result<(crate::check::CheckReport, String)> {
    let all = check(&CheckOptions {
        manifest_path: global.manifest_path.clone(),
        appliances: Vec::new(),
    })?;
    let is_disk = crate::output::is_disk;
    let candidates: Vec<String> = all
        .appliances()
        .filter(|(_, a)| a.outputs.iter().any(|o| is_disk(&o.format.value)))
        .map(|(_, a)| a.name.value.clone())
        .collect();
    let name = match chosen {
        Some(name) => name.clone(),
        None => match candidates.as_slice() {
            [one] => one.clone(),
            [] => anyhow::bail!(
                "no appliance has a disk output (`output \"qcow2\"` or `output \"raw\"`)"
            ),
            several => anyhow::bail!(
                "several appliances have disk outputs ({}); pick one with -a",
                several.join(", ")
            ),
        },
    };
    if !candidates.contains(&name) {
        anyhow::bail!("appliance `{name}` has no disk output to boot (add `output \"qcow2\"`)");
    }
    Ok((all, name))
}

/// `cargo appliance ssh`: ssh(1) into the running test drive with its key and port; the
/// exit status is the remote command's (ssh's own 255 when it cannot connect).
fn ssh(global: &GlobalArgs, args: &SshArgs) -> anyhow::Result<ExitCode> {
    use std::io::IsTerminal as _;
    if let Some(missing) = crate::process::host::describe_missing(crate::process::host::Need::Ssh) {
        anyhow::bail!("`cargo appliance ssh` needs {missing}");
    }
    let (report, name) = test_drive_appliance(global, args.appliance.as_ref())?;
    let dir = crate::run::test_drive_dir(&report.workspace.target_dir, &name);
    let state_path = dir.join("ssh.json");
    let not_running = || {
        anyhow::anyhow!(
            "no test drive of `{name}` is running; start one with `cargo appliance run -a {name}` (it can run in the background: its console goes to target/appliance/{name}/serial.log)"
        )
    };
    let state: crate::run::TestDriveState = match fs_err::read(&state_path) {
        Ok(data) => serde_json::from_slice(&data)
            .with_context(|| format!("{} is damaged", state_path.display()))?,
        Err(_) => return Err(not_running()),
    };
    if !std::path::Path::new(&format!("/proc/{}", state.pid)).exists() {
        return Err(not_running());
    }
    let mut command = crate::process::dies_with_us("ssh");
    command
        .arg("-i")
        .arg(&state.key)
        .args(["-p", &state.port.to_string()])
        // A test drive's host key changes with every build: nothing to remember or check.
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "ConnectTimeout=10",
        ]);
    if args.command.is_empty() && std::io::stdin().is_terminal() {
        command.arg("-t");
    }
    command
        .arg("--")
        .arg(format!("{}@127.0.0.1", args.user))
        .args(&args.command);
    let status = command
        .status()
        .context("running ssh (Debian package openssh-client)")?;
    use std::os::unix::process::ExitStatusExt as _;
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1);
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

fn boot(global: &GlobalArgs, args: &RunArgs) -> anyhow::Result<ExitCode> {
    let (_all, name) = test_drive_appliance(global, args.appliance.as_ref())?;
    let is_disk = crate::output::is_disk;
    let options = CheckOptions {
        manifest_path: global.manifest_path.clone(),
        appliances: vec![name.clone()],
    };
    let Some(report) = check_or_report(global, &options) else {
        return Ok(ExitCode::FAILURE);
    };
    if report.has_errors() {
        emit(global, &report.diagnostics);
        return Ok(ExitCode::FAILURE);
    }
    crate::run::preflight()?;
    let store = store_commands::open_store(global)?;
    let reporter = crate::build::progress::Reporter::new(global.quiet, global.verbose > 0);
    let built = match crate::build::build(
        &report,
        &store,
        &crate::build::BuildOptions::default(),
        &reporter,
    ) {
        Ok(built) => built,
        Err(crate::build::BuildError::Diagnostics(diagnostics)) => {
            emit(global, &diagnostics);
            return Ok(ExitCode::FAILURE);
        }
        Err(crate::build::BuildError::Other(error)) => return Err(error),
    };
    let done = built
        .iter()
        .find(|b| b.appliance == name)
        .context("the appliance was not built")?;
    let disk = done
        .outputs
        .iter()
        .find(|path| {
            let extension = path
                .extension()
                .and_then(|e| e.to_str())
                .unwrap_or_default();
            match &args.format {
                Some(format) => extension == format,
                None => is_disk(extension),
            }
        })
        .with_context(|| {
            format!(
                "`{name}` has no {} output",
                args.format.as_deref().unwrap_or("disk")
            )
        })?;
    let appliance = report
        .appliances()
        .find(|(_, a)| a.name.value == name)
        .map(|(_, a)| a)
        .context("the appliance vanished")?;
    let format = disk
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("raw")
        .to_owned();
    // The test drive: its console in a log file as well, its SSH key and port for
    // `cargo appliance ssh` (never in the image or the output: see run::TestDriveSsh).
    use std::io::IsTerminal as _;
    let drive = crate::run::test_drive_dir(&report.workspace.target_dir, &name);
    fs_err::create_dir_all(&drive)?;
    let serial_log = drive.parent().map(|dir| dir.join("serial.log"));
    let ssh = if crate::process::host::missing(crate::process::host::Need::Ssh).is_empty() {
        let (key, public_key) = crate::run::test_drive_key(&drive)?;
        let port = appliance
            .forwards
            .iter()
            .find(|f| f.guest == 22)
            .map(|f| f.host)
            .map_or_else(crate::run::free_loopback_port, Ok)?;
        let state = crate::run::TestDriveState {
            port,
            key,
            pid: std::process::id(),
        };
        crate::json_file::write_atomically(&drive.join("ssh.json"), &state)?;
        Some(crate::run::TestDriveSsh { port, public_key })
    } else {
        reporter.status(
            "Note",
            "ssh-keygen (openssh-client) is missing: no SSH into this test drive",
        );
        None
    };
    if let Some(ssh) = &ssh {
        reporter.status(
            "SSH",
            &format!(
                "`cargo appliance ssh -a {name}` logs in as root (port {} on 127.0.0.1)",
                ssh.port
            ),
        );
    }
    let outcome = crate::run::run(
        &crate::run::RunOptions {
            disk: disk.clone(),
            format,
            forwards: appliance.forwards.clone(),
            kvm: !args.no_kvm,
            timeout: args.timeout.map(std::time::Duration::from_secs),
            memory_mib: args.memory,
            serial_log,
            interactive: std::io::stdin().is_terminal(),
            ssh,
        },
        |note| reporter.status("Running", note),
    );
    let _ = std::fs::remove_file(drive.join("ssh.json"));
    let outcome = outcome?;
    if !outcome.powered_off {
        reporter.status("Stopped", "the timeout ended the VM");
        return Ok(ExitCode::SUCCESS);
    }
    match outcome.exit_code {
        Some(0) => {
            reporter.status("Finished", "the VM powered off");
            Ok(ExitCode::SUCCESS)
        }
        code => anyhow::bail!("qemu exited with {code:?}"),
    }
}

fn run_update(global: &GlobalArgs, args: &CheckArgs) -> ExitCode {
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

pub(crate) fn plural(count: usize, word: &str) -> String {
    if count == 1 {
        format!("1 {word}")
    } else {
        format!("{count} {word}s")
    }
}

fn summary_line(summary: &Summary, appliances: usize) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
