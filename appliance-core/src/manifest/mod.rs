//! Manifests: KDL v2 text → typed appliances with source spans, checked against the schema.
//!
//! Layers, each pure (text in, data out):
//! - [`grammar`]: what names, paths and tokens may look like;
//! - [`schema`]: every node, argument and property as data (the single source of truth);
//! - [`validate`]: a KDL node checked against its spec;
//! - [`parse`]: the typed [`model`], with rules that span several fields;
//! - [`reference`]: the schema document and Markdown reference generated from [`schema`].

pub mod grammar;
pub mod model;
pub mod parse;
pub mod reference;
pub mod schema;
pub mod validate;
pub mod version;

pub use model::{Appliance, BaseRef, Manifest};
pub use parse::parse_manifest;

/// File names recognised as manifests.
pub fn is_manifest_file_name(name: &str) -> bool {
    name == "appliance.kdl"
        || (name.ends_with(".appliance.kdl") && name.len() > ".appliance.kdl".len())
}
