//! Derivation history: which images were derived from which bases, with which typed changes,
//! in the catalog's derivation tables ([`crate::store::derivations`]): import and export,
//! sharing through a registry, and the seed every new store starts with. Suggestions learnt
//! from it are an application of their own ([`crate::suggest`]).
//!
//! - [`corpus`]: the shared corpus' records (mined Dockerfiles) as derivations;
//! - [`seed`]: the corpus shipped in the binary, a new store's first history.

pub mod corpus;
pub mod seed;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;

use anyhow::{Context as _, bail};
use duckdb::Connection;

pub use crate::change::Change;
pub use crate::store::derivations::{
    Derivation, MIGRATE_FROM_SCHEMA_1, SCHEMA, insert, insert_for_images, remove, replace_origins,
};

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
