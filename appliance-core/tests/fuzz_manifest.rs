//! Fuzzing the manifest pipeline: "errors are fine; panics are bugs".
//!
//! Two generators feed parse → validate → resolve → render:
//! - a property test that assembles manifests from the language's own vocabulary, so most
//!   cases get past the KDL parser and exercise the validator;
//! - a mutation fuzzer seeded with every fixture manifest, bounded by time:
//!   `APPLIANCE_FUZZ_SECONDS` (default 3; the 10-minute run used 600).
//!
//! A panicking input is written to `fixtures/fuzz-regressions/` before the test fails, and
//! every file there is replayed on each run.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use appliance_core::diagnostics::SourceFile;
use appliance_core::manifest::model::Manifest;
use appliance_core::manifest::parse_manifest;
use appliance_core::workspace::{Resolver, Workspace};
use proptest::prelude::*;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

fn workspace() -> Workspace {
    Workspace::discover(Some(&fixtures().join("invalid/Cargo.toml")))
        .expect("fixture workspace loads")
}

/// Run the whole pipeline on one input and check the invariants that must hold for any input.
fn exercise(text: &str, workspace: Option<&Workspace>) {
    let dir = workspace.map_or_else(|| fixtures().join("invalid"), |w| w.root.clone());
    let path = dir.join("fuzz.appliance.kdl");
    let file: Arc<SourceFile> =
        SourceFile::new(&path, "fuzz.appliance.kdl".into(), text.to_owned());
    let (appliances, mut diagnostics) = parse_manifest(&file);
    if let Some(workspace) = workspace {
        let manifest = Manifest {
            path,
            source: Arc::clone(&file),
            appliances,
        };
        let mut resolver = Resolver {
            workspace,
            diagnostics: &mut diagnostics,
        };
        resolver.check_manifest(&manifest);
    }
    for diagnostic in &diagnostics {
        let message = diagnostic.to_message();
        if let (Some(line), Some(column)) = (message.line, message.column) {
            assert!(line >= 1 && column >= 1);
        }
        if let Some(span) = message.span {
            assert!(
                span.offset + span.len <= text.len(),
                "span outside the text"
            );
        }
        assert!(!diagnostic.render_human(false).is_empty());
        serde_json::to_string(&message).expect("messages serialize");
    }
}

fn save_crash(text: &str) -> PathBuf {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut hasher);
    let path = fixtures().join(format!(
        "fuzz-regressions/crash-{:016x}.kdl",
        hasher.finish()
    ));
    let _ = std::fs::write(&path, text);
    path
}

fn seeds() -> Vec<String> {
    let mut seeds = Vec::new();
    for dir in ["demo", "invalid"] {
        let Ok(entries) = std::fs::read_dir(fixtures().join(dir)) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.path().to_string_lossy().ends_with(".kdl")
                && let Ok(bytes) = std::fs::read(entry.path())
            {
                seeds.push(String::from_utf8_lossy(&bytes).into_owned());
            }
        }
    }
    seeds.sort();
    seeds
}

/// Fragments that are likely to reach interesting parser and validator states.
const DICTIONARY: &[&str] = &[
    "{",
    "}",
    "\"",
    "\\",
    "=",
    ";",
    "/-",
    "//",
    "/*",
    "*/",
    "#true",
    "#false",
    "#null",
    "#inf",
    "#nan",
    "#\"",
    "\"#",
    "\"\"\"",
    "\n",
    " ",
    "(u8)",
    "0o7777",
    "0o17777",
    "0x",
    "1e999",
    "-0",
    "18446744073709551616",
    "170141183460469231731687303715884105728",
    "appliance",
    "base",
    "packages",
    "copy",
    "to=",
    "mode=",
    "output",
    "\"qcow2\"",
    "size=",
    "\"1P\"",
    "user",
    "service",
    "forward",
    "host=",
    "guest=",
    "run",
    "script=",
    "binary",
    "package=",
    "suggest",
    "ignore",
    "entrypoint",
    "env",
    "appliance=",
    "version=",
    "\"../../etc/shadow\"",
    "\"leak/passwd\"",
    "\"**/*\"",
    "\"[\"",
    "\"{a,b\"",
    "é",
    "\u{202e}",
    "\u{feff}",
    "\u{0}",
    "\r\n",
    "\u{85}",
    "\u{2028}",
];

fn mutate(rng: &mut fastrand::Rng, input: &str) -> String {
    let mut chars: Vec<char> = input.chars().collect();
    for _ in 0..rng.usize(1..=8) {
        let at = rng.usize(0..=chars.len());
        match rng.u8(0..6) {
            0 if !chars.is_empty() => {
                let end = (at + rng.usize(1..=16)).min(chars.len());
                let start = at.min(end);
                chars.drain(start..end);
            }
            1 | 2 => {
                let word = DICTIONARY[rng.usize(0..DICTIONARY.len())];
                chars.splice(at..at, word.chars());
            }
            3 if !chars.is_empty() => {
                let start = rng.usize(0..chars.len());
                let end = (start + rng.usize(1..=64)).min(chars.len());
                let copy: Vec<char> = chars[start..end].to_vec();
                let at = at.min(chars.len());
                chars.splice(at..at, copy);
            }
            4 if !chars.is_empty() => {
                let i = rng.usize(0..chars.len());
                chars[i] = char::from_u32(rng.u32(0..0x3000)).unwrap_or('?');
            }
            _ => {
                let at = at.min(chars.len());
                chars.insert(at, char::from(rng.u8(0x20..0x7f)));
            }
        }
    }
    chars.into_iter().collect()
}

#[test]
fn regressions_replay_without_panicking() {
    let workspace = workspace();
    let Ok(entries) = std::fs::read_dir(fixtures().join("fuzz-regressions")) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.path().extension().is_some_and(|e| e == "kdl") {
            let bytes = std::fs::read(entry.path()).expect("regression is readable");
            exercise(&String::from_utf8_lossy(&bytes), Some(&workspace));
        }
    }
}

#[test]
fn mutated_fixtures_never_panic() {
    let seconds: u64 = std::env::var("APPLIANCE_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let seed = std::env::var("APPLIANCE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    let mut rng = fastrand::Rng::with_seed(seed);
    let workspace = workspace();
    let seeds = seeds();
    assert!(
        seeds.len() >= 20,
        "fixture manifests are the fuzzer's seeds"
    );
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut cases = 0u64;
    let mut corpus = seeds.clone();
    while Instant::now() < deadline {
        let base = &corpus[rng.usize(0..corpus.len())];
        let input = mutate(&mut rng, base);
        // Resolution touches the filesystem; do it for a share of cases to keep throughput.
        let resolve = rng.u8(0..8) == 0;
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            exercise(&input, resolve.then_some(&workspace))
        }));
        if outcome.is_err() {
            let saved = save_crash(&input);
            panic!("seed {seed}: input saved to {} panicked", saved.display());
        }
        // Keep some mutants as new bases so mutations compound, bounded to stay fast.
        if input.len() < 16 * 1024 && rng.u8(0..16) == 0 {
            if corpus.len() > 4096 {
                let victim = rng.usize(seeds.len()..corpus.len());
                corpus.swap_remove(victim);
            }
            corpus.push(input);
        }
        cases += 1;
    }
    eprintln!("fuzz: {cases} cases in {seconds} s (seed {seed})");
    assert!(cases > 0);
}

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z/.*_-]{0,12}".prop_map(|s| format!("\"{s}\"")),
        any::<i64>().prop_map(|n| n.to_string()),
        (0u32..0o20000).prop_map(|n| format!("0o{n:o}")),
        Just("#true".to_owned()),
        Just("#null".to_owned()),
        any::<f32>().prop_map(|f| format!("{f:?}")),
        "\\PC{0,8}".prop_map(|s| format!("{s:?}")),
    ]
}

fn child() -> impl Strategy<Value = String> {
    let names = prop::sample::select(vec![
        "description",
        "base",
        "packages",
        "remove",
        "kernel",
        "binary",
        "copy",
        "user",
        "group",
        "service",
        "hostname",
        "timezone",
        "locale",
        "kernel-cmdline",
        "run",
        "forward",
        "output",
        "suggest",
        "env",
        "mkdir",
        "symlink",
        "bogus",
    ]);
    let props = prop::collection::vec(
        (
            prop::sample::select(vec![
                "to",
                "mode",
                "owner",
                "package",
                "size",
                "tag",
                "host",
                "guest",
                "enable",
                "system",
                "appliance",
                "version",
                "script",
                "limit",
                "min-support",
                "protocol",
                "nope",
            ]),
            value(),
        ),
        0..3,
    );
    (
        names,
        prop::collection::vec(value(), 0..3),
        props,
        any::<bool>(),
    )
        .prop_map(|(name, args, props, block)| {
            let props: Vec<String> = props.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
            let block = if block {
                " { ignore \"package-added:x\"; expose 80; env \"A\" \"b\" }"
            } else {
                ""
            };
            format!("    {name} {} {}{block}", args.join(" "), props.join(" "))
        })
}

fn manifest() -> impl Strategy<Value = String> {
    prop::collection::vec(("[a-z]{1,6}", prop::collection::vec(child(), 0..10)), 1..4).prop_map(
        |appliances| {
            appliances
                .into_iter()
                .map(|(name, children)| {
                    format!("appliance \"{name}\" {{\n{}\n}}\n", children.join("\n"))
                })
                .collect()
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn generated_manifests_never_panic(text in manifest()) {
        exercise(&text, None);
    }
}
