//! The vocabulary of change: a typed change (`package-added:nginx`) and the one table of
//! change kinds that `diff` emits, the history records and suggestions phrase and anchor.
//! `schema/reference.md` lists the table (generated from [`CHANGE_KINDS`]), so what a
//! diff, a history file or a suggestion key says is documented in one place.

use serde::{Deserialize, Serialize};

/// A typed change, `kind:subject` when printed (`package-added:nginx`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Change {
    pub kind: String,
    pub subject: String,
}

impl Change {
    pub fn new(kind: &str, subject: impl Into<String>) -> Self {
        Self {
            kind: kind.to_owned(),
            subject: subject.into(),
        }
    }

    pub fn key(&self) -> String {
        format!("{}:{}", self.kind, self.subject)
    }

    /// This change's kind in [`CHANGE_KINDS`], if it is one.
    pub fn kind(&self) -> Option<&'static ChangeKind> {
        change_kind(&self.kind)
    }
}

/// Whether the history learns a kind of change, and so whether it can be suggested.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learnt {
    /// Always a choice someone made.
    Always,
    /// A choice unless the build writes it itself ([`PLUMBING_PATHS`], [`PLUMBING_DIRS`],
    /// [`PLUMBING_UNITS`]).
    UnlessPlumbing,
    /// Never: the value is unique to one appliance (a hostname suggested as a literal would
    /// tell the next appliance to take another one's name), or it is the undoing of a choice.
    Never,
}

/// The manifest node a suggestion of a kind is attached to (the first such node, else the
/// appliance's name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anchor {
    Packages,
    Remove,
    Users,
    Groups,
    Services,
    Forwards,
    Copies,
    Appliance,
}

/// One kind of change.
#[derive(Debug)]
pub struct ChangeKind {
    pub name: &'static str,
    pub description: &'static str,
    /// The verb of a suggestion's evidence: "41 of 312 … also *install* ca-certificates".
    pub verb: &'static str,
    /// The suggestion's message, `{}` standing for the subject.
    pub suggestion: &'static str,
    pub anchor: Anchor,
    pub learnt: Learnt,
}

impl ChangeKind {
    /// The suggestion's message for `subject`.
    pub fn suggestion_for(&self, subject: &str) -> String {
        self.suggestion.replace("{}", subject)
    }
}

/// Every kind of change `diff` emits or the shipped corpus holds.
pub static CHANGE_KINDS: &[ChangeKind] = &[
    ChangeKind {
        name: "package-added",
        description: "a Debian package installed in the child that the parent lacks",
        verb: "install",
        suggestion: "consider installing `{}`",
        anchor: Anchor::Packages,
        learnt: Learnt::Always,
    },
    ChangeKind {
        name: "package-removed",
        description: "a package of the parent that the child no longer has",
        verb: "remove",
        suggestion: "consider removing `{}`",
        anchor: Anchor::Remove,
        learnt: Learnt::Always,
    },
    ChangeKind {
        name: "package-upgraded",
        description: "a package at another version than the parent's",
        verb: "upgrade",
        suggestion: "consider upgrading `{}`",
        anchor: Anchor::Packages,
        learnt: Learnt::Always,
    },
    ChangeKind {
        name: "config-changed",
        description: "a file under /etc that differs from the parent's (for conffiles and \
                      ucf-managed files: from the package's md5sum)",
        verb: "change",
        suggestion: "consider changing `{}`",
        anchor: Anchor::Copies,
        learnt: Learnt::UnlessPlumbing,
    },
    ChangeKind {
        name: "file-added",
        description: "a file that is new in the child, by path",
        verb: "provide",
        suggestion: "consider providing `{}`",
        anchor: Anchor::Copies,
        learnt: Learnt::UnlessPlumbing,
    },
    ChangeKind {
        name: "file-changed",
        description: "a file outside /etc whose content or metadata differs from the parent's",
        verb: "change",
        suggestion: "consider changing `{}`",
        anchor: Anchor::Copies,
        learnt: Learnt::UnlessPlumbing,
    },
    ChangeKind {
        name: "file-removed",
        description: "a file of the parent that the child no longer has",
        verb: "remove",
        suggestion: "consider removing `{}`",
        anchor: Anchor::Copies,
        learnt: Learnt::UnlessPlumbing,
    },
    ChangeKind {
        name: "service-enabled",
        description: "a systemd unit enabled (a .wants link added)",
        verb: "enable",
        suggestion: "consider enabling `{}`",
        anchor: Anchor::Services,
        learnt: Learnt::UnlessPlumbing,
    },
    ChangeKind {
        name: "service-disabled",
        description: "a systemd unit of the parent disabled (its .wants link removed)",
        verb: "disable",
        suggestion: "consider disabling `{}`",
        anchor: Anchor::Services,
        learnt: Learnt::UnlessPlumbing,
    },
    ChangeKind {
        name: "user-added",
        description: "a user account added (/etc/passwd)",
        verb: "add the user",
        suggestion: "consider adding a user `{}`",
        anchor: Anchor::Users,
        learnt: Learnt::Always,
    },
    ChangeKind {
        name: "user-removed",
        description: "a user account of the parent removed",
        verb: "remove the user",
        suggestion: "consider removing the user `{}`",
        anchor: Anchor::Users,
        learnt: Learnt::Always,
    },
    ChangeKind {
        name: "group-added",
        description: "a group added (/etc/group)",
        verb: "add the group",
        suggestion: "consider adding a group `{}`",
        anchor: Anchor::Groups,
        learnt: Learnt::Always,
    },
    ChangeKind {
        name: "group-removed",
        description: "a group of the parent removed",
        verb: "remove the group",
        suggestion: "consider removing the group `{}`",
        anchor: Anchor::Groups,
        learnt: Learnt::Always,
    },
    ChangeKind {
        name: "port-exposed",
        description: "a port the image serves (the corpus' EXPOSE; a manifest's forwards and \
                      OCI exposed ports)",
        verb: "expose",
        suggestion: "consider exposing port {}",
        anchor: Anchor::Forwards,
        learnt: Learnt::Always,
    },
    ChangeKind {
        name: "hostname",
        description: "the host name set (/etc/hostname); unique per appliance, never learnt",
        verb: "set the hostname",
        suggestion: "consider the hostname `{}`",
        anchor: Anchor::Appliance,
        learnt: Learnt::Never,
    },
    ChangeKind {
        name: "timezone",
        description: "the time zone set (/etc/localtime); a site's choice, never learnt",
        verb: "set the time zone",
        suggestion: "consider the time zone `{}`",
        anchor: Anchor::Appliance,
        learnt: Learnt::Never,
    },
    ChangeKind {
        name: "locale",
        description: "the default locale set (`LANG` in /etc/default/locale); never learnt",
        verb: "set the locale",
        suggestion: "consider the locale `{}`",
        anchor: Anchor::Appliance,
        learnt: Learnt::Never,
    },
    ChangeKind {
        name: "kernel-cmdline",
        description: "the kernel command line set (/etc/kernel/cmdline); unique per \
                      appliance, never learnt",
        verb: "boot with",
        suggestion: "consider the kernel command line `{}`",
        anchor: Anchor::Appliance,
        learnt: Learnt::Never,
    },
];

/// The kind named `name`.
pub fn change_kind(name: &str) -> Option<&'static ChangeKind> {
    CHANGE_KINDS.iter().find(|kind| kind.name == name)
}

/// Files the build writes itself for every appliance of a kind: hostnames, networking for
/// disk outputs, boot, machine identity, the SSH host keys it removes from disk images (and
/// the unit that makes them at first boot), and the account databases (whose entries are
/// `user-added`/`group-added` already). A change to one of them is plumbing, not a choice.
pub const PLUMBING_PATHS: &[&str] = &[
    "/etc/hosts",
    "/etc/hostname",
    "/etc/machine-id",
    "/var/lib/dbus/machine-id",
    "/etc/kernel/cmdline",
    "/etc/systemd/network/80-appliance-dhcp.network",
    "/etc/systemd/system/cargo-appliance-ssh-host-keys.service",
    "/etc/ssh/ssh_host_rsa_key",
    "/etc/ssh/ssh_host_rsa_key.pub",
    "/etc/ssh/ssh_host_ecdsa_key",
    "/etc/ssh/ssh_host_ecdsa_key.pub",
    "/etc/ssh/ssh_host_ed25519_key",
    "/etc/ssh/ssh_host_ed25519_key.pub",
    "/etc/ssh/ssh_host_dsa_key",
    "/etc/ssh/ssh_host_dsa_key.pub",
    "/etc/passwd",
    "/etc/passwd-",
    "/etc/group",
    "/etc/group-",
    "/etc/shadow",
    "/etc/shadow-",
    "/etc/gshadow",
    "/etc/gshadow-",
    "/etc/subuid",
    "/etc/subgid",
];

/// Directories whose content the build or the boot packages write (the ESP, kernels).
pub const PLUMBING_DIRS: &[&str] = &["/boot/", "/efi/"];

/// Units the build enables for disk outputs (systemd-networkd answers QEMU's DHCP, the host
/// keys' first-boot unit), with the aliases and companions `systemctl enable` links for them.
pub const PLUMBING_UNITS: &[&str] = &[
    "systemd-networkd.service",
    "systemd-networkd.socket",
    "systemd-networkd-wait-online.service",
    "systemd-network-generator.service",
    "dbus-org.freedesktop.network1.service",
    "cargo-appliance-ssh-host-keys.service",
];

/// What a running system writes by itself, which `cargo appliance capture` leaves out of a
/// test drive's changes: (glob over image paths, why). Globs as `capture { ignore }` takes
/// them (`*` within a component, `**` across). The reference lists them.
pub const CAPTURE_NOISE: &[(&str, &str)] = &[
    ("/var/log/**", "logs and the journal"),
    ("/var/cache/**", "caches (apt's, man-db's, …)"),
    ("/var/tmp/**", "temporary files"),
    ("/tmp/**", "temporary files"),
    ("/run/**", "runtime state"),
    (
        "/var/lib/systemd/**",
        "systemd's state: random seed, timers, clock",
    ),
    ("/var/lib/dhcp/**", "DHCP leases"),
    ("/var/lib/private/**", "state of DynamicUser= services"),
    ("/var/lib/sudo/**", "sudo's lecture and timestamps"),
    ("/var/lib/logrotate/**", "logrotate's state"),
    (
        "/var/lib/dpkg/**",
        "dpkg's database (its packages are captured from it)",
    ),
    (
        "/var/lib/apt/**",
        "apt's state (manual installs are captured from it)",
    ),
    ("/var/lib/ucf/**", "ucf's checksums"),
    ("/var/lib/man-db/**", "man-db's state"),
    ("/var/backups/**", "daily backups of the account databases"),
    (
        "/etc/machine-id",
        "the machine's identity, made at first boot",
    ),
    (
        "/var/lib/dbus/machine-id",
        "the machine's identity, made at first boot",
    ),
    ("/etc/ssh/ssh_host_*", "SSH host keys, made at first boot"),
    ("/etc/fstab", "written by the disk output"),
    ("/etc/ld.so.cache", "made by ldconfig"),
    ("/etc/adjtime", "the clock's drift"),
    ("/etc/.pwd.lock", "the account databases' lock"),
    ("/root/.ssh/authorized_keys", "the test drive's own key"),
    ("/**/.bash_history", "shell history"),
    ("/**/.lesshst", "less's history"),
    ("/**/.viminfo", "vim's history"),
    ("/**/.wget-hsts", "wget's HSTS cache"),
    ("/**/.cache/**", "per-user caches"),
    ("/**/.local/state/**", "per-user state"),
    ("/**/.sudo_as_admin_successful", "sudo's first-use marker"),
];

/// Whether a change is a choice someone made, worth learning from and suggesting: its kind
/// is learnt ([`Learnt`]) and it is not the build's own plumbing. A kind not in the table
/// (from an imported history of another tool) counts as a choice.
pub fn is_choice(change: &Change) -> bool {
    let Some(kind) = change.kind() else {
        return true;
    };
    match kind.learnt {
        Learnt::Always => true,
        Learnt::Never => false,
        Learnt::UnlessPlumbing => {
            let subject = change.subject.as_str();
            match kind.anchor {
                Anchor::Services => !PLUMBING_UNITS.contains(&subject),
                _ => {
                    !PLUMBING_PATHS.contains(&subject)
                        && !PLUMBING_DIRS.iter().any(|dir| subject.starts_with(dir))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_names_are_unique_and_messages_name_the_subject() {
        let mut names: Vec<&str> = CHANGE_KINDS.iter().map(|kind| kind.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), CHANGE_KINDS.len());
        for kind in CHANGE_KINDS {
            assert!(kind.suggestion.contains("{}"), "{}", kind.name);
        }
    }

    #[test]
    fn plumbing_and_unique_values_are_not_choices() {
        for (kind, subject, choice) in [
            ("package-added", "nginx", true),
            ("hostname", "web", false),
            ("kernel-cmdline", "console=ttyS0", false),
            ("config-changed", "/etc/hosts", false),
            ("config-changed", "/etc/nginx/nginx.conf", true),
            ("file-added", "/boot/vmlinuz-6.1.0-10-amd64", false),
            (
                "service-enabled",
                "dbus-org.freedesktop.network1.service",
                false,
            ),
            ("service-enabled", "nginx.service", true),
            ("user-removed", "games", true),
            ("some-other-tool", "x", true),
        ] {
            assert_eq!(
                is_choice(&Change::new(kind, subject)),
                choice,
                "{kind}:{subject}"
            );
        }
    }
}
