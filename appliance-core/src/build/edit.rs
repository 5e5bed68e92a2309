//! Edits of a stored tree without materializing it: new content goes to the store's staging
//! area, metadata to the in-memory tree, which is then committed as a new image.

use std::io::Read;

use anyhow::Context as _;

use crate::store::objects::{Objects, Staging};
use crate::store::tree::{Entry, EntryKind, Tree, normalize_path};

/// Symlinks followed when reading a file of the tree (as Linux' MAXSYMLINKS).
const MAX_HOPS: usize = 40;

#[derive(Debug)]
pub struct TreeEditor {
    pub tree: Tree,
    pub staging: Staging,
    objects: Objects,
    /// The mtime of every entry this editor writes (`SOURCE_DATE_EPOCH`, or the build's start).
    pub mtime: i64,
}

impl TreeEditor {
    pub fn new(tree: Tree, staging: Staging, objects: Objects, mtime: i64) -> Self {
        Self {
            tree,
            staging,
            objects,
            mtime,
        }
    }

    /// Tree path (no leading `/`) of an absolute image path.
    pub fn key(path: &str) -> anyhow::Result<String> {
        normalize_path(path).with_context(|| format!("`{path}` is not a usable image path"))
    }

    /// Where a path ends up once every symlink, including the last component, is followed.
    pub fn resolve(&mut self, path: &str) -> anyhow::Result<String> {
        let mut current = Self::key(path)?;
        for _ in 0..MAX_HOPS {
            let landed = self
                .tree
                .resolve(&current, false)
                .unwrap_or(current.clone());
            match self.tree.get(&landed) {
                Some(entry) if entry.kind == EntryKind::Symlink => {
                    let target = entry.link_target.clone().unwrap_or_default();
                    let parent = landed.rsplit_once('/').map_or("", |(p, _)| p);
                    current = lexical_join(parent, &target);
                }
                _ => return Ok(landed),
            }
        }
        anyhow::bail!("too many symlinks resolving `{path}` in the image")
    }

    pub fn entry(&mut self, path: &str) -> Option<Entry> {
        let resolved = self.resolve(path).ok()?;
        self.tree.get(&resolved).cloned()
    }

    /// A file's content, following symlinks; `None` when it is not a file.
    pub fn read(&mut self, path: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let Some(entry) = self.entry(path) else {
            return Ok(None);
        };
        if !matches!(entry.kind, EntryKind::File | EntryKind::Hardlink) {
            return Ok(None);
        }
        let digest = entry.digest.context("a file without content digest")?;
        // Content written by this edit is still staged; everything else is a stored object.
        if let Some(staged) = self.staging.staged(&digest)? {
            return Ok(Some(fs_err::read(staged)?));
        }
        Ok(Some(self.objects.read(&digest)?))
    }

    pub fn read_text(&mut self, path: &str) -> anyhow::Result<Option<String>> {
        Ok(self
            .read(path)?
            .map(|data| String::from_utf8_lossy(&data).into_owned()))
    }

    /// Write a file (replacing what is there, following the parents' symlinks).
    pub fn write(
        &mut self,
        path: &str,
        content: impl Read,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> anyhow::Result<()> {
        let (digest, size) = self
            .staging
            .add(content)
            .with_context(|| format!("storing {path}"))?;
        let entry = Entry {
            kind: EntryKind::File,
            mode,
            uid,
            gid,
            size,
            digest: Some(digest),
            link_target: None,
            device: None,
            xattrs: Default::default(),
            mtime: self.mtime,
        };
        self.tree
            .insert(&Self::key(path)?, entry)
            .with_context(|| format!("writing {path} into the image"))?;
        Ok(())
    }

    /// Replace a file's content, keeping its mode and owner when it exists.
    pub fn rewrite(&mut self, path: &str, content: &[u8], default_mode: u32) -> anyhow::Result<()> {
        let (mode, uid, gid) = self
            .entry(path)
            .filter(|e| e.kind == EntryKind::File)
            .map_or((default_mode, 0, 0), |e| (e.mode, e.uid, e.gid));
        let target = self.resolve(path)?;
        self.write(&format!("/{target}"), content, mode, uid, gid)
    }

    /// A directory and its missing parents (parents root-owned 0755, as `mkdir -p`).
    pub fn mkdir(&mut self, path: &str, mode: u32, uid: u32, gid: u32) -> anyhow::Result<()> {
        let key = Self::key(path)?;
        let mut entry = Entry::dir(mode);
        entry.uid = uid;
        entry.gid = gid;
        entry.mtime = self.mtime;
        self.tree
            .insert(&key, entry)
            .with_context(|| format!("creating directory {path} in the image"))?;
        Ok(())
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> anyhow::Result<()> {
        let entry = Entry {
            kind: EntryKind::Symlink,
            mode: 0o777,
            uid: 0,
            gid: 0,
            size: 0,
            digest: None,
            link_target: Some(target.to_owned()),
            device: None,
            xattrs: Default::default(),
            mtime: self.mtime,
        };
        self.tree
            .insert(&Self::key(path)?, entry)
            .with_context(|| format!("creating symlink {path} in the image"))?;
        Ok(())
    }

    /// Remove the entry at `path` itself (a symlink, not what it points to); none is fine.
    pub fn remove(&mut self, path: &str) -> anyhow::Result<()> {
        let key = Self::key(path)?;
        // A directory on the way that is missing holds nothing to remove.
        if let Ok(landed) = self.tree.resolve(&key, false) {
            self.tree.remove(&landed);
        }
        Ok(())
    }

    pub fn exists(&mut self, path: &str) -> bool {
        Self::key(path)
            .ok()
            .and_then(|key| self.tree.resolve(&key, false).ok())
            .is_some_and(|landed| self.tree.get(&landed).is_some())
    }
}

/// `target` resolved lexically against `dir` (tree keys), `..` stopping at the root as the
/// kernel does in a chroot.
fn lexical_join(dir: &str, target: &str) -> String {
    let mut parts: Vec<&str> = if target.starts_with('/') {
        Vec::new()
    } else {
        dir.split('/').filter(|c| !c.is_empty()).collect()
    };
    for component in target.split('/') {
        match component {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            name => parts.push(name),
        }
    }
    parts.join("/")
}

#[cfg(test)]
mod tests {
    use super::lexical_join;

    #[test]
    fn relative_links_resolve_inside_the_root() {
        assert_eq!(
            lexical_join("etc", "../usr/lib/os-release"),
            "usr/lib/os-release"
        );
        assert_eq!(lexical_join("etc", "../../../../x"), "x");
        assert_eq!(lexical_join("etc/a", "/usr/b"), "usr/b");
        assert_eq!(lexical_join("", "./y/./z"), "y/z");
    }
}
