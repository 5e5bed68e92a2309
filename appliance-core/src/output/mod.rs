//! Output writers, one registry of formats: each writes from the stored tree into
//! `<target>/appliance/<appliance>/`, and an unchanged image with unchanged options reuses the
//! previous output (a stamp file beside it records what it was written from).

pub mod disk;
mod ext4;
pub mod oci;

use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::manifest::model::{Output, Protocol};
use crate::store::tree::hex;
use crate::store::{ImageRecord, Store};

/// A format the build can write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Tar,
    Oci,
    Raw,
    Qcow2,
}

impl Format {
    /// Every format, in the order of the schema's table
    /// ([`crate::manifest::schema::OUTPUT_FORMATS`], which documents them).
    pub const ALL: [Format; 4] = [Format::Tar, Format::Oci, Format::Raw, Format::Qcow2];

    /// The name a manifest's `output` node gives.
    pub fn name(self) -> &'static str {
        match self {
            Format::Tar => "tar",
            Format::Oci => "oci",
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }

    /// The schema's entry: summary, options, whether it is a bootable disk.
    pub fn spec(self) -> &'static crate::manifest::schema::OutputFormat {
        let index = Self::ALL.iter().position(|f| *f == self).unwrap_or(0);
        &crate::manifest::schema::OUTPUT_FORMATS[index]
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|format| format.name() == name)
    }

    /// Whether the format is a disk that boots (the build then installs a kernel).
    pub fn is_bootable(self) -> bool {
        self.spec().disk
    }

    /// The names of the bootable disk formats (`run --format`, `image export` by extension).
    pub fn disk_names() -> Vec<&'static str> {
        Self::ALL
            .into_iter()
            .filter(|f| f.is_bootable())
            .map(Format::name)
            .collect()
    }
}

/// Whether `name` is a format that is a bootable disk.
pub fn is_disk(name: &str) -> bool {
    Format::parse(name).is_some_and(Format::is_bootable)
}

/// What a writer needs: the image, its lineage (root first, the image last) and the node.
#[derive(Debug)]
pub struct Request<'a> {
    pub store: &'a Store,
    pub appliance: &'a str,
    pub chain: &'a [ImageRecord],
    pub output: &'a Output,
    pub dir: &'a Path,
    /// The manifest's `kernel-cmdline` words, for disk outputs.
    pub kernel_cmdline: &'a [String],
}

impl Request<'_> {
    fn image(&self) -> anyhow::Result<&ImageRecord> {
        self.chain
            .last()
            .ok_or_else(|| anyhow::anyhow!("an output without an image"))
    }

    fn base_name(&self) -> String {
        self.output
            .name
            .clone()
            .unwrap_or_else(|| self.appliance.to_owned())
    }

    /// A stamp of everything the output depends on.
    fn stamp(&self, format: &str) -> anyhow::Result<String> {
        let mut hasher = Sha256::new();
        hasher.update(format!(
            "{format} v1 {:?}\n",
            crate::store::export::source_date_epoch()
        ));
        for image in self.chain {
            hasher.update(format!("{}\n", image.tree_digest));
        }
        let mut node = serde_json::to_value(self.output)?;
        crate::manifest::model::strip_spans(&mut node);
        hasher.update(node.to_string());
        hasher.update(self.kernel_cmdline.join(" "));
        Ok(hex(&hasher.finalize()))
    }
}

/// What writing one output did.
#[derive(Debug)]
pub struct Outcome {
    /// The files the output consists of.
    pub files: Vec<PathBuf>,
    /// The previous output was still right and kept.
    pub reused: bool,
    /// Something worth a `-v` note (how a disk was written).
    pub note: Option<String>,
}

/// The files an output consists of, and the label of its stamp.
fn files_of(format: Format, request: &Request<'_>) -> (Vec<PathBuf>, &'static str) {
    let name = request.base_name();
    match format {
        Format::Tar => (vec![request.dir.join(format!("{name}.tar.zst"))], "tar"),
        Format::Oci => (
            vec![
                request.dir.join(format!("{name}.oci")),
                request.dir.join(format!("{name}.oci.tar")),
            ],
            "oci",
        ),
        Format::Raw => (vec![disk::disk_path(request.dir, &name, "raw")], "raw"),
        Format::Qcow2 => (vec![disk::disk_path(request.dir, &name, "qcow2")], "qcow2"),
    }
}

fn stamp_path(request: &Request<'_>, label: &str) -> PathBuf {
    request
        .dir
        .join(format!(".{}.{label}.stamp", request.base_name()))
}

/// Whether an output on disk is what writing it now would make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Written from this image chain with these options: a build keeps it.
    Current,
    /// Not there (or not all of it).
    Missing,
    /// There, but from another image or with other options.
    Stale,
}

/// [`Freshness`] of one output, without writing anything.
pub fn freshness(format: Format, request: &Request<'_>) -> anyhow::Result<Freshness> {
    let (files, label) = files_of(format, request);
    if !files.iter().all(|f| f.exists()) {
        return Ok(Freshness::Missing);
    }
    let stamp = request.stamp(label)?;
    Ok(
        if std::fs::read_to_string(stamp_path(request, label)).is_ok_and(|s| s == stamp) {
            Freshness::Current
        } else {
            Freshness::Stale
        },
    )
}

/// Write (or reuse) one output.
pub fn write(format: Format, request: &Request<'_>) -> anyhow::Result<Outcome> {
    fs_err::create_dir_all(request.dir)?;
    let name = request.base_name();
    let (files, label) = files_of(format, request);
    let stamp_path = stamp_path(request, label);
    let stamp = request.stamp(label)?;
    if files.iter().all(|f| f.exists())
        && std::fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp)
    {
        return Ok(Outcome {
            files,
            reused: true,
            note: None,
        });
    }
    // A stale stamp must not vouch for a half-written output.
    let _ = std::fs::remove_file(&stamp_path);
    let image = request.image()?;
    let mut note = None;
    match format {
        Format::Tar => {
            let tree = request.store.tree(image)?;
            crate::store::export::export(&tree, &request.store.objects(), &files[0])?;
        }
        Format::Oci => {
            let output = request.output;
            let config = oci::OciConfig {
                tag: output
                    .tag
                    .clone()
                    .unwrap_or_else(|| format!("{}:latest", request.appliance)),
                entrypoint: output.entrypoint.clone(),
                cmd: output.cmd.clone(),
                env: output.env.clone(),
                user: output.user.clone(),
                workdir: output.workdir.clone(),
                exposed: output
                    .expose
                    .iter()
                    .map(|(port, protocol)| {
                        format!(
                            "{port}/{}",
                            match protocol {
                                Protocol::Tcp => "tcp",
                                Protocol::Udp => "udp",
                            }
                        )
                    })
                    .collect(),
            };
            let created = crate::store::export::source_date_epoch()
                .map_or(image.created_at, |epoch| image.created_at.min(epoch));
            oci::write(
                request.store,
                request.chain,
                &config,
                created,
                &files[0],
                &files[1],
            )?;
        }
        Format::Raw => {
            let (_, written) = disk::write_raw(
                request.store,
                image,
                request.kernel_cmdline,
                request.output.size,
                &files[0],
                disk::Reuse::Copy,
            )?;
            note = disk_note(&files[0], &written);
        }
        Format::Qcow2 => {
            // The raw disk stays beside the qcow2 (hidden), for the next build to update.
            let raw = request.dir.join(format!(".{name}.qcow2-source.raw"));
            let written = disk::write_raw(
                request.store,
                image,
                request.kernel_cmdline,
                request.output.size,
                &raw,
                disk::Reuse::InPlace,
            )
            .and_then(|(_, written)| {
                disk::write_qcow2(&raw, &files[0])?;
                Ok(written)
            });
            if written.is_err() {
                let _ = std::fs::remove_file(&raw);
            }
            note = disk_note(&files[0], &written?);
        }
    }
    // The output is written, its stamp not yet: the next build writes it again.
    crate::test_hooks::point("output-written");
    fs_err::write(&stamp_path, &stamp)?;
    Ok(Outcome {
        files,
        reused: false,
        note,
    })
}

fn disk_note(disk: &Path, written: &disk::Written) -> Option<String> {
    let name = disk.file_name()?.to_string_lossy().into_owned();
    match written {
        disk::Written::Full => None,
        disk::Written::Updated(changed) => Some(format!(
            "{name}: updated the previous disk's root filesystem ({changed} entries changed)"
        )),
        disk::Written::Rewritten(reason) => Some(format!(
            "{name}: could not update the previous disk ({reason}); wrote it again"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_format_enum_is_the_schema_table() {
        let names: Vec<&str> = crate::manifest::schema::OUTPUT_FORMATS
            .iter()
            .map(|f| f.name)
            .collect();
        assert_eq!(Format::ALL.map(Format::name).to_vec(), names);
        for format in Format::ALL {
            assert_eq!(format.spec().name, format.name());
            assert_eq!(Format::parse(format.name()), Some(format));
        }
        assert_eq!(Format::disk_names(), ["raw", "qcow2"]);
    }
}
