//! Derivation history: which images were derived from which bases, with which typed changes,
//! in DuckDB beside the catalog; and the suggestions learnt from it.
//!
//! - [`corpus`]: the shared corpus' records (mined Dockerfiles) as derivations;
//! - [`engine`]: the ranking (documented there), in memory, loaded from the tables by SQL;
//! - [`stats`]: the same ranking and the evidence for each suggestion (support, confidence,
//!   lift) in SQL over the tables, so what the user reads is what the database says;
//! - [`suggest`]: manifests to help diagnostics.

pub mod apply;
pub mod corpus;
pub mod engine;
pub mod seed;
pub mod stats;
pub mod suggest;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;

use anyhow::{Context as _, bail};
use duckdb::{Connection, params};
use serde::{Deserialize, Serialize};

/// Tables of the history, created with the catalog's. Each distinct change is an `items`
/// row carrying how many derivations have it, kept current on every insert and removal:
/// the ranking weighs changes by that count, and counting over every change on each query
/// was most of a suggestion's time on a large history. `changes` links derivations to items
/// by integer id (joins on two strings were the rest).
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS derivations (
    id BIGINT PRIMARY KEY,
    parent VARCHAR NOT NULL,
    child VARCHAR NOT NULL,
    origin VARCHAR NOT NULL,
    image BIGINT
);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    kind VARCHAR NOT NULL,
    subject VARCHAR NOT NULL,
    derivations BIGINT NOT NULL,
    UNIQUE (kind, subject)
);
CREATE TABLE IF NOT EXISTS changes (
    derivation BIGINT NOT NULL,
    item INTEGER NOT NULL
);
";

/// Catalog schema 1 kept `changes` as (derivation, kind, subject) strings; this turns such a
/// history into the tables of [`SCHEMA`], in the caller's transaction.
pub const MIGRATE_FROM_SCHEMA_1: &str = "
CREATE TABLE items (
    id INTEGER PRIMARY KEY,
    kind VARCHAR NOT NULL,
    subject VARCHAR NOT NULL,
    derivations BIGINT NOT NULL,
    UNIQUE (kind, subject)
);
INSERT INTO items
    SELECT row_number() OVER (ORDER BY kind, subject), kind, subject, count(DISTINCT derivation)
    FROM changes GROUP BY kind, subject;
CREATE TABLE changes_by_item AS
    SELECT DISTINCT c.derivation, i.id::INTEGER AS item
    FROM changes c JOIN items i USING (kind, subject)
    ORDER BY c.derivation, item;
DROP TABLE changes;
ALTER TABLE changes_by_item RENAME TO changes;
";

/// A typed change, `kind:subject` when printed (`package-added:nginx`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Change {
    pub kind: String,
    pub subject: String,
}

impl Change {
    pub fn new(kind: &str, subject: impl Into<String>) -> Self {
        Self {
            kind: kind.to_owned(),
            subject: subject.into(),
        }
    }

    pub fn key(&self) -> String {
        format!("{}:{}", self.kind, self.subject)
    }
}

/// One image derived from a parent, with what changed. The JSON Lines form of the history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Derivation {
    pub parent: String,
    pub child: String,
    pub changes: Vec<Change>,
}

/// Change kinds, as a registry: name and meaning (the reference documents them).
pub static CHANGE_KINDS: &[(&str, &str)] = &[
    ("package-added", "a Debian package installed in the child"),
    ("package-removed", "a package of the parent removed"),
    ("package-upgraded", "a package at another version"),
    (
        "config-changed",
        "a file under /etc that differs (for conffiles: from the package's md5sum)",
    ),
    ("file-added", "a file that is new in the child, by path"),
    (
        "service-enabled",
        "a systemd unit enabled (a .wants link added)",
    ),
    ("service-disabled", "a systemd unit disabled"),
    ("user-added", "a user account added"),
    ("group-added", "a group added"),
    ("port-exposed", "a port the image serves"),
    ("hostname", "the host name set"),
];

/// Files the build writes itself for every appliance of a kind: hostnames, networking for
/// disk outputs, boot, machine identity, and the account databases (whose entries are
/// `user-added`/`group-added` already). A change to one of them is plumbing, not a choice.
const PLUMBING_PATHS: &[&str] = &[
    "/etc/hosts",
    "/etc/hostname",
    "/etc/machine-id",
    "/var/lib/dbus/machine-id",
    "/etc/kernel/cmdline",
    "/etc/systemd/network/80-appliance-dhcp.network",
    "/etc/passwd",
    "/etc/passwd-",
    "/etc/group",
    "/etc/group-",
    "/etc/shadow",
    "/etc/shadow-",
    "/etc/gshadow",
    "/etc/gshadow-",
    "/etc/subuid",
    "/etc/subgid",
];

/// Directories whose content the build or the boot packages write (the ESP, kernels).
const PLUMBING_DIRS: &[&str] = &["/boot/", "/efi/"];

/// Units the build enables for disk outputs (systemd-networkd answers QEMU's DHCP), with the
/// aliases and companions `systemctl enable` links for them.
const PLUMBING_UNITS: &[&str] = &[
    "systemd-networkd.service",
    "systemd-networkd.socket",
    "systemd-networkd-wait-online.service",
    "systemd-network-generator.service",
    "dbus-org.freedesktop.network1.service",
];

/// Whether a change is a choice someone made, worth learning from and suggesting. Not the
/// build's own plumbing ([`PLUMBING_PATHS`], [`PLUMBING_DIRS`], [`PLUMBING_UNITS`]), and not
/// values unique to one appliance: a hostname or kernel command line suggested as a literal
/// would tell the next appliance to take another one's name.
pub fn is_choice(change: &Change) -> bool {
    match change.kind.as_str() {
        "hostname" | "kernel-cmdline" => false,
        "service-enabled" | "service-disabled" => {
            !PLUMBING_UNITS.contains(&change.subject.as_str())
        }
        "config-changed" | "file-added" | "file-changed" | "file-removed" => {
            let path = change.subject.as_str();
            !PLUMBING_PATHS.contains(&path)
                && !PLUMBING_DIRS.iter().any(|dir| path.starts_with(dir))
        }
        _ => true,
    }
}

/// Insert derivations in one transaction; returns how many.
pub fn insert(
    conn: &mut Connection,
    derivations: &[Derivation],
    origin: &str,
) -> anyhow::Result<usize> {
    insert_for_images(conn, derivations.iter().map(|d| (d, None)), origin)
}

/// Insert derivations, each optionally tied to the stored image it describes.
pub fn insert_for_images<'a>(
    conn: &mut Connection,
    derivations: impl IntoIterator<Item = (&'a Derivation, Option<i64>)>,
    origin: &str,
) -> anyhow::Result<usize> {
    let tx = conn.transaction()?;
    let count = insert_in(&tx, derivations, origin)?;
    tx.commit().context("committing the history")?;
    Ok(count)
}

/// Replace every derivation of each origin in `incoming` (derivation, origin) with those
/// given, in one transaction: a pulled history merges into the store as often as it is
/// pulled, never twice.
pub fn replace_origins(
    conn: &mut Connection,
    incoming: &[(Derivation, String)],
) -> anyhow::Result<usize> {
    let origins: BTreeSet<&str> = incoming.iter().map(|(_, o)| o.as_str()).collect();
    let tx = conn.transaction()?;
    for origin in &origins {
        remove_in(&tx, "origin = ?", &[origin])?;
    }
    let mut count = 0;
    for origin in &origins {
        count += insert_in(
            &tx,
            incoming
                .iter()
                .filter(|(_, o)| o == origin)
                .map(|(d, _)| (d, None)),
            origin,
        )?;
    }
    tx.commit().context("committing the history")?;
    Ok(count)
}

fn insert_in<'a>(
    tx: &duckdb::Transaction<'_>,
    derivations: impl IntoIterator<Item = (&'a Derivation, Option<i64>)>,
    origin: &str,
) -> anyhow::Result<usize> {
    let mut count = 0;
    // Ids are allocated under the catalog's exclusive lock, which every writer holds.
    let first: i64 = tx.query_row(
        "SELECT coalesce(max(id), 0) + 1 FROM derivations",
        [],
        |row| row.get(0),
    )?;
    tx.execute_batch(
        "CREATE TEMPORARY TABLE IF NOT EXISTS incoming_changes (
             derivation BIGINT NOT NULL, kind VARCHAR NOT NULL, subject VARCHAR NOT NULL);
         DELETE FROM incoming_changes;",
    )?;
    {
        let mut derivation_rows = tx.appender("derivations")?;
        let mut change_rows = tx.appender("incoming_changes")?;
        for (id, (derivation, image)) in (first..).zip(derivations) {
            count += 1;
            derivation_rows.append_row(params![
                id,
                derivation.parent,
                derivation.child,
                origin,
                image
            ])?;
            let mut seen = std::collections::BTreeSet::new();
            for change in &derivation.changes {
                if seen.insert(change) {
                    change_rows.append_row(params![id, change.kind, change.subject])?;
                }
            }
        }
        derivation_rows.flush()?;
        change_rows.flush()?;
    }
    tx.execute_batch(
        "INSERT INTO items
             SELECT (SELECT coalesce(max(id), 0) FROM items)
                        + row_number() OVER (ORDER BY kind, subject),
                    kind, subject, 0
             FROM (SELECT DISTINCT kind, subject FROM incoming_changes) n
             WHERE NOT EXISTS (SELECT 1 FROM items i WHERE i.kind = n.kind AND i.subject = n.subject);
         INSERT INTO changes
             SELECT n.derivation, i.id FROM incoming_changes n JOIN items i USING (kind, subject)
             ORDER BY n.derivation, i.id;
         UPDATE items SET derivations = items.derivations + added.n
             FROM (SELECT i.id, count(*) AS n
                   FROM incoming_changes c JOIN items i USING (kind, subject) GROUP BY i.id) added
             WHERE items.id = added.id;
         DELETE FROM incoming_changes;",
    )
    .context("recording the changes")?;
    Ok(count)
}

/// Delete the derivations that `filter` (a SQL condition on `derivations`, with `values`
/// as its parameters) selects, with their changes, keeping every item's count right.
pub fn remove(
    conn: &mut Connection,
    filter: &str,
    values: &[&dyn duckdb::ToSql],
) -> anyhow::Result<usize> {
    let tx = conn.transaction()?;
    let count = remove_in(&tx, filter, values)?;
    tx.commit().context("committing the history")?;
    Ok(count)
}

fn remove_in(
    tx: &duckdb::Transaction<'_>,
    filter: &str,
    values: &[&dyn duckdb::ToSql],
) -> anyhow::Result<usize> {
    tx.execute_batch(
        "CREATE TEMPORARY TABLE IF NOT EXISTS doomed_derivations (id BIGINT NOT NULL);
         DELETE FROM doomed_derivations;",
    )?;
    let count = tx.execute(
        &format!("INSERT INTO doomed_derivations SELECT id FROM derivations WHERE {filter}"),
        values,
    )?;
    tx.execute_batch(
        "UPDATE items SET derivations = items.derivations - gone.n
             FROM (SELECT item, count(*) AS n FROM changes
                   WHERE derivation IN (SELECT id FROM doomed_derivations) GROUP BY item) gone
             WHERE items.id = gone.item;
         DELETE FROM changes WHERE derivation IN (SELECT id FROM doomed_derivations);
         DELETE FROM derivations WHERE id IN (SELECT id FROM doomed_derivations);
         DELETE FROM items WHERE derivations <= 0;
         DELETE FROM doomed_derivations;",
    )
    .context("removing derivations")?;
    Ok(count)
}

/// Read derivations from JSON Lines (ours, or the shared corpus' records, recognised by
/// their fields), optionally zstd-compressed, or from Parquet written by `history export`.
pub fn read_file(conn: &Connection, path: &Path) -> anyhow::Result<Vec<Derivation>> {
    let name = path.to_string_lossy();
    if name.ends_with(".parquet") {
        return read_parquet(conn, path);
    }
    let file = fs_err::File::open(path)?;
    let reader: Box<dyn Read> = if name.ends_with(".zst") {
        let mut decoder = zstd::stream::read::Decoder::new(file)?;
        decoder.window_log_max(crate::store::import::ZSTD_WINDOW_LOG_MAX)?;
        Box::new(decoder)
    } else {
        Box::new(file)
    };
    read_jsonl(reader, &path.display().to_string())
}

/// Derivations from JSON Lines (ours or corpus records); `label` names the source in errors.
pub(crate) fn read_jsonl(reader: impl Read, label: &str) -> anyhow::Result<Vec<Derivation>> {
    let mut derivations = Vec::new();
    for (number, line) in BufReader::new(reader).lines().enumerate() {
        let line = line.with_context(|| format!("reading {label}"))?;
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("{label}:{}: not JSON", number + 1))?;
        let derivation = if value.get("changes").is_some() {
            serde_json::from_value(value)
                .with_context(|| format!("{label}:{}: not a derivation", number + 1))?
        } else if value.get("packages_added").is_some() {
            corpus::convert(&value)
                .with_context(|| format!("{label}:{}: not a corpus record", number + 1))?
        } else {
            bail!(
                "{label}:{}: neither a derivation nor a corpus record",
                number + 1
            );
        };
        derivations.push(derivation);
    }
    Ok(derivations)
}

/// How many derivations each origin contributed (`seed`, `store`, `import:FILE`…).
pub fn origins(conn: &Connection) -> anyhow::Result<Vec<(String, i64)>> {
    let mut statement =
        conn.prepare("SELECT origin, count(*) FROM derivations GROUP BY origin ORDER BY origin")?;
    let rows = statement
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

fn read_parquet(conn: &Connection, path: &Path) -> anyhow::Result<Vec<Derivation>> {
    Ok(read_parquet_rows(conn, path, "NULL")?
        .into_iter()
        .map(|(derivation, _)| derivation)
        .collect())
}

/// Derivations of a Parquet file with the value of `origin` (a column, or `NULL`) for each.
fn read_parquet_rows(
    conn: &Connection,
    path: &Path,
    origin: &str,
) -> anyhow::Result<Vec<(Derivation, Option<String>)>> {
    // Numbered rows, then their changes unnested: no JSON extension needed (the bundled
    // DuckDB has none, and must never try to download one).
    let source = format!(
        "(SELECT file_row_number + 1 AS row, parent, child, {origin} AS origin, changes FROM read_parquet('{}', file_row_number = true))",
        path.to_string_lossy().replace('\'', "''")
    );
    let mut rows: Vec<(Derivation, Option<String>)> = Vec::new();
    let mut statement = conn.prepare(&format!(
        "SELECT parent, child, origin::VARCHAR FROM {source} ORDER BY row"
    ))?;
    for row in statement.query_map([], |row| {
        Ok((
            row.get::<_, String>(0)?,
            row.get::<_, String>(1)?,
            row.get::<_, Option<String>>(2)?,
        ))
    })? {
        let (parent, child, origin) = row.with_context(|| format!("reading {}", path.display()))?;
        rows.push((
            Derivation {
                parent,
                child,
                changes: Vec::new(),
            },
            origin,
        ));
    }
    let mut statement = conn.prepare(&format!(
        "SELECT row, change.kind, change.subject FROM (SELECT row, unnest(changes) AS change FROM {source}) ORDER BY row"
    ))?;
    for row in statement.query_map([], |row| {
        Ok((
            row.get::<_, i64>(0)?,
            row.get::<_, String>(1)?,
            row.get::<_, String>(2)?,
        ))
    })? {
        let (number, kind, subject) = row?;
        if let Some((derivation, _)) = usize::try_from(number - 1)
            .ok()
            .and_then(|i| rows.get_mut(i))
        {
            derivation.changes.push(Change { kind, subject });
        }
    }
    Ok(rows)
}

/// Write what this store can share with others to Parquet (parent, child, origin, changes):
/// every derivation but the seed's (every store has it), the store's own builds once per
/// appliance (the latest) and without step images, as the evidence counts them.
pub fn export_shared(conn: &Connection, path: &Path) -> anyhow::Result<usize> {
    let target = path.to_string_lossy().replace('\'', "''");
    conn.execute_batch(&format!(
        "COPY (
            SELECT d.parent, d.child, d.origin,
                   coalesce(list({{'kind': c.kind, 'subject': c.subject}} ORDER BY c.kind, c.subject)
                            FILTER (WHERE c.kind IS NOT NULL), []) AS changes
            FROM derivations d
            LEFT JOIN (SELECT derivation, kind, subject FROM changes JOIN items ON items.id = changes.item) c
                ON c.derivation = d.id
            WHERE d.origin <> '{seed}'
              AND (d.origin <> 'store' OR (NOT contains(split_part(d.child, '@', 1), '/')
                   AND d.id IN (SELECT max(id) FROM derivations WHERE origin = 'store'
                                GROUP BY parent, split_part(child, '@', 1))))
            GROUP BY d.id, d.parent, d.child, d.origin ORDER BY d.id
        ) TO '{target}' (FORMAT parquet)",
        seed = seed::ORIGIN
    ))
    .with_context(|| format!("writing {}", path.display()))?;
    let count: i64 = conn.query_row(
        &format!("SELECT count(*) FROM read_parquet('{target}')"),
        [],
        |row| row.get(0),
    )?;
    Ok(usize::try_from(count).unwrap_or(0))
}

/// Read a file of [`export_shared`] as it merges into this store: the sender's own builds
/// (`store`) become `store_origin`, other origins keep their names, the seed is skipped.
pub fn read_shared(
    conn: &Connection,
    path: &Path,
    store_origin: &str,
) -> anyhow::Result<Vec<(Derivation, String)>> {
    Ok(read_parquet_rows(conn, path, "origin")?
        .into_iter()
        .filter_map(|(derivation, origin)| {
            let origin = match origin.as_deref() {
                Some("store") | None => store_origin.to_owned(),
                Some(seed::ORIGIN) => return None,
                Some(other) => other.to_owned(),
            };
            Some((derivation, origin))
        })
        .collect())
}

/// Every derivation with its changes, in id order.
pub fn load(conn: &Connection) -> anyhow::Result<Vec<(i64, Derivation)>> {
    let mut by_id: BTreeMap<i64, Derivation> = BTreeMap::new();
    let mut statement = conn.prepare("SELECT id, parent, child FROM derivations")?;
    for row in statement.query_map([], |row| {
        Ok((
            row.get::<_, i64>(0)?,
            row.get::<_, String>(1)?,
            row.get::<_, String>(2)?,
        ))
    })? {
        let (id, parent, child) = row?;
        by_id.insert(
            id,
            Derivation {
                parent,
                child,
                changes: Vec::new(),
            },
        );
    }
    let mut statement = conn.prepare(
        "SELECT c.derivation, i.kind, i.subject FROM changes c JOIN items i ON i.id = c.item
         ORDER BY c.derivation, i.kind, i.subject",
    )?;
    for row in statement.query_map([], |row| {
        Ok((
            row.get::<_, i64>(0)?,
            row.get::<_, String>(1)?,
            row.get::<_, String>(2)?,
        ))
    })? {
        let (id, kind, subject) = row?;
        if let Some(derivation) = by_id.get_mut(&id) {
            derivation.changes.push(Change { kind, subject });
        }
    }
    Ok(by_id.into_iter().collect())
}

/// Write the history as JSON Lines or (by extension) Parquet.
/// Write the history to `path`: Parquet when it ends in `.parquet`, JSON Lines otherwise
/// (`-` for stdout).
pub fn export(conn: &Connection, path: &Path) -> anyhow::Result<usize> {
    let derivations = load(conn)?;
    if path.to_string_lossy().ends_with(".parquet") {
        let target = path.to_string_lossy().replace('\'', "''");
        conn.execute_batch(&format!(
            "COPY (
                SELECT d.parent, d.child,
                       coalesce(list({{'kind': c.kind, 'subject': c.subject}} ORDER BY c.kind, c.subject)
                                FILTER (WHERE c.kind IS NOT NULL), []) AS changes
                FROM derivations d
                LEFT JOIN (SELECT derivation, kind, subject FROM changes JOIN items ON items.id = changes.item) c
                    ON c.derivation = d.id
                GROUP BY d.id, d.parent, d.child ORDER BY d.id
            ) TO '{target}' (FORMAT parquet)"
        ))
        .with_context(|| format!("writing {}", path.display()))?;
        return Ok(derivations.len());
    }
    // `-` is stdout. Lines are written whole, so a closed pipe surfaces as the io::Error the
    // command line recognises (serde_json would wrap it in its own error type).
    let mut out: Box<dyn Write> = if path == Path::new("-") {
        Box::new(std::io::BufWriter::new(std::io::stdout().lock()))
    } else {
        Box::new(std::io::BufWriter::new(fs_err::File::create(path)?))
    };
    for (_, derivation) in &derivations {
        let mut line = serde_json::to_string(derivation)?;
        line.push('\n');
        out.write_all(line.as_bytes())?;
    }
    out.flush()?;
    Ok(derivations.len())
}
