//! The typed manifest: what an appliance asks for, with the source span of every node so that
//! later stages (workspace resolution, builds, suggestions) can point back into the manifest.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use super::version::VersionReq;
use crate::diagnostics::{SourceFile, Span};

/// A value together with where it was written.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Spanned<T> {
    pub value: T,
    pub span: Span,
}

impl<T> Spanned<T> {
    pub fn new(value: T, span: Span) -> Self {
        Self { value, span }
    }
}

/// One manifest file and the appliances it declares.
#[derive(Debug, Clone, Serialize)]
pub struct Manifest {
    pub path: PathBuf,
    #[serde(skip)]
    pub source: Arc<SourceFile>,
    pub appliances: Vec<Appliance>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Appliance {
    pub name: Spanned<String>,
    /// The whole `appliance` node.
    pub span: Span,
    pub description: Option<Spanned<String>>,
    pub base: Option<Spanned<BaseRef>>,
    pub packages: Vec<PackageRequest>,
    pub remove: Vec<Spanned<String>>,
    pub kernel: Option<Spanned<String>>,
    pub binaries: Vec<Binary>,
    pub copies: Vec<Copy>,
    pub users: Vec<User>,
    pub groups: Vec<Group>,
    pub services: Vec<Service>,
    pub hostname: Option<Spanned<String>>,
    pub timezone: Option<Spanned<String>>,
    pub locale: Option<Spanned<String>>,
    pub kernel_cmdline: Vec<Spanned<String>>,
    pub runs: Vec<RunScript>,
    pub forwards: Vec<Forward>,
    pub outputs: Vec<Output>,
    pub suggest: SuggestSettings,
    pub capture: CaptureSettings,
    pub env: Vec<EnvVar>,
    pub mkdirs: Vec<MakeDir>,
    pub symlinks: Vec<Symlink>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum BaseRef {
    /// A stored image by name, newest version matching `version`.
    Image {
        name: String,
        version: Option<VersionReq>,
        /// `HOST[:PORT]/PREFIX`: when the store lacks a match, the image is
        /// `HOST/PREFIX/NAME` there, its tags read as versions.
        registry: Option<Spanned<String>>,
    },
    /// Another appliance of the workspace, built first.
    Appliance { name: Spanned<String> },
}

#[derive(Debug, Clone, Serialize)]
pub struct PackageRequest {
    pub name: Spanned<String>,
    pub recommends: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Binary {
    pub span: Span,
    pub name: Spanned<String>,
    pub package: Option<Spanned<String>>,
    pub to: String,
    pub target: Option<String>,
    pub profile: String,
    pub mode: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct Copy {
    pub span: Span,
    /// Relative to the manifest's directory; may be a glob.
    pub source: Spanned<String>,
    pub to: Spanned<String>,
    pub mode: Option<u32>,
    pub owner: Option<Spanned<String>>,
    pub group: Option<Spanned<String>>,
    pub allow_outside_workspace: bool,
}

impl Copy {
    /// Whether the source is a glob pattern rather than a path.
    pub fn is_glob(&self) -> bool {
        is_glob(&self.source.value)
    }
}

/// Glob metacharacters as globset reads them.
pub fn is_glob(source: &str) -> bool {
    source.contains(['*', '?', '[', '{'])
}

#[derive(Debug, Clone, Serialize)]
pub struct User {
    pub span: Span,
    pub name: Spanned<String>,
    pub system: bool,
    pub uid: Option<u32>,
    pub group: Option<String>,
    pub groups: Vec<String>,
    pub home: Option<String>,
    pub shell: Option<String>,
    pub comment: Option<String>,
    /// A crypt(3) hash for /etc/shadow.
    pub password_hash: Option<String>,
    /// OpenSSH public key lines from `ssh-key` children.
    pub ssh_keys: Vec<Spanned<String>>,
    /// A workspace file of public keys, relative to the manifest's directory.
    pub authorized_keys: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Group {
    pub span: Span,
    pub name: Spanned<String>,
    pub system: bool,
    pub gid: Option<u32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Service {
    pub span: Span,
    pub unit: Spanned<String>,
    pub enable: bool,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum RunSource {
    Inline { script: String },
    File { path: Spanned<String> },
}

#[derive(Debug, Clone, Serialize)]
pub struct RunScript {
    pub span: Span,
    pub source: RunSource,
    /// How long the script may run before its sandbox is killed.
    pub timeout: std::time::Duration,
}

/// A `run` script's limit when the manifest gives none.
pub const DEFAULT_RUN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30 * 60);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

#[derive(Debug, Clone, Serialize)]
pub struct Forward {
    pub span: Span,
    pub host: u16,
    pub guest: u16,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, Serialize)]
pub struct Output {
    pub span: Span,
    pub format: Spanned<String>,
    pub name: Option<String>,
    pub size: Option<u64>,
    pub tag: Option<String>,
    pub user: Option<String>,
    pub workdir: Option<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<(String, String)>,
    pub expose: Vec<(u16, Protocol)>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct SuggestSettings {
    pub span: Option<Span>,
    pub limit: Option<u32>,
    pub min_support: Option<f64>,
    pub min_confidence: Option<f64>,
    pub ignore: Vec<Spanned<String>>,
}

/// `capture { ignore "GLOB"… }`: image paths a test drive's capture leaves out.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CaptureSettings {
    pub span: Option<Span>,
    pub ignore: Vec<Spanned<String>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EnvVar {
    pub span: Span,
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct MakeDir {
    pub span: Span,
    pub path: String,
    pub mode: u32,
    pub owner: Option<Spanned<String>>,
    pub group: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Symlink {
    pub span: Span,
    pub path: String,
    pub target: String,
}

/// `{value, span}` → value; `span` fields dropped: moving a node does not change the build.
pub fn strip_spans(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            if map.len() == 2 && map.contains_key("span") && map.contains_key("value") {
                if let Some(mut inner) = map.remove("value") {
                    strip_spans(&mut inner);
                    *value = inner;
                }
                return;
            }
            map.remove("span");
            for inner in map.values_mut() {
                strip_spans(inner);
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(strip_spans),
        _ => {}
    }
}
