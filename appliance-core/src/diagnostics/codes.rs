//! Every diagnostic code, with what it means: the one table `schema/reference.md` lists
//! (generated), and a test keeps it equal to the codes the sources use, so a new code is
//! documented when it is added.

/// What stage of the work reports a code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Reading a manifest: KDL syntax and the schema.
    Manifest,
    /// Rules across nodes and appliances.
    Rules,
    /// What a manifest names in the workspace: sources, scripts, binaries, keys.
    Workspace,
    /// Building: bases, packages, configuration, scripts.
    Build,
    /// Suggestions from the history.
    Suggest,
}

impl Stage {
    pub fn title(self) -> &'static str {
        match self {
            Stage::Manifest => "Reading manifests",
            Stage::Rules => "Rules across nodes and appliances",
            Stage::Workspace => "The workspace",
            Stage::Build => "Building",
            Stage::Suggest => "Suggestions",
        }
    }
}

/// A diagnostic code: `appliance::NAME`.
#[derive(Debug)]
pub struct Code {
    pub code: &'static str,
    pub stage: Stage,
    pub meaning: &'static str,
}

const fn code(code: &'static str, stage: Stage, meaning: &'static str) -> Code {
    Code {
        code,
        stage,
        meaning,
    }
}

use Stage::{Build, Manifest, Rules, Suggest, Workspace};

/// Every code, grouped by stage.
pub static CODES: &[Code] = &[
    code(
        "appliance::syntax",
        Manifest,
        "the file is not valid KDL v2",
    ),
    code(
        "appliance::invalid-utf8",
        Manifest,
        "the manifest is not UTF-8",
    ),
    code(
        "appliance::manifest-too-large",
        Manifest,
        "the manifest is larger than the size cap",
    ),
    code(
        "appliance::unreadable-manifest",
        Manifest,
        "the manifest cannot be read",
    ),
    code(
        "appliance::empty-manifest",
        Manifest,
        "a manifest file declares no `appliance`",
    ),
    code(
        "appliance::nesting-too-deep",
        Manifest,
        "nodes are nested deeper than the schema allows",
    ),
    code(
        "appliance::unknown-node",
        Manifest,
        "a node the schema does not know at that place (with a \"did you mean\")",
    ),
    code(
        "appliance::unknown-property",
        Manifest,
        "a property the node does not take",
    ),
    code(
        "appliance::duplicate-node",
        Manifest,
        "a node that may appear once is given again",
    ),
    code(
        "appliance::duplicate-property",
        Manifest,
        "a property given twice on one node",
    ),
    code(
        "appliance::missing-argument",
        Manifest,
        "a node lacks an argument it needs",
    ),
    code(
        "appliance::too-many-arguments",
        Manifest,
        "a node has more arguments than it takes",
    ),
    code(
        "appliance::unexpected-argument",
        Manifest,
        "a node that takes no arguments has one",
    ),
    code(
        "appliance::missing-property",
        Manifest,
        "a node lacks a property it needs",
    ),
    code(
        "appliance::unexpected-children",
        Manifest,
        "a node that takes no children has a block",
    ),
    code(
        "appliance::wrong-type",
        Manifest,
        "a value of the wrong type (a string where a number goes, …)",
    ),
    code(
        "appliance::invalid-value",
        Manifest,
        "a value outside its grammar (see Value grammars)",
    ),
    code(
        "appliance::type-annotation",
        Manifest,
        "a KDL type annotation `(type)`, which manifests do not use",
    ),
    code(
        "appliance::invalid-ssh-key",
        Manifest,
        "an `ssh-key` that is not an OpenSSH public key",
    ),
    code(
        "appliance::internal",
        Manifest,
        "a node in the schema that the parser does not handle: a bug, please report it",
    ),
    code(
        "appliance::missing-base",
        Rules,
        "an appliance without a `base`",
    ),
    code(
        "appliance::conflicting-base",
        Rules,
        "`base` names both a stored image and an appliance",
    ),
    code(
        "appliance::version-on-appliance-base",
        Rules,
        "`version=` on a `base appliance=`, which has no versions",
    ),
    code(
        "appliance::registry-on-appliance-base",
        Rules,
        "`registry=` on a `base appliance=`, which is built here",
    ),
    code(
        "appliance::conflicting-run",
        Rules,
        "`run` has both an inline script and `script=`",
    ),
    code(
        "appliance::conflicting-service",
        Rules,
        "one unit both enabled and disabled",
    ),
    code(
        "appliance::duplicate-appliance",
        Rules,
        "two appliances of one name in the workspace",
    ),
    code(
        "appliance::duplicate-destination",
        Rules,
        "two copies or binaries to one path",
    ),
    code(
        "appliance::duplicate-forward",
        Rules,
        "two forwards of one host port",
    ),
    code(
        "appliance::duplicate-group",
        Rules,
        "a group declared twice",
    ),
    code(
        "appliance::duplicate-output",
        Rules,
        "an output format declared twice",
    ),
    code(
        "appliance::duplicate-package",
        Rules,
        "a package listed twice",
    ),
    code("appliance::duplicate-service", Rules, "a unit named twice"),
    code("appliance::duplicate-user", Rules, "a user declared twice"),
    code(
        "appliance::remove-installed",
        Rules,
        "a package both installed and removed",
    ),
    code(
        "appliance::glob-needs-directory",
        Rules,
        "a glob copy whose destination is not a directory (`/…/`)",
    ),
    code(
        "appliance::option-not-for-format",
        Rules,
        "an output option the format does not take",
    ),
    code(
        "appliance::unknown-appliance",
        Rules,
        "`base appliance=` or `-a` names no appliance of the workspace",
    ),
    code(
        "appliance::base-cycle",
        Rules,
        "appliances that derive from each other in a cycle",
    ),
    code(
        "appliance::no-workspace",
        Workspace,
        "no Cargo workspace here (or at --manifest-path)",
    ),
    code(
        "appliance::no-manifests",
        Workspace,
        "the workspace has no `appliance.kdl`",
    ),
    code(
        "appliance::missing-source",
        Workspace,
        "a copy source that does not exist",
    ),
    code(
        "appliance::unreadable-source",
        Workspace,
        "a copy source that cannot be read",
    ),
    code(
        "appliance::not-a-file",
        Workspace,
        "a script or authorized-keys source that is not a readable file",
    ),
    code(
        "appliance::special-file",
        Workspace,
        "a copy source that is a device, FIFO or socket",
    ),
    code(
        "appliance::source-outside-workspace",
        Workspace,
        "a source that leads outside the workspace (allow with `allow-outside-workspace=#true`)",
    ),
    code(
        "appliance::invalid-glob",
        Workspace,
        "a copy glob that does not parse",
    ),
    code(
        "appliance::glob-matches-nothing",
        Workspace,
        "a copy glob that matches no file",
    ),
    code(
        "appliance::unknown-package",
        Workspace,
        "`binary package=` names no workspace member",
    ),
    code(
        "appliance::unknown-binary",
        Workspace,
        "a binary target no workspace package has",
    ),
    code(
        "appliance::ambiguous-binary",
        Workspace,
        "a binary target several packages have (say `package=`)",
    ),
    code(
        "appliance::missing-host-program",
        Build,
        "a program the build needs is not installed (the diagnostic names the Debian package)",
    ),
    code(
        "appliance::base-not-found",
        Build,
        "the store has no image matching `base` (`base create` or `image import` adds one)",
    ),
    code(
        "appliance::base-not-in-registry",
        Build,
        "the registry of `base registry=` has no matching tag",
    ),
    code(
        "appliance::base-offline",
        Build,
        "the base must be pulled, but `--offline` forbids the network",
    ),
    code(
        "appliance::unknown-timezone",
        Build,
        "a `timezone` the image's tzdata does not have",
    ),
    code(
        "appliance::unknown-owner",
        Build,
        "a copy's owner is no user of the image",
    ),
    code(
        "appliance::unknown-group",
        Build,
        "a group (of a copy or a user) the image does not have",
    ),
    code(
        "appliance::no-home-for-keys",
        Build,
        "a user with SSH keys but no home directory",
    ),
    code(
        "appliance::apt-failed",
        Build,
        "apt failed in the package step (its output's tail follows)",
    ),
    code(
        "appliance::cargo-failed",
        Build,
        "building a workspace binary failed",
    ),
    code(
        "appliance::copy-failed",
        Build,
        "a copy could not be made in the image",
    ),
    code(
        "appliance::mkdir-failed",
        Build,
        "a directory could not be made in the image",
    ),
    code(
        "appliance::symlink-failed",
        Build,
        "a symlink could not be made in the image",
    ),
    code("appliance::user-failed", Build, "a user could not be added"),
    code(
        "appliance::group-failed",
        Build,
        "a group could not be added",
    ),
    code(
        "appliance::service-failed",
        Build,
        "a unit could not be enabled or disabled",
    ),
    code(
        "appliance::run-failed",
        Build,
        "a `run` script exited non-zero",
    ),
    code(
        "appliance::run-timeout",
        Build,
        "a `run` script outlived its `timeout=`; its processes were killed",
    ),
    code(
        "appliance::run-out-of-space",
        Build,
        "a `run` script filled the space its changes may take (in memory; the store's disk is untouched)",
    ),
    code(
        "appliance::suggestion",
        Suggest,
        "a change images like this one usually make, with its evidence and edit",
    ),
];

/// The entry of `code`, if it is one.
pub fn lookup(code: &str) -> Option<&'static Code> {
    CODES.iter().find(|entry| entry.code == code)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::Path;

    use super::*;

    fn codes_in(dir: &Path, found: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).expect("read the sources") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                codes_in(&path, found);
            } else if path.extension().is_some_and(|e| e == "rs") && !path.ends_with("codes.rs") {
                let text = std::fs::read_to_string(&path).expect("read a source file");
                for (at, _) in text.match_indices("\"appliance::") {
                    let rest = &text[at + 1..];
                    let end = rest.find('"').unwrap_or(rest.len());
                    found.insert(rest[..end].to_owned());
                }
            }
        }
    }

    #[test]
    fn every_code_the_sources_use_is_in_the_table_and_no_other() {
        let mut used = BTreeSet::new();
        codes_in(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut used,
        );
        let listed: BTreeSet<String> = CODES.iter().map(|c| c.code.to_owned()).collect();
        assert_eq!(listed.len(), CODES.len(), "a code is listed twice");
        let missing: Vec<_> = used.difference(&listed).collect();
        let unused: Vec<_> = listed.difference(&used).collect();
        assert!(
            missing.is_empty() && unused.is_empty(),
            "codes used but not in diagnostics/codes.rs: {missing:?}; listed but not used: {unused:?}"
        );
    }

    #[test]
    fn each_stage_is_one_run_of_the_table() {
        let mut seen = Vec::new();
        for code in CODES {
            if seen.last() != Some(&code.stage) {
                assert!(
                    !seen.contains(&code.stage),
                    "{} is apart from its stage",
                    code.code
                );
                seen.push(code.stage);
            }
        }
    }
}
