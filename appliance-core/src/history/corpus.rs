//! The corpus shipped in `appliance-core/seed/derivations.jsonl.zst` (Dockerfiles mined from
//! public repositories; its README says where from and what each field means) as derivations. The conversion, documented for `history import`:
//!
//! | corpus field | derivation |
//! |---|---|
//! | `base_family` `debian-stretch`, `ubuntu-18.04` | parent `debian/stretch`, `ubuntu/18.04` |
//! | `base_family` `debian-derived:php` | parent `php` (an image built on Debian) |
//! | `id` | child |
//! | `packages_added` / `packages_removed` | `package-added` / `package-removed` |
//! | `users_added` / `groups_added` | `user-added` / `group-added` |
//! | `exposed_ports` | `port-exposed` |
//! | `files_to` | `file-added` (destination paths) |

use anyhow::Context as _;

use super::{Change, Derivation};

/// Turn a corpus base family into an image name.
pub fn parent_name(base_family: &str) -> String {
    if let Some(derived) = base_family.strip_prefix("debian-derived:") {
        return derived.to_owned();
    }
    if let Some(derived) = base_family.strip_prefix("ubuntu-derived:") {
        return derived.to_owned();
    }
    match base_family.split_once('-') {
        Some((distribution, release)) if matches!(distribution, "debian" | "ubuntu") => {
            format!("{distribution}/{release}")
        }
        _ => base_family.to_owned(),
    }
}

pub fn convert(record: &serde_json::Value) -> anyhow::Result<Derivation> {
    let child = record["id"]
        .as_str()
        .context("record has no id")?
        .to_owned();
    let parent = parent_name(
        record["base_family"]
            .as_str()
            .context("record has no base_family")?,
    );
    let mut changes = Vec::new();
    let mut add = |field: &str, kind: &str| {
        for value in record[field].as_array().into_iter().flatten() {
            let subject = match value {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            if !subject.is_empty() {
                changes.push(Change::new(kind, subject));
            }
        }
    };
    add("packages_added", "package-added");
    add("packages_removed", "package-removed");
    add("users_added", "user-added");
    add("groups_added", "group-added");
    add("exposed_ports", "port-exposed");
    add("files_to", "file-added");
    changes.sort();
    changes.dedup();
    Ok(Derivation {
        parent,
        child,
        changes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corpus_records_become_derivations() {
        let record = serde_json::json!({
            "id": "repo:Dockerfile", "base_family": "debian-stretch",
            "packages_added": ["nginx", "curl", "nginx"], "packages_removed": ["vim-tiny"],
            "users_added": ["app"], "groups_added": [], "exposed_ports": ["80", 443], "files_to": ["/etc/nginx/"]
        });
        let derivation = convert(&record).expect("converts");
        assert_eq!(derivation.parent, "debian/stretch");
        let keys: Vec<String> = derivation.changes.iter().map(Change::key).collect();
        assert_eq!(
            keys,
            [
                "file-added:/etc/nginx/",
                "package-added:curl",
                "package-added:nginx",
                "package-removed:vim-tiny",
                "port-exposed:443",
                "port-exposed:80",
                "user-added:app"
            ]
        );
        assert_eq!(parent_name("debian-derived:php"), "php");
        assert_eq!(parent_name("ubuntu-18.04"), "ubuntu/18.04");
    }
}
