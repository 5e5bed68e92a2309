//! The OCI image-spec documents this tool reads — index, manifest, descriptor — as typed
//! structs (image-spec v1.1). Readers parse into these instead of indexing JSON values, so a
//! missing or mistyped field is one parse error with its place, not a `null` that flows on.
//! Unknown fields are ignored, as the spec asks; fields whose presence makes a document
//! ambiguous (`layers` in an index, `manifests` in a manifest) are kept to be refused.

use std::collections::BTreeMap;

use serde::Deserialize;

pub const MEDIA_TYPE_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_TYPE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// A content descriptor: what a blob is, its digest and size.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub platform: Option<Platform>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub artifact_type: Option<String>,
}

impl Descriptor {
    /// Whether the descriptor is for linux/amd64 (the only platform built and booted here).
    pub fn is_linux_amd64(&self) -> bool {
        self.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
}

/// An image index (`index.json` of a layout, or a multi-platform manifest list).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    #[serde(default)]
    pub media_type: Option<String>,
    #[serde(default)]
    pub manifests: Option<Vec<Descriptor>>,
    /// Present only in a document that is both an index and a manifest.
    #[serde(default)]
    pub layers: Option<serde_json::Value>,
}

impl ImageIndex {
    /// The manifest for linux/amd64, else the only one (first when `any_first`).
    pub fn pick(&self, any_first: bool) -> Option<&Descriptor> {
        let manifests = self.manifests.as_deref()?;
        match manifests {
            [only] => Some(only),
            several => several
                .iter()
                .find(|m| m.is_linux_amd64())
                .or_else(|| several.first().filter(|_| any_first)),
        }
    }
}

/// An image (or artifact) manifest.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    #[serde(default)]
    pub media_type: Option<String>,
    #[serde(default)]
    pub artifact_type: Option<String>,
    #[serde(default)]
    pub config: Option<Descriptor>,
    #[serde(default)]
    pub layers: Option<Vec<Descriptor>>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// Present only in a document that is both a manifest and an index.
    #[serde(default)]
    pub manifests: Option<serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_parse_with_unknown_fields_and_refuse_wrong_types() {
        let manifest: ImageManifest = serde_json::from_str(
            r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
                "config":{"mediaType":"c","digest":"sha256:00","size":2},
                "layers":[{"mediaType":"l","digest":"sha256:11","size":3,"urls":[]}],
                "annotations":{"a":"b"},"future":true}"#,
        )
        .expect("a manifest");
        assert_eq!(manifest.layers.as_ref().map(Vec::len), Some(1));
        assert_eq!(manifest.annotations["a"], "b");
        assert!(
            serde_json::from_str::<ImageManifest>(
                r#"{"layers":[{"digest":"sha256:11","size":"3"}]}"#
            )
            .is_err(),
            "a size that is a string"
        );
        let index: ImageIndex = serde_json::from_str(
            r#"{"manifests":[{"digest":"sha256:a","size":1,"platform":{"os":"linux","architecture":"arm64"}},
                             {"digest":"sha256:b","size":1,"platform":{"os":"linux","architecture":"amd64"}}]}"#,
        )
        .expect("an index");
        assert_eq!(
            index.pick(false).map(|d| d.digest.as_str()),
            Some("sha256:b")
        );
    }
}
