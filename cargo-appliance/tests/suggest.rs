//! Suggestions end to end: a history imported into a real store, manifests in a fixture
//! workspace, the binary's human and JSON output; and the shared corpus' leave-one-out quality.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

fn run(store: &Path, dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cargo-appliance"))
        .arg("--store")
        .arg(store)
        .args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        // The history is the fixture's alone.
        .env("APPLIANCE_NO_SEED", "1")
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .expect("the binary runs")
}

fn ok(store: &Path, dir: &Path, args: &[&str]) -> Output {
    let output = run(store, dir, args);
    assert!(
        output.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn json_lines(output: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect()
}

fn store_with_fixture_history() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = dir.path().join("store");
    let history = fixtures().join("suggest/history.jsonl");
    ok(
        &store,
        dir.path(),
        &["history", "import", history.to_str().expect("utf-8")],
    );
    (dir, store)
}

#[test]
fn suggestions_carry_their_evidence_and_attach_to_the_manifest() {
    let (_dir, store) = store_with_fixture_history();
    let workspace = fixtures().join("suggest");
    let json = ok(&store, &workspace, &["suggest", "--message-format", "json"]);
    let messages = json_lines(&json);
    let web: Vec<&serde_json::Value> = messages
        .iter()
        .filter(|m| m["appliance"] == "web")
        .collect();
    let first = web.first().expect("web has suggestions");
    assert_eq!(first["kind"], "package-added");
    assert_eq!(first["subject"], "ca-certificates");
    assert_eq!(first["rank"], 1);
    assert_eq!(first["level"], "help");
    assert_eq!(
        (first["scope_with"].as_i64(), first["scope_total"].as_i64()),
        (Some(30), Some(40))
    );
    assert_eq!(first["given"], "package-added:nginx");
    assert_eq!(
        (first["given_with"].as_i64(), first["given_total"].as_i64()),
        (Some(27), Some(29))
    );
    assert_eq!(first["line"], 4, "attached to the packages node");
    assert!(
        first["help"].as_str().expect("help").starts_with(
            "30 of 40 images derived from debian/bookworm also install ca-certificates (27 of 29 that install nginx)"
        ),
        "{first}"
    );
    let ranks: Vec<i64> = web.iter().filter_map(|m| m["rank"].as_i64()).collect();
    assert_eq!(ranks, (1..=ranks.len() as i64).collect::<Vec<_>>());

    // `quiet` ignores ca-certificates and asks for one suggestion.
    let quiet: Vec<&serde_json::Value> = messages
        .iter()
        .filter(|m| m["appliance"] == "quiet")
        .collect();
    assert_eq!(quiet.len(), 1);
    assert_ne!(quiet[0]["subject"], "ca-certificates");

    let human = ok(
        &store,
        &workspace,
        &["suggest", "-a", "web", "--limit", "3"],
    );
    let text = String::from_utf8_lossy(&human.stderr).into_owned();
    insta::assert_snapshot!("suggest_web_human", text);
    let json = ok(
        &store,
        &workspace,
        &[
            "suggest",
            "-a",
            "web",
            "--limit",
            "3",
            "--message-format",
            "json",
        ],
    );
    insta::assert_snapshot!("suggest_web_json", String::from_utf8_lossy(&json.stdout));

    // Thresholds are flags.
    let strict = ok(
        &store,
        &workspace,
        &[
            "suggest",
            "-a",
            "web",
            "--min-confidence",
            "0.95",
            "--message-format",
            "json",
        ],
    );
    for message in json_lines(&strict) {
        assert!(
            message["confidence"].as_f64().expect("confidence") >= 0.95,
            "{message}"
        );
    }
}

#[test]
fn check_prints_suggestions_without_failing() {
    let (_dir, store) = store_with_fixture_history();
    let output = ok(
        &store,
        &fixtures().join("suggest"),
        &["check", "--message-format", "json"],
    );
    let messages = json_lines(&output);
    assert!(
        messages
            .iter()
            .any(|m| m["code"] == "appliance::suggestion")
    );
    let finished = messages
        .iter()
        .find(|m| m["reason"] == "check-finished")
        .expect("finished");
    assert_eq!(finished["success"], true);
}

#[test]
fn history_round_trips_through_parquet_and_json_lines() {
    let (dir, store) = store_with_fixture_history();
    let parquet = dir.path().join("history.parquet");
    let jsonl = dir.path().join("history.jsonl");
    ok(
        &store,
        dir.path(),
        &["history", "export", parquet.to_str().expect("utf-8")],
    );
    ok(
        &store,
        dir.path(),
        &["history", "export", jsonl.to_str().expect("utf-8")],
    );
    let second = dir.path().join("second");
    ok(
        &second,
        dir.path(),
        &["history", "import", parquet.to_str().expect("utf-8")],
    );
    let again = dir.path().join("again.jsonl");
    ok(
        &second,
        dir.path(),
        &["history", "export", again.to_str().expect("utf-8")],
    );
    let first = std::fs::read_to_string(&jsonl).expect("read");
    assert_eq!(first.lines().count(), 40);
    assert_eq!(first, std::fs::read_to_string(&again).expect("read"));
}

#[test]
fn on_the_shared_corpus_suggestions_beat_popularity() {
    // The project's own copy: a clone passes its tests alone.
    let corpus = fixtures().join("../appliance-core/seed/derivations.jsonl.zst");
    assert!(
        corpus.exists(),
        "the shipped corpus is at {}",
        corpus.display()
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let store = dir.path().join("store");
    let imported = ok(
        &store,
        dir.path(),
        &[
            "history",
            "import",
            corpus.to_str().expect("utf-8"),
            "--message-format",
            "json",
        ],
    );
    assert_eq!(json_lines(&imported)[0]["imported"], 21682);
    let evaluation = ok(
        &store,
        dir.path(),
        &["history", "evaluate", "--message-format", "json"],
    );
    let result = &json_lines(&evaluation)[0];
    let ours = result["recall_at_5"].as_f64().expect("recall");
    let baseline = result["baseline_recall_at_5"].as_f64().expect("recall");
    eprintln!("corpus evaluation: {result}");
    assert!(result["cases"].as_u64().expect("cases") > 5000, "{result}");
    // The target is 1.5x; the idf-weighted ranking reaches 1.68x (0.397 vs 0.236).
    assert!(
        ours >= 1.5 * baseline,
        "recall@5 {ours:.3} fell below 1.5x the baseline {baseline:.3}"
    );
}

/// Issue 16: held out, as the issue asks: a fifth of the shipped corpus the ranking never
/// saw. Package recall@5 of at least 0.50 and at least 1.4x plain co-occurrence's, at @10
/// at least 1.4x too (0.519, 0.613; 1.78x and 1.59x when written); every kind beats
/// popularity.
#[test]
fn held_out_the_ranking_beats_co_occurrence_on_every_kind() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = dir.path().join("store");
    let output = ok(
        &store,
        dir.path(),
        &[
            "history",
            "evaluate",
            "--held-out",
            "--message-format",
            "json",
        ],
    );
    let result = &json_lines(&output)[0];
    eprintln!("held-out evaluation: {result}");
    assert_eq!(result["part"], "test");
    assert!(result["test"].as_u64().expect("test") > 4000, "{result}");
    let kinds = result["kinds"].as_array().expect("kinds");
    let recall = |kind: &serde_json::Value, ranking: &str, at: &str| {
        kind[ranking][at].as_f64().expect("a recall")
    };
    let packages = &kinds[0];
    assert_eq!(packages["kind"], "packages");
    // Issue 16's targets on the test part: recall@5 ≥ 0.50, recall@10 ≥ 0.62.
    assert!(
        recall(packages, "suggestions", "at_5") >= 0.50,
        "{packages}"
    );
    assert!(
        recall(packages, "suggestions", "at_10") >= 0.62,
        "{packages}"
    );
    for at in ["at_5", "at_10"] {
        assert!(
            recall(packages, "suggestions", at) >= 1.4 * recall(packages, "cooccurrence", at),
            "{packages}"
        );
    }
    for kind in kinds {
        assert!(kind["cases"].as_u64().expect("cases") > 500, "{kind}");
        for at in ["at_5", "at_10"] {
            assert!(
                recall(kind, "suggestions", at) > recall(kind, "cooccurrence", at)
                    && recall(kind, "suggestions", at) > recall(kind, "popularity", at),
                "{kind}"
            );
        }
    }
}

#[test]
fn a_young_store_makes_no_suggestion_from_one_or_two_images() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = dir.path().join("store");
    let history = dir.path().join("young.jsonl");
    std::fs::write(
        &history,
        "{\"parent\":\"debian/bookworm\",\"child\":\"a\",\"changes\":[{\"kind\":\"package-added\",\"subject\":\"nginx\"},{\"kind\":\"package-added\",\"subject\":\"vim\"}]}\n\
         {\"parent\":\"debian/bookworm\",\"child\":\"b\",\"changes\":[{\"kind\":\"package-added\",\"subject\":\"nginx\"},{\"kind\":\"package-added\",\"subject\":\"vim\"}]}\n\
         {\"parent\":\"debian/bookworm\",\"child\":\"c\",\"changes\":[{\"kind\":\"package-added\",\"subject\":\"curl\"}]}\n",
    )
    .expect("write");
    ok(
        &store,
        dir.path(),
        &["history", "import", history.to_str().expect("utf-8")],
    );
    let workspace = fixtures().join("suggest");
    let subjects = |extra: &[&str]| -> Vec<String> {
        let output = ok(
            &store,
            &workspace,
            &[&["suggest", "-a", "web", "--message-format", "json"], extra].concat(),
        );
        json_lines(&output)
            .iter()
            .filter_map(|m| m["subject"].as_str().map(str::to_owned))
            .collect()
    };
    assert!(subjects(&[]).is_empty(), "two images are not a habit");
    assert!(
        subjects(&["--min-images", "2"]).contains(&"vim".to_owned()),
        "the threshold is the user's"
    );
}

/// The binary as a user runs it: a new store gets the seed history.
fn run_seeded(store: &Path, dir: &Path, args: &[&str]) -> Output {
    let output = Command::new(env!("CARGO_BIN_EXE_cargo-appliance"))
        .arg("--store")
        .arg(store)
        .args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .env_remove("APPLIANCE_NO_SEED")
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .expect("the binary runs");
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

#[test]
fn a_fresh_store_suggests_from_the_seed_history_until_it_is_removed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = dir.path().join("store");
    let rootfs = dir.path().join("rootfs");
    std::fs::create_dir_all(rootfs.join("etc")).expect("mkdir");
    std::fs::write(rootfs.join("etc/os-release"), "ID=debian\n").expect("write");
    let imported = run_seeded(
        &store,
        dir.path(),
        &[
            "image",
            "import",
            "debian/bookworm",
            rootfs.to_str().expect("utf-8"),
        ],
    );
    assert!(
        String::from_utf8_lossy(&imported.stderr).contains("Seeded"),
        "{}",
        String::from_utf8_lossy(&imported.stderr)
    );
    let origins = run_seeded(&store, dir.path(), &["history"]);
    assert_eq!(String::from_utf8_lossy(&origins.stdout), "   21682 seed\n");

    let ws = dir.path().join("ws");
    std::fs::create_dir_all(ws.join("src")).expect("mkdir");
    std::fs::write(
        ws.join("Cargo.toml"),
        "[package]\nname = \"site\"\nversion = \"0.1.0\"\nedition = \"2021\"\n",
    )
    .expect("write");
    std::fs::write(ws.join("src/main.rs"), "fn main() {}\n").expect("write");
    std::fs::write(
        ws.join("appliance.kdl"),
        "appliance \"site\" {\n    base \"debian/bookworm\"\n    packages \"nginx\"\n}\n",
    )
    .expect("write");
    let suggestions = |store: &Path| -> Vec<serde_json::Value> {
        let output = run_seeded(store, &ws, &["suggest", "--message-format", "json"]);
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|line| serde_json::from_str::<serde_json::Value>(line).expect("JSON"))
            .filter(|m| m["code"] == "appliance::suggestion")
            .collect()
    };
    let found = suggestions(&store);
    assert!(found.len() >= 3, "{found:#?}");
    for suggestion in &found {
        let help = suggestion["help"].as_str().expect("help");
        assert!(help.contains("public Debian-based images"), "{help}");
        assert!(suggestion["scope_with"].as_i64() >= Some(3), "{suggestion}");
        assert!(suggestion["subject"] != "nginx", "{suggestion}");
    }

    run_seeded(&store, dir.path(), &["history", "rm", "--origin", "seed"]);
    let origins = run_seeded(&store, dir.path(), &["history"]);
    assert!(
        String::from_utf8_lossy(&origins.stdout).starts_with("no history"),
        "the seed is gone, and opening the store again does not bring it back"
    );
    assert!(suggestions(&store).is_empty());
}

#[test]
fn explain_shows_the_evidence_and_images_that_made_the_change() {
    let (_dir, store) = store_with_fixture_history();
    let workspace = fixtures().join("suggest");
    let output = ok(
        &store,
        &workspace,
        &[
            "suggest",
            "-a",
            "web",
            "--explain",
            "package-added:ca-certificates",
        ],
    );
    let text = String::from_utf8_lossy(&output.stdout);
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some(
            "package-added:ca-certificates for `web`: 30 of 40 images derived from debian/bookworm also install ca-certificates (27 of 29 that install nginx)"
        ),
        "{text}"
    );
    let examples: Vec<&str> = lines.collect();
    assert_eq!(examples.len(), 10, "{text}");
    // Each is an image of the fixture that installs ca-certificates.
    let history = std::fs::read_to_string(fixtures().join("suggest/history.jsonl")).expect("read");
    for example in examples {
        let image = example.trim().split("  (").next().expect("an image");
        let record = history
            .lines()
            .find(|line| line.contains(&format!("\"child\": \"{image}\"")))
            .unwrap_or_else(|| panic!("{image} is in the fixture"));
        assert!(record.contains("\"ca-certificates\""), "{record}");
    }
    let missing = run(
        &store,
        &workspace,
        &["suggest", "-a", "web", "--explain", "package-added:no-such"],
    );
    assert_eq!(missing.status.code(), Some(1));
}
