//! The suggestion ranking.
//!
//! Scope: the derivations from the appliance's base (exact parent name) when there are at
//! least [`MIN_SCOPE`] of them, else from its family (`debian/…` for `debian/bookworm`), else
//! all of them. The scope gives support (the prior, and the evidence a suggestion prints).
//! Neighbours come from the whole history: each derivation `d` votes for its changes,
//! weighted by how much it shares with the appliance's known changes `K`:
//!
//! ```text
//! idf(c)   = ln(N / df(c))        N derivations in the history, df(c) of them have c
//! |X|      = Σ_{c ∈ X} idf(c)     (a change no derivation has counts as ln N)
//! w(d)     = (|d ∩ K| / sqrt(|d| · |K|)) ^ SHARPNESS        (idf-weighted cosine, sharpened)
//! score(c) = Σ_d w(d) · [c ∈ d]  +  PRIOR · support(c)        for every c not in K
//! ```
//!
//! Sharing a rare change (`libpq-dev`) says more about a neighbour than sharing one nearly
//! every derivation has (`ca-certificates`, `/app`): overlaps are weighted by inverse
//! document frequency. Neighbours that share more of what the appliance already has vote
//! more; the small prior (the share of the scope with `c`) orders changes no neighbour has,
//! and is the whole score for an appliance with no known changes. What goes together is
//! much the same whatever the base (`nginx` with `ca-certificates` on Debian and on Ubuntu),
//! so neighbours are not confined to the scope: confining them cost a sixth of recall@5.
//!
//! With an item model ([`super::item_model`], EASE over packages; the seed's, while the
//! store has the seed history), both parts are scaled by their largest value over the
//! scope's changes the appliance lacks, and blended:
//!
//! ```text
//! blended(c) = (1 − BLEND) · score(c) / max score  +  BLEND · model(c) / max model
//! ```
//!
//! The neighbours know the store's own builds and any history imported or pulled; the model
//! knows, for every pair of the seed's packages, what one says of the other once everything
//! else is accounted for, which the neighbours' votes blur.
//!
//! Measured with `history evaluate --held-out` (a fifth of the shipped corpus, chosen by a
//! hash of the record id, never seen by the index, the model or the tuning; constants chosen
//! on a validation fifth of the other four): see [`crate::suggest::evaluate`] and README's
//! figures. Test part, packages, recall@5 / @10: neighbours alone 0.518 / 0.613, blended
//! 0.551 / 0.642 (co-occurrence 0.293 / 0.386, popularity 0.234 / 0.308). Item-kNN with
//! cosine over co-occurrence counts was worse than the neighbours on validation (0.377 /
//! 0.489 at best) and was not kept; plain co-occurrence (one vote per shared change) is the
//! baseline printed beside ours.

use std::collections::HashMap;
use std::rc::Rc;

use serde::Serialize;

use super::item_model::{ItemModel, MODELLED_KIND};
use crate::change::Change;
use crate::store::derivations::Derivation;

/// Fewer derivations than this from the exact base: fall back to its family.
pub const MIN_SCOPE: usize = 20;
/// Exponent on neighbour weights: higher trusts close neighbours more. Chosen on the
/// validation part of the corpus' train split (package recall@5 with neighbours from the
/// whole history: 3 → 0.461 (at 0.3 weight outside the scope), 4 → 0.492, 5 → 0.502, 6 →
/// 0.478), a prior of 0.01.
pub const SHARPNESS: f64 = 5.0;
/// Neighbours sharing less than this share of the known changes' weight do not vote: their
/// sharpened weight is at most `MIN_SHARED ^ (SHARPNESS / 2)` (0.003), yet with neighbours
/// from the whole history they are most of the work (validation recall@5 0.496 → 0.494 at
/// 0.1; 0.486 at 0.2).
pub const MIN_SHARED: f64 = 0.1;
/// Weight of plain support in the score: with sharp weights a neighbour's vote is small, so
/// the prior must be too (validation recall@5 at sharpness 5: 0.002 → 0.502, 0.01 → 0.502,
/// recall@10 0.593 and 0.590).
pub const PRIOR: f64 = 0.01;
/// The item model's share of the blended score: validation package recall@5/@10 at 0.3 →
/// 0.522 / 0.617, 0.4 → 0.521 / 0.623, 0.5 → 0.524 / 0.627 (the neighbours alone: 0.495 /
/// 0.587; the model alone, all kinds modelled: 0.514 / 0.607).
pub const BLEND: f64 = 0.5;

struct Row {
    parent: String,
    items: Vec<u32>,
}

/// The history, indexed for ranking.
pub struct Index {
    items: Vec<Change>,
    ids: HashMap<Change, u32>,
    rows: Vec<Row>,
    postings: Vec<Vec<u32>>,
    /// Inverse document frequency of each item over the whole history.
    idf: Vec<f64>,
    /// Σ idf of each row's items.
    row_weights: Vec<f64>,
    /// The idf of a change no derivation has.
    unknown_idf: f64,
    scopes: std::cell::RefCell<HashMap<String, Rc<ScopeData>>>,
    /// The item model blended in (see the module's notes), when there is one.
    model: Option<ItemModel>,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index")
            .field("derivations", &self.rows.len())
            .field("changes", &self.items.len())
            .finish()
    }
}

/// Which derivations count for a base, and the support counts within them.
#[derive(Debug)]
pub struct ScopeData {
    /// What the scope is, for messages: `debian/bookworm` or `debian/*` or `any base`.
    pub label: String,
    /// The SQL LIKE pattern selecting the same parents.
    pub pattern: String,
    member: Vec<bool>,
    pub size: usize,
    counts: Vec<u32>,
    /// Items with a count above zero, most frequent first.
    by_count: Vec<u32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Scored {
    pub change: Change,
    pub score: f64,
}

impl Index {
    pub fn build(derivations: &[(i64, Derivation)]) -> Self {
        let mut items = Vec::new();
        let mut ids: HashMap<Change, u32> = HashMap::new();
        let mut rows = Vec::with_capacity(derivations.len());
        let mut postings: Vec<Vec<u32>> = Vec::new();
        for (index, (_, derivation)) in derivations.iter().enumerate() {
            let mut row_items: Vec<u32> = derivation
                .changes
                .iter()
                .map(|change| {
                    *ids.entry(change.clone()).or_insert_with(|| {
                        items.push(change.clone());
                        postings.push(Vec::new());
                        (items.len() - 1) as u32
                    })
                })
                .collect();
            row_items.sort_unstable();
            row_items.dedup();
            for &item in &row_items {
                postings[item as usize].push(index as u32);
            }
            rows.push(Row {
                parent: derivation.parent.clone(),
                items: row_items,
            });
        }
        let total = rows.len().max(1) as f64;
        let idf: Vec<f64> = postings
            .iter()
            .map(|rows_with| (total / rows_with.len().max(1) as f64).ln())
            .collect();
        let row_weights = rows
            .iter()
            .map(|row| row.items.iter().map(|&item| idf[item as usize]).sum())
            .collect();
        Self {
            items,
            ids,
            rows,
            postings,
            idf,
            row_weights,
            unknown_idf: total.ln(),
            scopes: std::cell::RefCell::new(HashMap::new()),
            model: None,
        }
    }

    /// Blend `model`'s scores into the ranking.
    pub fn with_model(mut self, model: ItemModel) -> Self {
        self.model = Some(model);
        self
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The scope for a base name, cached.
    pub fn scope(&self, base: &str) -> Rc<ScopeData> {
        if let Some(scope) = self.scopes.borrow().get(base) {
            return Rc::clone(scope);
        }
        let exact: Vec<bool> = self.rows.iter().map(|r| r.parent == base).collect();
        let (label, pattern, member) = if exact.iter().filter(|m| **m).count() >= MIN_SCOPE {
            (base.to_owned(), like_escape(base), exact)
        } else if let Some((family, _)) = base.split_once('/') {
            let prefix = format!("{family}/");
            let member: Vec<bool> = self
                .rows
                .iter()
                .map(|r| r.parent.starts_with(&prefix))
                .collect();
            if member.iter().filter(|m| **m).count() >= MIN_SCOPE {
                (
                    format!("{family}/*"),
                    format!("{}%", like_escape(&prefix)),
                    member,
                )
            } else {
                (
                    "any base".to_owned(),
                    "%".to_owned(),
                    vec![true; self.rows.len()],
                )
            }
        } else {
            (
                "any base".to_owned(),
                "%".to_owned(),
                vec![true; self.rows.len()],
            )
        };
        let mut counts = vec![0u32; self.items.len()];
        let mut size = 0;
        for (row, _) in self.rows.iter().zip(&member).filter(|(_, m)| **m) {
            size += 1;
            for &item in &row.items {
                counts[item as usize] += 1;
            }
        }
        let mut by_count: Vec<u32> = (0..counts.len() as u32)
            .filter(|&i| counts[i as usize] > 0)
            .collect();
        by_count.sort_by(|a, b| counts[*b as usize].cmp(&counts[*a as usize]).then(a.cmp(b)));
        let scope = Rc::new(ScopeData {
            label,
            pattern,
            member,
            size,
            counts,
            by_count,
        });
        self.scopes
            .borrow_mut()
            .insert(base.to_owned(), Rc::clone(&scope));
        scope
    }

    /// Rank changes for an appliance with `known` changes. `exclude` leaves one derivation
    /// out (for evaluation); `kinds` restricts the candidates.
    pub fn suggest(
        &self,
        scope: &ScopeData,
        known: &[Change],
        exclude: Option<usize>,
        kinds: Option<&[&str]>,
        limit: usize,
    ) -> Vec<Scored> {
        let known_ids: Vec<u32> = known
            .iter()
            .filter_map(|c| self.ids.get(c).copied())
            .collect();
        // Neighbours from the whole history, support from the scope: see the module's notes.
        let overlap = self.overlap(
            &known_ids,
            |row| Some(row) != exclude,
            |item| self.idf[item as usize],
        );
        let k: f64 = known
            .iter()
            .map(|c| {
                self.ids
                    .get(c)
                    .map_or(self.unknown_idf, |&item| self.idf[item as usize])
            })
            .sum();
        let mut scores: HashMap<u32, f64> = HashMap::new();
        for (&row, &shared) in &overlap {
            let size = self.row_weights[row as usize];
            if size <= 0.0 || k <= 0.0 || shared <= 0.0 || shared < MIN_SHARED * k {
                continue;
            }
            let weight = (shared / (size * k).sqrt()).powf(SHARPNESS);
            for &item in &self.rows[row as usize].items {
                *scores.entry(item).or_insert(0.0) += weight;
            }
        }
        let excluded_items: &[u32] = exclude.map_or(&[], |row| &self.rows[row].items);
        let excluded_in_scope = exclude.is_some_and(|row| scope.member[row]);
        let scope_size = (scope.size - usize::from(excluded_in_scope)).max(1) as f64;
        let count_of = |item: u32| {
            let count = scope.counts[item as usize];
            if excluded_in_scope && excluded_items.contains(&item) {
                count - 1
            } else {
                count
            }
        };
        let wanted = |item: &u32| {
            !known_ids.contains(item)
                && kinds
                    .is_none_or(|kinds| kinds.contains(&self.items[*item as usize].kind.as_str()))
        };
        let modelled: HashMap<u32, f64> = self.model.as_ref().map_or_else(HashMap::new, |model| {
            model
                .scores(known)
                .into_iter()
                .filter_map(|(package, score)| {
                    self.ids
                        .get(&Change::new(MODELLED_KIND, package))
                        .map(|&item| (item, score))
                })
                .collect()
        });
        let ours = |item: u32| {
            scores.get(&item).copied().unwrap_or(0.0)
                + PRIOR * f64::from(count_of(item)) / scope_size
        };
        // Each part of the blend is scaled by its largest value among the scope's changes the
        // appliance lacks (as the SQL ranking does over the same rows).
        let (mut ours_max, mut modelled_max) = (0.0f64, 0.0f64);
        if self.model.is_some() {
            for &item in &scope.by_count {
                if count_of(item) > 0 && !known_ids.contains(&item) {
                    ours_max = ours_max.max(ours(item));
                    modelled_max = modelled_max.max(modelled.get(&item).copied().unwrap_or(0.0));
                }
            }
        }
        let blended = |item: u32| {
            if self.model.is_none() {
                return ours(item);
            }
            let part = |value: f64, max: f64| if max > 0.0 { value / max } else { 0.0 };
            (1.0 - BLEND) * part(ours(item), ours_max)
                + BLEND * part(modelled.get(&item).copied().unwrap_or(0.0), modelled_max)
        };
        // Candidates: whatever a neighbour has or the model scores, and the most supported
        // changes of the scope (the prior alone can rank those).
        let mut candidates: Vec<u32> = scores.keys().chain(modelled.keys()).copied().collect();
        candidates.extend(
            scope
                .by_count
                .iter()
                .copied()
                .filter(wanted)
                .take(limit + excluded_items.len()),
        );
        candidates.sort_unstable();
        candidates.dedup();
        let mut ranked: Vec<Scored> = candidates
            .into_iter()
            .filter(wanted)
            .filter_map(|item| {
                let count = count_of(item);
                let neighbours = scores.get(&item).copied().unwrap_or(0.0);
                if count == 0 && neighbours == 0.0 && !modelled.contains_key(&item) {
                    return None;
                }
                Some(Scored {
                    change: self.items[item as usize].clone(),
                    score: blended(item),
                })
            })
            .collect();
        ranked.sort_by(|a, b| {
            b.score
                .total_cmp(&a.score)
                .then_with(|| a.change.cmp(&b.change))
        });
        ranked.truncate(limit);
        ranked
    }

    /// The popularity baseline: support within the scope alone.
    pub fn popular(
        &self,
        scope: &ScopeData,
        known: &[Change],
        exclude: Option<usize>,
        kinds: Option<&[&str]>,
        limit: usize,
    ) -> Vec<Scored> {
        let excluded_items: &[u32] = exclude.map_or(&[], |row| &self.rows[row].items);
        let excluded_in_scope = exclude.is_some_and(|row| scope.member[row]);
        // The excluded derivation lowers some counts by one. Past the first
        // `limit + |excluded|` candidates, only items tied with the last of them can overtake
        // a lowered one, so those are taken too: the top `limit` stays exact.
        let eligible = scope
            .by_count
            .iter()
            .copied()
            .filter(|item| !known.contains(&self.items[*item as usize]))
            .filter(|item| {
                kinds.is_none_or(|kinds| kinds.contains(&self.items[*item as usize].kind.as_str()))
            });
        let window = limit + excluded_items.len();
        let mut candidates: Vec<u32> = Vec::new();
        for item in eligible {
            if candidates.len() >= window {
                let floor = candidates
                    .last()
                    .map_or(0, |last| scope.counts[*last as usize]);
                if scope.counts[item as usize] < floor {
                    break;
                }
            }
            candidates.push(item);
        }
        let mut ranked: Vec<Scored> = candidates
            .into_iter()
            .filter_map(|item| {
                let mut count = scope.counts[item as usize];
                if excluded_in_scope && excluded_items.contains(&item) {
                    count -= 1;
                }
                (count > 0).then(|| Scored {
                    change: self.items[item as usize].clone(),
                    score: f64::from(count),
                })
            })
            .collect();
        ranked.sort_by(|a, b| {
            b.score
                .total_cmp(&a.score)
                .then_with(|| a.change.cmp(&b.change))
        });
        ranked.truncate(limit);
        ranked
    }

    /// For each derivation `keep` admits that has any of `known`: the sum of `weight` over
    /// the known changes it has.
    fn overlap(
        &self,
        known: &[u32],
        keep: impl Fn(usize) -> bool,
        weight: impl Fn(u32) -> f64,
    ) -> HashMap<u32, f64> {
        let mut overlap: HashMap<u32, f64> = HashMap::new();
        for &item in known {
            for &row in &self.postings[item as usize] {
                if keep(row as usize) {
                    *overlap.entry(row).or_insert(0.0) += weight(item);
                }
            }
        }
        overlap
    }

    /// Plain co-occurrence, the classic baseline: every derivation of the scope sharing any
    /// known change votes for its other changes with the number it shares (no idf, no
    /// sharpening, no prior).
    pub fn cooccurrence(
        &self,
        scope: &ScopeData,
        known: &[Change],
        exclude: Option<usize>,
        kinds: Option<&[&str]>,
        limit: usize,
    ) -> Vec<Scored> {
        let known_ids: Vec<u32> = known
            .iter()
            .filter_map(|c| self.ids.get(c).copied())
            .collect();
        let overlap = self.overlap(
            &known_ids,
            |row| scope.member[row] && Some(row) != exclude,
            |_| 1.0,
        );
        let mut scores: HashMap<u32, f64> = HashMap::new();
        for (&row, &shared) in &overlap {
            for &item in &self.rows[row as usize].items {
                if !known_ids.contains(&item)
                    && kinds.is_none_or(|kinds| {
                        kinds.contains(&self.items[item as usize].kind.as_str())
                    })
                {
                    *scores.entry(item).or_insert(0.0) += shared;
                }
            }
        }
        let mut ranked: Vec<Scored> = scores
            .into_iter()
            .map(|(item, score)| Scored {
                change: self.items[item as usize].clone(),
                score,
            })
            .collect();
        ranked.sort_by(|a, b| {
            b.score
                .total_cmp(&a.score)
                .then_with(|| a.change.cmp(&b.change))
        });
        ranked.truncate(limit);
        ranked
    }

    pub fn changes_of(&self, row: usize) -> Vec<Change> {
        self.rows[row]
            .items
            .iter()
            .map(|&i| self.items[i as usize].clone())
            .collect()
    }

    pub fn parent_of(&self, row: usize) -> &str {
        &self.rows[row].parent
    }
}

/// `text` as a literal inside a SQL LIKE pattern with `ESCAPE '\'`: the SQL scope and this
/// index's scope must select the same parents.
pub(super) fn like_escape(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_")
}

/// Leave-one-out quality of the ranking and of the popularity baseline.
#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    pub derivations: usize,
    pub cases: usize,
    pub recall_at_5: f64,
    pub recall_at_10: f64,
    pub baseline_recall_at_5: f64,
    pub baseline_recall_at_10: f64,
}

/// For each derivation with at least 3 added packages, hide one (chosen by a hash of the
/// child's name, so runs agree), rank package additions from its other changes with the
/// derivation itself left out, and count how often the hidden package is in the top 5 / 10.
pub fn evaluate(index: &Index, children: &[String]) -> Evaluation {
    let kinds: &[&str] = &["package-added"];
    let (mut cases, mut hit5, mut hit10, mut base5, mut base10) =
        (0usize, 0usize, 0usize, 0usize, 0usize);
    for row in 0..index.len() {
        let changes = index.changes_of(row);
        let packages: Vec<&Change> = changes
            .iter()
            .filter(|c| c.kind == "package-added")
            .collect();
        if packages.len() < 3 {
            continue;
        }
        let name = children.get(row).map_or("", String::as_str);
        let pick = fnv(name) as usize % packages.len();
        let hidden = packages[pick].clone();
        let known: Vec<Change> = changes.iter().filter(|c| **c != hidden).cloned().collect();
        let scope = index.scope(index.parent_of(row));
        let ranked = index.suggest(&scope, &known, Some(row), Some(kinds), 10);
        let baseline = index.popular(&scope, &known, Some(row), Some(kinds), 10);
        let position = |list: &[Scored]| list.iter().position(|s| s.change == hidden);
        cases += 1;
        if let Some(p) = position(&ranked) {
            hit10 += 1;
            hit5 += usize::from(p < 5);
        }
        if let Some(p) = position(&baseline) {
            base10 += 1;
            base5 += usize::from(p < 5);
        }
    }
    let share = |hits: usize| {
        if cases == 0 {
            0.0
        } else {
            hits as f64 / cases as f64
        }
    };
    Evaluation {
        derivations: index.len(),
        cases,
        recall_at_5: share(hit5),
        recall_at_10: share(hit10),
        baseline_recall_at_5: share(base5),
        baseline_recall_at_10: share(base10),
    }
}

pub(super) fn fnv(text: &str) -> u64 {
    text.bytes().fold(0xcbf29ce484222325u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x100000001b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn derivation(parent: &str, packages: &[&str]) -> (i64, Derivation) {
        (
            0,
            Derivation {
                parent: parent.into(),
                child: format!("{parent}:{}", packages.join(",")),
                changes: packages
                    .iter()
                    .map(|p| Change::new("package-added", *p))
                    .collect(),
            },
        )
    }

    #[test]
    fn neighbours_sharing_more_outvote_plain_popularity() {
        let mut history = Vec::new();
        for _ in 0..30 {
            history.push(derivation("debian/bookworm", &["curl", "vim"]));
        }
        for _ in 0..10 {
            history.push(derivation("debian/bookworm", &["nginx", "ca-certificates"]));
        }
        let index = Index::build(&history);
        let scope = index.scope("debian/bookworm");
        assert_eq!((scope.label.as_str(), scope.size), ("debian/bookworm", 40));
        let known = [Change::new("package-added", "nginx")];
        let ranked = index.suggest(&scope, &known, None, None, 3);
        assert_eq!(ranked[0].change.subject, "ca-certificates");
        let popular = index.popular(&scope, &known, None, None, 3);
        assert_eq!(popular[0].change.subject, "curl");
    }

    #[test]
    fn small_bases_fall_back_to_their_family() {
        let mut history = vec![derivation("debian/bookworm", &["a"])];
        for _ in 0..25 {
            history.push(derivation("debian/buster", &["b"]));
        }
        let index = Index::build(&history);
        let scope = index.scope("debian/bookworm");
        assert_eq!(
            (scope.label.as_str(), scope.pattern.as_str(), scope.size),
            ("debian/*", "debian/%", 26)
        );
        let other = index.scope("alpine/3.19");
        assert_eq!(other.label, "any base");
    }
}
