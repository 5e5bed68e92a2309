//! Package backends. Debian first: reading an image's installed packages from its own
//! `/var/lib/dpkg/status` ([`dpkg`]).

pub mod debian;
pub mod dpkg;
