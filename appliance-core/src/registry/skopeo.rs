//! skopeo, run through the one command runner ([`crate::process::Cmd`]): inspect a manifest,
//! copy between a registry and an OCI layout.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use sha2::{Digest as _, Sha256};

use super::{MAX_MANIFEST_BYTES, Reference};
use crate::process::Cmd;
use crate::store::tree::hex;

/// How to reach registries: TLS verified with the system's roots (plus `cert_dir`, a
/// directory of `*.crt` for a private CA, as skopeo reads it); plain HTTP only to a loopback
/// registry, as Docker allows, or with `insecure`.
#[derive(Debug, Clone, Default)]
pub struct Access {
    pub insecure: bool,
    pub cert_dir: Option<PathBuf>,
}

impl Access {
    /// A loopback registry may speak plain HTTP or unverified TLS, as Docker allows, unless a
    /// CA is named for it: then its certificate is checked like any other.
    fn verify_tls(&self, reference: &Reference) -> bool {
        !(self.insecure || (reference.is_loopback() && self.cert_dir.is_none()))
    }

    /// skopeo's options for `reference`, `prefix` being `""`, `src-` or `dest-`.
    fn args(&self, reference: &Reference, prefix: &str) -> Vec<String> {
        let mut args = Vec::new();
        if !self.verify_tls(reference) {
            args.push(format!("--{prefix}tls-verify=false"));
        }
        if let Some(dir) = &self.cert_dir {
            args.push(format!("--{prefix}cert-dir={}", dir.display()));
        }
        args
    }
}

pub fn require() -> anyhow::Result<()> {
    use crate::process::host::{Need, describe_missing};
    if let Some(missing) = describe_missing(Need::Registry) {
        bail!("talking to a registry needs {missing}; `.ci/install-deps` installs it");
    }
    Ok(())
}

/// One side of a copy.
#[derive(Debug)]
pub enum Endpoint<'a> {
    Registry(&'a Reference),
    Layout { dir: PathBuf, tag: String },
}

impl Endpoint<'_> {
    fn transport(&self) -> anyhow::Result<String> {
        match self {
            Endpoint::Registry(reference) => Ok(reference.docker_transport()),
            Endpoint::Layout { dir, tag } => {
                let dir = dir
                    .to_str()
                    .filter(|d| !d.contains(':'))
                    .with_context(|| {
                        format!(
                            "{} cannot be named to skopeo (a `:` or not UTF-8); use a store path without them",
                            dir.display()
                        )
                    })?;
                Ok(format!("oci:{dir}:{tag}"))
            }
        }
    }

    fn access_args(&self, access: &Access, prefix: &str) -> Vec<String> {
        match self {
            Endpoint::Registry(reference) => access.args(reference, prefix),
            Endpoint::Layout { .. } => Vec::new(),
        }
    }
}

/// The manifest `reference` names, as the registry serves it, and the reference pinned to
/// its digest; an index is followed to its linux/amd64 manifest.
pub fn manifest(reference: &Reference, access: &Access) -> anyhow::Result<(Reference, Vec<u8>)> {
    let mut reference = reference.clone();
    for _ in 0..2 {
        let bytes = Cmd::new("skopeo")
            .arg("inspect")
            .arg("--raw")
            .args(access.args(&reference, ""))
            .arg(reference.docker_transport())
            .output()
            .map_err(explained)
            .with_context(|| format!("reading the manifest of {reference}"))?;
        anyhow::ensure!(
            bytes.len() <= MAX_MANIFEST_BYTES,
            "{reference}: the manifest is {} bytes, more than the {MAX_MANIFEST_BYTES} accepted",
            bytes.len()
        );
        let digest = format!("sha256:{}", hex(&Sha256::digest(&bytes)));
        if let Some(asked) = &reference.digest {
            anyhow::ensure!(
                asked == &digest,
                "{reference}: the registry answered a manifest with digest {digest}"
            );
        }
        let document: crate::oci_json::ImageIndex =
            serde_json::from_slice(&bytes).with_context(|| {
                format!("{reference}: the manifest is not a JSON document of the image spec")
            })?;
        if document.manifests.is_none() {
            return Ok((reference.at_digest(&digest), bytes));
        }
        anyhow::ensure!(
            document.layers.is_none(),
            "{reference}: the manifest has both `manifests` and `layers`; refusing an ambiguous document"
        );
        let chosen = &document
            .pick(false)
            .with_context(|| format!("{reference}: the index has no linux/amd64 image"))?
            .digest;
        reference = Reference::parse(&format!(
            "{}/{}@{chosen}",
            reference.registry, reference.repository
        ))
        .map_err(|e| anyhow::anyhow!("{reference}: an index entry: {e}"))?;
    }
    bail!("{reference}: an index of indexes; refusing to follow it further")
}

/// Copy `from` to `to`; returns the manifest digest written. `shared_blobs` is a directory
/// of `sha256/<hex>` blobs used by an OCI layout destination instead of its own, so layers
/// already there are not fetched again. A push keeps the manifest's bytes (and so its
/// digest) exactly.
pub fn copy(
    from: &Endpoint<'_>,
    to: &Endpoint<'_>,
    access: &Access,
    progress: bool,
    shared_blobs: Option<&Path>,
) -> anyhow::Result<String> {
    let digest_file = tempfile::NamedTempFile::new().context("creating a temporary file")?;
    let mut command = Cmd::new("skopeo")
        .arg("copy")
        .arg(format!("--digestfile={}", digest_file.path().display()))
        .args(from.access_args(access, "src-"))
        .args(to.access_args(access, "dest-"));
    if matches!(to, Endpoint::Registry(_)) {
        command = command.arg("--preserve-digests");
    }
    if let Some(blobs) = shared_blobs {
        command = command.arg(format!("--dest-shared-blob-dir={}", blobs.display()));
    }
    if !progress {
        command = command.arg("--quiet");
    }
    command
        .arg(from.transport()?)
        .arg(to.transport()?)
        .show_stdout(progress)
        .output()
        .map_err(explained)?;
    let digest = fs_err::read_to_string(digest_file.path())?;
    Ok(digest.trim().to_owned())
}

/// The tags of `repository`, as the registry lists them.
pub fn list_tags(repository: &Reference, access: &Access) -> anyhow::Result<Vec<String>> {
    let bare = Reference {
        tag: None,
        digest: None,
        ..repository.clone()
    };
    let listing = Cmd::new("skopeo")
        .arg("list-tags")
        .args(access.args(&bare, ""))
        .arg(bare.docker_transport())
        .output()
        .map_err(explained)
        .with_context(|| format!("listing the tags of {bare}"))?;
    anyhow::ensure!(
        listing.len() <= MAX_MANIFEST_BYTES,
        "{bare}: the tag list is larger than {MAX_MANIFEST_BYTES} bytes"
    );
    let listing: serde_json::Value = serde_json::from_slice(&listing)
        .with_context(|| format!("{bare}: the tag list is not JSON"))?;
    Ok(listing["Tags"]
        .as_array()
        .map(|tags| {
            tags.iter()
                .filter_map(|t| t.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default())
}

/// A skopeo failure with what to do about its usual causes put before skopeo's own words.
fn explained(error: crate::process::CmdError) -> anyhow::Error {
    let text = error.to_string();
    let hint = if text.contains("authentication required")
        || text.contains("unauthorized")
        || text.contains("401 Unauthorized")
    {
        Some(
            "the registry wants credentials: log in with `skopeo login HOST` (or `docker login HOST`); they are read from $REGISTRY_AUTH_FILE, $XDG_RUNTIME_DIR/containers/auth.json or ~/.docker/config.json",
        )
    } else if text.contains("x509:") || text.contains("certificate signed by unknown authority") {
        Some(
            "the registry's TLS certificate is not trusted here: name its CA with `--cert-dir DIR` (a directory of *.crt files)",
        )
    } else if text.contains("server gave HTTP response to HTTPS client") {
        Some(
            "the registry speaks plain HTTP, which is used only for loopback registries or with `--insecure`",
        )
    } else if text.contains("stopped after 10 redirects") {
        Some("the registry redirects in a loop")
    } else if text.contains("Digest did not match") {
        Some(
            "the registry sent content that does not hash to the digest its manifest names (damaged storage, or something in between rewrote it); nothing was stored",
        )
    } else if text.contains("unexpected EOF") {
        Some(
            "the registry's answer ended early (a cut connection or a short blob); nothing was stored, try again",
        )
    } else if text.contains("exceeded maximum allowed size") {
        Some("the registry's manifest is larger than 4 MiB; refusing it")
    } else {
        None
    };
    let error = anyhow::Error::new(error);
    match hint {
        Some(hint) => error.context(hint),
        None => error,
    }
}
