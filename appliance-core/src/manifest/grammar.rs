//! Field grammars: what a name, path or token in a manifest may look like.
//!
//! These are deliberately strict. Values from a manifest end up in passwd files, unit names,
//! kernel command lines and file paths; a grammar that admits `;`, `$(`, newlines or `..`
//! would let a manifest smuggle something a reviewer did not see (docs/HOSTILE.md item 28). Every
//! check is pure and total: any `&str` gives `Ok` or a message, never a panic.

use serde::Serialize;

/// A named rule for string values, documented in the schema reference.
#[derive(Debug, Serialize)]
pub struct Grammar {
    pub name: &'static str,
    pub description: &'static str,
    #[serde(skip)]
    pub check: fn(&str) -> Result<(), String>,
}

/// The longest path or token we accept. Linux' PATH_MAX; longer values are never legitimate.
pub const MAX_PATH_LEN: usize = 4096;
/// Longest single path component (NAME_MAX on every Linux filesystem we write).
pub const MAX_COMPONENT_LEN: usize = 255;

fn no_control(value: &str) -> Result<(), String> {
    match value.chars().find(|c| c.is_control()) {
        Some(c) => Err(format!("contains the control character {c:?}")),
        None => Ok(()),
    }
}

fn bounded(value: &str, max: usize) -> Result<(), String> {
    if value.is_empty() {
        return Err("is empty".into());
    }
    if value.len() > max {
        return Err(format!(
            "is {} bytes long; at most {max} are allowed",
            value.len()
        ));
    }
    Ok(())
}

fn only(value: &str, allowed: impl Fn(char) -> bool, what: &str) -> Result<(), String> {
    match value.chars().find(|c| !allowed(*c)) {
        Some(c) => Err(format!("contains {c:?}, which is not allowed in {what}")),
        None => Ok(()),
    }
}

/// A lowercase identifier: `[a-z0-9][a-z0-9._-]*`.
fn slug(value: &str, max: usize, what: &str) -> Result<(), String> {
    bounded(value, max)?;
    only(
        value,
        |c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'),
        what,
    )?;
    if !value.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit()) {
        return Err(format!(
            "must start with a lowercase letter or a digit ({what})"
        ));
    }
    Ok(())
}

fn check_appliance_name(value: &str) -> Result<(), String> {
    slug(value, 63, "appliance names")
}

fn check_image_name(value: &str) -> Result<(), String> {
    bounded(value, 255)?;
    for part in value.split('/') {
        slug(part, 63, "image names").map_err(|e| {
            if part.is_empty() {
                "has an empty path segment".to_owned()
            } else {
                e
            }
        })?;
    }
    Ok(())
}

fn check_version_req(value: &str) -> Result<(), String> {
    crate::manifest::version::VersionReq::parse(value).map(|_| ())
}

/// Debian policy §5.6.1: lowercase letters, digits, `+`, `-`, `.`; at least two characters;
/// starts with an alphanumeric.
fn check_package_name(value: &str) -> Result<(), String> {
    bounded(value, 128)?;
    only(
        value,
        |c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '+' | '-' | '.'),
        "Debian package names",
    )?;
    if value.len() < 2 || !value.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err("must be at least two characters and start with a letter or digit".into());
    }
    Ok(())
}

/// Cargo package and target names.
fn check_cargo_name(value: &str) -> Result<(), String> {
    bounded(value, 64)?;
    only(
        value,
        |c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'),
        "Cargo package and binary names",
    )
}

fn check_target_triple(value: &str) -> Result<(), String> {
    bounded(value, 64)?;
    only(
        value,
        |c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'),
        "target triples",
    )
}

/// A path inside the workspace, relative to the manifest's directory; may be a glob.
fn check_source_path(value: &str) -> Result<(), String> {
    bounded(value, MAX_PATH_LEN)?;
    no_control(value)?;
    if value.starts_with('/') {
        return Err("is absolute; copy sources are relative to the manifest's directory".into());
    }
    components_fit(value)
}

fn components_fit(value: &str) -> Result<(), String> {
    match value.split('/').find(|c| c.len() > MAX_COMPONENT_LEN) {
        Some(_) => Err(format!(
            "has a path component longer than {MAX_COMPONENT_LEN} bytes"
        )),
        None => Ok(()),
    }
}

/// An absolute path inside the image: no `..`, no control characters.
fn check_image_path(value: &str) -> Result<(), String> {
    bounded(value, MAX_PATH_LEN)?;
    no_control(value)?;
    if !value.starts_with('/') {
        return Err("must be absolute (start with /)".into());
    }
    if value.split('/').any(|c| c == "..") {
        return Err("must not contain `..`".into());
    }
    components_fit(value)
}

/// shadow-utils' default NAME_REGEX, without the uppercase leniency: `[a-z_][a-z0-9_-]*[$]?`.
fn check_user_name(value: &str) -> Result<(), String> {
    bounded(value, 32)?;
    let body = value.strip_suffix('$').unwrap_or(value);
    only(
        body,
        |c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-'),
        "user and group names",
    )?;
    if !body.starts_with(|c: char| c.is_ascii_lowercase() || c == '_') {
        return Err("must start with a lowercase letter or `_`".into());
    }
    Ok(())
}

fn check_user_list(value: &str) -> Result<(), String> {
    value.split(',').try_for_each(|name| {
        check_user_name(name.trim()).map_err(|e| format!("`{}` {e}", name.trim()))
    })
}

const UNIT_SUFFIXES: [&str; 11] = [
    ".service",
    ".socket",
    ".timer",
    ".target",
    ".path",
    ".mount",
    ".automount",
    ".swap",
    ".slice",
    ".scope",
    ".device",
];

/// systemd unit names: `[A-Za-z0-9:_.\\@-]+` with a unit type suffix.
fn check_unit_name(value: &str) -> Result<(), String> {
    bounded(value, 255)?;
    only(
        value,
        |c| c.is_ascii_alphanumeric() || matches!(c, ':' | '_' | '.' | '\\' | '@' | '-'),
        "systemd unit names",
    )?;
    if !UNIT_SUFFIXES.iter().any(|suffix| value.ends_with(suffix)) {
        return Err(format!(
            "has no unit type suffix (one of {})",
            UNIT_SUFFIXES.join(", ")
        ));
    }
    Ok(())
}

/// RFC 1123 host names: dot-separated labels of letters, digits and inner hyphens.
fn check_hostname(value: &str) -> Result<(), String> {
    bounded(value, 253)?;
    for label in value.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("has an empty label or one longer than 63 characters".into());
        }
        only(
            label,
            |c| c.is_ascii_alphanumeric() || c == '-',
            "host names",
        )?;
        if label.starts_with('-') || label.ends_with('-') {
            return Err("has a label that starts or ends with `-`".into());
        }
    }
    Ok(())
}

/// tz database names such as `Europe/Paris`, `UTC` or `Etc/GMT+1`.
fn check_timezone(value: &str) -> Result<(), String> {
    bounded(value, 64)?;
    only(
        value,
        |c| c.is_ascii_alphanumeric() || matches!(c, '/' | '_' | '+' | '-'),
        "time zone names",
    )?;
    if value.split('/').any(|part| part.is_empty() || part == "..") {
        return Err("must be a tz database name such as `Europe/Paris`".into());
    }
    Ok(())
}

/// POSIX locale names such as `en_US.UTF-8` or `de_DE@euro`.
fn check_locale(value: &str) -> Result<(), String> {
    bounded(value, 64)?;
    only(
        value,
        |c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '@'),
        "locale names",
    )
}

/// One kernel command-line word: printable, no whitespace, no quotes.
fn check_kernel_arg(value: &str) -> Result<(), String> {
    bounded(value, 1024)?;
    only(
        value,
        |c| c.is_ascii_graphic() && !matches!(c, '"' | '\'' | '$' | '`' | ';' | '\\'),
        "kernel command-line words (give each word as its own argument)",
    )
}

/// Free text shown to people: single line, no control characters.
fn check_text(value: &str) -> Result<(), String> {
    if value.len() > 4096 {
        return Err("is longer than 4096 bytes".into());
    }
    no_control(value)
}

/// A shell script body: any text without NUL, which no shell can pass through.
fn check_script(value: &str) -> Result<(), String> {
    if value.len() > 1 << 20 {
        return Err("is longer than 1 MiB; put it in a file and use `script=`".into());
    }
    if value.contains('\0') {
        return Err("contains a NUL byte".into());
    }
    if value.trim().is_empty() {
        return Err("is empty".into());
    }
    Ok(())
}

/// An OCI image reference as `name[:tag]`, lowercase repository path (distribution spec).
fn check_oci_tag(value: &str) -> Result<(), String> {
    bounded(value, 255)?;
    let (name, tag) = match value.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => (name, Some(tag)),
        _ => (value, None),
    };
    for part in name.split('/') {
        if part.is_empty() {
            return Err("has an empty path segment".into());
        }
        only(
            part,
            |c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-' | ':'),
            "image repository names",
        )?;
    }
    if let Some(tag) = tag {
        bounded(tag, 128)?;
        only(
            tag,
            |c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'),
            "image tags",
        )?;
    }
    Ok(())
}

/// Environment variable names: `[A-Za-z_][A-Za-z0-9_]*`.
fn check_env_name(value: &str) -> Result<(), String> {
    bounded(value, 256)?;
    only(
        value,
        |c| c.is_ascii_alphanumeric() || c == '_',
        "environment variable names",
    )?;
    if value.starts_with(|c: char| c.is_ascii_digit()) {
        return Err("must not start with a digit".into());
    }
    Ok(())
}

/// `kind:subject`, as printed with every suggestion.
fn check_suggestion_key(value: &str) -> Result<(), String> {
    bounded(value, 512)?;
    no_control(value)?;
    match value.split_once(':') {
        Some((kind, subject)) if !kind.is_empty() && !subject.is_empty() => {
            slug(kind, 64, "suggestion kinds")
        }
        _ => Err("must be `kind:subject`, e.g. `package-added:vim`".into()),
    }
}

/// A glob over image paths (`/var/lib/app/**`): absolute, without `..`, and one globset
/// accepts (`*` stays within a component, `**` crosses them).
fn check_image_glob(value: &str) -> Result<(), String> {
    check_image_path(value)?;
    globset::GlobBuilder::new(value)
        .literal_separator(true)
        .build()
        .map(drop)
        .map_err(|e| format!("is not a glob: {}", e.kind()))
}

/// A crypt(3) hash as `/etc/shadow` holds it: `$id$[params$]salt$hash` with a known scheme
/// (yescrypt `$y$`, `$gy$`, `$7$`, bcrypt `$2b$`/`$2a$`/`$2y$`, SHA-512 `$6$`, SHA-256
/// `$5$`), or `!`/`*` for a locked password. Anything else is refused, a clear-text password
/// above all: a manifest is committed, and a password in it is a password in the repository.
fn check_password_hash(value: &str) -> Result<(), String> {
    bounded(value, 512)?;
    if value == "!" || value == "*" {
        return Ok(());
    }
    let hint = "give a crypt(3) hash, e.g. from `mkpasswd -m yescrypt` or `openssl passwd -6`, never the password itself";
    let Some(rest) = value.strip_prefix('$') else {
        return Err(format!(
            "is not a crypt(3) hash (it does not start with `$`): {hint}"
        ));
    };
    let scheme = rest.split('$').next().unwrap_or_default();
    if !matches!(scheme, "y" | "gy" | "7" | "2b" | "2a" | "2y" | "6" | "5") {
        return Err(format!(
            "uses the scheme `${scheme}$`, which is not one of yescrypt (`$y$`), bcrypt (`$2b$`), SHA-512 (`$6$`) or SHA-256 (`$5$`): {hint}"
        ));
    }
    only(
        value,
        |c| c.is_ascii_alphanumeric() || matches!(c, '$' | '.' | '/' | '=' | ','),
        "crypt(3) hashes",
    )?;
    let fields: Vec<&str> = rest.split('$').collect();
    if fields.len() < 3 || fields.iter().skip(1).any(|f| f.is_empty()) {
        return Err(format!(
            "is not a whole crypt(3) hash (`$id$salt$hash`): {hint}"
        ));
    }
    Ok(())
}

/// One OpenSSH public key line: `TYPE BASE64 [COMMENT]`, the key blob decoding to a blob
/// that names the same type (what `ssh-keygen -l` checks first).
pub fn check_ssh_key(value: &str) -> Result<(), String> {
    use base64::Engine as _;
    bounded(value, 16 * 1024)?;
    no_control(value)?;
    let mut words = value.split_ascii_whitespace();
    let (Some(kind), Some(blob)) = (words.next(), words.next()) else {
        return Err(
            "is not an OpenSSH public key (`ssh-ed25519 AAAA… comment`, one line of a .pub file)"
                .into(),
        );
    };
    const TYPES: &[&str] = &[
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    ];
    if !TYPES.contains(&kind) {
        return Err(format!(
            "has the key type `{kind}`, which is not one OpenSSH accepts ({}); options before the key are not supported",
            TYPES.join(", ")
        ));
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(blob)
        .map_err(|_| "has a key that is not valid base64".to_owned())?;
    let named = decoded
        .get(..4)
        .and_then(|len| <[u8; 4]>::try_from(len).ok())
        .map(|len| u32::from_be_bytes(len) as usize)
        .and_then(|len| decoded.get(4..4 + len));
    if named != Some(kind.as_bytes()) {
        return Err(format!(
            "has a key blob that is not a `{kind}` key (damaged, or pasted from another key)"
        ));
    }
    Ok(())
}

/// `HOST[:PORT]/PREFIX` of an OCI registry: what a reference is before `/NAME:TAG`.
fn check_registry_prefix(value: &str) -> Result<(), String> {
    bounded(value, 200)?;
    no_control(value)?;
    if value.ends_with('/') || value.contains('@') {
        return Err(
            "must be `HOST[:PORT]` or `HOST[:PORT]/PREFIX`, without a trailing `/` or a digest"
                .into(),
        );
    }
    crate::image_reference::Reference::parse(&format!("{value}/name"))
        .map(|_| ())
        .map_err(|e| e.replace("`/name`", ""))
}

macro_rules! grammar {
    ($ident:ident, $name:literal, $check:ident, $description:literal) => {
        pub static $ident: Grammar = Grammar {
            name: $name,
            description: $description,
            check: $check,
        };
    };
}

grammar!(
    APPLIANCE_NAME,
    "appliance-name",
    check_appliance_name,
    "lowercase letters, digits, `.`, `_`, `-`; starts with a letter or digit; at most 63 bytes"
);
grammar!(
    IMAGE_NAME,
    "image-name",
    check_image_name,
    "`/`-separated segments of lowercase letters, digits, `.`, `_`, `-`, e.g. `debian/bookworm`"
);
grammar!(
    PASSWORD_HASH,
    "password-hash",
    check_password_hash,
    "a crypt(3) hash (`$y$…` yescrypt, `$2b$…` bcrypt, `$6$…` SHA-512, `$5$…` SHA-256), or `!`/`*` for none; never a clear-text password"
);
grammar!(
    SSH_KEY,
    "ssh-key",
    check_ssh_key,
    "one OpenSSH public key line: `TYPE BASE64 [COMMENT]`, e.g. `ssh-ed25519 AAAAC3… admin@laptop`"
);
grammar!(
    REGISTRY_PREFIX,
    "registry-prefix",
    check_registry_prefix,
    "an OCI registry and an optional path: `HOST[:PORT]` or `HOST[:PORT]/PREFIX`, e.g. `registry.example:5000/team`"
);
grammar!(
    VERSION_REQ,
    "version-req",
    check_version_req,
    "comma-separated comparisons of dotted numeric versions, e.g. `>=2, <3` or `=20261125`"
);
grammar!(
    PACKAGE_NAME,
    "package-name",
    check_package_name,
    "a Debian package name: lowercase letters, digits, `+`, `-`, `.` (Debian policy 5.6.1)"
);
grammar!(
    CARGO_NAME,
    "cargo-name",
    check_cargo_name,
    "a Cargo package or binary target name: letters, digits, `_`, `-`"
);
grammar!(
    TARGET_TRIPLE,
    "target-triple",
    check_target_triple,
    "a Rust target triple such as `x86_64-unknown-linux-musl`"
);
grammar!(
    SOURCE_PATH,
    "source-path",
    check_source_path,
    "a path or glob relative to the manifest's directory, inside the workspace"
);
grammar!(
    IMAGE_PATH,
    "image-path",
    check_image_path,
    "an absolute path inside the image, without `..`; a trailing `/` names a directory"
);
grammar!(
    USER_NAME,
    "user-name",
    check_user_name,
    "`[a-z_][a-z0-9_-]*` with an optional trailing `$`, at most 32 bytes"
);
grammar!(
    USER_LIST,
    "user-list",
    check_user_list,
    "comma-separated user or group names"
);
grammar!(
    UNIT_NAME,
    "unit-name",
    check_unit_name,
    "a systemd unit name with its type suffix, e.g. `api.service`"
);
grammar!(
    HOSTNAME,
    "hostname",
    check_hostname,
    "an RFC 1123 host name: dot-separated labels of letters, digits and inner `-`"
);
grammar!(
    TIMEZONE,
    "timezone",
    check_timezone,
    "a tz database name such as `Europe/Paris` or `UTC`"
);
grammar!(
    LOCALE,
    "locale",
    check_locale,
    "a POSIX locale name such as `en_US.UTF-8`"
);
grammar!(
    KERNEL_ARG,
    "kernel-arg",
    check_kernel_arg,
    "one kernel command-line word: printable ASCII without spaces, quotes, `$`, `;`, backquotes or backslashes"
);
grammar!(
    TEXT,
    "text",
    check_text,
    "one line of text without control characters"
);
grammar!(
    SCRIPT,
    "script",
    check_script,
    "a shell script body, run with `/bin/sh -e` inside the image"
);
grammar!(
    OCI_TAG,
    "oci-tag",
    check_oci_tag,
    "an OCI reference `name[:tag]` with a lowercase repository path"
);
grammar!(
    ENV_NAME,
    "env-name",
    check_env_name,
    "an environment variable name: `[A-Za-z_][A-Za-z0-9_]*`"
);
grammar!(
    IMAGE_GLOB,
    "image-glob",
    check_image_glob,
    "an absolute glob over image paths: `*` within a component, `**` across them, e.g. `/var/lib/app/**`"
);
grammar!(
    SUGGESTION_KEY,
    "suggestion-key",
    check_suggestion_key,
    "`kind:subject` as printed with a suggestion, e.g. `package-added:vim`"
);

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhscHR4f admin@laptop";

    #[test]
    fn password_hashes_are_crypt_hashes_and_never_passwords() {
        for good in [
            "$y$j9T$F5Jx5fExrKuPp53xLKQ..1$X3DX6M94c7o.9agCG9G317fhZg9SqC.5i5rd.RhAtQ7",
            "$6$rounds=5000$salt$IxDD3jeSOb5eB1CX5LBsqZFVkJdido3OUILO5Ifz5iwMuTS4XMS130MTSuDDl3aCI6WouIL9AjRbLCelDCy.g.",
            "$2b$12$cpVlE.1yepwZp3.j9rVZ6.T4tTaWJ39gKG6s9eqwv45LfVkkU9vG2",
            "!",
            "*",
        ] {
            assert_eq!(check_password_hash(good), Ok(()), "{good}");
        }
        for (bad, says) in [
            ("hunter2", "never the password itself"),
            ("$1$salt$hash", "not one of yescrypt"),
            ("$6$", "not a whole crypt(3) hash"),
            ("$6$salt$has h", "not allowed"),
            ("$6$salt$hash\n", "not allowed"),
        ] {
            let error = check_password_hash(bad).expect_err(bad);
            assert!(error.contains(says), "{bad}: {error}");
        }
    }

    #[test]
    fn ssh_keys_are_checked_down_to_their_blob() {
        assert_eq!(check_ssh_key(KEY), Ok(()));
        assert_eq!(check_ssh_key(&KEY.replace(" admin@laptop", "")), Ok(()));
        for (bad, says) in [
            ("ssh-ed25519", "not an OpenSSH public key"),
            (
                &KEY.replace("ssh-ed25519 ", "ssh-dss ") as &str,
                "key type `ssh-dss`",
            ),
            (
                &KEY.replace("ssh-ed25519 ", "ssh-rsa "),
                "not a `ssh-rsa` key",
            ),
            (&KEY.replace("AAAAC3", "AAAA!3"), "not valid base64"),
            ("no-pty ssh-ed25519 AAAA", "options before the key"),
            ("ssh-ed25519 AAAA\u{7}bell", "control character"),
        ] {
            let error = check_ssh_key(bad).expect_err(bad);
            assert!(error.contains(says), "{bad}: {error}");
        }
    }

    #[test]
    fn hostile_names_are_rejected_everywhere() {
        let hostile = ["x; rm -rf /", "$(id)", "a\nb", "`id`", "a b", "", "../etc"];
        for grammar in [
            &APPLIANCE_NAME,
            &PACKAGE_NAME,
            &USER_NAME,
            &HOSTNAME,
            &UNIT_NAME,
            &IMAGE_NAME,
            &TIMEZONE,
            &LOCALE,
            &KERNEL_ARG,
            &ENV_NAME,
        ] {
            for value in hostile {
                if grammar.name == "kernel-arg" && value == "../etc" {
                    // A legal word (`init=../etc` is odd but harmless): nothing interprets it as a path here.
                    continue;
                }
                assert!(
                    (grammar.check)(value).is_err(),
                    "{} accepted {value:?}",
                    grammar.name
                );
            }
        }
    }

    #[test]
    fn ordinary_values_are_accepted() {
        let cases: [(&Grammar, &str); 15] = [
            (&APPLIANCE_NAME, "web-1"),
            (&IMAGE_NAME, "debian/bookworm"),
            (&PACKAGE_NAME, "libstdc++6"),
            (&USER_NAME, "www-data"),
            (&USER_NAME, "machine$"),
            (&UNIT_NAME, "getty@ttyS0.service"),
            (&HOSTNAME, "web.example.org"),
            (&TIMEZONE, "America/Argentina/Buenos_Aires"),
            (&LOCALE, "en_US.UTF-8"),
            (&KERNEL_ARG, "console=ttyS0,115200"),
            (&OCI_TAG, "registry.local:5000/team/web:1.2"),
            (&IMAGE_PATH, "/etc/nginx/"),
            (&SOURCE_PATH, "static/**/*.html"),
            (&SUGGESTION_KEY, "package-added:vim"),
            (&IMAGE_GLOB, "/var/lib/app/**"),
        ];
        for (grammar, value) in cases {
            assert_eq!(
                (grammar.check)(value),
                Ok(()),
                "{} rejected {value:?}",
                grammar.name
            );
        }
    }

    #[test]
    fn paths_reject_traversal_and_relative_forms() {
        assert!(check_image_path("/etc/../root").is_err());
        assert!(check_image_path("etc/passwd").is_err());
        assert!(check_image_path(&format!("/{}", "a".repeat(300))).is_err());
        assert!(check_source_path("/etc/shadow").is_err());
        assert!(check_source_path("a\0b").is_err());
        assert!(check_image_glob("/srv/../etc/*").is_err());
        assert!(check_image_glob("srv/*").is_err());
        assert!(check_image_glob("/srv/[").is_err());
    }
}
