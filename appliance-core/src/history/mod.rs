//! Derivation history: which images were derived from which bases, with which typed changes,
//! in DuckDB beside the catalog; and the suggestions learnt from it.
//!
//! - [`corpus`]: the shared corpus' records (mined Dockerfiles) as derivations;
//! - [`engine`]: the ranking (documented there), in memory, loaded from the tables by SQL;
//! - evidence for each suggestion (support, confidence, lift) is SQL over the tables
//!   ([`evidence`]), so what the user reads is what the database says.

pub mod corpus;
pub mod engine;
pub mod suggest;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;

use anyhow::{Context as _, bail};
use duckdb::{Connection, params};
use serde::{Deserialize, Serialize};

/// Tables of the history, created with the catalog's.
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS derivations (
    id BIGINT PRIMARY KEY,
    parent VARCHAR NOT NULL,
    child VARCHAR NOT NULL,
    origin VARCHAR NOT NULL,
    image BIGINT
);
CREATE TABLE IF NOT EXISTS changes (
    derivation BIGINT NOT NULL,
    kind VARCHAR NOT NULL,
    subject VARCHAR NOT NULL
);
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
    let mut count = 0;
    let tx = conn.transaction()?;
    // Ids are allocated under the catalog's exclusive lock, which every writer holds.
    let mut next: i64 = tx.query_row(
        "SELECT coalesce(max(id), 0) + 1 FROM derivations",
        [],
        |row| row.get(0),
    )?;
    {
        let mut derivation_rows = tx.appender("derivations")?;
        let mut change_rows = tx.appender("changes")?;
        for (derivation, image) in derivations {
            count += 1;
            derivation_rows.append_row(params![
                next,
                derivation.parent,
                derivation.child,
                origin,
                image
            ])?;
            let mut seen = std::collections::BTreeSet::new();
            for change in &derivation.changes {
                if seen.insert(change) {
                    change_rows.append_row(params![next, change.kind, change.subject])?;
                }
            }
            next += 1;
        }
        derivation_rows.flush()?;
        change_rows.flush()?;
    }
    tx.commit().context("committing the history")?;
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
    let mut derivations = Vec::new();
    for (number, line) in BufReader::new(reader).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("{}:{}: not JSON", path.display(), number + 1))?;
        let derivation = if value.get("changes").is_some() {
            serde_json::from_value(value)
                .with_context(|| format!("{}:{}: not a derivation", path.display(), number + 1))?
        } else if value.get("packages_added").is_some() {
            corpus::convert(&value).with_context(|| {
                format!("{}:{}: not a corpus record", path.display(), number + 1)
            })?
        } else {
            bail!(
                "{}:{}: neither a derivation nor a corpus record",
                path.display(),
                number + 1
            );
        };
        derivations.push(derivation);
    }
    Ok(derivations)
}

fn read_parquet(conn: &Connection, path: &Path) -> anyhow::Result<Vec<Derivation>> {
    // Numbered rows, then their changes unnested: no JSON extension needed (the bundled
    // DuckDB has none, and must never try to download one).
    let source = format!(
        "(SELECT file_row_number + 1 AS row, parent, child, changes FROM read_parquet('{}', file_row_number = true))",
        path.to_string_lossy().replace('\'', "''")
    );
    let mut derivations: Vec<Derivation> = Vec::new();
    let mut statement =
        conn.prepare(&format!("SELECT parent, child FROM {source} ORDER BY row"))?;
    for row in statement.query_map([], |row| {
        Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
    })? {
        let (parent, child) = row.with_context(|| format!("reading {}", path.display()))?;
        derivations.push(Derivation {
            parent,
            child,
            changes: Vec::new(),
        });
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
        if let Some(derivation) = usize::try_from(number - 1)
            .ok()
            .and_then(|i| derivations.get_mut(i))
        {
            derivation.changes.push(Change { kind, subject });
        }
    }
    Ok(derivations)
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
        "SELECT derivation, kind, subject FROM changes ORDER BY derivation, kind, subject",
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
pub fn export(conn: &Connection, path: &Path) -> anyhow::Result<usize> {
    let derivations = load(conn)?;
    if path.to_string_lossy().ends_with(".parquet") {
        let target = path.to_string_lossy().replace('\'', "''");
        conn.execute_batch(&format!(
            "COPY (
                SELECT d.parent, d.child,
                       coalesce(list({{'kind': c.kind, 'subject': c.subject}} ORDER BY c.kind, c.subject)
                                FILTER (WHERE c.kind IS NOT NULL), []) AS changes
                FROM derivations d LEFT JOIN changes c ON c.derivation = d.id
                GROUP BY d.id, d.parent, d.child ORDER BY d.id
            ) TO '{target}' (FORMAT parquet)"
        ))
        .with_context(|| format!("writing {}", path.display()))?;
        return Ok(derivations.len());
    }
    let mut out = std::io::BufWriter::new(fs_err::File::create(path)?);
    for (_, derivation) in &derivations {
        serde_json::to_writer(&mut out, derivation)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(derivations.len())
}

/// Support, confidence and lift of a change, from SQL over the history.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Evidence {
    /// Derivations in scope (from the base, or its family).
    pub scope_total: i64,
    /// Of those, how many have the change.
    pub scope_with: i64,
    /// The known change that best predicts this one, with its counts.
    pub given: Option<String>,
    pub given_total: i64,
    pub given_with: i64,
    pub support: f64,
    pub confidence: f64,
    pub lift: f64,
}

/// Evidence for `change` among derivations whose parent matches `scope` (a SQL LIKE
/// pattern), given the known changes.
pub fn evidence(
    conn: &Connection,
    scope: &str,
    change: &Change,
    known: &[Change],
) -> anyhow::Result<Evidence> {
    evidence_excluding(conn, scope, NO_EXCLUSION, change, known)
}

/// Matches no child: nothing excluded.
pub const NO_EXCLUSION: &str = "^$";

/// A regular expression for the children (`name@version`) of an appliance's own images
/// (`web@3`, `web/packages@2`): its suggestions must not count its own earlier builds.
pub fn own_images(appliance: &str) -> String {
    let literal: String = appliance
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_string()
            } else {
                format!("[{c}]")
            }
        })
        .collect();
    format!("^{literal}(/[^@]*)?@")
}

/// [`evidence`] without the derivations whose child matches `exclude` (a regex).
pub fn evidence_excluding(
    conn: &Connection,
    scope: &str,
    exclude: &str,
    change: &Change,
    known: &[Change],
) -> anyhow::Result<Evidence> {
    let (scope_total, scope_with): (i64, i64) = conn.query_row(
        "SELECT count(*),
                count(*) FILTER (WHERE EXISTS (SELECT 1 FROM changes c WHERE c.derivation = d.id AND c.kind = ? AND c.subject = ?))
         FROM derivations d WHERE d.parent LIKE ? ESCAPE '\\' AND NOT regexp_matches(d.child, ?)",
        params![change.kind, change.subject, scope, exclude],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )?;
    let support = if scope_total > 0 {
        scope_with as f64 / scope_total as f64
    } else {
        0.0
    };
    let mut best: Option<(String, i64, i64, f64)> = None;
    if !known.is_empty() {
        let mut statement = conn.prepare(
            "SELECT count(*), count(*) FILTER (WHERE EXISTS (
                    SELECT 1 FROM changes c2 WHERE c2.derivation = d.id AND c2.kind = ? AND c2.subject = ?))
             FROM derivations d
             WHERE d.parent LIKE ? ESCAPE '\\' AND NOT regexp_matches(d.child, ?)
               AND EXISTS (SELECT 1 FROM changes c WHERE c.derivation = d.id AND c.kind = ? AND c.subject = ?)",
        )?;
        for given in known {
            let (total, with): (i64, i64) = statement.query_row(
                params![
                    change.kind,
                    change.subject,
                    scope,
                    exclude,
                    given.kind,
                    given.subject
                ],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )?;
            // Prefer strong evidence: confidence, then the larger sample.
            if total >= 3 {
                let confidence = with as f64 / total as f64;
                if best
                    .as_ref()
                    .is_none_or(|(_, t, _, c)| confidence > *c || (confidence == *c && total > *t))
                {
                    best = Some((given.key(), total, with, confidence));
                }
            }
        }
    }
    let (given, given_total, given_with, confidence) = match best {
        Some((given, total, with, confidence)) => (Some(given), total, with, confidence),
        None => (None, 0, 0, support),
    };
    Ok(Evidence {
        scope_total,
        scope_with,
        given,
        given_total,
        given_with,
        support,
        confidence,
        lift: if support > 0.0 {
            confidence / support
        } else {
            0.0
        },
    })
}

/// The scope of a base in SQL: exact parent with at least `MIN_SCOPE` derivations, else its
/// family (`debian/%`), else everything. Returns (label, LIKE pattern, size).
pub fn sql_scope(conn: &Connection, base: &str) -> anyhow::Result<(String, String, i64)> {
    let escape = |t: &str| {
        t.replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_")
    };
    let mut tiers = vec![(base.to_owned(), escape(base))];
    if let Some((family, _)) = base.split_once('/') {
        tiers.push((format!("{family}/*"), format!("{}/%", escape(family))));
    }
    for (label, pattern) in tiers {
        let size: i64 = conn.query_row(
            "SELECT count(*) FROM derivations WHERE parent LIKE ? ESCAPE '\\'",
            params![pattern],
            |row| row.get(0),
        )?;
        if size >= engine::MIN_SCOPE as i64 {
            return Ok((label, pattern, size));
        }
    }
    let size: i64 = conn.query_row("SELECT count(*) FROM derivations", [], |row| row.get(0))?;
    Ok(("all images".to_owned(), "%".to_owned(), size))
}

/// The ranking of [`engine`], computed by DuckDB over the history tables: neighbours
/// weighted by their idf-weighted overlap with the known changes, plus a small support prior.
pub fn sql_rank(
    conn: &Connection,
    pattern: &str,
    known: &[Change],
    limit: usize,
) -> anyhow::Result<Vec<engine::Scored>> {
    sql_rank_excluding(conn, pattern, NO_EXCLUSION, known, limit)
}

/// [`sql_rank`] without the derivations whose child matches `exclude` (a regex).
pub fn sql_rank_excluding(
    conn: &Connection,
    pattern: &str,
    exclude: &str,
    known: &[Change],
    limit: usize,
) -> anyhow::Result<Vec<engine::Scored>> {
    // The known changes as a VALUES list of parameters (the catalog is opened read-only, so
    // no temporary table).
    let known_rows = if known.is_empty() {
        "SELECT NULL::VARCHAR AS kind, NULL::VARCHAR AS subject WHERE false".to_owned()
    } else {
        format!(
            "SELECT * FROM (VALUES {}) AS k(kind, subject)",
            vec!["(?::VARCHAR, ?::VARCHAR)"; known.len()].join(", ")
        )
    };
    let sql = format!(
        "WITH known AS ({known_rows}),
         total AS (SELECT count(*)::DOUBLE AS n FROM derivations),
         idf AS (
             SELECT kind, subject, ln((SELECT n FROM total) / count(*)) AS idf
             FROM changes GROUP BY ALL
         ),
         known_weight AS (
             SELECT sum(coalesce(i.idf, ln((SELECT n FROM total)))) AS k
             FROM known k LEFT JOIN idf i USING (kind, subject)
         ),
         scope AS (SELECT id FROM derivations WHERE parent LIKE ? ESCAPE '\\' AND NOT regexp_matches(child, ?)),
         scoped AS (SELECT c.* FROM changes c JOIN scope s ON c.derivation = s.id),
         sizes AS (
             SELECT c.derivation, sum(i.idf) AS n
             FROM scoped c JOIN idf i USING (kind, subject) GROUP BY c.derivation
         ),
         overlap AS (
             SELECT c.derivation, sum(i.idf) AS shared
             FROM scoped c
             JOIN known k ON c.kind = k.kind AND c.subject = k.subject
             JOIN idf i ON c.kind = i.kind AND c.subject = i.subject
             GROUP BY c.derivation
         ),
         weights AS (
             SELECT o.derivation, pow(o.shared / sqrt(s.n * (SELECT k FROM known_weight)), ?) AS w
             FROM overlap o JOIN sizes s USING (derivation)
             WHERE s.n > 0 AND o.shared > 0 AND (SELECT k FROM known_weight) > 0
         ),
         votes AS (
             SELECT c.kind, c.subject, sum(w.w) AS score FROM scoped c JOIN weights w USING (derivation) GROUP BY ALL
         ),
         support AS (SELECT kind, subject, count(*) AS n FROM scoped GROUP BY ALL)
         SELECT s.kind, s.subject, coalesce(v.score, 0) + ? * s.n / (SELECT count(*) FROM scope) AS score
         FROM support s LEFT JOIN votes v USING (kind, subject)
         WHERE NOT EXISTS (SELECT 1 FROM known k WHERE k.kind = s.kind AND k.subject = s.subject)
         ORDER BY score DESC, s.kind, s.subject
         LIMIT ?"
    );
    let mut statement = conn.prepare(&sql)?;
    let mut values: Vec<duckdb::types::Value> = Vec::new();
    for change in known {
        values.push(change.kind.clone().into());
        values.push(change.subject.clone().into());
    }
    values.push(pattern.to_owned().into());
    values.push(exclude.to_owned().into());
    values.push(engine::SHARPNESS.into());
    values.push(engine::PRIOR.into());
    values.push((limit as i64).into());
    let rows = statement.query_map(duckdb::params_from_iter(values), |row| {
        Ok(engine::Scored {
            change: Change {
                kind: row.get(0)?,
                subject: row.get(1)?,
            },
            score: row.get(2)?,
        })
    })?;
    rows.collect::<Result<Vec<_>, _>>()
        .context("ranking suggestions")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn history() -> Vec<Derivation> {
        let text = include_str!("../../../fixtures/suggest/history.jsonl");
        text.lines()
            .map(|line| serde_json::from_str(line).expect("fixture derivation"))
            .collect()
    }

    fn database(derivations: &[Derivation]) -> Connection {
        let mut conn = Connection::open_in_memory().expect("in-memory DuckDB");
        conn.execute_batch(SCHEMA).expect("schema");
        insert(&mut conn, derivations, "test").expect("insert");
        conn
    }

    #[test]
    fn sql_ranking_and_the_in_memory_engine_agree() {
        let derivations = history();
        let conn = database(&derivations);
        let loaded = load(&conn).expect("load");
        let index = engine::Index::build(&loaded);
        for known in [
            vec![],
            vec![Change::new("package-added", "nginx")],
            vec![
                Change::new("package-added", "curl"),
                Change::new("package-added", "vim"),
            ],
            vec![
                Change::new("package-added", "nginx"),
                Change::new("user-added", "www"),
            ],
        ] {
            let (label, pattern, size) = sql_scope(&conn, "debian/bookworm").expect("scope");
            let scope = index.scope("debian/bookworm");
            assert_eq!(
                (label.as_str(), pattern.as_str(), size as usize),
                (scope.label.as_str(), scope.pattern.as_str(), scope.size)
            );
            let from_sql = sql_rank(&conn, &pattern, &known, 6).expect("sql ranking");
            let in_memory = index.suggest(&scope, &known, None, None, 6);
            let names =
                |list: &[engine::Scored]| list.iter().map(|s| s.change.key()).collect::<Vec<_>>();
            assert_eq!(names(&from_sql), names(&in_memory), "known {known:?}");
            for (a, b) in from_sql.iter().zip(&in_memory) {
                assert!((a.score - b.score).abs() < 1e-9, "{a:?} vs {b:?}");
            }
        }
    }

    #[test]
    fn an_appliance_s_own_images_are_recognised_by_child_name() {
        let conn = Connection::open_in_memory().expect("duckdb");
        let matches = |child: &str| -> bool {
            conn.query_row(
                "SELECT regexp_matches(?, ?)",
                params![child, own_images("web")],
                |row| row.get(0),
            )
            .expect("query")
        };
        assert!(matches("web@1"));
        assert!(matches("web/packages@12"));
        assert!(!matches("web-debug@1"));
        assert!(!matches("webx@1"));
        assert!(!matches("other/web@1"));
        let dotted = own_images("a.b");
        assert!(
            !conn
                .query_row(
                    "SELECT regexp_matches('axb@1', ?)",
                    params![dotted],
                    |row| row.get::<_, bool>(0)
                )
                .expect("query")
        );
    }

    #[test]
    fn evidence_counts_support_and_the_best_given_change() {
        let conn = database(&history());
        let change = Change::new("package-added", "ca-certificates");
        let known = [
            Change::new("package-added", "nginx"),
            Change::new("user-added", "nobody-has-this"),
        ];
        let evidence = evidence(&conn, "debian/bookworm", &change, &known).expect("evidence");
        assert_eq!((evidence.scope_with, evidence.scope_total), (30, 40));
        assert_eq!(evidence.given.as_deref(), Some("package-added:nginx"));
        assert_eq!((evidence.given_with, evidence.given_total), (27, 29));
        assert!((evidence.lift - (27.0 / 29.0) / (30.0 / 40.0)).abs() < 1e-9);
    }
}
