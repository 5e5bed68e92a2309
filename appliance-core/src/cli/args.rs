//! The command line's clap types: every command, its arguments and their help.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

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
    /// Turn what was done in a `run --capture` test drive into manifest edits (packages,
    /// files, users, groups, services, host name, time zone, locale); --apply makes them
    Capture(CaptureArgs),
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
    /// Remove objects no image references, leftovers of interrupted imports and downloads,
    /// cached materialized trees of images that are gone, and package lists set aside
    Gc,
    /// Verify every object against its digest and every catalog reference, and the caches
    /// builds reuse (materialized trees, OCI layer blobs, apt's package lists and downloaded
    /// packages); exits 1 when anything was wrong, also when `--repair` mended it
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
        /// Evaluate on this file's derivations instead of the store's history (with
        /// --held-out: instead of the shipped seed corpus)
        file: Option<PathBuf>,
        /// Split the derivations into train and test parts by a hash of their record ids,
        /// rank from the train part only, and report each change kind next to popularity and
        /// plain co-occurrence on the same trials
        #[arg(long)]
        held_out: bool,
        /// With --held-out: trials from a validation fifth of the train part instead of the
        /// test part, for tuning without ever looking at the test part
        #[arg(long, requires = "held_out")]
        validation: bool,
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
    /// Quarantine corrupt objects, mark the images that need them, and remove damaged cache
    /// entries (the next build writes them again)
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
    /// Boot a writable copy of the disk kept in target/appliance/NAME/testdrive/ (booted
    /// again while the image is the same) instead of a throwaway snapshot, for `capture`
    #[arg(long)]
    pub capture: bool,
}

#[derive(Debug, Args)]
pub struct CaptureArgs {
    /// The appliance whose test drive to capture (needed when several have disk outputs)
    #[arg(short = 'a', long = "appliance", value_name = "NAME")]
    pub appliance: Option<String>,
    /// Write the captured files into the workspace and the edits into the manifest
    #[arg(long)]
    pub apply: bool,
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
