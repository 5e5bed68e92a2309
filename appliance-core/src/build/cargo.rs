//! `binary` nodes: `cargo build` of a workspace binary, skipped when nothing in the workspace
//! changed since the artifact was last built (Cargo's own no-op costs a few hundred
//! milliseconds per call; a stat walk costs a few).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::process::CmdError;
use crate::store::tree::hex;
use crate::workspace::Workspace;

/// What to build.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BinarySpec {
    pub package: String,
    pub bin: String,
    pub target: Option<String>,
    pub profile: String,
}

/// A built artifact and the workspace state it was built from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Artifact {
    pub path: PathBuf,
    pub digest: String,
    pub workspace_stamp: String,
}

/// Remembered artifacts, in `<target>/appliance/.binaries.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ArtifactCache {
    #[serde(default)]
    artifacts: Vec<(BinarySpec, Artifact)>,
}

impl ArtifactCache {
    fn path(workspace: &Workspace) -> PathBuf {
        workspace.target_dir.join("appliance/.binaries.json")
    }

    pub fn load(workspace: &Workspace) -> Self {
        crate::json_file::load_or_default(&Self::path(workspace))
    }

    pub fn save(&self, workspace: &Workspace) -> anyhow::Result<()> {
        crate::json_file::write_atomically(&Self::path(workspace), self)
    }

    fn get(&self, spec: &BinarySpec) -> Option<&Artifact> {
        self.artifacts
            .iter()
            .find(|(s, _)| s == spec)
            .map(|(_, a)| a)
    }

    fn put(&mut self, spec: BinarySpec, artifact: Artifact) {
        self.artifacts.retain(|(s, _)| s != &spec);
        self.artifacts.push((spec, artifact));
    }
}

/// A stamp of every source file of the workspace (path, size, mtime), honouring .gitignore
/// and skipping the target directory: when it is unchanged, so is every artifact.
pub fn workspace_stamp(workspace: &Workspace) -> String {
    let target =
        fs_err::canonicalize(&workspace.target_dir).unwrap_or(workspace.target_dir.clone());
    let mut files: BTreeMap<PathBuf, (u64, u128)> = BTreeMap::new();
    let walker = ignore::WalkBuilder::new(&workspace.root)
        .hidden(false)
        .require_git(false)
        // Appliance.lock is written by the build itself; it is not a source of any binary.
        .filter_entry(move |e| {
            e.path() != target
                && e.file_name() != ".git"
                && e.file_name() != super::lockfile::FILE_NAME
        })
        .build();
    for entry in walker.flatten() {
        if let Ok(meta) = entry.metadata()
            && meta.is_file()
        {
            let mtime = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            files.insert(entry.into_path(), (meta.len(), mtime));
        }
    }
    let mut hasher = Sha256::new();
    for (path, (size, mtime)) in files {
        hasher.update(path.as_os_str().as_encoded_bytes());
        hasher.update(format!("\0{size}\0{mtime}\n"));
    }
    hex(&hasher.finalize())
}

pub fn file_digest(path: &Path) -> anyhow::Result<String> {
    let mut file = fs_err::File::open(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hex(&hasher.finalize()))
}

/// Why a cargo build failed: its rendered compiler output.
#[derive(Debug, thiserror::Error)]
#[error("`cargo build` of `{bin}` failed")]
pub struct CargoFailure {
    pub bin: String,
    pub output: String,
}

/// Build (or reuse) a binary; returns the artifact.
/// The remembered artifact of `spec`, when the workspace is as it was built from and the
/// file is still what was built: cargo need not run.
pub fn cached_artifact(cache: &ArtifactCache, stamp: &str, spec: &BinarySpec) -> Option<Artifact> {
    cache
        .get(spec)
        .filter(|artifact| artifact.workspace_stamp == stamp)
        .filter(|artifact| file_digest(&artifact.path).is_ok_and(|d| d == artifact.digest))
        .cloned()
}

pub fn build_binary(
    workspace: &Workspace,
    cache: &mut ArtifactCache,
    stamp: &str,
    spec: &BinarySpec,
    offline: bool,
) -> anyhow::Result<(Artifact, bool)> {
    if let Some(artifact) = cached_artifact(cache, stamp, spec) {
        return Ok((artifact, true));
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // Its own process group: an interrupted build stops rustc too.
    let mut command = crate::process::background(&cargo);
    command
        .current_dir(&workspace.root)
        .args([
            "build",
            "--message-format=json-render-diagnostics",
            "--profile",
        ])
        .arg(&spec.profile)
        .args(["-p", &spec.package, "--bin", &spec.bin]);
    if let Some(target) = &spec.target {
        command.args(["--target", target]);
    }
    if offline {
        command.arg("--offline");
    }
    let output = crate::process::output_of(command.stdin(std::process::Stdio::null())).map_err(
        |source| CmdError::Spawn {
            program: cargo.to_string_lossy().into_owned(),
            hint: String::new(),
            source,
        },
    )?;
    if !output.status.success() {
        return Err(CargoFailure {
            bin: spec.bin.clone(),
            output: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
        .into());
    }
    let mut executable = None;
    for message in cargo_metadata::Message::parse_stream(&output.stdout[..]) {
        if let Ok(cargo_metadata::Message::CompilerArtifact(artifact)) = message
            && artifact.target.is_bin()
            && artifact.target.name == spec.bin
        {
            executable = artifact.executable.map(|p| p.into_std_path_buf());
        }
    }
    let path = executable.with_context(|| {
        format!(
            "cargo built `{}` but reported no executable for it",
            spec.bin
        )
    })?;
    let artifact = Artifact {
        digest: file_digest(&path)?,
        path,
        workspace_stamp: stamp.to_owned(),
    };
    cache.put(spec.clone(), artifact.clone());
    Ok((artifact, false))
}
