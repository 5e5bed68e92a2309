//! The catalog's derivation tables: which image derives from which parent, with which
//! typed changes, and where each derivation came from (its origin). The catalog creates them
//! and keeps them consistent as images come and go; the history (import, export, sharing,
//! the seed) and the suggestions read and fill them through this module.

use std::collections::BTreeSet;

use anyhow::Context as _;
use duckdb::{Connection, params};
use serde::{Deserialize, Serialize};

use crate::change::Change;

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

/// One image derived from a parent, with what changed. The JSON Lines form of the history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Derivation {
    pub parent: String,
    pub child: String,
    pub changes: Vec<Change>,
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
    let count = insert_for_images_in_transaction(&tx, derivations, origin)?;
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
        remove_in_transaction(&tx, "origin = ?", &[origin])?;
    }
    let mut count = 0;
    for origin in &origins {
        count += insert_for_images_in_transaction(
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

/// [`insert_for_images`] inside a transaction the caller holds (the catalog's
/// `atomically`): the derivations of an image are committed with the image.
pub fn insert_for_images_in_transaction<'a>(
    tx: &Connection,
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
    let count = remove_in_transaction(&tx, filter, values)?;
    tx.commit().context("committing the history")?;
    Ok(count)
}

/// [`remove`] inside a transaction the caller holds.
pub fn remove_in_transaction(
    tx: &Connection,
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
