//! Statistics over the history in SQL: the scope of a base, the ranking of
//! [`engine`](super::engine) computed by DuckDB, and the evidence (support, confidence, lift)
//! each suggestion carries, so what the user reads is what the database says.
//!
//! Ranking and evidence are one query over shared parts: the scope's derivations, their
//! changes, the neighbours (those sharing a known change) and their changes, each computed
//! once. The per-item derivation counts kept in `items` give the inverse document
//! frequencies without a pass over every change.

use std::collections::BTreeMap;

use anyhow::Context as _;
use duckdb::{Connection, params, params_from_iter, types::Value};

use super::engine;
use super::item_model::{ItemModel, MODELLED_KIND};
use crate::change::Change;

pub use crate::diagnostics::Evidence;

/// A ranked change and its evidence.
#[derive(Debug, Clone)]
pub struct Ranked {
    pub scored: engine::Scored,
    pub evidence: Evidence,
}

/// Which derivations a statistic counts.
#[derive(Debug, Clone, Copy)]
pub struct Scope<'a> {
    /// Parents matching this SQL LIKE pattern (see [`sql_scope`]).
    pub pattern: &'a str,
    /// Leave out the images of these appliances (`web@3`, `web/packages@2`): an appliance's
    /// suggestions must not count its own builds, nor those of the appliances it derives
    /// from or that derive from it (`web-debug` adding curl is no evidence that `web`
    /// needs curl).
    pub excluding: &'a [String],
}

impl<'a> Scope<'a> {
    pub fn parents(pattern: &'a str) -> Self {
        Self {
            pattern,
            excluding: &[],
        }
    }
}

/// Builds one statement's text and its positional parameters together, in text order.
struct Query {
    sql: String,
    values: Vec<Value>,
}

impl Query {
    fn text(&mut self, text: &str) -> &mut Self {
        self.sql.push_str(text);
        self
    }

    fn value(&mut self, value: impl Into<Value>) -> &mut Self {
        self.sql.push('?');
        self.values.push(value.into());
        self
    }

    /// `(VALUES (0, kind, subject), …) AS alias(ordinal, kind, subject)`.
    fn changes(&mut self, alias: &str, changes: &[Change]) -> &mut Self {
        if changes.is_empty() {
            return self.text(&format!(
                "(SELECT NULL::INTEGER AS ordinal, NULL::VARCHAR AS kind, NULL::VARCHAR AS subject WHERE false) AS {alias}"
            ));
        }
        self.text("(VALUES ");
        for (ordinal, change) in changes.iter().enumerate() {
            self.text(if ordinal == 0 { "(" } else { ", (" })
                .value(ordinal as i32)
                .text("::INTEGER, ")
                .value(change.kind.clone())
                .text("::VARCHAR, ")
                .value(change.subject.clone())
                .text("::VARCHAR)");
        }
        self.text(&format!(") AS {alias}(ordinal, kind, subject)"))
    }

    /// The parts ranking and evidence share, as the first common table expressions.
    fn shared(scope: Scope<'_>, known: &[Change]) -> Self {
        let mut query = Self {
            sql: String::new(),
            values: Vec::new(),
        };
        query
            .text("WITH asked AS (SELECT * FROM ")
            .changes("a", known)
            .text(
                "),
             total AS (SELECT count(*)::DOUBLE AS n FROM derivations),
             known AS (
                 SELECT a.ordinal, i.id AS item, ln((SELECT n FROM total) / i.derivations) AS idf
                 FROM asked a JOIN items i USING (kind, subject)
             ),
             known_weight AS (
                 SELECT sum(coalesce(ln((SELECT n FROM total) / i.derivations), ln((SELECT n FROM total)))) AS k
                 FROM asked a LEFT JOIN items i ON i.kind = a.kind AND i.subject = a.subject
             ),
             pool AS MATERIALIZED (
                 SELECT id, parent FROM derivations WHERE true",
            );
        for appliance in scope.excluding {
            // Plain prefixes, not a regex: this runs on every derivation.
            query
                .text(" AND NOT (starts_with(child, ")
                .value(format!("{appliance}@"))
                .text(") OR (starts_with(child, ")
                .value(format!("{appliance}/"))
                .text(") AND contains(child, '@')))");
        }
        // The store's own builds count per appliance, not per image: its latest build only
        // (a rebuild is not another image that made the same choice), and never the
        // intermediate step images (`web/packages@2`), which are part of one build.
        query.text(
            " AND (origin <> 'store' OR (NOT contains(split_part(child, '@', 1), '/')
                   AND id IN (SELECT max(id) FROM derivations WHERE origin = 'store'
                              GROUP BY parent, split_part(child, '@', 1))))",
        );
        // Neighbours come from the whole pool (what any base's derivations share says what
        // goes together), support and evidence from the scope (what is usual on this base).
        query
            .text(
                "),
             scope AS MATERIALIZED (SELECT id FROM pool WHERE parent LIKE ",
            )
            .value(scope.pattern.to_owned())
            .text(
                " ESCAPE '\\'),
             scope_size AS (SELECT count(*) AS n FROM scope),
             scoped AS MATERIALIZED (
                 SELECT c.derivation, c.item FROM changes c SEMI JOIN scope s ON c.derivation = s.id
             ),
             support AS MATERIALIZED (SELECT item, count(*) AS n FROM scoped GROUP BY item),
             overlap_all AS MATERIALIZED (
                 SELECT c.derivation, sum(k.idf) AS shared
                 FROM changes c JOIN known k USING (item)
                 WHERE c.derivation IN (SELECT id FROM pool)
                 GROUP BY c.derivation
             ),
             overlap AS MATERIALIZED (
                 SELECT * FROM overlap_all WHERE shared >= ",
            )
            .value(engine::MIN_SHARED)
            .text(
                " * (SELECT k FROM known_weight)
             ),
             neighbour_changes AS MATERIALIZED (
                 SELECT c.derivation, c.item FROM changes c SEMI JOIN overlap o USING (derivation)
             ),
             scoped_neighbour_changes AS MATERIALIZED (
                 SELECT c.derivation, c.item FROM scoped c SEMI JOIN overlap_all o USING (derivation)
             ),",
            );
        query
    }

    /// The candidates' evidence rows: one per candidate and known change (or one with a
    /// NULL ordinal when nothing is known), ordered by position then ordinal.
    fn evidence_rows(&mut self) -> &mut Self {
        self.text(
            "
             together AS (
                 SELECT g.item AS given, c.item AS candidate, count(*) AS n
                 FROM scoped_neighbour_changes g JOIN scoped_neighbour_changes c USING (derivation)
                 WHERE g.item IN (SELECT item FROM known) AND c.item IN (SELECT item FROM candidates)
                 GROUP BY ALL
             )
             SELECT c.position, c.kind, c.subject, c.score, (SELECT n FROM scope_size),
                    coalesce(cs.n, 0), k.ordinal, coalesce(ks.n, 0), coalesce(t.n, 0)
             FROM candidates c
             LEFT JOIN support cs ON cs.item = c.item
             LEFT JOIN known k ON true
             LEFT JOIN support ks ON ks.item = k.item
             LEFT JOIN together t ON t.given = k.item AND t.candidate = c.item
             ORDER BY c.position, k.ordinal",
        )
    }

    fn run(&self, conn: &Connection, known: &[Change]) -> anyhow::Result<Vec<Ranked>> {
        let mut statement = conn.prepare(&self.sql)?;
        let rows = statement.query_map(params_from_iter(self.values.iter()), |row| {
            Ok(EvidenceRow {
                position: row.get(0)?,
                change: Change {
                    kind: row.get(1)?,
                    subject: row.get(2)?,
                },
                score: row.get(3)?,
                scope_total: row.get(4)?,
                scope_with: row.get(5)?,
                given: row.get(6)?,
                given_total: row.get(7)?,
                given_with: row.get(8)?,
            })
        })?;
        let mut by_position: BTreeMap<i64, Vec<EvidenceRow>> = BTreeMap::new();
        for row in rows {
            let row = row.context("reading the history's statistics")?;
            by_position.entry(row.position).or_default().push(row);
        }
        Ok(by_position
            .into_values()
            .filter_map(|rows| assemble(&rows, known))
            .collect())
    }
}

struct EvidenceRow {
    position: i64,
    change: Change,
    score: f64,
    scope_total: i64,
    scope_with: i64,
    given: Option<i32>,
    given_total: i64,
    given_with: i64,
}

/// One candidate's evidence from its rows. The known change that best predicts it is the one
/// with the highest confidence among those at least 3 derivations in scope have (ties: the
/// larger sample, then the first known).
fn assemble(rows: &[EvidenceRow], known: &[Change]) -> Option<Ranked> {
    let first = rows.first()?;
    let support = if first.scope_total > 0 {
        first.scope_with as f64 / first.scope_total as f64
    } else {
        0.0
    };
    let mut best: Option<(&Change, i64, i64, f64)> = None;
    for row in rows {
        let Some(given) = row
            .given
            .and_then(|ordinal| usize::try_from(ordinal).ok())
            .and_then(|ordinal| known.get(ordinal))
        else {
            continue;
        };
        if row.given_total >= 3 {
            let confidence = row.given_with as f64 / row.given_total as f64;
            if best.as_ref().is_none_or(|(_, total, _, best_confidence)| {
                confidence > *best_confidence
                    || (confidence == *best_confidence && row.given_total > *total)
            }) {
                best = Some((given, row.given_total, row.given_with, confidence));
            }
        }
    }
    let (given, given_total, given_with, confidence) = match best {
        Some((given, total, with, confidence)) => (Some(given.key()), total, with, confidence),
        None => (None, 0, 0, support),
    };
    Some(Ranked {
        scored: engine::Scored {
            change: first.change.clone(),
            score: first.score,
        },
        evidence: Evidence {
            scope_total: first.scope_total,
            scope_with: first.scope_with,
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
        },
    })
}

/// Evidence for `change` among derivations whose parent matches `pattern` (a SQL LIKE
/// pattern), given the known changes.
pub fn evidence(
    conn: &Connection,
    pattern: &str,
    change: &Change,
    known: &[Change],
) -> anyhow::Result<Evidence> {
    let mut all = evidence_for(
        conn,
        Scope::parents(pattern),
        std::slice::from_ref(change),
        known,
    )?;
    all.pop().context("evidence for one change")
}

/// Evidence for each of `changes`, in their order, among the derivations in scope.
pub fn evidence_for(
    conn: &Connection,
    scope: Scope<'_>,
    changes: &[Change],
    known: &[Change],
) -> anyhow::Result<Vec<Evidence>> {
    let mut query = Query::shared(scope, known);
    query
        .text(
            "
             candidates AS (
                 SELECT w.ordinal + 1 AS position, i.id AS item, w.kind, w.subject, 0.0::DOUBLE AS score
                 FROM ",
        )
        .changes("w", changes)
        .text(" LEFT JOIN items i USING (kind, subject)),")
        .evidence_rows();
    Ok(query
        .run(conn, known)?
        .into_iter()
        .map(|ranked| ranked.evidence)
        .collect())
}

/// The scope of a base in SQL: exact parent with at least `MIN_SCOPE` derivations, else its
/// family (`debian/%`), else everything. Returns (label, LIKE pattern, size).
pub fn sql_scope(conn: &Connection, base: &str) -> anyhow::Result<(String, String, i64)> {
    let exact = engine::like_escape(base);
    let family = base.split_once('/').map(|(family, _)| {
        (
            format!("{family}/*"),
            format!("{}/%", engine::like_escape(family)),
        )
    });
    // One pass over the derivations counts all three tiers.
    let (exact_size, family_size, all): (i64, i64, i64) = conn.query_row(
        "SELECT count(*) FILTER (WHERE parent LIKE ? ESCAPE '\\'),
                count(*) FILTER (WHERE parent LIKE ? ESCAPE '\\'),
                count(*)
         FROM derivations",
        params![
            exact,
            family.as_ref().map_or("", |(_, pattern)| pattern.as_str())
        ],
        |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
    )?;
    let enough = |size: i64| size >= engine::MIN_SCOPE as i64;
    if enough(exact_size) {
        return Ok((base.to_owned(), exact, exact_size));
    }
    if let Some((label, pattern)) = family
        && enough(family_size)
    {
        return Ok((label, pattern, family_size));
    }
    Ok(("any base".to_owned(), "%".to_owned(), all))
}

/// Up to `limit` derivations of the scope that made `change`, as (child, origin): the store's
/// own and imported ones first, then the seed's, for `suggest --explain`.
pub fn examples(
    conn: &Connection,
    scope: Scope<'_>,
    change: &Change,
    limit: usize,
) -> anyhow::Result<Vec<(String, String)>> {
    let mut query = Query::shared(scope, &[]);
    query
        .text(" wanted AS (SELECT id FROM items WHERE kind = ")
        .value(change.kind.clone())
        .text(" AND subject = ")
        .value(change.subject.clone())
        .text(&format!(
            ")
             SELECT d.child, d.origin FROM scoped c JOIN derivations d ON d.id = c.derivation
             WHERE c.item IN (SELECT id FROM wanted)
             ORDER BY d.origin = '{}', d.id DESC LIMIT {limit}",
            crate::history::seed::ORIGIN
        ));
    let mut statement = conn.prepare(&query.sql)?;
    let rows = statement
        .query_map(params_from_iter(query.values.iter()), |row| {
            Ok((row.get(0)?, row.get(1)?))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// How the scope's derivations (as the evidence counts them: the appliance's lineage left
/// out, the store's builds once per appliance) divide by origin: (seed, elsewhere).
pub fn scope_origins(conn: &Connection, scope: Scope<'_>) -> anyhow::Result<(i64, i64)> {
    let mut query = Query::shared(scope, &[]);
    query.text(&format!(
        " counted AS (SELECT d.origin FROM scope s JOIN derivations d ON d.id = s.id)
         SELECT count(*) FILTER (WHERE origin = '{seed}'), count(*) FILTER (WHERE origin <> '{seed}')
         FROM counted",
        seed = crate::history::seed::ORIGIN
    ));
    Ok(
        conn.query_row(&query.sql, params_from_iter(query.values.iter()), |row| {
            Ok((row.get(0)?, row.get(1)?))
        })?,
    )
}

/// The words for the images a scope counts, by where they come from: "public Debian-based
/// images" (all from the seed), "images derived from debian/bookworm" (none), or both.
pub fn scope_phrase(label: &str, seed: i64, other: i64) -> String {
    let public = match label.strip_suffix("/*") {
        Some(family) => {
            let mut chars = family.chars();
            let capitalised: String = chars
                .next()
                .map(|first| first.to_uppercase().chain(chars).collect())
                .unwrap_or_default();
            format!("public {capitalised}-based images")
        }
        None if label == "any base" => "public images".to_owned(),
        None => format!("public images derived from {label}"),
    };
    let derived = if label == "any base" {
        "images".to_owned()
    } else {
        format!("images derived from {label}")
    };
    match (seed, other) {
        (_, 0) if seed > 0 => public,
        (0, _) => derived,
        _ => format!("{derived} ({seed} public, {other} of this store)"),
    }
}

/// The ranking of [`engine`], computed by DuckDB over the history tables: neighbours
/// weighted by their idf-weighted overlap with the known changes, plus a small support prior.
pub fn sql_rank(
    conn: &Connection,
    pattern: &str,
    known: &[Change],
    model: Option<&ItemModel>,
    limit: usize,
) -> anyhow::Result<Vec<engine::Scored>> {
    Ok(
        sql_suggest(conn, Scope::parents(pattern), known, model, limit)?
            .into_iter()
            .map(|ranked| ranked.scored)
            .collect(),
    )
}

/// The best `limit` changes for an appliance with `known` changes, ranked as [`engine`]
/// documents (with `model`'s scores blended in, when given), each with its evidence.
pub fn sql_suggest(
    conn: &Connection,
    scope: Scope<'_>,
    known: &[Change],
    model: Option<&ItemModel>,
    limit: usize,
) -> anyhow::Result<Vec<Ranked>> {
    let mut query = Query::shared(scope, known);
    // The model's scores are computed here from its rows (a few per known package) and
    // joined as a table: the model is not part of the history.
    let modelled: Vec<(&str, f64)> = model.map_or_else(Vec::new, |model| {
        let mut scores: Vec<(&str, f64)> = model.scores(known).into_iter().collect();
        scores.sort_by(|a, b| a.0.cmp(b.0));
        scores
    });
    query.text("\n             modelled AS (SELECT i.id AS item, m.score FROM ");
    if modelled.is_empty() {
        query.text("(SELECT NULL::VARCHAR AS subject, NULL::DOUBLE AS score WHERE false) AS m");
    } else {
        query.text("(VALUES ");
        for (position, (package, score)) in modelled.iter().enumerate() {
            query
                .text(if position == 0 { "(" } else { ", (" })
                .value((*package).to_owned())
                .text("::VARCHAR, ")
                .value(*score)
                .text("::DOUBLE)");
        }
        query.text(") AS m(subject, score)");
    }
    query
        .text(" JOIN items i ON i.kind = ")
        .value(MODELLED_KIND.to_owned())
        .text(" AND i.subject = m.subject),");
    query
        .text(
            "
             sizes AS (
                 SELECT nc.derivation, sum(ln((SELECT n FROM total) / i.derivations)) AS size
                 FROM neighbour_changes nc JOIN items i ON i.id = nc.item GROUP BY nc.derivation
             ),
             weights AS (
                 SELECT o.derivation, pow(o.shared / sqrt(s.size * (SELECT k FROM known_weight)), ",
        )
        .value(engine::SHARPNESS)
        .text(
            ") AS w
                 FROM overlap o JOIN sizes s USING (derivation)
                 WHERE s.size > 0 AND o.shared > 0 AND (SELECT k FROM known_weight) > 0
             ),
             votes AS (
                 SELECT nc.item, sum(w.w) AS score
                 FROM neighbour_changes nc JOIN weights w USING (derivation) GROUP BY nc.item
             ),
             ours AS (
                 SELECT s.item, i.kind, i.subject,
                        coalesce(v.score, 0) + ",
        )
        .value(engine::PRIOR)
        .text(
            " * s.n / (SELECT n FROM scope_size) AS ours,
                        coalesce(m.score, 0) AS modelled
                 FROM support s LEFT JOIN votes v USING (item) JOIN items i ON i.id = s.item
                 LEFT JOIN modelled m ON m.item = s.item
                 WHERE s.item NOT IN (SELECT item FROM known)
             ),
             blended AS (
                 SELECT item, kind, subject, ",
        );
    if model.is_some() {
        // Each part scaled by its largest value over the same rows, as the engine does.
        query
            .text("(1 - ")
            .value(engine::BLEND)
            .text(") * coalesce(ours / nullif(greatest(max(ours) OVER (), 0), 0), 0) + ")
            .value(engine::BLEND)
            .text(" * coalesce(modelled / nullif(greatest(max(modelled) OVER (), 0), 0), 0)");
    } else {
        query.text("ours");
    }
    query
        .text(
            " AS score FROM ours
             ),
             candidates AS MATERIALIZED (
                 SELECT row_number() OVER (ORDER BY score DESC, kind, subject) AS position,
                        item, kind, subject, score
                 FROM (
                     SELECT * FROM blended ORDER BY score DESC, kind, subject LIMIT ",
        )
        .value(limit as i64)
        .text(")),")
        .evidence_rows();
    query.run(conn, known).context("ranking suggestions")
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
        let model = ItemModel::fit(loaded.iter().map(|(_, d)| d)).expect("fit");
        assert!(!model.is_empty(), "the fixture has packages to model");
        for with_model in [false, true] {
            let index = engine::Index::build(&loaded);
            let index = if with_model {
                index.with_model(model.clone())
            } else {
                index
            };
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
                let from_sql = sql_rank(&conn, &pattern, &known, with_model.then_some(&model), 6)
                    .expect("sql ranking");
                let in_memory = index.suggest(&scope, &known, None, None, 6);
                let names = |list: &[engine::Scored]| {
                    list.iter().map(|s| s.change.key()).collect::<Vec<_>>()
                };
                assert_eq!(
                    names(&from_sql),
                    names(&in_memory),
                    "known {known:?}, model {with_model}"
                );
                for (a, b) in from_sql.iter().zip(&in_memory) {
                    assert!((a.score - b.score).abs() < 1e-9, "{a:?} vs {b:?}");
                }
            }
        }
    }

    #[test]
    fn the_scope_says_where_its_images_come_from() {
        assert_eq!(
            scope_phrase("debian/*", 312, 0),
            "public Debian-based images"
        );
        assert_eq!(
            scope_phrase("debian/bookworm", 0, 7),
            "images derived from debian/bookworm"
        );
        assert_eq!(
            scope_phrase("debian/*", 300, 12),
            "images derived from debian/* (300 public, 12 of this store)"
        );
        assert_eq!(scope_phrase("any base", 5, 0), "public images");
        assert_eq!(scope_phrase("any base", 0, 5), "images");
    }

    #[test]
    fn an_appliance_s_own_images_are_left_out_by_child_name() {
        let in_scope_without = |children: &[&str], appliance: &str| -> i64 {
            let derivations: Vec<Derivation> = children
                .iter()
                .map(|child| Derivation {
                    parent: "debian/bookworm".into(),
                    child: (*child).into(),
                    changes: vec![Change::new("package-added", "nginx")],
                })
                .collect();
            let conn = database(&derivations);
            let excluding = [appliance.to_owned()];
            let scope = Scope {
                pattern: "debian/bookworm",
                excluding: &excluding,
            };
            let evidence =
                evidence_for(&conn, scope, &[Change::new("package-added", "nginx")], &[])
                    .expect("evidence");
            assert_eq!(evidence[0].scope_with, evidence[0].scope_total);
            evidence[0].scope_total
        };
        // Kept: another appliance whose name starts the same, one with the name as a later
        // component, a child without a version.
        assert_eq!(
            in_scope_without(
                &[
                    "web@1",
                    "web/packages@12",
                    "web-debug@1",
                    "webx@1",
                    "other/web@1",
                    "web/x"
                ],
                "web"
            ),
            4
        );
        assert_eq!(
            in_scope_without(&["a.b@1", "axb@1", "a.b/packages@1"], "a.b"),
            1
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
    fn evidence_and_ranked_evidence_match_counts_over_the_derivations() {
        let derivations = history();
        let conn = database(&derivations);
        let known = [
            Change::new("package-added", "nginx"),
            Change::new("package-added", "curl"),
            Change::new("user-added", "nobody-has-this"),
        ];
        let in_scope: Vec<&Derivation> = derivations
            .iter()
            .filter(|d| d.parent == "debian/bookworm")
            .collect();
        let having = |changes: &[&Change]| {
            in_scope
                .iter()
                .filter(|d| changes.iter().all(|c| d.changes.contains(c)))
                .count() as i64
        };
        let check = |change: &Change, evidence: &Evidence| {
            assert_eq!(evidence.scope_total, in_scope.len() as i64, "{change:?}");
            assert_eq!(evidence.scope_with, having(&[change]), "{change:?}");
            // The given change: best confidence among those with at least 3 derivations.
            let mut best: Option<(String, i64, i64)> = None;
            for given in &known {
                let (total, with) = (having(&[given]), having(&[given, change]));
                let better = |(_, t, w): &(String, i64, i64)| {
                    let (new, old) = (with as f64 / total as f64, *w as f64 / *t as f64);
                    new > old || (new == old && total > *t)
                };
                if total >= 3 && best.as_ref().is_none_or(better) {
                    best = Some((given.key(), total, with));
                }
            }
            let actual = (
                evidence.given.clone(),
                evidence.given_total,
                evidence.given_with,
            );
            let expected = best.map_or((None, 0, 0), |(g, t, w)| (Some(g), t, w));
            assert_eq!(actual, expected, "{change:?}");
        };
        let changes = [
            Change::new("package-added", "ca-certificates"),
            Change::new("package-added", "vim"),
            Change::new("package-added", "not-in-the-history"),
        ];
        let evidence = evidence_for(&conn, Scope::parents("debian/bookworm"), &changes, &known)
            .expect("evidence");
        assert_eq!(evidence.len(), changes.len());
        for (change, evidence) in changes.iter().zip(&evidence) {
            check(change, evidence);
        }
        assert!(evidence[1].scope_with > 0, "vim is in the fixture history");
        let ranked = sql_suggest(&conn, Scope::parents("debian/bookworm"), &known, None, 8)
            .expect("ranking");
        let mut candidates: Vec<&Change> = in_scope
            .iter()
            .flat_map(|d| &d.changes)
            .filter(|c| !known.contains(c))
            .collect();
        candidates.sort();
        candidates.dedup();
        assert_eq!(ranked.len(), candidates.len().min(8));
        for Ranked { scored, evidence } in &ranked {
            check(&scored.change, evidence);
        }
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
            sql_rank(conn, "%", &known, None, 8)
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
