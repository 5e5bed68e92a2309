//! The appliance step's key: what a stored image is found by. Its parts are kept in the
//! step's provenance too (see [`super::plan::ApplianceInputs`]), so a plan can say which
//! part changed.

use std::collections::BTreeMap;

use serde_json::json;
use sha2::{Digest as _, Sha256};

use super::scripts::Script;
use super::{cargo, files, is_bootable};
use crate::manifest::model::Appliance;
use crate::store::ImageRecord;
use crate::store::tree::hex;

/// The configuration as written, as the appliance step's key sees it: spans, outputs and
/// the nodes other steps or keys cover left out.
pub(super) fn appliance_config(appliance: &Appliance) -> serde_json::Value {
    let mut config = serde_json::to_value(appliance).unwrap_or_default();
    crate::manifest::model::strip_spans(&mut config);
    if let Some(object) = config.as_object_mut() {
        for irrelevant in [
            "description",
            "outputs",
            "forwards",
            "suggest",
            "capture",
            "packages",
            "remove",
            "base",
            "kernel",
            "runs",
        ] {
            object.remove(irrelevant);
        }
    }
    config
}

/// The appliance step's key: the parent tree, the configuration as written (spans, outputs
/// and other build-irrelevant nodes left out), and the content digests of what is copied.
pub(super) fn appliance_key(
    appliance: &Appliance,
    parent: &ImageRecord,
    copies: &[files::CopyItem],
    binaries: &[(String, u32, cargo::Artifact)],
    scripts: &[Script],
    authorized_keys: &BTreeMap<String, String>,
) -> String {
    let config = appliance_config(appliance);
    let inputs = json!({
        "version": 1,
        "parent": parent.tree_digest,
        "config": config,
        "copies": copies,
        "binaries": binaries.iter().map(|(to, mode, a)| json!([to, mode, a.digest])).collect::<Vec<_>>(),
        "scripts": scripts.iter().map(|s| &s.text).collect::<Vec<_>>(),
        "bootable": is_bootable(appliance),
        "authorized_keys": authorized_keys,
    });
    let mut hasher = Sha256::new();
    hasher.update(inputs.to_string());
    hex(&hasher.finalize())
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::build::files::CopyKind;
    use crate::diagnostics::SourceFile;

    /// Golden values: the appliance step's key is what stored images are found by, so an
    /// accidental change rebuilds every user's appliances. A deliberate one changes these.
    #[test]
    fn the_appliance_key_of_a_known_manifest_is_stable() {
        let text = "appliance \"web\" {\n    base \"debian/bookworm\"\n    packages \"nginx\"\n    \
                    copy \"motd\" to=\"/etc/motd\" mode=0o644\n    user \"api\" system=#true\n    \
                    service \"api.service\" enable=#true\n    hostname \"web\"\n    output \"tar\"\n}\n";
        let file = SourceFile::new(
            Path::new("appliance.kdl"),
            "appliance.kdl".into(),
            text.into(),
        );
        let (appliances, diagnostics) = crate::manifest::parse::parse_manifest(&file);
        assert!(diagnostics.is_empty(), "{diagnostics:?}");
        let parent = ImageRecord {
            id: 1,
            name: "web/packages".into(),
            version: "1".into(),
            tree_digest: "ab".repeat(32),
            legacy_tree_digest: None,
            parent: None,
            created_at: 0,
            provenance: json!({}),
            entry_count: 0,
            content_bytes: 0,
            needs_repair: false,
        };
        let copies = [files::CopyItem {
            destination: "/etc/motd".into(),
            kind: CopyKind::File {
                source: PathBuf::from("/ws/motd"),
                digest: "cd".repeat(32),
                size: 6,
            },
            mode: 0o644,
            node: 0,
        }];
        let key = appliance_key(&appliances[0], &parent, &copies, &[], &[], &BTreeMap::new());
        assert_eq!(
            key,
            "aae221db3597e71acfc088cefa79f0212a0b104f3c86be2bce15bf822680cfa1"
        );
    }
}
