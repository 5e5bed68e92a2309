//! dpkg's status database (`/var/lib/dpkg/status`): which packages an image has installed.
//! Pure: text in, packages out. A package is installed when its `Status` (want, flag, state)
//! has the state `installed` (or only triggers pending) and the flag `ok`, whatever the
//! want: `hold ok installed` (apt-mark hold) and `deinstall ok installed` (selected for
//! removal, still there) are installed; `deinstall ok config-files` (removed, config left)
//! and half-configured or half-installed packages are not.

use serde::Serialize;

/// Where dpkg keeps its status, relative to the image root.
pub const STATUS_PATH: &str = "var/lib/dpkg/status";

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct InstalledPackage {
    pub name: String,
    pub version: String,
    pub architecture: String,
}

/// Parse a status file. Malformed stanzas (no `Package` field) are skipped: dpkg itself
/// would refuse such a file, and an image's package list is informational.
pub fn parse_status(text: &str) -> Vec<InstalledPackage> {
    let mut packages = Vec::new();
    for stanza in text.split("\n\n") {
        let mut name = None;
        let mut version = None;
        let mut architecture = None;
        let mut installed = false;
        for line in stanza.lines() {
            if line.starts_with([' ', '\t']) {
                continue;
            }
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            match key {
                "Package" => name = Some(value.to_owned()),
                "Version" => version = Some(value.to_owned()),
                "Architecture" => architecture = Some(value.to_owned()),
                "Status" => installed = is_installed(value),
                _ => {}
            }
        }
        if let (Some(name), true) = (name, installed) {
            packages.push(InstalledPackage {
                name,
                version: version.unwrap_or_default(),
                architecture: architecture.unwrap_or_default(),
            });
        }
    }
    packages.sort();
    packages
}

fn is_installed(status: &str) -> bool {
    let mut words = status.split_whitespace();
    let (Some(_want), Some(flag), Some(state), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return false;
    };
    flag == "ok" && matches!(state, "installed" | "triggers-pending" | "triggers-awaited")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_package_is_installed() {
        let status = "Package: nginx\nStatus: hold ok installed\nVersion: 1.22.1-9\nArchitecture: amd64\n\nPackage: curl\nStatus: deinstall ok installed\nVersion: 7.88.1\nArchitecture: amd64\n\nPackage: gone\nStatus: purge ok not-installed\n\nPackage: broken\nStatus: install reinstreq half-installed\nVersion: 1\n\nPackage: waiting\nStatus: install ok triggers-pending\nVersion: 2\n";
        let names: Vec<String> = parse_status(status).into_iter().map(|p| p.name).collect();
        assert_eq!(names, ["curl", "nginx", "waiting"]);
    }

    #[test]
    fn only_installed_packages_count() {
        let status = "Package: base-files\nStatus: install ok installed\nPriority: required\nVersion: 12.4+deb12u5\nArchitecture: amd64\nDescription: Debian base system\n miscellaneous files\n\nPackage: vim-tiny\nStatus: deinstall ok config-files\nVersion: 2:9.0\nArchitecture: amd64\n\nPackage: zlib1g\nStatus: install ok installed\nArchitecture: amd64\nVersion: 1:1.2.13.dfsg-1\n";
        let packages = parse_status(status);
        assert_eq!(
            packages,
            vec![
                InstalledPackage {
                    name: "base-files".into(),
                    version: "12.4+deb12u5".into(),
                    architecture: "amd64".into()
                },
                InstalledPackage {
                    name: "zlib1g".into(),
                    version: "1:1.2.13.dfsg-1".into(),
                    architecture: "amd64".into()
                },
            ]
        );
        assert!(parse_status("").is_empty());
        assert!(parse_status("garbage\n\n\nStatus: install ok installed").is_empty());
    }
}
