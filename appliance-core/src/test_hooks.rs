//! Fault injection for the kill tests: named points in the code where a crash would be the
//! worst (between a rename and the marker after it, between staging and a catalog commit).
//! With `APPLIANCE_FAULT_KILL_AT=NAME` (or `NAME:N` for its N-th time) in the environment,
//! the process SIGKILLs itself when it reaches the point, as a power cut or the OOM killer
//! would: no destructor, no cleanup. With `APPLIANCE_FAULT_STALL_AT=NAME[:N]` the thread that
//! reaches it stops there for good, as work stuck in a system call would, after saying so on
//! stderr: the tests of what a signal does to work that never reaches a check point. Without
//! the variables a point costs two cached lookups.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// The environment variable that names the point to die at.
pub const KILL_AT_ENV: &str = "APPLIANCE_FAULT_KILL_AT";
/// The environment variable that names the point to stall at.
pub const STALL_AT_ENV: &str = "APPLIANCE_FAULT_STALL_AT";

/// A point named by one of the variables, and how many times it has been reached.
struct Target {
    name: String,
    nth: u64,
    reached: AtomicU64,
}

impl Target {
    fn from_env(variable: &str) -> Option<Self> {
        let value = std::env::var(variable).ok()?;
        let (name, nth) = match value.rsplit_once(':') {
            Some((name, n)) => (name.to_owned(), n.parse().unwrap_or(1)),
            None => (value, 1),
        };
        Some(Self {
            name,
            nth: nth.max(1),
            reached: AtomicU64::new(0),
        })
    }

    /// Whether this reach of `name` is the one the variable asks for.
    fn hit(&self, name: &str) -> bool {
        self.name == name && self.reached.fetch_add(1, Ordering::SeqCst) + 1 == self.nth
    }
}

static KILL_AT: OnceLock<Option<Target>> = OnceLock::new();
static STALL_AT: OnceLock<Option<Target>> = OnceLock::new();

/// A point where the process may be told to die or to stall.
pub fn point(name: &str) {
    let kill = KILL_AT.get_or_init(|| Target::from_env(KILL_AT_ENV));
    if kill.as_ref().is_some_and(|target| target.hit(name)) {
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
        // SIGKILL cannot be caught; this is not reached.
        std::process::abort();
    }
    let stall = STALL_AT.get_or_init(|| Target::from_env(STALL_AT_ENV));
    if stall.as_ref().is_some_and(|target| target.hit(name)) {
        eprintln!("fault point `{name}`: stalled");
        loop {
            std::thread::park();
        }
    }
}
