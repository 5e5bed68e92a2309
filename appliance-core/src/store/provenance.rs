//! What made a stored image, typed. The catalog keeps each image's provenance as JSON (so a
//! newer writer's fields survive an older reader); the build's steps are read through
//! [`Step`], tagged by `step`, never by looking up strings in the JSON. A catalog written
//! by earlier versions reads the same: fields added since are optional.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// A build step's record of how it made its image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "kebab-case")]
pub enum Step {
    Packages(PackagesStep),
    Appliance(ApplianceStep),
}

/// The package step: apt on a start image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackagesStep {
    /// (origin tree, wanted, removed, Recommends) hashed.
    pub key: String,
    /// The tree digest of the image the appliance's packages were asked of.
    pub origin: String,
    #[serde(default)]
    pub origin_reference: Option<String>,
    #[serde(default)]
    pub wanted: BTreeSet<String>,
    #[serde(default)]
    pub removed: BTreeSet<String>,
    #[serde(default)]
    pub recommends: bool,
    /// What apt installed on the start image (the rest was there).
    #[serde(default)]
    pub installed: BTreeSet<String>,
    #[serde(default)]
    pub started_from: Option<String>,
}

/// The appliance step: files, binaries, configuration and scripts on the packages image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplianceStep {
    pub key: String,
    pub appliance: String,
    #[serde(default)]
    pub manifest: Option<String>,
    /// The parts of the key (the build's `ApplianceInputs`); absent before they were kept.
    #[serde(default)]
    pub inputs: Option<serde_json::Value>,
}

/// Where a pulled image came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pulled {
    /// The reference it was pulled by.
    pub from: String,
    /// The manifest digest.
    pub manifest: String,
}

/// The provenance fields every image may carry, whatever made it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Common {
    /// Installed package versions, from the image's dpkg status at commit.
    #[serde(default)]
    pub packages: BTreeMap<String, String>,
    #[serde(default)]
    pub pulled: Option<Pulled>,
}

/// The build step that made `provenance`, if a build step did.
pub fn step(provenance: &serde_json::Value) -> Option<Step> {
    // Only a record with a `step` can be one: others (imports, mmdebstrap) are not parsed.
    provenance.get("step")?;
    Step::deserialize(provenance).ok()
}

/// The fields of [`Common`] in `provenance`.
pub fn common(provenance: &serde_json::Value) -> Common {
    Common::deserialize(provenance).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_written_by_earlier_versions_read() {
        // A package step as the first builds recorded it: no installed, no started_from.
        let old = serde_json::json!({
            "source": "cargo-appliance build", "step": "packages", "key": "k",
            "origin": "o", "wanted": ["nginx"], "removed": [], "recommends": false,
            "packages": {"nginx": "1.22.1-9"}
        });
        let Some(Step::Packages(packages)) = step(&old) else {
            panic!("a packages step: {old}");
        };
        assert_eq!(packages.wanted, BTreeSet::from(["nginx".to_owned()]));
        assert!(packages.installed.is_empty());
        assert_eq!(common(&old).packages["nginx"], "1.22.1-9");
        // An appliance step without inputs.
        let old = serde_json::json!({"step": "appliance", "key": "k", "appliance": "web"});
        assert!(matches!(
            step(&old),
            Some(Step::Appliance(ApplianceStep { inputs: None, .. }))
        ));
        // Not a step: an import, or a step of a kind this version does not know.
        assert_eq!(
            step(&serde_json::json!({"source": "import", "path": "/x"})),
            None
        );
        assert_eq!(
            step(&serde_json::json!({"step": "future", "key": "k"})),
            None
        );
    }
}
