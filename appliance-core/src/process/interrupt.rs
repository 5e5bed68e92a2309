//! SIGINT (Ctrl-C) and SIGTERM (`timeout`, CI runners, supervisors) during work that leaves
//! temporary state behind — a build, an import, an export. Inside such work
//! ([`clean_stop`]) the first signal stops every registered child with its whole process
//! group, and the work unwinds through its ordinary error paths, whose owners remove their
//! temporary directories; [`check`] points turn the signal into an [`Interrupted`] error
//! where nothing else would notice it (before a catalog commit, in long loops). The command
//! then ends by the same signal, so a shell reports 130 or 143 as for any program it
//! interrupts, and a script stops. Outside such work, or on a second signal, or when the
//! unwinding has not finished within [`GRACE`], the process ends at once, as it would with no
//! handler: the store survives a kill at any moment (ARCHITECTURE.md), so waiting buys
//! nothing there.

use std::collections::BTreeSet;
use std::process::Child;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::time::Duration;

use signal_hook::consts::{SIGINT, SIGTERM};

/// How long the work may take to unwind after the first signal.
pub const GRACE: Duration = Duration::from_secs(10);

/// The first signal received inside work, 0 before one.
static RECEIVED: AtomicI32 = AtomicI32::new(0);
/// How many [`CleanStop`] scopes are open.
static CLEAN_STOPS: AtomicUsize = AtomicUsize::new(0);
/// Process groups of running children (each child leads its own: see
/// [`super::background`]).
static CHILDREN: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());

/// A signal that stopped the work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("interrupted by {}", signal_name(*.0))]
pub struct Interrupted(pub i32);

impl Interrupted {
    /// What a shell reports for a program this signal ended.
    pub fn shell_status(self) -> i32 {
        128 + self.0
    }

    /// End the process by this signal, as if no handler were installed.
    pub fn die(self) -> ! {
        die(self.0)
    }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

/// Take over SIGINT and SIGTERM for this process. Until a [`clean_stop`] scope opens they
/// end it at once, as without a handler.
pub fn install() -> std::io::Result<()> {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    let mut result = Ok(());
    INSTALLED.call_once(|| {
        result = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]).and_then(|signals| {
            std::thread::Builder::new()
                .name("signals".into())
                .spawn(move || handle_signals(signals))
                .map(drop)
        });
    });
    result
}

fn handle_signals(mut signals: signal_hook::iterator::Signals) {
    for signal in signals.forever() {
        let first = RECEIVED
            .compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok();
        if !first || CLEAN_STOPS.load(Ordering::SeqCst) == 0 {
            die(signal);
        }
        eprintln!(
            "{}: stopping and removing temporary files (send it again to quit at once)",
            Interrupted(signal)
        );
        stop_children();
        // Work that does not reach a check point in time (a lock wait, a long write) ends
        // like a killed process; the store is made for that.
        let _ = std::thread::Builder::new()
            .name("grace".into())
            .spawn(move || {
                std::thread::sleep(GRACE);
                eprintln!(
                    "{}: the work did not stop within {}s; quitting",
                    Interrupted(signal),
                    GRACE.as_secs()
                );
                die(signal);
            });
    }
}

fn die(signal: i32) -> ! {
    let _ = signal_hook::low_level::emulate_default_handler(signal);
    // Only if the signal did not end the process.
    std::process::exit(128 + signal)
}

fn stop_children() {
    let groups = CHILDREN.lock().map(|g| g.clone()).unwrap_or_default();
    for group in groups {
        kill_group(group);
    }
}

fn kill_group(group: i32) {
    if let Some(pid) = rustix::process::Pid::from_raw(group) {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
}

/// The signal that interrupted the work, if one did.
pub fn received() -> Option<Interrupted> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        signal => Some(Interrupted(signal)),
    }
}

/// An [`Interrupted`] error once a signal arrived: for points where the work must not go on
/// (before a commit) or would not otherwise notice (a long loop).
pub fn check() -> Result<(), Interrupted> {
    match received() {
        None => Ok(()),
        Some(interrupted) => Err(interrupted),
    }
}

/// While this lives, SIGINT and SIGTERM stop the work cleanly instead of ending the process.
#[derive(Debug)]
#[must_use = "the scope ends when this is dropped"]
pub struct CleanStop(());

pub fn clean_stop() -> CleanStop {
    CLEAN_STOPS.fetch_add(1, Ordering::SeqCst);
    CleanStop(())
}

impl Drop for CleanStop {
    fn drop(&mut self) {
        CLEAN_STOPS.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A running child, stopped with its process group when a signal interrupts the work.
/// Drop it right after the wait for the child returns.
#[derive(Debug)]
#[must_use = "the child is watched until this is dropped"]
pub struct Watched(i32);

/// Watch `child`, which must lead its own process group ([`super::background`]).
pub fn watch(child: &Child) -> Watched {
    let group = i32::try_from(child.id()).unwrap_or(i32::MAX);
    if let Ok(mut children) = CHILDREN.lock() {
        children.insert(group);
    }
    // Started after the signal: the watcher has already stopped the others.
    if received().is_some() {
        kill_group(group);
    }
    Watched(group)
}

impl Drop for Watched {
    fn drop(&mut self) {
        if let Ok(mut children) = CHILDREN.lock() {
            children.remove(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interruptions_read_as_the_signal_and_the_shells_status() {
        assert_eq!(Interrupted(SIGINT).to_string(), "interrupted by SIGINT");
        assert_eq!(Interrupted(SIGINT).shell_status(), 130);
        assert_eq!(Interrupted(SIGTERM).shell_status(), 143);
        assert_eq!(check(), Ok(()), "no signal in unit tests");
    }
}
