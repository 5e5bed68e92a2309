//! `run` scripts: read, run in the sandbox on an overlay with bounded space and a time
//! limit, and their result stored; failures as diagnostics on the `run` node.

use std::path::Path;
use std::time::Duration;

use super::edit::TreeEditor;
use super::packages_step;
use super::{BuildError, Context, Site};
use crate::diagnostics::Span;
use crate::store::{ImageRecord, NewTree};

/// A `run` script as the build runs it: where it is declared, its text, its limit.
pub(super) struct Script {
    pub(super) span: Span,
    pub(super) text: String,
    pub(super) timeout: Duration,
}

/// The diagnostic for a script that failed or ran out of time.
pub(super) fn script_failure(site: &Site<'_>, script: &Script, error: anyhow::Error) -> BuildError {
    let error = match error.downcast::<crate::packages::apt::SandboxTimeout>() {
        Ok(timeout) => {
            let tail = timeout.tail(25);
            return site
                .error(
                    "appliance::run-timeout",
                    format!(
                        "the script ran longer than its limit of {} and was killed",
                        human_duration(timeout.limit)
                    ),
                    script.span,
                )
                .label("this script")
                .help(if tail.is_empty() {
                    "raise the limit with `timeout=` (e.g. `timeout=\"1h\"`) if it needs longer; it printed nothing".to_owned()
                } else {
                    format!("raise the limit with `timeout=` (e.g. `timeout=\"1h\"`) if it needs longer; its output ends with:\n{tail}")
                })
                .into();
        }
        Err(error) => error,
    };
    match error.downcast::<crate::packages::apt::SandboxFailure>() {
        Ok(failure) => site
            .error(
                "appliance::run-failed",
                format!("the script failed inside the image ({})", failure.status),
                script.span,
            )
            .label("this script")
            .help(format!("its output ends with:\n{}", failure.tail(25)))
            .into(),
        Err(other) => BuildError::Other(other),
    }
}

/// `5s`, `10m`, `1h30m` for a limit.
pub(super) fn human_duration(duration: Duration) -> String {
    let seconds = duration.as_secs();
    match (seconds / 3600, seconds % 3600 / 60, seconds % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, 0) => format!("{m}m"),
        (0, m, s) => format!("{m}m{s}s"),
        (h, 0, 0) => format!("{h}h"),
        (h, m, _) => format!("{h}h{m}m"),
    }
}

impl Context<'_> {
    pub(super) fn run_scripts(
        &self,
        site: &Site<'_>,
        manifest_dir: &Path,
    ) -> Result<Vec<Script>, BuildError> {
        let mut scripts = Vec::new();
        for run in &site.appliance.runs {
            let text = match &run.source {
                crate::manifest::model::RunSource::Inline { script } => script.clone(),
                crate::manifest::model::RunSource::File { path } => {
                    fs_err::read_to_string(manifest_dir.join(&path.value)).map_err(|e| {
                        BuildError::from(site.error(
                            "appliance::unreadable-source",
                            format!("cannot read script: {e}"),
                            path.span,
                        ))
                    })?
                }
            };
            scripts.push(Script {
                span: run.span,
                text,
                timeout: run.timeout,
            });
        }
        Ok(scripts)
    }

    /// Materialize the edited tree, run the scripts in the sandbox, store the result. The
    /// scripts write to an overlay whose upper layer is a tmpfs of bounded size (as apt's
    /// changes are): a script that fills it fails on its `run` node, and the store's disk
    /// never fills. Where overlayfs cannot be used, they run on the copy itself.
    pub(super) fn run_and_store(
        &self,
        site: &Site<'_>,
        editor: TreeEditor,
        scripts: &[Script],
        new: &NewTree,
    ) -> Result<ImageRecord, BuildError> {
        let store = self.store;
        let TreeEditor { tree, staging, .. } = editor;
        // The edited content must be durable objects before it is materialized from them.
        staging.commit()?;
        let work = store.staging()?;
        let root = work.dir().join("root");
        let result = (|| -> Result<ImageRecord, BuildError> {
            let started = super::unix_seconds_now();
            crate::store::export::export_directory(&tree, &store.objects(), &root)?;
            let space = packages_step::script_space();
            let overlay = match space {
                Some(bytes) if crate::packages::overlay::can_overlay(&tree) => {
                    match crate::packages::overlay::Overlay::mount(
                        &root,
                        &work.dir().join("overlay"),
                        crate::packages::overlay::UpperLayer::InMemory(bytes),
                    ) {
                        Ok(overlay) => Some(overlay),
                        Err(error) => {
                            self.reporter
                                .explain(&format!("{error:#}; the scripts write to the copy"));
                            None
                        }
                    }
                }
                _ => None,
            };
            let (view, sandbox) = match &overlay {
                Some(overlay) => (
                    overlay.view(),
                    crate::packages::apt::Sandbox::prepare_entered(
                        &overlay.view(),
                        overlay.merged(),
                        overlay.enter(),
                    )?,
                ),
                None => (root.clone(), crate::packages::apt::Sandbox::prepare(&root)?),
            };
            // Files the scripts leave alone are not read and hashed again (copy only).
            let known = match overlay {
                Some(_) => None,
                None => Some(crate::store::import::KnownContent::record(&root, &tree)?),
            };
            for (index, script) in scripts.iter().enumerate() {
                // /tmp is a fresh tmpfs inside the sandbox: the script waits in the root.
                let script_in_root = view.join(format!("run-{index}.sh"));
                fs_err::write(&script_in_root, &script.text)?;
                let name = format!("/run-{index}.sh");
                let spinner = self.reporter.spinner(&format!("run script {}", index + 1));
                let ran = sandbox.run_limited(&["sh", "-e", &name], &[], Some(script.timeout));
                spinner.finish_and_clear();
                let full = overlay.as_ref().is_some_and(|o| {
                    o.upper_free_bytes()
                        .is_some_and(|free| free < packages_step::FULL_UPPER)
                });
                let _ = fs_err::remove_file(&script_in_root);
                if let Err(error) = ran {
                    if full && let Some(bytes) = space {
                        return Err(site
                            .error(
                                "appliance::run-out-of-space",
                                format!(
                                    "the script filled the {} MiB its changes may take",
                                    bytes >> 20
                                ),
                                script.span,
                            )
                            .label("this script")
                            .help(format!(
                                "a script's changes are kept in memory, up to half of the memory available (or {} bytes); the store's disk is untouched",
                                packages_step::OVERLAY_MEMORY_ENV
                            ))
                            .into());
                    }
                    return Err(script_failure(site, script, error));
                }
            }
            sandbox.finish()?;
            let mut import_staging = store.staging()?;
            let limits = crate::store::import::Limits::default();
            let mut imported = match overlay {
                Some(overlay) => {
                    let unmounted = overlay.unmount()?;
                    crate::store::import::apply_overlay_upper(
                        tree,
                        &unmounted.upper(),
                        &mut import_staging,
                        limits,
                        unmounted.on_disk(),
                    )?
                }
                None => crate::store::import::import_directory_with(
                    &root,
                    &mut import_staging,
                    limits,
                    known.as_ref(),
                    true,
                )?,
            };
            // Dropped before the commit's sync, which would otherwise flush its pages.
            fs_err::remove_dir_all(&root)?;
            // What the scripts wrote gets the time the editor gives its entries
            // (`SOURCE_DATE_EPOCH`, or the build's start), not the moment it was written.
            imported.tree.clamp_mtimes_since(started, self.epoch);
            Ok(store.commit_tree(
                new,
                &imported.tree,
                import_staging,
                imported.dpkg_status.as_deref(),
            )?)
        })();
        work.discard();
        result
    }
}
