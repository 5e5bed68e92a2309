//! cargo-appliance's library: everything but `main`.
//!
//! One module per part of the design (see ARCHITECTURE.md): [`manifest`] reads and
//! validates manifests, [`workspace`] connects them to the Cargo workspace, [`check`] runs
//! both over a workspace, [`build`] turns manifests into stored images and outputs, [`store`] holds images, [`packages`] knows Debian, [`process`]
//! runs external programs, [`diagnostics`] renders problems, [`cli`] is the command
//! line (clap types, dispatch, the printer, the store commands).

pub mod build;
pub mod capture;
pub mod change;
pub mod check;
pub mod cli;
pub mod diagnostics;
pub mod disk_space;
pub mod dpkg;
pub mod history;
pub mod image_reference;
pub mod json_file;
pub mod manifest;
pub mod oci_json;
pub mod output;
pub mod packages;
pub mod process;
pub mod registry;
pub mod run;
pub mod store;
pub mod suggest;
pub mod test_hooks;
pub mod workspace;
