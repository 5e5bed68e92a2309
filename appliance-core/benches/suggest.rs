//! `suggest` for one appliance against a history of 100,000 derivations (the shipped corpus,
//! replicated with renamed children), next to a plain popularity query in the same run.
//! `cargo bench -p appliance-core --bench suggest`; target: ≤ 0.5 s per appliance.

use std::path::Path;
use std::time::{Duration, Instant};

use appliance_core::history::{self, Change, Derivation};
use appliance_core::suggest::stats;

const TARGET_DERIVATIONS: usize = 100_000;
const RUNS: usize = 5;

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("seed/derivations.jsonl.zst");
    let mut conn = duckdb::Connection::open_in_memory()?;
    conn.execute_batch(history::SCHEMA)?;
    let base: Vec<Derivation> = history::read_file(&conn, &corpus)?;
    let mut all = Vec::with_capacity(TARGET_DERIVATIONS);
    let mut copy = 0;
    while all.len() < TARGET_DERIVATIONS {
        for derivation in &base {
            if all.len() == TARGET_DERIVATIONS {
                break;
            }
            let mut derivation = derivation.clone();
            derivation.child = format!("{}#{copy}", derivation.child);
            all.push(derivation);
        }
        copy += 1;
    }
    let started = Instant::now();
    history::insert(&mut conn, &all, "bench")?;
    let insert = started.elapsed();

    let known = vec![
        Change::new("package-added", "nginx"),
        Change::new("package-added", "curl"),
        Change::new("user-added", "www-data"),
    ];
    // The seed's item model, as a seeded store's suggestions use it: read once per process
    // (what `check` pays once), then shared.
    let started = Instant::now();
    let model = Some(appliance_core::suggest::item_model::ItemModel::of_seed()?);
    let model_read = started.elapsed();
    let mut phases: [Vec<Duration>; 3] = Default::default();
    for _ in 0..RUNS {
        let started = Instant::now();
        let (_, pattern, _) = stats::sql_scope(&conn, "debian/bookworm")?;
        let scoped = started.elapsed();
        let excluding = ["web".to_owned()];
        let scope = stats::Scope {
            pattern: &pattern,
            excluding: &excluding,
        };
        let ranked = stats::sql_suggest(&conn, scope, &known, model, 5)?;
        let total = started.elapsed();
        assert_eq!(ranked.len(), 5);
        for (samples, sample) in phases.iter_mut().zip([total, scoped, total - scoped]) {
            samples.push(sample);
        }
    }
    let [suggest, scope, rank] = phases.map(median);
    let popularity = median(
        (0..RUNS)
            .map(|_| {
                let started = Instant::now();
                let mut statement = conn
                    .prepare(
                        "SELECT i.kind, i.subject, count(*) AS n
                         FROM changes c JOIN derivations d ON d.id = c.derivation JOIN items i ON i.id = c.item
                         WHERE d.parent LIKE 'debian/%' GROUP BY ALL ORDER BY n DESC LIMIT 5",
                    )
                    .expect("prepare");
                let rows: Vec<(String, String, i64)> = statement
                    .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
                    .expect("query")
                    .collect::<Result<_, _>>()
                    .expect("rows");
                assert_eq!(rows.len(), 5);
                started.elapsed()
            })
            .collect(),
    );
    println!(
        "suggest benchmark: {} derivations ({RUNS} runs, median)",
        all.len()
    );
    println!("| operation | time |");
    println!("|---|---|");
    println!("| insert the history | {insert:.2?} |");
    println!("| suggest one appliance (scope, ranking, evidence for 5) | {suggest:.2?} |");
    println!("| … of which the scope | {scope:.2?} |");
    println!("| … of which the ranking with evidence | {rank:.2?} |");
    println!("| read the seed's item model (once per process) | {model_read:.2?} |");
    println!("| baseline: popularity query alone | {popularity:.2?} |");
    Ok(())
}
