//! Which packages go together, as a closed-form linear item model: EASE (H. Steck,
//! "Embarrassingly Shallow Autoencoders for Sparse Data", WWW 2019). Over the derivations'
//! package sets `X` (one row per derivation, one column per package installed by at least
//! [`MIN_DERIVATIONS`] of them), with the Gram matrix `G = XᵀX`:
//!
//! ```text
//! P = (G + λI)⁻¹        B_ij = −P_ij / P_jj  (i ≠ j),  B_jj = 0
//! score(j) = Σ_{i known} B_ij
//! ```
//!
//! `B` is the best least-squares reconstruction of each package from the others, learnt
//! for all packages at once: unlike counting co-occurrences it learns that `libpq-dev` says
//! `gcc` while `ca-certificates` (everywhere) says little, and negative weights that push
//! back what usually goes with something else. Each row keeps its [`ROW_LENGTH`] weights
//! largest in magnitude (validation recall did not move from all of them to 100).
//!
//! The model of the seed history is fitted once, when the seed changes, and shipped with
//! the binary (`seed/item_model.bin.zst`; `APPLIANCE_BLESS=1 cargo test -p appliance-core
//! --lib item_model` writes it again, and the test fails when the shipped one is not the
//! seed's). `history evaluate --held-out` fits one on its train part only.

use std::collections::HashMap;
use std::io::Read as _;

use anyhow::{Context as _, bail};

use crate::change::Change;
use crate::store::derivations::Derivation;

/// The change kind the model covers: the one with enough of a vocabulary to learn from.
pub const MODELLED_KIND: &str = "package-added";
/// Packages fewer derivations install are left out: a column of one or two rows teaches
/// nothing (validation package recall@10 blended: 2 → 0.628, 3 → 0.625, with 39 % more
/// columns and three times the fitting time at 2).
pub const MIN_DERIVATIONS: u32 = 3;
/// The ridge `λ`: validation recall@5 of the model alone, all kinds: 5 → 0.514, 15 → 0.505,
/// 40 → 0.489, 100 → 0.453.
pub const LAMBDA: f64 = 5.0;
/// Weights kept per package (by magnitude): validation recall@5/@10 blended, 100 → 0.526 /
/// 0.623, all → 0.526 / 0.625; 50 of the largest positive ones only → 0.516 / 0.617.
pub const ROW_LENGTH: usize = 100;

/// The fitted model: packages and, for each, the weights it gives the others.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemModel {
    packages: Vec<String>,
    ids: HashMap<String, u32>,
    rows: Vec<Vec<(u32, f32)>>,
}

impl ItemModel {
    /// Fit the model to derivations' package sets.
    pub fn fit<'a>(derivations: impl IntoIterator<Item = &'a Derivation>) -> anyhow::Result<Self> {
        let sets: Vec<Vec<&str>> = derivations
            .into_iter()
            .map(|d| {
                let mut set: Vec<&str> = d
                    .changes
                    .iter()
                    .filter(|c| c.kind == MODELLED_KIND)
                    .map(|c| c.subject.as_str())
                    .collect();
                set.sort_unstable();
                set.dedup();
                set
            })
            .collect();
        let mut counts: HashMap<&str, u32> = HashMap::new();
        for set in &sets {
            for package in set {
                *counts.entry(package).or_default() += 1;
            }
        }
        let mut packages: Vec<String> = counts
            .iter()
            .filter(|(_, n)| **n >= MIN_DERIVATIONS)
            .map(|(p, _)| (*p).to_owned())
            .collect();
        packages.sort_unstable();
        let ids: HashMap<String, u32> = packages
            .iter()
            .enumerate()
            .map(|(i, p)| (p.clone(), i as u32))
            .collect();
        let n = packages.len();
        let mut gram = faer::Mat::<f64>::zeros(n, n);
        for set in &sets {
            let columns: Vec<usize> = set
                .iter()
                .filter_map(|p| ids.get(*p).map(|&i| i as usize))
                .collect();
            for &i in &columns {
                for &j in &columns {
                    gram[(i, j)] += 1.0;
                }
            }
        }
        for i in 0..n {
            gram[(i, i)] += LAMBDA;
        }
        let rows = if n == 0 {
            Vec::new()
        } else {
            use faer::linalg::solvers::DenseSolveCore as _;
            // G + λI is symmetric positive definite (λ > 0): Cholesky, then its inverse.
            let inverse = gram
                .llt(faer::Side::Lower)
                .map_err(|e| anyhow::anyhow!("fitting the item model: {e:?}"))?
                .inverse();
            (0..n)
                .map(|i| {
                    let mut row: Vec<(u32, f32)> = (0..n)
                        .filter(|&j| j != i)
                        .map(|j| (j as u32, (-inverse[(i, j)] / inverse[(j, j)]) as f32))
                        .filter(|(_, w)| *w != 0.0)
                        .collect();
                    row.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()).then(a.0.cmp(&b.0)));
                    row.truncate(ROW_LENGTH);
                    row.sort_by_key(|(j, _)| *j);
                    row
                })
                .collect()
        };
        Ok(Self {
            packages,
            ids,
            rows,
        })
    }

    pub fn len(&self) -> usize {
        self.packages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.packages.is_empty()
    }

    /// The model's score of every package some known package gives a weight, known ones
    /// left out.
    pub fn scores(&self, known: &[Change]) -> HashMap<&str, f64> {
        let known_ids: Vec<u32> = known
            .iter()
            .filter(|c| c.kind == MODELLED_KIND)
            .filter_map(|c| self.ids.get(&c.subject).copied())
            .collect();
        let mut scores: HashMap<&str, f64> = HashMap::new();
        for &i in &known_ids {
            for &(j, weight) in &self.rows[i as usize] {
                if !known_ids.contains(&j) {
                    *scores
                        .entry(self.packages[j as usize].as_str())
                        .or_default() += f64::from(weight);
                }
            }
        }
        scores
    }

    /// The model as bytes: a header, the packages, then each row's (column, weight) pairs,
    /// little-endian, zstd-compressed.
    pub fn to_bytes(&self) -> anyhow::Result<Vec<u8>> {
        let mut raw = Vec::new();
        raw.extend_from_slice(MAGIC);
        raw.extend_from_slice(&(self.packages.len() as u32).to_le_bytes());
        for package in &self.packages {
            raw.extend_from_slice(&(package.len() as u32).to_le_bytes());
            raw.extend_from_slice(package.as_bytes());
        }
        for row in &self.rows {
            raw.extend_from_slice(&(row.len() as u32).to_le_bytes());
            for (column, weight) in row {
                raw.extend_from_slice(&column.to_le_bytes());
                raw.extend_from_slice(&weight.to_le_bytes());
            }
        }
        Ok(zstd::encode_all(&raw[..], 19)?)
    }

    pub fn from_bytes(bytes: &[u8]) -> anyhow::Result<Self> {
        let mut raw = Vec::new();
        zstd::stream::read::Decoder::new(bytes)?.read_to_end(&mut raw)?;
        let mut reader = Reader { raw: &raw, at: 0 };
        if reader.take(MAGIC.len())? != MAGIC {
            bail!("not an item model");
        }
        let n = reader.u32()? as usize;
        let mut packages = Vec::with_capacity(n.min(1 << 20));
        for _ in 0..n {
            let length = reader.u32()? as usize;
            packages.push(String::from_utf8(reader.take(length)?.to_vec())?);
        }
        let mut rows = Vec::with_capacity(n.min(1 << 20));
        for _ in 0..n {
            let length = reader.u32()? as usize;
            let mut row = Vec::with_capacity(length.min(ROW_LENGTH));
            for _ in 0..length {
                let column = reader.u32()?;
                if column as usize >= n {
                    bail!("item model: column {column} of {n}");
                }
                row.push((column, f32::from_le_bytes(reader.array()?)));
            }
            rows.push(row);
        }
        if reader.at != raw.len() {
            bail!("item model: {} bytes after the rows", raw.len() - reader.at);
        }
        let ids = packages
            .iter()
            .enumerate()
            .map(|(i, p)| (p.clone(), i as u32))
            .collect();
        Ok(Self {
            packages,
            ids,
            rows,
        })
    }

    /// The seed history's model, shipped with the binary.
    pub fn of_seed() -> anyhow::Result<&'static Self> {
        static MODEL: std::sync::OnceLock<ItemModel> = std::sync::OnceLock::new();
        if let Some(model) = MODEL.get() {
            return Ok(model);
        }
        let model = Self::from_bytes(SHIPPED).context("reading the seed's item model")?;
        Ok(MODEL.get_or_init(|| model))
    }
}

const MAGIC: &[u8] = b"cargo-appliance item model 1\n";

const SHIPPED: &[u8] = include_bytes!("../../seed/item_model.bin.zst");

struct Reader<'a> {
    raw: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, length: usize) -> anyhow::Result<&[u8]> {
        let end = self
            .at
            .checked_add(length)
            .filter(|end| *end <= self.raw.len())
            .context("item model: truncated")?;
        let bytes = &self.raw[self.at..end];
        self.at = end;
        Ok(bytes)
    }

    fn array(&mut self) -> anyhow::Result<[u8; 4]> {
        Ok(self.take(4)?.try_into()?)
    }

    fn u32(&mut self) -> anyhow::Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn derivation(child: &str, packages: &[&str]) -> Derivation {
        Derivation {
            parent: "debian/bookworm".into(),
            child: child.into(),
            changes: packages
                .iter()
                .map(|p| Change::new(MODELLED_KIND, *p))
                .chain([Change::new("port-exposed", "80")])
                .collect(),
        }
    }

    #[test]
    fn packages_that_go_together_score_and_round_trip() {
        let mut history = Vec::new();
        for i in 0..30 {
            history.push(derivation(
                &format!("web-{i}"),
                &["nginx", "ca-certificates"],
            ));
            history.push(derivation(
                &format!("build-{i}"),
                &["gcc", "make", "libc6-dev"],
            ));
        }
        history.push(derivation("rare", &["only-once", "gcc"]));
        let model = ItemModel::fit(&history).expect("fit");
        assert_eq!(model.len(), 5, "the package installed once is not a column");
        let scores = model.scores(&[Change::new(MODELLED_KIND, "gcc")]);
        assert!(scores["make"] > 0.3, "{scores:?}");
        assert!(!scores.contains_key("gcc"), "known ones are left out");
        assert!(
            scores.get("nginx").copied().unwrap_or(0.0) < scores["make"],
            "{scores:?}"
        );
        let again = ItemModel::from_bytes(&model.to_bytes().expect("bytes")).expect("read");
        assert_eq!(again, model);
        assert!(ItemModel::from_bytes(b"nonsense").is_err());
        let truncated = {
            let mut raw = Vec::new();
            zstd::stream::read::Decoder::new(&model.to_bytes().expect("bytes")[..])
                .expect("zstd")
                .read_to_end(&mut raw)
                .expect("read");
            raw.truncate(raw.len() - 3);
            zstd::encode_all(&raw[..], 1).expect("zstd")
        };
        assert!(ItemModel::from_bytes(&truncated).is_err());
    }

    /// The shipped model is the seed's (fitted again here; `APPLIANCE_BLESS=1` writes it).
    /// Floating point may differ in the last bits between machines: weights are compared
    /// with a tolerance, and a row may trade an entry at its cut-off.
    #[test]
    fn the_shipped_model_is_the_seed_s() {
        let seed = crate::history::seed::derivations().expect("seed");
        let fitted = ItemModel::fit(&seed).expect("fit");
        if std::env::var_os("APPLIANCE_BLESS").is_some() {
            let path =
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("seed/item_model.bin.zst");
            std::fs::write(&path, fitted.to_bytes().expect("bytes")).expect("write");
            return;
        }
        let shipped = ItemModel::from_bytes(SHIPPED).expect("the shipped model reads");
        assert_eq!(shipped.packages, fitted.packages);
        for (i, (a, b)) in shipped.rows.iter().zip(&fitted.rows).enumerate() {
            let b: HashMap<u32, f32> = b.iter().copied().collect();
            let common = a.iter().filter(|(j, _)| b.contains_key(j)).count();
            assert!(
                common + 2 >= a.len(),
                "row {i}: {common} of {} shared",
                a.len()
            );
            for (j, w) in a {
                if let Some(v) = b.get(j) {
                    assert!((w - v).abs() < 1e-4, "row {i}, column {j}: {w} and {v}");
                }
            }
        }
    }
}
