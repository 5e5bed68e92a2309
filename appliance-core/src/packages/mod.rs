//! Package backends. Debian first: bases from mmdebstrap ([`debian`]), installs with apt in a
//! sandboxed chroot ([`apt`]), an image's installed packages from its own
//! `/var/lib/dpkg/status` ([`dpkg`]).

pub mod apt;
pub mod debian;
pub mod debian_version;
pub mod overlay;
