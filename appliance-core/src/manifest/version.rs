//! Image versions and version requirements.
//!
//! Stored images carry dotted numeric versions (`3`, `1.2`, `20261125.1`); a `base` node may
//! constrain which one it accepts with comparisons such as `>=2, <3`. In requirements numeric
//! components compare as numbers and a missing component counts as zero (`=2` accepts
//! `2.0`). As values, `2` and `2.0` are different versions (`==` says so), so the total
//! order puts the shorter first when the numbers agree: a set of versions keeps both.

use std::cmp::Ordering;
use std::fmt;

use serde::Serialize;

/// A dotted numeric version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Version(pub Vec<u64>);

impl Version {
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("is empty".into());
        }
        text.split('.')
            .map(|part| {
                if part.is_empty() || part.len() > 19 || !part.bytes().all(|b| b.is_ascii_digit()) {
                    Err("is not a dotted numeric version such as `2` or `1.4`".to_owned())
                } else {
                    part.parse::<u64>()
                        .map_err(|e| format!("has `{part}`: {e}"))
                }
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Version)
    }
}

impl Ord for Version {
    /// Consistent with `==`: numerically, then the one with fewer components first.
    fn cmp(&self, other: &Self) -> Ordering {
        self.cmp_numeric(other)
            .then_with(|| self.0.len().cmp(&other.0.len()))
    }
}

impl Version {
    /// The order requirements use: a missing component counts as zero (`2` = `2.0`).
    pub fn cmp_numeric(&self, other: &Self) -> Ordering {
        let len = self.0.len().max(other.0.len());
        (0..len)
            .map(|i| {
                let a = self.0.get(i).copied().unwrap_or(0);
                let b = other.0.get(i).copied().unwrap_or(0);
                a.cmp(&b)
            })
            .find(|ordering| ordering.is_ne())
            .unwrap_or(Ordering::Equal)
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(u64::to_string).collect();
        f.write_str(&parts.join("."))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Op {
    Eq,
    Gt,
    Ge,
    Lt,
    Le,
}

/// A conjunction of comparisons; `*` (no comparisons) matches every version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VersionReq(pub Vec<(Op, Version)>);

impl VersionReq {
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text == "*" {
            return Ok(Self(Vec::new()));
        }
        text.split(',')
            .map(|clause| {
                let clause = clause.trim();
                let (op, rest) = [
                    (">=", Op::Ge),
                    ("<=", Op::Le),
                    (">", Op::Gt),
                    ("<", Op::Lt),
                    ("=", Op::Eq),
                ]
                .iter()
                .find_map(|(prefix, op)| clause.strip_prefix(prefix).map(|rest| (*op, rest)))
                .unwrap_or((Op::Eq, clause));
                Version::parse(rest.trim())
                    .map(|version| (op, version))
                    .map_err(|e| match clause {
                        "" => "has an empty comparison".to_owned(),
                        _ if clause == text => e,
                        _ => format!("has `{clause}`, which {e}"),
                    })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }

    pub fn matches(&self, version: &Version) -> bool {
        self.0.iter().all(|(op, wanted)| {
            let ordering = version.cmp_numeric(wanted);
            match op {
                Op::Eq => ordering.is_eq(),
                Op::Gt => ordering.is_gt(),
                Op::Ge => ordering.is_ge(),
                Op::Lt => ordering.is_lt(),
                Op::Le => ordering.is_le(),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(text: &str) -> Version {
        Version::parse(text).expect("test versions are valid")
    }

    #[test]
    fn requirements_compare_numerically() {
        let cases = [
            (">=2, <3", "2", true),
            (">=2, <3", "2.9.9", true),
            (">=2, <3", "3", false),
            (">=2, <3", "10", false),
            ("=1.0", "1", true),
            ("1.2", "1.2.0", true),
            ("*", "7", true),
            (">9", "10", true),
        ];
        for (req, version, expected) in cases {
            let req = VersionReq::parse(req).expect("test requirements are valid");
            assert_eq!(req.matches(&v(version)), expected, "{req:?} vs {version}");
        }
    }

    #[test]
    fn versions_equal_as_numbers_stay_distinct_in_a_set() {
        let set: std::collections::BTreeSet<Version> = [v("2"), v("2.0"), v("1.9")].into();
        assert_eq!(set.len(), 3);
        assert_ne!(v("2"), v("2.0"));
        assert!(v("2") < v("2.0") && v("2.0") < v("2.0.1") && v("1.9") < v("2"));
        assert_eq!(v("2").cmp_numeric(&v("2.0")), Ordering::Equal);
    }

    #[test]
    fn malformed_requirements_are_errors() {
        for bad in [
            "",
            ">=",
            "1..2",
            "latest",
            ">=1,",
            "99999999999999999999",
            "1.-2",
        ] {
            assert!(VersionReq::parse(bad).is_err(), "{bad:?} parsed");
        }
    }
}
