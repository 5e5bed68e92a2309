//! The manifest schema as data.
//!
//! Every node, argument and property the manifest language knows is a value in the tables
//! below. The validator walks a KDL document against them, and `schema/appliance.schema.kdl`
//! and `schema/reference.md` are generated from them (see [`crate::manifest::reference`]), so
//! the documentation cannot drift from the code: a test regenerates both and compares.

use serde::Serialize;

use super::grammar::{self, Grammar};

/// The largest disk an output may ask for. Bigger requests are typos or attacks
/// (docs/HOSTILE.md item 25); 16 TiB is the ext4 limit with 4 KiB blocks.
pub const MAX_DISK_BYTES: u64 = 16 << 40;
/// The smallest disk that holds an ESP and a Debian root.
pub const MIN_DISK_BYTES: u64 = 64 << 20;
/// Manifests larger than this are refused before parsing.
pub const MAX_MANIFEST_BYTES: usize = 1 << 20;
/// Deeper nesting than this is refused before parsing: the manifest language needs three
/// levels, and the KDL parser recurses once per level.
pub const MAX_NESTING: usize = 16;

/// What a single KDL value must be.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ValueKind {
    /// A string matching a grammar.
    String {
        #[serde(rename = "grammar", serialize_with = "grammar_name")]
        grammar: &'static Grammar,
    },
    /// One of a fixed set of strings.
    Choice {
        choices: &'static [&'static str],
    },
    Bool,
    /// A permission mode written in octal, `0o644`; at most `0o7777`.
    Mode,
    /// A TCP or UDP port, 1–65535.
    Port,
    /// A byte size: an integer, or a string with a binary suffix (`512M`, `2G`, `2GiB`).
    Size,
    /// A number between 0 and 1.
    Fraction,
    /// A user or group id, 0–4294967294 (the last value is "no id" to the kernel).
    Id,
    /// A small positive count, 1–1000.
    Count,
    /// A duration: `"30s"`, `"10m"`, `"2h"` (or a whole number of seconds), 1 s – 7 days.
    Duration,
}

fn grammar_name<S: serde::Serializer>(grammar: &&'static Grammar, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(grammar.name)
}

impl ValueKind {
    /// A short description of the expected value, used in messages and docs.
    pub fn describe(&self) -> String {
        match self {
            ValueKind::String { grammar } => format!("a string ({})", grammar.name),
            ValueKind::Choice { choices } => {
                let quoted: Vec<String> = choices.iter().map(|c| format!("\"{c}\"")).collect();
                format!("one of {}", quoted.join(", "))
            }
            ValueKind::Bool => "a boolean (#true or #false)".into(),
            ValueKind::Mode => "an octal mode such as 0o644".into(),
            ValueKind::Port => "a port number, 1–65535".into(),
            ValueKind::Size => "a size such as \"2G\" or \"512M\", or a number of bytes".into(),
            ValueKind::Fraction => "a number between 0 and 1".into(),
            ValueKind::Id => "a numeric id, 0–4294967294".into(),
            ValueKind::Count => "a whole number, 1–1000".into(),
            ValueKind::Duration => {
                "a duration such as \"30s\", \"10m\" or \"2h\", or a number of seconds".into()
            }
        }
    }
}

const fn string(grammar: &'static Grammar) -> ValueKind {
    ValueKind::String { grammar }
}

/// The positional arguments of a node.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Args {
    /// What the arguments mean, for messages ("package name").
    pub what: &'static str,
    pub kind: ValueKind,
    pub min: usize,
    /// `None`: unbounded.
    pub max: Option<usize>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Prop {
    pub name: &'static str,
    pub kind: ValueKind,
    pub required: bool,
    pub summary: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Repeat {
    /// At most once in its parent.
    Once,
    /// Any number of times.
    Many,
}

#[derive(Debug, Serialize)]
pub struct NodeSpec {
    pub name: &'static str,
    pub summary: &'static str,
    pub args: Option<Args>,
    pub props: &'static [Prop],
    pub children: &'static [NodeSpec],
    pub repeat: Repeat,
    pub required: bool,
    pub example: &'static str,
}

impl NodeSpec {
    pub fn child(&self, name: &str) -> Option<&'static NodeSpec> {
        // `children` is always a `'static` slice; re-borrow it as such.
        let children: &'static [NodeSpec] = self.children;
        children.iter().find(|child| child.name == name)
    }

    pub fn prop(&self, name: &str) -> Option<&'static Prop> {
        let props: &'static [Prop] = self.props;
        props.iter().find(|prop| prop.name == name)
    }
}

const fn prop(name: &'static str, kind: ValueKind, summary: &'static str) -> Prop {
    Prop {
        name,
        kind,
        required: false,
        summary,
    }
}

const fn required(name: &'static str, kind: ValueKind, summary: &'static str) -> Prop {
    Prop {
        name,
        kind,
        required: true,
        summary,
    }
}

const fn args(what: &'static str, kind: ValueKind, min: usize, max: Option<usize>) -> Option<Args> {
    Some(Args {
        what,
        kind,
        min,
        max,
    })
}

const fn node(
    name: &'static str,
    summary: &'static str,
    args: Option<Args>,
    props: &'static [Prop],
    repeat: Repeat,
    example: &'static str,
) -> NodeSpec {
    NodeSpec {
        name,
        summary,
        args,
        props,
        children: &[],
        repeat,
        required: false,
        example,
    }
}

/// An output format: its name, what it writes, and which `output` properties apply to it.
#[derive(Debug, Serialize)]
pub struct OutputFormat {
    pub name: &'static str,
    pub summary: &'static str,
    pub props: &'static [&'static str],
    /// Whether the format is a bootable disk (and so needs a kernel in the image).
    pub disk: bool,
}

/// The registry of output formats.
pub static OUTPUT_FORMATS: &[OutputFormat] = &[
    OutputFormat {
        name: "tar",
        summary: "the root filesystem as a deterministic `.tar.zst`",
        props: &["name"],
        disk: false,
    },
    OutputFormat {
        name: "oci",
        summary: "an OCI image layout and archive, one layer per lineage step",
        props: &["name", "tag", "user", "workdir"],
        disk: false,
    },
    OutputFormat {
        name: "raw",
        summary: "a sparse GPT disk: EFI system partition and ext4 root, boots under UEFI",
        props: &["name", "size"],
        disk: true,
    },
    OutputFormat {
        name: "qcow2",
        summary: "the raw disk as qcow2",
        props: &["name", "size"],
        disk: true,
    },
];

pub fn output_format(name: &str) -> Option<&'static OutputFormat> {
    OUTPUT_FORMATS.iter().find(|format| format.name == name)
}

const OUTPUT_FORMAT_NAMES: &[&str] = &["tar", "oci", "raw", "qcow2"];

static USER_CHILDREN: [NodeSpec; 1] = [node(
    "ssh-key",
    "An OpenSSH public key allowed to log in as the user.",
    args("public key", string(&grammar::SSH_KEY), 1, Some(1)),
    &[],
    Repeat::Many,
    r#"ssh-key "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGSc… admin@laptop""#,
)];

static OCI_CHILDREN: [NodeSpec; 4] = [
    node(
        "entrypoint",
        "The image's entrypoint, as an argument vector.",
        args("argument", string(&grammar::TEXT), 1, None),
        &[],
        Repeat::Once,
        r#"entrypoint "/usr/local/bin/api""#,
    ),
    node(
        "cmd",
        "The default arguments, as an argument vector.",
        args("argument", string(&grammar::TEXT), 1, None),
        &[],
        Repeat::Once,
        r#"cmd "--port" "8080""#,
    ),
    node(
        "env",
        "An environment variable of the image's config: name (env-name), then value.",
        args("name and value", string(&grammar::TEXT), 2, Some(2)),
        &[],
        Repeat::Many,
        r#"env "RUST_LOG" "info""#,
    ),
    node(
        "expose",
        "A port the image listens on (`tcp` unless `protocol` says otherwise).",
        args("port", ValueKind::Port, 1, Some(1)),
        &[prop(
            "protocol",
            ValueKind::Choice {
                choices: &["tcp", "udp"],
            },
            "`tcp` (default) or `udp`",
        )],
        Repeat::Many,
        "expose 8080",
    ),
];

static SUGGEST_CHILDREN: [NodeSpec; 1] = [node(
    "ignore",
    "Silence suggestions by key, as printed with each suggestion.",
    args("suggestion key", string(&grammar::SUGGESTION_KEY), 1, None),
    &[],
    Repeat::Many,
    r#"ignore "package-added:vim""#,
)];

static CAPTURE_CHILDREN: [NodeSpec; 1] = [node(
    "ignore",
    "Paths `capture` leaves out, on top of the runtime noise it always leaves out.",
    args("image glob", string(&grammar::IMAGE_GLOB), 1, None),
    &[],
    Repeat::Many,
    r#"ignore "/var/lib/app/cache/**""#,
)];

/// The children of an `appliance` node, in the order the reference documents them.
static APPLIANCE_CHILDREN: [NodeSpec; 22] = [
    node(
        "description",
        "One line saying what the appliance is for.",
        args("text", string(&grammar::TEXT), 1, Some(1)),
        &[],
        Repeat::Once,
        r#"description "nginx in front of our API""#,
    ),
    NodeSpec {
        required: true,
        ..node(
            "base",
            "The image the appliance starts from: a stored image by name (with an optional \
             version requirement), or another appliance of the workspace.",
            args("image name", string(&grammar::IMAGE_NAME), 0, Some(1)),
            &[
                prop(
                    "version",
                    string(&grammar::VERSION_REQ),
                    "which stored versions are acceptable; the newest match wins",
                ),
                prop(
                    "appliance",
                    string(&grammar::APPLIANCE_NAME),
                    "derive from this appliance of the workspace instead of a stored image",
                ),
                prop(
                    "registry",
                    string(&grammar::REGISTRY_PREFIX),
                    "when the store has no match, pull `HOST/PREFIX/NAME` from this OCI registry (its tags are the versions; `APPLIANCE_REGISTRY` sets a default for every base)",
                ),
            ],
            Repeat::Once,
            r#"base "debian/bookworm" version=">=2" registry="registry.example:5000/team""#,
        )
    },
    node(
        "packages",
        "Debian packages to install (dependencies follow; Recommends only when asked).",
        args("package name", string(&grammar::PACKAGE_NAME), 1, None),
        &[prop(
            "recommends",
            ValueKind::Bool,
            "also install the Recommends of these packages",
        )],
        Repeat::Many,
        r#"packages "nginx" "openssh-server""#,
    ),
    node(
        "remove",
        "Debian packages to remove from the base.",
        args("package name", string(&grammar::PACKAGE_NAME), 1, None),
        &[],
        Repeat::Many,
        r#"remove "vim-tiny""#,
    ),
    node(
        "kernel",
        "The kernel package for disk outputs (default `linux-image-amd64`).",
        args("package name", string(&grammar::PACKAGE_NAME), 1, Some(1)),
        &[],
        Repeat::Once,
        r#"kernel "linux-image-cloud-amd64""#,
    ),
    node(
        "binary",
        "A binary target of the workspace, built by cargo and installed into the image.",
        args("binary name", string(&grammar::CARGO_NAME), 1, Some(1)),
        &[
            prop(
                "package",
                string(&grammar::CARGO_NAME),
                "the workspace package that has the binary (needed when several do)",
            ),
            prop(
                "to",
                string(&grammar::IMAGE_PATH),
                "where to install it (default `/usr/local/bin/<name>`)",
            ),
            prop(
                "target",
                string(&grammar::TARGET_TRIPLE),
                "build for this target triple",
            ),
            prop(
                "profile",
                string(&grammar::CARGO_NAME),
                "cargo profile (default `release`)",
            ),
            prop("mode", ValueKind::Mode, "file mode (default 0o755)"),
        ],
        Repeat::Many,
        r#"binary "api" package="api-server" to="/usr/local/bin/api""#,
    ),
    node(
        "copy",
        "Files from the workspace into the image: a file, a directory (copied whole, symlinks \
         kept as symlinks) or a glob. Sources are relative to the manifest's directory and \
         must stay inside the workspace.",
        args("source", string(&grammar::SOURCE_PATH), 1, Some(1)),
        &[
            required(
                "to",
                string(&grammar::IMAGE_PATH),
                "destination; a trailing `/` copies into that directory",
            ),
            prop(
                "mode",
                ValueKind::Mode,
                "mode of copied files (default: the source's)",
            ),
            prop(
                "owner",
                string(&grammar::USER_NAME),
                "owner, by name (default root)",
            ),
            prop(
                "group",
                string(&grammar::USER_NAME),
                "group, by name (default root)",
            ),
            prop(
                "allow-outside-workspace",
                ValueKind::Bool,
                "allow a source that resolves outside the workspace",
            ),
        ],
        Repeat::Many,
        r#"copy "deploy/nginx.conf" to="/etc/nginx/nginx.conf" mode=0o644"#,
    ),
    NodeSpec {
        children: &USER_CHILDREN,
        ..node(
            "user",
            "A user account, created with its group, passwd, shadow and home directory; \
         `ssh-key` children and `authorized-keys=` go to its `~/.ssh/authorized_keys`.",
            args("user name", string(&grammar::USER_NAME), 1, Some(1)),
            &[
                prop(
                    "system",
                    ValueKind::Bool,
                    "a system account (id below 1000, no login)",
                ),
                prop("uid", ValueKind::Id, "numeric user id (default: allocated)"),
                prop(
                    "group",
                    string(&grammar::USER_NAME),
                    "primary group (default: the user's own)",
                ),
                prop(
                    "groups",
                    string(&grammar::USER_LIST),
                    "supplementary groups, comma-separated",
                ),
                prop("home", string(&grammar::IMAGE_PATH), "home directory"),
                prop("shell", string(&grammar::IMAGE_PATH), "login shell"),
                prop("comment", string(&grammar::TEXT), "the GECOS field"),
                prop(
                    "password-hash",
                    string(&grammar::PASSWORD_HASH),
                    "the password as a crypt(3) hash for /etc/shadow (default: none, login by key only)",
                ),
                prop(
                    "authorized-keys",
                    string(&grammar::SOURCE_PATH),
                    "a workspace file of OpenSSH public keys (one per line) for ~/.ssh/authorized_keys",
                ),
            ],
            Repeat::Many,
            r#"user "admin" groups="sudo" authorized-keys="deploy/admin.pub""#,
        )
    },
    node(
        "group",
        "A group.",
        args("group name", string(&grammar::USER_NAME), 1, Some(1)),
        &[
            prop("system", ValueKind::Bool, "a system group (id below 1000)"),
            prop(
                "gid",
                ValueKind::Id,
                "numeric group id (default: allocated)",
            ),
        ],
        Repeat::Many,
        r#"group "api" system=#true"#,
    ),
    node(
        "service",
        "A systemd unit to enable (the links `systemctl enable` makes) or disable.",
        args("unit name", string(&grammar::UNIT_NAME), 1, Some(1)),
        &[prop(
            "enable",
            ValueKind::Bool,
            "#true (default) enables, #false disables",
        )],
        Repeat::Many,
        r#"service "api.service" enable=#true"#,
    ),
    node(
        "hostname",
        "The static host name (`/etc/hostname`).",
        args("host name", string(&grammar::HOSTNAME), 1, Some(1)),
        &[],
        Repeat::Once,
        r#"hostname "web""#,
    ),
    node(
        "timezone",
        "The time zone (`/etc/localtime`).",
        args("time zone", string(&grammar::TIMEZONE), 1, Some(1)),
        &[],
        Repeat::Once,
        r#"timezone "Europe/Paris""#,
    ),
    node(
        "locale",
        "The default locale (`/etc/default/locale`).",
        args("locale", string(&grammar::LOCALE), 1, Some(1)),
        &[],
        Repeat::Once,
        r#"locale "en_US.UTF-8""#,
    ),
    node(
        "kernel-cmdline",
        "Words appended to the kernel command line of disk outputs.",
        args("word", string(&grammar::KERNEL_ARG), 1, None),
        &[],
        Repeat::Many,
        r#"kernel-cmdline "console=ttyS0""#,
    ),
    node(
        "run",
        "A shell script run inside the image at build time, in the same sandbox as apt: \
         inline, or from a file of the workspace with `script=`.",
        args("script", string(&grammar::SCRIPT), 0, Some(1)),
        &[
            prop(
                "script",
                string(&grammar::SOURCE_PATH),
                "a script file, relative to the manifest's directory",
            ),
            prop(
                "timeout",
                ValueKind::Duration,
                "how long the script may run (default 30 minutes); then its whole sandbox is \
                 killed and the build fails",
            ),
        ],
        Repeat::Many,
        r#"run "update-ca-certificates" timeout="5m""#,
    ),
    node(
        "forward",
        "A port forwarded from the host's loopback to the guest by `cargo appliance run`.",
        None,
        &[
            required("host", ValueKind::Port, "port on the host's loopback"),
            required("guest", ValueKind::Port, "port in the guest"),
            prop(
                "protocol",
                ValueKind::Choice {
                    choices: &["tcp", "udp"],
                },
                "`tcp` (default) or `udp`",
            ),
        ],
        Repeat::Many,
        "forward host=8080 guest=80",
    ),
    NodeSpec {
        children: &OCI_CHILDREN,
        ..node(
            "output",
            "An artifact to write; see the output formats below for each format's options. \
             Children (`entrypoint`, `cmd`, `env`, `expose`) apply to `oci`.",
            args(
                "format",
                ValueKind::Choice {
                    choices: OUTPUT_FORMAT_NAMES,
                },
                1,
                Some(1),
            ),
            &[
                prop(
                    "name",
                    string(&grammar::APPLIANCE_NAME),
                    "file name stem (default: the appliance's name)",
                ),
                prop(
                    "size",
                    ValueKind::Size,
                    "disk size (default: the tree plus headroom)",
                ),
                prop("tag", string(&grammar::OCI_TAG), "the OCI reference to tag"),
                prop(
                    "user",
                    string(&grammar::USER_NAME),
                    "the user the OCI image runs as",
                ),
                prop(
                    "workdir",
                    string(&grammar::IMAGE_PATH),
                    "the OCI working directory",
                ),
            ],
            Repeat::Many,
            r#"output "qcow2" size="2G""#,
        )
    },
    NodeSpec {
        children: &SUGGEST_CHILDREN,
        ..node(
            "suggest",
            "Tune the suggestions printed for this appliance.",
            None,
            &[
                prop("limit", ValueKind::Count, "how many suggestions to show"),
                prop(
                    "min-support",
                    ValueKind::Fraction,
                    "hide suggestions seen in fewer derived images than this share",
                ),
                prop(
                    "min-confidence",
                    ValueKind::Fraction,
                    "hide suggestions whose confidence is below this",
                ),
            ],
            Repeat::Once,
            r#"suggest limit=5 { ignore "package-added:vim" }"#,
        )
    },
    NodeSpec {
        children: &CAPTURE_CHILDREN,
        ..node(
            "capture",
            "Tune `cargo appliance capture`, which turns a test drive's changes into manifest edits.",
            None,
            &[],
            Repeat::Once,
            r#"capture { ignore "/var/lib/app/cache/**" }"#,
        )
    },
    node(
        "env",
        "An environment variable written to `/etc/environment`: name (env-name), then value.",
        args("name and value", string(&grammar::TEXT), 2, Some(2)),
        &[],
        Repeat::Many,
        r#"env "RUST_LOG" "info""#,
    ),
    node(
        "mkdir",
        "An empty directory in the image.",
        args("path", string(&grammar::IMAGE_PATH), 1, Some(1)),
        &[
            prop("mode", ValueKind::Mode, "mode (default 0o755)"),
            prop(
                "owner",
                string(&grammar::USER_NAME),
                "owner, by name (default root)",
            ),
            prop(
                "group",
                string(&grammar::USER_NAME),
                "group, by name (default root)",
            ),
        ],
        Repeat::Many,
        r#"mkdir "/var/lib/api" owner="api" mode=0o750"#,
    ),
    node(
        "symlink",
        "A symbolic link in the image.",
        args("path", string(&grammar::IMAGE_PATH), 1, Some(1)),
        &[required(
            "target",
            string(&grammar::TEXT),
            "what the link points to",
        )],
        Repeat::Many,
        r#"symlink "/usr/bin/api" target="/usr/local/bin/api""#,
    ),
];

/// The root of the schema: the only node allowed at the top of a manifest.
pub static APPLIANCE: NodeSpec = NodeSpec {
    name: "appliance",
    summary: "An appliance: a root tree built from a base, and the outputs written from it. \
              A manifest holds one or more.",
    args: args(
        "appliance name",
        string(&grammar::APPLIANCE_NAME),
        1,
        Some(1),
    ),
    props: &[],
    children: &APPLIANCE_CHILDREN,
    repeat: Repeat::Many,
    required: true,
    example: r#"appliance "web" { ... }"#,
};

/// Every grammar the schema uses, for the reference.
pub static GRAMMARS: &[&Grammar] = &[
    &grammar::APPLIANCE_NAME,
    &grammar::IMAGE_NAME,
    &grammar::VERSION_REQ,
    &grammar::REGISTRY_PREFIX,
    &grammar::PASSWORD_HASH,
    &grammar::SSH_KEY,
    &grammar::PACKAGE_NAME,
    &grammar::CARGO_NAME,
    &grammar::TARGET_TRIPLE,
    &grammar::SOURCE_PATH,
    &grammar::IMAGE_PATH,
    &grammar::USER_NAME,
    &grammar::USER_LIST,
    &grammar::UNIT_NAME,
    &grammar::HOSTNAME,
    &grammar::TIMEZONE,
    &grammar::LOCALE,
    &grammar::KERNEL_ARG,
    &grammar::TEXT,
    &grammar::SCRIPT,
    &grammar::OCI_TAG,
    &grammar::ENV_NAME,
    &grammar::SUGGESTION_KEY,
    &grammar::IMAGE_GLOB,
];

#[cfg(test)]
mod tests {
    use super::*;

    fn walk(spec: &NodeSpec, seen: &mut Vec<&'static str>) {
        for child in spec.children {
            walk(child, seen);
        }
        for prop in spec.props {
            if let ValueKind::String { grammar } = prop.kind {
                seen.push(grammar.name);
            }
        }
        if let Some(Args {
            kind: ValueKind::String { grammar },
            ..
        }) = spec.args
        {
            seen.push(grammar.name);
        }
    }

    #[test]
    fn every_used_grammar_is_documented() {
        let mut used = Vec::new();
        walk(&APPLIANCE, &mut used);
        for name in used {
            assert!(
                GRAMMARS.iter().any(|g| g.name == name),
                "grammar {name} is used but missing from GRAMMARS"
            );
        }
    }

    #[test]
    fn output_format_props_exist_on_the_output_node() {
        let output = APPLIANCE.child("output").expect("output node exists");
        for format in OUTPUT_FORMATS {
            assert!(OUTPUT_FORMAT_NAMES.contains(&format.name));
            for prop in format.props {
                assert!(output.prop(prop).is_some(), "{}: {prop}", format.name);
            }
        }
        assert_eq!(OUTPUT_FORMAT_NAMES.len(), OUTPUT_FORMATS.len());
    }

    #[test]
    fn sibling_names_are_unique() {
        fn check(spec: &NodeSpec) {
            let mut names: Vec<_> = spec.children.iter().map(|c| c.name).collect();
            names.sort_unstable();
            names.dedup();
            assert_eq!(
                names.len(),
                spec.children.len(),
                "duplicate child of {}",
                spec.name
            );
            spec.children.iter().for_each(check);
        }
        check(&APPLIANCE);
    }
}
