//! The seed history: the 21,682 real derivations of `appliance-core/seed/` (Dockerfiles mined
//! from public repositories; its README says where from and what each field means), compiled
//! into the binary. A store gets them once, as derivations of origin [`ORIGIN`], the first
//! time the command line opens it, so a new store's suggestions have evidence before its own
//! builds do. `history rm --origin seed` removes them for good (the store remembers it was
//! seeded); `APPLIANCE_NO_SEED=1` leaves a store unseeded (the tests use it for stores whose
//! history they control).

use duckdb::{Connection, OptionalExt as _, params};

use super::{Derivation, insert, read_jsonl};

/// The origin of the seed's derivations.
pub const ORIGIN: &str = "seed";

/// Set (and not `0`) to leave a store unseeded.
pub const NO_SEED_ENV: &str = "APPLIANCE_NO_SEED";

/// The catalog's `meta` key that records the seeding, so a removed seed stays removed.
const SEEDED_KEY: &str = "seed";

const SEED: &[u8] = include_bytes!("../../seed/derivations.jsonl.zst");

/// The seed's derivations.
pub fn derivations() -> anyhow::Result<Vec<Derivation>> {
    let decoder = zstd::stream::read::Decoder::new(SEED)?;
    read_jsonl(decoder, "the seed history")
}

/// Whether `APPLIANCE_NO_SEED` turns seeding off (tests that want a history of their own).
pub fn disabled() -> bool {
    std::env::var_os(NO_SEED_ENV).is_some_and(|v| !v.is_empty() && v != "0")
}

/// Whether [`ensure`] would seed: a read, so that commands on a seeded store never take
/// the catalog's write lock (a write would also make the suggestion and image caches stale).
pub fn needed(conn: &Connection) -> anyhow::Result<bool> {
    if disabled() {
        return Ok(false);
    }
    let seeded: Option<String> = conn
        .query_row(
            "SELECT value FROM meta WHERE key = ?",
            params![SEEDED_KEY],
            |row| row.get(0),
        )
        .optional()?;
    Ok(seeded.is_none())
}

/// Seed the history once per store; returns how many derivations were added (0 when the
/// store was seeded before, or seeding is turned off). Call with the catalog's write lock.
pub fn ensure(conn: &mut Connection) -> anyhow::Result<usize> {
    if !needed(conn)? {
        return Ok(0);
    }
    let derivations = derivations()?;
    let count = insert(conn, &derivations, ORIGIN)?;
    conn.execute(
        "INSERT INTO meta VALUES (?, ?) ON CONFLICT DO NOTHING",
        params![SEEDED_KEY, format!("{count} derivations")],
    )?;
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_is_the_shipped_corpus() {
        let derivations = derivations().expect("the seed decodes");
        assert_eq!(derivations.len(), 21_682);
        let with_nginx = derivations
            .iter()
            .filter(|d| {
                d.changes
                    .iter()
                    .any(|c| c.kind == "package-added" && c.subject == "nginx")
            })
            .count();
        assert!(with_nginx > 100, "{with_nginx} derivations install nginx");
    }
}
