//! The one table of programs cargo-appliance and its tests run on the host, with the Debian
//! package that provides each. Everything that asks "is this installed?" reads it: the build's
//! check before any work, `base create`, `run`, `.ci/install-deps` (which installs the
//! packages and then checks the programs, parsing the `HostProgram::new` lines below) and a
//! test that finds every program the source starts and fails when one is not listed here.

use super::available;

/// What a program is needed for; a build asks only for what its appliances use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// The package step and `run` scripts: a chroot in private namespaces.
    Sandbox,
    /// `base create`: mmdebstrap.
    BaseCreate,
    /// `base create` without root (unshare mode).
    RootlessBaseCreate,
    /// Disk outputs (`raw`, `qcow2`) and `image export … .raw`.
    Disk,
    /// The `qcow2` output.
    Qcow2,
    /// `cargo appliance run`.
    Boot,
    /// `cargo appliance ssh` and the test drive's key.
    Ssh,
    /// `push` and `pull`: the OCI distribution protocol.
    Registry,
    /// The test suite only: independent readers of what the tool writes.
    Tests,
}

#[derive(Debug, Clone, Copy)]
pub struct HostProgram {
    pub program: &'static str,
    /// The Debian package that provides it.
    pub package: &'static str,
    pub needed_for: &'static [Need],
}

impl HostProgram {
    const fn new(
        program: &'static str,
        package: &'static str,
        needed_for: &'static [Need],
    ) -> Self {
        Self {
            program,
            package,
            needed_for,
        }
    }
}

// One entry per line, `HostProgram::new("program", "package", …)`: `.ci/install-deps` and
// `.ci/check-host-programs` read these lines.
#[rustfmt::skip]
pub const HOST_PROGRAMS: &[HostProgram] = &[
    HostProgram::new("setpriv", "util-linux", &[Need::Sandbox, Need::Disk, Need::Qcow2, Need::Boot, Need::BaseCreate]),
    HostProgram::new("unshare", "util-linux", &[Need::Sandbox, Need::Tests]),
    HostProgram::new("apt-get", "apt", &[Need::Tests]),
    HostProgram::new("nsenter", "util-linux", &[Need::Sandbox]),
    HostProgram::new("chroot", "coreutils", &[Need::Sandbox, Need::Tests]),
    HostProgram::new("mount", "mount", &[Need::Sandbox, Need::Tests]),
    HostProgram::new("umount", "mount", &[Need::Sandbox]),
    HostProgram::new("mmdebstrap", "mmdebstrap", &[Need::BaseCreate, Need::Tests]),
    HostProgram::new("newuidmap", "uidmap", &[Need::RootlessBaseCreate]),
    HostProgram::new("mke2fs", "e2fsprogs", &[Need::Disk]),
    HostProgram::new("debugfs", "e2fsprogs", &[Need::Disk, Need::Tests]),
    HostProgram::new("e2fsck", "e2fsprogs", &[Need::Tests]),
    HostProgram::new("mkfs.vfat", "dosfstools", &[Need::Disk]),
    HostProgram::new("mmd", "mtools", &[Need::Disk]),
    HostProgram::new("mcopy", "mtools", &[Need::Disk]),
    HostProgram::new("sfdisk", "fdisk", &[Need::Disk, Need::Tests]),
    HostProgram::new("cp", "coreutils", &[Need::Disk, Need::Tests]),
    HostProgram::new("qemu-img", "qemu-utils", &[Need::Qcow2, Need::Tests]),
    HostProgram::new("qemu-system-x86_64", "qemu-system-x86", &[Need::Boot]),
    HostProgram::new("ssh", "openssh-client", &[Need::Ssh, Need::Tests]),
    HostProgram::new("ssh-keygen", "openssh-client", &[Need::Ssh]),
    HostProgram::new("skopeo", "skopeo", &[Need::Registry, Need::Tests]),
    HostProgram::new("docker-registry", "docker-registry", &[Need::Tests]),
    HostProgram::new("openssl", "openssl", &[Need::Tests]),
    HostProgram::new("umoci", "umoci", &[Need::Tests]),
    HostProgram::new("python3", "python3", &[Need::Tests]),
    HostProgram::new("tar", "tar", &[Need::Tests]),
    HostProgram::new("find", "findutils", &[Need::Tests]),
    HostProgram::new("dd", "coreutils", &[Need::Tests]),
    HostProgram::new("sha256sum", "coreutils", &[Need::Tests]),
    HostProgram::new("id", "coreutils", &[Need::Tests]),
    HostProgram::new("kill", "procps", &[Need::Tests]),
    HostProgram::new("pgrep", "procps", &[Need::Tests]),
    HostProgram::new("head", "coreutils", &[Need::Tests]),
    HostProgram::new("du", "coreutils", &[Need::Tests]),
];

/// The programs `need` wants that are not on PATH.
pub fn missing(need: Need) -> Vec<&'static HostProgram> {
    HOST_PROGRAMS
        .iter()
        .filter(|entry| entry.needed_for.contains(&need))
        .filter(|entry| !available(entry.program))
        .collect()
}

/// "`qemu-img` (Debian package qemu-utils)" for each missing program, joined; `None` when
/// nothing is missing.
pub fn describe_missing(need: Need) -> Option<String> {
    let missing = missing(need);
    if missing.is_empty() {
        return None;
    }
    Some(
        missing
            .iter()
            .map(|entry| format!("`{}` (Debian package {})", entry.program, entry.package))
            .collect::<Vec<_>>()
            .join(", "),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every program the source starts by a literal name is in the table, so the build's
    /// check and `.ci/install-deps` cannot miss one.
    #[test]
    fn every_program_the_source_starts_is_listed() {
        let roots = [
            concat!(env!("CARGO_MANIFEST_DIR"), "/src"),
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests"),
            concat!(env!("CARGO_MANIFEST_DIR"), "/../cargo-appliance/tests"),
        ];
        let mut started = std::collections::BTreeSet::new();
        let mut stack: Vec<std::path::PathBuf> = roots.iter().map(Into::into).collect();
        while let Some(path) = stack.pop() {
            if path.is_dir() {
                for entry in std::fs::read_dir(&path).expect("read_dir") {
                    stack.push(entry.expect("entry").path());
                }
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("read");
            for opener in [
                "Cmd::new(\"",
                "Command::new(\"",
                "available(\"",
                "dies_with_us(\"",
                "background(\"",
            ] {
                for (at, _) in text.match_indices(opener) {
                    let rest = &text[at + opener.len()..];
                    if let Some(end) = rest.find('"') {
                        started.insert(rest[..end].to_owned());
                    }
                }
            }
        }
        // Not host programs: this test's own stand-ins for a missing program, and shells that
        // every Debian system has (sh is essential; bash is essential too).
        let exempt = [
            "sh",
            "bash",
            "no-such-program-here",
            "true",
            "false",
            "sleep",
        ];
        let unlisted: Vec<&String> = started
            .iter()
            .filter(|program| !exempt.contains(&program.as_str()))
            .filter(|program| !HOST_PROGRAMS.iter().any(|entry| entry.program == *program))
            .collect();
        assert!(
            started.len() > 10,
            "the scan found too few programs: {started:?}"
        );
        assert!(unlisted.is_empty(), "not in HOST_PROGRAMS: {unlisted:?}");
    }
}
