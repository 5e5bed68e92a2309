//! Statistics over the history in SQL: the scope of a base, the ranking of
//! [`engine`](super::engine) computed by DuckDB, and the evidence (support, confidence, lift)
//! each suggestion carries, so what the user reads is what the database says.
//!
//! Every query starts from the few items it is about (the known changes, the candidates)
//! and reaches derivations through them; the per-item derivation counts kept in `items` give
//! the inverse document frequencies without a pass over all changes.

use std::collections::HashMap;

use anyhow::Context as _;
use duckdb::{Connection, params, params_from_iter, types::Value};
use serde::{Deserialize, Serialize};

use super::{Change, engine};

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

/// The derivations a statistic counts: parents matching a LIKE pattern (see [`sql_scope`]),
/// children not matching a regex (see [`own_images`]). Its SQL takes those two parameters.
const SCOPE: &str =
    "SELECT id FROM derivations WHERE parent LIKE ? ESCAPE '\\' AND NOT regexp_matches(child, ?)";

/// `(?::VARCHAR, ?::VARCHAR), …` rows named `alias(ordinal, kind, subject)`, the parameters
/// of which [`change_values`] gives.
fn change_rows(alias: &str, count: usize) -> String {
    if count == 0 {
        return format!(
            "(SELECT NULL::INTEGER AS ordinal, NULL::VARCHAR AS kind, NULL::VARCHAR AS subject WHERE false) AS {alias}"
        );
    }
    format!(
        "(VALUES {}) AS {alias}(ordinal, kind, subject)",
        vec!["(?::INTEGER, ?::VARCHAR, ?::VARCHAR)"; count].join(", ")
    )
}

fn change_values(changes: &[Change], values: &mut Vec<Value>) {
    for (ordinal, change) in changes.iter().enumerate() {
        values.push(Value::Int(ordinal as i32));
        values.push(change.kind.clone().into());
        values.push(change.subject.clone().into());
    }
}

/// Evidence for `change` among derivations whose parent matches `scope` (a SQL LIKE
/// pattern), given the known changes.
pub fn evidence(
    conn: &Connection,
    scope: &str,
    change: &Change,
    known: &[Change],
) -> anyhow::Result<Evidence> {
    let mut all = evidence_for(
        conn,
        scope,
        NO_EXCLUSION,
        std::slice::from_ref(change),
        known,
    )?;
    all.pop().context("evidence for one change")
}

/// Evidence for each of `changes`, in their order, among the derivations in scope whose
/// child does not match `exclude` (a regex). For each change, the known change that best
/// predicts it is the one with the highest confidence among those at least 3 derivations
/// in scope have (ties: the larger sample, then the first known).
pub fn evidence_for(
    conn: &Connection,
    scope: &str,
    exclude: &str,
    changes: &[Change],
    known: &[Change],
) -> anyhow::Result<Vec<Evidence>> {
    let scope_total: i64 = conn.query_row(
        &format!("SELECT count(*) FROM ({SCOPE})"),
        params![scope, exclude],
        |row| row.get(0),
    )?;
    let asked: Vec<Change> = changes.iter().chain(known).cloned().collect();
    let ids = item_ids(conn, &asked)?;
    let id_list = |list: &[Change]| -> String {
        let ids: Vec<String> = list
            .iter()
            .filter_map(|c| ids.get(c))
            .map(i32::to_string)
            .collect();
        if ids.is_empty() {
            "NULL".to_owned()
        } else {
            ids.join(", ")
        }
    };
    // Derivations in scope having each item, then having both a known item and a candidate.
    let mut in_scope: HashMap<i32, i64> = HashMap::new();
    let mut statement = conn.prepare(&format!(
        "SELECT item, count(*) FROM changes
         WHERE item IN ({}) AND derivation IN ({SCOPE}) GROUP BY item",
        id_list(&asked)
    ))?;
    for row in statement.query_map(params![scope, exclude], |row| {
        Ok((row.get::<_, i32>(0)?, row.get::<_, i64>(1)?))
    })? {
        let (item, count) = row?;
        in_scope.insert(item, count);
    }
    let mut together: HashMap<(i32, i32), i64> = HashMap::new();
    if !known.is_empty() {
        let mut statement = conn.prepare(&format!(
            "SELECT g.item, c.item, count(*)
             FROM changes g JOIN changes c USING (derivation)
             WHERE g.item IN ({}) AND c.item IN ({}) AND g.derivation IN ({SCOPE})
             GROUP BY ALL",
            id_list(known),
            id_list(changes)
        ))?;
        for row in statement.query_map(params![scope, exclude], |row| {
            Ok((
                row.get::<_, i32>(0)?,
                row.get::<_, i32>(1)?,
                row.get::<_, i64>(2)?,
            ))
        })? {
            let (given, change, count) = row?;
            together.insert((given, change), count);
        }
    }
    let count_of = |change: &Change| ids.get(change).and_then(|id| in_scope.get(id).copied());
    Ok(changes
        .iter()
        .map(|change| {
            let scope_with = count_of(change).unwrap_or(0);
            let support = if scope_total > 0 {
                scope_with as f64 / scope_total as f64
            } else {
                0.0
            };
            let mut best: Option<(&Change, i64, i64, f64)> = None;
            for given in known {
                let total = count_of(given).unwrap_or(0);
                let with = ids
                    .get(given)
                    .zip(ids.get(change))
                    .and_then(|(g, c)| together.get(&(*g, *c)).copied())
                    .unwrap_or(0);
                // Prefer strong evidence: confidence, then the larger sample.
                if total >= 3 {
                    let confidence = with as f64 / total as f64;
                    if best.as_ref().is_none_or(|(_, t, _, c)| {
                        confidence > *c || (confidence == *c && total > *t)
                    }) {
                        best = Some((given, total, with, confidence));
                    }
                }
            }
            let (given, given_total, given_with, confidence) = match best {
                Some((given, total, with, confidence)) => {
                    (Some(given.key()), total, with, confidence)
                }
                None => (None, 0, 0, support),
            };
            Evidence {
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
            }
        })
        .collect())
}

/// The `items` ids of the changes the history has.
fn item_ids(conn: &Connection, changes: &[Change]) -> anyhow::Result<HashMap<Change, i32>> {
    let mut ids = HashMap::new();
    if changes.is_empty() {
        return Ok(ids);
    }
    let mut statement = conn.prepare(&format!(
        "SELECT a.ordinal, i.id FROM {} JOIN items i USING (kind, subject)",
        change_rows("a", changes.len())
    ))?;
    let mut values = Vec::new();
    change_values(changes, &mut values);
    for row in statement.query_map(params_from_iter(values), |row| {
        Ok((row.get::<_, i32>(0)?, row.get::<_, i32>(1)?))
    })? {
        let (ordinal, id) = row?;
        if let Some(change) = usize::try_from(ordinal).ok().and_then(|i| changes.get(i)) {
            ids.insert(change.clone(), id);
        }
    }
    Ok(ids)
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
    // Neighbours are found from the known items' rows, so only derivations sharing something
    // with the appliance are read whole; the support prior still counts the whole scope.
    let sql = format!(
        "WITH asked AS (SELECT * FROM {asked}),
         total AS (SELECT count(*)::DOUBLE AS n FROM derivations),
         known AS (
             SELECT i.id AS item, ln((SELECT n FROM total) / i.derivations) AS idf
             FROM asked a JOIN items i USING (kind, subject)
         ),
         known_weight AS (
             SELECT sum(coalesce(ln((SELECT n FROM total) / i.derivations), ln((SELECT n FROM total)))) AS k
             FROM asked a LEFT JOIN items i ON i.kind = a.kind AND i.subject = a.subject
         ),
         scope AS ({SCOPE}),
         scoped AS (SELECT c.derivation, c.item FROM changes c SEMI JOIN scope s ON c.derivation = s.id),
         overlap AS (
             SELECT c.derivation, sum(k.idf) AS shared
             FROM scoped c JOIN known k USING (item) GROUP BY c.derivation
         ),
         neighbour_changes AS (
             SELECT c.derivation, c.item FROM changes c SEMI JOIN overlap o ON c.derivation = o.derivation
         ),
         sizes AS (
             SELECT nc.derivation, sum(ln((SELECT n FROM total) / i.derivations)) AS size
             FROM neighbour_changes nc JOIN items i ON i.id = nc.item GROUP BY nc.derivation
         ),
         weights AS (
             SELECT o.derivation, pow(o.shared / sqrt(s.size * (SELECT k FROM known_weight)), ?) AS w
             FROM overlap o JOIN sizes s USING (derivation)
             WHERE s.size > 0 AND o.shared > 0 AND (SELECT k FROM known_weight) > 0
         ),
         votes AS (
             SELECT nc.item, sum(w.w) AS score
             FROM neighbour_changes nc JOIN weights w USING (derivation) GROUP BY nc.item
         ),
         support AS (SELECT item, count(*) AS n FROM scoped GROUP BY item)
         SELECT i.kind, i.subject, coalesce(v.score, 0) + ? * s.n / (SELECT count(*) FROM scope) AS score
         FROM support s LEFT JOIN votes v USING (item) JOIN items i ON i.id = s.item
         WHERE s.item NOT IN (SELECT item FROM known)
         ORDER BY score DESC, i.kind, i.subject
         LIMIT ?",
        asked = change_rows("k", known.len()),
    );
    let mut statement = conn.prepare(&sql)?;
    let mut values: Vec<Value> = Vec::new();
    change_values(known, &mut values);
    values.push(pattern.to_owned().into());
    values.push(exclude.to_owned().into());
    values.push(engine::SHARPNESS.into());
    values.push(engine::PRIOR.into());
    values.push((limit as i64).into());
    let rows = statement.query_map(params_from_iter(values), |row| {
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
    use crate::history::{Derivation, SCHEMA, insert, load, remove};

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

    #[test]
    fn evidence_for_many_changes_matches_each_alone() {
        let conn = database(&history());
        let known = [
            Change::new("package-added", "nginx"),
            Change::new("package-added", "curl"),
            Change::new("user-added", "nobody-has-this"),
        ];
        let changes = [
            Change::new("package-added", "ca-certificates"),
            Change::new("package-added", "vim"),
            Change::new("package-added", "not-in-the-history"),
        ];
        let together =
            evidence_for(&conn, "debian/bookworm", NO_EXCLUSION, &changes, &known).expect("batch");
        assert_eq!(together.len(), 3);
        for (change, batched) in changes.iter().zip(&together) {
            let alone = evidence(&conn, "debian/bookworm", change, &known).expect("one");
            assert_eq!(
                serde_json::to_value(batched).expect("json"),
                serde_json::to_value(&alone).expect("json"),
                "{change:?}"
            );
        }
        assert_eq!((together[2].scope_with, together[2].given_with), (0, 0));
        assert!(together[1].scope_with > 0, "vim is in the fixture history");
    }

    /// Per-item derivation counts as `remove` must leave them: recounted from `changes`.
    fn counts_from_scratch(conn: &Connection) -> Vec<(String, String, i64, i64)> {
        let mut statement = conn
            .prepare(
                "SELECT i.kind, i.subject, i.derivations, (SELECT count(*) FROM changes c WHERE c.item = i.id)
                 FROM items i ORDER BY i.kind, i.subject",
            )
            .expect("prepare");
        statement
            .query_map([], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
            })
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows")
    }

    #[test]
    fn removing_derivations_keeps_item_counts_and_the_ranking_right() {
        let derivations = history();
        let mut conn = database(&derivations);
        let kept: Vec<Derivation> = derivations
            .iter()
            .filter(|d| !d.changes.iter().any(|c| c.subject == "nginx"))
            .cloned()
            .collect();
        let removed = remove(
            &mut conn,
            "id IN (SELECT derivation FROM changes JOIN items ON items.id = changes.item WHERE subject = ?)",
            &[&"nginx"],
        )
        .expect("remove");
        assert_eq!(removed, derivations.len() - kept.len());
        assert!(removed > 0);
        for (kind, subject, stored, recounted) in counts_from_scratch(&conn) {
            assert_eq!(stored, recounted, "{kind}:{subject}");
            assert!(stored > 0, "{kind}:{subject} is left with no derivation");
        }
        let fresh = database(&kept);
        let known = [Change::new("package-added", "curl")];
        let names = |conn: &Connection| -> Vec<(String, i64)> {
            sql_rank(conn, "%", &known, 8)
                .expect("rank")
                .into_iter()
                .map(|s| (s.change.key(), (s.score * 1e9).round() as i64))
                .collect()
        };
        assert_eq!(names(&conn), names(&fresh));
        assert_eq!(
            load(&conn).expect("load").len(),
            load(&fresh).expect("load").len()
        );
    }
}
