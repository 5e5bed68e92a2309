//! cargo-appliance's library: everything but `main`.
//!
//! One module per part of the design (see ARCHITECTURE.md): [`manifest`] reads and
//! validates manifests, [`workspace`] connects them to the Cargo workspace, [`check`] runs
//! both over a workspace, [`diagnostics`] renders problems, [`cli`] is the command line.

pub mod check;
pub mod cli;
pub mod diagnostics;
pub mod manifest;
pub mod workspace;
