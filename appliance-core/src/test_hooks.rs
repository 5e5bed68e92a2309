//! Fault injection for the kill tests: named points in the code where a crash would be the
//! worst (between a rename and the marker after it, between staging and a catalog commit).
//! With `APPLIANCE_FAULT_KILL_AT=NAME` (or `NAME:N` for its N-th time) in the environment,
//! the process SIGKILLs itself when it reaches the point, as a power cut or the OOM killer
//! would: no destructor, no cleanup. Without the variable a point costs one cached lookup.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

static TARGET: OnceLock<Option<(String, u64)>> = OnceLock::new();
static REACHED: AtomicU64 = AtomicU64::new(0);

/// The environment variable that names the point to die at.
pub const KILL_AT_ENV: &str = "APPLIANCE_FAULT_KILL_AT";

fn target() -> &'static Option<(String, u64)> {
    TARGET.get_or_init(|| {
        let value = std::env::var(KILL_AT_ENV).ok()?;
        let (name, nth) = match value.rsplit_once(':') {
            Some((name, n)) => (name.to_owned(), n.parse().unwrap_or(1)),
            None => (value, 1),
        };
        Some((name, nth.max(1)))
    })
}

/// A point where the process may be told to die.
pub fn point(name: &str) {
    let Some((wanted, nth)) = target() else {
        return;
    };
    if wanted == name && REACHED.fetch_add(1, Ordering::SeqCst) + 1 == *nth {
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
        // SIGKILL cannot be caught; this is not reached.
        std::process::abort();
    }
}
