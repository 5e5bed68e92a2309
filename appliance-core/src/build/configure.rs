//! Configuration as edits of the stored tree: groups and users first (so owners by name
//! resolve), then files, binaries and SSH keys, then services, hostname, time zone, locale
//! and the rest; boot configuration for disk outputs.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context as _;

use super::edit::TreeEditor;
use super::files::{self, CopyKind};
use super::{BuildError, Site, accounts, cargo, is_bootable, systemd};
use crate::manifest::model::Spanned;

/// Apply files, binaries and configuration to the tree, in the order the design fixes:
/// groups and users first (so owners by name resolve), then files, then services and the rest.
pub(super) fn apply(
    editor: &mut TreeEditor,
    site: &Site<'_>,
    copies: &[files::CopyItem],
    binaries: &[(String, u32, cargo::Artifact)],
    authorized_keys: &BTreeMap<String, String>,
) -> Result<(), BuildError> {
    let appliance = site.appliance;
    let mut accounts = accounts::Accounts::read(editor)?;
    for group in &appliance.groups {
        accounts
            .add_group(&group.name.value, group.gid, group.system)
            .map_err(|e| site.error("appliance::group-failed", format!("{e:#}"), group.span))?;
    }
    let mut homes = Vec::new();
    let mut logins = Vec::new();
    for user in &appliance.users {
        let added = accounts
            .add_user(&accounts::NewUser {
                name: &user.name.value,
                system: user.system,
                uid: user.uid,
                group: user.group.as_deref(),
                groups: &user.groups,
                home: user.home.as_deref(),
                shell: user.shell.as_deref(),
                comment: user.comment.as_deref(),
                password_hash: user.password_hash.as_deref(),
            })
            .map_err(|e| site.error("appliance::user-failed", format!("{e:#}"), user.span))?;
        if let Some(keys) = authorized_keys.get(&user.name.value) {
            logins.push((user, added.clone(), keys));
        }
        if added.create_home {
            homes.push(added);
        }
    }
    if !appliance.groups.is_empty() || !appliance.users.is_empty() {
        accounts.write(editor)?;
    }
    for home in homes {
        if !editor.exists(&home.home) {
            editor.mkdir(&home.home, 0o755, home.uid, home.gid)?;
        }
    }
    // ~/.ssh as sshd's StrictModes wants it: the user's own, 0700, the keys 0600.
    for (user, added, keys) in logins {
        if added.home == "/nonexistent" || !editor.exists(&added.home) {
            return Err(site
                .error(
                    "appliance::no-home-for-keys",
                    format!(
                        "user `{}` has no home directory for ~/.ssh/authorized_keys",
                        user.name.value
                    ),
                    user.span,
                )
                .label("keys for this user")
                .help(
                    "give it one with `home=\"/var/lib/NAME\"` (system users have none by default)",
                )
                .into());
        }
        let ssh = format!("{}/.ssh", added.home.trim_end_matches('/'));
        editor.mkdir(&ssh, 0o700, added.uid, added.gid)?;
        editor.write(
            &format!("{ssh}/authorized_keys"),
            keys.as_bytes(),
            0o600,
            added.uid,
            added.gid,
        )?;
    }
    let owner_of = |accounts: &accounts::Accounts,
                    owner: Option<&Spanned<String>>,
                    group: Option<&Spanned<String>>|
     -> Result<(u32, u32), BuildError> {
        let uid = match owner {
            Some(owner) => account_id(site, owner, accounts.uid(&owner.value), "user", || {
                accounts.user_names()
            })?,
            None => 0,
        };
        let gid = match group {
            Some(group) => account_id(site, group, accounts.gid(&group.value), "group", || {
                accounts.group_names()
            })?,
            None => 0,
        };
        Ok((uid, gid))
    };
    for mkdir in &appliance.mkdirs {
        let (uid, gid) = owner_of(&accounts, mkdir.owner.as_ref(), mkdir.group.as_ref())?;
        editor
            .mkdir(&mkdir.path, mkdir.mode, uid, gid)
            .map_err(|e| site.error("appliance::mkdir-failed", format!("{e:#}"), mkdir.span))?;
    }
    for item in copies {
        let copy = &appliance.copies[item.node];
        let (uid, gid) = owner_of(&accounts, copy.owner.as_ref(), copy.group.as_ref())?;
        let result = match &item.kind {
            CopyKind::File { source, .. } => fs_err::File::open(source)
                .map_err(anyhow::Error::from)
                .and_then(|file| editor.write(&item.destination, file, item.mode, uid, gid)),
            CopyKind::Dir => editor.mkdir(&item.destination, item.mode, uid, gid),
            CopyKind::Symlink { target } => editor.symlink(&item.destination, target),
        };
        result.map_err(|e| site.error("appliance::copy-failed", format!("{e:#}"), copy.span))?;
    }
    for (to, mode, artifact) in binaries {
        let file = fs_err::File::open(&artifact.path)?;
        editor.write(to, file, *mode, 0, 0)?;
    }
    for symlink in &appliance.symlinks {
        editor
            .symlink(&symlink.path, &symlink.target)
            .map_err(|e| site.error("appliance::symlink-failed", format!("{e:#}"), symlink.span))?;
    }
    for service in &appliance.services {
        let result = if service.enable {
            systemd::enable(editor, &service.unit.value).map(|_| ())
        } else {
            systemd::disable(editor, &service.unit.value).map(|_| ())
        };
        result.map_err(|e| {
            site.error(
                "appliance::service-failed",
                format!("{e:#}"),
                service.unit.span,
            )
            .label(if service.enable {
                "cannot enable"
            } else {
                "cannot disable"
            })
        })?;
    }
    configure_system(editor, site)?;
    Ok(())
}

/// What a booting appliance needs beyond its packages: DHCP on the first Ethernet link by
/// systemd-networkd (QEMU's user network answers it), and SSH host keys of its own.
pub(super) fn configure_boot(editor: &mut TreeEditor) -> anyhow::Result<()> {
    let network = "/etc/systemd/network/80-appliance-dhcp.network";
    if !editor.exists(network) {
        editor.mkdir("/etc/systemd/network", 0o755, 0, 0)?;
        editor.write(
            network,
            &b"# Written by cargo-appliance for disk outputs.\n[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n"[..],
            0o644,
            0,
            0,
        )?;
    }
    systemd::enable(editor, "systemd-networkd.service")?;
    own_ssh_host_keys(editor)?;
    Ok(())
}

/// The SSH host keys `ssh-keygen -A` makes (and openssh-server's installation made in the
/// package step): left in a disk image, every machine made from it would have the same
/// ones, and whoever holds one image could pose as all of them.
const SSH_HOST_KEYS: [&str; 4] = ["rsa", "ecdsa", "ed25519", "dsa"];

/// The unit that makes a machine's own host keys at its first boot, before sshd starts.
pub const SSH_HOST_KEYS_UNIT: &str = "cargo-appliance-ssh-host-keys.service";

const SSH_HOST_KEYS_UNIT_TEXT: &str = "\
# Written by cargo-appliance for disk outputs: the image carries no SSH host keys, so
# every machine made from it makes its own at its first boot.
[Unit]
Description=Make this machine's SSH host keys
ConditionPathExistsGlob=!/etc/ssh/ssh_host_*_key
Before=ssh.service ssh.socket

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
";

/// Keys of a booting appliance are its own: the image's are removed, and a unit makes new
/// ones at first boot (only where sshd is installed).
fn own_ssh_host_keys(editor: &mut TreeEditor) -> anyhow::Result<()> {
    if !editor.exists("/usr/sbin/sshd") {
        return Ok(());
    }
    for kind in SSH_HOST_KEYS {
        for suffix in ["", ".pub"] {
            editor.remove(&format!("/etc/ssh/ssh_host_{kind}_key{suffix}"))?;
        }
    }
    let unit = format!("/etc/systemd/system/{SSH_HOST_KEYS_UNIT}");
    editor.mkdir("/etc/systemd/system", 0o755, 0, 0)?;
    editor.write(&unit, SSH_HOST_KEYS_UNIT_TEXT.as_bytes(), 0o644, 0, 0)?;
    systemd::enable(editor, SSH_HOST_KEYS_UNIT)?;
    Ok(())
}

/// A user or group named by a node, as resolved in the image's own account files, or a
/// diagnostic on the name with the closest existing one.
pub(super) fn account_id(
    site: &Site<'_>,
    name: &Spanned<String>,
    found: Option<u32>,
    what: &str,
    names: impl FnOnce() -> Vec<String>,
) -> Result<u32, BuildError> {
    found.ok_or_else(|| {
        let (code, file) = if what == "user" {
            ("appliance::unknown-owner", "/etc/passwd")
        } else {
            ("appliance::unknown-group", "/etc/group")
        };
        let known = names();
        site.error(
            code,
            format!("{what} `{}` does not exist in the image", name.value),
            name.span,
        )
        .label(format!("no such {what} in {file}"))
        .maybe_help(
            crate::diagnostics::did_you_mean(&name.value, known.iter().map(String::as_str))
                .map(|c| format!("did you mean `{c}`? (or add a `{what}` node)")),
        )
        .into()
    })
}

/// Hostname, time zone, locale, environment and kernel command line.
pub(super) fn configure_system(editor: &mut TreeEditor, site: &Site<'_>) -> Result<(), BuildError> {
    let appliance = site.appliance;
    if is_bootable(appliance) {
        configure_boot(editor).context("configuring the network of the disk image")?;
    }
    if let Some(hostname) = &appliance.hostname {
        editor.rewrite(
            "/etc/hostname",
            format!("{}\n", hostname.value).as_bytes(),
            0o644,
        )?;
        let hosts = editor.read_text("/etc/hosts")?.unwrap_or_else(|| {
            "127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n".to_owned()
        });
        // Debian maps the host name to 127.0.1.1 (as the installer does).
        let mut lines: Vec<String> = hosts
            .lines()
            .filter(|l| !l.starts_with("127.0.1.1"))
            .map(str::to_owned)
            .collect();
        lines.insert(1.min(lines.len()), format!("127.0.1.1\t{}", hostname.value));
        editor.rewrite("/etc/hosts", (lines.join("\n") + "\n").as_bytes(), 0o644)?;
    }
    if let Some(timezone) = &appliance.timezone {
        let zone = format!("/usr/share/zoneinfo/{}", timezone.value);
        if !editor.exists(&zone) {
            return Err(site
                .error(
                    "appliance::unknown-timezone",
                    format!("the image has no {zone}"),
                    timezone.span,
                )
                .label("not in the image's tzdata")
                .help("add `packages \"tzdata\"`, or check the zone's name")
                .into());
        }
        editor.symlink("/etc/localtime", &zone)?;
        editor.rewrite(
            "/etc/timezone",
            format!("{}\n", timezone.value).as_bytes(),
            0o644,
        )?;
    }
    if let Some(locale) = &appliance.locale {
        editor.rewrite(
            "/etc/default/locale",
            format!("LANG={}\n", locale.value).as_bytes(),
            0o644,
        )?;
    }
    if !appliance.env.is_empty() {
        let existing = editor.read_text("/etc/environment")?.unwrap_or_default();
        let names: BTreeSet<&str> = appliance.env.iter().map(|e| e.name.as_str()).collect();
        let mut lines: Vec<String> = existing
            .lines()
            .filter(|l| {
                l.split_once('=')
                    .is_none_or(|(name, _)| !names.contains(name.trim()))
            })
            .map(str::to_owned)
            .collect();
        for var in &appliance.env {
            lines.push(format!(
                "{}=\"{}\"",
                var.name,
                var.value.replace('"', "\\\"")
            ));
        }
        editor.rewrite(
            "/etc/environment",
            (lines.join("\n") + "\n").as_bytes(),
            0o644,
        )?;
    }
    if !appliance.kernel_cmdline.is_empty() {
        let words: Vec<&str> = appliance
            .kernel_cmdline
            .iter()
            .map(|w| w.value.as_str())
            .collect();
        editor.mkdir("/etc/kernel", 0o755, 0, 0)?;
        editor.rewrite(
            "/etc/kernel/cmdline",
            (words.join(" ") + "\n").as_bytes(),
            0o644,
        )?;
    }
    Ok(())
}
