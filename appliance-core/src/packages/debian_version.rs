//! Debian version comparison, as dpkg does it (deb-version(7)): `[epoch:]upstream[-revision]`,
//! each part compared by alternating runs of non-digits (letters before non-letters, `~`
//! before everything, even the end) and digits (as numbers). Used to pick the newest kernel
//! of an image: by string order `6.1.0-9` beat `6.1.0-10`.

use std::cmp::Ordering;

/// Compare two Debian versions.
pub fn compare(a: &str, b: &str) -> Ordering {
    let (epoch_a, rest_a) = split_epoch(a);
    let (epoch_b, rest_b) = split_epoch(b);
    epoch_a.cmp(&epoch_b).then_with(|| {
        let (upstream_a, revision_a) = split_revision(rest_a);
        let (upstream_b, revision_b) = split_revision(rest_b);
        compare_part(upstream_a, upstream_b).then_with(|| compare_part(revision_a, revision_b))
    })
}

fn split_epoch(version: &str) -> (u64, &str) {
    match version.split_once(':') {
        Some((epoch, rest)) if epoch.bytes().all(|b| b.is_ascii_digit()) && !epoch.is_empty() => {
            (epoch.parse().unwrap_or(u64::MAX), rest)
        }
        _ => (0, version),
    }
}

fn split_revision(version: &str) -> (&str, &str) {
    version.rsplit_once('-').unwrap_or((version, ""))
}

/// dpkg's order of a non-digit character: `~` first, the end next, letters, then the rest.
fn order(c: Option<u8>) -> i32 {
    match c {
        Some(b'~') => -1,
        None => 0,
        Some(c) if c.is_ascii_digit() => 0,
        Some(c) if c.is_ascii_alphabetic() => i32::from(c),
        Some(c) => i32::from(c) + 256,
    }
}

fn compare_part(a: &str, b: &str) -> Ordering {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        // The non-digit run.
        while (i < a.len() && !a[i].is_ascii_digit()) || (j < b.len() && !b[j].is_ascii_digit()) {
            let ca = order(a.get(i).copied());
            let cb = order(b.get(j).copied());
            if ca != cb {
                return ca.cmp(&cb);
            }
            i += 1;
            j += 1;
        }
        // The digit run, as a number (leading zeros do not count).
        while i < a.len() && a[i] == b'0' {
            i += 1;
        }
        while j < b.len() && b[j] == b'0' {
            j += 1;
        }
        let start_a = i;
        let start_b = j;
        while i < a.len() && a[i].is_ascii_digit() {
            i += 1;
        }
        while j < b.len() && b[j].is_ascii_digit() {
            j += 1;
        }
        let (digits_a, digits_b) = (&a[start_a..i], &b[start_b..j]);
        let by_number = digits_a
            .len()
            .cmp(&digits_b.len())
            .then(digits_a.cmp(digits_b));
        if by_number.is_ne() {
            return by_number;
        }
    }
    Ordering::Equal
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_compare_as_dpkg_does() {
        // Pairs as `dpkg --compare-versions A lt B` answers them.
        let ascending = [
            ("6.1.0-9-amd64", "6.1.0-10-amd64"),
            ("6.1.0-10-amd64", "6.1.0-10-cloud-amd64"),
            ("1.0~rc1", "1.0"),
            ("1.0", "1.0+deb12u1"),
            ("1.0", "1:0.5"),
            ("2.30-1", "2.30-1.1"),
            ("1.0a", "1.0b"),
            ("1.0", "1.0.1"),
            ("1.01", "1.2"),
        ];
        for (lower, higher) in ascending {
            assert_eq!(compare(lower, higher), Ordering::Less, "{lower} < {higher}");
            assert_eq!(
                compare(higher, lower),
                Ordering::Greater,
                "{higher} > {lower}"
            );
        }
        assert_eq!(compare("1.001", "1.1"), Ordering::Equal);
        assert_eq!(compare("0:1.0", "1.0"), Ordering::Equal);
    }
}
