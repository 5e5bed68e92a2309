//! Image references of the OCI distribution protocol: `HOST[:PORT]/REPOSITORY[:TAG][@DIGEST]`.
//! The registry is always named (no implicit Docker Hub): a reference says where it goes.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// `host[:port]`.
    pub registry: String,
    /// `team/web`: path components of the distribution spec's grammar.
    pub repository: String,
    pub tag: Option<String>,
    /// `sha256:<64 hex>`.
    pub digest: Option<String>,
}

impl Reference {
    pub fn parse(text: &str) -> Result<Self, String> {
        let (rest, digest) = match text.split_once('@') {
            Some((rest, digest)) => (rest, Some(digest)),
            None => (text, None),
        };
        if let Some(digest) = digest {
            check_digest(digest)?;
        }
        let (registry, path) = rest.split_once('/').ok_or_else(|| {
            format!("`{text}` names no registry: write HOST[:PORT]/REPOSITORY[:TAG]")
        })?;
        if !(registry.contains('.') || registry.contains(':') || registry == "localhost") {
            return Err(format!(
                "`{registry}` is not a registry host (a host name with a dot or a port, or `localhost`): write HOST[:PORT]/REPOSITORY[:TAG]"
            ));
        }
        check_registry(registry)?;
        let (repository, tag) = match path.rsplit_once(':') {
            Some((repository, tag)) if !tag.contains('/') => (repository, Some(tag)),
            _ => (path, None),
        };
        check_repository(repository)?;
        if let Some(tag) = tag {
            check_tag(tag)?;
        }
        Ok(Self {
            registry: registry.to_owned(),
            repository: repository.to_owned(),
            tag: tag.map(str::to_owned),
            digest: digest.map(str::to_owned),
        })
    }

    /// The same repository at `digest` (what a pull fetches, so the bytes cannot change
    /// between reading the manifest and copying the image).
    pub fn at_digest(&self, digest: &str) -> Self {
        Self {
            tag: None,
            digest: Some(digest.to_owned()),
            ..self.clone()
        }
    }

    /// `name:tag` in the same registry, beside this reference: the repository's last
    /// component replaced by `name` (`host/team/web:2` → `host/team/debian/bookworm:1`).
    pub fn sibling(&self, name: &str, tag: &str) -> Result<Self, String> {
        let prefix = self.repository.rsplit_once('/').map(|(prefix, _)| prefix);
        let repository = match prefix {
            Some(prefix) => format!("{prefix}/{name}"),
            None => name.to_owned(),
        };
        check_repository(&repository)?;
        check_tag(tag)?;
        Ok(Self {
            registry: self.registry.clone(),
            repository,
            tag: Some(tag.to_owned()),
            digest: None,
        })
    }

    /// Plain HTTP is allowed only to this machine, as Docker allows it.
    pub fn is_loopback(&self) -> bool {
        let host = match self.registry.strip_prefix('[') {
            Some(rest) => rest.split(']').next().unwrap_or(rest),
            None => self.registry.split(':').next().unwrap_or(&self.registry),
        };
        host == "localhost"
            || host == "::1"
            || host
                .parse::<std::net::Ipv4Addr>()
                .is_ok_and(|ip| ip.is_loopback())
    }

    /// The transport string skopeo reads.
    pub fn docker_transport(&self) -> String {
        format!("docker://{self}")
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

fn check_registry(registry: &str) -> Result<(), String> {
    let ok = !registry.is_empty()
        && registry.len() <= 255
        && registry
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{}` is not a registry host",
            registry.escape_debug()
        ))
    }
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/…)*` (the distribution spec's path grammar).
fn check_repository(repository: &str) -> Result<(), String> {
    let component_ok = |component: &str| {
        let bytes = component.as_bytes();
        !bytes.is_empty()
            && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
            && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
            && bytes.iter().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
            })
            && !component.contains("..")
            && !component.contains("___")
    };
    if repository.len() <= 255 && repository.split('/').all(component_ok) {
        Ok(())
    } else {
        Err(format!(
            "`{}` is not a repository name (lowercase letters, digits and `._-` between them, components joined by `/`)",
            repository.escape_debug()
        ))
    }
}

/// `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
pub fn check_tag(tag: &str) -> Result<(), String> {
    let bytes = tag.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 128
        && (bytes[0].is_ascii_alphanumeric() || bytes[0] == b'_')
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{}` is not a tag (letters, digits and `._-`, at most 128)",
            tag.escape_debug()
        ))
    }
}

fn check_digest(digest: &str) -> Result<(), String> {
    let hex = digest.strip_prefix("sha256:").unwrap_or("");
    if hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(format!(
            "`{}` is not a digest (sha256: and 64 lowercase hex digits)",
            digest.escape_debug()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_name_registry_repository_tag_and_digest() {
        let reference = Reference::parse("localhost:5000/team/web:1").expect("valid");
        assert_eq!(reference.registry, "localhost:5000");
        assert_eq!(reference.repository, "team/web");
        assert_eq!(reference.tag.as_deref(), Some("1"));
        assert!(reference.is_loopback());
        assert_eq!(reference.to_string(), "localhost:5000/team/web:1");
        let digest = format!("sha256:{}", "a".repeat(64));
        let pinned = Reference::parse(&format!("registry.example/web@{digest}")).expect("valid");
        assert_eq!(pinned.tag, None);
        assert_eq!(pinned.digest.as_deref(), Some(digest.as_str()));
        assert!(!pinned.is_loopback());
        assert!(
            Reference::parse("127.0.0.1:5000/web")
                .expect("valid")
                .is_loopback()
        );
        assert!(
            Reference::parse("[::1]:5000/web")
                .expect("valid")
                .is_loopback()
        );
        assert!(
            !Reference::parse("127.0.0.1.example:5000/web")
                .expect("valid")
                .is_loopback()
        );
        let sibling = reference.sibling("debian/bookworm", "1").expect("valid");
        assert_eq!(sibling.to_string(), "localhost:5000/team/debian/bookworm:1");
    }

    #[test]
    fn malformed_references_are_refused_with_the_form_to_write() {
        for (text, expected) in [
            ("web:1", "names no registry"),
            ("team/web:1", "not a registry host"),
            ("localhost:5000/Web:1", "not a repository name"),
            ("localhost:5000/web:a b", "not a tag"),
            ("localhost:5000/web@sha256:12", "not a digest"),
            ("localhost:5000//web", "not a repository name"),
            ("local\u{0}host:5000/web", "not a registry host"),
        ] {
            let error = Reference::parse(text).expect_err(text);
            assert!(error.contains(expected), "{text}: {error}");
        }
    }
}
