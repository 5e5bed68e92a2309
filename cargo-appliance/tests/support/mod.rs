//! Helpers shared by the integration tests that run the real binary.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

/// The binary, with the environment that would change its behaviour removed. Its stores
/// start without the seed history, so a test's history is what the test put there;
/// [`seeded_binary`] is the binary as users run it.
pub fn binary() -> Command {
    let mut command = seeded_binary();
    command.env("APPLIANCE_NO_SEED", "1");
    command
}

/// The binary whose new stores get the seed history, as a user's do.
pub fn seeded_binary() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cargo-appliance"));
    command
        .env_remove("APPLIANCE_STORE")
        .env_remove("APPLIANCE_NO_SEED")
        .env("NO_COLOR", "1");
    command
}

/// `mmdebstrap --variant=minbase bookworm`, built once and shared by the tests and runs.
pub fn minbase_tarball() -> PathBuf {
    let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("appliance-cache");
    std::fs::create_dir_all(&cache).expect("cache dir");
    let tarball = cache.join("minbase-bookworm.tar");
    let lock = std::fs::File::create(cache.join("minbase.lock")).expect("lock file");
    lock.lock().expect("lock");
    if !tarball.exists() {
        let partial = cache.join("minbase-bookworm.partial.tar");
        let status = Command::new("mmdebstrap")
            .args(["--variant=minbase", "--quiet", "bookworm"])
            .arg(&partial)
            .env("SOURCE_DATE_EPOCH", "1700000000")
            .status()
            .expect("mmdebstrap runs (installed by .ci/install-deps)");
        assert!(status.success(), "mmdebstrap failed");
        std::fs::rename(&partial, &tarball).expect("rename");
    }
    tarball
}

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}
