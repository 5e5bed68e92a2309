//! The catalog: images, their entries and installed packages, in DuckDB.
//!
//! An image and all its rows are inserted in one transaction, so a killed import leaves no
//! trace in the catalog. Ownership, modes, xattrs and device numbers live here, not in the
//! object files, so an unprivileged user can hold root-owned trees.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::Context as _;
use duckdb::{AccessMode, Config, Connection, params};
use serde::Serialize;

use super::tree::{Entry, EntryKind, Tree, hex, unhex};
use crate::dpkg::InstalledPackage;

/// Bump when the tables change; `open` upgrades older catalogs it knows how to (opening for
/// writing) and refuses the rest.
pub const SCHEMA_VERSION: &str = "3";

const SCHEMA: &str = "
CREATE SEQUENCE IF NOT EXISTS image_ids START 1;
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    id BIGINT PRIMARY KEY,
    name VARCHAR NOT NULL,
    version VARCHAR NOT NULL,
    tree_digest VARCHAR NOT NULL,
    legacy_tree_digest VARCHAR,
    parent BIGINT,
    created_at BIGINT NOT NULL,
    provenance VARCHAR NOT NULL,
    entry_count BIGINT NOT NULL,
    content_bytes BIGINT NOT NULL,
    needs_repair BOOLEAN NOT NULL DEFAULT false,
    UNIQUE (name, version)
);
CREATE TABLE IF NOT EXISTS entries (
    image BIGINT NOT NULL,
    path VARCHAR NOT NULL,
    kind VARCHAR NOT NULL,
    mode INTEGER NOT NULL,
    uid UINTEGER NOT NULL,
    gid UINTEGER NOT NULL,
    size UBIGINT NOT NULL,
    digest VARCHAR,
    link_target VARCHAR,
    dev_major UINTEGER,
    dev_minor UINTEGER,
    xattrs VARCHAR,
    mtime BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS packages (
    image BIGINT NOT NULL,
    name VARCHAR NOT NULL,
    version VARCHAR NOT NULL,
    architecture VARCHAR NOT NULL
);
";

/// A stored image as listed.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ImageRecord {
    pub id: i64,
    pub name: String,
    pub version: String,
    pub tree_digest: String,
    /// The tree's digest in the first format ([`Tree::legacy_digest`]), which locks,
    /// registry annotations and catalogs written before format 2 carry.
    #[serde(default)]
    pub legacy_tree_digest: Option<String>,
    pub parent: Option<i64>,
    pub created_at: i64,
    pub provenance: serde_json::Value,
    pub entry_count: i64,
    pub content_bytes: i64,
    pub needs_repair: bool,
}

impl ImageRecord {
    pub fn reference(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }

    /// The build step that made this image, if one did.
    pub fn step(&self) -> Option<super::provenance::Step> {
        super::provenance::step(&self.provenance)
    }

    /// Whether `digest` names this image's tree, in the current format or the first.
    pub fn has_tree(&self, digest: &str) -> bool {
        self.tree_digest == digest || self.legacy_tree_digest.as_deref() == Some(digest)
    }
}

/// What a new image is, before it has an id.
#[derive(Debug, Clone)]
pub struct NewImage {
    pub name: String,
    pub version: String,
    pub parent: Option<i64>,
    pub provenance: serde_json::Value,
}

#[derive(Debug)]
pub struct Catalog {
    conn: Connection,
}

impl Catalog {
    pub fn open(path: &Path, read_only: bool) -> anyhow::Result<Self> {
        let config = Config::default()
            .access_mode(if read_only {
                AccessMode::ReadOnly
            } else {
                AccessMode::ReadWrite
            })
            .context("configuring DuckDB")?;
        let conn = Connection::open_with_flags(path, config)
            .with_context(|| format!("opening the catalog {}", path.display()))?;
        // Never reach for the network: extensions are compiled in or absent.
        conn.execute_batch(
            "SET autoinstall_known_extensions = false; SET autoload_known_extensions = false;",
        )
        .context("configuring DuckDB")?;
        let catalog = Self { conn };
        if !read_only {
            catalog.create_or_upgrade()?;
        }
        let version: String = catalog
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'schema_version'",
                [],
                |row| row.get(0),
            )
            .context("reading the catalog's schema version")?;
        anyhow::ensure!(
            version == SCHEMA_VERSION,
            "the catalog at {} has schema version {version}; this cargo-appliance reads version {SCHEMA_VERSION}",
            path.display()
        );
        Ok(catalog)
    }

    fn create_or_upgrade(&self) -> anyhow::Result<()> {
        let existing: Option<String> = self
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'schema_version'",
                [],
                |row| row.get(0),
            )
            .ok();
        match existing.as_deref() {
            None | Some(SCHEMA_VERSION) | Some("1") | Some("2") => {}
            // A newer cargo-appliance's catalog: leave it untouched (`open` says why).
            Some(_) => return Ok(()),
        }
        if existing.as_deref() == Some("1") {
            // Schema 2 changed only the history's tables; one transaction, so a killed
            // upgrade leaves schema 1 to upgrade again.
            self.conn
                .execute_batch(&format!(
                    "BEGIN TRANSACTION;
                     {}
                     UPDATE meta SET value = '2' WHERE key = 'schema_version';
                     COMMIT;",
                    super::derivations::MIGRATE_FROM_SCHEMA_1
                ))
                .context("upgrading the catalog from schema version 1")?;
        }
        if matches!(existing.as_deref(), Some("1") | Some("2")) {
            self.upgrade_tree_digests()
                .context("upgrading the catalog from schema version 2 (tree digest format 2)")?;
        }
        self.conn
            .execute_batch(SCHEMA)
            .context("creating the catalog tables")?;
        self.conn
            .execute_batch(super::derivations::SCHEMA)
            .context("creating the history tables")?;
        self.conn.execute(
            "INSERT INTO meta VALUES ('schema_version', ?) ON CONFLICT DO NOTHING",
            params![SCHEMA_VERSION],
        )?;
        Ok(())
    }

    /// Schema 3: tree digests in format 2 ([`Tree::digest`]), recomputed from the stored
    /// entries; the old digest stays as `legacy_tree_digest`, so locks and annotations that
    /// name it still match. One transaction: a killed upgrade leaves schema 2 to upgrade again.
    fn upgrade_tree_digests(&self) -> anyhow::Result<()> {
        self.conn.execute_batch(
            "BEGIN TRANSACTION;
             ALTER TABLE images ADD COLUMN IF NOT EXISTS legacy_tree_digest VARCHAR;",
        )?;
        let ids: Vec<i64> = {
            let mut statement = self.conn.prepare("SELECT id FROM images ORDER BY id")?;
            statement
                .query_map([], |row| row.get(0))?
                .collect::<Result<_, _>>()?
        };
        for id in ids {
            let tree = self.tree(id)?;
            self.conn.execute(
                "UPDATE images SET legacy_tree_digest = tree_digest, tree_digest = ? WHERE id = ?",
                params![tree.digest(), id],
            )?;
        }
        self.conn.execute_batch(
            "UPDATE meta SET value = '3' WHERE key = 'schema_version';
             COMMIT;",
        )?;
        Ok(())
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    pub fn connection_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }

    pub fn images(&self) -> anyhow::Result<Vec<ImageRecord>> {
        let mut statement = self.conn.prepare(
            "SELECT id, name, version, tree_digest, parent, created_at, provenance, entry_count, content_bytes, needs_repair, legacy_tree_digest
             FROM images ORDER BY name, id",
        )?;
        let rows = statement.query_map([], |row| {
            let provenance: String = row.get(6)?;
            Ok(ImageRecord {
                id: row.get(0)?,
                name: row.get(1)?,
                version: row.get(2)?,
                tree_digest: row.get(3)?,
                parent: row.get(4)?,
                created_at: row.get(5)?,
                provenance: serde_json::from_str(&provenance).unwrap_or(serde_json::Value::Null),
                entry_count: row.get(7)?,
                content_bytes: row.get(8)?,
                needs_repair: row.get(9)?,
                legacy_tree_digest: row.get(10)?,
            })
        })?;
        rows.collect::<Result<Vec<_>, _>>()
            .context("listing images")
    }

    pub fn entries(&self, image: i64) -> anyhow::Result<BTreeMap<String, Entry>> {
        let mut statement = self.conn.prepare(
            "SELECT path, kind, mode, uid, gid, size, digest, link_target, dev_major, dev_minor, xattrs, mtime
             FROM entries WHERE image = ?",
        )?;
        let rows = statement.query_map(params![image], |row| {
            let kind: String = row.get(1)?;
            let major: Option<u32> = row.get(8)?;
            let minor: Option<u32> = row.get(9)?;
            let xattrs: Option<String> = row.get(10)?;
            Ok((
                row.get::<_, String>(0)?,
                kind,
                Entry {
                    kind: EntryKind::File,
                    mode: row.get(2)?,
                    uid: row.get(3)?,
                    gid: row.get(4)?,
                    size: row.get(5)?,
                    digest: row.get(6)?,
                    link_target: row.get(7)?,
                    device: major.zip(minor),
                    xattrs: xattrs
                        .and_then(|json| {
                            serde_json::from_str::<BTreeMap<String, String>>(&json).ok()
                        })
                        .map(|map| {
                            map.into_iter()
                                .filter_map(|(k, v)| Some((k, unhex(&v)?)))
                                .collect()
                        })
                        .unwrap_or_default(),
                    mtime: row.get(11)?,
                },
            ))
        })?;
        let mut entries = BTreeMap::new();
        for row in rows {
            let (path, kind, mut entry) = row?;
            entry.kind = EntryKind::parse(&kind)
                .with_context(|| format!("catalog entry {path} has unknown kind {kind}"))?;
            entries.insert(path, entry);
        }
        Ok(entries)
    }

    pub fn tree(&self, image: i64) -> anyhow::Result<Tree> {
        Ok(Tree::from_entries(self.entries(image)?))
    }

    pub fn packages(&self, image: i64) -> anyhow::Result<Vec<InstalledPackage>> {
        let mut statement = self.conn.prepare(
            "SELECT name, version, architecture FROM packages WHERE image = ? ORDER BY name",
        )?;
        let rows = statement.query_map(params![image], |row| {
            Ok(InstalledPackage {
                name: row.get(0)?,
                version: row.get(1)?,
                architecture: row.get(2)?,
            })
        })?;
        rows.collect::<Result<Vec<_>, _>>()
            .context("reading packages")
    }

    /// Run `work` as one transaction: all of its writes are committed together, or none
    /// (an error rolls them back; a process killed before the commit leaves none, as the
    /// write-ahead log holds only committed transactions). Inside it use the `_in_transaction`
    /// methods, which do not open a transaction of their own.
    pub fn atomically<T>(
        &mut self,
        work: impl FnOnce(&mut Self) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        self.conn.execute_batch("BEGIN TRANSACTION")?;
        match work(self) {
            Ok(value) => {
                self.conn
                    .execute_batch("COMMIT")
                    .context("committing the catalog")?;
                Ok(value)
            }
            Err(error) => {
                // The error that matters is the work's; a failed rollback leaves the
                // transaction uncommitted, which the connection's close discards.
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(error)
            }
        }
    }

    /// Insert an image with its entries and packages, all or nothing.
    pub fn insert_image(
        &mut self,
        new: &NewImage,
        tree: &Tree,
        packages: &[InstalledPackage],
    ) -> anyhow::Result<ImageRecord> {
        self.atomically(|catalog| catalog.insert_image_in_transaction(new, tree, packages))
    }

    /// [`Self::insert_image`] inside a transaction the caller holds ([`Self::atomically`]).
    pub fn insert_image_in_transaction(
        &mut self,
        new: &NewImage,
        tree: &Tree,
        packages: &[InstalledPackage],
    ) -> anyhow::Result<ImageRecord> {
        let created_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let tree_digest = tree.digest();
        let legacy_tree_digest = tree.legacy_digest();
        let content_bytes: u64 = tree
            .entries()
            .values()
            .filter(|e| e.kind == EntryKind::File)
            .map(|e| e.size)
            .sum();
        let provenance = new.provenance.to_string();
        let tx = &self.conn;
        let id: i64 = tx.query_row("SELECT nextval('image_ids')", [], |row| row.get(0))?;
        tx.execute(
            "INSERT INTO images (id, name, version, tree_digest, legacy_tree_digest, parent, created_at, provenance, entry_count, content_bytes)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            params![
                id,
                new.name,
                new.version,
                tree_digest,
                legacy_tree_digest,
                new.parent,
                created_at,
                provenance,
                tree.len() as i64,
                content_bytes as i64
            ],
        )
        .with_context(|| format!("recording image {}@{}", new.name, new.version))?;
        {
            let mut appender = tx.appender("entries")?;
            for (path, entry) in tree.entries() {
                let xattrs = if entry.xattrs.is_empty() {
                    None
                } else {
                    let map: BTreeMap<&str, String> = entry
                        .xattrs
                        .iter()
                        .map(|(k, v)| (k.as_str(), hex(v)))
                        .collect();
                    Some(serde_json::to_string(&map)?)
                };
                appender.append_row(params![
                    id,
                    path,
                    entry.kind.as_str(),
                    entry.mode,
                    entry.uid,
                    entry.gid,
                    entry.size,
                    entry.digest,
                    entry.link_target,
                    entry.device.map(|d| d.0),
                    entry.device.map(|d| d.1),
                    xattrs,
                    entry.mtime
                ])?;
            }
            appender.flush()?;
        }
        {
            let mut appender = tx.appender("packages")?;
            for package in packages {
                appender.append_row(params![
                    id,
                    package.name,
                    package.version,
                    package.architecture
                ])?;
            }
            appender.flush()?;
        }
        Ok(ImageRecord {
            id,
            name: new.name.clone(),
            version: new.version.clone(),
            tree_digest,
            legacy_tree_digest: Some(legacy_tree_digest),
            parent: new.parent,
            created_at,
            provenance: new.provenance.clone(),
            entry_count: tree.len() as i64,
            content_bytes: content_bytes as i64,
            needs_repair: false,
        })
    }

    /// Remove images with their entries and packages, inside a transaction the caller
    /// holds ([`Self::atomically`]).
    pub fn remove_images_in_transaction(&mut self, ids: &[i64]) -> anyhow::Result<()> {
        for id in ids {
            self.conn
                .execute("DELETE FROM entries WHERE image = ?", params![id])?;
            self.conn
                .execute("DELETE FROM packages WHERE image = ?", params![id])?;
            self.conn
                .execute("DELETE FROM images WHERE id = ?", params![id])
                .context("removing images")?;
        }
        Ok(())
    }

    /// Every object digest some image references.
    pub fn referenced_digests(&self) -> anyhow::Result<BTreeSet<String>> {
        let mut statement = self
            .conn
            .prepare("SELECT DISTINCT digest FROM entries WHERE digest IS NOT NULL")?;
        let rows = statement.query_map([], |row| row.get::<_, String>(0))?;
        rows.collect::<Result<BTreeSet<_>, _>>()
            .context("listing referenced objects")
    }

    /// Images that reference any of these digests.
    pub fn images_using(&self, digests: &BTreeSet<String>) -> anyhow::Result<BTreeSet<i64>> {
        let mut users = BTreeSet::new();
        let mut statement = self
            .conn
            .prepare("SELECT DISTINCT image FROM entries WHERE digest = ?")?;
        for digest in digests {
            let rows = statement.query_map(params![digest], |row| row.get::<_, i64>(0))?;
            for row in rows {
                users.insert(row?);
            }
        }
        Ok(users)
    }

    pub fn mark_needs_repair(&mut self, ids: &BTreeSet<i64>) -> anyhow::Result<()> {
        let tx = self.conn.transaction()?;
        for id in ids {
            tx.execute(
                "UPDATE images SET needs_repair = true WHERE id = ?",
                params![id],
            )?;
        }
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{Change, Derivation};

    /// The history tables as catalog schema 1 had them.
    const HISTORY_SCHEMA_1: &str = "
        CREATE TABLE derivations (id BIGINT PRIMARY KEY, parent VARCHAR NOT NULL,
            child VARCHAR NOT NULL, origin VARCHAR NOT NULL, image BIGINT);
        CREATE TABLE changes (derivation BIGINT NOT NULL, kind VARCHAR NOT NULL,
            subject VARCHAR NOT NULL);
        INSERT INTO derivations VALUES (1, 'debian/bookworm', 'web@1', 'store', NULL),
            (2, 'debian/bookworm', 'db@1', 'import', NULL);
        INSERT INTO changes VALUES (1, 'package-added', 'nginx'), (1, 'user-added', 'www'),
            (2, 'package-added', 'postgresql'), (2, 'package-added', 'nginx');
        ";

    #[test]
    fn a_schema_1_catalog_is_upgraded_when_opened_for_writing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("catalog.duckdb");
        {
            let conn = Connection::open(&path).expect("create");
            conn.execute_batch(SCHEMA.replace("IF NOT EXISTS ", "").as_str())
                .expect("schema 1 catalog tables");
            conn.execute_batch(HISTORY_SCHEMA_1)
                .expect("schema 1 history");
            conn.execute("INSERT INTO meta VALUES ('schema_version', '1')", [])
                .expect("version");
        }
        let refused = Catalog::open(&path, true).expect_err("read-only open of schema 1");
        assert!(
            format!("{refused:#}").contains("schema version 1"),
            "{refused:#}"
        );
        let mut catalog = Catalog::open(&path, false).expect("upgrade");
        let derivations = crate::history::load(catalog.connection()).expect("load");
        let change = |kind: &str, subject: &str| Change::new(kind, subject);
        assert_eq!(
            derivations,
            vec![
                (
                    1,
                    Derivation {
                        parent: "debian/bookworm".into(),
                        child: "web@1".into(),
                        changes: vec![
                            change("package-added", "nginx"),
                            change("user-added", "www")
                        ],
                    }
                ),
                (
                    2,
                    Derivation {
                        parent: "debian/bookworm".into(),
                        child: "db@1".into(),
                        changes: vec![
                            change("package-added", "nginx"),
                            change("package-added", "postgresql")
                        ],
                    }
                ),
            ]
        );
        let nginx: i64 = catalog
            .connection()
            .query_row(
                "SELECT derivations FROM items WHERE subject = 'nginx'",
                [],
                |row| row.get(0),
            )
            .expect("nginx item");
        assert_eq!(nginx, 2);
        crate::history::insert(
            catalog.connection_mut(),
            &[Derivation {
                parent: "debian/bookworm".into(),
                child: "cache@1".into(),
                changes: vec![
                    change("package-added", "nginx"),
                    change("package-added", "varnish"),
                ],
            }],
            "test",
        )
        .expect("insert after the upgrade");
        drop(catalog);
        let reopened = Catalog::open(&path, true).expect("read-only open after the upgrade");
        let loaded = crate::history::load(reopened.connection()).expect("load");
        assert_eq!(loaded.len(), 3);
        assert_eq!(
            loaded[2].1.changes,
            vec![
                change("package-added", "nginx"),
                change("package-added", "varnish")
            ]
        );
    }

    #[test]
    fn a_schema_2_catalog_gets_format_2_tree_digests_and_keeps_the_old_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("catalog.duckdb");
        let mut entry = Entry::dir(0o644);
        entry.xattrs.insert("user.a;b".into(), vec![7]);
        let mut tree = Tree::new();
        tree.insert("etc", entry).expect("entry");
        {
            let mut catalog = Catalog::open(&path, false).expect("create");
            let new = NewImage {
                name: "base".into(),
                version: "1".into(),
                parent: None,
                provenance: serde_json::json!({}),
            };
            catalog.insert_image(&new, &tree, &[]).expect("insert");
            // What schema 2 stored: the first format's digest, no legacy column.
            catalog
                .connection()
                .execute_batch(
                    "UPDATE images SET tree_digest = legacy_tree_digest;
                     ALTER TABLE images DROP COLUMN legacy_tree_digest;
                     UPDATE meta SET value = '2' WHERE key = 'schema_version';",
                )
                .expect("make it schema 2");
        }
        let refused = Catalog::open(&path, true).expect_err("read-only open of schema 2");
        assert!(
            format!("{refused:#}").contains("schema version 2"),
            "{refused:#}"
        );
        let catalog = Catalog::open(&path, false).expect("upgrade");
        let images = catalog.images().expect("images");
        assert_eq!(images.len(), 1);
        assert_eq!(images[0].tree_digest, tree.digest());
        assert_eq!(images[0].legacy_tree_digest, Some(tree.legacy_digest()));
        assert_ne!(tree.digest(), tree.legacy_digest());
        assert!(images[0].has_tree(&tree.legacy_digest()));
        assert_eq!(
            catalog.tree(images[0].id).expect("tree").digest(),
            tree.digest()
        );
    }

    #[test]
    fn a_newer_catalog_is_refused_and_left_untouched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("catalog.duckdb");
        {
            let conn = Connection::open(&path).expect("create");
            conn.execute_batch(
                "CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL);
                 INSERT INTO meta VALUES ('schema_version', '99');",
            )
            .expect("a future catalog");
        }
        for read_only in [false, true] {
            let refused = Catalog::open(&path, read_only).expect_err("schema 99");
            assert!(
                format!("{refused:#}").contains("schema version 99"),
                "{refused:#}"
            );
        }
        let conn = Connection::open(&path).expect("reopen");
        let tables: i64 = conn
            .query_row("SELECT count(*) FROM duckdb_tables()", [], |row| row.get(0))
            .expect("tables");
        assert_eq!(tables, 1, "only the future catalog's own table");
    }
}
