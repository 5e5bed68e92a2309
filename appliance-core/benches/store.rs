//! Store import/export against GNU tar on the same minbase root filesystem, in the same run.
//! `cargo bench -p appliance-core --bench store` prints a table; medians of 5 runs.
//!
//! The tarball is `APPLIANCE_BENCH_TARBALL`, or made once with `mmdebstrap --variant=minbase
//! bookworm` under the target directory.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use appliance_core::store::Store;

const RUNS: usize = 5;

fn tarball() -> PathBuf {
    if let Some(path) = std::env::var_os("APPLIANCE_BENCH_TARBALL") {
        return PathBuf::from(path);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    );
    let cache = target.join("appliance-cache");
    std::fs::create_dir_all(&cache).expect("cache dir");
    let path = cache.join("minbase-bookworm.tar");
    if !path.exists() {
        let partial = cache.join("minbase-bookworm.partial.tar");
        let status = Command::new("mmdebstrap")
            .args(["--variant=minbase", "--quiet", "bookworm"])
            .arg(&partial)
            .status()
            .expect("mmdebstrap runs");
        assert!(status.success());
        std::fs::rename(&partial, &path).expect("rename");
    }
    path
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn time(mut setup: impl FnMut(), mut run: impl FnMut()) -> Duration {
    median(
        (0..RUNS)
            .map(|_| {
                setup();
                // The previous run's writeback and deletions are not this run's cost, for
                // ours and for tar alike.
                sh(&["sync"]);
                let start = Instant::now();
                run();
                start.elapsed()
            })
            .collect(),
    )
}

fn sh(args: &[&str]) {
    let status = Command::new(args[0])
        .args(&args[1..])
        .status()
        .expect("runs");
    assert!(status.success(), "{args:?}");
}

fn main() {
    let tarball = tarball();
    let work = tempfile::tempdir_in(tarball.parent().expect("parent")).expect("temp dir");
    let root = work.path();
    let extract = root.join("extract");
    let store_dir = root.join("store");
    let tar_s = tarball.to_str().expect("utf-8");

    let reset = |path: &Path| {
        let _ = std::fs::remove_dir_all(path);
    };

    let tar_x = time(
        || {
            reset(&extract);
            std::fs::create_dir_all(&extract).expect("mkdir");
        },
        || sh(&["tar", "-xf", tar_s, "-C", extract.to_str().expect("utf-8")]),
    );
    let tar_x_sync = time(
        || {
            reset(&extract);
            std::fs::create_dir_all(&extract).expect("mkdir");
        },
        || {
            sh(&["tar", "-xf", tar_s, "-C", extract.to_str().expect("utf-8")]);
            sh(&["sync", "-f", extract.to_str().expect("utf-8")]);
        },
    );
    let import_cold = time(
        || reset(&store_dir),
        || {
            let store = Store::open(&store_dir).expect("store");
            store
                .import("bench", &tarball, None, serde_json::json!({}))
                .expect("import");
        },
    );
    // Into a store that already holds the same content: only the catalog grows.
    let store = Store::open(&store_dir).expect("store");
    let import_warm = time(
        || {},
        || {
            store
                .import("bench", &tarball, None, serde_json::json!({}))
                .expect("import");
        },
    );

    let out = root.join("out.tar");
    let tar_c = time(
        || {
            let _ = std::fs::remove_file(&out);
        },
        || {
            sh(&[
                "tar",
                "-cf",
                out.to_str().expect("utf-8"),
                "-C",
                extract.to_str().expect("utf-8"),
                ".",
            ])
        },
    );
    let export_tar = time(
        || {
            let _ = std::fs::remove_file(&out);
        },
        || {
            store.export("bench", &out).expect("export");
        },
    );
    let exported_dir = root.join("exported");
    let export_dir = time(
        || reset(&exported_dir),
        || {
            store.export("bench", &exported_dir).expect("export");
        },
    );

    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    println!(
        "store benchmark: {} ({} runs, median)",
        tarball.display(),
        RUNS
    );
    println!("| operation | ours | baseline | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| import, empty store | {import_cold:.2?} | tar -x {tar_x:.2?} | {:.2}x |",
        ratio(import_cold, tar_x)
    );
    println!(
        "| import, empty store | {import_cold:.2?} | tar -x && sync {tar_x_sync:.2?} | {:.2}x |",
        ratio(import_cold, tar_x_sync)
    );
    println!(
        "| import, content already stored | {import_warm:.2?} | tar -x {tar_x:.2?} | {:.2}x |",
        ratio(import_warm, tar_x)
    );
    println!(
        "| export to .tar | {export_tar:.2?} | tar -c {tar_c:.2?} | {:.2}x |",
        ratio(export_tar, tar_c)
    );
    println!(
        "| export to directory | {export_dir:.2?} | tar -x {tar_x:.2?} | {:.2}x |",
        ratio(export_dir, tar_x)
    );
}
