//! [`Name`]: the one validated name of every named thing a user chooses (vaults,
//! resources, policies, tokens, hook sets): 1 to 64 characters of `[A-Za-z0-9._-]`, not
//! starting with a dot (so never `.` or `..`, never a hidden file). Names become file
//! names (a vault's directory) and URL path segments, so nothing else is accepted.

use std::fmt;

use crate::error::{Error, Result};

/// Longest name.
pub const MAX_LEN: usize = 64;

/// A validated name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(String);

impl Name {
    /// `s` as the name of a `what` (named in the error), or a `Config` error that says
    /// what a name may hold.
    pub fn parse(s: &str, what: &str) -> Result<Name> {
        let ok = !s.is_empty()
            && s.len() <= MAX_LEN
            && !s.starts_with('.')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
        if ok {
            return Ok(Name(s.to_owned()));
        }
        let shown: String = s.chars().take(MAX_LEN).collect();
        Err(Error::config(format!(
            "{what} name {shown:?}{} is not valid: use 1-{MAX_LEN} letters, digits, '.', '_' \
             or '-', not starting with '.'",
            if s.chars().count() > MAX_LEN {
                "…"
            } else {
                ""
            }
        )))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dots_empty_nul_long_and_slashes_are_refused() {
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "a\0b",
            "a b",
            "é",
            &"x".repeat(65),
        ] {
            assert!(Name::parse(bad, "vault").is_err(), "{bad:?}");
        }
        for good in ["v", "web-01", "a.b_c", &"x".repeat(64)] {
            assert_eq!(Name::parse(good, "vault").unwrap().as_str(), good);
        }
    }
}
