//! apt inside a materialized image: a chroot in a private mount and PID namespace, so that
//! nothing it mounts or starts outlives it or touches the host. No services start
//! (`policy-rc.d` denies them), nothing asks questions (noninteractive), Recommends only when
//! asked. Downloaded `.deb`s (checked on use, [`crate::store::deb_cache`]) and the package lists are
//! cached in the store and reused.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

use crate::store::deb_cache;
use crate::store::download_caches::{
    LISTS_DISCARD_PREFIX, LISTS_PARTIAL_PREFIX, LISTS_WHOLE_MARKER,
};

use std::io::{Read as _, Seek as _};

/// Sets up the sandbox inside the new namespaces, then runs the command in the chroot.
/// Mounts live and die with the namespace: a killed build leaves none behind. Arguments:
/// the root, the number of bind mounts, a (host directory, directory in the root) pair for
/// each, then the command.
const SANDBOX_SETUP: &str = r#"set -eu
root=$1; binds=$2; shift 2
while [ "$binds" -gt 0 ]; do
    mount --bind "$1" "$root/$2"
    shift 2; binds=$((binds - 1))
done
mount -t proc proc "$root/proc"
mount -t tmpfs -o mode=0755,nosuid tmpfs "$root/dev"
for node in null zero full random urandom tty; do
    : > "$root/dev/$node"
    mount --bind "/dev/$node" "$root/dev/$node"
done
ln -s /proc/self/fd "$root/dev/fd"
ln -s /proc/self/fd/0 "$root/dev/stdin"
ln -s /proc/self/fd/1 "$root/dev/stdout"
ln -s /proc/self/fd/2 "$root/dev/stderr"
mkdir "$root/dev/pts" "$root/dev/shm"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/tmp"
exec chroot "$root" "$@"
"#;

/// The `policy-rc.d` that keeps maintainer scripts from starting services.
const POLICY_RC_D: &str =
    "#!/bin/sh\n# cargo-appliance: no services start while building\nexit 101\n";

/// Why the sandbox cannot run here, if it cannot.
pub fn sandbox_problem() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some(
            "installing packages and running `run` scripts needs root (a chroot in a private \
             mount namespace with the image's real owners); run the build as root"
                .into(),
        );
    }
    crate::process::host::describe_missing(crate::process::host::Need::Sandbox)
        .map(|missing| format!("the package sandbox needs {missing}, which is not on PATH"))
}

/// A materialized image prepared for work in the sandbox; [`Sandbox::finish`] undoes the
/// preparation so the tree can be imported as it would be on a real machine.
#[derive(Debug)]
pub struct Sandbox {
    /// The image's root as this process reaches it.
    root: PathBuf,
    /// The same root where the sandbox's commands start (inside `enter`'s namespace).
    root_inside: PathBuf,
    /// Command prefix that enters the mount namespace the root lives in (an overlay's).
    enter: Vec<std::ffi::OsString>,
    had_policy_rc_d: bool,
    original_resolv_conf: Option<ResolvConf>,
}

#[derive(Debug)]
enum ResolvConf {
    Missing,
    Symlink(PathBuf),
    File(Vec<u8>),
}

/// The outcome of a command in the sandbox: its combined output, for errors and logs.
#[derive(Debug)]
pub struct Ran {
    pub output: String,
}

/// A bind mount into the sandbox: a host directory at a directory of the image.
#[derive(Debug, Clone)]
pub struct Bind {
    pub host: PathBuf,
    /// Relative to the image's root; made a real directory by [`real_dir`] first.
    pub inside: &'static str,
}

/// Make `relative` a directory of the tree under `root`, creating what is missing, and
/// refuse if any component is a symlink or not a directory: writes and mounts there must
/// stay inside the image (an absolute symlink would lead them onto the host).
pub fn real_dir(root: &Path, relative: &str) -> anyhow::Result<PathBuf> {
    let mut path = root.to_path_buf();
    for component in relative.split('/').filter(|c| !c.is_empty()) {
        path.push(component);
        match fs_err::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => bail!(
                "the image's /{relative} is not a directory (/{component} is a symlink or a file)"
            ),
            Err(_) => fs_err::create_dir(&path)?,
        }
    }
    Ok(path)
}

impl Sandbox {
    /// Prepare the image materialized at `root`.
    pub fn prepare(root: &Path) -> anyhow::Result<Self> {
        Self::prepare_entered(root, root, Vec::new())
    }

    /// Prepare an image that this process reaches at `root` and that commands reach at
    /// `root_inside` once `enter` has taken them into its mount namespace.
    pub fn prepare_entered(
        root: &Path,
        root_inside: &Path,
        enter: Vec<std::ffi::OsString>,
    ) -> anyhow::Result<Self> {
        if let Some(problem) = sandbox_problem() {
            bail!(problem);
        }
        for dir in ["proc", "dev", "tmp", "etc", "usr/sbin"] {
            real_dir(root, dir)?;
        }
        let resolv = root.join("etc/resolv.conf");
        let original_resolv_conf = Some(match fs_err::symlink_metadata(&resolv) {
            Err(_) => ResolvConf::Missing,
            Ok(meta) if meta.file_type().is_symlink() => {
                ResolvConf::Symlink(fs_err::read_link(&resolv)?)
            }
            Ok(_) => ResolvConf::File(fs_err::read(&resolv)?),
        });
        if fs_err::symlink_metadata(&resolv).is_ok() {
            fs_err::remove_file(&resolv)?;
        }
        // Name resolution for apt inside the chroot is the host's.
        let host_resolv = std::fs::read("/etc/resolv.conf").unwrap_or_default();
        fs_err::write(&resolv, host_resolv)?;
        let policy = root.join("usr/sbin/policy-rc.d");
        let had_policy_rc_d = fs_err::symlink_metadata(&policy).is_ok();
        if !had_policy_rc_d {
            fs_err::write(&policy, POLICY_RC_D)?;
            set_mode(&policy, 0o755)?;
        }
        Ok(Self {
            root: root.to_path_buf(),
            root_inside: root_inside.to_path_buf(),
            enter,
            had_policy_rc_d,
            original_resolv_conf,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Run a command inside the image; the error carries the command's output.
    pub fn run(&self, argv: &[&str]) -> anyhow::Result<Ran> {
        self.run_with(argv, &[])
    }

    /// [`Sandbox::run`] with host directories bind-mounted into the image for the command.
    pub fn run_with(&self, argv: &[&str], binds: &[Bind]) -> anyhow::Result<Ran> {
        self.run_limited(argv, binds, None)
    }

    /// [`Sandbox::run_with`] that kills the whole sandbox (its PID namespace) once `limit`
    /// has passed, failing with [`SandboxTimeout`].
    pub fn run_limited(
        &self,
        argv: &[&str],
        binds: &[Bind],
        limit: Option<std::time::Duration>,
    ) -> anyhow::Result<Ran> {
        let log = tempfile::tempfile().context("creating a log file")?;
        // Killed with this process: `unshare --kill-child` then ends the PID namespace.
        let mut command = match self.enter.split_first() {
            Some((program, args)) => {
                let mut command = crate::process::background(program);
                command.args(args).arg("unshare");
                command
            }
            None => crate::process::background("unshare"),
        };
        for bind in binds {
            real_dir(&self.root, bind.inside)?;
        }
        let mut child = command
            .args([
                "--mount",
                "--propagation",
                "private",
                "--pid",
                "--fork",
                "--kill-child",
            ])
            .args(["sh", "-c", SANDBOX_SETUP, "sandbox"])
            .arg(&self.root_inside)
            .arg(binds.len().to_string())
            .args(
                binds
                    .iter()
                    .flat_map(|b| [b.host.as_os_str(), b.inside.as_ref()]),
            )
            .args(argv)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("DEBCONF_NONINTERACTIVE_SEEN", "true")
            .env("LC_ALL", "C.UTF-8")
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log.try_clone()?)
            .spawn()
            .context("running `unshare` (util-linux)")?;
        let watched = crate::process::interrupt::watch(&child);
        let status = wait_until(&mut child, limit)?;
        drop(watched);
        crate::process::interrupt::check()?;
        let mut log = log;
        let mut output = Vec::new();
        log.seek(std::io::SeekFrom::Start(0))?;
        log.read_to_end(&mut output)?;
        let output = String::from_utf8_lossy(&output).into_owned();
        let Some(status) = status else {
            return Err(SandboxTimeout {
                command: argv.join(" "),
                limit: limit.unwrap_or_default(),
                output,
            }
            .into());
        };
        if status.success() {
            Ok(Ran { output })
        } else {
            Err(SandboxFailure {
                command: argv.join(" "),
                status: status.to_string(),
                output,
            }
            .into())
        }
    }

    /// Undo what `prepare` changed.
    pub fn finish(mut self) -> anyhow::Result<()> {
        let policy = self.root.join("usr/sbin/policy-rc.d");
        if !self.had_policy_rc_d && fs_err::symlink_metadata(&policy).is_ok() {
            fs_err::remove_file(&policy)?;
        }
        let resolv = self.root.join("etc/resolv.conf");
        if fs_err::symlink_metadata(&resolv).is_ok() {
            fs_err::remove_file(&resolv)?;
        }
        match self.original_resolv_conf.take() {
            Some(ResolvConf::Symlink(target)) => std::os::unix::fs::symlink(target, &resolv)?,
            Some(ResolvConf::File(data)) => fs_err::write(&resolv, data)?,
            Some(ResolvConf::Missing) | None => {}
        }
        Ok(())
    }
}

/// Wait for `child`; past `limit`, SIGKILL it and return `None`. The child is `unshare
/// --kill-child` (through setpriv and nsenter, which exec it): its death takes the PID
/// namespace, and every process of the script in it, along.
fn wait_until(
    child: &mut std::process::Child,
    limit: Option<std::time::Duration>,
) -> anyhow::Result<Option<std::process::ExitStatus>> {
    let Some(limit) = limit else {
        return Ok(Some(child.wait()?));
    };
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if std::time::Instant::now() >= deadline {
            child.kill()?;
            child.wait()?;
            return Ok(None);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A command in the sandbox ran past its limit and was killed with its namespace.
#[derive(Debug, thiserror::Error)]
#[error("`{command}` ran longer than {}s inside the image and was killed", limit.as_secs())]
pub struct SandboxTimeout {
    pub command: String,
    pub limit: std::time::Duration,
    pub output: String,
}

impl SandboxTimeout {
    /// The last lines of the output, for a diagnostic.
    pub fn tail(&self, lines: usize) -> String {
        last_lines(&self.output, lines)
    }
}

fn last_lines(output: &str, lines: usize) -> String {
    let all: Vec<&str> = output.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A command in the sandbox failed; `output` is what it printed.
#[derive(Debug, thiserror::Error)]
#[error("`{command}` failed inside the image ({status})")]
pub struct SandboxFailure {
    pub command: String,
    pub status: String,
    pub output: String,
}

impl SandboxFailure {
    /// The last lines of the output, for a diagnostic.
    pub fn tail(&self, lines: usize) -> String {
        last_lines(&self.output, lines)
    }
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs_err::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// What the package step asks of apt.
#[derive(Debug, Clone, Default)]
pub struct AptRequest {
    /// Package names, optionally `name=version` (pinned by the lock file).
    pub install: Vec<String>,
    pub remove: Vec<String>,
    pub recommends: bool,
    pub offline: bool,
}

/// Caches of the store the package step reuses: downloaded `.deb`s and package lists.
#[derive(Debug, Clone)]
pub struct AptCache {
    pub debs: PathBuf,
    pub lists: PathBuf,
}

/// How long fetched package lists are reused before `apt-get update` runs again.
const LISTS_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(6 * 3600);

/// Why a package could not be installed, when apt's index says it does not exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownPackage {
    pub name: String,
    pub did_you_mean: Option<String>,
}

/// Install and remove packages in the sandbox. Unknown package names are reported before
/// apt runs (`Err` of the outer result is an apt or setup failure).
///
/// apt's lists and archives are directories of `scratch` (on the store's filesystem, so the
/// caches are hard-linked in and out) bind-mounted over the image's: the image's own stay as
/// they were, and nothing has to be cleaned out of it afterwards.
pub fn install(
    sandbox: &Sandbox,
    cache: &AptCache,
    scratch: &Path,
    request: &AptRequest,
    mut progress: impl FnMut(&str),
    damaged_package: impl FnMut(&str),
) -> anyhow::Result<Result<String, Vec<UnknownPackage>>> {
    let root = sandbox.root();
    let lists = scratch.join("apt-lists");
    let archives = scratch.join("apt-archives");
    fs_err::create_dir_all(lists.join("partial"))?;
    fs_err::create_dir_all(archives.join("partial"))?;
    let binds = [
        Bind {
            host: lists.clone(),
            inside: "var/lib/apt/lists",
        },
        Bind {
            host: archives.clone(),
            inside: "var/cache/apt/archives",
        },
    ];
    let sources_key = sources_digest(root)?;
    let cached_lists = cache.lists.join(&sources_key);
    let fresh = fs_err::metadata(cached_lists.join(LISTS_WHOLE_MARKER))
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age < LISTS_MAX_AGE);
    let mut log = String::new();
    // Written and removed from here, not from inside the sandbox: a symlink there must not
    // lead those writes out of the image.
    let apt_cache_dir = real_dir(root, "var/cache/apt")?;
    let source_cache = apt_cache_dir.join("srcpkgcache.bin");
    let cached_source_cache = cached_lists.join(SOURCE_CACHE);
    // `.fetched` is written into the copy before it is renamed into place: without it the
    // directory is not a whole set of lists.
    let lists_from_cache =
        cached_lists.join(LISTS_WHOLE_MARKER).is_file() && (fresh || request.offline);
    if lists_from_cache {
        // Linked, not copied: `apt-get install` only reads them, and the scratch directory
        // holding the links is discarded.
        copy_dir_files(&cached_lists, &lists, true)?;
        // apt's parsed form of the lists, valid while they are the same files: saves apt
        // parsing tens of MiB of indexes on every run.
        if cached_source_cache.is_file() {
            remove_unless_regular_file(&source_cache)?;
            fs_err::copy(&cached_source_cache, &source_cache)?;
        }
    } else if request.offline {
        bail!(
            "--offline: the store has no package lists for this image's apt sources; build once online"
        );
    } else {
        progress("apt-get update");
        log += &sandbox
            .run_with(&["apt-get", "-q", "update"], &binds)?
            .output;
        save_lists(&lists, &cached_lists)?;
    }
    let index = deb_cache::PackageIndex::read(&lists)?;
    let known = &index.names;
    let unknown: Vec<UnknownPackage> = request
        .install
        .iter()
        .map(|spec| spec.split('=').next().unwrap_or(spec))
        .chain(request.remove.iter().map(String::as_str))
        .filter(|name| !known.contains(*name))
        .map(|name| UnknownPackage {
            name: name.to_owned(),
            did_you_mean: crate::diagnostics::did_you_mean(name, known.iter().map(String::as_str))
                .map(str::to_owned),
        })
        .collect();
    if !unknown.is_empty() {
        return Ok(Err(unknown));
    }
    deb_cache::offer(&cache.debs, &archives, &index, damaged_package)?;
    let mut apt = vec![
        "apt-get",
        "-q",
        "-y",
        "-o",
        "Dpkg::Options::=--force-confdef",
        "-o",
        "Dpkg::Options::=--force-confold",
        "-o",
        "APT::Keep-Downloaded-Packages=true",
        // dpkg fsyncs every unpacked file; the tree is imported (and made durable) by the
        // store afterwards, and a crash discards it anyway. mmdebstrap does the same.
        "-o",
        "Dpkg::Options::=--force-unsafe-io",
    ];
    if request.offline {
        apt.push("--no-download");
    }
    apt.push(if request.recommends {
        "--install-recommends"
    } else {
        "--no-install-recommends"
    });
    apt.push("install");
    apt.extend(request.install.iter().map(String::as_str));
    // `apt-get install pkg-` removes pkg in the same transaction.
    let removals: Vec<String> = request.remove.iter().map(|p| format!("{p}-")).collect();
    apt.extend(removals.iter().map(String::as_str));
    progress(&format!(
        "apt-get install ({} to install, {} to remove)",
        request.install.len(),
        request.remove.len()
    ));
    let ran = sandbox.run_with(&apt, &binds);
    // Keep what was downloaded even when the install failed: the next try reuses it.
    deb_cache::keep(&archives, &cache.debs, &index)?;
    log += &ran?.output;
    // Checked again: apt's maintainer scripts ran in between.
    let apt_cache_dir = real_dir(root, "var/cache/apt")?;
    remove_unless_regular_file(&source_cache)?;
    if lists_from_cache && !cached_source_cache.exists() && source_cache.is_file() {
        let temp = cached_lists.join(format!(".{SOURCE_CACHE}.{}", std::process::id()));
        fs_err::copy(&source_cache, &temp)?;
        fs_err::rename(&temp, &cached_source_cache)?;
    }
    for generated in ["pkgcache.bin", "srcpkgcache.bin"] {
        let path = apt_cache_dir.join(generated);
        if fs_err::symlink_metadata(&path).is_ok() {
            fs_err::remove_file(path)?;
        }
    }
    Ok(Ok(log))
}

/// Remove `path` if it is anything but a regular file (a symlink is removed, not followed).
fn remove_unless_regular_file(path: &Path) -> anyhow::Result<()> {
    match fs_err::symlink_metadata(path) {
        Ok(meta) if !meta.is_file() => {
            if meta.is_dir() {
                bail!("{} is a directory", path.display());
            }
            fs_err::remove_file(path)?;
        }
        _ => {}
    }
    Ok(())
}

/// A digest of the image's apt sources: package lists are cached per set of sources.
fn sources_digest(root: &Path) -> anyhow::Result<String> {
    use sha2::{Digest as _, Sha256};
    let mut hasher = Sha256::new();
    let mut files = vec![root.join("etc/apt/sources.list")];
    if let Ok(entries) = std::fs::read_dir(root.join("etc/apt/sources.list.d")) {
        let mut more: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    for file in files {
        if let Ok(data) = std::fs::read(&file) {
            hasher.update(
                file.file_name()
                    .map(|n| n.as_encoded_bytes())
                    .unwrap_or_default(),
            );
            hasher.update(b"\0");
            hasher.update(&data);
            hasher.update(b"\0");
        }
    }
    Ok(crate::store::tree::hex(&hasher.finalize()))
}

fn save_lists(lists: &Path, cached: &Path) -> anyhow::Result<()> {
    let parent = cached.parent().context("lists cache has no parent")?;
    fs_err::create_dir_all(parent)?;
    let temp = tempfile::Builder::new()
        .prefix(LISTS_PARTIAL_PREFIX)
        .tempdir_in(parent)?;
    copy_dir_files(lists, temp.path(), false)?;
    fs_err::write(temp.path().join(LISTS_WHOLE_MARKER), b"")?;
    let temp = temp.keep();
    // The old lists are renamed out of the way before they are deleted: a process killed
    // while deleting them in place left a part of them under the name builds use.
    let aside = parent.join(format!(
        "{LISTS_DISCARD_PREFIX}{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    let had_old = match std::fs::rename(cached, &aside) {
        Ok(()) => true,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => false,
        Err(error) => {
            return Err(
                anyhow::Error::new(error).context(format!("replacing {}", cached.display()))
            );
        }
    };
    fs_err::rename(&temp, cached)?;
    crate::test_hooks::point("apt-lists-renamed");
    if had_old {
        fs_err::remove_dir_all(&aside)?;
    }
    Ok(())
}

/// apt's `srcpkgcache.bin` for a set of lists, kept beside them in the cache.
const SOURCE_CACHE: &str = ".srcpkgcache.bin";

/// Index files, not apt's lock or the cache's own files (`.fetched`, the source cache).
fn is_list_file(name: &std::ffi::OsStr) -> bool {
    name != "lock" && !name.as_encoded_bytes().starts_with(b".")
}

/// Copy (or hard-link, falling back to a copy) the list files of one directory into another
/// (no recursion: apt's lists are flat).
fn copy_dir_files(from: &Path, to: &Path, link: bool) -> anyhow::Result<()> {
    fs_err::create_dir_all(to)?;
    for entry in fs_err::read_dir(from)? {
        let entry = entry?;
        let name = entry.file_name();
        if entry.file_type()?.is_file() && is_list_file(&name) {
            let target = to.join(&name);
            if !link || std::fs::hard_link(entry.path(), &target).is_err() {
                fs_err::copy(entry.path(), &target)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_dir_creates_what_is_missing_and_refuses_symlinks_out_of_the_image() {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        fs_err::create_dir_all(root.join("var")).expect("mkdir");
        fs_err::create_dir_all(&outside).expect("mkdir");
        let made = real_dir(&root, "var/cache/apt").expect("created");
        assert!(made.is_dir() && made.starts_with(&root));

        // An absolute symlink would lead writes and mounts onto the host.
        std::os::unix::fs::symlink(&outside, root.join("usr")).expect("symlink");
        let error = real_dir(&root, "usr/sbin").expect_err("symlinked /usr");
        assert!(error.to_string().contains("/usr/sbin"), "{error}");
        assert!(!outside.join("sbin").exists(), "nothing created outside");
        fs_err::write(root.join("etc"), "a file").expect("write");
        assert!(real_dir(&root, "etc").is_err());
    }

    #[test]
    fn a_symlinked_source_cache_is_removed_not_followed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let outside = dir.path().join("host-file");
        fs_err::write(&outside, "host").expect("write");
        let link = dir.path().join("srcpkgcache.bin");
        std::os::unix::fs::symlink(&outside, &link).expect("symlink");
        remove_unless_regular_file(&link).expect("removed");
        assert!(fs_err::symlink_metadata(&link).is_err());
        assert_eq!(fs_err::read_to_string(&outside).expect("read"), "host");
        fs_err::write(&link, "regular").expect("write");
        remove_unless_regular_file(&link).expect("kept");
        assert!(link.is_file());
    }

    #[test]
    fn saved_lists_replace_the_old_ones_whole_with_their_marker() {
        let dir = tempfile::tempdir().expect("temp dir");
        let cache = dir.path().join("apt-lists");
        let cached = cache.join("sources");
        fs_err::create_dir_all(&cached).expect("mkdir");
        fs_err::write(cached.join("old_Packages"), "Package: old\n").expect("write");
        fs_err::write(cached.join(LISTS_WHOLE_MARKER), "").expect("write");
        let fetched = dir.path().join("fetched");
        fs_err::create_dir_all(&fetched).expect("mkdir");
        fs_err::write(fetched.join("new_Packages"), "Package: new\n").expect("write");
        fs_err::write(fetched.join("lock"), "").expect("write");

        save_lists(&fetched, &cached).expect("saved");
        let mut names: Vec<String> = fs_err::read_dir(&cached)
            .expect("read")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [LISTS_WHOLE_MARKER, "new_Packages"]);
        let left: Vec<_> = fs_err::read_dir(&cache)
            .expect("read")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(left, ["sources"], "nothing set aside or partial is left");
    }
}
