//! Debian bases: `base create` runs mmdebstrap into a temporary tarball and imports it.
//! The mirror is the host's (mmdebstrap reads the host's apt sources when none is given)
//! unless `--mirror` names one; provenance records suite, variant, mirror and every package.

use anyhow::{Context as _, bail};

use crate::process::Cmd;
use crate::store::{ImageRecord, Store};

#[derive(Debug, Clone)]
pub struct BaseRequest {
    pub name: String,
    pub suite: String,
    pub variant: String,
    pub include: Vec<String>,
    pub mirror: Option<String>,
}

pub const VARIANTS: &[&str] = &[
    "extract",
    "custom",
    "essential",
    "apt",
    "minbase",
    "buildd",
    "required",
    "important",
    "standard",
];

/// Why mmdebstrap cannot run here, if it cannot: it needs root, or user namespaces for its
/// `unshare` mode.
pub fn sandbox_problem() -> Option<String> {
    use crate::process::host::{Need, describe_missing};
    if let Some(missing) = describe_missing(Need::BaseCreate) {
        return Some(format!(
            "creating a base needs {missing}, which is not on PATH; install it (`.ci/install-deps` installs everything cargo-appliance uses)"
        ));
    }
    if rustix::process::geteuid().is_root() {
        return None;
    }
    let userns = std::fs::read_to_string("/proc/sys/kernel/unprivileged_userns_clone")
        .map(|v| v.trim() != "0")
        .unwrap_or(true);
    let max = std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
        .map(|v| v.trim() != "0")
        .unwrap_or(true);
    if !userns || !max {
        return Some(
            "creating a base needs root or unprivileged user namespaces, and this machine has neither \
             (run as root, or enable kernel.unprivileged_userns_clone / user.max_user_namespaces)"
                .into(),
        );
    }
    if let Some(missing) = describe_missing(Need::RootlessBaseCreate) {
        return Some(format!(
            "creating a base without root needs {missing}; install it, or run as root"
        ));
    }
    None
}

/// The mirrors of the host's apt sources, for the provenance record.
pub fn host_mirrors() -> Vec<String> {
    let mut mirrors = Vec::new();
    let mut files = vec![std::path::PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        files.extend(dir.flatten().map(|e| e.path()));
    }
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        for line in text.lines().map(str::trim) {
            let uris = line
                .strip_prefix("URIs:")
                .map(|rest| {
                    rest.split_whitespace()
                        .map(str::to_owned)
                        .collect::<Vec<_>>()
                })
                .or_else(|| {
                    line.strip_prefix("deb ").and_then(|rest| {
                        rest.split_whitespace()
                            .find(|w| w.contains("://"))
                            .map(|w| vec![w.to_owned()])
                    })
                });
            for uri in uris.unwrap_or_default() {
                if !mirrors.contains(&uri) {
                    mirrors.push(uri);
                }
            }
        }
    }
    mirrors
}

pub fn create_base(store: &Store, request: &BaseRequest) -> anyhow::Result<ImageRecord> {
    if !VARIANTS.contains(&request.variant.as_str()) {
        bail!(
            "unknown variant `{}`; mmdebstrap knows {}",
            request.variant,
            VARIANTS.join(", ")
        );
    }
    for package in &request.include {
        (crate::manifest::grammar::PACKAGE_NAME.check)(package)
            .map_err(|e| anyhow::anyhow!("--include `{package}` {e}"))?;
    }
    if request.suite.is_empty()
        || !request
            .suite
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        bail!(
            "suite `{}` is not a Debian suite name",
            request.suite.escape_debug()
        );
    }
    if let Some(problem) = sandbox_problem() {
        bail!(problem);
    }
    let work = tempfile::Builder::new()
        .prefix("appliance-base-")
        .tempdir_in(store.root().join("staging"))
        .context("creating a work directory")?;
    let tarball = work.path().join("rootfs.tar");
    let mut command = Cmd::new("mmdebstrap")
        .arg(format!("--variant={}", request.variant))
        .arg("--quiet")
        // Reproducible timestamps inside the tree make equal inputs give equal digests.
        .env(
            "SOURCE_DATE_EPOCH",
            std::env::var("SOURCE_DATE_EPOCH").unwrap_or_else(|_| "0".into()),
        );
    if !request.include.is_empty() {
        command = command.arg(format!("--include={}", request.include.join(",")));
    }
    command = command.arg(&request.suite).arg(&tarball);
    if let Some(mirror) = &request.mirror {
        command = command.arg(mirror);
    }
    command.output().context("running mmdebstrap")?;
    let mirrors = match &request.mirror {
        Some(mirror) => vec![mirror.clone()],
        None => host_mirrors(),
    };
    let provenance = serde_json::json!({
        "source": "mmdebstrap",
        "suite": request.suite,
        "variant": request.variant,
        "include": request.include,
        "mirror": mirrors,
    });
    store.import(&request.name, &tarball, None, provenance)
}
